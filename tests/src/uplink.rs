//! Uplink test helpers: a user-space UDP proxy that can blackhole the link or follow a core
//! to a new port, an edge wired to a core, numbered MQTT publishers, and the exactly-once
//! check of a core's log against what the edge acknowledged.
//!
//! # Layout
//! - [`UdpProxy`]: forwards datagrams between clients and a target; `set_blackhole(true)`
//!   drops everything both ways, `set_target` follows a restarted core.
//! - [`start_edge`]: `silt-edge` with MQTT and the uplink pointed at an address.
//! - [`publish_numbered`]: QoS 1 publishes `"<seq>"` to one MQTT topic, one at a time.
//! - [`wait_drained`]: waits until the edge reports no uplink lag after the last publish.
//! - [`check_exactly_once`]: every acknowledged message exactly once, in order per key.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::core::{Core, field_addr};
use crate::mqtt::dump::DumpRecord;
use crate::mqtt::{Client, ClientOptions, MqttBroker, Version, metric_value};

/// How long a socket read in the proxy blocks before it looks at its flags.
const PROXY_POLL: Duration = Duration::from_millis(20);
/// Largest datagram forwarded (QUIC's are at most about 1,500 bytes on loopback paths).
const DATAGRAM_BYTES_MAX: usize = 65_536;

