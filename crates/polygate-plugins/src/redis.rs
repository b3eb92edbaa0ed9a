//! A small Redis client for the plugins that keep counters in Redis (`limit-count`,
//! `limit-req`, `limit-conn` with the `redis` and `redis-cluster` policies).
//!
//! Each worker thread keeps one connection per Redis server (per address, database and
//! credentials) and **pipelines** every command its requests send: a command is encoded
//! straight into the connection's output, everything queued since the connection's task last
//! ran goes out in one write, and replies are handed to the commands in order. One task per
//! connection does both directions; a command costs no channel, no allocation of its own and no
//! task of its own. Nothing is shared between worker threads (the connection's lock is only
//! ever taken by its own thread).
//!
//! Failures are explicit: a server that cannot be reached, a reply that does not come within
//! the configured timeout, or a full queue (more than [`QUEUE`] commands waiting) each give a
//! [`RedisError`] at once; the plugin decides (`allow_degradation`). A command that times out
//! ends its connection (the other commands on it fail at once), so a server that stopped
//! answering cannot hold the queue. A connection that failed
//! is dropped and the next command opens a new one, at most once per [`RETRY_AFTER`] per
//! server, so an unreachable Redis costs a failed connect, not one per request.
//!
//! Redis Cluster: the slot map is read with `CLUSTER SLOTS` from the configured nodes, a
//! command goes to the node serving its key's slot (hash tags honoured), and a `MOVED` or
//! `ASK` reply refreshes the map and retries once.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Commands that may wait per connection before new ones are refused.
pub const QUEUE: usize = 4096;
/// How long a server that could not be reached is not tried again.
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

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
    /// `EVALSHA <sha> 1 ` encoded as the start of a six-element RESP array: one key and two
    /// arguments follow ([`add_to_window`]'s shape).
    evalsha_head: Vec<u8>,
}

