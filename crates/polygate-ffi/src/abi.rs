//! The exported C functions: lua-resty-ffi's three runtime-facing symbols, bit for bit, and
//! polygate's versioned extensions. This is the only module with `unsafe` besides the loader.
//!
//! Every export runs inside a panic boundary (`boundary`), which catches panics (an unwinding panic out of an
//! `extern "C"` function would abort the gateway) and returns the export's neutral value.
//!
//! Threads: every function here may be called from any runtime thread (Go goroutines, JVM
//! threads, Python threads); the types behind the handles are `Send + Sync`.
#![allow(unsafe_code, reason = "the C ABI boundary")]

use std::ffi::{c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use bytes::Bytes;

use crate::queue::{Task, TaskQueue};

/// Major and minor version of the polygate extensions (`major << 16 | minor`).
pub const ABI_VERSION: u32 = 1 << 16 | 3;

/// Runs `f`, turning a panic into `default` (and a log line).
fn boundary<T>(name: &str, default: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => {
            log_line(
                0,
                &format!("ffi: panic in {name}; returning a neutral value"),
            );
            default
        }
    }
}

/// A response buffer allocated by the runtime, freed with its deallocator when the last
/// `Bytes` referring to it is dropped.
struct ForeignBuf {
    ptr: *mut u8,
    len: usize,
    free: unsafe extern "C" fn(*mut c_void),
}

// SAFETY: the buffer is owned exclusively by this value from `respond` on (the runtime handed
// it over and must not touch it again); it is only read, and freed once, in `drop`.
unsafe impl Send for ForeignBuf {}
// SAFETY: shared access is read-only.
unsafe impl Sync for ForeignBuf {}

