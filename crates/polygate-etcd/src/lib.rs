//! An etcd v3 client over etcd's JSON gateway (`/v3/kv/*`, `/v3/watch`, `/v3/lease/grant`,
//! `/v3/auth/authenticate`): the API APISIX's `lua-resty-etcd` speaks, so polygate works with
//! every etcd APISIX works with (3.4 and later) and reads and writes the same keys and values.
//!
//! Keys and values are bytes (base64 on the wire); revisions are etcd's (`create_revision`,
//! `mod_revision`, the header's `revision`). Several endpoints may be given: a request that
//! cannot reach one tries the next. With a user name, the client authenticates and sends the
//! token, and authenticates again when etcd says the token is no longer valid.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// What can go wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint could be reached (or every one timed out).
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// etcd answered with an error.
    #[error("etcd error: {0}")]
    Server(String),
    /// etcd's answer could not be understood.
    #[error("unexpected answer from etcd: {0}")]
    Protocol(String),
    /// The client's settings are invalid.
    #[error("invalid etcd settings: {0}")]
    Config(String),
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Endpoints, `http://host:port` (tried in order).
    pub endpoints: Vec<String>,
    /// Time limit of one request (watches excepted).
    pub timeout: Duration,
    /// User name for etcd's authentication, if enabled.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
}

/// A key and its value with etcd's revisions.
#[derive(Debug, Clone, PartialEq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Bytes,
    /// Revision of the key's creation.
    pub create_revision: i64,
    /// Revision of the key's last change.
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A key was created or changed.
    Put(Kv),
    /// A key was deleted (`mod_revision` is the deletion's revision).
    Delete(Kv),
}

/// What a watch delivers.
#[derive(Debug)]
pub enum WatchMessage {
    /// Changes, all of one revision or several, in order; `revision` is the header's.
    Events {
        /// The changes.
        events: Vec<Event>,
        /// etcd's revision when it sent them.
        revision: i64,
    },
    /// The revision asked for was compacted: the watcher must read everything again.
    Compacted(i64),
    /// etcd ended the watch (with its reason).
    Canceled(String),
}

/// An etcd client (cheap to clone).
#[derive(Clone)]
pub struct Client {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    endpoints: Vec<String>,
    /// The endpoint that answered last.
    current: AtomicUsize,
    timeout: Duration,
    user: Option<(String, String)>,
    token: parking_lot::Mutex<Option<String>>,
}

/// `key` with its last byte incremented: the end of the range of keys starting with `key`.
pub fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // every byte was 0xff: the range ends with the keyspace
    vec![0]
}

fn b64(b: &[u8]) -> String {
    B64.encode(b)
}

/// An int64 of the gateway's JSON (a string, or a number from other gateways).
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn kv_of(v: &Value) -> Result<Kv, EtcdError> {
    let bytes = |name: &str| -> Result<Bytes, EtcdError> {
        match v.get(name).and_then(Value::as_str) {
            Some(s) => B64
                .decode(s)
                .map(Bytes::from)
                .map_err(|e| EtcdError::Protocol(format!("{name}: {e}"))),
            None => Ok(Bytes::new()),
        }
    };
    let key = bytes("key")?;
    Ok(Kv {
        key: String::from_utf8_lossy(&key).into_owned(),
        value: bytes("value")?,
        create_revision: int(v.get("create_revision")),
        mod_revision: int(v.get("mod_revision")),
        lease: int(v.get("lease")),
    })
}

fn header_revision(v: &Value) -> i64 {
    int(v.get("header").and_then(|h| h.get("revision")))
}

fn error_text(v: &Value) -> Option<String> {
    let e = v.get("error")?;
    Some(match e {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| other.to_string()),
    })
}

