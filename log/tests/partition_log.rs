//! Behaviour of a partition log and its data directory, against real files.

mod common;

use std::sync::Arc;

use common::*;
use silt_log::batch::{Compression, Header, Record};
use silt_log::{
    AppendOptions, BudgetPolicy, DiskBudget, LogConfig, LogError, LogManager, OffsetAssignment,
};

#[test]
fn append_assigns_contiguous_offsets_and_reads_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    let mut expected = Vec::new();
    for round in 0..50 {
        let mut batch = batch_of(&format!("r{round}"), 7, 1_000 + round * 10);
        let info = log.append(&mut batch).unwrap();
        assert_eq!(info.base_offset, round as u64 * 7);
        assert_eq!(info.last_offset, round as u64 * 7 + 6);
        expected.extend((0..7).map(|i| format!("r{round}-{i}")));
    }
    assert_eq!(log.log_end_offset(), 350);
    assert_eq!(log.high_watermark(), 350);
    assert!(log.segment_count() > 3, "1 KiB segments must roll");
    let records = read_all(&log, 0);
    assert_eq!(values(&records), expected);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.offset, i as i64);
    }
    // Reads from any offset start with the batch holding it, in every segment.
    for offset in 0..350u64 {
        let slice = log.read(offset, 1).unwrap();
        let (header, records, _) = silt_log::batch::decode_batch(&slice.bytes, &Default::default())
            .unwrap()
            .unwrap();
        assert!(header.base_offset as u64 <= offset && offset <= header.last_offset() as u64);
        assert_eq!(
            records.len(),
            7,
            "max_bytes below one batch still returns the whole batch"
        );
    }
    assert!(log.read(350, 100).unwrap().bytes.is_empty());
    assert!(matches!(
        log.read(351, 100),
        Err(LogError::OffsetOutOfRange { .. })
    ));
}

#[test]
fn read_respects_max_bytes_with_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.topic_defaults.segment_bytes = 1 << 20;
    let (_manager, log) = open_partition(config, "t");
    let mut sizes = Vec::new();
    for round in 0..20 {
        let mut batch = batch_of(&format!("r{round}"), 5, 0);
        sizes.push(batch.len());
        log.append(&mut batch).unwrap();
    }
    let slice = log.read(0, sizes[0] + sizes[1] + 10).unwrap();
    assert_eq!(slice.bytes.len(), sizes[0] + sizes[1]);
    let slice = log.read(12, 1 << 20).unwrap();
    assert_eq!(slice.bytes.len(), sizes.iter().skip(2).sum::<usize>());
}

#[test]
fn headers_keys_and_zstd_survive_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    let records: Vec<Record> = (0..100)
        .map(|i| Record {
            timestamp: 1_700_000_000_000 + i,
            key: if i % 2 == 0 {
                None
            } else {
                Some(format!("k{i}").into())
            },
            value: Some(vec![b'x'; 50].into()),
            headers: vec![Header {
                key: "qos".into(),
                value: Some(format!("{}", i % 3).into()),
            }],
        })
        .collect();
    let mut batch = encode(&records, Compression::Zstd);
    log.append(&mut batch).unwrap();
    let read = read_all(&log, 0);
    assert_eq!(read.len(), 100);
    for (record, original) in read.iter().zip(&records) {
        assert_eq!(record.key, original.key);
        assert_eq!(record.value, original.value);
        assert_eq!(record.headers, original.headers);
        assert_eq!(record.timestamp, original.timestamp);
    }
}

