//! Upstream health checks with APISIX's `checks` fields (lua-resty-healthcheck's semantics):
//! active probes (http, https, tcp) run by one checker per upstream on the main thread, and
//! passive verdicts taken from proxied requests on the worker threads.
//!
//! Health belongs to the process, not to a worker or a snapshot: each (upstream, node) has one
//! [`NodeHealth`], found again by every snapshot that keeps the node, so a configuration
//! commit neither forgets that a node is down nor resets its counters. A node turns unhealthy
//! after `unhealthy.http_failures` / `tcp_failures` / `timeouts` consecutive failures of that
//! kind, and healthy again after `healthy.successes` consecutive successes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use polygate_model::{ActiveCheck, HealthChecks};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::snapshot::Snapshot;
use crate::upstream::{Node, UpstreamRt};

/// What one probe or one proxied attempt says about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A status in the `healthy.http_statuses` list (or a tcp probe that connected).
    Success,
    /// A status in the `unhealthy.http_statuses` list.
    HttpFailure,
    /// The connection failed (refused, reset, TLS handshake).
    TcpFailure,
    /// No answer in time.
    Timeout,
    /// A status in neither list: counts for nothing.
    Neutral,
}

/// Thresholds of one kind of check (active or passive).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    successes: u32,
    http_failures: u32,
    tcp_failures: u32,
    timeouts: u32,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    success: u32,
    http_failure: u32,
    tcp_failure: u32,
    timeout_failure: u32,
}

/// The health of one node of one upstream, shared by every snapshot and thread.
#[derive(Debug)]
pub struct NodeHealth {
    healthy: AtomicBool,
    counters: Mutex<Counters>,
    upstream: Arc<str>,
    node: Arc<str>,
}

type Registry = Mutex<HashMap<(Arc<str>, Arc<str>), Weak<NodeHealth>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Default::default)
}

impl NodeHealth {
    /// The process-wide health of `node` in upstream `upstream` (created healthy).
    pub fn of(upstream: &Arc<str>, node: &Arc<str>) -> Arc<NodeHealth> {
        let mut r = registry().lock();
        let key = (upstream.clone(), node.clone());
        if let Some(h) = r.get(&key).and_then(Weak::upgrade) {
            return h;
        }
        r.retain(|_, w| w.strong_count() > 0);
        let h = Arc::new(NodeHealth {
            healthy: AtomicBool::new(true),
            counters: Mutex::new(Counters::default()),
            upstream: upstream.clone(),
            node: node.clone(),
        });
        r.insert(key, Arc::downgrade(&h));
        h
    }

    /// Whether the node gets traffic.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts a verdict; `source` (`active`/`passive`) goes into the log line of a change.
    pub fn report(&self, v: Verdict, th: &Thresholds, source: &str) {
        if v == Verdict::Neutral {
            return;
        }
        let mut c = self.counters.lock();
        let healthy = self.is_healthy();
        let flip = match v {
            Verdict::Success => {
                *c = Counters {
                    success: c.success.saturating_add(1),
                    ..Counters::default()
                };
                !healthy && c.success >= th.successes
            }
            Verdict::HttpFailure => {
                c.success = 0;
                c.http_failure = c.http_failure.saturating_add(1);
                healthy && c.http_failure >= th.http_failures
            }
            Verdict::TcpFailure => {
                c.success = 0;
                c.tcp_failure = c.tcp_failure.saturating_add(1);
                healthy && c.tcp_failure >= th.tcp_failures
            }
            Verdict::Timeout => {
                c.success = 0;
                c.timeout_failure = c.timeout_failure.saturating_add(1);
                healthy && c.timeout_failure >= th.timeouts
            }
            Verdict::Neutral => false,
        };
        if flip {
            self.healthy.store(!healthy, Ordering::Relaxed);
            let counts = *c;
            *c = Counters::default();
            if healthy {
                tracing::warn!(
                    upstream = %self.upstream,
                    node = %self.node,
                    "node unhealthy ({source} check: {v:?}; {} http, {} tcp, {} timeouts)",
                    counts.http_failure,
                    counts.tcp_failure,
                    counts.timeout_failure
                );
            } else {
                tracing::warn!(
                    upstream = %self.upstream,
                    node = %self.node,
                    "node healthy again ({source} check: {} successes)",
                    counts.success
                );
            }
        }
    }

