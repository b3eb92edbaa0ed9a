//! `response-rewrite` (priority 899, header_filter and body_filter): changes the response.
//!
//! Fields as in APISIX: `status_code`, `body` (with `body_base64`), `headers` (`add`/`set`/
//! `remove`, or the flat form; values may reference `$var`s), `vars` (apply only when the
//! expression holds, evaluated on the response, so `status` is available), `filters`
//! (`[{regex, replace, scope: once|global, options}]` applied to the whole body; exclusive with
//! `body`).

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
}

/// Marks a response whose body the filters rewrite (set in header_filter when `vars` held).
#[derive(Clone)]
struct Active;

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
        Ok(Arc::new(ResponseRewrite {
            status,
            body,
            headers,
            vars,
            filters,
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
        if let Some(b) = &self.body {
            ctx.body_override = Some(b.clone());
            resp.headers.remove(http::header::CONTENT_LENGTH);
            resp.headers.remove(http::header::CONTENT_ENCODING);
        }
        if !self.filters.is_empty() {
            ctx.extensions.insert(Active);
            resp.headers.remove(http::header::CONTENT_LENGTH);
        }
    }

    fn has_body_filter(&self) -> bool {
        !self.filters.is_empty()
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        if ctx.extensions.get::<Active>().is_none() {
            return;
        }
        let buf = ctx.extensions.get_or_insert_default::<Buffered>();
        buf.0.extend_from_slice(chunk);
        if !eof {
            *chunk = Bytes::new();
            return;
        }
        let whole = std::mem::take(&mut buf.0).freeze();
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
