//! End-to-end tests of `silt-edge dump`: a data directory written with silt-log, printed by the
//! real binary as JSON lines, checked byte for byte; the filters, the errors and their exit
//! codes, a node holding the directory, and a reader that stops early.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use silt_log::batch::{BatchSpec, Compression, Header, Record, encode_batch};
use silt_log::{LogConfig, LogManager};
use silt_tests::{Running, START_TIMEOUT, STOP_TIMEOUT, command, silt_edge};

const T0: i64 = 1_700_000_000_000;

fn bytes(value: &[u8]) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(value))
}

fn header(key: &str, value: Option<&[u8]>) -> Header {
    Header {
        key: key.to_string(),
        value: value.map(Bytes::copy_from_slice),
    }
}

fn record(timestamp: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> Record {
    Record {
        timestamp,
        key: key.and_then(bytes),
        value: value.and_then(bytes),
        headers: Vec::new(),
    }
}

fn append(
    log: &LogManager,
    topic: &str,
    partition: u32,
    compression: Compression,
    records: &[Record],
) {
    let spec = BatchSpec {
        compression,
        ..BatchSpec::default()
    };
    let mut batch = BytesMut::new();
    encode_batch(&spec, records, &mut batch).unwrap();
    log.partition(topic, partition)
        .unwrap()
        .append(&mut batch)
        .unwrap();
}

/// Three topics: `alpha` (one record), `sensors` (two partitions; a plain batch of three with
/// every kind of key, value and header, then a zstd batch) and `trimmed`, whose log start was
/// moved into the middle of its only batch.
fn write_fixture(data_dir: &Path) {
    let log = LogManager::open(LogConfig::new(data_dir)).unwrap();
    let no_overrides = BTreeMap::new();
    for (topic, partitions) in [("sensors", 2), ("alpha", 1), ("trimmed", 1)] {
        log.create_topic(topic, partitions, &no_overrides).unwrap();
    }
    let mut first = record(T0, Some(b"room/1"), Some(b"21.5"));
    first.headers = vec![
        header("qos", Some(b"1")),
        header("raw", Some(&[0xff, 0xfe])),
        header("qos", None),
        header("empty", Some(b"")),
    ];
    append(
        &log,
        "sensors",
        0,
        Compression::None,
        &[
            first,
            // Not UTF-8: a lone lead byte.
            record(T0 + 5, None, Some(&[0xc3, 0x28])),
            // Timestamps need not rise; empty is not null.
            record(T0 + 3, Some(b""), None),
        ],
    );
    let mut compressed = record(T0 + 10, Some(&[0x80]), Some(b"compressed"));
    compressed.headers = vec![header("content-type", Some(b"text/plain"))];
    append(&log, "sensors", 0, Compression::Zstd, &[compressed]);
    append(
        &log,
        "sensors",
        1,
        Compression::None,
        &[record(
            T0 + 1,
            Some("é".as_bytes()),
            Some("🌡 \"hot\"\n".as_bytes()),
        )],
    );
    append(
        &log,
        "alpha",
        0,
        Compression::None,
        &[record(T0 - 1000, Some(b"a"), Some(b"b"))],
    );
    append(
        &log,
        "trimmed",
        0,
        Compression::None,
        &[
            record(T0, None, Some(b"gone")),
            record(T0, None, Some(b"gone")),
            record(T0, None, Some(b"kept")),
        ],
    );
    log.partition("trimmed", 0)
        .unwrap()
        .delete_before(2)
        .unwrap();
    log.close().unwrap();
}

const ALPHA: &[&str] = &[
    r#"{"topic":"alpha","partition":0,"offset":0,"timestamp":1699999999000,"key":"a","value":"b","headers":[]}"#,
];
const SENSORS_0: &[&str] = &[
    r#"{"topic":"sensors","partition":0,"offset":0,"timestamp":1700000000000,"key":"room/1","value":"21.5","headers":[["qos","1"],["raw",{"base64":"//4="}],["qos",null],["empty",""]]}"#,
    r#"{"topic":"sensors","partition":0,"offset":1,"timestamp":1700000000005,"key":null,"value":{"base64":"wyg="},"headers":[]}"#,
    r#"{"topic":"sensors","partition":0,"offset":2,"timestamp":1700000000003,"key":"","value":null,"headers":[]}"#,
    r#"{"topic":"sensors","partition":0,"offset":3,"timestamp":1700000000010,"key":{"base64":"gA=="},"value":"compressed","headers":[["content-type","text/plain"]]}"#,
];
const SENSORS_1: &[&str] = &[
    r#"{"topic":"sensors","partition":1,"offset":0,"timestamp":1700000000001,"key":"é","value":"🌡 \"hot\"\n","headers":[]}"#,
];
const TRIMMED: &[&str] = &[
    r#"{"topic":"trimmed","partition":0,"offset":2,"timestamp":1700000000000,"key":null,"value":"kept","headers":[]}"#,
];

/// `silt-edge dump --data-dir DIR`, logging at its default level whatever the test's
/// environment says, so stderr holds only what a user would see.
fn dump_command(data_dir: &Path) -> Command {
    let mut dump = command(&silt_edge());
    dump.args(["dump", "--data-dir", data_dir.to_str().unwrap()])
        .env_remove("RUST_LOG");
    dump
}

fn dump(data_dir: &Path, extra: &[&str]) -> Output {
    dump_command(data_dir)
        .args(extra)
        .output()
        .expect("cannot run silt-edge dump")
}

fn lines(output: &Output) -> Vec<String> {
    String::from_utf8(output.stdout.clone())
        .expect("dump prints UTF-8")
        .lines()
        .map(str::to_string)
        .collect()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn expected(parts: &[&[&str]]) -> Vec<String> {
    parts
        .iter()
        .flat_map(|part| part.iter())
        .map(|line| line.to_string())
        .collect()
}

#[test]
fn dump_prints_every_record_exactly_and_leaves_the_directory_clean() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());

    let output = dump(dir.path(), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stderr(&output), "");
    assert_eq!(
        lines(&output),
        expected(&[ALPHA, SENSORS_0, SENSORS_1, TRIMMED])
    );
    assert!(output.stdout.ends_with(b"}\n"));
    assert!(
        dir.path().join(".clean_shutdown").exists(),
        "dump closes the directory cleanly"
    );

    // A second dump of the same directory prints the same bytes.
    let again = dump(dir.path(), &[]);
    assert_eq!(again.stdout, output.stdout);
}

