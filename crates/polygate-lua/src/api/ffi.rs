//! `ngx.load_ffi(lib, cfg, opts)`: lua-resty-ffi's Lua API over polygate's process-wide FFI
//! host. Every method name of the returned object posts a request and yields the coroutine
//! until the runtime answers: `ok, res_or_rc, err` as lua-resty-ffi returns them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mlua::{
    AnyUserData, Function, Lua, MultiValue, Result as LuaResult, Table, UserData, UserDataMethods,
    Value,
};
use polygate_ffi::runtime::{Slot, cache_key};
use polygate_ffi::{CallError, LoadError, LoadOptions, Runtime, host};

use super::lua_err;
use super::ngx::require_yield;
use crate::vm::Settings;

const CACHE: &str = "polygate.ffi_runtimes";

/// A runtime as Lua sees it.
struct LuaRuntime {
    rt: Arc<Runtime>,
    key: String,
    timeout: Duration,
    finished: AtomicBool,
    call: Function,
    unload: Function,
}

impl UserData for LuaRuntime {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_meta_method("__index", |_, this, key: String| {
            Ok(if key == "__unload" {
                this.unload.clone()
            } else {
                this.call.clone()
            })
        });
        m.add_async_meta_method(
            "__call",
            |lua, this, (req, _extra): (Value, MultiValue)| async move {
                let rt = this.rt.clone();
                let finished = this.finished.load(Ordering::Acquire);
                let timeout = this.timeout;
                drop(this);
                invoke(lua, rt, timeout, finished, req).await
            },
        );
        m.add_meta_method("__tostring", |_, this, ()| {
            Ok(format!("ffi runtime {}", this.key))
        });
    }
}

fn result(lua: &Lua, r: Result<(i32, Option<bytes::Bytes>), CallError>) -> LuaResult<MultiValue> {
    let s = |t: &[u8]| -> LuaResult<Value> { Ok(Value::String(lua.create_string(t)?)) };
    Ok(MultiValue::from_vec(match r {
        Ok((0, rsp)) => vec![
            Value::Boolean(true),
            match rsp {
                Some(b) => s(&b)?,
                None => Value::Nil,
            },
            Value::Nil,
        ],
        Ok((rc, rsp)) => vec![
            Value::Boolean(false),
            Value::Integer(rc as i64),
            match rsp {
                Some(b) => s(&b)?,
                None => Value::Nil,
            },
        ],
        Err(CallError::Timeout(_)) => vec![Value::Boolean(false), s(b"timeout")?],
        Err(e) => vec![Value::Boolean(false), s(e.to_string().as_bytes())?],
    }))
}

async fn call(
    lua: Lua,
    (ud, req, _extra): (AnyUserData, Value, MultiValue),
) -> LuaResult<MultiValue> {
    let (rt, timeout, finished) = {
        let this = ud.borrow::<LuaRuntime>()?;
        (
            this.rt.clone(),
            this.timeout,
            this.finished.load(Ordering::Acquire),
        )
    };
    invoke(lua, rt, timeout, finished, req).await
}

async fn invoke(
    lua: Lua,
    rt: Arc<Runtime>,
    timeout: Duration,
    finished: bool,
    req: Value,
) -> LuaResult<MultiValue> {
    require_yield("ffi runtime call")?;
    if finished || rt.is_unloaded() {
        return result(&lua, Err(CallError::Finished));
    }
    let req: Option<Vec<u8>> = match &req {
        Value::Nil => None,
        Value::String(s) => Some(s.as_bytes().to_vec()),
        other => match super::as_text(other) {
            Some(t) => Some(t),
            None => {
                return Err(lua_err(format!(
                    "ffi runtime call: request must be a string or nil, got {}",
                    other.type_name()
                )));
            }
        },
    };
    let r = rt.call(req.as_deref(), Some(timeout)).await;
    result(&lua, r)
}

/// A load waiting on the loading thread.
struct PendingLoad {
    slot: Arc<Slot>,
    key: String,
    timeout: Duration,
}

impl UserData for PendingLoad {}

/// What `load_ffi` returns for a finished load: the runtime object (cached in the state), or
/// `nil, rc` / `nil, err` as lua-resty-ffi returns them.
fn finish_load(
    lua: &Lua,
    key: &str,
    timeout: Duration,
    r: Result<Arc<Runtime>, LoadError>,
) -> LuaResult<MultiValue> {
    match r {
        Ok(rt) => {
            let (call, unload): (Function, Function) = (
                lua.named_registry_value(CALL_FN)?,
                lua.named_registry_value(UNLOAD_FN)?,
            );
            let ud = lua.create_userdata(LuaRuntime {
                rt,
                key: key.to_owned(),
                timeout,
                finished: AtomicBool::new(false),
                call,
                unload,
            })?;
            let cache: Table = lua.named_registry_value(CACHE)?;
            cache.raw_set(key, ud.clone())?;
            Ok(MultiValue::from_vec(vec![Value::UserData(ud)]))
        }
        Err(LoadError::Init { rc, lib }) => {
            tracing::error!("ngx.load_ffi: libffi_init of {lib} failed with rc {rc}");
            Ok(MultiValue::from_vec(vec![
                Value::Nil,
                Value::Integer(rc as i64),
            ]))
        }
        Err(e) => Ok(MultiValue::from_vec(vec![
            Value::Nil,
            Value::String(lua.create_string(e.to_string())?),
        ])),
    }
}

