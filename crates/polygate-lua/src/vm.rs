//! Lua states: one per worker thread (created on first use), never shared across threads, so
//! no lock is held across requests. Settings changes (a reload) replace the thread's state at
//! its next use; handlers already running keep the old one until they finish.
#![allow(
    unsafe_code,
    reason = "loading the debug library needs mlua's unsafe constructor"
)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mlua::{Function, HookTriggers, Lua, LuaOptions, Result as LuaResult, StdLib, Table, Value};
use polygate_model::LuaConfig;

use crate::current::{Enter, LuaPhase};

/// Process-wide Lua settings (from `gateway.lua`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `lua_package_path`.
    pub package_path: Option<String>,
    /// `lua_package_cpath`.
    pub package_cpath: Option<String>,
    /// Bytes per state, 0 = none.
    pub memory_limit: usize,
    /// Instructions between yields, 0 = none.
    pub instruction_limit: u64,
    /// Time between yields; zero = none. With no instruction limit either, the JIT is on.
    pub time_limit: Duration,
    /// Pending timers per worker.
    pub max_pending_timers: usize,
    /// Default wait for `ngx.load_ffi` calls.
    pub ffi_timeout: Duration,
}

impl Settings {
    /// Settings from the configuration section.
    pub fn from_config(c: &LuaConfig) -> Settings {
        Settings {
            package_path: c.package_path.clone(),
            package_cpath: c.package_cpath.clone(),
            memory_limit: c.memory_limit.0 as usize,
            instruction_limit: c.instruction_limit,
            time_limit: polygate_model::secs(c.time_limit),
            max_pending_timers: c.max_pending_timers,
            ffi_timeout: polygate_model::secs(c.ffi_timeout),
        }
    }
}

struct Versioned {
    generation: u64,
    settings: Arc<Settings>,
}

fn global() -> &'static ArcSwap<Versioned> {
    static S: std::sync::OnceLock<ArcSwap<Versioned>> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        ArcSwap::from_pointee(Versioned {
            generation: 0,
            settings: Arc::new(Settings::from_config(&LuaConfig::default())),
        })
    })
}

/// Applies `gateway.lua` (first load and reloads): new settings make every worker build a
/// fresh Lua state at its next handler; shared dictionaries are declared.
pub fn configure(c: &LuaConfig) {
    crate::api::shdict::declare(&c.shared_dict);
    let s = Settings::from_config(c);
    let cur = global().load();
    if *cur.settings != s {
        global().store(Arc::new(Versioned {
            generation: cur.generation + 1,
            settings: Arc::new(s),
        }));
        crate::api::timer::STATES_REPLACED.notify_waiters();
    }
}

/// The current settings.
pub fn settings() -> Arc<Settings> {
    global().load().settings.clone()
}

/// How to turn a script's text into a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The text is the handler's body (`access_by_lua_block { ... }`).
    Block,
    /// The text returns the handler (`return function(conf, ctx) ... end`, serverless).
    Factory,
}

/// A script of a plugin instance, compiled lazily in each worker's state.
#[derive(Debug)]
pub struct Source {
    /// Unique id (the per-state cache key).
    pub id: u64,
    /// Chunk name in errors and tracebacks (`=serverless-pre-function[0]`).
    pub name: String,
    /// Lua text.
    pub code: String,
    /// Block or factory.
    pub kind: SourceKind,
    /// The plugin configuration handed to factory handlers as `conf`.
    pub conf: Option<serde_json::Value>,
}

impl Source {
    /// A new source with a fresh id.
    pub fn new(
        name: String,
        code: String,
        kind: SourceKind,
        conf: Option<serde_json::Value>,
    ) -> Arc<Source> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Source {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            name,
            code,
            kind,
            conf,
        })
    }
}

/// One Lua state with the `ngx` API installed.
pub(crate) struct Vm {
    pub lua: Lua,
    generation: u64,
    /// `function(id, ...)`: calls the compiled handler `id` under `xpcall`, returning
    /// `true, results...` or `false, message-with-traceback` (see [`crate::run::unwrap_run`]).
    pub runner: Function,
    /// `function(f, ...)`: the same for a function value.
    pub run_fn: Function,
    /// Compiled handlers by source id (a Lua table, so a call passes only the id).
    handler_table: Table,
    /// Compiled handlers by source id.
    handlers: RefCell<HashMap<u64, Handler>>,
    inserts: Cell<u32>,
    /// The settings the state was built with.
    pub settings: Arc<Settings>,
}

/// A compiled handler in one state.
struct Handler {
    source: Weak<Source>,
    conf: Option<Table>,
}

/// Registry key of the runner function (timers use it).
pub(crate) const RUNNER_KEY: &str = "polygate.runner";

/// The settings generation a state was built for (app data).
struct Generation(u64);

/// The generation of the state `lua`.
pub(crate) fn generation_of(lua: &Lua) -> u64 {
    lua.app_data_ref::<Generation>().map_or(0, |g| g.0)
}

/// The current settings generation.
pub(crate) fn current_generation() -> u64 {
    global().load().generation
}

