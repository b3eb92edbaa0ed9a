//! The route table: an immutable, persistent (structurally shared) index.
//!
//! Matching order follows APISIX's `radixtree_host_uri` router: routes whose host matches
//! (exact hosts before wildcards) are preferred over routes without a host; then an exact URI
//! beats a prefix, a longer prefix beats a shorter one; then higher `priority` wins; then the
//! older route. `methods`, `remote_addrs` and `vars` filter candidates.
//!
//! Updating one route clones the table in O(1) (persistent maps from `imbl`) and touches only
//! the buckets of that route's URIs, so a change costs O(log n + bucket size), never a rebuild.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::expr::{Expr, ExprError, VarSource};

/// What a route matches on, before compilation.
#[derive(Debug, Clone, Default)]
pub struct RouteSpec {
    /// Route id (unique in the table).
    pub id: String,
    /// URI patterns: `/exact`, `/prefix*`, `/user/:id`, `/files/*path`.
    pub uris: Vec<String>,
    /// Host patterns (`*.example.com`); empty = any host.
    pub hosts: Vec<String>,
    /// Methods; empty = any.
    pub methods: Vec<String>,
    /// Client addresses or CIDRs; empty = any.
    pub remote_addrs: Vec<String>,
    /// `vars` rule list (JSON), if any.
    pub vars: Option<serde_json::Value>,
    /// Higher first.
    pub priority: i64,
    /// How URIs and hosts are matched (`apisix.router.http`).
    pub mode: RouterMode,
}

/// APISIX's HTTP routers (`apisix.router.http`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RouterMode {
    /// `radixtree_host_uri` (APISIX's default): routes whose host matches are preferred over
    /// routes without a host; `:name` in a URI is literal text.
    #[default]
    HostUri,
    /// `radixtree_uri`: the URI decides; hosts only filter; `:name` is literal text.
    Uri,
    /// `radixtree_uri_with_parameter`: as `radixtree_uri`, and `:name` / `*name` segments
    /// match path parameters.
    UriWithParameter,
}

/// A route compilation error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A `vars` expression is invalid; `path` is below `vars`.
    #[error("vars{}: {}", .0.path, .0.message)]
    Vars(ExprError),
    /// A `remote_addrs` entry is not an IP or CIDR.
    #[error("remote_addrs: {0:?} is not an IP or CIDR")]
    RemoteAddr(String),
    /// An unknown method.
    #[error("methods: unknown method {0:?}")]
    Method(String),
    /// A malformed URI pattern.
    #[error("uri: {0}")]
    Uri(String),
}

/// The request attributes routing looks at.
pub struct MatchInput<'a> {
    /// Path without query string.
    pub path: &'a str,
    /// Host without port, lower case; `None` when absent.
    pub host: Option<&'a str>,
    /// Request method.
    pub method: &'a str,
    /// Client address.
    pub remote_addr: Option<IpAddr>,
    /// Variables for `vars`.
    pub vars: &'a dyn VarSource,
}

/// The result of a match: the route and the URI parameters it captured.
pub struct Matched<'t, T> {
    /// The route entry.
    pub entry: &'t Arc<Entry<T>>,
    /// `:name` / `*name` captures.
    pub params: Vec<(Arc<str>, String)>,
}

#[derive(Debug)]
enum Seg {
    Static(String),
    Param(Arc<str>),
    CatchAll(Arc<str>),
}

#[derive(Debug)]
enum UriKind {
    Exact,
    Prefix,
    /// Parameterised: segments to verify after the prefix lookup.
    Params(Vec<Seg>),
}

#[derive(Debug)]
struct UriPat {
    key: Arc<str>,
    kind: UriKind,
}

#[derive(Debug)]
enum HostPat {
    Any,
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

/// A compiled route with its payload.
#[derive(Debug)]
pub struct Entry<T> {
    /// Route id.
    pub id: Arc<str>,
    /// Priority.
    pub priority: i64,
    seq: u64,
    uris: Vec<UriPat>,
    hosts: Vec<HostPat>,
    methods: u16,
    remote_addrs: Vec<IpNet>,
    vars: Option<Expr>,
    /// `radixtree_host_uri`: a matching host ranks the route (otherwise hosts only filter).
    host_first: bool,
    /// What the caller attached (e.g. the resolved plugin chain and upstream).
    pub data: T,
}

const METHOD_NAMES: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];

