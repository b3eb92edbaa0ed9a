//! Call timeouts on a gateway worker without a timer per call.
//!
//! A tokio timer per FFI call (register, poll, cancel, and the time driver's bookkeeping) cost
//! about 1,000 instructions of the worker per call, more than the rest of the host's part of a
//! call. On a worker thread (a current-thread runtime) calls register their deadline in a
//! thread-local table instead, and one sweeper task per worker wakes every [`TICK`] while calls
//! are in flight: each call past its deadline is marked expired and its future woken. A call
//! therefore times out between its deadline and one tick later.

use std::cell::RefCell;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::queue::Task;

/// How often the sweeper looks at the deadlines while calls are in flight.
pub const TICK: Duration = Duration::from_millis(10);

enum Entry {
    Live {
        deadline: Instant,
        task: Arc<Task>,
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
    /// The sweeper task, once started; woken when the first call is registered.
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

/// A call's registration; dropping it (the call answered, timed out or was cancelled) frees
/// the slot. Must be dropped on the thread that created it (a current-thread runtime's tasks
/// never move).
pub struct Registration {
    idx: usize,
}

/// Registers `task`'s deadline on this worker thread, starting its sweeper on first use.
/// `None` outside a current-thread runtime (the caller then uses a tokio timer).
pub fn register(task: &Arc<Task>, deadline: Instant) -> Option<Registration> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
        return None;
    }
    let (idx, wake, start) = TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let e = Entry::Live {
            deadline,
            task: task.clone(),
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
    if start {
        handle.spawn(sweep());
    }
    if let Some(w) = wake {
        w.wake(); // a local wake-up: the sweeper runs on this thread
    }
    Some(Registration { idx })
}

impl Registration {
    /// Whether the sweeper found the call past its deadline.
    pub fn expired(&self) -> bool {
        TABLE.with(|t| {
            matches!(
                t.borrow().entries.get(self.idx),
                Some(Entry::Live { expired: true, .. })
            )
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
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

/// The sweeper: parked while no call is in flight, otherwise a look every [`TICK`].
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
    let mut expired: Vec<Arc<Task>> = Vec::new();
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
                    task,
                    expired: x @ false,
                } = e
                    && *deadline <= now
                {
                    *x = true;
                    expired.push(task.clone());
                }
            }
        });
        // woken outside the table's borrow: a woken future may drop its registration
        for task in expired.drain(..) {
            task.wake();
        }
    }
}
