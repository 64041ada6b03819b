//! The cold reader against real stores (memory, a local directory): sequential replay gives
//! back exactly the records written, from every kind of boundary; the chunk cache stays
//! bounded; prefetch serves the next row group without a round trip; an expired object reads
//! as out of range.

mod common;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, DecodedRecord, Header, Record, batches, decode_records,
    encode_batch,
};
use silt_tiering::schema::ROW_GROUP_ROWS;
use silt_tiering::{ArchiveStore, ArchiveWriter, ColdConfig, ColdError, ColdReader, Manifest};

const TOPIC: &str = "replay";
const BASE_TS: i64 = 1_795_305_600_000;
const BATCH_RECORDS: i64 = 100;

fn record(offset: i64) -> Record {
    Record {
        timestamp: BASE_TS + offset * 3,
        key: (offset % 7 != 0).then(|| Bytes::from(format!("key-{}", offset % 13))),
        value: (offset % 11 != 0).then(|| {
            Bytes::from(format!(
                "value {offset} {}",
                "v".repeat((offset % 5) as usize)
            ))
        }),
        headers: if offset % 3 == 0 {
            vec![
                Header {
                    key: "h".into(),
                    value: Some(Bytes::from(offset.to_string())),
                },
                Header {
                    key: "empty".into(),
                    value: None,
                },
            ]
        } else {
            vec![]
        },
    }
}

/// Writes `objects` (offset ranges) as archive objects and commits the manifest.
async fn archive(store: &ArchiveStore, objects: &[(i64, i64)]) -> Manifest {
    let mut manifest = Manifest::new(TOPIC, 0);
    for &(base, last) in objects {
        let mut writer = ArchiveWriter::new(store.clone(), TOPIC, 0, base, last).unwrap();
        let mut offset = base;
        while offset <= last {
            let end = (offset + BATCH_RECORDS).min(last + 1);
            let records: Vec<Record> = (offset..end).map(record).collect();
            let spec = BatchSpec {
                base_offset: offset,
                compression: if offset % 200 == 0 {
                    Compression::Zstd
                } else {
                    Compression::None
                },
                ..BatchSpec::default()
            };
            let mut batch = BytesMut::new();
            encode_batch(&spec, &records, &mut batch).unwrap();
            writer.push_batch(&batch).await.unwrap();
            offset = end;
        }
        manifest.add(writer.finish().await.unwrap()).unwrap();
    }
    manifest.commit(store).await.unwrap();
    manifest
}

/// Writes offsets `0..records` of `partition` as one object, `batch_records` a batch
/// (uncompressed), the record at each offset made by `make`, and commits its manifest.
async fn archive_one(
    store: &ArchiveStore,
    partition: u32,
    records: i64,
    batch_records: i64,
    make: impl Fn(i64) -> Record,
) {
    let mut manifest = Manifest::new(TOPIC, partition);
    let mut writer = ArchiveWriter::new(store.clone(), TOPIC, partition, 0, records - 1).unwrap();
    for base in (0..records).step_by(batch_records as usize) {
        let batch_records: Vec<Record> = (base..(base + batch_records).min(records))
            .map(&make)
            .collect();
        let spec = BatchSpec {
            base_offset: base,
            ..BatchSpec::default()
        };
        let mut batch = BytesMut::new();
        encode_batch(&spec, &batch_records, &mut batch).unwrap();
        writer.push_batch(&batch).await.unwrap();
    }
    manifest.add(writer.finish().await.unwrap()).unwrap();
    manifest.commit(store).await.unwrap();
}

fn decoded(bytes: &[u8]) -> Vec<(i64, DecodedRecord)> {
    let mut out = Vec::new();
    for item in batches(bytes, usize::MAX) {
        let (header, batch) = item.unwrap();
        for (index, record) in decode_records(&header, batch, &DecodeLimits::default())
            .unwrap()
            .into_iter()
            .enumerate()
        {
            out.push((header.base_offset + index as i64, record));
        }
    }
    out
}

