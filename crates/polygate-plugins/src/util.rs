//! Helpers shared by the built-in plugins: typed configuration parsing with key paths,
//! `$var` templates, header operations.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use polygate_core::ConfError;
use polygate_router::VarSource;
use serde::Deserialize;

pub use polygate_core::parse_conf;

/// A string with `$name` / `${name}` variable references.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Var(String),
}

impl Template {
    /// Parses a template.
    pub fn parse(s: &str) -> Template {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = s;
        while let Some(pos) = rest.find('$') {
            lit.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            let (name, consumed) = if let Some(inner) = after.strip_prefix('{') {
                match inner.find('}') {
                    Some(end) => (&inner[..end], end + 2),
                    None => ("", 0),
                }
            } else {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            };
            if name.is_empty() {
                lit.push('$');
                rest = after;
                continue;
            }
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            parts.push(Part::Var(name.to_owned()));
            rest = &after[consumed..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Template { parts }
    }

    /// True when the template has no variables.
    pub fn is_static(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Lit(_)))
    }

    /// Renders with the request's variables (unset variables render as empty).
    pub fn render(&self, vars: &dyn VarSource) -> String {
        self.render_with(vars, |v| v.to_owned())
    }

    /// Renders, and counts the variables that had a value (APISIX's `resolve_var`
    /// `n_resolved`: limit keys made only of unset variables fall back to the client address).
    pub fn render_counted(&self, vars: &dyn VarSource) -> (String, usize) {
        let mut out = String::new();
        let mut n = 0;
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(v) => {
                    if let Some(val) = vars.var(v) {
                        n += 1;
                        out.push_str(&val);
                    }
                }
            }
        }
        (out, n)
    }

    /// Renders, passing each variable's value through `escape` first.
    pub fn render_with(&self, vars: &dyn VarSource, escape: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => out.push_str(s),
                Part::Var(v) => {
                    if let Some(val) = vars.var(v) {
                        out.push_str(&escape(&val));
                    }
                }
            }
        }
        out
    }
}

/// APISIX's header operations: `{add: {}, set: {}, remove: []}`, or the older flat map
/// `{name: value}` meaning set (an empty value removes). `add` is a map in proxy-rewrite and
/// a list of `"Name: value"` strings in response-rewrite; both are accepted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderOpsConf {
    #[serde(default)]
    add: AddConf,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum AddConf {
    Map(BTreeMap<String, String>),
    List(Vec<String>),
}

impl Default for AddConf {
    fn default() -> Self {
        AddConf::Map(BTreeMap::new())
    }
}

/// `"Name: value"` as response-rewrite's `headers.add` takes it (APISIX matches
/// `^([^:\s]+)\s*:\s*([^:]+)$`).
fn split_header_line(line: &str) -> Option<(&str, &str)> {
    let (name, value) = line.split_once(':')?;
    let name = name.trim_end();
    let value = value.trim_start();
    let ok_name = !name.is_empty() && !name.chars().any(char::is_whitespace);
    (ok_name && !value.is_empty() && !value.contains(':')).then_some((name, value))
}

/// Compiled header operations.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    add: Vec<(HeaderName, Template)>,
    set: Vec<(HeaderName, Template)>,
    remove: Vec<HeaderName>,
}

fn header_name(n: &str, path: &str) -> Result<HeaderName, ConfError> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| ConfError::at(path, format!("invalid header name {n:?}")))
}

