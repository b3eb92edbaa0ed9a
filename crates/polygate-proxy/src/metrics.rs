//! Process-wide counters, exposed in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use http::StatusCode;

/// Counters updated on the request path (relaxed atomics, no locks).
#[derive(Default)]
pub struct Metrics {
    by_class: [AtomicU64; 6],
    /// Client connections currently open.
    pub connections_active: AtomicU64,
    /// Client connections accepted.
    pub connections_total: AtomicU64,
    /// The etcd source's state, when resources come from etcd (`apisix_etcd_reachable`).
    pub etcd: std::sync::OnceLock<std::sync::Arc<polygate_config::etcd::EtcdState>>,
}

impl Metrics {
    /// Counts one response.
    pub fn record(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).min(5) as usize;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Total responses with this status class (1..=5).
    pub fn responses(&self, class: usize) -> u64 {
        self.by_class[class.min(5)].load(Ordering::Relaxed)
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self, config_version: u64, config: &polygate_config::Status) -> String {
        let mut s = String::new();
        s.push_str("# HELP polygate_http_requests_total Responses sent, by status class.\n");
        s.push_str("# TYPE polygate_http_requests_total counter\n");
        for c in 1..=5 {
            let _ = writeln!(
                s,
                "polygate_http_requests_total{{code=\"{c}xx\"}} {}",
                self.responses(c)
            );
        }
        let g = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut s,
            "polygate_connections_active",
            "Client connections open.",
            "gauge",
            self.connections_active.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "polygate_connections_total",
            "Client connections accepted.",
            "counter",
            self.connections_total.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "polygate_config_reloads_total",
            "Configuration reloads applied (the first load not counted).",
            "counter",
            config.commits.load(Ordering::Relaxed).saturating_sub(1),
        );
        g(
            &mut s,
            "polygate_config_reload_errors_total",
            "Configuration changes rejected whole.",
            "counter",
            config.rejected.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "polygate_config_skipped_resources_total",
            "Invalid resources skipped (not served) across all loads.",
            "counter",
            config.skipped.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "polygate_config_source_errors_total",
            "Failures reading the configuration source (the file, the watcher).",
            "counter",
            config.source_errors.load(Ordering::Relaxed),
        );
        g(
            &mut s,
            "polygate_config_last_change_failed",
            "1 when the last configuration change was rejected or could not be read.",
            "gauge",
            u64::from(config.last_error.lock().is_some()),
        );
        g(
            &mut s,
            "polygate_config_version",
            "Version of the served configuration.",
            "gauge",
            config_version,
        );
        self.render_apisix(&mut s);
        polygate_core::exporters::export_metrics(&mut s);
        s
    }

    /// APISIX's process-wide gauges (its `prometheus` exporter's names).
    fn render_apisix(&self, s: &mut String) {
        let accepted = self.connections_total.load(Ordering::Relaxed);
        let active = self.connections_active.load(Ordering::Relaxed);
        s.push_str(
            "# HELP apisix_nginx_http_current_connections Number of HTTP connections
\
             # TYPE apisix_nginx_http_current_connections gauge
",
        );
        // polygate does not tell reading, writing and waiting connections apart: an open
        // connection is counted as active (and, between requests, as waiting is not known)
        for (state, v) in [
            ("accepted", accepted),
            ("active", active),
            ("handled", accepted),
        ] {
            let _ = writeln!(
                s,
                "apisix_nginx_http_current_connections{{state=\"{state}\"}} {v}"
            );
        }
        let total: u64 = (1..=5).map(|c| self.responses(c)).sum();
        let _ = writeln!(
            s,
            "# HELP apisix_http_requests_total The total number of client requests since APISIX started
\
             # TYPE apisix_http_requests_total gauge
apisix_http_requests_total {total}"
        );
        let host = polygate_core::time::hostname();
        let _ = writeln!(
            s,
            "# HELP apisix_node_info Info of APISIX node
# TYPE apisix_node_info gauge
\
             apisix_node_info{{hostname=\"{}\",version=\"polygate-{}\"}} 1",
            host.replace(['"', '\\', '\n'], "_"),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(e) = self.etcd.get() {
            let _ = writeln!(
                s,
                "# HELP apisix_etcd_reachable Config server etcd reachable from APISIX, 0 is unreachable
\
                 # TYPE apisix_etcd_reachable gauge
apisix_etcd_reachable {}",
                u8::from(e.connected.load(Ordering::Acquire))
            );
            let _ = writeln!(
                s,
                "# HELP apisix_etcd_modify_indexes Etcd modify index for APISIX keys
\
                 # TYPE apisix_etcd_modify_indexes gauge
\
                 apisix_etcd_modify_indexes{{key=\"x_etcd_index\"}} {}",
                e.revision.load(Ordering::Acquire)
            );
        }
    }
}
