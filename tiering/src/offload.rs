//! Offload: moving a partition's closed segments into the archive, one object at a time.
//!
//! [`plan_offload`] is a pure function: from the closed segments, the manifest's end and the
//! clock it picks the next offset range to archive, merging small segments into objects of
//! [`OffloadPolicy::object_bytes_target`] unless the data has waited long enough. Ranges always
//! end on a segment boundary, which is a batch boundary. [`offload_next`] then does the IO in the
//! order the manifest module states: read the segments, upload the object, commit the manifest.
//! Deleting the local segments is left to the log's retention, told what is archived
//! (`PartitionLog::enforce_retention(now, Some(archived_below))`), so nothing is deleted
//! before its object is committed.

use std::sync::Arc;

use silt_log::PartitionLog;
use silt_log::batch::BatchHeader;
use silt_log::batch::DecodeLimits;
use silt_log::retention::SegmentSummary;

use crate::error::{Result, TierError};
use crate::manifest::{Manifest, ManifestObject};
use crate::store::ArchiveStore;
use crate::write::ArchiveWriter;

/// Bytes read from the log per step while converting.
const READ_STEP_BYTES: usize = 4 << 20;

/// When and how much to archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadPolicy {
    /// Segments are merged until an object would hold at least this many bytes of batches.
    pub object_bytes_target: u64,
    /// A smaller object is written anyway once its newest data is this old, so quiet partitions
    /// still reach the archive (and `silt dev` shows files within minutes).
    pub max_wait_ms: u64,
}

impl Default for OffloadPolicy {
    /// Objects near 128 MiB of log bytes (Parquet with zstd is usually smaller), or whatever
    /// has waited ten minutes.
    fn default() -> Self {
        OffloadPolicy {
            object_bytes_target: 128 << 20,
            max_wait_ms: 10 * 60 * 1000,
        }
    }
}

/// The next range to archive: `base_offset..end_offset`, ending on a segment boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadRange {
    pub base_offset: u64,
    /// One past the last offset.
    pub end_offset: u64,
    /// Log bytes in the range.
    pub size_bytes: u64,
}

/// Picks the next range to archive, or `None` when nothing is due.
///
/// `archived_next` is where the archive continues (the manifest's next offset, or the log start
/// for a partition never archived); `closed` are the partition's closed segments; only data
/// below `high_watermark` (committed) is eligible.
pub fn plan_offload(
    closed: &[SegmentSummary],
    archived_next: u64,
    high_watermark: u64,
    policy: &OffloadPolicy,
    now_ms: i64,
) -> Option<OffloadRange> {
    let mut range: Option<OffloadRange> = None;
    let mut newest_ms = i64::MIN;
    for segment in closed {
        if segment.next_offset <= archived_next {
            continue;
        }
        if segment.next_offset > high_watermark || segment.next_offset == segment.base_offset {
            break;
        }
        let current = range.get_or_insert(OffloadRange {
            base_offset: segment.base_offset.max(archived_next),
            end_offset: segment.base_offset.max(archived_next),
            size_bytes: 0,
        });
        current.end_offset = segment.next_offset;
        current.size_bytes += segment.size_bytes;
        newest_ms = newest_ms.max(segment.max_timestamp);
        if current.size_bytes >= policy.object_bytes_target {
            return range;
        }
    }
    let range = range?;
    let waited = now_ms.saturating_sub(newest_ms);
    (waited >= 0 && waited as u64 >= policy.max_wait_ms).then_some(range)
}

/// Archives the next due range of `log` (if any) and commits it to `manifest`. Returns the
/// object committed. After it returns, the caller may let local retention delete below
/// `manifest.next_offset()`.
pub async fn offload_next(
    store: &ArchiveStore,
    log: &Arc<PartitionLog>,
    manifest: &mut Manifest,
    policy: &OffloadPolicy,
    now_ms: i64,
) -> Result<Option<ManifestObject>> {
    let archived_next = match manifest.next_offset() {
        Some(next) => u64::try_from(next).expect("manifest offsets are non-negative"),
        None => log.log_start_offset(),
    };
    let closed = log.closed_segments();
    let Some(range) = plan_offload(&closed, archived_next, log.high_watermark(), policy, now_ms)
    else {
        return Ok(None);
    };
    let object = archive_range(store, log, range).await?;
    crate::failpoint::hit(crate::failpoint::OFFLOAD_AFTER_UPLOAD);
    if manifest.next_offset().is_none() && object.base_offset > manifest.log_start_offset {
        // The first object of a partition whose oldest data predates the archive.
        manifest.log_start_offset = object.base_offset;
    }
    manifest.add(object.clone())?;
    manifest.commit(store).await?;
    crate::failpoint::hit(crate::failpoint::OFFLOAD_AFTER_COMMIT);
    Ok(Some(object))
}

