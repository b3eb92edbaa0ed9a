//! polygate's Python loader (`libffi_python3.so`): Python runtimes in-process through the
//! lua-resty-ffi ABI.
//!
//! `ngx.load_ffi("ffi_python3", "[venv=<dir>;][dir/]module[?],func[,rest]")`, or the `ffi`
//! plugin with the same `lib` and `cfg`, imports `module` (from `dir` when given, after adding
//! the virtualenv's `site-packages` when given; `?` reloads it) and calls `func(cfg, tq)`, which
//! starts serving the queue `tq` and returns the rc (0 = loaded). `cfg` is the address of the
//! NUL-terminated `rest` (or 0), as lua-resty-ffi's loader passes it;
//! `polygate_ffi.cfg_str(cfg)` reads it. `tq` is the queue's address.
//!
//! The `polygate_ffi` module comes with the loader (no cffi needed): `poll`, `poll_n` (batch,
//! the GIL released while waiting), `get_req`, `respond`, `is_cancelled`, `remaining_ms`, `log`,
//! and `serve(tq, handler)`, where a handler is a plain or `async def` function of the request
//! bytes returning the answer (see `sdk.py`). Runtimes written for lua-resty-ffi's loader with
//! cffi keep working: the host's C functions are in the process's global scope.
//!
//! One interpreter per process, started (with `Py_InitializeEx(0)`: no signal handlers) by the
//! first `libffi_init`, which polygate runs on its loading thread, the main thread; it is
//! finalised at exit on that same thread, after the poll threads stopped (polygate unloads
//! every runtime first), with a bounded wait for other non-daemon threads: exit never hangs.
#![allow(
    unsafe_code,
    reason = "the C ABI: libffi_init, the host's task functions, dlopen/dladdr, atexit"
)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::{Mutex, Once, OnceLock};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};

unsafe extern "C" {
    fn ngx_http_lua_ffi_task_poll(tq: *mut c_void) -> *mut c_void;
    fn ngx_http_lua_ffi_get_req(tsk: *mut c_void, len: *mut c_int) -> *mut c_char;
    fn ngx_http_lua_ffi_respond(tsk: *mut c_void, rc: c_int, rsp: *mut c_char, rsp_len: c_int);
}

type PollN = unsafe extern "C" fn(*mut c_void, *mut *mut c_void, c_int) -> c_int;
type Respond2 = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *mut c_char,
    usize,
    Option<unsafe extern "C" fn(*mut c_void)>,
);
type IsCancelled = unsafe extern "C" fn(*mut c_void) -> c_int;
type RemainingMs = unsafe extern "C" fn(*mut c_void) -> i64;
type Log = unsafe extern "C" fn(c_int, *const c_char, c_int);

/// polygate's extensions, when the host has them (not under OpenResty).
struct Ext {
    poll_n: PollN,
    respond2: Respond2,
    cancelled: IsCancelled,
    remaining: RemainingMs,
    log: Log,
}

fn sym(name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with a NUL-terminated name; RTLD_DEFAULT searches the global scope
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) }
}

fn ext() -> Option<&'static Ext> {
    static EXT: OnceLock<Option<Ext>> = OnceLock::new();
    EXT.get_or_init(|| {
        let v = sym(c"polygate_ffi_abi_version");
        let names = [
            sym(c"polygate_ffi_task_poll_n"),
            sym(c"polygate_ffi_respond2"),
            sym(c"polygate_ffi_task_is_cancelled"),
            sym(c"polygate_ffi_task_remaining_ms"),
            sym(c"polygate_ffi_log"),
        ];
        if v.is_null() || names.iter().any(|p| p.is_null()) {
            return None;
        }
        // SAFETY: each symbol is the host function of the published type (include/polygate_ffi.h)
        unsafe {
            let version: unsafe extern "C" fn() -> u32 = std::mem::transmute(v);
            if version() >> 16 != 1 {
                return None;
            }
            Some(Ext {
                poll_n: std::mem::transmute::<*mut c_void, PollN>(names[0]),
                respond2: std::mem::transmute::<*mut c_void, Respond2>(names[1]),
                cancelled: std::mem::transmute::<*mut c_void, IsCancelled>(names[2]),
                remaining: std::mem::transmute::<*mut c_void, RemainingMs>(names[3]),
                log: std::mem::transmute::<*mut c_void, Log>(names[4]),
            })
        }
    })
    .as_ref()
}

