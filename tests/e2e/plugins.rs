//! Built-in plugins, plugin order, `_meta` and the merge precedence through the real gateway.

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn proxy_rewrite() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
routes:
  - id: uri
    uri: /old/*
    upstream_id: u
    plugins:
      proxy-rewrite:
        uri: /new/path
        method: POST
        host: rewritten.example.com
        headers:
          add: {{x-added: "1"}}
          set: {{x-client: "$remote_addr", x-arg: "${{arg_name}}"}}
          remove: [x-secret]
  - id: regex
    uri: /api/*
    upstream_id: u
    plugins:
      proxy-rewrite:
        regex_uri: ["^/api/v(\\d+)/(.*)", "/internal/$2/version/$1"]
  - id: flat
    uri: /flat
    upstream_id: u
    plugins:
      proxy-rewrite:
        uri: "/flat2?fixed=1"
        headers: {{x-flat: on, x-secret: ""}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let r = get_h(
        p,
        "/old/x?name=joe",
        &[("x-secret", "s"), ("host", "orig.example.com")],
    )
    .await;
    let j = r.json();
    assert_eq!(j["uri"], "/new/path?name=joe", "original args are kept");
    assert_eq!(j["method"], "POST");
    assert_eq!(j["headers"]["host"], "rewritten.example.com");
    assert_eq!(j["headers"]["x-added"], "1");
    assert_eq!(j["headers"]["x-client"], "127.0.0.1");
    assert_eq!(j["headers"]["x-arg"], "joe");
    assert!(j["headers"].get("x-secret").is_none());
    assert_eq!(
        get(p, "/api/v2/users/7").await.json()["uri"],
        "/internal/users/7/version/2"
    );
    assert_eq!(
        get(p, "/api/other").await.json()["uri"],
        "/api/other",
        "no match: unchanged"
    );
    // apisix/plugins/proxy-rewrite.lua (`_M.rewrite`): a `uri` with its own query gets the
    // request's args appended with `&`
    let r = get_h(p, "/flat?x=1", &[("x-secret", "s")]).await;
    assert_eq!(r.json()["uri"], "/flat2?fixed=1&x=1");
    assert_eq!(r.seen_header("x-flat").as_deref(), Some("on"));
    assert_eq!(r.seen_header("x-secret"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn response_rewrite() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
routes:
  - id: body
    uri: /body
    upstream_id: u
    plugins:
      response-rewrite:
        status_code: 203
        body: "replaced\n"
        headers: {{set: {{x-rr: "yes"}}, remove: [x-upstream]}}
  - id: b64
    uri: /b64
    upstream_id: u
    plugins:
      response-rewrite: {{body: "aGVsbG8=", body_base64: true}}
  - id: cond
    uri: /status/*
    upstream_id: u
    plugins:
      response-rewrite:
        vars: [["status", "==", 500]]
        status_code: 503
        body: "hidden error\n"
  - id: filters
    uri: /filters
    upstream_id: u
    plugins:
      response-rewrite:
        filters:
          - {{regex: "\"name\":\"u\"", replace: "\"name\":\"masked\"", scope: global}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let r = get(p, "/body").await;
    assert_eq!((r.status, r.body.as_str()), (203, "replaced\n"));
    assert_eq!(r.header("x-rr"), Some("yes"));
    assert_eq!(r.header("x-upstream"), None);
    assert_eq!(r.header("content-length"), Some("9"));
    assert_eq!(get(p, "/b64").await.body, "hello");
    let r = get(p, "/status/500").await;
    assert_eq!((r.status, r.body.as_str()), (503, "hidden error\n"));
    let r = get(p, "/status/201").await;
    assert_eq!(r.status, 201, "vars do not hold: untouched");
    assert_eq!(r.upstream(), "u");
    let r = get(p, "/filters").await;
    assert!(r.body.contains("\"name\":\"masked\""), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn key_auth_with_consumers() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
consumers:
  - username: jack
    plugins:
      key-auth: {{key: jack-key}}
  - username: guest
routes:
  - id: header
    uri: /h
    upstream_id: u
    plugins:
      key-auth: {{}}
  - id: custom
    uri: /c
    upstream_id: u
    plugins:
      key-auth: {{header: X-Token, query: token, hide_credentials: true}}
  - id: anon
    uri: /anon
    upstream_id: u
    plugins:
      key-auth: {{anonymous_consumer: guest}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let r = get(p, "/h").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "Missing API key in request");
    let r = get_h(p, "/h", &[("apikey", "wrong")]).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (401, Some("Invalid API key in request"))
    );
    let r = get_h(p, "/h", &[("apikey", "jack-key")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("apikey").as_deref(),
        Some("jack-key"),
        "not hidden by default"
    );
    assert_eq!(get(p, "/h?apikey=jack-key").await.status, 200);
    let r = get_h(p, "/c", &[("x-token", "jack-key")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-token"),
        None,
        "hide_credentials removes the header"
    );
    let r = get(p, "/c?token=jack-key&a=1").await;
    assert_eq!(
        r.json()["uri"],
        "/c?a=1",
        "hide_credentials removes the query argument"
    );
    assert_eq!(get(p, "/anon").await.status, 200);
    let s = gw.stdout();
    assert!(
        s.contains("\"consumer\":\"jack\""),
        "access log names the consumer: {s}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_precedence_consumer_route_plugin_config_service() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
services:
  - id: s
    upstream_id: u
    plugins:
      proxy-rewrite: {{headers: {{set: {{x-layer: service}}}}}}
      response-rewrite: {{headers: {{set: {{x-resp: service}}}}}}
plugin_configs:
  - id: pc
    plugins:
      proxy-rewrite: {{headers: {{set: {{x-layer: plugin_config}}}}}}
consumer_groups:
  - id: g
    plugins:
      response-rewrite: {{headers: {{set: {{x-resp: group}}}}}}
consumers:
  - username: vip
    group_id: g
    plugins:
      key-auth: {{key: vip-key}}
      proxy-rewrite: {{headers: {{set: {{x-layer: consumer}}}}}}
  - username: grouped
    group_id: g
    plugins:
      key-auth: {{key: grp-key}}
  - username: plain
    plugins:
      key-auth: {{key: plain-key}}
routes:
  - {{id: svc-only, uri: /svc, service_id: s}}
  - {{id: with-pc, uri: /pc, service_id: s, plugin_config_id: pc}}
  - id: with-route
    uri: /route
    service_id: s
    plugin_config_id: pc
    plugins:
      proxy-rewrite: {{headers: {{set: {{x-layer: route}}}}}}
  - id: auth
    uri: /auth
    service_id: s
    plugin_config_id: pc
    plugins:
      key-auth: {{}}
      proxy-rewrite: {{headers: {{set: {{x-layer: route}}}}}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let layer = |r: &Resp| r.seen_header("x-layer").unwrap_or_default();
    assert_eq!(layer(&get(p, "/svc").await), "service");
    assert_eq!(layer(&get(p, "/pc").await), "plugin_config");
    assert_eq!(layer(&get(p, "/route").await), "route");
    let r = get_h(p, "/auth", &[("apikey", "plain-key")]).await;
    assert_eq!(layer(&r), "route");
    assert_eq!(r.header("x-resp"), Some("service"));
    let r = get_h(p, "/auth", &[("apikey", "grp-key")]).await;
    assert_eq!(layer(&r), "route");
    assert_eq!(
        r.header("x-resp"),
        Some("group"),
        "consumer group beats service"
    );
    let r = get_h(p, "/auth", &[("apikey", "vip-key")]).await;
    assert_eq!(layer(&r), "consumer", "consumer beats route");
    assert_eq!(r.header("x-resp"), Some("group"));
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_order_meta_and_global_rules() {
    let u = Upstream::start("u").await;
    // key-auth (2500) runs before proxy-rewrite (1008): a rejected request never reaches the
    // rewrite. With `_meta.priority` the order flips: the rewrite removes the key first.
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
consumers:
  - username: a
    plugins: {{key-auth: {{key: k}}}}
global_rules:
  - id: g
    plugins:
      response-rewrite: {{headers: {{set: {{x-global: "1"}}}}}}
routes:
  - id: default-order
    uri: /default
    upstream_id: u
    plugins:
      key-auth: {{}}
      proxy-rewrite: {{headers: {{set: {{apikey: k}}}}}}
  - id: flipped
    uri: /flipped
    upstream_id: u
    plugins:
      key-auth: {{}}
      proxy-rewrite: {{headers: {{set: {{apikey: k}}}}, _meta: {{priority: 3000}}}}
  - id: disabled
    uri: /disabled
    upstream_id: u
    plugins:
      key-auth: {{_meta: {{disable: true}}}}
  - id: filtered
    uri: /filtered
    upstream_id: u
    plugins:
      key-auth: {{_meta: {{filter: [["arg_secure", "==", "1"]], error_response: {{"msg": "go away"}}}}}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let r = get(p, "/default").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("x-global"),
        Some("1"),
        "global rule header_filter runs on plugin responses"
    );
    assert_eq!(get(p, "/flipped").await.status, 200);
    assert_eq!(get(p, "/disabled").await.status, 200);
    let r = get(p, "/filtered").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-global"), Some("1"));
    let r = get(p, "/filtered?secure=1").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body, "{\"msg\":\"go away\"}");
}

/// `_meta.filter` decides for every phase, `body_filter` and `log` included (they ignored it).
#[tokio::test(flavor = "multi_thread")]
async fn meta_filter_applies_to_body_filter_and_log() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"routes:
  - id: r
    uri: /m
    upstream: {{nodes: {{"{}": 1}}}}
    plugins:
      lua:
        body_filter: "ngx.arg[1] = string.upper(ngx.arg[1])"
        log: "ngx.log(ngx.ERR, 'logged ', ngx.var.arg_tag)"
        _meta: {{filter: [["arg_on", "==", "1"]]}}
"#,
        u.node()
    ));
    let on = get(gw.port, "/m?on=1&tag=yes").await;
    assert!(on.body.contains("\"NAME\":\"U\""), "{}", on.body);
    let off = get(gw.port, "/m?tag=no").await;
    assert!(off.body.contains("\"name\":\"u\""), "{}", off.body);
    assert!(
        gw.eventually(std::time::Duration::from_secs(3), || async {
            gw.stderr().contains("logged yes")
        })
        .await
    );
    assert!(!gw.stderr().contains("logged no"), "{}", gw.stderr());
}
