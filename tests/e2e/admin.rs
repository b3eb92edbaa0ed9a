//! The Admin API against a real etcd (Debian's etcd-server on loopback ports) and the real
//! binary. Cases come from APISIX's own tests and code, named per case: `t/admin/routes.t`,
//! `t/admin/filter.t`, `t/admin/consumers.t`, `t/admin/consumer-group.t`,
//! `t/admin/plugin-configs.t`, `t/admin/upstream.t`, and the behaviour of
//! `apisix/admin/{init,resource,utils,v3_adapter,standalone,config_validate}.lua`.
//! Bodies are compared as APISIX's `t/lib/test_admin.lua` does: the expected JSON must be
//! contained in the answer.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

/// Whether every field of `want` is in `got` with the same value (APISIX's `com_tab`).
fn contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| g.get(k).is_some_and(|gv| contains(gv, v))),
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        _ => got == want,
    }
}

#[track_caller]
fn assert_contains(r: &Resp, status: u16, want: Value) {
    assert_eq!(r.status, status, "{}", r.body);
    let got = r.json();
    assert!(contains(&got, &want), "got {got}\nwant {want}");
}

/// A gateway reading `etcd`, its Admin API on a port of its own.
fn gateway_on(etcd: &Etcd, extra: &str) -> Gateway {
    Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  config_provider: etcd\n  etcd: {{host: [\"{}\"], timeout: 3}}\n  admin:\n    addr: \"127.0.0.1:0\"\n    admin_key:\n      - {{name: admin, key: {ADMIN_KEY}, role: admin}}\n      - {{name: viewer, key: {VIEWER_KEY}, role: viewer}}\n{extra}#END\n",
        etcd.url()
    ))
}

async fn eventually(timeout: Duration, f: impl AsyncFnMut() -> bool) -> bool {
    until(timeout, f).await.is_some()
}

fn route_body(uri: &str, node: &str) -> String {
    json!({"uri": uri, "upstream": {"nodes": {node: 1}, "type": "roundrobin"}}).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_put_get_patch_delete_with_apisix_envelopes() {
    let etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();

    // t/admin/routes.t TEST 1: set route(id: 1) → 201, {"key","value"}
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"methods":["GET"],"upstream":{"nodes":{"127.0.0.1:8080":1},"type":"roundrobin"},"desc":"new route","uri":"/index.html"}"#,
    )
    .await;
    assert_contains(
        &r,
        201,
        json!({"key": "/apisix/routes/1", "value": {"methods": ["GET"], "uri": "/index.html", "desc": "new route",
               "upstream": {"nodes": {"127.0.0.1:8080": 1}, "type": "roundrobin"}}}),
    );
    let v = r.json();
    assert!(v["value"]["create_time"].is_i64() && v["value"]["update_time"].is_i64());
    assert_eq!(r.header("x-api-version"), Some("v3"));
    // the same PUT again replaces: 200, create_time kept (apisix/admin/utils.lua)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r2 = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        &route_body("/index.html", "127.0.0.1:8080"),
    )
    .await;
    assert_eq!(r2.status, 200, "{}", r2.body);
    assert_eq!(r2.json()["value"]["create_time"], v["value"]["create_time"]);

    // TEST 2: get route(id: 1) → key, value, createdIndex, modifiedIndex
    let g = admin(a, "GET", "/apisix/admin/routes/1", "").await;
    assert_contains(
        &g,
        200,
        json!({"key": "/apisix/routes/1", "value": {"uri": "/index.html"}}),
    );
    let gv = g.json();
    assert!(gv["createdIndex"].as_i64().unwrap() < gv["modifiedIndex"].as_i64().unwrap());

    // PATCH merges, null deletes a field (apisix/admin/resource.lua `patch`)
    let p = admin(
        a,
        "PATCH",
        "/apisix/admin/routes/1",
        &json!({"desc": "patched", "methods": null, "upstream": {"nodes": {up.node(): 1, "127.0.0.1:8080": null}}}).to_string(),
    )
    .await;
    assert_contains(
        &p,
        200,
        json!({"key": "/apisix/routes/1", "value": {"desc": "patched"}}),
    );
    assert!(p.json()["value"].get("methods").is_none(), "{}", p.body);
    assert_eq!(
        p.json()["value"]["upstream"]["nodes"],
        json!({up.node(): 1})
    );
    // PATCH of a sub path replaces that field
    let p = admin(a, "PATCH", "/apisix/admin/routes/1/uri", "\"/hello\"").await;
    assert_contains(
        &p,
        200,
        json!({"value": {"uri": "/hello", "desc": "patched"}}),
    );
    // the data plane serves what the Admin API wrote
    assert!(
        eventually(Duration::from_secs(3), async || get(gw.port, "/hello")
            .await
            .status
            == 200)
        .await,
        "{}",
        gw.stderr()
    );
    assert_eq!(get(gw.port, "/hello").await.upstream(), "u");
    // PATCH without a body
    let r = admin(a, "PATCH", "/apisix/admin/routes/1", "").await;
    assert_contains(&r, 400, json!({"error_msg": "missing new configuration"}));

    // TEST 3: delete route(id: 1); TEST 4: delete route(id: not_found) → 404
    let d = admin(a, "DELETE", "/apisix/admin/routes/1", "").await;
    assert_contains(&d, 200, json!({"deleted": "1", "key": "/apisix/routes/1"}));
    let d = admin(a, "DELETE", "/apisix/admin/routes/not_found", "").await;
    assert_eq!(
        (d.status, d.json()),
        (404, json!({"message": "Key not found"}))
    );
    let g = admin(a, "GET", "/apisix/admin/routes/1", "").await;
    assert_eq!(
        (g.status, g.json()),
        (404, json!({"message": "Key not found"}))
    );
    assert!(
        eventually(Duration::from_secs(3), async || get(gw.port, "/hello")
            .await
            .status
            == 404)
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_errors_are_apisix_strings() {
    let etcd = Etcd::start();
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    let ok = route_body("/x", "127.0.0.1:8080");
    // t/admin/routes.t TEST 12: invalid id → wrong route id
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"id":3,"uri":"/x","upstream":{"nodes":{"127.0.0.1:8080":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_contains(&r, 400, json!({"error_msg": "wrong route id"}));
    // TEST 16: not exist upstream_id
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","upstream_id":"99999999"}"#,
    )
    .await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "failed to fetch upstream info by upstream id [99999999], response code: 404"}),
    );
    // TEST 17: POST with an id → wrong route id, do not need it
    let r = admin(
        a,
        "POST",
        "/apisix/admin/routes",
        r#"{"id":1,"uri":"/x","upstream":{"nodes":{"127.0.0.1:8080":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "wrong route id, do not need it"}),
    );
    // resource.lua check_conf: PUT without an id; no body; server-managed fields
    let r = admin(a, "PUT", "/apisix/admin/routes", &ok).await;
    assert_contains(&r, 400, json!({"error_msg": "missing route id"}));
    let r = admin(a, "PUT", "/apisix/admin/routes/1", "").await;
    assert_contains(&r, 400, json!({"error_msg": "missing configurations"}));
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","create_time":1,"upstream":{"nodes":{"a:1":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "the property is forbidden:  create_time"}),
    );
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","upstream":{"update_time":1,"nodes":{"a:1":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "the property is forbidden:  upstream.update_time"}),
    );
    // t/admin/routes3.t: host and hosts together
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","host":"a.com","hosts":["b.com"],"upstream":{"nodes":{"a:1":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "only one of host or hosts is allowed"}),
    );
    // schema errors name the key path inside the resource
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","upstream":{"nodes":{"a:1":1},"type":"roundrobin","timeout":{"connect":"x"}}}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let msg = r.json()["error_msg"].as_str().unwrap().to_owned();
    assert!(
        msg.starts_with("invalid configuration: upstream.timeout"),
        "{msg}"
    );
    // a plugin configuration is checked by the plugin
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","plugins":{"proxy-rewrite":{"uri":7}},"upstream":{"nodes":{"a:1":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("plugins.proxy-rewrite"), "{}", r.body);
    // invalid JSON (init.lua): invalid request body, with req_body
    let r = admin(a, "PUT", "/apisix/admin/routes/1", "{bad").await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("invalid request body:")
    );
    assert_eq!(r.json()["req_body"], json!("{bad"));
    // unknown kinds; ttl that is not a number
    let r = admin(a, "GET", "/apisix/admin/nothing", "").await;
    assert_contains(
        &r,
        404,
        json!({"error_msg": "Unsupported resource type: nothing"}),
    );
    let r = admin(a, "PUT", "/apisix/admin/routes/1?ttl=abc", &ok).await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "invalid argument ttl: should be a number"}),
    );
    // t/admin/consumers.t: POST is not supported for consumers
    let r = admin(
        a,
        "POST",
        "/apisix/admin/consumers",
        r#"{"username":"jack"}"#,
    )
    .await;
    assert_contains(
        &r,
        405,
        json!({"error_msg": "not supported `POST` method for consumer"}),
    );
    // nothing above was written
    let l = admin(a, "GET", "/apisix/admin/routes", "").await;
    assert_eq!(l.json(), json!({"total": 0, "list": []}));
}

