//! APISIX's API-driven standalone mode: `PUT /apisix/admin/configs` replaces the whole
//! configuration (JSON, or YAML with `Content-Type: application/yaml`), `GET` dumps it,
//! `HEAD` shows its `X-Digest` and `X-Last-Modified`, `POST /configs/validate` checks one.
//!
//! Rules (`apisix/admin/standalone.lua`, 3.18): `X-Digest` is required; the same digest as
//! the loaded one answers 204 without applying; per kind, `<kind>_conf_version` greater than
//! the current one replaces that kind, equal keeps it, lower is refused
//! (`<kind>_conf_version must be greater than or equal to (N)`), absent means current + 1;
//! success answers 202. The served file's `gateway:` section stays as it is.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use http::{HeaderMap, HeaderValue, StatusCode};
use parking_lot::Mutex;
use polygate_config::document::Item;
use polygate_config::{Document, Kind};
use serde_json::{Map, Value, json};

use crate::{AdminState, Store, error, json_response, raw_response, read_body};

/// What `/configs` remembers between calls.
#[derive(Debug, Default)]
pub struct StandaloneState {
    inner: Mutex<Versions>,
}

#[derive(Debug, Default)]
struct Versions {
    conf_version: BTreeMap<Kind, u64>,
    digest: Option<String>,
    last_modified: Option<i64>,
}

fn version_key(kind: Kind) -> String {
    format!("{}_conf_version", kind.key())
}

fn parse_payload(headers: &HeaderMap, body: &[u8]) -> Result<Value, Response> {
    if body.is_empty() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid request body: empty request body",
        ));
    }
    let yaml = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/yaml"));
    let v: Result<Value, String> = if yaml {
        serde_yaml::from_slice(body).map_err(|_| "invalid yaml request body".to_owned())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    match v {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid request body: the configuration must be an object",
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )),
    }
}

/// Reads a whole configuration from a request body (JSON, or YAML by its content type).
async fn read_payload(headers: &HeaderMap, req: Request) -> Result<Map<String, Value>, Response> {
    let body = read_body(req.into_body()).await?;
    match parse_payload(headers, &body)? {
        Value::Object(o) => Ok(o),
        _ => Err(error(StatusCode::BAD_REQUEST, "invalid request body")),
    }
}

