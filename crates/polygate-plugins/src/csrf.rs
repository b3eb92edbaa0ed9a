//! `csrf` (priority 2980, access and header_filter phases): double-submit cookie protection
//! as APISIX does it. Every response sets a signed token cookie (`name`, default
//! `apisix-csrf-token`, valid `expires` seconds, default 7200); a request with an unsafe method
//! (not GET, HEAD or OPTIONS) must send the same token in a header of that name, and the token's
//! signature (SHA-256 of its expiry, random part and the `key`) must hold. Tokens made by
//! APISIX with the same key verify here, and the other way round.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderValue, Method, StatusCode};
use polygate_core::text::lua_number;
use polygate_core::{
    ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx, ResponseHead,
};
use serde::Deserialize;
use serde_json::Value;

use crate::util::ct_eq;
use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    key: String,
    #[serde(default = "d7200")]
    expires: i64,
    #[serde(default = "token_name")]
    name: String,
}

fn d7200() -> i64 {
    7200
}
fn token_name() -> String {
    "apisix-csrf-token".into()
}

struct Csrf {
    key: String,
    expires: i64,
    name: String,
}

/// Factory of `csrf`.
pub struct CsrfFactory;

impl PluginFactory for CsrfFactory {
    fn name(&self) -> &str {
        "csrf"
    }
    fn priority(&self) -> i32 {
        2980
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "key": {"type": "string", "description": "use to generate csrf token"},
            "expires": {"type": "integer", "default": 7200},
            "name": {"type": "string", "default": "apisix-csrf-token"},
            "_meta": {"type": "object"}
        }, "required": ["key"], "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        if c.name.is_empty() || http::HeaderName::from_bytes(c.name.as_bytes()).is_err() {
            return Err(ConfError::at(
                "name",
                "must be a valid header and cookie name",
            ));
        }
        Ok(Arc::new(Csrf {
            key: c.key,
            expires: c.expires,
            name: c.name.to_ascii_lowercase(),
        }))
    }
}

fn sign(random: &str, expires: &str, key: &str) -> String {
    let s = format!("{{expires:{expires},random:{random},key:{key}}}");
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Csrf {
    fn token(&self) -> String {
        // nine decimals: the same text whether written by Rust or by Lua's %.14g
        let random = (fastrand::u64(1..1_000_000_000) as f64) / 1e9;
        let expires = polygate_core::time::unix_now();
        let r = lua_number(random);
        let e = expires.to_string();
        let body = serde_json::json!({"random": random, "expires": expires, "sign": sign(&r, &e, &self.key)});
        STANDARD.encode(body.to_string())
    }

    fn verify(&self, token: &str) -> Result<(), &'static str> {
        let raw = STANDARD
            .decode(token)
            .map_err(|_| "csrf token base64 decode error")?;
        let v: Value = serde_json::from_slice(&raw).map_err(|_| "decode token error")?;
        let random = v
            .get("random")
            .and_then(Value::as_f64)
            .ok_or("no random in token")?;
        let expires = v
            .get("expires")
            .and_then(Value::as_f64)
            .ok_or("no expires in token")?;
        if self.expires > 0
            && (polygate_core::time::unix_now() as f64) - expires > self.expires as f64
        {
            return Err("token has expired");
        }
        let want = sign(&lua_number(random), &lua_number(expires), &self.key);
        let got = v.get("sign").and_then(Value::as_str).unwrap_or("");
        if !ct_eq(want.as_bytes(), got.as_bytes()) {
            return Err("Invalid signatures");
        }
        Ok(())
    }
}

impl Plugin for Csrf {
    fn name(&self) -> &str {
        "csrf"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if matches!(ctx.method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return Flow::Continue;
        }
        let refuse =
            |m: &str| Flow::Respond(PluginResponse::error_msg(StatusCode::UNAUTHORIZED, m));
        let Some(header) = ctx.header(&self.name).filter(|h| !h.is_empty()) else {
            return refuse("no csrf token in headers");
        };
        let Some(cookie) = ctx.cookie(&self.name) else {
            return refuse("no csrf cookie");
        };
        if header != cookie {
            return refuse("csrf token mismatch");
        }
        if let Err(e) = self.verify(cookie) {
            tracing::error!("csrf: {e}");
            return refuse("Failed to verify the csrf token signature");
        }
        Flow::Continue
    }

    fn header_filter(&self, _ctx: &mut RequestCtx, resp: &mut ResponseHead) {
        let cookie = format!(
            "{}={};path=/;SameSite=Lax;Expires={}",
            self.name,
            self.token(),
            polygate_core::time::format_time(
                polygate_core::time::unix_now() + self.expires,
                polygate_core::time::TimeFmt::Cookie
            )
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers.append(http::header::SET_COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let c = Csrf {
            key: "userkey".into(),
            expires: 1000000000,
            name: "apisix-csrf-token".into(),
        };
        let t = c.token();
        assert!(c.verify(&t).is_ok());
        let other = Csrf {
            key: "other".into(),
            ..c
        };
        assert!(other.verify(&t).is_err());
    }
}
