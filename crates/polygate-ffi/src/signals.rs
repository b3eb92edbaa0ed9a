//! The signals that stop the gateway (SIGTERM, SIGQUIT, SIGINT), kept polygate's whatever
//! runtimes the process loads.
//!
//! Language runtimes install handlers of their own when they start: the JVM for SIGTERM, SIGINT,
//! SIGHUP and SIGQUIT (shutdown hooks, thread dumps), Node.js for SIGINT and SIGTERM (after
//! resetting every disposition), CPython for SIGINT. Any of them would end polygate at once
//! instead of draining. So polygate installs one small handler of its own for the three stop
//! signals (it writes the signal number to a pipe read by a thread; `SA_ONSTACK`, as Go requires
//! of foreign handlers), puts it back right after every library load and `libffi_init`
//! ([`reassert`]), and checks it once a second for runtimes that install theirs later from a
//! thread of their own. Faults a runtime handles itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGURG,
//! SIGPROF, SIGPIPE, the JVM's and Go's own) are never touched, so they keep reaching it.
#![allow(unsafe_code, reason = "sigaction, pipe and write")]

use std::ffi::{c_int, c_void};
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

/// The signals polygate keeps for itself.
pub const STOP_SIGNALS: [c_int; 3] = [libc::SIGTERM, libc::SIGQUIT, libc::SIGINT];

static PIPE_W: AtomicI32 = AtomicI32::new(-1);
static WATCH: OnceLock<tokio::sync::watch::Sender<Option<c_int>>> = OnceLock::new();

extern "C" fn on_signal(sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let fd = PIPE_W.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let b = sig as u8;
    // SAFETY: write(2) and errno access are async-signal-safe; `b` lives for the call; errno is
    // restored so the interrupted code does not see ours
    unsafe {
        let errno = *libc::__errno_location();
        let _ = libc::write(fd, (&b as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

fn handler_addr() -> libc::sighandler_t {
    on_signal as extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) as libc::sighandler_t
}

fn install_one(sig: c_int) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in; sigemptyset/sigaddset/sigaction get
    // pointers to it that live for the calls; the handler is async-signal-safe
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler_addr();
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut act.sa_mask, s);
        }
        if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The handler currently installed for `sig` (its address, or `SIG_DFL`/`SIG_IGN`).
pub fn current_handler(sig: c_int) -> libc::sighandler_t {
    // SAFETY: sigaction with a NULL new action only reads the current one into `old`
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
            return libc::SIG_DFL;
        }
        old.sa_sigaction
    }
}

/// Installs polygate's stop-signal handling (once per process) and returns a receiver that
/// sees the last stop signal received. Also unblocks the stop signals on the calling thread, in
/// case the process was started with them blocked.
pub fn install() -> io::Result<tokio::sync::watch::Receiver<Option<c_int>>> {
    if let Some(tx) = WATCH.get() {
        return Ok(tx.subscribe());
    }
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (r, w) = (fds[0], fds[1]);
    // SAFETY: fcntl on a descriptor this function owns; a full pipe must not block a handler
    unsafe {
        let fl = libc::fcntl(w, libc::F_GETFL);
        libc::fcntl(w, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let (tx, rx) = tokio::sync::watch::channel(None);
    if WATCH.set(tx).is_err() {
        // SAFETY: both descriptors were created above and are not shared
        unsafe {
            libc::close(r);
            libc::close(w);
        }
        return install();
    }
    PIPE_W.store(w, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("polygate-signals".into())
        .spawn(move || read_loop(r))?;
    for s in STOP_SIGNALS {
        install_one(s)?;
    }
    // SAFETY: a sigset built here and passed by pointer for the call
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    std::thread::Builder::new()
        .name("polygate-sigguard".into())
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                reassert();
            }
        })?;
    Ok(rx)
}

fn read_loop(fd: c_int) {
    let mut buf = [0u8; 16];
    loop {
        // SAFETY: reads into a buffer owned by this frame, at most its length
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        if let Some(tx) = WATCH.get() {
            for &b in &buf[..n as usize] {
                tx.send_replace(Some(c_int::from(b)));
            }
        }
    }
}

/// Puts polygate's handler back on every stop signal whose handler a runtime replaced (logged).
/// Does nothing before [`install`].
pub fn reassert() {
    if PIPE_W.load(Ordering::Relaxed) < 0 {
        return;
    }
    for s in STOP_SIGNALS {
        if current_handler(s) != handler_addr() {
            tracing::warn!(
                "signal {}: a runtime replaced polygate's handler; restored (polygate drains on stop signals)",
                name(s)
            );
            if let Err(e) = install_one(s) {
                tracing::error!("signal {}: cannot restore the handler: {e}", name(s));
            }
        }
    }
}

/// The signal's name.
pub fn name(sig: c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGINT => "SIGINT",
        _ => "signal",
    }
}
