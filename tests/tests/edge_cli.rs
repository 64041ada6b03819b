//! End-to-end tests of the `silt-edge` binary: version, config loading and validation, and a
//! clean start and stop under real signals.

use std::path::Path;
use std::process::Output;

use silt_tests::{
    Running, START_TIMEOUT, STOP_TIMEOUT, Signal, command, silt_edge, workspace_root,
};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(&silt_edge())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("cannot run silt-edge")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn version_prints_the_crate_version() {
    let output = run(&["--version"], &[]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        format!("silt-edge {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_key_fails_with_exit_code_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "data_dir = \"/tmp/x\"\n[log]\nbudget_byte = 5\n",
    );
    let output = run(&["--config", &config, "--check-config"], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("config key log.budget_byte: unknown field `budget_byte`"),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).is_empty());
}

#[test]
fn bad_value_fails_naming_key_and_flag() {
    let output = run(
        &[
            "--data-dir",
            "/tmp/x",
            "--set",
            "log.budget_policy=foo",
            "--check-config",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        stderr(&output),
        "silt-edge: config key log.budget_policy: expected reject or drop-oldest, got \"foo\" \
         (from --set log.budget_policy)\n"
    );
}

#[test]
fn missing_data_dir_is_a_config_error() {
    let output = run(&["--check-config"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("config key data_dir: required"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn env_overrides_the_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "node_id = \"from-file\"\ndata_dir = \"/file\"\n[log]\nbudget_bytes = 1000\n",
    );
    let file_only = run(&["--config", &config, "--check-config"], &[]);
    assert!(file_only.status.success(), "{}", stderr(&file_only));
    assert!(stdout(&file_only).contains("node_id = \"from-file\""));
    assert!(stdout(&file_only).contains("budget_bytes = 1000\n"));

    let env = [
        ("SILT_CONFIG", config.as_str()),
        ("SILT_NODE_ID", "from-env"),
        ("SILT_LOG__BUDGET_BYTES", "2000"),
        ("SILT_TOPIC_DEFAULTS__RETENTION_MS", "-1"),
    ];
    let from_env = run(&["--check-config"], &env);
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    let printed = stdout(&from_env);
    assert!(printed.contains("node_id = \"from-env\""), "{printed}");
    assert!(printed.contains("data_dir = \"/file\""), "{printed}");
    assert!(printed.contains("budget_bytes = 2000\n"), "{printed}");
    assert!(printed.contains("\"retention.ms\" = -1\n"), "{printed}");

    let from_flags = run(
        &[
            "--check-config",
            "--node-id",
            "from-flag",
            "--set",
            "log.budget_bytes=3000",
        ],
        &env,
    );
    assert!(from_flags.status.success(), "{}", stderr(&from_flags));
    let printed = stdout(&from_flags);
    assert!(printed.contains("node_id = \"from-flag\""), "{printed}");
    assert!(printed.contains("budget_bytes = 3000\n"), "{printed}");
}

#[test]
fn printed_config_is_a_valid_config_that_resolves_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(
        &[
            "--check-config",
            "--data-dir",
            "/srv/silt",
            "--set",
            "log.flush=relaxed-unsafe",
            "--set",
            "log.budget_bytes=2GiB",
            "--set",
            "topic_defaults.segment.bytes=16777216",
        ],
        &[],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let config = write_config(dir.path(), &stdout(&first));
    let second = run(&["--check-config", "--config", &config], &[]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&second), stdout(&first));
    assert!(stdout(&second).contains("budget_bytes = 2147483648\n"));
}

#[test]
fn example_pi_config_is_valid() {
    let example = workspace_root().join("cross/edge.example.toml");
    let output = run(
        &["--check-config", "--config", example.to_str().unwrap()],
        &[],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(
        printed.contains("data_dir = \"/var/lib/silt\""),
        "{printed}"
    );
    assert!(printed.contains("flush = \"durable\""), "{printed}");
}

fn start_and_stop(signal: Signal) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut edge = command(&silt_edge());
    edge.args([
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--node-id",
        "e2e-1",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .env("RUST_LOG", "info");
    let mut edge = Running::start(edge);
    let started = edge.wait_for_stderr("silt-edge started", START_TIMEOUT);
    assert!(started.contains("node_id=e2e-1"), "{started}");
    assert!(started.contains(data_dir.to_str().unwrap()), "{started}");

    edge.signal(signal);
    let status = edge.wait_exit(STOP_TIMEOUT);
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        edge.stderr()
    );
    assert!(
        edge.stderr().contains("silt-edge stopped"),
        "{}",
        edge.stderr()
    );
}

#[test]
fn starts_and_stops_cleanly_on_sigterm() {
    start_and_stop(Signal::TERM);
}

#[test]
fn starts_and_stops_cleanly_on_sigint() {
    start_and_stop(Signal::INT);
}

/// A clean stop leaves the data directory marked clean, so the next start skips recovery; a
/// kill -9 does not, so the start after it recovers.
#[test]
fn data_directory_is_closed_cleanly_on_sigterm_and_recovered_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let start = || {
        let mut edge = command(&silt_edge());
        edge.args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info");
        let mut edge = Running::start(edge);
        let started = edge.wait_for_stderr("silt-edge started", START_TIMEOUT);
        (edge, started)
    };

    let (mut edge, started) = start();
    assert!(
        started.contains("clean=false"),
        "a new directory has no marker: {started}"
    );
    assert!(data_dir.join("meta.json").exists());
    edge.stop_cleanly();
    assert!(data_dir.join(".clean_shutdown").exists());

    let (mut edge, started) = start();
    assert!(started.contains("clean=true"), "{started}");
    assert!(
        !data_dir.join(".clean_shutdown").exists(),
        "the marker goes before the node accepts writes"
    );
    edge.signal(Signal::KILL);
    let status = edge.wait_exit(STOP_TIMEOUT);
    assert!(!status.success());

    let (mut edge, started) = start();
    assert!(started.contains("clean=false"), "{started}");
    edge.stop_cleanly();
}

/// A second node on the same data directory is refused with a clear error, not a corrupt log.
#[test]
fn a_second_node_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut first = command(&silt_edge());
    first
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info");
    let mut first = Running::start(first);
    first.wait_for_stderr("silt-edge started", START_TIMEOUT);
    let second = run(
        &[
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("in use by another process"),
        "{}",
        stderr(&second)
    );
    first.stop_cleanly();
}
