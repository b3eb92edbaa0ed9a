//! One request through the gateway: route match → rewrite → consumer merge → access →
//! node pick → before_proxy → upstream (with retries) → header_filter → body_filter → log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use polygate_core::chain::{run_body_filter, run_header_filter, run_log, run_phase};
use polygate_core::{GatewayError, Phase, PluginChain, PluginResponse, RequestCtx, ResponseHead};
use polygate_router::{Entry, MatchInput};

use crate::accesslog::{AccessLog, AccessRecord};
use crate::body::{Finish, ReqBody, RespBody, UpstreamBody};
use crate::metrics::Metrics;
use crate::pool::{self, PoolLimits, PooledConn};
use crate::snapshot::{RouteData, Snapshot};
use crate::upstream::{ActiveGuard, PassHost, UpstreamRt};

/// State shared by every worker thread.
pub struct Shared {
    /// The served configuration, swapped atomically on reload.
    pub snapshot: ArcSwap<Snapshot>,
    /// Access log, if enabled.
    pub access_log: Option<AccessLog>,
    /// Counters.
    pub metrics: Metrics,
}

static SERVER: HeaderValue =
    HeaderValue::from_static(concat!("polygate/", env!("CARGO_PKG_VERSION")));
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(c) = h
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in c.split(',') {
            let name = name.trim();
            if !name.is_empty() {
                h.remove(name);
            }
        }
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// What the request ended with before the response body.
enum Outcome {
    Upstream {
        resp: Response<Incoming>,
        conn: PooledConn,
        guard: ActiveGuard,
        read_timeout: Duration,
    },
    Local(PluginResponse),
}

/// End-of-request work: body filters, log phase, access log, metrics.
struct Fin {
    ctx: RequestCtx,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    entry: Option<Arc<Entry<RouteData>>>,
    merged: Option<PluginChain>,
    _guard: Option<ActiveGuard>,
    upstream_id: Option<Arc<str>>,
}

impl Fin {
    fn chain(&self) -> Option<&PluginChain> {
        self.merged
            .as_ref()
            .or(self.entry.as_ref().map(|e| &e.data.chain))
    }
}

impl Finish for Fin {
    fn filters_body(&self) -> bool {
        self.snap.global.has_body_filter || self.chain().is_some_and(|c| c.has_body_filter)
    }

    fn on_chunk(&mut self, chunk: &mut Bytes, eof: bool) {
        let global = &self.snap.global.instances;
        run_body_filter(global, &mut self.ctx, chunk, eof);
        let chain = self
            .merged
            .as_ref()
            .or(self.entry.as_ref().map(|e| &e.data.chain));
        if let Some(c) = chain {
            let instances = c.instances.clone();
            run_body_filter(&instances, &mut self.ctx, chunk, eof);
        }
    }

    fn finish(self: Box<Self>, body_bytes: u64, complete: bool) {
        run_log(&self.snap.global.instances, &self.ctx);
        if let Some(c) = self.chain() {
            run_log(&c.instances, &self.ctx);
        }
        if let Some(log) = &self.shared.access_log {
            log.write(&AccessRecord {
                ctx: &self.ctx,
                body_bytes,
                complete,
                upstream_id: self.upstream_id.as_deref(),
            });
        }
    }
}

