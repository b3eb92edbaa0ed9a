//! limit-count, limit-req and limit-conn through the real gateway: local counters, and counters
//! in a real Redis shared by two gateway processes (APISIX's `t/plugin/limit-count*.t`,
//! `limit-req*.t`, `limit-conn*.t` and the plugins' docs).

use std::time::{Duration, Instant};

use crate::support::*;

async fn statuses(port: u16, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get_h(port, path, headers).await.status);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_count_local() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
consumers:
  - username: jack
    plugins:
      key-auth: {{key: auth-jack}}
      limit-count: {{count: 1, time_window: 60, rejected_code: 403, key: consumer_name}}
  - username: rose
    plugins:
      key-auth: {{key: auth-rose}}
routes:
  - id: "1"
    uri: /hello
    upstream_id: u
    plugins:
      limit-count: {{count: 2, time_window: 60, rejected_code: 503, key: remote_addr}}
  - id: msg
    uri: /msg
    upstream_id: u
    plugins:
      limit-count: {{count: 1, time_window: 60, rejected_code: 429, rejected_msg: "Requests are too frequent, please try again later."}}
  - id: hdr
    uri: /hdr
    upstream_id: u
    plugins:
      limit-count: {{count: 1, time_window: 60, key: http_x_user, show_limit_quota_header: false}}
  - id: g1
    uri: /g1
    upstream_id: u
    plugins:
      limit-count: {{count: 2, time_window: 60, group: services_1}}
  - id: g2
    uri: /g2
    upstream_id: u
    plugins:
      limit-count: {{count: 2, time_window: 60, group: services_1}}
  - id: auth
    uri: /auth
    upstream_id: u
    plugins:
      key-auth: {{}}
  - id: combo
    uri: /combo
    upstream_id: u
    plugins:
      limit-count: {{count: 1, time_window: 60, key_type: var_combination, key: "$http_a $http_b"}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    // t/plugin/limit-count.t TEST 4: two allowed, then 503
    let r1 = get(p, "/hello").await;
    assert_eq!(r1.status, 200);
    assert_eq!(r1.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(r1.header("x-ratelimit-remaining"), Some("1"));
    let reset: f64 = r1.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset > 58.0 && reset <= 60.0, "reset {reset}");
    let r2 = get(p, "/hello").await;
    assert_eq!(r2.header("x-ratelimit-remaining"), Some("0"));
    let r3 = get(p, "/hello").await;
    assert_eq!(r3.status, 503);
    assert_eq!(r3.header("x-ratelimit-remaining"), Some("0"));
    assert!(
        r3.body.contains("503 Service Temporarily Unavailable"),
        "{}",
        r3.body
    );
    // docs (rejected_msg): the JSON error with the chosen code
    assert_eq!(get(p, "/msg").await.status, 200);
    let r = get(p, "/msg").await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.body,
        "{\"error_msg\":\"Requests are too frequent, please try again later.\"}\n"
    );
    // key from a header: each user has its own counter; no quota headers when asked
    let a = [("x-user", "a")];
    let b = [("x-user", "b")];
    assert_eq!(statuses(p, "/hdr", &a, 2).await, [200, 503]);
    let r = get_h(p, "/hdr", &b).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), None);
    // var_combination: unset variables render empty; the two headers make the key
    assert_eq!(
        statuses(p, "/combo", &[("a", "1"), ("b", "2")], 2).await,
        [200, 503]
    );
    assert_eq!(
        statuses(p, "/combo", &[("a", "1"), ("b", "3")], 1).await,
        [200]
    );
    // t/plugin/limit-count2.t (group): two routes share one counter
    assert_eq!(get(p, "/g1").await.status, 200);
    assert_eq!(get(p, "/g2").await.status, 200);
    assert_eq!(get(p, "/g1").await.status, 503);
    assert_eq!(get(p, "/g2").await.status, 503);
    // limit-count on a consumer (t/plugin/limit-count.t TEST 24-26): only jack is limited
    let jack = [("apikey", "auth-jack")];
    let rose = [("apikey", "auth-rose")];
    assert_eq!(statuses(p, "/auth", &jack, 3).await, [200, 403, 403]);
    assert_eq!(statuses(p, "/auth", &rose, 3).await, [200, 200, 200]);
    // counters survive an unrelated reload, and a changed configuration starts afresh
    gw.reload(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
routes:
  - id: "1"
    uri: /hello
    upstream_id: u
    plugins:
      limit-count: {{count: 2, time_window: 60, rejected_code: 503, key: remote_addr}}
  - id: other
    uri: /other
    upstream_id: u
  - id: msg
    uri: /msg
    upstream_id: u
    plugins:
      limit-count: {{count: 3, time_window: 60, rejected_code: 429}}
"#,
        n = u.node()
    ));
    assert!(
        until(Duration::from_secs(5), async || get(p, "/other")
            .await
            .status
            == 200)
        .await
        .is_some()
    );
    assert_eq!(get(p, "/hello").await.status, 503, "counter kept");
    assert_eq!(statuses(p, "/msg", &[], 4).await, [200, 200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_count_window_resets() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /hello
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      limit-count: {{count: 1, time_window: 1}}
"#,
        n = u.node()
    ));
    // t/plugin/limit-count.t TEST 21-23 idea: after the window the quota is back
    assert_eq!(statuses(gw.port, "/hello", &[], 2).await, [200, 503]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(statuses(gw.port, "/hello", &[], 2).await, [200, 503]);
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_count_rejects_invalid_configurations() {
    // t/plugin/limit-count.t TEST 8-13: missing or wrong count
    for (plugin, path) in [
        ("{time_window: 60}", "limit-count.count"),
        ("{count: -100, time_window: 60}", "limit-count.count"),
        (
            "{count: 1, time_window: 60, policy: redis}",
            "limit-count.redis_host",
        ),
        (
            "{count: 1, time_window: 60, policy: redis-cluster, redis_cluster_name: c}",
            "limit-count.redis_cluster_nodes",
        ),
        ("{count: 1, time_window: 60, nope: 1}", "limit-count"),
    ] {
        let text = format!(
            "routes:\n  - uri: /x\n    upstream: {{nodes: {{\"127.0.0.1:1\": 1}}}}\n    plugins:\n      limit-count: {plugin}\n#END\n"
        );
        let (code, out) = validate(&text, "yaml");
        assert_ne!(code, 0, "{plugin} accepted");
        assert!(out.contains(path), "{plugin}: {out}");
    }
}

fn redis_route(id: &str, uri: &str, node: &str, redis: u16, extra: &str) -> String {
    format!(
        r#"
  - id: {id}
    uri: {uri}
    upstream: {{nodes: {{"{node}": 1}}}}
    plugins:
      limit-count:
        count: 5
        time_window: 60
        policy: redis
        redis_host: 127.0.0.1
        redis_port: {redis}
        redis_timeout: 300
        {extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_count_redis_shared_by_two_gateways() {
    let mut redis = Redis::start();
    let u = Upstream::start("u").await;
    let n = u.node();
    let text = format!(
        "routes:{}{}",
        redis_route(
            "strict",
            "/strict",
            &n,
            redis.port,
            "allow_degradation: false"
        ),
        redis_route("soft", "/soft", &n, redis.port, "allow_degradation: true")
    );
    let a = Gateway::start(&text);
    let b = Gateway::start(&text);
    // t/plugin/limit-count-redis.t: N allowed across both gateways, the N+1th refused
    let mut got = Vec::new();
    for i in 0..5 {
        let p = if i % 2 == 0 { a.port } else { b.port };
        let r = get(p, "/strict").await;
        got.push(r.status);
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some((4 - i).to_string().as_str())
        );
    }
    assert_eq!(got, [200; 5]);
    assert_eq!(get(a.port, "/strict").await.status, 503);
    assert_eq!(get(b.port, "/strict").await.status, 503);
    let keys = redis.cli(&["KEYS", "plugin-limit-count:*"]);
    assert!(keys.contains("routes/strict:"), "keys: {keys}");
    // concurrent requests through both gateways: exactly 5 of 40 pass on a fresh route key,
    // and each passing request saw its own count (calls on one key waiting for the same write
    // to Redis are sent as one script run and the counts split among them)
    let mut tasks = Vec::new();
    for i in 0..40 {
        let p = if i % 2 == 0 { a.port } else { b.port };
        tasks.push(tokio::spawn(async move {
            let r = get(p, "/soft").await;
            (
                r.status,
                r.header("x-ratelimit-remaining").map(str::to_owned),
            )
        }));
    }
    let mut remaining = Vec::new();
    for t in tasks {
        let (status, left) = t.await.unwrap();
        if status == 200 {
            remaining.push(left.unwrap_or_default());
        }
    }
    remaining.sort();
    assert_eq!(
        remaining,
        ["0", "1", "2", "3", "4"],
        "exactly the limit passes across both gateways, each with its own count"
    );
    // Redis stopped: allow_degradation decides, and the gateways keep serving
    redis.stop();
    let r = get(a.port, "/strict").await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.body, "{\"error_msg\":\"failed to limit count\"}\n");
    let t0 = Instant::now();
    let r = get(b.port, "/soft").await;
    assert_eq!(r.status, 200, "degraded: let through");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(
        a.stderr().contains("failed to limit count"),
        "{}",
        a.stderr()
    );
    // Redis back (empty): counting resumes
    redis.restart();
    assert!(
        until(Duration::from_secs(5), async || get(a.port, "/strict")
            .await
            .status
            == 200)
        .await
        .is_some()
    );
}

/// A Redis that accepts connections and never answers: each request waits `redis_timeout`
/// (300 ms), then `allow_degradation` decides, as with lua-resty-redis's socket timeout.
#[tokio::test(flavor = "multi_thread")]
async fn limit_count_redis_timeout() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn({
        let accepted = accepted.clone();
        move || {
            let mut held = Vec::new();
            for s in silent.incoming().flatten() {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(s); // read nothing, answer nothing
            }
        }
    });
    let u = Upstream::start("u").await;
    let n = u.node();
    let gw = Gateway::start(&format!(
        "routes:{}{}",
        redis_route("strict", "/strict", &n, port, "allow_degradation: false"),
        redis_route("soft", "/soft", &n, port, "allow_degradation: true")
    ));
    for (path, status) in [("/strict", 500), ("/soft", 200), ("/strict", 500)] {
        let t0 = Instant::now();
        let r = get(gw.port, path).await;
        let took = t0.elapsed();
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(
            took >= Duration::from_millis(300),
            "{path} answered in {took:?}"
        );
        assert!(took < Duration::from_secs(3), "{path} answered in {took:?}");
    }
    assert!(gw.stderr().contains("timeout"), "{}", gw.stderr());
    // a command that timed out ends its connection, as lua-resty-redis does
    // (lib/resty/redis.lua, `_read_reply`: `if err == "timeout" ... then sock:close()`), so a
    // server that stopped answering does not hold the queue: each request connected
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_req_local_and_redis() {
    let redis = Redis::start();
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /nodelay
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      limit-req: {{rate: 1, burst: 0, key: remote_addr, nodelay: true, rejected_code: 429}}
  - uri: /delay
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      limit-req: {{rate: 4, burst: 1, key: remote_addr}}
  - uri: /redis
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      limit-req: {{rate: 0.5, burst: 1, key: remote_addr, nodelay: true, rejected_msg: slow down,
                   policy: redis, redis_host: 127.0.0.1, redis_port: {rp}}}
"#,
        n = u.node(),
        rp = redis.port
    ));
    let p = gw.port;
    // t/plugin/limit-req.t: rate 1, burst 0: the second request at once is refused
    let r = statuses(p, "/nodelay", &[], 3).await;
    assert_eq!(r[0], 200);
    assert!(r[1..].iter().all(|s| *s == 429), "{r:?}");
    // burst 1 without nodelay: the second request is delayed by about 1/rate, the third refused
    let t0 = Instant::now();
    let (a, b) = tokio::join!(get(p, "/delay"), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        get(p, "/delay").await
    });
    assert_eq!((a.status, b.status), (200, 200));
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
    // Redis policy: burst 1 lets two through, then the JSON rejection
    let r = statuses(p, "/redis", &[], 3).await;
    assert_eq!(r, [200, 200, 503]);
    let body = get(p, "/redis").await.body;
    assert_eq!(body, "{\"error_msg\":\"slow down\"}\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_conn_local_and_redis() {
    let redis = Redis::start();
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /delay/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      limit-conn: {{conn: 1, burst: 0, default_conn_delay: 0.1, key: remote_addr}}
  - uri: /r/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      proxy-rewrite: {{regex_uri: ["^/r/(.*)", "/$1"]}}
      limit-conn: {{conn: 1, burst: 0, default_conn_delay: 0.1, key: remote_addr,
                    rejected_code: 429, policy: redis, redis_host: 127.0.0.1, redis_port: {rp}}}
"#,
        n = u.node(),
        rp = redis.port
    ));
    let p = gw.port;
    for prefix in ["", "/r"] {
        // t/plugin/limit-conn.t: one request in flight; a second one meanwhile is refused
        let slow = tokio::spawn(async move { get(p, &format!("{prefix}/delay/600")).await.status });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = get(p, &format!("{prefix}/delay/0")).await.status;
        assert_eq!(slow.await.unwrap(), 200);
        assert_eq!(second, if prefix.is_empty() { 503 } else { 429 });
        // the slot is given back when the request ends
        let mut ok = false;
        for _ in 0..50 {
            if get(p, &format!("{prefix}/delay/0")).await.status == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "{prefix}: released after the request ended");
    }
    let v = redis.cli(&["--scan", "--pattern", "plugin-limit-conn:*"]);
    let key = v
        .lines()
        .next()
        .expect("a limit-conn key in Redis")
        .to_owned();
    assert!(
        until(Duration::from_secs(2), async || redis
            .cli(&["GET", &key])
            .trim()
            == "0")
        .await
        .is_some(),
        "counter back to 0"
    );
}

