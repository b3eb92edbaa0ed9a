module polygate.dev/examples

go 1.22

require polygate.dev/ffi v0.0.0

require github.com/golang-jwt/jwt/v5 v5.2.1

replace polygate.dev/ffi => ../../runtimes/go
