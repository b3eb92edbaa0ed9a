//! Serde types of the configuration file: the `gateway:` section and the APISIX resources.
//!
//! Field names are APISIX's, exactly as published. Every struct denies unknown fields so that a
//! typo is an error naming its key path instead of a silently ignored setting. Plugin
//! configurations stay opaque (`serde_json::Value`) here; each plugin validates its own.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// A JSON object as used for plugin configurations (`plugins: {name: conf}`).
pub type PluginMap = BTreeMap<String, serde_json::Value>;

/// A resource id: APISIX accepts a string (`^[a-zA-Z0-9-_.]+$`, 1–64 chars) or an integer ≥ 1.
/// Both forms are normalised to a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Id(pub String);

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string id or an integer id >= 1")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                Ok(Id(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                if v == 0 {
                    return Err(E::custom("integer id must be >= 1"));
                }
                Ok(Id(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                if v < 1 {
                    return Err(E::custom("integer id must be >= 1"));
                }
                Ok(Id(v.to_string()))
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// The whole configuration file: the optional polygate `gateway:` section plus APISIX resources.
///
/// An APISIX standalone `apisix.yaml` holding only resources is a valid file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// polygate's own settings (listeners, threads, timeouts, logs). Optional.
    #[serde(default)]
    pub gateway: Option<GatewaySection>,
    /// Settings an APISIX user keeps under `apisix:` in `config.yaml`, same names and
    /// meaning (`router.http`, `trusted_addresses`). Optional.
    #[serde(default)]
    pub apisix: Option<ApisixSection>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<std::sync::Arc<Route>>,
    /// Services.
    #[serde(default)]
    pub services: Vec<std::sync::Arc<Service>>,
    /// Upstreams.
    #[serde(default)]
    pub upstreams: Vec<std::sync::Arc<Upstream>>,
    /// Plugin configs (reusable plugin bundles referenced by `plugin_config_id`).
    #[serde(default)]
    pub plugin_configs: Vec<std::sync::Arc<PluginConfig>>,
    /// Global rules: plugins that run for every request.
    #[serde(default)]
    pub global_rules: Vec<GlobalRule>,
    /// Consumers.
    #[serde(default)]
    pub consumers: Vec<Consumer>,
    /// Consumer groups.
    #[serde(default)]
    pub consumer_groups: Vec<ConsumerGroup>,
    /// SSL certificates (validated; served by the TLS listener of a later release).
    #[serde(default)]
    pub ssls: Vec<Ssl>,
    /// Per-plugin global configuration, each entry with `id` = plugin name.
    #[serde(default)]
    pub plugin_metadata: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// The `apisix:` section: the settings of APISIX's `config.yaml` that polygate honours.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ApisixSection {
    /// `router.http`: `radixtree_host_uri` (default), `radixtree_uri` or
    /// `radixtree_uri_with_parameter`.
    #[serde(default)]
    pub router: RouterSection,
    /// Peers (IP addresses or CIDRs) whose `X-Forwarded-Proto/-Host/-Port` and `Forwarded`
    /// headers are passed on (APISIX 3.14). Other peers' copies are replaced by what polygate
    /// observed; with this list set, an untrusted peer's `X-Forwarded-For` is replaced by its
    /// own address too. Default: empty (no peer trusted).
    #[serde(default)]
    pub trusted_addresses: Vec<String>,
    /// `data_encryption`: how SSL private keys and plugins' `encrypt_fields` are stored in
    /// etcd (read with it, and written with it by the Admin API). APISIX's defaults.
    #[serde(default)]
    pub data_encryption: DataEncryption,
    /// Any other key of APISIX's `config.yaml` section is accepted and ignored, so an
    /// APISIX user can paste the section as it is (`polygate validate` does not check them).
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// `apisix.data_encryption`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DataEncryption {
    /// Encrypt plugins' `encrypt_fields` (key-auth's `key`); default true.
    #[serde(default = "dtrue")]
    pub enable_encrypt_fields: bool,
    /// Keys (16 bytes: AES-128-CBC, 32: AES-256-CBC); the first encrypts, all decrypt.
    /// Default: APISIX's `["qeddd145sfvddff3", "edd1c9f0985e76a2"]`. Empty: stored as given.
    #[serde(default = "default_keyring")]
    pub keyring: Vec<String>,
}

impl Default for DataEncryption {
    fn default() -> Self {
        DataEncryption {
            enable_encrypt_fields: true,
            keyring: default_keyring(),
        }
    }
}

fn default_keyring() -> Vec<String> {
    vec!["qeddd145sfvddff3".into(), "edd1c9f0985e76a2".into()]
}

/// `apisix.router`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RouterSection {
    /// The HTTP router.
    #[serde(default = "default_router_http")]
    pub http: String,
    /// Any other key (`ssl`, ...), accepted and ignored.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl Default for RouterSection {
    fn default() -> Self {
        RouterSection {
            http: default_router_http(),
            other: BTreeMap::new(),
        }
    }
}

