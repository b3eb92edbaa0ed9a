//! One request through the gateway: route match → rewrite → consumer merge → access →
//! node pick → before_proxy → upstream (with retries) → header_filter → body_filter → log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use polygate_config::Pipeline;
use polygate_core::chain::{
    request_body_filters, run_body_filter_from, run_header_filter, run_header_filter_async,
    run_log, run_phase, run_trailers_filter,
};
use polygate_core::ctx::UpstreamOverride;
use polygate_core::{GatewayError, Phase, PluginChain, PluginResponse, RequestCtx, ResponseHead};
use polygate_router::{Entry, MatchInput};
use smallvec::SmallVec;

use crate::accesslog::{AccessLog, AccessRecord};
use crate::body::{ChunkWait, FilteredBody, Finish, ReqBody, RespBody, UpstreamBody};
use crate::h1::{self, H1Body, H1Conn, H1Error};
use crate::metrics::Metrics;
use crate::plane::DataPlane;
use crate::pool::{self, PoolLimits, PoolReturn};
use crate::snapshot::{RouteData, Snapshot};
use crate::upstream::{ActiveGuard, PassHost, UpstreamRt};

/// State shared by every worker thread.
pub struct Shared {
    /// The configuration pipeline; its target holds the served snapshot.
    pub config: Arc<Pipeline<DataPlane>>,
    /// Access log, if enabled.
    pub access_log: Option<AccessLog>,
    /// Counters.
    pub metrics: Metrics,
}

impl Shared {
    /// The served configuration.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.target().snapshot.load_full()
    }
}

static SERVER: HeaderValue =
    HeaderValue::from_static(concat!("polygate/", env!("CARGO_PKG_VERSION")));
/// What the request ended with before the response body.
enum Outcome {
    Upstream {
        head: h1::Head,
        conn: H1Conn,
        ret: PoolReturn,
        guard: ActiveGuard,
        read_timeout: Duration,
    },
    Local(PluginResponse),
    /// An HTTP/2 (gRPC) upstream answered.
    H2 {
        resp: Box<http::Response<hyper::body::Incoming>>,
        guard: ActiveGuard,
        deadline: Option<tokio::time::Instant>,
    },
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

/// The chain that serves a request: the consumer-merged one when a consumer brought plugins,
/// else the matched route's (none when no route matched).
fn active_chain<'a>(
    merged: &'a Option<PluginChain>,
    entry: &'a Option<Arc<Entry<RouteData>>>,
) -> Option<&'a PluginChain> {
    merged.as_ref().or(entry.as_ref().map(|e| &e.data.chain))
}

impl Fin {
    fn chain(&self) -> Option<&PluginChain> {
        active_chain(&self.merged, &self.entry)
    }
}

impl Finish for Fin {
    fn filters_body(&self) -> bool {
        self.snap.global.has_body_filter || self.chain().is_some_and(|c| c.has_body_filter)
    }

    fn on_trailers(&mut self, trailers: &mut http::HeaderMap) {
        run_trailers_filter(&self.snap.global.instances, &mut self.ctx, trailers);
        if let Some(c) = active_chain(&self.merged, &self.entry) {
            run_trailers_filter(&c.instances, &mut self.ctx, trailers);
        }
    }

    /// Filters are counted across the global rules' instances, then the serving chain's.
    fn resume(&mut self, at: usize, chunk: &mut Bytes, eof: bool) -> Option<ChunkWait> {
        let global = &self.snap.global.instances;
        if at < global.len()
            && let Some((next, wait)) = run_body_filter_from(global, at, &mut self.ctx, chunk, eof)
        {
            return Some(ChunkWait { at: next, wait });
        }
        let off = global.len();
        // disjoint field borrows: no copy of the chain per chunk
        if let Some(c) = active_chain(&self.merged, &self.entry)
            && let Some((next, wait)) = run_body_filter_from(
                &c.instances,
                at.saturating_sub(off),
                &mut self.ctx,
                chunk,
                eof,
            )
        {
            return Some(ChunkWait {
                at: off + next,
                wait,
            });
        }
        None
    }

