//! The resource paths: `/apisix/admin/{kind}[/{id}[/{sub path}]]`, with APISIX's method sets
//! per kind, envelopes (`key`/`value`/`createdIndex`/`modifiedIndex`, `list`/`total`,
//! `deleted`), status codes and error strings (`apisix/admin/resource.lua` and the kinds'
//! modules), over etcd.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::response::Response;
use http::{Method, StatusCode};
use polygate_config::Kind;
use polygate_etcd::{Client, Kv};
use serde_json::{Map, Value, json};

use crate::{AdminState, Store, error, json_response, raw_response, read_body};

/// How the Admin API treats one kind.
#[derive(Debug, Clone, Copy)]
pub struct KindInfo {
    /// The kind.
    pub kind: Kind,
    /// The word error messages use (`route`, `global rule`, `plugin config`...).
    pub singular: &'static str,
    /// Methods APISIX refuses with 405 for this kind.
    pub unsupported: &'static [&'static str],
}

/// The kinds the Admin API serves, by path segment.
pub fn kind_info(segment: &str) -> Option<KindInfo> {
    let (kind, singular, unsupported): (Kind, &str, &[&str]) = match segment {
        "routes" => (Kind::Route, "route", &[]),
        "services" => (Kind::Service, "service", &[]),
        "upstreams" => (Kind::Upstream, "upstream", &[]),
        "consumers" => (Kind::Consumer, "consumer", &["post", "patch"]),
        "ssls" => (Kind::Ssl, "ssl", &[]),
        "global_rules" => (Kind::GlobalRule, "global rule", &["post"]),
        "plugin_configs" => (Kind::PluginConfig, "plugin config", &["post"]),
        "consumer_groups" => (Kind::ConsumerGroup, "consumer group", &["post"]),
        "plugin_metadata" => (Kind::PluginMetadata, "plugin_metadata", &["post", "patch"]),
        _ => return None,
    };
    Some(KindInfo {
        kind,
        singular,
        unsupported,
    })
}

/// Query arguments, decoded (the last value of a repeated name wins).
pub fn query_args(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        m.insert(dec(k), dec(v));
    }
    m
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn etcd_failed(e: &polygate_etcd::EtcdError) -> Response {
    tracing::error!("admin: {e}");
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, &json!({"message": "Key not found"}))
}

fn file_mode() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "resource paths need gateway.config_provider: etcd; this gateway serves its configuration file (replace it whole with PUT /apisix/admin/configs)",
    )
}

/// A stored resource as the Admin API shows it.
fn node(kv: &Kv, value: Value) -> Value {
    json!({
        "key": kv.key,
        "value": value,
        "createdIndex": kv.create_revision,
        "modifiedIndex": kv.mod_revision,
    })
}

fn parse_value(kv: &Kv) -> Option<Value> {
    match serde_json::from_slice::<Value>(&kv.value) {
        Ok(v @ Value::Object(_)) => Some(v),
        _ => None,
    }
}

/// SSL private keys never leave through the Admin API (APISIX strips them from reads).
fn redact(info: &KindInfo, v: &mut Value) {
    if info.kind == Kind::Ssl
        && let Value::Object(o) = v
    {
        o.remove("key");
        o.remove("keys");
    }
}

