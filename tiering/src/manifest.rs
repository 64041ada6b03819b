//! The manifest: per partition, the list of archived objects with their offset and time
//! ranges. It is the single source of truth for the cold tier (DESIGN.md).
//!
//! # Ordering rules
//! 1. An object is uploaded under a fresh key ([`crate::ArchiveWriter`]).
//! 2. Then the manifest naming it is committed (one PUT of the whole manifest, which object
//!    stores make atomic: readers see the old manifest or the new one, never a mix).
//! 3. Only then may local retention delete the segments the object holds.
//!
//! A crash between 1 and 2 leaves an object no manifest names: garbage collection removes it
//! after a grace period. A crash between 2 and 3 leaves the data in both tiers, which is
//! harmless: the next offload finds the range already archived. Expiry runs the other way: the
//! log start offset advances in the manifest (committed) *before* any object is deleted, so a
//! reader sees either the data or OFFSET_OUT_OF_RANGE, never a missing object.
//!
//! Compaction replaces a run of adjacent objects by one merged object in one commit
//! ([`Manifest::replace`]): the merged object is uploaded under a fresh key first, and the
//! replaced objects move to `replaced` with the time of the commit. Compaction deletes them
//! right after that commit (analytics engines glob the archive and would count their rows
//! twice), and garbage collection finishes what a crash interrupted; a reader holding an older
//! manifest that finds one gone reloads the manifest and retries.
//!
//! Readers never LIST the bucket: the manifest's key is computed from topic and partition, and
//! it names every object with its size.

use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TierError};
use crate::store::ArchiveStore;

/// Version of the manifest's JSON layout.
pub const MANIFEST_FORMAT: u32 = 1;
/// Largest manifest accepted when loading, so a corrupt or hostile object cannot make a node
/// allocate without bound. At about 250 bytes per object this is some 250,000 objects, tens of
/// terabytes of archive per partition.
pub const MANIFEST_BYTES_MAX: usize = 64 << 20;

/// One archived object, as the writer reports it and the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestObject {
    /// Key in the store, prefix included.
    pub key: String,
    /// Offset of the first record.
    pub base_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// Records in the object: `last_offset - base_offset + 1`.
    pub records: u64,
    /// Smallest and largest record timestamp, in milliseconds.
    pub min_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    /// Size of the object in bytes, so readers open it without a HEAD request.
    pub size_bytes: u64,
}

/// One partition's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub topic: String,
    pub partition: u32,
    /// Bumped by every commit; tells two versions apart in logs and tests.
    pub generation: u64,
    /// The first offset readers may ask for: everything below is expired, even while its
    /// objects still await deletion.
    pub log_start_offset: i64,
    /// Archived objects in offset order, contiguous, none wholly below `log_start_offset`.
    pub objects: Vec<ManifestObject>,
    /// Objects expired from the manifest whose deletion is still owed (a crash may interrupt
    /// it); deleting them is idempotent.
    pub expired: Vec<String>,
    /// Objects a compaction replaced by a merged one: no longer named for reading, and owed a
    /// deletion (compaction's own right after its commit, or garbage collection's after a
    /// crash). Absent from the JSON while empty, so manifests without compaction keep their
    /// bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<ReplacedObject>,
}

/// An object a compaction took out of the manifest, awaiting deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedObject {
    /// Key in the store, prefix included.
    pub key: String,
    /// When the manifest without it was committed, in milliseconds since the epoch.
    pub replaced_ms: i64,
}

