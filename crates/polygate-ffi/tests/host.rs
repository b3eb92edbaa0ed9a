//! The host against real runtime libraries written in C: one against nothing but the three
//! published lua-resty-ffi declarations, one using polygate's extensions.
#![allow(missing_docs, clippy::unwrap_used)]
#![allow(unsafe_code, reason = "reads test counters exported by a C runtime")]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use polygate_ffi::{CallError, LoadOptions, host};

/// Compiles a C runtime from tests/c into a shared object, once per test process (tests run
/// in parallel and must not replace a library another test already loaded).
fn build(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let p = compile(name);
    built.push((name.to_owned(), p.clone()));
    p
}

fn compile(name: &str) -> PathBuf {
    // keep the exports referenced so the linker keeps (and exports) them
    std::hint::black_box(polygate_ffi::abi::exported_symbols());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ffi-c");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("lib{name}.so"));
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/c/{name}.c"));
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../include");
    let tmp = dir.join(format!("lib{name}.{}.so", std::process::id()));
    let st = Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O1", "-g", "-pthread", "-Wall", "-Werror", "-o",
        ])
        .arg(&tmp)
        .arg(&src)
        .arg("-I")
        .arg(&include)
        .status()
        .expect("a C compiler (cc)");
    assert!(st.success(), "compiling {}", src.display());
    std::fs::rename(&tmp, &out).unwrap();
    out
}

