//! `jwt-auth` (priority 2510, auth, rewrite phase): identifies the consumer by a signed JSON
//! Web Token (RFC 7519) in a header (`Authorization: Bearer ...`), a query argument or a
//! cookie.
//!
//! Route fields as in APISIX: `header` (`authorization`), `query` (`jwt`), `cookie` (`jwt`),
//! `hide_credentials`, `key_claim_name` (`key`), `store_in_ctx`, `realm` (`jwt`),
//! `anonymous_consumer`, `claims_to_verify` (`exp`, `nbf`). Consumer fields: `key`, `secret`,
//! `public_key`, `algorithm` (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512,
//! ES256, ES384, EdDSA), `exp`, `base64_secret`, `lifetime_grace_period`. The token's `alg`
//! must be the consumer's algorithm (no `none`, no switching an RSA key into an HMAC secret).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};

use parking_lot::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::HeaderValue;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginKind, RequestCtx};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default = "authorization")]
    header: String,
    #[serde(default = "jwt")]
    query: String,
    #[serde(default = "jwt")]
    cookie: String,
    #[serde(default)]
    hide_credentials: bool,
    #[serde(default = "key")]
    key_claim_name: String,
    #[serde(default)]
    store_in_ctx: bool,
    #[serde(default = "jwt")]
    realm: String,
    anonymous_consumer: Option<String>,
    claims_to_verify: Option<Vec<String>>,
}

fn authorization() -> String {
    "authorization".into()
}
fn jwt() -> String {
    "jwt".into()
}
fn key() -> String {
    "key".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerConf {
    key: String,
    secret: Option<String>,
    public_key: Option<String>,
    private_key: Option<String>,
    #[serde(default = "hs256")]
    algorithm: String,
    #[serde(default = "day")]
    exp: i64,
    #[serde(default)]
    base64_secret: bool,
    #[serde(default)]
    lifetime_grace_period: i64,
}

fn hs256() -> String {
    "HS256".into()
}
fn day() -> i64 {
    86400
}

/// How a consumer's tokens are verified.
enum Verifier {
    Hmac(ring::hmac::Key),
    Public(&'static dyn VerificationAlgorithm, Vec<u8>),
}

/// Everything needed to check a consumer's token, built from its configuration.
struct Credential {
    alg: String,
    verifier: Verifier,
    grace: i64,
}

fn hmac_alg(alg: &str) -> Option<ring::hmac::Algorithm> {
    Some(match alg {
        "HS256" => ring::hmac::HMAC_SHA256,
        "HS384" => ring::hmac::HMAC_SHA384,
        "HS512" => ring::hmac::HMAC_SHA512,
        _ => return None,
    })
}

fn public_alg(alg: &str) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
        "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
        "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
        "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
        "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
        "PS512" => &signature::RSA_PSS_2048_8192_SHA512,
        "ES256" => &signature::ECDSA_P256_SHA256_FIXED,
        "ES384" => &signature::ECDSA_P384_SHA384_FIXED,
        "EdDSA" => &signature::ED25519,
        _ => return None,
    })
}

/// Reads one DER header at `pos`: (tag, content start, content end).
fn der_item(d: &[u8], pos: usize) -> Option<(u8, usize, usize)> {
    let tag = *d.get(pos)?;
    let first = *d.get(pos + 1)?;
    let (len, start) = if first < 0x80 {
        (usize::from(first), pos + 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*d.get(pos + 2 + i)?);
        }
        (len, pos + 2 + n)
    };
    let end = start.checked_add(len)?;
    (end <= d.len()).then_some((tag, start, end))
}

/// The key bytes ring verifies with, from a PEM public key: a `PUBLIC KEY`
/// (SubjectPublicKeyInfo: its subjectPublicKey bit string) or an `RSA PUBLIC KEY` (PKCS#1).
fn public_key_bytes(pem: &str) -> Result<Vec<u8>, String> {
    let pem = pem.trim();
    let begin = pem
        .lines()
        .next()
        .filter(|l| l.starts_with("-----BEGIN "))
        .ok_or("not a PEM key")?
        .to_owned();
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().chars())
        .collect();
    let der = STANDARD
        .decode(b64)
        .map_err(|e| format!("bad base64: {e}"))?;
    if begin.contains("RSA PUBLIC KEY") {
        return Ok(der);
    }
    if !begin.contains("PUBLIC KEY") {
        return Err(format!("expected a public key, found {begin:?}"));
    }
    let (t, s, _) = der_item(&der, 0).ok_or("bad DER")?;
    if t != 0x30 {
        return Err("bad SubjectPublicKeyInfo".into());
    }
    let (t, _, alg_end) = der_item(&der, s).ok_or("bad DER")?;
    if t != 0x30 {
        return Err("bad algorithm identifier".into());
    }
    let (t, bs, be) = der_item(&der, alg_end).ok_or("bad DER")?;
    if t != 0x03 || bs >= be || der[bs] != 0 {
        return Err("bad subjectPublicKey".into());
    }
    Ok(der[bs + 1..be].to_vec())
}

