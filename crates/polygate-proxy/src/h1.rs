//! A lean HTTP/1.1 client for upstream connections.
//!
//! The request task writes the request and reads the response head on the socket itself; the
//! response body is read by [`H1Body`] as the client consumes it. There is no connection task
//! and no channel between the request and its connection (hyper's client has both), which is
//! most of the per-request cost a proxy adds on top of the kernel's.
//!
//! Framing follows RFC 9112: `Content-Length`, `chunked`, or read-until-close; responses to
//! `HEAD` and 1xx/204/304 responses have no body; interim 1xx responses are skipped.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::body::ReqBody;
use crate::pool::PoolReturn;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted.
const MAX_HEADERS: usize = 128;
const READ_CHUNK: usize = 16 * 1024;

/// What the forwarding headers say about the client. As APISIX does: `X-Forwarded-For` gets
/// the client address appended (or is replaced by it when `trusted_addresses` is configured
/// and the peer is not in it), `X-Real-IP` is the client address, and
/// `X-Forwarded-Proto/-Host/-Port` carry what polygate observed, unless the peer is trusted
/// and sent its own; a `Forwarded` header passes only from a trusted peer.
pub struct Forward<'a> {
    /// Client address, formatted once per connection.
    pub client_ip: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Port for `X-Forwarded-Port`: the one in the client's Host header, else the port the
    /// request arrived on.
    pub port: &'a str,
    /// Host the client asked for (with its port, as sent).
    pub host: Option<&'a HeaderValue>,
    /// The peer is in `trusted_addresses`: its forwarding headers pass.
    pub trusted: bool,
    /// An untrusted peer's `X-Forwarded-For` is dropped (`trusted_addresses` is configured).
    pub drop_xff: bool,
    /// The client's `Upgrade` value when the route proxies WebSocket upgrades: sent on with
    /// `Connection: upgrade`.
    pub upgrade: Option<&'a HeaderValue>,
}

/// A request that must not be written upstream.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

/// True for a request target that can go on a request line as it is: no control bytes, no
/// space, no DEL, not empty.
pub fn valid_target(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b > 0x20 && b != 0x7f)
}

