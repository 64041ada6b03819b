//! End-to-end tiering to a real S3 protocol server: the real `silt-core` binary, with its own
//! offload loop, archives to s3s-fs served over HTTP on 127.0.0.1 from the test process
//! (`--object-store s3://bucket/prefix`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, SigV4
//! credentials the server checks). kcat replays from offset 0 across both tiers byte for byte
//! and finds offsets by timestamp in either tier; after a kill -9 while offload has work
//! pending, and another at the failpoint between upload and manifest commit, a restarted core
//! loses nothing, and garbage collection leaves the bucket holding exactly the objects the
//! manifest names.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use silt_log::batch::{BatchSpec, Compression, Header, Record, encode_batch};
use silt_tests::cli::silt_ok;
use silt_tests::core::{Core, json_u64};
use silt_tests::kafka::RawKafka;
use silt_tests::s3::S3Server;
use silt_tests::{Running, command, silt_core};

const TOPIC: &str = "readings";
const PREFIX: &str = "core";
const PER_BATCH: u64 = 10;
/// How long offload, retention and GC may take to catch up on a loaded 2-core machine.
const TIER_TIMEOUT: Duration = Duration::from_secs(90);
/// How long kcat may take to replay the partition.
const KCAT_TIMEOUT: Duration = Duration::from_secs(60);
const KCAT_FORMAT: &str = "%o|%k|%s|%h|%T\n";

/// Small segments, offload as soon as a segment closes, retries, retention and GC every
/// 100 ms with no grace (offload, retention and GC of a partition run in turn in one task, so
/// an object not in the manifest when GC runs is garbage), and local retention that deletes
/// whatever is archived.
fn tier_args(s3: &S3Server) -> Vec<String> {
    let mut args = vec!["--object-store".to_string(), s3.url(PREFIX)];
    for set in [
        "topic_defaults.segment.bytes=2048",
        "topic_defaults.local.retention.ms=0",
        "tiering.max_wait_ms=0",
        // One object per closed segment, however many closed before the first check: the
        // test needs several objects, not one merged from everything produced.
        "tiering.object_bytes_target=1",
        "tiering.check_interval_ms=100",
        "tiering.retry_initial_ms=100",
        "tiering.retry_max_ms=400",
        "tiering.gc_interval_ms=100",
        "tiering.gc_grace_ms=0",
        // The records are an hour old: compaction would rewrite the objects this test counts
        // (it has its own tests, tiering/tests/compact.rs and core-cluster/tests/tier_compact.rs).
        "tiering.compact=false",
        "log.retention_check_ms=100",
    ] {
        args.extend(["--set".to_string(), set.to_string()]);
    }
    args
}

fn start(data: &Path, s3: &S3Server) -> Core {
    let args = tier_args(s3);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Core::start_with_env(data, &args, &s3.env())
}

fn record(offset: u64, base_ts: i64) -> Record {
    let signed = i64::try_from(offset).unwrap();
    Record {
        timestamp: base_ts + signed * 7,
        key: Some(Bytes::from(format!("device-{}", offset % 17))),
        value: Some(Bytes::from(format!(
            "{{\"n\":{offset},\"t\":{}.{}}}",
            offset % 40,
            offset % 10
        ))),
        headers: if offset.is_multiple_of(4) {
            vec![]
        } else {
            vec![
                Header {
                    key: "src".into(),
                    value: Some(Bytes::from(format!("edge-{}", offset % 3))),
                },
                Header {
                    key: "seq".into(),
                    value: Some(Bytes::from(offset.to_string())),
                },
            ]
        },
    }
}

/// What kcat prints for `record` at `offset` with [`KCAT_FORMAT`].
fn kcat_line(offset: u64, record: &Record) -> String {
    let text = |bytes: &Option<Bytes>| String::from_utf8(bytes.clone().unwrap().to_vec()).unwrap();
    let headers: Vec<String> = record
        .headers
        .iter()
        .map(|header| format!("{}={}", header.key, text(&header.value)))
        .collect();
    format!(
        "{offset}|{}|{}|{}|{}\n",
        text(&record.key),
        text(&record.value),
        headers.join(","),
        record.timestamp
    )
}

