//! WebSocket through the real binary: `enable_websocket` on a route or its service, the
//! upgrade proxied with both directions streamed over a connection held 30 s, the access
//! phase (key-auth) applied before the upgrade, the idle timeout, and `wss` through a TLS
//! listener.
//!
//! Sources: APISIX `apisix/schema_def.lua` (`enable_websocket` on routes and services); RFC
//! 6455 section 4 (the opening handshake).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

/// A WebSocket server: echoes text frames as `echo:<text>`, and on `tick` sends `tick <n>`
/// on its own once a second.
struct WsUpstream {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsUpstream {
    async fn start() -> WsUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let (mut tx, mut rx) = ws.split();
                    let mut ticks = 0u32;
                    let mut ticking = false;
                    let mut timer = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            m = rx.next() => match m {
                                Some(Ok(Message::Text(t))) => {
                                    if t.as_str() == "tick" {
                                        ticking = true;
                                    }
                                    if tx.send(Message::text(format!("echo:{t}"))).await.is_err() {
                                        return;
                                    }
                                }
                                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                                _ => {}
                            },
                            _ = timer.tick(), if ticking => {
                                ticks += 1;
                                if tx.send(Message::text(format!("tick {ticks}"))).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        WsUpstream { port, task }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_held_30s_with_messages_both_ways() {
    let up = WsUpstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
consumers:
  - username: jack
    plugins:
      key-auth: {{key: jack-key}}
services:
  - id: s
    enable_websocket: true
    upstream: {{nodes: [{{host: "127.0.0.1", port: {p}, weight: 1}}]}}
routes:
  - id: ws
    uri: /ws
    enable_websocket: true
    upstream: {{nodes: [{{host: "127.0.0.1", port: {p}, weight: 1}}]}}
  - id: via-service
    uri: /svc
    service_id: s
  - id: off
    uri: /off
    upstream: {{nodes: [{{host: "127.0.0.1", port: {p}, weight: 1}}]}}
  - id: auth
    uri: /auth
    enable_websocket: true
    plugins:
      key-auth: {{}}
    upstream: {{nodes: [{{host: "127.0.0.1", port: {p}, weight: 1}}]}}
"#,
        p = up.port
    ));
    let url = |path: &str| format!("ws://127.0.0.1:{}{path}", gw.port);

    // without enable_websocket the upgrade headers stop at the gateway: the upstream sees a
    // plain GET and refuses it
    assert!(tokio_tungstenite::connect_async(url("/off")).await.is_err());
    // the access phase runs before the upgrade
    match tokio_tungstenite::connect_async(url("/auth")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    let mut req = url("/auth").into_client_request().unwrap();
    req.headers_mut()
        .insert("apikey", "jack-key".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("echo:hello")
    );
    ws.close(None).await.unwrap();

    // enable_websocket on the service
    let (mut ws, _) = tokio_tungstenite::connect_async(url("/svc")).await.unwrap();
    ws.send(Message::text("s")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo:s"));
    ws.close(None).await.unwrap();

    // one connection held 30 s: the client writes every 500 ms, the upstream every second
    let (mut ws, _) = tokio_tungstenite::connect_async(url("/ws")).await.unwrap();
    ws.send(Message::text("tick")).await.unwrap();
    let start = Instant::now();
    let (mut sent, mut echoes, mut ticks) = (0u32, 0u32, 0u32);
    let mut next_send = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if Instant::now() >= next_send {
            sent += 1;
            ws.send(Message::text(format!("m{sent}"))).await.unwrap();
            next_send += Duration::from_millis(500);
        }
        let wait = next_send.saturating_duration_since(Instant::now());
        if let Ok(m) = tokio::time::timeout(wait, ws.next()).await {
            let m = m.expect("connection closed").unwrap();
            let t = m.into_text().unwrap();
            if t.starts_with("echo:m") {
                echoes += 1;
            } else if t.starts_with("tick ") {
                ticks += 1;
            }
        }
    }
    ws.close(None).await.unwrap();
    assert!(sent >= 55, "sent {sent}");
    assert!(echoes + 2 >= sent, "{echoes} echoes for {sent} messages");
    assert!(ticks >= 25, "{ticks} upstream-initiated messages in 30 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_idle_timeout_closes_the_tunnel() {
    let up = WsUpstream::start().await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: ws
    uri: /ws
    enable_websocket: true
    timeout: {{connect: 1, send: 1, read: 1}}
    upstream: {{nodes: [{{host: "127.0.0.1", port: {p}, weight: 1}}]}}
"#,
        p = up.port
    ));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
        .await
        .unwrap();
    ws.send(Message::text("a")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("echo:a"));
    // nothing for longer than the read timeout: the gateway closes both sides
    let t0 = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(end.is_ok(), "the idle tunnel stayed open");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(gw.stderr().contains("idle"), "{}", gw.stderr());
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_tls() {
    use crate::tls::{Pki, client_config, connect_with, pem_block};
    let up = WsUpstream::start().await;
    let pki = Pki::new("ws CA");
    let leaf = pki.issue(&["ws.test"]);
    let text = format!(
        "gateway:\n  listeners:\n    - {{addr: \"127.0.0.1:0\"}}\n    - {{addr: \"127.0.0.1:0\", tls: true}}\n  worker_threads: 1\nroutes:\n  - id: ws\n    uri: /ws\n    enable_websocket: true\n    upstream: {{nodes: [{{host: \"127.0.0.1\", port: {}, weight: 1}}]}}\nssls:\n  - id: \"1\"\n    sni: ws.test\n    cert: {}    key: {}\n#END\n",
        up.port,
        pem_block(&leaf.cert, 6),
        pem_block(&leaf.key, 6)
    );
    let gw = Gateway::start_text(&text);
    let port = gw.ports()[1];
    let s = connect_with(port, Some("ws.test"), client_config(&[b"http/1.1"], None))
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://ws.test/ws", s)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("secure")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("echo:secure")
    );
    ws.close(None).await.unwrap();
}
