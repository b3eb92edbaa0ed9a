//! HTTP/2 to upstreams (`scheme: grpc` over h2c, `grpcs` over TLS with ALPN `h2`): one
//! multiplexed connection per node (and TLS identity) per worker thread, requests and
//! responses streamed in both directions with their trailers, `grpc-timeout` as a deadline on
//! the whole call, and gRPC-shaped answers when polygate itself fails a call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use polygate_core::GatewayError;

use crate::body::{BoxError, ReqBody};
use crate::h1::is_hop_by_hop;
use crate::tls::UpstreamTls;
use crate::upstream::Node;

thread_local! {
    static CONNS: RefCell<HashMap<Arc<str>, SendRequest<ReqBody>>> = RefCell::new(HashMap::new());
}

/// A ready sender for `node`: this thread's connection when it is still open, else a new
/// one within `connect_timeout`.
async fn sender(
    node: &Node,
    tls: Option<(&UpstreamTls, &str)>,
    connect_timeout: Duration,
) -> Result<SendRequest<ReqBody>, GatewayError> {
    let key = crate::pool::pool_key(node, tls);
    let existing = CONNS.with(|c| {
        let mut c = c.borrow_mut();
        match c.get(&key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                c.remove(&key);
                None
            }
            None => None,
        }
    });
    if let Some(mut s) = existing
        && s.ready().await.is_ok()
    {
        return Ok(s);
    }
    let conn = crate::pool::connect_new(node, connect_timeout, tls).await?;
    let (io, leftover) = conn.into_parts();
    debug_assert!(leftover.is_empty());
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(false);
    let (mut s, c) = b
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| GatewayError::Connect {
            addr: node.key.to_string(),
            reason: format!("HTTP/2 handshake: {e}"),
        })?;
    let addr = node.key.clone();
    tokio::spawn(async move {
        if let Err(e) = c.await {
            tracing::debug!(upstream = %addr, "HTTP/2 upstream connection: {e}");
        }
    });
    s.ready().await.map_err(|e| GatewayError::Connect {
        addr: node.key.to_string(),
        reason: e.to_string(),
    })?;
    CONNS.with(|c| c.borrow_mut().insert(key, s.clone()));
    Ok(s)
}

/// What the upstream request carries besides the client's headers.
pub struct H2Forward<'a> {
    /// `http` or `https` on the upstream request's URI.
    pub scheme: &'static str,
    /// `:authority`.
    pub authority: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// Client address (`X-Forwarded-For`, `X-Real-IP`).
    pub client_ip: &'a str,
    /// `X-Forwarded-Proto`.
    pub client_scheme: &'static str,
    /// `X-Forwarded-Port`: the port in the client's Host, else the one the request came to.
    pub port: &'a str,
    /// `X-Forwarded-Host`: the Host the client asked for.
    pub host: Option<&'a HeaderValue>,
    /// The peer is in `trusted_addresses`: its forwarding headers pass.
    pub trusted: bool,
    /// An untrusted peer's `X-Forwarded-For` is dropped (`trusted_addresses` is configured).
    pub drop_xff: bool,
    /// Time to connect (TLS and HTTP/2 handshakes included).
    pub connect_timeout: Duration,
    /// Time for the response head to arrive.
    pub head_timeout: Duration,
}