#[test]
fn invalid_batches_are_rejected_without_touching_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    let mut good = batch_of("a", 3, 0);
    log.append(&mut good).unwrap();
    let mut corrupt = batch_of("b", 3, 0);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert!(matches!(
        log.append(&mut corrupt),
        Err(LogError::InvalidBatch(_))
    ));
    let mut truncated = batch_of("c", 3, 0);
    truncated.truncate(truncated.len() - 1);
    assert!(matches!(
        log.append(&mut truncated),
        Err(LogError::InvalidBatch(_))
    ));
    assert!(matches!(
        log.append(&mut []),
        Err(LogError::InvalidBatch(_))
    ));
    let mut garbage = vec![0xAB; 200];
    assert!(matches!(
        log.append(&mut garbage),
        Err(LogError::InvalidBatch(_))
    ));
    assert_eq!(log.log_end_offset(), 3);
    assert_eq!(values(&read_all(&log, 0)), ["a-0", "a-1", "a-2"]);

    // A caller that computed the CRCs itself saves the append a pass over the bytes, but
    // not the checks of headers and lengths.
    let crc_computed = AppendOptions {
        crc_computed: true,
        ..AppendOptions::default()
    };
    for mut invalid in [truncated.to_vec(), garbage, vec![]] {
        assert!(matches!(
            log.append_with(&mut invalid, crc_computed),
            Err(LogError::InvalidBatch(_))
        ));
    }
    let huge = Record {
        value: Some(bytes::Bytes::from(vec![
            0u8;
            small_config(dir.path())
                .max_batch_bytes
        ])),
        ..Record::default()
    };
    let mut too_large = encode(&[huge], Compression::None);
    assert!(matches!(
        log.append_with(&mut too_large, crc_computed),
        Err(LogError::InvalidBatch(_))
    ));
    let mut built = batch_of("d", 2, 0);
    log.append_with(&mut built, crc_computed).unwrap();
    assert_eq!(log.log_end_offset(), 5);
    assert_eq!(values(&read_all(&log, 3)), ["d-0", "d-1"]);
}

#[test]
fn several_batches_in_one_append_and_follower_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    let mut both = batch_of("a", 2, 0);
    both.extend_from_slice(&batch_of("b", 3, 0));
    let info = log.append(&mut both).unwrap();
    assert_eq!(
        (info.base_offset, info.last_offset, info.batch_count),
        (0, 4, 2)
    );

    // A follower keeps the leader's offsets, which must not go backwards.
    let mut gap = batch_of("g", 2, 0);
    silt_log::batch::set_base_offset(&mut gap, 10);
    let keep = AppendOptions {
        offsets: OffsetAssignment::Keep,
        leader_epoch: Some(7),
        ..AppendOptions::default()
    };
    assert!(matches!(
        log.append_with(&mut gap, keep),
        Err(LogError::OffsetOrder { .. })
    ));
    let mut follower_batch = batch_of("f", 2, 0);
    silt_log::batch::set_base_offset(&mut follower_batch, 5);
    let info = log.append_with(&mut follower_batch, keep).unwrap();
    assert_eq!((info.base_offset, info.last_offset), (5, 6));
    let mut stale = batch_of("s", 1, 0);
    silt_log::batch::set_base_offset(&mut stale, 3);
    assert!(matches!(
        log.append_with(&mut stale, keep),
        Err(LogError::OffsetOrder { .. })
    ));
    let slice = log.read(5, 1000).unwrap();
    let header = silt_log::batch::BatchHeader::parse(&slice.bytes)
        .unwrap()
        .unwrap();
    assert_eq!(header.partition_leader_epoch, 7);
    assert_eq!(log.log_end_offset(), 7);
}

#[test]
fn offset_for_timestamp_finds_first_record_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    // Batch i holds timestamps 1000*i .. 1000*i+4 at offsets 5i..5i+4.
    for i in 0..40 {
        let mut batch = batch_of("t", 5, 1_000 * i);
        log.append(&mut batch).unwrap();
    }
    assert_eq!(log.offset_for_timestamp(-5).unwrap(), Some((0, 0)));
    assert_eq!(log.offset_for_timestamp(3).unwrap(), Some((3, 3)));
    assert_eq!(log.offset_for_timestamp(5).unwrap(), Some((5, 1_000)));
    assert_eq!(
        log.offset_for_timestamp(17_002).unwrap(),
        Some((87, 17_002))
    );
    assert_eq!(
        log.offset_for_timestamp(39_004).unwrap(),
        Some((199, 39_004))
    );
    assert_eq!(log.offset_for_timestamp(39_005).unwrap(), None);
    // The answer is the same after a clean reopen that loads the indexes from disk.
}

