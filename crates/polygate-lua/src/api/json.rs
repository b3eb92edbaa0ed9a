//! `cjson` and `cjson.safe`, with lua-cjson's conventions: `cjson.null` (= `ngx.null`),
//! empty tables encode as `{}` unless marked with `cjson.empty_array_mt`/`cjson.array_mt`,
//! `/` is escaped as `\/` by default, excessively sparse arrays are an error, integral
//! numbers print without a fraction. `cjson.safe` returns `nil, err` instead of raising.

use std::sync::Arc;

use mlua::{LightUserData, Lua, MultiValue, Result as LuaResult, Table, Value};
use parking_lot::Mutex;

use super::{fmt_number, lua_err};

#[derive(Clone, Copy)]
struct Opts {
    empty_table_as_object: bool,
    escape_slash: bool,
    max_depth: usize,
    decode_array_mt: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            empty_table_as_object: true,
            escape_slash: true,
            max_depth: 1000,
            decode_array_mt: false,
        }
    }
}

/// A sentinel light userdata for `cjson.empty_array` (any unique non-null address).
fn empty_array_ud() -> LightUserData {
    static MARK: u8 = 0;
    LightUserData(std::ptr::addr_of!(MARK) as *mut std::ffi::c_void)
}

struct Encoder<'a> {
    out: Vec<u8>,
    opts: Opts,
    array_mt: &'a Table,
    empty_array_mt: &'a Table,
}

impl Encoder<'_> {
    fn string(&mut self, b: &[u8]) {
        self.out.push(b'"');
        for &c in b {
            match c {
                b'"' => self.out.extend_from_slice(b"\\\""),
                b'\\' => self.out.extend_from_slice(b"\\\\"),
                b'/' if self.opts.escape_slash => self.out.extend_from_slice(b"\\/"),
                b'\n' => self.out.extend_from_slice(b"\\n"),
                b'\r' => self.out.extend_from_slice(b"\\r"),
                b'\t' => self.out.extend_from_slice(b"\\t"),
                0x08 => self.out.extend_from_slice(b"\\b"),
                0x0c => self.out.extend_from_slice(b"\\f"),
                c if c < 0x20 || c == 0x7f => {
                    self.out
                        .extend_from_slice(format!("\\u{:04x}", c).as_bytes());
                }
                c => self.out.push(c),
            }
        }
        self.out.push(b'"');
    }

    fn number(&mut self, n: f64) -> LuaResult<()> {
        if !n.is_finite() {
            return Err(lua_err(
                "Cannot serialise number: must not be NaN or Infinity",
            ));
        }
        self.out.extend_from_slice(fmt_number(n).as_bytes());
        Ok(())
    }

    fn value(&mut self, v: &Value, depth: usize) -> LuaResult<()> {
        match v {
            Value::Nil => self.out.extend_from_slice(b"null"),
            Value::LightUserData(p) if p.0.is_null() => self.out.extend_from_slice(b"null"),
            Value::LightUserData(p) if *p == empty_array_ud() => self.out.extend_from_slice(b"[]"),
            Value::Boolean(b) => self
                .out
                .extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Integer(i) => self.out.extend_from_slice(i.to_string().as_bytes()),
            Value::Number(n) => self.number(*n)?,
            Value::String(s) => self.string(&s.as_bytes()),
            Value::Table(t) => self.table(t, depth + 1)?,
            other => {
                return Err(lua_err(format!(
                    "Cannot serialise {}: type not supported",
                    other.type_name()
                )));
            }
        }
        Ok(())
    }

    fn table(&mut self, t: &Table, depth: usize) -> LuaResult<()> {
        if depth > self.opts.max_depth {
            return Err(lua_err(format!(
                "Cannot serialise, excessive nesting ({depth})"
            )));
        }
        let mt = t.metatable();
        let marked_array = mt
            .as_ref()
            .is_some_and(|m| m == self.array_mt || m == self.empty_array_mt);
        // classify: array when every key is a positive integer
        let mut max = 0usize;
        let mut count = 0usize;
        let mut is_array = true;
        for kv in t.pairs::<Value, Value>() {
            let (k, _) = kv?;
            count += 1;
            match k {
                Value::Integer(i) if i >= 1 => max = max.max(i as usize),
                Value::Number(n) if n >= 1.0 && n.fract() == 0.0 => max = max.max(n as usize),
                _ => {
                    is_array = false;
                }
            }
        }
        if count == 0 {
            if marked_array || !self.opts.empty_table_as_object {
                self.out.extend_from_slice(b"[]");
            } else {
                self.out.extend_from_slice(b"{}");
            }
            return Ok(());
        }
        if is_array {
            if max > count * 2 && max > 10 {
                return Err(lua_err("Cannot serialise table: excessively sparse array"));
            }
            self.out.push(b'[');
            for i in 1..=max {
                if i > 1 {
                    self.out.push(b',');
                }
                let v: Value = t.raw_get(i)?;
                self.value(&v, depth)?;
            }
            self.out.push(b']');
            return Ok(());
        }
        self.out.push(b'{');
        let mut first = true;
        for kv in t.pairs::<Value, Value>() {
            let (k, v) = kv?;
            if !first {
                self.out.push(b',');
            }
            first = false;
            match &k {
                Value::String(s) => self.string(&s.as_bytes()),
                Value::Integer(i) => self.string(i.to_string().as_bytes()),
                Value::Number(n) => self.string(fmt_number(*n).as_bytes()),
                other => {
                    return Err(lua_err(format!(
                        "Cannot serialise {}: table key must be a number or string",
                        other.type_name()
                    )));
                }
            }
            self.out.push(b':');
            self.value(&v, depth)?;
        }
        self.out.push(b'}');
        Ok(())
    }
}

