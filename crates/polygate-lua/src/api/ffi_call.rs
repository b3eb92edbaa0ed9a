//! The call path of `ngx.load_ffi` objects, `demo:method(req)`, without mlua's async machinery.
//!
//! An mlua async function costs a boxed future, a userdata, a C closure, a protected call and
//! a Lua-side polling loop for every call (about 20,000 instructions, measured with callgrind),
//! several times what lua-resty-ffi pays on nginx. Here a call is two plain Lua C functions and
//! a yield, as lua-resty-ffi does it: `post` queues the task and registers the coroutine's
//! waker, the coroutine yields mlua's "pending" marker (so its driver returns
//! `Poll::Pending`), and once woken `take` hands back the answer.
//!
//! The pending call is owned by the coroutine's driver (a request phase's runner or a timer),
//! through a [`CallSlot`] it publishes with [`Driving`] for each resume: a coroutine waits on at
//! most one call, and when the driver is dropped (client gone, `ngx.exit`, shutdown) the call
//! is dropped with it, which cancels the task.
#![allow(
    unsafe_code,
    reason = "raw Lua C functions and the driver's scoped pointers"
)]

use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use mlua::ffi;
use polygate_ffi::{CallError, PendingCall, Runtime};

use super::fast::{bytes, conclude};

/// The FFI call a coroutine waits on, owned by whatever drives the coroutine.
#[derive(Default)]
pub(crate) struct CallSlot(Option<(u64, PendingCall)>);

#[derive(Clone, Copy)]
struct Driver {
    waker: *const Waker,
    slot: *mut CallSlot,
}

/// A runtime as the call path sees it.
struct Entry {
    rt: Arc<Runtime>,
    timeout: Duration,
    finished: bool,
}

thread_local! {
    static DRIVER: Cell<Option<Driver>> = const { Cell::new(None) };
    static NEXT_TOKEN: Cell<u64> = const { Cell::new(1) };
    static RUNTIMES: RefCell<Vec<Option<Entry>>> = const { RefCell::new(Vec::new()) };
}

/// Publishes a driver's waker and call slot for one synchronous step (one resume of its
/// coroutine); the previous ones are restored when it is dropped.
pub(crate) struct Driving<'a> {
    prev: Option<Driver>,
    _borrows: PhantomData<(&'a Waker, &'a mut CallSlot)>,
}

impl<'a> Driving<'a> {
    /// For the step about to run with `waker` (its context's waker).
    pub(crate) fn new(waker: &'a Waker, slot: &'a mut CallSlot) -> Driving<'a> {
        let d = Driver { waker, slot };
        Driving {
            prev: DRIVER.with(|c| c.replace(Some(d))),
            _borrows: PhantomData,
        }
    }
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        DRIVER.with(|c| c.set(self.prev));
    }
}

/// Runs `f` with the current driver's waker and slot, taken out for the duration (a nested
/// use finds none).
fn with_driver<R>(f: impl FnOnce(&Waker, &mut CallSlot) -> R) -> Option<R> {
    let d = DRIVER.with(Cell::take)?;
    struct Restore(Driver);
    impl Drop for Restore {
        fn drop(&mut self) {
            DRIVER.with(|c| c.set(Some(self.0)));
        }
    }
    let _restore = Restore(d);
    // SAFETY: `Driving` published these pointers from live borrows and unpublishes them before
    // the borrows end; taking them out of the cell makes this the only user until `Restore`
    Some(unsafe { f(&*d.waker, &mut *d.slot) })
}

/// Registers a loaded runtime for the call path; the index goes into the object's closures.
pub(crate) fn register(rt: Arc<Runtime>, timeout: Duration) -> usize {
    RUNTIMES.with(|r| {
        let mut r = r.borrow_mut();
        let e = Some(Entry {
            rt,
            timeout,
            finished: false,
        });
        match r.iter().position(Option::is_none) {
            Some(i) => {
                r[i] = e;
                i
            }
            None => {
                r.push(e);
                r.len() - 1
            }
        }
    })
}