#[test]
fn topic_and_partition_filters() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());

    let sensors = dump(dir.path(), &["--topic", "sensors"]);
    assert!(sensors.status.success(), "{}", stderr(&sensors));
    assert_eq!(lines(&sensors), expected(&[SENSORS_0, SENSORS_1]));

    let one = dump(dir.path(), &["--topic", "sensors", "--partition", "1"]);
    assert!(one.status.success(), "{}", stderr(&one));
    assert_eq!(lines(&one), expected(&[SENSORS_1]));

    let no_topic = dump(dir.path(), &["--partition", "1"]);
    assert_eq!(no_topic.status.code(), Some(2), "{}", stderr(&no_topic));
    assert!(
        stderr(&no_topic).contains("--topic"),
        "{}",
        stderr(&no_topic)
    );
    assert!(no_topic.stdout.is_empty());
}

#[test]
fn unknown_topic_or_partition_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());

    let topic = dump(dir.path(), &["--topic", "nope"]);
    assert_eq!(topic.status.code(), Some(2), "{}", stderr(&topic));
    assert_eq!(
        stderr(&topic),
        "silt-edge dump: unknown topic \"nope\"; the data directory has topics alpha, \
         sensors, trimmed\n"
    );
    assert!(topic.stdout.is_empty());

    let partition = dump(dir.path(), &["--topic", "sensors", "--partition", "2"]);
    assert_eq!(partition.status.code(), Some(2), "{}", stderr(&partition));
    assert_eq!(
        stderr(&partition),
        "silt-edge dump: unknown partition 2 of topic \"sensors\", which has partitions 0 to 1\n"
    );
    assert!(dir.path().join(".clean_shutdown").exists());
}

#[test]
fn a_missing_data_directory_exits_1_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let output = dump(&missing, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("is not a silt data directory"),
        "{}",
        stderr(&output)
    );
    assert!(!missing.exists());
}

/// After a crash (no clean close) dump recovers the directory as the node would, prints what
/// was durable, and leaves it clean.
#[test]
fn dump_recovers_a_directory_left_by_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(LogConfig::new(dir.path())).unwrap();
    log.create_topic("alpha", 1, &BTreeMap::new()).unwrap();
    append(
        &log,
        "alpha",
        0,
        Compression::None,
        &[record(T0 - 1000, Some(b"a"), Some(b"b"))],
    );
    drop(log);
    assert!(!dir.path().join(".clean_shutdown").exists());

    let output = dump(dir.path(), &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(lines(&output), expected(&[ALPHA]));
    assert!(dir.path().join(".clean_shutdown").exists());
}

#[test]
fn dump_refuses_a_directory_a_running_node_holds() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let mut edge = command(&silt_edge());
    edge.args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info");
    let mut edge = Running::start(edge);
    edge.wait_for_stderr("silt-edge started", START_TIMEOUT);

    let refused = dump(dir.path(), &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("is in use by a running node; stop the node first"),
        "{}",
        stderr(&refused)
    );
    assert!(refused.stdout.is_empty());

    edge.stop_cleanly();
    let after = dump(dir.path(), &[]);
    assert!(after.status.success(), "{}", stderr(&after));
    assert_eq!(
        lines(&after),
        expected(&[ALPHA, SENSORS_0, SENSORS_1, TRIMMED])
    );
}

/// A reader that stops early (`| head -1`) ends the dump quietly: exit 0, no panic message,
/// and the directory still closed cleanly.
#[test]
fn a_reader_that_stops_early_ends_the_dump_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(LogConfig::new(dir.path())).unwrap();
    log.create_topic("many", 1, &BTreeMap::new()).unwrap();
    // Far more than the pipe and dump's own buffer hold, so dump is still writing when the
    // reader goes away.
    let value = vec![b'x'; 1000];
    for batch in 0..100 {
        let records: Vec<Record> = (0..100)
            .map(|index| record(T0 + batch * 100 + index, None, Some(&value)))
            .collect();
        append(&log, "many", 0, Compression::None, &records);
    }
    log.close().unwrap();
    drop(log);

    let mut child = dump_command(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(
        first.starts_with(r#"{"topic":"many","partition":0,"offset":0,"timestamp":1700000000000,"#),
        "{first}"
    );
    drop(stdout);
    let deadline = Instant::now() + STOP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dump did not exit within {STOP_TIMEOUT:?} after its reader went away");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut errors = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut errors)
        .unwrap();
    assert!(status.success(), "exit {status}: {errors}");
    assert_eq!(errors, "");
    assert!(dir.path().join(".clean_shutdown").exists());
}
