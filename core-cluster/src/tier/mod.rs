//! Tiering in the core node: the offload loop, local retention bounded by the archive,
//! backpressure, the tier metrics and `GET /v1/tier/status/<topic>`.
//!
//! The Parquet format, the manifest and the conversion of one range are `silt-tiering`'s; this
//! module decides when and how often they run. Every `tiering.check_interval_ms` each
//! partition (internal `__` topics excepted) whose last attempt is not backing off gets a task
//! that archives every range that is due (`offload_next` until it returns `None`), at most
//! `tiering.upload_concurrency` uploads at a time across the node. When nothing more is due,
//! the same task merges one run of small archive objects (`tiering.compact`, under the upload
//! permit it holds, so compaction counts against `tiering.upload_concurrency` and a partition
//! never has two at once), applies whole-log retention across both tiers and, every
//! `tiering.gc_interval_ms`, garbage collection (`Tier::maintain`).
//!
//! # Invariants
//! - A partition's manifest is loaded once and then cached. Any failure drops the cached copy:
//!   `offload_next` adds an object to the manifest before committing it, so after a failed
//!   commit the copy in memory names an object the store may not. The next attempt reloads
//!   what the store really holds.
//! - Local retention deletes only below the *committed* manifest's end. A partition whose
//!   manifest has not been loaded (the store is down since start) or that has nothing archived
//!   deletes nothing locally.
//! - An unreachable store is never fatal: the node serves hot data, and loading manifests and
//!   uploading are retried with exponential backoff and jitter.

mod backoff;
mod status;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use silt_log::{DeleteReport, LogManager, PartitionLog};
use silt_tiering::{
    ArchiveStore, CompactPolicy, GcPolicy, GcReport, Manifest, OffloadPolicy, compact_next, gc,
    offload_next, retention,
};
use tokio::sync::{OwnedMutexGuard, Semaphore};
use tokio::task::JoinSet;

use crate::config::TieringConfig;
use crate::telemetry;
use backoff::Retry;
pub(crate) use status::StatusError;

/// Whether `topic` is tiered.
/// The node's own topics (committed offsets, producer id blocks) stay local and keep
/// whole-log retention, as Kafka keeps `__consumer_offsets` out of tiered storage.
fn is_tiered(topic: &str) -> bool {
    !crate::broker::is_internal_topic(topic)
}

/// The produce-side view of backpressure: a flag the offload loop sets and the broker reads
/// on every Produce, one atomic load.
#[derive(Debug, Clone, Default)]
pub(crate) struct Backpressure(Arc<AtomicBool>);

/// A Produce refused because the data directory is nearly full while offload is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the data directory is nearly full while tiering catches up; retry later")]
pub(crate) struct Refused;

impl Backpressure {
    /// `Ok` when a Produce may append; [`Refused`] maps to KAFKA_STORAGE_ERROR (56), which
    /// librdkafka and the Java client retry.
    pub(crate) fn admit_produce(&self) -> Result<(), Refused> {
        if self.0.load(Ordering::Acquire) {
            Err(Refused)
        } else {
            Ok(())
        }
    }

    fn set(&self, on: bool) -> bool {
        self.0.swap(on, Ordering::AcqRel) != on
    }

