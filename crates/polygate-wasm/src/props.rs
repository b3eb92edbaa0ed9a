//! Properties (`proxy_get_property`): Envoy's attribute names, values encoded as Envoy
//! encodes them (strings raw, integers as 8 bytes little-endian, booleans as one byte), then
//! any nginx variable by its name as a single segment (what APISIX's wasm host offers), then
//! what the guest stored with `proxy_set_property`.

use polygate_router::VarSource;

use crate::abi::status;
use crate::state::HostState;

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// The value of the property at `path` (segments joined by NUL).
pub fn get(s: &mut HostState, path: &[u8]) -> Option<Vec<u8>> {
    let path = path.strip_suffix(b"\0").unwrap_or(path);
    let segs: Vec<&[u8]> = path.split(|b| *b == 0).collect();
    let def = s.def.clone();
    // plugin facts, available in every callback
    match segs.as_slice() {
        [b"plugin_name"] => return Some(def.name.as_bytes().to_vec()),
        [b"plugin_root_id"] => return Some(def.root_id.as_bytes().to_vec()),
        [b"plugin_vm_id"] => return Some(def.vm_id.as_bytes().to_vec()),
        _ => {}
    }
    if let Some(v) = s
        .streams
        .get(&s.effective)
        .and_then(|st| st.props.get(path))
    {
        return Some(v.clone());
    }
    let status = s.view.resp().map(|r| r.status.as_u16());
    let resp_header = |s: &mut HostState, name: &[u8]| -> Option<Vec<u8>> {
        let r = s.view.resp()?;
        let n = http::HeaderName::from_bytes(&name.to_ascii_lowercase()).ok()?;
        r.headers.get(n).map(|v| v.as_bytes().to_vec())
    };
    if let [b"response", b"headers", name] = segs.as_slice() {
        return resp_header(s, name);
    }
    let r = s.view.req()?;
    let text = |v: &str| Some(v.as_bytes().to_vec());
    match segs.as_slice() {
        [b"request", b"path"] => text(&r.upstream_uri()),
        [b"request", b"url_path"] => {
            let u = r.upstream_uri();
            text(u.split('?').next().unwrap_or(""))
        }
        [b"request", b"query"] => text(r.query.as_deref().unwrap_or("")),
        [b"request", b"host"] => r
            .headers
            .get(http::header::HOST)
            .map(|h| h.as_bytes().to_vec()),
        [b"request", b"scheme"] => text(r.scheme),
        [b"request", b"method"] => text(r.method.as_str()),
        [b"request", b"protocol"] => text(match r.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2",
            _ => "HTTP/1.1",
        }),
        [b"request", b"id"] => r.headers.get("x-request-id").map(|h| h.as_bytes().to_vec()),
        [b"request", b"useragent"] => r
            .headers
            .get(http::header::USER_AGENT)
            .map(|h| h.as_bytes().to_vec()),
        [b"request", b"referer"] => r
            .headers
            .get(http::header::REFERER)
            .map(|h| h.as_bytes().to_vec()),
        [b"request", b"headers", name] => {
            let n = http::HeaderName::from_bytes(&name.to_ascii_lowercase()).ok()?;
            r.headers.get(n).map(|v| v.as_bytes().to_vec())
        }
        [b"request", b"time"] => {
            let age = r.started.elapsed();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(int(now.saturating_sub(age).as_nanos() as i64))
        }
        [b"request", b"duration"] => Some(int(r.started.elapsed().as_nanos() as i64)),
        [b"response", b"code"] => status
            .or(r.status.map(|s| s.as_u16()))
            .map(|c| int(i64::from(c))),
        [b"source", b"address"] => text(&r.client_addr.to_string()),
        [b"source", b"port"] => Some(int(i64::from(r.client_addr.port()))),
        [b"destination", b"address"] => text(&r.server_addr.to_string()),
        [b"destination", b"port"] => Some(int(i64::from(r.server_addr.port()))),
        [b"upstream", b"address"] => r.upstream_addr.map(|a| a.to_string().into_bytes()),
        [b"upstream", b"port"] => r.upstream_addr.map(|a| int(i64::from(a.port()))),
        [b"connection", b"mtls"] => Some(vec![0]),
        [b"route_name"] => r.route_id.as_deref().map(|v| v.as_bytes().to_vec()),
        [b"service_name"] => r.service_id.as_deref().map(|v| v.as_bytes().to_vec()),
        [b"cluster_name"] => r.upstream_id.as_deref().map(|v| v.as_bytes().to_vec()),
        [b"consumer_name"] => r.consumer.as_ref().map(|c| c.username.as_bytes().to_vec()),
        // APISIX's wasm host: any nginx variable by name
        [name] => {
            let name = std::str::from_utf8(name).ok()?;
            r.var(name).map(|v| v.as_bytes().to_vec())
        }
        _ => None,
    }
}

/// `proxy_set_property`: stored on the stream for the guest to read back (and for later
/// filters of the same instance); well-known attributes are read-only.
pub fn set(s: &mut HostState, path: Vec<u8>, value: Vec<u8>) -> i32 {
    let first = path.split(|b| *b == 0).next().unwrap_or(b"");
    let read_only: &[&[u8]] = &[
        b"request",
        b"response",
        b"source",
        b"destination",
        b"upstream",
        b"connection",
        b"plugin_name",
        b"plugin_root_id",
        b"plugin_vm_id",
    ];
    if read_only.contains(&first) {
        return status::BAD_ARGUMENT;
    }
    match s.target_stream() {
        Some(st) => {
            st.props.insert(path, value);
            status::OK
        }
        None => status::BAD_ARGUMENT,
    }
}