#[test]
fn segments_roll_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.topic_defaults.segment_bytes = 1 << 20;
    config.topic_defaults.segment_ms = 1;
    let (_manager, log) = open_partition(config, "t");
    let mut batch = batch_of("a", 1, 0);
    log.append(&mut batch).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // segment.ms is 1 ms: wait until a millisecond has certainly passed, then append again.
    let start = silt_log::now_ms();
    while silt_log::now_ms() < start + 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    let mut batch = batch_of("b", 1, 0);
    log.append(&mut batch).unwrap();
    assert_eq!(log.segment_bases(), vec![0, 1]);
}

#[test]
fn truncate_to_removes_a_suffix_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(small_config(dir.path()), "t");
    for i in 0..60 {
        let mut batch = batch_of(&format!("r{i}"), 4, i);
        log.append(&mut batch).unwrap();
    }
    let segments_before = log.segment_count();
    // 98 sits inside the batch 96..=99, which goes whole.
    assert_eq!(log.truncate_to(98).unwrap(), 96);
    assert_eq!(log.log_end_offset(), 96);
    assert!(log.segment_count() < segments_before);
    let records = read_all(&log, 0);
    assert_eq!(records.len(), 96);
    let mut batch = batch_of("new", 2, 0);
    assert_eq!(log.append(&mut batch).unwrap().base_offset, 96);
    manager.close().unwrap();
    drop((manager, log));
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    let records = read_all(&log, 0);
    assert_eq!(records.len(), 98);
    assert_eq!(values(&records[96..]), ["new-0", "new-1"]);
}

#[test]
fn delete_before_advances_log_start_durably() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(small_config(dir.path()), "t");
    for i in 0..60 {
        let mut batch = batch_of(&format!("r{i}"), 4, i);
        log.append(&mut batch).unwrap();
    }
    let report = log.delete_before(101).unwrap();
    assert!(report.segments > 0);
    assert_eq!(log.log_start_offset(), 101);
    assert!(log.local_start_offset() == 101);
    assert!(matches!(
        log.read(100, 10),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    let first = read_all(&log, 101);
    assert_eq!(first[0].offset, 101);
    // Deleting everything keeps an empty active segment at the end.
    log.delete_before(240).unwrap();
    assert_eq!(log.segment_bases(), vec![240]);
    assert_eq!(log.log_start_offset(), 240);
    // Unclean reopen (drop without close) keeps the log start.
    drop((manager, log));
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    assert_eq!(log.log_start_offset(), 240);
    assert_eq!(log.log_end_offset(), 240);
    let mut batch = batch_of("after", 1, 0);
    assert_eq!(log.append(&mut batch).unwrap().base_offset, 240);
}

#[test]
fn retention_by_size_and_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let manager = LogManager::open(config).unwrap();
    manager
        .create_topic(
            "sized",
            1,
            &overrides(&[("segment.bytes", "2048"), ("retention.bytes", "8192")]),
        )
        .unwrap();
    manager
        .create_topic(
            "timed",
            1,
            &overrides(&[("segment.bytes", "2048"), ("retention.ms", "60000")]),
        )
        .unwrap();
    let sized = manager.partition("sized", 0).unwrap();
    let timed = manager.partition("timed", 0).unwrap();
    let now = silt_log::now_ms();
    for i in 0..100 {
        let mut batch = batch_of(&format!("s{i}"), 4, now);
        sized.append(&mut batch).unwrap();
        // The first half is two hours old, the second half fresh.
        let timestamp = if i < 50 { now - 7_200_000 } else { now };
        let mut batch = batch_of(&format!("t{i}"), 4, timestamp);
        timed.append(&mut batch).unwrap();
    }
    let before = sized.size_bytes();
    let report = manager.enforce_retention(now).unwrap();
    assert!(report.segments > 0);
    assert!(
        sized.size_bytes() >= 8192,
        "retention.bytes keeps at least the limit"
    );
    assert!(sized.size_bytes() < before);
    assert!(
        sized.size_bytes() < 8192 + 2048 + 1024,
        "and at most one segment more"
    );
    assert!(sized.log_start_offset() > 0);
    // Time retention drops the old half and nothing fresh.
    let start = timed.log_start_offset();
    assert!(start > 0 && start <= 200, "start {start}");
    let first = read_all(&timed, start);
    assert!(first.iter().all(|r| r.timestamp >= now - 7_200_000));
    assert_eq!(first.last().unwrap().offset, 399);
}

