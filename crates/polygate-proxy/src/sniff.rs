//! A second look at client request heads, byte for byte as they arrived.
//!
//! hyper tolerates request heads nginx refuses, and the difference is invisible afterwards:
//! of two equal `Content-Length` lines it keeps one, and it drops `Content-Length` when
//! `Transfer-Encoding` is present (the shapes request smuggling is made of). This reader sits
//! between the socket and hyper, follows the HTTP/1.1 message boundaries (`Content-Length`
//! or chunked bodies), and for each request head records whether it repeats a framing
//! header or combines the two. The request handler takes one verdict per request, in order
//! ([`Verdicts::next`]). When the stream stops looking like HTTP/1.1 (an HTTP/2 preface, a
//! head it cannot parse) it records nothing more and hyper's own checks apply.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-connection verdicts on request heads, oldest first; `Some(reason)` for a head nginx
/// would refuse with 400.
#[derive(Default, Clone)]
pub struct Verdicts(Arc<Mutex<VecDeque<Option<&'static str>>>>);

impl Verdicts {
    /// The verdict on the next request head; `None` when the head was acceptable or could not
    /// be followed.
    pub fn next(&self) -> Option<&'static str> {
        self.0.lock().pop_front().flatten()
    }
}

/// The largest head the sniffer buffers; beyond it, it gives up (hyper's limits apply).
const MAX_HEAD: usize = 64 * 1024;

enum State {
    /// Collecting a head (bytes so far).
    Head(Vec<u8>),
    /// Skipping this many body bytes.
    Body(u64),
    /// Inside a chunked body.
    Chunked(crate::h1::ChunkScan),
    /// Not following any more.
    Off,
}

/// `T` whose incoming request heads are checked ([`Verdicts`]).
pub struct Sniffed<T> {
    io: T,
    state: State,
    verdicts: Verdicts,
}

impl<T> Sniffed<T> {
    /// Wraps `io`; the handler reads verdicts from the returned [`Verdicts`].
    pub fn new(io: T) -> (Self, Verdicts) {
        let v = Verdicts::default();
        (
            Sniffed {
                io,
                state: State::Head(Vec::new()),
                verdicts: v.clone(),
            },
            v,
        )
    }

    fn feed(&mut self, mut data: &[u8]) {
        // a head completed in this same read: a chunked body that is already visibly invalid
        // refuses the request before anything is sent upstream (as nginx, which buffers)
        let mut head_here = false;
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Body(rem) => {
                    let take = (*rem).min(data.len() as u64) as usize;
                    *rem -= take as u64;
                    data = &data[take..];
                    if *rem == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::Chunked(scan) => match scan.feed(data) {
                    Ok(Some(used)) => {
                        data = &data[used..];
                        self.state = State::Head(Vec::new());
                    }
                    Ok(None) => return,
                    Err(_) => {
                        if head_here && let Some(last) = self.verdicts.0.lock().back_mut() {
                            *last = Some("invalid chunked request body");
                        }
                        self.state = State::Off;
                        return;
                    }
                },
                State::Head(buf) => {
                    // leading empty lines before a request are allowed (RFC 9112 2.2)
                    if buf.is_empty() {
                        let skip = data
                            .iter()
                            .position(|&b| b != b'\r' && b != b'\n')
                            .unwrap_or(data.len());
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        if data.starts_with(b"PRI * HTTP/2") || data.starts_with(b"PRI ") {
                            self.state = State::Off;
                            return;
                        }
                    }
                    // the common case: the whole head in this read, nothing buffered
                    if buf.is_empty()
                        && let Some(p) = data.windows(4).position(|w| w == b"\r\n\r\n")
                    {
                        let (verdict, next) = judge(&data[..p + 4]);
                        self.verdicts.0.lock().push_back(verdict);
                        self.state = next;
                        head_here = true;
                        data = &data[p + 4..];
                        continue;
                    }
                    let start = buf.len().saturating_sub(3);
                    buf.extend_from_slice(data);
                    let Some(end) = buf[start..]
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| start + p + 4)
                    else {
                        if buf.len() > MAX_HEAD {
                            // whatever hyper makes of it, this head is too large
                            self.verdicts
                                .0
                                .lock()
                                .push_back(Some("request header too large"));
                            self.state = State::Off;
                        }
                        return;
                    };
                    let consumed_here = data.len() - (buf.len() - end);
                    let (verdict, next) = judge(&buf[..end]);
                    self.verdicts.0.lock().push_back(verdict);
                    self.state = next;
                    head_here = true;
                    data = &data[consumed_here..];
                }
            }
        }
    }
}