/// Whether a header is hop-by-hop (never forwarded). `Trailer` is not: it names the trailer
/// fields that follow a chunked body, which polygate forwards (RFC 9110 section 6.6.2).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Serialises a request head in one pass over the headers. `host` replaces the `Host` header
/// when given; hop-by-hop headers (and those the client's `Connection` header names) are
/// dropped; forwarding headers are written from `fwd`. Framing headers of the client request
/// are replaced by the body's own: `Content-Length` when its size is known, `Transfer-Encoding:
/// chunked` otherwise. Returns the head and whether the body is chunked.
///
/// This is the one place where what plugins produced is checked before it reaches the
/// upstream: the target must be a valid request-line token ([`valid_target`]); header values
/// cannot hold CR, LF or NUL by construction ([`HeaderValue`]).
pub fn encode_head(
    method: &Method,
    uri: &str,
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    fwd: &Forward<'_>,
    body: &ReqBody,
) -> Result<(BytesMut, bool), InvalidRequest> {
    use std::fmt::Write as _;
    if !valid_target(uri) {
        return Err(InvalidRequest(format!(
            "request target {uri:?} holds a space or control byte"
        )));
    }
    let mut out = BytesMut::with_capacity(320 + headers.len() * 40);
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(uri.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    if let Some(h) = host {
        out.put_slice(b"host: ");
        out.put_slice(h.as_bytes());
        out.put_slice(b"\r\n");
    }
    // tokens of the client's Connection header name more hop-by-hop headers
    let conn_tokens: Option<&str> = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.split(',').any(|t| {
                let t = t.trim();
                !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("close")
                    && !t.is_empty()
            })
        });
    let mut xff_prev: Option<&HeaderValue> = None;
    let mut xff_extra = false;
    let (mut seen_proto, mut seen_fhost, mut seen_port) = (false, false, false);
    for (k, v) in headers {
        if *k == header::CONTENT_LENGTH
            || is_hop_by_hop(k)
            || (host.is_some() && *k == header::HOST)
        {
            continue;
        }
        match k.as_str() {
            "x-forwarded-for" => {
                if fwd.drop_xff {
                    continue;
                }
                if xff_prev.is_some() {
                    xff_extra = true;
                } else {
                    xff_prev = Some(v);
                }
                continue;
            }
            "x-real-ip" => continue,
            "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-port" | "forwarded"
                if !fwd.trusted =>
            {
                continue;
            }
            "x-forwarded-proto" => seen_proto = true,
            "x-forwarded-host" => seen_fhost = true,
            "x-forwarded-port" => seen_port = true,
            _ => {}
        }
        if let Some(tokens) = conn_tokens
            && tokens
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(k.as_str()))
        {
            continue;
        }
        out.put_slice(k.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"x-forwarded-for: ");
    if xff_extra {
        for v in headers.get_all("x-forwarded-for") {
            out.put_slice(v.as_bytes());
            out.put_slice(b", ");
        }
    } else if let Some(prev) = xff_prev {
        out.put_slice(prev.as_bytes());
        out.put_slice(b", ");
    }
    out.put_slice(fwd.client_ip.as_bytes());
    out.put_slice(b"\r\nx-real-ip: ");
    out.put_slice(fwd.client_ip.as_bytes());
    out.put_slice(b"\r\n");
    if !seen_proto {
        out.put_slice(b"x-forwarded-proto: ");
        out.put_slice(fwd.scheme.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !seen_fhost && let Some(h) = fwd.host {
        out.put_slice(b"x-forwarded-host: ");
        out.put_slice(h.as_bytes());
        out.put_slice(b"\r\n");
    }
    if !seen_port {
        out.put_slice(b"x-forwarded-port: ");
        out.put_slice(fwd.port.as_bytes());
        out.put_slice(b"\r\n");
    }
    if let Some(u) = fwd.upgrade {
        out.put_slice(b"connection: upgrade\r\nupgrade: ");
        out.put_slice(u.as_bytes());
        out.put_slice(b"\r\n");
    }
    let mut chunked = false;
    match body {
        ReqBody::Empty | ReqBody::Full(None) => {
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                out.put_slice(b"content-length: 0\r\n");
            }
        }
        ReqBody::Full(Some(b)) => {
            let _ = write!(out, "content-length: {}\r\n", b.len());
        }
        ReqBody::Filtered(_) => {
            out.put_slice(b"transfer-encoding: chunked\r\n");
            chunked = true;
        }
        ReqBody::Stream(s) => match s.size_hint().exact() {
            Some(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            None => {
                out.put_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
        },
    }
    out.put_slice(b"\r\n");
    Ok((out, chunked))
}

/// The transport of an upstream connection: plain TCP (with the non-blocking fast paths) or
/// TLS.
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An upstream HTTP/1.1 connection.
pub struct H1Conn {
    io: Stream,
    buf: BytesMut,
    /// The request in flight asked for a protocol upgrade: a `101` answer is expected.
    pub upgrade: bool,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The connection closed before any byte of the response arrived (a reused connection
    /// that the upstream had closed: safe to retry when the request can be replayed).
    #[error("connection closed before the response")]
    ClosedEarly,
    /// An I/O error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The response is not valid HTTP/1.x.
    #[error("invalid response: {0}")]
    Parse(String),
    /// The client's request body could not be read (invalid chunked framing, a reset): the
    /// upstream got a truncated request and the connection is dropped.
    #[error("client body: {0}")]
    ClientBody(String),
    /// The client sent no more of its request body within the client body timeout.
    #[error("timed out waiting for the client's request body")]
    ClientTimeout,
    /// One write to the upstream waited longer than the send timeout.
    #[error("upstream send timed out")]
    SendTimeout,
    /// A plugin's request body filter failed: the upstream got a truncated request.
    #[error("{0}")]
    Filter(polygate_core::PluginError),
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked(ChunkState),
    Close,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// A parsed response head.
pub struct Head {
    /// Status.
    pub status: StatusCode,
    /// Headers (framing headers included).
    pub headers: HeaderMap,
    framing: Framing,
    /// Whether the connection may serve another request after this response.
    keep_alive: bool,
}

impl H1Conn {
    /// Wraps a connected stream.
    pub fn new(io: Stream) -> H1Conn {
        H1Conn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            upgrade: false,
        }
    }

    /// The transport, taken apart from the connection (a protocol upgrade: what the upstream
    /// sent after its `101` head comes along).
    pub fn into_parts(self) -> (Stream, BytesMut) {
        (self.io, self.buf)
    }

    /// False when the peer has closed the connection (or sent unsolicited data) while it sat
    /// idle. Costs a syscall only when the event loop saw the socket become readable.
    pub fn looks_alive(&mut self) -> bool {
        match &mut self.io {
            Stream::Tcp(s) => {
                let mut b = [0u8; 1];
                match s.try_read(&mut b) {
                    Err(e) => e.kind() == io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            }
            Stream::Tls(s) => {
                // one poll without a waker: pending means nothing arrived (no close_notify, no
                // unsolicited record)
                let mut b = [0u8; 1];
                let mut rb = tokio::io::ReadBuf::new(&mut b);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(
                    tokio::io::AsyncRead::poll_read(Pin::new(s.as_mut()), &mut cx, &mut rb),
                    Poll::Pending
                )
            }
        }
    }

    /// Writes `head` without waiting if the socket takes it all at once (the common case for a
    /// request without a body); returns false when the caller must use [`H1Conn::send`].
    pub fn try_send_head(&mut self, head: &[u8]) -> bool {
        match &self.io {
            Stream::Tcp(s) => matches!(s.try_write(head), Ok(n) if n == head.len()),
            Stream::Tls(_) => false,
        }
    }

    /// Writes a request whose head was made by [`encode_head`]; a streamed body follows in
    /// chunked encoding when `chunked`. Each write may wait at most `send_to` (nginx's
    /// `proxy_send_timeout` bounds the time between two writes, not the whole upload), and
    /// each piece of a streamed body may take at most `body_to` to arrive from the client
    /// (`client_body_timeout`).
    pub async fn send(
        &mut self,
        head: &[u8],
        body: ReqBody,
        chunked: bool,
        send_to: Duration,
        body_to: Duration,
    ) -> Result<(), H1Error> {
        match body {
            ReqBody::Empty | ReqBody::Full(None) => self.write(head, send_to).await?,
            ReqBody::Full(Some(b)) => {
                let mut out = BytesMut::with_capacity(head.len() + b.len());
                out.put_slice(head);
                out.put_slice(&b);
                self.write(&out, send_to).await?;
            }
            body @ (ReqBody::Stream(_) | ReqBody::Filtered(_)) => {
                self.write(head, send_to).await?;
                let mut body = body;
                let mut trailers = None;
                loop {
                    let frame = match tokio::time::timeout(body_to, body.frame()).await {
                        Err(_) => return Err(H1Error::ClientTimeout),
                        Ok(None) => break,
                        Ok(Some(f)) => f,
                    };
                    let frame = frame.map_err(|e| {
                        if let Some(f) = e.downcast_ref::<crate::body::FilterFailed>() {
                            return H1Error::Filter(f.0.clone());
                        }
                        H1Error::ClientBody(match e.source() {
                            Some(cause) => format!("{e}: {cause}"),
                            None => e.to_string(),
                        })
                    })?;
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(f) => {
                            trailers = f.into_trailers().ok();
                            continue;
                        }
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        let mut out = BytesMut::with_capacity(data.len() + 20);
                        out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
                        out.put_slice(&data);
                        out.put_slice(b"\r\n");
                        self.write(&out, send_to).await?;
                    } else {
                        self.write(&data, send_to).await?;
                    }
                }
                if chunked {
                    // the client's trailer fields go on, as a chunked body's trailer section
                    let mut out = BytesMut::from(&b"0\r\n"[..]);
                    for (k, v) in trailers.iter().flatten() {
                        if request_trailer_allowed(k) {
                            out.put_slice(k.as_str().as_bytes());
                            out.put_slice(b": ");
                            out.put_slice(v.as_bytes());
                            out.put_slice(b"\r\n");
                        }
                    }
                    out.put_slice(b"\r\n");
                    self.write(&out, send_to).await?;
                }
            }
        }
        Ok(())
    }

    /// Writes all of `buf`; each write call may wait at most `limit`.
    async fn write(&mut self, mut buf: &[u8], limit: Duration) -> Result<(), H1Error> {
        while !buf.is_empty() {
            match tokio::time::timeout(limit, self.io.write(buf)).await {
                Err(_) => return Err(H1Error::SendTimeout),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(Ok(n)) => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Reads the response head, skipping interim 1xx responses.
    pub async fn read_head(&mut self, method: &Method) -> Result<Head, H1Error> {
        let mut got_any = false;
        loop {
            if let Some(head) = self.parse_head(method)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(H1Error::Parse("response head too large".into()));
            }
            self.buf.reserve(READ_CHUNK);
            let n = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.buf).await?;
            if n == 0 {
                return Err(if got_any {
                    H1Error::Parse("connection closed inside the response head".into())
                } else {
                    H1Error::ClosedEarly
                });
            }
            got_any = true;
        }
    }

    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, H1Error> {
        parse_head(&mut self.buf, method, self.upgrade)
    }
}

/// Parses a response head at the start of `buf` (consumed when complete).
fn parse_head(buf: &mut BytesMut, method: &Method, upgrade: bool) -> Result<Option<Head>, H1Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    // uninitialised header slots: zeroing 128 of them cost 4 KiB of memset per response
    let mut raw = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(H1Error::Parse(e.to_string())),
    };
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::Parse(format!("status {code}")))?;
    let http10 = resp.version == Some(0);
    // remember where names and values sit, then slice them out of the frozen head
    // without copying the values
    let base = buf.as_ptr() as usize;
    let count = resp.headers.len();
    let offs: smallvec::SmallVec<[(usize, usize, usize, usize); 32]> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.as_ptr() as usize - base,
                h.name.len(),
                h.value.as_ptr() as usize - base,
                h.value.len(),
            )
        })
        .collect();
    let head_bytes = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let mut content_length: Option<u64> = None;
    // Transfer-Encoding seen, and whether its final coding is chunked
    let mut te: Option<bool> = None;
    let mut conn_close = http10;
    for &(ns, nl, vs, vl) in &offs[..count] {
        let raw_name = &head_bytes[ns..ns + nl];
        let name = HeaderName::from_bytes(raw_name).map_err(|_| {
            H1Error::Parse(format!(
                "header name {:?}",
                String::from_utf8_lossy(raw_name)
            ))
        })?;
        let value = HeaderValue::from_maybe_shared(head_bytes.slice(vs..vs + vl))
            .map_err(|_| H1Error::Parse(format!("header value of {name}")))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_content_length(value.as_bytes())
                .ok_or_else(|| H1Error::Parse("invalid content-length".into()))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(H1Error::Parse("conflicting content-length".into()));
            }
            content_length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // the codings of every Transfer-Encoding line, in order: the last one counts
            let last = value
                .to_str()
                .ok()
                .and_then(|s| s.rsplit(',').map(str::trim).find(|t| !t.is_empty()));
            te = Some(last.is_some_and(|l| l.eq_ignore_ascii_case("chunked")));
        } else if name == header::CONNECTION {
            let v = value.to_str().unwrap_or("");
            if v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")) {
                conn_close = true;
            } else if http10
                && v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            {
                conn_close = false;
            }
        }
        if !is_hop_by_hop(&name) {
            headers.append(name, value);
        } else if upgrade && status == StatusCode::SWITCHING_PROTOCOLS && name == header::UPGRADE {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.append(name, value);
        }
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade {
            // only a request that asked for an upgrade may get one (Upgrade is hop-by-hop)
            return Err(H1Error::Parse("unsolicited 101 Switching Protocols".into()));
        }
        return Ok(Some(Head {
            status,
            headers,
            framing: Framing::Done,
            keep_alive: false,
        }));
    }
    let no_body = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length; a final coding
    // other than chunked means the body runs to the close. Either case is not exact
    // framing, so the connection is not reused.
    let mut exact = true;
    let framing = if no_body {
        Framing::Done
    } else if let Some(final_chunked) = te {
        headers.remove(header::CONTENT_LENGTH);
        if content_length.is_some() {
            exact = false;
        }
        if final_chunked {
            Framing::Chunked(ChunkState::Size)
        } else {
            Framing::Close
        }
    } else if let Some(n) = content_length {
        if n == 0 {
            Framing::Done
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::Close
    };
    let keep_alive = exact && !conn_close && !matches!(framing, Framing::Close);
    Ok(Some(Head {
        status,
        headers,
        framing,
        keep_alive,
    }))
}

