//! The uplink through an outage: its UDP is blackholed (a user-space proxy drops every
//! datagram both ways) while MQTT ingest goes on; once the link returns the edge reconnects
//! within 5 s and drains its backlog, and the core holds every acknowledged message exactly
//! once, in order per key.
//!
//! The outage lasts `SILT_TEST_BLACKHOLE_SECS` seconds (default 20, longer than the QUIC idle
//! timeout of 10 s, so the connection is declared dead and a fresh one must be made; set it
//! to minutes for the long variant).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::{MqttBroker, metric_value, skip_unless_silt};
use silt_tests::uplink::{
    check_exactly_once, collect_acked, metric_sum, start_core_behind_proxy_with_edge,
    start_publishers, wait_drained,
};

const EDGE_ID: &str = "edge-outage";
const CLIENTS: usize = 6;
/// Messages each client publishes before, during and after the outage.
const PER_PHASE: u64 = 100;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The promise: connected again within this long of the link returning.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

fn blackhole_duration() -> Duration {
    let secs = std::env::var("SILT_TEST_BLACKHOLE_SECS")
        .ok()
        .map(|text| {
            text.parse::<u64>()
                .expect("SILT_TEST_BLACKHOLE_SECS: seconds")
        })
        .unwrap_or(20);
    Duration::from_secs(secs)
}

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

async fn publish_phase(edge: &MqttBroker, phase: u64, acked: &mut HashMap<String, Vec<u64>>) {
    let from = phase * PER_PHASE;
    let publishers = start_publishers(
        edge.mqtt,
        &format!("uplink-outage-p{phase}"),
        CLIENTS,
        from,
        from + PER_PHASE,
    );
    collect_acked(publishers, acked).await;
}

fn connected(edge: &MqttBroker) -> (f64, f64) {
    let metrics = edge.metrics();
    (
        metric_value(&metrics, "silt_uplink_connected", &[]).unwrap_or(0.0),
        metric_sum(&metrics, "silt_uplink_reconnects_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_uplink_reconnects_and_drains_without_loss_or_duplicates() {
    if !skip_unless_silt("uplink_blackhole") {
        return;
    }
    let outage = blackhole_duration();
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let (core, proxy, edge) = blocking(|| {
        start_core_behind_proxy_with_edge(
            dir.path(),
            &["--set", "kafka.default_partitions=3"],
            EDGE_ID,
        )
    });
    let mut acked = HashMap::new();
    publish_phase(&edge, 0, &mut acked).await;
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    // The outage: ingest goes on, nothing crosses the link.
    proxy.set_blackhole(true);
    let outage_start = Instant::now();
    publish_phase(&edge, 1, &mut acked).await;
    // Wait until the edge has given the connection up (QUIC idle timeout), so the restore
    // below needs a fresh connection.
    let deadline = Instant::now() + outage + DRAIN_TIMEOUT;
    while blocking(|| connected(&edge)).0 != 0.0 {
        assert!(Instant::now() < deadline, "the dead link was never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = outage_start.elapsed();
    publish_phase(&edge, 2, &mut acked).await;
    if let Some(rest) = outage.checked_sub(outage_start.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let lag = metric_sum(&blocking(|| edge.metrics()), "silt_uplink_lag_records");
    assert!(lag > 0.0, "nothing accumulated during the outage");
    let (_, reconnects_before) = blocking(|| connected(&edge));
    let dropped = proxy.dropped();
    assert!(dropped > 0, "the blackhole dropped nothing");

    // The link returns.
    proxy.set_blackhole(false);
    let restored = Instant::now();
    loop {
        let (up, reconnects) = blocking(|| connected(&edge));
        if up == 1.0 && reconnects >= reconnects_before {
            break;
        }
        assert!(
            restored.elapsed() < RECONNECT_MAX,
            "not reconnected within {RECONNECT_MAX:?} of the link returning"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let reconnected_in = restored.elapsed();
    publish_phase(&edge, 3, &mut acked).await;
    let drained_in = blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    let mut edge = edge;
    blocking(|| edge.stop());
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    let distinct = check_exactly_once(&records, EDGE_ID, &acked);
    assert_eq!(
        distinct,
        CLIENTS * 4 * PER_PHASE as usize,
        "every message exactly once"
    );
    eprintln!(
        "outage of {outage:?} (dead link noticed after {noticed:?}, {dropped} datagrams \
         dropped, backlog {lag} records); reconnected {reconnected_in:?} after the link \
         returned; drained {drained_in:?} after the last publish; {distinct} records"
    );
}
