//! `forward-auth` (priority 2002, access phase): asks an external authorization service
//! whether the request may pass. A 2xx answer lets it through (copying `upstream_headers` of
//! the answer onto the request); any other status is sent to the client with the service's
//! body and its `client_headers`.
//!
//! Fields as in APISIX: `uri` (http or https), `ssl_verify` (true), `request_method` (`GET` or
//! `POST`, which forwards the body up to `max_req_body_size`), `request_headers`,
//! `extra_headers` (values may hold `$var`s), `upstream_headers`, `client_headers`, `timeout`
//! (3000 ms), `allow_degradation`, `status_on_error` (403), `keepalive*`. The service gets
//! `X-Forwarded-Proto`, `-Method`, `-Host`, `-Uri` and `-For`. Requests go through polygate's
//! own upstream client (pooled, HTTP/1.1).

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use polygate_core::callout::{CalloutRequest, callouts};
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use polygate_router::VarSource;
use serde::Deserialize;
use serde_json::Value;

use crate::util::{Template, parse_conf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    uri: String,
    #[serde(default)]
    allow_degradation: bool,
    #[serde(default = "d403")]
    status_on_error: u16,
    #[serde(default = "yes")]
    ssl_verify: bool,
    #[serde(default = "get")]
    request_method: String,
    #[serde(default = "d64m")]
    max_req_body_size: usize,
    #[serde(default)]
    request_headers: Vec<String>,
    extra_headers: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    upstream_headers: Vec<String>,
    #[serde(default)]
    client_headers: Vec<String>,
    #[serde(default = "d3000")]
    timeout: u64,
    #[serde(default = "yes")]
    keepalive: bool,
    keepalive_timeout: Option<u64>,
    keepalive_pool: Option<u64>,
}

fn d403() -> u16 {
    403
}
fn yes() -> bool {
    true
}
fn get() -> String {
    "GET".into()
}
fn d64m() -> usize {
    67_108_864
}
fn d3000() -> u64 {
    3000
}

fn names(list: &[String], path: &str) -> Result<Vec<HeaderName>, ConfError> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| ConfError::at(format!("{path}[{i}]"), "invalid header name"))
        })
        .collect()
}

struct ForwardAuth {
    target: String,
    authority: String,
    path: String,
    post: Option<usize>,
    degrade: bool,
    on_error: StatusCode,
    request_headers: Vec<HeaderName>,
    extra: Vec<(HeaderName, Template)>,
    upstream_headers: Vec<HeaderName>,
    client_headers: Vec<HeaderName>,
    timeout: Duration,
}

/// Factory of `forward-auth`.
pub struct ForwardAuthFactory;

impl PluginFactory for ForwardAuthFactory {
    fn name(&self) -> &str {
        "forward-auth"
    }
    fn priority(&self) -> i32 {
        2002
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "uri": {"type": "string"},
            "allow_degradation": {"type": "boolean", "default": false},
            "status_on_error": {"type": "integer", "minimum": 200, "maximum": 599, "default": 403},
            "ssl_verify": {"type": "boolean", "default": true},
            "request_method": {"type": "string", "default": "GET", "enum": ["GET", "POST"]},
            "max_req_body_size": {"type": "integer", "minimum": 1, "default": 67108864},
            "request_headers": {"type": "array", "default": [], "items": {"type": "string"}},
            "extra_headers": {"type": "object", "minProperties": 1},
            "upstream_headers": {"type": "array", "default": [], "items": {"type": "string"}},
            "client_headers": {"type": "array", "default": [], "items": {"type": "string"}},
            "timeout": {"type": "integer", "minimum": 1, "maximum": 60000, "default": 3000},
            "keepalive": {"type": "boolean", "default": true},
            "keepalive_timeout": {"type": "integer", "minimum": 1000, "default": 60000},
            "keepalive_pool": {"type": "integer", "minimum": 1, "default": 5},
            "_meta": {"type": "object"}
        }, "required": ["uri"], "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let (target, authority, path) = crate::util::callout_target(&c.uri, c.ssl_verify)
            .map_err(|e| ConfError::at("uri", e))?;
        let on_error = crate::util::status(c.status_on_error, "status_on_error")?;
        let post = match c.request_method.as_str() {
            "GET" => None,
            "POST" => Some(c.max_req_body_size.max(1)),
            other => {
                return Err(ConfError::at(
                    "request_method",
                    format!("matches none of the enum values: {other:?}"),
                ));
            }
        };
        if !(1..=60_000).contains(&c.timeout) {
            return Err(ConfError::at("timeout", "must be 1 to 60000"));
        }
        let _ = (c.keepalive, c.keepalive_timeout, c.keepalive_pool);
        let mut extra = Vec::new();
        for (k, v) in c.extra_headers.iter().flatten() {
            let n = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| ConfError::at(format!("extra_headers.{k}"), "invalid header name"))?;
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => {
                    return Err(ConfError::at(
                        format!("extra_headers.{k}"),
                        "must be a string",
                    ));
                }
            };
            extra.push((n, Template::parse(&text)));
        }
        Ok(Arc::new(ForwardAuth {
            target,
            authority,
            path,
            post,
            degrade: c.allow_degradation,
            on_error,
            request_headers: names(&c.request_headers, "request_headers")?,
            extra,
            upstream_headers: names(&c.upstream_headers, "upstream_headers")?,
            client_headers: names(&c.client_headers, "client_headers")?,
            timeout: Duration::from_millis(c.timeout),
        }))
    }
}

