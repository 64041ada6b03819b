//! Session takeover: a client id that connects again while its old connection is still open
//! gets its session only once the old connection is closed and everything it read is handled.
//! So the old connection is closed before the new one's CONNACK, every publish the broker read
//! from it is stored and routed before anything from the new connection (none lost, none
//! overtaken), its will goes out before the new connection's messages (the old connection is
//! over by then), and a QoS 2 publish it read is not stored again when the new connection
//! sends it once more with DUP set.
//!
//! Raw packets for the client being taken over, so that a burst is on the wire, unread, when
//! the takeover comes.

use std::time::Duration;

use silt_tests::mqtt::dump::dump_topic;
use silt_tests::mqtt::raw::{self, Connect, RawConn};
use silt_tests::mqtt::{
    Client, ClientOptions, MQTT_TIMEOUT, MqttBroker, Version, skip_unless_silt,
};

/// QoS 0 publishes the old connection sends in one burst just before the takeover.
const BURST: usize = 3_000;
/// Publishes the new connection sends after its CONNACK.
const AFTER: usize = 20;

const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBCOMP: u8 = 7;

fn connect(version: Version, client_id: &str) -> Connect {
    Connect {
        clean: false,
        session_expiry_secs: (version == Version::V5).then_some(3600),
        ..Connect::new(version, client_id)
    }
}

