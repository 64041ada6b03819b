//! What a QoS 2 flow promises, tested with the node's own death: clients with persistent
//! sessions publish QoS 2 while `silt-edge` is killed with SIGKILL; after a restart each
//! resumes its session and sends again what was unfinished (PUBLISH with DUP set for those
//! without PUBREC, PUBREL for the others), as MQTT §4.4 asks. Every message must then be in the
//! log exactly once: a message stored before the kill is not stored again when it comes back
//! with DUP, whether or not its PUBREC made it out, and one that was not stored is stored now.
//!
//! Every fourth PUBREC (up to [`SWALLOWED_MAX`] open at once) is swallowed: the client acts as
//! if it had been lost with the connection, and sends that PUBLISH again after the restart.
//! Those are the messages a broker without durable QoS 2 state would store twice.
//!
//! Raw packets, so that the test controls packet ids and DUP re-sends exactly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::raw::{self, Connect, Packet, RawConn};
use silt_tests::mqtt::{MQTT_TIMEOUT, MqttBroker, Version, skip_unless_silt};
use tokio::time::Instant;

/// Clients publishing at once.
const CLIENTS: usize = 4;
/// QoS 2 publishes each keeps unfinished.
const WINDOW: usize = 8;
/// PUBRECs a client ignores (and leaves open until the restart) at most.
const SWALLOWED_MAX: usize = 16;
/// Completed flows (PUBCOMPs over all clients) before the kill.
const COMPLETED_BEFORE_KILL: u64 = 300;
/// How long the clients may take to get there.
const INGEST_TIMEOUT: Duration = Duration::from_secs(60);

const PUBREC: u8 = 5;
const PUBCOMP: u8 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, no PUBREC yet.
    Published,
    /// PUBREC received, PUBREL sent.
    Released,
    /// PUBREC received and ignored, as if lost: PUBLISH goes again after the restart.
    Swallowed,
}

/// One client's QoS 2 flows, by packet id.
#[derive(Debug)]
struct Publisher {
    version: Version,
    client_id: String,
    next_sequence: u64,
    unfinished: BTreeMap<u16, (u64, Stage)>,
}

impl Publisher {
    fn topic(&self) -> String {
        format!("qos2/{}", self.client_id)
    }

    fn packet_id(sequence: u64) -> u16 {
        (sequence % 10_000) as u16 + 1
    }

    fn publish_bytes(&self, packet_id: u16, sequence: u64, dup: bool) -> Vec<u8> {
        let payload = format!("{}:{sequence}", self.client_id);
        let mut bytes = raw::publish(
            self.version,
            &self.topic(),
            2,
            Some(packet_id),
            payload.as_bytes(),
        );
        if dup {
            bytes[0] |= 0x08;
        }
        bytes
    }

    fn connect(&self) -> Connect {
        Connect {
            clean: false,
            session_expiry_secs: (self.version == Version::V5).then_some(3600),
            ..Connect::new(self.version, &self.client_id)
        }
    }

    fn swallowed(&self) -> usize {
        self.unfinished
            .values()
            .filter(|(_, stage)| *stage == Stage::Swallowed)
            .count()
    }

    /// Handles one acknowledgement; returns true when it completed a flow. `swallow` lets it
    /// ignore a PUBREC now and then.
    async fn on_packet(&mut self, conn: &mut RawConn, packet: &Packet, swallow: bool) -> bool {
        let packet_id = packet_id_of(packet);
        match packet.kind() {
            PUBREC => {
                if self.version == Version::V5 {
                    let reason = packet.body.get(2).copied().unwrap_or(0);
                    assert!(reason < 0x80, "{}: PUBREC {reason:#04x}", self.client_id);
                }
                let swallowed = self.swallowed();
                let flow = self.unfinished.get_mut(&packet_id).unwrap_or_else(|| {
                    panic!("{}: PUBREC for unknown id {packet_id}", self.client_id)
                });
                if swallow
                    && flow.1 == Stage::Published
                    && flow.0.is_multiple_of(4)
                    && swallowed < SWALLOWED_MAX
                {
                    flow.1 = Stage::Swallowed;
                    return false;
                }
                flow.1 = Stage::Released;
                conn.send(&pubrel(packet_id)).await;
                false
            }
            PUBCOMP => {
                let flow = self.unfinished.remove(&packet_id);
                assert!(
                    matches!(flow, Some((_, Stage::Released))),
                    "{}: PUBCOMP for id {packet_id} in {flow:?}",
                    self.client_id
                );
                true
            }
            other => panic!("{}: unexpected packet type {other}", self.client_id),
        }
    }