impl Client {
    /// A client for `cfg` (connects lazily).
    pub fn new(cfg: &Config) -> Result<Client, EtcdError> {
        if cfg.endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoint".into()));
        }
        let mut endpoints = Vec::new();
        for e in &cfg.endpoints {
            let e = e.trim_end_matches('/');
            let uri: http::Uri = e
                .parse()
                .map_err(|err| EtcdError::Config(format!("endpoint {e:?}: {err}")))?;
            match uri.scheme_str() {
                Some("http") => {}
                Some(s) => {
                    return Err(EtcdError::Config(format!(
                        "endpoint {e:?}: scheme {s:?} is not supported (http only)"
                    )));
                }
                None => {
                    return Err(EtcdError::Config(format!(
                        "endpoint {e:?}: expected http://host:port"
                    )));
                }
            }
            endpoints.push(e.to_owned());
        }
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(cfg.timeout));
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(conn);
        let user = match (&cfg.user, &cfg.password) {
            (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
            _ => None,
        };
        Ok(Client {
            inner: std::sync::Arc::new(Inner {
                http,
                endpoints,
                current: AtomicUsize::new(0),
                timeout: cfg.timeout,
                user,
                token: parking_lot::Mutex::new(None),
            }),
        })
    }

    async fn send_once(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut req = hyper::Request::post(format!("{endpoint}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(http::header::AUTHORIZATION, t);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        self.inner.http.request(req).await.map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        })
    }

    /// Sends `body` to `path` on the first endpoint that answers; returns the response head
    /// and body stream.
    async fn send(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, EtcdError> {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let at = (start + i) % n;
            let endpoint = &self.inner.endpoints[at];
            let token = self.token(endpoint).await?;
            match self.send_once(endpoint, path, body, token.as_deref()).await {
                Ok(resp) => {
                    self.inner.current.store(at, Ordering::Relaxed);
                    return Ok(resp);
                }
                Err(e) => {
                    tracing::debug!("etcd {endpoint}{path}: {e}");
                    last = format!("{endpoint}: {e}");
                }
            }
        }
        Err(EtcdError::Unreachable(last))
    }

    async fn token(&self, endpoint: &str) -> Result<Option<String>, EtcdError> {
        let Some((user, password)) = &self.inner.user else {
            return Ok(None);
        };
        if let Some(t) = self.inner.token.lock().clone() {
            return Ok(Some(t));
        }
        let body = json!({"name": user, "password": password});
        let resp = self
            .send_once(endpoint, "/v3/auth/authenticate", &body, None)
            .await
            .map_err(|e| EtcdError::Unreachable(format!("{endpoint}: {e}")))?;
        let v = read_json(resp).await?;
        if let Some(e) = error_text(&v) {
            return Err(EtcdError::Server(format!("authentication failed: {e}")));
        }
        let t = v
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| EtcdError::Protocol("authenticate: no token".into()))?
            .to_owned();
        *self.inner.token.lock() = Some(t.clone());
        Ok(Some(t))
    }

    /// A unary call: `path` with `body`, within the timeout; etcd's error answers become
    /// [`EtcdError::Server`].
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let once = async {
            let resp = self.send(path, &body).await?;
            read_json(resp).await
        };
        let mut v = tokio::time::timeout(self.inner.timeout, once)
            .await
            .map_err(|_| EtcdError::Unreachable(format!("{path}: timed out")))??;
        if let Some(e) = error_text(&v)
            && self.inner.user.is_some()
            && (e.contains("invalid auth token") || e.contains("user name is empty"))
        {
            // the token expired: authenticate again, once
            *self.inner.token.lock() = None;
            let once = async {
                let resp = self.send(path, &body).await?;
                read_json(resp).await
            };
            v = tokio::time::timeout(self.inner.timeout, once)
                .await
                .map_err(|_| EtcdError::Unreachable(format!("{path}: timed out")))??;
        }
        match error_text(&v) {
            Some(e) => Err(EtcdError::Server(e)),
            None => Ok(v),
        }
    }

    /// Every key starting with `prefix`, sorted by key, and the store's revision.
    pub async fn range_prefix(&self, prefix: &str) -> Result<(Vec<Kv>, i64), EtcdError> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))}),
            )
            .await?;
        let kvs = match v.get("kvs").and_then(Value::as_array) {
            Some(a) => a.iter().map(kv_of).collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        Ok((kvs, header_revision(&v)))
    }

    /// One key, and the store's revision.
    pub async fn get(&self, key: &str) -> Result<(Option<Kv>, i64), EtcdError> {
        let v = self
            .call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))
            .await?;
        let kv = match v
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            Some(kv) => Some(kv_of(kv)?),
            None => None,
        };
        Ok((kv, header_revision(&v)))
    }

    /// Sets `key`; returns the revision of the write and the previous value, if any.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<(i64, Option<Kv>), EtcdError> {
        let mut body = json!({"key": b64(key.as_bytes()), "value": b64(value), "prev_kv": true});
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        let v = self.call("/v3/kv/put", body).await?;
        let prev = match v.get("prev_kv") {
            Some(p) => Some(kv_of(p)?),
            None => None,
        };
        Ok((header_revision(&v), prev))
    }

    /// Sets `key` only if its `mod_revision` is still `mod_revision` (0: only if it does not
    /// exist). Returns the revision of the write, or `None` when the key had changed.
    pub async fn put_if(
        &self,
        key: &str,
        value: &[u8],
        mod_revision: i64,
        lease: Option<i64>,
    ) -> Result<Option<i64>, EtcdError> {
        let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if let Some(l) = lease {
            put["lease"] = json!(l.to_string());
        }
        let v = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [{"key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL",
                                 "mod_revision": mod_revision.to_string()}],
                    "success": [{"request_put": put}],
                }),
            )
            .await?;
        Ok(v.get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .then(|| header_revision(&v)))
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1) and the revision.
    pub async fn delete(&self, key: &str) -> Result<(i64, i64), EtcdError> {
        let v = self
            .call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())}))
            .await?;
        Ok((int(v.get("deleted")), header_revision(&v)))
    }

    /// Deletes every key starting with `prefix`; returns how many were deleted.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64, EtcdError> {
        let v = self
            .call(
                "/v3/kv/deleterange",
                json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))}),
            )
            .await?;
        Ok(int(v.get("deleted")))
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", json!({"TTL": ttl})).await?;
        match int(v.get("ID")) {
            0 => Err(EtcdError::Protocol("lease grant: no ID".into())),
            id => Ok(id),
        }
    }

    /// Compacts the store's history up to `revision` (for tests and maintenance).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/compaction",
            json!({"revision": revision.to_string(), "physical": true}),
        )
        .await
        .map(drop)
    }

    /// Watches every key starting with `prefix` from `start_revision` on.
    pub async fn watch(&self, prefix: &str, start_revision: i64) -> Result<Watch, EtcdError> {
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix.as_bytes())),
            "start_revision": start_revision.to_string(),
            "progress_notify": true,
        }});
        let resp = tokio::time::timeout(self.inner.timeout, self.send("/v3/watch", &body))
            .await
            .map_err(|_| EtcdError::Unreachable("/v3/watch: timed out".into()))??;
        if resp.status() == http::StatusCode::UNAUTHORIZED {
            *self.inner.token.lock() = None;
        }
        if !resp.status().is_success() {
            let v = read_json(resp).await.unwrap_or(Value::Null);
            return Err(EtcdError::Server(
                error_text(&v).unwrap_or_else(|| "watch refused".into()),
            ));
        }
        Ok(Watch {
            body: resp.into_body(),
            buf: BytesMut::new(),
        })
    }
}

