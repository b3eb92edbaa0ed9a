//! The proxy-wasm ABI's constants and the header-map serialisation (proxy-wasm spec,
//! `abi-versions/v0.2.1`, with proxy-wasm-cpp-host's behaviour where the text is ambiguous).

/// ABI versions, detected from the module's `proxy_abi_version_*` export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    /// 0.1.0: two-argument header callbacks, `proxy_get_configuration`.
    V0_1_0,
    /// 0.2.0.
    V0_2_0,
    /// 0.2.1: 0.2.0 plus `proxy_get_log_level`.
    V0_2_1,
}

impl AbiVersion {
    /// The version a module declares, from its export names: `Ok(None)` without any marker,
    /// `Err(name)` for a marker of a version this host does not know.
    pub fn detect<'a>(exports: impl Iterator<Item = &'a str>) -> Result<Option<Self>, String> {
        let mut found = None;
        for name in exports {
            let Some(v) = name.strip_prefix("proxy_abi_version_") else {
                continue;
            };
            let ver = match v {
                "0_1_0" => AbiVersion::V0_1_0,
                "0_2_0" => AbiVersion::V0_2_0,
                "0_2_1" => AbiVersion::V0_2_1,
                _ => return Err(name.to_owned()),
            };
            // the newest marker wins when a module exports several
            found = Some(match found {
                Some(f) if rank(f) > rank(ver) => f,
                _ => ver,
            });
        }
        Ok(found)
    }

    /// As written in logs (`0.2.1`).
    pub fn as_str(self) -> &'static str {
        match self {
            AbiVersion::V0_1_0 => "0.1.0",
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        }
    }
}

fn rank(v: AbiVersion) -> u8 {
    match v {
        AbiVersion::V0_1_0 => 0,
        AbiVersion::V0_2_0 => 1,
        AbiVersion::V0_2_1 => 2,
    }
}

/// `proxy_status_t`.
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// No such key, buffer or queue.
    pub const NOT_FOUND: i32 = 1;
    /// An argument is out of range or refers to nothing.
    pub const BAD_ARGUMENT: i32 = 2;
    /// Serialised data could not be parsed.
    pub const SERIALIZATION_FAILURE: i32 = 3;
    /// Unused by this host; kept for completeness.
    pub const PARSE_FAILURE: i32 = 4;
    /// A guest pointer or length is outside its memory.
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    /// The queue is empty.
    pub const EMPTY: i32 = 7;
    /// Compare-and-swap failed.
    pub const CAS_MISMATCH: i32 = 8;
    /// Broken connection (cpp-host: the status of a failed callout).
    pub const BROKEN_CONNECTION: i32 = 9;
    /// The host failed.
    pub const INTERNAL_FAILURE: i32 = 10;
    /// Not implemented by this host.
    pub const UNIMPLEMENTED: i32 = 12;
}

/// `proxy_buffer_type_t`.
pub mod buffer {
    /// Request body (in `proxy_on_request_body`).
    pub const HTTP_REQUEST_BODY: i32 = 0;
    /// Response body (in `proxy_on_response_body`).
    pub const HTTP_RESPONSE_BODY: i32 = 1;
    /// TCP data from downstream.
    pub const DOWNSTREAM_DATA: i32 = 2;
    /// TCP data from upstream.
    pub const UPSTREAM_DATA: i32 = 3;
    /// A callout's response body (in `proxy_on_http_call_response`).
    pub const HTTP_CALL_RESPONSE_BODY: i32 = 4;
    /// gRPC message.
    pub const GRPC_CALL_MESSAGE: i32 = 5;
    /// VM configuration (in `proxy_on_vm_start`).
    pub const VM_CONFIGURATION: i32 = 6;
    /// Plugin configuration (in `proxy_on_configure`).
    pub const PLUGIN_CONFIGURATION: i32 = 7;
    /// Foreign function arguments.
    pub const CALL_DATA: i32 = 8;
}

/// `proxy_map_type_t`.
pub mod map {
    /// Request headers.
    pub const HTTP_REQUEST_HEADERS: i32 = 0;
    /// Request trailers.
    pub const HTTP_REQUEST_TRAILERS: i32 = 1;
    /// Response headers.
    pub const HTTP_RESPONSE_HEADERS: i32 = 2;
    /// Response trailers.
    pub const HTTP_RESPONSE_TRAILERS: i32 = 3;
    /// gRPC initial metadata.
    pub const GRPC_INITIAL_METADATA: i32 = 4;
    /// gRPC trailing metadata.
    pub const GRPC_TRAILING_METADATA: i32 = 5;
    /// A callout's response headers.
    pub const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
    /// A callout's response trailers.
    pub const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;
}

/// `proxy_stream_type_t`.
pub mod stream {
    /// The request side.
    pub const HTTP_REQUEST: i32 = 0;
    /// The response side.
    pub const HTTP_RESPONSE: i32 = 1;
    /// TCP downstream.
    pub const DOWNSTREAM: i32 = 2;
    /// TCP upstream.
    pub const UPSTREAM: i32 = 3;
}

/// `proxy_metric_type_t`.
pub mod metric {
    /// Counter.
    pub const COUNTER: i32 = 0;
    /// Gauge.
    pub const GAUGE: i32 = 1;
    /// Histogram.
    pub const HISTOGRAM: i32 = 2;
}