impl HeaderOps {
    /// Parses the configuration at key `key` (for error paths).
    pub fn parse(v: &serde_json::Value, key: &str) -> Result<HeaderOps, ConfError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ConfError::at(key, "must be an object"))?;
        let structured = obj
            .keys()
            .any(|k| k == "add" || k == "set" || k == "remove");
        let conf: HeaderOpsConf = if structured {
            parse_conf(v).map_err(|e| ConfError::at(e.path_under(key), e.message))?
        } else {
            let mut set = BTreeMap::new();
            let mut remove = Vec::new();
            for (k, val) in obj {
                let s = match val {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return Err(ConfError::at(format!("{key}.{k}"), "must be a string")),
                };
                if s.is_empty() {
                    remove.push(k.clone());
                } else {
                    set.insert(k.clone(), s);
                }
            }
            HeaderOpsConf {
                add: AddConf::default(),
                set,
                remove,
            }
        };
        let mut ops = HeaderOps::default();
        match conf.add {
            AddConf::Map(m) => {
                for (k, v) in m {
                    let p = format!("{key}.add.{k}");
                    check_value(&v, &p)?;
                    ops.add.push((header_name(&k, &p)?, Template::parse(&v)));
                }
            }
            AddConf::List(l) => {
                for (i, line) in l.iter().enumerate() {
                    let p = format!("{key}.add[{i}]");
                    let (k, v) = split_header_line(line).ok_or_else(|| {
                        ConfError::at(p.clone(), format!("{line:?} is not \"Name: value\""))
                    })?;
                    check_value(v, &p)?;
                    ops.add.push((header_name(k, &p)?, Template::parse(v)));
                }
            }
        }
        for (k, v) in conf.set {
            let p = format!("{key}.set.{k}");
            check_value(&v, &p)?;
            ops.set.push((header_name(&k, &p)?, Template::parse(&v)));
        }
        for k in conf.remove {
            ops.remove.push(header_name(&k, &format!("{key}.remove"))?);
        }
        Ok(ops)
    }

    /// Applies add, then set, then remove. A value that renders empty is not sent: `add`
    /// adds nothing and `set` removes the header (nginx does not pass empty header values).
    /// Every value is rendered before any header changes, so `$http_*` variables read the
    /// headers as they were (the two may be the same map).
    pub fn apply(&self, headers: &mut HeaderMap, vars: &dyn VarSource) {
        self.render(vars).apply_to(headers);
    }

    /// The values rendered with `vars`, to apply later ([`RenderedOps::apply_to`]).
    pub fn render(&self, vars: &dyn VarSource) -> RenderedOps<'_> {
        let value = |t: &Template| {
            let v = t.render(vars);
            if v.is_empty() {
                None
            } else {
                HeaderValue::from_str(&v).ok()
            }
        };
        RenderedOps {
            add: self.add.iter().map(|(n, t)| (n, value(t))).collect(),
            set: self.set.iter().map(|(n, t)| (n, value(t))).collect(),
            remove: &self.remove,
        }
    }

    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

/// Header operations with their values rendered for one request.
pub struct RenderedOps<'a> {
    add: Vec<(&'a HeaderName, Option<HeaderValue>)>,
    set: Vec<(&'a HeaderName, Option<HeaderValue>)>,
    remove: &'a [HeaderName],
}

impl RenderedOps<'_> {
    /// Applies add, then set (an empty value removes), then remove.
    pub fn apply_to(self, headers: &mut HeaderMap) {
        for (n, v) in self.add {
            if let Some(v) = v {
                headers.append(n.clone(), v);
            }
        }
        for (n, v) in self.set {
            match v {
                Some(v) => {
                    headers.insert(n.clone(), v);
                }
                None => {
                    headers.remove(n);
                }
            }
        }
        for n in self.remove {
            headers.remove(n);
        }
    }
}

/// A header value template: printable text (tabs allowed), no CR, LF or other control bytes
/// (APISIX refuses them: "invalid value character").
fn check_value(v: &str, path: &str) -> Result<(), ConfError> {
    if v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(ConfError::at(path, "invalid value character"));
    }
    Ok(())
}

/// Converts nginx-style `$1` group references to the `${1}` form of the regex crate.
pub fn nginx_replacement(r: &str) -> String {
    let mut out = String::with_capacity(r.len() + 4);
    let b = r.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() && b[i + 1].is_ascii_digit() {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            out.push_str("${");
            out.push_str(&r[i + 1..j]);
            out.push('}');
            i = j;
        } else {
            let next = r[i + 1..].find('$').map_or(b.len(), |k| i + 1 + k);
            out.push_str(&r[i..next]);
            i = next;
        }
    }
    out
}

/// The `WWW-Authenticate` value of an auth plugin's 401 (`Basic realm="basic"`), checking
/// APISIX's realm schema: printable ASCII without `"` and `\`.
pub fn realm_challenge(
    scheme: &str,
    realm: &str,
) -> Result<http::HeaderValue, polygate_core::ConfError> {
    if realm.is_empty()
        || !realm
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(polygate_core::ConfError::at(
            "realm",
            "must be printable ASCII without '\"' and '\\'",
        ));
    }
    http::HeaderValue::from_str(&format!("{scheme} realm=\"{realm}\""))
        .map_err(|_| polygate_core::ConfError::at("realm", "invalid realm"))
}

/// An auth plugin's 401: `{"message": msg}` with its `WWW-Authenticate` challenge.
pub fn unauthorized(challenge: &http::HeaderValue, msg: &str) -> polygate_core::PluginResponse {
    let mut r = polygate_core::PluginResponse::message(http::StatusCode::UNAUTHORIZED, msg);
    r.headers
        .insert(http::header::WWW_AUTHENTICATE, challenge.clone());
    r
}

/// Removes every `name=...` argument from the request's query (a credential that must not go
/// upstream).
pub fn remove_query_arg(ctx: &mut polygate_core::RequestCtx, name: &str) {
    if let Some(q) = &ctx.query {
        let kept: Vec<&str> = q
            .split('&')
            .filter(|p| p.split_once('=').map_or(*p, |(k, _)| k) != name)
            .collect();
        ctx.query = (!kept.is_empty()).then(|| kept.join("&"));
    }
}

