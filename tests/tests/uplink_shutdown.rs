//! An orderly core shutdown is no failure on the edge: a real `silt-core` stopped with
//! SIGTERM while a real `silt-edge` ships to it (and MQTT clients keep publishing) acks what
//! is durable and closes the uplink as "shutting down"; the edge logs that at INFO, never
//! WARN, reconnects to the restarted core by itself and ships the rest, and the core's log
//! then holds every acknowledged message exactly once.

use std::collections::HashMap;
use std::time::Duration;

use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::skip_unless_silt;
use silt_tests::uplink::{
    Publishers, check_exactly_once, collect_acked, metric_sum, start_core_behind_proxy_with_edge,
    start_publishers, wait_drained,
};

/// MQTT clients publishing at once, one key each (`sensor/0..4`).
const CLIENTS: usize = 4;
/// Messages each client publishes before the stop, and while the core stops and restarts.
const BEFORE: u64 = 100;
const ACROSS: u64 = 300;
/// Messages each client publishes once the core is back.
const AFTER: u64 = 50;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_TIMEOUT: Duration = Duration::from_secs(20);
const EDGE_ID: &str = "edge-shutdown";
const CORE_ARGS: [&str; 2] = ["--set", "kafka.default_partitions=3"];
const INFO_LINE: &str = "core is shutting down; reconnecting";

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Starts `from..to` on every client.
fn publish(mqtt: std::net::SocketAddr, from: u64, to: u64) -> Publishers {
    start_publishers(mqtt, "uplink-shutdown", CLIENTS, from, to)
}

/// The log lines of a failure: WARN or ERROR level.
fn failure_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_stopped_in_order_is_no_failure_on_the_edge_and_loses_nothing() {
    if !skip_unless_silt("uplink_shutdown") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    // The restarted core binds a new port; the proxy follows it.
    let (core, proxy, mut edge) =
        blocking(|| start_core_behind_proxy_with_edge(dir.path(), &CORE_ARGS, EDGE_ID));
    let mut acked = HashMap::new();
    collect_acked(publish(edge.mqtt, 0, BEFORE), &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    // Ingest goes on while the core stops in order and comes back.
    let across = publish(edge.mqtt, BEFORE, BEFORE + ACROSS);
    let mut core = core;
    blocking(|| core.process.stop_cleanly());
    let core_log = core.process.stderr();
    assert!(
        core_log.contains("core shutting down"),
        "the core closes uplinks as shutting down:\n{core_log}"
    );
    let failures = failure_lines(&core_log);
    assert!(
        failures.is_empty(),
        "the core's orderly stop logged failures:\n{}",
        failures.join("\n")
    );
    let line = blocking(|| edge.process().wait_for_stderr(INFO_LINE, LOG_TIMEOUT));
    assert!(line.contains(" INFO "), "{line}");
    let core = blocking(|| Core::start(&core_dir, &CORE_ARGS));
    proxy.set_target(field_addr(&core.started_line, "uplink="));
    collect_acked(across, &mut acked).await;
    collect_acked(
        publish(edge.mqtt, BEFORE + ACROSS, BEFORE + ACROSS + AFTER),
        &mut acked,
    )
    .await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    let resent = metric_sum(
        &blocking(|| core.metrics()),
        "silt_uplink_duplicate_records_total",
    );
    eprintln!("records re-sent to the restarted core and skipped as duplicates: {resent}");

    blocking(|| edge.stop());
    let edge_log = edge.process().stderr();
    assert!(edge_log.contains(INFO_LINE), "{edge_log}");
    let failures = failure_lines(&edge_log);
    assert!(
        failures.is_empty(),
        "an orderly core stop logged failures on the edge:\n{}",
        failures.join("\n")
    );
    blocking(|| core.stop());

    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    let distinct = check_exactly_once(&records, EDGE_ID, &acked);
    let total = CLIENTS * (BEFORE + ACROSS + AFTER) as usize;
    assert_eq!(distinct, total);
    assert_eq!(records.len(), total, "nothing stored twice");
}
