//! polygate's data plane.
//!
//! - [`admin`]: the data plane as the Admin API sees it.
//! - [`server`]: worker threads with `SO_REUSEPORT` listeners, signals, graceful shutdown,
//!   the config file watcher, the metrics listener and the demo upstream.
//! - [`handler`]: one request through route match, plugin phases and the upstream.
//! - [`snapshot`]: validated, incrementally rebuilt configuration snapshots.
//! - [`plane`]: the data plane as the configuration pipeline's target (prepare, commit).
//! - [`upstream`]: nodes, priority tiers and balancers.
//! - [`h1`]: the upstream HTTP/1.1 client.
//! - [`io`]: the client send timeout.
//! - [`sniff`]: a byte-level second look at request heads (framing headers hyper folds).
//! - [`pool`]: upstream connections and per-thread keep-alive pools.
//! - [`body`]: request/response bodies with timeouts, body filters and the log hook.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod body;
pub mod callout;
pub mod h1;
pub mod h2up;
pub mod handler;
pub mod health;
pub mod io;
pub mod metrics;
pub mod plane;
pub mod pool;
pub mod server;
pub mod snapshot;
pub mod sniff;
pub mod tls;
pub mod upstream;

pub use server::{ConfigSource, StartError, Started, check, serve, start};
pub use snapshot::Snapshot;
