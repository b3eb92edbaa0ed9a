//! `cors` (priority 4000, rewrite and header_filter phases): answers preflight `OPTIONS`
//! requests with 200 and adds the CORS response headers, with APISIX's fields: `allow_origins`
//! (`*`, `**`, one origin, or several joined by `,`), `allow_methods`, `allow_headers`
//! (`*`, `**` echoing `Access-Control-Request-Headers`, or a list), `expose_headers`,
//! `max_age` (5), `allow_credential` (refuses `*` elsewhere), `allow_origins_by_regex`,
//! `timing_allow_origins` and `timing_allow_origins_by_regex`.

use std::sync::Arc;

use http::{HeaderName, HeaderValue, StatusCode};
use polygate_core::{
    ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx, ResponseHead,
};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default = "star")]
    allow_origins: String,
    #[serde(default = "star")]
    allow_methods: String,
    #[serde(default = "star")]
    allow_headers: String,
    expose_headers: Option<String>,
    #[serde(default = "five")]
    max_age: i64,
    #[serde(default)]
    allow_credential: bool,
    allow_origins_by_regex: Option<Vec<String>>,
    allow_origins_by_metadata: Option<Vec<String>>,
    timing_allow_origins: Option<String>,
    timing_allow_origins_by_regex: Option<Vec<String>>,
}

fn star() -> String {
    "*".into()
}
fn five() -> i64 {
    5
}

struct Cors {
    origins: String,
    origins_regex: Option<Regex>,
    methods: String,
    headers: String,
    expose: Option<String>,
    max_age: String,
    credential: bool,
    timing: Option<String>,
    timing_regex: Option<Regex>,
}

#[derive(Clone)]
struct Origin(Option<String>);

/// Factory of `cors`.
pub struct CorsFactory;

fn joined_regex(list: &[String], path: &str) -> Result<Regex, ConfError> {
    if list.is_empty() {
        return Err(ConfError::at(path, "expect array to have at least 1 items"));
    }
    for (i, r) in list.iter().enumerate() {
        Regex::new(r)
            .map_err(|e| ConfError::at(format!("{path}[{i}]"), format!("invalid regex: {e}")))?;
    }
    let src = list
        .iter()
        .map(|r| format!("(?:{r})"))
        .collect::<Vec<_>>()
        .join("|");
    Regex::new(&src).map_err(|e| ConfError::at(path, e.to_string()))
}

impl PluginFactory for CorsFactory {
    fn name(&self) -> &str {
        "cors"
    }
    fn priority(&self) -> i32 {
        4000
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "allow_origins": {"type": "string", "default": "*"},
            "allow_methods": {"type": "string", "default": "*"},
            "allow_headers": {"type": "string", "default": "*"},
            "expose_headers": {"type": "string"},
            "max_age": {"type": "integer", "default": 5},
            "allow_credential": {"type": "boolean", "default": false},
            "allow_origins_by_regex": {"type": "array", "minItems": 1, "uniqueItems": true,
                "items": {"type": "string", "minLength": 1, "maxLength": 4096}},
            "allow_origins_by_metadata": {"type": "array", "minItems": 1, "uniqueItems": true,
                "items": {"type": "string", "minLength": 1, "maxLength": 4096}},
            "timing_allow_origins": {"type": "string"},
            "timing_allow_origins_by_regex": {"type": "array", "minItems": 1, "uniqueItems": true,
                "items": {"type": "string", "minLength": 1, "maxLength": 4096}},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        if c.allow_credential
            && (c.allow_origins == "*"
                || c.allow_methods == "*"
                || c.allow_headers == "*"
                || c.expose_headers.as_deref() == Some("*")
                || c.timing_allow_origins.as_deref() == Some("*"))
        {
            return Err(ConfError::whole(
                "you can not set '*' for other option when 'allow_credential' is true",
            ));
        }
        for (k, v) in [
            ("allow_origins", Some(&c.allow_origins)),
            ("timing_allow_origins", c.timing_allow_origins.as_ref()),
        ] {
            if let Some(v) = v
                && v.bytes().any(|b| b.is_ascii_control())
            {
                return Err(ConfError::at(k, "must not contain control characters"));
            }
        }
        if c.allow_origins_by_metadata.is_some() {
            tracing::warn!(
                "cors: allow_origins_by_metadata needs the plugin's metadata, which polygate \
                 does not read yet: those origins are not allowed"
            );
        }
        let methods = if c.allow_methods == "**" {
            "GET,POST,PUT,DELETE,PATCH,HEAD,OPTIONS,CONNECT,TRACE".to_owned()
        } else {
            c.allow_methods
        };
        for (k, v) in [
            ("allow_methods", &methods),
            ("allow_headers", &c.allow_headers),
        ] {
            if HeaderValue::from_str(v).is_err() {
                return Err(ConfError::at(k, "not a valid header value"));
            }
        }
        Ok(Arc::new(Cors {
            origins: c.allow_origins,
            origins_regex: c
                .allow_origins_by_regex
                .as_deref()
                .map(|l| joined_regex(l, "allow_origins_by_regex"))
                .transpose()?,
            methods,
            headers: c.allow_headers,
            expose: c.expose_headers.filter(|e| !e.is_empty()),
            max_age: c.max_age.to_string(),
            credential: c.allow_credential,
            timing: c.timing_allow_origins,
            timing_regex: c
                .timing_allow_origins_by_regex
                .as_deref()
                .map(|l| joined_regex(l, "timing_allow_origins_by_regex"))
                .transpose()?,
        }))
    }
}

