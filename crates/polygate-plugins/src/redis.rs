//! A small Redis client for the plugins that keep counters in Redis (`limit-count`,
//! `limit-req`, `limit-conn` with the `redis` and `redis-cluster` policies).
//!
//! Each worker thread keeps one connection per Redis server (per address, database and
//! credentials) and **pipelines** every command its requests send: commands queued while a
//! write is in flight go out together in the next write, and replies are matched to callers in
//! order. Nothing is shared between worker threads, so no lock is taken on the request path.
//!
//! Failures are explicit: a server that cannot be reached, a reply that does not come within
//! the configured timeout, or a full queue (more than [`QUEUE`] commands waiting) each give a
//! [`RedisError`] at once; the plugin decides (`allow_degradation`). A connection that failed
//! is dropped and the next command opens a new one, at most once per [`RETRY_AFTER`] per
//! server, so an unreachable Redis costs a failed connect, not one per request.
//!
//! Redis Cluster: the slot map is read with `CLUSTER SLOTS` from the configured nodes, a
//! command goes to the node serving its key's slot (hash tags honoured), and a `MOVED` or
//! `ASK` reply refreshes the map and retries once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Commands that may wait per connection before new ones are refused.
pub const QUEUE: usize = 4096;
/// How long a server that could not be reached is not tried again.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Commands written together at most.
const BATCH: usize = 256;

/// A reply (RESP2).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`.
    Status(String),
    /// `-ERR ...` (a command error: the connection stays usable).
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$5 hello`, `$-1` is `None`.
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`, `*-1` is `None`.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as an integer (an integer reply, or a bulk string holding one).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Reply::Int(i) => Some(*i),
            Reply::Bulk(Some(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
            Reply::Status(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// The elements of an array reply.
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(v)) => v,
            _ => &[],
        }
    }
}

/// Why a command failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    /// The server could not be reached or the connection broke.
    #[error("redis {addr}: {message}")]
    Io {
        /// `host:port`.
        addr: String,
        /// What happened.
        message: String,
    },
    /// No reply within the timeout.
    #[error("redis {0}: timeout")]
    Timeout(String),
    /// Too many commands waiting on this connection.
    #[error("redis {0}: too many commands waiting ({QUEUE})")]
    QueueFull(String),
    /// The server answered with an error.
    #[error("redis: {0}")]
    Server(String),
    /// Redis Cluster: no node serves the key's slot.
    #[error("redis cluster: {0}")]
    Cluster(String),
}

/// Where the commands go and how to log in: the `redis_*` / `redis_cluster_*` fields of a
/// plugin's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// `host:port` of one server, or the seed nodes of a cluster.
    pub nodes: Vec<String>,
    /// Whether `nodes` are Redis Cluster seeds.
    pub cluster: bool,
    /// `AUTH` user name.
    pub username: Option<String>,
    /// `AUTH` password (none or empty: no `AUTH`).
    pub password: Option<String>,
    /// `SELECT` database (not for clusters).
    pub database: u32,
    /// Timeout of connecting and of each command, in milliseconds.
    pub timeout_ms: u64,
}

impl Target {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    /// What, besides the address, makes one connection different (database, credentials),
    /// as a hash: looked up per command without building a string.
    fn ident(&self) -> u64 {
        use crate::limit::fnv;
        // a 0xff byte (never in UTF-8) closes each piece
        let mut h = crate::limit::FNV_START;
        for piece in [
            &self.database.to_le_bytes()[..],
            self.username.as_deref().unwrap_or("").as_bytes(),
            self.password.as_deref().unwrap_or("").as_bytes(),
        ] {
            h = fnv(fnv(h, piece), &[0xff]);
        }
        h
    }

    /// Pool key of the connection to `addr`: everything that makes one connection different.
    fn pool_key(&self, addr: &str) -> String {
        format!(
            "{addr}#{}#{}#{}",
            self.database,
            self.username.as_deref().unwrap_or(""),
            self.password.as_deref().unwrap_or("")
        )
    }
}

