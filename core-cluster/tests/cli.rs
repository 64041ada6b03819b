//! The `silt-core` binary's command line. These tests live in silt-core's own package so that
//! `cargo test --workspace` builds the binary (`CARGO_BIN_EXE_silt-core`), which the end-to-end
//! tests in `tests/` then reuse (see `scripts/test`).

use std::process::Command;

const SILT_CORE: &str = env!("CARGO_BIN_EXE_silt-core");

#[test]
fn version_prints_the_crate_version() {
    let output = Command::new(SILT_CORE).arg("--version").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("silt-core {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn without_arguments_it_prints_help_and_fails() {
    let output = Command::new(SILT_CORE).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Usage: silt-core"));
}
