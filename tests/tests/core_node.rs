//! End-to-end tests of the `silt-core` node: it starts on free ports, serves `/health` and
//! `/metrics`, stops cleanly on SIGTERM (closing its log with the clean marker), and refuses
//! a bad config by naming the key.

use silt_tests::core::Core;
use silt_tests::{STOP_TIMEOUT, Signal, command, silt_core};

#[test]
fn starts_serves_health_and_metrics_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let core = Core::start(&data_dir, &[]);
    let metrics = core.metrics();
    assert!(
        metrics.contains(&format!(
            "silt_core_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    // Two topics, the internal ones: committed consumer offsets and producer id blocks.
    assert!(metrics.contains("silt_log_topics 2"), "{metrics}");
    assert!(
        metrics.contains("silt_kafka_groups{state=\"Stable\"} 0"),
        "{metrics}"
    );
    core.stop();

    // The clean stop left the marker: the next start skips recovery.
    let core = Core::start(&data_dir, &[]);
    assert!(
        core.started_line.contains("clean=true"),
        "{}",
        core.started_line
    );
    let mut process = core.process;
    process.signal(Signal::INT);
    let status = process.wait_exit(STOP_TIMEOUT);
    assert!(status.success(), "{status}; {}", process.stderr());
}

#[test]
fn after_kill_9_the_next_start_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    Core::start(&data_dir, &[]).kill();
    let core = Core::start(&data_dir, &[]);
    assert!(
        core.started_line.contains("clean=false"),
        "{}",
        core.started_line
    );
    core.stop();
}

#[test]
fn a_bad_config_names_the_key_and_exits_2() {
    let output = command(&silt_core())
        .args(["--data-dir", "/tmp/unused", "--kafka-listen", "nowhere"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "silt-core: config key kafka.listen: expected an IP address and port such as \
         0.0.0.0:9092, got \"nowhere\" (from --kafka-listen)\n"
    );
    let output = command(&silt_core())
        .args(["--data-dir", "/tmp/unused", "--object-store", "nope"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("config key object_store: no scheme"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_config_prints_the_resolved_config() {
    let output = command(&silt_core())
        .args(["--data-dir", "/srv/silt", "--check-config"])
        .env("SILT_KAFKA__DEFAULT_PARTITIONS", "4")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("data_dir = \"/srv/silt\""), "{text}");
    assert!(text.contains("default_partitions = 4"), "{text}");
}
