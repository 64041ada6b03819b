//! The broker in-process, over real sockets and a real log, with rumqttc as the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use silt_gateways::mqtt::RouteTable;
use silt_gateways::mqtt::server::{
    BoxFuture, Broker, BrokerConfig, IngestError, IngestPort, IngestReceipt, IngestRequest, Limits,
    LogPosition,
};
use silt_log::batch::{BatchSpec, encode_batch};
use silt_log::{LogConfig, LogManager};

/// The simplest real port: one batch per record, appended (and fsync'd) on a blocking thread.
struct DirectLog(Arc<LogManager>);

impl IngestPort for DirectLog {
    fn submit(
        &self,
        requests: Vec<IngestRequest>,
    ) -> BoxFuture<'_, Result<IngestReceipt, IngestError>> {
        let log = self.0.clone();
        Box::pin(async move {
            let (done, receipt) = tokio::sync::oneshot::channel();
            tokio::task::spawn_blocking(move || {
                let result = (|| {
                    for request in requests {
                        let info = log
                            .ensure_topic(&request.log_topic, 1)
                            .map_err(|e| IngestError::Failed(e.to_string()))?;
                        let partition =
                            silt_log::partitioner::partition_for_key(&request.key, info.partitions);
                        let mut batch = BytesMut::new();
                        encode_batch(&BatchSpec::default(), &[request.record], &mut batch)
                            .map_err(|e| IngestError::Failed(e.to_string()))?;
                        log.partition(&request.log_topic, partition)
                            .and_then(|p| p.append(&mut batch))
                            .map_err(|e| IngestError::Failed(e.to_string()))?;
                    }
                    Ok(())
                })();
                let _ = done.send(result);
            });
            Ok(receipt)
        })
    }

    fn position<'a>(
        &'a self,
        log_topic: &'a str,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<LogPosition, IngestError>> {
        let failed = |e: silt_log::LogError| IngestError::Failed(e.to_string());
        Box::pin(async move {
            let info = self.0.ensure_topic(log_topic, 1).map_err(failed)?;
            let partition = silt_log::partitioner::partition_for_key(key, info.partitions);
            let log = self.0.partition(log_topic, partition).map_err(failed)?;
            Ok(LogPosition {
                partition,
                offset: log.log_end_offset(),
            })
        })
    }

    fn find_header(
        &self,
        log_topic: &str,
        from: &LogPosition,
        name: &str,
        value: &[u8],
    ) -> Result<bool, IngestError> {
        let Ok(log) = self.0.partition(log_topic, from.partition) else {
            return Ok(false);
        };
        log.find_record(from.offset, |record| {
            record
                .headers
                .iter()
                .any(|h| h.key == name && h.value.as_deref() == Some(value))
        })
        .map(|found| found.is_some())
        .map_err(|e| IngestError::Failed(e.to_string()))
    }
}

struct Node {
    broker: Broker,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    log: Arc<LogManager>,
}

async fn start() -> Node {
    start_in(tempfile::tempdir().unwrap()).await
}

/// Starts a broker over `dir`, keeping whatever state a previous broker left there.
async fn start_in(dir: tempfile::TempDir) -> Node {
    start_with(dir, Limits::default()).await
}