    fn status(&self) -> &'static str {
        let c = self.counters.lock();
        match (self.is_healthy(), c.success) {
            (true, _) if c.http_failure + c.tcp_failure + c.timeout_failure > 0 => "mostly_healthy",
            (true, _) => "healthy",
            (false, s) if s > 0 => "mostly_unhealthy",
            (false, _) => "unhealthy",
        }
    }
}

/// The checks of one upstream, resolved for the hot path.
#[derive(Debug)]
pub struct UpstreamChecks {
    /// The configuration.
    pub conf: HealthChecks,
    active: Thresholds,
    passive: Option<(Thresholds, Vec<u16>, Vec<u16>, bool)>,
}

impl UpstreamChecks {
    /// Resolves a validated `checks`.
    pub fn new(conf: &HealthChecks) -> Option<UpstreamChecks> {
        let a = conf.active.as_ref()?;
        Some(UpstreamChecks {
            active: Thresholds {
                successes: a.healthy.successes,
                http_failures: a.unhealthy.http_failures,
                tcp_failures: a.unhealthy.tcp_failures,
                timeouts: a.unhealthy.timeouts,
            },
            passive: conf.passive.as_ref().map(|p| {
                (
                    Thresholds {
                        successes: p.healthy.successes,
                        http_failures: p.unhealthy.http_failures,
                        tcp_failures: p.unhealthy.tcp_failures,
                        timeouts: p.unhealthy.timeouts,
                    },
                    p.healthy.http_statuses.clone(),
                    p.unhealthy.http_statuses.clone(),
                    p.check_type == "tcp",
                )
            }),
            conf: conf.clone(),
        })
    }

    /// Counts a proxied attempt on `node` when passive checks are configured. `status` is the
    /// response status; `None` with `failure` set for attempts that got no response.
    pub fn passive(&self, node: &Node, status: Option<u16>, failure: Option<Verdict>) {
        let (Some((th, ok, bad, tcp_only)), Some(h)) = (&self.passive, &node.health) else {
            return;
        };
        let v = match (status, failure) {
            (_, Some(f)) => f,
            (Some(_), None) if *tcp_only => Verdict::Success,
            (Some(s), None) if bad.contains(&s) => Verdict::HttpFailure,
            (Some(s), None) if ok.contains(&s) => Verdict::Success,
            _ => Verdict::Neutral,
        };
        h.report(v, th, "passive");
    }
}

/// One probe of `node`.
async fn probe(node: &Node, a: &ActiveCheck, tls: Option<&Arc<rustls::ClientConfig>>) -> Verdict {
    let port = a.port.unwrap_or(node.port);
    let limit = polygate_model::secs(a.timeout);
    let fut = async {
        let addr = match node.addr {
            Some(x) => SocketAddr::new(x.ip(), port),
            None => match tokio::net::lookup_host((node.host.as_str(), port)).await {
                Ok(mut it) => match it.next() {
                    Some(x) => x,
                    None => return Verdict::TcpFailure,
                },
                Err(_) => return Verdict::TcpFailure,
            },
        };
        let Ok(tcp) = TcpStream::connect(addr).await else {
            return Verdict::TcpFailure;
        };
        if a.check_type == "tcp" {
            return Verdict::Success;
        }
        let host = a.host.as_deref().unwrap_or(&node.host);
        match tls {
            None => http_probe(tcp, host, a).await,
            Some(cfg) => {
                let name = host.trim_start_matches('[').trim_end_matches(']');
                let Ok(name) = rustls::pki_types::ServerName::try_from(name.to_owned()) else {
                    return Verdict::TcpFailure;
                };
                match tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                {
                    Ok(s) => http_probe(s, host, a).await,
                    Err(_) => Verdict::TcpFailure,
                }
            }
        }
    };
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Verdict::Timeout)
}

