//! The plugin contract: one trait for every plugin kind (built-in Rust, and later Lua, FFI
//! runtimes and proxy-wasm), APISIX's phases, and factories that validate configurations.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::ctx::{RequestCtx, ResponseHead};

/// APISIX's request phases, in execution order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before authentication; auth plugins identify the consumer here.
    Rewrite,
    /// Access control, after the consumer's plugins were merged in.
    Access,
    /// After the upstream node was picked, before the request is sent (re-run per retry).
    BeforeProxy,
    /// Response status and headers.
    HeaderFilter,
    /// Response body chunks.
    BodyFilter,
    /// After the response was sent.
    Log,
}

/// A response produced by a plugin instead of proxying (APISIX's `return status, body`).
#[derive(Debug, Clone)]
pub struct PluginResponse {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl PluginResponse {
    /// A response with a status and a body.
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        PluginResponse {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
        }
    }

    /// A response with APISIX's JSON error body `{"message": msg}` (what auth plugins send).
    pub fn message(status: StatusCode, msg: &str) -> Self {
        let body = serde_json::json!({ "message": msg }).to_string();
        let mut r = PluginResponse::new(status, body + "\n");
        r.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

impl PluginResponse {
    /// The response APISIX gives for `core.response.exit(status)` without a body: nginx's
    /// default error page for the status (HTML), e.g. a limit plugin's rejection.
    pub fn status_page(status: StatusCode) -> Self {
        let reason = match status.as_u16() {
            // nginx's own reason phrases where they differ from RFC 9110's
            302 => "Moved Temporarily",
            401 => "Authorization Required",
            413 => "Request Entity Too Large",
            414 => "Request-URI Too Large",
            503 => "Service Temporarily Unavailable",
            504 => "Gateway Time-out",
            _ => status.canonical_reason().unwrap_or(""),
        };
        let title = format!("{} {reason}", status.as_u16());
        let body = format!(
            "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
             <center><h1>{title}</h1></center>\r\n<hr><center>polygate</center>\r\n\
             </body>\r\n</html>\r\n"
        );
        let mut r = PluginResponse::new(status, body);
        r.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r
    }

    /// APISIX's `{"error_msg": msg}` body with a status (what limit plugins send with a
    /// `rejected_msg`).
    pub fn error_msg(status: StatusCode, msg: &str) -> Self {
        let body = serde_json::json!({ "error_msg": msg }).to_string() + "\n";
        let mut r = PluginResponse::new(status, body);
        r.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// A plugin failure (the request fails with a 500 unless the plugin chose a status).
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin {plugin}: {message}")]
pub struct PluginError {
    /// Plugin name.
    pub plugin: String,
    /// What failed.
    pub message: String,
}

/// What an async phase resolves to: go on (`None`), respond, or fail.
pub type PhaseResult = Result<Option<PluginResponse>, PluginError>;

/// A boxed phase future borrowing the plugin and the request context.
pub type PhaseFuture<'a> = Pin<Box<dyn Future<Output = PhaseResult> + Send + 'a>>;

/// What a body filter that waits gives back: a future resolving to the bytes to pass on
/// (the plugins after it then see them). It owns what it needs: the response body is sent on
/// while the request's context is elsewhere.
pub type BodyWait = Pin<Box<dyn Future<Output = Result<Bytes, PluginError>> + Send + 'static>>;

/// A filter over a request body as it streams to the upstream, made per request by
/// [`Plugin::request_body_filter`].
pub trait ChunkFilter: Send {
    /// One chunk (`eof` marks the last call, whose chunk may be empty). The filter may change
    /// the chunk, or hold it back: `Some` waits for the future, which resolves to the bytes to
    /// pass on; the body is not read further meanwhile. An error fails the request.
    fn on_chunk(&mut self, chunk: &mut Bytes, eof: bool) -> Result<Option<BodyWait>, PluginError>;

    /// The body's trailer fields (a chunked body's trailer section), before they go upstream;
    /// called before the last `on_chunk`.
    fn on_trailers(&mut self, _trailers: &mut HeaderMap) -> Result<(), PluginError> {
        Ok(())
    }
}

/// The outcome of `rewrite`, `access` and `before_proxy`.
///
/// Synchronous plugins answer `Continue` or `Respond` without allocating; plugins that wait
/// (FFI runtimes, Lua coroutines, I/O) answer `Pending` with a future.
pub enum Flow<'a> {
    /// Go on with the next plugin.
    Continue,
    /// Stop and send this response.
    Respond(PluginResponse),
    /// Fail the request.
    Fail(PluginError),
    /// Wait for this future.
    Pending(PhaseFuture<'a>),
}

/// A configured plugin instance. All phase methods default to no-ops.
///
/// Instances are shared by all requests of the routes that use them, across worker threads.
pub trait Plugin: Send + Sync + 'static {
    /// Plugin name (as in the configuration).
    fn name(&self) -> &str;

    /// `rewrite` phase.
    fn rewrite<'a>(&'a self, _ctx: &'a mut RequestCtx) -> Flow<'a> {
        Flow::Continue
    }

    /// `access` phase.
    fn access<'a>(&'a self, _ctx: &'a mut RequestCtx) -> Flow<'a> {
        Flow::Continue
    }

    /// `before_proxy` phase: runs after the node pick, once per attempt.
    fn before_proxy<'a>(&'a self, _ctx: &'a mut RequestCtx) -> Flow<'a> {
        Flow::Continue
    }

    /// `header_filter` phase: may change the status and headers, or set
    /// [`RequestCtx::body_override`]. Also runs for responses made by plugins and errors.
    fn header_filter(&self, _ctx: &mut RequestCtx, _resp: &mut ResponseHead) {}

    /// Whether this plugin's response-header work may wait: the gateway then calls
    /// [`Plugin::header_filter_async`] instead of [`Plugin::header_filter`] (chains without
    /// such a plugin keep the synchronous path).
    fn has_async_header_filter(&self) -> bool {
        false
    }

    /// `header_filter` for plugins that may wait (a proxy-wasm filter pausing on response
    /// headers to make a callout). A response (`Respond`, or `Some` from the future) replaces
    /// the one being sent: its status, headers and body. The default runs
    /// [`Plugin::header_filter`].
    fn header_filter_async<'a>(
        &'a self,
        ctx: &'a mut RequestCtx,
        resp: &'a mut ResponseHead,
    ) -> Flow<'a> {
        self.header_filter(ctx, resp);
        Flow::Continue
    }

    /// The request body this plugin needs to see, at most this many bytes. When any plugin of a
    /// chain asks, the gateway reads the body before `rewrite` into [`RequestCtx::body`]
    /// (a longer body is refused with 413) and forwards the buffered copy.
    fn wants_body(&self) -> Option<usize> {
        None
    }

    /// Whether this plugin filters request bodies as they stream
    /// ([`Plugin::request_body_filter`]).
    fn has_request_body_filter(&self) -> bool {
        false
    }

    /// A filter for this request's body as it streams to the upstream (chunk by chunk,
    /// instead of buffering it as [`Plugin::wants_body`] does), made after the `access`
    /// phase; `None` when this request needs none. The body then goes upstream chunked.
    fn request_body_filter(&self, _ctx: &mut RequestCtx) -> Option<Box<dyn ChunkFilter>> {
        None
    }

    /// Whether [`Plugin::response_trailers`] does anything.
    fn has_trailers_filter(&self) -> bool {
        false
    }

    /// The upstream response's trailer fields (a chunked body's trailer section), before they
    /// go to the client (which gets them when it sent `TE: trailers`); called before the last
    /// `body_filter` call.
    fn response_trailers(&self, _ctx: &mut RequestCtx, _trailers: &mut HeaderMap) {}

    /// Whether [`Plugin::body_filter`] does anything (the proxy skips the body hook otherwise).
    fn has_body_filter(&self) -> bool {
        false
    }

    /// `body_filter` phase, once per chunk; `eof` marks the last call.
    fn body_filter(&self, _ctx: &mut RequestCtx, _chunk: &mut Bytes, _eof: bool) {}

    /// Whether this plugin's body filter may wait: the gateway then calls
    /// [`Plugin::body_filter_async`] instead of [`Plugin::body_filter`].
    fn has_async_body_filter(&self) -> bool {
        false
    }

    /// `body_filter` for plugins that may wait (a proxy-wasm filter pausing on the response
    /// body for a callout). `Some` holds this chunk back until the future resolves to the
    /// bytes to pass on; the response body is not read further meanwhile. The default runs
    /// [`Plugin::body_filter`].
    fn body_filter_async(
        &self,
        ctx: &mut RequestCtx,
        chunk: &mut Bytes,
        eof: bool,
    ) -> Option<BodyWait> {
        self.body_filter(ctx, chunk, eof);
        None
    }

    /// `log` phase, after the response was sent (or the client went away).
    fn log(&self, _ctx: &RequestCtx) {}

    /// Called once the configuration holding this instance is committed (it serves requests
    /// from now on), on the configuration thread: the place for process-wide work that must
    /// not happen for a configuration that could still be rejected, such as loading an FFI
    /// runtime. Called again for instances a later configuration keeps: make it idempotent.
    fn on_commit(&self) {}
}

/// Whether a plugin is an authentication plugin (its consumer configuration is a credential).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Ordinary plugin.
    Normal,
    /// Authentication plugin: identifies consumers.
    Auth,
}

