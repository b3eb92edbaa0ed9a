//! polygate's Java loader (`libffi_java.so`): Java runtimes in-process through the lua-resty-ffi
//! ABI.
//!
//! `ngx.load_ffi("ffi_java", "pkg.Class[?],method[,rest]")`, or the `ffi` plugin with the same
//! `lib` and `cfg`, calls the static method `int method(String rest, long tq)` of `pkg.Class`,
//! which starts serving the queue `tq` and returns the rc (0 = loaded). With `?` the class is
//! loaded by a fresh child-first class loader (`polygate.ffi.Loader`, or lua-resty-ffi's
//! `resty.ffi.Loader` when only that is on the class path), so a rebuilt class is picked up after
//! an unload.
//!
//! One JVM per process, created by the first `libffi_init`, which polygate runs on its loading
//! thread (the main thread), and kept; every thread that calls into the loader is attached once
//! and stays attached (lua-resty-ffi's loader kept the first thread's `JNIEnv` and crashed when a
//! later init came from another thread). JVM options: `-Djava.class.path` from `CLASSPATH`, then
//! `JAVA_OPTS` and `POLYGATE_JAVA_OPTS` (split on spaces), and `-Xrs` unless
//! `POLYGATE_JAVA_SIGNALS=jvm`: with it the JVM leaves SIGTERM, SIGINT, SIGHUP and SIGQUIT to
//! polygate, which drains on them (the JVM's own handlers would run shutdown hooks and exit);
//! the faults the JVM handles itself (SIGSEGV for null checks, ...) stay the JVM's.
//! libjvm is opened at run time: `POLYGATE_LIBJVM`, else `$JAVA_HOME/lib/server/libjvm.so`,
//! else the JDK found when the loader was built.
//!
//! The natives of the `polygate.ffi.Ffi` SDK class (`poll`, `pollN`, `getReq`, `respond`,
//! `isCancelled`, `remainingMs`, `log`) are registered when that class is on the class path;
//! runtimes written for lua-resty-ffi with jnr-ffi keep working (the host's C functions are in
//! the process's global scope).
#![allow(
    unsafe_code,
    reason = "the C ABI: libffi_init, the host's task functions, JNI natives, dlopen"
)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

use jni::objects::{JByteArray, JClass, JLongArray, JString, JValue};
use jni::sys::{jboolean, jbyteArray, jint, jlong};
use jni::{JNIEnv, JavaVM, NativeMethod};

use polygate_ffi_sdk::host;

fn sym(handle: *mut c_void, name: &CStr) -> *mut c_void {
    // SAFETY: dlsym with a NUL-terminated name on a handle from dlopen
    unsafe { libc::dlsym(handle, name.as_ptr()) }
}

/// Writes a line to the host's log (polygate) or stderr (elsewhere).
fn log(level: c_int, msg: &str) {
    host::log("ffi_java", level, msg);
}

type CreateVm =
    unsafe extern "system" fn(*mut *mut jni::sys::JavaVM, *mut *mut c_void, *mut c_void) -> jint;
type CreatedVms = unsafe extern "system" fn(*mut *mut jni::sys::JavaVM, jint, *mut jint) -> jint;

static VM: OnceLock<JavaVM> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// The JVM options the loader starts the JVM with.
fn jvm_options() -> Vec<String> {
    let mut opts = Vec::new();
    if let Ok(cp) = std::env::var("CLASSPATH")
        && !cp.is_empty()
    {
        opts.push(format!("-Djava.class.path={cp}"));
    }
    for var in ["JAVA_OPTS", "POLYGATE_JAVA_OPTS"] {
        if let Ok(v) = std::env::var(var) {
            opts.extend(v.split_whitespace().map(str::to_owned));
        }
    }
    let jvm_signals = std::env::var("POLYGATE_JAVA_SIGNALS").is_ok_and(|v| v == "jvm");
    if !jvm_signals && !opts.iter().any(|o| o == "-Xrs") {
        opts.push("-Xrs".to_owned());
    }
    opts
}

