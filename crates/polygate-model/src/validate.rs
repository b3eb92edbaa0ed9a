//! Schema and reference validation of a parsed [`ConfigFile`], following APISIX's
//! `schema_def.lua` rules. Every problem is collected with its key path.
//!
//! Checks that need other crates (the `vars` expressions, plugin schemas) run where those
//! crates build their structures, with the same key-path convention.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::OnceLock;

use regex::Regex;

use crate::error::ConfigErrors;
use crate::types::{ConfigFile, Id, Route, Timeout, Upstream};

/// Methods APISIX accepts in `methods`.
pub const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];

/// Balancer types.
pub const LB_TYPES: &[&str] = &["roundrobin", "chash", "least_conn", "ewma"];

/// `hash_on` values.
pub const HASH_ON: &[&str] = &["vars", "header", "cookie", "consumer", "vars_combinations"];

/// `scheme` values of APISIX (only `http` is proxied by this release).
pub const SCHEMES: &[&str] = &[
    "http", "https", "grpc", "grpcs", "tcp", "tls", "udp", "kafka",
];

fn id_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    #[allow(clippy::unwrap_used, reason = "constant pattern")]
    RE.get_or_init(|| Regex::new(r"^[a-zA-Z0-9\-_.]+$").unwrap())
}

fn host_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    #[allow(clippy::unwrap_used, reason = "constant pattern")]
    RE.get_or_init(|| Regex::new(r"^\*$|^\*?[0-9a-zA-Z\-._\[\]:]+$").unwrap())
}

fn username_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    #[allow(clippy::unwrap_used, reason = "constant pattern")]
    RE.get_or_init(|| Regex::new(r"^[a-zA-Z0-9_\-]+$").unwrap())
}

/// Validates everything that does not need plugin or router knowledge.
pub fn validate(cfg: &ConfigFile) -> Result<(), ConfigErrors> {
    validate_except(cfg, &|_| false)
}

