//! `silt bench mqtt` against a real Mosquitto on a free loopback port: short runs at every QoS
//! and both protocol versions must confirm exactly the messages asked for, with latencies
//! that make sense, and a broker that refuses or stops answering must end the tool with a
//! clear error, not a hang.
//!
//! Mosquitto must be installed (Debian package `mosquitto`; `scripts/test` installs it). The
//! binary is found on PATH, in /usr/sbin, or at `$SILT_MOSQUITTO`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long Mosquitto may take to listen, and the tool to finish a short run.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(10);

fn mosquitto_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SILT_MOSQUITTO") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("mosquitto"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mosquitto is not installed: these tests run `silt bench mqtt` against a real \
                 broker. Install the Debian package `mosquitto` (scripts/test does), or set \
                 SILT_MOSQUITTO to its path"
            )
        })
}

/// A Mosquitto process with two listeners: `open` accepts anonymous clients, `closed` refuses
/// them. Killed on drop.
struct Mosquitto {
    child: Child,
    open: SocketAddr,
    closed: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Mosquitto {
        let binary = mosquitto_binary();
        // A port found free can be taken before Mosquitto binds it; try again on a new one.
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let (open, closed) = (free_port(), free_port());
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(
                &config,
                format!(
                    "per_listener_settings true\n\
                     persistence false\n\
                     log_dest stderr\n\
                     listener {} 127.0.0.1\n\
                     allow_anonymous true\n\
                     listener {} 127.0.0.1\n\
                     allow_anonymous false\n",
                    open.port(),
                    closed.port()
                ),
            )
            .unwrap();
            let log = dir.path().join("mosquitto.log");
            let child = Command::new(&binary)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
            let mut mosquitto = Mosquitto {
                child,
                open,
                closed,
                log,
                _dir: dir,
            };
            if mosquitto.wait_listening() {
                return mosquitto;
            }
            last_log = mosquitto.log();
        }
        panic!("mosquitto did not start listening; its log:\n{last_log}");
    }

    /// Waits until both listeners accept connections; false if Mosquitto exited first.
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if TcpStream::connect(self.open).is_ok() && TcpStream::connect(self.closed).is_ok() {
                return true;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        panic!(
            "mosquitto not listening within {START_TIMEOUT:?}; its log:\n{}",
            self.log()
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

fn bench(addr: SocketAddr, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_silt"))
        .args(["bench", "mqtt", "--addr", &addr.to_string()])
        .args(["--runs", "1", "--warmup", "0", "--json"])
        .args(args)
        .env_remove("SILT_BENCH_MQTT_USERNAME")
        .env_remove("SILT_BENCH_MQTT_PASSWORD")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

/// Runs the tool and returns its one measured run, requiring success.
fn measured_run(mosquitto: &Mosquitto, args: &[&str]) -> Value {
    let output = bench(mosquitto.open, args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "silt bench mqtt {args:?} failed: {}\nstdout: {stdout}\nstderr: {}\nmosquitto log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        mosquitto.log()
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{report}");
    runs[0].clone()
}

fn micros(run: &Value, key: &str) -> f64 {
    run[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no {key} in {run}"))
}

/// Latencies are present and ordered: 0 < p50 <= p99 <= max, within the histogram's 1/128.
fn assert_latencies(run: &Value) {
    let (p50, p99, max) = (
        micros(run, "p50_us"),
        micros(run, "p99_us"),
        micros(run, "max_us"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{run}");
}

#[test]
fn every_qos_and_protocol_confirms_exactly_the_messages_asked_for() {
    let mosquitto = Mosquitto::start();
    for (qos, protocol) in [("1", "3.1.1"), ("2", "3.1.1"), ("1", "5"), ("2", "5")] {
        let run = measured_run(
            &mosquitto,
            &[
                "--qos",
                qos,
                "--protocol",
                protocol,
                "--messages",
                "2001",
                "--clients",
                "4",
            ],
        );
        assert_eq!(run["messages"], 2001, "QoS {qos} MQTT {protocol}: {run}");
        assert_eq!(run["window"], 10, "QoS {qos} MQTT {protocol}: {run}");
        assert!(micros(&run, "msgs_per_s") > 0.0, "{run}");
        assert_latencies(&run);
    }
    for protocol in ["3.1.1", "5"] {
        let run = measured_run(
            &mosquitto,
            &[
                "--qos",
                "0",
                "--protocol",
                protocol,
                "--messages",
                "5000",
                "--payload",
                "10",
            ],
        );
        assert_eq!(run["messages"], 5000, "QoS 0 MQTT {protocol}: {run}");
        // QoS 0 has no acknowledgements to time.
        assert!(run["p50_us"].is_null() && run["max_us"].is_null(), "{run}");
        let expected_mb_s = micros(&run, "msgs_per_s") * 10.0 / 1e6;
        assert!(
            (micros(&run, "mb_per_s") - expected_mb_s).abs() < 1e-6,
            "{run}"
        );
    }
}

#[test]
fn a_timed_run_stops_near_its_duration_and_counts_what_was_acknowledged() {
    let mosquitto = Mosquitto::start();
    let run = measured_run(
        &mosquitto,
        &["--qos", "1", "--duration", "300ms", "--inflight", "3"],
    );
    let elapsed = micros(&run, "elapsed_s");
    // Publishing stops at 300 ms; only the acks then in flight are awaited.
    assert!((0.3..2.0).contains(&elapsed), "{run}");
    assert!(run["messages"].as_u64().unwrap() > 0, "{run}");
    assert_eq!(run["window"], 3, "{run}");
    assert_latencies(&run);
}

#[test]
fn a_refused_connect_or_a_closed_port_fails_with_the_reason() {
    let mosquitto = Mosquitto::start();
    for protocol in ["3.1.1", "5"] {
        let output = bench(
            mosquitto.closed,
            &["--messages", "10", "--protocol", protocol],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains("refused the connection") && stderr.contains("NotAuthorized"),
            "MQTT {protocol}: {stderr}"
        );
    }
    let nothing_there = free_port();
    let output = bench(nothing_there, &["--messages", "10"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

/// A broker that accepts the connection and then never acknowledges a publish (as a full
/// disk may make one do in 3.1.1) must end the run with a timeout error, not hang it.
/// Mosquitto always acks, so this peer is a socket that answers CONNECT and nothing else.
#[test]
fn a_broker_that_never_acknowledges_ends_the_run_with_a_timeout() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        read_one_packet(&mut stream);
        // CONNACK: session present 0, return code 0 (accepted).
        stream.write_all(&[0x20, 0x02, 0x00, 0x00]).unwrap();
        // Swallow publishes until the client gives up and closes.
        let mut sink = [0_u8; 4096];
        while matches!(stream.read(&mut sink), Ok(read) if read > 0) {}
    });
    let started = Instant::now();
    let output = bench(
        addr,
        &["--clients", "1", "--messages", "5", "--timeout", "300ms"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("no reply from the broker within 300ms while waiting for acknowledgements"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < START_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    peer.join().unwrap();
}

/// Reads one whole MQTT packet (fixed header, remaining length, body) and discards it.
fn read_one_packet(stream: &mut TcpStream) {
    let mut byte = [0_u8; 1];
    stream.read_exact(&mut byte).unwrap();
    let (mut remaining, mut shift) = (0_usize, 0);
    loop {
        stream.read_exact(&mut byte).unwrap();
        remaining |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0_u8; remaining];
    stream.read_exact(&mut body).unwrap();
}
