//! The active segment's zero tail (`LogConfig::preallocate_bytes`): it is on disk ahead of the
//! data, invisible to everything that reads the log, gone from every closed segment, and the
//! end of the log (not damage) when a stop was unclean.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use silt_log::{LogConfig, LogError, LogManager, PartitionLog};

const CHUNK: u64 = 4096;

fn config(dir: &Path, segment_bytes: u64) -> LogConfig {
    let mut config = small_config(dir);
    config.topic_defaults.segment_bytes = segment_bytes;
    config.preallocate_bytes = CHUNK;
    config
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join("t/0").join(format!("{base:020}.log"))
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Appends `count` batches of 3 records tagged `tag`.
fn append_batches(log: &PartitionLog, tag: &str, count: usize) {
    for i in 0..count {
        log.append(&mut batch_of(&format!("{tag}{i}"), 3, 1_000 + i as i64))
            .unwrap();
    }
}

fn expected_values(tag: &str, count: usize) -> Vec<String> {
    (0..count)
        .flat_map(|i| (0..3).map(move |r| format!("{tag}{i}-{r}")))
        .collect()
}

/// Asserts the tail's bytes are zeros and the logical bytes are whole batches.
fn assert_zero_tail(path: &Path, logical: u64) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.len() as u64 > logical,
        "the active segment has a tail"
    );
    assert!(
        bytes[logical as usize..].iter().all(|byte| *byte == 0),
        "the tail is zeros"
    );
}

#[test]
fn the_tail_is_on_disk_but_invisible_to_readers_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 1 << 20), "t");
    assert!(
        log.preallocated_bytes() >= CHUNK,
        "opening sets up the tail"
    );
    append_batches(&log, "a", 10);
    let size = log.size_bytes();
    let path = segment_path(dir.path(), 0);
    assert!(file_len(&path) >= size + CHUNK, "at least a chunk ahead");
    assert_eq!(file_len(&path), size + log.preallocated_bytes());
    assert_zero_tail(&path, size);
    assert_eq!(
        manager.disk_stats().used_bytes,
        size,
        "the budget counts data"
    );
    assert_eq!(values(&read_all(&log, 0)), expected_values("a", 10));
    assert_eq!(log.log_end_offset(), 30);
    assert_eq!(log.high_watermark(), 30);
    // A read at the end sees nothing, not the zeros.
    assert!(log.read(30, 1 << 20).unwrap().bytes.is_empty());
    assert_eq!(log.offset_for_timestamp(1_009).unwrap(), Some((23, 1_009)));
    assert_eq!(log.offset_for_timestamp(5_000).unwrap(), None);
    let found = log
        .find_record(0, |record| {
            record.value.as_deref() == Some(b"a7-1".as_slice())
        })
        .unwrap();
    assert_eq!(found, Some(22));
    assert_eq!(log.find_record(0, |_| false).unwrap(), None);
    manager.close().unwrap();
}

#[test]
fn a_long_run_keeps_at_least_a_chunk_of_headroom() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 1 << 20), "t");
    let path = segment_path(dir.path(), 0);
    for round in 0..200 {
        append_batches(&log, &format!("r{round}-"), 1);
        let tail = log.preallocated_bytes();
        assert!(
            (CHUNK..2 * CHUNK).contains(&tail),
            "tail of {tail} bytes after round {round}"
        );
        assert_eq!(file_len(&path), log.size_bytes() + tail);
    }
    assert!(
        log.size_bytes() > 4 * CHUNK,
        "the run crossed several chunks"
    );
    manager.close().unwrap();
}

#[test]
fn roll_and_clean_close_cut_the_tail_off() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 2048), "t");
    append_batches(&log, "a", 80);
    let bases = log.segment_bases();
    assert!(bases.len() > 3, "the appends rolled segments");
    let closed = log.closed_segments();
    for summary in &closed {
        assert_eq!(
            file_len(&segment_path(dir.path(), summary.base_offset)),
            summary.size_bytes,
            "a closed segment ends at its last batch"
        );
    }
    // The tail never runs past `segment.bytes`.
    let active = segment_path(dir.path(), *bases.last().unwrap());
    assert!(file_len(&active) <= 2048);
    let active_size = log.size_bytes() - closed.iter().map(|s| s.size_bytes).sum::<u64>();
    manager.close().unwrap();
    drop((manager, log));
    assert_eq!(
        file_len(&active),
        active_size,
        "clean close cuts the active segment's tail"
    );
    let manager = LogManager::open(config(dir.path(), 2048)).unwrap();
    assert!(manager.opened_clean());
    let log = manager.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&log, 0)), expected_values("a", 80));
    append_batches(&log, "b", 1);
    assert_eq!(log.log_end_offset(), 243);
    manager.close().unwrap();
}

