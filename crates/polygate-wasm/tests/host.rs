//! Host functions driven through the plugin API on a request context, without the gateway:
//! cpp-host's buffer rules (`Buffer::copyFrom`), pseudo-header edits and their validation,
//! property encodings. Each WAT guest records statuses in a request header.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Version};
use polygate_core::{ConsumerIndex, Flow, Plugin, PluginFactory, RequestCtx};
use polygate_model::{WasmConfig, WasmPluginDecl};

fn ctx(body: Option<&'static str>) -> RequestCtx {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("example.com"));
    let mut c = RequestCtx::new(
        Method::POST,
        "/p?q=1",
        h,
        Version::HTTP_11,
        "127.0.0.1:5000".parse().unwrap(),
        "127.0.0.1:9080".parse().unwrap(),
        Arc::new(ConsumerIndex::default()),
    );
    c.body = body.map(|b| Bytes::from_static(b.as_bytes()));
    c
}

fn plugin(name: &str, wat: &str) -> Arc<dyn Plugin> {
    let dir = std::env::temp_dir().join(format!("polygate-wasm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.wat"));
    std::fs::write(&file, wat).unwrap();
    let decl: WasmPluginDecl = serde_json::from_value(serde_json::json!({
        "name": name, "file": file, "priority": 1,
    }))
    .unwrap();
    let def = polygate_wasm::plugin::load_def(&decl, &WasmConfig::default()).unwrap();
    polygate_wasm::plugin::WasmFactory::new(def)
        .build(&serde_json::json!({"conf": "c"}))
        .unwrap()
}

/// Common module text: imports, memory, a bump allocator, a status recorder writing
/// `'0' + status` at `$out`, and `$flush` adding the recorded string as `x-st`.
const PRELUDE: &str = r#"
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $rep (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $out (mut i32) (i32.const 3000))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func $st (param $s i32)
    (i32.store8 (global.get $out) (i32.add (i32.const 48) (local.get $s)))
    (global.set $out (i32.add (global.get $out) (i32.const 1))))
  (data (i32.const 1000) "x-st")
  (func $flush
    (drop (call $add (i32.const 0) (i32.const 1000) (i32.const 4) (i32.const 3000)
      (i32.sub (global.get $out) (i32.const 3000))))
    (global.set $out (i32.const 3000)))
"#;

fn module(body: &str) -> String {
    format!("(module {PRELUDE} {body})")
}

fn st(c: &RequestCtx) -> &str {
    c.headers.get("x-st").unwrap().to_str().unwrap()
}

/// proxy-wasm-cpp-host's `Buffer::copyFrom`: start 0 drains `size` bytes and prepends, a start
/// at or past the end appends, anything else is BAD_ARGUMENT; reads are clamped.
#[test]
fn buffer_rules_follow_cpp_host() {
    let p = plugin(
        "buffers",
        &module(
            r#"
  (data (i32.const 1100) "A")
  (data (i32.const 1104) "Z")
  (data (i32.const 1108) "x")
  (data (i32.const 1112) "B")
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    ;; prepend: "hello" -> "Ahello"
    (call $st (call $set (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1100) (i32.const 1)))
    ;; append past the end: -> "AhelloZ"
    (call $st (call $set (i32.const 0) (i32.const 100) (i32.const 0) (i32.const 1104) (i32.const 1)))
    ;; a start inside the buffer: refused
    (call $st (call $set (i32.const 0) (i32.const 2) (i32.const 1) (i32.const 1108) (i32.const 1)))
    ;; drain 3 ("Ahe") and prepend: -> "BlloZ"
    (call $st (call $set (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 1112) (i32.const 1)))
    ;; a read past the end is clamped: OK with nothing
    (call $st (call $get (i32.const 0) (i32.const 50) (i32.const 10) (i32.const 2000) (i32.const 2004)))
    (call $st (i32.load (i32.const 2004)))
    ;; the response body is not there in a request callback
    (call $st (call $set (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 1100) (i32.const 1)))
    (call $flush)
    (i32.const 0))
"#,
        ),
    );
    let mut c = ctx(Some("hello"));
    assert!(matches!(p.access(&mut c), Flow::Continue));
    assert_eq!(c.body.as_deref(), Some(&b"BlloZ"[..]));
    assert_eq!(st(&c), "0020001");
    p.log(&c);
}

