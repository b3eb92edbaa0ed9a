//! `ngx.req`: the client request as plugins see it (changes are what goes upstream).

use bytes::Bytes;
use http::{HeaderName, Method};
use mlua::{Lua, Result as LuaResult, Table, Value};
use polygate_core::RequestCtx;

use super::{codec, lua_err};
use crate::current::{with_ctx, with_ctx_mut};

pub(crate) fn install(lua: &Lua, ngx: &Table) -> LuaResult<()> {
    let req = lua.create_table()?;
    req.set(
        "get_method",
        lua.create_function(|_, ()| with_ctx("ngx.req.get_method", |c| Ok(c.method.to_string())))?,
    )?;
    req.set(
        "set_method",
        lua.create_function(|_, m: Value| {
            let method = match &m {
                Value::Integer(_) | Value::Number(_) => {
                    let n = match m {
                        Value::Integer(i) => i,
                        Value::Number(f) => f as i64,
                        _ => 0,
                    };
                    method_from_const(n).ok_or_else(|| {
                        lua_err(format!("ngx.req.set_method: unsupported HTTP method: {n}"))
                    })?
                }
                Value::String(s) => Method::from_bytes(&s.as_bytes())
                    .map_err(|_| lua_err("ngx.req.set_method: invalid method"))?,
                _ => return Err(lua_err("ngx.req.set_method: method expected")),
            };
            with_ctx_mut("ngx.req.set_method", |c| {
                c.method = method;
                Ok(())
            })
        })?,
    )?;
    req.set(
        "http_version",
        lua.create_function(|_, ()| {
            with_ctx("ngx.req.http_version", |c| {
                Ok(match c.version {
                    http::Version::HTTP_10 => 1.0,
                    http::Version::HTTP_2 => 2.0,
                    _ => 1.1,
                })
            })
        })?,
    )?;
    req.set(
        "start_time",
        lua.create_function(|_, ()| {
            with_ctx("ngx.req.start_time", |c| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                Ok(((now - c.started.elapsed().as_secs_f64()) * 1000.0).floor() / 1000.0)
            })
        })?,
    )?;
    req.set("is_internal", lua.create_function(|_, ()| Ok(false))?)?;
    req.set(
        "get_headers",
        lua.create_function(|lua, (max, raw): (Option<i64>, Option<bool>)| {
            get_headers(lua, max.unwrap_or(100), raw.unwrap_or(false))
        })?,
    )?;
    let slow = lua.create_function(|_, (name, value): (mlua::String, Value)| {
        set_header(&name.to_str()?, &value)
    })?;
    lua.set_named_registry_value(
        super::fast::SLOW_SET_HEADER.to_str().unwrap_or_default(),
        slow,
    )?;
    req.set(
        "set_header",
        super::fast::function(lua, super::fast::set_header)?,
    )?;
    req.set(
        "clear_header",
        lua.create_function(|_, name: String| set_header(&name, &Value::Nil))?,
    )?;
    req.set(
        "get_uri_args",
        lua.create_function(|lua, max: Option<i64>| {
            let q = with_ctx("ngx.req.get_uri_args", |c| Ok(c.query.clone()))?;
            codec::decode_args(lua, q.as_deref().unwrap_or(""), max.unwrap_or(100))
        })?,
    )?;
    req.set(
        "get_post_args",
        lua.create_function(|lua, max: Option<i64>| {
            let body = with_ctx("ngx.req.get_post_args", |c| Ok(c.body.clone()))?;
            let Some(body) = body else {
                return Err(lua_err(
                    "no request body found (call ngx.req.read_body first)",
                ));
            };
            codec::decode_args(lua, &String::from_utf8_lossy(&body), max.unwrap_or(100))
        })?,
    )?;
    req.set(
        "set_uri",
        lua.create_function(|_, (uri, jump): (String, Option<bool>)| {
            if uri.is_empty() {
                return Err(lua_err("ngx.req.set_uri: attempt to use zero-length uri"));
            }
            if jump == Some(true) {
                return Err(lua_err(
                    "ngx.req.set_uri: jump=true is not supported (polygate does not re-match routes; rewrite with jump=false)",
                ));
            }
            // `$uri` holds the unescaped path; it is percent-encoded when sent upstream
            with_ctx_mut("ngx.req.set_uri", |c| {
                c.path = uri;
                Ok(())
            })
        })?,
    )?;
    req.set(
        "set_uri_args",
        lua.create_function(|lua, args: Value| {
            let q = match &args {
                Value::String(s) => s.to_str()?.to_owned(),
                Value::Table(t) => codec::encode_args(lua, t)?,
                Value::Nil => String::new(),
                other => {
                    return Err(lua_err(format!(
                        "ngx.req.set_uri_args: string or table expected, got {}",
                        other.type_name()
                    )));
                }
            };
            with_ctx_mut("ngx.req.set_uri_args", |c| {
                c.query = if q.is_empty() { None } else { Some(q) };
                Ok(())
            })
        })?,
    )?;
    req.set(
        "read_body",
        lua.create_function(|_, ()| {
            with_ctx("ngx.req.read_body", |c| {
                if c.body.is_none() && has_body(c) {
                    tracing::warn!(
                        "ngx.req.read_body: the request body was not buffered for Lua; set `read_body: true` in the plugin's configuration"
                    );
                }
                Ok(())
            })
        })?,
    )?;
    req.set("discard_body", lua.create_function(|_, ()| Ok(()))?)?;
    req.set(
        "get_body_data",
        lua.create_function(|lua, ()| {
            let b = with_ctx("ngx.req.get_body_data", |c| Ok(c.body.clone()))?;
            match b {
                Some(b) if !b.is_empty() => Ok(Value::String(lua.create_string(&b[..])?)),
                _ => Ok(Value::Nil),
            }
        })?,
    )?;
    req.set(
        "get_body_file",
        lua.create_function(|_, ()| Ok(Value::Nil))?,
    )?;
    req.set(
        "set_body_data",
        lua.create_function(|_, data: mlua::String| {
            let b = Bytes::copy_from_slice(&data.as_bytes());
            with_ctx_mut("ngx.req.set_body_data", |c| {
                c.headers.remove(http::header::TRANSFER_ENCODING);
                c.headers.remove(http::header::CONTENT_LENGTH);
                c.body = Some(b);
                Ok(())
            })
        })?,
    )?;
    ngx.set("req", req)?;
    Ok(())
}

