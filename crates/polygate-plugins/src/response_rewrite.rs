//! `response-rewrite` (priority 899, header_filter and body_filter): changes the response.
//!
//! Fields as in APISIX: `status_code`, `body` (with `body_base64`), `headers` (`add`/`set`/
//! `remove`, or the flat form; values may reference `$var`s), `vars` (apply only when the
//! expression holds, evaluated on the response, so `status` is available), `filters`
//! (`[{regex, replace, scope: once|global, options}]` applied to the whole body; exclusive with
//! `body`), `max_resp_body_size` (default 64 MiB: the most of a body buffered for `filters`,
//! the rest is cut).
//!
//! As in APISIX (`core.response.clear_header_as_body_modified`), a replaced or filtered body
//! drops `Content-Length`, `Content-Encoding`, `Last-Modified` and `ETag`; a gzip or brotli
//! body is decoded before the filters run.

use std::sync::Arc;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use polygate_core::{ConfError, Plugin, PluginFactory, RequestCtx, ResponseHead};
use polygate_router::Expr;
use regex::Regex;
use serde::Deserialize;

use crate::util::{HeaderOps, nginx_replacement, parse_conf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default)]
    status_code: Option<u16>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_base64: bool,
    #[serde(default)]
    headers: Option<serde_json::Value>,
    #[serde(default)]
    vars: Option<serde_json::Value>,
    #[serde(default)]
    filters: Option<Vec<FilterConf>>,
    #[serde(default = "default_max_body")]
    max_resp_body_size: usize,
}

fn default_max_body() -> usize {
    64 << 20
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterConf {
    regex: String,
    replace: String,
    #[serde(default = "once")]
    scope: String,
    #[serde(default = "jo")]
    options: String,
}

fn once() -> String {
    "once".into()
}
fn jo() -> String {
    "jo".into()
}

struct Filter {
    re: Regex,
    replace: String,
    global: bool,
}

struct ResponseRewrite {
    status: Option<StatusCode>,
    body: Option<Bytes>,
    headers: HeaderOps,
    vars: Option<Expr>,
    filters: Vec<Filter>,
    max_body: usize,
}

/// Marks a response whose body the filters rewrite (set in header_filter when `vars` held),
/// with the upstream's content coding to undo first.
#[derive(Clone)]
struct Active(Option<Coding>);

#[derive(Clone, Copy)]
enum Coding {
    Gzip,
    Brotli,
    Unsupported,
}

/// Decodes `body` (at most `max` bytes of output).
fn decode(coding: Coding, body: &[u8], max: usize) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let limit = max as u64;
    let r = match coding {
        Coding::Gzip => flate2::read::MultiGzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out),
        Coding::Brotli => brotli_decompressor::Decompressor::new(body, 4096)
            .take(limit)
            .read_to_end(&mut out),
        Coding::Unsupported => return Err("unsupported content encoding".into()),
    };
    r.map(|_| out).map_err(|e| e.to_string())
}

/// Buffered body awaiting the filters.
#[derive(Default, Clone)]
struct Buffered(BytesMut);

/// Factory of `response-rewrite`.
pub struct ResponseRewriteFactory;

impl PluginFactory for ResponseRewriteFactory {
    fn name(&self) -> &str {
        "response-rewrite"
    }

    fn priority(&self) -> i32 {
        899
    }

