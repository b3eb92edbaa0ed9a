//! APISIX-compatible resource model for polygate.
//!
//! - [`types`]: serde types of the configuration file (the `gateway:` section and the APISIX
//!   resources `routes`, `services`, `upstreams`, `plugin_configs`, `global_rules`, `consumers`,
//!   `consumer_groups`, `ssls`, `plugin_metadata`), with APISIX's field names.
//! - [`load`]: file formats, APISIX's `#END` marker, `${{ENV}}` substitution, and typed parsing
//!   of a whole text (the configuration pipeline, `polygate-config`, types each resource on
//!   its own instead).
//! - [`validate`]: schema and reference checks, every problem tagged with its key path.
#![forbid(unsafe_code)]

pub mod env;
pub mod error;
pub mod load;
pub mod types;
pub mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use types::*;

/// Seconds as a [`std::time::Duration`] that never panics: negative or NaN is zero, and
/// anything above [`validate::MAX_SECONDS`] (365 days) is that maximum. Configuration values
/// are checked against the same bound at validation; this is for values computed at run time
/// (Lua's `ngx.sleep`, timers) and a last line of defence everywhere else.
pub fn secs(v: f64) -> std::time::Duration {
    if v.is_nan() || v <= 0.0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_secs_f64(v.min(validate::MAX_SECONDS))
}
