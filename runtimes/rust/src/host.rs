//! The host's C functions, for Rust code that talks to the host directly (polygate's Python and
//! Java loaders use these): lua-resty-ffi's three runtime-facing functions, and polygate's
//! extensions looked up at run time with `dlsym`, so the same library loads under OpenResty.
//!
//! Handles are addresses (`usize`), as the languages above the loaders see them: pass only
//! values the host handed out (a queue given to `libffi_init`, a task from a poll), as the ABI
//! requires.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

unsafe extern "C" {
    fn ngx_http_lua_ffi_task_poll(tq: *mut c_void) -> *mut c_void;
    fn ngx_http_lua_ffi_get_req(tsk: *mut c_void, len: *mut c_int) -> *mut c_char;
    fn ngx_http_lua_ffi_respond(tsk: *mut c_void, rc: c_int, rsp: *mut c_char, rsp_len: c_int);
}

pub(crate) type PollN = unsafe extern "C" fn(*mut c_void, *mut *mut c_void, c_int) -> c_int;
pub(crate) type Respond2 = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *mut c_char,
    usize,
    Option<unsafe extern "C" fn(*mut c_void)>,
);
pub(crate) type IsCancelled = unsafe extern "C" fn(*mut c_void) -> c_int;
type RemainingMs = unsafe extern "C" fn(*mut c_void) -> i64;
type Log = unsafe extern "C" fn(c_int, *const c_char, c_int);

/// polygate's extensions (ABI 1.x), when the host has them.
#[derive(Clone, Copy)]
pub(crate) struct Ext {
    pub(crate) poll_n: PollN,
    pub(crate) respond2: Respond2,
    pub(crate) is_cancelled: IsCancelled,
    remaining: RemainingMs,
    log: Log,
}

fn lookup(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with a valid NUL-terminated name; RTLD_DEFAULT searches the global scope
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

/// The extensions, looked up once.
pub(crate) fn ext() -> Option<Ext> {
    static EXT: OnceLock<Option<Ext>> = OnceLock::new();
    *EXT.get_or_init(|| {
        let v = lookup(c"polygate_ffi_abi_version");
        let p = [
            lookup(c"polygate_ffi_task_poll_n"),
            lookup(c"polygate_ffi_respond2"),
            lookup(c"polygate_ffi_task_is_cancelled"),
            lookup(c"polygate_ffi_task_remaining_ms"),
            lookup(c"polygate_ffi_log"),
        ];
        if v.is_null() || p.iter().any(|x| x.is_null()) {
            return None;
        }
        // SAFETY: the symbol is the host's `uint32_t polygate_ffi_abi_version(void)`
        let version: unsafe extern "C" fn() -> u32 = unsafe { std::mem::transmute(v) };
        // SAFETY: calling a host function without arguments
        if unsafe { version() } >> 16 != 1 {
            return None;
        }
        // SAFETY: the symbols are the host's functions with these published signatures
        unsafe {
            Some(Ext {
                poll_n: std::mem::transmute::<*mut c_void, PollN>(p[0]),
                respond2: std::mem::transmute::<*mut c_void, Respond2>(p[1]),
                is_cancelled: std::mem::transmute::<*mut c_void, IsCancelled>(p[2]),
                remaining: std::mem::transmute::<*mut c_void, RemainingMs>(p[3]),
                log: std::mem::transmute::<*mut c_void, Log>(p[4]),
            })
        }
    })
}

type Queued = unsafe extern "C" fn(*mut c_void) -> c_int;

/// How many tasks wait to be polled on `tq`, read without the queue's lock (ABI 1.1; `None`
/// when the host does not have it).
pub fn queued(tq: usize) -> Option<usize> {
    static QUEUED: OnceLock<Option<Queued>> = OnceLock::new();
    let f = (*QUEUED.get_or_init(|| {
        ext()?;
        let p = lookup(c"polygate_ffi_task_queued");
        // SAFETY: the host's `int polygate_ffi_task_queued(void *tq)`
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, Queued>(p) })
    }))?;
    // SAFETY: tq is a queue handed to libffi_init
    Some(unsafe { f(tq as *mut c_void) }.max(0) as usize)
}

type SetInline = unsafe extern "C" fn(
    *mut c_void,
    Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
    *mut c_void,
) -> c_int;

/// The host's `polygate_ffi_task_queue_inline` (ABI 1.3), when it has it.
pub(crate) fn set_inline() -> Option<SetInline> {
    static F: OnceLock<Option<SetInline>> = OnceLock::new();
    *F.get_or_init(|| {
        ext()?;
        let p = lookup(c"polygate_ffi_task_queue_inline");
        // SAFETY: the host's function with this published signature
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, SetInline>(p) })
    })
}

