//! Compaction: merging runs of small archive objects into one, after offload wrote them.
//!
//! Offload merges closed segments up to the object target, but a partition with a slow trickle
//! (every object written because `max_wait_ms` expired) leaves many small objects, which cost
//! analytics engines a footer read each and the cold reader a GET each. Compaction rewrites a
//! run of them as one object.
//!
//! [`plan_compaction`] is pure: from the manifest and the clock it picks the first run of
//! adjacent objects that are each small (under [`CompactPolicy::small_bytes`]), old enough
//! (newest record at least [`CompactPolicy::min_age_ms`] old, so a trickle's fresh objects are
//! not merged now and again an interval later), wholly above the log start, and together within
//! [`CompactPolicy::object_bytes_target`]. A run is taken only if its largest object is at most
//! twice the rest together: an object is then rewritten only into one at least 1.5 times its
//! size, so a byte is rewritten at most log1.5(small / smallest) times, however slow the
//! trickle (with "at most the rest", two near-equal neighbours would never pair).
//!
//! [`compact_next`] does the IO in the manifest module's order:
//! 1. read the run's rows through [`ArchiveReader`] and write them with [`ArchiveWriter`] (the
//!    same row groups, zstd, page index, statistics and footer metadata as offload), under a
//!    fresh key, multipart when large;
//! 2. check the stored manifest is still the one planned from (else adopt it and plan again),
//!    then commit one manifest in which the merged object replaces exactly the run; the old keys
//!    move to `Manifest::replaced`, stamped with the commit time;
//! 3. delete the old objects at once and commit the manifest without them: analytics engines
//!    glob the archive (`v1/**/*.parquet`), and would count the rows of a replaced object
//!    twice while it stayed. A cold reader holding an older manifest finds an old object gone,
//!    reloads the manifest and reads the merged one (`cold.rs`); a query racing the deletion
//!    may fail and be run again, which beats a wrong answer.
//!
//! A crash after 1 leaves an unnamed object (garbage collection removes it after the grace); a
//! crash after 2 leaves the old objects in `replaced`, which garbage collection deletes at its
//! next pass. Either way every offset stays readable.

use std::ops::Range;

use bytes::BytesMut;
use silt_log::batch::BatchHeader;

use crate::error::{Result, TierError};
use crate::failpoint;
use crate::manifest::{Manifest, ManifestObject};
use crate::read::ArchiveReader;
use crate::retention::delete_object;
use crate::store::ArchiveStore;
use crate::write::ArchiveWriter;

/// Bytes of rebuilt batches read per step while merging, so memory stays bounded whatever
/// the objects' sizes.
const READ_STEP_BYTES: usize = 4 << 20;
/// How often a compaction plans again when the stored manifest changed under it.
const REPLAN_ATTEMPTS_MAX: usize = 3;

/// Which objects are merged, and into what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactPolicy {
    /// A merged object holds at most this many bytes (the sum of the objects it replaces).
    pub object_bytes_target: u64,
    /// Only objects smaller than this are merged.
    pub small_bytes: u64,
    /// Only objects whose newest record is at least this old are merged.
    pub min_age_ms: u64,
    /// At most this many objects go into one merged object, bounding one compaction's work.
    pub objects_max: usize,
}

/// Default minimum age, one hour: a trickle writes an object every `max_wait_ms` (ten minutes by
/// default), so its objects are merged about six at a time, hourly, not at every check.
pub const COMPACT_MIN_AGE_MS_DEFAULT: u64 = 60 * 60 * 1000;
/// Default bound on objects per merge.
pub const COMPACT_OBJECTS_MAX_DEFAULT: usize = 1_000;

impl CompactPolicy {
    /// The default policy for objects of `object_bytes_target`: small means under a quarter of it.
    pub fn for_target(object_bytes_target: u64) -> CompactPolicy {
        CompactPolicy {
            object_bytes_target,
            small_bytes: object_bytes_target / 4,
            min_age_ms: COMPACT_MIN_AGE_MS_DEFAULT,
            objects_max: COMPACT_OBJECTS_MAX_DEFAULT,
        }
    }
}

impl Default for CompactPolicy {
    /// Merged objects up to 128 MiB, of objects under 32 MiB at least an hour old.
    fn default() -> Self {
        CompactPolicy::for_target(128 << 20)
    }
}

/// A run of the manifest's objects to merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactPlan {
    /// Indices into `Manifest::objects`, at least two.
    pub run: Range<usize>,
    pub base_offset: i64,
    pub last_offset: i64,
    /// The run's objects' bytes together.
    pub size_bytes: u64,
}

/// What one compaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// The merged object, now in the manifest.
    pub merged: ManifestObject,
    /// Objects it replaced (now in `Manifest::replaced`).
    pub objects_replaced: u64,
    /// Their bytes together.
    pub bytes_replaced: u64,
}

