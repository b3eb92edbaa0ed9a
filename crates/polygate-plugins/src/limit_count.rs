//! `limit-count` (priority 1002, access phase): at most `count` requests per `time_window`
//! seconds per key, in a fixed window, counted in this process (`policy: local`) or in Redis
//! (`redis`, `redis-cluster`) so that every gateway sharing the Redis shares the limit.
//!
//! Fields as in APISIX: `count`, `time_window` (integers, or `$var` strings resolved per
//! request), `key_type` (`var`, `var_combination`, `constant`), `key` (default
//! `remote_addr`), `rules` (several limits keyed by templates, with `header_prefix`),
//! `group` (routes sharing one counter), `rejected_code` (503), `rejected_msg`, `policy`,
//! `allow_degradation`, `show_limit_quota_header` (true) with `X-RateLimit-Limit`,
//! `-Remaining` and `-Reset`, `window_type` (`fixed`), `sync_interval` (accepted; counters
//! are always updated synchronously), and the `redis_*` / `redis_cluster_*` fields.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use serde::Deserialize;
use serde_json::Value;

use crate::limit::{self, KeySpec, KeyType, split_redis};
use crate::redis::{self, Script, Target};
use crate::util::{Template, parse_conf};

/// `count`/`time_window`: a positive integer or a `$var` resolved per request.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Amount {
    Int(i64),
    Var(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConf {
    count: Amount,
    time_window: Amount,
    key: String,
    header_prefix: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    count: Option<Amount>,
    time_window: Option<Amount>,
    #[serde(default = "fixed")]
    window_type: String,
    rules: Option<Vec<RuleConf>>,
    group: Option<String>,
    #[serde(default = "remote_addr")]
    key: String,
    #[serde(default)]
    key_type: KeyType,
    #[serde(default = "d503")]
    rejected_code: u16,
    rejected_msg: Option<String>,
    #[serde(default)]
    policy: limit::Policy,
    #[serde(default)]
    allow_degradation: bool,
    #[serde(default = "yes")]
    show_limit_quota_header: bool,
    sync_interval: Option<f64>,
    limit_header: Option<String>,
    remaining_header: Option<String>,
    reset_header: Option<String>,
}

fn fixed() -> String {
    "fixed".into()
}
fn remote_addr() -> String {
    "remote_addr".into()
}
fn d503() -> u16 {
    503
}
fn yes() -> bool {
    true
}

/// A count or window, fixed or read from a variable.
#[derive(Clone)]
enum Num {
    Fixed(u64),
    Var(Template, String),
}

impl Num {
    fn parse(a: &Amount, path: &str) -> Result<Num, ConfError> {
        match a {
            Amount::Int(i) if *i > 0 => Ok(Num::Fixed(*i as u64)),
            Amount::Int(_) => Err(ConfError::at(path, "must be greater than 0")),
            Amount::Var(s) => Ok(Num::Var(Template::parse(s), s.clone())),
        }
    }

    fn resolve(&self, ctx: &RequestCtx) -> Result<u64, String> {
        match self {
            Num::Fixed(n) => Ok(*n),
            Num::Var(t, src) => {
                let v = t.render(ctx);
                let n: f64 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{src}: resolved value {v:?} is not a number"))?;
                if n <= 0.0 || n.fract() != 0.0 || n > 9_007_199_254_740_991.0 {
                    return Err(format!(
                        "{src}: resolved value must be a positive integer, got {v}"
                    ));
                }
                Ok(n as u64)
            }
        }
    }
}

struct Rule {
    count: Num,
    window: Num,
    key: KeySpec,
    /// `rules` only: keys made only of unset variables skip the rule.
    from_rules: bool,
    names: [HeaderName; 3],
}

struct LimitCount {
    rules: Vec<Rule>,
    scope: String,
    rejected: StatusCode,
    rejected_msg: Option<String>,
    redis: Option<Target>,
    degrade: bool,
    show_headers: bool,
}

/// Factory of `limit-count`.
pub struct LimitCountFactory;

fn header_name(s: &str, path: &str) -> Result<HeaderName, ConfError> {
    HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| ConfError::at(path, format!("invalid header name {s:?}")))
}

/// `X-RateLimit-Limit` with a rule's prefix: `X-1-RateLimit-Limit`.
fn prefixed(base: &str, prefix: Option<&str>) -> String {
    match prefix {
        Some(p) => base.replacen("RateLimit-", &format!("{p}-RateLimit-"), 1),
        None => base.to_owned(),
    }
}

