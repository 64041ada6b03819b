//! Model-based property test of one partition: random sequences of appends, reads, timestamp
//! lookups, truncations, deletions, retention passes, clean and unclean reopens and torn tails,
//! run against the real log and against a plain in-memory model of its segments, comparing
//! every result and checking the log's invariants after every step.
//!
//! The model knows the segment layout too (when a segment rolls, what retention deletes), so it
//! checks reads, retention and recovery exactly rather than loosely. Failures print the shrunk
//! operation sequence; `PROPTEST_CASES` runs more cases locally. Below the model, focused
//! regression tests for the bugs it found.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use silt_log::batch::{self, BatchSpec, Compression, DecodeLimits, Record, set_base_offset};
use silt_log::{
    AppendOptions, DeleteReport, FlushPolicy, LogConfig, LogError, LogManager, OffsetAssignment,
    PartitionLog, TopicConfig,
};

const TOPIC: &str = "t";

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone)]
struct RecordGen {
    timestamp: i64,
    key: bool,
    /// `None` is a null value (a tombstone).
    value_len: Option<usize>,
}

#[derive(Clone)]
struct BatchGen {
    records: Vec<RecordGen>,
    zstd: bool,
}

/// Compact, so a shrunk failing sequence stays readable: `r(timestamp, value length)`, with
/// `k` for a key and `null` for a null value.
impl std::fmt::Debug for RecordGen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = if self.key { "k," } else { "" };
        match self.value_len {
            Some(len) => write!(f, "r({},{key}{len})", self.timestamp),
            None => write!(f, "r({},{key}null)", self.timestamp),
        }
    }
}

impl std::fmt::Debug for BatchGen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let compression = if self.zstd { "zstd" } else { "" };
        write!(f, "{compression}{:?}", self.records)
    }
}

/// An offset chosen relative to the log's state when the operation runs, so shrinking keeps
/// operations meaningful: from the log start (within `[start, end + 1]`) or anywhere in
/// `[0, end + 2]`.
#[derive(Debug, Clone, Copy)]
struct Pick {
    from_start: bool,
    n: u64,
}

#[derive(Debug, Clone)]
enum Op {
    /// One append call of one or more batches; `follower` appends with the offsets kept.
    Append {
        batches: Vec<BatchGen>,
        follower: bool,
        leader_epoch: Option<i32>,
    },
    /// A follower append whose offsets do not continue the log end: refused, nothing written.
    AppendOutOfOrder {
        skew_second: bool,
    },
    Read {
        at: Pick,
        max_bytes: usize,
    },
    OffsetForTimestamp(i64),
    TruncateTo(Pick),
    DeleteBefore(Pick),
    DeleteLocalBefore(Pick),
    /// A retention pass at `now`, or (`aged`) at a wall-clock time past `segment.ms`, which
    /// also rolls a non-empty active segment.
    Retention {
        retention_bytes: Option<u64>,
        retention_ms: Option<u64>,
        now: i64,
        aged: bool,
        archived_below: Option<Pick>,
    },
    /// Clean close and reopen.
    Reopen,
    /// Drop the manager and partition without closing, then reopen (recovery runs).
    Crash,
    /// Cut the active segment at a fraction of its length, then reopen uncleanly.
    CutActive(f64),
}

fn record_gen() -> impl Strategy<Value = RecordGen> {
    (
        -5i64..1000,
        any::<bool>(),
        prop_oneof![
            8 => (0usize..100).prop_map(Some),
            2 => (100usize..1500).prop_map(Some),
            1 => Just(None),
        ],
    )
        .prop_map(|(timestamp, key, value_len)| RecordGen {
            timestamp,
            key,
            value_len,
        })
}

fn batch_gen() -> impl Strategy<Value = BatchGen> {
    (
        proptest::collection::vec(record_gen(), 1..=10),
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(records, zstd)| BatchGen { records, zstd })
}

fn pick() -> impl Strategy<Value = Pick> {
    (proptest::bool::weighted(0.7), 0u64..200).prop_map(|(from_start, n)| Pick { from_start, n })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (
            prop_oneof![
                3 => proptest::collection::vec(batch_gen(), 1..=1),
                1 => proptest::collection::vec(batch_gen(), 2..=4),
            ],
            proptest::bool::weighted(0.2),
            proptest::option::weighted(0.2, 0i32..5),
        )
            .prop_map(|(batches, follower, leader_epoch)| Op::Append {
                batches,
                follower,
                leader_epoch,
            }),
        2 => any::<bool>().prop_map(|skew_second| Op::AppendOutOfOrder { skew_second }),
        12 => (pick(), prop_oneof![0usize..200, 200usize..5000])
            .prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        6 => (-10i64..1010).prop_map(Op::OffsetForTimestamp),
        6 => pick().prop_map(Op::TruncateTo),
        5 => pick().prop_map(Op::DeleteBefore),
        3 => pick().prop_map(Op::DeleteLocalBefore),
        4 => (
            proptest::option::of(0u64..6_000),
            proptest::option::of(0u64..1500),
            0i64..2500,
            proptest::bool::weighted(0.25),
            proptest::option::weighted(0.3, pick()),
        )
            .prop_map(|(retention_bytes, retention_ms, now, aged, archived_below)| {
                Op::Retention {
                    retention_bytes,
                    retention_ms,
                    now,
                    aged,
                    archived_below,
                }
            }),
        3 => Just(Op::Reopen),
        3 => Just(Op::Crash),
        3 => (0.0f64..1.0).prop_map(Op::CutActive),
    ]
}

