//! Loading runtime libraries and calling them.
//!
//! Runtimes are **process-wide**: one registry for the whole process, keyed like lua-resty-ffi
//! (`lib&cfg`, or `lib` for a nil cfg), so `libffi_init` runs once per key however many worker
//! threads, routes or Lua states use it.
#![allow(unsafe_code, reason = "dlopen and the libffi_init call")]

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::queue::{Answer, CancelOnDrop, PostError, TaskQueue};

/// Default `max_queue`, as in lua-resty-ffi.
pub const DEFAULT_MAX_QUEUE: usize = 65536;

/// How to load a runtime.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Tasks that may wait in the queue (not yet polled). Default 65536.
    pub max_queue: usize,
    /// Calls that may be in flight (posted and not answered, timed out or cancelled). Default
    /// unlimited (`usize::MAX`).
    pub max_inflight: usize,
    /// `dlopen` with `RTLD_GLOBAL` (Python and Node loaders need it).
    pub is_global: bool,
    /// Allow `dlclose` when the runtime is unloaded (never for Go libraries).
    pub unpin: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_queue: DEFAULT_MAX_QUEUE,
            max_inflight: usize::MAX,
            is_global: false,
            unpin: false,
        }
    }
}

/// Why loading failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The library was not found or `dlopen` failed.
    #[error("cannot load {lib}: {reason}")]
    Open {
        /// Library as given.
        lib: String,
        /// dlopen's message.
        reason: String,
    },
    /// The library has no `libffi_init`.
    #[error("{lib} does not export libffi_init")]
    NoInit {
        /// Library path.
        lib: String,
    },
    /// `libffi_init` returned non-zero.
    #[error("libffi_init of {lib} failed with rc {rc}")]
    Init {
        /// Library path.
        lib: String,
        /// Return code.
        rc: i32,
    },
    /// The cfg contains a NUL byte.
    #[error("cfg for {lib} contains a NUL byte")]
    BadCfg {
        /// Library as given.
        lib: String,
    },
}

