//! `ngx.re`: match, find, gmatch, sub, gsub on Rust's `regex` engine (bytes mode).
//!
//! Differences from PCRE (see docs/lua.md): no look-around and no backreferences (the
//! pattern fails to compile with a clear error); without the `u` flag `\w`, `\d`, `\s` and
//! case folding are ASCII-only, as PCRE without UTF mode; the `j`, `o`, `d`, `D`, `J` flags are
//! accepted and have nothing to do (compiled regexes are always cached per worker).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Result as LuaResult, Table, Value};
use regex::bytes::{Captures, Regex, RegexBuilder};

use super::as_text;

thread_local! {
    static CACHE: RefCell<HashMap<(String, String), Arc<Compiled>>> = RefCell::new(HashMap::new());
}

const CACHE_MAX: usize = 1024;

struct Compiled {
    re: Regex,
    anchored: bool,
    names: Vec<(usize, String)>,
}

fn compile(pattern: &str, opts: &str) -> Result<Arc<Compiled>, String> {
    let key = (pattern.to_owned(), opts.to_owned());
    if let Some(c) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return Ok(c);
    }
    let mut b = RegexBuilder::new(pattern);
    let mut unicode = false;
    let mut anchored = false;
    for f in opts.chars() {
        match f {
            'i' => {
                b.case_insensitive(true);
            }
            'm' => {
                b.multi_line(true);
            }
            's' => {
                b.dot_matches_new_line(true);
            }
            'x' => {
                b.ignore_whitespace(true);
            }
            'u' | 'U' => unicode = true,
            'a' => anchored = true,
            'j' | 'o' | 'd' | 'D' | 'J' => {}
            other => return Err(format!("unknown flag \"{other}\" (flags: \"{opts}\")")),
        }
    }
    b.unicode(unicode);
    b.size_limit(8 << 20);
    let re = match b.build() {
        Ok(re) => re,
        // a pattern with non-ASCII literals needs Unicode mode in this engine
        Err(_) if !unicode => b
            .unicode(true)
            .build()
            .map_err(|e| format!("failed to compile regex \"{pattern}\": {e}"))?,
        Err(e) => return Err(format!("failed to compile regex \"{pattern}\": {e}")),
    };
    let names = re
        .capture_names()
        .enumerate()
        .filter_map(|(i, n)| n.map(|n| (i, n.to_owned())))
        .collect();
    let c = Arc::new(Compiled {
        re,
        anchored,
        names,
    });
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, c.clone());
    });
    Ok(c)
}

fn captures_table(lua: &Lua, c: &Compiled, caps: &Captures<'_>) -> LuaResult<Table> {
    let t = lua.create_table()?;
    for i in 0..caps.len() {
        let v = match caps.get(i) {
            Some(m) => Value::String(lua.create_string(m.as_bytes())?),
            None => Value::Boolean(false),
        };
        t.raw_set(i, v)?;
    }
    for (i, name) in &c.names {
        let v = match caps.get(*i) {
            Some(m) => Value::String(lua.create_string(m.as_bytes())?),
            None => Value::Boolean(false),
        };
        t.raw_set(name.as_str(), v)?;
    }
    Ok(t)
}

/// The first match at or after byte `start` (and exactly at `start` with the `a` flag).
fn find_at<'h>(c: &Compiled, subject: &'h [u8], start: usize) -> Option<Captures<'h>> {
    if start > subject.len() {
        return None;
    }
    let caps = c.re.captures_at(subject, start)?;
    if c.anchored && caps.get(0).is_some_and(|m| m.start() != start) {
        return None;
    }
    Some(caps)
}

fn opts_of(v: Option<mlua::String>) -> LuaResult<String> {
    Ok(match v {
        Some(s) => s.to_str()?.to_owned(),
        None => String::new(),
    })
}

