//! `prometheus` (priority 500, log phase): APISIX's per-request metrics, with its names and
//! labels, on the metrics listener (`/metrics` and APISIX's `/apisix/prometheus/metrics`):
//!
//! - `apisix_http_status{code, route, matched_uri, matched_host, service, consumer, node,
//!   request_type, request_llm_model, llm_model, response_source}` (counter),
//! - `apisix_http_latency{type, route, service, consumer, node, request_type,
//!   request_llm_model, llm_model}` (histogram in milliseconds, APISIX's buckets; `type` is
//!   `request`, `upstream` and `apisix`),
//! - `apisix_bandwidth{type, route, service, consumer, node, ...}` (`ingress`, `egress` bytes).
//!
//! Field: `prefer_name` (route and service names instead of ids). The process-wide gauges
//! (`apisix_nginx_http_current_connections`, `apisix_http_requests_total`,
//! `apisix_etcd_reachable`, `apisix_node_info`, `apisix_upstream_status`) are the proxy's.
//!
//! Cost on the request path: each worker thread counts into its own map (a lock nobody else
//! takes except a scrape), keyed by the label values.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock, Once};

use parking_lot::Mutex;
use polygate_core::{ConfError, Plugin, PluginFactory, RequestCtx};
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

/// APISIX's default latency buckets (milliseconds).
pub const BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(default)]
    prefer_name: bool,
}

/// Factory of `prometheus`.
pub struct PrometheusFactory;

struct Prometheus {
    prefer_name: bool,
}

impl PluginFactory for PrometheusFactory {
    fn name(&self) -> &str {
        "prometheus"
    }

    fn priority(&self) -> i32 {
        500
    }

    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "prefer_name": {"type": "boolean", "default": false},
            "_meta": {"type": "object"}
        }, "additionalProperties": false})
    }

    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: Conf = parse_conf(conf)?;
        install_exporter();
        Ok(Arc::new(Prometheus {
            prefer_name: c.prefer_name,
        }))
    }
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    route: Arc<str>,
    service: Arc<str>,
    consumer: Arc<str>,
    node: Option<IpAddr>,
    matched_uri: Arc<str>,
    matched_host: Arc<str>,
    code: u16,
    local: bool,
}

#[derive(Default, Clone)]
struct Cell {
    count: u64,
    /// Per latency type (request, upstream, apisix): bucket counts (the last is +Inf).
    buckets: [[u64; 16]; 3],
    sums: [f64; 3],
    counts: [u64; 3],
    ingress: u64,
    egress: u64,
}

type Shard = Arc<Mutex<HashMap<Key, Cell>>>;

/// Route, service, consumer and node: the labels of latency and bandwidth series.
type Series = (Arc<str>, Arc<str>, Arc<str>, Option<IpAddr>);

static SHARDS: LazyLock<Mutex<Vec<Shard>>> = LazyLock::new(|| Mutex::new(Vec::new()));

thread_local! {
    static MINE: Shard = {
        let s: Shard = Arc::default();
        SHARDS.lock().push(s.clone());
        s
    };
}

static EMPTY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(""));

fn install_exporter() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        polygate_core::exporters::add_metrics_exporter(Arc::new(|out: &mut String| render(out)));
    });
}

fn observe(cell: &mut Cell, kind: usize, ms: f64) {
    let i = BUCKETS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(BUCKETS.len());
    cell.buckets[kind][i] += 1;
    cell.sums[kind] += ms;
    cell.counts[kind] += 1;
}

/// The request's size on the wire as nginx's `$request_length` counts it (request line,
/// headers, body), estimated from what was parsed.
fn request_length(ctx: &RequestCtx) -> u64 {
    let mut n = ctx.method.as_str().len() + ctx.request_uri.len() + 12;
    for (k, v) in &ctx.headers {
        n += k.as_str().len() + v.len() + 4;
    }
    let body = ctx
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    n as u64 + 2 + body
}

impl Plugin for Prometheus {
    fn name(&self) -> &str {
        "prometheus"
    }

    fn log(&self, ctx: &RequestCtx) {
        let facts = ctx.route_facts.as_deref();
        let route = match (self.prefer_name, facts.and_then(|f| f.name.clone())) {
            (true, Some(n)) => n,
            _ => ctx.route_id.clone().unwrap_or_else(|| EMPTY.clone()),
        };
        // APISIX: without a service, the route's host stands in
        let service = match (self.prefer_name, facts.and_then(|f| f.service_name.clone())) {
            (true, Some(n)) => n,
            _ => ctx
                .service_id
                .clone()
                .or_else(|| facts.map(|f| f.host.clone()))
                .unwrap_or_else(|| EMPTY.clone()),
        };
        let key = Key {
            route,
            service,
            consumer: ctx
                .consumer
                .as_ref()
                .map_or_else(|| EMPTY.clone(), |c| c.name.clone()),
            node: ctx.upstream_addr.map(|a| a.ip()),
            matched_uri: facts.map_or_else(|| EMPTY.clone(), |f| f.uri.clone()),
            matched_host: facts.map_or_else(|| EMPTY.clone(), |f| f.host.clone()),
            code: ctx.status.map_or(0, |s| s.as_u16()),
            local: ctx.local_response,
        };
        let total = ctx.started.elapsed().as_secs_f64() * 1000.0;
        let upstream = ctx.upstream_latency.map(|d| d.as_secs_f64() * 1000.0);
        let ingress = request_length(ctx);
        // status line and headers are not counted by the body counter: a typical head
        let egress = ctx.response_body_bytes + 150;
        MINE.with(|m| {
            let mut map = m.lock();
            let cell = match map.get_mut(&key) {
                Some(c) => c,
                None => map.entry(key).or_default(),
            };
            cell.count += 1;
            observe(cell, 0, total);
            if let Some(u) = upstream {
                observe(cell, 1, u);
                observe(cell, 2, (total - u).max(0.0));
            }
            cell.ingress += ingress;
            cell.egress += egress;
        });
    }
}

