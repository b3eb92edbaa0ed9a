//! Per-worker batching of cross-thread wake-ups, in both directions.
//!
//! - **Answers**: runtime threads put answered tasks in the done queue of the worker waiting
//!   for them; one wake-up of the worker's drainer task hands them all to their requests. Many
//!   answers arriving close together cost one cross-thread wake-up (one eventfd write).
//! - **Posts**: requests posted during one turn of the worker's event loop wake the runtime's
//!   poller once, from a flusher task that runs after the other ready tasks, so the poller
//!   finds a batch instead of being woken (a futex wake-up) for every task.

use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};

use parking_lot::Mutex;

use crate::queue::Task;

/// A worker thread's done queue (and its pending poller wake-ups).
pub struct DoneQueue {
    /// Queues that got tasks this turn and still need a poller wake-up.
    to_wake: Mutex<Vec<Arc<crate::queue::TaskQueue>>>,
    flush_pending: AtomicBool,
    flusher: Mutex<Option<Waker>>,
    tasks: Mutex<Vec<Arc<Task>>>,
    /// Set when the drainer was woken and has not drained yet (folds wake-ups).
    notified: AtomicBool,
    /// Set while the worker wakes pollers: an answer arriving meanwhile (on one CPU the woken
    /// poller runs at once and answers before the wake-up returns) needs no cross-thread
    /// wake-up, as the worker drains right after (see `flush`).
    waking_pollers: AtomicBool,
    drainer: Mutex<Option<Waker>>,
    /// False once the drainer task is gone (runtime shutting down): answers then wake their
    /// futures directly.
    alive: AtomicBool,
}

impl DoneQueue {
    /// Remembers that `queue` needs a poller wake-up at the end of this event-loop turn; false
    /// when the worker's tasks are gone (the caller then wakes the poller itself).
    pub fn defer_wake(&self, queue: &Arc<crate::queue::TaskQueue>) -> bool {
        if !self.alive.load(Ordering::Acquire) {
            return false;
        }
        {
            let mut v = self.to_wake.lock();
            if !v.iter().any(|q| Arc::ptr_eq(q, queue)) {
                v.push(queue.clone());
            }
        }
        if !self.flush_pending.swap(true, Ordering::AcqRel) {
            // the lock is released before waking (a wake-up may switch threads)
            let w = self.flusher.lock().clone();
            if let Some(w) = w {
                w.wake(); // same thread: a local wake-up
            }
        }
        true
    }

    /// Wakes `queue`'s poller now when no other post of this event-loop turn waits for the
    /// flusher (a sequential caller), then hands out answers that arrived meanwhile: a poller
    /// on the worker's CPU gets that CPU at once
    /// ([`TaskQueue::wake_poller_for_answer`](crate::queue::TaskQueue::wake_poller_for_answer))
    /// and may answer before the wake-up returns; the caller then finds its answer without
    /// yielding. Otherwise the wake-up is deferred as in [`DoneQueue::defer_wake`]. False when
    /// the worker's tasks are gone.
    pub fn wake_now(&self, queue: &Arc<crate::queue::TaskQueue>) -> bool {
        if !self.alive.load(Ordering::Acquire) {
            return false;
        }
        if self.flush_pending.load(Ordering::Acquire) {
            return self.defer_wake(queue);
        }
        if self.wake_pollers(|| queue.wake_poller_for_answer()) {
            self.drain();
        }
        true
    }

    /// Queues an answered task for the worker; false when the drainer is gone.
    pub fn push(&self, task: Arc<Task>) -> bool {
        if !self.alive.load(Ordering::Acquire) {
            return false;
        }
        self.tasks.lock().push(task);
        // SeqCst pairs with `wake_pollers`: either it sees `notified`, or this sees it has finished
        if !self.notified.swap(true, Ordering::SeqCst) {
            if self.waking_pollers.load(Ordering::SeqCst) {
                return true;
            }
            // never wake while holding the lock: the wake-up makes the worker runnable, and on
            // a busy CPU it may run at once and block on this very lock (measured: a spin and
            // a sched_yield per call with every thread on one CPU)
            let w = self.drainer.lock().clone();
            if let Some(w) = w {
                w.wake();
            }
        }
        true
    }

