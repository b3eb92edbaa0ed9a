//! The `ffi` plugin: calls a runtime library on the request path (APISIX's ext-plugin idea,
//! without the socket).
//!
//! ```yaml
//! plugins:
//!   ffi:
//!     lib: ffi_go_auth          # path, file name, or short name (libffi_go_auth.so)
//!     cfg: '{"secret": "..."}'  # passed to libffi_init (optional)
//!     phase: access             # rewrite | access (default) | log
//!     timeout: 3                # seconds per call
//!     on_error: fail_closed     # or fail_open: continue when the runtime fails
//!     error_status: 503         # status for fail_closed
//!     include_body: false       # send the request body (up to max_body bytes)
//! ```
//!
//! The runtime receives one JSON document per request (see [`RequestDoc`]) and answers with a
//! JSON action (see [`Action`]); rc ≠ 0 is an error. In the `log` phase the call is made after
//! the response, and its answer is ignored.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use polygate_core::{
    ConfError, Flow, Plugin, PluginError, PluginFactory, PluginResponse, RequestCtx, ResponseHead,
    parse_conf,
};
use serde::{Deserialize, Serialize};

use crate::runtime::{LoadError, LoadOptions, Runtime, Slot, host};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    lib: String,
    #[serde(default)]
    cfg: Option<String>,
    #[serde(default = "access")]
    phase: String,
    #[serde(default = "three")]
    timeout: f64,
    #[serde(default)]
    max_queue: Option<usize>,
    #[serde(default)]
    max_inflight: Option<usize>,
    #[serde(default)]
    is_global: bool,
    #[serde(default)]
    unpin: bool,
    #[serde(default = "fail_closed")]
    on_error: String,
    #[serde(default = "s503")]
    error_status: u16,
    #[serde(default)]
    include_body: bool,
    #[serde(default = "mib")]
    max_body: usize,
}

fn access() -> String {
    "access".into()
}
fn three() -> f64 {
    3.0
}
fn fail_closed() -> String {
    "fail_closed".into()
}
fn s503() -> u16 {
    503
}
fn mib() -> usize {
    1 << 20
}

/// What the runtime receives: one JSON object per call.
#[derive(Serialize)]
pub struct RequestDoc<'a> {
    /// Request method.
    pub method: &'a str,
    /// The request target as received (`$request_uri`).
    pub uri: &'a str,
    /// Current path (after rewrites).
    pub path: &'a str,
    /// Current query string (without `?`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<&'a str>,
    /// Headers (lower-case names; a list when a header repeats).
    pub headers: BTreeMap<&'a str, serde_json::Value>,
    /// Client address.
    pub client_ip: String,
    /// Client port.
    pub client_port: u16,
    /// Matched route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_id: Option<&'a str>,
    /// Matched route's service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_id: Option<&'a str>,
    /// Identified consumer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<&'a str>,
    /// Response status (log phase).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The body as text (with `include_body`, when it is UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a str>,
    /// The body in base64 (with `include_body`, when it is not UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// What the runtime answers.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// `continue` (default) or `respond`.
    #[serde(default)]
    pub action: Option<String>,
    /// `respond`: status (default 200).
    #[serde(default)]
    pub status: Option<u16>,
    /// `respond`: response headers.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    /// `respond`: response body.
    #[serde(default)]
    pub body: Option<String>,
    /// `continue`: request headers to set before proxying.
    #[serde(default)]
    pub set_headers: Option<BTreeMap<String, String>>,
    /// `continue`: request headers to remove.
    #[serde(default)]
    pub remove_headers: Option<Vec<String>>,
    /// `continue`: new path (and query, after `?`) sent upstream.
    #[serde(default)]
    pub uri: Option<String>,
    /// `continue`: headers to set on the response to the client.
    #[serde(default)]
    pub response_headers: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PhaseKind {
    Rewrite,
    Access,
    Log,
}

struct Ffi {
    /// `lib&cfg`, for logs.
    key: String,
    lib: String,
    cfg: Option<String>,
    opts: LoadOptions,
    /// The runtime once loaded (the load starts when the configuration is committed
    /// ([`Plugin::on_commit`]) and runs on the loading thread; requests wait for it without
    /// blocking their worker, and start it again if it failed or the runtime was unloaded).
    rt: ArcSwapOption<Runtime>,
    /// The load in progress, held so the registry keeps it for this configuration.
    pending: parking_lot::Mutex<Option<Arc<Slot>>>,
    phase: PhaseKind,
    timeout: Duration,
    fail_open: bool,
    error_status: StatusCode,
    include_body: Option<usize>,
}

