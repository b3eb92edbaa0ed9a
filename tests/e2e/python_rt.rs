//! polygate's Python loader (`runtimes/python`, built from source by the test command) through
//! the real gateway with 2 worker threads: the SDK's plain and async handlers, rc ≠ 0,
//! exceptions in user code, failing inits, reload with `?`, unload draining, two runtimes of one
//! module, a runtime in lua-resty-ffi's cffi style, 1,000 concurrent calls, and an exit that
//! finalises the interpreter on the main thread without hanging.

use std::time::Duration;

use crate::support::*;

/// A Lua route `/call?rt=NAME&req=X` that loads the runtime NAME (a key of `cfgs`) and answers
/// `ok a b`; `/unload?rt=NAME` unloads it.
pub(crate) fn config(lib: &str, cfgs: &[(&str, String)]) -> String {
    let table: String = cfgs
        .iter()
        .map(|(k, v)| format!("            [\"{k}\"] = \"{v}\",\n"))
        .collect();
    format!(
        r#"
routes:
  - id: call
    uri: /call
    plugins:
      lua:
        access: |
          local cfgs = {{
{table}          }}
          local rt, err = ngx.load_ffi("{lib}", cfgs[ngx.var.arg_rt])
          if not rt then
            ngx.say("load failed: ", tostring(err))
            return ngx.exit(200)
          end
          local ok, a, b = rt:call(ngx.var.arg_req or "x")
          ngx.say(tostring(ok), " ", tostring(a), " ", tostring(b))
          return ngx.exit(200)
  - id: unload
    uri: /unload
    plugins:
      lua:
        access: |
          local cfgs = {{
{table}          }}
          local rt = ngx.load_ffi("{lib}", cfgs[ngx.var.arg_rt])
          rt:__unload()
          ngx.say("unloaded")
          return ngx.exit(200)
"#
    )
}

/// Unloading the runtime named `slow` (an async handler that logs "slow handler started" and
/// answers `slow:<req>` after a while) drains: the calls it already took are still answered.
pub(crate) async fn unload_drains(gw: &Gateway, p: u16) {
    let slow: Vec<_> = (0..10)
        .map(|i| tokio::spawn(async move { (i, call(p, "slow", &format!("s{i}")).await) }))
        .collect();
    let started = gw
        .eventually(Duration::from_secs(10), || async {
            gw.stderr().matches("slow handler started").count() >= 10
        })
        .await;
    assert!(started, "{}", gw.stderr());
    assert_eq!(get(p, "/unload?rt=slow").await.body, "unloaded\n");
    for t in slow {
        let (i, r) = t.await.unwrap();
        assert_eq!(r, format!("true slow:s{i} nil\n"));
    }
}

/// 1,000 concurrent calls on the runtimes named `echo` and `async` (which answers
/// `async:<req>`): no lost or mismatched answer.
pub(crate) async fn thousand_concurrent_calls(p: u16) {
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            tokio::spawn(async move {
                let rt = if i % 2 == 0 { "echo" } else { "async" };
                (i, rt, call(p, rt, &format!("m{i}")).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, rt, r) = t.await.unwrap();
        let want = if rt == "echo" {
            format!("true m{i} nil\n")
        } else {
            format!("true async:m{i} nil\n")
        };
        assert_eq!(r, want);
    }
}

/// A gateway with 2 worker threads whose `/call` and `/unload` routes ([`config`]) use the
/// loader `lib` found in `lib_dir`, with extra environment variables.
pub(crate) fn start_with_loader(
    lib_dir: &std::path::Path,
    lib: &str,
    cfgs: &[(&str, String)],
    env: &[(&str, &str)],
) -> Gateway {
    Gateway::start_env(
        &format!(
            "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  ffi_lib_path: [\"{}\"]\n{}",
            lib_dir.display(),
            config(lib, cfgs)
        ),
        env,
    )
}

/// The runtime named `reload` (a cfg with `?`, answering `v<N>:<req>`) picks up its source
/// rewritten by `write_version(2)` after an unload.
pub(crate) async fn reloads_after_an_edit(p: u16, write_version: impl Fn(u32)) {
    assert_eq!(call(p, "reload", "r").await, "true v1:r nil\n");
    write_version(2);
    assert_eq!(get(p, "/unload?rt=reload").await.body, "unloaded\n");
    assert_eq!(call(p, "reload", "r").await, "true v2:r nil\n");
}

/// SIGTERM: the gateway drains and exits 0.
pub(crate) fn exits_0_on_sigterm(gw: &mut Gateway) {
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        gw.stderr()
    );
}

