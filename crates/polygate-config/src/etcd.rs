//! The etcd source (`gateway.config_provider: etcd`): resources read from etcd in APISIX's
//! layout (`<prefix>/<kind>/<id>`, JSON values) and kept current by one watch per process.
//!
//! ```text
//! full read (range <prefix>/) ─► mirror ─► (applying thread) document ─► pipeline
//!        ▲                          ▲
//!        │ compacted / error        │ events
//!        └──────── watch from revision + 1
//! ```
//!
//! The gateway section (listeners, workers...) stays in the local file, as APISIX's
//! `config.yaml` does. While etcd cannot be reached, the last good configuration keeps
//! serving; reconnection backs off up to [`MAX_BACKOFF`], and [`EtcdState`] tells a status
//! endpoint what is going on. Each commit prepares from the mirror as it is then (changes that
//! arrive meanwhile wait for the next one): the data plane's build reuses every compiled route
//! whose definition did not change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use polygate_etcd::{Client, Event, Kv, WatchMessage};
use serde_json::Value;

use crate::document::{Document, Item, Kind};
use crate::pipeline::{Pipeline, Target};

/// Longest pause between two attempts to reach etcd.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the etcd source is doing, for status endpoints and metrics.
#[derive(Debug, Default)]
pub struct EtcdState {
    /// Whether the last request to etcd succeeded and a watch is open.
    pub connected: AtomicBool,
    /// The etcd revision the served configuration reflects.
    pub revision: AtomicI64,
    /// Full reads of etcd (1 after the start; more after compactions and reconnections).
    pub full_syncs: AtomicU64,
    /// Watch messages that changed the mirror.
    pub updates: AtomicU64,
    /// When the configuration was last brought up to date with etcd.
    pub last_sync: Mutex<Option<SystemTime>>,
    /// The last error talking to etcd (cleared by the next success).
    pub last_error: Mutex<Option<String>>,
}

/// What etcd holds, as the source last saw it.
#[derive(Debug, Default)]
struct Mirror(BTreeMap<(Kind, String), Stored>);

impl Mirror {
    fn document(&self, gateway: Option<Value>, apisix: Option<Value>) -> Document {
        let mut doc = Document {
            gateway,
            apisix,
            items: Vec::with_capacity(self.0.len()),
        };
        let mut index: BTreeMap<Kind, usize> = BTreeMap::new();
        for ((kind, id), s) in &self.0 {
            let i = index.entry(*kind).or_insert(0);
            doc.items.push(Item {
                kind: *kind,
                index: *i,
                id: id.clone(),
                value: s.value.clone(),
                source: Some(s.key.clone()),
            });
            *i += 1;
        }
        doc
    }
}

/// One resource as stored in etcd (with its `id` filled in), shared with the documents made
/// from the mirror.
#[derive(Debug, Clone)]
struct Stored {
    value: Arc<Value>,
    key: Arc<str>,
}

/// The etcd source of one process.
pub struct EtcdSource {
    client: Client,
    prefix: String,
    gateway: Option<Value>,
    apisix: Option<Value>,
    state: Arc<EtcdState>,
    keyring: crate::encryption::Keyring,
    mirror: Arc<parking_lot::Mutex<Mirror>>,
    ignored_warned: std::collections::HashSet<String>,
}

