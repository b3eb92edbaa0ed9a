//! Which worker thread is running (`ngx.worker.id()`), set by the server when a worker starts.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    static ID: Cell<Option<usize>> = const { Cell::new(None) };
}

static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Marks the current thread as worker `id` of `count`.
pub fn enter(id: usize, count: usize) {
    ID.with(|c| c.set(Some(id)));
    COUNT.store(count, Ordering::Relaxed);
}

/// The current worker's index (0-based), or `None` outside worker threads.
pub fn id() -> Option<usize> {
    ID.with(Cell::get)
}

/// Number of worker threads (0 before the server started).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}
