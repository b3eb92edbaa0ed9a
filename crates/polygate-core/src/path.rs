//! Request path normalisation, as nginx computes `$uri` (`ngx_http_parse_complex_uri`):
//! percent-escapes decoded, `.` and `..` segments resolved, runs of `/` merged (nginx's
//! `merge_slashes`, on by default). A decoded `/` or `.` takes part in that resolution, so
//! `/a%2F..%2Fb` is `/b`, as in nginx.
//!
//! A path that cannot be normalised is refused (the request gets 400): an invalid `%` escape,
//! a NUL byte, a `..` that climbs above the root, a path that does not start with `/`, or
//! decoded bytes that are not UTF-8 (nginx passes those through; polygate's routes and
//! variables are text, so it refuses them: see `docs/compatibility.md`).
//!
//! The reverse direction, [`escape_path`], percent-encodes what nginx's `ngx_escape_uri`
//! (`NGX_ESCAPE_URI`) does when a rewritten path is sent upstream.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path does not start with '/'")]
    NotAbsolute,
    /// `%` not followed by two hex digits.
    #[error("invalid percent-escape in the path")]
    BadEscape,
    /// A NUL byte (raw or `%00`).
    #[error("NUL byte in the path")]
    Nul,
    /// A `..` segment above the root.
    #[error("'..' above the root of the path")]
    AboveRoot,
    /// The decoded path is not UTF-8.
    #[error("the decoded path is not valid UTF-8")]
    NotUtf8,
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// True when `raw` is already in normal form, so that [`normalize`] would return it unchanged
/// (the common case; checked without allocating).
fn is_plain(raw: &[u8], merge_slashes: bool) -> bool {
    if raw.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for (i, &b) in raw.iter().enumerate() {
        match b {
            b'%' | 0 => return false,
            b'/' if prev == b'/' && merge_slashes => return false,
            b'.' if prev == b'/' => {
                // "/." followed by end, '/', or ".": a dot segment
                match raw.get(i + 1) {
                    None | Some(b'/') | Some(b'.') => return false,
                    _ => {}
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

/// Normalises the path part of a request target (no query). Returns it borrowed when it is
/// already normal.
pub fn normalize(raw: &str, merge_slashes: bool) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if is_plain(bytes, merge_slashes) {
        return Ok(Cow::Borrowed(raw));
    }
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // decode first, then resolve segments over the decoded bytes
    let mut dec = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            dec.push(h << 4 | l);
            i += 3;
        } else {
            dec.push(b);
            i += 1;
        }
    }
    if dec.contains(&0) {
        return Err(PathError::Nul);
    }
    let mut out: Vec<u8> = Vec::with_capacity(dec.len());
    // segments between slashes; `out` always starts with '/'
    let mut segs = dec.split(|&c| c == b'/').skip(1).peekable();
    while let Some(seg) = segs.next() {
        let last = segs.peek().is_none();
        match seg {
            b"." => {
                if last {
                    out.push(b'/');
                }
            }
            b".." => {
                // drop the last segment of out
                if out.is_empty() {
                    return Err(PathError::AboveRoot);
                }
                match out.iter().rposition(|&c| c == b'/') {
                    Some(p) => out.truncate(p),
                    None => return Err(PathError::AboveRoot),
                }
                if last {
                    out.push(b'/');
                }
            }
            b"" => {
                if last {
                    // trailing slash (one more, unless merging and there is one already)
                    if !(merge_slashes && out.ends_with(b"/")) {
                        out.push(b'/');
                    }
                } else if !merge_slashes {
                    out.push(b'/');
                }
            }
            s => {
                out.push(b'/');
                out.extend_from_slice(s);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| PathError::NotUtf8)
}

/// Percent-encodes a path for the request line the way nginx's `ngx_escape_uri` with
/// `NGX_ESCAPE_URI` does: space, `#`, `%`, `?`, control bytes and bytes above 0x7e.
pub fn escape_path(path: &str) -> Cow<'_, str> {
    let needs = |b: u8| b <= 0x20 || b >= 0x7f || matches!(b, b'#' | b'%' | b'?');
    if !path.bytes().any(needs) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 16);
    for b in path.bytes() {
        if needs(b) {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        } else {
            out.push(char::from(b));
        }
    }
    Cow::Owned(out)
}

/// Percent-encodes control bytes (0x00–0x1f, 0x7f) and spaces, leaving everything else (query
/// delimiters included) as it is: what may go into a request line from a query string.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let needs = |b: u8| b <= 0x20 || b == 0x7f;
    if !s.bytes().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        let b = u32::from(c);
        if b <= 0x20 || b == 0x7f {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p, true).map(Cow::into_owned)
    }

    #[test]
    fn plain_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a.b/c.", "/a/.hidden", "/a/b/", "/x..y/"] {
            assert!(matches!(normalize(p, true), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    /// Cases from nginx's URI parser (`ngx_http_parse_complex_uri`) behaviour: the value of
    /// `$uri` for each request target.
    #[test]
    fn nginx_uri_cases() {
        let ok = [
            ("/%61dmin/x", "/admin/x"),
            ("/x/../admin/x", "/admin/x"),
            ("/x/./admin", "/x/admin"),
            ("//admin//x", "/admin/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/a%2F..%2Fb", "/b"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/%2E/b", "/a/b"),
            ("/caf%C3%A9", "/café"),
            ("/a%20b", "/a b"),
            ("/a%3Fb", "/a?b"),
            ("/a/b/../../c/", "/c/"),
            ("/.", "/"),
            ("/./", "/"),
            ("/a/...", "/a/..."),
        ];
        for (raw, want) in ok {
            assert_eq!(n(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(n("/.."), Err(PathError::AboveRoot));
        assert_eq!(n("/..%2F"), Err(PathError::AboveRoot));
        assert_eq!(n("/a/../.."), Err(PathError::AboveRoot));
        assert_eq!(n("/%2e%2e/etc/passwd"), Err(PathError::AboveRoot));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape));
        assert_eq!(n("/a%00b"), Err(PathError::Nul));
        assert_eq!(n("/a%FFb"), Err(PathError::NotUtf8));
        assert_eq!(n("a/b"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn merge_slashes_off_keeps_empty_segments() {
        assert_eq!(normalize("//a//b", false).as_deref(), Ok("//a//b"));
        // found by the path fuzzer: a decoded path ending in "//" kept both slashes only
        // when it needed no decoding
        assert_eq!(normalize("/%3F//", false).as_deref(), Ok("/?//"));
        assert_eq!(normalize("/a//", false).as_deref(), Ok("/a//"));
        assert_eq!(normalize("/a//", true).as_deref(), Ok("/a/"));
        assert_eq!(normalize("/a//../b", false).as_deref(), Ok("/a/b"));
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_path("/a b/c?d#e%f"), "/a%20b/c%3Fd%23e%25f");
        assert_eq!(escape_path("/café"), "/caf%C3%A9");
        assert_eq!(escape_path("/x\r\ny"), "/x%0D%0Ay");
        assert!(matches!(escape_path("/plain/p-1_~"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a=1&b=\r\n"), "a=1&b=%0D%0A");
    }

    #[test]
    fn normal_output_is_a_fixed_point() {
        for p in [
            "/%61dmin/x",
            "/a/./b/../c//d",
            "/a%2F..%2Fb/",
            "/x/y/z/../.",
        ] {
            let once = n(p).unwrap();
            assert_eq!(n(&once).unwrap(), once, "{p}");
        }
    }
}
