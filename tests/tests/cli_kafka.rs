//! The `silt` CLI against a real `silt-core`: topics, produce, consume (alone, by offset, by
//! time, as a group), groups and offset resets, and its errors.

use std::collections::BTreeMap;

use serde_json::Value;
use silt_tests::cli::{json_lines, run_silt, silt_ok};
use silt_tests::core::Core;

fn bootstrap(core: &Core) -> String {
    core.kafka.to_string()
}

/// Consumes `topic` from the beginning until `count` records have printed.
fn consume_all(bootstrap: &str, topic: &str, count: usize, extra: &[&str]) -> Vec<Value> {
    let max = count.to_string();
    let mut args = vec![
        "consume",
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--max-messages",
        &max,
        "--timeout-ms",
        "20000",
    ];
    args.extend_from_slice(extra);
    json_lines(&silt_ok(&args, b""))
}

#[test]
fn topics_are_created_listed_described_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(dir.path(), &[]);
    let bootstrap = bootstrap(&core);
    let b = bootstrap.as_str();

    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            b,
            "--topic",
            "readings",
            "--partitions",
            "3",
            "--config",
            "retention.ms=3600000",
        ],
        b"",
    );
    let listed = silt_ok(&["topic", "list", "--bootstrap", b], b"");
    assert!(listed.lines().any(|line| line == "readings"), "{listed}");

    let described = silt_ok(
        &["topic", "describe", "--bootstrap", b, "--topic", "readings"],
        b"",
    );
    assert!(described.contains("PartitionCount: 3"), "{described}");
    assert!(described.contains("retention.ms=3600000"), "{described}");
    assert_eq!(described.matches("\tPartition: ").count(), 3, "{described}");

    // Creating it again is an error that says why.
    let again = run_silt(
        &["topic", "create", "--bootstrap", b, "--topic", "readings"],
        b"",
    );
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.to_lowercase().contains("exists"), "{stderr}");

    silt_ok(
        &["topic", "delete", "--bootstrap", b, "--topic", "readings"],
        b"",
    );
    let listed = silt_ok(&["topic", "list", "--bootstrap", b], b"");
    assert!(!listed.lines().any(|line| line == "readings"), "{listed}");
    core.stop();
}

#[test]
fn produced_lines_come_back_in_order_per_key_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(dir.path(), &[]);
    let bootstrap = bootstrap(&core);
    let b = bootstrap.as_str();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            b,
            "--topic",
            "keyed",
            "--partitions",
            "4",
        ],
        b"",
    );

    let mut input = String::new();
    for i in 0..300 {
        input.push_str(&format!("sensor-{}\treading {i}\n", i % 7));
    }
    silt_ok(
        &["produce", "--bootstrap", b, "--topic", "keyed", "--keyed"],
        input.as_bytes(),
    );

    let records = consume_all(b, "keyed", 300, &["--from-beginning"]);
    assert_eq!(records.len(), 300);
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut partition_of_key: BTreeMap<String, u64> = BTreeMap::new();
    for record in &records {
        assert_eq!(record["topic"], "keyed");
        let key = record["key"].as_str().unwrap().to_string();
        let value = record["value"].as_str().unwrap();
        let i: u64 = value.strip_prefix("reading ").unwrap().parse().unwrap();
        assert_eq!(key, format!("sensor-{}", i % 7));
        let partition = record["partition"].as_u64().unwrap();
        assert_eq!(
            *partition_of_key.entry(key.clone()).or_insert(partition),
            partition,
            "one key, one partition"
        );
        per_key.entry(key).or_default().push(i);
        assert!(record["timestamp"].as_i64().unwrap() > 0);
        assert_eq!(record["headers"], Value::Array(vec![]));
    }
    for (key, values) in &per_key {
        assert!(
            values.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {values:?}"
        );
    }
    // Keys spread over more than one partition.
    assert!(
        partition_of_key
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
    );

    // One partition, from an offset.
    let partition = partition_of_key["sensor-0"].to_string();
    let from_two = consume_all(b, "keyed", 1, &["--partition", &partition, "--offset", "2"]);
    assert_eq!(from_two[0]["offset"], 2);
    assert_eq!(from_two[0]["partition"].to_string(), partition);
    core.stop();
}

