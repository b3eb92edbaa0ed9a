//! Exports the FFI host's C functions from the `polygate` executable, so runtime libraries
//! loaded with `dlopen` (Go c-shared, Rust cdylib, C) resolve `ngx_http_lua_ffi_*` and
//! `polygate_ffi_*` against it, as they would against nginx.
fn main() {
    for arg in [
        "-Wl,--export-dynamic-symbol=ngx_http_lua_ffi_*",
        "-Wl,--export-dynamic-symbol=polygate_ffi_*",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
