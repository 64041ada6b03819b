//! Whole-log retention over a real partition log and a `file://` archive: `retention.bytes`
//! counts both tiers, the log start moves in the manifest before any object is deleted, readers
//! below it get "out of range" from both tiers, and a second pass changes nothing.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use silt_log::batch::{BatchSpec, Record, encode_batch};
use silt_log::{LogConfig, LogError, LogManager, TopicConfig};
use silt_tiering::{ArchiveStore, Manifest, OffloadPolicy, gc, offload_next, retention};

fn log_config(dir: &std::path::Path, retention_bytes: &str) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.fs_reserve_bytes = 0;
    config.topic_defaults = TopicConfig::default()
        .with_overrides(
            [
                ("segment.bytes", "4096"),
                ("local.retention.bytes", "0"),
                ("local.retention.ms", "0"),
                ("retention.ms", "-1"),
                ("retention.bytes", retention_bytes),
            ]
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect::<BTreeMap<_, _>>()
            .iter(),
        )
        .unwrap();
    config
}

async fn listed(store: &ArchiveStore) -> Vec<String> {
    store
        .store()
        .list(Some(&store.key(&gc::partition_dir("t", 0))))
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bytes_counts_both_tiers_and_moves_the_log_start_first() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        ArchiveStore::open(&format!("file://{}", dir.path().join("objects").display())).unwrap();
    // 60 KB of batches in all; keep about 10 KB.
    let manager = LogManager::open(log_config(&dir.path().join("data"), "10000")).unwrap();
    manager.ensure_topic("t", 1).unwrap();
    let log = manager.partition("t", 0).unwrap();
    for round in 0..200i64 {
        let records = vec![Record {
            timestamp: 1_000 + round,
            key: None,
            value: Some(Bytes::from(format!("{round:06}{}", "v".repeat(230)))),
            headers: vec![],
        }];
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        log.append(&mut batch).unwrap();
    }
    let now = 10_000;
    let policy = OffloadPolicy {
        object_bytes_target: 8 << 10,
        max_wait_ms: 0,
    };
    let mut manifest = Manifest::new("t", 0);
    while offload_next(&store, &log, &mut manifest, &policy, now)
        .await
        .unwrap()
        .is_some()
    {}
    let archived_below = u64::try_from(manifest.next_offset().unwrap()).unwrap();
    log.enforce_retention(now, Some(archived_below)).unwrap();
    let objects_before = manifest.objects.len();
    let archived_bytes = manifest.archived_bytes();
    let local_bytes = log.size_bytes();
    assert!(
        archived_bytes + local_bytes > 10_000,
        "{archived_bytes} + {local_bytes}"
    );

    let report = retention::enforce(&store, &log, &mut manifest, now)
        .await
        .unwrap();
    assert!(report.objects_expired > 0, "{report:?}");
    assert_eq!(report.objects_deleted, report.objects_expired, "{report:?}");
    assert_eq!(
        manifest.objects.len() as u64,
        objects_before as u64 - report.objects_expired
    );
    // What is left holds at least retention.bytes, and one more object gone would not.
    let kept = manifest.archived_bytes() + log.size_bytes();
    assert!(kept >= 10_000, "{kept}");
    assert!(kept - manifest.objects[0].size_bytes < 10_000, "{kept}");
    assert_eq!(report.log_start_offset, manifest.objects[0].base_offset);
    assert_eq!(
        report.bytes_expired,
        archived_bytes - manifest.archived_bytes()
    );

    // Both tiers agree, and below the start both say "out of range", never "missing object".
    let start = report.log_start_offset;
    assert_eq!(log.log_start_offset(), u64::try_from(start).unwrap());
    assert!(manifest.find(start - 1).is_none());
    assert!(manifest.find(start).is_some());
    assert!(matches!(
        log.read(u64::try_from(start - 1).unwrap(), 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    let loaded = Manifest::load(&store, "t", 0).await.unwrap().unwrap();
    assert_eq!(loaded, manifest);
    assert!(loaded.expired.is_empty());
    let mut named: Vec<String> = manifest.objects.iter().map(|o| o.key.clone()).collect();
    let mut in_store = listed(&store).await;
    named.sort();
    in_store.sort();
    assert_eq!(in_store, named, "expired objects are deleted");

    // A second pass is a no-op.
    let again = retention::enforce(&store, &log, &mut manifest, now)
        .await
        .unwrap();
    assert_eq!(again.objects_expired, 0, "{again:?}");
    assert_eq!(again.log_start_offset, start);
    manager.close().unwrap();
}
