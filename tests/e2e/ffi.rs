//! The ffi plugin with real runtimes built from source: Go (c-shared), Rust (cdylib) and C.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::*;

const VALID: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsInJvbGUiOiJhZG1pbiIsImlzcyI6InBvbHlnYXRlLWUyZSIsImV4cCI6NDEwMjQ0NDgwMH0.yh_3N0XMNH45AYW0Jv68wRPGgDW3hd-5FcptxOFfUO8";
const EXPIRED: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImlzcyI6InBvbHlnYXRlLWUyZSIsImV4cCI6MTAwMDAwMDAwMH0.78_nrptqKYuhDsxfdqx4w0Tmobmb9Zb3A997RaC5arA";
const WRONG_KEY: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImlzcyI6InBvbHlnYXRlLWUyZSIsImV4cCI6NDEwMjQ0NDgwMH0.RNiV2jasLYUcIKrXQ0_a8aDRI6bGcRGV3N98RT4c-3k";

#[tokio::test(flavor = "multi_thread")]
async fn go_runtime_actions_errors_timeouts_and_log_phase() {
    let lib = libs::go("echo");
    let lib = lib.display();
    let u = Upstream::start("u").await;
    let dir = tempdir::Dir::new();
    let logfile = dir.path().join("ffi-log.txt");
    let gw = Gateway::start(&format!(
        r#"
upstreams: [{{id: u, nodes: {{"{n}": 1}}}}]
routes:
  - {{id: action, uri: /action/*, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: action}}}}}}
  - {{id: rewrite, uri: /rw/*, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: "rewrite:/rewritten?by=go", phase: rewrite}}}}}}
  - {{id: deny, uri: /deny, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: deny}}}}}}
  - {{id: describe, uri: /describe/*, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: describe}}}}}}
  - {{id: fail, uri: /fail, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: fail}}}}}}
  - {{id: failopen, uri: /failopen, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: fail, on_error: fail_open}}}}}}
  - {{id: hang, uri: /hang, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: hang, timeout: 0.3, error_status: 504}}}}}}
  - {{id: log, uri: /logged/*, upstream_id: u, plugins: {{ffi: {{lib: "{lib}", cfg: "logto:{log}", phase: log}}}}}}
"#,
        n = u.node(),
        log = logfile.display()
    ));
    let p = gw.port;
    let r = get(p, "/action/x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("x-go-echo").as_deref(), Some("/action/x"));

    // the request description as the runtime receives it (docs/ffi.md): names sorted, a
    // repeated header as a list in arrival order even when other headers come between its
    // lines, quotes and backslashes escaped
    let r = get_h(
        p,
        "/describe/a%20b?q=x&r=%22",
        &[
            ("x-multi", "one"),
            ("accept", "*/*"),
            ("X-Multi", "two \"quoted\" \\ back"),
            ("b-single", "tab\there"),
            ("x-multi", "three"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = r.json();
    assert_eq!(d["method"], "GET");
    assert_eq!(d["uri"], "/describe/a%20b?q=x&r=%22");
    // the path after normalisation, decoded as nginx's $uri
    assert_eq!(d["path"], "/describe/a b");
    assert_eq!(d["query"], "q=x&r=%22");
    assert_eq!(d["route_id"], "describe");
    assert_eq!(d["client_ip"], "127.0.0.1");
    assert!(d["client_port"].as_u64().is_some_and(|p| p > 0));
    let h = &d["headers"];
    assert_eq!(
        h["x-multi"],
        serde_json::json!(["one", "two \"quoted\" \\ back", "three"])
    );
    assert_eq!(h["accept"], "*/*");
    assert_eq!(h["b-single"], "tab\there");
    assert_eq!(h["host"], "localhost");
    let names: Vec<&str> = h.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    let raw = r.body.find("\"headers\":{").map(|i| &r.body[i..]).unwrap();
    let mut at = 0;
    for n in &names {
        let i = raw.find(&format!("\"{n}\":")).unwrap();
        assert!(i >= at, "header names sorted in {raw}");
        at = i;
    }

    let r = get(p, "/rw/abc").await;
    assert_eq!(r.json()["uri"], "/rewritten?by=go");
    assert_eq!(r.header("x-rewritten"), Some("1"));

    let r = get(p, "/deny").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (403, "denied by a Go runtime\n")
    );
    assert_eq!(r.header("x-denied-by"), Some("go"));
    assert_eq!(u.hits(), 2, "denied requests never reach the upstream");

    let r = get(p, "/fail").await;
    assert_eq!(r.status, 503, "rc != 0 fails closed");
    assert!(
        gw.stderr()
            .contains("runtime answered rc 3: something broke"),
        "{}",
        gw.stderr()
    );
    assert_eq!(get(p, "/failopen").await.status, 200, "fail_open continues");

    let t = Instant::now();
    let r = get(p, "/hang").await;
    assert_eq!(r.status, 504);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(gw.stderr().contains("timed out"), "{}", gw.stderr());

    assert_eq!(get(p, "/logged/one").await.status, 200);
    let ok = gw
        .eventually(Duration::from_secs(3), || async {
            std::fs::read_to_string(&logfile)
                .unwrap_or_default()
                .contains("200 /logged/one")
        })
        .await;
    assert!(ok, "log phase call did not arrive");

    // many concurrent requests, each must get its own answer
    let tasks: Vec<_> = (0..300)
        .map(|i| tokio::spawn(async move { (i, get(p, &format!("/action/req-{i}")).await) }))
        .collect();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.seen_header("x-go-echo"), Some(format!("/action/req-{i}")));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn go_jwt_auth_runtime_with_a_real_go_library() {
    let lib = libs::go("jwtauth");
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: api
    uri: /api/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      ffi:
        lib: "{lib}"
        cfg: '{{"secret": "e2e-secret", "issuer": "polygate-e2e"}}'
"#,
        n = u.node(),
        lib = lib.display()
    ));
    let p = gw.port;
    let r = get(p, "/api/me").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["message"], "missing bearer token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    for bad in [EXPIRED, WRONG_KEY, "not.a.token"] {
        let auth = format!("Bearer {bad}");
        let r = get_h(p, "/api/me", &[("authorization", &auth)]).await;
        assert_eq!(r.status, 401, "{bad}");
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("invalid token"),
            "{}",
            r.body
        );
    }
    let auth = format!("Bearer {VALID}");
    let r = get_h(p, "/api/me", &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.seen_header("x-user").as_deref(), Some("alice"));
    assert_eq!(r.seen_header("x-user-role").as_deref(), Some("admin"));
    assert_eq!(
        r.seen_header("authorization"),
        None,
        "the token is not forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_runtime_and_request_body() {
    let lib = libs::rust_echo();
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - id: r
    uri: /rust/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      ffi: {{lib: "{lib}", cfg: json, include_body: true, max_body: 64}}
  - id: pollers
    uri: /pollers/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      ffi: {{lib: "{lib}", cfg: "json,pollers=3"}}
  - id: inline
    uri: /inline/*
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      ffi: {{lib: "{lib}", cfg: "json,inline"}}
"#,
        n = u.node(),
        lib = lib.display()
    ));
    let p = gw.port;
    let r = request(p, "POST", "/rust/path", &[], "the body").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("x-rust-echo").as_deref(), Some("/rust/path"));
    assert_eq!(
        r.json()["body"],
        "the body",
        "a buffered body is still proxied"
    );
    let big = "x".repeat(100);
    assert_eq!(request(p, "POST", "/rust/big", &[], &big).await.status, 413);

    // the SDK with three pollers taking batches: every concurrent request gets its own answer
    let pollers = || {
        std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.starts_with("ffi-poll-"))
            .count()
    };
    // the first route's runtime polls with one thread, the second's with three, the third's
    // (inline) with one, which takes its calls if inline calls are ever turned off
    assert_eq!(get(p, "/pollers/first").await.status, 200);
    assert_eq!(
        pollers(),
        5,
        "one poller for cfg json, three for json,pollers=3, one for json,inline"
    );
    // 300 concurrent requests under `prefix`, each answered with its own path; the threads that
    // ran the handler
    let concurrent = |prefix: &'static str| async move {
        let tasks: Vec<_> = (0..300)
            .map(|i| tokio::spawn(async move { (i, get(p, &format!("{prefix}/req-{i}")).await) }))
            .collect();
        let mut threads = Vec::new();
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(
                r.seen_header("x-rust-echo"),
                Some(format!("{prefix}/req-{i}"))
            );
            threads.push(r.seen_header("x-rust-thread").unwrap_or_default());
        }
        threads
    };
    for thread in concurrent("/pollers").await {
        assert!(thread.starts_with("ffi-poll-"), "{thread:?}");
    }

    // inline (`Options::inline`): the handler runs on the gateway's two worker threads, never on
    // the runtime's poller, and concurrent requests still each get their own answer
    for thread in concurrent("/inline").await {
        // the kernel keeps 15 bytes of a thread's name: "polygate-worker-N" reads "polygate-worker"
        assert_eq!(thread, "polygate-worker");
    }
    assert!(
        !gw.stderr().contains("calls go through the queue"),
        "{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn c_runtime_without_polygate_headers_and_cancellation_on_disconnect() {
    let compat = libs::c("compat_runtime");
    let ext = libs::c("ext_runtime");
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"
routes:
  - {{id: compat, uri: /compat, upstream: {{nodes: {{"{n}": 1}}}}, plugins: {{ffi: {{lib: "{compat}", cfg: plugin}}}}}}
  - {{id: cancel, uri: /cancel, upstream: {{nodes: {{"{n}": 1}}}}, plugins: {{ffi: {{lib: "{ext}", cfg: cancel, timeout: 30}}}}}}
  - id: luacancel
    uri: /luacancel
    upstream: {{nodes: {{"{n}": 1}}}}
    plugins:
      lua:
        access: |
          local rt = ngx.load_ffi("{ext}", "cancel", {{timeout = 30}})
          rt:call("x")
"#,
        n = u.node(),
        compat = compat.display(),
        ext = ext.display()
    ));
    let p = gw.port;
    let r = get(p, "/compat").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.seen_header("x-c-runtime").as_deref(), Some("1"));

    // the client goes away while the runtime works: the runtime sees the cancellation, for
    // the ffi plugin and for a Lua handler waiting in `rt:call` (the call is owned by the
    // handler's coroutine driver, dropped with the request)
    for (n, path) in [(1, "/cancel"), (2, "/luacancel")] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        let seen = gw
            .eventually(Duration::from_secs(5), || async {
                gw.stderr().matches("task cancelled by the host").count() == n
            })
            .await;
        assert!(
            seen,
            "runtime did not observe the cancellation of {path}:\n{}",
            gw.stderr()
        );
    }
    assert_eq!(u.hits(), 1);
}

/// `polygate validate` checks that the library exists and exports `libffi_init` without
/// loading it (a Go library would start its runtime); a `libffi_init` that fails is seen when
/// the configuration is committed, and the route's requests fail as `on_error` says.
#[tokio::test(flavor = "multi_thread")]
async fn init_failure_fails_the_route_and_validate_does_not_load() {
    let lib = libs::go("jwtauth");
    let routes = format!(
        "routes:\n  - {{id: 1, uri: /a, upstream: {{nodes: {{\"127.0.0.1:1\": 1}}}}, plugins: {{ffi: {{lib: \"{}\", cfg: 'not json'}}}}}}\n",
        lib.display()
    );
    let (code, out) = validate(&format!("{routes}#END\n"), "yaml");
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("libffi_init of"),
        "validate ran libffi_init: {out}"
    );
    let gw = Gateway::start(&routes);
    let r = get(gw.port, "/a").await;
    assert_eq!(
        r.status, 503,
        "fail_closed with the default error_status: {}",
        r.body
    );
    assert!(gw.stderr().contains("failed with rc 2"), "{}", gw.stderr());

    let (code, out) = validate(
        "routes:\n  - {id: 1, uri: /a, plugins: {ffi: {lib: no_such_lib}}}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(
        out.contains("routes[0].plugins.ffi.lib: cannot load no_such_lib"),
        "{out}"
    );
    // a file that is not a shared library
    let (code, out) = validate(
        "routes:\n  - {id: 1, uri: /a, plugins: {ffi: {lib: /etc/hostname}}}\n#END\n",
        "yaml",
    );
    assert_ne!(code, 0);
    assert!(out.contains("not an ELF file"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn short_library_names_resolve_through_the_configured_path() {
    let lib = libs::c("compat_runtime");
    let dir = lib.parent().unwrap().display().to_string();
    let u = Upstream::start("u").await;
    let port = free_port();
    let _gw = Gateway::start_raw(
        port,
        &format!(
            "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\"}}]\n  ffi_lib_path: [\"{dir}\"]\nroutes:\n  - {{id: r, uri: /c, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{ffi: {{lib: compat_runtime, cfg: plugin}}}}}}\n#END\n",
            u.node()
        ),
    );
    let r = get(port, "/c").await;
    assert_eq!(r.seen_header("x-c-runtime").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn runtimes_dropped_from_the_configuration_are_unloaded() {
    let lib = libs::c("compat_runtime");
    let u = Upstream::start("u").await;
    let conf = |cfg: &str| {
        format!(
            "routes:\n  - {{id: r, uri: /c, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{ffi: {{lib: \"{}\", cfg: \"{cfg}\"}}}}}}\n",
            u.node(),
            lib.display()
        )
    };
    // "plugin" then "null" (an empty answer: continue): two runtimes of the same library
    let gw = Gateway::start(&conf("plugin"));
    assert_eq!(
        get(gw.port, "/c")
            .await
            .seen_header("x-c-runtime")
            .as_deref(),
        Some("1")
    );
    gw.reload(&conf("null"));
    let p = gw.port;
    assert!(
        gw.eventually(Duration::from_secs(3), || async {
            gw.stderr().contains("configuration reloaded")
        })
        .await
    );
    let r = get(p, "/c").await;
    assert_eq!((r.status, r.seen_header("x-c-runtime")), (200, None));
    // the next reload finds the first runtime unused and unloads it
    gw.reload(&format!(
        "{}  - {{id: other, uri: /o, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        conf("null"),
        u.node()
    ));
    let unloaded = gw
        .eventually(Duration::from_secs(3), || async {
            gw.stderr().contains("unloading") && gw.stderr().contains("&plugin (no longer used")
        })
        .await;
    assert!(unloaded, "{}", gw.stderr());
    assert!(
        !gw.stderr().contains("&null (no longer used"),
        "the runtime in use stays"
    );
    assert_eq!(get(p, "/c").await.status, 200);
}
