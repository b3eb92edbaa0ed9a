//! Write polygate runtimes in Rust.
//!
//! A runtime is a `cdylib` exporting `libffi_init`. This crate generates it and the poll loop;
//! you write a handler:
//!
//! ```ignore
//! use polygate_ffi_sdk::{Error, Options, runtime};
//!
//! struct Echo;
//! impl polygate_ffi_sdk::Handler for Echo {
//!     fn call(&self, req: &[u8]) -> Result<Vec<u8>, Error> {
//!         Ok(req.to_vec())
//!     }
//! }
//!
//! fn init(_cfg: Option<&str>) -> Result<(Echo, Options), Error> {
//!     Ok((Echo, Options::default()))
//! }
//!
//! runtime!(init);
//! ```
//!
//! The same library loads in polygate and in OpenResty with lua-resty-ffi: polygate's
//! extensions (batch polling, several pollers, cancellation checks, exact-length answers) are
//! looked up at run time with `dlsym` and used only when the host has them.
//!
//! With the `tokio` feature, `AsyncHandler` runs each call as a task on a multi-thread tokio
//! runtime owned by the library (`runtime!(async init)`).
#![allow(
    unsafe_code,
    reason = "this crate is the binding to the host's C functions"
)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;

/// A handler error: `rc` goes back to the caller (must not be 0) with `message` as the body.
#[derive(Debug, Clone)]
pub struct Error {
    /// Return code (non-zero).
    pub rc: i32,
    /// Body sent with the error.
    pub message: String,
}

impl Error {
    /// An error with rc 1.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            rc: 1,
            message: message.into(),
        }
    }

    /// An error with a chosen rc (0 is turned into 1).
    pub fn with_rc(rc: i32, message: impl Into<String>) -> Error {
        Error {
            rc: if rc == 0 { 1 } else { rc },
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rc {}: {}", self.rc, self.message)
    }
}

impl std::error::Error for Error {}

/// How the poll loop runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Polling threads. More than one only under polygate (lua-resty-ffi allows one); default 1.
    ///
    /// More pollers help when handlers block or take long. For quick handlers one is best: a
    /// poller that sleeps while another works is woken for the next batch (a futex call on the
    /// gateway's worker thread and a context switch), where a single busy poller takes the
    /// tasks queued meanwhile when it asks again, without a wake-up. Measured with the echo
    /// example under the `ffi` plugin (wrk, 50 connections, one gateway worker, 2 CPUs, 8
    /// alternating runs): the pollers' CPU per request 1.1–1.4 µs with one against 1.5–2.7 µs
    /// with two.
    pub pollers: usize,
    /// Tasks taken per poll under polygate (batch polling); default 32.
    pub batch: usize,
    /// Skip tasks whose caller already gave up (polygate only); default true.
    pub skip_cancelled: bool,
    /// Run the handler inline, on the gateway's thread that makes the call, instead of handing
    /// the task to a poller (polygate 1.3 and later; elsewhere ignored). Saves the hop to the
    /// poller thread and back: for handlers that answer in microseconds and never block (an
    /// inline call keeps a gateway worker and every connection on it waiting). polygate turns
    /// inline calls off for the runtime, with a warning, when four take over a millisecond
    /// within a second; the pollers are started anyway and take the calls from then on.
    /// Default false.
    pub inline: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pollers: 1,
            batch: 32,
            skip_cancelled: true,
            inline: false,
        }
    }
}

/// A synchronous handler: called on a polling thread for each request.
pub trait Handler: Send + Sync + 'static {
    /// Handles one request (`req` is empty for a nil request).
    fn call(&self, req: &[u8]) -> Result<Vec<u8>, Error>;
}

unsafe extern "C" {
    fn ngx_http_lua_ffi_task_poll(tq: *mut c_void) -> *mut c_void;
    fn ngx_http_lua_ffi_get_req(tsk: *mut c_void, len: *mut c_int) -> *mut c_char;
    fn ngx_http_lua_ffi_respond(tsk: *mut c_void, rc: c_int, rsp: *mut c_char, rsp_len: c_int);
}

pub mod host;

use host::Ext;

fn extensions() -> Option<Ext> {
    host::ext()
}

/// A task handed out by the host, answered exactly once (by [`Task::respond`] or on drop with
/// rc 1).
pub struct Task {
    ptr: *mut c_void,
    ext: Option<Ext>,
}

// SAFETY: the host allows answering a task from any thread; the pointer is only used through
// the host's thread-safe functions
unsafe impl Send for Task {}

