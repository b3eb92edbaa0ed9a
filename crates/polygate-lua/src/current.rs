//! What the running Lua code may touch: the current request, phase and response, reachable
//! from the `ngx.*` callbacks through a thread-local that is set only while a handler runs.
//!
//! The phase runners own `&mut RequestCtx` (and the response head or body chunk) for the whole
//! handler; they publish raw pointers here for the duration of one synchronous step (one poll
//! of the coroutine, or one plain call). A callback takes the pointers out while it uses them,
//! so a nested callback finds nothing instead of a second `&mut`.
#![allow(
    unsafe_code,
    reason = "scoped raw pointers to the request of the running handler"
)]

use std::cell::Cell;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use mlua::{Error as LuaError, Result as LuaResult, Table};
use polygate_core::{RequestCtx, ResponseHead};

/// The phase a Lua handler runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuaPhase {
    /// `rewrite`.
    Rewrite,
    /// `access`.
    Access,
    /// `before_proxy`.
    BeforeProxy,
    /// `header_filter`.
    HeaderFilter,
    /// `body_filter`.
    BodyFilter,
    /// `log`.
    Log,
    /// An `ngx.timer` callback.
    Timer,
    /// Loading a script (module-level code, serverless factories).
    Load,
}

impl LuaPhase {
    /// Whether handlers of this phase may yield (sleep, FFI calls, `ngx.exit` by unwinding).
    pub fn can_yield(self) -> bool {
        matches!(
            self,
            LuaPhase::Rewrite | LuaPhase::Access | LuaPhase::BeforeProxy | LuaPhase::Timer
        )
    }

    /// OpenResty's name of the context, for error messages.
    pub fn context_name(self) -> &'static str {
        match self {
            LuaPhase::Rewrite => "rewrite_by_lua*",
            LuaPhase::Access => "access_by_lua*",
            LuaPhase::BeforeProxy => "before_proxy",
            LuaPhase::HeaderFilter => "header_filter_by_lua*",
            LuaPhase::BodyFilter => "body_filter_by_lua*",
            LuaPhase::Log => "log_by_lua*",
            LuaPhase::Timer => "ngx.timer",
            LuaPhase::Load => "init (script loading)",
        }
    }

    /// The plugin phase name (`access`).
    pub fn name(self) -> &'static str {
        match self {
            LuaPhase::Rewrite => "rewrite",
            LuaPhase::Access => "access",
            LuaPhase::BeforeProxy => "before_proxy",
            LuaPhase::HeaderFilter => "header_filter",
            LuaPhase::BodyFilter => "body_filter",
            LuaPhase::Log => "log",
            LuaPhase::Timer => "timer",
            LuaPhase::Load => "load",
        }
    }
}

#[derive(Clone, Copy)]
enum CtxPtr {
    None,
    Mut(*mut RequestCtx),
    Ref(*const RequestCtx),
}

#[derive(Clone, Copy)]
struct Current {
    phase: LuaPhase,
    ctx: CtxPtr,
    resp: *mut ResponseHead,
    chunk: *mut Bytes,
    eof: bool,
}

thread_local! {
    static CUR: Cell<Option<Current>> = const { Cell::new(None) };
    static PHASE: Cell<Option<LuaPhase>> = const { Cell::new(None) };
}

/// Publishes the running handler's request for as long as it lives (one synchronous step).
pub(crate) struct Enter {
    prev: Option<Current>,
    prev_phase: Option<LuaPhase>,
}

impl Enter {
    fn set(c: Current) -> Enter {
        Enter {
            prev: CUR.with(|x| x.replace(Some(c))),
            prev_phase: PHASE.with(|x| x.replace(Some(c.phase))),
        }
    }

    /// A phase with a mutable request (rewrite, access, before_proxy).
    pub(crate) fn request(phase: LuaPhase, ctx: &mut RequestCtx) -> Enter {
        Enter::set(Current {
            phase,
            ctx: CtxPtr::Mut(ctx),
            resp: std::ptr::null_mut(),
            chunk: std::ptr::null_mut(),
            eof: false,
        })
    }

    /// `header_filter`.
    pub(crate) fn header_filter(ctx: &mut RequestCtx, resp: &mut ResponseHead) -> Enter {
        Enter::set(Current {
            phase: LuaPhase::HeaderFilter,
            ctx: CtxPtr::Mut(ctx),
            resp,
            chunk: std::ptr::null_mut(),
            eof: false,
        })
    }

    /// `body_filter`.
    pub(crate) fn body_filter(ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) -> Enter {
        Enter::set(Current {
            phase: LuaPhase::BodyFilter,
            ctx: CtxPtr::Mut(ctx),
            resp: std::ptr::null_mut(),
            chunk,
            eof,
        })
    }

    /// `log` (the request is read-only).
    pub(crate) fn log(ctx: &RequestCtx) -> Enter {
        Enter::set(Current {
            phase: LuaPhase::Log,
            ctx: CtxPtr::Ref(ctx),
            resp: std::ptr::null_mut(),
            chunk: std::ptr::null_mut(),
            eof: false,
        })
    }

    /// No request: timers and script loading.
    pub(crate) fn detached(phase: LuaPhase) -> Enter {
        Enter::set(Current {
            phase,
            ctx: CtxPtr::None,
            resp: std::ptr::null_mut(),
            chunk: std::ptr::null_mut(),
            eof: false,
        })
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        CUR.with(|x| x.set(self.prev));
        PHASE.with(|x| x.set(self.prev_phase));
    }
}

