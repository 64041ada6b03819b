//! One partition's log: an ordered set of segments, the offsets it assigns, group commit,
//! reads, truncation and retention.
//!
//! # Concurrency
//! `state` (segments and offsets) is held only while bytes are written to the page cache or a
//! segment is located; file reads and fsyncs happen outside it. Durability is a separate
//! monitor, `sync`: an appender that needs its bytes durable either waits for an fsync in
//! flight to cover them or runs the next fsync itself, covering every append written before
//! it started. So concurrent appenders share one fsync (group commit). Lock order is always
//! `state` then `sync`, never the reverse.
//!
//! # Invariants
//! - Offsets are assigned contiguously and never change; reads never see bytes past the
//!   durable end in the durable flush mode, so a reader never sees a record a crash could undo.
//! - Every segment below the recovery point was fsync'd whole and has index files on disk.
//! - The log start offset is persisted in the checkpoint before any segment below it is
//!   deleted, so after a crash a reader sees the data or an out-of-range error, never a hole.
//!
//! # Preallocation
//! With `preallocate_bytes` set, the active segment keeps a zero tail of at least that many
//! bytes past its logical end (see `segment`), so the group commit's fdatasync is a pure
//! overwrite. [`PartitionLog::extend_preallocation`] tops it up: it writes the zeros with the
//! state lock held (so no append writes there meanwhile) and fdatasyncs them outside it. It
//! runs after a durable append returned and whenever the caller chooses (the edge's sync
//! thread, after it has acknowledged), never inside the group commit, so an acknowledgement
//! does not wait for zeros. Roll and close cut the tail off before the segment counts as
//! closed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use crate::batch::{self, BatchHeader, DecodeLimits};
use crate::config::{FlushPolicy, TopicConfig};
use crate::disk::Disk;
use crate::error::{LogError, Result};
use crate::fsutil;
use crate::retention::{self, RetentionLimits, SegmentSummary};
use crate::segment::{self, Segment};
use crate::time::now_ms;

const CHECKPOINT_FILE: &str = "checkpoint";
/// Most bytes one `read` returns beyond its first batch, whatever the caller asks for, so a
/// client's fetch size never turns into an unbounded allocation.
pub const READ_BYTES_MAX: u64 = 64 << 20;
const CHECKPOINT_VERSION: u32 = 1;
/// Bytes [`PartitionLog::find_record`] reads at a time (at least one batch).
pub const FIND_READ_BYTES: usize = 1 << 20;

/// Where the partition's persistent offsets live, replaced atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    version: u32,
    /// Everything below this offset is fsync'd and its segments have index files.
    recovery_point: u64,
    log_start_offset: u64,
}

/// How an append treats the offsets in the batches it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetAssignment {
    /// The log assigns the next offsets, rewriting each batch's base offset (a leader).
    #[default]
    Assign,
    /// The batches carry their offsets, which must continue the log end exactly (a
    /// follower copying its leader). Offsets are contiguous in every Silt log, which lets
    /// recovery reject a batch whose base offset (outside the CRC) was damaged.
    Keep,
}

/// Options of one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendOptions {
    pub offsets: OffsetAssignment,
    /// When set, written into every batch's partition leader epoch field.
    pub leader_epoch: Option<i32>,
    /// The caller built the batches and computed their CRCs itself a moment ago (the core's
    /// uplink composes its batches from records it checked): the append checks their headers
    /// and lengths but does not read every byte again for the CRC.
    pub crc_computed: bool,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
    pub batch_count: usize,
    /// Wall-clock time of the append, in ms.
    pub append_time_ms: i64,
}

/// Whole batches read from the log, and the offsets a fetch response reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSlice {
    /// Whole batches, exactly as stored. The first may start before the requested offset.
    pub bytes: Vec<u8>,
    pub log_start_offset: u64,
    /// End of what readers may see: the durable end in the durable flush mode.
    pub high_watermark: u64,
    pub log_end_offset: u64,
}

/// What [`PartitionLog::read_into`] read: `len` bytes of whole batches, exactly as stored,
/// at the position the caller gave (the first may start before the requested offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadInto {
    pub len: usize,
    pub log_start_offset: u64,
    /// End of what readers may see: the durable end in the durable flush mode.
    pub high_watermark: u64,
    pub log_end_offset: u64,
}

/// A read at `offset` is possible from the log's files: at or past the log start, at or
/// below the end, and not below the local start (below it, only the archive holds it).
fn check_readable(offset: u64, log_start: u64, local_start: u64, log_end: u64) -> Result<()> {
    if offset < log_start || offset > log_end {
        return Err(LogError::OffsetOutOfRange {
            offset,
            log_start,
            log_end,
        });
    }
    if offset < local_start {
        return Err(LogError::NotLocal {
            offset,
            local_start,
        });
    }
    Ok(())
}

/// What one retention pass or delete removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeleteReport {
    pub segments: u64,
    pub bytes: u64,
    /// Offsets removed, which is the record count when no gaps exist.
    pub offsets: u64,
}

impl DeleteReport {
    pub fn add(&mut self, other: DeleteReport) {
        self.segments += other.segments;
        self.bytes += other.bytes;
        self.offsets += other.offsets;
    }
}

/// What opening the partition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    pub segments_recovered: u64,
    pub bytes_truncated: u64,
    pub segments_removed: u64,
}

impl RecoveryReport {
    pub fn add(&mut self, other: RecoveryReport) {
        self.segments_recovered += other.segments_recovered;
        self.bytes_truncated += other.bytes_truncated;
        self.segments_removed += other.segments_removed;
    }
}

/// Everything a partition needs from its data directory to open.
#[derive(Debug, Clone)]
pub(crate) struct OpenOptions {
    pub(crate) clean: bool,
    pub(crate) flush: FlushPolicy,
    pub(crate) max_batch_bytes: usize,
    pub(crate) index_interval_bytes: u32,
    /// Zero tail kept ahead of the active segment's end; 0 is off.
    pub(crate) preallocate_bytes: u64,
    pub(crate) disk: Arc<Disk>,
}

