//! prometheus (APISIX's metric names and labels, `t/plugin/prometheus*.t` and the plugin's
//! docs), request-id and the loggers through the real gateway.

use std::time::Duration;

use crate::support::*;

fn gateway_with_metrics(mport: u16, resources: &str) -> Gateway {
    Gateway::start(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  watch_interval: 0.2\n  metrics: {{addr: \"127.0.0.1:{mport}\"}}\n{resources}"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_apisix_metrics() {
    let u = Upstream::start("u").await;
    let mport = free_port();
    let gw = gateway_with_metrics(
        mport,
        &format!(
            r#"
consumers:
  - username: jack
    plugins:
      key-auth: {{key: auth-jack}}
services:
  - id: s1
    name: svc-one
routes:
  - id: "1"
    name: hello-route
    uri: /hello
    host: foo.com
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      prometheus: {{}}
  - id: "2"
    uri: /auth
    service_id: s1
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      key-auth: {{}}
      prometheus: {{prefer_name: true}}
  - id: "3"
    uri: /plain
    upstream: {{nodes: {{"{n}": 1}}}}
"#,
            n = u.node()
        ),
    );
    let p = gw.port;
    for _ in 0..3 {
        assert_eq!(get_h(p, "/hello", &[("host", "foo.com")]).await.status, 200);
    }
    assert_eq!(
        get_h(p, "/auth", &[("apikey", "auth-jack")]).await.status,
        200
    );
    assert_eq!(get(p, "/auth").await.status, 401);
    assert_eq!(get(p, "/plain").await.status, 200);
    let node = u.addr.ip().to_string();
    let m = get(mport, "/apisix/prometheus/metrics").await;
    assert_eq!(m.status, 200);
    let body = m.body;
    // docs "Labels for apisix_http_status"
    let want = format!(
        "apisix_http_status{{code=\"200\",route=\"1\",matched_uri=\"/hello\",matched_host=\"foo.com\",service=\"foo.com\",consumer=\"\",node=\"{node}\",request_type=\"traditional_http\",request_llm_model=\"\",llm_model=\"\",response_source=\"upstream\"}} 3"
    );
    assert!(body.contains(&want), "{want}\nnot in\n{body}");
    // prefer_name: the route's and service's names; the consumer's name
    let want = format!(
        "apisix_http_status{{code=\"200\",route=\"2\",matched_uri=\"/auth\",matched_host=\"\",service=\"svc-one\",consumer=\"jack\",node=\"{node}\""
    );
    assert!(body.contains(&want), "{want}\nnot in\n{body}");
    // a response the gateway made itself
    assert!(
        body.contains("code=\"401\",route=\"2\"") && body.contains("response_source=\"apisix\"} 1"),
        "{body}"
    );
    // the route without the plugin is not counted
    assert!(!body.contains("route=\"3\""), "{body}");
    // latency histogram with APISIX's buckets and types, bandwidth both ways
    for needle in [
        "# TYPE apisix_http_latency histogram",
        "apisix_http_latency_bucket{type=\"request\",route=\"1\"",
        "apisix_http_latency_bucket{type=\"upstream\",route=\"1\"",
        "apisix_http_latency_bucket{type=\"apisix\",route=\"1\"",
        "le=\"60000\"}",
        "le=\"+Inf\"} 3",
        "apisix_http_latency_count{type=\"request\",route=\"1\"",
        "apisix_bandwidth{type=\"egress\",route=\"1\"",
        "apisix_bandwidth{type=\"ingress\",route=\"1\"",
        "apisix_nginx_http_current_connections{state=\"active\"}",
        "apisix_http_requests_total ",
        "apisix_node_info{hostname=",
    ] {
        assert!(body.contains(needle), "{needle} not in\n{body}");
    }
    // the /metrics page has them too
    assert!(
        get(mport, "/metrics")
            .await
            .body
            .contains("apisix_http_status{")
    );
    // an invalid field is refused with its path
    let (code, out) = validate(
        "routes:\n  - uri: /x\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\n    plugins:\n      prometheus: {prefer_names: true}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(out.contains("plugins.prometheus"), "{out}");
    let _ = Duration::ZERO;
}

/// A log collector: an HTTP server storing the bodies POSTed to it.
async fn collector() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let g = g.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let g = g.clone();
                        async move {
                            let auth = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            let b = req.into_body().collect().await.unwrap().to_bytes();
                            g.lock()
                                .unwrap()
                                .push(format!("{auth}|{}", String::from_utf8_lossy(&b)));
                            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn loggers() {
    use tokio::io::AsyncReadExt;
    let u = Upstream::start("u").await;
    let (http_addr, http_got) = collector().await;
    // the TCP log server: each connection's bytes
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let tcp_got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let tg = tcp_got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                continue;
            };
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf).await;
            tg.lock().unwrap().push(buf);
        }
    });
    let dir = tempdir::Dir::new();
    let file = dir.path().join("access.log");
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: batched
    uri: /batched
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      http-logger: {{uri: "http://{h}/log", batch_max_size: 3, inactive_timeout: 1, auth_header: "Bearer log"}}
  - id: single
    uri: /single
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      http-logger: {{uri: "http://{h}/log", batch_max_size: 1, include_req_body: true}}
  - id: fmt
    uri: /fmt
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      tcp-logger: {{host: 127.0.0.1, port: {t}, batch_max_size: 2, log_format: {{host: "$host", client: "$remote_addr", fixed: 7}}}}
  - id: file
    uri: /file
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      file-logger: {{path: "{f}"}}
  - id: down
    uri: /down
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      http-logger: {{uri: "http://127.0.0.1:1/log", batch_max_size: 1, max_retry_count: 1, retry_delay: 0}}
"#,
        n = u.node(),
        h = http_addr,
        t = tcp_addr.port(),
        f = file.display()
    ));
    let p = gw.port;
    // batch_max_size 3: three requests make one POST with an array of three entries
    for i in 0..3 {
        assert_eq!(get(p, &format!("/batched?i={i}")).await.status, 200);
    }
    assert!(
        until(Duration::from_secs(5), async || !http_got
            .lock()
            .unwrap()
            .is_empty())
        .await
        .is_some()
    );
    let first = http_got.lock().unwrap()[0].clone();
    let (auth, body) = first.split_once('|').unwrap();
    assert_eq!(auth, "Bearer log");
    let batch: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(batch.as_array().map(Vec::len), Some(3), "{body}");
    let e = &batch[0];
    // APISIX's full log entry
    assert_eq!(e["route_id"], "batched");
    assert_eq!(e["request"]["method"], "GET");
    assert_eq!(e["request"]["uri"], "/batched?i=0");
    assert_eq!(e["request"]["querystring"]["i"], "0");
    assert_eq!(e["response"]["status"], 200);
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert_eq!(e["upstream"], u.node());
    assert!(e["latency"].as_f64().is_some() && e["start_time"].as_u64().is_some());
    // batch_max_size 1: one object per POST, with the request body
    let r = request(p, "POST", "/single", &[], "hello body").await;
    assert_eq!(r.status, 200);
    assert!(
        until(Duration::from_secs(5), async || http_got
            .lock()
            .unwrap()
            .len()
            == 2)
        .await
        .is_some()
    );
    let one = http_got.lock().unwrap()[1].clone();
    let e: serde_json::Value = serde_json::from_str(one.split_once('|').unwrap().1).unwrap();
    assert_eq!(e["request"]["body"], "hello body");
    assert_eq!(e["route_id"], "single");
    // tcp-logger with log_format; the lone entry is sent after inactive_timeout (5 s default)
    // once a second request fills the batch of two
    get_h(p, "/fmt", &[("host", "a.example")]).await;
    get_h(p, "/fmt", &[("host", "b.example")]).await;
    assert!(
        until(Duration::from_secs(5), async || !tcp_got
            .lock()
            .unwrap()
            .is_empty())
        .await
        .is_some(),
        "{}",
        gw.stderr()
    );
    let got: serde_json::Value = serde_json::from_str(&tcp_got.lock().unwrap()[0]).unwrap();
    assert_eq!(
        got,
        serde_json::json!([
            {"host": "a.example", "client": "127.0.0.1", "fixed": 7},
            {"host": "b.example", "client": "127.0.0.1", "fixed": 7}
        ])
    );
    // file-logger: one JSON line per request
    for _ in 0..2 {
        get(p, "/file").await;
    }
    assert!(
        until(Duration::from_secs(5), async || {
            std::fs::read_to_string(&file)
                .map(|t| t.lines().count())
                .unwrap_or(0)
                == 2
        })
        .await
        .is_some()
    );
    let line = std::fs::read_to_string(&file).unwrap();
    let e: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(e["route_id"], "file");
    // a log server that is down: the request is served, the failure logged after the retry
    assert_eq!(get(p, "/down").await.status, 200);
    assert!(
        until(Duration::from_secs(5), async || {
            gw.stderr().contains("exceeded the max_retry_count[1]")
        })
        .await
        .is_some(),
        "{}",
        gw.stderr()
    );
}
