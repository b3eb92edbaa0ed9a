//! `hmac-auth` (priority 2530, auth, rewrite phase): identifies the consumer by an HMAC
//! signature of the request (`Authorization: Signature keyId="...",algorithm="hmac-sha256",
//! headers="@request-target date",signature="base64"`), as APISIX 3.x does.
//!
//! The signing string is the key id, then per listed header `name: value` (or
//! `@request-target` as `METHOD $request_uri`), each followed by a newline. Route fields:
//! `allowed_algorithms` (hmac-sha1, hmac-sha256, hmac-sha512), `clock_skew` (300 s, checked
//! against `Date`), `signed_headers` (`["date"]`: headers that must be signed),
//! `validate_request_body` with `max_req_body_size` (`Digest: SHA-256=base64`),
//! `hide_credentials`, `realm` (`hmac`), `anonymous_consumer`. Consumer fields: `key_id`,
//! `secret_key`.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderValue, StatusCode};
use polygate_core::{
    ConfError, Flow, Plugin, PluginFactory, PluginKind, PluginResponse, RequestCtx,
};
use polygate_router::VarSource;
use serde::Deserialize;
use serde_json::Value;

use crate::util::ct_eq;
use crate::util::parse_conf;

const ALGORITHMS: [&str; 3] = ["hmac-sha1", "hmac-sha256", "hmac-sha512"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    allowed_algorithms: Option<Vec<String>>,
    #[serde(default = "d300")]
    clock_skew: i64,
    signed_headers: Option<Vec<String>>,
    #[serde(default)]
    validate_request_body: bool,
    #[serde(default = "d64m")]
    max_req_body_size: usize,
    #[serde(default)]
    hide_credentials: bool,
    #[serde(default = "hmac")]
    realm: String,
    anonymous_consumer: Option<String>,
}

