//! polygate's FFI runtime host.
//!
//! Code in Go, Rust, Python, Java and Node.js runs inside the gateway through the lua-resty-ffi
//! C ABI: a runtime library exports `int libffi_init(char *cfg, void *tq)`, pulls tasks with
//! `ngx_http_lua_ffi_task_poll`, reads them with `ngx_http_lua_ffi_get_req` and answers with
//! `ngx_http_lua_ffi_respond`, from any thread. Existing lua-resty-ffi runtimes load unchanged.
//!
//! What polygate adds (see `include/polygate_ffi.h`): timeouts, cancellation visible to the
//! runtime, bounded queues and in-flight counts that fail fast, batch polling, several pollers
//! per queue, explicit-length responses with a caller-chosen deallocator, logging, an ABI
//! version, and process-wide runtimes.
//!
//! - [`queue`]: tasks and queues (safe code).
//! - [`done`]: per-worker done queues that fold many answers into one wake-up.
//! - [`abi`]: the exported C functions (unsafe, every entry point guarded against panics).
//! - [`runtime`]: loading libraries, the process-wide registry, [`runtime::Runtime::call`].
//! - [`plugin`]: the `ffi` gateway plugin.
//! - [`loader`]: the loading thread (every `dlopen` and `libffi_init` of the process).
//! - [`signals`]: stop signals kept polygate's whatever runtimes install.
//! - [`elf`]: reading a library's exports without loading it (configuration checks).
#![deny(unsafe_code)]

pub mod abi;
pub mod done;
pub mod elf;
pub mod loader;
pub mod notify;
pub mod plugin;
pub mod queue;
pub mod runtime;
pub mod signals;

pub use runtime::{CallError, FfiHost, LoadError, LoadOptions, PendingCall, Runtime, host};

/// Linker flags that export the host's C functions from an executable so `dlopen`ed runtime
/// libraries resolve them (use from a build script with `cargo:rustc-link-arg-bins=`).
pub const EXPORT_LINK_ARGS: [&str; 2] = [
    "-Wl,--export-dynamic-symbol=ngx_http_lua_ffi_*",
    "-Wl,--export-dynamic-symbol=polygate_ffi_*",
];