async fn read_json(resp: hyper::Response<hyper::body::Incoming>) -> Result<Value, EtcdError> {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| EtcdError::Unreachable(e.to_string()))?
        .to_bytes();
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => Ok(v),
        Err(_) if !status.is_success() => Err(EtcdError::Server(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ))),
        Err(e) => Err(EtcdError::Protocol(e.to_string())),
    }
}

/// An open watch: a stream of JSON messages from etcd.
pub struct Watch {
    body: hyper::body::Incoming,
    buf: BytesMut,
}

impl Watch {
    /// The next message; `Ok(None)` when etcd closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchMessage>, EtcdError> {
        loop {
            if let Some(v) = self.take_message()? {
                let Some(result) = v.get("result") else {
                    if let Some(e) = error_text(&v) {
                        return Ok(Some(WatchMessage::Canceled(e)));
                    }
                    continue;
                };
                let compacted = int(result.get("compact_revision"));
                if compacted > 0 {
                    return Ok(Some(WatchMessage::Compacted(compacted)));
                }
                if result.get("canceled").and_then(Value::as_bool) == Some(true) {
                    let why = result
                        .get("cancel_reason")
                        .and_then(Value::as_str)
                        .unwrap_or("canceled");
                    return Ok(Some(WatchMessage::Canceled(why.to_owned())));
                }
                let mut events = Vec::new();
                if let Some(evs) = result.get("events").and_then(Value::as_array) {
                    for e in evs {
                        let kv = kv_of(e.get("kv").unwrap_or(&Value::Null))?;
                        match e.get("type").and_then(Value::as_str) {
                            Some("DELETE") => events.push(Event::Delete(kv)),
                            _ => events.push(Event::Put(kv)),
                        }
                    }
                }
                return Ok(Some(WatchMessage::Events {
                    events,
                    revision: header_revision(result),
                }));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(EtcdError::Unreachable(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.len() + data.len() > 256 << 20 {
                            return Err(EtcdError::Protocol("watch message over 256 MiB".into()));
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Takes one complete JSON value off the buffer, if there is one.
    fn take_message(&mut self) -> Result<Option<Value>, EtcdError> {
        let start = self
            .buf
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(self.buf.len());
        self.buf.advance(start);
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
        match it.next() {
            Some(Ok(v)) => {
                let used = it.byte_offset();
                self.buf.advance(used);
                Ok(Some(v))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(EtcdError::Protocol(e.to_string())),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/apisix/"), b"/apisix0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn kvs_decode_the_gateway_json() {
        let v = json!({"key": b64(b"/apisix/routes/1"), "value": b64(b"{}"),
                       "create_revision": "5", "mod_revision": "7"});
        let kv = kv_of(&v).unwrap();
        assert_eq!(kv.key, "/apisix/routes/1");
        assert_eq!(&kv.value[..], b"{}");
        assert_eq!((kv.create_revision, kv.mod_revision, kv.lease), (5, 7, 0));
    }
}
