//! The cold reader's metrics on `/metrics`: a real `silt-core` process archives a topic to a
//! `file://` store and deletes it locally, a raw Kafka Fetch reads it back from the archive,
//! and the scrape shows the read (`silt_tier_cold_*`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use silt_log::batch::{BatchSpec, Record, encode_batch};
use silt_log::{LogConfig, LogManager};

const SILT_CORE: &str = env!("CARGO_BIN_EXE_silt-core");
const TOPIC: &str = "cold-metrics";
const RECORDS: i64 = 6_000;
const BATCH_RECORDS: i64 = 200;
/// Generous: a loaded 2-core machine runs several builds beside this test.
const DEADLINE: Duration = Duration::from_secs(120);

/// A running `silt-core`, killed on drop.
struct Core {
    child: Child,
    admin: String,
    kafka: String,
}

impl Drop for Core {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_core(data_dir: &std::path::Path, store: &std::path::Path) -> Core {
    let mut child = Command::new(SILT_CORE)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--object-store")
        .arg(format!("file://{}", store.display()))
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--kafka-listen", "127.0.0.1:0"])
        .args(["--uplink-listen", "127.0.0.1:0"])
        .args(["--set", "tiering.max_wait_ms=0"])
        .args(["--set", "tiering.check_interval_ms=50"])
        .args(["--set", "topic_defaults.local.retention.ms=0"])
        .args(["--set", "log.retention_check_ms=50"])
        .args(["--set", "tiering.cold_cache_bytes=8MiB"])
        .args(["--set", "tiering.cold_prefetch_max=2"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("silt-core starts");
    // The node logs to stderr.
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match received.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("silt-core did not log its start within {DEADLINE:?}");
            }
        };
        if line.contains("silt-core started") {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|word| word.strip_prefix(&format!("{name}=")))
                    .unwrap_or_else(|| panic!("no {name}= in {line}"))
                    .to_string()
            };
            let core = Core {
                admin: field("admin"),
                kafka: field("kafka"),
                child,
            };
            // Keep draining the log so the core never blocks on a full pipe.
            std::thread::spawn(move || for _ in received {});
            return core;
        }
    }
}

/// `GET path` on the admin port: status and body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name` (labels included, as rendered), if scraped.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
}

fn kafka_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&i16::try_from(text.len()).unwrap().to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// One Fetch v4 of `offset` of partition 0, at most about `max_bytes`: the record bytes of
/// the answer.
fn fetch(kafka: &str, offset: i64, max_bytes: i32) -> Bytes {
    let mut answers = fetch_entries(kafka, 1 << 20, &[(offset, max_bytes)]);
    let (error, records) = answers.pop().expect("one partition answered");
    assert_eq!(error, 0, "Fetch of offset {offset} failed");
    records
}