impl AsRef<[u8]> for ForeignBuf {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` points to at least `len` readable bytes owned by this value
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for ForeignBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from the allocator `free` belongs to and is freed exactly once
        unsafe { (self.free)(self.ptr.cast()) }
    }
}

unsafe extern "C" fn libc_free(p: *mut c_void) {
    // SAFETY: forwarded from ForeignBuf::drop with a pointer from libc malloc
    unsafe { libc::free(p) }
}

/// Takes back the runtime's reference to a task.
///
/// # Safety
/// `tsk` must be a pointer handed out by a poll and not answered yet.
unsafe fn take_task(tsk: *mut c_void) -> Arc<Task> {
    // SAFETY: per the contract, `tsk` is an `Arc::into_raw` of a polled task whose reference
    // the runtime still owns; this consumes that reference exactly once
    unsafe { Arc::from_raw(tsk as *const Task) }
}

/// Borrows a polled, unanswered task.
///
/// # Safety
/// `tsk` must be NULL or a task handed out by a poll and not answered yet.
unsafe fn task_ref<'a>(tsk: *mut c_void) -> Option<&'a Task> {
    // SAFETY: per the contract, a non-NULL `tsk` points to a task the runtime holds a reference
    // to until it answers
    unsafe { (tsk as *const Task).as_ref() }
}

/// Borrows the queue behind a handle.
///
/// # Safety
/// `tq` must be NULL or the queue handle given to `libffi_init`.
unsafe fn queue_ref<'a>(tq: *mut c_void) -> Option<&'a TaskQueue> {
    // SAFETY: a queue handle is a strong reference kept while the library is loaded
    unsafe { (tq as *const TaskQueue).as_ref() }
}

/// Answers a task with a response buffer owned by `free` (both respond functions).
///
/// # Safety
/// `tsk` must be NULL or a polled, unanswered task; `rsp` NULL or `len` readable bytes that
/// `free` releases.
unsafe fn answer(
    tsk: *mut c_void,
    rc: c_int,
    rsp: *mut c_char,
    len: usize,
    free: unsafe extern "C" fn(*mut c_void),
) {
    if tsk.is_null() {
        return;
    }
    let body = (!rsp.is_null()).then(|| {
        Bytes::from_owner(ForeignBuf {
            ptr: rsp.cast(),
            len,
            free,
        })
    });
    // SAFETY: per this function's contract
    let task = unsafe { take_task(tsk) };
    if !task.complete((rc, body)) {
        log_line(
            0,
            "ffi: a task was answered twice; the second answer is dropped",
        );
    }
}

/// `void *ngx_http_lua_ffi_task_poll(void *tq)`: blocks until a task is queued; NULL once the
/// runtime was unloaded and every earlier task was handed out.
///
/// # Safety
/// `tq` must be the queue handle given to `libffi_init`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ngx_http_lua_ffi_task_poll(tq: *mut c_void) -> *mut c_void {
    boundary("ngx_http_lua_ffi_task_poll", std::ptr::null_mut(), || {
        // SAFETY: per this function's contract
        match unsafe { queue_ref(tq) }.and_then(TaskQueue::poll) {
            Some(t) => Arc::into_raw(t) as *mut c_void,
            None => std::ptr::null_mut(),
        }
    })
}

/// `char *ngx_http_lua_ffi_get_req(void *tsk, int *len)`: the request bytes (NUL-terminated,
/// NULL for a nil request), valid until the task is answered. `len` may be NULL.
///
/// # Safety
/// `tsk` must be a polled, unanswered task; `len` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ngx_http_lua_ffi_get_req(
    tsk: *mut c_void,
    len: *mut c_int,
) -> *mut c_char {
    boundary("ngx_http_lua_ffi_get_req", std::ptr::null_mut(), || {
        // SAFETY: per this function's contract
        let Some(t) = (unsafe { task_ref(tsk) }) else {
            return std::ptr::null_mut();
        };
        let (p, n) = t.request_raw();
        if !len.is_null() {
            // SAFETY: checked non-null; the caller provides an int
            unsafe { *len = n.min(c_int::MAX as usize) as c_int };
        }
        p as *mut c_char
    })
}

/// `void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len)`: answers a task,
/// exactly once, from any thread. `rsp` is NULL or from libc `malloc` (the host frees it);
/// `rsp_len == 0` with a non-NULL `rsp` means NUL-terminated (the legacy strlen rule).
///
/// # Safety
/// `tsk` must be a polled, unanswered task; `rsp` NULL or a malloc'd buffer of `rsp_len` bytes
/// (or NUL-terminated when `rsp_len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ngx_http_lua_ffi_respond(
    tsk: *mut c_void,
    rc: c_int,
    rsp: *mut c_char,
    rsp_len: c_int,
) {
    boundary("ngx_http_lua_ffi_respond", (), || {
        let len = if rsp.is_null() || rsp_len > 0 {
            rsp_len.max(0) as usize
        } else {
            // SAFETY: legacy rule: a non-NULL response with length 0 is NUL-terminated
            unsafe { libc::strlen(rsp) }
        };
        // SAFETY: per this function's contract
        unsafe { answer(tsk, rc, rsp, len, libc_free) };
    })
}

/// `uint32_t polygate_ffi_abi_version(void)`: `major << 16 | minor` of the extensions below.
#[unsafe(no_mangle)]
pub extern "C" fn polygate_ffi_abi_version() -> u32 {
    ABI_VERSION
}

/// `int polygate_ffi_task_poll_n(void *tq, void **out, int max)`: blocks until at least one task
/// is queued and stores up to `max` tasks in `out`; returns how many, 0 once unloaded. Several
/// threads may poll one queue.
///
/// # Safety
/// `tq` must be a queue handle; `out` must have room for `max` pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_poll_n(
    tq: *mut c_void,
    out: *mut *mut c_void,
    max: c_int,
) -> c_int {
    boundary("polygate_ffi_task_poll_n", 0, || {
        if out.is_null() || max <= 0 {
            return 0;
        }
        // SAFETY: per this function's contract
        let Some(q) = (unsafe { queue_ref(tq) }) else {
            return 0;
        };
        let tasks = q.poll_many(max as usize);
        let n = tasks.len();
        for (i, t) in tasks.into_iter().enumerate() {
            // SAFETY: i < n <= max, and the caller provided room for max pointers
            unsafe { *out.add(i) = Arc::into_raw(t) as *mut c_void };
        }
        n as c_int
    })
}

