//! Built-in Rust plugins of polygate, with Apache APISIX's names, priorities and fields.
//!
//! | plugin | priority | phases |
//! |---|---|---|
//! | `key-auth` | 2500 | rewrite (auth) |
//! | `proxy-rewrite` | 1008 | rewrite |
//! | `response-rewrite` | 899 | header_filter, body_filter |
#![forbid(unsafe_code)]

use std::sync::Arc;

use polygate_core::PluginRegistry;

pub mod key_auth;
pub mod limit;
pub mod limit_conn;
pub mod limit_count;
pub mod limit_req;
pub mod prometheus;
pub mod proxy_rewrite;
pub mod redis;
pub mod response_rewrite;
pub mod util;

/// A registry holding every built-in plugin.
pub fn registry() -> PluginRegistry {
    let mut r = PluginRegistry::new();
    r.register(Arc::new(key_auth::KeyAuthFactory));
    r.register(Arc::new(limit_count::LimitCountFactory));
    r.register(Arc::new(limit_req::LimitReqFactory));
    r.register(Arc::new(limit_conn::LimitConnFactory));
    r.register(Arc::new(prometheus::PrometheusFactory));
    r.register(Arc::new(proxy_rewrite::ProxyRewriteFactory));
    r.register(Arc::new(response_rewrite::ResponseRewriteFactory));
    r
}
