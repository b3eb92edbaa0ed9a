//! Per-request cost of the proxy-wasm host, without the network: a request context through a
//! filter's phases as the gateway runs them (`access`, `header_filter`, `log`), next to the
//! native `response-rewrite` adding the same header (`cargo bench -p polygate-wasm`).
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use polygate_core::{ConsumerIndex, Flow, Plugin, PluginFactory, RequestCtx, ResponseHead};
use polygate_model::{WasmConfig, WasmPluginDecl};

// the gateway's allocator
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn ctx() -> (RequestCtx, ResponseHead) {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("example.com"));
    h.insert("user-agent", HeaderValue::from_static("bench"));
    let ctx = RequestCtx::new(
        Method::GET,
        "/wasm?a=1",
        h,
        Version::HTTP_11,
        "127.0.0.1:5000".parse().unwrap(),
        "127.0.0.1:9080".parse().unwrap(),
        Arc::new(ConsumerIndex::default()),
    );
    let mut rh = HeaderMap::new();
    rh.insert("content-type", HeaderValue::from_static("text/plain"));
    rh.insert("content-length", HeaderValue::from_static("1024"));
    (
        ctx,
        ResponseHead {
            status: StatusCode::OK,
            headers: rh,
        },
    )
}

fn filter(file: &str) -> Arc<dyn Plugin> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let decl: WasmPluginDecl = serde_json::from_value(serde_json::json!({
        "name": "bench", "file": format!("{root}/{file}"), "priority": 1,
    }))
    .unwrap();
    let def = polygate_wasm::plugin::load_def(&decl, &WasmConfig::default()).unwrap();
    polygate_wasm::plugin::WasmFactory::new(def)
        .build(&serde_json::json!({"conf": "bench"}))
        .unwrap()
}

/// The phases of one request, as the gateway runs them.
fn run(p: &dyn Plugin, (mut cx, mut head): (RequestCtx, ResponseHead)) -> RequestCtx {
    assert!(matches!(p.access(&mut cx), Flow::Continue));
    if p.has_async_header_filter() {
        assert!(matches!(
            p.header_filter_async(&mut cx, &mut head),
            Flow::Continue
        ));
    } else {
        p.header_filter(&mut cx, &mut head);
    }
    assert!(head.headers.contains_key("x-wasm"));
    p.log(&cx);
    cx
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let wat = filter("examples/wasm/add_header.wat");
    c.bench_function("wasm add-header filter (WAT), one request", |b| {
        b.iter_batched(ctx, |x| run(&*wat, x), criterion::BatchSize::SmallInput)
    });
    let native = polygate_plugins::registry()
        .get("response-rewrite")
        .unwrap()
        .build(&serde_json::json!({"headers": {"set": {"x-wasm": "bench"}}}))
        .unwrap();
    c.bench_function(
        "response-rewrite add header (reference), one request",
        |b| b.iter_batched(ctx, |x| run(&*native, x), criterion::BatchSize::SmallInput),
    );
    c.bench_function("request context only (baseline)", |b| {
        b.iter_batched(ctx, |(cx, _)| cx, criterion::BatchSize::SmallInput)
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
