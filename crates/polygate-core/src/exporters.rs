//! Metrics that plugin crates add to the Prometheus endpoint (proxy-wasm filters' metrics):
//! each exporter appends text-format lines to the page.

use std::sync::Arc;

use parking_lot::RwLock;

type Exporter = Arc<dyn Fn(&mut String) + Send + Sync>;

static EXPORTERS: RwLock<Vec<Exporter>> = RwLock::new(Vec::new());

/// Adds an exporter, called on every scrape of the metrics endpoint.
pub fn add_metrics_exporter(f: Arc<dyn Fn(&mut String) + Send + Sync>) {
    EXPORTERS.write().push(f);
}

/// Appends every exporter's lines to `out`.
pub fn export_metrics(out: &mut String) {
    let list: Vec<Exporter> = EXPORTERS.read().clone();
    for e in list {
        e(out);
    }
}
