//! `uplink.compression`: with `zstd` (the default, at any `uplink.compression_level`) the edge
//! puts fewer bytes on the link than it ships, with `none` it ships the batches as stored;
//! either way the core gets every acknowledged message exactly once, in order per key.

use std::collections::HashMap;
use std::time::Duration;

use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::skip_unless_silt;
use silt_tests::uplink::{
    check_exactly_once, collect_acked, core_ca, metric_sum, start_edge, start_publishers,
    wait_drained,
};

const CLIENTS: usize = 4;
const MESSAGES: u64 = 300;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Ships `CLIENTS * MESSAGES` messages with the edge's uplink `settings` and returns the
/// edge's shipped (uncompressed) and wire byte counts, after checking the core got each
/// exactly once.
async fn ship_with(name: &str, settings: &[(&str, &str)]) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let edge_id = format!("edge-{name}");
    let core = blocking(|| Core::start(&core_dir, &["--set", "kafka.default_partitions=2"]));
    let uplink = field_addr(&core.started_line, "uplink=");
    let mut edge = blocking(|| {
        start_edge(
            &dir.path().join("edge"),
            &edge_id,
            uplink,
            &core_ca(&core_dir),
            settings,
        )
    });
    let mut acked = HashMap::new();
    collect_acked(
        start_publishers(edge.mqtt, &edge_id, CLIENTS, 0, MESSAGES),
        &mut acked,
    )
    .await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    let metrics = blocking(|| edge.metrics());
    let shipped = metric_sum(&metrics, "silt_uplink_shipped_bytes_total");
    let wire = metric_sum(&metrics, "silt_uplink_wire_bytes_total");
    blocking(|| edge.stop());
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    assert_eq!(
        check_exactly_once(&records, &edge_id, &acked),
        CLIENTS * MESSAGES as usize,
        "{name}"
    );
    (shipped, wire)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_shrinks_what_crosses_the_link_and_none_ships_batches_as_stored() {
    if !skip_unless_silt("uplink_compression") {
        return;
    }
    let (shipped, wire) = ship_with("zstd", &[("uplink.compression", "zstd")]).await;
    assert!(shipped > 0.0, "nothing shipped");
    assert!(
        wire < shipped,
        "zstd: {wire} bytes on the link for {shipped} bytes of batches"
    );

    // A fast level still compresses. (That the level is the one configured is checked on
    // fixed input in silt-wire's tests; here frames' contents depend on timing.)
    let (shipped, wire) = ship_with("zstd-fast", &[("uplink.compression_level", "-5")]).await;
    assert!(shipped > 0.0, "nothing shipped");
    assert!(
        wire < shipped,
        "zstd at -5: {wire} bytes on the link for {shipped} bytes of batches"
    );

    let (shipped, wire) = ship_with("none", &[("uplink.compression", "none")]).await;
    assert!(shipped > 0.0, "nothing shipped");
    // Frames add their fixed fields; nothing is compressed.
    assert!(
        wire > shipped,
        "none: {wire} bytes on the link for {shipped} bytes of batches"
    );
}