/// `/apisix/admin/{kind}[/{id}[/{sub}]]` with any method.
pub async fn dispatch(
    State(st): State<Arc<AdminState>>,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Response {
    let method = req.method().clone();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some(first) = segs.first() else {
        return error(StatusCode::NOT_FOUND, "not found");
    };
    if *first == "plugins" && method == Method::GET {
        return plugin_get(&st, segs.get(1).copied(), &query_args(query.as_deref()));
    }
    let Some(info) = kind_info(first) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("Unsupported resource type: {first}"),
        );
    };
    let id = segs.get(1).map(|s| (*s).to_owned());
    let sub = segs.get(2..).map(|s| s.join("/")).unwrap_or_default();
    let lower = method.as_str().to_ascii_lowercase();
    if !matches!(lower.as_str(), "get" | "put" | "post" | "delete" | "patch") {
        return error(StatusCode::NOT_FOUND, "not found");
    }
    if info.unsupported.contains(&lower.as_str()) {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "not supported `{}` method for {}",
                method.as_str(),
                info.singular
            ),
        );
    }
    let (client, prefix) = match &st.store {
        Store::Etcd { client, prefix } => (client.clone(), prefix.clone()),
        Store::File => return file_mode(),
    };
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error_msg": format!("invalid request body: {e}"),
                            "req_body": String::from_utf8_lossy(&body)}),
                );
            }
        }
    };
    let args = query_args(query.as_deref());
    // a lease needs a whole number of seconds, at least one
    let ttl = match args
        .get("ttl")
        .map(|t| t.parse::<f64>().ok().filter(|t| *t >= 1.0))
    {
        None => None,
        Some(Some(t)) => Some(t as i64),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid argument ttl: should be a number",
            );
        }
    };
    let ctx = Ctx {
        st: &st,
        client,
        prefix,
        info,
    };
    match method {
        Method::GET => ctx.get(id.as_deref(), &args).await,
        Method::PUT => ctx.put(id.as_deref(), body, ttl).await,
        Method::POST => ctx.post(id.as_deref(), body, ttl).await,
        Method::DELETE => ctx.delete(id.as_deref(), &args).await,
        Method::PATCH => ctx.patch(id.as_deref(), &sub, body, ttl).await,
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

struct Ctx<'a> {
    st: &'a AdminState,
    client: Client,
    prefix: String,
    info: KindInfo,
}

