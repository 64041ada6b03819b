//! Reads at the moving tier boundary: while a producer keeps segments closing, offload keeps
//! archiving them and local retention keeps deleting what is archived, `silt consume` reads
//! again and again from the current local start and from just below it (archived only), so
//! its Fetches race the local start moving past them. Every read must return exactly the
//! records asked for, from the offset asked for, within its deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use silt_tests::cli::{json_lines, silt_ok};
use silt_tests::core::{Core, json_u64};

const TOPIC: &str = "boundary";
/// Records produced, in `silt produce` calls of [`PER_CALL`].
const RECORDS: u64 = 4000;
const PER_CALL: u64 = 25;
/// Records each consume asks for.
const READ: u64 = 30;
/// Reads at least this many times, even if the producer finishes first.
const MIN_READS: usize = 24;
const TEST_DEADLINE: Duration = Duration::from_secs(240);

fn value(seq: u64) -> String {
    format!("{{\"device\":\"sensor-{:03}\",\"seq\":{seq}}}", seq % 37)
}

/// `silt consume` of `READ` records from `offset`; checks offsets and values.
fn consume_from(core: &Core, offset: u64) {
    let bootstrap = core.kafka.to_string();
    let (from, count) = (offset.to_string(), READ.to_string());
    let out = silt_ok(
        &[
            "consume",
            "--bootstrap",
            &bootstrap,
            "--topic",
            TOPIC,
            "--partition",
            "0",
            "--offset",
            &from,
            "--max-messages",
            &count,
            "--timeout-ms",
            "15000",
        ],
        b"",
    );
    let records = json_lines(&out);
    assert_eq!(records.len() as u64, READ, "from offset {offset}: {out}");
    for (expected, record) in (offset..).zip(&records) {
        assert_eq!(record["offset"].as_u64(), Some(expected), "{record}");
        assert_eq!(
            record["value"].as_str(),
            Some(value(expected).as_str()),
            "{record}"
        );
    }
}

#[test]
fn reads_racing_the_local_start_get_every_record_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let store = format!("file://{}", objects.display());
    let mut args = vec!["--object-store", store.as_str()];
    for set in [
        "topic_defaults.segment.bytes=2048",
        "topic_defaults.local.retention.ms=0",
        "tiering.max_wait_ms=0",
        "tiering.check_interval_ms=50",
        "log.retention_check_ms=50",
    ] {
        args.extend(["--set", set]);
    }
    let core = Core::start(&dir.path().join("data"), &args);
    let bootstrap = core.kafka.to_string();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            &bootstrap,
            "--topic",
            TOPIC,
            "--partitions",
            "1",
        ],
        b"",
    );

    // One producer, one partition: record `seq` lands at offset `seq`.
    let produced = Arc::new(AtomicBool::new(false));
    let producer = {
        let (produced, bootstrap) = (produced.clone(), bootstrap.clone());
        std::thread::spawn(move || {
            for first in (0..RECORDS).step_by(PER_CALL as usize) {
                let lines: String = (first..first + PER_CALL)
                    .map(|seq| value(seq) + "\n")
                    .collect();
                silt_ok(
                    &["produce", "--bootstrap", &bootstrap, "--topic", TOPIC],
                    lines.as_bytes(),
                );
            }
            produced.store(true, Ordering::Release);
        })
    };

    let deadline = Instant::now() + TEST_DEADLINE;
    let (mut reads, mut cold_reads) = (0usize, 0usize);
    while !produced.load(Ordering::Acquire) || reads < MIN_READS {
        assert!(
            Instant::now() < deadline,
            "{reads} reads in {TEST_DEADLINE:?}"
        );
        let status = core.tier_status(TOPIC)["partitions"][0].clone();
        let (local_start, high_watermark) = (
            json_u64(&status, "local_start_offset"),
            json_u64(&status, "high_watermark"),
        );
        if high_watermark < READ {
            // Too little produced yet to read: poll again.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // At the local start (local now, maybe not by the time the Fetch lands) and a few
        // records below it (archived only: this read crosses the tier boundary); never past
        // what has been produced.
        for candidate in [local_start, local_start.saturating_sub(5)] {
            let offset = candidate.min(high_watermark - READ);
            consume_from(&core, offset);
            reads += 1;
            cold_reads += usize::from(offset < local_start);
        }
    }
    producer.join().unwrap();
    eprintln!("{reads} reads, {cold_reads} of them from below the local start");
    assert!(cold_reads > 0, "no read started below the local start");
    core.stop();
}
