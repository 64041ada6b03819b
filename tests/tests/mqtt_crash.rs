//! What a PUBACK promises, tested with the node's own death: clients publish QoS 1 while
//! `silt-edge` is killed with SIGKILL, and after a restart every acknowledged message is in the
//! log, in each client's order. Then the disk budget: `reject` refuses with 0x97 (5.0) or no
//! PUBACK (3.1.1) and loses nothing it acknowledged, `drop-oldest` keeps ingesting and counts
//! what it dropped, and ingest resumes once retention frees space.
//!
//! Everything here reads the log back, so it runs against silt-edge only; with
//! `SILT_TEST_MQTT_BROKER=mosquitto` the crash test still runs its client half (QoS 1 under
//! kill -9, acknowledgements in order) against Mosquitto and skips the log checks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use silt_tests::mqtt::client::AckTracker;
use silt_tests::mqtt::dump::{DumpRecord, dump_topic};
use silt_tests::mqtt::{
    BrokerKind, Client, ClientOptions, Event, MQTT_TIMEOUT, MqttBroker, Version, metric_value,
    skip_unless_silt,
};
use tokio::time::Instant;

/// Clients publishing at once in the crash test.
const CRASH_CLIENTS: usize = 6;
/// QoS 1 publishes each keeps in flight.
const CRASH_INFLIGHT: u16 = 16;
/// Acknowledgements (over all clients) before the kill.
const CRASH_ACKS_BEFORE_KILL: u64 = 1_500;
/// How long ingest may take to reach [`CRASH_ACKS_BEFORE_KILL`].
const CRASH_INGEST_TIMEOUT: Duration = Duration::from_secs(30);

fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    (dir, data)
}

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

fn payload(client_id: &str, sequence: u64) -> String {
    format!("{client_id}:{sequence}")
}

/// One client's side of the crash: what it sent and what the broker acknowledged.
#[derive(Debug)]
struct Outcome {
    client_id: String,
    sent: u64,
    /// Sequence numbers acknowledged, in acknowledgement order.
    acked: Vec<u64>,
    closed_by: String,
}

