//! `basic-auth` (priority 2520, auth, rewrite phase): identifies the consumer by HTTP Basic
//! credentials (RFC 7617).
//!
//! Route fields as in APISIX: `hide_credentials` (default false), `realm` (default `basic`,
//! sent in `WWW-Authenticate` with a 401), `anonymous_consumer`. Consumer fields: `username`,
//! `password`. Answers: 401 `{"message":"Missing authorization in request"}`,
//! `"Invalid authorization in request"` (not Basic, not base64, no colon) and
//! `"Invalid user authorization"` (unknown user or wrong password, which are not told apart).

use std::sync::Arc;

use base64::Engine as _;
use http::HeaderValue;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginKind, RequestCtx};
use serde::Deserialize;

use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default)]
    hide_credentials: bool,
    #[serde(default = "default_realm")]
    realm: String,
    anonymous_consumer: Option<String>,
}

fn default_realm() -> String {
    "basic".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerConf {
    username: String,
    #[serde(rename = "password")]
    _password: String,
}

struct BasicAuth {
    hide: bool,
    anonymous: Option<String>,
    challenge: HeaderValue,
}

/// Factory of `basic-auth`.
pub struct BasicAuthFactory;

impl PluginFactory for BasicAuthFactory {
    fn name(&self) -> &str {
        "basic-auth"
    }

    fn priority(&self) -> i32 {
        2520
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Auth
    }

    fn schema(&self) -> serde_json::Value {
        serde_json::json!({"type": "object", "properties": {
            "hide_credentials": {"type": "boolean", "default": false},
            "realm": {"type": "string", "default": "basic"},
            "anonymous_consumer": {"type": "string", "minLength": 1},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }

    fn consumer_schema(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"type": "object", "properties": {
            "username": {"type": "string"}, "password": {"type": "string"}
        }, "required": ["username", "password"]}))
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let challenge = crate::util::realm_challenge("Basic", &c.realm)?;
        Ok(Arc::new(BasicAuth {
            hide: c.hide_credentials,
            anonymous: c.anonymous_consumer,
            challenge,
        }))
    }

    fn consumer_credential(&self, conf: &serde_json::Value) -> Result<Option<String>, ConfError> {
        let c: ConsumerConf = parse_conf(conf)?;
        if c.username.is_empty() {
            return Err(ConfError::at("username", "must not be empty"));
        }
        Ok(Some(c.username))
    }
}

/// `Authorization: Basic base64(user:password)` → (user, password).
fn parse_basic(h: &str) -> Option<(String, String)> {
    let (scheme, rest) = h.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

impl BasicAuth {
    fn unauthorized(&self, msg: &str) -> Flow<'static> {
        Flow::Respond(crate::util::unauthorized(&self.challenge, msg))
    }

    fn anonymous_or(&self, ctx: &mut RequestCtx, msg: &str) -> Flow<'static> {
        let Some(name) = &self.anonymous else {
            return self.unauthorized(msg);
        };
        if self.hide {
            ctx.headers.remove(http::header::AUTHORIZATION);
        }
        if crate::util::attach_anonymous(ctx, "basic-auth", name) {
            Flow::Continue
        } else {
            self.unauthorized("Invalid user authorization")
        }
    }
}

impl Plugin for BasicAuth {
    fn name(&self) -> &str {
        "basic-auth"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let Some(h) = ctx.header("authorization") else {
            return self.anonymous_or(ctx, "Missing authorization in request");
        };
        let Some((user, password)) = parse_basic(h) else {
            tracing::warn!("basic-auth: invalid authorization header format");
            return self.anonymous_or(ctx, "Invalid authorization in request");
        };
        let Some(consumer) = ctx.consumers.find("basic-auth", &user).cloned() else {
            tracing::warn!("basic-auth: failed to find user {user:?}");
            return self.anonymous_or(ctx, "Invalid user authorization");
        };
        let stored = consumer
            .auth_confs
            .get("basic-auth")
            .and_then(|c| c.get("password"))
            .and_then(|p| p.as_str())
            .unwrap_or("");
        if !crate::util::ct_eq(stored.as_bytes(), password.as_bytes()) {
            return self.anonymous_or(ctx, "Invalid user authorization");
        }
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
    fn basic_header() {
        // "foo:bar"
        assert_eq!(
            parse_basic("Basic Zm9vOmJhcg=="),
            Some(("foo".into(), "bar".into()))
        );
        // RFC 7617: the password may hold colons ("a:b:c")
        assert_eq!(
            parse_basic("basic YTpiOmM="),
            Some(("a".into(), "b:c".into()))
        );
        assert_eq!(parse_basic("Bearer Zm9vOmJhcg=="), None);
        assert_eq!(parse_basic("Basic !!!"), None);
        assert_eq!(parse_basic("Basic Zm9v"), None, "no colon");
        assert!(
            crate::util::ct_eq(b"abc", b"abc")
                && !crate::util::ct_eq(b"abc", b"abd")
                && !crate::util::ct_eq(b"a", b"ab")
        );
    }
}
