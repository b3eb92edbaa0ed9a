//! `http-logger` (priority 410), `tcp-logger` (405) and `file-logger` (399): request entries
//! sent in batches to an HTTP endpoint (POST, through polygate's upstream client), written to
//! a TCP server, or appended as JSON lines to a file. See [`crate::logger`].

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use polygate_core::callout::{CalloutRequest, callouts};
use polygate_core::{ConfError, Plugin, PluginFactory, RequestCtx};
use polygate_router::Expr;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::logger::{
    BatchConf, Batcher, EntryConf, EntryFields, SendFuture, Sink, batch_schema, encode, split_batch,
};
use crate::util::parse_conf;

fn entry_schema(props: &mut Value) {
    let extra = serde_json::json!({
        "log_format": {"type": "object"},
        "include_req_body": {"type": "boolean", "default": false},
        "include_req_body_expr": {"type": "array", "minItems": 1, "items": {"type": "array"}},
        "include_resp_body": {"type": "boolean", "default": false},
        "include_resp_body_expr": {"type": "array", "minItems": 1, "items": {"type": "array"}},
        "max_req_body_bytes": {"type": "integer", "minimum": 1, "default": 524288},
        "max_resp_body_bytes": {"type": "integer", "minimum": 1, "default": 524288},
        "_meta": {"type": "object"}
    });
    if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            p.insert(k.clone(), v.clone());
        }
    }
}

/// Takes the entry fields out of `rest` (what remains is the logger's own).
fn split_entry(rest: Value) -> Result<(Value, EntryConf), ConfError> {
    let Value::Object(mut m) = rest else {
        return Err(ConfError::whole("must be an object"));
    };
    let mut e = serde_json::Map::new();
    for k in [
        "log_format",
        "include_req_body",
        "include_req_body_expr",
        "include_resp_body",
        "include_resp_body_expr",
        "max_req_body_bytes",
        "max_resp_body_bytes",
    ] {
        if let Some(v) = m.remove(k) {
            e.insert(k.to_owned(), v);
        }
    }
    let f: EntryFields = parse_conf(&Value::Object(e))?;
    Ok((Value::Object(m), f.compile()?))
}

struct Logger {
    name: &'static str,
    entry: EntryConf,
    batcher: Batcher,
    /// file-logger's `match`: log only requests some expression holds for.
    filter: Option<Vec<Expr>>,
}

impl Plugin for Logger {
    fn name(&self) -> &str {
        self.name
    }

    fn wants_body(&self) -> Option<usize> {
        self.entry.wants_body()
    }

    fn log(&self, ctx: &RequestCtx) {
        if let Some(f) = &self.filter
            && !f.iter().any(|e| e.eval(ctx))
        {
            return;
        }
        let mut e = self.entry.entry(ctx);
        if self.name == "http-logger" && e.get("route_id").is_none() && e.is_object() {
            e["route_id"] = Value::String("no-matched".into());
        }
        self.batcher.push(e);
    }
}

// ------------------------------------------------------------------------------- http-logger

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpConf {
    uri: String,
    auth_header: Option<String>,
    #[serde(default = "d3")]
    timeout: u64,
    #[serde(default = "json_method")]
    concat_method: String,
    #[serde(default)]
    ssl_verify: bool,
    #[serde(rename = "_meta")]
    _meta: Option<Value>,
}

fn d3() -> u64 {
    3
}
fn json_method() -> String {
    "json".into()
}

struct HttpSink {
    target: String,
    authority: String,
    path: String,
    auth: Option<HeaderValue>,
    timeout: Duration,
    new_line: bool,
}

impl Sink for HttpSink {
    fn send(&self, entries: Vec<Value>, batch_max_size: usize) -> SendFuture {
        let body = encode(&entries, batch_max_size, self.new_line);
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(if self.new_line {
                "text/plain"
            } else {
                "application/json"
            }),
        );
        if let Some(a) = &self.auth {
            headers.insert(http::header::AUTHORIZATION, a.clone());
        }
        let req = CalloutRequest {
            target: self.target.clone(),
            method: Method::POST,
            path: self.path.clone(),
            authority: self.authority.clone(),
            headers,
            body: Bytes::from(body),
            timeout: Some(self.timeout),
        };
        let target = self.target.clone();
        Box::pin(async move {
            let client = callouts().ok_or("no HTTP client in this process")?;
            let r = client.call(req).await.map_err(|e| e.to_string())?;
            if r.status.as_u16() >= 400 {
                return Err(format!(
                    "server returned status code[{}] host[{target}] body[{}]",
                    r.status.as_u16(),
                    String::from_utf8_lossy(&r.body)
                ));
            }
            Ok(())
        })
    }
}

