//! Committed consumer offsets, kept durable in an internal log topic, as Kafka keeps them in
//! `__consumer_offsets`: a commit is one record (key: group, topic, partition; value: offset,
//! leader epoch, metadata) appended and fsync'd before the commit is acknowledged, and the
//! in-memory table is rebuilt by replaying the topic at start. Being a log topic, it will
//! replicate like any other partition once the cluster arrives.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use silt_gateways::kafka::CommittedOffset;
use silt_log::batch::{BatchSpec, DecodeLimits, Record, decode_records, encode_batch};
use silt_log::{AppendOptions, LogError, LogManager, PartitionLog};

/// The internal topic; its name cannot collide with a Kafka client's `__consumer_offsets`.
pub(crate) const OFFSETS_TOPIC: &str = "__silt_consumer_offsets";
/// Bytes read from the topic at a time while replaying it.
const REPLAY_READ_BYTES: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Key {
    group: String,
    topic: String,
    partition: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Value {
    offset: i64,
    leader_epoch: i32,
    metadata: Option<String>,
}

/// (group, topic, partition) -> committed offset.
type Table = BTreeMap<(String, String, u32), CommittedOffset>;

/// The committed offsets of every group.
#[derive(Debug)]
pub(crate) struct OffsetStore {
    partition: Arc<PartitionLog>,
    table: RwLock<Table>,
}

impl OffsetStore {
    /// Opens (creating it on first start) the internal topic and replays it. Blocking.
    pub(crate) fn open(log: &LogManager) -> Result<OffsetStore, LogError> {
        if log.topic(OFFSETS_TOPIC).is_none() {
            // Kept until a group's offsets are rewritten, never by age: committed offsets of a
            // quiet group must not expire with the data's retention.
            let overrides = BTreeMap::from([("retention.ms".to_string(), "-1".to_string())]);
            match log.create_topic(OFFSETS_TOPIC, 1, &overrides) {
                Ok(_) | Err(LogError::TopicExists(_)) => {}
                Err(error) => return Err(error),
            }
        }
        let partition = log.partition(OFFSETS_TOPIC, 0)?;
        let mut table = Table::new();
        let mut offset = partition.log_start_offset();
        let limits = DecodeLimits::default();
        loop {
            let slice = partition.read(offset, REPLAY_READ_BYTES)?;
            if slice.bytes.is_empty() {
                break;
            }
            for batch in silt_log::batch::batches(&slice.bytes, usize::MAX) {
                let (header, bytes) = batch?;
                for record in decode_records(&header, bytes, &limits)? {
                    if record.offset < offset as i64 {
                        continue;
                    }
                    apply(&mut table, &record.key, &record.value);
                }
                offset = header.last_offset() as u64 + 1;
            }
        }
        Ok(OffsetStore {
            partition,
            table: RwLock::new(table),
        })
    }

    /// Appends the commits durably, then applies them. Blocking.
    pub(crate) fn commit(
        &self,
        group: &str,
        offsets: &[(String, u32, CommittedOffset)],
    ) -> Result<(), LogError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let now = silt_log::now_ms();
        let records: Vec<Record> = offsets
            .iter()
            .map(|(topic, partition, committed)| Record {
                timestamp: now,
                key: Some(
                    serde_json::to_vec(&Key {
                        group: group.to_string(),
                        topic: topic.clone(),
                        partition: *partition,
                    })
                    .expect("plain structs serialize")
                    .into(),
                ),
                value: Some(
                    serde_json::to_vec(&Value {
                        offset: committed.offset,
                        leader_epoch: committed.leader_epoch,
                        metadata: committed.metadata.clone(),
                    })
                    .expect("plain structs serialize")
                    .into(),
                ),
                headers: Vec::new(),
            })
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch)?;
        self.partition
            .append_with(&mut batch, AppendOptions::default())?;
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        for (topic, partition, committed) in offsets {
            table.insert(
                (group.to_string(), topic.clone(), *partition),
                committed.clone(),
            );
        }
        Ok(())
    }

    /// The committed offset of one partition.
    pub(crate) fn get(&self, group: &str, topic: &str, partition: u32) -> Option<CommittedOffset> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table
            .get(&(group.to_string(), topic.to_string(), partition))
            .cloned()
    }

    /// Every committed offset of a group.
    pub(crate) fn group(&self, group: &str) -> Vec<(String, u32, CommittedOffset)> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table
            .iter()
            .filter(|((g, _, _), _)| g == group)
            .map(|((_, topic, partition), committed)| {
                (topic.clone(), *partition, committed.clone())
            })
            .collect()
    }

    /// Groups that have committed offsets.
    pub(crate) fn groups(&self) -> Vec<String> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut groups: Vec<String> = table.keys().map(|(group, _, _)| group.clone()).collect();
        groups.dedup();
        groups
    }
}

/// Applies one replayed record; a record that does not parse is skipped with a warning (it
/// cannot be written by this code, so it is foreign).
fn apply(table: &mut Table, key: &Option<bytes::Bytes>, value: &Option<bytes::Bytes>) {
    let parsed = key
        .as_ref()
        .and_then(|key| serde_json::from_slice::<Key>(key).ok())
        .zip(
            value
                .as_ref()
                .and_then(|value| serde_json::from_slice::<Value>(value).ok()),
        );
    match parsed {
        Some((key, value)) => {
            table.insert(
                (key.group, key.topic, key.partition),
                CommittedOffset {
                    offset: value.offset,
                    leader_epoch: value.leader_epoch,
                    metadata: value.metadata,
                },
            );
        }
        None => tracing::warn!(
            topic = OFFSETS_TOPIC,
            "skipping an unreadable offset record"
        ),
    }
}
