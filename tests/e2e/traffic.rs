//! api-breaker and proxy-mirror through the real gateway (APISIX's `t/plugin/api-breaker.t`,
//! `t/plugin/proxy-mirror.t` and the plugins' docs).

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn api_breaker() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /status/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      api-breaker:
        break_response_code: 502
        break_response_body: "breaker is open"
        break_response_headers: [{{key: X-Breaker, value: "open-$remote_addr"}}]
        max_breaker_sec: 3
        unhealthy: {{http_statuses: [500, 503], failures: 3}}
        healthy: {{http_statuses: [200], successes: 1}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    // t/plugin/api-breaker.t: failures below the threshold pass through
    for _ in 0..2 {
        assert_eq!(get(p, "/status/500").await.status, 500);
    }
    assert_eq!(get(p, "/status/200").await.status, 200);
    // three failures in a row open the breaker for 2 s (2^1)
    for _ in 0..3 {
        assert_eq!(get(p, "/status/503").await.status, 503);
    }
    let hits = u.hits();
    let r = get(p, "/status/503").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.body, "breaker is open");
    assert_eq!(r.header("x-breaker"), Some("open-127.0.0.1"));
    assert_eq!(
        u.hits(),
        hits,
        "an open breaker keeps requests off the upstream"
    );
    // another URI has its own breaker
    assert_eq!(get(p, "/status/200?x").await.status, 200);
    // after the breaker time, one healthy answer closes it
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(get(p, "/status/200").await.status, 200);
    assert_eq!(get(p, "/status/503").await.status, 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_mirror() {
    let u = Upstream::start("u").await;
    let mirror = Upstream::start("mirror").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /hello
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      proxy-mirror: {{host: "http://{m}"}}
  - uri: /post
    methods: [POST]
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      proxy-mirror: {{host: "http://{m}", path: /copy, path_concat_mode: prefix}}
  - uri: /down
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      proxy-mirror: {{host: "http://127.0.0.1:1"}}
"#,
        n = u.node(),
        m = mirror.node()
    ));
    let p = gw.port;
    // the client gets the upstream's answer; the mirror gets a copy
    let r = get(p, "/hello?a=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream(), "u");
    assert!(
        until(Duration::from_secs(3), async || mirror.hits() == 1)
            .await
            .is_some()
    );
    // a body is copied too
    let r = request(p, "POST", "/post", &[], "mirrored body").await;
    assert_eq!(r.json()["body"], "mirrored body");
    assert!(
        until(Duration::from_secs(3), async || mirror.hits() == 2)
            .await
            .is_some()
    );
    // a mirror that is down does not affect the client
    assert_eq!(get(p, "/down").await.status, 200);
    // invalid host: a key path
    let (code, out) = validate(
        "routes:\n  - uri: /x\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\n    plugins:\n      proxy-mirror: {host: \"http://h/path\"}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(out.contains("plugins.proxy-mirror.host"), "{out}");
}
