//! Task queues and tasks: the safe half of the host.
//!
//! A [`TaskQueue`] is a FIFO guarded by a mutex and a condition variable, polled by one or more
//! runtime threads. A [`Task`] carries one request; its completion is a oneshot channel, so the
//! runtime thread that responds wakes the awaiting request task directly (no host thread, no
//! global lock on the completion path).
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
use tokio::sync::oneshot;

/// A runtime's answer: return code and optional response bytes.
pub type Answer = (i32, Option<Bytes>);

/// Task states.
const QUEUED: u8 = 0;
const POLLED: u8 = 1;
const ANSWERED: u8 = 2;

/// One request to a runtime.
pub struct Task {
    /// Request bytes followed by a NUL (legacy runtimes rely on it); `None` for a nil request.
    req: Option<Box<[u8]>>,
    state: AtomicU8,
    cancelled: AtomicBool,
    deadline: Option<Instant>,
    tx: Mutex<Option<oneshot::Sender<Answer>>>,
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

    /// Delivers the answer. Returns false when the task was already answered (a runtime bug:
    /// the second answer is dropped).
    pub fn complete(&self, answer: Answer) -> bool {
        if self.state.swap(ANSWERED, Ordering::AcqRel) == ANSWERED {
            return false;
        }
        self.queue.outstanding.fetch_sub(1, Ordering::AcqRel);
        if let Some(tx) = self.tx.lock().take() {
            // Err = the caller is gone: the answer (and its buffer) is dropped here
            let _ = tx.send(answer);
        }
        true
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
        })
    }

    /// Queues a request; the receiver resolves when the runtime responds. Never blocks.
    pub fn post(
        self: &Arc<Self>,
        req: Option<&[u8]>,
        deadline: Option<Instant>,
    ) -> Result<(Arc<Task>, oneshot::Receiver<Answer>), PostError> {
        let (tx, rx) = oneshot::channel();
        let req = req.map(|r| {
            let mut v = Vec::with_capacity(r.len() + 1);
            v.extend_from_slice(r);
            v.push(0);
            v.into_boxed_slice()
        });
        let task = Arc::new(Task {
            req,
            state: AtomicU8::new(QUEUED),
            cancelled: AtomicBool::new(false),
            deadline,
            tx: Mutex::new(Some(tx)),
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
        }
        self.cond.notify_one();
        Ok((task, rx))
    }

    /// Marks the queue finished: tasks already queued are still handed out, then every poller
    /// gets `None`. Later posts fail with [`PostError::Finished`].
    pub fn finish(&self) {
        self.state.lock().finished = true;
        self.cond.notify_all();
    }

    /// Whether [`TaskQueue::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.state.lock().finished
    }

    /// Tasks queued and not yet polled.
    pub fn queued(&self) -> usize {
        self.state.lock().tasks.len()
    }

    /// Tasks polled and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Blocks until a task is available (skipping cancelled ones) or the queue is finished and
    /// drained (`None`).
    pub fn poll(&self) -> Option<Arc<Task>> {
        let mut st = self.state.lock();
        loop {
            while let Some(t) = st.tasks.pop_front() {
                if t.is_cancelled() {
                    continue; // the caller is gone and the runtime never saw it
                }
                t.state.store(POLLED, Ordering::Release);
                self.outstanding.fetch_add(1, Ordering::AcqRel);
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

    /// Like [`TaskQueue::poll`], taking up to `max` tasks at once (at least one, or none when
    /// finished).
    pub fn poll_many(&self, max: usize) -> Vec<Arc<Task>> {
        let mut out = Vec::new();
        let mut st = self.state.lock();
        loop {
            while out.len() < max.max(1) {
                let Some(t) = st.tasks.pop_front() else { break };
                if t.is_cancelled() {
                    continue;
                }
                t.state.store(POLLED, Ordering::Release);
                self.outstanding.fetch_add(1, Ordering::AcqRel);
                out.push(t);
            }
            if !out.is_empty() {
                return out;
            }
            if st.finished {
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
        let (a, _ra) = q.post(Some(b"a"), None).unwrap();
        let (b, rb) = q.post(Some(b"b"), None).unwrap();
        assert_eq!(q.post(Some(b"c"), None).err(), Some(PostError::QueueFull));
        CancelOnDrop::new(a.clone()); // dropped at once: cancels `a`
        drop(rb);
        q.finish();
        assert_eq!(q.post(None, None).err(), Some(PostError::Finished));
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
        let (t, _r) = q.post(Some(b"xy"), None).unwrap();
        let (_, n) = t.request_raw();
        assert_eq!(n, 2);
        assert_eq!(t.req.as_deref(), Some(&b"xy\0"[..]));
    }
}
