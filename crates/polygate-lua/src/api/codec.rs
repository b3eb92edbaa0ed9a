//! Encodings and digests: base64, md5, sha1, hmac_sha1, crc32, URI escaping, query args.

use base64::Engine as _;
use hmac::Mac as _;
use md5::Digest as _;
use mlua::{Lua, Result as LuaResult, Table, Value};
use polygate_core::ctx::percent_decode;

use super::{as_text, lua_err};

pub(crate) fn install(lua: &Lua, ngx: &Table) -> LuaResult<()> {
    ngx.set(
        "encode_base64",
        lua.create_function(|_, (s, no_pad): (mlua::String, Option<bool>)| {
            let b = s.as_bytes();
            Ok(if no_pad == Some(true) {
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(&b[..])
            } else {
                base64::engine::general_purpose::STANDARD.encode(&b[..])
            })
        })?,
    )?;
    ngx.set(
        "decode_base64",
        lua.create_function(|lua, s: mlua::String| {
            let b = s.as_bytes();
            // nginx accepts input with or without padding
            let trimmed: &[u8] = {
                let mut end = b.len();
                while end > 0 && b[end - 1] == b'=' {
                    end -= 1;
                }
                &b[..end]
            };
            match base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed) {
                Ok(v) => Ok(Value::String(lua.create_string(&v)?)),
                Err(_) => Ok(Value::Nil),
            }
        })?,
    )?;
    ngx.set(
        "md5",
        lua.create_function(|_, s: mlua::String| {
            let d = md5::Md5::digest(&s.as_bytes()[..]);
            Ok(hex(&d))
        })?,
    )?;
    ngx.set(
        "md5_bin",
        lua.create_function(|lua, s: mlua::String| {
            lua.create_string(md5::Md5::digest(&s.as_bytes()[..]))
        })?,
    )?;
    ngx.set(
        "sha1_bin",
        lua.create_function(|lua, s: mlua::String| {
            lua.create_string(sha1::Sha1::digest(&s.as_bytes()[..]))
        })?,
    )?;
    ngx.set(
        "hmac_sha1",
        lua.create_function(|lua, (key, s): (mlua::String, mlua::String)| {
            let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&key.as_bytes())
                .map_err(|e| lua_err(e.to_string()))?;
            mac.update(&s.as_bytes());
            lua.create_string(mac.finalize().into_bytes())
        })?,
    )?;
    ngx.set(
        "crc32_short",
        lua.create_function(|_, s: mlua::String| Ok(crc32fast::hash(&s.as_bytes()) as i64))?,
    )?;
    ngx.set(
        "crc32_long",
        lua.create_function(|_, s: mlua::String| Ok(crc32fast::hash(&s.as_bytes()) as i64))?,
    )?;
    ngx.set(
        "escape_uri",
        lua.create_function(|_, (v, kind): (Value, Option<i64>)| {
            let b = text_arg("ngx.escape_uri", &v)?;
            Ok(escape(&b, kind.unwrap_or(2)))
        })?,
    )?;
    ngx.set(
        "unescape_uri",
        lua.create_function(|lua, v: Value| {
            let b = text_arg("ngx.unescape_uri", &v)?;
            lua.create_string(percent_decode(&b))
        })?,
    )?;
    ngx.set(
        "encode_args",
        lua.create_function(|lua, t: Table| encode_args(lua, &t))?,
    )?;
    ngx.set(
        "decode_args",
        lua.create_function(|lua, (s, max): (String, Option<i64>)| {
            decode_args(lua, &s, max.unwrap_or(100))
        })?,
    )?;
    Ok(())
}

fn text_arg(api: &str, v: &Value) -> LuaResult<Vec<u8>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        other => as_text(other)
            .ok_or_else(|| lua_err(format!("{api}: string expected, got {}", other.type_name()))),
    }
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

/// `ngx.escape_uri(s, type)`: type 2 (default) escapes everything but `A-Za-z0-9-._~`;
/// type 0 (a whole URI) also keeps the reserved characters `!#$&'()*+,/:;=?@[]`.
pub(crate) fn escape(b: &[u8], kind: i64) -> String {
    let keep = |c: u8| {
        c.is_ascii_alphanumeric()
            || matches!(c, b'-' | b'.' | b'_' | b'~')
            || (kind == 0 && b"!#$&'()*+,/:;=?@[]".contains(&c))
    };
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if keep(c) {
            s.push(c as char);
        } else {
            s.push('%');
            s.push_str(&hex(&[c]).to_ascii_uppercase());
        }
    }
    s
}

/// `ngx.encode_args`: keys sorted; `true` gives a bare key, `false` is skipped, arrays repeat
/// the key.
pub(crate) fn encode_args(_lua: &Lua, t: &Table) -> LuaResult<String> {
    let mut pairs: Vec<(Vec<u8>, Value)> = Vec::new();
    for kv in t.pairs::<Value, Value>() {
        let (k, v) = kv?;
        let k = as_text(&k).ok_or_else(|| {
            lua_err(format!(
                "bad argument #1 to 'encode_args' (bad key type: {})",
                k.type_name()
            ))
        })?;
        pairs.push((k, v));
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    let mut push = |k: &[u8], v: Option<&[u8]>| {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&escape(k, 2));
        if let Some(v) = v {
            out.push('=');
            out.push_str(&escape(v, 2));
        }
    };
    for (k, v) in pairs {
        match v {
            Value::Boolean(true) => push(&k, None),
            Value::Boolean(false) => {}
            Value::Table(list) => {
                for item in list.sequence_values::<Value>() {
                    match item? {
                        Value::Boolean(true) => push(&k, None),
                        Value::Boolean(false) => {}
                        other => {
                            let s = as_text(&other).ok_or_else(|| {
                                lua_err("bad argument #1 to 'encode_args' (bad value type)")
                            })?;
                            push(&k, Some(&s));
                        }
                    }
                }
            }
            other => {
                let s = as_text(&other).ok_or_else(|| {
                    lua_err(format!(
                        "bad argument #1 to 'encode_args' (bad argument type: {})",
                        other.type_name()
                    ))
                })?;
                push(&k, Some(&s));
            }
        }
    }
    Ok(out)
}

/// `ngx.decode_args` / `get_uri_args`: repeated keys become arrays, bare keys `true`.
pub(crate) fn decode_args(lua: &Lua, q: &str, max: i64) -> LuaResult<Table> {
    let t = lua.create_table()?;
    let mut n = 0;
    for part in q.split('&') {
        if part.is_empty() {
            continue;
        }
        if max > 0 && n >= max {
            break;
        }
        n += 1;
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (part, None),
        };
        let key = lua.create_string(percent_decode(k.as_bytes()))?;
        let val = match v {
            Some(v) => Value::String(lua.create_string(percent_decode(v.as_bytes()))?),
            None => Value::Boolean(true),
        };
        super::push_multi(lua, &t, key, val)?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape(b"a b/c?d=e", 2), "a%20b%2Fc%3Fd%3De");
        assert_eq!(escape(b"a b/c?d=e", 0), "a%20b/c?d=e");
        assert_eq!(percent_decode(b"a%20b+c%2"), b"a b c%2");
        assert_eq!(percent_decode(b"%41%zz"), b"A%zz");
    }
}
