//! Health checks through the real binary, with APISIX's `checks` fields: a node that fails its
//! active probes (bad status, then killed) is taken out of rotation and comes back when it
//! recovers; passive checks take a node out on the failures real traffic sees; priority tiers
//! fall through when a tier is unhealthy, and with no healthy node left every node is tried;
//! health survives a commit that changes the upstream; `/v1/healthcheck` and the metrics show
//! it.
//!
//! Sources: APISIX `apisix/schema_def.lua` (`health_checker`: the fields, their defaults and
//! bounds, `active` required with `passive`), `docs/en/latest/control-api.md` (the
//! `/v1/healthcheck` shape and statuses); nodes tried again when none is healthy, as
//! `shared/reference/apisix-model.md` records of APISIX.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::support::*;

/// An upstream whose `/health` answers 200 or 503 as told, whose other paths answer 200 (or
/// 500 when `failing`), and which can be killed and restarted on the same port.
struct Node {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Node {
    async fn start() -> Node {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut n = Node {
            addr: l.local_addr().unwrap(),
            hits: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            failing: Arc::default(),
            task: None,
        };
        n.serve(l);
        n
    }

    fn serve(&mut self, l: TcpListener) {
        let (hits, healthy, failing) = (
            self.hits.clone(),
            self.healthy.clone(),
            self.failing.clone(),
        );
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (hits, healthy, failing) = (hits.clone(), healthy.clone(), failing.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (hits, healthy, failing) =
                            (hits.clone(), healthy.clone(), failing.clone());
                        async move {
                            let status = if req.uri().path() == "/health" {
                                if healthy.load(Ordering::SeqCst) {
                                    200
                                } else {
                                    503
                                }
                            } else {
                                hits.fetch_add(1, Ordering::SeqCst);
                                if failing.load(Ordering::SeqCst) {
                                    500
                                } else {
                                    200
                                }
                            };
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        }));
    }

