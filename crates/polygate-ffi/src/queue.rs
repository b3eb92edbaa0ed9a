//! Task queues and tasks: the safe half of the host.
//!
//! A [`TaskQueue`] is a FIFO guarded by a mutex and a condition variable, polled by one or more
//! runtime threads. A [`Task`] carries one request and a slot for its answer. The runtime thread
//! that responds stores the answer and hands the task to the done queue of the worker thread
//! that is waiting for it ([`crate::done`]); one wake-up of that worker drains every answer
//! that arrived meanwhile (nginx's done queue + eventfd design), and the worker wakes each
//! request locally. Outside a gateway worker the waiting future is woken directly.
//!
//! Ownership across the C boundary: the queue and each task are `Arc`s. The runtime holds one
//! strong reference to a task from the poll that hands it out until its `respond`; the queue
//! handle given to `libffi_init` is a strong reference kept until the runtime is unloaded and
//! the library closed (so a late poller never touches freed memory).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use crate::done::DoneQueue;

/// A runtime's answer: return code and optional response bytes.
pub type Answer = (i32, Option<Bytes>);

/// Task states.
const QUEUED: u8 = 0;
const POLLED: u8 = 1;
const ANSWERED: u8 = 2;

/// One request to a runtime.
pub struct Task {
    /// Request bytes followed by a NUL (legacy runtimes rely on it); `None` for a nil request.
    req: Option<Vec<u8>>,
    state: AtomicU8,
    cancelled: AtomicBool,
    deadline: Option<Instant>,
    answer: Mutex<Option<Answer>>,
    waker: Mutex<Option<Waker>>,
    done: Option<Arc<DoneQueue>>,
    queue: Arc<TaskQueue>,
}

impl Task {
    /// The request bytes without the trailing NUL.
    pub fn request(&self) -> Option<&[u8]> {
        self.req.as_deref().map(|r| &r[..r.len() - 1])
    }

    /// Pointer to the NUL-terminated request bytes (null for a nil request) and its length.
    pub fn request_raw(&self) -> (*const u8, usize) {
        match &self.req {
            Some(r) => (r.as_ptr(), r.len() - 1),
            None => (std::ptr::null(), 0),
        }
    }

    /// Whether the caller went away (timeout, client disconnect): the answer will be dropped.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Milliseconds until the caller gives up (`None` = no deadline; 0 = already past).
    pub fn remaining_ms(&self) -> Option<u64> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64)
    }

    /// Delivers the answer (from any thread). Returns false when the task was already answered
    /// (a runtime bug: the second answer is dropped).
    pub fn complete(self: &Arc<Self>, answer: Answer) -> bool {
        if self.state.swap(ANSWERED, Ordering::AcqRel) == ANSWERED {
            return false;
        }
        self.queue.outstanding.fetch_sub(1, Ordering::AcqRel);
        if self.is_cancelled() {
            return true; // the caller is gone: the answer (and its buffer) is dropped here
        }
        *self.answer.lock() = Some(answer);
        match &self.done {
            Some(dq) if dq.push(self.clone()) => {}
            _ => self.wake(),
        }
        true
    }

    /// Wakes the waiting future (on the worker thread, from the done queue; or directly).
    pub(crate) fn wake(&self) {
        let w = self.waker.lock().take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Polls for the answer.
    pub fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<Answer> {
        if let Some(a) = self.answer.lock().take() {
            return Poll::Ready(a);
        }
        *self.waker.lock() = Some(cx.waker().clone());
        // the answer may have arrived between the check and the registration
        match self.answer.lock().take() {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        }
    }
}

struct State {
    tasks: VecDeque<Arc<Task>>,
    finished: bool,
}

