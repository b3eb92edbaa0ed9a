module polygate.dev/ffi

go 1.22