impl Ctx<'_> {
    fn dir(&self) -> String {
        format!("{}/{}", self.prefix, self.info.kind.key())
    }

    fn key(&self, id: &str) -> String {
        format!("{}/{id}", self.dir())
    }

    async fn get(&self, id: Option<&str>, args: &HashMap<String, String>) -> Response {
        if let Some(id) = id {
            return match self.client.get(&self.key(id)).await {
                Ok((Some(kv), _)) => match parse_value(&kv) {
                    Some(mut v) => {
                        self.st.keyring.decrypt_resource(self.info.kind, &mut v);
                        redact(&self.info, &mut v);
                        json_response(StatusCode::OK, &node(&kv, v))
                    }
                    None => not_found(),
                },
                Ok((None, _)) => not_found(),
                Err(e) => etcd_failed(&e),
            };
        }
        let kvs = match self.list().await {
            Ok(k) => k,
            Err(r) => return r,
        };
        let mut list: Vec<(Kv, Value)> = kvs
            .into_iter()
            .filter(|(kv, v)| self.matches(kv, v, args))
            .collect();
        let total = list.len();
        let page = args.get("page").and_then(|p| p.parse::<i64>().ok());
        let page_size = args.get("page_size").and_then(|p| p.parse::<i64>().ok());
        if let (Some(page), Some(size)) = (page, page_size) {
            if !(10..=500).contains(&size) {
                return raw_response(
                    StatusCode::BAD_REQUEST,
                    "page_size must be between 10 and 500",
                );
            }
            let page = page.max(1) as usize;
            list.sort_by_key(|(kv, _)| kv.create_revision);
            let size = size as usize;
            list = list
                .into_iter()
                .skip((page - 1).saturating_mul(size))
                .take(size)
                .collect();
        }
        let list: Vec<Value> = list
            .into_iter()
            .map(|(kv, mut v)| {
                self.st.keyring.decrypt_resource(self.info.kind, &mut v);
                redact(&self.info, &mut v);
                node(&kv, v)
            })
            .collect();
        json_response(StatusCode::OK, &json!({"total": total, "list": list}))
    }

    /// Every resource of the kind, in key order (consumers' credentials left out).
    async fn list(&self) -> Result<Vec<(Kv, Value)>, Response> {
        let dir = format!("{}/", self.dir());
        let (kvs, _) = self
            .client
            .range_prefix(&dir)
            .await
            .map_err(|e| etcd_failed(&e))?;
        Ok(kvs
            .into_iter()
            .filter(|kv| {
                kv.key
                    .strip_prefix(&dir)
                    .is_some_and(|id| !id.is_empty() && !id.contains('/'))
            })
            .filter_map(|kv| parse_value(&kv).map(|v| (kv, v)))
            .collect())
    }

    /// The `name`, `label`, `uri` and `filter` arguments of a list.
    fn matches(&self, _kv: &Kv, v: &Value, args: &HashMap<String, String>) -> bool {
        let re = |pat: &str, s: &str| regex::Regex::new(pat).is_ok_and(|r| r.is_match(s));
        if let Some(name) = args.get("name") {
            match v.get("name").and_then(Value::as_str) {
                Some(n) if re(name, n) => {}
                _ => return false,
            }
        }
        if let Some(label) = args.get("label") {
            let has = v
                .get("labels")
                .and_then(Value::as_object)
                .is_some_and(|l| l.contains_key(label));
            if !has {
                return false;
            }
        }
        if let Some(uri) = args.get("uri") {
            let one = v
                .get("uri")
                .and_then(Value::as_str)
                .is_some_and(|u| re(uri, u));
            let many = v
                .get("uris")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().filter_map(Value::as_str).any(|u| re(uri, u)));
            if !one && !many {
                return false;
            }
        }
        if let Some(filter) = args.get("filter") {
            let fields: &[&str] = match self.info.kind {
                Kind::Route => &["service_id", "upstream_id"],
                _ => &[],
            };
            for (k, want) in query_args(Some(filter)) {
                if !fields.contains(&k.as_str()) {
                    tracing::warn!(
                        "admin: filter field '{k}' is not supported by resource: {}",
                        self.info.kind.key()
                    );
                    continue;
                }
                let got = match v.get(&k) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => return false,
                };
                if got != want {
                    return false;
                }
            }
        }
        true
    }

    /// APISIX's `check_conf`: ids, server-managed fields, the kind's own rules, the schema
    /// and references. Returns the id to store under.
    async fn check_conf(
        &self,
        id: Option<&str>,
        conf: &mut Value,
        need_id: bool,
        allow_time: bool,
    ) -> Result<String, Response> {
        let bad = |m: String| error(StatusCode::BAD_REQUEST, m);
        let kind = self.info.kind;
        let Value::Object(obj) = conf else {
            return Err(bad(format!(
                "invalid configuration: wrong type: expected object, got {}",
                type_name(conf)
            )));
        };
        let id = match kind {
            Kind::Consumer => {
                let username = obj
                    .get("username")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let (Some(path), Some(u)) = (id, &username)
                    && path != u
                {
                    return Err(bad("wrong username".into()));
                }
                match username.or(id.map(str::to_owned)) {
                    Some(u) => u,
                    None => {
                        return Err(bad(
                            "invalid configuration: property \"username\" is required".into(),
                        ));
                    }
                }
            }
            Kind::PluginMetadata => match id {
                Some(i) => {
                    obj.insert("id".into(), Value::String(i.to_owned()));
                    i.to_owned()
                }
                None => return Err(bad("missing plugin_metadata id".into())),
            },
            _ => {
                let body_id = obj.get("id").map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                let id = id.map(str::to_owned).or(body_id.clone());
                if need_id && id.is_none() {
                    return Err(bad(format!("missing {} id", self.info.singular)));
                }
                if !need_id && id.is_some() {
                    return Err(bad(format!(
                        "wrong {} id, do not need it",
                        self.info.singular
                    )));
                }
                if need_id && body_id.is_some() && body_id != id {
                    return Err(bad(format!("wrong {} id", self.info.singular)));
                }
                let id = id.unwrap_or_default();
                if !valid_id(&id) {
                    return Err(bad(format!(
                        "invalid configuration: property \"id\" validation failed: {id:?} must be 1-64 characters of [a-zA-Z0-9-_.]"
                    )));
                }
                obj.insert("id".into(), Value::String(id.clone()));
                id
            }
        };
        if !allow_time {
            for field in ["create_time", "update_time"] {
                let at = if obj.contains_key(field) {
                    Some(field.to_owned())
                } else if obj.get("upstream").and_then(|u| u.get(field)).is_some() {
                    Some(format!("upstream.{field}"))
                } else if obj.get("plugins").and_then(|u| u.get(field)).is_some() {
                    Some(format!("plugins.{field}"))
                } else {
                    None
                };
                if let Some(at) = at {
                    return Err(bad(format!("the property is forbidden:  {at}")));
                }
            }
        }
        if kind == Kind::Route {
            if obj.contains_key("host") && obj.contains_key("hosts") {
                return Err(bad("only one of host or hosts is allowed".into()));
            }
            if obj.contains_key("remote_addr") && obj.contains_key("remote_addrs") {
                return Err(bad(
                    "only one of remote_addr or remote_addrs is allowed".into()
                ));
            }
        }
        if kind == Kind::PluginMetadata && !self.st.gateway.plugins().iter().any(|p| p.name == id) {
            return Err(bad(format!("invalid plugin name: {id}")));
        }
        if let Err(e) = self.st.gateway.check(kind, conf) {
            return Err(bad(format!("invalid configuration: {e}")));
        }
        // references must exist (APISIX reads them from etcd)
        let refs: &[(&str, &str, &str)] = match kind {
            Kind::Route => &[
                ("upstream_id", "upstreams", "upstream"),
                ("service_id", "services", "service"),
                ("plugin_config_id", "plugin_configs", "plugin config"),
            ],
            Kind::Service => &[("upstream_id", "upstreams", "upstream")],
            Kind::Consumer => &[("group_id", "consumer_groups", "consumer group")],
            _ => &[],
        };
        for (field, dir, what) in refs {
            let Some(r) = conf.get(*field) else { continue };
            let r = match r {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match self.client.get(&format!("{}/{dir}/{r}", self.prefix)).await {
                Ok((Some(_), _)) => {}
                Ok((None, _)) => {
                    return Err(bad(format!(
                        "failed to fetch {what} info by {what} id [{r}], response code: 404"
                    )));
                }
                Err(e) => {
                    return Err(bad(format!(
                        "failed to fetch {what} info by {what} id [{r}]: {e}"
                    )));
                }
            }
        }
        Ok(id)
    }

    async fn lease(&self, ttl: Option<i64>) -> Result<Option<i64>, Response> {
        match ttl {
            Some(t) => self
                .client
                .grant(t)
                .await
                .map(Some)
                .map_err(|e| etcd_failed(&e)),
            None => Ok(None),
        }
    }

    async fn put(&self, id: Option<&str>, body: Option<Value>, ttl: Option<i64>) -> Response {
        let Some(mut conf) = body else {
            return error(StatusCode::BAD_REQUEST, "missing configurations");
        };
        let need_id = !matches!(self.info.kind, Kind::Consumer | Kind::PluginMetadata);
        let id = match self.check_conf(id, &mut conf, need_id, false).await {
            Ok(id) => id,
            Err(r) => return r,
        };
        let key = self.key(&id);
        let prev_time = match self.client.get(&key).await {
            Ok((prev, _)) => prev
                .as_ref()
                .and_then(parse_value)
                .and_then(|v| v.get("create_time").cloned()),
            Err(e) => return etcd_failed(&e),
        };
        if let Value::Object(o) = &mut conf {
            o.insert(
                "create_time".into(),
                prev_time.unwrap_or_else(|| json!(now())),
            );
            o.insert("update_time".into(), json!(now()));
        }
        let lease = match self.lease(ttl).await {
            Ok(l) => l,
            Err(r) => return r,
        };
        self.st.keyring.encrypt_resource(self.info.kind, &mut conf);
        match self
            .client
            .put(&key, conf.to_string().as_bytes(), lease)
            .await
        {
            Ok((_, prev)) => {
                let status = if prev.is_some() {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                };
                redact(&self.info, &mut conf);
                json_response(status, &json!({"key": key, "value": conf}))
            }
            Err(e) => etcd_failed(&e),
        }
    }

    async fn post(&self, id: Option<&str>, body: Option<Value>, ttl: Option<i64>) -> Response {
        let Some(mut conf) = body else {
            return error(StatusCode::BAD_REQUEST, "missing configurations");
        };
        if id.is_some() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("wrong {} id, do not need it", self.info.singular),
            );
        }
        // checked with a placeholder id, then stored under the generated one
        if let Value::Object(o) = &conf
            && o.contains_key("id")
        {
            return error(
                StatusCode::BAD_REQUEST,
                format!("wrong {} id, do not need it", self.info.singular),
            );
        }
        let mut probe = conf.clone();
        if let Value::Object(o) = &mut probe {
            o.insert("id".into(), json!("1"));
        }
        if let Err(r) = self.check_conf(None, &mut probe, true, false).await {
            return r;
        }
        // APISIX's ids: the revision of a write to <prefix>/gen_id, 20 digits
        let rev = match self
            .client
            .put(&format!("{}/gen_id", self.prefix), b"1", None)
            .await
        {
            Ok((rev, _)) => rev,
            Err(e) => return etcd_failed(&e),
        };
        let id = format!("{rev:020}");
        if let Value::Object(o) = &mut conf {
            o.insert("id".into(), json!(id));
            o.insert("create_time".into(), json!(now()));
            o.insert("update_time".into(), json!(now()));
        }
        let lease = match self.lease(ttl).await {
            Ok(l) => l,
            Err(r) => return r,
        };
        let key = self.key(&id);
        self.st.keyring.encrypt_resource(self.info.kind, &mut conf);
        match self
            .client
            .put(&key, conf.to_string().as_bytes(), lease)
            .await
        {
            Ok(_) => {
                redact(&self.info, &mut conf);
                json_response(StatusCode::CREATED, &json!({"key": key, "value": conf}))
            }
            Err(e) => etcd_failed(&e),
        }
    }

    async fn delete(&self, id: Option<&str>, args: &HashMap<String, String>) -> Response {
        let Some(id) = id else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("missing {} id", self.info.singular),
            );
        };
        if args.get("force").map(String::as_str) != Some("true")
            && let Err(r) = self.delete_check(id).await
        {
            return r;
        }
        let key = self.key(id);
        if self.info.kind == Kind::Consumer
            && let Err(e) = self
                .client
                .delete_prefix(&format!("{key}/credentials/"))
                .await
        {
            return etcd_failed(&e);
        }
        match self.client.delete(&key).await {
            Ok((0, _)) => not_found(),
            Ok(_) => json_response(StatusCode::OK, &json!({"deleted": "1", "key": key})),
            Err(e) => etcd_failed(&e),
        }
    }

    /// Refuses to delete what other resources still name (APISIX's `delete_checker`s).
    async fn delete_check(&self, id: &str) -> Result<(), Response> {
        // (kind of the referrer, its path segment, the referring field, in plugins too)
        let (what, checks): (&str, &[(&str, &str, &str)]) = match self.info.kind {
            Kind::Service => (
                "this service directly",
                &[("route", "routes", "service_id")],
            ),
            Kind::Upstream => (
                "this upstream",
                &[
                    ("route", "routes", "upstream_id"),
                    ("service", "services", "upstream_id"),
                    ("plugin_config", "plugin_configs", ""),
                    ("consumer", "consumers", ""),
                    ("consumer_group", "consumer_groups", ""),
                    ("global_rules", "global_rules", ""),
                ],
            ),
            Kind::PluginConfig => (
                "this plugin config",
                &[("route", "routes", "plugin_config_id")],
            ),
            Kind::ConsumerGroup => (
                "this consumer group",
                &[("consumer", "consumers", "group_id")],
            ),
            _ => return Ok(()),
        };
        for (refkind, dir, field) in checks {
            let prefix = format!("{}/{dir}/", self.prefix);
            let (kvs, _) = self
                .client
                .range_prefix(&prefix)
                .await
                .map_err(|e| etcd_failed(&e))?;
            for kv in kvs {
                let Some(v) = parse_value(&kv) else { continue };
                let rid = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key).to_owned();
                if rid.contains('/') {
                    continue;
                }
                let direct = !field.is_empty() && v.get(*field).is_some_and(|x| id_eq(x, id));
                if direct {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        format!("can not delete {what}, {refkind} [{rid}] is still using it now"),
                    ));
                }
                // an upstream named inside plugin configurations (traffic-split)
                if self.info.kind == Kind::Upstream
                    && v.get("plugins").is_some_and(|p| names_upstream(p, id))
                {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "can not delete {what}, plugin in {refkind} [{rid}] is still using it now"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    async fn patch(
        &self,
        id: Option<&str>,
        sub: &str,
        body: Option<Value>,
        ttl: Option<i64>,
    ) -> Response {
        let Some(id) = id else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("missing {} id", self.info.singular),
            );
        };
        let Some(conf) = body else {
            return error(StatusCode::BAD_REQUEST, "missing new configuration");
        };
        if sub.is_empty() && !conf.is_object() {
            return error(StatusCode::BAD_REQUEST, "invalid configuration");
        }
        let key = self.key(id);
        let (old, mod_rev) = match self.client.get(&key).await {
            Ok((Some(kv), _)) => match parse_value(&kv) {
                Some(v) => (v, kv.mod_revision),
                None => return not_found(),
            },
            Ok((None, _)) => return not_found(),
            Err(e) => return etcd_failed(&e),
        };
        // stored fields are decrypted before the merge and encrypted again after the check
        let mut value = old;
        self.st.keyring.decrypt_resource(self.info.kind, &mut value);
        if sub.is_empty() {
            let explicit_update_time = conf.get("update_time").is_some();
            merge(&mut value, conf);
            if !explicit_update_time {
                value["update_time"] = json!(now());
            }
        } else {
            if let Err(e) = patch_path(&mut value, sub, conf) {
                return error(StatusCode::BAD_REQUEST, e);
            }
            value["update_time"] = json!(now());
        }
        if let Err(r) = self.check_conf(Some(id), &mut value, true, true).await {
            return r;
        }
        let lease = match self.lease(ttl).await {
            Ok(l) => l,
            Err(r) => return r,
        };
        self.st.keyring.encrypt_resource(self.info.kind, &mut value);
        match self
            .client
            .put_if(&key, value.to_string().as_bytes(), mod_rev, lease)
            .await
        {
            Ok(Some(_)) => {
                redact(&self.info, &mut value);
                json_response(StatusCode::OK, &json!({"key": key, "value": value}))
            }
            Ok(None) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "value changed before overwritten",
            ),
            Err(e) => etcd_failed(&e),
        }
    }
}

