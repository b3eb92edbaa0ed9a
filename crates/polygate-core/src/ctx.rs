//! The per-request context every plugin phase sees.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use polygate_router::VarSource;

use crate::consumer::{ConsumerIndex, ConsumerInfo};
use crate::path::{PathError, escape_controls, escape_path, normalize};

/// Response status and headers, as seen (and changed) by `header_filter`.
#[derive(Debug, Clone, Default)]
pub struct ResponseHead {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
}

/// Everything known about one request, owned by the request's task.
///
/// Fields that plugins change (`path`, `query`, `headers`, `upstream_*`) are read by the proxy
/// when it builds the upstream request, after `access`/`before_proxy` ran.
pub struct RequestCtx {
    /// Method sent upstream (plugins may change it).
    pub method: Method,
    /// Current URI path (`$uri`): percent-decoded and normalised by
    /// [`RequestCtx::normalize_path`] (routes match it), then changed by rewrites.
    pub path: String,
    /// Current query string without `?`, as received (not decoded).
    pub query: Option<String>,
    /// The request target exactly as received (`$real_request_uri`; nginx's `$request_uri`).
    pub request_uri: String,
    /// The normalised path before any rewrite, when it differs from the received one.
    start_path: Option<Box<str>>,
    /// The exact target to send upstream (already encoded), when a plugin chose it
    /// (proxy-rewrite); otherwise [`RequestCtx::upstream_uri`] derives it.
    pub upstream_target: Option<String>,
    /// Request headers, forwarded upstream after plugins ran.
    pub headers: HeaderMap,
    /// HTTP version of the client request.
    pub version: Version,
    /// Client address.
    pub client_addr: SocketAddr,
    /// Local address the request arrived on.
    pub server_addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The client connection's TLS facts; `None` on plain connections.
    pub tls: Option<Arc<TlsFacts>>,
    /// Host (without port) of the request, lower case.
    pub host: Option<String>,
    /// Matched route id.
    pub route_id: Option<Arc<str>>,
    /// Matched route's service id.
    pub service_id: Option<Arc<str>>,
    /// Id of the upstream serving the matched route (`route:<id>` for an inline one).
    pub upstream_id: Option<Arc<str>>,
    /// URI parameters captured by the route (`/user/:id`).
    pub uri_params: Vec<(Arc<str>, String)>,
    /// The identified consumer (set by an auth plugin).
    pub consumer: Option<Arc<ConsumerInfo>>,
    /// Consumers indexed by credential, for auth plugins.
    pub consumers: Arc<ConsumerIndex>,
    /// Host header to send upstream, overriding `pass_host` (proxy-rewrite `host`).
    pub upstream_host: Option<HeaderValue>,
    /// Variables set by plugins (`ctx.var` extensions), read by `vars` expressions.
    pub plugin_vars: Vec<(String, String)>,
    /// Per-request state private to plugins (like `ngx.ctx`).
    pub extensions: http::Extensions,
    /// The request body, when a plugin asked for it ([`crate::Plugin::wants_body`]); plugins may
    /// replace it before the request is proxied.
    pub body: Option<Bytes>,
    /// Replacement response body chosen by a plugin in `header_filter`.
    pub body_override: Option<Bytes>,
    /// The upstream node that served the request (`ip:port`), once known.
    pub upstream_addr: Option<SocketAddr>,
    /// Response status, once known (for `log`).
    pub status: Option<StatusCode>,
    /// When the request arrived.
    pub started: Instant,
    /// Time to the upstream's response headers, once known.
    pub upstream_latency: Option<std::time::Duration>,
    /// What the matched route declares (its `uri`, `host`, names), for metrics and logs.
    pub route_facts: Option<Arc<RouteFacts>>,
    /// Response body bytes sent to the client, known in the `log` phase.
    pub response_body_bytes: u64,
    /// Whether the response was made by the gateway (a plugin or an error) rather than the
    /// upstream (APISIX's `response_source`).
    pub local_response: bool,
    /// Response headers set before the response exists (APISIX's `core.response.set_header`
    /// in the access phase: limit-count's quota headers): set on whatever response the request
    /// gets, before the `header_filter` phase.
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
}