#[test]
fn budget_reject_refuses_appends_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.budget = Some(DiskBudget {
        bytes_max: 16 * 1024,
        policy: BudgetPolicy::Reject,
    });
    let (manager, log) = open_partition(config, "t");
    let mut accepted = 0;
    let mut rejected = false;
    for i in 0..1000 {
        let mut batch = batch_of(&format!("r{i}"), 4, 0);
        match log.append(&mut batch) {
            Ok(_) => accepted += 4,
            Err(LogError::BudgetExceeded {
                used_bytes,
                budget_bytes,
            }) => {
                assert!(used_bytes <= budget_bytes);
                rejected = true;
                break;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(rejected);
    assert_eq!(read_all(&log, 0).len(), accepted);
    assert!(manager.disk_stats().rejected_appends >= 1);
    assert!(manager.disk_stats().used_bytes <= 16 * 1024);
    // Freeing space lets appends resume.
    log.delete_before(accepted as u64 / 2).unwrap();
    let mut batch = batch_of("again", 1, 0);
    log.append(&mut batch).unwrap();
}

#[test]
fn budget_drop_oldest_keeps_newest_and_counts_drops() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.budget = Some(DiskBudget {
        bytes_max: 16 * 1024,
        policy: BudgetPolicy::DropOldest,
    });
    let manager = LogManager::open(config).unwrap();
    manager.create_topic("t", 2, &Default::default()).unwrap();
    let logs = [
        manager.partition("t", 0).unwrap(),
        manager.partition("t", 1).unwrap(),
    ];
    for i in 0..600 {
        let mut batch = batch_of(&format!("r{i}"), 4, i);
        logs[i as usize % 2].append(&mut batch).unwrap();
    }
    let stats = manager.disk_stats();
    assert!(stats.used_bytes <= 16 * 1024);
    assert!(stats.dropped_segments > 0 && stats.dropped_bytes > 0);
    let kept: u64 = logs
        .iter()
        .map(|l| l.log_end_offset() - l.log_start_offset())
        .sum();
    assert_eq!(kept + stats.dropped_offsets, 2400);
    // The newest records are all there.
    for log in &logs {
        let records = read_all(log, log.log_start_offset());
        assert_eq!(
            records.last().unwrap().offset as u64,
            log.log_end_offset() - 1
        );
    }
}

#[test]
fn concurrent_appenders_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.topic_defaults.segment_bytes = 64 << 20;
    let (_manager, log) = open_partition(config, "t");
    let threads = 8;
    let per_thread = 200;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let log = Arc::clone(&log);
            scope.spawn(move || {
                for i in 0..per_thread {
                    let mut batch = batch_of(&format!("{t}:{i}"), 1, 0);
                    log.append(&mut batch).unwrap();
                }
            });
        }
    });
    let appends = (threads * per_thread) as u64;
    assert_eq!(log.log_end_offset(), appends);
    let fsyncs = log.fsync_count();
    assert!(
        fsyncs < appends,
        "{fsyncs} fsyncs for {appends} appends: no group commit"
    );
    // Per-thread order is kept.
    let records = read_all(&log, 0);
    for t in 0..threads {
        let mine: Vec<_> = values(&records)
            .into_iter()
            .filter(|v| v.starts_with(&format!("{t}:")))
            .collect();
        let expected: Vec<_> = (0..per_thread).map(|i| format!("{t}:{i}-0")).collect();
        assert_eq!(mine, expected);
    }
}

