;; Exports no memory: refused at load.
(module
  (memory 1)
  (func (export "proxy_abi_version_0_2_1")))
