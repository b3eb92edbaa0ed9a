//! Body types: what goes upstream ([`ReqBody`]) and what goes back to the client
//! ([`RespBody`]), including the upstream read timeout, the return of the connection to the
//! keep-alive pool when the body ends, body filters and the end-of-request hook (log phase).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use polygate_core::plugin::{BodyWait, ChunkFilter};

use crate::h1::H1Body;

/// Boxed error of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of an upstream request.
pub enum ReqBody {
    /// No body.
    Empty,
    /// A buffered body.
    Full(Option<Bytes>),
    /// The client's body, streamed.
    Stream(Incoming),
    /// The client's body, streamed through plugins' request body filters.
    Filtered(Box<FilteredBody>),
}

/// A plugin's request body filter failed: the upstream request is abandoned.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FilterFailed(pub polygate_core::PluginError);

/// The client's body passing through request body filters chunk by chunk, in chain order; a
/// filter may hold a chunk back until its future resolves.
pub struct FilteredBody {
    inner: Incoming,
    filters: Vec<Box<dyn ChunkFilter>>,
    /// A filter holding a chunk back: the index after it, its future, and whether the chunk
    /// was the last.
    waiting: Option<(usize, BodyWait, bool)>,
    done: bool,
    /// The client's trailer fields, sent after the last chunk.
    trailers: Option<http::HeaderMap>,
}

impl FilteredBody {
    /// `inner` through `filters`.
    pub fn new(inner: Incoming, filters: Vec<Box<dyn ChunkFilter>>) -> FilteredBody {
        FilteredBody {
            inner,
            filters,
            waiting: None,
            done: false,
            trailers: None,
        }
    }

    /// Runs the filters from `at` on; `Ok(None)` when one holds the chunk back.
    fn run(&mut self, at: usize, mut chunk: Bytes, eof: bool) -> Result<Option<Bytes>, BoxError> {
        for i in at..self.filters.len() {
            match self.filters[i].on_chunk(&mut chunk, eof) {
                Err(e) => return Err(Box::new(FilterFailed(e))),
                Ok(Some(w)) => {
                    self.waiting = Some((i + 1, w, eof));
                    return Ok(None);
                }
                Ok(None) => {}
            }
        }
        Ok(Some(chunk))
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let (data, eof) = if let Some((at, w, eof)) = this.waiting.as_mut() {
                let (at, eof) = (*at, *eof);
                let data = match ready!(w.as_mut().poll(cx)) {
                    Ok(d) => d,
                    Err(e) => {
                        this.waiting = None;
                        this.done = true;
                        return Poll::Ready(Some(Err(Box::new(FilterFailed(e)))));
                    }
                };
                this.waiting = None;
                match this.run(at, data, eof) {
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(None) => continue,
                    Ok(Some(d)) => (d, eof),
                }
            } else {
                if this.done {
                    return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                let (chunk, eof) = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                    None => (Bytes::new(), true),
                    Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    Some(Ok(f)) => match f.into_data() {
                        // a trailers frame ends the body: its last chunk is empty
                        Ok(d) if !this.inner.is_end_stream() => (d, false),
                        Ok(d) => (d, true),
                        Err(f) => {
                            let Ok(mut t) = f.into_trailers() else {
                                continue;
                            };
                            for filter in &mut this.filters {
                                if let Err(e) = filter.on_trailers(&mut t) {
                                    this.done = true;
                                    return Poll::Ready(Some(Err(Box::new(FilterFailed(e)))));
                                }
                            }
                            this.trailers = Some(t);
                            continue;
                        }
                    },
                };
                match this.run(0, chunk, eof) {
                    Err(e) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Ok(None) => continue,
                    Ok(Some(d)) => (d, eof),
                }
            };
            if eof {
                this.done = true;
            }
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.waiting.is_none() && self.trailers.is_none()
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(s) => Pin::new(s).poll_frame(cx).map_err(|e| e.into()),
            ReqBody::Filtered(f) => Pin::new(&mut **f).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(b) => b.is_none(),
            ReqBody::Stream(s) => s.is_end_stream(),
            ReqBody::Filtered(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ReqBody::Full(None) => SizeHint::with_exact(0),
            ReqBody::Stream(s) => s.size_hint(),
            ReqBody::Filtered(_) => SizeHint::default(),
        }
    }
}

/// A body filter waiting: the chunk goes on when `wait` resolves, through the filters from
/// `at` on.
pub struct ChunkWait {
    /// Index of the next filter to run (as [`Finish::resume`] counts them).
    pub at: usize,
    /// What the waiting filter will pass on.
    pub wait: BodyWait,
}

/// Hooks run while the response body streams and when it ends.
pub trait Finish: Send {
    /// Whether [`Finish::on_chunk`] must be called (body filters present).
    fn filters_body(&self) -> bool;
    /// Runs body filters on one chunk; `Some` when one of them waits.
    fn on_chunk(&mut self, chunk: &mut Bytes, eof: bool) -> Option<ChunkWait> {
        self.resume(0, chunk, eof)
    }
    /// Runs the body filters from index `at` on (after one waited).
    fn resume(&mut self, at: usize, chunk: &mut Bytes, eof: bool) -> Option<ChunkWait>;
    /// Runs the trailer filters on the upstream's trailer fields.
    fn on_trailers(&mut self, _trailers: &mut http::HeaderMap) {}
    /// Called once when the body ended (`complete`) or was abandoned.
    fn finish(self: Box<Self>, body_bytes: u64, complete: bool);
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(UpstreamBody),
}