fn d300() -> i64 {
    300
}
fn d64m() -> usize {
    67_108_864
}
fn hmac() -> String {
    "hmac".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerConf {
    key_id: String,
    secret_key: String,
}

struct HmacAuth {
    algorithms: Vec<String>,
    clock_skew: i64,
    signed_headers: Vec<String>,
    body: Option<usize>,
    hide: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
}

/// Factory of `hmac-auth`.
pub struct HmacAuthFactory;

impl PluginFactory for HmacAuthFactory {
    fn name(&self) -> &str {
        "hmac-auth"
    }
    fn priority(&self) -> i32 {
        2530
    }
    fn kind(&self) -> PluginKind {
        PluginKind::Auth
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "allowed_algorithms": {"type": "array", "minItems": 1,
                "items": {"type": "string", "enum": ALGORITHMS}, "default": ALGORITHMS},
            "clock_skew": {"type": "integer", "default": 300, "minimum": 1},
            "signed_headers": {"type": "array", "default": ["date"],
                "items": {"type": "string", "minLength": 1, "maxLength": 50}},
            "validate_request_body": {"type": "boolean", "default": false},
            "max_req_body_size": {"type": "integer", "minimum": 1, "default": 67108864},
            "hide_credentials": {"type": "boolean", "default": false},
            "realm": {"type": "string", "default": "hmac"},
            "anonymous_consumer": {"type": "string", "minLength": 1},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }
    fn consumer_schema(&self) -> Option<Value> {
        Some(serde_json::json!({"type": "object", "properties": {
            "key_id": {"type": "string", "minLength": 1, "maxLength": 256},
            "secret_key": {"type": "string", "minLength": 1, "maxLength": 256}
        }, "required": ["key_id", "secret_key"]}))
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let algorithms = c
            .allowed_algorithms
            .unwrap_or_else(|| ALGORITHMS.iter().map(|s| (*s).to_owned()).collect());
        if algorithms.is_empty() {
            return Err(ConfError::at(
                "allowed_algorithms",
                "expect array to have at least 1 items",
            ));
        }
        for (i, a) in algorithms.iter().enumerate() {
            if !ALGORITHMS.contains(&a.as_str()) {
                return Err(ConfError::at(
                    format!("allowed_algorithms[{i}]"),
                    format!("matches none of the enum values: {a:?}"),
                ));
            }
        }
        if c.clock_skew < 1 {
            return Err(ConfError::at("clock_skew", "must be at least 1"));
        }
        let signed_headers = c.signed_headers.unwrap_or_else(|| vec!["date".into()]);
        for (i, h) in signed_headers.iter().enumerate() {
            if h.is_empty() || h.len() > 50 {
                return Err(ConfError::at(
                    format!("signed_headers[{i}]"),
                    "must be 1 to 50 characters",
                ));
            }
        }
        if c.max_req_body_size < 1 {
            return Err(ConfError::at("max_req_body_size", "must be at least 1"));
        }
        Ok(Arc::new(HmacAuth {
            algorithms,
            clock_skew: c.clock_skew,
            signed_headers: signed_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            body: c.validate_request_body.then_some(c.max_req_body_size),
            hide: c.hide_credentials,
            anonymous: c.anonymous_consumer,
            challenge: crate::util::realm_challenge("hmac", &c.realm)?,
        }))
    }
    fn consumer_credential(&self, conf: &Value) -> Result<Option<String>, ConfError> {
        let c: ConsumerConf = parse_conf(conf)?;
        if c.key_id.is_empty() || c.key_id.len() > 256 {
            return Err(ConfError::at("key_id", "must be 1 to 256 characters"));
        }
        if c.secret_key.is_empty() || c.secret_key.len() > 256 {
            return Err(ConfError::at("secret_key", "must be 1 to 256 characters"));
        }
        Ok(Some(c.key_id))
    }
}

/// The fields of `Authorization: Signature k="v",...`.
#[derive(Default, Debug)]
struct Params {
    key_id: Option<String>,
    algorithm: Option<String>,
    signature: Option<String>,
    headers: Vec<String>,
}

fn parse_params(auth: &str) -> Result<Params, &'static str> {
    let Some(rest) = auth.strip_prefix("Signature") else {
        return Err("Authorization header does not start with 'Signature'");
    };
    let mut p = Params::default();
    for field in rest.split(',') {
        let Some((k, v)) = field.trim().split_once('=') else {
            continue;
        };
        let Some(v) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
            continue;
        };
        match k {
            "keyId" => p.key_id = Some(v.to_owned()),
            "algorithm" => p.algorithm = Some(v.to_owned()),
            "signature" => p.signature = Some(v.to_owned()),
            "headers" => p.headers = v.split(' ').map(str::to_owned).collect(),
            _ => {}
        }
    }
    Ok(p)
}

fn sign(alg: &str, key: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
    let a = match alg {
        "hmac-sha1" => ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        "hmac-sha256" => ring::hmac::HMAC_SHA256,
        "hmac-sha512" => ring::hmac::HMAC_SHA512,
        _ => return None,
    };
    Some(
        ring::hmac::sign(&ring::hmac::Key::new(a, key), msg)
            .as_ref()
            .to_vec(),
    )
}

/// Why a request is refused: the message, and the status when it is not 401.
struct Refusal(String, Option<StatusCode>);

