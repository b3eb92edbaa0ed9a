//! polygate's Node.js loader (`runtimes/node`, built against Debian's libnode by the test
//! command) through the real gateway with 2 worker threads: one Node.js environment for the
//! process, started deterministically; plain and async handlers, `{rc, body}`, exceptions and
//! rejections with their stack, failing inits, reload with `?`, unload draining, two runtimes
//! of one module with a cfg containing commas, 1,000 concurrent calls, the transform example,
//! and SIGTERM draining with Node loaded.

use crate::python_rt::{
    call, exits_0_on_sigterm, reloads_after_an_edit, start_with_loader, thousand_concurrent_calls,
    unload_drains,
};
use crate::support::*;

fn pgtest(func: &str) -> String {
    format!("{}/pgtest.js,{func}", libs::test_dir("node").display())
}

#[tokio::test(flavor = "multi_thread")]
async fn node_sdk_handlers_errors_reload_and_concurrency() {
    let libdir = libs::node_dir();
    let tmp = tempdir::Dir::new();
    let reload_src = tmp.path().join("reloadme.js");
    let write_version = |v: u32| {
        std::fs::write(
            &reload_src,
            format!(
                "const ffi = require('polygate_ffi');\nexports.init = (cfg, tq) => ffi.serve(tq, (req) => `v{v}:${{req}}`);\n"
            ),
        )
        .unwrap();
    };
    write_version(1);
    let cfgs: Vec<(&str, String)> = vec![
        ("echo", pgtest("echo")),
        ("a", format!("{},a,with,commas", pgtest("tagged"))),
        ("b", format!("{},b", pgtest("tagged"))),
        ("async", pgtest("async")),
        ("slow", pgtest("slow")),
        ("rc", pgtest("rc")),
        ("json", pgtest("json")),
        ("raise", pgtest("raise")),
        ("reject", pgtest("reject")),
        ("fail", pgtest("fail")),
        ("boom", pgtest("boom")),
        ("task", pgtest("task")),
        ("gc", pgtest("gc")),
        ("reload", format!("{}?,init", reload_src.display())),
        ("nomod", "./no_such_module_here,init".into()),
    ];
    let mut gw = start_with_loader(&libdir, "ffi_nodejs", &cfgs, &[]);
    let p = gw.port;

    assert_eq!(call(p, "echo", "hello").await, "true hello nil\n");
    assert_eq!(call(p, "a", "x").await, "true a,with,commas:x nil\n");
    assert_eq!(call(p, "b", "x").await, "true b:x nil\n");
    assert_eq!(call(p, "async", "y").await, "true async:y nil\n");
    assert_eq!(call(p, "rc", "y").await, "false 5 five\n");
    assert_eq!(
        call(p, "json", "abc").await,
        "true {\"len\":3,\"ok\":true} nil\n"
    );
    assert_eq!(call(p, "task", "t").await, "true true false t nil\n");
    assert_eq!(call(p, "gc", "g").await, "true g:2000 nil\n");
    let r = call(p, "raise", "q").await;
    assert!(
        r.starts_with("false 1 TypeError: bad request q") && r.contains("pgtest.js"),
        "{r}"
    );
    let r = call(p, "reject", "q").await;
    assert!(r.starts_with("false 1 RangeError: async q"), "{r}");
    assert_eq!(call(p, "echo", "still").await, "true still nil\n");
    assert_eq!(call(p, "fail", "x").await, "load failed: 3\n");
    assert_eq!(call(p, "boom", "x").await, "load failed: 1\n");
    assert!(
        gw.stderr().contains("Error: init exploded"),
        "{}",
        gw.stderr()
    );
    assert_eq!(call(p, "nomod", "x").await, "load failed: 1\n");
    assert!(
        gw.stderr()
            .contains("Cannot find module './no_such_module_here'"),
        "{}",
        gw.stderr()
    );
    assert_eq!(
        gw.stderr().matches("environment started").count(),
        1,
        "one environment"
    );
    assert!(
        !gw.stderr().contains("replaced polygate's handler"),
        "Node started without its signal handling: {}",
        gw.stderr()
    );

    // `?` evicts the module from the require cache
    reloads_after_an_edit(p, write_version).await;

    unload_drains(&gw, p).await;
    thousand_concurrent_calls(p).await;

    exits_0_on_sigterm(&mut gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_example_transforms_a_json_response() {
    let libdir = libs::node_dir();
    let examples = libs::test_dir("../../examples/node");
    let u = Upstream::start("u").await;
    let gw = Gateway::start(&format!(
        r#"gateway:
  listeners: [{{addr: "127.0.0.1:0"}}]
  worker_threads: 2
  ffi_lib_path: ["{lib}"]
routes:
  - id: shaped
    uri: /api/*
    plugins:
      ffi:
        lib: ffi_nodejs
        cfg: '{ex}/transform.js,init,{{"upstream": "http://{node}", "drop": ["headers"], "rename": {{"uri": "path"}}}}'
"#,
        lib = libdir.display(),
        node = u.node(),
        ex = examples.display(),
    ));
    let p = gw.port;
    let r = get(p, "/api/items?x=1").await;
    assert_eq!(r.status, 200, "{} {}", r.body, gw.stderr());
    assert_eq!(r.header("x-transformed-by"), Some("node"));
    let v = r.json();
    assert_eq!(v["transformed_by"], "node");
    assert_eq!(v["path"], "/api/items?x=1", "{v}");
    assert!(v.get("uri").is_none() && v.get("headers").is_none(), "{v}");
    assert_eq!(u.hits(), 1);
}
