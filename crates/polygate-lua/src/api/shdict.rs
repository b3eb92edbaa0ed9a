//! `ngx.shared.DICT`: process-wide dictionaries (shared by every worker thread), declared in
//! `gateway.lua.shared_dict` with a capacity. When a `set`, `add`, `replace` or `incr` does not
//! fit, expired entries and then the least recently used ones are evicted (an ordered index,
//! O(log n) per operation); `safe_set`/`safe_add` fail with "no memory" instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mlua::{Lua, MultiValue, Result as LuaResult, Table, UserData, UserDataMethods, Value};
use parking_lot::{Mutex, RwLock};
use polygate_model::ByteSize;

use super::lua_err;

/// A stored value.
#[derive(Clone, Debug, PartialEq)]
enum Stored {
    Str(Vec<u8>),
    Num(f64),
    Bool(bool),
}

impl Stored {
    fn size(&self) -> usize {
        match self {
            Stored::Str(s) => s.len(),
            _ => 8,
        }
    }
}

struct Entry {
    value: Stored,
    flags: u32,
    expires: Option<Instant>,
    used: u64,
}

/// Per-entry bookkeeping counted against the capacity (like nginx's node overhead).
const OVERHEAD: usize = 64;

/// One shared dictionary.
pub struct Dict {
    name: String,
    inner: Mutex<DictInner>,
}

struct DictInner {
    capacity: usize,
    used_bytes: usize,
    clock: u64,
    map: HashMap<Arc<[u8]>, Entry>,
    /// Keys by last use (`Entry::used`), oldest first.
    lru: BTreeMap<u64, Arc<[u8]>>,
}

impl DictInner {
    fn cost(key: &[u8], v: &Stored) -> usize {
        key.len() + v.size() + OVERHEAD
    }

    fn live(&self, key: &[u8], now: Instant) -> Option<&Entry> {
        self.map
            .get(key)
            .filter(|e| e.expires.is_none_or(|t| t > now))
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(e) = self.map.remove(key) {
            self.lru.remove(&e.used);
            self.used_bytes -= Self::cost(key, &e.value);
        }
    }

    /// Marks `key` as just used; returns its entry if it is live.
    fn touch(&mut self, key: &[u8], now: Instant) -> Option<&Entry> {
        self.clock += 1;
        let clock = self.clock;
        let e = self
            .map
            .get_mut(key)
            .filter(|e| e.expires.is_none_or(|t| t > now))?;
        let old = std::mem::replace(&mut e.used, clock);
        if let Some(k) = self.lru.remove(&old) {
            self.lru.insert(clock, k);
        }
        self.map.get(key)
    }

    /// Frees room for `need` bytes: expired entries among the 64 least recently used first,
    /// then (if `evict`) the least recently used ones. O(log n) per entry freed. Returns
    /// whether it fits and whether live entries were evicted.
    fn make_room(&mut self, need: usize, now: Instant, evict: bool) -> (bool, bool) {
        if self.used_bytes + need <= self.capacity {
            return (true, false);
        }
        let expired: Vec<Arc<[u8]>> = self
            .lru
            .values()
            .take(64)
            .filter(|k| {
                self.map
                    .get(&***k)
                    .is_some_and(|e| e.expires.is_some_and(|t| t <= now))
            })
            .cloned()
            .collect();
        for k in expired {
            self.remove(&k);
        }
        let mut forced = false;
        while evict && self.used_bytes + need > self.capacity {
            let Some(oldest) = self.lru.values().next().cloned() else {
                break;
            };
            self.remove(&oldest);
            forced = true;
        }
        (self.used_bytes + need <= self.capacity, forced)
    }

    fn store(
        &mut self,
        key: Vec<u8>,
        value: Stored,
        ttl: Option<Duration>,
        flags: u32,
        now: Instant,
    ) {
        self.remove(&key);
        self.clock += 1;
        self.used_bytes += Self::cost(&key, &value);
        let key: Arc<[u8]> = Arc::from(key);
        self.lru.insert(self.clock, key.clone());
        self.map.insert(
            key,
            Entry {
                value,
                flags,
                expires: ttl.map(|t| now + t),
                used: self.clock,
            },
        );
    }
}

fn registry() -> &'static RwLock<HashMap<String, Arc<Dict>>> {
    static R: OnceLock<RwLock<HashMap<String, Arc<Dict>>>> = OnceLock::new();
    R.get_or_init(|| RwLock::new(HashMap::new()))
}