const CALL_FN: &str = "polygate.ffi_call";
const UNLOAD_FN: &str = "polygate.ffi_unload";

/// `ngx.load_ffi`: a runtime already loaded returns at once; otherwise the load is queued on
/// the loading thread and the coroutine yields until it is done (the worker keeps serving), or,
/// where Lua cannot yield (module top level, `init_by_lua`), the thread waits for it.
const LOAD_FFI: &str = r#"
local start, wait, block, can_yield = ...
local isyieldable = coroutine.isyieldable or function() return true end
return function(lib, cfg, opts)
    local rt, err, pending = start(lib, cfg, opts)
    if pending == nil then
        return rt, err
    end
    if can_yield() and isyieldable() then
        return wait(pending)
    end
    return block(pending)
end
"#;

pub(crate) fn install(lua: &Lua, ngx: &Table, settings: &Settings) -> LuaResult<()> {
    let call_fn = lua.create_async_function(call)?;
    let unload_fn = lua.create_function(|lua, ud: AnyUserData| {
        let this = ud.borrow::<LuaRuntime>()?;
        this.finished.store(true, Ordering::Release);
        this.rt.unload();
        if let Ok(cache) = lua.named_registry_value::<Table>(CACHE) {
            cache.raw_set(this.key.as_str(), Value::Nil)?;
        }
        Ok(())
    })?;
    lua.set_named_registry_value(CALL_FN, call_fn)?;
    lua.set_named_registry_value(UNLOAD_FN, unload_fn)?;
    let default_timeout = settings.ffi_timeout;
    let cache = lua.create_table()?;
    lua.set_named_registry_value(CACHE, cache)?;
    let start = lua.create_function(
        move |lua, (lib, cfg, opts): (String, Option<String>, Option<Table>)| {
            let key = cache_key(&lib, cfg.as_deref());
            let cache: Table = lua.named_registry_value(CACHE)?;
            if let Value::UserData(ud) = cache.raw_get::<Value>(key.as_str())? {
                let alive = ud
                    .borrow::<LuaRuntime>()
                    .map(|r| !r.finished.load(Ordering::Acquire) && !r.rt.is_unloaded())
                    .unwrap_or(false);
                if alive {
                    return Ok(MultiValue::from_vec(vec![Value::UserData(ud)]));
                }
                cache.raw_set(key.as_str(), Value::Nil)?;
            }
            let mut lo = LoadOptions::default();
            let mut timeout = default_timeout;
            if let Some(o) = &opts {
                if let Some(q) = o.get::<Option<usize>>("max_queue")? {
                    lo.max_queue = q.max(1);
                }
                if let Some(q) = o.get::<Option<usize>>("max_inflight")? {
                    lo.max_inflight = q.max(1);
                }
                lo.is_global = o.get::<Option<bool>>("is_global")?.unwrap_or(false);
                lo.unpin = o.get::<Option<bool>>("unpin")?.unwrap_or(false);
                if let Some(t) = o.get::<Option<f64>>("timeout")? {
                    if !(t.is_finite() && t > 0.0) {
                        return Err(lua_err("ngx.load_ffi: opts.timeout must be > 0"));
                    }
                    timeout = polygate_model::secs(t);
                }
            }
            let slot = host().slot(&lib, cfg.as_deref(), &lo);
            if let Some(r) = slot.try_get() {
                return finish_load(lua, &key, timeout, r.clone());
            }
            let pending = lua.create_userdata(PendingLoad { slot, key, timeout })?;
            Ok(MultiValue::from_vec(vec![
                Value::Nil,
                Value::Nil,
                Value::UserData(pending),
            ]))
        },
    )?;
    let wait = lua.create_async_function(|lua, ud: AnyUserData| async move {
        let (slot, key, timeout) = {
            let p = ud.borrow::<PendingLoad>()?;
            (p.slot.clone(), p.key.clone(), p.timeout)
        };
        let r = slot.wait().await;
        finish_load(&lua, &key, timeout, r)
    })?;
    let block = lua.create_function(|lua, ud: AnyUserData| {
        let (slot, key, timeout) = {
            let p = ud.borrow::<PendingLoad>()?;
            (p.slot.clone(), p.key.clone(), p.timeout)
        };
        let r = slot.wait_blocking();
        finish_load(lua, &key, timeout, r)
    })?;
    let can_yield = lua.create_function(|_, ()| Ok(require_yield("ngx.load_ffi").is_ok()))?;
    let load_ffi: Function = lua
        .load(LOAD_FFI)
        .set_name("=ngx.load_ffi")
        .call((start, wait, block, can_yield))?;
    ngx.set("load_ffi", load_ffi)?;
    Ok(())
}
