//! `limit-req` (priority 1001, access phase): a leaky bucket per key, `rate` requests per
//! second with `burst` more delayed (or let through at once with `nodelay`), the rest rejected.
//! State in this process (`policy: local`) or in Redis (`redis`, `redis-cluster`, the bucket
//! updated by one script with Redis's clock).
//!
//! Fields as in APISIX: `rate` (> 0), `burst` (≥ 0), `key_type` (`var`, `var_combination`),
//! `key`, `rejected_code` (503), `rejected_msg`, `nodelay` (false), `allow_degradation`,
//! `policy` and the `redis_*` / `redis_cluster_*` fields.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::StatusCode;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use serde::Deserialize;
use serde_json::Value;

use crate::limit::{self, KeySpec, KeyType, Store, split_redis};
use crate::redis::{Reply, Script, Target};
use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    rate: f64,
    burst: f64,
    #[serde(default)]
    key_type: KeyType,
    key: String,
    #[serde(default = "d503")]
    rejected_code: u16,
    rejected_msg: Option<String>,
    #[serde(default)]
    nodelay: bool,
    #[serde(default)]
    allow_degradation: bool,
    #[serde(default)]
    #[serde(rename = "policy")]
    _policy: limit::Policy,
}

fn d503() -> u16 {
    503
}

struct LimitReq {
    /// Requests per second.
    rate: f64,
    burst: f64,
    key: KeySpec,
    scope: String,
    rejected: StatusCode,
    rejected_msg: Option<String>,
    nodelay: bool,
    degrade: bool,
    redis: Option<Target>,
}

/// A bucket: the excess over the rate (in requests) at `last`.
struct Bucket {
    excess: f64,
    last: Instant,
}

static BUCKETS: LazyLock<Store<Bucket>> = LazyLock::new(Store::new);

/// Factory of `limit-req`.
pub struct LimitReqFactory;

impl PluginFactory for LimitReqFactory {
    fn name(&self) -> &str {
        "limit-req"
    }

    fn priority(&self) -> i32 {
        1001
    }

    fn schema(&self) -> Value {
        let mut props = serde_json::json!({
            "rate": {"type": "number", "exclusiveMinimum": 0},
            "burst": {"type": "number", "minimum": 0},
            "key": {"type": "string"},
            "key_type": {"type": "string", "enum": ["var", "var_combination"], "default": "var"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 503},
            "rejected_msg": {"type": "string", "minLength": 1},
            "nodelay": {"type": "boolean", "default": false},
            "allow_degradation": {"type": "boolean", "default": false},
            "policy": {"type": "string", "enum": ["local", "redis", "redis-cluster"],
                       "default": "local"},
            "_meta": {"type": "object"}
        });
        limit::add_redis_schema(&mut props, false);
        serde_json::json!({"type": "object", "properties": props,
            "required": ["rate", "burst", "key"], "additionalProperties": false})
    }

    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let (rest, redis) = split_redis(conf, false)?;
        let c: Conf = parse_conf(&rest)?;
        if c.rate <= 0.0 || !c.rate.is_finite() {
            return Err(ConfError::at("rate", "must be greater than 0"));
        }
        if c.burst < 0.0 || !c.burst.is_finite() {
            return Err(ConfError::at("burst", "must be at least 0"));
        }
        if c.key_type == KeyType::Constant {
            return Err(ConfError::at(
                "key_type",
                "must be \"var\" or \"var_combination\"",
            ));
        }
        let rejected_status = crate::util::status(c.rejected_code, "rejected_code")?;
        if c.rejected_msg.as_deref() == Some("") {
            return Err(ConfError::at("rejected_msg", "must not be empty"));
        }
        Ok(Arc::new(LimitReq {
            rate: c.rate,
            burst: c.burst,
            key: KeySpec::new(c.key_type, &c.key),
            scope: limit::scope(None, conf),
            rejected: rejected_status,
            rejected_msg: c.rejected_msg,
            nodelay: c.nodelay,
            degrade: c.allow_degradation,
            redis: redis.target,
        }))
    }
}

