//! Process-wide state filters share across instances and worker threads: key-value data with
//! compare-and-swap, queues, and metrics (exported on the Prometheus endpoint). Keyed by VM id
//! as in Envoy.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Once};

use parking_lot::{Mutex, RwLock};

use crate::abi::{metric, status};

/// Largest shared value or queued item.
const MAX_VALUE: usize = 1 << 20;
/// Largest number of items one queue holds (enqueue past it is refused).
const MAX_QUEUED: usize = 10_000;

type DataMap = HashMap<(String, Vec<u8>), (Vec<u8>, u32)>;
static DATA: Mutex<Option<DataMap>> = Mutex::new(None);
static CAS: AtomicU64 = AtomicU64::new(1);

/// `proxy_get_shared_data`: the value and its CAS token.
pub fn get_data(vm: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
    DATA.lock()
        .as_ref()?
        .get(&(vm.to_owned(), key.to_vec()))
        .cloned()
}

/// `proxy_set_shared_data`: a non-zero `cas` must match the current token.
pub fn set_data(vm: &str, key: Vec<u8>, value: Vec<u8>, cas: u32) -> i32 {
    if value.len() > MAX_VALUE {
        return status::BAD_ARGUMENT;
    }
    let mut g = DATA.lock();
    let map = g.get_or_insert_with(HashMap::new);
    let k = (vm.to_owned(), key);
    if cas != 0 && map.get(&k).map(|(_, c)| *c) != Some(cas) {
        return status::CAS_MISMATCH;
    }
    // tokens are never 0 (0 means "no check")
    let next = (CAS.fetch_add(1, Ordering::Relaxed) as u32).max(1);
    map.insert(k, (value, next));
    status::OK
}

/// Who hears that a queue got an item: the last context that registered it.
#[derive(Clone)]
pub struct QueueOwner {
    /// The owning thread's dispatcher.
    pub tx: tokio::sync::mpsc::UnboundedSender<crate::vm::Event>,
    /// The plugin definition id.
    pub def: u64,
    /// The root context.
    pub root: u32,
}

struct Queue {
    items: VecDeque<Vec<u8>>,
    owner: Option<QueueOwner>,
}

#[derive(Default)]
struct Queues {
    by_name: HashMap<(String, Vec<u8>), u32>,
    queues: Vec<Queue>,
}

static QUEUES: Mutex<Option<Queues>> = Mutex::new(None);

/// `proxy_register_shared_queue`: the id of `(vm, name)`, created if new.
pub fn register_queue(vm: &str, name: &[u8]) -> u32 {
    let mut g = QUEUES.lock();
    let q = g.get_or_insert_with(Queues::default);
    if let Some(id) = q.by_name.get(&(vm.to_owned(), name.to_vec())) {
        return *id;
    }
    q.queues.push(Queue {
        items: VecDeque::new(),
        owner: None,
    });
    let id = q.queues.len() as u32;
    q.by_name.insert((vm.to_owned(), name.to_vec()), id);
    id
}

/// Makes `owner` the one told about new items of queue `id`.
pub fn set_queue_owner(id: u32, owner: QueueOwner) {
    if let Some(q) = QUEUES
        .lock()
        .as_mut()
        .and_then(|q| q.queues.get_mut(id as usize - 1))
    {
        q.owner = Some(owner);
    }
}

/// `proxy_resolve_shared_queue`.
pub fn resolve_queue(vm: &str, name: &[u8]) -> Option<u32> {
    QUEUES
        .lock()
        .as_ref()?
        .by_name
        .get(&(vm.to_owned(), name.to_vec()))
        .copied()
}

/// `proxy_enqueue_shared_queue`.
pub fn enqueue(id: u32, value: Vec<u8>) -> i32 {
    if value.len() > MAX_VALUE {
        return status::BAD_ARGUMENT;
    }
    let owner = {
        let mut g = QUEUES.lock();
        let Some(q) = g
            .as_mut()
            .and_then(|q| q.queues.get_mut((id as usize).wrapping_sub(1)))
        else {
            return status::NOT_FOUND;
        };
        if q.items.len() >= MAX_QUEUED {
            return status::INTERNAL_FAILURE;
        }
        q.items.push_back(value);
        q.owner.clone()
    };
    if let Some(o) = owner {
        let _ = o.tx.send(crate::vm::Event::QueueReady {
            def: o.def,
            root: o.root,
            queue: id,
        });
    }
    status::OK
}

/// `proxy_dequeue_shared_queue`: `EMPTY` when nothing is queued.
pub fn dequeue(id: u32) -> Result<Vec<u8>, i32> {
    let mut g = QUEUES.lock();
    let q = g
        .as_mut()
        .and_then(|q| q.queues.get_mut((id as usize).wrapping_sub(1)))
        .ok_or(status::NOT_FOUND)?;
    q.items.pop_front().ok_or(status::EMPTY)
}

/// Histogram buckets (Envoy's default histogram buckets).
const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

struct Metric {
    name: String,
    kind: i32,
    value: AtomicI64,
    hist: Option<Mutex<([u64; 19], u64, u64)>>,
}

static METRICS: RwLock<Vec<Arc<Metric>>> = RwLock::new(Vec::new());
static EXPORTER: Once = Once::new();

/// `proxy_define_metric`: the same name and type give the same id in every instance.
pub fn define_metric(kind: i32, name: &str) -> Result<u32, i32> {
    if !matches!(kind, metric::COUNTER | metric::GAUGE | metric::HISTOGRAM) || name.is_empty() {
        return Err(status::BAD_ARGUMENT);
    }
    EXPORTER.call_once(|| polygate_core::exporters::add_metrics_exporter(Arc::new(export)));
    let mut m = METRICS.write();
    if let Some(i) = m.iter().position(|x| x.name == name && x.kind == kind) {
        return Ok(i as u32 + 1);
    }
    m.push(Arc::new(Metric {
        name: name.to_owned(),
        kind,
        value: AtomicI64::new(0),
        hist: (kind == metric::HISTOGRAM).then(|| Mutex::new(([0; 19], 0, 0))),
    }));
    Ok(m.len() as u32)
}

