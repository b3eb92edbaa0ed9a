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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
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
        let req = req.map(|mut v| {
            v.push(0);
            v
        });
        let task = Arc::new(Task {
            req,
            state: AtomicU8::new(QUEUED),
            cancelled: AtomicBool::new(false),
            deadline,
            answer: Mutex::new(None),
            waker: Mutex::new(None),
            done,
            queue: self.clone(),
        });
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
        Ok(task)
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
            self.cond.wait(&mut st);
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
            self.cond.wait(&mut st);
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

    #[test]
    fn request_is_nul_terminated() {
        let q = TaskQueue::new(4);
        let t = q.post(Some(b"xy"), None, None).unwrap();
        let (_, n) = t.request_raw();
        assert_eq!(n, 2);
        assert_eq!(t.req.as_deref(), Some(&b"xy\0"[..]));
    }
}