/// A runtime's task queue.
pub struct TaskQueue {
    state: Mutex<State>,
    cond: Condvar,
    /// Largest number of queued (not yet polled) tasks; a post beyond it fails at once.
    pub max_queue: usize,
    /// Tasks handed to the runtime and not answered yet.
    outstanding: AtomicUsize,
    /// Tasks queued (mirror of the queue length, read without the lock while spinning).
    queued_hint: AtomicUsize,
    /// How long an idle poller spins before sleeping (0 on a single CPU).
    spin: std::time::Duration,
    /// The readiness descriptor, once a runtime asked for it.
    notify_fd: std::sync::OnceLock<crate::notify::EventFd>,
    /// A poller found the queue empty through [`TaskQueue::try_poll_many`] and waits on the
    /// descriptor: the next wake-up signals it.
    fd_armed: AtomicBool,
    /// The CPU a poller last went idle on, to sleep or to hand off (-1: none yet, or a poller
    /// took a task since); see [`TaskQueue::wake_poller_for_answer`].
    poller_cpu: AtomicI32,
    /// The CPU of the last post's caller (-1: none yet).
    poster_cpu: AtomicI32,
    /// A poller is in its hand-off loop (see [`TaskQueue::idle_wait`]); at most one is.
    handing_off: AtomicBool,
    /// The runtime's inline entry, once it registered one
    /// ([`polygate_ffi_task_queue_inline`](crate::abi::polygate_ffi_task_queue_inline)).
    inline: std::sync::OnceLock<Inline>,
    /// Set when inline calls took too long: tasks go through the queue from then on.
    inline_off: AtomicBool,
    /// Slow inline calls counted in the current window, and when the window started.
    inline_slow: Mutex<(u32, Option<Instant>)>,
}

/// The longest an inline call should keep a gateway worker thread: a longer one is slow.
pub const INLINE_MAX: std::time::Duration = std::time::Duration::from_millis(1);
/// Slow inline calls within [`INLINE_SLOW_WINDOW`] that turn a runtime's inline calls off.
pub const INLINE_SLOW_CALLS: u32 = 4;
/// See [`INLINE_SLOW_CALLS`].
pub const INLINE_SLOW_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// A runtime's inline entry: `call(ctx, task)` runs on the posting thread (a gateway worker)
/// with each task instead of queueing it for a poller.
#[derive(Clone, Copy, Debug)]
pub struct Inline {
    /// The runtime's function.
    pub call: unsafe extern "C" fn(*mut std::ffi::c_void, *mut std::ffi::c_void),
    /// Its first argument, as the runtime gave it.
    pub ctx: usize,
}

/// How many times an idle poller gives its CPU to a caller on the same CPU before it sleeps.
const HANDOFF_YIELDS: u32 = 32;
/// How long (wall time, the caller's turns included) an idle poller keeps handing off.
const HANDOFF_TIME: std::time::Duration = std::time::Duration::from_micros(50);

/// The CPU the calling thread runs on (-1 when unknown).
#[allow(unsafe_code, reason = "sched_getcpu")]
fn current_cpu() -> i32 {
    // SAFETY: sched_getcpu takes no arguments and has no preconditions (glibc reads the
    // thread's rseq area or asks the kernel)
    unsafe { libc::sched_getcpu() }
}

/// Spin budget of idle pollers, `POLYGATE_FFI_SPIN_US` microseconds (default 0: off). A short
/// spin lets a poller catch the next task of a sequential caller without a futex wake-up on
/// either side, but under load on few cores the spinning takes CPU from the gateway itself
/// (measured: 0.69× → 0.60× of plain requests/s on 2 cores), and on one CPU it only delays the
/// caller. It is never used when the process may run on a single CPU.
fn default_spin() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("POLYGATE_FFI_SPIN_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match std::thread::available_parallelism() {
            Ok(n) if n.get() > 1 => std::time::Duration::from_micros(us),
            _ => std::time::Duration::ZERO,
        }
    })
}

/// A copy of `r` with room for the NUL the queue appends.
pub(crate) fn with_nul_room(r: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(r.len() + 1);
    v.extend_from_slice(r);
    v
}