/// A response body read straight from the upstream socket.
pub struct H1Body {
    conn: Option<H1Conn>,
    framing: Framing,
    keep_alive: bool,
    release: Option<PoolReturn>,
    read_timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Trailer fields of a chunked body, passed on after the last chunk (boxed: most bodies
    /// have none, and this struct moves with every response).
    trailers: Option<Box<HeaderMap>>,
}

impl H1Body {
    /// The body of `head`, read from `conn`; `release` gets the connection back when the body
    /// ended and the connection can be reused.
    pub fn new(conn: H1Conn, head: &Head, release: PoolReturn, read_timeout: Duration) -> H1Body {
        let mut b = H1Body {
            conn: Some(conn),
            framing: head.framing,
            keep_alive: head.keep_alive,
            release: Some(release),
            read_timeout,
            sleep: None,
            trailers: None,
        };
        if matches!(b.framing, Framing::Done) {
            b.finish();
        }
        b
    }

    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let (Some(conn), Some(rel)) = (self.conn.take(), self.release.take())
            && self.keep_alive
            && conn.buf.is_empty()
        {
            rel.checkin(conn);
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        conn.buf.reserve(READ_CHUNK);
        // `read_buf` is cancellation safe: polling a fresh future once per call loses nothing
        let fut = tokio::io::AsyncReadExt::read_buf(&mut conn.io, &mut conn.buf);
        let mut fut = std::pin::pin!(fut);
        match fut.as_mut().poll(cx) {
            Poll::Ready(Ok(n)) => {
                self.sleep = None;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let t = self.read_timeout;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream read timed out",
                )))
            }
        }
    }
}