/// The first run of `manifest`'s objects worth merging at `now_ms`, or `None`.
pub fn plan_compaction(
    manifest: &Manifest,
    policy: &CompactPolicy,
    now_ms: i64,
) -> Option<CompactPlan> {
    let objects = &manifest.objects;
    let eligible = |object: &ManifestObject| {
        let age = now_ms.saturating_sub(object.max_timestamp_ms);
        object.size_bytes < policy.small_bytes
            && object.base_offset >= manifest.log_start_offset
            && age >= 0
            && age as u64 >= policy.min_age_ms
    };
    let objects_max = policy.objects_max.max(2);
    for start in 0..objects.len() {
        if !eligible(&objects[start]) {
            continue;
        }
        let (mut end, mut size_bytes, mut largest) = (start, 0u64, 0u64);
        while end < objects.len()
            && end - start < objects_max
            && eligible(&objects[end])
            && size_bytes.saturating_add(objects[end].size_bytes) <= policy.object_bytes_target
        {
            size_bytes += objects[end].size_bytes;
            largest = largest.max(objects[end].size_bytes);
            end += 1;
        }
        if end - start >= 2 && largest <= (size_bytes - largest).saturating_mul(2) {
            return Some(CompactPlan {
                run: start..end,
                base_offset: objects[start].base_offset,
                last_offset: objects[end - 1].last_offset,
                size_bytes,
            });
        }
    }
    None
}

/// Merges the first run [`plan_compaction`] picks (if any) into one object and commits it to
/// `manifest`, which must be the partition's committed manifest. Returns what was merged.
///
/// If the stored manifest is no longer `manifest` (another writer committed), `manifest`
/// becomes the stored one, the merged upload is deleted, and the run is planned again.
pub async fn compact_next(
    store: &ArchiveStore,
    manifest: &mut Manifest,
    policy: &CompactPolicy,
    now_ms: i64,
) -> Result<Option<Compacted>> {
    for _ in 0..REPLAN_ATTEMPTS_MAX {
        let Some(plan) = plan_compaction(manifest, policy, now_ms) else {
            return Ok(None);
        };
        let run = &manifest.objects[plan.run.clone()];
        let merged = merge(store, &manifest.topic, manifest.partition, run).await?;
        failpoint::hit(failpoint::COMPACT_AFTER_UPLOAD);
        // Object stores offer no portable compare-and-swap (a `file://` store has none), and
        // one task per partition commits its manifest; this check catches a second writer in
        // all but a narrow window, which is all it can do.
        let stored = Manifest::load(store, &manifest.topic, manifest.partition).await?;
        if stored.as_ref() != Some(&*manifest) {
            tracing::warn!(
                topic = %manifest.topic,
                partition = manifest.partition,
                generation = manifest.generation,
                "the manifest changed under a compaction; planning again"
            );
            delete_object(store, &merged.key).await?;
            *manifest =
                stored.unwrap_or_else(|| Manifest::new(&manifest.topic, manifest.partition));
            continue;
        }
        let before = manifest.clone();
        manifest.replace(plan.run.clone(), merged.clone(), now_ms)?;
        if let Err(error) = manifest.commit(store).await {
            // The store may or may not hold the new manifest; the next compaction's check (or
            // the caller's reload) finds out. The merged object is left to garbage collection.
            *manifest = before;
            return Err(error);
        }
        failpoint::hit(failpoint::COMPACT_AFTER_COMMIT);
        if let Err(error) = crate::gc::delete_replaced(store, manifest).await {
            tracing::warn!(
                topic = %manifest.topic,
                partition = manifest.partition,
                %error,
                "cannot delete the objects a compaction replaced yet; garbage collection will"
            );
        }
        return Ok(Some(Compacted {
            merged,
            objects_replaced: plan.run.len() as u64,
            bytes_replaced: plan.size_bytes,
        }));
    }
    Ok(None)
}

/// Writes `run`'s rows, in offset order, as one new object.
async fn merge(
    store: &ArchiveStore,
    topic: &str,
    partition: u32,
    run: &[ManifestObject],
) -> Result<ManifestObject> {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return Err(TierError::InvalidInput("an empty compaction run".into()));
    };
    let mut writer = ArchiveWriter::new(
        store.clone(),
        topic,
        partition,
        first.base_offset,
        last.last_offset,
    )?;
    for object in run {
        if let Err(error) = copy_object(store, object, &mut writer).await {
            writer.abort().await;
            return Err(error);
        }
    }
    writer.finish().await
}

