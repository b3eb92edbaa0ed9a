//! An upstream that answers as APISIX's test server does (`t/lib/server.lua` on ports 1980,
//! 1981, 1982): the path names the handler (`/hello` → `hello`, `/a/b.c-d` → `a_b_c_d`), a
//! `resp-X` request header becomes response header `X`, and `$uri` is the path as nginx
//! normalises it. One instance per logical port, each on an ephemeral loopback port.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A running test server.
pub struct TestServer {
    /// Its real address.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Starts the server that plays port `logical` (1980, 1981, ...).
    pub async fn start(logical: u16) -> TestServer {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = service_fn(move |req| async move {
                        Ok::<_, hyper::Error>(answer(logical, req).await)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        TestServer { addr, task }
    }
}

/// nginx's `$uri` of the target (decoded, normalised).
fn nginx_uri(target: &str) -> String {
    let path = target.split('?').next().unwrap_or("/");
    polygate_core::path::normalize(path, true)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| path.to_owned())
}

fn args(target: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some((_, q)) = target.split_once('?') {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.entry(polygate_core::ctx::decode_component(k).into_owned())
                .or_default()
                .push(polygate_core::ctx::decode_component(v).into_owned());
        }
    }
    out
}

/// Request headers as `ngx.req.get_headers()` lists them: lower-case names, sorted, repeated
/// values joined as Lua's `tostring` of a table would not be (the tests never repeat).
fn sorted_headers(req: &http::request::Parts, skip_forwarded: bool) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    for (k, val) in &req.headers {
        let k = k.as_str().to_owned();
        if skip_forwarded
            && matches!(
                k.as_str(),
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-port"
            )
        {
            continue;
        }
        v.push((k, String::from_utf8_lossy(val.as_bytes()).into_owned()));
    }
    v.sort();
    v
}

async fn answer(logical: u16, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let uri = nginx_uri(&target);
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(|h| h.split(':').next().unwrap_or(h).to_ascii_lowercase())
        .unwrap_or_default();
    let mut status = 200u16;
    let mut extra: Vec<(String, String)> = Vec::new();
    let action: String = uri[1..]
        .chars()
        .map(|c| {
            if matches!(c, '/' | '.' | '-' | '\\') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let text = match action.as_str() {
        "hello" => "hello world\n".to_owned(),
        "hello1" => "hello1 world\n".to_owned(),
        "opentracing" => "opentracing\n".to_owned(),
        "api_breaker" => {
            status = args(&target)
                .into_iter()
                .find(|(k, _)| k == "code")
                .and_then(|(_, v)| v.last().and_then(|c| c.parse().ok()))
                .unwrap_or(200);
            "ok\n".to_owned()
        }
        "hello_chunked" => "hello world\n".to_owned(),
        "course_foo" => "course foo\n".to_owned(),
        "server_port" | "server_port_route2" | "server_port_hello" | "server_port_aa" => {
            logical.to_string()
        }
        "status" => "ok\n".to_owned(),
        "with_header" => "hello\nworld\n!\n".to_owned(),
        "plugin_proxy_rewrite" => {
            format!("uri: {uri}\nhost: {host}\nscheme: http\n")
        }
        "plugin_proxy_rewrite_args" => {
            let mut s = format!("uri: {uri}\n");
            for (k, v) in args(&target) {
                s.push_str(&format!("{k}: {}\n", v.join(",")));
            }
            s
        }
        "uri" | "uri_plugin_proxy_rewrite" | "uri_plugin_proxy_rewrite_args" | "old_uri" => {
            let mut s = format!("uri: {uri}\n");
            for (k, v) in sorted_headers(&parts, action != "old_uri") {
                s.push_str(&format!("{k}: {v}\n"));
            }
            s
        }
        "print_uri_detailed" => {
            format!("ngx.var.uri: {uri}\nngx.var.request_uri: {target}\n")
        }
        "print_request_received" => {
            let mut s = format!("request_uri: {target}\n");
            for (k, v) in sorted_headers(&parts, false) {
                s.push_str(&format!("{k}: {v}\n"));
            }
            s
        }
        "headers" => {
            for (k, v) in args(&target) {
                extra.push((k, v.last().cloned().unwrap_or_default()));
            }
            "/headers\n".to_owned()
        }
        "echo" => {
            for (k, v) in sorted_headers(&parts, false) {
                if k != "content-length" {
                    extra.push((k, v));
                }
            }
            String::from_utf8_lossy(&body).into_owned()
        }
        "specific_status" => match parts
            .headers
            .get("x-test-upstream-status")
            .and_then(|v| v.to_str().ok())
        {
            Some(s) => {
                status = s.parse().unwrap_or(200);
                format!("upstream status: {s}\n")
            }
            None => String::new(),
        },
        a if a.starts_with("print_uri_") => format!("{uri}\n"),
        "server_error" => {
            status = 500;
            "<html><head><title>500 Internal Server Error</title></head></html>\n".to_owned()
        }
        _ => {
            status = 404;
            "<html><head><title>404 Not Found</title></head></html>\n".to_owned()
        }
    };
    let mut b = Response::builder().status(status);
    for (k, v) in &parts.headers {
        if let Some(name) = k.as_str().strip_prefix("resp-") {
            b = b.header(name, v.clone());
        }
    }
    for (k, v) in extra {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from(text))).unwrap()
}
