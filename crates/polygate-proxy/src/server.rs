//! Process layout: N worker threads, each with a current-thread tokio runtime and its own
//! `SO_REUSEPORT` listener per configured address (nginx's worker model: no cross-core wake-ups
//! on the request path); a main thread for signals, the config watcher or the etcd watch, the
//! Admin API, the metrics listener and the demo upstream. Shared state (snapshot, balancer state, counters) is process-wide.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use polygate_config::etcd::{EtcdSource, EtcdState};
use polygate_config::watch::read_file;
use polygate_config::{Applied, Document, Pipeline};
use polygate_core::PluginRegistry;
use polygate_model::env::SystemEnv;
use polygate_model::load::Format;
use polygate_model::{
    AdminSettings, ConfigErrors, ConfigProvider, DEFAULT_ADMIN_ADDR, GatewaySection,
};
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::accesslog::AccessLog;
use crate::handler::{ConnInfo, Shared, handle};
use crate::metrics::Metrics;
use crate::plane::DataPlane;

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file, watched for changes.
    File(PathBuf),
    /// Built-in YAML text (the default configuration).
    Embedded(&'static str),
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error("invalid configuration:\n{0}")]
    Config(ConfigErrors),
    /// A listener could not be bound.
    #[error("failed to bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Another start-up failure.
    #[error("{0}")]
    Other(String),
}

/// Reads the configuration of `source` into a document; also returns the file's bytes.
fn read(source: &ConfigSource) -> Result<(Document, Option<Vec<u8>>), ConfigErrors> {
    match source {
        ConfigSource::File(p) => read_file(p, &SystemEnv).map(|(doc, bytes)| (doc, Some(bytes))),
        ConfigSource::Embedded(text) => {
            Ok((Document::parse(text, Format::Yaml, &SystemEnv)?, None))
        }
    }
}

/// A committed first configuration, ready to serve.
pub struct Started {
    /// The pipeline (its target serves the snapshot).
    pub config: Arc<Pipeline<DataPlane>>,
    /// What the first load did.
    pub applied: Applied,
    /// The file as loaded: the watcher's baseline, so a change made while the process
    /// starts is not missed.
    baseline: Option<Vec<u8>>,
}

/// Loads the configuration and commits it into a new data plane (the first commit applies
/// process-wide state: Lua settings, FFI runtimes). With `strict`, any invalid resource
/// refuses the start; otherwise invalid resources are skipped and logged, as APISIX does.
pub fn start(
    source: &ConfigSource,
    registry: PluginRegistry,
    strict: bool,
) -> Result<Started, ConfigErrors> {
    let (mut doc, baseline) = read(source)?;
    let etcd_mode = doc
        .gateway
        .as_ref()
        .and_then(|g| g.get("config_provider"))
        .and_then(|p| p.as_str())
        == Some("etcd");
    if etcd_mode && !doc.items.is_empty() {
        tracing::warn!(
            "gateway.config_provider is etcd: the {} resources of {} are ignored",
            doc.items.len(),
            source.name()
        );
        doc.items.clear();
    }
    let pipeline = Pipeline::new(DataPlane::new(registry)?, strict);
    let applied = pipeline.apply(&doc, &source.name())?;
    let config = Arc::new(pipeline);
    // plugins' callouts go through this data plane's upstreams
    polygate_core::callout::set_callouts(Arc::new(crate::callout::ProxyCallouts::new(
        config.clone(),
    )));
    Ok(Started {
        config,
        applied,
        baseline,
    })
}

/// `polygate validate`: every problem of the configuration (invalid resources, plugin
/// configurations, references to missing resources), found without side effects: plugins
/// are only checked ([`PluginRegistry::check_only`]), nothing is committed. Returns the
/// number of routes when there is no problem.
pub fn check(source: &ConfigSource, registry: &PluginRegistry) -> Result<usize, ConfigErrors> {
    let (doc, _) = read(source)?;
    let pipeline = Pipeline::new(DataPlane::new(registry.check_only())?, false);
    let snap = pipeline.check(&doc)?;
    Ok(snap.router.len())
}