// ---------------------------------------------------------------------------------------------
// The model

#[derive(Debug, Clone)]
struct ModelRecord {
    offset: u64,
    timestamp: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
}

#[derive(Debug, Clone)]
struct ModelBatch {
    base: u64,
    last: u64,
    /// Exactly the bytes the log stores: base offset and leader epoch as rewritten by append.
    bytes: Vec<u8>,
    max_timestamp: i64,
    records: Vec<ModelRecord>,
}

#[derive(Debug, Clone)]
struct ModelSegment {
    base: u64,
    batches: Vec<ModelBatch>,
}

impl ModelSegment {
    fn empty(base: u64) -> Self {
        ModelSegment {
            base,
            batches: Vec::new(),
        }
    }

    fn next(&self) -> u64 {
        self.batches.last().map_or(self.base, |b| b.last + 1)
    }

    fn size(&self) -> u64 {
        self.batches.iter().map(|b| b.bytes.len() as u64).sum()
    }

    fn max_timestamp(&self) -> i64 {
        self.batches
            .iter()
            .map(|b| b.max_timestamp)
            .max()
            .unwrap_or(i64::MIN)
    }
}

#[derive(Debug, Clone)]
struct Model {
    /// Segments on local disk, oldest first; the last is the active one.
    segments: Vec<ModelSegment>,
    log_start: u64,
    segment_bytes: u64,
    retention_bytes: Option<u64>,
    retention_ms: Option<u64>,
}

impl Model {
    fn new(segment_bytes: u64) -> Self {
        Model {
            segments: vec![ModelSegment::empty(0)],
            log_start: 0,
            segment_bytes,
            retention_bytes: None,
            retention_ms: TopicConfig::default().retention_ms,
        }
    }

    fn log_end(&self) -> u64 {
        self.active().next()
    }

    fn local_start(&self) -> u64 {
        self.segments[0].base.max(self.log_start)
    }

    fn active(&self) -> &ModelSegment {
        self.segments.last().expect("always an active segment")
    }

    fn active_mut(&mut self) -> &mut ModelSegment {
        self.segments.last_mut().expect("always an active segment")
    }

    fn size(&self) -> u64 {
        self.segments.iter().map(ModelSegment::size).sum()
    }

    fn bases(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.base).collect()
    }

    fn batches(&self) -> impl Iterator<Item = &ModelBatch> {
        self.segments.iter().flat_map(|s| s.batches.iter())
    }

    fn records(&self) -> impl Iterator<Item = &ModelRecord> {
        self.batches().flat_map(|b| b.records.iter())
    }

    fn resolve(&self, pick: Pick) -> u64 {
        let end = self.log_end();
        if pick.from_start {
            self.log_start + pick.n % (end - self.log_start + 2)
        } else {
            pick.n % (end + 3)
        }
    }

    fn roll(&mut self) {
        let end = self.log_end();
        self.segments.push(ModelSegment::empty(end));
    }

    /// The partition's rule: roll before an append when the active segment is not empty and
    /// the whole append would push it past `segment.bytes`.
    fn append(&mut self, batches: Vec<ModelBatch>) {
        let incoming: u64 = batches.iter().map(|b| b.bytes.len() as u64).sum();
        let active = self.active();
        if !active.batches.is_empty() && active.size() + incoming > self.segment_bytes {
            self.roll();
        }
        self.active_mut().batches.extend(batches);
    }

    /// Deletes closed segments wholly below `offset`, first rolling an active segment that is
    /// itself wholly below it.
    fn delete_segments_below(&mut self, offset: u64) -> DeleteReport {
        if self.active().next() <= offset && !self.active().batches.is_empty() {
            self.roll();
        }
        let mut report = DeleteReport::default();
        while self.segments.len() > 1 && self.segments[0].next() <= offset {
            let segment = self.segments.remove(0);
            report.segments += 1;
            report.bytes += segment.size();
            report.offsets += segment.next() - segment.base;
        }
        report
    }

    /// Kafka's retention rules over closed segments; see `silt_log::retention`.
    fn enforce_retention(
        &mut self,
        now: i64,
        aged: bool,
        archived_below: Option<u64>,
    ) -> DeleteReport {
        if aged && !self.active().batches.is_empty() {
            self.roll();
        }
        let closed = &self.segments[..self.segments.len() - 1];
        let mut remaining = self.size();
        let mut count = 0;
        for segment in closed {
            if archived_below.is_some_and(|bound| segment.next() > bound) {
                break;
            }
            let expired = self.retention_ms.is_some_and(|ms| {
                now.saturating_sub(segment.max_timestamp()) > i64::try_from(ms).unwrap()
            });
            let oversized = self
                .retention_bytes
                .is_some_and(|bytes| remaining - segment.size() >= bytes);
            if !(expired || oversized) {
                break;
            }
            remaining -= segment.size();
            count += 1;
        }
        if count == 0 {
            return DeleteReport::default();
        }
        let new_start = closed[count - 1].next();
        if archived_below.is_none() {
            self.log_start = self.log_start.max(new_start);
        }
        self.delete_segments_below(new_start)
    }

    /// Removes whole batches whose last offset is at or after `offset`.
    fn truncate_to(&mut self, offset: u64) {
        self.segments.retain(|s| s.base <= offset);
        self.active_mut().batches.retain(|b| b.last < offset);
        // A straddling batch that started below the log start takes the log end below it; the
        // log start follows, since nothing below the new end is exposed by that.
        self.log_start = self.log_start.min(self.log_end());
    }
}