/// [`validate`], without the checks of the routes `known` accepts: routes that an earlier
/// validation already passed (the same shared value). References between resources are
/// still checked for every route (a route's own fields cannot have changed, but what it
/// names may have).
pub fn validate_except(
    cfg: &ConfigFile,
    known: &dyn Fn(&std::sync::Arc<Route>) -> bool,
) -> Result<(), ConfigErrors> {
    let mut errs = ConfigErrors::default();
    if let Some(gw) = &cfg.gateway {
        validate_gateway(gw, &mut errs);
    }
    if let Some(a) = &cfg.apisix {
        validate_apisix(a, &mut errs);
    }

    let upstream_ids = collect_ids(
        cfg.upstreams.iter().map(|u| u.id.as_ref()),
        "upstreams",
        &mut errs,
    );
    let service_ids = collect_ids(
        cfg.services.iter().map(|s| s.id.as_ref()),
        "services",
        &mut errs,
    );
    let pc_ids = collect_ids(
        cfg.plugin_configs.iter().map(|p| p.id.as_ref()),
        "plugin_configs",
        &mut errs,
    );
    let group_ids = collect_ids(
        cfg.consumer_groups.iter().map(|g| g.id.as_ref()),
        "consumer_groups",
        &mut errs,
    );
    collect_ids(
        cfg.routes.iter().map(|r| r.id.as_ref()),
        "routes",
        &mut errs,
    );
    collect_ids(
        cfg.global_rules.iter().map(|g| g.id.as_ref()),
        "global_rules",
        &mut errs,
    );
    collect_ids(cfg.ssls.iter().map(|s| s.id.as_ref()), "ssls", &mut errs);

    for (i, u) in cfg.upstreams.iter().enumerate() {
        validate_upstream(u, &format!("upstreams[{i}]"), &mut errs);
    }
    for (i, s) in cfg.services.iter().enumerate() {
        let p = format!("services[{i}]");
        if let Some(u) = &s.upstream {
            validate_upstream(u, &format!("{p}.upstream"), &mut errs);
        }
        check_ref(
            &s.upstream_id,
            &upstream_ids,
            &format!("{p}.upstream_id"),
            "upstream",
            &mut errs,
        );
        if let Some(hosts) = &s.hosts {
            check_hosts(hosts, &format!("{p}.hosts"), &mut errs);
        }
        if let Some(n) = &s.name {
            check_len(n, 1, 256, &format!("{p}.name"), &mut errs);
        }
    }
    for (i, r) in cfg.routes.iter().enumerate() {
        if known(r) {
            let refs = [
                (&r.upstream_id, &upstream_ids, "upstream_id", "upstream"),
                (&r.service_id, &service_ids, "service_id", "service"),
                (
                    &r.plugin_config_id,
                    &pc_ids,
                    "plugin_config_id",
                    "plugin config",
                ),
            ];
            for (id, ids, field, what) in refs {
                if id.as_ref().is_some_and(|id| !ids.contains(&id.0)) {
                    check_ref(id, ids, &format!("routes[{i}].{field}"), what, &mut errs);
                }
            }
            continue;
        }
        validate_route(
            r,
            &format!("routes[{i}]"),
            &upstream_ids,
            &service_ids,
            &pc_ids,
            &mut errs,
        );
    }
    let mut usernames = HashSet::new();
    for (i, c) in cfg.consumers.iter().enumerate() {
        let p = format!("consumers[{i}]");
        if c.username.is_empty() {
            errs.push(format!("{p}.username"), "property \"username\" is required");
        } else if !username_re().is_match(&c.username) || c.username.len() > 100 {
            errs.push(
                format!("{p}.username"),
                format!(
                    "{:?} must match ^[a-zA-Z0-9_\\-]+$ (1-100 chars)",
                    c.username
                ),
            );
        } else if !usernames.insert(c.username.clone()) {
            errs.push(
                format!("{p}.username"),
                format!("duplicate consumer {:?}", c.username),
            );
        }
        check_ref(
            &c.group_id,
            &group_ids,
            &format!("{p}.group_id"),
            "consumer group",
            &mut errs,
        );
    }
    for (i, m) in cfg.plugin_metadata.iter().enumerate() {
        if !matches!(m.get("id"), Some(serde_json::Value::String(_))) {
            errs.push(
                format!("plugin_metadata[{i}].id"),
                "property \"id\" (the plugin name) is required",
            );
        }
    }
    for (i, s) in cfg.ssls.iter().enumerate() {
        let p = format!("ssls[{i}]");
        let is_client = s.ssl_type.as_deref() == Some("client");
        if let Some(t) = &s.ssl_type
            && t != "server"
            && t != "client"
        {
            errs.push(
                format!("{p}.type"),
                format!("{t:?} must be \"server\" or \"client\""),
            );
        }
        if s.cert.is_none() {
            errs.push(format!("{p}.cert"), "property \"cert\" is required");
        }
        if s.key.is_none() {
            errs.push(format!("{p}.key"), "property \"key\" is required");
        }
        if !is_client && s.snis.is_none() && s.sni.is_none() {
            errs.push(p.clone(), "one of \"sni\" or \"snis\" is required");
        }
        if s.certs.as_ref().map(Vec::len) != s.keys.as_ref().map(Vec::len) {
            errs.push(
                format!("{p}.keys"),
                "\"certs\" and \"keys\" must have the same length",
            );
        }
    }
    errs.into_result()
}