impl Task {
    /// The request bytes (empty for a nil request). Valid until the task is answered.
    pub fn request(&self) -> &[u8] {
        let mut len: c_int = 0;
        // SAFETY: `ptr` is a polled, unanswered task
        let p = unsafe { ngx_http_lua_ffi_get_req(self.ptr, &mut len) };
        if p.is_null() || len <= 0 {
            return &[];
        }
        // SAFETY: the host guarantees `len` bytes at `p` until the task is answered, which
        // cannot happen while `self` is borrowed
        unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }
    }

    /// Whether the caller gave up (always false under hosts without the extension).
    pub fn is_cancelled(&self) -> bool {
        match self.ext {
            // SAFETY: `ptr` is a polled, unanswered task
            Some(e) => unsafe { (e.is_cancelled)(self.ptr) != 0 },
            None => false,
        }
    }

    /// Answers the task.
    pub fn respond(mut self, rc: i32, body: &[u8]) {
        self.answer(rc, body);
    }

    fn answer(&mut self, rc: i32, body: &[u8]) {
        if self.ptr.is_null() {
            return;
        }
        let ptr = std::mem::replace(&mut self.ptr, std::ptr::null_mut());
        // the host frees the buffer with libc free(): allocate it with libc malloc
        // SAFETY: malloc of at least one byte
        let buf = unsafe { libc::malloc(body.len().max(1)) }.cast::<u8>();
        if buf.is_null() {
            // SAFETY: answering with no body needs no allocation
            unsafe { ngx_http_lua_ffi_respond(ptr, rc, std::ptr::null_mut(), 0) };
            return;
        }
        // SAFETY: `buf` has room for body.len() (or 1) bytes
        unsafe {
            std::ptr::copy_nonoverlapping(body.as_ptr(), buf, body.len());
            if body.is_empty() {
                *buf = 0;
            }
        }
        match self.ext {
            // SAFETY: `ptr` is unanswered; `buf` holds body.len() bytes from malloc
            Some(e) => unsafe { (e.respond2)(ptr, rc, buf.cast(), body.len(), None) },
            None => {
                // legacy: length 0 means NUL-terminated, which the 1-byte "\0" buffer is
                let len = c_int::try_from(body.len()).unwrap_or(c_int::MAX);
                // SAFETY: `ptr` is unanswered; `buf` is malloc'd
                unsafe { ngx_http_lua_ffi_respond(ptr, rc, buf.cast(), len) }
            }
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // a task must be answered exactly once: a dropped task is answered with an error
        self.answer(1, b"task dropped without an answer");
    }
}

/// The queue handle given to `libffi_init`.
#[derive(Clone, Copy)]
pub struct Queue {
    tq: *mut c_void,
    ext: Option<Ext>,
}

// SAFETY: the host's poll functions are thread-safe and the handle stays valid until polling
// returns the end
unsafe impl Send for Queue {}
// SAFETY: as above
unsafe impl Sync for Queue {}

impl Queue {
    /// Blocks for the next tasks; empty at the end (the runtime was unloaded).
    pub fn poll(&self, max: usize) -> Vec<Task> {
        match self.ext {
            Some(e) => {
                let mut out = vec![std::ptr::null_mut(); max.max(1)];
                // SAFETY: `out` has room for `max` pointers; `tq` is the host's handle
                let n = unsafe { (e.poll_n)(self.tq, out.as_mut_ptr(), out.len() as c_int) };
                out.truncate(n.max(0) as usize);
                out.into_iter()
                    .map(|ptr| Task { ptr, ext: self.ext })
                    .collect()
            }
            None => {
                // SAFETY: `tq` is the host's handle, not used after it returned NULL
                let ptr = unsafe { ngx_http_lua_ffi_task_poll(self.tq) };
                if ptr.is_null() {
                    Vec::new()
                } else {
                    vec![Task { ptr, ext: None }]
                }
            }
        }
    }
}

fn cfg_str<'a>(cfg: *mut c_char) -> Result<Option<&'a str>, Error> {
    if cfg.is_null() {
        return Ok(None);
    }
    // SAFETY: the host passes a NUL-terminated buffer valid during libffi_init
    let s = unsafe { CStr::from_ptr(cfg) };
    s.to_str()
        .map(Some)
        .map_err(|_| Error::new("cfg is not UTF-8"))
}

fn catch<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| ())
}

/// Implementation of the `libffi_init` generated by [`runtime!`].
#[doc(hidden)]
pub fn __start<H, F>(cfg: *mut c_char, tq: *mut c_void, init: F) -> c_int
where
    H: Handler,
    F: FnOnce(Option<&str>) -> Result<(H, Options), Error>,
{
    let started = catch(|| {
        let cfg = cfg_str(cfg)?;
        let (handler, opts) = init(cfg)?;
        let ext = extensions();
        let queue = Queue { tq, ext };
        let handler = Arc::new(handler);
        if opts.inline {
            register_inline(tq, &handler);
        }
        let pollers = if ext.is_some() {
            opts.pollers.max(1)
        } else {
            1
        };
        for i in 0..pollers {
            let handler = handler.clone();
            std::thread::Builder::new()
                .name(format!("ffi-poll-{i}"))
                .spawn(move || poll_loop(queue, handler, opts))
                .map_err(|e| Error::new(format!("spawn: {e}")))?;
        }
        Ok::<(), Error>(())
    });
    exit_code(started)
}