#[test]
fn topics_persist_with_config_and_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path());
    let manager = LogManager::open(config.clone()).unwrap();
    manager
        .create_topic(
            "sensors.temp",
            3,
            &overrides(&[("retention.ms", "-1"), ("segment.bytes", "1048576")]),
        )
        .unwrap();
    manager
        .create_topic("other", 1, &Default::default())
        .unwrap();
    assert!(matches!(
        manager.create_topic("other", 1, &Default::default()),
        Err(LogError::TopicExists(_))
    ));
    for bad in ["", ".", "..", "a/b", "../etc", "x y", &"n".repeat(250)] {
        assert!(
            matches!(
                manager.create_topic(bad, 1, &Default::default()),
                Err(LogError::InvalidTopicName { .. })
            ),
            "{bad:?} must be refused"
        );
    }
    assert!(matches!(
        manager.create_topic("zero", 0, &Default::default()),
        Err(LogError::InvalidPartitionCount(0))
    ));
    let error = manager
        .create_topic("badconf", 1, &overrides(&[("segment.bytes", "big")]))
        .unwrap_err();
    assert!(error.to_string().contains("segment.bytes"), "{error}");
    manager
        .alter_topic_config("other", &overrides(&[("retention.bytes", "1000")]))
        .unwrap();
    manager.close().unwrap();
    drop(manager);

    let manager = LogManager::open(config.clone()).unwrap();
    assert!(manager.opened_clean());
    let topics = manager.topics();
    assert_eq!(
        topics.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["other", "sensors.temp"]
    );
    let sensors = manager.topic("sensors.temp").unwrap();
    assert_eq!(sensors.partitions, 3);
    assert_eq!(sensors.config.retention_ms, None);
    assert_eq!(sensors.config.segment_bytes, 1 << 20);
    assert_eq!(
        manager.topic("other").unwrap().config.retention_bytes,
        Some(1000)
    );
    manager.delete_topic("other").unwrap();
    assert!(manager.topic("other").is_none());
    assert!(!dir.path().join("other").exists());
    drop(manager);
    let manager = LogManager::open(config).unwrap();
    assert!(!manager.opened_clean(), "dropped without close is unclean");
    assert_eq!(manager.topics().len(), 1);
}

#[test]
fn data_dir_is_locked_and_foreign_dirs_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path().join("data"));
    let manager = LogManager::open(config.clone()).unwrap();
    assert!(matches!(
        LogManager::open(config.clone()),
        Err(LogError::Locked { .. })
    ));
    drop(manager);
    LogManager::open(config).unwrap();

    let foreign = dir.path().join("home");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    let error = LogManager::open(LogConfig::new(&foreign)).unwrap_err();
    assert!(
        matches!(error, LogError::ForeignDirectory { .. }),
        "{error}"
    );
    assert!(foreign.join("notes.txt").exists());
}

#[test]
fn reserved_node_dirs_are_skipped_and_no_topic_takes_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig::new(dir.path().join("data"));
    let manager = LogManager::open(config.clone()).unwrap();
    manager.ensure_topic("t", 1).unwrap();
    manager.close().unwrap();
    drop(manager);
    // A core keeps its development CA in <data-dir>/tls.
    let tls = dir.path().join("data").join("tls");
    std::fs::create_dir(&tls).unwrap();
    std::fs::write(tls.join("ca.pem"), "-----BEGIN CERTIFICATE-----").unwrap();
    let manager = LogManager::open(config).unwrap();
    assert_eq!(manager.topics().len(), 1);
    let error = manager
        .create_topic("tls", 1, &Default::default())
        .unwrap_err();
    assert!(
        matches!(error, LogError::InvalidTopicName { .. }),
        "{error}"
    );
    assert!(tls.join("ca.pem").exists());
}

#[test]
fn foreign_and_corrupt_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let (manager, log) = open_partition(config.clone(), "t");
    for i in 0..30 {
        let mut batch = batch_of(&format!("r{i}"), 4, 0);
        log.append(&mut batch).unwrap();
    }
    manager.close().unwrap();
    drop((manager, log));
    let partition_dir = dir.path().join("t").join("0");

    std::fs::write(partition_dir.join("stray.bin"), "x").unwrap();
    assert!(matches!(
        LogManager::open(config.clone()),
        Err(LogError::ForeignFile { .. })
    ));
    std::fs::remove_file(partition_dir.join("stray.bin")).unwrap();

    let checkpoint = partition_dir.join("checkpoint");
    let saved = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, "{not json").unwrap();
    assert!(matches!(
        LogManager::open(config.clone()),
        Err(LogError::Corrupt { .. })
    ));
    std::fs::write(&checkpoint, saved).unwrap();

    // Garbage in the middle of a closed segment is corruption, reported by file.
    let first = partition_dir.join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&first).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 8].copy_from_slice(&[0xff; 8]);
    std::fs::write(&first, &bytes).unwrap();
    std::fs::write(dir.path().join(".clean_shutdown"), "").unwrap();
    match LogManager::open(config) {
        Err(LogError::Corrupt { path, .. }) => assert_eq!(path, first),
        other => panic!("expected corruption error, got {other:?}"),
    }
}

