//! Whole-log retention for a partition with an archive: `retention.ms` and `retention.bytes`
//! applied across both tiers, archive objects and local segments together.
//!
//! What goes is planned by the log's own rule ([`silt_log::retention::segments_to_delete`]),
//! run over the manifest's objects as if they were segments: oldest first, an object goes when
//! its newest record is older than `retention.ms`, or while the partition would still hold at
//! least `retention.bytes` without it. The total counts the archive's bytes plus the local bytes
//! not yet archived (local segments wholly below the archive's end are copies). Expiry has
//! object granularity and never passes the archive's end, so unarchived data and the active
//! segment are never expired here; the log start only moves to an object boundary.
//!
//! # Order (the manifest module's rules)
//! 1. `manifest.advance_log_start(new)` and commit: readers now get OFFSET_OUT_OF_RANGE below
//!    `new`, never a missing object.
//! 2. `PartitionLog::delete_before(new)`: the local log start follows (it persists the start
//!    before deleting files).
//! 3. Delete the expired objects.
//! 4. `forget_expired` and commit.
//!
//! Every step is idempotent, and a pass first finishes what an interrupted one left: a local log
//! start behind the manifest's is advanced, keys still in `expired` are deleted. A crash
//! anywhere therefore loses nothing readers may still ask for and leaves at most keys in
//! `expired`, which the next pass (or garbage collection) deletes.
//!
//! When nothing is archived the log's own retention (`enforce_retention(now, None)`) applies;
//! this module is for partitions with a manifest.

use std::sync::Arc;

use object_store::ObjectStoreExt;
use object_store::path::Path;
use silt_log::PartitionLog;
use silt_log::retention::{RetentionLimits, SegmentSummary, segments_to_delete};

use crate::error::{Result, TierError, joined};
use crate::failpoint;
use crate::manifest::Manifest;
use crate::store::ArchiveStore;

/// What one retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Objects this pass expired from the manifest.
    pub objects_expired: u64,
    /// Their bytes.
    pub bytes_expired: u64,
    /// Expired objects deleted from the store by this pass (this pass's and any a crashed pass
    /// left in `expired`).
    pub objects_deleted: u64,
    /// The partition's log start offset after the pass.
    pub log_start_offset: i64,
    /// Local segments deleted by advancing the local log start.
    pub local_segments_deleted: u64,
}

/// The offset the log start may move to: the end of the oldest objects the limits expire, or
/// `None` when nothing expires. `local_unarchived_bytes` is the local data the archive does not
/// hold; `bound` caps the result (the archive's end, never past the active segment).
pub fn plan_log_start(
    manifest: &Manifest,
    limits: RetentionLimits,
    local_unarchived_bytes: u64,
    now_ms: i64,
    bound: i64,
) -> Option<i64> {
    let as_segments: Vec<SegmentSummary> = manifest
        .objects
        .iter()
        .map(|object| SegmentSummary {
            base_offset: u64::try_from(object.base_offset).unwrap_or(0),
            next_offset: u64::try_from(object.last_offset + 1).unwrap_or(0),
            size_bytes: object.size_bytes,
            max_timestamp: object.max_timestamp_ms,
        })
        .collect();
    let total_bytes = manifest
        .archived_bytes()
        .saturating_add(local_unarchived_bytes);
    let bound = u64::try_from(bound).unwrap_or(0);
    let count = segments_to_delete(&as_segments, total_bytes, limits, now_ms, Some(bound));
    let new_start = manifest.objects[..count].last()?.last_offset + 1;
    (new_start > manifest.log_start_offset).then_some(new_start)
}

/// Applies `retention.ms`/`retention.bytes` (from `log.config()`) to `log` and its archive, in
/// the order the module doc gives. `manifest` must be the partition's committed manifest, held
/// by the one task that offloads this partition (it is committed here).
pub async fn enforce(
    store: &ArchiveStore,
    log: &Arc<PartitionLog>,
    manifest: &mut Manifest,
    now_ms: i64,
) -> Result<RetentionReport> {
    let config = log.config();
    let limits = RetentionLimits {
        retention_ms: config.retention_ms,
        retention_bytes: config.retention_bytes,
    };
    let closed = log.closed_segments();
    let archive_end = manifest.next_offset().unwrap_or(manifest.log_start_offset);
    let archive_end_u64 = u64::try_from(archive_end).unwrap_or(0);
    let archived_local_bytes: u64 = closed
        .iter()
        .filter(|segment| segment.next_offset <= archive_end_u64)
        .map(|segment| segment.size_bytes)
        .sum();
    let local_unarchived_bytes = log.size_bytes().saturating_sub(archived_local_bytes);
    let active_base = closed
        .last()
        .map_or_else(|| log.local_start_offset(), |segment| segment.next_offset);
    let bound = archive_end.min(i64::try_from(active_base).unwrap_or(i64::MAX));

    let mut report = RetentionReport::default();
    if let Some(new_start) = plan_log_start(manifest, limits, local_unarchived_bytes, now_ms, bound)
    {
        let before = manifest.expired.len();
        let bytes_before = manifest.archived_bytes();
        manifest.advance_log_start(new_start);
        report.objects_expired = (manifest.expired.len() - before) as u64;
        report.bytes_expired = bytes_before - manifest.archived_bytes();
        manifest.commit(store).await?;
        tracing::info!(
            topic = %manifest.topic,
            partition = manifest.partition,
            log_start_offset = new_start,
            objects = report.objects_expired,
            bytes = report.bytes_expired,
            "archive retention advanced the log start"
        );
        failpoint::hit(failpoint::RETENTION_AFTER_MANIFEST);
    }

    // The local log start follows the manifest's (also after a crash between the two).
    let manifest_start = u64::try_from(manifest.log_start_offset).unwrap_or(0);
    if manifest_start > log.log_start_offset() {
        let target = manifest_start.min(log.log_end_offset());
        let local = Arc::clone(log);
        let deleted = joined(
            "the local log start's advance",
            tokio::task::spawn_blocking(move || local.delete_before(target)).await,
        )?
        .map_err(|source| TierError::Log {
            topic: log.topic().to_string(),
            partition: log.partition(),
            source,
        })?;
        report.local_segments_deleted = deleted.segments as u64;
    }

    report.objects_deleted = delete_expired(store, manifest, None).await?;
    report.log_start_offset = manifest.log_start_offset;
    Ok(report)
}

