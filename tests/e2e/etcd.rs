//! polygate processes sharing one etcd (Debian's etcd-server, loopback): writes through one
//! process's Admin API are served by both; etcd down keeps the last good configuration
//! serving; changes made while a process could not see etcd arrive when it can; a compacted
//! watch resyncs; a process started while etcd is down serves once it comes up. Data written
//! in APISIX's layout (`/apisix/routes/<id>`, JSON values, as `apisix/core/etcd.lua` writes
//! it) is served unchanged.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

fn gateway_on(etcd: &Etcd) -> Gateway {
    Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  config_provider: etcd\n  etcd: {{host: [\"{}\"], timeout: 2}}\n  admin:\n    addr: \"127.0.0.1:0\"\n    admin_key: [{{name: admin, key: {ADMIN_KEY}}}]\n#END\n",
        etcd.url()
    ))
}

fn route(uri: &str, node: &str) -> String {
    json!({"uri": uri, "upstream": {"nodes": {node: 1}, "type": "roundrobin"}}).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_one_etcd() {
    let mut etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let g1 = gateway_on(&etcd);
    let g2 = gateway_on(&etcd);
    let a = g1.admin_port();

    // created through one Admin API, served by both within 1 s
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        &route("/one", &up.node()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    for g in [&g1, &g2] {
        let took = until(Duration::from_secs(1), async || {
            get(g.port, "/one").await.status == 200
        })
        .await;
        assert!(took.is_some(), "not served within 1 s:\n{}", g.stderr());
    }

    // etcd down for a while: both keep serving the last good configuration
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for g in [&g1, &g2] {
        assert_eq!(get(g.port, "/one").await.status, 200, "{}", g.stderr());
    }
    // readiness shows etcd's state; the Admin API answers 503 for writes
    let ready = get(a, "/status/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(
        ready.json()["etcd"]["connected"],
        json!(false),
        "{}",
        ready.body
    );
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/2",
        &route("/two", &up.node()),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);

    // back: a change made with etcd's own API right after it returns is picked up
    etcd.restart();
    let c = etcd.client();
    c.put(
        "/apisix/routes/2",
        route("/two", &up.node()).as_bytes(),
        None,
    )
    .await
    .unwrap();
    for g in [&g1, &g2] {
        let took = until(Duration::from_secs(10), async || {
            get(g.port, "/two").await.status == 200
        })
        .await;
        assert!(
            took.is_some(),
            "change after etcd returned not served:\n{}",
            g.stderr()
        );
        assert_eq!(get(g.port, "/one").await.status, 200);
    }
    assert!(
        until(Duration::from_secs(5), async || get(a, "/status/ready")
            .await
            .json()["etcd"]["connected"]
            == json!(true))
        .await
        .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compacted_watch_resyncs_without_losing_anything() {
    let etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let g = gateway_on(&etcd);
    let c = etcd.client();
    c.put("/apisix/routes/a", route("/a", &up.node()).as_bytes(), None)
        .await
        .unwrap();
    assert!(
        until(Duration::from_secs(3), async || get(g.port, "/a")
            .await
            .status
            == 200)
        .await
        .is_some()
    );
    // stop the gateway from seeing changes for a moment is not possible from outside; instead
    // compact right after a burst of writes: the watch resumes from a compacted revision or
    // keeps up, and in both cases every change ends up served
    for i in 0..50 {
        c.put(
            &format!("/apisix/routes/b{i}"),
            route(&format!("/b{i}"), &up.node()).as_bytes(),
            None,
        )
        .await
        .unwrap();
    }
    let (rev, _) = c
        .put("/apisix/routes/c", route("/c", &up.node()).as_bytes(), None)
        .await
        .unwrap();
    c.compact(rev).await.unwrap();
    c.delete("/apisix/routes/a").await.unwrap();
    let ok = until(Duration::from_secs(5), async || {
        get(g.port, "/c").await.status == 200
            && get(g.port, "/b49").await.status == 200
            && get(g.port, "/a").await.status == 404
    })
    .await;
    assert!(ok.is_some(), "{}", g.stderr());
    // what the source sees when it resumes from a compacted revision (then it reads
    // everything again)
    let mut w = c.watch("/apisix/", 2).await.unwrap();
    let first = w.next().await.unwrap();
    let first = match first {
        Some(polygate_etcd::WatchMessage::Events { events, .. }) if events.is_empty() => {
            w.next().await.unwrap()
        }
        other => other,
    };
    assert!(
        matches!(first, Some(polygate_etcd::WatchMessage::Compacted(r)) if r == rev),
        "{first:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_started_while_etcd_is_down_serves_once_it_is_up() {
    let mut etcd = Etcd::start();
    let up = Upstream::start("u").await;
    etcd.client()
        .put(
            "/apisix/routes/1",
            route("/early", &up.node()).as_bytes(),
            None,
        )
        .await
        .unwrap();
    etcd.stop();
    let g = gateway_on(&etcd);
    // not ready, but up: it answers 404 for everything meanwhile
    let a = g.admin_port();
    let r = get(a, "/status/ready").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(get(g.port, "/early").await.status, 404);
    etcd.restart();
    let took = until(Duration::from_secs(10), async || {
        get(g.port, "/early").await.status == 200
    })
    .await;
    assert!(took.is_some(), "{}", g.stderr());
    assert_eq!(get(a, "/status/ready").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn apisix_layout_in_etcd_is_served_and_unknown_kinds_are_skipped() {
    let etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let c = etcd.client();
    // what APISIX's Admin API writes (core/etcd.lua): JSON values under /apisix/<kind>/<id>,
    // plus keys polygate does not serve
    c.put("/apisix/upstreams/1", json!({"id": "1", "nodes": {up.node(): 1}, "type": "roundrobin", "create_time": 1, "update_time": 1}).to_string().as_bytes(), None).await.unwrap();
    c.put(
        "/apisix/services/1",
        json!({"id": "1", "upstream_id": "1"})
            .to_string()
            .as_bytes(),
        None,
    )
    .await
    .unwrap();
    c.put("/apisix/routes/1", json!({"id": "1", "uri": "/svc", "service_id": "1", "plugins": {"proxy-rewrite": {"uri": "/rewritten"}}}).to_string().as_bytes(), None).await.unwrap();
    c.put("/apisix/routes/bad", b"{\"uri\": 7}", None)
        .await
        .unwrap();
    c.put("/apisix/routes/notjson", b"init_dir", None)
        .await
        .unwrap();
    c.put(
        "/apisix/protos/1",
        b"{\"content\":\"syntax = \\\"proto3\\\";\"}",
        None,
    )
    .await
    .unwrap();
    c.put("/apisix/gen_id", b"1", None).await.unwrap();
    let g = gateway_on(&etcd);
    assert!(
        until(Duration::from_secs(5), async || get(g.port, "/svc")
            .await
            .status
            == 200)
        .await
        .is_some(),
        "{}",
        g.stderr()
    );
    let r = get(g.port, "/svc").await;
    assert_eq!(r.json()["uri"], json!("/rewritten"));
    // the invalid route is skipped and named by its etcd key
    let err = g.stderr();
    assert!(err.contains("/apisix/routes/bad"), "{err}");
    assert!(err.contains("protos"), "{err}");
    // and polygate's Admin API shows what APISIX wrote
    let l = admin(g.admin_port(), "GET", "/apisix/admin/routes/1", "").await;
    assert_eq!(l.json()["value"]["service_id"], json!("1"));
}

/// APISIX's data encryption (`t/node/data_encrypt.t` TEST 1: "bar" with the keyring
/// `[edd1c9f0985e76a2]` is stored as `77+NmbYqNfN+oLm0aX5akg==`; APISIX's default keyring holds
/// that key second): a key-auth key APISIX stored encrypted authenticates through polygate, and
/// one written through polygate's Admin API is stored encrypted and read back decrypted.
#[tokio::test(flavor = "multi_thread")]
async fn encrypted_fields_are_read_and_written_as_apisix_does() {
    let etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let c = etcd.client();
    c.put(
        "/apisix/consumers/foo",
        json!({"username": "foo", "plugins": {"key-auth": {"key": "77+NmbYqNfN+oLm0aX5akg=="}}})
            .to_string()
            .as_bytes(),
        None,
    )
    .await
    .unwrap();
    c.put(
        "/apisix/routes/1",
        json!({"uri": "/auth", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}, "type": "roundrobin"}})
            .to_string()
            .as_bytes(),
        None,
    )
    .await
    .unwrap();
    let g = gateway_on(&etcd);
    let ok = until(Duration::from_secs(5), async || {
        get_h(g.port, "/auth", &[("apikey", "bar")]).await.status == 200
    })
    .await;
    assert!(ok.is_some(), "{}", g.stderr());
    let r = get_h(g.port, "/auth", &[("apikey", "77+NmbYqNfN+oLm0aX5akg==")]).await;
    assert_eq!(r.status, 401, "the ciphertext itself is not the key");

    let a = g.admin_port();
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/consumers",
        r#"{"username":"jack","plugins":{"key-auth":{"key":"auth-one"}}}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let (kv, _) = c.get("/apisix/consumers/jack").await.unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&kv.unwrap().value).unwrap();
    let stored_key = stored["plugins"]["key-auth"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(stored_key, "auth-one");
    let g2 = admin(a, "GET", "/apisix/admin/consumers/jack", "").await;
    assert_eq!(
        g2.json()["value"]["plugins"]["key-auth"]["key"],
        json!("auth-one")
    );
    let ok = until(Duration::from_secs(5), async || {
        get_h(g.port, "/auth", &[("apikey", "auth-one")])
            .await
            .status
            == 200
    })
    .await;
    assert!(ok.is_some(), "{}", g.stderr());
}