/// A configuration error inside a plugin's configuration; `path` is below the plugin's key.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}{}", if .path.is_empty() { String::new() } else { format!("{}: ", .path) }, .message)]
pub struct ConfError {
    /// Key path below the plugin's configuration (`headers.set`), empty for the whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ConfError {
    /// An error at `path`.
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> ConfError {
        ConfError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An error about the whole configuration.
    pub fn whole(message: impl Into<String>) -> ConfError {
        ConfError::at("", message)
    }

    /// The full key path of this error when the configuration sits at `base`
    /// (`routes[0].plugins.key-auth` + `header` → `routes[0].plugins.key-auth.header`).
    pub fn path_under(&self, base: &str) -> String {
        if self.path.is_empty() {
            base.to_owned()
        } else {
            format!("{base}.{}", self.path)
        }
    }
}

/// Deserialises a plugin configuration into a serde type (use `deny_unknown_fields`),
/// reporting the failing key path below the plugin's key.
pub fn parse_conf<T: serde::de::DeserializeOwned>(
    conf: &serde_json::Value,
) -> Result<T, ConfError> {
    serde_path_to_error::deserialize(conf).map_err(|e| {
        let p = e.path().to_string();
        ConfError::at(
            if p == "." { String::new() } else { p },
            e.inner().to_string(),
        )
    })
}

/// Builds instances of one plugin from configurations.
pub trait PluginFactory: Send + Sync + 'static {
    /// Plugin name.
    fn name(&self) -> &str;
    /// Default priority (higher runs first).
    fn priority(&self) -> i32;
    /// Normal or auth.
    fn kind(&self) -> PluginKind {
        PluginKind::Normal
    }
    /// Validates a route/service/global-rule configuration and builds an instance. Building
    /// must not change the running process (no runtime loaded, no thread started): a built
    /// configuration may still be rejected. Process-wide work belongs in a commit hook
    /// ([`PluginRegistry::add_commit_hook`]) or in the first request that needs it.
    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError>;
    /// Validates a configuration without building anything (`polygate validate`). The default
    /// builds and drops the instance; a plugin whose build touches the outside world (loads a
    /// library, compiles code on a shared state) checks it a cheaper way.
    fn check(&self, conf: &serde_json::Value) -> Result<(), ConfError> {
        self.build(conf).map(drop)
    }
    /// JSON Schema of the route/service configuration, as the Admin API serves it
    /// (`/apisix/admin/plugins/{name}`). The default allows any object; the factory's
    /// `build` stays the authority on what is valid.
    fn schema(&self) -> serde_json::Value {
        serde_json::json!({"type": "object"})
    }
    /// JSON Schema of a consumer's configuration, for authentication plugins.
    fn consumer_schema(&self) -> Option<serde_json::Value> {
        None
    }
    /// For auth plugins: validates a consumer's configuration and returns the credential that
    /// identifies the consumer (e.g. key-auth's `key`).
    fn consumer_credential(&self, _conf: &serde_json::Value) -> Result<Option<String>, ConfError> {
        Ok(None)
    }
}

