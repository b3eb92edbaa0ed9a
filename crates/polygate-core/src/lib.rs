//! polygate's plugin framework.
//!
//! - [`plugin`]: the [`Plugin`] trait with APISIX's phases, [`Flow`] (sync or async outcome),
//!   [`PluginFactory`] and the [`PluginRegistry`].
//! - [`chain`]: instances with `_meta`, merge precedence, the phase runner.
//! - [`ctx`]: the per-request [`RequestCtx`] (also the `vars` source).
//! - [`consumer`]: consumers indexed by credential.
//! - [`path`]: request path normalisation (`$uri`) and escaping for the upstream.
//! - [`error`]: gateway errors and their mapping to responses.
//! - [`callout`]: HTTP callouts plugins make through the gateway's upstream client.
//! - [`exporters`]: metrics plugins add to the Prometheus endpoint.
//! - [`time`]: HTTP dates, cookie times, the clock and the host name.
//! - [`worker`]: which worker thread is running.
#![forbid(unsafe_code)]

pub mod callout;
pub mod chain;
pub mod consumer;
pub mod ctx;
pub mod deadline;
pub mod error;
pub mod exporters;
pub mod path;
pub mod plugin;
pub mod text;
pub mod time;
pub mod worker;

pub use chain::{InstanceMap, PluginChain, PluginInstance};
pub use consumer::{ConsumerIndex, ConsumerInfo};
pub use ctx::{RequestCtx, ResponseHead};
pub use error::GatewayError;
pub use plugin::{
    ConfError, Flow, Phase, Plugin, PluginError, PluginFactory, PluginKind, PluginRegistry,
    PluginResponse, parse_conf,
};
