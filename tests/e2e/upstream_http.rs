//! polygate's own upstream HTTP/1.1 client against scripted upstreams that answer with exact
//! bytes: chunked and close-delimited bodies, bodiless responses, interim 1xx, large bodies in
//! both directions, connections the upstream closes, connection rotation, garbage.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// What the scripted upstream does with each request on a connection.
#[derive(Clone, Copy)]
enum Script {
    /// Answer with these exact bytes, keep the connection.
    Raw(&'static [u8]),
    /// Answer with these bytes, then close the connection.
    RawThenClose(&'static [u8]),
    /// Answer "ok" and then close, without saying so (a stale keep-alive connection).
    SilentClose,
    /// Read a Content-Length or chunked body and answer with its length and a checksum.
    CountBody,
    /// Answer every request with two responses: its own and one nobody asked for.
    TwoResponses,
    /// Answer the first request of a connection; read the second in full, then close without
    /// answering (the request reached the upstream).
    AnswerThenSwallow,
}

struct Scripted {
    addr: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted(script: Script) -> Scripted {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (conns, reqs) = (connections.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s, script, reqs.clone()));
        }
    });
    Scripted {
        addr,
        connections,
        requests,
        task,
    }
}

/// Reads one request head; returns it (lower-cased) or None at EOF.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).to_lowercase();
            buf.drain(..i + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, need: usize) -> bool {
    while buf.len() < need {
        let mut chunk = vec![0u8; 65536];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// Reads a request body framed by content-length or chunked encoding.
async fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<Vec<u8>> {
    if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        let n: usize = cl.trim().parse().ok()?;
        if !fill(s, buf, n).await {
            return None;
        }
        return Some(buf.drain(..n).collect());
    }
    if !head.contains("transfer-encoding: chunked") {
        return Some(Vec::new());
    }
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let have = buf.len();
            if !fill(s, buf, have + 1).await {
                return None;
            }
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&buf[..line_end]).trim(), 16).ok()?;
        buf.drain(..line_end + 2);
        if !fill(s, buf, size + 2).await {
            return None;
        }
        body.extend(buf.drain(..size));
        buf.drain(..2);
        if size == 0 {
            return Some(body);
        }
    }
}