#[derive(Debug)]
struct State {
    segments: BTreeMap<u64, Segment>,
    log_start: u64,
    next_offset: u64,
    recovery_point: u64,
    closed: bool,
}

impl State {
    fn active(&self) -> &Segment {
        self.segments
            .values()
            .next_back()
            .expect("a partition always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .values_mut()
            .next_back()
            .expect("a partition always has an active segment")
    }

    fn local_start(&self) -> u64 {
        let first = self
            .segments
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next_offset);
        first.max(self.log_start)
    }

    fn size_bytes(&self) -> u64 {
        self.segments.values().map(Segment::size).sum()
    }
}

#[derive(Debug)]
struct SyncState {
    durable_end: u64,
    syncing: bool,
    /// Bumped by truncation, so an fsync that started before it cannot raise the durable end
    /// past the truncated log.
    generation: u64,
    failed: Option<PathBuf>,
}

/// The log of one partition. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct PartitionLog {
    topic: String,
    partition: u32,
    dir: PathBuf,
    config: RwLock<TopicConfig>,
    flush: FlushPolicy,
    max_batch_bytes: usize,
    index_interval_bytes: u32,
    preallocate_bytes: u64,
    disk: Arc<Disk>,
    state: Mutex<State>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    /// Mirror of the visible end for readers that do not take the sync lock.
    visible_end: AtomicU64,
    /// fsyncs of segment data issued so far, for metrics and for proving group commit.
    fsyncs: AtomicU64,
    /// What the next fsync must cover, kept apart from `state` so that starting an fsync
    /// never waits behind an appender copying a batch into the page cache.
    written: Mutex<Written>,
}

/// The active segment's file and the log end it holds.
#[derive(Debug, Clone)]
struct Written {
    file: Arc<std::fs::File>,
    base_offset: u64,
    end: u64,
}

