//! The edge node's top-level `run`: what an edge node does between start and shutdown.
//!
//! Today an edge node owns its local data directory and its admin port: it serves `/health`
//! and `/metrics` from the start, opens the data directory (recovering it after an unclean
//! stop), applies retention on a timer, and on shutdown reports itself unhealthy, closes the
//! log cleanly so the next start skips recovery, and only then stops the admin port. The MQTT
//! broker and the uplink plug in here as they arrive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use silt_log::LogManager;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, Admin, NodeState};
use crate::config::EdgeConfig;

/// How often retention runs over every partition.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);
/// How often the metrics recorder drains its histogram samples, so that they stay bounded
/// between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs an edge node with `config` until `shutdown` completes.
///
/// It takes its whole world as arguments (the admin listener already bound, the metrics
/// handle, the shutdown future), so tests can bind port 0 and run nodes in-process.
pub(crate) async fn run(
    config: EdgeConfig,
    admin_listener: TcpListener,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let admin_addr = admin_listener
        .local_addr()
        .context("cannot read the admin listener's address")?;
    let (state, state_receiver) = watch::channel(NodeState::Starting);
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let mut admin_server = AbortOnDrop(tokio::spawn(admin::serve(
        admin_listener,
        Admin::new(state_receiver, metrics.clone()),
        async move {
            let _ = admin_stopped.await;
        },
    )));

    let data_dir = config.log.data_dir.clone();
    let log_config = config.log.clone();
    // Opening may scan segments after a crash: blocking work, off the runtime's thread.
    let log = tokio::task::spawn_blocking(move || LogManager::open(log_config))
        .await
        .context("opening the data directory panicked")?
        .with_context(|| format!("cannot open data directory {}", data_dir.display()))?;
    state.send_replace(NodeState::Serving(log.clone()));
    let recovery = log.recovery_report();
    tracing::info!(
        node_id = %config.node_id,
        data_dir = %data_dir.display(),
        admin = %admin_addr,
        clean = log.opened_clean(),
        topics = log.topics().len(),
        segments_recovered = recovery.segments_recovered,
        bytes_truncated = recovery.bytes_truncated,
        "silt-edge started"
    );

    tokio::pin!(shutdown);
    let mut retention = tokio::time::interval(RETENTION_INTERVAL);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upkeep = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = retention.tick() => enforce_retention(&log).await,
            _ = upkeep.tick() => metrics.run_upkeep(),
        }
    }

    // Health turns 503 first, so probes stop sending traffic while the log closes.
    state.send_replace(NodeState::Stopping(log.clone()));
    let closing = log.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("closing the data directory panicked")?
        .context("cannot close the data directory cleanly")?;
    let _ = stop_admin.send(());
    let _ = (&mut admin_server.0).await;
    tracing::info!(node_id = %config.node_id, "silt-edge stopped");
    Ok(())
}

/// Aborts a task when dropped, so a node that fails half-way leaves no task behind.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One retention pass; a failure is logged and retried at the next tick.
async fn enforce_retention(log: &Arc<LogManager>) {
    let log = log.clone();
    let result =
        tokio::task::spawn_blocking(move || log.enforce_retention(silt_log::now_ms())).await;
    match result {
        Ok(Ok(report)) if report.segments > 0 => tracing::info!(
            segments = report.segments,
            bytes = report.bytes,
            "retention deleted segments"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "retention pass failed"),
        Err(error) => tracing::error!(%error, "retention pass panicked"),
    }
}
