//! `silt bench quic`, the uplink benchmark's link baseline: a real QUIC stream over loopback
//! must deliver exactly the bytes asked for (the tool fails otherwise), in writes that need
//! not divide them, and bad options end the tool with a clear error.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_silt"))
        .args(["bench", "quic"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn a_stream_delivers_every_byte_and_reports_each_run() {
    // 8 MiB in 100,000-byte writes: the last write is a short one.
    let output = bench(&[
        "--total-bytes",
        "8388608",
        "--chunk-bytes",
        "100000",
        "--runs",
        "2",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "silt bench quic failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).unwrap();
    let runs: Vec<f64> = report["runs_mb_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run.as_f64().unwrap())
        .collect();
    assert_eq!(runs.len(), 2, "{report}");
    assert!(runs.iter().all(|mb_s| *mb_s > 0.0), "{report}");
    let median = report["median_mb_s"].as_f64().unwrap();
    assert!(
        (median - (runs[0] + runs[1]) / 2.0).abs() < 1e-6,
        "{report}"
    );
}

#[test]
fn bad_options_are_refused_with_a_clear_error() {
    for (args, expected) in [
        (
            &["--runs", "0"][..],
            "--runs and --total-bytes must be positive",
        ),
        (
            &["--total-bytes", "0"][..],
            "--runs and --total-bytes must be positive",
        ),
        (
            &["--chunk-bytes", "0"][..],
            "--chunk-bytes must be between 1 and 64 MiB",
        ),
        (
            &["--chunk-bytes", "67108865"][..],
            "--chunk-bytes must be between 1 and 64 MiB",
        ),
    ] {
        let output = bench(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
