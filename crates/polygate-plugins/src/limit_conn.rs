//! `limit-conn` (priority 1003, access and log phases): at most `conn` requests in flight per
//! key, `burst` more delayed, the rest rejected; the count drops when a request ends (the
//! response was sent or the client went away). Counters in this process (`policy: local`) or in
//! Redis (`redis`, `redis-cluster`; each key expires after `key_ttl` seconds so that a gateway
//! that died does not hold its requests forever).
//!
//! Fields as in APISIX: `conn` (> 0), `burst` (≥ 0), `default_conn_delay` (> 0, seconds),
//! `only_use_default_delay` (false), `key_type` (`var`, `var_combination`), `key`,
//! `rejected_code` (503), `rejected_msg`, `allow_degradation`, `policy`, `key_ttl` and the
//! `redis_*` / `redis_cluster_*` fields.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http::StatusCode;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use serde::Deserialize;
use serde_json::Value;

use crate::limit::{self, KeySpec, KeyType, Store, split_redis};
use crate::redis::{self, Reply, Target};
use crate::util::parse_conf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    conn: i64,
    burst: i64,
    default_conn_delay: f64,
    #[serde(default)]
    only_use_default_delay: bool,
    #[serde(default)]
    key_type: KeyType,
    key: String,
    #[serde(default = "d503")]
    rejected_code: u16,
    rejected_msg: Option<String>,
    #[serde(default)]
    allow_degradation: bool,
    #[serde(default)]
    #[serde(rename = "policy")]
    _policy: limit::Policy,
}

fn d503() -> u16 {
    503
}

struct LimitConn {
    max: i64,
    burst: i64,
    delay: f64,
    only_default: bool,
    key: KeySpec,
    scope: String,
    rejected: StatusCode,
    rejected_msg: Option<String>,
    degrade: bool,
    redis: Option<Target>,
    key_ttl: u64,
}

/// The key this request counted under, for the log phase.
#[derive(Clone)]
struct Counted(String);

static CONNS: LazyLock<Store<Arc<AtomicI64>>> = LazyLock::new(Store::new);

/// Factory of `limit-conn`.
pub struct LimitConnFactory;

impl PluginFactory for LimitConnFactory {
    fn name(&self) -> &str {
        "limit-conn"
    }

    fn priority(&self) -> i32 {
        1003
    }

    fn schema(&self) -> Value {
        let mut props = serde_json::json!({
            "conn": {"type": "integer", "exclusiveMinimum": 0},
            "burst": {"type": "integer", "minimum": 0},
            "default_conn_delay": {"type": "number", "exclusiveMinimum": 0},
            "only_use_default_delay": {"type": "boolean", "default": false},
            "key": {"type": "string"},
            "key_type": {"type": "string", "enum": ["var", "var_combination"], "default": "var"},
            "rejected_code": {"type": "integer", "minimum": 200, "maximum": 599, "default": 503},
            "rejected_msg": {"type": "string", "minLength": 1},
            "allow_degradation": {"type": "boolean", "default": false},
            "policy": {"type": "string", "enum": ["local", "redis", "redis-cluster"],
                       "default": "local"},
            "_meta": {"type": "object"}
        });
        limit::add_redis_schema(&mut props, true);
        serde_json::json!({"type": "object", "properties": props,
            "required": ["conn", "burst", "default_conn_delay", "key"],
            "additionalProperties": false})
    }

    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let (rest, redis) = split_redis(conf, true)?;
        let c: Conf = parse_conf(&rest)?;
        if c.conn <= 0 {
            return Err(ConfError::at("conn", "must be greater than 0"));
        }
        if c.burst < 0 {
            return Err(ConfError::at("burst", "must be at least 0"));
        }
        if c.default_conn_delay <= 0.0 || !c.default_conn_delay.is_finite() {
            return Err(ConfError::at(
                "default_conn_delay",
                "must be greater than 0",
            ));
        }
        if c.key_type == KeyType::Constant {
            return Err(ConfError::at(
                "key_type",
                "must be \"var\" or \"var_combination\"",
            ));
        }
        let rejected_status = crate::util::status(c.rejected_code, "rejected_code")?;
        Ok(Arc::new(LimitConn {
            max: c.conn,
            burst: c.burst,
            delay: c.default_conn_delay,
            only_default: c.only_use_default_delay,
            key: KeySpec::new(c.key_type, &c.key),
            scope: limit::scope(None, conf),
            rejected: rejected_status,
            rejected_msg: c.rejected_msg,
            degrade: c.allow_degradation,
            redis: redis.target,
            key_ttl: redis.key_ttl.max(1),
        }))
    }
}

