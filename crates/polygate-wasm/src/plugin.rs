//! Wasm plugins: the definitions `gateway.wasm.plugins` declares (module compiled and
//! checked once, `InstancePre` ready), the factory that builds per-configuration plugins, and
//! the driver that runs a request through a filter's callbacks, pausing where the filter
//! pauses until its callouts answer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use parking_lot::Mutex;
use polygate_core::callout::Callouts;
use polygate_core::plugin::{BodyWait, Flow, Plugin, PluginError, PluginFactory, PluginResponse};
use polygate_core::{ConfError, Phase, RequestCtx, ResponseHead};
use polygate_model::{ConfigErrors, WasmConfig, WasmPluginDecl};
use wasmtime::InstancePre;

use crate::engine::{self, CompiledModule, EPOCH_TICK};
use crate::error::{LoadError, VmError};
use crate::state::{CallResult, HostState, LocalReply, PendingCall};
use crate::vm::{self, EXPORT_TYPES};

/// Which stream callbacks a module exports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exports {
    /// `proxy_on_request_headers`.
    pub request_headers: bool,
    /// `proxy_on_request_body`.
    pub request_body: bool,
    /// `proxy_on_response_headers`.
    pub response_headers: bool,
    /// `proxy_on_response_body`.
    pub response_body: bool,
    /// `proxy_on_request_trailers`.
    pub request_trailers: bool,
    /// `proxy_on_response_trailers`.
    pub response_trailers: bool,
}

/// A declared wasm plugin, ready to instantiate.
pub struct PluginDef {
    /// Unique id (thread-local instances are keyed by it).
    pub id: u64,
    /// Plugin name.
    pub name: Arc<str>,
    /// `plugin_root_id`.
    pub root_id: String,
    /// `plugin_vm_id`.
    pub vm_id: String,
    /// VM configuration for `proxy_on_vm_start`.
    pub vm_config: Bytes,
    /// Default priority.
    pub priority: i32,
    /// Phase of the request callbacks.
    pub phase: Phase,
    /// The module.
    pub module: Arc<CompiledModule>,
    /// Linked, ready to instantiate.
    pub pre: InstancePre<HostState>,
    /// Epoch ticks one callback may run (`u64::MAX`: no limit).
    pub time_ticks: u64,
    /// Linear memory cap.
    pub memory_limit: usize,
    /// Largest body held back by a paused body callback.
    pub body_limit: usize,
    /// Stream callbacks present.
    pub exports: Exports,
    /// `request_body: stream`: request bodies go through the filter chunk by chunk.
    pub stream_request_body: bool,
}

#[derive(PartialEq, Eq, Hash)]
struct DefKey {
    name: String,
    hash: u64,
    root_id: String,
    vm_id: String,
    vm_config: Bytes,
    priority: i32,
    phase: String,
    request_body: String,
    limits: (u64, usize, usize),
}

static DEFS: Mutex<Option<HashMap<DefKey, Weak<PluginDef>>>> = Mutex::new(None);
static NEXT_DEF: AtomicU64 = AtomicU64::new(1);

fn check_exports(m: &wasmtime::Module, abi: crate::abi::AbiVersion) -> Result<(), LoadError> {
    for e in m.exports() {
        let Some(f) = e.ty().func().cloned() else {
            continue;
        };
        let (np, nr) = (f.params().len(), f.results().len());
        let want = match e.name() {
            "proxy_on_request_headers" | "proxy_on_response_headers" => {
                Some(if abi == crate::abi::AbiVersion::V0_1_0 {
                    (2, 1)
                } else {
                    (3, 1)
                })
            }
            n => EXPORT_TYPES
                .iter()
                .find(|(name, _, _)| *name == n)
                .map(|(_, p, r)| (*p, *r)),
        };
        if let Some((p, r)) = want
            && (np, nr) != (p, r)
        {
            return Err(LoadError::Link(format!(
                "export {} takes {np} parameters and returns {nr} values ({p} and {r} expected)",
                e.name()
            )));
        }
    }
    Ok(())
}

