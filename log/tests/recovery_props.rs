//! Recovery keeps exactly the valid prefix: property tests that damage the last segment of a
//! log left by an unclean stop, by cutting it at any byte or flipping bytes in it, then reopen.
//! Each runs with and without a preallocated zero tail after the last segment's batches.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;
use silt_log::batch::{self, BatchHeader};
use silt_log::{LogConfig, LogManager};

/// Writes `batch_sizes.len()` batches to a fresh log and stops uncleanly. Returns the config,
/// the values written (one string per record, in offset order), and the last segment's path.
fn write_log(
    dir: &Path,
    batch_sizes: &[usize],
    preallocate: bool,
) -> (LogConfig, Vec<String>, PathBuf) {
    let mut config = small_config(dir);
    if preallocate {
        config.preallocate_bytes = 512;
    }
    let (manager, log) = open_partition(config.clone(), "t");
    let mut values = Vec::new();
    for (i, &size) in batch_sizes.iter().enumerate() {
        let mut batch = batch_of(&format!("b{i}"), size, i as i64);
        log.append(&mut batch).unwrap();
        values.extend((0..size).map(|r| format!("b{i}-{r}")));
    }
    let last_base = *log.segment_bases().last().unwrap();
    let path = dir.join("t/0").join(format!("{last_base:020}.log"));
    drop((manager, log)); // no close(): the next open recovers
    (config, values, path)
}

/// Batch boundaries in a segment file, up to a zero tail: (start, end, record count).
fn batch_spans(bytes: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < bytes.len() && bytes[at..].iter().any(|byte| *byte != 0) {
        let header = BatchHeader::parse(&bytes[at..]).unwrap().unwrap();
        let end = at + header.total_len();
        spans.push((at, end, header.record_count as usize));
        at = end;
    }
    spans
}

/// Records stored in segments before the last one.
fn records_before_last_segment(values: &[String], last_segment: &[u8]) -> usize {
    if last_segment.iter().all(|byte| *byte == 0) {
        // Empty, or only a zero tail: every record is in earlier segments.
        return values.len();
    }
    let first = BatchHeader::parse(last_segment).ok().flatten();
    first.map_or(values.len(), |header| header.base_offset as usize)
}

fn reopen_and_check(config: LogConfig, expected: &[String]) -> Result<(), TestCaseError> {
    let manager = LogManager::open(config).unwrap();
    let log = manager.partition("t", 0).unwrap();
    let records = read_all(&log, 0);
    prop_assert_eq!(values(&records), expected.to_vec());
    prop_assert_eq!(log.log_end_offset(), expected.len() as u64);
    // The recovered log takes new appends at the right offset, and they read back.
    let mut batch = batch_of("after", 2, 0);
    let info = log.append(&mut batch).unwrap();
    prop_assert_eq!(info.base_offset, expected.len() as u64);
    let slice = log.read(info.base_offset, 1 << 16).unwrap();
    prop_assert!(
        batch::decode_batch(&slice.bytes, &Default::default())
            .unwrap()
            .is_some()
    );
    manager.close().unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn cut_at_any_byte_keeps_whole_batches_before_the_cut(
        batch_sizes in proptest::collection::vec(1usize..12, 1..40),
        cut_fraction in 0.0f64..=1.0,
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (config, written, last) = write_log(dir.path(), &batch_sizes, preallocate);
        let bytes = std::fs::read(&last).unwrap();
        let cut = ((bytes.len() as f64) * cut_fraction) as usize;
        let before = records_before_last_segment(&written, &bytes);
        let kept_in_last: usize = batch_spans(&bytes)
            .iter()
            .filter(|(_, end, _)| *end <= cut)
            .map(|(_, _, count)| count)
            .sum();
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(cut as u64).unwrap();
        reopen_and_check(config, &written[..before + kept_in_last])?;
    }

    #[test]
    fn flipped_bytes_keep_batches_before_the_first_damaged_one(
        batch_sizes in proptest::collection::vec(1usize..12, 1..40),
        flips in proptest::collection::vec((0.0f64..1.0, 1u8..=255), 1..4),
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (config, written, last) = write_log(dir.path(), &batch_sizes, preallocate);
        let mut bytes = std::fs::read(&last).unwrap();
        prop_assume!(!bytes.is_empty());
        let spans = batch_spans(&bytes);
        let before = records_before_last_segment(&written, &bytes);
        let mut first_damaged = spans.len();
        for (fraction, mask) in flips {
            let position = ((bytes.len() as f64) * fraction) as usize;
            bytes[position] ^= mask;
            // Damage in the zero tail is garbage after the last batch: cut, nothing lost.
            let Some((index, (start, _, _))) = spans
                .iter()
                .enumerate()
                .find(|(_, (start, end, _))| *start <= position && position < *end)
            else {
                continue;
            };
            // The partition leader epoch (bytes 12..16) is outside the CRC and carries no
            // record data, so damage there cannot be seen and loses nothing.
            let in_epoch = (start + 12..start + 16).contains(&position);
            if !in_epoch {
                first_damaged = first_damaged.min(index);
            }
        }
        std::fs::write(&last, &bytes).unwrap();
        let kept_in_last: usize = spans[..first_damaged].iter().map(|(_, _, count)| count).sum();
        reopen_and_check(config, &written[..before + kept_in_last])?;
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut_and_later_segments_removed() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = vec![5; 60];
    let (config, written, last) = write_log(dir.path(), &sizes, false);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut file, &[0x42; 100]).unwrap();
    drop(file);
    let manager = LogManager::open(config).unwrap();
    let report = manager.recovery_report();
    assert_eq!(report.bytes_truncated, 100);
    let log = manager.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&log, 0)), written);
}

#[test]
fn garbage_after_a_zero_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (config, written, last) = write_log(dir.path(), &[5; 60], true);
    let len = std::fs::metadata(&last).unwrap().len();
    let data = batch_spans(&std::fs::read(&last).unwrap())
        .last()
        .map_or(0, |(_, end, _)| *end as u64);
    assert!(len > data, "the last segment has a zero tail");
    let file = std::fs::OpenOptions::new().write(true).open(&last).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x42], len - 1).unwrap();
    drop(file);
    let manager = LogManager::open(config).unwrap();
    assert_eq!(manager.recovery_report().bytes_truncated, len - data);
    let log = manager.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&log, 0)), written);
}