impl HmacAuth {
    fn validate(&self, ctx: &RequestCtx) -> Result<Arc<polygate_core::ConsumerInfo>, Refusal> {
        let plain = |m: &str| Refusal(format!("client request can't be validated: {m}"), None);
        let hidden = |m: &str| {
            tracing::warn!("hmac-auth: client request can't be validated: {m}");
            Refusal("client request can't be validated".into(), None)
        };
        let auth = ctx
            .header("authorization")
            .ok_or_else(|| plain("missing Authorization header"))?;
        let p = parse_params(auth).map_err(plain)?;
        let (Some(key_id), Some(sig)) = (&p.key_id, &p.signature) else {
            return Err(hidden("keyId or signature missing"));
        };
        let Some(alg) = &p.algorithm else {
            return Err(hidden("algorithm missing"));
        };
        let consumer = ctx
            .consumers
            .find("hmac-auth", key_id)
            .cloned()
            .ok_or_else(|| hidden("Invalid key_id"))?;
        if !self.algorithms.iter().any(|a| a == alg) {
            return Err(hidden("Invalid algorithm"));
        }
        let date = ctx.header("date");
        let Some(date) = date else {
            return Err(hidden("Date header missing. failed to validate clock skew"));
        };
        let t = polygate_core::time::parse_http_date(date)
            .ok_or_else(|| hidden("Invalid GMT format time"))?;
        if (polygate_core::time::unix_now() - t).abs() > self.clock_skew {
            return Err(hidden("Clock skew exceeded"));
        }
        for h in &self.signed_headers {
            if !p.headers.iter().any(|x| x.eq_ignore_ascii_case(h)) {
                return Err(hidden(&format!(
                    "expected header \"{h}\" missing in signing"
                )));
            }
        }
        let secret = consumer
            .auth_confs
            .get("hmac-auth")
            .and_then(|c| c.get("secret_key"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut s = String::new();
        s.push_str(key_id);
        s.push('\n');
        for h in &p.headers {
            if let Some(v) = ctx.header(h) {
                s.push_str(h);
                s.push_str(": ");
                s.push_str(v);
                s.push('\n');
            } else if h == "@request-target" {
                let uri = ctx.var("request_uri").unwrap_or_default();
                s.push_str(ctx.method.as_str());
                s.push(' ');
                s.push_str(if uri.is_empty() { "/" } else { &uri });
                s.push('\n');
            }
        }
        let want = sign(alg, secret.as_bytes(), s.as_bytes()).unwrap_or_default();
        let given = STANDARD.decode(sig).unwrap_or_default();
        if !ct_eq(&want, &given) {
            return Err(hidden("Invalid signature"));
        }
        if self.body.is_some() {
            let Some(digest) = ctx.header("digest") else {
                return Err(hidden("Invalid digest"));
            };
            let body = ctx.body.as_deref().unwrap_or(b"");
            let d = ring::digest::digest(&ring::digest::SHA256, body);
            let created = format!("SHA-256={}", STANDARD.encode(d.as_ref()));
            if !ct_eq(created.as_bytes(), digest.as_bytes()) {
                return Err(hidden("Invalid digest"));
            }
        }
        Ok(consumer)
    }
}

impl Plugin for HmacAuth {
    fn name(&self) -> &str {
        "hmac-auth"
    }

    fn wants_body(&self) -> Option<usize> {
        self.body
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let consumer = match self.validate(ctx) {
            Ok(c) => c,
            Err(Refusal(msg, Some(status))) => {
                return Flow::Respond(PluginResponse::message(status, &msg));
            }
            Err(Refusal(msg, None)) => {
                let fallback = self
                    .anonymous
                    .as_ref()
                    .map(|n| (n, ctx.consumers.by_name(n).cloned()));
                match fallback {
                    Some((_, Some(c))) => c,
                    other => {
                        let msg = if let Some((n, None)) = other {
                            tracing::error!("hmac-auth: anonymous consumer {n:?} not found");
                            "Invalid user authorization".to_owned()
                        } else {
                            msg
                        };
                        return Flow::Respond(crate::util::unauthorized(&self.challenge, &msg));
                    }
                }
            }
        };
        if self.hide {
            ctx.headers.remove(http::header::AUTHORIZATION);
        }
        ctx.attach_consumer(consumer);
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        let p = parse_params(
            r#"Signature keyId="my-key",algorithm="hmac-sha256",headers="@request-target date",signature="abc=""#,
        )
        .unwrap();
        assert_eq!(p.key_id.as_deref(), Some("my-key"));
        assert_eq!(p.headers, ["@request-target", "date"]);
        assert!(parse_params("Basic x").is_err());
    }
}