/// Converts `range` of `log` into one archive object.
async fn archive_range(
    store: &ArchiveStore,
    log: &Arc<PartitionLog>,
    range: OffloadRange,
) -> Result<ManifestObject> {
    let to_i64 = |offset: u64| {
        i64::try_from(offset).map_err(|_| TierError::InvalidInput(format!("offset {offset}")))
    };
    let mut writer = ArchiveWriter::new(
        store.clone(),
        log.topic(),
        log.partition(),
        to_i64(range.base_offset)?,
        to_i64(range.end_offset - 1)?,
    )?
    // Whatever the log accepted, offload must read: a batch over the decoder's default limit
    // (`log.max_batch_bytes` raised) would otherwise fail this range on every retry.
    .with_limits(DecodeLimits {
        max_batch_bytes: log
            .max_batch_bytes()
            .max(DecodeLimits::default().max_batch_bytes),
        ..DecodeLimits::default()
    });
    let mut next = range.base_offset;
    while next < range.end_offset {
        let reader = Arc::clone(log);
        let read =
            match tokio::task::spawn_blocking(move || reader.read(next, READ_STEP_BYTES)).await {
                Ok(read) => read.map_err(|error| error.to_string()),
                // A panicked read fails this object like a read error: the writer aborts below.
                Err(join) => Err(format!("the read task did not finish: {join}")),
            };
        let slice = match read {
            Ok(slice) => slice,
            Err(error) => {
                writer.abort().await;
                return Err(TierError::InvalidInput(format!(
                    "reading offset {next} of {}/{}: {error}",
                    log.topic(),
                    log.partition()
                )));
            }
        };
        let mut pushed_any = false;
        let mut rest = &slice.bytes[..];
        // Only the headers are parsed here: `push_batch` checks each batch's CRC as it decodes
        // it, so the bytes are checksummed once.
        loop {
            let header = match BatchHeader::parse(rest) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(error) => {
                    writer.abort().await;
                    return Err(error.into());
                }
            };
            let total_len = header.total_len();
            if total_len > rest.len() {
                break;
            }
            let (bytes, tail) = rest.split_at(total_len);
            rest = tail;
            let last = u64::try_from(header.last_offset()).unwrap_or(0);
            if last < next {
                continue;
            }
            if last >= range.end_offset {
                break;
            }
            if let Err(error) = writer.push_batch(bytes).await {
                writer.abort().await;
                return Err(error);
            }
            pushed_any = true;
            next = last + 1;
        }
        if !pushed_any {
            writer.abort().await;
            return Err(TierError::InvalidInput(format!(
                "no batch at offset {next} of {}/{} below the planned end {}",
                log.topic(),
                log.partition(),
                range.end_offset
            )));
        }
    }
    writer.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(base: u64, next: u64, size_bytes: u64, max_timestamp: i64) -> SegmentSummary {
        SegmentSummary {
            base_offset: base,
            next_offset: next,
            size_bytes,
            max_timestamp,
        }
    }

    const POLICY: OffloadPolicy = OffloadPolicy {
        object_bytes_target: 100,
        max_wait_ms: 1_000,
    };

    #[test]
    fn small_segments_merge_until_the_target() {
        let closed = [
            segment(0, 10, 40, 5),
            segment(10, 20, 40, 6),
            segment(20, 30, 40, 7),
            segment(30, 40, 40, 8),
        ];
        let range = plan_offload(&closed, 0, 100, &POLICY, 10).unwrap();
        assert_eq!(
            (range.base_offset, range.end_offset, range.size_bytes),
            (0, 30, 120)
        );
        let range = plan_offload(&closed, 30, 100, &POLICY, 10);
        assert_eq!(range, None, "40 bytes, not old enough");
        let range = plan_offload(&closed, 30, 100, &POLICY, 1_008).unwrap();
        assert_eq!(
            (range.base_offset, range.end_offset),
            (30, 40),
            "old enough"
        );
        assert_eq!(
            plan_offload(&closed, 40, 100, &POLICY, 99_999),
            None,
            "all archived"
        );
    }

    #[test]
    fn only_committed_data_is_archived() {
        let closed = [segment(0, 10, 400, 5), segment(10, 20, 400, 6)];
        let range = plan_offload(&closed, 0, 15, &POLICY, 10).unwrap();
        assert_eq!(range.end_offset, 10);
        assert_eq!(plan_offload(&closed, 0, 5, &POLICY, 10), None);
    }

    #[test]
    fn a_partly_archived_segment_continues_where_the_archive_ends() {
        let closed = [segment(0, 10, 400, 5)];
        let range = plan_offload(&closed, 4, 100, &POLICY, 10).unwrap();
        assert_eq!((range.base_offset, range.end_offset), (4, 10));
    }

    #[test]
    fn a_range_starts_at_the_oldest_local_data_when_the_archive_is_behind_it() {
        let closed = [segment(50, 60, 400, 5)];
        let range = plan_offload(&closed, 0, 100, &POLICY, 10).unwrap();
        assert_eq!((range.base_offset, range.end_offset), (50, 60));
    }
}