/// The longest header line accepted (nginx's 8k `large_client_header_buffers`).
pub const MAX_LINE: usize = 8 * 1024 - 16;
/// The largest request head accepted (nginx's 4 buffers of 8k).
pub const MAX_HEAD_SIZE: usize = 32 * 1024;

/// `line` starts with `name` (lower case) followed by `:`, in any case.
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let n = name.len();
    if line.len() > n && line[n] == b':' && line[..n].eq_ignore_ascii_case(name) {
        Some(line[n + 1..].trim_ascii())
    } else {
        None
    }
}

/// The verdict on one complete head (ending with an empty line), and how its body is framed.
/// A line scan, not a parse: hyper parses the head; this only looks for what hyper folds.
fn judge(head: &[u8]) -> (Option<&'static str>, State) {
    let (mut cl, mut te) = (0usize, 0usize);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut too_large = head.len() > MAX_HEAD_SIZE;
    // skip the request line; the last two lines are empty
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE {
            too_large = true;
        }
        match line.first().map(u8::to_ascii_lowercase) {
            Some(b'c') => {
                if let Some(v) = header_value(line, b"content-length") {
                    cl += 1;
                    length = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
                }
            }
            Some(b't') => {
                if let Some(v) = header_value(line, b"transfer-encoding") {
                    te += 1;
                    chunked = v
                        .rsplit(|&b| b == b',')
                        .next()
                        .is_some_and(|l| l.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                }
            }
            _ => {}
        }
    }
    let verdict = if too_large {
        Some("request header too large")
    } else if cl > 1 {
        Some("duplicate Content-Length header")
    } else if te > 1 {
        Some("duplicate Transfer-Encoding header")
    } else if cl == 1 && te == 1 {
        Some("both Content-Length and Transfer-Encoding")
    } else {
        None
    };
    let next = if verdict.is_some() {
        // the connection is closed after the refusal: nothing more to follow
        State::Off
    } else if te == 1 {
        if chunked {
            State::Chunked(crate::h1::ChunkScan::default())
        } else {
            State::Off
        }
    } else {
        match (cl, length) {
            (0, _) | (_, Some(0)) => State::Head(Vec::new()),
            (_, Some(n)) => State::Body(n),
            (_, None) => State::Off,
        }
    };
    (verdict, next)
}

impl<T: AsyncRead + Unpin> AsyncRead for Sniffed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && !matches!(self.state, State::Off)
        {
            let this = &mut *self;
            this.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Sniffed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(stream: &[u8], piece: usize) -> Vec<Option<&'static str>> {
        let (mut s, v) = Sniffed::new(());
        for chunk in stream.chunks(piece) {
            s.feed(chunk);
        }
        let mut out = Vec::new();
        while let Some(x) = v.0.lock().pop_front() {
            out.push(x);
        }
        out
    }

    #[test]
    fn follows_messages_and_flags_smuggling_shapes() {
        let stream = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\
POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        for piece in [1, 2, 7, 4096] {
            assert_eq!(
                verdicts(stream, piece),
                [None, None, None, Some("duplicate Content-Length header")],
                "pieces of {piece}"
            );
        }
        assert_eq!(
            verdicts(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", 3),
            [Some("both Content-Length and Transfer-Encoding")]
        );
        // a chunked body already invalid when its head arrives
        assert_eq!(
            verdicts(
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                4096
            ),
            [Some("invalid chunked request body")]
        );
        // an HTTP/2 preface: nothing to follow
        assert!(verdicts(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 5).is_empty());
    }
}