fn default_router_http() -> String {
    "radixtree_host_uri".into()
}

/// polygate's process settings. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Where to accept client connections. Default: one plain HTTP listener on `0.0.0.0:9080`.
    #[serde(default = "default_listeners")]
    pub listeners: Vec<ListenerConfig>,
    /// Number of worker threads, each with its own event loop and `SO_REUSEPORT` listener.
    /// Default (or 0): the number of CPUs.
    #[serde(default)]
    pub worker_threads: usize,
    /// Timeouts in seconds.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Log level: `error`, `warn`, `info` (default), `debug`, `trace`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Access log settings.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// Prometheus metrics listener (`/metrics`). Off when absent.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Address of the built-in demo upstream (answers with a JSON echo of the request).
    /// Off when absent.
    #[serde(default)]
    pub demo_upstream: Option<String>,
    /// How often the config file is checked for changes, in seconds. Default 1.
    #[serde(default = "default_watch_interval")]
    pub watch_interval: f64,
    /// Directories searched for FFI runtime libraries given by name, before `LD_LIBRARY_PATH`.
    #[serde(default)]
    pub ffi_lib_path: Vec<String>,
    /// Settings of the embedded LuaJIT (`lua` and `serverless-*` plugins, `ngx.*`).
    #[serde(default)]
    pub lua: LuaConfig,
    /// Merge runs of `/` in request paths before routing, as nginx's `merge_slashes` (default
    /// true).
    #[serde(default = "dtrue")]
    pub merge_slashes: bool,
    /// proxy-wasm filters: the plugins they provide and the limits they run under.
    #[serde(default)]
    pub wasm: WasmConfig,
    /// TLS settings beside the `ssls` resources (APISIX's `apisix.ssl` in `config.yaml`).
    #[serde(default)]
    pub ssl: SslSettings,
    /// HTTP/2 limits of the client-facing listeners (TLS with ALPN `h2`, and h2c).
    #[serde(default)]
    pub http2: Http2Settings,
    /// The Admin API (APISIX's `deployment.admin`): on by default at `127.0.0.1:9180`.
    #[serde(default)]
    pub admin: AdminSettings,
    /// Where routes and the other resources come from: `yaml` (default: this file; `json`
    /// is accepted as its synonym) or `etcd` (`gateway.etcd`, shared by a cluster), as
    /// APISIX's `deployment.config_provider`.
    #[serde(default)]
    pub config_provider: ConfigProvider,
    /// The etcd cluster of `config_provider: etcd` (APISIX's `deployment.etcd`).
    #[serde(default)]
    pub etcd: EtcdSettings,
}

/// `gateway.config_provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConfigProvider {
    /// Resources from the configuration file.
    #[default]
    #[serde(alias = "json", alias = "file")]
    Yaml,
    /// Resources from etcd, in APISIX's layout.
    Etcd,
}

/// `gateway.admin`: the Admin API's listener and access control.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Serve the Admin API (default true).
    #[serde(default = "dtrue")]
    pub enabled: bool,
    /// `ip:port` of the Admin API (default `127.0.0.1:9180`). When this default address is
    /// taken, the gateway starts without an Admin API (logged); an address given here must
    /// bind.
    #[serde(default)]
    pub addr: Option<String>,
    /// Keys (APISIX's `admin_key`). Without any, a key is generated on first start and
    /// stored in `key_file`.
    #[serde(default)]
    pub admin_key: Vec<AdminKey>,
    /// Client addresses allowed to reach the Admin API (CIDRs or addresses; default
    /// `127.0.0.0/24`, as APISIX).
    #[serde(default = "default_allow_admin")]
    pub allow_admin: Vec<String>,
    /// Where a generated key is stored (mode 0600). Default:
    /// `$XDG_STATE_HOME/polygate/admin_key` (`~/.local/state/polygate/admin_key`).
    #[serde(default)]
    pub key_file: Option<String>,
    /// A directory served at `/ui/` on the Admin API's listener (APISIX's dashboard build).
    #[serde(default)]
    pub ui: Option<String>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            enabled: true,
            addr: None,
            admin_key: Vec::new(),
            allow_admin: default_allow_admin(),
            key_file: None,
            ui: None,
        }
    }
}

fn default_allow_admin() -> Vec<String> {
    vec!["127.0.0.0/24".into()]
}

/// The address the Admin API listens on when `gateway.admin.addr` is not given.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9180";

/// One Admin API key (APISIX's `deployment.admin.admin_key[]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    /// A name for logs.
    #[serde(default)]
    pub name: String,
    /// The key clients send (`X-API-KEY`, `?api_key=` or the `x_api_key` cookie).
    pub key: String,
    /// `admin` (every method) or `viewer` (GET only).
    #[serde(default)]
    pub role: AdminRole,
}