use std::future::Future;

impl Body for H1Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(rem) => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if !conn.buf.is_empty() {
                        let take = (conn.buf.len() as u64).min(rem) as usize;
                        let data = conn.buf.split_to(take).freeze();
                        let left = rem - take as u64;
                        if left == 0 {
                            this.finish();
                        } else {
                            this.framing = Framing::Length(left);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let n = ready!(this.poll_fill(cx))?;
                    if n == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(
                            "upstream closed the connection mid-body".into()
                        )));
                    }
                }
                Framing::Close => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let n = ready!(this.poll_fill(cx))?;
                    if n == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                }
                Framing::Chunked(state) => {
                    let Some(conn) = this.conn.as_mut() else {
                        return Poll::Ready(None);
                    };
                    match step_chunked(&mut conn.buf, state, Some(&mut this.trailers))? {
                        Step::Data(data, next) => {
                            this.framing = Framing::Chunked(next);
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Step::Next(next) => this.framing = Framing::Chunked(next),
                        Step::End => {
                            this.finish();
                            if let Some(t) = this.trailers.take() {
                                return Poll::Ready(Some(Ok(Frame::trailers(*t))));
                            }
                            return Poll::Ready(None);
                        }
                        Step::NeedMore => {
                            let n = ready!(this.poll_fill(cx))?;
                            if n == 0 {
                                this.conn = None;
                                this.framing = Framing::Done;
                                return Poll::Ready(Some(Err(
                                    "upstream closed the connection mid-chunk".into(),
                                )));
                            }
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Fuzzing entry point (`fuzz/`): parses `data` as an upstream response to `GET` (or `HEAD`
/// when the first byte is odd), then decodes a chunked body that follows. Never panics.
#[doc(hidden)]
pub fn fuzz_response(data: &[u8]) {
    let method = if data.first().is_some_and(|b| b & 1 == 1) {
        Method::HEAD
    } else {
        Method::GET
    };
    let mut buf = BytesMut::from(data.get(1..).unwrap_or_default());
    let Ok(Some(head)) = parse_head(&mut buf, &method, false) else {
        return;
    };
    if let Framing::Chunked(mut state) = head.framing {
        // at most one step per input byte and a few more: the decoder always progresses
        for _ in 0..=data.len() + 4 {
            match step_chunked(&mut buf, state, None) {
                Ok(Step::Data(_, n) | Step::Next(n)) => state = n,
                Ok(Step::End | Step::NeedMore) | Err(_) => return,
            }
        }
    }
}

/// A `Content-Length` value: digits only (no sign, no spaces inside), or a list of equal
/// values (`42, 42`), as RFC 9110 section 8.6 lets a recipient accept.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for part in v.split(|&b| b == b',') {
        let t = part.trim_ascii();
        if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = std::str::from_utf8(t).ok()?.parse::<u64>().ok()?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// A chunked body that breaks RFC 9112 section 7.1.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("invalid chunked framing")]
pub struct InvalidChunked;

/// Follows a chunked body fed in pieces, without keeping its data ([`crate::sniff`]).
#[derive(Debug)]
pub struct ChunkScan {
    buf: BytesMut,
    state: ChunkState,
}

impl Default for ChunkScan {
    fn default() -> Self {
        ChunkScan {
            buf: BytesMut::new(),
            state: ChunkState::Size,
        }
    }
}

impl ChunkScan {
    /// Feeds the next bytes: `Ok(Some(n))` when the body ended after the first `n` of them,
    /// `Ok(None)` when it goes on, `Err` when it is not valid chunked framing.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, InvalidChunked> {
        self.buf.extend_from_slice(data);
        loop {
            match step_chunked(&mut self.buf, self.state, None).map_err(|_| InvalidChunked)? {
                Step::Data(_, next) | Step::Next(next) => self.state = next,
                Step::NeedMore => return Ok(None),
                Step::End => return Ok(Some(data.len() - self.buf.len())),
            }
        }
    }
}

enum Step {
    Data(Bytes, ChunkState),
    Next(ChunkState),
    End,
    NeedMore,
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Trailer fields never passed on besides hop-by-hop ones ([`is_hop_by_hop`]): framing,
/// routing and fields a recipient must not take from a trailer section (RFC 9110 section
/// 6.5.1).
const TRAILER_DENY: &[&str] = &[
    "content-length",
    "trailer",
    "host",
    "content-type",
    "content-encoding",
    "content-range",
    "set-cookie",
    "authorization",
    "proxy-authorization",
    "cache-control",
    "expect",
];

/// Whether a field may be passed on as a trailer: not hop-by-hop, not in [`TRAILER_DENY`].
fn trailer_allowed(name: &HeaderName) -> bool {
    !is_hop_by_hop(name) && !TRAILER_DENY.contains(&name.as_str())
}

/// Whether a client's trailer field may go upstream: a field any trailer may be, and not a
/// field that only the gateway sets in request headers (identity and forwarding headers): an
/// upstream that merges trailers into headers must not take those from a client.
pub fn request_trailer_allowed(name: &HeaderName) -> bool {
    let n = name.as_str();
    trailer_allowed(name)
        && !crate::handler::IDENTITY_HEADERS.contains(&n)
        && !n.starts_with("x-forwarded-")
        && n != "x-real-ip"
        && n != "forwarded"
}

/// Adds one trailer field line to `t` when it is a valid field that may be a trailer (others
/// are dropped, as nginx drops every trailer); at most [`MAX_HEADERS`] fields.
fn keep_trailer(t: &mut Option<Box<HeaderMap>>, line: &[u8]) {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return;
    };
    let value = line[colon + 1..].trim_ascii();
    let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(&line[..colon]),
        HeaderValue::from_bytes(value),
    ) else {
        return;
    };
    let t = t.get_or_insert_with(Default::default);
    if t.len() < MAX_HEADERS && trailer_allowed(&name) {
        t.append(name, value);
    }
}

fn step_chunked(
    buf: &mut BytesMut,
    state: ChunkState,
    trailers: Option<&mut Option<Box<HeaderMap>>>,
) -> Result<Step, Box<dyn std::error::Error + Send + Sync>> {
    match state {
        ChunkState::Size => {
            let Some(end) = find_crlf(buf) else {
                if buf.len() > 1024 {
                    return Err("chunk size line too long".into());
                }
                return Ok(Step::NeedMore);
            };
            let line = buf.split_to(end + 2);
            let text = std::str::from_utf8(&line[..end]).map_err(|_| "invalid chunk size")?;
            let hex = text
                .split(';')
                .next()
                .unwrap_or("")
                .trim_end_matches([' ', '\t']);
            if hex.is_empty() || hex.len() > 15 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("invalid chunk size {hex:?}").into());
            }
            let size =
                u64::from_str_radix(hex, 16).map_err(|_| format!("invalid chunk size {hex:?}"))?;
            Ok(Step::Next(if size == 0 {
                ChunkState::Trailers
            } else {
                ChunkState::Data(size)
            }))
        }
        ChunkState::Data(rem) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = (buf.len() as u64).min(rem) as usize;
            let data = buf.split_to(take).freeze();
            let left = rem - take as u64;
            Ok(Step::Data(
                data,
                if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                },
            ))
        }
        ChunkState::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("missing CRLF after chunk".into());
            }
            buf.advance(2);
            Ok(Step::Next(ChunkState::Size))
        }
        ChunkState::Trailers => {
            let Some(end) = find_crlf(buf) else {
                if buf.len() > MAX_HEAD {
                    return Err("trailer line too long".into());
                }
                return Ok(Step::NeedMore);
            };
            let line = buf.split_to(end + 2);
            if end == 0 {
                return Ok(Step::End);
            }
            if let Some(t) = trailers {
                keep_trailer(t, &line[..end]);
            }
            Ok(Step::Next(ChunkState::Trailers))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a response head turns into: `Err` (502), or the framing and whether the
    /// connection may be reused. Cases after RFC 9112 section 6.3 and the response cases of
    /// hyper's decoder tests, in polygate's terms.
    #[test]
    fn response_framing_table() {
        #[derive(Debug, PartialEq)]
        enum F {
            Len(u64),
            Chunked,
            Close,
            Done,
        }
        type Case = (&'static str, &'static [u8], Method, Result<(F, bool), ()>);
        let cases: &[Case] = &[
            (
                "length",
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Method::GET,
                Ok((F::Len(5), true)),
            ),
            (
                "zero length",
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Method::GET,
                Ok((F::Done, true)),
            ),
            (
                "chunked",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                Method::GET,
                Ok((F::Chunked, true)),
            ),
            (
                "chunked upper case",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
                Method::GET,
                Ok((F::Chunked, true)),
            ),
            (
                "gzip, chunked",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                Method::GET,
                Ok((F::Chunked, true)),
            ),
            (
                "chunked, gzip: to the close",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                Method::GET,
                Ok((F::Close, false)),
            ),
            (
                "gzip only: to the close",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                Method::GET,
                Ok((F::Close, false)),
            ),
            (
                "two TE lines, last chunked",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
                Method::GET,
                Ok((F::Chunked, true)),
            ),
            (
                "TE and CL: chunked, not reused",
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n",
                Method::GET,
                Ok((F::Chunked, false)),
            ),
            (
                "CL and TE gzip",
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: gzip\r\n\r\n",
                Method::GET,
                Ok((F::Close, false)),
            ),
            (
                "no framing: to the close",
                b"HTTP/1.1 200 OK\r\n\r\n",
                Method::GET,
                Ok((F::Close, false)),
            ),
            (
                "equal duplicate CL",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n",
                Method::GET,
                Ok((F::Len(3), true)),
            ),
            (
                "CL list of equal values",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n",
                Method::GET,
                Ok((F::Len(3), true)),
            ),
            (
                "differing CL",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "CL list differing",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "signed CL +",
                b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "signed CL -",
                b"HTTP/1.1 200 OK\r\ncontent-length: -3\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "CL not a number",
                b"HTTP/1.1 200 OK\r\ncontent-length: 3a\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "CL overflow",
                b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "empty CL",
                b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "HEAD with CL",
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Method::HEAD,
                Ok((F::Done, true)),
            ),
            (
                "204 with CL",
                b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
                Method::GET,
                Ok((F::Done, true)),
            ),
            (
                "304 with chunked",
                b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
                Method::GET,
                Ok((F::Done, true)),
            ),
            (
                "connection close",
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n",
                Method::GET,
                Ok((F::Len(1), false)),
            ),
            (
                "HTTP/1.0 default close",
                b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                Method::GET,
                Ok((F::Len(1), false)),
            ),
            (
                "HTTP/1.0 keep-alive",
                b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
                Method::GET,
                Ok((F::Len(1), true)),
            ),
            (
                "unsolicited 101",
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "obs-fold",
                b"HTTP/1.1 200 OK\r\nx-a: b\r\n c\r\ncontent-length: 0\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "space before colon",
                b"HTTP/1.1 200 OK\r\nx-a : b\r\ncontent-length: 0\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            (
                "bad status",
                b"HTTP/1.1 2000 OK\r\n\r\n",
                Method::GET,
                Err(()),
            ),
            ("not http", b"SSH-2.0-OpenSSH\r\n\r\n", Method::GET, Err(())),
            (
                "NUL in value",
                b"HTTP/1.1 200 OK\r\nx-a: b\0c\r\ncontent-length: 0\r\n\r\n",
                Method::GET,
                Err(()),
            ),
        ];
        for (name, raw, method, want) in cases {
            let mut buf = BytesMut::from(*raw);
            let got = match parse_head(&mut buf, method, false) {
                Ok(Some(h)) => Ok((
                    match h.framing {
                        Framing::Length(n) => F::Len(n),
                        Framing::Chunked(_) => F::Chunked,
                        Framing::Close => F::Close,
                        Framing::Done => F::Done,
                    },
                    h.keep_alive,
                )),
                Ok(None) => panic!("{name}: incomplete"),
                Err(_) => Err(()),
            };
            assert_eq!(&got, want, "{name}");
        }
    }

    /// The chunked decoder refuses what RFC 9112 section 7.1 does not allow.
    #[test]
    fn chunked_decoder_table() {
        let run = |input: &[u8]| -> Result<Vec<u8>, ()> {
            let mut buf = BytesMut::from(input);
            let mut state = ChunkState::Size;
            let mut out = Vec::new();
            loop {
                match step_chunked(&mut buf, state, None) {
                    Ok(Step::Data(d, n)) => {
                        out.extend_from_slice(&d);
                        state = n;
                    }
                    Ok(Step::Next(n)) => state = n,
                    Ok(Step::End) => return Ok(out),
                    Ok(Step::NeedMore) | Err(_) => return Err(()),
                }
            }
        };
        assert_eq!(run(b"3\r\nabc\r\n0\r\n\r\n"), Ok(b"abc".to_vec()));
        assert_eq!(run(b"3 \r\nabc\r\n0\r\n\r\n"), Ok(b"abc".to_vec()), "BWS");
        assert_eq!(
            run(b"A\r\n0123456789\r\n0\r\n\r\n"),
            Ok(b"0123456789".to_vec())
        );
        assert_eq!(run(b"3;a=b;c\r\nabc\r\n0\r\n\r\n"), Ok(b"abc".to_vec()));
        for bad in [
            &b"+3\r\nabc\r\n0\r\n\r\n"[..],
            b"-3\r\nabc\r\n0\r\n\r\n",
            b"0x3\r\nabc\r\n0\r\n\r\n",
            b"zz\r\n",
            b"\r\nabc\r\n",
            b"ffffffffffffffff\r\n",
            b"3\r\nabcd\r\n0\r\n\r\n",
            b"3\r\nabc0\r\n\r\n",
        ] {
            assert_eq!(run(bad), Err(()), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunked_decoding() {
        let mut buf =
            BytesMut::from(&b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n"[..]);
        let mut state = ChunkState::Size;
        let mut out = Vec::new();
        loop {
            match step_chunked(&mut buf, state, None).unwrap() {
                Step::Data(d, n) => {
                    out.extend_from_slice(&d);
                    state = n;
                }
                Step::Next(n) => state = n,
                Step::End => break,
                Step::NeedMore => panic!("complete input"),
            }
        }
        assert_eq!(out, b"hello world");
        assert!(buf.is_empty());
    }
}
