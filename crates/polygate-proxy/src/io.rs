//! A client connection whose writes may not stall longer than a limit: nginx's
//! `send_timeout` ("between two successive write operations"). A client that stops reading
//! a response is disconnected once the limit passes, which releases the upstream connection
//! that was feeding it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// `T` with a bound on how long one write may wait.
pub struct SendTimeout<T> {
    io: T,
    limit: Duration,
    /// Running while a write is blocked; dropped as soon as a write makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> SendTimeout<T> {
    /// Wraps `io`.
    pub fn new(io: T, limit: Duration) -> Self {
        SendTimeout {
            io,
            limit,
            stalled: None,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not read the response within the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T> SendTimeout<T> {
    /// What a write-side call returns, given the inner one's result: progress resets the
    /// stall timer, a blocked call runs it.
    fn track<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => match self.blocked(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.track(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.track(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.track(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Room of a [`Coalesce`] buffer: one TLS record's worth of plaintext.
const COALESCE_CAP: usize = 16 * 1024;

/// The write side of an HTTP/2 connection: frames are gathered, and a flush asked while the
/// event loop still has other tasks ready is put off until they ran, so responses that
/// complete in one turn of the loop (other streams of the connection) leave in one write
/// (over TLS: one record and one seal) instead of one each. h2 flushes after every DATA frame
/// it chains (larger than 256 bytes), which a plain buffer cannot gather across.
///
/// A put-off flush reports success at once and wakes the connection's task after the tasks
/// ready now (and after the I/O driver's next poll); that task's next poll flushes for real.
/// Shutting down writes what is buffered first.
pub struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    pos: usize,
    /// A flush was put off: the next one writes.
    deferred: bool,
}

impl<T> Coalesce<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        Coalesce {
            io,
            buf: Vec::new(),
            pos: 0,
            deferred: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out the whole buffer.
    fn write_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.buf.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection closed while writing",
                )));
            }
            self.pos += n;
        }
        self.buf.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Before `len` more bytes: writes the buffer out when they would not fit beside it. True
    /// when they go into the buffer, false when they are a buffer's worth or more and go
    /// straight through (the buffer is empty then).
    fn room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buf.len() + len <= COALESCE_CAP {
            return Poll::Ready(Ok(true));
        }
        std::task::ready!(self.write_buf(cx))?;
        Poll::Ready(Ok(len < COALESCE_CAP))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !std::task::ready!(this.room_for(cx, data.len()))? {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let this = &mut *self;
        if !std::task::ready!(this.room_for(cx, total))? {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            this.deferred = false;
            return Pin::new(&mut this.io).poll_flush(cx);
        }
        if !this.deferred {
            this.deferred = true;
            // a wake-up after the tasks ready now: tokio's yield, which defers it past the
            // I/O driver's next poll (its first poll always returns Pending)
            let mut y = std::pin::pin!(tokio::task::yield_now());
            let _ = y.as_mut().poll(cx);
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.write_buf(cx))?;
        this.deferred = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.write_buf(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncWriteExt;

    /// Records each write it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncRead for Writes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn flushes_of_one_turn_leave_in_one_write() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        // two responses, each flushed as h2 does: the first flush is put off
        c.write_all(b"response one;").await.unwrap();
        c.flush().await.unwrap();
        assert!(
            w.0.lock().unwrap().is_empty(),
            "the first flush waits for the turn's end"
        );
        c.write_all(b"response two;").await.unwrap();
        // the next flush (the connection's next poll) writes both at once
        c.flush().await.unwrap();
        assert_eq!(
            *w.0.lock().unwrap(),
            vec![b"response one;response two;".to_vec()]
        );
        // nothing buffered: a flush goes straight through
        c.flush().await.unwrap();
        assert_eq!(w.0.lock().unwrap().len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn full_buffer_and_large_writes_go_out_and_shutdown_writes_the_rest() {
        let w = Writes::default();
        let mut c = Coalesce::new(w.clone());
        c.write_all(&[1u8; 10_000]).await.unwrap();
        c.write_all(&[2u8; 10_000]).await.unwrap(); // would pass the 16 KiB: the first goes out
        assert_eq!(w.0.lock().unwrap().len(), 1);
        assert_eq!(w.0.lock().unwrap()[0], vec![1u8; 10_000]);
        c.write_all(&[3u8; 40_000]).await.unwrap(); // larger than the buffer: through, in order
        {
            let got = w.0.lock().unwrap();
            assert_eq!(got.len(), 3);
            assert_eq!(got[1], vec![2u8; 10_000]);
            assert_eq!(got[2], vec![3u8; 40_000]);
        }
        c.write_all(b"tail").await.unwrap();
        c.flush().await.unwrap(); // put off
        c.shutdown().await.unwrap();
        assert_eq!(w.0.lock().unwrap().last().unwrap(), b"tail");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_put_off_flush_wakes_its_task() {
        // a task that flushes once and then waits only for its own wake-up still gets its
        // bytes written: the put-off flush scheduled that wake-up
        let w = Writes::default();
        let w2 = w.clone();
        let task = tokio::spawn(async move {
            let mut c = Coalesce::new(w2);
            c.write_all(b"last frame").await.unwrap();
            let mut polls = 0;
            std::future::poll_fn(|cx| {
                polls += 1;
                match Pin::new(&mut c).poll_flush(cx) {
                    Poll::Ready(Ok(())) if polls == 1 => Poll::Pending, // as h2: idle now
                    other => other,
                }
            })
            .await
            .unwrap();
            polls
        });
        let polls = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task was woken")
            .unwrap();
        assert_eq!(polls, 2);
        assert_eq!(*w.0.lock().unwrap(), vec![b"last frame".to_vec()]);
    }
}
