//! Tests of the log-backed ingest port on a real data directory: durability and order after
//! reopening, group commit, the disk budget, and shutdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use silt_gateways::mqtt::server::{IngestError, IngestPort, IngestRequest};
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, Header, Record, decode_batch, encode_batch,
};
use silt_log::config::{BudgetPolicy, DiskBudget, LogConfig, MAX_BATCH_BYTES_DEFAULT};
use silt_log::{LogManager, PartitionLog};

use super::{BATCH_RECORDS_MAX_DEFAULT, IngestConfig, LogIngest, record_bytes_max};

fn config(default_partitions: u32) -> IngestConfig {
    IngestConfig {
        default_partitions,
        queue_bytes_max: 8 << 20,
        batch_bytes_max: MAX_BATCH_BYTES_DEFAULT,
        batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
        zstd_level: None,
    }
}

fn log_config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    // The host's free space must not decide these tests.
    config.fs_reserve_bytes = 0;
    config
}

fn request(topic: &Arc<str>, key: &str, value: &str) -> IngestRequest {
    IngestRequest {
        log_topic: topic.clone(),
        key: Bytes::copy_from_slice(key.as_bytes()),
        record: Record {
            timestamp: 1_700_000_000_000,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            headers: vec![Header {
                key: "mqtt.qos".into(),
                value: Some(Bytes::from_static(b"1")),
            }],
        },
    }
}

/// Submits one record and waits until it is durable or refused.
async fn publish(ingest: &LogIngest, request: IngestRequest) -> Result<(), IngestError> {
    let receipt = ingest.submit(vec![request]).await?;
    receipt.await.expect("every receipt is answered")
}

/// Every record of a topic, as (key, value) per partition, in offset order.
fn read_topic(log: &LogManager, topic: &str) -> Vec<Vec<(String, String)>> {
    let info = log.topic(topic).expect("the topic exists");
    (0..info.partitions)
        .map(|number| read_partition(&log.partition(topic, number).unwrap()))
        .collect()
}

fn read_partition(partition: &PartitionLog) -> Vec<(String, String)> {
    let mut records = Vec::new();
    let mut offset = partition.log_start_offset();
    while offset < partition.high_watermark() {
        let slice = partition.read(offset, 1 << 20).unwrap();
        let mut bytes = slice.bytes.as_slice();
        while let Some((_, batch, len)) = decode_batch(bytes, &DecodeLimits::default()).unwrap() {
            for record in batch {
                if record.offset as u64 >= offset {
                    let text = |b: Option<Bytes>| String::from_utf8(b.unwrap().to_vec()).unwrap();
                    records.push((text(record.key), text(record.value)));
                    offset = record.offset as u64 + 1;
                }
            }
            bytes = &bytes[len..];
        }
    }
    records
}

