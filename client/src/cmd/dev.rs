//! `silt dev`: a whole Silt on this machine. It starts a core (`silt-core`: Kafka protocol, the
//! uplink server, a local directory as the object store) and an edge (`silt-edge`: MQTT with
//! anonymous access, shipping to the core), prints the endpoints and a line to try, and stops
//! both cleanly on Ctrl-C.
//!
//! The two nodes are the real binaries, found next to `silt`, run as child processes with their
//! logs in the data directory: what a newcomer sees is what a deployment does. Each runs in a
//! process group of its own, so Ctrl-C reaches `silt dev` alone and the stop is ordered: the
//! edge first (its uplink ends, nothing left in flight), then the core.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Args;
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::KafkaError;

/// How long a node may take to become healthy (recovery of a large data directory included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Kafka's TOPIC_ALREADY_EXISTS.
const TOPIC_ALREADY_EXISTS: i16 = 36;
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Where the edge, the core and the object store keep their data.
    #[arg(long, default_value = "silt-dev")]
    data_dir: PathBuf,
    /// The edge's MQTT listener.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// The core's Kafka-protocol listener.
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_listen: SocketAddr,
    /// The core's uplink listener (QUIC over UDP).
    #[arg(long, default_value = "127.0.0.1:9093")]
    uplink_listen: SocketAddr,
    /// The core's admin port (/metrics, /health).
    #[arg(long, default_value = "127.0.0.1:9645")]
    core_admin_listen: SocketAddr,
    /// The edge's admin port (/metrics, /health).
    #[arg(long, default_value = "127.0.0.1:9644")]
    edge_admin_listen: SocketAddr,
    /// Extra core settings, `KEY=VALUE` as `silt-core --set` takes them, applied after the dev
    /// defaults (e.g. `--core-set topic_defaults.segment.ms=5000` for a faster archive).
    #[arg(long = "core-set", value_name = "KEY=VALUE")]
    core_set: Vec<String>,
}

/// One child node.
struct Node {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// The core's `--set`s that make tiering visible in minutes (see `run`).
const DEV_TIERING: &[&str] = &[
    "topic_defaults.segment.ms=60000",
    "topic_defaults.segment.bytes=1048576",
    "topic_defaults.local.retention.ms=300000",
    "tiering.max_wait_ms=60000",
    "tiering.check_interval_ms=5000",
    "log.retention_check_ms=10000",
];

/// A DuckDB query over the archive in place, Hive keys (`topic`, `partition`, `date`) as
/// columns. `offset` is an SQL keyword, so it is qualified (`p.offset`) rather than quoted,
/// which keeps the query free of double quotes for the shell.
fn duckdb_query(objects: &Path) -> String {
    format!(
        "SELECT p.offset, p.timestamp, decode(p.key) AS key, decode(p.value) AS value, p.topic, p.partition FROM read_parquet('{}/v1/**/*.parquet', hive_partitioning=true) p ORDER BY p.offset LIMIT 10",
        objects.display()
    )
}

/// A shell line that runs [`duckdb_query`]: with the `duckdb` CLI when it is on `PATH`,
/// otherwise with Python's `duckdb` package (`pip install duckdb`), which is where most
/// people get DuckDB.
fn duckdb_command(objects: &Path, cli_on_path: bool) -> String {
    let query = duckdb_query(objects);
    if cli_on_path {
        format!("duckdb -c \"{query}\"")
    } else {
        format!("python3 -c \"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"")
    }
}

/// Whether an executable `name` is in a directory of `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
    })
}

/// Fails with a clear message if `addr` is already taken (by another `silt dev`, a Kafka, a
/// Mosquitto...). Without this, a node's `/health` probe could be answered by the process
/// that holds the port, and `silt dev` would report itself running against someone else.
fn ensure_free(addr: SocketAddr, flag: &str, udp: bool) -> Result<(), KafkaError> {
    let taken = if udp {
        std::net::UdpSocket::bind(addr).err()
    } else {
        std::net::TcpListener::bind(addr).err()
    };
    match taken {
        None => Ok(()),
        Some(error) => Err(KafkaError::Unsupported(format!(
            "cannot use {addr} ({}, {flag}): {error}; is another silt dev, Kafka or MQTT broker running? Stop it or pass {flag} ADDR",
            if udp { "UDP" } else { "TCP" }
        ))),
    }
}