fn assert_is_source(offset: i64, got: &DecodedRecord) {
    let want = record(offset);
    assert_eq!(got.timestamp, want.timestamp, "timestamp at {offset}");
    assert_eq!(got.key, want.key, "key at {offset}");
    assert_eq!(got.value, want.value, "value at {offset}");
    assert_eq!(got.headers, want.headers, "headers at {offset}");
}

/// Checks that `batches` hold contiguous records from `offset` on, each as `check` wants.
fn assert_contiguous_from(offset: i64, batches: &[u8], check: impl Fn(i64, &DecodedRecord)) {
    let records = decoded(batches);
    assert_eq!(records.first().unwrap().0, offset, "starts where asked");
    for (index, (got_offset, got)) in records.iter().enumerate() {
        assert_eq!(*got_offset, offset + index as i64, "contiguous");
        check(*got_offset, got);
    }
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_every_record_back_from_every_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let rows = ROW_GROUP_ROWS as i64;
    // Object one has two row groups; objects two and three are small.
    let objects = [
        (0, rows + 999),
        (rows + 1000, rows + 1499),
        (rows + 1500, rows + 1510),
    ];
    let end = rows + 1511;
    for url in [
        "memory://".to_string(),
        format!("file://{}", dir.path().join("objects").display()),
    ] {
        let store = ArchiveStore::open(&url).unwrap();
        archive(&store, &objects).await;
        let cold = ColdReader::new(store, ColdConfig::default());

        // Sequential replay, 256 KiB at a time, as a consumer fetches.
        let mut offset = 0;
        let mut fetches = 0;
        while offset < end {
            let read = cold.read(TOPIC, 0, offset, 256 << 10).await.unwrap();
            assert!(read.records > 0, "{url}: progress at {offset}");
            let records = decoded(&read.batches);
            assert_eq!(
                records.first().unwrap().0,
                offset,
                "{url}: starts at the offset"
            );
            for (index, (got_offset, got)) in records.iter().enumerate() {
                assert_eq!(*got_offset, offset + index as i64, "{url}: contiguous");
                assert_is_source(*got_offset, got);
            }
            offset = read.next_offset;
            assert_eq!(offset, records.last().unwrap().0 + 1);
            fetches += 1;
        }
        assert_eq!(offset, end, "{url}");
        assert!(fetches > 3, "{url}: {fetches} fetches");
        let stats = cold.stats();
        assert_eq!(stats.manifest_loads, 1, "{url}: the manifest is cached");
        assert_eq!(stats.objects_opened, 3, "{url}: each footer is read once");

        // Reads starting at every kind of boundary: object, row group, batch, inside a batch,
        // the last offset; a tiny max_bytes still returns one batch.
        for start in [
            0,
            1,
            99,
            100,
            101,
            rows - 1,
            rows,
            rows + 1,
            rows + 999,
            rows + 1000,
            rows + 1500,
            end - 1,
        ] {
            let read = cold.read(TOPIC, 0, start, 1).await.unwrap();
            let records = decoded(&read.batches);
            assert!(
                !records.is_empty(),
                "{url}: at least one batch from {start}"
            );
            assert_eq!(records[0].0, start, "{url}");
            for (got_offset, got) in &records {
                assert_is_source(*got_offset, got);
            }
        }
        // Past the archive: not archived; a negative offset: out of range.
        assert!(matches!(
            cold.read(TOPIC, 0, end, 1 << 20).await,
            Err(ColdError::NotArchived { .. })
        ));
        assert!(matches!(
            cold.read(TOPIC, 0, -1, 1 << 20).await,
            Err(ColdError::OutOfRange { .. })
        ));
        // An unknown partition has no manifest.
        assert!(matches!(
            cold.read(TOPIC, 7, 0, 1 << 20).await,
            Err(ColdError::NotArchived { .. })
        ));

        // Timestamps: exact, between two records, before all, after all.
        assert_eq!(
            cold.offset_for_timestamp(TOPIC, 0, BASE_TS + 3 * 500)
                .await
                .unwrap(),
            Some((500, BASE_TS + 1500))
        );
        assert_eq!(
            cold.offset_for_timestamp(TOPIC, 0, BASE_TS + 3 * (rows + 1200) - 1)
                .await
                .unwrap(),
            Some((rows + 1200, BASE_TS + 3 * (rows + 1200)))
        );
        assert_eq!(
            cold.offset_for_timestamp(TOPIC, 0, 0).await.unwrap(),
            Some((0, BASE_TS))
        );
        assert_eq!(
            cold.offset_for_timestamp(TOPIC, 0, BASE_TS + 3 * end)
                .await
                .unwrap(),
            None
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chunk_cache_stays_within_its_bound() {
    let rows = ROW_GROUP_ROWS as i64;
    let store = ArchiveStore::open("memory://").unwrap();
    archive(&store, &[(0, rows + 99), (rows + 100, 2 * rows + 199)]).await;
    // A random read fetches only its pages; the sequential one after it caches the group
    // (no prefetch, so exactly one group is cached).
    let probe = ColdReader::new(
        store.clone(),
        ColdConfig {
            prefetch_max: 0,
            ..ColdConfig::default()
        },
    );
    let first = probe.read(TOPIC, 0, 0, 1).await.unwrap();
    assert_eq!(
        probe.stats().cached_bytes,
        0,
        "a random read caches nothing"
    );
    probe.read(TOPIC, 0, first.next_offset, 1).await.unwrap();
    let group = probe.stats().cached_bytes;
    assert!(group > 0);
    // Room for about two row groups of the four.
    let bound = group * 2 + group / 2;
    let cold = ColdReader::new(
        store,
        ColdConfig {
            cache_bytes: bound,
            ..ColdConfig::default()
        },
    );
    let mut offset = 0;
    while offset < 2 * rows + 200 {
        offset = cold
            .read(TOPIC, 0, offset, 4 << 20)
            .await
            .unwrap()
            .next_offset;
        assert!(
            cold.stats().cached_bytes <= bound,
            "{:?} over {bound}",
            cold.stats()
        );
    }
    // A second replay of what is cached is served from memory.
    let before = cold.stats();
    cold.read(TOPIC, 0, 2 * rows + 100, 1).await.unwrap();
    let after = cold.stats();
    assert_eq!(
        after.chunk_fetches, before.chunk_fetches,
        "a cached group needs no GET"
    );
    assert!(after.chunk_hits > before.chunk_hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_prefetch_the_next_row_group() {
    let rows = ROW_GROUP_ROWS as i64;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("objects");
    let store = ArchiveStore::open(&format!("file://{}", root.display())).unwrap();
    let manifest = archive(&store, &[(0, rows + 499)]).await;
    // Decoding ahead would fetch group 1 itself; this is about prefetch alone.
    let cold = ColdReader::new(
        store,
        ColdConfig {
            decode_ahead_max: 0,
            ..ColdConfig::default()
        },
    );
    // Two reads in a row in group 0: the second is sequential and prefetches group 1.
    let first = cold.read(TOPIC, 0, 0, 64 << 10).await.unwrap();
    let second = cold
        .read(TOPIC, 0, first.next_offset, 64 << 10)
        .await
        .unwrap();
    assert!(second.next_offset < rows, "still in group 0");
    wait_for("the prefetch of row group 1", || {
        cold.stats().prefetched >= 1
    })
    .await;
    // The object is gone from the store: group 1 can only come from the cache.
    std::fs::remove_file(root.join(&manifest.objects[0].key)).unwrap();
    let fetches = cold.stats().chunk_fetches;
    let read = cold.read(TOPIC, 0, rows, 1 << 20).await.unwrap();
    let records = decoded(&read.batches);
    assert_eq!(records[0].0, rows);
    for (offset, got) in &records {
        assert_is_source(*offset, got);
    }
    assert_eq!(
        cold.stats().chunk_fetches,
        fetches,
        "no round trip for a prefetched group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_object_reads_as_out_of_range_never_partially() {
    let store = ArchiveStore::open("memory://").unwrap();
    let mut manifest = archive(&store, &[(0, 999), (1000, 1999)]).await;
    let cold = ColdReader::new(store.clone(), ColdConfig::default());
    cold.read(TOPIC, 0, 1500, 1).await.unwrap(); // the manifest is now cached
    // Whole-log retention: the log start moves (committed) before the object is deleted.
    manifest.advance_log_start(1000);
    manifest.commit(&store).await.unwrap();
    let gone = object_store::path::Path::from(manifest.expired[0].as_str());
    object_store::ObjectStoreExt::delete(store.store().as_ref(), &gone)
        .await
        .unwrap();
    // The cached manifest still names the object: the GET misses, the manifest reloads.
    match cold.read(TOPIC, 0, 10, 1 << 20).await {
        Err(ColdError::OutOfRange { offset, log_start }) => {
            assert_eq!((offset, log_start), (10, 1000));
        }
        other => panic!("expected out of range, got {other:?}"),
    }
    let read = cold.read(TOPIC, 0, 1000, 1 << 20).await.unwrap();
    assert_eq!(read.next_offset, 2000);
    assert_eq!(decoded(&read.batches).len(), 1000);
    // An object missing while the manifest still names it is an error, not a partial answer.
    let live = object_store::path::Path::from(manifest.objects[0].key.as_str());
    object_store::ObjectStoreExt::delete(store.store().as_ref(), &live)
        .await
        .unwrap();
    let cold = ColdReader::new(store, ColdConfig::default());
    assert!(matches!(
        cold.read(TOPIC, 0, 1000, 1 << 20).await,
        Err(ColdError::Tier(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_s3_protocol_replay_is_exact_and_expiry_is_out_of_range() {
    let (store, _dir) = common::s3s_store("cold").await;
    let mut manifest = archive(&store, &[(0, 2999), (3000, 4999)]).await;
    let cold = ColdReader::new(store.clone(), ColdConfig::default());
    let mut offset = 0;
    while offset < 5000 {
        let read = cold.read(TOPIC, 0, offset, 32 << 10).await.unwrap();
        for (index, (got_offset, got)) in decoded(&read.batches).iter().enumerate() {
            assert_eq!(*got_offset, offset + index as i64);
            assert_is_source(*got_offset, got);
        }
        offset = read.next_offset;
    }
    assert_eq!(
        cold.offset_for_timestamp(TOPIC, 0, BASE_TS + 3 * 4321)
            .await
            .unwrap(),
        Some((4321, BASE_TS + 3 * 4321))
    );
    // A reader that has cached the manifest but never opened the first object.
    let fresh = ColdReader::new(store.clone(), ColdConfig::default());
    fresh.read(TOPIC, 0, 3000, 1).await.unwrap();
    manifest.advance_log_start(3000);
    manifest.commit(&store).await.unwrap();
    let gone = object_store::path::Path::from(manifest.expired[0].as_str());
    object_store::ObjectStoreExt::delete(store.store().as_ref(), &gone)
        .await
        .unwrap();
    // Its cached manifest names the object: the GET meets the 404, the manifest reloads, the
    // answer is out of range.
    assert!(matches!(
        fresh.read(TOPIC, 0, 5, 1 << 20).await,
        Err(ColdError::OutOfRange {
            log_start: 3000,
            ..
        })
    ));
    // The reader that replayed holds the expired row groups: it answers the whole data or out
    // of range, never part of it (the broker checks the log's own start first).
    match cold.read(TOPIC, 0, 5, 1 << 20).await {
        Ok(read) => {
            let records = decoded(&read.batches);
            assert_eq!(records[0].0, 5);
            for (index, (got_offset, got)) in records.iter().enumerate() {
                assert_eq!(*got_offset, 5 + index as i64);
                assert_is_source(*got_offset, got);
            }
        }
        Err(ColdError::OutOfRange { log_start, .. }) => assert_eq!(log_start, 3000),
        Err(other) => panic!("{other:?}"),
    }
    let reloaded = Manifest::load(&store, TOPIC, 0).await.unwrap().unwrap();
    assert_eq!(reloaded.log_start_offset, 3000);
}

/// Replays `end` offsets of partition `partition` from 0, `fetch_bytes` a read, checking
/// every record; `between` runs after each read with the offset reached.
async fn replay_exactly(
    cold: &std::sync::Arc<ColdReader>,
    partition: u32,
    end: i64,
    fetch_bytes: usize,
    mut between: impl AsyncFnMut(i64),
) {
    let mut offset = 0;
    while offset < end {
        let read = cold
            .read(TOPIC, partition, offset, fetch_bytes)
            .await
            .unwrap();
        // About what was asked: batches rebuilt ahead are no larger than a Fetch asks for,
        // and a read stops within a record of its size.
        assert!(
            read.batches.len() <= fetch_bytes + 512,
            "{} bytes for a {fetch_bytes}-byte read",
            read.batches.len()
        );
        assert_contiguous_from(offset, &read.batches, assert_is_source);
        offset = read.next_offset;
        between(offset).await;
    }
    assert_eq!(offset, end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_goes_on_exactly_when_compaction_replaces_the_object_under_its_cursor() {
    let rows = ROW_GROUP_ROWS as i64;
    let store = ArchiveStore::open("memory://").unwrap();
    // The replay's cursor will sit in the second object (three row groups) when both objects
    // are merged into one under a new key and deleted, as compaction does. Without prefetch,
    // and with one permit to decode ahead (the row group after the cursor's), the object's
    // last row group is not fetched when the cursor gets there.
    let end = 2 * rows + 2000;
    let mut manifest = archive(&store, &[(0, 999), (1000, end - 1)]).await;
    let old: Vec<String> = manifest.objects.iter().map(|o| o.key.clone()).collect();
    let cold = ColdReader::new(
        store.clone(),
        ColdConfig {
            prefetch_max: 0,
            decode_ahead_max: 1,
            ..ColdConfig::default()
        },
    );
    let mut replaced = false;
    replay_exactly(&cold, 0, end, 256 << 10, async |offset: i64| {
        if !replaced && offset > 20_000 {
            replaced = true;
            assert_eq!(cold.stats().cursors, 1, "the replay keeps a cursor");
            let mut writer = ArchiveWriter::new(store.clone(), TOPIC, 0, 0, end - 1).unwrap();
            let mut from = 0;
            while from < end {
                let read = ColdReader::new(store.clone(), ColdConfig::default())
                    .read(TOPIC, 0, from, 1 << 20)
                    .await
                    .unwrap();
                for item in batches(&read.batches, usize::MAX) {
                    writer.push_batch(item.unwrap().1).await.unwrap();
                }
                from = read.next_offset;
            }
            let merged = writer.finish().await.unwrap();
            manifest.replace(0..2, merged, 0).unwrap();
            manifest.commit(&store).await.unwrap();
            for key in &old {
                let path = object_store::path::Path::from(key.as_str());
                object_store::ObjectStoreExt::delete(store.store().as_ref(), &path)
                    .await
                    .unwrap();
            }
        }
    })
    .await;
    assert!(replaced);
    assert!(
        cold.stats().manifest_loads >= 2,
        "the missing object reloaded the manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_bounded_by_their_limit_and_zero_turns_them_off() {
    let store = ArchiveStore::open("memory://").unwrap();
    for partition in 0..4 {
        archive_one(&store, partition, 3000, BATCH_RECORDS, record).await;
    }
    let cold = ColdReader::new(
        store.clone(),
        ColdConfig {
            replays_max: 2,
            ..ColdConfig::default()
        },
    );
    // Four partitions replayed in turn, a little of each at a time.
    let mut offsets = [0i64; 4];
    while offsets.iter().any(|&offset| offset < 3000) {
        for (partition, offset) in (0u32..).zip(offsets.iter_mut()) {
            if *offset == 3000 {
                continue;
            }
            let read = cold.read(TOPIC, partition, *offset, 4 << 10).await.unwrap();
            assert!(
                read.batches.len() <= (4 << 10) + 512,
                "{}",
                read.batches.len()
            );
            let records = decoded(&read.batches);
            assert_eq!(records[0].0, *offset);
            for (got_offset, got) in &records {
                assert_is_source(*got_offset, got);
            }
            *offset = read.next_offset;
            assert!(cold.stats().cursors <= 2, "{:?}", cold.stats());
        }
    }
    // Without replays every read stands alone, and the replay is just as exact.
    let cold = ColdReader::new(
        store,
        ColdConfig {
            replays_max: 0,
            ..ColdConfig::default()
        },
    );
    replay_exactly(&cold, 3, 3000, 4 << 10, async |_| {}).await;
    assert_eq!(cold.stats().cursors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_decodes_the_next_objects_rows_while_its_consumer_reads_this_one() {
    let store = ArchiveStore::open("memory://").unwrap();
    // One row group each: what is decoded ahead of object one can only be object two.
    let objects = [(0, 4_999), (5_000, 9_999), (10_000, 10_499)];
    archive(&store, &objects).await;
    // Two permits: objects two and three are both decoded ahead (a replay decodes two row
    // groups ahead) while the replay is still in object one.
    let config = ColdConfig {
        prefetch_max: 0,
        decode_ahead_max: 2,
        ..ColdConfig::default()
    };
    let cold = ColdReader::new(store, config);
    assert_eq!(cold.stats().decoding_ahead, 0);
    let mut offset = 0;
    for _ in 0..2 {
        let read = cold.read(TOPIC, 0, offset, 16 << 10).await.unwrap();
        offset = read.next_offset;
    }
    assert!(offset < 5_000, "still in object one");
    wait_for("objects two and three decoded ahead", || {
        cold.stats().decoding_ahead == 2
    })
    .await;
    // The rest reads exactly, across both boundaries, within the two permits; once the replay
    // is done, nothing is held.
    let mut most = 0;
    while offset < 10_500 {
        let read = cold.read(TOPIC, 0, offset, 64 << 10).await.unwrap();
        assert_contiguous_from(offset, &read.batches, assert_is_source);
        offset = read.next_offset;
        most = most.max(cold.stats().decoding_ahead);
    }
    assert_eq!(offset, 10_500);
    assert!(most <= 2, "{most} row groups decoded ahead on two permits");
    wait_for("the permit back", || cold.stats().decoding_ahead == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_records_replay_exactly() {
    // 96 KiB values: a row group of them is decoded a few rows at a time.
    let store = ArchiveStore::open("memory://").unwrap();
    let value = |offset: i64| Bytes::from(vec![b'a' + (offset % 26) as u8; 96 << 10]);
    archive_one(&store, 0, 300, 10, |offset| Record {
        timestamp: BASE_TS + offset,
        key: Some(Bytes::from(format!("k{offset}"))),
        value: Some(value(offset)),
        headers: vec![],
    })
    .await;
    // 1 MiB Fetches, as consumers' defaults ask, and 20 MiB ones: more than a replay's arenas
    // hold, so what a Fetch waits for is rebuilt straight into its answer.
    for fetch_bytes in [1 << 20, 20 << 20] {
        let cold = ColdReader::new(store.clone(), ColdConfig::default());
        let mut offset = 0;
        let mut fetches = 0;
        while offset < 300 {
            let read = cold.read(TOPIC, 0, offset, fetch_bytes).await.unwrap();
            assert_contiguous_from(offset, &read.batches, |at, got| {
                assert_eq!(got.key.as_deref(), Some(format!("k{at}").as_bytes()));
                assert_eq!(got.value.as_deref(), Some(&value(at)[..]));
                assert_eq!(got.timestamp, BASE_TS + at);
            });
            assert!(read.batches.len() <= fetch_bytes + (100 << 10));
            offset = read.next_offset;
            fetches += 1;
        }
        assert_eq!(offset, 300);
        assert!(fetches > 1, "{fetches} Fetches of {fetch_bytes} bytes");
    }
}
