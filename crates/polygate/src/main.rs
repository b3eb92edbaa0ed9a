//! The `polygate` binary: command line and wiring only.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use polygate_proxy::{ConfigSource, load, serve};

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

fn init_logs(level: &str) {
    let filter = std::env::var("POLYGATE_LOG").unwrap_or_else(|_| level.to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // keep the FFI host's C functions in the executable (the build script exports them)
    std::hint::black_box(polygate_ffi::abi::exported_symbols());
    let mut registry = polygate_plugins::registry();
    registry.register(std::sync::Arc::new(polygate_ffi::plugin::FfiFactory));
    polygate_lua::register(&mut registry);
    registry.add_config_hook(std::sync::Arc::new(|cfg| {
        let dirs = cfg
            .gateway
            .as_ref()
            .map(|g| g.ffi_lib_path.clone())
            .unwrap_or_default();
        let host = polygate_ffi::host();
        host.set_lib_path(dirs.into_iter().map(Into::into).collect());
        // runtimes that neither the served configuration nor a request in flight still uses
        host.unload_unused();
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
        Cmd::Validate { config } => match load(&ConfigSource::File(config.clone()), &registry) {
            Ok((_, snap)) => {
                println!("{}: ok ({} routes)", config.display(), snap.router.len());
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
        Cmd::Run { config } => {
            let source = match config {
                Some(p) => ConfigSource::File(p),
                None => ConfigSource::Embedded(DEFAULT_CONFIG),
            };
            let name = match &source {
                ConfigSource::File(p) => p.display().to_string(),
                ConfigSource::Embedded(_) => "built-in default configuration".to_owned(),
            };
            let (_, snap) = match load(&source, &registry) {
                Ok(x) => x,
                Err(errs) => {
                    eprintln!("polygate: {name}: invalid configuration:");
                    for e in &errs.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            init_logs(&snap.gateway.log_level);
            tracing::info!(
                "polygate {} starting with {name} ({} routes)",
                env!("CARGO_PKG_VERSION"),
                snap.router.len()
            );
            match serve(source, registry, snap) {
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