    fn finish(mut self: Box<Self>, body_bytes: u64, complete: bool) {
        self.ctx.response_body_bytes = body_bytes;
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

/// Facts about a client connection, computed once per connection.
pub struct ConnInfo {
    /// Client address.
    pub client: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// Client IP as text (forwarding headers).
    pub client_ip: Box<str>,
    /// Local port as text (`X-Forwarded-Port`).
    pub local_port: Box<str>,
    /// The byte-level verdicts on this connection's request heads.
    pub verdicts: crate::sniff::Verdicts,
    /// TLS facts of the connection (`None` on plain connections).
    pub tls: Option<Arc<polygate_core::ctx::TlsFacts>>,
    /// With `client.skip_mtls_uri_regex` on the matched certificate: a request on a connection
    /// without a verified client certificate must match one of these, or it gets 400.
    pub skip_mtls: Option<regex::RegexSet>,
}

impl ConnInfo {
    /// Describes a connection.
    pub fn new(
        client: SocketAddr,
        local: SocketAddr,
        verdicts: crate::sniff::Verdicts,
    ) -> ConnInfo {
        ConnInfo {
            client,
            local,
            client_ip: client.ip().to_string().into_boxed_str(),
            local_port: local.port().to_string().into_boxed_str(),
            verdicts,
            tls: None,
            skip_mtls: None,
        }
    }
}

/// Forwarding headers a peer outside `apisix.trusted_addresses` may not bring (when that list
/// is set): removed before any plugin runs, and set from what polygate observed upstream.
pub const FORWARDING_HEADERS: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "forwarded",
];

/// Request headers that carry the identity an auth plugin established (APISIX's
/// `attach_consumer`); removed from every client request so that only the gateway sets them.
pub const IDENTITY_HEADERS: &[&str] = &[
    "x-consumer-username",
    "x-credential-identifier",
    "x-consumer-custom-id",
];

/// The checks nginx makes on a request head before it serves it: one `Host` (required in
/// HTTP/1.1), at most one `Content-Length` (a plain number) and one `Transfer-Encoding`,
/// which must be `chunked`, not combined with `Content-Length`, and not in HTTP/1.0
/// (RFC 9112 sections 3.2 and 6.1–6.3). HTTP/2 requests carry none of these.
fn check_head(parts: &http::request::Parts) -> Result<(), GatewayError> {
    let bad = |m: &str| Err(GatewayError::BadRequest(m.to_owned()));
    // an origin-form target starts with '/'; anything else but absolute-form is refused
    if parts.uri.scheme().is_none()
        && !parts
            .uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('/'))
    {
        return bad("the request target is not a path");
    }
    if parts.version >= http::Version::HTTP_2 {
        return Ok(());
    }
    // nginx: methods are upper-case letters, '_' and '-'
    if !parts
        .method
        .as_str()
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        return bad("invalid method");
    }
    // nginx's large_client_header_buffers (4 x 8k): a longer request line is 414 (longer
    // header lines and heads are refused by the sniffer, which sees them as sent)
    if parts.uri.path_and_query().map_or(0, |p| p.as_str().len()) > crate::sniff::MAX_LINE {
        return Err(GatewayError::UriTooLong);
    }
    let h = &parts.headers;
    let hosts = h.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return bad("duplicate Host header");
    }
    if hosts == 0 && parts.version == http::Version::HTTP_11 && parts.uri.authority().is_none() {
        return bad("HTTP/1.1 request without Host");
    }
    let mut cl = h.get_all(header::CONTENT_LENGTH).iter();
    let first_cl = cl.next();
    if cl.next().is_some() {
        return bad("duplicate Content-Length header");
    }
    if let Some(v) = first_cl
        && (v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return bad("invalid Content-Length");
    }
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(v) = te.next() {
        if te.next().is_some() {
            return bad("duplicate Transfer-Encoding header");
        }
        if parts.version == http::Version::HTTP_10 {
            return bad("HTTP/1.0 request with Transfer-Encoding");
        }
        if !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(GatewayError::NotImplemented(format!(
                "Transfer-Encoding {:?}",
                String::from_utf8_lossy(v.as_bytes())
            )));
        }
        if first_cl.is_some() {
            return bad("both Content-Length and Transfer-Encoding");
        }
    }
    Ok(())
}

