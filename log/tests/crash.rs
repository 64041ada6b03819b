//! Crash test: a child process appends from several threads and reports every append it saw
//! become durable; the parent kills it with SIGKILL at a random point, reopens the log, and
//! checks that every reported append is there, once, in per-thread order. It runs twice: as
//! the log is by default, and with a preallocated zero tail ahead of the active segment.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use silt_log::{LogConfig, LogManager};

const CHILD_DIR_ENV: &str = "SILT_CRASH_CHILD_DIR";
const CHILD_RUN_ENV: &str = "SILT_CRASH_CHILD_RUN";
const CHILD_PREALLOCATE_ENV: &str = "SILT_CRASH_CHILD_PREALLOCATE";
/// Small against the 16 KiB segments, so tails are extended, cut at rolls and capped at the
/// segment size many times per run.
const PREALLOCATE_BYTES: u64 = 4096;
const THREADS: usize = 4;
const ROUNDS: usize = 12;

fn config(dir: &std::path::Path, preallocate_bytes: u64) -> LogConfig {
    let mut config = small_config(dir);
    // Segments of 16 KiB roll every few hundred appends, so kills land mid-roll too.
    config.topic_defaults.segment_bytes = 16 * 1024;
    config.preallocate_bytes = preallocate_bytes;
    config
}

/// The child's side of the crash test; a no-op unless the parent started this binary with
/// `SILT_CRASH_CHILD_DIR` set.
#[test]
fn crash_child_entry() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let run: usize = std::env::var(CHILD_RUN_ENV).unwrap().parse().unwrap();
    let preallocate_bytes: u64 = std::env::var(CHILD_PREALLOCATE_ENV)
        .unwrap()
        .parse()
        .unwrap();
    let manager = open_when_unlocked(config(std::path::Path::new(&dir), preallocate_bytes));
    manager.ensure_topic("crash", 1).unwrap();
    let log = manager.partition("crash", 0).unwrap();
    let stdout = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let log = &log;
            let stdout = &stdout;
            scope.spawn(move || {
                for seq in 0.. {
                    let records = 1 + seq % 5;
                    let mut batch = batch_of(&format!("{run}/{thread}/{seq}"), records, seq as i64);
                    let info = log.append(&mut batch).unwrap();
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {run} {thread} {seq} {}", info.base_offset).unwrap();
                    out.flush().unwrap();
                }
            });
        }
    });
}

#[test]
fn every_acknowledged_append_survives_kill_9() {
    crash_rounds(0);
}

#[test]
fn every_acknowledged_append_survives_kill_9_with_a_preallocated_tail() {
    crash_rounds(PREALLOCATE_BYTES);
}

fn crash_rounds(preallocate_bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    // Acknowledged appends: (run, thread, seq) -> base offset.
    let mut acked: BTreeMap<(usize, usize, usize), u64> = BTreeMap::new();
    for run in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_RUN_ENV, run.to_string())
            .env(CHILD_PREALLOCATE_ENV, preallocate_bytes.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.first() == Some(&"ack") && fields.len() == 5 {
                    let parse = |i: usize| fields[i].parse::<u64>().unwrap();
                    let key = (parse(1) as usize, parse(2) as usize, parse(3) as usize);
                    if tx.send((key, parse(4))).is_err() {
                        break;
                    }
                }
            }
        });
        // Kill after a random number of acknowledgements, so the kill lands anywhere: mid
        // write, mid fsync, mid roll.
        let kill_after = rng.random_range(20..600);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < kill_after {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let (key, offset) = rx
                .recv_timeout(remaining)
                .expect("child kept acknowledging appends");
            acked.insert(key, offset);
            seen += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Acks printed before the kill but read after it count too.
        while let Ok((key, offset)) = rx.try_recv() {
            acked.insert(key, offset);
        }
        verify(dir.path(), preallocate_bytes, &acked);
    }
}

/// Opens the data directory, waiting while another process holds its lock: the two tests of
/// this file run in parallel, and a child forked by one briefly holds a copy of every file
/// descriptor of the other (the lock's too) until it execs.
fn open_when_unlocked(config: LogConfig) -> std::sync::Arc<LogManager> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match LogManager::open(config.clone()) {
            Err(silt_log::LogError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.expect("open the data directory"),
        }
    }
}

fn verify(
    dir: &std::path::Path,
    preallocate_bytes: u64,
    acked: &BTreeMap<(usize, usize, usize), u64>,
) {
    // Opening also checks every closed segment below the recovery point whole: one left
    // with a zero tail would fail here as corrupt.
    let manager = open_when_unlocked(config(dir, preallocate_bytes));
    assert!(
        !manager.opened_clean(),
        "a killed process cannot have shut down cleanly"
    );
    let log = manager.partition("crash", 0).unwrap();
    if preallocate_bytes > 0 {
        // Every closed segment ends at its last batch; only the active one has a tail.
        for summary in log.closed_segments() {
            let path = dir
                .join("crash/0")
                .join(format!("{:020}.log", summary.base_offset));
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                summary.size_bytes,
                "closed segment {} has a tail",
                summary.base_offset
            );
        }
    }
    let records = read_all(&log, 0);
    let mut present: BTreeMap<(usize, usize, usize), u64> = BTreeMap::new();
    let mut seen_values = HashSet::new();
    for record in &records {
        let value = String::from_utf8(record.value.clone().unwrap().to_vec()).unwrap();
        assert!(
            seen_values.insert(value.clone()),
            "duplicate record {value}"
        );
        let (prefix, index) = value.rsplit_once('-').unwrap();
        if index == "0" {
            let parts: Vec<usize> = prefix.split('/').map(|p| p.parse().unwrap()).collect();
            present.insert((parts[0], parts[1], parts[2]), record.offset as u64);
        }
    }
    for (key, offset) in acked {
        assert_eq!(
            present.get(key),
            Some(offset),
            "acknowledged append {key:?} at offset {offset} is missing after recovery"
        );
    }
    // Per-thread order: within a run and thread, sequence numbers only grow with offsets.
    let mut last: BTreeMap<(usize, usize), (usize, u64)> = BTreeMap::new();
    for (&(run, thread, seq), &offset) in &present {
        if let Some(&(previous_seq, previous_offset)) = last.get(&(run, thread)) {
            assert!(seq > previous_seq && offset > previous_offset);
        }
        last.insert((run, thread), (seq, offset));
    }
    manager.close().unwrap();
}
