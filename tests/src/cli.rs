//! The `silt` CLI under test: run to completion with stdin, stdout and stderr captured, under a
//! deadline.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, command};

/// How long one CLI command may run in a test before it counts as hung.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The `silt` binary.
pub fn silt() -> PathBuf {
    binary("silt-client", "silt")
}

/// Runs `silt ARGS` with `stdin` and returns its output.
///
/// # Panics
/// If it cannot start or runs past [`CLI_TIMEOUT`] (it is killed first).
pub fn run_silt(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = command(&silt())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start silt");
    let mut input = child.stdin.take().expect("piped stdin");
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        // The command may exit before reading everything (an error): that is its answer.
        let _ = input.write_all(&stdin);
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    loop {
        if child.try_wait().expect("cannot wait for silt").is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child
                .wait_with_output()
                .expect("cannot collect silt's output");
            panic!(
                "silt {args:?} ran past {CLI_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = writer.join();
    child
        .wait_with_output()
        .expect("cannot collect silt's output")
}

/// Runs `silt ARGS`, requires success, and returns stdout as text.
///
/// # Panics
/// If the command fails; its stderr is in the message.
pub fn silt_ok(args: &[&str], stdin: &[u8]) -> String {
    let output = run_silt(args, stdin);
    assert!(
        output.status.success(),
        "silt {args:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("silt printed UTF-8")
}

/// The JSON lines `silt consume` printed.
///
/// # Panics
/// If a line is not JSON.
pub fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{line:?}: {error}")))
        .collect()
}
