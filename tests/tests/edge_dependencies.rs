//! The edge binary runs on small ARM boards: it must not link the archive stack (arrow,
//! parquet, object_store) nor aws-lc, on any target. This asks cargo for the edge's normal
//! and build dependency tree, the crates that end up in or build the binary.

use silt_tests::{cargo, workspace_root};

/// Crates the edge binary must never depend on.
const FORBIDDEN: &[&str] = &[
    "arrow",
    "parquet",
    "object_store",
    "aws-lc-rs",
    "aws-lc-sys",
];

#[test]
fn edge_links_no_archive_or_aws_lc_crates() {
    let output = cargo()
        .current_dir(workspace_root())
        .args([
            "tree",
            "-p",
            "silt-edge",
            "-e",
            "normal,build",
            "--target",
            "all",
        ])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .expect("cannot run cargo tree");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"silt-edge") && crates.contains(&"silt-log"),
        "{tree}"
    );
    let forbidden: Vec<&str> = crates
        .iter()
        .copied()
        .filter(|name| {
            FORBIDDEN.contains(name) || name.starts_with("arrow-") || name.starts_with("parquet-")
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "silt-edge must not depend on {forbidden:?}; see `cargo tree -p silt-edge -i <crate>`"
    );
}