    /// Closes the listener and every connection: connections are refused.
    fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn restart(&mut self) {
        let l = TcpListener::bind(self.addr).await.unwrap();
        self.serve(l);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A node's status in `/v1/healthcheck/{which}` (`upstreams/u`, `routes/r`).
async fn node_status(mport: u16, which: &str, node: &Node) -> String {
    let r = get(mport, &format!("/v1/healthcheck/{which}")).await;
    if r.status != 200 {
        return format!("http {}", r.status);
    }
    let j = r.json();
    j["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["port"] == node.addr.port())
        .map(|n| n["status"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn gateway_with_metrics(resources: &str) -> Gateway {
    Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  watch_interval: 0.2\n  metrics: {{addr: \"127.0.0.1:0\"}}\n{resources}\n#END\n"
    ))
}

async fn spread(port: u16, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(port, "/x").await.status);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn active_checks_take_nodes_out_and_bring_them_back() {
    let a = Node::start().await;
    let mut b = Node::start().await;
    let upstream = |extra: &str| {
        format!(
            r#"upstreams:
  - id: u
    {extra}nodes: [{{host: "127.0.0.1", port: {pa}, weight: 1}}, {{host: "127.0.0.1", port: {pb}, weight: 1}}]
    checks:
      active:
        http_path: /health
        healthy: {{interval: 1, successes: 2}}
        unhealthy: {{interval: 1, http_failures: 2, tcp_failures: 2}}
routes:
  - {{id: r, uri: /*, upstream_id: u}}
"#,
            pa = a.addr.port(),
            pb = b.addr.port()
        )
    };
    let gw = gateway_with_metrics(&upstream(""));
    let mport = gw.metrics_port();

    assert!(spread(gw.port, 10).await.iter().all(|s| *s == 200));
    assert!(b.hits() > 0, "both nodes get traffic while healthy");
    assert_eq!(node_status(mport, "upstreams/u", &b).await, "healthy");

    // B's probe fails: two failed probes take it out
    b.healthy.store(false, Ordering::SeqCst);
    let out = gw
        .eventually(Duration::from_secs(8), || async {
            node_status(mport, "upstreams/u", &b).await == "unhealthy"
        })
        .await;
    assert!(out, "B was not marked unhealthy:\n{}", gw.stderr());
    assert!(gw.stderr().contains("node unhealthy (active check"));
    let metrics = get(mport, "/metrics").await.body;
    let line = format!(
        "polygate_upstream_node_healthy{{upstream=\"u\",node=\"127.0.0.1:{}\"}} 0",
        b.addr.port()
    );
    assert!(metrics.contains(&line), "{metrics}");
    let before = b.hits();
    assert!(spread(gw.port, 20).await.iter().all(|s| *s == 200));
    assert_eq!(b.hits(), before, "an unhealthy node gets no traffic");

    // a commit that changes the upstream keeps the node's health
    gw.write_config(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  watch_interval: 0.2\n  metrics: {{addr: \"127.0.0.1:0\"}}\n{}\n#END\n",
        upstream("retries: 1\n    ")
    ));
    let applied = gw
        .eventually(Duration::from_secs(5), || async {
            gw.stderr().contains("configuration reloaded")
        })
        .await;
    assert!(applied, "{}", gw.stderr());
    assert_eq!(node_status(mport, "upstreams/u", &b).await, "unhealthy");

    // B recovers: two good probes bring it back
    b.healthy.store(true, Ordering::SeqCst);
    let back = gw
        .eventually(Duration::from_secs(8), || async {
            node_status(mport, "upstreams/u", &b).await == "healthy"
        })
        .await;
    assert!(back, "B did not come back:\n{}", gw.stderr());
    let before = b.hits();
    spread(gw.port, 10).await;
    assert!(b.hits() > before, "traffic returns to B");

    // B killed: connection failures take it out; restarted, it comes back
    b.kill();
    let out = gw
        .eventually(Duration::from_secs(8), || async {
            node_status(mport, "upstreams/u", &b).await == "unhealthy"
        })
        .await;
    assert!(out, "the killed node was not marked unhealthy");
    assert!(spread(gw.port, 10).await.iter().all(|s| *s == 200));
    b.restart().await;
    let back = gw
        .eventually(Duration::from_secs(8), || async {
            node_status(mport, "upstreams/u", &b).await == "healthy"
        })
        .await;
    assert!(back, "the restarted node did not come back");
    let before = b.hits();
    spread(gw.port, 10).await;
    assert!(b.hits() > before);

    // the list form names the resource as APISIX does
    let all = get(mport, "/v1/healthcheck").await.json();
    assert_eq!(all[0]["name"], "/apisix/upstreams/u");
    assert_eq!(all[0]["type"], "http");
    assert!(all[0]["nodes"][0]["counter"]["success"].is_number());
}

#[tokio::test(flavor = "multi_thread")]
async fn passive_checks_move_traffic_off_a_failing_node() {
    let a = Node::start().await;
    let b = Node::start().await;
    let gw = gateway_with_metrics(&format!(
        r#"routes:
  - id: r
    uri: /*
    upstream:
      retries: 0
      nodes: [{{host: "127.0.0.1", port: {pa}, weight: 1}}, {{host: "127.0.0.1", port: {pb}, weight: 1}}]
      checks:
        active:
          type: tcp
          healthy: {{interval: 1, successes: 3}}
        passive:
          unhealthy: {{http_statuses: [500], http_failures: 2}}
"#,
        pa = a.addr.port(),
        pb = b.addr.port()
    ));
    let mport = gw.metrics_port();
    b.failing.store(true, Ordering::SeqCst);
    // B answers 500 to real traffic: two of those take it out
    let mut saw_500 = 0;
    for _ in 0..10 {
        if get(gw.port, "/x").await.status == 500 {
            saw_500 += 1;
        }
        if node_status(mport, "routes/r", &b).await == "unhealthy" {
            break;
        }
    }
    let r = get(mport, "/v1/healthcheck/routes/r").await;
    assert_eq!(r.status, 200);
    let status = r.json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["port"] == b.addr.port())
        .unwrap()["status"]
        .clone();
    assert_eq!(status, "unhealthy", "{}", gw.stderr());
    // two consecutive failures take it out; an active probe succeeding in between starts the
    // count again
    assert!(
        (2..=6).contains(&saw_500),
        "{saw_500} failures before the node went out"
    );
    assert!(gw.stderr().contains("node unhealthy (passive check"));
    let before = b.hits();
    assert!(spread(gw.port, 8).await.iter().all(|s| *s == 200));
    assert_eq!(b.hits(), before, "traffic moved off B");

    // fixed, B passes three active probes and gets traffic again
    b.failing.store(false, Ordering::SeqCst);
    let back = gw
        .eventually(Duration::from_secs(10), || async {
            let before = b.hits();
            spread(gw.port, 4).await;
            b.hits() > before
        })
        .await;
    assert!(back, "traffic did not return to B");
}

#[tokio::test(flavor = "multi_thread")]
async fn priority_tiers_fall_through_and_all_unhealthy_still_serves() {
    let high = Node::start().await;
    let low = Node::start().await;
    let gw = gateway_with_metrics(&format!(
        r#"upstreams:
  - id: u
    nodes:
      - {{host: "127.0.0.1", port: {ph}, weight: 1, priority: 1}}
      - {{host: "127.0.0.1", port: {pl}, weight: 1, priority: 0}}
    checks:
      active:
        http_path: /health
        healthy: {{interval: 1, successes: 1}}
        unhealthy: {{interval: 1, http_failures: 1}}
routes:
  - {{id: r, uri: /*, upstream_id: u}}
"#,
        ph = high.addr.port(),
        pl = low.addr.port()
    ));
    let mport = gw.metrics_port();
    spread(gw.port, 5).await;
    assert_eq!((high.hits(), low.hits()), (5, 0), "the higher tier serves");

    high.healthy.store(false, Ordering::SeqCst);
    assert!(
        gw.eventually(Duration::from_secs(6), || async {
            node_status(mport, "upstreams/u", &high).await == "unhealthy"
        })
        .await
    );
    spread(gw.port, 5).await;
    assert_eq!(low.hits(), 5, "the lower tier takes over");

    // no healthy node at all: the nodes are tried anyway (highest tier first)
    low.healthy.store(false, Ordering::SeqCst);
    assert!(
        gw.eventually(Duration::from_secs(6), || async {
            node_status(mport, "upstreams/u", &low).await == "unhealthy"
        })
        .await
    );
    let before = high.hits();
    assert!(spread(gw.port, 5).await.iter().all(|s| *s == 200));
    assert_eq!(high.hits(), before + 5);
}

#[test]
fn checks_are_validated_with_key_paths() {
    let (code, out) = validate(
        "upstreams:\n  - id: u\n    nodes: {\"127.0.0.1:1\": 1}\n    checks:\n      passive: {}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(out.contains("upstreams[0].checks.active"), "{out}");
    let (code, out) = validate(
        "upstreams:\n  - id: u\n    nodes: {\"127.0.0.1:1\": 1}\n    checks:\n      active:\n        type: udp\n        unhealthy: {http_failures: 0}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(out.contains("upstreams[0].checks.active.type"), "{out}");
    assert!(
        out.contains("upstreams[0].checks.active.unhealthy.http_failures"),
        "{out}"
    );
    let (code, out) = validate(
        "upstreams:\n  - id: u\n    nodes: {\"127.0.0.1:1\": 1}\n    checks:\n      active: {htp_path: /}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(out.contains("htp_path"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_probes_with_and_without_verification() {
    use crate::tls::{Pki, TlsUpstream};
    let pki = Pki::new("probe CA");
    let leaf = pki.issue(&["probe.test"]);
    let a = TlsUpstream::start(&leaf, None).await;
    let b = TlsUpstream::start(&leaf, None).await;
    let dir = tempdir::Dir::new();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let upstream = |id: &str, verify: bool| {
        format!(
            "  - id: {id}\n    scheme: https\n    pass_host: rewrite\n    upstream_host: probe.test\n    nodes: [{{host: \"127.0.0.1\", port: {pa}, weight: 1}}, {{host: \"127.0.0.1\", port: {pb}, weight: 1}}]\n    checks:\n      active:\n        type: https\n        host: probe.test\n        https_verify_certificate: {verify}\n        healthy: {{interval: 1, successes: 1}}\n        unhealthy: {{interval: 1, tcp_failures: 1}}\n",
            pa = a.port,
            pb = b.port
        )
    };
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 1\n  metrics: {{addr: \"127.0.0.1:0\"}}\n  ssl: {{ssl_trusted_certificate: \"{}\"}}\nupstreams:\n{}{}routes:\n  - {{id: r, uri: /*, upstream_id: verified}}\n#END\n",
        ca.display(),
        upstream("verified", true),
        upstream("unverified", false)
    ));
    let mport = gw.metrics_port();
    // both probe kinds see healthy nodes (the CA is trusted; the name matches)
    let healthy = |which: &'static str| async move {
        let r = get(mport, &format!("/v1/healthcheck/upstreams/{which}")).await;
        r.status == 200
            && r.json()["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["status"] == "healthy" && n["counter"]["success"].as_u64() > Some(0))
    };
    assert!(
        gw.eventually(Duration::from_secs(6), || healthy("verified"))
            .await,
        "{}",
        gw.stderr()
    );
    assert!(
        gw.eventually(Duration::from_secs(6), || healthy("unverified"))
            .await
    );
    assert_eq!(get(gw.port, "/x").await.status, 200);
    // one node gone: the https probe fails to connect and takes it out
    drop(b);
    let out = gw
        .eventually(Duration::from_secs(6), || async {
            let r = get(mport, "/v1/healthcheck/upstreams/verified").await;
            r.json()["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["status"] == "unhealthy")
        })
        .await;
    assert!(out, "{}", gw.stderr());
    assert!(spread(gw.port, 6).await.iter().all(|s| *s == 200));
}
