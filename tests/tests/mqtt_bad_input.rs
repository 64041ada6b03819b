//! Bad input over raw TCP sockets, with hand-built bytes no client library would send: the
//! broker answers 5.0 clients with the spec's DISCONNECT reason code (0x81 malformed, 0x82
//! protocol error, 0x94 topic alias invalid, 0x95 packet too large) and closes, closes 3.1.1
//! clients without a word, closes half-open and silent connections itself, and after all of it
//! still serves a normal client.

use std::path::Path;
use std::time::Duration;

use silt_tests::mqtt::raw::{self, Closed, RawConn, packet, put_str, put_varint};
use silt_tests::mqtt::{BrokerKind, Client, MqttBroker, Version, skip_unless_silt};
use tokio::time::Instant;

/// How long the broker may take to close a connection it should close at once.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The packet size limit of these tests' broker, small so tests reach it.
const MAX_PACKET_BYTES: usize = 1024;
/// The CONNECT timeout of these tests' broker (silt-edge only).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Runs an async test function once per protocol version, as `name::v311` and `name::v5`.
macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::Version;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v311() {
                super::$name(Version::V311).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v5() {
                super::$name(Version::V5).await;
            }
        }
    )*};
}

both_versions!(
    remaining_length_over_the_limit,
    zero_length_topic,
    qos1_publish_without_packet_id,
    subscribe_missing_its_options_byte,
    garbage_after_connect,
    refused_connects_are_closed_by_the_broker,
);

fn start(data: &Path) -> MqttBroker {
    let max_packet = MAX_PACKET_BYTES.to_string();
    let connect_timeout = CONNECT_TIMEOUT.as_millis().to_string();
    tokio::task::block_in_place(|| {
        MqttBroker::start(
            data,
            &[
                ("mqtt.limits.max_packet_bytes", &max_packet),
                ("mqtt.limits.connect_timeout_ms", &connect_timeout),
            ],
        )
    })
}

/// A connection that completed CONNECT/CONNACK for `version`.
async fn connected(broker: &MqttBroker, version: Version, name: &str) -> RawConn {
    let client_id = format!("{name}-{version:?}").to_lowercase();
    RawConn::connected(broker.mqtt, &raw::Connect::new(version, &client_id)).await
}

/// Requires the broker to close the connection: 5.0 after a DISCONNECT with one of
/// `v5_reasons`, 3.1.1 without sending anything. (The spec lets a 5.0 server close without
/// the DISCONNECT, and Mosquitto sometimes does; Silt always says why.)
async fn expect_rejected(conn: &mut RawConn, version: Version, v5_reasons: &[u8], what: &str) {
    let closed = conn.expect_closed(CLOSE_TIMEOUT).await;
    check_rejected(&closed, version, v5_reasons, what);
}

fn check_rejected(closed: &Closed, version: Version, v5_reasons: &[u8], what: &str) {
    match version {
        Version::V5 => {
            let reason = closed.disconnect_reason();
            assert!(
                reason.is_some_and(|reason| v5_reasons.contains(&reason)),
                "{what}: expected DISCONNECT with one of {v5_reasons:02x?} before the close, got \
                 {:?}",
                closed.packets
            );
            assert_eq!(closed.packets.len(), 1, "{what}: {:?}", closed.packets);
        }
        Version::V311 => assert!(
            closed.packets.is_empty(),
            "{what}: 3.1.1 has no DISCONNECT from the server; got {:?}",
            closed.packets
        ),
    }
}

/// The broker is alive and a normal client still gets a round trip through it.
async fn assert_still_serving(broker: &mut MqttBroker, version: Version) {
    assert!(
        broker.is_running(),
        "the broker died:\n{}",
        broker.process().stderr()
    );
    let client_id = format!("healthy-{version:?}").to_lowercase();
    let mut client = Client::connect_clean(version, broker.mqtt, &client_id).await;
    assert_eq!(client.subscribe("healthy/t", 1).await, 1);
    assert_eq!(
        client
            .publish_acked("healthy/t", 1, false, "still here")
            .await,
        0
    );
    assert_eq!(client.recv().await.text(), "still here");
    client.disconnect().await;
}