/// What an Admin API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminRole {
    /// Everything.
    #[default]
    Admin,
    /// GET only.
    Viewer,
}

/// `gateway.etcd` (APISIX's `deployment.etcd`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// Endpoints, `http://host:port` (default `http://127.0.0.1:2379`).
    #[serde(default = "default_etcd_hosts")]
    pub host: Vec<String>,
    /// Key prefix (default `/apisix`).
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Time limit of one etcd request, in seconds (default 30).
    #[serde(default = "default_etcd_timeout")]
    pub timeout: f64,
    /// User of etcd's authentication.
    #[serde(default)]
    pub user: Option<String>,
    /// Password of `user`.
    #[serde(default)]
    pub password: Option<String>,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        EtcdSettings {
            host: default_etcd_hosts(),
            prefix: default_etcd_prefix(),
            timeout: default_etcd_timeout(),
            user: None,
            password: None,
        }
    }
}

fn default_etcd_hosts() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}

fn default_etcd_prefix() -> String {
    "/apisix".into()
}

fn default_etcd_timeout() -> f64 {
    30.0
}

/// `gateway.ssl`: process-wide TLS settings. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SslSettings {
    /// The server name used to choose a certificate for a client that sends no SNI (APISIX's
    /// `apisix.ssl.fallback_sni`). Without it such a handshake is refused.
    #[serde(default)]
    pub fallback_sni: Option<String>,
    /// CA certificates that upstream TLS certificates are verified against: `system` (default:
    /// the system's trust store) or the path of a PEM file (APISIX's
    /// `apisix.ssl.ssl_trusted_certificate`).
    #[serde(default)]
    pub ssl_trusted_certificate: Option<String>,
    /// Offer TLS session tickets (keys rotate every 6 hours; default true). Session-id
    /// resumption is always on.
    #[serde(default)]
    pub session_tickets: Option<bool>,
}

/// `gateway.http2`: limits of downstream HTTP/2 connections.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http2Settings {
    /// Concurrent streams per connection (default 128, nginx's `http2_max_concurrent_streams`).
    #[serde(default = "default_h2_streams")]
    pub max_concurrent_streams: u32,
    /// Largest header list a client may send, in bytes (default 64 KiB).
    #[serde(default = "default_h2_header_list")]
    pub max_header_list_size: u32,
    /// Initial flow-control window of each stream, in bytes (default 64 KiB, as nginx).
    #[serde(default = "default_h2_window")]
    pub initial_stream_window: u32,
    /// Initial flow-control window of each connection, in bytes (default 1 MiB).
    #[serde(default = "default_h2_conn_window")]
    pub initial_connection_window: u32,
    /// Streams a client may reset before polygate answers them (rapid-reset defence); past
    /// this many pending resets the connection is closed with `ENHANCE_YOUR_CALM`. Default 20.
    #[serde(default = "default_h2_resets")]
    pub max_pending_accept_reset_streams: usize,
}

impl Default for Http2Settings {
    fn default() -> Self {
        Http2Settings {
            max_concurrent_streams: default_h2_streams(),
            max_header_list_size: default_h2_header_list(),
            initial_stream_window: default_h2_window(),
            initial_connection_window: default_h2_conn_window(),
            max_pending_accept_reset_streams: default_h2_resets(),
        }
    }
}

fn default_h2_streams() -> u32 {
    128
}
fn default_h2_header_list() -> u32 {
    64 * 1024
}
fn default_h2_window() -> u32 {
    64 * 1024
}
fn default_h2_conn_window() -> u32 {
    1024 * 1024
}
fn default_h2_resets() -> usize {
    20
}

/// `gateway.wasm`: proxy-wasm plugins, as APISIX's `wasm.plugins` in `config.yaml`, and the
/// limits every filter runs under. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmConfig {
    /// The plugins: each is then configured on routes, services, plugin configs, consumers
    /// and global rules by its name, `{conf: "..."}`.
    #[serde(default)]
    pub plugins: Vec<WasmPluginDecl>,
    /// CPU time one callback may take, in seconds (default 0.1; 0: no limit). A callback
    /// past it is stopped: that request fails with 500 and the filter's instance is rebuilt.
    #[serde(default = "default_wasm_time")]
    pub time_limit: f64,
    /// Linear memory one filter instance may grow to (default 64m, at most 4g).
    #[serde(default = "default_wasm_memory")]
    pub memory_limit: ByteSize,
    /// Largest body a filter may hold back by pausing its body callback (default 8m); past
    /// it a request body is refused with 413 and a response fails with 500.
    #[serde(default = "default_wasm_body")]
    pub body_limit: ByteSize,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            plugins: Vec::new(),
            time_limit: default_wasm_time(),
            memory_limit: default_wasm_memory(),
            body_limit: default_wasm_body(),
        }
    }
}

fn default_wasm_time() -> f64 {
    0.1
}
fn default_wasm_memory() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_wasm_body() -> ByteSize {
    ByteSize(8 << 20)
}