#[test]
fn missing_or_bad_index_files_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let (manager, log) = open_partition(config.clone(), "t");
    for i in 0..60 {
        let mut batch = batch_of(&format!("r{i}"), 4, i * 10);
        log.append(&mut batch).unwrap();
    }
    let expected = read_all(&log, 0);
    manager.close().unwrap();
    drop((manager, log));
    let partition_dir = dir.path().join("t").join("0");
    std::fs::remove_file(partition_dir.join(format!("{:020}.index", 0))).unwrap();
    let timeindex = std::fs::read_dir(&partition_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "timeindex")
                && !p.ends_with(format!("{:020}.timeindex", 0))
        })
        .unwrap();
    std::fs::write(&timeindex, [1, 2, 3]).unwrap();
    let (_manager, log) = open_partition(config, "t");
    assert_eq!(read_all(&log, 0), expected);
    assert_eq!(log.offset_for_timestamp(300).unwrap(), Some((120, 300)));
}

#[test]
fn appends_are_refused_before_the_filesystem_fills() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    // A reserve larger than any real free space: the filesystem is "full" for the log.
    config.fs_reserve_bytes = u64::MAX / 4;
    let (manager, log) = open_partition(config, "t");
    let mut batch = batch_of("a", 1, 0);
    let error = log.append(&mut batch).unwrap_err();
    assert!(matches!(error, LogError::FilesystemFull { .. }), "{error}");
    assert!(error.is_retriable());
    assert_eq!(log.log_end_offset(), 0);
    assert_eq!(manager.disk_stats().rejected_appends, 1);
}

#[test]
fn relaxed_flush_acknowledges_before_fsync_and_flushes_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.flush = silt_log::FlushPolicy::RelaxedUnsafe {
        interval: std::time::Duration::from_millis(20),
    };
    let (manager, log) = open_partition(config, "t");
    for i in 0..20 {
        let mut batch = batch_of(&format!("r{i}"), 2, 0);
        log.append(&mut batch).unwrap();
    }
    // Visible at once, durable only when the flusher runs (segment rolls fsync too).
    assert_eq!(log.high_watermark(), 40);
    let fsyncs_after_appends = log.fsync_count();
    assert!(
        fsyncs_after_appends < 20,
        "relaxed appends must not each fsync"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while log.fsync_count() == fsyncs_after_appends {
        assert!(
            std::time::Instant::now() < deadline,
            "the background flusher never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    manager.close().unwrap();
}

#[test]
fn a_huge_read_request_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = small_config(dir.path());
    config.topic_defaults.segment_bytes = 1 << 30;
    let (_manager, log) = open_partition(config, "t");
    let value = bytes::Bytes::from(vec![7u8; 1_000_000]);
    let record = Record {
        timestamp: 0,
        key: None,
        value: Some(value),
        headers: Vec::new(),
    };
    let mut total = 0;
    while total <= silt_log::READ_BYTES_MAX + (2 << 20) {
        let mut batch = encode(std::slice::from_ref(&record), Compression::None);
        total += batch.len() as u64;
        log.append(&mut batch).unwrap();
    }
    let slice = log.read(0, usize::MAX).unwrap();
    assert!(!slice.bytes.is_empty());
    assert!(slice.bytes.len() as u64 <= silt_log::READ_BYTES_MAX);
    assert!((slice.bytes.len() as u64) < total);
}

#[test]
fn find_record_scans_forward_from_an_offset_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    for round in 0..30 {
        let mut batch = batch_of(&format!("r{round}"), 5, 0);
        log.append(&mut batch).unwrap();
    }
    assert!(log.segment_count() > 3, "1 KiB segments must roll");
    let value_is = |wanted: &'static str| {
        move |record: &silt_log::batch::DecodedRecord| {
            record.value.as_deref() == Some(wanted.as_bytes())
        }
    };
    // Found from below it (in an earlier segment), from itself, not from past it.
    assert_eq!(log.find_record(0, value_is("r20-3")).unwrap(), Some(103));
    assert_eq!(log.find_record(103, value_is("r20-3")).unwrap(), Some(103));
    assert_eq!(log.find_record(104, value_is("r20-3")).unwrap(), None);
    // From the middle of a batch, the records before the offset are skipped.
    assert_eq!(log.find_record(101, value_is("r20-0")).unwrap(), None);
    assert_eq!(log.find_record(0, value_is("absent")).unwrap(), None);
    // At or past the end: nothing, and no error.
    assert_eq!(log.find_record(150, value_is("r0-0")).unwrap(), None);
    assert_eq!(log.find_record(10_000, value_is("r0-0")).unwrap(), None);
    // Below the log start: the scan starts at the start.
    log.delete_before(50).unwrap();
    assert_eq!(log.find_record(0, value_is("r0-0")).unwrap(), None);
    assert_eq!(log.find_record(0, value_is("r29-4")).unwrap(), Some(149));
}