/// Response headers chosen by the runtime, applied in `header_filter`.
#[derive(Clone, Default)]
struct RespHeaders(Vec<(HeaderName, HeaderValue)>);

/// Factory of the `ffi` plugin.
pub struct FfiFactory;

impl PluginFactory for FfiFactory {
    fn name(&self) -> &str {
        "ffi"
    }

    fn priority(&self) -> i32 {
        1500
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let phase = match c.phase.as_str() {
            "rewrite" => PhaseKind::Rewrite,
            "access" => PhaseKind::Access,
            "log" => PhaseKind::Log,
            other => {
                return Err(ConfError::at(
                    "phase",
                    format!("{other:?} must be rewrite, access or log"),
                ));
            }
        };
        // at most 365 days, like every duration polygate takes
        if !(c.timeout.is_finite() && c.timeout > 0.0 && c.timeout <= 31_536_000.0) {
            return Err(ConfError::at(
                "timeout",
                "must be a number of seconds > 0 and at most 31536000 (365 days)",
            ));
        }
        let fail_open = match c.on_error.as_str() {
            "fail_open" => true,
            "fail_closed" => false,
            other => {
                return Err(ConfError::at(
                    "on_error",
                    format!("{other:?} must be fail_open or fail_closed"),
                ));
            }
        };
        let error_status = StatusCode::from_u16(c.error_status)
            .ok()
            .filter(|s| s.as_u16() >= 400)
            .ok_or_else(|| ConfError::at("error_status", "must be an HTTP status >= 400"))?;
        let opts = LoadOptions {
            max_queue: c.max_queue.unwrap_or(crate::runtime::DEFAULT_MAX_QUEUE),
            max_inflight: c.max_inflight.unwrap_or(usize::MAX),
            is_global: c.is_global,
            unpin: c.unpin,
        };
        // the library must exist and export libffi_init; it is loaded only at commit
        let dirs: Vec<std::path::PathBuf> = polygate_core::plugin::preparing()
            .map(|g| g.ffi_lib_path.iter().map(Into::into).collect())
            .unwrap_or_default();
        host()
            .check(&c.lib, &dirs)
            .map_err(|e| ConfError::at("lib", e.to_string()))?;
        Ok(Arc::new(Ffi {
            key: match &c.cfg {
                Some(cfg) => format!("{}&{cfg}", c.lib),
                None => c.lib.clone(),
            },
            lib: c.lib,
            cfg: c.cfg,
            opts,
            rt: ArcSwapOption::empty(),
            pending: parking_lot::Mutex::new(None),
            phase,
            timeout: polygate_model::secs(c.timeout),
            fail_open,
            error_status,
            include_body: c.include_body.then_some(c.max_body),
        }))
    }
}

/// Bytes a JSON string can hold as they are: printable ASCII except `"` and `\`.
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0x20;
    while c < 0x7f {
        t[c] = c != b'"' as usize && c != b'\\' as usize;
        c += 1;
    }
    t
};

