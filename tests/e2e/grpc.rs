//! gRPC through the real binary to a real gRPC server (tonic): unary, server-streaming and
//! bidirectional calls over `scheme: grpc` (h2c) and `grpcs` (TLS) upstreams, statuses and
//! messages carried in trailers, `grpc-timeout` enforced by the gateway, and gRPC-shaped
//! errors when the gateway itself fails the call.
//!
//! Sources: APISIX `apisix/schema_def.lua` (`scheme: grpc`/`grpcs` upstreams); gRPC's
//! `PROTOCOL-HTTP2.md` (trailers-only responses, `grpc-timeout` units) and its HTTP-to-gRPC
//! status mapping (`http-grpc-status-mapping.md`).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::support::*;

/// Messages are raw bytes (the proxy never looks inside them).
#[derive(Clone, Copy, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

type Msgs = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;
type Fut<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

fn text(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `Unary` echoes; `Fail` answers NOT_FOUND with a message.
struct Unary(&'static str);
impl tonic::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = Fut<Bytes>;
    fn call(&mut self, req: Request<Bytes>) -> Fut<Bytes> {
        let which = self.0;
        Box::pin(async move {
            let m = text(req.get_ref());
            match which {
                "headers" => {
                    let md = req.metadata();
                    let get = |k: &str| {
                        md.get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let text = [
                        "x-forwarded-for",
                        "x-real-ip",
                        "x-forwarded-host",
                        "x-forwarded-proto",
                        "forwarded",
                    ]
                    .map(|k| format!("{k}={}", get(k)))
                    .join(";");
                    Ok(Response::new(Bytes::from(text)))
                }
                "fail" => Err(Status::new(Code::NotFound, format!("no such thing: {m}"))),
                _ => {
                    let mut r = Response::new(Bytes::from(format!("echo:{m}")));
                    r.metadata_mut()
                        .insert("x-served-by", "tonic".parse().unwrap());
                    Ok(r)
                }
            }
        })
    }
}

/// `Count` sends `n` messages; `Stall` sends one and then nothing for 10 s.
struct ServerStream(&'static str);
impl tonic::server::ServerStreamingService<Bytes> for ServerStream {
    type Response = Bytes;
    type ResponseStream = Msgs;
    type Future = Fut<Msgs>;
    fn call(&mut self, req: Request<Bytes>) -> Fut<Msgs> {
        let which = self.0;
        Box::pin(async move {
            let n: u32 = text(req.get_ref()).parse().unwrap_or(3);
            let s: Msgs = if which == "stall" {
                Box::pin(futures_util::stream::unfold(0u32, |i| async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    Some((Ok(Bytes::from(format!("part {i}"))), i + 1))
                }))
            } else {
                Box::pin(futures_util::stream::iter(
                    (0..n).map(|i| Ok(Bytes::from(format!("item {i}")))),
                ))
            };
            Ok(Response::new(s))
        })
    }
}

/// `Chat` answers each message as it arrives.
struct Chat;
impl tonic::server::StreamingService<Bytes> for Chat {
    type Response = Bytes;
    type ResponseStream = Msgs;
    type Future = Fut<Msgs>;
    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Fut<Msgs> {
        Box::pin(async move {
            let s: Msgs = Box::pin(
                req.into_inner()
                    .map(|m| m.map(|b| Bytes::from(format!("re:{}", text(&b))))),
            );
            Ok(Response::new(s))
        })
    }
}

#[derive(Clone)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut g = tonic::server::Grpc::new(Raw);
            let resp = match req.uri().path() {
                "/test.Echo/Unary" => g.unary(Unary("echo"), req).await,
                "/test.Echo/Fail" => g.unary(Unary("fail"), req).await,
                "/test.Echo/Headers" => g.unary(Unary("headers"), req).await,
                "/test.Echo/Count" => g.server_streaming(ServerStream("count"), req).await,
                "/test.Echo/Stall" => g.server_streaming(ServerStream("stall"), req).await,
                "/test.Echo/Chat" => g.streaming(Chat, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(resp)
        })
    }
}

/// A tonic server on loopback (with `tls`: certificate and key PEM).
async fn grpc_server(tls: Option<(&str, &str)>) -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let mut b = tonic::transport::Server::builder();
    if let Some((cert, key)) = tls {
        b = b
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .unwrap();
    }
    let router = b.add_service(Echo);
    let task = tokio::spawn(async move {
        let _ = router
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
            .await;
    });
    (port, task)
}

async fn client(port: u16) -> tonic::client::Grpc<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(ch)
}

fn path(p: &'static str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_static(p)
}

async fn unary(
    g: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &'static str,
    msg: &str,
) -> Result<Response<Bytes>, Status> {
    g.ready().await.unwrap();
    g.unary(Request::new(Bytes::from(msg.to_owned())), path(method), Raw)
        .await
}

