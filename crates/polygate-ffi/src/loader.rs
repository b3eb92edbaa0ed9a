//! The loading thread: every `dlopen` and `libffi_init` of the process runs on one thread that
//! lives as long as the process, as in an nginx worker process.
//!
//! lua-resty-ffi's loaders rely on it: the Java loader keeps the `JNIEnv` of the thread that
//! created the JVM, the Python loader finalises the interpreter in a library destructor that must
//! run on the thread that initialised it. The `polygate` binary makes its **main thread** the
//! loading thread ([`run_main`]): the gateway itself runs on a thread of its own, the main thread
//! runs load jobs, and when the gateway stops the main thread returns from `main`, so the
//! process's exit (and every library destructor) runs on the thread that ran every
//! `libffi_init`. A process that never calls [`run_main`] (tests, embedders) gets a dedicated
//! loading thread on its first load, living until the process exits.
//!
//! Jobs queue in order; nothing a worker thread locks is held while a job runs, and a worker
//! never blocks on a job except where a caller asks for it (`Slot::wait_blocking`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, ThreadId};

type Job = Box<dyn FnOnce() + Send>;

enum Msg {
    Job(Job),
    Exit,
}

struct Loader {
    tx: mpsc::Sender<Msg>,
    thread: ThreadId,
}

static LOADER: OnceLock<Loader> = OnceLock::new();
static EXITING: AtomicBool = AtomicBool::new(false);

/// Whether the gateway has stopped and the process is exiting (set by [`run_main`] once the
/// gateway's thread finished): from then on, logging goes straight to stderr.
pub fn exiting() -> bool {
    EXITING.load(Ordering::Acquire)
}

/// Stack of the thread [`run_main`] starts for the gateway (what a main thread has).
const MAIN_STACK: usize = 8 << 20;

/// Makes the calling thread (the process's main thread) the loading thread and runs `f` on a new
/// thread named `polygate-main`; returns `f`'s result once it finishes and the jobs queued before
/// that have run. A panic in `f` resumes on the calling thread. If a loading thread already
/// exists, `f` runs on the calling thread instead.
pub fn run_main<R, F>(f: F) -> R
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Msg>();
    let done = tx.clone();
    if LOADER
        .set(Loader {
            tx,
            thread: thread::current().id(),
        })
        .is_err()
    {
        return f();
    }
    let main = thread::Builder::new()
        .name("polygate-main".into())
        .stack_size(MAIN_STACK)
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(f));
            let _ = done.send(Msg::Exit);
            r
        });
    let main = match main {
        Ok(h) => h,
        Err(e) => panic!("cannot start the gateway thread: {e}"),
    };
    for msg in rx.iter() {
        match msg {
            Msg::Job(job) => run_job(job),
            Msg::Exit => break,
        }
    }
    let joined = main.join();
    EXITING.store(true, Ordering::Release);
    match joined {
        Ok(Ok(r)) => r,
        Ok(Err(p)) | Err(p) => std::panic::resume_unwind(p),
    }
}

fn run_job(job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        tracing::error!("ffi: a load job panicked on the loading thread");
    }
}

fn loader() -> &'static Loader {
    LOADER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Msg>();
        let (id_tx, id_rx) = mpsc::channel();
        let spawned = thread::Builder::new()
            .name("polygate-loader".into())
            .stack_size(MAIN_STACK)
            .spawn(move || {
                let _ = id_tx.send(thread::current().id());
                for msg in rx.iter() {
                    if let Msg::Job(job) = msg {
                        run_job(job);
                    }
                }
            });
        let thread = match spawned.ok().and_then(|_| id_rx.recv().ok()) {
            Some(id) => id,
            None => panic!("cannot start the FFI loading thread"),
        };
        Loader { tx, thread }
    })
}

/// Bounds the process's exit: once `main` returns, library destructors and `atexit` handlers
/// run (an interpreter's finalisation, a JVM's or Node's teardown). If they have not finished
/// after `after`, the process ends with `code` without them (logged), so a runtime that hangs
/// in its teardown cannot keep the gateway from exiting.
pub fn exit_watchdog(code: i32, after: std::time::Duration) {
    let _ = thread::Builder::new()
        .name("polygate-exit".into())
        .spawn(move || {
            thread::sleep(after);
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "polygate: runtimes still tearing down {after:?} after the gateway stopped; exiting without them"
            );
            exit_now(code);
        });
}

#[allow(unsafe_code, reason = "_exit")]
fn exit_now(code: i32) {
    // SAFETY: _exit ends the process at once; nothing runs after it
    unsafe { libc::_exit(code) }
}

/// Queues `job` on the loading thread (runs it at once when called from that thread).
pub fn submit(job: impl FnOnce() + Send + 'static) {
    let l = loader();
    if thread::current().id() == l.thread {
        run_job(Box::new(job));
        return;
    }
    if let Err(mpsc::SendError(Msg::Job(job))) = l.tx.send(Msg::Job(Box::new(job))) {
        // the loading thread is gone (the process is exiting): run it here rather than lose it
        run_job(job);
    }
}

/// Whether the calling thread is the loading thread.
pub fn on_loading_thread() -> bool {
    LOADER
        .get()
        .is_some_and(|l| l.thread == thread::current().id())
}