impl ConfigSource {
    /// How logs name the source.
    pub fn name(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded(_) => "built-in default configuration".to_owned(),
        }
    }
}

fn bind(addr: SocketAddr, reuseport: bool) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Binds `workers` sockets for each listener. A plain bind is tried first so that a port held
/// by any other socket is reported instead of silently shared through `SO_REUSEPORT`.
fn bind_all(
    gw: &GatewaySection,
    workers: usize,
) -> Result<Vec<Vec<(std::net::TcpListener, Proto)>>, StartError> {
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Proto)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for l in &gw.listeners {
        let addr: SocketAddr = l
            .addr
            .parse()
            .map_err(|_| StartError::Other(format!("invalid listener address {:?}", l.addr)))?;
        let err = |source| StartError::Bind {
            addr: l.addr.clone(),
            source,
        };
        let proto = Proto {
            http2: l.http2,
            tls: l.tls,
        };
        let probe = bind(addr, false).map_err(err)?;
        let addr = probe.local_addr().map_err(err)?;
        if workers == 1 {
            per_worker[0].push((probe, proto));
            continue;
        }
        drop(probe);
        for w in per_worker.iter_mut() {
            w.push((bind(addr, true).map_err(err)?, proto));
        }
    }
    Ok(per_worker)
}

/// What a listener speaks.
#[derive(Clone, Copy)]
struct Proto {
    /// HTTP/2 besides HTTP/1.1 (ALPN `h2` with TLS, prior knowledge without).
    http2: bool,
    /// TLS with certificates from `ssls`.
    tls: bool,
}

/// Settings the workers need.
#[derive(Clone, Copy)]
struct WorkerOpts {
    header_timeout: Duration,
    graceful: Duration,
    send_timeout: Duration,
}

/// The stop signals the gateway drains on: a receiver that sees the last signal number
/// received (`None` until then). Without one, [`serve`] installs tokio's handlers.
pub type StopSignals = Option<watch::Receiver<Option<i32>>>;