/// Why a post failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// `max_queue` tasks are already waiting.
    #[error("post failed, queue full")]
    QueueFull,
    /// The runtime was unloaded.
    #[error("task queue is finished")]
    Finished,
}

impl TaskQueue {
    /// A new queue.
    pub fn new(max_queue: usize) -> Arc<TaskQueue> {
        Arc::new(TaskQueue {
            state: Mutex::new(State {
                tasks: VecDeque::new(),
                finished: false,
            }),
            cond: Condvar::new(),
            max_queue: max_queue.max(1),
            outstanding: AtomicUsize::new(0),
            queued_hint: AtomicUsize::new(0),
            spin: default_spin(),
            notify_fd: std::sync::OnceLock::new(),
            fd_armed: AtomicBool::new(false),
            poller_cpu: AtomicI32::new(-1),
            poster_cpu: AtomicI32::new(-1),
            handing_off: AtomicBool::new(false),
            inline: std::sync::OnceLock::new(),
            inline_off: AtomicBool::new(false),
            inline_slow: Mutex::new((0, None)),
        })
    }

    /// Queues a request and wakes a poller; [`Task::poll_answer`] resolves when the runtime
    /// responds. `done` is the waiting worker's done queue, if any. Never blocks.
    pub fn post(
        self: &Arc<Self>,
        req: Option<&[u8]>,
        deadline: Option<Instant>,
        done: Option<Arc<DoneQueue>>,
    ) -> Result<Arc<Task>, PostError> {
        let t = self.post_quiet(req, deadline, done)?;
        self.wake_poller();
        Ok(t)
    }

    /// Wakes one waiting poller (nothing to do when none waits), and signals the readiness
    /// descriptor when a poller waits on it.
    pub fn wake_poller(&self) {
        self.cond.notify_one();
        if self.fd_armed.load(Ordering::Acquire)
            && self.fd_armed.swap(false, Ordering::AcqRel)
            && let Some(fd) = self.notify_fd.get()
        {
            fd.signal();
        }
    }

    /// Wakes a poller for a caller that looks for its answer right after. When the poller went
    /// idle on the caller's CPU (every thread on one CPU, as in a pinned process, or the kernel
    /// put them together), the caller gives that CPU up once, so the poller takes the task and
    /// answers before the caller looks. Without it the kernel often lets the caller run on,
    /// and the answer then comes through the caller's event loop: a yield of the request, a
    /// sleep in `epoll_wait` and an eventfd write from the runtime's thread to wake it. A
    /// poller in its hand-off loop (see `idle_wait`) needs no futex wake-up at all.
    ///
    /// A poller busy with an earlier task does not count: yielding to it would only make the
    /// caller wait behind that task.
    pub fn wake_poller_for_answer(&self) {
        self.wake_poller();
        let cpu = self.poller_cpu.load(Ordering::Relaxed);
        if cpu >= 0 && cpu == current_cpu() {
            std::thread::yield_now();
        }
    }

    /// For a poller that just found the queue empty with [`TaskQueue::try_poll_many`]: true
    /// when it runs on the CPU of the queue's last post, and should give that CPU to the
    /// caller (`sched_yield`) and look again rather than wait on the descriptor; the caller,
    /// seeing its poller idle on its CPU, yields back after its next post
    /// ([`TaskQueue::wake_poller_for_answer`]). The blocking polls do this themselves (see
    /// `idle_wait`). When true the descriptor is disarmed: posts made while the poller yields
    /// do not signal it (no write), and the poller's next [`TaskQueue::try_poll_many`] takes
    /// them or arms it again.
    pub fn hand_off(&self) -> bool {
        let cpu = current_cpu();
        if cpu < 0 || cpu != self.poster_cpu.load(Ordering::Relaxed) {
            return false;
        }
        self.poller_cpu.store(cpu, Ordering::Relaxed);
        self.fd_armed.store(false, Ordering::Release);
        true
    }