/// Writes a line to the host's log (polygate) or stderr (elsewhere).
fn log(level: c_int, msg: &str) {
    match ext() {
        // SAFETY: msg is valid for len bytes for the call
        Some(e) => unsafe { (e.log)(level, msg.as_ptr().cast(), msg.len() as c_int) },
        None => eprintln!("ffi_python3: {msg}"),
    }
}

/// The Python part of `polygate_ffi` (serve, the asyncio loop, Task).
const SDK: &str = include_str!("sdk.py");

/// Whether this loader started the interpreter (then it also finalises it).
static OWNS_INTERPRETER: OnceLock<bool> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// `libffi_init(cfg, tq)`: see the crate documentation for the cfg grammar.
///
/// # Safety
///
/// `cfg` is NULL or a NUL-terminated string valid for the call; `tq` is the host's queue.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libffi_init(cfg: *mut c_char, tq: *mut c_void) -> c_int {
    let cfg = if cfg.is_null() {
        String::new()
    } else {
        // SAFETY: the host passes a NUL-terminated string valid for this call
        unsafe { CStr::from_ptr(cfg) }
            .to_string_lossy()
            .into_owned()
    };
    let tq = tq as usize;
    match std::panic::catch_unwind(move || init(&cfg, tq)) {
        Ok(rc) => rc,
        Err(_) => {
            log(0, "libffi_init panicked");
            1
        }
    }
}

/// A parsed cfg.
#[derive(Debug, PartialEq, Eq)]
struct Spec {
    venv: Option<String>,
    dir: Option<String>,
    module: String,
    reload: bool,
    func: String,
    rest: Option<String>,
}

/// `[venv=<dir>;][dir/]module[?],func[,rest]`
fn parse(cfg: &str) -> Result<Spec, String> {
    let (venv, cfg) = match cfg.strip_prefix("venv=") {
        Some(v) => match v.split_once(';') {
            Some((venv, rest)) => (Some(venv.to_owned()), rest),
            None => return Err(format!("cfg {cfg:?}: venv=<dir> must end with ';'")),
        },
        None => (None, cfg),
    };
    let mut parts = cfg.splitn(3, ',');
    let path = parts.next().unwrap_or_default();
    let func = parts.next().unwrap_or_default();
    let rest = parts.next().map(str::to_owned);
    let (dir, module) = match path.rfind('/') {
        Some(i) => (Some(path[..i].to_owned()), &path[i + 1..]),
        None => (None, path),
    };
    let (module, reload) = match module.strip_suffix('?') {
        Some(m) => (m, true),
        None => (module, false),
    };
    if module.is_empty() || func.is_empty() {
        return Err(format!(
            "cfg {cfg:?}: expected \"[dir/]module[?],func[,rest]\""
        ));
    }
    Ok(Spec {
        venv,
        dir,
        module: module.to_owned(),
        reload,
        func: func.to_owned(),
        rest,
    })
}

fn init(cfg: &str, tq: usize) -> c_int {
    let spec = match parse(cfg) {
        Ok(s) => s,
        Err(e) => {
            log(0, &e);
            return 1;
        }
    };
    let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    start_interpreter();
    Python::with_gil(|py| match run_init(py, &spec, tq) {
        Ok(rc) => rc,
        Err(e) => {
            let tb = format_error(py, &e);
            log(0, &format!("{cfg}: {tb}"));
            1
        }
    })
}