async fn serve(mut s: TcpStream, script: Script, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut on_conn = 0;
    while let Some(head) = read_head(&mut s, &mut buf).await {
        requests.fetch_add(1, Ordering::SeqCst);
        on_conn += 1;
        match script {
            Script::TwoResponses => {
                let both = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirstHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond";
                if s.write_all(both).await.is_err() {
                    return;
                }
            }
            Script::AnswerThenSwallow => {
                if read_body(&mut s, &mut buf, &head).await.is_none() {
                    return;
                }
                if on_conn > 1 {
                    return;
                }
                if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Script::Raw(bytes) => {
                if s.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Script::RawThenClose(bytes) => {
                let _ = s.write_all(bytes).await;
                return;
            }
            Script::SilentClose => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                return;
            }
            Script::CountBody => {
                let Some(body) = read_body(&mut s, &mut buf, &head).await else {
                    return;
                };
                let sum: u64 = body.iter().map(|b| *b as u64).sum();
                let text = format!("{} {}", body.len(), sum);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
                    text.len(),
                    text
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn route(id: &str, uri: &str, node: &str, extra: &str) -> String {
    format!("  - {{id: {id}, uri: \"{uri}\", upstream: {{nodes: {{\"{node}\": 1}}{extra}}}}}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn response_framings() {
    let chunked = scripted(Script::Raw(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kind: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
    ))
    .await;
    let close = scripted(Script::RawThenClose(
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
    ))
    .await;
    let http10 = scripted(Script::RawThenClose(b"HTTP/1.0 200 OK\r\n\r\nold style")).await;
    let no_content = scripted(Script::Raw(
        b"HTTP/1.1 204 No Content\r\nx-kind: 204\r\n\r\n",
    ))
    .await;
    let not_modified = scripted(Script::Raw(
        b"HTTP/1.1 304 Not Modified\r\netag: \"a\"\r\ncontent-length: 99\r\n\r\n",
    ))
    .await;
    let interim = scripted(Script::Raw(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone",
    ))
    .await;
    let garbage = scripted(Script::RawThenClose(b"this is not http\r\n\r\n")).await;
    let mut routes = String::from("routes:\n");
    routes += &route("chunked", "/chunked", &chunked.addr, "");
    routes += &route("close", "/close", &close.addr, "");
    routes += &route("http10", "/http10", &http10.addr, "");
    routes += &route("nocontent", "/204", &no_content.addr, "");
    routes += &route("notmod", "/304", &not_modified.addr, "");
    routes += &route("interim", "/interim", &interim.addr, "");
    routes += &route("garbage", "/garbage", &garbage.addr, ", retries: 0");
    let gw = Gateway::start(&routes);
    let p = gw.port;

    let mut c = Conn::open(p).await;
    for _ in 0..3 {
        let r = c.get("/chunked").await;
        assert_eq!((r.status, r.body.as_str()), (200, "hello, world"));
        assert_eq!(r.header("x-kind"), Some("chunked"));
    }
    assert_eq!(
        chunked.connections.load(Ordering::SeqCst),
        1,
        "chunked responses keep the connection"
    );

    for _ in 0..2 {
        let r = c.get("/close").await;
        assert_eq!((r.status, r.body.as_str()), (200, "until the end"));
    }
    assert_eq!(
        close.connections.load(Ordering::SeqCst),
        2,
        "a close-delimited connection is not reused"
    );
    assert_eq!(c.get("/http10").await.body, "old style");

    let r = c.get("/204").await;
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    assert_eq!(r.header("x-kind"), Some("204"));
    let r = c.get("/304").await;
    assert_eq!((r.status, r.body.as_str()), (304, ""));
    let r = c.send("HEAD", "/chunked", &[], "").await.unwrap();
    assert_eq!(r.status, 200);

    let r = c.get("/interim").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (201, "done"),
        "interim 1xx responses are skipped"
    );

    let r = c.get("/garbage").await;
    assert_eq!(r.status, 502);
    assert!(gw.stderr().contains("invalid response"), "{}", gw.stderr());
    // the client connection survived every case above
    assert_eq!(c.get("/chunked").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways() {
    let counter = scripted(Script::CountBody).await;
    let echo = Upstream::start("big").await;
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route("count", "/count", &counter.addr, ""),
        route("echo", "/echo", &echo.node(), "")
    ));
    let body: String = (0..3 * 1024 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let sum: u64 = body.bytes().map(|b| b as u64).sum();
    let r = request(gw.port, "POST", "/count", &[], &body).await;
    assert_eq!(
        r.body,
        format!("{} {sum}", body.len()),
        "request body forwarded intact"
    );
    let r = request(gw.port, "POST", "/echo", &[], &body).await;
    assert_eq!(
        r.json()["body"].as_str().map(str::len),
        Some(body.len()),
        "response body streamed back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_from_the_client() {
    let counter = scripted(Script::CountBody).await;
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("count", "/count", &counter.addr, "")
    ));
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut out = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n7 ") {
        let n = s.read(&mut out).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&out[..n]);
        if String::from_utf8_lossy(&got).ends_with("7 700") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("7 700"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_pooled_connections_and_rotation() {
    // the upstream closes every connection after one response without saying so: each pooled
    // connection is stale on its next use, and the request must still succeed
    let stale = scripted(Script::SilentClose).await;
    let stale_post = scripted(Script::SilentClose).await;
    let rotating = scripted(Script::CountBody).await;
    let gw = Gateway::start(&format!(
        "routes:\n{}{}{}",
        route("stale", "/stale", &stale.addr, ", retries: 0"),
        route("stalepost", "/stalepost", &stale_post.addr, ", retries: 0"),
        route(
            "rot",
            "/rot",
            &rotating.addr,
            ", keepalive_pool: {size: 4, requests: 2}"
        )
    ));
    let mut c = Conn::open(gw.port).await;
    for i in 0..6 {
        let r = c.get("/stale").await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "ok"),
            "GET {i}: {}",
            gw.stderr()
        );
    }
    assert_eq!(
        stale.connections.load(Ordering::SeqCst),
        6,
        "each stale connection was replaced"
    );
    // a request body cannot be replayed: the pooled connection is probed before it is used
    for i in 0..4 {
        let r = c.send("POST", "/stalepost", &[], "payload").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "ok"),
            "POST {i}: {}",
            gw.stderr()
        );
    }
    for _ in 0..6 {
        assert_eq!(c.get("/rot").await.body, "0 0");
    }
    assert_eq!(
        rotating.connections.load(Ordering::SeqCst),
        3,
        "keepalive_pool.requests = 2 rotates connections"
    );
}

/// RFC 9112 framing edges of upstream responses (section 6.3) and what polygate does with
/// each: the status the client gets, and whether the connection went back to the pool.
#[tokio::test(flavor = "multi_thread")]
async fn response_framing_edges() {
    // Transfer-Encoding whose final coding is not chunked: the body runs to the close
    let te_gzip = scripted(Script::RawThenClose(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nto the close",
    ))
    .await;
    // chunked wins over Content-Length, and the connection is not reused
    let te_and_cl = scripted(Script::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ))
    .await;
    let signed = scripted(Script::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
    ))
    .await;
    let differing = scripted(Script::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!",
    ))
    .await;
    let equal_list = scripted(Script::Raw(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\n\r\nok",
    ))
    .await;
    let upgrade = scripted(Script::Raw(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ))
    .await;
    let bad_chunk = scripted(Script::Raw(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n+2\r\nok\r\n0\r\n\r\n",
    ))
    .await;
    let mut routes = String::from("routes:\n");
    for (id, s) in [
        ("tegzip", &te_gzip),
        ("teandcl", &te_and_cl),
        ("signed", &signed),
        ("differing", &differing),
        ("equallist", &equal_list),
        ("upgrade", &upgrade),
        ("badchunk", &bad_chunk),
    ] {
        routes += &route(id, &format!("/{id}"), &s.addr, ", retries: 0");
    }
    let gw = Gateway::start(&routes);
    let mut c = Conn::open(gw.port).await;
    for _ in 0..2 {
        let r = c.get("/tegzip").await;
        assert_eq!((r.status, r.body.as_str()), (200, "to the close"));
        let r = c.get("/teandcl").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = c.get("/equallist").await;
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    }
    assert_eq!(te_gzip.connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        te_and_cl.connections.load(Ordering::SeqCst),
        2,
        "a response framed by both Transfer-Encoding and Content-Length is not pooled"
    );
    assert_eq!(equal_list.connections.load(Ordering::SeqCst), 1);
    for path in ["/signed", "/differing", "/upgrade"] {
        assert_eq!(c.get(path).await.status, 502, "{path}");
    }
    // a body that breaks mid-way: the head was sent, so the client sees the stream end early
    let r = c.send("GET", "/badchunk", &[], "").await;
    assert!(r.is_err() || r.unwrap().status == 200);
    let log = gw.stderr();
    assert!(log.contains("invalid content-length"), "{log}");
    assert!(log.contains("conflicting content-length"), "{log}");
    assert!(log.contains("unsolicited 101"), "{log}");
}