impl Credential {
    fn from_conf(c: &ConsumerConf) -> Result<Credential, ConfError> {
        let verifier = if let Some(alg) = hmac_alg(&c.algorithm) {
            let Some(secret) = c.secret.as_deref() else {
                return Err(ConfError::at(
                    "secret",
                    "property \"secret\" is required when using HS based algorithms",
                ));
            };
            let bytes = if c.base64_secret {
                STANDARD.decode(secret).map_err(|_| {
                    ConfError::at(
                        "secret",
                        "base64_secret required but the secret is not in base64 format",
                    )
                })?
            } else {
                secret.as_bytes().to_vec()
            };
            Verifier::Hmac(ring::hmac::Key::new(alg, &bytes))
        } else if let Some(alg) = public_alg(&c.algorithm) {
            let Some(pk) = c.public_key.as_deref() else {
                return Err(ConfError::at("public_key", "missing valid public key"));
            };
            let bytes = public_key_bytes(pk)
                .map_err(|e| ConfError::at("public_key", format!("invalid public key: {e}")))?;
            Verifier::Public(alg, bytes)
        } else if c.algorithm == "ES512" {
            return Err(ConfError::at(
                "algorithm",
                "ES512 (P-521) is not supported by polygate (see docs/compatibility.md)",
            ));
        } else {
            return Err(ConfError::at(
                "algorithm",
                format!("matches none of the enum values: {:?}", c.algorithm),
            ));
        };
        Ok(Credential {
            alg: c.algorithm.clone(),
            verifier,
            grace: c.lifetime_grace_period,
        })
    }

    fn verify(&self, signed: &[u8], sig: &[u8]) -> bool {
        match &self.verifier {
            Verifier::Hmac(k) => ring::hmac::verify(k, signed, sig).is_ok(),
            Verifier::Public(alg, key) => UnparsedPublicKey::new(*alg, key)
                .verify(signed, sig)
                .is_ok(),
        }
    }
}

struct JwtAuth {
    header: String,
    query: String,
    cookie: String,
    hide: bool,
    claim: String,
    store: bool,
    anonymous: Option<String>,
    claims: Option<Vec<String>>,
    challenge: HeaderValue,
}

/// The verified token's payload, for plugins after jwt-auth (`store_in_ctx`).
#[derive(Clone)]
pub struct JwtPayload(pub Arc<Value>);

/// Factory of `jwt-auth`.
pub struct JwtAuthFactory;

impl PluginFactory for JwtAuthFactory {
    fn name(&self) -> &str {
        "jwt-auth"
    }

    fn priority(&self) -> i32 {
        2510
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Auth
    }

    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "header": {"type": "string", "default": "authorization"},
            "query": {"type": "string", "default": "jwt"},
            "cookie": {"type": "string", "default": "jwt"},
            "hide_credentials": {"type": "boolean", "default": false},
            "key_claim_name": {"type": "string", "default": "key", "minLength": 1},
            "store_in_ctx": {"type": "boolean", "default": false},
            "realm": {"type": "string", "default": "jwt"},
            "anonymous_consumer": {"type": "string", "minLength": 1},
            "claims_to_verify": {"type": "array", "uniqueItems": true,
                                 "items": {"type": "string", "enum": ["exp", "nbf"]}},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }

    fn consumer_schema(&self) -> Option<Value> {
        Some(serde_json::json!({"type": "object", "properties": {
            "key": {"type": "string", "minLength": 1},
            "secret": {"type": "string", "minLength": 1},
            "public_key": {"type": "string", "minLength": 1},
            "algorithm": {"type": "string", "default": "HS256", "enum": [
                "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384",
                "PS256", "PS384", "PS512", "EdDSA"]},
            "exp": {"type": "integer", "minimum": 1, "default": 86400},
            "base64_secret": {"type": "boolean", "default": false},
            "lifetime_grace_period": {"type": "integer", "minimum": 0, "default": 0}
        }, "required": ["key"]}))
    }

    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        if c.key_claim_name.is_empty() {
            return Err(ConfError::at("key_claim_name", "must not be empty"));
        }
        if let Some(list) = &c.claims_to_verify {
            for (i, x) in list.iter().enumerate() {
                if x != "exp" && x != "nbf" {
                    return Err(ConfError::at(
                        format!("claims_to_verify[{i}]"),
                        "must be \"exp\" or \"nbf\"",
                    ));
                }
            }
        }
        let challenge = crate::util::realm_challenge("Bearer", &c.realm)?;
        Ok(Arc::new(JwtAuth {
            header: c.header.to_ascii_lowercase(),
            query: c.query,
            cookie: c.cookie,
            hide: c.hide_credentials,
            claim: c.key_claim_name,
            store: c.store_in_ctx,
            anonymous: c.anonymous_consumer,
            claims: c.claims_to_verify,
            challenge,
        }))
    }

    fn consumer_credential(&self, conf: &Value) -> Result<Option<String>, ConfError> {
        let c: ConsumerConf = parse_conf(conf)?;
        if c.key.is_empty() {
            return Err(ConfError::at("key", "must not be empty"));
        }
        if c.exp < 1 {
            return Err(ConfError::at("exp", "must be at least 1"));
        }
        if c.lifetime_grace_period < 0 {
            return Err(ConfError::at("lifetime_grace_period", "must be at least 0"));
        }
        let _ = (&c.private_key, Credential::from_conf(&c)?);
        Ok(Some(c.key))
    }
}