fn id_eq(v: &Value, id: &str) -> bool {
    match v {
        Value::String(s) => s == id,
        Value::Number(n) => n.to_string() == id,
        _ => false,
    }
}

/// Whether a plugin configuration names upstream `id` (`upstream_id` at any depth).
fn names_upstream(v: &Value, id: &str) -> bool {
    match v {
        Value::Object(o) => o
            .iter()
            .any(|(k, x)| (k == "upstream_id" && id_eq(x, id)) || names_upstream(x, id)),
        Value::Array(a) => a.iter().any(|x| names_upstream(x, id)),
        _ => false,
    }
}

/// APISIX's ids: 1–64 characters of `[a-zA-Z0-9-_.]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// PATCH's merge: objects merge key by key, `null` deletes, anything else (arrays
/// included) replaces.
pub fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    match t.get_mut(&k) {
                        Some(existing) if existing.is_object() && v.is_object() => {
                            merge(existing, v)
                        }
                        _ => {
                            t.insert(k, v);
                        }
                    }
                }
            }
        }
        (t, p) => *t = p,
    }
}

/// PATCH of a sub path (`upstream/nodes`): replaces that field.
pub fn patch_path(target: &mut Value, sub: &str, v: Value) -> Result<(), String> {
    let parts: Vec<&str> = sub.split('/').filter(|s| !s.is_empty()).collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Err("invalid sub path".into());
    };
    let mut at = target;
    for d in dirs {
        at = match at {
            Value::Object(o) => o
                .entry((*d).to_owned())
                .or_insert_with(|| Value::Object(Map::new())),
            Value::Array(a) => {
                let i: usize = d.parse().map_err(|_| format!("invalid sub path: {sub}"))?;
                a.get_mut(i.wrapping_sub(1))
                    .ok_or_else(|| format!("invalid sub path: {sub}"))?
            }
            _ => return Err(format!("invalid sub path: {sub}")),
        };
    }
    match at {
        Value::Object(o) => {
            if v.is_null() {
                o.remove(*last);
            } else {
                o.insert((*last).to_owned(), v);
            }
            Ok(())
        }
        _ => Err(format!("invalid sub path: {sub}")),
    }
}