/// Sends one request on an HTTP/2 connection to `node`; the response head arrives within
/// `head_timeout`.
pub async fn exchange(
    node: &Node,
    tls: Option<(&UpstreamTls, &str)>,
    method: &http::Method,
    headers: &HeaderMap,
    fwd: &H2Forward<'_>,
    body: ReqBody,
) -> Result<Response<Incoming>, GatewayError> {
    let (connect_timeout, head_timeout) = (fwd.connect_timeout, fwd.head_timeout);
    let mut s = sender(node, tls, connect_timeout).await?;
    let uri = format!("{}://{}{}", fwd.scheme, fwd.authority, fwd.path);
    let mut req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .version(http::Version::HTTP_2)
        .body(body)
        .map_err(|e| GatewayError::InvalidUpstreamRequest(e.to_string()))?;
    let h = req.headers_mut();
    let mut te_trailers = false;
    // the forwarding rules of the HTTP/1.1 path (h1::encode_head): a client's forwarding
    // headers pass only from a trusted peer
    let mut xff: Vec<&[u8]> = Vec::new();
    for (k, v) in headers {
        if *k == header::TE {
            te_trailers |= v.as_bytes().eq_ignore_ascii_case(b"trailers");
            continue;
        }
        if is_hop_by_hop(k) || *k == header::HOST || *k == header::CONTENT_LENGTH {
            continue;
        }
        match k.as_str() {
            "x-forwarded-for" => {
                if !fwd.drop_xff {
                    xff.push(v.as_bytes());
                }
                continue;
            }
            "x-real-ip" => continue,
            "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-port" | "forwarded"
                if !fwd.trusted =>
            {
                continue;
            }
            _ => {}
        }
        h.append(k.clone(), v.clone());
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let mut joined = Vec::new();
    for v in xff {
        joined.extend_from_slice(v);
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(fwd.client_ip.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    if let Ok(v) = HeaderValue::from_str(fwd.client_ip) {
        h.insert(HeaderName::from_static("x-real-ip"), v);
    }
    if !h.contains_key("x-forwarded-proto") {
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(fwd.client_scheme),
        );
    }
    if !h.contains_key("x-forwarded-host")
        && let Some(host) = fwd.host
    {
        h.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    if !h.contains_key("x-forwarded-port")
        && let Ok(v) = HeaderValue::from_str(fwd.port)
    {
        h.insert(HeaderName::from_static("x-forwarded-port"), v);
    }
    let fut = s.send_request(req);
    match tokio::time::timeout(head_timeout, fut).await {
        Err(_) => Err(GatewayError::Timeout {
            addr: node.key.to_string(),
            what: "read",
        }),
        Ok(Err(e)) => Err(GatewayError::Upstream {
            addr: node.key.to_string(),
            reason: e.to_string(),
        }),
        Ok(Ok(r)) => Ok(r),
    }
}

/// `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    // at most a day: a client's 99999999H must not overflow an instant
    const MAX: Duration = Duration::from_secs(86_400);
    Some(
        match unit {
            "H" => Duration::from_secs(n.saturating_mul(3600)),
            "M" => Duration::from_secs(n.saturating_mul(60)),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        }
        .min(MAX),
    )
}

/// Whether a request is a gRPC call (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An upstream HTTP/2 response body; past the call's deadline it ends with the trailers of a
/// `DEADLINE_EXCEEDED` status (the upstream stream is reset by dropping it).
pub struct H2Body {
    inner: Option<Incoming>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    expired: bool,
}

impl H2Body {
    /// `inner`, cut off at `deadline`.
    pub fn new(inner: Incoming, deadline: Option<tokio::time::Instant>) -> H2Body {
        H2Body {
            inner: Some(inner),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            expired: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            this.deadline = None;
            if this.inner.take().is_some() {
                this.expired = true;
                let mut t = polygate_core::error::grpc_status_headers(4, "Deadline Exceeded");
                t.remove(header::CONTENT_TYPE);
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            None => {
                this.inner = None;
                Poll::Ready(None)
            }
            Some(Ok(f)) => Poll::Ready(Some(Ok(f))),
            Some(Err(e)) => {
                this.inner = None;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) if self.deadline.is_none() => b.size_hint(),
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(0),
        }
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut h = HeaderMap::new();
        for (v, want) in [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("99999999H", Some(Duration::from_secs(86_400))),
            ("10u", Some(Duration::from_micros(10))),
            ("5n", Some(Duration::from_nanos(5))),
            ("123456789S", None),
            ("S", None),
            ("1x", None),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(grpc_timeout(&h), want, "{v}");
        }
    }
}
