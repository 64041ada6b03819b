//! `LogIngest`: the local log behind the MQTT broker's [`IngestPort`], with group commit.
//!
//! Each (log topic, partition) has a queue and one writer thread. A writer takes every request
//! waiting in its queue, up to a batch's byte and record limits, encodes them as one Kafka
//! RecordBatch v2 (zstd-compressed from [`COMPRESS_MIN_BYTES`] on, `log.compression`), appends it with [`PartitionLog::append`] (which under the durable flush
//! policy returns only once the bytes are fsync'd) and then completes every request's receipt.
//! While one append and its fsync are under way, new requests pile up in the queue and go out
//! together in the next batch: many publishers share one fsync (group commit), and the batch
//! grows by itself exactly when the disk is the bottleneck, with no timer and no added latency
//! when it is not.
//!
//! Under the durable flush policy each writer has a sync thread: the writer appends a batch
//! without waiting for its fsync ([`PartitionLog::append_unsynced`]) and hands it over; the
//! sync thread waits until the batch is durable ([`PartitionLog::sync_through`], one fsync
//! covering everything written before it started) and only then completes its receipts.
//! Meanwhile the writer takes and writes the next batch, so the write and the wake-ups of one
//! batch overlap the fsync of the one before instead of adding to it. Nothing is acknowledged
//! before the fsync that covers it.
//!
//! One writer per partition keeps the log's order equal to the queue's, so records of one key
//! (one partition) land in the order they were submitted. Different partitions append and
//! fsync in parallel.
//!
//! Memory is bounded by one byte budget shared by every queue ([`IngestConfig::queue_bytes_max`]):
//! a request holds its share from `submit` until its batch is durable (or refused), and
//! `submit` waits while the budget is spent. That wait is how a publisher faster than the disk
//! is slowed down: its connection stops reading.
//!
//! A refused append (budget full, filesystem reserve reached, IO error) fails every request of
//! its batch and the writer goes on with the next: ingest resumes by itself once space is
//! freed. Log topics are created on first use, with [`IngestConfig::default_partitions`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::BytesMut;
use metrics::{counter, histogram};
use silt_gateways::mqtt::server::{
    BoxFuture, IngestError, IngestPort, IngestReceipt, IngestRequest, LogPosition,
};
use silt_log::batch::{BATCH_HEADER_LEN, BatchSpec, Record, VARINT_BYTES_MAX, VARLONG_BYTES_MAX};
use silt_log::{AppendOptions, FlushPolicy, LogError, LogManager, PartitionLog};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::telemetry;

/// How the ingest path is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IngestConfig {
    /// Partitions of a log topic created on first use (`mqtt.default_partitions`).
    pub(crate) default_partitions: u32,
    /// Most bytes of records queued or being written, all partitions together
    /// (`mqtt.ingest_queue_bytes`). At least `batch_bytes_max`, so any record that fits a
    /// batch also fits the queue.
    pub(crate) queue_bytes_max: usize,
    /// Largest batch, header included: the log's `max_batch_bytes`, which it refuses beyond.
    pub(crate) batch_bytes_max: usize,
    /// Most records in one batch.
    pub(crate) batch_records_max: usize,
    /// The zstd level batches of at least [`COMPRESS_MIN_BYTES`] are compressed at
    /// (`log.compression`); `None` stores every batch uncompressed.
    pub(crate) zstd_level: Option<i32>,
}

/// Default [`IngestConfig::batch_records_max`]: enough to fill a default-sized batch with
/// small sensor readings, few enough that completing one batch's receipts stays short.
pub(crate) const BATCH_RECORDS_MAX_DEFAULT: usize = 8_192;

/// Smallest batch (its records' estimated bytes) compressed at rest. zstd over 8 KiB of
/// sensor JSON gets 2.16x, against 2.34x over the uplink's 1 MiB frames; over 2 KiB, 1.90x
/// (`zstd -b1 -B<size>` on the uplink benchmark's payloads). Smaller batches, which a light
/// load writes, stay uncompressed on disk, and the uplink compresses them in whole frames.
pub(crate) const COMPRESS_MIN_BYTES: usize = 8 << 10;

/// Batches a writer may have written and handed to its sync thread, not yet durable, before
/// it waits: enough to keep one batch writing while one syncs.
const SYNC_AHEAD_BATCHES: usize = 2;

