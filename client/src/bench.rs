//! `silt bench`: throughput figures for Silt beside a baseline measured in the same run.
//!
//! `silt bench log` appends 1 KiB records in batches under the default (durable) flush policy
//! and compares the rate with the raw sequential write bandwidth of the same disk, measured by
//! writing and fsyncing a file of the same size, in the same directory, in the same run. It
//! then reads the log back from the page cache. Each figure is the median of several runs.
//!
//! `silt bench mqtt` loads any MQTT broker and reports publish throughput and acknowledgement
//! latency (see [`mqtt`]); `scripts/bench-mqtt` runs it against Mosquitto and silt-edge in
//! alternating runs.
//!
//! `silt bench kafka` measures produce and consume throughput of any Kafka-protocol broker
//! beside raw disk and loopback TCP bandwidth (see [`kafka`]).
//!
//! `silt bench quic` measures one bare QUIC stream over loopback with the uplink's transport,
//! the link baseline of `scripts/bench-uplink` (see [`quic`]).

mod kafka;
mod mqtt;
mod quic;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::{Args, Subcommand};
use silt_log::batch::{self, BatchSpec, Record};
use silt_log::{LogConfig, LogManager};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchTarget {
    /// Append and read throughput of the storage engine against the raw disk.
    Log(LogBench),
    /// Publish throughput and acknowledgement latency of any MQTT broker.
    Mqtt(mqtt::MqttBench),
    /// Produce and consume throughput of any Kafka-protocol broker against raw disk and loopback.
    Kafka(kafka::KafkaBench),
    /// Bandwidth of one bare QUIC stream over loopback, with the uplink's TLS and window.
    Quic(quic::QuicBench),
}

#[derive(Debug, Args)]
pub(crate) struct LogBench {
    /// Directory on the disk to measure; a scratch directory is made inside and removed.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes of record values written per run.
    #[arg(long, default_value_t = 256 << 20)]
    total_bytes: u64,
    /// Size of each record value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Records per batch.
    #[arg(long, default_value_t = 256)]
    batch_records: usize,
    /// Concurrent appending threads, sharing fsyncs through group commit: an edge node
    /// appends for many connected sensors at once.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Runs; the medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

pub(crate) fn run(target: BenchTarget) -> anyhow::Result<()> {
    match target {
        BenchTarget::Log(options) => log_bench(&options),
        BenchTarget::Mqtt(options) => mqtt::run(&options),
        BenchTarget::Kafka(options) => kafka::run(&options),
        BenchTarget::Quic(options) => quic::run(&options),
    }
}

#[derive(Debug, Clone, Copy)]
struct RunFigures {
    raw_mb_s: f64,
    append_mb_s: f64,
    read_mb_s: f64,
    fsyncs: u64,
    appends: u64,
}

fn log_bench(options: &LogBench) -> anyhow::Result<()> {
    if options.record_bytes == 0 || options.batch_records == 0 || options.writers == 0 {
        bail!("--record-bytes, --batch-records and --writers must be at least 1");
    }
    if options.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let scratch = tempfile::Builder::new()
        .prefix("silt-bench-")
        .tempdir_in(&options.dir)
        .with_context(|| format!("creating a scratch directory in {}", options.dir.display()))?;
    let template = batch_template(options)?;
    let batches =
        (options.total_bytes / (options.record_bytes * options.batch_records) as u64).max(1);
    let log_bytes = batches * template.len() as u64;
    println!(
        "silt bench log: {} runs of {batches} batches x {} records x {} B ({:.0} MiB of batches), {} writers, durable flush",
        options.runs,
        options.batch_records,
        options.record_bytes,
        log_bytes as f64 / (1 << 20) as f64,
        options.writers
    );
    println!(
        "{:>4} {:>12} {:>14} {:>8} {:>14} {:>16}",
        "run", "raw MB/s", "append MB/s", "ratio", "read MB/s", "appends/fsync"
    );
    let mut figures = Vec::new();
    for run in 1..=options.runs {
        let raw_mb_s = raw_write(scratch.path(), log_bytes, template.len())?;
        let run_figures = log_run(scratch.path(), options, &template, batches, raw_mb_s)?;
        println!(
            "{run:>4} {:>12.1} {:>14.1} {:>7.0}% {:>14.1} {:>16.1}",
            run_figures.raw_mb_s,
            run_figures.append_mb_s,
            100.0 * run_figures.append_mb_s / run_figures.raw_mb_s,
            run_figures.read_mb_s,
            run_figures.appends as f64 / run_figures.fsyncs.max(1) as f64
        );
        figures.push(run_figures);
    }
    let raw = median(figures.iter().map(|f| f.raw_mb_s));
    let append = median(figures.iter().map(|f| f.append_mb_s));
    let ratio = median(figures.iter().map(|f| f.append_mb_s / f.raw_mb_s));
    let read = median(figures.iter().map(|f| f.read_mb_s));
    println!(
        "median: raw {raw:.1} MB/s, append {append:.1} MB/s ({:.0}% of raw), read from page cache {read:.1} MB/s",
        100.0 * ratio
    );
    Ok(())
}

/// One batch of `batch_records` records with `record_bytes` values of incompressible-ish
/// bytes, as a producer would send it.
fn batch_template(options: &LogBench) -> anyhow::Result<BytesMut> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let value: Vec<u8> = (0..options.record_bytes)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect();
    let value = Bytes::from(value);
    let now = silt_log::now_ms();
    let records: Vec<Record> = (0..options.batch_records)
        .map(|i| Record {
            timestamp: now,
            key: Some(Bytes::from(format!("sensor-{}", i % 16))),
            value: Some(value.clone()),
            headers: Vec::new(),
        })
        .collect();
    let mut out = BytesMut::new();
    batch::encode_batch(&BatchSpec::default(), &records, &mut out)?;
    Ok(out)
}

