//! Producer ids for InitProducerId that never repeat on this node, even when its clock goes
//! back across a restart (a machine without a real-time clock, an NTP step). Kafka hands out
//! ids from blocks its controller reserves durably; this node does the same with an internal
//! log topic: before the first id of a block is given out, a record reserving the block is
//! appended and fsync'd, so a restart starts after every block ever reserved. The topic keeps
//! only its latest record (the log start moves to it), so it stays one small segment.
//!
//! A repeated id would be dangerous: the partitions' producer state, rebuilt from the log,
//! would take a new producer's first batches for duplicates of an old one's and drop them.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use silt_log::batch::{BatchSpec, DecodeLimits, Record, decode_records, encode_batch};
use silt_log::{AppendOptions, LogError, LogManager, PartitionLog};

/// The internal topic.
pub(crate) const PRODUCER_IDS_TOPIC: &str = "__silt_producer_ids";
/// Ids reserved per record.
const BLOCK: i64 = 1000;
/// `segment.bytes` of the topic: records are tiny and only the latest is kept.
const SEGMENT_BYTES: u64 = 64 << 10;
const REPLAY_READ_BYTES: usize = 64 << 10;
const RECORD_KEY: &[u8] = b"producer-id-block";

#[derive(Debug, Serialize, Deserialize)]
struct Reservation {
    /// Every id below this may have been given out.
    reserved_below: i64,
}

/// The id allocator of one node.
#[derive(Debug)]
pub(crate) struct ProducerIds {
    partition: Arc<PartitionLog>,
    block: Mutex<Block>,
}

#[derive(Debug)]
struct Block {
    next: i64,
    /// One past the last id reserved; `next == end` means a new block must be reserved first.
    end: i64,
}

impl ProducerIds {
    /// Opens (creating it on first start) the internal topic and reads the last reservation.
    /// Ids start after it, and never below `clock_floor` (ids from before this topic existed
    /// were taken from the clock). Blocking.
    pub(crate) fn open(log: &LogManager, clock_floor: i64) -> Result<ProducerIds, LogError> {
        let overrides = std::collections::BTreeMap::from([
            ("retention.ms".to_string(), "-1".to_string()),
            ("segment.bytes".to_string(), SEGMENT_BYTES.to_string()),
        ]);
        if log.topic(PRODUCER_IDS_TOPIC).is_none() {
            match log.create_topic(PRODUCER_IDS_TOPIC, 1, &overrides) {
                Ok(_) | Err(LogError::TopicExists(_)) => {}
                Err(error) => return Err(error),
            }
        }
        let partition = log.partition(PRODUCER_IDS_TOPIC, 0)?;
        let reserved = last_reservation(&partition)?;
        let next = reserved.unwrap_or(0).max(clock_floor).max(1);
        Ok(ProducerIds {
            partition,
            block: Mutex::new(Block { next, end: next }),
        })
    }

    /// The next id, reserving a new block durably first when the current one is used up.
    /// Blocking (an fsync once per [`BLOCK`] ids).
    pub(crate) fn allocate(&self) -> Result<i64, LogError> {
        let mut block = self.block.lock().unwrap_or_else(|e| e.into_inner());
        if block.next >= block.end {
            let end = block.next.saturating_add(BLOCK);
            self.reserve(end)?;
            block.end = end;
        }
        let id = block.next;
        block.next += 1;
        Ok(id)
    }

    /// Appends (durably) a record reserving every id below `end`, then drops older records.
    fn reserve(&self, end: i64) -> Result<(), LogError> {
        let value = serde_json::to_vec(&Reservation {
            reserved_below: end,
        })
        .expect("a reservation always serializes");
        let record = Record {
            timestamp: silt_log::now_ms(),
            key: Some(Bytes::from_static(RECORD_KEY)),
            value: Some(value.into()),
            headers: Vec::new(),
        };
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &[record], &mut batch)?;
        let info = self
            .partition
            .append_with(&mut batch, AppendOptions::default())?;
        // Durable before any id of the block is given out, whatever the log's flush policy.
        self.partition.flush()?;
        // Only the latest reservation matters; a failure here leaves older ones to replay.
        if let Err(error) = self.partition.delete_before(info.base_offset) {
            tracing::warn!(%error, topic = PRODUCER_IDS_TOPIC, "cannot drop old reservations");
        }
        Ok(())
    }
}