    /// Runs `wake` (poller wake-ups) with `waking_pollers` set; true when answers arrived
    /// meanwhile, which `push` then left for the caller to drain (no cross-thread wake-up).
    fn wake_pollers(&self, wake: impl FnOnce()) -> bool {
        self.waking_pollers.store(true, Ordering::SeqCst);
        wake();
        // SeqCst pairs with `push`: either it sees this store, or this sees `notified`
        self.waking_pollers.store(false, Ordering::SeqCst);
        self.notified.load(Ordering::SeqCst)
    }

    /// Wakes the futures of the answers queued so far. Local wake-ups on the worker, nothing
    /// that switches threads, so they run under the lock (which keeps the vector's capacity).
    fn drain(&self) {
        if !self.notified.swap(false, Ordering::SeqCst) {
            return;
        }
        for t in self.tasks.lock().drain(..) {
            t.wake();
        }
    }
}

struct AliveGuard(Arc<DoneQueue>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
        for t in self.0.tasks.lock().drain(..) {
            t.wake();
        }
        for q in self.0.to_wake.lock().drain(..) {
            q.wake_poller();
        }
    }
}

thread_local! {
    static LOCAL: std::cell::RefCell<Option<Arc<DoneQueue>>> = const { std::cell::RefCell::new(None) };
}

/// The done queue of the current thread, starting its drainer task on first use. `None`
/// outside a current-thread tokio runtime (the gateway's workers), where answers wake their
/// futures directly.
pub fn current() -> Option<Arc<DoneQueue>> {
    // the common case first: this worker's queue, alive for as long as its runtime's tasks
    // (the runtime handle is not looked up for every call)
    if let Some(dq) = LOCAL.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|dq| dq.alive.load(Ordering::Acquire))
            .cloned()
    }) {
        return Some(dq);
    }
    let handle = tokio::runtime::Handle::try_current().ok()?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
        return None;
    }
    LOCAL.with(|l| {
        let mut l = l.borrow_mut();
        if let Some(dq) = l.as_ref()
            && dq.alive.load(Ordering::Acquire)
        {
            return Some(dq.clone());
        }
        let dq = Arc::new(DoneQueue {
            to_wake: Mutex::new(Vec::new()),
            flush_pending: AtomicBool::new(false),
            flusher: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            notified: AtomicBool::new(false),
            waking_pollers: AtomicBool::new(false),
            drainer: Mutex::new(None),
            alive: AtomicBool::new(true),
        });
        let guard = AliveGuard(dq.clone());
        let fq = dq.clone();
        handle.spawn(async move {
            let mut queues = Vec::new();
            loop {
                poll_fn(|cx| {
                    *fq.flusher.lock() = Some(cx.waker().clone());
                    if fq.flush_pending.load(Ordering::Acquire) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                // being woken put this task behind the tasks already ready in this turn, so
                // their posts are batched into this one wake-up
                fq.flush_pending.store(false, Ordering::Release);
                std::mem::swap(&mut queues, &mut *fq.to_wake.lock());
                if fq.wake_pollers(|| queues.drain(..).for_each(|q| q.wake_poller())) {
                    fq.drain();
                }
            }
        });
        handle.spawn(async move {
            let dq = guard.0.clone();
            let _guard = guard;
            loop {
                poll_fn(|cx| {
                    *dq.drainer.lock() = Some(cx.waker().clone());
                    if dq.notified.load(Ordering::SeqCst) {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await;
                dq.drain();
            }
        });
        *l = Some(dq.clone());
        Some(dq)
    })
}
