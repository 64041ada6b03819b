//! Where shipped batches land: appends to the core log with exactly-once dedup.
//!
//! Each edge partition is a *stream* `(edge id, edge partition)` of one topic, and its records
//! carry their edge offsets. A shipped record goes to the core partition its key hashes to
//! (Kafka's murmur2; a null key hashes the edge id, so an edge's unkeyed records stay in
//! order) with three headers added: `silt.edge` (edge id), `silt.edge.partition` and
//! `silt.edge.offset` (decimal). The core keeps, per core partition and stream, the next edge
//! offset it expects: a record below it is a duplicate and is skipped.
//!
//! That state is exact across any crash because it is derived from the log itself: on first
//! use of a topic, every partition is scanned and each stream's highest `silt.edge.offset` is
//! taken. A checkpoint ([`super::checkpoint`]) bounds that scan: it holds the state over
//! each partition's records below a covered offset, and only the tail past it is scanned.
//! A checkpoint is taken while no uplink group of the topic is between registering its starts
//! and its last write (writes hold the topic's gate shared for that, the snapshot holds it
//! exclusively). Groups are pipelined: one is composed while the one before it is written and
//! the one before that is fsync'd, and the state moves only once a group is durable, so each
//! written group registers a lower bound of its first log offset (`staged`) until then. A
//! partition's covered offset is the lower of its high watermark and its lowest staged start:
//! every uplink record below it is then in the state, and nothing in the state is above what
//! is durable, whatever a crash does next. A crash between appending to one core partition and
//! another (one edge batch spans several when keys differ) leaves some records durable and
//! others not; the edge re-sends the batch, and each core partition skips exactly what it
//! already has, because a stream's records reach one core partition in edge-offset order. An
//! append is durable (fsync) before the state moves and before the edge gets its ack.
//!
//! Every batch appended carries the partition's leader epoch, from the broker's
//! [`Leadership`] (the one place roles and epochs are decided), as Produce's do; a partition
//! this node does not lead refuses the append.
//!
//! Appends of one stream are serialised (a lock per stream, held by a pipeline until its last
//! group is durable and in the state), so a stale connection of an edge racing its
//! reconnected self cannot interleave the check and the append.
//!
//! Dedup by offset trusts that an edge log's offsets name one record each. A log that went
//! back (restored from a backup, copied to another device, a disk that lost written data)
//! keeps its id but gives offsets the core already has to new records, which would be
//! skipped as duplicates and acked: lost without a trace. So a group can be composed with
//! the edge's log end (a `Data` frame's `edge_end`), and is refused
//! ([`StoreError::EdgeLogBehind`]) when the core stores records of the stream at or past it;
//! the edge then ships its log under a new id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use silt_log::batch::{DecodeLimits, Header, decode_batch};
use silt_log::{AppendOptions, LogError, LogManager, PartitionLog, partitioner};

use super::checkpoint::{CheckpointDir, PartitionCheckpoint};
use super::compose::{Part, compose};
use crate::broker::{Leadership, NotLeader};

/// Header naming the edge a record came from.
pub(crate) const HEADER_EDGE: &str = "silt.edge";
/// Header with the id of the edge log the record's offset counts in (`Hello`'s `edge_log`),
/// on records from an edge log that has one.
pub(crate) const HEADER_EDGE_LOG: &str = "silt.edge.log";
/// Header with the record's partition on its edge.
pub(crate) const HEADER_EDGE_PARTITION: &str = "silt.edge.partition";
/// Header with the record's offset on its edge.
pub(crate) const HEADER_EDGE_OFFSET: &str = "silt.edge.offset";
/// A topic is checkpointed once this many bytes were appended since its last checkpoint...
pub(crate) const CHECKPOINT_BYTES: u64 = 64 << 20;
/// ...or this long after its last checkpoint if anything was appended since.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

/// One edge partition's records, as the core tells them apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct StreamKey {
    pub(crate) edge_id: String,
    /// The id of the edge's log, whose offsets the stream's are: an edge whose log was made
    /// anew (a wiped disk) ships new streams, deduplicated against none of the old one's
    /// offsets. Empty for an edge log without an id (made before logs had ids) and for
    /// version 1 edges.
    pub(crate) edge_log: String,
    pub(crate) edge_partition: u32,
}

/// Why shipped data was not stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("shipped batches are invalid: {0}")]
    BadBatch(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot save the uplink dedup checkpoint: {0}")]
    Checkpoint(std::io::Error),
    #[error("partition {partition} of {topic:?}: {source}")]
    NotLeader {
        topic: String,
        partition: u32,
        source: NotLeader,
    },
    /// The edge's log ends below records the core stores from it; see the module doc.
    #[error(
        "the edge's log ends at offset {edge_end}, but the core already stores this edge log's \
         records up to offset {stored_end}: the log went back (restored from a backup or \
         copied); the edge must ship it under a new log id"
    )]
    EdgeLogBehind { edge_end: u64, stored_end: u64 },
}

/// What one `append` did, for the ack and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AppendOutcome {
    pub(crate) appended_records: u64,
    pub(crate) duplicate_records: u64,
    pub(crate) appended_bytes: u64,
}

/// Next expected edge offset per stream, for each partition of one topic.
#[derive(Debug, Default)]
struct TopicDedup {
    partitions: Vec<HashMap<StreamKey, u64>>,
    /// Per partition, a lower bound of the first offset of each group written but not yet
    /// durable and in `partitions`: a checkpoint covers nothing from the lowest on.
    staged: Vec<Vec<u64>>,
}

/// Core partition -> next edge offset, as a stream's groups written but not yet synced
/// moved it (ahead of the dedup state, which moves once they are durable).
pub(crate) type StagedNext = HashMap<u32, u64>;