/// Loads (or reuses) the definition of one declared plugin.
pub fn load_def(decl: &WasmPluginDecl, cfg: &WasmConfig) -> Result<Arc<PluginDef>, LoadError> {
    let bytes = std::fs::read(&decl.file).map_err(|e| LoadError::Read {
        path: decl.file.clone(),
        reason: e.to_string(),
    })?;
    let module = engine::compile(&bytes)?;
    let vm_config = match &decl.vm_config {
        None => Bytes::new(),
        Some(serde_json::Value::String(s)) => Bytes::from(s.clone()),
        Some(v) => Bytes::from(v.to_string()),
    };
    let time_ticks = if cfg.time_limit > 0.0 {
        (cfg.time_limit / EPOCH_TICK.as_secs_f64()).ceil() as u64 + 1
    } else {
        u64::MAX
    };
    let root_id = decl.name.clone();
    let key = DefKey {
        name: decl.name.clone(),
        hash: module.hash,
        root_id: root_id.clone(),
        vm_id: decl.vm_id.clone(),
        vm_config: vm_config.clone(),
        priority: decl.priority,
        phase: decl.http_request_phase.clone(),
        request_body: decl.request_body.clone(),
        limits: (
            time_ticks,
            cfg.memory_limit.0 as usize,
            cfg.body_limit.0 as usize,
        ),
    };
    if let Some(d) = DEFS
        .lock()
        .as_ref()
        .and_then(|m| m.get(&key))
        .and_then(Weak::upgrade)
    {
        return Ok(d);
    }
    check_exports(&module.module, module.abi)?;
    let linker = crate::host::linker(&module.module)?;
    let pre = linker
        .instantiate_pre(&module.module)
        .map_err(|e| LoadError::Link(format!("{e:#}")))?;
    let has = |n: &str| module.module.get_export(n).is_some();
    let exports = Exports {
        request_headers: has("proxy_on_request_headers"),
        request_body: has("proxy_on_request_body"),
        response_headers: has("proxy_on_response_headers"),
        response_body: has("proxy_on_response_body"),
        request_trailers: has("proxy_on_request_trailers"),
        response_trailers: has("proxy_on_response_trailers"),
    };
    let def = Arc::new(PluginDef {
        id: NEXT_DEF.fetch_add(1, Ordering::Relaxed),
        name: Arc::from(decl.name.as_str()),
        root_id,
        vm_id: decl.vm_id.clone(),
        vm_config,
        priority: decl.priority,
        phase: if decl.http_request_phase == "rewrite" {
            Phase::Rewrite
        } else {
            Phase::Access
        },
        module: module.clone(),
        pre,
        time_ticks,
        memory_limit: cfg.memory_limit.0 as usize,
        body_limit: cfg.body_limit.0 as usize,
        exports,
        stream_request_body: decl.request_body == "stream",
    });
    tracing::debug!(
        wasm = %decl.name,
        abi = module.abi.as_str(),
        hash = format_args!("{:016x}", module.hash),
        "module loaded"
    );
    let mut g = DEFS.lock();
    let m = g.get_or_insert_with(HashMap::new);
    m.retain(|_, w| w.strong_count() > 0);
    m.insert(key, Arc::downgrade(&def));
    Ok(def)
}

thread_local! {
    /// The definitions of the configuration being prepared on this thread.
    static PREPARED: RefCell<HashMap<String, Arc<PluginDef>>> = RefCell::new(HashMap::new());
}

/// Checks and loads every plugin of `gateway.wasm.plugins`, with errors at their key paths;
/// `builtin` tells names a declared plugin may not take. Returns a fingerprint of the
/// definitions (see [`polygate_core::plugin::ConfigValidator`]).
pub fn prepare(
    cfg: &polygate_model::ConfigFile,
    builtin: &dyn Fn(&str) -> bool,
) -> Result<u64, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut defs = HashMap::new();
    if let Some(gw) = &cfg.gateway {
        for (i, decl) in gw.wasm.plugins.iter().enumerate() {
            let base = format!("gateway.wasm.plugins[{i}]");
            if builtin(&decl.name) {
                errs.push(
                    format!("{base}.name"),
                    format!("{:?} is the name of a built-in plugin", decl.name),
                );
                continue;
            }
            match load_def(decl, &gw.wasm) {
                Ok(d) => {
                    defs.insert(decl.name.clone(), d);
                }
                Err(e) => errs.push(format!("{base}.file"), format!("{}: {e}", decl.file)),
            }
        }
    }
    // the definitions' ids: a new module (or new settings) is a new definition
    let mut ids: Vec<u64> = defs.values().map(|d: &Arc<PluginDef>| d.id).collect();
    ids.sort_unstable();
    let fp = ids.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, id| {
        (h ^ id).wrapping_mul(0x0000_0100_0000_01b3)
    });
    PREPARED.with(|p| *p.borrow_mut() = defs);
    if errs.0.is_empty() { Ok(fp) } else { Err(errs) }
}

