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
pub(crate) fn fmt_number(n: f64) -> String {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 1e15 {
        return format!("{}", n as i64);
    }
    if n.is_nan() {
        return "nan".into();
    }
    if n.is_infinite() {
        return if n > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let s = format!("{n:.14e}");
    // %.14g: use plain notation when the exponent is small
    let exp: i32 = s
        .rsplit_once('e')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0);
    if (-5..15).contains(&exp) {
        let digits = (13 - exp).max(0) as usize;
        let t = format!("{n:.digits$}");
        let t = t.trim_end_matches('0').trim_end_matches('.');
        t.to_owned()
    } else {
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = m.trim_end_matches('0').trim_end_matches('.');
        let e: i32 = e.parse().unwrap_or(0);
        format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    }
}

/// A Lua error with this message.
pub(crate) fn lua_err(msg: impl Into<String>) -> mlua::Error {
    mlua::Error::runtime(msg.into())
}

#[cfg(test)]
mod tests {
    use super::fmt_number;

    #[test]
    fn numbers() {
        assert_eq!(fmt_number(3.0), "3");
        assert_eq!(fmt_number(0.5), "0.5");
        assert_eq!(fmt_number(-12.25), "-12.25");
        assert_eq!(fmt_number(1e20), "1e+20");
        assert_eq!(fmt_number(0.1), "0.1");
    }
}
