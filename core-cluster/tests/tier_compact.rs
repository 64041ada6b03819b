//! Compaction in a running `silt-core`: a partition trickled into many small archive objects
//! (kcat producing a segment's worth at a time, offload at once) is compacted by the node's
//! offload loop into a few objects, counted by `silt_tier_compactions_total`, and kcat still
//! consumes every record from offset 0, the older ones served from the (compacted) archive once
//! local retention has deleted their segments.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SILT_CORE: &str = env!("CARGO_BIN_EXE_silt-core");
/// Long enough for offload and compaction on a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(90);
const TOPIC: &str = "trickle";

/// A running node, killed on drop.
struct Node {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    admin: SocketAddr,
    kafka: SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_field(line: &str, prefix: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(prefix))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}IP:PORT in {line:?}"))
}

fn start(data: &Path, objects: &Path) -> Node {
    let mut command = Command::new(SILT_CORE);
    command
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--kafka-listen", "127.0.0.1:0"])
        .args(["--uplink-listen", "127.0.0.1:0"])
        .args(["--object-store", &format!("file://{}", objects.display())]);
    for set in [
        "topic_defaults.segment.bytes=2048",
        "topic_defaults.local.retention.ms=0",
        "log.retention_check_ms=100",
        "tiering.max_wait_ms=0",
        "tiering.check_interval_ms=100",
        "tiering.object_bytes_target=262144",
        "tiering.compact_small_bytes=65536",
        "tiering.compact_min_age_ms=0",
    ] {
        command.args(["--set", set]);
    }
    command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let pipe = child.stderr.take().unwrap();
    let lines = Arc::clone(&stderr);
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let started = loop {
        if let Some(line) = stderr
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains("silt-core started"))
        {
            break line.clone();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("silt-core exited {status}: {:?}", stderr.lock().unwrap());
        }
        assert!(Instant::now() < deadline, "silt-core did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    Node {
        admin: addr_field(&started, "admin="),
        kafka: addr_field(&started, "kafka="),
        child,
        stderr,
    }
}

impl Node {
    /// The body of a GET of `path` on the admin port.
    fn get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.admin).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: core\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        match response.split_once("\r\n\r\n") {
            Some((_, body)) => body.to_string(),
            None => String::new(),
        }
    }

    fn metrics(&self) -> String {
        self.get("/metrics")
    }

    /// Partition 0's `local_start_offset` from the tier status.
    fn local_start_offset(&self) -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&self.get(&format!("/v1/tier/status/{TOPIC}"))).unwrap();
        status["partitions"][0]["local_start_offset"]
            .as_u64()
            .unwrap_or(0)
    }

    /// A per-partition metric of `TOPIC` partition 0; 0 while absent.
    fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter_map(|line| line.strip_prefix(name))
            .filter(|rest| {
                rest.starts_with('{')
                    && rest.contains(&format!("topic=\"{TOPIC}\""))
                    && rest.contains("partition=\"0\"")
            })
            .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
            .next()
            .unwrap_or(0.0)
    }

    fn wait_metric(&self, what: &str, done: impl Fn(&Node) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {TIMEOUT:?}; log tail {:?}",
                self.stderr
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn value(index: usize) -> String {
    format!("{{\"seq\":{index:06},\"pad\":\"{}\"}}", "p".repeat(200))
}

fn kcat(args: &[&str], input: &[u8]) -> String {
    let mut child = Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat is installed");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn a_trickled_partition_is_compacted_and_still_consumed_from_offset_0() {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    std::fs::create_dir_all(&objects).unwrap();
    let node = start(&dir.path().join("data"), &objects);
    let bootstrap = node.kafka.to_string();
    let rounds = 12;
    let per_round = 12;
    for round in 0..rounds {
        let uploads = node.metric("silt_tier_uploads_total");
        let lines: String = (round * per_round..(round + 1) * per_round)
            .map(|index| value(index) + "\n")
            .collect();
        kcat(
            &["-P", "-b", &bootstrap, "-t", TOPIC, "-p", "0"],
            lines.as_bytes(),
        );
        // A round's append (kcat may send it as one batch) rolls the segment holding the round
        // before, which is archived alone: a trickle of small objects.
        if round > 0 {
            node.wait_metric("an upload per round", |node| {
                node.metric("silt_tier_uploads_total") > uploads
            });
        }
    }
    let uploads = node.metric("silt_tier_uploads_total");
    assert!(uploads >= (rounds - 1) as f64, "{uploads} uploads");
    node.wait_metric("compaction down to a few objects", |node| {
        node.metric("silt_tier_compactions_total") >= 1.0
            && node.metric("silt_tier_archived_objects") <= 3.0
    });
    assert!(node.metric("silt_tier_compacted_objects_total") >= 2.0);
    assert!(node.metric("silt_tier_compacted_bytes_total") > 0.0);
    assert_eq!(node.metric("silt_tier_compaction_failures_total"), 0.0);

    // Local retention has deleted most archived segments: the consumer reads the archive.
    node.wait_metric("local segments gone", |node| {
        node.local_start_offset() > 100
    });

    let consumed = kcat(
        &[
            "-C",
            "-b",
            &bootstrap,
            "-t",
            TOPIC,
            "-p",
            "0",
            "-o",
            "beginning",
            "-e",
            "-q",
        ],
        b"",
    );
    let want: Vec<String> = (0..rounds * per_round).map(value).collect();
    let got: Vec<&str> = consumed.lines().collect();
    assert_eq!(got.len(), want.len(), "every record, once");
    assert!(got.iter().zip(&want).all(|(got, want)| got == want));
}