/// How long a poller that just handled a batch of one task (a sequential caller) watches the
/// queue's lock-free count before it blocks (polygate 1.1, more than one CPU): the caller's next
/// call then needs no futex wake-up on either side. `POLYGATE_POLLER_SPIN_US` changes it (0:
/// off); never on a single CPU.
fn spin_after_one() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        if !std::thread::available_parallelism().is_ok_and(|n| n.get() > 1) {
            return std::time::Duration::ZERO;
        }
        let us = std::env::var("POLYGATE_POLLER_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        std::time::Duration::from_micros(us)
    })
}

fn spin_for_next(tq: usize) {
    let spin = spin_after_one();
    if spin.is_zero() {
        return;
    }
    let until = std::time::Instant::now() + spin;
    while host::queued(tq) == Some(0) && std::time::Instant::now() < until {
        for _ in 0..32 {
            std::hint::spin_loop();
        }
    }
}

/// Registers `handler` as the queue's inline entry, when the host has inline calls (without
/// them, or if the host refuses, the pollers take every call).
fn register_inline<H: Handler>(tq: *mut c_void, handler: &Arc<H>) {
    let Some(set) = host::set_inline() else {
        return;
    };
    // one reference for the host, kept for the rest of the process (the host may call the
    // entry until the runtime is unloaded, and a call may be under way when it is)
    let ctx = Arc::into_raw(handler.clone()) as *mut c_void;
    // SAFETY: `tq` is the host's queue handle; `inline_call::<H>` takes `ctx` as the `H` it is
    if unsafe { set(tq, Some(inline_call::<H>), ctx) } != 0 {
        // SAFETY: the host refused it, so this is still the only use of that reference
        drop(unsafe { Arc::from_raw(ctx as *const H) });
    }
}

/// The inline entry: runs the handler for one task on the calling (gateway) thread.
unsafe extern "C" fn inline_call<H: Handler>(ctx: *mut c_void, tsk: *mut c_void) {
    // SAFETY: `ctx` is the `Arc<H>` reference `register_inline` gave the host, never released
    let handler = unsafe { &*(ctx as *const H) };
    let task = Task {
        ptr: tsk,
        ext: extensions(),
    };
    // a panic past the handler's own guard: the task, dropped while unwinding, answers rc 1
    // (no cancellation check: the caller posted this task a moment ago, on this thread)
    let _ = catch(|| run_task(handler, task, false));
}

/// Answers one task with the handler's result.
fn run_task<H: Handler>(handler: &H, task: Task, skip_cancelled: bool) {
    if skip_cancelled && task.is_cancelled() {
        task.respond(1, b"cancelled");
        return;
    }
    match catch(|| handler.call(task.request())) {
        Ok(Ok(body)) => task.respond(0, &body),
        Ok(Err(e)) => task.respond(e.rc, e.message.as_bytes()),
        Err(()) => task.respond(1, b"handler panicked"),
    }
}

fn poll_loop<H: Handler>(queue: Queue, handler: Arc<H>, opts: Options) {
    let mut last = 0;
    loop {
        if last == 1 {
            spin_for_next(queue.tq as usize);
        }
        let tasks = queue.poll(opts.batch);
        if tasks.is_empty() {
            return;
        }
        last = tasks.len();
        for task in tasks {
            run_task(&*handler, task, opts.skip_cancelled);
        }
    }
}

/// Generates `libffi_init`: `runtime!(init)` for a synchronous [`Handler`], or
/// `runtime!(async init)` for an `AsyncHandler` (feature `tokio`). `init` is
/// `fn(Option<&str>) -> Result<(H, Options), Error>`.
#[macro_export]
macro_rules! runtime {
    (async $init:path) => {
        $crate::__libffi_init!($crate::__start_async, $init);
    };
    ($init:path) => {
        $crate::__libffi_init!($crate::__start, $init);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __libffi_init {
    ($start:path, $init:path) => {
        /// The runtime's entry point, called by the host once per (library, cfg).
        ///
        /// # Safety
        /// Called by the host with a NUL-terminated `cfg` (or NULL) and its queue handle.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn libffi_init(
            cfg: *mut ::std::ffi::c_char,
            tq: *mut ::std::ffi::c_void,
        ) -> ::std::ffi::c_int {
            $start(cfg, tq, $init)
        }
    };
}

/// `libffi_init`'s return code for a start-up result (a panic counts as rc 1).
fn exit_code(started: Result<Result<(), Error>, ()>) -> c_int {
    match started {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => e.rc,
        Err(()) => 1,
    }
}

#[cfg(feature = "tokio")]
mod async_rt;
#[cfg(feature = "tokio")]
pub use async_rt::{__start_async, AsyncHandler};
