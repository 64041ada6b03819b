//! The data directory's shared disk accounting: the byte budget with its full-disk policy,
//! and the free-space reserve that refuses appends before the filesystem itself fills.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::config::{BudgetPolicy, DiskBudget};
use crate::error::{LogError, Result};
use crate::fsutil;
use crate::partition::{DeleteReport, PartitionLog};

/// How often free space is re-read from the filesystem at most, unless appends since the last
/// reading could have used up the headroom.
const FS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Counters of what the drop-oldest policy removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStats {
    pub used_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub budget_policy: BudgetPolicy,
    pub dropped_segments: u64,
    pub dropped_bytes: u64,
    pub dropped_offsets: u64,
    /// Appends refused because of the budget or the filesystem reserve.
    pub rejected_appends: u64,
}

#[derive(Debug)]
struct FsReading {
    available_bytes: u64,
    written_since: u64,
    read_at: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct Disk {
    data_dir: PathBuf,
    budget: Option<DiskBudget>,
    fs_reserve_bytes: u64,
    used_bytes: AtomicU64,
    fs: Mutex<FsReading>,
    partitions: RwLock<Vec<Weak<PartitionLog>>>,
    dropping: Mutex<()>,
    dropped_segments: AtomicU64,
    dropped_bytes: AtomicU64,
    dropped_offsets: AtomicU64,
    rejected_appends: AtomicU64,
}

impl Disk {
    pub(crate) fn new(data_dir: &Path, budget: Option<DiskBudget>, fs_reserve_bytes: u64) -> Self {
        Disk {
            data_dir: data_dir.to_path_buf(),
            budget,
            fs_reserve_bytes,
            used_bytes: AtomicU64::new(0),
            fs: Mutex::new(FsReading {
                available_bytes: 0,
                written_since: 0,
                read_at: None,
            }),
            partitions: RwLock::new(Vec::new()),
            dropping: Mutex::new(()),
            dropped_segments: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            dropped_offsets: AtomicU64::new(0),
            rejected_appends: AtomicU64::new(0),
        }
    }

    pub(crate) fn register(&self, partition: Weak<PartitionLog>) {
        let mut partitions = self.partitions.write().unwrap_or_else(|e| e.into_inner());
        partitions.retain(|p| p.strong_count() > 0);
        partitions.push(partition);
    }

    pub(crate) fn add_used(&self, bytes: u64) {
        self.used_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(crate) fn sub_used(&self, bytes: u64) {
        let _ = self
            .used_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Decides whether `bytes` more may be appended, making room first under the drop-oldest
    /// policy. Called before the appending partition takes its own lock.
    pub(crate) fn admit(&self, bytes: u64) -> Result<()> {
        let result = self
            .check_filesystem(bytes)
            .and_then(|()| self.check_budget(bytes));
        if result.is_err() {
            self.rejected_appends.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    pub(crate) fn check_filesystem(&self, bytes: u64) -> Result<()> {
        let mut fs = self.fs.lock().unwrap_or_else(|e| e.into_inner());
        let stale = fs
            .read_at
            .is_none_or(|at| at.elapsed() >= FS_CHECK_INTERVAL);
        let headroom = fs
            .available_bytes
            .saturating_sub(fs.written_since)
            .saturating_sub(self.fs_reserve_bytes);
        if stale || headroom < bytes {
            fs.available_bytes = fsutil::available_bytes(&self.data_dir)?;
            fs.written_since = 0;
            fs.read_at = Some(Instant::now());
        }
        let available = fs.available_bytes.saturating_sub(fs.written_since);
        if available < self.fs_reserve_bytes.saturating_add(bytes) {
            return Err(LogError::FilesystemFull {
                path: self.data_dir.clone(),
                available_bytes: available,
                reserve_bytes: self.fs_reserve_bytes,
            });
        }
        fs.written_since += bytes;
        Ok(())
    }

    fn check_budget(&self, bytes: u64) -> Result<()> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let fits = || self.used_bytes.load(Ordering::Acquire) + bytes <= budget.bytes_max;
        if fits() {
            return Ok(());
        }
        if budget.policy == BudgetPolicy::DropOldest {
            let _dropping = self.dropping.lock().unwrap_or_else(|e| e.into_inner());
            while !fits() {
                if !self.drop_oldest_segment()? {
                    break;
                }
            }
            if fits() {
                return Ok(());
            }
        }
        Err(LogError::BudgetExceeded {
            used_bytes: self.used_bytes.load(Ordering::Acquire),
            budget_bytes: budget.bytes_max,
        })
    }

    /// Deletes the closed segment with the oldest data across all partitions. Returns false
    /// when no partition has a closed segment to give.
    fn drop_oldest_segment(&self) -> Result<bool> {
        let partitions: Vec<_> = self
            .partitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let oldest = partitions
            .iter()
            .filter_map(|p| {
                p.oldest_closed_segment()
                    .map(|max_timestamp| (max_timestamp, p))
            })
            .min_by_key(|(max_timestamp, _)| *max_timestamp);
        let Some((_, partition)) = oldest else {
            return Ok(false);
        };
        let report: DeleteReport = partition.drop_oldest_segment()?;
        tracing::warn!(
            topic = partition.topic(),
            partition = partition.partition(),
            bytes = report.bytes,
            offsets = report.offsets,
            "disk budget full: dropped oldest segment"
        );
        self.dropped_segments
            .fetch_add(report.segments, Ordering::Relaxed);
        self.dropped_bytes
            .fetch_add(report.bytes, Ordering::Relaxed);
        self.dropped_offsets
            .fetch_add(report.offsets, Ordering::Relaxed);
        Ok(report.segments > 0)
    }

    pub(crate) fn stats(&self) -> DiskStats {
        DiskStats {
            used_bytes: self.used_bytes.load(Ordering::Acquire),
            budget_bytes: self.budget.map(|b| b.bytes_max),
            budget_policy: self.budget.map(|b| b.policy).unwrap_or_default(),
            dropped_segments: self.dropped_segments.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
            dropped_offsets: self.dropped_offsets.load(Ordering::Relaxed),
            rejected_appends: self.rejected_appends.load(Ordering::Relaxed),
        }
    }
}