/// Declares the configured dictionaries. Existing ones keep their contents (a changed
/// capacity applies to later writes); dictionaries dropped from the configuration stay
/// until the process exits, as in nginx where they need a restart.
pub(crate) fn declare(dicts: &BTreeMap<String, ByteSize>) {
    let mut reg = registry().write();
    for (name, size) in dicts {
        match reg.get(name) {
            Some(d) => d.inner.lock().capacity = size.0 as usize,
            None => {
                reg.insert(
                    name.clone(),
                    Arc::new(Dict {
                        name: name.clone(),
                        inner: Mutex::new(DictInner {
                            capacity: size.0 as usize,
                            used_bytes: 0,
                            clock: 0,
                            map: HashMap::new(),
                            lru: BTreeMap::new(),
                        }),
                    }),
                );
            }
        }
    }
}

/// The dictionary `name`, if declared.
pub fn dict(name: &str) -> Option<Arc<Dict>> {
    registry().read().get(name).cloned()
}

#[derive(Clone)]
struct DictRef(Arc<Dict>);

fn to_stored(v: &Value) -> LuaResult<Option<Stored>> {
    Ok(match v {
        Value::Nil => None,
        Value::String(s) => Some(Stored::Str(s.as_bytes().to_vec())),
        Value::Integer(i) => Some(Stored::Num(*i as f64)),
        Value::Number(n) => Some(Stored::Num(*n)),
        Value::Boolean(b) => Some(Stored::Bool(*b)),
        other => {
            return Err(lua_err(format!(
                "bad value type: {} (strings, numbers, booleans and nil are allowed)",
                other.type_name()
            )));
        }
    })
}

fn to_lua(lua: &Lua, v: &Stored) -> LuaResult<Value> {
    Ok(match v {
        Stored::Str(s) => Value::String(lua.create_string(s)?),
        Stored::Num(n) => {
            if n.fract() == 0.0 && n.abs() < 9.007e15 {
                Value::Integer(*n as i64)
            } else {
                Value::Number(*n)
            }
        }
        Stored::Bool(b) => Value::Boolean(*b),
    })
}

fn ttl_of(exptime: Option<f64>) -> LuaResult<Option<Duration>> {
    match exptime {
        None => Ok(None),
        Some(t) if t < 0.0 || !t.is_finite() => Err(lua_err("bad \"exptime\" argument")),
        Some(0.0) => Ok(None),
        // beyond the longest duration polygate handles (365 days): no expiry
        Some(t) if t > polygate_model::validate::MAX_SECONDS => Ok(None),
        Some(t) => Ok(Some(polygate_model::secs(t))),
    }
}

fn key_of(k: &Value) -> LuaResult<Vec<u8>> {
    let b = super::as_text(k).ok_or_else(|| lua_err("bad \"key\" argument"))?;
    if b.is_empty() {
        return Err(lua_err("bad \"key\" argument: empty key"));
    }
    if b.len() > 65535 {
        return Err(lua_err("bad \"key\" argument: key too long"));
    }
    Ok(b)
}

fn mv(v: Vec<Value>) -> MultiValue {
    MultiValue::from_vec(v)
}

fn s(lua: &Lua, t: &str) -> LuaResult<Value> {
    Ok(Value::String(lua.create_string(t)?))
}

#[derive(Clone, Copy, PartialEq)]
enum SetMode {
    Set,
    SafeSet,
    Add,
    SafeAdd,
    Replace,
}

fn set_impl(
    lua: &Lua,
    d: &Dict,
    mode: SetMode,
    (key, value, exptime, flags): (Value, Value, Option<f64>, Option<u32>),
) -> LuaResult<MultiValue> {
    let key = key_of(&key)?;
    let value = to_stored(&value)?;
    let ttl = ttl_of(exptime)?;
    let now = Instant::now();
    let mut g = d.inner.lock();
    let exists = g.live(&key, now).is_some();
    match mode {
        SetMode::Add | SetMode::SafeAdd if exists => {
            return Ok(mv(vec![
                Value::Boolean(false),
                s(lua, "exists")?,
                Value::Boolean(false),
            ]));
        }
        SetMode::Replace if !exists => {
            return Ok(mv(vec![
                Value::Boolean(false),
                s(lua, "not found")?,
                Value::Boolean(false),
            ]));
        }
        _ => {}
    }
    let Some(value) = value else {
        g.remove(&key);
        return Ok(mv(vec![
            Value::Boolean(true),
            Value::Nil,
            Value::Boolean(false),
        ]));
    };
    let old = g
        .map
        .get(key.as_slice())
        .map(|e| DictInner::cost(&key, &e.value))
        .unwrap_or(0);
    let need = DictInner::cost(&key, &value).saturating_sub(old);
    let evict = matches!(mode, SetMode::Set | SetMode::Add | SetMode::Replace);
    let (fits, forced) = g.make_room(need, now, evict);
    if !fits {
        return Ok(mv(vec![
            Value::Boolean(false),
            s(lua, "no memory")?,
            Value::Boolean(false),
        ]));
    }
    g.store(key, value, ttl, flags.unwrap_or(0), now);
    Ok(mv(vec![
        Value::Boolean(true),
        Value::Nil,
        Value::Boolean(forced),
    ]))
}