    /// The queue's readiness descriptor (created on first use): readable once tasks are queued
    /// after [`TaskQueue::try_poll_many`] found none, and once the queue is finished.
    pub fn event_fd(&self) -> std::io::Result<std::os::fd::RawFd> {
        if let Some(fd) = self.notify_fd.get() {
            return Ok(fd.raw());
        }
        let fd = crate::notify::EventFd::new()?;
        let _ = self.notify_fd.set(fd);
        Ok(self.notify_fd.get().map_or(-1, crate::notify::EventFd::raw))
    }

    /// Takes up to `max` queued tasks without blocking. `Ok(empty)` when none is queued: the
    /// readiness descriptor is then signalled by the next post (or by [`TaskQueue::finish`]);
    /// `Err(())` once the queue is finished and drained.
    #[allow(clippy::result_unit_err, reason = "one reason only: finished")]
    pub fn try_poll_many(&self, max: usize) -> Result<Vec<Arc<Task>>, ()> {
        let mut out = Vec::new();
        let mut st = self.state.lock();
        if let Some(fd) = self.notify_fd.get() {
            // consumed: the caller looks at the queue now
            fd.drain();
        }
        self.take_ready(&mut st, max, &mut out);
        if out.is_empty() {
            if st.finished {
                self.cond.notify_all();
                return Err(());
            }
            // armed under the queue's lock: a post after this sees it when it wakes pollers
            // (the poller's CPU is not recorded here: a runtime with an event loop may go on
            // with other work, and a caller yielding to it would wait behind that; pollers
            // that do wait say so through `hand_off`)
            self.fd_armed.store(true, Ordering::Release);
        }
        Ok(out)
    }

    /// Queues a request without waking a poller: the caller wakes one later
    /// ([`TaskQueue::wake_poller`]), so several posts can share one wake-up.
    pub fn post_quiet(
        self: &Arc<Self>,
        req: Option<&[u8]>,
        deadline: Option<Instant>,
        done: Option<Arc<DoneQueue>>,
    ) -> Result<Arc<Task>, PostError> {
        self.post_quiet_vec(req.map(with_nul_room), deadline, done)
    }

    /// [`TaskQueue::post_quiet`] taking the request's bytes as they are (the NUL is appended in
    /// place when the vector has room for it).
    pub fn post_quiet_vec(
        self: &Arc<Self>,
        req: Option<Vec<u8>>,
        deadline: Option<Instant>,
        done: Option<Arc<DoneQueue>>,
    ) -> Result<Arc<Task>, PostError> {
        let task = self.new_task(req, deadline, done, QUEUED);
        {
            let mut st = self.state.lock();
            if st.finished {
                return Err(PostError::Finished);
            }
            if st.tasks.len() >= self.max_queue {
                return Err(PostError::QueueFull);
            }
            st.tasks.push_back(task.clone());
            self.queued_hint.store(st.tasks.len(), Ordering::Release);
        }
        self.poster_cpu.store(current_cpu(), Ordering::Relaxed);
        Ok(task)
    }

    /// Registers the runtime's inline entry; false when one was registered before.
    pub fn set_inline(&self, entry: Inline) -> bool {
        self.inline.set(entry).is_ok()
    }

    /// The inline entry, unless none was registered or inline calls were turned off.
    pub fn inline_entry(&self) -> Option<Inline> {
        if self.inline_off.load(Ordering::Relaxed) {
            return None;
        }
        self.inline.get().copied()
    }

