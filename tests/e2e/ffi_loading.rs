//! Loading runtimes the way nginx does: every `libffi_init` on the process's main thread, loads
//! that never block a worker, `__unload` that leaves the cache at once, and stop signals that
//! still drain after a runtime installed handlers of its own. The runtime is
//! `crates/polygate-ffi/tests/c/threadbound.c`, which aborts the process if a later
//! `libffi_init` runs on another thread than the first (as lua-resty-ffi's Java loader crashes).

use std::time::Duration;

use crate::support::*;

fn routes(lib: &str) -> String {
    format!(
        r#"
routes:
  - id: load
    uri: /load
    plugins:
      lua:
        access: |
          local name = ngx.var.arg_name
          local rt, err = ngx.load_ffi("{lib}", name)
          if not rt then
            ngx.say("load failed: ", tostring(err))
            return ngx.exit(200)
          end
          local ok, res = rt:echo(ngx.var.arg_req or "x")
          ngx.say(tostring(ok), " ", tostring(res))
          return ngx.exit(200)
  - id: unload
    uri: /unload
    plugins:
      lua:
        access: |
          local rt = ngx.load_ffi("{lib}", ngx.var.arg_name)
          rt:__unload()
          ngx.say("unloaded")
          return ngx.exit(200)
  - id: plain
    uri: /plain
    plugins:
      lua:
        access: |
          ngx.say("plain")
          return ngx.exit(200)
  - id: plugin
    uri: /plugin
    upstream: {{nodes: {{"127.0.0.1:1": 1}}}}
    plugins: {{ffi: {{lib: "{lib}", cfg: committed}}}}
"#
    )
}

/// Parses `name inits=N main=M elsewhere=E state=S req=...`.
fn counts(body: &str) -> (u32, u32, u32, u32) {
    let field = |k: &str| -> u32 {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {body:?}"))
    };
    (
        field("inits="),
        field("main="),
        field("elsewhere="),
        field("state="),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_libffi_init_runs_on_the_main_thread_with_two_workers() {
    let lib = libs::c("threadbound");
    let gw = Gateway::start(&routes(&lib.display().to_string()));
    let p = gw.port;
    // 8 runtimes loaded at once from both workers, 10 requests each
    let tasks: Vec<_> = (0..80)
        .map(|i| {
            tokio::spawn(async move {
                let name = format!("rt{}", i % 8);
                let r = get(p, &format!("/load?name={name}&req=r{i}")).await;
                (name, i, r)
            })
        })
        .collect();
    for t in tasks {
        let (name, i, r) = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", gw.stderr());
        assert!(
            r.body.starts_with(&format!("true {name} "))
                && r.body.trim_end().ends_with(&format!("req=r{i}")),
            "{}",
            r.body
        );
        let (inits, main, elsewhere, state) = counts(&r.body);
        assert_eq!(
            elsewhere, 0,
            "a libffi_init ran off the main thread: {}",
            r.body
        );
        assert_eq!(inits, main);
        assert_eq!(state, 4242, "the poll thread reads the init thread's state");
    }
    // the plugin's runtime (loaded at commit) and the 8 Lua ones: 9 inits, all on the main thread
    let r = get(p, "/load?name=rt0&req=end").await;
    let (inits, main, elsewhere, _) = counts(&r.body);
    assert_eq!((inits, main, elsewhere), (9, 9, 0), "{}", r.body);
    assert!(!gw.stderr().contains("threadbound: libffi_init on a thread"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_load_does_not_block_its_worker() {
    let lib = libs::c("threadbound");
    let gw = Gateway::start(&format!(
        "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 1\n{}",
        routes(&lib.display().to_string())
    ));
    let p = gw.port;
    // libffi_init of "slow" takes 2 s; the one worker serves other requests meanwhile
    let slow = tokio::spawn(async move { get(p, "/load?name=slow&req=s").await });
    let started = gw
        .eventually(Duration::from_secs(5), || async {
            // the load is queued once the request reached the worker; /plain proves the worker
            // is free while it runs
            get(p, "/plain").await.body == "plain\n" && !slow.is_finished()
        })
        .await;
    assert!(started, "the worker was blocked by a load: {}", gw.stderr());
    for _ in 0..5 {
        assert_eq!(get(p, "/plain").await.body, "plain\n");
    }
    let r = slow.await.unwrap();
    assert!(r.body.starts_with("true slow "), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_init_is_not_cached_and_unload_leaves_the_cache_at_once() {
    let lib = libs::c("threadbound");
    let gw = Gateway::start(&routes(&lib.display().to_string()));
    let p = gw.port;
    // lua-resty-ffi: load_ffi returns nil, rc; the next load runs libffi_init again
    assert_eq!(get(p, "/load?name=fail").await.body, "load failed: 7\n");
    assert_eq!(get(p, "/load?name=fail").await.body, "load failed: 7\n");
    let (inits_before, ..) = counts(&get(p, "/load?name=u&req=0").await.body);
    // unload on one worker, load on whichever worker takes the next connection: always a fresh,
    // working runtime, never the unloaded one
    for i in 0..30 {
        assert_eq!(get(p, "/unload?name=u").await.body, "unloaded\n");
        let r = get(p, &format!("/load?name=u&req={i}")).await;
        assert!(r.body.starts_with("true u "), "iteration {i}: {}", r.body);
    }
    let (inits_after, ..) = counts(&get(p, "/load?name=u&req=end").await.body);
    assert_eq!(
        inits_after,
        inits_before + 30,
        "each unload → a fresh libffi_init"
    );
    assert_eq!(get(p, "/plain").await.status, 200);
}

async fn drains_after_a_runtime_took_the_signals(cfg: &str, sig: &str) {
    let lib = libs::c("threadbound");
    let mut gw = Gateway::start(&format!(
        "{}{SLOW_ROUTE}",
        routes(&lib.display().to_string())
    ));
    let p = gw.port;
    let r = get(p, &format!("/load?name={cfg}")).await;
    assert!(r.body.starts_with(&format!("true {cfg} ")), "{}", r.body);
    // polygate notices the replaced handlers (right after libffi_init, or at its next check)
    assert!(
        gw.eventually(Duration::from_secs(5), || async {
            gw.stderr()
                .contains("replaced polygate's handler; restored")
        })
        .await,
        "{}",
        gw.stderr()
    );
    stop_drains(&mut gw, sig, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_after_a_runtime_installed_its_own_handlers() {
    drains_after_a_runtime_took_the_signals("signals", "TERM").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_drains_after_a_runtime_installed_handlers_from_its_own_thread() {
    // installed 300 ms after libffi_init returned: the once-a-second check restores them
    drains_after_a_runtime_took_the_signals("late-signals", "INT").await;
}
