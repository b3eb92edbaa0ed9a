//! Running Lua handlers: yieldable phases as coroutines behind [`Flow::Pending`], the filter
//! and log phases as plain calls, timers as their own tasks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use mlua::{Function, Lua, MultiValue, Result as LuaResult, Table, Value};
use polygate_core::{Flow, GatewayError, PluginError, PluginResponse, RequestCtx, ResponseHead};

use crate::api::ffi_call::{CallSlot, Driving};
use crate::api::ngx::{EXIT_UNWIND, TIMER_EXIT, touch_time};
use crate::current::{Enter, LuaPhase, LuaReq, chunk_eof, lua_req};
use crate::vm::{Source, SourceKind, Vm, discard_vm, reset_budget, vm};

/// What a handler ended with.
type Outcome = Result<Option<PluginResponse>, PluginError>;

/// Handlers that may wait at once on one worker. Each holds a coroutine reference, and a Lua
/// state takes about 8000 references at a time (mlua panics beyond); above this bound a
/// request gets an immediate 503 instead.
const MAX_WAITING: usize = 2000;

thread_local! {
    static WAITING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    static REFUSED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one waiting handler for as long as it lives.
struct Waiting;

impl Waiting {
    fn new() -> Waiting {
        WAITING.with(|w| w.set(w.get() + 1));
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.with(|w| w.set(w.get().saturating_sub(1)));
    }
}

fn plugin_error(plugin: &str, phase: LuaPhase, e: &mlua::Error) -> PluginError {
    let message = format!("{} phase: {}", phase.name(), error_text(e));
    after_error(&message);
    PluginError {
        plugin: plugin.to_owned(),
        message,
    }
}

/// Turns the runner's `ok, ...` into a result.
pub(crate) fn unwrap_run(r: LuaResult<MultiValue>) -> LuaResult<MultiValue> {
    let mut vals = r?.into_vec();
    if vals.is_empty() {
        return Ok(MultiValue::new());
    }
    match vals.remove(0) {
        Value::Boolean(false) => {
            let msg = match vals.into_iter().next() {
                Some(Value::String(s)) => s.to_string_lossy(),
                Some(other) => format!("{other:?}"),
                None => "unknown error".into(),
            };
            Err(mlua::Error::RuntimeError(msg))
        }
        _ => Ok(MultiValue::from_vec(vals)),
    }
}

/// The message of a Lua error (with its traceback when Lua produced one).
pub(crate) fn error_text(e: &mlua::Error) -> String {
    match e {
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { traceback, cause } => format!("{cause}\n{traceback}"),
        other => other.to_string(),
    }
}

/// After an out-of-memory error: collect garbage, and replace the state if it stays full.
fn after_error(message: &str) {
    if !message.contains("not enough memory") {
        return;
    }
    if let Ok(vm) = vm() {
        let _ = vm.lua.gc_collect();
        let _ = vm.lua.gc_collect();
        let limit = vm.settings.memory_limit;
        if limit > 0 && vm.lua.used_memory() > limit / 10 * 9 {
            tracing::error!(
                "lua: state still uses {} of its {limit} bytes after a full collection; replacing it",
                vm.lua.used_memory()
            );
            discard_vm();
        }
    }
}

/// The arguments for a handler: its id, then `(conf, ctx)` for serverless functions (`api`
/// gives the `ctx`).
fn handler_args(
    src: &Arc<Source>,
    conf: Option<Table>,
    api: impl FnOnce() -> LuaResult<Table>,
) -> LuaResult<MultiValue> {
    let mut v = vec![Value::Integer(src.id as i64)];
    if src.kind == SourceKind::Factory {
        v.push(conf.map_or(Value::Nil, Value::Table));
        v.push(Value::Table(api()?));
    }
    Ok(MultiValue::from_vec(v))
}

/// APISIX's `ctx` for serverless functions: `ctx.var` plus the matched ids.
fn new_api_ctx(lua: &Lua, ctx: &RequestCtx) -> LuaResult<Table> {
    let t = lua.create_table()?;
    t.set(
        "var",
        lua.named_registry_value::<Value>(crate::api::ngx::CTX_VAR)?,
    )?;
    t.set("route_id", ctx.route_id.as_deref())?;
    t.set("service_id", ctx.service_id.as_deref())?;
    t.set(
        "consumer_name",
        ctx.consumer.as_ref().map(|c| c.username.clone()),
    )?;
    Ok(t)
}

/// The request's `ctx` (one per request, shared by its serverless functions and phases).
fn api_ctx(lua: &Lua, ctx: &mut RequestCtx) -> LuaResult<Table> {
    if let Some(t) = lua_req(ctx, |s| s.api_ctx.clone()) {
        return Ok(t);
    }
    let t = new_api_ctx(lua, ctx)?;
    lua_req(ctx, |s| s.api_ctx = Some(t.clone()));
    Ok(t)
}

fn prepare(
    plugin: &str,
    phase: LuaPhase,
    src: &Arc<Source>,
    ctx: &mut RequestCtx,
) -> Result<(std::rc::Rc<Vm>, MultiValue), PluginError> {
    touch_time();
    let vm = vm().map_err(|e| plugin_error(plugin, phase, &e))?;
    let conf = vm
        .handler(src)
        .map_err(|e| plugin_error(plugin, phase, &e))?;
    let args = handler_args(src, conf, || api_ctx(&vm.lua, ctx))
        .map_err(|e| plugin_error(plugin, phase, &e))?;
    Ok((vm, args))
}

/// Runs a handler of a yieldable phase. A handler that finishes without waiting costs no
/// allocation beyond the coroutine; one that waits becomes [`Flow::Pending`].
pub(crate) fn run_request<'a>(
    plugin: &'a str,
    phase: LuaPhase,
    ctx: &'a mut RequestCtx,
    src: &'a Arc<Source>,
) -> Flow<'a> {
    if WAITING.with(|w| w.get()) >= MAX_WAITING {
        // logged on the first refusal and every 1000th after it, not for each
        let n = REFUSED.with(|r| {
            r.set(r.get() + 1);
            r.get()
        });
        if n % 1000 == 1 {
            tracing::warn!(
                "{plugin}: {MAX_WAITING} Lua handlers already wait on this worker; answering 503 ({n} so far)"
            );
        }
        return Flow::Respond(
            GatewayError::Overloaded("too many Lua handlers waiting on this worker")
                .into_response(),
        );
    }
    let (vm, args) = match prepare(plugin, phase, src, ctx) {
        Ok(x) => x,
        Err(e) => return Flow::Fail(e),
    };
    let mut fut = vm.runner.call_async::<MultiValue>(args);
    drop(vm);
    let mut cx = Context::from_waker(Waker::noop());
    let mut call = CallSlot::default();
    match step(&mut fut, &mut call, phase, ctx, &mut cx) {
        Poll::Ready(r) => into_flow(finish(plugin, phase, src.kind, ctx, r)),
        Poll::Pending if exit_requested(ctx) => {
            into_flow(finish(plugin, phase, src.kind, ctx, Ok(MultiValue::new())))
        }
        Poll::Pending => Flow::Pending(Box::pin(PhaseRun {
            ctx,
            fut,
            call,
            plugin,
            phase,
            kind: src.kind,
            _waiting: Waiting::new(),
        })),
    }
}

