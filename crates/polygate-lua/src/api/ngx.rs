//! The core of `ngx`: constants, `ngx.var`, `ngx.ctx`, `ngx.status`, `ngx.header`, output
//! (`say`, `print`, `exit`), `ngx.arg`, logging, time, `ngx.sleep`, `ngx.worker`, `ngx.config`.

use std::borrow::Cow;
use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue, StatusCode};
use mlua::{Function, Lua, MultiValue, Result as LuaResult, Table, Value, Variadic};
use polygate_core::RequestCtx;
use polygate_router::VarSource;

use super::{as_text, lua_err};
use crate::current::{
    LuaPhase, phase, with_chunk, with_ctx, with_ctx_mut, with_lua_req, with_response,
};

/// The error an `ngx.exit` raises to unwind a phase that cannot yield.
pub(crate) const EXIT_UNWIND: &str = "ngx.exit";

thread_local! {
    static NOW: Cell<f64> = const { Cell::new(0.0) };
    /// `ngx.exit` in a timer callback.
    pub(crate) static TIMER_EXIT: Cell<bool> = const { Cell::new(false) };
}

/// Marks the cached time (`ngx.now`) stale at each handler step, as nginx updates it per
/// event; it is read from the clock at its first use in the step.
pub(crate) fn touch_time() {
    NOW.with(|n| n.set(0.0));
}

fn refresh_time() -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let now = (now * 1000.0).floor() / 1000.0;
    NOW.with(|n| n.set(now));
    now
}

fn now() -> f64 {
    let n = NOW.with(Cell::get);
    if n == 0.0 { refresh_time() } else { n }
}

const CONSTANTS: &[(&str, i64)] = &[
    ("OK", 0),
    ("ERROR", -1),
    ("AGAIN", -2),
    ("DONE", -4),
    ("DECLINED", -5),
    ("STDERR", 0),
    ("EMERG", 1),
    ("ALERT", 2),
    ("CRIT", 3),
    ("ERR", 4),
    ("WARN", 5),
    ("NOTICE", 6),
    ("INFO", 7),
    ("DEBUG", 8),
    ("HTTP_GET", 2),
    ("HTTP_HEAD", 4),
    ("HTTP_POST", 8),
    ("HTTP_PUT", 16),
    ("HTTP_DELETE", 32),
    ("HTTP_MKCOL", 64),
    ("HTTP_COPY", 128),
    ("HTTP_MOVE", 256),
    ("HTTP_OPTIONS", 512),
    ("HTTP_PROPFIND", 1024),
    ("HTTP_PROPPATCH", 2048),
    ("HTTP_LOCK", 4096),
    ("HTTP_UNLOCK", 8192),
    ("HTTP_PATCH", 16384),
    ("HTTP_TRACE", 32768),
    ("HTTP_CONTINUE", 100),
    ("HTTP_SWITCHING_PROTOCOLS", 101),
    ("HTTP_OK", 200),
    ("HTTP_CREATED", 201),
    ("HTTP_ACCEPTED", 202),
    ("HTTP_NO_CONTENT", 204),
    ("HTTP_PARTIAL_CONTENT", 206),
    ("HTTP_SPECIAL_RESPONSE", 300),
    ("HTTP_MOVED_PERMANENTLY", 301),
    ("HTTP_MOVED_TEMPORARILY", 302),
    ("HTTP_SEE_OTHER", 303),
    ("HTTP_NOT_MODIFIED", 304),
    ("HTTP_TEMPORARY_REDIRECT", 307),
    ("HTTP_PERMANENT_REDIRECT", 308),
    ("HTTP_BAD_REQUEST", 400),
    ("HTTP_UNAUTHORIZED", 401),
    ("HTTP_PAYMENT_REQUIRED", 402),
    ("HTTP_FORBIDDEN", 403),
    ("HTTP_NOT_FOUND", 404),
    ("HTTP_NOT_ALLOWED", 405),
    ("HTTP_NOT_ACCEPTABLE", 406),
    ("HTTP_REQUEST_TIMEOUT", 408),
    ("HTTP_CONFLICT", 409),
    ("HTTP_GONE", 410),
    ("HTTP_UPGRADE_REQUIRED", 426),
    ("HTTP_TOO_MANY_REQUESTS", 429),
    ("HTTP_CLOSE", 444),
    ("HTTP_ILLEGAL", 451),
    ("HTTP_INTERNAL_SERVER_ERROR", 500),
    ("HTTP_METHOD_NOT_IMPLEMENTED", 501),
    ("HTTP_BAD_GATEWAY", 502),
    ("HTTP_SERVICE_UNAVAILABLE", 503),
    ("HTTP_GATEWAY_TIMEOUT", 504),
    ("HTTP_VERSION_NOT_SUPPORTED", 505),
    ("HTTP_INSUFFICIENT_STORAGE", 507),
];