/// Labels of `silt_ingest_rejected_total`.
const REASON_QUOTA: &str = "quota_exceeded";
const REASON_SHUTDOWN: &str = "shutting_down";
const REASON_FAILED: &str = "failed";

/// The log-backed [`IngestPort`]. Call [`LogIngest::shutdown`] before closing the log.
#[derive(Debug)]
pub(crate) struct LogIngest {
    log: Arc<LogManager>,
    config: IngestConfig,
    /// Bytes that may still be queued; requests hold permits until they complete.
    space: Arc<Semaphore>,
    routes: Mutex<Routes>,
}

/// Which topics and partitions the ingest path knows, and their writers.
#[derive(Debug, Default)]
struct Routes {
    closed: bool,
    /// Partition count of each log topic seen so far. Log topics come from the configured
    /// routes only, so this stays as small as the route table.
    partitions: HashMap<Arc<str>, u32>,
    queues: HashMap<(Arc<str>, u32), Arc<PartitionQueue>>,
    writers: Vec<JoinHandle<()>>,
}

/// Records of one submission for one partition, waiting for their batch. A submission that
/// spans partitions (or more than a batch) becomes several, sharing one [`Completion`].
#[derive(Debug)]
struct Pending {
    records: Vec<Record>,
    /// Upper bound of the records' encoded size ([`record_bytes_max`]).
    bytes: usize,
    completion: Arc<Completion>,
}

/// The receipt of one submission: answered when its last part is appended.
#[derive(Debug)]
struct Completion {
    parts_left: std::sync::atomic::AtomicUsize,
    state: Mutex<CompletionState>,
    submitted: Instant,
}

#[derive(Debug)]
struct CompletionState {
    /// The first refusal of any part.
    failed: Option<IngestError>,
    done: Option<oneshot::Sender<Result<(), IngestError>>>,
    /// The submission's share of the queue budget, given back when it completes.
    _space: Option<OwnedSemaphorePermit>,
}

impl Completion {
    /// One part is appended (or refused); the last one answers the receipt.
    fn part_done(&self, result: &Result<(), IngestError>) {
        use std::sync::atomic::Ordering;
        if let Err(error) = result {
            let mut state = lock(&self.state);
            if state.failed.is_none() {
                state.failed = Some(error.clone());
            }
        }
        if self.parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut state = lock(&self.state);
            let outcome = match state.failed.take() {
                Some(error) => Err(error),
                None => {
                    histogram!(telemetry::APPEND_LATENCY_SECONDS)
                        .record(self.submitted.elapsed().as_secs_f64());
                    Ok(())
                }
            };
            if let Some(done) = state.done.take() {
                // A receiver that is gone (its connection closed) needs no answer.
                let _ = done.send(outcome);
            }
            state._space = None;
        }
    }
}

/// The queue of one partition, shared by submitters and its writer.
#[derive(Debug, Default)]
struct PartitionQueue {
    state: Mutex<QueueState>,
    /// Signalled when a request arrives or the queue closes.
    ready: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    pending: VecDeque<Pending>,
    /// No new requests; the writer drains what is queued and exits.
    closed: bool,
    /// The writer is blocked on `ready`. A push wakes it only then: a condvar signal is a
    /// system call even with no one waiting, and most pushes land while the writer is busy
    /// writing or fsyncing the previous batch.
    writer_waiting: bool,
}

impl LogIngest {
    /// An ingest path over `log`; writers start with the first request for each partition.
    pub(crate) fn new(log: Arc<LogManager>, config: IngestConfig) -> LogIngest {
        assert!(config.default_partitions > 0, "validated by the config");
        assert!(
            config.queue_bytes_max >= config.batch_bytes_max,
            "validated by the config"
        );
        let permits = config.queue_bytes_max.min(Semaphore::MAX_PERMITS);
        LogIngest {
            log,
            config,
            space: Arc::new(Semaphore::new(permits)),
            routes: Mutex::new(Routes::default()),
        }
    }

    /// Stops taking requests, lets every writer finish what is queued, and waits for them.
    /// Requests waiting for queue space fail with [`IngestError::ShuttingDown`]. Idempotent.
    /// The log stays open: the caller closes it afterwards.
    pub(crate) async fn shutdown(&self) {
        let writers = self.close();
        let joined = tokio::task::spawn_blocking(move || {
            for writer in writers {
                if writer.join().is_err() {
                    tracing::error!("an ingest writer panicked");
                }
            }
        })
        .await;
        if let Err(error) = joined {
            tracing::error!(%error, "waiting for the ingest writers failed");
        }
    }