/// One proxy-wasm plugin (APISIX's `wasm.plugins[]` entry, plus polygate's optional VM
/// settings).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WasmPluginDecl {
    /// Plugin name, used in `plugins:` maps; must not be a built-in plugin's name.
    pub name: String,
    /// Path of the `.wasm` (or `.wat`) module, relative to the working directory.
    pub file: String,
    /// Priority (higher runs first), as for any plugin.
    pub priority: i32,
    /// Phase in which `proxy_on_request_headers` runs: `access` (default) or `rewrite`
    /// (APISIX's `http_request_phase`).
    #[serde(default = "default_wasm_phase")]
    pub http_request_phase: String,
    /// The VM id (`plugin_vm_id`; shared data and queues are per VM id). Default: empty, as
    /// Envoy's.
    #[serde(default)]
    pub vm_id: String,
    /// The VM configuration handed to `proxy_on_vm_start` (a string, or an object sent as
    /// JSON).
    #[serde(default)]
    pub vm_config: Option<serde_json::Value>,
    /// How `proxy_on_request_body` sees the request body: `buffer` (default; read whole,
    /// up to `body_limit`, before the request callbacks, as APISIX's wasm host does: the
    /// filter may pause for callouts and answer locally) or `stream` (chunk by chunk as it
    /// goes upstream; a paused callback holds chunks back).
    #[serde(default = "default_wasm_request_body")]
    pub request_body: String,
}

fn default_wasm_request_body() -> String {
    "buffer".into()
}

fn default_wasm_phase() -> String {
    "access".into()
}

/// `gateway.lua`: the embedded LuaJIT's settings. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LuaConfig {
    /// Search path for `require` of user modules, like OpenResty's `lua_package_path`
    /// (`/etc/polygate/lua/?.lua;;`; `;;` stands for the default path).
    #[serde(default)]
    pub package_path: Option<String>,
    /// Search path for Lua C modules (`lua_package_cpath`).
    #[serde(default)]
    pub package_cpath: Option<String>,
    /// Process-wide shared dictionaries for `ngx.shared.NAME`, name → capacity (`10m`, `512k`,
    /// or bytes), like `lua_shared_dict`.
    #[serde(default)]
    pub shared_dict: std::collections::BTreeMap<String, ByteSize>,
    /// Memory limit of each Lua state (one per worker thread). Default `128m`; 0 = none.
    #[serde(default = "default_lua_memory")]
    pub memory_limit: ByteSize,
    /// Instructions a handler may run before it yields (a runaway loop fails with an error).
    /// Default 100,000,000 (about 0.1–0.3 s of CPU); 0 = no limit, which also turns LuaJIT's
    /// JIT compiler on (the limit needs the interpreter: compiled loops skip count hooks).
    #[serde(default = "default_lua_instructions")]
    pub instruction_limit: u64,
    /// Seconds a handler may run before it yields (each synchronous step: a resume), so a
    /// runaway handler cannot stall the other requests of its worker thread. Wall-clock time
    /// (time the thread was preempted counts). Default 0.02 (20 ms); 0 = none. Checked every
    /// 1000 instructions, like `instruction_limit`; with both at 0 LuaJIT's JIT compiler is on.
    /// An `ngx.load_ffi` call answered at once does not yield, unless the step has used half
    /// of either limit: then it yields anyway, so a loop of such calls stays within them.
    #[serde(default = "default_lua_time")]
    pub time_limit: f64,
    /// Pending `ngx.timer` timers per worker, like `lua_max_pending_timers`. Default 1024.
    #[serde(default = "default_lua_timers")]
    pub max_pending_timers: usize,
    /// Seconds a call through `ngx.load_ffi` waits for its runtime's answer (lua-resty-ffi has
    /// no limit; polygate fails the call with `false, "timeout"`). Default 60; per runtime with
    /// the `timeout` load option.
    #[serde(default = "default_lua_ffi_timeout")]
    pub ffi_timeout: f64,
}

impl Default for LuaConfig {
    fn default() -> Self {
        LuaConfig {
            package_path: None,
            package_cpath: None,
            shared_dict: Default::default(),
            memory_limit: default_lua_memory(),
            instruction_limit: default_lua_instructions(),
            time_limit: default_lua_time(),
            max_pending_timers: default_lua_timers(),
            ffi_timeout: default_lua_ffi_timeout(),
        }
    }
}

fn default_lua_memory() -> ByteSize {
    ByteSize(128 << 20)
}
fn default_lua_instructions() -> u64 {
    100_000_000
}
fn default_lua_time() -> f64 {
    0.02
}
fn default_lua_timers() -> usize {
    1024
}
fn default_lua_ffi_timeout() -> f64 {
    60.0
}

