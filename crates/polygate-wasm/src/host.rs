//! The host functions (module `env`, plus the WASI subset guests import), registered on one
//! linker per plugin. Statuses follow proxy-wasm-cpp-host: every guest pointer is
//! bounds-checked (a bad one is `INVALID_MEMORY_ACCESS`, not a trap), returned data is
//! allocated in the guest by its allocator (never called with 0: empty data is ptr 0, size 0).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use polygate_core::callout::CalloutRequest;
use wasmtime::{Caller, FuncType, Linker, Module, Val, ValType};

use crate::abi::{buffer, decode_pairs, encode_pairs, map, status, stream};
use crate::error::LoadError;
use crate::shared;
use crate::state::{HostState, LocalReply, PendingCall};

type C<'a> = Caller<'a, HostState>;
type R = wasmtime::Result<i32>;

/// `Ok(status)` out of a `Result<_, i32>`.
macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(s) => return Ok(s),
        }
    };
}

fn span(ptr: i32, len: i32) -> Option<(usize, usize)> {
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    Some((p, p.checked_add(l)?))
}

/// Copies guest bytes out.
fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, i32> {
    let mem = c.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    let (a, b) = span(ptr, len).ok_or(status::INVALID_MEMORY_ACCESS)?;
    mem.data(&c)
        .get(a..b)
        .map(<[u8]>::to_vec)
        .ok_or(status::INVALID_MEMORY_ACCESS)
}