/// Starts the interpreter once per process (unless something else in the process did).
fn start_interpreter() {
    static START: Once = Once::new();
    START.call_once(|| {
        promote_libpython();
        pin_self();
        // SAFETY: a plain query of the interpreter's state
        let running = unsafe { pyo3::ffi::Py_IsInitialized() } != 0;
        if !running {
            // Py_InitializeEx(0): Python installs no signal handlers; the GIL is released
            pyo3::prepare_freethreaded_python();
            // SAFETY: registers a function of this (pinned) library to run at exit
            unsafe { libc::atexit(finalize) };
        }
        let _ = OWNS_INTERPRETER.set(!running);
        Python::with_gil(|py| {
            if let Err(e) = install_module(py) {
                let tb = format_error(py, &e);
                log(0, &format!("cannot create the polygate_ffi module: {tb}"));
            }
        });
    });
}

/// Python's extension modules (`_json`, `_ssl`, ...) resolve libpython's symbols from the global
/// scope: make the libpython this loader links global even when the host loaded the loader
/// with RTLD_LOCAL.
fn promote_libpython() {
    let addr = pyo3::ffi::Py_IsInitialized as *const c_void;
    // SAFETY: dladdr fills `info` for an address inside a loaded object; dlopen with NOLOAD only
    // changes the flags of an object that is already loaded
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) != 0 && !info.dli_fname.is_null() {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_GLOBAL | libc::RTLD_NOLOAD,
            );
        }
    }
}

/// The interpreter cannot be unloaded and started again: keep this library loaded whatever
/// the host's `unpin` says.
fn pin_self() {
    let addr = libffi_init as *const c_void;
    // SAFETY: as in promote_libpython
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) != 0 && !info.dli_fname.is_null() {
            libc::dlopen(
                info.dli_fname,
                libc::RTLD_NOW | libc::RTLD_NOLOAD | libc::RTLD_NODELETE,
            );
        }
    }
}

/// At exit (on the thread that runs `exit`, polygate's main thread, which started the
/// interpreter): stop what can be stopped, then finalise, unless threads are still inside
/// Python (then the interpreter is left as it is rather than wait for them).
extern "C" fn finalize() {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: a plain query of the interpreter's state
        if unsafe { pyo3::ffi::Py_IsInitialized() } == 0 {
            return;
        }
        let ready = Python::with_gil(|py| -> PyResult<bool> {
            let m = py.import("polygate_ffi")?;
            m.getattr("_before_exit")?.call1((2.0,))?.extract::<bool>()
        });
        match ready {
            Ok(true) => {
                // SAFETY: the main thread, which initialised the interpreter, takes the GIL and
                // finalises; no other thread runs Python code any more
                unsafe {
                    pyo3::ffi::PyGILState_Ensure();
                    pyo3::ffi::Py_FinalizeEx();
                }
            }
            Ok(false) => log(
                1,
                "threads still run Python code at exit: the interpreter is not finalised",
            ),
            Err(e) => log(0, &format!("at exit: {e}")),
        }
    });
}

fn format_error(py: Python<'_>, e: &PyErr) -> String {
    let tb = py.import("traceback").and_then(|m| {
        m.getattr("format_exception")?
            .call1((e.value(py),))?
            .extract::<Vec<String>>()
    });
    match tb {
        Ok(lines) => lines.concat(),
        Err(_) => e.to_string(),
    }
}

fn run_init(py: Python<'_>, spec: &Spec, tq: usize) -> PyResult<c_int> {
    let ffi_mod = py.import("polygate_ffi")?;
    if let Some(venv) = &spec.venv {
        ffi_mod.getattr("_add_venv")?.call1((venv,))?;
    }
    if let Some(dir) = &spec.dir {
        ffi_mod.getattr("_add_path")?.call1((dir,))?;
    }
    let module = ffi_mod
        .getattr("_import")?
        .call1((&spec.module, spec.reload))?;
    let func = module.getattr(spec.func.as_str())?;
    // lua-resty-ffi passes the address of the rest of the cfg (or NULL)
    let rest = spec
        .rest
        .as_deref()
        .map(CString::new)
        .transpose()
        .ok()
        .flatten();
    let cfg_addr = rest.as_ref().map_or(0, |c| c.as_ptr() as usize);
    let rc = func.call1((cfg_addr, tq))?;
    drop(rest);
    Ok(if rc.is_none() {
        0
    } else {
        rc.extract::<i64>()?
            .clamp(c_int::MIN as i64, c_int::MAX as i64) as c_int
    })
}

