//! The loggers (`http-logger` priority 410, `tcp-logger` 405, `file-logger` 399, log phase)
//! and APISIX's batch processor they share.
//!
//! Each request's entry is APISIX's "full log" (request, response, server, upstream, route,
//! service, consumer, client address, latencies) or the `log_format` the configuration gives.
//! Entries go to a batch processor per plugin instance, on one logging thread of the process
//! (`polygate-log`): a batch is sent when it holds `batch_max_size` entries, when no entry came
//! for `inactive_timeout` seconds, or when its oldest entry is `buffer_duration` seconds old.
//! A failed batch is retried `max_retry_count` times, `retry_delay` seconds apart, then dropped
//! with an error log. The backlog is bounded: entries that find it full are dropped and
//! counted in the log, never blocking a request.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use polygate_core::{ConfError, RequestCtx};
use polygate_router::{Expr, VarSource};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// The batch processor fields every logger takes.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchConf {
    /// `name` (for logs).
    #[serde(default = "log_buffer")]
    pub name: String,
    /// Entries per batch.
    #[serde(default = "d1000")]
    pub batch_max_size: usize,
    /// Seconds without a new entry before the batch is sent.
    #[serde(default = "d5")]
    pub inactive_timeout: u64,
    /// Seconds the oldest entry of a batch may wait.
    #[serde(default = "d60")]
    pub buffer_duration: u64,
    /// Retries of a failed batch.
    #[serde(default)]
    pub max_retry_count: u32,
    /// Seconds between retries.
    #[serde(default = "d1")]
    pub retry_delay: u64,
}

fn log_buffer() -> String {
    "log buffer".into()
}
fn d1000() -> usize {
    1000
}
fn d5() -> u64 {
    5
}
fn d60() -> u64 {
    60
}
fn d1() -> u64 {
    1
}

/// The batch fields' names (taken out of a logger's configuration before its own parsing).
pub const BATCH_FIELDS: [&str; 6] = [
    "name",
    "batch_max_size",
    "inactive_timeout",
    "buffer_duration",
    "max_retry_count",
    "retry_delay",
];

/// The batch processor's JSON Schema properties, added to a logger's schema.
pub fn batch_schema(props: &mut Value) {
    let extra = json!({
        "name": {"type": "string", "default": "log buffer"},
        "max_retry_count": {"type": "integer", "minimum": 0, "default": 0},
        "retry_delay": {"type": "integer", "minimum": 0, "default": 1},
        "buffer_duration": {"type": "integer", "minimum": 1, "default": 60},
        "inactive_timeout": {"type": "integer", "minimum": 1, "default": 5},
        "batch_max_size": {"type": "integer", "minimum": 1, "default": 1000}
    });
    if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
}

/// Splits a logger's configuration into its batch settings and the rest.
pub fn split_batch(conf: &Value) -> Result<(Value, BatchConf), ConfError> {
    let Some(obj) = conf.as_object() else {
        return Err(ConfError::whole("must be an object"));
    };
    let mut rest = Map::new();
    let mut batch = Map::new();
    for (k, v) in obj {
        if BATCH_FIELDS.contains(&k.as_str()) {
            batch.insert(k.clone(), v.clone());
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    let b: BatchConf = polygate_core::parse_conf(&Value::Object(batch))?;
    if b.batch_max_size < 1 {
        return Err(ConfError::at("batch_max_size", "must be at least 1"));
    }
    if b.inactive_timeout < 1 {
        return Err(ConfError::at("inactive_timeout", "must be at least 1"));
    }
    if b.buffer_duration < 1 {
        return Err(ConfError::at("buffer_duration", "must be at least 1"));
    }
    Ok((Value::Object(rest), b))
}

/// The future a sink returns for one batch.
pub type SendFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Where batches go.
pub trait Sink: Send + Sync + 'static {
    /// Sends one batch (`batch_max_size` tells whether a batch of one is a single object).
    fn send(&self, entries: Vec<Value>, batch_max_size: usize) -> SendFuture;
}

/// The logging thread's runtime.
static LOG_RT: LazyLock<Option<tokio::runtime::Handle>> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("polygate-log".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))
        .ok()?;
    Some(handle)
});

/// A batch processor: entries are queued at once and sent from the logging thread.
pub struct Batcher {
    conf: BatchConf,
    sink: Arc<dyn Sink>,
    /// Send a batch as soon as the queue is empty (file-logger: no waiting).
    eager: bool,
    tx: OnceLock<Option<mpsc::Sender<Value>>>,
    dropped: Arc<AtomicU64>,
}