/// A response body streamed from an upstream.
pub enum UpstreamBody {
    /// From an HTTP/1.1 connection.
    H1(H1Body),
    /// From an HTTP/2 stream (gRPC).
    H2(crate::h2up::H2Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::H2(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}

/// The body of a response to the client.
pub struct RespBody {
    kind: Kind,
    fin: Option<Box<dyn Finish>>,
    filtering: bool,
    sent: u64,
    /// A body filter holding a chunk back (and whether it was the last one).
    waiting: Option<(ChunkWait, bool)>,
    /// Trailer fields to send after the body filters' last chunk.
    trailers: Option<Box<http::HeaderMap>>,
}

impl RespBody {
    /// A buffered body.
    pub fn full(b: Bytes, fin: Option<Box<dyn Finish>>) -> Self {
        let filtering = fin.as_ref().is_some_and(|f| f.filters_body());
        RespBody {
            kind: Kind::Full(if b.is_empty() && !filtering {
                None
            } else {
                Some(b)
            }),
            fin,
            filtering,
            sent: 0,
            waiting: None,
            trailers: None,
        }
    }

    /// A streamed upstream body.
    pub fn upstream(b: UpstreamBody, fin: Option<Box<dyn Finish>>) -> Self {
        let filtering = fin.as_ref().is_some_and(|f| f.filters_body());
        RespBody {
            kind: Kind::Upstream(b),
            fin,
            filtering,
            sent: 0,
            waiting: None,
            trailers: None,
        }
    }

    fn done(&mut self, complete: bool) {
        if let Some(f) = self.fin.take() {
            f.finish(self.sent, complete);
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        let complete = match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => u.is_end_stream(),
        };
        self.done(complete);
    }
}

impl RespBody {
    /// Runs the body filters over `data`: the chunk to send now (`Ready`), or `None` when a
    /// filter holds it back (`self.waiting` is set; poll again).
    fn filter(&mut self, mut data: Bytes, eof: bool) -> Option<Bytes> {
        if let Some(f) = self.fin.as_mut()
            && let Some(w) = f.on_chunk(&mut data, eof)
        {
            self.waiting = Some((w, eof));
            return None;
        }
        Some(data)
    }

    /// Polls a waiting filter: the chunk it passes on, through the filters after it.
    fn poll_waiting(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<(Bytes, bool)>, BoxError>> {
        let Some((w, eof)) = self.waiting.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        let eof = *eof;
        let mut data = match ready!(w.wait.as_mut().poll(cx)) {
            Ok(d) => d,
            Err(e) => {
                self.waiting = None;
                return Poll::Ready(Err(e.into()));
            }
        };
        let at = w.at;
        self.waiting = None;
        if let Some(f) = self.fin.as_mut()
            && let Some(next) = f.resume(at, &mut data, eof)
        {
            self.waiting = Some((next, eof));
            // the next filter's future is polled on the caller's next round
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(Some((data, eof))))
    }

    fn emit(&mut self, data: Bytes, eof: bool) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if eof {
            self.filtering = false;
        }
        self.sent += data.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.waiting.is_some() {
            match ready!(this.poll_waiting(cx)) {
                Err(e) => {
                    this.done(false);
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some((data, eof))) => return this.emit(data, eof),
                Ok(None) => {}
            }
        }
        if let Some(t) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*t))));
        }
        match &mut this.kind {
            Kind::Full(b) => match b.take() {
                Some(data) => {
                    if this.filtering {
                        let Some(data) = this.filter(data, true) else {
                            return Pin::new(this).poll_frame(cx);
                        };
                        return this.emit(data, true);
                    }
                    this.sent += data.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                None => {
                    this.done(true);
                    Poll::Ready(None)
                }
            },
            Kind::Upstream(u) => match ready!(Pin::new(&mut *u).poll_frame(cx)) {
                None => {
                    if this.filtering {
                        this.filtering = false;
                        let Some(last) = this.filter(Bytes::new(), true) else {
                            return Pin::new(this).poll_frame(cx);
                        };
                        if !last.is_empty() {
                            return this.emit(last, true);
                        }
                    }
                    this.done(true);
                    Poll::Ready(None)
                }
                Some(Err(e)) => {
                    this.done(false);
                    Poll::Ready(Some(Err(e)))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eof = u.is_end_stream();
                        if this.filtering {
                            let Some(data) = this.filter(data, eof) else {
                                return Pin::new(this).poll_frame(cx);
                            };
                            return this.emit(data, eof);
                        }
                        this.sent += data.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => {
                        let Ok(mut t) = frame.into_trailers() else {
                            return Pin::new(this).poll_frame(cx);
                        };
                        if let Some(f) = this.fin.as_mut() {
                            f.on_trailers(&mut t);
                        }
                        this.trailers = Some(Box::new(t));
                        if this.filtering {
                            // the body filters' last call comes before the trailers
                            this.filtering = false;
                            let Some(last) = this.filter(Bytes::new(), true) else {
                                return Pin::new(this).poll_frame(cx);
                            };
                            if !last.is_empty() {
                                this.sent += last.len() as u64;
                                return Poll::Ready(Some(Ok(Frame::data(last))));
                            }
                        }
                        Pin::new(this).poll_frame(cx)
                    }
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.waiting.is_some() || self.trailers.is_some() {
            return false;
        }
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => !self.filtering && u.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        if self.filtering {
            return SizeHint::default();
        }
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(u) => u.size_hint(),
        }
    }
}