thread_local! {
    static VM: RefCell<Option<Rc<Vm>>> = const { RefCell::new(None) };
    /// Hook ticks left before the running handler is stopped; `u64::MAX` = unlimited.
    static TICKS_LEFT: Cell<u64> = const { Cell::new(u64::MAX) };
    static TICKS_PER_RUN: Cell<u64> = const { Cell::new(u64::MAX) };
    static KILLED: Cell<bool> = const { Cell::new(false) };
    /// When the running step must have yielded (`time_limit`); `None` = no time limit.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    static TIME_PER_RUN: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// Coroutines kept for reuse per state.
const THREAD_POOL: usize = 256;

/// Instructions per count-hook call.
const HOOK_EVERY: u32 = 1000;

/// Starts a new instruction budget (each synchronous step of a handler gets one).
pub(crate) fn reset_budget() {
    TICKS_LEFT.with(|t| t.set(TICKS_PER_RUN.with(Cell::get)));
    KILLED.with(|k| k.set(false));
    if let Some(limit) = TIME_PER_RUN.with(Cell::get) {
        DEADLINE.with(|d| d.set(Some(Instant::now() + limit)));
    }
}

/// Whether the running step has used half of its time or instruction budget. An operation
/// that could complete without yielding (an FFI call answered at once) yields anyway then, so
/// a loop of such operations neither runs into the limits nor keeps the worker's other
/// requests waiting for longer than half a budget.
pub(crate) fn half_budget_spent() -> bool {
    let per_run = TICKS_PER_RUN.with(Cell::get);
    if per_run != u64::MAX && TICKS_LEFT.with(Cell::get) < per_run / 2 {
        return true;
    }
    match (DEADLINE.with(Cell::get), TIME_PER_RUN.with(Cell::get)) {
        (Some(deadline), Some(limit)) => Instant::now() + limit / 2 > deadline,
        _ => false,
    }
}

/// Whether the running handler hit the instruction limit (pcall cannot swallow that).
pub(crate) fn killed() -> bool {
    KILLED.with(Cell::get)
}

/// This thread's Lua state, created (or replaced after a settings change) as needed.
pub(crate) fn vm() -> LuaResult<Rc<Vm>> {
    let cur = global().load();
    if let Some(vm) = VM.with(|v| v.borrow().clone())
        && vm.generation == cur.generation
    {
        return Ok(vm);
    }
    let vm = Rc::new(Vm::new(cur.generation, cur.settings.clone())?);
    VM.with(|v| *v.borrow_mut() = Some(vm.clone()));
    Ok(vm)
}

/// Drops this thread's state (after it ran out of memory); the next handler gets a new one.
pub(crate) fn discard_vm() {
    VM.with(|v| v.borrow_mut().take());
}

const PRELUDE: &str = r#"
local xpcall, pcall, error, tostring, traceback = xpcall, pcall, error, tostring, debug.traceback
local killed = ...
local function handler(e)
  if type(e) ~= "string" then e = tostring(e) end
  return traceback(e, 1)
end
-- a handler stopped by the instruction limit must not be resumed by a pcall in the script
local function check(ok, ...)
  if not ok and killed() then error((...), 0) end
  return ok, ...
end
_G.pcall = function(...) return check(pcall(...)) end
_G.xpcall = function(...) return check(xpcall(...)) end
local handlers = {}
-- both return true, results... or false, message with traceback
local function run_id(id, ...) return xpcall(handlers[id], handler, ...) end
local function run_fn(f, ...) return xpcall(f, handler, ...) end
return run_id, run_fn, handlers
"#;

impl Vm {
    fn new(generation: u64, settings: Arc<Settings>) -> LuaResult<Vm> {
        // SAFETY: the debug library is what OpenResty scripts expect (debug.traceback); the
        // scripts are the operator's own code, as in OpenResty. FFI stays out.
        let lua = unsafe {
            Lua::unsafe_new_with(
                StdLib::ALL_SAFE | StdLib::DEBUG,
                // finished handler coroutines are reused instead of collected
                LuaOptions::new().thread_pool_size(THREAD_POOL),
            )
        };
        if settings.memory_limit > 0 {
            lua.set_memory_limit(settings.memory_limit)?;
        }
        let time_limit = (!settings.time_limit.is_zero()).then_some(settings.time_limit);
        let per_run = if settings.instruction_limit == 0 && time_limit.is_none() {
            u64::MAX
        } else {
            // the count hook needs the interpreter: compiled traces skip hooks
            lua.load("jit.off()").exec()?;
            lua.set_global_hook(
                HookTriggers::new().every_nth_instruction(HOOK_EVERY),
                move |_, _| {
                    let left = TICKS_LEFT.with(|t| {
                        let v = t.get().saturating_sub(1);
                        t.set(v);
                        v
                    });
                    if left == 0 {
                        KILLED.with(|k| k.set(true));
                        return Err(mlua::Error::runtime(format!(
                            "instruction limit exceeded ({} instructions without yielding)",
                            TICKS_PER_RUN
                                .with(Cell::get)
                                .saturating_mul(HOOK_EVERY as u64)
                        )));
                    }
                    if let Some(deadline) = DEADLINE.with(Cell::get)
                        && Instant::now() > deadline
                    {
                        KILLED.with(|k| k.set(true));
                        return Err(mlua::Error::runtime(format!(
                            "time limit exceeded ({:?} without yielding)",
                            TIME_PER_RUN.with(Cell::get).unwrap_or_default()
                        )));
                    }
                    Ok(mlua::VmState::Continue)
                },
            )?;
            if settings.instruction_limit == 0 {
                u64::MAX
            } else {
                (settings.instruction_limit / HOOK_EVERY as u64).max(1)
            }
        };
        TIME_PER_RUN.with(|t| t.set(time_limit));
        TICKS_PER_RUN.with(|t| t.set(per_run));
        reset_budget();
        let package: Table = lua.globals().get("package")?;
        let default_path: String = package.get("path")?;
        let default_cpath: String = package.get("cpath")?;
        if let Some(p) = &settings.package_path {
            package.set("path", expand_path(p, &default_path))?;
        }
        if let Some(p) = &settings.package_cpath {
            package.set("cpath", expand_path(p, &default_cpath))?;
        }
        crate::api::install(&lua, &settings)?;
        let killed_fn = lua.create_function(|_, ()| Ok(killed()))?;
        let (runner, run_fn, handler_table): (Function, Function, Table) = lua
            .load(PRELUDE)
            .set_name("=polygate.prelude")
            .call(killed_fn)?;
        lua.set_named_registry_value(RUNNER_KEY, run_fn.clone())?;
        lua.set_app_data(Generation(generation));
        Ok(Vm {
            lua,
            generation,
            runner,
            run_fn,
            handler_table,
            handlers: RefCell::new(HashMap::new()),
            inserts: Cell::new(0),
            settings,
        })
    }

    /// The handler function of `src` in this state (compiled and, for factories, run once).
    pub(crate) fn handler(&self, src: &Arc<Source>) -> LuaResult<Option<Table>> {
        if let Some(h) = self.handlers.borrow().get(&src.id) {
            return Ok(h.conf.clone());
        }
        let func = self.compile(src)?;
        let conf = match &src.conf {
            Some(c) => match crate::api::json::json_to_lua(&self.lua, c.clone())? {
                Value::Table(t) => Some(t),
                _ => None,
            },
            None => None,
        };
        self.handler_table.raw_set(src.id, func)?;
        let mut map = self.handlers.borrow_mut();
        self.inserts.set(self.inserts.get() + 1);
        if self.inserts.get().is_multiple_of(64) {
            let table = &self.handler_table;
            map.retain(|id, h| {
                let live = h.source.strong_count() > 0;
                if !live {
                    let _ = table.raw_set(*id, Value::Nil);
                }
                live
            });
        }
        map.insert(
            src.id,
            Handler {
                source: Arc::downgrade(src),
                conf: conf.clone(),
            },
        );
        Ok(conf)
    }

    fn compile(&self, src: &Source) -> LuaResult<Function> {
        let chunk = self
            .lua
            .load(src.code.as_str())
            .set_name(format!("={}", src.name))
            .into_function()?;
        match src.kind {
            SourceKind::Block => Ok(chunk),
            SourceKind::Factory => {
                let _e = Enter::detached(LuaPhase::Load);
                reset_budget();
                let v = crate::run::unwrap_run(self.run_fn.call(chunk))?;
                match v.into_iter().next().unwrap_or(Value::Nil) {
                    Value::Function(f) => Ok(f),
                    other => Err(mlua::Error::runtime(format!(
                        "only accept Lua function, the input code type is {}",
                        other.type_name()
                    ))),
                }
            }
        }
    }
}

/// `lua_package_path` semantics: `;;` is replaced by the default path.
fn expand_path(p: &str, default: &str) -> String {
    if p.contains(";;") {
        p.replacen(";;", &format!(";{default};"), 1)
    } else {
        p.to_owned()
    }
}

/// Compiles `src` in this thread's state (syntax check for configuration validation);
/// factories are also run, as APISIX does, to check they return a function.
pub fn check_source(src: &Arc<Source>) -> Result<(), String> {
    let vm = vm().map_err(|e| e.to_string())?;
    match src.kind {
        SourceKind::Block => vm
            .lua
            .load(src.code.as_str())
            .set_name(format!("={}", src.name))
            .into_function()
            .map(drop),
        SourceKind::Factory => vm.handler(src).map(drop),
    }
    .map_err(|e| e.to_string())
}

/// Compiles `src` on a throwaway Lua state without running anything (`polygate validate`:
/// a serverless function's chunk is not executed, the worker states are not touched).
pub fn compile_only(src: &Arc<Source>) -> Result<(), String> {
    mlua::Lua::new()
        .load(src.code.as_str())
        .set_name(format!("={}", src.name))
        .into_function()
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_path() {
        assert_eq!(expand_path("/a/?.lua;;", "D"), "/a/?.lua;D;");
        assert_eq!(expand_path("/a/?.lua", "D"), "/a/?.lua");
    }
}
