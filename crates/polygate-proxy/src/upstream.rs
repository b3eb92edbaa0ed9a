//! Upstream runtime state: nodes with their counters, priority tiers and the balancers
//! (`roundrobin`, `chash`, `least_conn`, `ewma`).
//!
//! State is process-wide (shared by every worker thread): atomics for per-node counters and a
//! small mutex for the smooth weighted round-robin weights.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use parking_lot::Mutex;
use polygate_core::RequestCtx;
use polygate_model::{KeepalivePool, Timeout, Upstream};

/// One upstream node.
pub struct Node {
    /// Host as configured (name or IP).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Resolved address when `host` is an IP literal.
    pub addr: Option<SocketAddr>,
    /// `host:port`, the connection pool key.
    pub key: Arc<str>,
    /// Host header for `pass_host: node` (port omitted when it is the scheme's default).
    pub host_header: HeaderValue,
    /// Weight.
    pub weight: u32,
    /// Tier (higher first).
    pub priority: i64,
    /// Requests in flight (least_conn, ewma).
    pub active: AtomicUsize,
    /// Exponentially weighted response time in microseconds, as f64 bits (ewma).
    pub ewma_us: AtomicU64,
    /// Marked down (skipped by every balancer); health checks will drive this.
    pub down: AtomicBool,
}

/// `pass_host` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassHost {
    /// Forward the client's Host.
    Pass,
    /// Use the node's host.
    Node,
    /// Use `upstream_host`.
    Rewrite,
}

/// What a `chash` upstream hashes.
#[derive(Debug, Clone)]
pub enum HashOn {
    /// An nginx variable (`remote_addr`, `uri`, `arg_x`, ...).
    Vars(String),
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// The consumer name.
    Consumer,
    /// A template such as `$remote_addr$http_user_agent`.
    VarsCombinations(String),
}

enum Lb {
    RoundRobin(Mutex<Vec<i64>>),
    Chash {
        on: HashOn,
        rings: Vec<Vec<(u32, usize)>>,
    },
    LeastConn(AtomicUsize),
    Ewma,
}

/// A ready-to-use upstream.
pub struct UpstreamRt {
    /// Id, for logs (`inline` for inline upstreams).
    pub id: Arc<str>,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Node indexes per tier, highest priority first.
    tiers: Vec<Vec<usize>>,
    lb: Lb,
    /// Number of retries after the first attempt.
    pub retries: usize,
    /// Budget for retries (None = unlimited).
    pub retry_timeout: Option<Duration>,
    /// Timeouts, if set on the upstream.
    pub timeout: Option<Timeout>,
    /// Host header mode.
    pub pass_host: PassHost,
    /// Host for `pass_host: rewrite`.
    pub upstream_host: Option<HeaderValue>,
    /// `http`, `https`, ...
    pub scheme: String,
    /// Keep-alive pool settings.
    pub keepalive: KeepalivePool,
}

/// FNV-1a with a murmur3 finaliser: stable across processes and versions (so every gateway
/// instance of a cluster maps a key to the same node) and well spread for similar inputs.
fn ring_hash(s: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 32) as u32
}

