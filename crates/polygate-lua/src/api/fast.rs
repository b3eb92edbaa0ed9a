//! The hottest `ngx` entry points as plain Lua C functions, without mlua's callback machinery
//! (lock, protected call, argument references): `ngx.var.NAME` reads and
//! `ngx.req.set_header(name, value)` with string arguments. Any other argument shape takes the
//! regular (mlua) implementation.
#![allow(unsafe_code, reason = "raw Lua C functions")]

use std::ffi::{CStr, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};

use http::{HeaderName, HeaderValue};
use mlua::ffi;

use crate::current::{with_ctx, with_ctx_mut};

/// A Lua function value for one of this module's C functions.
pub(crate) fn function(lua: &mlua::Lua, f: ffi::lua_CFunction) -> mlua::Result<mlua::Function> {
    // SAFETY: the functions of this module follow the Lua C API contract: they read only
    // checked stack slots, catch panics, and drop Rust values before raising errors
    unsafe { lua.create_c_function(f) }
}

/// Registry key of the regular `ngx.req.set_header`.
pub(crate) const SLOW_SET_HEADER: &CStr = c"polygate.set_header_slow";

/// Raises `msg` as a Lua error (nothing Rust-owned stays live across the raise).
unsafe fn raise(l: *mut ffi::lua_State, msg: String) -> ! {
    // SAFETY: `l` is the running state; the string is copied by Lua before `msg` is dropped
    unsafe { ffi::lua_pushlstring(l, msg.as_ptr().cast(), msg.len()) };
    drop(msg);
    // SAFETY: raising from a C function called by Lua is how Lua reports errors
    unsafe { ffi::lua_error(l) }
}

/// The return of a C function whose work ran under `catch_unwind`: `results` values on the
/// stack, or the error (or panic) raised as a Lua error.
pub(super) unsafe fn conclude(
    l: *mut ffi::lua_State,
    r: std::thread::Result<Result<(), String>>,
    api: &str,
    results: c_int,
) -> c_int {
    match r {
        Ok(Ok(())) => results,
        // SAFETY: `l` is the running state (the caller's contract)
        Ok(Err(msg)) => unsafe { raise(l, msg) },
        // SAFETY: as above
        Err(_) => unsafe { raise(l, format!("{api}: internal error")) },
    }
}

/// The bytes of the string at `idx` (valid while it stays on the stack).
pub(super) unsafe fn bytes<'a>(l: *mut ffi::lua_State, idx: c_int) -> Option<&'a [u8]> {
    let mut len = 0usize;
    // SAFETY: `l` is the running state and `idx` a valid stack index
    let p = unsafe { ffi::lua_tolstring(l, idx, &mut len) };
    if p.is_null() {
        return None;
    }
    // SAFETY: Lua guarantees `len` bytes at `p` while the value is on the stack
    Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// `__index` of `ngx.var`: `(table, name)` → the value or nil.
pub(crate) unsafe extern "C-unwind" fn var_index(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua with the metamethod's two arguments on the stack
    let Some(key) = (unsafe { bytes(l, 2) }) else {
        // SAFETY: `l` is the running state
        unsafe { ffi::lua_pushnil(l) };
        return 1;
    };
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let k = std::str::from_utf8(key).map_err(|_| "ngx.var: name is not UTF-8".to_owned())?;
        with_ctx("ngx.var", |ctx| {
            match super::ngx::get_var(ctx, k) {
                // SAFETY: `l` is the running state; Lua copies the bytes
                Some(v) => unsafe {
                    ffi::lua_pushlstring(l, v.as_ptr().cast(), v.len());
                },
                // SAFETY: as above
                None => unsafe { ffi::lua_pushnil(l) },
            }
            Ok(())
        })
        .map_err(|e| e.to_string())
    }));
    // SAFETY: `l` is the running state
    unsafe { conclude(l, r, "ngx.var", 1) }
}

/// `ngx.req.set_header(name, value)`: strings here, anything else in the regular version.
pub(crate) unsafe extern "C-unwind" fn set_header(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: `l` is the running state; indexes 1 and 2 are checked to be strings before use
    let args = unsafe {
        if ffi::lua_gettop(l) == 2
            && ffi::lua_type(l, 1) == ffi::LUA_TSTRING
            && ffi::lua_type(l, 2) == ffi::LUA_TSTRING
        {
            bytes(l, 1).zip(bytes(l, 2))
        } else {
            None
        }
    };
    let Some((name, value)) = args.filter(|(n, _)| !n.eq_ignore_ascii_case(b"host")) else {
        // SAFETY: calls the regular implementation (kept in the registry) with the same
        // arguments; its errors propagate as Lua errors
        unsafe {
            let nargs = ffi::lua_gettop(l);
            ffi::lua_getfield(l, ffi::LUA_REGISTRYINDEX, SLOW_SET_HEADER.as_ptr());
            ffi::lua_insert(l, 1);
            ffi::lua_call(l, nargs, 0);
        }
        return 0;
    };
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let n = HeaderName::from_bytes(name).map_err(|_| {
            format!(
                "ngx.req.set_header: invalid header name {:?}",
                String::from_utf8_lossy(name)
            )
        })?;
        let v = HeaderValue::from_bytes(value)
            .map_err(|_| format!("ngx.req.set_header: invalid value for {:?}", n.as_str()))?;
        with_ctx_mut("ngx.req.set_header", |c| {
            c.headers.insert(n, v);
            Ok(())
        })
        .map_err(|e| e.to_string())
    }));
    // SAFETY: `l` is the running state
    unsafe { conclude(l, r, "ngx.req.set_header", 0) }
}