pub(crate) async fn run(args: DevArgs) -> Result<(), KafkaError> {
    let failed = |what: String| KafkaError::Unsupported(what);
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .ok_or_else(|| failed("cannot find the directory of the silt executable".into()))?;
    let core_bin = sibling(&bin_dir, "silt-core")?;
    for (addr, flag, udp) in [
        (args.mqtt_listen, "--mqtt-listen", false),
        (args.kafka_listen, "--kafka-listen", false),
        (args.uplink_listen, "--uplink-listen", true),
        (args.core_admin_listen, "--core-admin-listen", false),
        (args.edge_admin_listen, "--edge-admin-listen", false),
    ] {
        ensure_free(addr, flag, udp)?;
    }
    let edge_bin = sibling(&bin_dir, "silt-edge")?;
    std::fs::create_dir_all(&args.data_dir).map_err(|error| {
        failed(format!(
            "cannot create {}: {error}",
            args.data_dir.display()
        ))
    })?;
    let data_dir = args.data_dir.canonicalize().map_err(|error| {
        failed(format!(
            "cannot resolve {}: {error}",
            args.data_dir.display()
        ))
    })?;
    let objects = data_dir.join("objects");
    std::fs::create_dir_all(&objects)
        .map_err(|error| failed(format!("cannot create {}: {error}", objects.display())))?;
    let core_dir = data_dir.join("core");
    // The core's development CA and certificates, which the edge trusts.
    let tls_dir = data_dir.join("tls");
    let edge_dir = data_dir.join("edge");

    let mut core_command = Command::new(&core_bin);
    core_command
        .arg("--data-dir")
        .arg(&core_dir)
        .arg("--kafka-listen")
        .arg(args.kafka_listen.to_string())
        .arg("--uplink-listen")
        .arg(args.uplink_listen.to_string())
        .arg("--admin-listen")
        .arg(args.core_admin_listen.to_string())
        .arg("--object-store")
        .arg(format!("file://{}", objects.display()))
        .arg("--set")
        .arg(format!("uplink.tls_dir={}", tls_dir.display()));
    // A short hot tier, so a newcomer sees Parquet files within minutes: segments close
    // every minute (or at 1 MiB), are archived as soon as they close, and stay on local disk
    // five minutes after that.
    for setting in DEV_TIERING
        .iter()
        .copied()
        .chain(args.core_set.iter().map(String::as_str))
    {
        core_command.arg("--set").arg(setting);
    }
    let mut core = spawn("core", core_command, &data_dir)?;
    if let Err(error) = wait_healthy(&mut core, args.core_admin_listen).await {
        stop(core).await;
        return Err(error);
    }
    // The topic the edge ships MQTT messages to exists from the start, so a consumer can
    // subscribe before the first message arrives.
    if let Err(error) = create_mqtt_topic(args.kafka_listen).await {
        stop(core).await;
        return Err(error);
    }
    let ca = tls_dir.join("ca.pem");
    let mut edge_command = Command::new(&edge_bin);
    edge_command
        .arg("--data-dir")
        .arg(&edge_dir)
        .arg("--mqtt-listen")
        .arg(args.mqtt_listen.to_string())
        .arg("--admin-listen")
        .arg(args.edge_admin_listen.to_string())
        .arg("--uplink")
        .arg(args.uplink_listen.to_string())
        .arg("--uplink-ca")
        .arg(&ca)
        .arg("--set")
        .arg("mqtt.allow_anonymous=true");
    let mut edge = match spawn("edge", edge_command, &data_dir) {
        Ok(edge) => edge,
        Err(error) => {
            stop(core).await;
            return Err(error);
        }
    };
    if let Err(error) = wait_healthy(&mut edge, args.edge_admin_listen).await {
        stop(edge).await;
        stop(core).await;
        return Err(error);
    }

    println!("Silt dev is running. Data: {}", data_dir.display());
    println!(
        "  MQTT    {}  (edge, anonymous; every publish goes to log topic \"mqtt\")",
        args.mqtt_listen
    );
    println!(
        "  Kafka   {}  (core; the edge ships topic \"mqtt\" here)",
        args.kafka_listen
    );
    println!("  uplink  {}  (QUIC, edge -> core)", args.uplink_listen);
    println!(
        "  objects file://{}  (Parquet: the first file about two minutes after the first message)",
        objects.display()
    );
    println!(
        "  metrics http://{}/metrics (core), http://{}/metrics (edge)",
        args.core_admin_listen, args.edge_admin_listen
    );
    println!("  logs    {}, {}", core.log.display(), edge.log.display());
    println!("Try this:");
    println!(
        "  mosquitto_pub -h {} -p {} -q 1 -t sensors/room1 -m '{{\"temp\":21.5}}' && kcat -b {} -C -t mqtt -o beginning",
        args.mqtt_listen.ip(),
        args.mqtt_listen.port(),
        args.kafka_listen
    );
    println!(
        "  (kcat keeps following the topic: publish more from another terminal; Ctrl-C ends it)"
    );
    // The `silt` as it was typed (`./target/release/silt` from the README), so the line
    // works before `silt` is on PATH.
    let silt = std::env::args().next().unwrap_or_else(|| "silt".into());
    println!(
        "  {silt} tier status --admin {} --topic mqtt  (archived objects, upload lag)",
        args.core_admin_listen
    );
    let duckdb_cli = on_path("duckdb");
    println!("  {}", duckdb_command(&objects, duckdb_cli));
    if !duckdb_cli {
        println!("  (needs DuckDB for Python: pip install duckdb)");
    }
    println!("Ctrl-C stops both nodes.");
    eprintln!(
        "silt: dev is running (mqtt={} kafka={})",
        args.mqtt_listen, args.kafka_listen
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| failed(format!("cannot watch SIGTERM: {error}")))?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
        status = core.child.wait() => Err(exited("core", status, &core.log)),
        status = edge.child.wait() => Err(exited("edge", status, &edge.log)),
    };
    eprintln!("silt: stopping the edge, then the core");
    stop(edge).await;
    stop(core).await;
    outcome
}