fn method_bit(m: &str) -> Option<u16> {
    METHOD_NAMES.iter().position(|x| *x == m).map(|i| 1u16 << i)
}

fn compile_uri(u: &str, with_parameter: bool) -> Result<UriPat, RouteError> {
    if u == "*" {
        return Ok(UriPat {
            key: Arc::from(""),
            kind: UriKind::Prefix,
        });
    }
    let has_param = with_parameter
        && u.split('/')
            .any(|s| s.starts_with(':') || (s.starts_with('*') && s.len() > 1));
    if has_param {
        let mut segs = Vec::new();
        let parts: Vec<&str> = u.split('/').collect();
        let n = parts.len();
        for (i, s) in parts.iter().enumerate() {
            if i > 0 {
                segs.push(Seg::Static("/".into()));
            }
            if let Some(name) = s.strip_prefix(':') {
                if name.is_empty() {
                    return Err(RouteError::Uri(format!("{u:?}: empty parameter name")));
                }
                segs.push(Seg::Param(Arc::from(name)));
            } else if let Some(name) = s.strip_prefix('*') {
                if i + 1 != n {
                    return Err(RouteError::Uri(format!(
                        "{u:?}: '*{name}' must be the last segment"
                    )));
                }
                segs.push(Seg::CatchAll(Arc::from(if name.is_empty() {
                    ":ext"
                } else {
                    name
                })));
            } else if !s.is_empty() {
                segs.push(Seg::Static((*s).to_owned()));
            }
        }
        // merge adjacent statics and take the leading static text as the index key
        let mut merged: Vec<Seg> = Vec::new();
        for s in segs {
            match (merged.last_mut(), s) {
                (Some(Seg::Static(a)), Seg::Static(b)) => a.push_str(&b),
                (_, s) => merged.push(s),
            }
        }
        let key = match merged.first() {
            Some(Seg::Static(s)) => s.clone(),
            _ => String::new(),
        };
        if !key.is_empty() {
            merged.remove(0);
        }
        return Ok(UriPat {
            key: Arc::from(key),
            kind: UriKind::Params(merged),
        });
    }
    if let Some(p) = u.strip_suffix('*') {
        Ok(UriPat {
            key: Arc::from(p),
            kind: UriKind::Prefix,
        })
    } else {
        Ok(UriPat {
            key: Arc::from(u),
            kind: UriKind::Exact,
        })
    }
}

fn match_params(segs: &[Seg], mut rest: &str, out: &mut Vec<(Arc<str>, String)>) -> bool {
    for (i, s) in segs.iter().enumerate() {
        match s {
            Seg::Static(t) => {
                let Some(r) = rest.strip_prefix(t.as_str()) else {
                    return false;
                };
                rest = r;
            }
            Seg::Param(name) => {
                let end = rest.find('/').unwrap_or(rest.len());
                if end == 0 {
                    return false;
                }
                out.push((name.clone(), rest[..end].to_owned()));
                rest = &rest[end..];
            }
            Seg::CatchAll(name) => {
                debug_assert_eq!(i + 1, segs.len());
                out.push((name.clone(), rest.to_owned()));
                return true;
            }
        }
    }
    rest.is_empty()
}