impl PluginFactory for LimitCountFactory {
    fn name(&self) -> &str {
        "limit-count"
    }

    fn priority(&self) -> i32 {
        1002
    }

    fn schema(&self) -> Value {
        schema()
    }

    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let (rest, redis_part) = split_redis(conf, false)?;
        let c: Conf = parse_conf(&rest)?;
        if c.window_type != "fixed" {
            return Err(ConfError::at(
                "window_type",
                "only \"fixed\" windows are supported by polygate (see docs/compatibility.md)",
            ));
        }
        let rejected_status = crate::util::status(c.rejected_code, "rejected_code")?;
        if c.rejected_msg.as_deref() == Some("") {
            return Err(ConfError::at("rejected_msg", "must not be empty"));
        }
        if let Some(s) = c.sync_interval
            && s != -1.0
            && c.policy != limit::Policy::Local
            && s < 0.1
        {
            return Err(ConfError::at(
                "sync_interval",
                "sync_interval should not be smaller than 0.1",
            ));
        }
        let limit_h = c.limit_header.as_deref().unwrap_or("X-RateLimit-Limit");
        let remaining_h = c
            .remaining_header
            .as_deref()
            .unwrap_or("X-RateLimit-Remaining");
        let reset_h = c.reset_header.as_deref().unwrap_or("X-RateLimit-Reset");
        let names = |prefix: Option<&str>| -> Result<[HeaderName; 3], ConfError> {
            Ok([
                header_name(&prefixed(limit_h, prefix), "limit_header")?,
                header_name(&prefixed(remaining_h, prefix), "remaining_header")?,
                header_name(&prefixed(reset_h, prefix), "reset_header")?,
            ])
        };
        let rules = match &c.rules {
            Some(rules) => {
                if c.count.is_some() || c.time_window.is_some() {
                    return Err(ConfError::whole(
                        "count/time_window and rules cannot be specified at the same time",
                    ));
                }
                if c.group.is_some() {
                    return Err(ConfError::whole(
                        "group and rules cannot be specified at the same time",
                    ));
                }
                if rules.is_empty() {
                    return Err(ConfError::at("rules", "must have at least one rule"));
                }
                let mut seen = std::collections::HashSet::new();
                let mut out = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    if !seen.insert(r.key.clone()) {
                        return Err(ConfError::at(
                            format!("rules[{i}].key"),
                            format!("duplicate key '{}' in rules", r.key),
                        ));
                    }
                    let prefix = match &r.header_prefix {
                        None => (i + 1).to_string(),
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => v.to_string(),
                    };
                    out.push(Rule {
                        count: Num::parse(&r.count, &format!("rules[{i}].count"))?,
                        window: Num::parse(&r.time_window, &format!("rules[{i}].time_window"))?,
                        key: KeySpec::new(KeyType::VarCombination, &r.key),
                        from_rules: true,
                        names: names(Some(&prefix))?,
                    });
                }
                out
            }
            None => {
                let (Some(count), Some(window)) = (&c.count, &c.time_window) else {
                    let missing = if c.count.is_none() {
                        "count"
                    } else {
                        "time_window"
                    };
                    return Err(ConfError::at(
                        missing,
                        format!("property \"{missing}\" is required"),
                    ));
                };
                vec![Rule {
                    count: Num::parse(count, "count")?,
                    window: Num::parse(window, "time_window")?,
                    key: KeySpec::new(c.key_type, &c.key),
                    from_rules: false,
                    names: names(None)?,
                }]
            }
        };
        Ok(Arc::new(LimitCount {
            rules,
            scope: limit::scope(c.group.as_deref(), conf),
            rejected: rejected_status,
            rejected_msg: c.rejected_msg,
            redis: redis_part.target,
            degrade: c.allow_degradation,
            show_headers: c.show_limit_quota_header,
        }))
    }
}

/// The Redis side of a fixed window: `{used, ttl_ms}` after adding the cost. Additive, as
/// [`redis::add_to_window`] needs: calls on one key waiting for the same write run it once.
static COUNT_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        "local ttl = redis.call('pttl', KEYS[1])\n\
         if ttl < 0 then\n\
           redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])\n\
           return {tonumber(ARGV[1]), tonumber(ARGV[2])}\n\
         end\n\
         return {redis.call('incrby', KEYS[1], ARGV[1]), ttl}\n",
    )
});