/// A Lua script run with `EVALSHA`, falling back to `EVAL` when the server does not know it.
pub struct Script {
    text: &'static str,
    sha: String,
}

impl Script {
    /// A script.
    pub fn new(text: &'static str) -> Script {
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
        let sha = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Script { text, sha }
    }

    /// Runs the script on `key` with `args`.
    pub async fn run(&self, t: &Target, key: &str, args: &[&str]) -> Result<Reply, RedisError> {
        let mut cmd: Vec<&[u8]> = vec![b"EVALSHA", self.sha.as_bytes(), b"1", key.as_bytes()];
        cmd.extend(args.iter().map(|a| a.as_bytes()));
        match command(t, key, &cmd).await {
            Err(RedisError::Server(e)) if e.starts_with("NOSCRIPT") => {
                cmd[0] = b"EVAL";
                cmd[1] = self.text.as_bytes();
                command(t, key, &cmd).await
            }
            r => r,
        }
    }
}

struct Job {
    cmd: Vec<u8>,
    reply: oneshot::Sender<Result<Reply, RedisError>>,
}

struct Conn {
    tx: mpsc::Sender<Job>,
    dead: Arc<AtomicBool>,
}

#[derive(Default)]
struct ThreadState {
    /// Connections by address, then by [`Target::ident`].
    conns: HashMap<String, HashMap<u64, Conn>>,
    /// Servers that could not be reached, until when they are not tried.
    down: HashMap<String, Instant>,
    /// Cluster slot maps by seed list.
    slots: HashMap<Vec<String>, Arc<SlotMap>>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// Encodes a command as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    use polygate_core::text::push_decimal;
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.push(b'*');
    push_decimal(&mut out, args.len() as u64);
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        push_decimal(&mut out, a.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Sends one command about `key` (which picks the node of a cluster) and waits for its
/// reply. An error reply is [`RedisError::Server`].
pub async fn command(t: &Target, key: &str, args: &[&[u8]]) -> Result<Reply, RedisError> {
    let bytes = encode(args);
    if !t.cluster {
        let addr = t.nodes.first().map(String::as_str).unwrap_or("");
        return to_result(send(t, addr, bytes).await?);
    }
    let slot = key_slot(key.as_bytes());
    let mut map = slot_map(t, false).await?;
    for attempt in 0..2 {
        let Some(addr) = map.node(slot) else {
            return Err(RedisError::Cluster(format!("no node serves slot {slot}")));
        };
        let addr = addr.to_owned();
        match send(t, &addr, bytes.clone()).await {
            Ok(Reply::Error(e))
                if attempt == 0 && (e.starts_with("MOVED ") || e.starts_with("ASK ")) =>
            {
                map = slot_map(t, true).await?;
            }
            Err(RedisError::Io { .. }) if attempt == 0 => {
                map = slot_map(t, true).await?;
            }
            r => return to_result(r?),
        }
    }
    Err(RedisError::Cluster(format!("slot {slot} keeps moving")))
}

fn to_result(r: Reply) -> Result<Reply, RedisError> {
    match r {
        Reply::Error(e) => Err(RedisError::Server(e)),
        r => Ok(r),
    }
}

/// Queues `cmd` on this thread's connection to `addr` and waits for the reply.
async fn send(t: &Target, addr: &str, cmd: Vec<u8>) -> Result<Reply, RedisError> {
    let (tx, rx) = oneshot::channel();
    let job = Job { cmd, reply: tx };
    let ident = t.ident();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let usable = s
            .conns
            .get(addr)
            .and_then(|m| m.get(&ident))
            .is_some_and(|c| !c.dead.load(Ordering::Relaxed));
        if !usable {
            let key = t.pool_key(addr);
            if let Some(until) = s.down.get(&key)
                && Instant::now() < *until
            {
                return Err(RedisError::Io {
                    addr: addr.to_owned(),
                    message: "not reachable (retrying shortly)".into(),
                });
            }
            s.down.remove(&key);
            let conn = open(t, addr);
            s.conns
                .entry(addr.to_owned())
                .or_default()
                .insert(ident, conn);
        }
        let Some(conn) = s.conns.get(addr).and_then(|m| m.get(&ident)) else {
            return Err(RedisError::Io {
                addr: addr.to_owned(),
                message: "no connection".into(),
            });
        };
        conn.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RedisError::QueueFull(addr.to_owned()),
            mpsc::error::TrySendError::Closed(_) => RedisError::Io {
                addr: addr.to_owned(),
                message: "connection closed".into(),
            },
        })
    })?;
    match with_timeout(t.timeout(), rx).await {
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(RedisError::Io {
            addr: addr.to_owned(),
            message: "connection closed".into(),
        }),
        None => Err(RedisError::Timeout(addr.to_owned())),
    }
}

