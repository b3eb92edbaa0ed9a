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