/// One Fetch v4 of partition 0 with one entry per `(offset, partition max bytes)`, at most
/// `max_bytes` in all: each entry's error code and record bytes, in order.
fn fetch_entries(kafka: &str, max_bytes: i32, entries: &[(i64, i32)]) -> Vec<(i16, Bytes)> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&1i16.to_be_bytes()); // Fetch
    frame.extend_from_slice(&4i16.to_be_bytes());
    frame.extend_from_slice(&7i32.to_be_bytes());
    kafka_string(&mut frame, "cold-metrics-test");
    frame.extend_from_slice(&(-1i32).to_be_bytes()); // replica
    frame.extend_from_slice(&100i32.to_be_bytes()); // max wait
    frame.extend_from_slice(&1i32.to_be_bytes()); // min bytes
    frame.extend_from_slice(&max_bytes.to_be_bytes());
    frame.push(0); // isolation
    frame.extend_from_slice(&1i32.to_be_bytes());
    kafka_string(&mut frame, TOPIC);
    frame.extend_from_slice(&i32::try_from(entries.len()).unwrap().to_be_bytes());
    for &(offset, partition_max_bytes) in entries {
        frame.extend_from_slice(&0i32.to_be_bytes());
        frame.extend_from_slice(&offset.to_be_bytes());
        frame.extend_from_slice(&partition_max_bytes.to_be_bytes());
    }
    let mut stream = TcpStream::connect(kafka).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(&i32::try_from(frame.len()).unwrap().to_be_bytes())
        .unwrap();
    stream.write_all(&frame).unwrap();
    let mut size = [0u8; 4];
    stream.read_exact(&mut size).unwrap();
    let mut response = vec![0u8; usize::try_from(i32::from_be_bytes(size)).unwrap()];
    stream.read_exact(&mut response).unwrap();
    let mut at = 0;
    let mut take = |n: usize| {
        let piece = &response[at..at + n];
        at += n;
        piece.to_vec()
    };
    assert_eq!(take(4), 7i32.to_be_bytes(), "correlation id");
    take(4); // throttle
    assert_eq!(take(4), 1i32.to_be_bytes(), "one topic");
    let name_len = i16::from_be_bytes(take(2).try_into().unwrap());
    take(usize::try_from(name_len).unwrap());
    let partitions = i32::from_be_bytes(take(4).try_into().unwrap());
    assert_eq!(usize::try_from(partitions).unwrap(), entries.len());
    (0..entries.len())
        .map(|_| {
            take(4); // partition
            let error = i16::from_be_bytes(take(2).try_into().unwrap());
            take(16); // high watermark, last stable offset
            let aborted = i32::from_be_bytes(take(4).try_into().unwrap());
            take(usize::try_from(aborted.max(0)).unwrap() * 16);
            let size = i32::from_be_bytes(take(4).try_into().unwrap());
            (error, Bytes::from(take(usize::try_from(size).unwrap())))
        })
        .collect()
}

/// The offset after the last whole batch of `records` (RecordBatch v2: base offset at byte 0,
/// the batch length after it, the last offset delta at byte 23).
fn next_offset(records: &[u8]) -> i64 {
    let mut at = 0;
    let mut next = -1;
    while at + 27 <= records.len() {
        let base = i64::from_be_bytes(records[at..at + 8].try_into().unwrap());
        let length = i32::from_be_bytes(records[at + 8..at + 12].try_into().unwrap());
        let delta = i32::from_be_bytes(records[at + 23..at + 27].try_into().unwrap());
        let end = at + 12 + usize::try_from(length).unwrap();
        if end > records.len() {
            break; // a partial batch at the end of a Fetch
        }
        next = base + i64::from(delta) + 1;
        at = end;
    }
    assert!(next > 0, "no whole batch in the Fetch");
    next
}

/// A data directory holding `RECORDS` records of `TOPIC` in many small closed segments.
fn fill(data_dir: &std::path::Path) {
    let mut config = LogConfig::new(data_dir);
    config.topic_defaults.segment_bytes = 64 << 10;
    let log = LogManager::open(config).unwrap();
    log.create_topic(TOPIC, 1, &BTreeMap::new()).unwrap();
    let partition = log.partition(TOPIC, 0).unwrap();
    for base in (0..RECORDS).step_by(usize::try_from(BATCH_RECORDS).unwrap()) {
        let records: Vec<Record> = (base..base + BATCH_RECORDS)
            .map(|offset| Record {
                timestamp: 1_795_305_600_000 + offset,
                key: Some(Bytes::from(format!("key-{}", offset % 17))),
                value: Some(Bytes::from(format!(
                    "{{\"device\":\"sensor-{:04}\",\"reading\":{offset}}}",
                    offset % 100
                ))),
                headers: vec![],
            })
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        partition.append(&mut batch).unwrap();
    }
    log.close().unwrap();
}