fn h2c_gateway(routes: &str) -> Gateway {
    Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\", http2: true}}]\n  worker_threads: 2\n{routes}\n#END\n"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unary_streaming_and_bidi_through_the_gateway() {
    let (port, _srv) = grpc_server(None).await;
    let gw = h2c_gateway(&format!(
        "routes:\n  - id: g\n    uri: /test.Echo/*\n    upstream:\n      scheme: grpc\n      nodes: [{{host: \"127.0.0.1\", port: {port}, weight: 1}}]\n"
    ));
    let mut g = client(gw.port).await;

    // unary, with the server's metadata
    let r = unary(&mut g, "/test.Echo/Unary", "hi").await.unwrap();
    assert_eq!(r.metadata().get("x-served-by").unwrap(), "tonic");
    assert_eq!(r.into_inner(), Bytes::from("echo:hi"));

    // an error status and its message arrive in the trailers
    let e = unary(&mut g, "/test.Echo/Fail", "x").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.message(), "no such thing: x");

    // forwarding headers follow the HTTP/1.1 rules: a client's forged ones do not pass
    g.ready().await.unwrap();
    let mut req = Request::new(Bytes::from("x"));
    for (k, v) in [
        ("x-forwarded-host", "evil.example"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6"),
    ] {
        req.metadata_mut().insert(k, v.parse().unwrap());
    }
    let r = g
        .unary(req, path("/test.Echo/Headers"), Raw)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        text(&r),
        format!(
            "x-forwarded-for=127.0.0.1;x-real-ip=127.0.0.1;x-forwarded-host=127.0.0.1:{};x-forwarded-proto=http;forwarded=-",
            gw.port
        )
    );

    // server streaming
    g.ready().await.unwrap();
    let mut s = g
        .server_streaming(
            Request::new(Bytes::from("5")),
            path("/test.Echo/Count"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(text(&m));
    }
    assert_eq!(got, ["item 0", "item 1", "item 2", "item 3", "item 4"]);

    // bidirectional: each answer arrives before the next message is sent
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let out = tokio_stream_from(rx);
    g.ready().await.unwrap();
    let mut s = g
        .streaming(Request::new(out), path("/test.Echo/Chat"), Raw)
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        tx.send(Bytes::from(format!("m{i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .expect("answer streamed back")
            .unwrap()
            .unwrap();
        assert_eq!(text(&m), format!("re:m{i}"));
    }
    drop(tx);
    assert!(s.message().await.unwrap().is_none());
    assert!(
        s.trailers().await.unwrap().is_some(),
        "the trailers came through"
    );
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl Stream<Item = Bytes> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_timeout_and_gateway_errors_are_grpc_shaped() {
    let (port, _srv) = grpc_server(None).await;
    let dead = free_port();
    let gw = h2c_gateway(&format!(
        "routes:\n  - id: g\n    uri: /test.Echo/*\n    upstream:\n      scheme: grpc\n      nodes: [{{host: \"127.0.0.1\", port: {port}, weight: 1}}]\n  - id: dead\n    uri: /dead.Svc/*\n    upstream:\n      scheme: grpc\n      nodes: [{{host: \"127.0.0.1\", port: {dead}, weight: 1}}]\n"
    ));
    let mut g = client(gw.port).await;

    // a stream that stalls: the gateway ends the call at its deadline
    g.ready().await.unwrap();
    let mut req = Request::new(Bytes::from("1"));
    req.metadata_mut()
        .insert("grpc-timeout", "500m".parse().unwrap());
    let t0 = Instant::now();
    let mut s = g
        .server_streaming(req, path("/test.Echo/Stall"), Raw)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(text(&s.message().await.unwrap().unwrap()), "part 0");
    let e = s.message().await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // the gateway cannot reach the upstream: UNAVAILABLE with the reason, not an HTML 502
    let e = unary(&mut g, "/dead.Svc/Call", "x").await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("127.0.0.1"), "{e:?}");
    // no route: UNIMPLEMENTED
    let e = unary(&mut g, "/nothing.Here/Call", "x").await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcs_upstream_verified_against_the_configured_ca() {
    use crate::tls::Pki;
    let pki = Pki::new("grpc CA");
    let leaf = pki.issue(&["grpc.test"]);
    let (port, _srv) = grpc_server(Some((&leaf.cert, &leaf.key))).await;
    let dir = tempdir::Dir::new();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\", http2: true}}]\n  worker_threads: 1\n  ssl: {{ssl_trusted_certificate: \"{}\"}}\nroutes:\n  - id: g\n    uri: /test.Echo/*\n    upstream:\n      scheme: grpcs\n      pass_host: rewrite\n      upstream_host: grpc.test\n      nodes: [{{host: \"127.0.0.1\", port: {port}, weight: 1}}]\n#END\n",
        ca.display()
    ));
    let mut g = client(gw.port).await;
    for i in 0..3 {
        let r = unary(&mut g, "/test.Echo/Unary", &format!("s{i}"))
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{}", gw.stderr()));
        assert_eq!(r.into_inner(), Bytes::from(format!("echo:s{i}")));
    }
}
