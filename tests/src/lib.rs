//! Helpers for end-to-end tests: build and locate the workspace's binaries, run them, read
//! their logs, and signal them, always waiting on a condition with a deadline.
//!
//! # Layout
//! - [`binary`]: builds a workspace binary once per test process and returns its path.
//! - [`Running`]: a started binary whose stderr is read line by line in the background.
//! - [`http_exchange`]: one raw HTTP/1.1 exchange with a deadline, for admin ports.
//! - [`core`]: the `silt-core` binary started on free ports, waited on until healthy.
//! - [`kafka`]: a raw Kafka protocol client, for exact bytes and bad input.
//! - [`s3`]: an S3 protocol server (s3s-fs) on 127.0.0.1 in the test process, for tiering.
//! - [`mqtt`]: the MQTT broker under test, rumqttc clients for 3.1.1 and 5.0, raw packets,
//!   and the log read back with `silt-edge dump`.
//!
//! Tests here start real binaries. `env!("CARGO_BIN_EXE_...")` only names binaries of the
//! test's own package, so [`binary`] asks cargo to build the one wanted and reads its path
//! from cargo's JSON messages, which stays right whatever the target dir is; `scripts/test`
//! instead points [`PREBUILT_BIN_DIR`] at the binaries its `cargo test --workspace` built.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

pub mod cli;
pub mod core;
pub mod kafka;
pub mod mqtt;
pub mod s3;
pub mod uplink;

/// How long a test waits for a binary to say it started; generous for a loaded CI machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a binary may take to exit after a shutdown signal.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`Running::wait_exit`] polls for the exit.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The workspace root, where `Cargo.toml` lists the members.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
}

/// Where `scripts/test` says the binaries are already built, so that the tests use the ones
/// `cargo test --workspace` built (with the workspace's unified features) instead of building
/// each package again with its own feature set, which recompiles most dependencies.
pub const PREBUILT_BIN_DIR: &str = "SILT_TEST_BIN_DIR";

/// The path of `bin` from `package`, built once per test process with the dev profile, or
/// found in [`PREBUILT_BIN_DIR`] when that is set.
///
/// # Panics
/// If the build fails; cargo's diagnostics are on stderr.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(String, String), PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|poison| poison.into_inner());
    built
        .entry((package.to_string(), bin.to_string()))
        .or_insert_with(|| build(package, bin))
        .clone()
}

/// The `silt-edge` binary.
pub fn silt_edge() -> PathBuf {
    binary("silt-edge", "silt-edge")
}

/// The `silt-core` binary.
pub fn silt_core() -> PathBuf {
    binary("silt-core", "silt-core")
}

/// The cargo that runs these tests, so nested builds use the same toolchain.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build(package: &str, bin: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(PREBUILT_BIN_DIR) {
        let path = Path::new(&dir).join(bin);
        assert!(
            path.is_file(),
            "{PREBUILT_BIN_DIR} names {}, which holds no {bin}: build it first \
             (`cargo test --workspace --no-run` builds every binary that has integration tests)",
            Path::new(&dir).display()
        );
        return path;
    }
    let output = cargo()
        .current_dir(workspace_root())
        .args([
            "build",
            "--message-format=json-render-diagnostics",
            "-p",
            package,
        ])
        .args(["--bin", bin])
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run cargo");
    assert!(
        output.status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == bin)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no executable named {bin}"))
}

/// A command for `program` with no inherited `SILT_*` env vars, so tests see only the
/// config they set themselves.
pub fn command(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SILT_") {
            command.env_remove(name);
        }
    }
    command
}

/// A started binary, its stderr read in the background.
#[derive(Debug)]
pub struct Running {
    child: Child,
    stderr_lines: Receiver<String>,
    /// Every stderr line received so far, for assertions and failure messages.
    stderr_seen: Vec<String>,
}

impl Running {
    /// Starts `command` with stderr piped and stdin closed.
    pub fn start(mut command: Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, stderr_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            stderr_lines,
            stderr_seen: Vec::new(),
        }
    }

    /// Waits until a stderr line contains `needle`, and returns it.
    ///
    /// # Panics
    /// If `timeout` passes or stderr closes first, with everything stderr said.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no {needle:?} on stderr within {timeout:?}; stderr:\n{}",
                        self.stderr()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "stderr closed before {needle:?}; stderr:\n{}",
                        self.stderr()
                    )
                }
            }
        }
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), signal)
            .expect("cannot signal the child");
    }

    /// Sends SIGTERM and requires a clean exit (status 0) within [`STOP_TIMEOUT`].
    ///
    /// # Panics
    /// If the process does not exit in time or exits unsuccessfully, with its stderr.
    pub fn stop_cleanly(&mut self) {
        self.signal(Signal::TERM);
        let status = self.wait_exit(STOP_TIMEOUT);
        assert!(
            status.success(),
            "exit {status} after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits for the process to exit, killing it and panicking if `timeout` passes first.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot wait for the child") {
                self.drain_stderr();
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.drain_stderr();
                panic!("no exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(EXIT_POLL_INTERVAL);
        }
    }

    /// Everything read from stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr_seen.join("\n")
    }

    /// Collects what stderr said up to its close; call only once the process has exited.
    fn drain_stderr(&mut self) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        while let Ok(line) = self
            .stderr_lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.stderr_seen.push(line);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that failed half-way must not leave a node running.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How long [`http_exchange`] waits for a whole response.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The address a `silt-edge started` log line gives for the admin port (`admin=IP:PORT`), so
/// tests can bind port 0.
///
/// # Panics
/// If the line has no such field.
pub fn edge_admin_addr(started_line: &str) -> SocketAddr {
    started_line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("admin="))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no admin=IP:PORT in {started_line:?}"))
}

/// The address a `silt-edge started` log line gives for the MQTT listener (`mqtt=IP:PORT`), so
/// tests can bind port 0.
///
/// # Panics
/// If the line has no such field.
pub fn edge_mqtt_addr(started_line: &str) -> SocketAddr {
    started_line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("mqtt="))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no mqtt=IP:PORT in {started_line:?}"))
}

/// A response read by [`http_exchange`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// The status line and header fields, as sent.
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` as is to `addr` and reads the response until the server closes the
/// connection.
///
/// # Panics
/// If the connection fails, [`HTTP_TIMEOUT`] passes before the server closes, or the bytes
/// are not an HTTP/1.1 response.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let deadline = Instant::now() + HTTP_TIMEOUT;
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
    stream.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
    stream
        .write_all(request)
        .unwrap_or_else(|error| panic!("cannot send the request to {addr}: {error}"));
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no end of the response from {addr} within {HTTP_TIMEOUT:?}; got {:?}",
            String::from_utf8_lossy(&bytes)
        );
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => bytes.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => panic!(
                "reading the response from {addr} failed: {error}; got {:?}",
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    parse_http_response(&bytes)
}

fn parse_http_response(bytes: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(bytes);
    let head_len = bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the response head in {text:?}"));
    let head = String::from_utf8_lossy(&bytes[..head_len]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP/1.1 status line in {text:?}"));
    HttpResponse {
        status,
        head,
        body: bytes[head_len + 4..].to_vec(),
    }
}