/// The bucket update: `{1, delay_ms}` when let through (the bucket committed), `{0, 0}` when
/// rejected. ARGV: rate (req/s), burst, ttl seconds.
static REQ_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local rate = tonumber(ARGV[1])\n\
         local burst = tonumber(ARGV[2])\n\
         local t = redis.call('TIME')\n\
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n\
         local s = redis.call('HMGET', KEYS[1], 'excess', 'last')\n\
         local excess = 0\n\
         if s[1] and s[2] then\n\
           local elapsed = math.abs(now - tonumber(s[2]))\n\
           excess = math.max(tonumber(s[1]) - rate * elapsed / 1000 + 1, 0)\n\
         else\n\
           excess = 0\n\
         end\n\
         if excess > burst then return {0, 0} end\n\
         redis.call('HSET', KEYS[1], 'excess', tostring(excess), 'last', now)\n\
         redis.call('EXPIRE', KEYS[1], ARGV[3])\n\
         return {1, math.floor(excess / rate * 1000)}\n",
    )
});

enum Outcome {
    Pass(Duration),
    Rejected,
}

impl LimitReq {
    fn local(&self, key: &str) -> Outcome {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        let idle = Duration::from_secs_f64(((burst + 1.0) / rate).min(86_400.0));
        BUCKETS.with(
            key,
            || Bucket {
                excess: -1.0,
                last: now,
            },
            |b| now.saturating_duration_since(b.last) > idle,
            |b| {
                let excess = if b.excess < 0.0 {
                    0.0
                } else {
                    let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
                    (b.excess - rate * elapsed + 1.0).max(0.0)
                };
                if excess > burst {
                    return Outcome::Rejected;
                }
                b.excess = excess;
                b.last = now;
                Outcome::Pass(Duration::from_secs_f64(excess / rate))
            },
        )
    }

    fn reject(&self) -> PluginResponse {
        crate::util::rejection(self.rejected, self.rejected_msg.as_deref())
    }

    fn failed(&self, why: &str) -> Option<PluginResponse> {
        tracing::error!("limit-req: failed to limit req: {why}");
        (!self.degrade).then(|| PluginResponse::status_page(StatusCode::INTERNAL_SERVER_ERROR))
    }
}

impl Plugin for LimitReq {
    fn name(&self) -> &str {
        "limit-req"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let key = format!("{}:{}", self.scope, self.key.of(ctx));
        let Some(target) = &self.redis else {
            return match self.local(&key) {
                Outcome::Rejected => Flow::Respond(self.reject()),
                Outcome::Pass(d) if self.nodelay || d < Duration::from_millis(1) => Flow::Continue,
                Outcome::Pass(d) => Flow::Pending(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    Ok(None)
                })),
            };
        };
        Flow::Pending(Box::pin(async move {
            let rkey = format!("plugin-limit-req:{key}");
            let ttl = (((self.burst + 1.0) / self.rate).ceil() as u64).clamp(1, 86_400) + 1;
            let args = [
                self.rate.to_string(),
                self.burst.to_string(),
                ttl.to_string(),
            ];
            let reply = REQ_SCRIPT
                .run(target, &rkey, &[&args[0], &args[1], &args[2]])
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) => return Ok(self.failed(&e.to_string())),
            };
            let items = reply.items();
            match (
                items.first().and_then(Reply::as_int),
                items.get(1).and_then(Reply::as_int),
            ) {
                (Some(0), _) => Ok(Some(self.reject())),
                (Some(1), Some(ms)) => {
                    if !self.nodelay && ms >= 1 {
                        tokio::time::sleep(Duration::from_millis(ms as u64)).await;
                    }
                    Ok(None)
                }
                _ => Ok(self.failed(&format!("unexpected reply {reply:?}"))),
            }
        }))
    }
}