/// Registry key of the `ctx.var` table of serverless functions.
pub(crate) const CTX_VAR: &str = "polygate.ctx_var";

pub(crate) fn install(lua: &Lua, ngx: &Table) -> LuaResult<()> {
    for (k, v) in CONSTANTS {
        ngx.set(*k, *v)?;
    }
    ngx.set("null", Value::NULL)?;

    // ngx.var
    let var = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        super::fast::function(lua, super::fast::var_index)?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (_, k, v): (Value, String, Value)| set_var(&k, &v))?,
    )?;
    var.set_metatable(Some(mt))?;
    ngx.set("var", var)?;

    // APISIX's `ctx.var` (serverless functions): the gateway's variables first, so that
    // `request_uri` is the normalised one APISIX gives plugins; nginx's `ngx.var` keeps the
    // target as received
    let ctx_var = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|_, (_, k): (Value, String)| {
            with_ctx("ctx.var", |ctx| {
                Ok(ctx
                    .var(&k)
                    .or_else(|| get_var(ctx, &k))
                    .map(Cow::into_owned))
            })
        })?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (_, k, v): (Value, String, Value)| set_var(&k, &v))?,
    )?;
    ctx_var.set_metatable(Some(mt))?;
    lua.set_named_registry_value(CTX_VAR, ctx_var)?;

    // ngx.status and ngx.ctx live behind ngx's metatable
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_, k): (Value, String)| match k.as_str() {
            "status" => get_status().map(Value::Integer),
            "ctx" => get_ngx_ctx(lua).map(Value::Table),
            _ => Ok(Value::Nil),
        })?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (t, k, v): (Table, String, Value)| match k.as_str() {
            "status" => set_status(&v),
            "ctx" => match v {
                Value::Table(tbl) => with_lua_req("ngx.ctx", |s| {
                    s.ngx_ctx = Some(tbl);
                    Ok(())
                }),
                _ => Err(lua_err("ngx.ctx must be a table")),
            },
            _ => t.raw_set(k, v),
        })?,
    )?;
    ngx.set_metatable(Some(mt))?;

    // ngx.header
    let header = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_, k): (Value, String)| get_resp_header(lua, &k))?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (_, k, v): (Value, String, Value)| set_resp_header(&k, &v))?,
    )?;
    header.set_metatable(Some(mt))?;
    ngx.set("header", header)?;

    // ngx.arg (body_filter)
    let arg = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (_, k): (Value, i64)| {
            with_chunk("ngx.arg", |chunk, eof| match k {
                1 => Ok(Value::String(lua.create_string(&chunk[..])?)),
                2 => Ok(Value::Boolean(*eof)),
                _ => Ok(Value::Nil),
            })
        })?,
    )?;
    mt.set(
        "__newindex",
        lua.create_function(|_, (_, k, v): (Value, i64, Value)| {
            let text = as_text(&v);
            with_chunk("ngx.arg", |chunk, eof| {
                match k {
                    1 => *chunk = text.map(Into::into).unwrap_or_default(),
                    2 => *eof = matches!(v, Value::Boolean(true)),
                    _ => return Err(lua_err("ngx.arg: index must be 1 or 2")),
                }
                Ok(())
            })
        })?,
    )?;
    arg.set_metatable(Some(mt))?;
    ngx.set("arg", arg)?;

    ngx.set(
        "say",
        lua.create_function(|_, args: Variadic<Value>| output("ngx.say", &args, true))?,
    )?;
    ngx.set(
        "print",
        lua.create_function(|_, args: Variadic<Value>| output("ngx.print", &args, false))?,
    )?;
    ngx.set("flush", lua.create_function(|_, _: MultiValue| Ok(1))?)?;
    ngx.set("exit", lua.create_async_function(exit)?)?;

    // logging
    ngx.set(
        "log",
        lua.create_function(|lua, args: MultiValue| {
            let mut it = args.into_iter();
            let level = match it.next() {
                Some(Value::Integer(l)) => l,
                Some(Value::Number(l)) => l as i64,
                _ => return Err(lua_err("ngx.log: bad argument #1 (level expected)")),
            };
            if !(0..=8).contains(&level) {
                return Err(lua_err(format!("ngx.log: bad log level: {level}")));
            }
            log_line(lua, level, it.collect())
        })?,
    )?;
    lua.globals().set(
        "print",
        lua.create_function(|lua, args: MultiValue| log_line(lua, 6, args))?,
    )?;

    // time
    ngx.set("now", lua.create_function(|_, ()| Ok(now()))?)?;
    ngx.set(
        "time",
        lua.create_function(|_, ()| Ok(now().floor() as i64))?,
    )?;
    ngx.set(
        "update_time",
        lua.create_function(|_, ()| {
            refresh_time();
            Ok(())
        })?,
    )?;
    ngx.set(
        "today",
        lua.create_function(|_, ()| {
            Ok(polygate_core::time::format_time(
                now() as i64,
                polygate_core::time::TimeFmt::Date,
            ))
        })?,
    )?;
    ngx.set(
        "localtime",
        lua.create_function(|_, ()| {
            Ok(polygate_core::time::format_time(
                now() as i64,
                polygate_core::time::TimeFmt::DateTime,
            ))
        })?,
    )?;
    ngx.set(
        "utctime",
        lua.create_function(|_, ()| {
            Ok(polygate_core::time::format_time(
                now() as i64,
                polygate_core::time::TimeFmt::DateTime,
            ))
        })?,
    )?;
    ngx.set(
        "http_time",
        lua.create_function(|_, t: f64| {
            Ok(polygate_core::time::format_time(
                t as i64,
                polygate_core::time::TimeFmt::Http,
            ))
        })?,
    )?;
    ngx.set(
        "cookie_time",
        lua.create_function(|_, t: f64| {
            Ok(polygate_core::time::format_time(
                t as i64,
                polygate_core::time::TimeFmt::Cookie,
            ))
        })?,
    )?;
    ngx.set(
        "sleep",
        lua.create_async_function(|_, secs: f64| async move {
            require_yield("ngx.sleep")?;
            if !(secs.is_finite() && secs >= 0.0) {
                return Err(lua_err("ngx.sleep: invalid sleeping time"));
            }
            tokio::time::sleep(polygate_model::secs(secs)).await;
            touch_time();
            Ok(())
        })?,
    )?;

    // ngx.worker / ngx.config
    let worker = lua.create_table()?;
    worker.set(
        "id",
        lua.create_function(|_, ()| Ok(polygate_core::worker::id().map(|i| i as i64)))?,
    )?;
    worker.set(
        "count",
        lua.create_function(|_, ()| Ok(polygate_core::worker::count().max(1) as i64))?,
    )?;
    worker.set(
        "pid",
        lua.create_function(|_, ()| Ok(std::process::id() as i64))?,
    )?;
    worker.set("exiting", lua.create_function(|_, ()| Ok(false))?)?;
    ngx.set("worker", worker)?;
    let config = lua.create_table()?;
    config.set("subsystem", "http")?;
    config.set("debug", false)?;
    config.set("ngx_lua_version", 10026)?;
    config.set("nginx_version", 1025003)?;
    config.set(
        "prefix",
        lua.create_function(|_, ()| {
            Ok(std::env::current_dir()
                .map(|d| format!("{}/", d.display()))
                .unwrap_or_else(|_| "./".into()))
        })?,
    )?;
    ngx.set("config", config)?;
    Ok(())
}

