//! MQTT test helpers: the broker under test, a rumqttc client with one API for both protocol
//! versions, raw packets for bad-input tests, and `silt-edge dump` parsed into records.
//!
//! # Layout
//! - [`MqttBroker`]: starts `silt-edge` (or, to check the tests themselves, Mosquitto) on a
//!   data directory, and stops, restarts or kills it.
//! - [`client`]: [`Client`], rumqttc's 3.1.1 and 5.0 clients behind one event stream.
//! - [`raw`]: hand-built packets and a raw TCP connection that reads packets and closes.
//! - [`dump`]: runs `silt-edge dump` and parses its JSON lines.
//!
//! # Which broker
//! Tests run against `silt-edge` unless `SILT_TEST_MQTT_BROKER=mosquitto` is set, in which case
//! [`MqttBroker::start`] runs `/usr/sbin/mosquitto` instead. That mode exists to prove the
//! protocol tests right against an independent broker; tests of what only Silt has (the log,
//! restarts after kill -9, the disk budget, metrics) use [`MqttBroker::start_silt`], which
//! always starts `silt-edge`, and skip themselves in Mosquitto mode with
//! [`skip_unless_silt`].

pub mod client;
pub mod dump;
pub mod raw;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use client::{Client, ClientOptions, ConnAckInfo, Event, Message, PublishProps, Version, Will};

use crate::{Running, START_TIMEOUT, Signal, command, edge_admin_addr, silt_edge};

/// The env var that picks the broker under test: unset or `silt-edge`, or `mosquitto`.
pub const BROKER_ENV: &str = "SILT_TEST_MQTT_BROKER";
/// Where Debian's `mosquitto` package installs the broker.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// How long a test waits for a message or an acknowledgement that should come at once; generous
/// for a loaded machine, and only ever reached when something is broken.
pub const MQTT_TIMEOUT: Duration = Duration::from_secs(10);

/// The broker implementation a test talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    SiltEdge,
    Mosquitto,
}

impl BrokerKind {
    /// The kind [`BROKER_ENV`] asks for.
    ///
    /// # Panics
    /// If the variable names an unknown broker, so a typo does not silently test silt-edge.
    pub fn from_env() -> BrokerKind {
        match std::env::var(BROKER_ENV).as_deref() {
            Err(_) | Ok("") | Ok("silt-edge") => BrokerKind::SiltEdge,
            Ok("mosquitto") => BrokerKind::Mosquitto,
            Ok(other) => panic!("{BROKER_ENV}={other:?}: expected silt-edge or mosquitto"),
        }
    }
}

/// True when the test should go on: the broker under test is silt-edge. In Mosquitto mode it
/// prints why the test `name` does nothing, and returns false.
pub fn skip_unless_silt(name: &str) -> bool {
    if BrokerKind::from_env() == BrokerKind::SiltEdge {
        return true;
    }
    eprintln!("{name}: checks what only silt-edge has; skipped with {BROKER_ENV}=mosquitto");
    false
}

/// A broker under test, started on a data directory that outlives restarts.
#[derive(Debug)]
pub struct MqttBroker {
    pub kind: BrokerKind,
    /// Where clients connect; changes on every (re)start, as each binds a fresh port.
    pub mqtt: SocketAddr,
    /// The admin port (silt-edge only).
    pub admin: Option<SocketAddr>,
    /// The `silt-edge started` line (silt-edge only), with `clean=` and recovery fields.
    pub started_line: String,
    data_dir: PathBuf,
    sets: Vec<(String, String)>,
    process: Running,
}

impl MqttBroker {
    /// Starts the broker [`BROKER_ENV`] picks, anonymous clients allowed, with `sets` as
    /// `--set KEY=VALUE` overrides (mapped to Mosquitto's config where it has the setting).
    pub fn start(data_dir: &Path, sets: &[(&str, &str)]) -> MqttBroker {
        MqttBroker::start_kind(BrokerKind::from_env(), data_dir, sets)
    }

    /// Starts `silt-edge`, whatever [`BROKER_ENV`] says.
    pub fn start_silt(data_dir: &Path, sets: &[(&str, &str)]) -> MqttBroker {
        MqttBroker::start_kind(BrokerKind::SiltEdge, data_dir, sets)
    }

    fn start_kind(kind: BrokerKind, data_dir: &Path, sets: &[(&str, &str)]) -> MqttBroker {
        let sets = sets
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        spawn(kind, data_dir.to_path_buf(), sets)
    }

