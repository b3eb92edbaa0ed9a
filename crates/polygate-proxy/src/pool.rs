//! Upstream connections: connecting with a timeout, and a keep-alive pool per worker thread
//! keyed by `host:port` (like nginx's per-worker `keepalive` pools: no locks, and a pooled
//! connection always belongs to the thread whose event loop drives it).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use polygate_core::GatewayError;
use tokio::net::TcpStream;

use rustls::pki_types::ServerName;

use crate::h1::{H1Conn, Stream};
use crate::tls::UpstreamTls;
use crate::upstream::Node;

struct Idle {
    conn: H1Conn,
    since: Instant,
    uses: u32,
    idle_timeout: Duration,
}

thread_local! {
    static POOL: RefCell<HashMap<Arc<str>, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// Pool limits (from the upstream's `keepalive_pool`).
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections kept per node.
    pub size: usize,
    /// Idle time before a connection is closed.
    pub idle_timeout: Duration,
    /// Requests per connection.
    pub max_uses: u32,
}

/// A checked-out connection.
pub struct Checkout {
    /// The connection.
    pub conn: H1Conn,
    /// Whether it came from the pool (a failure before the response may then be retried on a
    /// new connection).
    pub reused: bool,
    /// Where it goes back.
    pub ret: PoolReturn,
}

/// Returns a connection to this thread's pool when its response ended cleanly.
pub struct PoolReturn {
    key: Arc<str>,
    uses: u32,
    limits: PoolLimits,
}

impl PoolReturn {
    /// Puts `conn` back unless the pool is full or the connection served its quota.
    pub fn checkin(&self, conn: H1Conn) {
        if self.uses >= self.limits.max_uses || self.limits.size == 0 {
            return;
        }
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let list = p.entry(self.key.clone()).or_default();
            if list.len() < self.limits.size {
                list.push(Idle {
                    conn,
                    since: Instant::now(),
                    uses: self.uses,
                    idle_timeout: self.limits.idle_timeout,
                });
            }
        });
    }
}

fn take_idle(key: &str) -> Option<Idle> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() > idle.idle_timeout {
                continue;
            }
            return Some(idle);
        }
        None
    })
}

/// Closes idle connections past their idle timeout (run periodically on each worker).
pub fn sweep() {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|_, list| {
            list.retain(|i| i.since.elapsed() <= i.idle_timeout);
            !list.is_empty()
        });
    });
}

/// Gets a connection to `node`: the most recently used idle one, or a new one within
/// `connect_timeout`. A pooled connection is checked first (one non-blocking read): one the
/// peer closed, or on which it sent bytes nobody asked for (a second response, a late body),
/// is dropped, so no client ever reads another exchange's bytes (nginx does the same).
pub async fn checkout(
    node: &Node,
    limits: PoolLimits,
    connect_timeout: Duration,
    tls: Option<(&UpstreamTls, &str)>,
) -> Result<Checkout, GatewayError> {
    let key = pool_key(node, tls);
    while let Some(mut idle) = take_idle(&key) {
        if !idle.conn.looks_alive() {
            continue;
        }
        return Ok(Checkout {
            conn: idle.conn,
            reused: true,
            ret: PoolReturn {
                key,
                uses: idle.uses + 1,
                limits,
            },
        });
    }
    let conn = connect_new(node, connect_timeout, tls).await?;
    Ok(Checkout {
        conn,
        reused: false,
        ret: PoolReturn {
            key,
            uses: 1,
            limits,
        },
    })
}

/// Opens a new connection to `node` within `connect_timeout` (the TLS handshake included);
/// with `tls`, the name to send as SNI and verify (empty: the node's host).
pub async fn connect_new(
    node: &Node,
    connect_timeout: Duration,
    tls: Option<(&UpstreamTls, &str)>,
) -> Result<H1Conn, GatewayError> {
    tokio::time::timeout(connect_timeout, connect(node, tls))
        .await
        .map_err(|_| GatewayError::Timeout {
            addr: node.key.to_string(),
            what: "connect",
        })?
}

async fn connect(node: &Node, tls: Option<(&UpstreamTls, &str)>) -> Result<H1Conn, GatewayError> {
    let err = |reason: String| GatewayError::Connect {
        addr: node.key.to_string(),
        reason,
    };
    // a name that does not resolve is 503, as APISIX answers when it cannot parse a node's
    // domain
    let unresolved = |reason: String| GatewayError::Resolve {
        host: node.host.clone(),
        reason,
    };
    let addr: SocketAddr = match node.addr {
        Some(a) => a,
        None => tokio::net::lookup_host((node.host.as_str(), node.port))
            .await
            .map_err(|e| unresolved(e.to_string()))?
            .next()
            .ok_or_else(|| unresolved("no address".into()))?,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let Some((tls, sni)) = tls else {
        return Ok(H1Conn::new(Stream::Tcp(stream)));
    };
    let name = server_name(sni, node)?;
    // boxed: the handshake's state (a whole rustls connection) would otherwise be part of
    // every request's future, plain ones included, and be copied with it
    let s = Box::pin(tokio_rustls::TlsConnector::from(tls.config.clone()).connect(name, stream))
        .await
        .map_err(|e| GatewayError::Connect {
            addr: node.key.to_string(),
            reason: format!("TLS handshake: {e}"),
        })?;
    Ok(H1Conn::new(Stream::Tls(Box::new(s))))
}

/// The name a TLS upstream's certificate is checked against and that goes out as SNI: the
/// host sent upstream (nginx's `proxy_ssl_name $upstream_host` in APISIX), or the node's.
fn server_name(sni: &str, node: &Node) -> Result<ServerName<'static>, GatewayError> {
    let host = if sni.is_empty() { &node.host } else { sni };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| GatewayError::Connect {
        addr: node.key.to_string(),
        reason: format!("TLS server name {host:?}: {e}"),
    })
}

/// The pool key of a connection: the node's address, plus for TLS what else makes a
/// connection different (verification, client certificate, SNI).
pub fn pool_key(node: &Node, tls: Option<(&UpstreamTls, &str)>) -> Arc<str> {
    match tls {
        None => node.key.clone(),
        Some((t, sni)) => Arc::from(format!("{}|{sni}|{}", t.tag, node.key).as_str()),
    }
}
