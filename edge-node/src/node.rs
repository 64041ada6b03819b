//! The edge node's top-level `run`: what an edge node does between start and shutdown.
//!
//! Today an edge node owns its local data directory: it opens it (recovering it after an
//! unclean stop), applies retention on a timer, and closes it cleanly on shutdown so the next
//! start skips recovery. The MQTT broker and the uplink plug in here as they arrive.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use silt_log::LogManager;

use crate::config::EdgeConfig;

/// How often retention runs over every partition.
const RETENTION_INTERVAL: Duration = Duration::from_secs(30);

/// Runs an edge node with `config` until `shutdown` completes.
///
/// It takes its whole world as arguments, so tests can run nodes in-process.
pub(crate) async fn run(
    config: EdgeConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let data_dir = config.log.data_dir.clone();
    let log_config = config.log.clone();
    // Opening may scan segments after a crash: blocking work, off the runtime's thread.
    let log = tokio::task::spawn_blocking(move || LogManager::open(log_config))
        .await
        .context("opening the data directory panicked")?
        .with_context(|| format!("cannot open data directory {}", data_dir.display()))?;
    let recovery = log.recovery_report();
    tracing::info!(
        node_id = %config.node_id,
        data_dir = %data_dir.display(),
        clean = log.opened_clean(),
        topics = log.topics().len(),
        segments_recovered = recovery.segments_recovered,
        bytes_truncated = recovery.bytes_truncated,
        "silt-edge started"
    );

    tokio::pin!(shutdown);
    let mut retention = tokio::time::interval(RETENTION_INTERVAL);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = retention.tick() => enforce_retention(&log).await,
        }
    }

    let closing = log.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("closing the data directory panicked")?
        .context("cannot close the data directory cleanly")?;
    tracing::info!(node_id = %config.node_id, "silt-edge stopped");
    Ok(())
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
