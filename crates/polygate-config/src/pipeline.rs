//! Prepare and commit.
//!
//! [`Pipeline::apply`] takes a [`Document`] from a source and:
//!
//! 1. types its resources; in the default (APISIX standalone) mode a resource that does not
//!    type, or that the target rejects, is skipped with a log line naming its key path and
//!    the others are served; with `strict` any problem rejects the whole change;
//! 2. prepares a candidate with [`Target::prepare`], which must not touch the running
//!    process; a panic there is caught and rejects the change;
//! 3. commits it with [`Target::commit`]: swap, then process-wide state.
//!
//! A rejected change leaves the served configuration and the process exactly as they were.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use polygate_model::{ConfigError, ConfigErrors, ConfigFile};

use crate::document::{Document, Positions, remove_item, split_item_path};

/// What the pipeline builds and serves (implemented by the data plane).
pub trait Target: Send + Sync + 'static {
    /// A prepared candidate.
    type Prepared: Send + 'static;

    /// Builds a candidate from `cfg`. Must have no effect on the running process: the
    /// candidate may be dropped. Errors name key paths of `cfg`.
    fn prepare(&self, cfg: &ConfigFile) -> Result<Self::Prepared, ConfigErrors>;

    /// Makes `prepared` the served configuration, then applies process-wide state.
    fn commit(&self, prepared: Self::Prepared, cfg: &ConfigFile);
}

/// Counters and the last outcome, for logs, metrics and a status endpoint.
#[derive(Debug, Default)]
pub struct Status {
    /// Configurations committed (1 after the first load).
    pub commits: AtomicU64,
    /// Changes rejected whole.
    pub rejected: AtomicU64,
    /// Resources skipped (invalid) across all commits.
    pub skipped: AtomicU64,
    /// Failures of a source (unreadable file, a panic in the watcher).
    pub source_errors: AtomicU64,
    /// The last rejection or source failure, if the last attempt failed.
    pub last_error: Mutex<Option<String>>,
    /// When the last configuration was committed.
    pub last_commit: Mutex<Option<std::time::SystemTime>>,
    /// Per kind, how many commits changed its resources (APISIX's `conf_version`).
    pub versions: Mutex<BTreeMap<crate::Kind, u64>>,
}

/// What [`Pipeline::apply`] did.
#[derive(Debug)]
pub struct Applied {
    /// The resources skipped, each with its key path and reason.
    pub skipped: ConfigErrors,
    /// Resources served.
    pub resources: usize,
}

/// The configuration pipeline of one process.
pub struct Pipeline<T: Target> {
    target: T,
    strict: bool,
    status: Status,
    /// The document last committed.
    current: Mutex<Option<Arc<Document>>>,
    /// Typed resources of the last prepared document.
    typed: Mutex<crate::document::TypedCache>,
}