/// Fails unless the running phase may yield.
pub(crate) fn require_yield(api: &str) -> LuaResult<()> {
    match phase() {
        Some(p) if p.can_yield() => Ok(()),
        Some(p) => Err(lua_err(format!(
            "{api}: API disabled in the context of {} (this phase cannot yield)",
            p.context_name()
        ))),
        None => Err(lua_err(format!("{api}: no request or timer to yield in"))),
    }
}

/// `ngx.var.NAME`: the gateway's variables plus a few nginx ones.
pub(crate) fn get_var<'a>(ctx: &'a RequestCtx, name: &str) -> Option<Cow<'a, str>> {
    if name == "request_uri" {
        // nginx's variable: the target as received (APISIX's `ctx.var.request_uri` differs)
        return Some(Cow::Borrowed(&ctx.request_uri));
    }
    if let Some(v) = ctx.var(name) {
        return Some(v);
    }
    Some(match name {
        "request_time" => Cow::Owned(format!("{:.3}", ctx.started.elapsed().as_secs_f64())),
        "msec" => Cow::Owned(format!("{:.3}", now())),
        "content_type" => Cow::Borrowed(ctx.header("content-type")?),
        "content_length" => Cow::Borrowed(ctx.header("content-length")?),
        "request_body" => Cow::Owned(String::from_utf8_lossy(ctx.body.as_deref()?).into_owned()),
        "http_host" => Cow::Borrowed(ctx.header("host")?),
        "pid" => Cow::Owned(std::process::id().to_string()),
        "hostname" => Cow::Borrowed(polygate_core::time::hostname()),
        "server_name" => Cow::Borrowed(ctx.host.as_deref()?),
        _ => return None,
    })
}