fn validate_admin(gw: &crate::types::GatewaySection, errs: &mut ConfigErrors) {
    let a = &gw.admin;
    if let Some(addr) = &a.addr
        && addr.parse::<std::net::SocketAddr>().is_err()
    {
        errs.push(
            "gateway.admin.addr",
            format!("{addr:?} is not an ip:port address"),
        );
    }
    for (i, k) in a.admin_key.iter().enumerate() {
        if k.key.len() < 8 {
            errs.push(
                format!("gateway.admin.admin_key[{i}].key"),
                "an admin key needs at least 8 characters",
            );
        }
    }
    for (i, c) in a.allow_admin.iter().enumerate() {
        if parse_cidr(c).is_none() {
            errs.push(
                format!("gateway.admin.allow_admin[{i}]"),
                format!("{c:?} is not a CIDR or an IP address"),
            );
        }
    }
    let e = &gw.etcd;
    if e.host.is_empty() {
        errs.push(
            "gateway.etcd.host",
            "at least one etcd endpoint is required",
        );
    }
    for (i, h) in e.host.iter().enumerate() {
        if !h.starts_with("http://") || h.parse::<http::Uri>().is_err() {
            errs.push(
                format!("gateway.etcd.host[{i}]"),
                format!("{h:?} must be http://host:port (TLS to etcd is not supported yet)"),
            );
        }
    }
    if !e.prefix.starts_with('/') || e.prefix.len() < 2 || e.prefix.ends_with('/') {
        errs.push(
            "gateway.etcd.prefix",
            format!("{:?} must start with / and not end with /", e.prefix),
        );
    }
    if !positive(e.timeout) {
        errs.push("gateway.etcd.timeout", POSITIVE_SECS);
    }
}

fn validate_gateway(gw: &crate::types::GatewaySection, errs: &mut ConfigErrors) {
    if gw.listeners.is_empty() {
        errs.push("gateway.listeners", "at least one listener is required");
    }
    for (i, l) in gw.listeners.iter().enumerate() {
        let p = format!("gateway.listeners[{i}]");
        if l.addr.parse::<std::net::SocketAddr>().is_err() {
            errs.push(
                format!("{p}.addr"),
                format!("{:?} is not an ip:port address", l.addr),
            );
        }
    }
    if let Some(m) = &gw.metrics
        && m.addr.parse::<std::net::SocketAddr>().is_err()
    {
        errs.push(
            "gateway.metrics.addr",
            format!("{:?} is not an ip:port address", m.addr),
        );
    }
    if let Some(d) = &gw.demo_upstream
        && d.parse::<std::net::SocketAddr>().is_err()
    {
        errs.push(
            "gateway.demo_upstream",
            format!("{d:?} is not an ip:port address"),
        );
    }
    validate_admin(gw, errs);
    if !["error", "warn", "info", "debug", "trace"].contains(&gw.log_level.as_str()) {
        errs.push(
            "gateway.log_level",
            format!(
                "{:?} must be one of error, warn, info, debug, trace",
                gw.log_level
            ),
        );
    }
    let t = &gw.timeouts;
    for (name, v) in [
        ("client_header", t.client_header),
        ("graceful_shutdown", t.graceful_shutdown),
        ("client_send", t.client_send),
        ("client_body", t.client_body),
    ] {
        if !positive(v) {
            errs.push(format!("gateway.timeouts.{name}"), POSITIVE_SECS);
        }
    }
    check_timeout(&t.upstream, "gateway.timeouts.upstream", errs);
    let lua = &gw.lua;
    non_negative_secs(lua.time_limit, "gateway.lua.time_limit", errs);
    if !positive(lua.ffi_timeout) {
        errs.push("gateway.lua.ffi_timeout", POSITIVE_SECS);
    }
    for (name, size) in &lua.shared_dict {
        let p = format!("gateway.lua.shared_dict.{name}");
        let ok_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_name {
            errs.push(p.clone(), "dictionary names use letters, digits, _ and -");
        }
        if size.0 < 8 << 10 {
            errs.push(p, "a shared dictionary needs at least 8k");
        }
    }
    if lua.memory_limit.0 != 0 && lua.memory_limit.0 < 4 << 20 {
        errs.push(
            "gateway.lua.memory_limit",
            "must be at least 4m (or 0 for no limit)",
        );
    }
    if !positive(gw.watch_interval) {
        errs.push("gateway.watch_interval", POSITIVE_SECS);
    }
    validate_wasm(&gw.wasm, errs);
}

