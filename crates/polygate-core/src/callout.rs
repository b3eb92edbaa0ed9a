//! HTTP callouts made by plugins (proxy-wasm's `proxy_http_call`) through the gateway's own
//! upstream client. The proxy crate installs the implementation once at start-up
//! ([`set_callouts`]); plugin crates call [`callouts`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

/// One request a plugin sends on its own.
#[derive(Debug, Clone)]
pub struct CalloutRequest {
    /// Where to: the id of an `upstreams` resource, or `host:port`.
    pub target: String,
    /// Method.
    pub method: Method,
    /// Request target (path and query).
    pub path: String,
    /// `Host` header.
    pub authority: String,
    /// Other headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Whole-exchange deadline (`None`: the upstream's own timeouts only).
    pub timeout: Option<Duration>,
}

/// The answer to a callout.
#[derive(Debug, Clone)]
pub struct CalloutResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body, read whole.
    pub body: Bytes,
    /// Trailers (empty for HTTP/1.1 upstreams without them).
    pub trailers: HeaderMap,
}

/// Why a callout failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CalloutError {
    /// The target is neither an upstream id nor `host:port`.
    #[error("unknown callout target {0:?}")]
    UnknownTarget(String),
    /// The exchange failed (connect, I/O, protocol).
    #[error("callout failed: {0}")]
    Failed(String),
    /// The deadline passed.
    #[error("callout timed out")]
    Timeout,
    /// No callout client installed (a unit test without the proxy).
    #[error("callouts are not available in this process")]
    Unavailable,
}

/// A boxed callout future.
pub type CalloutFuture =
    Pin<Box<dyn Future<Output = Result<CalloutResponse, CalloutError>> + Send>>;

/// The gateway's callout client.
pub trait Callouts: Send + Sync + 'static {
    /// Whether `target` names something this client can reach (checked when the call is made,
    /// so that an unknown target is reported to the caller at once).
    fn knows(&self, target: &str) -> bool;
    /// Sends a request.
    fn call(&self, req: CalloutRequest) -> CalloutFuture;
}

static CALLOUTS: OnceLock<Arc<dyn Callouts>> = OnceLock::new();

/// Installs the process's callout client (the first call wins).
pub fn set_callouts(c: Arc<dyn Callouts>) {
    let _ = CALLOUTS.set(c);
}

/// The process's callout client, if installed.
pub fn callouts() -> Option<&'static Arc<dyn Callouts>> {
    CALLOUTS.get()
}
