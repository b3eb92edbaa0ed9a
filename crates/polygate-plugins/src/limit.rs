//! What the limit plugins (`limit-count`, `limit-req`, `limit-conn`) share: the `redis_*`
//! fields, how a request's key is made (`key_type`/`key`), the scope of counters, and the
//! process-wide local stores.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use polygate_core::{ConfError, RequestCtx};
use polygate_router::VarSource;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::redis::Target;
use crate::util::{Template, parse_conf};

/// `policy`: where the counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Policy {
    /// In this process (shared by its worker threads).
    #[default]
    #[serde(rename = "local")]
    Local,
    /// In one Redis server.
    #[serde(rename = "redis")]
    Redis,
    /// In a Redis Cluster.
    #[serde(rename = "redis-cluster")]
    RedisCluster,
}

/// `key_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum KeyType {
    /// `key` names one variable (`remote_addr`, `http_x_user`, `consumer_name`).
    #[default]
    #[serde(rename = "var")]
    Var,
    /// `key` is a template of variables (`$remote_addr $http_user_agent`).
    #[serde(rename = "var_combination")]
    VarCombination,
    /// `key` is used as it is (limit-count only).
    #[serde(rename = "constant")]
    Constant,
}

/// How a request's limit key is found.
pub struct KeySpec {
    kind: KeyType,
    key: String,
    template: Template,
}

impl KeySpec {
    /// A key of this type.
    pub fn new(kind: KeyType, key: &str) -> KeySpec {
        let key = match kind {
            // APISIX accepts `$remote_addr` for a `var` key as well
            KeyType::Var => key.strip_prefix('$').unwrap_or(key).to_owned(),
            _ => key.to_owned(),
        };
        KeySpec {
            kind,
            template: Template::parse(&key),
            key,
        }
    }

    /// The key rendered as a template, and how many of its variables had a value.
    pub fn counted(&self, ctx: &RequestCtx) -> (String, usize) {
        self.template.render_counted(ctx)
    }

    /// Appends the key of this request to `out` (as [`KeySpec::of`], without allocating for
    /// the common `remote_addr`).
    pub fn push_to(&self, ctx: &RequestCtx, out: &mut String) {
        if self.kind == KeyType::Var && self.key == "remote_addr" {
            push_ip(out, ctx.client_addr.ip());
        } else {
            out.push_str(&self.of(ctx));
        }
    }

    /// The key of this request; a variable without a value falls back to the client address
    /// (as APISIX does, logging it).
    pub fn of(&self, ctx: &RequestCtx) -> String {
        let found = match self.kind {
            KeyType::Constant => Some(self.key.clone()),
            KeyType::Var => ctx.var(&self.key).map(|v| v.into_owned()),
            KeyType::VarCombination => {
                let (s, n) = self.template.render_counted(ctx);
                (n > 0).then_some(s)
            }
        };
        match found {
            Some(k) => k,
            None => {
                tracing::debug!(
                    "limit key {:?} has no value: using the client address",
                    self.key
                );
                ctx.client_addr.ip().to_string()
            }
        }
    }
}

/// Writes an IP address as text (IPv4 without the formatter's machinery).
pub fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if *o >= 100 {
                    out.push(char::from(b'0' + o / 100));
                }
                if *o >= 10 {
                    out.push(char::from(b'0' + (o / 10) % 10));
                }
                out.push(char::from(b'0' + o % 10));
            }
        }
        v6 => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// The `redis_*` and `redis_cluster_*` fields of APISIX's redis schema.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RedisFields {
    redis_host: Option<String>,
    redis_port: Option<u16>,
    redis_username: Option<String>,
    redis_password: Option<String>,
    redis_database: Option<u32>,
    redis_timeout: Option<u64>,
    redis_ssl: Option<bool>,
    redis_ssl_verify: Option<bool>,
    redis_keepalive_timeout: Option<u64>,
    redis_keepalive_pool: Option<u64>,
    redis_cluster_nodes: Option<Vec<String>>,
    redis_cluster_name: Option<String>,
    redis_cluster_ssl: Option<bool>,
    redis_cluster_ssl_verify: Option<bool>,
    key_ttl: Option<u64>,
}

/// The Redis part of a limit plugin's configuration.
pub struct RedisPart {
    /// Where commands go, for the `redis` and `redis-cluster` policies.
    pub target: Option<Target>,
    /// limit-conn's `key_ttl` (seconds, default 3600).
    pub key_ttl: u64,
}

