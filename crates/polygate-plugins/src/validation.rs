//! `request-validation` (priority 2800, rewrite phase): checks the request's headers and body
//! against JSON Schemas before it goes upstream, as APISIX does: `header_schema` (the headers
//! as an object, lower-case names), `body_schema` (the JSON body, or the form fields of an
//! `application/x-www-form-urlencoded` body), `max_req_body_size` (64 MiB),
//! `rejected_code` (400), `rejected_msg`. A JSON body that passes is sent upstream
//! re-encoded, so that the upstream parses exactly what was checked; a request with two
//! `Content-Type` fields is refused.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jsonschema::Schema;
use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    header_schema: Option<Value>,
    body_schema: Option<Value>,
    #[serde(default = "d64m")]
    max_req_body_size: usize,
    #[serde(default = "d400")]
    rejected_code: u16,
    rejected_msg: Option<String>,
}

fn d64m() -> usize {
    67_108_864
}
fn d400() -> u16 {
    400
}

struct RequestValidation {
    headers: Option<Schema>,
    body: Option<Schema>,
    max: usize,
    status: StatusCode,
    msg: Option<String>,
}

/// Factory of `request-validation`.
pub struct RequestValidationFactory;

impl PluginFactory for RequestValidationFactory {
    fn name(&self) -> &str {
        "request-validation"
    }
    fn priority(&self) -> i32 {
        2800
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "header_schema": {"type": "object"},
            "body_schema": {"type": "object"},
            "max_req_body_size": {"type": "integer", "minimum": 1, "default": 67108864},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 400},
            "rejected_msg": {"type": "string", "minLength": 1, "maxLength": 256},
            "_meta": {"type": "object"}
        }, "anyOf": [{"required": ["header_schema"]}, {"required": ["body_schema"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        if c.header_schema.is_none() && c.body_schema.is_none() {
            return Err(ConfError::whole(
                "object matches none of the required: [\"header_schema\"] or [\"body_schema\"]",
            ));
        }
        let compile = |v: &Option<Value>, k: &str| -> Result<Option<Schema>, ConfError> {
            match v {
                None => Ok(None),
                Some(s) if !s.is_object() => Err(ConfError::at(k, "must be an object")),
                Some(s) => Schema::compile(s)
                    .map(Some)
                    .map_err(|e| ConfError::at(k, format!("invalid JSON Schema: {e}"))),
            }
        };
        let rejected_status = crate::util::status(c.rejected_code, "rejected_code")?;
        if let Some(m) = &c.rejected_msg
            && (m.is_empty() || m.len() > 256)
        {
            return Err(ConfError::at("rejected_msg", "must be 1 to 256 characters"));
        }
        if c.max_req_body_size < 1 {
            return Err(ConfError::at("max_req_body_size", "must be at least 1"));
        }
        Ok(Arc::new(RequestValidation {
            headers: compile(&c.header_schema, "header_schema")?,
            body: compile(&c.body_schema, "body_schema")?,
            max: c.max_req_body_size,
            status: rejected_status,
            msg: c.rejected_msg,
        }))
    }
}

/// Form fields as an object (a repeated field is an array).
fn form_object(body: &[u8]) -> Value {
    let mut m = Map::new();
    for pair in body.split(|b| *b == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], Value::String(decode(&pair[i + 1..]))),
            None => (pair, Value::Bool(true)),
        };
        let k = decode(k);
        match m.get_mut(&k) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => *prev = Value::Array(vec![prev.clone(), v]),
            None => {
                m.insert(k, v);
            }
        }
    }
    Value::Object(m)
}

fn decode(b: &[u8]) -> String {
    String::from_utf8_lossy(&polygate_core::ctx::percent_decode(b)).into_owned()
}

impl RequestValidation {
    fn reject(&self, err: &str) -> Flow<'static> {
        tracing::error!("request-validation: req schema validation failed: {err}");
        Flow::Respond(PluginResponse::new(
            self.status,
            self.msg.clone().unwrap_or_else(|| err.to_owned()),
        ))
    }
}

impl Plugin for RequestValidation {
    fn name(&self) -> &str {
        "request-validation"
    }

    fn wants_body(&self) -> Option<usize> {
        self.body.as_ref().map(|_| self.max)
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if let Some(s) = &self.headers {
            let h = crate::util::headers_object(&ctx.headers);
            if let Err(e) = s.check(&h) {
                return self.reject(&e);
            }
        }
        let Some(s) = &self.body else {
            return Flow::Continue;
        };
        let types: Vec<&[u8]> = ctx
            .headers
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if types.len() > 1 {
            tracing::error!("request-validation: duplicated Content-Type header");
            return Flow::Respond(PluginResponse::new(
                self.status,
                self.msg.clone().unwrap_or_default(),
            ));
        }
        let body = ctx.body.clone().unwrap_or_default();
        let form = types.first().is_some_and(|t| {
            t.len() >= 33 && t[..33].eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
        });
        let value = if form {
            form_object(&body)
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => v,
                Err(e) => return self.reject(&format!("invalid JSON type: {e}")),
            }
        };
        if let Err(e) = s.check(&value) {
            return self.reject(&e);
        }
        if !form {
            // what goes upstream is exactly what was checked (no duplicate keys, no
            // number or escape the upstream's parser reads differently)
            ctx.body = Some(Bytes::from(value.to_string()));
        }
        Flow::Continue
    }
}
