//! Consumers, indexed by the credentials their auth plugins carry.

use std::collections::HashMap;
use std::sync::Arc;

use polygate_model::{ConfigErrors, Consumer, ConsumerGroup, PluginMap};

use crate::chain::{InstanceMap, build_instances};
use crate::plugin::{PluginKind, PluginRegistry};

/// A consumer as the data plane sees it.
pub struct ConsumerInfo {
    /// `username`.
    pub username: String,
    /// `username` again, shared (labels of metrics keep it without copying).
    pub name: std::sync::Arc<str>,
    /// `group_id`.
    pub group_id: Option<String>,
    /// `labels.custom_id` (sent upstream as `X-Consumer-Custom-ID`, as APISIX does).
    pub custom_id: Option<String>,
    /// Non-auth plugins of the consumer merged over its group's (consumer wins).
    pub plugins: InstanceMap,
    /// The consumer's auth plugin configurations (credentials), by plugin name.
    pub auth_confs: PluginMap,
}

/// Lookup of consumers by (auth plugin, credential).
#[derive(Default)]
pub struct ConsumerIndex {
    by_cred: HashMap<String, HashMap<String, Arc<ConsumerInfo>>>,
    by_name: HashMap<String, Arc<ConsumerInfo>>,
}

impl ConsumerIndex {
    /// Builds the index, collecting errors at `consumers[i].plugins...` paths.
    pub fn build(
        registry: &PluginRegistry,
        consumers: &[Consumer],
        groups: &[ConsumerGroup],
        errs: &mut ConfigErrors,
    ) -> ConsumerIndex {
        let mut group_plugins: HashMap<String, InstanceMap> = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            let Some(id) = &g.id else { continue };
            let map = crate::plugin::owner_with(&format!("consumer_groups/{}", id.0), || {
                build_instances(
                    registry,
                    &g.plugins,
                    &format!("consumer_groups[{i}].plugins"),
                    errs,
                )
            });
            group_plugins.insert(id.0.clone(), map);
        }
        let mut idx = ConsumerIndex::default();
        for (i, c) in consumers.iter().enumerate() {
            let path = format!("consumers[{i}].plugins");
            let mut auth_confs = PluginMap::new();
            let mut normal = PluginMap::new();
            let mut creds = Vec::new();
            for (name, conf) in &c.plugins {
                let Some(f) = registry.get(name) else {
                    errs.push(format!("{path}.{name}"), format!("unknown plugin {name:?}"));
                    continue;
                };
                if f.kind() == PluginKind::Auth {
                    let empty = serde_json::Value::Object(serde_json::Map::new());
                    let conf = if conf.is_null() { &empty } else { conf };
                    match f.consumer_credential(conf) {
                        Ok(Some(cred)) => creds.push((name.clone(), cred)),
                        Ok(None) => {}
                        Err(e) => {
                            errs.push(e.path_under(&format!("{path}.{name}")), e.message);
                        }
                    }
                    auth_confs.insert(name.clone(), conf.clone());
                } else {
                    normal.insert(name.clone(), conf.clone());
                }
            }
            let own = crate::plugin::owner_with(&format!("consumers/{}", c.username), || {
                build_instances(registry, &normal, &path, errs)
            });
            let mut plugins = c
                .group_id
                .as_ref()
                .and_then(|g| group_plugins.get(&g.0))
                .cloned()
                .unwrap_or_default();
            plugins.extend(own);
            let info = Arc::new(ConsumerInfo {
                username: c.username.clone(),
                name: std::sync::Arc::from(c.username.as_str()),
                group_id: c.group_id.as_ref().map(|g| g.0.clone()),
                custom_id: c.labels.as_ref().and_then(|l| l.get("custom_id").cloned()),
                plugins,
                auth_confs,
            });
            for (plugin, cred) in creds {
                let m = idx.by_cred.entry(plugin.clone()).or_default();
                if let Some(other) = m.get(&cred) {
                    errs.push(
                        format!("{path}.{plugin}"),
                        format!(
                            "duplicate credential: already used by consumer {:?}",
                            other.username
                        ),
                    );
                    continue;
                }
                m.insert(cred, info.clone());
            }
            idx.by_name.insert(c.username.clone(), info);
        }
        idx
    }

    /// The consumer whose `plugin` credential is `cred`.
    pub fn find(&self, plugin: &str, cred: &str) -> Option<&Arc<ConsumerInfo>> {
        self.by_cred.get(plugin)?.get(cred)
    }

    /// The consumer named `username`.
    pub fn by_name(&self, username: &str) -> Option<&Arc<ConsumerInfo>> {
        self.by_name.get(username)
    }

    /// Every consumer.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ConsumerInfo>> {
        self.by_name.values()
    }

    /// Number of consumers.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when there are no consumers.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}