/// 50 publishers, each waiting for its previous record before sending the next (as a QoS 1
/// client with one message in flight does): every acknowledged record is there after a
/// reopen, in submission order per key, and they shared fsyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_share_fsyncs_and_keep_per_key_order() {
    const PUBLISHERS: usize = 50;
    const PER_PUBLISHER: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(log_config(dir.path())).unwrap();
    let ingest = Arc::new(LogIngest::new(log.clone(), config(4)));
    let topic: Arc<str> = "mqtt".into();

    let tasks: Vec<_> = (0..PUBLISHERS)
        .map(|publisher| {
            let ingest = ingest.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                for sequence in 0..PER_PUBLISHER {
                    let key = format!("sensor-{publisher}");
                    let value = format!("{publisher}:{sequence}");
                    publish(&ingest, request(&topic, &key, &value))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let records = PUBLISHERS * PER_PUBLISHER;
    let fsyncs: u64 = (0..4)
        .map(|number| log.partition("mqtt", number).unwrap().fsync_count())
        .sum();
    assert!(
        fsyncs < (records / 2) as u64,
        "{fsyncs} fsyncs for {records} records: group commit is not working"
    );

    ingest.shutdown().await;
    log.close().unwrap();
    // The ingest path holds the manager, and with it the directory lock.
    drop(ingest);
    drop(log);
    let log = LogManager::open(log_config(dir.path())).unwrap();
    let partitions = read_topic(&log, "mqtt");
    assert_eq!(partitions.len(), 4, "the default partition count");
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (number, partition) in partitions.iter().enumerate() {
        for (key, value) in partition {
            let expected = silt_log::partitioner::partition_for_key(key.as_bytes(), 4) as usize;
            assert_eq!(expected, number, "{key} is in the partition its hash names");
            per_key.entry(key.clone()).or_default().push(value.clone());
        }
    }
    assert_eq!(per_key.len(), PUBLISHERS);
    for (key, values) in per_key {
        let publisher = key.strip_prefix("sensor-").unwrap();
        let expected: Vec<String> = (0..PER_PUBLISHER)
            .map(|sequence| format!("{publisher}:{sequence}"))
            .collect();
        assert_eq!(values, expected, "records of {key} in submission order");
    }
    log.close().unwrap();
}

/// A full budget under `reject` refuses new records with QuotaExceeded and loses nothing
/// stored; once data is deleted, the same ingest path takes records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_budget_refuses_with_quota_exceeded_and_ingest_resumes_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mut log_config = log_config(dir.path());
    log_config.budget = Some(DiskBudget {
        bytes_max: 64 << 10,
        policy: BudgetPolicy::Reject,
    });
    let log = LogManager::open(log_config.clone()).unwrap();

    // Half the budget goes to another topic, which is deleted later to free space.
    log.create_topic("filler", 1, &BTreeMap::new()).unwrap();
    let filler = log.partition("filler", 0).unwrap();
    let mut batch = BytesMut::new();
    let big = Record {
        value: Some(Bytes::from(vec![7u8; 32 << 10])),
        ..Record::default()
    };
    encode_batch(&BatchSpec::default(), &[big], &mut batch).unwrap();
    filler.append(&mut batch).unwrap();
    drop(filler);

    let ingest = LogIngest::new(log.clone(), config(1));
    let topic: Arc<str> = "mqtt".into();
    let payload = "x".repeat(1000);
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for sequence in 0..200 {
        let value = format!("{sequence}:{payload}");
        match publish(&ingest, request(&topic, "k", &value)).await {
            Ok(()) => acknowledged.push(value),
            Err(error) => {
                refusal = Some(error);
                break;
            }
        }
    }
    let refusal = refusal.expect("200 KB cannot fit a 64 KiB budget");
    assert!(
        matches!(&refusal, IngestError::QuotaExceeded(message) if message.contains("budget")),
        "{refusal:?}"
    );
    assert!(!acknowledged.is_empty());
    // Still refused: nothing was freed.
    let again = publish(&ingest, request(&topic, "k", &format!("late:{payload}"))).await;
    assert!(
        matches!(again, Err(IngestError::QuotaExceeded(_))),
        "{again:?}"
    );

    log.delete_topic("filler").unwrap();
    for sequence in 0..5 {
        let value = format!("after:{sequence}");
        publish(&ingest, request(&topic, "k", &value))
            .await
            .unwrap();
        acknowledged.push(value);
    }

    ingest.shutdown().await;
    log.close().unwrap();
    // The ingest path holds the manager, and with it the directory lock.
    drop(ingest);
    drop(log);
    let log = LogManager::open(log_config).unwrap();
    let stored: Vec<String> = read_topic(&log, "mqtt")
        .remove(0)
        .into_iter()
        .map(|(_, value)| value)
        .collect();
    assert_eq!(
        stored, acknowledged,
        "exactly the acknowledged records, in order"
    );
    log.close().unwrap();
}

/// Shutdown finishes what is queued and refuses what comes after; every receipt is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_queue_and_refuses_new_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(log_config(dir.path())).unwrap();
    let ingest = LogIngest::new(log.clone(), config(2));
    let topic: Arc<str> = "t".into();
    let mut receipts = Vec::new();
    for sequence in 0..500 {
        let key = format!("k{}", sequence % 7);
        let receipt = ingest
            .submit(vec![request(&topic, &key, &sequence.to_string())])
            .await
            .unwrap();
        receipts.push(receipt);
    }
    ingest.shutdown().await;
    for receipt in receipts {
        assert_eq!(receipt.await.expect("answered"), Ok(()));
    }
    let late = ingest.submit(vec![request(&topic, "k0", "late")]).await;
    assert!(matches!(late, Err(IngestError::ShuttingDown)), "{late:?}");
    let stored: usize = read_topic(&log, "t").iter().map(Vec::len).sum();
    assert_eq!(stored, 500);
    log.close().unwrap();
}

/// A record that can never fit a batch is refused at once, naming the limit.
#[tokio::test]
async fn a_record_larger_than_a_batch_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(log_config(dir.path())).unwrap();
    let mut config = config(1);
    config.batch_bytes_max = 4096;
    let ingest = LogIngest::new(log.clone(), config);
    let topic: Arc<str> = "t".into();
    let error = ingest
        .submit(vec![request(&topic, "k", &"x".repeat(5000))])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, IngestError::Failed(message) if message.contains("log.max_batch_bytes")),
        "{error:?}"
    );
    publish(&ingest, request(&topic, "k", "small"))
        .await
        .unwrap();
    ingest.shutdown().await;
    log.close().unwrap();
}

/// Many small records split into several batches, none over the log's limit, in order.
#[tokio::test]
async fn batches_respect_the_log_batch_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut log_config = log_config(dir.path());
    log_config.max_batch_bytes = 2048;
    let log = LogManager::open(log_config).unwrap();
    let mut config = config(1);
    config.batch_bytes_max = 2048;
    config.batch_records_max = 10;
    let ingest = LogIngest::new(log.clone(), config);
    let topic: Arc<str> = "t".into();
    let mut receipts = Vec::new();
    for sequence in 0..300 {
        let value = format!("{sequence:04}-{}", "v".repeat(sequence % 300));
        receipts.push(
            ingest
                .submit(vec![request(&topic, "k", &value)])
                .await
                .unwrap(),
        );
    }
    for receipt in receipts {
        assert_eq!(receipt.await.unwrap(), Ok(()));
    }
    let values: Vec<String> = read_topic(&log, "t")
        .remove(0)
        .into_iter()
        .map(|(_, value)| value[..4].to_string())
        .collect();
    let expected: Vec<String> = (0..300).map(|n| format!("{n:04}")).collect();
    assert_eq!(values, expected);
    ingest.shutdown().await;
    log.close().unwrap();
}