#[tokio::test(flavor = "multi_thread")]
async fn post_generates_apisix_ids_and_ttl_expires() {
    let etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    // core/etcd.lua `push`: the id is the revision of a write to /gen_id, 20 digits
    let r = admin(
        a,
        "POST",
        "/apisix/admin/upstreams",
        &json!({"nodes": {up.node(): 1}, "type": "roundrobin"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["value"]["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 20);
    assert!(id.bytes().all(|b| b.is_ascii_digit()));
    assert_eq!(r.json()["key"], json!(format!("/apisix/upstreams/{id}")));
    // a route through it, created with a ttl of 2 s
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/t?ttl=2",
        &json!({"uri": "/ttl", "upstream_id": id}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        eventually(Duration::from_secs(3), async || get(gw.port, "/ttl")
            .await
            .status
            == 200)
        .await
    );
    // the lease expires: gone from etcd and from the data plane
    assert!(
        eventually(Duration::from_secs(8), async || get(gw.port, "/ttl")
            .await
            .status
            == 404)
        .await,
        "{}",
        gw.stderr()
    );
    let g = admin(a, "GET", "/apisix/admin/routes/t", "").await;
    assert_eq!(g.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_is_refused_while_referenced_unless_forced() {
    let etcd = Etcd::start();
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    let up = r#"{"nodes":{"127.0.0.1:1980":1},"type":"roundrobin"}"#;
    assert_eq!(
        admin(a, "PUT", "/apisix/admin/upstreams/1", up)
            .await
            .status,
        201
    );
    assert_eq!(
        admin(
            a,
            "PUT",
            "/apisix/admin/services/1",
            r#"{"upstream_id":"1"}"#
        )
        .await
        .status,
        201
    );
    assert_eq!(
        admin(
            a,
            "PUT",
            "/apisix/admin/plugin_configs/1",
            r#"{"plugins":{}}"#
        )
        .await
        .status,
        201
    );
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        r#"{"uri":"/x","upstream_id":"1","plugin_config_id":"1"}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    // t/admin/upstream.t: can not delete this upstream, route [1] is still using it now
    let r = admin(a, "DELETE", "/apisix/admin/upstreams/1", "").await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "can not delete this upstream, route [1] is still using it now"}),
    );
    // t/admin/plugin-configs.t
    let r = admin(a, "DELETE", "/apisix/admin/plugin_configs/1", "").await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "can not delete this plugin config, route [1] is still using it now"}),
    );
    // services.lua delete_checker
    assert_eq!(
        admin(
            a,
            "PUT",
            "/apisix/admin/routes/2",
            r#"{"uri":"/y","service_id":"1"}"#
        )
        .await
        .status,
        201
    );
    let r = admin(a, "DELETE", "/apisix/admin/services/1", "").await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "can not delete this service directly, route [2] is still using it now"}),
    );
    // t/admin/consumer-group.t
    assert_eq!(
        admin(
            a,
            "PUT",
            "/apisix/admin/consumer_groups/company_a",
            r#"{"plugins":{}}"#
        )
        .await
        .status,
        201
    );
    assert_eq!(
        admin(
            a,
            "PUT",
            "/apisix/admin/consumers",
            r#"{"username":"foobar","group_id":"company_a"}"#
        )
        .await
        .status,
        201
    );
    let r = admin(a, "DELETE", "/apisix/admin/consumer_groups/company_a", "").await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "can not delete this consumer group, consumer [foobar] is still using it now"}),
    );
    // ?force=true deletes anyway (t/admin/*-force-delete.t)
    let r = admin(a, "DELETE", "/apisix/admin/upstreams/1?force=true", "").await;
    assert_contains(
        &r,
        200,
        json!({"deleted": "1", "key": "/apisix/upstreams/1"}),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lists_paginate_and_filter_as_apisix() {
    let etcd = Etcd::start();
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    // t/admin/filter.t TEST 4: 11 routes, pages of 10
    for i in 1..=11 {
        let r = admin(
            a,
            "PUT",
            &format!("/apisix/admin/routes/{i}"),
            &json!({"uri": format!("/hello{i}"), "name": format!("{i}"), "labels": {format!("{i}"): format!("{i}")},
                    "upstream": {"nodes": {"127.0.0.1:1980": 1}, "type": "roundrobin"}})
            .to_string(),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let page = |p: u32| format!("/apisix/admin/routes/?page={p}&page_size=10");
    let r1 = admin(a, "GET", &page(1), "").await.json();
    assert_eq!(
        (r1["list"].as_array().unwrap().len(), r1["total"].as_u64()),
        (10, Some(11))
    );
    // TEST 3: pages are sorted by createdIndex
    let idx: Vec<i64> = r1["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["createdIndex"].as_i64().unwrap())
        .collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{idx:?}");
    assert_eq!(
        admin(a, "GET", &page(2), "").await.json()["list"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        admin(a, "GET", &page(3), "").await.json()["list"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    // TEST 1: bad page_size
    let r = admin(a, "GET", "/apisix/admin/routes/?page=1&page_size=2", "").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (400, "page_size must be between 10 and 500")
    );
    // TEST 2: a bad page is 1
    let r = admin(a, "GET", "/apisix/admin/routes/?page=-1&page_size=10", "")
        .await
        .json();
    assert_eq!(r["list"].as_array().unwrap().len(), 10);
    // TEST 6: name is a regular expression, label a key
    let r = admin(a, "GET", "/apisix/admin/routes?name=1", "")
        .await
        .json();
    assert_eq!(r["total"], json!(3));
    let r = admin(a, "GET", "/apisix/admin/routes?label=1", "")
        .await
        .json();
    assert_eq!(r["total"], json!(1));
    assert_eq!(r["list"][0]["value"]["id"], json!("1"));
    // TEST 10: uri
    let r = admin(a, "GET", "/apisix/admin/routes?uri=hello1$", "")
        .await
        .json();
    assert_eq!(r["total"], json!(1));
    // filter=upstream_id%3D... (3.13+): supported fields only
    let r = admin(a, "GET", "/apisix/admin/routes?filter=service_id%3D1", "")
        .await
        .json();
    assert_eq!(r["total"], json!(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_roles_and_allowed_addresses() {
    let etcd = Etcd::start();
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    // init.lua check_token: missing, wrong, viewer writing
    let r = request(a, "GET", "/apisix/admin/routes", &[], "").await;
    assert_eq!(
        (r.status, r.json()),
        (
            401,
            json!({"error_msg": "failed to check token", "description": "missing apikey"})
        )
    );
    let r = request(
        a,
        "GET",
        "/apisix/admin/routes",
        &[("x-api-key", "wrong")],
        "",
    )
    .await;
    assert_eq!(r.json()["description"], json!("wrong apikey"));
    let r = request(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        &[("x-api-key", VIEWER_KEY)],
        &route_body("/x", "a:1"),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["description"].clone()),
        (401, json!("invalid method for role viewer"))
    );
    let r = request(
        a,
        "GET",
        "/apisix/admin/routes",
        &[("x-api-key", VIEWER_KEY)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    // the query and cookie forms
    let r = get(a, &format!("/apisix/admin/routes?api_key={ADMIN_KEY}")).await;
    assert_eq!(r.status, 200);
    let r = get_h(
        a,
        "/apisix/admin/routes",
        &[("cookie", &format!("x_api_key={ADMIN_KEY}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    // HEAD /apisix/admin is liveness, without a key
    assert_eq!(
        request(a, "HEAD", "/apisix/admin", &[], "").await.status,
        200
    );
    drop(gw);

    // allow_admin without loopback: refused before any key is looked at
    let gw = gateway_on(&etcd, "    allow_admin: [\"10.0.0.0/8\"]\n");
    let a = gw.admin_port();
    let r = admin(a, "GET", "/apisix/admin/routes", "").await;
    assert_eq!(r.status, 403, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_key_is_stored_0600_and_no_fixed_key_works() {
    let dir = tempdir::Dir::new();
    let key_file = dir.path().join("state/admin_key");
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  admin: {{addr: \"127.0.0.1:0\", key_file: \"{}\"}}\n#END\n",
        key_file.display()
    ));
    let a = gw.admin_port();
    assert!(
        gw.stderr().contains(&key_file.display().to_string()),
        "{}",
        gw.stderr()
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let key = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        !gw.stderr().contains(&key),
        "the key itself must not be logged"
    );
    // APISIX's old default key (CVE-2020-13945) is refused; the generated one works
    let r = request(
        a,
        "GET",
        "/apisix/admin/configs",
        &[("x-api-key", ADMIN_KEY)],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    let r = request(
        a,
        "GET",
        "/apisix/admin/configs",
        &[("x-api-key", &key)],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    drop(gw);
    // a restart reuses the stored key
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  admin: {{addr: \"127.0.0.1:0\", key_file: \"{}\"}}\n#END\n",
        key_file.display()
    ));
    let r = request(
        gw.admin_port(),
        "GET",
        "/apisix/admin/configs",
        &[("x-api-key", &key)],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_ssls_plugin_metadata_and_plugins() {
    let etcd = Etcd::start();
    let up = Upstream::start("u").await;
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    // docs/en/latest/admin-api.md: a consumer with key-auth, a route with key-auth
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/consumers",
        r#"{"username":"jack","plugins":{"key-auth":{"key":"auth-one"}}}"#,
    )
    .await;
    assert_contains(
        &r,
        201,
        json!({"key": "/apisix/consumers/jack", "value": {"username": "jack"}}),
    );
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        &json!({"uri": "/auth", "plugins": {"key-auth": {}}, "upstream": {"nodes": {up.node(): 1}, "type": "roundrobin"}}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        eventually(Duration::from_secs(3), async || get_h(
            gw.port,
            "/auth",
            &[("apikey", "auth-one")]
        )
        .await
        .status
            == 200)
        .await
    );
    assert_eq!(get(gw.port, "/auth").await.status, 401);
    // consumers.lua: the username in the path must be the body's
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/consumers/jack",
        r#"{"username":"rose"}"#,
    )
    .await;
    assert_contains(&r, 400, json!({"error_msg": "wrong username"}));
    // plugins: list by priority, a schema, all
    let l = admin(a, "GET", "/apisix/admin/plugins/list", "")
        .await
        .json();
    let names: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        names.contains(&"key-auth") && names.contains(&"proxy-rewrite"),
        "{names:?}"
    );
    let s = admin(a, "GET", "/apisix/admin/plugins/key-auth", "").await;
    assert_eq!(s.status, 200);
    assert_eq!(s.json()["type"], json!("object"));
    assert_eq!(s.json()["properties"]["header"]["default"], json!("apikey"));
    let c = admin(
        a,
        "GET",
        "/apisix/admin/plugins/key-auth?schema_type=consumer",
        "",
    )
    .await;
    assert_eq!(c.json()["required"], json!(["key"]));
    let all = admin(a, "GET", "/apisix/admin/plugins?all=true", "")
        .await
        .json();
    assert!(all["key-auth"]["priority"].is_i64(), "{all}");
    let r = admin(a, "GET", "/apisix/admin/plugins/nope", "").await;
    assert_contains(
        &r,
        404,
        json!({"error_msg": "plugin not found in subsystem http"}),
    );
    // plugin metadata: keyed by the plugin's name
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/plugin_metadata/key-auth",
        r#"{"x":1}"#,
    )
    .await;
    assert_contains(&r, 201, json!({"key": "/apisix/plugin_metadata/key-auth"}));
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/plugin_metadata/no-such-plugin",
        r#"{"x":1}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    // schema validation without storing
    let r = admin(
        a,
        "POST",
        "/apisix/admin/schema/validate/routes",
        r#"{"uri":"/x","upstream":{"nodes":{"a:1":1},"type":"roundrobin"}}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = admin(
        a,
        "POST",
        "/apisix/admin/schema/validate/routes",
        r#"{"uri":7}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        admin(a, "GET", "/apisix/admin/routes", "").await.json()["total"],
        json!(1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_matches_the_router() {
    let etcd = Etcd::start();
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    let doc = admin(a, "GET", "/apisix/admin/openapi.json", "").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert_eq!(doc["openapi"], json!("3.0.3"));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() > 30, "{}", paths.len());
    // every documented path and method is routed (no "not found" route miss, no 405 the
    // document does not announce)
    for (path, item) in paths {
        for (method, _) in item
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "parameters")
        {
            let concrete = path
                .replace("{id}", "doc-check")
                .replace("{name}", "key-auth")
                .replace("{path}", "desc");
            let m = method.to_uppercase();
            let r = admin(a, &m, &concrete, "").await;
            let route_miss = r.status == 404 && r.body.contains("\"not found\"");
            assert!(
                !route_miss && r.status != 405,
                "{m} {concrete}: {} {}",
                r.status,
                r.body
            );
        }
    }
}

/// API-driven standalone (`apisix/admin/standalone.lua`, 3.18): file mode's `/configs`.
#[tokio::test(flavor = "multi_thread")]
async fn file_mode_configs_put_get_digest_and_versions() {
    let up = Upstream::start("u").await;
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  admin: {{addr: \"127.0.0.1:0\", admin_key: [{{key: {ADMIN_KEY}}}]}}\nroutes:\n  - {{id: f, uri: /file, upstream: {{nodes: {{\"{}\": 1}}}}}}\n#END\n",
        up.node()
    ));
    let a = gw.admin_port();
    assert_eq!(get(gw.port, "/file").await.status, 200);
    // resource paths need etcd
    let r = admin(a, "GET", "/apisix/admin/routes", "").await;
    assert_eq!(r.status, 404);
    // missing digest
    let body = json!({"routes": [{"id": "r1", "uri": "/api", "upstream": {"nodes": {up.node(): 1}, "type": "roundrobin"}}]}).to_string();
    let r = admin(a, "PUT", "/apisix/admin/configs", &body).await;
    assert_contains(&r, 400, json!({"error_msg": "missing digest header"}));
    let put = |digest: &'static str, body: String| async move {
        request(
            a,
            "PUT",
            "/apisix/admin/configs",
            &[
                ("x-api-key", ADMIN_KEY),
                ("x-digest", digest),
                ("content-type", "application/json"),
            ],
            &body,
        )
        .await
    };
    let r = put("d1", body.clone()).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.header("x-digest"), Some("d1"));
    assert!(r.header("x-last-modified").is_some());
    assert_eq!(get(gw.port, "/api").await.status, 200);
    assert_eq!(get(gw.port, "/file").await.status, 404);
    // the same digest: 204, not applied
    let r = put("d1", json!({"routes": []}).to_string()).await;
    assert_eq!(r.status, 204);
    assert_eq!(get(gw.port, "/api").await.status, 200);
    // versions: lower refused; equal keeps the kind as it is
    let r = put(
        "d2",
        json!({"routes_conf_version": 0, "routes": []}).to_string(),
    )
    .await;
    assert_contains(
        &r,
        400,
        json!({"error_msg": "routes_conf_version must be greater than or equal to (1)"}),
    );
    let r = put(
        "d3",
        json!({"routes_conf_version": 1, "routes": []}).to_string(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(get(gw.port, "/api").await.status, 200);
    // an invalid configuration is refused whole and the served one stays
    let r = put("d4", json!({"routes": [{"id": "x", "uri": 7}]}).to_string()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(get(gw.port, "/api").await.status, 200);
    // GET dumps it with versions; HEAD shows the digest
    let g = admin(a, "GET", "/apisix/admin/configs", "").await;
    assert_eq!(g.status, 200);
    let v = g.json();
    assert_eq!(v["routes_conf_version"], json!(1));
    assert_eq!(v["routes"][0]["id"], json!("r1"));
    let h = request(
        a,
        "HEAD",
        "/apisix/admin/configs",
        &[("x-api-key", ADMIN_KEY)],
        "",
    )
    .await;
    assert_eq!(h.header("x-digest"), Some("d3"));
    // YAML in and out
    let yaml = format!(
        "routes:\n  - id: y\n    uri: /yaml\n    upstream: {{nodes: {{\"{}\": 1}}, type: roundrobin}}\n",
        up.node()
    );
    let r = request(
        a,
        "PUT",
        "/apisix/admin/configs",
        &[
            ("x-api-key", ADMIN_KEY),
            ("x-digest", "d5"),
            ("content-type", "application/yaml"),
        ],
        &yaml,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(get(gw.port, "/yaml").await.status, 200);
    let g = request(
        a,
        "GET",
        "/apisix/admin/configs",
        &[("x-api-key", ADMIN_KEY), ("accept", "application/yaml")],
        "",
    )
    .await;
    assert!(g.body.contains("uri: /yaml"), "{}", g.body);
    // configs/validate (config_validate.lua): every error, nothing applied
    let r = admin(
        a,
        "POST",
        "/apisix/admin/configs/validate",
        &json!({"routes": [{"id": "v", "uri": 7}]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json()["error_msg"],
        json!("Configuration validation failed")
    );
    assert_eq!(r.json()["errors"][0]["resource_type"], json!("routes"));
    let r = admin(a, "POST", "/apisix/admin/configs/validate", &body).await;
    assert_eq!((r.status, r.json()), (200, json!({})));
}

/// APISIX's control API views of the served resources (`docs/en/latest/control-api.md`:
/// `/v1/routes`, `/v1/routes/{id}`, `/v1/upstreams/{id}`, `/v1/plugin_metadatas`) on the
/// metrics listener.
#[tokio::test(flavor = "multi_thread")]
async fn control_api_lists_the_served_resources() {
    let m = free_port();
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  metrics: {{addr: \"127.0.0.1:{m}\"}}\n  admin: {{enabled: false}}\nupstreams:\n  - {{id: u1, nodes: {{\"127.0.0.1:1980\": 1}}}}\nroutes:\n  - {{id: \"1\", uri: /hello, upstream_id: u1}}\nplugin_metadata:\n  - {{id: key-auth, x: 1}}\n#END\n"
    ));
    let r = get(m, "/v1/routes").await;
    assert_eq!(r.status, 200, "{} {}", r.body, gw.stderr());
    let v = r.json();
    assert_eq!(v[0]["key"], json!("/apisix/routes/1"));
    assert_eq!(v[0]["value"]["uri"], json!("/hello"));
    assert_eq!(
        get(m, "/v1/routes/1").await.json()["value"]["upstream_id"],
        json!("u1")
    );
    assert_eq!(get(m, "/v1/routes/2").await.status, 404);
    assert_eq!(
        get(m, "/v1/upstreams/u1").await.json()["key"],
        json!("/apisix/upstreams/u1")
    );
    assert_eq!(
        get(m, "/v1/plugin_metadatas").await.json()[0]["id"],
        json!("key-auth")
    );
    assert_eq!(
        get(m, "/v1/plugin_metadata/key-auth").await.json()["x"],
        json!(1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ui_directory_is_served_at_ui() {
    let dir = tempdir::Dir::new();
    let ui = dir.path().join("ui");
    std::fs::create_dir_all(ui.join("assets")).unwrap();
    std::fs::write(ui.join("index.html"), "<html>dashboard</html>").unwrap();
    std::fs::write(ui.join("assets/app.js"), "console.log(1)").unwrap();
    std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
    let gw = Gateway::start_text(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  admin: {{addr: \"127.0.0.1:0\", admin_key: [{{key: {ADMIN_KEY}}}], ui: \"{}\"}}\n#END\n",
        ui.display()
    ));
    let a = gw.admin_port();
    let r = get(a, "/ui/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "<html>dashboard</html>"));
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    let r = get(a, "/ui/assets/app.js").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/javascript")
    );
    // the dashboard's own routes get its index page
    assert_eq!(
        get(a, "/ui/routes/list").await.body,
        "<html>dashboard</html>"
    );
    assert_eq!(get(a, "/ui").await.status, 301);
    // nothing outside the directory
    for p in [
        "/ui/../secret.txt",
        "/ui/%2e%2e/secret.txt",
        "/ui/assets/..%2f..%2fsecret.txt",
    ] {
        let r = get(a, p).await;
        assert!(!r.body.contains("secret"), "{p}: {} {}", r.status, r.body);
    }
    assert_eq!(get(a, "/ui/missing.js").await.status, 404);
}

/// The Admin API calls the APISIX dashboard's pages make (apache/apisix-dashboard at 0fc388a,
/// `src/apis/{routes,upstreams,consumers,ssls,plugins}.ts`, `src/config/req.ts`): lists with
/// `page`/`page_size`, a detail, `PUT /{kind}/{id}` with the id left out of the body, `POST`,
/// `PUT /consumers`, the "delete all" pattern (a page of 10 for `total`, then pages of 500),
/// `plugins?subsystem=http&all=true` (names with a `schema`), `plugins/list`, one schema.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboards_admin_api_calls() {
    let etcd = Etcd::start();
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    let page = |kind: &str, size: u32| format!("/apisix/admin/{kind}?page=1&page_size={size}");
    // empty lists are lists
    for kind in [
        "routes",
        "upstreams",
        "services",
        "consumers",
        "ssls",
        "global_rules",
        "plugin_configs",
        "consumer_groups",
    ] {
        let r = admin(a, "GET", &page(kind, 10), "").await;
        assert_eq!(
            (r.status, r.json()),
            (200, json!({"total": 0, "list": []})),
            "{kind}"
        );
    }
    // upstream page: POST, then edit with PUT (the id is in the path only)
    let r = admin(a, "POST", "/apisix/admin/upstreams", r#"{"name":"u1","type":"roundrobin","nodes":[{"host":"127.0.0.1","port":1980,"weight":1}]}"#).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let uid = r.json()["value"]["id"].as_str().unwrap().to_owned();
    let r = admin(a, "PUT", &format!("/apisix/admin/upstreams/{uid}"), r#"{"name":"u1-edited","type":"roundrobin","nodes":[{"host":"127.0.0.1","port":1980,"weight":2}]}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // route page: POST with an upstream_id, list filtered by service_id (the service page's tab)
    let r = admin(
        a,
        "POST",
        "/apisix/admin/routes",
        &json!({"name": "r1", "uri": "/r1", "upstream_id": uid}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let rid = r.json()["value"]["id"].as_str().unwrap().to_owned();
    let r = admin(a, "GET", &format!("/apisix/admin/routes/{rid}"), "").await;
    assert_eq!(r.json()["value"]["upstream_id"], json!(uid));
    let r = admin(
        a,
        "GET",
        "/apisix/admin/routes?page=1&page_size=10&filter=service_id%3D1",
        "",
    )
    .await;
    assert_eq!(r.json()["total"], json!(0));
    // consumer page: PUT /consumers
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/consumers",
        r#"{"username":"dash","plugins":{"key-auth":{"key":"dash-key"}}}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        admin(a, "GET", "/apisix/admin/consumers/dash", "")
            .await
            .status,
        200
    );
    // plugin pickers
    let all = request(
        a,
        "GET",
        "/apisix/admin/plugins?subsystem=http&all=true",
        &[("x-api-key", ADMIN_KEY)],
        "",
    )
    .await;
    assert_eq!(all.status, 200);
    let with_schema: Vec<String> = all
        .json()
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.get("schema").is_some())
        .map(|(k, _)| k.clone())
        .collect();
    assert!(
        with_schema.contains(&"proxy-rewrite".to_owned()),
        "{with_schema:?}"
    );
    assert!(
        admin(a, "GET", "/apisix/admin/plugins/list", "")
            .await
            .json()
            .is_array()
    );
    assert_eq!(
        admin(a, "GET", "/apisix/admin/plugins/proxy-rewrite", "")
            .await
            .status,
        200
    );
    // "delete all": total from a page of 10, then pages of 500, deleting each
    for kind in ["routes", "upstreams", "consumers"] {
        let total = admin(a, "GET", &page(kind, 10), "").await.json()["total"]
            .as_u64()
            .unwrap();
        assert_eq!(total, 1, "{kind}");
        let list = admin(a, "GET", &page(kind, 500), "").await.json();
        for item in list["list"].as_array().unwrap() {
            let id = item["value"]["id"]
                .as_str()
                .or(item["value"]["username"].as_str())
                .unwrap();
            let r = admin(a, "DELETE", &format!("/apisix/admin/{kind}/{id}"), "").await;
            assert_eq!(r.status, 200, "{kind} {id}: {}", r.body);
        }
        assert_eq!(
            admin(a, "GET", &page(kind, 10), "").await.json()["total"],
            json!(0)
        );
    }
}

/// Admin API bodies from APISIX's documentation, sent unchanged but for upstream addresses:
/// `docs/en/latest/plugins/proxy-rewrite.md` (a route PUT to `/routes` with its id in the
/// body), `docs/en/latest/terminology/plugin-config.md` (a route naming plugin config `1` as a
/// number), `docs/en/latest/admin-api.md` (an upstream with a backup node of priority -1 and
/// active health checks).
#[tokio::test(flavor = "multi_thread")]
async fn bodies_from_apisix_documentation() {
    let etcd = Etcd::start();
    let up = Upstream::start("primary").await;
    let backup = Upstream::start("backup").await;
    let gw = gateway_on(&etcd, "");
    let a = gw.admin_port();
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes",
        &json!({
            "id": "proxy-rewrite-route",
            "methods": ["GET"],
            "uri": "/",
            "plugins": {"proxy-rewrite": {"uri": "/anything", "headers": {"set": {"X-Api-Version": "v1", "X-Api-Engine": "apisix"}}}},
            "upstream": {"type": "roundrobin", "nodes": {up.node(): 1}}
        })
        .to_string(),
    )
    .await;
    assert_contains(
        &r,
        201,
        json!({"key": "/apisix/routes/proxy-rewrite-route"}),
    );
    assert!(
        eventually(Duration::from_secs(3), async || get(gw.port, "/")
            .await
            .status
            == 200)
        .await
    );
    let r = get(gw.port, "/").await;
    assert_eq!(r.json()["uri"], json!("/anything"));
    assert_eq!(r.seen_header("x-api-version").as_deref(), Some("v1"));
    assert_eq!(r.seen_header("x-api-engine").as_deref(), Some("apisix"));

    // plugin-config.md: the plugin config (with a plugin polygate has), then the route as
    // documented, `plugin_config_id` a number
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/plugin_configs/1",
        r#"{"desc":"blah","plugins":{"proxy-rewrite":{"headers":{"set":{"x-from-config":"1"}}}}}"#,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/1",
        &json!({"uris": ["/index.html"], "plugin_config_id": 1, "upstream": {"type": "roundrobin", "nodes": {up.node(): 1}}}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        eventually(Duration::from_secs(3), async || get(gw.port, "/index.html")
            .await
            .status
            == 200)
        .await
    );
    assert_eq!(
        get(gw.port, "/index.html")
            .await
            .seen_header("x-from-config")
            .as_deref(),
        Some("1")
    );

    // admin-api.md: a backup node (priority -1) used only when the primary is unavailable,
    // with active health checks
    let (h1, p1) = up
        .node()
        .split_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse::<u16>().unwrap()))
        .unwrap();
    let (h2, p2) = backup
        .node()
        .split_once(':')
        .map(|(h, p)| (h.to_owned(), p.parse::<u16>().unwrap()))
        .unwrap();
    let r = admin(
        a,
        "PUT",
        "/apisix/admin/routes/2",
        &json!({
            "uri": "/hello",
            "upstream": {
                "type": "roundrobin",
                "nodes": [
                    {"host": h1, "port": p1, "weight": 2000},
                    {"host": h2, "port": p2, "weight": 1, "priority": -1}
                ],
                "checks": {"active": {"http_path": "/status", "healthy": {"interval": 1, "successes": 1}, "unhealthy": {"interval": 1, "http_failures": 1}}}
            }
        })
        .to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(
        eventually(Duration::from_secs(3), async || get(gw.port, "/hello")
            .await
            .status
            == 200)
        .await
    );
    for _ in 0..5 {
        assert_eq!(get(gw.port, "/hello").await.upstream(), "primary");
    }
}