/// The allowed origin from a list (`*`, `**`, one, or several joined by `,`).
fn from_list(list: &str, origin: Option<&str>) -> Option<String> {
    let list = if list == "**" {
        origin.unwrap_or("*")
    } else {
        list
    };
    if list.contains(',') {
        let o = origin?;
        return list.split(',').any(|x| x == o).then(|| o.to_owned());
    }
    Some(list.to_owned())
}

fn from_regex(re: &Regex, origin: Option<&str>) -> Option<String> {
    let o = origin?;
    re.is_match(o).then(|| o.to_owned())
}

fn set(resp: &mut ResponseHead, name: &'static str, v: &str) {
    if let Ok(v) = HeaderValue::from_str(v) {
        resp.headers.insert(HeaderName::from_static(name), v);
    }
}

impl Plugin for Cors {
    fn name(&self) -> &str {
        "cors"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let origin = ctx.header("origin").map(str::to_owned);
        ctx.extensions.insert(Origin(origin));
        if ctx.method == http::Method::OPTIONS {
            return Flow::Respond(PluginResponse::new(StatusCode::OK, ""));
        }
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        let origin = ctx.extensions.get::<Origin>().and_then(|o| o.0.clone());
        let origin = origin.as_deref();
        let allowed = match &self.origins_regex {
            Some(re) => from_regex(re, origin),
            None => from_list(&self.origins, origin),
        };
        if self.origins != "*" {
            resp.headers
                .append(http::header::VARY, HeaderValue::from_static("Origin"));
        }
        if let Some(a) = &allowed {
            set(resp, "access-control-allow-origin", a);
            set(resp, "access-control-allow-methods", &self.methods);
            set(resp, "access-control-max-age", &self.max_age);
            if let Some(e) = &self.expose {
                set(resp, "access-control-expose-headers", e);
            }
            if self.headers == "**" {
                match ctx.header("access-control-request-headers") {
                    Some(h) => set(resp, "access-control-allow-headers", h),
                    None => {
                        resp.headers.remove("access-control-allow-headers");
                    }
                }
            } else {
                set(resp, "access-control-allow-headers", &self.headers);
            }
            if self.credential {
                set(resp, "access-control-allow-credentials", "true");
            }
        }
        let timing = match (&self.timing_regex, &self.timing) {
            (Some(re), _) => from_regex(re, origin),
            (None, Some(list)) => from_list(list, origin),
            _ => None,
        };
        if let Some(t) = timing
            && (t == "*" || Some(t.as_str()) == origin)
        {
            set(resp, "timing-allow-origin", &t);
        }
    }
}
