//! `proxy-rewrite` (priority 1008, rewrite phase): changes what is sent upstream.
//!
//! Fields as in APISIX: `uri` (with `$var` references; the original query is kept unless the
//! new URI has one), `regex_uri` (`[regex, replacement, ...]` applied to the path, first match
//! wins), `method`, `host` (Host header sent upstream), `headers` (`add`/`set`/`remove`, or the
//! flat `{name: value}` form), `use_real_request_uri_unsafe`.

use std::sync::Arc;

use http::{HeaderValue, Method};
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, RequestCtx};
use regex::Regex;
use serde::Deserialize;

use crate::util::{HeaderOps, Template, nginx_replacement, parse_conf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    regex_uri: Option<Vec<String>>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: Option<serde_json::Value>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    use_real_request_uri_unsafe: bool,
}

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "MKCOL", "COPY", "MOVE", "PROPFIND", "LOCK",
    "UNLOCK", "PATCH", "TRACE",
];

struct ProxyRewrite {
    uri: Option<Template>,
    regex_uri: Vec<(Regex, String)>,
    method: Option<Method>,
    host: Option<HeaderValue>,
    headers: HeaderOps,
    real_uri: bool,
}

/// Factory of `proxy-rewrite`.
pub struct ProxyRewriteFactory;

impl PluginFactory for ProxyRewriteFactory {
    fn name(&self) -> &str {
        "proxy-rewrite"
    }

    fn priority(&self) -> i32 {
        1008
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let mut regex_uri = Vec::new();
        if let Some(r) = &c.regex_uri {
            if r.len() < 2 || r.len() % 2 != 0 {
                return Err(ConfError::at(
                    "regex_uri",
                    "must hold pairs of [regex, replacement]",
                ));
            }
            for (i, pair) in r.chunks(2).enumerate() {
                let re = Regex::new(&pair[0]).map_err(|e| {
                    ConfError::at(
                        format!("regex_uri[{}]", i * 2),
                        format!("invalid regex {:?}: {e}", pair[0]),
                    )
                })?;
                regex_uri.push((re, nginx_replacement(&pair[1])));
            }
        }
        let method = match &c.method {
            Some(m) if METHODS.contains(&m.as_str()) => Some(
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| ConfError::at("method", format!("invalid method {m:?}")))?,
            ),
            Some(m) => {
                return Err(ConfError::at(
                    "method",
                    format!("{m:?} must be one of {}", METHODS.join(", ")),
                ));
            }
            None => None,
        };
        let host = match &c.host {
            Some(h) => Some(
                HeaderValue::from_str(h)
                    .map_err(|_| ConfError::at("host", format!("invalid host {h:?}")))?,
            ),
            None => None,
        };
        if let Some(u) = &c.uri
            && (u.is_empty() || u.len() > 4096)
        {
            return Err(ConfError::at("uri", "length must be between 1 and 4096"));
        }
        if let Some(s) = &c.scheme
            && s != "http"
            && s != "https"
        {
            return Err(ConfError::at("scheme", "must be http or https"));
        }
        let headers = match &c.headers {
            Some(h) => HeaderOps::parse(h, "headers")?,
            None => HeaderOps::default(),
        };
        Ok(Arc::new(ProxyRewrite {
            uri: c.uri.as_deref().map(Template::parse),
            regex_uri,
            method,
            host,
            headers,
            real_uri: c.use_real_request_uri_unsafe,
        }))
    }
}

impl Plugin for ProxyRewrite {
    fn name(&self) -> &str {
        "proxy-rewrite"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.real_uri {
            let (p, q) = match ctx.request_uri.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (ctx.request_uri.clone(), None),
            };
            ctx.path = p;
            ctx.query = q;
        } else if let Some(t) = &self.uri {
            let new = t.render(ctx);
            match new.split_once('?') {
                Some((p, q)) => {
                    ctx.path = p.to_owned();
                    ctx.query = Some(q.to_owned());
                }
                None => ctx.path = new,
            }
        } else {
            for (re, rep) in &self.regex_uri {
                if re.is_match(&ctx.path) {
                    let new = re.replace(&ctx.path, rep.as_str()).into_owned();
                    match new.split_once('?') {
                        Some((p, q)) => {
                            ctx.path = p.to_owned();
                            ctx.query = Some(q.to_owned());
                        }
                        None => ctx.path = new,
                    }
                    break;
                }
            }
        }
        if let Some(m) = &self.method {
            ctx.method = m.clone();
        }
        if let Some(h) = &self.host {
            ctx.upstream_host = Some(h.clone());
        }
        if !self.headers.is_empty() {
            let mut headers = std::mem::take(&mut ctx.headers);
            self.headers.apply(&mut headers, ctx);
            ctx.headers = headers;
        }
        Flow::Continue
    }
}
