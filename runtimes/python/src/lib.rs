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
use std::sync::{Mutex, Once};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};

use polygate_ffi_sdk::host;

/// Writes a line to the host's log (polygate) or stderr (elsewhere).
fn log(level: c_int, msg: &str) {
    host::log("ffi_python3", level, msg);
}

/// The Python part of `polygate_ffi` (serve, the asyncio loop, Task).
const SDK: &str = include_str!("sdk.py");

static INIT_LOCK: Mutex<()> = Mutex::new(());

/// `libffi_init(cfg, tq)`: see the crate documentation for the cfg grammar.
///
/// # Safety
///
/// `cfg` is NULL or a NUL-terminated string valid for the call; `tq` is the host's queue.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libffi_init(cfg: *mut c_char, tq: *mut c_void) -> c_int {
    // SAFETY: the host's cfg, as this function's contract says
    unsafe { host::init_entry("ffi_python3", cfg, tq, init) }
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

fn init(cfg: &str, tq: usize) -> Result<c_int, String> {
    let spec = parse(cfg)?;
    let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    start_interpreter();
    Python::with_gil(|py| {
        run_init(py, &spec, tq).map_err(|e| format!("{cfg}: {}", format_error(py, &e)))
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
    m.add("HAS_EXTENSIONS", host::has_extensions())?;
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
    py.allow_threads(|| host::poll(tq))
}

/// `poll_n(tq, max) -> [task]`: waits (without the GIL) for tasks and takes up to `max` at once
/// under polygate (one elsewhere); `[]` once the runtime was unloaded.
#[pyfunction]
#[pyo3(signature = (tq, max = 32))]
fn poll_n(py: Python<'_>, tq: usize, max: usize) -> Vec<usize> {
    py.allow_threads(|| host::poll_n(tq, max))
}

/// `get_req(task) -> bytes | None`: the request (None for a nil request).
#[pyfunction]
fn get_req(py: Python<'_>, task: usize) -> Option<Py<PyBytes>> {
    host::request(task).map(|b| PyBytes::new(py, b).unbind())
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
    host::respond(task, rc, owned.as_deref());
    Ok(())
}

/// `is_cancelled(task) -> bool`: the caller is gone (always False outside polygate).
#[pyfunction]
fn is_cancelled(task: usize) -> bool {
    host::is_cancelled(task)
}

/// `remaining_ms(task) -> int`: milliseconds the caller still waits, -1 without a deadline.
#[pyfunction]
fn remaining_ms(task: usize) -> i64 {
    host::remaining_ms(task)
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
        // lua-resty-ffi examples/python/nginx.conf: ngx.load_ffi("resty_ffi_python", "ffi.echo?,init")
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