    /// Publishes until the connection dies, keeping [`WINDOW`] flows open.
    async fn run_until_killed(mut self, addr: SocketAddr, completed: Arc<AtomicU64>) -> Self {
        let mut conn = RawConn::connected(addr, &self.connect()).await;
        loop {
            while self.unfinished.len() - self.swallowed() < WINDOW {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                let packet_id = Self::packet_id(sequence);
                self.unfinished
                    .insert(packet_id, (sequence, Stage::Published));
                conn.send(&self.publish_bytes(packet_id, sequence, false))
                    .await;
            }
            let Some(packet) = conn.read_packet(MQTT_TIMEOUT).await else {
                return self;
            };
            if self.on_packet(&mut conn, &packet, true).await {
                completed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Resumes the session on the restarted broker and finishes every open flow.
    async fn finish(mut self, addr: SocketAddr) -> Self {
        let mut conn = RawConn::open(addr).await;
        conn.send(&self.connect().encode()).await;
        let connack = conn.read_packet(MQTT_TIMEOUT).await.expect("no CONNACK");
        assert_eq!(connack.connack_code(), Some(0), "{connack:?}");
        assert_eq!(
            connack.body[0] & 1,
            1,
            "{}: the session did not survive the kill",
            self.client_id
        );
        let mut flows: Vec<(u64, u16, Stage)> = self
            .unfinished
            .iter()
            .map(|(&packet_id, &(sequence, stage))| (sequence, packet_id, stage))
            .collect();
        flows.sort_by_key(|&(sequence, _, _)| sequence);
        for (sequence, packet_id, stage) in flows {
            match stage {
                Stage::Published | Stage::Swallowed => {
                    conn.send(&self.publish_bytes(packet_id, sequence, true))
                        .await
                }
                Stage::Released => conn.send(&pubrel(packet_id)).await,
            }
        }
        let deadline = Instant::now() + MQTT_TIMEOUT;
        while !self.unfinished.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let packet = conn.read_packet(left).await.unwrap_or_else(|| {
                panic!(
                    "{}: flows left unfinished after the restart: {:?}",
                    self.client_id, self.unfinished
                )
            });
            self.on_packet(&mut conn, &packet, false).await;
        }
        conn.send(&raw::DISCONNECT).await;
        conn.expect_closed(MQTT_TIMEOUT).await;
        self
    }
}

fn packet_id_of(packet: &Packet) -> u16 {
    assert!(packet.body.len() >= 2, "{packet:?}");
    u16::from_be_bytes([packet.body[0], packet.body[1]])
}

fn pubrel(packet_id: u16) -> Vec<u8> {
    raw::packet(0x62, &packet_id.to_be_bytes())
}

async fn kill9_during_qos2_ingest(version: Version) {
    if !skip_unless_silt("kill9_during_qos2_ingest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut broker = tokio::task::block_in_place(|| MqttBroker::start_silt(&data, &[]));
    let completed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for index in 0..CLIENTS {
        let publisher = Publisher {
            version,
            client_id: format!("qos2-{version:?}-{index}").to_lowercase(),
            next_sequence: 0,
            unfinished: BTreeMap::new(),
        };
        tasks.push(tokio::spawn(
            publisher.run_until_killed(broker.mqtt, completed.clone()),
        ));
    }
    let deadline = Instant::now() + INGEST_TIMEOUT;
    while completed.load(Ordering::Relaxed) < COMPLETED_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "only {} QoS 2 flows completed within {INGEST_TIMEOUT:?}",
            completed.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::task::block_in_place(|| broker.kill());
    let mut publishers = Vec::new();
    for task in tasks {
        let publisher = tokio::time::timeout(MQTT_TIMEOUT, task)
            .await
            .expect("a publisher outlived the broker")
            .expect("a publisher panicked");
        publishers.push(publisher);
    }
    let open: usize = publishers.iter().map(|p| p.unfinished.len()).sum();
    let count = |wanted: Stage| {
        publishers
            .iter()
            .flat_map(|p| p.unfinished.values())
            .filter(|(_, stage)| *stage == wanted)
            .count()
    };
    let swallowed = count(Stage::Swallowed);
    eprintln!(
        "killed with {} flows completed, {open} open ({} without PUBREC, {swallowed} PUBRECs \
         swallowed)",
        completed.load(Ordering::Relaxed),
        count(Stage::Published)
    );
    assert!(
        swallowed > 0,
        "no PUBREC was swallowed: the test checks nothing"
    );

    tokio::task::block_in_place(|| broker.start_again());
    assert!(
        broker.started_line.contains("clean=false"),
        "the restart did not see an unclean stop: {}",
        broker.started_line
    );
    let mut finished = Vec::new();
    for publisher in publishers {
        finished.push(publisher.finish(broker.mqtt).await);
    }
    tokio::task::block_in_place(|| broker.stop());

    let records = tokio::task::block_in_place(|| dump_topic(&data, "mqtt"));
    for publisher in &finished {
        let prefix = format!("{}:", publisher.client_id);
        let mut counts = vec![0u32; publisher.next_sequence as usize];
        for record in &records {
            if record.header("mqtt.client_id") != Some(publisher.client_id.as_str()) {
                continue;
            }
            assert_eq!(record.header("mqtt.qos"), Some("2"), "{record:?}");
            assert!(
                record
                    .header("mqtt.qos2_id")
                    .is_some_and(|id| id.len() == 16),
                "a QoS 2 record of a persistent session carries its id: {record:?}"
            );
            let sequence: usize = record
                .value
                .as_deref()
                .and_then(|value| value.strip_prefix(&prefix))
                .and_then(|number| number.parse().ok())
                .unwrap_or_else(|| panic!("not a message of {}: {record:?}", publisher.client_id));
            counts[sequence] += 1;
        }
        let wrong: Vec<(usize, u32)> = counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count != 1)
            .map(|(sequence, count)| (sequence, *count))
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: messages stored other than exactly once (sequence, copies): {wrong:?}",
            publisher.client_id
        );
    }
}

mod kill9_during_qos2_ingest {
    use super::Version;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v311() {
        super::kill9_during_qos2_ingest(Version::V311).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v5() {
        super::kill9_during_qos2_ingest(Version::V5).await;
    }
}