// ---------------------------------------------------------------------------------------------
// The harness: the real log and the model side by side

struct Harness {
    _dir: tempfile::TempDir,
    config: LogConfig,
    manager: Option<Arc<LogManager>>,
    log: Option<Arc<PartitionLog>>,
    model: Model,
    /// Makes every record value unique.
    records_written: u64,
}

fn log_config(
    dir: &Path,
    segment_bytes: u64,
    index_interval_bytes: u32,
    relaxed: bool,
    preallocate_bytes: u64,
) -> LogConfig {
    let mut config = LogConfig::new(dir);
    config.preallocate_bytes = preallocate_bytes;
    config.index_interval_bytes = index_interval_bytes;
    config.fs_reserve_bytes = 0;
    config.topic_defaults.segment_bytes = segment_bytes;
    if relaxed {
        config.flush = FlushPolicy::RelaxedUnsafe {
            interval: Duration::from_millis(3),
        };
    }
    config
}

impl Harness {
    fn new(
        segment_bytes: u64,
        index_interval_bytes: u32,
        relaxed: bool,
        preallocate_bytes: u64,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = log_config(
            dir.path(),
            segment_bytes,
            index_interval_bytes,
            relaxed,
            preallocate_bytes,
        );
        let (manager, log) = open_partition(config.clone(), TOPIC);
        Harness {
            _dir: dir,
            config,
            manager: Some(manager),
            log: Some(log),
            model: Model::new(segment_bytes),
            records_written: 0,
        }
    }

    fn log(&self) -> &PartitionLog {
        self.log.as_ref().expect("open")
    }

    fn manager(&self) -> &LogManager {
        self.manager.as_ref().expect("open")
    }

    fn partition_dir(&self) -> PathBuf {
        self.config.data_dir.join(TOPIC).join("0")
    }

    fn segment_path(&self, base: u64, suffix: &str) -> PathBuf {
        self.partition_dir().join(format!("{base:020}{suffix}"))
    }