impl LimitConn {
    fn reject(&self) -> PluginResponse {
        crate::util::rejection(self.rejected, self.rejected_msg.as_deref())
    }

    /// The delay of the `conn`-th request in flight (`conn` ≤ max + burst).
    fn delay_for(&self, conn: i64) -> Duration {
        if conn <= self.max {
            return Duration::ZERO;
        }
        let d = if self.only_default {
            self.delay
        } else {
            self.delay * ((conn - 1) / self.max) as f64
        };
        Duration::from_secs_f64(d.min(3600.0))
    }

    fn counter(key: &str) -> Arc<AtomicI64> {
        CONNS.with(
            key,
            || Arc::new(AtomicI64::new(0)),
            |c| c.load(Ordering::Relaxed) <= 0 && Arc::strong_count(c) == 1,
            |c| c.clone(),
        )
    }
}

impl Plugin for LimitConn {
    fn name(&self) -> &str {
        "limit-conn"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let key = format!("{}:{}", self.scope, self.key.of(ctx));
        let Some(target) = &self.redis else {
            let c = Self::counter(&key);
            let conn = c.fetch_add(1, Ordering::AcqRel) + 1;
            if conn > self.max + self.burst {
                c.fetch_sub(1, Ordering::AcqRel);
                return Flow::Respond(self.reject());
            }
            ctx.extensions.insert(Counted(key));
            let d = self.delay_for(conn);
            if d < Duration::from_millis(1) {
                return Flow::Continue;
            }
            return Flow::Pending(Box::pin(async move {
                tokio::time::sleep(d).await;
                Ok(None)
            }));
        };
        Flow::Pending(Box::pin(async move {
            let rkey = format!("plugin-limit-conn:{key}");
            let ttl = self.key_ttl.to_string();
            let r = redis::command(target, &rkey, &[b"INCR", rkey.as_bytes()]).await;
            let conn = match r.as_ref().map(Reply::as_int) {
                Ok(Some(n)) => n,
                other => {
                    tracing::error!("limit-conn: failed to limit conn: {other:?}");
                    return Ok((!self.degrade)
                        .then(|| PluginResponse::status_page(StatusCode::INTERNAL_SERVER_ERROR)));
                }
            };
            // the key lives key_ttl seconds past the last request that counted
            let _ =
                redis::command(target, &rkey, &[b"EXPIRE", rkey.as_bytes(), ttl.as_bytes()]).await;
            if conn > self.max + self.burst {
                let _ = redis::command(target, &rkey, &[b"DECR", rkey.as_bytes()]).await;
                return Ok(Some(self.reject()));
            }
            ctx.extensions.insert(Counted(key));
            let d = self.delay_for(conn);
            if d >= Duration::from_millis(1) {
                tokio::time::sleep(d).await;
            }
            Ok(None)
        }))
    }

    fn log(&self, ctx: &RequestCtx) {
        let Some(Counted(key)) = ctx.extensions.get::<Counted>() else {
            return;
        };
        match &self.redis {
            None => {
                Self::counter(key).fetch_sub(1, Ordering::AcqRel);
            }
            Some(target) => {
                let rkey = format!("plugin-limit-conn:{key}");
                let target = target.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        h.spawn(async move {
                            if let Err(e) =
                                redis::command(&target, &rkey, &[b"DECR", rkey.as_bytes()]).await
                            {
                                tracing::error!("limit-conn: failed to release {rkey}: {e}");
                            }
                        });
                    }
                    Err(_) => tracing::error!("limit-conn: no runtime to release {rkey}"),
                }
            }
        }
    }
}