fn libjvm_path() -> String {
    if let Ok(p) = std::env::var("POLYGATE_LIBJVM") {
        return p;
    }
    if let Ok(h) = std::env::var("JAVA_HOME") {
        let p = std::path::Path::new(&h).join("lib/server/libjvm.so");
        if p.exists() {
            return p.display().to_string();
        }
    }
    env!("POLYGATE_DEFAULT_LIBJVM").to_owned()
}

/// The process's JVM: the one already running (another loader may have created it), or a new
/// one created here.
fn vm() -> Result<&'static JavaVM, String> {
    if let Some(vm) = VM.get() {
        return Ok(vm);
    }
    let path = libjvm_path();
    let c_path = CString::new(path.clone()).map_err(|e| e.to_string())?;
    // SAFETY: dlopen of the JVM library; its initialisers are the JVM's
    let h = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        // SAFETY: dlerror returns NULL or a message valid until the next dl call
        let err = unsafe { libc::dlerror() };
        let why = if err.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: a NUL-terminated message from dlerror
            unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!(
            "cannot open libjvm ({path}): {why}; set JAVA_HOME or POLYGATE_LIBJVM"
        ));
    }
    let create = sym(h, c"JNI_CreateJavaVM");
    let created = sym(h, c"JNI_GetCreatedJavaVMs");
    if create.is_null() || created.is_null() {
        return Err(format!("{path} does not export JNI_CreateJavaVM"));
    }
    // SAFETY: the JNI invocation API's published signatures
    let (create, created) = unsafe {
        (
            std::mem::transmute::<*mut c_void, CreateVm>(create),
            std::mem::transmute::<*mut c_void, CreatedVms>(created),
        )
    };
    let mut raw: *mut jni::sys::JavaVM = std::ptr::null_mut();
    let mut n: jint = 0;
    // SAFETY: room for one VM pointer and the count
    let rc = unsafe { created(&mut raw, 1, &mut n) };
    if rc != jni::sys::JNI_OK || n == 0 {
        let opts = jvm_options();
        let c_opts: Vec<CString> = opts
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("JVM option: {e}"))?;
        let mut options: Vec<jni::sys::JavaVMOption> = c_opts
            .iter()
            .map(|c| jni::sys::JavaVMOption {
                optionString: c.as_ptr().cast_mut(),
                extraInfo: std::ptr::null_mut(),
            })
            .collect();
        let mut args = jni::sys::JavaVMInitArgs {
            version: jni::sys::JNI_VERSION_1_8,
            nOptions: options.len() as jint,
            options: options.as_mut_ptr(),
            ignoreUnrecognized: jni::sys::JNI_FALSE,
        };
        let mut env: *mut c_void = std::ptr::null_mut();
        // SAFETY: args and its options live for the call; the JVM copies what it keeps
        let rc = unsafe {
            create(
                &mut raw,
                &mut env,
                (&mut args as *mut jni::sys::JavaVMInitArgs).cast(),
            )
        };
        if rc != jni::sys::JNI_OK {
            return Err(format!(
                "JNI_CreateJavaVM failed with {rc} (options {opts:?})"
            ));
        }
        log(2, &format!("JVM started ({path}, options {opts:?})"));
    }
    // SAFETY: a valid JavaVM pointer from the invocation API
    let vm = unsafe { JavaVM::from_raw(raw) }.map_err(|e| e.to_string())?;
    let vm = VM.get_or_init(|| vm);
    if let Ok(mut env) = vm.attach_current_thread_permanently() {
        register_natives(&mut env);
    }
    Ok(vm)
}

/// Registers the natives of `polygate.ffi.Ffi` when the SDK is on the class path.
fn register_natives(env: &mut JNIEnv<'_>) {
    let Ok(cls) = env.find_class("polygate/ffi/Ffi") else {
        let _ = env.exception_clear();
        log(
            2,
            "polygate.ffi.Ffi is not on the class path: the Java SDK's natives are not registered",
        );
        return;
    };
    let m = |name: &str, sig: &str, f: *mut c_void| NativeMethod {
        name: name.into(),
        sig: sig.into(),
        fn_ptr: f,
    };
    let methods = [
        m("poll", "(J)J", native_poll as *mut c_void),
        m("pollN", "(J[J)I", native_poll_n as *mut c_void),
        m("getReq", "(J)[B", native_get_req as *mut c_void),
        m("respond", "(JI[B)V", native_respond as *mut c_void),
        m("isCancelled", "(J)Z", native_is_cancelled as *mut c_void),
        m("remainingMs", "(J)J", native_remaining_ms as *mut c_void),
        m("log", "(ILjava/lang/String;)V", native_log as *mut c_void),
    ];
    if let Err(e) = env.register_native_methods(&cls, &methods) {
        let _ = env.exception_describe();
        let _ = env.exception_clear();
        log(
            0,
            &format!("cannot register polygate.ffi.Ffi's natives: {e}"),
        );
    }
}