async fn create_mqtt_topic(kafka: SocketAddr) -> Result<(), KafkaError> {
    let mut cluster =
        crate::kafka::Cluster::connect(&kafka.to_string(), Duration::from_secs(30)).await?;
    match super::topic::create_topic(&mut cluster, "mqtt", -1, -1, &[]).await {
        Err(error) if error.code() == Some(TOPIC_ALREADY_EXISTS) => Ok(()),
        other => other,
    }
}

fn sibling(dir: &Path, name: &str) -> Result<PathBuf, KafkaError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(KafkaError::Unsupported(format!(
            "silt dev runs {name}, which is not next to silt in {}; build every binary with `cargo build --release`",
            dir.display()
        )))
    }
}

fn spawn(name: &'static str, mut command: Command, data_dir: &Path) -> Result<Node, KafkaError> {
    let log = data_dir.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|error| {
            KafkaError::Unsupported(format!("cannot open {}: {error}", log.display()))
        })?;
    let stderr = file.try_clone().map_err(|error| {
        KafkaError::Unsupported(format!("cannot open {}: {error}", log.display()))
    })?;
    command
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(stderr)
        // Each node in a process group of its own: a terminal's Ctrl-C (SIGINT to the
        // foreground group) then reaches only `silt dev`, which stops the edge before the
        // core, instead of reaching all three at once.
        .process_group(0)
        // If `silt dev` itself dies, do not leave the nodes running.
        .kill_on_drop(true);
    let child = command
        .spawn()
        .map_err(|error| KafkaError::Unsupported(format!("cannot start the {name}: {error}")))?;
    Ok(Node { name, child, log })
}

/// Waits until the node's `/health` answers 200, or fails with the end of its log if it exits.
async fn wait_healthy(node: &mut Node, admin: SocketAddr) -> Result<(), KafkaError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(exited(node.name, Ok(status), &node.log));
        }
        if health(admin).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(KafkaError::Timeout(format!(
                "waiting for the {} to become healthy on {admin}; see {}",
                node.name,
                node.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `GET /health` on `admin` answers 200.
async fn health(admin: SocketAddr) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: silt\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn exited(name: &str, status: std::io::Result<std::process::ExitStatus>, log: &Path) -> KafkaError {
    let status = match status {
        Ok(status) => status.to_string(),
        Err(error) => error.to_string(),
    };
    let tail = std::fs::read_to_string(log)
        .map(|text| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        })
        .unwrap_or_default();
    KafkaError::Unsupported(format!(
        "the {name} exited ({status}); the end of {}:\n{tail}",
        log.display()
    ))
}

/// SIGTERM, then SIGKILL if the node has not stopped in time.
async fn stop(mut node: Node) {
    if let Some(pid) = node.child.id().and_then(|id| Pid::from_raw(id as i32)) {
        let _ = kill_process(pid, Signal::TERM);
    }
    match tokio::time::timeout(STOP_TIMEOUT, node.child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!(
                "silt: the {} did not stop in {STOP_TIMEOUT:?}; killing it",
                node.name
            );
            let _ = node.child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_duckdb_lines_glob_the_hive_tree_without_double_quotes_in_the_query() {
        let objects = Path::new("/tmp/silt-dev/objects");
        let query = duckdb_query(objects);
        assert!(
            query.contains(
                "read_parquet('/tmp/silt-dev/objects/v1/**/*.parquet', hive_partitioning=true) p"
            ),
            "{query}"
        );
        assert!(!query.contains('"'), "{query}");
        assert_eq!(
            duckdb_command(objects, true),
            format!("duckdb -c \"{query}\"")
        );
        assert_eq!(
            duckdb_command(objects, false),
            format!("python3 -c \"import duckdb; duckdb.sql(\\\"{query}\\\").show()\"")
        );
    }

    #[test]
    fn a_taken_port_is_refused_with_the_flag_to_change_it() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let error = ensure_free(addr, "--kafka-listen", false)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&addr.to_string()), "{error}");
        assert!(error.contains("--kafka-listen"), "{error}");
        drop(held);
        ensure_free(addr, "--kafka-listen", false).unwrap();
    }
}