/// Handles one request.
pub async fn handle(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    conn: &ConnInfo,
) -> Response<RespBody> {
    let (client, local) = (conn.client, conn.local);
    let snap = shared.snapshot();
    let (mut parts, body) = req.into_parts();
    // a WebSocket handshake (RFC 6455 section 4.1): the client's side of the upgrade
    let upgrade = ws_upgrade(&parts)
        .and_then(|v| Some((v, parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?)));
    let sniffed = if parts.version < http::Version::HTTP_2 {
        conn.verdicts.next()
    } else {
        None
    };
    let head_check = match sniffed {
        Some(why) => Err(GatewayError::BadRequest(why.to_owned())),
        None => check_head(&parts),
    };
    let mut headers = parts.headers;
    // an absolute-form target's authority wins over Host (RFC 9112 section 3.2.2)
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    // identity headers are set by auth plugins only: a client's copies never go upstream
    // (one pass over the names first: hashing three names per request costs more)
    if headers
        .keys()
        .any(|k| IDENTITY_HEADERS.contains(&k.as_str()))
    {
        for h in IDENTITY_HEADERS {
            headers.remove(*h);
        }
    }
    // with `apisix.trusted_addresses` set, an untrusted peer's forwarding headers are forged
    // as far as anything is concerned: plugins (real-ip) must not see them either
    if !snap.trusted.is_empty()
        && !snap.is_trusted(client.ip())
        && headers
            .keys()
            .any(|k| FORWARDING_HEADERS.contains(&k.as_str()))
    {
        for h in FORWARDING_HEADERS {
            headers.remove(*h);
        }
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
    if let Some(t) = &conn.tls {
        ctx.scheme = "https";
        ctx.tls = Some(t.clone());
    }
    let bad = head_check
        .and_then(|()| {
            ctx.normalize_path(snap.gateway.merge_slashes)
                .map_err(|e| GatewayError::BadRequest(e.to_string()))
        })
        .and_then(|()| match (&conn.skip_mtls, &conn.tls) {
            // nginx's answer to a request that needed a client certificate and came without
            (Some(skip), Some(t)) if !t.client_verified && !skip.is_match(&ctx.path) => Err(
                GatewayError::BadRequest("No required SSL certificate was sent".into()),
            ),
            _ => Ok(()),
        });
    if let Err(e) = bad {
        tracing::info!(client = %client, target = %ctx.request_uri, "refused: {e}");
        let mut r = e.into_response();
        // what follows a head we refused cannot be trusted to be framed as the head says
        r.headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return finish_local(shared, snap, ctx, None, None, r, None).await;
    }

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
        let r = error_response(&ctx, GatewayError::RouteNotFound);
        return finish_local(shared, snap, ctx, None, None, r, None).await;
    };
    ctx.route_id = Some(entry.data.id.clone());
    ctx.route_facts = Some(entry.data.facts.clone());
    ctx.service_id = entry.data.service_id.clone();
    ctx.upstream_id = entry.data.upstream.as_ref().map(|u| u.id.clone());
    ctx.uri_params = params;
    let on_upgrade = match upgrade {
        Some((v, on)) if entry.data.websocket => {
            ctx.extensions.insert(WsUpgrade(v));
            Some(on)
        }
        _ => None,
    };

    let mut merged: Option<PluginChain> = None;
    let outcome = run_request(&snap, &entry, &mut ctx, &mut merged, body, conn).await;
    let upstream_id = entry.data.upstream.as_ref().map(|u| u.id.clone());
    let (mut head, body, guard) = match outcome {
        Ok(Outcome::Local(r)) => {
            return finish_local(shared, snap, ctx, Some(entry), merged, r, upstream_id).await;
        }
        Err(e) => {
            match &e {
                GatewayError::Plugin(p) => tracing::error!(route = %entry.data.id, "{p}"),
                GatewayError::MissingResource { .. } => {
                    tracing::error!(route = %entry.data.id, "{e}")
                }
                _ => tracing::warn!(route = %entry.data.id, uri = %ctx.request_uri, "{e}"),
            }
            let r = error_response(&ctx, e);
            return finish_local(shared, snap, ctx, Some(entry), merged, r, upstream_id).await;
        }
        Ok(Outcome::H2 {
            resp,
            guard,
            deadline,
        }) => {
            let (p, b) = (*resp).into_parts();
            let head = ResponseHead {
                status: p.status,
                headers: p.headers,
            };
            let body = UpstreamBody::H2(crate::h2up::H2Body::new(b, deadline));
            (head, body, guard)
        }
        Ok(Outcome::Upstream {
            head: h1head,
            conn,
            ret,
            guard,
            read_timeout,
        }) => {
            if h1head.status == http::StatusCode::SWITCHING_PROTOCOLS
                && let Some(on) = on_upgrade
            {
                let mut head = ResponseHead {
                    status: h1head.status,
                    headers: h1head.headers,
                };
                let chain = merged.as_ref().unwrap_or(&entry.data.chain);
                response_head(shared, &snap, Some(chain), &mut ctx, &mut head);
                drop(ret);
                tokio::spawn(tunnel(on, conn, read_timeout, guard, entry.data.id.clone()));
                let fin = Box::new(Fin {
                    ctx,
                    shared: shared.clone(),
                    snap,
                    entry: Some(entry),
                    merged,
                    _guard: None,
                    upstream_id,
                });
                return into_response(head, RespBody::full(Bytes::new(), Some(fin)));
            }
            let body = UpstreamBody::H1(H1Body::new(conn, &h1head, ret, read_timeout));
            let head = ResponseHead {
                status: h1head.status,
                headers: h1head.headers,
            };
            (head, body, guard)
        }
    };
    let chain = merged.as_ref().unwrap_or(&entry.data.chain);
    if !waits(&snap, Some(chain)) {
        response_head(shared, &snap, Some(chain), &mut ctx, &mut head);
    } else if let Err(e) =
        response_head_waiting(shared, &snap, Some(chain), &mut ctx, &mut head).await
    {
        // the upstream's answer is dropped: the client gets the error instead
        drop(body);
        tracing::error!(route = %entry.data.id, "{e}");
        let r = GatewayError::Plugin(e).into_response();
        return finish_failed(shared, snap, ctx, Some(entry), merged, r, upstream_id);
    }
    let override_body = ctx.body_override.take();
    let body_filters = snap.global.has_body_filter || chain.has_body_filter;
    if body_filters || override_body.is_some() {
        head.headers.remove(header::CONTENT_LENGTH);
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
        None => RespBody::upstream(body, Some(fin)),
    };
    into_response(head, body)
}