/// Sequential write bandwidth of the disk under `dir`: `bytes` written in `chunk_bytes`
/// writes, then one fsync, timed together.
pub(crate) fn raw_write(dir: &Path, bytes: u64, chunk_bytes: usize) -> anyhow::Result<f64> {
    let path = dir.join("raw.bin");
    let chunk = vec![0x5a_u8; chunk_bytes];
    let started = Instant::now();
    let mut file = File::create(&path)?;
    let mut written = 0;
    while written < bytes {
        file.write_all(&chunk)?;
        written += chunk_bytes as u64;
    }
    file.sync_all()?;
    let elapsed = started.elapsed();
    drop(file);
    fs::remove_file(&path)?;
    Ok(mb_per_s(written, elapsed))
}

fn log_run(
    dir: &Path,
    options: &LogBench,
    template: &BytesMut,
    batches: u64,
    raw_mb_s: f64,
) -> anyhow::Result<RunFigures> {
    let data_dir = dir.join("log");
    let mut config = LogConfig::new(&data_dir);
    config.max_batch_bytes = config.max_batch_bytes.max(template.len());
    let manager = LogManager::open(config)?;
    manager.ensure_topic("bench", 1)?;
    let log = manager.partition("bench", 0)?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..options.writers)
            .map(|_| {
                let log = log.clone();
                let next = next.clone();
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut batch = template.clone();
                    while next.fetch_add(1, Ordering::Relaxed) < batches {
                        batch.copy_from_slice(template);
                        log.append(&mut batch)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("appender thread panicked")?;
        }
        Ok(())
    })?;
    let append_elapsed = started.elapsed();
    let log_bytes = log.size_bytes();
    let fsyncs = log.fsync_count();

    let started = Instant::now();
    let mut offset = 0;
    let mut read_bytes = 0;
    let end = log.high_watermark();
    while offset < end {
        let slice = log.read(offset, 1 << 20)?;
        let mut at = 0;
        while let Some((header, len)) = batch::check_batch(&slice.bytes[at..], usize::MAX)? {
            offset = header.last_offset() as u64 + 1;
            at += len;
        }
        if at == 0 {
            bail!("read at offset {offset} returned no whole batch");
        }
        read_bytes += slice.bytes.len() as u64;
    }
    let read_elapsed = started.elapsed();
    manager.close()?;
    drop((log, manager));
    fs::remove_dir_all(&data_dir)?;
    Ok(RunFigures {
        raw_mb_s,
        append_mb_s: mb_per_s(log_bytes, append_elapsed),
        read_mb_s: mb_per_s(read_bytes, read_elapsed),
        fsyncs,
        appends: batches,
    })
}

pub(crate) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

pub(crate) fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