/// Takes the `redis_*` fields (and limit-conn's `key_ttl`) out of `conf`, checks them for
/// `policy`, and returns the rest of the configuration for the plugin's own parsing.
pub fn split_redis(conf: &Value, with_key_ttl: bool) -> Result<(Value, RedisPart), ConfError> {
    let Some(obj) = conf.as_object() else {
        return Err(ConfError::whole("must be an object"));
    };
    let mut rest = Map::new();
    let mut redis = Map::new();
    for (k, v) in obj {
        if k.starts_with("redis_") || (with_key_ttl && k == "key_ttl") {
            redis.insert(k.clone(), v.clone());
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    let policy: Policy = match rest.get("policy") {
        None => Policy::Local,
        Some(p) => {
            serde_json::from_value(p.clone()).map_err(|e| ConfError::at("policy", e.to_string()))?
        }
    };
    let f: RedisFields = parse_conf(&Value::Object(redis))?;
    let timeout = f.redis_timeout.unwrap_or(1000);
    if timeout < 1 {
        return Err(ConfError::at("redis_timeout", "must be at least 1"));
    }
    if f.redis_ssl == Some(true) || f.redis_cluster_ssl == Some(true) {
        let k = if f.redis_ssl == Some(true) {
            "redis_ssl"
        } else {
            "redis_cluster_ssl"
        };
        return Err(ConfError::at(
            k,
            "TLS to Redis is not supported by polygate yet (see docs/compatibility.md)",
        ));
    }
    let _ = (
        f.redis_ssl_verify,
        f.redis_cluster_ssl_verify,
        f.redis_keepalive_timeout,
        f.redis_keepalive_pool,
    );
    if let Some(k) = f.redis_keepalive_timeout
        && k < 1000
    {
        return Err(ConfError::at(
            "redis_keepalive_timeout",
            "must be at least 1000",
        ));
    }
    let target = match policy {
        Policy::Local => None,
        Policy::Redis => {
            let Some(host) = f.redis_host.filter(|h| !h.is_empty()) else {
                return Err(ConfError::at(
                    "redis_host",
                    "is required when policy is \"redis\"",
                ));
            };
            if host.len() < 2 {
                return Err(ConfError::at("redis_host", "must be at least 2 characters"));
            }
            let port = f.redis_port.unwrap_or(6379);
            if port == 0 {
                return Err(ConfError::at("redis_port", "must be 1 to 65535"));
            }
            let addr = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            Some(Target {
                nodes: vec![addr],
                cluster: false,
                username: f.redis_username,
                password: f.redis_password,
                database: f.redis_database.unwrap_or(0),
                timeout_ms: timeout,
            })
        }
        Policy::RedisCluster => {
            let Some(nodes) = f.redis_cluster_nodes.filter(|n| !n.is_empty()) else {
                return Err(ConfError::at(
                    "redis_cluster_nodes",
                    "is required when policy is \"redis-cluster\" (at least one node)",
                ));
            };
            for (i, n) in nodes.iter().enumerate() {
                if n.len() < 2 || n.len() > 100 || !n.contains(':') {
                    return Err(ConfError::at(
                        format!("redis_cluster_nodes[{i}]"),
                        "must be \"host:port\"",
                    ));
                }
            }
            if f.redis_cluster_name.is_none() {
                return Err(ConfError::at(
                    "redis_cluster_name",
                    "is required when policy is \"redis-cluster\"",
                ));
            }
            Some(Target {
                nodes,
                cluster: true,
                username: None,
                password: f.redis_password,
                database: 0,
                timeout_ms: timeout,
            })
        }
    };
    Ok((
        Value::Object(rest),
        RedisPart {
            target,
            key_ttl: f.key_ttl.unwrap_or(3600),
        },
    ))
}

/// A stable 64-bit FNV-1a hash (the same in every process and build), for counter scopes.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    fnv(FNV_START, bytes)
}

/// FNV-1a's offset basis: where [`fnv`] starts.
pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, continuing from `h` (so that several pieces hash without being
/// joined first).
pub fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The scope of an instance's counters: `group` when set (shared by every route using the
/// group), else the resource the plugin is configured on and its configuration's hash, so that
/// a changed configuration starts fresh counters and every process with the same
/// configuration shares them (APISIX: `resource_key:conf_version`).
pub fn scope(group: Option<&str>, conf: &Value) -> String {
    match group {
        Some(g) => g.to_owned(),
        None => {
            let owner = polygate_core::plugin::building_owner();
            format!(
                "{}:{:016x}",
                owner.as_deref().unwrap_or("-"),
                stable_hash(conf.to_string().as_bytes())
            )
        }
    }
}

const SHARDS: usize = 32;

/// A process-wide map from limit keys to state, split in shards so worker threads rarely
/// meet on one lock; entries whose state expired are swept as the map grows.
pub struct Store<V> {
    shards: Vec<Mutex<Shard<V>>>,
    hasher: std::collections::hash_map::RandomState,
}

struct Shard<V> {
    map: HashMap<String, V>,
    sweep_at: usize,
}

impl<V> Store<V> {
    /// An empty store.
    pub fn new() -> Store<V> {
        Store {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        sweep_at: 1024,
                    })
                })
                .collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Runs `f` on the state of `key` (made by `init` when missing); `expired` tells which
    /// entries a sweep may drop.
    pub fn with<R>(
        &self,
        key: &str,
        init: impl FnOnce() -> V,
        expired: impl Fn(&V) -> bool,
        f: impl FnOnce(&mut V) -> R,
    ) -> R {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut s = shard.lock();
        if s.map.len() >= s.sweep_at {
            s.map.retain(|_, v| !expired(v));
            s.sweep_at = (s.map.len() * 2).max(1024);
        }
        let v = match s.map.get_mut(key) {
            Some(v) => v,
            None => s.map.entry(key.to_owned()).or_insert_with(init),
        };
        f(v)
    }
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// A fixed window: requests counted until `reset_at`.
pub struct Window {
    /// Cost consumed in this window.
    pub used: u64,
    /// When the window ends.
    pub reset_at: Instant,
}

/// limit-count's local windows.
pub static WINDOWS: LazyLock<Store<Window>> = LazyLock::new(Store::new);

/// Counts `cost` in the window of `key` (`limit` per `window`): the remaining quota (negative
/// when over) and the seconds until the window resets.
pub fn count_local(key: &str, limit: u64, window: Duration, cost: u64) -> (i64, f64) {
    let now = Instant::now();
    WINDOWS.with(
        key,
        || Window {
            used: 0,
            reset_at: now,
        },
        |w| w.reset_at <= now,
        |w| {
            if w.reset_at <= now {
                w.used = 0;
                w.reset_at = now + window;
            }
            w.used = w.used.saturating_add(cost);
            let remaining = limit as i64 - w.used.min(i64::MAX as u64) as i64;
            (remaining, (w.reset_at - now).as_secs_f64())
        },
    )
}

/// Adds APISIX's redis schema fields (`redis_*`, `redis_cluster_*`, and limit-conn's
/// `key_ttl`) to a plugin schema's `properties`.
pub fn add_redis_schema(props: &mut Value, with_key_ttl: bool) {
    let extra = serde_json::json!({
        "redis_host": {"type": "string", "minLength": 2},
        "redis_port": {"type": "integer", "minimum": 1, "default": 6379},
        "redis_username": {"type": "string", "minLength": 1},
        "redis_password": {"type": "string", "minLength": 0},
        "redis_database": {"type": "integer", "minimum": 0, "default": 0},
        "redis_timeout": {"type": "integer", "minimum": 1, "default": 1000},
        "redis_ssl": {"type": "boolean", "default": false},
        "redis_ssl_verify": {"type": "boolean", "default": false},
        "redis_keepalive_timeout": {"type": "integer", "minimum": 1000, "default": 10000},
        "redis_keepalive_pool": {"type": "integer", "minimum": 1, "default": 100},
        "redis_cluster_nodes": {"type": "array", "minItems": 1,
            "items": {"type": "string", "minLength": 2, "maxLength": 100}},
        "redis_cluster_name": {"type": "string"},
        "redis_cluster_ssl": {"type": "boolean", "default": false},
        "redis_cluster_ssl_verify": {"type": "boolean", "default": false}
    });
    if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
        if with_key_ttl {
            p.insert(
                "key_ttl".into(),
                serde_json::json!({"type": "integer", "default": 3600}),
            );
        }
    }
}
