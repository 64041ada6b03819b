//! Crash matrix: for each failpoint, a child process (this test binary, re-executed) runs the
//! real tiering sequence over a real data directory and a `file://` store, or an s3s-fs S3
//! server the child and then the parent run in process on the same directory (offload, local
//! retention, compaction of small objects, whole-log retention, garbage collection) and dies by
//! SIGKILL at that point. The
//! parent reopens everything, runs the sequence again plus GC with no grace period, and checks:
//! every offset from the log start is readable from one tier or the other with the records as
//! produced, the manifest is contiguous and ends where a crash-free run ends, and the store
//! holds exactly the manifest's objects (no orphans, no staging files, no expired keys).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use object_store::{ObjectStoreExt, PutPayload};
use silt_log::batch::{
    BatchSpec, DecodeLimits, DecodedRecord, Header, Record, batches, decode_records, encode_batch,
};
use silt_log::{LogConfig, LogManager, PartitionLog, TopicConfig};
use silt_tiering::failpoint::{self, FAILPOINT_ENV};
use silt_tiering::{
    ArchiveReader, ArchiveStore, CompactPolicy, GcPolicy, Manifest, OffloadPolicy, compact_next,
    gc, offload_next, retention,
};

const CHILD_DIR_ENV: &str = "SILT_TIER_CRASH_CHILD_DIR";
const CHILD_STORE_ENV: &str = "SILT_TIER_CRASH_CHILD_STORE";

/// Which store a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    File,
    S3,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::S3 => "s3",
        }
    }
}
const TOPIC: &str = "crash";
const ROUNDS: i64 = 60;
const RECORDS_PER_ROUND: i64 = 5;
/// Record timestamps: round `r` is `r` minutes after this.
const T0_MS: i64 = 1_795_305_600_000;
/// The sequence's clock: one minute after the last round, so retention.ms (30 minutes) expires
/// about half the data. Garbage collection uses the wall clock (it compares with the store's
/// modification times).
const NOW_MS: i64 = T0_MS + (ROUNDS + 1) * 60_000;

fn log_config(dir: &Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.fs_reserve_bytes = 0;
    config.topic_defaults = TopicConfig::default()
        .with_overrides(
            [
                ("segment.bytes", "4096"),
                ("local.retention.bytes", "0"),
                ("local.retention.ms", "0"),
                ("retention.ms", "1800000"),
            ]
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect::<BTreeMap<_, _>>()
            .iter(),
        )
        .unwrap();
    config
}

const POLICY: OffloadPolicy = OffloadPolicy {
    object_bytes_target: 8 << 10,
    max_wait_ms: 60_000,
};

/// Offload's objects here are about 4.4 KiB (45 records): merge those under 5 KiB in pairs (up
/// to 9 KiB together), at any age, so whole-log retention still has several objects to expire.
const COMPACT: CompactPolicy = CompactPolicy {
    object_bytes_target: 9 << 10,
    small_bytes: 5 << 10,
    min_age_ms: 0,
    objects_max: 100,
};

fn record(offset: i64) -> Record {
    let round = offset / RECORDS_PER_ROUND;
    Record {
        timestamp: T0_MS + round * 60_000 + offset % RECORDS_PER_ROUND,
        key: Some(Bytes::from(format!("sensor-{}", offset % 7))),
        value: Some(Bytes::from(format!("{offset:08}:{}", "x".repeat(200)))),
        headers: vec![Header {
            key: "n".into(),
            value: Some(Bytes::from(offset.to_string())),
        }],
    }
}

/// Opens the run's store: a directory, or an s3s-fs server on 127.0.0.1 serving `dir/s3`
/// (a new server, same files, each time: what a restarted S3 endpoint looks like).
async fn open_store(dir: &Path, kind: StoreKind) -> ArchiveStore {
    match kind {
        StoreKind::File => {
            ArchiveStore::open(&format!("file://{}", dir.join("objects").display())).unwrap()
        }
        StoreKind::S3 => common::s3s_store_at(&dir.join("s3"), "archive").await,
    }
}