/// The exclusive right to append one stream's records; see [`UplinkStore::lock_stream`].
#[derive(Debug, Clone)]
pub(crate) struct StreamTurn(#[allow(dead_code)] Arc<tokio::sync::OwnedMutexGuard<()>>);

/// A stream's group of frames composed into the core's batches, holding the stream's turn,
/// for [`UplinkStore::write_group`].
pub(crate) struct ComposedGroup {
    _turn: StreamTurn,
    state: Arc<TopicState>,
    composed: super::compose::Composed,
}

/// One core partition's part of a group, written and awaiting its fsync.
struct Unsynced {
    partition: usize,
    log: Arc<PartitionLog>,
    /// Registered in [`TopicDedup::staged`] until the fsync is done.
    start: u64,
    /// Log offset past the group's records.
    end: u64,
    next_edge_offset: u64,
    records: u64,
    bytes: u64,
}

fn unstage(state: &TopicState, partition: usize, start: u64) {
    let mut dedup = state.dedup.lock().unwrap_or_else(|e| e.into_inner());
    remove_staged(&mut dedup.staged[partition], start);
}

fn remove_staged(staged: &mut Vec<u64>, start: u64) {
    if let Some(at) = staged.iter().position(|&offset| offset == start) {
        staged.swap_remove(at);
    }
}

/// One topic's dedup state and what its checkpoints need.
#[derive(Debug)]
struct TopicState {
    dedup: Mutex<TopicDedup>,
    /// Held shared from an append's check to its state update, exclusively while a
    /// checkpoint snapshot is taken.
    gate: RwLock<()>,
    /// Bytes appended since the last checkpoint.
    unsaved_bytes: AtomicU64,
    last_checkpoint: Mutex<Instant>,
    /// What loading the state cost.
    #[cfg(test)]
    loaded: LoadReport,
}

/// What loading a topic's dedup state cost, for the log line and the metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LoadReport {
    pub(crate) from_checkpoint: bool,
    pub(crate) scanned_records: u64,
    pub(crate) scanned_bytes: u64,
}

/// The core log behind the uplink server.
#[derive(Debug)]
pub(crate) struct UplinkStore {
    log: Arc<LogManager>,
    /// Which partitions this node leads, and the epoch stamped into their batches.
    leadership: Arc<Leadership>,
    default_partitions: u32,
    checkpoints: Option<CheckpointDir>,
    topics: Mutex<HashMap<String, Arc<TopicState>>>,
    streams: Mutex<HashMap<(String, StreamKey), StreamLock>>,
    on_append: super::AppendHook,
}

/// Held while one stream's records are checked, appended and made durable.
type StreamLock = Arc<tokio::sync::Mutex<()>>;

impl UplinkStore {
    /// A store over `log`; with `checkpoints`, dedup state is saved there and loaded from it.
    pub(crate) fn new(
        log: Arc<LogManager>,
        leadership: Arc<Leadership>,
        default_partitions: u32,
        checkpoints: Option<CheckpointDir>,
    ) -> UplinkStore {
        UplinkStore {
            log,
            leadership,
            default_partitions,
            checkpoints,
            topics: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            on_append: super::AppendHook::default(),
        }
    }

    /// Runs `hook` after every append that stored records.
    pub(crate) fn with_on_append(mut self, hook: super::AppendHook) -> UplinkStore {
        self.on_append = hook;
        self
    }

    /// Appends the records of `batches` (edge RecordBatch v2 bytes) at edge offsets from
    /// `first_offset` on, skipping those already stored, and returns once they are durable.
    /// Blocking: call from a blocking thread.
    #[cfg(test)]
    pub(crate) fn append(
        &self,
        topic: &str,
        stream: &StreamKey,
        first_offset: u64,
        batches: &[u8],
    ) -> Result<AppendOutcome, StoreError> {
        self.append_parts(topic, stream, &[(first_offset, batches)])
    }

    /// [`Self::append`] for several `Data` frames of one stream at once, in order: one
    /// durable append (one fsync) per core partition for all of them.
    #[cfg(test)]
    pub(crate) fn append_parts(
        &self,
        topic: &str,
        stream: &StreamKey,
        parts: &[(u64, &[u8])],
    ) -> Result<AppendOutcome, StoreError> {
        let turn = StreamTurn(Arc::new(
            self.stream_lock(topic, stream).blocking_lock_owned(),
        ));
        self.append_group(turn, topic, stream, parts, &StagedNext::new(), |_| {})
    }

    /// Waits for the exclusive right to append `stream`'s records. A pipeline of groups
    /// shares one turn (clones of it); the next holder gets in once every clone is dropped,
    /// that is once every group of the pipeline is durable and in the dedup state or failed.
    pub(crate) async fn lock_stream(&self, topic: &str, stream: &StreamKey) -> StreamTurn {
        StreamTurn(Arc::new(self.stream_lock(topic, stream).lock_owned().await))
    }

    /// Appends one group of `Data` frames of one stream, composed and written in one go: see
    /// [`Self::compose_group`] and [`Self::write_group`]; `written` gets the group's
    /// [`StagedNext`].
    #[cfg(test)]
    pub(crate) fn append_group(
        &self,
        turn: StreamTurn,
        topic: &str,
        stream: &StreamKey,
        parts: &[(u64, &[u8])],
        staged: &StagedNext,
        written: impl FnOnce(StagedNext),
    ) -> Result<AppendOutcome, StoreError> {
        let parts: Vec<Part<'_>> = parts
            .iter()
            .map(|&(first_offset, batches)| Part::shipped(first_offset, batches))
            .collect();
        let (group, next) = self.compose_group(turn, topic, stream, &parts, staged, None)?;
        self.write_group(topic, stream, group, || written(next))
    }

