//! Fetch against the real `silt-core` with hand-built requests: it serves the stored batch
//! bytes as produced (only the leader epoch stamped), at least one whole batch whatever the
//! partition's byte limit, and long-polls: an empty fetch waits `max_wait_ms`, and a waiting
//! fetch answers as soon as another connection produces.

use std::time::{Duration, Instant};

use silt_tests::core::Core;
use silt_tests::kafka::{RawKafka, fetch_v4_body, fetch_v4_result, value_batch};

const FETCH: i16 = 1;
const OFFSET_OUT_OF_RANGE: i16 = 1;

fn batch(values: &[&str]) -> Vec<u8> {
    value_batch(Some("k"), values)
}

fn produce(kafka: &mut RawKafka, topic: &str, records: &[u8]) -> i64 {
    let (error, offset) = kafka.produce(topic, records);
    assert_eq!(error, 0);
    offset
}

#[test]
fn fetch_serves_the_produced_bytes_and_at_least_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(&dir.path().join("data"), &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    let first = batch(&["a", "b", "c"]);
    let second = batch(&["d"]);
    assert_eq!(produce(&mut kafka, "bytes", &first), 0);
    assert_eq!(produce(&mut kafka, "bytes", &second), 3);

    kafka.send(
        FETCH,
        4,
        false,
        &fetch_v4_body("bytes", 0, 0, 0, 1, 1 << 20),
    );
    let fetched = fetch_v4_result(&kafka.read_response());
    assert_eq!((fetched.error_code, fetched.high_watermark), (0, 4));
    // The stored bytes are the produced ones with their offsets assigned and the leader
    // epoch stamped; both sit outside the CRC, so the batches are otherwise byte for byte.
    let mut expected = first.clone();
    expected[12..16].copy_from_slice(&0i32.to_be_bytes());
    let mut second_stored = second.clone();
    second_stored[..8].copy_from_slice(&3i64.to_be_bytes());
    second_stored[12..16].copy_from_slice(&0i32.to_be_bytes());
    expected.extend_from_slice(&second_stored);
    assert_eq!(fetched.records, expected);

    // A partition limit of 1 byte still gets the whole first batch, and only it.
    kafka.send(FETCH, 4, false, &fetch_v4_body("bytes", 0, 0, 0, 1, 1));
    let fetched = fetch_v4_result(&kafka.read_response());
    assert_eq!(fetched.records, expected[..first.len()]);

    // Past the end: OFFSET_OUT_OF_RANGE, so the client resets.
    kafka.send(
        FETCH,
        4,
        false,
        &fetch_v4_body("bytes", 0, 99, 0, 1, 1 << 20),
    );
    assert_eq!(
        fetch_v4_result(&kafka.read_response()).error_code,
        OFFSET_OUT_OF_RANGE
    );
    core.stop();
}

#[test]
fn fetch_long_polls_until_data_or_max_wait() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(&dir.path().join("data"), &[]);
    let mut producer = RawKafka::connect(core.kafka);
    assert_eq!(produce(&mut producer, "poll", &batch(&["old"])), 0);
    let mut consumer = RawKafka::connect(core.kafka);

    // Nothing new: the answer comes after max_wait_ms, empty.
    let started = Instant::now();
    consumer.send(
        FETCH,
        4,
        false,
        &fetch_v4_body("poll", 0, 1, 400, 1, 1 << 20),
    );
    let fetched = fetch_v4_result(&consumer.read_response());
    assert!(
        started.elapsed() >= Duration::from_millis(390),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((fetched.error_code, fetched.records.len()), (0, 0));

    // A long wait is cut short by a produce on another connection.
    let started = Instant::now();
    consumer.send(
        FETCH,
        4,
        false,
        &fetch_v4_body("poll", 0, 1, 15_000, 1, 1 << 20),
    );
    assert_eq!(produce(&mut producer, "poll", &batch(&["new"])), 1);
    let fetched = fetch_v4_result(&consumer.read_response());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered only after {:?}",
        started.elapsed()
    );
    assert_eq!(fetched.high_watermark, 2);
    assert!(!fetched.records.is_empty());
    core.stop();
}
