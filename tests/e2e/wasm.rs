//! proxy-wasm filters through the real gateway: WAT fixtures (tests/wasm/wat), polygate's
//! SDK-free AssemblyScript filter and the add-header filter on the published AssemblyScript
//! SDK (both built from npm by scripts/wasm-filters.sh). Behaviour follows Envoy
//! (proxy-wasm-cpp-host); each test names the part of the ABI it covers.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// The service the filters call out to: `/check` answers 200 `alice` for `x-token: good`
/// and 403 otherwise, `/stamp` answers `stamped`, `/a` and `/b` answer `A` and `B` after
/// 150 ms. Counts requests in flight at once.
struct Service {
    addr: std::net::SocketAddr,
    max_in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Service {
    async fn start() -> Service {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let max = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let m = max.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (m, now) = (m.clone(), now.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (m, now) = (m.clone(), now.clone());
                        async move {
                            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(n, Ordering::SeqCst);
                            let token = req.headers().get("x-token").map(|v| v.as_bytes().to_vec());
                            let (status, body) = match req.uri().path() {
                                "/check" if token.as_deref() == Some(b"good") => (200, "alice"),
                                "/check" => (403, "no"),
                                "/stamp" => (200, "stamped"),
                                "/a" | "/b" => {
                                    tokio::time::sleep(Duration::from_millis(150)).await;
                                    (200, if req.uri().path() == "/a" { "A" } else { "B" })
                                }
                                _ => (404, "?"),
                            };
                            now.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Service {
            addr,
            max_in_flight: max,
            task,
        }
    }
}

/// An upstream that answers every request with a chunked body sent in three chunks, 30 ms
/// apart: `hello`, ` wasm`, ` world`.
async fn chunked_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                    .await;
                for part in ["hello", " wasm", " world"] {
                    let _ = s
                        .write_all(format!("{:x}\r\n{part}\r\n", part.len()).as_bytes())
                        .await;
                    let _ = s.flush().await;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (addr, task)
}

/// Sends `parts` as a chunked request body, 20 ms apart; returns the whole raw response.
async fn chunked_request(port: u16, path: &str, parts: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    for p in parts {
        s.write_all(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes())
            .await
            .unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The body of a raw chunked HTTP/1.1 response.
fn dechunk(raw: &str) -> String {
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

fn gateway_section(workers: usize, extra: &str, plugins: &[(&str, String, i32)]) -> String {
    let mut s = format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: {workers}\n  watch_interval: 0.2\n{extra}  wasm:\n    plugins:\n"
    );
    for (name, file, prio) in plugins {
        s.push_str(&format!(
            "      - {{name: {name}, file: \"{file}\", priority: {prio}}}\n"
        ));
    }
    s
}

/// Headers added and removed both ways, a local 403 from request headers, properties
/// (`plugin_name`), the plugin configuration (`proxy_on_configure`), the log phase; and the
/// published AssemblyScript SDK's add-header filter next to it.
#[tokio::test(flavor = "multi_thread")]
async fn headers_local_reply_properties_and_the_assemblyscript_sdk() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /h/*, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{wasm_headers: {{conf: \"hello-conf\"}}, as_sdk_add_header: {{conf: {{greeting: hi}}}}}}}}\n",
        gateway_section(
            2,
            "",
            &[
                (
                    "wasm_headers",
                    libs::wat("headers").display().to_string(),
                    7999
                ),
                (
                    "as_sdk_add_header",
                    libs::wasm("as_sdk_add_header").display().to_string(),
                    7998
                ),
            ]
        ),
        u.node()
    ));
    for _ in 0..4 {
        // several requests: both worker threads' instances
        let r = get_h(gw.port, "/h/x", &[("x-remove-me", "1")]).await;
        assert_eq!(r.status, 200, "{}", gw.stderr());
        assert_eq!(r.seen_header("x-wasm-req").as_deref(), Some("added"));
        assert_eq!(r.seen_header("x-remove-me"), None);
        assert_eq!(
            r.seen_header("x-wasm-plugin").as_deref(),
            Some("wasm_headers")
        );
        assert_eq!(r.seen_header("x-wasm-conf").as_deref(), Some("hello-conf"));
        assert_eq!(r.header("x-wasm-resp"), Some("added"));
        assert_eq!(r.header("x-upstream"), None, "removed from the response");
        // an object `conf` reaches the filter as JSON (APISIX's wasm plugin schema)
        assert_eq!(r.header("x-as-sdk"), Some(r#"{"greeting":"hi"}"#));
    }
    let hits = u.hits();
    let r = get_h(gw.port, "/h/x", &[("x-deny", "1")]).await;
    assert_eq!((r.status, r.body.as_str()), (403, "denied by wasm"));
    assert_eq!(r.header("x-wasm-deny"), Some("yes"));
    assert_eq!(u.hits(), hits, "a local reply never reaches the upstream");
    assert!(
        gw.stderr().contains("headers filter log phase"),
        "{}",
        gw.stderr()
    );
    assert!(!gw.stderr().contains("ERROR"), "{}", gw.stderr());
}

/// Header map pairs read and set whole, properties (Envoy's names, an 8-byte integer, an nginx
/// variable), the VM configuration in `proxy_on_vm_start`, `proxy_close_stream`.
#[tokio::test(flavor = "multi_thread")]
async fn pairs_properties_vm_config_and_close() {
    let u = Upstream::start("u").await;
    let filter = libs::wasm("as_filter").display().to_string();
    let mut section = gateway_section(2, "", &[]);
    section.push_str(&format!(
        "      - {{name: as_filter, file: \"{filter}\", priority: 1000, vm_config: {{who: vm}}}}\n"
    ));
    let gw = Gateway::start(&format!(
        "{section}upstreams: [{{id: u, nodes: {{\"{}\": 1}}}}]\nroutes:\n  - {{id: p, uri: /p/*, upstream_id: u, plugins: {{as_filter: {{conf: \"mode=pairs\"}}}}}}\n",
        u.node()
    ));
    let r = get(gw.port, "/p/x?q=1").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    let props = r.seen_header("x-props").unwrap();
    let parts: Vec<&str> = props.split('|').collect();
    assert_eq!(parts[..4], ["GET", "/p/x", "p", "u"], "{props}");
    assert!(parts[4].parse::<u16>().unwrap() > 0, "{props}");
    assert_eq!(parts[5], "127.0.0.1", "{props}");
    let n: usize = r.seen_header("x-pairs-count").unwrap().parse().unwrap();
    assert!(n >= 6, "pseudo-headers, the client's and the filter's: {n}");
    assert_eq!(r.header("x-pairs-set"), Some("yes"));
    assert_eq!(
        r.header("x-upstream"),
        Some("u"),
        "the other headers set back"
    );
    assert_eq!(r.header("x-vm-config"), Some(r#"{"who":"vm"}"#));
    let r = get_h(gw.port, "/p/x", &[("x-close", "1")]).await;
    assert_eq!(r.status, 500);
    assert!(gw.stderr().contains("closed the stream"), "{}", gw.stderr());
}

/// A reload that drops a plugin configuration ends its root context (`proxy_on_done`,
/// `proxy_on_delete`) once no request uses it, as Envoy does when a plugin goes away; the new
/// configuration gets a root context of its own.
#[tokio::test(flavor = "multi_thread")]
async fn root_contexts_of_dropped_configurations_are_deleted() {
    let u = Upstream::start("u").await;
    let filter = libs::wasm("as_filter").display().to_string();
    let config = |conf: &str| {
        format!(
            "{}routes:\n  - {{id: r, uri: /r/*, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{as_filter: {{conf: \"{conf}\"}}}}}}\n",
            gateway_section(1, "", &[("as_filter", filter.clone(), 1000)]),
            u.node()
        )
    };
    let gw = Gateway::start(&config("mode=none"));
    assert_eq!(get(gw.port, "/r/x").await.status, 200);
    gw.write_config(&format!("{}#END\n", config("mode=pairs")));
    let swapped = gw
        .eventually(Duration::from_secs(10), || async {
            get(gw.port, "/r/x")
                .await
                .seen_header("x-pairs-count")
                .is_some()
        })
        .await;
    assert!(swapped, "{}", gw.stderr());
    assert!(
        gw.stderr().contains("as_filter root context 1 deleted"),
        "{}",
        gw.stderr()
    );
}

/// `proxy_on_done` answering false defers log and delete until the filter calls `proxy_done()`
/// (here from a callout's answer), as in Envoy.
#[tokio::test(flavor = "multi_thread")]
async fn done_false_waits_for_proxy_done() {
    let u = Upstream::start("u").await;
    let svc = Service::start().await;
    let filter = libs::wasm("as_filter").display().to_string();
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /r/*, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{as_filter: {{conf: \"mode=deferred;upstream={}\"}}}}}}\n",
        gateway_section(1, "", &[("as_filter", filter, 1000)]),
        u.node(),
        svc.addr
    ));
    assert_eq!(get(gw.port, "/r/x").await.status, 200);
    let ended = gw
        .eventually(Duration::from_secs(5), || async {
            gw.stderr().contains("as_filter log after proxy_done")
        })
        .await;
    assert!(ended, "{}", gw.stderr());
    let err = gw.stderr();
    let done = err.find("as_filter deferred done for").unwrap();
    let log = err.find("as_filter log after proxy_done").unwrap();
    assert!(done < log, "log runs after proxy_done: {err}");
}

/// Host function statuses with good and bad arguments (proxy-wasm-cpp-host's statuses):
/// see tests/wasm/wat/statuses.wat for the list.
#[tokio::test(flavor = "multi_thread")]
async fn hostcall_statuses_follow_cpp_host() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /s, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{statuses: {{conf: x}}}}}}\n",
        gateway_section(
            1,
            "",
            &[("statuses", libs::wat("statuses").display().to_string(), 1)]
        ),
        u.node()
    ));
    let r = get(gw.port, "/s").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    assert_eq!(
        r.seen_header("x-statuses").as_deref(),
        Some("6211222112<2001202")
    );
}

/// ABI 0.1.0: two-argument header callbacks, `proxy_get_configuration`, `malloc`.
#[tokio::test(flavor = "multi_thread")]
async fn abi_0_1_0_modules_run() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /v, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{v010: {{conf: old-abi}}}}}}\n",
        gateway_section(
            1,
            "",
            &[("v010", libs::wat("v010").display().to_string(), 1)]
        ),
        u.node()
    ));
    let r = get(gw.port, "/v").await;
    assert_eq!(r.seen_header("x-v010").as_deref(), Some("old-abi"));
}

/// Pause on request headers for an auth callout and resume with its result; pause on
/// response headers for a second callout; a refusal as a local 401; a callout to a dead
/// upstream delivered to the filter as a failure (Envoy: `on_http_call_response(token, 0, 0,
/// 0)`), answered 503 by the filter; two callouts in flight at once.
#[tokio::test(flavor = "multi_thread")]
async fn callouts_pause_and_resume_on_both_sides() {
    let u = Upstream::start("u").await;
    let svc = Service::start().await;
    let filter = libs::wasm("as_filter").display().to_string();
    let gw = Gateway::start(&format!(
        "{}upstreams:\n  - {{id: u, nodes: {{\"{u}\": 1}}}}\n  - {{id: auth_svc, nodes: {{\"{s}\": 1}}}}\nroutes:\n  - {{id: auth, uri: /auth/*, upstream_id: u, plugins: {{as_filter: {{conf: \"mode=auth;upstream=auth_svc\"}}}}}}\n  - {{id: dead, uri: /dead/*, upstream_id: u, plugins: {{as_filter: {{conf: \"mode=auth;upstream=127.0.0.1:1\"}}}}}}\n  - {{id: two, uri: /two/*, upstream_id: u, plugins: {{as_filter: {{conf: \"mode=two;upstream={s}\"}}}}}}\n",
        gateway_section(2, "", &[("as_filter", filter, 1000)]),
        u = u.node(),
        s = svc.addr,
    ));
    let p = gw.port;
    let r = get_h(p, "/auth/x", &[("x-token", "good")]).await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    assert_eq!(r.seen_header("x-auth-user").as_deref(), Some("alice"));
    assert_eq!(
        r.header("x-stamp"),
        Some("stamped"),
        "response-side callout"
    );

    let hits = u.hits();
    let r = get_h(p, "/auth/x", &[("x-token", "bad")]).await;
    assert_eq!((r.status, r.body.as_str()), (401, "unauthorized\n"));
    assert_eq!(u.hits(), hits, "refused before the upstream");

    let r = get(p, "/dead/x").await;
    assert_eq!((r.status, r.body.as_str()), (503, "callout failed\n"));

    let r = get(p, "/two/x").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    assert_eq!(r.seen_header("x-call-a").as_deref(), Some("A"));
    assert_eq!(r.seen_header("x-call-b").as_deref(), Some("B"));
    assert!(
        svc.max_in_flight.load(Ordering::SeqCst) >= 2,
        "both callouts were in flight at once"
    );
    assert!(!gw.stderr().contains("ERROR"), "{}", gw.stderr());
}

/// Request and response bodies rewritten by a filter that pauses until the whole body is
/// there (cumulative `body_size`, then `end_of_stream`): both sent in several chunks.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_rewritten_across_chunks() {
    let u = Upstream::start("u").await;
    let (chunked, _task) = chunked_upstream().await;
    let filter = libs::wasm("as_filter").display().to_string();
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: req, uri: /req/*, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{as_filter: {{conf: \"mode=body\"}}}}}}\n  - {{id: resp, uri: /resp/*, upstream: {{nodes: {{\"{chunked}\": 1}}}}, plugins: {{as_filter: {{conf: \"mode=body\"}}}}}}\n",
        gateway_section(2, "", &[("as_filter", filter, 1000)]),
        u = u.node(),
    ));
    let raw = chunked_request(gw.port, "/req/x", &["hello ", "from ", "three chunks"]).await;
    let body = dechunk(&raw);
    let seen: serde_json::Value =
        serde_json::from_str(body.split("\n-- rewritten").next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(seen["body"], "HELLO FROM THREE CHUNKS", "{raw}");
    assert!(body.ends_with("\n-- rewritten by as_filter"), "{raw}");

    let r = get(gw.port, "/resp/x").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    assert_eq!(r.body, "hello wasm world\n-- rewritten by as_filter");
}

/// `request_body: stream`: the request body goes through the filter chunk by chunk as it
/// goes upstream (each chunk bracketed by the filter); a filter pausing on a streamed body
/// holds the chunks back and sees the cumulative body (all of it at the end).
#[tokio::test(flavor = "multi_thread")]
async fn request_bodies_streamed_chunk_by_chunk() {
    let u = Upstream::start("u").await;
    let filter = libs::wasm("as_filter").display().to_string();
    let mut gw_section = gateway_section(2, "", &[]);
    gw_section.push_str(&format!(
        "      - {{name: as_stream, file: \"{filter}\", priority: 1000, request_body: stream}}\n"
    ));
    let gw = Gateway::start(&format!(
        "{gw_section}routes:\n  - {{id: s, uri: /s/*, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{as_stream: {{conf: \"mode=stream\"}}}}}}\n  - {{id: h, uri: /h/*, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{as_stream: {{conf: \"mode=body\"}}}}}}\n",
        u = u.node(),
    ));
    let raw = chunked_request(gw.port, "/s/x", &["hello ", "from ", "three chunks"]).await;
    let seen: serde_json::Value =
        serde_json::from_str(&dechunk(&raw)).unwrap_or_else(|e| panic!("{e}: {raw}"));
    let body = seen["body"].as_str().unwrap();
    assert_eq!(
        body.replace(['[', ']'], ""),
        "HELLO FROM THREE CHUNKS",
        "{raw}"
    );
    assert!(body.matches('[').count() >= 2, "seen in pieces: {body}");
    let raw = chunked_request(gw.port, "/h/x", &["hello ", "from ", "three chunks"]).await;
    let body = dechunk(&raw);
    let seen: serde_json::Value =
        serde_json::from_str(body.split("\n-- rewritten").next().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {raw}"));
    assert_eq!(seen["body"], "HELLO FROM THREE CHUNKS", "{raw}");
    assert!(!gw.stderr().contains("ERROR"), "{}", gw.stderr());
}

/// Trailer fields both ways (`proxy_on_request_trailers` with `request_body: stream`,
/// `proxy_on_response_trailers`): the filter reads and adds fields; the client's trailers go
/// upstream after the last chunk, the upstream's reach a client that sent `TE: trailers`.
#[tokio::test(flavor = "multi_thread")]
async fn trailers_both_ways() {
    // answers with the raw request it received as a chunked body, and a trailer field
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let _task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                    let text = String::from_utf8_lossy(&got);
                    if let Some((_, body)) = text.split_once("\r\n\r\n")
                        && (body.starts_with("0\r\n") || body.contains("\r\n0\r\n"))
                        && body.ends_with("\r\n\r\n")
                    {
                        break;
                    }
                }
                let echo = String::from_utf8_lossy(&got).into_owned();
                let out = format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\nconnection: close\r\n\r\n{:x}\r\n{echo}\r\n0\r\nx-checksum: abc\r\n\r\n",
                    echo.len()
                );
                let _ = s.write_all(out.as_bytes()).await;
            });
        }
    });
    let filter = libs::wasm("as_filter").display().to_string();
    let mut section = gateway_section(2, "", &[]);
    section.push_str(&format!(
        "      - {{name: as_stream, file: \"{filter}\", priority: 1000, request_body: stream}}\n"
    ));
    let gw = Gateway::start(&format!(
        "{section}routes:\n  - {{id: t, uri: /t/*, upstream: {{nodes: {{\"{up}\": 1}}}}, plugins: {{as_stream: {{conf: \"mode=trailers\"}}}}}}\n"
    ));
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    s.write_all(b"POST /t/x HTTP/1.1\r\nhost: x\r\nte: trailers\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-req-trailer: 1\r\nx-consumer-username: admin\r\nx-forwarded-for: 6.6.6.6\r\ncontent-length: 3\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let raw = String::from_utf8_lossy(&out).to_lowercase();
    assert!(raw.starts_with("http/1.1 200"), "{raw}\n{}", gw.stderr());
    // what the upstream received: the body, then the client's trailer and the filter's
    assert!(raw.contains("hello"), "{raw}");
    assert!(raw.contains("x-req-trailer: 1"), "{raw}");
    assert!(raw.contains("x-wasm-req-trailer: seen-1"), "{raw}");
    // identity, forwarding and framing fields never go upstream as trailers
    assert!(!raw.contains("admin"), "{raw}");
    assert!(!raw.contains("6.6.6.6"), "{raw}");
    assert!(!raw.contains("content-length: 3"), "{raw}");
    // the response's trailer section, after the last chunk
    let tail = raw.rsplit("\r\n0\r\n").next().unwrap();
    assert!(tail.contains("x-checksum: abc"), "{raw}");
    assert!(tail.contains("x-wasm-trailer: seen-abc"), "{raw}");
    assert!(!gw.stderr().contains("ERROR"), "{}", gw.stderr());
}

/// Pause on the response body for a callout: the body is held (the upstream's three
/// chunks), the callout's answer is appended to it in `proxy_on_http_call_response`, and
/// the body goes on when the filter continues the response.
#[tokio::test(flavor = "multi_thread")]
async fn response_body_waits_for_a_callout() {
    let svc = Service::start().await;
    let (chunked, _task) = chunked_upstream().await;
    let filter = libs::wasm("as_filter").display().to_string();
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /r/*, upstream: {{nodes: {{\"{chunked}\": 1}}}}, plugins: {{as_filter: {{conf: \"mode=bodycall;upstream={s}\"}}}}}}\n",
        gateway_section(2, "", &[("as_filter", filter, 1000)]),
        s = svc.addr,
    ));
    for _ in 0..3 {
        let r = get(gw.port, "/r/x").await;
        assert_eq!(r.status, 200, "{}", gw.stderr());
        assert_eq!(
            r.body,
            "hello wasm world\n-- stamped: stamped",
            "{}",
            gw.stderr()
        );
    }
    assert!(!gw.stderr().contains("ERROR"), "{}", gw.stderr());
}

/// Ticks (`proxy_set_tick_period_milliseconds`), shared data with compare-and-swap across
/// requests and both worker threads, a shared queue with `proxy_on_queue_ready`, and a
/// counter on the metrics endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn tick_shared_data_across_threads_and_a_metric() {
    let u = Upstream::start("u").await;
    let mport = free_port();
    let filter = libs::wasm("as_filter").display().to_string();
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /t/*, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{as_filter: {{conf: \"tick=1\"}}}}}}\n  - {{id: q, uri: /q/*, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{as_filter: {{conf: \"queue=1\"}}}}}}\n",
        gateway_section(
            2,
            &format!("  metrics: {{addr: \"127.0.0.1:{mport}\"}}\n"),
            &[("as_filter", filter, 1000)]
        ),
        u = u.node(),
    ));
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = get(gw.port, "/t/x").await;
        assert_eq!(r.status, 200, "{}", gw.stderr());
        seen.push(r.seen_header("x-hits").unwrap().parse::<u32>().unwrap());
    }
    seen.sort();
    assert_eq!(
        seen,
        (1..=10).collect::<Vec<_>>(),
        "one counter for every instance"
    );
    let ticked = gw
        .eventually(Duration::from_secs(5), || async {
            get(gw.port, "/t/x").await.header("x-ticked") == Some("yes")
        })
        .await;
    assert!(ticked, "the tick ran");
    // a shared queue: each request's path is enqueued, its owner handles it in
    // proxy_on_queue_ready (on whichever worker registered it last)
    let r = get(gw.port, "/q/first-item").await;
    assert_eq!(r.status, 200);
    let queued = gw
        .eventually(Duration::from_secs(5), || async {
            get(gw.port, "/t/y").await.header("x-last-queued") == Some("/q/first-item")
        })
        .await;
    assert!(queued, "{}", gw.stderr());
    let m = get(mport, "/metrics").await;
    assert!(
        m.body.contains("# TYPE as_filter_requests_total counter"),
        "{}",
        m.body
    );
    let n: u64 = m
        .body
        .lines()
        .find_map(|l| l.strip_prefix("as_filter_requests_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(n >= 11, "{}", m.body);
}

/// A trap fails that request with 500 and the instance is rebuilt (the next request is
/// served by a fresh one); an endless loop is stopped by the CPU limit; growing memory past
/// `memory_limit` is refused. The gateway lives on.
#[tokio::test(flavor = "multi_thread")]
async fn traps_cpu_limit_and_memory_cap() {
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: r, uri: /t, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{trap: {{conf: x}}}}}}\n",
        gateway_section(
            1,
            "",
            &[("trap", libs::wat("trap").display().to_string(), 1)]
        )
        .replace("  wasm:\n", "  wasm:\n    time_limit: 0.05\n"),
        u.node()
    ));
    let p = gw.port;
    assert_eq!(get(p, "/t").await.header("x-served"), Some("1"));
    assert_eq!(get(p, "/t").await.header("x-served"), Some("2"));
    let r = get_h(p, "/t", &[("x-trap", "1")]).await;
    assert_eq!(r.status, 500);
    let r = get(p, "/t").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-served"),
        Some("1"),
        "a fresh instance after the trap"
    );

    let t0 = Instant::now();
    let r = get_h(p, "/t", &[("x-loop", "1")]).await;
    assert_eq!(r.status, 500);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the loop was stopped"
    );
    assert!(gw.stderr().contains("CPU time limit"), "{}", gw.stderr());
    assert_eq!(get(p, "/t").await.status, 200);

    let r = get_h(p, "/t", &[("x-grow", "1")]).await;
    assert_eq!(r.status, 500, "growing past the memory cap is refused");
    assert_eq!(get(p, "/t").await.status, 200);
    assert!(gw.stderr().contains("unreachable"), "{}", gw.stderr());
}

fn validate_wasm(file: &str, route_plugins: &str) -> (i32, String) {
    let text = format!(
        "gateway:\n  wasm:\n    plugins:\n      - {{name: f, file: \"{file}\", priority: 1}}\nroutes:\n  - {{id: r, uri: /x, upstream: {{nodes: {{\"127.0.0.1:1\": 1}}}}, plugins: {route_plugins}}}\n#END\n"
    );
    validate(&text, "yaml")
}

/// Modules refused at load with a clear error naming the key path: no ABI marker, an ABI
/// version this host does not implement, an import no released ABI has, no memory export, no
/// allocator export (as proxy-wasm-cpp-host), a missing file; a name taken by a built-in plugin; APISIX's `conf` schema.
#[test]
fn bad_modules_and_configurations_are_refused_at_load() {
    let cases = [
        ("no_abi", "no proxy_abi_version_* marker"),
        ("future_abi", "proxy_abi_version_0_3_0"),
        ("unknown_import", "env.proxy_dispatch_http_call"),
        ("no_memory", "exports no memory"),
        ("no_alloc", "exports no allocator"),
    ];
    for (name, want) in cases {
        let (code, out) = validate_wasm(&libs::wat(name).display().to_string(), "{f: {conf: x}}");
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.contains("gateway.wasm.plugins[0].file"),
            "{name}: {out}"
        );
        assert!(out.contains(want), "{name}: {out}");
    }
    let (code, out) = validate_wasm("/nonexistent/f.wasm", "{f: {conf: x}}");
    assert_eq!(code, 1);
    assert!(out.contains("cannot read"), "{out}");

    // APISIX's schema cases, from its t/wasm/route.t: TEST 1 (no conf: refused), TEST 2 (a
    // number: refused), TEST 3 (an empty object: accepted), TEST 7 (an `id` beside conf)
    let good = libs::wat("headers").display().to_string();
    let (code, out) = validate_wasm(&good, "{f: {}}");
    assert_eq!(code, 1);
    assert!(out.contains("routes[0].plugins.f.conf: required"), "{out}");
    let (code, out) = validate_wasm(&good, "{f: {conf: 123}}");
    assert_eq!(code, 1);
    assert!(out.contains("routes[0].plugins.f.conf"), "{out}");
    let (code, out) = validate_wasm(&good, "{f: {conf: \"\"}}");
    assert_eq!(code, 1);
    assert!(out.contains("routes[0].plugins.f.conf"), "{out}");
    assert_eq!(validate_wasm(&good, "{f: {conf: {}}}").0, 0);
    assert_eq!(validate_wasm(&good, "{f: {conf: {a: 1}}}").0, 0);
    assert_eq!(validate_wasm(&good, "{f: {id: log, conf: blahblah}}").0, 0);

    let text = format!(
        "gateway:\n  wasm:\n    plugins:\n      - {{name: key-auth, file: \"{good}\", priority: 1}}\n#END\n"
    );
    let (code, out) = validate(&text, "yaml");
    assert_eq!(code, 1);
    assert!(
        out.contains("gateway.wasm.plugins[0].name") && out.contains("built-in"),
        "{out}"
    );
}

/// A configuration reload that swaps the module under load: no request fails, and the new
/// module serves once committed. A reload with a broken module is refused and the running
/// one keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn reload_swaps_the_module_under_load() {
    let u = Upstream::start("u").await;
    let dir = tempdir::Dir::new();
    let original = std::fs::read_to_string(libs::wat("headers")).unwrap();
    let a = dir.path().join("a.wat");
    let b = dir.path().join("b.wat");
    std::fs::write(&a, &original).unwrap();
    // same length: the data segment offsets stay valid
    std::fs::write(&b, original.replace("\"added\"", "\"swapd\"")).unwrap();
    let config = |file: &std::path::Path| {
        format!(
            "{}routes:\n  - {{id: r, uri: /h/*, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{f: {{conf: c}}}}}}\n",
            gateway_section(2, "", &[("f", file.display().to_string(), 1)]),
            u.node()
        )
    };
    let gw = Gateway::start(&config(&a));
    let port = gw.port;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures) = (stop.clone(), failures.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 5000 {
                n += 1;
                let r = get(port, "/h/x").await;
                if r.status != 200 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.write_config(&format!("{}#END\n", config(&b)));
    let swapped = gw
        .eventually(Duration::from_secs(10), || async {
            get(port, "/h/x").await.header("x-wasm-resp") == Some("swapd")
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // a broken module: refused, the swapped one keeps serving
    gw.write_config(&format!("{}#END\n", config(&libs::wat("no_abi"))));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert!(swapped, "{}", gw.stderr());
    assert_eq!(failures.load(Ordering::SeqCst), 0, "{}", gw.stderr());
    assert_eq!(get(port, "/h/x").await.header("x-wasm-resp"), Some("swapd"));
    assert!(
        gw.stderr().contains("gateway.wasm.plugins[0].file"),
        "{}",
        gw.stderr()
    );
}

/// One process: a Go FFI runtime and a Lua handler under load while a filter traps again
/// and again (wasmtime's signal handlers next to Go's): no crash, every Go and Lua request
/// answered.
#[tokio::test(flavor = "multi_thread")]
async fn trapping_filter_next_to_go_and_lua_under_load() {
    let u = Upstream::start("u").await;
    let go = libs::go("echo");
    let gw = Gateway::start(&format!(
        "{}routes:\n  - {{id: t, uri: /t, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{trap: {{conf: x}}}}}}\n  - {{id: go, uri: /go/*, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{ffi: {{lib: \"{go}\", cfg: action}}}}}}\n  - {{id: lua, uri: /lua, upstream: {{nodes: {{\"{u}\": 1}}}}, plugins: {{lua: {{access: \"ngx.req.set_header('x-lua', tostring(#ngx.var.uri))\"}}}}}}\n",
        gateway_section(
            2,
            "",
            &[("trap", libs::wat("trap").display().to_string(), 1)]
        ),
        u = u.node(),
        go = go.display(),
    ));
    let port = gw.port;
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(tokio::spawn(async move {
            let mut bad = 0;
            for _ in 0..150 {
                let r = match i % 3 {
                    // `unreachable` (SIGILL) and an out-of-bounds load (SIGSEGV), both caught
                    // by wasmtime's handlers next to Go's
                    0 if i % 2 == 0 => get_h(port, "/t", &[("x-trap", "1")]).await,
                    0 => get_h(port, "/t", &[("x-oob", "1")]).await,
                    1 => get(port, "/go/x").await,
                    _ => get(port, "/lua").await,
                };
                let want = if i % 3 == 0 { 500 } else { 200 };
                if r.status != want {
                    bad += 1;
                }
            }
            bad
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 0, "{}", gw.stderr());
    }
    assert_eq!(get(port, "/t").await.status, 200, "the filter serves again");
    assert_eq!(
        get(port, "/go/x").await.seen_header("x-go-echo").as_deref(),
        Some("/go/x")
    );
}

/// A filter's callouts to an `https` upstream: TLS verified against the configured CA, the
/// callout's `:authority` as SNI (the as_filter sends `callout`).
#[tokio::test(flavor = "multi_thread")]
async fn callouts_reach_https_upstreams() {
    use crate::tls::{Pki, TlsUpstream};
    let u = Upstream::start("u").await;
    let pki = Pki::new("callout CA");
    let svc = TlsUpstream::start(&pki.issue(&["callout"]), None).await;
    let dir = tempdir::Dir::new();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let filter = libs::wasm("as_filter").display().to_string();
    let gw = Gateway::start(&format!(
        "{}upstreams:\n  - {{id: u, nodes: {{\"{u}\": 1}}}}\n  - {{id: tls_svc, scheme: https, nodes: {{\"127.0.0.1:{p}\": 1}}}}\nroutes:\n  - {{id: two, uri: /two/*, upstream_id: u, plugins: {{as_filter: {{conf: \"mode=two;upstream=tls_svc\"}}}}}}\n",
        gateway_section(
            1,
            &format!("  ssl: {{ssl_trusted_certificate: \"{}\"}}\n", ca.display()),
            &[("as_filter", filter, 1000)]
        ),
        u = u.node(),
        p = svc.port,
    ));
    let r = get(gw.port, "/two/x").await;
    assert_eq!(r.status, 200, "{}", gw.stderr());
    let a = r.seen_header("x-call-a").unwrap_or_default();
    assert!(a.contains("\"sni\":\"callout\""), "{a}");
}
