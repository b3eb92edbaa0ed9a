//! Tests of this crate load real runtime libraries: their executables must export the host's C
//! functions, as the `polygate` binary does.
fn main() {
    for arg in [
        "-Wl,--export-dynamic-symbol=ngx_http_lua_ffi_*",
        "-Wl,--export-dynamic-symbol=polygate_ffi_*",
    ] {
        println!("cargo:rustc-link-arg-tests={arg}");
    }
}