fn into_flow<'a>(o: Outcome) -> Flow<'a> {
    match o {
        Ok(None) => Flow::Continue,
        Ok(Some(r)) => Flow::Respond(r),
        Err(e) => Flow::Fail(e),
    }
}

fn step<F: Future + Unpin>(
    fut: &mut F,
    call: &mut CallSlot,
    phase: LuaPhase,
    ctx: &mut RequestCtx,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    let _e = Enter::request(phase, ctx);
    let _d = Driving::new(cx.waker(), call);
    reset_budget();
    touch_time();
    Pin::new(fut).poll(cx)
}

fn exit_requested(ctx: &mut RequestCtx) -> bool {
    ctx.extensions
        .get::<LuaReq>()
        .is_some_and(|s| s.exit.is_some())
}

/// A handler waiting on something (sleep, FFI call, ...): each poll resumes its coroutine with
/// the request published for the callbacks.
struct PhaseRun<'a, F> {
    ctx: &'a mut RequestCtx,
    /// The coroutine (dropped before `call`: a waiting coroutine is terminated first).
    fut: F,
    /// The FFI call the coroutine waits on, cancelled if the handler is dropped.
    call: CallSlot,
    plugin: &'a str,
    phase: LuaPhase,
    kind: SourceKind,
    _waiting: Waiting,
}