/// Pushes every record of `object` into `writer`, as the batches the reader rebuilds (the
/// producer's fields, sequences, timestamps and compression of the original batches).
async fn copy_object(
    store: &ArchiveStore,
    object: &ManifestObject,
    writer: &mut ArchiveWriter,
) -> Result<()> {
    let corrupt = |why: String| TierError::Corrupt {
        key: object.key.clone(),
        why,
    };
    let reader = ArchiveReader::open(store, &object.key, Some(object.size_bytes)).await?;
    let info = reader.info();
    if (info.base_offset, info.last_offset) != (object.base_offset, object.last_offset) {
        return Err(corrupt(format!(
            "its footer says offsets {}..={}, the manifest {}..={}",
            info.base_offset, info.last_offset, object.base_offset, object.last_offset
        )));
    }
    // One cursor over the whole object: each row is decoded once, whatever the steps.
    let mut cursor = reader.cursor(object.base_offset)?;
    let mut step = BytesMut::new();
    while !cursor.is_done() {
        let next = cursor.next_offset();
        step.clear();
        cursor.read_into(READ_STEP_BYTES, &mut step).await?;
        if cursor.next_offset() <= next {
            return Err(corrupt(format!("no records at offset {next}")));
        }
        let mut rest = &step[..];
        while let Some(header) = BatchHeader::parse(rest)? {
            let total_len = header.total_len();
            if total_len > rest.len() {
                return Err(corrupt(format!(
                    "a rebuilt batch at offset {} is cut short",
                    header.base_offset
                )));
            }
            let (batch, tail) = rest.split_at(total_len);
            writer.push_batch(batch).await?;
            rest = tail;
        }
        if writer.next_offset() != cursor.next_offset() {
            return Err(corrupt(format!(
                "read up to offset {}, merged up to {}",
                cursor.next_offset(),
                writer.next_offset()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(objects: &[(u64, i64)]) -> Manifest {
        let mut manifest = Manifest::new("t", 0);
        for (index, &(size_bytes, max_timestamp_ms)) in objects.iter().enumerate() {
            let base = index as i64 * 10;
            manifest
                .add(ManifestObject {
                    key: format!("o{base}"),
                    base_offset: base,
                    last_offset: base + 9,
                    records: 10,
                    min_timestamp_ms: 0,
                    max_timestamp_ms,
                    size_bytes,
                })
                .unwrap();
        }
        manifest
    }

    const POLICY: CompactPolicy = CompactPolicy {
        object_bytes_target: 100,
        small_bytes: 25,
        min_age_ms: 1_000,
        objects_max: 5,
    };

    #[test]
    fn small_old_neighbours_merge_up_to_the_target() {
        let manifest = manifest(&[(10, 0), (10, 0), (10, 0), (10, 0), (10, 0), (10, 0)]);
        let plan = plan_compaction(&manifest, &POLICY, 5_000).unwrap();
        assert_eq!(plan.run, 0..5, "objects_max bounds one merge");
        assert_eq!(
            (plan.base_offset, plan.last_offset, plan.size_bytes),
            (0, 49, 50)
        );
        let many = self::manifest(&[(20, 0); 8]);
        let plan = plan_compaction(&many, &POLICY, 5_000).unwrap();
        assert_eq!(plan.run, 0..5, "20 * 5 = 100 fits the target");
        let policy = CompactPolicy {
            object_bytes_target: 50,
            ..POLICY
        };
        assert_eq!(plan_compaction(&many, &policy, 5_000).unwrap().run, 0..2);
    }

    #[test]
    fn large_young_and_lone_objects_stay() {
        let young = manifest(&[(10, 0), (10, 4_500), (10, 4_600)]);
        assert_eq!(
            plan_compaction(&young, &POLICY, 5_000),
            None,
            "one old object"
        );
        assert_eq!(plan_compaction(&young, &POLICY, 5_600).unwrap().run, 0..3);
        let split = manifest(&[(10, 0), (30, 0), (10, 0), (30, 0), (10, 0), (10, 0)]);
        assert_eq!(
            plan_compaction(&split, &POLICY, 5_000).unwrap().run,
            4..6,
            "runs never span a large object"
        );
        let future = manifest(&[(10, 9_000), (10, 9_000)]);
        assert_eq!(plan_compaction(&future, &POLICY, 5_000), None);
    }

    #[test]
    fn an_object_is_only_rewritten_into_one_half_again_its_size() {
        let lopsided = manifest(&[(24, 0), (5, 0), (5, 0)]);
        let plan = plan_compaction(&lopsided, &POLICY, 5_000).unwrap();
        assert_eq!(plan.run, 1..3, "24 is more than twice 5 + 5: it waits");
        let even = manifest(&[(20, 0), (5, 0), (5, 0)]);
        assert_eq!(plan_compaction(&even, &POLICY, 5_000).unwrap().run, 0..3);
        let pair = manifest(&[(11, 0), (10, 0)]);
        assert_eq!(plan_compaction(&pair, &POLICY, 5_000).unwrap().run, 0..2);
    }

    #[test]
    fn partly_expired_objects_stay() {
        let mut manifest = manifest(&[(10, 0), (10, 0), (10, 0)]);
        manifest.log_start_offset = 5;
        assert_eq!(
            plan_compaction(&manifest, &POLICY, 5_000).unwrap().run,
            1..3
        );
    }
}
