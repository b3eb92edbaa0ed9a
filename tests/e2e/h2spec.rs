//! h2spec (HTTP/2 conformance, RFC 7540/9113 and HPACK) against the real binary's TLS listener
//! (ALPN `h2`) and its h2c listener. Every case passes on TLS; on the h2c listener, which also
//! serves HTTP/1.1, one case is a listed exception (docs/compatibility.md): an invalid
//! connection preface is read as an HTTP/1.1 request and answered `400` before the close.
//!
//! The test command builds h2spec from the Go module proxy and passes its path in
//! `POLYGATE_H2SPEC`.

use crate::support::*;
use crate::tls::{Pki, pem_block};

/// Runs h2spec; returns (passed, failed, the failing case ids).
fn h2spec(args: &[&str]) -> (u32, u32, Vec<String>) {
    let bin = std::env::var("POLYGATE_H2SPEC")
        .expect("POLYGATE_H2SPEC: the path of h2spec (scripts/test.sh builds it)");
    let out = std::process::Command::new(bin)
        .args(args)
        .args(["-o", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains(" tests, "))
        .unwrap_or_else(|| panic!("no h2spec summary:\n{text}"));
    let num = |word: &str| -> u32 {
        summary
            .split(", ")
            .find(|p| p.ends_with(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // the failures section repeats each failing case under its section title
    let failures = text
        .split("Failures:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .filter(|l| l.trim_start().starts_with('×'))
        .map(|l| l.trim().to_owned())
        .collect();
    (num("passed"), num("failed"), failures)
}

#[test]
fn h2spec_tls_and_h2c_listeners() {
    let pki = Pki::new("h2spec CA");
    let leaf = pki.issue(&["localhost"]);
    let up_port = free_port();
    let text = format!(
        "gateway:\n  listeners:\n    - {{addr: \"127.0.0.1:0\", http2: true}}\n    - {{addr: \"127.0.0.1:0\", tls: true, http2: true}}\n  worker_threads: 2\n  demo_upstream: \"127.0.0.1:{up_port}\"\n  ssl: {{fallback_sni: localhost}}\nroutes:\n  - id: all\n    uri: /*\n    upstream: {{nodes: [{{host: \"127.0.0.1\", port: {up_port}, weight: 1}}]}}\nssls:\n  - id: \"1\"\n    sni: localhost\n    cert: {}    key: {}#END\n",
        pem_block(&leaf.cert, 6),
        pem_block(&leaf.key, 6)
    );
    let gw = Gateway::start_text(&text);
    let ports = gw.ports();
    let (h2c, tls) = (ports[0].to_string(), ports[1].to_string());

    let (passed, failed, fails) = h2spec(&["-h", "127.0.0.1", "-p", &tls, "-t", "-k"]);
    assert_eq!(failed, 0, "h2spec over TLS: {fails:#?}");
    assert!(passed >= 145, "h2spec over TLS ran {passed} cases");

    let (passed, failed, fails) = h2spec(&["-h", "127.0.0.1", "-p", &h2c]);
    assert!(passed >= 144, "h2spec over h2c ran {passed} cases");
    assert!(
        failed == 0
            || (failed == 1
                && fails
                    .iter()
                    .all(|f| f.contains("Sends invalid connection preface"))),
        "h2spec over h2c: unexpected failures {fails:#?}"
    );
    assert!(gw.stderr().lines().all(|l| !l.contains("panicked")));
}

/// The rapid-reset attack (CVE-2023-44487): a client that opens streams and resets them at
/// once, faster than they are served. Past `gateway.http2.max_pending_accept_reset_streams`
/// pending resets the gateway closes the connection (GOAWAY `ENHANCE_YOUR_CALM`); other
/// clients are served throughout.
#[tokio::test(flavor = "multi_thread")]
async fn rapid_reset_closes_the_connection() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\", http2: true}}]\n  worker_threads: 1\n  http2: {{max_pending_accept_reset_streams: 20}}\nroutes:\n  - id: r\n    uri: /*\n    upstream: {{nodes: [{{host: \"127.0.0.1\", port: {}, weight: 1}}]}}\n#END\n",
        up.addr.port()
    ));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut refused = false;
    for _ in 0..5000 {
        let req = http::Request::get(format!("http://127.0.0.1:{}/slow", gw.port))
            .body(())
            .unwrap();
        let Ok(c) = client.clone().ready().await else {
            refused = true;
            break;
        };
        client = c;
        match client.send_request(req, false) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
    let reason = match ended {
        Ok(Ok(Err(e))) => e.reason(),
        Ok(Ok(Ok(()))) => None,
        other => panic!("the connection was not closed: {other:?}"),
    };
    assert!(refused || reason.is_some());
    assert_eq!(reason, Some(h2::Reason::ENHANCE_YOUR_CALM));
    // the gateway goes on serving
    assert_eq!(get(gw.port, "/after").await.status, 200);
}
