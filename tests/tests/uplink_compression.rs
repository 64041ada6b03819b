//! `uplink.compression`: with `zstd` (the default, at any `uplink.compression_level`) the edge
//! puts fewer bytes on the link than it ships, with `none` it ships the batches as stored;
//! either way the core gets every acknowledged message exactly once, in order per key.
//!
//! `log.compression`: with `zstd` (the default) a burst's batches are stored compressed on the
//! edge, shipped as stored, and reach the core exactly once; with `none` they are stored as
//! they came.

use std::collections::HashMap;
use std::time::Duration;

use silt_log::batch::{Compression, batches};
use silt_log::{LogConfig, LogManager};
use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::Version;
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::raw::{Connect, RawConn, publish};
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

/// Messages of one burst, all sent before any acknowledgement is read.
const BURST: u16 = 400;
/// Bytes of each burst message: its sequence number, zero-padded.
const BURST_VALUE_BYTES: usize = 200;

/// Sends `BURST` QoS 1 publishes of `seq` (zero-padded) to `topic` in one write, so the edge
/// takes them as one or a few large batches, and returns the sequence numbers acknowledged.
async fn publish_burst(addr: std::net::SocketAddr, client_id: &str, topic: &str) -> Vec<u64> {
    let mut conn = RawConn::connected(addr, &Connect::new(Version::V311, client_id)).await;
    let mut bytes = Vec::new();
    for pkid in 1..=BURST {
        let value = format!("{:0>width$}", pkid, width = BURST_VALUE_BYTES);
        bytes.extend(publish(
            Version::V311,
            topic,
            1,
            Some(pkid),
            value.as_bytes(),
        ));
    }
    conn.send(&bytes).await;
    let mut acked = Vec::new();
    while acked.len() < usize::from(BURST) {
        let Some(packet) = conn.read_packet(Duration::from_secs(10)).await else {
            break;
        };
        assert_eq!(packet.kind(), 4, "only PUBACKs expected: {packet:?}");
        acked.push(u64::from(u16::from_be_bytes([
            packet.body[0],
            packet.body[1],
        ])));
    }
    acked.sort_unstable();
    acked
}

/// Publishes four bursts through an edge with `log.compression = compression`, checks the
/// core got each acknowledged message exactly once, and returns the edge log's zstd and
/// uncompressed batch counts and its batch bytes.
async fn burst_with(compression: &str) -> (usize, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let edge_dir = dir.path().join("edge");
    let edge_id = format!("edge-{compression}");
    let core = blocking(|| Core::start(&core_dir, &[]));
    let uplink = field_addr(&core.started_line, "uplink=");
    let mut edge = blocking(|| {
        start_edge(
            &edge_dir,
            &edge_id,
            uplink,
            &core_ca(&core_dir),
            &[("log.compression", compression)],
        )
    });
    let mut acked = HashMap::new();
    for client in 0..4 {
        let topic = format!("sensor/{client}");
        let values = publish_burst(edge.mqtt, &format!("burst-{client}"), &topic).await;
        assert_eq!(
            values.len(),
            usize::from(BURST),
            "{topic}: every publish acked"
        );
        acked.insert(topic, values);
    }
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));
    blocking(|| edge.stop());
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    assert_eq!(
        check_exactly_once(&records, &edge_id, &acked),
        4 * usize::from(BURST),
        "{compression}"
    );
    // The edge's own log, opened as the stopped edge left it.
    let log = LogManager::open(LogConfig::new(&edge_dir)).expect("the edge's log opens");
    let partition = log.partition("mqtt", 0).unwrap();
    let (mut zstd, mut plain, mut bytes) = (0, 0, 0);
    let mut offset = partition.log_start_offset();
    while offset < partition.high_watermark() {
        let slice = partition.read(offset, 1 << 20).unwrap();
        for batch in batches(&slice.bytes, usize::MAX) {
            let (header, batch) = batch.unwrap();
            match header.compression().unwrap() {
                Compression::Zstd => zstd += 1,
                _ => plain += 1,
            }
            bytes += batch.len();
            offset = header.last_offset() as u64 + 1;
        }
    }
    log.close().unwrap();
    (zstd, plain, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_are_stored_compressed_at_rest_and_reach_the_core_once() {
    if !skip_unless_silt("uplink_compression") {
        return;
    }
    let (zstd, _, compressed_bytes) = burst_with("zstd").await;
    assert!(zstd > 0, "no batch of the bursts was stored compressed");
    let (zstd, plain, plain_bytes) = burst_with("none").await;
    assert_eq!(zstd, 0, "log.compression = none stores nothing compressed");
    assert!(plain > 0);
    assert!(
        compressed_bytes * 2 < plain_bytes,
        "{compressed_bytes} bytes stored compressed against {plain_bytes} uncompressed"
    );
}
