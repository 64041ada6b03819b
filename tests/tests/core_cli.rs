//! End-to-end tests of the `silt-core` binary's command line.

use silt_tests::{command, silt_core};

#[test]
fn version_prints_the_crate_version() {
    let output = command(&silt_core()).arg("--version").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("silt-core {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn without_arguments_it_prints_help_and_fails() {
    let output = command(&silt_core()).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("Usage: silt-core"));
}