/// Forgets a runtime (its Lua object was collected); nothing refers to `id` any more.
pub(crate) fn unregister(id: usize) {
    let _ = RUNTIMES.try_with(|r| {
        if let Ok(mut r) = r.try_borrow_mut()
            && let Some(e) = r.get_mut(id)
        {
            *e = None;
        }
    });
}

/// `__unload`: later calls through this object fail with "task queue is finished".
pub(crate) fn finish(id: usize) {
    let rt = RUNTIMES.with(|r| {
        let mut r = r.borrow_mut();
        let e = r.get_mut(id)?.as_mut()?;
        e.finished = true;
        Some(e.rt.clone())
    });
    if let Some(rt) = rt {
        rt.unload();
    }
}

/// Whether calls through `id` can still reach the runtime.
pub(crate) fn alive(id: usize) -> bool {
    RUNTIMES.with(|r| {
        r.borrow()
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|e| !e.finished && !e.rt.is_unloaded())
    })
}

/// Pushes the `ok, res_or_rc, err` of lua-resty-ffi for `r`; returns how many values.
///
/// # Safety
/// `l` is the running state with room for three values.
unsafe fn push_result(
    l: *mut ffi::lua_State,
    r: Result<polygate_ffi::queue::Answer, CallError>,
) -> c_int {
    let push_bytes = |b: &[u8]| {
        // SAFETY: per this function's contract; Lua copies the bytes
        unsafe { ffi::lua_pushlstring(l, b.as_ptr().cast(), b.len()) };
    };
    // SAFETY: per this function's contract
    unsafe {
        match r {
            Ok((0, rsp)) => {
                ffi::lua_pushboolean(l, 1);
                match rsp {
                    Some(b) => push_bytes(&b),
                    None => ffi::lua_pushnil(l),
                }
                ffi::lua_pushnil(l);
                3
            }
            Ok((rc, rsp)) => {
                ffi::lua_pushboolean(l, 0);
                ffi::lua_pushinteger(l, rc as ffi::lua_Integer);
                match rsp {
                    Some(b) => push_bytes(&b),
                    None => ffi::lua_pushnil(l),
                }
                3
            }
            Err(CallError::Timeout(_)) => {
                ffi::lua_pushboolean(l, 0);
                push_bytes(b"timeout");
                2
            }
            Err(e) => {
                ffi::lua_pushboolean(l, 0);
                push_bytes(e.to_string().as_bytes());
                2
            }
        }
    }
}

/// What `post` and `take` decided, before anything is pushed.
enum Step {
    Done(Result<polygate_ffi::queue::Answer, CallError>),
    Pending(u64),
}

/// `post(id, req)`: queues the call; returns the final results at once (unloaded, queue full),
/// or `PENDING, token` with the coroutine's waker registered.
pub(crate) unsafe extern "C-unwind" fn post(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua; index 1 is the runtime index, index 2 the request
    let (id, req_type) = unsafe { (ffi::lua_tointeger(l, 1), ffi::lua_type(l, 2)) };
    // SAFETY: as above; the bytes stay valid while the argument is on the stack (all of this call)
    let req: Option<&[u8]> = unsafe {
        match req_type {
            ffi::LUA_TSTRING | ffi::LUA_TNUMBER => bytes(l, 2),
            ffi::LUA_TBOOLEAN => Some(if ffi::lua_toboolean(l, 2) != 0 {
                b"true".as_slice()
            } else {
                b"false".as_slice()
            }),
            _ => None,
        }
    };
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Step, String> {
        super::ngx::require_yield("ffi runtime call").map_err(|e| crate::run::error_text(&e))?;
        if req.is_none() && req_type != ffi::LUA_TNIL && req_type != ffi::LUA_TNONE {
            // SAFETY: `l` is the running state
            let name = unsafe { std::ffi::CStr::from_ptr(ffi::lua_typename(l, req_type)) };
            return Err(format!(
                "ffi runtime call: request must be a string or nil, got {}",
                name.to_string_lossy()
            ));
        }
        let target = RUNTIMES.with(|r| {
            let r = r.borrow();
            let e = usize::try_from(id).ok().and_then(|i| r.get(i)?.as_ref());
            e.map(|e| (e.rt.clone(), e.timeout, e.finished))
        });
        let Some((rt, timeout, finished)) = target else {
            return Ok(Step::Done(Err(CallError::Finished)));
        };
        if finished || rt.is_unloaded() {
            return Ok(Step::Done(Err(CallError::Finished)));
        }
        with_driver(|waker, slot| {
            let mut call = match rt.start_call_now(req, Some(timeout)) {
                Ok(c) => c,
                Err(e) => return Step::Done(Err(e)),
            };
            if crate::vm::half_budget_spent() {
                // the step ran for half its budget: yield to the worker's other tasks (and
                // start a new budget) even when the answer is already there
                waker.wake_by_ref();
            } else if let Poll::Ready(r) = call.poll(&mut Context::from_waker(waker)) {
                return Step::Done(r);
            }
            let token = NEXT_TOKEN.with(|t| {
                let v = t.get();
                t.set(v.wrapping_add(1));
                v
            });
            // a call left by an abandoned nested coroutine is dropped (cancelled) here
            slot.0 = Some((token, call));
            Step::Pending(token)
        })
        .ok_or_else(|| "ffi runtime call: no request or timer to yield in".to_owned())
    }));
    // SAFETY: `l` is the running state
    unsafe { finish_step(l, r, "ffi runtime call") }
}