/// The request headers as a JSON object: lower-case names, a repeated field as an array of
/// its values (what `ngx.req.get_headers()` gives APISIX's loggers and schema checks).
pub fn headers_object(headers: &HeaderMap) -> serde_json::Value {
    use serde_json::Value;
    let mut out = serde_json::Map::new();
    for (k, v) in headers {
        let v = Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned());
        match out.get_mut(k.as_str()) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => *prev = Value::Array(vec![prev.clone(), v]),
            None => {
                out.insert(k.as_str().to_owned(), v);
            }
        }
    }
    Value::Object(out)
}

/// A status field of a plugin (`rejected_code`, `ret_code`...): 200 to 599, as APISIX's
/// schemas allow.
pub fn status(code: u16, path: &str) -> Result<http::StatusCode, polygate_core::ConfError> {
    if !(200..=599).contains(&code) {
        return Err(polygate_core::ConfError::at(path, "must be 200 to 599"));
    }
    http::StatusCode::from_u16(code)
        .map_err(|_| polygate_core::ConfError::at(path, "invalid status"))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Attaches the anonymous consumer `name` (an auth plugin's `anonymous_consumer`) when a
/// request brings no valid credential; false (logged) when no such consumer exists.
pub fn attach_anonymous(ctx: &mut polygate_core::RequestCtx, plugin: &str, name: &str) -> bool {
    match ctx.consumers.by_name(name).cloned() {
        Some(c) => {
            ctx.attach_consumer(c);
            true
        }
        None => {
            tracing::error!("{plugin}: anonymous consumer {name:?} not found");
            false
        }
    }
}

/// A limit or block plugin's rejection: `{"error_msg": msg}` with the status, or nginx's
/// error page for the status without a message.
pub fn rejection(status: http::StatusCode, msg: Option<&str>) -> polygate_core::PluginResponse {
    match msg {
        Some(m) => polygate_core::PluginResponse::error_msg(status, m),
        None => polygate_core::PluginResponse::status_page(status),
    }
}

/// `http[s]://host[:port][/path]` → the callout target (`http://host:port`, `https://...`,
/// or `https+insecure://...` when the certificate is not to be verified), the authority as
/// written, and the path with its query (`/` when none): what forward-auth, http-logger and
/// proxy-mirror send their requests to.
pub fn callout_target(uri: &str, verify: bool) -> Result<(String, String, String), String> {
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or("must be an http:// or https:// URL")?;
    let (default_port, prefix) = match scheme {
        "http" => (80, "http://"),
        "https" if verify => (443, "https://"),
        "https" => (443, "https+insecure://"),
        _ => return Err(format!("unsupported scheme {scheme:?}")),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err("missing or invalid host".into());
    }
    let has_port = if authority.starts_with('[') {
        authority.contains("]:")
    } else {
        authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    };
    let hostport = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{default_port}")
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok((format!("{prefix}{hostport}"), authority.to_owned(), path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    struct V;
    impl VarSource for V {
        fn var(&self, n: &str) -> Option<Cow<'_, str>> {
            (n == "remote_addr").then_some(Cow::Borrowed("1.2.3.4"))
        }
    }

    #[test]
    fn template() {
        assert_eq!(
            Template::parse("ip=$remote_addr;x=${remote_addr}!$ $nope.").render(&V),
            "ip=1.2.3.4;x=1.2.3.4!$ ."
        );
    }

    #[test]
    fn replacement() {
        assert_eq!(nginx_replacement("/v2/$1a/$12"), "/v2/${1}a/${12}");
    }

    #[test]
    fn uris() {
        assert_eq!(
            callout_target("http://127.0.0.1:1984/auth?x=1", true).unwrap(),
            (
                "http://127.0.0.1:1984".into(),
                "127.0.0.1:1984".into(),
                "/auth?x=1".into()
            )
        );
        assert_eq!(
            callout_target("https://auth.example.com", false).unwrap(),
            (
                "https+insecure://auth.example.com:443".into(),
                "auth.example.com".into(),
                "/".into()
            )
        );
        assert!(callout_target("ftp://x", true).is_err());
        assert!(callout_target("http://u@h/", true).is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            callout_target("http://127.0.0.1:1980/log?x=1", false).unwrap(),
            (
                "http://127.0.0.1:1980".into(),
                "127.0.0.1:1980".into(),
                "/log?x=1".into()
            )
        );
        assert_eq!(
            callout_target("https://h", true).unwrap().0,
            "https://h:443"
        );
        assert!(callout_target("h:1", true).is_err());
    }
}
