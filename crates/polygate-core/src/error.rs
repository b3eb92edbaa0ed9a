//! Gateway errors and the one place that turns them into HTTP responses.

use bytes::Bytes;
use http::StatusCode;

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// No route matched.
    #[error("404 Route Not Found")]
    RouteNotFound,
    /// The route has no upstream, or every node is down.
    #[error("no valid upstream node: {0}")]
    NoUpstream(String),
    /// The upstream scheme is not proxied by this release.
    #[error("upstream scheme {0:?} is not supported yet")]
    UnsupportedScheme(String),
    /// Connecting to the upstream failed.
    #[error("connect to upstream {addr} failed: {reason}")]
    Connect {
        /// Node address.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// An upstream node's host name did not resolve (503, as APISIX).
    #[error("cannot resolve upstream host {host}: {reason}")]
    Resolve {
        /// The name.
        host: String,
        /// Cause.
        reason: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream {addr} timed out ({what})")]
    Timeout {
        /// Node address.
        addr: String,
        /// Which timeout.
        what: &'static str,
    },
    /// The upstream connection failed mid-request.
    #[error("upstream {addr} failed: {reason}")]
    Upstream {
        /// Node address.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// A plugin failed.
    #[error(transparent)]
    Plugin(#[from] crate::plugin::PluginError),
    /// The client request is malformed.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request body is larger than a plugin accepts.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// A resource the route names does not exist: its service (404) or its plugin config
    /// (503), answered as APISIX answers.
    #[error("the route's {what} does not exist")]
    MissingResource {
        /// Which kind of resource.
        what: &'static str,
        /// The status APISIX answers with.
        status: StatusCode,
    },
    /// The gateway refuses more work of this kind for now (503).
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The request target is longer than polygate accepts (414, as nginx).
    #[error("request target too long")]
    UriTooLong,
    /// The client stopped sending its request body (nginx's `client_body_timeout`: 408).
    #[error("timed out reading the request body")]
    ClientTimeout,
    /// The client asked for something HTTP allows but polygate does not implement (an unknown
    /// `Transfer-Encoding`, as nginx answers 501).
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// Plugins produced a request that cannot be written upstream (a control byte in the
    /// target, say). Never sent.
    #[error("invalid upstream request: {0}")]
    InvalidUpstreamRequest(String),
}

impl GatewayError {
    /// The response the client gets, with its JSON content type.
    pub fn into_response(self) -> crate::PluginResponse {
        let (status, body) = self.rescue();
        let mut r = crate::PluginResponse::new(status, body);
        r.headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    /// The answer to a gRPC call polygate failed: HTTP 200, trailers-only, with the
    /// `grpc-status` that gRPC's HTTP-to-gRPC mapping gives the HTTP status (a timeout is
    /// `DEADLINE_EXCEEDED`) and the error as `grpc-message` (percent-encoded).
    pub fn into_grpc_response(self) -> crate::PluginResponse {
        let (status, _) = self.rescue();
        let mut r = crate::PluginResponse::new(StatusCode::OK, Bytes::new());
        r.headers = grpc_status_headers(grpc_code(status.as_u16()), &self.to_string());
        r
    }

    /// Status and body sent to the client (APISIX-style `{"error_msg": ...}`).
    pub fn rescue(&self) -> (StatusCode, Bytes) {
        let status = match self {
            GatewayError::RouteNotFound => StatusCode::NOT_FOUND,
            GatewayError::NoUpstream(_) | GatewayError::UnsupportedScheme(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::Connect { .. } | GatewayError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Resolve { .. } | GatewayError::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::MissingResource { status, .. } => *status,
            GatewayError::Plugin(_) | GatewayError::InvalidUpstreamRequest(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            GatewayError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            GatewayError::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UriTooLong => StatusCode::URI_TOO_LONG,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        let msg = match self {
            GatewayError::RouteNotFound => "404 Route Not Found".to_owned(),
            GatewayError::Plugin(_) | GatewayError::InvalidUpstreamRequest(_) => {
                "500 Internal Server Error".to_owned()
            }
            _ => format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            ),
        };
        let body = serde_json::json!({ "error_msg": msg }).to_string() + "\n";
        (status, Bytes::from(body))
    }
}

/// The gRPC status code for an HTTP status (gRPC's "HTTP to gRPC status code mapping"; 504 is
/// `DEADLINE_EXCEEDED` since polygate answers it for its own timeouts).
pub fn grpc_code(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 => 14,
        504 => 4,
        _ => 2,
    }
}

/// `content-type: application/grpc`, `grpc-status` and `grpc-message` (percent-encoded as
/// gRPC requires).
pub fn grpc_status_headers(code: u32, message: &str) -> http::HeaderMap {
    use http::{HeaderName, HeaderValue};
    let mut h = http::HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        HeaderName::from_static("grpc-status"),
        HeaderValue::from(code),
    );
    let mut msg = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            msg.push(b as char);
        } else {
            msg.push_str(&format!("%{b:02X}"));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&msg) {
        h.insert(HeaderName::from_static("grpc-message"), v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_not_found_body() {
        let (s, b) = GatewayError::RouteNotFound.rescue();
        assert_eq!(s, 404);
        assert_eq!(&b[..], b"{\"error_msg\":\"404 Route Not Found\"}\n");
    }
}