/// Pseudo-headers: `:path`, `:method` and `:authority` change what goes upstream; values that
/// are not valid request-line or header bytes are refused (BAD_ARGUMENT), leaving the request
/// as it was.
#[test]
fn pseudo_header_edits_are_validated() {
    let p = plugin(
        "pseudo",
        &module(
            r#"
  (data (i32.const 1100) ":path")
  (data (i32.const 1108) "/new?x=1")
  (data (i32.const 1120) "/a b")
  (data (i32.const 1128) ":method")
  (data (i32.const 1136) "PUT")
  (data (i32.const 1140) "get")
  (data (i32.const 1144) ":authority")
  (data (i32.const 1156) "up.example")
  (data (i32.const 1168) ":scheme")
  (data (i32.const 1176) "x-ok")
  (data (i32.const 1184) "a\0ab")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $rep (i32.const 0) (i32.const 1100) (i32.const 5) (i32.const 1108) (i32.const 8)))
    (call $st (call $rep (i32.const 0) (i32.const 1100) (i32.const 5) (i32.const 1120) (i32.const 4)))
    (call $st (call $rep (i32.const 0) (i32.const 1128) (i32.const 7) (i32.const 1136) (i32.const 3)))
    (call $st (call $rep (i32.const 0) (i32.const 1128) (i32.const 7) (i32.const 1140) (i32.const 3)))
    (call $st (call $rep (i32.const 0) (i32.const 1144) (i32.const 10) (i32.const 1156) (i32.const 10)))
    (call $st (call $rep (i32.const 0) (i32.const 1168) (i32.const 7) (i32.const 1136) (i32.const 3)))
    (call $st (call $add (i32.const 0) (i32.const 1176) (i32.const 4) (i32.const 1184) (i32.const 3)))
    (call $flush)
    (i32.const 0))
"#,
        ),
    );
    let mut c = ctx(None);
    assert!(matches!(p.access(&mut c), Flow::Continue));
    assert_eq!(st(&c), "0202022");
    assert_eq!(c.upstream_uri(), "/new?x=1");
    assert_eq!(c.method, Method::PUT);
    assert_eq!(c.headers.get("host").unwrap(), "up.example");
    assert!(c.headers.get("x-ok").is_none());
    p.log(&c);
}

/// Property encodings as Envoy's: strings raw, integers as 8 bytes little-endian.
#[test]
fn property_encodings() {
    let p = plugin(
        "props",
        &module(
            r#"
  (data (i32.const 1100) "source\00port")
  (data (i32.const 1116) "request\00url_path")
  (data (i32.const 1136) "x-path")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $prop (i32.const 1100) (i32.const 11) (i32.const 2000) (i32.const 2004)))
    ;; 8 bytes, little-endian 5000 = 0x1388
    (call $st (i32.load (i32.const 2004)))
    (call $st (i32.eq (i32.load (i32.load (i32.const 2000))) (i32.const 5000)))
    (call $st (call $prop (i32.const 1116) (i32.const 16) (i32.const 2008) (i32.const 2012)))
    (drop (call $add (i32.const 0) (i32.const 1136) (i32.const 6)
      (i32.load (i32.const 2008)) (i32.load (i32.const 2012))))
    (call $flush)
    (i32.const 0))
"#,
        ),
    );
    let mut c = ctx(None);
    assert!(matches!(p.access(&mut c), Flow::Continue));
    assert_eq!(st(&c), "0810");
    assert_eq!(c.headers.get("x-path").unwrap(), "/p");
    p.log(&c);
}