impl ForwardAuth {
    fn request(&self, ctx: &RequestCtx) -> CalloutRequest {
        let mut h = HeaderMap::new();
        let mut put = |name: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        put("x-forwarded-proto", ctx.scheme);
        put("x-forwarded-method", ctx.method.as_str());
        put("x-forwarded-host", ctx.host.as_deref().unwrap_or(""));
        put(
            "x-forwarded-uri",
            &ctx.var("request_uri").unwrap_or_default(),
        );
        put("x-forwarded-for", &ctx.client_addr.ip().to_string());
        if self.post.is_some()
            && let Some(v) = ctx.headers.get(http::header::CONTENT_ENCODING)
        {
            h.insert(http::header::CONTENT_ENCODING, v.clone());
        }
        for (n, t) in &self.extra {
            if let Ok(v) = HeaderValue::from_str(&t.render(ctx)) {
                h.insert(n.clone(), v);
            }
        }
        for n in &self.request_headers {
            if !h.contains_key(n)
                && let Some(v) = ctx.headers.get(n)
            {
                h.insert(n.clone(), v.clone());
            }
        }
        CalloutRequest {
            target: self.target.clone(),
            method: if self.post.is_some() {
                Method::POST
            } else {
                Method::GET
            },
            path: self.path.clone(),
            authority: self.authority.clone(),
            headers: h,
            body: if self.post.is_some() {
                ctx.body.clone().unwrap_or_default()
            } else {
                Default::default()
            },
            timeout: Some(self.timeout),
        }
    }
}

impl Plugin for ForwardAuth {
    fn name(&self) -> &str {
        "forward-auth"
    }

    fn wants_body(&self) -> Option<usize> {
        self.post
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let Some(client) = callouts() else {
            return Flow::Respond(PluginResponse::status_page(self.on_error));
        };
        let fut = client.call(self.request(ctx));
        Flow::Pending(Box::pin(async move {
            let res = match fut.await {
                Ok(r) => r,
                Err(e) if self.degrade => {
                    tracing::warn!("forward-auth: {e}; allow_degradation lets the request pass");
                    return Ok(None);
                }
                Err(e) => {
                    tracing::warn!("failed to process forward auth, err: {e}");
                    return Ok(Some(PluginResponse::status_page(self.on_error)));
                }
            };
            if res.status.as_u16() >= 300 {
                let mut r = PluginResponse::new(res.status, res.body);
                for n in &self.client_headers {
                    for v in res.headers.get_all(n) {
                        r.headers.append(n.clone(), v.clone());
                    }
                }
                return Ok(Some(r));
            }
            for n in &self.upstream_headers {
                match res.headers.get(n) {
                    Some(v) => {
                        ctx.headers.insert(n.clone(), v.clone());
                    }
                    None => {
                        ctx.headers.remove(n);
                    }
                }
            }
            Ok(None)
        }))
    }
}
