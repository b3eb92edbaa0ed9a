//! The data plane as the Admin API sees it ([`polygate_admin::Gateway`]): one resource or a
//! whole document checked with a check-only plugin registry (nothing loaded, nothing
//! committed), the plugin list with schemas, the served document, readiness.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use polygate_admin::PluginInfo;
use polygate_config::document::Item;
use polygate_config::etcd::EtcdState;
use polygate_config::{Document, Kind, Pipeline};
use polygate_core::PluginRegistry;
use polygate_core::plugin::PluginKind;
use polygate_model::{ConfigError, ConfigErrors};
use serde_json::{Value, json};

use crate::plane::DataPlane;
use crate::snapshot::Snapshot;

/// The gateway behind an Admin API.
pub struct AdminGateway {
    config: Arc<Pipeline<DataPlane>>,
    checker: PluginRegistry,
    etcd: Option<Arc<EtcdState>>,
}

impl AdminGateway {
    /// The Admin API's view of `config`; `etcd` when resources come from etcd.
    pub fn new(config: Arc<Pipeline<DataPlane>>, etcd: Option<Arc<EtcdState>>) -> AdminGateway {
        let checker = config.target().registry().check_only();
        AdminGateway {
            config,
            checker,
            etcd,
        }
    }

    fn served_gateway(&self) -> Option<Value> {
        self.config.current().and_then(|d| d.gateway.clone())
    }
}

/// `routes[0].upstream.nodes: msg` → `upstream.nodes: msg`.
fn relative(e: &ConfigError) -> String {
    let rest = match polygate_config::document::split_item_path(&e.path) {
        Some((_, _, rest)) => rest.trim_start_matches('.').to_owned(),
        None => e.path.clone(),
    };
    if rest.is_empty() {
        e.message.clone()
    } else {
        format!("{rest}: {}", e.message)
    }
}

impl polygate_admin::Gateway for AdminGateway {
    fn check(&self, kind: Kind, value: &Value) -> Result<(), String> {
        let id = match kind {
            Kind::Consumer => value.get("username"),
            _ => value.get("id"),
        }
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| "1".into());
        let mut value = value.clone();
        if let Value::Object(o) = &mut value
            && !matches!(kind, Kind::Consumer | Kind::PluginMetadata)
            && !o.contains_key("id")
        {
            // a resource checked before it has an id (POST, schema/validate)
            o.insert("id".into(), Value::String(id.clone()));
        }
        let doc = Document {
            gateway: None,
            apisix: None,
            items: vec![Item {
                kind,
                index: 0,
                id,
                value: Arc::new(value),
                source: None,
            }],
        };
        let (mut cfg, _, errs) = doc.typed().map_err(|e| e.to_string())?;
        if let Some(e) = errs.0.first() {
            return Err(relative(e));
        }
        if let Some(gw) = self.served_gateway() {
            cfg.gateway = serde_json::from_value(gw).ok();
        }
        match Snapshot::build(&cfg, &self.checker, None) {
            Ok(_) => Ok(()),
            Err(errs) => {
                let msgs: Vec<String> = errs
                    .0
                    .iter()
                    .filter(|e| !e.dangling)
                    .map(relative)
                    .collect();
                if msgs.is_empty() {
                    Ok(())
                } else {
                    Err(msgs.join("; "))
                }
            }
        }
    }

    fn plugins(&self) -> Vec<PluginInfo> {
        let reg = self.config.target().registry();
        let mut names = reg.names();
        // plugins the served configuration declares (proxy-wasm filters)
        let snap = self.config.target().snapshot.load();
        for p in &snap.gateway.wasm.plugins {
            if !names.contains(&p.name) {
                names.push(p.name.clone());
            }
        }
        names
            .into_iter()
            .filter_map(|n| {
                let f = reg.get(&n)?;
                Some(PluginInfo {
                    priority: f.priority(),
                    schema: f.schema(),
                    consumer_schema: f.consumer_schema(),
                    kind: (f.kind() == PluginKind::Auth).then_some("auth"),
                    name: n,
                })
            })
            .collect()
    }

    fn current(&self) -> Option<Arc<Document>> {
        self.config.current()
    }

    fn validate(&self, doc: &Document) -> Result<(), ConfigErrors> {
        let check = Pipeline::new(DataPlane::new(self.checker.clone())?, true);
        check.check(doc).map(drop)
    }

    fn apply(&self, doc: &Document, origin: &str) -> Result<(), ConfigErrors> {
        self.config.apply(doc, origin).map(drop)
    }

    fn readiness(&self) -> Result<Value, String> {
        let st = self.config.status();
        if st.commits.load(Ordering::Acquire) == 0 {
            return Err("no configuration loaded yet".into());
        }
        let age = |t: Option<std::time::SystemTime>| {
            t.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs_f64())
        };
        let versions: serde_json::Map<String, Value> = st
            .versions
            .lock()
            .iter()
            .map(|(k, v)| (format!("{}_conf_version", k.key()), json!(v)))
            .collect();
        let mut v = json!({
            "commits": st.commits.load(Ordering::Relaxed),
            "last_commit_age": age(*st.last_commit.lock()),
            "last_error": st.last_error.lock().clone(),
            "conf_versions": versions,
        });
        if let Some(e) = &self.etcd {
            let synced = *e.last_sync.lock();
            v["etcd"] = json!({
                "connected": e.connected.load(Ordering::Acquire),
                "revision": e.revision.load(Ordering::Acquire),
                "full_syncs": e.full_syncs.load(Ordering::Relaxed),
                "updates": e.updates.load(Ordering::Relaxed),
                "last_sync_age": age(synced),
                "last_error": e.last_error.lock().clone(),
            });
            if synced.is_none() {
                return Err(format!(
                    "the configuration has not been read from etcd yet: {}",
                    e.last_error
                        .lock()
                        .clone()
                        .unwrap_or_else(|| "connecting".into())
                ));
            }
        }
        Ok(v)
    }
}
