//! Committed consumer offsets, kept durable in an internal log topic, as Kafka keeps them in
//! `__consumer_offsets`: a commit is one record (key: group, topic, partition; value: offset,
//! leader epoch, metadata) appended and fsync'd before the commit is acknowledged, and the
//! in-memory table is rebuilt by replaying the topic at start. Being a log topic, it will
//! replicate like any other partition once the cluster arrives.
//!
//! The topic stays bounded by the number of keys, not by the number of commits ever made:
//! once more records were appended since the last snapshot than the table has keys (and at
//! least [`SNAPSHOT_AFTER_RECORDS_MIN`]), the whole table is appended again as a snapshot
//! and the log start moves to the snapshot's first offset, which deletes the (small, see
//! [`SEGMENT_BYTES`]) segments below it. Replay starts at the log start, so it reads one
//! snapshot and the commits after it. A crash between the snapshot and the move leaves the
//! old records in place, and replaying them before the snapshot gives the same table, since
//! the snapshot holds the latest value of every key. Commits and snapshots are serialized
//! (`writer`), so no commit can land between a snapshot's read of the table and its append.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use silt_gateways::kafka::CommittedOffset;
use silt_log::batch::{BatchSpec, DecodeLimits, Record, decode_records, encode_batch};
use silt_log::{AppendOptions, LogError, LogManager, PartitionLog};

/// The internal topic; its name cannot collide with a Kafka client's `__consumer_offsets`.
pub(crate) const OFFSETS_TOPIC: &str = "__silt_consumer_offsets";
/// Bytes read from the topic at a time while replaying it.
const REPLAY_READ_BYTES: usize = 1 << 20;
/// `segment.bytes` of the topic: small, so the segments a snapshot supersedes are deleted
/// soon after (only whole segments below the log start are).
const SEGMENT_BYTES: u64 = 4 << 20;
/// A snapshot is written once this many records, or as many as the table has keys if that is
/// more, were appended since the last one.
const SNAPSHOT_AFTER_RECORDS_MIN: u64 = 4096;
/// Records per batch of a snapshot, well under the log's batch size limit.
const SNAPSHOT_BATCH_RECORDS: usize = 1024;

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
    /// Held across every append: commit records appended since the last snapshot.
    writer: Mutex<u64>,
}