    /// Closes every queue and returns the writers to wait for.
    fn close(&self) -> Vec<JoinHandle<()>> {
        let (queues, writers) = {
            let mut routes = lock(&self.routes);
            routes.closed = true;
            let queues: Vec<_> = routes.queues.values().cloned().collect();
            (queues, std::mem::take(&mut routes.writers))
        };
        self.space.close();
        for queue in queues {
            queue.close();
        }
        writers
    }

    async fn enqueue(
        &self,
        requests: Vec<IngestRequest>,
        submitted: Instant,
    ) -> Result<IngestReceipt, IngestError> {
        // Group by partition, keeping the order within each, and split groups at a batch.
        let mut parts: Vec<(Arc<PartitionQueue>, Vec<Record>, usize)> = Vec::new();
        let mut total_bytes = 0usize;
        let mut last: Option<(Arc<str>, u32)> = None;
        let mut last_partitions = 0;
        for request in requests {
            let bytes = record_bytes_max(&request.record);
            if BATCH_HEADER_LEN.saturating_add(bytes) > self.config.batch_bytes_max {
                return Err(IngestError::Failed(format!(
                    "a record of up to {bytes} bytes does not fit a batch of log.max_batch_bytes = {}",
                    self.config.batch_bytes_max
                )));
            }
            let partitions = match &last {
                Some((topic, _)) if *topic == request.log_topic => last_partitions,
                _ => self.partitions_of(&request.log_topic).await?,
            };
            last_partitions = partitions;
            let partition = silt_log::partitioner::partition_for_key(&request.key, partitions);
            let same =
                matches!(&last, Some((topic, p)) if *topic == request.log_topic && *p == partition);
            let fits = parts.last().is_some_and(|(_, records, part_bytes)| {
                records.len() < self.config.batch_records_max
                    && BATCH_HEADER_LEN + part_bytes + bytes <= self.config.batch_bytes_max
            });
            if same && fits {
                if let Some((_, records, part_bytes)) = parts.last_mut() {
                    records.push(request.record);
                    *part_bytes += bytes;
                }
            } else {
                let queue = self.queue(&request.log_topic, partition)?;
                parts.push((queue, vec![request.record], bytes));
            }
            total_bytes = total_bytes.saturating_add(bytes);
            last = Some((request.log_topic, partition));
        }
        let (done, receipt) = oneshot::channel();
        if parts.is_empty() {
            let _ = done.send(Ok(()));
            return Ok(receipt);
        }
        // Fits u32: the config caps the queue at u32::MAX bytes.
        let cost = u32::try_from(total_bytes.min(self.config.queue_bytes_max)).unwrap_or(u32::MAX);
        let space = self
            .space
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|_| IngestError::ShuttingDown)?;
        let completion = Arc::new(Completion {
            parts_left: std::sync::atomic::AtomicUsize::new(parts.len()),
            state: Mutex::new(CompletionState {
                failed: None,
                done: Some(done),
                _space: Some(space),
            }),
            submitted,
        });
        for (queue, records, bytes) in parts {
            let pending = Pending {
                records,
                bytes,
                completion: completion.clone(),
            };
            if let Err(error) = queue.push(pending) {
                completion.part_done(&Err(error));
            }
        }
        Ok(receipt)
    }

    /// The partition count of `topic`, creating the topic on first use.
    async fn partitions_of(&self, topic: &Arc<str>) -> Result<u32, IngestError> {
        {
            let routes = lock(&self.routes);
            if routes.closed {
                return Err(IngestError::ShuttingDown);
            }
            if let Some(&partitions) = routes.partitions.get(topic) {
                return Ok(partitions);
            }
        }
        let log = self.log.clone();
        let name = topic.clone();
        let default_partitions = self.config.default_partitions;
        // Creating a topic makes directories and fsyncs them: blocking work.
        let info = tokio::task::spawn_blocking(move || log.ensure_topic(&name, default_partitions))
            .await
            .map_err(|error| {
                IngestError::Failed(format!("creating log topic {topic} panicked: {error}"))
            })?
            .map_err(|error| {
                tracing::warn!(topic = %topic, %error, "cannot create log topic");
                ingest_error(&error)
            })?;
        lock(&self.routes)
            .partitions
            .insert(topic.clone(), info.partitions);
        Ok(info.partitions)
    }

    /// The queue of one partition, starting its writer on first use.
    fn queue(&self, topic: &Arc<str>, partition: u32) -> Result<Arc<PartitionQueue>, IngestError> {
        let mut routes = lock(&self.routes);
        if routes.closed {
            return Err(IngestError::ShuttingDown);
        }
        let key = (topic.clone(), partition);
        if let Some(queue) = routes.queues.get(&key) {
            return Ok(queue.clone());
        }
        let log = self
            .log
            .partition(topic, partition)
            .map_err(|error| ingest_error(&error))?;
        let zstd = match self.config.zstd_level {
            Some(level) => Some(zstd::bulk::Compressor::new(level).map_err(|error| {
                IngestError::Failed(format!(
                    "cannot make the zstd context of {topic}/{partition}: {error}"
                ))
            })?),
            None => None,
        };
        let queue = Arc::new(PartitionQueue::default());
        let writer = Writer {
            queue: queue.clone(),
            log,
            batch_bytes_max: self.config.batch_bytes_max,
            batch_records_max: self.config.batch_records_max,
            failing: false,
            durable: matches!(self.log.config().flush, FlushPolicy::Durable),
            zstd,
        };
        let thread = std::thread::Builder::new()
            .name(format!("silt-ingest-{partition}"))
            .spawn(move || writer.run())
            .map_err(|error| {
                IngestError::Failed(format!(
                    "cannot start the writer of {topic}/{partition}: {error}"
                ))
            })?;
        routes.writers.push(thread);
        routes.queues.insert(key, queue.clone());
        Ok(queue)
    }
}