fn validate_wasm(w: &crate::types::WasmConfig, errs: &mut ConfigErrors) {
    non_negative_secs(w.time_limit, "gateway.wasm.time_limit", errs);
    if w.memory_limit.0 < 64 << 10 || w.memory_limit.0 > 4 << 30 {
        errs.push(
            "gateway.wasm.memory_limit",
            "must be between 64k (one wasm page) and 4g",
        );
    }
    if w.body_limit.0 == 0 {
        errs.push("gateway.wasm.body_limit", "must be positive");
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in w.plugins.iter().enumerate() {
        let base = format!("gateway.wasm.plugins[{i}]");
        let ok_name = !p.name.is_empty()
            && p.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok_name {
            errs.push(
                format!("{base}.name"),
                "plugin names use letters, digits, _ and -",
            );
        } else if !seen.insert(p.name.as_str()) {
            errs.push(
                format!("{base}.name"),
                format!("duplicate wasm plugin {:?}", p.name),
            );
        }
        if p.file.is_empty() {
            errs.push(format!("{base}.file"), "must not be empty");
        }
        if !matches!(p.http_request_phase.as_str(), "access" | "rewrite") {
            errs.push(
                format!("{base}.http_request_phase"),
                "must be \"access\" or \"rewrite\"",
            );
        }
        if !matches!(p.request_body.as_str(), "buffer" | "stream") {
            errs.push(
                format!("{base}.request_body"),
                "must be \"buffer\" or \"stream\"",
            );
        }
        if let Some(v) = &p.vm_config
            && !(v.is_string() || v.is_object())
        {
            errs.push(format!("{base}.vm_config"), "must be a string or an object");
        }
    }
}

fn validate_apisix(a: &crate::types::ApisixSection, errs: &mut ConfigErrors) {
    for (i, t) in a.trusted_addresses.iter().enumerate() {
        if t.parse::<ipnet::IpNet>().is_err() && t.parse::<IpAddr>().is_err() {
            errs.push(
                format!("apisix.trusted_addresses[{i}]"),
                format!("{t:?} is not an IP address or CIDR"),
            );
        }
    }
    // settings APISIX has and polygate does not implement yet: refused rather than ignored
    for key in [
        "delete_uri_tail_slash",
        "normalize_uri_like_servlet",
        "match_uri_encoded_slash",
    ] {
        if a.other.get(key).is_some_and(|v| v.as_bool() == Some(true)) {
            errs.push(format!("apisix.{key}"), "not supported yet");
        }
    }
    if !ROUTERS.contains(&a.router.http.as_str()) {
        errs.push(
            "apisix.router.http",
            format!("{:?} must be one of {}", a.router.http, ROUTERS.join(", ")),
        );
    }
}

/// APISIX's HTTP routers (`apisix.router.http`).
pub const ROUTERS: &[&str] = &[
    "radixtree_host_uri",
    "radixtree_uri",
    "radixtree_uri_with_parameter",
];

/// The largest duration any setting accepts, in seconds (365 days). Larger values would
/// overflow timers; no gateway timeout needs more.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// True for a finite number > 0 and at most [`MAX_SECONDS`] (NaN is not).
fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0 && v <= MAX_SECONDS
}

/// A duration in seconds that may be 0: finite, >= 0 and at most [`MAX_SECONDS`].
fn non_negative_secs(v: f64, path: &str, errs: &mut ConfigErrors) {
    if !(v.is_finite() && (0.0..=MAX_SECONDS).contains(&v)) {
        errs.push(
            path,
            format!("must be a number of seconds between 0 and {MAX_SECONDS}"),
        );
    }
}

const POSITIVE_SECS: &str = "must be a number of seconds > 0 and at most 31536000 (365 days)";

