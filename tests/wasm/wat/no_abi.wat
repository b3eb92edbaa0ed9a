;; No proxy_abi_version_* export: refused at load.
(module
  (memory (export "memory") 1)
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))