#[test]
fn an_unsynced_append_is_visible_only_once_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    log.append(&mut batch_of("a", 3, 0)).unwrap();
    let fsyncs = log.fsync_count();
    let info = log
        .append_unsynced(&mut batch_of("b", 4, 0), AppendOptions::default())
        .unwrap();
    assert_eq!((info.base_offset, info.last_offset), (3, 6));
    assert_eq!(log.log_end_offset(), 7);
    assert_eq!(log.fsync_count(), fsyncs, "no fsync yet");
    assert_eq!(log.high_watermark(), 3, "readers see only durable records");
    assert_eq!(read_all(&log, 0).len(), 3);
    // The next write goes on while the first is unsynced; one fsync covers both.
    log.append_unsynced(&mut batch_of("c", 2, 0), AppendOptions::default())
        .unwrap();
    log.sync_through(info.last_offset + 1).unwrap();
    assert_eq!(log.fsync_count(), fsyncs + 1);
    assert_eq!(log.high_watermark(), 9);
    log.sync_through(9).unwrap();
    assert_eq!(
        log.fsync_count(),
        fsyncs + 1,
        "already durable: no second fsync"
    );
    assert_eq!(read_all(&log, 0).len(), 9);
}

#[test]
fn a_follower_sleeps_until_new_data_is_durable() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), "t");
    // Nothing new: the wait ends at its timeout with the current high watermark.
    let start = Instant::now();
    assert_eq!(
        log.wait_for_high_watermark(0, Duration::from_millis(150)),
        0
    );
    assert!(start.elapsed() >= Duration::from_millis(150));
    // An append wakes a waiter long before its timeout.
    let waiter = {
        let log = log.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            (
                log.wait_for_high_watermark(0, Duration::from_secs(30)),
                start.elapsed(),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    log.append(&mut batch_of("w", 3, 1_000)).unwrap();
    let (high_watermark, waited) = waiter.join().unwrap();
    assert_eq!(high_watermark, 3);
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Data already past the offset returns at once.
    assert_eq!(log.wait_for_high_watermark(1, Duration::from_secs(30)), 3);
}

/// A data directory as made before logs had ids, in `parent`.
fn made_before_ids(parent: &std::path::Path) -> std::path::PathBuf {
    let dir = parent.join("made-before-ids");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("meta.json"),
        br#"{"format":"silt-log","version":1}"#,
    )
    .unwrap();
    dir
}

