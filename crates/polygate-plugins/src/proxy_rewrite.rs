//! `proxy-rewrite` (priority 1008, rewrite phase): changes what is sent upstream.
//!
//! Fields as in APISIX: `uri` (with `$var` references; the original query is kept unless the
//! new URI has one), `regex_uri` (`[regex, replacement, ...]` applied to the path, first match
//! wins), `method`, `host` (Host header sent upstream), `headers` (`add`/`set`/`remove`, or the
//! flat `{name: value}` form), `use_real_request_uri_unsafe`.

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderValue, Method};
use polygate_core::path::{escape_controls, escape_path};
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, RequestCtx};
use polygate_router::VarSource;
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

/// The request's variables plus `$0`..`$n`, the captures of the matching `regex_uri`.
struct WithCaptures<'a> {
    ctx: &'a RequestCtx,
    captures: &'a [String],
}

impl VarSource for WithCaptures<'_> {
    fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        match name.parse::<usize>() {
            Ok(i) => self.captures.get(i).map(|c| Cow::Borrowed(c.as_str())),
            Err(_) => self.ctx.var(name),
        }
    }
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

    fn schema(&self) -> serde_json::Value {
        let headers = serde_json::json!({
            "type": "object",
            "additionalProperties": {
                "oneOf": [{"type": "string"}, {"type": "number"},
                          {"type": "array", "items": {"type": "string"}}]
            }
        });
        serde_json::json!({
            "type": "object",
            "properties": {
                "uri": {"type": "string", "minLength": 1, "maxLength": 4096},
                "regex_uri": {"type": "array", "minItems": 2, "items": {"type": "string"}},
                "method": {"type": "string", "enum": METHODS},
                "host": {"type": "string"},
                "scheme": {"type": "string", "enum": ["http", "https"]},
                "headers": {
                    "type": "object",
                    "properties": {
                        "add": headers,
                        "set": headers,
                        "remove": {"type": "array", "items": {"type": "string"}}
                    }
                },
                "use_real_request_uri_unsafe": {"type": "boolean", "default": false},
                "_meta": {"type": "object"}
            },
            "additionalProperties": false
        })
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
        // APISIX's order: start from `$uri` (normalised, decoded), or from the target as
        // received with `use_real_request_uri_unsafe`; apply `uri` or the first matching
        // `regex_uri`; then percent-encode the path (a `?` in it is data unless the
        // configuration put it there) and append the request's query.
        let mut upstream_uri = if self.real_uri {
            ctx.request_uri.clone()
        } else {
            ctx.path.clone()
        };
        let real_query = if self.real_uri {
            ctx.request_uri
                .find('?')
                .map(|i| ctx.request_uri[i..].to_owned())
        } else {
            None
        };
        let mut separator_is_ours = false;
        let mut captures: Vec<String> = Vec::new();
        if let Some(t) = &self.uri {
            separator_is_ours = true;
            upstream_uri = t.render_with(ctx, |v| v.replace('?', "%3F"));
            if let Some(q) = real_query {
                if upstream_uri.contains('?') {
                    upstream_uri.push('&');
                    upstream_uri.push_str(&q[1..]);
                } else {
                    upstream_uri.push_str(&q);
                }
            }
        } else if !self.regex_uri.is_empty() {
            separator_is_ours = !upstream_uri.contains('?');
            for (re, rep) in &self.regex_uri {
                if let Some(c) = re.captures(&upstream_uri) {
                    // header values may use the captures ($1 ...), as APISIX's do
                    captures = c
                        .iter()
                        .map(|m| m.map(|m| m.as_str().to_owned()).unwrap_or_default())
                        .collect();
                    upstream_uri = re.replace(&upstream_uri, rep.as_str()).into_owned();
                    break;
                }
            }
        }
        if self.real_uri {
            ctx.upstream_target = Some(escape_controls(&upstream_uri).into_owned());
        } else {
            let split = if separator_is_ours {
                upstream_uri.find('?')
            } else {
                None
            };
            let (path, own_query) = match split {
                Some(i) => (&upstream_uri[..i], Some(&upstream_uri[i..])),
                None => (upstream_uri.as_str(), None),
            };
            let mut target = escape_path(path).into_owned();
            if let Some(q) = own_query {
                target.push_str(&escape_controls(q));
            }
            if let Some(args) = &ctx.query {
                target.push(if own_query.is_some() { '&' } else { '?' });
                target.push_str(&escape_controls(args));
            }
            ctx.path = path.to_owned();
            ctx.upstream_target = Some(target);
        }
        if let Some(m) = &self.method {
            ctx.method = m.clone();
        }
        if let Some(h) = &self.host {
            ctx.upstream_host = Some(h.clone());
        }
        if !self.headers.is_empty() {
            let ops = self.headers.render(&WithCaptures {
                ctx,
                captures: &captures,
            });
            ops.apply_to(&mut ctx.headers);
        }
        Flow::Continue
    }
}
