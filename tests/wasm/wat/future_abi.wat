;; An ABI version this host does not implement: refused at load.
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_3_0")))