/// Factory of `http-logger`.
pub struct HttpLoggerFactory;

impl PluginFactory for HttpLoggerFactory {
    fn name(&self) -> &str {
        "http-logger"
    }
    fn priority(&self) -> i32 {
        410
    }
    fn schema(&self) -> Value {
        let mut props = serde_json::json!({
            "uri": {"type": "string"},
            "auth_header": {"type": "string"},
            "timeout": {"type": "integer", "minimum": 1, "default": 3},
            "concat_method": {"type": "string", "default": "json", "enum": ["json", "new_line"]},
            "ssl_verify": {"type": "boolean", "default": false}
        });
        entry_schema(&mut props);
        batch_schema(&mut props);
        serde_json::json!({"type": "object", "properties": props, "required": ["uri"],
                           "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let (rest, batch) = split_batch(conf)?;
        let (rest, entry) = split_entry(rest)?;
        let c: HttpConf = parse_conf(&rest)?;
        let (target, authority, path) = crate::util::callout_target(&c.uri, c.ssl_verify)
            .map_err(|e| ConfError::at("uri", e))?;
        let new_line = match c.concat_method.as_str() {
            "json" => false,
            "new_line" => true,
            other => {
                return Err(ConfError::at(
                    "concat_method",
                    format!("matches none of the enum values: {other:?}"),
                ));
            }
        };
        if c.timeout < 1 {
            return Err(ConfError::at("timeout", "must be at least 1"));
        }
        let auth = match &c.auth_header {
            Some(a) => Some(
                HeaderValue::from_str(a)
                    .map_err(|_| ConfError::at("auth_header", "not a valid header value"))?,
            ),
            None => None,
        };
        let sink = Arc::new(HttpSink {
            target,
            authority,
            path,
            auth,
            timeout: Duration::from_secs(c.timeout),
            new_line,
        });
        Ok(Arc::new(Logger {
            name: "http-logger",
            entry,
            batcher: Batcher::new(batch, sink, false),
            filter: None,
        }))
    }
}

// -------------------------------------------------------------------------------- tcp-logger

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpConf {
    host: String,
    port: u16,
    #[serde(default)]
    tls: bool,
    tls_options: Option<String>,
    #[serde(default = "d1000ms")]
    timeout: u64,
    #[serde(rename = "_meta")]
    _meta: Option<Value>,
}

fn d1000ms() -> u64 {
    1000
}

struct TcpSink {
    addr: String,
    timeout: Duration,
}

impl Sink for TcpSink {
    fn send(&self, entries: Vec<Value>, batch_max_size: usize) -> SendFuture {
        let data = encode(&entries, batch_max_size, false);
        let addr = self.addr.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let io = async {
                let mut s = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| format!("failed to connect to TCP server: host[{addr}] {e}"))?;
                s.write_all(data.as_bytes())
                    .await
                    .map_err(|e| format!("failed to send data to TCP server: host[{addr}] {e}"))?;
                let _ = s.shutdown().await;
                Ok(())
            };
            tokio::time::timeout(timeout, io)
                .await
                .unwrap_or_else(|_| Err(format!("timeout sending to TCP server {addr}")))
        })
    }
}

/// Factory of `tcp-logger`.
pub struct TcpLoggerFactory;

