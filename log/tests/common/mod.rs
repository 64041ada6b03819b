//! Helpers shared by the silt-log integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use silt_log::batch::{self, BatchSpec, Compression, DecodeLimits, DecodedRecord, Record};
use silt_log::{LogConfig, LogManager, PartitionLog, TopicConfig};

/// Encodes one batch of records whose values are `"{tag}-{i}"`, with timestamps `ts + i`.
pub fn batch_of(tag: &str, count: usize, timestamp: i64) -> BytesMut {
    let records: Vec<Record> = (0..count)
        .map(|i| Record {
            timestamp: timestamp + i as i64,
            key: Some(Bytes::from(format!("key-{}", i % 3))),
            value: Some(Bytes::from(format!("{tag}-{i}"))),
            headers: Vec::new(),
        })
        .collect();
    encode(&records, Compression::None)
}

pub fn encode(records: &[Record], compression: Compression) -> BytesMut {
    let mut out = BytesMut::new();
    let spec = BatchSpec {
        compression,
        ..BatchSpec::default()
    };
    batch::encode_batch(&spec, records, &mut out).expect("encodable batch");
    out
}

/// A config with small segments and indexes, so tests cross every boundary.
pub fn small_config(dir: &std::path::Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.index_interval_bytes = 256;
    config.fs_reserve_bytes = 0;
    config.topic_defaults = TopicConfig::default()
        .with_overrides(
            [("segment.bytes".to_string(), "1024".to_string())]
                .iter()
                .map(|(k, v)| (k, v)),
        )
        .expect("valid config");
    config
}

pub fn open_partition(config: LogConfig, topic: &str) -> (Arc<LogManager>, Arc<PartitionLog>) {
    let manager = LogManager::open(config).expect("open data dir");
    manager.ensure_topic(topic, 1).expect("topic");
    let partition = manager.partition(topic, 0).expect("partition");
    (manager, partition)
}

/// Every record from `from` to the high watermark, decoded.
pub fn read_all(partition: &PartitionLog, from: u64) -> Vec<DecodedRecord> {
    let mut records = Vec::new();
    let mut offset = from;
    loop {
        let slice = partition.read(offset, 64 * 1024).expect("read");
        if slice.bytes.is_empty() {
            if offset >= slice.high_watermark {
                return records;
            }
            panic!(
                "empty read at {offset} below high watermark {}",
                slice.high_watermark
            );
        }
        let mut at = 0;
        while at < slice.bytes.len() {
            let (_, batch_records, used) =
                batch::decode_batch(&slice.bytes[at..], &DecodeLimits::default())
                    .expect("stored batch decodes")
                    .expect("whole batch");
            for record in batch_records {
                if record.offset as u64 >= offset {
                    offset = record.offset as u64 + 1;
                    records.push(record);
                }
            }
            at += used;
        }
    }
}

pub fn values(records: &[DecodedRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap_or_default().to_vec()).unwrap())
        .collect()
}

pub fn overrides(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
