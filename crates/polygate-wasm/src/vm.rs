//! One filter instance per (plugin, worker thread), as Envoy keeps one VM per worker: its
//! store, its exports, its root contexts, the tick and queue tasks that call into it, and the
//! rebuild after a trap.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use polygate_core::{RequestCtx, ResponseHead};
use wasmtime::{Store, StoreLimitsBuilder, TypedFunc, WasmParams, WasmResults};

use crate::abi::{AbiVersion, buffer};
use crate::error::VmError;
use crate::plugin::PluginDef;
use crate::state::{CallResult, HostState, IdMap, PendingCall, RootData, StreamData, View};

/// Work for a thread's dispatcher task.
#[derive(Debug)]
pub enum Event {
    /// A queue owned by a root context of this thread got an item.
    QueueReady {
        /// Plugin definition id.
        def: u64,
        /// Root context.
        root: u32,
        /// Queue id.
        queue: u32,
    },
}

type F1 = TypedFunc<i32, ()>;
type F1R = TypedFunc<i32, i32>;
type F2 = TypedFunc<(i32, i32), ()>;
type F2R = TypedFunc<(i32, i32), i32>;
type F3R = TypedFunc<(i32, i32, i32), i32>;
type F5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The exports a host calls, looked up once per instance.
#[derive(Default)]
struct Callbacks {
    context_create: Option<F2>,
    vm_start: Option<F2R>,
    configure: Option<F2R>,
    tick: Option<F1>,
    queue_ready: Option<F2>,
    request_headers: Option<F3R>,
    request_headers_01: Option<F2R>,
    response_headers: Option<F3R>,
    response_headers_01: Option<F2R>,
    request_body: Option<F3R>,
    response_body: Option<F3R>,
    request_trailers: Option<F2R>,
    response_trailers: Option<F2R>,
    http_call_response: Option<F5>,
    done: Option<F1R>,
    log: Option<F1>,
    delete: Option<F1>,
}

/// The signature each known export must have (params, results), checked at load.
pub const EXPORT_TYPES: &[(&str, usize, usize)] = &[
    ("proxy_on_memory_allocate", 1, 1),
    ("malloc", 1, 1),
    ("_initialize", 0, 0),
    ("_start", 0, 0),
    ("proxy_on_context_create", 2, 0),
    ("proxy_on_vm_start", 2, 1),
    ("proxy_on_configure", 2, 1),
    ("proxy_on_tick", 1, 0),
    ("proxy_on_queue_ready", 2, 0),
    ("proxy_on_request_body", 3, 1),
    ("proxy_on_response_body", 3, 1),
    ("proxy_on_request_trailers", 2, 1),
    ("proxy_on_response_trailers", 2, 1),
    ("proxy_on_http_call_response", 5, 0),
    ("proxy_on_done", 1, 1),
    ("proxy_on_log", 1, 0),
    ("proxy_on_delete", 1, 0),
];

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Streams one instance keeps waiting for `proxy_done()` at most.
pub const MAX_AWAITING_DONE: usize = 1024;

/// A filter instance.
pub struct Vm {
    store: Store<HostState>,
    cb: Callbacks,
    /// Unique per instance (a rebuilt instance gets a new one).
    pub generation: u64,
    /// Root contexts by plugin instance: (root id, liveness of the instance).
    roots_by_plugin: IdMap<u64, (u32, Weak<()>)>,
    ticking: HashSet<u32>,
    deadline: u64,
}

fn trap(e: wasmtime::Error) -> VmError {
    if let Some(t) = e.downcast_ref::<wasmtime::Trap>()
        && *t == wasmtime::Trap::Interrupt
    {
        return VmError::Trap("CPU time limit reached (interrupted)".into());
    }
    VmError::Trap(format!("{e:#}"))
}

