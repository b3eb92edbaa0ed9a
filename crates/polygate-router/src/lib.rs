//! Route matching for polygate with Apache APISIX semantics.
//!
//! - [`expr`]: the lua-resty-expr DSL (`vars`, `_meta.filter`).
//! - [`table`]: the route table, a persistent index so that one route change touches only that
//!   route's buckets (APISIX rebuilds its whole radix tree on every change).
#![forbid(unsafe_code)]

pub mod expr;
pub mod table;

pub use expr::{Expr, ExprError, VarSource};
pub use table::{Entry, MatchInput, Matched, RouteError, RouteSpec, Router, RouterMode};