fn data_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    (dir, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_packet_that_is_not_connect_is_refused() {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);
    let first_packets: [(&str, Vec<u8>); 6] = [
        ("PINGREQ", raw::PINGREQ.to_vec()),
        (
            "PUBLISH",
            raw::publish(Version::V311, "a/b", 0, None, b"early"),
        ),
        ("SUBSCRIBE", raw::subscribe(Version::V311, 1, "a/#", 0)),
        ("DISCONNECT", raw::DISCONNECT.to_vec()),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n".to_vec()),
        ("zeros", vec![0u8; 64]),
    ];
    for (what, bytes) in first_packets {
        let mut conn = RawConn::open(broker.mqtt).await;
        conn.send(&bytes).await;
        // No protocol version is known before CONNECT, so there is nothing to answer with.
        let closed = conn.expect_closed(CLOSE_TIMEOUT).await;
        assert!(
            closed
                .packets
                .iter()
                .all(|packet| packet.connack_code() != Some(0)),
            "{what} first: {:?}",
            closed.packets
        );
    }
    for version in Version::ALL {
        assert_still_serving(&mut broker, version).await;
    }
}

async fn remaining_length_over_the_limit(version: Version) {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);

    // Just over the limit, and the largest length MQTT can announce; the broker decides from
    // the header and closes without waiting for (or buffering) the body.
    for announced in [MAX_PACKET_BYTES + 1, 268_435_455] {
        let mut conn = connected(&broker, version, "big").await;
        let mut header = vec![0x30];
        put_varint(announced, &mut header);
        header.extend_from_slice(&[0x00, 0x03, b'b', b'i', b'g']);
        conn.send(&header).await;
        let sent = Instant::now();
        expect_rejected(
            &mut conn,
            version,
            &[0x95],
            &format!("PUBLISH of {announced} bytes"),
        )
        .await;
        assert!(sent.elapsed() < CLOSE_TIMEOUT);
    }

    // An oversized CONNECT: 5.0 says why in the CONNACK.
    let mut connect = raw::Connect::new(version, "big-connect").encode();
    let mut oversized = vec![0x10];
    put_varint(1 << 20, &mut oversized);
    oversized.extend_from_slice(&connect.split_off(2));
    let mut conn = RawConn::open(broker.mqtt).await;
    conn.send(&oversized).await;
    let closed = conn.expect_closed(CLOSE_TIMEOUT).await;
    let connack_codes: Vec<Option<u8>> = closed.packets.iter().map(|p| p.connack_code()).collect();
    match version {
        Version::V5 => assert_eq!(connack_codes, [Some(0x95)], "{:?}", closed.packets),
        Version::V311 => assert!(
            connack_codes.iter().all(|code| *code != Some(0)),
            "{:?}",
            closed.packets
        ),
    }

    // At the limit is fine: a PUBLISH of exactly MAX_PACKET_BYTES is delivered.
    let mut subscriber = Client::connect_clean(version, broker.mqtt, "limit-sub").await;
    assert_eq!(subscriber.subscribe("limit/#", 0).await, 0);
    let mut conn = connected(&broker, version, "limit").await;
    let overhead = raw::publish(version, "limit/t", 0, None, b"").len();
    // The remaining length's own size grows from one byte to two past 127.
    let payload = vec![b'x'; MAX_PACKET_BYTES - overhead - 1];
    let at_limit = raw::publish(version, "limit/t", 0, None, &payload);
    assert_eq!(at_limit.len(), MAX_PACKET_BYTES);
    conn.send(&at_limit).await;
    assert_eq!(subscriber.recv().await.payload.len(), payload.len());

    assert_still_serving(&mut broker, version).await;
}

async fn zero_length_topic(version: Version) {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);
    for (qos, pkid) in [(0u8, None), (1, Some(7))] {
        let mut conn = connected(&broker, version, "empty-topic").await;
        conn.send(&raw::publish(version, "", qos, pkid, b"nowhere"))
            .await;
        // 5.0 §3.3.2.1: an empty topic without a Topic Alias is a protocol error.
        expect_rejected(
            &mut conn,
            version,
            &[0x82],
            &format!("QoS {qos} to no topic"),
        )
        .await;
    }
    assert_still_serving(&mut broker, version).await;
}

