//! Compaction against a real log and a real `file://` store: a partition offloaded as many small
//! objects becomes a few; every offset reads back the same through `ColdReader` and
//! `ArchiveReader`, including a cold reader holding the manifest from before; DuckDB over the
//! manifest's objects sees the same rows; the replaced objects are deleted at once, leaving
//! exactly the manifest's objects for engines that glob the archive.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, DecodedRecord, Header, Record, batches, decode_records,
    encode_batch,
};
use silt_log::{LogConfig, LogManager, PartitionLog, TopicConfig};
use silt_tiering::{
    ArchiveReader, ArchiveStore, ColdConfig, ColdReader, CompactPolicy, GcPolicy, Manifest,
    OffloadPolicy, compact_next, gc, offload_next,
};

const TOPIC: &str = "trickle";
const ROUNDS: i64 = 60;
const RECORDS_PER_ROUND: i64 = 5;

/// Record timestamps: round `r` is `r` minutes after this, which is the wall clock's time less
/// three hours and the rounds, so every object is past the minimum age now. Compaction and
/// garbage collection use the wall clock, as a node does (the grace is measured from the
/// compaction's commit).
fn t0_ms() -> i64 {
    static T0_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0_MS.get_or_init(|| silt_log::now_ms() - ROUNDS * 60_000 - 3 * 3_600_000)
}

const COMPACT: CompactPolicy = CompactPolicy {
    object_bytes_target: 32 << 10,
    small_bytes: 16 << 10,
    min_age_ms: 3_600_000,
    objects_max: 100,
};

fn record(offset: i64) -> Record {
    let round = offset / RECORDS_PER_ROUND;
    Record {
        timestamp: t0_ms() + round * 60_000 + offset % RECORDS_PER_ROUND,
        key: (offset % 7 != 0).then(|| Bytes::from(format!("sensor-{}", offset % 7))),
        value: Some(Bytes::from(format!("{offset:08}:{}", "x".repeat(200)))),
        headers: vec![Header {
            key: "n".into(),
            value: (offset % 3 != 0).then(|| Bytes::from(offset.to_string())),
        }],
    }
}

/// A partition whose closed segments (2 KiB each) are archived one object per segment, as a
/// slow trickle with `max_wait_ms` expiring leaves them.
async fn trickled(
    dir: &Path,
    store: &ArchiveStore,
) -> (Arc<LogManager>, Arc<PartitionLog>, Manifest) {
    let mut config = LogConfig::new(dir.join("data"));
    config.fs_reserve_bytes = 0;
    config.topic_defaults = TopicConfig::default()
        .with_overrides(
            [("segment.bytes", "2048")]
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect::<BTreeMap<_, _>>()
                .iter(),
        )
        .unwrap();
    let manager = LogManager::open(config).unwrap();
    manager.ensure_topic(TOPIC, 1).unwrap();
    let log = manager.partition(TOPIC, 0).unwrap();
    for round in 0..ROUNDS {
        let records: Vec<Record> = (0..RECORDS_PER_ROUND)
            .map(|n| record(round * RECORDS_PER_ROUND + n))
            .collect();
        let spec = BatchSpec {
            compression: if round % 2 == 0 {
                Compression::Zstd
            } else {
                Compression::None
            },
            producer_id: 42,
            producer_epoch: 3,
            base_sequence: i32::try_from(round * RECORDS_PER_ROUND).unwrap(),
            ..BatchSpec::default()
        };
        let mut batch = BytesMut::new();
        encode_batch(&spec, &records, &mut batch).unwrap();
        log.append(&mut batch).unwrap();
    }
    let mut manifest = Manifest::new(TOPIC, 0);
    let policy = OffloadPolicy {
        object_bytes_target: 1,
        max_wait_ms: 0,
    };
    while offload_next(store, &log, &mut manifest, &policy, silt_log::now_ms())
        .await
        .unwrap()
        .is_some()
    {}
    (manager, log, manifest)
}

fn decoded(bytes: &[u8]) -> Vec<DecodedRecord> {
    batches(bytes, usize::MAX)
        .flat_map(|item| {
            let (header, batch) = item.unwrap();
            decode_records(&header, batch, &DecodeLimits::default()).unwrap()
        })
        .collect()
}

/// What a consumer sees of one record, with the producer fields of its batch.
type Seen = (i64, Option<Bytes>, Option<Bytes>, i64, Vec<Header>);

fn seen(record: DecodedRecord) -> Seen {
    (
        record.offset,
        record.key,
        record.value,
        record.timestamp,
        record.headers,
    )
}

fn produced(offset: i64) -> Seen {
    let want = record(offset);
    (offset, want.key, want.value, want.timestamp, want.headers)
}