async fn takeover_waits_for_the_old_connection(version: Version) {
    if !skip_unless_silt("takeover_waits_for_the_old_connection") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut broker = tokio::task::block_in_place(|| MqttBroker::start_silt(&data, &[]));
    let client_id = format!("takeover-{version:?}").to_lowercase();
    let topic = format!("takeover/{client_id}");

    let mut subscriber = Client::connect(
        version,
        broker.mqtt,
        ClientOptions::new(&format!("{client_id}-sub")),
    )
    .await;
    subscriber.subscribe("takeover/#", 1).await;

    // The old connection: a burst of QoS 0 publishes, then a QoS 2 publish, all on the wire
    // at once; the takeover comes while the broker is still reading and storing them.
    let will_topic = format!("{topic}/will");
    let old_connect = Connect {
        will: Some((will_topic.clone(), b"old:will".to_vec(), 1)),
        ..connect(version, &client_id)
    };
    let mut old = RawConn::connected(broker.mqtt, &old_connect).await;
    let mut burst = Vec::new();
    for sequence in 0..BURST {
        let payload = format!("old:{sequence}");
        burst.extend(raw::publish(version, &topic, 0, None, payload.as_bytes()));
    }
    burst.extend(raw::publish(version, &topic, 2, Some(7), b"old:qos2"));
    old.send(&burst).await;

    let mut new = RawConn::open(broker.mqtt).await;
    new.send(&connect(version, &client_id).encode()).await;
    let connack = new.read_packet(MQTT_TIMEOUT).await.expect("no CONNACK");
    assert_eq!(connack.connack_code(), Some(0), "{connack:?}");
    assert_eq!(connack.body[0] & 1, 1, "the session was kept: {connack:?}");
    // The client sends its unfinished QoS 2 publish again, then new messages, then a QoS 1
    // sentinel.
    let mut second = raw::publish(version, &topic, 2, Some(7), b"old:qos2");
    second[0] |= 0x08;
    new.send(&second).await;
    let mut expected_after = Vec::new();
    let mut after = Vec::new();
    for sequence in 0..AFTER {
        let payload = format!("new:{sequence}");
        after.extend(raw::publish(version, &topic, 0, None, payload.as_bytes()));
        expected_after.push(payload);
    }
    let sentinel = format!("{topic}/end");
    after.extend(raw::publish(version, &sentinel, 1, Some(8), b"new:end"));
    new.send(&after).await;
    // Only now look at the old connection: the new one's messages went out right after its
    // CONNACK, so a takeover that did not wait for the old connection to finish would let
    // them overtake what the old one read (and its will, which takes a journal commit and a
    // log append). The old connection was closed before the new one was accepted: its end
    // is already here.
    let closed = old.expect_closed(Duration::from_millis(200)).await;
    if version == Version::V5 {
        assert_eq!(closed.disconnect_reason(), Some(0x8E), "{closed:?}");
    }
    let qos2_acknowledged = closed.packets.iter().any(|packet| packet.kind() == PUBREC);
    // PUBREC (QoS 2) and PUBACK (the QoS 1 sentinel) come in either order, and the PUBCOMP
    // answering our PUBREL may come before the PUBACK.
    let mut pubrec = false;
    let mut puback = false;
    let mut pubcomp = false;
    while !(pubrec && puback && pubcomp) {
        let packet = new
            .read_packet(MQTT_TIMEOUT)
            .await
            .expect("no acknowledgement on the new connection");
        match packet.kind() {
            PUBREC => {
                assert_eq!(&packet.body[..2], &7u16.to_be_bytes(), "{packet:?}");
                pubrec = true;
                new.send(&raw::packet(0x62, &7u16.to_be_bytes())).await;
            }
            PUBACK => puback = true,
            PUBCOMP => {
                assert!(pubrec, "PUBCOMP before our PUBREL: {packet:?}");
                assert_eq!(&packet.body[..2], &7u16.to_be_bytes(), "{packet:?}");
                pubcomp = true;
            }
            other => panic!("unexpected packet type {other}: {packet:?}"),
        }
    }

    // The subscriber: the old connection's messages as read (a gap-free prefix of the
    // burst, then its QoS 2 message if it was read), then the new connection's.
    let received: Vec<String> = subscriber
        .recv_until(&sentinel)
        .await
        .into_iter()
        .map(|message| message.text())
        .collect();
    let old_read = received
        .iter()
        .take_while(|text| text.starts_with("old:") && *text != "old:qos2" && *text != "old:will")
        .count();
    eprintln!("{old_read} of the old connection's {BURST} publishes were read before the takeover");
    for (sequence, text) in received[..old_read].iter().enumerate() {
        assert_eq!(
            *text,
            format!("old:{sequence}"),
            "the old connection's messages arrive in order and without gaps"
        );
    }
    // Then the QoS 2 message, once: routed by the old connection if it read it (before its
    // will), else stored from the new connection's re-send (after the will), which comes
    // before its other messages. Then the new connection's messages, and nothing of the old
    // connection after them.
    let mut expected_rest: Vec<String> = if old_read == BURST {
        vec!["old:qos2".into(), "old:will".into()]
    } else {
        vec!["old:will".into(), "old:qos2".into()]
    };
    expected_rest.extend(expected_after.iter().cloned());
    assert_eq!(
        received[old_read..],
        expected_rest[..],
        "after {old_read} messages of the old connection"
    );
    if qos2_acknowledged {
        assert_eq!(
            old_read, BURST,
            "PUBREC came after the whole burst was read"
        );
    }
    subscriber.disconnect().await;
    new.send(&raw::DISCONNECT).await;
    new.expect_closed(MQTT_TIMEOUT).await;
    tokio::task::block_in_place(|| broker.stop());

    // The log holds exactly what the subscriber got: everything the old connection read was
    // stored, and the QoS 2 message once.
    let stored: Vec<String> = tokio::task::block_in_place(|| dump_topic(&data, "mqtt"))
        .into_iter()
        .filter(|record| record.key.as_deref() == Some(topic.as_str()))
        .filter_map(|record| record.value)
        .collect();
    assert_eq!(
        stored
            .iter()
            .filter(|value| value.starts_with("old:"))
            .count(),
        old_read + 1,
        "the log holds every message the old connection read, and the QoS 2 one once"
    );
    let mut stored_sorted = stored.clone();
    stored_sorted.sort();
    let mut received_sorted: Vec<String> = received
        .iter()
        .filter(|text| *text != "old:will")
        .cloned()
        .collect();
    received_sorted.sort();
    assert_eq!(stored_sorted, received_sorted);
}

mod takeover_waits_for_the_old_connection {
    use super::Version;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v311() {
        super::takeover_waits_for_the_old_connection(Version::V311).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn v5() {
        super::takeover_waits_for_the_old_connection(Version::V5).await;
    }
}