/// `ngx.var.NAME = value`: `args` changes the query string; other names are request variables
/// (visible to `vars` expressions and later reads).
fn set_var(name: &str, v: &Value) -> LuaResult<()> {
    let text = match v {
        Value::Nil => None,
        other => Some(
            String::from_utf8(as_text(other).ok_or_else(|| {
                lua_err(format!("ngx.var.{name}: value must be a string or number"))
            })?)
            .map_err(|_| lua_err("ngx.var: value is not UTF-8"))?,
        ),
    };
    with_ctx_mut("ngx.var", |ctx| {
        match name {
            "args" | "query_string" => ctx.query = text.filter(|t| !t.is_empty()),
            // APISIX's `ctx.var.upstream_uri`: the exact target sent upstream (checked, like
            // every target, where the request head is written)
            "upstream_uri" => ctx.upstream_target = text.filter(|t| !t.is_empty()),
            "uri" | "request_uri" | "request_method" | "remote_addr" | "host" | "scheme" => {
                return Err(lua_err(format!("variable \"{name}\" not changeable")));
            }
            _ => ctx.set_var(name, text.unwrap_or_default()),
        }
        Ok(())
    })
}

fn get_status() -> LuaResult<i64> {
    let sent = |ctx: &RequestCtx| ctx.status.map_or(0, |s| s.as_u16() as i64);
    if matches!(phase(), Some(LuaPhase::Log | LuaPhase::BodyFilter)) {
        // the response went out: its status is on the (possibly read-only) request
        return with_ctx("ngx.status", |ctx| Ok(sent(ctx)));
    }
    with_response("ngx.status", |ctx, resp, _| match (resp, ctx) {
        (Some(r), _) => Ok(r.status.as_u16() as i64),
        (None, Some(ctx)) => Ok(crate::current::lua_req(ctx, |s| {
            s.status.map_or(0, i64::from)
        })),
        (None, None) => Ok(0),
    })
}