/// A UDP proxy on loopback, shared between the test and its forwarding threads.
#[derive(Debug)]
pub struct UdpProxy {
    pub addr: SocketAddr,
    shared: Arc<ProxyShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct ProxyShared {
    target: Mutex<SocketAddr>,
    blackhole: AtomicBool,
    stop: AtomicBool,
    /// Bumped by `set_target`, so upstream sockets for the old target retire.
    generation: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
}

impl UdpProxy {
    /// Starts forwarding from a fresh loopback port to `target`.
    pub fn start(target: SocketAddr) -> UdpProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("cannot bind the proxy");
        front.set_read_timeout(Some(PROXY_POLL)).unwrap();
        let addr = front.local_addr().unwrap();
        let shared = Arc::new(ProxyShared {
            target: Mutex::new(target),
            blackhole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            generation: Default::default(),
            dropped: Default::default(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || front_loop(Arc::new(front), &shared))
        };
        UdpProxy {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// Drops every datagram both ways while `on`.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Forwards to `target` from now on (a core restarted on another port).
    pub fn set_target(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap() = target;
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Datagrams dropped by the blackhole so far.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Upstream {
    socket: Arc<UdpSocket>,
    generation: u64,
    alive: Arc<AtomicBool>,
}

fn front_loop(front: Arc<UdpSocket>, shared: &Arc<ProxyShared>) {
    let mut upstreams: HashMap<SocketAddr, Upstream> = HashMap::new();
    let mut threads = Vec::new();
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    while !shared.stop.load(Ordering::SeqCst) {
        let (len, client) = match front.recv_from(&mut buf) {
            Ok(received) => received,
            Err(_) => continue,
        };
        if shared.blackhole.load(Ordering::SeqCst) {
            shared.dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let generation = shared.generation.load(Ordering::SeqCst);
        let stale = upstreams
            .get(&client)
            .is_none_or(|upstream| upstream.generation != generation);
        if stale {
            if let Some(old) = upstreams.remove(&client) {
                old.alive.store(false, Ordering::SeqCst);
            }
            let target = *shared.target.lock().unwrap();
            let socket = UdpSocket::bind("127.0.0.1:0").expect("cannot bind an upstream socket");
            socket
                .connect(target)
                .expect("cannot aim the upstream socket");
            socket.set_read_timeout(Some(PROXY_POLL)).unwrap();
            let socket = Arc::new(socket);
            let alive = Arc::new(AtomicBool::new(true));
            let (reply_socket, reply_front, reply_alive, reply_shared) =
                (socket.clone(), front.clone(), alive.clone(), shared.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
                while reply_alive.load(Ordering::SeqCst)
                    && !reply_shared.stop.load(Ordering::SeqCst)
                {
                    let Ok(len) = reply_socket.recv(&mut buf) else {
                        continue;
                    };
                    if reply_shared.blackhole.load(Ordering::SeqCst) {
                        reply_shared.dropped.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    let _ = reply_front.send_to(&buf[..len], client);
                }
            }));
            upstreams.insert(
                client,
                Upstream {
                    socket,
                    generation,
                    alive,
                },
            );
        }
        let upstream = &upstreams[&client];
        let _ = upstream.socket.send(&buf[..len]);
    }
    for upstream in upstreams.values() {
        upstream.alive.store(false, Ordering::SeqCst);
    }
    for thread in threads {
        let _ = thread.join();
    }
}

/// The development CA a core started on `core_data_dir` created.
pub fn core_ca(core_data_dir: &Path) -> PathBuf {
    core_data_dir.join("tls").join("ca.pem")
}

/// A `silt-core` on `<dir>/core` started with `core_args`, a [`UdpProxy`] in front of its
/// uplink port, and a `silt-edge` `edge_id` on `<dir>/edge` shipping to the core through the
/// proxy: what the uplink fault tests start from.
pub fn start_core_behind_proxy_with_edge(
    dir: &Path,
    core_args: &[&str],
    edge_id: &str,
) -> (Core, UdpProxy, MqttBroker) {
    let core_dir = dir.join("core");
    let core = Core::start(&core_dir, core_args);
    let proxy = UdpProxy::start(field_addr(&core.started_line, "uplink="));
    let edge = start_edge(
        &dir.join("edge"),
        edge_id,
        proxy.addr,
        &core_ca(&core_dir),
        &[],
    );
    (core, proxy, edge)
}

/// Starts `silt-edge` as `edge_id` on `data_dir` with MQTT on a free port and its uplink
/// aimed at `uplink` (trusting `ca`), plus `sets`.
pub fn start_edge(
    data_dir: &Path,
    edge_id: &str,
    uplink: SocketAddr,
    ca: &Path,
    sets: &[(&str, &str)],
) -> MqttBroker {
    let uplink = uplink.to_string();
    let ca = ca.to_str().expect("a UTF-8 path");
    let mut all = vec![
        ("node_id", edge_id),
        ("uplink.addr", uplink.as_str()),
        ("uplink.ca", ca),
        ("uplink.server_name", "localhost"),
    ];
    all.extend_from_slice(sets);
    MqttBroker::start_silt(data_dir, &all)
}

/// Publishers started by [`start_publishers`]: each yields its topic, the sequence numbers
/// acknowledged, and how many it published.
pub type Publishers = Vec<tokio::task::JoinHandle<(String, Vec<u64>, u64)>>;

/// Starts one publisher per client `0..clients`, each publishing `"<seq>"` for `seq` in
/// `from..to` to `sensor/<client>` as client `<name>-<client>-<from>` (see
/// [`publish_numbered`]).
pub fn start_publishers(
    mqtt: SocketAddr,
    name: &str,
    clients: usize,
    from: u64,
    to: u64,
) -> Publishers {
    (0..clients)
        .map(|client| {
            let topic = format!("sensor/{client}");
            let client_id = format!("{name}-{client}-{from}");
            tokio::spawn(async move {
                let values = publish_numbered(mqtt, &client_id, &topic, from, to).await;
                (topic, values, to - from)
            })
        })
        .collect()
}

/// Waits for `publishers`, requiring every message acknowledged, and adds what each topic got
/// acknowledged to `acked`.
pub async fn collect_acked(publishers: Publishers, acked: &mut HashMap<String, Vec<u64>>) {
    for task in publishers {
        let (topic, values, published) = task.await.expect("a publisher panicked");
        assert_eq!(
            values.len() as u64,
            published,
            "{topic}: the edge must ack everything"
        );
        acked.entry(topic).or_default().extend(values);
    }
}

/// Publishes `"<seq>"` for `seq` in `from..to` at QoS 1 to `topic`, one at a time, and
/// returns the sequence numbers acknowledged; stops at the first publish that gets no
/// acknowledgement (the broker went away).
pub async fn publish_numbered(
    addr: SocketAddr,
    client_id: &str,
    topic: &str,
    from: u64,
    to: u64,
) -> Vec<u64> {
    let Ok(mut client) =
        Client::try_connect(Version::V5, addr, ClientOptions::new(client_id)).await
    else {
        return Vec::new();
    };
    let mut acked = Vec::new();
    for seq in from..to {
        client.publish(topic, 1, false, seq.to_string()).await;
        match client.await_ack(1, Duration::from_secs(5)).await {
            Some(0) => acked.push(seq),
            _ => break,
        }
    }
    acked
}

/// The sum of a labelled metric over every series, or 0.
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the edge reports zero uplink lag on every partition in a metrics refresh that
/// happened after this call (the gauges refresh every second; the caller's publishes are all
/// acknowledged, hence in the log, before it calls).
///
/// # Panics
/// If the lag is not zero within `timeout`.
pub fn wait_drained(edge: &MqttBroker, timeout: Duration) -> Duration {
    /// Longer than the edge's gauge refresh interval, so a zero read is not from before.
    const REFRESH: Duration = Duration::from_millis(1500);
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        let metrics = edge.metrics();
        let lag = metric_sum(&metrics, "silt_uplink_lag_records");
        let connected = metric_value(&metrics, "silt_uplink_connected", &[]).unwrap_or(0.0);
        if start.elapsed() >= REFRESH && lag == 0.0 && connected == 1.0 {
            return start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "uplink lag still {lag} records (connected={connected}) after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks the core's records of `topic` against the publishers' acknowledgements: each
/// `(key, value)` appears at most once, every acknowledged one exactly once, values of a key
/// in increasing order, and every record names `edge_id`. Returns the record count.
///
/// # Panics
/// On the first violation.
pub fn check_exactly_once(
    records: &[DumpRecord],
    edge_id: &str,
    acked: &HashMap<String, Vec<u64>>,
) -> usize {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, u64> = HashMap::new();
    for record in records {
        let key = record.key.as_deref().expect("every MQTT record has a key");
        let value: u64 = record
            .value
            .as_deref()
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("not a numbered record: {record:?}"));
        assert!(
            seen.insert((key.to_string(), value)),
            "duplicate in the core: key {key} value {value} (offset {} of partition {})",
            record.offset,
            record.partition
        );
        if let Some(previous) = last.insert(key, value) {
            assert!(
                previous < value,
                "key {key}: {value} after {previous}: order per key broken"
            );
        }
        assert_eq!(record.header("silt.edge"), Some(edge_id), "{record:?}");
        assert!(record.header("silt.edge.offset").is_some(), "{record:?}");
    }
    for (key, values) in acked {
        for value in values {
            assert!(
                seen.contains(&(key.clone(), *value)),
                "acknowledged message {key}={value} is missing from the core"
            );
        }
    }
    seen.len()
}