    /// Composes one group of `Data` frames of one stream (each its first edge offset and its
    /// batches, in edge order) into the core's batches, skipping records already stored, for
    /// [`Self::write_group`]. Blocking: call from a blocking thread.
    ///
    /// Pipelining: `staged` is what the stream's groups composed before it but not yet durable
    /// and in the dedup state moved (core partition -> next edge offset, see [`StagedNext`]),
    /// and the second value returned is `staged` moved by this group, for the next. A group
    /// can be composed while the one before it is written, because a stream's edge offsets
    /// only grow: whether a record is a duplicate depends on the state and on the offsets of
    /// the groups before it, not on whether they are written yet. The group holds `turn`
    /// until it is durable (or failed), so a reconnected edge's stream cannot compose from a
    /// dedup state that misses records already written.
    ///
    /// With `edge_end` (where the edge's log ended when it read the frames), a group of a log
    /// that ends below the stream's stored end (the highest next expected offset over the
    /// core partitions) is refused with [`StoreError::EdgeLogBehind`] before anything is
    /// composed: its records would reuse offsets the core already has.
    pub(crate) fn compose_group(
        &self,
        turn: StreamTurn,
        topic: &str,
        stream: &StreamKey,
        parts: &[Part<'_>],
        staged: &StagedNext,
        edge_end: Option<u64>,
    ) -> Result<(ComposedGroup, StagedNext), StoreError> {
        let info = self.log.ensure_topic(topic, self.default_partitions)?;
        let state = self.topic_state(topic, info.partitions)?;
        let limits = self.decode_limits();
        let budget = self.log.config().max_batch_bytes / 2;
        // Route, dedup and add the origin headers in one pass over the shipped bytes,
        // keeping edge order within each core partition.
        // The next offset each partition expects, taken before composing rather than under
        // the topic's lock throughout: only this stream's own groups move its entries, and
        // every one of them still to be durable is in `staged`, which is at least where its
        // state update will move them.
        let expected: Vec<u64> = {
            let dedup = state.dedup.lock().unwrap_or_else(|e| e.into_inner());
            (0..info.partitions)
                .map(|partition| {
                    let stored = dedup.partitions[partition as usize]
                        .get(stream)
                        .copied()
                        .unwrap_or(0);
                    staged
                        .get(&partition)
                        .map_or(stored, |&staged| staged.max(stored))
                })
                .collect()
        };
        if let Some(edge_end) = edge_end {
            let stored_end = expected.iter().copied().max().unwrap_or(0);
            if edge_end < stored_end {
                return Err(StoreError::EdgeLogBehind {
                    edge_end,
                    stored_end,
                });
            }
        }
        let composed = compose(
            parts,
            stream,
            info.partitions,
            |partition| expected[partition],
            &limits,
            budget,
        )?;
        let mut next = staged.clone();
        for (partition, batches) in composed.partitions.iter().enumerate() {
            if let Some(last) = batches.last_offset {
                next.insert(partition as u32, last + 1);
            }
        }
        let group = ComposedGroup {
            _turn: turn,
            state,
            composed,
        };
        Ok((group, next))
    }

    /// Writes a group [`Self::compose_group`] made and returns once its records are durable
    /// and in the dedup state. Blocking: call from a blocking thread.
    ///
    /// Pipelining: `written` is called as soon as the group's batches are written to the log,
    /// before the fsync, so the caller can write the next group while this one is synced.
    /// Records reach each core partition in edge order because a group is written only after
    /// the previous group's `written`. Not called when the group fails before it is written
    /// whole; the groups composed after it must then not be written.
    pub(crate) fn write_group(
        &self,
        topic: &str,
        stream: &StreamKey,
        group: ComposedGroup,
        written: impl FnOnce(),
    ) -> Result<AppendOutcome, StoreError> {
        let ComposedGroup {
            _turn,
            state,
            composed,
        } = group;
        let mut outcome = AppendOutcome {
            duplicate_records: composed.duplicate_records,
            ..AppendOutcome::default()
        };
        let mut unsynced: Vec<Unsynced> = Vec::new();
        let mut failure: Option<StoreError> = None;
        {
            // Held from the first staged start to the last write: a checkpoint then sees each
            // of this group's records either in the state or at or above a staged start it
            // does not cover, or not yet in the log at all.
            let _gate = state.gate.read().unwrap_or_else(|e| e.into_inner());
            for (partition, mut batches) in composed.partitions.into_iter().enumerate() {
                let Some(last) = batches.last_offset else {
                    continue;
                };
                let log = match self.log.partition(topic, partition as u32) {
                    Ok(log) => log,
                    Err(error) => {
                        failure = Some(error.into());
                        break;
                    }
                };
                let epoch = match self.leadership.leader_epoch(topic, partition as u32) {
                    Ok(epoch) => epoch,
                    Err(source) => {
                        failure = Some(StoreError::NotLeader {
                            topic: topic.to_string(),
                            partition: partition as u32,
                            source,
                        });
                        break;
                    }
                };
                // `compose` computed every CRC of these batches itself.
                let options = AppendOptions {
                    leader_epoch: Some(epoch),
                    crc_computed: true,
                    ..AppendOptions::default()
                };
                // A lower bound of where the batches land (offsets only grow), registered
                // before they are written.
                let start = log.log_end_offset();
                state.dedup.lock().unwrap_or_else(|e| e.into_inner()).staged[partition].push(start);
                // All batches of the partition in one write: one fsync covers them.
                match log.append_unsynced(&mut batches.bytes, options) {
                    Ok(appended) => {
                        unsynced.push(Unsynced {
                            partition,
                            log,
                            start,
                            end: appended.last_offset + 1,
                            next_edge_offset: last + 1,
                            records: batches.records,
                            bytes: batches.bytes.len() as u64,
                        });
                    }
                    Err(error) => {
                        unstage(&state, partition, start);
                        failure = Some(error.into());
                        break;
                    }
                }
            }
        }
        if failure.is_none() {
            written();
        }
        // What was written is synced and recorded even after a failure: those records are
        // in the log, and the dedup state must not miss what may become durable.
        for written in unsynced {
            let synced = written.log.sync_through(written.end);
            {
                let mut dedup = state.dedup.lock().unwrap_or_else(|e| e.into_inner());
                remove_staged(&mut dedup.staged[written.partition], written.start);
                if synced.is_ok() {
                    let next = dedup.partitions[written.partition]
                        .entry(stream.clone())
                        .or_insert(0);
                    *next = (*next).max(written.next_edge_offset);
                }
            }
            match synced {
                Ok(()) => {
                    outcome.appended_records += written.records;
                    outcome.appended_bytes += written.bytes;
                    // After the state moved, so only the next fsync may wait for the zeros.
                    if let Err(error) = written.log.extend_preallocation() {
                        tracing::warn!(topic, partition = written.partition, %error, "cannot extend the preallocated segment tail");
                    }
                }
                Err(error) => {
                    failure.get_or_insert(error.into());
                }
            }
        }
        if outcome.appended_records > 0 {
            state
                .unsaved_bytes
                .fetch_add(outcome.appended_bytes, Ordering::Relaxed);
            (self.on_append.0)();
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(outcome),
        }
    }

    /// What shipped batches are checked against: the log's largest batch (at least 1 MiB,
    /// plus the frame's slack) and the decoder's decompression bound.
    pub(crate) fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_batch_bytes: self.log.config().max_batch_bytes.max(1 << 20) + 64,
            ..DecodeLimits::default()
        }
    }

    /// Checkpoints every topic that is due at `now`: [`CHECKPOINT_BYTES`] appended, or
    /// anything appended and [`CHECKPOINT_INTERVAL`] passed; with `all`, every topic with
    /// anything appended (clean shutdown). Blocking. Returns the topics saved.
    pub(crate) fn checkpoint_due(&self, now: Instant, all: bool) -> Result<usize, StoreError> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(0);
        };
        let topics: Vec<(String, Arc<TopicState>)> = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, state)| (name.clone(), state.clone()))
            .collect();
        let mut saved = 0;
        for (topic, state) in topics {
            let unsaved = state.unsaved_bytes.load(Ordering::Relaxed);
            let since = now.saturating_duration_since(
                *state
                    .last_checkpoint
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            let due =
                unsaved > 0 && (all || unsaved >= CHECKPOINT_BYTES || since >= CHECKPOINT_INTERVAL);
            if !due {
                continue;
            }
            self.checkpoint_topic(checkpoints, &topic, &state, now)?;
            saved += 1;
        }
        Ok(saved)
    }

    fn checkpoint_topic(
        &self,
        checkpoints: &CheckpointDir,
        topic: &str,
        state: &TopicState,
        now: Instant,
    ) -> Result<(), StoreError> {
        let logs = (0..state
            .dedup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .partitions
            .len())
            .map(|partition| self.log.partition(topic, partition as u32))
            .collect::<Result<Vec<_>, _>>()?;
        let (snapshot, unsaved) = {
            // No uplink group of this topic is between its staged starts and its last write
            // now, so every uplink record below each high watermark is in the state or at or
            // above the registered start of a group whose state update is still to come.
            let _gate = state.gate.write().unwrap_or_else(|e| e.into_inner());
            let dedup = state.dedup.lock().unwrap_or_else(|e| e.into_inner());
            let snapshot: Vec<PartitionCheckpoint> = dedup
                .partitions
                .iter()
                .zip(&logs)
                .zip(&dedup.staged)
                .map(|((next_offsets, log), staged)| PartitionCheckpoint {
                    // Records of a group written but not yet in the state may be below the
                    // high watermark (their fsync done, their state update not yet).
                    covered_offset: staged.iter().copied().fold(log.high_watermark(), u64::min),
                    next_offsets: next_offsets.clone(),
                })
                .collect();
            (snapshot, state.unsaved_bytes.swap(0, Ordering::Relaxed))
        };
        if let Err(error) = checkpoints.save(topic, &snapshot) {
            state.unsaved_bytes.fetch_add(unsaved, Ordering::Relaxed);
            return Err(StoreError::Checkpoint(error));
        }
        *state
            .last_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = now;
        Ok(())
    }

    /// What loading `topic`'s dedup state cost, once it is loaded.
    #[cfg(test)]
    pub(crate) fn load_report(&self, topic: &str) -> Option<LoadReport> {
        let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics.get(topic).map(|state| state.loaded)
    }

    fn stream_lock(&self, topic: &str, stream: &StreamKey) -> StreamLock {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams
            .entry((topic.to_string(), stream.clone()))
            .or_default()
            .clone()
    }

    /// The topic's dedup state, rebuilt on first use from its checkpoint and the log past it.
    fn topic_state(&self, topic: &str, partitions: u32) -> Result<Arc<TopicState>, StoreError> {
        if let Some(found) = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(topic)
        {
            return Ok(found.clone());
        }
        let started = Instant::now();
        let (dedup, report) = self.load_dedup(topic, partitions)?;
        tracing::info!(
            topic,
            from_checkpoint = report.from_checkpoint,
            scanned_records = report.scanned_records,
            scanned_bytes = report.scanned_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "uplink dedup state loaded"
        );
        metrics::counter!("silt_uplink_dedup_scanned_records_total", "topic" => topic.to_string())
            .increment(report.scanned_records);
        metrics::counter!("silt_uplink_dedup_scanned_bytes_total", "topic" => topic.to_string())
            .increment(report.scanned_bytes);
        let state = Arc::new(TopicState {
            dedup: Mutex::new(dedup),
            gate: RwLock::new(()),
            unsaved_bytes: AtomicU64::new(0),
            last_checkpoint: Mutex::new(Instant::now()),
            #[cfg(test)]
            loaded: report,
        });
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        Ok(topics.entry(topic.to_string()).or_insert(state).clone())
    }

    /// Each partition's state: the checkpoint's, if it is usable, plus a scan of the log past
    /// its covered offset.
    fn load_dedup(
        &self,
        topic: &str,
        partitions: u32,
    ) -> Result<(TopicDedup, LoadReport), StoreError> {
        let logs = (0..partitions)
            .map(|partition| self.log.partition(topic, partition))
            .collect::<Result<Vec<_>, _>>()?;
        let saved = match &self.checkpoints {
            None => None,
            Some(checkpoints) => match checkpoints.load(topic, partitions) {
                // A checkpoint ahead of the log is not of this log (a topic deleted and made
                // again, a data directory restored from a backup): scan it all instead.
                Ok(saved)
                    if saved
                        .iter()
                        .zip(&logs)
                        .all(|(saved, log)| saved.covered_offset <= log.log_end_offset()) =>
                {
                    Some(saved)
                }
                Ok(_) => {
                    tracing::warn!(
                        topic,
                        "uplink dedup checkpoint is ahead of the log; ignored"
                    );
                    None
                }
                Err(reason) => {
                    tracing::debug!(topic, %reason, "no usable uplink dedup checkpoint");
                    None
                }
            },
        };
        let mut report = LoadReport {
            from_checkpoint: saved.is_some(),
            ..LoadReport::default()
        };
        let mut saved = saved.map(Vec::into_iter);
        let mut dedup = TopicDedup::default();
        for log in &logs {
            let PartitionCheckpoint {
                covered_offset,
                next_offsets,
            } = saved.as_mut().and_then(Iterator::next).unwrap_or_default();
            let from = covered_offset.max(log.local_start_offset());
            dedup
                .partitions
                .push(scan_streams(log, from, next_offsets, &mut report)?);
            dedup.staged.push(Vec::new());
        }
        Ok((dedup, report))
    }
}