/// What a matched route declares, for metrics labels (`matched_uri`, `matched_host`) and
/// `prefer_name`.
#[derive(Debug, Clone, Default)]
pub struct RouteFacts {
    /// The route's `uri` (or first of `uris`).
    pub uri: Arc<str>,
    /// The route's `host` (or first of `hosts`), empty without one.
    pub host: Arc<str>,
    /// The route's `name`, when set.
    pub name: Option<Arc<str>>,
    /// The route's service's `name`, when set.
    pub service_name: Option<Arc<str>>,
}

impl RequestCtx {
    /// A context for a request with these attributes.
    pub fn new(
        method: Method,
        request_uri: &str,
        headers: HeaderMap,
        version: Version,
        client_addr: SocketAddr,
        server_addr: SocketAddr,
        consumers: Arc<ConsumerIndex>,
    ) -> RequestCtx {
        let (path, query) = match request_uri.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (request_uri.to_owned(), None),
        };
        let host = headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| strip_port(h).to_ascii_lowercase());
        RequestCtx {
            method,
            path,
            query,
            request_uri: request_uri.to_owned(),
            start_path: None,
            upstream_target: None,
            headers,
            version,
            client_addr,
            server_addr,
            scheme: "http",
            tls: None,
            host,
            route_id: None,
            service_id: None,
            upstream_id: None,
            uri_params: Vec::new(),
            consumer: None,
            consumers,
            upstream_host: None,
            plugin_vars: Vec::new(),
            extensions: http::Extensions::new(),
            body: None,
            body_override: None,
            upstream_addr: None,
            status: None,
            started: Instant::now(),
            upstream_latency: None,
            route_facts: None,
            response_body_bytes: 0,
            local_response: false,
            response_headers: Vec::new(),
        }
    }

    /// The first value of request header `name` as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The first value of query argument `name`, percent-decoded (`+` as space).
    pub fn arg(&self, name: &str) -> Option<Cow<'_, str>> {
        let q = self.query.as_deref()?;
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == name {
                return Some(decode_component(v));
            }
        }
        None
    }

    /// The value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        for h in self.headers.get_all(http::header::COOKIE) {
            let Ok(s) = h.to_str() else { continue };
            for part in s.split(';') {
                let (k, v) = part.trim().split_once('=').unwrap_or((part.trim(), ""));
                if k == name {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Sets (replaces) a request header; invalid names/values are ignored and reported.
    pub fn set_header(&mut self, name: &str, value: &str) -> Result<(), InvalidHeader> {
        let n =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| InvalidHeader(name.to_owned()))?;
        let v = HeaderValue::from_str(value).map_err(|_| InvalidHeader(name.to_owned()))?;
        self.headers.insert(n, v);
        Ok(())
    }

    /// Records the consumer an auth plugin identified and tells the upstream, as APISIX's
    /// `attach_consumer` does: `X-Consumer-Username`, and `X-Consumer-Custom-ID` when the
    /// consumer has `labels.custom_id`. (Client-sent copies of these headers were removed when
    /// the request arrived.)
    pub fn attach_consumer(&mut self, consumer: Arc<ConsumerInfo>) {
        let set = |h: &mut HeaderMap, name: &'static str, v: Option<&str>| match v
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            Some(v) => {
                h.insert(name, v);
            }
            None => {
                h.remove(name);
            }
        };
        set(
            &mut self.headers,
            "x-consumer-username",
            Some(&consumer.username),
        );
        set(
            &mut self.headers,
            "x-consumer-custom-id",
            consumer.custom_id.as_deref(),
        );
        self.consumer = Some(consumer);
    }

    /// Sets a plugin variable visible to `vars` expressions.
    pub fn set_var(&mut self, name: &str, value: String) {
        if let Some(slot) = self.plugin_vars.iter_mut().find(|(k, _)| k == name) {
            slot.1 = value;
        } else {
            self.plugin_vars.push((name.to_owned(), value));
        }
    }

    /// Replaces [`RequestCtx::path`] with its normal form (`$uri`, see [`crate::path`]),
    /// keeping the received target for `$real_request_uri` and for the upstream request.
    pub fn normalize_path(&mut self, merge_slashes: bool) -> Result<(), PathError> {
        if let Cow::Owned(n) = normalize(&self.path, merge_slashes)? {
            self.start_path = Some(n.clone().into_boxed_str());
            self.path = n;
        }
        Ok(())
    }

    /// The received path (without the query).
    fn received_path(&self) -> &str {
        self.request_uri
            .split_once('?')
            .map_or(self.request_uri.as_str(), |(p, _)| p)
    }

    /// The received query (without `?`).
    fn received_query(&self) -> Option<&str> {
        self.request_uri.split_once('?').map(|(_, q)| q)
    }

    /// The normalised path before any rewrite.
    pub fn start_path(&self) -> &str {
        self.start_path
            .as_deref()
            .unwrap_or_else(|| self.received_path())
    }

    /// The request target sent upstream: what a plugin chose ([`RequestCtx::upstream_target`]),
    /// else the target exactly as received while the path and query are unchanged (as nginx's
    /// `proxy_pass` without a URI sends it), else the current path percent-encoded (nginx's
    /// `ngx_escape_uri`) with the current query.
    pub fn upstream_uri(&self) -> Cow<'_, str> {
        if let Some(t) = &self.upstream_target {
            return Cow::Borrowed(t);
        }
        if self.path == self.start_path() && self.query.as_deref() == self.received_query() {
            return Cow::Borrowed(&self.request_uri);
        }
        let p = escape_path(&self.path);
        match &self.query {
            Some(q) => Cow::Owned(format!("{p}?{}", escape_controls(q))),
            None => p,
        }
    }
}

