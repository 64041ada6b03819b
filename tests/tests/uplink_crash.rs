//! The uplink's exactly-once promise under kill -9 on both sides: MQTT clients publish QoS 1
//! into a real `silt-edge` that ships to a real `silt-core`; the core is killed mid-stream and
//! restarted, then the edge; afterwards the core's log holds every PUBACKed message exactly
//! once, in order per key, and nothing twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use silt_tests::core::{Core, field_addr};
use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::skip_unless_silt;
use silt_tests::uplink::{
    UdpProxy, check_exactly_once, core_ca, metric_sum, publish_numbered, start_edge, wait_drained,
};
use tokio::time::Instant;

/// MQTT clients publishing at once; each is one key (`sensor/0..6`, which murmur2 spreads
/// over two of the core's three partitions).
const CLIENTS: usize = 6;
/// Messages each client publishes in a phase that runs to its end.
const PER_PHASE: u64 = 100;
/// Messages each client would publish in the phase the edge is killed in: more than it can
/// publish before the kill.
const KILLED_PHASE: u64 = 100_000;
/// How long shipping may take to start, or the backlog to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const EDGE_ID: &str = "edge-crash";

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Starts one publishing phase of `count` messages on every client, numbered on from what
/// each acknowledged before.
fn phase(
    mqtt: std::net::SocketAddr,
    phase: u64,
    count: u64,
    acked: &HashMap<String, Vec<u64>>,
) -> Vec<tokio::task::JoinHandle<(String, Vec<u64>)>> {
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let topic = format!("sensor/{client}");
        let from = acked
            .get(&topic)
            .and_then(|values| values.last())
            .map_or(0, |last| last + 1)
            .max(phase * KILLED_PHASE * 10);
        let client_id = format!("uplink-crash-{client}-{phase}");
        tasks.push(tokio::spawn(async move {
            let values = publish_numbered(mqtt, &client_id, &topic, from, from + count).await;
            (topic, values)
        }));
    }
    tasks
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<(String, Vec<u64>)>>,
    acked: &mut HashMap<String, Vec<u64>>,
) -> usize {
    let mut count = 0;
    for task in tasks {
        let (topic, values) = task.await.expect("a publisher panicked");
        count += values.len();
        acked.entry(topic).or_default().extend(values);
    }
    count
}

fn shipped_records(edge: &silt_tests::mqtt::MqttBroker) -> f64 {
    metric_sum(&edge.metrics(), "silt_uplink_acked_bytes_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_message_reaches_the_core_exactly_once_through_kill9_on_both_sides() {
    if !skip_unless_silt("uplink_crash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir: PathBuf = dir.path().join("core");
    let edge_dir: PathBuf = dir.path().join("edge");
    let core_args = ["--set", "kafka.default_partitions=3"];
    let core = blocking(|| Core::start(&core_dir, &core_args));
    // The edge talks to the proxy, which follows the core to its new port after a restart.
    let proxy = UdpProxy::start(field_addr(&core.started_line, "uplink="));
    let mut edge = blocking(|| {
        start_edge(
            &edge_dir,
            EDGE_ID,
            proxy.addr,
            &core_ca(&core_dir),
            &[("mqtt.default_partitions", "2")],
        )
    });
    let mut acked: HashMap<String, Vec<u64>> = HashMap::new();

    // Phase 0: the core dies with SIGKILL while batches are being shipped and acked.
    let tasks = phase(edge.mqtt, 0, PER_PHASE, &acked);
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while blocking(|| shipped_records(&edge)) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "nothing shipped within {DRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocking(|| core.kill());
    let core = blocking(|| Core::start(&core_dir, &core_args));
    assert!(
        core.started_line.contains("clean=false"),
        "{}",
        core.started_line
    );
    proxy.set_target(field_addr(&core.started_line, "uplink="));
    let phase0 = collect(tasks, &mut acked).await;
    assert_eq!(
        phase0,
        CLIENTS * PER_PHASE as usize,
        "the edge must ack everything"
    );
    // The edge notices the dead connection by its idle timeout and connects to the new core.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while metric_sum(
        &blocking(|| core.metrics()),
        "silt_uplink_connections_total",
    ) == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the edge did not reconnect within {DRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Phase 1: the edge dies with SIGKILL mid-ingest (and mid-shipping), then restarts.
    let tasks = phase(edge.mqtt, 1, KILLED_PHASE, &acked);
    let before = blocking(|| shipped_records(&edge));
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while blocking(|| shipped_records(&edge)) <= before {
        assert!(
            Instant::now() < deadline,
            "shipping did not resume within {DRAIN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    blocking(|| edge.kill());
    let phase1 = collect(tasks, &mut acked).await;
    assert!(
        phase1 > 0 && phase1 < CLIENTS * KILLED_PHASE as usize,
        "{phase1}"
    );
    blocking(|| edge.start_again());
    assert!(
        edge.started_line.contains("clean=false"),
        "{}",
        edge.started_line
    );

    // Phase 2: live ingest on the restarted edge, then a full drain.
    let tasks = phase(edge.mqtt, 2, PER_PHASE, &acked);
    let phase2 = collect(tasks, &mut acked).await;
    assert_eq!(phase2, CLIENTS * PER_PHASE as usize);
    let drained_in = blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    blocking(|| edge.stop());
    blocking(|| core.stop());
    let records = blocking(|| dump_topic(&core_dir, "mqtt"));
    let distinct = check_exactly_once(&records, EDGE_ID, &acked);
    let partitions: std::collections::BTreeSet<u32> =
        records.iter().map(|record| record.partition).collect();
    eprintln!(
        "acked {} messages ({phase0} + {phase1} before the edge kill + {phase2}); the core \
         holds {distinct} distinct records in partitions {partitions:?}; drained {drained_in:?} \
         after the last publish",
        phase0 + phase1 + phase2
    );
    assert!(
        partitions.len() > 1,
        "keys should spread over the core's partitions"
    );
}