fn has_body(c: &RequestCtx) -> bool {
    c.headers.contains_key(http::header::TRANSFER_ENCODING)
        || c.header("content-length").is_some_and(|l| l != "0")
}

fn method_from_const(n: i64) -> Option<Method> {
    Some(match n {
        2 => Method::GET,
        4 => Method::HEAD,
        8 => Method::POST,
        16 => Method::PUT,
        32 => Method::DELETE,
        512 => Method::OPTIONS,
        16384 => Method::PATCH,
        32768 => Method::TRACE,
        64 => Method::from_bytes(b"MKCOL").ok()?,
        128 => Method::from_bytes(b"COPY").ok()?,
        256 => Method::from_bytes(b"MOVE").ok()?,
        1024 => Method::from_bytes(b"PROPFIND").ok()?,
        2048 => Method::from_bytes(b"PROPPATCH").ok()?,
        4096 => Method::from_bytes(b"LOCK").ok()?,
        8192 => Method::from_bytes(b"UNLOCK").ok()?,
        _ => return None,
    })
}

/// The metatable of `get_headers` results: `h["Content-Type"]` and `h.content_type` find
/// `content-type`.
const HEADERS_MT: &str = r#"
local rawget, lower, gsub = rawget, string.lower, string.gsub
return { __index = function(t, k)
  if type(k) ~= "string" then return nil end
  local n = gsub(lower(k), "_", "-")
  return rawget(t, n)
end }
"#;

fn get_headers(lua: &Lua, max: i64, raw: bool) -> LuaResult<Table> {
    let pairs = with_ctx("ngx.req.get_headers", |c| {
        let mut v: Vec<(String, Vec<u8>)> = Vec::with_capacity(c.headers.len());
        for (n, val) in &c.headers {
            v.push((n.as_str().to_owned(), val.as_bytes().to_vec()));
        }
        Ok(v)
    })?;
    let t = lua.create_table()?;
    for (i, (name, val)) in pairs.into_iter().enumerate() {
        if max > 0 && i as i64 >= max {
            break;
        }
        let v = Value::String(lua.create_string(&val)?);
        super::push_multi(lua, &t, lua.create_string(&name)?, v)?;
    }
    if !raw {
        let mt: Table = match lua.named_registry_value::<Value>("polygate.headers_mt")? {
            Value::Table(mt) => mt,
            _ => {
                let mt: Table = lua.load(HEADERS_MT).set_name("=ngx.req").eval()?;
                lua.set_named_registry_value("polygate.headers_mt", mt.clone())?;
                mt
            }
        };
        t.set_metatable(Some(mt))?;
    }
    Ok(t)
}

fn set_header(name: &str, value: &Value) -> LuaResult<()> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| lua_err(format!("ngx.req.set_header: invalid header name {name:?}")))?;
    let vals = super::header_values("ngx.req.set_header", name, value)?;
    with_ctx_mut("ngx.req.set_header", |c| {
        c.headers.remove(&n);
        let is_host = n == http::header::HOST;
        let first = if is_host {
            vals.first()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        } else {
            None
        };
        for v in vals {
            c.headers.append(n.clone(), v);
        }
        if is_host {
            c.host = first.map(|h| polygate_core::ctx::strip_port(&h).to_ascii_lowercase());
        }
        Ok(())
    })
}