/// The size bound used for packing is never below a record's real size in a batch, wherever
/// the record sits and whatever its timestamp.
#[test]
fn record_size_bound_covers_the_encoded_size() {
    let mut records = Vec::new();
    for size in [0usize, 1, 63, 64, 127, 128, 300, 16_383, 16_384, 70_000] {
        records.push(Record {
            timestamp: i64::MIN,
            key: None,
            value: Some(Bytes::from(vec![1u8; size])),
            headers: Vec::new(),
        });
        records.push(Record {
            timestamp: i64::MAX,
            key: Some(Bytes::from(vec![2u8; size])),
            value: None,
            headers: vec![
                Header {
                    key: "h".repeat(size % 200),
                    value: Some(Bytes::from(vec![3u8; size])),
                },
                Header {
                    key: String::new(),
                    value: None,
                },
            ],
        });
    }
    let mut batch = BytesMut::new();
    let len = encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
    let bound: usize =
        super::BATCH_HEADER_LEN + records.iter().map(record_bytes_max).sum::<usize>();
    assert!(len <= bound, "{len} > {bound}");
    for record in &records {
        let mut alone = BytesMut::new();
        let len = encode_batch(
            &BatchSpec::default(),
            std::slice::from_ref(record),
            &mut alone,
        )
        .unwrap();
        assert!(len <= super::BATCH_HEADER_LEN + record_bytes_max(record));
    }
}

/// With `log.compression` on, a batch of at least `COMPRESS_MIN_BYTES` is stored zstd and
/// reads back the same; a single small record stays uncompressed; records that do not shrink
/// are stored uncompressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_compressed_at_rest_and_small_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(log_config(dir.path())).unwrap();
    let ingest = LogIngest::new(
        log.clone(),
        IngestConfig {
            zstd_level: Some(1),
            ..config(1)
        },
    );
    let topic: Arc<str> = "mqtt".into();
    publish(&ingest, request(&topic, "s", "small"))
        .await
        .unwrap();
    // One submission of 100 JSON readings: one batch of about 10 KiB.
    let readings: Vec<IngestRequest> = (0..100)
        .map(|n| {
            let value = format!(
                "{{\"sensor\":\"plant-{n:03}/line-{}\",\"temp_c\":{}.5,\"rh_pct\":40.25,\"padding\":\"{}\"}}",
                n % 10,
                n % 30,
                "x".repeat(20)
            );
            request(&topic, "s", &value)
        })
        .collect();
    let readings_values: Vec<String> = readings
        .iter()
        .map(|r| String::from_utf8(r.record.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    let receipt = ingest.submit(readings).await.unwrap();
    receipt.await.unwrap().unwrap();
    // One random value of 9,000 bytes, which zstd cannot shrink: kept uncompressed.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<IngestRequest> = (0..1)
        .map(|_| {
            let value: Vec<u8> = (0..9_000)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let mut noise = request(&topic, "s", "");
            noise.record.value = Some(Bytes::from(value));
            noise
        })
        .collect();
    let receipt = ingest.submit(noise).await.unwrap();
    receipt.await.unwrap().unwrap();

    let partition = log.partition("mqtt", 0).unwrap();
    let slice = partition.read(0, 1 << 20).unwrap();
    let codecs: Vec<(i32, Compression)> = silt_log::batch::batches(&slice.bytes, usize::MAX)
        .map(|batch| {
            let (header, _) = batch.unwrap();
            (header.record_count, header.compression().unwrap())
        })
        .collect();
    assert_eq!(
        codecs,
        [
            (1, Compression::None),
            (100, Compression::Zstd),
            (1, Compression::None)
        ]
    );
    let stored = slice.bytes.len();
    let mut rest = &slice.bytes[..];
    let mut values = Vec::new();
    while let Some((_, batch, len)) = decode_batch(rest, &DecodeLimits::default()).unwrap() {
        values.extend(batch.into_iter().map(|record| record.value.unwrap()));
        rest = &rest[len..];
    }
    assert_eq!(values.len(), 102);
    assert_eq!(values[0], "small");
    let readings_read: Vec<String> = values[1..101]
        .iter()
        .map(|value| String::from_utf8(value.to_vec()).unwrap())
        .collect();
    assert_eq!(readings_read, readings_values);
    let raw: usize = values.iter().map(Bytes::len).sum();
    assert!(
        stored < raw,
        "{stored} bytes stored for {raw} bytes of values"
    );
    ingest.shutdown().await;
}