/// Publishes numbered QoS 1 messages to its own topic, as fast as its in-flight window
/// allows, until the connection dies; returns what was acknowledged.
async fn publish_until_the_end(client: Client, acked_total: Arc<AtomicU64>) -> Outcome {
    let client_id = client.client_id.clone();
    let topic = format!("crash/{client_id}");
    let publisher = client.publisher();
    let writer = {
        let client_id = client_id.clone();
        tokio::spawn(async move {
            for sequence in 0.. {
                let message = payload(&client_id, sequence);
                if publisher.publish(&topic, 1, false, message).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut client = client;
    let mut tracker = AckTracker::default();
    let mut acked = Vec::new();
    let closed_by = loop {
        let Some(event) = client.next_event(MQTT_TIMEOUT).await else {
            panic!("{client_id}: no event for {MQTT_TIMEOUT:?} while publishing");
        };
        if let Event::Closed { error } = &event {
            break error.clone();
        }
        match tracker.note(&event) {
            Some(Ok(sequence)) => {
                acked.push(sequence);
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err((sequence, reason))) => {
                panic!("{client_id}: message {sequence} refused with {reason:#04x}")
            }
            None => {}
        }
    };
    writer.abort();
    Outcome {
        client_id,
        sent: tracker.sent(),
        acked,
        closed_by,
    }
}

async fn kill9_during_qos1_ingest(version: Version) {
    let (_dir, data) = data_dir();
    let kind = BrokerKind::from_env();
    let mut broker = blocking(|| MqttBroker::start(&data, &[]));
    let acked_total = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for index in 0..CRASH_CLIENTS {
        let client_id = format!("crash-{version:?}-{index}").to_lowercase();
        let options = ClientOptions {
            inflight: CRASH_INFLIGHT,
            ..ClientOptions::new(&client_id)
        };
        let client = Client::connect(version, broker.mqtt, options).await;
        publishers.push(tokio::spawn(publish_until_the_end(
            client,
            acked_total.clone(),
        )));
    }

    let deadline = Instant::now() + CRASH_INGEST_TIMEOUT;
    while acked_total.load(Ordering::Relaxed) < CRASH_ACKS_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "only {} acknowledgements within {CRASH_INGEST_TIMEOUT:?}",
            acked_total.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    blocking(|| broker.kill());

    let mut outcomes = Vec::new();
    for publisher in publishers {
        let outcome = tokio::time::timeout(MQTT_TIMEOUT, publisher)
            .await
            .expect("a publisher outlived the broker")
            .expect("a publisher panicked");
        // The broker acknowledges in the order it received (§4.6), so what was acknowledged is
        // a gap-free prefix of what was sent.
        let expected: Vec<u64> = (0..outcome.acked.len() as u64).collect();
        assert_eq!(
            outcome.acked, expected,
            "{}: PUBACKs out of order",
            outcome.client_id
        );
        assert!(!outcome.acked.is_empty(), "{outcome:?}");
        outcomes.push(outcome);
    }
    let sent: u64 = outcomes.iter().map(|outcome| outcome.sent).sum();
    eprintln!(
        "killed with {} of {sent} publishes acknowledged; clients saw: {}",
        acked_total.load(Ordering::Relaxed),
        outcomes[0].closed_by
    );
    if kind != BrokerKind::SiltEdge {
        eprintln!("the log checks need silt-edge; skipped with {kind:?}");
        return;
    }

    blocking(|| broker.start_again());
    assert!(
        broker.started_line.contains("clean=false"),
        "the restart did not see an unclean stop: {}",
        broker.started_line
    );
    blocking(|| broker.stop());
    let records = blocking(|| dump_topic(&data, "mqtt"));
    for outcome in &outcomes {
        check_client_in_log(outcome, &records);
    }
}

/// Every acknowledged message of the client is in the log, and the client's messages appear
/// in the order it sent them (duplicates allowed: at least once).
fn check_client_in_log(outcome: &Outcome, records: &[DumpRecord]) {
    let topic = format!("crash/{}", outcome.client_id);
    let mine: Vec<&DumpRecord> = records
        .iter()
        .filter(|record| record.header("mqtt.client_id") == Some(outcome.client_id.as_str()))
        .collect();
    let partitions: Vec<u32> = mine.iter().map(|record| record.partition).collect();
    assert!(
        partitions.windows(2).all(|pair| pair[0] == pair[1]),
        "{}: one key, one partition",
        outcome.client_id
    );
    let prefix = format!("{}:", outcome.client_id);
    let mut sequences = Vec::with_capacity(mine.len());
    for record in &mine {
        assert_eq!(record.key.as_deref(), Some(topic.as_str()), "{record:?}");
        assert_eq!(record.header("mqtt.qos"), Some("1"), "{record:?}");
        let sequence: u64 = record
            .value
            .as_deref()
            .and_then(|value| value.strip_prefix(&prefix))
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("not a message of {}: {record:?}", outcome.client_id));
        sequences.push(sequence);
    }
    let mut first_seen = sequences.clone();
    first_seen.dedup();
    assert!(
        first_seen.windows(2).all(|pair| pair[0] < pair[1]),
        "{}: out of order in the log: {first_seen:?}",
        outcome.client_id
    );
    let last_acked = outcome.acked.last().copied().unwrap_or(0);
    let kept: Vec<u64> = first_seen
        .iter()
        .copied()
        .take_while(|sequence| *sequence <= last_acked)
        .collect();
    let expected: Vec<u64> = (0..=last_acked).collect();
    assert_eq!(
        kept, expected,
        "{}: acknowledged messages missing from the log",
        outcome.client_id
    );
}

mod kill9_during_qos1_ingest {
    use super::Version;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v311() {
        super::kill9_during_qos1_ingest(Version::V311).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v5() {
        super::kill9_during_qos1_ingest(Version::V5).await;
    }
}

/// Bytes of each budget-test payload: a few per segment, dozens per budget.
const BUDGET_PAYLOAD_BYTES: usize = 2048;

fn budget_payload(sequence: u64) -> String {
    let head = format!("budget:{sequence}:");
    format!("{head}{}", "x".repeat(BUDGET_PAYLOAD_BYTES - head.len()))
}

fn budget_sequence(record: &DumpRecord) -> u64 {
    record
        .value
        .as_deref()
        .and_then(|value| value.strip_prefix("budget:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("not a budget message: {record:?}"))
}

fn start_budget_node(data: &Path, sets: &[(&str, &str)]) -> MqttBroker {
    blocking(|| MqttBroker::start_silt(data, sets))
}

fn reject_settings() -> [(&'static str, &'static str); 2] {
    [
        ("log.budget_bytes", "131072"),
        ("log.budget_policy", "reject"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_under_reject_answers_0x97_in_v5_and_loses_nothing() {
    if !skip_unless_silt("a_full_budget_under_reject_answers_0x97_in_v5_and_loses_nothing") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = start_budget_node(&data, &reject_settings());
    let mut client = Client::connect_clean(Version::V5, broker.mqtt, "filler-v5").await;
    let mut acked = Vec::new();
    let mut refused = None;
    for sequence in 0..1_000u64 {
        let reason = client
            .publish_acked("budget/t", 1, false, budget_payload(sequence))
            .await;
        match reason {
            0 => acked.push(sequence),
            0x97 => {
                refused = Some(sequence);
                break;
            }
            other => panic!("message {sequence}: unexpected reason {other:#04x}"),
        }
    }
    let refused = refused.expect("128 KiB of budget never filled");
    assert!(
        acked.len() >= 10,
        "refused after only {} messages",
        acked.len()
    );

    // Still full: QoS 1 and QoS 2 are refused, and the connection stays up.
    for (offset, qos) in [(1u64, 1u8), (2, 2), (3, 1)] {
        let reason = client
            .publish_acked("budget/t", qos, false, budget_payload(refused + offset))
            .await;
        assert_eq!(reason, 0x97, "QoS {qos} while the budget is full");
    }
    assert!(
        client
            .drain_events()
            .iter()
            .all(|event| !matches!(event, Event::Closed { .. })),
        "0x97 does not close the connection"
    );
    // The broker still serves: a new client connects and subscribes.
    let mut other = Client::connect_clean(Version::V311, broker.mqtt, "other").await;
    assert_eq!(other.subscribe("budget/#", 1).await, 1);
    other.disconnect().await;
    client.disconnect().await;

    assert!(broker.is_running());
    blocking(|| broker.stop());
    let in_log: Vec<u64> = blocking(|| dump_topic(&data, "mqtt"))
        .iter()
        .map(budget_sequence)
        .collect();
    assert_eq!(in_log, acked, "exactly the acknowledged messages, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_under_reject_withholds_the_puback_in_v311() {
    if !skip_unless_silt("a_full_budget_under_reject_withholds_the_puback_in_v311") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = start_budget_node(&data, &reject_settings());
    let mut client = Client::connect_clean(Version::V311, broker.mqtt, "filler-v311").await;
    let mut acked = Vec::new();
    let mut unacknowledged = None;
    for sequence in 0..1_000u64 {
        client
            .publish("budget/t", 1, false, budget_payload(sequence))
            .await;
        // Acks come in milliseconds; 1.5 s of silence is a withheld PUBACK.
        match client.await_ack(1, Duration::from_millis(1500)).await {
            Some(_) => acked.push(sequence),
            None => {
                unacknowledged = Some(sequence);
                break;
            }
        }
    }
    assert!(unacknowledged.is_some(), "128 KiB of budget never filled");
    assert!(
        acked.len() >= 10,
        "no PUBACK after only {} messages",
        acked.len()
    );
    drop(client);

    let mut other = Client::connect_clean(Version::V311, broker.mqtt, "other").await;
    assert_eq!(other.subscribe("budget/#", 1).await, 1);
    other.disconnect().await;
    assert!(broker.is_running());
    blocking(|| broker.stop());
    let in_log: Vec<u64> = blocking(|| dump_topic(&data, "mqtt"))
        .iter()
        .map(budget_sequence)
        .collect();
    assert_eq!(in_log, acked, "exactly the acknowledged messages, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_ingesting_and_counts_the_drops() {
    if !skip_unless_silt("drop_oldest_keeps_ingesting_and_counts_the_drops") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = start_budget_node(
        &data,
        &[
            ("log.budget_bytes", "131072"),
            ("log.budget_policy", "drop-oldest"),
            ("topic_defaults.segment.bytes", "16384"),
        ],
    );
    let mut client = Client::connect_clean(Version::V5, broker.mqtt, "dropper").await;
    // About 3.5 budgets' worth.
    const COUNT: u64 = 220;
    for sequence in 0..COUNT {
        let reason = client
            .publish_acked("budget/t", 1, false, budget_payload(sequence))
            .await;
        assert_eq!(reason, 0, "message {sequence} under drop-oldest");
    }
    let metrics = blocking(|| broker.metrics());
    let dropped = metric_value(&metrics, "silt_log_dropped_segments_total", &[]);
    assert!(dropped.unwrap_or(0.0) >= 1.0, "{metrics}");
    let used = metric_value(&metrics, "silt_log_disk_used_bytes", &[]).unwrap_or(f64::MAX);
    assert!(used <= 131_072.0, "{used} bytes used over a 128 KiB budget");
    client.disconnect().await;

    blocking(|| broker.stop());
    let in_log: Vec<u64> = blocking(|| dump_topic(&data, "mqtt"))
        .iter()
        .map(budget_sequence)
        .collect();
    // The oldest went, whole segments at a time; what is left is the newest, in order.
    let first = *in_log.first().expect("the newest messages are kept");
    assert!(first > 0, "nothing was dropped");
    let expected: Vec<u64> = (first..COUNT).collect();
    assert_eq!(in_log, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_resumes_once_retention_frees_space() {
    if !skip_unless_silt("ingest_resumes_once_retention_frees_space") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = start_budget_node(
        &data,
        &[
            ("log.budget_bytes", "65536"),
            ("log.budget_policy", "reject"),
            ("log.retention_check_ms", "200"),
            ("topic_defaults.segment.bytes", "8192"),
            ("topic_defaults.retention.ms", "3000"),
        ],
    );
    let mut client = Client::connect_clean(Version::V5, broker.mqtt, "resumer").await;
    let mut sequence = 0u64;
    let filled = loop {
        let reason = client
            .publish_acked("budget/t", 1, false, budget_payload(sequence))
            .await;
        sequence += 1;
        match reason {
            0 => assert!(sequence < 500, "64 KiB of budget never filled"),
            0x97 => break Instant::now(),
            other => panic!("unexpected reason {other:#04x}"),
        }
    };
    // Retention deletes the closed segments once their data is 3 s old; then a publish fits.
    let deadline = filled + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "ingest never resumed");
        let reason = client
            .publish_acked("budget/t", 1, false, budget_payload(sequence))
            .await;
        sequence += 1;
        match reason {
            0 => break,
            0x97 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("unexpected reason {other:#04x}"),
        }
    }
    client.disconnect().await;
    assert!(broker.is_running());
    blocking(|| broker.stop());
    let last: Option<u64> = blocking(|| dump_topic(&data, "mqtt"))
        .last()
        .map(budget_sequence);
    assert_eq!(
        last,
        Some(sequence - 1),
        "the publish after the resume is in the log"
    );
}