impl Vm {
    /// Instantiates `def` and runs its start-up functions.
    pub fn new(def: &Arc<PluginDef>) -> Result<Vm, VmError> {
        let engine = def.module.module.engine();
        let limits = StoreLimitsBuilder::new()
            .memory_size(def.memory_limit)
            .instances(1)
            .memories(1)
            .tables(2)
            .table_elements(100_000)
            .build();
        let mut store = Store::new(engine, HostState::new(def.clone(), limits));
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        let deadline = def.time_ticks;
        store.set_epoch_deadline(deadline);
        store.data_mut().starting = true;
        let start = |e: wasmtime::Error| VmError::Start(format!("{e:#}"));
        let inst = def.pre.instantiate(&mut store).map_err(start)?;
        let memory = inst
            .get_memory(&mut store, "memory")
            .ok_or_else(|| VmError::Start("no memory export".into()))?;
        store.data_mut().memory = Some(memory);
        let alloc = inst
            .get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| inst.get_typed_func::<i32, i32>(&mut store, "malloc"))
            .ok();
        store.data_mut().alloc = alloc;
        // start-up: `_initialize` (reactors), then `main(0, 0)`, else `_start`
        if let Ok(f) = inst.get_typed_func::<(), ()>(&mut store, "_initialize") {
            store.set_epoch_deadline(deadline);
            f.call(&mut store, ()).map_err(start)?;
        }
        if let Ok(f) = inst.get_typed_func::<(i32, i32), i32>(&mut store, "main") {
            store.set_epoch_deadline(deadline);
            f.call(&mut store, (0, 0)).map_err(start)?;
        } else if let Ok(f) = inst.get_typed_func::<(), ()>(&mut store, "_start") {
            store.set_epoch_deadline(deadline);
            f.call(&mut store, ()).map_err(start)?;
        }
        store.data_mut().starting = false;
        macro_rules! get {
            ($name:literal) => {
                inst.get_typed_func(&mut store, $name).ok()
            };
        }
        let v01 = def.module.abi == AbiVersion::V0_1_0;
        let cb = Callbacks {
            context_create: get!("proxy_on_context_create"),
            vm_start: get!("proxy_on_vm_start"),
            configure: get!("proxy_on_configure"),
            tick: get!("proxy_on_tick"),
            queue_ready: get!("proxy_on_queue_ready"),
            request_headers: if v01 {
                None
            } else {
                get!("proxy_on_request_headers")
            },
            request_headers_01: if v01 {
                get!("proxy_on_request_headers")
            } else {
                None
            },
            response_headers: if v01 {
                None
            } else {
                get!("proxy_on_response_headers")
            },
            response_headers_01: if v01 {
                get!("proxy_on_response_headers")
            } else {
                None
            },
            request_body: get!("proxy_on_request_body"),
            response_body: get!("proxy_on_response_body"),
            request_trailers: get!("proxy_on_request_trailers"),
            response_trailers: get!("proxy_on_response_trailers"),
            http_call_response: get!("proxy_on_http_call_response"),
            done: get!("proxy_on_done"),
            log: get!("proxy_on_log"),
            delete: get!("proxy_on_delete"),
        };
        Ok(Vm {
            store,
            cb,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            roots_by_plugin: IdMap::default(),
            ticking: HashSet::new(),
            deadline,
        })
    }

    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        f: &TypedFunc<P, R>,
        p: P,
    ) -> Result<R, VmError> {
        self.store.set_epoch_deadline(self.deadline);
        f.call(&mut self.store, p).map_err(trap)
    }

    /// Runs `f` with `ctx` as the current and effective context and `view` as the request it
    /// sees; everything the callback could reach is cleared afterwards.
    fn with_view<T>(
        &mut self,
        ctx: u32,
        view: View,
        f: impl FnOnce(&mut Vm) -> Result<T, VmError>,
    ) -> Result<T, VmError> {
        let s = self.store.data_mut();
        s.current = ctx;
        s.effective = ctx;
        s.view = view;
        let r = f(self);
        let s = self.store.data_mut();
        s.view = View::default();
        s.config = None;
        s.call = None;
        r
    }

    /// The state, for the driver's checks between callbacks.
    pub fn state(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    /// The root context of plugin instance `plugin` (configuration `conf`), created (context
    /// create, vm start, configure) on first use. Root contexts of instances no configuration
    /// holds any more, and that no request in flight uses, are ended first (done, delete).
    pub fn root_for(&mut self, plugin: u64, alive: &Arc<()>, conf: &Bytes) -> Result<u32, VmError> {
        if let Some((id, _)) = self.roots_by_plugin.get(&plugin) {
            return Ok(*id);
        }
        self.end_dead_roots()?;
        let s = self.store.data_mut();
        let id = s.next_id;
        s.next_id += 1;
        s.roots.insert(
            id,
            RootData {
                conf: conf.clone(),
                tick_ms: 0,
            },
        );
        let vm_config = s.def.vm_config.clone();
        let r = self.with_view(id, View::default(), |vm| {
            if let Some(f) = vm.cb.context_create.clone() {
                vm.call(&f, (id as i32, 0))?;
            }
            if let Some(f) = vm.cb.vm_start.clone() {
                vm.store.data_mut().config = Some((buffer::VM_CONFIGURATION, vm_config.clone()));
                if vm.call(&f, (id as i32, vm_config.len() as i32))? == 0 {
                    return Err(VmError::Refused("proxy_on_vm_start"));
                }
            }
            if let Some(f) = vm.cb.configure.clone() {
                vm.store.data_mut().config = Some((buffer::PLUGIN_CONFIGURATION, conf.clone()));
                if vm.call(&f, (id as i32, conf.len() as i32))? == 0 {
                    return Err(VmError::Refused("proxy_on_configure"));
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            self.store.data_mut().roots.remove(&id);
            return Err(e);
        }
        self.roots_by_plugin
            .insert(plugin, (id, Arc::downgrade(alive)));
        self.after_root_callback();
        Ok(id)
    }

    /// Ends the root contexts of dropped plugin instances that no stream uses
    /// (`proxy_on_done`, `proxy_on_delete`), as Envoy does when a plugin goes away.
    fn end_dead_roots(&mut self) -> Result<(), VmError> {
        let dead: Vec<(u64, u32)> = self
            .roots_by_plugin
            .iter()
            .filter(|(_, (_, w))| w.strong_count() == 0)
            .map(|(k, (id, _))| (*k, *id))
            .collect();
        for (key, root) in dead {
            if self.store.data().streams.values().any(|s| s.root == root) {
                continue;
            }
            self.roots_by_plugin.remove(&key);
            let (done, delete) = (self.cb.done.clone(), self.cb.delete.clone());
            self.with_view(root, View::default(), |vm| {
                if let Some(f) = &done {
                    vm.call(f, root as i32)?;
                }
                if let Some(f) = &delete {
                    vm.call(f, root as i32)?;
                }
                Ok(())
            })?;
            self.store.data_mut().roots.remove(&root);
            self.ticking.remove(&root);
        }
        Ok(())
    }

    /// Root contexts alive in this instance.
    pub fn roots(&self) -> usize {
        self.store.data().roots.len()
    }

    /// A new HTTP stream context under `root`.
    pub fn create_stream(&mut self, root: u32) -> Result<u32, VmError> {
        let s = self.store.data_mut();
        let id = s.next_id;
        s.next_id += 1;
        s.streams.insert(
            id,
            StreamData {
                root,
                ..StreamData::default()
            },
        );
        if let Some(f) = self.cb.context_create.clone() {
            self.with_view(id, View::default(), |vm| {
                vm.call(&f, (id as i32, root as i32))
            })?;
        }
        Ok(id)
    }

    /// Whether this instance has stream `id`.
    pub fn has_stream(&self, id: u32) -> bool {
        self.store.data().streams.contains_key(&id)
    }

    /// `proxy_on_request_headers`: the action (0 continue, else pause).
    pub fn request_headers(
        &mut self,
        id: u32,
        req: &mut RequestCtx,
        eos: bool,
    ) -> Result<i32, VmError> {
        let n = (req.headers.len() + 4) as i32;
        let (f3, f2) = (
            self.cb.request_headers.clone(),
            self.cb.request_headers_01.clone(),
        );
        self.with_view(id, View::of(req, None), |vm| match (f3, f2) {
            (Some(f), _) => vm.call(&f, (id as i32, n, i32::from(eos))),
            (None, Some(f)) => vm.call(&f, (id as i32, n)),
            _ => Ok(0),
        })
    }

    /// `proxy_on_request_body` with the whole buffered body (`end_of_stream` set); the body
    /// as the filter left it replaces `req.body`.
    pub fn request_body(&mut self, id: u32, req: &mut RequestCtx) -> Result<i32, VmError> {
        let body = req.body.take().unwrap_or_default();
        match self.body(id, 0, Some(&mut *req), body.to_vec(), true) {
            Ok((action, out)) => {
                req.body = Some(Bytes::from(out));
                Ok(action)
            }
            Err(e) => {
                req.body = Some(body);
                Err(e)
            }
        }
    }

    /// `proxy_on_response_headers`.
    pub fn response_headers(
        &mut self,
        id: u32,
        req: &mut RequestCtx,
        resp: &mut ResponseHead,
        eos: bool,
    ) -> Result<i32, VmError> {
        let n = (resp.headers.len() + 1) as i32;
        let (f3, f2) = (
            self.cb.response_headers.clone(),
            self.cb.response_headers_01.clone(),
        );
        self.with_view(id, View::of(req, Some(resp)), |vm| match (f3, f2) {
            (Some(f), _) => vm.call(&f, (id as i32, n, i32::from(eos))),
            (None, Some(f)) => vm.call(&f, (id as i32, n)),
            _ => Ok(0),
        })
    }

    /// `proxy_on_response_body` (side 1) or `proxy_on_request_body` (side 0) over `body`
    /// (the chunks held back so far plus this one), with `req` in view when there is one;
    /// returns the action and the body as the filter left it.
    pub fn body(
        &mut self,
        id: u32,
        side: usize,
        req: Option<&mut RequestCtx>,
        body: Vec<u8>,
        eof: bool,
    ) -> Result<(i32, Vec<u8>), VmError> {
        let (f, t) = if side == 1 {
            (self.cb.response_body.clone(), buffer::HTTP_RESPONSE_BODY)
        } else {
            (self.cb.request_body.clone(), buffer::HTTP_REQUEST_BODY)
        };
        let Some(f) = f else {
            return Ok((0, body));
        };
        let len = body.len() as i32;
        self.store.data_mut().body = Some((t, body));
        let view = match req {
            Some(r) => View::of(r, None),
            None => View::default(),
        };
        let r = self.with_view(id, view, |vm| vm.call(&f, (id as i32, len, i32::from(eof))));
        let out = self
            .store
            .data_mut()
            .body
            .take()
            .map(|(_, b)| b)
            .unwrap_or_default();
        r.map(|a| (a, out))
    }

    /// `proxy_on_request_trailers` (side 0) or `proxy_on_response_trailers` (side 1) with
    /// `trailers` as the trailer map (and `req` in view when there is one); returns the action.
    pub fn trailers(
        &mut self,
        id: u32,
        side: usize,
        req: Option<&mut RequestCtx>,
        trailers: &mut http::HeaderMap,
    ) -> Result<i32, VmError> {
        let (f, map_type) = if side == 1 {
            (
                self.cb.response_trailers.clone(),
                crate::abi::map::HTTP_RESPONSE_TRAILERS,
            )
        } else {
            (
                self.cb.request_trailers.clone(),
                crate::abi::map::HTTP_REQUEST_TRAILERS,
            )
        };
        let Some(f) = f else {
            return Ok(0);
        };
        let n = trailers.len() as i32;
        let view = match req {
            Some(r) => View::of(r, None),
            None => View::default(),
        }
        .with_trailers(map_type, trailers);
        self.with_view(id, view, |vm| vm.call(&f, (id as i32, n)))
    }

    /// `proxy_on_http_call_response` on `root` for `token`, with the request of the stream
    /// that waits for it (if any) in view. A failed call is reported as `(token, 0, 0, 0)`.
    /// `driven`: a stream's driver waits for this answer and takes the callouts it starts;
    /// otherwise they run on their own.
    pub fn deliver(
        &mut self,
        root: u32,
        token: u32,
        result: CallResult,
        req: Option<&mut RequestCtx>,
        resp: Option<&mut ResponseHead>,
        driven: bool,
    ) -> Result<(), VmError> {
        let Some(f) = self.cb.http_call_response.clone() else {
            return Ok(());
        };
        let (nh, bs, nt) = match &result {
            Ok(r) => (
                r.headers.len() as i32 + 1,
                r.body.len() as i32,
                r.trailers.len() as i32,
            ),
            Err(_) => (0, 0, 0),
        };
        let view = match req {
            Some(r) => View::of(r, resp),
            None => View::default(),
        };
        self.with_view(root, view, |vm| {
            vm.store.data_mut().call = Some(Arc::new(result));
            vm.call(&f, (root as i32, token as i32, nh, bs, nt))
        })?;
        // a stream's driver takes the callouts this answer started; others run on their own
        if driven {
            self.after_root_callback_keep_calls();
        } else {
            self.after_root_callback();
        }
        Ok(())
    }

    /// The end of a stream: `proxy_on_done`, then `proxy_on_log` and `proxy_on_delete`; when
    /// done answers false, log and delete wait until the filter calls `proxy_done()` (from a
    /// later callback), as in Envoy. At most [`MAX_AWAITING_DONE`] streams wait per instance:
    /// past it the oldest is ended at once.
    pub fn finish_stream(&mut self, id: u32, req: &RequestCtx) -> Result<(), VmError> {
        if !self.has_stream(id) {
            return Ok(());
        }
        let done = self.cb.done.clone();
        let completed = self.with_view(id, View::read_only(req), |vm| match &done {
            Some(f) => Ok(vm.call(f, id as i32)? != 0),
            None => Ok(true),
        })?;
        // callouts started by proxy_on_done (a log shipped before the stream ends, say)
        self.spawn_pending();
        let requested = self
            .store
            .data()
            .streams
            .get(&id)
            .is_some_and(|st| st.done_requested);
        if completed || requested {
            return self.end_stream(id, View::read_only(req));
        }
        let s = self.store.data_mut();
        if let Some(st) = s.streams.get_mut(&id) {
            st.awaiting_done = true;
        }
        s.awaiting_done.push_back(id);
        if s.awaiting_done.len() > MAX_AWAITING_DONE
            && let Some(oldest) = s.awaiting_done.pop_front()
        {
            tracing::warn!(wasm = %s.def.name, "too many streams waiting for proxy_done: ending the oldest");
            self.end_stream(oldest, View::default())?;
        }
        Ok(())
    }

    /// `proxy_on_log` and `proxy_on_delete`, then the stream is gone.
    fn end_stream(&mut self, id: u32, view: View) -> Result<(), VmError> {
        let (log, delete) = (self.cb.log.clone(), self.cb.delete.clone());
        let r = self.with_view(id, view, |vm| {
            if let Some(f) = &log {
                vm.call(f, id as i32)?;
            }
            if let Some(f) = &delete {
                vm.call(f, id as i32)?;
            }
            Ok(())
        });
        let s = self.store.data_mut();
        s.streams.remove(&id);
        s.awaiting_done.retain(|x| *x != id);
        r
    }

    /// Ends the streams whose `proxy_done()` came after their `proxy_on_done` answered false.
    fn end_done_streams(&mut self) -> Result<(), VmError> {
        let ready: Vec<u32> = self
            .store
            .data()
            .awaiting_done
            .iter()
            .copied()
            .filter(|id| {
                self.store
                    .data()
                    .streams
                    .get(id)
                    .is_some_and(|st| st.done_requested)
            })
            .collect();
        for id in ready {
            self.end_stream(id, View::default())?;
        }
        Ok(())
    }

    /// Drops a stream without calling the guest (its request ended before any callback).
    pub fn forget_stream(&mut self, id: u32) {
        self.store.data_mut().streams.remove(&id);
    }

    /// Takes the callouts started since the last call.
    pub fn take_calls(&mut self) -> Vec<PendingCall> {
        std::mem::take(&mut self.store.data_mut().calls)
    }

    fn tick(&mut self, root: u32) -> Result<(), VmError> {
        if let Some(f) = self.cb.tick.clone() {
            self.with_view(root, View::default(), |vm| vm.call(&f, root as i32))?;
        }
        self.after_root_callback();
        Ok(())
    }

    fn queue_ready(&mut self, root: u32, queue: u32) -> Result<(), VmError> {
        if let Some(f) = self.cb.queue_ready.clone() {
            self.with_view(root, View::default(), |vm| {
                vm.call(&f, (root as i32, queue as i32))
            })?;
        }
        self.after_root_callback();
        Ok(())
    }

    /// After a callback outside a stream's driver: queues registered get this thread as
    /// owner, tick periods start their task, callouts run on their own.
    fn after_root_callback(&mut self) {
        self.after_root_callback_keep_calls();
        self.spawn_pending();
    }

    /// Runs `calls` on their own (no stream waits for them).
    pub fn spawn_calls(&mut self, calls: Vec<PendingCall>) {
        self.state().calls.extend(calls);
        self.spawn_pending();
    }

    /// Runs the callouts started since the last call on their own (no stream waits).
    pub fn spawn_pending(&mut self) {
        let def = self.store.data().def.id;
        let calls = self.take_calls();
        spawn_calls(def, self.generation, calls);
    }

    fn after_root_callback_keep_calls(&mut self) {
        if !self.store.data().awaiting_done.is_empty()
            && let Err(e) = self.end_done_streams()
        {
            tracing::error!(wasm = %self.store.data().def.name, "ending a stream: {e}");
        }
        let def = self.store.data().def.clone();
        let queues = std::mem::take(&mut self.store.data_mut().queues);
        if !queues.is_empty()
            && let Some(tx) = dispatcher()
        {
            for (id, root) in queues {
                crate::shared::set_queue_owner(
                    id,
                    crate::shared::QueueOwner {
                        tx: tx.clone(),
                        def: def.id,
                        root,
                    },
                );
            }
        }
        let ticks: Vec<(u32, u32)> = self
            .store
            .data()
            .roots
            .iter()
            .filter(|(id, r)| r.tick_ms > 0 && !self.ticking.contains(id))
            .map(|(id, r)| (*id, r.tick_ms))
            .collect();
        for (root, _) in &ticks {
            if tokio::runtime::Handle::try_current().is_ok() {
                self.ticking.insert(*root);
                tokio::spawn(ticker(def.id, self.generation, *root));
            }
        }
    }

    /// Tick period of `root` (0: none or gone).
    fn tick_ms(&self, root: u32) -> u32 {
        self.store.data().roots.get(&root).map_or(0, |r| r.tick_ms)
    }
}

thread_local! {
    static VMS: RefCell<IdMap<u64, Vm>> = RefCell::new(IdMap::default());
    static DISPATCH: RefCell<Option<tokio::sync::mpsc::UnboundedSender<Event>>> =
        const { RefCell::new(None) };
}

/// This thread's dispatcher (started on first use inside a runtime).
fn dispatcher() -> Option<tokio::sync::mpsc::UnboundedSender<Event>> {
    DISPATCH.with(|d| {
        let mut d = d.borrow_mut();
        if let Some(tx) = d.as_ref()
            && !tx.is_closed()
        {
            return Some(tx.clone());
        }
        tokio::runtime::Handle::try_current().ok()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    Event::QueueReady { def, root, queue } => {
                        let _ = with_vm_id(def, |vm| vm.queue_ready(root, queue));
                    }
                }
            }
        });
        *d = Some(tx.clone());
        Some(tx)
    })
}