/// Serialises the request description (the JSON of [`RequestDoc`], written directly: header
/// names sorted, a repeated header as a list), with room for the NUL the host appends.
pub fn describe(ctx: &RequestCtx) -> Vec<u8> {
    use std::io::Write as _;
    fn plain(b: &[u8]) -> bool {
        b.iter().all(|&c| PLAIN[c as usize])
    }
    /// A JSON string of text that may need escapes.
    fn string(out: &mut Vec<u8>, s: &str) {
        if plain(s.as_bytes()) {
            // nothing to escape (the usual case): what serde_json writes, without its machinery
            raw(out, s.as_bytes());
        } else {
            // serde_json escapes exactly as the derived serializer did
            let _ = serde_json::to_writer(&mut *out, s);
        }
    }
    /// A JSON string of bytes that need no escape.
    fn raw(out: &mut Vec<u8>, b: &[u8]) {
        out.reserve(b.len() + 2);
        out.push(b'"');
        out.extend_from_slice(b);
        out.push(b'"');
    }
    /// A header value: printable ASCII without quotes or backslashes is copied (one scan);
    /// anything else as the derived serializer wrote it (text escaped, other bytes lossily).
    fn value(out: &mut Vec<u8>, v: &HeaderValue) {
        let b = v.as_bytes();
        if plain(b) {
            raw(out, b);
        } else {
            match v.to_str() {
                Ok(t) => string(out, t),
                Err(_) => string(out, &String::from_utf8_lossy(b)),
            }
        }
    }
    use polygate_core::text::push_decimal as decimal;
    fn field(out: &mut Vec<u8>, name: &str, first: &mut bool) {
        if !*first {
            out.push(b',');
        }
        *first = false;
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
    }
    let mut out = Vec::with_capacity(
        256 + ctx.request_uri.len() * 2
            + ctx.headers.len() * 48
            + ctx.body.as_ref().map_or(0, |b| b.len() * 4 / 3 + 4),
    );
    out.push(b'{');
    let mut first = true;
    field(&mut out, "method", &mut first);
    // a method is a token: nothing to escape
    raw(&mut out, ctx.method.as_str().as_bytes());
    field(&mut out, "uri", &mut first);
    string(&mut out, &ctx.request_uri);
    field(&mut out, "path", &mut first);
    string(&mut out, &ctx.path);
    if let Some(q) = ctx.query.as_deref() {
        field(&mut out, "query", &mut first);
        string(&mut out, q);
    }
    field(&mut out, "headers", &mut first);
    // one walk over the headers (no lookup by name): sorted by name, stably, so a repeated
    // header's values are adjacent and keep their order
    let mut hs: Vec<(&HeaderName, &HeaderValue)> = Vec::with_capacity(ctx.headers.len());
    hs.extend(ctx.headers.iter());
    hs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    out.push(b'{');
    let mut i = 0;
    while i < hs.len() {
        let name = hs[i].0;
        let mut j = i + 1;
        while j < hs.len() && hs[j].0 == name {
            j += 1;
        }
        if i > 0 {
            out.push(b',');
        }
        // a header name is a lower-case token: nothing to escape
        raw(&mut out, name.as_str().as_bytes());
        out.push(b':');
        if j == i + 1 {
            value(&mut out, hs[i].1);
        } else {
            out.push(b'[');
            for (k, (_, v)) in hs[i..j].iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                value(&mut out, v);
            }
            out.push(b']');
        }
        i = j;
    }
    out.push(b'}');
    field(&mut out, "client_ip", &mut first);
    out.push(b'"');
    match ctx.client_addr.ip() {
        // written by hand: `write!` costs more than the rest of the description
        std::net::IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                decimal(&mut out, o.into());
            }
        }
        ip @ std::net::IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
    out.push(b'"');
    field(&mut out, "client_port", &mut first);
    decimal(&mut out, ctx.client_addr.port().into());
    for (name, v) in [
        ("route_id", ctx.route_id.as_deref()),
        ("service_id", ctx.service_id.as_deref()),
        (
            "consumer",
            ctx.consumer.as_ref().map(|c| c.username.as_str()),
        ),
    ] {
        if let Some(v) = v {
            field(&mut out, name, &mut first);
            string(&mut out, v);
        }
    }
    if let Some(st) = ctx.status {
        field(&mut out, "status", &mut first);
        decimal(&mut out, st.as_u16().into());
    }
    if let Some(b) = &ctx.body {
        match std::str::from_utf8(b) {
            Ok(t) => {
                field(&mut out, "body", &mut first);
                string(&mut out, t);
            }
            Err(_) => {
                field(&mut out, "body_base64", &mut first);
                out.push(b'"');
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(b)
                        .as_bytes(),
                );
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
    out.reserve(1);
    out
}

impl Ffi {
    /// The runtime, waiting for its load (started again if it failed or was unloaded).
    async fn runtime(&self) -> Result<Arc<Runtime>, LoadError> {
        if let Some(rt) = &*self.rt.load()
            && !rt.is_unloaded()
        {
            return Ok(rt.clone());
        }
        let slot = self.start_load();
        let r = slot.wait().await;
        self.settle(r)
    }

    /// The registry's slot for this runtime (a load queued on the loading thread if needed).
    fn start_load(&self) -> Arc<Slot> {
        let slot = host().slot(&self.lib, self.cfg.as_deref(), &self.opts);
        *self.pending.lock() = Some(slot.clone());
        slot
    }

    fn settle(&self, r: Result<Arc<Runtime>, LoadError>) -> Result<Arc<Runtime>, LoadError> {
        if let Ok(rt) = &r {
            self.rt.store(Some(rt.clone()));
            *self.pending.lock() = None;
        }
        r
    }

    fn fail(&self, why: String) -> Result<Option<PluginResponse>, PluginError> {
        if self.fail_open {
            tracing::warn!("ffi {}: {why}; continuing (fail_open)", self.key);
            return Ok(None);
        }
        tracing::error!("ffi {}: {why}", self.key);
        let mut r = PluginResponse::new(
            self.error_status,
            serde_json::json!({ "error_msg": format!("{} {}", self.error_status.as_u16(), self.error_status.canonical_reason().unwrap_or("Error")) }).to_string() + "\n",
        );
        r.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(Some(r))
    }

    async fn run(&self, ctx: &mut RequestCtx) -> Result<Option<PluginResponse>, PluginError> {
        let rt = match self.runtime().await {
            Ok(rt) => rt,
            Err(e) => return self.fail(e.to_string()),
        };
        let req = describe(ctx);
        let (rc, body) = match rt.call_vec(Some(req), Some(self.timeout)).await {
            Ok(a) => a,
            Err(e) => return self.fail(e.to_string()),
        };
        if rc != 0 {
            let detail = body
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            return self.fail(format!("runtime answered rc {rc}: {detail}"));
        }
        let action: Action = match body.as_deref() {
            // no answer: continue, nothing to change (what the default action does)
            None | Some(b"") => return Ok(None),
            Some(b) => match serde_json::from_slice(b) {
                Ok(a) => a,
                Err(e) => return self.fail(format!("invalid action from the runtime: {e}")),
            },
        };
        self.apply(ctx, action)
    }

    fn apply(
        &self,
        ctx: &mut RequestCtx,
        a: Action,
    ) -> Result<Option<PluginResponse>, PluginError> {
        match a.action.as_deref().unwrap_or("continue") {
            "respond" => {
                let status =
                    StatusCode::from_u16(a.status.unwrap_or(200)).unwrap_or(StatusCode::OK);
                let mut r = PluginResponse::new(status, Bytes::from(a.body.unwrap_or_default()));
                for (k, v) in a.headers.unwrap_or_default() {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(&v),
                    ) {
                        r.headers.insert(n, v);
                    }
                }
                Ok(Some(r))
            }
            "continue" => {
                for (k, v) in a.set_headers.unwrap_or_default() {
                    if ctx.set_header(&k, &v).is_err() {
                        return self.fail(format!("invalid header {k:?} from the runtime"));
                    }
                }
                for k in a.remove_headers.unwrap_or_default() {
                    ctx.headers.remove(k.as_str());
                }
                if let Some(u) = a.uri {
                    match u.split_once('?') {
                        Some((p, q)) => {
                            ctx.path = p.to_owned();
                            ctx.query = Some(q.to_owned());
                        }
                        None => ctx.path = u,
                    }
                }
                if let Some(h) = a.response_headers {
                    let list = h
                        .into_iter()
                        .filter_map(|(k, v)| {
                            Some((
                                HeaderName::from_bytes(k.as_bytes()).ok()?,
                                HeaderValue::from_str(&v).ok()?,
                            ))
                        })
                        .collect();
                    ctx.extensions.insert(RespHeaders(list));
                }
                Ok(None)
            }
            other => self.fail(format!("unknown action {other:?} from the runtime")),
        }
    }
}