/// `GET /apisix/admin/plugins/list`: names, highest priority first.
pub async fn plugins_list(State(st): State<Arc<AdminState>>, RawQuery(q): RawQuery) -> Response {
    let args = query_args(q.as_deref());
    match args.get("subsystem").map(String::as_str) {
        None | Some("http") => {}
        Some("stream") => return json_response(StatusCode::OK, &json!([])),
        Some(_) => {
            return raw_response(StatusCode::BAD_REQUEST, "invalid subsystem passed");
        }
    }
    let mut ps = st.gateway.plugins();
    ps.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    json_response(
        StatusCode::OK,
        &Value::Array(ps.into_iter().map(|p| Value::String(p.name)).collect()),
    )
}

/// `PUT /apisix/admin/plugins/reload` (polygate's plugins are built in: nothing to reload).
pub async fn plugins_reload(method: Method) -> Response {
    if method != Method::PUT {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "please use PUT method to reload the plugins, {} method is not allowed.",
                method.as_str()
            ),
        );
    }
    raw_response(StatusCode::OK, "done")
}

/// `GET /apisix/admin/plugins/{name}` and `GET /apisix/admin/plugins?all=true`.
pub fn plugin_get(st: &AdminState, name: Option<&str>, args: &HashMap<String, String>) -> Response {
    match args.get("subsystem").map(String::as_str) {
        None | Some("http") => {}
        Some(s) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unsupported subsystem: {s}"),
            );
        }
    }
    let ps = st.gateway.plugins();
    if args.get("all").map(String::as_str) == Some("true") {
        let mut all = Map::new();
        for p in ps {
            let mut v = json!({"priority": p.priority, "schema": p.schema, "version": 0.1});
            if let Some(c) = p.consumer_schema {
                v["consumer_schema"] = c;
            }
            if let Some(k) = p.kind {
                v["type"] = json!(k);
            }
            all.insert(p.name, v);
        }
        return json_response(StatusCode::OK, &Value::Object(all));
    }
    let Some(name) = name else {
        return error(StatusCode::BAD_REQUEST, "missing plugin name");
    };
    let Some(p) = ps.into_iter().find(|p| p.name == name) else {
        return error(StatusCode::NOT_FOUND, "plugin not found in subsystem http");
    };
    let schema = if args.get("schema_type").map(String::as_str) == Some("consumer") {
        p.consumer_schema
    } else {
        Some(p.schema)
    };
    match schema {
        Some(s) => json_response(StatusCode::OK, &s),
        None => error(StatusCode::BAD_REQUEST, "not found schema"),
    }
}

