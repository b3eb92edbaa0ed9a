//! polygate's configuration pipeline.
//!
//! ```text
//! source (file, etcd, the Admin API's /configs) ─► document: keyed resources (routes/12 ...)
//!     ─► prepare: build what changed into a candidate; no effect on the running process;
//!                 an error or a panic rejects the change (or, item by item, skips the
//!                 resources at fault, as APISIX's standalone mode does)
//!     ─► commit:  swap the candidate in, then apply process-wide state
//! ```
//!
//! - [`document`]: parsing a file into resources with APISIX's ids and item semantics.
//! - [`pipeline`]: [`Pipeline`] drives prepare and commit for a [`Target`] (the data plane
//!   implements it), and keeps a [`Status`].
//! - [`watch`]: the file watcher, which survives whatever a file contains.
#![forbid(unsafe_code)]

pub mod document;
pub mod encryption;
pub mod etcd;
pub mod pipeline;
pub mod watch;

pub use document::{Document, Kind};
pub use pipeline::{Applied, Pipeline, Status, Target};