/// A size in bytes, written as a number or with a `k`/`m`/`g` suffix (`10m`), as nginx does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `10m`, `512k`, `1g` or `4096`.
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let (num, mul) = match s.char_indices().last()? {
            (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
            (i, 'm' | 'M') => (&s[..i], 1 << 20),
            (i, 'g' | 'G') => (&s[..i], 1 << 30),
            _ => (s, 1),
        };
        num.trim()
            .parse::<u64>()
            .ok()?
            .checked_mul(mul)
            .map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!("invalid size {s:?} (use 10m, 512k or bytes)"))
            }),
        }
    }
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listeners: default_listeners(),
            worker_threads: 0,
            timeouts: TimeoutsConfig::default(),
            log_level: default_log_level(),
            access_log: AccessLogConfig::default(),
            metrics: None,
            demo_upstream: None,
            watch_interval: default_watch_interval(),
            ffi_lib_path: Vec::new(),
            lua: LuaConfig::default(),
            merge_slashes: true,
            wasm: WasmConfig::default(),
            ssl: SslSettings::default(),
            http2: Http2Settings::default(),
            admin: AdminSettings::default(),
            config_provider: ConfigProvider::default(),
            etcd: EtcdSettings::default(),
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        addr: "0.0.0.0:9080".into(),
        tls: false,
        http2: false,
    }]
}

fn default_log_level() -> String {
    "info".into()
}

fn default_watch_interval() -> f64 {
    1.0
}

/// One client-facing listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `ip:port` to bind.
    pub addr: String,
    /// Terminate TLS on this listener, with the certificate of the `ssls` resource matching the
    /// client's SNI (or `gateway.ssl.fallback_sni`).
    #[serde(default)]
    pub tls: bool,
    /// Accept HTTP/2 besides HTTP/1.1: by ALPN `h2` on a TLS listener, by prior knowledge
    /// (h2c) on a plain one.
    #[serde(default)]
    pub http2: bool,
}

/// Process-wide timeouts, in seconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Time allowed to receive a request's headers (also bounds how long an idle keep-alive
    /// connection waits for its next request). Default 60.
    #[serde(default = "d60")]
    pub client_header: f64,
    /// Upstream timeouts used when neither route nor upstream set `timeout`. Default 60 each.
    #[serde(default = "default_upstream_timeout")]
    pub upstream: Timeout,
    /// How long in-flight requests may run after SIGTERM/SIGQUIT before the process exits. Default 30.
    #[serde(default = "d30")]
    pub graceful_shutdown: f64,
    /// How long one write to a client may wait (the client stopped reading), as nginx's
    /// `send_timeout`; the connection is then closed. Default 60.
    #[serde(default = "d60")]
    pub client_send: f64,
    /// How long the gateway waits for the next piece of a request body from the client, as
    /// nginx's `client_body_timeout`. Default 60.
    #[serde(default = "d60")]
    pub client_body: f64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            client_header: 60.0,
            upstream: default_upstream_timeout(),
            graceful_shutdown: 30.0,
            client_send: 60.0,
            client_body: 60.0,
        }
    }
}

fn d60() -> f64 {
    60.0
}
fn d30() -> f64 {
    30.0
}
fn default_upstream_timeout() -> Timeout {
    Timeout {
        connect: 60.0,
        send: 60.0,
        read: 60.0,
    }
}

/// Access log settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Write one line per request. Default true.
    #[serde(default = "dtrue")]
    pub enabled: bool,
    /// File to append to; standard output when absent.
    #[serde(default)]
    pub path: Option<String>,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            enabled: true,
            path: None,
        }
    }
}

fn dtrue() -> bool {
    true
}

/// Prometheus metrics listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ip:port` serving `GET /metrics`.
    pub addr: String,
}

/// `timeout {connect, send, read}` in seconds; all three required, each > 0.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeout {
    /// Connect timeout.
    pub connect: f64,
    /// Send timeout.
    pub send: f64,
    /// Read timeout.
    pub read: f64,
}