/// `POST /apisix/admin/schema/validate/{kind}`: the schema check alone.
pub async fn schema_validate(
    State(st): State<Arc<AdminState>>,
    Path(kind): Path<String>,
    req: Request,
) -> Response {
    let Some(info) = kind_info(&kind) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("Unsupported resource type: {kind}"),
        );
    };
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error_msg": format!("invalid request body: {e}"),
                        "req_body": String::from_utf8_lossy(&body)}),
            );
        }
    };
    match st.gateway.check(info.kind, &value) {
        Ok(()) => raw_response(StatusCode::OK, axum::body::Body::empty()),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_deletes_nulls_and_replaces_arrays() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]});
        merge(&mut v, json!({"a": null, "b": {"c": 5}, "e": [3]}));
        assert_eq!(v, json!({"b": {"c": 5, "d": 3}, "e": [3]}));
    }

    #[test]
    fn sub_path_patches_one_field() {
        let mut v = json!({"upstream": {"nodes": {"a:1": 1}, "type": "roundrobin"}});
        patch_path(&mut v, "upstream/nodes", json!({"b:2": 1})).unwrap();
        assert_eq!(v["upstream"]["nodes"], json!({"b:2": 1}));
        patch_path(&mut v, "desc", json!("x")).unwrap();
        assert_eq!(v["desc"], json!("x"));
        assert!(patch_path(&mut v, "desc/x", json!(1)).is_err());
    }

    #[test]
    fn ids_follow_apisix() {
        assert!(valid_id("a-b_c.1"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(65)));
    }

    #[test]
    fn upstreams_named_in_plugins_are_found() {
        let p = json!({"traffic-split": {"rules": [{"weighted_upstreams": [{"upstream_id": 2, "weight": 1}]}]}});
        assert!(names_upstream(&p, "2"));
        assert!(!names_upstream(&p, "3"));
    }
}