impl LoadError {
    /// The rc of a failed `libffi_init`, if that is what failed.
    pub fn rc(&self) -> Option<i32> {
        match self {
            LoadError::Init { rc, .. } => Some(*rc),
            _ => None,
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The queue holds `max_queue` unpolled tasks.
    #[error("post failed, queue full")]
    QueueFull,
    /// `max_inflight` calls are in flight.
    #[error("too many calls in flight")]
    Busy,
    /// The runtime was unloaded.
    #[error("task queue is finished")]
    Finished,
    /// No answer within the timeout.
    #[error("runtime call timed out after {0:?}")]
    Timeout(Duration),
}

/// A loaded runtime.
pub struct Runtime {
    /// Cache key (`lib&cfg`).
    pub key: String,
    /// Resolved library path.
    pub path: PathBuf,
    queue: Arc<TaskQueue>,
    /// The strong queue reference handed to `libffi_init`, as an address (reclaimed only when
    /// the library is closed).
    handle: usize,
    lib: Mutex<Option<libloading::Library>>,
    unpin: bool,
    max_inflight: usize,
    inflight: Arc<AtomicUsize>,
    unloaded: AtomicBool,
}

struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A call posted by [`Runtime::start_call`]. Poll it until it answers or its timeout passes;
/// dropping it before then cancels the task (the runtime sees `is_cancelled`, and a late answer
/// is dropped with its buffer).
pub struct PendingCall {
    guard: CancelOnDrop,
    _inflight: InflightGuard,
    /// The timeout and its watch.
    timeout: Option<(Duration, polygate_core::deadline::Timeout)>,
}

impl PendingCall {
    /// The answer, [`CallError::Timeout`] once the timeout passed, or pending (the waker of
    /// `cx` is woken when either happens). Polling again after `Ready` yields the timeout error.
    pub fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Answer, CallError>> {
        use std::task::Poll;
        if let Poll::Ready(a) = self.guard.task().poll_answer(cx) {
            self.guard.disarm();
            return Poll::Ready(Ok(a));
        }
        match &mut self.timeout {
            Some((t, timeout)) => {
                if timeout.poll_expired(cx) {
                    Poll::Ready(Err(CallError::Timeout(*t)))
                } else {
                    Poll::Pending
                }
            }
            None => Poll::Pending,
        }
    }
}

impl Runtime {
    /// Calls the runtime with `req` (`None` = nil request). Never blocks the thread: a full
    /// queue or too many calls in flight fail at once; `timeout` bounds the wait (the late
    /// answer is then discarded and its buffer freed). Dropping the future cancels the call.
    pub async fn call(
        &self,
        req: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Answer, CallError> {
        self.call_vec(req.map(crate::queue::with_nul_room), timeout)
            .await
    }

    /// [`Runtime::call`] with a request the host may keep as it is (no copy).
    pub async fn call_vec(
        &self,
        req: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<Answer, CallError> {
        let mut call = self.start_call_vec(req, timeout)?;
        std::future::poll_fn(|cx| call.poll(cx)).await
    }

    /// Posts a call without waiting for it: poll the returned [`PendingCall`] (from the same
    /// worker thread) until it answers. For callers that cannot hold a future, such as a Lua
    /// coroutine that yields between polls. `req` is copied.
    pub fn start_call(
        &self,
        req: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<PendingCall, CallError> {
        self.start_call_vec(req.map(crate::queue::with_nul_room), timeout)
    }

    /// [`Runtime::start_call`] for a caller that usually waits on one call at a time (a Lua
    /// coroutine): the poller is woken at once unless other posts of this event-loop turn wait
    /// for a shared wake-up, so a runtime that answers during the wake-up (on one CPU) leaves
    /// the answer ready for the first poll.
    pub fn start_call_now(
        &self,
        req: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<PendingCall, CallError> {
        self.post_call(req.map(crate::queue::with_nul_room), timeout, true)
    }

    /// [`Runtime::start_call`] with a request the host may keep as it is (no copy).
    pub fn start_call_vec(
        &self,
        req: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<PendingCall, CallError> {
        self.post_call(req, timeout, false)
    }

    fn post_call(
        &self,
        req: Option<Vec<u8>>,
        timeout: Option<Duration>,
        now: bool,
    ) -> Result<PendingCall, CallError> {
        if self.unloaded.load(Ordering::Acquire) {
            return Err(CallError::Finished);
        }
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= self.max_inflight {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(CallError::Busy);
        }
        let inflight = InflightGuard(self.inflight.clone());
        let deadline = timeout.map(|t| Instant::now() + t);
        if let Some(entry) = self.queue.inline_entry() {
            let task = self
                .queue
                .start_inline(req, deadline)
                .map_err(|_| CallError::Finished)?;
            let guard = CancelOnDrop::new(task.clone());
            let took = crate::abi::call_inline(entry, task);
            if self.queue.inline_slow_call(took) {
                tracing::warn!(
                    "ffi {}: inline calls took over {} µs on a gateway worker thread {} times \
                     within {} s (the last {} µs): calls go through the queue to the \
                     runtime's pollers from now on",
                    self.key,
                    crate::queue::INLINE_MAX.as_micros(),
                    crate::queue::INLINE_SLOW_CALLS,
                    crate::queue::INLINE_SLOW_WINDOW.as_secs(),
                    took.as_micros()
                );
            }
            return Ok(PendingCall {
                guard,
                _inflight: inflight,
                timeout: timeout.zip(deadline.map(polygate_core::deadline::Timeout::at)),
            });
        }
        let done = crate::done::current();
        let task = self
            .queue
            .post_quiet_vec(req, deadline, done.clone())
            .map_err(|e| match e {
                PostError::QueueFull => {
                    tracing::error!(
                        "ffi: queue of {} overflow: {} tasks waiting",
                        self.key,
                        self.queue.max_queue
                    );
                    CallError::QueueFull
                }
                PostError::Finished => CallError::Finished,
            })?;
        let guard = CancelOnDrop::new(task);
        match &done {
            Some(dq) if now && dq.wake_now(&self.queue) => {}
            Some(dq) if !now && dq.defer_wake(&self.queue) => {}
            _ => self.queue.wake_poller(),
        }
        Ok(PendingCall {
            guard,
            _inflight: inflight,
            timeout: timeout.zip(deadline.map(polygate_core::deadline::Timeout::at)),
        })
    }

    /// Unloads: later calls fail with [`CallError::Finished`]; tasks already queued are still
    /// handed out, then every poller gets NULL. Removes the runtime from the registry, so a
    /// later load runs `libffi_init` again.
    pub fn unload(&self) {
        if self.unloaded.swap(true, Ordering::AcqRel) {
            return;
        }
        // out of the registry first: a load_ffi from now on starts a fresh runtime
        host().forget(&self.key, self);
        self.queue.finish();
    }

    /// Whether [`Runtime::unload`] was called.
    pub fn is_unloaded(&self) -> bool {
        self.unloaded.load(Ordering::Acquire)
    }

    /// Tasks queued and not polled yet.
    pub fn queued(&self) -> usize {
        self.queue.queued()
    }

    /// Tasks polled and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.queue.outstanding()
    }

    /// Calls in flight from the host's point of view.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }
}

/// Queue handles of libraries that stay loaded (pinned, or failed during init): their threads
/// may still poll, so the queues live for the rest of the process, held here on purpose.
static KEPT_QUEUES: Mutex<Vec<Arc<TaskQueue>>> = Mutex::new(Vec::new());

/// Keeps the strong reference behind a queue handle for the rest of the process.
fn keep_handle(handle: usize) {
    // SAFETY: `handle` came from `Arc::into_raw` and this takes over that reference once
    let q = unsafe { Arc::from_raw(handle as *const TaskQueue) };
    KEPT_QUEUES.lock().push(q);
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.unpin && !self.queue.is_finished() {
            self.queue.finish();
        }
        if let Some(lib) = self.lib.lock().take() {
            release_library(lib, self.unpin, Some(self.handle));
        }
    }
}

/// The process-wide runtime registry.
pub struct FfiHost {
    runtimes: Mutex<HashMap<String, Arc<Slot>>>,
    lib_path: Mutex<Vec<PathBuf>>,
}

/// A runtime of the registry: being loaded on the loading thread, loaded, or failed.
pub struct Slot {
    /// Cache key (`lib&cfg`).
    pub key: String,
    lib: String,
    cfg: Option<String>,
    opts: LoadOptions,
    started: AtomicBool,
    state: OnceLock<Result<Arc<Runtime>, LoadError>>,
    notify: tokio::sync::Notify,
    blocking: (parking_lot::Mutex<()>, parking_lot::Condvar),
}

impl Slot {
    /// The outcome, once the load has run.
    pub fn try_get(&self) -> Option<&Result<Arc<Runtime>, LoadError>> {
        self.state.get()
    }

    /// Waits (asynchronously) for the load; the thread keeps serving other tasks meanwhile.
    pub async fn wait(&self) -> Result<Arc<Runtime>, LoadError> {
        loop {
            let notified = self.notify.notified();
            if let Some(r) = self.state.get() {
                return r.clone();
            }
            notified.await;
        }
    }

    /// Waits for the load, blocking the calling thread (start-up, tools, Lua code that cannot
    /// yield). On the loading thread itself the load runs here.
    pub fn wait_blocking(&self) -> Result<Arc<Runtime>, LoadError> {
        if crate::loader::on_loading_thread() {
            self.run_load();
        }
        let mut g = self.blocking.0.lock();
        loop {
            if let Some(r) = self.state.get() {
                return r.clone();
            }
            self.blocking.1.wait(&mut g);
        }
    }

    /// Whether this slot can serve a lookup (still loading, or loaded and not unloaded).
    fn is_live(&self) -> bool {
        match self.state.get() {
            None => true,
            Some(Ok(rt)) => !rt.is_unloaded(),
            Some(Err(_)) => false,
        }
    }

    /// Runs the load (once; on the loading thread).
    fn run_load(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let r = host().open(&self.key, &self.lib, self.cfg.as_deref(), &self.opts);
        if let Err(e) = &r {
            tracing::error!("ffi: loading {}: {e}", self.key);
        }
        let failed = r.is_err();
        let _ = self.state.set(r);
        {
            let _g = self.blocking.0.lock();
            self.blocking.1.notify_all();
        }
        self.notify.notify_waiters();
        if failed {
            // lua-resty-ffi caches only runtimes that loaded: the next load tries again
            host().forget_slot(&self.key, self);
        }
    }
}

/// The process-wide host.
pub fn host() -> &'static FfiHost {
    static HOST: OnceLock<FfiHost> = OnceLock::new();
    HOST.get_or_init(|| FfiHost {
        runtimes: Mutex::new(HashMap::new()),
        lib_path: Mutex::new(Vec::new()),
    })
}

/// The cache key lua-resty-ffi uses: `lib&cfg`, or `lib` for a nil cfg.
pub fn cache_key(lib: &str, cfg: Option<&str>) -> String {
    match cfg {
        Some(c) => format!("{lib}&{c}"),
        None => lib.to_owned(),
    }
}

impl FfiHost {
    /// Directories searched for libraries before `LD_LIBRARY_PATH`.
    pub fn set_lib_path(&self, dirs: Vec<PathBuf>) {
        *self.lib_path.lock() = dirs;
    }

    /// Removes `key` from the registry if it still names this runtime (a fresh runtime loaded
    /// under the same key after an unload stays).
    fn forget(&self, key: &str, rt: &Runtime) {
        let mut map = self.runtimes.lock();
        let same = map
            .get(key)
            .and_then(|s| s.state.get())
            .is_some_and(|r| matches!(r, Ok(x) if std::ptr::eq(&**x, rt)));
        if same {
            map.remove(key);
        }
    }

    fn forget_slot(&self, key: &str, slot: &Slot) {
        let mut map = self.runtimes.lock();
        if map.get(key).is_some_and(|s| std::ptr::eq(&**s, slot)) {
            map.remove(key);
        }
    }

    /// Unloads runtimes nothing uses any more (only this registry holds them): no plugin
    /// instance of a served configuration and no request in flight. Called before each
    /// configuration build, so a runtime dropped from the configuration is unloaded at the
    /// following reload. Returns the keys unloaded.
    pub fn unload_unused(&self) -> Vec<String> {
        let unused: Vec<Arc<Runtime>> = {
            let map = self.runtimes.lock();
            map.values()
                .filter(|s| Arc::strong_count(s) == 1)
                .filter_map(|s| match s.state.get() {
                    Some(Ok(rt)) if Arc::strong_count(rt) == 1 => Some(rt.clone()),
                    _ => None,
                })
                .collect()
        };
        let mut keys = Vec::new();
        for rt in unused {
            tracing::info!(
                "ffi: unloading {} (no longer used by the configuration)",
                rt.key
            );
            rt.unload();
            keys.push(rt.key.clone());
        }
        keys
    }

    /// Unloads every runtime (the gateway stopped): their poll threads get NULL and end, so the
    /// process exits with no runtime thread inside a language runtime's code.
    pub fn unload_all(&self) {
        let all: Vec<Arc<Runtime>> = self
            .runtimes
            .lock()
            .values()
            .filter_map(|s| match s.state.get() {
                Some(Ok(rt)) => Some(rt.clone()),
                _ => None,
            })
            .collect();
        for rt in all {
            rt.unload();
        }
    }

    /// Keys of the loaded runtimes.
    pub fn loaded(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .runtimes
            .lock()
            .iter()
            .filter(|(_, s)| matches!(s.state.get(), Some(Ok(rt)) if !rt.is_unloaded()))
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// The loaded runtime for this key, if any.
    pub fn get(&self, lib: &str, cfg: Option<&str>) -> Option<Arc<Runtime>> {
        match self.runtimes.lock().get(&cache_key(lib, cfg))?.state.get() {
            Some(Ok(rt)) if !rt.is_unloaded() => Some(rt.clone()),
            _ => None,
        }
    }

    /// Resolves `lib`: an absolute path as is; a name with a `/` relative to the working
    /// directory; a file name (`libx.so`) or a short name (`x` → `libx.so`) searched in the
    /// configured library path, then `LD_LIBRARY_PATH`, then left to `dlopen`'s own search.
    pub fn resolve(&self, lib: &str) -> PathBuf {
        let dirs = self.lib_path.lock().clone();
        resolve_in(lib, &dirs)
    }

    /// Checks, without loading it, that `lib` resolves to a readable shared library that
    /// exports `libffi_init` (what `polygate validate` and configuration checks do: loading
    /// would run the library's initialisers). Returns the resolved path.
    /// `dirs` is the library path of the configuration being checked (`gateway.ffi_lib_path`);
    /// a bare name not found there is looked up in the system's library directories, as
    /// `dlopen` would.
    pub fn check(&self, lib: &str, dirs: &[PathBuf]) -> Result<PathBuf, LoadError> {
        let mut path = resolve_in(lib, dirs);
        if path.is_relative() && !lib.contains('/') {
            for d in SYSTEM_LIB_DIRS {
                let cand = Path::new(d).join(&path);
                if cand.exists() {
                    path = cand;
                    break;
                }
            }
        }
        let bytes = std::fs::read(&path).map_err(|e| LoadError::Open {
            lib: lib.to_owned(),
            reason: format!("{}: {e}", path.display()),
        })?;
        match crate::elf::exports(&bytes, "libffi_init") {
            Ok(true) => Ok(path),
            Ok(false) => Err(LoadError::NoInit {
                lib: path.display().to_string(),
            }),
            Err(e) => Err(LoadError::Open {
                lib: lib.to_owned(),
                reason: format!("{}: {e}", path.display()),
            }),
        }
    }

    /// The registry's slot for `lib&cfg`: the runtime already loaded or being loaded, or a new
    /// slot whose load is queued on the loading thread ([`crate::loader`]). Never blocks: the
    /// registry's lock is not held while a library loads.
    pub fn slot(&self, lib: &str, cfg: Option<&str>, opts: &LoadOptions) -> Arc<Slot> {
        let key = cache_key(lib, cfg);
        let slot = {
            let mut map = self.runtimes.lock();
            if let Some(s) = map.get(&key)
                && s.is_live()
            {
                return s.clone();
            }
            let slot = Arc::new(Slot {
                key: key.clone(),
                lib: lib.to_owned(),
                cfg: cfg.map(str::to_owned),
                opts: opts.clone(),
                started: AtomicBool::new(false),
                state: OnceLock::new(),
                notify: tokio::sync::Notify::new(),
                blocking: (parking_lot::Mutex::new(()), parking_lot::Condvar::new()),
            });
            map.insert(key, slot.clone());
            slot
        };
        let job = slot.clone();
        crate::loader::submit(move || job.run_load());
        slot
    }

    /// Loads a runtime (or returns the one already loaded for `lib&cfg`), blocking the calling
    /// thread until `libffi_init` (once per key for the whole process, on the loading thread)
    /// returned: for start-up, tests and tools. Requests use [`FfiHost::slot`] and wait
    /// asynchronously.
    pub fn load(
        &self,
        lib: &str,
        cfg: Option<&str>,
        opts: &LoadOptions,
    ) -> Result<Arc<Runtime>, LoadError> {
        self.slot(lib, cfg, opts).wait_blocking()
    }

    /// `dlopen` and `libffi_init` (on the loading thread).
    fn open(
        &self,
        key: &str,
        lib: &str,
        cfg: Option<&str>,
        opts: &LoadOptions,
    ) -> Result<Arc<Runtime>, LoadError> {
        let key = key.to_owned();
        let path = self.resolve(lib);
        let c_cfg = match cfg {
            Some(c) => Some(CString::new(c).map_err(|_| LoadError::BadCfg {
                lib: lib.to_owned(),
            })?),
            None => None,
        };
        let flags = libc::RTLD_NOW
            | if opts.is_global {
                libc::RTLD_GLOBAL
            } else {
                libc::RTLD_LOCAL
            };
        // SAFETY: loading a runtime library runs its initialisers; that is the point of this
        // function and the operator chose the library
        let library =
            unsafe { libloading::os::unix::Library::open(Some(&path), flags) }.map_err(|e| {
                LoadError::Open {
                    lib: lib.to_owned(),
                    reason: e.to_string(),
                }
            });
        crate::signals::reassert();
        let library: libloading::Library = library?.into();
        type InitFn = unsafe extern "C" fn(*mut c_char, *mut c_void) -> c_int;
        // SAFETY: the symbol's type is the published libffi_init signature
        let init: InitFn = match unsafe { library.get::<InitFn>(b"libffi_init\0") } {
            Ok(s) => *s,
            Err(_) => {
                let err = LoadError::NoInit {
                    lib: path.display().to_string(),
                };
                release_library(library, opts.unpin, None);
                return Err(err);
            }
        };
        let queue = TaskQueue::new(opts.max_queue);
        let handle = Arc::into_raw(queue.clone()) as usize;
        // the runtime may modify cfg in place (strsep) and must copy what it keeps: hand it a
        // fresh NUL-terminated buffer and free it after the call
        let cfg_ptr = c_cfg.map_or(std::ptr::null_mut(), CString::into_raw);
        // SAFETY: libffi_init's contract: cfg is NULL or a NUL-terminated buffer valid for the
        // call, tq an opaque handle valid until poll returns NULL
        let rc = unsafe { init(cfg_ptr, handle as *mut c_void) };
        if !cfg_ptr.is_null() {
            // SAFETY: created by CString::into_raw above; the runtime no longer uses it
            drop(unsafe { CString::from_raw(cfg_ptr) });
        }
        // a runtime may have installed signal handlers over polygate's (JVM, Node.js)
        crate::signals::reassert();
        if rc != 0 {
            queue.finish();
            // a pinned runtime may have started threads before failing: its library and the
            // (finished) queue handle stay rather than pull code from under them
            release_library(library, opts.unpin, Some(handle));
            return Err(LoadError::Init {
                lib: path.display().to_string(),
                rc,
            });
        }
        tracing::info!("ffi: loaded {} (key {key:?})", path.display());
        Ok(Arc::new(Runtime {
            key,
            path,
            queue,
            handle,
            lib: Mutex::new(Some(library)),
            unpin: opts.unpin,
            max_inflight: opts.max_inflight.max(1),
            inflight: Arc::new(AtomicUsize::new(0)),
            unloaded: AtomicBool::new(false),
        }))
    }
}

/// Where `dlopen` finds a bare library name besides `LD_LIBRARY_PATH` (for checks only).
const SYSTEM_LIB_DIRS: &[&str] = &[
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
];

/// A runtime's library file: a path as given, or `lib<name>.so` searched in `dirs`, then in
/// `LD_LIBRARY_PATH`; the bare file name (for `dlopen`'s own search) when not found.
fn resolve_in(lib: &str, dirs: &[PathBuf]) -> PathBuf {
    let p = Path::new(lib);
    if p.is_absolute() || lib.contains('/') {
        return p.to_path_buf();
    }
    let file = if lib.ends_with(".so") || lib.contains(".so.") {
        lib.to_owned()
    } else {
        format!("lib{lib}.so")
    };
    let mut dirs = dirs.to_vec();
    if let Ok(ld) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(ld.split(':').filter(|d| !d.is_empty()).map(PathBuf::from));
    }
    for d in dirs {
        let cand = d.join(&file);
        if cand.exists() {
            return cand;
        }
    }
    PathBuf::from(file)
}

/// Lets go of a library the host is done with. With `unpin` it is closed (`dlclose`) and the
/// queue handle given to its `libffi_init`, if any, is released. Otherwise both stay for the
/// rest of the process: the library's threads may still run and poll that queue.
fn release_library(lib: libloading::Library, unpin: bool, handle: Option<usize>) {
    if !unpin {
        std::mem::forget(lib);
        if let Some(h) = handle {
            keep_handle(h);
        }
        return;
    }
    drop(lib);
    if let Some(h) = handle {
        // SAFETY: the library is closed, so nothing can use the handle any more; this releases
        // the strong reference created for libffi_init
        unsafe { drop(Arc::from_raw(h as *const TaskQueue)) };
    }
}
