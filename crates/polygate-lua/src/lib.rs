//! polygate's LuaJIT layer.
//!
//! - One Lua state per worker thread ([`vm`]), created on first use with the `ngx` API
//!   installed; no lock is shared between workers.
//! - Handlers of `rewrite`, `access` and `before_proxy` run as coroutines: asynchronous calls
//!   (`ngx.sleep`, `ngx.load_ffi` runtimes, `ngx.exit`) yield, and the plugin returns
//!   [`polygate_core::Flow::Pending`]. `header_filter`, `body_filter` and `log` run as plain
//!   calls; yielding APIs fail there with a clear error.
//! - Memory and instruction limits per state ([`polygate_model::LuaConfig`]).
//! - Plugins: `lua`, `serverless-pre-function`, `serverless-post-function` ([`plugins`]).
//!
//! The `ngx` API implemented, and where it differs from OpenResty, is listed in `docs/lua.md`.

mod api;
mod current;
pub mod plugins;
mod run;
pub mod vm;

use std::sync::Arc;

use polygate_core::PluginRegistry;

pub use current::LuaPhase;

/// Registers the Lua plugins and the hook that applies `gateway.lua` when a configuration is
/// committed.
pub fn register(registry: &mut PluginRegistry) {
    registry.register(Arc::new(plugins::LuaFactory));
    registry.register(Arc::new(plugins::ServerlessFactory::pre()));
    registry.register(Arc::new(plugins::ServerlessFactory::post()));
    registry.add_commit_hook(Arc::new(|cfg| {
        let lua = cfg
            .gateway
            .as_ref()
            .map(|g| g.lua.clone())
            .unwrap_or_default();
        vm::configure(&lua);
    }));
}
