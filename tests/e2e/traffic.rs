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

/// A raw HTTP/1.1 exchange (the body bytes as sent, whatever their encoding).
async fn raw_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let i = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..i]).to_ascii_lowercase();
    let mut body = out[i + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        loop {
            let j = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n =
                usize::from_str_radix(std::str::from_utf8(&rest[..j]).unwrap().trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&rest[j + 2..j + 2 + n]);
            rest = &rest[j + 4 + n..];
        }
        body = plain;
    }
    (head, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_and_brotli() {
    use std::io::Read;
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - uri: /gz/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      gzip: {{types: ["application/json"], vary: true, comp_level: 6}}
  - uri: /br/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      brotli: {{types: "*"}}
      gzip: {{types: "*"}}
  - uri: /html/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      gzip: {{}}
"#,
        n = u.node()
    ));
    let p = gw.port;
    let plain = get(p, "/gz/some/long/path/that/makes/the/json/longer")
        .await
        .body;
    // docs (gzip): a JSON answer compressed for a client accepting gzip, with Vary
    let (head, body) = raw_get(
        p,
        "/gz/some/long/path/that/makes/the/json/longer",
        &[("accept-encoding", "gzip, deflate")],
    )
    .await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(head.contains("vary: accept-encoding"), "{head}");
    let mut out = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["uri"],
        serde_json::from_str::<serde_json::Value>(&plain).unwrap()["uri"]
    );
    // not accepted, or q=0: sent as it is
    let (head, _) = raw_get(p, "/gz/x", &[("accept-encoding", "gzip;q=0")]).await;
    assert!(!head.contains("content-encoding"), "{head}");
    let (head, _) = raw_get(p, "/gz/x", &[]).await;
    assert!(!head.contains("content-encoding"), "{head}");
    // the type does not match the default ["text/html"]
    let (head, _) = raw_get(p, "/html/x", &[("accept-encoding", "gzip")]).await;
    assert!(!head.contains("content-encoding"), "{head}");
    // brotli wins over gzip (priority 996 > 995) when both are accepted, and is not doubled
    let (head, body) = raw_get(
        p,
        "/br/some/long/path/for/brotli",
        &[("accept-encoding", "gzip, br")],
    )
    .await;
    assert!(head.contains("content-encoding: br"), "{head}");
    let mut out = Vec::new();
    brotli_decompressor::Decompressor::new(&body[..], 4096)
        .read_to_end(&mut out)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["uri"], "/br/some/long/path/for/brotli");
}