/// Every archived offset through `cold`, from `from` to `end`.
async fn replay(cold: &Arc<ColdReader>, from: i64, end: i64) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut next = from;
    while next < end {
        let read = cold.read(TOPIC, 0, next, 3_000).await.unwrap();
        assert!(read.next_offset > next, "no progress at {next}");
        out.extend(
            decoded(&read.batches)
                .into_iter()
                .filter(|record| record.offset >= next)
                .map(seen),
        );
        next = read.next_offset;
    }
    out
}

/// Every offset of every object of `manifest`, each object through its own `ArchiveReader`,
/// whose footer must agree with the manifest.
async fn read_objects(store: &ArchiveStore, manifest: &Manifest) -> Vec<Seen> {
    let mut out = Vec::new();
    for object in &manifest.objects {
        let reader = ArchiveReader::open(store, &object.key, Some(object.size_bytes))
            .await
            .unwrap();
        let info = reader.info();
        assert_eq!(
            (
                info.topic.as_str(),
                info.partition,
                info.base_offset,
                info.last_offset,
                info.records,
                info.min_timestamp_ms,
                info.max_timestamp_ms
            ),
            (
                TOPIC,
                0,
                object.base_offset,
                object.last_offset,
                object.records,
                object.min_timestamp_ms,
                object.max_timestamp_ms
            ),
            "{}",
            object.key
        );
        let mut next = object.base_offset;
        while next <= object.last_offset {
            let read = reader.read(next, 2_000).await.unwrap();
            // Batches rebuilt from a merged object carry the producer's fields unchanged.
            for item in batches(&read.batches, usize::MAX) {
                let (header, _) = item.unwrap();
                assert_eq!((header.producer_id, header.producer_epoch), (42, 3));
                assert_eq!(
                    i64::from(header.base_sequence),
                    header.base_offset,
                    "sequences follow offsets here"
                );
            }
            out.extend(decoded(&read.batches).into_iter().map(seen));
            next = read.next_offset;
        }
    }
    out
}