/// Escapes a label value (`\`, `"`, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends the plugin's metrics (every worker thread's counts merged) in the text format.
pub fn render(out: &mut String) {
    let mut all: BTreeMap<Key, Cell> = BTreeMap::new();
    let shards: Vec<Shard> = SHARDS.lock().clone();
    for s in shards {
        for (k, c) in s.lock().iter() {
            let e = all.entry(k.clone()).or_default();
            e.count += c.count;
            for t in 0..3 {
                for b in 0..16 {
                    e.buckets[t][b] += c.buckets[t][b];
                }
                e.sums[t] += c.sums[t];
                e.counts[t] += c.counts[t];
            }
            e.ingress += c.ingress;
            e.egress += c.egress;
        }
    }
    if all.is_empty() {
        return;
    }
    let tail = "request_type=\"traditional_http\",request_llm_model=\"\",llm_model=\"\"";
    out.push_str("# HELP apisix_http_status HTTP status codes per service in APISIX\n");
    out.push_str("# TYPE apisix_http_status counter\n");
    for (k, c) in &all {
        let _ = writeln!(
            out,
            "apisix_http_status{{code=\"{}\",route=\"{}\",matched_uri=\"{}\",matched_host=\"{}\",\
             service=\"{}\",consumer=\"{}\",node=\"{}\",{tail},response_source=\"{}\"}} {}",
            k.code,
            esc(&k.route),
            esc(&k.matched_uri),
            esc(&k.matched_host),
            esc(&k.service),
            esc(&k.consumer),
            k.node.map(|n| n.to_string()).unwrap_or_default(),
            if k.local { "apisix" } else { "upstream" },
            c.count
        );
    }
    // latency and bandwidth are per route/service/consumer/node, whatever the status
    let mut by: BTreeMap<Series, Cell> = BTreeMap::new();
    for (k, c) in all {
        let e = by
            .entry((k.route, k.service, k.consumer, k.node))
            .or_default();
        for t in 0..3 {
            for b in 0..16 {
                e.buckets[t][b] += c.buckets[t][b];
            }
            e.sums[t] += c.sums[t];
            e.counts[t] += c.counts[t];
        }
        e.ingress += c.ingress;
        e.egress += c.egress;
    }
    let labels = |(r, s, c, n): &Series| {
        format!(
            "route=\"{}\",service=\"{}\",consumer=\"{}\",node=\"{}\",{tail}",
            esc(r),
            esc(s),
            esc(c),
            n.map(|n| n.to_string()).unwrap_or_default()
        )
    };
    out.push_str(
        "# HELP apisix_http_latency HTTP request latency in milliseconds per service in APISIX\n",
    );
    out.push_str("# TYPE apisix_http_latency histogram\n");
    for (k, c) in &by {
        let l = labels(k);
        for (t, name) in ["request", "upstream", "apisix"].iter().enumerate() {
            if c.counts[t] == 0 {
                continue;
            }
            let mut acc = 0;
            for (i, b) in BUCKETS.iter().enumerate() {
                acc += c.buckets[t][i];
                let _ = writeln!(
                    out,
                    "apisix_http_latency_bucket{{type=\"{name}\",{l},le=\"{b:.0}\"}} {acc}"
                );
            }
            acc += c.buckets[t][15];
            let _ = writeln!(
                out,
                "apisix_http_latency_bucket{{type=\"{name}\",{l},le=\"+Inf\"}} {acc}"
            );
            let _ = writeln!(
                out,
                "apisix_http_latency_sum{{type=\"{name}\",{l}}} {}",
                c.sums[t]
            );
            let _ = writeln!(
                out,
                "apisix_http_latency_count{{type=\"{name}\",{l}}} {}",
                c.counts[t]
            );
        }
    }
    out.push_str(
        "# HELP apisix_bandwidth Total bandwidth in bytes consumed per service in APISIX\n",
    );
    out.push_str("# TYPE apisix_bandwidth counter\n");
    for (k, c) in &by {
        let l = labels(k);
        let _ = writeln!(out, "apisix_bandwidth{{type=\"egress\",{l}}} {}", c.egress);
        let _ = writeln!(
            out,
            "apisix_bandwidth{{type=\"ingress\",{l}}} {}",
            c.ingress
        );
    }
}
