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

pub mod api_breaker;
pub mod basic_auth;
pub mod compress;
pub mod cors;
pub mod csrf;
pub mod forward_auth;
pub mod hmac_auth;
pub mod jsonschema;
pub mod jwt_auth;
pub mod key_auth;
pub mod limit;
pub mod limit_conn;
pub mod limit_count;
pub mod limit_req;
pub mod logger;
pub mod loggers;
pub mod prometheus;
pub mod proxy_mirror;
pub mod proxy_rewrite;
pub mod redis;
pub mod response_rewrite;
pub mod restrict;
pub mod shaping;
pub mod traffic_split;
pub mod util;
pub mod validation;

/// A registry holding every built-in plugin.
pub fn registry() -> PluginRegistry {
    let mut r = PluginRegistry::new();
    r.register(Arc::new(key_auth::KeyAuthFactory));
    r.register(Arc::new(limit_count::LimitCountFactory));
    r.register(Arc::new(limit_req::LimitReqFactory));
    r.register(Arc::new(limit_conn::LimitConnFactory));
    r.register(Arc::new(prometheus::PrometheusFactory));
    r.register(Arc::new(basic_auth::BasicAuthFactory));
    r.register(Arc::new(jwt_auth::JwtAuthFactory));
    r.register(Arc::new(hmac_auth::HmacAuthFactory));
    r.register(Arc::new(forward_auth::ForwardAuthFactory));
    r.register(Arc::new(cors::CorsFactory));
    r.register(Arc::new(csrf::CsrfFactory));
    r.register(Arc::new(restrict::IpRestrictionFactory));
    r.register(Arc::new(restrict::UaRestrictionFactory));
    r.register(Arc::new(restrict::RefererRestrictionFactory));
    r.register(Arc::new(restrict::UriBlockerFactory));
    r.register(Arc::new(restrict::ConsumerRestrictionFactory));
    r.register(Arc::new(restrict::RealIpFactory));
    r.register(Arc::new(shaping::RequestIdFactory));
    r.register(Arc::new(shaping::FaultInjectionFactory));
    r.register(Arc::new(shaping::MockingFactory));
    r.register(Arc::new(shaping::RedirectFactory));
    r.register(Arc::new(shaping::EchoFactory));
    r.register(Arc::new(traffic_split::TrafficSplitFactory));
    r.register(Arc::new(api_breaker::ApiBreakerFactory));
    r.register(Arc::new(proxy_mirror::ProxyMirrorFactory));
    r.register(Arc::new(loggers::HttpLoggerFactory));
    r.register(Arc::new(loggers::TcpLoggerFactory));
    r.register(Arc::new(loggers::FileLoggerFactory));
    r.register(Arc::new(validation::RequestValidationFactory));
    r.register(Arc::new(compress::CompressFactory::gzip()));
    r.register(Arc::new(compress::CompressFactory::brotli()));
    r.register(Arc::new(proxy_rewrite::ProxyRewriteFactory));
    r.register(Arc::new(response_rewrite::ResponseRewriteFactory));
    r
}