fn to_lua(lua: &Lua, v: serde_json::Value, opts: Opts, array_mt: &Table) -> LuaResult<Value> {
    Ok(match v {
        serde_json::Value::Null => Value::NULL,
        serde_json::Value::Bool(b) => Value::Boolean(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) if (i as f64) as i64 == i && i.unsigned_abs() < (1u64 << 53) => {
                Value::Integer(i)
            }
            _ => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(lua.create_string(&s)?),
        serde_json::Value::Array(a) => {
            let t = lua.create_table_with_capacity(a.len(), 0)?;
            for (i, x) in a.into_iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, x, opts, array_mt)?)?;
            }
            if opts.decode_array_mt {
                t.set_metatable(Some(array_mt.clone()))?;
            }
            Value::Table(t)
        }
        serde_json::Value::Object(o) => {
            let t = lua.create_table_with_capacity(0, o.len())?;
            for (k, x) in o {
                t.raw_set(k, to_lua(lua, x, opts, array_mt)?)?;
            }
            Value::Table(t)
        }
    })
}

/// Encodes a value with the default options (for responses made from tables).
pub(crate) fn encode_plain(lua: &Lua, v: &Value) -> LuaResult<Vec<u8>> {
    let am = shared_table(lua, "polygate.cjson.array_mt")?;
    let em = shared_table(lua, "polygate.cjson.empty_array_mt")?;
    let mut e = Encoder {
        out: Vec::new(),
        opts: Opts {
            escape_slash: false,
            ..Opts::default()
        },
        array_mt: &am,
        empty_array_mt: &em,
    };
    e.value(v, 0)?;
    Ok(e.out)
}

/// A JSON document as a Lua value (`null` → `cjson.null`).
pub(crate) fn json_to_lua(lua: &Lua, v: serde_json::Value) -> LuaResult<Value> {
    let am = shared_table(lua, "polygate.cjson.array_mt")?;
    to_lua(lua, v, Opts::default(), &am)
}