/// The core partition of a shipped record.
pub(crate) fn route(key: Option<&[u8]>, edge_id: &str, partitions: u32) -> u32 {
    partitioner::partition_for_key(key.unwrap_or(edge_id.as_bytes()), partitions)
}

/// The stream and edge offset a stored record's headers name, if it came over the uplink:
/// its last headers are `silt.edge`, `silt.edge.log` (only for an edge log with an id),
/// `silt.edge.partition` and `silt.edge.offset`, in that order, as [`compose`] appends them
/// after the record's own.
pub(crate) fn record_origin(headers: &[Header]) -> Option<(StreamKey, u64)> {
    fn value<'a>(header: &'a Header, name: &str) -> Option<&'a str> {
        (header.key == name)
            .then_some(header.value.as_deref())
            .flatten()
            .and_then(|value| std::str::from_utf8(value).ok())
    }
    let [rest @ .., partition, offset] = headers else {
        return None;
    };
    let offset = value(offset, HEADER_EDGE_OFFSET)?.parse().ok()?;
    let edge_partition = value(partition, HEADER_EDGE_PARTITION)?.parse().ok()?;
    let (edge_id, edge_log) = match rest {
        [.., edge, log] if log.key == HEADER_EDGE_LOG => {
            (value(edge, HEADER_EDGE)?, value(log, HEADER_EDGE_LOG)?)
        }
        [.., edge] => (value(edge, HEADER_EDGE)?, ""),
        [] => return None,
    };
    Some((
        StreamKey {
            edge_id: edge_id.to_string(),
            edge_log: edge_log.to_string(),
            edge_partition,
        },
        offset,
    ))
}