impl OffsetStore {
    /// Opens (creating it on first start) the internal topic and replays it. Blocking.
    pub(crate) fn open(log: &LogManager) -> Result<OffsetStore, LogError> {
        // Kept until a snapshot supersedes it, never by age: committed offsets of a quiet
        // group must not expire with the data's retention.
        let overrides = BTreeMap::from([
            ("retention.ms".to_string(), "-1".to_string()),
            ("segment.bytes".to_string(), SEGMENT_BYTES.to_string()),
        ]);
        match log.topic(OFFSETS_TOPIC) {
            None => match log.create_topic(OFFSETS_TOPIC, 1, &overrides) {
                Ok(_) | Err(LogError::TopicExists(_)) => {}
                Err(error) => return Err(error),
            },
            // A topic made before snapshots existed gets small segments from now on.
            Some(topic) if topic.overrides != overrides => {
                log.alter_topic_config(OFFSETS_TOPIC, &overrides)?;
            }
            Some(_) => {}
        }
        let partition = log.partition(OFFSETS_TOPIC, 0)?;
        let mut table = Table::new();
        let mut offset = partition.log_start_offset();
        let mut replayed = 0u64;
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
                    replayed += 1;
                    apply(&mut table, &record.key, &record.value);
                }
                offset = header.last_offset() as u64 + 1;
            }
        }
        let table_len = table.len() as u64;
        let store = OffsetStore {
            partition,
            table: RwLock::new(table),
            // Replay read the last snapshot (at most as many records as there are keys) and
            // the commits after it.
            writer: Mutex::new(replayed.saturating_sub(table_len)),
        };
        store.snapshot_if_due()?;
        Ok(store)
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
            .map(|(topic, partition, committed)| record(now, group, topic, *partition, committed))
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch)?;
        {
            let mut since_snapshot = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.partition
                .append_with(&mut batch, AppendOptions::default())?;
            *since_snapshot += records.len() as u64;
            let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
            for (topic, partition, committed) in offsets {
                table.insert(
                    (group.to_string(), topic.clone(), *partition),
                    committed.clone(),
                );
            }
        }
        // The commit is durable and applied whatever happens to the snapshot; a failed one
        // is tried again after the next commit.
        if let Err(error) = self.snapshot_if_due() {
            tracing::warn!(%error, topic = OFFSETS_TOPIC, "cannot snapshot committed offsets");
        }
        Ok(())
    }

    /// Appends the whole table as a snapshot and moves the log start to it, when enough
    /// records were appended since the last one. Blocking.
    fn snapshot_if_due(&self) -> Result<(), LogError> {
        let mut since_snapshot = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let keys = self.table.read().unwrap_or_else(|e| e.into_inner()).len() as u64;
        if *since_snapshot < SNAPSHOT_AFTER_RECORDS_MIN.max(keys) {
            return Ok(());
        }
        // No commit can change the table while `writer` is held.
        let table = self.table.read().unwrap_or_else(|e| e.into_inner()).clone();
        let start = self.partition.log_end_offset();
        if !table.is_empty() {
            let now = silt_log::now_ms();
            let records: Vec<Record> = table
                .iter()
                .map(|((group, topic, partition), committed)| {
                    record(now, group, topic, *partition, committed)
                })
                .collect();
            let mut batches = BytesMut::new();
            for chunk in records.chunks(SNAPSHOT_BATCH_RECORDS) {
                encode_batch(&BatchSpec::default(), chunk, &mut batches)?;
            }
            self.partition
                .append_with(&mut batches, AppendOptions::default())?;
        }
        let deleted = self.partition.delete_before(start)?;
        tracing::debug!(
            keys = table.len(),
            start,
            deleted_bytes = deleted.bytes,
            "committed offsets snapshot"
        );
        *since_snapshot = 0;
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

/// The record of one committed offset.
fn record(
    now: i64,
    group: &str,
    topic: &str,
    partition: u32,
    committed: &CommittedOffset,
) -> Record {
    Record {
        timestamp: now,
        key: Some(
            serde_json::to_vec(&Key {
                group: group.to_string(),
                topic: topic.to_string(),
                partition,
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

#[cfg(test)]
mod tests {
    use silt_log::{FlushPolicy, LogConfig};

    use super::*;

    fn open_log(dir: &std::path::Path) -> Arc<LogManager> {
        let mut config = LogConfig::new(dir);
        config.fs_reserve_bytes = 0;
        // Tens of thousands of commits: fsyncs would only make the test slow.
        config.flush = FlushPolicy::RelaxedUnsafe {
            interval: std::time::Duration::from_secs(1),
        };
        LogManager::open(config).unwrap()
    }

    fn committed(offset: i64) -> CommittedOffset {
        CommittedOffset {
            offset,
            leader_epoch: 3,
            // Large records, so the commits fill several segments.
            metadata: Some(format!("{offset:0>400}")),
        }
    }

    /// Many more commits than keys: the topic and its replay stay bounded by the keys, and
    /// after a restart every key has its last committed offset.
    #[test]
    fn snapshots_bound_the_topic_by_keys_across_restarts() {
        const KEYS: u32 = 50;
        const ROUNDS: i64 = 600;
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        let store = OffsetStore::open(&log).unwrap();
        let mut written = 0u64;
        for round in 0..ROUNDS {
            let offsets: Vec<_> = (0..KEYS)
                .map(|partition| {
                    let offset = round * 1_000 + i64::from(partition);
                    (
                        format!("topic-{}", partition % 5),
                        partition,
                        committed(offset),
                    )
                })
                .collect();
            let group = format!("group-{}", round % 2);
            store.commit(&group, &offsets).unwrap();
            written += offsets.len() as u64 * 450;
        }
        let partition = log.partition(OFFSETS_TOPIC, 0).unwrap();
        let keys = 2 * u64::from(KEYS);
        assert!(
            partition.log_start_offset() > 0,
            "a snapshot moved the start"
        );
        let records_kept = partition.log_end_offset() - partition.log_start_offset();
        assert!(
            records_kept <= 2 * keys + SNAPSHOT_AFTER_RECORDS_MIN + u64::from(KEYS),
            "{records_kept} records kept for {keys} keys"
        );
        assert!(
            partition.size_bytes() < written / 4,
            "{} bytes on disk after {written} bytes of commits",
            partition.size_bytes()
        );
        let before: Vec<_> = ["group-0", "group-1"]
            .iter()
            .map(|group| store.group(group))
            .collect();
        drop(store);
        drop(partition);
        log.close().unwrap();
        drop(log);

        let log = open_log(dir.path());
        let store = OffsetStore::open(&log).unwrap();
        let after: Vec<_> = ["group-0", "group-1"]
            .iter()
            .map(|group| store.group(group))
            .collect();
        assert_eq!(after, before);
        assert_eq!(after[1].len(), KEYS as usize);
        assert_eq!(
            store.get("group-1", "topic-3", 3).map(|c| c.offset),
            Some((ROUNDS - 1) * 1_000 + 3)
        );
        assert_eq!(
            store.get("group-0", "topic-3", 3).map(|c| c.offset),
            Some((ROUNDS - 2) * 1_000 + 3)
        );
    }

    /// A crash after a snapshot's append but before the start moved replays the old records
    /// and then the snapshot: the same table.
    #[test]
    fn a_snapshot_left_below_the_start_replays_to_the_same_table() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        let store = OffsetStore::open(&log).unwrap();
        for round in 0..10 {
            store
                .commit("g", &[("t".to_string(), 0, committed(round))])
                .unwrap();
        }
        // The snapshot's records, appended by hand without moving the start.
        let snapshot = record(0, "g", "t", 0, &committed(9));
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &[snapshot], &mut batch).unwrap();
        store
            .partition
            .append_with(&mut batch, AppendOptions::default())
            .unwrap();
        drop(store);
        log.close().unwrap();
        drop(log);
        let log = open_log(dir.path());
        let store = OffsetStore::open(&log).unwrap();
        assert_eq!(store.get("g", "t", 0).map(|c| c.offset), Some(9));
    }
}