async fn start_with(dir: tempfile::TempDir, limits: Limits) -> Node {
    let log = LogManager::open(LogConfig::new(dir.path().join("log"))).unwrap();
    let config = BrokerConfig {
        limits,
        allow_anonymous: true,
        password_file: None,
        acl_file: None,
        state_dir: dir.path().join("mqtt"),
        routes: RouteTable::default(),
    };
    let broker = Broker::open(config, Arc::new(DirectLog(log.clone()))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    broker.serve(listener, None);
    Node {
        broker,
        addr,
        dir,
        log,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_publish_and_subscribe_round_trip() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let node = start().await;
    let mut options = MqttOptions::new("sub", node.addr.ip().to_string(), node.addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe("a/+", QoS::AtLeastOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut published = false;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("timed out")
            .unwrap();
        match event {
            Event::Incoming(Packet::SubAck(_)) if !published => {
                published = true;
                client
                    .publish("a/b", QoS::AtLeastOnce, false, "hello")
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.topic, "a/b");
                assert_eq!(&p.payload[..], b"hello");
                break;
            }
            _ => {}
        }
    }
    let partition = node.log.partition("mqtt", 0).unwrap();
    assert_eq!(partition.log_end_offset(), 1);
    node.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_publish_and_subscribe_round_trip() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let node = start().await;
    let mut options = MqttOptions::new("sub5", node.addr.ip().to_string(), node.addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe("a/#", QoS::ExactlyOnce).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut published = false;
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("timed out")
            .unwrap();
        match event {
            Event::Incoming(Packet::SubAck(_)) if !published => {
                published = true;
                client
                    .publish("a/b/c", QoS::ExactlyOnce, false, "hello")
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(&p.topic[..], b"a/b/c");
                assert_eq!(&p.payload[..], b"hello");
                break;
            }
            _ => {}
        }
    }
    node.broker.shutdown().await;
}

/// Polls `events` until `pick` returns something, within a deadline.
async fn next_matching<T>(
    events: &mut rumqttc::v5::EventLoop,
    mut pick: impl FnMut(&rumqttc::v5::Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("timed out waiting for an event")
            .expect("connection failed");
        if let Some(found) = pick(&event) {
            return found;
        }
    }
}

fn v5_options(id: &str, addr: std::net::SocketAddr) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(5));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_and_retained_message_survive_a_restart() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event};
    let node = start().await;

    // A persistent subscriber subscribes, then goes away.
    let mut options = v5_options("keeper", node.addr);
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let (sub, mut sub_events) = AsyncClient::new(options.clone(), 10);
    sub.subscribe("k/#", QoS::AtLeastOnce).await.unwrap();
    next_matching(&mut sub_events, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())
    })
    .await;
    sub.disconnect().await.unwrap();
    drop(sub_events);

    // While it is away: a queued QoS 1 message and a retained one.
    let (publisher, mut pub_events) = AsyncClient::new(v5_options("pub", node.addr), 10);
    publisher
        .publish("k/queued", QoS::AtLeastOnce, false, "while away")
        .await
        .unwrap();
    publisher
        .publish("r/kept", QoS::AtLeastOnce, true, "retained")
        .await
        .unwrap();
    let mut acks = 0;
    next_matching(&mut pub_events, |e| {
        if matches!(e, Event::Incoming(Packet::PubAck(_))) {
            acks += 1;
        }
        (acks == 2).then_some(())
    })
    .await;
    drop(pub_events);

    // Restart on the same directory.
    node.broker.shutdown().await;
    let Node {
        broker, dir, log, ..
    } = node;
    drop(broker);
    // The last connection tasks let go of the broker (and its log) as they end.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Arc::strong_count(&log) > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the log is still held"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.close().unwrap();
    drop(log);
    let node = start_in(dir).await;

    let options = {
        let mut o = v5_options("keeper", node.addr);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o
    };
    let (sub, mut sub_events) = AsyncClient::new(options, 10);
    let present = next_matching(&mut sub_events, |e| match e {
        Event::Incoming(Packet::ConnAck(ack)) => Some(ack.session_present),
        _ => None,
    })
    .await;
    assert!(present, "the session survived the restart");
    let payload = next_matching(&mut sub_events, |e| match e {
        Event::Incoming(Packet::Publish(p)) => Some(p.payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(&payload[..], b"while away");
    sub.subscribe("r/#", QoS::AtLeastOnce).await.unwrap();
    let (retain, payload) = next_matching(&mut sub_events, |e| match e {
        Event::Incoming(Packet::Publish(p)) if &p.topic[..] == b"r/kept" => {
            Some((p.retain, p.payload.clone()))
        }
        _ => None,
    })
    .await;
    assert!(retain);
    assert_eq!(&payload[..], b"retained");
    node.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_when_a_client_vanishes() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
    use rumqttc::v5::{AsyncClient, Event};
    let node = start().await;
    let (watcher, mut watch_events) = AsyncClient::new(v5_options("watcher", node.addr), 10);
    watcher
        .subscribe("wills/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    next_matching(&mut watch_events, |e| {
        matches!(e, Event::Incoming(Packet::SubAck(_))).then_some(())
    })
    .await;

    let mut options = v5_options("doomed", node.addr);
    options.set_last_will(LastWill::new(
        "wills/doomed",
        "gone",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (_doomed, mut doomed_events) = AsyncClient::new(options, 10);
    next_matching(&mut doomed_events, |e| {
        matches!(e, Event::Incoming(Packet::ConnAck(_))).then_some(())
    })
    .await;
    // The network connection just goes: no DISCONNECT.
    drop(doomed_events);

    let payload = next_matching(&mut watch_events, |e| match e {
        Event::Incoming(Packet::Publish(p)) => Some(p.payload.clone()),
        _ => None,
    })
    .await;
    assert_eq!(&payload[..], b"gone");
    node.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_does_not_stall_publishers() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = start().await;

    // A 3.1.1 subscriber on a raw socket: CONNECT, SUBSCRIBE slow/# at QoS 1, then it reads
    // the CONNACK and SUBACK and nothing ever again.
    let mut slow = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let connect = [
        0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04, b's',
        b'l', b'o', b'w',
    ];
    let subscribe = [
        0x82, 0x0b, 0x00, 0x01, 0x00, 0x06, b's', b'l', b'o', b'w', b'/', b'#', 0x01,
    ];
    slow.write_all(&connect).await.unwrap();
    slow.write_all(&subscribe).await.unwrap();
    let mut acks = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), slow.read_exact(&mut acks))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acks[0], 0x20, "CONNACK");
    assert_eq!(acks[4], 0x90, "SUBACK");

    // 4,000 messages of 4 KiB: far more than the socket buffers and the subscriber's queue
    // hold. Every one is acknowledged all the same.
    let (publisher, mut events) = AsyncClient::new(v5_options("fast", node.addr), 100);
    let payload = vec![b'x'; 4096];
    let sender = tokio::spawn(async move {
        for _ in 0..4_000 {
            publisher
                .publish("slow/topic", QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        publisher
    });
    let mut acked = 0;
    next_matching(&mut events, |e| {
        if matches!(e, Event::Incoming(Packet::PubAck(_))) {
            acked += 1;
        }
        (acked == 4_000).then_some(())
    })
    .await;
    let _publisher = sender.await.unwrap();
    assert_eq!(
        node.log.partition("mqtt", 0).unwrap().log_end_offset(),
        4_000
    );
    drop(slow);
    node.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused_with_quota_exceeded() {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
    use rumqttc::v5::{AsyncClient, ConnectionError, Event};
    let node = start_with(
        tempfile::tempdir().unwrap(),
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    )
    .await;
    let addr = node.addr;

    let mut kept = Vec::new();
    for id in ["one", "two"] {
        let (client, mut events) = AsyncClient::new(v5_options(id, addr), 10);
        next_matching(&mut events, |e| {
            matches!(e, Event::Incoming(Packet::ConnAck(_))).then_some(())
        })
        .await;
        kept.push((client, events));
    }
    let (_third, mut events) = AsyncClient::new(v5_options("three", addr), 10);
    let refused = tokio::time::timeout(Duration::from_secs(10), events.poll())
        .await
        .expect("no answer to the third CONNECT");
    match refused {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::QuotaExceeded)
        }
        other => panic!("the third connection was not refused: {other:?}"),
    }
    node.broker.shutdown().await;
}

/// Minimal raw MQTT 5.0 packets, to re-send a QoS 2 PUBLISH with a chosen packet id and DUP.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn put_str(text: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }

    fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128, "short packets only");
        let mut out = vec![first_byte, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    /// CONNECT, clean start 0, session expiry 3600.
    pub(super) fn connect(client_id: &str) -> Vec<u8> {
        let mut body = Vec::new();
        put_str("MQTT", &mut body);
        body.extend_from_slice(&[5, 0x00, 0, 30, 5, 0x11]);
        body.extend_from_slice(&3600u32.to_be_bytes());
        put_str(client_id, &mut body);
        packet(0x10, &body)
    }

    /// PUBLISH QoS 2 with DUP set.
    pub(super) fn publish_qos2_dup(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        put_str(topic, &mut body);
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.push(0);
        body.extend_from_slice(payload);
        packet(0x3C, &body)
    }

    pub(super) fn pubrel(packet_id: u16) -> Vec<u8> {
        packet(0x62, &packet_id.to_be_bytes())
    }

    pub(super) async fn send(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).await.unwrap();
    }

    /// The next packet's first byte and body.
    pub(super) async fn read(stream: &mut TcpStream) -> (u8, Vec<u8>) {
        let first = stream.read_u8().await.unwrap();
        let mut remaining = 0usize;
        for shift in (0..28).step_by(7) {
            let byte = stream.read_u8().await.unwrap();
            remaining |= usize::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; remaining];
        stream.read_exact(&mut body).await.unwrap();
        (first, body)
    }
}

