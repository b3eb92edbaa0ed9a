//! Operations: hot reload, validation errors, start-up errors, graceful shutdown, logs,
//! metrics, HTTP/2, standalone APISIX files, the built-in default configuration.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn hot_reload_valid_then_invalid_without_dropping_connections() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let v1 = format!(
        "routes:\n  - {{id: r1, uri: /one, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        a.node()
    );
    let gw = Gateway::start(&v1);
    let p = gw.port;
    let mut kept = Conn::open(p).await;
    assert_eq!(kept.get("/one").await.upstream(), "a");
    assert_eq!(get(p, "/two").await.status, 404);

    // valid change: applied within 2 s
    let v2 = format!(
        "routes:\n  - {{id: r1, uri: /one, upstream: {{nodes: {{\"{}\": 1}}}}}}\n  - {{id: r2, uri: /two, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        b.node(),
        b.node()
    );
    let t = Instant::now();
    gw.reload(&v2);
    assert!(
        gw.eventually(Duration::from_secs(2), || async {
            get(p, "/two").await.status == 200
        })
        .await,
        "not applied within 2 s:\n{}",
        gw.stderr()
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(
        kept.get("/one").await.upstream(),
        "b",
        "same client connection, new config"
    );

    // invalid change: rejected, old routes keep serving, connection survives
    gw.reload("rotues:\n  - {id: r1, uri: /one, upstream_id: missing}\n");
    assert!(
        gw.eventually(Duration::from_secs(3), || async {
            gw.stderr().contains("rejected")
        })
        .await,
        "{}",
        gw.stderr()
    );
    assert!(
        gw.stderr().contains("rotues: unknown field `rotues`"),
        "{}",
        gw.stderr()
    );
    assert_eq!(kept.get("/two").await.upstream(), "b");
    assert_eq!(get(p, "/one").await.upstream(), "b");

    // a file without the #END marker (half written) is not loaded either
    gw.write_config(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:{p}\"}}]\nroutes: []\n"
    ));
    assert!(
        gw.eventually(Duration::from_secs(3), || async {
            gw.stderr().contains("missing valid end flag")
        })
        .await,
        "{}",
        gw.stderr()
    );
    assert_eq!(kept.get("/two").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_reports_key_paths() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "routes:\n  - {id: 1, uri: /a, upstream: {nodes: {\"127.0.0.1:1\": 1}, nodez: 1}}\n#END\n",
            "yaml",
            "routes[0].upstream",
        ),
        (
            "routes:\n  - {id: 1, uri: /a, upstream_id: nope}\n#END\n",
            "yaml",
            "routes[0].upstream_id: upstream \"nope\" not found",
        ),
        (
            "routes:\n  - {id: 1, uri: /a, vars: [[\"arg_a\", \"~~\", \"(bad\"]], upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n#END\n",
            "yaml",
            "routes[0].vars[0][2]: invalid regex",
        ),
        ("routes: [ {id: 1, uri: /a\n#END\n", "yaml", ""),
        (
            "routes:\n  - {id: 1, uri: /a, upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n",
            "yaml",
            "missing valid end flag",
        ),
        (
            "{\"routes\": [{\"id\": 1, \"uri\": \"/a\", \"plugins\": {\"key-auth\": {\"hedder\": 1}}}]}",
            "json",
            "routes[0].plugins.key-auth",
        ),
        (
            "{\"routes\": [{\"id\": 1, \"uri\": \"/a\", \"plugins\": {\"no-such-plugin\": {}}}]}",
            "json",
            "routes[0].plugins.no-such-plugin: unknown plugin",
        ),
        (
            "routes:\n  - {id: 1, uri: /a, plugins: {proxy-rewrite: {regex_uri: [\"(x\", \"/y\"]}}}\n#END\n",
            "yaml",
            "routes[0].plugins.proxy-rewrite.regex_uri[0]",
        ),
        (
            "gateway:\n  listeners: [{addr: nope}]\n#END\n",
            "yaml",
            "gateway.listeners[0].addr",
        ),
    ];
    for (text, ext, expect) in cases {
        let (code, out) = validate(text, ext);
        assert_ne!(code, 0, "should fail: {text}\n{out}");
        assert!(out.contains(expect), "expected {expect:?} in:\n{out}");
    }
    let (code, out) = validate(
        "routes:\n  - {id: 1, uri: /a, upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n#END\n",
        "yaml",
    );
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn env_substitution_and_json_config() {
    let u = Upstream::start("u").await;
    let port = free_port();
    let dir = tempdir::Dir::new();
    let path = dir.path().join("c.json");
    std::fs::write(
        &path,
        format!(
            r#"{{"gateway": {{"listeners": [{{"addr": "127.0.0.1:{port}"}}]}},
               "routes": [{{"id": "r", "uri": "${{{{ROUTE_URI:=/default}}}}", "upstream": {{"nodes": {{"${{{{UP_NODE}}}}": 1}}}}}}]}}"#
        ),
    )
    .unwrap();
    let mut child = Command::new(binary())
        .args(["run", "-c"])
        .arg(&path)
        .env("UP_NODE", u.node())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = get(port, "/default").await;
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(r.upstream(), "u");
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_errors_exit_non_zero() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempdir::Dir::new();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, with_gateway(port, "routes: []")).unwrap();
    let out = Command::new(binary())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("failed to bind 127.0.0.1:{port}")),
        "{err}"
    );

    // --strict refuses a dangling reference (the default serves it, as APISIX does)
    std::fs::write(
        &path,
        with_gateway(port, "routes:\n  - {id: 1, uri: /a, upstream_id: x}"),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["run", "--strict", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routes[0].upstream_id"), "{err}");

    // a whole-file error stops the start in any mode
    std::fs::write(&path, "routes: [\n#END\n").unwrap();
    let out = Command::new(binary())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid configuration"));
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let u = Upstream::start("u").await;
    let mut gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        u.node()
    ));
    let p = gw.port;
    let inflight = tokio::spawn(async move { get(p, "/delay/800").await });
    // the request is in flight: the upstream has it
    assert!(
        gw.eventually(Duration::from_secs(5), || async { u.hits() == 1 })
            .await
    );
    gw.signal("TERM");
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        gw.stderr()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p)).is_err(),
        "listener closed"
    );
    assert!(gw.stderr().contains("SIGTERM received"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigquit_also_stops_gracefully() {
    let u = Upstream::start("u").await;
    let mut gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        u.node()
    ));
    assert_eq!(get(gw.port, "/").await.status, 200);
    gw.signal("QUIT");
    assert_eq!(gw.wait_exit(Duration::from_secs(5)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_and_metrics() {
    let u = Upstream::start("u").await;
    let port = free_port();
    let mport = free_port();
    let gw = Gateway::start_raw(
        port,
        &format!(
            "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\"}}]\n  metrics: {{addr: \"127.0.0.1:{mport}\"}}\nroutes:\n  - {{id: logged, uri: /*, upstream_id: up1}}\nupstreams:\n  - {{id: up1, nodes: {{\"{}\": 1}}}}\n#END\n",
            u.node()
        ),
    );
    assert_eq!(get(port, "/x?y=1").await.status, 200);
    assert_eq!(get(port, "/status/503").await.status, 503);
    let ok = gw
        .eventually(Duration::from_secs(2), || async {
            gw.stdout().lines().count() >= 2
        })
        .await;
    assert!(ok, "{}", gw.stdout());
    let line: serde_json::Value =
        serde_json::from_str(gw.stdout().lines().next().unwrap()).unwrap();
    assert_eq!(line["route_id"], "logged");
    assert_eq!(line["upstream_id"], "up1");
    assert_eq!(line["upstream"], u.node());
    assert_eq!(line["status"], 200);
    assert_eq!(line["uri"], "/x?y=1");
    assert!(line["latency_ms"].as_f64().is_some());
    assert!(line["upstream_latency_ms"].as_f64().is_some());
    let m = get(mport, "/metrics").await;
    assert!(
        m.body
            .contains("polygate_http_requests_total{code=\"2xx\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("polygate_http_requests_total{code=\"5xx\"} 1"),
        "{}",
        m.body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_cleartext_listener() {
    let u = Upstream::start("u").await;
    let port = free_port();
    let _gw = Gateway::start_raw(
        port,
        &format!(
            "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\", http2: true}}]\nroutes:\n  - {{id: r, uri: /*, upstream: {{nodes: {{\"{}\": 1}}}}}}\n#END\n",
            u.node()
        ),
    );
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("http://127.0.0.1:{port}/h2"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    // HTTP/1.1 still works on the same port
    assert_eq!(get(port, "/h1").await.upstream(), "u");
}

/// An APISIX standalone file (resources only) runs as it is on APISIX's port 9080; the
/// built-in default configuration (also on 9080) shows a demo response. Both use fixed ports,
/// so they share one test.
#[tokio::test(flavor = "multi_thread")]
async fn apisix_standalone_file_and_default_config() {
    let u = Upstream::start("u").await;
    // this test is about APISIX's default port: a busy port is a failure, not a skip
    assert!(
        std::net::TcpListener::bind("0.0.0.0:9080").is_ok(),
        "port 9080 is busy: stop what holds it to run this test"
    );
    let gw = Gateway::start_raw(
        9080,
        &format!(
            "routes:\n  -\n    uri: /hello\n    id: 1\n    upstream:\n      nodes:\n        \"{}\": 1\n      type: roundrobin\n#END\n",
            u.node()
        ),
    );
    assert_eq!(get(9080, "/hello").await.upstream(), "u");
    drop(gw);
    // the port is free again once the process is gone
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind("0.0.0.0:9080").is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut child = Command::new(binary())
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut resp = None;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect("127.0.0.1:9080").is_ok()
            && std::net::TcpStream::connect("127.0.0.1:9081").is_ok()
        {
            resp = Some(get(9080, "/anything").await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let private = get(9080, "/private/x").await;
    let allowed = get_h(9080, "/private/x", &[("apikey", "demo-key")]).await;
    let lua = get(9080, "/lua?name=e2e").await;
    child.kill().unwrap();
    let _ = child.wait();
    let resp = resp.expect("default config did not start");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-powered-by"), Some("polygate"));
    assert_eq!(
        resp.json()["message"],
        "hello from the polygate demo upstream"
    );
    assert_eq!(private.status, 401);
    assert_eq!(allowed.status, 200);
    assert_eq!(lua.status, 200);
    assert_eq!(lua.json()["hello"], "e2e");
    assert_eq!(lua.header("content-type"), Some("application/json"));
}