/// The factory of a plugin declared by the configuration being prepared on this thread.
pub fn factory(name: &str) -> Option<Arc<dyn PluginFactory>> {
    let def = PREPARED.with(|p| p.borrow().get(name).cloned())?;
    Some(Arc::new(WasmFactory { def }))
}

/// Builds [`WasmPlugin`]s of one definition.
pub struct WasmFactory {
    def: Arc<PluginDef>,
}

impl WasmFactory {
    /// The factory of `def` (the gateway finds factories through [`factory`]).
    pub fn new(def: Arc<PluginDef>) -> WasmFactory {
        WasmFactory { def }
    }
}

impl PluginFactory for WasmFactory {
    fn name(&self) -> &str {
        &self.def.name
    }

    fn priority(&self) -> i32 {
        self.def.priority
    }

    /// APISIX's wasm plugin schema: `conf` is required, a non-empty string or an object
    /// (sent to `proxy_on_configure` as JSON); other fields are allowed.
    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let obj = conf
            .as_object()
            .ok_or_else(|| ConfError::whole("must be an object"))?;
        // other fields pass, as APISIX's schema allows them (t/wasm/route.t TEST 7: `id`)
        let bytes = match obj.get("conf") {
            None => return Err(ConfError::at("conf", "required")),
            Some(serde_json::Value::String(s)) if !s.is_empty() => Bytes::from(s.clone()),
            // an empty object is accepted (t/wasm/route.t TEST 3)
            Some(v @ serde_json::Value::Object(_)) => Bytes::from(v.to_string()),
            Some(_) => {
                return Err(ConfError::at(
                    "conf",
                    "must be a non-empty string or an object",
                ));
            }
        };
        Ok(Arc::new(WasmPlugin {
            def: self.def.clone(),
            conf: bytes,
            id: NEXT_PLUGIN.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
        }))
    }
}

/// A wasm plugin with one configuration (one root context per instance).
pub struct WasmPlugin {
    def: Arc<PluginDef>,
    conf: Bytes,
    /// Unique id: the key of this instance's root context in each filter instance.
    id: u64,
    /// Dropped with this plugin instance: its root contexts are then ended.
    alive: Arc<()>,
}

static NEXT_PLUGIN: AtomicU64 = AtomicU64::new(1);

/// A request's stream contexts, one per wasm plugin instance that ran.
#[derive(Clone, Default)]
struct Streams(Vec<StreamRef>);

#[derive(Clone, Copy)]
struct StreamRef {
    plugin: usize,
    generation: u64,
    id: u32,
    /// A callback of this stream failed (the request got a 500): later phases skip it.
    failed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    Done,
}

enum Step {
    Done(Option<PluginResponse>),
    Wait(Vec<PendingCall>),
}

struct Outcome {
    action: i32,
    calls: Vec<PendingCall>,
    local: Option<LocalReply>,
    closed: bool,
    continued: bool,
}

fn reply(l: LocalReply) -> PluginResponse {
    PluginResponse {
        status: l.status,
        headers: l.headers,
        body: l.body,
    }
}

impl WasmPlugin {
    fn key(&self) -> usize {
        self as *const WasmPlugin as usize
    }

    fn err(&self, message: impl Into<String>) -> PluginError {
        PluginError {
            plugin: self.def.name.to_string(),
            message: message.into(),
        }
    }

    fn vm_err(&self, e: VmError) -> PluginError {
        self.err(e.to_string())
    }

    /// This plugin's stream context of the request, unless it failed.
    fn stream(&self, ctx: &RequestCtx) -> Option<StreamRef> {
        let key = self.key();
        ctx.extensions
            .get::<Streams>()
            .and_then(|s| s.0.iter().find(|r| r.plugin == key).copied())
            .filter(|r| !r.failed)
    }

