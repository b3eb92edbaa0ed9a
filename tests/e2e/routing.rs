//! Router features through the real gateway.

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn exact_prefix_and_parameters() {
    let (a, b, c, d) = (
        Upstream::start("exact").await,
        Upstream::start("prefix").await,
        Upstream::start("param").await,
        Upstream::start("catchall").await,
    );
    // `:name` parameters need APISIX's `radixtree_uri_with_parameter` router
    let gw = Gateway::start(&format!(
        r#"
apisix:
  router: {{http: radixtree_uri_with_parameter}}
routes:
  - {{id: exact, uri: /api/users, upstream: {{nodes: {{"{a}": 1}}}}}}
  - {{id: prefix, uri: /api/*, upstream: {{nodes: {{"{b}": 1}}}}}}
  - {{id: param, uri: "/user/:id/profile", upstream: {{nodes: {{"{c}": 1}}}}}}
  - {{id: deep, uris: ["/files/*", "/static/*"], upstream: {{nodes: {{"{d}": 1}}}}}}
"#,
        a = a.node(),
        b = b.node(),
        c = c.node(),
        d = d.node()
    ));
    let p = gw.port;
    assert_eq!(get(p, "/api/users").await.upstream(), "exact");
    assert_eq!(get(p, "/api/users/1").await.upstream(), "prefix");
    assert_eq!(get(p, "/api/").await.upstream(), "prefix");
    assert_eq!(get(p, "/user/42/profile").await.upstream(), "param");
    assert_eq!(get(p, "/static/app.js").await.upstream(), "catchall");
    assert_eq!(get(p, "/files/a/b").await.upstream(), "catchall");
    // the query string is forwarded untouched
    assert_eq!(
        get(p, "/api/x?a=1&b=2").await.json()["uri"],
        "/api/x?a=1&b=2"
    );
    let nf = get(p, "/user/42/other").await;
    assert_eq!(nf.status, 404);
    assert_eq!(nf.body, "{\"error_msg\":\"404 Route Not Found\"}\n");

    // the default router (radixtree_host_uri) takes `:id` literally, as APISIX does
    gw.reload(&format!(
        "routes:\n  - {{id: param, uri: \"/user/:id/profile\", upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        c.node()
    ));
    assert!(
        gw.eventually(std::time::Duration::from_secs(3), || async {
            get(p, "/user/42/profile").await.status == 404
        })
        .await
    );
    assert_eq!(get(p, "/user/:id/profile").await.upstream(), "param");
}

#[tokio::test(flavor = "multi_thread")]
async fn hosts_with_wildcards_beat_hostless_routes() {
    let (a, b, c) = (
        Upstream::start("wild").await,
        Upstream::start("exact-host").await,
        Upstream::start("any").await,
    );
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: wild, uri: /*, host: "*.example.com", upstream: {{nodes: {{"{a}": 1}}}}}}
  - {{id: exact, uri: /*, hosts: ["api.example.com"], upstream: {{nodes: {{"{b}": 1}}}}}}
  - {{id: any, uri: /exact, priority: 100, upstream: {{nodes: {{"{c}": 1}}}}}}
"#,
        a = a.node(),
        b = b.node(),
        c = c.node()
    ));
    let p = gw.port;
    assert_eq!(
        get_h(p, "/x", &[("host", "www.example.com")])
            .await
            .upstream(),
        "wild"
    );
    assert_eq!(
        get_h(p, "/x", &[("host", "api.example.com:8080")])
            .await
            .upstream(),
        "exact-host"
    );
    assert_eq!(
        get_h(p, "/exact", &[("host", "a.example.com")])
            .await
            .upstream(),
        "wild"
    );
    assert_eq!(
        get_h(p, "/exact", &[("host", "example.com")])
            .await
            .upstream(),
        "any"
    );
    assert_eq!(get_h(p, "/x", &[("host", "example.com")]).await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn methods_priority_vars_and_remote_addrs() {
    let ups = [
        Upstream::start("get").await,
        Upstream::start("post").await,
        Upstream::start("high").await,
        Upstream::start("vars").await,
        Upstream::start("local").await,
        Upstream::start("remote").await,
    ];
    let n: Vec<String> = ups.iter().map(|u| u.node()).collect();
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: get, uri: /m, methods: [GET], upstream: {{nodes: {{"{0}": 1}}}}}}
  - {{id: post, uri: /m, methods: [POST, PUT], upstream: {{nodes: {{"{1}": 1}}}}}}
  - {{id: low, uri: /p, priority: 1, upstream: {{nodes: {{"{0}": 1}}}}}}
  - {{id: high, uri: /p, priority: 10, upstream: {{nodes: {{"{2}": 1}}}}}}
  - id: vars
    uri: /v
    priority: 5
    vars: [["arg_version", "==", "2"], ["OR", ["http_x_beta", "~~", "^(yes|on)$"], ["cookie_beta", "==", "1"]]]
    upstream: {{nodes: {{"{3}": 1}}}}
  - id: novars
    uri: /v
    upstream: {{nodes: {{"{0}": 1}}}}
  - id: regex-ops
    uri: /ops
    vars: [["arg_n", ">", 10], ["arg_n", "<=", 20], ["arg_c", "in", ["a", "b"]], ["http_user_agent", "~*", "CURL|test"], ["arg_skip", "!", "==", "1"]]
    upstream: {{nodes: {{"{3}": 1}}}}
  - id: ipm
    uri: /ipm
    vars: [["remote_addr", "ipmatch", ["127.0.0.0/8"]]]
    upstream: {{nodes: {{"{4}": 1}}}}
  - {{id: remote-far, uri: /r, priority: 10, remote_addrs: ["10.0.0.0/8", "192.168.1.1"], upstream: {{nodes: {{"{5}": 1}}}}}}
  - {{id: remote-local, uri: /r, remote_addr: "127.0.0.0/8", upstream: {{nodes: {{"{4}": 1}}}}}}
"#,
        n[0], n[1], n[2], n[3], n[4], n[5]
    ));
    let p = gw.port;
    assert_eq!(request(p, "GET", "/m", &[], "").await.upstream(), "get");
    assert_eq!(request(p, "POST", "/m", &[], "x").await.upstream(), "post");
    assert_eq!(request(p, "DELETE", "/m", &[], "").await.status, 404);
    assert_eq!(get(p, "/p").await.upstream(), "high");
    assert_eq!(get(p, "/v?version=2").await.upstream(), "get");
    assert_eq!(
        get_h(p, "/v?version=2", &[("x-beta", "yes")])
            .await
            .upstream(),
        "vars"
    );
    assert_eq!(
        get_h(p, "/v?version=2", &[("cookie", "a=b; beta=1")])
            .await
            .upstream(),
        "vars"
    );
    assert_eq!(
        get_h(p, "/v?version=3", &[("x-beta", "yes")])
            .await
            .upstream(),
        "get"
    );
    let ua = [("user-agent", "my-test-agent")];
    assert_eq!(get_h(p, "/ops?n=15&c=b", &ua).await.upstream(), "vars");
    assert_eq!(get_h(p, "/ops?n=15&c=b&skip=1", &ua).await.status, 404);
    assert_eq!(get_h(p, "/ops?n=9&c=b", &ua).await.status, 404);
    assert_eq!(get_h(p, "/ops?n=15&c=z", &ua).await.status, 404);
    assert_eq!(
        get_h(p, "/ops?n=15&c=a", &[("user-agent", "other")])
            .await
            .status,
        404
    );
    assert_eq!(get(p, "/ipm").await.upstream(), "local");
    assert_eq!(get(p, "/r").await.upstream(), "local");
}

#[tokio::test(flavor = "multi_thread")]
async fn services_supply_upstream_plugins_and_hosts() {
    let a = Upstream::start("svc").await;
    let gw = Gateway::start(&format!(
        r#"
services:
  - id: s1
    hosts: ["svc.example.com"]
    upstream: {{nodes: {{"{a}": 1}}}}
    plugins:
      proxy-rewrite: {{headers: {{set: {{x-from: service}}}}}}
routes:
  - {{id: r1, uri: /s/*, service_id: s1}}
  - {{id: disabled, uri: /off, status: 0, service_id: s1}}
"#,
        a = a.node()
    ));
    let p = gw.port;
    let r = get_h(p, "/s/1", &[("host", "svc.example.com")]).await;
    assert_eq!(r.upstream(), "svc");
    assert_eq!(r.seen_header("x-from").as_deref(), Some("service"));
    assert_eq!(get_h(p, "/s/1", &[("host", "other.com")]).await.status, 404);
    assert_eq!(
        get_h(p, "/off", &[("host", "svc.example.com")])
            .await
            .status,
        404
    );
}