impl<F> Future for PhaseRun<'_, F>
where
    F: Future<Output = LuaResult<MultiValue>> + Unpin,
{
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        match step(&mut this.fut, &mut this.call, this.phase, this.ctx, cx) {
            Poll::Ready(r) => Poll::Ready(finish(this.plugin, this.phase, this.kind, this.ctx, r)),
            Poll::Pending if exit_requested(this.ctx) => Poll::Ready(finish(
                this.plugin,
                this.phase,
                this.kind,
                this.ctx,
                Ok(MultiValue::new()),
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A simple error page for `ngx.exit(status)` without output.
fn default_page(status: StatusCode) -> Bytes {
    if status.as_u16() < 300 {
        return Bytes::new();
    }
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    Bytes::from(format!(
        "<html>\n<head><title>{line}</title></head>\n<body>\n<h1>{line}</h1>\n<hr>polygate\n</body>\n</html>\n"
    ))
}

/// A response made by Lua: status, the headers set with `ngx.header`, and the body.
fn lua_response(ctx: &mut RequestCtx, status: StatusCode, body: Option<Vec<u8>>) -> PluginResponse {
    let (headers, _) = lua_req(ctx, |s| (std::mem::take(&mut s.headers), ()));
    let is_page = body.is_none();
    let body = match body {
        Some(b) => Bytes::from(b),
        None => default_page(status),
    };
    let mut r = PluginResponse::new(status, body);
    for (name, vals) in headers {
        r.headers.remove(&name);
        for v in vals.into_iter().flatten() {
            r.headers.append(name.clone(), v);
        }
    }
    if !r.body.is_empty() && !r.headers.contains_key(header::CONTENT_TYPE) {
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if is_page { "text/html" } else { "text/plain" }),
        );
    }
    r
}

fn finish(
    plugin: &str,
    phase: LuaPhase,
    kind: SourceKind,
    ctx: &mut RequestCtx,
    r: LuaResult<MultiValue>,
) -> Outcome {
    let r = unwrap_run(r);
    let (exit, out, status) = match ctx.extensions.get_mut::<LuaReq>() {
        Some(s) => (s.exit.take(), std::mem::take(&mut s.out), s.status),
        None => (None, Vec::new(), None),
    };
    let out = (!out.is_empty()).then_some(out);
    let ok_status = |s: Option<u16>| {
        s.and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK)
    };
    if let Some(code) = exit {
        return match code {
            200..=999 => {
                let st = StatusCode::from_u16(code as u16).unwrap_or(StatusCode::OK);
                Ok(Some(lua_response(ctx, st, out)))
            }
            0 | -4 | -5 => match out {
                Some(o) => Ok(Some(lua_response(ctx, ok_status(status), Some(o)))),
                None => Ok(None),
            },
            other => Err(PluginError {
                plugin: plugin.to_owned(),
                message: format!("{} phase: ngx.exit({other})", phase.name()),
            }),
        };
    }
    let vals = match r {
        Ok(v) => v,
        Err(e) => return Err(plugin_error(plugin, phase, &e)),
    };
    if kind == SourceKind::Factory {
        // APISIX plugin convention: `return status, body`
        let mut it = vals.into_iter();
        let code = match it.next() {
            Some(Value::Integer(c)) => Some(c),
            Some(Value::Number(c)) => Some(c as i64),
            _ => None,
        };
        if let Some(code) = code {
            let st = u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| PluginError {
                    plugin: plugin.to_owned(),
                    message: format!("{} phase: invalid status {code}", phase.name()),
                })?;
            let body = match it.next() {
                Some(Value::String(s)) => Some(s.as_bytes().to_vec()),
                Some(Value::Table(t)) => {
                    let json = vm()
                        .and_then(|vm| crate::api::json::encode_plain(&vm.lua, &Value::Table(t)))
                        .map_err(|e| plugin_error(plugin, phase, &e))?;
                    lua_req(ctx, |s| {
                        s.headers.retain(|(n, _)| n != header::CONTENT_TYPE);
                        s.headers.push((
                            header::CONTENT_TYPE,
                            Some(vec![HeaderValue::from_static("application/json")]),
                        ));
                    });
                    Some(json)
                }
                _ => out,
            };
            return Ok(Some(lua_response(ctx, st, body)));
        }
    }
    match out {
        Some(o) => Ok(Some(lua_response(ctx, ok_status(status), Some(o)))),
        None => Ok(None),
    }
}

/// Applies response headers set with `ngx.header` before the response existed.
pub(crate) fn apply_pending_headers(ctx: &mut RequestCtx, resp: &mut ResponseHead) {
    let Some(s) = ctx.extensions.get_mut::<LuaReq>() else {
        return;
    };
    for (name, vals) in std::mem::take(&mut s.headers) {
        resp.headers.remove(&name);
        for v in vals.into_iter().flatten() {
            resp.headers.append(name.clone(), v);
        }
    }
}

fn log_failure(plugin: &str, phase: LuaPhase, e: &mlua::Error) {
    let err = plugin_error(plugin, phase, e);
    tracing::error!("{err}");
}