fn collect_ids<'a>(
    ids: impl Iterator<Item = Option<&'a Id>>,
    kind: &str,
    errs: &mut ConfigErrors,
) -> HashSet<String> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        let p = format!("{kind}[{i}].id");
        match id {
            None => errs.push(p, "property \"id\" is required"),
            Some(id) => {
                if id.0.is_empty() || id.0.len() > 64 || !id_re().is_match(&id.0) {
                    errs.push(
                        p,
                        format!("{:?} must match ^[a-zA-Z0-9-_.]+$ (1-64 chars)", id.0),
                    );
                } else if !seen.insert(id.0.clone()) {
                    errs.push(p, format!("duplicate id {:?}", id.0));
                }
            }
        }
    }
    seen
}

fn check_ref(
    r: &Option<Id>,
    ids: &HashSet<String>,
    path: &str,
    what: &str,
    errs: &mut ConfigErrors,
) {
    if let Some(id) = r
        && !ids.contains(&id.0)
    {
        errs.push_dangling(path, format!("{what} {:?} not found", id.0));
    }
}

fn check_len(s: &str, min: usize, max: usize, path: &str, errs: &mut ConfigErrors) {
    let n = s.chars().count();
    if n < min || n > max {
        errs.push(path, format!("length must be between {min} and {max}"));
    }
}

fn check_timeout(t: &Timeout, path: &str, errs: &mut ConfigErrors) {
    for (name, v) in [("connect", t.connect), ("send", t.send), ("read", t.read)] {
        if !positive(v) {
            errs.push(format!("{path}.{name}"), POSITIVE_SECS);
        }
    }
}

fn check_hosts(hosts: &[String], path: &str, errs: &mut ConfigErrors) {
    if hosts.is_empty() {
        errs.push(path, "expect array to have at least 1 items");
    }
    for (i, h) in hosts.iter().enumerate() {
        if !host_re().is_match(h) {
            errs.push(
                format!("{path}[{i}]"),
                format!("{h:?} is not a valid host pattern"),
            );
        }
    }
}

/// Parses `ip` or `ip/prefix` (IPv4 or IPv6).
pub fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Some(net);
    }
    s.parse::<IpAddr>().ok().map(ipnet::IpNet::from)
}

fn check_unique(v: &[String], path: &str, errs: &mut ConfigErrors) {
    let mut seen = HashSet::new();
    for s in v {
        if !seen.insert(s) {
            errs.push(
                path,
                format!("expected unique items but {s:?} is duplicated"),
            );
        }
    }
}