/// The body of a loader's `libffi_init`: hands `init` the cfg as text (empty for NULL, invalid
/// UTF-8 replaced) and the queue's address, logs its error (prefixed in stderr with `who` when
/// the host has no log) and answers rc 1 for an error or a panic.
///
/// # Safety
///
/// `cfg` is NULL or a NUL-terminated string valid for the call, as `libffi_init` receives it.
pub unsafe fn init_entry(
    who: &str,
    cfg: *const c_char,
    tq: *mut c_void,
    init: impl FnOnce(&str, usize) -> Result<c_int, String> + std::panic::UnwindSafe,
) -> c_int {
    let cfg = if cfg.is_null() {
        String::new()
    } else {
        // SAFETY: per this function's contract
        unsafe { CStr::from_ptr(cfg) }
            .to_string_lossy()
            .into_owned()
    };
    let tq = tq as usize;
    match std::panic::catch_unwind(move || init(&cfg, tq)) {
        Ok(Ok(rc)) => rc,
        Ok(Err(e)) => {
            log(who, 0, &e);
            1
        }
        Err(_) => {
            log(who, 0, "libffi_init panicked");
            1
        }
    }
}

/// Whether the host offers polygate's extensions.
pub fn has_extensions() -> bool {
    ext().is_some()
}

/// Waits for the next task of queue `tq`; 0 once the runtime was unloaded.
pub fn poll(tq: usize) -> usize {
    // SAFETY: tq is a queue handed to libffi_init (the ABI's contract with the caller)
    unsafe { ngx_http_lua_ffi_task_poll(tq as *mut c_void) as usize }
}

/// Waits for tasks and takes up to `max` (one without the extensions); empty once unloaded.
pub fn poll_n(tq: usize, max: usize) -> Vec<usize> {
    let max = max.clamp(1, 1024);
    match ext() {
        Some(e) => {
            let mut out = vec![std::ptr::null_mut::<c_void>(); max];
            // SAFETY: `out` has room for `max` pointers; tq as in `poll`
            let n = unsafe { (e.poll_n)(tq as *mut c_void, out.as_mut_ptr(), max as c_int) };
            out[..n.max(0) as usize]
                .iter()
                .map(|p| *p as usize)
                .collect()
        }
        None => match poll(tq) {
            0 => Vec::new(),
            t => vec![t],
        },
    }
}

/// The request of a polled, unanswered task (`None` for a nil request). The bytes stay valid
/// until the task is answered.
pub fn request<'a>(task: usize) -> Option<&'a [u8]> {
    let mut len: c_int = 0;
    // SAFETY: task is polled and unanswered (the ABI's contract with the caller)
    let p = unsafe { ngx_http_lua_ffi_get_req(task as *mut c_void, &mut len) };
    if p.is_null() {
        return None;
    }
    // SAFETY: the host's request buffer holds `len` bytes until the task is answered
    Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len.max(0) as usize) })
}

/// Answers a task exactly once, with a `malloc`'d copy of `data` (the host frees it). Answers
/// larger than 2 GiB without the extensions are refused with rc 1.
pub fn respond(task: usize, rc: i32, data: Option<&[u8]>) {
    let ext = ext();
    let data = match data {
        Some(d) if ext.is_none() && d.len() > c_int::MAX as usize => {
            // SAFETY: task is polled and unanswered; no body
            unsafe { ngx_http_lua_ffi_respond(task as *mut c_void, 1, std::ptr::null_mut(), 0) };
            return;
        }
        other => other,
    };
    let (ptr, len) = match data {
        None => (std::ptr::null_mut(), 0usize),
        Some(b) => {
            // SAFETY: malloc of at least one byte; the host frees it with free()
            let p = unsafe { libc::malloc(b.len().max(1)) }.cast::<u8>();
            if p.is_null() {
                (std::ptr::null_mut(), 0)
            } else {
                // SAFETY: p has room for b.len() bytes (and one when b is empty: the "\0" of
                // lua-resty-ffi's strlen rule for a zero length)
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len());
                    if b.is_empty() {
                        *p = 0;
                    }
                }
                (p.cast::<c_char>(), b.len())
            }
        }
    };
    match ext {
        // SAFETY: task is polled and unanswered; ptr is NULL or malloc'd, the host's from now on
        Some(e) => unsafe { (e.respond2)(task as *mut c_void, rc, ptr, len, None) },
        // SAFETY: as above; len fits an int (checked above)
        None => unsafe { ngx_http_lua_ffi_respond(task as *mut c_void, rc, ptr, len as c_int) },
    }
}

/// Whether the caller of a polled task is gone (always false without the extensions).
pub fn is_cancelled(task: usize) -> bool {
    // SAFETY: task is polled and unanswered
    ext().is_some_and(|e| unsafe { (e.is_cancelled)(task as *mut c_void) } != 0)
}

/// Milliseconds the caller of a polled task still waits; -1 without a deadline (or without the
/// extensions).
pub fn remaining_ms(task: usize) -> i64 {
    match ext() {
        // SAFETY: task is polled and unanswered
        Some(e) => unsafe { (e.remaining)(task as *mut c_void) },
        None => -1,
    }
}

/// Writes a line into the host's log (0 error, 1 warn, 2 info, 3 debug), or to stderr prefixed
/// with `who` without the extensions.
pub fn log(who: &str, level: i32, msg: &str) {
    match ext() {
        // SAFETY: msg is valid for its length during the call
        Some(e) => unsafe { (e.log)(level, msg.as_ptr().cast(), msg.len() as c_int) },
        None => eprintln!("{who}: {msg}"),
    }
}