/// The resources of a payload as a document (with the served `gateway:` section).
fn document_of(
    payload: &Map<String, Value>,
    keep: &dyn Fn(Kind) -> bool,
    current: Option<&Document>,
) -> Result<Document, String> {
    let mut doc = Document {
        gateway: current.and_then(|d| d.gateway.clone()),
        apisix: current.and_then(|d| d.apisix.clone()),
        items: Vec::new(),
    };
    for kind in Kind::ALL {
        if keep(kind) {
            if let Some(cur) = current {
                doc.items
                    .extend(cur.items.iter().filter(|i| i.kind == kind).cloned());
            }
            continue;
        }
        let list = match payload.get(kind.key()) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => return Err(format!("{} must be an array", kind.key())),
        };
        let mut seen = std::collections::HashSet::new();
        for (index, v) in list.iter().enumerate() {
            let mut value = v.clone();
            let id = match kind {
                Kind::Consumer => value
                    .get("username")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                _ => value.get("id").map(|i| match i {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
            };
            let Some(id) = id else {
                return Err(format!(
                    "{}[{index}]: missing {}",
                    kind.key(),
                    if kind == Kind::Consumer {
                        "username"
                    } else {
                        "id"
                    }
                ));
            };
            if !seen.insert(id.clone()) {
                return Err(format!("found duplicate id {id} in {}", kind.key()));
            }
            if let Value::Object(o) = &mut value
                && !matches!(kind, Kind::Consumer | Kind::PluginMetadata)
            {
                o.insert("id".into(), Value::String(id.clone()));
            }
            doc.items.push(Item {
                kind,
                index,
                id,
                value: std::sync::Arc::new(value),
                source: None,
            });
        }
    }
    Ok(doc)
}

/// `PUT /apisix/admin/configs`.
pub async fn put(State(st): State<Arc<AdminState>>, req: Request) -> Response {
    if !matches!(st.store, Store::File) {
        return error(
            StatusCode::NOT_FOUND,
            "Unsupported resource type: configs (this gateway reads etcd)",
        );
    }
    let headers = req.headers().clone();
    let Some(digest) = headers
        .get("x-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return error(StatusCode::BAD_REQUEST, "missing digest header");
    };
    let payload = match read_payload(&headers, req).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut vs = st.standalone.inner.lock();
    if vs.digest.as_deref() == Some(digest.as_str()) {
        return raw_response(StatusCode::NO_CONTENT, axum::body::Body::empty());
    }
    let mut next = BTreeMap::new();
    for kind in Kind::ALL {
        let cur = vs.conf_version.get(&kind).copied().unwrap_or(0);
        let key = version_key(kind);
        let new = match payload.get(&key) {
            None | Some(Value::Null) => cur + 1,
            Some(v) => match v.as_u64() {
                Some(n) if n >= cur => n,
                Some(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("{key} must be greater than or equal to ({cur})"),
                    );
                }
                None => return error(StatusCode::BAD_REQUEST, format!("{key} must be a number")),
            },
        };
        next.insert(kind, new);
    }
    let current = st.gateway.current();
    let keep =
        |k: Kind| next.get(&k) == vs.conf_version.get(&k) && vs.conf_version.contains_key(&k);
    let doc = match document_of(&payload, &keep, current.as_deref()) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = st.gateway.validate(&doc) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    if let Err(e) = st.gateway.apply(&doc, "admin API /configs") {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    vs.conf_version = next;
    vs.digest = Some(digest.clone());
    vs.last_modified = Some(now);
    let mut r = raw_response(StatusCode::ACCEPTED, axum::body::Body::empty());
    set_meta(r.headers_mut(), Some(now), Some(&digest));
    r
}

fn set_meta(h: &mut HeaderMap, last: Option<i64>, digest: Option<&str>) {
    if let Some(l) = last
        && let Ok(v) = HeaderValue::from_str(&l.to_string())
    {
        h.insert("x-last-modified", v);
    }
    if let Some(d) = digest
        && let Ok(v) = HeaderValue::from_str(d)
    {
        h.insert("x-digest", v);
    }
}

/// `GET /apisix/admin/configs`: the served resources with their versions.
pub async fn get(State(st): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    if !matches!(st.store, Store::File) {
        return error(
            StatusCode::NOT_FOUND,
            "Unsupported resource type: configs (this gateway reads etcd)",
        );
    }
    let vs = st.standalone.inner.lock();
    let mut out = Map::new();
    let current = st.gateway.current();
    for kind in Kind::ALL {
        out.insert(
            version_key(kind),
            json!(vs.conf_version.get(&kind).copied().unwrap_or(0)),
        );
        let items: Vec<Value> = current
            .iter()
            .flat_map(|d| d.items.iter())
            .filter(|i| i.kind == kind)
            .map(|i| (*i.value).clone())
            .collect();
        if !items.is_empty() {
            out.insert(kind.key().into(), Value::Array(items));
        }
    }
    let yaml = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.starts_with("application/yaml"));
    let mut r = if yaml {
        let text = serde_yaml::to_string(&Value::Object(out)).unwrap_or_default();
        let mut r = raw_response(StatusCode::OK, text);
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        );
        r
    } else {
        json_response(StatusCode::OK, &Value::Object(out))
    };
    set_meta(r.headers_mut(), vs.last_modified, vs.digest.as_deref());
    r
}

/// `HEAD /apisix/admin/configs`.
pub async fn head(State(st): State<Arc<AdminState>>) -> Response {
    let vs = st.standalone.inner.lock();
    let mut r = raw_response(StatusCode::OK, axum::body::Body::empty());
    set_meta(r.headers_mut(), vs.last_modified, vs.digest.as_deref());
    r
}

/// `POST /apisix/admin/configs/validate`: every problem of a whole configuration.
pub async fn validate(State(st): State<Arc<AdminState>>, req: Request) -> Response {
    let headers = req.headers().clone();
    let payload = match read_payload(&headers, req).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let current = st.gateway.current();
    let doc = match document_of(&payload, &|_| false, current.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error_msg": "Configuration validation failed", "errors": [{"error": e}]}),
            );
        }
    };
    match st.gateway.validate(&doc) {
        Ok(()) => json_response(StatusCode::OK, &json!({})),
        Err(errs) => {
            let errors: Vec<Value> = errs
                .0
                .iter()
                .map(|e| {
                    let mut v = json!({"error": e.to_string()});
                    if let Some((kind, index, _)) =
                        polygate_config::document::split_item_path(&e.path)
                    {
                        v["resource_type"] = json!(kind.key());
                        v["index"] = json!(index);
                        if let Some(item) = doc
                            .items
                            .iter()
                            .find(|i| i.kind == kind && i.index == index)
                        {
                            v["resource_id"] = json!(item.id);
                        }
                    }
                    v
                })
                .collect();
            json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error_msg": "Configuration validation failed", "errors": errors}),
            )
        }
    }
}
