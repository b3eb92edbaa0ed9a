//! The gateway on its trust boundary: request paths normalised before routing (encoded and
//! dot-segment bypasses), identity and forwarding headers a client may forge, request heads
//! that nginx refuses, and what plugins may write into the upstream request line.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends raw bytes on a new connection and returns everything read until the peer closes or
/// stays quiet for a second (the connection is not half-closed: hyper would drop it).
pub async fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in `text`.
pub fn status_of(text: &str) -> u16 {
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn auth_config(up: &str) -> String {
    format!(
        r#"consumers:
  - username: jack
    labels: {{custom_id: "cid-7"}}
    plugins:
      key-auth: {{key: jack-key}}
routes:
  - id: admin
    uri: /admin/*
    upstream: {{nodes: {{"{up}": 1}}}}
    plugins:
      key-auth: {{}}
  - id: catchall
    uri: /*
    upstream: {{nodes: {{"{up}": 1}}}}
"#
    )
}

/// `/%61dmin/x` and `/x/../admin/x` used to skip the key-auth route on `/admin/*` and reach
/// the catch-all route. Routes match nginx's `$uri`: decoded, dot segments resolved, slashes
/// merged; what cannot be normalised is a 400.
#[tokio::test(flavor = "multi_thread")]
async fn encoded_and_dot_segment_paths_cannot_bypass_auth() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start(&auth_config(&up.node()));
    let p = gw.port;
    let cases = [
        ("/admin/x", 401),
        ("/%61dmin/x", 401),
        ("/%61%64%6D%69%6E/x", 401),
        ("/x/../admin/x", 401),
        ("/x/%2e%2e/admin/x", 401),
        ("/x%2F..%2Fadmin/x", 401),
        ("//admin/x", 401),
        ("/./admin/x", 401),
        ("/admin/./x", 401),
        ("/..", 400),
        ("/../admin/x", 400),
        ("/a/%2e%2e/..", 400),
        ("/a%zz", 400),
        ("/a%0", 400),
        ("/a%00b", 400),
        ("/a%FFb", 400),
    ];
    for (path, want) in cases {
        let text = raw(
            p,
            format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&text), want, "{path}: {text}");
    }
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
    // with the key, the upstream gets the target exactly as the client sent it
    let r = get_h(p, "/%61dmin/x?q=%41", &[("apikey", "jack-key")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/%61dmin/x?q=%41");
}

/// A valid key plus a forged `X-Consumer-Username: admin` reached the upstream as `admin`.
#[tokio::test(flavor = "multi_thread")]
async fn identity_headers_cannot_be_forged() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start(&auth_config(&up.node()));
    let forged = [
        ("apikey", "jack-key"),
        ("x-consumer-username", "admin"),
        ("x-credential-identifier", "admin-cred"),
        ("x-consumer-custom-id", "admin-id"),
    ];
    let r = get_h(gw.port, "/admin/x", &forged).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.seen_header("x-consumer-username").as_deref(),
        Some("jack")
    );
    assert_eq!(
        r.seen_header("x-consumer-custom-id").as_deref(),
        Some("cid-7")
    );
    assert_eq!(r.seen_header("x-credential-identifier"), None);
    // on a route without authentication the forged copies are dropped too
    let r = get_h(gw.port, "/open", &forged[1..]).await;
    assert_eq!(r.status, 200);
    for h in [
        "x-consumer-username",
        "x-credential-identifier",
        "x-consumer-custom-id",
    ] {
        assert_eq!(r.seen_header(h), None, "{h}");
    }
    // source: apisix/plugins/key-auth.lua (WWW-Authenticate with the realm, default "key")
    let r = get(gw.port, "/admin/x").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("apikey realm=\"key\""));
}

/// `X-Forwarded-Proto/-Host/-Port` and `Forwarded` from an untrusted peer are replaced by
/// what the gateway observed (APISIX 3.14 `trusted_addresses`); a trusted peer's pass.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_are_trusted_only_from_trusted_peers() {
    let up = Upstream::start("u").await;
    let forged = [
        ("host", "shop.example:8443"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "1"),
        ("forwarded", "for=6.6.6.6;proto=https"),
        ("x-forwarded-for", "6.6.6.6"),
    ];
    let route = format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    );
    let gw = Gateway::start(&route);
    let r = get_h(gw.port, "/x", &forged).await;
    assert_eq!(r.seen_header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        r.seen_header("x-forwarded-host").as_deref(),
        Some("shop.example:8443")
    );
    assert_eq!(r.seen_header("x-forwarded-port").as_deref(), Some("8443"));
    assert_eq!(r.seen_header("forwarded"), None);
    // no trust boundary configured: the X-Forwarded-For chain is kept, as APISIX does
    assert_eq!(
        r.seen_header("x-forwarded-for").as_deref(),
        Some("6.6.6.6, 127.0.0.1")
    );
    assert_eq!(r.seen_header("x-real-ip").as_deref(), Some("127.0.0.1"));
    drop(gw);

    // a boundary that excludes the client: its X-Forwarded-For is dropped as well
    let gw = Gateway::start(&format!(
        "apisix:\n  trusted_addresses: [10.0.0.0/8]\n{route}"
    ));
    let r = get_h(gw.port, "/x", &forged).await;
    assert_eq!(
        r.seen_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        r.seen_header("x-forwarded-host").as_deref(),
        Some("shop.example:8443")
    );
    drop(gw);

    // a trusted peer's own values pass
    let gw = Gateway::start(&format!(
        "apisix:\n  trusted_addresses: [127.0.0.1]\n{route}"
    ));
    let r = get_h(gw.port, "/x", &forged).await;
    assert_eq!(r.seen_header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(
        r.seen_header("x-forwarded-host").as_deref(),
        Some("evil.example")
    );
    assert_eq!(r.seen_header("x-forwarded-port").as_deref(), Some("1"));
    assert_eq!(
        r.seen_header("forwarded").as_deref(),
        Some("for=6.6.6.6;proto=https")
    );
    assert_eq!(
        r.seen_header("x-forwarded-for").as_deref(),
        Some("6.6.6.6, 127.0.0.1")
    );
}

/// A CR/LF that a rewrite copies from the request into the target never splits the upstream
/// request line: the rewritten path is percent-encoded where the head is written.
#[tokio::test(flavor = "multi_thread")]
async fn crlf_from_a_rewrite_is_encoded() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"routes:
  - id: r
    uri: /r/*
    upstream: {{nodes: {{"{}": 1}}}}
    plugins:
      proxy-rewrite:
        regex_uri: ["^/r/(.*)", "/v2/$1"]
"#,
        up.node()
    ));
    let r = get(gw.port, "/r/a%0D%0AX-Injected:%201%0D%0A").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["uri"], "/v2/a%0D%0AX-Injected:%201%0D%0A");
    assert_eq!(r.seen_header("x-injected"), None);
    // a decoded space and '?' are data, and stay encoded
    let r = get(gw.port, "/r/a%20b%3Fc?q=1").await;
    assert_eq!(r.json()["uri"], "/v2/a%20b%3Fc?q=1");
}

/// Request heads nginx refuses, refused the same way (RFC 9112 sections 3.2, 6.1, 6.3).
#[tokio::test(flavor = "multi_thread")]
async fn request_heads_nginx_refuses() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: r, uri: /*, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        up.node()
    ));
    let p = gw.port;
    let cases: &[(&str, &[u8], u16)] = &[
        (
            "two Host headers",
            b"GET /x HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
            400,
        ),
        ("HTTP/1.1 without Host", b"GET /x HTTP/1.1\r\n\r\n", 400),
        (
            "Transfer-Encoding twice",
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "chunked applied twice",
            b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            501,
        ),
        (
            "HTTP/1.0 with Transfer-Encoding",
            b"POST /x HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "Content-Length list",
            b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 1, 1\r\n\r\na",
            400,
        ),
        (
            "signed Content-Length",
            b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: +1\r\n\r\na",
            400,
        ),
        (
            "Content-Length repeated, equal",
            b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\na",
            400,
        ),
        (
            "Transfer-Encoding with Content-Length",
            b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nG",
            400,
        ),
        (
            "lower-case method",
            b"get /x HTTP/1.1\r\nhost: a\r\n\r\n",
            400,
        ),
        (
            "request line over 8 KiB",
            &[b"GET /".as_slice(), &[b'a'; 9000], b" HTTP/1.1\r\nhost: a\r\n\r\n"].concat(),
            414,
        ),
    ];
    for (name, bytes, want) in cases {
        let text = raw(p, bytes).await;
        assert_eq!(status_of(&text), *want, "{name}: {text}");
    }
    assert_eq!(up.hits(), 0, "none of them reached the upstream");

    // an absolute-form target's authority wins over Host (RFC 9112 section 3.2.2)
    let text = raw(
        p,
        b"GET http://abs.example/x HTTP/1.1\r\nhost: other\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.contains("\"host\":\"abs.example\""), "{text}");
    // an HTTP/1.0 request without Host is forwarded with one
    let text = raw(p, b"GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&text), 200, "{text}");
    assert!(
        text.contains(&format!("\"host\":\"{}\"", up.node())),
        "{text}"
    );
    // an invalid chunked body: 400, and the upstream connection is dropped
    for body in ["zz\r\n\r\n", "-1\r\n\r\n", "fffffffffffffffffff\r\nx\r\n"] {
        let text = raw(
            p,
            format!("POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n{body}")
                .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&text), 400, "{body:?}: {text}");
    }
}
