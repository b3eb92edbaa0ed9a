;; Imports a function of an old vNEXT draft that no released ABI has: refused at load.
(module
  (import "env" "proxy_dispatch_http_call" (func (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024)))