/// `libffi_init(cfg, tq)`: see the crate documentation for the cfg grammar.
///
/// # Safety
///
/// `cfg` is NULL or a NUL-terminated string valid for the call; `tq` is the host's queue.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn libffi_init(cfg: *mut c_char, tq: *mut c_void) -> c_int {
    // SAFETY: the host's cfg, as this function's contract says
    unsafe { host::init_entry("ffi_java", cfg, tq, init) }
}

/// A parsed cfg: `class[?],method[,rest]`.
#[derive(Debug, PartialEq, Eq)]
struct Spec {
    class: String,
    reload: bool,
    method: String,
    rest: String,
}

fn parse(cfg: &str) -> Result<Spec, String> {
    let mut parts = cfg.splitn(3, ',');
    let class = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default();
    let (class, reload) = match class.strip_suffix('?') {
        Some(c) => (c, true),
        None => (class, false),
    };
    if class.is_empty() || method.is_empty() {
        return Err(format!(
            "cfg {cfg:?}: expected \"pkg.Class[?],method[,rest]\""
        ));
    }
    Ok(Spec {
        class: class.to_owned(),
        reload,
        method: method.to_owned(),
        rest: rest.to_owned(),
    })
}

fn init(cfg: &str, tq: usize) -> Result<c_int, String> {
    let spec = parse(cfg)?;
    let _g = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let vm = vm()?;
    // attached once, kept attached: a later init on this thread reuses its JNIEnv
    let mut env = vm
        .attach_current_thread_permanently()
        .map_err(|e| format!("cannot attach to the JVM: {e}"))?;
    let r = env.with_local_frame(16, |env| -> Result<c_int, jni::errors::Error> {
        let (cls, method, arg) = if spec.reload {
            let cls = match env.find_class("polygate/ffi/Loader") {
                Ok(c) => c,
                Err(_) => {
                    env.exception_clear()?;
                    env.find_class("resty/ffi/Loader")?
                }
            };
            // both loaders take the whole cfg, as lua-resty-ffi's does
            (cls, "init".to_owned(), cfg.to_owned())
        } else {
            (
                env.find_class(spec.class.replace('.', "/"))?,
                spec.method.clone(),
                spec.rest.clone(),
            )
        };
        let jarg = env.new_string(&arg)?;
        let rc = env
            .call_static_method(
                &cls,
                &method,
                "(Ljava/lang/String;J)I",
                &[JValue::Object(&jarg), JValue::Long(tq as jlong)],
            )?
            .i()?;
        Ok(rc)
    });
    match r {
        Ok(rc) => Ok(rc),
        Err(e) => {
            let detail = describe_exception(&mut env);
            Err(format!("{cfg}: {e}{detail}"))
        }
    }
}

/// The pending Java exception as text (its stack trace), cleared.
fn describe_exception(env: &mut JNIEnv<'_>) -> String {
    if !env.exception_check().unwrap_or(false) {
        return String::new();
    }
    let Ok(t) = env.exception_occurred() else {
        return String::new();
    };
    let _ = env.exception_clear();
    let text = (|| -> Result<String, jni::errors::Error> {
        let sw = env.new_object("java/io/StringWriter", "()V", &[])?;
        let pw = env.new_object(
            "java/io/PrintWriter",
            "(Ljava/io/Writer;)V",
            &[JValue::Object(&sw)],
        )?;
        env.call_method(
            &t,
            "printStackTrace",
            "(Ljava/io/PrintWriter;)V",
            &[JValue::Object(&pw)],
        )?;
        let s = env
            .call_method(&sw, "toString", "()Ljava/lang/String;", &[])?
            .l()?;
        let s: String = env.get_string(&JString::from(s))?.into();
        Ok(s)
    })();
    let _ = env.exception_clear();
    match text {
        Ok(s) => format!("\n{s}"),
        Err(_) => String::new(),
    }
}