    /// Marks this plugin's stream of the request as failed (ending it in the filter when its
    /// instance is still there) and passes the error on.
    fn failed(&self, ctx: &mut RequestCtx, e: PluginError) -> PluginError {
        let key = self.key();
        let mut ended = None;
        if let Some(s) = ctx.extensions.get_mut::<Streams>() {
            for r in s.0.iter_mut().filter(|r| r.plugin == key && !r.failed) {
                r.failed = true;
                ended = Some(*r);
            }
        }
        if let Some(s) = ended {
            let _ = vm::with_vm_id(self.def.id, |vm| {
                if vm.generation == s.generation {
                    vm.finish_stream(s.id, ctx)?;
                }
                Ok(())
            });
        }
        e
    }

    /// This request's stream context, created (with the root context) on first use.
    fn open(&self, ctx: &mut RequestCtx) -> Result<Option<StreamRef>, PluginError> {
        let key = self.key();
        if let Some(s) = ctx
            .extensions
            .get::<Streams>()
            .and_then(|s| s.0.iter().find(|r| r.plugin == key))
        {
            return Ok((!s.failed).then_some(*s));
        }
        let (id, generation) = vm::with_vm(&self.def, |vm| {
            let root = vm.root_for(self.id, &self.alive, &self.conf)?;
            let id = vm.create_stream(root)?;
            Ok((id, vm.generation))
        })
        .map_err(|e| self.vm_err(e))?;
        let r = StreamRef {
            plugin: self.key(),
            generation,
            id,
            failed: false,
        };
        match ctx.extensions.get_mut::<Streams>() {
            Some(s) => s.0.push(r),
            None => {
                ctx.extensions.insert(Streams(vec![r]));
            }
        }
        Ok(Some(r))
    }

    /// Runs `f` on the instance that holds stream `s`; an instance rebuilt since (after a
    /// trap) no longer knows the stream.
    fn on_vm<T>(
        &self,
        s: StreamRef,
        f: impl FnOnce(&mut vm::Vm) -> Result<T, VmError>,
    ) -> Result<T, PluginError> {
        match vm::with_vm_id(self.def.id, |vm| {
            if vm.generation != s.generation || !vm.has_stream(s.id) {
                return Err(VmError::Start("the filter instance was rebuilt".into()));
            }
            f(vm)
        }) {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(self.vm_err(e)),
            None => Err(self.err("the filter instance was rebuilt")),
        }
    }

    /// What the callback left: its action, new callouts, and what it asked of the stream.
    fn outcome(vm: &mut vm::Vm, id: u32, action: i32, side: usize) -> Outcome {
        let calls = vm.take_calls();
        let st = vm.state().streams.get_mut(&id);
        let (local, closed, continued) = match st {
            Some(st) => (
                st.local.take(),
                st.closed,
                std::mem::take(&mut st.continued[side]),
            ),
            None => (None, false, false),
        };
        Outcome {
            action,
            calls,
            local,
            closed,
            continued,
        }
    }

    /// Runs callbacks from `stage` on until the stage list ends or the filter waits.
    fn advance(
        &self,
        ctx: &mut RequestCtx,
        mut resp: Option<&mut ResponseHead>,
        s: StreamRef,
        stage: &mut Stage,
    ) -> Result<Step, PluginError> {
        loop {
            let out = match *stage {
                Stage::Done => return Ok(Step::Done(None)),
                Stage::RequestHeaders => {
                    *stage = Stage::RequestBody;
                    if !self.def.exports.request_headers {
                        continue;
                    }
                    let eos = match &ctx.body {
                        Some(b) => b.is_empty(),
                        // not read yet: a body is announced by its framing headers
                        None => {
                            !ctx.headers.contains_key(http::header::TRANSFER_ENCODING)
                                && ctx
                                    .headers
                                    .get(http::header::CONTENT_LENGTH)
                                    .is_none_or(|v| v.as_bytes() == b"0")
                        }
                    };
                    self.on_vm(s, |vm| {
                        let a = vm.request_headers(s.id, ctx, eos)?;
                        Ok(Self::outcome(vm, s.id, a, 0))
                    })?
                }
                Stage::RequestBody => {
                    *stage = Stage::Done;
                    if !self.def.exports.request_body
                        || ctx.body.as_ref().is_none_or(|b| b.is_empty())
                    {
                        continue;
                    }
                    self.on_vm(s, |vm| {
                        let a = vm.request_body(s.id, ctx)?;
                        Ok(Self::outcome(vm, s.id, a, 0))
                    })?
                }
                Stage::ResponseHeaders => {
                    *stage = Stage::Done;
                    let Some(r) = resp.as_deref_mut() else {
                        continue;
                    };
                    let eos = ctx.method == http::Method::HEAD
                        || r.status == http::StatusCode::NO_CONTENT
                        || r.status == http::StatusCode::NOT_MODIFIED;
                    self.on_vm(s, |vm| {
                        let a = vm.response_headers(s.id, ctx, r, eos)?;
                        Ok(Self::outcome(vm, s.id, a, 1))
                    })?
                }
            };
            if let Some(l) = out.local {
                self.spawn(s, out.calls);
                return Ok(Step::Done(Some(reply(l))));
            }
            if out.closed {
                return Err(self.err("the filter closed the stream"));
            }
            if out.action != 0 && !out.continued {
                // paused: what resumes it is a callout's answer
                if out.calls.is_empty() {
                    return Err(self.err(format!(
                        "the filter paused in {stage:?} with no callout in flight to resume it"
                    )));
                }
                return Ok(Step::Wait(out.calls));
            }
            self.spawn(s, out.calls);
        }
    }

