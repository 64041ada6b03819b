//! Offload against a real partition log on disk and each store: closed segments become archive
//! objects committed to the manifest; only then does local retention delete them; the archived
//! offsets read back through the archive exactly as the log served them.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, Record, batches, decode_records, encode_batch,
};
use silt_log::{LogConfig, LogError, LogManager, TopicConfig};
use silt_tiering::{ArchiveReader, ArchiveStore, Manifest, OffloadPolicy, offload_next};

fn log_config(dir: &std::path::Path) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.fs_reserve_bytes = 0;
    config.topic_defaults = TopicConfig::default()
        .with_overrides(
            [
                ("segment.bytes", "4096"),
                ("local.retention.bytes", "0"),
                ("local.retention.ms", "0"),
            ]
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect::<BTreeMap<_, _>>()
            .iter(),
        )
        .unwrap();
    config
}

fn decoded(bytes: &[u8]) -> Vec<silt_log::batch::DecodedRecord> {
    batches(bytes, usize::MAX)
        .flat_map(|item| {
            let (header, batch) = item.unwrap();
            decode_records(&header, batch, &DecodeLimits::default()).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_segments_move_to_the_archive_before_local_retention_deletes_them() {
    for url in ["memory://", "file"] {
        let dir = tempfile::tempdir().unwrap();
        let url = if url == "file" {
            format!("file://{}", dir.path().join("objects").display())
        } else {
            url.to_string()
        };
        let store = ArchiveStore::open(&url).unwrap();
        let manager = LogManager::open(log_config(&dir.path().join("data"))).unwrap();
        manager.ensure_topic("sensors", 1).unwrap();
        let log = manager.partition("sensors", 0).unwrap();

        let mut produced = Vec::new();
        for round in 0..60i64 {
            let records: Vec<Record> = (0..5)
                .map(|n| Record {
                    timestamp: 1_795_305_600_000 + round * 100 + n,
                    key: Some(Bytes::from(format!("k{}", n % 2))),
                    value: Some(Bytes::from(format!(
                        "round {round} record {n} {}",
                        "x".repeat(40)
                    ))),
                    headers: vec![],
                })
                .collect();
            let mut batch = BytesMut::new();
            let spec = BatchSpec {
                compression: if round % 2 == 0 {
                    Compression::Zstd
                } else {
                    Compression::None
                },
                ..BatchSpec::default()
            };
            encode_batch(&spec, &records, &mut batch).unwrap();
            log.append(&mut batch).unwrap();
            produced.extend(records);
        }
        let closed = log.closed_segments();
        assert!(closed.len() >= 3, "{url}: 4 KiB segments must roll");

        let mut manifest = Manifest::new("sensors", 0);
        let policy = OffloadPolicy {
            object_bytes_target: 8 << 10,
            max_wait_ms: 60_000,
        };
        let now = 1_795_305_600_000 + 10_000;
        let mut objects = Vec::new();
        while let Some(object) = offload_next(&store, &log, &mut manifest, &policy, now)
            .await
            .unwrap()
        {
            objects.push(object);
        }
        // Small segments merged into objects of at least the target, except the tail, which
        // waits until it is old enough.
        assert!(!objects.is_empty(), "{url}");
        assert!(objects.len() < closed.len(), "{url}: segments were merged");
        let archived_below = u64::try_from(manifest.next_offset().unwrap()).unwrap();
        assert!(archived_below <= closed.last().unwrap().next_offset);
        let late = now + 3_600_000;
        while offload_next(&store, &log, &mut manifest, &policy, late)
            .await
            .unwrap()
            .is_some()
        {}
        let archived_below = u64::try_from(manifest.next_offset().unwrap()).unwrap();
        assert_eq!(archived_below, closed.last().unwrap().next_offset, "{url}");

        // The committed manifest is what a restarted node loads.
        let loaded = Manifest::load(&store, "sensors", 0).await.unwrap().unwrap();
        assert_eq!(loaded, manifest, "{url}");

        // Local retention (local.retention.* = 0) deletes exactly the archived segments.
        log.enforce_retention(late, Some(archived_below)).unwrap();
        assert_eq!(log.local_start_offset(), archived_below, "{url}");
        assert_eq!(log.log_start_offset(), 0, "{url}: the log start stays");
        assert!(matches!(log.read(0, 100), Err(LogError::NotLocal { .. })));

        // Every archived offset reads back from the archive as it was produced.
        let mut next = 0i64;
        let mut seen = Vec::new();
        while next < i64::try_from(archived_below).unwrap() {
            let object = manifest.find(next).unwrap();
            let reader = ArchiveReader::open(&store, &object.key, Some(object.size_bytes))
                .await
                .unwrap();
            let read = reader.read(next, 1 << 16).await.unwrap();
            seen.extend(decoded(&read.batches));
            next = read.next_offset;
        }
        for (offset, record) in seen.iter().enumerate() {
            assert_eq!(record.offset, i64::try_from(offset).unwrap());
            let expected = &produced[offset];
            assert_eq!(
                (&record.key, &record.value, record.timestamp),
                (&expected.key, &expected.value, expected.timestamp),
                "{url}: offset {offset}"
            );
        }
        manager.close().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_deleted_locally_while_the_store_refuses_uploads() {
    let dir = tempfile::tempdir().unwrap();
    // A file store whose directory is replaced by a plain file: every upload fails.
    let objects = dir.path().join("objects");
    let store = ArchiveStore::open(&format!("file://{}", objects.display())).unwrap();
    std::fs::remove_dir(&objects).unwrap();
    std::fs::write(&objects, b"not a directory").unwrap();

    let manager = LogManager::open(log_config(&dir.path().join("data"))).unwrap();
    manager.ensure_topic("t", 1).unwrap();
    let log = manager.partition("t", 0).unwrap();
    for round in 0..40 {
        let records = vec![Record {
            timestamp: round,
            key: None,
            value: Some(Bytes::from(vec![b'v'; 300])),
            headers: vec![],
        }];
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        log.append(&mut batch).unwrap();
    }
    let mut manifest = Manifest::new("t", 0);
    let policy = OffloadPolicy {
        object_bytes_target: 1,
        max_wait_ms: 0,
    };
    let error = offload_next(&store, &log, &mut manifest, &policy, 1_000)
        .await
        .unwrap_err();
    assert!(
        matches!(error, silt_tiering::TierError::Store(_)),
        "{error}"
    );
    assert_eq!(manifest.next_offset(), None, "nothing committed");
    // Retention, told nothing is archived, keeps every segment.
    let bytes = log.size_bytes();
    let report = log.enforce_retention(i64::MAX / 2, Some(0)).unwrap();
    assert_eq!(report.segments, 0);
    assert_eq!(log.size_bytes(), bytes);
    assert_eq!(log.local_start_offset(), 0);
    assert_eq!(log.segment_bases()[0], 0);
    manager.close().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_default_limit_are_offloaded_when_the_log_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArchiveStore::open("memory://").unwrap();
    let mut config = log_config(&dir.path().join("data"));
    config.max_batch_bytes = 4 << 20;
    let manager = LogManager::open(config).unwrap();
    manager.ensure_topic("big", 1).unwrap();
    let log = manager.partition("big", 0).unwrap();
    // Two batches of 2 MiB of incompressible values, over the decoder's 1 MiB default.
    for round in 0..2u8 {
        let records: Vec<Record> = (0..16u32)
            .map(|n| Record {
                timestamp: 1_795_305_600_000 + i64::from(n),
                key: None,
                value: Some(Bytes::from(
                    (0..128 << 10)
                        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ round ^ n as u8)
                        .collect::<Vec<u8>>(),
                )),
                headers: vec![],
            })
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        assert!(batch.len() > DecodeLimits::default().max_batch_bytes);
        log.append(&mut batch).unwrap();
    }
    // A small batch after them closes the second one's segment (segment.bytes is 4096).
    let mut batch = BytesMut::new();
    let tail = Record {
        timestamp: 1_795_305_600_100,
        key: None,
        value: Some(Bytes::from_static(b"tail")),
        headers: vec![],
    };
    encode_batch(&BatchSpec::default(), &[tail], &mut batch).unwrap();
    log.append(&mut batch).unwrap();
    let mut manifest = Manifest::new("big", 0);
    let policy = OffloadPolicy {
        object_bytes_target: 1,
        max_wait_ms: 0,
    };
    let mut archived = 0;
    while let Some(object) = offload_next(&store, &log, &mut manifest, &policy, i64::MAX / 2)
        .await
        .unwrap()
    {
        archived = object.last_offset + 1;
    }
    assert_eq!(archived, 32, "both batches archived");
    manager.close().unwrap();
}