impl PartitionLog {
    /// Opens (creating if needed) the partition in `dir`, recovering it when the data
    /// directory was not shut down cleanly.
    pub(crate) fn open(
        topic: &str,
        partition: u32,
        dir: &Path,
        config: TopicConfig,
        options: &OpenOptions,
    ) -> Result<(PartitionLog, RecoveryReport)> {
        fsutil::create_dir_durable(dir)?;
        let bases = list_segments(dir)?;
        let checkpointed = dir.join(CHECKPOINT_FILE).exists();
        let checkpoint = read_checkpoint(dir)?;
        let mut report = RecoveryReport::default();
        let recover_from = if options.clean {
            u64::MAX
        } else {
            // Scan from the segment holding the recovery point: everything after it may be
            // torn.
            bases
                .iter()
                .copied()
                .rfind(|&base| base <= checkpoint.recovery_point)
                .unwrap_or(0)
        };

        let mut segments = BTreeMap::new();
        let mut next_offset = checkpoint.log_start_offset;
        let mut cut = false;
        let last_base = bases.last().copied();
        for &base in &bases {
            if cut {
                // Everything after a truncation point is unacknowledged garbage.
                segment::delete_files(dir, base)?;
                report.segments_removed += 1;
                continue;
            }
            if let Some(last) = segments.values().next_back() {
                let last: &Segment = last;
                if base < last.next_offset() {
                    return Err(LogError::corrupt(
                        dir.join(segment::file_name(base, segment::LOG_SUFFIX)),
                        format!(
                            "segment overlaps the previous one ending at {}",
                            last.next_offset()
                        ),
                    ));
                }
            }
            let segment = if base < recover_from {
                Segment::open_trusted(dir, base, options.index_interval_bytes)?
            } else {
                let (segment, outcome) = Segment::recover(
                    dir,
                    base,
                    options.index_interval_bytes,
                    options.preallocate_bytes > 0,
                )?;
                report.segments_recovered += 1;
                // A zero tail is where the active (last) segment ends. Closed segments had
                // theirs cut off before the next segment was created, so zeros ending one of
                // them are lost data like any other bad batch.
                let mut truncated = outcome.truncated_bytes;
                if Some(base) != last_base {
                    truncated += outcome.zero_tail_bytes;
                }
                report.bytes_truncated += truncated;
                if truncated > 0 {
                    cut = true;
                }
                segment.sync()?;
                segment
            };
            next_offset = segment.next_offset();
            segments.insert(base, segment);
        }

        let mut log_start = checkpoint.log_start_offset;
        // A checkpointed start below the first segment means a cold tier holds the gap
        // (`delete_local_before`, retention with `archived_below`), so the start stays put
        // across a restart; only without a checkpoint does the first segment set it.
        if let Some(&first) = segments.keys().next().filter(|_| !checkpointed) {
            log_start = log_start.max(first);
        }
        if log_start > next_offset {
            // Only possible when a crash lost unflushed data above a persisted log start.
            tracing::warn!(
                topic,
                partition,
                log_start,
                next_offset,
                "log start beyond recovered end; starting empty"
            );
            for (_, segment) in std::mem::take(&mut segments) {
                report.segments_removed += 1;
                segment.delete()?;
            }
            next_offset = log_start;
        }
        if segments.is_empty() {
            let segment = Segment::create(dir, next_offset, options.index_interval_bytes)?;
            segments.insert(next_offset, segment);
        }
        // Recovered closed segments get index files now, so they can be trusted next time.
        let active_base = *segments.keys().next_back().expect("just ensured");
        if !options.clean {
            for segment in segments.values().filter(|s| s.base_offset >= recover_from) {
                if segment.base_offset != active_base {
                    segment.persist_indexes()?;
                }
            }
        }
        let recovery_point = if options.clean {
            checkpoint.recovery_point.min(next_offset)
        } else {
            active_base
        };
        let state = State {
            segments,
            log_start,
            next_offset,
            recovery_point,
            closed: false,
        };
        write_checkpoint(dir, &state)?;
        options.disk.add_used(state.size_bytes());
        let log = PartitionLog {
            topic: topic.to_string(),
            partition,
            dir: dir.to_path_buf(),
            config: RwLock::new(config),
            flush: options.flush,
            max_batch_bytes: options.max_batch_bytes,
            index_interval_bytes: options.index_interval_bytes,
            preallocate_bytes: options.preallocate_bytes,
            disk: options.disk.clone(),
            visible_end: AtomicU64::new(next_offset),
            fsyncs: AtomicU64::new(0),
            written: Mutex::new(Written {
                file: state.active().file().clone(),
                base_offset: state.active().base_offset,
                end: next_offset,
            }),
            sync: Mutex::new(SyncState {
                durable_end: next_offset,
                syncing: false,
                generation: 0,
                failed: None,
            }),
            synced: Condvar::new(),
            state: Mutex::new(state),
        };
        // A full disk must not keep the log from opening: without a tail, appends extend the
        // file as they would with preallocation off.
        if let Err(error) = log.extend_preallocation() {
            tracing::warn!(topic, partition, %error, "cannot preallocate the active segment's tail");
        }
        Ok((log, report))
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Largest batch an append accepts (`log.max_batch_bytes`): readers of this log, such as
    /// offload, must accept batches this large.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> TopicConfig {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_config(&self, config: TopicConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    /// Appends whole batches, assigning offsets; returns once they are durable under the
    /// durable flush policy.
    pub fn append(&self, batches: &mut [u8]) -> Result<AppendInfo> {
        self.append_with(batches, AppendOptions::default())
    }

    /// Appends whole batches (one or more, concatenated), validating each header and CRC.
    /// Under [`FlushPolicy::Durable`] it returns only once the bytes are fsync'd.
    pub fn append_with(&self, batches: &mut [u8], options: AppendOptions) -> Result<AppendInfo> {
        let info = self.append_unsynced(batches, options)?;
        if matches!(self.flush, FlushPolicy::Durable) {
            self.wait_durable(info.last_offset + 1)?;
            // The append is durable whatever happens to the zeros; a failed fsync of them
            // poisons the partition for the next append.
            if let Err(error) = self.extend_preallocation() {
                tracing::warn!(topic = %self.topic, partition = self.partition, %error, "cannot extend the preallocated tail");
            }
        }
        Ok(info)
    }

    /// Appends like [`PartitionLog::append_with`] but returns once the bytes are written (to
    /// the page cache), without waiting for an fsync, so that a caller can write its next
    /// batch while this one is being synced. Under [`FlushPolicy::Durable`] readers still see
    /// the records only once they are durable, and nothing may be acknowledged before
    /// [`PartitionLog::sync_through`] returns for them.
    pub fn append_unsynced(
        &self,
        batches: &mut [u8],
        options: AppendOptions,
    ) -> Result<AppendInfo> {
        let headers = self.validate(batches, options.crc_computed)?;
        self.disk.admit(batches.len() as u64)?;
        let config = self.config();
        let now = now_ms();
        let info = {
            let mut state = self.lock_state()?;
            let base_offset = match options.offsets {
                OffsetAssignment::Assign => state.next_offset,
                OffsetAssignment::Keep => {
                    let first = headers[0].0.base_offset as u64;
                    if headers[0].0.base_offset < 0 || first != state.next_offset {
                        return Err(LogError::OffsetOrder {
                            base_offset: headers[0].0.base_offset.max(0) as u64,
                            log_end: state.next_offset,
                        });
                    }
                    first
                }
            };
            let mut headers = headers;
            let mut next = base_offset;
            let mut at = 0;
            for (header, len) in headers.iter_mut() {
                let bytes = &mut batches[at..at + *len];
                if options.offsets == OffsetAssignment::Assign {
                    batch::set_base_offset(bytes, next as i64);
                    header.base_offset = next as i64;
                } else if header.base_offset as u64 != next {
                    return Err(LogError::OffsetOrder {
                        base_offset: header.base_offset as u64,
                        log_end: next,
                    });
                }
                if let Some(epoch) = options.leader_epoch {
                    batch::set_partition_leader_epoch(bytes, epoch);
                    header.partition_leader_epoch = epoch;
                }
                next = header.last_offset() as u64 + 1;
                at += *len;
            }
            let last_offset = next - 1;
            self.maybe_roll(&mut state, &config, batches.len() as u64, last_offset, now)?;
            state.active_mut().append(batches, &headers, now)?;
            state.next_offset = next;
            self.note_written(&state);
            self.disk.add_used(batches.len() as u64);
            if !matches!(self.flush, FlushPolicy::Durable) {
                self.visible_end.store(next, Ordering::Release);
            }
            AppendInfo {
                base_offset,
                last_offset,
                batch_count: headers.len(),
                append_time_ms: now,
            }
        };
        Ok(info)
    }

    /// Returns once every offset below `end` is fsync'd, running the fsync itself or sharing
    /// one in flight (group commit), whatever the flush policy. Fails like a durable append
    /// (`FsyncFailed`, or `Truncated` when a truncation removed offsets below `end` first).
    pub fn sync_through(&self, end: u64) -> Result<()> {
        self.wait_durable(end)
    }

    /// Tops up the active segment's zero tail when it is shorter than `preallocate_bytes`
    /// (a no-op when preallocation is off or the tail is long enough). The zeros never run
    /// past `segment.bytes` and are skipped, not refused, when the filesystem reserve would
    /// be reached: the appends themselves report a full disk. Callers on a latency-bound path
    /// call it after acknowledging, so only the next fsync may wait for it. Fails like an
    /// fsync (`FsyncFailed`) when the zeros cannot be made durable.
    pub fn extend_preallocation(&self) -> Result<()> {
        if self.preallocate_bytes == 0 {
            return Ok(());
        }
        let segment_bytes = self.config().segment_bytes;
        let (file, path) = {
            let mut state = self.lock_state()?;
            let active = state.active_mut();
            if active.zero_tail_bytes() >= self.preallocate_bytes {
                return Ok(());
            }
            let start = active.size() + active.zero_tail_bytes();
            let target = (start + self.preallocate_bytes).min(segment_bytes.max(active.size()));
            if target <= start {
                return Ok(());
            }
            if self.disk.check_filesystem(target - start).is_err() {
                tracing::debug!(
                    topic = %self.topic,
                    partition = self.partition,
                    "skipping preallocation: the filesystem reserve is reached"
                );
                return Ok(());
            }
            active.extend_zero_tail(target)?;
            (active.file().clone(), active.log_path())
        };
        if let Err(error) = file.sync_data() {
            tracing::error!(path = %path.display(), %error, "fsync of preallocated zeros failed");
            self.poison(path.clone());
            return Err(LogError::FsyncFailed { path });
        }
        Ok(())
    }

    /// Bytes of zeros preallocated past the active segment's logical end (not part of
    /// [`PartitionLog::size_bytes`]).
    pub fn preallocated_bytes(&self) -> u64 {
        self.lock_state_unchecked().active().zero_tail_bytes()
    }

    /// Checks that `batches` is a run of whole, valid batches within the size limit, their
    /// CRCs included unless `crc_computed`.
    fn validate(&self, batches: &[u8], crc_computed: bool) -> Result<Vec<(BatchHeader, usize)>> {
        let check = if crc_computed {
            batch::check_batch_framing
        } else {
            batch::check_batch
        };
        if batches.is_empty() {
            return Err(batch::BatchError::InvalidInput("no batches to append").into());
        }
        let mut headers = Vec::new();
        let mut at = 0;
        while at < batches.len() {
            match check(&batches[at..], self.max_batch_bytes)? {
                Some((header, len)) => {
                    headers.push((header, len));
                    at += len;
                }
                None => {
                    return Err(batch::BatchError::Corrupt("partial batch at end of input").into());
                }
            }
        }
        Ok(headers)
    }

    /// Rolls the active segment when the next append would overflow it, it is too old, or its
    /// relative offsets would overflow.
    fn maybe_roll(
        &self,
        state: &mut State,
        config: &TopicConfig,
        incoming_bytes: u64,
        last_offset: u64,
        now: i64,
    ) -> Result<()> {
        let active = state.active();
        if active.is_empty() {
            return Ok(());
        }
        let too_big = active.size() + incoming_bytes > config.segment_bytes;
        let too_old = active
            .first_append_ms()
            .is_some_and(|first| now.saturating_sub(first) >= config.segment_ms as i64);
        let offsets_overflow = last_offset - active.base_offset > u64::from(u32::MAX);
        if too_big || too_old || offsets_overflow {
            self.roll(state)?;
        }
        Ok(())
    }

    /// Closes the active segment (fsync'd, indexes written) and starts a new one at the log
    /// end. Everything before the new segment is durable afterwards.
    fn roll(&self, state: &mut State) -> Result<()> {
        // The tail goes first and durably: once the next segment exists, this one is closed,
        // and recovery would call a zero tail on a closed segment lost data.
        if let Err(error) = state.active_mut().trim_zero_tail() {
            self.poison(state.active().log_path());
            return Err(error);
        }
        let active = state.active();
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = active.sync() {
            self.poison(active.log_path());
            return Err(error);
        }
        active.persist_indexes()?;
        let base = state.next_offset;
        let segment = Segment::create(&self.dir, base, self.index_interval_bytes)?;
        state.segments.insert(base, segment);
        self.note_written(state);
        state.recovery_point = base;
        write_checkpoint(&self.dir, state)?;
        self.mark_durable(base);
        tracing::debug!(topic = %self.topic, partition = self.partition, base, "rolled segment");
        Ok(())
    }

    /// Publishes the active segment and log end to the next fsync; called with `state` held
    /// after every change to either.
    fn note_written(&self, state: &State) {
        let active = state.active();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.base_offset != active.base_offset {
            written.file = active.file().clone();
            written.base_offset = active.base_offset;
        }
        written.end = state.next_offset;
    }

    fn mark_durable(&self, end: u64) {
        let mut sync = self.lock_sync();
        if end > sync.durable_end {
            sync.durable_end = end;
            self.visible_end.fetch_max(end, Ordering::AcqRel);
            self.synced.notify_all();
        }
    }

    fn poison(&self, path: PathBuf) {
        tracing::error!(path = %path.display(), "fsync failed; partition refuses writes until reopened");
        let mut sync = self.lock_sync();
        sync.failed = Some(path);
        self.synced.notify_all();
    }

    /// Blocks until everything below `end` is fsync'd, running the fsync itself when no other
    /// appender is. After a truncation below `end`, what remains is durable and the rest can
    /// never be: that is [`LogError::Truncated`], so an append never acknowledges records a
    /// truncation removed.
    fn wait_durable(&self, end: u64) -> Result<()> {
        let mut sync = self.lock_sync();
        loop {
            if let Some(path) = &sync.failed {
                return Err(LogError::FsyncFailed { path: path.clone() });
            }
            if sync.durable_end >= end {
                return Ok(());
            }
            if sync.syncing {
                sync = self.synced.wait(sync).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            sync.syncing = true;
            let generation = sync.generation;
            drop(sync);
            let Written {
                file,
                base_offset,
                end: covered_end,
            } = self
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let path = self
                .dir
                .join(segment::file_name(base_offset, segment::LOG_SUFFIX));
            let result = file.sync_data();
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            sync = self.lock_sync();
            sync.syncing = false;
            let mut truncated_below_end = None;
            match result {
                Ok(()) if sync.generation == generation => {
                    if covered_end > sync.durable_end {
                        sync.durable_end = covered_end;
                        self.visible_end.fetch_max(covered_end, Ordering::AcqRel);
                    }
                    // The log end only falls by truncation. What remains below `end` is now
                    // durable and the rest is gone: no fsync can ever reach `end`, so waiting
                    // for it would loop on fsyncs forever.
                    if covered_end < end {
                        truncated_below_end = Some(covered_end);
                    }
                }
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "fsync failed; partition refuses writes until reopened");
                    sync.failed = Some(path);
                }
            }
            self.synced.notify_all();
            if let Some(log_end) = truncated_below_end {
                return Err(LogError::Truncated { end, log_end });
            }
        }
    }

