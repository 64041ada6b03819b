//! End-to-end tests of the core's offload to a `file://` object store: the real `silt-core`
//! and `silt` binaries, real files, kill -9. Closed segments become Parquet objects named by
//! the partition's manifest; local segments go only once archived; a store that fails keeps
//! everything local, counts the failures, turns backpressure on near the budget, and recovers
//! by itself.

use std::path::Path;
use std::time::{Duration, Instant};

use silt_tests::cli::{json_lines, run_silt, silt_ok};
use silt_tests::core::{Core, json_u64};
use silt_tests::kafka::{RawKafka, value_batch};

const KAFKA_STORAGE_ERROR: i16 = 56;

/// How long offload may take to catch up on a loaded 2-core machine.
const TIER_TIMEOUT: Duration = Duration::from_secs(60);

/// Small segments, offload as soon as a segment closes, retries and retention checks every
/// 100 ms, and local retention that deletes whatever is archived.
fn tier_args(objects: &Path) -> Vec<String> {
    [
        "--object-store".to_string(),
        format!("file://{}", objects.display()),
    ]
    .into_iter()
    .chain(
        [
            "topic_defaults.segment.bytes=2048",
            "topic_defaults.local.retention.ms=0",
            "tiering.max_wait_ms=0",
            "tiering.check_interval_ms=100",
            "tiering.retry_initial_ms=100",
            "tiering.retry_max_ms=400",
            "log.retention_check_ms=100",
        ]
        .iter()
        .flat_map(|set| ["--set".to_string(), set.to_string()]),
    )
    .collect()
}

fn start(data: &Path, objects: &Path, extra: &[&str]) -> Core {
    let mut args = tier_args(objects);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Core::start(data, &args)
}

fn value(index: u64) -> String {
    format!(
        "{{\"device\":\"sensor-{:04}\",\"seq\":{index},\"temp\":21.37}}",
        index % 100
    )
}

/// Produces records `from..to` in batches of 50 (so segments of 2 KiB roll often).
fn produce(core: &Core, topic: &str, from: u64, to: u64) {
    let bootstrap = core.kafka.to_string();
    let mut next = from;
    while next < to {
        let end = (next + 50).min(to);
        let lines: String = (next..end).map(|index| value(index) + "\n").collect();
        silt_ok(
            &["produce", "--bootstrap", &bootstrap, "--topic", topic],
            lines.as_bytes(),
        );
        next = end;
    }
}

fn status(core: &Core, topic: &str) -> serde_json::Value {
    core.tier_status(topic)
}

fn partition0(status: &serde_json::Value) -> &serde_json::Value {
    &status["partitions"][0]
}