/// Dangling references (`upstream_id` naming nothing): served as APISIX serves them, but
/// reported by `polygate validate` and refused with `--strict`.
pub fn dangling_references(cfg: &ConfigFile) -> ConfigErrors {
    match polygate_model::validate::validate(cfg) {
        Ok(()) => ConfigErrors::default(),
        Err(e) => ConfigErrors(e.0.into_iter().filter(|e| e.dangling).collect()),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl<T: Target> Pipeline<T> {
    /// A pipeline for `target`; with `strict`, any invalid resource or dangling reference
    /// rejects the whole change.
    pub fn new(target: T, strict: bool) -> Self {
        Pipeline {
            target,
            strict,
            status: Status::default(),
            current: Mutex::new(None),
            typed: Mutex::new(Default::default()),
        }
    }

    /// The document last committed (`None` before the first commit).
    pub fn current(&self) -> Option<Arc<Document>> {
        self.current.lock().clone()
    }

    /// The target.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// Counters and the last outcome.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Every problem of `doc` without committing anything: resources that do not type or
    /// that the target refuses, and references to missing resources, each with the file's
    /// key path. Returns the candidate when there is none (`polygate validate` runs this with
    /// a target that only checks).
    pub fn check(&self, doc: &Document) -> Result<T::Prepared, ConfigErrors> {
        let (cfg, pos, prepared, mut problems) = self.prepare_with_positions(doc)?;
        problems.0.extend(remap(dangling_references(&cfg), &pos).0);
        problems.into_result().map(|()| prepared)
    }

    /// Prepares `doc` without committing: the typed configuration, the candidate and what
    /// was skipped.
    pub fn prepare(
        &self,
        doc: &Document,
    ) -> Result<(ConfigFile, T::Prepared, ConfigErrors), ConfigErrors> {
        self.prepare_with_positions(doc)
            .map(|(cfg, _, prepared, skipped)| (cfg, prepared, skipped))
    }

    fn prepare_with_positions(
        &self,
        doc: &Document,
    ) -> Result<(ConfigFile, Positions, T::Prepared, ConfigErrors), ConfigErrors> {
        let (mut cfg, mut pos, mut skipped) = doc.typed_with(&mut self.typed.lock())?;
        if self.strict {
            let mut all = skipped.clone();
            all.0.extend(remap(dangling_references(&cfg), &pos).0);
            if !all.is_empty() {
                return Err(all);
            }
        }
        // each round skips the resources the target found at fault; a resource removed can
        // only make others dangle (which is not fatal), so this ends quickly
        for _ in 0..8 {
            let prepared = catch_unwind(AssertUnwindSafe(|| self.target.prepare(&cfg)));
            let errs = match prepared {
                Ok(Ok(p)) => return Ok((cfg, pos, p, skipped)),
                Ok(Err(errs)) => errs,
                Err(panic) => {
                    return Err(ConfigErrors::one(ConfigError::new(
                        "",
                        format!(
                            "preparing the configuration panicked: {}",
                            panic_message(&*panic)
                        ),
                    )));
                }
            };
            let mut at_fault: Vec<(crate::Kind, usize)> = Vec::new();
            let mut whole = ConfigErrors::default();
            for e in &errs.0 {
                match split_item_path(&e.path) {
                    Some((kind, i, _)) if !self.strict => {
                        if !at_fault.contains(&(kind, i)) {
                            at_fault.push((kind, i));
                        }
                    }
                    _ => whole.0.push(e.clone()),
                }
            }
            if !whole.is_empty() {
                return Err(remap(errs, &pos));
            }
            skipped.0.extend(remap(errs, &pos).0);
            at_fault.sort_by_key(|a| std::cmp::Reverse(a.1));
            for (kind, i) in at_fault {
                remove_item(&mut cfg, &mut pos, kind, i);
            }
        }
        Err(ConfigErrors::one(ConfigError::new(
            "",
            "the configuration could not be prepared (too many rounds of invalid resources)",
        )))
    }

    /// Prepares and commits `doc` (from `origin`, for logs). On error nothing changed.
    pub fn apply(&self, doc: &Document, origin: &str) -> Result<Applied, ConfigErrors> {
        let outcome = self.prepare(doc).map(|(cfg, prepared, mut skipped)| {
            doc.name_paths(&mut skipped);
            let committed = catch_unwind(AssertUnwindSafe(|| self.target.commit(prepared, &cfg)));
            if let Err(panic) = committed {
                // the swap happens first in every target: what was swapped in serves
                tracing::error!(
                    "committing the configuration from {origin} panicked: {}",
                    panic_message(&*panic)
                );
            }
            Applied {
                resources: resource_count(&cfg),
                skipped,
            }
        });
        let outcome = outcome.map_err(|mut e| {
            doc.name_paths(&mut e);
            e
        });
        match &outcome {
            Ok(a) => {
                self.status.commits.fetch_add(1, Ordering::Relaxed);
                self.status
                    .skipped
                    .fetch_add(a.skipped.0.len() as u64, Ordering::Relaxed);
                for e in &a.skipped.0 {
                    tracing::error!("{origin}: skipped invalid resource: {e}");
                }
                *self.status.last_error.lock() = None;
                *self.status.last_commit.lock() = Some(std::time::SystemTime::now());
                let prev = self.current.lock().replace(Arc::new(doc.clone()));
                let mut versions = self.status.versions.lock();
                for kind in crate::Kind::ALL {
                    if prev.as_deref().is_none_or(|p| !same_kind(p, doc, kind)) {
                        *versions.entry(kind).or_insert(0) += 1;
                    }
                }
            }
            Err(errs) => self.reject(origin, errs),
        }
        outcome
    }

    /// Records a change rejected whole: by [`Pipeline::apply`], or by a source that could not
    /// make a document of it (a syntax error, no `#END`).
    pub fn reject(&self, origin: &str, errs: &ConfigErrors) {
        self.status.rejected.fetch_add(1, Ordering::Relaxed);
        for e in &errs.0 {
            tracing::error!("{origin}: configuration rejected: {e}");
        }
        *self.status.last_error.lock() = Some(errs.to_string());
    }

    /// Records a failure of a source (the watcher could not read the file, say).
    pub fn source_failed(&self, origin: &str, why: &str) {
        self.status.source_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!("{origin}: {why}");
        *self.status.last_error.lock() = Some(why.to_owned());
    }
}

/// Whether `a` and `b` hold the same resources of `kind`.
fn same_kind(a: &Document, b: &Document, kind: crate::Kind) -> bool {
    let mut x = a.items.iter().filter(|i| i.kind == kind);
    let mut y = b.items.iter().filter(|i| i.kind == kind);
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(i), Some(j))
                if i.id == j.id && (Arc::ptr_eq(&i.value, &j.value) || i.value == j.value) => {}
            _ => return false,
        }
    }
}