/// Handles one request.
pub async fn handle(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    client: SocketAddr,
    local: SocketAddr,
) -> Response<RespBody> {
    let snap = shared.snapshot.load_full();
    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    if !headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    let request_uri = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut ctx = RequestCtx::new(
        parts.method,
        request_uri,
        headers,
        parts.version,
        client,
        local,
        snap.consumers.clone(),
    );

    let found = {
        let input = MatchInput {
            path: &ctx.path,
            host: ctx.host.as_deref(),
            method: ctx.method.as_str(),
            remote_addr: Some(client.ip()),
            vars: &ctx,
        };
        snap.router
            .find(&input)
            .map(|m| (m.entry.clone(), m.params))
    };
    let Some((entry, params)) = found else {
        let (status, body) = GatewayError::RouteNotFound.rescue();
        return finish_local(
            shared,
            snap,
            ctx,
            None,
            None,
            json_response(status, body),
            None,
        );
    };
    ctx.route_id = Some(entry.data.id.clone());
    ctx.service_id = entry.data.service_id.clone();
    ctx.uri_params = params;

    let mut merged: Option<PluginChain> = None;
    let outcome = run_request(&snap, &entry, &mut ctx, &mut merged, body).await;
    let upstream_id = entry.data.upstream.as_ref().map(|u| u.id.clone());
    match outcome {
        Ok(Outcome::Local(r)) => {
            finish_local(shared, snap, ctx, Some(entry), merged, r, upstream_id)
        }
        Err(e) => {
            match &e {
                GatewayError::Plugin(p) => tracing::error!(route = %entry.data.id, "{p}"),
                _ => tracing::warn!(route = %entry.data.id, uri = %ctx.request_uri, "{e}"),
            }
            let (status, body) = e.rescue();
            finish_local(
                shared,
                snap,
                ctx,
                Some(entry),
                merged,
                json_response(status, body),
                upstream_id,
            )
        }
        Ok(Outcome::Upstream {
            resp,
            conn,
            guard,
            read_timeout,
        }) => {
            let (parts, body) = resp.into_parts();
            let mut head = ResponseHead {
                status: parts.status,
                headers: parts.headers,
            };
            strip_hop_by_hop(&mut head.headers);
            head.headers.insert(header::SERVER, SERVER.clone());
            let chain = merged.as_ref().unwrap_or(&entry.data.chain);
            let filters = !snap.global.is_empty() || !chain.is_empty();
            if filters {
                run_header_filter(&snap.global.instances, &mut ctx, &mut head);
                run_header_filter(&chain.instances, &mut ctx, &mut head);
            }
            ctx.status = Some(head.status);
            shared.metrics.record(head.status);
            let override_body = ctx.body_override.take();
            let body_filters = snap.global.has_body_filter || chain.has_body_filter;
            if body_filters || override_body.is_some() {
                head.headers.remove(header::CONTENT_LENGTH);
            }
            let mut builder = Response::builder().status(head.status);
            if let Some(h) = builder.headers_mut() {
                *h = head.headers;
            }
            let fin = Box::new(Fin {
                ctx,
                shared: shared.clone(),
                snap,
                entry: Some(entry),
                merged,
                _guard: Some(guard),
                upstream_id,
            });
            let body = match override_body {
                Some(b) => {
                    drop(body);
                    RespBody::full(b, Some(fin))
                }
                None => {
                    RespBody::upstream(UpstreamBody::new(body, Some(conn), read_timeout), Some(fin))
                }
            };
            builder
                .body(body)
                .unwrap_or_else(|_| Response::new(RespBody::full(Bytes::new(), None)))
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> PluginResponse {
    let mut r = PluginResponse::new(status, body);
    r.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn finish_local(
    shared: &Arc<Shared>,
    snap: Arc<Snapshot>,
    mut ctx: RequestCtx,
    entry: Option<Arc<Entry<RouteData>>>,
    merged: Option<PluginChain>,
    r: PluginResponse,
    upstream_id: Option<Arc<str>>,
) -> Response<RespBody> {
    let mut head = ResponseHead {
        status: r.status,
        headers: r.headers,
    };
    head.headers.insert(header::SERVER, SERVER.clone());
    if entry.is_some() {
        run_header_filter(&snap.global.instances, &mut ctx, &mut head);
        if let Some(c) = merged.as_ref().or(entry.as_ref().map(|e| &e.data.chain)) {
            run_header_filter(&c.instances, &mut ctx, &mut head);
        }
    }
    ctx.status = Some(head.status);
    shared.metrics.record(head.status);
    let body = ctx.body_override.take().unwrap_or(r.body);
    head.headers.remove(header::CONTENT_LENGTH);
    let mut builder = Response::builder().status(head.status);
    if let Some(h) = builder.headers_mut() {
        *h = head.headers;
    }
    let fin = Box::new(Fin {
        ctx,
        shared: shared.clone(),
        snap,
        entry,
        merged,
        _guard: None,
        upstream_id,
    });
    builder
        .body(RespBody::full(body, Some(fin)))
        .unwrap_or_else(|_| Response::new(RespBody::full(Bytes::new(), None)))
}

async fn run_request(
    snap: &Arc<Snapshot>,
    entry: &Arc<Entry<RouteData>>,
    ctx: &mut RequestCtx,
    merged: &mut Option<PluginChain>,
    body: Incoming,
) -> Result<Outcome, GatewayError> {
    let route = &entry.data;
    let global = &snap.global;
    if !global.is_empty()
        && let Some(r) = run_phase(&global.instances, Phase::Rewrite, ctx).await?
    {
        return Ok(Outcome::Local(r));
    }
    if !route.chain.is_empty() {
        if let Some(r) = run_phase(&route.chain.instances, Phase::Rewrite, ctx).await? {
            return Ok(Outcome::Local(r));
        }
        if let Some(consumer) = ctx.consumer.clone()
            && !consumer.plugins.is_empty()
        {
            let (m, added) = route.chain.merge_consumer(&consumer.plugins);
            *merged = Some(m);
            if let Some(r) = run_phase(&added, Phase::Rewrite, ctx).await? {
                return Ok(Outcome::Local(r));
            }
        }
    }
    if !global.is_empty()
        && let Some(r) = run_phase(&global.instances, Phase::Access, ctx).await?
    {
        return Ok(Outcome::Local(r));
    }
    let chain = merged.as_ref().unwrap_or(&route.chain);
    if !chain.is_empty()
        && let Some(r) = run_phase(&chain.instances, Phase::Access, ctx).await?
    {
        return Ok(Outcome::Local(r));
    }
    let Some(up) = route.upstream.clone() else {
        return Err(GatewayError::NoUpstream(
            "missing upstream configuration in Route or Service".into(),
        ));
    };
    proxy(snap, &up, route.timeout, chain, ctx, body).await
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn proxy(
    snap: &Arc<Snapshot>,
    up: &Arc<UpstreamRt>,
    route_timeout: Option<polygate_model::Timeout>,
    chain: &PluginChain,
    ctx: &mut RequestCtx,
    body: Incoming,
) -> Result<Outcome, GatewayError> {
    if up.scheme != "http" {
        return Err(GatewayError::UnsupportedScheme(up.scheme.clone()));
    }
    let t = route_timeout
        .or(up.timeout)
        .unwrap_or(snap.gateway.timeouts.upstream);
    let connect_to = Duration::from_secs_f64(t.connect);
    let read_to = Duration::from_secs_f64(t.read);
    let limits = PoolLimits {
        size: up.keepalive.size.max(0) as usize,
        idle_timeout: Duration::from_secs_f64(up.keepalive.idle_timeout.max(0.0)),
        max_uses: up.keepalive.requests.clamp(1, u32::MAX as i64) as u32,
    };
    let replayable = body.is_end_stream();
    let mut body = Some(if replayable {
        ReqBody::Empty
    } else {
        ReqBody::Stream(body)
    });

    // forwarding headers, as APISIX sets them
    let client_ip = ctx.client_addr.ip().to_string();
    let xff = match ctx
        .headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.clone(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        ctx.headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&client_ip) {
        ctx.headers.insert(X_REAL_IP.clone(), v);
    }
    if !ctx.headers.contains_key(&X_FORWARDED_PROTO) {
        ctx.headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(ctx.scheme),
        );
    }
    if !ctx.headers.contains_key(&X_FORWARDED_HOST)
        && let Some(h) = ctx.headers.get(header::HOST).cloned()
    {
        ctx.headers.insert(X_FORWARDED_HOST.clone(), h);
    }
    if !ctx.headers.contains_key(&X_FORWARDED_PORT)
        && let Ok(v) = HeaderValue::from_str(&ctx.server_addr.port().to_string())
    {
        ctx.headers.insert(X_FORWARDED_PORT.clone(), v);
    }
    strip_hop_by_hop(&mut ctx.headers);

    let started = Instant::now();
    let mut tried: Vec<usize> = Vec::new();
    let mut last_err: Option<GatewayError> = None;
    let global = &snap.global;
    loop {
        let attempt = tried.len();
        let budget_left = up.retry_timeout.is_none_or(|rt| started.elapsed() < rt);
        if attempt > 0 && (attempt > up.retries || !budget_left) {
            break;
        }
        let Some(idx) = up.pick(ctx, &tried) else {
            break;
        };
        tried.push(idx);
        let node = &up.nodes[idx];
        ctx.upstream_addr = node.addr;
        if !global.is_empty()
            && let Some(r) = run_phase(&global.instances, Phase::BeforeProxy, ctx).await?
        {
            return Ok(Outcome::Local(r));
        }
        if !chain.is_empty()
            && let Some(r) = run_phase(&chain.instances, Phase::BeforeProxy, ctx).await?
        {
            return Ok(Outcome::Local(r));
        }
        let mut conn = match pool::checkout(node, limits, connect_to).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(upstream = %up.id, node = %node.key, "{e}");
                last_err = Some(e);
                continue;
            }
        };
        let may_retry_after = replayable && attempt < up.retries && is_idempotent(&ctx.method);
        // later phases (header_filter conditions, log) may read request headers: move them
        // into the upstream request only when nothing can look at them again
        let keep = may_retry_after || !chain.is_empty() || !global.is_empty();
        let mut headers = if keep {
            ctx.headers.clone()
        } else {
            std::mem::take(&mut ctx.headers)
        };
        let host = match (&ctx.upstream_host, up.pass_host) {
            (Some(h), _) => Some(h.clone()),
            (None, PassHost::Node) => Some(node.host_header.clone()),
            (None, PassHost::Rewrite) => up.upstream_host.clone(),
            (None, PassHost::Pass) => None,
        };
        if let Some(h) = host {
            headers.insert(header::HOST, h);
        }
        let req_body = if replayable {
            ReqBody::Empty
        } else {
            body.take().unwrap_or(ReqBody::Empty)
        };
        let mut req = Request::new(req_body);
        *req.method_mut() = ctx.method.clone();
        *req.uri_mut() = match ctx.upstream_uri().parse() {
            Ok(u) => u,
            Err(_) => {
                return Err(GatewayError::BadRequest(format!(
                    "invalid upstream uri {:?}",
                    ctx.upstream_uri()
                )));
            }
        };
        *req.headers_mut() = headers;
        let guard = ActiveGuard::new(up.clone(), idx);
        let t0 = Instant::now();
        match tokio::time::timeout(read_to, conn.tx.send_request(req)).await {
            Ok(Ok(resp)) => {
                up.observe(idx, t0.elapsed());
                ctx.upstream_latency = Some(t0.elapsed());
                return Ok(Outcome::Upstream {
                    resp,
                    conn,
                    guard,
                    read_timeout: read_to,
                });
            }
            Ok(Err(e)) => {
                let err = GatewayError::Upstream {
                    addr: node.key.to_string(),
                    reason: e.to_string(),
                };
                tracing::warn!(upstream = %up.id, node = %node.key, "{err}");
                last_err = Some(err);
                if !may_retry_after {
                    break;
                }
            }
            Err(_) => {
                let err = GatewayError::Timeout {
                    addr: node.key.to_string(),
                    what: "read",
                };
                tracing::warn!(upstream = %up.id, node = %node.key, "{err}");
                last_err = Some(err);
                if !may_retry_after {
                    break;
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| GatewayError::NoUpstream("no valid upstream node".into())))
}
