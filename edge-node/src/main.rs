//! silt-edge: the edge node binary. Reads its config, then runs the node until SIGTERM or
//! SIGINT; or, as `silt-edge dump`, prints a stopped node's records.
//!
//! # Layout
//! - `cli`: flags and `SILT_*` env vars, gathered into config sources; the `dump` subcommand.
//! - `config`: the TOML config, raw and validated, with its defaults.
//! - `node`: `run`, the node itself, given its config, admin listener, metrics and a shutdown
//!   future.
//! - `ingest`: `LogIngest`, the log behind the MQTT broker's ingest port, with group commit.
//! - `admin`: the admin port (`/health`, `/metrics`) and its minimal HTTP/1.1 codec.
//! - `telemetry`: the Prometheus recorder and the metrics the node reports.
//! - `dump`: `silt-edge dump`, the data directory as JSON lines.

mod admin;
mod cli;
mod config;
mod dump;
mod ingest;
mod node;
mod passwd;
mod telemetry;
mod uplink;

/// mimalloc instead of glibc's malloc: the ingest path allocates records on the connection
/// threads and frees them on the writer threads, which glibc's arenas handle poorly (half of
/// the CPU time of a QoS 0 load went to malloc and free). Built without transparent huge
/// pages (`no_thp`): with them, its arenas grew the resident set in 2 MiB steps, to 72 MiB
/// under a QoS 0 load that needs about 30.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::cli::{Cli, Command};
use crate::config::EdgeConfig;

/// Exit code for a config that cannot be used, as for bad command-line usage.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let (cli, matches) = Cli::parse_args();
    if let Some(Command::Dump(args)) = &cli.command {
        // Only warnings: the log's routine info lines would bury the error a user needs, and
        // stdout carries the records.
        init_tracing(LevelFilter::WARN);
        return dump::main(args);
    }
    if let Some(Command::Passwd(args)) = &cli.command {
        return match passwd::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("silt-edge passwd: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match cli
        .sources(&matches, std::env::vars_os())
        .and_then(|sources| EdgeConfig::resolve(&sources))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("silt-edge: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }

    init_tracing(LevelFilter::INFO);
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("silt-edge failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `level`); colours only on a terminal, so
/// journald and log files get plain text.
fn init_tracing(level: LevelFilter) {
    let filter = EnvFilter::builder()
        .with_default_directive(level.into())
        .from_env_lossy();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn serve(config: EdgeConfig) -> anyhow::Result<()> {
    // One worker per core: connections spread over the cores, while appends and fsyncs run on
    // the ingest writer threads. The blocking pool (log open/close, retention) stays small.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        // Handlers are installed before the node starts, so a signal that arrives once it
        // says it has started always means a clean shutdown.
        let shutdown = shutdown_signal()?;
        let metrics = telemetry::install_recorder()?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on admin_listen {} (set --admin-listen)",
                    config.admin_listen
                )
            })?;
        node::run(config, admin_listener, metrics, shutdown).await
    })
}

/// Completes on the first SIGTERM (systemd's stop) or SIGINT (Ctrl-C).
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
    })
}