fn validate_route(
    r: &Route,
    p: &str,
    upstream_ids: &HashSet<String>,
    service_ids: &HashSet<String>,
    pc_ids: &HashSet<String>,
    errs: &mut ConfigErrors,
) {
    match (&r.uri, &r.uris) {
        (Some(_), Some(_)) => errs.push(p, "\"uri\" and \"uris\" are mutually exclusive"),
        (None, None) => errs.push(p, "one of \"uri\" or \"uris\" is required"),
        (Some(u), None) => check_uri(u, &format!("{p}.uri"), errs),
        (None, Some(us)) => {
            if us.is_empty() {
                errs.push(format!("{p}.uris"), "expect array to have at least 1 items");
            }
            check_unique(us, &format!("{p}.uris"), errs);
            for (i, u) in us.iter().enumerate() {
                check_uri(u, &format!("{p}.uris[{i}]"), errs);
            }
        }
    }
    match (&r.host, &r.hosts) {
        (Some(_), Some(_)) => errs.push(p, "\"host\" and \"hosts\" are mutually exclusive"),
        (Some(h), None) => check_hosts(std::slice::from_ref(h), &format!("{p}.host"), errs),
        (None, Some(hs)) => check_hosts(hs, &format!("{p}.hosts"), errs),
        _ => {}
    }
    match (&r.remote_addr, &r.remote_addrs) {
        (Some(_), Some(_)) => errs.push(
            p,
            "\"remote_addr\" and \"remote_addrs\" are mutually exclusive",
        ),
        (Some(a), None) if parse_cidr(a).is_none() => {
            errs.push(
                format!("{p}.remote_addr"),
                format!("{a:?} is not an IP or CIDR"),
            );
        }
        (None, Some(addrs)) => {
            for (i, a) in addrs.iter().enumerate() {
                if parse_cidr(a).is_none() {
                    errs.push(
                        format!("{p}.remote_addrs[{i}]"),
                        format!("{a:?} is not an IP or CIDR"),
                    );
                }
            }
        }
        _ => {}
    }
    if let Some(ms) = &r.methods {
        check_unique(ms, &format!("{p}.methods"), errs);
        for (i, m) in ms.iter().enumerate() {
            if !METHODS.contains(&m.as_str()) {
                errs.push(
                    format!("{p}.methods[{i}]"),
                    format!("{m:?} must be one of {}", METHODS.join(", ")),
                );
            }
        }
    }
    if let Some(n) = &r.name {
        check_len(n, 1, 256, &format!("{p}.name"), errs);
    }
    if let Some(d) = &r.desc {
        check_len(d, 0, 256, &format!("{p}.desc"), errs);
    }
    if let Some(s) = r.status
        && s != 0
        && s != 1
    {
        errs.push(format!("{p}.status"), "must be 0 or 1");
    }
    if let Some(t) = &r.timeout {
        check_timeout(t, &format!("{p}.timeout"), errs);
    }
    if r.filter_func.is_some() {
        errs.push(
            format!("{p}.filter_func"),
            "filter_func is not supported yet (use `vars` expressions, or a lua plugin that answers 404)",
        );
    }
    if r.script.is_some() || r.script_id.is_some() {
        errs.push(
            format!("{p}.script"),
            "route scripts (plugin orchestration) are not supported; use the lua or serverless-* plugins",
        );
    }
    if r.plugins.is_none()
        && r.upstream.is_none()
        && r.upstream_id.is_none()
        && r.service_id.is_none()
        && r.script.is_none()
    {
        errs.push(
            p,
            "one of \"plugins\", \"upstream\", \"upstream_id\", \"service_id\" or \"script\" is required",
        );
    }
    if let Some(u) = &r.upstream {
        validate_upstream(u, &format!("{p}.upstream"), errs);
    }
    check_ref(
        &r.upstream_id,
        upstream_ids,
        &format!("{p}.upstream_id"),
        "upstream",
        errs,
    );
    check_ref(
        &r.service_id,
        service_ids,
        &format!("{p}.service_id"),
        "service",
        errs,
    );
    check_ref(
        &r.plugin_config_id,
        pc_ids,
        &format!("{p}.plugin_config_id"),
        "plugin config",
        errs,
    );
}

fn check_uri(u: &str, path: &str, errs: &mut ConfigErrors) {
    if u.is_empty() || u.len() > 4096 {
        errs.push(path, "length must be between 1 and 4096");
    } else if !u.starts_with('/') && u != "*" {
        errs.push(path, format!("{u:?} must start with '/'"));
    }
}