fn metric(id: u32) -> Option<Arc<Metric>> {
    METRICS.read().get((id as usize).wrapping_sub(1)).cloned()
}

/// `proxy_increment_metric`: counters only go up; histograms take `record`.
pub fn increment_metric(id: u32, delta: i64) -> i32 {
    let Some(m) = metric(id) else {
        return status::NOT_FOUND;
    };
    match m.kind {
        metric::COUNTER if delta < 0 => status::BAD_ARGUMENT,
        metric::COUNTER | metric::GAUGE => {
            m.value.fetch_add(delta, Ordering::Relaxed);
            status::OK
        }
        _ => status::BAD_ARGUMENT,
    }
}

/// `proxy_record_metric`: adds to a counter, sets a gauge, observes a histogram (as Envoy).
pub fn record_metric(id: u32, v: u64) -> i32 {
    let Some(m) = metric(id) else {
        return status::NOT_FOUND;
    };
    match m.kind {
        metric::COUNTER => {
            m.value.fetch_add(v as i64, Ordering::Relaxed);
        }
        metric::GAUGE => m.value.store(v as i64, Ordering::Relaxed),
        _ => {
            if let Some(h) = &m.hist {
                let mut h = h.lock();
                for (i, b) in BUCKETS.iter().enumerate() {
                    if v as f64 <= *b {
                        h.0[i] += 1;
                    }
                }
                h.1 += 1;
                h.2 = h.2.wrapping_add(v);
            }
        }
    }
    status::OK
}

/// `proxy_get_metric`.
pub fn get_metric(id: u32) -> Result<u64, i32> {
    let m = metric(id).ok_or(status::NOT_FOUND)?;
    match m.kind {
        metric::HISTOGRAM => Err(status::BAD_ARGUMENT),
        _ => Ok(m.value.load(Ordering::Relaxed) as u64),
    }
}

/// A Prometheus metric name from a filter's (other characters become `_`).
fn prom_name(n: &str) -> String {
    let mut s: String = n
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// Appends every filter metric in the Prometheus text format.
pub fn export(out: &mut String) {
    let list: Vec<Arc<Metric>> = METRICS.read().clone();
    for m in list {
        let n = prom_name(&m.name);
        match m.kind {
            metric::COUNTER | metric::GAUGE => {
                let t = if m.kind == metric::COUNTER {
                    "counter"
                } else {
                    "gauge"
                };
                let _ = writeln!(
                    out,
                    "# HELP {n} proxy-wasm filter metric {:?}.\n# TYPE {n} {t}\n{n} {}",
                    m.name,
                    m.value.load(Ordering::Relaxed)
                );
            }
            _ => {
                let Some(h) = &m.hist else { continue };
                let (b, count, sum) = *h.lock();
                let _ = writeln!(
                    out,
                    "# HELP {n} proxy-wasm filter metric {:?}.\n# TYPE {n} histogram",
                    m.name
                );
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(out, "{n}_bucket{{le=\"{le}\"}} {}", b[i]);
                }
                let _ = writeln!(
                    out,
                    "{n}_bucket{{le=\"+Inf\"}} {count}\n{n}_sum {sum}\n{n}_count {count}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_rules() {
        assert_eq!(set_data("t", b"k".to_vec(), b"1".to_vec(), 0), status::OK);
        let (v, cas) = get_data("t", b"k").expect("set");
        assert_eq!(v, b"1");
        assert_eq!(
            set_data("t", b"k".to_vec(), b"2".to_vec(), cas + 1000),
            status::CAS_MISMATCH
        );
        assert_eq!(set_data("t", b"k".to_vec(), b"2".to_vec(), cas), status::OK);
        assert_eq!(
            set_data("t", b"k".to_vec(), b"3".to_vec(), cas),
            status::CAS_MISMATCH
        );
        assert!(get_data("other-vm", b"k").is_none());
    }

    #[test]
    fn queues() {
        let id = register_queue("t", b"q");
        assert_eq!(register_queue("t", b"q"), id);
        assert_eq!(resolve_queue("t", b"q"), Some(id));
        assert_eq!(resolve_queue("t", b"none"), None);
        assert_eq!(dequeue(id), Err(status::EMPTY));
        assert_eq!(enqueue(id, b"a".to_vec()), status::OK);
        assert_eq!(dequeue(id), Ok(b"a".to_vec()));
        assert_eq!(enqueue(99_999, b"a".to_vec()), status::NOT_FOUND);
    }

    #[test]
    fn metrics() {
        let c = define_metric(metric::COUNTER, "t.requests").expect("counter");
        assert_eq!(define_metric(metric::COUNTER, "t.requests"), Ok(c));
        assert_eq!(increment_metric(c, 2), status::OK);
        assert_eq!(increment_metric(c, -1), status::BAD_ARGUMENT);
        assert_eq!(get_metric(c), Ok(2));
        let h = define_metric(metric::HISTOGRAM, "t.latency").expect("histogram");
        assert_eq!(record_metric(h, 7), status::OK);
        assert_eq!(get_metric(h), Err(status::BAD_ARGUMENT));
        let mut out = String::new();
        export(&mut out);
        assert!(out.contains("t_requests 2"), "{out}");
        assert!(out.contains("t_latency_bucket{le=\"10\"} 1"), "{out}");
        assert!(out.contains("t_latency_count 1"), "{out}");
    }
}