fn set_status(v: &Value) -> LuaResult<()> {
    let code = match v {
        Value::Integer(i) => *i,
        Value::Number(n) => *n as i64,
        Value::String(s) => s
            .to_str()?
            .parse()
            .map_err(|_| lua_err("ngx.status: not a number"))?,
        _ => return Err(lua_err("ngx.status: not a number")),
    };
    let status = u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| lua_err(format!("ngx.status: invalid status {code}")))?;
    with_response("ngx.status", |ctx, resp, phase| {
        if let Some(r) = resp {
            r.status = status;
            return Ok(());
        }
        match (ctx, phase) {
            (Some(ctx), LuaPhase::Rewrite | LuaPhase::Access | LuaPhase::BeforeProxy) => {
                crate::current::lua_req(ctx, |s| s.status = Some(status.as_u16()));
                Ok(())
            }
            _ => Err(lua_err(
                "attempt to set ngx.status after sending out response headers",
            )),
        }
    })
}

fn get_ngx_ctx(lua: &Lua) -> LuaResult<Table> {
    let existing = with_ctx("ngx.ctx", |ctx| {
        Ok(ctx
            .extensions
            .get::<crate::current::LuaReq>()
            .and_then(|s| s.ngx_ctx.clone()))
    })?;
    if let Some(t) = existing {
        return Ok(t);
    }
    let t = lua.create_table()?;
    // in the log phase the request is read-only: the table lives for this access only
    let _ = with_lua_req("ngx.ctx", |s| {
        s.ngx_ctx = Some(t.clone());
        Ok(())
    });
    Ok(t)
}

/// `ngx.header.content_type` → `content-type`.
fn header_name(k: &str) -> LuaResult<HeaderName> {
    HeaderName::from_bytes(k.replace('_', "-").as_bytes())
        .map_err(|_| lua_err(format!("invalid header name {k:?}")))
}

fn values_to_lua(lua: &Lua, vals: &[&HeaderValue]) -> LuaResult<Value> {
    match vals {
        [] => Ok(Value::Nil),
        [one] => Ok(Value::String(lua.create_string(one.as_bytes())?)),
        many => {
            let t = lua.create_table()?;
            for (i, v) in many.iter().enumerate() {
                t.raw_set(i + 1, lua.create_string(v.as_bytes())?)?;
            }
            Ok(Value::Table(t))
        }
    }
}

fn get_resp_header(lua: &Lua, k: &str) -> LuaResult<Value> {
    let name = header_name(k)?;
    with_response("ngx.header", |ctx, resp, _| {
        if let Some(r) = resp {
            let vals: Vec<&HeaderValue> = r.headers.get_all(&name).iter().collect();
            return values_to_lua(lua, &vals);
        }
        let Some(ctx) = ctx else {
            return Ok(Value::Nil);
        };
        crate::current::lua_req(ctx, |s| {
            match s.headers.iter().rev().find(|(n, _)| *n == name) {
                Some((_, Some(vals))) => values_to_lua(lua, &vals.iter().collect::<Vec<_>>()),
                _ => Ok(Value::Nil),
            }
        })
    })
}

fn set_resp_header(k: &str, v: &Value) -> LuaResult<()> {
    let name = header_name(k)?;
    let vals = super::header_values("ngx.header", k, v)?;
    let vals = (!vals.is_empty()).then(|| vals.into_vec());
    with_response("ngx.header", |ctx, resp, phase| {
        if let Some(r) = resp {
            r.headers.remove(&name);
            for v in vals.into_iter().flatten() {
                r.headers.append(name.clone(), v);
            }
            return Ok(());
        }
        match (ctx, phase) {
            (Some(ctx), LuaPhase::Rewrite | LuaPhase::Access | LuaPhase::BeforeProxy) => {
                crate::current::lua_req(ctx, |s| {
                    s.headers.retain(|(n, _)| *n != name);
                    s.headers.push((name, vals));
                });
                Ok(())
            }
            _ => Err(lua_err(format!(
                "attempt to set ngx.header.{k} after sending out response headers"
            ))),
        }
    })
}

