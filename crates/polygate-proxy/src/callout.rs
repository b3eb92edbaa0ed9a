//! The gateway's own HTTP client for plugins' callouts (proxy-wasm `proxy_http_call`): the
//! target is an `upstreams` resource of the served configuration (its balancer, keep-alive
//! pool and timeouts apply) or a `host:port` address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header;
use http_body_util::BodyExt;
use parking_lot::Mutex;
use polygate_config::Pipeline;
use polygate_core::callout::{
    CalloutError, CalloutFuture, CalloutRequest, CalloutResponse, Callouts,
};
use polygate_core::{ConsumerIndex, RequestCtx};

use crate::body::ReqBody;
use crate::h1::{self, H1Body};
use crate::plane::DataPlane;
use crate::pool::{self, PoolLimits};
use crate::upstream::UpstreamRt;

/// Largest callout response body read (a longer one fails the call).
const MAX_BODY: usize = 16 << 20;
/// Address upstreams kept for `host:port` targets (the oldest are dropped past this).
const MAX_ADDR_TARGETS: usize = 256;

/// Callouts through the served configuration's upstreams.
pub struct ProxyCallouts {
    config: Arc<Pipeline<DataPlane>>,
    by_addr: Mutex<HashMap<String, Arc<UpstreamRt>>>,
}

impl ProxyCallouts {
    /// A client reading upstreams from the served configuration of `config`.
    pub fn new(config: Arc<Pipeline<DataPlane>>) -> ProxyCallouts {
        ProxyCallouts {
            config,
            by_addr: Mutex::new(HashMap::new()),
        }
    }

    fn resolve(&self, target: &str) -> Option<Arc<UpstreamRt>> {
        let snap = self.config.target().snapshot.load();
        if let Some(up) = snap.upstream(target) {
            return Some(up.clone());
        }
        // `https://host:port` (certificate verified) and `https+insecure://host:port`
        let (scheme, verify, addr) = if let Some(a) = target.strip_prefix("https://") {
            ("https", true, a)
        } else if let Some(a) = target.strip_prefix("https+insecure://") {
            ("https", false, a)
        } else {
            (
                "http",
                true,
                target.strip_prefix("http://").unwrap_or(target),
            )
        };
        let (host, port) = split_host_port(addr)?;
        let mut m = self.by_addr.lock();
        if let Some(up) = m.get(target) {
            return Some(up.clone());
        }
        let u: polygate_model::Upstream = serde_json::from_value(serde_json::json!({
            "type": "roundrobin",
            "scheme": scheme,
            "tls": {"verify": verify},
            "nodes": [{"host": host, "port": port, "weight": 1}],
        }))
        .ok()?;
        let up = Arc::new(UpstreamRt::build(target, &u));
        if m.len() >= MAX_ADDR_TARGETS {
            m.clear();
        }
        m.insert(target.to_owned(), up.clone());
        Some(up)
    }
}

/// `host:port` (`[v6]:port` too) with a numeric port.
fn split_host_port(t: &str) -> Option<(&str, u16)> {
    let (h, p) = t.rsplit_once(':')?;
    let port: u16 = p.parse().ok()?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    if h.is_empty() || h.bytes().any(|b| b <= b' ' || b == b'/' || b == b'@') {
        return None;
    }
    Some((h, port))
}

impl Callouts for ProxyCallouts {
    fn knows(&self, target: &str) -> bool {
        self.resolve(target).is_some()
    }

    fn call(&self, req: CalloutRequest) -> CalloutFuture {
        let up = self.resolve(&req.target);
        let defaults = self
            .config
            .target()
            .snapshot
            .load()
            .gateway
            .timeouts
            .upstream;
        Box::pin(async move {
            let up = up.ok_or_else(|| CalloutError::UnknownTarget(req.target.clone()))?;
            let deadline = req.timeout;
            let fut = exchange(up, req, defaults);
            match deadline {
                Some(d) => tokio::time::timeout(d, fut)
                    .await
                    .unwrap_or(Err(CalloutError::Timeout)),
                None => fut.await,
            }
        })
    }
}

async fn exchange(
    up: Arc<UpstreamRt>,
    req: CalloutRequest,
    defaults: polygate_model::Timeout,
) -> Result<CalloutResponse, CalloutError> {
    let failed = |e: &dyn std::fmt::Display| CalloutError::Failed(e.to_string());
    if up.scheme != "http" && up.scheme != "https" {
        return Err(CalloutError::Failed(format!(
            "upstream scheme {:?} is not supported for callouts",
            up.scheme
        )));
    }
    if !h1::valid_target(&req.path) || !req.path.starts_with('/') {
        return Err(CalloutError::Failed(format!(
            "invalid :path {:?}",
            req.path
        )));
    }
    let t = up.timeout.unwrap_or(defaults);
    let (connect_to, send_to, read_to) = (
        polygate_model::secs(t.connect),
        polygate_model::secs(t.send),
        polygate_model::secs(t.read),
    );
    let pick_ctx = RequestCtx::new(
        req.method.clone(),
        &req.path,
        req.headers.clone(),
        http::Version::HTTP_11,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Arc::new(ConsumerIndex::default()),
    );
    let idx = up
        .pick(&pick_ctx, &[])
        .ok_or_else(|| CalloutError::Failed("no upstream node".into()))?;
    let node = &up.nodes[idx];
    let limits = PoolLimits {
        size: up.keepalive.size.max(0) as usize,
        idle_timeout: polygate_model::secs(up.keepalive.idle_timeout),
        max_uses: up.keepalive.requests.clamp(1, u32::MAX as i64) as u32,
    };
    // TLS: the callout's :authority (else the node's host) is the SNI and the verified name
    let sni = polygate_core::ctx::strip_port(&req.authority).to_owned();
    let tls = up.tls.as_deref().map(|t| (t, sni.as_str()));
    let mut co = pool::checkout(node, limits, connect_to, tls)
        .await
        .map_err(|e| failed(&e))?;
    let head = encode(&req).map_err(|e| CalloutError::Failed(e.to_owned()))?;
    let body = ReqBody::Full(Some(req.body.clone()));
    co.conn
        .send(&head, body, false, send_to, send_to)
        .await
        .map_err(|e| failed(&e))?;
    let head = tokio::time::timeout(read_to, co.conn.read_head(&req.method))
        .await
        .map_err(|_| CalloutError::Timeout)?
        .map_err(|e| failed(&e))?;
    let (status, headers) = (head.status, head.headers.clone());
    let body = H1Body::new(co.conn, &head, co.ret, read_to);
    let collected = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| CalloutError::Failed(format!("reading the body: {e}")))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Ok(CalloutResponse {
        status,
        headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// The request head of a callout: its own `Host`, its headers less hop-by-hop and framing
/// ones, and the body's length.
fn encode(req: &CalloutRequest) -> Result<Vec<u8>, &'static str> {
    use std::io::Write as _;
    if req.authority.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("invalid :authority");
    }
    let mut out = Vec::with_capacity(256);
    let _ = write!(
        out,
        "{} {} HTTP/1.1\r\nhost: {}\r\n",
        req.method, req.path, req.authority
    );
    for (k, v) in &req.headers {
        if *k == header::HOST || *k == header::CONTENT_LENGTH || h1::is_hop_by_hop(k) {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(out, "content-length: {}\r\n\r\n", req.body.len());
    Ok(out)
}