/// An upstream that sends a second response nobody asked for on a kept-alive connection:
/// the next client must get its own response, never those stray bytes.
#[tokio::test(flavor = "multi_thread")]
async fn unsolicited_bytes_never_reach_another_client() {
    let two = scripted(Script::TwoResponses).await;
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route("two", "/two", &two.addr, ", retries: 0")
    ));
    for i in 0..5 {
        // separate client connections: each request would reuse its worker's pool if it could
        let r = get(gw.port, "/two").await;
        assert_eq!((r.status, r.body.as_str()), (200, "first"), "request {i}");
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    assert_eq!(
        two.connections.load(Ordering::SeqCst),
        5,
        "a connection with unread bytes is never reused"
    );
}

/// A POST whose bytes reached the upstream is never replayed when the pooled connection turns
/// out to be closed; a GET is.
#[tokio::test(flavor = "multi_thread")]
async fn post_is_not_replayed_on_a_stale_connection() {
    let post_up = scripted(Script::AnswerThenSwallow).await;
    let get_up = scripted(Script::AnswerThenSwallow).await;
    let gw = Gateway::start(&format!(
        "routes:\n{}{}",
        route("p", "/p", &post_up.addr, ", retries: 0"),
        route("g", "/g", &get_up.addr, ", retries: 0")
    ));
    let mut c = Conn::open(gw.port).await;
    let r = c.send("POST", "/p", &[], "one").await.unwrap();
    assert_eq!(r.status, 200);
    let r = c.send("POST", "/p", &[], "two").await.unwrap();
    assert_eq!(r.status, 502, "the second POST failed without a replay");
    assert_eq!(
        post_up.requests.load(Ordering::SeqCst),
        2,
        "the upstream received each POST once"
    );
    let r = c.get("/g").await;
    assert_eq!(r.status, 200);
    let r = c.get("/g").await;
    assert_eq!(
        r.status, 200,
        "an idempotent request is retried on a new connection"
    );
    assert_eq!(get_up.requests.load(Ordering::SeqCst), 3);
}

