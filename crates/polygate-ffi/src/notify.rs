//! A queue's readiness file descriptor: an eventfd that becomes readable when tasks are queued
//! for a poller that asked to be told ([`crate::queue::TaskQueue::try_poll_many`]), so runtimes
//! with an event loop of their own (Go's netpoller, libuv, asyncio) wait for tasks without a
//! thread blocked in the host.
#![allow(unsafe_code, reason = "eventfd, read and write")]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd.
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd with counter 0.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no pointer arguments; a non-negative result is a new descriptor
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the descriptor readable (adds 1 to the counter).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a u64 that lives for the call
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter (not readable any more until the next signal).
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a u64 that lives for the call; EAGAIN when already 0
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// The descriptor (owned by this value).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
