//! The access-list plugins, with APISIX's fields, priorities and answers:
//!
//! | plugin | priority | phase | decides on |
//! |---|---|---|---|
//! | `ip-restriction` | 3000 | access | `remote_addr` in `whitelist`/`blacklist` (IPs, CIDRs) |
//! | `ua-restriction` | 2999 | access | `User-Agent` against `allowlist`/`denylist` regexes |
//! | `referer-restriction` | 2990 | access | the `Referer`'s host in `whitelist`/`blacklist` (`*.` suffixes) |
//! | `uri-blocker` | 2900 | rewrite | `$request_uri` against `block_rules` regexes |
//! | `consumer-restriction` | 2400 | access | consumer name, consumer group, route or service id |

use std::net::IpAddr;
use std::sync::Arc;

use http::{Method, StatusCode};
use ipnet::IpNet;
use polygate_core::{ConfError, Flow, Plugin, PluginFactory, PluginResponse, RequestCtx};
use polygate_router::VarSource;
use regex::{Regex, RegexSet};
use serde::Deserialize;
use serde_json::Value;

use crate::util::parse_conf;

fn non_empty_list(v: &Option<Vec<String>>, path: &str) -> Result<(), ConfError> {
    match v {
        Some(l) if l.is_empty() => {
            Err(ConfError::at(path, "expect array to have at least 1 items"))
        }
        _ => Ok(()),
    }
}

fn one_of(a: bool, b: bool, names: (&str, &str)) -> Result<(), ConfError> {
    if a == b {
        return Err(ConfError::whole(format!(
            "value should match only one schema, but matches {}: set either \"{}\" or \"{}\"",
            if a { "both" } else { "none" },
            names.0,
            names.1
        )));
    }
    Ok(())
}

/// The checks an access list plugin's fields share: exactly one of the two lists, neither
/// empty, and a message of 1 to 1024 characters.
fn allow_or_deny(
    allow: &Option<Vec<String>>,
    deny: &Option<Vec<String>>,
    names: (&str, &str),
    message: &str,
) -> Result<(), ConfError> {
    one_of(allow.is_some(), deny.is_some(), names)?;
    non_empty_list(allow, names.0)?;
    non_empty_list(deny, names.1)?;
    message_len(message)
}