/// The send timeout bounds each write, not the whole upload: a steady upload that takes
/// three times the route's `send` timeout goes through (it got 504 when the timeout bounded
/// the whole send).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_steady_upload_is_not_a_send_timeout() {
    let counter = scripted(Script::CountBody).await;
    let gw = Gateway::start(&format!(
        "routes:\n{}",
        route(
            "up",
            "/up",
            &counter.addr,
            ", timeout: {connect: 1, send: 1, read: 5}"
        )
    ));
    let total = 6 * 1024 * 1024;
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    s.write_all(
        format!(
            "POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let piece = vec![b'a'; 256 * 1024];
    let started = std::time::Instant::now();
    for _ in 0..total / piece.len() {
        s.write_all(&piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(125)).await;
    }
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(started.elapsed() > std::time::Duration::from_secs(2));
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with(&format!("{total} {}", total as u64 * 97)),
        "{out}"
    );
}

/// A client that stops reading a response is dropped after `timeouts.client_send` (nginx's
/// `send_timeout`), and the upstream connection feeding it is released.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_dropped() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let released = Arc::new(AtomicUsize::new(0));
    let rel = released.clone();
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        read_head(&mut s, &mut buf).await;
        let total: usize = 512 * 1024 * 1024;
        s.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            if s.write_all(&chunk).await.is_err() {
                rel.fetch_add(1, Ordering::SeqCst);
                return;
            }
            sent += chunk.len();
        }
    });
    let port = free_port();
    let gw = Gateway::start_raw(
        port,
        &with_gateway(
            port,
            &format!(
                "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\"}}]\n  timeouts: {{client_send: 1}}\nroutes:\n{}",
                route(
                    "big",
                    "/big",
                    &addr,
                    ", timeout: {connect: 1, send: 1, read: 30}"
                )
            ),
        ),
    );
    let mut c = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    c.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // read nothing: the gateway's writes stall, then it gives up on this client
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while released.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "the upstream connection was released"
    );
    task.abort();
    // what the client can still read ends well before the whole body
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(Ok(n)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), c.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 512 * 1024 * 1024, "{got}");
}