/// Writes the partition's data and two orphans (plus a staging file of an interrupted upload)
/// that garbage collection must remove.
async fn set_up(dir: &Path, kind: StoreKind) {
    let manager = LogManager::open(log_config(&dir.join("data"))).unwrap();
    manager.ensure_topic(TOPIC, 1).unwrap();
    let log = manager.partition(TOPIC, 0).unwrap();
    for round in 0..ROUNDS {
        let records: Vec<Record> = (0..RECORDS_PER_ROUND)
            .map(|n| record(round * RECORDS_PER_ROUND + n))
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        log.append(&mut batch).unwrap();
    }
    manager.close().unwrap();
    let store = open_store(dir, kind).await;
    for n in 0..2 {
        let key = store.key(&format!(
            "{}/date=2026-11-20/orphan-{n}.parquet",
            gc::partition_dir(TOPIC, 0)
        ));
        store
            .store()
            .put(&key, PutPayload::from(vec![b'o'; 1000]))
            .await
            .unwrap();
    }
    if kind != StoreKind::File {
        return;
    }
    let staging = dir
        .join("objects")
        .join(gc::partition_dir(TOPIC, 0))
        .join("date=2026-11-20/interrupted.parquet#1");
    std::fs::write(staging, vec![b's'; 500]).unwrap();
}

/// The real sequence a core runs per partition; returns the manifest it ends with.
async fn run_sequence(store: &ArchiveStore, log: &Arc<PartitionLog>) -> Manifest {
    let mut manifest = Manifest::load(store, TOPIC, 0)
        .await
        .unwrap()
        .unwrap_or_else(|| Manifest::new(TOPIC, 0));
    while offload_next(store, log, &mut manifest, &POLICY, NOW_MS)
        .await
        .unwrap()
        .is_some()
    {}
    // Compaction uses the wall clock, as garbage collection does: its grace runs from the
    // commit that replaced an object.
    while compact_next(store, &mut manifest, &COMPACT, wall_ms())
        .await
        .unwrap()
        .is_some()
    {}
    let archived_below = u64::try_from(manifest.next_offset().unwrap()).unwrap();
    log.enforce_retention(NOW_MS, Some(archived_below)).unwrap();
    retention::enforce(store, log, &mut manifest, NOW_MS)
        .await
        .unwrap();
    gc::collect(store, &mut manifest, &GcPolicy { grace_ms: 0 }, wall_ms())
        .await
        .unwrap();
    manifest
}

fn wall_ms() -> i64 {
    silt_log::now_ms()
}

/// The child's side: a no-op unless the parent started this binary with the child variable.
#[test]
fn crash_child_entry() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let kind = match std::env::var(CHILD_STORE_ENV).as_deref() {
        Ok("s3") => StoreKind::S3,
        _ => StoreKind::File,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let manager = LogManager::open(log_config(&dir.join("data"))).unwrap();
        let log = manager.partition(TOPIC, 0).unwrap();
        let store = open_store(dir, kind).await;
        run_sequence(&store, &log).await;
        manager.close().unwrap();
    });
}

/// What a run ends with, to compare a recovered run with a crash-free one.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    log_start_offset: i64,
    /// Offset ranges of the manifest's objects.
    objects: Vec<(i64, i64)>,
    high_watermark: u64,
}