/// `header_filter`: a plain call; an error turns the response into a 500.
pub(crate) fn run_header_filter(
    plugin: &str,
    src: &Arc<Source>,
    ctx: &mut RequestCtx,
    resp: &mut ResponseHead,
) {
    let phase = LuaPhase::HeaderFilter;
    let r = prepare(plugin, phase, src, ctx).map(|(vm, args)| {
        let _e = Enter::header_filter(ctx, resp);
        reset_budget();
        unwrap_run(vm.runner.call::<MultiValue>(args))
    });
    let exit = ctx
        .extensions
        .get_mut::<LuaReq>()
        .and_then(|s| s.exit.take());
    let failed = match r {
        Err(e) => {
            tracing::error!("{e}");
            true
        }
        Ok(Err(e)) if exit.is_none() || !error_text(&e).contains(EXIT_UNWIND) => {
            log_failure(plugin, phase, &e);
            true
        }
        _ => false,
    };
    if let Some(code) = exit.filter(|c| (200..=999).contains(c))
        && let Ok(st) = StatusCode::from_u16(code as u16)
    {
        let out = lua_req(ctx, |s| std::mem::take(&mut s.out));
        resp.status = st;
        resp.headers.remove(header::CONTENT_LENGTH);
        ctx.body_override = Some(if out.is_empty() {
            default_page(st)
        } else {
            Bytes::from(out)
        });
    } else if failed {
        let (st, body) = polygate_core::GatewayError::Plugin(PluginError {
            plugin: plugin.to_owned(),
            message: String::new(),
        })
        .rescue();
        resp.status = st;
        resp.headers.clear();
        resp.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        ctx.body_override = Some(body);
    }
}

/// `body_filter`: a plain call per chunk; `ngx.arg[2] = true` drops the rest of the body.
pub(crate) fn run_body_filter(
    plugin: &str,
    src: &Arc<Source>,
    ctx: &mut RequestCtx,
    chunk: &mut Bytes,
    eof: bool,
) {
    if ctx.extensions.get::<BodyDone>().is_some() {
        *chunk = Bytes::new();
        return;
    }
    let phase = LuaPhase::BodyFilter;
    let (vm, args) = match prepare(plugin, phase, src, ctx) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("{e}");
            return;
        }
    };
    let (r, ended) = {
        let _e = Enter::body_filter(ctx, chunk, eof);
        reset_budget();
        let r = unwrap_run(vm.runner.call::<MultiValue>(args));
        (r, chunk_eof())
    };
    if let Err(e) = r {
        log_failure(plugin, phase, &e);
    }
    if ended && !eof {
        ctx.extensions.insert(BodyDone);
    }
}

/// Marks a body that a filter ended early.
#[derive(Clone)]
struct BodyDone;

/// `log`: a plain call after the response.
pub(crate) fn run_log(plugin: &str, src: &Arc<Source>, ctx: &RequestCtx) {
    let phase = LuaPhase::Log;
    touch_time();
    let vm = match vm() {
        Ok(v) => v,
        Err(e) => {
            log_failure(plugin, phase, &e);
            return;
        }
    };
    let r = vm.handler(src).and_then(|conf| {
        // the log phase cannot store a `ctx` in the read-only request: one made earlier is
        // reused, otherwise a fresh one serves this call
        let stored = ctx
            .extensions
            .get::<LuaReq>()
            .and_then(|s| s.api_ctx.clone());
        let args = handler_args(src, conf, || match stored {
            Some(t) => Ok(t),
            None => new_api_ctx(&vm.lua, ctx),
        })?;
        let _e = Enter::log(ctx);
        reset_budget();
        unwrap_run(vm.runner.call::<MultiValue>(args))
    });
    if let Err(e) = r {
        log_failure(plugin, phase, &e);
    }
}

/// Runs a timer callback in its own coroutine until it ends (or calls `ngx.exit`).
pub(crate) async fn run_timer(lua: &Lua, cb: &Function, args: MultiValue) -> LuaResult<()> {
    let runner: Function = lua.named_registry_value(crate::vm::RUNNER_KEY)?;
    let mut a = vec![Value::Function(cb.clone())];
    a.extend(args);
    let mut fut = runner.call_async::<MultiValue>(MultiValue::from_vec(a));
    TIMER_EXIT.with(|t| t.set(false));
    let mut call = CallSlot::default();
    std::future::poll_fn(|cx| {
        let _e = Enter::detached(LuaPhase::Timer);
        let _d = Driving::new(cx.waker(), &mut call);
        reset_budget();
        touch_time();
        match Pin::new(&mut fut).poll(cx) {
            Poll::Ready(r) => Poll::Ready(unwrap_run(r).map(drop)),
            Poll::Pending if TIMER_EXIT.with(|t| t.replace(false)) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
    .map_err(|e| mlua::Error::runtime(error_text(&e)))
}