#[test]
fn a_log_keeps_the_id_it_was_created_with_and_another_log_has_another() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let id = {
        let manager = LogManager::open(LogConfig::new(&first)).unwrap();
        let id = manager.id().expect("a new log has an id");
        assert!(
            id.len() == 16 && id.bytes().all(|byte| byte.is_ascii_hexdigit()),
            "{id}"
        );
        manager.close().unwrap();
        id
    };
    let manager = LogManager::open(LogConfig::new(&first)).unwrap();
    assert_eq!(manager.id(), Some(id.clone()), "the id survives a reopen");
    drop(manager);

    // The same place emptied and used again: a new log, a new id.
    std::fs::remove_dir_all(&first).unwrap();
    let manager = LogManager::open(LogConfig::new(&first)).unwrap();
    assert_ne!(manager.id(), Some(id.clone()));
    drop(manager);

    // A directory made before logs had ids keeps none.
    let old = made_before_ids(dir.path());
    let manager = LogManager::open(LogConfig::new(&old)).unwrap();
    assert_eq!(manager.id(), None);
    drop(manager);

    // A damaged id is refused with a reason, not passed on.
    for bad in ["", "not hex", &"a".repeat(33)] {
        let meta = format!(r#"{{"format":"silt-log","version":1,"id":{bad:?}}}"#);
        std::fs::write(old.join("meta.json"), meta).unwrap();
        let error = LogManager::open(LogConfig::new(&old)).unwrap_err();
        assert!(
            matches!(&error, LogError::ForeignDirectory { reason, .. } if reason.contains("hex digits")),
            "{bad:?}: {error}"
        );
    }
}

#[test]
fn a_renewed_id_replaces_the_old_one_durably_and_the_records_stay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (old, renewed) = {
        let manager = LogManager::open(LogConfig::new(&path)).unwrap();
        manager.create_topic("t", 1, &Default::default()).unwrap();
        let log = manager.partition("t", 0).unwrap();
        log.append(&mut batch_of("a", 2, 1_000)).unwrap();
        let old = manager.id().unwrap();
        let renewed = manager.renew_id().unwrap();
        assert_ne!(renewed, old);
        assert_eq!(manager.id(), Some(renewed.clone()));
        manager.close().unwrap();
        (old, renewed)
    };
    let manager = LogManager::open(LogConfig::new(&path)).unwrap();
    assert_eq!(
        manager.id(),
        Some(renewed),
        "the new id is what meta.json holds"
    );
    assert_eq!(manager.partition("t", 0).unwrap().high_watermark(), 2);
    drop(manager);

    // A directory made before logs had ids gets one.
    let pre_ids = made_before_ids(dir.path());
    let manager = LogManager::open(LogConfig::new(&pre_ids)).unwrap();
    let given = manager.renew_id().unwrap();
    assert_ne!(given, old);
    drop(manager);
    let manager = LogManager::open(LogConfig::new(&pre_ids)).unwrap();
    assert_eq!(manager.id(), Some(given));
}

#[test]
fn a_recorded_host_survives_a_reopen_and_a_renewal_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let manager = LogManager::open(LogConfig::new(&path)).unwrap();
    assert_eq!(
        manager.host(),
        None,
        "a new log has no host until one is recorded"
    );
    manager.set_host("0a1b2c").unwrap();
    manager.renew_id().unwrap();
    let id = manager.id();
    for bad in ["", "not hex", &"a".repeat(65)] {
        assert!(
            matches!(manager.set_host(bad), Err(LogError::InvalidHost(_))),
            "{bad:?}"
        );
    }
    manager.close().unwrap();
    drop(manager);
    let manager = LogManager::open(LogConfig::new(&path)).unwrap();
    assert_eq!(manager.host().as_deref(), Some("0a1b2c"));
    assert_eq!(manager.id(), id);
    drop(manager);

    // A field a later build added does not lock this one out.
    let meta = r#"{"format":"silt-log","version":1,"id":"ab","host":"cd","later":[1]}"#;
    std::fs::write(path.join("meta.json"), meta).unwrap();
    let manager = LogManager::open(LogConfig::new(&path)).unwrap();
    assert_eq!(manager.host().as_deref(), Some("cd"));
    drop(manager);

    // A damaged host in meta.json is refused at open, with a reason.
    let meta = format!(
        r#"{{"format":"silt-log","version":1,"id":"ab","host":"{}"}}"#,
        "z"
    );
    std::fs::write(path.join("meta.json"), meta).unwrap();
    let error = LogManager::open(LogConfig::new(&path)).unwrap_err();
    assert!(
        matches!(&error, LogError::ForeignDirectory { reason, .. } if reason.contains("host")),
        "{error}"
    );
}