    /// Callouts no stage waits for: their answers still reach the filter.
    fn spawn(&self, s: StreamRef, calls: Vec<PendingCall>) {
        spawn_detached(self.def.id, s, calls);
    }

    /// Waits for callouts, delivering each answer, until the filter continues the stream (the
    /// next stages then run), answers locally, or has nothing left in flight.
    async fn wait(
        &self,
        ctx: &mut RequestCtx,
        mut resp: Option<&mut ResponseHead>,
        s: StreamRef,
        mut stage: Stage,
        calls: Vec<PendingCall>,
    ) -> Result<Option<PluginResponse>, PluginError> {
        let side = usize::from(resp.is_some());
        let client =
            polygate_core::callout::callouts().ok_or_else(|| self.err("no callout client"))?;
        let mut set = Calls::new();
        launch(&mut set, client, calls);
        loop {
            let Some(joined) = set.join_next().await else {
                return Err(
                    self.err("the filter paused and no callout in flight can resume it any more")
                );
            };
            let (root, token, res) = joined.map_err(|e| self.err(format!("callout task: {e}")))?;
            if let Err(e) = &res {
                tracing::debug!(wasm = %self.def.name, token, "callout failed: {e}");
            }
            let out = self.on_vm(s, |vm| {
                vm.deliver(root, token, res, Some(ctx), resp.as_deref_mut(), true)?;
                Ok(Self::outcome(vm, s.id, 0, side))
            })?;
            if let Some(l) = out.local {
                self.spawn(s, out.calls);
                return Ok(Some(reply(l)));
            }
            if out.closed {
                return Err(self.err("the filter closed the stream"));
            }
            launch(&mut set, client, out.calls);
            if out.continued {
                // callouts still in flight answer the filter later, without this request
                let rest = std::mem::take(&mut set);
                if !rest.is_empty() {
                    tokio::spawn(deliver_rest(self.def.id, s.generation, rest));
                }
                match self.advance(ctx, resp.as_deref_mut(), s, &mut stage)? {
                    Step::Done(r) => return Ok(r),
                    Step::Wait(calls) => launch(&mut set, client, calls),
                }
            }
        }
    }

    fn request<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let s = match self.open(ctx) {
            Ok(Some(s)) => s,
            Ok(None) => return Flow::Continue,
            Err(e) => return Flow::Fail(e),
        };
        let mut stage = Stage::RequestHeaders;
        match self.advance(ctx, None, s, &mut stage) {
            Err(e) => Flow::Fail(self.failed(ctx, e)),
            Ok(Step::Done(None)) => Flow::Continue,
            Ok(Step::Done(Some(r))) => Flow::Respond(r),
            Ok(Step::Wait(calls)) => Flow::Pending(Box::pin(async move {
                let r = self.wait(ctx, None, s, stage, calls).await;
                r.map_err(|e| self.failed(ctx, e))
            })),
        }
    }
}

enum BodyStep {
    /// The filter does not look at this body (any more).
    Pass,
    /// Send these bytes.
    Emit(Vec<u8>),
    /// Held back until these callouts let the filter continue.
    Wait(Vec<PendingCall>),
}

