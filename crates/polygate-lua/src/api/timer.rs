//! `ngx.timer.at` / `ngx.timer.every`: callbacks run in their own coroutine on the worker that
//! created them and may yield (sleep, FFI calls). Timers of a Lua state that a settings change
//! replaced run once more with `premature = true` and stop, as nginx workers do on reload.

use std::cell::Cell;

use mlua::{Function, Lua, MultiValue, Result as LuaResult, Table, Value};

use super::lua_err;
use crate::vm::Settings;

/// Signalled when a settings change replaced the Lua states: timers of old states run their
/// premature round at once instead of at their next expiry.
pub(crate) static STATES_REPLACED: tokio::sync::Notify = tokio::sync::Notify::const_new();

thread_local! {
    static PENDING: Cell<usize> = const { Cell::new(0) };
    static RUNNING: Cell<usize> = const { Cell::new(0) };
}

fn add(c: &'static std::thread::LocalKey<Cell<usize>>, d: isize) {
    c.with(|v| v.set(v.get().saturating_add_signed(d)));
}

pub(crate) fn install(lua: &Lua, ngx: &Table, settings: &Settings) -> LuaResult<()> {
    let timer = lua.create_table()?;
    let max = settings.max_pending_timers;
    timer.set(
        "at",
        lua.create_function(move |lua, (delay, cb, args): (f64, Function, MultiValue)| {
            schedule(lua, delay, cb, args, false, max)
        })?,
    )?;
    timer.set(
        "every",
        lua.create_function(move |lua, (delay, cb, args): (f64, Function, MultiValue)| {
            if delay <= 0.0 {
                return Err(lua_err("bad argument #1 to 'every' (delay must be > 0)"));
            }
            schedule(lua, delay, cb, args, true, max)
        })?,
    )?;
    timer.set(
        "pending_count",
        lua.create_function(|_, ()| Ok(PENDING.with(Cell::get)))?,
    )?;
    timer.set(
        "running_count",
        lua.create_function(|_, ()| Ok(RUNNING.with(Cell::get)))?,
    )?;
    ngx.set("timer", timer)?;
    Ok(())
}

fn schedule(
    lua: &Lua,
    delay: f64,
    cb: Function,
    args: MultiValue,
    every: bool,
    max: usize,
) -> LuaResult<(Option<bool>, Option<String>)> {
    if !(delay.is_finite() && delay >= 0.0) {
        return Err(lua_err("bad argument #1 to 'at' (delay must be >= 0)"));
    }
    if crate::current::phase() == Some(crate::current::LuaPhase::Load) {
        return Ok((
            None,
            Some("timers cannot start while a script loads (start them from a handler)".into()),
        ));
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Ok((
            None,
            Some("no event loop here (start timers from handlers or other timers)".into()),
        ));
    }
    if PENDING.with(Cell::get) >= max {
        return Ok((None, Some("too many pending timers".into())));
    }
    let generation = crate::vm::generation_of(lua);
    let lua = lua.clone();
    add(&PENDING, 1);
    let delay = polygate_model::secs(delay);
    tokio::spawn(async move {
        loop {
            if crate::vm::current_generation() == generation {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = STATES_REPLACED.notified() => {}
                }
            }
            let premature = crate::vm::current_generation() != generation;
            if !every {
                add(&PENDING, -1);
            }
            add(&RUNNING, 1);
            let mut call_args = vec![Value::Boolean(premature)];
            call_args.extend(args.iter().cloned());
            if let Err(e) = crate::run::run_timer(&lua, &cb, MultiValue::from_vec(call_args)).await
            {
                tracing::error!("lua timer failed: {e}");
            }
            add(&RUNNING, -1);
            if !every || premature {
                break;
            }
        }
        if every {
            add(&PENDING, -1);
        }
    });
    Ok((Some(true), None))
}
