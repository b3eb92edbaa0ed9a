//! Raw-byte probes: request shapes an HTTP fuzzing campaign tries (smuggling, malformed
//! framing, oversized lines and headers, odd request lines), sent byte for byte to nginx and
//! to polygate in front of the same recording upstream. For each probe the two must agree on
//! the status of the first response (0: closed without one) and on whether the upstream saw
//! a request. Differences polygate keeps on purpose are listed in [`KNOWN_DIFFERENCES`] (and
//! in `docs/compatibility.md`); any other difference fails.
//!
//! nginx (Debian's, installed by `scripts/test.sh`) runs as `proxy_pass` to an upstream
//! block with keepalive, as in `bench/proxy.sh`.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "../e2e/support.rs"]
#[allow(dead_code)]
mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Probes where polygate answers differently from nginx, and why.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    (
        "Transfer-Encoding gzip",
        "refused by hyper's parser with 400 before polygate sees it; nginx answers 501",
    ),
    (
        "HTTP/2.0 on an HTTP/1 connection",
        "refused by hyper's parser with 400; nginx answers 505",
    ),
    (
        "HTTP/1.2",
        "polygate refuses an HTTP version it does not know (400); nginx serves it as HTTP/1.1",
    ),
    (
        "HTTP/0.9 style",
        "polygate does not serve HTTP/0.9 (400); nginx does",
    ),
    (
        "150 headers",
        "polygate takes at most 100 header lines (431, hyper's limit, as Envoy's default); \
         nginx bounds the head by size only",
    ),
];