/// A body held back by a filter paused with callouts in flight (side 0 request, 1
/// response): each answer is delivered; when the filter continues that side, the held body
/// goes on.
async fn wait_body(
    def: Arc<PluginDef>,
    generation: u64,
    id: u32,
    side: usize,
    calls: Vec<PendingCall>,
    eof: bool,
) -> Result<Bytes, PluginError> {
    let err = |m: &str| PluginError {
        plugin: def.name.to_string(),
        message: m.to_owned(),
    };
    let client = polygate_core::callout::callouts().ok_or_else(|| err("no callout client"))?;
    let mut set = Calls::new();
    let buffer_type = if side == 1 {
        crate::abi::buffer::HTTP_RESPONSE_BODY
    } else {
        crate::abi::buffer::HTTP_REQUEST_BODY
    };
    launch(&mut set, client, calls);
    while let Some(j) = set.join_next().await {
        let (root, token, res) = j.map_err(|e| err(&format!("callout task: {e}")))?;
        let r = vm::with_vm_id(def.id, |vm| {
            if vm.generation != generation || !vm.has_stream(id) {
                return Ok(None);
            }
            // the held body is the body buffer while the answer is handled (Envoy gives the
            // buffered body to callbacks outside the body callback too)
            let held = vm
                .state()
                .streams
                .get_mut(&id)
                .map(|st| std::mem::take(st.held(side)))
                .unwrap_or_default();
            vm.state().body = Some((buffer_type, held));
            let r = vm.deliver(root, token, res, None, None, true);
            let back = vm.state().body.take().map(|(_, b)| b).unwrap_or_default();
            if let Some(st) = vm.state().streams.get_mut(&id) {
                *st.held(side) = back;
            }
            r?;
            let o = WasmPlugin::outcome(vm, id, 0, side);
            let held = if o.continued {
                vm.state().streams.get_mut(&id).map(|st| {
                    if eof && side == 1 {
                        st.resp_body_done = true;
                    }
                    std::mem::take(st.held(side))
                })
            } else {
                None
            };
            Ok(Some((o, held)))
        });
        let (o, held) = match r {
            Some(Ok(Some(v))) => v,
            Some(Err(e)) => return Err(err(&e.to_string())),
            _ => return Err(err("the filter instance was rebuilt")),
        };
        if o.local.is_some() {
            if side == 0 {
                return Err(err(
                    "a local response from a streamed request body: the upstream request has started",
                ));
            }
            tracing::warn!(wasm = %def.name, "a local response from a callout answer is ignored: the response has started");
        }
        if o.closed {
            return Err(err("the filter closed the stream"));
        }
        launch(&mut set, client, o.calls);
        if let Some(body) = held {
            if !set.is_empty() {
                tokio::spawn(deliver_rest(def.id, generation, set));
            }
            return Ok(Bytes::from(body));
        }
    }
    Err(err(
        "the filter paused the body and no callout in flight can resume it",
    ))
}

/// A request body streamed through a filter chunk by chunk (`request_body: stream`).
struct StreamedBody {
    def: Arc<PluginDef>,
    s: StreamRef,
    done: bool,
}

