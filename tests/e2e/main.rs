//! End-to-end tests: the real `polygate` binary against real upstream servers on loopback.
#![allow(missing_docs, clippy::unwrap_used)]

mod support;

mod admin;
mod auth;
mod balance;
mod config;
mod etcd;
mod ffi;
mod ffi_loading;
mod grpc;
mod h2spec;
mod health;
mod java_rt;
mod limits;
mod lua;
mod node_rt;
mod observability;
mod ops;
mod plugins;
mod python_rt;
mod routing;
mod security;
mod soak;
mod tls;
mod traffic;
mod upstream_http;
mod wasm;
mod websocket;