impl UpstreamRt {
    /// Builds the runtime state of a validated upstream.
    pub fn build(id: &str, u: &Upstream) -> UpstreamRt {
        let scheme = u.scheme.clone().unwrap_or_else(|| "http".into());
        let default_port = if scheme == "https" || scheme == "grpcs" {
            443
        } else {
            80
        };
        let specs = u.nodes.as_ref().map(|n| n.0.clone()).unwrap_or_default();
        let nodes: Vec<Node> = specs
            .iter()
            .map(|n| {
                let port = n.port.unwrap_or(default_port);
                let ip = n
                    .host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .ok();
                let key = match ip {
                    Some(IpAddr::V6(_)) => format!(
                        "[{}]:{port}",
                        n.host.trim_start_matches('[').trim_end_matches(']')
                    ),
                    _ => format!("{}:{port}", n.host),
                };
                let hh = if port == default_port {
                    n.host.clone()
                } else {
                    key.clone()
                };
                Node {
                    host: n.host.clone(),
                    port,
                    addr: ip.map(|ip| SocketAddr::new(ip, port)),
                    key: Arc::from(key.as_str()),
                    host_header: HeaderValue::from_str(&hh)
                        .unwrap_or(HeaderValue::from_static("localhost")),
                    weight: n.weight.clamp(0, u32::MAX as i64) as u32,
                    priority: n.priority,
                    active: AtomicUsize::new(0),
                    ewma_us: AtomicU64::new(0f64.to_bits()),
                    down: AtomicBool::new(false),
                }
            })
            .collect();
        let mut prios: Vec<i64> = nodes.iter().map(|n| n.priority).collect();
        prios.sort_unstable_by(|a, b| b.cmp(a));
        prios.dedup();
        let tiers: Vec<Vec<usize>> = prios
            .iter()
            .map(|p| {
                (0..nodes.len())
                    .filter(|&i| nodes[i].priority == *p)
                    .collect()
            })
            .collect();
        let lb = match u.lb_type.as_deref().unwrap_or("roundrobin") {
            "chash" => {
                let key = u.key.clone().unwrap_or_default();
                let on = match u.hash_on.as_deref().unwrap_or("vars") {
                    "header" => HashOn::Header(key),
                    "cookie" => HashOn::Cookie(key),
                    "consumer" => HashOn::Consumer,
                    "vars_combinations" => HashOn::VarsCombinations(key),
                    _ => HashOn::Vars(key),
                };
                let rings = tiers
                    .iter()
                    .map(|tier| {
                        let mut ring = Vec::new();
                        for &i in tier {
                            let n = &nodes[i];
                            let points = (n.weight as usize).min(100) * 160;
                            for p in 0..points {
                                ring.push((ring_hash(format!("{}#{p}", n.key).as_bytes()), i));
                            }
                        }
                        ring.sort_unstable();
                        ring
                    })
                    .collect();
                Lb::Chash { on, rings }
            }
            "least_conn" => Lb::LeastConn(AtomicUsize::new(0)),
            "ewma" => Lb::Ewma,
            _ => Lb::RoundRobin(Mutex::new(vec![0; nodes.len()])),
        };
        let retries = match u.retries {
            Some(r) if r >= 0 => r as usize,
            _ => nodes.len().saturating_sub(1),
        };
        let pass_host = match u.pass_host.as_deref() {
            Some("node") => PassHost::Node,
            Some("rewrite") => PassHost::Rewrite,
            _ => PassHost::Pass,
        };
        UpstreamRt {
            id: Arc::from(id),
            nodes,
            tiers,
            lb,
            retries,
            retry_timeout: u
                .retry_timeout
                .filter(|t| *t > 0.0)
                .map(polygate_model::secs),
            timeout: u.timeout,
            pass_host,
            upstream_host: u
                .upstream_host
                .as_deref()
                .and_then(|h| HeaderValue::from_str(h).ok()),
            scheme,
            keepalive: u.keepalive_pool.unwrap_or_default(),
        }
    }

    fn usable(&self, i: usize, tried: &[usize]) -> bool {
        let n = &self.nodes[i];
        n.weight > 0 && !n.down.load(Ordering::Relaxed) && !tried.contains(&i)
    }

