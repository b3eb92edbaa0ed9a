//! The configuration pipeline through the real binary: APISIX's item semantics (one bad
//! resource does not take the others down), references to missing resources answered as
//! APISIX answers them, values that used to panic the process, a watcher that survives
//! anything, and a `validate` without side effects.

use std::time::{Duration, Instant};

use crate::support::*;

/// APISIX standalone (`apisix/core/config_yaml.lua`): an invalid item is logged and skipped,
/// the others are served; ids default to `arr_<n>`. A route naming a missing upstream gets
/// 502, a missing service 404, a missing plugin config 503 (`apisix/init.lua`); `upstream_id`
/// wins over an inline `upstream`; a plugin configured as null means `{}`.
#[tokio::test(flavor = "multi_thread")]
async fn one_bad_resource_does_not_take_the_others_down() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = Gateway::start(&format!(
        r#"upstreams:
  - {{id: ua, nodes: {{"{a}": 1}}}}
routes:
  - {{uri: /good, upstream_id: ua}}
  - {{uri: /typo, upstream_id: ua, methodz: [GET]}}
  - {{uri: /badplugin, upstream_id: ua, plugins: {{proxy-rewrite: {{regex_uri: ["(", "/x"]}}}}}}
  - {{uri: /noupstream, upstream_id: missing}}
  - {{uri: /noservice, service_id: missing}}
  - {{uri: /nopc, plugin_config_id: missing, upstream_id: ua}}
  - {{uri: /both, upstream_id: ua, upstream: {{nodes: {{"{b}": 1}}}}}}
  - uri: /nullplugin
    upstream_id: ua
    plugins:
      key-auth:
  - {{uri: /last, upstream: {{nodes: {{"{b}": 1}}}}}}
"#,
        a = a.node(),
        b = b.node()
    ));
    let p = gw.port;
    assert_eq!(get(p, "/good").await.upstream(), "a");
    assert_eq!(get(p, "/last").await.upstream(), "b");
    assert_eq!(get(p, "/typo").await.status, 404, "skipped");
    assert_eq!(get(p, "/badplugin").await.status, 404, "skipped");
    assert_eq!(get(p, "/noupstream").await.status, 502);
    assert_eq!(get(p, "/noservice").await.status, 404);
    assert_eq!(get(p, "/nopc").await.status, 503);
    assert_eq!(get(p, "/both").await.upstream(), "a", "upstream_id wins");
    assert_eq!(get(p, "/nullplugin").await.status, 401, "key-auth: {{}}");
    let log = gw.stderr();
    assert!(
        log.contains("skipped invalid resource: routes[1].methodz"),
        "{log}"
    );
    assert!(
        log.contains("skipped invalid resource: routes[2].plugins.proxy-rewrite.regex_uri[0]"),
        "{log}"
    );
    // `polygate validate` still reports every problem and fails
    let (code, out) = validate(&std::fs::read_to_string(&gw.config).unwrap(), "yaml");
    assert_ne!(code, 0);
    for want in [
        "routes[1].methodz",
        "routes[2].plugins.proxy-rewrite",
        "routes[3].upstream_id: upstream \"missing\" not found",
        "routes[4].service_id",
        "routes[5].plugin_config_id",
    ] {
        assert!(out.contains(want), "{want} in {out}");
    }
}

/// `Duration::from_secs_f64(1e300)` panics: every duration has an upper bound (365 days)
/// checked at validation, so no value in a file reaches it.
#[tokio::test(flavor = "multi_thread")]
async fn huge_durations_are_rejected_and_the_watcher_survives() {
    for (text, path) in [
        (
            "upstreams: [{id: u, nodes: {\"127.0.0.1:1\": 1}, retry_timeout: 1e300}]\n#END\n",
            "upstreams[0].retry_timeout",
        ),
        (
            "gateway: {timeouts: {client_header: 1e300}}\n#END\n",
            "gateway.timeouts.client_header",
        ),
        (
            "routes: [{id: r, uri: /, timeout: {connect: 1e300, send: 1, read: 1}, upstream: {nodes: {\"127.0.0.1:1\": 1}}}]\n#END\n",
            "routes[0].timeout.connect",
        ),
        (
            "routes: [{id: r, uri: /, upstream: {nodes: {\"127.0.0.1:1\": 1}, keepalive_pool: {size: 1, idle_timeout: .nan, requests: 1}}}]\n#END\n",
            "routes[0].upstream.keepalive_pool.idle_timeout",
        ),
    ] {
        let (code, out) = validate(text, "yaml");
        assert_eq!(code, 1, "{text}: {out}");
        assert!(out.contains(path), "{path} in {out}");
        // (NaN has no JSON form: it arrives as null, a type error at the same path)
        assert!(
            out.contains("365 days") || out.contains("31536000") || out.contains("null"),
            "{out}"
        );
    }
    // a running gateway: the route with the huge timeout is skipped, the others serve, and a
    // later edit is still applied (the watcher lived through it)
    let u = Upstream::start("u").await;
    let ok = format!(
        "routes:\n  - {{id: ok, uri: /ok, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        u.node()
    );
    let gw = Gateway::start(&ok);
    gw.reload(&format!(
        "{ok}  - {{id: huge, uri: /huge, timeout: {{connect: 1e300, send: 1, read: 1}}, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        u.node()
    ));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            gw.stderr().contains("routes[1].timeout.connect")
        })
        .await,
        "{}",
        gw.stderr()
    );
    assert_eq!(get(gw.port, "/ok").await.status, 200);
    assert_eq!(get(gw.port, "/huge").await.status, 404);
    gw.reload(&format!(
        "{ok}  - {{id: later, uri: /later, upstream: {{nodes: {{\"{}\": 1}}}}}}\n",
        u.node()
    ));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            get(gw.port, "/later").await.status == 200
        })
        .await,
        "{}",
        gw.stderr()
    );
}

