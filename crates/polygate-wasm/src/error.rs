//! Errors of loading modules and of running filters.

/// Why a module cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The engine could not be created.
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Not a valid module.
    #[error("not a valid wasm module: {0}")]
    Compile(String),
    /// No `proxy_abi_version_*` export.
    #[error(
        "the module exports no proxy_abi_version_* marker (proxy-wasm ABI 0.1.0, 0.2.0 or 0.2.1 expected)"
    )]
    NoAbiMarker,
    /// A marker of a version this host does not implement.
    #[error(
        "the module declares an ABI this host does not implement ({0}; 0.1.0, 0.2.0 and 0.2.1 are)"
    )]
    UnknownAbi(String),
    /// No exported memory.
    #[error("the module exports no memory named \"memory\"")]
    NoMemory,
    /// Neither `proxy_on_memory_allocate` nor `malloc` is exported.
    #[error("the module exports no allocator (proxy_on_memory_allocate or malloc)")]
    NoAllocator,
    /// An import no released ABI has.
    #[error("the module imports {0}, which this host does not provide")]
    UnknownImport(String),
    /// Linking failed.
    #[error("linking the module: {0}")]
    Link(String),
}

/// A filter call that failed: the request fails and the instance is rebuilt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VmError {
    /// The guest trapped (including a CPU-limit interruption).
    #[error("trap: {0}")]
    Trap(String),
    /// The instance could not be created or started.
    #[error("instance start failed: {0}")]
    Start(String),
    /// A root context refused its configuration.
    #[error("{0} returned false")]
    Refused(&'static str),
}