async fn wait_until(f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn opts() -> LoadOptions {
    LoadOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compat_runtime_echo_rc_null_and_strlen_rule() {
    let lib = build("compat_runtime");
    let lib = lib.to_str().unwrap();
    // NULL cfg: echo
    let rt = host().load(lib, None, &opts()).unwrap();
    let (rc, body) = rt.call(Some(b"hello\0with nul"), None).await.unwrap();
    assert_eq!((rc, body.as_deref()), (0, Some(&b"hello\0with nul"[..])));
    let (rc, body) = rt.call(Some(b""), None).await.unwrap();
    assert_eq!(
        (rc, body.as_deref()),
        (0, Some(&b""[..])),
        "malloc'd \\0 with length 0 is empty"
    );
    // same key: same runtime, libffi_init not called again
    assert!(Arc::ptr_eq(&rt, &host().load(lib, None, &opts()).unwrap()));

    let rt = host().load(lib, Some("strlen"), &opts()).unwrap();
    let (_, body) = rt.call(Some(b"abc\0def"), None).await.unwrap();
    assert_eq!(
        body.as_deref(),
        Some(&b"abc"[..]),
        "length 0 means NUL-terminated"
    );

    let rt = host().load(lib, Some("rc"), &opts()).unwrap();
    let (rc, body) = rt.call(Some(b"x"), None).await.unwrap();
    assert_eq!((rc, body.as_deref()), (7, Some(&b"bad input"[..])));

    let rt = host().load(lib, Some("null"), &opts()).unwrap();
    assert_eq!(rt.call(None, None).await.unwrap(), (0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_failure_and_missing_library() {
    let lib = build("compat_runtime");
    let lib = lib.to_str().unwrap();
    let err = host().load(lib, Some("fail:5"), &opts()).err().unwrap();
    assert_eq!(err.rc(), Some(5));
    assert!(
        err.to_string().contains("libffi_init of") && err.to_string().contains("rc 5"),
        "{err}"
    );
    assert!(
        host().get(lib, Some("fail:5")).is_none(),
        "a failed init is not cached"
    );
    let err = host().load("no_such_runtime", None, &opts()).err().unwrap();
    assert!(
        err.to_string().contains("cannot load no_such_runtime"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_names_resolve_through_the_library_path() {
    let lib = build("compat_runtime");
    host().set_lib_path(vec![lib.parent().unwrap().to_path_buf()]);
    assert_eq!(host().resolve("compat_runtime"), lib);
    let rt = host()
        .load("compat_runtime", Some("echo"), &opts())
        .unwrap();
    assert_eq!(
        rt.call(Some(b"short"), None).await.unwrap().1.as_deref(),
        Some(&b"short"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_fails_at_once() {
    let lib = build("compat_runtime");
    let o = LoadOptions {
        max_queue: 1,
        ..opts()
    };
    let rt = host()
        .load(lib.to_str().unwrap(), Some("stuck"), &o)
        .unwrap();
    // the poller takes one task and keeps it (4 s); fill the queue behind it. The calls' 500 ms
    // timeouts must fire before that answer even under valgrind, where the timer's thread can
    // wait a second or more for its turn (CI saw the first call answered at 1 s instead)
    let first = tokio::spawn({
        let rt = rt.clone();
        async move { rt.call(Some(b"1"), Some(Duration::from_millis(500))).await }
    });
    wait_until(|| rt.outstanding() == 1).await;
    let second = tokio::spawn({
        let rt = rt.clone();
        async move { rt.call(Some(b"2"), Some(Duration::from_millis(500))).await }
    });
    wait_until(|| rt.queued() == 1).await;
    assert_eq!(
        rt.call(Some(b"3"), None).await.unwrap_err(),
        CallError::QueueFull
    );
    // refused without waiting for a slot: the queue is still full
    assert_eq!(rt.queued(), 1, "no waiting on a full queue");
    assert!(matches!(first.await.unwrap(), Err(CallError::Timeout(_))));
    assert!(matches!(second.await.unwrap(), Err(CallError::Timeout(_))));
    assert_eq!(rt.inflight(), 0, "timed-out calls release their slots");
    // the stuck poller wakes, answers the first task late (discarded) and skips the cancelled
    // second one without the runtime ever seeing it
    // (awaited, not slept on: under valgrind the runtime's thread takes much longer)
    wait_until(|| (rt.outstanding(), rt.queued()) == (0, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_inflight() {
    let lib = build("compat_runtime");
    let o = LoadOptions {
        max_inflight: 2,
        ..opts()
    };
    let rt = host()
        .load(lib.to_str().unwrap(), Some("slow:300"), &o)
        .unwrap();
    let a = tokio::spawn({
        let rt = rt.clone();
        async move { rt.call(Some(b"a"), None).await }
    });
    let b = tokio::spawn({
        let rt = rt.clone();
        async move { rt.call(Some(b"b"), None).await }
    });
    wait_until(|| rt.inflight() == 2).await;
    assert_eq!(
        rt.call(Some(b"c"), None).await.unwrap_err(),
        CallError::Busy
    );
    assert_eq!(a.await.unwrap().unwrap().1.as_deref(), Some(&b"a"[..]));
    assert_eq!(b.await.unwrap().unwrap().1.as_deref(), Some(&b"b"[..]));
    assert_eq!(
        rt.call(Some(b"d"), None).await.unwrap().1.as_deref(),
        Some(&b"d"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_late_answer_is_freed() {
    let lib = build("compat_runtime");
    // the answer comes 4 s late: under valgrind, with the 10,000-call test running beside this
    // one, the 50 ms timer was seen to be observed 1.5 s late (valgrind runs one thread at a
    // time); the cfg differs from the other tests' so no other test shares this runtime
    let rt = host()
        .load(lib.to_str().unwrap(), Some("slow:4000"), &opts())
        .unwrap();
    let err = rt
        .call(Some(b"late"), Some(Duration::from_millis(50)))
        .await
        .unwrap_err();
    assert_eq!(err, CallError::Timeout(Duration::from_millis(50)));
    // the call did not wait for the runtime's answer: the task is still queued or held by the
    // runtime (no wall-clock bound: this test also runs under valgrind, where the runtime may
    // not even have polled it yet)
    assert_eq!(
        rt.outstanding() + rt.queued(),
        1,
        "the runtime still holds the task"
    );
    // the late answer arrives and is discarded (or the cancelled task is skipped)
    wait_until(|| rt.outstanding() == 0 && rt.queued() == 0).await;
    assert_eq!(rt.inflight(), 0);
}

/// On a current-thread runtime (a gateway worker) timeouts are watched by the worker's
/// sweeper instead of a tokio timer per call: a call still times out, within a tick of its
/// deadline, and a started call dropped before its answer is cancelled.
#[tokio::test]
async fn timeouts_on_a_worker_thread_are_swept() {
    let lib = build("compat_runtime");
    let rt = host()
        .load(lib.to_str().unwrap(), Some("slow:5000"), &opts())
        .unwrap();
    let t0 = Instant::now();
    let err = rt
        .call(Some(b"late"), Some(Duration::from_millis(50)))
        .await
        .unwrap_err();
    let waited = t0.elapsed();
    assert_eq!(err, CallError::Timeout(Duration::from_millis(50)));
    assert!(waited >= Duration::from_millis(50), "{waited:?}");
    // the tick is 10 ms; the slack covers valgrind runs (one thread at a time, beside the
    // 10,000-call test)
    assert!(waited < Duration::from_millis(3000), "{waited:?}");

    let mut call = rt
        .start_call(Some(b"dropped"), Some(Duration::from_secs(30)))
        .unwrap();
    assert!(
        std::future::poll_fn(|cx| std::task::Poll::Ready(call.poll(cx).is_pending())).await,
        "no answer yet"
    );
    drop(call);
    wait_until(|| rt.outstanding() == 0 && rt.queued() == 0).await;
    assert_eq!(rt.inflight(), 0);

    let fast = host()
        .load(lib.to_str().unwrap(), Some("echo"), &opts())
        .unwrap();
    let (rc, body) = fast
        .call(Some(b"hi"), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!((rc, body.as_deref()), (0, Some(&b"hi"[..])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unload_drains_queued_tasks_then_refuses_calls() {
    let lib = build("compat_runtime");
    let lib = lib.to_str().unwrap();
    let rt = host().load(lib, Some("slow:3000"), &opts()).unwrap();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.call(Some(format!("q{i}").as_bytes()), None).await })
        })
        .collect();
    // every call posted before the unload (a fixed sleep was not enough under valgrind; the
    // answers take 3 s so none finishes before the last is posted)
    wait_until(|| rt.inflight() == 20).await;
    rt.unload();
    assert_eq!(
        rt.call(Some(b"after"), None).await.unwrap_err(),
        CallError::Finished
    );
    for (i, c) in calls.into_iter().enumerate() {
        let (rc, body) = c.await.unwrap().unwrap();
        assert_eq!(
            (rc, body.unwrap()),
            (0, bytes::Bytes::from(format!("q{i}")))
        );
    }
    // a new load runs libffi_init again and gives a fresh runtime
    let again = host().load(lib, Some("slow:3000"), &opts()).unwrap();
    assert!(!Arc::ptr_eq(&rt, &again));
    assert!(again.call(Some(b"x"), None).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_calls_no_loss_no_duplicates() {
    let lib = build("compat_runtime");
    let rt = host()
        .load(lib.to_str().unwrap(), Some("echo"), &opts())
        .unwrap();
    let calls: Vec<_> = (0..10_000u32)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                let req = format!("req-{i}");
                let (rc, body) = rt
                    .call(Some(req.as_bytes()), Some(Duration::from_secs(20)))
                    .await
                    .unwrap();
                assert_eq!(rc, 0);
                assert_eq!(
                    body.unwrap(),
                    req.as_bytes(),
                    "answer matched to its own call"
                );
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    assert_eq!((rt.outstanding(), rt.queued(), rt.inflight()), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensions_batch_poll_two_pollers_and_cancellation() {
    let lib = build("ext_runtime");
    let path = lib.to_str().unwrap();
    let rt = host().load(path, Some("batch"), &opts()).unwrap();
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                rt.call(Some(format!("m{i}").as_bytes()), None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let (rc, body) = c.await.unwrap();
        let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
        let (n, rest) = text.split_once(':').unwrap();
        assert_eq!(rc, 0);
        assert!((1..=16).contains(&n.parse::<i32>().unwrap()));
        assert_eq!(rest, format!("m{i}"));
    }
    // both pollers see the end
    rt.unload();
    // SAFETY: the library is already loaded; this only looks up test counters
    let lib = unsafe { libloading::Library::new(&lib) }.unwrap();
    // SAFETY: the counters' signature
    let done: libloading::Symbol<unsafe extern "C" fn() -> i32> =
        unsafe { lib.get(b"ext_pollers_done\0") }.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: plain C function without arguments
    while unsafe { done() } < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SAFETY: as above
    assert_eq!(unsafe { done() }, 2);

    // cancellation is visible to the runtime
    let rt = host().load(path, Some("cancel"), &opts()).unwrap();
    let err = rt
        .call(Some(b"wait"), Some(Duration::from_millis(100)))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Timeout(_)));
    // SAFETY: as above
    let seen: libloading::Symbol<unsafe extern "C" fn() -> i32> =
        unsafe { lib.get(b"ext_cancelled_seen\0") }.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: as above
    while unsafe { seen() } < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SAFETY: as above
    assert_eq!(unsafe { seen() }, 1);
    assert_eq!(rt.outstanding(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_waiting_on_the_queue_descriptor() {
    // ABI 1.1: epoll on polygate_ffi_task_queue_fd + polygate_ffi_task_try_poll_n
    let lib = build("fd_runtime");
    let rt = host().load(lib.to_str().unwrap(), None, &opts()).unwrap();
    // sequential calls: each finds the runtime parked on the descriptor
    for i in 0..200u32 {
        let req = format!("seq-{i}");
        let (rc, body) = rt
            .call(Some(req.as_bytes()), Some(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!((rc, body.as_deref()), (0, Some(req.as_bytes())));
    }
    // concurrent calls: batches taken without blocking
    let calls: Vec<_> = (0..2_000u32)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move {
                let req = format!("c-{i}");
                let (rc, body) = rt
                    .call(Some(req.as_bytes()), Some(Duration::from_secs(20)))
                    .await
                    .unwrap();
                assert_eq!((rc, body.as_deref()), (0, Some(req.as_bytes())));
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    // unload: the parked runtime is woken and sees -1
    rt.unload();
    assert_eq!(
        rt.call(Some(b"x"), None).await.err(),
        Some(CallError::Finished)
    );
    assert_eq!((rt.outstanding(), rt.queued()), (0, 0));
}

/// Whether the test runs under valgrind (scripts/valgrind-ffi.sh says so): every thread then
/// shares one CPU in turns, so an inline call can take over a millisecond of wall time.
fn under_valgrind() -> bool {
    std::env::var_os("POLYGATE_UNDER_VALGRIND").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_calls_run_on_the_callers_thread_and_slow_ones_move_to_the_queue() {
    let lib = build("inline_runtime");
    let path = lib.to_str().unwrap();
    // SAFETY: the library is loaded by the host below; this only reads a test counter
    let clib = unsafe { libloading::Library::new(&lib) }.unwrap();
    // SAFETY: the counter's signature
    let last_tid: libloading::Symbol<unsafe extern "C" fn() -> libc::c_long> =
        unsafe { clib.get(b"inline_last_tid\0") }.unwrap();

    // answered inside the post, on this thread: ready at the first poll, no poller involved
    let rt = host().load(path, Some("inline"), &opts()).unwrap();
    let mut call = rt.start_call(Some(b"seq"), None).unwrap();
    // SAFETY: gettid has no arguments
    let me = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: reads an atomic
    assert_eq!(
        unsafe { last_tid() },
        me,
        "the inline entry ran on the caller's thread"
    );
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(call.poll(cx))).await;
    let (rc, body) = match first {
        std::task::Poll::Ready(a) => a.unwrap(),
        std::task::Poll::Pending => panic!("an inline answer is ready at the first poll"),
    };
    assert_eq!((rc, body.as_deref()), (0, Some(&b"inline:seq"[..])));
    drop(call);
    // concurrent calls from both threads of the runtime, none lost or mixed up
    let calls: Vec<_> = (0..400)
        .map(|i| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.call(Some(format!("c{i}").as_bytes()), None).await })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let (rc, body) = c.await.unwrap().unwrap();
        let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
        assert_eq!(rc, 0);
        let (how, req) = text.split_once(':').unwrap();
        assert_eq!(req, format!("c{i}"));
        // under valgrind a descheduled call may look slow and move the rest to the queue
        assert!(
            how == "inline" || (under_valgrind() && how == "poll"),
            "{text}"
        );
    }
    assert_eq!((rt.outstanding(), rt.queued(), rt.inflight()), (0, 0, 0));

    // an entry that answers later, from a thread of its own
    let rt = host().load(path, Some("later"), &opts()).unwrap();
    let (rc, body) = rt
        .call(Some(b"x"), Some(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!((rc, body.as_deref()), (0, Some(&b"later:x"[..])));

    // slow inline calls (2 ms): the fourth within a second turns them off, and the poll thread
    // answers from then on
    // (natively calls 0-3 are inline and the rest polled; a machine slow enough to spread four calls
    // over more than a second starts a new window, so the switch may come a little later)
    let rt = host().load(path, Some("slow"), &opts()).unwrap();
    let mut answers = Vec::new();
    for i in 0..16 {
        let (_, body) = rt
            .call(Some(format!("s{i}").as_bytes()), None)
            .await
            .unwrap();
        let text = String::from_utf8(body.unwrap().to_vec()).unwrap();
        let (how, req) = text.split_once(':').unwrap();
        assert_eq!(req, format!("s{i}"));
        answers.push(how.to_owned());
    }
    let first_poll = answers
        .iter()
        .position(|h| h == "poll")
        .expect("inline calls turned off");
    assert!(first_poll >= 4, "{answers:?}");
    if !under_valgrind() {
        assert_eq!(first_poll, 4, "{answers:?}");
    }
    assert!(
        answers[..first_poll].iter().all(|h| h == "inline"),
        "{answers:?}"
    );
    assert!(
        answers[first_poll..].iter().all(|h| h == "poll"),
        "{answers:?}"
    );
    // an unloaded runtime's inline entry is not called any more
    rt.unload();
    assert_eq!(
        rt.call(Some(b"late"), None).await.unwrap_err(),
        CallError::Finished
    );
}