/// The answer to a request polygate fails: gRPC-shaped (HTTP 200 with `grpc-status`) for a
/// gRPC call over HTTP/2, APISIX's JSON error otherwise.
fn error_response(ctx: &RequestCtx, e: GatewayError) -> PluginResponse {
    if ctx.version == http::Version::HTTP_2 && crate::h2up::is_grpc(&ctx.headers) {
        e.into_grpc_response()
    } else {
        e.into_response()
    }
}

/// The client's `Upgrade` value on a route that proxies WebSocket.
#[derive(Clone)]
struct WsUpgrade(HeaderValue);

/// The `Upgrade` value of an HTTP/1.1 WebSocket handshake request: GET, `Connection` naming
/// `upgrade`, `Upgrade` naming `websocket`.
fn ws_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != http::Version::HTTP_11 || parts.method != Method::GET {
        return None;
    }
    let up = parts.headers.get(header::UPGRADE)?;
    let token = |v: &HeaderValue, want: &str| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    };
    let conn_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| token(v, "upgrade"));
    (conn_upgrade && token(up, "websocket")).then(|| up.clone())
}

/// Both directions of an upgraded connection, byte for byte, until either side closes or
/// nothing moves for `idle` (nginx's `proxy_read_timeout` on a WebSocket).
async fn tunnel(
    on: hyper::upgrade::OnUpgrade,
    conn: crate::h1::H1Conn,
    idle: Duration,
    guard: ActiveGuard,
    route: Arc<str>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _guard = guard;
    let client = match on.await {
        Ok(u) => u,
        Err(e) => {
            tracing::info!(route = %route, "upgrade: {e}");
            return;
        }
    };
    let (upstream, leftover) = conn.into_parts();
    let mut client = hyper_util::rt::TokioIo::new(client);
    if !leftover.is_empty() && client.write_all(&leftover).await.is_err() {
        return;
    }
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let (mut b1, mut b2) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut c_open, mut u_open) = (true, true);
    while c_open || u_open {
        tokio::select! {
            r = cr.read(&mut b1), if c_open => match r {
                Ok(n) if n > 0 => {
                    if uw.write_all(&b1[..n]).await.is_err() {
                        break;
                    }
                }
                _ => {
                    c_open = false;
                    let _ = uw.shutdown().await;
                }
            },
            r = ur.read(&mut b2), if u_open => match r {
                Ok(n) if n > 0 => {
                    if cw.write_all(&b2[..n]).await.is_err() {
                        break;
                    }
                }
                _ => {
                    u_open = false;
                    let _ = cw.shutdown().await;
                }
            },
            _ = tokio::time::sleep(idle) => {
                tracing::info!(route = %route, "upgraded connection idle for {idle:?}: closed");
                break;
            }
        }
    }
}

/// Work every response head gets: the Server header, `header_filter` of the global rules and
/// the serving chain (only when a route matched: `chain` is `None` otherwise), the status for
/// the log phase and `vars`, and the counters. For chains whose header filters never wait
/// ([`waits`] is false); see [`response_head_waiting`] for the others.
fn response_head(
    shared: &Shared,
    snap: &Snapshot,
    chain: Option<&PluginChain>,
    ctx: &mut RequestCtx,
    head: &mut ResponseHead,
) {
    head.headers.insert(header::SERVER, SERVER.clone());
    for (n, v) in ctx.response_headers.drain(..) {
        head.headers.insert(n, v);
    }
    if let Some(c) = chain {
        run_header_filter(&snap.global.instances, ctx, head);
        run_header_filter(&c.instances, ctx, head);
    }
    ctx.status = Some(head.status);
    shared.metrics.record(head.status);
}

/// Whether a header filter of the global rules or of `chain` may wait.
fn waits(snap: &Snapshot, chain: Option<&PluginChain>) -> bool {
    chain.is_some_and(|c| c.async_header_filter || snap.global.async_header_filter)
}

/// [`response_head`] for chains whose header filters may wait. An error leaves the head as it
/// was (the caller answers with the error).
async fn response_head_waiting(
    shared: &Shared,
    snap: &Snapshot,
    chain: Option<&PluginChain>,
    ctx: &mut RequestCtx,
    head: &mut ResponseHead,
) -> Result<(), polygate_core::PluginError> {
    head.headers.insert(header::SERVER, SERVER.clone());
    for (n, v) in ctx.response_headers.drain(..) {
        head.headers.insert(n, v);
    }
    if let Some(c) = chain {
        header_filters(&snap.global, ctx, head).await?;
        header_filters(c, ctx, head).await?;
    }
    ctx.status = Some(head.status);
    shared.metrics.record(head.status);
    Ok(())
}

/// A chain's header filters: awaited when one of them may wait, else synchronously.
async fn header_filters(
    chain: &PluginChain,
    ctx: &mut RequestCtx,
    head: &mut ResponseHead,
) -> Result<(), polygate_core::PluginError> {
    if chain.async_header_filter {
        run_header_filter_async(&chain.instances, ctx, head).await
    } else {
        run_header_filter(&chain.instances, ctx, head);
        Ok(())
    }
}

