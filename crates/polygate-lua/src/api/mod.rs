//! The `ngx` API and the modules Lua code can `require` (`cjson`, `cjson.safe`, `resty_ffi`).

pub(crate) mod codec;
mod fast;
pub(crate) mod ffi;
pub(crate) mod ffi_call;
pub(crate) mod json;
pub(crate) mod ngx;
pub(crate) mod re;
pub(crate) mod req;
pub(crate) mod shdict;
pub(crate) mod timer;

use mlua::{Lua, Result as LuaResult, Table, Value};

use crate::vm::Settings;

/// Installs `ngx` and the preloaded modules into a fresh state.
pub(crate) fn install(lua: &Lua, settings: &Settings) -> LuaResult<()> {
    let ngx = lua.create_table()?;
    ngx::install(lua, &ngx)?;
    req::install(lua, &ngx)?;
    codec::install(lua, &ngx)?;
    re::install(lua, &ngx)?;
    shdict::install(lua, &ngx)?;
    timer::install(lua, &ngx, settings)?;
    ffi::install(lua, &ngx, settings)?;
    let globals = lua.globals();
    globals.set("ngx", ngx.clone())?;
    let package: Table = globals.get("package")?;
    let loaded: Table = package.get("loaded")?;
    loaded.set("ngx", ngx.clone())?;
    let preload: Table = package.get("preload")?;
    json::install(lua, &preload)?;
    let load_ffi: Value = ngx.get("load_ffi")?;
    preload.set(
        "resty_ffi",
        lua.create_function(move |lua, ()| {
            let m = lua.create_table()?;
            m.set("load_ffi", load_ffi.clone())?;
            Ok(m)
        })?,
    )?;
    Ok(())
}

/// A Lua value as header/argument text (strings, numbers, booleans), as OpenResty converts.
pub(crate) fn as_text(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Integer(i) => Some(i.to_string().into_bytes()),
        Value::Number(n) => Some(fmt_number(*n).into_bytes()),
        Value::Boolean(b) => Some(if *b {
            b"true".to_vec()
        } else {
            b"false".to_vec()
        }),
        _ => None,
    }
}

/// `t[key] = val`, turning a repeated key into an array of its values (as `get_headers` and
/// `get_uri_args` return them).
pub(crate) fn push_multi(lua: &Lua, t: &Table, key: mlua::String, val: Value) -> LuaResult<()> {
    match t.raw_get::<Value>(key.clone())? {
        Value::Nil => t.raw_set(key, val),
        Value::Table(list) => list.raw_push(val),
        prev => {
            let list = lua.create_table()?;
            list.raw_push(prev)?;
            list.raw_push(val)?;
            t.raw_set(key, list)
        }
    }
}

/// Header values from a Lua value: a string/number/boolean, an array of them, or nil (none).
pub(crate) fn header_values(
    api: &str,
    name: &str,
    v: &Value,
) -> LuaResult<smallvec::SmallVec<[http::HeaderValue; 1]>> {
    let one = |v: &Value| -> LuaResult<http::HeaderValue> {
        let invalid = || lua_err(format!("{api}: invalid value for header {name:?}"));
        if let Value::String(s) = v {
            return http::HeaderValue::from_bytes(&s.as_bytes()).map_err(|_| invalid());
        }
        let t = as_text(v).ok_or_else(|| {
            lua_err(format!(
                "{api}: invalid value for header {name:?}: {}",
                v.type_name()
            ))
        })?;
        http::HeaderValue::from_bytes(&t).map_err(|_| invalid())
    };
    let mut out = smallvec::SmallVec::new();
    match v {
        Value::Nil => {}
        Value::Table(t) => {
            for v in t.sequence_values::<Value>() {
                out.push(one(&v?)?);
            }
        }
        other => out.push(one(other)?),
    }
    Ok(out)
}

/// Formats a Lua number like Lua's `tostring` (`%.14g`, integers without a fraction).
pub(crate) use polygate_core::text::lua_number as fmt_number;

/// A Lua error with this message.
pub(crate) fn lua_err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}