/// Appends the text of `v` as `ngx.say`/`ngx.print` do (arrays are flattened).
fn push_output(out: &mut Vec<u8>, v: &Value, depth: usize) -> LuaResult<()> {
    match v {
        Value::Nil => out.extend_from_slice(b"nil"),
        Value::LightUserData(p) if p.0.is_null() => out.extend_from_slice(b"null"),
        Value::Table(t) if depth < 32 => {
            for item in t.sequence_values::<Value>() {
                push_output(out, &item?, depth + 1)?;
            }
        }
        other => match as_text(other) {
            Some(t) => out.extend_from_slice(&t),
            None => {
                return Err(lua_err(format!(
                    "bad argument to 'ngx.say' (string, number, boolean, nil or array table expected, got {})",
                    other.type_name()
                )));
            }
        },
    }
    Ok(())
}

fn output(api: &str, args: &[Value], newline: bool) -> LuaResult<i64> {
    match phase() {
        Some(LuaPhase::Rewrite | LuaPhase::Access | LuaPhase::BeforeProxy) => {}
        Some(p) => {
            return Err(lua_err(format!(
                "{api}: API disabled in the context of {}",
                p.context_name()
            )));
        }
        None => return Err(lua_err(format!("{api}: no request found"))),
    }
    let mut buf = Vec::new();
    for a in args {
        push_output(&mut buf, a, 0)?;
    }
    if newline {
        buf.push(b'\n');
    }
    with_lua_req(api, |s| {
        s.out.extend_from_slice(&buf);
        Ok(1)
    })
}

async fn exit(_lua: Lua, code: i64) -> LuaResult<()> {
    match phase() {
        Some(LuaPhase::Timer) => {
            TIMER_EXIT.with(|t| t.set(true));
            std::future::pending::<()>().await;
            Ok(())
        }
        Some(p @ (LuaPhase::Rewrite | LuaPhase::Access | LuaPhase::BeforeProxy)) => {
            let _ = p;
            with_lua_req("ngx.exit", |s| {
                s.exit = Some(code);
                Ok(())
            })?;
            // the runner sees the exit code and drops this coroutine
            std::future::pending::<()>().await;
            Ok(())
        }
        Some(LuaPhase::HeaderFilter) => {
            with_lua_req("ngx.exit", |s| {
                s.exit = Some(code);
                Ok(())
            })?;
            Err(lua_err(EXIT_UNWIND))
        }
        Some(p) => Err(lua_err(format!(
            "ngx.exit: API disabled in the context of {}",
            p.context_name()
        ))),
        None => Err(lua_err("ngx.exit: no request found")),
    }
}

fn log_line(lua: &Lua, level: i64, args: MultiValue) -> LuaResult<()> {
    let tostring: Function = lua.globals().get("tostring")?;
    let mut msg = Vec::new();
    for a in args {
        match &a {
            Value::Nil => msg.extend_from_slice(b"nil"),
            Value::LightUserData(p) if p.0.is_null() => msg.extend_from_slice(b"null"),
            Value::Table(_) | Value::UserData(_) | Value::Function(_) | Value::Thread(_) => {
                let s: mlua::String = tostring.call(a)?;
                msg.extend_from_slice(&s.as_bytes());
            }
            other => msg.extend_from_slice(&as_text(other).unwrap_or_default()),
        }
    }
    let msg = String::from_utf8_lossy(&msg);
    let at = lua
        .inspect_stack(1, |d| {
            let src = d.source();
            let name = src
                .short_src
                .as_deref()
                .map(str::to_owned)
                .unwrap_or_default();
            format!("{name}:{}", d.current_line().unwrap_or(0))
        })
        .unwrap_or_default();
    match level {
        0..=4 => tracing::error!("[lua] {at}: {msg}"),
        5 => tracing::warn!("[lua] {at}: {msg}"),
        6 | 7 => tracing::info!("[lua] {at}: {msg}"),
        _ => tracing::debug!("[lua] {at}: {msg}"),
    }
    Ok(())
}