impl Manifest {
    /// An empty manifest.
    pub fn new(topic: &str, partition: u32) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            topic: topic.to_string(),
            partition,
            generation: 0,
            log_start_offset: 0,
            objects: Vec::new(),
            expired: Vec::new(),
            replaced: Vec::new(),
        }
    }

    /// The key of `topic`/`partition`'s manifest, relative to the store's prefix. It sits
    /// beside the Hive tree, not in it, so engines globbing `v1/**/*.parquet` never see it.
    pub fn key(topic: &str, partition: u32) -> String {
        format!("_manifests/v1/topic={topic}/partition={partition}.json")
    }

    /// Offset after the last archived record, or `None` when nothing is archived.
    pub fn next_offset(&self) -> Option<i64> {
        self.objects.last().map(|object| object.last_offset + 1)
    }

    /// Records `object`, which must continue the archive exactly where it ends (or start it).
    pub fn add(&mut self, object: ManifestObject) -> Result<()> {
        if object.last_offset < object.base_offset
            || u64::try_from(object.last_offset - object.base_offset + 1) != Ok(object.records)
        {
            return Err(TierError::InvalidInput(format!(
                "object {} claims offsets {}..={} and {} records",
                object.key, object.base_offset, object.last_offset, object.records
            )));
        }
        match self.next_offset() {
            Some(next) if object.base_offset != next => {
                return Err(TierError::InvalidInput(format!(
                    "object {} starts at offset {}, the archive continues at {next}",
                    object.key, object.base_offset
                )));
            }
            None if object.base_offset < self.log_start_offset => {
                return Err(TierError::InvalidInput(format!(
                    "object {} starts at offset {}, below the log start offset {}",
                    object.key, object.base_offset, self.log_start_offset
                )));
            }
            _ => {}
        }
        self.objects.push(object);
        Ok(())
    }

    /// The object holding `offset`, if it is archived and not expired.
    pub fn find(&self, offset: i64) -> Option<&ManifestObject> {
        if offset < self.log_start_offset {
            return None;
        }
        let index = self
            .objects
            .partition_point(|object| object.last_offset < offset);
        self.objects
            .get(index)
            .filter(|object| object.base_offset <= offset)
    }

    /// Moves the log start offset up to `offset` (never down). Objects wholly below it leave
    /// `objects` for `expired`; the caller commits this manifest, then deletes them, then
    /// commits again with [`Manifest::forget_expired`].
    pub fn advance_log_start(&mut self, offset: i64) {
        if offset <= self.log_start_offset {
            return;
        }
        self.log_start_offset = offset;
        let keep_from = self
            .objects
            .partition_point(|object| object.last_offset < offset);
        self.expired
            .extend(self.objects.drain(..keep_from).map(|object| object.key));
    }

    /// Drops `deleted` keys from the expired list once their objects are gone.
    pub fn forget_expired(&mut self, deleted: &[String]) {
        self.expired.retain(|key| !deleted.contains(key));
    }

    /// Replaces the objects at `run` (indices into `objects`, at least two) by `merged`, which
    /// must hold exactly their offsets. Their keys move to `replaced`, stamped `now_ms`; the
    /// caller commits. Nothing changes on error.
    pub fn replace(
        &mut self,
        run: std::ops::Range<usize>,
        merged: ManifestObject,
        now_ms: i64,
    ) -> Result<()> {
        let invalid = |why: String| Err(TierError::InvalidInput(why));
        if run.len() < 2 || run.end > self.objects.len() {
            return invalid(format!(
                "cannot replace objects {run:?} of {}",
                self.objects.len()
            ));
        }
        let first = &self.objects[run.start];
        let last = &self.objects[run.end - 1];
        let records: u64 = self.objects[run.clone()].iter().map(|o| o.records).sum();
        if merged.base_offset != first.base_offset
            || merged.last_offset != last.last_offset
            || merged.records != records
            || u64::try_from(merged.last_offset - merged.base_offset + 1) != Ok(merged.records)
        {
            return invalid(format!(
                "merged object {} holds offsets {}..={} ({} records), the objects it replaces {}..={} ({records})",
                merged.key,
                merged.base_offset,
                merged.last_offset,
                merged.records,
                first.base_offset,
                last.last_offset
            ));
        }
        if self.objects.iter().any(|object| object.key == merged.key)
            || self.replaced.iter().any(|old| old.key == merged.key)
        {
            return invalid(format!("merged object {} reuses a key", merged.key));
        }
        let replaced: Vec<ManifestObject> =
            self.objects.splice(run, std::iter::once(merged)).collect();
        self.replaced
            .extend(replaced.into_iter().map(|object| ReplacedObject {
                key: object.key,
                replaced_ms: now_ms,
            }));
        Ok(())
    }

    /// Drops `deleted` keys from the replaced list once their objects are gone.
    pub fn forget_replaced(&mut self, deleted: &[String]) {
        self.replaced.retain(|old| !deleted.contains(&old.key));
    }

    /// Archived bytes the manifest names.
    pub fn archived_bytes(&self) -> u64 {
        self.objects.iter().map(|object| object.size_bytes).sum()
    }

    /// Loads `topic`/`partition`'s manifest; `None` when the partition has never been archived.
    pub async fn load(
        store: &ArchiveStore,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Manifest>> {
        let key = store.key(&Manifest::key(topic, partition));
        let result = match store.store().get(&key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let corrupt = |why: String| TierError::Corrupt {
            key: key.to_string(),
            why,
        };
        if result.meta.size > MANIFEST_BYTES_MAX as u64 {
            return Err(corrupt(format!(
                "{} bytes, over the {MANIFEST_BYTES_MAX}-byte limit",
                result.meta.size
            )));
        }
        let bytes = result.bytes().await?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|error| corrupt(error.to_string()))?;
        manifest.check().map_err(corrupt)?;
        if manifest.topic != topic || manifest.partition != partition {
            return Err(corrupt(format!(
                "it names {}/{}",
                manifest.topic, manifest.partition
            )));
        }
        Ok(Some(manifest))
    }

    /// Writes this manifest as the new version, bumping its generation. One PUT: atomic.
    pub async fn commit(&mut self, store: &ArchiveStore) -> Result<()> {
        self.check().map_err(TierError::InvalidInput)?;
        self.generation += 1;
        let bytes = serde_json::to_vec(self).expect("a manifest always serializes");
        let key = store.key(&Manifest::key(&self.topic, self.partition));
        if let Err(error) = store.store().put(&key, PutPayload::from(bytes)).await {
            self.generation -= 1;
            return Err(error.into());
        }
        Ok(())
    }

    /// The invariants every loaded or committed manifest keeps.
    fn check(&self) -> std::result::Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is not {MANIFEST_FORMAT}",
                self.format
            ));
        }
        if self.log_start_offset < 0 {
            return Err(format!("log start offset {}", self.log_start_offset));
        }
        let mut next: Option<i64> = None;
        for object in &self.objects {
            if object.last_offset < object.base_offset
                || u64::try_from(object.last_offset - object.base_offset + 1) != Ok(object.records)
            {
                return Err(format!("object {} has a bad offset range", object.key));
            }
            if next.is_some_and(|next| next != object.base_offset) {
                return Err(format!("object {} breaks the offset sequence", object.key));
            }
            next = Some(object.last_offset + 1);
        }
        if let Some(old) = self
            .replaced
            .iter()
            .find(|old| self.objects.iter().any(|object| object.key == old.key))
        {
            return Err(format!("object {} is both named and replaced", old.key));
        }
        if let Some(first) = self.objects.first()
            && first.last_offset < self.log_start_offset
        {
            return Err(format!(
                "object {} is wholly below the log start offset",
                first.key
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(base: i64, last: i64) -> ManifestObject {
        ManifestObject {
            key: format!("o{base}"),
            base_offset: base,
            last_offset: last,
            records: u64::try_from(last - base + 1).unwrap(),
            min_timestamp_ms: base,
            max_timestamp_ms: last,
            size_bytes: 100,
        }
    }

    #[test]
    fn objects_must_continue_the_archive() {
        let mut manifest = Manifest::new("t", 0);
        manifest.add(object(10, 19)).unwrap();
        manifest.add(object(20, 29)).unwrap();
        assert!(manifest.add(object(31, 40)).is_err(), "a gap");
        assert!(manifest.add(object(25, 40)).is_err(), "an overlap");
        let mut bad = object(30, 39);
        bad.records = 3;
        assert!(manifest.add(bad).is_err(), "a wrong record count");
        assert_eq!(manifest.next_offset(), Some(30));
        assert_eq!(manifest.find(9), None);
        assert_eq!(manifest.find(10).unwrap().key, "o10");
        assert_eq!(manifest.find(29).unwrap().key, "o20");
        assert_eq!(manifest.find(30), None);
    }

    #[test]
    fn the_log_start_moves_before_objects_are_deleted() {
        let mut manifest = Manifest::new("t", 0);
        for base in (0..50).step_by(10) {
            manifest.add(object(base, base + 9)).unwrap();
        }
        manifest.advance_log_start(25);
        assert_eq!(manifest.log_start_offset, 25);
        assert_eq!(manifest.expired, ["o0", "o10"]);
        assert_eq!(
            manifest.find(24),
            None,
            "expired offsets read as out of range"
        );
        assert_eq!(manifest.find(25).unwrap().key, "o20");
        manifest.advance_log_start(5);
        assert_eq!(manifest.log_start_offset, 25, "never moves down");
        manifest.forget_expired(&["o0".to_string()]);
        assert_eq!(manifest.expired, ["o10"]);
        manifest.check().unwrap();
    }

    #[test]
    fn a_replace_swaps_exactly_the_run_and_keeps_the_old_keys() {
        let mut manifest = Manifest::new("t", 0);
        for base in (0..40).step_by(10) {
            manifest.add(object(base, base + 9)).unwrap();
        }
        let mut merged = object(10, 29);
        merged.key = "m".into();
        let before = manifest.clone();
        assert!(manifest.replace(1..3, object(10, 28), 5).is_err(), "short");
        assert!(
            manifest.replace(1..2, object(10, 19), 5).is_err(),
            "one object"
        );
        let mut reused = merged.clone();
        reused.key = "o0".into();
        assert!(manifest.replace(1..3, reused, 5).is_err(), "a named key");
        assert_eq!(manifest, before, "nothing changes on error");
        manifest.replace(1..3, merged, 5).unwrap();
        let keys: Vec<&str> = manifest.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["o0", "m", "o30"]);
        assert_eq!(
            manifest.replaced,
            [
                ReplacedObject {
                    key: "o10".into(),
                    replaced_ms: 5
                },
                ReplacedObject {
                    key: "o20".into(),
                    replaced_ms: 5
                },
            ]
        );
        manifest.check().unwrap();
        assert_eq!(manifest.find(25).unwrap().key, "m");
        let json = serde_json::to_string(&manifest).unwrap();
        assert!(json.ends_with(r#""expired":[],"replaced":[{"key":"o10","replaced_ms":5},{"key":"o20","replaced_ms":5}]}"#), "{json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
        manifest.forget_replaced(&["o10".to_string()]);
        assert_eq!(manifest.replaced.len(), 1);
    }

    #[test]
    fn the_json_layout_is_pinned() {
        let mut manifest = Manifest::new("mqtt", 1);
        manifest.add(object(0, 9)).unwrap();
        assert_eq!(
            serde_json::to_string(&manifest).unwrap(),
            r#"{"format":1,"topic":"mqtt","partition":1,"generation":0,"log_start_offset":0,"objects":[{"key":"o0","base_offset":0,"last_offset":9,"records":10,"min_timestamp_ms":0,"max_timestamp_ms":9,"size_bytes":100}],"expired":[]}"#
        );
        assert_eq!(
            Manifest::key("mqtt", 1),
            "_manifests/v1/topic=mqtt/partition=1.json"
        );
    }
}
