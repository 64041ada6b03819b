//! The CPU cost of rebuilding Kafka batches from archive objects, without a broker, a client
//! or a network: a steadier measure than `scripts/bench-tier`'s end-to-end pass, whose figures
//! move by 15% between runs on a shared 2-CPU machine.
//!
//! ```sh
//! cargo run --release -p silt-tiering --example cold-decode -- DIR [PASSES]
//! ```
//!
//! `DIR` is a directory of archive objects (`*.parquet`, searched recursively, such as the
//! endpoint root `scripts/bench-tier --keep` leaves). Each pass reads every object from its
//! first offset to its last through one [`ArchiveCursor`](silt_tiering::read::ArchiveCursor),
//! 1 MiB per read (a Fetch's partition maximum), on one thread, decoding inline. It prints
//! each pass's CPU time and rebuilt MB/s per CPU-second, then the median.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use silt_tiering::{ArchiveReader, ArchiveStore};

/// Bytes per read: librdkafka's default `max.partition.fetch.bytes`.
const READ_BYTES: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: cold-decode DIR [PASSES]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let passes: usize = match args.next() {
        Some(text) => text.parse().map_err(|_| usage)?,
        None => 5,
    };
    let root = dir.canonicalize()?;
    let mut objects = Vec::new();
    find_parquet(&root, &mut objects)?;
    objects.sort();
    if objects.is_empty() {
        return Err(format!("no .parquet files under {}", root.display()).into());
    }
    let store = ArchiveStore::open(&format!("file://{}", root.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rates = Vec::with_capacity(passes);
    for pass in 1..=passes {
        let start = cpu_time();
        let (bytes, records) = runtime.block_on(read_all(&store, &root, &objects))?;
        let cpu = cpu_time().saturating_sub(start).as_secs_f64();
        let rate = bytes as f64 / 1e6 / cpu;
        println!(
            "pass {pass}: {records} records, {bytes} bytes of batches in {cpu:.3} CPU-s = {rate:.0} MB/CPU-s"
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median: {:.0} MB/CPU-s", rates[rates.len() / 2]);
    Ok(())
}

/// Reads every object whole; returns the batch bytes and records rebuilt.
async fn read_all(
    store: &ArchiveStore,
    root: &Path,
    objects: &[PathBuf],
) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let (mut bytes, mut records) = (0u64, 0u64);
    let mut out = BytesMut::new();
    for object in objects {
        let key = object.strip_prefix(root)?.to_string_lossy().into_owned();
        let size = std::fs::metadata(object)?.len();
        let reader = ArchiveReader::open(store, &key, Some(size)).await?;
        let mut cursor = reader.cursor(reader.info().base_offset)?;
        while !cursor.is_done() {
            out.clear();
            records += cursor.read_into(READ_BYTES, &mut out).await?;
            bytes += out.len() as u64;
        }
    }
    Ok((bytes, records))
}

fn find_parquet(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            find_parquet(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "parquet") {
            found.push(path);
        }
    }
    Ok(())
}

/// CPU time of this process (user and system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| fields.get(index).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name and state.
    let total = ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(total * 10)
}