impl<T> Entry<T> {
    /// Compiles a route specification.
    pub fn compile(spec: &RouteSpec, data: T) -> Result<Entry<T>, RouteError> {
        let mut uris = Vec::with_capacity(spec.uris.len());
        for u in &spec.uris {
            uris.push(compile_uri(u, spec.mode == RouterMode::UriWithParameter)?);
        }
        let hosts = spec
            .hosts
            .iter()
            .map(|h| {
                let h = h.to_ascii_lowercase();
                if h == "*" {
                    HostPat::Any
                } else if let Some(s) = h.strip_prefix('*') {
                    HostPat::Suffix(s.to_owned())
                } else {
                    HostPat::Exact(h)
                }
            })
            .collect();
        let mut methods = 0u16;
        for m in &spec.methods {
            methods |= method_bit(m).ok_or_else(|| RouteError::Method(m.clone()))?;
        }
        let mut remote_addrs = Vec::with_capacity(spec.remote_addrs.len());
        for a in &spec.remote_addrs {
            remote_addrs.push(
                polygate_model::validate::parse_cidr(a)
                    .ok_or_else(|| RouteError::RemoteAddr(a.clone()))?,
            );
        }
        let vars = match &spec.vars {
            Some(v) => Some(Expr::compile_vars(v).map_err(RouteError::Vars)?),
            None => None,
        };
        Ok(Entry {
            id: Arc::from(spec.id.as_str()),
            priority: spec.priority,
            seq: 0,
            uris,
            hosts,
            methods,
            remote_addrs,
            vars,
            host_first: spec.mode == RouterMode::HostUri,
            data,
        })
    }

    /// 0 = exact host, 1 = wildcard host, 2 = no host condition; `None` = host mismatch.
    /// Outside `radixtree_host_uri` every matching route ranks 0.
    fn host_rank(&self, host: Option<&str>) -> Option<u8> {
        if self.hosts.is_empty() {
            return Some(if self.host_first { 2 } else { 0 });
        }
        if !self.host_first {
            let host = host?;
            return self
                .hosts
                .iter()
                .any(|h| match h {
                    HostPat::Exact(e) => e == host,
                    HostPat::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
                    HostPat::Any => true,
                })
                .then_some(0);
        }
        let host = host?;
        let mut best = None;
        for h in &self.hosts {
            let r = match h {
                HostPat::Exact(e) if e == host => Some(0),
                HostPat::Suffix(s) if host.len() > s.len() && host.ends_with(s.as_str()) => Some(1),
                HostPat::Any => Some(1),
                _ => None,
            };
            if let Some(r) = r {
                best = Some(best.map_or(r, |b: u8| b.min(r)));
            }
        }
        best
    }

    fn filters_hold(&self, input: &MatchInput<'_>) -> bool {
        if self.methods != 0 {
            match method_bit(input.method) {
                Some(b) if self.methods & b != 0 => {}
                _ => return false,
            }
        }
        if !self.remote_addrs.is_empty() {
            let Some(ip) = input.remote_addr else {
                return false;
            };
            if !self.remote_addrs.iter().any(|n| n.contains(&ip)) {
                return false;
            }
        }
        if let Some(v) = &self.vars
            && !v.eval(input.vars)
        {
            return false;
        }
        true
    }
}

type Bucket<T> = Arc<Vec<Arc<Entry<T>>>>;

/// The best candidate so far: (host rank, uri rank, entry, params).
type Best<'t, T> = (u8, usize, &'t Arc<Entry<T>>, Vec<(Arc<str>, String)>);

/// An immutable route table. Cloning is O(1); updates produce a new table sharing structure.
pub struct Router<T> {
    exact: imbl::HashMap<Arc<str>, Bucket<T>>,
    prefix: imbl::HashMap<Arc<str>, Bucket<T>>,
    /// Distinct prefix key lengths (longest first when iterated in reverse) with their counts.
    prefix_lens: imbl::OrdMap<usize, usize>,
    routes: imbl::HashMap<Arc<str>, Arc<Entry<T>>>,
    host_routes: usize,
    next_seq: u64,
}

impl<T> Clone for Router<T> {
    fn clone(&self) -> Self {
        Router {
            exact: self.exact.clone(),
            prefix: self.prefix.clone(),
            prefix_lens: self.prefix_lens.clone(),
            routes: self.routes.clone(),
            host_routes: self.host_routes,
            next_seq: self.next_seq,
        }
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            exact: imbl::HashMap::new(),
            prefix: imbl::HashMap::new(),
            prefix_lens: imbl::OrdMap::new(),
            routes: imbl::HashMap::new(),
            host_routes: 0,
            next_seq: 0,
        }
    }
}