async fn listed(store: &ArchiveStore) -> BTreeSet<String> {
    let prefix = store.key(&gc::partition_dir(TOPIC, 0));
    store
        .store()
        .list(Some(&prefix))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

fn keys(manifest: &Manifest) -> BTreeSet<String> {
    manifest.objects.iter().map(|o| o.key.clone()).collect()
}

/// The venv's Python: `SILT_PYTHON`, else `<workspace>/.venv/bin/python`.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("SILT_PYTHON") {
        return path.into();
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// DuckDB over exactly the manifest's objects: row count, min and max offset, distinct offsets.
fn duckdb_view(root: &Path, manifest: &Manifest) -> serde_json::Value {
    let files: Vec<String> = manifest
        .objects
        .iter()
        .map(|object| root.join(&object.key).display().to_string())
        .collect();
    let script = r#"
import json, sys, duckdb
files = json.loads(sys.argv[1])
row = duckdb.connect().execute(
    'select count(*), min("offset"), max("offset"), count(distinct "offset"), '
    'sum(octet_length(value)) from read_parquet(?)', [files]).fetchone()
print(json.dumps(list(row)))
"#;
    let output = Command::new(python())
        .args(["-c", script])
        .arg(serde_json::to_string(&files).unwrap())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_small_objects_become_few_and_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    std::fs::create_dir_all(&root).unwrap();
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let (manager, _log, mut manifest) = trickled(dir.path(), &store).await;
    let before = manifest.clone();
    let sizes: Vec<u64> = before.objects.iter().map(|o| o.size_bytes).collect();
    assert!(before.objects.len() >= 20, "{sizes:?}");
    let end = manifest.next_offset().unwrap();
    let want: Vec<Seen> = (0..end).map(produced).collect();

    // A reader that caches the manifest from before, with no chunk cache to hide deletions.
    let stale = ColdReader::new(
        store.clone(),
        ColdConfig {
            cache_bytes: 0,
            ..ColdConfig::default()
        },
    );
    assert_eq!(replay(&stale, 0, end).await, want);
    let duckdb_before = duckdb_view(&root, &before);
    assert_eq!(duckdb_before[0], end);
    assert_eq!(duckdb_before[3], end);

    let mut compactions = 0;
    let mut replaced_total = 0;
    while let Some(done) = compact_next(&store, &mut manifest, &COMPACT, silt_log::now_ms())
        .await
        .unwrap()
    {
        compactions += 1;
        replaced_total += done.objects_replaced;
        assert!(done.objects_replaced >= 2);
        assert!(done.bytes_replaced <= COMPACT.object_bytes_target);
        assert!(compactions < 50, "compaction must converge");
    }
    let after = manifest.clone();
    assert!(
        after.objects.len() <= 4 && after.objects.len() * 4 <= before.objects.len(),
        "{} objects became {}",
        before.objects.len(),
        after.objects.len()
    );
    assert_eq!(after.next_offset(), Some(end));
    assert_eq!(after.objects[0].base_offset, before.objects[0].base_offset);
    assert_eq!(
        Manifest::load(&store, TOPIC, 0).await.unwrap().as_ref(),
        Some(&after),
        "committed, contiguous (load checks)"
    );
    let old_keys = keys(&before);
    assert!(
        keys(&after).is_disjoint(&old_keys),
        "merged objects get new keys"
    );
    // The replaced objects are gone at once: the store holds exactly the manifest's objects,
    // so a query globbing the archive counts every row once.
    assert!(after.replaced.is_empty(), "{:?}", after.replaced);
    assert!(replaced_total >= old_keys.len() as u64);
    let everything: BTreeSet<String> = listed(&store).await;
    assert_eq!(everything, keys(&after));
    let report = gc::collect(
        &store,
        &mut manifest,
        &GcPolicy::default(),
        silt_log::now_ms(),
    )
    .await
    .unwrap();
    assert_eq!(
        (report.replaced_deleted, report.orphans_deleted),
        (0, 0),
        "nothing left for garbage collection"
    );
    assert_eq!(listed(&store).await, everything);

    // The same records through a fresh cold reader, each object's reader, and DuckDB.
    let fresh = ColdReader::new(store.clone(), ColdConfig::default());
    assert_eq!(replay(&fresh, 0, end).await, want);
    assert_eq!(read_objects(&store, &after).await, want);
    assert_eq!(duckdb_view(&root, &after), duckdb_before);

    assert_eq!(
        Manifest::load(&store, TOPIC, 0).await.unwrap().as_ref(),
        Some(&manifest)
    );

    // The stale reader finds its objects gone, reloads the manifest and reads the same.
    let loads = stale.stats().manifest_loads;
    assert_eq!(replay(&stale, 0, end).await, want);
    assert!(
        stale.stats().manifest_loads > loads,
        "the stale reader reloaded the manifest"
    );
    assert_eq!(
        compact_next(&store, &mut manifest, &COMPACT, silt_log::now_ms())
            .await
            .unwrap(),
        None,
        "nothing left to merge"
    );
    manager.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_changed_underneath_is_adopted_and_planned_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    std::fs::create_dir_all(&root).unwrap();
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let (manager, _log, mut manifest) = trickled(dir.path(), &store).await;
    // Another writer moves the log start past the first three objects and commits.
    let mut other = manifest.clone();
    other.advance_log_start(other.objects[3].base_offset);
    other.commit(&store).await.unwrap();

    let done = compact_next(&store, &mut manifest, &COMPACT, silt_log::now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        done.merged.base_offset, other.objects[0].base_offset,
        "planned from the stored manifest, not the stale copy"
    );
    assert_eq!(manifest.log_start_offset, other.log_start_offset);
    assert_eq!(
        manifest.expired, other.expired,
        "the other writer's duty is kept"
    );
    let stored = Manifest::load(&store, TOPIC, 0).await.unwrap().unwrap();
    assert_eq!(stored, manifest);
    // The upload planned from the stale copy was deleted at once: nothing unnamed but the
    // replaced and expired objects.
    let mut accounted = keys(&manifest);
    accounted.extend(manifest.replaced.iter().map(|old| old.key.clone()));
    accounted.extend(manifest.expired.iter().cloned());
    assert_eq!(listed(&store).await, accounted);
    manager.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_object_fails_the_compaction_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    std::fs::create_dir_all(&root).unwrap();
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let (manager, _log, mut manifest) = trickled(dir.path(), &store).await;
    let before = manifest.clone();
    // The third object of the first run: its size stays, its bytes are garbage.
    let victim = &manifest.objects[2];
    let size = usize::try_from(victim.size_bytes).unwrap();
    std::fs::write(root.join(&victim.key), vec![0xAB; size]).unwrap();

    let error = compact_next(&store, &mut manifest, &COMPACT, silt_log::now_ms())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            silt_tiering::TierError::Corrupt { .. } | silt_tiering::TierError::Parquet(_)
        ),
        "{error}"
    );
    assert_eq!(manifest, before, "the manifest in hand is unchanged");
    assert_eq!(
        Manifest::load(&store, TOPIC, 0).await.unwrap().as_ref(),
        Some(&before),
        "nothing committed"
    );
    assert_eq!(
        listed(&store).await,
        keys(&before),
        "the merged upload was aborted"
    );
    let mut pending = vec![root.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            assert!(
                !path.to_string_lossy().contains('#'),
                "staging file {path:?}"
            );
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    manager.close().unwrap();
}
