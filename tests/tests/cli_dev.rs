//! `silt dev`: one command runs an edge and a core; an MQTT publish reaches Kafka consumers
//! (the `silt` CLI and kcat) through the uplink, and SIGTERM stops everything cleanly; the
//! archive appears as Parquet that the DuckDB line `silt dev` prints reads verbatim; a restart
//! on the same data directory resumes; a port already taken is a clear error.

use std::fs::File;
use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use silt_tests::cli::{json_lines, silt, silt_ok};
use silt_tests::{Running, START_TIMEOUT, binary, command, workspace_root};

/// A free loopback port for TCP (and, for the uplink, UDP).
fn free_port(udp: bool) -> u16 {
    if udp {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

#[test]
fn silt_dev_carries_an_mqtt_publish_to_kafka_consumers_and_stops_cleanly() {
    // `silt dev` runs the node binaries next to it: build them into the same directory.
    binary("silt-core", "silt-core");
    binary("silt-edge", "silt-edge");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let (mqtt, kafka, uplink) = (
        addr(free_port(false)),
        addr(free_port(false)),
        addr(free_port(true)),
    );
    let (core_admin, edge_admin) = (addr(free_port(false)), addr(free_port(false)));
    let mut dev = command(&silt());
    dev.args(["dev", "--data-dir", data_dir.to_str().unwrap()])
        .args([
            "--mqtt-listen",
            &mqtt,
            "--kafka-listen",
            &kafka,
            "--uplink-listen",
            &uplink,
        ])
        .args([
            "--core-admin-listen",
            &core_admin,
            "--edge-admin-listen",
            &edge_admin,
        ]);
    let mut dev = Running::start(dev);
    dev.wait_for_stderr("silt: dev is running", START_TIMEOUT * 2);

    let (mqtt_host, mqtt_port) = mqtt.split_once(':').unwrap();
    for i in 0..3 {
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                mqtt_host,
                "-p",
                mqtt_port,
                "-q",
                "1",
                "-t",
                &format!("sensors/room{i}"),
                "-m",
                &format!("{{\"temp\":2{i}}}"),
            ])
            .status()
            .expect("mosquitto_pub is installed (scripts/test installs it)");
        assert!(status.success());
    }

    let records = json_lines(&silt_ok(
        &[
            "consume",
            "--bootstrap",
            &kafka,
            "--topic",
            "mqtt",
            "--from-beginning",
            "--max-messages",
            "3",
            "--timeout-ms",
            "30000",
        ],
        b"",
    ));
    assert_eq!(records.len(), 3);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record["key"], format!("sensors/room{i}"));
        assert_eq!(record["value"], format!("{{\"temp\":2{i}}}"));
        let headers: Vec<&str> = record["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h[0].as_str().unwrap())
            .collect();
        assert!(
            headers.contains(&"mqtt.qos") && headers.contains(&"silt.edge"),
            "{headers:?}"
        );
    }

    let kcat = Command::new("kcat")
        .args([
            "-b",
            &kafka,
            "-C",
            "-t",
            "mqtt",
            "-o",
            "beginning",
            "-c",
            "3",
            "-f",
            "%k %s\n",
        ])
        .output()
        .expect("kcat is installed");
    assert!(
        kcat.status.success(),
        "{}",
        String::from_utf8_lossy(&kcat.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&kcat.stdout),
        "sensors/room0 {\"temp\":20}\nsensors/room1 {\"temp\":21}\nsensors/room2 {\"temp\":22}\n"
    );

    dev.stop_cleanly();
    // Both nodes are gone, and each closed its data directory cleanly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let marker = data_dir.to_str().unwrap().to_string();
    while running_with_arg(&marker) {
        assert!(Instant::now() < deadline, "a node of silt dev outlived it");
        std::thread::sleep(Duration::from_millis(50));
    }
    for log in ["core.log", "edge.log"] {
        let text = std::fs::read_to_string(data_dir.join(log)).unwrap();
        assert!(
            text.contains("closed data directory cleanly"),
            "{log}:\n{text}"
        );
    }
}

/// The `--*-listen` flags for five free ports, and the MQTT and Kafka addresses among them.
fn dev_ports() -> (Vec<String>, String, String) {
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let (mqtt, kafka) = (addr(free_port(false)), addr(free_port(false)));
    let flags = vec![
        "--mqtt-listen".to_string(),
        mqtt.clone(),
        "--kafka-listen".into(),
        kafka.clone(),
        "--uplink-listen".into(),
        addr(free_port(true)),
        "--core-admin-listen".into(),
        addr(free_port(false)),
        "--edge-admin-listen".into(),
        addr(free_port(false)),
    ];
    (flags, mqtt, kafka)
}

