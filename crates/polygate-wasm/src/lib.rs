//! polygate's proxy-wasm host on wasmtime: filters written against the proxy-wasm ABI
//! (0.2.1, 0.2.0 and 0.1.0) run as plugins declared in `gateway.wasm.plugins`, as APISIX's
//! `wasm.plugins`.
//!
//! - [`abi`]: the ABI's constants and map serialisation.
//! - [`engine`]: the engine (epoch interruption, pooling allocator) and the module cache.
//! - [`plugin`]: definitions, the plugin factory and the request driver.
//! - [`vm`]: one instance per (plugin, worker thread), root contexts, ticks, queues.
//! - [`shared`]: shared data, queues and metrics across instances.
//! - `host`, `props`, `state`: the host functions, properties and the store's state.
#![deny(unsafe_code)]

pub mod abi;
pub mod engine;
pub mod error;
mod host;
pub mod plugin;
mod props;
pub mod shared;
mod state;
pub mod vm;

use std::sync::Arc;

use polygate_core::PluginRegistry;

pub use error::{LoadError, VmError};

/// Adds wasm plugins to `registry`: declared plugins are loaded and checked with every
/// configuration, and their names resolve to their factories. Call after every built-in
/// plugin is registered (their names are refused as wasm plugin names).
pub fn register(registry: &mut PluginRegistry) {
    let builtin = registry.clone();
    registry.add_validator(Arc::new(move |cfg| {
        plugin::prepare(cfg, &|n| builtin.is_builtin(n))
    }));
    registry.add_provider(Arc::new(plugin::factory));
}