/// An APISIX route.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Route id.
    #[serde(default)]
    pub id: Option<Id>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub desc: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// One URI pattern (exact, `/prefix*`, `/user/:id`).
    #[serde(default)]
    pub uri: Option<String>,
    /// Several URI patterns.
    #[serde(default)]
    pub uris: Option<Vec<String>>,
    /// One host pattern (`*.example.com` allowed).
    #[serde(default)]
    pub host: Option<String>,
    /// Several host patterns.
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// One client address or CIDR.
    #[serde(default)]
    pub remote_addr: Option<String>,
    /// Several client addresses or CIDRs.
    #[serde(default)]
    pub remote_addrs: Option<Vec<String>>,
    /// Allowed methods; all when absent.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// Higher first among routes with the same URI. Default 0.
    #[serde(default)]
    pub priority: i64,
    /// lua-resty-expr expression list.
    #[serde(default)]
    pub vars: Option<serde_json::Value>,
    /// Lua filter function (not supported yet: rejected by validation).
    #[serde(default)]
    pub filter_func: Option<String>,
    /// Plugins keyed by name.
    #[serde(default)]
    pub plugins: Option<PluginMap>,
    /// Route script, APISIX's plugin orchestration (not supported: rejected by validation).
    #[serde(default)]
    pub script: Option<String>,
    /// Script id (not supported: rejected by validation).
    #[serde(default)]
    pub script_id: Option<Id>,
    /// Inline upstream (boxed: most routes reference an upstream, and an inline one is large).
    #[serde(default)]
    pub upstream: Option<Box<Upstream>>,
    /// Referenced upstream.
    #[serde(default)]
    pub upstream_id: Option<Id>,
    /// Referenced service.
    #[serde(default)]
    pub service_id: Option<Id>,
    /// Referenced plugin config.
    #[serde(default)]
    pub plugin_config_id: Option<Id>,
    /// Overrides the upstream's timeout.
    #[serde(default)]
    pub timeout: Option<Timeout>,
    /// WebSocket proxying (served by a later release).
    #[serde(default)]
    pub enable_websocket: Option<bool>,
    /// 1 enabled (default), 0 disabled.
    #[serde(default)]
    pub status: Option<i64>,
    /// Server-managed timestamp (accepted in files).
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp (accepted in files).
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// An APISIX service: plugins, upstream and hosts shared by routes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Service id.
    #[serde(default)]
    pub id: Option<Id>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub desc: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Plugins keyed by name.
    #[serde(default)]
    pub plugins: Option<PluginMap>,
    /// Inline upstream (boxed: most routes reference an upstream, and an inline one is large).
    #[serde(default)]
    pub upstream: Option<Box<Upstream>>,
    /// Referenced upstream.
    #[serde(default)]
    pub upstream_id: Option<Id>,
    /// Host patterns applied to routes that set none.
    #[serde(default)]
    pub hosts: Option<Vec<String>>,
    /// WebSocket proxying (served by a later release).
    #[serde(default)]
    pub enable_websocket: Option<bool>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// An APISIX upstream.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Upstream id (absent for inline upstreams).
    #[serde(default)]
    pub id: Option<Id>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub desc: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// `roundrobin` (default), `chash`, `least_conn`, `ewma`.
    #[serde(default, rename = "type")]
    pub lb_type: Option<String>,
    /// For `chash`: `vars` (default), `header`, `cookie`, `consumer`, `vars_combinations`.
    #[serde(default)]
    pub hash_on: Option<String>,
    /// For `chash`: the variable, header or cookie name.
    #[serde(default)]
    pub key: Option<String>,
    /// Target nodes.
    #[serde(default)]
    pub nodes: Option<Nodes>,
    /// Service discovery name (discovery is served by a later release).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Service discovery type.
    #[serde(default)]
    pub discovery_type: Option<String>,
    /// Service discovery arguments.
    #[serde(default)]
    pub discovery_args: Option<serde_json::Value>,
    /// Number of retries; the node count when absent.
    #[serde(default)]
    pub retries: Option<i64>,
    /// Total time budget for retries in seconds (0 = unlimited).
    #[serde(default)]
    pub retry_timeout: Option<f64>,
    /// Timeouts.
    #[serde(default)]
    pub timeout: Option<Timeout>,
    /// Health checks: active probes and passive observation of real traffic.
    #[serde(default)]
    pub checks: Option<HealthChecks>,
    /// `pass` (default), `node`, `rewrite`.
    #[serde(default)]
    pub pass_host: Option<String>,
    /// Host sent upstream when `pass_host` is `rewrite`.
    #[serde(default)]
    pub upstream_host: Option<String>,
    /// `http` (default), `https`, `grpc`, `grpcs`, `tcp`, `tls`, `udp`, `kafka`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Client certificate settings for TLS upstreams.
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
    /// Keep-alive connection pool per upstream.
    #[serde(default)]
    pub keepalive_pool: Option<KeepalivePool>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// `keepalive_pool {size, idle_timeout, requests}`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepalivePool {
    /// Idle connections kept per node. Default 320.
    #[serde(default = "d320")]
    pub size: i64,
    /// Seconds an idle connection is kept. Default 60.
    #[serde(default = "d60")]
    pub idle_timeout: f64,
    /// Requests served by one connection before it is closed. Default 1000.
    #[serde(default = "d1000")]
    pub requests: i64,
}

impl Default for KeepalivePool {
    fn default() -> Self {
        KeepalivePool {
            size: 320,
            idle_timeout: 60.0,
            requests: 1000,
        }
    }
}

fn d320() -> i64 {
    320
}
fn d1000() -> i64 {
    1000
}

/// Upstream nodes: APISIX accepts a map `"host:port": weight` or an array of node objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Nodes(pub Vec<NodeSpec>);