/// Produces records `from..to` (offsets of partition 0, `from` the log end) in batches of
/// [`PER_BATCH`], every other one zstd-compressed, with acks=all.
fn produce(core: &Core, from: u64, to: u64, base_ts: i64) {
    let mut kafka = RawKafka::connect(core.kafka);
    for first in (from..to).step_by(PER_BATCH as usize) {
        let records: Vec<Record> = (first..(first + PER_BATCH).min(to))
            .map(|offset| record(offset, base_ts))
            .collect();
        let spec = BatchSpec {
            compression: if first.is_multiple_of(2 * PER_BATCH) {
                Compression::Zstd
            } else {
                Compression::None
            },
            ..BatchSpec::default()
        };
        let mut batch = BytesMut::new();
        encode_batch(&spec, &records, &mut batch).unwrap();
        let (error, base_offset) = kafka.produce(TOPIC, &batch);
        assert_eq!(error, 0, "producing at {first}");
        assert_eq!(base_offset, i64::try_from(first).unwrap());
    }
}

fn create_topic(core: &Core) {
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
}

fn status(core: &Core) -> serde_json::Value {
    core.tier_status(TOPIC)["partitions"][0].clone()
}

/// Base offsets of the partition's segment files (the log keeps them in `<topic>/<partition>`).
fn local_segments(data: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(data.join(TOPIC).join("0"))
        .expect("the partition's directory")
        .filter_map(|entry| {
            let name = entry.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    bases.sort_unstable();
    bases
}

/// The committed manifest's object keys (relative to the bucket) and the offset after its
/// last object, checked contiguous from 0 with every object present at the recorded size.
fn manifest(s3: &S3Server) -> (Vec<String>, u64) {
    let path = s3.object_path(&format!(
        "{PREFIX}/_manifests/v1/topic={TOPIC}/partition=0.json"
    ));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut next = 0;
    let mut keys = Vec::new();
    for object in manifest["objects"].as_array().expect("objects") {
        assert_eq!(json_u64(object, "base_offset"), next, "a gap: {manifest}");
        next = json_u64(object, "last_offset") + 1;
        // Keys are the objects' names in the bucket, the store's prefix included.
        let key = object["key"].as_str().unwrap().to_string();
        assert!(key.starts_with(&format!("{PREFIX}/v1/topic={TOPIC}/partition=0/date=")));
        let size = std::fs::metadata(s3.object_path(&key))
            .unwrap_or_else(|error| panic!("{key} is named by the manifest: {error}"))
            .len();
        assert_eq!(size, json_u64(object, "size_bytes"), "{key}");
        keys.push(key);
    }
    keys.sort();
    (keys, next)
}

/// Waits until offload, local retention and GC have caught up with `high_watermark`: every
/// closed segment archived and deleted locally (only the active segment is left, starting
/// where the archive ends), and the bucket holds exactly the objects the manifest names.
/// Nothing more is produced meanwhile, so the local start then stays put.
fn wait_settled(core: &Core, s3: &S3Server, high_watermark: u64) -> serde_json::Value {
    let deadline = Instant::now() + TIER_TIMEOUT;
    loop {
        let p = status(core);
        let settled = p["high_watermark"].as_u64() == Some(high_watermark)
            && p["last_error"].is_null()
            && p["log_start_offset"].as_u64() == Some(0)
            && p["archived_next_offset"].as_u64() > Some(0)
            && p["local_start_offset"] == p["archived_next_offset"]
            && local_segments(&core.data_dir) == [json_u64(&p, "local_start_offset")];
        if settled {
            let (keys, next) = manifest(s3);
            let stored = s3.keys(&format!("{PREFIX}/v1"));
            if next == json_u64(&p, "archived_next_offset") && stored == keys {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "offload, retention and GC not caught up within {TIER_TIMEOUT:?}: status {p}, \
             local segments {:?}, bucket {:?}",
            local_segments(&core.data_dir),
            s3.keys(PREFIX)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kcat(args: &[&str]) -> String {
    let output = Command::new("kcat")
        .args(args)
        .output()
        .expect("kcat is installed (scripts/test installs it)");
    assert!(
        output.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// kcat's replay of partition 0 from offset 0 to the end, failing after [`KCAT_TIMEOUT`] (a
/// hung read) with the core's state.
fn kcat_replay(core: &Core) -> String {
    let bootstrap = core.kafka.to_string();
    let mut child = Command::new("kcat")
        .args([
            "-C", "-b", &bootstrap, "-t", TOPIC, "-p", "0", "-o", "0", "-e", "-q",
        ])
        .args(["-f", KCAT_FORMAT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat is installed (scripts/test installs it)");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let deadline = Instant::now() + KCAT_TIMEOUT;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kcat still reading after {KCAT_TIMEOUT:?}: status {}; core stderr:\n{}",
                status(core),
                core.process.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(exit.success(), "kcat: {exit}: {stderr}");
    reader.join().unwrap().unwrap()
}

/// kcat replays `0..high_watermark` exactly.
fn check_replay(core: &Core, high_watermark: u64, base_ts: i64) {
    let replay = kcat_replay(core);
    let expected: String = (0..high_watermark)
        .map(|offset| kcat_line(offset, &record(offset, base_ts)))
        .collect();
    for (index, (got, want)) in replay.lines().zip(expected.lines()).enumerate() {
        assert_eq!(got, want, "line {index}");
    }
    assert_eq!(
        replay.lines().count(),
        expected.lines().count(),
        "records replayed"
    );
}

/// Whether the data directory holds a closed segment the committed manifest does not cover:
/// a core started on it has an upload due at once.
fn upload_due(data: &Path, s3: &S3Server) -> bool {
    let (_, archived_next) = manifest(s3);
    let segments = local_segments(data);
    // Every segment but the last (the active one) is closed.
    segments[..segments.len() - 1]
        .iter()
        .any(|&base| base >= archived_next)
}

#[test]
fn offload_to_s3_replays_across_tiers_and_kill_9_at_any_point_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, root) = (dir.path().join("data"), dir.path().join("s3"));
    let s3 = S3Server::start(&root);
    let base_ts = silt_log::now_ms() - 3_600_000;

    let core = start(&data, &s3);
    create_topic(&core);
    produce(&core, 0, 1500, base_ts);
    let p = wait_settled(&core, &s3, 1500);
    assert!(json_u64(&p, "local_start_offset") > 1000, "{p}");
    assert!(json_u64(&p, "archived_objects") >= 2, "{p}");
    check_replay(&core, 1500, base_ts);
    // ListOffsets by timestamp, answered from the archive and from the local tier.
    let local_start = json_u64(&p, "local_start_offset");
    for offset in [777, local_start + 3] {
        let ts = record(offset, base_ts).timestamp - 3;
        let answer = kcat(&[
            "-Q",
            "-b",
            &core.kafka.to_string(),
            "-t",
            &format!("{TOPIC}:0:{ts}"),
        ]);
        assert!(
            answer.contains(&format!("offset {offset}")),
            "timestamp {ts}: {answer}"
        );
    }

    // kill -9 while offload has work to do: produce, kill at once, and check the data
    // directory holds closed segments the manifest does not cover yet (else try again).
    let mut produced = 1500;
    let mut core = core;
    let mut attempts = 0;
    loop {
        produce(&core, produced, produced + 1000, base_ts);
        produced += 1000;
        core.kill();
        if upload_due(&data, &s3) {
            break;
        }
        attempts += 1;
        assert!(attempts < 5, "offload always caught up before the kill");
        core = start(&data, &s3);
    }

    // A core that dies by SIGKILL right after its next upload, before the manifest commit:
    // it leaves an object no manifest names.
    let (named_before, _) = manifest(&s3);
    let args = tier_args(&s3);
    let mut doomed = command(&silt_core());
    doomed
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--kafka-listen", "127.0.0.1:0"])
        .args(["--uplink-listen", "127.0.0.1:0"])
        .args(&args)
        .envs(s3.env())
        .env("SILT_TIER_FAILPOINT", "offload.after_upload")
        .env("RUST_LOG", "info");
    let mut doomed = Running::start(doomed);
    let exit = doomed.wait_exit(TIER_TIMEOUT);
    assert_eq!(
        exit.signal(),
        Some(9),
        "the core dies at the failpoint: {exit}; stderr:\n{}",
        doomed.stderr()
    );
    let (named_after, _) = manifest(&s3);
    assert_eq!(
        named_after, named_before,
        "nothing committed at the failpoint"
    );
    let orphans: Vec<String> = s3
        .keys(&format!("{PREFIX}/v1"))
        .into_iter()
        .filter(|key| !named_after.contains(key))
        .collect();
    assert!(!orphans.is_empty(), "the upload before the crash is there");

    // Restarted: everything acknowledged is there in one tier or the other, offload catches
    // up, GC removes the orphan, and kcat replays every record from offset 0.
    let core = start(&data, &s3);
    let p = wait_settled(&core, &s3, produced);
    let stored = s3.keys(&format!("{PREFIX}/v1"));
    for orphan in &orphans {
        assert!(!stored.contains(orphan), "{orphan} was collected");
    }
    assert!(json_u64(&p, "local_start_offset") > produced - 100, "{p}");
    check_replay(&core, produced, base_ts);

    // The log goes on from where it was.
    produce(&core, produced, produced + 200, base_ts);
    wait_settled(&core, &s3, produced + 200);
    check_replay(&core, produced + 200, base_ts);
    core.stop();
}
