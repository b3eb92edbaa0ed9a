//! What a filter instance's store holds: the contexts the guest knows, the request it is
//! looking at during a callback, and the side effects its hostcalls asked for, which the
//! driver carries out after the callback returns (never from inside a hostcall).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use polygate_core::callout::{CalloutError, CalloutRequest, CalloutResponse};
use polygate_core::{RequestCtx, ResponseHead};
use wasmtime::{Memory, StoreLimits, TypedFunc};

use crate::plugin::PluginDef;

/// A hasher for the small integer keys of the per-request maps (context ids, plugin ids): a
/// multiplicative hash, much cheaper than SipHash; the keys are ours, not a client's.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map keyed by ids, hashed with [`IdHasher`].
pub type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// A root context (one per plugin configuration, per instance).
pub struct RootData {
    /// The plugin configuration (`PLUGIN_CONFIGURATION`).
    pub conf: Bytes,
    /// Tick period asked with `proxy_set_tick_period_milliseconds` (0: none).
    pub tick_ms: u32,
}

/// A reply the guest asked for with `proxy_send_local_response`.
#[derive(Debug, Clone)]
pub struct LocalReply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// An HTTP stream context.
#[derive(Default)]
pub struct StreamData {
    /// Its root context.
    pub root: u32,
    /// Properties the guest set (`proxy_set_property`).
    pub props: HashMap<Vec<u8>, Vec<u8>>,
    /// `proxy_continue_stream` was called for the request (0) or response (1) side.
    pub continued: [bool; 2],
    /// `proxy_send_local_response`.
    pub local: Option<LocalReply>,
    /// `proxy_close_stream`.
    pub closed: bool,
    /// A response body held back by a paused `proxy_on_response_body`.
    pub resp_body: Vec<u8>,
    /// The response body callbacks are over (the last chunk went through, or buffering
    /// overflowed).
    pub resp_body_done: bool,
    /// A streamed request body held back by a paused `proxy_on_request_body`.
    pub req_body: Vec<u8>,
    /// `proxy_on_done` answered false: log and delete wait for `proxy_done()`.
    pub awaiting_done: bool,
    /// The filter called `proxy_done()` for this stream.
    pub done_requested: bool,
}

impl StreamData {
    /// The body held back on one side (0 request, 1 response).
    pub fn held(&mut self, side: usize) -> &mut Vec<u8> {
        if side == 1 {
            &mut self.resp_body
        } else {
            &mut self.req_body
        }
    }
}

/// A callout the guest started during a callback.
pub struct PendingCall {
    /// Its token.
    pub token: u32,
    /// The root context the answer goes to.
    pub root: u32,
    /// The request.
    pub req: CalloutRequest,
}

/// A finished callout, readable during `proxy_on_http_call_response`.
pub type CallResult = Result<CalloutResponse, CalloutError>;

/// The request being processed during a callback. Raw pointers because the request lives
/// in the gateway's handler while the callback runs inside wasmtime's store; they are set
/// by [`crate::vm::Vm`] just before a guest call and cleared right after it (see
/// [`View::req`]).
pub struct View {
    req: *mut RequestCtx,
    /// `req` came from a shared borrow (the log phase): never written through.
    read_only: bool,
    resp: *mut ResponseHead,
    /// Trailer fields of the current trailers callback, and their map type.
    trailers: *mut HeaderMap,
    trailers_map: i32,
}

impl Default for View {
    fn default() -> Self {
        View {
            req: std::ptr::null_mut(),
            read_only: true,
            resp: std::ptr::null_mut(),
            trailers: std::ptr::null_mut(),
            trailers_map: -1,
        }
    }
}

impl View {
    /// A writable view of `req` (and `resp`) for one guest call.
    pub fn of(req: &mut RequestCtx, resp: Option<&mut ResponseHead>) -> View {
        View {
            req: req as *mut _,
            read_only: false,
            resp: resp.map_or(std::ptr::null_mut(), |r| r as *mut _),
            ..View::default()
        }
    }

    /// A read-only view of `req` (the log phase).
    pub fn read_only(req: &RequestCtx) -> View {
        View {
            req: req as *const RequestCtx as *mut RequestCtx,
            read_only: true,
            ..View::default()
        }
    }

    /// This view with trailer fields as map `map_type` (request or response trailers).
    pub fn with_trailers(mut self, map_type: i32, t: &mut HeaderMap) -> View {
        self.trailers = t as *mut _;
        self.trailers_map = map_type;
        self
    }