fn message_len(m: &str) -> Result<(), ConfError> {
    if m.is_empty() || m.len() > 1024 {
        return Err(ConfError::at("message", "must be 1 to 1024 characters"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------- ip-restriction

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpConf {
    #[serde(default = "ip_msg")]
    message: String,
    #[serde(default = "d403")]
    response_code: u16,
    whitelist: Option<Vec<String>>,
    blacklist: Option<Vec<String>>,
}

fn ip_msg() -> String {
    "Your IP address is not allowed".into()
}
fn d403() -> u16 {
    403
}

/// IPs and CIDRs.
#[derive(Debug, Clone)]
pub struct IpList(Vec<IpNet>);

impl IpList {
    /// Parses entries (`10.0.0.1`, `10.0.0.0/8`, `::1`, `fe80::/10`); the error names the entry.
    pub fn parse(list: &[String], path: &str) -> Result<IpList, ConfError> {
        let mut out = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let net = match s.parse::<IpNet>() {
                Ok(n) => n,
                Err(_) => match s.parse::<IpAddr>() {
                    Ok(a) => IpNet::from(a),
                    Err(_) => {
                        return Err(ConfError::at(
                            format!("{path}[{i}]"),
                            format!("invalid ip address: {s}"),
                        ));
                    }
                },
            };
            out.push(net);
        }
        Ok(IpList(out))
    }

    /// Whether `ip` is in the list (an IPv4-mapped IPv6 address matches its IPv4 entries).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

struct IpRestriction {
    allow: Option<IpList>,
    deny: Option<IpList>,
    status: StatusCode,
    message: String,
}

/// Factory of `ip-restriction`.
pub struct IpRestrictionFactory;

impl PluginFactory for IpRestrictionFactory {
    fn name(&self) -> &str {
        "ip-restriction"
    }
    fn priority(&self) -> i32 {
        3000
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "message": {"type": "string", "minLength": 1, "maxLength": 1024,
                        "default": "Your IP address is not allowed"},
            "response_code": {"type": "integer", "minimum": 403, "maximum": 404, "default": 403},
            "whitelist": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "blacklist": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "_meta": {"type": "object"}
        }, "oneOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: IpConf = parse_conf(conf)?;
        allow_or_deny(
            &c.whitelist,
            &c.blacklist,
            ("whitelist", "blacklist"),
            &c.message,
        )?;
        if !(403..=404).contains(&c.response_code) {
            return Err(ConfError::at("response_code", "must be 403 or 404"));
        }
        Ok(Arc::new(IpRestriction {
            allow: c
                .whitelist
                .as_deref()
                .map(|l| IpList::parse(l, "whitelist"))
                .transpose()?,
            deny: c
                .blacklist
                .as_deref()
                .map(|l| IpList::parse(l, "blacklist"))
                .transpose()?,
            status: StatusCode::from_u16(c.response_code).unwrap_or(StatusCode::FORBIDDEN),
            message: c.message,
        }))
    }
}

impl Plugin for IpRestriction {
    fn name(&self) -> &str {
        "ip-restriction"
    }
    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let ip = ctx.client_addr.ip();
        let blocked = match (&self.allow, &self.deny) {
            (Some(a), _) => !a.contains(ip),
            (None, Some(d)) => d.contains(ip),
            (None, None) => false,
        };
        if blocked {
            return Flow::Respond(PluginResponse::message(self.status, &self.message));
        }
        Flow::Continue
    }
}

// ---------------------------------------------------------------------------- ua-restriction

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UaConf {
    #[serde(default)]
    bypass_missing: bool,
    allowlist: Option<Vec<String>>,
    denylist: Option<Vec<String>>,
    #[serde(default = "ua_msg")]
    message: String,
}

fn ua_msg() -> String {
    "Not allowed".into()
}

fn regex_set(list: &[String], path: &str) -> Result<RegexSet, ConfError> {
    for (i, r) in list.iter().enumerate() {
        if r.is_empty() {
            return Err(ConfError::at(format!("{path}[{i}]"), "must not be empty"));
        }
        if let Err(e) = Regex::new(r) {
            return Err(ConfError::at(
                format!("{path}[{i}]"),
                format!("invalid regex: {e}"),
            ));
        }
    }
    RegexSet::new(list).map_err(|e| ConfError::at(path, e.to_string()))
}

struct UaRestriction {
    bypass_missing: bool,
    allow: Option<RegexSet>,
    deny: Option<RegexSet>,
    message: String,
}

/// Factory of `ua-restriction`.
pub struct UaRestrictionFactory;

impl PluginFactory for UaRestrictionFactory {
    fn name(&self) -> &str {
        "ua-restriction"
    }
    fn priority(&self) -> i32 {
        2999
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "bypass_missing": {"type": "boolean", "default": false},
            "allowlist": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            "denylist": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
            "message": {"type": "string", "minLength": 1, "maxLength": 1024, "default": "Not allowed"},
            "_meta": {"type": "object"}
        }, "oneOf": [{"required": ["allowlist"]}, {"required": ["denylist"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: UaConf = parse_conf(conf)?;
        allow_or_deny(
            &c.allowlist,
            &c.denylist,
            ("allowlist", "denylist"),
            &c.message,
        )?;
        Ok(Arc::new(UaRestriction {
            bypass_missing: c.bypass_missing,
            allow: c
                .allowlist
                .as_deref()
                .map(|l| regex_set(l, "allowlist"))
                .transpose()?,
            deny: c
                .denylist
                .as_deref()
                .map(|l| regex_set(l, "denylist"))
                .transpose()?,
            message: c.message,
        }))
    }
}

impl Plugin for UaRestriction {
    fn name(&self) -> &str {
        "ua-restriction"
    }
    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let uas: Vec<&str> = ctx
            .headers
            .get_all(http::header::USER_AGENT)
            .iter()
            .map(|v| v.to_str().unwrap_or(""))
            .map(str::trim)
            .collect();
        let passed = if uas.is_empty() {
            self.bypass_missing
        } else if let Some(a) = &self.allow {
            uas.iter().any(|ua| a.is_match(ua))
        } else if let Some(d) = &self.deny {
            !uas.iter().any(|ua| d.is_match(ua))
        } else {
            true
        };
        if passed {
            Flow::Continue
        } else {
            Flow::Respond(PluginResponse::message(
                StatusCode::FORBIDDEN,
                &self.message,
            ))
        }
    }
}

// ----------------------------------------------------------------------- referer-restriction

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefererConf {
    #[serde(default)]
    bypass_missing: bool,
    whitelist: Option<Vec<String>>,
    blacklist: Option<Vec<String>>,
    #[serde(default = "ref_msg")]
    message: String,
}

fn ref_msg() -> String {
    "Your referer host is not allowed".into()
}

/// Hosts, exact or `*.suffix`.
struct Hosts {
    exact: Vec<String>,
    suffixes: Vec<String>,
}

impl Hosts {
    fn new(list: &[String]) -> Hosts {
        let mut h = Hosts {
            exact: Vec::new(),
            suffixes: Vec::new(),
        };
        for s in list {
            match s.strip_prefix('*') {
                Some(suffix) => h.suffixes.push(suffix.to_ascii_lowercase()),
                None => h.exact.push(s.to_ascii_lowercase()),
            }
        }
        h
    }

    fn matches(&self, host: &str) -> bool {
        self.exact.iter().any(|e| e == host) || self.suffixes.iter().any(|s| host.ends_with(s))
    }
}

struct RefererRestriction {
    bypass_missing: bool,
    allow: Option<Hosts>,
    deny: Option<Hosts>,
    message: String,
}

/// Factory of `referer-restriction`.
pub struct RefererRestrictionFactory;

/// The host of a `Referer` URL (`scheme://host[:port]/...`), lower case.
fn referer_host(r: &str) -> Option<String> {
    let rest = r.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let host = polygate_core::ctx::strip_port(authority);
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl PluginFactory for RefererRestrictionFactory {
    fn name(&self) -> &str {
        "referer-restriction"
    }
    fn priority(&self) -> i32 {
        2990
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "bypass_missing": {"type": "boolean", "default": false},
            "whitelist": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "blacklist": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "message": {"type": "string", "minLength": 1, "maxLength": 1024,
                        "default": "Your referer host is not allowed"},
            "_meta": {"type": "object"}
        }, "oneOf": [{"required": ["whitelist"]}, {"required": ["blacklist"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: RefererConf = parse_conf(conf)?;
        allow_or_deny(
            &c.whitelist,
            &c.blacklist,
            ("whitelist", "blacklist"),
            &c.message,
        )?;
        for (k, l) in [("whitelist", &c.whitelist), ("blacklist", &c.blacklist)] {
            for (i, h) in l.iter().flatten().enumerate() {
                let bare = h.strip_prefix('*').unwrap_or(h);
                if bare.is_empty()
                    || !bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                {
                    return Err(ConfError::at(
                        format!("{k}[{i}]"),
                        format!("invalid host {h:?}"),
                    ));
                }
            }
        }
        Ok(Arc::new(RefererRestriction {
            bypass_missing: c.bypass_missing,
            allow: c.whitelist.as_deref().map(Hosts::new),
            deny: c.blacklist.as_deref().map(Hosts::new),
            message: c.message,
        }))
    }
}

impl Plugin for RefererRestriction {
    fn name(&self) -> &str {
        "referer-restriction"
    }
    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let host = ctx.header("referer").and_then(referer_host);
        let block = match host {
            None => !self.bypass_missing,
            Some(h) => match (&self.allow, &self.deny) {
                (Some(a), _) => !a.matches(&h),
                (None, Some(d)) => d.matches(&h),
                _ => false,
            },
        };
        if block {
            return Flow::Respond(PluginResponse::message(
                StatusCode::FORBIDDEN,
                &self.message,
            ));
        }
        Flow::Continue
    }
}

// ------------------------------------------------------------------------------- uri-blocker

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockerConf {
    block_rules: Vec<String>,
    #[serde(default = "d403")]
    rejected_code: u16,
    rejected_msg: Option<String>,
    #[serde(default)]
    case_insensitive: bool,
}

struct UriBlocker {
    rules: Regex,
    status: StatusCode,
    msg: Option<String>,
}

/// Factory of `uri-blocker`.
pub struct UriBlockerFactory;

impl PluginFactory for UriBlockerFactory {
    fn name(&self) -> &str {
        "uri-blocker"
    }
    fn priority(&self) -> i32 {
        2900
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "block_rules": {"type": "array", "uniqueItems": true,
                            "items": {"type": "string", "minLength": 1, "maxLength": 4096}},
            "rejected_code": {"type": "integer", "minimum": 200, "default": 403},
            "rejected_msg": {"type": "string", "minLength": 1},
            "case_insensitive": {"type": "boolean", "default": false},
            "_meta": {"type": "object"}
        }, "required": ["block_rules"], "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: BlockerConf = parse_conf(conf)?;
        let mut seen = std::collections::HashSet::new();
        for (i, r) in c.block_rules.iter().enumerate() {
            if r.is_empty() || r.len() > 4096 {
                return Err(ConfError::at(
                    format!("block_rules[{i}]"),
                    "must be 1 to 4096 characters",
                ));
            }
            if !seen.insert(r) {
                return Err(ConfError::at("block_rules", "expected unique items"));
            }
            if let Err(e) = Regex::new(r) {
                return Err(ConfError::at(
                    format!("block_rules[{i}]"),
                    format!("invalid regex: {e}"),
                ));
            }
        }
        let rejected_status = crate::util::status(c.rejected_code, "rejected_code")?;
        let joined = c
            .block_rules
            .iter()
            .map(|r| format!("(?:{r})"))
            .collect::<Vec<_>>()
            .join("|");
        let src = if c.case_insensitive {
            format!("(?i){joined}")
        } else {
            joined
        };
        // no rules: nothing is blocked
        let rules = if c.block_rules.is_empty() {
            Regex::new("[^\\s\\S]")
        } else {
            Regex::new(&src)
        }
        .map_err(|e| ConfError::at("block_rules", e.to_string()))?;
        Ok(Arc::new(UriBlocker {
            rules,
            status: rejected_status,
            msg: c.rejected_msg,
        }))
    }
}

impl Plugin for UriBlocker {
    fn name(&self) -> &str {
        "uri-blocker"
    }
    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let uri = ctx.var("request_uri").unwrap_or_default();
        if self.rules.is_match(&uri) {
            return Flow::Respond(crate::util::rejection(self.status, self.msg.as_deref()));
        }
        Flow::Continue
    }
}

// ---------------------------------------------------------------------- consumer-restriction

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodsConf {
    user: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerConf {
    #[serde(rename = "type", default = "consumer_name")]
    kind: String,
    blacklist: Option<Vec<String>>,
    whitelist: Option<Vec<String>>,
    allowed_by_methods: Option<Vec<MethodsConf>>,
    #[serde(default = "d403")]
    rejected_code: u16,
    rejected_msg: Option<String>,
}

fn consumer_name() -> String {
    "consumer_name".into()
}

#[derive(Clone, Copy)]
enum Subject {
    Consumer,
    ConsumerGroup,
    Route,
    Service,
}

struct ConsumerRestriction {
    subject: Subject,
    kind: String,
    deny: Vec<String>,
    allow: Vec<String>,
    by_methods: Vec<(Option<String>, Vec<Method>)>,
    status: StatusCode,
    msg: String,
}

/// Factory of `consumer-restriction`.
pub struct ConsumerRestrictionFactory;

impl PluginFactory for ConsumerRestrictionFactory {
    fn name(&self) -> &str {
        "consumer-restriction"
    }
    fn priority(&self) -> i32 {
        2400
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "type": {"type": "string", "default": "consumer_name",
                     "enum": ["consumer_name", "service_id", "route_id", "consumer_group_id"]},
            "blacklist": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "whitelist": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "allowed_by_methods": {"type": "array", "items": {"type": "object", "properties": {
                "user": {"type": "string"},
                "methods": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}},
            "rejected_code": {"type": "integer", "minimum": 200, "default": 403},
            "rejected_msg": {"type": "string"},
            "_meta": {"type": "object"}
        }, "anyOf": [{"required": ["blacklist"]}, {"required": ["whitelist"]},
                     {"required": ["allowed_by_methods"]}],
        "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: ConsumerConf = parse_conf(conf)?;
        let subject = match c.kind.as_str() {
            "consumer_name" => Subject::Consumer,
            "consumer_group_id" => Subject::ConsumerGroup,
            "route_id" => Subject::Route,
            "service_id" => Subject::Service,
            other => {
                return Err(ConfError::at(
                    "type",
                    format!("matches none of the enum values: {other:?}"),
                ));
            }
        };
        if c.blacklist.is_none() && c.whitelist.is_none() && c.allowed_by_methods.is_none() {
            return Err(ConfError::whole(
                "value should match any of: whitelist, blacklist or allowed_by_methods",
            ));
        }
        non_empty_list(&c.whitelist, "whitelist")?;
        non_empty_list(&c.blacklist, "blacklist")?;
        let rejected_status = crate::util::status(c.rejected_code, "rejected_code")?;
        let mut by_methods = Vec::new();
        for (i, m) in c.allowed_by_methods.iter().flatten().enumerate() {
            if m.methods.is_empty() {
                return Err(ConfError::at(
                    format!("allowed_by_methods[{i}].methods"),
                    "expect array to have at least 1 items",
                ));
            }
            let mut methods = Vec::new();
            for (j, s) in m.methods.iter().enumerate() {
                let ok = matches!(
                    s.as_str(),
                    "GET"
                        | "POST"
                        | "PUT"
                        | "DELETE"
                        | "PATCH"
                        | "HEAD"
                        | "OPTIONS"
                        | "CONNECT"
                        | "TRACE"
                        | "PURGE"
                );
                if !ok {
                    return Err(ConfError::at(
                        format!("allowed_by_methods[{i}].methods[{j}]"),
                        format!("invalid method {s:?}"),
                    ));
                }
                methods.push(Method::from_bytes(s.as_bytes()).unwrap_or(Method::GET));
            }
            by_methods.push((m.user.clone(), methods));
        }
        let msg = c
            .rejected_msg
            .unwrap_or_else(|| format!("The {} is forbidden.", c.kind));
        Ok(Arc::new(ConsumerRestriction {
            subject,
            kind: c.kind,
            deny: c.blacklist.unwrap_or_default(),
            allow: c.whitelist.unwrap_or_default(),
            by_methods,
            status: rejected_status,
            msg,
        }))
    }
}

impl Plugin for ConsumerRestriction {
    fn name(&self) -> &str {
        "consumer-restriction"
    }
    fn access<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        let value: Option<&str> = match self.subject {
            Subject::Consumer => ctx.consumer.as_ref().map(|c| c.username.as_str()),
            Subject::ConsumerGroup => ctx.consumer.as_ref().and_then(|c| c.group_id.as_deref()),
            Subject::Route => ctx.route_id.as_deref(),
            Subject::Service => ctx.service_id.as_deref(),
        };
        let Some(value) = value else {
            return Flow::Respond(PluginResponse::message(
                StatusCode::UNAUTHORIZED,
                &format!(
                    "The request is rejected, please check the {} for this request",
                    self.kind
                ),
            ));
        };
        let reject = || Flow::Respond(PluginResponse::message(self.status, &self.msg));
        if self.deny.iter().any(|d| d == value) {
            return reject();
        }
        let whitelisted = !self.allow.is_empty() && self.allow.iter().any(|a| a == value);
        let mut block = !self.allow.is_empty() && !whitelisted;
        if !self.by_methods.is_empty() && !whitelisted {
            // the first entry for this user decides; users without one may use any method
            if let Some((_, methods)) = self
                .by_methods
                .iter()
                .find(|(u, _)| u.as_deref() == Some(value))
                && !methods.contains(&ctx.method)
            {
                block = true;
            }
        }
        if block {
            return reject();
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_lists() {
        let l = IpList::parse(&["127.0.0.1".into(), "10.0.0.0/8".into()], "whitelist").unwrap();
        assert!(l.contains("10.1.2.3".parse().unwrap()));
        assert!(l.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!l.contains("11.0.0.1".parse().unwrap()));
        let e = IpList::parse(&["127.0.0.1".into(), "300.0.0.1".into()], "whitelist").unwrap_err();
        assert_eq!(e.to_string(), "whitelist[1]: invalid ip address: 300.0.0.1");
    }

    #[test]
    fn referer_hosts() {
        assert_eq!(
            referer_host("http://www.foo.com/x").as_deref(),
            Some("www.foo.com")
        );
        assert_eq!(
            referer_host("https://u@Bar.com:8443?q").as_deref(),
            Some("bar.com")
        );
        assert_eq!(referer_host("not a url"), None);
        let h = Hosts::new(&["*.xx.com".into(), "yy.com".into()]);
        assert!(h.matches("a.xx.com") && h.matches("yy.com") && !h.matches("a.yy.com"));
    }
}

// ----------------------------------------------------------------------------------- real-ip

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RealIpConf {
    trusted_addresses: Option<Vec<String>>,
    source: String,
    #[serde(default)]
    recursive: bool,
}

struct RealIp {
    trusted: Option<IpList>,
    source: String,
    recursive: bool,
}

/// Factory of `real-ip` (priority 23000, rewrite): the client address from a header or
/// variable (`source`), only for peers in `trusted_addresses` when that is set (without it
/// every peer is believed, as in APISIX), the rightmost untrusted `X-Forwarded-For` entry with
/// `recursive`.
pub struct RealIpFactory;

impl PluginFactory for RealIpFactory {
    fn name(&self) -> &str {
        "real-ip"
    }
    fn priority(&self) -> i32 {
        23000
    }
    fn schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {
            "trusted_addresses": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "source": {"type": "string", "minLength": 1},
            "recursive": {"type": "boolean", "default": false},
            "_meta": {"type": "object"}
        }, "required": ["source"], "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let c: RealIpConf = parse_conf(conf)?;
        if c.source.is_empty() {
            return Err(ConfError::at("source", "must not be empty"));
        }
        non_empty_list(&c.trusted_addresses, "trusted_addresses")?;
        Ok(Arc::new(RealIp {
            trusted: c
                .trusted_addresses
                .as_deref()
                .map(|l| IpList::parse(l, "trusted_addresses"))
                .transpose()?,
            source: c.source,
            recursive: c.recursive,
        }))
    }
}

/// `ip`, `ip:port`, `[v6]` or `[v6]:port` → the address and port.
fn parse_addr(s: &str) -> Option<(IpAddr, Option<u16>)> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((ip, None));
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some((sa.ip(), Some(sa.port())));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return inner.parse().ok().map(|ip| (ip, None));
    }
    None
}

impl RealIp {
    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.as_ref().is_none_or(|t| t.contains(ip))
    }

    fn address(&self, ctx: &RequestCtx) -> Option<String> {
        if self.source != "http_x_forwarded_for" {
            return ctx.var(&self.source).map(|v| v.into_owned());
        }
        let last = ctx
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()?
            .to_str()
            .ok()?
            .to_owned();
        let parts: Vec<&str> = last.split(',').map(str::trim).collect();
        if parts.len() == 1 {
            return Some(parts[0].to_owned());
        }
        if self.recursive && self.trusted.is_some() {
            for p in parts.iter().skip(1).rev() {
                let trusted = parse_addr(p).is_some_and(|(ip, _)| self.trusted(ip));
                if !trusted {
                    return Some((*p).to_owned());
                }
            }
            return Some(parts[0].to_owned());
        }
        parts.last().map(|p| (*p).to_owned())
    }
}

impl Plugin for RealIp {
    fn name(&self) -> &str {
        "real-ip"
    }
    fn rewrite<'a>(&'a self, ctx: &'a mut RequestCtx) -> Flow<'a> {
        if !self.trusted(ctx.client_addr.ip()) {
            return Flow::Continue;
        }
        let Some(addr) = self.address(ctx) else {
            tracing::debug!("real-ip: missing real address");
            return Flow::Continue;
        };
        match parse_addr(&addr) {
            Some((ip, port)) if port != Some(0) => {
                let port = port.unwrap_or(ctx.client_addr.port());
                ctx.client_addr = std::net::SocketAddr::new(ip, port);
            }
            _ => tracing::warn!("real-ip: bad address {addr:?}"),
        }
        Flow::Continue
    }
}