impl polygate_core::plugin::ChunkFilter for StreamedBody {
    fn on_trailers(&mut self, trailers: &mut http::HeaderMap) -> Result<(), PluginError> {
        let s = self.s;
        match vm::with_vm_id(self.def.id, |vm| {
            if vm.generation == s.generation && vm.has_stream(s.id) {
                vm.trailers(s.id, 0, None, trailers)?;
                vm.spawn_pending();
            }
            Ok(())
        }) {
            Some(Err(e)) => Err(PluginError {
                plugin: self.def.name.to_string(),
                message: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    fn on_chunk(&mut self, chunk: &mut Bytes, eof: bool) -> Result<Option<BodyWait>, PluginError> {
        if self.done {
            return Ok(None);
        }
        let (s, limit) = (self.s, self.def.body_limit);
        let err = |m: String| PluginError {
            plugin: self.def.name.to_string(),
            message: m,
        };
        let r = vm::with_vm_id(self.def.id, |vm| {
            if vm.generation != s.generation {
                return Ok(None);
            }
            let Some(st) = vm.state().streams.get_mut(&s.id) else {
                return Ok(None);
            };
            let mut body = std::mem::take(&mut st.req_body);
            body.extend_from_slice(chunk);
            let (action, out) = vm.body(s.id, 0, None, body, eof)?;
            let o = WasmPlugin::outcome(vm, s.id, action, 0);
            Ok(Some((o, out)))
        });
        let (o, out) = match r {
            None | Some(Ok(None)) => return Err(err("the filter instance was rebuilt".into())),
            Some(Err(e)) => return Err(err(e.to_string())),
            Some(Ok(Some(v))) => v,
        };
        if o.local.is_some() {
            return Err(err(
                "a local response from a streamed request body: the upstream request has started"
                    .into(),
            ));
        }
        if o.closed {
            return Err(err("the filter closed the stream".into()));
        }
        let hold = |out: Vec<u8>| {
            vm::with_vm_id(self.def.id, |vm| {
                if let Some(st) = vm.state().streams.get_mut(&s.id) {
                    st.req_body = out;
                }
                Ok(())
            })
        };
        if o.action != 0 && !o.continued {
            if !o.calls.is_empty() {
                hold(out);
                *chunk = Bytes::new();
                if eof {
                    self.done = true;
                }
                return Ok(Some(Box::pin(wait_body(
                    self.def.clone(),
                    s.generation,
                    s.id,
                    0,
                    o.calls,
                    eof,
                ))));
            }
            if !eof {
                if out.len() > limit {
                    return Err(err(format!(
                        "request body held back past body_limit ({limit} bytes)"
                    )));
                }
                hold(out);
                *chunk = Bytes::new();
                return Ok(None);
            }
        }
        spawn_detached(self.def.id, s, o.calls);
        if eof {
            self.done = true;
        }
        *chunk = Bytes::from(out);
        Ok(None)
    }
}

/// Runs callouts of stream `s` that nothing waits for, on the instance that made them (their
/// answers still reach the filter).
fn spawn_detached(def: u64, s: StreamRef, calls: Vec<PendingCall>) {
    if calls.is_empty() {
        return;
    }
    let _ = vm::with_vm_id(def, |vm| {
        if vm.generation == s.generation {
            vm.spawn_calls(calls);
        }
        Ok(())
    });
}

/// Callouts in flight: each resolves to (root context, token, answer).
type Calls = tokio::task::JoinSet<(u32, u32, CallResult)>;

/// Starts `calls` in `set`.
fn launch(set: &mut Calls, client: &Arc<dyn Callouts>, calls: Vec<PendingCall>) {
    for c in calls {
        let fut = client.call(c.req);
        let (root, token) = (c.root, c.token);
        set.spawn(async move { (root, token, fut.await) });
    }
}

/// Delivers the answers of callouts a stream no longer waits for.
async fn deliver_rest(def: u64, generation: u64, mut set: Calls) {
    while let Some(j) = set.join_next().await {
        let Ok((root, token, res)) = j else { continue };
        let _ = vm::with_vm_id(def, |vm| {
            if vm.generation == generation {
                vm.deliver(root, token, res, None, None, false)?;
            }
            Ok(())
        });
    }
}

impl Plugin for WasmPlugin {
    fn name(&self) -> &str {
        &self.def.name
    }

    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.def.phase == Phase::Rewrite {
            self.request(ctx)
        } else {
            Flow::Continue
        }
    }

    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if self.def.phase == Phase::Access {
            self.request(ctx)
        } else {
            Flow::Continue
        }
    }

    fn wants_body(&self) -> Option<usize> {
        (self.def.exports.request_body && !self.def.stream_request_body)
            .then_some(self.def.body_limit)
    }

    fn has_request_body_filter(&self) -> bool {
        (self.def.exports.request_body || self.def.exports.request_trailers)
            && self.def.stream_request_body
    }

    fn has_trailers_filter(&self) -> bool {
        self.def.exports.response_trailers
    }

    /// `proxy_on_response_trailers` with the upstream's trailer fields (a pause is not
    /// honoured: the body has been sent).
    fn response_trailers(&self, ctx: &mut RequestCtx, trailers: &mut http::HeaderMap) {
        let Some(s) = self.stream(ctx) else { return };
        let _ = vm::with_vm_id(self.def.id, |vm| {
            if vm.generation == s.generation && vm.has_stream(s.id) {
                vm.trailers(s.id, 1, Some(ctx), trailers)?;
                vm.spawn_pending();
            }
            Ok(())
        });
    }

    fn request_body_filter(
        &self,
        ctx: &mut RequestCtx,
    ) -> Option<Box<dyn polygate_core::plugin::ChunkFilter>> {
        let s = self.stream(ctx)?;
        Some(Box::new(StreamedBody {
            def: self.def.clone(),
            s,
            done: false,
        }))
    }

    fn has_async_header_filter(&self) -> bool {
        self.def.exports.response_headers
    }

    fn header_filter_async<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        resp: &'a mut ResponseHead,
    ) -> Flow<'a> {
        let s = match self.open(ctx) {
            Ok(Some(s)) => s,
            Ok(None) => return Flow::Continue,
            Err(e) => return Flow::Fail(e),
        };
        let mut stage = Stage::ResponseHeaders;
        match self.advance(ctx, Some(&mut *resp), s, &mut stage) {
            Err(e) => Flow::Fail(self.failed(ctx, e)),
            Ok(Step::Done(None)) => Flow::Continue,
            Ok(Step::Done(Some(r))) => Flow::Respond(r),
            Ok(Step::Wait(calls)) => Flow::Pending(Box::pin(async move {
                let r = self.wait(ctx, Some(resp), s, stage, calls).await;
                r.map_err(|e| self.failed(ctx, e))
            })),
        }
    }