async fn ticker(def: u64, generation: u64, root: u32) {
    loop {
        let ms = VMS.with(|m| {
            m.borrow()
                .get(&def)
                .filter(|vm| vm.generation == generation)
                .map_or(0, |vm| vm.tick_ms(root))
        });
        if ms == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
        let alive = with_vm_id(def, |vm| {
            if vm.generation != generation {
                return Ok(false);
            }
            vm.tick(root)?;
            Ok(true)
        });
        if !matches!(alive, Some(Ok(true))) {
            break;
        }
    }
}

/// Runs callouts no stream waits for; their answers go to the instance that made them.
fn spawn_calls(def: u64, generation: u64, calls: Vec<PendingCall>) {
    if calls.is_empty() {
        return;
    }
    let Some(client) = polygate_core::callout::callouts() else {
        return;
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    for c in calls {
        let fut = client.call(c.req);
        tokio::spawn(async move {
            let res = fut.await;
            let _ = with_vm_id(def, |vm| {
                if vm.generation == generation {
                    vm.deliver(c.root, c.token, res, None, None, false)?;
                }
                Ok(())
            });
        });
    }
}

/// Runs `f` on this thread's instance of `def`, creating it if needed. A trap or a failed
/// start drops the instance (the next call builds a fresh one) and is logged.
pub fn with_vm<T>(
    def: &Arc<PluginDef>,
    f: impl FnOnce(&mut Vm) -> Result<T, VmError>,
) -> Result<T, VmError> {
    VMS.with(|m| {
        let mut m = m.borrow_mut();
        if m.contains_key(&def.id) {
            return Ok(());
        }
        // instances of plugins no configuration uses any more
        m.retain(|_, vm| Arc::strong_count(&vm.store.data().def) > 1);
        let vm = Vm::new(def).inspect_err(|e| tracing::error!(wasm = %def.name, "{e}"))?;
        m.insert(def.id, vm);
        Ok(())
    })?;
    with_vm_id(def.id, f).unwrap_or_else(|| Err(VmError::Start("instance missing".into())))
}

/// Like [`with_vm`] for an instance that must exist already (tasks and later phases):
/// `None` when this thread has none for `def`.
pub fn with_vm_id<T>(
    def: u64,
    f: impl FnOnce(&mut Vm) -> Result<T, VmError>,
) -> Option<Result<T, VmError>> {
    VMS.with(|m| {
        let mut m = m.borrow_mut();
        let vm = m.get_mut(&def)?;
        let name = vm.store.data().def.name.clone();
        let r = f(vm);
        if let Err(e) = &r {
            tracing::error!(wasm = %name, "{e}; the instance is rebuilt for the next request");
            m.remove(&def);
        }
        Some(r)
    })
}