type CredCache = HashMap<usize, (Weak<polygate_core::ConsumerInfo>, Arc<Credential>)>;

/// Credentials built once per consumer object (a configuration commit makes new ones).
static CREDS: LazyLock<Mutex<CredCache>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn credential(consumer: &Arc<polygate_core::ConsumerInfo>) -> Result<Arc<Credential>, String> {
    let id = Arc::as_ptr(consumer) as usize;
    if let Some((w, c)) = CREDS.lock().get(&id)
        && w.upgrade().is_some_and(|x| Arc::ptr_eq(&x, consumer))
    {
        return Ok(c.clone());
    }
    let conf = consumer
        .auth_confs
        .get("jwt-auth")
        .cloned()
        .unwrap_or(Value::Null);
    let c = serde_json::from_value::<ConsumerConf>(conf).map_err(|e| e.to_string())?;
    let cred = Arc::new(Credential::from_conf(&c).map_err(|e| e.to_string())?);
    let mut cache = CREDS.lock();
    if cache.len() > 4096 {
        cache.retain(|_, (w, _)| w.strong_count() > 0);
    }
    cache.insert(id, (Arc::downgrade(consumer), cred.clone()));
    Ok(cred)
}

/// Why a token was refused (what the client is told, and what is logged).
struct Refusal {
    told: &'static str,
    why: String,
}

fn refuse(told: &'static str, why: impl Into<String>) -> Refusal {
    Refusal {
        told,
        why: why.into(),
    }
}

/// Checks `exp` and `nbf` as APISIX does: the listed claims must be present and valid; with no
/// list, those present must be valid.
fn check_claims(payload: &Value, list: Option<&[String]>, grace: i64) -> Result<(), String> {
    let defaults = ["nbf".to_owned(), "exp".to_owned()];
    let (names, required): (&[String], bool) = match list {
        Some(l) if !l.is_empty() => (l, true),
        _ => (&defaults, false),
    };
    let t = polygate_core::time::unix_now();
    for name in names {
        let Some(v) = payload.get(name) else {
            if required {
                return Err(format!("claim {name} is missing"));
            }
            continue;
        };
        let Some(n) = v.as_f64() else {
            return Err(format!("claim {name} is not a number"));
        };
        let ok = match name.as_str() {
            "nbf" => n < (t + grace) as f64,
            _ => n > (t - grace) as f64,
        };
        if !ok {
            return Err(if name == "nbf" {
                format!("'nbf' claim not valid until {n}")
            } else {
                format!("'exp' claim expired at {n}")
            });
        }
    }
    Ok(())
}