/// Runs the gateway until SIGTERM, SIGQUIT or SIGINT; in-flight requests then get up to
/// `gateway.timeouts.graceful_shutdown` to finish.
pub fn serve(source: ConfigSource, started: Started, stop: StopSignals) -> Result<(), StartError> {
    let Started {
        config, baseline, ..
    } = started;
    let gw = config.target().snapshot.load().gateway.clone();
    let workers = if gw.worker_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        gw.worker_threads
    };
    let listeners = bind_all(&gw, workers)?;
    let bound: Vec<(String, Proto)> = listeners
        .first()
        .map(|ls| {
            ls.iter()
                .map(|(l, p)| {
                    (
                        l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                        *p,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let access_log = if gw.access_log.enabled {
        Some(
            AccessLog::start(gw.access_log.path.as_deref()).map_err(|e| {
                StartError::Other(format!(
                    "cannot open access log {}: {e}",
                    gw.access_log.path.as_deref().unwrap_or("stdout")
                ))
            })?,
        )
    } else {
        None
    };
    let shared = Arc::new(Shared {
        config,
        access_log,
        metrics: Metrics::default(),
    });
    let main_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartError::Other(format!("runtime: {e}")))?;

    // side listeners bind before workers start, so their errors stop the start-up too
    let side =
        main_rt.block_on(async {
            let demo = match &gw.demo_upstream {
                Some(a) => Some(
                    TcpListener::bind(a)
                        .await
                        .map_err(|source| StartError::Bind {
                            addr: a.clone(),
                            source,
                        })?,
                ),
                None => None,
            };
            let metrics =
                match &gw.metrics {
                    Some(m) => Some(TcpListener::bind(&m.addr).await.map_err(|source| {
                        StartError::Bind {
                            addr: m.addr.clone(),
                            source,
                        }
                    })?),
                    None => None,
                };
            let admin = bind_admin(&gw.admin).await?;
            Ok::<_, StartError>((demo, metrics, admin))
        })?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = WorkerOpts {
        header_timeout: polygate_model::secs(gw.timeouts.client_header),
        graceful: polygate_model::secs(gw.timeouts.graceful_shutdown),
        send_timeout: polygate_model::secs(gw.timeouts.client_send),
    };
    // the bound addresses (a port 0 in the configuration shows the one the system chose),
    // logged together before the workers start
    for (addr, p) in &bound {
        tracing::info!(
            "listening on {addr} (tls: {}, http2: {}), {workers} worker threads",
            p.tls,
            p.http2
        );
    }
    let mut handles = Vec::new();
    for (w, ls) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let stop = stop_rx.clone();
        let h = std::thread::Builder::new()
            .name(format!("polygate-worker-{w}"))
            .spawn(move || {
                polygate_core::worker::enter(w, workers);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("worker {w}: runtime: {e}");
                        return;
                    }
                };
                rt.block_on(worker(w, ls, shared, stop, opts));
            })
            .map_err(|e| StartError::Other(format!("spawn worker: {e}")))?;
        handles.push(h);
    }

    main_rt.block_on(async {
        let (demo, metrics, admin) = side;
        let etcd_state = if gw.config_provider == ConfigProvider::Etcd {
            match start_etcd(&gw, &shared.config) {
                Ok(st) => Some(st),
                Err(e) => {
                    tracing::error!("etcd: {e}");
                    None
                }
            }
        } else {
            None
        };
        if let Some(e) = &etcd_state {
            let _ = shared.metrics.etcd.set(e.clone());
        }
        if let Some(l) = admin {
            match admin_state(&gw, &shared.config, etcd_state.clone()) {
                Ok(state) => {
                    tracing::info!(
                        "admin API on http://{}/apisix/admin",
                        l.local_addr().map(|a| a.to_string()).unwrap_or_default()
                    );
                    tokio::spawn(polygate_admin::serve(l, state, stop_rx.clone()));
                }
                Err(e) => tracing::error!("admin API not started: {e}"),
            }
        }
        if let Some(l) = demo {
            tracing::info!(
                "demo upstream on {}",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            tokio::spawn(demo_upstream(l));
        }
        if let Some(l) = metrics {
            tracing::info!(
                "metrics on http://{}/metrics",
                l.local_addr().map(|a| a.to_string()).unwrap_or_default()
            );
            tokio::spawn(metrics_server(l, shared.clone()));
        }
        tokio::spawn(crate::health::supervise(shared.config.clone()));
        if let ConfigSource::File(path) = &source
            && gw.config_provider == ConfigProvider::Yaml
        {
            let (path, config) = (path.clone(), shared.config.clone());
            let interval = polygate_model::secs(gw.watch_interval);
            tokio::spawn(async move {
                polygate_config::watch::watch_file(path, interval, &config, &SystemEnv, baseline)
                    .await;
            });
        }
        match stop {
            Some(mut rx) => {
                let sig = loop {
                    if let Some(sig) = *rx.borrow_and_update() {
                        break sig;
                    }
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tracing::info!("{} received", signal_name(sig));
            }
            None => wait_for_signal().await,
        }
    });
    tracing::info!(
        "shutting down: no new connections; waiting up to {:?} for in-flight requests",
        opts.graceful
    );
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.join();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Binds the Admin API's listener. The default address may be taken (another gateway on the
/// machine): then the gateway starts without an Admin API; an address from the configuration
/// must bind.
async fn bind_admin(a: &AdminSettings) -> Result<Option<TcpListener>, StartError> {
    if !a.enabled {
        return Ok(None);
    }
    let addr = a.addr.as_deref().unwrap_or(DEFAULT_ADMIN_ADDR);
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(Some(l)),
        Err(e) if a.addr.is_none() => {
            tracing::warn!(
                "admin API not started: {addr}: {e} (set gateway.admin.addr, or enabled: false)"
            );
            Ok(None)
        }
        Err(source) => Err(StartError::Bind {
            addr: addr.to_owned(),
            source,
        }),
    }
}

fn admin_state(
    gw: &GatewaySection,
    config: &Arc<Pipeline<DataPlane>>,
    etcd: Option<Arc<EtcdState>>,
) -> Result<Arc<polygate_admin::AdminState>, String> {
    let access = polygate_admin::Access::from_settings(&gw.admin).map_err(|e| e.to_string())?;
    let store = match gw.config_provider {
        ConfigProvider::Etcd => polygate_admin::Store::Etcd {
            client: etcd_client(gw)?,
            prefix: gw.etcd.prefix.clone(),
        },
        ConfigProvider::Yaml => polygate_admin::Store::File,
    };
    Ok(Arc::new(polygate_admin::AdminState {
        access,
        store,
        gateway: Arc::new(crate::admin::AdminGateway::new(config.clone(), etcd)),
        ui: gw.admin.ui.as_ref().map(std::path::PathBuf::from),
        keyring: keyring(config),
        standalone: Default::default(),
    }))
}

/// APISIX's `data_encryption` keyring of the served configuration.
fn keyring(config: &Pipeline<DataPlane>) -> polygate_config::encryption::Keyring {
    let snap = config.target().snapshot.load();
    let d = &snap.data_encryption;
    polygate_config::encryption::Keyring::new(&d.keyring, d.enable_encrypt_fields)
}

fn etcd_client(gw: &GatewaySection) -> Result<polygate_etcd::Client, String> {
    polygate_etcd::Client::new(&polygate_etcd::Config {
        endpoints: gw.etcd.host.clone(),
        timeout: polygate_model::secs(gw.etcd.timeout),
        user: gw.etcd.user.clone(),
        password: gw.etcd.password.clone(),
    })
    .map_err(|e| e.to_string())
}

/// Starts the etcd source: one watch for the process, feeding the pipeline.
fn start_etcd(
    gw: &GatewaySection,
    config: &Arc<Pipeline<DataPlane>>,
) -> Result<Arc<EtcdState>, String> {
    let client = etcd_client(gw)?;
    let file = config.current();
    let state = Arc::new(EtcdState::default());
    let source = EtcdSource::new(
        client,
        &gw.etcd.prefix,
        file.as_ref().and_then(|d| d.gateway.clone()),
        file.as_ref().and_then(|d| d.apisix.clone()),
        state.clone(),
        keyring(config),
    );
    tracing::info!(
        "configuration from etcd {} under {}",
        gw.etcd.host.join(", "),
        gw.etcd.prefix
    );
    tokio::spawn(source.run(config.clone()));
    Ok(state)
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        15 => "SIGTERM",
        3 => "SIGQUIT",
        2 => "SIGINT",
        _ => "stop signal",
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut quit), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::quit()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = quit.recv() => tracing::info!("SIGQUIT received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn worker(
    id: usize,
    listeners: Vec<(std::net::TcpListener, Proto)>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    opts: WorkerOpts,
) {
    // every connection task holds a clone of `live`: `recv` ends when the last one is gone
    let (live, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut loops = Vec::new();
    for (l, proto) in listeners {
        let l = match TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("worker {id}: listener: {e}");
                continue;
            }
        };
        loops.push(tokio::spawn(accept_loop(
            l,
            proto,
            shared.clone(),
            stop.clone(),
            Drain {
                stop: stop.clone(),
                live: live.clone(),
            },
            opts,
        )));
    }
    // close idle upstream connections of this thread's pool
    let sweeper = tokio::spawn(async {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            crate::pool::sweep();
        }
    });
    for l in loops {
        let _ = l.await;
    }
    sweeper.abort();
    drop(live);
    if tokio::time::timeout(opts.graceful, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("worker {id}: graceful shutdown timed out; closing remaining connections");
    }
}

