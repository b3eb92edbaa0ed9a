//! The process's one wasmtime engine (epoch interruption, pooling allocator), modules compiled
//! once per content hash, and the checks a module passes before any request sees it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

use crate::abi::AbiVersion;
use crate::error::LoadError;

/// How often the epoch advances: the granularity of the per-callback CPU limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Instance slots of the pooling allocator (one instance per filter and worker thread, plus
/// those being rebuilt or kept by in-flight requests across a reload).
const POOL_INSTANCES: u32 = 1000;

/// Virtual address space reserved per linear memory: the largest `memory_limit` allowed.
/// Reservations are address space only (`PROT_NONE`), and they let bounds checks be elided.
const MEMORY_RESERVATION: u64 = 4 << 30;

struct Shared {
    engine: Engine,
}

static ENGINE: OnceLock<Result<Shared, String>> = OnceLock::new();

/// How instances get their memory.
fn config(pooled: bool) -> Config {
    let mut cfg = Config::new();
    cfg.epoch_interruption(true)
        .max_wasm_stack(512 << 10)
        // wasm faults become traps through signal handlers that chain to the handlers
        // already installed (Go, the JVM, Node) for faults outside wasm code; see docs/wasm.md
        .signals_based_traps(true);
    if pooled {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(POOL_INSTANCES)
            .total_memories(POOL_INSTANCES)
            .total_tables(POOL_INSTANCES)
            .max_memory_size(MEMORY_RESERVATION as usize)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .table_elements(20_000)
            .max_core_instance_size(1 << 20)
            .max_unused_warm_slots(64);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(MEMORY_RESERVATION)
            .memory_guard_size(32 << 20);
    } else {
        // memories reserved as they grow, with explicit bounds checks
        cfg.allocation_strategy(InstanceAllocationStrategy::OnDemand)
            .memory_reservation(0)
            .memory_guard_size(0);
    }
    cfg
}

/// The engine; created (and the epoch thread started) on first use. The pooling allocator
/// reserves about 4 TiB of address space up front; where the process cannot (a limited
/// address space: `ulimit -v`, valgrind, small-VA kernels), instances are allocated on
/// demand instead (logged).
pub fn engine() -> Result<&'static Engine, LoadError> {
    let s = ENGINE.get_or_init(|| {
        let engine = match Engine::new(&config(true)) {
            Ok(e) => e,
            Err(pool_err) => {
                let e = Engine::new(&config(false)).map_err(|e| format!("{e:#}"))?;
                tracing::warn!(
                    "wasm: the pooling allocator's reservation failed ({pool_err:#}); instances are allocated on demand"
                );
                e
            }
        };
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("polygate-wasm-epoch".into())
            .spawn(move || {
                while let Some(e) = weak.upgrade() {
                    e.increment_epoch();
                    drop(e);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .map_err(|e| format!("starting the epoch thread: {e}"))?;
        Ok(Shared { engine })
    });
    match s {
        Ok(s) => Ok(&s.engine),
        Err(e) => Err(LoadError::Engine(e.clone())),
    }
}

/// A compiled, checked module.
pub struct CompiledModule {
    /// The module.
    pub module: Module,
    /// Its ABI version.
    pub abi: AbiVersion,
    /// Content hash (FNV-1a 64 of the file's bytes), for logs.
    pub hash: u64,
}

static MODULES: Mutex<Option<HashMap<u64, Weak<CompiledModule>>>> = Mutex::new(None);

/// FNV-1a, 64 bits: the module cache key (collisions would need the same length too).
fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= u64::from(x);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (b.len() as u64).rotate_left(32)
}

/// Compiles `bytes` (binary or text) once per content: a module still in use anywhere is
/// reused. Checks the ABI marker and the memory export.
pub fn compile(bytes: &[u8]) -> Result<Arc<CompiledModule>, LoadError> {
    let hash = fnv1a(bytes);
    {
        let mut m = MODULES.lock();
        let map = m.get_or_insert_with(HashMap::new);
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(c) = map.get(&hash).and_then(Weak::upgrade) {
            return Ok(c);
        }
    }
    let engine = engine()?;
    let module = Module::new(engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
    let abi = match AbiVersion::detect(module.exports().map(|e| e.name())) {
        Ok(Some(v)) => v,
        Ok(None) => return Err(LoadError::NoAbiMarker),
        Err(name) => return Err(LoadError::UnknownAbi(name)),
    };
    if !module
        .exports()
        .any(|e| e.name() == "memory" && e.ty().memory().is_some())
    {
        return Err(LoadError::NoMemory);
    }
    // as proxy-wasm-cpp-host, which refuses a module it cannot hand data to
    if !module.exports().any(|e| {
        matches!(e.name(), "proxy_on_memory_allocate" | "malloc") && e.ty().func().is_some()
    }) {
        return Err(LoadError::NoAllocator);
    }
    let c = Arc::new(CompiledModule { module, abi, hash });
    MODULES
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(hash, Arc::downgrade(&c));
    Ok(c)
}