impl IngestPort for LogIngest {
    fn submit(
        &self,
        requests: Vec<IngestRequest>,
    ) -> BoxFuture<'_, Result<IngestReceipt, IngestError>> {
        Box::pin(async move {
            let submitted = Instant::now();
            let count = requests.len() as u64;
            let result = self.enqueue(requests, submitted).await;
            if let Err(error) = &result {
                count_rejected(error, count);
            }
            result
        })
    }

    fn position<'a>(
        &'a self,
        log_topic: &'a str,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<LogPosition, IngestError>> {
        Box::pin(async move {
            let topic: Arc<str> = Arc::from(log_topic);
            let partitions = self.partitions_of(&topic).await?;
            let partition = silt_log::partitioner::partition_for_key(key, partitions);
            let log = self
                .log
                .partition(log_topic, partition)
                .map_err(|error| ingest_error(&error))?;
            Ok(LogPosition {
                partition,
                offset: log.log_end_offset(),
            })
        })
    }

    fn find_header(
        &self,
        log_topic: &str,
        from: &LogPosition,
        name: &str,
        value: &[u8],
    ) -> Result<bool, IngestError> {
        find_header(&self.log, log_topic, from, name, value)
    }
}

/// Whether the log holds a record with header `name` = `value` in `from.partition` of
/// `log_topic` at or above `from.offset`.
pub(crate) fn find_header(
    log: &LogManager,
    log_topic: &str,
    from: &LogPosition,
    name: &str,
    value: &[u8],
) -> Result<bool, IngestError> {
    let partition = match log.partition(log_topic, from.partition) {
        Ok(partition) => partition,
        Err(LogError::UnknownTopic(_) | LogError::UnknownPartition { .. }) => return Ok(false),
        Err(error) => return Err(ingest_error(&error)),
    };
    let found = partition
        .find_record(from.offset, |record| {
            record
                .headers
                .iter()
                .any(|header| header.key == name && header.value.as_deref() == Some(value))
        })
        .map_err(|error| ingest_error(&error))?;
    Ok(found.is_some())
}

impl Drop for LogIngest {
    /// Lets the writers drain and exit if [`LogIngest::shutdown`] was never called (a node
    /// that failed half-way), without waiting for them.
    fn drop(&mut self) {
        drop(self.close());
    }
}

impl PartitionQueue {
    fn push(&self, pending: Pending) -> Result<(), IngestError> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(IngestError::ShuttingDown);
        }
        state.pending.push_back(pending);
        // One signal per wait is enough: there is one writer, and it drains the whole queue.
        let wake = std::mem::take(&mut state.writer_waiting);
        drop(state);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }
}