#[test]
fn consume_starts_at_a_time_and_stops_on_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(dir.path(), &[]);
    let bootstrap = bootstrap(&core);
    let b = bootstrap.as_str();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            b,
            "--topic",
            "timed",
            "--partitions",
            "1",
        ],
        b"",
    );
    silt_ok(
        &["produce", "--bootstrap", b, "--topic", "timed"],
        b"old-1\nold-2\n",
    );
    let first = consume_all(b, "timed", 2, &["--from-beginning"]);
    let boundary_ms = first[1]["timestamp"].as_i64().unwrap() + 1;
    // The next records must carry a later millisecond than the boundary.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while (silt_log::now_ms()) <= boundary_ms {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    silt_ok(
        &["produce", "--bootstrap", b, "--topic", "timed"],
        b"new-1\nnew-2\n",
    );
    let boundary = rfc3339(boundary_ms);

    let output = silt_ok(
        &[
            "consume",
            "--bootstrap",
            b,
            "--topic",
            "timed",
            "--from-time",
            &boundary,
            "--timeout-ms",
            "1500",
        ],
        b"",
    );
    let values: Vec<String> = json_lines(&output)
        .iter()
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(values, ["new-1", "new-2"]);

    let bad = run_silt(
        &[
            "consume",
            "--bootstrap",
            b,
            "--topic",
            "timed",
            "--from-time",
            "yesterday",
        ],
        b"",
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
    core.stop();
}

