//! `proxy-mirror` (priority 1010, access phase): sends a copy of the request to another
//! server and ignores its answer; the client's request is not delayed by the copy.
//!
//! Fields as in APISIX: `host` (`http[s]://host[:port]`, no path), `path` (replaces the
//! request's path, or prefixes it with `path_concat_mode: prefix`), `sample_ratio` (share of
//! requests copied, 0.00001 to 1). A request with a body is copied once its body has gone by
//! (the body is then sent upstream chunked); bodies over 16 MiB are not copied.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use polygate_core::callout::{CalloutRequest, callouts};
use polygate_core::plugin::{BodyWait, ChunkFilter};
use polygate_core::{ConfError, Flow, Plugin, PluginError, PluginFactory, RequestCtx};
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

/// Largest body copied.
const MAX_COPY: usize = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    host: String,
    path: Option<String>,
    #[serde(default = "replace")]
    path_concat_mode: String,
    #[serde(default = "one")]
    sample_ratio: f64,
}

fn replace() -> String {
    "replace".into()
}
fn one() -> f64 {
    1.0
}

struct Mirror {
    target: String,
    authority: String,
    path: Option<String>,
    prefix: bool,
    ratio: f64,
}

/// Factory of `proxy-mirror`.
pub struct ProxyMirrorFactory;

impl PluginFactory for ProxyMirrorFactory {
    fn name(&self) -> &str {
        "proxy-mirror"
    }
    fn priority(&self) -> i32 {
        1010
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "host": {"type": "string", "pattern": "^(http(s)?|grpc(s)?)://([\\da-zA-Z.-]+|\\[[\\da-fA-F:]+\\])(:\\d+)?$"},
            "path": {"type": "string", "pattern": "^/[^?&]+$"},
            "path_concat_mode": {"type": "string", "default": "replace", "enum": ["replace", "prefix"]},
            "sample_ratio": {"type": "number", "minimum": 0.00001, "maximum": 1, "default": 1},
            "_meta": {"type": "object"}
        }, "required": ["host"], "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let authority = c
            .host
            .split_once("://")
            .map(|(_, a)| a)
            .ok_or_else(|| ConfError::at("host", "must be http[s]://host[:port]"))?;
        if authority.is_empty() || authority.contains(['/', '?', '@', '#']) {
            return Err(ConfError::at(
                "host",
                "must be http[s]://host[:port] without a path",
            ));
        }
        let (target, authority, _) = crate::util::callout_target(&c.host, true).map_err(|e| {
            ConfError::at(
                "host",
                format!("{e} (proxy-mirror takes http and https hosts)"),
            )
        })?;
        if let Some(p) = &c.path
            && (!p.starts_with('/') || p.len() < 2 || p.contains(['?', '&']))
        {
            return Err(ConfError::at("path", "must be /path without a query"));
        }
        let prefix = match c.path_concat_mode.as_str() {
            "replace" => false,
            "prefix" => true,
            other => {
                return Err(ConfError::at(
                    "path_concat_mode",
                    format!("matches none of the enum values: {other:?}"),
                ));
            }
        };
        if !(0.00001..=1.0).contains(&c.sample_ratio) {
            return Err(ConfError::at("sample_ratio", "must be 0.00001 to 1"));
        }
        Ok(Arc::new(Mirror {
            target,
            authority,
            path: c.path,
            prefix,
            ratio: c.sample_ratio,
        }))
    }
}

/// A copy of the request, waiting for its body.
#[derive(Clone)]
struct Copy {
    req: CalloutRequest,
}

fn send(mut req: CalloutRequest, body: Bytes) {
    let Some(client) = callouts() else { return };
    req.body = body;
    let target = req.target.clone();
    let fut = client.call(req);
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::warn!("proxy-mirror: the copy to {target} failed: {e}");
                }
            });
        }
        Err(_) => tracing::warn!("proxy-mirror: no runtime to send the copy on"),
    }
}

impl Mirror {
    fn copy(&self, ctx: &RequestCtx) -> CalloutRequest {
        let uri = ctx.upstream_uri();
        let (p, q) = match uri.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (uri.into_owned(), None),
        };
        let path = match (&self.path, self.prefix) {
            (Some(m), true) => format!("{m}{p}"),
            (Some(m), false) => m.clone(),
            (None, _) => p,
        };
        let path = match q {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut headers: HeaderMap = ctx.headers.clone();
        headers.remove(http::header::TRANSFER_ENCODING);
        CalloutRequest {
            target: self.target.clone(),
            method: ctx.method.clone(),
            path,
            authority: ctx
                .header("host")
                .map_or_else(|| self.authority.clone(), str::to_owned),
            headers,
            body: Bytes::new(),
            timeout: Some(Duration::from_secs(60)),
        }
    }
}

fn has_body(ctx: &RequestCtx) -> bool {
    ctx.headers.contains_key(http::header::TRANSFER_ENCODING)
        || ctx
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

struct Tee {
    copy: Option<Copy>,
    buf: BytesMut,
}

impl ChunkFilter for Tee {
    fn on_chunk(&mut self, chunk: &mut Bytes, eof: bool) -> Result<Option<BodyWait>, PluginError> {
        if self.copy.is_some() {
            if self.buf.len() + chunk.len() > MAX_COPY {
                tracing::warn!("proxy-mirror: body over {MAX_COPY} bytes, not copied");
                self.copy = None;
                self.buf = BytesMut::new();
            } else {
                self.buf.extend_from_slice(chunk);
            }
        }
        if eof && let Some(c) = self.copy.take() {
            send(c.req, std::mem::take(&mut self.buf).freeze());
        }
        Ok(None)
    }
}

impl Plugin for Mirror {
    fn name(&self) -> &str {
        "proxy-mirror"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.ratio < 1.0 && fastrand::f64() >= self.ratio {
            return Flow::Continue;
        }
        let req = self.copy(ctx);
        if let Some(b) = ctx.body.clone() {
            // another plugin buffered the body already
            send(req, b);
        } else if has_body(ctx) {
            ctx.extensions.insert(Copy { req });
        } else {
            send(req, Bytes::new());
        }
        Flow::Continue
    }

    fn has_request_body_filter(&self) -> bool {
        true
    }

    fn request_body_filter(&self, ctx: &mut RequestCtx) -> Option<Box<dyn ChunkFilter>> {
        let copy = ctx.extensions.remove::<Copy>()?;
        Some(Box::new(Tee {
            copy: Some(copy),
            buf: BytesMut::new(),
        }))
    }
}