fn throw(env: &mut JNIEnv<'_>, msg: &str) {
    let _ = env.throw_new("java/lang/IllegalStateException", msg);
}

extern "system" fn native_poll(_env: JNIEnv<'_>, _cls: JClass<'_>, tq: jlong) -> jlong {
    std::panic::catch_unwind(|| host::poll(tq as usize) as jlong).unwrap_or(0)
}

extern "system" fn native_poll_n(
    mut env: JNIEnv<'_>,
    _cls: JClass<'_>,
    tq: jlong,
    out: JLongArray<'_>,
) -> jint {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<jint, String> {
        let max = env.get_array_length(&out).map_err(|e| e.to_string())?;
        if max <= 0 {
            return Err("pollN: empty array".into());
        }
        let tasks: Vec<jlong> = host::poll_n(tq as usize, max as usize)
            .into_iter()
            .map(|t| t as jlong)
            .collect();
        env.set_long_array_region(&out, 0, &tasks)
            .map_err(|e| e.to_string())?;
        Ok(tasks.len() as jint)
    }));
    match r {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            throw(&mut env, &e);
            0
        }
        Err(_) => 0,
    }
}

extern "system" fn native_get_req(
    mut env: JNIEnv<'_>,
    _cls: JClass<'_>,
    task: jlong,
) -> jbyteArray {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match host::request(task as usize) {
            None => Ok(std::ptr::null_mut()),
            Some(bytes) => env.byte_array_from_slice(bytes).map(|a| a.into_raw()),
        }
    }));
    match r {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            throw(&mut env, &e.to_string());
            std::ptr::null_mut()
        }
        Err(_) => std::ptr::null_mut(),
    }
}

extern "system" fn native_respond(
    mut env: JNIEnv<'_>,
    _cls: JClass<'_>,
    task: jlong,
    rc: jint,
    data: JByteArray<'_>,
) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), String> {
        let bytes: Option<Vec<u8>> = if data.is_null() {
            None
        } else {
            Some(env.convert_byte_array(&data).map_err(|e| e.to_string())?)
        };
        host::respond(task as usize, rc, bytes.as_deref());
        Ok(())
    }));
    if let Ok(Err(e)) = r {
        throw(&mut env, &e);
    }
}

extern "system" fn native_is_cancelled(
    _env: JNIEnv<'_>,
    _cls: JClass<'_>,
    task: jlong,
) -> jboolean {
    jboolean::from(host::is_cancelled(task as usize))
}

extern "system" fn native_remaining_ms(_env: JNIEnv<'_>, _cls: JClass<'_>, task: jlong) -> jlong {
    host::remaining_ms(task as usize)
}

extern "system" fn native_log(
    mut env: JNIEnv<'_>,
    _cls: JClass<'_>,
    level: jint,
    msg: JString<'_>,
) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if msg.is_null() {
            return;
        }
        if let Ok(s) = env.get_string(&msg) {
            let s: String = s.into();
            log(level, &s);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfg_grammar() {
        // lua-resty-ffi examples/java/nginx.conf: ngx.load_ffi("ffi_java", "demo.echo.App?,init,")
        let s = parse("demo.echo.App?,init,").unwrap();
        assert_eq!(
            (
                s.class.as_str(),
                s.reload,
                s.method.as_str(),
                s.rest.as_str()
            ),
            ("demo.echo.App", true, "init", "")
        );
        let s = parse("a.B,start,x,y").unwrap();
        assert_eq!((s.reload, s.rest.as_str()), (false, "x,y"));
        let s = parse("a.B,start").unwrap();
        assert_eq!(s.rest, "");
        assert!(parse("a.B").is_err());
        assert!(parse("?,x").is_err());
    }

    #[test]
    fn xrs_is_the_default() {
        assert!(jvm_options().iter().any(|o| o == "-Xrs"));
    }
}