async fn qos1_publish_without_packet_id(version: Version) {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);

    // The packet ends right after the topic.
    let mut body = Vec::new();
    put_str("t/a", &mut body);
    let mut conn = connected(&broker, version, "no-pkid").await;
    conn.send(&packet(0x32, &body)).await;
    expect_rejected(
        &mut conn,
        version,
        &[0x81],
        "QoS 1 PUBLISH cut before its packet id",
    )
    .await;

    // Packet id 0 is not a packet id (§2.2.1).
    let mut conn = connected(&broker, version, "zero-pkid").await;
    conn.send(&raw::publish(version, "t/a", 1, Some(0), b"zero"))
        .await;
    expect_rejected(
        &mut conn,
        version,
        &[0x81, 0x82],
        "QoS 1 PUBLISH with packet id 0",
    )
    .await;

    assert_still_serving(&mut broker, version).await;
}

async fn subscribe_missing_its_options_byte(version: Version) {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);
    let header = |pkid: u16| {
        let mut body = pkid.to_be_bytes().to_vec();
        if version == Version::V5 {
            body.push(0);
        }
        body
    };

    let mut body = header(1);
    put_str("a/b", &mut body);
    let mut conn = connected(&broker, version, "no-options").await;
    conn.send(&packet(0x82, &body)).await;
    expect_rejected(
        &mut conn,
        version,
        &[0x81],
        "SUBSCRIBE without its options byte",
    )
    .await;

    // Two filters, the second missing its options byte.
    let mut body = header(2);
    put_str("a/b", &mut body);
    body.push(1);
    put_str("c/d", &mut body);
    let mut conn = connected(&broker, version, "second-no-options").await;
    conn.send(&packet(0x82, &body)).await;
    expect_rejected(&mut conn, version, &[0x81], "second filter without options").await;

    // No filter at all: §3.8.3 makes that a protocol error.
    let mut conn = connected(&broker, version, "no-filter").await;
    conn.send(&packet(0x82, &header(3))).await;
    expect_rejected(
        &mut conn,
        version,
        &[0x81, 0x82],
        "SUBSCRIBE without a filter",
    )
    .await;

    assert_still_serving(&mut broker, version).await;
}

async fn garbage_after_connect(version: Version) {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);
    let mut invalid_utf8_topic = Vec::new();
    invalid_utf8_topic.extend_from_slice(&[0x00, 0x02, 0xC3, 0x28]);
    if version == Version::V5 {
        invalid_utf8_topic.push(0);
    }
    let cases: [(&str, Vec<u8>, &[u8]); 7] = [
        // Packet type 0 is reserved.
        ("reserved packet type", vec![0x00, 0x00], &[0x81, 0x82]),
        // §3.3.1.2: both QoS bits set is malformed.
        (
            "PUBLISH at QoS 3",
            raw::publish(version, "t", 0, None, b"x")
                .iter()
                .enumerate()
                .map(|(index, byte)| if index == 0 { 0x36 } else { *byte })
                .collect(),
            &[0x81],
        ),
        // A remaining length may have at most four bytes.
        (
            "five-byte remaining length",
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            &[0x81],
        ),
        // §3.1.0: a second CONNECT is a protocol error.
        (
            "second CONNECT",
            raw::Connect::new(version, "again").encode(),
            &[0x82],
        ),
        // SUBSCRIBE's fixed header flags must be 0010.
        (
            "SUBSCRIBE with flags 0000",
            {
                let mut subscribe = raw::subscribe(version, 1, "a/b", 0);
                subscribe[0] = 0x80;
                subscribe
            },
            &[0x81],
        ),
        // §1.5.4: ill-formed UTF-8 makes the packet malformed.
        (
            "topic that is not UTF-8",
            packet(0x30, &invalid_utf8_topic),
            &[0x81],
        ),
        ("0xFF bytes", vec![0xFF; 64], &[0x81, 0x82]),
    ];
    for (what, bytes, v5_reasons) in cases {
        let mut conn = connected(&broker, version, "garbage").await;
        conn.send(&bytes).await;
        expect_rejected(&mut conn, version, v5_reasons, what).await;
    }
    if version == Version::V5 {
        topic_alias_errors(&broker).await;
    }
    assert_still_serving(&mut broker, version).await;
}

/// A 5.0 PUBLISH at QoS 0 with a Topic Alias property.
fn publish_with_alias(topic: &str, alias: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(topic, &mut body);
    let mut properties = vec![0x23];
    properties.extend_from_slice(&alias.to_be_bytes());
    put_varint(properties.len(), &mut body);
    body.extend_from_slice(&properties);
    body.extend_from_slice(b"aliased");
    packet(0x30, &body)
}

