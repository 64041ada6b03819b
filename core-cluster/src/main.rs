//! silt-core: the core node binary. Reads its config, then runs the node until SIGTERM or
//! SIGINT.
//!
//! # Layout
//! - `cli`: flags and `SILT_*` env vars, gathered into config sources.
//! - `config`: the TOML config, raw and validated, with its defaults.
//! - `node`: `run`, the node itself, given its config, listeners, metrics and a shutdown
//!   future.
//! - `broker`: the broker behind the Kafka gateway: leadership, idempotent producers,
//!   consumer groups, committed offsets.
//! - `admin`: the admin port (`/health`, `/metrics`) and its minimal HTTP/1.1 codec.
//! - `telemetry`: the Prometheus recorder and the metrics the node reports.
//! - `tier`: tiering: the offload loop, archive-bounded local retention, backpressure and the
//!   tier status endpoint, over `silt-tiering`.

mod admin;
mod broker;
mod cli;
mod config;
mod node;
mod telemetry;
mod tier;
mod tls;
mod uplink;

/// mimalloc, as on the edge, for a reason of its own here: `kafka-protocol` 0.18 sizes a
/// vector from an array's element count before decoding one element, so a 20-byte request
/// claiming 2^31 elements asks for hundreds of GB at once. glibc's malloc fails that and the
/// process aborts; mimalloc reserves address space without committing it (MAP_NORESERVE, with
/// the kernel's default overcommit), so the decode fails on the missing bytes and only that
/// connection closes. `kafka_bad_input` checks it. A bound in the codec itself is the real fix
/// (upstream pull requests are open).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use crate::cli::Cli;
use crate::config::CoreConfig;

/// Exit code for a config that cannot be used, as for bad command-line usage.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // object_store's S3 client links aws-lc-rs next to our ring: with two providers compiled
    // in, rustls refuses to pick one and panics on the first config built without an explicit
    // provider. The node uses ring everywhere, so say so before anything builds a config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|first| first == "issue-cert") {
        return match tls::issue_cert_main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("silt-core issue-cert: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let (cli, matches) = Cli::parse_args();
    let config = match cli
        .sources(&matches, std::env::vars_os())
        .and_then(|sources| CoreConfig::resolve(&sources))
    {
        Ok(config) => config,
        Err(error) => {
            eprintln!("silt-core: {error}");
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
            tracing::error!("silt-core failed: {error:#}");
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

fn serve(config: CoreConfig) -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        // Handlers are installed before the node starts, so a signal that arrives once it
        // says it has started always means a clean shutdown.
        let shutdown = shutdown_signal()?;
        let metrics = telemetry::install_recorder()?;
        let listeners = node::Listeners {
            admin: bind(config.admin_listen, "admin_listen (--admin-listen)").await?,
            kafka: bind(config.kafka.listen, "kafka.listen (--kafka-listen)").await?,
            uplink: std::net::UdpSocket::bind(config.uplink.listen).with_context(|| {
                format!(
                    "cannot listen on uplink.listen (--uplink-listen) {}",
                    config.uplink.listen
                )
            })?,
        };
        node::run(config, listeners, metrics, shutdown).await
    })
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} {addr}"))
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