/// Publishes `value` at QoS 1 to `topic` on `mqtt` with mosquitto_pub.
fn mosquitto_pub(mqtt: &str, topic: &str, value: &str) {
    let (host, port) = mqtt.split_once(':').unwrap();
    let status = Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port, "-q", "1", "-t", topic, "-m", value])
        .status()
        .expect("mosquitto_pub is installed (scripts/test installs it)");
    assert!(status.success());
}

/// The first `count` records of topic `mqtt` as `offset key value` lines, read with kcat
/// (given 60 s to see them all).
fn kcat_all(kafka: &str, count: usize) -> String {
    let kcat = Command::new("timeout")
        .args([
            "60",
            "kcat",
            "-b",
            kafka,
            "-C",
            "-t",
            "mqtt",
            "-o",
            "beginning",
        ])
        .args(["-c", &count.to_string(), "-f", "%o %k %s\n"])
        .output()
        .expect("kcat is installed");
    assert!(
        kcat.status.success(),
        "{}",
        String::from_utf8_lossy(&kcat.stderr)
    );
    String::from_utf8_lossy(&kcat.stdout).into_owned()
}

/// Starts `silt dev` with `flags`, its stdout in `stdout`, and waits until it is running.
fn start_dev(data_dir: &Path, flags: &[String], stdout: &Path) -> Running {
    let mut dev = command(&silt());
    dev.args(["dev", "--data-dir", data_dir.to_str().unwrap()])
        .args(flags)
        .stdout(File::create(stdout).unwrap());
    let mut dev = Running::start(dev);
    dev.wait_for_stderr("silt: dev is running", START_TIMEOUT * 2);
    dev
}

#[test]
fn silt_dev_archives_to_parquet_that_its_printed_duckdb_line_reads_and_resumes_after_a_restart() {
    binary("silt-core", "silt-core");
    binary("silt-edge", "silt-edge");
    // The printed DuckDB line runs `duckdb` or `python3` with the `duckdb` package: the
    // suite's virtualenv (scripts/test creates it) comes first on PATH, as for a user with
    // DuckDB installed.
    let venv_bin = workspace_root().join(".venv/bin");
    assert!(
        venv_bin.join("python3").exists(),
        "{} is missing: scripts/test creates it",
        venv_bin.display()
    );
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let stdout = dir.path().join("stdout");
    let (mut flags, mqtt, kafka) = dev_ports();
    // Only the timers change, through the flag a user has: segments close after 1 s and are
    // archived as soon as they close.
    for setting in [
        "topic_defaults.segment.ms=1000",
        "tiering.max_wait_ms=0",
        "tiering.check_interval_ms=200",
        "log.retention_check_ms=200",
    ] {
        flags.extend(["--core-set".to_string(), setting.to_string()]);
    }
    let mut dev = start_dev(&data_dir, &flags, &stdout);
    let printed = std::fs::read_to_string(&stdout).unwrap();
    let duckdb_line = printed
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("duckdb ") || line.starts_with("python3 "))
        .unwrap_or_else(|| panic!("no DuckDB line in:\n{printed}"))
        .to_string();
    // The printed kcat line names the Kafka listener that was asked for.
    assert!(
        printed.contains(&format!("kcat -b {kafka} -C -t mqtt")),
        "{printed}"
    );

    for i in 0..3 {
        mosquitto_pub(
            &mqtt,
            &format!("sensors/room{i}"),
            &format!("{{\"temp\":2{i}}}"),
        );
    }
    assert_eq!(
        kcat_all(&kafka, 3),
        "0 sensors/room0 {\"temp\":20}\n1 sensors/room1 {\"temp\":21}\n2 sensors/room2 {\"temp\":22}\n"
    );

    // The archive: the printed line, run verbatim by a shell, shows the three messages.
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let run = Command::new("sh")
            .args(["-c", &duckdb_line])
            .env("PATH", &path)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&run.stdout).into_owned();
        if run.status.success() && out.contains("sensors/room2") {
            break out;
        }
        let err = String::from_utf8_lossy(&run.stderr);
        // Before the first object exists DuckDB finds no file; anything else is a failure.
        assert!(
            err.contains("No files found"),
            "{duckdb_line}\nstdout:\n{out}\nstderr:\n{err}"
        );
        assert!(
            Instant::now() < deadline,
            "no Parquet within 60 s; {duckdb_line}\nstderr:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    for i in 0..3 {
        assert!(
            shown.contains(&format!("sensors/room{i}"))
                && shown.contains(&format!("{{\"temp\":2{i}}}")),
            "{shown}"
        );
    }

    // Restart on the same data directory: everything is still there and new messages follow.
    dev.stop_cleanly();
    let mut dev = start_dev(&data_dir, &flags, &stdout);
    mosquitto_pub(&mqtt, "sensors/room3", "after restart");
    assert_eq!(
        kcat_all(&kafka, 4),
        "0 sensors/room0 {\"temp\":20}\n1 sensors/room1 {\"temp\":21}\n2 sensors/room2 {\"temp\":22}\n3 sensors/room3 after restart\n"
    );

    // A second `silt dev` on the same ports fails at once, naming the port and the flag, and
    // leaves the running one alone.
    let other = dir.path().join("other");
    let second = command(&silt())
        .args(["dev", "--data-dir", other.to_str().unwrap()])
        .args(&flags)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("cannot use {mqtt}")) && err.contains("--mqtt-listen"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&second.stdout).is_empty());
    assert!(dev.is_running());
    dev.stop_cleanly();
}

