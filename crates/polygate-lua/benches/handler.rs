//! Cost of a Lua access handler per request, without the network: the plugin's `access` on a
//! request context, as the gateway calls it (`cargo bench -p polygate-lua`). With
//! `POLYGATE_LUA_LIMITS=off` the instruction and time limits are off, and LuaJIT's JIT on.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Version};
use polygate_core::{ConsumerIndex, Flow, PluginFactory, RequestCtx};

fn ctx() -> RequestCtx {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("example.com"));
    h.insert("user-agent", HeaderValue::from_static("bench"));
    RequestCtx::new(
        Method::GET,
        "/lua?a=1",
        h,
        Version::HTTP_11,
        "127.0.0.1:5000".parse().unwrap(),
        "127.0.0.1:9080".parse().unwrap(),
        Arc::new(ConsumerIndex::default()),
    )
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    if std::env::var("POLYGATE_LUA_LIMITS").as_deref() == Ok("off") {
        polygate_lua::vm::configure(&polygate_model::LuaConfig {
            instruction_limit: 0,
            time_limit: 0.0,
            ..Default::default()
        });
    }
    for (name, code) in [
        ("empty", ""),
        ("set_header", r#"ngx.req.set_header("X-Lua", ngx.var.uri)"#),
        // where the JIT matters: Lua-side computation
        (
            "loop1000",
            "local s = 0 for i = 1, 1000 do s = s + i % 7 end ngx.ctx.s = s",
        ),
    ] {
        let plugin = polygate_lua::plugins::LuaFactory
            .build(&serde_json::json!({"access": code}))
            .unwrap();
        c.bench_function(&format!("lua access {name}"), |b| {
            b.iter_batched(
                ctx,
                |mut cx| {
                    assert!(matches!(plugin.access(&mut cx), Flow::Continue));
                    cx
                },
                // contexts are dropped per batch; each may hold an `ngx.ctx` table reference,
                // and a Lua state takes about 8000 references at a time
                criterion::BatchSize::NumIterations(256),
            )
        });
    }
    let plugin = polygate_plugins::registry()
        .get("proxy-rewrite")
        .unwrap()
        .build(&serde_json::json!({"headers": {"set": {"X-Lua": "$uri"}}}))
        .unwrap();
    c.bench_function("proxy-rewrite set header (reference)", |b| {
        b.iter_batched(
            ctx,
            |mut cx| {
                let _ = plugin.rewrite(&mut cx);
                cx
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