/// What kill -9 can leave of a QoS 2 publish of a persistent session: its intent journaled,
/// and the record in the log or not. Opening the broker settles it from the log: a stored one
/// awaits PUBREL (a re-send gets PUBREC and is not stored again), one not stored has its id
/// free (a re-send is stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_intents_left_by_a_crash_are_settled_from_the_log() {
    use silt_gateways::mqtt::ingest::{HEADER_QOS2_ID, qos2_id_value};
    use silt_gateways::mqtt::store::{Op, Store, StoreLimits, StoredQos2};
    use silt_log::batch::{Header, Record};

    const STORED_TOKEN: u64 = 0xAB;
    const LOST_TOKEN: u64 = 0xCD;
    let dir = tempfile::tempdir().unwrap();
    let now_ms = silt_log::now_ms();
    {
        let log = LogManager::open(LogConfig::new(dir.path().join("log"))).unwrap();
        log.ensure_topic("mqtt", 1).unwrap();
        // Someone else's record first, then the one that made it before the crash.
        let records =
            [("other", 0x1234u64), ("stored", STORED_TOKEN)].map(|(value, token)| Record {
                timestamp: now_ms,
                key: Some(bytes::Bytes::from_static(b"q/t")),
                value: Some(bytes::Bytes::from(value)),
                headers: vec![Header {
                    key: HEADER_QOS2_ID.to_string(),
                    value: Some(qos2_id_value(token)),
                }],
            });
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        log.partition("mqtt", 0)
            .unwrap()
            .append(&mut batch)
            .unwrap();
        log.close().unwrap();

        let mut store = Store::open(&dir.path().join("mqtt"), StoreLimits::default()).unwrap();
        let intent = |packet_id, token| Op::Qos2Set {
            client_id: "q2".to_string(),
            packet_id,
            state: StoredQos2::Intent {
                log_topic: "mqtt".to_string(),
                partition: 0,
                from_offset: 1,
                token,
            },
        };
        store
            .apply(&[
                Op::SessionOpen {
                    client_id: "q2".to_string(),
                    protocol_level: 5,
                    expiry_secs: 3600,
                },
                Op::SessionClosed {
                    client_id: "q2".to_string(),
                    at_ms: now_ms,
                },
                intent(1, STORED_TOKEN),
                intent(2, LOST_TOKEN),
                // Below the intent's offset: must not count as the intent's record.
                intent(3, 0x1234),
            ])
            .unwrap();
        store.sync().unwrap();
    }

    let node = start_in(dir).await;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    raw::send(&mut stream, &raw::connect("q2")).await;
    let (first, connack) = raw::read(&mut stream).await;
    assert_eq!(first, 0x20);
    assert_eq!(&connack[..2], &[1, 0], "session present, success");
    for (packet_id, payload) in [(1u16, "stored"), (2, "lost"), (3, "other")] {
        raw::send(
            &mut stream,
            &raw::publish_qos2_dup("q/t", packet_id, payload.as_bytes()),
        )
        .await;
        let (first, body) = raw::read(&mut stream).await;
        assert_eq!(first, 0x50, "PUBREC");
        assert_eq!(&body[..2], &packet_id.to_be_bytes());
        assert!(body.len() == 2 || body[2] == 0, "success: {body:?}");
        raw::send(&mut stream, &raw::pubrel(packet_id)).await;
        let (first, body) = raw::read(&mut stream).await;
        assert_eq!(first, 0x70, "PUBCOMP");
        assert!(body.len() == 2 || body[2] == 0, "success: {body:?}");
    }
    drop(stream);
    node.broker.shutdown().await;

    let slice = node
        .log
        .partition("mqtt", 0)
        .unwrap()
        .read(0, 1 << 20)
        .unwrap();
    let mut values = Vec::new();
    let mut rest = &slice.bytes[..];
    while let Some((_, records, len)) =
        silt_log::batch::decode_batch(rest, &Default::default()).unwrap()
    {
        values.extend(records.into_iter().map(|r| r.value.unwrap()));
        rest = &rest[len..];
    }
    assert_eq!(
        values,
        ["other", "stored", "lost", "other"].map(|v| bytes::Bytes::from_static(v.as_bytes())),
        "the stored message is not stored again; the others are stored once now"
    );
    // Every id was released by its PUBREL, durably.
    let store = Store::open(&node.dir.path().join("mqtt"), StoreLimits::default()).unwrap();
    assert!(store.state().sessions["q2"].qos2.is_empty());
}