impl Batcher {
    /// A processor sending to `sink` (started on the first entry).
    pub fn new(conf: BatchConf, sink: Arc<dyn Sink>, eager: bool) -> Batcher {
        Batcher {
            conf,
            sink,
            eager,
            tx: OnceLock::new(),
            dropped: Arc::default(),
        }
    }

    /// Queues an entry; a full backlog drops it (counted and logged).
    pub fn push(&self, entry: Value) {
        let tx = self.tx.get_or_init(|| {
            let rt = LOG_RT.as_ref()?;
            let cap = (self.conf.batch_max_size * 10).clamp(1000, 100_000);
            let (tx, rx) = mpsc::channel(cap);
            rt.spawn(run(
                rx,
                self.conf.clone(),
                self.sink.clone(),
                self.eager,
                self.dropped.clone(),
            ));
            Some(tx)
        });
        let Some(tx) = tx else {
            tracing::error!("{}: no logging thread; entry dropped", self.conf.name);
            return;
        };
        if tx.try_send(entry).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::error!(
                    "{}: log backlog full, {n} entries dropped so far",
                    self.conf.name
                );
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Value>,
    conf: BatchConf,
    sink: Arc<dyn Sink>,
    eager: bool,
    _dropped: Arc<AtomicU64>,
) {
    let mut batch: Vec<Value> = Vec::new();
    let mut first = Instant::now();
    let mut last = Instant::now();
    loop {
        let deadline = if batch.is_empty() {
            None
        } else {
            Some(
                (last + Duration::from_secs(conf.inactive_timeout))
                    .min(first + Duration::from_secs(conf.buffer_duration)),
            )
        };
        let next = match deadline {
            None => rx.recv().await,
            Some(d) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(d), rx.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        flush(&conf, &sink, std::mem::take(&mut batch)).await;
                        continue;
                    }
                }
            }
        };
        let Some(entry) = next else {
            // the plugin instance is gone (a new configuration): send what is left
            if !batch.is_empty() {
                flush(&conf, &sink, batch).await;
            }
            return;
        };
        if batch.is_empty() {
            first = Instant::now();
        }
        last = Instant::now();
        batch.push(entry);
        let idle = eager && rx.is_empty();
        if batch.len() >= conf.batch_max_size || idle {
            flush(&conf, &sink, std::mem::take(&mut batch)).await;
        }
    }
}

async fn flush(conf: &BatchConf, sink: &Arc<dyn Sink>, batch: Vec<Value>) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len();
    for attempt in 0..=conf.max_retry_count {
        match sink.send(batch.clone(), conf.batch_max_size).await {
            Ok(()) => return,
            Err(e) => {
                tracing::error!(
                    "Batch Processor[{}] failed to process entries [{n}]: {e}",
                    conf.name
                );
                if attempt < conf.max_retry_count {
                    tokio::time::sleep(Duration::from_secs(conf.retry_delay)).await;
                }
            }
        }
    }
    tracing::error!(
        "Batch Processor[{}] exceeded the max_retry_count[{}], dropping {n} entries",
        conf.name,
        conf.max_retry_count
    );
}

/// What a logger puts in an entry.
pub struct EntryConf {
    /// `log_format`: name → `$var` or literal.
    pub format: Option<Map<String, Value>>,
    /// `include_req_body`, up to this many bytes.
    pub req_body: Option<usize>,
    /// `include_req_body_expr`.
    pub req_body_expr: Option<Expr>,
}

/// Common logger fields: `log_format`, `include_req_body`, `include_req_body_expr`,
/// `max_req_body_bytes` (and `include_resp_body`, accepted, not logged).
#[derive(Deserialize)]
pub struct EntryFields {
    /// `log_format`.
    pub log_format: Option<Map<String, Value>>,
    /// `include_req_body`.
    #[serde(default)]
    pub include_req_body: bool,
    /// `include_req_body_expr`.
    pub include_req_body_expr: Option<Value>,
    /// `include_resp_body`.
    #[serde(default)]
    pub include_resp_body: bool,
    /// `include_resp_body_expr`.
    pub include_resp_body_expr: Option<Value>,
    /// `max_req_body_bytes`.
    #[serde(default = "d512k")]
    pub max_req_body_bytes: usize,
    /// `max_resp_body_bytes`.
    #[serde(default = "d512k")]
    pub max_resp_body_bytes: usize,
}

fn d512k() -> usize {
    524_288
}