    fn reopen(&mut self) -> Arc<LogManager> {
        // In the relaxed mode the flusher thread may hold the dropped manager until its flush
        // pass ends, and with it the directory lock.
        let deadline = Instant::now() + Duration::from_secs(10);
        let manager = loop {
            match LogManager::open(self.config.clone()) {
                Err(LogError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => break other.expect("reopen"),
            }
        };
        self.log = Some(
            manager
                .partition(TOPIC, 0)
                .expect("partition survives reopen"),
        );
        self.manager = Some(manager.clone());
        manager
    }

    fn encode(&mut self, spec: &BatchGen) -> BytesMut {
        let records: Vec<Record> = spec
            .records
            .iter()
            .map(|r| {
                let n = self.records_written;
                self.records_written += 1;
                Record {
                    timestamp: r.timestamp,
                    key: r.key.then(|| Bytes::from(format!("k{}", n % 7))),
                    value: r.value_len.map(|len| {
                        let mut value = format!("v{n}-").into_bytes();
                        value.resize(len.max(value.len()), b'x');
                        Bytes::from(value)
                    }),
                    headers: Vec::new(),
                }
            })
            .collect();
        let compression = if spec.zstd {
            Compression::Zstd
        } else {
            Compression::None
        };
        let mut out = BytesMut::new();
        batch::encode_batch(
            &BatchSpec {
                compression,
                ..BatchSpec::default()
            },
            &records,
            &mut out,
        )
        .expect("encodable batch");
        out
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Append {
                batches,
                follower,
                leader_epoch,
            } => self.append(batches, *follower, *leader_epoch),
            Op::AppendOutOfOrder { skew_second } => self.append_out_of_order(*skew_second),
            Op::Read { at, max_bytes } => {
                let offset = self.model.resolve(*at);
                self.check_read(offset, *max_bytes)
            }
            Op::OffsetForTimestamp(timestamp) => self.check_offset_for_timestamp(*timestamp),
            Op::TruncateTo(at) => {
                let offset = self.model.resolve(*at);
                self.truncate_to(offset)
            }
            Op::DeleteBefore(at) => {
                let offset = self.model.resolve(*at);
                self.delete_before(offset)
            }
            Op::DeleteLocalBefore(at) => {
                let offset = self.model.resolve(*at);
                let report = self.log().delete_local_before(offset).unwrap();
                let bound = offset.min(self.model.log_end());
                let expected = self.model.delete_segments_below(bound);
                prop_assert_eq!(report, expected);
                Ok(())
            }
            Op::Retention {
                retention_bytes,
                retention_ms,
                now,
                aged,
                archived_below,
            } => {
                let limit = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
                let (bytes, ms) = (limit(*retention_bytes), limit(*retention_ms));
                let overrides = overrides(&[("retention.bytes", &bytes), ("retention.ms", &ms)]);
                self.manager()
                    .alter_topic_config(TOPIC, &overrides)
                    .unwrap();
                self.model.retention_bytes = *retention_bytes;
                self.model.retention_ms = *retention_ms;
                let bound = archived_below.map(|at| self.model.resolve(at));
                let start_before = self.log().log_start_offset();
                let now = if *aged {
                    silt_log::now_ms() + (TopicConfig::default().segment_ms as i64) + 1
                } else {
                    *now
                };
                let report = self.log().enforce_retention(now, bound).unwrap();
                let expected = self.model.enforce_retention(now, *aged, bound);
                prop_assert_eq!(report, expected);
                prop_assert!(self.log().log_start_offset() >= start_before);
                Ok(())
            }
            Op::Reopen => {
                let manager = self.manager.take().unwrap();
                manager.close().unwrap();
                drop((manager, self.log.take()));
                let manager = self.reopen();
                prop_assert!(manager.opened_clean());
                prop_assert_eq!(manager.recovery_report(), Default::default());
                Ok(())
            }
            Op::Crash => {
                drop((self.manager.take(), self.log.take()));
                let manager = self.reopen();
                prop_assert!(!manager.opened_clean());
                let report = manager.recovery_report();
                prop_assert_eq!(report.bytes_truncated, 0);
                prop_assert_eq!(report.segments_removed, 0);
                Ok(())
            }
            Op::CutActive(fraction) => self.cut_active(*fraction),
        }
    }

    fn append(
        &mut self,
        specs: &[BatchGen],
        follower: bool,
        leader_epoch: Option<i32>,
    ) -> Result<(), TestCaseError> {
        let mut buffer = BytesMut::new();
        let mut lens = Vec::new();
        let mut next = self.model.log_end();
        for spec in specs {
            let mut encoded = self.encode(spec);
            if follower {
                set_base_offset(&mut encoded, next as i64);
            }
            next += spec.records.len() as u64;
            lens.push(encoded.len());
            buffer.extend_from_slice(&encoded);
        }
        let options = AppendOptions {
            offsets: if follower {
                OffsetAssignment::Keep
            } else {
                OffsetAssignment::Assign
            },
            leader_epoch,
            ..AppendOptions::default()
        };
        let base = self.model.log_end();
        let info = self.log().append_with(&mut buffer, options).unwrap();
        prop_assert_eq!(info.base_offset, base);
        prop_assert_eq!(info.last_offset, next - 1);
        prop_assert_eq!(info.batch_count, specs.len());
        // The buffer now holds the bytes as stored: offsets assigned, epoch written.
        let mut batches = Vec::new();
        let mut at = 0;
        for len in lens {
            let bytes = buffer[at..at + len].to_vec();
            at += len;
            let (header, records, _) = batch::decode_batch(&bytes, &DecodeLimits::default())
                .unwrap()
                .unwrap();
            if let Some(epoch) = leader_epoch {
                prop_assert_eq!(header.partition_leader_epoch, epoch);
            }
            batches.push(ModelBatch {
                base: header.base_offset as u64,
                last: header.last_offset() as u64,
                max_timestamp: header.max_timestamp,
                records: records
                    .into_iter()
                    .map(|r| ModelRecord {
                        offset: r.offset as u64,
                        timestamp: r.timestamp,
                        key: r.key,
                        value: r.value,
                    })
                    .collect(),
                bytes,
            });
        }
        self.model.append(batches);
        Ok(())
    }