/// The first match at or after `ctx.pos` (1-based, default 1); moves `ctx.pos` past it.
fn find_from_ctx<'h>(
    c: &Compiled,
    subject: &'h [u8],
    ctx: &Option<Table>,
) -> LuaResult<Option<Captures<'h>>> {
    let start = match ctx {
        Some(t) => match t.get::<Option<i64>>("pos")? {
            Some(p) if p > 1 => (p - 1) as usize,
            _ => 0,
        },
        None => 0,
    };
    let caps = find_at(c, subject, start);
    if let (Some(t), Some(m)) = (ctx, caps.as_ref().and_then(|c| c.get(0))) {
        t.set("pos", m.end() as i64 + 1)?;
    }
    Ok(caps)
}

/// Bytes to step over after an empty match at `at` (one byte, or one UTF-8 character with the
/// `u` flag).
fn step_len(subject: &[u8], at: usize, unicode: bool) -> usize {
    if unicode { utf8_len(subject[at]) } else { 1 }
}

fn err_ret(lua: &Lua, nils: usize, e: String) -> LuaResult<MultiValue> {
    let mut v: Vec<Value> = vec![Value::Nil; nils];
    v.push(Value::String(lua.create_string(e)?));
    Ok(MultiValue::from_vec(v))
}

/// Expands a `sub`/`gsub` replacement template (`$0`, `$1`, `${1}`, `$$`).
fn expand(template: &[u8], caps: &Captures<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    let mut i = 0;
    while i < template.len() {
        let c = template[i];
        if c != b'$' {
            out.push(c);
            i += 1;
            continue;
        }
        i += 1;
        let (num, next) = match template.get(i) {
            Some(b'$') => {
                out.push(b'$');
                i += 1;
                continue;
            }
            Some(b'{') => {
                let end = template[i..]
                    .iter()
                    .position(|&b| b == b'}')
                    .ok_or("invalid capturing variable name: missing }")?;
                let digits = &template[i + 1..i + end];
                (digits, i + end + 1)
            }
            Some(d) if d.is_ascii_digit() => {
                let len = template[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                (&template[i..i + len], i + len)
            }
            _ => return Err("invalid capturing variable name".into()),
        };
        let n: usize = std::str::from_utf8(num)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("invalid capturing variable name")?;
        if let Some(m) = caps.get(n) {
            out.extend_from_slice(m.as_bytes());
        }
        i = next;
    }
    Ok(())
}

fn substitute(
    lua: &Lua,
    args: (mlua::String, mlua::String, Value, Option<mlua::String>),
    global: bool,
) -> LuaResult<MultiValue> {
    let (subject, pattern, replace, opts) = args;
    let opts = opts_of(opts)?;
    let c = match compile(&pattern.to_str()?, &opts) {
        Ok(c) => c,
        Err(e) => return err_ret(lua, 2, e),
    };
    let subject = subject.as_bytes();
    let template = match &replace {
        Value::Function(_) => None,
        other => match as_text(other) {
            Some(t) => Some(t),
            None => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #3 (string or function expected, got {})",
                    other.type_name()
                )));
            }
        },
    };
    let mut out = Vec::with_capacity(subject.len());
    let mut last = 0;
    let mut n = 0i64;
    let mut pos = 0;
    while let Some(caps) = find_at(&c, &subject, pos) {
        let Some(m) = caps.get(0) else { break };
        out.extend_from_slice(&subject[last..m.start()]);
        match (&template, &replace) {
            (Some(t), _) => {
                if let Err(e) = expand(t, &caps, &mut out) {
                    return err_ret(lua, 2, e);
                }
            }
            (None, Value::Function(f)) => {
                let t = captures_table(lua, &c, &caps)?;
                let r: Value = f.call(t)?;
                match as_text(&r) {
                    Some(s) => out.extend_from_slice(&s),
                    None if r.is_nil() => {}
                    None => {
                        return Err(mlua::Error::runtime(
                            "the replace function must return a string",
                        ));
                    }
                }
            }
            _ => {}
        }
        last = m.end();
        n += 1;
        if !global {
            break;
        }
        pos = if m.start() == m.end() {
            // step over an empty match (one byte, or one UTF-8 character)
            if m.end() >= subject.len() {
                break;
            }
            let step = step_len(&subject, m.end(), opts.contains('u'));
            out.extend_from_slice(&subject[m.end()..(m.end() + step).min(subject.len())]);
            last = (m.end() + step).min(subject.len());
            last
        } else {
            m.end()
        };
    }
    out.extend_from_slice(&subject[last.min(subject.len())..]);
    Ok(MultiValue::from_vec(vec![
        Value::String(lua.create_string(&out)?),
        Value::Integer(n),
    ]))
}

