//! Upstream HTTP/1.1 connections: connecting with a timeout, and a keep-alive pool per worker
//! thread keyed by `host:port` (like nginx's per-worker `keepalive` pools: no locks, no
//! cross-thread traffic).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use polygate_core::GatewayError;
use tokio::net::TcpStream;

use crate::body::ReqBody;
use crate::upstream::Node;

struct Idle {
    tx: SendRequest<ReqBody>,
    since: Instant,
    uses: u32,
}

thread_local! {
    static POOL: RefCell<HashMap<Arc<str>, Vec<Idle>>> = RefCell::new(HashMap::new());
}

/// Pool limits for one checkout (from the upstream's `keepalive_pool`).
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Idle connections kept per node.
    pub size: usize,
    /// Idle time before a connection is closed.
    pub idle_timeout: Duration,
    /// Requests per connection.
    pub max_uses: u32,
}

/// A connection checked out for one request.
pub struct PooledConn {
    key: Arc<str>,
    /// The sender half.
    pub tx: SendRequest<ReqBody>,
    uses: u32,
    limits: PoolLimits,
    /// Whether the connection came from the pool (a failure on it may be retried).
    pub reused: bool,
}

impl PooledConn {
    /// Returns the connection to this thread's pool when it may serve more requests.
    pub fn checkin(self) {
        if self.tx.is_closed() || self.uses >= self.limits.max_uses || self.limits.size == 0 {
            return;
        }
        let limits = self.limits;
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let list = p.entry(self.key).or_default();
            if list.len() < limits.size {
                list.push(Idle {
                    tx: self.tx,
                    since: Instant::now(),
                    uses: self.uses,
                });
            }
        });
    }
}

fn take_idle(key: &str, idle_timeout: Duration) -> Option<Idle> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let list = p.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.tx.is_closed() || idle.since.elapsed() > idle_timeout {
                continue;
            }
            return Some(idle);
        }
        None
    })
}

/// Closes idle connections older than their timeout (run periodically on each worker).
pub fn sweep(max_idle: Duration) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.retain(|_, list| {
            list.retain(|i| !i.tx.is_closed() && i.since.elapsed() <= max_idle);
            !list.is_empty()
        });
    });
}

/// Gets a ready connection to `node`: an idle pooled one, or a new one within `connect_timeout`.
pub async fn checkout(
    node: &Node,
    limits: PoolLimits,
    connect_timeout: Duration,
) -> Result<PooledConn, GatewayError> {
    while let Some(mut idle) = take_idle(&node.key, limits.idle_timeout) {
        if idle.tx.ready().await.is_ok() {
            return Ok(PooledConn {
                key: node.key.clone(),
                tx: idle.tx,
                uses: idle.uses + 1,
                limits,
                reused: true,
            });
        }
    }
    let tx = tokio::time::timeout(connect_timeout, connect(node))
        .await
        .map_err(|_| GatewayError::Timeout {
            addr: node.key.to_string(),
            what: "connect",
        })??;
    Ok(PooledConn {
        key: node.key.clone(),
        tx,
        uses: 1,
        limits,
        reused: false,
    })
}

async fn connect(node: &Node) -> Result<SendRequest<ReqBody>, GatewayError> {
    let err = |reason: String| GatewayError::Connect {
        addr: node.key.to_string(),
        reason,
    };
    let addr: SocketAddr = match node.addr {
        Some(a) => a,
        None => tokio::net::lookup_host((node.host.as_str(), node.port))
            .await
            .map_err(|e| err(format!("resolve: {e}")))?
            .next()
            .ok_or_else(|| err("resolve: no address".into()))?,
    };
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("upstream connection closed: {e}");
        }
    });
    Ok(tx)
}
