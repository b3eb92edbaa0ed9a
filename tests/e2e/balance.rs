//! Balancers, retries, timeouts and pass_host through the real gateway.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

async fn distribution(port: u16, path: &str, n: usize) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let mut c = Conn::open(port).await;
    for _ in 0..n {
        *out.entry(c.get(path).await.upstream()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn weighted_roundrobin() {
    let (a, b, z) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("zero").await,
    );
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  - id: u
    type: roundrobin
    nodes: [{{host: 127.0.0.1, port: {pa}, weight: 1}}, {{host: 127.0.0.1, port: {pb}, weight: 3}}, {{host: 127.0.0.1, port: {pz}, weight: 0}}]
routes:
  - {{id: r, uri: /*, upstream_id: u}}
"#,
        pa = a.addr.port(),
        pb = b.addr.port(),
        pz = z.addr.port()
    ));
    let d = distribution(gw.port, "/", 400).await;
    // smooth weighted round robin is exact over full cycles: 100 / 300
    assert!((95..=105).contains(&d["a"]), "{d:?}");
    assert!((295..=305).contains(&d["b"]), "{d:?}");
    assert_eq!(z.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn chash_is_sticky_per_key() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: h
    uri: /h
    upstream: {{type: chash, hash_on: header, key: x-user, nodes: {{"{0}": 1, "{1}": 1, "{2}": 1}}}}
  - id: v
    uri: /v
    upstream: {{type: chash, key: arg_id, nodes: {{"{0}": 1, "{1}": 1, "{2}": 1}}}}
  - id: c
    uri: /c
    upstream: {{type: chash, hash_on: cookie, key: sid, nodes: {{"{0}": 1, "{1}": 1, "{2}": 1}}}}
"#,
        ups[0].node(),
        ups[1].node(),
        ups[2].node()
    ));
    let p = gw.port;
    let mut seen = std::collections::HashSet::new();
    for user in 0..30 {
        let u = user.to_string();
        let first = get_h(p, "/h", &[("x-user", &u)]).await.upstream();
        for _ in 0..4 {
            assert_eq!(
                get_h(p, "/h", &[("x-user", &u)]).await.upstream(),
                first,
                "user {u}"
            );
        }
        seen.insert(first);
        let by_arg = get(p, &format!("/v?id={user}")).await.upstream();
        assert_eq!(
            get(p, &format!("/v?id={user}&x=1")).await.upstream(),
            by_arg
        );
        let cookie = format!("sid={user}");
        let by_cookie = get_h(p, "/c", &[("cookie", &cookie)]).await.upstream();
        assert_eq!(
            get_h(p, "/c", &[("cookie", &cookie)]).await.upstream(),
            by_cookie
        );
    }
    assert_eq!(
        seen.len(),
        3,
        "30 keys should spread over all nodes: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn least_conn_prefers_the_idle_node() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: r, uri: /*, upstream: {{type: least_conn, nodes: {{"{a}": 1, "{b}": 1}}}}}}
"#,
        a = a.node(),
        b = b.node()
    ));
    let p = gw.port;
    // occupy one node with slow requests, then the other must take all new traffic
    let slow: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(p, "/delay/1500").await.upstream() }))
        .collect();
    // the three slow requests reached the upstreams
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            a.hits() + b.hits() >= 3
        })
        .await
    );
    let busy = {
        // the three slow requests went to nodes in turn as counts rose; find the busiest node
        let (ha, hb) = (a.hits(), b.hits());
        if ha >= hb { "a" } else { "b" }
    };
    let mut fast = HashMap::<String, usize>::new();
    for _ in 0..20 {
        *fast.entry(get(p, "/").await.upstream()).or_default() += 1;
    }
    let idle = if busy == "a" { "b" } else { "a" };
    assert_eq!(
        fast.get(idle).copied().unwrap_or(0),
        20,
        "busy={busy} fast={fast:?}"
    );
    for s in slow {
        s.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ewma_serves_from_all_nodes() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{type: ewma, nodes: {{\"{}\": 1, \"{}\": 1}}}}}}\n",
        a.node(),
        b.node()
    ));
    let d = distribution(gw.port, "/", 100).await;
    assert_eq!(d.values().sum::<usize>(), 100);
    assert!(d.keys().all(|k| k == "a" || k == "b"), "{d:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_move_to_the_next_node_and_priority_tiers_back_up() {
    let good = Upstream::start("good").await;
    let dead = free_port(); // nothing listens here
    let backup = Upstream::start("backup").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: retry
    uri: /retry
    upstream: {{nodes: {{"127.0.0.1:{dead}": 1, "{good}": 1}}}}
  - id: noretry
    uri: /noretry
    upstream: {{retries: 0, nodes: {{"127.0.0.1:{dead}": 1, "{good}": 1}}}}
  - id: tiers
    uri: /tiers
    upstream:
      nodes:
        - {{host: 127.0.0.1, port: {dead}, weight: 1, priority: 10}}
        - {{host: 127.0.0.1, port: {bport}, weight: 1, priority: -1}}
  - id: alldead
    uri: /alldead
    upstream: {{nodes: {{"127.0.0.1:{dead}": 1}}}}
"#,
        good = good.node(),
        bport = backup.addr.port()
    ));
    let p = gw.port;
    for _ in 0..10 {
        let r = get(p, "/retry").await;
        assert_eq!((r.status, r.upstream().as_str()), (200, "good"));
    }
    let codes: Vec<u16> = futures_lite_collect(p, "/noretry", 10).await;
    assert!(codes.contains(&502) && codes.contains(&200), "{codes:?}");
    for _ in 0..4 {
        assert_eq!(get(p, "/tiers").await.upstream(), "backup");
    }
    let r = get(p, "/alldead").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("error_msg"), "{}", r.body);
}

async fn futures_lite_collect(p: u16, path: &str, n: usize) -> Vec<u16> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(get(p, path).await.status);
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_route_overrides_upstream() {
    let slow = Upstream::start("slow").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams:
  - id: u
    timeout: {{connect: 1, send: 1, read: 3}}
    nodes: {{"{s}": 1}}
routes:
  - {{id: short, uri: /delay/*, vars: [["arg_t", "==", "short"]], upstream_id: u, timeout: {{connect: 1, send: 1, read: 0.3}}}}
  - {{id: long, uri: /delay/*, upstream_id: u}}
"#,
        s = slow.node()
    ));
    let p = gw.port;
    let t = Instant::now();
    let r = get(p, "/delay/1500?t=short").await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    let r = get(p, "/delay/500").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn pass_host_modes() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: pass, uri: /pass, upstream: {{pass_host: pass, nodes: {{"{n}": 1}}}}}}
  - {{id: node, uri: /node, upstream: {{pass_host: node, nodes: {{"{n}": 1}}}}}}
  - {{id: rewrite, uri: /rewrite, upstream: {{pass_host: rewrite, upstream_host: backend.internal, nodes: {{"{n}": 1}}}}}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let h = [("host", "client.example.com")];
    assert_eq!(
        get_h(p, "/pass", &h).await.seen_header("host").as_deref(),
        Some("client.example.com")
    );
    assert_eq!(
        get_h(p, "/node", &h).await.seen_header("host"),
        Some(u.node())
    );
    assert_eq!(
        get_h(p, "/rewrite", &h)
            .await
            .seen_header("host")
            .as_deref(),
        Some("backend.internal")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_and_keepalive_reuse() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        u.node()
    ));
    let r = get_h(
        gw.port,
        "/x",
        &[
            ("host", "front.example.com"),
            ("x-forwarded-for", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(
        r.seen_header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(r.seen_header("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.seen_header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.seen_header("x-forwarded-host").as_deref(),
        Some("front.example.com")
    );
    assert_eq!(
        r.header("server"),
        Some(concat!("polygate/", env!("CARGO_PKG_VERSION")))
    );
    // a POST body is streamed through
    let r = request(
        gw.port,
        "POST",
        "/echo",
        &[("content-type", "text/plain")],
        "hello body",
    )
    .await;
    assert_eq!(r.json()["body"], "hello body");
    assert_eq!(r.json()["method"], "POST");
}