fn utf8_len(b: u8) -> usize {
    match b {
        0xF0..=0xF7 => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

pub(crate) fn install(lua: &Lua, ngx: &Table) -> LuaResult<()> {
    let re = lua.create_table()?;
    re.set(
        "match",
        lua.create_function(
            |lua,
             (subject, pattern, opts, ctx, _res): (
                mlua::String,
                mlua::String,
                Option<mlua::String>,
                Option<Table>,
                Option<Table>,
            )| {
                let c = match compile(&pattern.to_str()?, &opts_of(opts)?) {
                    Ok(c) => c,
                    Err(e) => return err_ret(lua, 1, e),
                };
                let subject = subject.as_bytes();
                match find_from_ctx(&c, &subject, &ctx)? {
                    Some(caps) => Ok(MultiValue::from_vec(vec![Value::Table(captures_table(
                        lua, &c, &caps,
                    )?)])),
                    None => Ok(MultiValue::from_vec(vec![Value::Nil])),
                }
            },
        )?,
    )?;
    re.set(
        "find",
        lua.create_function(
            |lua,
             (subject, pattern, opts, ctx, nth): (
                mlua::String,
                mlua::String,
                Option<mlua::String>,
                Option<Table>,
                Option<i64>,
            )| {
                let c = match compile(&pattern.to_str()?, &opts_of(opts)?) {
                    Ok(c) => c,
                    Err(e) => return err_ret(lua, 2, e),
                };
                let subject = subject.as_bytes();
                let Some(caps) = find_from_ctx(&c, &subject, &ctx)? else {
                    return Ok(MultiValue::from_vec(vec![Value::Nil]));
                };
                let n = nth.unwrap_or(0).max(0) as usize;
                match caps.get(n) {
                    Some(m) => Ok(MultiValue::from_vec(vec![
                        Value::Integer(m.start() as i64 + 1),
                        Value::Integer(m.end() as i64),
                    ])),
                    None => Ok(MultiValue::from_vec(vec![Value::Nil])),
                }
            },
        )?,
    )?;
    re.set(
        "gmatch",
        lua.create_function(
            |lua, (subject, pattern, opts): (mlua::String, mlua::String, Option<mlua::String>)| {
                let opts = opts_of(opts)?;
                let c = match compile(&pattern.to_str()?, &opts) {
                    Ok(c) => c,
                    Err(e) => return err_ret(lua, 1, e),
                };
                let subject = subject.as_bytes().to_vec();
                let unicode = opts.contains('u');
                let mut pos = 0usize;
                let mut done = false;
                let iter: Function = lua.create_function_mut(move |lua, ()| {
                    if done {
                        return Ok(Value::Nil);
                    }
                    let Some(caps) = find_at(&c, &subject, pos) else {
                        done = true;
                        return Ok(Value::Nil);
                    };
                    let Some(m) = caps.get(0) else {
                        done = true;
                        return Ok(Value::Nil);
                    };
                    pos = if m.start() == m.end() {
                        if m.end() >= subject.len() {
                            done = true;
                            m.end()
                        } else {
                            m.end() + step_len(&subject, m.end(), unicode)
                        }
                    } else {
                        m.end()
                    };
                    Ok(Value::Table(captures_table(lua, &c, &caps)?))
                })?;
                Ok(MultiValue::from_vec(vec![Value::Function(iter)]))
            },
        )?,
    )?;
    re.set(
        "sub",
        lua.create_function(|lua, args| substitute(lua, args, false))?,
    )?;
    re.set(
        "gsub",
        lua.create_function(|lua, args| substitute(lua, args, true))?,
    )?;
    ngx.set("re", re)?;
    Ok(())
}