/// Waits until `done` holds for partition 0's status, returning that status.
fn wait_status(
    core: &Core,
    topic: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + TIER_TIMEOUT;
    loop {
        let status = status(core, topic);
        if done(partition0(&status)) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {TIER_TIMEOUT:?}; last status {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A metric's value for `topic` partition 0, or unlabelled when `topic` is empty; 0 when absent.
fn metric(core: &Core, name: &str, topic: &str) -> f64 {
    let text = core.metrics();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(name))
        .filter(|rest| {
            if topic.is_empty() {
                rest.starts_with(' ')
            } else {
                rest.starts_with('{')
                    && rest.contains(&format!("topic=\"{topic}\""))
                    && rest.contains("partition=\"0\"")
            }
        })
        .find_map(|rest| rest.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The manifest's objects cover `0..next` contiguously, and every file it names exists with
/// the size it records. Returns `next`.
fn check_manifest(objects: &Path, topic: &str) -> u64 {
    let path = objects.join(format!("_manifests/v1/topic={topic}/partition=0.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut next = 0;
    for object in manifest["objects"].as_array().expect("objects") {
        assert_eq!(json_u64(object, "base_offset"), next, "a gap: {manifest}");
        next = json_u64(object, "last_offset") + 1;
        let key = object["key"].as_str().unwrap();
        assert!(
            key.starts_with(&format!("v1/topic={topic}/partition=0/date="))
                && key.ends_with(".parquet"),
            "{key}"
        );
        let size = std::fs::metadata(objects.join(key))
            .unwrap_or_else(|error| panic!("{key}: {error}"))
            .len();
        assert_eq!(size, json_u64(object, "size_bytes"), "{key}");
    }
    next
}

/// Consumes partition 0 from `from` to `to` and checks every value.
fn check_local(core: &Core, topic: &str, from: u64, to: u64) {
    let bootstrap = core.kafka.to_string();
    let (from_text, count) = (from.to_string(), (to - from).to_string());
    let out = silt_ok(
        &[
            "consume",
            "--bootstrap",
            &bootstrap,
            "--topic",
            topic,
            "--partition",
            "0",
            "--offset",
            &from_text,
            "--max-messages",
            &count,
            "--timeout-ms",
            "20000",
        ],
        b"",
    );
    let records = json_lines(&out);
    assert_eq!(records.len() as u64, to - from);
    for (index, record) in (from..).zip(&records) {
        assert_eq!(record["offset"].as_u64(), Some(index));
        assert_eq!(record["value"].as_str(), Some(value(index).as_str()));
    }
}

fn create_topic(core: &Core, topic: &str) {
    let bootstrap = core.kafka.to_string();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            &bootstrap,
            "--topic",
            topic,
            "--partitions",
            "1",
        ],
        b"",
    );
}

#[test]
fn closed_segments_reach_the_archive_local_ones_go_and_kill_9_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, objects) = (dir.path().join("data"), dir.path().join("objects"));
    let core = start(&data, &objects, &[]);
    create_topic(&core, "readings");
    produce(&core, "readings", 0, 1000);

    let status = wait_status(&core, "readings", "objects and a moved local start", |p| {
        p["archived_objects"].as_u64() > Some(0) && p["local_start_offset"].as_u64() > Some(0)
    });
    let p = partition0(&status);
    assert_eq!(
        json_u64(p, "log_start_offset"),
        0,
        "the log start stays: {p}"
    );
    assert_eq!(json_u64(p, "high_watermark"), 1000);
    assert!(p["last_error"].is_null(), "{p}");
    let archived = check_manifest(&objects, "readings");
    assert!(
        json_u64(p, "local_start_offset") <= archived,
        "nothing deleted locally before it is archived: {p}, archive ends at {archived}"
    );
    assert!(metric(&core, "silt_tier_uploads_total", "readings") >= 1.0);
    assert!(metric(&core, "silt_tier_archived_objects", "readings") >= 1.0);
    let lag = metric(&core, "silt_tier_upload_lag_records", "readings");
    assert!(lag < 1000.0, "lag {lag}");

    // The table names every column.
    let admin = core.admin.to_string();
    let table = silt_ok(
        &["tier", "status", "--admin", &admin, "--topic", "readings"],
        b"",
    );
    assert!(
        table.contains("LOCAL START") && table.contains("LAG RECORDS"),
        "{table}"
    );

    // kill -9 while more is being offloaded, then restart: everything is in one tier or the other.
    produce(&core, "readings", 1000, 2000);
    core.kill();
    let core = start(&data, &objects, &[]);
    produce(&core, "readings", 2000, 2500);
    let status = wait_status(
        &core,
        "readings",
        "offload catching up after kill -9",
        |p| {
            // The consume below starts at the local start while local retention may still
            // move it, so it can read across the tier boundary.
            p["upload_lag_records"].as_u64() < Some(200)
                && p["archived_next_offset"].as_u64() > Some(2000)
        },
    );
    let p = partition0(&status);
    let archived = check_manifest(&objects, "readings");
    let local_start = json_u64(p, "local_start_offset");
    assert!(local_start <= archived, "{p}");
    assert_eq!(json_u64(p, "high_watermark"), 2500);
    check_local(&core, "readings", local_start, 2500);
    core.stop();
}

/// `memory://` is one store per node, shared by offload and the cold reader: records offloaded
/// and deleted locally are read back from it (two opens of the URL would be two empty stores).
#[test]
fn a_memory_store_serves_what_was_offloaded_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = tier_args(dir.path());
    args[1] = "memory://".to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let core = Core::start(&data, &args);
    create_topic(&core, "readings");
    produce(&core, "readings", 0, 600);
    let status = wait_status(&core, "readings", "offload and local deletion", |p| {
        p["archived_objects"].as_u64() > Some(0) && p["local_start_offset"].as_u64() > Some(100)
    });
    let p = partition0(&status);
    assert_eq!(json_u64(p, "log_start_offset"), 0, "{p}");
    assert!(p["last_error"].is_null(), "{p}");
    assert_eq!(status["store"].as_str(), Some("memory://"), "{status}");
    // From offset 0: the archived records come from the memory store, the rest from disk.
    check_local(&core, "readings", 0, 600);
    core.stop();
}

#[test]
fn a_failing_store_keeps_data_local_counts_failures_pushes_back_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (data, objects) = (dir.path().join("data"), dir.path().join("objects"));
    std::fs::create_dir_all(&objects).unwrap();
    // Files where the archive's directories go: every manifest read and upload fails.
    std::fs::write(objects.join("v1"), b"in the way").unwrap();
    std::fs::write(objects.join("_manifests"), b"in the way").unwrap();
    let core = start(
        &data,
        &objects,
        &[
            "--set",
            "log.budget_bytes=32KiB",
            "--set",
            "log.budget_policy=reject",
        ],
    );
    create_topic(&core, "readings");

    // Fill the data directory towards its budget: backpressure turns on before it is full.
    let mut produced = 0;
    while metric(&core, "silt_tier_backpressure", "") < 1.0 {
        // About 1.2 KiB a round: several rounds fit between 90% of the budget and all of it.
        assert!(produced < 1000, "no backpressure after {produced} records");
        produce(&core, "readings", produced, produced + 20);
        produced += 20;
    }
    let status = status(&core, "readings");
    assert_eq!(status["backpressure"], true, "{status}");
    // A Produce now gets KAFKA_STORAGE_ERROR, which clients retry, and stores nothing.
    let mut kafka = RawKafka::connect(core.kafka);
    let (error, _) = kafka.produce("readings", &value_batch(None, &["refused"]));
    assert_eq!(error, KAFKA_STORAGE_ERROR, "a produce under backpressure");
    let p = partition0(&status);
    assert_eq!(json_u64(p, "local_start_offset"), 0, "nothing deleted: {p}");
    assert!(p["last_error"].is_string(), "{p}");
    assert!(metric(&core, "silt_tier_upload_failures_total", "readings") >= 1.0);

    // The store comes back: offload catches up, local retention frees space, backpressure ends.
    std::fs::remove_file(objects.join("v1")).unwrap();
    std::fs::remove_file(objects.join("_manifests")).unwrap();
    let status = wait_status(&core, "readings", "recovery", |p| {
        p["local_start_offset"].as_u64() > Some(0) && p["last_error"].is_null()
    });
    let deadline = Instant::now() + TIER_TIMEOUT;
    while metric(&core, "silt_tier_backpressure", "") > 0.0 {
        assert!(Instant::now() < deadline, "backpressure stays on: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let archived = check_manifest(&objects, "readings");
    let local_start = json_u64(partition0(&status), "local_start_offset");
    assert!(local_start <= archived);
    check_local(&core, "readings", local_start, produced);
    core.stop();
}

#[test]
fn status_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let core = start(&dir.path().join("data"), &objects, &[]);
    let admin = core.admin.to_string();
    let out = run_silt(
        &["tier", "status", "--admin", &admin, "--topic", "nope"],
        b"",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown topic \"nope\""), "{stderr}");
    core.stop();

    let plain = Core::start(&dir.path().join("plain"), &[]);
    let admin = plain.admin.to_string();
    let out = run_silt(&["tier", "status", "--admin", &admin, "--topic", "x"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tiering is off"), "{stderr}");
    plain.stop();
}
