//! A configuration file as keyed resources.
//!
//! The file is read in two steps, so that one bad resource does not take the others down:
//! the text becomes a generic tree first (with a bound on nesting), then each resource is
//! typed on its own. Ids follow APISIX's standalone loader (`apisix/core/config_yaml.lua`):
//! an item without `id` is keyed by its `username` (consumers) or `arr_<n>` (1-based), and a
//! later item with the same id replaces the earlier one.

use std::collections::HashMap;

use polygate_model::env::Env;
use polygate_model::load::{Format, has_end_marker, substitute_env};
use polygate_model::{ConfigError, ConfigErrors, ConfigFile, GatewaySection};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Deepest nesting of `[`/`{` accepted in a YAML file (a deeper file is refused before it is
/// parsed: the YAML parser's cost grows with the square of the depth).
pub const MAX_FLOW_DEPTH: usize = 256;

/// The kinds of resources, in the order a configuration file lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `routes`
    Route,
    /// `services`
    Service,
    /// `upstreams`
    Upstream,
    /// `plugin_configs`
    PluginConfig,
    /// `global_rules`
    GlobalRule,
    /// `consumers`
    Consumer,
    /// `consumer_groups`
    ConsumerGroup,
    /// `ssls`
    Ssl,
    /// `plugin_metadata`
    PluginMetadata,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 9] = [
        Kind::Route,
        Kind::Service,
        Kind::Upstream,
        Kind::PluginConfig,
        Kind::GlobalRule,
        Kind::Consumer,
        Kind::ConsumerGroup,
        Kind::Ssl,
        Kind::PluginMetadata,
    ];

    /// The key of the kind in a file (and in APISIX's etcd layout).
    pub fn key(self) -> &'static str {
        match self {
            Kind::Route => "routes",
            Kind::Service => "services",
            Kind::Upstream => "upstreams",
            Kind::PluginConfig => "plugin_configs",
            Kind::GlobalRule => "global_rules",
            Kind::Consumer => "consumers",
            Kind::ConsumerGroup => "consumer_groups",
            Kind::Ssl => "ssls",
            Kind::PluginMetadata => "plugin_metadata",
        }
    }

    fn from_key(k: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.key() == k)
    }
}

/// One resource of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Its kind.
    pub kind: Kind,
    /// Position in the file's list (for key paths).
    pub index: usize,
    /// Its key (`id`, `username`, or `arr_<n>`).
    pub id: String,
    /// The resource as written (with `id` filled in); shared, so documents that differ in a few
    /// resources share the others.
    pub value: std::sync::Arc<Value>,
    /// Where it came from when that is not a position in a file (an etcd key): errors name
    /// it instead of `kind[index]`.
    pub source: Option<std::sync::Arc<str>>,
}

/// A parsed configuration: the `gateway:` section and the resources in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Document {
    /// The `gateway:` section, untyped.
    pub gateway: Option<Value>,
    /// The `apisix:` section (APISIX `config.yaml` settings), untyped.
    pub apisix: Option<Value>,
    /// Resources, in file order, one per key.
    pub items: Vec<Item>,
}

/// Where each element of a [`ConfigFile`] list came from in the file, so that errors found
/// on the typed configuration name the file's key path.
#[derive(Debug, Clone, Default)]
pub struct Positions(HashMap<Kind, Vec<usize>>);

impl Positions {
    /// Rewrites a key path of the typed configuration (`routes[2].uri`) to the file's
    /// (`routes[5].uri`).
    pub fn remap(&self, path: &str) -> String {
        match split_item_path(path) {
            Some((kind, i, rest)) => match self.0.get(&kind).and_then(|v| v.get(i)) {
                Some(pos) => format!("{}[{pos}]{rest}", kind.key()),
                None => path.to_owned(),
            },
            None => path.to_owned(),
        }
    }

    fn push(&mut self, kind: Kind, file_index: usize) {
        self.0.entry(kind).or_default().push(file_index);
    }

    fn remove(&mut self, kind: Kind, i: usize) {
        if let Some(v) = self.0.get_mut(&kind)
            && i < v.len()
        {
            v.remove(i);
        }
    }
}

/// `routes[3].plugins.x` → (Route, 3, `.plugins.x`).
pub fn split_item_path(path: &str) -> Option<(Kind, usize, &str)> {
    let open = path.find('[')?;
    let kind = Kind::from_key(&path[..open])?;
    let close = open + path[open..].find(']')?;
    let i = path[open + 1..close].parse().ok()?;
    Some((kind, i, &path[close + 1..]))
}

