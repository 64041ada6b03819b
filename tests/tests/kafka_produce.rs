//! Produce against the real `silt-core` with hand-built requests: batches are stored with the
//! partition's leader epoch, an idempotent producer's retried batch is answered with its
//! original offset and not stored twice, also after a kill -9 and restart (the producer state
//! is rebuilt from the log), and a gap in sequence numbers is refused; producer ids keep
//! growing across a kill -9, and the node's internal topics refuse client records.

use bytes::BytesMut;
use silt_log::batch::{BatchSpec, Record, encode_batch};
use silt_log::{LogConfig, LogManager};
use silt_tests::core::Core;
use silt_tests::kafka::{PRODUCE, RawKafka, Reader, produce_v3_body};

const OUT_OF_ORDER_SEQUENCE: i16 = 45;

fn batch(producer_id: i64, base_sequence: i32, values: &[&str]) -> Vec<u8> {
    let records: Vec<Record> = values
        .iter()
        .map(|value| Record {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(value.as_bytes().to_vec().into()),
            headers: Vec::new(),
        })
        .collect();
    let spec = BatchSpec {
        producer_id,
        producer_epoch: 0,
        base_sequence,
        ..BatchSpec::default()
    };
    let mut out = BytesMut::new();
    encode_batch(&spec, &records, &mut out).unwrap();
    out.to_vec()
}

fn produce(kafka: &mut RawKafka, topic: &str, records: &[u8]) -> (i16, i64) {
    kafka.produce(topic, records)
}

/// Every stored value of partition 0 of `topic`, with its batch's leader epoch; the node must
/// be stopped.
fn stored(data_dir: &std::path::Path, topic: &str) -> Vec<(i32, String)> {
    let log = LogManager::open(LogConfig::new(data_dir)).unwrap();
    let partition = log.partition(topic, 0).unwrap();
    let slice = partition.read(0, 1 << 20).unwrap();
    let mut values = Vec::new();
    let limits = silt_log::batch::DecodeLimits::default();
    for item in silt_log::batch::batches(&slice.bytes, usize::MAX) {
        let (header, bytes) = item.unwrap();
        for record in silt_log::batch::decode_records(&header, bytes, &limits).unwrap() {
            let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
            values.push((header.partition_leader_epoch, value));
        }
    }
    log.close().unwrap();
    values
}

#[test]
fn idempotent_retries_are_stored_once_even_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let core = Core::start(&data_dir, &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    let producer_id = 4242;

    assert_eq!(
        produce(&mut kafka, "idem", &batch(producer_id, 0, &["a", "b"])),
        (0, 0)
    );
    assert_eq!(
        produce(&mut kafka, "idem", &batch(producer_id, 2, &["c"])),
        (0, 2)
    );
    // The retry of the first batch: same offsets, nothing appended.
    assert_eq!(
        produce(&mut kafka, "idem", &batch(producer_id, 0, &["a", "b"])),
        (0, 0)
    );
    // A gap: sequence 5 after 2.
    assert_eq!(
        produce(&mut kafka, "idem", &batch(producer_id, 5, &["x"])).0,
        OUT_OF_ORDER_SEQUENCE
    );
    // A plain (non-idempotent) batch is always appended.
    assert_eq!(
        produce(&mut kafka, "idem", &batch(-1, -1, &["plain"])),
        (0, 3)
    );
    drop(kafka);

    core.kill();
    let core = Core::start(&data_dir, &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    // After the restart the retry of the last idempotent batch is still recognised.
    assert_eq!(
        produce(&mut kafka, "idem", &batch(producer_id, 2, &["c"])),
        (0, 2)
    );
    assert_eq!(
        produce(&mut kafka, "idem", &batch(producer_id, 3, &["d"])),
        (0, 4)
    );
    drop(kafka);
    core.stop();

    let values = stored(&data_dir, "idem");
    assert_eq!(
        values,
        ["a", "b", "c", "plain", "d"]
            .iter()
            .map(|value| (0, value.to_string()))
            .collect::<Vec<_>>(),
        "each record once, each batch stamped with leader epoch 0"
    );
}

#[test]
fn acks_zero_gets_no_response_but_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let core = Core::start(&data_dir, &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    kafka.send(
        PRODUCE,
        3,
        false,
        &produce_v3_body("zero", 0, 0, &batch(-1, -1, &["fire", "forget"])),
    );
    // The next request's answer is the first thing to arrive: acks=0 was answered by silence.
    assert_eq!(
        produce(&mut kafka, "zero", &batch(-1, -1, &["acked"])),
        (0, 2)
    );
    drop(kafka);
    let metrics = core.metrics();
    for line in [
        "silt_kafka_requests_total{api=\"produce\"} 2",
        "silt_kafka_produce_records_total 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    core.stop();
    let values: Vec<String> = stored(&data_dir, "zero")
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    assert_eq!(values, ["fire", "forget", "acked"]);
}

const INIT_PRODUCER_ID: i16 = 22;
const INVALID_TOPIC_EXCEPTION: i16 = 17;

/// InitProducerId v0 without a transactional id: (error code, producer id).
fn init_producer_id(kafka: &mut RawKafka) -> (i16, i64) {
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i16).to_be_bytes()); // transactional_id: null
    body.extend_from_slice(&60_000i32.to_be_bytes()); // transaction_timeout_ms
    kafka.send(INIT_PRODUCER_ID, 0, false, &body);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    let _correlation_id = reader.i32();
    let _throttle_time_ms = reader.i32();
    let error = reader.i16();
    (error, reader.i64())
}

#[test]
fn producer_ids_never_repeat_across_kill_9_and_internal_topics_refuse_produce() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let core = Core::start(&data_dir, &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    let (error, first) = init_producer_id(&mut kafka);
    assert_eq!(error, 0);
    let (_, second) = init_producer_id(&mut kafka);
    assert!(second > first, "{first} then {second}");
    // The node's own topics take no client records: a stray record there would be replayed
    // as the node's state at the next start.
    for topic in ["__silt_producer_ids", "__silt_consumer_offsets"] {
        assert_eq!(
            produce(&mut kafka, topic, &batch(-1, -1, &["junk"])).0,
            INVALID_TOPIC_EXCEPTION,
            "{topic}"
        );
    }
    drop(kafka);

    core.kill();
    let core = Core::start(&data_dir, &[]);
    let mut kafka = RawKafka::connect(core.kafka);
    let (error, after) = init_producer_id(&mut kafka);
    assert_eq!(error, 0);
    assert!(after > second, "{second} before kill -9, {after} after");
    drop(kafka);
    core.stop();
}