/// Largest number of pairs accepted in a serialised map (cpp-host's limit).
pub const MAX_PAIRS: usize = 1024;
/// Largest serialised map accepted (cpp-host's limit).
pub const MAX_MAP_BYTES: usize = 1 << 20;

/// Serialises pairs: `u32 count`, `count × (u32 key_len, u32 value_len)`, then each key and
/// value followed by a NUL. An empty map is 4 zero bytes (never the 1-byte form, on which the
/// Rust SDK panics).
pub fn encode_pairs<'a, I>(pairs: I) -> Vec<u8>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
{
    let (n, data) = pairs.clone().fold((0usize, 0usize), |(n, d), (k, v)| {
        (n + 1, d + k.len() + v.len() + 2)
    });
    let mut out = Vec::with_capacity(4 + n * 8 + data);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// One key-value pair of a serialised map.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// Why a serialised map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    /// The bytes do not follow the format exactly.
    #[error("malformed serialised map")]
    Malformed,
    /// More pairs or bytes than allowed.
    #[error("serialised map too large")]
    TooLarge,
}

/// Parses a serialised map strictly, as cpp-host does: the total length must match, every
/// NUL must be present, at most [`MAX_PAIRS`] pairs and [`MAX_MAP_BYTES`] bytes. An empty
/// input (or 4 zero bytes, or the spec's single NUL) is the empty map.
pub fn decode_pairs(b: &[u8]) -> Result<Vec<Pair<'_>>, PairsError> {
    if b.is_empty() || b == [0] {
        return Ok(Vec::new());
    }
    if b.len() > MAX_MAP_BYTES {
        return Err(PairsError::TooLarge);
    }
    let u32_at = |i: usize| -> Result<usize, PairsError> {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
            .ok_or(PairsError::Malformed)
    };
    let n = u32_at(0)?;
    if n > MAX_PAIRS {
        return Err(PairsError::TooLarge);
    }
    let mut pos = 4 + n.checked_mul(8).ok_or(PairsError::Malformed)?;
    if pos > b.len() {
        return Err(PairsError::Malformed);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let kl = u32_at(4 + i * 8)?;
        let vl = u32_at(8 + i * 8)?;
        let k = b.get(pos..pos + kl).ok_or(PairsError::Malformed)?;
        if b.get(pos + kl) != Some(&0) {
            return Err(PairsError::Malformed);
        }
        pos += kl + 1;
        let v = b.get(pos..pos + vl).ok_or(PairsError::Malformed)?;
        if b.get(pos + vl) != Some(&0) {
            return Err(PairsError::Malformed);
        }
        pos += vl + 1;
        out.push((k, v));
    }
    if pos != b.len() {
        return Err(PairsError::Malformed);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's serialisation example (`abi-versions/v0.2.1/README.md`, "Serialization"),
    /// with the erratum fixed: values are ASCII, counts and lengths are u32 LE.
    #[test]
    fn spec_example_round_trip() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"b", b"22")];
        let enc = encode_pairs(pairs.iter().copied());
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0];
        want.extend_from_slice(b"a\x001\x00b\x0022\x00");
        assert_eq!(enc, want);
        assert_eq!(decode_pairs(&enc).expect("decodes"), pairs);
    }

    #[test]
    fn empty_forms() {
        assert_eq!(encode_pairs(std::iter::empty()), vec![0, 0, 0, 0]);
        assert!(decode_pairs(&[]).expect("empty").is_empty());
        assert!(decode_pairs(&[0]).expect("one nul").is_empty());
        assert!(decode_pairs(&[0, 0, 0, 0]).expect("zero count").is_empty());
    }

    /// cpp-host's `pairs_util_test` cases: a missing NUL, a short buffer, trailing bytes and
    /// a count past the buffer are all refused.
    #[test]
    fn strict_parsing() {
        let good = encode_pairs([(&b"k"[..], &b"v"[..])].into_iter());
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert_eq!(decode_pairs(&no_nul), Err(PairsError::Malformed));
        assert_eq!(
            decode_pairs(&good[..good.len() - 1]),
            Err(PairsError::Malformed)
        );
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(decode_pairs(&extra), Err(PairsError::Malformed));
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&5000u32.to_le_bytes());
        assert_eq!(decode_pairs(&huge), Err(PairsError::TooLarge));
        let mut count = good;
        count[0..4].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(decode_pairs(&count), Err(PairsError::Malformed));
    }

    #[test]
    fn version_markers() {
        let v = |names: &[&str]| AbiVersion::detect(names.iter().copied());
        assert_eq!(
            v(&["proxy_abi_version_0_2_0"]),
            Ok(Some(AbiVersion::V0_2_0))
        );
        assert_eq!(
            v(&["proxy_abi_version_0_1_0", "proxy_abi_version_0_2_1"]),
            Ok(Some(AbiVersion::V0_2_1))
        );
        assert_eq!(v(&["malloc"]), Ok(None));
        assert_eq!(
            v(&["proxy_abi_version_0_3_0"]),
            Err("proxy_abi_version_0_3_0".to_owned())
        );
    }
}