impl EntryFields {
    /// Checks and compiles the fields.
    pub fn compile(self) -> Result<EntryConf, ConfError> {
        let req_body_expr = match &self.include_req_body_expr {
            Some(v) => Some(Expr::compile_vars(v).map_err(|e| {
                ConfError::at(format!("include_req_body_expr{}", e.path), e.message)
            })?),
            None => None,
        };
        if let Some(v) = &self.include_resp_body_expr {
            Expr::compile_vars(v).map_err(|e| {
                ConfError::at(format!("include_resp_body_expr{}", e.path), e.message)
            })?;
        }
        let _ = (self.include_resp_body, self.max_resp_body_bytes);
        Ok(EntryConf {
            format: self.log_format,
            req_body: self
                .include_req_body
                .then_some(self.max_req_body_bytes.max(1)),
            req_body_expr,
        })
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl EntryConf {
    /// The body size this logger needs buffered, if any.
    pub fn wants_body(&self) -> Option<usize> {
        self.req_body.map(|_| 64 << 20)
    }

    /// The entry of a finished request.
    pub fn entry(&self, ctx: &RequestCtx) -> Value {
        if let Some(f) = &self.format {
            let mut out = Map::new();
            for (k, v) in f {
                let val = match v {
                    Value::String(s) if s.starts_with('$') => ctx
                        .var(&s[1..])
                        .map_or(Value::Null, |x| Value::String(x.into_owned())),
                    other => other.clone(),
                };
                out.insert(k.clone(), val);
            }
            return Value::Object(out);
        }
        let host = ctx.host.as_deref().unwrap_or("");
        let request_uri = ctx.var("request_uri").unwrap_or_default().into_owned();
        let headers = crate::util::headers_object(&ctx.headers);
        let mut query = BTreeMap::new();
        for pair in ctx.query.as_deref().unwrap_or("").split('&') {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair
                .split_once('=')
                .map_or((pair, None), |(k, v)| (k, Some(v)));
            let k = polygate_core::ctx::decode_component(k).into_owned();
            let v = v.map_or(Value::Bool(true), |v| {
                Value::String(polygate_core::ctx::decode_component(v).into_owned())
            });
            query.insert(k, v);
        }
        let total = ctx.started.elapsed();
        let start = SystemTime::now()
            .checked_sub(total)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut e = json!({
            "request": {
                "url": format!("{}://{host}:{}{request_uri}", ctx.scheme, ctx.server_addr.port()),
                "uri": request_uri,
                "method": ctx.method.as_str(),
                "headers": headers,
                "querystring": query,
                "size": request_size(ctx),
            },
            "response": {
                "status": ctx.status.map_or(0, |s| s.as_u16()),
                "size": ctx.response_body_bytes,
            },
            "server": {"hostname": polygate_core::time::hostname(), "version": concat!("polygate/", env!("CARGO_PKG_VERSION"))},
            "client_ip": ctx.client_addr.ip().to_string(),
            "start_time": start.as_millis() as u64,
            "latency": ms(total),
        });
        if let Some(u) = ctx.upstream_addr {
            e["upstream"] = json!(u.to_string());
        }
        if let Some(ul) = ctx.upstream_latency {
            e["upstream_latency"] = json!(ms(ul));
            e["apisix_latency"] = json!(ms(total.saturating_sub(ul)));
        } else {
            e["apisix_latency"] = json!(ms(total));
        }
        match &ctx.route_id {
            Some(r) => {
                e["route_id"] = json!(r.as_ref());
                e["service_id"] = json!(ctx.service_id.as_deref().unwrap_or(""));
            }
            None => e["service_id"] = json!(host),
        }
        if let Some(c) = &ctx.consumer {
            e["consumer"] = json!({"username": c.username});
        }
        if let (Some(max), Some(body)) = (self.req_body, &ctx.body)
            && self.req_body_expr.as_ref().is_none_or(|x| x.eval(ctx))
        {
            let b = &body[..body.len().min(max)];
            e["request"]["body"] = json!(String::from_utf8_lossy(b));
        }
        e
    }
}

fn request_size(ctx: &RequestCtx) -> u64 {
    let mut n = ctx.method.as_str().len() + ctx.request_uri.len() + 12;
    for (k, v) in &ctx.headers {
        n += k.as_str().len() + v.len() + 4;
    }
    n as u64 + 2 + ctx.body.as_ref().map_or(0, |b| b.len() as u64)
}

/// Encodes a batch as APISIX does: one object for a batch size of 1, else an array (or
/// newline-separated objects for `concat_method: new_line`).
pub fn encode(entries: &[Value], batch_max_size: usize, new_line: bool) -> String {
    if batch_max_size == 1 && entries.len() == 1 {
        return entries[0].to_string();
    }
    if new_line {
        entries
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        Value::Array(entries.to_vec()).to_string()
    }
}