    fn append_out_of_order(&mut self, skew_second: bool) -> Result<(), TestCaseError> {
        let end = self.model.log_end();
        let spec = BatchGen {
            records: vec![
                RecordGen {
                    timestamp: 1,
                    key: false,
                    value_len: Some(3),
                };
                2
            ],
            zstd: false,
        };
        let mut first = self.encode(&spec);
        let mut second = self.encode(&spec);
        if skew_second {
            set_base_offset(&mut first, end as i64);
            // A gap of one offset between the two batches.
            set_base_offset(&mut second, end as i64 + 3);
        } else {
            set_base_offset(&mut first, end as i64 + 1);
            set_base_offset(&mut second, end as i64 + 3);
        }
        first.extend_from_slice(&second);
        let options = AppendOptions {
            offsets: OffsetAssignment::Keep,
            leader_epoch: None,
            ..AppendOptions::default()
        };
        let result = self.log().append_with(&mut first, options);
        prop_assert!(
            matches!(result, Err(LogError::OffsetOrder { .. })),
            "follower append with wrong offsets: {:?}",
            result
        );
        Ok(())
    }

    fn check_read(&self, offset: u64, max_bytes: usize) -> Result<(), TestCaseError> {
        let model = &self.model;
        let result = self.log().read(offset, max_bytes);
        // The check without a read (a Fetch with its budget spent) agrees with the read.
        let checked = self.log().check_readable(offset);
        prop_assert_eq!(
            checked.as_ref().map(|_| ()).map_err(std::mem::discriminant),
            result.as_ref().map(|_| ()).map_err(std::mem::discriminant),
            "check_readable({}) against read",
            offset
        );
        let end = model.log_end();
        if offset < model.log_start || offset > end {
            prop_assert!(
                matches!(result, Err(LogError::OffsetOutOfRange { .. })),
                "read({}) outside [{}, {}]: {:?}",
                offset,
                model.log_start,
                end,
                result.map(|s| s.bytes.len())
            );
            return Ok(());
        }
        if offset < model.local_start() {
            prop_assert!(
                matches!(result, Err(LogError::NotLocal { .. })),
                "read({}) below local start {}: {:?}",
                offset,
                model.local_start(),
                result.map(|s| s.bytes.len())
            );
            return Ok(());
        }
        let slice = result.unwrap();
        prop_assert_eq!(slice.log_start_offset, model.log_start);
        prop_assert_eq!(slice.log_end_offset, end);
        prop_assert_eq!(slice.high_watermark, end);
        if offset == end {
            prop_assert!(slice.bytes.is_empty());
            return Ok(());
        }
        // The batches from the one holding `offset` on, each tagged with whether it starts a
        // segment.
        let from: Vec<(&ModelBatch, bool)> = model
            .segments
            .iter()
            .flat_map(|s| s.batches.iter().enumerate().map(|(i, b)| (b, i == 0)))
            .skip_while(|(b, _)| b.last < offset)
            .collect();
        prop_assert!(from[0].0.base <= offset);
        let limit = max_bytes.max(from[0].0.bytes.len());
        let mut at = 0;
        let mut count = 0;
        while at < slice.bytes.len() {
            let Some((expected, _)) = from.get(count) else {
                return Err(TestCaseError::fail(format!(
                    "read({offset}) returned bytes past the log end"
                )));
            };
            let got = slice.bytes.get(at..at + expected.bytes.len());
            prop_assert!(
                got == Some(&expected.bytes[..]),
                "read({}, {}): batch {} differs from the one stored at {}",
                offset,
                max_bytes,
                count,
                expected.base
            );
            at += expected.bytes.len();
            count += 1;
        }
        prop_assert!(
            count >= 1,
            "read({}) below the end returned nothing",
            offset
        );
        prop_assert!(
            at <= limit,
            "read({}, {}) returned {} bytes",
            offset,
            max_bytes,
            at
        );
        // Nothing was left out that fits, short of a segment boundary.
        if let Some((next, starts_segment)) = from.get(count) {
            prop_assert!(
                *starts_segment || at + next.bytes.len() > limit,
                "read({}, {}) stopped at {} bytes before a batch of {} that fits",
                offset,
                max_bytes,
                at,
                next.bytes.len()
            );
        }
        Ok(())
    }

    fn check_offset_for_timestamp(&self, timestamp: i64) -> Result<(), TestCaseError> {
        let expected = self
            .model
            .records()
            .find(|r| r.offset >= self.model.log_start && r.timestamp >= timestamp)
            .map(|r| (r.offset, r.timestamp));
        let found = self.log().offset_for_timestamp(timestamp).unwrap();
        prop_assert_eq!(found, expected, "offset_for_timestamp({})", timestamp);
        Ok(())
    }

    fn truncate_to(&mut self, offset: u64) -> Result<(), TestCaseError> {
        let result = self.log().truncate_to(offset);
        let end = self.model.log_end();
        if offset >= end {
            prop_assert_eq!(result.unwrap(), end);
        } else if offset < self.model.local_start() {
            prop_assert!(
                matches!(result, Err(LogError::OffsetOutOfRange { .. })),
                "truncate_to({}) below the local start {}: {:?}",
                offset,
                self.model.local_start(),
                result
            );
        } else {
            self.model.truncate_to(offset);
            prop_assert_eq!(result.unwrap(), self.model.log_end());
        }
        Ok(())
    }

