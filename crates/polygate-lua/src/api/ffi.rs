//! `ngx.load_ffi(lib, cfg, opts)`: lua-resty-ffi's Lua API over polygate's process-wide FFI
//! host. Every method name of the returned object posts a request and yields the coroutine
//! until the runtime answers: `ok, res_or_rc, err` as lua-resty-ffi returns them.

use std::sync::Arc;
use std::time::Duration;

use mlua::{AnyUserData, Function, Lua, MultiValue, Result as LuaResult, Table, UserData, Value};
use polygate_ffi::runtime::{Slot, cache_key};
use polygate_ffi::{LoadError, LoadOptions, Runtime, host};

use super::ngx::require_yield;
use super::{ffi_call, lua_err};
use crate::vm::Settings;

const CACHE: &str = "polygate.ffi_runtimes";

/// The userdata behind a runtime object: its index in the call path's registry
/// ([`super::ffi_call`]), released when the object and its call functions are collected.
struct LuaRuntime {
    id: usize,
    key: String,
}

impl UserData for LuaRuntime {}

impl Drop for LuaRuntime {
    fn drop(&mut self) {
        ffi_call::unregister(self.id);
    }
}

/// Field of the object table that holds its [`LuaRuntime`].
const HANDLE_FIELD: &str = "__polygate_runtime";

/// The object `load_ffi` returns, a table as lua-resty-ffi's is: any method name posts a
/// request (the function is cached in the table on first use), `__unload` unloads.
const OBJECT_FACTORY: &str = r#"
local make_call, unload, HANDLE = ...
local setmetatable, rawset = setmetatable, rawset
return function(id, ud, name)
    local call = make_call(id, ud)
    local function unload_this() return unload(ud) end
    local obj = { [HANDLE] = ud }
    return setmetatable(obj, {
        __index = function(t, k)
            if k == "__unload" then
                return unload_this
            end
            rawset(t, k, call)
            return call
        end,
        __call = call,
        __tostring = function() return name end,
    })
end
"#;

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
            let make: Function = lua.named_registry_value(OBJECT_FN)?;
            let id = ffi_call::register(rt, timeout);
            let ud = lua.create_userdata(LuaRuntime {
                id,
                key: key.to_owned(),
            })?;
            let obj: Table = make.call((id, ud, format!("ffi runtime {key}")))?;
            let cache: Table = lua.named_registry_value(CACHE)?;
            cache.raw_set(key, obj.clone())?;
            Ok(MultiValue::from_vec(vec![Value::Table(obj)]))
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

const OBJECT_FN: &str = "polygate.ffi_object";

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
    let unload_fn = lua.create_function(|lua, ud: AnyUserData| {
        let this = ud.borrow::<LuaRuntime>()?;
        ffi_call::finish(this.id);
        if let Ok(cache) = lua.named_registry_value::<Table>(CACHE) {
            cache.raw_set(this.key.as_str(), Value::Nil)?;
        }
        Ok(())
    })?;
    let make_call: Function = lua
        .load(ffi_call::CALL_FACTORY)
        .set_name("=ngx.load_ffi.call")
        .call((
            super::fast::function(lua, ffi_call::post)?,
            super::fast::function(lua, ffi_call::take)?,
            ffi_call::pending_marker(),
            lua.globals()
                .get::<Table>("coroutine")?
                .get::<Function>("yield")?,
        ))?;
    let make_object: Function = lua
        .load(OBJECT_FACTORY)
        .set_name("=ngx.load_ffi.object")
        .call((make_call, unload_fn, HANDLE_FIELD))?;
    lua.set_named_registry_value(OBJECT_FN, make_object)?;
    let default_timeout = settings.ffi_timeout;
    let cache = lua.create_table()?;
    lua.set_named_registry_value(CACHE, cache)?;
    let start = lua.create_function(
        move |lua, (lib, cfg, opts): (String, Option<String>, Option<Table>)| {
            let key = cache_key(&lib, cfg.as_deref());
            let cache: Table = lua.named_registry_value(CACHE)?;
            if let Value::Table(obj) = cache.raw_get::<Value>(key.as_str())? {
                let alive = obj
                    .raw_get::<AnyUserData>(HANDLE_FIELD)
                    .ok()
                    .and_then(|ud| {
                        ud.borrow::<LuaRuntime>()
                            .ok()
                            .map(|r| ffi_call::alive(r.id))
                    })
                    .unwrap_or(false);
                if alive {
                    return Ok(MultiValue::from_vec(vec![Value::Table(obj)]));
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