/// One upstream node.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Host name or IP.
    pub host: String,
    /// Port; 80 (or 443 for https) when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// Weight (≥ 0; 0 takes no traffic).
    #[serde(default = "d1")]
    pub weight: i64,
    /// Tier: lower values are backups used only when higher tiers are down. Default 0.
    #[serde(default)]
    pub priority: i64,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

fn d1() -> i64 {
    1
}

impl<'de> Deserialize<'de> for Nodes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NodesVisitor;
        impl<'de> Visitor<'de> for NodesVisitor {
            type Value = Nodes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    r#"a map of "host:port": weight or an array of {host, port, weight, priority}"#,
                )
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Nodes, A::Error> {
                let mut out = Vec::new();
                while let Some((k, w)) = map.next_entry::<String, i64>()? {
                    let (host, port) = split_host_port(&k).map_err(de::Error::custom)?;
                    out.push(NodeSpec {
                        host,
                        port,
                        weight: w,
                        priority: 0,
                        metadata: None,
                    });
                }
                Ok(Nodes(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nodes, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element::<NodeSpec>()? {
                    out.push(n);
                }
                Ok(Nodes(out))
            }
        }
        d.deserialize_any(NodesVisitor)
    }
}

/// Splits `host:port`, `[v6]:port`, `host` into host and optional port.
pub fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return Err(format!("invalid node address {s:?}"));
        };
        let host = rest[..end].to_owned();
        let after = &rest[end + 1..];
        if after.is_empty() {
            return Ok((host, None));
        }
        let Some(p) = after.strip_prefix(':') else {
            return Err(format!("invalid node address {s:?}"));
        };
        let port = p
            .parse::<u16>()
            .map_err(|_| format!("invalid port in node address {s:?}"))?;
        return Ok((host, Some(port)));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("invalid port in node address {s:?}"))?;
            Ok((h.to_owned(), Some(port)))
        }
        _ => Ok((s.to_owned(), None)),
    }
}

/// A reusable bundle of plugins referenced by `plugin_config_id`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Id.
    #[serde(default)]
    pub id: Option<Id>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub desc: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Plugins keyed by name.
    #[serde(default)]
    pub plugins: PluginMap,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// Plugins run for every request.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRule {
    /// Id.
    #[serde(default)]
    pub id: Option<Id>,
    /// Plugins keyed by name.
    #[serde(default)]
    pub plugins: PluginMap,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// An API consumer. Auth plugins in `plugins` carry its credentials.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consumer {
    /// Unique name (`^[a-zA-Z0-9_\-]+$`).
    #[serde(default)]
    pub username: String,
    /// Description.
    #[serde(default)]
    pub desc: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Plugins keyed by name.
    #[serde(default)]
    pub plugins: PluginMap,
    /// Consumer group.
    #[serde(default)]
    pub group_id: Option<Id>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// Plugins shared by the consumers of a group.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerGroup {
    /// Id.
    #[serde(default)]
    pub id: Option<Id>,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub desc: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Plugins keyed by name.
    #[serde(default)]
    pub plugins: PluginMap,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// An SSL certificate object.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ssl {
    /// Id.
    #[serde(default)]
    pub id: Option<Id>,
    /// PEM certificate.
    #[serde(default)]
    pub cert: Option<String>,
    /// PEM private key.
    #[serde(default)]
    pub key: Option<String>,
    /// Extra certificates (e.g. ECC besides RSA).
    #[serde(default)]
    pub certs: Option<Vec<String>>,
    /// Keys of `certs`.
    #[serde(default)]
    pub keys: Option<Vec<String>>,
    /// Server names.
    #[serde(default)]
    pub snis: Option<Vec<String>>,
    /// One server name.
    #[serde(default)]
    pub sni: Option<String>,
    /// mTLS client settings.
    #[serde(default)]
    pub client: Option<serde_json::Value>,
    /// `server` (default) or `client`.
    #[serde(default, rename = "type")]
    pub ssl_type: Option<String>,
    /// Allowed protocols.
    #[serde(default)]
    pub ssl_protocols: Option<Vec<String>>,
    /// 1 enabled, 0 disabled.
    #[serde(default)]
    pub status: Option<i64>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub create_time: Option<i64>,
    /// Server-managed timestamp.
    #[serde(default)]
    pub update_time: Option<i64>,
}

/// `checks` of an upstream, with APISIX's fields and defaults (lua-resty-healthcheck's
/// semantics). `passive` needs `active`, as in APISIX's schema.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthChecks {
    /// Probes sent by the gateway.
    #[serde(default)]
    pub active: Option<ActiveCheck>,
    /// Verdicts taken from proxied requests.
    #[serde(default)]
    pub passive: Option<PassiveCheck>,
}