fn install_module(py: Python<'_>) -> PyResult<()> {
    let m = PyModule::new(py, "polygate_ffi")?;
    m.add_function(wrap_pyfunction!(poll, &m)?)?;
    m.add_function(wrap_pyfunction!(poll_n, &m)?)?;
    m.add_function(wrap_pyfunction!(get_req, &m)?)?;
    m.add_function(wrap_pyfunction!(respond, &m)?)?;
    m.add_function(wrap_pyfunction!(is_cancelled, &m)?)?;
    m.add_function(wrap_pyfunction!(remaining_ms, &m)?)?;
    m.add_function(wrap_pyfunction!(cfg_str, &m)?)?;
    m.add_function(wrap_pyfunction!(host_log, &m)?)?;
    m.add("HAS_EXTENSIONS", ext().is_some())?;
    let dict = m.dict();
    dict.set_item("__builtins__", py.import("builtins")?)?;
    let code =
        CString::new(SDK).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    py.run(&code, Some(&dict), None)?;
    py.import("sys")?
        .getattr("modules")?
        .set_item("polygate_ffi", &m)?;
    Ok(())
}

/// `poll(tq) -> task`: waits (without the GIL) for the next task; 0 once the runtime was
/// unloaded (never touch `tq` again then).
#[pyfunction]
fn poll(py: Python<'_>, tq: usize) -> usize {
    // SAFETY: tq is the queue handed to libffi_init (the ABI's contract with the caller)
    py.allow_threads(|| unsafe { ngx_http_lua_ffi_task_poll(tq as *mut c_void) as usize })
}

/// `poll_n(tq, max) -> [task]`: waits (without the GIL) for tasks and takes up to `max` at once
/// under polygate (one elsewhere); `[]` once the runtime was unloaded.
#[pyfunction]
#[pyo3(signature = (tq, max = 32))]
fn poll_n(py: Python<'_>, tq: usize, max: usize) -> Vec<usize> {
    let max = max.clamp(1, 1024);
    py.allow_threads(|| match ext() {
        Some(e) => {
            let mut out = vec![std::ptr::null_mut::<c_void>(); max];
            // SAFETY: out has room for max pointers; tq as in poll
            let n = unsafe { (e.poll_n)(tq as *mut c_void, out.as_mut_ptr(), max as c_int) };
            out[..n.max(0) as usize]
                .iter()
                .map(|p| *p as usize)
                .collect()
        }
        None => {
            // SAFETY: as in poll
            let t = unsafe { ngx_http_lua_ffi_task_poll(tq as *mut c_void) } as usize;
            if t == 0 { Vec::new() } else { vec![t] }
        }
    })
}

/// `get_req(task) -> bytes | None`: the request (None for a nil request).
#[pyfunction]
fn get_req(py: Python<'_>, task: usize) -> Option<Py<PyBytes>> {
    let mut len: c_int = 0;
    // SAFETY: task is a polled, unanswered task (the ABI's contract with the caller)
    let p = unsafe { ngx_http_lua_ffi_get_req(task as *mut c_void, &mut len) };
    if p.is_null() {
        return None;
    }
    // SAFETY: the host's request buffer holds len bytes until the task is answered
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len.max(0) as usize) };
    Some(PyBytes::new(py, bytes).unbind())
}