impl JwtAuth {
    /// The token, from the header, the query or the cookie (removed when hiding credentials).
    fn token(&self, ctx: &mut RequestCtx) -> Option<String> {
        if let Some(h) = ctx.header(&self.header).map(str::to_owned) {
            if self.hide {
                ctx.headers.remove(self.header.as_str());
            }
            return Some(
                match h.strip_prefix("Bearer ").or(h.strip_prefix("bearer ")) {
                    Some(t) => t.to_owned(),
                    None => h,
                },
            );
        }
        if let Some(t) = ctx.arg(&self.query).map(|c| c.into_owned()) {
            if self.hide {
                crate::util::remove_query_arg(ctx, &self.query);
            }
            return Some(t);
        }
        let c = ctx.cookie(&self.cookie)?.to_owned();
        if self.hide
            && let Some(all) = ctx.header("cookie").map(str::to_owned)
        {
            let kept: Vec<&str> = all
                .split(';')
                .map(str::trim)
                .filter(|p| p.split_once('=').map_or(*p, |(k, _)| k) != self.cookie)
                .collect();
            match HeaderValue::from_str(&kept.join("; ")) {
                Ok(v) if !kept.is_empty() => {
                    ctx.headers.insert(http::header::COOKIE, v);
                }
                _ => {
                    ctx.headers.remove(http::header::COOKIE);
                }
            }
        }
        Some(c)
    }

    fn identify(
        &self,
        ctx: &mut RequestCtx,
    ) -> Result<(Arc<polygate_core::ConsumerInfo>, Value), Refusal> {
        let token = self
            .token(ctx)
            .ok_or_else(|| refuse("Missing JWT token in request", "no token"))?;
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse("JWT token invalid", "not three segments"));
        };
        let decode = |x: &str| URL_SAFE_NO_PAD.decode(x.trim_end_matches('='));
        let header: Value = decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("JWT token invalid", "bad header"))?;
        let payload: Value = decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(Value::is_object)
            .ok_or_else(|| refuse("JWT token invalid", "bad payload"))?;
        let sig = decode(s).map_err(|_| refuse("JWT token invalid", "bad signature encoding"))?;
        let user_key = match payload.get(&self.claim) {
            Some(Value::String(k)) => k.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(refuse("missing user key in JWT token", "no key claim")),
        };
        let consumer = ctx
            .consumers
            .find("jwt-auth", &user_key)
            .cloned()
            .ok_or_else(|| {
                refuse(
                    "Invalid user key in JWT token",
                    format!("no consumer {user_key:?}"),
                )
            })?;
        let cred = credential(&consumer)
            .map_err(|e| refuse("failed to verify jwt", format!("consumer credential: {e}")))?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg != cred.alg {
            return Err(refuse(
                "failed to verify jwt",
                format!("algorithm mismatch, expected {}", cred.alg),
            ));
        }
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        if !cred.verify(signed, &sig) {
            return Err(refuse("failed to verify jwt", "signature mismatch"));
        }
        check_claims(&payload, self.claims.as_deref(), cred.grace)
            .map_err(|e| refuse("failed to verify jwt", e))?;
        Ok((consumer, payload))
    }

    fn unauthorized(&self, msg: &str) -> Flow<'static> {
        Flow::Respond(crate::util::unauthorized(&self.challenge, msg))
    }
}

impl Plugin for JwtAuth {
    fn name(&self) -> &str {
        "jwt-auth"
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        match self.identify(ctx) {
            Ok((consumer, payload)) => {
                if self.store {
                    ctx.extensions.insert(JwtPayload(Arc::new(payload)));
                }
                ctx.attach_consumer(consumer);
                Flow::Continue
            }
            Err(r) => {
                tracing::warn!("jwt-auth: {}: {}", r.told, r.why);
                let Some(name) = &self.anonymous else {
                    return self.unauthorized(r.told);
                };
                if crate::util::attach_anonymous(ctx, "jwt-auth", name) {
                    Flow::Continue
                } else {
                    self.unauthorized("Invalid user authorization")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims() {
        let t = polygate_core::time::unix_now();
        let p = serde_json::json!({"exp": t + 100, "nbf": t - 1});
        assert!(check_claims(&p, None, 0).is_ok());
        let expired = serde_json::json!({"exp": t - 10});
        assert!(check_claims(&expired, None, 0).is_err());
        assert!(check_claims(&expired, None, 60).is_ok(), "grace period");
        let none = serde_json::json!({});
        assert!(check_claims(&none, None, 0).is_ok());
        assert!(check_claims(&none, Some(&["exp".to_owned()]), 0).is_err());
        assert!(check_claims(&serde_json::json!({"exp": "x"}), None, 0).is_err());
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der_item(&[0x30, 0x03, 1, 2, 3], 0), Some((0x30, 2, 5)));
        assert_eq!(
            der_item(&[0x30, 0x82, 0x00, 0x01, 9], 0),
            Some((0x30, 4, 5))
        );
        assert_eq!(der_item(&[0x30, 0x05, 1], 0), None, "truncated");
        assert!(public_key_bytes("not pem").is_err());
    }
}