#[test]
fn a_group_resumes_where_it_committed_and_offsets_can_be_reset() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(dir.path(), &[]);
    let bootstrap = bootstrap(&core);
    let b = bootstrap.as_str();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            b,
            "--topic",
            "jobs",
            "--partitions",
            "2",
        ],
        b"",
    );
    let input: String = (0..40).map(|i| format!("k{i}\tjob {i}\n")).collect();
    silt_ok(
        &["produce", "--bootstrap", b, "--topic", "jobs", "--keyed"],
        input.as_bytes(),
    );

    let first = consume_all(b, "jobs", 25, &["--group", "workers", "--from-beginning"]);
    assert_eq!(first.len(), 25);
    let second = consume_all(b, "jobs", 15, &["--group", "workers", "--from-beginning"]);
    assert_eq!(second.len(), 15);
    let mut seen: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen.len(),
        40,
        "every record exactly once across the two runs"
    );

    let listed = silt_ok(&["group", "list", "--bootstrap", b], b"");
    assert!(
        listed.lines().any(|line| line.starts_with("workers")),
        "{listed}"
    );
    let described = silt_ok(
        &["group", "describe", "--bootstrap", b, "--group", "workers"],
        b"",
    );
    let lags: Vec<&str> = described
        .lines()
        .filter(|line| line.starts_with("jobs\t"))
        .map(|line| line.split('\t').nth(4).unwrap())
        .collect();
    assert_eq!(lags, ["0", "0"], "{described}");

    // A dry run changes nothing; --execute moves the group back to the start.
    silt_ok(
        &[
            "group",
            "reset-offsets",
            "--bootstrap",
            b,
            "--group",
            "workers",
            "--topic",
            "jobs",
            "--to-earliest",
        ],
        b"",
    );
    let output = silt_ok(
        &[
            "consume",
            "--bootstrap",
            b,
            "--topic",
            "jobs",
            "--group",
            "workers",
            "--timeout-ms",
            "1500",
        ],
        b"",
    );
    assert!(output.is_empty(), "nothing new after a dry run: {output}");
    silt_ok(
        &[
            "group",
            "reset-offsets",
            "--bootstrap",
            b,
            "--group",
            "workers",
            "--topic",
            "jobs",
            "--to-earliest",
            "--execute",
        ],
        b"",
    );
    let replayed = consume_all(b, "jobs", 40, &["--group", "workers"]);
    assert_eq!(replayed.len(), 40);
    core.stop();
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(dir.path(), &[]);
    let bootstrap = bootstrap(&core);
    let b = bootstrap.as_str();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            b,
            "--topic",
            "strict",
            "--partitions",
            "1",
        ],
        b"",
    );

    // A keyed line without a TAB stops the producer, and says which line; earlier lines stay.
    let output = run_silt(
        &["produce", "--bootstrap", b, "--topic", "strict", "--keyed"],
        b"a\t1\nno tab here\nb\t2\n",
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
    let records = consume_all(b, "strict", 1, &["--from-beginning"]);
    assert_eq!(records[0]["key"], "a");

    let missing = run_silt(
        &[
            "consume",
            "--bootstrap",
            b,
            "--topic",
            "no-such-topic",
            "--timeout-ms",
            "500",
        ],
        b"",
    );
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("no-such-topic"), "{stderr}");

    let out_of_range = run_silt(
        &[
            "consume",
            "--bootstrap",
            b,
            "--topic",
            "strict",
            "--partition",
            "0",
            "--offset",
            "99",
        ],
        b"",
    );
    assert!(!out_of_range.status.success());
    let stderr = String::from_utf8_lossy(&out_of_range.stderr);
    assert!(
        stderr.contains("OFFSET_OUT_OF_RANGE") || stderr.contains("out of range"),
        "{stderr}"
    );

    let no_partition = run_silt(
        &[
            "consume",
            "--bootstrap",
            b,
            "--topic",
            "strict",
            "--partition",
            "5",
        ],
        b"",
    );
    assert!(!no_partition.status.success());

    core.stop();
    // Nobody listening: an error, not a hang.
    let refused = run_silt(
        &[
            "topic",
            "list",
            "--bootstrap",
            b,
            "--request-timeout-ms",
            "2000",
        ],
        b"",
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot connect"));
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(ms: i64) -> String {
    let seconds = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[test]
fn kcat_reads_what_silt_produces_and_silt_reads_what_kcat_produces() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(dir.path(), &[]);
    let bootstrap = bootstrap(&core);
    let b = bootstrap.as_str();
    silt_ok(
        &[
            "topic",
            "create",
            "--bootstrap",
            b,
            "--topic",
            "shared",
            "--partitions",
            "1",
        ],
        b"",
    );
    silt_ok(
        &[
            "produce",
            "--bootstrap",
            b,
            "--topic",
            "shared",
            "--key",
            "from-silt",
        ],
        b"one\ntwo\n",
    );

    let kcat = |args: &[&str], stdin: &[u8]| {
        use std::io::Write as _;
        let mut child = std::process::Command::new("kcat")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kcat is installed (scripts/test installs it)");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "kcat {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let read = kcat(
        &[
            "-b",
            b,
            "-C",
            "-t",
            "shared",
            "-o",
            "beginning",
            "-e",
            "-f",
            "%k=%s\n",
        ],
        b"",
    );
    assert_eq!(read, "from-silt=one\nfrom-silt=two\n");

    kcat(
        &["-b", b, "-P", "-t", "shared", "-K", ":"],
        b"from-kcat:three\n",
    );
    let records = consume_all(b, "shared", 3, &["--from-beginning"]);
    assert_eq!(records[2]["key"], "from-kcat");
    assert_eq!(records[2]["value"], "three");
    assert_eq!(records[2]["offset"], 2);
    core.stop();
}

#[test]
fn megabytes_of_stdin_are_sent_in_batches_the_broker_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let core = Core::start(&dir.path().join("data"), &[]);
    let bootstrap = bootstrap(&core);
    // 5,000 lines of 500 bytes: 2.5 MB, more than the broker's 1 MiB batch limit, in one pipe.
    let lines: String = (0..5000)
        .map(|index| format!("{index:05}{}\n", "x".repeat(495)))
        .collect();
    let out = run_silt(
        &["produce", "--bootstrap", &bootstrap, "--topic", "bulk"],
        lines.as_bytes(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("produced 5000 record(s)"), "{stderr}");
    let records = consume_all(&bootstrap, "bulk", 5000, &["--from-beginning"]);
    assert_eq!(records.len(), 5000);
    core.stop();
}
