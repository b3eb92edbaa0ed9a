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

/// The rapid-reset attack (CVE-2023-44487): a client that opens streams and resets them
/// before they are served. Past `gateway.http2.max_pending_accept_reset_streams` pending
/// resets the gateway closes the connection with GOAWAY `ENHANCE_YOUR_CALM`; other clients are
/// served throughout. The frames are written by hand, all in one write, so the resets reach
/// the server before it accepts the streams (an h2 client opens one stream at a time).
#[tokio::test(flavor = "multi_thread")]
async fn rapid_reset_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("u").await;
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\", http2: true}}]\n  worker_threads: 1\n  http2: {{max_pending_accept_reset_streams: 20}}\nroutes:\n  - id: r\n    uri: /*\n    upstream: {{nodes: [{{host: \"127.0.0.1\", port: {}, weight: 1}}]}}\n#END\n",
        up.addr.port()
    ));
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // HPACK: :method GET, :scheme http, :path / (static table), :authority literal
    let authority = b"127.0.0.1";
    let mut block = vec![0x82, 0x86, 0x84, 0x41, authority.len() as u8];
    block.extend_from_slice(authority);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    for i in 0..200u32 {
        let id = 1 + 2 * i;
        out.extend(frame(0x1, 0x5, id, &block)); // HEADERS, END_STREAM | END_HEADERS
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    s.write_all(&out).await.unwrap();
    // read frames until GOAWAY (type 7): its error code follows the last stream id
    let mut buf = Vec::new();
    let mut goaway = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    'read: while std::time::Instant::now() < deadline {
        let mut chunk = [0u8; 16384];
        let n = match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk))
            .await
        {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            if buf[at + 3] == 0x7 && len >= 8 {
                let p = &buf[at + 9..at + 9 + len];
                goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
                break 'read;
            }
            at += 9 + len;
        }
        buf.drain(..at);
    }
    assert_eq!(goaway, Some(0xb), "expected GOAWAY ENHANCE_YOUR_CALM (0xb)");
    // the gateway goes on serving
    assert_eq!(get(gw.port, "/after").await.status, 200);
}
