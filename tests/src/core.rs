//! The `silt-core` binary under test: started on free ports (port 0, read back from its
//! `silt-core started` line), with its admin `/health` answering before it is handed over.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Running, START_TIMEOUT, command, http_exchange, silt_core};

/// A running `silt-core` and its listeners' real addresses.
#[derive(Debug)]
pub struct Core {
    pub process: Running,
    pub admin: SocketAddr,
    pub kafka: SocketAddr,
    pub data_dir: PathBuf,
    /// The `silt-core started` line.
    pub started_line: String,
}

impl Core {
    /// Starts `silt-core` on `data_dir` with every listener on a free loopback port, plus
    /// `extra` arguments, and waits until `/health` says `ok`.
    ///
    /// # Panics
    /// If it does not start and turn healthy within [`START_TIMEOUT`].
    pub fn start(data_dir: &Path, extra: &[&str]) -> Core {
        Core::start_with_env(data_dir, extra, &[])
    }

    /// [`Core::start`] with environment variables added (e.g. an object store's `AWS_*`).
    ///
    /// # Panics
    /// As [`Core::start`].
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(String, String)]) -> Core {
        let mut core = command(&silt_core());
        core.args(["--data-dir", data_dir.to_str().expect("a UTF-8 path")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--kafka-listen", "127.0.0.1:0"])
            .args(["--uplink-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(name, value)| (name, value)));
        let mut process = Running::start(core);
        let started_line = process.wait_for_stderr("silt-core started", START_TIMEOUT);
        let admin = field_addr(&started_line, "admin=");
        let kafka = field_addr(&started_line, "kafka=");
        wait_healthy(admin, START_TIMEOUT);
        Core {
            process,
            admin,
            kafka,
            data_dir: data_dir.to_path_buf(),
            started_line,
        }
    }

    /// SIGTERM, and a clean exit required.
    pub fn stop(mut self) {
        self.process.stop_cleanly();
    }

    /// SIGKILL, waiting for the process to be gone.
    pub fn kill(mut self) {
        self.process.signal(crate::Signal::KILL);
        self.process.wait_exit(crate::STOP_TIMEOUT);
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        let response = http_exchange(self.admin, b"GET /metrics HTTP/1.1\r\nHost: core\r\n\r\n");
        assert_eq!(response.status, 200, "{response:?}");
        response.text()
    }

    /// `silt tier status --json` of `topic`, as the CLI prints it.
    pub fn tier_status(&self, topic: &str) -> serde_json::Value {
        let admin = self.admin.to_string();
        let out = crate::cli::silt_ok(
            &[
                "tier", "status", "--admin", &admin, "--topic", topic, "--json",
            ],
            b"",
        );
        serde_json::from_str(&out).unwrap_or_else(|error| panic!("{error}: {out}"))
    }
}

/// A JSON object's field as a number.
///
/// # Panics
/// If the field is missing or not a non-negative integer.
pub fn json_u64(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

/// The address in the `NAME=IP:PORT` field of a log line.
///
/// # Panics
/// If the line has no such field.
pub fn field_addr(line: &str, prefix: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(prefix))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}IP:PORT in {line:?}"))
}

/// Waits until `GET /health` on `admin` answers 200.
///
/// # Panics
/// If it does not within `timeout`.
pub fn wait_healthy(admin: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let response = http_exchange(admin, b"GET /health HTTP/1.1\r\nHost: core\r\n\r\n");
        if response.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/health still {} after {timeout:?}",
            response.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
