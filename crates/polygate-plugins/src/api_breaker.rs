//! `api-breaker` (priority 1005, access and log phases): a circuit breaker per host and URI.
//! After every `unhealthy.failures` upstream answers with a status in
//! `unhealthy.http_statuses`, requests are answered with `break_response_code` (and
//! `break_response_body`, `break_response_headers`) for 2, 4, 8, ... seconds, at most
//! `max_breaker_sec`; `healthy.successes` answers in `healthy.http_statuses` close it again.
//! The counts are shared by the worker threads of the process, as APISIX's shared dict is.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::{HeaderName, StatusCode};
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use serde::Deserialize;
use serde_json::Value;

use crate::limit::Store;
use crate::util::{Template, parse_conf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderConf {
    key: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unhealthy {
    #[serde(default = "d500")]
    http_statuses: Vec<u16>,
    #[serde(default = "d3")]
    failures: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Healthy {
    #[serde(default = "d200")]
    http_statuses: Vec<u16>,
    #[serde(default = "d3")]
    successes: u64,
}

fn d500() -> Vec<u16> {
    vec![500]
}
fn d200() -> Vec<u16> {
    vec![200]
}
fn d3() -> u64 {
    3
}
fn d300() -> u64 {
    300
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    break_response_code: u16,
    break_response_body: Option<String>,
    break_response_headers: Option<Vec<HeaderConf>>,
    #[serde(default = "d300")]
    max_breaker_sec: u64,
    unhealthy: Option<Unhealthy>,
    healthy: Option<Healthy>,
}

/// The state of one host and URI.
#[derive(Default)]
struct State {
    unhealthy: u64,
    healthy: u64,
    /// When the breaker last opened.
    opened: Option<Instant>,
}

static STATES: LazyLock<Store<State>> = LazyLock::new(Store::new);

struct ApiBreaker {
    code: StatusCode,
    body: Option<String>,
    headers: Vec<(HeaderName, Template)>,
    max: Duration,
    bad: Vec<u16>,
    failures: u64,
    good: Vec<u16>,
    successes: u64,
    scope: String,
}

/// Factory of `api-breaker`.
pub struct ApiBreakerFactory;

impl PluginFactory for ApiBreakerFactory {
    fn name(&self) -> &str {
        "api-breaker"
    }
    fn priority(&self) -> i32 {
        1005
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "break_response_code": {"type": "integer", "minimum": 200, "maximum": 599},
            "break_response_body": {"type": "string"},
            "break_response_headers": {"type": "array", "items": {"type": "object",
                "properties": {"key": {"type": "string", "minLength": 1},
                               "value": {"type": "string", "minLength": 1}},
                "required": ["key", "value"]}},
            "max_breaker_sec": {"type": "integer", "minimum": 3, "default": 300},
            "unhealthy": {"type": "object", "properties": {
                "http_statuses": {"type": "array", "minItems": 1, "uniqueItems": true,
                    "items": {"type": "integer", "minimum": 500, "maximum": 599},
                    "default": [500]},
                "failures": {"type": "integer", "minimum": 1, "default": 3}}},
            "healthy": {"type": "object", "properties": {
                "http_statuses": {"type": "array", "minItems": 1, "uniqueItems": true,
                    "items": {"type": "integer", "minimum": 200, "maximum": 499},
                    "default": [200]},
                "successes": {"type": "integer", "minimum": 1, "default": 3}}},
            "_meta": {"type": "object"}
        }, "required": ["break_response_code"], "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        let break_status = crate::util::status(c.break_response_code, "break_response_code")?;
        if c.max_breaker_sec < 3 {
            return Err(ConfError::at("max_breaker_sec", "must be at least 3"));
        }
        let un = c.unhealthy.unwrap_or(Unhealthy {
            http_statuses: d500(),
            failures: 3,
        });
        let he = c.healthy.unwrap_or(Healthy {
            http_statuses: d200(),
            successes: 3,
        });
        for (i, s) in un.http_statuses.iter().enumerate() {
            if !(500..=599).contains(s) {
                return Err(ConfError::at(
                    format!("unhealthy.http_statuses[{i}]"),
                    "must be 500 to 599",
                ));
            }
        }
        for (i, s) in he.http_statuses.iter().enumerate() {
            if !(200..=499).contains(s) {
                return Err(ConfError::at(
                    format!("healthy.http_statuses[{i}]"),
                    "must be 200 to 499",
                ));
            }
        }
        if un.failures < 1 {
            return Err(ConfError::at("unhealthy.failures", "must be at least 1"));
        }
        if he.successes < 1 {
            return Err(ConfError::at("healthy.successes", "must be at least 1"));
        }
        let mut headers = Vec::new();
        for (i, h) in c.break_response_headers.iter().flatten().enumerate() {
            let n = HeaderName::from_bytes(h.key.as_bytes()).map_err(|_| {
                ConfError::at(
                    format!("break_response_headers[{i}].key"),
                    "invalid header name",
                )
            })?;
            headers.push((n, Template::parse(&h.value)));
        }
        Ok(Arc::new(ApiBreaker {
            code: break_status,
            body: c.break_response_body,
            headers,
            max: Duration::from_secs(c.max_breaker_sec),
            bad: un.http_statuses,
            failures: un.failures,
            good: he.http_statuses,
            successes: he.successes,
            scope: crate::limit::scope(None, conf),
        }))
    }
}

impl ApiBreaker {
    fn key(&self, ctx: &RequestCtx) -> String {
        format!(
            "{}:{}{}",
            self.scope,
            ctx.host.as_deref().unwrap_or(""),
            ctx.path
        )
    }

    fn stale(&self) -> impl Fn(&State) -> bool + '_ {
        move |s: &State| {
            s.opened
                .is_none_or(|t| t.elapsed() > self.max + Duration::from_secs(1))
                && s.healthy == 0
                && s.unhealthy == 0
        }
    }
}

impl Plugin for ApiBreaker {
    fn name(&self) -> &str {
        "api-breaker"
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let key = self.key(ctx);
        let open = STATES.with(&key, State::default, self.stale(), |s| {
            let Some(opened) = s.opened else {
                return false;
            };
            if s.unhealthy == 0 {
                return false;
            }
            let times = (s.unhealthy / self.failures).clamp(1, 62) as u32;
            let wait = Duration::from_secs(2u64.saturating_pow(times)).min(self.max);
            opened.elapsed() <= wait
        });
        if !open {
            return Flow::Continue;
        }
        let mut r = match &self.body {
            Some(b) => PluginResponse::new(self.code, b.clone()),
            None => PluginResponse::status_page(self.code),
        };
        if self.body.is_some() {
            for (n, t) in &self.headers {
                if let Ok(v) = http::HeaderValue::from_str(&t.render(ctx)) {
                    // nginx keeps one Content-Type: the last one set wins
                    if *n == http::header::CONTENT_TYPE {
                        r.headers.insert(n.clone(), v);
                    } else {
                        r.headers.append(n.clone(), v);
                    }
                }
            }
        }
        Flow::Respond(r)
    }

    fn log(&self, ctx: &RequestCtx) {
        // only the upstream's own answers count
        if ctx.local_response || ctx.upstream_addr.is_none() {
            return;
        }
        let Some(status) = ctx.status.map(|s| s.as_u16()) else {
            return;
        };
        let key = self.key(ctx);
        STATES.with(&key, State::default, self.stale(), |s| {
            if self.bad.contains(&status) {
                s.unhealthy += 1;
                s.healthy = 0;
                if s.unhealthy % self.failures == 0 {
                    s.opened = Some(Instant::now());
                }
            } else if self.good.contains(&status) && s.unhealthy > 0 {
                s.healthy += 1;
                if s.healthy >= self.successes {
                    *s = State::default();
                }
            }
        });
    }
}