/// `X-RateLimit-Reset` as APISIX prints it: seconds floored to hundredths.
fn reset_text(secs: f64) -> String {
    // integer arithmetic and no formatter: this runs for every request
    let h = (secs.max(0.0) * 100.0).floor() as u64;
    let mut out = String::with_capacity(12);
    let whole = h / 100;
    let mut digits = [0u8; 20];
    let mut n = 0;
    let mut w = whole;
    loop {
        digits[n] = b'0' + (w % 10) as u8;
        n += 1;
        w /= 10;
        if w == 0 {
            break;
        }
    }
    for d in digits[..n].iter().rev() {
        out.push(char::from(*d));
    }
    let frac = h % 100;
    if frac != 0 {
        out.push('.');
        out.push(char::from(b'0' + (frac / 10) as u8));
        if !frac.is_multiple_of(10) {
            out.push(char::from(b'0' + (frac % 10) as u8));
        }
    }
    out
}

/// One rule's decision for this request.
struct Decided {
    limit: u64,
    remaining: i64,
    reset: f64,
}

impl LimitCount {
    /// The rules that apply, with their key, count and window.
    fn plan(&self, ctx: &RequestCtx) -> Result<Vec<(usize, String, u64, Duration)>, String> {
        let mut out = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            let mut key = String::with_capacity(self.scope.len() + 24);
            key.push_str(&self.scope);
            key.push(':');
            if r.from_rules {
                let (k, n) = r.key.counted(ctx);
                if n == 0 {
                    continue;
                }
                key.push_str(&k);
            } else {
                r.key.push_to(ctx, &mut key);
            }
            let count = r.count.resolve(ctx)?;
            let window = r.window.resolve(ctx)?;
            out.push((i, key, count, Duration::from_secs(window)));
        }
        Ok(out)
    }

    fn failed(&self, why: &str) -> Flow<'static> {
        tracing::error!("limit-count: {why}");
        if self.degrade {
            Flow::Continue
        } else {
            Flow::Respond(PluginResponse::error_msg(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to limit count",
            ))
        }
    }

    /// Records the headers and answers for the decided rules (in order: the first rejection
    /// wins, as in APISIX where later rules are not evaluated).
    fn answer(&self, ctx: &mut RequestCtx, decided: &[(usize, Decided)]) -> Flow<'static> {
        let mut rejected = false;
        for (i, d) in decided {
            let r = &self.rules[*i];
            if self.show_headers {
                let [limit_h, remaining_h, reset_h] = &r.names;
                let remaining = d.remaining.max(0) as u64;
                ctx.response_headers
                    .push((limit_h.clone(), HeaderValue::from(d.limit)));
                ctx.response_headers
                    .push((remaining_h.clone(), HeaderValue::from(remaining)));
                if let Ok(v) = HeaderValue::from_str(&reset_text(d.reset)) {
                    ctx.response_headers.push((reset_h.clone(), v));
                }
            }
            if d.remaining < 0 {
                rejected = true;
                break;
            }
        }
        if rejected {
            return Flow::Respond(crate::util::rejection(
                self.rejected,
                self.rejected_msg.as_deref(),
            ));
        }
        Flow::Continue
    }
}

impl Plugin for LimitCount {
    fn name(&self) -> &str {
        "limit-count"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        // the common case: one fixed rule counted in this process
        if self.redis.is_none()
            && let [rule] = self.rules.as_slice()
            && !rule.from_rules
            && let (Num::Fixed(count), Num::Fixed(window)) = (&rule.count, &rule.window)
        {
            let mut key = String::with_capacity(self.scope.len() + 24);
            key.push_str(&self.scope);
            key.push(':');
            rule.key.push_to(ctx, &mut key);
            let (remaining, reset) =
                limit::count_local(&key, *count, Duration::from_secs(*window), 1);
            return self.answer(
                ctx,
                &[(
                    0,
                    Decided {
                        limit: *count,
                        remaining,
                        reset,
                    },
                )],
            );
        }
        let plan = match self.plan(ctx) {
            Ok(p) => p,
            Err(e) => return self.failed(&format!("failed to get rate limit rules: {e}")),
        };
        if plan.is_empty() {
            return if self.rules.iter().all(|r| r.from_rules) {
                // no rule applies to this request
                Flow::Continue
            } else {
                self.failed("no rule")
            };
        }
        let Some(target) = &self.redis else {
            let mut decided = Vec::with_capacity(plan.len());
            for (i, key, count, window) in plan {
                let (remaining, reset) = limit::count_local(&key, count, window, 1);
                let over = remaining < 0;
                decided.push((
                    i,
                    Decided {
                        limit: count,
                        remaining,
                        reset,
                    },
                ));
                if over {
                    break;
                }
            }
            return self.answer(ctx, &decided);
        };
        Flow::Pending(Box::pin(async move {
            let mut decided = Vec::with_capacity(plan.len());
            for (i, key, count, window) in plan {
                let mut rkey = String::with_capacity(22 + key.len());
                rkey.push_str("plugin-limit-count:v1:");
                rkey.push_str(&key);
                let ms = window.as_millis() as u64;
                let reply = match redis::add_to_window(target, &COUNT_SCRIPT, &rkey, 1, ms).await {
                    Ok(r) => r,
                    Err(e) => {
                        return match self.failed(&format!("failed to limit count: {e}")) {
                            Flow::Respond(r) => Ok(Some(r)),
                            _ => Ok(None),
                        };
                    }
                };
                let items = reply.items();
                let (Some(used), Some(ttl)) = (
                    items.first().and_then(redis::Reply::as_int),
                    items.get(1).and_then(redis::Reply::as_int),
                ) else {
                    return match self.failed(&format!("unexpected reply {reply:?}")) {
                        Flow::Respond(r) => Ok(Some(r)),
                        _ => Ok(None),
                    };
                };
                let remaining = count as i64 - used;
                decided.push((
                    i,
                    Decided {
                        limit: count,
                        remaining,
                        reset: ttl.max(0) as f64 / 1000.0,
                    },
                ));
                if remaining < 0 {
                    break;
                }
            }
            Ok(match self.answer(ctx, &decided) {
                Flow::Respond(r) => Some(r),
                _ => None,
            })
        }))
    }
}