/// `checks.active`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheck {
    /// `http` (default), `https` or `tcp`.
    #[serde(default = "default_check_type", rename = "type")]
    pub check_type: String,
    /// Seconds one probe may take (default 1).
    #[serde(default = "d1f")]
    pub timeout: f64,
    /// Probes in flight at once for this upstream (default 10).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Host header (and SNI) of the probes; the node's host when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Port probed instead of the node's.
    #[serde(default)]
    pub port: Option<u16>,
    /// Path of the probe (default `/`).
    #[serde(default = "default_http_path")]
    pub http_path: String,
    /// Method of the probe (default `GET`).
    #[serde(default = "default_http_method")]
    pub http_method: String,
    /// Body of the probe (default none).
    #[serde(default)]
    pub http_req_body: Option<String>,
    /// Verify the node's certificate on `https` probes (default true).
    #[serde(default = "dtrue")]
    pub https_verify_certificate: bool,
    /// Extra probe headers, `"Name: value"` each.
    #[serde(default)]
    pub req_headers: Vec<String>,
    /// When a node counts as healthy again.
    #[serde(default)]
    pub healthy: ActiveHealthy,
    /// When a node counts as unhealthy.
    #[serde(default)]
    pub unhealthy: ActiveUnhealthy,
}

/// `checks.active.healthy`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthy {
    /// Seconds between probes of a healthy node (default 1).
    #[serde(default = "d1f")]
    pub interval: f64,
    /// Statuses that count as a success (default 200, 302).
    #[serde(default = "default_active_ok")]
    pub http_statuses: Vec<u16>,
    /// Consecutive successes that make an unhealthy node healthy (default 2).
    #[serde(default = "default_two")]
    pub successes: u32,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: 1.0,
            http_statuses: default_active_ok(),
            successes: 2,
        }
    }
}

/// `checks.active.unhealthy`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveUnhealthy {
    /// Seconds between probes of an unhealthy node (default 1).
    #[serde(default = "d1f")]
    pub interval: f64,
    /// Statuses that count as an HTTP failure (default 429, 404, 500–505).
    #[serde(default = "default_active_bad")]
    pub http_statuses: Vec<u16>,
    /// Consecutive HTTP failures that make a node unhealthy (default 5).
    #[serde(default = "default_five")]
    pub http_failures: u32,
    /// Consecutive connection failures that make a node unhealthy (default 2).
    #[serde(default = "default_two")]
    pub tcp_failures: u32,
    /// Consecutive timeouts that make a node unhealthy (default 3).
    #[serde(default = "default_three")]
    pub timeouts: u32,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: 1.0,
            http_statuses: default_active_bad(),
            http_failures: 5,
            tcp_failures: 2,
            timeouts: 3,
        }
    }
}

/// `checks.passive`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveCheck {
    /// `http` (default), `https` or `tcp` (only connection failures and timeouts count).
    #[serde(default = "default_check_type", rename = "type")]
    pub check_type: String,
    /// When a node counts as healthy again.
    #[serde(default)]
    pub healthy: PassiveHealthy,
    /// When a node counts as unhealthy.
    #[serde(default)]
    pub unhealthy: PassiveUnhealthy,
}

/// `checks.passive.healthy`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthy {
    /// Statuses that count as a success (default 200–208, 226, 300–308).
    #[serde(default = "default_passive_ok")]
    pub http_statuses: Vec<u16>,
    /// Consecutive successes that make a node healthy (default 5).
    #[serde(default = "default_five")]
    pub successes: u32,
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: default_passive_ok(),
            successes: 5,
        }
    }
}

/// `checks.passive.unhealthy`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveUnhealthy {
    /// Statuses that count as an HTTP failure (default 429, 500, 503).
    #[serde(default = "default_passive_bad")]
    pub http_statuses: Vec<u16>,
    /// Consecutive HTTP failures that make a node unhealthy (default 5).
    #[serde(default = "default_five")]
    pub http_failures: u32,
    /// Consecutive connection failures that make a node unhealthy (default 2).
    #[serde(default = "default_two")]
    pub tcp_failures: u32,
    /// Consecutive timeouts that make a node unhealthy (default 7).
    #[serde(default = "default_seven")]
    pub timeouts: u32,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: default_passive_bad(),
            http_failures: 5,
            tcp_failures: 2,
            timeouts: 7,
        }
    }
}

fn default_check_type() -> String {
    "http".into()
}
fn d1f() -> f64 {
    1.0
}
fn default_concurrency() -> u32 {
    10
}
fn default_http_path() -> String {
    "/".into()
}
fn default_http_method() -> String {
    "GET".into()
}
fn default_two() -> u32 {
    2
}
fn default_three() -> u32 {
    3
}
fn default_five() -> u32 {
    5
}
fn default_seven() -> u32 {
    7
}
fn default_active_ok() -> Vec<u16> {
    vec![200, 302]
}
fn default_active_bad() -> Vec<u16> {
    vec![429, 404, 500, 501, 502, 503, 504, 505]
}
fn default_passive_ok() -> Vec<u16> {
    vec![
        200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 306, 307,
        308,
    ]
}
fn default_passive_bad() -> Vec<u16> {
    vec![429, 500, 503]
}