/// §3.3.2.3.4: an alias above the broker's maximum is invalid (0x94, or the protocol error it
/// is), alias 0 is not permitted at all, and an empty topic with an alias never set is a
/// protocol error (0x82).
async fn topic_alias_errors(broker: &MqttBroker) {
    let cases: [(&str, Vec<u8>, &[u8]); 3] = [
        ("alias 0", publish_with_alias("a/b", 0), &[0x81, 0x82, 0x94]),
        (
            "alias above the maximum",
            publish_with_alias("a/b", u16::MAX),
            &[0x94],
        ),
        ("unknown alias", publish_with_alias("", 3), &[0x82]),
    ];
    for (what, bytes, reasons) in cases {
        let mut conn = connected(broker, Version::V5, "alias").await;
        conn.send(&bytes).await;
        expect_rejected(&mut conn, Version::V5, reasons, what).await;
    }
}

async fn refused_connects_are_closed_by_the_broker(version: Version) {
    let (_dir, data) = data_dir();
    let mut broker = start(&data);
    let mut refused: Vec<(&str, Vec<u8>)> = Vec::new();
    refused.push((
        "protocol level 7",
        raw::Connect {
            level: 7,
            ..raw::Connect::new(version, "future")
        }
        .encode(),
    ));
    // §3.1.2.3: the reserved flag must be zero.
    let mut reserved_flag = raw::Connect::new(version, "reserved").encode();
    reserved_flag[9] |= 0x01;
    refused.push(("reserved connect flag", reserved_flag));
    if version == Version::V311 {
        // §3.1.3.1: an empty client id needs a clean session in 3.1.1.
        refused.push((
            "empty id without clean session",
            raw::Connect {
                clean: false,
                ..raw::Connect::new(version, "")
            }
            .encode(),
        ));
    }
    // Many at once, never closed from our side: the broker must close every one of them.
    let mut conns = Vec::new();
    for (what, bytes) in &refused {
        for _ in 0..8 {
            let mut conn = RawConn::open(broker.mqtt).await;
            conn.send(bytes).await;
            conns.push((*what, conn));
        }
    }
    for (what, mut conn) in conns {
        let closed = conn.expect_closed(CLOSE_TIMEOUT).await;
        let codes: Vec<Option<u8>> = closed.packets.iter().map(|p| p.connack_code()).collect();
        assert!(
            codes.iter().all(|code| code.is_some_and(|code| code != 0)),
            "{what}: at most a refusing CONNACK before the close: {:?}",
            closed.packets
        );
        if what == "empty id without clean session" {
            assert_eq!(codes, [Some(0x02)], "3.1.1: identifier rejected");
        }
    }
    assert_still_serving(&mut broker, version).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connects_are_closed_after_the_connect_timeout() {
    if !skip_unless_silt("silent_and_half_sent_connects_are_closed_after_the_connect_timeout") {
        return;
    }
    let (_dir, data) = data_dir();
    let mut broker = start(&data);
    assert_eq!(broker.kind, BrokerKind::SiltEdge);
    let connect = raw::Connect::new(Version::V5, "half").encode();
    let starts: [(&str, &[u8]); 3] = [
        ("nothing", b""),
        ("a fixed header", &connect[..2]),
        ("half a CONNECT", &connect[..connect.len() / 2]),
    ];
    let opened = Instant::now();
    let mut conns = Vec::new();
    for (what, bytes) in starts {
        let mut conn = RawConn::open(broker.mqtt).await;
        conn.send(bytes).await;
        conns.push((what, conn));
    }
    for (what, mut conn) in conns {
        let closed = conn.expect_closed(CLOSE_TIMEOUT).await;
        let after = closed.at - opened;
        assert!(
            after >= CONNECT_TIMEOUT - Duration::from_millis(50),
            "{what}: closed after {after:?}, before the {CONNECT_TIMEOUT:?} connect timeout"
        );
        // Long before the default timeout: the setting took effect.
        assert!(
            after <= CONNECT_TIMEOUT + Duration::from_secs(2),
            "{what}: closed only after {after:?}"
        );
        assert!(
            closed.packets.is_empty(),
            "{what}: nothing to answer: {:?}",
            closed.packets
        );
    }
    for version in Version::ALL {
        assert_still_serving(&mut broker, version).await;
    }
}