/// The kind and id of an etcd key under `prefix` (`/apisix/routes/1` → routes, `1`); `None`
/// for keys polygate does not serve (and their reason, for a log line), and for the
/// directory placeholders APISIX writes.
fn parse_key<'a>(prefix: &str, key: &'a str) -> Result<(Kind, &'a str), Option<&'a str>> {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(None)?;
    let (dir, id) = rest.split_once('/').ok_or(None)?;
    let kind = Kind::ALL.into_iter().find(|k| k.key() == dir);
    match kind {
        Some(k) if !id.is_empty() && !id.contains('/') => Ok((k, id)),
        // consumers/<name>/credentials/<id>
        Some(Kind::Consumer) if id.contains("/credentials/") => Err(Some("consumers/credentials")),
        Some(_) => Err(None),
        None => Err(Some(dir)),
    }
}

impl EtcdSource {
    /// A source reading `<prefix>/...` through `client`; `gateway` and `apisix` are the
    /// local file's sections, kept in every document.
    pub fn new(
        client: Client,
        prefix: &str,
        gateway: Option<Value>,
        apisix: Option<Value>,
        state: Arc<EtcdState>,
        keyring: crate::encryption::Keyring,
    ) -> EtcdSource {
        EtcdSource {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            gateway,
            apisix,
            state,
            keyring,
            mirror: Arc::default(),
            ignored_warned: Default::default(),
        }
    }

    fn fail(&self, what: &str, e: &polygate_etcd::EtcdError) {
        let was = self.state.connected.swap(false, Ordering::AcqRel);
        let msg = format!("{what}: {e}");
        if was || self.state.last_error.lock().is_none() {
            tracing::error!("etcd: {msg}; the last good configuration keeps serving");
        } else {
            tracing::debug!("etcd: {msg}");
        }
        *self.state.last_error.lock() = Some(msg);
    }

    fn apply_kv(&mut self, kv: &Kv) {
        let mirror = self.mirror.clone();
        let mut m = mirror.lock();
        self.apply_kv_to(&mut m.0, kv);
    }

    /// Puts `kv` into `map` (or removes what it replaces when it is not a JSON object).
    fn apply_kv_to(&mut self, map: &mut BTreeMap<(Kind, String), Stored>, kv: &Kv) {
        match parse_key(&self.prefix, &kv.key) {
            Ok((kind, id)) => match serde_json::from_slice::<Value>(&kv.value) {
                Ok(mut value @ Value::Object(_)) => {
                    if let Value::Object(o) = &mut value
                        && !matches!(kind, Kind::Consumer | Kind::PluginMetadata)
                    {
                        o.insert("id".into(), Value::String(id.to_owned()));
                    }
                    self.keyring.decrypt_resource(kind, &mut value);
                    map.insert(
                        (kind, id.to_owned()),
                        Stored {
                            value: Arc::new(value),
                            key: Arc::from(kv.key.as_str()),
                        },
                    );
                }
                _ => {
                    tracing::error!("etcd: {}: the value is not a JSON object; ignored", kv.key);
                    map.remove(&(kind, id.to_owned()));
                }
            },
            Err(Some(what)) => {
                if self.ignored_warned.insert(what.to_owned()) {
                    tracing::warn!(
                        "etcd: {}/{what}/...: polygate does not serve this kind; its keys are ignored",
                        self.prefix
                    );
                }
            }
            Err(None) => {}
        }
    }

    fn remove_kv(&mut self, kv: &Kv) {
        if let Ok((kind, id)) = parse_key(&self.prefix, &kv.key) {
            self.mirror.lock().0.remove(&(kind, id.to_owned()));
        }
    }

    /// Reads everything under the prefix into the mirror; returns etcd's revision.
    async fn full_read(&mut self) -> Result<i64, polygate_etcd::EtcdError> {
        let (kvs, revision) = self
            .client
            .range_prefix(&format!("{}/", self.prefix))
            .await?;
        // built aside and swapped in whole: the applier never sees a half-read mirror
        let mut fresh = BTreeMap::new();
        for kv in &kvs {
            self.apply_kv_to(&mut fresh, kv);
        }
        self.mirror.lock().0 = fresh;
        Ok(revision)
    }

    /// Reads etcd, then follows its changes, for the life of the process.
    pub async fn run<T: Target>(mut self, pipeline: Arc<Pipeline<T>>) {
        let origin = format!("etcd {}", self.prefix);
        let applier = Applier::start(
            pipeline,
            self.state.clone(),
            origin.clone(),
            self.mirror.clone(),
            (self.gateway.clone(), self.apisix.clone()),
        );
        let mut backoff = Duration::from_millis(100);
        let mut revision: Option<i64> = None;
        loop {
            // a full read at start, after a compaction, and when the watch cannot resume
            let rev = match revision {
                Some(r) => r,
                None => match self.full_read().await {
                    Ok(r) => {
                        self.state.full_syncs.fetch_add(1, Ordering::Relaxed);
                        applier.submit(r);
                        r
                    }
                    Err(e) => {
                        self.fail("reading the configuration", &e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            revision = Some(rev);
            let mut watch = match self
                .client
                .watch(&format!("{}/", self.prefix), rev + 1)
                .await
            {
                Ok(w) => w,
                Err(e) => {
                    self.fail("watching", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // the data may have changed meanwhile: read it all again
                    revision = None;
                    continue;
                }
            };
            if !self.state.connected.swap(true, Ordering::AcqRel) {
                tracing::info!("etcd: watching {}/ from revision {}", self.prefix, rev + 1);
            }
            *self.state.last_error.lock() = None;
            backoff = Duration::from_millis(100);
            loop {
                let msg = match watch.next().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        self.fail(
                            "watching",
                            &polygate_etcd::EtcdError::Unreachable("the watch ended".into()),
                        );
                        break;
                    }
                    Err(e) => {
                        self.fail("watching", &e);
                        break;
                    }
                };
                match msg {
                    WatchMessage::Events {
                        events,
                        revision: r,
                    } => {
                        if events.is_empty() {
                            // created or progress notification
                            continue;
                        }
                        // the mirror changes now; the applier takes every change made by the
                        // time it gets to it, so a burst becomes few commits
                        let mut last = r;
                        for ev in &events {
                            match ev {
                                Event::Put(kv) => {
                                    last = last.max(kv.mod_revision);
                                    self.apply_kv(kv);
                                }
                                Event::Delete(kv) => {
                                    last = last.max(kv.mod_revision);
                                    self.remove_kv(kv);
                                }
                            }
                        }
                        self.state.updates.fetch_add(1, Ordering::Relaxed);
                        applier.submit(last);
                        revision = Some(last);
                    }
                    WatchMessage::Compacted(c) => {
                        tracing::warn!(
                            "etcd: revision {} was compacted (now {c}); reading everything again",
                            revision.unwrap_or(0) + 1
                        );
                        revision = None;
                        break;
                    }
                    WatchMessage::Canceled(why) => {
                        tracing::warn!(
                            "etcd: the watch was canceled ({why}); reading everything again"
                        );
                        revision = None;
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Applies the mirror on a thread of its own at a lower CPU priority: preparing a
/// configuration of thousands of routes takes milliseconds of CPU, and during a burst of
/// changes that work must not take the worker threads' cores. Changes that arrive while a
/// document is being applied are taken together by the next one; when several arrived during
/// one commit (a burst), the thread rests three times as long as that commit took before the
/// next (at most a quarter of a core goes to configuration during a burst; a lone change is
/// applied at once).
struct Applier {
    slot: Arc<(parking_lot::Mutex<Pending>, parking_lot::Condvar)>,
}

/// What the watch handed over since the applier last looked.
#[derive(Default)]
struct Pending {
    /// The latest revision waiting to be applied.
    revision: Option<i64>,
    /// Hand-overs so far (to tell a burst from a lone change).
    count: u64,
}

/// The niceness of the applying thread, as `thread-priority` maps its 0..99 scale (about nice
/// 10).
const APPLIER_PRIORITY: u8 = 23;

/// Longest rest between two commits during a burst.
const MAX_REST: Duration = Duration::from_millis(500);

type Sections = (Option<Value>, Option<Value>);

impl Applier {
    fn start<T: Target>(
        pipeline: Arc<Pipeline<T>>,
        state: Arc<EtcdState>,
        origin: String,
        mirror: Arc<parking_lot::Mutex<Mirror>>,
        sections: Sections,
    ) -> Applier {
        let slot: Arc<(parking_lot::Mutex<Pending>, parking_lot::Condvar)> = Arc::default();
        let s = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("polygate-config".into())
            .spawn(move || {
                if let Ok(p) = thread_priority::ThreadPriorityValue::try_from(APPLIER_PRIORITY)
                    && let Err(e) = thread_priority::set_current_thread_priority(
                        thread_priority::ThreadPriority::Crossplatform(p),
                    )
                {
                    tracing::debug!("etcd: cannot lower the applying thread's priority: {e:?}");
                }
                loop {
                    let (revision, seen) = {
                        let mut next = s.0.lock();
                        loop {
                            if let Some(n) = next.revision.take() {
                                break (n, next.count);
                            }
                            s.1.wait(&mut next);
                        }
                    };
                    let t0 = std::time::Instant::now();
                    let doc = mirror
                        .lock()
                        .document(sections.0.clone(), sections.1.clone());
                    // invalid resources are skipped and logged by the pipeline; a change
                    // rejected whole leaves the served configuration as it was
                    let _ = pipeline.apply(&doc, &origin);
                    drop(doc);
                    state.revision.store(revision, Ordering::Release);
                    *state.last_sync.lock() = Some(SystemTime::now());
                    let took = t0.elapsed();
                    // several changes arrived while this one was applied: a burst
                    if s.0.lock().count >= seen + 2 {
                        std::thread::sleep((took * 3).min(MAX_REST));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("etcd: cannot start the applying thread: {e}");
        }
        Applier { slot }
    }

    /// Asks for the mirror, as it is by then, to be applied (`revision`: what it reflects).
    fn submit(&self, revision: i64) {
        let mut next = self.slot.0.lock();
        next.revision = Some(next.revision.map_or(revision, |r| r.max(revision)));
        next.count += 1;
        self.slot.1.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_kinds_and_ids() {
        assert_eq!(
            parse_key("/apisix", "/apisix/routes/1"),
            Ok((Kind::Route, "1"))
        );
        assert_eq!(
            parse_key("/apisix", "/apisix/plugin_metadata/http-logger"),
            Ok((Kind::PluginMetadata, "http-logger"))
        );
        // APISIX's directory placeholder and its id generator
        assert_eq!(parse_key("/apisix", "/apisix/routes/"), Err(None));
        assert_eq!(parse_key("/apisix", "/apisix/gen_id"), Err(None));
        assert_eq!(
            parse_key("/apisix", "/apisix/protos/1"),
            Err(Some("protos"))
        );
        assert_eq!(
            parse_key("/apisix", "/apisix/consumers/jack/credentials/a"),
            Err(Some("consumers/credentials"))
        );
        assert_eq!(parse_key("/apisix", "/other/routes/1"), Err(None));
    }
}