    /// Makes everything appended so far durable. Appends under the durable policy already are;
    /// the relaxed policy's flusher calls this.
    pub fn flush(&self) -> Result<()> {
        let end = self.lock_state_unchecked().next_offset;
        match self.wait_durable(end) {
            // A truncation since `end` was read leaves less to flush, all of it durable.
            Ok(()) | Err(LogError::Truncated { .. }) => {}
            Err(error) => return Err(error),
        }
        self.visible_end.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// Blocks until the high watermark passes `offset` or `timeout` elapses, and returns the
    /// high watermark: lets a reader that follows the log (the uplink) sleep until new data
    /// is visible instead of polling.
    pub fn wait_for_high_watermark(&self, offset: u64, timeout: std::time::Duration) -> u64 {
        /// The relaxed policy publishes appends without the sync lock or a notification; a
        /// waiter then looks again at this interval.
        const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);
        let deadline = std::time::Instant::now() + timeout;
        let mut sync = self.lock_sync();
        loop {
            let high_watermark = self.high_watermark();
            let now = std::time::Instant::now();
            if high_watermark > offset || now >= deadline || sync.failed.is_some() {
                return high_watermark;
            }
            let wait = (deadline - now).min(RECHECK);
            sync = self
                .synced
                .wait_timeout(sync, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads whole batches starting with the one holding `offset`, up to `max_bytes` (at
    /// least one batch when any is visible, as Kafka does so that a large batch never blocks
    /// a consumer).
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadSlice> {
        let mut bytes = Vec::new();
        let info = self.read_into(offset, max_bytes, &mut bytes, 0)?;
        bytes.truncate(info.len);
        Ok(ReadSlice {
            bytes,
            log_start_offset: info.log_start_offset,
            high_watermark: info.high_watermark,
            log_end_offset: info.log_end_offset,
        })
    }

    /// Reads like [`PartitionLog::read`], but into the caller's buffer: the batches land in
    /// `buf[at..at + len]` (`len` in the result). `buf` grows (zero-filled) only when it is
    /// too short and never shrinks, so a caller that keeps it across reads copies the bytes
    /// once, from the page cache into `buf`, with no zeroing or page faults (the Kafka
    /// gateway's Fetch path). Bytes of `buf` past `at + len` are left as they were.
    pub fn read_into(
        &self,
        offset: u64,
        max_bytes: usize,
        buf: &mut Vec<u8>,
        at: usize,
    ) -> Result<ReadInto> {
        let high_watermark = self.high_watermark();
        let (candidates, log_start, log_end) = {
            let state = self.lock_state_unchecked();
            let local_start = state.local_start();
            check_readable(offset, state.log_start, local_start, state.next_offset)?;
            let first = state
                .segments
                .range(..=offset)
                .next_back()
                .map_or(local_start, |(base, _)| *base);
            let candidates: Vec<_> = state
                .segments
                .range(first..)
                .take(2)
                .map(|(_, segment)| {
                    (
                        segment.file().clone(),
                        segment.log_path(),
                        segment.scan_start_for_offset(offset),
                        segment.size(),
                    )
                })
                .collect();
            (candidates, state.log_start, state.next_offset)
        };
        let mut read = ReadInto {
            len: 0,
            log_start_offset: log_start,
            high_watermark,
            log_end_offset: log_end,
        };
        if offset >= high_watermark {
            return Ok(read);
        }
        for (index, (file, path, scan_start, size)) in candidates.into_iter().enumerate() {
            let start = if index == 0 { scan_start } else { 0 };
            let Some((position, header)) = segment::find_batch(&file, &path, start, size, offset)?
            else {
                continue;
            };
            if header.base_offset as u64 >= high_watermark {
                return Ok(read);
            }
            let first_len = header.total_len() as u64;
            let want = (max_bytes as u64)
                .min(READ_BYTES_MAX)
                .max(first_len)
                .min(size - position) as usize;
            if buf.len() < at + want {
                buf.resize(at + want, 0);
            }
            let bytes = &mut buf[at..at + want];
            std::os::unix::fs::FileExt::read_exact_at(&*file, bytes, position)
                .map_err(LogError::io(&path))?;
            read.len = whole_batches_below(bytes, high_watermark);
            return Ok(read);
        }
        Ok(read)
    }

    /// Checks `offset` as [`PartitionLog::read_into`] does, without reading a byte: the
    /// same error for an offset it could not read. For a Fetch whose byte budget is spent,
    /// which answers such a partition with its offsets and no records.
    pub fn check_readable(&self, offset: u64) -> Result<()> {
        let state = self.lock_state_unchecked();
        check_readable(
            offset,
            state.log_start,
            state.local_start(),
            state.next_offset,
        )
    }

    /// The offset of the first visible record at or above `from_offset` that `matches`
    /// accepts, reading forward batch by batch (at most [`FIND_READ_BYTES`] at a time); `None`
    /// when no record up to the high watermark does. A `from_offset` below the local start
    /// scans from the local start; one at or past the end finds nothing. Meant for short
    /// scans of a log's tail (a broker checking after a crash whether a record made it),
    /// not for consumers.
    pub fn find_record(
        &self,
        from_offset: u64,
        mut matches: impl FnMut(&batch::DecodedRecord) -> bool,
    ) -> Result<Option<u64>> {
        let limits = DecodeLimits {
            max_batch_bytes: usize::MAX,
            ..DecodeLimits::default()
        };
        let mut offset = from_offset.max(self.local_start_offset());
        while offset < self.high_watermark() {
            let slice = match self.read(offset, FIND_READ_BYTES) {
                Ok(slice) => slice,
                // Retention moved the start past `offset` meanwhile: go on from there.
                Err(LogError::OffsetOutOfRange { log_start, .. }) if offset < log_start => {
                    offset = log_start;
                    continue;
                }
                Err(LogError::NotLocal { local_start, .. }) if offset < local_start => {
                    offset = local_start;
                    continue;
                }
                Err(error) => return Err(error),
            };
            if slice.bytes.is_empty() {
                break;
            }
            let mut rest = &slice.bytes[..];
            let mut next = offset;
            while let Some((header, records, len)) = batch::decode_batch(rest, &limits)? {
                for record in &records {
                    if record.offset >= 0 && record.offset as u64 >= offset && matches(record) {
                        return Ok(Some(record.offset as u64));
                    }
                }
                next = next.max(header.last_offset() as u64 + 1);
                rest = &rest[len..];
            }
            if next == offset {
                break;
            }
            offset = next;
        }
        Ok(None)
    }

    /// The first offset whose record timestamp is at or after `timestamp`, with that
    /// timestamp; `None` when every visible record is older.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(u64, i64)>> {
        let high_watermark = self.high_watermark();
        let (candidates, log_start) = {
            let state = self.lock_state_unchecked();
            let candidates: Vec<_> = state
                .segments
                .values()
                .filter(|segment| segment.max_timestamp() >= timestamp)
                .map(|segment| {
                    (
                        segment.file().clone(),
                        segment.log_path(),
                        segment.scan_start_for_timestamp(timestamp),
                        segment.size(),
                    )
                })
                .collect();
            (candidates, state.log_start)
        };
        let limits = DecodeLimits {
            max_batch_bytes: usize::MAX,
            ..DecodeLimits::default()
        };
        for (file, path, mut position, size) in candidates {
            let mut header_bytes = [0u8; batch::BATCH_HEADER_LEN];
            while position + batch::BATCH_HEADER_LEN as u64 <= size {
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut header_bytes, position)
                    .map_err(LogError::io(&path))?;
                let header = BatchHeader::parse(&header_bytes)?
                    .ok_or_else(|| LogError::corrupt(&path, "partial batch header"))?;
                if header.base_offset as u64 >= high_watermark {
                    return Ok(None);
                }
                let len = header.total_len();
                if position + len as u64 > size {
                    return Err(LogError::corrupt(
                        &path,
                        "batch runs past the end of the segment",
                    ));
                }
                if header.max_timestamp >= timestamp && header.last_offset() as u64 >= log_start {
                    let mut bytes = vec![0u8; len];
                    std::os::unix::fs::FileExt::read_exact_at(&*file, &mut bytes, position)
                        .map_err(LogError::io(&path))?;
                    let records = match batch::decode_batch(&bytes, &limits)? {
                        Some((_, records, _)) => records,
                        None => return Err(LogError::corrupt(&path, "partial batch")),
                    };
                    let found = records.iter().find(|record| {
                        record.timestamp >= timestamp
                            && record.offset >= 0
                            && record.offset as u64 >= log_start
                            && (record.offset as u64) < high_watermark
                    });
                    if let Some(record) = found {
                        return Ok(Some((record.offset as u64, record.timestamp)));
                    }
                }
                position += len as u64;
            }
        }
        Ok(None)
    }

    /// Removes every record at or after `offset` (whole batches: one straddling `offset`
    /// goes entirely). Used by replication followers. Returns the new log end offset.
    pub fn truncate_to(&self, offset: u64) -> Result<u64> {
        let mut state = self.lock_state()?;
        if offset >= state.next_offset {
            return Ok(state.next_offset);
        }
        if offset < state.local_start() {
            return Err(LogError::OffsetOutOfRange {
                offset,
                log_start: state.local_start(),
                log_end: state.next_offset,
            });
        }
        // Lower the recovery point first: a crash mid-truncation then rescans.
        state.recovery_point = state.recovery_point.min(offset);
        write_checkpoint(&self.dir, &state)?;
        let doomed: Vec<u64> = state
            .segments
            .range(offset + 1..)
            .map(|(b, _)| *b)
            .collect();
        let mut freed = 0;
        for base in doomed {
            if state.segments.len() == 1 {
                break;
            }
            if let Some(segment) = state.segments.remove(&base) {
                freed += segment.size();
                segment.delete()?;
            }
        }
        let active = state.active_mut();
        let before = active.size();
        let new_end = active.truncate_to(offset)?;
        freed += before - active.size();
        state.next_offset = new_end;
        self.note_written(&state);
        // A batch straddling `offset` that began below the log start takes the end below the
        // start; the start follows it down (records below the new end stay hidden), or reads
        // at the start would fail and the next open would move the end up to the start.
        state.log_start = state.log_start.min(new_end);
        state.recovery_point = state.recovery_point.min(new_end);
        write_checkpoint(&self.dir, &state)?;
        self.disk.sub_used(freed);
        let mut sync = self.lock_sync();
        sync.generation += 1;
        sync.durable_end = sync.durable_end.min(new_end);
        self.visible_end
            .store(sync.durable_end.min(new_end), Ordering::Release);
        if !matches!(self.flush, FlushPolicy::Durable) {
            self.visible_end.store(new_end, Ordering::Release);
        }
        Ok(new_end)
    }

    /// Advances the log start offset to `offset` and deletes every segment wholly below it.
    /// The new start is persisted before any file is deleted.
    pub fn delete_before(&self, offset: u64) -> Result<DeleteReport> {
        let mut state = self.lock_state()?;
        if offset > state.next_offset {
            return Err(LogError::OffsetOutOfRange {
                offset,
                log_start: state.log_start,
                log_end: state.next_offset,
            });
        }
        if offset <= state.log_start {
            return Ok(DeleteReport::default());
        }
        state.log_start = offset;
        write_checkpoint(&self.dir, &state)?;
        self.delete_segments_below(&mut state, offset)
    }

    /// Deletes every closed segment wholly below `offset` without moving the log start: for
    /// data a cold tier now holds.
    pub fn delete_local_before(&self, offset: u64) -> Result<DeleteReport> {
        let mut state = self.lock_state()?;
        let bound = offset.min(state.next_offset);
        self.delete_segments_below(&mut state, bound)
    }

    fn delete_segments_below(&self, state: &mut State, offset: u64) -> Result<DeleteReport> {
        if state.active().next_offset() <= offset && !state.active().is_empty() {
            self.roll(state)?;
        }
        let mut report = DeleteReport::default();
        while state.segments.len() > 1 {
            let (&base, first) = state.segments.iter().next().expect("len > 1");
            if first.next_offset() > offset {
                break;
            }
            let segment = state.segments.remove(&base).expect("just seen");
            report.segments += 1;
            report.bytes += segment.size();
            report.offsets += segment.next_offset() - segment.base_offset;
            segment.delete()?;
        }
        self.disk.sub_used(report.bytes);
        Ok(report)
    }

    /// Applies time and size retention to closed segments (and rolls an active segment that
    /// has outlived `segment.ms`, so idle partitions age out too). With `archived_below`, the
    /// cold tier holds everything below that offset: local retention limits then apply to it
    /// and the log start stays put.
    pub fn enforce_retention(&self, now: i64, archived_below: Option<u64>) -> Result<DeleteReport> {
        let config = self.config();
        let mut state = self.lock_state()?;
        let active = state.active();
        if !active.is_empty()
            && active
                .first_append_ms()
                .is_some_and(|first| now.saturating_sub(first) >= config.segment_ms as i64)
        {
            self.roll(&mut state)?;
        }
        let closed: Vec<SegmentSummary> = {
            let count = state.segments.len() - 1;
            state
                .segments
                .values()
                .take(count)
                .map(|segment| SegmentSummary {
                    base_offset: segment.base_offset,
                    next_offset: segment.next_offset(),
                    size_bytes: segment.size(),
                    max_timestamp: segment.max_timestamp(),
                })
                .collect()
        };
        let total = state.size_bytes();
        let (limits, bound) = match archived_below {
            None => (
                RetentionLimits {
                    retention_ms: config.retention_ms,
                    retention_bytes: config.retention_bytes,
                },
                None,
            ),
            Some(bound) => (
                RetentionLimits {
                    retention_ms: config.effective_local_retention_ms(),
                    retention_bytes: config.effective_local_retention_bytes(),
                },
                Some(bound),
            ),
        };
        let count = retention::segments_to_delete(&closed, total, limits, now, bound);
        if count == 0 {
            return Ok(DeleteReport::default());
        }
        let new_start = closed[count - 1].next_offset;
        if archived_below.is_none() && new_start > state.log_start {
            state.log_start = new_start;
            write_checkpoint(&self.dir, &state)?;
        }
        self.delete_segments_below(&mut state, new_start)
    }

    /// The oldest closed segment's max timestamp, for the data directory's drop-oldest budget.
    pub(crate) fn oldest_closed_segment(&self) -> Option<i64> {
        let state = self.lock_state_unchecked();
        if state.segments.len() < 2 {
            return None;
        }
        state.segments.values().next().map(Segment::max_timestamp)
    }

    /// Deletes the oldest closed segment, advancing the log start past it.
    pub(crate) fn drop_oldest_segment(&self) -> Result<DeleteReport> {
        let mut state = self.lock_state()?;
        if state.segments.len() < 2 {
            return Ok(DeleteReport::default());
        }
        let first = state.segments.values().next().expect("len >= 2");
        let new_start = first.next_offset().max(state.log_start);
        state.log_start = new_start;
        write_checkpoint(&self.dir, &state)?;
        self.delete_segments_below(&mut state, new_start)
    }

    /// Flushes everything, writes the active segment's indexes and a checkpoint whose
    /// recovery point is the log end, then refuses further writes.
    pub(crate) fn close(&self) -> Result<()> {
        self.flush()?;
        let mut state = self.lock_state()?;
        // Before the checkpoint and the clean marker: a cleanly closed segment has no tail.
        state.active_mut().trim_zero_tail()?;
        state.active().persist_indexes()?;
        state.recovery_point = state.next_offset;
        write_checkpoint(&self.dir, &state)?;
        state.closed = true;
        Ok(())
    }

    /// First offset readers may ask for.
    pub fn log_start_offset(&self) -> u64 {
        self.lock_state_unchecked().log_start
    }

    /// First offset still on local disk; below it (and above the log start) data lives only
    /// in a cold tier.
    pub fn local_start_offset(&self) -> u64 {
        self.lock_state_unchecked().local_start()
    }

    /// One past the last appended offset.
    pub fn log_end_offset(&self) -> u64 {
        self.lock_state_unchecked().next_offset
    }

    /// One past the last offset readers may see.
    pub fn high_watermark(&self) -> u64 {
        self.visible_end.load(Ordering::Acquire)
    }

    /// Bytes of batches in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.lock_state_unchecked().size_bytes()
    }

    /// fsyncs of segment data this partition has issued since it was opened.
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    pub fn segment_count(&self) -> usize {
        self.lock_state_unchecked().segments.len()
    }

    /// The closed segments (every one but the active), oldest first: what a cold tier may
    /// archive. Their offsets are contiguous and each ends on a batch boundary.
    pub fn closed_segments(&self) -> Vec<crate::retention::SegmentSummary> {
        let state = self.lock_state_unchecked();
        let count = state.segments.len() - 1;
        state
            .segments
            .values()
            .take(count)
            .map(|segment| crate::retention::SegmentSummary {
                base_offset: segment.base_offset,
                next_offset: segment.next_offset(),
                size_bytes: segment.size(),
                max_timestamp: segment.max_timestamp(),
            })
            .collect()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_bases(&self) -> Vec<u64> {
        self.lock_state_unchecked()
            .segments
            .keys()
            .copied()
            .collect()
    }

    fn lock_state(&self) -> Result<MutexGuard<'_, State>> {
        let state = self.lock_state_unchecked();
        if state.closed {
            return Err(LogError::Closed);
        }
        if let Some(path) = &self.lock_sync().failed {
            return Err(LogError::FsyncFailed { path: path.clone() });
        }
        Ok(state)
    }

    fn lock_state_unchecked(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug elsewhere; the state itself stays
        // consistent because every mutation is completed before the guard drops.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_sync(&self) -> MutexGuard<'_, SyncState> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Length of the prefix of `bytes` made of whole batches that end below `end`.
fn whole_batches_below(bytes: &[u8], end: u64) -> usize {
    let mut at = 0;
    while let Ok(Some(header)) = BatchHeader::parse(&bytes[at..]) {
        let len = header.total_len();
        if at + len > bytes.len() || header.last_offset() < 0 || header.last_offset() as u64 >= end
        {
            break;
        }
        at += len;
    }
    at
}

/// Base offsets of the segments in `dir`, after removing leftovers of interrupted work.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    let mut index_files = Vec::new();
    for entry in fs::read_dir(dir).map_err(LogError::io(dir))? {
        let entry = entry.map_err(LogError::io(dir))?;
        let name = entry.file_name();
        let path = entry.path();
        let Some(name) = name.to_str() else {
            return Err(LogError::ForeignFile { path });
        };
        if name.ends_with(fsutil::TMP_SUFFIX) {
            fsutil::remove_file_durable(&path)?;
            continue;
        }
        if name == CHECKPOINT_FILE {
            continue;
        }
        match segment::parse_file_name(name) {
            Some((base, segment::LOG_SUFFIX)) => bases.push(base),
            Some((base, _)) => index_files.push((base, path)),
            None => return Err(LogError::ForeignFile { path }),
        }
    }
    bases.sort_unstable();
    // Index files whose segment is gone are leftovers of an interrupted delete.
    for (base, path) in index_files {
        if bases.binary_search(&base).is_err() {
            fsutil::remove_file_durable(&path)?;
        }
    }
    Ok(bases)
}

fn read_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Checkpoint {
                version: CHECKPOINT_VERSION,
                recovery_point: 0,
                log_start_offset: 0,
            });
        }
        Err(error) => return Err(LogError::io(path)(error)),
    };
    let checkpoint: Checkpoint = serde_json::from_slice(&bytes).map_err(|error| {
        LogError::corrupt(
            &path,
            format!("{error}; delete it to recover the partition from its first segment"),
        )
    })?;
    if checkpoint.version != CHECKPOINT_VERSION {
        return Err(LogError::corrupt(
            &path,
            format!("unsupported checkpoint version {}", checkpoint.version),
        ));
    }
    Ok(checkpoint)
}

