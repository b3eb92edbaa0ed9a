//! Upstream runtime state: nodes with their counters, priority tiers and the balancers
//! (`roundrobin`, `chash`, `least_conn`, `ewma`).
//!
//! State is process-wide (shared by every worker thread): atomics for per-node counters and a
//! small mutex for the smooth weighted round-robin weights.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// The node's process-wide health when the upstream has `checks` (an unhealthy node is
    /// skipped while any healthy one is left).
    pub health: Option<Arc<crate::health::NodeHealth>>,
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
    /// The TLS client side (`scheme: https`/`grpcs`); set by the snapshot builder.
    pub tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// Health checks (`checks`), when configured.
    pub checks: Option<Arc<crate::health::UpstreamChecks>>,
}

/// CRC-32 (IEEE), the table form of zlib's and of nginx's `ngx_crc32`.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Continues a CRC-32 register `c` over `bytes` (no pre- or post-inversion).
fn crc32_update(mut c: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

/// CRC-32 of `s` (`ngx.crc32_short`).
fn crc32(s: &[u8]) -> u32 {
    crc32_update(0xffff_ffff, s) ^ 0xffff_ffff
}

/// Points per unit of weight on the ring (lua-resty-chash's `CONSISTENT_POINTS`).
const POINTS_PER_WEIGHT: u64 = 160;
/// The most points one ring gets; weights that would need more are scaled down (APISIX
/// would allocate them all).
const MAX_RING_POINTS: u64 = 2_000_000;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The ring of one priority tier, placed as APISIX's `chash` balancer places it (with
/// lua-resty-chash): each node, named `host:port` with the colon as a NUL byte, gets weight / gcd × 160
/// points; the points of a node chain CRC-32 from the CRC register of its name, each over the
/// previous point's little-endian bytes. So a key goes to the same node under APISIX and
/// polygate.
fn apisix_ring(nodes: &[Node], tier: &[usize]) -> Vec<(u32, usize)> {
    let g = tier
        .iter()
        .fold(0u64, |g, &i| gcd(g, u64::from(nodes[i].weight)))
        .max(1);
    let units = |i: usize| u64::from(nodes[i].weight) / g;
    let total: u64 = tier.iter().map(|&i| units(i) * POINTS_PER_WEIGHT).sum();
    // pathological weights: scale to the bound, keeping proportions
    let scale = if total > MAX_RING_POINTS {
        MAX_RING_POINTS as f64 / total as f64
    } else {
        1.0
    };
    let mut ring = Vec::with_capacity(total.min(MAX_RING_POINTS) as usize);
    for &i in tier {
        let num = ((units(i) * POINTS_PER_WEIGHT) as f64 * scale) as u64;
        // APISIX names a node `host:port` with each ':' replaced by a NUL byte
        let id = nodes[i].key.replace(':', "\0");
        // the CRC register of the name, before its final inversion
        let base = crc32(id.as_bytes()) ^ 0xffff_ffff;
        let mut prev = [0u8; 4];
        for _ in 0..num {
            let h = crc32_update(base, &prev) ^ 0xffff_ffff;
            ring.push((h, i));
            prev = h.to_le_bytes();
        }
    }
    // stable: equal hashes keep node order
    ring.sort_by_key(|&(h, _)| h);
    ring
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
                    health: None,
                }
            })
            .collect();
        let checks = u
            .checks
            .as_ref()
            .and_then(crate::health::UpstreamChecks::new)
            .map(Arc::new);
        let mut nodes = nodes;
        if checks.is_some() {
            let up: Arc<str> = Arc::from(id);
            for n in &mut nodes {
                n.health = Some(crate::health::NodeHealth::of(&up, &n.key));
            }
        }
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
                let rings = tiers.iter().map(|tier| apisix_ring(&nodes, tier)).collect();
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
            tls: None,
            checks,
        }
    }

    fn usable(&self, i: usize, tried: &[usize], healthy_only: bool) -> bool {
        let n = &self.nodes[i];
        n.weight > 0
            && !(healthy_only && n.health.as_ref().is_some_and(|h| !h.is_healthy()))
            && !tried.contains(&i)
    }

    /// Picks a node for this request, skipping nodes already tried and unhealthy nodes;
    /// lower priority tiers are used only when every node of the higher tiers is excluded.
    /// When health checks leave no node at all, every node is a candidate again (APISIX
    /// tries them rather than failing closed).
    pub fn pick(&self, ctx: &RequestCtx, tried: &[usize]) -> Option<usize> {
        if self.checks.is_some()
            && let Some(i) = self.pick_from(ctx, tried, true)
        {
            return Some(i);
        }
        self.pick_from(ctx, tried, false)
    }

    fn pick_from(&self, ctx: &RequestCtx, tried: &[usize], healthy_only: bool) -> Option<usize> {
        let usable = |i: usize, tried: &[usize]| self.usable(i, tried, healthy_only);
        for (t, tier) in self.tiers.iter().enumerate() {
            if !tier.iter().any(|&i| usable(i, tried)) {
                continue;
            }
            return match &self.lb {
                Lb::RoundRobin(state) => {
                    // smooth weighted round-robin (nginx's algorithm) over the usable nodes
                    let mut cur = state.lock();
                    let mut total = 0i64;
                    let mut best: Option<usize> = None;
                    for &i in tier {
                        if !usable(i, tried) {
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
                    // lua-resty-chash's find: the first point at or above the key's hash,
                    // wrapping to the first; retries walk on from there (its `next`)
                    let h = crc32(key.as_bytes());
                    let start = ring.partition_point(|(p, _)| *p < h) % ring.len();
                    (0..ring.len())
                        .map(|k| ring[(start + k) % ring.len()].1)
                        .find(|&i| usable(i, tried))
                }
                Lb::LeastConn(rot) => {
                    let off = rot.fetch_add(1, Ordering::Relaxed);
                    let n = tier.len();
                    let mut best: Option<usize> = None;
                    for k in 0..n {
                        let i = tier[(off + k) % n];
                        if !usable(i, tried) {
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
                    let cands: Vec<usize> =
                        tier.iter().copied().filter(|&i| usable(i, tried)).collect();
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

/// The value hashed for a request; an empty or missing one falls back to the client address,
/// as APISIX's `fetch_chash_hash_key` does.
fn hash_key(on: &HashOn, ctx: &RequestCtx) -> String {
    let k = hash_key_of(on, ctx);
    if k.is_empty() {
        ctx.client_addr.ip().to_string()
    } else {
        k
    }
}

fn hash_key_of(on: &HashOn, ctx: &RequestCtx) -> String {
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

/// Runtime upstreams built for plugins' inline upstreams (traffic-split), by their key.
static INLINE: std::sync::LazyLock<
    parking_lot::Mutex<std::collections::HashMap<String, Arc<UpstreamRt>>>,
> = std::sync::LazyLock::new(|| parking_lot::Mutex::new(std::collections::HashMap::new()));

/// The upstream a plugin chose ([`polygate_core::ctx::UpstreamOverride`]): an `upstreams` resource of the
/// snapshot, or a plugin's inline upstream built once (and kept while its key is used). An id
/// naming no upstream is APISIX's 500 `failed to fetch upstream info by upstream id`.
pub fn resolve_override(
    snap: &crate::snapshot::Snapshot,
    o: &polygate_core::ctx::UpstreamOverride,
) -> Result<Arc<UpstreamRt>, Box<polygate_core::PluginResponse>> {
    use polygate_core::ctx::UpstreamOverride;
    match o {
        UpstreamOverride::Id(id) => snap.upstream(id).cloned().ok_or_else(|| {
            tracing::error!("traffic-split: no upstream {id:?}");
            Box::new(polygate_core::PluginResponse::new(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("failed to fetch upstream info by upstream id: {id}"),
            ))
        }),
        UpstreamOverride::Inline { key, conf } => {
            // the TLS store is part of the key: a certificate change rebuilds the client
            let k = format!("{key}@{:p}", Arc::as_ptr(&snap.tls));
            if let Some(up) = INLINE.lock().get(&k) {
                return Ok(up.clone());
            }
            let mut rt = UpstreamRt::build(key, conf);
            let alpn: &[&[u8]] = match rt.scheme.as_str() {
                "https" => &[b"http/1.1"],
                "grpcs" => &[b"h2"],
                _ => &[],
            };
            if !alpn.is_empty() {
                let mut errs = polygate_model::ConfigErrors::default();
                rt.tls = crate::tls::upstream_tls(conf, &snap.tls, alpn, key, &mut errs);
                if let Some(e) = errs.0.first() {
                    tracing::error!("{key}: {}: {}", e.path, e.message);
                }
            }
            let up = Arc::new(rt);
            let mut m = INLINE.lock();
            if m.len() >= 1024 {
                m.clear();
            }
            m.insert(k, up.clone());
            Ok(up)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_zlib_crc32() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    fn node(key: &str, weight: u32) -> Node {
        let (host, port) = key.rsplit_once(':').unwrap();
        Node {
            host: host.into(),
            port: port.parse().unwrap(),
            addr: None,
            key: Arc::from(key),
            host_header: HeaderValue::from_static("x"),
            weight,
            priority: 0,
            active: AtomicUsize::new(0),
            ewma_us: AtomicU64::new(0f64.to_bits()),
            health: None,
        }
    }

    fn place(nodes: &[(&str, u32)], key: &str) -> String {
        let nodes: Vec<Node> = nodes.iter().map(|(k, w)| node(k, *w)).collect();
        let tier: Vec<usize> = (0..nodes.len()).collect();
        let ring = apisix_ring(&nodes, &tier);
        let h = crc32(key.as_bytes());
        let at = ring.partition_point(|(p, _)| *p < h) % ring.len();
        nodes[ring[at].1].key.to_string()
    }

    /// APISIX's `t/node/chash-balance.t` TESTS 2, 4 and 6: with `key: remote_addr` and the
    /// client 127.0.0.1, two nodes send everything to 1980, three to 1982.
    #[test]
    fn placement_matches_apisix() {
        let two = [("127.0.0.1:1980", 1), ("127.0.0.1:1981", 1)];
        assert_eq!(place(&two, "127.0.0.1"), "127.0.0.1:1980");
        let three = [
            ("127.0.0.1:1980", 1),
            ("127.0.0.1:1981", 1),
            ("127.0.0.1:1982", 1),
        ];
        assert_eq!(place(&three, "127.0.0.1"), "127.0.0.1:1982");
        let one = [
            ("127.0.0.1:1980", 1),
            ("127.0.0.1:1981", 0),
            ("127.0.0.1:1982", 0),
        ];
        assert_eq!(place(&one, "127.0.0.1"), "127.0.0.1:1980");
    }

    #[test]
    fn gcd_of_weights() {
        assert_eq!(gcd(gcd(0, 1_000_000_000), 4_000_000_000), 1_000_000_000);
        assert_eq!(gcd(0, 0), 0);
    }
}