    /// Notes an inline call that took `took`; true when it turns inline calls off for good
    /// (tasks queue for the pollers from then on): the [`INLINE_SLOW_CALLS`]th call over
    /// [`INLINE_MAX`] within [`INLINE_SLOW_WINDOW`]. One slow call is not enough: the first
    /// call on a thread may set the runtime up there (Go binds the thread), and a preempted
    /// worker thread makes any call look slow.
    pub fn inline_slow_call(&self, took: std::time::Duration) -> bool {
        if took <= INLINE_MAX {
            return false;
        }
        let now = Instant::now();
        let mut w = self.inline_slow.lock();
        match w.1 {
            Some(start) if now.duration_since(start) <= INLINE_SLOW_WINDOW => w.0 += 1,
            _ => *w = (1, Some(now)),
        }
        w.0 >= INLINE_SLOW_CALLS && !self.inline_off.swap(true, Ordering::AcqRel)
    }

    /// A task for an inline call: handed to the runtime at once (counted as polled), never
    /// queued. Fails once the queue is finished.
    pub fn start_inline(
        self: &Arc<Self>,
        req: Option<Vec<u8>>,
        deadline: Option<Instant>,
    ) -> Result<Arc<Task>, PostError> {
        if self.state.lock().finished {
            return Err(PostError::Finished);
        }
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Ok(self.new_task(req, deadline, None, POLLED))
    }

    /// A task of this queue in `state`, its request NUL-terminated in place.
    fn new_task(
        self: &Arc<Self>,
        req: Option<Vec<u8>>,
        deadline: Option<Instant>,
        done: Option<Arc<DoneQueue>>,
        state: u8,
    ) -> Arc<Task> {
        let req = req.map(|mut v| {
            v.push(0);
            v
        });
        Arc::new(Task {
            req,
            state: AtomicU8::new(state),
            cancelled: AtomicBool::new(false),
            deadline,
            answer: Mutex::new(None),
            waker: Mutex::new(None),
            done,
            queue: self.clone(),
        })
    }

    /// Marks the queue finished: tasks already queued are still handed out, then every poller
    /// gets `None`. Later posts fail with [`PostError::Finished`].
    pub fn finish(&self) {
        self.state.lock().finished = true;
        self.cond.notify_all();
        if let Some(fd) = self.notify_fd.get() {
            self.fd_armed.store(false, Ordering::Release);
            fd.signal();
        }
    }

