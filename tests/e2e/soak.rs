//! One process, every runtime: Go, Rust, Python, Java and Node.js runtimes and a Lua handler
//! loaded together in one gateway with 2 worker threads, under concurrent load for 60 s
//! (`POLYGATE_SOAK_SECS`) with handlers that allocate enough to keep each garbage collector busy;
//! no crash, no lost or mismatched answer; then a stop signal drains the requests in flight and
//! the process exits 0 within the grace period.
//!
//! These run on their own after the rest of the suite (`--ignored`, one at a time): under
//! parallel tests on a 2-core machine they would slow every other test down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;

fn soak_secs() -> u64 {
    std::env::var("POLYGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

fn route(id: &str, code: &str) -> String {
    let body: String = code.lines().map(|l| format!("          {l}\n")).collect();
    format!("  - id: {id}\n    uri: /{id}\n    plugins:\n      lua:\n        access: |\n{body}")
}

fn call_route(id: &str, lib: &str, cfg: &str, opts: &str) -> String {
    route(
        id,
        &format!(
            r#"local rt, err = ngx.load_ffi("{lib}", {cfg}, {opts})
if not rt then ngx.say("load failed: ", tostring(err)) return ngx.exit(200) end
local ok, res = rt:call(ngx.var.arg_req)
ngx.say(tostring(ok), " ", tostring(res))
return ngx.exit(200)"#
        ),
    )
}

/// What each route answers for request `req`.
fn expected(id: &str, req: &str) -> String {
    match id {
        "go" | "rust" => format!("true {req}\n"),
        "python" | "node" => format!("true {req}:2000\n"),
        "java" => format!("true 200:{req}\n"),
        "lua" => format!("lua {req} 1000\n"),
        _ => unreachable!(),
    }
}

async fn soak_then_stop(sig: &str) {
    let go = libs::go("echo");
    let rust = libs::rust_echo();
    let py = libs::python_dir();
    let java = libs::java_dir();
    let node = libs::node_dir();
    let cp = libs::java_classpath();
    let pyt = libs::test_dir("python");
    let nodet = libs::test_dir("node");
    let mut routes = String::from("routes:\n");
    routes += &call_route("go", &go.display().to_string(), "nil", "nil");
    routes += &call_route("rust", &rust.display().to_string(), "nil", "nil");
    routes += &call_route(
        "python",
        "ffi_python3",
        &format!("\"{}/pgtest,init_gc\"", pyt.display()),
        "nil",
    );
    routes += &call_route("java", "ffi_java", "\"pgtest.Runtimes,gc\"", "nil");
    routes += &call_route(
        "node",
        "ffi_nodejs",
        &format!("\"{}/pgtest.js,gc\"", nodet.display()),
        "nil",
    );
    routes += &route(
        "lua",
        r#"local t = {}
for i = 1, 1000 do t[i] = {i = i, s = tostring(i) .. "x"} end
ngx.say("lua ", ngx.var.arg_req, " ", #t)
return ngx.exit(200)"#,
    );
    routes += SLOW_ROUTE;
    // a proxy-wasm filter that traps (unreachable, out-of-bounds loads) on demand: wasmtime's
    // signal handlers next to Go's, the JVM's and Node's
    let up = Upstream::start("u").await;
    routes += &format!(
        "  - {{id: wasm, uri: /wasm, upstream: {{nodes: {{\"{}\": 1}}}}, plugins: {{trap: {{conf: x}}}}}}\n",
        up.node()
    );
    let trap = libs::wat("trap");
    let mut gw = Gateway::start_env(
        &format!(
            "gateway:\n  listeners: [{{addr: \"127.0.0.1:0\"}}]\n  worker_threads: 2\n  ffi_lib_path: [\"{}\", \"{}\", \"{}\"]\n  timeouts: {{graceful_shutdown: 10}}\n  lua: {{time_limit: 2}}\n  wasm: {{plugins: [{{name: trap, file: \"{}\", priority: 1}}]}}\n{routes}",
            py.display(),
            java.display(),
            node.display(),
            trap.display()
        ),
        &[("CLASSPATH", &cp)],
    );
    let p = gw.port;
    let ids = ["go", "rust", "python", "java", "node", "lua"];
    // every runtime loaded before the clock starts
    for id in ids {
        let r = get(p, &format!("/{id}?req=warm")).await;
        assert_eq!(r.body, expected(id, "warm"), "{id}: {}", gw.stderr());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(soak_secs());
    let clients: Vec<_> = (0..24)
        .map(|c| {
            let (stop, done) = (stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut conn = Conn::open(p).await;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let id = ids[(c + n) % ids.len()];
                    let req = format!("c{c}n{n}");
                    let r = conn.get(&format!("/{id}?req={req}")).await;
                    if r.status != 200 || r.body != expected(id, &req) {
                        stop.store(true, Ordering::Relaxed);
                        return Err(format!("{id} {req}: {} {:?}", r.status, r.body));
                    }
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let traps = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let (h, want) = match n % 3 {
                    0 => ("x-trap", 500),
                    1 => ("x-oob", 500),
                    _ => ("x-none", 200),
                };
                let r = get_h(p, "/wasm", &[(h, "1")]).await;
                if r.status != want {
                    stop.store(true, Ordering::Relaxed);
                    return Err(format!("wasm {h}: {} {:?}", r.status, r.body));
                }
                n += 1;
            }
            Ok(n)
        })
    };
    let trapped = traps.await.unwrap();
    for c in clients {
        if let Err(e) = c.await.unwrap() {
            let err = gw.stderr();
            let tail: Vec<&str> = err.lines().rev().take(40).collect();
            panic!(
                "{e}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    let total = done.load(Ordering::Relaxed);
    assert!(total > 1000, "only {total} requests in {} s", soak_secs());
    let trapped = trapped.unwrap_or_else(|e| panic!("{e}\n{}", gw.stderr()));
    assert!(trapped > 30, "only {trapped} wasm requests");

    // requests in flight when the signal comes are drained
    let took = stop_drains(&mut gw, sig, 4).await;
    eprintln!(
        "soak with {sig}: {total} requests in {} s, exit 0 after {:?}",
        soak_secs(),
        took
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: scripts/test.sh runs it after the suite"]
async fn soak_every_runtime_in_one_process_then_sigterm() {
    soak_then_stop("TERM").await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: scripts/test.sh runs it after the suite"]
async fn soak_every_runtime_in_one_process_then_sigint() {
    soak_then_stop("INT").await;
}