fn schema() -> Value {
    let amount = serde_json::json!({"oneOf": [
        {"type": "integer", "exclusiveMinimum": 0}, {"type": "string"}
    ]});
    let mut props = serde_json::json!({
        "count": amount,
        "time_window": amount,
        "window_type": {"type": "string", "enum": ["fixed"], "default": "fixed"},
        "rules": {"type": "array", "items": {"type": "object", "properties": {
            "count": amount, "time_window": amount, "key": {"type": "string"},
            "header_prefix": {"type": "string"}
        }, "required": ["count", "time_window", "key"]}},
        "group": {"type": "string"},
        "key": {"type": "string", "default": "remote_addr"},
        "key_type": {"type": "string", "enum": ["var", "var_combination", "constant"],
                     "default": "var"},
        "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 503},
        "rejected_msg": {"type": "string", "minLength": 1},
        "policy": {"type": "string", "enum": ["local", "redis", "redis-cluster"],
                   "default": "local"},
        "allow_degradation": {"type": "boolean", "default": false},
        "show_limit_quota_header": {"type": "boolean", "default": true},
        "sync_interval": {"type": "number", "default": -1},
        "limit_header": {"type": "string"},
        "remaining_header": {"type": "string"},
        "reset_header": {"type": "string"},
        "_meta": {"type": "object"}
    });
    crate::limit::add_redis_schema(&mut props, false);
    serde_json::json!({
        "type": "object",
        "properties": props,
        "oneOf": [{"required": ["count", "time_window"]}, {"required": ["rules"]}],
        "additionalProperties": false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_as_text() {
        for ip in ["0.0.0.0", "10.2.30.255", "127.0.0.1", "::1", "fe80::1:2"] {
            let mut s = String::new();
            crate::limit::push_ip(&mut s, ip.parse().unwrap());
            assert_eq!(s, ip);
        }
    }

    #[test]
    fn reset_like_apisix() {
        assert_eq!(reset_text(60.0), "60");
        assert_eq!(reset_text(59.996), "59.99");
        assert_eq!(reset_text(-1.0), "0");
        assert_eq!(reset_text(3599.5), "3599.5");
        assert_eq!(reset_text(0.05), "0.05");
        assert_eq!(reset_text(120.0), "120");
    }

    #[test]
    fn rejects_bad_confs() {
        let f = LimitCountFactory;
        let err = |v: Value| f.build(&v).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(serde_json::json!({"time_window": 60})).contains("count"));
        assert!(err(serde_json::json!({"count": -1, "time_window": 60})).starts_with("count"));
        assert!(
            err(serde_json::json!({"count": 1, "time_window": 60, "policy": "redis"}))
                .starts_with("redis_host")
        );
        assert!(
            err(serde_json::json!({"count": 1, "time_window": 60, "rejected_code": 600}))
                .starts_with("rejected_code")
        );
        assert!(
            f.build(&serde_json::json!({"count": 2, "time_window": 60}))
                .is_ok()
        );
    }
}