fn write_checkpoint(dir: &Path, state: &State) -> Result<()> {
    let checkpoint = Checkpoint {
        version: CHECKPOINT_VERSION,
        recovery_point: state.recovery_point,
        log_start_offset: state.log_start,
    };
    let bytes = serde_json::to_vec(&checkpoint).expect("a checkpoint always serializes");
    fsutil::write_atomic(&dir.join(CHECKPOINT_FILE), &bytes)
}

#[cfg(test)]
mod read_into_tests {
    use bytes::{Bytes, BytesMut};

    use crate::batch::{self, BatchSpec, Record};
    use crate::{LogConfig, LogManager, TopicConfig};

    fn batch_of(tag: &str, count: usize) -> BytesMut {
        let records: Vec<Record> = (0..count)
            .map(|i| Record {
                timestamp: 1_000 + i as i64,
                key: None,
                value: Some(Bytes::from(format!("{tag}-{i}"))),
                headers: Vec::new(),
            })
            .collect();
        let mut out = BytesMut::new();
        batch::encode_batch(&BatchSpec::default(), &records, &mut out).unwrap();
        out
    }

    /// `read_into` serves exactly what `read` does (across segment boundaries, byte limits
    /// and the end of the log), at any position of a reused buffer full of older bytes,
    /// and leaves the buffer's other bytes alone.
    #[test]
    fn read_into_matches_read_in_a_reused_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = LogConfig::new(dir.path());
        config.index_interval_bytes = 256;
        config.fs_reserve_bytes = 0;
        config.topic_defaults = TopicConfig::default()
            .with_overrides(
                [("segment.bytes".to_string(), "1024".to_string())]
                    .iter()
                    .map(|(key, value)| (key, value)),
            )
            .unwrap();
        let manager = LogManager::open(config).unwrap();
        manager.ensure_topic("t", 1).unwrap();
        let log = manager.partition("t", 0).unwrap();
        for round in 0..60 {
            log.append(&mut batch_of(&format!("r{round}"), 1 + round % 4))
                .unwrap();
        }
        assert!(log.segment_count() > 2, "the reads cross segments");
        let end = log.log_end_offset();
        let mut reused = vec![0xA5u8; 10];
        for offset in 0..=end + 1 {
            for max_bytes in [0, 1, 100, 700, 5000, 1 << 20] {
                let at = (offset as usize * 7) % 13;
                if reused.len() < at {
                    reused.resize(at, 0);
                }
                reused[..at].fill(0x5A);
                let before = reused.len();
                let expected = log.read(offset, max_bytes);
                let got = log.read_into(offset, max_bytes, &mut reused, at);
                match (expected, got) {
                    (Ok(slice), Ok(info)) => {
                        assert_eq!(&reused[at..at + info.len], &slice.bytes[..]);
                        assert!(reused[..at].iter().all(|byte| *byte == 0x5A));
                        assert_eq!(
                            (
                                info.log_start_offset,
                                info.high_watermark,
                                info.log_end_offset
                            ),
                            (
                                slice.log_start_offset,
                                slice.high_watermark,
                                slice.log_end_offset
                            )
                        );
                        assert!(reused.len() >= before, "the buffer never shrinks");
                    }
                    (Err(expected), Err(got)) => {
                        assert_eq!(expected.to_string(), got.to_string());
                    }
                    (expected, got) => panic!(
                        "read({offset}, {max_bytes}) gave {:?}, read_into {:?}",
                        expected.map(|slice| slice.bytes.len()),
                        got
                    ),
                }
            }
        }
    }
}