impl UserData for DictRef {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("get", |lua, this, key: Value| {
            let key = key_of(&key)?;
            let now = Instant::now();
            let mut g = this.0.inner.lock();
            match g.touch(&key, now) {
                Some(e) => {
                    let flags = e.flags;
                    let v = to_lua(lua, &e.value)?;
                    Ok(mv(if flags != 0 {
                        vec![v, Value::Integer(flags as i64)]
                    } else {
                        vec![v]
                    }))
                }
                None => Ok(mv(vec![Value::Nil])),
            }
        });
        m.add_method("get_stale", |lua, this, key: Value| {
            let key = key_of(&key)?;
            let now = Instant::now();
            let g = this.0.inner.lock();
            match g.map.get(key.as_slice()) {
                Some(e) => {
                    let stale = e.expires.is_some_and(|t| t <= now);
                    Ok(mv(vec![
                        to_lua(lua, &e.value)?,
                        if e.flags != 0 {
                            Value::Integer(e.flags as i64)
                        } else {
                            Value::Nil
                        },
                        Value::Boolean(stale),
                    ]))
                }
                None => Ok(mv(vec![Value::Nil])),
            }
        });
        m.add_method("set", |lua, this, a| {
            set_impl(lua, &this.0, SetMode::Set, a)
        });
        m.add_method("safe_set", |lua, this, a| {
            set_impl(lua, &this.0, SetMode::SafeSet, a)
        });
        m.add_method("add", |lua, this, a| {
            set_impl(lua, &this.0, SetMode::Add, a)
        });
        m.add_method("safe_add", |lua, this, a| {
            set_impl(lua, &this.0, SetMode::SafeAdd, a)
        });
        m.add_method("replace", |lua, this, a| {
            set_impl(lua, &this.0, SetMode::Replace, a)
        });
        m.add_method("delete", |_, this, key: Value| {
            let key = key_of(&key)?;
            this.0.inner.lock().remove(&key);
            Ok(())
        });
        m.add_method(
            "incr",
            |lua, this, (key, by, init, init_ttl): (Value, f64, Option<f64>, Option<f64>)| {
                let key = key_of(&key)?;
                let ttl = ttl_of(init_ttl)?;
                let now = Instant::now();
                let mut g = this.0.inner.lock();
                let current = g
                    .live(&key, now)
                    .map(|e| (e.value.clone(), e.expires, e.flags));
                let (new, expires, flags) = match current {
                    Some((Stored::Num(n), exp, flags)) => (n + by, exp, flags),
                    Some(_) => return Ok(mv(vec![Value::Nil, s(lua, "not a number")?])),
                    None => match init {
                        Some(i) => (i + by, ttl.map(|t| now + t), 0),
                        None => return Ok(mv(vec![Value::Nil, s(lua, "not found")?])),
                    },
                };
                let (fits, forced) = g.make_room(OVERHEAD + key.len() + 8, now, true);
                if !fits {
                    return Ok(mv(vec![Value::Nil, s(lua, "no memory")?]));
                }
                let ttl_left = expires.map(|t| t.saturating_duration_since(now));
                g.store(key, Stored::Num(new), ttl_left, flags, now);
                let v = to_lua(lua, &Stored::Num(new))?;
                Ok(mv(vec![v, Value::Nil, Value::Boolean(forced)]))
            },
        );
        m.add_method("ttl", |lua, this, key: Value| {
            let key = key_of(&key)?;
            let now = Instant::now();
            let g = this.0.inner.lock();
            match g.live(&key, now) {
                Some(e) => {
                    Ok(mv(vec![Value::Number(e.expires.map_or(0.0, |t| {
                        t.saturating_duration_since(now).as_secs_f64()
                    }))]))
                }
                None => Ok(mv(vec![Value::Nil, s(lua, "not found")?])),
            }
        });
        m.add_method("expire", |lua, this, (key, exptime): (Value, f64)| {
            let key = key_of(&key)?;
            let ttl = ttl_of(Some(exptime))?;
            let now = Instant::now();
            let mut g = this.0.inner.lock();
            if g.live(&key, now).is_none() {
                return Ok(mv(vec![Value::Nil, s(lua, "not found")?]));
            }
            if let Some(e) = g.map.get_mut(key.as_slice()) {
                e.expires = ttl.map(|t| now + t);
            }
            Ok(mv(vec![Value::Boolean(true)]))
        });
        m.add_method("flush_all", |_, this, ()| {
            let now = Instant::now();
            for e in this.0.inner.lock().map.values_mut() {
                e.expires = Some(now);
            }
            Ok(())
        });
        m.add_method("flush_expired", |_, this, max: Option<usize>| {
            let now = Instant::now();
            let mut g = this.0.inner.lock();
            let mut keys: Vec<Arc<[u8]>> = g
                .map
                .iter()
                .filter(|(_, e)| e.expires.is_some_and(|t| t <= now))
                .map(|(k, _)| k.clone())
                .collect();
            if let Some(m) = max.filter(|m| *m > 0) {
                keys.truncate(m);
            }
            let n = keys.len();
            for k in keys {
                g.remove(&k);
            }
            Ok(n)
        });
        m.add_method("get_keys", |lua, this, max: Option<usize>| {
            let now = Instant::now();
            let g = this.0.inner.lock();
            let t = lua.create_table()?;
            let max = max.unwrap_or(1024);
            for (k, _) in g
                .map
                .iter()
                .filter(|(_, e)| e.expires.is_none_or(|t| t > now))
            {
                if max != 0 && t.raw_len() >= max {
                    break;
                }
                t.raw_push(lua.create_string(k)?)?;
            }
            Ok(t)
        });
        m.add_method("capacity", |_, this, ()| Ok(this.0.inner.lock().capacity));
        m.add_method("free_space", |_, this, ()| {
            let g = this.0.inner.lock();
            Ok(g.capacity.saturating_sub(g.used_bytes))
        });
        m.add_meta_method("__tostring", |_, this, ()| {
            Ok(format!("ngx.shared.{}", this.0.name))
        });
    }
}