/// A header name or value that HTTP does not allow.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid header {0:?}")]
pub struct InvalidHeader(pub String);

/// `host:port` → `host` (IPv6 brackets kept).
pub fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return match h.find(']') {
            Some(i) => &h[..=i],
            None => h,
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// Percent-decodes a query component (`+` is a space).
pub fn decode_component(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(String::from_utf8_lossy(&percent_decode(v.as_bytes())).into_owned())
}

/// Percent-decodes bytes: `%XX` becomes the byte, `+` a space; malformed escapes stay as they
/// are.
pub fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(a), Some(b)) => {
                        out.push((a * 16 + b) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

impl VarSource for RequestCtx {
    fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        if let Some(h) = name.strip_prefix("http_") {
            let h = h.replace('_', "-");
            let mut it = self
                .headers
                .get_all(h.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok());
            let first = it.next()?;
            return match it.next() {
                None => Some(Cow::Borrowed(first)),
                Some(second) => {
                    let mut s = format!("{first}, {second}");
                    for v in it {
                        s.push_str(", ");
                        s.push_str(v);
                    }
                    Some(Cow::Owned(s))
                }
            };
        }
        if let Some(a) = name.strip_prefix("arg_") {
            return self.arg(a);
        }
        if let Some(c) = name.strip_prefix("cookie_") {
            return self.cookie(c).map(Cow::Borrowed);
        }
        let v: Cow<'_, str> = match name {
            "uri" => Cow::Borrowed(self.path.as_str()),
            // APISIX: `request_uri` is the normalised path (before rewrites) with the query,
            // so that no plugin acts on an un-normalised target; `real_request_uri` is the
            // target as received
            "request_uri" => match self.received_query() {
                Some(q) => Cow::Owned(format!("{}?{q}", self.start_path())),
                None => Cow::Borrowed(self.start_path()),
            },
            "real_request_uri" => Cow::Borrowed(self.request_uri.as_str()),
            "args" | "query_string" => Cow::Borrowed(self.query.as_deref()?),
            "is_args" => Cow::Borrowed(if self.query.is_some() { "?" } else { "" }),
            "request_method" => Cow::Borrowed(self.method.as_str()),
            "remote_addr" => Cow::Owned(self.client_addr.ip().to_string()),
            "remote_port" => Cow::Owned(self.client_addr.port().to_string()),
            "server_addr" => Cow::Owned(self.server_addr.ip().to_string()),
            "server_port" => Cow::Owned(self.server_addr.port().to_string()),
            "host" => Cow::Borrowed(self.host.as_deref()?),
            "scheme" => Cow::Borrowed(self.scheme),
            "https" => Cow::Borrowed(if self.tls.is_some() { "on" } else { "" }),
            "ssl_server_name" => Cow::Borrowed(self.tls.as_ref()?.sni.as_deref()?),
            "ssl_protocol" => Cow::Borrowed(self.tls.as_ref()?.protocol),
            "ssl_client_verify" => Cow::Borrowed(if self.tls.as_ref()?.client_verified {
                "SUCCESS"
            } else {
                "NONE"
            }),
            "server_protocol" => Cow::Borrowed(match self.version {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/1.1",
            }),
            "route_id" => Cow::Borrowed(self.route_id.as_deref()?),
            "service_id" => Cow::Borrowed(self.service_id.as_deref()?),
            "consumer_name" => Cow::Borrowed(self.consumer.as_ref()?.username.as_str()),
            "status" => Cow::Owned(self.status?.as_u16().to_string()),
            "upstream_addr" => Cow::Owned(self.upstream_addr?.to_string()),
            _ => {
                if let Some((_, v)) = self.plugin_vars.iter().find(|(k, _)| k == name) {
                    return Some(Cow::Borrowed(v.as_str()));
                }
                if let Some((_, v)) = self.uri_params.iter().find(|(k, _)| &**k == name) {
                    return Some(Cow::Borrowed(v.as_str()));
                }
                return None;
            }
        };
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(uri: &str) -> RequestCtx {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("Example.com:8080"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        h.insert("cookie", HeaderValue::from_static("a=1; sess=xyz"));
        RequestCtx::new(
            Method::GET,
            uri,
            h,
            Version::HTTP_11,
            "10.0.0.9:5555".parse().unwrap(),
            "127.0.0.1:9080".parse().unwrap(),
            Arc::new(ConsumerIndex::default()),
        )
    }

    #[test]
    fn vars() {
        let c = ctx("/p/a?x=1&name=hello%20w+x&e");
        assert_eq!(c.var("uri").as_deref(), Some("/p/a"));
        assert_eq!(c.var("arg_name").as_deref(), Some("hello w x"));
        assert_eq!(c.var("arg_e").as_deref(), Some(""));
        assert_eq!(c.var("arg_nope"), None);
        assert_eq!(c.var("http_x_multi").as_deref(), Some("a, b"));
        assert_eq!(c.var("cookie_sess").as_deref(), Some("xyz"));
        assert_eq!(c.var("host").as_deref(), Some("example.com"));
        assert_eq!(c.var("remote_addr").as_deref(), Some("10.0.0.9"));
        assert_eq!(c.var("args").as_deref(), Some("x=1&name=hello%20w+x&e"));
    }

    #[test]
    fn decode() {
        assert_eq!(decode_component("a%2Fb+c"), "a/b c");
        assert_eq!(decode_component("bad%zz%"), "bad%zz%");
    }
}

/// What a TLS client connection established, for `vars` (`ssl_server_name`, `ssl_protocol`,
/// `ssl_client_verify`, `https`).
#[derive(Debug, Clone, Default)]
pub struct TlsFacts {
    /// The SNI the client sent.
    pub sni: Option<Box<str>>,
    /// `TLSv1.3` or `TLSv1.2`.
    pub protocol: &'static str,
    /// Whether the client presented a certificate that was verified.
    pub client_verified: bool,
}

/// An upstream a plugin chose for this request instead of the route's (traffic-split), put
/// in [`RequestCtx::extensions`] by the `access` phase.
#[derive(Debug, Clone)]
pub enum UpstreamOverride {
    /// An `upstreams` resource, by id.
    Id(Arc<str>),
    /// An upstream written in the plugin's configuration; `key` names it uniquely (the
    /// resource, the configuration's hash and the entry), so that its runtime state (pools,
    /// balancer) is built once and kept while the configuration is.
    Inline {
        /// Unique name of this upstream.
        key: Arc<str>,
        /// Its configuration.
        conf: Arc<polygate_model::Upstream>,
    },
}