impl Script {
    /// A script.
    pub fn new(text: &'static str) -> Script {
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
        let sha: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut evalsha_head = b"*6\r\n".to_vec();
        for a in [&b"EVALSHA"[..], sha.as_bytes(), b"1"] {
            push_bulk(&mut evalsha_head, a);
        }
        Script {
            text,
            sha,
            evalsha_head,
        }
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

/// This thread's connection to one server (one address, database and credentials): the
/// commands' side of it. The connection task owns the socket.
struct Conn {
    /// Hash of the address and [`Target::ident`], compared before the address.
    key: u64,
    addr: String,
    ident: u64,
    shared: Arc<Mutex<Shared>>,
}

/// What the commands and the connection task share. Only the worker thread that opened the
/// connection touches it (the lock is never contended; it makes the task `Send`).
#[derive(Default)]
struct Shared {
    /// Encoded commands the task has not taken yet.
    out: Vec<u8>,
    /// The commands queued or sent, in the order their replies come.
    order: VecDeque<Expect>,
    /// Window counters to add to, merged per key until the task next writes.
    counts: Vec<Count>,
    /// Where each key's entry is in `counts`.
    count_at: HashMap<String, usize>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The connection task, parked with nothing to write: woken by the first command queued.
    task: Option<Waker>,
    /// Why the connection failed; the next command opens a new one.
    failed: Option<RedisError>,
}

/// What a reply is for.
enum Expect {
    /// One command's slot.
    One(usize),
    /// Several [`add_to_window`] calls on one key, sent as one: each slot and its cost, and the
    /// total.
    Merged(Vec<(usize, u64)>, u64),
}

/// [`add_to_window`] calls on one key waiting to be written.
struct Count {
    key: String,
    script: &'static Script,
    window_ms: u64,
    total: u64,
    waiters: Vec<(usize, u64)>,
}

enum Slot {
    Free,
    /// Waiting for the reply (the waker of the command's task, once polled).
    Waiting(Option<Waker>),
    Done(Result<Reply, RedisError>),
    /// The command gave up (timeout, request gone): its reply is read and dropped.
    Abandoned,
}

/// Everything of the worker thread's Redis side.
#[derive(Default)]
struct ThreadState {
    /// A handful of servers at most: a list, no hashing of the address per command.
    conns: Vec<Conn>,
    /// Servers that could not be reached, until when they are not tried.
    down: HashMap<String, Instant>,
    /// Cluster slot maps by seed list.
    slots: HashMap<Vec<String>, Arc<SlotMap>>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // a panic while holding it cannot leave the queue half-changed in a way that matters more
    // than losing the connection's commands: carry on with what is there
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends a command, as a RESP array of bulk strings, to `out`.
fn encode_into(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.reserve(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.push(b'*');
    polygate_core::text::push_decimal(out, args.len() as u64);
    out.extend_from_slice(b"\r\n");
    for a in args {
        push_bulk(out, a);
    }
}

/// Appends one bulk string.
fn push_bulk(out: &mut Vec<u8>, a: &[u8]) {
    out.push(b'$');
    polygate_core::text::push_decimal(out, a.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

/// Sends one command about `key` (which picks the node of a cluster) and waits for its
/// reply. An error reply is [`RedisError::Server`].
pub async fn command(t: &Target, key: &str, args: &[&[u8]]) -> Result<Reply, RedisError> {
    if !t.cluster {
        let addr = t.nodes.first().map(String::as_str).unwrap_or("");
        return to_result(send(t, addr, args).await?);
    }
    let slot = key_slot(key.as_bytes());
    let mut map = slot_map(t, false).await?;
    for attempt in 0..2 {
        let Some(addr) = map.node(slot) else {
            return Err(RedisError::Cluster(format!("no node serves slot {slot}")));
        };
        let addr = addr.to_owned();
        match send(t, &addr, args).await {
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

/// Queues the command on this thread's connection to `addr` and waits for the reply.
async fn send(t: &Target, addr: &str, args: &[&[u8]]) -> Result<Reply, RedisError> {
    let waiting = with_conn(t, addr, |shared| enqueue(shared, args, addr))?;
    reply_within(t, addr, waiting).await
}

/// Adds `cost` to the fixed-window counter `key` with `script` (`KEYS[1]` = key, `ARGV[1]` =
/// cost, `ARGV[2]` = window in ms; the reply is `{used, ttl_ms}` after adding). Calls on one
/// key that are waiting for the same write are sent as **one** script run with the sum of
/// their costs, and each caller gets the count it would have seen had they run one after
/// another (`used - total + its running sum`). The script must therefore be additive: running
/// it with `a + b` must leave what running it with `a` then `b` leaves, and answer the second
/// run's reply. Redis Cluster targets run one script per call.
pub async fn add_to_window(
    t: &Target,
    script: &'static Script,
    key: &str,
    cost: u64,
    window_ms: u64,
) -> Result<Reply, RedisError> {
    // one script run for this call alone (the merged path encodes its numbers itself)
    let alone = || async {
        let (c, w) = (cost.to_string(), window_ms.to_string());
        script.run(t, key, &[&c, &w]).await
    };
    if t.cluster {
        return alone().await;
    }
    let addr = t.nodes.first().map(String::as_str).unwrap_or("");
    let waiting = with_conn(t, addr, |shared| {
        enqueue_count(shared, script, key, cost, window_ms, addr)
    })?;
    match reply_within(t, addr, waiting).await? {
        // Redis restarted or flushed its scripts: this call alone, loading the script
        Reply::Error(e) if e.starts_with("NOSCRIPT") => alone().await,
        r => to_result(r),
    }
}

/// Runs `f` on this thread's connection to `addr` (for `t`'s database and credentials),
/// opening one when there is none or it failed (`f` answering `Err(None)`).
fn with_conn<R>(
    t: &Target,
    addr: &str,
    f: impl Fn(&Arc<Mutex<Shared>>) -> Result<R, Option<RedisError>>,
) -> Result<R, RedisError> {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let ident = t.ident();
        let key = crate::limit::fnv(ident, addr.as_bytes());
        let found = s
            .conns
            .iter()
            .position(|c| c.key == key && c.ident == ident && c.addr == addr);
        if let Some(i) = found {
            match f(&s.conns[i].shared) {
                Err(None) => {
                    s.conns.swap_remove(i); // failed: a new one below
                }
                r => return r.map_err(|e| e.unwrap_or_else(|| closed(addr))),
            }
        }
        let pool_key = t.pool_key(addr);
        if let Some(until) = s.down.get(&pool_key) {
            if Instant::now() < *until {
                return Err(RedisError::Io {
                    addr: addr.to_owned(),
                    message: "not reachable (retrying shortly)".into(),
                });
            }
            s.down.remove(&pool_key);
        }
        let shared = open(t, addr, pool_key);
        let r = f(&shared);
        s.conns.push(Conn {
            key,
            addr: addr.to_owned(),
            ident,
            shared,
        });
        r.map_err(|e| e.unwrap_or_else(|| closed(addr)))
    })
}

/// Ends a connection: every command queued or sent on it fails with `err`, the next command
/// opens a new connection, and the connection's task (woken) closes the socket.
fn fail(shared: &Mutex<Shared>, err: RedisError) {
    let mut wake = Vec::new();
    {
        let mut s = lock(shared);
        if s.failed.is_none() {
            s.failed = Some(err.clone());
        }
        s.out = Vec::new();
        wake.extend(s.task.take());
        let mut slots: Vec<usize> = Vec::new();
        for e in std::mem::take(&mut s.order) {
            match e {
                Expect::One(i) => slots.push(i),
                Expect::Merged(v, _) => slots.extend(v.into_iter().map(|(i, _)| i)),
            }
        }
        for c in std::mem::take(&mut s.counts) {
            slots.extend(c.waiters.into_iter().map(|(i, _)| i));
        }
        s.count_at.clear();
        for i in slots {
            s.answer(i, Err(err.clone()), &mut wake);
        }
    }
    for w in wake {
        w.wake();
    }
}

/// Waits for a queued command's reply. A command that times out ends its connection, as
/// lua-resty-redis closes a socket that timed out: a server that stopped answering would
/// otherwise hold every later command's slot until the queue is full.
async fn reply_within(t: &Target, addr: &str, waiting: Waiting) -> Result<Reply, RedisError> {
    let shared = waiting.shared.clone();
    match with_timeout(t.timeout(), waiting).await {
        Some(r) => r,
        None => {
            let err = RedisError::Timeout(addr.to_owned());
            fail(&shared, err.clone()); // the connection's task logs it
            Err(err)
        }
    }
}

fn closed(addr: &str) -> RedisError {
    RedisError::Io {
        addr: addr.to_owned(),
        message: "connection closed".into(),
    }
}

impl Shared {
    /// Gives slot `i` its reply (or frees it when its command was abandoned), collecting the
    /// waker to wake once the lock is released.
    fn answer(&mut self, i: usize, r: Result<Reply, RedisError>, wake: &mut Vec<Waker>) {
        match std::mem::replace(&mut self.slots[i], Slot::Free) {
            Slot::Waiting(w) => {
                self.slots[i] = Slot::Done(r);
                wake.extend(w);
            }
            Slot::Abandoned => self.free.push(i),
            other => self.slots[i] = other,
        }
    }

    /// Moves what the commands queued into `wbuf`: the encoded commands, then one script run
    /// per counter key with the calls' costs summed.
    fn take_output(&mut self, wbuf: &mut Vec<u8>) {
        std::mem::swap(&mut self.out, wbuf);
        if self.counts.is_empty() {
            return;
        }
        self.count_at.clear();
        let mut num = Vec::with_capacity(20);
        for c in std::mem::take(&mut self.counts) {
            wbuf.extend_from_slice(&c.script.evalsha_head);
            push_bulk(wbuf, c.key.as_bytes());
            num.clear();
            polygate_core::text::push_decimal(&mut num, c.total);
            push_bulk(wbuf, &num);
            num.clear();
            polygate_core::text::push_decimal(&mut num, c.window_ms);
            push_bulk(wbuf, &num);
            self.order.push_back(match <[_; 1]>::try_from(c.waiters) {
                Ok([(i, _)]) => Expect::One(i),
                Err(v) => Expect::Merged(v, c.total),
            });
        }
    }

    /// Whether the task has nothing to take (it is woken when that changes).
    fn idle(&self) -> bool {
        self.out.is_empty() && self.counts.is_empty()
    }

    /// A slot for a new command, or why there is none: `Err(None)` when the connection failed.
    fn slot(&mut self, addr: &str) -> Result<usize, Option<RedisError>> {
        if self.failed.is_some() {
            return Err(None);
        }
        if self.slots.len() - self.free.len() >= QUEUE {
            return Err(Some(RedisError::QueueFull(addr.to_owned())));
        }
        Ok(match self.free.pop() {
            Some(i) => {
                self.slots[i] = Slot::Waiting(None);
                i
            }
            None => {
                self.slots.push(Slot::Waiting(None));
                self.slots.len() - 1
            }
        })
    }
}

/// Queues a command: its reply's future, or `Err(None)` when the connection failed (open a new
/// one), or the error to give.
fn enqueue(
    shared: &Arc<Mutex<Shared>>,
    args: &[&[u8]],
    addr: &str,
) -> Result<Waiting, Option<RedisError>> {
    let mut s = lock(shared);
    let first = s.idle();
    let slot = s.slot(addr)?;
    encode_into(&mut s.out, args);
    s.order.push_back(Expect::One(slot));
    queued(s, first, shared, slot)
}

/// Queues an [`add_to_window`] call, merged with those on the same key not yet written.
fn enqueue_count(
    shared: &Arc<Mutex<Shared>>,
    script: &'static Script,
    key: &str,
    cost: u64,
    window_ms: u64,
    addr: &str,
) -> Result<Waiting, Option<RedisError>> {
    let mut s = lock(shared);
    let first = s.idle();
    let slot = s.slot(addr)?;
    let s_ = &mut *s;
    match s_.count_at.get(key) {
        Some(&i)
            if s_.counts[i].window_ms == window_ms && std::ptr::eq(s_.counts[i].script, script) =>
        {
            let c = &mut s_.counts[i];
            c.total += cost;
            c.waiters.push((slot, cost));
        }
        _ => {
            s_.count_at.insert(key.to_owned(), s_.counts.len());
            s_.counts.push(Count {
                key: key.to_owned(),
                script,
                window_ms,
                total: cost,
                waiters: vec![(slot, cost)],
            });
        }
    }
    queued(s, first, shared, slot)
}

/// Wakes the connection task when the command is the first it has to take.
fn queued(
    mut s: std::sync::MutexGuard<'_, Shared>,
    first: bool,
    shared: &Arc<Mutex<Shared>>,
    slot: usize,
) -> Result<Waiting, Option<RedisError>> {
    let task = if first { s.task.take() } else { None };
    drop(s);
    if let Some(w) = task {
        w.wake(); // the connection task runs on this thread: a local wake-up
    }
    Ok(Waiting {
        shared: shared.clone(),
        slot,
        finished: false,
    })
}

/// A queued command's reply. Dropped before it came, the command is abandoned: the reply is
/// read and dropped, and the slot freed then.
struct Waiting {
    shared: Arc<Mutex<Shared>>,
    slot: usize,
    finished: bool,
}

impl std::future::Future for Waiting {
    type Output = Result<Reply, RedisError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        let mut s = lock(&this.shared);
        let slot = this.slot;
        match &mut s.slots[slot] {
            Slot::Waiting(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done(_) => {
                let Slot::Done(r) = std::mem::replace(&mut s.slots[slot], Slot::Free) else {
                    unreachable!("matched above")
                };
                s.free.push(slot);
                this.finished = true;
                Poll::Ready(r)
            }
            Slot::Free | Slot::Abandoned => {
                this.finished = true;
                Poll::Ready(Err(RedisError::Io {
                    addr: String::new(),
                    message: "reply lost".into(),
                }))
            }
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut s = lock(&self.shared);
        let slot = self.slot;
        match s.slots[slot] {
            Slot::Waiting(_) => s.slots[slot] = Slot::Abandoned,
            Slot::Done(_) => {
                s.slots[slot] = Slot::Free;
                s.free.push(slot);
            }
            Slot::Free | Slot::Abandoned => {}
        }
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
fn open(t: &Target, addr: &str, pool_key: String) -> Arc<Mutex<Shared>> {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let task = ConnTask {
        addr: addr.to_owned(),
        pool_key,
        target: t.clone(),
        shared: shared.clone(),
    };
    tokio::spawn(task.run());
    shared
}

struct ConnTask {
    addr: String,
    pool_key: String,
    target: Target,
    shared: Arc<Mutex<Shared>>,
}

impl ConnTask {
    fn io(&self, message: impl std::fmt::Display) -> RedisError {
        RedisError::Io {
            addr: self.addr.clone(),
            message: message.to_string(),
        }
    }

    /// Connects, then writes what the commands queue (everything queued since the last
    /// write goes out in one write) and hands each reply to its command, until the
    /// connection fails; then every command waiting fails at once.
    async fn run(self) {
        let err = match self.connect().await {
            Ok(stream) => self.serve(&stream).await,
            Err(e) => e,
        };
        tracing::warn!("{err}");
        fail(&self.shared, err);
    }

    async fn serve(&self, stream: &TcpStream) -> RedisError {
        use std::io::ErrorKind::WouldBlock;
        use std::task::Poll;
        let mut inbuf = BytesMut::with_capacity(4096);
        let mut wbuf: Vec<u8> = Vec::with_capacity(4096);
        let mut wpos = 0;
        let mut wake: Vec<Waker> = Vec::new();
        std::future::poll_fn(|cx| {
            loop {
                {
                    let mut s = lock(&self.shared);
                    if let Some(e) = &s.failed {
                        // ended from outside (a command timed out)
                        return Poll::Ready(e.clone());
                    }
                    if wpos == wbuf.len() {
                        wbuf.clear();
                        wpos = 0;
                        if !s.idle() {
                            s.take_output(&mut wbuf);
                        }
                    }
                    if !s.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        s.task = Some(cx.waker().clone());
                    }
                }
                let mut progress = false;
                while wpos < wbuf.len() {
                    match stream.try_write(&wbuf[wpos..]) {
                        Ok(0) => return Poll::Ready(self.io("connection closed")),
                        Ok(n) => {
                            wpos += n;
                            progress = wpos == wbuf.len();
                        }
                        Err(e) if e.kind() == WouldBlock => match stream.poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return Poll::Ready(self.io(e)),
                            Poll::Pending => break,
                        },
                        Err(e) => return Poll::Ready(self.io(e)),
                    }
                }
                if inbuf.capacity() - inbuf.len() < 1024 {
                    inbuf.reserve(4096);
                }
                match stream.try_read_buf(&mut inbuf) {
                    Ok(0) => return Poll::Ready(self.io("connection closed")),
                    Ok(_) => {
                        if let Err(e) = self.deliver(&mut inbuf, &mut wake) {
                            return Poll::Ready(e);
                        }
                        progress = true;
                    }
                    Err(e) if e.kind() == WouldBlock => match stream.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => progress = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(self.io(e)),
                        Poll::Pending => {}
                    },
                    Err(e) => return Poll::Ready(self.io(e)),
                }
                if !progress {
                    return Poll::Pending;
                }
            }
        })
        .await
    }

    /// Hands every complete reply in `inbuf` to its command.
    fn deliver(&self, inbuf: &mut BytesMut, wake: &mut Vec<Waker>) -> Result<(), RedisError> {
        let mut s = lock(&self.shared);
        let r = loop {
            match parse(inbuf) {
                Ok(Some((reply, used))) => {
                    inbuf.advance(used);
                    match s.order.pop_front() {
                        None => break Err(self.io("a reply nobody asked for")),
                        Some(Expect::One(i)) => s.answer(i, Ok(reply), wake),
                        Some(Expect::Merged(waiters, total)) => {
                            split_count(&mut s, reply, waiters, total, wake);
                        }
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(self.io(format!("protocol error: {e}"))),
            }
        };
        drop(s);
        for w in wake.drain(..) {
            w.wake();
        }
        r
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
                match &t.username {
                    Some(u) => encode_into(&mut hello, &[b"AUTH", u.as_bytes(), pw.as_bytes()]),
                    None => encode_into(&mut hello, &[b"AUTH", pw.as_bytes()]),
                }
                expect += 1;
            }
            if t.database != 0 && !t.cluster {
                encode_into(&mut hello, &[b"SELECT", t.database.to_string().as_bytes()]);
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

/// Hands a merged counter's reply `{used, ttl}` to each call in it: the count it would have
/// seen had the calls run one after another. Any other reply (an error) goes to all of them.
fn split_count(
    s: &mut Shared,
    reply: Reply,
    waiters: Vec<(usize, u64)>,
    total: u64,
    wake: &mut Vec<Waker>,
) {
    let items = reply.items();
    let (Some(used), Some(ttl)) = (
        items.first().and_then(Reply::as_int),
        items.get(1).and_then(Reply::as_int),
    ) else {
        for (i, _) in waiters {
            s.answer(i, Ok(reply.clone()), wake);
        }
        return;
    };
    let base = used.saturating_sub(i64::try_from(total).unwrap_or(i64::MAX));
    let mut sum: i64 = 0;
    for (i, cost) in waiters {
        sum = sum.saturating_add(i64::try_from(cost).unwrap_or(i64::MAX));
        let mine = Reply::Array(Some(vec![
            Reply::Int(base.saturating_add(sum)),
            Reply::Int(ttl),
        ]));
        s.answer(i, Ok(mine), wake);
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
        match send(t, seed, &[b"CLUSTER", b"SLOTS"]).await {
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

    static ADD: std::sync::LazyLock<Script> =
        std::sync::LazyLock::new(|| Script::new("return {0, 0}"));

    fn bulk(b: &str) -> Reply {
        Reply::Bulk(Some(b.as_bytes().to_vec()))
    }

    #[test]
    fn counts_on_one_key_are_one_script_run() {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut waiting = Vec::new();
        for key in ["a", "a", "b", "a"] {
            waiting.push(
                enqueue_count(&shared, &ADD, key, 1, 60_000, "r")
                    .ok()
                    .unwrap(),
            );
        }
        // another window on the same key is another run
        waiting.push(
            enqueue_count(&shared, &ADD, "a", 2, 1_000, "r")
                .ok()
                .unwrap(),
        );
        let mut s = lock(&shared);
        let mut wbuf = Vec::new();
        s.take_output(&mut wbuf);
        let mut sent = Vec::new();
        let mut at = 0;
        while let Some((cmd, used)) = parse(&wbuf[at..]).unwrap() {
            sent.push(cmd);
            at += used;
        }
        assert_eq!(at, wbuf.len());
        let run = |key: &str, cost: &str, ms: &str| {
            Reply::Array(Some(vec![
                bulk("EVALSHA"),
                bulk(&ADD.sha),
                bulk("1"),
                bulk(key),
                bulk(cost),
                bulk(ms),
            ]))
        };
        assert_eq!(
            sent,
            [
                run("a", "3", "60000"),
                run("b", "1", "60000"),
                run("a", "2", "1000")
            ]
        );
        // the first run's reply is split: each call sees the count after its own addition
        let mut wake = Vec::new();
        let Some(Expect::Merged(waiters, 3)) = s.order.pop_front() else {
            panic!("the first run is merged");
        };
        split_count(
            &mut s,
            Reply::Array(Some(vec![Reply::Int(10), Reply::Int(500)])),
            waiters,
            3,
            &mut wake,
        );
        for (i, want) in [(0, 8), (1, 9), (3, 10)] {
            match &s.slots[waiting[i].slot] {
                Slot::Done(Ok(r)) => {
                    assert_eq!(
                        r,
                        &Reply::Array(Some(vec![Reply::Int(want), Reply::Int(500)]))
                    )
                }
                _ => panic!("call {i} answered"),
            }
        }
        // an error reply reaches every call of a merged run
        assert!(matches!(s.order.pop_front(), Some(Expect::One(_))));
        let Some(Expect::One(last)) = s.order.pop_front() else {
            panic!("one call on its own");
        };
        s.answer(last, Ok(Reply::Error("ERR x".into())), &mut wake);
        assert!(matches!(&s.slots[last], Slot::Done(Ok(Reply::Error(_)))));
        drop(s);
        drop(waiting);
        let s = lock(&shared);
        // answered slots are freed with their futures; the unanswered one waits for its reply
        assert_eq!(s.slots.len() - s.free.len(), 1);
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