/// Deletes every key in `manifest.expired` (a missing object counts as deleted), then forgets
/// them and commits. Returns how many were deleted. `failpoint` is hit after the first
/// deletion.
pub(crate) async fn delete_expired(
    store: &ArchiveStore,
    manifest: &mut Manifest,
    failpoint: Option<&str>,
) -> Result<u64> {
    if manifest.expired.is_empty() {
        return Ok(0);
    }
    let keys = manifest.expired.clone();
    let mut deleted = Vec::with_capacity(keys.len());
    let mut failure = None;
    for key in keys {
        match delete_object(store, &key).await {
            Ok(()) => deleted.push(key),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
        if deleted.len() == 1
            && let Some(name) = failpoint
        {
            failpoint::hit(name);
        }
    }
    let count = deleted.len() as u64;
    if !deleted.is_empty() {
        manifest.forget_expired(&deleted);
        manifest.commit(store).await?;
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(count),
    }
}

/// Deletes `key` (a full key, prefix included); an object already gone is fine.
pub(crate) async fn delete_object(store: &ArchiveStore, key: &str) -> Result<()> {
    match store.store().delete(&Path::from(key)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestObject;

    fn manifest(objects: &[(i64, i64, u64, i64)]) -> Manifest {
        let mut manifest = Manifest::new("t", 0);
        for &(base, last, size_bytes, max_timestamp_ms) in objects {
            manifest
                .add(ManifestObject {
                    key: format!("o{base}"),
                    base_offset: base,
                    last_offset: last,
                    records: u64::try_from(last - base + 1).unwrap(),
                    min_timestamp_ms: 0,
                    max_timestamp_ms,
                    size_bytes,
                })
                .unwrap();
        }
        manifest
    }

    #[test]
    fn time_expires_whole_objects_oldest_first() {
        let manifest = manifest(&[
            (0, 9, 100, 1_000),
            (10, 19, 100, 2_000),
            (20, 29, 100, 9_000),
        ]);
        let limits = RetentionLimits {
            retention_ms: Some(5_000),
            retention_bytes: None,
        };
        assert_eq!(plan_log_start(&manifest, limits, 0, 6_500, 30), Some(10));
        assert_eq!(plan_log_start(&manifest, limits, 0, 7_500, 30), Some(20));
        assert_eq!(
            plan_log_start(&manifest, limits, 0, 6_000, 30),
            None,
            "not older"
        );
        // Never past the bound, even when everything is old.
        assert_eq!(plan_log_start(&manifest, limits, 0, 99_000, 20), Some(20));
        assert_eq!(plan_log_start(&manifest, limits, 0, 99_000, 5), None);
    }

    #[test]
    fn size_counts_archive_and_unarchived_local_bytes() {
        let manifest = manifest(&[(0, 9, 100, 0), (10, 19, 100, 0), (20, 29, 100, 0)]);
        let limits = RetentionLimits {
            retention_ms: None,
            retention_bytes: Some(250),
        };
        // 300 archived: dropping one leaves 200 < 250, so nothing goes.
        assert_eq!(plan_log_start(&manifest, limits, 0, 0, 30), None);
        // 300 archived + 100 local: one object goes (300 left).
        assert_eq!(plan_log_start(&manifest, limits, 100, 0, 30), Some(10));
        assert_eq!(plan_log_start(&manifest, limits, 1_000, 0, 30), Some(30));
    }

    #[test]
    fn an_already_advanced_start_is_not_planned_again() {
        let mut manifest = manifest(&[(0, 9, 100, 0), (10, 19, 100, 0)]);
        let limits = RetentionLimits {
            retention_ms: Some(1),
            retention_bytes: None,
        };
        manifest.advance_log_start(10);
        assert_eq!(plan_log_start(&manifest, limits, 0, 100, 10), None);
        assert_eq!(plan_log_start(&manifest, limits, 0, 100, 20), Some(20));
    }
}