fn pgtest(func: &str) -> String {
    format!("{}/pgtest,{func}", libs::test_dir("python").display())
}

pub(crate) async fn call(p: u16, rt: &str, req: &str) -> String {
    get(p, &format!("/call?rt={rt}&req={req}")).await.body
}

#[tokio::test(flavor = "multi_thread")]
async fn python_sdk_handlers_errors_reload_and_concurrency() {
    let pydir = libs::python_dir();
    let tmp = tempdir::Dir::new();
    let marker = tmp.path().join("finalized.txt");
    let reload_dir = tmp.path().join("mods");
    std::fs::create_dir_all(&reload_dir).unwrap();
    let reload_src = reload_dir.join("reloadme.py");
    let write_version = |v: u32| {
        std::fs::write(
            &reload_src,
            format!(
                "import polygate_ffi\n\ndef init(cfg, tq):\n    return polygate_ffi.serve(tq, lambda req: b\"v{v}:\" + req)\n"
            ),
        )
        .unwrap();
    };
    write_version(1);
    let cfgs = vec![
        ("echo", pgtest("init_echo")),
        ("a", format!("{},a", pgtest("init_tagged"))),
        ("b", format!("{},b", pgtest("init_tagged"))),
        ("async", pgtest("init_async")),
        ("slow", pgtest("init_slow")),
        ("rc", pgtest("init_rc")),
        ("json", pgtest("init_json")),
        ("raise", pgtest("init_raise")),
        ("araise", pgtest("init_async_raise")),
        ("fail", pgtest("init_fail")),
        ("boom", pgtest("init_boom")),
        ("task", pgtest("init_task")),
        ("gc", pgtest("init_gc")),
        (
            "exit",
            format!("{},{}", pgtest("init_atexit"), marker.display()),
        ),
        (
            "cffi",
            format!("{}/cffi_echo,init", libs::test_dir("python").display()),
        ),
        ("reload", format!("{}/reloadme?,init", reload_dir.display())),
        ("nomod", "no_such_module_here,init".to_owned()),
    ];
    let mut gw = start_with_loader(&pydir, "ffi_python3", &cfgs, &[]);
    let p = gw.port;

    assert_eq!(call(p, "echo", "hello").await, "true hello nil\n");
    assert_eq!(call(p, "a", "x").await, "true a:x nil\n");
    assert_eq!(call(p, "b", "x").await, "true b:x nil\n");
    assert_eq!(call(p, "async", "y").await, "true async:y nil\n");
    assert_eq!(call(p, "rc", "y").await, "false 5 five\n");
    assert_eq!(
        call(p, "json", "abc").await,
        "true {\"len\": 3, \"ok\": true} nil\n"
    );
    assert_eq!(call(p, "task", "t").await, "true True False t nil\n");
    assert_eq!(call(p, "cffi", "c").await, "true cffi:c nil\n");
    assert_eq!(call(p, "gc", "g").await, "true g:2000 nil\n");

    // an exception in user code: rc 1 with the traceback; the gateway and the runtime live on
    let r = call(p, "raise", "q").await;
    assert!(r.starts_with("false 1 Traceback"), "{r}");
    assert!(r.contains("ValueError: bad request q"), "{r}");
    let r = call(p, "araise", "q").await;
    assert!(
        r.starts_with("false 1 Traceback") && r.contains("KeyError: 'async q'"),
        "{r}"
    );
    assert_eq!(call(p, "echo", "still").await, "true still nil\n");

    // failing inits: load_ffi returns nil, rc (lua-resty-ffi), and the reason is logged
    assert_eq!(call(p, "fail", "x").await, "load failed: 3\n");
    assert_eq!(call(p, "boom", "x").await, "load failed: 1\n");
    assert!(
        gw.stderr().contains("RuntimeError: init exploded"),
        "{}",
        gw.stderr()
    );
    assert_eq!(call(p, "nomod", "x").await, "load failed: 1\n");
    assert!(
        gw.stderr()
            .contains("ModuleNotFoundError: No module named 'no_such_module_here'"),
        "{}",
        gw.stderr()
    );

    // the lua-resty-ffi name of the same loader
    let gw2_cfg = vec![("echo", pgtest("init_echo"))];
    let gw2 = start_with_loader(&pydir, "resty_ffi_python", &gw2_cfg, &[]);
    assert_eq!(call(gw2.port, "echo", "named").await, "true named nil\n");
    drop(gw2);

    // `?` reloads the module: edit, unload, load again
    reloads_after_an_edit(p, write_version).await;

    unload_drains(&gw, p).await;
    thousand_concurrent_calls(p).await;

    // SIGTERM: drained, the interpreter finalised at exit (Python's atexit ran), exit 0
    assert_eq!(call(p, "exit", "e").await, "true e nil\n");
    exits_0_on_sigterm(&mut gw);
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some("finalized"),
        "{}",
        gw.stderr()
    );
}