/// Refuses YAML whose flow collections nest deeper than [`MAX_FLOW_DEPTH`].
fn check_depth(text: &str) -> Result<(), ConfigError> {
    let mut depth = 0usize;
    for (line_no, line) in text.lines().enumerate() {
        for c in line.bytes() {
            match c {
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(ConfigError::new(
                            "",
                            format!(
                                "line {}: collections nest deeper than {MAX_FLOW_DEPTH} levels",
                                line_no + 1
                            ),
                        ));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

impl Document {
    /// Rewrites the key paths of `errs` that point into an item with a [`Item::source`]
    /// (`routes[3].uri` → `/apisix/routes/7: uri`).
    pub fn name_paths(&self, errs: &mut ConfigErrors) {
        for e in &mut errs.0 {
            let Some((kind, index, rest)) = split_item_path(&e.path) else {
                continue;
            };
            let Some(src) = self
                .items
                .iter()
                .find(|i| i.kind == kind && i.index == index)
                .and_then(|i| i.source.as_deref())
            else {
                continue;
            };
            let rest = rest.trim_start_matches('.');
            e.path = if rest.is_empty() {
                src.to_string()
            } else {
                format!("{src} {rest}")
            };
        }
    }

    /// Parses configuration text: `#END` for YAML, `${{ENV}}` substitution, the depth bound,
    /// then the resources. Whole-file problems (syntax, unknown top-level keys, a list that
    /// is not a list) are errors; problems inside one resource are left to [`Document::typed`].
    pub fn parse(text: &str, format: Format, env: &dyn Env) -> Result<Document, ConfigErrors> {
        if format == Format::Yaml && !has_end_marker(text) {
            return Err(ConfigErrors::one(ConfigError::new(
                "",
                "missing valid end flag (#END) at the end of the file",
            )));
        }
        let text = substitute_env(text, env).map_err(ConfigErrors::one)?;
        let whole = |m: String| ConfigErrors::one(ConfigError::new("", m));
        let root: Value = match format {
            Format::Yaml => {
                check_depth(&text).map_err(ConfigErrors::one)?;
                serde_yaml::from_str(&text).map_err(|e| whole(e.to_string()))?
            }
            Format::Json => serde_json::from_str(&text).map_err(|e| whole(e.to_string()))?,
        };
        let map = match root {
            Value::Object(m) => m,
            // an empty YAML file (just `#END`)
            Value::Null => serde_json::Map::new(),
            _ => return Err(whole("the configuration must be a mapping".into())),
        };
        let mut doc = Document::default();
        let mut errs = ConfigErrors::default();
        let mut seen: HashMap<(Kind, String), usize> = HashMap::new();
        for (key, v) in map {
            if key == "gateway" {
                doc.gateway = Some(v);
                continue;
            }
            if key == "apisix" {
                doc.apisix = Some(v);
                continue;
            }
            let Some(kind) = Kind::from_key(&key) else {
                errs.push(
                    key.clone(),
                    format!(
                        "unknown field `{key}`, expected one of `gateway`, `apisix`, {}",
                        Kind::ALL.map(|k| format!("`{}`", k.key())).join(", ")
                    ),
                );
                continue;
            };
            let list = match v {
                Value::Array(a) => a,
                Value::Null => Vec::new(),
                other => {
                    errs.push(
                        key.clone(),
                        format!("must be a list, found {}", type_name(&other)),
                    );
                    continue;
                }
            };
            for (index, mut value) in list.into_iter().enumerate() {
                let id = item_id(kind, &value, index);
                if let Value::Object(o) = &mut value
                    && !matches!(kind, Kind::Consumer | Kind::PluginMetadata)
                {
                    o.insert("id".into(), Value::String(id.clone()));
                }
                let item = Item {
                    kind,
                    index,
                    id: id.clone(),
                    value: std::sync::Arc::new(value),
                    source: None,
                };
                match seen.get(&(kind, id.clone())) {
                    Some(&at) => {
                        tracing::warn!(
                            "{}[{index}]: id {id:?} repeats {}[{}]; the later one is used",
                            kind.key(),
                            kind.key(),
                            doc.items[at].index
                        );
                        doc.items[at] = item;
                    }
                    None => {
                        seen.insert((kind, id), doc.items.len());
                        doc.items.push(item);
                    }
                }
            }
        }
        errs.into_result()?;
        Ok(doc)
    }

    /// Types every resource. Returns the configuration of the resources that typed, where
    /// each came from, and an error (with the file's key path) for each that did not.
    pub fn typed(&self) -> Result<(ConfigFile, Positions, ConfigErrors), ConfigErrors> {
        self.typed_with(&mut TypedCache::default())
    }

    /// [`Document::typed`], reusing the typed form of every resource whose value is the same
    /// (shared) one as in the previous call with `cache`: a document that differs from the last
    /// one in a few resources types only those.
    pub fn typed_with(
        &self,
        cache: &mut TypedCache,
    ) -> Result<(ConfigFile, Positions, ConfigErrors), ConfigErrors> {
        let mut cfg = ConfigFile::default();
        let mut pos = Positions::default();
        let mut errs = ConfigErrors::default();
        if let Some(g) = &self.gateway {
            let gw: GatewaySection = typed_value(g, "gateway").map_err(ConfigErrors::one)?;
            cfg.gateway = Some(gw);
        }
        if let Some(a) = &self.apisix {
            cfg.apisix = Some(typed_value(a, "apisix").map_err(ConfigErrors::one)?);
        }
        // keyed by the address of the shared value: the cache holds every value it keys, so
        // an address cannot be reused while its entry exists
        let mut next = HashMap::with_capacity(self.items.len());
        for item in &self.items {
            let key = std::sync::Arc::as_ptr(&item.value) as usize;
            let typed = match cache.0.get(&key) {
                Some((v, t)) if std::sync::Arc::ptr_eq(v, &item.value) => Ok(t.clone()),
                _ => Typed::of(item),
            };
            match typed {
                Ok(t) => {
                    t.clone().push_into(&mut cfg);
                    pos.push(item.kind, item.index);
                    next.insert(key, (item.value.clone(), t));
                }
                Err(e) => errs.0.push(e),
            }
        }
        cache.0 = next;
        Ok((cfg, pos, errs))
    }
}

/// Removes element `i` of `kind`'s list from `cfg` (and from `pos`).
pub fn remove_item(cfg: &mut ConfigFile, pos: &mut Positions, kind: Kind, i: usize) {
    fn rm<T>(v: &mut Vec<T>, i: usize) {
        if i < v.len() {
            v.remove(i);
        }
    }
    match kind {
        Kind::Route => rm(&mut cfg.routes, i),
        Kind::Service => rm(&mut cfg.services, i),
        Kind::Upstream => rm(&mut cfg.upstreams, i),
        Kind::PluginConfig => rm(&mut cfg.plugin_configs, i),
        Kind::GlobalRule => rm(&mut cfg.global_rules, i),
        Kind::Consumer => rm(&mut cfg.consumers, i),
        Kind::ConsumerGroup => rm(&mut cfg.consumer_groups, i),
        Kind::Ssl => rm(&mut cfg.ssls, i),
        Kind::PluginMetadata => rm(&mut cfg.plugin_metadata, i),
    }
    pos.remove(kind, i);
}

/// Typed resources of the last document typed with it ([`Document::typed_with`]), by kind and
/// id, with the value each was typed from.
#[derive(Default)]
pub struct TypedCache(HashMap<usize, (std::sync::Arc<Value>, Typed)>);

/// One typed resource (the ones every change would otherwise copy are shared).
#[derive(Clone)]
enum Typed {
    Route(std::sync::Arc<polygate_model::Route>),
    Service(std::sync::Arc<polygate_model::Service>),
    Upstream(std::sync::Arc<polygate_model::Upstream>),
    PluginConfig(std::sync::Arc<polygate_model::PluginConfig>),
    GlobalRule(Box<polygate_model::GlobalRule>),
    Consumer(Box<polygate_model::Consumer>),
    ConsumerGroup(Box<polygate_model::ConsumerGroup>),
    Ssl(Box<polygate_model::Ssl>),
    PluginMetadata(Box<serde_json::Map<String, Value>>),
}

impl Typed {
    fn of(item: &Item) -> Result<Typed, ConfigError> {
        let path = format!("{}[{}]", item.kind.key(), item.index);
        let v = &item.value;
        Ok(match item.kind {
            Kind::Route => Typed::Route(typed_value(v, &path)?),
            Kind::Service => Typed::Service(typed_value(v, &path)?),
            Kind::Upstream => Typed::Upstream(typed_value(v, &path)?),
            Kind::PluginConfig => Typed::PluginConfig(typed_value(v, &path)?),
            Kind::GlobalRule => Typed::GlobalRule(typed_value(v, &path)?),
            Kind::Consumer => Typed::Consumer(typed_value(v, &path)?),
            Kind::ConsumerGroup => Typed::ConsumerGroup(typed_value(v, &path)?),
            Kind::Ssl => Typed::Ssl(typed_value(v, &path)?),
            Kind::PluginMetadata => Typed::PluginMetadata(typed_value(v, &path)?),
        })
    }

    fn push_into(self, cfg: &mut ConfigFile) {
        match self {
            Typed::Route(t) => cfg.routes.push(t),
            Typed::Service(t) => cfg.services.push(t),
            Typed::Upstream(t) => cfg.upstreams.push(t),
            Typed::PluginConfig(t) => cfg.plugin_configs.push(t),
            Typed::GlobalRule(t) => cfg.global_rules.push(*t),
            Typed::Consumer(t) => cfg.consumers.push(*t),
            Typed::ConsumerGroup(t) => cfg.consumer_groups.push(*t),
            Typed::Ssl(t) => cfg.ssls.push(*t),
            Typed::PluginMetadata(t) => cfg.plugin_metadata.push(*t),
        }
    }
}

fn typed_value<T: DeserializeOwned>(v: &Value, path: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let inner = e.path().to_string();
        let full = if inner == "." {
            path.to_owned()
        } else {
            format!("{path}.{inner}")
        };
        ConfigError::new(full, e.into_inner().to_string())
    })
}

fn item_id(kind: Kind, v: &Value, index: usize) -> String {
    let key = if kind == Kind::Consumer {
        v.get("username").or_else(|| v.get("id"))
    } else {
        v.get("id")
    };
    match key {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("arr_{}", index + 1),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polygate_model::env::MapEnv;

    fn doc(text: &str) -> Result<Document, ConfigErrors> {
        Document::parse(text, Format::Yaml, &MapEnv::default())
    }

    #[test]
    fn ids_as_apisix_assigns_them() {
        let d = doc("routes:\n  - {uri: /a}\n  - {id: 7, uri: /b}\n  - {uri: /c}\nconsumers:\n  - {username: jack}\n#END\n").unwrap();
        let ids: Vec<&str> = d.items.iter().map(|i| i.id.as_str()).collect();
        // kinds come in key order; items of a kind in file order
        assert_eq!(ids, ["jack", "arr_1", "7", "arr_3"]);
        assert_eq!(d.items[1].value["id"], "arr_1");
    }

    #[test]
    fn a_later_duplicate_replaces_the_earlier() {
        let d = doc("routes:\n  - {id: r, uri: /a}\n  - {id: r, uri: /b}\n#END\n").unwrap();
        assert_eq!(d.items.len(), 1);
        assert_eq!(d.items[0].value["uri"], "/b");
    }

    #[test]
    fn one_bad_item_does_not_hide_the_others() {
        let d = doc("routes:\n  - {id: a, uri: /a, upstream: {nodes: {\"127.0.0.1:1\": 1}}}\n  - {id: b, urii: /b}\n  - {id: c, uri: /c, upstream_id: x}\n#END\n").unwrap();
        let (cfg, pos, errs) = d.typed().unwrap();
        assert_eq!(cfg.routes.len(), 2);
        assert_eq!(errs.0.len(), 1);
        assert!(errs.0[0].path.starts_with("routes[1]"), "{errs}");
        assert_eq!(pos.remap("routes[1].upstream_id"), "routes[2].upstream_id");
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let text = format!(
            "routes: {}{}\n#END\n",
            "[".repeat(40_000),
            "]".repeat(40_000)
        );
        let t = std::time::Instant::now();
        let e = doc(&text).unwrap_err();
        assert!(e.to_string().contains("nest deeper"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn whole_file_errors() {
        assert!(
            doc("routes: []\n")
                .unwrap_err()
                .to_string()
                .contains("#END")
        );
        assert!(
            doc("rotues: []\n#END\n")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        assert!(
            doc("routes: 3\n#END\n")
                .unwrap_err()
                .to_string()
                .contains("must be a list")
        );
        assert!(doc("#END\n").unwrap().items.is_empty());
    }

    #[test]
    fn item_paths() {
        assert_eq!(
            split_item_path("routes[3].plugins.x"),
            Some((Kind::Route, 3, ".plugins.x"))
        );
        assert_eq!(split_item_path("gateway.listeners[0]"), None);
    }
}