    /// The trailer fields, when the current callback has those of `map_type`.
    #[allow(unsafe_code)]
    pub fn trailers(&mut self, map_type: i32) -> Option<&mut HeaderMap> {
        if map_type != self.trailers_map {
            return None;
        }
        // SAFETY: as for `req_mut`: made by `with_trailers` from an exclusive borrow held
        // across the guest call and cleared before it ends.
        unsafe { self.trailers.as_mut() }
    }

    /// The request, if the current callback has one.
    #[allow(unsafe_code)]
    pub fn req(&self) -> Option<&RequestCtx> {
        // SAFETY: `req` is null or was made by `View::of`/`View::read_only` from a borrow
        // that the caller of `Vm::with_view` holds for the whole guest call; the view is
        // replaced by an empty one before that borrow ends, and hostcalls run on the same
        // thread inside that call, one at a time.
        unsafe { self.req.as_ref() }
    }

    /// The request for changes; `None` without a request or in a read-only view.
    #[allow(unsafe_code)]
    pub fn req_mut(&mut self) -> Option<&mut RequestCtx> {
        if self.read_only {
            return None;
        }
        // SAFETY: not read-only, so `req` was made by `View::of` from a `&mut RequestCtx`
        // held exclusively across the guest call (see `req`); no other reference to it is
        // used while the guest runs.
        unsafe { self.req.as_mut() }
    }

    /// The response head, if the current callback has one.
    #[allow(unsafe_code)]
    pub fn resp(&mut self) -> Option<&mut ResponseHead> {
        // SAFETY: as for `req_mut`: made from an exclusive borrow held across the guest call
        // and cleared before it ends.
        unsafe { self.resp.as_mut() }
    }
}

/// The store's data.
pub struct HostState {
    /// Memory caps.
    pub limits: StoreLimits,
    /// The plugin.
    pub def: Arc<PluginDef>,
    /// The guest's memory.
    pub memory: Option<Memory>,
    /// The guest's allocator (`proxy_on_memory_allocate` or `malloc`).
    pub alloc: Option<TypedFunc<i32, i32>>,
    /// Context whose callback runs.
    pub current: u32,
    /// Context hostcalls apply to (`proxy_set_effective_context`).
    pub effective: u32,
    /// The request of the current callback.
    pub view: View,
    /// The body buffer of the current body callback (buffer type, bytes).
    pub body: Option<(i32, Vec<u8>)>,
    /// The configuration buffer of `proxy_on_vm_start` / `proxy_on_configure`.
    pub config: Option<(i32, Bytes)>,
    /// The callout answer of `proxy_on_http_call_response`.
    pub call: Option<Arc<CallResult>>,
    /// Root contexts.
    pub roots: IdMap<u32, RootData>,
    /// Stream contexts.
    pub streams: IdMap<u32, StreamData>,
    /// Next context id (roots and streams share it; never reused).
    pub next_id: u32,
    /// Next callout token.
    pub next_token: u32,
    /// Callouts started during the current callback.
    pub calls: Vec<PendingCall>,
    /// Queues registered during the current callback: (queue id, root).
    pub queues: Vec<(u32, u32)>,
    /// Start-up functions are running: only logging and WASI basics are allowed.
    pub starting: bool,
    /// Streams waiting for `proxy_done()`, oldest first.
    pub awaiting_done: std::collections::VecDeque<u32>,
}

impl HostState {
    /// A fresh state for `def`.
    pub fn new(def: Arc<PluginDef>, limits: StoreLimits) -> HostState {
        HostState {
            limits,
            def,
            memory: None,
            alloc: None,
            current: 0,
            effective: 0,
            view: View::default(),
            body: None,
            config: None,
            call: None,
            roots: IdMap::default(),
            streams: IdMap::default(),
            next_id: 1,
            next_token: 1,
            calls: Vec::new(),
            queues: Vec::new(),
            starting: false,
            awaiting_done: std::collections::VecDeque::new(),
        }
    }

    /// The stream context hostcalls apply to, if the effective context is a stream.
    pub fn target_stream(&mut self) -> Option<&mut StreamData> {
        let id = self.effective;
        self.streams.get_mut(&id)
    }

    /// The root context of the effective context.
    pub fn effective_root(&self) -> u32 {
        if self.roots.contains_key(&self.effective) {
            self.effective
        } else {
            self.streams.get(&self.effective).map_or(0, |s| s.root)
        }
    }
}