fn remap(errs: ConfigErrors, pos: &Positions) -> ConfigErrors {
    ConfigErrors(
        errs.0
            .into_iter()
            .map(|mut e| {
                e.path = pos.remap(&e.path);
                e
            })
            .collect(),
    )
}

fn resource_count(cfg: &ConfigFile) -> usize {
    cfg.routes.len()
        + cfg.services.len()
        + cfg.upstreams.len()
        + cfg.plugin_configs.len()
        + cfg.global_rules.len()
        + cfg.consumers.len()
        + cfg.consumer_groups.len()
        + cfg.ssls.len()
        + cfg.plugin_metadata.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use polygate_model::env::MapEnv;
    use polygate_model::load::Format;
    use std::sync::Mutex as StdMutex;

    /// A target that refuses routes whose uri is `/bad`, panics on `/panic`, and records
    /// what was committed.
    #[derive(Default)]
    struct Probe {
        committed: StdMutex<Vec<Vec<String>>>,
    }

    impl Target for Probe {
        type Prepared = Vec<String>;
        fn prepare(&self, cfg: &ConfigFile) -> Result<Vec<String>, ConfigErrors> {
            let mut errs = ConfigErrors::default();
            for (i, r) in cfg.routes.iter().enumerate() {
                match r.uri.as_deref() {
                    Some("/bad") => errs.push(format!("routes[{i}].uri"), "bad uri"),
                    Some("/panic") => panic!("prepare exploded"),
                    _ => {}
                }
            }
            errs.into_result()?;
            Ok(cfg.routes.iter().filter_map(|r| r.uri.clone()).collect())
        }
        fn commit(&self, p: Vec<String>, _: &ConfigFile) {
            self.committed.lock().unwrap().push(p);
        }
    }

    fn doc(text: &str) -> Document {
        Document::parse(text, Format::Yaml, &MapEnv::default()).unwrap()
    }

    const ROUTES: &str = "routes:\n  - {uri: /a, upstream_id: u}\n  - {uri: /bad, upstream_id: u}\n  - {urix: /typo}\n  - {uri: /c, upstream_id: u}\n#END\n";

    #[test]
    fn invalid_resources_are_skipped_with_their_file_paths() {
        let p = Pipeline::new(Probe::default(), false);
        let a = p.apply(&doc(ROUTES), "test").unwrap();
        let paths: Vec<&str> = a.skipped.0.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"routes[1].uri"), "{paths:?}");
        assert!(
            paths.iter().any(|p| p.starts_with("routes[2]")),
            "{paths:?}"
        );
        assert_eq!(p.target().committed.lock().unwrap()[0], ["/a", "/c"]);
        assert_eq!(p.status().skipped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn strict_rejects_everything_and_commits_nothing() {
        let p = Pipeline::new(Probe::default(), true);
        let e = p.apply(&doc(ROUTES), "test").unwrap_err();
        // the typo, and the dangling upstream references
        assert!(e.to_string().contains("routes[2]"), "{e}");
        assert!(e.to_string().contains("upstream \"u\" not found"), "{e}");
        assert!(p.target().committed.lock().unwrap().is_empty());
        assert_eq!(p.status().rejected.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_panic_in_prepare_rejects_the_change() {
        let p = Pipeline::new(Probe::default(), false);
        let e = p
            .apply(
                &doc("routes:\n  - {uri: /panic, upstream_id: u}\n#END\n"),
                "test",
            )
            .unwrap_err();
        assert!(e.to_string().contains("prepare exploded"), "{e}");
        assert!(p.target().committed.lock().unwrap().is_empty());
        assert!(p.status().last_error.lock().is_some());
    }
}