/// The values of `log_topic`'s partition 0, in order.
fn log_values(log: &LogManager, log_topic: &str) -> Vec<String> {
    let Ok(partition) = log.partition(log_topic, 0) else {
        return Vec::new();
    };
    let slice = partition.read(0, 1 << 20).unwrap();
    let mut values = Vec::new();
    let mut rest = &slice.bytes[..];
    while let Some((_, records, len)) =
        silt_log::batch::decode_batch(rest, &Default::default()).unwrap()
    {
        values.extend(
            records
                .into_iter()
                .map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap()),
        );
        rest = &rest[len..];
    }
    values
}

/// What a restart finds of persistent sessions' wills: one that started firing before a
/// crash and whose record is in the log (its `mqtt.will_id` token at or above the journaled
/// offset) was published and is only cleared; one that started firing and did not reach the
/// log, and one whose delay ran out while the broker was down, are published once now (a
/// persistent subscriber gets both queued); one whose delay is still running waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_left_by_a_crash_are_settled_from_the_log() {
    use silt_gateways::mqtt::ingest::{HEADER_WILL_ID, qos2_id_value};
    use silt_gateways::mqtt::store::{
        Op, Store, StoreLimits, StoredMessage, StoredProperties, StoredSubscription, StoredWill,
        StoredWillFiring,
    };
    use silt_log::batch::{Header, Record};

    const PUBLISHED_TOKEN: u64 = 0xAB;
    let dir = tempfile::tempdir().unwrap();
    let now_ms = silt_log::now_ms();
    let open = |client_id: &str| Op::SessionOpen {
        client_id: client_id.to_string(),
        protocol_level: 5,
        expiry_secs: 3600,
    };
    let closed = |client_id: &str, at_ms| Op::SessionClosed {
        client_id: client_id.to_string(),
        at_ms,
    };
    let will = |client_id: &str, token, delay_secs, firing| Op::WillSet {
        client_id: client_id.to_string(),
        will: StoredWill {
            message: StoredMessage {
                topic: format!("wills/{client_id}"),
                payload: bytes::Bytes::from(format!("{client_id} is gone")),
                qos: 1,
                retain: false,
                published_at_ms: 0,
                expiry_interval_secs: None,
                properties: StoredProperties::default(),
                subscription_ids: Vec::new(),
            },
            delay_secs,
            token,
            firing,
        },
    };
    let firing_at = |from_offset| {
        Some(StoredWillFiring {
            log_topic: "mqtt".to_string(),
            partition: 0,
            from_offset,
        })
    };
    {
        let log = LogManager::open(LogConfig::new(dir.path().join("log"))).unwrap();
        log.ensure_topic("mqtt", 1).unwrap();
        // Someone else's record with the lost will's token, below its journaled offset, then
        // the published will's record.
        let records =
            [("other", 2u64), ("published is gone", PUBLISHED_TOKEN)].map(|(value, token)| {
                Record {
                    timestamp: now_ms,
                    key: Some(bytes::Bytes::from_static(b"wills/x")),
                    value: Some(bytes::Bytes::from(value)),
                    headers: vec![Header {
                        key: HEADER_WILL_ID.to_string(),
                        value: Some(qos2_id_value(token)),
                    }],
                }
            });
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        log.partition("mqtt", 0)
            .unwrap()
            .append(&mut batch)
            .unwrap();
        log.close().unwrap();

        let mut store = Store::open(&dir.path().join("mqtt"), StoreLimits::default()).unwrap();
        store
            .apply(&[
                open("watch"),
                Op::Subscribe {
                    client_id: "watch".to_string(),
                    subscription: StoredSubscription {
                        filter: "wills/#".to_string(),
                        qos: 1,
                        no_local: false,
                        retain_as_published: false,
                        retain_handling: 0,
                        subscription_id: Some(4),
                    },
                },
                closed("watch", now_ms),
                open("published"),
                closed("published", now_ms - 60_000),
                will("published", PUBLISHED_TOKEN, 5, firing_at(1)),
                open("lost"),
                closed("lost", now_ms - 60_000),
                will("lost", 2, 5, firing_at(1)),
                open("due"),
                closed("due", now_ms - 60_000),
                will("due", 3, 5, None),
                open("waiting"),
                closed("waiting", now_ms),
                will("waiting", 4, 3600, None),
            ])
            .unwrap();
        store.sync().unwrap();
    }

    let node = start_in(dir).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while log_values(&node.log, "mqtt").len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the due wills were not published: {:?}",
            log_values(&node.log, "mqtt")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.broker.shutdown().await;
    let mut values = log_values(&node.log, "mqtt");
    values[2..].sort();
    assert_eq!(
        values,
        ["other", "published is gone", "due is gone", "lost is gone"],
        "the published will is not published again; the others are published once"
    );

    let store = Store::open(&node.dir.path().join("mqtt"), StoreLimits::default()).unwrap();
    let sessions = &store.state().sessions;
    for client_id in ["published", "lost", "due"] {
        assert_eq!(
            sessions[client_id].will, None,
            "{client_id}'s will is cleared"
        );
    }
    assert_eq!(sessions["waiting"].will.as_ref().unwrap().token, 4);
    let mut queued: Vec<(String, Vec<u32>)> = sessions["watch"]
        .queue
        .values()
        .map(|message| (message.topic.clone(), message.subscription_ids.clone()))
        .collect();
    queued.sort();
    assert_eq!(
        queued,
        [
            ("wills/due".to_string(), vec![4]),
            ("wills/lost".to_string(), vec![4])
        ]
    );
}