thread_local! {
    static PREPARING: std::cell::RefCell<Option<Arc<polygate_model::GatewaySection>>> =
        const { std::cell::RefCell::new(None) };
}

/// The `gateway:` section of the configuration whose plugins are being built on this thread
/// (set by [`preparing_with`]): factories read settings of the candidate configuration here
/// rather than the process-wide state, which belongs to the served one (the FFI library path
/// for checking that a library exists, say).
pub fn preparing() -> Option<Arc<polygate_model::GatewaySection>> {
    PREPARING.with(|p| p.borrow().clone())
}

/// Runs `f` with [`preparing`] returning `gw`.
pub fn preparing_with<R>(gw: Arc<polygate_model::GatewaySection>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<polygate_model::GatewaySection>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            PREPARING.with(|p| *p.borrow_mut() = prev);
        }
    }
    let _reset = Reset(PREPARING.with(|p| p.borrow_mut().replace(gw)));
    f()
}

thread_local! {
    static OWNER: std::cell::RefCell<Option<Arc<str>>> = const { std::cell::RefCell::new(None) };
}

/// The resource whose plugins are being built on this thread, as APISIX's `resource_key`
/// without the prefix (`routes/1`, `services/2`, `consumers/jack`, `global_rules/1`), set by
/// [`owner_with`]; `None` outside a build. Plugins that keep state per configured object
/// (limit-count's counters) key it by this, so that it is the same in every process.
pub fn building_owner() -> Option<Arc<str>> {
    OWNER.with(|o| o.borrow().clone())
}

/// Runs `f` (which builds the plugins of one resource) with [`building_owner`] returning
/// `owner`.
pub fn owner_with<R>(owner: &str, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<str>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            OWNER.with(|o| *o.borrow_mut() = prev);
        }
    }
    let _reset = Reset(OWNER.with(|o| o.borrow_mut().replace(Arc::from(owner))));
    f()
}