/// Sends the probe request and reads the status line.
async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    a: &ActiveCheck,
) -> Verdict {
    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: polygate-healthcheck\r\nConnection: close\r\n",
        a.http_method, a.http_path
    );
    for h in &a.req_headers {
        req.push_str(h.trim());
        req.push_str("\r\n");
    }
    if let Some(b) = &a.http_req_body {
        req.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    if s.write_all(req.as_bytes()).await.is_err() {
        return Verdict::TcpFailure;
    }
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return Verdict::TcpFailure,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let Some(code) = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    else {
        return Verdict::TcpFailure;
    };
    if a.unhealthy.http_statuses.contains(&code) {
        Verdict::HttpFailure
    } else if a.healthy.http_statuses.contains(&code) {
        Verdict::Success
    } else {
        Verdict::Neutral
    }
}

/// Probes the nodes of one upstream forever (until aborted), each at its state's interval.
async fn run_checker(up: Arc<UpstreamRt>, tls: Option<Arc<rustls::ClientConfig>>) {
    let Some(checks) = up.checks.clone() else {
        return;
    };
    let Some(a) = checks.conf.active.clone() else {
        return;
    };
    let a = Arc::new(a);
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1) as usize));
    let mut next = vec![Instant::now(); up.nodes.len()];
    loop {
        let now = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (i, due) in next.iter().enumerate() {
            if *due > now {
                continue;
            }
            let (up, a, tls, sem) = (up.clone(), a.clone(), tls.clone(), sem.clone());
            set.spawn(async move {
                let _permit = sem.acquire().await;
                let node = &up.nodes[i];
                let v = probe(node, &a, tls.as_ref()).await;
                (i, v)
            });
        }
        while let Some(r) = set.join_next().await {
            let Ok((i, v)) = r else { continue };
            let node = &up.nodes[i];
            if let Some(h) = &node.health {
                h.report(v, &checks.active, "active");
                let every = if h.is_healthy() {
                    a.healthy.interval
                } else {
                    a.unhealthy.interval
                };
                next[i] = Instant::now() + polygate_model::secs(every);
            }
        }
        let wake = next
            .iter()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(20)).into()).await;
    }
}

/// Every upstream of a snapshot that has health checks (named ones, and those inline in
/// services and routes).
pub fn checked_upstreams(snap: &Snapshot) -> Vec<Arc<UpstreamRt>> {
    let mut all = snap.all_upstreams();
    all.retain(|u| u.checks.is_some());
    all
}

