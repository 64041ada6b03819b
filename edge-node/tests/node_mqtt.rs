//! The `silt-edge` binary with the MQTT broker configured: its listener in the started line,
//! the broker's state directory beside the data directory, a clean stop, a bind failure that
//! names the key, and retention at the configured interval.
//!
//! These start the real binary; the MQTT protocol itself is tested with real clients in
//! silt-tests.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use silt_log::batch::{BatchSpec, Record, encode_batch};
use silt_log::{LogConfig, LogManager};
use silt_tests::{Running, START_TIMEOUT, command};

fn silt_edge() -> Command {
    command(Path::new(env!("CARGO_BIN_EXE_silt-edge")))
}

fn start(data_dir: &Path, extra: &[&str]) -> (Running, String) {
    let mut edge = silt_edge();
    edge.args(["--data-dir", data_dir.to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info");
    let mut edge = Running::start(edge);
    let started = edge.wait_for_stderr("silt-edge started", START_TIMEOUT);
    (edge, started)
}

/// The address in the `name=IP:PORT` field of the started line, if there is one.
fn field(started: &str, name: &str) -> Option<SocketAddr> {
    let prefix = format!("{name}=");
    started
        .split_whitespace()
        .find_map(|field| field.strip_prefix(prefix.as_str()))
        .map(|addr| addr.parse().unwrap())
}

fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.with_file_name("data.mqtt")
}

#[test]
fn the_mqtt_listener_is_bound_and_announced_and_the_node_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (mut edge, started) = start(&data_dir, &["--mqtt-listen", "127.0.0.1:0"]);
    let mqtt = field(&started, "mqtt").unwrap_or_else(|| panic!("no mqtt= in {started}"));
    assert!(mqtt.ip().is_loopback() && mqtt.port() != 0, "{started}");
    assert_eq!(field(&started, "mqtt_tls"), None, "{started}");
    TcpStream::connect_timeout(&mqtt, Duration::from_secs(5)).expect("the listener accepts");
    assert!(
        edge.stderr().contains("every CONNECT will be refused"),
        "no users and no anonymous access is worth a warning:\n{}",
        edge.stderr()
    );
    assert!(
        state_dir(&data_dir).is_dir(),
        "the broker's state lives beside the log"
    );

    edge.stop_cleanly();
    assert!(data_dir.join(".clean_shutdown").exists());
    let entries: Vec<_> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        entries.iter().all(|name| !name.contains("mqtt")),
        "nothing of the broker's inside the log's directory: {entries:?}"
    );
}

#[test]
fn without_a_listener_there_is_no_broker() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (mut edge, started) = start(&data_dir, &[]);
    assert_eq!(field(&started, "mqtt"), None, "{started}");
    assert!(!state_dir(&data_dir).exists());
    edge.stop_cleanly();
}

#[test]
fn a_taken_mqtt_port_fails_the_start_naming_the_key_and_closes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = silt_edge()
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0", "--mqtt-listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on mqtt.listen (--mqtt-listen) {addr}"
        )),
        "{stderr}"
    );
    assert!(data_dir.join(".clean_shutdown").exists(), "{stderr}");
}

/// With `log.retention_check_ms` at 200 ms, a segment that `segment.ms` rolls a second after
/// the start is deleted within seconds, not at the next 30-second pass.
#[test]
fn retention_runs_at_the_configured_interval() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    {
        let log = LogManager::open(LogConfig::new(&data_dir)).unwrap();
        log.create_topic("old", 1, &BTreeMap::new()).unwrap();
        let record = Record {
            timestamp: 1_600_000_000_000,
            value: Some("2020".into()),
            ..Record::default()
        };
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &[record], &mut batch).unwrap();
        log.partition("old", 0).unwrap().append(&mut batch).unwrap();
        log.close().unwrap();
    }
    let (mut edge, _) = start(
        &data_dir,
        &[
            "--set",
            "log.retention_check_ms=200",
            "--set",
            "topic_defaults.segment.ms=1000",
            "--set",
            "topic_defaults.retention.ms=60000",
        ],
    );
    edge.wait_for_stderr("retention deleted segments", Duration::from_secs(10));
    edge.stop_cleanly();
}
