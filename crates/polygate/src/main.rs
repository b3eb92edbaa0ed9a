//! The `polygate` binary: command line and wiring only.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use polygate_proxy::{ConfigSource, check, serve, start};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The built-in configuration used by `polygate run` without `-c`.
const DEFAULT_CONFIG: &str = include_str!("default.yaml");

#[derive(Parser)]
#[command(
    name = "polygate",
    version,
    about = "polygate: an APISIX-compatible API gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway (with the built-in demo configuration when no file is given).
    Run {
        /// Configuration file (YAML ending with `#END`, or JSON); watched for changes.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Refuse any configuration (at start and on reload) with an invalid resource or a
        /// reference to a missing one, instead of skipping those resources as APISIX does.
        #[arg(long)]
        strict: bool,
    },
    /// Check a configuration file and exit (non-zero when invalid).
    Validate {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Print the version.
    Version,
    /// Print the built-in default configuration.
    DefaultConfig,
}

/// Sets up logging to stderr at `level` (or `POLYGATE_LOG`); the returned function changes the
/// level later (to the configuration's `gateway.log_level`) unless `POLYGATE_LOG` is set.
fn init_logs(level: &str) -> impl Fn(&str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let from_env = std::env::var("POLYGATE_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::new(from_env.as_deref().unwrap_or(level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
    move |level: &str| {
        if from_env.is_none() {
            let _ = handle.reload(tracing_subscriber::EnvFilter::new(level));
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Run { .. } = cli.cmd {
        // the main thread becomes the FFI loading thread (every dlopen and libffi_init runs
        // there, and the process exits from it, as an nginx worker does); the gateway runs on a
        // thread of its own
        let code = polygate_ffi::loader::run_main(move || run(cli));
        // library destructors run after main returns, on this thread; bound them
        polygate_ffi::loader::exit_watchdog(
            i32::from(code == ExitCode::FAILURE),
            std::time::Duration::from_secs(5),
        );
        return code;
    }
    run(cli)
}

fn run(cli: Cli) -> ExitCode {
    // keep the FFI host's C functions in the executable (the build script exports them)
    std::hint::black_box(polygate_ffi::abi::exported_symbols());
    let mut registry = polygate_plugins::registry();
    registry.register(std::sync::Arc::new(polygate_ffi::plugin::FfiFactory));
    polygate_lua::register(&mut registry);
    // after every built-in plugin: their names are not available to wasm plugins
    polygate_wasm::register(&mut registry);
    registry.add_commit_hook(std::sync::Arc::new(|cfg| {
        let dirs = cfg
            .gateway
            .as_ref()
            .map(|g| g.ffi_lib_path.clone())
            .unwrap_or_default();
        polygate_ffi::host().set_lib_path(dirs.into_iter().map(Into::into).collect());
    }));
    registry.add_after_commit_hook(std::sync::Arc::new(|_| {
        // runtimes that neither the served configuration nor a request in flight still uses
        polygate_ffi::host().unload_unused();
    }));
    match cli.cmd {
        Cmd::Version => {
            println!("polygate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Cmd::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Cmd::Validate { config } => match check(&ConfigSource::File(config.clone()), &registry) {
            Ok(routes) => {
                println!("{}: ok ({routes} routes)", config.display());
                ExitCode::SUCCESS
            }
            Err(errs) => {
                eprintln!("{}: invalid configuration:", config.display());
                for e in &errs.0 {
                    eprintln!("  {e}");
                }
                ExitCode::FAILURE
            }
        },
        Cmd::Run { config, strict } => {
            let source = match config {
                Some(p) => ConfigSource::File(p),
                None => ConfigSource::Embedded(DEFAULT_CONFIG),
            };
            let name = source.name();
            // logs go to stderr from the start: the first load logs the resources it skips
            let set_level = init_logs("info");
            // polygate's stop-signal handling, kept over whatever handlers runtimes install
            let stop = match polygate_ffi::signals::install() {
                Ok(rx) => Some(rx),
                Err(e) => {
                    tracing::warn!("signals: {e}; using the default handlers");
                    None
                }
            };
            let started = match start(&source, registry, strict) {
                Ok(x) => x,
                Err(errs) => {
                    eprintln!("polygate: {name}: invalid configuration:");
                    for e in &errs.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            let snap = started.config.target().snapshot.load_full();
            set_level(&snap.gateway.log_level);
            tracing::info!(
                "polygate {} starting with {name} ({} routes, {} invalid resources skipped)",
                env!("CARGO_PKG_VERSION"),
                snap.router.len(),
                started.applied.skipped.0.len()
            );
            drop(snap);
            let served = serve(source, started, stop);
            // the runtimes' poll threads end before the process exits (on the main thread,
            // where library destructors such as an interpreter's finalisation then run)
            polygate_ffi::host().unload_all();
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("polygate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
