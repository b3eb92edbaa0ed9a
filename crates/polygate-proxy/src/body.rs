//! Body types: what goes upstream ([`ReqBody`]) and what goes back to the client
//! ([`RespBody`]), including the upstream read timeout, the return of the connection to the
//! keep-alive pool when the body ends, body filters and the end-of-request hook (log phase).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Full(b) => b.is_none(),
            ReqBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ReqBody::Full(None) => SizeHint::with_exact(0),
            ReqBody::Stream(s) => s.size_hint(),
        }
    }
}

/// Hooks run while the response body streams and when it ends.
pub trait Finish: Send {
    /// Whether [`Finish::on_chunk`] must be called (body filters present).
    fn filters_body(&self) -> bool;
    /// Runs body filters on one chunk.
    fn on_chunk(&mut self, chunk: &mut Bytes, eof: bool);
    /// Called once when the body ended (`complete`) or was abandoned.
    fn finish(self: Box<Self>, body_bytes: u64, complete: bool);
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(H1Body),
}

/// The body of a response to the client.
pub struct RespBody {
    kind: Kind,
    fin: Option<Box<dyn Finish>>,
    filtering: bool,
    sent: u64,
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
        }
    }

    /// A streamed upstream body.
    pub fn upstream(b: H1Body, fin: Option<Box<dyn Finish>>) -> Self {
        let filtering = fin.as_ref().is_some_and(|f| f.filters_body());
        RespBody {
            kind: Kind::Upstream(b),
            fin,
            filtering,
            sent: 0,
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

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(b) => match b.take() {
                Some(mut data) => {
                    if this.filtering
                        && let Some(f) = this.fin.as_mut()
                    {
                        f.on_chunk(&mut data, true);
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
                    if this.filtering
                        && let Some(f) = this.fin.as_mut()
                    {
                        let mut last = Bytes::new();
                        f.on_chunk(&mut last, true);
                        this.filtering = false;
                        if !last.is_empty() {
                            this.sent += last.len() as u64;
                            return Poll::Ready(Some(Ok(Frame::data(last))));
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
                    Ok(mut data) => {
                        let eof = u.is_end_stream();
                        if this.filtering
                            && let Some(f) = this.fin.as_mut()
                        {
                            f.on_chunk(&mut data, eof);
                            if eof {
                                this.filtering = false;
                            }
                        }
                        this.sent += data.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
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