/// The connection builders of one listener.
struct Builders {
    h1: hyper::server::conn::http1::Builder,
    auto: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    send_timeout: Duration,
}

impl Builders {
    fn new(opts: &WorkerOpts, h2s: &polygate_model::Http2Settings) -> Builders {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // hyper's default of 100 header lines stays (above it hyper allocates the header index
        // on every request); nginx's size limits are checked on the bytes (sniff.rs)
        h1.timer(TokioTimer::new())
            .writev(false)
            .header_read_timeout(opts.header_timeout);
        let mut auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(opts.header_timeout);
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2s.max_concurrent_streams)
            .max_header_list_size(h2s.max_header_list_size)
            .initial_stream_window_size(h2s.initial_stream_window)
            .initial_connection_window_size(h2s.initial_connection_window)
            .max_pending_accept_reset_streams(h2s.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(1024);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(h2s.max_concurrent_streams)
            .max_header_list_size(h2s.max_header_list_size)
            .initial_stream_window_size(h2s.initial_stream_window)
            .initial_connection_window_size(h2s.initial_connection_window)
            .max_pending_accept_reset_streams(h2s.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(1024);
        Builders {
            h1,
            auto,
            h2,
            send_timeout: opts.send_timeout,
        }
    }

    /// Serves one connection: `h2` only (TLS with ALPN `h2`), HTTP/1.1 only, or either by
    /// the preface (`auto`, h2c listeners).
    fn serve<I>(
        &self,
        io: I,
        info: Arc<ConnInfo>,
        mode: ConnMode,
        drain: Drain,
        shared: Arc<Shared>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(crate::io::SendTimeout::new(io, self.send_timeout));
        let sh = shared.clone();
        let request = move |req: Request<Incoming>| {
            let sh = sh.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(handle(req, &sh, &info).await) }
        };
        // An HTTP/2 request's future (4.4 KB) is boxed: hyper moves a stream's future into the
        // stream's own task, so inline it is copied on the way (callgrind, worker thread: TLS
        // HTTP/2 58,200 -> 55,000 instructions per request, h2c 53,800 -> 51,000). h2c
        // listeners (`auto`) box too: their HTTP/1.1 requests pay the allocation (32,200 ->
        // 33,600). HTTP/1.1 listeners keep it inline in the connection: there the box would
        // cost the allocation and save nothing.
        match mode {
            ConnMode::H1 => spawn_connection(
                self.h1
                    .serve_connection(io, service_fn(request))
                    .with_upgrades(),
                drain,
                shared,
            ),
            ConnMode::H2 => spawn_connection(
                self.h2
                    .serve_connection(io, service_fn(move |r| Box::pin(request(r)))),
                drain,
                shared,
            ),
            ConnMode::Auto => spawn_connection(
                self.auto
                    .serve_connection_with_upgrades(io, service_fn(move |r| Box::pin(request(r))))
                    .into_owned(),
                drain,
                shared,
            ),
        }
    }
}

