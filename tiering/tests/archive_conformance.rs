//! One conformance suite for the archive, run against each store Silt supports: memory, a local
//! directory, and a real S3-protocol server (s3s-fs, in process, on 127.0.0.1). Every case writes
//! real RecordBatch v2 bytes as the log stores them, reads them back through the archive, and
//! compares what a Kafka consumer would see.
//!
//! With `SILT_CONFORMANCE_S3` set to an S3 endpoint URL (the interop suite's moto server), every
//! case also runs against that endpoint, in bucket `SILT_CONFORMANCE_S3_BUCKET` (default
//! `silt-conformance`, which must exist) under a fresh prefix, with the `AWS_*` credentials of
//! the environment (default `testing`/`testing`, moto's).

mod common;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, DecodedRecord, Header, Record, TimestampType, batches,
    decode_records, encode_batch,
};
use silt_tiering::read::ArchiveRead;
use silt_tiering::{ArchiveReader, ArchiveStore, ArchiveWriter, GcPolicy, Manifest, TierError, gc};

/// The stores under test. The guards keep the directory and the server alive.
struct Stores {
    stores: Vec<(&'static str, ArchiveStore)>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn stores() -> Stores {
    let local = tempfile::tempdir().unwrap();
    let url = format!("file://{}", local.path().join("archive").display());
    let file = ArchiveStore::open(&url).unwrap();
    let (s3, s3_dir) = common::s3s_store("cold/tier").await;
    let mut stores = vec![
        ("memory", ArchiveStore::open("memory://").unwrap()),
        ("file", file),
        ("s3", s3),
    ];
    if let Some(external) = external_s3_store() {
        stores.push(("external-s3", external));
    }
    Stores {
        stores,
        _dirs: vec![local, s3_dir],
    }
}

/// The endpoint `SILT_CONFORMANCE_S3` names, under a prefix of its own so parallel cases and
/// earlier runs never see each other's objects.
fn external_s3_store() -> Option<ArchiveStore> {
    let endpoint = std::env::var("SILT_CONFORMANCE_S3").ok()?;
    let bucket = std::env::var("SILT_CONFORMANCE_S3_BUCKET")
        .unwrap_or_else(|_| "silt-conformance".to_string());
    let mut env: std::collections::BTreeMap<String, String> = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    env.extend(std::env::vars().filter(|(name, _)| name.starts_with("AWS_")));
    env.insert("AWS_ENDPOINT_URL".into(), endpoint.clone());
    env.insert(
        "AWS_ALLOW_HTTP".into(),
        endpoint.starts_with("http://").to_string(),
    );
    let prefix = format!("run-{:016x}", rand::random::<u64>());
    Some(ArchiveStore::open_with_env(&format!("s3://{bucket}/{prefix}"), env).unwrap())
}

/// Batches as a partition's log holds them, offsets from `base`, in varied shapes: plain and
/// idempotent producers, zstd and uncompressed, null keys and values, headers with repeats and
/// nulls, a LogAppendTime batch, different leader epochs.
fn log_batches(base: i64, count: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut offset = base;
    let mut index = 0usize;
    while index < count {
        let size = (index % 7 + 1).min(count - index);
        let records: Vec<Record> = (index..index + size)
            .map(|n| Record {
                timestamp: 1_795_305_600_000 + i64::try_from(n).unwrap() * 10,
                key: (n % 5 != 0).then(|| Bytes::from(format!("sensor/{}", n % 13))),
                value: (n % 11 != 0)
                    .then(|| Bytes::from(format!("{{\"reading\":{n}}}").repeat(n % 4 + 1))),
                headers: match n % 3 {
                    0 => vec![],
                    1 => vec![Header {
                        key: "mqtt.qos".into(),
                        value: Some(Bytes::from_static(b"1")),
                    }],
                    _ => vec![
                        Header {
                            key: "h".into(),
                            value: None,
                        },
                        Header {
                            key: "h".into(),
                            value: Some(Bytes::from_static(b"")),
                        },
                    ],
                },
            })
            .collect();
        let batch_number = out.len();
        let spec = BatchSpec {
            base_offset: offset,
            partition_leader_epoch: i32::try_from(batch_number / 10).unwrap(),
            compression: if batch_number % 2 == 0 {
                Compression::Zstd
            } else {
                Compression::None
            },
            timestamp_type: if batch_number % 9 == 4 {
                TimestampType::LogAppendTime
            } else {
                TimestampType::CreateTime
            },
            producer_id: if batch_number % 3 == 0 { 7 } else { -1 },
            producer_epoch: if batch_number % 3 == 0 { 2 } else { -1 },
            base_sequence: if batch_number % 3 == 0 {
                i32::try_from(index).unwrap()
            } else {
                -1
            },
            is_transactional: false,
        };
        let mut bytes = BytesMut::new();
        encode_batch(&spec, &records, &mut bytes).unwrap();
        out.push(bytes.freeze());
        offset += i64::try_from(size).unwrap();
        index += size;
    }
    out
}

/// What a consumer sees of one record, plus the producer fields a broker would check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    record: DecodedRecord,
    producer: (i64, i16, i32),
    leader_epoch: i32,
    timestamp_type: TimestampType,
}