fn module(lua: &Lua, safe: bool) -> LuaResult<Table> {
    let m = lua.create_table()?;
    let opts = Arc::new(Mutex::new(Opts::default()));
    let array_mt: Table = shared_table(lua, "polygate.cjson.array_mt")?;
    let empty_array_mt: Table = shared_table(lua, "polygate.cjson.empty_array_mt")?;
    m.set("null", Value::NULL)?;
    m.set("empty_array", Value::LightUserData(empty_array_ud()))?;
    m.set("array_mt", array_mt.clone())?;
    m.set("empty_array_mt", empty_array_mt.clone())?;
    m.set("_NAME", if safe { "cjson.safe" } else { "cjson" })?;
    m.set("_VERSION", "2.1.0.13")?;
    {
        let opts = opts.clone();
        let (am, em) = (array_mt.clone(), empty_array_mt.clone());
        m.set(
            "encode",
            lua.create_function(move |lua, v: Value| {
                let mut e = Encoder {
                    out: Vec::new(),
                    opts: *opts.lock(),
                    array_mt: &am,
                    empty_array_mt: &em,
                };
                match e.value(&v, 0) {
                    Ok(()) => Ok(MultiValue::from_vec(vec![Value::String(
                        lua.create_string(&e.out)?,
                    )])),
                    Err(err) if safe => Ok(MultiValue::from_vec(vec![
                        Value::Nil,
                        Value::String(lua.create_string(err.to_string())?),
                    ])),
                    Err(err) => Err(err),
                }
            })?,
        )?;
    }
    {
        let opts = opts.clone();
        let am = array_mt.clone();
        m.set(
            "decode",
            lua.create_function(move |lua, s: mlua::String| {
                let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&s.as_bytes());
                match parsed {
                    Ok(v) => Ok(MultiValue::from_vec(vec![to_lua(
                        lua,
                        v,
                        *opts.lock(),
                        &am,
                    )?])),
                    Err(e) => {
                        let msg = format!("Expected a JSON value: {e}");
                        if safe {
                            Ok(MultiValue::from_vec(vec![
                                Value::Nil,
                                Value::String(lua.create_string(msg)?),
                            ]))
                        } else {
                            Err(lua_err(msg))
                        }
                    }
                }
            })?,
        )?;
    }
    macro_rules! flag {
        ($name:literal, $field:ident) => {{
            let opts = opts.clone();
            m.set(
                $name,
                lua.create_function(move |_, v: Option<Value>| {
                    let mut o = opts.lock();
                    if let Some(v) = v {
                        o.$field = match v {
                            Value::Boolean(b) => b,
                            Value::String(s) => &*s.to_str()? == "on",
                            _ => false,
                        };
                    }
                    Ok(o.$field)
                })?,
            )?;
        }};
    }
    flag!("encode_empty_table_as_object", empty_table_as_object);
    flag!("encode_escape_forward_slash", escape_slash);
    flag!("decode_array_with_array_mt", decode_array_mt);
    {
        let opts = opts.clone();
        m.set(
            "encode_max_depth",
            lua.create_function(move |_, d: Option<usize>| {
                let mut o = opts.lock();
                if let Some(d) = d {
                    o.max_depth = d.max(1);
                }
                Ok(o.max_depth)
            })?,
        )?;
    }
    for noop in [
        "decode_max_depth",
        "encode_number_precision",
        "encode_sparse_array",
        "encode_keep_buffer",
        "encode_invalid_numbers",
        "decode_invalid_numbers",
    ] {
        m.set(noop, lua.create_function(|_, _: mlua::MultiValue| Ok(()))?)?;
    }
    m.set(
        "new",
        lua.create_function(move |lua, ()| module(lua, safe))?,
    )?;
    Ok(m)
}

fn shared_table(lua: &Lua, name: &str) -> LuaResult<Table> {
    match lua.named_registry_value::<Value>(name)? {
        Value::Table(t) => Ok(t),
        _ => {
            let t = lua.create_table()?;
            lua.set_named_registry_value(name, t.clone())?;
            Ok(t)
        }
    }
}

/// Registers `cjson` and `cjson.safe` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> LuaResult<()> {
    preload.set(
        "cjson",
        lua.create_function(|lua, _: mlua::MultiValue| module(lua, false))?,
    )?;
    preload.set(
        "cjson.safe",
        lua.create_function(|lua, _: mlua::MultiValue| module(lua, true))?,
    )?;
    Ok(())
}