    fn is_on(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The node's tiering: its store, its partitions' archive state, and the backpressure flag.
#[derive(Debug)]
pub(crate) struct Tier {
    config: TieringConfig,
    log: Arc<LogManager>,
    /// The node's one handle on the store, shared with the broker's cold reader (for
    /// `memory://`, two opens would be two different stores). Opening makes no request, so
    /// a store that does not answer yet shows as failing uploads, retried with backoff.
    store: ArchiveStore,
    partitions: Mutex<BTreeMap<(String, u32), Arc<PartitionTier>>>,
    uploads: Arc<Semaphore>,
    backpressure: Backpressure,
}

/// One partition's tiering state.
#[derive(Debug)]
struct PartitionTier {
    log: Arc<PartitionLog>,
    /// The cached manifest, `None` until loaded (or after a failure). Held for a whole offload
    /// run, so one partition never has two runs at once.
    manifest: Arc<tokio::sync::Mutex<Option<Manifest>>>,
    state: Mutex<PartitionState>,
}

/// What status, metrics and retention read without waiting for an upload.
#[derive(Debug, Default)]
struct PartitionState {
    /// The committed manifest's summary; `None` until it has been loaded.
    committed: Option<Committed>,
    last_error: Option<String>,
    retry: Retry,
    /// When this partition's archive was last garbage collected.
    last_gc: Option<Instant>,
    /// Backoff of failed compactions, apart from offload's: a compaction that fails (a corrupt
    /// object, a store error) must not hold up retention, GC or offload, nor be retried at
    /// every check.
    compact_retry: Retry,
}

/// A committed manifest, summed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Committed {
    /// Offset after the last archived record; `None` when nothing is archived.
    next_offset: Option<u64>,
    log_start_offset: u64,
    objects: usize,
    bytes: u64,
}

impl Committed {
    fn of(manifest: &Manifest) -> Committed {
        Committed {
            next_offset: manifest
                .next_offset()
                .map(|next| u64::try_from(next).unwrap_or(0)),
            log_start_offset: u64::try_from(manifest.log_start_offset).unwrap_or(0),
            objects: manifest.objects.len(),
            bytes: manifest.archived_bytes(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

impl Tier {
    /// Tiering of `log`'s partitions to `store`. Nothing starts until [`Tier::run`].
    pub(crate) fn new(
        store: ArchiveStore,
        config: TieringConfig,
        log: Arc<LogManager>,
    ) -> Arc<Tier> {
        Arc::new(Tier {
            config,
            log,
            store,
            partitions: Mutex::new(BTreeMap::new()),
            uploads: Arc::new(Semaphore::new(config.upload_concurrency)),
            backpressure: Backpressure::default(),
        })
    }

    /// The flag the broker checks on Produce.
    pub(crate) fn backpressure(&self) -> Backpressure {
        self.backpressure.clone()
    }

    /// Runs the offload loop until `shutdown` completes. Uploads under way are then dropped:
    /// an object uploaded but not committed is garbage the collector removes; nothing is lost,
    /// as the local segments stay until a commit names them.
    pub(crate) async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tracing::info!(
            store = %self.store.url(),
            check_interval_ms = self.config.check_interval.as_millis() as u64,
            upload_concurrency = self.config.upload_concurrency,
            "tiering started"
        );
        let mut tick = tokio::time::interval(self.config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tick.tick() => self.check(&mut tasks),
            }
        }
        tasks.shutdown().await;
    }

    /// One pass: start an offload for each partition that is idle and not backing off, and
    /// refresh backpressure and metrics.
    fn check(self: &Arc<Self>, tasks: &mut JoinSet<()>) {
        let now = Instant::now();
        for partition in self.sync_partitions() {
            if !lock(&partition.state).retry.due(now) {
                continue;
            }
            // Busy: its previous run is still uploading.
            let Ok(manifest) = partition.manifest.clone().try_lock_owned() else {
                continue;
            };
            let tier = self.clone();
            tasks.spawn(async move { tier.offload_partition(partition, manifest).await });
        }
        self.refresh();
    }

    /// The tiered partitions, with new topics' partitions added and deleted topics' dropped.
    fn sync_partitions(&self) -> Vec<Arc<PartitionTier>> {
        let mut current = BTreeMap::new();
        for topic in self.log.topics() {
            if !is_tiered(&topic.name) {
                continue;
            }
            for index in 0..topic.partitions {
                if let Ok(log) = self.log.partition(&topic.name, index) {
                    current.insert((topic.name.clone(), index), log);
                }
            }
        }
        let mut partitions = lock(&self.partitions);
        partitions.retain(|key, partition| {
            // A topic deleted and created again has new partition logs.
            current
                .get(key)
                .is_some_and(|log| Arc::ptr_eq(log, &partition.log))
        });
        for (key, log) in current {
            partitions.entry(key).or_insert_with(|| {
                Arc::new(PartitionTier {
                    log,
                    manifest: Arc::new(tokio::sync::Mutex::new(None)),
                    state: Mutex::new(PartitionState::default()),
                })
            });
        }
        partitions.values().cloned().collect()
    }

    /// Loads the partition's manifest if it is not cached, then archives every range that is
    /// due, one object per upload permit.
    async fn offload_partition(
        self: Arc<Self>,
        partition: Arc<PartitionTier>,
        mut manifest: OwnedMutexGuard<Option<Manifest>>,
    ) {
        let log = &partition.log;
        let labels = [
            ("topic", log.topic().to_string()),
            ("partition", log.partition().to_string()),
        ];
        let policy = OffloadPolicy {
            object_bytes_target: self.config.object_bytes_target,
            max_wait_ms: self.config.max_wait_ms,
        };
        let store = &self.store;
        loop {
            let Ok(_permit) = self.uploads.acquire().await else {
                return;
            };
            let started = Instant::now();
            let result = match manifest.as_mut() {
                Some(cached) => offload_next(store, log, cached, &policy, silt_log::now_ms())
                    .await
                    .map(|object| object.map(|object| (object, Committed::of(cached)))),
                None => match Manifest::load(store, log.topic(), log.partition()).await {
                    Ok(loaded) => {
                        let loaded =
                            loaded.unwrap_or_else(|| Manifest::new(log.topic(), log.partition()));
                        let mut state = lock(&partition.state);
                        state.committed = Some(Committed::of(&loaded));
                        *manifest = Some(loaded);
                        // Loaded: go round again to offload with it.
                        continue;
                    }
                    Err(error) => Err(error),
                },
            };
            match result {
                Ok(Some((object, committed))) => {
                    let seconds = started.elapsed().as_secs_f64();
                    counter!(telemetry::TIER_UPLOADS, &labels).increment(1);
                    counter!(telemetry::TIER_UPLOADED_BYTES, &labels).increment(object.size_bytes);
                    histogram!(telemetry::TIER_UPLOAD_SECONDS).record(seconds);
                    tracing::info!(
                        topic = log.topic(),
                        partition = log.partition(),
                        base_offset = object.base_offset,
                        last_offset = object.last_offset,
                        bytes = object.size_bytes,
                        seconds,
                        key = %object.key,
                        "archived"
                    );
                    let mut state = lock(&partition.state);
                    state.committed = Some(committed);
                    state.last_error = None;
                    state.retry.succeeded();
                }
                Ok(None) => {
                    let maintained = match manifest.as_mut() {
                        Some(cached) => self.maintain(&partition, cached).await,
                        None => Ok(()),
                    };
                    let mut state = lock(&partition.state);
                    match maintained {
                        Ok(()) => state.retry.succeeded(),
                        Err(error) => {
                            // A failed commit may leave the cached copy ahead of the store.
                            *manifest = None;
                            state.committed = None;
                            tracing::warn!(
                                topic = log.topic(),
                                partition = log.partition(),
                                %error,
                                "archive retention or garbage collection failed; retrying at the next check"
                            );
                            state.last_error = Some(error.to_string());
                        }
                    }
                    return;
                }
                Err(error) => {
                    // The cached manifest may name an object whose commit failed: reload.
                    *manifest = None;
                    counter!(telemetry::TIER_UPLOAD_FAILURES, &labels).increment(1);
                    let mut state = lock(&partition.state);
                    let wait = state.retry.failed(
                        Instant::now(),
                        self.config.retry_initial,
                        self.config.retry_max,
                    );
                    tracing::warn!(
                        topic = log.topic(),
                        partition = log.partition(),
                        %error,
                        failures = state.retry.failures(),
                        retry_in_ms = wait.as_millis() as u64,
                        "offload failed; local segments stay until it succeeds"
                    );
                    state.last_error = Some(error.to_string());
                    return;
                }
            }
        }
    }

    /// One compaction (`tiering.compact`: a run of small archive objects merged into one; the
    /// replaced objects stay until garbage collection's grace has passed), whole-log retention
    /// (`retention.ms`/`retention.bytes` across both tiers: the log start
    /// advances in the manifest, then locally, then expired objects go), and every
    /// `tiering.gc_interval_ms` garbage collection (objects no manifest names, expired keys
    /// and interrupted uploads older than `tiering.gc_grace_ms`). Run by the partition's one
    /// offload task with the manifest it holds, after offload, so nothing else commits this
    /// manifest meanwhile (silt-tiering's `gc` relies on that).
    async fn maintain(
        &self,
        partition: &PartitionTier,
        manifest: &mut Manifest,
    ) -> silt_tiering::Result<()> {
        let log = &partition.log;
        if self.config.compact && lock(&partition.state).compact_retry.due(Instant::now()) {
            self.compact(partition, manifest).await;
        }
        let store = &self.store;
        let retained = retention::enforce(store, log, manifest, silt_log::now_ms()).await?;
        lock(&partition.state).committed = Some(Committed::of(manifest));
        if retained.objects_expired > 0 || retained.local_segments_deleted > 0 {
            tracing::info!(
                topic = log.topic(),
                partition = log.partition(),
                log_start_offset = retained.log_start_offset,
                objects_expired = retained.objects_expired,
                bytes_expired = retained.bytes_expired,
                objects_deleted = retained.objects_deleted,
                local_segments_deleted = retained.local_segments_deleted,
                "retention across tiers"
            );
        }
        let now = Instant::now();
        let gc_due = lock(&partition.state)
            .last_gc
            .is_none_or(|last| now.duration_since(last) >= self.config.gc_interval);
        if !gc_due {
            return Ok(());
        }
        let policy = GcPolicy {
            grace_ms: i64::try_from(self.config.gc_grace_ms).unwrap_or(i64::MAX),
        };
        let collected = gc::collect(store, manifest, &policy, silt_log::now_ms()).await?;
        let mut state = lock(&partition.state);
        state.last_gc = Some(now);
        state.committed = Some(Committed::of(manifest));
        if collected != GcReport::default() {
            tracing::info!(
                topic = log.topic(),
                partition = log.partition(),
                expired_deleted = collected.expired_deleted,
                replaced_deleted = collected.replaced_deleted,
                orphans_deleted = collected.orphans_deleted,
                uploads_aborted = collected.uploads_aborted,
                bytes_freed = collected.bytes_freed,
                "archive garbage collected"
            );
        }
        Ok(())
    }

    /// Merges the first run of small objects that is due, if any: one per pass, so a backlog
    /// of small objects costs one upload permit at a time and is worked off check by check.
    /// A failure is counted, logged and backed off, and leaves `manifest` what the store holds
    /// (`compact_next` restores it after a failed commit), so retention and GC go on.
    async fn compact(&self, partition: &PartitionTier, manifest: &mut Manifest) {
        let log = &partition.log;
        let labels = [
            ("topic", log.topic().to_string()),
            ("partition", log.partition().to_string()),
        ];
        let policy = CompactPolicy {
            object_bytes_target: self.config.object_bytes_target,
            small_bytes: self.config.compact_small_bytes,
            min_age_ms: self.config.compact_min_age_ms,
            ..CompactPolicy::default()
        };
        let started = Instant::now();
        let done = match compact_next(&self.store, manifest, &policy, silt_log::now_ms()).await {
            Ok(Some(done)) => done,
            Ok(None) => {
                lock(&partition.state).compact_retry.succeeded();
                return;
            }
            Err(error) => {
                counter!(telemetry::TIER_COMPACTION_FAILURES, &labels).increment(1);
                let mut state = lock(&partition.state);
                let wait = state.compact_retry.failed(
                    Instant::now(),
                    self.config.retry_initial,
                    self.config.retry_max,
                );
                tracing::warn!(
                    topic = log.topic(),
                    partition = log.partition(),
                    %error,
                    retry_in_ms = wait.as_millis() as u64,
                    "compaction failed; the archive's objects are unchanged"
                );
                return;
            }
        };
        {
            let mut state = lock(&partition.state);
            state.committed = Some(Committed::of(manifest));
            state.compact_retry.succeeded();
        }
        counter!(telemetry::TIER_COMPACTIONS, &labels).increment(1);
        counter!(telemetry::TIER_COMPACTED_OBJECTS, &labels).increment(done.objects_replaced);
        counter!(telemetry::TIER_COMPACTED_BYTES, &labels).increment(done.merged.size_bytes);
        tracing::info!(
            topic = log.topic(),
            partition = log.partition(),
            base_offset = done.merged.base_offset,
            last_offset = done.merged.last_offset,
            objects_replaced = done.objects_replaced,
            bytes_replaced = done.bytes_replaced,
            bytes = done.merged.size_bytes,
            seconds = started.elapsed().as_secs_f64(),
            key = %done.merged.key,
            "compacted small archive objects"
        );
    }

    /// The offset below which local retention may delete `log`'s segments: `None` for an
    /// internal topic (whole-log retention, as without tiering), else the committed archive's
    /// end, or the log start (delete nothing) while nothing is known to be archived.
    fn local_retention_bound(&self, log: &PartitionLog) -> Option<u64> {
        if !is_tiered(log.topic()) {
            return None;
        }
        let archived_next = lock(&self.partitions)
            .get(&(log.topic().to_string(), log.partition()))
            .and_then(|partition| lock(&partition.state).committed)
            .and_then(|committed| committed.next_offset);
        Some(archived_next.unwrap_or_else(|| log.log_start_offset()))
    }

    /// One local retention pass over every partition, each bounded by its archive. Blocking:
    /// run it off the runtime's threads.
    pub(crate) fn enforce_local_retention(&self, now_ms: i64) -> silt_log::Result<DeleteReport> {
        let mut total = DeleteReport::default();
        for topic in self.log.topics() {
            for index in 0..topic.partitions {
                let Ok(log) = self.log.partition(&topic.name, index) else {
                    continue;
                };
                // Whole-log retention across both tiers runs in each partition's offload task
                // (`Tier::maintain`), which holds the manifest; this pass is the hot tier's.
                total.add(log.enforce_retention(now_ms, self.local_retention_bound(&log))?);
            }
        }
        self.refresh();
        Ok(total)
    }

    /// Recomputes backpressure and the per-partition gauges.
    pub(crate) fn refresh(&self) {
        let partitions: Vec<Arc<PartitionTier>> =
            lock(&self.partitions).values().cloned().collect();
        let mut behind_bytes = 0u64;
        for partition in &partitions {
            let log = &partition.log;
            let committed = lock(&partition.state).committed;
            let lag = Lag::of(log, committed);
            behind_bytes += lag.closed_bytes;
            let labels = [
                ("topic", log.topic().to_string()),
                ("partition", log.partition().to_string()),
            ];
            gauge!(telemetry::TIER_UPLOAD_LAG_BYTES, &labels).set(lag.bytes as f64);
            gauge!(telemetry::TIER_UPLOAD_LAG_RECORDS, &labels).set(lag.records as f64);
            let (objects, bytes) = committed.map_or((0, 0), |c| (c.objects, c.bytes));
            gauge!(telemetry::TIER_ARCHIVED_OBJECTS, &labels).set(objects as f64);
            gauge!(telemetry::TIER_ARCHIVED_BYTES, &labels).set(bytes as f64);
        }
        let disk = self.log.disk_stats();
        let on = backpressure_due(
            disk.used_bytes,
            disk.budget_bytes,
            self.config.backpressure_percent,
            behind_bytes,
        );
        if self.backpressure.set(on) {
            if on {
                tracing::warn!(
                    used_bytes = disk.used_bytes,
                    budget_bytes = disk.budget_bytes,
                    behind_bytes,
                    "backpressure on: produce is refused until offload and local retention free space"
                );
            } else {
                tracing::info!(used_bytes = disk.used_bytes, "backpressure off");
            }
        }
        gauge!(telemetry::TIER_BACKPRESSURE).set(if on { 1.0 } else { 0.0 });
    }
}

/// Whether Produce must wait: the data directory uses at least `percent` of its budget and
/// closed segments still await offload (so waiting frees space). With no budget there is no
/// threshold; once everything closed is archived, the budget's own policy decides.
fn backpressure_due(
    used_bytes: u64,
    budget_bytes: Option<u64>,
    percent: u8,
    behind_bytes: u64,
) -> bool {
    let Some(budget) = budget_bytes else {
        return false;
    };
    behind_bytes > 0 && u128::from(used_bytes) * 100 >= u128::from(budget) * u128::from(percent)
}

/// What of a partition is committed locally but not archived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lag {
    records: u64,
    /// Log bytes not archived, the active segment included.
    bytes: u64,
    /// Of those, the bytes in closed segments: what offload could archive now.
    closed_bytes: u64,
    /// Where the archive continues.
    archived_next: u64,
}

impl Lag {
    fn of(log: &PartitionLog, committed: Option<Committed>) -> Lag {
        let archived_next = committed
            .and_then(|committed| committed.next_offset)
            .unwrap_or_else(|| log.log_start_offset())
            .max(log.local_start_offset());
        let closed = log.closed_segments();
        let closed_total: u64 = closed.iter().map(|segment| segment.size_bytes).sum();
        let closed_bytes: u64 = closed
            .iter()
            .filter(|segment| segment.next_offset > archived_next)
            .map(|segment| segment.size_bytes)
            .sum();
        let active_bytes = log.size_bytes().saturating_sub(closed_total);
        Lag {
            records: log.high_watermark().saturating_sub(archived_next),
            bytes: closed_bytes + active_bytes,
            closed_bytes,
            archived_next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backpressure_needs_a_budget_a_full_disk_and_offload_behind() {
        assert!(!backpressure_due(100, None, 90, 50));
        assert!(!backpressure_due(89, Some(100), 90, 50));
        assert!(backpressure_due(90, Some(100), 90, 50));
        assert!(
            !backpressure_due(95, Some(100), 90, 0),
            "nothing left to offload"
        );
        assert!(
            backpressure_due(u64::MAX, Some(u64::MAX), 100, 1),
            "no overflow"
        );
    }

    /// A trickle through the real offload loop (real log, `file://` store): every pass archives
    /// one small object and compaction, in the same task, keeps merging them; the archive ends
    /// as a few objects naming every offset, the replaced ones kept for GC's grace.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_offload_loop_compacts_a_trickle_into_few_objects() {
        use bytes::{Bytes, BytesMut};
        use silt_log::batch::{BatchSpec, Record, encode_batch};

        let dir = tempfile::tempdir().unwrap();
        let mut log_config = silt_log::LogConfig::new(dir.path().join("data"));
        log_config.fs_reserve_bytes = 0;
        log_config.topic_defaults = silt_log::TopicConfig::default()
            .with_overrides(
                [("segment.bytes".to_string(), "2048".to_string())]
                    .into_iter()
                    .collect::<BTreeMap<_, _>>()
                    .iter(),
            )
            .unwrap();
        let manager = LogManager::open(log_config).unwrap();
        manager.ensure_topic("trickle", 1).unwrap();
        let log = manager.partition("trickle", 0).unwrap();
        let objects = dir.path().join("objects");
        std::fs::create_dir_all(&objects).unwrap();
        let url = format!("file://{}", objects.display());
        let config = TieringConfig {
            max_wait_ms: 0,
            object_bytes_target: 256 << 10,
            compact_small_bytes: 64 << 10,
            compact_min_age_ms: 0,
            ..TieringConfig::default()
        };
        let tier = Tier::new(
            ArchiveStore::open(&url).unwrap(),
            config,
            Arc::clone(&manager),
        );
        let old_ms = silt_log::now_ms() - 3_600_000;
        let value = |offset: i64| Bytes::from(format!("{offset:08}:{}", "v".repeat(300)));
        let mut uploads = 0;
        let mut next_offset = 0i64;
        for _ in 0..16 {
            // About one segment: the previous active segment closes.
            for _ in 0..6 {
                let records: Vec<Record> = (next_offset..next_offset + 2)
                    .map(|offset| Record {
                        timestamp: old_ms + offset,
                        key: None,
                        value: Some(value(offset)),
                        headers: Vec::new(),
                    })
                    .collect();
                let mut batch = BytesMut::new();
                encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
                log.append(&mut batch).unwrap();
                next_offset += 2;
            }
            let archived_before = tier_committed(&tier).and_then(|c| c.next_offset);
            let mut tasks = JoinSet::new();
            tier.check(&mut tasks);
            while tasks.join_next().await.is_some() {}
            let archived_after = tier_committed(&tier).and_then(|c| c.next_offset);
            if archived_after != archived_before {
                uploads += 1;
            }
        }
        let store = ArchiveStore::open(&url).unwrap();
        let manifest = Manifest::load(&store, "trickle", 0).await.unwrap().unwrap();
        assert!(uploads >= 10, "{uploads} uploads");
        assert!(
            manifest.objects.len() <= 3,
            "{uploads} uploads left {} objects",
            manifest.objects.len()
        );
        assert!(
            manifest.replaced.is_empty(),
            "replaced objects are deleted right after the compaction: {:?}",
            manifest.replaced
        );
        let end = manifest.next_offset().unwrap();
        assert_eq!(manifest.objects[0].base_offset, 0);
        let cold = silt_tiering::ColdReader::new(store, silt_tiering::ColdConfig::default());
        let mut offset = 0;
        while offset < end {
            let read = cold.read("trickle", 0, offset, 1 << 20).await.unwrap();
            for item in silt_log::batch::batches(&read.batches, usize::MAX) {
                let (header, batch) = item.unwrap();
                let limits = silt_log::batch::DecodeLimits::default();
                for record in silt_log::batch::decode_records(&header, batch, &limits).unwrap() {
                    if record.offset >= offset {
                        assert_eq!(record.offset, offset);
                        assert_eq!(record.value, Some(value(offset)));
                        offset += 1;
                    }
                }
            }
        }
        manager.close().unwrap();
    }

    fn tier_committed(tier: &Tier) -> Option<Committed> {
        let partitions = lock(&tier.partitions);
        let partition = partitions.get(&("trickle".to_string(), 0))?;
        lock(&partition.state).committed
    }

    #[test]
    fn internal_topics_are_not_tiered() {
        assert!(!is_tiered("__silt_consumer_offsets"));
        assert!(!is_tiered("__silt_producer_ids"));
        assert!(is_tiered("telemetry"));
    }
}