fn seen(batch_bytes: &[u8]) -> Vec<Seen> {
    let mut out = Vec::new();
    for item in batches(batch_bytes, usize::MAX) {
        let (header, bytes) = item.unwrap();
        let records = decode_records(&header, bytes, &DecodeLimits::default()).unwrap();
        for (index, record) in records.into_iter().enumerate() {
            let sequence = if header.base_sequence < 0 {
                -1
            } else {
                header.base_sequence + i32::try_from(index).unwrap()
            };
            out.push(Seen {
                record,
                producer: (header.producer_id, header.producer_epoch, sequence),
                leader_epoch: header.partition_leader_epoch,
                timestamp_type: header.timestamp_type(),
            });
        }
    }
    out
}

async fn archive(store: &ArchiveStore, batches: &[Bytes], base: i64, last: i64) -> String {
    let mut writer = ArchiveWriter::new(store.clone(), "sensors", 2, base, last).unwrap();
    for batch in batches {
        writer.push_batch(batch).await.unwrap();
    }
    writer.finish().await.unwrap().key
}

async fn read_all(reader: &ArchiveReader, from: i64, max_bytes: usize) -> Vec<Seen> {
    let mut out = Vec::new();
    let mut next = from;
    while next <= reader.info().last_offset {
        let ArchiveRead {
            batches,
            next_offset,
            records,
        } = reader.read(next, max_bytes).await.unwrap();
        assert!(records > 0, "a read returns at least one record");
        assert_eq!(next_offset, next + i64::try_from(records).unwrap());
        let got = seen(&batches);
        assert_eq!(got.len() as u64, records);
        out.extend(got);
        next = next_offset;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_read_back_exactly_as_written_from_any_offset() {
    let stores = stores().await;
    let base = 1_000;
    let input = log_batches(base, 700);
    let expected: Vec<Seen> = input.iter().flat_map(|batch| seen(batch)).collect();
    let last = base + 699;
    for (name, store) in &stores.stores {
        let key = archive(store, &input, base, last).await;
        assert!(
            key.contains("v1/topic=sensors/partition=2/date=2026-11-22/00000000000000001000-00000000000000001699-"),
            "{name}: {key}"
        );
        let reader = ArchiveReader::open(store, &key, None).await.unwrap();
        let info = reader.info();
        assert_eq!(
            (info.base_offset, info.last_offset, info.records),
            (base, last, 700)
        );
        assert_eq!(info.topic, "sensors");
        assert_eq!(info.partition, 2);
        assert_eq!(info.min_timestamp_ms, 1_795_305_600_000);

        assert_eq!(
            read_all(&reader, base, 1 << 20).await,
            expected,
            "{name}: whole object"
        );
        // Small reads, starting inside batches, see the same records with the same producer
        // fields: sequences continue from where the read starts.
        for from in [base + 1, base + 350, last] {
            let skip = usize::try_from(from - base).unwrap();
            assert_eq!(
                read_all(&reader, from, 200).await,
                expected[skip..],
                "{name}: from {from}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_objects_have_row_groups_and_reads_touch_only_what_they_need() {
    let stores = stores().await;
    // Three row groups of 128Ki rows and a bit.
    let count: usize = 3 * 128 * 1024 + 10;
    let mut input = Vec::new();
    let mut offset = 0i64;
    for chunk in 0..count.div_ceil(1000) {
        let size = 1000.min(count - chunk * 1000);
        let records: Vec<Record> = (0..size)
            .map(|n| Record {
                timestamp: offset + i64::try_from(n).unwrap(),
                key: None,
                value: Some(Bytes::from(vec![b'x'; 16])),
                headers: vec![],
            })
            .collect();
        let mut bytes = BytesMut::new();
        let spec = BatchSpec {
            base_offset: offset,
            ..BatchSpec::default()
        };
        encode_batch(&spec, &records, &mut bytes).unwrap();
        input.push(bytes.freeze());
        offset += i64::try_from(size).unwrap();
    }
    let (name, store) = &stores.stores[0];
    let key = archive(store, &input, 0, offset - 1).await;
    let reader = ArchiveReader::open(store, &key, None).await.unwrap();
    assert_eq!(reader.row_groups(), 4, "{name}");
    // A read deep in the third row group returns records from there, and a small budget keeps
    // the read small.
    let read = reader.read(2 * 128 * 1024 + 5_000, 4_096).await.unwrap();
    let got = seen(&read.batches);
    assert_eq!(got[0].record.offset, 2 * 128 * 1024 + 5_000);
    assert!(
        read.records < 2_000,
        "{} records for a 4 KiB read",
        read.records
    );
    assert_eq!(read.next_offset, got.last().unwrap().record.offset + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zstd_level_changes_the_object_not_the_records() {
    let stores = stores().await;
    let input = log_batches(0, 3_000);
    let expected: Vec<Seen> = input.iter().flat_map(|batch| seen(batch)).collect();
    for (name, store) in &stores.stores {
        assert_eq!(
            store.zstd_level(),
            silt_tiering::store::ZSTD_LEVEL_DEFAULT,
            "{name}"
        );
        let mut sizes = Vec::new();
        for level in [1, 19] {
            let leveled = store.clone().with_zstd_level(level).unwrap();
            let key = archive(&leveled, &input, 0, 2_999).await;
            let reader = ArchiveReader::open(store, &key, None).await.unwrap();
            assert_eq!(
                read_all(&reader, 0, 1 << 20).await,
                expected,
                "{name}: level {level}"
            );
            sizes.push(store.store().head(&key.as_str().into()).await.unwrap().size);
        }
        assert_ne!(
            sizes[0], sizes[1],
            "{name}: levels 1 and 19 wrote the same bytes"
        );
        for level in [0, 23, -1] {
            let error = store.clone().with_zstd_level(level).unwrap_err();
            assert!(
                error.to_string().contains("from 1 to 22"),
                "{name}: {error}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_leaves_no_object() {
    let stores = stores().await;
    let input = log_batches(0, 20);
    for (name, store) in &stores.stores {
        // A gap between batches.
        let mut writer = ArchiveWriter::new(store.clone(), "t", 0, 0, 19).unwrap();
        writer.push_batch(&input[0]).await.unwrap();
        let error = writer.push_batch(&input[2]).await.unwrap_err();
        assert!(
            matches!(error, TierError::InvalidInput(_)),
            "{name}: {error}"
        );
        writer.abort().await;

        // Fewer records than the range promises.
        let mut writer = ArchiveWriter::new(store.clone(), "t", 0, 0, 19).unwrap();
        writer.push_batch(&input[0]).await.unwrap();
        let error = writer.finish().await.unwrap_err();
        assert!(error.to_string().contains("short of"), "{name}: {error}");

        // A batch past the promised range.
        let mut writer = ArchiveWriter::new(store.clone(), "t", 0, 1, 1).unwrap();
        let error = writer.push_batch(&input[1]).await.unwrap_err();
        assert!(error.to_string().contains("past"), "{name}: {error}");
        writer.abort().await;

        // A corrupted batch (one flipped byte) fails its CRC.
        let mut corrupt = input[0].to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let mut writer = ArchiveWriter::new(store.clone(), "t", 0, 0, 19).unwrap();
        let error = writer.push_batch(&corrupt).await.unwrap_err();
        assert!(matches!(error, TierError::Batch(_)), "{name}: {error}");
        writer.abort().await;

        assert!(
            ArchiveWriter::new(store.clone(), "t", 0, 5, 4).is_err(),
            "{name}: an empty range"
        );
        let listed = list(store).await;
        assert!(listed.is_empty(), "{name}: left behind {listed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_that_are_not_archive_files_are_refused_on_open() {
    let stores = stores().await;
    for (name, store) in &stores.stores {
        let garbage = store.key("v1/topic=t/partition=0/garbage.parquet");
        store
            .store()
            .put(&garbage, PutPayload::from_static(b"PAR1 not really PAR1"))
            .await
            .unwrap();
        let error = ArchiveReader::open(store, garbage.as_ref(), None)
            .await
            .unwrap_err();
        assert!(matches!(error, TierError::Parquet(_)), "{name}: {error}");

        let missing = ArchiveReader::open(store, "v1/none.parquet", None)
            .await
            .unwrap_err();
        assert!(matches!(missing, TierError::Store(_)), "{name}: {missing}");

        // A valid object read past its range is an error, not a panic or an empty answer.
        let input = log_batches(0, 10);
        let key = archive(store, &input, 0, 9).await;
        let reader = ArchiveReader::open(store, &key, None).await.unwrap();
        assert!(reader.read(10, 100).await.is_err(), "{name}");
        assert!(reader.read(-1, 100).await.is_err(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_commit_atomically_and_load_back() {
    let stores = stores().await;
    for (name, store) in &stores.stores {
        assert_eq!(Manifest::load(store, "t", 3).await.unwrap(), None, "{name}");
        let input = log_batches(0, 30);
        let mut manifest = Manifest::new("t", 3);
        for (base, last) in [(0, 9), (10, 29)] {
            let mut writer = ArchiveWriter::new(store.clone(), "t", 3, base, last).unwrap();
            for batch in &input {
                let first = seen(batch)[0].record.offset;
                if (base..=last).contains(&first) {
                    writer.push_batch(batch).await.unwrap();
                }
            }
            manifest.add(writer.finish().await.unwrap()).unwrap();
            manifest.commit(store).await.unwrap();
        }
        let loaded = Manifest::load(store, "t", 3).await.unwrap().unwrap();
        assert_eq!(loaded, manifest, "{name}");
        assert_eq!(loaded.generation, 2);
        // Every object the manifest names opens at the size it records, with no HEAD or LIST.
        for object in &loaded.objects {
            let reader = ArchiveReader::open(store, &object.key, Some(object.size_bytes))
                .await
                .unwrap();
            assert_eq!(reader.info().base_offset, object.base_offset, "{name}");
        }
        // Another partition's manifest is refused, as is garbage.
        let other = store.key(&Manifest::key("t", 4));
        let bytes = store
            .store()
            .get(&store.key(&Manifest::key("t", 3)))
            .await
            .unwrap();
        store
            .store()
            .put(&other, bytes.bytes().await.unwrap().into())
            .await
            .unwrap();
        let error = Manifest::load(store, "t", 4).await.unwrap_err();
        assert!(
            matches!(error, TierError::Corrupt { .. }),
            "{name}: {error}"
        );
        store
            .store()
            .put(&other, PutPayload::from_static(b"{\"format\":"))
            .await
            .unwrap();
        let error = Manifest::load(store, "t", 4).await.unwrap_err();
        assert!(
            matches!(error, TierError::Corrupt { .. }),
            "{name}: {error}"
        );
    }
}

async fn list(store: &ArchiveStore) -> Vec<String> {
    use futures_util::TryStreamExt;
    let prefix = (!store.prefix().as_ref().is_empty()).then(|| store.prefix().clone());
    let store: &Arc<dyn ObjectStore> = store.store();
    store
        .list(prefix.as_ref())
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_deletes_only_old_unnamed_and_expired_objects() {
    let stores = stores().await;
    let input = log_batches(0, 60);
    for (name, store) in &stores.stores {
        // Three objects; the manifest names the first two. The third and a stray file are
        // what a crash between upload and commit leaves.
        let first = archive(store, &input[..5], 0, last_offset(&input[..5])).await;
        let second_base = last_offset(&input[..5]) + 1;
        let second = archive(store, &input[5..10], second_base, last_offset(&input[..10])).await;
        let third_base = last_offset(&input[..10]) + 1;
        let orphan = archive(store, &input[10..15], third_base, last_offset(&input[..15])).await;
        let stray = store.key(&format!(
            "{}/date=2026-11-20/stray.parquet",
            gc::partition_dir("sensors", 2)
        ));
        store
            .store()
            .put(&stray, PutPayload::from(vec![0u8; 10]))
            .await
            .unwrap();
        // Another partition's object is never this partition's garbage.
        let neighbour = store.key(&format!("{}/x.parquet", gc::partition_dir("sensors", 20)));
        store
            .store()
            .put(&neighbour, PutPayload::from(vec![0u8; 10]))
            .await
            .unwrap();
        let mut manifest = Manifest::new("sensors", 2);
        for key in [&first, &second] {
            let reader = ArchiveReader::open(store, key, None).await.unwrap();
            let info = reader.info();
            let size = store
                .store()
                .head(&object_store::path::Path::from(key.as_str()))
                .await
                .unwrap()
                .size;
            manifest
                .add(silt_tiering::ManifestObject {
                    key: key.clone(),
                    base_offset: info.base_offset,
                    last_offset: info.last_offset,
                    records: info.records,
                    min_timestamp_ms: info.min_timestamp_ms,
                    max_timestamp_ms: info.max_timestamp_ms,
                    size_bytes: size,
                })
                .unwrap();
        }
        manifest.commit(store).await.unwrap();
        let now = silt_log::now_ms();

        // Within the grace period nothing goes: an upload may be about to commit.
        let report = gc::collect(store, &mut manifest, &GcPolicy::default(), now)
            .await
            .unwrap();
        assert_eq!(report, silt_tiering::GcReport::default(), "{name}");
        assert_eq!(
            list(store).await.len(),
            6,
            "{name}: {:?}",
            list(store).await
        );

        // An S3 multipart upload a crash abandoned (started, one part, never completed). It is
        // made only now because moto reports every upload as initiated on 2010-11-10, so the
        // grace period cannot protect it there (AWS and MinIO report the real time).
        let stale_upload = match store.s3() {
            Some(s3) => {
                use object_store::multipart::MultipartStore;
                let key = store.key(&format!(
                    "{}/date=2026-11-20/abandoned.parquet",
                    gc::partition_dir("sensors", 2)
                ));
                let id = s3.create_multipart(&key).await.unwrap();
                s3.put_part(&key, &id, 0, PutPayload::from(vec![1u8; 1000]))
                    .await
                    .unwrap();
                Some((key, id))
            }
            None => None,
        };
        // Past it, the unnamed objects go; the named ones stay whatever their age.
        let later = now + 2 * gc::GC_GRACE_MS_DEFAULT;
        let report = gc::collect(store, &mut manifest, &GcPolicy::default(), later)
            .await
            .unwrap();
        assert_eq!(report.orphans_deleted, 2, "{name}: {report:?}");
        // moto lists multipart uploads; s3s-fs answers 501, which GC logs and skips.
        let expected_aborts = u64::from(*name == "external-s3");
        assert_eq!(
            report.uploads_aborted, expected_aborts,
            "{name}: {report:?}"
        );
        if let (Some(s3), Some((key, id)), 1) = (store.s3(), &stale_upload, expected_aborts) {
            use object_store::multipart::MultipartStore;
            let gone = s3
                .put_part(key, id, 1, PutPayload::from(vec![1u8; 10]))
                .await;
            assert!(
                gone.is_err(),
                "{name}: the aborted upload takes no more parts"
            );
        }
        assert!(report.bytes_freed > 10, "{name}: {report:?}");
        let mut want = vec![first.clone(), second.clone(), neighbour.to_string()];
        want.push(store.key(&Manifest::key("sensors", 2)).to_string());
        want.sort();
        let mut listed = list(store).await;
        listed.sort();
        assert_eq!(listed, want, "{name}: {orphan} and the stray file are gone");

        // An expired key is deleted at once and forgotten, and the manifest says so.
        manifest.advance_log_start(second_base);
        manifest.commit(store).await.unwrap();
        assert_eq!(manifest.expired, std::slice::from_ref(&first), "{name}");
        let report = gc::collect(store, &mut manifest, &GcPolicy::default(), now)
            .await
            .unwrap();
        assert_eq!(report.expired_deleted, 1, "{name}: {report:?}");
        assert!(!list(store).await.contains(&first), "{name}");
        assert!(list(store).await.contains(&second), "{name}");
        let loaded = Manifest::load(store, "sensors", 2).await.unwrap().unwrap();
        assert!(loaded.expired.is_empty(), "{name}");
        assert_eq!(loaded, manifest, "{name}");
    }
}

fn last_offset(batches: &[Bytes]) -> i64 {
    let mut last = -1;
    for item in silt_log::batch::batches(batches.last().unwrap(), usize::MAX) {
        let (header, _) = item.unwrap();
        last = header.last_offset();
    }
    last
}