/// `take(token)`: the results once the call answered (or timed out), else `PENDING` with the
/// waker registered again.
pub(crate) unsafe extern "C-unwind" fn take(l: *mut ffi::lua_State) -> c_int {
    // SAFETY: called by Lua with the token at index 1
    let token = unsafe { ffi::lua_tointeger(l, 1) } as u64;
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Step, String> {
        with_driver(|waker, slot| match &mut slot.0 {
            Some((t, call)) if *t == token => match call.poll(&mut Context::from_waker(waker)) {
                Poll::Ready(r) => {
                    slot.0 = None;
                    Step::Done(r)
                }
                Poll::Pending => Step::Pending(token),
            },
            // another call of this driver replaced it (a nested coroutine was abandoned)
            _ => Step::Done(Err(CallError::Finished)),
        })
        .ok_or_else(|| "ffi runtime call: no request or timer to yield in".to_owned())
    }));
    // SAFETY: `l` is the running state
    unsafe { finish_step(l, r, "ffi runtime call") }
}

/// Pushes what a step decided: the results, or `PENDING, token`.
///
/// # Safety
/// `l` is the running state.
unsafe fn finish_step(
    l: *mut ffi::lua_State,
    r: std::thread::Result<Result<Step, String>>,
    api: &str,
) -> c_int {
    match r {
        // SAFETY: `l` is the running state; a C function has LUA_MINSTACK (20) free slots
        Ok(Ok(Step::Done(res))) => unsafe { push_result(l, res) },
        Ok(Ok(Step::Pending(token))) => {
            // SAFETY: as above
            unsafe {
                ffi::lua_pushlightuserdata(l, mlua::Lua::poll_pending().0);
                ffi::lua_pushinteger(l, token as ffi::lua_Integer);
            }
            2
        }
        // SAFETY: as above
        Ok(Err(msg)) => unsafe { conclude(l, Ok(Err(msg)), api, 0) },
        // SAFETY: as above
        Err(p) => unsafe { conclude(l, Err(p), api, 0) },
    }
}

/// The Lua side: builds an object's call function for a runtime index. `keep` (the object's
/// userdata) is an upvalue so the registry entry lives as long as the function.
pub(crate) const CALL_FACTORY: &str = r#"
local post, take, PENDING, yield = ...
return function(id, keep)
    return function(_, req)
        local a, b, c = post(id, req, keep)
        if a ~= PENDING then
            return a, b, c
        end
        local token = b
        while true do
            if yield(PENDING) ~= nil then
                -- the driver is gone and terminates the coroutine: stay suspended
                while true do yield() end
            end
            a, b, c = take(token)
            if a ~= PENDING then
                return a, b, c
            end
        end
    end
end
"#;

/// `PENDING` as a Lua value (mlua's marker that makes a coroutine's driver return
/// `Poll::Pending`).
pub(crate) fn pending_marker() -> mlua::LightUserData {
    mlua::Lua::poll_pending()
}