/// The highest reservation in the topic, if any.
fn last_reservation(partition: &PartitionLog) -> Result<Option<i64>, LogError> {
    let limits = DecodeLimits::default();
    let mut offset = partition.log_start_offset();
    let mut reserved: Option<i64> = None;
    loop {
        let slice = partition.read(offset, REPLAY_READ_BYTES)?;
        if slice.bytes.is_empty() {
            return Ok(reserved);
        }
        for batch in silt_log::batch::batches(&slice.bytes, usize::MAX) {
            let (header, bytes) = batch?;
            for record in decode_records(&header, bytes, &limits)? {
                let parsed = record
                    .value
                    .as_deref()
                    .and_then(|value| serde_json::from_slice::<Reservation>(value).ok());
                match parsed {
                    Some(reservation) => {
                        reserved = reserved.max(Some(reservation.reserved_below));
                    }
                    None => {
                        return Err(LogError::Corrupt {
                            path: PRODUCER_IDS_TOPIC.into(),
                            reason: format!(
                                "offset {} is not a producer id reservation",
                                record.offset
                            ),
                        });
                    }
                }
            }
            offset = header.last_offset() as u64 + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use silt_log::LogConfig;

    fn open_log(dir: &std::path::Path) -> Arc<LogManager> {
        LogManager::open(LogConfig::new(dir)).unwrap()
    }

    #[test]
    fn ids_continue_after_every_reserved_block_even_when_the_clock_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let clock = 1_700_000_000_000i64 << 12;
        let mut issued = Vec::new();
        {
            let log = open_log(dir.path());
            let ids = ProducerIds::open(&log, clock).unwrap();
            for _ in 0..(BLOCK + 5) {
                issued.push(ids.allocate().unwrap());
            }
            log.close().unwrap();
        }
        assert_eq!(issued[0], clock);
        // Restart with a clock an hour behind: no id repeats.
        let log = open_log(dir.path());
        let ids = ProducerIds::open(&log, clock - (3_600_000 << 12)).unwrap();
        let next = ids.allocate().unwrap();
        assert!(next > *issued.iter().max().unwrap(), "{next}");
        assert_eq!(next, clock + 2 * BLOCK, "after the second reserved block");
        // Only the latest reservation is kept.
        let partition = log.partition(PRODUCER_IDS_TOPIC, 0).unwrap();
        assert_eq!(
            partition.log_end_offset() - partition.log_start_offset(),
            1,
            "one record left"
        );
    }

    #[test]
    fn a_clock_ahead_of_the_reservations_moves_ids_forward() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open_log(dir.path());
            let ids = ProducerIds::open(&log, 5000).unwrap();
            assert_eq!(ids.allocate().unwrap(), 5000);
            log.close().unwrap();
        }
        let log = open_log(dir.path());
        let ids = ProducerIds::open(&log, 1 << 40).unwrap();
        assert_eq!(ids.allocate().unwrap(), 1 << 40);
    }

    #[test]
    fn a_record_that_is_not_a_reservation_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        ProducerIds::open(&log, 1).unwrap();
        let partition = log.partition(PRODUCER_IDS_TOPIC, 0).unwrap();
        let record = Record {
            timestamp: 0,
            key: None,
            value: Some(Bytes::from_static(b"not json")),
            headers: Vec::new(),
        };
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &[record], &mut batch).unwrap();
        partition
            .append_with(&mut batch, AppendOptions::default())
            .unwrap();
        let error = ProducerIds::open(&log, 1).unwrap_err();
        assert!(
            error.to_string().contains("not a producer id reservation"),
            "{error}"
        );
    }
}