fn write(c: &mut C<'_>, ptr: i32, data: &[u8]) -> Result<(), i32> {
    let mem = c.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    mem.write(c, ptr as u32 as usize, data)
        .map_err(|_| status::INVALID_MEMORY_ACCESS)
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> Result<(), i32> {
    write(c, ptr, &v.to_le_bytes())
}

/// Hands `data` to the guest: allocated with its allocator, pointer and size written to
/// `ret_ptr` and `ret_len`. A trap inside the allocator is the caller's trap.
fn give(c: &mut C<'_>, data: &[u8], ret_ptr: i32, ret_len: i32) -> R {
    if data.is_empty() {
        tri!(write_u32(c, ret_ptr, 0));
        tri!(write_u32(c, ret_len, 0));
        return Ok(status::OK);
    }
    let Some(alloc) = c.data().alloc.clone() else {
        return Ok(status::INTERNAL_FAILURE);
    };
    let was = std::mem::replace(&mut c.data_mut().starting, true);
    let p = alloc.call(&mut *c, data.len() as i32);
    c.data_mut().starting = was;
    let p = p?;
    if p == 0 {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    tri!(write(c, p, data));
    tri!(write_u32(c, ret_ptr, p as u32));
    tri!(write_u32(c, ret_len, data.len() as u32));
    Ok(status::OK)
}

fn lower(k: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if k.iter().any(u8::is_ascii_uppercase) {
        std::borrow::Cow::Owned(k.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(k)
    }
}

/// Runs `f` on the guest bytes `ptr..ptr+len` and the host state together (no copy).
fn with_bytes<T>(
    c: &mut C<'_>,
    ptr: i32,
    len: i32,
    f: impl FnOnce(&[u8], &mut HostState) -> T,
) -> Result<T, i32> {
    let mem = c.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    let (a, b) = span(ptr, len).ok_or(status::INVALID_MEMORY_ACCESS)?;
    let (data, state) = mem.data_and_store_mut(c);
    let bytes = data.get(a..b).ok_or(status::INVALID_MEMORY_ACCESS)?;
    Ok(f(bytes, state))
}

/// Like [`with_bytes`] for two guest byte ranges.
fn with_two<T>(
    c: &mut C<'_>,
    (p1, n1): (i32, i32),
    (p2, n2): (i32, i32),
    f: impl FnOnce(&[u8], &[u8], &mut HostState) -> T,
) -> Result<T, i32> {
    let mem = c.data().memory.ok_or(status::INTERNAL_FAILURE)?;
    let (a1, b1) = span(p1, n1).ok_or(status::INVALID_MEMORY_ACCESS)?;
    let (a2, b2) = span(p2, n2).ok_or(status::INVALID_MEMORY_ACCESS)?;
    let (data, state) = mem.data_and_store_mut(c);
    let x = data.get(a1..b1).ok_or(status::INVALID_MEMORY_ACCESS)?;
    let y = data.get(a2..b2).ok_or(status::INVALID_MEMORY_ACCESS)?;
    Ok(f(x, y, state))
}

/// The serialised pairs of a map, pseudo-headers first.
fn map_pairs(s: &mut HostState, map_type: i32) -> Result<Vec<u8>, i32> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    match map_type {
        map::HTTP_REQUEST_HEADERS => {
            let r = s.view.req().ok_or(status::BAD_ARGUMENT)?;
            for (k, v) in request_pseudo(r) {
                pairs.push((k.as_bytes().to_vec(), v));
            }
            push_headers(&mut pairs, &r.headers);
        }
        map::HTTP_RESPONSE_HEADERS => {
            let r = s.view.resp().ok_or(status::BAD_ARGUMENT)?;
            pairs.push((b":status".to_vec(), r.status.as_str().as_bytes().to_vec()));
            push_headers(&mut pairs, &r.headers);
        }
        map::HTTP_REQUEST_TRAILERS | map::HTTP_RESPONSE_TRAILERS => {
            // outside a trailers callback: an empty map while there is a request
            let has_req = s.view.req().is_some();
            match s.view.trailers(map_type) {
                Some(t) => push_headers(&mut pairs, t),
                None if has_req => {}
                None => return Err(status::BAD_ARGUMENT),
            }
        }
        map::HTTP_CALL_RESPONSE_HEADERS | map::HTTP_CALL_RESPONSE_TRAILERS => {
            let call = s.call.clone().ok_or(status::BAD_ARGUMENT)?;
            if let Ok(resp) = &*call {
                if map_type == map::HTTP_CALL_RESPONSE_HEADERS {
                    pairs.push((
                        b":status".to_vec(),
                        resp.status.as_str().as_bytes().to_vec(),
                    ));
                    push_headers(&mut pairs, &resp.headers);
                } else {
                    push_headers(&mut pairs, &resp.trailers);
                }
            }
        }
        _ => return Err(status::BAD_ARGUMENT),
    }
    Ok(encode_pairs(
        pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
    ))
}

fn push_headers(out: &mut Vec<(Vec<u8>, Vec<u8>)>, h: &HeaderMap) {
    for (k, v) in h {
        out.push((k.as_str().as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
}

fn request_pseudo(r: &polygate_core::RequestCtx) -> [(&'static str, Vec<u8>); 4] {
    let authority = r
        .headers
        .get(http::header::HOST)
        .map(|h| h.as_bytes().to_vec())
        .unwrap_or_default();
    [
        (":method", r.method.as_str().as_bytes().to_vec()),
        (":path", r.upstream_uri().as_bytes().to_vec()),
        (":authority", authority),
        (":scheme", r.scheme.as_bytes().to_vec()),
    ]
}

/// All values of `key` joined with ", " (safer for checks than Envoy's first value only).
fn joined(h: &HeaderMap, key: &[u8]) -> Option<Vec<u8>> {
    let name = HeaderName::from_bytes(key).ok()?;
    let mut it = h.get_all(&name).iter();
    let mut out = it.next()?.as_bytes().to_vec();
    for v in it {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

fn map_value(s: &mut HostState, map_type: i32, key: &[u8]) -> Result<Option<Vec<u8>>, i32> {
    let key = lower(key);
    let key: &[u8] = &key;
    match map_type {
        map::HTTP_REQUEST_HEADERS => {
            let r = s.view.req().ok_or(status::BAD_ARGUMENT)?;
            if key.first() == Some(&b':') {
                return Ok(request_pseudo(r)
                    .into_iter()
                    .find(|(k, _)| k.as_bytes() == key)
                    .map(|(_, v)| v));
            }
            Ok(joined(&r.headers, key))
        }
        map::HTTP_RESPONSE_HEADERS => {
            let r = s.view.resp().ok_or(status::BAD_ARGUMENT)?;
            if key == b":status" {
                return Ok(Some(r.status.as_str().as_bytes().to_vec()));
            }
            Ok(joined(&r.headers, key))
        }
        map::HTTP_REQUEST_TRAILERS | map::HTTP_RESPONSE_TRAILERS => {
            let has_req = s.view.req().is_some();
            match s.view.trailers(map_type) {
                Some(t) => Ok(joined(t, key)),
                None if has_req => Ok(None),
                None => Err(status::BAD_ARGUMENT),
            }
        }
        map::HTTP_CALL_RESPONSE_HEADERS | map::HTTP_CALL_RESPONSE_TRAILERS => {
            let call = s.call.clone().ok_or(status::BAD_ARGUMENT)?;
            let Ok(resp) = &*call else { return Ok(None) };
            if map_type == map::HTTP_CALL_RESPONSE_TRAILERS {
                return Ok(joined(&resp.trailers, key));
            }
            if key == b":status" {
                return Ok(Some(resp.status.as_str().as_bytes().to_vec()));
            }
            Ok(joined(&resp.headers, key))
        }
        _ => Err(status::BAD_ARGUMENT),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Edit {
    Add,
    Replace,
    Remove,
}

fn name_value(key: &[u8], value: &[u8]) -> Result<(HeaderName, HeaderValue), i32> {
    let name = HeaderName::from_bytes(key).map_err(|_| status::BAD_ARGUMENT)?;
    let value = HeaderValue::from_bytes(value).map_err(|_| status::BAD_ARGUMENT)?;
    Ok((name, value))
}

/// Changes a pseudo-header of the request: `:path` (the target sent upstream), `:method`,
/// `:authority` (the `Host` header); `:scheme` cannot change.
fn edit_request_pseudo(
    r: &mut polygate_core::RequestCtx,
    key: &[u8],
    value: &[u8],
    edit: Edit,
) -> Result<(), i32> {
    if edit == Edit::Remove {
        return Ok(());
    }
    let v = std::str::from_utf8(value).map_err(|_| status::BAD_ARGUMENT)?;
    match key {
        b":path" => {
            if !v.starts_with('/') || v.bytes().any(|b| b <= 0x20 || b == 0x7f) {
                return Err(status::BAD_ARGUMENT);
            }
            r.upstream_target = Some(v.to_owned());
        }
        b":method" => {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
            {
                return Err(status::BAD_ARGUMENT);
            }
            r.method = Method::from_bytes(value).map_err(|_| status::BAD_ARGUMENT)?;
        }
        b":authority" => {
            let hv = HeaderValue::from_bytes(value).map_err(|_| status::BAD_ARGUMENT)?;
            r.headers.insert(http::header::HOST, hv.clone());
            r.upstream_host = Some(hv);
        }
        _ => return Err(status::BAD_ARGUMENT),
    }
    Ok(())
}

fn edit_headers(h: &mut HeaderMap, key: &[u8], value: &[u8], edit: Edit) -> Result<(), i32> {
    match edit {
        Edit::Remove => {
            let name = HeaderName::from_bytes(key).map_err(|_| status::BAD_ARGUMENT)?;
            h.remove(&name);
        }
        Edit::Add => {
            let (n, v) = name_value(key, value)?;
            h.append(n, v);
        }
        Edit::Replace => {
            let (n, v) = name_value(key, value)?;
            h.insert(n, v);
        }
    }
    Ok(())
}

fn edit_map(s: &mut HostState, map_type: i32, key: &[u8], value: &[u8], edit: Edit) -> i32 {
    let key = lower(key);
    let key: &[u8] = &key;
    let r = match map_type {
        map::HTTP_REQUEST_HEADERS => match s.view.req_mut() {
            None => Err(status::BAD_ARGUMENT),
            Some(r) if key.first() == Some(&b':') => edit_request_pseudo(r, key, value, edit),
            Some(r) => edit_headers(&mut r.headers, key, value, edit),
        },
        map::HTTP_RESPONSE_HEADERS => match s.view.resp() {
            None => Err(status::BAD_ARGUMENT),
            Some(r) if key == b":status" => match edit {
                Edit::Remove => Ok(()),
                _ => std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u16>().ok())
                    .filter(|c| (100..=599).contains(c))
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .map(|c| r.status = c)
                    .ok_or(status::BAD_ARGUMENT),
            },
            Some(_) if key.first() == Some(&b':') => Err(status::BAD_ARGUMENT),
            Some(r) => edit_headers(&mut r.headers, key, value, edit),
        },
        map::HTTP_REQUEST_TRAILERS | map::HTTP_RESPONSE_TRAILERS => {
            match s.view.trailers(map_type) {
                Some(_) if key.first() == Some(&b':') => Err(status::BAD_ARGUMENT),
                Some(t) => edit_headers(t, key, value, edit),
                None => Err(status::BAD_ARGUMENT),
            }
        }
        _ => Err(status::BAD_ARGUMENT),
    };
    match r {
        Ok(()) => status::OK,
        Err(e) => e,
    }
}

fn set_pairs(s: &mut HostState, map_type: i32, data: &[u8]) -> i32 {
    let Ok(pairs) = decode_pairs(data) else {
        return status::BAD_ARGUMENT;
    };
    let mut fresh = HeaderMap::new();
    let mut pseudo = Vec::new();
    for (k, v) in &pairs {
        let k = lower(k);
        if k.first() == Some(&b':') {
            pseudo.push((k, v.to_vec()));
            continue;
        }
        if edit_headers(&mut fresh, &k, v, Edit::Add).is_err() {
            return status::BAD_ARGUMENT;
        }
    }
    match map_type {
        map::HTTP_REQUEST_HEADERS => {
            let Some(r) = s.view.req_mut() else {
                return status::BAD_ARGUMENT;
            };
            for (k, v) in &pseudo {
                if edit_request_pseudo(r, k, v, Edit::Replace).is_err() {
                    return status::BAD_ARGUMENT;
                }
            }
            r.headers = fresh;
        }
        map::HTTP_RESPONSE_HEADERS => {
            let Some(r) = s.view.resp() else {
                return status::BAD_ARGUMENT;
            };
            r.headers = fresh;
            for (k, v) in &pseudo {
                if **k == *b":status" && edit_map(s, map_type, k, v, Edit::Replace) != status::OK {
                    return status::BAD_ARGUMENT;
                }
            }
        }
        map::HTTP_REQUEST_TRAILERS | map::HTTP_RESPONSE_TRAILERS => {
            let Some(t) = s.view.trailers(map_type) else {
                return status::BAD_ARGUMENT;
            };
            if !pseudo.is_empty() {
                return status::BAD_ARGUMENT;
            }
            *t = fresh;
        }
        _ => return status::BAD_ARGUMENT,
    }
    status::OK
}

/// The bytes of a buffer, if available in the current callback.
fn buffer_bytes(s: &HostState, t: i32) -> Result<Bytes, i32> {
    match t {
        buffer::HTTP_REQUEST_BODY | buffer::HTTP_RESPONSE_BODY => match &s.body {
            Some((bt, b)) if *bt == t => Ok(Bytes::copy_from_slice(b)),
            _ => Err(status::NOT_FOUND),
        },
        buffer::HTTP_CALL_RESPONSE_BODY => match s.call.as_deref() {
            Some(Ok(r)) => Ok(r.body.clone()),
            Some(Err(_)) => Ok(Bytes::new()),
            None => Err(status::NOT_FOUND),
        },
        buffer::VM_CONFIGURATION | buffer::PLUGIN_CONFIGURATION => match &s.config {
            Some((bt, b)) if *bt == t => Ok(b.clone()),
            _ => Err(status::NOT_FOUND),
        },
        buffer::DOWNSTREAM_DATA
        | buffer::UPSTREAM_DATA
        | buffer::GRPC_CALL_MESSAGE
        | buffer::CALL_DATA => Err(status::NOT_FOUND),
        _ => Err(status::BAD_ARGUMENT),
    }
}

fn log_guest(s: &HostState, level: i32, msg: &str) {
    let name = &*s.def.name;
    match level {
        0 => tracing::trace!(wasm = name, "{msg}"),
        1 => tracing::debug!(wasm = name, "{msg}"),
        2 => tracing::info!(wasm = name, "{msg}"),
        3 => tracing::warn!(wasm = name, "{msg}"),
        _ => tracing::error!(wasm = name, "{msg}"),
    }
}

/// The effective log level for `proxy_get_log_level`, from what `tracing` lets through.
fn log_level() -> i32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        LevelFilter::ERROR => 4,
        _ => 5,
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Refuses a hostcall while start-up code or the allocator runs (cpp-host allows only
/// logging and WASI basics there).
macro_rules! not_starting {
    ($c:expr) => {
        if $c.data().starting {
            return Ok(status::BAD_ARGUMENT);
        }
    };
}

/// Builds the linker for `module`: every proxy-wasm host function of ABI 0.1.0 and 0.2.x
/// (their names do not collide), the WASI functions guests import, and a refusal of any
/// other import, naming it.
pub fn linker(module: &Module) -> Result<Linker<HostState>, LoadError> {
    let engine = module.engine();
    let mut l: Linker<HostState> = Linker::new(engine);
    add_env(&mut l).map_err(|e| LoadError::Link(format!("{e:#}")))?;
    for wasi in ["wasi_snapshot_preview1", "wasi_unstable"] {
        add_wasi(&mut l, wasi).map_err(|e| LoadError::Link(format!("{e:#}")))?;
    }
    for imp in module.imports() {
        let m = imp.module();
        if m == "env" && !ENV_FUNCTIONS.contains(&imp.name()) {
            return Err(LoadError::UnknownImport(format!("env.{}", imp.name())));
        }
        if m != "env" && m != "wasi_snapshot_preview1" && m != "wasi_unstable" {
            return Err(LoadError::UnknownImport(format!("{m}.{}", imp.name())));
        }
    }
    // other WASI functions (Go guests import many they never call) trap if called
    l.define_unknown_imports_as_traps(module)
        .map_err(|e| LoadError::Link(format!("{e:#}")))?;
    Ok(l)
}

/// Every `env` function this host provides (ABI 0.1.0 and 0.2.x).
pub const ENV_FUNCTIONS: &[&str] = &[
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_get_configuration",
    "proxy_get_status",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_call_foreign_function",
];

fn add_env(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // ---- contexts
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: C<'_>, id: i32| -> R {
            let id = id as u32;
            let s = c.data_mut();
            if s.roots.contains_key(&id) || s.streams.contains_key(&id) {
                s.effective = id;
                Ok(status::OK)
            } else {
                Ok(status::BAD_ARGUMENT)
            }
        },
    )?;
    l.func_wrap("env", "proxy_done", |mut c: C<'_>| -> R {
        match c.data_mut().target_stream() {
            Some(st) => {
                st.done_requested = true;
                Ok(status::OK)
            }
            None => Ok(status::NOT_FOUND),
        }
    })?;
    // ---- logging and time
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, p: i32, n: i32| -> R {
            let msg = tri!(read(&mut c, p, n));
            log_guest(c.data(), level, &String::from_utf8_lossy(&msg));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: C<'_>, ret: i32| -> R {
            tri!(write_u32(&mut c, ret, log_level() as u32));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| -> R {
            tri!(write(&mut c, ret, &now_ns().to_le_bytes()));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: C<'_>, ms: i32| -> R {
            not_starting!(c);
            let s = c.data_mut();
            let root = s.effective_root();
            match s.roots.get_mut(&root) {
                Some(r) => {
                    r.tick_ms = ms as u32;
                    Ok(status::OK)
                }
                None => Ok(status::BAD_ARGUMENT),
            }
        },
    )?;
    // ---- buffers
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, max: i32, rp: i32, rn: i32| -> R {
            not_starting!(c);
            let b = tri!(buffer_bytes(c.data(), t));
            let start = (start as u32 as usize).min(b.len());
            let end = start.saturating_add(max as u32 as usize).min(b.len());
            give(&mut c, &b[start..end], rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, t: i32, rsize: i32, rflags: i32| -> R {
            not_starting!(c);
            let len = tri!(buffer_bytes(c.data(), t)).len();
            tri!(write_u32(&mut c, rsize, len as u32));
            tri!(write_u32(&mut c, rflags, 0));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, size: i32, p: i32, n: i32| -> R {
            not_starting!(c);
            let data = tri!(read(&mut c, p, n));
            let s = c.data_mut();
            let Some((bt, b)) = s.body.as_mut().filter(|(bt, _)| *bt == t) else {
                return Ok(if matches!(t, 0..=8) {
                    status::NOT_FOUND
                } else {
                    status::BAD_ARGUMENT
                });
            };
            let _ = bt;
            // cpp-host's Buffer::copyFrom: start 0 drains `size` bytes and prepends; a start
            // at or past the end appends; anything else is refused
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            if start == 0 {
                let drained = size.min(b.len());
                b.splice(0..drained, data);
            } else if start >= b.len() {
                b.extend_from_slice(&data);
            } else {
                return Ok(status::BAD_ARGUMENT);
            }
            Ok(status::OK)
        },
    )?;
    // ---- header maps
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, t: i32, rp: i32, rn: i32| -> R {
            not_starting!(c);
            let data = tri!(map_pairs(c.data_mut(), t));
            give(&mut c, &data, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, t: i32, ret: i32| -> R {
            not_starting!(c);
            let n = tri!(map_pairs(c.data_mut(), t)).len();
            tri!(write_u32(&mut c, ret, n as u32));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, t: i32, p: i32, n: i32| -> R {
            not_starting!(c);
            let data = tri!(read(&mut c, p, n));
            Ok(set_pairs(c.data_mut(), t, &data))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kn: i32, rp: i32, rn: i32| -> R {
            not_starting!(c);
            match tri!(tri!(with_bytes(&mut c, kp, kn, |k, s| map_value(s, t, k)))) {
                Some(v) => give(&mut c, &v, rp, rn),
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    for (name, edit) in [
        ("proxy_add_header_map_value", Edit::Add),
        ("proxy_replace_header_map_value", Edit::Replace),
    ] {
        l.func_wrap(
            "env",
            name,
            move |mut c: C<'_>, t: i32, kp: i32, kn: i32, vp: i32, vn: i32| -> R {
                not_starting!(c);
                Ok(tri!(with_two(&mut c, (kp, kn), (vp, vn), |k, v, s| {
                    edit_map(s, t, k, v, edit)
                })))
            },
        )?;
    }
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kn: i32| -> R {
            not_starting!(c);
            Ok(tri!(with_bytes(&mut c, kp, kn, |k, s| edit_map(
                s,
                t,
                k,
                b"",
                Edit::Remove
            ))))
        },
    )?;
    // ---- stream control
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: C<'_>, t: i32| -> R {
            not_starting!(c);
            let Some(s) = c.data_mut().target_stream() else {
                return Ok(status::BAD_ARGUMENT);
            };
            match t {
                stream::HTTP_REQUEST => s.continued[0] = true,
                stream::HTTP_RESPONSE => s.continued[1] = true,
                _ => return Ok(status::BAD_ARGUMENT),
            }
            Ok(status::OK)
        },
    )?;
    l.func_wrap("env", "proxy_close_stream", |mut c: C<'_>, t: i32| -> R {
        not_starting!(c);
        let Some(s) = c.data_mut().target_stream() else {
            return Ok(status::BAD_ARGUMENT);
        };
        if !matches!(t, stream::HTTP_REQUEST | stream::HTTP_RESPONSE) {
            return Ok(status::BAD_ARGUMENT);
        }
        s.closed = true;
        Ok(status::OK)
    })?;
    // ABI 0.1.0's forms
    for (name, side) in [
        ("proxy_continue_request", 0),
        ("proxy_continue_response", 1),
    ] {
        l.func_wrap("env", name, move |mut c: C<'_>| -> R {
            match c.data_mut().target_stream() {
                Some(s) => {
                    s.continued[side] = true;
                    Ok(status::OK)
                }
                None => Ok(status::BAD_ARGUMENT),
            }
        })?;
    }
    l.func_wrap("env", "proxy_clear_route_cache", |_c: C<'_>| -> R {
        Ok(status::OK)
    })?;
    l.func_wrap(
        "env",
        "proxy_get_configuration",
        |mut c: C<'_>, rp: i32, rn: i32| -> R {
            let root = c.data().effective_root();
            let conf = match c.data().roots.get(&root) {
                Some(r) => r.conf.clone(),
                None => return Ok(status::NOT_FOUND),
            };
            give(&mut c, &conf, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: C<'_>, rcode: i32, rp: i32, rn: i32| -> R {
            not_starting!(c);
            let Some(call) = c.data().call.clone() else {
                return Ok(status::NOT_FOUND);
            };
            let (code, msg) = match &*call {
                Ok(r) => (u32::from(r.status.as_u16()), String::new()),
                Err(e) => (status::BROKEN_CONNECTION as u32, e.to_string()),
            };
            tri!(write_u32(&mut c, rcode, code));
            give(&mut c, msg.as_bytes(), rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         code: i32,
         _dp: i32,
         _dn: i32,
         bp: i32,
         bn: i32,
         hp: i32,
         hn: i32,
         _grpc: i32|
         -> R {
            not_starting!(c);
            let body = tri!(read(&mut c, bp, bn));
            let hdrs = tri!(read(&mut c, hp, hn));
            let Ok(status_code) = StatusCode::from_u16(code as u32 as u16)
                .map_err(|_| ())
                .and_then(|s| {
                    if (200..=599).contains(&code) {
                        Ok(s)
                    } else {
                        Err(())
                    }
                })
            else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Ok(pairs) = decode_pairs(&hdrs) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let mut headers = HeaderMap::new();
            for (k, v) in pairs {
                let k = lower(k);
                if k.first() == Some(&b':') {
                    continue;
                }
                if edit_headers(&mut headers, &k, v, Edit::Add).is_err() {
                    return Ok(status::BAD_ARGUMENT);
                }
            }
            let Some(s) = c.data_mut().target_stream() else {
                return Ok(status::BAD_ARGUMENT);
            };
            s.local = Some(LocalReply {
                status: status_code,
                headers,
                body: Bytes::from(body),
            });
            Ok(status::OK)
        },
    )?;
    // ---- callouts
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: C<'_>,
         up: i32,
         upn: i32,
         hp: i32,
         hn: i32,
         bp: i32,
         bn: i32,
         _tp: i32,
         _tn: i32,
         timeout: i32,
         ret: i32|
         -> R {
            not_starting!(c);
            let upstream = tri!(read(&mut c, up, upn));
            let hdrs = tri!(read(&mut c, hp, hn));
            let body = tri!(read(&mut c, bp, bn));
            let Ok(target) = String::from_utf8(upstream) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let req = tri!(callout_request(target, &hdrs, body, timeout));
            let Some(client) = polygate_core::callout::callouts() else {
                return Ok(status::INTERNAL_FAILURE);
            };
            if !client.knows(&req.target) {
                return Ok(status::BAD_ARGUMENT);
            }
            let s = c.data_mut();
            let token = s.next_token;
            s.next_token = s.next_token.wrapping_add(1).max(1);
            let root = s.effective_root();
            s.calls.push(PendingCall { token, root, req });
            tri!(write_u32(&mut c, ret, token));
            Ok(status::OK)
        },
    )?;
    // gRPC callouts need gRPC upstreams (not there yet): answered UNIMPLEMENTED
    for (name, params) in [
        ("proxy_grpc_call", 12),
        ("proxy_grpc_stream", 9),
        ("proxy_grpc_send", 4),
        ("proxy_grpc_cancel", 1),
        ("proxy_grpc_close", 1),
    ] {
        let ty = FuncType::new(
            l.engine(),
            std::iter::repeat_n(ValType::I32, params),
            [ValType::I32],
        );
        l.func_new("env", name, ty, |_c, _args, results| {
            results[0] = Val::I32(status::UNIMPLEMENTED);
            Ok(())
        })?;
    }
    // ---- shared data and queues
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kn: i32, rp: i32, rn: i32, rcas: i32| -> R {
            not_starting!(c);
            let key = tri!(read(&mut c, kp, kn));
            let vm = c.data().def.vm_id.clone();
            let Some((value, cas)) = shared::get_data(&vm, &key) else {
                return Ok(status::NOT_FOUND);
            };
            tri!(write_u32(&mut c, rcas, cas));
            give(&mut c, &value, rp, rn)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kn: i32, vp: i32, vn: i32, cas: i32| -> R {
            not_starting!(c);
            let key = tri!(read(&mut c, kp, kn));
            let value = tri!(read(&mut c, vp, vn));
            let vm = c.data().def.vm_id.clone();
            Ok(shared::set_data(&vm, key, value, cas as u32))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nn: i32, ret: i32| -> R {
            not_starting!(c);
            let name = tri!(read(&mut c, np, nn));
            let s = c.data_mut();
            let root = s.effective_root();
            let vm = s.def.vm_id.clone();
            let id = shared::register_queue(&vm, &name);
            s.queues.push((id, root));
            tri!(write_u32(&mut c, ret, id));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, vp: i32, vn: i32, np: i32, nn: i32, ret: i32| -> R {
            not_starting!(c);
            let vm = tri!(read(&mut c, vp, vn));
            let name = tri!(read(&mut c, np, nn));
            let Ok(vm) = String::from_utf8(vm) else {
                return Ok(status::BAD_ARGUMENT);
            };
            match shared::resolve_queue(&vm, &name) {
                Some(id) => {
                    tri!(write_u32(&mut c, ret, id));
                    Ok(status::OK)
                }
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, vp: i32, vn: i32| -> R {
            not_starting!(c);
            let v = tri!(read(&mut c, vp, vn));
            Ok(shared::enqueue(id as u32, v))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, rp: i32, rn: i32| -> R {
            not_starting!(c);
            match shared::dequeue(id as u32) {
                Err(s) => Ok(s),
                Ok(v) => give(&mut c, &v, rp, rn),
            }
        },
    )?;
    // ---- metrics
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, t: i32, np: i32, nn: i32, ret: i32| -> R {
            not_starting!(c);
            let name = tri!(read(&mut c, np, nn));
            let Ok(name) = String::from_utf8(name) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let id = tri!(shared::define_metric(t, &name));
            tri!(write_u32(&mut c, ret, id));
            Ok(status::OK)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, delta: i64| -> R {
            not_starting!(c);
            Ok(shared::increment_metric(id as u32, delta))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, v: i64| -> R {
            not_starting!(c);
            Ok(shared::record_metric(id as u32, v as u64))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| -> R {
            not_starting!(c);
            let v = tri!(shared::get_metric(id as u32));
            tri!(write(&mut c, ret, &v.to_le_bytes()));
            Ok(status::OK)
        },
    )?;
    // ---- properties
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pn: i32, rp: i32, rn: i32| -> R {
            let path = tri!(read(&mut c, pp, pn));
            match crate::props::get(c.data_mut(), &path) {
                Some(v) => give(&mut c, &v, rp, rn),
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: C<'_>, pp: i32, pn: i32, vp: i32, vn: i32| -> R {
            not_starting!(c);
            let path = tri!(read(&mut c, pp, pn));
            let value = tri!(read(&mut c, vp, vn));
            Ok(crate::props::set(c.data_mut(), path, value))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_c: C<'_>, _np: i32, _nn: i32, _ap: i32, _an: i32, _rp: i32, _rn: i32| -> R {
            // polygate registers no foreign functions
            Ok(status::NOT_FOUND)
        },
    )?;
    Ok(())
}

/// A callout request from `proxy_http_call`'s arguments: `:method`, `:path` and
/// `:authority` are required (Envoy answers BAD_ARGUMENT without them).
fn callout_request(
    target: String,
    hdrs: &[u8],
    body: Vec<u8>,
    timeout_ms: i32,
) -> Result<CalloutRequest, i32> {
    let pairs = decode_pairs(hdrs).map_err(|_| status::BAD_ARGUMENT)?;
    let (mut method, mut path, mut authority) = (None, None, None);
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        let k = lower(k);
        match &*k {
            b":method" => method = Some(Method::from_bytes(v).map_err(|_| status::BAD_ARGUMENT)?),
            b":path" => {
                path = Some(String::from_utf8(v.to_vec()).map_err(|_| status::BAD_ARGUMENT)?)
            }
            b":authority" => {
                authority = Some(String::from_utf8(v.to_vec()).map_err(|_| status::BAD_ARGUMENT)?)
            }
            k if k.first() == Some(&b':') => {}
            k => edit_headers(&mut headers, k, v, Edit::Add)?,
        }
    }
    let (Some(method), Some(path), Some(authority)) = (method, path, authority) else {
        return Err(status::BAD_ARGUMENT);
    };
    if timeout_ms < 0 {
        return Err(status::BAD_ARGUMENT);
    }
    Ok(CalloutRequest {
        target,
        method,
        path,
        authority,
        headers,
        body: Bytes::from(body),
        timeout: (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms as u64)),
    })
}

const WASI_SUCCESS: i32 = 0;
const WASI_BADF: i32 = 8;
const WASI_FAULT: i32 = 21;
const WASI_INVAL: i32 = 28;

fn add_wasi(l: &mut Linker<HostState>, m: &str) -> wasmtime::Result<()> {
    // stdout → info, stderr → error, as cpp-host does
    l.func_wrap(
        m,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, ret: i32| -> R {
            if fd != 1 && fd != 2 {
                return Ok(WASI_BADF);
            }
            let mut out = Vec::new();
            for i in 0..n.max(0) {
                let Ok(iov) = read(&mut c, iovs.wrapping_add(i * 8), 8) else {
                    return Ok(WASI_FAULT);
                };
                let p = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read(&mut c, p, len) {
                    Ok(b) => out.extend_from_slice(&b),
                    Err(_) => return Ok(WASI_FAULT),
                }
            }
            let text = String::from_utf8_lossy(&out);
            let text = text.trim_end_matches('\n');
            if !text.is_empty() {
                log_guest(c.data(), if fd == 1 { 2 } else { 4 }, text);
            }
            if write_u32(&mut c, ret, out.len() as u32).is_err() {
                return Ok(WASI_FAULT);
            }
            Ok(WASI_SUCCESS)
        },
    )?;
    l.func_wrap(
        m,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| -> R {
            let ns = match id {
                0 => now_ns(),
                1 => monotonic_ns(),
                _ => return Ok(WASI_INVAL),
            };
            if write(&mut c, ret, &ns.to_le_bytes()).is_err() {
                return Ok(WASI_FAULT);
            }
            Ok(WASI_SUCCESS)
        },
    )?;
    l.func_wrap(m, "random_get", |mut c: C<'_>, p: i32, n: i32| -> R {
        // cpp-host caps one call at 64 KiB
        if n as u32 > 64 << 10 {
            return Ok(WASI_INVAL);
        }
        let mut buf = vec![0u8; n as u32 as usize];
        fill_random(&mut buf);
        if write(&mut c, p, &buf).is_err() {
            return Ok(WASI_FAULT);
        }
        Ok(WASI_SUCCESS)
    })?;
    // no environment and no arguments: a filter never sees the host's
    for name in ["environ_sizes_get", "args_sizes_get"] {
        l.func_wrap(m, name, |mut c: C<'_>, a: i32, b: i32| -> R {
            if write_u32(&mut c, a, 0).is_err() || write_u32(&mut c, b, 0).is_err() {
                return Ok(WASI_FAULT);
            }
            Ok(WASI_SUCCESS)
        })?;
    }
    for name in ["environ_get", "args_get"] {
        l.func_wrap(m, name, |_c: C<'_>, _a: i32, _b: i32| -> R {
            Ok(WASI_SUCCESS)
        })?;
    }
    l.func_wrap(
        m,
        "proc_exit",
        |c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::format_err!(
                "filter {} called proc_exit({code})",
                c.data().def.name
            ))
        },
    )?;
    l.func_wrap(m, "sched_yield", |_c: C<'_>| -> R { Ok(WASI_SUCCESS) })?;
    l.func_wrap(m, "fd_close", |_c: C<'_>, _fd: i32| -> R { Ok(WASI_BADF) })?;
    l.func_wrap(
        m,
        "fd_seek",
        |_c: C<'_>, _fd: i32, _off: i64, _wh: i32, _ret: i32| -> R { Ok(WASI_BADF) },
    )?;
    l.func_wrap(m, "fd_fdstat_get", |_c: C<'_>, _fd: i32, _ret: i32| -> R {
        Ok(WASI_BADF)
    })?;
    l.func_wrap(m, "fd_prestat_get", |_c: C<'_>, _fd: i32, _ret: i32| -> R {
        Ok(WASI_BADF)
    })?;
    Ok(())
}

fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Random bytes for `random_get` (from the OS through std's hasher keys, mixed).
fn fill_random(buf: &mut [u8]) {
    use std::hash::{BuildHasher, Hasher};
    let mut i = 0;
    while i < buf.len() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u64(monotonic_ns());
        let v = h.finish().to_le_bytes();
        let n = (buf.len() - i).min(8);
        buf[i..i + n].copy_from_slice(&v[..n]);
        i += n;
    }
}