/// Whether a process whose command line mentions `needle` is running.
fn running_with_arg(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
            .unwrap_or(false)
    })
}

/// The lines of a node's log from its `shutting down` line on.
fn shutdown_lines(log: &str) -> Vec<&str> {
    log.lines()
        .skip_while(|line| !line.contains("shutting down signal="))
        .collect()
}

/// The timestamp (first field, RFC 3339 UTC, so ordered as text) of the first line of `log`
/// containing `needle`.
fn time_of<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|line| line.contains(needle))
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {needle:?} line in:\n{log}"))
}

#[test]
fn ctrl_c_on_the_terminal_stops_the_edge_before_the_core_and_loses_nothing() {
    use std::os::unix::process::CommandExt as _;
    binary("silt-core", "silt-core");
    binary("silt-edge", "silt-edge");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("dev");
    let stdout = dir.path().join("stdout");
    let (flags, mqtt, kafka) = dev_ports();
    // As a shell starts a foreground job: in a process group of its own, which the
    // terminal's Ctrl-C signals whole.
    let mut dev = command(&silt());
    dev.args(["dev", "--data-dir", data_dir.to_str().unwrap()])
        .args(&flags)
        .stdout(File::create(&stdout).unwrap())
        .process_group(0);
    let mut dev = Running::start(dev);
    dev.wait_for_stderr("silt: dev is running", START_TIMEOUT * 2);

    // 100 QoS 1 publishes, each acknowledged by the edge, and Ctrl-C right after: what the
    // edge has not shipped yet it ships after the restart.
    const COUNT: usize = 100;
    let (host, port) = mqtt.split_once(':').unwrap();
    let mut publish = Command::new("mosquitto_pub")
        .args([
            "-h",
            host,
            "-p",
            port,
            "-q",
            "1",
            "-t",
            "sensors/bulk",
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub is installed (scripts/test installs it)");
    {
        use std::io::Write as _;
        let mut input = publish.stdin.take().unwrap();
        for i in 0..COUNT {
            writeln!(input, "m{i}").unwrap();
        }
    }
    assert!(publish.wait().unwrap().success());

    let group = rustix::process::Pid::from_raw(dev.id() as i32).unwrap();
    rustix::process::kill_process_group(group, silt_tests::Signal::INT).unwrap();
    let status = dev.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "silt dev exited {status}:\n{}",
        dev.stderr()
    );
    let marker = data_dir.to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while running_with_arg(&marker) {
        assert!(Instant::now() < deadline, "a node of silt dev outlived it");
        std::thread::sleep(Duration::from_millis(50));
    }

    let edge_log = std::fs::read_to_string(data_dir.join("edge.log")).unwrap();
    let core_log = std::fs::read_to_string(data_dir.join("core.log")).unwrap();
    for (name, log) in [("edge", &edge_log), ("core", &core_log)] {
        // Only silt dev got the terminal's SIGINT; each node got its SIGTERM.
        assert!(
            log.contains("shutting down signal=") && !log.contains("SIGINT"),
            "{name}.log:\n{log}"
        );
        let failures: Vec<&str> = shutdown_lines(log)
            .into_iter()
            .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .collect();
        assert!(
            failures.is_empty(),
            "{name}.log has failures from the shutdown:\n{}",
            failures.join("\n")
        );
        assert!(
            log.contains("closed data directory cleanly"),
            "{name}.log:\n{log}"
        );
    }
    // The edge was gone before the core began to stop.
    let edge_stopped = time_of(&edge_log, "silt-edge stopped");
    let core_stopping = time_of(&core_log, "shutting down signal=");
    assert!(
        edge_stopped <= core_stopping,
        "the edge stopped at {edge_stopped}, after the core began stopping at {core_stopping}"
    );

    // A restart on the same data directory has every message once, and goes on after them.
    let mut dev = start_dev(&data_dir, &flags, &stdout);
    mosquitto_pub(&mqtt, "sensors/bulk", "after restart");
    let expected: String = (0..COUNT)
        .map(|i| format!("{i} sensors/bulk m{i}\n"))
        .chain([format!("{COUNT} sensors/bulk after restart\n")])
        .collect();
    assert_eq!(kcat_all(&kafka, COUNT + 1), expected);
    dev.stop_cleanly();
}