/// `int polygate_ffi_task_try_poll_n(void *tq, void **out, int max)` (ABI 1.1): takes up to
/// `max` queued tasks without blocking. Returns how many; 0 when none is queued (the queue's
/// descriptor, [`polygate_ffi_task_queue_fd`], becomes readable when one is); -1 once the
/// runtime was unloaded (never touch `tq` again).
///
/// # Safety
/// `tq` must be a queue handle; `out` must have room for `max` pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_try_poll_n(
    tq: *mut c_void,
    out: *mut *mut c_void,
    max: c_int,
) -> c_int {
    boundary("polygate_ffi_task_try_poll_n", -1, || {
        if out.is_null() || max <= 0 {
            return -1;
        }
        // SAFETY: per this function's contract
        let Some(q) = (unsafe { queue_ref(tq) }) else {
            return -1;
        };
        match q.try_poll_many(max as usize) {
            Ok(tasks) => {
                let n = tasks.len();
                for (i, t) in tasks.into_iter().enumerate() {
                    // SAFETY: i < n <= max, and the caller provided room for max pointers
                    unsafe { *out.add(i) = Arc::into_raw(t) as *mut c_void };
                }
                n as c_int
            }
            Err(()) => -1,
        }
    })
}

/// `int polygate_ffi_task_queued(void *tq)` (ABI 1.1): how many tasks wait to be polled, read
/// without taking the queue's lock (a moment stale at worst; 0 after unload). For a poller that
/// spins briefly before it parks: spinning on this leaves the queue's lock to the callers.
///
/// # Safety
/// `tq` must be a queue handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_queued(tq: *mut c_void) -> c_int {
    boundary("polygate_ffi_task_queued", 0, || {
        // SAFETY: per this function's contract
        let Some(q) = (unsafe { queue_ref(tq) }) else {
            return 0;
        };
        q.queued_hint().min(c_int::MAX as usize) as c_int
    })
}

/// `int polygate_ffi_task_queue_handoff(void *tq)` (ABI 1.2): for a poller that just got 0 from
/// [`polygate_ffi_task_try_poll_n`]: 1 when it runs on the CPU of the queue's last post (every
/// thread on one CPU, or the kernel put them together). It should then give its CPU to that
/// caller (`sched_yield`) and call `try_poll_n` again, instead of waiting on the descriptor:
/// the caller, seeing its poller idle on its CPU, yields back after its next post, so a
/// sequential caller's round trip costs a yield on each side instead of a descriptor write and
/// a wake-up. Until that `try_poll_n` the descriptor is not signalled. 0 otherwise (wait as
/// usual). Bound the hand-off (the Go SDK stops after 32 yields or 50 µs): on an otherwise idle
/// CPU each yield returns at once.
///
/// # Safety
/// `tq` must be a queue handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_queue_handoff(tq: *mut c_void) -> c_int {
    boundary("polygate_ffi_task_queue_handoff", 0, || {
        // SAFETY: per this function's contract
        let Some(q) = (unsafe { queue_ref(tq) }) else {
            return 0;
        };
        c_int::from(q.hand_off())
    })
}

/// `int polygate_ffi_task_queue_fd(void *tq)` (ABI 1.1): a descriptor that becomes readable when
/// tasks are queued after [`polygate_ffi_task_try_poll_n`] returned 0, and when the runtime is
/// unloaded; -1 on error. Owned by the host: wait on it (epoll, Go's netpoller, libuv), never
/// read, write or close it (`dup` it for a wrapper that closes). Valid until try_poll returns
/// -1.
///
/// # Safety
/// `tq` must be a queue handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_queue_fd(tq: *mut c_void) -> c_int {
    boundary("polygate_ffi_task_queue_fd", -1, || {
        // SAFETY: per this function's contract
        let Some(q) = (unsafe { queue_ref(tq) }) else {
            return -1;
        };
        q.event_fd().unwrap_or(-1)
    })
}

