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

    /// The request body this plugin needs to see, at most this many bytes. When any plugin of a
    /// chain asks, the gateway reads the body before `rewrite` into [`RequestCtx::body`]
    /// (a longer body is refused with 413) and forwards the buffered copy.
    fn wants_body(&self) -> Option<usize> {
        None
    }

    /// Whether [`Plugin::body_filter`] does anything (the proxy skips the body hook otherwise).
    fn has_body_filter(&self) -> bool {
        false
    }

    /// `body_filter` phase, once per chunk; `eof` marks the last call.
    fn body_filter(&self, _ctx: &mut RequestCtx, _chunk: &mut Bytes, _eof: bool) {}

    /// `log` phase, after the response was sent (or the client went away).
    fn log(&self, _ctx: &RequestCtx) {}
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
    /// Validates a route/service/global-rule configuration and builds an instance.
    fn build(&self, conf: &serde_json::Value) -> Result<Arc<dyn Plugin>, ConfError>;
    /// For auth plugins: validates a consumer's configuration and returns the credential that
    /// identifies the consumer (e.g. key-auth's `key`).
    fn consumer_credential(&self, _conf: &serde_json::Value) -> Result<Option<String>, ConfError> {
        Ok(None)
    }
}

/// A hook run with each configuration before its plugins are built (e.g. to set the FFI
/// library path from the `gateway:` section).
pub type ConfigHook = Arc<dyn Fn(&polygate_model::ConfigFile) + Send + Sync>;

/// The plugins this process knows, by name.
#[derive(Default, Clone)]
pub struct PluginRegistry {
    factories: std::collections::HashMap<String, Arc<dyn PluginFactory>>,
    hooks: Vec<ConfigHook>,
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

    /// Adds a hook run with every configuration (first load and reloads) before plugins are
    /// built from it.
    pub fn add_config_hook(&mut self, hook: ConfigHook) {
        self.hooks.push(hook);
    }

    /// Runs the configuration hooks.
    pub fn apply_config_hooks(&self, cfg: &polygate_model::ConfigFile) {
        for h in &self.hooks {
            h(cfg);
        }
    }

    /// The factory for `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn PluginFactory>> {
        self.factories.get(name)
    }

    /// Names of all registered plugins, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.factories.keys().cloned().collect();
        v.sort();
        v
    }
}
