//! `silt dev`: one command runs an edge and a core; an MQTT publish reaches Kafka consumers
//! (the `silt` CLI and kcat) through the uplink, and SIGTERM stops everything cleanly.

use std::net::{TcpListener, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use silt_tests::cli::{json_lines, silt, silt_ok};
use silt_tests::{Running, START_TIMEOUT, binary, command};

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

/// Whether a process whose command line mentions `needle` is running.
fn running_with_arg(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
            .unwrap_or(false)
    })
}