/// The thread that turns one partition's queue into appended batches.
struct Writer {
    queue: Arc<PartitionQueue>,
    log: Arc<PartitionLog>,
    batch_bytes_max: usize,
    batch_records_max: usize,
    /// Whether the last append failed, so a full disk is logged once, not once per batch.
    failing: bool,
    /// Under the durable flush policy receipts wait for the fsync; otherwise (the relaxed
    /// policy) they complete once the append returns, as that policy promises.
    durable: bool,
    /// Compresses batches of at least [`COMPRESS_MIN_BYTES`], one context for the thread's
    /// life (making one per batch would cost more than compressing a small batch).
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

/// A batch written and not yet known durable, on its way to the sync thread.
struct Unsynced {
    /// One past its last offset.
    end: u64,
    taken: Vec<Pending>,
    record_count: usize,
}

impl Writer {
    fn run(mut self) {
        let syncer = if self.durable {
            let (sender, receiver) = std::sync::mpsc::sync_channel(SYNC_AHEAD_BATCHES);
            let log = self.log.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("silt-sync-{}", self.log.partition()))
                .spawn(move || sync_loop(&log, &receiver));
            match spawned {
                Ok(thread) => Some((sender, thread)),
                Err(error) => {
                    // Still correct, only slower: each append waits for its own fsync.
                    tracing::warn!(%error, "cannot start an ingest sync thread; syncing inline");
                    None
                }
            }
        } else {
            None
        };
        let mut taken = Vec::new();
        while self.take(&mut taken) {
            self.write(&mut taken, syncer.as_ref().map(|(sender, _)| sender));
        }
        if let Some((sender, thread)) = syncer {
            drop(sender);
            if thread.join().is_err() {
                tracing::error!("an ingest sync thread panicked");
            }
        }
    }