fn bucket_order<T>(a: &Arc<Entry<T>>, b: &Arc<Entry<T>>) -> std::cmp::Ordering {
    b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq))
}

impl<T> Router<T> {
    /// Builds a table from compiled entries in one pass (order = age for tie breaks).
    pub fn build(entries: Vec<Entry<T>>) -> Router<T> {
        let mut exact: HashMap<Arc<str>, Vec<Arc<Entry<T>>>> = HashMap::new();
        let mut prefix: HashMap<Arc<str>, Vec<Arc<Entry<T>>>> = HashMap::new();
        let mut routes = imbl::HashMap::new();
        let mut host_routes = 0;
        let mut seq = 0;
        for mut e in entries {
            e.seq = seq;
            seq += 1;
            if !e.hosts.is_empty() {
                host_routes += 1;
            }
            let e = Arc::new(e);
            for u in &e.uris {
                let map = if matches!(u.kind, UriKind::Exact) {
                    &mut exact
                } else {
                    &mut prefix
                };
                map.entry(u.key.clone()).or_default().push(e.clone());
            }
            if let Some(old) = routes.insert(e.id.clone(), e)
                && !old.hosts.is_empty()
            {
                host_routes -= 1;
            }
        }
        let mut prefix_lens = imbl::OrdMap::new();
        for k in prefix.keys() {
            *prefix_lens.entry(k.len()).or_insert(0) += 1;
        }
        let finish = |m: HashMap<Arc<str>, Vec<Arc<Entry<T>>>>| {
            m.into_iter()
                .map(|(k, mut v)| {
                    v.sort_by(bucket_order);
                    (k, Arc::new(v))
                })
                .collect::<imbl::HashMap<_, _>>()
        };
        Router {
            exact: finish(exact),
            prefix: finish(prefix),
            prefix_lens,
            routes,
            host_routes,
            next_seq: seq,
        }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<Entry<T>>> {
        self.routes.get(id)
    }

    /// Iterates over all routes (unordered).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry<T>>> {
        self.routes.values()
    }

    /// Adds or replaces one route. Cost: O(log n) plus the size of the touched URI buckets.
    pub fn upsert(&mut self, mut entry: Entry<T>) {
        let old = self.remove(&entry.id.clone());
        // keep the age of a replaced route so tie-breaking does not change under edits
        entry.seq = match &old {
            Some(o) => o.seq,
            None => {
                self.next_seq += 1;
                self.next_seq
            }
        };
        if !entry.hosts.is_empty() {
            self.host_routes += 1;
        }
        let e = Arc::new(entry);
        for u in &e.uris {
            let is_exact = matches!(u.kind, UriKind::Exact);
            let map = if is_exact {
                &mut self.exact
            } else {
                &mut self.prefix
            };
            let mut v: Vec<Arc<Entry<T>>> = map
                .get(&u.key)
                .map(|b| b.as_ref().clone())
                .unwrap_or_default();
            if v.is_empty() && !is_exact {
                *self.prefix_lens.entry(u.key.len()).or_insert(0) += 1;
            }
            if !v.iter().any(|x| Arc::ptr_eq(x, &e)) {
                v.push(e.clone());
                v.sort_by(bucket_order);
            }
            map.insert(u.key.clone(), Arc::new(v));
        }
        self.routes.insert(e.id.clone(), e);
    }

    /// Removes one route by id, returning it.
    pub fn remove(&mut self, id: &str) -> Option<Arc<Entry<T>>> {
        let old = self.routes.remove(id)?;
        if !old.hosts.is_empty() {
            self.host_routes -= 1;
        }
        for u in &old.uris {
            let is_exact = matches!(u.kind, UriKind::Exact);
            let map = if is_exact {
                &mut self.exact
            } else {
                &mut self.prefix
            };
            let Some(b) = map.get(&u.key) else { continue };
            let v: Vec<Arc<Entry<T>>> = b
                .iter()
                .filter(|x| !Arc::ptr_eq(x, &old))
                .cloned()
                .collect();
            if v.is_empty() {
                map.remove(&u.key);
                if !is_exact {
                    let gone = match self.prefix_lens.get_mut(&u.key.len()) {
                        Some(c) => {
                            *c -= 1;
                            *c == 0
                        }
                        None => false,
                    };
                    if gone {
                        self.prefix_lens.remove(&u.key.len());
                    }
                }
            } else {
                map.insert(u.key.clone(), Arc::new(v));
            }
        }
        Some(old)
    }