/// `respond(task, rc, data)`: answers a task exactly once; `data` is bytes, str or None.
#[pyfunction]
#[pyo3(signature = (task, rc, data = None))]
fn respond(task: usize, rc: i32, data: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let owned: Option<Vec<u8>> = match data {
        None => None,
        Some(d) if d.is_none() => None,
        Some(d) => Some(match d.extract::<Vec<u8>>() {
            Ok(b) if !d.is_instance_of::<pyo3::types::PyString>() => b,
            _ => d.extract::<String>()?.into_bytes(),
        }),
    };
    let (ptr, len) = match &owned {
        None => (std::ptr::null_mut(), 0usize),
        Some(b) => {
            // SAFETY: malloc of at least one byte; the host frees it with free()
            let p = unsafe { libc::malloc(b.len().max(1)) }.cast::<u8>();
            if p.is_null() {
                return Err(pyo3::exceptions::PyMemoryError::new_err("malloc"));
            }
            // SAFETY: p has room for b.len() bytes (and one more byte when b is empty)
            unsafe {
                std::ptr::copy_nonoverlapping(b.as_ptr(), p, b.len());
                if b.is_empty() {
                    *p = 0;
                }
            }
            (p.cast::<c_char>(), b.len())
        }
    };
    match ext() {
        // SAFETY: task is polled and unanswered; ptr is NULL or malloc'd, owned by the host now
        Some(e) => unsafe { (e.respond2)(task as *mut c_void, rc, ptr, len, None) },
        None => {
            if len > c_int::MAX as usize {
                // SAFETY: ptr came from malloc above
                unsafe { libc::free(ptr.cast()) };
                // SAFETY: as above, without a body
                unsafe {
                    ngx_http_lua_ffi_respond(task as *mut c_void, 1, std::ptr::null_mut(), 0)
                };
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "answer larger than 2 GiB",
                ));
            }
            // SAFETY: as above; length 0 with a non-NULL buffer is the "\0" of the strlen rule
            unsafe { ngx_http_lua_ffi_respond(task as *mut c_void, rc, ptr, len as c_int) }
        }
    }
    Ok(())
}

/// `is_cancelled(task) -> bool`: the caller is gone (always False outside polygate).
#[pyfunction]
fn is_cancelled(task: usize) -> bool {
    // SAFETY: task is polled and unanswered
    ext().is_some_and(|e| unsafe { (e.cancelled)(task as *mut c_void) } != 0)
}

/// `remaining_ms(task) -> int`: milliseconds the caller still waits, -1 without a deadline.
#[pyfunction]
fn remaining_ms(task: usize) -> i64 {
    match ext() {
        // SAFETY: task is polled and unanswered
        Some(e) => unsafe { (e.remaining)(task as *mut c_void) },
        None => -1,
    }
}

/// `cfg_str(cfg) -> str | None`: the cfg given to the init function as text (it receives the
/// address of a C string, valid during the call, as lua-resty-ffi's loader passes it).
#[pyfunction]
fn cfg_str(cfg: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    if cfg.is_none() {
        return Ok(None);
    }
    if let Ok(s) = cfg.extract::<String>() {
        return Ok(Some(s));
    }
    let addr: usize = cfg.extract()?;
    if addr == 0 {
        return Ok(None);
    }
    // SAFETY: the address the loader passed to the init function, valid during that call
    let s = unsafe { CStr::from_ptr(addr as *const c_char) };
    Ok(Some(s.to_string_lossy().into_owned()))
}

/// `host_log(level, msg)`: 0 error, 1 warn, 2 info, 3 debug; into polygate's log.
#[pyfunction]
fn host_log(level: i32, msg: &str) {
    log(level, msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfg_grammar() {
        let s = parse("ffi.echo?,init").unwrap();
        assert_eq!(
            (s.module.as_str(), s.reload, s.func.as_str()),
            ("ffi.echo", true, "init")
        );
        assert_eq!((s.dir, s.rest, s.venv), (None, None, None));
        let s = parse("/srv/app/handlers,init,{\"a\":1},x").unwrap();
        assert_eq!(s.dir.as_deref(), Some("/srv/app"));
        assert_eq!(s.module, "handlers");
        assert_eq!(s.rest.as_deref(), Some("{\"a\":1},x"));
        let s = parse("venv=/opt/venv;mod,main,").unwrap();
        assert_eq!(s.venv.as_deref(), Some("/opt/venv"));
        assert_eq!(s.rest.as_deref(), Some(""));
        assert!(parse("mod").is_err());
        assert!(parse(",init").is_err());
        assert!(parse("venv=/x mod,init").is_err());
    }
}