pub(crate) fn install(lua: &Lua, ngx: &Table) -> LuaResult<()> {
    let shared = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set(
        "__index",
        lua.create_function(|lua, (t, name): (Table, String)| match dict(&name) {
            Some(d) => {
                let ud = lua.create_userdata(DictRef(d))?;
                t.raw_set(name, ud.clone())?;
                Ok(Value::UserData(ud))
            }
            None => Ok(Value::Nil),
        })?,
    )?;
    shared.set_metatable(Some(mt))?;
    ngx.set("shared", shared)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner(capacity: usize) -> DictInner {
        DictInner {
            capacity,
            used_bytes: 0,
            clock: 0,
            map: HashMap::new(),
            lru: BTreeMap::new(),
        }
    }

    #[test]
    fn evicts_least_recently_used_and_expired_first() {
        let now = Instant::now();
        let one = DictInner::cost(b"k0", &Stored::Num(0.0));
        let mut d = inner(one * 3);
        for k in [b"k0", b"k1", b"k2"] {
            let (fits, forced) = d.make_room(one, now, true);
            assert!(fits && !forced);
            d.store(k.to_vec(), Stored::Num(1.0), None, 0, now);
        }
        // k0 used recently: k1 is the least recently used
        assert!(d.touch(b"k0", now).is_some());
        let (fits, forced) = d.make_room(one, now, true);
        assert!(fits && forced);
        d.store(b"k3".to_vec(), Stored::Num(1.0), None, 0, now);
        assert!(d.map.contains_key(b"k0".as_slice()));
        assert!(!d.map.contains_key(b"k1".as_slice()));
        assert_eq!(d.map.len(), d.lru.len());
        // an expired entry makes room without forcing anything out
        d.map.get_mut(b"k2".as_slice()).unwrap().expires = Some(now);
        let (fits, forced) = d.make_room(one, now, false);
        assert!(fits && !forced);
        assert!(!d.map.contains_key(b"k2".as_slice()));
        // safe mode never evicts live entries
        d.store(b"k4".to_vec(), Stored::Num(1.0), None, 0, now);
        let (fits, _) = d.make_room(one, now, false);
        assert!(!fits);
        assert_eq!(d.used_bytes, one * 3);
    }
}
