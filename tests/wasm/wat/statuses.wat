;; Hostcall statuses with good and bad arguments, for the end-to-end tests: every status is
;; written as one character ('0' + status) and the string goes upstream in `x-statuses`.
;; Expected (proxy-wasm-cpp-host / Envoy statuses):
;;   1 key outside memory                      INVALID_MEMORY_ACCESS 6
;;   2 unknown map type                        BAD_ARGUMENT 2
;;   3 absent header                           NOT_FOUND 1
;;   4 response body buffer in request headers NOT_FOUND 1
;;   5 header name with a space                BAD_ARGUMENT 2
;;   6 header value with CR LF                 BAD_ARGUMENT 2
;;   7 unknown effective context               BAD_ARGUMENT 2
;;   8 absent shared data                      NOT_FOUND 1
;;   9 unknown queue                           NOT_FOUND 1
;;  10 callout to an unknown upstream          BAD_ARGUMENT 2
;;  11 gRPC call                               UNIMPLEMENTED 12 ('<')
;;  12 response headers in request headers     BAD_ARGUMENT 2
;;  13 :method pseudo-header                   OK 0
;;  14 property request.method                 OK 0
;;  15 unknown property                        NOT_FOUND 1
;;  16 continue an unknown stream type         BAD_ARGUMENT 2
;;  17 proxy_get_log_level                     OK 0
;;  18 callout without :path                   BAD_ARGUMENT 2
(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $eff (param i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $sget (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call"
    (func $call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call"
    (func $grpc (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $cont (param i32) (result i32)))
  (import "env" "proxy_get_log_level" (func $level (param i32) (result i32)))
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
  (data (i32.const 1024) "x-a")
  (data (i32.const 1032) "x-absent")
  (data (i32.const 1048) "bad key")
  (data (i32.const 1056) "v")
  (data (i32.const 1064) "x-ok")
  (data (i32.const 1072) "a\0d\0ab")
  (data (i32.const 1080) "nope-key")
  (data (i32.const 1096) "no-such-upstream")
  (data (i32.const 1120) "\03\00\00\00\07\00\00\00\03\00\00\00\05\00\00\00\01\00\00\00\0a\00\00\00\01\00\00\00:method\00GET\00:path\00/\00:authority\00x\00")
  (data (i32.const 1200) ":method")
  (data (i32.const 1208) "request\00method")
  (data (i32.const 1224) "nope\00thing")
  (data (i32.const 1240) "x-statuses")
  (data (i32.const 1256) "\01\00\00\00\07\00\00\00\03\00\00\00:method\00GET\00")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $st (call $get (i32.const 0) (i32.const 0xfffffff0) (i32.const 10) (i32.const 2000) (i32.const 2004)))
    (call $st (call $get (i32.const 99) (i32.const 1024) (i32.const 3) (i32.const 2000) (i32.const 2004)))
    (call $st (call $get (i32.const 0) (i32.const 1032) (i32.const 8) (i32.const 2000) (i32.const 2004)))
    (call $st (call $buf (i32.const 1) (i32.const 0) (i32.const 10) (i32.const 2000) (i32.const 2004)))
    (call $st (call $add (i32.const 0) (i32.const 1048) (i32.const 7) (i32.const 1056) (i32.const 1)))
    (call $st (call $add (i32.const 0) (i32.const 1064) (i32.const 4) (i32.const 1072) (i32.const 4)))
    (call $st (call $eff (i32.const 9999)))
    (call $st (call $sget (i32.const 1080) (i32.const 8) (i32.const 2000) (i32.const 2004) (i32.const 2008)))
    (call $st (call $deq (i32.const 12345) (i32.const 2000) (i32.const 2004)))
    (call $st (call $call (i32.const 1096) (i32.const 16) (i32.const 1120) (i32.const 61)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 2000)))
    (call $st (call $grpc (i32.const 1096) (i32.const 16) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 2000)))
    (call $st (call $get (i32.const 2) (i32.const 1024) (i32.const 3) (i32.const 2000) (i32.const 2004)))
    (call $st (call $get (i32.const 0) (i32.const 1200) (i32.const 7) (i32.const 2000) (i32.const 2004)))
    (call $st (call $prop (i32.const 1208) (i32.const 14) (i32.const 2000) (i32.const 2004)))
    (call $st (call $prop (i32.const 1224) (i32.const 10) (i32.const 2000) (i32.const 2004)))
    (call $st (call $cont (i32.const 7)))
    (call $st (call $level (i32.const 2000)))
    (call $st (call $call (i32.const 1096) (i32.const 16) (i32.const 1256) (i32.const 24)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 2000)))
    (drop (call $add (i32.const 0) (i32.const 1240) (i32.const 10) (i32.const 3000)
      (i32.sub (global.get $out) (i32.const 3000))))
    (global.set $out (i32.const 3000))
    (i32.const 0))
)