impl PluginFactory for TcpLoggerFactory {
    fn name(&self) -> &str {
        "tcp-logger"
    }
    fn priority(&self) -> i32 {
        405
    }
    fn schema(&self) -> Value {
        let mut props = serde_json::json!({
            "host": {"type": "string"},
            "port": {"type": "integer", "minimum": 0},
            "tls": {"type": "boolean", "default": false},
            "tls_options": {"type": "string"},
            "timeout": {"type": "integer", "minimum": 1, "default": 1000}
        });
        entry_schema(&mut props);
        batch_schema(&mut props);
        serde_json::json!({"type": "object", "properties": props, "required": ["host", "port"],
                           "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let (rest, batch) = split_batch(conf)?;
        let (rest, entry) = split_entry(rest)?;
        let c: TcpConf = parse_conf(&rest)?;
        if c.tls {
            return Err(ConfError::at(
                "tls",
                "TLS to the log server is not supported by polygate's tcp-logger yet",
            ));
        }
        let _ = c.tls_options;
        if c.host.is_empty() {
            return Err(ConfError::at("host", "must not be empty"));
        }
        let addr = if c.host.contains(':') && !c.host.starts_with('[') {
            format!("[{}]:{}", c.host, c.port)
        } else {
            format!("{}:{}", c.host, c.port)
        };
        let sink = Arc::new(TcpSink {
            addr,
            timeout: Duration::from_millis(c.timeout.max(1)),
        });
        Ok(Arc::new(Logger {
            name: "tcp-logger",
            entry,
            batcher: Batcher::new(batch, sink, false),
            filter: None,
        }))
    }
}

// ------------------------------------------------------------------------------- file-logger

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConf {
    path: String,
    log_format_extra: Option<Value>,
    #[serde(rename = "match")]
    matches: Option<Vec<Value>>,
    #[serde(rename = "_meta")]
    _meta: Option<Value>,
}

struct FileSink {
    path: String,
}

impl Sink for FileSink {
    fn send(&self, entries: Vec<Value>, _batch_max_size: usize) -> SendFuture {
        let path = self.path.clone();
        Box::pin(async move {
            let mut text = String::new();
            for e in &entries {
                text.push_str(&e.to_string());
                text.push('\n');
            }
            // appending a few lines to a local file: quick enough for the logging thread
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("failed to open file: {path}, error info: {e}"))?;
            f.write_all(text.as_bytes())
                .map_err(|e| format!("failed to write file: {path}, error info: {e}"))
        })
    }
}

/// Factory of `file-logger`.
pub struct FileLoggerFactory;

impl PluginFactory for FileLoggerFactory {
    fn name(&self) -> &str {
        "file-logger"
    }
    fn priority(&self) -> i32 {
        399
    }
    fn schema(&self) -> Value {
        let mut props = serde_json::json!({
            "path": {"type": "string"},
            "log_format_extra": {"type": "object"},
            "match": {"type": "array", "maxItems": 20, "items": {"type": "array"}}
        });
        entry_schema(&mut props);
        serde_json::json!({"type": "object", "properties": props, "required": ["path"],
                           "additionalProperties": false})
    }
    fn build(&self, conf: &Value) -> Result<Arc<dyn Plugin>, ConfError> {
        let (rest, entry) = split_entry(conf.clone())?;
        let c: FileConf = parse_conf(&rest)?;
        if c.path.is_empty() {
            return Err(ConfError::at("path", "must not be empty"));
        }
        let _ = c.log_format_extra;
        let filter =
            match &c.matches {
                None => None,
                Some(list) => {
                    if list.len() > 20 {
                        return Err(ConfError::at(
                            "match",
                            "expect array to have at most 20 items",
                        ));
                    }
                    let mut out = Vec::new();
                    for (i, m) in list.iter().enumerate() {
                        out.push(Expr::compile_vars(m).map_err(|e| {
                            ConfError::at(format!("match[{i}]{}", e.path), e.message)
                        })?);
                    }
                    Some(out)
                }
            };
        let batch = BatchConf {
            name: "file-logger".into(),
            batch_max_size: 1000,
            inactive_timeout: 1,
            buffer_duration: 1,
            max_retry_count: 0,
            retry_delay: 1,
        };
        Ok(Arc::new(Logger {
            name: "file-logger",
            entry,
            batcher: Batcher::new(batch, Arc::new(FileSink { path: c.path }), true),
            filter,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_encode_like_apisix() {
        let e = [serde_json::json!({"a": 1}), serde_json::json!({"b": 2})];
        assert_eq!(encode(&e[..1], 1, false), "{\"a\":1}");
        assert_eq!(encode(&e, 2, false), "[{\"a\":1},{\"b\":2}]");
        assert_eq!(encode(&e, 2, true), "{\"a\":1}\n{\"b\":2}");
    }
}