/// `fut`'s output, or `None` once `timeout` passed (watched by the worker's deadline sweeper:
/// no tokio timer per command).
async fn with_timeout<F: std::future::Future + Unpin>(
    timeout: Duration,
    mut fut: F,
) -> Option<F::Output> {
    let mut timeout = polygate_core::deadline::Timeout::at(Instant::now() + timeout);
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut fut).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending if timeout.poll_expired(cx) => std::task::Poll::Ready(None),
        std::task::Poll::Pending => std::task::Poll::Pending,
    })
    .await
}

/// Marks a server unreachable on this thread for [`RETRY_AFTER`].
fn mark_down(key: &str) {
    let _ = STATE.try_with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            s.down.insert(key.to_owned(), Instant::now() + RETRY_AFTER);
        }
    });
}

/// Starts a connection task for `addr` on this thread's runtime.
fn open(t: &Target, addr: &str) -> Conn {
    let (tx, rx) = mpsc::channel(QUEUE);
    let dead = Arc::new(AtomicBool::new(false));
    let task = ConnTask {
        addr: addr.to_owned(),
        pool_key: t.pool_key(addr),
        target: t.clone(),
        dead: dead.clone(),
    };
    tokio::spawn(task.run(rx));
    Conn { tx, dead }
}

struct ConnTask {
    addr: String,
    pool_key: String,
    target: Target,
    dead: Arc<AtomicBool>,
}

