//! The OpenAPI 3.0 document of the Admin API, built from the same tables as the router (the
//! kinds and their method sets), served at `/apisix/admin/openapi.json`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::AdminState;
use crate::resources::kind_info;

/// Path segments of the kinds the Admin API serves.
pub const KINDS: [&str; 9] = [
    "routes",
    "services",
    "upstreams",
    "consumers",
    "ssls",
    "global_rules",
    "plugin_configs",
    "consumer_groups",
    "plugin_metadata",
];

fn op(summary: &str, ok: &str, extra: &[(&str, &str)]) -> Value {
    let mut responses = Map::new();
    responses.insert(ok.into(), json!({"description": summary}));
    for (code, why) in extra {
        responses.insert((*code).into(), json!({"description": why}));
    }
    responses.insert(
        "401".into(),
        json!({"description": "missing or wrong key: {\"error_msg\":\"failed to check token\",\"description\":...}"}),
    );
    json!({"summary": summary, "responses": responses})
}

fn id_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for seg in KINDS {
        let Some(info) = kind_info(seg) else { continue };
        let allowed = |m: &str| !info.unsupported.contains(&m);
        let one = info.singular;
        let mut list = Map::new();
        list.insert(
            "get".into(),
            {
                let mut o = op(
                    &format!("list {seg}: {{\"total\":N,\"list\":[{{key,value,createdIndex,modifiedIndex}}]}}"),
                    "200",
                    &[("400", "page_size must be between 10 and 500")],
                );
                o["parameters"] = json!([
                    {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 10, "maximum": 500}},
                    {"name": "name", "in": "query", "schema": {"type": "string"}, "description": "regular expression on name"},
                    {"name": "label", "in": "query", "schema": {"type": "string"}},
                    {"name": "uri", "in": "query", "schema": {"type": "string"}, "description": "regular expression on uri/uris"},
                    {"name": "filter", "in": "query", "schema": {"type": "string"}, "description": "service_id=1, upstream_id=1 (routes)"}
                ]);
                o
            },
        );
        if allowed("post") {
            list.insert(
                "post".into(),
                op(
                    &format!("create a {one} with a generated id"),
                    "201",
                    &[("400", "invalid configuration")],
                ),
            );
        }
        if seg == "consumers" {
            list.insert(
                "put".into(),
                op(
                    "create or replace a consumer (its username is its id)",
                    "201",
                    &[("200", "replaced"), ("400", "invalid configuration")],
                ),
            );
        }
        paths.insert(format!("/apisix/admin/{seg}"), Value::Object(list));
        let mut item = Map::new();
        item.insert(
            "get".into(),
            op(
                &format!("one {one}"),
                "200",
                &[("404", "{\"message\":\"Key not found\"}")],
            ),
        );
        item.insert(
            "put".into(),
            op(
                &format!("create (201) or replace (200) a {one}; ?ttl= seconds"),
                "201",
                &[("200", "replaced"), ("400", "invalid configuration")],
            ),
        );
        item.insert(
            "delete".into(),
            op(
                &format!("delete a {one} (refused while referenced unless ?force=true)"),
                "200",
                &[
                    ("400", "still referenced"),
                    ("404", "{\"message\":\"Key not found\"}"),
                ],
            ),
        );
        if allowed("patch") {
            item.insert(
                "patch".into(),
                op(
                    &format!("merge into a {one} (null deletes a field, arrays are replaced)"),
                    "200",
                    &[("400", "invalid configuration"), ("404", "not found")],
                ),
            );
        }
        let mut item = Value::Object(item);
        item["parameters"] = json!([id_param("id")]);
        paths.insert(format!("/apisix/admin/{seg}/{{id}}"), item);
        if allowed("patch") {
            let mut sub = json!({"patch": op(&format!("replace one field of a {one}"), "200", &[("400", "invalid configuration")])});
            sub["parameters"] = json!([id_param("id"), {"name": "path", "in": "path", "required": true, "schema": {"type": "string"}, "description": "e.g. upstream/nodes"}]);
            paths.insert(format!("/apisix/admin/{seg}/{{id}}/{{path}}"), sub);
        }
        let mut validate = json!({"post": op(&format!("check a {one} against its schema without storing it"), "200", &[("400", "the error")])});
        validate["parameters"] = json!([]);
        paths.insert(format!("/apisix/admin/schema/validate/{seg}"), validate);
    }
    paths.insert(
        "/apisix/admin/plugins/list".into(),
        json!({"get": op("plugin names, highest priority first", "200", &[])}),
    );
    paths.insert(
        "/apisix/admin/plugins/{name}".into(),
        json!({"get": op("a plugin's JSON schema (?schema_type=consumer for its consumer schema)", "200", &[("404", "plugin not found in subsystem http")]),
               "parameters": [id_param("name")]}),
    );
    paths.insert(
        "/apisix/admin/plugins".into(),
        json!({"get": op("?all=true: every plugin with its priority and schemas", "200", &[])}),
    );
    paths.insert(
        "/apisix/admin/plugins/reload".into(),
        json!({"put": op("reload the plugins (built in: answers done)", "200", &[])}),
    );
    paths.insert(
        "/apisix/admin/configs".into(),
        json!({
            "get": op("the whole configuration (file mode)", "200", &[]),
            "put": op("replace the whole configuration (file mode; X-Digest required)", "202", &[("204", "same digest: not applied"), ("400", "invalid")]),
            "head": op("X-Digest and X-Last-Modified of the configuration", "200", &[]),
        }),
    );
    paths.insert(
        "/apisix/admin/configs/validate".into(),
        json!({"post": op("check a whole configuration", "200", &[("400", "Configuration validation failed")])}),
    );
    paths.insert(
        "/apisix/admin/openapi.json".into(),
        json!({"get": op("this document", "200", &[])}),
    );
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "polygate Admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "APISIX v3's Admin API as polygate serves it. Every path needs an admin key (X-API-KEY header, api_key query argument or x_api_key cookie); viewer keys may only GET."
        },
        "servers": [{"url": "http://127.0.0.1:9180"}],
        "components": {"securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-KEY"}}},
        "security": [{"apiKey": []}],
        "paths": paths,
    })
}

/// `GET /apisix/admin/openapi.json`.
pub async fn serve(State(_st): State<Arc<AdminState>>) -> Response {
    crate::json_response(StatusCode::OK, &document())
}