    fn delete_before(&mut self, offset: u64) -> Result<(), TestCaseError> {
        let result = self.log().delete_before(offset);
        if offset > self.model.log_end() {
            prop_assert!(
                matches!(result, Err(LogError::OffsetOutOfRange { .. })),
                "delete_before({}) past the end: {:?}",
                offset,
                result
            );
        } else if offset <= self.model.log_start {
            prop_assert_eq!(result.unwrap(), DeleteReport::default());
        } else {
            self.model.log_start = offset;
            let expected = self.model.delete_segments_below(offset);
            prop_assert_eq!(result.unwrap(), expected);
        }
        Ok(())
    }

    fn cut_active(&mut self, fraction: f64) -> Result<(), TestCaseError> {
        drop((self.manager.take(), self.log.take()));
        let active = self.model.active().clone();
        let path = self.segment_path(active.base, ".log");
        let bytes = std::fs::read(&path).unwrap();
        let len = bytes.len() as u64;
        let preallocating = self.config.preallocate_bytes > 0;
        if preallocating {
            // A zero tail may follow the batches (none after a clean close or a recovery
            // that found the log's end right at a segment's size cap).
            prop_assert!(len >= active.size());
            prop_assert!(bytes[active.size() as usize..].iter().all(|b| *b == 0));
        } else {
            prop_assert_eq!(len, active.size());
        }
        let cut = (len as f64 * fraction) as u64;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut)
            .unwrap();
        // Keep the batches that are still whole.
        let mut kept = 0;
        let mut kept_bytes = 0;
        for batch in &active.batches {
            if kept_bytes + batch.bytes.len() as u64 > cut {
                break;
            }
            kept_bytes += batch.bytes.len() as u64;
            kept += 1;
        }
        self.model.active_mut().batches.truncate(kept);
        let mut segments_removed = 0;
        if self.model.log_end() < self.model.log_start {
            // What was cut held the log start: the log starts over, empty, at the log start.
            segments_removed = self.model.segments.len() as u64;
            self.model.segments = vec![ModelSegment::empty(self.model.log_start)];
        }
        let manager = self.reopen();
        prop_assert!(!manager.opened_clean());
        let report = manager.recovery_report();
        // With preallocation, a remainder of zeros is a zero tail: the end, not damage.
        let zeros = bytes[kept_bytes as usize..cut as usize]
            .iter()
            .all(|b| *b == 0);
        let truncated = if preallocating && zeros {
            0
        } else {
            cut - kept_bytes
        };
        prop_assert_eq!(report.bytes_truncated, truncated);
        prop_assert_eq!(report.segments_removed, segments_removed);
        Ok(())
    }

    /// Everything that must hold between operations.
    fn check_invariants(&self) -> Result<(), TestCaseError> {
        let log = self.log();
        let model = &self.model;
        let (start, local_start, end) = (
            log.log_start_offset(),
            log.local_start_offset(),
            log.log_end_offset(),
        );
        prop_assert!(
            start <= local_start && local_start <= end,
            "offsets out of order: start {}, local start {}, end {}",
            start,
            local_start,
            end
        );
        prop_assert_eq!(start, model.log_start, "log start");
        prop_assert_eq!(local_start, model.local_start(), "local start");
        prop_assert_eq!(end, model.log_end(), "log end");
        prop_assert_eq!(log.high_watermark(), end, "high watermark");
        let bases = log.segment_bases();
        prop_assert!(bases.windows(2).all(|w| w[0] < w[1]));
        prop_assert_eq!(bases, model.bases(), "segment bases");
        prop_assert_eq!(log.size_bytes(), model.size(), "size");
        prop_assert_eq!(
            self.manager().disk_stats().used_bytes,
            model.size(),
            "disk used"
        );

        // On disk: each segment file holds exactly its batches, and every closed segment has
        // valid indexes describing them.
        for (i, segment) in model.segments.iter().enumerate() {
            let path = self.segment_path(segment.base, ".log");
            let len = std::fs::metadata(&path).unwrap().len();
            let active = i + 1 == model.segments.len();
            if active && self.config.preallocate_bytes > 0 {
                // The active segment alone may have a zero tail, within the segment's cap.
                let tail = log.preallocated_bytes();
                prop_assert_eq!(len, segment.size() + tail, "length of {}", path.display());
                prop_assert!(tail <= self.config.preallocate_bytes * 2);
                prop_assert!(tail == 0 || len <= model.segment_bytes.max(segment.size()));
                let bytes = std::fs::read(&path).unwrap();
                prop_assert!(bytes[segment.size() as usize..].iter().all(|b| *b == 0));
            } else {
                prop_assert_eq!(len, segment.size(), "length of {}", path.display());
            }
            if !active {
                self.check_indexes(segment)?;
            }
        }

        // Everything readable matches the model, record for record.
        let records = read_all(log, local_start);
        let expected: Vec<&ModelRecord> = model
            .records()
            .filter(|r| r.offset >= local_start)
            .collect();
        prop_assert_eq!(records.len(), expected.len(), "records readable");
        for (got, want) in records.iter().zip(expected) {
            prop_assert_eq!(got.offset as u64, want.offset);
            prop_assert_eq!(got.timestamp, want.timestamp);
            prop_assert_eq!(&got.key, &want.key);
            prop_assert_eq!(&got.value, &want.value);
        }
        Ok(())
    }

    /// The offset and time index files of a closed segment, against its batches.
    fn check_indexes(&self, segment: &ModelSegment) -> Result<(), TestCaseError> {
        let mut starts = Vec::new(); // (position, base offset, max timestamp)
        let mut position = 0u64;
        for batch in &segment.batches {
            starts.push((position, batch.base, batch.max_timestamp));
            position += batch.bytes.len() as u64;
        }
        let batch_at = |position: u64| starts.iter().find(|(p, _, _)| *p == position);

        let path = self.segment_path(segment.base, ".index");
        let bytes = std::fs::read(&path).unwrap();
        prop_assert!(bytes.len().is_multiple_of(8));
        let mut previous: Option<(u32, u32)> = None;
        for entry in bytes.chunks_exact(8) {
            let relative = u32::from_be_bytes(entry[..4].try_into().unwrap());
            let position = u32::from_be_bytes(entry[4..].try_into().unwrap());
            prop_assert!(previous.is_none_or(|(r, p)| relative > r && position > p));
            previous = Some((relative, position));
            let batch = batch_at(u64::from(position));
            prop_assert!(
                batch.is_some_and(|(_, base, _)| *base == segment.base + u64::from(relative)),
                "{}: entry ({}, {}) does not name a batch start",
                path.display(),
                relative,
                position
            );
        }

        let path = self.segment_path(segment.base, ".timeindex");
        let bytes = std::fs::read(&path).unwrap();
        prop_assert!(bytes.len().is_multiple_of(16));
        for entry in bytes.chunks_exact(16) {
            let max_timestamp = i64::from_be_bytes(entry[..8].try_into().unwrap());
            let relative = u32::from_be_bytes(entry[8..12].try_into().unwrap());
            let position = u32::from_be_bytes(entry[12..].try_into().unwrap());
            let batch = batch_at(u64::from(position));
            prop_assert!(
                batch.is_some_and(|(_, base, _)| *base == segment.base + u64::from(relative)),
                "{}: entry ({}, {}) does not name a batch start",
                path.display(),
                relative,
                position
            );
            prop_assert!(
                starts
                    .iter()
                    .filter(|(p, _, _)| *p < u64::from(position))
                    .all(|(_, _, ts)| *ts <= max_timestamp),
                "{}: a batch before position {} is newer than {}",
                path.display(),
                position,
                max_timestamp
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions the model found

/// A follower truncating inside a batch that began below the log start removes the batch
/// whole, taking the log end below the start. The start must follow it down: it used to stay
/// put, so reads at the start failed, new appends were invisible, and the next open moved the
/// log end up to the old start.
#[test]
fn truncating_a_batch_that_straddles_the_log_start_lowers_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let (manager, log) = open_partition(config.clone(), TOPIC);
    log.append(&mut batch_of("a", 10, 0)).unwrap();
    log.delete_before(5).unwrap();
    assert_eq!(log.truncate_to(7).unwrap(), 0, "the batch 0..=9 goes whole");
    assert_eq!(log.log_start_offset(), 0);
    assert_eq!(log.log_end_offset(), 0);
    assert!(log.read(0, 1 << 16).unwrap().bytes.is_empty());
    let info = log.append(&mut batch_of("b", 3, 0)).unwrap();
    assert_eq!(info.base_offset, 0);
    assert_eq!(values(&read_all(&log, 0)), ["b-0", "b-1", "b-2"]);
    drop((manager, log)); // unclean
    let (_manager, log) = open_partition(config, TOPIC);
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (0, 3));
    assert_eq!(values(&read_all(&log, 0)), ["b-0", "b-1", "b-2"]);
}

/// `delete_local_before` (data a cold tier holds) leaves the log start where it is, and so
/// must a restart: the start used to jump up to the first local segment on every open, cutting
/// the archived range off.
#[test]
fn log_start_below_the_local_segments_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let (mut manager, mut log) = open_partition(config.clone(), TOPIC);
    for round in 0..20 {
        log.append(&mut batch_of(&format!("r{round}"), 5, 0))
            .unwrap();
    }
    log.delete_local_before(50).unwrap();
    let local_start = log.local_start_offset();
    assert!(
        local_start > 0,
        "1 KiB segments put some of 100 records wholly below 50"
    );
    for clean in [true, false] {
        if clean {
            manager.close().unwrap();
        }
        drop((manager, log));
        (manager, log) = open_partition(config.clone(), TOPIC);
        assert_eq!(log.log_start_offset(), 0, "after a clean ({clean}) reopen");
        assert_eq!(log.local_start_offset(), local_start);
        assert!(matches!(log.read(0, 100), Err(LogError::NotLocal { .. })));
        assert_eq!(read_all(&log, local_start).len() as u64, 100 - local_start);
    }
}