/// `void polygate_ffi_respond2(void *tsk, int rc, char *rsp, size_t len, void (*free_fn)(void *))`:
/// answers with an exact length (0 = empty, no strlen). `free_fn` releases `rsp` (NULL = libc
/// `free`), so runtimes with their own allocator need not use malloc.
///
/// # Safety
/// `tsk` must be a polled, unanswered task; `rsp` NULL or `len` readable bytes owned by
/// `free_fn`'s allocator.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_respond2(
    tsk: *mut c_void,
    rc: c_int,
    rsp: *mut c_char,
    len: usize,
    free_fn: Option<unsafe extern "C" fn(*mut c_void)>,
) {
    boundary("polygate_ffi_respond2", (), || {
        // SAFETY: per this function's contract
        unsafe { answer(tsk, rc, rsp, len, free_fn.unwrap_or(libc_free)) };
    })
}

/// `int polygate_ffi_task_is_cancelled(void *tsk)`: 1 when the caller is gone (timeout,
/// client disconnect): the answer will be discarded, so the work can be skipped (the task must
/// still be answered).
///
/// # Safety
/// `tsk` must be a polled, unanswered task.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_is_cancelled(tsk: *mut c_void) -> c_int {
    boundary("polygate_ffi_task_is_cancelled", 0, || {
        // SAFETY: per this function's contract
        unsafe { task_ref(tsk) }.map_or(0, |t| c_int::from(t.is_cancelled()))
    })
}

/// `int64_t polygate_ffi_task_remaining_ms(void *tsk)`: milliseconds before the caller gives
/// up, or -1 without a deadline.
///
/// # Safety
/// `tsk` must be a polled, unanswered task.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_remaining_ms(tsk: *mut c_void) -> i64 {
    boundary("polygate_ffi_task_remaining_ms", -1, || {
        // SAFETY: per this function's contract
        unsafe { task_ref(tsk) }
            .and_then(Task::remaining_ms)
            .map_or(-1, |ms| ms.min(i64::MAX as u64) as i64)
    })
}

/// `void polygate_ffi_log(int level, const char *msg, int len)`: writes into polygate's log.
/// Levels: 0 error, 1 warn, 2 info, 3 debug. `len < 0` means NUL-terminated.
///
/// # Safety
/// `msg` must be NULL or point to `len` readable bytes (NUL-terminated when `len < 0`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_log(level: c_int, msg: *const c_char, len: c_int) {
    boundary("polygate_ffi_log", (), || {
        if msg.is_null() {
            return;
        }
        let bytes = if len < 0 {
            // SAFETY: NUL-terminated per the contract
            unsafe { std::ffi::CStr::from_ptr(msg) }.to_bytes()
        } else {
            // SAFETY: `len` readable bytes per the contract
            unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), len as usize) }
        };
        log_line(level, &String::from_utf8_lossy(bytes));
    })
}

/// `int polygate_ffi_task_queue_inline(void *tq, void (*call)(void *ctx, void *tsk), void *ctx)`
/// (ABI 1.3): from then on the host hands each task of `tq` to `call(ctx, tsk)` on the thread
/// that posts it (a gateway worker) instead of queueing it for a poller. For handlers that
/// answer within microseconds and never block: `call` answers the task (before returning, for
/// the whole gain, or later from any thread) exactly as a polled one. Inline calls that take
/// more than a millisecond four times within a second turn inline calls off for the runtime
/// (logged): later tasks queue for its pollers, so a runtime registering an inline entry keeps
/// polling. 0 when registered, -1 when `tq` or `call` is NULL or an entry was registered
/// before.
///
/// # Safety
/// `tq` must be the queue handle given to `libffi_init`; `call` must be callable with `ctx`
/// from any gateway thread for as long as the runtime is loaded.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn polygate_ffi_task_queue_inline(
    tq: *mut c_void,
    call: Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    ctx: *mut c_void,
) -> c_int {
    boundary("polygate_ffi_task_queue_inline", -1, || {
        // SAFETY: per this function's contract
        let (Some(q), Some(call)) = (unsafe { queue_ref(tq) }, call) else {
            return -1;
        };
        if q.set_inline(crate::queue::Inline {
            call,
            ctx: ctx as usize,
        }) {
            0
        } else {
            -1
        }
    })
}