impl ConnTask {
    fn io(&self, message: impl std::fmt::Display) -> RedisError {
        RedisError::Io {
            addr: self.addr.clone(),
            message: message.to_string(),
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Job>) {
        let stream = match self.connect().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{e}");
                self.dead.store(true, Ordering::Relaxed);
                // commands queued meanwhile fail at once rather than waiting for their timeout
                rx.close();
                while let Some(job) = rx.recv().await {
                    let _ = job.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let (ptx, mut prx) =
            mpsc::unbounded_channel::<oneshot::Sender<Result<Reply, RedisError>>>();
        let reader_dead = self.dead.clone();
        let raddr = self.addr.clone();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                // answer every complete reply in the buffer
                loop {
                    match parse(&buf) {
                        Ok(Some((reply, used))) => {
                            buf.advance(used);
                            match prx.try_recv() {
                                Ok(waiter) => {
                                    let _ = waiter.send(Ok(reply));
                                }
                                Err(_) => {
                                    tracing::warn!("redis {raddr}: a reply nobody asked for");
                                    reader_dead.store(true, Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("redis {raddr}: {e}");
                            reader_dead.store(true, Ordering::Relaxed);
                            return fail_all(&mut prx, &raddr, "protocol error");
                        }
                    }
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        reader_dead.store(true, Ordering::Relaxed);
                        return fail_all(&mut prx, &raddr, "connection closed");
                    }
                    Ok(_) => {}
                }
            }
        });
        let mut out = Vec::with_capacity(8192);
        while let Some(job) = rx.recv().await {
            out.clear();
            let mut jobs = vec![job];
            while jobs.len() < BATCH {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            for j in jobs {
                out.extend_from_slice(&j.cmd);
                // the reader learns of the waiter before the command can be answered
                if ptx.send(j.reply).is_err() {
                    break;
                }
            }
            if self.dead.load(Ordering::Relaxed) || wr.write_all(&out).await.is_err() {
                break;
            }
        }
        self.dead.store(true, Ordering::Relaxed);
        drop(ptx);
        rx.close();
        while let Ok(job) = rx.try_recv() {
            let _ = job.reply.send(Err(self.io("connection closed")));
        }
        let _ = reader.await;
    }

    async fn connect(&self) -> Result<TcpStream, RedisError> {
        let t = &self.target;
        let attempt = async {
            let mut s = TcpStream::connect(&self.addr)
                .await
                .map_err(|e| self.io(e))?;
            let _ = s.set_nodelay(true);
            let mut hello = Vec::new();
            let mut expect = 0;
            if let Some(pw) = t.password.as_deref().filter(|p| !p.is_empty()) {
                hello.extend(match &t.username {
                    Some(u) => encode(&[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                    None => encode(&[b"AUTH", pw.as_bytes()]),
                });
                expect += 1;
            }
            if t.database != 0 && !t.cluster {
                hello.extend(encode(&[b"SELECT", t.database.to_string().as_bytes()]));
                expect += 1;
            }
            if expect > 0 {
                s.write_all(&hello).await.map_err(|e| self.io(e))?;
                let mut buf = BytesMut::new();
                while expect > 0 {
                    match parse(&buf).map_err(|e| self.io(e))? {
                        Some((Reply::Error(e), _)) => {
                            return Err(self.io(format!("login refused: {e}")));
                        }
                        Some((_, used)) => {
                            buf.advance(used);
                            expect -= 1;
                        }
                        None => {
                            if s.read_buf(&mut buf).await.map_err(|e| self.io(e))? == 0 {
                                return Err(self.io("closed during login"));
                            }
                        }
                    }
                }
            }
            Ok(s)
        };
        let r = match tokio::time::timeout(t.timeout(), attempt).await {
            Ok(r) => r,
            Err(_) => Err(self.io("connect timeout")),
        };
        if r.is_err() {
            mark_down(&self.pool_key);
        }
        r
    }
}

fn fail_all(
    prx: &mut mpsc::UnboundedReceiver<oneshot::Sender<Result<Reply, RedisError>>>,
    addr: &str,
    why: &str,
) {
    prx.close();
    while let Ok(w) = prx.try_recv() {
        let _ = w.send(Err(RedisError::Io {
            addr: addr.to_owned(),
            message: why.to_owned(),
        }));
    }
}

/// Parses one reply from the front of `buf`: `Ok(None)` when it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
        let rest = buf.get(from..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        Some((&rest[..end], from + end + 2))
    }
    fn num(b: &[u8]) -> Result<i64, String> {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad number {:?}", String::from_utf8_lossy(b)))
    }
    fn at(buf: &[u8], from: usize, depth: usize) -> Result<Option<(Reply, usize)>, String> {
        if depth > 8 {
            return Err("replies nested too deep".into());
        }
        let Some(&kind) = buf.get(from) else {
            return Ok(None);
        };
        let Some((l, next)) = line(buf, from + 1) else {
            return Ok(None);
        };
        let text = || String::from_utf8_lossy(l).into_owned();
        Ok(Some(match kind {
            b'+' => (Reply::Status(text()), next),
            b'-' => (Reply::Error(text()), next),
            b':' => (Reply::Int(num(l)?), next),
            b'$' => {
                let n = num(l)?;
                if n < 0 {
                    (Reply::Bulk(None), next)
                } else {
                    let n = usize::try_from(n).map_err(|_| "bad length")?;
                    if n > 512 << 20 {
                        return Err("bulk string too long".into());
                    }
                    if buf.len() < next + n + 2 {
                        return Ok(None);
                    }
                    (
                        Reply::Bulk(Some(buf[next..next + n].to_vec())),
                        next + n + 2,
                    )
                }
            }
            b'*' => {
                let n = num(l)?;
                if n < 0 {
                    (Reply::Array(None), next)
                } else {
                    let n = usize::try_from(n).map_err(|_| "bad length")?;
                    if n > 1 << 20 {
                        return Err("array too long".into());
                    }
                    let mut items = Vec::with_capacity(n.min(64));
                    let mut pos = next;
                    for _ in 0..n {
                        match at(buf, pos, depth + 1)? {
                            Some((r, p)) => {
                                items.push(r);
                                pos = p;
                            }
                            None => return Ok(None),
                        }
                    }
                    (Reply::Array(Some(items)), pos)
                }
            }
            other => return Err(format!("unexpected reply type byte {other:#04x}")),
        }))
    }
    at(buf, 0, 0)
}

/// Redis Cluster's slot of a key: CRC16 (XMODEM) of the key, or of its `{hash tag}`.
pub fn key_slot(key: &[u8]) -> u16 {
    let mut k = key;
    if let Some(open) = key.iter().position(|&b| b == b'{')
        && let Some(len) = key[open + 1..].iter().position(|&b| b == b'}')
        && len > 0
    {
        k = &key[open + 1..open + 1 + len];
    }
    let mut crc: u16 = 0;
    for &b in k {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Which node serves which slots.
#[derive(Debug, Default)]
struct SlotMap {
    ranges: Vec<(u16, u16, String)>,
}

impl SlotMap {
    fn node(&self, slot: u16) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, n)| n.as_str())
    }
}

/// This thread's slot map of a cluster, read from its seeds when missing or when `refresh`.
async fn slot_map(t: &Target, refresh: bool) -> Result<Arc<SlotMap>, RedisError> {
    if !refresh && let Some(m) = STATE.with(|s| s.borrow().slots.get(&t.nodes).cloned()) {
        return Ok(m);
    }
    let mut last = RedisError::Cluster("no nodes configured".into());
    for seed in &t.nodes {
        match send(t, seed, encode(&[b"CLUSTER", b"SLOTS"])).await {
            Ok(Reply::Array(Some(entries))) => {
                let mut ranges = Vec::new();
                for e in &entries {
                    let items = e.items();
                    let (Some(a), Some(b)) = (
                        items.first().and_then(Reply::as_int),
                        items.get(1).and_then(Reply::as_int),
                    ) else {
                        continue;
                    };
                    let master = items.get(2).map(Reply::items).unwrap_or(&[]);
                    let host = match master.first() {
                        Some(Reply::Bulk(Some(h))) if !h.is_empty() => {
                            String::from_utf8_lossy(h).into_owned()
                        }
                        _ => seed
                            .rsplit_once(':')
                            .map_or(seed.clone(), |(h, _)| h.into()),
                    };
                    let Some(port) = master.get(1).and_then(Reply::as_int) else {
                        continue;
                    };
                    ranges.push((a as u16, b as u16, format!("{host}:{port}")));
                }
                let map = Arc::new(SlotMap { ranges });
                STATE.with(|s| s.borrow_mut().slots.insert(t.nodes.clone(), map.clone()));
                return Ok(map);
            }
            Ok(Reply::Error(e)) => last = RedisError::Server(e),
            Ok(other) => last = RedisError::Cluster(format!("CLUSTER SLOTS answered {other:?}")),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse(b"+OK\r\n").unwrap(),
            Some((Reply::Status("OK".into()), 5))
        );
        assert_eq!(parse(b":12\r\n").unwrap(), Some((Reply::Int(12), 5)));
        assert_eq!(parse(b"$3\r\nab").unwrap(), None);
        assert_eq!(
            parse(b"*2\r\n:1\r\n$2\r\nhi\r\nrest").unwrap(),
            Some((
                Reply::Array(Some(vec![Reply::Int(1), Reply::Bulk(Some(b"hi".to_vec()))])),
                16
            ))
        );
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert!(parse(b"?x\r\n").is_err());
    }

    #[test]
    fn slots_as_redis_computes_them() {
        // values from Redis Cluster's specification and `CLUSTER KEYSLOT`
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // an empty first tag: the whole key is hashed, not `bar`
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
    }
}