/// Validates one upstream (standalone or inline) at `p`.
pub fn validate_upstream(u: &Upstream, p: &str, errs: &mut ConfigErrors) {
    let lb = u.lb_type.as_deref().unwrap_or("roundrobin");
    if !LB_TYPES.contains(&lb) {
        errs.push(
            format!("{p}.type"),
            format!("{lb:?} must be one of {}", LB_TYPES.join(", ")),
        );
    }
    if lb == "chash" {
        let hash_on = u.hash_on.as_deref().unwrap_or("vars");
        if !HASH_ON.contains(&hash_on) {
            errs.push(
                format!("{p}.hash_on"),
                format!("{hash_on:?} must be one of {}", HASH_ON.join(", ")),
            );
        }
        if hash_on != "consumer" && u.key.as_deref().unwrap_or("").is_empty() {
            errs.push(
                format!("{p}.key"),
                "property \"key\" is required when type is chash",
            );
        }
    }
    match (&u.nodes, &u.service_name) {
        (None, None) => errs.push(p, "one of \"nodes\" or \"service_name\" is required"),
        (Some(_), Some(_)) => errs.push(p, "\"nodes\" and \"service_name\" are mutually exclusive"),
        (None, Some(_)) => {
            if u.discovery_type.is_none() {
                errs.push(
                    format!("{p}.discovery_type"),
                    "required with \"service_name\"",
                );
            } else {
                errs.push(
                    format!("{p}.discovery_type"),
                    "service discovery is not available in this release",
                );
            }
        }
        (Some(nodes), None) => {
            let mut seen = HashMap::new();
            for (i, n) in nodes.0.iter().enumerate() {
                let np = format!("{p}.nodes[{i}]");
                if n.host.is_empty() {
                    errs.push(format!("{np}.host"), "must not be empty");
                }
                if n.weight < 0 {
                    errs.push(format!("{np}.weight"), "must be >= 0");
                }
                if n.port == Some(0) {
                    errs.push(format!("{np}.port"), "must be between 1 and 65535");
                }
                if let Some(prev) = seen.insert((n.host.clone(), n.port), i) {
                    errs.push(np, format!("duplicate of nodes[{prev}]"));
                }
            }
        }
    }
    if let Some(r) = u.retries
        && r < 0
    {
        errs.push(format!("{p}.retries"), "must be >= 0");
    }
    if let Some(r) = u.retry_timeout {
        non_negative_secs(r, &format!("{p}.retry_timeout"), errs);
    }
    if let Some(t) = &u.timeout {
        check_timeout(t, &format!("{p}.timeout"), errs);
    }
    let pass_host = u.pass_host.as_deref().unwrap_or("pass");
    if !["pass", "node", "rewrite"].contains(&pass_host) {
        errs.push(
            format!("{p}.pass_host"),
            format!("{pass_host:?} must be one of pass, node, rewrite"),
        );
    }
    if pass_host == "rewrite" && u.upstream_host.as_deref().unwrap_or("").is_empty() {
        errs.push(
            format!("{p}.upstream_host"),
            "required when pass_host is rewrite",
        );
    }
    if let Some(s) = &u.scheme
        && !SCHEMES.contains(&s.as_str())
    {
        errs.push(
            format!("{p}.scheme"),
            format!("{s:?} must be one of {}", SCHEMES.join(", ")),
        );
    }
    if let Some(c) = &u.checks {
        validate_checks(c, &format!("{p}.checks"), errs);
    }
    if let Some(k) = &u.keepalive_pool {
        if k.size < 1 {
            errs.push(format!("{p}.keepalive_pool.size"), "must be >= 1");
        }
        non_negative_secs(
            k.idle_timeout,
            &format!("{p}.keepalive_pool.idle_timeout"),
            errs,
        );
        if k.requests < 1 {
            errs.push(format!("{p}.keepalive_pool.requests"), "must be >= 1");
        }
    }
    if let Some(n) = &u.name {
        check_len(n, 1, 256, &format!("{p}.name"), errs);
    }
}

