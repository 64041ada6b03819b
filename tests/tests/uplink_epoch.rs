//! Batches the uplink appends carry the partition's leader epoch, as Produce's do: records
//! shipped from a real `silt-edge` to a real `silt-core`, read back with Kafka Fetch, are in
//! batches whose partitionLeaderEpoch is the epoch Metadata (v7) reports for the partition,
//! never -1 (unset).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use silt_tests::core::{Core, field_addr};
use silt_tests::kafka::{RawKafka, Reader, fetch_v4_body, fetch_v4_result};
use silt_tests::mqtt::skip_unless_silt;
use silt_tests::uplink::{core_ca, publish_numbered, start_edge, wait_drained};

/// MQTT clients, one key each (`sensor/0..6`, spread over the core's partitions).
const CLIENTS: usize = 6;
const PER_CLIENT: u64 = 50;
const PARTITIONS: u32 = 3;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const METADATA: i16 = 3;
const FETCH: i16 = 1;

fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// (leader id, leader epoch) per partition of `topic`, from a Metadata v7 response.
fn metadata_v7(kafka: &mut RawKafka, topic: &str) -> HashMap<i32, (i32, i32)> {
    let mut body = Vec::new();
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(0); // allow_auto_topic_creation: false
    kafka.send(METADATA, 7, false, &body);
    let response = kafka.read_response();
    let mut reader = Reader { bytes: &response };
    let _correlation_id = reader.i32();
    let _throttle_ms = reader.i32();
    for _ in 0..reader.i32() {
        let _node_id = reader.i32();
        let _host = reader.string();
        let _port = reader.i32();
        let _rack = reader.string();
    }
    let _cluster_id = reader.string();
    let _controller = reader.i32();
    assert_eq!(reader.i32(), 1, "one topic");
    assert_eq!(reader.i16(), 0, "topic error code");
    assert_eq!(reader.string(), topic);
    reader.bytes = &reader.bytes[1..]; // is_internal
    let mut partitions = HashMap::new();
    for _ in 0..reader.i32() {
        assert_eq!(reader.i16(), 0, "partition error code");
        let index = reader.i32();
        let leader = reader.i32();
        let epoch = reader.i32();
        for _array in 0..3 {
            for _ in 0..reader.i32().max(0) {
                let _node = reader.i32();
            }
        }
        partitions.insert(index, (leader, epoch));
    }
    partitions
}

/// Every batch of a partition as (partition leader epoch, record count), fetched from 0 to
/// the high watermark.
fn fetch_batches(kafka: &mut RawKafka, topic: &str, partition: i32) -> Vec<(i32, i32)> {
    let mut batches = Vec::new();
    let mut offset = 0i64;
    loop {
        kafka.send(
            FETCH,
            4,
            false,
            &fetch_v4_body(topic, partition, offset, 0, 1, 8 << 20),
        );
        let fetched = fetch_v4_result(&kafka.read_response());
        assert_eq!(fetched.error_code, 0, "fetch of partition {partition}");
        for batch in silt_log::batch::batches(&fetched.records, usize::MAX) {
            let (header, _) = batch.expect("a whole, valid batch");
            if header.last_offset() < offset {
                continue;
            }
            batches.push((header.partition_leader_epoch, header.record_count));
            offset = header.last_offset() + 1;
        }
        if offset >= fetched.high_watermark {
            return batches;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_from_the_edge_carry_the_partition_leader_epoch() {
    if !skip_unless_silt("uplink_epoch") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let core_dir = dir.path().join("core");
    let core = blocking(|| {
        Core::start(
            &core_dir,
            &["--set", &format!("kafka.default_partitions={PARTITIONS}")],
        )
    });
    let uplink: SocketAddr = field_addr(&core.started_line, "uplink=");
    let mut edge = blocking(|| {
        start_edge(
            &dir.path().join("edge"),
            "edge-epoch",
            uplink,
            &core_ca(&core_dir),
            &[],
        )
    });

    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let mqtt = edge.mqtt;
        tasks.push(tokio::spawn(async move {
            let topic = format!("sensor/{client}");
            publish_numbered(mqtt, &format!("epoch-{client}"), &topic, 0, PER_CLIENT).await
        }));
    }
    for task in tasks {
        let acked = task.await.expect("a publisher panicked");
        assert_eq!(
            acked.len() as u64,
            PER_CLIENT,
            "the edge must ack everything"
        );
    }
    blocking(|| wait_drained(&edge, DRAIN_TIMEOUT));

    let (records, batches) = blocking(|| {
        let mut kafka = RawKafka::connect(core.kafka);
        let leaders = metadata_v7(&mut kafka, "mqtt");
        assert_eq!(leaders.len(), PARTITIONS as usize);
        let (mut records, mut batches) = (0i64, 0usize);
        for (&partition, &(_leader, epoch)) in &leaders {
            assert_ne!(epoch, -1, "Metadata v7 reports a leader epoch");
            for (batch_epoch, count) in fetch_batches(&mut kafka, "mqtt", partition) {
                assert_eq!(
                    batch_epoch, epoch,
                    "a batch of partition {partition} carries epoch {batch_epoch}, its leader's is {epoch}"
                );
                records += i64::from(count);
                batches += 1;
            }
        }
        (records, batches)
    });
    assert_eq!(
        records,
        (CLIENTS as u64 * PER_CLIENT) as i64,
        "every record read back"
    );
    assert!(batches > 0);

    blocking(|| edge.stop());
    blocking(|| core.stop());
}
