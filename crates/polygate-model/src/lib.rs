//! APISIX-compatible resource model for polygate.
//!
//! - [`types`]: serde types of the configuration file (the `gateway:` section and the APISIX
//!   resources `routes`, `services`, `upstreams`, `plugin_configs`, `global_rules`, `consumers`,
//!   `consumer_groups`, `ssls`, `plugin_metadata`), with APISIX's field names.
//! - [`load`]: reading a file (YAML with APISIX's `#END` marker, or JSON) with `${{ENV}}`
//!   substitution; parse errors name the key path.
//! - [`validate`]: schema and reference checks, every problem tagged with its key path.
#![forbid(unsafe_code)]

pub mod env;
pub mod error;
pub mod load;
pub mod types;
pub mod validate;

pub use error::{ConfigError, ConfigErrors};
pub use types::*;