#[derive(Clone, Copy)]
enum ConnMode {
    H1,
    H2,
    Auto,
}

async fn accept_loop(
    listener: TcpListener,
    proto: Proto,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    drain: Drain,
    opts: WorkerOpts,
) {
    let h2s = shared.snapshot().gateway.http2;
    let builders = Arc::new(Builders::new(&opts, &h2s));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        // one connection per turn of the event loop, as nginx without `multi_accept`: under a
        // stream of new connections the loop would otherwise accept up to tokio's budget (128)
        // in a row while the connections already accepted wait for their handshakes
        tokio::task::yield_now().await;
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(peer);
        shared
            .metrics
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let drain = drain.clone();
        if proto.tls {
            let (sh, b) = (shared.clone(), builders.clone());
            tokio::spawn(async move {
                let limit = opts.header_timeout;
                match tokio::time::timeout(limit, tls_accept(stream, peer, local, proto, &sh)).await
                {
                    Ok(Some((tls, info, h2))) => {
                        if h2 {
                            // HTTP/2 writes many small frames, and flushes after each
                            // response's data: gathered (across the responses of one turn of
                            // the event loop), they go out as one TLS record instead of one
                            // record (and one AEAD seal and one write) each
                            let io = crate::io::Coalesce::new(tls);
                            b.serve(io, info, ConnMode::H2, drain, sh);
                        } else {
                            b.serve(tls, info, ConnMode::H1, drain, sh);
                        }
                        return;
                    }
                    Ok(None) => {}
                    Err(_) => tracing::info!(client = %peer, "TLS handshake timed out"),
                }
                drop(drain);
                sh.metrics
                    .connections_active
                    .fetch_sub(1, Ordering::Relaxed);
            });
            continue;
        }
        let (stream, verdicts) = crate::sniff::Sniffed::new(stream);
        let info = Arc::new(ConnInfo::new(peer, local, verdicts));
        let mode = if proto.http2 {
            ConnMode::Auto
        } else {
            ConnMode::H1
        };
        builders.serve(stream, info, mode, drain, shared.clone());
    }
}