/// A hook run with each configuration after it was committed (became the served one), to
/// apply process-wide state: the FFI library path, unloading runtimes no longer used, Lua
/// settings. Never run for a rejected configuration nor by `polygate validate`.
pub type CommitHook = Arc<dyn Fn(&polygate_model::ConfigFile) + Send + Sync>;

/// Finds factories for plugins declared by the configuration itself (proxy-wasm plugins of
/// `gateway.wasm.plugins`): called with a name no registered factory has, while a
/// configuration is prepared ([`preparing`] gives its `gateway:` section).
pub type FactoryProvider = Arc<dyn Fn(&str) -> Option<Arc<dyn PluginFactory>> + Send + Sync>;

/// Checks a candidate configuration as a whole before its resources are built (proxy-wasm
/// modules named by `gateway.wasm.plugins`): errors reject the configuration. Runs while the
/// configuration is prepared, also for `polygate validate`. Returns a fingerprint of what it
/// prepared: when it differs from the served configuration's, no compiled route is reused
/// (their plugins may refer to what changed, a new module say).
pub type ConfigValidator = Arc<
    dyn Fn(&polygate_model::ConfigFile) -> Result<u64, polygate_model::ConfigErrors> + Send + Sync,
>;

/// The plugins this process knows, by name.
#[derive(Default, Clone)]
pub struct PluginRegistry {
    factories: std::collections::HashMap<String, Arc<dyn PluginFactory>>,
    providers: Vec<FactoryProvider>,
    validators: Vec<ConfigValidator>,
    hooks: Vec<CommitHook>,
    after_hooks: Vec<CommitHook>,
    check_only: bool,
}

impl PluginRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a factory (replacing one of the same name).
    pub fn register(&mut self, f: Arc<dyn PluginFactory>) {
        self.factories.insert(f.name().to_owned(), f);
    }

    /// Adds a hook run with every committed configuration (first load and reloads).
    pub fn add_commit_hook(&mut self, hook: CommitHook) {
        self.hooks.push(hook);
    }

    /// Adds a hook run after a committed configuration was swapped in and its plugins'
    /// [`Plugin::on_commit`] ran (e.g. to unload FFI runtimes nothing uses any more).
    pub fn add_after_commit_hook(&mut self, hook: CommitHook) {
        self.after_hooks.push(hook);
    }

    /// Runs the hooks added by [`PluginRegistry::add_after_commit_hook`].
    pub fn apply_after_commit_hooks(&self, cfg: &polygate_model::ConfigFile) {
        for h in &self.after_hooks {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(cfg))).is_err() {
                tracing::error!("a configuration commit hook panicked; the others still ran");
            }
        }
    }

    /// Runs the commit hooks; a hook that panics is logged and the others still run.
    pub fn apply_commit_hooks(&self, cfg: &polygate_model::ConfigFile) {
        for h in &self.hooks {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(cfg))).is_err() {
                tracing::error!("a configuration commit hook panicked; the others still ran");
            }
        }
    }

    /// A copy that only checks plugin configurations ([`PluginFactory::check`]) instead of
    /// building instances: what `polygate validate` uses.
    pub fn check_only(&self) -> PluginRegistry {
        PluginRegistry {
            check_only: true,
            ..self.clone()
        }
    }

    /// Whether this registry only checks.
    pub fn is_check_only(&self) -> bool {
        self.check_only
    }

    /// Adds a whole-configuration check ([`ConfigValidator`]).
    pub fn add_validator(&mut self, v: ConfigValidator) {
        self.validators.push(v);
    }

    /// Runs every [`ConfigValidator`], collecting their errors; returns their fingerprints
    /// combined.
    pub fn validate_config(
        &self,
        cfg: &polygate_model::ConfigFile,
    ) -> Result<u64, polygate_model::ConfigErrors> {
        let mut all = polygate_model::ConfigErrors::default();
        let mut fp = 0u64;
        for v in &self.validators {
            match v(cfg) {
                Ok(f) => fp = fp.rotate_left(17) ^ f,
                Err(e) => all.0.extend(e.0),
            }
        }
        if all.0.is_empty() { Ok(fp) } else { Err(all) }
    }

    /// Adds a provider of factories for configuration-declared plugins.
    pub fn add_provider(&mut self, p: FactoryProvider) {
        self.providers.push(p);
    }

    /// The factory for `name`: a registered one, else one a provider finds.
    pub fn get(&self, name: &str) -> Option<Arc<dyn PluginFactory>> {
        if let Some(f) = self.factories.get(name) {
            return Some(f.clone());
        }
        self.providers.iter().find_map(|p| p(name))
    }

    /// Whether a factory of this name is registered (not from a provider): names a
    /// configuration may not declare again.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// Names of all registered plugins, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.factories.keys().cloned().collect();
        v.sort();
        v
    }
}
