//! Export the FFI host's C functions so the Go runtime resolves them (as in the gateway).
fn main() {
    for arg in [
        "-Wl,--export-dynamic-symbol=ngx_http_lua_ffi_*",
        "-Wl,--export-dynamic-symbol=polygate_ffi_*",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