impl Plugin for Ffi {
    fn name(&self) -> &str {
        "ffi"
    }

    fn wants_body(&self) -> Option<usize> {
        self.include_body
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.phase != PhaseKind::Rewrite {
            return Flow::Continue;
        }
        Flow::Pending(Box::pin(self.run(ctx)))
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.phase != PhaseKind::Access {
            return Flow::Continue;
        }
        Flow::Pending(Box::pin(self.run(ctx)))
    }

    fn on_commit(&self) {
        // the load runs on the loading thread; requests wait for it (failures are logged there
        // and the next request tries again)
        let slot = self.start_load();
        if let Some(r) = slot.try_get() {
            let _ = self.settle(r.clone());
        }
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        if let Some(h) = ctx.extensions.get::<RespHeaders>() {
            for (k, v) in &h.0 {
                resp.headers.insert(k.clone(), v.clone());
            }
        }
    }

    fn log(&self, ctx: &RequestCtx) {
        if self.phase != PhaseKind::Log {
            return;
        }
        let loaded = self.rt.load_full().filter(|rt| !rt.is_unloaded());
        let slot = match &loaded {
            Some(_) => None,
            None => Some(self.start_load()),
        };
        let req = describe(ctx);
        let timeout = self.timeout;
        let key = self.key.clone();
        // the response is already sent: call in the background and only log failures
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let rt = match (loaded, slot) {
                    (Some(rt), _) => rt,
                    (None, Some(slot)) => match slot.wait().await {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::warn!("ffi {key} (log phase): {e}");
                            return;
                        }
                    },
                    (None, None) => return,
                };
                match rt.call(Some(&req), Some(timeout)).await {
                    Ok((0, _)) => {}
                    Ok((rc, _)) => tracing::warn!("ffi {} (log phase): rc {rc}", rt.key),
                    Err(e) => tracing::warn!("ffi {} (log phase): {e}", rt.key),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, Method, Version};
    use polygate_core::ConsumerIndex;

