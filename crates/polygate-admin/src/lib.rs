//! polygate's Admin API: APISIX v3's paths under `/apisix/admin`, its JSON envelopes, status
//! codes and error strings, over etcd (`gateway.config_provider: etcd`, where writes go to
//! etcd and every polygate and APISIX process watching it serves them) or over the file
//! configuration (APISIX's API-driven standalone: `/apisix/admin/configs`).
//!
//! - [`auth`]: `allow_admin`, keys and roles, the generated key.
//! - [`resources`]: GET/PUT/POST/PATCH/DELETE of routes, services, upstreams, consumers,
//!   SSLs, global rules, plugin configs, consumer groups and plugin metadata.
//! - [`standalone`]: `GET`/`PUT`/`HEAD /apisix/admin/configs` and `/configs/validate`.
//! - [`openapi`]: the OpenAPI document of this API (`/apisix/admin/openapi.json`).
//! - [`ui`]: a dashboard's static files at `/ui/`.
//!
//! The data plane is reached through [`Gateway`], which the proxy implements.
#![forbid(unsafe_code)]
#![allow(
    clippy::result_large_err,
    reason = "handlers return their error responses early; the Admin API is not a hot path"
)]

pub mod auth;
pub mod openapi;
pub mod resources;
pub mod standalone;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use polygate_config::{Document, Kind};
use polygate_model::ConfigErrors;
use serde_json::{Value, json};

pub use auth::Access;

/// Largest request body the Admin API reads (APISIX's 1.5 MiB).
pub const MAX_BODY: usize = 1024 * 1024 * 3 / 2;

/// One plugin as the Admin API describes it.
#[derive(Debug, Clone)]
pub struct PluginInfo {
    /// Its name.
    pub name: String,
    /// Default priority (higher runs first).
    pub priority: i32,
    /// JSON Schema of its route/service configuration.
    pub schema: Value,
    /// JSON Schema of its consumer configuration (authentication plugins).
    pub consumer_schema: Option<Value>,
    /// `auth` for authentication plugins.
    pub kind: Option<&'static str>,
}

/// What the Admin API needs from the gateway it administers.
pub trait Gateway: Send + Sync + 'static {
    /// Checks one resource as it would be stored (typed fields, plugin configurations)
    /// without any effect on the gateway. The error names the key path inside the resource.
    fn check(&self, kind: Kind, value: &Value) -> Result<(), String>;
    /// Every plugin a route may name.
    fn plugins(&self) -> Vec<PluginInfo>;
    /// The document being served.
    fn current(&self) -> Option<Arc<Document>>;
    /// Checks a whole document: every problem, nothing applied.
    fn validate(&self, doc: &Document) -> Result<(), ConfigErrors>;
    /// Applies a whole document (API-driven standalone); on error nothing changed.
    fn apply(&self, doc: &Document, origin: &str) -> Result<(), ConfigErrors>;
    /// Readiness: `Ok` with details, or why the gateway is not ready.
    fn readiness(&self) -> Result<Value, String>;
}

/// Where resources are stored.
#[derive(Clone)]
pub enum Store {
    /// etcd, in APISIX's layout under `prefix` (`/apisix`).
    Etcd {
        /// The client.
        client: polygate_etcd::Client,
        /// Key prefix, without a trailing `/`.
        prefix: String,
    },
    /// The configuration file: resources are read-only, `/configs` replaces them.
    File,
}

/// Everything a request handler needs.
pub struct AdminState {
    /// Who may do what.
    pub access: Access,
    /// Where resources live.
    pub store: Store,
    /// The gateway.
    pub gateway: Arc<dyn Gateway>,
    /// The dashboard directory served at `/ui/`.
    pub ui: Option<std::path::PathBuf>,
    /// API-driven standalone state (`/configs` versions and digest).
    pub standalone: standalone::StandaloneState,
    /// APISIX's `data_encryption`: fields written encrypted to etcd and read decrypted.
    pub keyring: polygate_config::encryption::Keyring,
}

/// A JSON response with APISIX's Admin API headers.
pub fn json_response(status: StatusCode, body: &Value) -> Response {
    raw_response(status, body.to_string())
}

/// A response with APISIX's Admin API headers and `body` as it is (APISIX answers some
/// refusals with a bare string, and 202/204 with nothing).
pub fn raw_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut r = (status, body.into()).into_response();
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert("x-api-version", HeaderValue::from_static("v3"));
    r
}

/// `{"error_msg": msg}` with `status`.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    json_response(status, &json!({"error_msg": msg.into()}))
}

/// The Admin API's router: every path, behind the address and key checks.
pub fn router(state: Arc<AdminState>) -> Router {
    let admin = Router::new()
        .route(
            "/apisix/admin/plugins/list",
            axum::routing::get(resources::plugins_list),
        )
        .route(
            "/apisix/admin/plugins/reload",
            axum::routing::any(resources::plugins_reload),
        )
        .route(
            "/apisix/admin/schema/validate/{kind}",
            axum::routing::post(resources::schema_validate),
        )
        .route(
            "/apisix/admin/configs",
            axum::routing::get(standalone::get)
                .put(standalone::put)
                .head(standalone::head),
        )
        .route(
            "/apisix/admin/configs/validate",
            axum::routing::post(standalone::validate),
        )
        .route(
            "/apisix/admin/openapi.json",
            axum::routing::get(openapi::serve),
        )
        .route(
            "/apisix/admin/{*path}",
            axum::routing::any(resources::dispatch),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ));
    Router::new()
        .route(
            "/apisix/admin",
            axum::routing::head(|| async { StatusCode::OK }),
        )
        .route("/status", axum::routing::get(status_live))
        .route("/status/ready", axum::routing::get(status_ready))
        .route("/ui", axum::routing::get(|| async { ui::redirect() }))
        .route("/ui/", axum::routing::get(ui::serve))
        .route("/ui/{*path}", axum::routing::get(ui::serve))
        .merge(admin)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            allow_admin,
        ))
        .with_state(state)
}

/// `allow_admin`: clients outside the list get 403, whatever they ask.
async fn allow_admin(
    State(st): State<Arc<AdminState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if !st.access.address_allowed(peer.ip()) {
        tracing::warn!(
            "admin: {} refused: not in gateway.admin.allow_admin",
            peer.ip()
        );
        return (StatusCode::FORBIDDEN, "403 Forbidden\n").into_response();
    }
    next.run(req).await
}

/// The key check of every `/apisix/admin/...` path.
async fn require_key(State(st): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let key = auth::presented_key(req.uri().query(), req.headers());
    match st.access.check(key.as_deref(), req.method()) {
        auth::Verdict::Allowed => next.run(req).await,
        auth::Verdict::Refused(why) => {
            tracing::warn!("admin: failed to check token: {why}");
            json_response(
                StatusCode::UNAUTHORIZED,
                &json!({"error_msg": "failed to check token", "description": why}),
            )
        }
    }
}

async fn status_live() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn status_ready(State(st): State<Arc<AdminState>>) -> Response {
    match st.gateway.readiness() {
        Ok(mut v) => {
            v["status"] = json!("ok");
            json_response(StatusCode::OK, &v)
        }
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "error", "error": e}),
        ),
    }
}

/// Reads a request body up to [`MAX_BODY`].
pub async fn read_body(body: Body) -> Result<bytes::Bytes, Response> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

/// Serves the Admin API on `listener` until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
    if let Err(e) = r {
        tracing::error!("admin API: {e}");
    }
}