fn probes() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("plain GET", b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("two Host headers", b"GET /p HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()),
        ("HTTP/1.1 without Host", b"GET /p HTTP/1.1\r\n\r\n".to_vec()),
        ("HTTP/1.0 without Host", b"GET /p HTTP/1.0\r\n\r\n".to_vec()),
        ("Content-Length twice, equal", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na".to_vec()),
        ("Content-Length twice, different", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec()),
        ("Content-Length list", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\na".to_vec()),
        ("Content-Length +1", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\na".to_vec()),
        ("Content-Length -1", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\na".to_vec()),
        ("Content-Length overflow", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\na".to_vec()),
        ("Content-Length not a number", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 1a\r\n\r\na".to_vec()),
        ("CL.TE smuggling shape", b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG".to_vec()),
        ("TE.CL smuggling shape", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n".to_vec()),
        ("chunked twice in one header", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("Transfer-Encoding twice", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("Transfer-Encoding gzip", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec()),
        ("Transfer-Encoding gzip, chunked", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("Transfer-Encoding CHUNKED", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n".to_vec()),
        ("Transfer-Encoding in HTTP/1.0", b"POST /p HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("space before colon", b"GET /p HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n".to_vec()),
        ("obs-fold", b"GET /p HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n".to_vec()),
        ("bad chunk size", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n".to_vec()),
        ("negative chunk size", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n\r\n".to_vec()),
        ("0x chunk size", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("overflowing chunk size", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nx\r\n".to_vec()),
        ("chunk without CRLF", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n".to_vec()),
        ("chunk extension", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\n\r\n".to_vec()),
        ("valid chunked body", b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec()),
        ("LF-only line ends", b"GET /p HTTP/1.1\nHost: a\n\n".to_vec()),
        ("NUL in a header value", b"GET /p HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n".to_vec()),
        ("space in a header name", b"GET /p HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n".to_vec()),
        ("invalid method characters", b"G@T /p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("lower-case method", b"get /p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("HTTP/2.0 on an HTTP/1 connection", b"GET /p HTTP/2.0\r\nHost: a\r\n\r\n".to_vec()),
        ("HTTP/1.2", b"GET /p HTTP/1.2\r\nHost: a\r\n\r\n".to_vec()),
        ("HTTP/0.9 style", b"GET /p\r\n\r\n".to_vec()),
        ("absolute-form target", b"GET http://other/p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("dot segments above the root", b"GET /../p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("encoded dot segments above the root", b"GET /%2e%2e/p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("encoded NUL in the path", b"GET /p%00 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("invalid percent escape", b"GET /p%zz HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("target without a slash", b"GET p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("dot segments inside", b"GET /a/../p HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("fragment in the target", b"GET /p#frag HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
    ];
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(16 * 1024));
    v.push(("16 KiB request line", long_uri.into_bytes()));
    let long_header = format!(
        "GET /p HTTP/1.1\r\nHost: a\r\nX-Long: {}\r\n\r\n",
        "b".repeat(10 * 1024)
    );
    v.push(("10 KiB header line", long_header.into_bytes()));
    let mut many = String::from("GET /p HTTP/1.1\r\nHost: a\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    v.push(("150 headers", many.into_bytes()));
    v
}

/// An upstream that answers every request `200 ok` and counts them.
async fn recorder() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                // one request per connection (the answer says close)
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                buf.drain(..end);
                seen.fetch_add(1, Ordering::SeqCst);
                // read the body (briefly) before answering, as a real server would
                let done = |b: &[u8]| {
                    if head.contains("transfer-encoding: chunked") {
                        b.windows(5).any(|w| w == b"0\r\n\r\n")
                    } else {
                        let n = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        b.len() >= n
                    }
                };
                while !done(&buf) {
                    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut chunk)).await
                    {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, seen)
}

struct Nginx {
    child: Child,
    _dir: tempdir::Dir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nginx(port: u16, upstream: &str) -> Nginx {
    let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx is needed for the probes: scripts/test.sh installs it");
    let dir = tempdir::Dir::new();
    let d = dir.path().display();
    let conf = format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream u {{ server {upstream}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"#
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx { child, _dir: dir }
}

/// Sends `bytes`, returns the status of the first response (0 when the connection closed or
/// stayed silent without one).
async fn status_for(port: u16, bytes: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(2).any(|w| w == b"\r\n") {
        match tokio::time::timeout(Duration::from_millis(1500), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&out);
    line.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_probes_match_nginx() {
    let (n_up, n_seen) = recorder().await;
    let (p_up, p_seen) = recorder().await;
    let nport = free_port();
    let _nginx = start_nginx(nport, &n_up);
    let gw = Gateway::start(&format!(
        "routes:\n  - {{id: all, uri: /*, upstream: {{nodes: {{\"{p_up}\": 1}}}}}}\n"
    ));
    let mut diffs = Vec::new();
    let mut same = 0;
    for (name, bytes) in probes() {
        let (n0, p0) = (n_seen.load(Ordering::SeqCst), p_seen.load(Ordering::SeqCst));
        let (ns, ps) = tokio::join!(status_for(nport, &bytes), status_for(gw.port, &bytes));
        // let a request that was forwarded arrive
        tokio::time::sleep(Duration::from_millis(50)).await;
        let nf = n_seen.load(Ordering::SeqCst) > n0;
        let pf = p_seen.load(Ordering::SeqCst) > p0;
        if (ns, nf) == (ps, pf) {
            same += 1;
        } else {
            diffs.push((
                name,
                format!("nginx {ns} (forwarded: {nf}), polygate {ps} (forwarded: {pf})"),
            ));
        }
    }
    println!(
        "raw probes: {same} answered as nginx answers, {} differ",
        diffs.len()
    );
    for (name, d) in &diffs {
        let known = KNOWN_DIFFERENCES.iter().find(|(k, _)| k == name);
        println!(
            "  DIFF {name}: {d}{}",
            known
                .map(|(_, w)| format!(" [known: {w}]"))
                .unwrap_or_default()
        );
    }
    let unexpected: Vec<&&str> = diffs
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !KNOWN_DIFFERENCES.iter().any(|(k, _)| k == *n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "probes answered unlike nginx: {unexpected:?}"
    );
}