/// Runs the child with `point` armed (or none), expects SIGKILL when armed, recovers, checks.
async fn crash_and_recover(kind: StoreKind, point: Option<&str>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    set_up(dir.path(), kind).await;
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "crash_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .env(CHILD_STORE_ENV, kind.name())
        .env_remove(FAILPOINT_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(point) = point {
        command.env(FAILPOINT_ENV, point);
    }
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    match point {
        Some(point) => assert_eq!(
            output.status.signal(),
            Some(9),
            "{point}: the child must die by SIGKILL at the failpoint: {:?}\n{stderr}",
            output.status
        ),
        None => assert!(output.status.success(), "{stderr}"),
    }
    let name = format!("{}, {}", kind.name(), point.unwrap_or("no failpoint"));

    // Recovery: reopen the log (after a kill -9) and the store, run the sequence again.
    let manager = LogManager::open(log_config(&dir.path().join("data"))).unwrap();
    let log = manager.partition(TOPIC, 0).unwrap();
    let store = open_store(dir.path(), kind).await;
    let manifest = run_sequence(&store, &log).await;
    let loaded = Manifest::load(&store, TOPIC, 0).await.unwrap().unwrap();
    assert_eq!(
        loaded, manifest,
        "{name}: the committed manifest is the one in hand"
    );
    assert!(
        manifest.expired.is_empty(),
        "{name}: {:?}",
        manifest.expired
    );
    assert!(
        manifest.replaced.is_empty(),
        "{name}: {:?}",
        manifest.replaced
    );

    // No orphans: the store holds exactly the manifest's objects, and no staging files.
    let prefix = store.key(&gc::partition_dir(TOPIC, 0));
    let listed: BTreeSet<String> = store
        .store()
        .list(Some(&prefix))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    let named: BTreeSet<String> = manifest.objects.iter().map(|o| o.key.clone()).collect();
    assert_eq!(listed, named, "{name}: LIST equals the manifest");
    let staging = staging_files(&dir.path().join(match kind {
        StoreKind::File => "objects",
        StoreKind::S3 => "s3",
    }));
    assert!(
        staging.is_empty(),
        "{name}: staging files left: {staging:?}"
    );

    // Tiers agree on the log start, and the archive reaches the local data.
    let log_start = manifest.log_start_offset;
    assert_eq!(
        log.log_start_offset(),
        u64::try_from(log_start).unwrap(),
        "{name}"
    );
    let local_start = i64::try_from(log.local_start_offset()).unwrap();
    assert!(
        manifest.next_offset().unwrap() >= local_start,
        "{name}: a gap between the archive and the local log"
    );

    // No loss: every offset from the log start reads back as produced, exactly once.
    let high_watermark = log.high_watermark();
    let mut next = log_start;
    let end = i64::try_from(high_watermark).unwrap();
    while next < end {
        let records = if next < local_start {
            let object = manifest
                .find(next)
                .unwrap_or_else(|| panic!("{name}: offset {next} is in neither tier"));
            let reader = ArchiveReader::open(&store, &object.key, Some(object.size_bytes))
                .await
                .unwrap();
            decoded(&reader.read(next, 1 << 16).await.unwrap().batches)
        } else {
            decoded(
                &log.read(u64::try_from(next).unwrap(), 1 << 16)
                    .unwrap()
                    .bytes,
            )
        };
        let mut progressed = false;
        let from = next;
        for got in records.into_iter().filter(|got| got.offset >= from) {
            assert_eq!(got.offset, next, "{name}: offsets are contiguous");
            let want = record(got.offset);
            assert_eq!(
                (&got.key, &got.value, got.timestamp, &got.headers),
                (&want.key, &want.value, want.timestamp, &want.headers),
                "{name}: offset {next}"
            );
            next += 1;
            progressed = true;
        }
        assert!(progressed, "{name}: no progress at offset {next}");
    }
    manager.close().unwrap();
    Outcome {
        log_start_offset: log_start,
        objects: manifest
            .objects
            .iter()
            .map(|object| (object.base_offset, object.last_offset))
            .collect(),
        high_watermark,
    }
}

fn decoded(bytes: &[u8]) -> Vec<DecodedRecord> {
    batches(bytes, usize::MAX)
        .flat_map(|item| {
            let (header, batch) = item.unwrap();
            decode_records(&header, batch, &DecodeLimits::default()).unwrap()
        })
        .collect()
}

fn staging_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().contains('#') {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_and_no_orphans_after_kill_9_at_every_failpoint() {
    let baseline = crash_and_recover(StoreKind::File, None).await;
    assert!(
        baseline.log_start_offset > 0,
        "retention.ms expired part of the archive"
    );
    assert!(baseline.objects.len() >= 2, "{baseline:?}");
    assert!(
        baseline
            .objects
            .iter()
            .any(|(base, last)| last - base + 1 >= 90),
        "compaction merged offload's 45-record objects: {baseline:?}"
    );
    for point in [
        failpoint::OFFLOAD_AFTER_UPLOAD,
        failpoint::OFFLOAD_AFTER_COMMIT,
        failpoint::COMPACT_AFTER_UPLOAD,
        failpoint::COMPACT_AFTER_COMMIT,
        failpoint::RETENTION_AFTER_MANIFEST,
        failpoint::GC_MID_DELETE,
    ] {
        for kind in [StoreKind::File, StoreKind::S3] {
            let outcome = crash_and_recover(kind, Some(point)).await;
            assert_eq!(
                outcome, baseline,
                "{kind:?}, {point}: recovery ends where a crash-free run ends"
            );
        }
    }
}
