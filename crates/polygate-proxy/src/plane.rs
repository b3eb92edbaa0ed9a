//! The data plane as the configuration pipeline's [`Target`]: prepare builds a [`Snapshot`]
//! (no effect on the running process), commit swaps it in and then applies process-wide
//! state through the plugin registry's commit hooks and the plugins' `on_commit`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use polygate_config::Target;
use polygate_core::PluginRegistry;
use polygate_model::{ConfigErrors, ConfigFile, GatewaySection};

use crate::snapshot::Snapshot;

/// The served snapshot and what builds the next one.
pub struct DataPlane {
    registry: PluginRegistry,
    /// The served configuration, swapped atomically at commit.
    pub snapshot: ArcSwap<Snapshot>,
    /// Commits so far (0: nothing committed yet, the snapshot is empty).
    commits: AtomicU64,
}

impl DataPlane {
    /// A data plane serving nothing yet.
    pub fn new(registry: PluginRegistry) -> Result<DataPlane, ConfigErrors> {
        let empty = Snapshot::build(&ConfigFile::default(), &registry, None)?;
        Ok(DataPlane {
            registry,
            snapshot: ArcSwap::from_pointee(empty),
            commits: AtomicU64::new(0),
        })
    }

    /// The plugin registry.
    pub fn registry(&self) -> &PluginRegistry {
        &self.registry
    }
}

impl Target for DataPlane {
    type Prepared = Snapshot;

    fn prepare(&self, cfg: &ConfigFile) -> Result<Snapshot, ConfigErrors> {
        let prev = self.snapshot.load();
        let prev = (self.commits.load(Ordering::Acquire) > 0).then_some(&**prev);
        Snapshot::build(cfg, &self.registry, prev)
    }

    fn commit(&self, next: Snapshot, cfg: &ConfigFile) {
        let first = self.commits.fetch_add(1, Ordering::AcqRel) == 0;
        let prev = self.snapshot.load_full();
        if !first && !same_process_settings(&prev.gateway, &next.gateway) {
            tracing::warn!(
                "gateway: listener/worker/log settings changed; they apply after a restart"
            );
        }
        // process-wide settings first (FFI library path, Lua settings), then what the new
        // plugins need (FFI runtimes), then the swap, then cleanup of what nothing uses
        self.registry.apply_commit_hooks(cfg);
        next.commit_plugins();
        self.snapshot.store(Arc::new(next));
        drop(prev);
        self.registry.apply_after_commit_hooks(cfg);
    }
}

fn same_process_settings(a: &GatewaySection, b: &GatewaySection) -> bool {
    a.listeners == b.listeners
        && a.worker_threads == b.worker_threads
        && a.metrics == b.metrics
        && a.access_log == b.access_log
        && a.log_level == b.log_level
}