/// Each stream's next expected edge offset in one core partition: `next` (the state of the
/// records below `from`) updated with the records from `from` to the high watermark.
fn scan_streams(
    log: &PartitionLog,
    from: u64,
    mut next: HashMap<StreamKey, u64>,
    report: &mut LoadReport,
) -> Result<HashMap<StreamKey, u64>, StoreError> {
    let mut offset = from;
    let limits = DecodeLimits::default();
    loop {
        let slice = log.read(offset, 4 << 20)?;
        if slice.bytes.is_empty() {
            break;
        }
        let mut rest = &slice.bytes[..];
        while let Some((header, records, used)) =
            decode_batch(rest, &limits).map_err(|error| StoreError::BadBatch(error.to_string()))?
        {
            rest = &rest[used..];
            report.scanned_bytes += used as u64;
            offset = (header.last_offset() + 1) as u64;
            for record in records {
                report.scanned_records += 1;
                if let Some((stream, edge_offset)) = record_origin(&record.headers) {
                    let entry = next.entry(stream).or_insert(0);
                    *entry = (*entry).max(edge_offset + 1);
                }
            }
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use silt_log::LogConfig;
    use silt_log::batch::{BatchSpec, Record, decode_batch, encode_batch};

    /// A core log under `dir/core` and a store over it (3 partitions a topic) whose dedup
    /// checkpoints live in `dir/core.uplink/dedup`, as a node opens them at start.
    fn open_with_checkpoints(dir: &std::path::Path) -> (Arc<LogManager>, UplinkStore) {
        let log = LogManager::open(LogConfig::new(dir.join("core"))).unwrap();
        let checkpoints = CheckpointDir::new(dir.join("core.uplink/dedup"));
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, Some(checkpoints));
        (log, store)
    }

    /// The edge's records at offsets `base_offset..base_offset + count`: the record at offset
    /// `o` always has key `KEYS[o % 6]` and value `v<o>`, as a real edge log re-read.
    fn edge_batch(base_offset: i64, count: usize) -> Vec<u8> {
        let records: Vec<Record> = (0..count)
            .map(|index| (index, KEYS[(base_offset as usize + index) % KEYS.len()]))
            .map(|(index, key)| Record {
                timestamp: 1_000 + index as i64,
                key: Some(Bytes::copy_from_slice(key.as_bytes())),
                value: Some(Bytes::from(format!("v{}", base_offset + index as i64))),
                headers: vec![Header {
                    key: "mqtt.topic".into(),
                    value: Some(Bytes::from_static(b"t")),
                }],
            })
            .collect();
        let mut out = BytesMut::new();
        let spec = BatchSpec {
            base_offset,
            ..BatchSpec::default()
        };
        encode_batch(&spec, &records, &mut out).unwrap();
        out.to_vec()
    }

    fn stream() -> StreamKey {
        StreamKey {
            edge_id: "e1".into(),
            edge_log: "5e1f".into(),
            edge_partition: 0,
        }
    }

    /// Every (value, edge offset) stored in the topic, partition by partition.
    fn stored(log: &LogManager, topic: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for partition in 0..log.topic(topic).unwrap().partitions {
            let part = log.partition(topic, partition).unwrap();
            let bytes = part.read(0, 1 << 20).unwrap().bytes;
            let mut rest = &bytes[..];
            while let Some((_, records, used)) =
                decode_batch(rest, &DecodeLimits::default()).unwrap()
            {
                rest = &rest[used..];
                for record in records {
                    let (_, offset) = record_origin(&record.headers).unwrap();
                    let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
                    out.push((value, offset));
                }
            }
        }
        out.sort_by_key(|(_, offset)| *offset);
        out
    }

    // Keys spread over 3 partitions; the tests check that more than one is used.
    const KEYS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

    #[test]
    fn resends_are_skipped_within_and_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        let first = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        assert_eq!(first.appended_records, 6);
        // The same batch again (a lost ack), and a batch straddling the cursor.
        let again = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        assert_eq!((again.appended_records, again.duplicate_records), (0, 6));
        let straddle = store
            .append("mqtt", &stream(), 4, &edge_batch(4, 6))
            .unwrap();
        assert_eq!(
            (straddle.appended_records, straddle.duplicate_records),
            (4, 2)
        );
        let used: std::collections::HashSet<u32> = KEYS
            .iter()
            .map(|key| route(Some(key.as_bytes()), "e1", 3))
            .collect();
        assert!(used.len() > 1, "the keys must span partitions");
        drop(store);
        log.close().unwrap();
        drop(log);

        // A restarted core rebuilds the state from the log: the whole history re-sent
        // appends nothing.
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        let resent = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        assert_eq!(resent.appended_records, 0);
        let resent = store
            .append("mqtt", &stream(), 4, &edge_batch(4, 6))
            .unwrap();
        assert_eq!(resent.appended_records, 0);
        let offsets: Vec<u64> = stored(&log, "mqtt").iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn an_edge_whose_log_was_made_anew_ships_new_streams_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        let legacy = StreamKey {
            edge_log: String::new(),
            ..stream()
        };
        let anew = StreamKey {
            edge_log: "77aa".into(),
            ..stream()
        };
        // The same edge id and partition from three logs, each from offset 0: nothing of one
        // is a duplicate of another's.
        for key in [&legacy, &stream(), &anew] {
            let appended = store.append("mqtt", key, 0, &edge_batch(0, 6)).unwrap();
            assert_eq!(
                (appended.appended_records, appended.duplicate_records),
                (6, 0)
            );
        }
        drop(store);
        log.close().unwrap();
        drop(log);

        // A restarted core tells the three apart from the records' headers alone.
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        for key in [&legacy, &stream(), &anew] {
            let resent = store.append("mqtt", key, 0, &edge_batch(0, 6)).unwrap();
            assert_eq!((resent.appended_records, resent.duplicate_records), (0, 6));
        }
        assert_eq!(stored(&log, "mqtt").len(), 18);
    }

    #[test]
    fn the_origin_is_read_from_the_last_headers_only() {
        let header = |key: &str, value: &str| Header {
            key: key.into(),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
        };
        let own = header(HEADER_EDGE_LOG, "forged");
        let legacy = [
            own.clone(),
            header(HEADER_EDGE, "e1"),
            header(HEADER_EDGE_PARTITION, "2"),
            header(HEADER_EDGE_OFFSET, "9"),
        ];
        let (key, offset) = record_origin(&legacy).unwrap();
        assert_eq!(
            (
                key.edge_id.as_str(),
                key.edge_log.as_str(),
                key.edge_partition,
                offset
            ),
            ("e1", "", 2, 9)
        );
        let with_log = [
            own.clone(),
            header(HEADER_EDGE, "e1"),
            header(HEADER_EDGE_LOG, "5e1f"),
            header(HEADER_EDGE_PARTITION, "2"),
            header(HEADER_EDGE_OFFSET, "9"),
        ];
        assert_eq!(record_origin(&with_log).unwrap().0.edge_log, "5e1f");
        // Not an uplink record: the origin headers are not last, or one is missing.
        assert_eq!(
            record_origin(&[
                legacy[1].clone(),
                legacy[2].clone(),
                legacy[3].clone(),
                own.clone()
            ]),
            None
        );
        assert_eq!(record_origin(&legacy[2..]), None);
        assert_eq!(record_origin(&[]), None);
    }

    #[test]
    fn a_crash_between_partitions_is_completed_by_the_resend() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        // Simulate a crash after one partition's append: store only the records of the first
        // key's partition, by shipping a batch holding only them at their edge offsets.
        let target = route(Some(b"a"), "e1", 3);
        let partial: Vec<usize> = (0..KEYS.len())
            .filter(|&index| route(Some(KEYS[index].as_bytes()), "e1", 3) == target)
            .collect();
        for &index in &partial {
            let batch = edge_batch(index as i64, 1);
            store
                .append("mqtt", &stream(), index as u64, &batch)
                .unwrap();
        }
        drop(store);
        drop(log);
        // Crash: no clean close. The edge re-sends the whole batch to a restarted core.
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        let outcome = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        assert_eq!(outcome.duplicate_records, partial.len() as u64);
        assert_eq!(
            outcome.appended_records,
            (KEYS.len() - partial.len()) as u64
        );
        let offsets: Vec<u64> = stored(&log, "mqtt").iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn a_restart_scans_only_the_tail_past_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let open = || open_with_checkpoints(dir.path());
        let (log, store) = open();
        store
            .append("mqtt", &stream(), 0, &edge_batch(0, 60))
            .unwrap();
        assert_eq!(
            store.checkpoint_due(Instant::now(), false).unwrap(),
            0,
            "not due yet"
        );
        assert_eq!(store.checkpoint_due(Instant::now(), true).unwrap(), 1);
        assert_eq!(
            store.checkpoint_due(Instant::now(), true).unwrap(),
            0,
            "nothing new"
        );
        // Appended after the checkpoint, then a crash: no clean close, no new checkpoint.
        store
            .append("mqtt", &stream(), 60, &edge_batch(60, 6))
            .unwrap();
        assert_eq!(
            store.load_report("mqtt").unwrap(),
            LoadReport::default(),
            "a new topic scans nothing"
        );
        drop(store);
        drop(log);

        let (log, store) = open();
        let resent = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 66))
            .unwrap();
        assert_eq!((resent.appended_records, resent.duplicate_records), (0, 66));
        let report = store.load_report("mqtt").unwrap();
        assert!(report.from_checkpoint);
        assert_eq!(
            report.scanned_records, 6,
            "only the records past the checkpoint"
        );
        store
            .append("mqtt", &stream(), 66, &edge_batch(66, 4))
            .unwrap();
        let offsets: Vec<u64> = stored(&log, "mqtt").iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, (0..70).collect::<Vec<_>>());
        drop(store);
        drop(log);

        // Without its checkpoint, the same restart scans everything and is just as exact.
        std::fs::remove_dir_all(dir.path().join("core.uplink")).unwrap();
        let (_log, store) = open();
        let resent = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 70))
            .unwrap();
        assert_eq!(resent.appended_records, 0);
        let report = store.load_report("mqtt").unwrap();
        assert!(!report.from_checkpoint);
        assert_eq!(report.scanned_records, 70);
    }

    #[test]
    fn pipelined_groups_and_a_checkpoint_between_fsync_and_state_update_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let open = || open_with_checkpoints(dir.path());
        let (log, store) = open();
        store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        let turn = StreamTurn(Arc::new(
            store.stream_lock("mqtt", &stream()).blocking_lock_owned(),
        ));
        let (first, second) = (edge_batch(6, 6), edge_batch(12, 6));
        let mut nested = None;
        let outcome = store
            .append_group(
                turn.clone(),
                "mqtt",
                &stream(),
                &[(6, &first)],
                &StagedNext::new(),
                |staged| {
                    assert!(!staged.is_empty(), "the first group moved partitions");
                    // The next group, pipelined: composed from the first group's staged
                    // offsets while the first is not yet synced; it completes first.
                    nested = Some(
                        store
                            .append_group(
                                turn,
                                "mqtt",
                                &stream(),
                                &[(12, &second)],
                                &staged,
                                |_| {},
                            )
                            .unwrap(),
                    );
                    // The first group's records are durable now (the second's fsync covered
                    // them), its state update still to come: a checkpoint taken here must
                    // not cover them.
                    for partition in 0..3 {
                        let part = log.partition("mqtt", partition).unwrap();
                        part.sync_through(part.log_end_offset()).unwrap();
                    }
                    assert_eq!(store.checkpoint_due(Instant::now(), true).unwrap(), 1);
                },
            )
            .unwrap();
        assert_eq!(
            (outcome.appended_records, outcome.duplicate_records),
            (6, 0)
        );
        assert_eq!(nested.unwrap().appended_records, 6);
        let offsets: Vec<u64> = stored(&log, "mqtt").iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, (0..18).collect::<Vec<_>>());
        // A crash now (no clean close, no later checkpoint), and the edge re-sends it all.
        drop(store);
        drop(log);
        let (log, store) = open();
        let resent = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 18))
            .unwrap();
        assert_eq!((resent.appended_records, resent.duplicate_records), (0, 18));
        let report = store.load_report("mqtt").unwrap();
        assert!(report.from_checkpoint);
        assert!(
            report.scanned_records >= 6,
            "the first group's records were scanned, not trusted to the checkpoint"
        );
        let offsets: Vec<u64> = stored(&log, "mqtt").iter().map(|(_, o)| *o).collect();
        assert_eq!(offsets, (0..18).collect::<Vec<_>>());
    }

    #[test]
    fn a_group_composed_before_the_one_ahead_is_written_stays_exact_and_a_failed_write_leaves_no_trace()
     {
        use crate::broker::Role;
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let leadership = Arc::new(Leadership::default());
        log.ensure_topic("mqtt", 3).unwrap();
        let lead = |epoch| {
            for partition in 0..3 {
                leadership.set_role("mqtt", partition, Role::Leader { epoch });
            }
        };
        lead(1);
        let checkpoints = CheckpointDir::new(dir.path().join("core.uplink/dedup"));
        let store = UplinkStore::new(log.clone(), leadership.clone(), 3, Some(checkpoints));
        let turn = || {
            StreamTurn(Arc::new(
                store.stream_lock("mqtt", &stream()).blocking_lock_owned(),
            ))
        };
        let (first, second, third) = (edge_batch(0, 6), edge_batch(6, 6), edge_batch(12, 6));
        // Three groups of one pipeline (one turn) composed one after the other, none written
        // yet: each from what the ones before it moved.
        let pipeline = turn();
        let (group1, next) = store
            .compose_group(
                pipeline.clone(),
                "mqtt",
                &stream(),
                &[Part::shipped(0, &first)],
                &StagedNext::new(),
                None,
            )
            .unwrap();
        let (group2, next) = store
            .compose_group(
                pipeline.clone(),
                "mqtt",
                &stream(),
                &[Part::shipped(6, &second)],
                &next,
                None,
            )
            .unwrap();
        // A resend overlapping both is composed as duplicates, written or not.
        let (group3, _) = store
            .compose_group(
                pipeline,
                "mqtt",
                &stream(),
                &[Part::shipped(4, &edge_batch(4, 14))],
                &next,
                None,
            )
            .unwrap();
        assert_eq!(group3.composed.duplicate_records, 8);
        drop(group3);
        let mut written = 0;
        let one = store
            .write_group("mqtt", &stream(), group1, || written += 1)
            .unwrap();
        // A checkpoint between the writes covers only what is durable and in the state.
        assert_eq!(store.checkpoint_due(Instant::now(), true).unwrap(), 1);
        let two = store
            .write_group("mqtt", &stream(), group2, || written += 1)
            .unwrap();
        assert_eq!(
            (one.appended_records, two.appended_records, written),
            (6, 6, 2)
        );
        let offsets = |log: &LogManager| {
            let mut offsets: Vec<u64> = stored(log, "mqtt").iter().map(|(_, o)| *o).collect();
            offsets.sort_unstable();
            offsets
        };
        assert_eq!(offsets(&log), (0..12).collect::<Vec<_>>());

        // The next group is composed, then its write is refused (leadership moved): nothing
        // of it is written, `written` is not called, and the state did not move.
        let (group, _) = store
            .compose_group(
                turn(),
                "mqtt",
                &stream(),
                &[Part::shipped(12, &third)],
                &StagedNext::new(),
                None,
            )
            .unwrap();
        leadership.set_role(
            "mqtt",
            0,
            Role::Follower {
                leader: 2,
                epoch: 2,
            },
        );
        let refused = store.write_group("mqtt", &stream(), group, || written += 1);
        assert!(
            matches!(refused, Err(StoreError::NotLeader { .. })),
            "{refused:?}"
        );
        assert_eq!(written, 2);
        // Leader again: the edge's resend of everything lands exactly once, as after a crash
        // of a store that never checkpointed the refused group.
        lead(3);
        drop(store);
        let checkpoints = CheckpointDir::new(dir.path().join("core.uplink/dedup"));
        let store = UplinkStore::new(log.clone(), leadership.clone(), 3, Some(checkpoints));
        let resent = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 18))
            .unwrap();
        assert_eq!((resent.appended_records, resent.duplicate_records), (6, 12));
        assert_eq!(offsets(&log), (0..18).collect::<Vec<_>>());
    }

    #[test]
    fn a_group_from_an_edge_log_that_ends_below_what_is_stored_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, None);
        store
            .append("mqtt", &stream(), 0, &edge_batch(0, 12))
            .unwrap();
        let compose = |key: &StreamKey, first_offset: i64, count: usize, edge_end: u64| {
            let turn = StreamTurn(Arc::new(
                store.stream_lock("mqtt", key).blocking_lock_owned(),
            ));
            let batch = edge_batch(first_offset, count);
            let parts = [Part::shipped(first_offset as u64, &batch)];
            store
                .compose_group(
                    turn,
                    "mqtt",
                    key,
                    &parts,
                    &StagedNext::new(),
                    Some(edge_end),
                )
                .map(|(group, _)| group)
        };
        // The log restored from a backup taken at offset 8: its records from 0 on are new,
        // but the core has offsets up to 12 from this log, whatever core partition each is in.
        let refused = compose(&stream(), 0, 8, 8);
        assert!(
            matches!(
                refused,
                Err(StoreError::EdgeLogBehind {
                    edge_end: 8,
                    stored_end: 12
                })
            ),
            "{:?}",
            refused.map(|group| group.composed.duplicate_records)
        );
        // The first offset past the last stored one is what the core expects: an edge log
        // ending there (all of it shipped) or past it is not behind.
        let level = compose(&stream(), 6, 6, 12).unwrap();
        assert_eq!(level.composed.duplicate_records, 6);
        drop(level);
        let ahead = compose(&stream(), 6, 12, 18).unwrap();
        assert_eq!(ahead.composed.duplicate_records, 6);
        let written = store.write_group("mqtt", &stream(), ahead, || {}).unwrap();
        assert_eq!(written.appended_records, 6);
        // Under a new log id, the restored log's records are a stream of their own.
        let renamed = StreamKey {
            edge_log: "77aa".into(),
            ..stream()
        };
        let group = compose(&renamed, 0, 8, 8).unwrap();
        let written = store.write_group("mqtt", &renamed, group, || {}).unwrap();
        assert_eq!(
            (written.appended_records, written.duplicate_records),
            (8, 0)
        );
        assert_eq!(stored(&log, "mqtt").len(), 18 + 8);
    }

    #[test]
    fn a_checkpoint_ahead_of_the_log_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = CheckpointDir::new(dir.path().join("state"));
        // A checkpoint claiming offsets the log does not have, and a stream already far
        // ahead: trusting it would drop the records below 1,000.
        let stale = PartitionCheckpoint {
            covered_offset: 1_000,
            next_offsets: [(stream(), 1_000)].into(),
        };
        checkpoints
            .save("mqtt", &[stale.clone(), stale.clone(), stale])
            .unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log.clone(), Arc::default(), 3, Some(checkpoints));
        let outcome = store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        assert_eq!(outcome.appended_records, 6);
        assert!(!store.load_report("mqtt").unwrap().from_checkpoint);
    }

    #[test]
    fn appends_carry_the_leader_epoch_and_a_follower_refuses_them() {
        use crate::broker::Role;
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let leadership = Arc::new(Leadership::default());
        log.ensure_topic("mqtt", 3).unwrap();
        for partition in 0..3 {
            leadership.set_role("mqtt", partition, Role::Leader { epoch: 7 });
        }
        let store = UplinkStore::new(log.clone(), leadership.clone(), 3, None);
        store
            .append("mqtt", &stream(), 0, &edge_batch(0, 6))
            .unwrap();
        let mut used = 0;
        for partition in 0..3 {
            let bytes = log
                .partition("mqtt", partition)
                .unwrap()
                .read(0, 1 << 20)
                .unwrap();
            for batch in silt_log::batch::batches(&bytes.bytes, usize::MAX) {
                let (header, _) = batch.unwrap();
                assert_eq!(header.partition_leader_epoch, 7, "partition {partition}");
                used += 1;
            }
        }
        assert!(used > 1, "the keys must span partitions");

        // A partition led elsewhere takes no uplink appends.
        let target = route(Some(b"a"), "e1", 3);
        leadership.set_role(
            "mqtt",
            target,
            Role::Follower {
                leader: 2,
                epoch: 8,
            },
        );
        let refused = store.append("mqtt", &stream(), 6, &edge_batch(6, 6));
        assert!(
            matches!(refused, Err(StoreError::NotLeader { partition, .. }) if partition == target),
            "{refused:?}"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
        let store = UplinkStore::new(log, Arc::default(), 1, None);
        let mut batch = edge_batch(0, 6);
        let last = batch.len() - 1;
        batch[last] ^= 0xff;
        assert!(matches!(
            store.append("mqtt", &stream(), 0, &batch),
            Err(StoreError::BadBatch(_))
        ));
        assert!(matches!(
            store.append("mqtt", &stream(), 0, &batch[..20]),
            Err(StoreError::BadBatch(_))
        ));
    }
}