fn validate_checks(c: &crate::types::HealthChecks, p: &str, errs: &mut ConfigErrors) {
    let Some(a) = &c.active else {
        // APISIX's schema: `anyOf [{required: [active]}, {required: [active, passive]}]`
        errs.push(
            format!("{p}.active"),
            "property \"active\" is required (passive checks need active ones)",
        );
        return;
    };
    let types = ["http", "https", "tcp"];
    if !types.contains(&a.check_type.as_str()) {
        errs.push(
            format!("{p}.active.type"),
            format!("{:?} must be one of http, https, tcp", a.check_type),
        );
    }
    if a.timeout <= 0.0 {
        errs.push(format!("{p}.active.timeout"), "must be > 0");
    }
    if a.concurrency < 1 {
        errs.push(format!("{p}.active.concurrency"), "must be >= 1");
    }
    for (k, v) in [
        ("healthy.interval", a.healthy.interval),
        ("unhealthy.interval", a.unhealthy.interval),
    ] {
        if v < 1.0 {
            errs.push(format!("{p}.active.{k}"), "must be >= 1");
        }
    }
    let counts = [
        ("active.healthy.successes", a.healthy.successes),
        ("active.unhealthy.http_failures", a.unhealthy.http_failures),
        ("active.unhealthy.tcp_failures", a.unhealthy.tcp_failures),
        ("active.unhealthy.timeouts", a.unhealthy.timeouts),
    ];
    let mut lists = vec![
        ("active.healthy.http_statuses", &a.healthy.http_statuses),
        ("active.unhealthy.http_statuses", &a.unhealthy.http_statuses),
    ];
    let mut all_counts = counts.to_vec();
    if let Some(ps) = &c.passive {
        if !types.contains(&ps.check_type.as_str()) {
            errs.push(
                format!("{p}.passive.type"),
                format!("{:?} must be one of http, https, tcp", ps.check_type),
            );
        }
        all_counts.extend([
            ("passive.healthy.successes", ps.healthy.successes),
            (
                "passive.unhealthy.http_failures",
                ps.unhealthy.http_failures,
            ),
            ("passive.unhealthy.tcp_failures", ps.unhealthy.tcp_failures),
            ("passive.unhealthy.timeouts", ps.unhealthy.timeouts),
        ]);
        lists.push(("passive.healthy.http_statuses", &ps.healthy.http_statuses));
        lists.push((
            "passive.unhealthy.http_statuses",
            &ps.unhealthy.http_statuses,
        ));
    }
    for (k, v) in all_counts {
        if !(1..=254).contains(&v) {
            errs.push(format!("{p}.{k}"), "must be between 1 and 254");
        }
    }
    for (k, l) in lists {
        if l.is_empty() {
            errs.push(format!("{p}.{k}"), "expect array to have at least 1 items");
        }
        for (i, s) in l.iter().enumerate() {
            if !(200..=599).contains(s) {
                errs.push(format!("{p}.{k}[{i}]"), "must be between 200 and 599");
            }
        }
    }
    for (i, h) in a.req_headers.iter().enumerate() {
        if !h.contains(':') {
            errs.push(
                format!("{p}.active.req_headers[{i}]"),
                "must be \"Name: value\"",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;
    use crate::load::{Format, parse_str};

    fn errs(yaml: &str) -> String {
        let cfg = parse_str(yaml, Format::Yaml, &MapEnv::default()).unwrap();
        validate(&cfg).unwrap_err().to_string()
    }

    #[test]
    fn dangling_upstream_reference() {
        let e = errs("routes:\n  - id: 1\n    uri: /a\n    upstream_id: nope\n");
        assert!(
            e.contains("routes[0].upstream_id: upstream \"nope\" not found"),
            "{e}"
        );
    }

    #[test]
    fn uri_required_and_exclusive() {
        let e = errs(
            "routes:\n  - id: 1\n    upstream_id: 1\nupstreams:\n  - id: 1\n    nodes: {\"127.0.0.1:1\": 1}\n",
        );
        assert!(
            e.contains("routes[0]: one of \"uri\" or \"uris\" is required"),
            "{e}"
        );
    }

    #[test]
    fn bad_method_and_cidr() {
        let e = errs(
            "routes:\n  - id: 1\n    uri: /a\n    methods: [GETT]\n    remote_addrs: [\"10.0.0.0/33\"]\n    upstream:\n      nodes: {\"127.0.0.1:1\": 1}\n",
        );
        assert!(e.contains("routes[0].methods[0]"), "{e}");
        assert!(e.contains("routes[0].remote_addrs[0]"), "{e}");
    }

    #[test]
    fn chash_needs_key() {
        let e = errs("upstreams:\n  - id: 1\n    type: chash\n    nodes: {\"127.0.0.1:1\": 1}\n");
        assert!(e.contains("upstreams[0].key"), "{e}");
    }
}
