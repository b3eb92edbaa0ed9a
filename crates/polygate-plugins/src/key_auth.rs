//! `key-auth` (priority 2500, auth, rewrite phase): identifies the consumer by an API key.
//!
//! Route fields as in APISIX: `header` (default `apikey`), `query` (default `apikey`),
//! `realm` (default `key`, sent in `WWW-Authenticate` with a 401), `hide_credentials`
//! (default false), `anonymous_consumer`. Consumer field: `key`. The identified consumer is
//! attached as APISIX does ([`RequestCtx::attach_consumer`]).

use std::sync::Arc;

use http::HeaderValue;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginKind, RequestCtx};
use serde::Deserialize;

use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default = "apikey")]
    header: String,
    #[serde(default = "apikey")]
    query: String,
    #[serde(default)]
    hide_credentials: bool,
    #[serde(default)]
    anonymous_consumer: Option<String>,
    #[serde(default = "default_realm")]
    realm: String,
}

fn apikey() -> String {
    "apikey".into()
}

fn default_realm() -> String {
    "key".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerConf {
    key: String,
}

struct KeyAuth {
    header: String,
    query: String,
    hide: bool,
    anonymous: Option<String>,
    /// `WWW-Authenticate` value of a 401.
    challenge: HeaderValue,
}

/// Factory of `key-auth`.
pub struct KeyAuthFactory;

impl PluginFactory for KeyAuthFactory {
    fn name(&self) -> &str {
        "key-auth"
    }

    fn priority(&self) -> i32 {
        2500
    }

    fn schema(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "header": {"type": "string", "default": "apikey"},
                "query": {"type": "string", "default": "apikey"},
                "hide_credentials": {"type": "boolean", "default": false},
                "anonymous_consumer": {"type": "string", "minLength": 1},
                "realm": {"type": "string", "default": "key"},
                "_meta": {"type": "object"}
            },
            "additionalProperties": false
        })
    }

    fn consumer_schema(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({
            "type": "object",
            "properties": {"key": {"type": "string", "minLength": 1}},
            "required": ["key"]
        }))
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Auth
    }

    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        if c.header.is_empty() || http::HeaderName::from_bytes(c.header.as_bytes()).is_err() {
            return Err(ConfError::at(
                "header",
                format!("invalid header name {:?}", c.header),
            ));
        }
        let challenge = crate::util::realm_challenge("apikey", &c.realm)?;
        Ok(Arc::new(KeyAuth {
            header: c.header.to_ascii_lowercase(),
            query: c.query,
            hide: c.hide_credentials,
            anonymous: c.anonymous_consumer,
            challenge,
        }))
    }

    fn consumer_credential(&self, conf: &serde_json::Value) -> Result<Option<String>, ConfError> {
        let c: ConsumerConf = parse_conf(conf)?;
        if c.key.is_empty() {
            return Err(ConfError::at("key", "must not be empty"));
        }
        Ok(Some(c.key))
    }
}

impl KeyAuth {
    fn unauthorized(&self, msg: &str) -> Flow<'static> {
        Flow::Respond(crate::util::unauthorized(&self.challenge, msg))
    }

    fn anonymous_or(&self, ctx: &mut RequestCtx, msg: &str) -> Flow<'static> {
        let Some(name) = &self.anonymous else {
            return self.unauthorized(msg);
        };
        // an invalid credential is not forwarded on the anonymous fallback either
        if self.hide {
            ctx.headers.remove(self.header.as_str());
            crate::util::remove_query_arg(ctx, &self.query);
        }
        if crate::util::attach_anonymous(ctx, "key-auth", name) {
            Flow::Continue
        } else {
            self.unauthorized("Invalid user authorization")
        }
    }
}

impl Plugin for KeyAuth {
    fn name(&self) -> &str {
        "key-auth"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let (key, from_header) = match ctx.header(&self.header) {
            Some(k) => (Some(k.to_owned()), true),
            None => (ctx.arg(&self.query).map(|c| c.into_owned()), false),
        };
        let Some(key) = key else {
            return self.anonymous_or(ctx, "Missing API key in request");
        };
        let Some(consumer) = ctx.consumers.find("key-auth", &key).cloned() else {
            return self.anonymous_or(ctx, "Invalid API key in request");
        };
        ctx.attach_consumer(consumer);
        if self.hide {
            if from_header {
                ctx.headers.remove(self.header.as_str());
            } else {
                crate::util::remove_query_arg(ctx, &self.query);
            }
        }
        Flow::Continue
    }
}