/// A TLS handshake: the client's hello picks the `ssls` entry (by SNI) of the snapshot current
/// now; `None` (logged) when no certificate fits or the handshake fails.
async fn tls_accept(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    proto: Proto,
    shared: &Shared,
) -> Option<(
    crate::sniff::Sniffed<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    Arc<ConnInfo>,
    bool,
)> {
    let acceptor =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let start = match acceptor.await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(client = %peer, "TLS handshake: {e}");
            return None;
        }
    };
    let sni = start.client_hello().server_name().map(Box::<str>::from);
    let snap = shared.snapshot();
    let Some(entry) = snap.tls.lookup(sni.as_deref()) else {
        match &sni {
            Some(s) => {
                tracing::error!(client = %peer, "failed to find any SSL certificate by SNI: {s}")
            }
            None => tracing::error!(
                client = %peer,
                "TLS client sent no SNI and gateway.ssl.fallback_sni is not set"
            ),
        }
        return None;
    };
    let (config, skip_mtls) = (entry.config(proto.http2), entry.skip_mtls.clone());
    drop(snap);
    // the key exchange and signature below are the costliest step of a connection (about
    // 100 µs); requests of connections already open that are ready now go first
    tokio::task::yield_now().await;
    let tls = match start.into_stream(config).await {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(client = %peer, sni = sni.as_deref().unwrap_or(""), "TLS handshake: {e}");
            return None;
        }
    };
    let c = tls.get_ref().1;
    let h2 = c.alpn_protocol() == Some(b"h2");
    let facts = polygate_core::ctx::TlsFacts {
        sni,
        protocol: match c.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLSv1.3",
        },
        client_verified: c.peer_certificates().is_some_and(|p| !p.is_empty()),
    };
    let (tls, verdicts) = crate::sniff::Sniffed::new(tls);
    let mut info = ConnInfo::new(peer, local, verdicts);
    info.tls = Some(Arc::new(facts));
    info.skip_mtls = skip_mtls;
    Some((tls, Arc::new(info), h2))
}

/// What a connection task needs to stop gracefully: the shutdown signal, and a token whose
/// drop tells the worker that the connection is gone.
#[derive(Clone)]
struct Drain {
    stop: watch::Receiver<bool>,
    live: tokio::sync::mpsc::Sender<()>,
}

/// A served connection that can be asked to finish its in-flight requests and close.
trait Graceful: std::future::Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display + Send;
    fn begin_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    type Error = hyper::Error;
    fn begin_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = hyper::Error;
    fn begin_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful
    for hyper_util::server::conn::auto::UpgradeableConnection<'static, I, S, E>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, B>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn begin_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Drives one client connection to its end on this worker, keeping the connection gauge; on
/// shutdown the connection finishes its in-flight requests and closes.
fn spawn_connection<C>(conn: C, drain: Drain, shared: Arc<Shared>)
where
    C: Graceful + Send + 'static,
{
    tokio::spawn(async move {
        let Drain { mut stop, live } = drain;
        let mut conn = std::pin::pin!(conn);
        let r = if *stop.borrow() {
            conn.as_mut().begin_shutdown();
            conn.await
        } else {
            // biased: no random branch order to draw on every wake-up of the connection
            tokio::select! {
                biased;
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().begin_shutdown();
                    conn.await
                }
            }
        };
        if let Err(e) = r {
            tracing::debug!("client connection: {e}");
        }
        shared
            .metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        drop(live);
    });
}