fn into_response(head: ResponseHead, body: RespBody) -> Response<RespBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = head.headers;
    resp
}

async fn finish_local(
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
    ctx.local_response = true;
    let chain = active_chain(&merged, &entry);
    if !waits(&snap, chain) {
        response_head(shared, &snap, chain, &mut ctx, &mut head);
    } else if let Err(e) = response_head_waiting(shared, &snap, chain, &mut ctx, &mut head).await {
        tracing::error!("{e}");
        let r = GatewayError::Plugin(e).into_response();
        return finish_failed(shared, snap, ctx, entry, merged, r, upstream_id);
    }
    let body = ctx.body_override.take().unwrap_or(r.body);
    finish_with(shared, snap, ctx, entry, merged, head, body, upstream_id)
}

/// The response for a header filter that failed: no filter runs again on it.
fn finish_failed(
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
    ctx.status = Some(head.status);
    ctx.body_override = None;
    ctx.local_response = true;
    shared.metrics.record(head.status);
    finish_with(shared, snap, ctx, entry, merged, head, r.body, upstream_id)
}

#[allow(
    clippy::too_many_arguments,
    reason = "the parts of one finished request, moved into its end-of-request hook"
)]
fn finish_with(
    shared: &Arc<Shared>,
    snap: Arc<Snapshot>,
    ctx: RequestCtx,
    entry: Option<Arc<Entry<RouteData>>>,
    merged: Option<PluginChain>,
    mut head: ResponseHead,
    body: Bytes,
    upstream_id: Option<Arc<str>>,
) -> Response<RespBody> {
    head.headers.remove(header::CONTENT_LENGTH);
    let fin = Box::new(Fin {
        ctx,
        shared: shared.clone(),
        snap,
        entry,
        merged,
        _guard: None,
        upstream_id,
    });
    into_response(head, RespBody::full(body, Some(fin)))
}