/// Hands `task` to the runtime's inline entry on this thread; how long the call took.
pub(crate) fn call_inline(entry: crate::queue::Inline, task: Arc<Task>) -> std::time::Duration {
    let start = std::time::Instant::now();
    let ptr = Arc::into_raw(task) as *mut c_void;
    // SAFETY: the runtime registered `call` for `ctx` (polygate_ffi_task_queue_inline's
    // contract); the task pointer carries one strong reference, taken back by its answer
    unsafe { (entry.call)(entry.ctx as *mut c_void, ptr) };
    start.elapsed()
}

/// Logs a runtime's line: through `tracing` while the gateway runs, straight to stderr once the
/// process is exiting (library destructors and `atexit` handlers run after the main thread's
/// thread-locals, which the log subscriber uses, are gone).
fn log_line(level: c_int, text: &str) {
    if crate::loader::exiting() {
        use std::io::Write as _;
        let tag = match level {
            0 => "ERROR",
            1 => "WARN",
            2 => "INFO",
            _ => "DEBUG",
        };
        let _ = writeln!(std::io::stderr(), "{tag} ffi_runtime: {text}");
        return;
    }
    match level {
        0 => tracing::error!(target: "ffi_runtime", "{text}"),
        1 => tracing::warn!(target: "ffi_runtime", "{text}"),
        2 => tracing::info!(target: "ffi_runtime", "{text}"),
        _ => tracing::debug!(target: "ffi_runtime", "{text}"),
    }
}

/// Addresses of every export. The binary calls this so the linker keeps the functions, and
/// exports them with `--export-dynamic-symbol` so `dlopen`ed runtimes resolve them.
pub fn exported_symbols() -> [(&'static str, usize); 14] {
    [
        (
            "ngx_http_lua_ffi_task_poll",
            ngx_http_lua_ffi_task_poll as *const () as usize,
        ),
        (
            "ngx_http_lua_ffi_get_req",
            ngx_http_lua_ffi_get_req as *const () as usize,
        ),
        (
            "ngx_http_lua_ffi_respond",
            ngx_http_lua_ffi_respond as *const () as usize,
        ),
        (
            "polygate_ffi_abi_version",
            polygate_ffi_abi_version as *const () as usize,
        ),
        (
            "polygate_ffi_task_poll_n",
            polygate_ffi_task_poll_n as *const () as usize,
        ),
        (
            "polygate_ffi_respond2",
            polygate_ffi_respond2 as *const () as usize,
        ),
        (
            "polygate_ffi_task_is_cancelled",
            polygate_ffi_task_is_cancelled as *const () as usize,
        ),
        (
            "polygate_ffi_task_remaining_ms",
            polygate_ffi_task_remaining_ms as *const () as usize,
        ),
        ("polygate_ffi_log", polygate_ffi_log as *const () as usize),
        (
            "polygate_ffi_task_try_poll_n",
            polygate_ffi_task_try_poll_n as *const () as usize,
        ),
        (
            "polygate_ffi_task_queue_fd",
            polygate_ffi_task_queue_fd as *const () as usize,
        ),
        (
            "polygate_ffi_task_queued",
            polygate_ffi_task_queued as *const () as usize,
        ),
        (
            "polygate_ffi_task_queue_handoff",
            polygate_ffi_task_queue_handoff as *const () as usize,
        ),
        (
            "polygate_ffi_task_queue_inline",
            polygate_ffi_task_queue_inline as *const () as usize,
        ),
    ]
}