/// A YAML file nested 40,000 levels deep took 10 s to parse (quadratic): it is refused at
/// once.
#[test]
fn deep_nesting_is_refused_in_linear_time() {
    let text = format!(
        "routes: {}{}\n#END\n",
        "[".repeat(40_000),
        "]".repeat(40_000)
    );
    let t = Instant::now();
    let (code, out) = validate(&text, "yaml");
    assert_ne!(code, 0);
    assert!(out.contains("nest deeper than 256"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// `polygate validate` compiles Lua without running it: a serverless function's chunk that
/// would write a file does not.
#[test]
fn validate_runs_no_code() {
    let dir = tempdir::Dir::new();
    let marker = dir.path().join("ran");
    let text = format!(
        r#"routes:
  - id: r
    uri: /x
    upstream: {{nodes: {{"127.0.0.1:1": 1}}}}
    plugins:
      serverless-pre-function:
        functions:
          - |
            local f = io.open("{}", "w"); f:write("ran"); f:close()
            return function() end
#END
"#,
        marker.display()
    );
    let (code, out) = validate(&text, "yaml");
    assert_eq!(code, 0, "{out}");
    assert!(!marker.exists(), "validate ran the function's chunk");
}

/// The pipeline's state is visible: metrics and `/status` on the metrics listener.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_change_shows_in_metrics_and_status() {
    let port = free_port();
    let mport = free_port();
    let head = format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:{port}\"}}]\n  metrics: {{addr: \"127.0.0.1:{mport}\"}}\n  watch_interval: 0.2\n"
    );
    let gw = Gateway::start_raw(port, &format!("{head}routes: []\n#END\n"));
    gw.write_config(&format!("{head}routes: [\n#END\n"));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            get(mport, "/metrics")
                .await
                .body
                .contains("\npolygate_config_last_change_failed 1\n")
        })
        .await,
        "{}",
        gw.stderr()
    );
    let status = get(mport, "/status").await.json();
    assert_eq!(status["config"]["rejected"], 1, "{status}\n{}", gw.stderr());
    assert!(status["config"]["last_error"].is_string(), "{status}");
    gw.write_config(&format!("{head}routes: []\n#END\n"));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            get(mport, "/status").await.json()["config"]["last_error"].is_null()
        })
        .await
    );
}

/// A rejected change leaves FFI runtimes as they were: nothing loaded, nothing unloaded.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_change_leaves_ffi_runtimes_alone() {
    let lib = libs::c("compat_runtime");
    let u = Upstream::start("u").await;
    let route = |cfg: &str| {
        format!(
            "routes:\n  - {{id: r, uri: /c, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{ffi: {{lib: \"{}\", cfg: \"{cfg}\"}}}}}}\n",
            u.node(),
            lib.display()
        )
    };
    let port = free_port();
    let gw = Gateway::start_args(port, &with_gateway(port, &route("plugin")), &["--strict"]);
    assert_eq!(
        get(port, "/c").await.seen_header("x-c-runtime").as_deref(),
        Some("1")
    );
    // a change with another runtime and an error elsewhere: rejected whole
    gw.reload(&format!(
        "{}  - {{id: bad, uri: /b, upstream_id: missing}}\n",
        route("null")
    ));
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            gw.stderr().contains("configuration rejected")
        })
        .await
    );
    let log = gw.stderr();
    assert_eq!(log.matches("ffi: loaded").count(), 1, "{log}");
    assert!(!log.contains("unloading"), "{log}");
    assert_eq!(
        get(port, "/c").await.seen_header("x-c-runtime").as_deref(),
        Some("1")
    );
}