#[test]
fn a_cold_fetch_shows_in_the_cold_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("core");
    let store = dir.path().join("archive");
    fill(&data_dir);
    let core = start_core(&data_dir, &store);

    // Wait until offset 0 is archived and gone from local disk.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, body) = http_get(&core.admin, &format!("/v1/tier/status/{TOPIC}"));
        if status == 200 {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let local_start = json["partitions"][0]["local_start_offset"]
                .as_u64()
                .unwrap();
            if local_start > 1_000 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "offset 0 was not archived and deleted locally within {DEADLINE:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (_, before) = http_get(&core.admin, "/metrics");
    assert_eq!(
        sample(&before, "silt_tier_cold_reads_total{result=\"ok\"}"),
        None,
        "no cold read yet"
    );
    // A random read (offset 0) fetches its pages; the sequential read after it fetches and
    // caches the whole row group.
    let records = fetch(&core.kafka, 0, 4096);
    assert!(records.len() > 61, "the cold Fetch returned batches");
    assert_eq!(
        &records[..8],
        &0i64.to_be_bytes(),
        "the first batch starts at 0"
    );
    let next = next_offset(&records);
    let following = fetch(&core.kafka, next, 4096);
    assert_eq!(&following[..8], &next.to_be_bytes(), "contiguous");
    let (status, metrics) = http_get(&core.admin, "/metrics");
    assert_eq!(status, 200);
    let value = |name: &str| {
        sample(&metrics, name).unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    assert_eq!(value("silt_tier_cold_reads_total{result=\"ok\"}"), 2.0);
    assert!(value("silt_tier_cold_read_records_total") >= 2.0);
    assert!(value("silt_tier_cold_read_bytes_total") >= (records.len() + following.len()) as f64);
    assert_eq!(value("silt_tier_cold_read_duration_seconds_count"), 2.0);
    assert!(value("silt_tier_cold_chunk_fetches_total") >= 1.0);
    assert!(value("silt_tier_cold_chunk_fetched_bytes_total") > 0.0);
    assert!(value("silt_tier_cold_cached_bytes") > 0.0);
    assert!(value("silt_tier_cold_manifest_loads_total") >= 1.0);
    assert!(value("silt_tier_cold_objects_opened_total") >= 1.0);
    assert!(metrics.contains("# HELP silt_tier_cold_reads_total"));
    let hits = sample(&metrics, "silt_tier_cold_chunk_hits_total").unwrap_or(0.0);

    // Offset 0 again: its row group is cached now.
    let again = fetch(&core.kafka, 0, 4096);
    assert_eq!(again, records, "the second read is byte-identical");
    let (_, metrics) = http_get(&core.admin, "/metrics");
    assert_eq!(
        sample(&metrics, "silt_tier_cold_reads_total{result=\"ok\"}"),
        Some(3.0)
    );
    assert!(sample(&metrics, "silt_tier_cold_chunk_hits_total").unwrap_or(0.0) > hits);

    // A replay reading on: the batches rebuilt ahead of it serve its Fetches (each Fetch here
    // is a fresh connection, which leaves the background rebuild time to run between them).
    let (mut offset, mut ahead) = (next_offset(&again), 0.0);
    while ahead == 0.0 && offset < RECORDS {
        let read = fetch(&core.kafka, offset, 4096);
        assert_eq!(&read[..8], &offset.to_be_bytes(), "contiguous");
        offset = next_offset(&read);
        let (_, metrics) = http_get(&core.admin, "/metrics");
        ahead = sample(&metrics, "silt_tier_cold_ahead_bytes_total").unwrap_or(0.0);
    }
    assert!(
        ahead > 0.0,
        "no Fetch up to offset {offset} was served from batches rebuilt ahead"
    );

    // A Fetch whose budget (1 byte) the first entry spends, as Kafka answers at least one batch
    // for it: the second (offset 0 again, archived) gets no records and no error, and costs no
    // archive read (one would rebuild a batch only to drop it).
    let reads = |metrics: &str| sample(metrics, "silt_tier_cold_reads_total{result=\"ok\"}");
    let (_, metrics) = http_get(&core.admin, "/metrics");
    let before = reads(&metrics).expect("cold reads counted above");
    let answers = fetch_entries(&core.kafka, 1, &[(0, 4096), (0, 4096)]);
    assert_eq!(answers[0].0, 0, "the first entry is read");
    assert!(
        answers[0].1.len() > 61 && answers[0].1[..8] == 0i64.to_be_bytes(),
        "the first entry gets a batch at offset 0 (of one record at least)"
    );
    assert_eq!(
        answers[1],
        (0, Bytes::new()),
        "no budget left: no records, no error"
    );
    let (_, metrics) = http_get(&core.admin, "/metrics");
    assert_eq!(
        reads(&metrics),
        Some(before + 1.0),
        "only the entry with a budget read the archive"
    );
}