#[test]
fn an_unclean_stop_ends_the_log_at_the_tail_without_reporting_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 1 << 20), "t");
    append_batches(&log, "a", 12);
    let size = log.size_bytes();
    let path = segment_path(dir.path(), 0);
    assert_zero_tail(&path, size);
    drop((manager, log)); // no close: the next open recovers
    let manager = LogManager::open(config(dir.path(), 1 << 20)).unwrap();
    assert!(!manager.opened_clean());
    let report = manager.recovery_report();
    assert_eq!(report.bytes_truncated, 0, "a zero tail is not damage");
    assert_eq!(report.segments_removed, 0);
    let log = manager.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&log, 0)), expected_values("a", 12));
    assert_eq!(log.size_bytes(), size);
    assert!(log.preallocated_bytes() >= CHUNK, "the tail is back");
    append_batches(&log, "b", 2);
    assert_eq!(log.log_end_offset(), 42);
    manager.close().unwrap();
}

#[test]
fn a_torn_batch_before_the_zeros_is_still_truncated_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 1 << 20), "t");
    append_batches(&log, "a", 5);
    let size = log.size_bytes();
    let path = segment_path(dir.path(), 0);
    let len = file_len(&path);
    // The first 40 bytes of the next batch reached the disk, the rest did not: a torn write
    // over the tail.
    let next = batch_of("torn", 3, 0);
    let mut next = next.to_vec();
    next[0..8].copy_from_slice(&15i64.to_be_bytes());
    drop((manager, log));
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&path).unwrap(),
        &next[..40],
        size,
    )
    .unwrap();
    let manager = LogManager::open(config(dir.path(), 1 << 20)).unwrap();
    let report = manager.recovery_report();
    assert_eq!(
        report.bytes_truncated,
        len - size,
        "the torn batch and what follows it are cut and counted"
    );
    let log = manager.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&log, 0)), expected_values("a", 5));
    manager.close().unwrap();
}

#[test]
fn zeros_after_a_closed_segment_are_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 2048), "t");
    append_batches(&log, "a", 30);
    let first_closed = log.closed_segments()[0];
    manager.close().unwrap();
    drop((manager, log));
    let path = segment_path(dir.path(), first_closed.base_offset);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(first_closed.size_bytes + 512).unwrap();
    drop(file);
    match LogManager::open(config(dir.path(), 2048)) {
        Err(LogError::Corrupt { .. }) => {}
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn truncation_retention_and_deletes_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, log) = open_partition(config(dir.path(), 2048), "t");
    append_batches(&log, "a", 30);
    // Truncate inside the active segment, then append again: the new batches overwrite
    // the old bytes and the zeros, and read back whole.
    let end = log.truncate_to(85).unwrap();
    assert_eq!(end, 84, "whole batches go");
    append_batches(&log, "b", 3);
    let mut expected = expected_values("a", 28);
    expected.extend(expected_values("b", 3));
    assert_eq!(values(&read_all(&log, 0)), expected);
    let active_base = *log.segment_bases().last().unwrap();
    let active = segment_path(dir.path(), active_base);
    let closed_bytes: u64 = log.closed_segments().iter().map(|s| s.size_bytes).sum();
    assert_eq!(
        file_len(&active),
        log.size_bytes() - closed_bytes + log.preallocated_bytes()
    );
    // Truncation into a closed segment removes the later ones; the new active segment
    // takes appends and gets a tail again.
    let second = log.segment_bases()[1];
    log.truncate_to(second + 1).unwrap();
    append_batches(&log, "c", 2);
    assert!(log.preallocated_bytes() > 0);
    let kept = log.log_end_offset();
    // delete_before rolls the active segment when everything goes, cutting its tail.
    let report = log.delete_before(kept).unwrap();
    assert!(report.segments > 0);
    for summary in log.closed_segments() {
        assert_eq!(
            file_len(&segment_path(dir.path(), summary.base_offset)),
            summary.size_bytes
        );
    }
    assert_eq!(log.log_start_offset(), kept);
    assert!(log.read(kept, 1 << 16).unwrap().bytes.is_empty());
    append_batches(&log, "d", 2);
    assert_eq!(values(&read_all(&log, kept)), expected_values("d", 2));
    drop((manager, log));
    // And an unclean stop after all of it recovers the same log.
    let manager = LogManager::open(config(dir.path(), 2048)).unwrap();
    assert_eq!(manager.recovery_report().bytes_truncated, 0);
    let log = manager.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&log, kept)), expected_values("d", 2));
    manager.close().unwrap();
}

#[test]
fn off_by_default_leaves_no_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 1 << 20);
    config.preallocate_bytes = 0;
    assert_eq!(LogConfig::new(dir.path()).preallocate_bytes, 0);
    let (manager, log) = open_partition(config, "t");
    append_batches(&log, "a", 5);
    assert_eq!(log.preallocated_bytes(), 0);
    assert_eq!(file_len(&segment_path(dir.path(), 0)), log.size_bytes());
    manager.close().unwrap();
}

#[test]
fn no_zeros_eat_into_the_filesystem_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), 1 << 20);
    // More than any test machine has free: every append and every extension is refused.
    config.fs_reserve_bytes = 1 << 60;
    let (manager, log) = open_partition(config, "t");
    assert_eq!(log.preallocated_bytes(), 0, "opening skipped the tail");
    log.extend_preallocation().unwrap();
    assert_eq!(log.preallocated_bytes(), 0);
    assert!(matches!(
        log.append(&mut batch_of("a", 1, 0)),
        Err(LogError::FilesystemFull { .. })
    ));
    assert_eq!(file_len(&segment_path(dir.path(), 0)), 0);
    manager.close().unwrap();
}