    /// Finds the best route for a request.
    pub fn find<'t>(&'t self, input: &MatchInput<'_>) -> Option<Matched<'t, T>> {
        let early_exit = self.host_routes == 0;
        // (host rank, uri rank, entry, params)
        let mut best: Option<Best<'t, T>> = None;
        let path = input.path;
        let mut uri_rank = 0usize;

        let consider = |bucket: &'t Bucket<T>,
                        uri_rank: usize,
                        prefix_key: Option<&str>,
                        best: &mut Option<Best<'t, T>>|
         -> bool {
            for e in bucket.iter() {
                let Some(hr) = e.host_rank(input.host) else {
                    continue;
                };
                if let Some((bh, bu, be, _)) = best.as_ref()
                    && (hr, uri_rank, std::cmp::Reverse(e.priority), e.seq)
                        >= (*bh, *bu, std::cmp::Reverse(be.priority), be.seq)
                {
                    continue;
                }
                let mut params = Vec::new();
                if let Some(key) = prefix_key {
                    // bucket of a prefix key: verify the kind of each pattern with this key
                    let rest = &path[key.len()..];
                    let ok = e.uris.iter().any(|u| {
                        &*u.key == key
                            && match &u.kind {
                                UriKind::Exact => false,
                                UriKind::Prefix => true,
                                UriKind::Params(segs) => {
                                    params.clear();
                                    match_params(segs, rest, &mut params)
                                }
                            }
                    });
                    if !ok {
                        continue;
                    }
                }
                if !e.filters_hold(input) {
                    continue;
                }
                *best = Some((hr, uri_rank, e, params));
                if early_exit || hr == 0 {
                    return true;
                }
            }
            false
        };

        if let Some(b) = self.exact.get(path)
            && consider(b, uri_rank, None, &mut best)
        {
            return best.map(|(_, _, entry, params)| Matched { entry, params });
        }
        for (&len, _) in self.prefix_lens.iter().rev() {
            if len > path.len() || !path.is_char_boundary(len) {
                continue;
            }
            uri_rank += 1;
            if let Some(b) = self.prefix.get(&path[..len])
                && consider(b, uri_rank, Some(&path[..len]), &mut best)
            {
                break;
            }
        }
        best.map(|(_, _, entry, params)| Matched { entry, params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::borrow::Cow;

    struct NoVars;
    impl VarSource for NoVars {
        fn var(&self, name: &str) -> Option<Cow<'_, str>> {
            (name == "arg_v").then_some(Cow::Borrowed("2"))
        }
    }

    fn spec(id: &str, uri: &str) -> RouteSpec {
        RouteSpec {
            id: id.into(),
            uris: vec![uri.into()],
            ..Default::default()
        }
    }

    fn find(r: &Router<()>, path: &str, host: Option<&str>, method: &str) -> Option<String> {
        let input = MatchInput {
            path,
            host,
            method,
            remote_addr: Some("10.0.0.1".parse().unwrap()),
            vars: &NoVars,
        };
        r.find(&input).map(|m| m.entry.id.to_string())
    }

    fn build(specs: Vec<RouteSpec>) -> Router<()> {
        Router::build(
            specs
                .iter()
                .map(|s| Entry::compile(s, ()).unwrap())
                .collect(),
        )
    }

    #[test]
    fn exact_prefix_param() {
        let param = |id: &str, uri: &str| RouteSpec {
            mode: RouterMode::UriWithParameter,
            ..spec(id, uri)
        };
        let r = build(vec![
            spec("root", "/*"),
            spec("foo", "/foo/*"),
            spec("fooexact", "/foo/bar"),
            param("user", "/user/:id"),
            param("files", "/files/*path"),
        ]);
        assert_eq!(
            find(&r, "/foo/bar", None, "GET").as_deref(),
            Some("fooexact")
        );
        assert_eq!(find(&r, "/foo/baz", None, "GET").as_deref(), Some("foo"));
        assert_eq!(find(&r, "/x", None, "GET").as_deref(), Some("root"));
        assert_eq!(find(&r, "/user/42", None, "GET").as_deref(), Some("user"));
        assert_eq!(find(&r, "/user/42/x", None, "GET").as_deref(), Some("root"));
        assert_eq!(
            find(&r, "/files/a/b", None, "GET").as_deref(),
            Some("files")
        );
    }

    /// APISIX's default router (`radixtree_host_uri`) and `radixtree_uri` take `:name`
    /// literally (`apisix/core/router.lua`: no parameter matching); a host-bound route wins
    /// over a longer host-less one only in `radixtree_host_uri`.
    #[test]
    fn router_modes() {
        let r = build(vec![spec("user", "/user/:id")]);
        assert_eq!(find(&r, "/user/42", None, "GET"), None);
        assert_eq!(find(&r, "/user/:id", None, "GET").as_deref(), Some("user"));
        for mode in [RouterMode::HostUri, RouterMode::Uri] {
            let mut host = RouteSpec {
                mode,
                ..spec("host", "/*")
            };
            host.hosts = vec!["a.example.com".into()];
            let long = RouteSpec {
                mode,
                ..spec("long", "/api/*")
            };
            let r = build(vec![host, long]);
            let want = if mode == RouterMode::HostUri {
                "host"
            } else {
                "long"
            };
            assert_eq!(
                find(&r, "/api/x", Some("a.example.com"), "GET").as_deref(),
                Some(want),
                "{mode:?}"
            );
            assert_eq!(find(&r, "/x", Some("b.example.com"), "GET"), None);
        }
    }

    #[test]
    fn priority_host_method_vars() {
        let mut hi = spec("hi", "/p");
        hi.priority = 10;
        let mut meth = spec("post", "/p");
        meth.priority = 20;
        meth.methods = vec!["POST".into()];
        let mut host = spec("host", "/*");
        host.hosts = vec!["*.example.com".into()];
        let mut vars = spec("vars", "/p");
        vars.priority = 30;
        vars.vars = Some(json!([["arg_v", "==", "3"]]));
        let r = build(vec![spec("lo", "/p"), hi, meth, host, vars]);
        assert_eq!(find(&r, "/p", None, "GET").as_deref(), Some("hi"));
        assert_eq!(find(&r, "/p", None, "POST").as_deref(), Some("post"));
        assert_eq!(
            find(&r, "/p", Some("a.example.com"), "GET").as_deref(),
            Some("host")
        );
        assert_eq!(
            find(&r, "/p", Some("example.com"), "GET").as_deref(),
            Some("hi")
        );
    }

    #[test]
    fn incremental_update() {
        let mut r = build(vec![spec("a", "/a"), spec("b", "/b*")]);
        let before = r.clone();
        r.upsert(Entry::compile(&spec("a", "/a2"), ()).unwrap());
        r.remove("b");
        assert_eq!(find(&r, "/a", None, "GET"), None);
        assert_eq!(find(&r, "/a2", None, "GET").as_deref(), Some("a"));
        assert_eq!(find(&r, "/bcd", None, "GET"), None);
        // the old snapshot is untouched
        assert_eq!(find(&before, "/a", None, "GET").as_deref(), Some("a"));
        assert_eq!(find(&before, "/bcd", None, "GET").as_deref(), Some("b"));
    }

    #[test]
    fn remote_addrs() {
        let mut s = spec("net", "/n");
        s.remote_addrs = vec!["10.0.0.0/8".into()];
        let mut s2 = spec("other", "/n");
        s2.remote_addrs = vec!["192.168.0.0/16".into()];
        let r = build(vec![s2, s]);
        assert_eq!(find(&r, "/n", None, "GET").as_deref(), Some("net"));
    }
}