/// Puts the taken pointers back when a callback is done with them.
struct Restore(Current);

impl Drop for Restore {
    fn drop(&mut self) {
        CUR.with(|x| x.set(Some(self.0)));
    }
}

/// The phase of the running handler (`None` outside handlers).
pub(crate) fn phase() -> Option<LuaPhase> {
    PHASE.with(Cell::get)
}

fn no_request(api: &str) -> LuaError {
    LuaError::runtime(format!(
        "{api}: no request found (not inside a request handler)"
    ))
}

fn take(api: &str) -> LuaResult<(Current, Restore)> {
    let cur = CUR.with(Cell::take).ok_or_else(|| no_request(api))?;
    Ok((cur, Restore(cur)))
}

/// Runs `f` with the current request (read-only).
pub(crate) fn with_ctx<R>(api: &str, f: impl FnOnce(&RequestCtx) -> LuaResult<R>) -> LuaResult<R> {
    let (cur, _restore) = take(api)?;
    match cur.ctx {
        CtxPtr::None => Err(no_request(api)),
        // SAFETY: the pointer was published by a phase runner that holds the exclusive borrow
        // for the whole synchronous step this callback runs in, and it was taken out of the
        // thread-local, so no other reference derived from it exists until `_restore` drops
        CtxPtr::Mut(p) => f(unsafe { &*p }),
        // SAFETY: as above, for a shared borrow held by the log phase runner
        CtxPtr::Ref(p) => f(unsafe { &*p }),
    }
}

/// Runs `f` with the current request, mutably; fails in the log phase and outside requests.
pub(crate) fn with_ctx_mut<R>(
    api: &str,
    f: impl FnOnce(&mut RequestCtx) -> LuaResult<R>,
) -> LuaResult<R> {
    let (cur, _restore) = take(api)?;
    match cur.ctx {
        CtxPtr::None => Err(no_request(api)),
        // SAFETY: see `with_ctx`: exclusive for this step, and taken out of the thread-local
        CtxPtr::Mut(p) => f(unsafe { &mut *p }),
        CtxPtr::Ref(_) => Err(LuaError::runtime(format!(
            "{api}: API disabled in the context of {}",
            cur.phase.context_name()
        ))),
    }
}

/// Runs `f` with the request and, in `header_filter`, the response head.
pub(crate) fn with_response<R>(
    api: &str,
    f: impl FnOnce(Option<&mut RequestCtx>, Option<&mut ResponseHead>, LuaPhase) -> LuaResult<R>,
) -> LuaResult<R> {
    let (cur, _restore) = take(api)?;
    // SAFETY: see `with_ctx`; the response head pointer is published only by the
    // header_filter runner, which holds `&mut ResponseHead` for the step
    let resp = unsafe { cur.resp.as_mut() };
    match cur.ctx {
        // SAFETY: see `with_ctx`
        CtxPtr::Mut(p) => f(Some(unsafe { &mut *p }), resp, cur.phase),
        _ => f(None, resp, cur.phase),
    }
}

/// Runs `f` with the body chunk of `body_filter` and the eof flag.
pub(crate) fn with_chunk<R>(
    api: &str,
    f: impl FnOnce(&mut Bytes, &mut bool) -> LuaResult<R>,
) -> LuaResult<R> {
    // the eof flag written through `restore.0` is what gets put back
    let (cur, mut restore) = take(api)?;
    // SAFETY: published only by the body_filter runner, which holds `&mut Bytes` for the step
    let Some(chunk) = (unsafe { cur.chunk.as_mut() }) else {
        return Err(LuaError::runtime(format!(
            "{api}: only available in body_filter"
        )));
    };
    f(chunk, &mut restore.0.eof)
}

/// The eof flag `body_filter` ended with (set by `ngx.arg[2] = true`).
pub(crate) fn chunk_eof() -> bool {
    CUR.with(Cell::get).is_some_and(|c| c.eof)
}

/// Per-request Lua state, kept in the request's extensions across phases and plugins.
#[derive(Clone, Default)]
pub(crate) struct LuaReq {
    /// `ngx.ctx`.
    pub ngx_ctx: Option<Table>,
    /// The `ctx` argument of serverless functions (APISIX's `api_ctx`).
    pub api_ctx: Option<Table>,
    /// Output of `ngx.say`/`ngx.print`.
    pub out: Vec<u8>,
    /// `ngx.status` set before the response.
    pub status: Option<u16>,
    /// Response headers set before the response (`None` removes).
    pub headers: Vec<(HeaderName, Option<Vec<HeaderValue>>)>,
    /// `ngx.exit` code of the running handler.
    pub exit: Option<i64>,
}

/// Runs `f` with the current request's Lua state (created on first use).
pub(crate) fn with_lua_req<R>(
    api: &str,
    f: impl FnOnce(&mut LuaReq) -> LuaResult<R>,
) -> LuaResult<R> {
    with_ctx_mut(api, |ctx| lua_req(ctx, f))
}

/// `f` with the Lua state of `ctx`.
pub(crate) fn lua_req<R>(ctx: &mut RequestCtx, f: impl FnOnce(&mut LuaReq) -> R) -> R {
    if let Some(s) = ctx.extensions.get_mut::<LuaReq>() {
        return f(s);
    }
    ctx.extensions.insert(LuaReq::default());
    f(ctx.extensions.get_mut::<LuaReq>().expect("just inserted"))
}