    fn schema(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "status_code": {"type": "integer", "minimum": 200, "maximum": 598},
                "body": {"type": "string"},
                "body_base64": {"type": "boolean", "default": false},
                "headers": {"type": "object"},
                "vars": {"type": "array"},
                "filters": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "regex": {"type": "string", "minLength": 1},
                            "replace": {"type": "string"},
                            "scope": {"type": "string", "enum": ["once", "global"], "default": "once"},
                            "options": {"type": "string", "default": "jo"}
                        },
                        "required": ["regex", "replace"]
                    }
                },
                "max_resp_body_size": {"type": "integer", "minimum": 0},
                "_meta": {"type": "object"}
            },
            "additionalProperties": false
        })
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let status = match c.status_code {
            Some(s) if (200..=598).contains(&s) => Some(
                StatusCode::from_u16(s)
                    .map_err(|_| ConfError::at("status_code", "invalid status"))?,
            ),
            Some(_) => return Err(ConfError::at("status_code", "must be between 200 and 598")),
            None => None,
        };
        if c.body.is_some() && c.filters.is_some() {
            return Err(ConfError::whole(
                "\"body\" and \"filters\" are mutually exclusive",
            ));
        }
        let body = match c.body {
            Some(b) if c.body_base64 => Some(Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b.as_bytes())
                    .map_err(|e| ConfError::at("body", format!("invalid base64: {e}")))?,
            )),
            Some(b) => Some(Bytes::from(b)),
            None => None,
        };
        let headers = match &c.headers {
            Some(h) => HeaderOps::parse(h, "headers")?,
            None => HeaderOps::default(),
        };
        let vars = match &c.vars {
            Some(v) => Some(
                Expr::compile_vars(v)
                    .map_err(|e| ConfError::at(format!("vars{}", e.path), e.message))?,
            ),
            None => None,
        };
        let mut filters = Vec::new();
        for (i, f) in c.filters.unwrap_or_default().into_iter().enumerate() {
            if f.scope != "once" && f.scope != "global" {
                return Err(ConfError::at(
                    format!("filters[{i}].scope"),
                    "must be once or global",
                ));
            }
            let ci = f.options.contains('i');
            let src = if ci {
                format!("(?i){}", f.regex)
            } else {
                f.regex.clone()
            };
            let re = Regex::new(&src).map_err(|e| {
                ConfError::at(
                    format!("filters[{i}].regex"),
                    format!("invalid regex {:?}: {e}", f.regex),
                )
            })?;
            filters.push(Filter {
                re,
                replace: nginx_replacement(&f.replace),
                global: f.scope == "global",
            });
        }
        if c.max_resp_body_size < 1 {
            return Err(ConfError::at("max_resp_body_size", "must be at least 1"));
        }
        Ok(Arc::new(ResponseRewrite {
            status,
            body,
            headers,
            vars,
            filters,
            max_body: c.max_resp_body_size,
        }))
    }
}

impl Plugin for ResponseRewrite {
    fn name(&self) -> &str {
        "response-rewrite"
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        ctx.status = Some(resp.status);
        if let Some(v) = &self.vars
            && !v.eval(ctx)
        {
            return;
        }
        if let Some(s) = self.status {
            resp.status = s;
        }
        self.headers.apply(&mut resp.headers, ctx);
        if self.body.is_none() && self.filters.is_empty() {
            return;
        }
        let coding = resp
            .headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(|v| match v.trim().to_ascii_lowercase().as_str() {
                "gzip" | "x-gzip" => Coding::Gzip,
                "br" => Coding::Brotli,
                _ => Coding::Unsupported,
            });
        for h in [
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_ENCODING,
            http::header::LAST_MODIFIED,
            http::header::ETAG,
        ] {
            resp.headers.remove(h);
        }
        if let Some(b) = &self.body {
            ctx.body_override = Some(b.clone());
        } else {
            ctx.extensions.insert(Active(coding));
        }
    }

    fn has_body_filter(&self) -> bool {
        !self.filters.is_empty()
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        let Some(Active(coding)) = ctx.extensions.get::<Active>().cloned() else {
            return;
        };
        let buf = ctx.extensions.get_or_insert_default::<Buffered>();
        let room = self.max_body.saturating_sub(buf.0.len());
        buf.0.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if !eof {
            *chunk = Bytes::new();
            return;
        }
        let mut whole = std::mem::take(&mut buf.0).freeze();
        if let Some(coding) = coding {
            match decode(coding, &whole, self.max_body) {
                Ok(d) => whole = Bytes::from(d),
                Err(e) => {
                    tracing::error!("response-rewrite: filters may not work as expected: {e}");
                }
            }
        }
        let mut text = String::from_utf8_lossy(&whole).into_owned();
        for f in &self.filters {
            text = if f.global {
                f.re.replace_all(&text, f.replace.as_str()).into_owned()
            } else {
                f.re.replace(&text, f.replace.as_str()).into_owned()
            };
        }
        *chunk = Bytes::from(text);
    }
}
