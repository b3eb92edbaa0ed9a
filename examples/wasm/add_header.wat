;; The classic proxy-wasm add-header filter, SDK-free (ABI 0.2.1): adds the response header
;; `x-wasm: <plugin configuration>` to every response. polygate loads `.wat` text as it is;
;; `wat2wasm add_header.wat` makes the binary form any proxy-wasm host loads.
(module
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (global $val (mut i32) (i32.const 0))
  (global $len (mut i32) (i32.const 0))
  (data (i32.const 1024) "x-wasm")
  (func (export "proxy_abi_version_0_2_1"))
  ;; a bump allocator: the host only allocates for the configuration, once per root context
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.const 1)))))
    (local.get $p))
  ;; keep the plugin configuration (buffer type 7) as the header value
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (drop (call $buf (i32.const 7) (i32.const 0) (local.get $size) (i32.const 2000) (i32.const 2004)))
    (global.set $val (i32.load (i32.const 2000)))
    (global.set $len (i32.load (i32.const 2004)))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 1024) (i32.const 6) (global.get $val) (global.get $len)))
    (i32.const 0))
)