    /// Waits for requests and moves as many as one batch holds into `taken`; false once the
    /// queue is closed and empty.
    fn take(&self, taken: &mut Vec<Pending>) -> bool {
        let mut state = lock(&self.queue.state);
        while state.pending.is_empty() {
            if state.closed {
                return false;
            }
            state.writer_waiting = true;
            state = self
                .queue
                .ready
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.writer_waiting = false;
        let mut batch_bytes = BATCH_HEADER_LEN;
        let mut records = 0usize;
        while let Some(next) = state.pending.front() {
            // The first part always goes: `enqueue` made every part fit a batch alone.
            let full = records + next.records.len() > self.batch_records_max
                || batch_bytes.saturating_add(next.bytes) > self.batch_bytes_max;
            if !taken.is_empty() && full {
                break;
            }
            batch_bytes = batch_bytes.saturating_add(next.bytes);
            records += next.records.len();
            let Some(next) = state.pending.pop_front() else {
                break;
            };
            taken.push(next);
        }
        true
    }

    /// Appends `taken` as one batch, then hands it to the sync thread (or, without one, syncs
    /// and completes it here); a refused append completes each request with the error.
    fn write(
        &mut self,
        taken: &mut Vec<Pending>,
        syncer: Option<&std::sync::mpsc::SyncSender<Unsynced>>,
    ) {
        let records: Vec<Record> = taken
            .iter_mut()
            .flat_map(|pending| std::mem::take(&mut pending.records))
            .collect();
        let capacity = taken
            .iter()
            .fold(BATCH_HEADER_LEN, |sum, pending| sum + pending.bytes);
        let mut batch = BytesMut::with_capacity(capacity);
        // Compressed at rest, a batch costs the same zstd CPU it would cost the uplink later
        // (which then ships it as stored), takes about half the disk (a longer outage fits
        // the budget, an SD card wears less) and is read back by a drain at half the bytes.
        let spec = BatchSpec::default();
        let encoded = match self.zstd.as_mut() {
            Some(zstd) if capacity >= COMPRESS_MIN_BYTES => {
                silt_log::batch::encode_batch_compressed(&spec, &records, &mut batch, |section| {
                    zstd.compress(section)
                        .ok()
                        .filter(|compressed| compressed.len() < section.len())
                })
            }
            _ => silt_log::batch::encode_batch(&spec, &records, &mut batch),
        };
        let result = encoded.map_err(LogError::from).and_then(|_| {
            self.log
                .append_unsynced(&mut batch, AppendOptions::default())
        });
        let record_count = records.len();
        drop(records);
        drop(batch);
        histogram!(telemetry::APPEND_BATCH_RECORDS).record(record_count as f64);
        let outcome = match result {
            Ok(info) => {
                if self.failing {
                    tracing::info!(
                        topic = self.log.topic(),
                        partition = self.log.partition(),
                        "ingest appends succeed again"
                    );
                    self.failing = false;
                }
                let unsynced = Unsynced {
                    end: info.last_offset + 1,
                    taken: std::mem::take(taken),
                    record_count,
                };
                if !self.durable {
                    complete(unsynced.taken, &Ok(()));
                    return;
                }
                match syncer {
                    // The sync thread completes it once durable; a full channel waits here,
                    // which bounds how far writes run ahead of fsyncs.
                    Some(syncer) => {
                        if let Err(std::sync::mpsc::SendError(unsynced)) = syncer.send(unsynced) {
                            sync_and_complete(&self.log, unsynced);
                        }
                    }
                    None => sync_and_complete(&self.log, unsynced),
                }
                return;
            }
            Err(error) => {
                if !self.failing {
                    tracing::warn!(
                        topic = self.log.topic(),
                        partition = self.log.partition(),
                        %error,
                        "ingest append refused; publishers get an error until it succeeds"
                    );
                    self.failing = true;
                }
                let error = ingest_error(&error);
                count_rejected(&error, record_count as u64);
                Err(error)
            }
        };
        complete(std::mem::take(taken), &outcome);
    }
}

fn complete(taken: Vec<Pending>, outcome: &Result<(), IngestError>) {
    for pending in taken {
        pending.completion.part_done(outcome);
    }
}

/// The sync thread of one partition: completes each written batch once it is durable.
fn sync_loop(log: &PartitionLog, batches: &std::sync::mpsc::Receiver<Unsynced>) {
    while let Ok(unsynced) = batches.recv() {
        sync_and_complete(log, unsynced);
    }
}

fn sync_and_complete(log: &PartitionLog, unsynced: Unsynced) {
    let outcome = log.sync_through(unsynced.end).map_err(|error| {
        tracing::error!(
            topic = log.topic(),
            partition = log.partition(),
            %error,
            "ingest fsync failed; publishers get an error"
        );
        let error = ingest_error(&error);
        count_rejected(&error, unsynced.record_count as u64);
        error
    });
    let synced = outcome.is_ok();
    complete(unsynced.taken, &outcome);
    // After the acknowledgements, so none of them waits for the zeros; the next fsync may.
    if synced && let Err(error) = log.extend_preallocation() {
        tracing::warn!(
            topic = log.topic(),
            partition = log.partition(),
            %error,
            "cannot extend the preallocated segment tail"
        );
    }
}

/// What a log error means to a publisher.
fn ingest_error(error: &LogError) -> IngestError {
    match error {
        LogError::BudgetExceeded { .. } | LogError::FilesystemFull { .. } => {
            IngestError::QuotaExceeded(error.to_string())
        }
        LogError::Closed => IngestError::ShuttingDown,
        other => IngestError::Failed(other.to_string()),
    }
}

fn count_rejected(error: &IngestError, requests: u64) {
    let reason = match error {
        IngestError::QuotaExceeded(_) => REASON_QUOTA,
        IngestError::ShuttingDown => REASON_SHUTDOWN,
        IngestError::Failed(_) => REASON_FAILED,
    };
    counter!(telemetry::INGEST_REJECTED, "reason" => reason).increment(requests);
}

/// An upper bound of the bytes `record` takes in a batch, at any position: every varint at
/// its longest. It overestimates by a few bytes per field, which only makes batches and the
/// queue budget a little conservative; it is never below the real size, so a batch packed by
/// it never exceeds the log's limit.
fn record_bytes_max(record: &Record) -> usize {
    let field = |value: Option<usize>| VARINT_BYTES_MAX + value.unwrap_or(0);
    let headers: usize = record
        .headers
        .iter()
        .map(|header| {
            field(Some(header.key.len())) + field(header.value.as_ref().map(|value| value.len()))
        })
        .sum();
    // Length, attributes, timestamp delta, offset delta, key, value, header count, headers.
    VARINT_BYTES_MAX
        + 1
        + VARLONG_BYTES_MAX
        + VARINT_BYTES_MAX
        + field(record.key.as_ref().map(|key| key.len()))
        + field(record.value.as_ref().map(|value| value.len()))
        + VARINT_BYTES_MAX
        + headers
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent at every await and return point, so a
    // panic elsewhere while holding one leaves nothing half-done.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