    /// Whether [`TaskQueue::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.state.lock().finished
    }

    /// Tasks queued and not yet polled, read without the queue's lock (may be a moment stale):
    /// for pollers that spin before they park.
    pub fn queued_hint(&self) -> usize {
        self.queued_hint.load(Ordering::Acquire)
    }

    /// Tasks queued and not yet polled.
    pub fn queued(&self) -> usize {
        self.state.lock().tasks.len()
    }

    /// Tasks polled and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Spins briefly until a task may be queued (multi-CPU only).
    fn spin_for_work(&self) {
        if self.spin.is_zero() {
            return;
        }
        let until = Instant::now() + self.spin;
        while self.queued_hint.load(Ordering::Acquire) == 0 && Instant::now() < until {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    /// Hands out the next queued task whose caller is still waiting (cancelled ones are dropped
    /// here: the runtime never sees them).
    fn next_ready(&self, st: &mut State) -> Option<Arc<Task>> {
        while let Some(t) = st.tasks.pop_front() {
            self.queued_hint.store(st.tasks.len(), Ordering::Release);
            if t.is_cancelled() {
                continue;
            }
            t.state.store(POLLED, Ordering::Release);
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            // busy with a task now: a caller yielding its CPU would only wait behind it
            self.poller_cpu.store(-1, Ordering::Relaxed);
            return Some(t);
        }
        None
    }

    /// Moves up to `max` (at least one) ready tasks into `out`.
    fn take_ready(&self, st: &mut State, max: usize, out: &mut Vec<Arc<Task>>) {
        while out.len() < max.max(1) {
            let Some(t) = self.next_ready(st) else {
                break;
            };
            out.push(t);
        }
    }

    /// Waits, with the queue's lock held and the queue found empty, until a post or
    /// [`TaskQueue::finish`] may have changed it; the caller looks again.
    ///
    /// A poller on the CPU of the last post's caller first hands that CPU off: it yields
    /// (`sched_yield`) so the caller runs, and the caller yields back after its next post (see
    /// [`TaskQueue::wake_poller_for_answer`]). Two threads taking turns on one CPU cost a
    /// yield each per call, instead of a futex wake-up and a futex wait (measured on this
    /// project's 2-CPU VM with two C threads pinned to one CPU: 3.0 µs per round trip against
    /// 4.1 µs). The loop ends after [`HANDOFF_YIELDS`] yields or [`HANDOFF_TIME`], whichever
    /// comes first, so an idle CPU (yields that return at once) is not kept busy for long;
    /// then the poller sleeps on the condition variable.
    fn idle_wait(&self, st: &mut parking_lot::MutexGuard<'_, State>) {
        let cpu = current_cpu();
        self.poller_cpu.store(cpu, Ordering::Relaxed);
        if cpu >= 0
            && cpu == self.poster_cpu.load(Ordering::Relaxed)
            && !self.handing_off.swap(true, Ordering::AcqRel)
        {
            let start = Instant::now();
            let mut found = false;
            for _ in 0..HANDOFF_YIELDS {
                parking_lot::MutexGuard::unlocked(st, std::thread::yield_now);
                if !st.tasks.is_empty() || st.finished {
                    found = true;
                    break;
                }
                if start.elapsed() > HANDOFF_TIME {
                    break;
                }
            }
            self.handing_off.store(false, Ordering::Release);
            if found {
                return;
            }
        }
        self.cond.wait(st);
    }

    /// Blocks until a task is available (skipping cancelled ones) or the queue is finished and
    /// drained (`None`).
    pub fn poll(&self) -> Option<Arc<Task>> {
        self.spin_for_work();
        let mut st = self.state.lock();
        loop {
            if let Some(t) = self.next_ready(&mut st) {
                return Some(t);
            }
            if st.finished {
                // wake the other pollers so they see the end too
                self.cond.notify_all();
                return None;
            }
            self.idle_wait(&mut st);
        }
    }

    /// Blocks until at least one task is available (skipping cancelled ones) and takes up to
    /// `max`; empty once the queue is finished and drained.
    pub fn poll_many(&self, max: usize) -> Vec<Arc<Task>> {
        let mut out = Vec::new();
        self.spin_for_work();
        let mut st = self.state.lock();
        loop {
            self.take_ready(&mut st, max, &mut out);
            if !out.is_empty() {
                return out;
            }
            if st.finished {
                // wake the other pollers so they see the end too
                self.cond.notify_all();
                return out;
            }
            self.idle_wait(&mut st);
        }
    }
}

/// Marks its task cancelled when dropped before the answer arrived (the request future was
/// dropped or timed out).
pub struct CancelOnDrop {
    task: Arc<Task>,
    armed: bool,
}

impl CancelOnDrop {
    /// Guards `task`.
    pub fn new(task: Arc<Task>) -> Self {
        CancelOnDrop { task, armed: true }
    }

    /// The guarded task.
    pub fn task(&self) -> &Arc<Task> {
        &self.task
    }

    /// The answer arrived: nothing to cancel.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.task.cancelled.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_finish_and_cancel() {
        let q = TaskQueue::new(2);
        let a = q.post(Some(b"a"), None, None).unwrap();
        let b = q.post(Some(b"b"), None, None).unwrap();
        assert_eq!(
            q.post(Some(b"c"), None, None).err(),
            Some(PostError::QueueFull)
        );
        CancelOnDrop::new(a.clone()); // dropped at once: cancels `a`
        q.finish();
        assert_eq!(q.post(None, None, None).err(), Some(PostError::Finished));
        let t = q.poll().unwrap();
        assert_eq!(t.request(), Some(&b"b"[..]));
        assert!(Arc::ptr_eq(&t, &b));
        assert_eq!(q.outstanding(), 1);
        assert!(t.complete((0, None)));
        assert!(!t.complete((0, None)), "a second answer is refused");
        assert_eq!(q.outstanding(), 0);
        assert!(q.poll().is_none());
        assert!(q.poll().is_none(), "every poller sees the end");
    }

    /// Pins the calling thread to `cpu`.
    #[allow(unsafe_code, reason = "sched_setaffinity")]
    fn pin(cpu: i32) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it, and
        // sched_setaffinity reads size_of::<cpu_set_t>() bytes of it for this thread (0)
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
    }

    /// The calling thread's id.
    #[allow(unsafe_code, reason = "gettid")]
    fn gettid() -> i32 {
        // SAFETY: gettid takes no arguments and cannot fail
        unsafe { libc::gettid() }
    }

    /// The scheduler state letter of thread `tid` of this process (`R` running or runnable,
    /// `S` sleeping).
    fn thread_state(tid: i32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.chars().next().unwrap()
    }

    #[test]
    fn same_cpu_hand_off_answers_every_call_then_the_poller_sleeps() {
        let cpu = current_cpu().max(0);
        pin(cpu);
        let q = TaskQueue::new(8);
        let (tx, rx) = std::sync::mpsc::channel();
        let pq = q.clone();
        let poller = std::thread::spawn(move || {
            pin(cpu);
            tx.send(gettid()).unwrap();
            while let Some(t) = pq.poll() {
                let echo = t.request().map(Bytes::copy_from_slice);
                t.complete((0, echo));
            }
        });
        let tid = rx.recv().unwrap();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for i in 0..2000u32 {
            let req = i.to_string();
            let t = q.post_quiet(Some(req.as_bytes()), None, None).unwrap();
            q.wake_poller_for_answer();
            let answer = loop {
                if let Poll::Ready(a) = t.poll_answer(&mut cx) {
                    break a;
                }
                std::thread::yield_now();
            };
            assert_eq!(answer, (0, Some(Bytes::from(req))), "call {i}");
        }
        // idle: the hand-off loop ends and the poller sleeps on the condition variable
        let until = Instant::now() + std::time::Duration::from_secs(5);
        while thread_state(tid) != 'S' {
            assert!(
                Instant::now() < until,
                "the idle poller never went to sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            assert_eq!(thread_state(tid), 'S', "an idle poller keeps running");
        }
        q.finish();
        poller.join().unwrap();
    }

    #[test]
    fn hand_off_only_on_the_posters_cpu_and_it_disarms_the_descriptor() {
        let cpu = current_cpu().max(0);
        pin(cpu);
        let q = TaskQueue::new(4);
        q.event_fd().unwrap();
        assert!(!q.hand_off(), "no post yet: no caller to hand off to");
        let t = q.post_quiet(Some(b"x"), None, None).unwrap();
        assert_eq!(q.try_poll_many(4).unwrap().len(), 1);
        assert!(q.try_poll_many(4).unwrap().is_empty());
        assert!(
            q.fd_armed.load(Ordering::Acquire),
            "an empty poll arms the descriptor"
        );
        assert!(q.hand_off(), "the poller runs on the caller's CPU");
        assert!(
            !q.fd_armed.load(Ordering::Acquire),
            "posts during the hand-off need no write"
        );
        assert_eq!(q.poller_cpu.load(Ordering::Relaxed), cpu);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus > 1 {
            let other = (cpu + 1) % cpus as i32;
            let q2 = q.clone();
            let handed = std::thread::spawn(move || {
                pin(other);
                q2.hand_off()
            })
            .join()
            .unwrap();
            assert!(!handed, "a poller on another CPU waits as usual");
        }
        assert!(t.complete((0, None)));
    }

    #[test]
    fn request_is_nul_terminated() {
        let q = TaskQueue::new(4);
        let t = q.post(Some(b"xy"), None, None).unwrap();
        let (_, n) = t.request_raw();
        assert_eq!(n, 2);
        assert_eq!(t.req.as_deref(), Some(&b"xy\0"[..]));
    }
}