/// Runs the active checkers of the served configuration: every `interval`, the checkers of
/// upstreams that appeared start and those of upstreams that went away stop.
pub async fn supervise(plane: Arc<polygate_config::Pipeline<crate::plane::DataPlane>>) {
    let mut running: HashMap<usize, (Arc<UpstreamRt>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut seen_version = u64::MAX;
    loop {
        let snap = plane.target().snapshot.load_full();
        if snap.version != seen_version {
            seen_version = snap.version;
            let want = checked_upstreams(&snap);
            let keys: Vec<usize> = want.iter().map(|u| Arc::as_ptr(u) as usize).collect();
            running.retain(|k, (_, h)| {
                let keep = keys.contains(k);
                if !keep {
                    h.abort();
                }
                keep
            });
            for (u, k) in want.into_iter().zip(keys) {
                if running.contains_key(&k) {
                    continue;
                }
                let tls = u
                    .checks
                    .as_ref()
                    .and_then(|c| c.conf.active.as_ref())
                    .filter(|a| a.check_type == "https")
                    .and_then(|a| snap.tls.probe_config(a.https_verify_certificate));
                let h = tokio::spawn(run_checker(u.clone(), tls));
                running.insert(k, (u, h));
            }
        }
        drop(snap);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// APISIX's control API name of a checked upstream: `/apisix/routes/1`,
/// `/apisix/services/s`, `/apisix/upstreams/u`.
fn resource_name(id: &str) -> String {
    if let Some(r) = id.strip_prefix("route:") {
        format!("/apisix/routes/{r}")
    } else if let Some(s) = id.strip_prefix("service:") {
        format!("/apisix/services/{s}")
    } else {
        format!("/apisix/upstreams/{id}")
    }
}

fn report_json(u: &UpstreamRt) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = u
        .nodes
        .iter()
        .filter_map(|n| {
            let h = n.health.as_ref()?;
            let c = *h.counters.lock();
            Some(serde_json::json!({
                "ip": n.host,
                "port": n.port,
                "hostname": n.host,
                "status": h.status(),
                "counter": {
                    "success": c.success,
                    "http_failure": c.http_failure,
                    "tcp_failure": c.tcp_failure,
                    "timeout_failure": c.timeout_failure,
                },
            }))
        })
        .collect();
    let kind = u
        .checks
        .as_ref()
        .and_then(|c| c.conf.active.as_ref())
        .map_or("http", |a| a.check_type.as_str());
    serde_json::json!({
        "name": resource_name(&u.id),
        "type": kind,
        "nodes": nodes,
    })
}

/// `GET /v1/healthcheck` (every checked upstream) and `/v1/healthcheck/{routes|services|
/// upstreams}/{id}` (one), in the shape of APISIX's control API; `None` for an unknown one.
pub fn control_api(snap: &Snapshot, path: &str) -> Option<String> {
    let all = checked_upstreams(snap);
    let rest = path.strip_prefix("/v1/healthcheck")?;
    if rest.is_empty() || rest == "/" {
        let list: Vec<serde_json::Value> = all.iter().map(|u| report_json(u)).collect();
        return Some(serde_json::Value::Array(list).to_string());
    }
    let (kind, id) = rest.trim_start_matches('/').split_once('/')?;
    let want = match kind {
        "routes" => format!("/apisix/routes/{id}"),
        "services" => format!("/apisix/services/{id}"),
        "upstreams" => format!("/apisix/upstreams/{id}"),
        _ => return None,
    };
    all.iter()
        .find(|u| resource_name(&u.id) == want)
        .map(|u| report_json(u).to_string())
}

/// Prometheus lines: `polygate_upstream_node_healthy{upstream, node}` 1 or 0.
pub fn metrics(snap: &Snapshot, out: &mut String) {
    use std::fmt::Write;
    let all = checked_upstreams(snap);
    if all.is_empty() {
        return;
    }
    out.push_str("# HELP polygate_upstream_node_healthy 1 when the node gets traffic, 0 when its health checks took it out.\n# TYPE polygate_upstream_node_healthy gauge\n");
    for u in all {
        for n in &u.nodes {
            if let Some(h) = &n.health {
                let _ = writeln!(
                    out,
                    "polygate_upstream_node_healthy{{upstream=\"{}\",node=\"{}\"}} {}",
                    u.id,
                    n.key,
                    u8::from(h.is_healthy())
                );
            }
        }
    }
    // APISIX's name: the resource holding the checked upstream, ip and port labels
    out.push_str(
        "# HELP apisix_upstream_status Upstream status from health check
# TYPE apisix_upstream_status gauge
",
    );
    for u in checked_upstreams(snap) {
        let name = match u.id.split_once(':') {
            Some(("route", id)) => format!("/apisix/routes/{id}"),
            Some(("service", id)) => format!("/apisix/services/{id}"),
            _ => format!("/apisix/upstreams/{}", u.id),
        };
        for n in &u.nodes {
            if let Some(h) = &n.health {
                let (ip, port) = n.key.rsplit_once(':').unwrap_or((&n.key, ""));
                let _ = writeln!(
                    out,
                    "apisix_upstream_status{{name=\"{name}\",ip=\"{}\",port=\"{port}\"}} {}",
                    ip.trim_start_matches('[').trim_end_matches(']'),
                    u8::from(h.is_healthy())
                );
            }
        }
    }
}