    /// The data directory, kept across restarts.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process, for its stderr and signals.
    pub fn process(&mut self) -> &mut Running {
        &mut self.process
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGTERM, and a clean exit required.
    pub fn stop(&mut self) {
        self.process.stop_cleanly();
    }

    /// Stops the broker cleanly and starts it again on the same data directory and settings.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// SIGKILL, then waits for the process to be gone: nothing gets a chance to flush.
    pub fn kill(&mut self) {
        self.process.signal(Signal::KILL);
        let status = self.process.wait_exit(crate::STOP_TIMEOUT);
        assert!(!status.success(), "the broker survived SIGKILL: {status}");
    }

    /// Starts the broker again on the same data directory and settings, after [`Self::stop`]
    /// or [`Self::kill`].
    pub fn start_again(&mut self) {
        assert!(!self.process.is_running(), "the broker is still running");
        let next = spawn(self.kind, self.data_dir.clone(), self.sets.clone());
        *self = next;
    }

    /// The admin port's `/metrics` text.
    ///
    /// # Panics
    /// If the broker has no admin port (Mosquitto) or the request fails.
    pub fn metrics(&self) -> String {
        let admin = self.admin.expect("only silt-edge has an admin port");
        let response = crate::http_exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: edge\r\n\r\n");
        assert_eq!(response.status, 200, "{response:?}");
        response.text()
    }
}

fn spawn(kind: BrokerKind, data_dir: PathBuf, sets: Vec<(String, String)>) -> MqttBroker {
    match kind {
        BrokerKind::SiltEdge => spawn_silt(data_dir, sets),
        BrokerKind::Mosquitto => spawn_mosquitto(data_dir, sets),
    }
}

fn spawn_silt(data_dir: PathBuf, sets: Vec<(String, String)>) -> MqttBroker {
    let mut edge = command(&silt_edge());
    edge.arg("--data-dir")
        .arg(&data_dir)
        .args(["--mqtt-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--set", "mqtt.allow_anonymous=true"])
        .env("RUST_LOG", "info");
    for (key, value) in &sets {
        edge.arg("--set").arg(format!("{key}={value}"));
    }
    let mut process = Running::start(edge);
    let started_line = process.wait_for_stderr("silt-edge started", START_TIMEOUT);
    let mqtt = crate::edge_mqtt_addr(&started_line);
    let admin = edge_admin_addr(&started_line);
    assert!(
        mqtt.ip().is_loopback() && mqtt.port() != 0,
        "{started_line}"
    );
    MqttBroker {
        kind: BrokerKind::SiltEdge,
        mqtt,
        admin: Some(admin),
        started_line,
        data_dir,
        sets,
        process,
    }
}

/// Mosquitto with persistence in the data directory, anonymous clients, and the settings of
/// `sets` that it has an equivalent for; the others are silt-edge's own and left out.
fn spawn_mosquitto(data_dir: PathBuf, sets: Vec<(String, String)>) -> MqttBroker {
    std::fs::create_dir_all(&data_dir).expect("cannot create the data directory");
    // Mosquitto cannot bind port 0 and report it, so it gets a port that was free a moment ago.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("cannot find a free port")
        .port();
    let mut config = String::new();
    writeln!(config, "listener {port} 127.0.0.1").unwrap();
    writeln!(config, "allow_anonymous true").unwrap();
    writeln!(config, "persistence true").unwrap();
    writeln!(config, "persistence_location {}/", data_dir.display()).unwrap();
    writeln!(config, "log_dest stderr").unwrap();
    if rustix::process::geteuid().is_root() {
        // As root, Mosquitto would switch to the `mosquitto` user, who cannot write here.
        writeln!(config, "user root").unwrap();
    }
    for (key, value) in &sets {
        match key.as_str() {
            "mqtt.limits.max_packet_bytes" => writeln!(config, "max_packet_size {value}").unwrap(),
            "mqtt.limits.max_keep_alive_secs" => writeln!(config, "max_keepalive {value}").unwrap(),
            _ => {}
        }
    }
    let config_path = data_dir.join("mosquitto.conf");
    std::fs::write(&config_path, config).expect("cannot write mosquitto.conf");
    let mut broker = command(Path::new(MOSQUITTO));
    broker.arg("-c").arg(&config_path);
    let mut process = Running::start(broker);
    let started_line = process.wait_for_stderr(" running", START_TIMEOUT);
    MqttBroker {
        kind: BrokerKind::Mosquitto,
        mqtt: SocketAddr::from(([127, 0, 0, 1], port)),
        admin: None,
        started_line,
        data_dir,
        sets,
        process,
    }
}

/// The value of the first sample of `name` in Prometheus text whose labels include every
/// `label="value"` pair of `labels` (`name` must match whole, so `x` does not match `x_total`).
pub fn metric_value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, parse_labels(rest.strip_suffix('}')?)),
            None => (series, Vec::new()),
        };
        let wanted = series_name == name
            && labels.iter().all(|(key, value)| {
                series_labels
                    .iter()
                    .any(|(series_key, series_value)| series_key == key && series_value == value)
            });
        wanted.then(|| value.parse().ok()).flatten()
    })
}

/// `a="x",b="y"` as pairs; escapes are kept as written, which is enough for test labels.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut end = 0;
        let bytes = after.as_bytes();
        while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
            end += 1;
        }
        pairs.push((
            key.trim_start_matches(',').trim().to_string(),
            after[..end].to_string(),
        ));
        rest = after.get(end + 1..).unwrap_or("");
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    #[test]
    fn metric_value_matches_whole_names_and_label_pairs() {
        let metrics = "# TYPE silt_x_total counter\n\
                       silt_x_total 3\n\
                       silt_y{qos=\"1\",dir=\"in\"} 7\n\
                       silt_y{qos=\"10\",dir=\"in\"} 8\n\
                       silt_y{xqos=\"2\",dir=\"\"} 9\n";
        assert_eq!(metric_value(metrics, "silt_x_total", &[]), Some(3.0));
        assert_eq!(metric_value(metrics, "silt_x", &[]), None);
        assert_eq!(metric_value(metrics, "silt_y", &[("qos", "1")]), Some(7.0));
        assert_eq!(metric_value(metrics, "silt_y", &[("qos", "10")]), Some(8.0));
        assert_eq!(metric_value(metrics, "silt_y", &[("qos", "2")]), None);
        assert_eq!(metric_value(metrics, "silt_y", &[("dir", "")]), Some(9.0));
    }
}
