//! End-to-end tests of the edge node's admin port over real loopback sockets: `/health`,
//! `/metrics` with the log's numbers, refusals of bad requests, and a prompt stop while an
//! admin connection sits idle.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use silt_log::batch::{BatchSpec, Record, encode_batch};
use silt_log::{LogConfig, LogManager};
use silt_tests::{
    Running, START_TIMEOUT, STOP_TIMEOUT, Signal, command, edge_admin_addr, http_exchange,
    silt_edge,
};

/// The admin server gives a client this long to send its request head; a stop that waited
/// for an idle connection would take at least this long.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

fn start_edge(data_dir: &Path, extra: &[&str]) -> (Running, SocketAddr) {
    let mut edge = command(&silt_edge());
    edge.args(["--data-dir", data_dir.to_str().unwrap()])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info");
    let mut edge = Running::start(edge);
    let started = edge.wait_for_stderr("silt-edge started", START_TIMEOUT);
    let admin = edge_admin_addr(&started);
    assert!(admin.ip().is_loopback() && admin.port() != 0, "{started}");
    (edge, admin)
}

fn stop(mut edge: Running) {
    edge.stop_cleanly();
}

/// Topic `sensors` with two partitions and three records in partition 1; returns the bytes
/// the log holds.
fn write_fixture(data_dir: &Path) -> u64 {
    let log = LogManager::open(LogConfig::new(data_dir)).unwrap();
    log.create_topic("sensors", 2, &BTreeMap::new()).unwrap();
    let partition = log.partition("sensors", 1).unwrap();
    for values in [&["20.5", "20.7"][..], &["21.0"]] {
        let records: Vec<Record> = values
            .iter()
            .map(|value| Record {
                timestamp: 1_700_000_000_000,
                key: Some("room/1".into()),
                value: Some(value.as_bytes().to_vec().into()),
                headers: Vec::new(),
            })
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        partition.append(&mut batch).unwrap();
    }
    let used_bytes = log.disk_stats().used_bytes;
    assert!(used_bytes > 0);
    log.close().unwrap();
    used_bytes
}

#[test]
fn health_and_metrics_report_the_open_log() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let used_bytes = write_fixture(&data_dir);
    let (edge, admin) = start_edge(&data_dir, &["--set", "log.budget_bytes=64MiB"]);

    let health = http_exchange(admin, b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.text(), "ok\n");
    assert_eq!(health.header("connection"), Some("close"));

    let metrics = http_exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: edge\r\nAccept: text/plain\r\n\r\n",
    );
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(
        metrics.header("content-length"),
        Some(metrics.body.len().to_string().as_str())
    );
    let text = metrics.text();
    let lines: Vec<&str> = text.lines().collect();
    let expected = [
        "# TYPE silt_log_disk_used_bytes gauge".to_string(),
        format!("silt_log_disk_used_bytes {used_bytes}"),
        "silt_log_disk_budget_bytes{policy=\"reject\"} 67108864".to_string(),
        "# TYPE silt_log_dropped_segments_total counter".to_string(),
        "silt_log_dropped_segments_total 0".to_string(),
        "silt_log_dropped_bytes_total 0".to_string(),
        "silt_log_dropped_offsets_total 0".to_string(),
        "silt_log_rejected_appends_total 0".to_string(),
        "silt_log_topics 1".to_string(),
        "silt_log_partition_start_offset{topic=\"sensors\",partition=\"1\"} 0".to_string(),
        "silt_log_partition_end_offset{topic=\"sensors\",partition=\"1\"} 3".to_string(),
        format!("silt_log_partition_size_bytes{{topic=\"sensors\",partition=\"1\"}} {used_bytes}"),
        "silt_log_partition_end_offset{topic=\"sensors\",partition=\"0\"} 0".to_string(),
        "silt_log_partition_size_bytes{topic=\"sensors\",partition=\"0\"} 0".to_string(),
        format!(
            "silt_edge_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    ];
    for line in &expected {
        assert!(lines.contains(&line.as_str()), "no {line:?} in:\n{text}");
    }
    assert!(
        lines.iter().any(|line| line
            .starts_with("silt_log_partition_fsyncs_total{topic=\"sensors\",partition=\"1\"} ")),
        "{text}"
    );
    stop(edge);
}

#[test]
fn unknown_paths_other_methods_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (edge, admin) = start_edge(&dir.path().join("data"), &[]);

    let not_found = http_exchange(admin, b"GET /nope HTTP/1.1\r\n\r\n");
    assert_eq!(not_found.status, 404, "{not_found:?}");

    let post = http_exchange(admin, b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    let head = http_exchange(admin, b"HEAD /health HTTP/1.1\r\n\r\n");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-length"), Some("3"));
    assert!(head.body.is_empty());

    let garbage = http_exchange(admin, b"GARBAGE\r\n\r\n");
    assert_eq!(garbage.status, 400, "{garbage:?}");
    // Refused as soon as the first line ends, without waiting for the rest of a head.
    let binary = http_exchange(admin, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\n");
    assert_eq!(binary.status, 400, "{binary:?}");
    let http2 = http_exchange(admin, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    assert_eq!(http2.status, 505, "{http2:?}");

    // A head that never ends is refused at 8 KiB, long before the read timeout (which would
    // answer 408).
    let mut oversized = b"GET /health HTTP/1.1\r\nX-Filler: ".to_vec();
    oversized.resize(16 * 1024, b'a');
    let started = Instant::now();
    let refused = http_exchange(admin, &oversized);
    assert_eq!(refused.status, 431, "{refused:?}");
    assert!(started.elapsed() < ADMIN_HEAD_TIMEOUT);

    // None of that hurt the node.
    let health = http_exchange(admin, b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(health.status, 200, "{health:?}");
    stop(edge);
}

#[test]
fn sigterm_exits_promptly_with_idle_admin_connections_open() {
    let dir = tempfile::tempdir().unwrap();
    let (mut edge, admin) = start_edge(&dir.path().join("data"), &[]);
    let mut idle = TcpStream::connect(admin).unwrap();
    let mut half_sent = TcpStream::connect(admin).unwrap();
    half_sent
        .write_all(b"GET /health HTTP/1.1\r\nHost: ")
        .unwrap();
    // The server accepts in order, so once a later connection is answered, both are open
    // on the server's side.
    assert_eq!(
        http_exchange(admin, b"GET /health HTTP/1.1\r\n\r\n").status,
        200
    );

    let stopping = Instant::now();
    edge.signal(Signal::TERM);
    let status = edge.wait_exit(ADMIN_HEAD_TIMEOUT - Duration::from_secs(1));
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        edge.stderr()
    );
    assert!(stopping.elapsed() < ADMIN_HEAD_TIMEOUT);
    assert!(
        edge.stderr().contains("silt-edge stopped"),
        "{}",
        edge.stderr()
    );

    for stream in [&mut idle, &mut half_sent] {
        stream.set_read_timeout(Some(STOP_TIMEOUT)).unwrap();
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => {}
            Ok(read) => panic!("unexpected bytes {:?}", &buf[..read]),
            Err(error) => assert!(
                !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the connection outlived the node: {error}"
            ),
        }
    }
}

#[test]
fn an_admin_address_in_use_fails_the_start_naming_the_key() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = command(&silt_edge())
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--admin-listen", &addr])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on admin_listen {addr}")),
        "{stderr}"
    );
}