    fn has_body_filter(&self) -> bool {
        self.def.exports.response_body
    }

    fn has_async_body_filter(&self) -> bool {
        self.def.exports.response_body
    }

    fn body_filter(&self, ctx: &mut RequestCtx, chunk: &mut Bytes, eof: bool) {
        // only reached when called directly: the gateway uses the async form
        drop(self.body_filter_async(ctx, chunk, eof));
    }

    /// Each chunk goes through `proxy_on_response_body`. A paused callback holds the chunks
    /// back and is called again with the cumulative body, up to `body_limit` (past it the
    /// held body is sent and the filter sees no more of this response); paused with
    /// callouts in flight, the body waits until the filter continues the response.
    fn body_filter_async(
        &self,
        ctx: &mut RequestCtx,
        chunk: &mut Bytes,
        eof: bool,
    ) -> Option<BodyWait> {
        let s = self.stream(ctx)?;
        let limit = self.def.body_limit;
        let name = self.def.name.clone();
        let r = vm::with_vm_id(self.def.id, |vm| {
            if vm.generation != s.generation {
                return Ok(BodyStep::Pass);
            }
            let Some(st) = vm.state().streams.get_mut(&s.id) else {
                return Ok(BodyStep::Pass);
            };
            if st.resp_body_done {
                return Ok(BodyStep::Pass);
            }
            let mut body = std::mem::take(&mut st.resp_body);
            body.extend_from_slice(chunk);
            let (action, out) = vm.body(s.id, 1, Some(ctx), body, eof)?;
            let o = Self::outcome(vm, s.id, action, 1);
            let Some(st) = vm.state().streams.get_mut(&s.id) else {
                return Ok(BodyStep::Emit(out));
            };
            if o.local.is_some() {
                tracing::warn!(wasm = %name, "a local response from the response body is ignored: the response has started");
            }
            if o.action != 0 && !o.continued {
                if !o.calls.is_empty() {
                    st.resp_body = out;
                    return Ok(BodyStep::Wait(o.calls));
                }
                if !eof {
                    if out.len() > limit {
                        tracing::warn!(wasm = %name, limit, "response body held back past body_limit: sent as it is, the filter sees no more of it");
                        st.resp_body_done = true;
                        return Ok(BodyStep::Emit(out));
                    }
                    st.resp_body = out;
                    return Ok(BodyStep::Emit(Vec::new()));
                }
            }
            if eof {
                st.resp_body_done = true;
            }
            vm.spawn_calls(o.calls);
            Ok(BodyStep::Emit(out))
        });
        match r {
            Some(Ok(BodyStep::Emit(out))) => *chunk = Bytes::from(out),
            Some(Ok(BodyStep::Pass)) | None => {}
            Some(Ok(BodyStep::Wait(calls))) => {
                *chunk = Bytes::new();
                return Some(Box::pin(wait_body(
                    self.def.clone(),
                    s.generation,
                    s.id,
                    1,
                    calls,
                    eof,
                )));
            }
            Some(Err(_)) => {
                // logged by with_vm_id; the response has started: it ends here
                *chunk = Bytes::new();
            }
        }
        None
    }

    fn log(&self, ctx: &RequestCtx) {
        let Some(s) = self.stream(ctx) else { return };
        let _ = vm::with_vm_id(self.def.id, |vm| {
            if vm.generation == s.generation {
                vm.finish_stream(s.id, ctx)?;
            }
            Ok(())
        });
    }
}
