//! Timeouts on a gateway worker without a timer per operation.
//!
//! A tokio timer per FFI call or Redis command (register, poll, cancel, and the time driver's
//! bookkeeping) cost about 1,000 instructions of the worker each, measured with callgrind, more
//! than the rest of the host's part of an FFI call. On a worker thread (a current-thread
//! runtime) operations register their deadline and waker in a thread-local table instead, and
//! one sweeper task per worker looks at them every [`TICK`] while any is registered: each one
//! past its deadline is marked expired and woken. An operation therefore times out between its
//! deadline and one tick later.

use std::cell::RefCell;
use std::future::poll_fn;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the sweeper looks at the deadlines while operations are registered.
pub const TICK: Duration = Duration::from_millis(10);

enum Entry {
    Live {
        deadline: Instant,
        waker: Waker,
        expired: bool,
    },
    Free {
        next: usize,
    },
}

struct Table {
    entries: Vec<Entry>,
    free: usize,
    live: usize,
    /// The sweeper task, once started; woken when the first operation is registered.
    sweeper: Option<Waker>,
    started: bool,
}

const NONE: usize = usize::MAX;

thread_local! {
    static TABLE: RefCell<Table> = const {
        RefCell::new(Table {
            entries: Vec::new(),
            free: NONE,
            live: 0,
            sweeper: None,
            started: false,
        })
    };
}

/// An operation's registration; dropping it (the operation finished, timed out or was
/// abandoned) frees the slot. Used from another thread than the one that registered it (which
/// a current-thread runtime's tasks never do) it reads as not expired and frees nothing.
pub struct Registration {
    idx: usize,
    thread: u64,
}

/// This thread's table, told apart from other threads' (ids are never reused).
fn thread_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.try_with(|i| *i).unwrap_or(0)
}

/// Registers a deadline on this worker thread, with the waker to wake when it passes,
/// starting the thread's sweeper on first use. `None` outside a current-thread tokio runtime
/// (the caller then uses a tokio timer).
pub fn register(deadline: Instant, waker: &Waker) -> Option<Registration> {
    // a running sweeper means this thread runs a current-thread runtime (it is reset when
    // that runtime drops it): the handle is looked up only to start one
    let handle = if TABLE.with(|t| t.borrow().started) {
        None
    } else {
        let h = tokio::runtime::Handle::try_current().ok()?;
        if h.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
            return None;
        }
        Some(h)
    };
    let (idx, wake, start) = TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let e = Entry::Live {
            deadline,
            waker: waker.clone(),
            expired: false,
        };
        let idx = if t.free != NONE {
            let i = t.free;
            t.free = match t.entries[i] {
                Entry::Free { next } => next,
                Entry::Live { .. } => NONE,
            };
            t.entries[i] = e;
            i
        } else {
            t.entries.push(e);
            t.entries.len() - 1
        };
        t.live += 1;
        let wake = if t.live == 1 { t.sweeper.take() } else { None };
        let start = !std::mem::replace(&mut t.started, true);
        (idx, wake, start)
    });
    if start && let Some(h) = handle {
        h.spawn(sweep());
    }
    if let Some(w) = wake {
        w.wake(); // a local wake-up: the sweeper runs on this thread
    }
    Some(Registration {
        idx,
        thread: thread_id(),
    })
}

impl Registration {
    /// Whether the deadline passed (as the sweeper saw it); otherwise keeps `waker` as the one
    /// to wake (a future may be polled with a different waker than it was registered with).
    pub fn expired(&self, waker: &Waker) -> bool {
        if self.thread != thread_id() {
            return false;
        }
        TABLE.with(|t| match t.borrow_mut().entries.get_mut(self.idx) {
            Some(Entry::Live { expired: true, .. }) => true,
            Some(Entry::Live { waker: w, .. }) => {
                if !w.will_wake(waker) {
                    *w = waker.clone();
                }
                false
            }
            _ => false,
        })
    }
}

/// A deadline to poll: watched by the worker's sweeper where there is one, else by a tokio
/// timer; armed on the first poll (an operation that finishes at once costs nothing).
pub struct Timeout {
    at: Instant,
    armed: Armed,
}

enum Armed {
    No,
    Swept(Registration),
    Tokio(std::pin::Pin<Box<tokio::time::Sleep>>),
}

impl Timeout {
    /// A timeout passing at `at`.
    pub fn at(at: Instant) -> Timeout {
        Timeout {
            at,
            armed: Armed::No,
        }
    }

    /// Whether it passed; otherwise `cx`'s waker is woken when it does.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if matches!(self.armed, Armed::No) {
            self.armed = match register(self.at, cx.waker()) {
                Some(r) => Armed::Swept(r),
                None => Armed::Tokio(Box::pin(tokio::time::sleep_until(
                    tokio::time::Instant::from_std(self.at),
                ))),
            };
        }
        match &mut self.armed {
            Armed::Swept(r) => r.expired(cx.waker()),
            Armed::Tokio(s) => s.as_mut().poll(cx).is_ready(),
            Armed::No => false,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.thread != thread_id() {
            return;
        }
        let _ = TABLE.try_with(|t| {
            let Ok(mut t) = t.try_borrow_mut() else {
                return;
            };
            let free = t.free;
            if let Some(e) = t.entries.get_mut(self.idx)
                && matches!(e, Entry::Live { .. })
            {
                *e = Entry::Free { next: free };
                t.free = self.idx;
                t.live -= 1;
            }
        });
    }
}

/// The sweeper: parked while nothing is registered, otherwise a look every [`TICK`].
async fn sweep() {
    /// Lets a later runtime on this thread start its own sweeper when this one is dropped.
    struct Stopped;
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = TABLE.try_with(|t| {
                if let Ok(mut t) = t.try_borrow_mut() {
                    t.started = false;
                    t.sweeper = None;
                }
            });
        }
    }
    let _stopped = Stopped;
    let mut expired: Vec<Waker> = Vec::new();
    loop {
        poll_fn(|cx| {
            TABLE.with(|t| {
                let mut t = t.borrow_mut();
                if t.live > 0 {
                    Poll::Ready(())
                } else {
                    t.sweeper = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
        })
        .await;
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        TABLE.with(|t| {
            for e in t.borrow_mut().entries.iter_mut() {
                if let Entry::Live {
                    deadline,
                    waker,
                    expired: x @ false,
                } = e
                    && *deadline <= now
                {
                    *x = true;
                    expired.push(waker.clone());
                }
            }
        });
        // woken outside the table's borrow: a woken future may drop its registration
        for w in expired.drain(..) {
            w.wake();
        }
    }
}