/// The virtualenv with `jsonschema` that scripts/test.sh prepares (`POLYGATE_TEST_PYVENV`).
fn test_venv() -> String {
    std::env::var("POLYGATE_TEST_PYVENV").unwrap_or_else(|_| {
        panic!("POLYGATE_TEST_PYVENV is not set: run the suite with scripts/test.sh, which creates a virtualenv with jsonschema")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn python_example_validates_json_bodies_with_jsonschema_from_a_virtualenv() {
    let pydir = libs::python_dir();
    let venv = test_venv();
    let examples = libs::test_dir("../../examples/python");
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"gateway:
  listeners: [{{addr: "127.0.0.1:0"}}]
  worker_threads: 2
  ffi_lib_path: ["{lib}"]
routes:
  - id: orders
    uri: /orders
    upstream: {{nodes: {{"{node}": 1}}}}
    plugins:
      ffi:
        lib: ffi_python3
        cfg: "venv={venv};{ex}/validate_json,init,{ex}/order.schema.json"
        include_body: true
"#,
        lib = pydir.display(),
        node = u.node(),
        ex = examples.display(),
    ));
    let p = gw.port;
    let json = [("content-type", "application/json")];
    let r = request(
        p,
        "POST",
        "/orders",
        &json,
        r#"{"item": "tea", "quantity": 3}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{} {}", r.body, gw.stderr());
    assert_eq!(
        r.seen_header("x-validated-by").as_deref(),
        Some("python-jsonschema")
    );
    assert_eq!(u.hits(), 1);

    let r = request(
        p,
        "POST",
        "/orders",
        &json,
        r#"{"item": "", "quantity": 1000, "x": 1}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let v = r.json();
    assert_eq!(v["error_msg"], "invalid request body");
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{v}");
    assert!(
        r.body.contains("1000 is greater than the maximum of 100"),
        "{}",
        r.body
    );
    assert!(
        r.body
            .contains("Additional properties are not allowed ('x' was unexpected)"),
        "{}",
        r.body
    );

    let r = request(p, "POST", "/orders", &json, "not json").await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("body is not JSON")
    );
    assert_eq!(u.hits(), 1, "invalid bodies never reach the upstream");
}