/// A closed segment loaded at open has no age in memory. When a truncation made it the active
/// segment, `segment.ms` never rolled it (until the next append), so on an idle partition its
/// records never became eligible for time retention.
#[test]
fn a_segment_made_active_by_truncation_still_ages_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = small_config(dir.path());
    let (manager, log) = open_partition(config.clone(), TOPIC);
    manager
        .alter_topic_config(TOPIC, &overrides(&[("retention.ms", "60000")]))
        .unwrap();
    for round in 0..20 {
        // Timestamps near 0: long expired.
        log.append(&mut batch_of(&format!("r{round}"), 5, 0))
            .unwrap();
    }
    assert!(log.segment_count() > 2);
    manager.close().unwrap();
    drop((manager, log));
    let (_manager, log) = open_partition(config, TOPIC);
    assert_eq!(log.truncate_to(7).unwrap(), 5);
    assert_eq!(log.segment_bases(), [0]);
    let later = silt_log::now_ms() + TopicConfig::default().segment_ms as i64;
    let report = log.enforce_retention(later, None).unwrap();
    assert_eq!(report.offsets, 5, "the segment rolled by age, then expired");
    assert_eq!(log.log_start_offset(), 5);
}

/// An appender waiting for its fsync while a truncation removes its records used to loop on
/// fsyncs forever: no fsync can make durable an end the log no longer reaches. It now gets
/// `LogError::Truncated`. (The relaxed
/// flusher hung the same way, keeping the data directory locked after the manager was dropped.)
#[test]
fn truncating_an_append_waiting_for_its_fsync_does_not_hang_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_manager, log) = open_partition(small_config(dir.path()), TOPIC);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let truncator = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = log.truncate_to(log.log_end_offset().saturating_sub(1));
            }
        })
    };
    // Two appenders, so one often waits through the other's fsync while the truncator runs.
    const APPENDERS: usize = 2;
    const APPENDS: usize = 100;
    let (done, finished) = std::sync::mpsc::channel();
    for thread in 0..APPENDERS {
        let (log, done) = (log.clone(), done.clone());
        std::thread::spawn(move || {
            for round in 0..APPENDS {
                // Ok, or the typed error saying a truncation removed the records before they
                // became durable: never a hang, never an acknowledgement of removed records.
                match log.append(&mut batch_of(&format!("{thread}-{round}"), 1, 0)) {
                    Ok(_) | Err(silt_log::LogError::Truncated { .. }) => {}
                    Err(error) => panic!("append failed: {error}"),
                }
            }
            let _ = done.send(());
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = (0..APPENDERS).try_for_each(|_| {
        finished.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    truncator.join().unwrap();
    assert!(
        result.is_ok(),
        "an append hung after a truncation removed its records"
    );
    assert_eq!(log.high_watermark(), log.log_end_offset());
}

fn run_ops(
    segment_bytes: u64,
    index_interval_bytes: u32,
    relaxed: bool,
    preallocate_bytes: u64,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(
        segment_bytes,
        index_interval_bytes,
        relaxed,
        preallocate_bytes,
    );
    for (step, op) in ops.iter().enumerate() {
        harness
            .run(op)
            .and_then(|()| harness.check_invariants())
            .map_err(|e| TestCaseError::fail(format!("step {step} ({op:?}): {e}")))?;
    }
    Ok(())
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(192),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    /// Durable flush mode: every acknowledged record survives any reopen, clean or not.
    #[test]
    fn durable_log_matches_model(
        segment_bytes in 512u64..4096,
        index_interval_bytes in 32u32..1024,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run_ops(segment_bytes, index_interval_bytes, false, 0, &ops)?;
    }

    /// The same with a preallocated zero tail ahead of the active segment, of any size
    /// against the segment's.
    #[test]
    fn preallocating_log_matches_model(
        segment_bytes in 512u64..4096,
        index_interval_bytes in 32u32..1024,
        preallocate_bytes in 1u64..3000,
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run_ops(segment_bytes, index_interval_bytes, false, preallocate_bytes, &ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(48),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    /// Relaxed flush mode, with a flusher racing the operations. A process that stops without
    /// closing keeps its page cache, so nothing is lost here either.
    #[test]
    fn relaxed_log_matches_model(
        segment_bytes in 512u64..4096,
        index_interval_bytes in 32u32..1024,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run_ops(segment_bytes, index_interval_bytes, true, 0, &ops)?;
    }
}