    /// The request description as the derived serializer writes it (what `describe` replaced).
    fn reference(ctx: &RequestCtx) -> serde_json::Value {
        let mut headers: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
        for (k, v) in &ctx.headers {
            let v = serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
            match headers.get_mut(k.as_str()) {
                None => {
                    headers.insert(k.as_str(), v);
                }
                Some(serde_json::Value::Array(a)) => a.push(v),
                Some(prev) => {
                    let first = prev.take();
                    *prev = serde_json::Value::Array(vec![first, v]);
                }
            }
        }
        let (body, body_base64) = match &ctx.body {
            Some(b) => match std::str::from_utf8(b) {
                Ok(s) => (Some(s), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(b)),
                ),
            },
            None => (None, None),
        };
        serde_json::to_value(RequestDoc {
            method: ctx.method.as_str(),
            uri: &ctx.request_uri,
            path: &ctx.path,
            query: ctx.query.as_deref(),
            headers,
            client_ip: ctx.client_addr.ip().to_string(),
            client_port: ctx.client_addr.port(),
            route_id: ctx.route_id.as_deref(),
            service_id: ctx.service_id.as_deref(),
            consumer: ctx.consumer.as_ref().map(|c| c.username.as_str()),
            status: ctx.status.map(|s| s.as_u16()),
            body,
            body_base64,
        })
        .unwrap()
    }

    fn ctx(uri: &str, body: Option<&[u8]>) -> RequestCtx {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example.com"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b \"quoted\" \\ back"));
        h.append("x-multi", HeaderValue::from_static("c"));
        h.insert("x-bin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("x-tab", HeaderValue::from_static("a\tb"));
        h.append("x-multi", HeaderValue::from_static("d, after others"));
        h.append("a-first", HeaderValue::from_static("sorted before accept"));
        h.insert(
            "x-obs",
            HeaderValue::from_bytes(b"\xc3\xa9 utf-8 text").unwrap(),
        );
        let mut c = RequestCtx::new(
            Method::POST,
            uri,
            h,
            Version::HTTP_11,
            "[::1]:5555".parse().unwrap(),
            "127.0.0.1:9080".parse().unwrap(),
            Arc::new(ConsumerIndex::default()),
        );
        c.body = body.map(Bytes::copy_from_slice);
        c.route_id = Some("r1".into());
        c
    }

    #[test]
    fn describe_writes_what_the_derived_serializer_wrote() {
        for (uri, body) in [
            ("/a/b?x=1&y=%22", Some(&b"{\"json\": \"\\u00e9\\n\"}"[..])),
            ("/plain", None),
            ("/bin", Some(&b"\xff\xfe\x00binary"[..])),
            ("/empty?", Some(&b""[..])),
        ] {
            let mut c = ctx(uri, body);
            if uri == "/plain" {
                c.status = Some(StatusCode::NOT_FOUND);
                c.service_id = Some("svc \u{1f600}".into());
                c.client_addr = "10.0.255.7:80".parse().unwrap();
            }
            let ours = describe(&c);
            assert!(ours.capacity() > ours.len(), "room left for the NUL");
            let parsed: serde_json::Value = serde_json::from_slice(&ours).unwrap();
            assert_eq!(parsed, reference(&c), "{}", String::from_utf8_lossy(&ours));
        }
    }
}