async fn metrics_server(l: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let sh = shared.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let sh = sh.clone();
            async move {
                let path = req.uri().path();
                if path.starts_with("/v1/healthcheck") {
                    // APISIX's control API (`/v1/healthcheck[/{routes|services|upstreams}/{id}]`)
                    return control_answer(crate::health::control_api(&sh.snapshot(), path));
                }
                if let Some(body) = control_resources(&sh, path) {
                    return control_answer(body);
                }
                // APISIX's export path as well (`plugin_attr.prometheus.export_uri`)
                if path == "/metrics" || path == "/apisix/prometheus/metrics" {
                    let snap = sh.snapshot();
                    let mut body = sh.metrics.render(snap.version, sh.config.status());
                    crate::health::metrics(&snap, &mut body);
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(body)))
                } else if path == "/status" {
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(status_json(&sh))))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found\n")))
                }
            }
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A control API answer: the JSON body, or 404 `{"error_msg":"not found"}`.
fn control_answer(body: Option<String>) -> http::Result<Response<Full<Bytes>>> {
    let b = Response::builder().header("content-type", "application/json");
    match body {
        Some(body) => b.body(Full::new(Bytes::from(body))),
        None => b
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                b"{\"error_msg\":\"not found\"}\n",
            ))),
    }
}

/// APISIX's control API views of the served resources: `/v1/routes`, `/v1/services`,
/// `/v1/upstreams` (lists of `{key, value, has_domain}`), one of them by id, and
/// `/v1/plugin_metadatas` / `/v1/plugin_metadata/{plugin}`. `None` for other paths;
/// `Some(None)` for an id that is not served.
fn control_resources(sh: &Shared, path: &str) -> Option<Option<String>> {
    use polygate_config::Kind;
    let rest = path.strip_prefix("/v1/")?;
    let (seg, id) = match rest.split_once('/') {
        Some((s, id)) if !id.is_empty() => (s, Some(id)),
        Some((s, _)) => (s, None),
        None => (rest, None),
    };
    let kind = match seg {
        "routes" => Kind::Route,
        "services" => Kind::Service,
        "upstreams" => Kind::Upstream,
        "plugin_metadatas" if id.is_none() => Kind::PluginMetadata,
        "plugin_metadata" if id.is_some() => Kind::PluginMetadata,
        _ => return None,
    };
    let doc = sh.config.current();
    let items = doc
        .iter()
        .flat_map(|d| d.items.iter())
        .filter(|i| i.kind == kind);
    if kind == Kind::PluginMetadata {
        // APISIX answers plugin metadata as the values themselves
        let mut values = items
            .filter(|i| id.is_none_or(|want| i.id == want))
            .map(|i| (*i.value).clone());
        return Some(if id.is_none() {
            Some(serde_json::Value::Array(values.collect()).to_string())
        } else {
            values.next().map(|v| v.to_string())
        });
    }
    let node = |i: &polygate_config::document::Item| {
        serde_json::json!({
            "key": format!("/apisix/{}/{}", kind.key(), i.id),
            "value": *i.value,
            "has_domain": false,
        })
    };
    Some(match id {
        None => Some(serde_json::Value::Array(items.map(node).collect()).to_string()),
        Some(want) => items
            .filter(|i| i.id == want)
            .map(node)
            .next()
            .map(|v| v.to_string()),
    })
}

/// `GET /status` on the metrics listener: the configuration pipeline's state.
fn status_json(sh: &Shared) -> String {
    let st = sh.config.status();
    let snap = sh.snapshot();
    let v = serde_json::json!({
        "config": {
            "version": snap.version,
            "routes": snap.router.len(),
            "commits": st.commits.load(Ordering::Relaxed),
            "rejected": st.rejected.load(Ordering::Relaxed),
            "skipped_resources": st.skipped.load(Ordering::Relaxed),
            "source_errors": st.source_errors.load(Ordering::Relaxed),
            "last_error": *st.last_error.lock(),
        }
    });
    v.to_string() + "\n"
}

/// The built-in demo upstream: answers every request with a JSON description of what it
/// received (method, path, headers), so a proxied request shows what the gateway forwarded.
async fn demo_upstream(l: TcpListener) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let svc = service_fn(|req: Request<Incoming>| async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        serde_json::Value::String(
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        ),
                    )
                })
                .collect();
            let out = serde_json::json!({
                "message": "hello from the polygate demo upstream",
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            let text = serde_json::to_string_pretty(&out).unwrap_or_default() + "\n";
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(text)))
        });
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