/// A three-master Redis Cluster of Debian's redis-server, made with `redis-cli --cluster create`.
struct RedisCluster {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
    _dir: tempdir::Dir,
}

impl RedisCluster {
    fn start() -> RedisCluster {
        let dir = tempdir::Dir::new();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for p in &ports {
            let child = std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &p.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                ])
                .arg(dir.path().join(format!("nodes-{p}.conf")))
                .args(REDIS_EPHEMERAL)
                .arg("--dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("redis-server");
            nodes.push(child);
        }
        let cli = |args: &[&str]| {
            std::process::Command::new("redis-cli")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for p in &ports {
            let ps = p.to_string();
            let t0 = Instant::now();
            while cli(&["-p", &ps, "PING"]).trim() != "PONG" {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "redis node {p} did not start"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = cli(&args);
        let t0 = Instant::now();
        loop {
            let ok = ports.iter().all(|p| {
                cli(&["-p", &p.to_string(), "CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
            if ok {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "cluster not ok: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        RedisCluster {
            nodes,
            ports,
            _dir: dir,
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn limit_count_redis_cluster() {
    let cluster = RedisCluster::start();
    let u = Upstream::start("u").await;
    let nodes: Vec<String> = cluster
        .ports
        .iter()
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let text = format!(
        r#"
routes:
  - id: c
    uri: /c
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      limit-count:
        count: 3
        time_window: 60
        key: http_x_user
        policy: redis-cluster
        redis_cluster_name: test
        redis_cluster_nodes: [{seeds}]
"#,
        n = u.node(),
        seeds = nodes.join(", ")
    );
    let a = Gateway::start(&text);
    let b = Gateway::start(&text);
    // t/plugin/limit-count-redis-cluster.t: the limit holds across both gateways, per key;
    // keys land on different masters (MOVED answers are followed)
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        let h = [("x-user", user)];
        let mut got = Vec::new();
        for i in 0..4 {
            let p = if i % 2 == 0 { a.port } else { b.port };
            got.push(get_h(p, "/c", &h).await.status);
        }
        assert_eq!(got, [200, 200, 200, 503], "{user}");
    }
    // the counters are spread over the masters by slot
    let holding = cluster
        .ports
        .iter()
        .filter(|p| {
            let out = std::process::Command::new("redis-cli")
                .args([
                    "-p",
                    &p.to_string(),
                    "--scan",
                    "--pattern",
                    "plugin-limit-count:*",
                ])
                .output()
                .unwrap();
            !out.stdout.is_empty()
        })
        .count();
    assert!(holding >= 2, "counters on {holding} master(s)");
}
