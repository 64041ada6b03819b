//! The `silt` CLI under test: run to completion with stdin, stdout and stderr captured, under a
//! deadline.

use std::io::{Read, Write as _};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::thread::JoinHandle;
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
/// stdout and stderr are read while the command runs: a command printing more than a pipe
/// holds (64 KiB) would otherwise block on its next write and never exit.
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
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("cannot wait for silt") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            panic!(
                "silt {args:?} ran past {CLI_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Reads `pipe` to its end on a thread of its own.
fn drain(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
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
