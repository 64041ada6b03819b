//! The core's restart cost: after a clean stop, the uplink's dedup state comes from the
//! checkpoint written at shutdown and the restarted core scans no records to rebuild it;
//! without the checkpoint it scans the whole topic. Exactly once holds either way.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::skip_unless_silt;
use silt_tests::uplink::{
    check_exactly_once, collect_acked, metric_sum, start_core_behind_proxy_with_edge,
    start_publishers, wait_drained,
};

const CLIENTS: usize = 3;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const EDGE_ID: &str = "edge-restart";
const CORE_ARGS: [&str; 2] = ["--set", "kafka.default_partitions=3"];

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Publishes `from..to` on every client (topic `sensor/<client>`) and records what was acked.
async fn publish(
    mqtt: std::net::SocketAddr,
    from: u64,
    to: u64,
    acked: &mut HashMap<String, Vec<u64>>,
) {
    collect_acked(
        start_publishers(mqtt, "uplink-restart", CLIENTS, from, to),
        acked,
    )
    .await;
}

/// Records the restarted core scanned to rebuild its dedup state.
fn scanned(core: &Core) -> f64 {
    metric_sum(&core.metrics(), "silt_uplink_dedup_scanned_records_total")
}

fn checkpoint_file(core_dir: &Path) -> std::path::PathBuf {
    let mut dir = core_dir.as_os_str().to_owned();
    dir.push(".uplink");
    Path::new(&dir).join("dedup").join("mqtt.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_rebuilds_dedup_state_from_its_checkpoint_not_a_scan() {
    if !skip_unless_silt("uplink_restart") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let (core, proxy, mut edge) =
        blocking(|| start_core_behind_proxy_with_edge(dir.path(), &CORE_ARGS, EDGE_ID));
    let mut acked = HashMap::new();

    publish(edge.mqtt, 0, 200, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    let total = (CLIENTS * 200) as f64;
    assert_eq!(
        blocking(|| scanned(&core)),
        0.0,
        "a new topic has nothing to scan"
    );
    blocking(|| core.stop());
    assert!(
        checkpoint_file(&core_dir).exists(),
        "a clean stop writes the checkpoint"
    );

    // Restarted from the checkpoint: the edge's next batch touches the topic, nothing is
    // scanned.
    let core = blocking(|| Core::start(&core_dir, &CORE_ARGS));
    proxy.set_target(field_addr(&core.started_line, "uplink="));
    publish(edge.mqtt, 200, 220, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    assert_eq!(
        blocking(|| scanned(&core)),
        0.0,
        "the checkpoint written at shutdown covers the whole topic"
    );
    blocking(|| core.stop());

    // Without the checkpoint the same restart scans every record of the topic.
    std::fs::remove_file(checkpoint_file(&core_dir)).unwrap();
    let core = blocking(|| Core::start(&core_dir, &CORE_ARGS));
    proxy.set_target(field_addr(&core.started_line, "uplink="));
    publish(edge.mqtt, 220, 230, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    assert_eq!(blocking(|| scanned(&core)), total + (CLIENTS * 20) as f64);

    blocking(|| edge.stop());
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    let distinct = check_exactly_once(&records, EDGE_ID, &acked);
    assert_eq!(distinct, CLIENTS * 230);
}