/// Buffers a request body of at most `limit` bytes.
async fn read_body(body: Incoming, limit: usize, timeout_s: f64) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(polygate_model::secs(timeout_s), limited.collect()).await {
        Err(_) => Err(GatewayError::ClientTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge(limit))
        }
        Ok(Err(e)) => Err(GatewayError::BadRequest(format!(
            "reading the request body: {e}"
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn run_request(
    snap: &Arc<Snapshot>,
    entry: &Arc<Entry<RouteData>>,
    ctx: &mut RequestCtx,
    merged: &mut Option<PluginChain>,
    body: Incoming,
    conn: &ConnInfo,
) -> Result<Outcome, GatewayError> {
    let route = &entry.data;
    if let Some((what, status)) = route.refuse {
        return Err(GatewayError::MissingResource { what, status });
    }
    let global = &snap.global;
    let mut body = Some(body);
    if let Some(limit) = global.wants_body.max(route.chain.wants_body)
        && let Some(b) = body.take()
    {
        ctx.body = Some(read_body(b, limit, snap.gateway.timeouts.client_body).await?);
    }
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
    let chosen = match ctx.extensions.get::<UpstreamOverride>() {
        None => None,
        Some(o) => match crate::upstream::resolve_override(snap, o) {
            Ok(up) => Some(up),
            Err(r) => return Ok(Outcome::Local(*r)),
        },
    };
    if let Some(up) = &chosen {
        ctx.upstream_id = Some(up.id.clone());
    }
    let Some(up) = chosen.or_else(|| route.upstream.clone()) else {
        return Err(GatewayError::NoUpstream(
            "missing upstream configuration in Route or Service".into(),
        ));
    };
    if up.scheme == "grpc" || up.scheme == "grpcs" {
        // boxed: HTTP/2 state stays out of the HTTP/1.1 requests' futures
        return Box::pin(proxy_h2(snap, &up, route.timeout, chain, ctx, body, conn)).await;
    }
    proxy(snap, &up, route.timeout, chain, ctx, body, conn).await
}

/// What a failed attempt tells the passive health checks.
fn passive_verdict(e: &GatewayError) -> crate::health::Verdict {
    use crate::health::Verdict;
    match e {
        GatewayError::Connect { .. }
        | GatewayError::Resolve { .. }
        | GatewayError::Upstream { .. } => Verdict::TcpFailure,
        GatewayError::Timeout { .. } => Verdict::Timeout,
        _ => Verdict::Neutral,
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// What the next attempt of a request goes to.
enum Attempt {
    /// This node (already recorded in `tried`).
    Node(usize),
    /// A `before_proxy` plugin answered.
    Local(PluginResponse),
    /// No retry is left (count, `retry_timeout` budget) or no node can be picked.
    Exhausted,
}

/// Picks the node of the next attempt within the retry count and `retry_timeout` budget, then
/// runs the `before_proxy` phase of the global rules and the chain, as both upstream clients
/// do before each attempt.
async fn next_attempt(
    snap: &Snapshot,
    up: &UpstreamRt,
    chain: &PluginChain,
    ctx: &mut RequestCtx,
    tried: &mut SmallVec<[usize; 4]>,
    started: Instant,
) -> Result<Attempt, GatewayError> {
    let attempt = tried.len();
    let budget_left = up.retry_timeout.is_none_or(|rt| started.elapsed() < rt);
    if attempt > 0 && (attempt > up.retries || !budget_left) {
        return Ok(Attempt::Exhausted);
    }
    let Some(idx) = up.pick(ctx, tried) else {
        return Ok(Attempt::Exhausted);
    };
    tried.push(idx);
    ctx.upstream_addr = up.nodes[idx].addr;
    let global = &snap.global;
    if !global.is_empty()
        && let Some(r) = run_phase(&global.instances, Phase::BeforeProxy, ctx).await?
    {
        return Ok(Attempt::Local(r));
    }
    if !chain.is_empty()
        && let Some(r) = run_phase(&chain.instances, Phase::BeforeProxy, ctx).await?
    {
        return Ok(Attempt::Local(r));
    }
    Ok(Attempt::Node(idx))
}

/// The Host the upstream gets instead of the client's (`pass_host`, a plugin's
/// `upstream_host`); `None` keeps the client's.
fn upstream_host<'a>(
    ctx: &'a RequestCtx,
    up: &'a UpstreamRt,
    node: &'a crate::upstream::Node,
    client_host: Option<&HeaderValue>,
) -> Option<&'a HeaderValue> {
    match (&ctx.upstream_host, up.pass_host) {
        (Some(h), _) => Some(h),
        (None, PassHost::Node) => Some(&node.host_header),
        (None, PassHost::Rewrite) => up.upstream_host.as_ref(),
        // an HTTP/1.0 client may send no Host: the upstream still gets one
        (None, PassHost::Pass) if client_host.is_none() => Some(&node.host_header),
        (None, PassHost::Pass) => None,
    }
}

/// The port in the client's Host (`X-Forwarded-Port`), when it has one.
fn host_port(client_host: Option<&HeaderValue>) -> Option<&str> {
    client_host
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.rsplit_once(':'))
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Counts an attempt's outcome for passive health checks (a status, or the failure).
fn observe_passive(up: &UpstreamRt, node: &crate::upstream::Node, r: Result<u16, &GatewayError>) {
    if let Some(c) = &up.checks {
        match r {
            Ok(status) => c.passive(node, Some(status), None),
            Err(e) => c.passive(node, None, Some(passive_verdict(e))),
        }
    }
}

/// An HTTP/2 upstream (`grpc`, `grpcs`): the request and response stream in both
/// directions with their trailers; `grpc-timeout` bounds the whole call. A call is retried on
/// another node only when nothing of it can have reached the upstream, or its body is
/// buffered.
async fn proxy_h2(
    snap: &Arc<Snapshot>,
    up: &Arc<UpstreamRt>,
    route_timeout: Option<polygate_model::Timeout>,
    chain: &PluginChain,
    ctx: &mut RequestCtx,
    body: Option<Incoming>,
    conn: &ConnInfo,
) -> Result<Outcome, GatewayError> {
    let t = route_timeout
        .or(up.timeout)
        .unwrap_or(snap.gateway.timeouts.upstream);
    let connect_to = polygate_model::secs(t.connect);
    let read_to = polygate_model::secs(t.read);
    let deadline = crate::h2up::grpc_timeout(&ctx.headers).map(|d| tokio::time::Instant::now() + d);
    let buffered = ctx.body.clone();
    let mut streamed = match (&buffered, body) {
        (None, Some(b)) if !b.is_end_stream() => Some(b),
        _ => None,
    };
    let replayable = streamed.is_none();
    let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
    let mut last_err: Option<GatewayError> = None;
    let method = ctx.method.clone();
    let client_host = ctx.headers.get(header::HOST).cloned();
    let trusted = snap.is_trusted(conn.client.ip());
    let started = Instant::now();
    loop {
        let idx = match next_attempt(snap, up, chain, ctx, &mut tried, started).await? {
            Attempt::Node(i) => i,
            Attempt::Local(r) => return Ok(Outcome::Local(r)),
            Attempt::Exhausted => break,
        };
        let node = &up.nodes[idx];
        // HTTP/2 always sends an :authority: the client's Host when it is kept
        let host = upstream_host(ctx, up, node, client_host.as_ref())
            .or(client_host.as_ref())
            .cloned();
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or(&node.key)
            .to_owned();
        let sni = polygate_core::ctx::strip_port(&authority).to_owned();
        let tls = up.tls.as_deref().map(|t| (t, sni.as_str()));
        let path = ctx.upstream_uri().to_string();
        let fwd = crate::h2up::H2Forward {
            scheme: if up.tls.is_some() { "https" } else { "http" },
            authority: &authority,
            path: &path,
            client_ip: &conn.client_ip,
            client_scheme: ctx.scheme,
            port: host_port(client_host.as_ref()).unwrap_or(&conn.local_port),
            host: client_host.as_ref(),
            trusted,
            drop_xff: !trusted && !snap.trusted.is_empty(),
            connect_timeout: connect_to,
            head_timeout: match deadline {
                Some(d) => read_to.min(d.saturating_duration_since(tokio::time::Instant::now())),
                None => read_to,
            },
        };
        let req_body = match (&buffered, streamed.take()) {
            (Some(b), _) => ReqBody::Full(Some(b.clone())),
            (None, Some(b)) => ReqBody::Stream(b),
            (None, None) => ReqBody::Empty,
        };
        let guard = ActiveGuard::new(up.clone(), idx);
        let t0 = Instant::now();
        let r = crate::h2up::exchange(node, tls, &method, &ctx.headers, &fwd, req_body).await;
        observe_passive(up, node, r.as_ref().map(|resp| resp.status().as_u16()));
        match r {
            Ok(resp) => {
                up.observe(idx, t0.elapsed());
                ctx.upstream_latency = Some(t0.elapsed());
                return Ok(Outcome::H2 {
                    resp: Box::new(resp),
                    guard,
                    deadline,
                });
            }
            Err(e) => {
                tracing::warn!(upstream = %up.id, node = %node.key, "{e}");
                let connect_failed = matches!(e, GatewayError::Connect { .. });
                let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                last_err = Some(e);
                if expired || !(replayable || connect_failed) {
                    break;
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| GatewayError::NoUpstream(up.id.to_string())))
}

async fn proxy(
    snap: &Arc<Snapshot>,
    up: &Arc<UpstreamRt>,
    route_timeout: Option<polygate_model::Timeout>,
    chain: &PluginChain,
    ctx: &mut RequestCtx,
    body: Option<Incoming>,
    conn: &ConnInfo,
) -> Result<Outcome, GatewayError> {
    if up.scheme != "http" && up.scheme != "https" {
        return Err(GatewayError::UnsupportedScheme(up.scheme.clone()));
    }
    let t = route_timeout
        .or(up.timeout)
        .unwrap_or(snap.gateway.timeouts.upstream);
    let connect_to = polygate_model::secs(t.connect);
    let send_to = polygate_model::secs(t.send);
    let read_to = polygate_model::secs(t.read);
    let body_to = polygate_model::secs(snap.gateway.timeouts.client_body);
    let limits = PoolLimits {
        size: up.keepalive.size.max(0) as usize,
        idle_timeout: polygate_model::secs(up.keepalive.idle_timeout),
        max_uses: up.keepalive.requests.clamp(1, u32::MAX as i64) as u32,
    };
    // a body buffered for plugins (possibly changed by them) is sent as is and can be replayed
    let buffered = ctx.body.clone();
    let (replayable, mut body) = match (&buffered, body) {
        (Some(_), _) | (None, None) => (true, None),
        (None, Some(b)) if b.is_end_stream() => (true, None),
        (None, Some(b)) => {
            let mut filters = Vec::new();
            if snap.global.request_body_filter {
                request_body_filters(&snap.global.instances, ctx, &mut filters);
            }
            if chain.request_body_filter {
                request_body_filters(&chain.instances, ctx, &mut filters);
            }
            if filters.is_empty() {
                (false, Some(ReqBody::Stream(b)))
            } else {
                let f = FilteredBody::new(b, filters);
                (false, Some(ReqBody::Filtered(Box::new(f))))
            }
        }
    };
    let replay = || match &buffered {
        Some(b) => ReqBody::Full(Some(b.clone())),
        None => ReqBody::Empty,
    };

    let client_host = ctx.headers.get(header::HOST).cloned();
    let trusted = snap.is_trusted(conn.client.ip());
    let ws = ctx.extensions.get::<WsUpgrade>().map(|w| w.0.clone());
    let fwd = h1::Forward {
        client_ip: &conn.client_ip,
        scheme: ctx.scheme,
        port: host_port(client_host.as_ref()).unwrap_or(&conn.local_port),
        host: client_host.as_ref(),
        trusted,
        drop_xff: !trusted && !snap.trusted.is_empty(),
        upgrade: ws.as_ref(),
    };

    let started = Instant::now();
    let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
    let mut last_err: Option<GatewayError> = None;
    let method = ctx.method.clone();
    loop {
        let idx = match next_attempt(snap, up, chain, ctx, &mut tried, started).await? {
            Attempt::Node(i) => i,
            Attempt::Local(r) => return Ok(Outcome::Local(r)),
            Attempt::Exhausted => break,
        };
        let attempt = tried.len() - 1;
        let node = &up.nodes[idx];
        let host = upstream_host(ctx, up, node, client_host.as_ref());
        let sni = match &up.tls {
            Some(_) => host
                .or(client_host.as_ref())
                .and_then(|h| h.to_str().ok())
                .map_or("", polygate_core::ctx::strip_port),
            None => "",
        };
        let tls = up.tls.as_deref().map(|t| (t, sni));
        let mut co = match pool::checkout(node, limits, connect_to, tls).await {
            Ok(c) => c,
            Err(e) => {
                observe_passive(up, node, Err(&e));
                tracing::warn!(upstream = %up.id, node = %node.key, "{e}");
                last_err = Some(e);
                continue;
            }
        };
        let uri = ctx.upstream_uri();
        let probe_body = if replayable {
            replay()
        } else {
            body.take().unwrap_or(ReqBody::Empty)
        };
        let (head_bytes, chunked) =
            h1::encode_head(&method, &uri, &ctx.headers, host, &fwd, &probe_body)
                .map_err(|e| GatewayError::InvalidUpstreamRequest(e.to_string()))?;
        let mut req_body = Some(probe_body);
        co.conn.upgrade = ws.is_some();
        let guard = ActiveGuard::new(up.clone(), idx);
        let t0 = Instant::now();
        let may_retry_after = replayable && attempt < up.retries && is_idempotent(&method);
        let mut fresh_retry = false;
        let result = loop {
            let b = if replayable {
                replay()
            } else {
                req_body.take().unwrap_or(ReqBody::Empty)
            };
            let r = exchange(
                &mut co.conn,
                &head_bytes,
                b,
                chunked,
                &method,
                send_to,
                body_to,
                read_to,
                &node.key,
            )
            .await;
            match r {
                // a pooled connection the upstream had closed: once more on a new connection,
                // unless the request may have reached the upstream and is not idempotent
                Err(Exchange::Stale { sent })
                    if co.reused
                        && replayable
                        && !fresh_retry
                        && (!sent || is_idempotent(&method)) =>
                {
                    fresh_retry = true;
                    match pool::connect_new(node, connect_to, tls).await {
                        Ok(c) => {
                            co.conn = c;
                            co.reused = false;
                        }
                        Err(e) => break Err(e),
                    }
                }
                Err(Exchange::Stale { .. }) => {
                    break Err(GatewayError::Upstream {
                        addr: node.key.to_string(),
                        reason: "connection closed before the response".into(),
                    });
                }
                Err(Exchange::Failed(e)) => break Err(e),
                Ok(head) => break Ok(head),
            }
        };
        observe_passive(up, node, result.as_ref().map(|h| h.status.as_u16()));
        match result {
            Ok(head) => {
                up.observe(idx, t0.elapsed());
                ctx.upstream_latency = Some(t0.elapsed());
                return Ok(Outcome::Upstream {
                    head,
                    conn: co.conn,
                    ret: co.ret,
                    guard,
                    read_timeout: read_to,
                });
            }
            Err(err) => {
                tracing::warn!(upstream = %up.id, node = %node.key, "{err}");
                let connect_failed = matches!(err, GatewayError::Connect { .. });
                last_err = Some(err);
                if !(may_retry_after || connect_failed && replayable) {
                    break;
                }
            }
        }
    }
    Err(last_err.unwrap_or_else(|| GatewayError::NoUpstream("no valid upstream node".into())))
}

enum Exchange {
    /// Nothing came back on a reused connection: the upstream closed it while idle. `sent`:
    /// the request was written in full before that showed, so the upstream may have
    /// received it (the retry decision depends on it).
    Stale {
        sent: bool,
    },
    Failed(GatewayError),
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the pieces of one exchange"
)]
async fn exchange(
    conn: &mut H1Conn,
    head: &[u8],
    body: ReqBody,
    chunked: bool,
    method: &Method,
    send_to: Duration,
    body_to: Duration,
    read_to: Duration,
    key: &str,
) -> Result<h1::Head, Exchange> {
    let timeout = |what| {
        Exchange::Failed(GatewayError::Timeout {
            addr: key.to_owned(),
            what,
        })
    };
    let failed = |e: H1Error, sent: bool| match e {
        H1Error::ClosedEarly => Exchange::Stale { sent },
        H1Error::Io(ref io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            Exchange::Stale { sent }
        }
        H1Error::ClientBody(m) => Exchange::Failed(GatewayError::BadRequest(m)),
        H1Error::Filter(p) => Exchange::Failed(GatewayError::Plugin(p)),
        H1Error::ClientTimeout => Exchange::Failed(GatewayError::ClientTimeout),
        other => Exchange::Failed(GatewayError::Upstream {
            addr: key.to_owned(),
            reason: other.to_string(),
        }),
    };
    let sent = matches!(body, ReqBody::Empty) && conn.try_send_head(head);
    if !sent {
        match conn.send(head, body, chunked, send_to, body_to).await {
            Err(H1Error::SendTimeout) => return Err(timeout("send")),
            Err(e) => return Err(failed(e, false)),
            Ok(()) => {}
        }
    }
    match tokio::time::timeout(read_to, conn.read_head(method)).await {
        Err(_) => Err(timeout("read")),
        Ok(Err(e)) => Err(failed(e, true)),
        Ok(Ok(h)) => Ok(h),
    }
}