    /// Picks a node for this request, skipping nodes already tried and nodes marked down;
    /// lower priority tiers are used only when every node of the higher tiers is excluded.
    pub fn pick(&self, ctx: &RequestCtx, tried: &[usize]) -> Option<usize> {
        for (t, tier) in self.tiers.iter().enumerate() {
            if !tier.iter().any(|&i| self.usable(i, tried)) {
                continue;
            }
            return match &self.lb {
                Lb::RoundRobin(state) => {
                    // smooth weighted round-robin (nginx's algorithm) over the usable nodes
                    let mut cur = state.lock();
                    let mut total = 0i64;
                    let mut best: Option<usize> = None;
                    for &i in tier {
                        if !self.usable(i, tried) {
                            continue;
                        }
                        let w = self.nodes[i].weight as i64;
                        cur[i] += w;
                        total += w;
                        if best.is_none_or(|b| cur[i] > cur[b]) {
                            best = Some(i);
                        }
                    }
                    if let Some(b) = best {
                        cur[b] -= total;
                    }
                    best
                }
                Lb::Chash { on, rings } => {
                    let key = hash_key(on, ctx);
                    let ring = &rings[t];
                    if ring.is_empty() {
                        return None;
                    }
                    let h = ring_hash(key.as_bytes());
                    let start = ring.partition_point(|(p, _)| *p < h);
                    (0..ring.len())
                        .map(|k| ring[(start + k) % ring.len()].1)
                        .find(|&i| self.usable(i, tried))
                }
                Lb::LeastConn(rot) => {
                    let off = rot.fetch_add(1, Ordering::Relaxed);
                    let n = tier.len();
                    let mut best: Option<usize> = None;
                    for k in 0..n {
                        let i = tier[(off + k) % n];
                        if !self.usable(i, tried) {
                            continue;
                        }
                        best = match best {
                            None => Some(i),
                            Some(b) => {
                                let (ai, wi) = (
                                    self.nodes[i].active.load(Ordering::Relaxed) as u64 + 1,
                                    self.nodes[i].weight as u64,
                                );
                                let (ab, wb) = (
                                    self.nodes[b].active.load(Ordering::Relaxed) as u64 + 1,
                                    self.nodes[b].weight as u64,
                                );
                                // (ai / wi) < (ab / wb)
                                if ai * wb < ab * wi { Some(i) } else { Some(b) }
                            }
                        };
                    }
                    best
                }
                Lb::Ewma => {
                    let cands: Vec<usize> = tier
                        .iter()
                        .copied()
                        .filter(|&i| self.usable(i, tried))
                        .collect();
                    let score = |i: usize| {
                        let n = &self.nodes[i];
                        f64::from_bits(n.ewma_us.load(Ordering::Relaxed))
                            * (n.active.load(Ordering::Relaxed) as f64 + 1.0)
                    };
                    match cands.len() {
                        0 => None,
                        1 => Some(cands[0]),
                        len => {
                            let a = cands[fastrand::usize(..len)];
                            let mut b = cands[fastrand::usize(..len - 1)];
                            if b == a {
                                b = cands[len - 1];
                            }
                            Some(if score(a) <= score(b) { a } else { b })
                        }
                    }
                }
            };
        }
        None
    }

    /// Records a finished attempt's latency for `ewma`.
    pub fn observe(&self, i: usize, latency: Duration) {
        if !matches!(self.lb, Lb::Ewma) {
            return;
        }
        let n = &self.nodes[i];
        let sample = latency.as_secs_f64() * 1e6;
        let old = f64::from_bits(n.ewma_us.load(Ordering::Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old * 0.8 + sample * 0.2
        };
        n.ewma_us.store(new.to_bits(), Ordering::Relaxed);
    }
}

fn hash_key(on: &HashOn, ctx: &RequestCtx) -> String {
    use polygate_router::VarSource;
    match on {
        HashOn::Vars(v) => ctx.var(v).map(|c| c.into_owned()).unwrap_or_default(),
        HashOn::Header(h) => ctx.header(h).unwrap_or_default().to_owned(),
        HashOn::Cookie(c) => ctx.cookie(c).unwrap_or_default().to_owned(),
        HashOn::Consumer => ctx
            .consumer
            .as_ref()
            .map(|c| c.username.clone())
            .unwrap_or_default(),
        HashOn::VarsCombinations(tpl) => {
            // `$a$b` or `$a-$b`: replace each $name with its value
            let mut out = String::new();
            let mut rest = tpl.as_str();
            while let Some(pos) = rest.find('$') {
                out.push_str(&rest[..pos]);
                let after = &rest[pos + 1..];
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                if let Some(v) = ctx.var(&after[..end]) {
                    out.push_str(&v);
                }
                rest = &after[end..];
            }
            out.push_str(rest);
            out
        }
    }
}

/// RAII guard counting a request in flight on a node (kept until the response body ends).
pub struct ActiveGuard {
    up: Arc<UpstreamRt>,
    idx: usize,
}

impl ActiveGuard {
    /// Counts one request on node `idx` of `up` until dropped.
    pub fn new(up: Arc<UpstreamRt>, idx: usize) -> Self {
        up.nodes[idx].active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard { up, idx }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.up.nodes[self.idx]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}
