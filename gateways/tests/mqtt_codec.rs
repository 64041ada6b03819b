//! MQTT framing: protocol detection and the server-side decoder, fed real client bytes
//! (captured from mosquitto_pub/mosquitto_sub and written by rumqttc's client-side encoder),
//! split at every byte, and the malformed inputs the broker must answer with a reason code.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use rumqttc::mqttbytes::{QoS as QoS4, v4};
use rumqttc::v5::mqttbytes::{QoS as QoS5, v5};
use silt_gateways::mqtt::codec::reason_code;
use silt_gateways::mqtt::{
    CodecError, ConnackRefusal, Decoder, Frame, Malformation, ProtocolVersion, ProtocolViolation,
    detect_protocol, frame_bytes_needed,
};

/// Small enough that tests reach it.
const LIMIT: u32 = 4096;

/// The prefix length at which a CONNECT with a one-byte remaining length and protocol name
/// "MQTT" reveals its version: fixed header (2), name length (2), "MQTT" (4), level (1).
const MQTT_LEVEL_AT: usize = 9;

// Captured with `mosquitto_pub`/`mosquitto_sub` (mosquitto-clients 2.0) against a listener
// that answered CONNECT with a bare CONNACK, client id `silt-cap`, keep-alive 60.

/// `mosquitto_pub -V mqttv311 -t a/b -m hi`: CONNECT, PUBLISH QoS 0, DISCONNECT.
const MOSQ_V311_QOS0: &str = "101400044d5154540402003c000873696c742d63617030070003612f626869e000";
/// `mosquitto_pub -V mqttv311 -t a/b -m hi -q 1`: CONNECT, PUBLISH QoS 1 with packet id 1.
const MOSQ_V311_QOS1: &str = "101400044d5154540402003c000873696c742d63617032090003612f6200016869";
/// `mosquitto_sub -V mqttv311 -t 'a/+' -q 1`: CONNECT, SUBSCRIBE, DISCONNECT.
const MOSQ_V311_SUB: &str = "101400044d5154540402003c000873696c742d636170820800010003612f2b01e000";
/// `mosquitto_pub -V mqttv5 -t a/b -m hi`: CONNECT (Receive Maximum 20), PUBLISH, and the
/// zero-length DISCONNECT.
const MOSQ_V5_QOS0: &str =
    "101800044d5154540502003c03210014000873696c742d63617030080003612f62006869e000";
/// `mosquitto_pub -V mqttv5 -q 1 -D publish user-property k v -D publish content-type
/// text/plain`: PUBLISH QoS 1 with a user property and a content type.
const MOSQ_V5_QOS1: &str = "101800044d5154540502003c03210014000873696c742d636170321e0003612f620001142600016b00017603000a746578742f706c61696e6869";
/// `mosquitto_sub -V mqttv5 -t 'a/+' -t '#' -q 2 -D subscribe user-property k v`: SUBSCRIBE
/// with two filters, then DISCONNECT 0x04 in its one-byte form (`e0 01 04`).
const MOSQ_V5_SUB: &str = "101800044d5154540502003c03210014000873696c742d63617082140001072600016b0001760003612f2b0200012302e00104";
/// `mosquitto_sub -V mqttv5 -t 'a/+' -q 1 -D subscribe subscription-identifier 5 -D subscribe
/// user-property k v`: a Subscription Identifier followed by another property.
const MOSQ_V5_SUBSCRIPTION_ID: &str = "101800044d5154540502003c03210014000873696c742d63617082120001090b052600016b0001760003612f2b01e00104";
/// `mosquitto_pub -V mqttv5 -u user -P pass --will-topic w/t --will-payload gone
/// --will-qos 1 -D will user-property a b -D connect session-expiry-interval 60`.
const MOSQ_V5_WILL: &str = "103c00044d51545405ce003c08110000003c210014000873696c742d63617007260001610001620003772f740004676f6e6500047573657200047061737330080003612f62006869e000";

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex length");
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).expect("hex digit"))
        .collect()
}

/// Decodes every frame in `bytes` at once, failing the test on an error.
fn decode_all(version: ProtocolVersion, bytes: &[u8]) -> Vec<Frame> {
    let mut decoder = Decoder::new(version, LIMIT);
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = decoder.decode(&mut buf).expect("valid stream") {
        frames.push(frame);
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    frames
}

/// Feeds `bytes` one at a time, checking that every `Ok(None)` leaves the buffer untouched
/// and asks for more than it has, within the limit.
fn decode_byte_by_byte(version: ProtocolVersion, bytes: &[u8]) -> Vec<Frame> {
    let mut decoder = Decoder::new(version, LIMIT);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for &byte in bytes {
        buf.extend_from_slice(&[byte]);
        loop {
            let before = buf.clone();
            let needed = decoder.frame_bytes_needed(&buf).expect("valid stream");
            assert!(needed <= LIMIT as usize);
            match decoder.decode(&mut buf).expect("valid stream") {
                Some(frame) => {
                    assert_eq!(before.len() - buf.len(), needed, "consumed one frame");
                    frames.push(frame);
                }
                None => {
                    assert_eq!(buf, before, "an incomplete frame leaves the buffer alone");
                    assert!(needed > buf.len());
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty());
    frames
}

/// A decoder that has already accepted a CONNECT for `version`, so tests can feed it later
/// packets.
fn connected(version: ProtocolVersion) -> Decoder {
    let mut decoder = Decoder::new(version, LIMIT);
    let connect = match version {
        ProtocolVersion::V3_1_1 => v4_bytes(&[v4_connect()]),
        ProtocolVersion::V5 => v5_bytes(&[v5_connect()]),
    };
    let mut buf = BytesMut::from(&connect[..]);
    assert!(matches!(decoder.decode(&mut buf), Ok(Some(_))));
    decoder
}

/// Decodes one packet on a connected decoder.
fn decode_one(version: ProtocolVersion, bytes: &[u8]) -> Result<Option<Frame>, CodecError> {
    connected(version).decode(&mut BytesMut::from(bytes))
}

fn v4_connect() -> v4::Packet {
    let mut connect = v4::Connect::new("sensor-1");
    connect.keep_alive = 30;
    connect.set_login("user", "secret");
    connect.last_will = Some(v4::LastWill::new(
        "sensors/1/status",
        "offline",
        QoS4::AtLeastOnce,
        true,
    ));
    v4::Packet::Connect(connect)
}

fn v5_connect() -> v5::Packet {
    let mut properties = v5::ConnectProperties::new();
    properties.session_expiry_interval = Some(3600);
    properties.receive_maximum = Some(10);
    properties.max_packet_size = Some(LIMIT);
    properties.topic_alias_max = Some(8);
    properties.user_properties = vec![("site".into(), "north".into())];
    let connect = v5::Connect {
        keep_alive: 30,
        client_id: "sensor-1".into(),
        clean_start: false,
        properties: Some(properties),
    };
    let will = v5::LastWill::new("sensors/1/status", "offline", QoS5::AtLeastOnce, true, None);
    v5::Packet::Connect(connect, Some(will), Some(v5::Login::new("user", "secret")))
}

fn v4_bytes(packets: &[v4::Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for packet in packets {
        packet.write(&mut buf, usize::MAX).expect("encodes");
    }
    buf.to_vec()
}

fn v5_bytes(packets: &[v5::Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for packet in packets {
        packet.write(&mut buf, None).expect("encodes");
    }
    buf.to_vec()
}

/// A client's session in 3.1.1, as rumqttc writes it.
fn v4_session() -> Vec<v4::Packet> {
    let mut qos1 = v4::Publish::new("sensors/1/temp", QoS4::AtLeastOnce, "21.5");
    qos1.pkid = 1;
    let mut qos2 = v4::Publish::new("sensors/1/hum", QoS4::ExactlyOnce, vec![0u8; 300]);
    qos2.pkid = 2;
    qos2.retain = true;
    let mut subscribe = v4::Subscribe::new("cmd/#", QoS4::AtLeastOnce);
    subscribe.pkid = 3;
    subscribe.add("cfg/+/x".into(), QoS4::AtMostOnce);
    let mut unsubscribe = v4::Unsubscribe::new("cmd/#");
    unsubscribe.pkid = 4;
    vec![
        v4_connect(),
        v4::Packet::Publish(v4::Publish::new("sensors/1/temp", QoS4::AtMostOnce, "21")),
        v4::Packet::Publish(qos1),
        v4::Packet::Publish(qos2),
        v4::Packet::PubRel(v4::PubRel::new(2)),
        v4::Packet::PubAck(v4::PubAck::new(9)),
        v4::Packet::PubRec(v4::PubRec::new(10)),
        v4::Packet::PubComp(v4::PubComp::new(10)),
        v4::Packet::Subscribe(subscribe),
        v4::Packet::Unsubscribe(unsubscribe),
        v4::Packet::PingReq,
        v4::Packet::Disconnect,
    ]
}

/// A client's session in 5.0, as rumqttc writes it, with properties and a topic alias.
fn v5_session() -> Vec<v5::Packet> {
    let properties = v5::PublishProperties {
        topic_alias: Some(1),
        content_type: Some("application/json".into()),
        user_properties: vec![("unit".into(), "C".into())],
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    let mut qos1 = v5::Publish::new(
        "sensors/1/temp",
        QoS5::AtLeastOnce,
        "21.5",
        Some(properties),
    );
    qos1.pkid = 1;
    // The alias set above stands in for the topic.
    let aliased = v5::PublishProperties {
        topic_alias: Some(1),
        ..Default::default()
    };
    let mut by_alias = v5::Publish::new("", QoS5::ExactlyOnce, vec![7u8; 200], Some(aliased));
    by_alias.pkid = 2;
    let mut filter = v5::Filter::new("cmd/#", QoS5::AtLeastOnce);
    filter.nolocal = true;
    filter.retain_forward_rule = v5::RetainForwardRule::OnNewSubscribe;
    let mut subscribe = v5::Subscribe::new_many(
        [filter, v5::Filter::new("$share/g/cfg/+", QoS5::ExactlyOnce)],
        None,
    );
    subscribe.pkid = 3;
    let mut unsubscribe = v5::Unsubscribe::new("cmd/#", None);
    unsubscribe.pkid = 4;
    vec![
        v5_connect(),
        v5::Packet::Publish(v5::Publish::new(
            "sensors/1/temp",
            QoS5::AtMostOnce,
            "21",
            None,
        )),
        v5::Packet::Publish(qos1),
        v5::Packet::Publish(by_alias),
        v5::Packet::PubRel(v5::PubRel::new(2, None)),
        v5::Packet::PubAck(v5::PubAck::new(9, None)),
        v5::Packet::PubRec(v5::PubRec::new(10, None)),
        v5::Packet::PubComp(v5::PubComp::new(10, None)),
        v5::Packet::Subscribe(subscribe),
        v5::Packet::Unsubscribe(unsubscribe),
        v5::Packet::PingReq(v5::PingReq),
        // rumqttc 0.25 encodes a DISCONNECT with a reason code correctly only when it also
        // has properties (see `write_v5_disconnect`).
        v5::Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::DisconnectWithWillMessage,
            properties: Some(v5::DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some("battery low".into()),
                user_properties: Vec::new(),
                server_reference: None,
            }),
        }),
    ]
}

fn as_v4(frames: Vec<Frame>) -> Vec<v4::Packet> {
    frames
        .into_iter()
        .map(|frame| match frame {
            Frame::V4(packet) => packet,
            Frame::V5(packet) => panic!("a 3.1.1 decoder returned {packet:?}"),
        })
        .collect()
}

fn as_v5(frames: Vec<Frame>) -> Vec<v5::Packet> {
    frames
        .into_iter()
        .map(|frame| match frame {
            Frame::V5(packet) => packet,
            Frame::V4(packet) => panic!("a 5.0 decoder returned {packet:?}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Detection

#[test]
fn detection_names_the_version_at_the_level_byte_and_not_before() {
    let cases = [
        (hex(MOSQ_V311_QOS0), ProtocolVersion::V3_1_1),
        (hex(MOSQ_V5_QOS0), ProtocolVersion::V5),
        (v4_bytes(&[v4_connect()]), ProtocolVersion::V3_1_1),
        (v5_bytes(&[v5_connect()]), ProtocolVersion::V5),
    ];
    for (bytes, version) in cases {
        for len in 0..=bytes.len() {
            let expected = (len >= MQTT_LEVEL_AT).then_some(version);
            assert_eq!(
                detect_protocol(&bytes[..len], LIMIT),
                Ok(expected),
                "prefix of {len} bytes"
            );
        }
    }
}

#[test]
fn detection_waits_through_a_multi_byte_remaining_length() {
    let mut connect = v4::Connect::new("c".repeat(200));
    connect.keep_alive = 5;
    let bytes = v4_bytes(&[v4::Packet::Connect(connect)]);
    assert_eq!(
        bytes[1] & 0x80,
        0x80,
        "the remaining length takes two bytes"
    );
    for len in 0..=bytes.len() {
        let expected = (len > MQTT_LEVEL_AT).then_some(ProtocolVersion::V3_1_1);
        assert_eq!(detect_protocol(&bytes[..len], LIMIT), Ok(expected));
    }
}

#[test]
fn detection_refuses_a_first_packet_that_is_not_connect_from_its_first_byte() {
    for byte1 in [0x30, 0x82, 0xC0, 0xE0, 0x20, 0x00, 0xF0] {
        let error = detect_protocol(&[byte1], LIMIT).unwrap_err();
        assert_eq!(
            error,
            CodecError::FirstPacketNotConnect {
                packet_type: byte1 >> 4
            }
        );
        assert_eq!(error.reason_code(), reason_code::PROTOCOL_ERROR);
        assert_eq!(error.connack_refusal(), None);
    }
}

#[test]
fn detection_refuses_a_connect_over_the_limit_from_its_fixed_header() {
    // A CONNECT claiming 256 MB: refused before any of its body arrives.
    let header = [0x10, 0xFF, 0xFF, 0xFF, 0x7F];
    let error = (1..=header.len())
        .find_map(|len| detect_protocol(&header[..len], LIMIT).err())
        .expect("refused within the fixed header");
    assert!(matches!(error, CodecError::PacketTooLarge { .. }));
    assert_eq!(error.reason_code(), reason_code::PACKET_TOO_LARGE);

    let bytes = v5_bytes(&[v5_connect()]);
    let small_limit = u32::try_from(bytes.len()).unwrap() - 1;
    assert_eq!(
        detect_protocol(&bytes, small_limit),
        Err(CodecError::PacketTooLarge {
            len_bytes: bytes.len() as u64,
            limit_bytes: small_limit
        })
    );
}

#[test]
fn detection_refuses_a_remaining_length_longer_than_four_bytes() {
    let error = detect_protocol(&[0x10, 0x80, 0x80, 0x80, 0x80], u32::MAX).unwrap_err();
    assert_eq!(
        error,
        CodecError::Malformed(Malformation::VariableByteInteger)
    );
    assert_eq!(error.reason_code(), reason_code::MALFORMED_PACKET);
}

#[test]
fn mqtt_3_1_and_unknown_levels_get_the_connack_their_clients_read() {
    // MQTT 3.1: "MQIsdp", level 3.
    let v3_1 = hex("100f00064d51497364700302000000000163");
    let error = detect_protocol(&v3_1, LIMIT).unwrap_err();
    assert_eq!(error, CodecError::UnsupportedProtocolLevel { level: 3 });
    assert_eq!(
        error.reason_code(),
        reason_code::UNSUPPORTED_PROTOCOL_VERSION
    );
    assert_eq!(
        error.connack_refusal(),
        Some(ConnackRefusal::V3UnacceptableProtocolVersion)
    );
    assert_eq!(
        error.connack_refusal().unwrap().bytes(),
        &[0x20, 0x02, 0x00, 0x01]
    );
    // Decided at the level byte: 2 + 2 + 6 + 1 bytes.
    assert_eq!(detect_protocol(&v3_1[..10], LIMIT), Ok(None));
    assert_eq!(detect_protocol(&v3_1[..11], LIMIT), Err(error));

    let mut future = hex(MOSQ_V5_QOS0);
    future[8] = 6;
    let error = detect_protocol(&future[..MQTT_LEVEL_AT], LIMIT).unwrap_err();
    assert_eq!(error, CodecError::UnsupportedProtocolLevel { level: 6 });
    assert_eq!(
        error.connack_refusal().unwrap().bytes(),
        &[0x20, 0x03, 0x00, 0x84, 0x00]
    );
}

#[test]
fn a_wrong_protocol_name_is_refused_at_the_first_wrong_byte() {
    // "HTTP" where "MQTT" belongs: the H at offset 4 decides.
    let mut bytes = hex(MOSQ_V311_QOS0);
    bytes[4] = b'H';
    assert_eq!(detect_protocol(&bytes[..4], LIMIT), Ok(None));
    let error = detect_protocol(&bytes[..5], LIMIT).unwrap_err();
    assert_eq!(error, CodecError::InvalidProtocolName);
    assert_eq!(error.connack_refusal(), None);
    // A name length other than 4 or 6 decides at its second byte.
    assert_eq!(
        detect_protocol(&[0x10, 0x20, 0x00, 0x05], LIMIT),
        Err(CodecError::InvalidProtocolName)
    );
    // So does an HTTP request, whose first byte is not CONNECT at all.
    assert_eq!(
        detect_protocol(b"GET / HTTP/1.1\r\n", LIMIT),
        Err(CodecError::FirstPacketNotConnect { packet_type: 4 })
    );
}

// ---------------------------------------------------------------------------------------
// Decoding real client bytes

#[test]
fn mosquitto_3_1_1_publish_and_subscribe_decode() {
    let frames = as_v4(decode_all(ProtocolVersion::V3_1_1, &hex(MOSQ_V311_QOS0)));
    let [
        v4::Packet::Connect(connect),
        v4::Packet::Publish(publish),
        v4::Packet::Disconnect,
    ] = &frames[..]
    else {
        panic!("unexpected frames {frames:?}");
    };
    assert_eq!(connect.client_id, "silt-cap");
    assert_eq!(connect.keep_alive, 60);
    assert!(connect.clean_session);
    assert_eq!(
        (publish.topic.as_str(), &publish.payload[..]),
        ("a/b", &b"hi"[..])
    );

    let frames = as_v4(decode_all(ProtocolVersion::V3_1_1, &hex(MOSQ_V311_QOS1)));
    let v4::Packet::Publish(publish) = &frames[1] else {
        panic!("unexpected frames {frames:?}");
    };
    assert_eq!((publish.qos, publish.pkid), (QoS4::AtLeastOnce, 1));

    let frames = as_v4(decode_all(ProtocolVersion::V3_1_1, &hex(MOSQ_V311_SUB)));
    let v4::Packet::Subscribe(subscribe) = &frames[1] else {
        panic!("unexpected frames {frames:?}");
    };
    assert_eq!(subscribe.pkid, 1);
    assert_eq!(
        subscribe.filters,
        vec![v4::SubscribeFilter::new("a/+".into(), QoS4::AtLeastOnce)]
    );
}

#[test]
fn mosquitto_5_packets_decode_with_their_properties() {
    let frames = as_v5(decode_all(ProtocolVersion::V5, &hex(MOSQ_V5_QOS0)));
    let [
        v5::Packet::Connect(connect, None, None),
        v5::Packet::Publish(publish),
        v5::Packet::Disconnect(disconnect),
    ] = &frames[..]
    else {
        panic!("unexpected frames {frames:?}");
    };
    assert_eq!(connect.client_id, "silt-cap");
    assert_eq!(
        connect.properties.as_ref().unwrap().receive_maximum,
        Some(20)
    );
    assert_eq!(
        (&publish.topic[..], &publish.payload[..]),
        (&b"a/b"[..], &b"hi"[..])
    );
    // `e0 00`: the zero-length form rumqttc 0.25 refuses on its own.
    assert_eq!(
        disconnect.reason_code,
        v5::DisconnectReasonCode::NormalDisconnection
    );

    let frames = as_v5(decode_all(ProtocolVersion::V5, &hex(MOSQ_V5_QOS1)));
    let v5::Packet::Publish(publish) = &frames[1] else {
        panic!("unexpected frames {frames:?}");
    };
    let properties = publish.properties.as_ref().unwrap();
    assert_eq!(publish.pkid, 1);
    assert_eq!(properties.user_properties, vec![("k".into(), "v".into())]);
    assert_eq!(properties.content_type.as_deref(), Some("text/plain"));

    let frames = as_v5(decode_all(ProtocolVersion::V5, &hex(MOSQ_V5_SUB)));
    let [
        _,
        v5::Packet::Subscribe(subscribe),
        v5::Packet::Disconnect(disconnect),
    ] = &frames[..]
    else {
        panic!("unexpected frames {frames:?}");
    };
    let paths: Vec<_> = subscribe.filters.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["a/+", "#"]);
    assert!(subscribe.filters.iter().all(|f| f.qos == QoS5::ExactlyOnce));
    // `e0 01 04`: a reason code without a property length, also refused by rumqttc alone.
    assert_eq!(
        disconnect.reason_code,
        v5::DisconnectReasonCode::DisconnectWithWillMessage
    );

    let frames = as_v5(decode_all(
        ProtocolVersion::V5,
        &hex(MOSQ_V5_SUBSCRIPTION_ID),
    ));
    let v5::Packet::Subscribe(subscribe) = &frames[1] else {
        panic!("unexpected frames {frames:?}");
    };
    let properties = subscribe.properties.as_ref().unwrap();
    assert_eq!(properties.id, Some(5));
    assert_eq!(properties.user_properties, vec![("k".into(), "v".into())]);
    assert_eq!(subscribe.filters.len(), 1);
    assert_eq!(subscribe.filters[0].path, "a/+");

    let frames = as_v5(decode_all(ProtocolVersion::V5, &hex(MOSQ_V5_WILL)));
    let v5::Packet::Connect(connect, Some(will), Some(login)) = &frames[0] else {
        panic!("unexpected frames {frames:?}");
    };
    assert_eq!(
        connect.properties.as_ref().unwrap().session_expiry_interval,
        Some(60)
    );
    assert_eq!(
        (&will.topic[..], &will.message[..]),
        (&b"w/t"[..], &b"gone"[..])
    );
    assert_eq!(will.qos, QoS5::AtLeastOnce);
    assert_eq!(
        will.properties.as_ref().unwrap().user_properties,
        vec![("a".into(), "b".into())]
    );
    assert_eq!(
        (login.username.as_str(), login.password.as_str()),
        ("user", "pass")
    );
}

#[test]
fn rumqttc_client_sessions_round_trip_through_the_decoder() {
    let packets = v4_session();
    let frames = as_v4(decode_all(ProtocolVersion::V3_1_1, &v4_bytes(&packets)));
    assert_eq!(frames, packets);

    let packets = v5_session();
    let frames = as_v5(decode_all(ProtocolVersion::V5, &v5_bytes(&packets)));
    assert_eq!(frames, packets);
}

#[test]
fn every_prefix_decodes_as_nothing_and_byte_by_byte_equals_whole() {
    let streams = [
        (ProtocolVersion::V3_1_1, v4_bytes(&v4_session())),
        (ProtocolVersion::V5, v5_bytes(&v5_session())),
        (ProtocolVersion::V3_1_1, hex(MOSQ_V311_SUB)),
        (ProtocolVersion::V5, hex(MOSQ_V5_SUB)),
        (ProtocolVersion::V5, hex(MOSQ_V5_WILL)),
        (ProtocolVersion::V5, hex(MOSQ_V5_SUBSCRIPTION_ID)),
    ];
    for (version, bytes) in streams {
        let whole = decode_all(version, &bytes);
        assert_eq!(decode_byte_by_byte(version, &bytes), whole);

        // A prefix decodes exactly the frames that end within it, then waits.
        let mut frame_ends = Vec::new();
        let mut end = 0;
        while end < bytes.len() {
            end += frame_bytes_needed(&bytes[end..], LIMIT).unwrap();
            frame_ends.push(end);
        }
        for len in 0..bytes.len() {
            let mut decoder = Decoder::new(version, LIMIT);
            let mut buf = BytesMut::from(&bytes[..len]);
            let mut decoded = 0;
            while decoder.decode(&mut buf).expect("valid prefix").is_some() {
                decoded += 1;
            }
            let complete = frame_ends.iter().filter(|&&end| end <= len).count();
            assert_eq!(decoded, complete, "prefix of {len} bytes");
            assert_eq!(buf.len(), len - frame_ends[..complete].last().unwrap_or(&0));
        }
    }
}

#[test]
fn v5_auth_decodes_in_both_forms() {
    for bytes in [
        &[0xF0, 0x00][..],
        &[0xF0, 0x01, 0x18],
        &[0xF0, 0x02, 0x19, 0x00],
    ] {
        let frame = decode_one(ProtocolVersion::V5, bytes).unwrap();
        assert!(
            matches!(frame, Some(Frame::V5(v5::Packet::Auth(_)))),
            "{bytes:02x?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: each gets its reason code (issue 3, item 5)

fn assert_refused(version: ProtocolVersion, bytes: &[u8], expected: CodecError, reason: u8) {
    let error = decode_one(version, bytes).unwrap_err();
    assert_eq!(error, expected, "{version:?} {bytes:02x?}");
    assert_eq!(error.reason_code(), reason);
}

#[test]
fn the_decoder_refuses_a_first_packet_that_is_not_connect() {
    let mut decoder = Decoder::new(ProtocolVersion::V5, LIMIT);
    let mut buf = BytesMut::from(&hex("30070003612f626869")[..]);
    let error = decoder.decode(&mut buf).unwrap_err();
    assert_eq!(error, CodecError::FirstPacketNotConnect { packet_type: 3 });
    assert_eq!(error.reason_code(), 0x82);
}

#[test]
fn a_remaining_length_over_the_limit_is_refused_before_the_body_arrives() {
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let mut decoder = connected(version);
        // PUBLISH announcing 268,435,455 bytes; only the fixed header is here.
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
        let error = decoder.decode(&mut buf).unwrap_err();
        assert!(matches!(error, CodecError::PacketTooLarge { .. }));
        assert_eq!(error.reason_code(), 0x95);

        // Exactly the limit is accepted; one byte more is refused from the fixed header.
        let publish = |payload_bytes: usize| match version {
            ProtocolVersion::V3_1_1 => v4_bytes(&[v4::Packet::Publish(v4::Publish::new(
                "t",
                QoS4::AtMostOnce,
                vec![0u8; payload_bytes],
            ))]),
            ProtocolVersion::V5 => v5_bytes(&[v5::Packet::Publish(v5::Publish::new(
                "t",
                QoS5::AtMostOnce,
                vec![0u8; payload_bytes],
                None,
            ))]),
        };
        let payload_bytes = (0..LIMIT as usize)
            .find(|&payload_bytes| publish(payload_bytes).len() == LIMIT as usize)
            .expect("some payload fills the limit exactly");
        assert!(matches!(
            decode_one(version, &publish(payload_bytes)),
            Ok(Some(_))
        ));
        let over = publish(payload_bytes + 1);
        assert_eq!(
            decode_one(version, &over[..3]),
            Err(CodecError::PacketTooLarge {
                len_bytes: u64::from(LIMIT) + 1,
                limit_bytes: LIMIT
            })
        );
    }
}

#[test]
fn a_zero_length_topic_is_a_protocol_error_unless_v5_names_an_alias() {
    // PUBLISH QoS 0, topic length 0, payload "hi".
    assert_refused(
        ProtocolVersion::V3_1_1,
        &hex("300400006869"),
        ProtocolViolation::TopicEmpty.into(),
        0x82,
    );
    // 5.0 with an empty property block.
    assert_refused(
        ProtocolVersion::V5,
        &hex("30050000006869"),
        ProtocolViolation::TopicEmpty.into(),
        0x82,
    );
    // 5.0 with Topic Alias 1 (property 0x23): valid.
    let frame = decode_one(ProtocolVersion::V5, &hex("30080000032300016869"));
    let Ok(Some(Frame::V5(v5::Packet::Publish(publish)))) = frame else {
        panic!("unexpected {frame:?}");
    };
    assert_eq!(publish.properties.unwrap().topic_alias, Some(1));
}

#[test]
fn a_qos_1_publish_without_a_packet_id_is_malformed() {
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        // Topic "a/b" and nothing after it.
        assert_refused(
            version,
            &hex("32050003612f62"),
            Malformation::PacketIdMissing.into(),
            0x81,
        );
        // One byte where two belong.
        assert_refused(
            version,
            &hex("34060003612f6200"),
            Malformation::PacketIdMissing.into(),
            0x81,
        );
        // Packet identifier 0.
        assert_refused(
            version,
            &hex("32080003612f6200006869"),
            ProtocolViolation::PacketIdZero.into(),
            0x82,
        );
    }
}

#[test]
fn a_subscribe_missing_its_options_byte_is_malformed() {
    // SUBSCRIBE packet id 1, filter "a/b", no options byte.
    assert_refused(
        ProtocolVersion::V3_1_1,
        &hex("820700010003612f62"),
        Malformation::SubscribeOptionsMissing.into(),
        0x81,
    );
    // 5.0: the same after an empty property block; the second filter lacks its options.
    assert_refused(
        ProtocolVersion::V5,
        &hex("820e0001000003612f62010003632f64"),
        Malformation::SubscribeOptionsMissing.into(),
        0x81,
    );
}

#[test]
fn subscribe_and_unsubscribe_content_rules() {
    let v4 = ProtocolVersion::V3_1_1;
    let v5 = ProtocolVersion::V5;
    // No filters at all.
    assert_refused(
        v4,
        &hex("82020001"),
        ProtocolViolation::SubscribeEmpty.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex("8203000100"),
        ProtocolViolation::SubscribeEmpty.into(),
        0x82,
    );
    assert_refused(
        v4,
        &hex("a2020001"),
        ProtocolViolation::UnsubscribeEmpty.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex("a203000100"),
        ProtocolViolation::UnsubscribeEmpty.into(),
        0x82,
    );
    // Packet identifier 0.
    assert_refused(
        v4,
        &hex("8206000000016100"),
        ProtocolViolation::PacketIdZero.into(),
        0x82,
    );
    // Requested QoS 3; Retain Handling 3; reserved option bits.
    assert_refused(
        v4,
        &hex("8206000100016103"),
        ProtocolViolation::SubscriptionQos3.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex("820700010000016130"),
        ProtocolViolation::RetainHandling3.into(),
        0x82,
    );
    assert_refused(
        v4,
        &hex("8206000100016104"),
        Malformation::SubscribeOptionsReserved { options: 0x04 }.into(),
        0x81,
    );
    assert_refused(
        v5,
        &hex("820700010000016140"),
        Malformation::SubscribeOptionsReserved { options: 0x40 }.into(),
        0x81,
    );
    // A filter length running past the packet.
    assert_refused(
        v4,
        &hex("8206000100096101"),
        Malformation::Truncated.into(),
        0x81,
    );
}

#[test]
fn fixed_header_flags_and_lengths_are_checked() {
    let v4 = ProtocolVersion::V3_1_1;
    let v5 = ProtocolVersion::V5;
    // PUBLISH with both QoS bits set.
    assert_refused(
        v5,
        &hex("36070003612f620001"),
        Malformation::PublishQos3.into(),
        0x81,
    );
    // SUBSCRIBE with flags 0000 instead of 0010.
    assert_refused(
        v4,
        &hex("8006000100016101"),
        Malformation::ReservedFlags {
            packet_type: 8,
            flags: 0,
        }
        .into(),
        0x81,
    );
    // PINGREQ with a body; 3.1.1 PUBACK longer than 2.
    assert_refused(
        v5,
        &hex("c00100"),
        Malformation::RemainingLength {
            packet_type: 12,
            remaining_len: 1,
        }
        .into(),
        0x81,
    );
    assert_refused(
        v4,
        &hex("4003000100"),
        Malformation::RemainingLength {
            packet_type: 4,
            remaining_len: 3,
        }
        .into(),
        0x81,
    );
    // Packets only a server sends, and a second CONNECT.
    assert_refused(
        v4,
        &hex("d000"),
        ProtocolViolation::ServerPacket { packet_type: 13 }.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex("20020000"),
        ProtocolViolation::ServerPacket { packet_type: 2 }.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex(MOSQ_V5_QOS0),
        ProtocolViolation::SecondConnect.into(),
        0x82,
    );
    // AUTH does not exist in 3.1.1.
    assert_refused(
        v4,
        &hex("f000"),
        Malformation::ReservedPacketType { packet_type: 15 }.into(),
        0x81,
    );
}

#[test]
fn property_blocks_and_packet_ends_are_checked() {
    let v5 = ProtocolVersion::V5;
    // A Topic Alias (two bytes) in a property block of two: it straddles the block's end.
    assert_refused(
        v5,
        &hex("300a0003612f620223006869"),
        Malformation::PropertyOverrun.into(),
        0x81,
    );
    // Property identifier 0x07 does not exist.
    assert_refused(
        v5,
        &hex("30090003612f6201076869"),
        Malformation::Property { id: 0x07 }.into(),
        0x81,
    );
    // A Subscription Identifier in a client's PUBLISH; two in one SUBSCRIBE; the value 0.
    assert_refused(
        v5,
        &hex("300a0003612f62020b016869"),
        ProtocolViolation::SubscriptionIdInPublish.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex("820b0001040b010b0200016101"),
        ProtocolViolation::SubscriptionIdRepeated.into(),
        0x82,
    );
    assert_refused(
        v5,
        &hex("82090001020b0000016101"),
        ProtocolViolation::SubscriptionIdZero.into(),
        0x82,
    );
    // A PUBACK with bytes after its property block.
    assert_refused(
        v5,
        &hex("400500010000ff"),
        Malformation::TrailingBytes { packet_type: 4 }.into(),
        0x81,
    );
    // A CONNECT with a byte after its last field.
    let mut connect = hex(&MOSQ_V311_QOS0[..44]);
    connect[1] += 1;
    connect.push(0);
    let error = Decoder::new(ProtocolVersion::V3_1_1, LIMIT)
        .decode(&mut BytesMut::from(&connect[..]))
        .unwrap_err();
    assert_eq!(error, Malformation::TrailingBytes { packet_type: 1 }.into());
}

#[test]
fn connect_flags_and_version_are_checked() {
    let fresh =
        |version, bytes: &[u8]| Decoder::new(version, LIMIT).decode(&mut BytesMut::from(bytes));
    let with_flags = |base: &str, flags: u8| {
        let mut bytes = hex(base);
        bytes[9] = flags;
        bytes
    };
    // Reserved flag bit 0.
    let error = fresh(ProtocolVersion::V3_1_1, &with_flags(MOSQ_V311_QOS0, 0x03)).unwrap_err();
    assert_eq!(error, Malformation::ConnectReservedFlag.into());
    assert_eq!(error.reason_code(), 0x81);
    // Will QoS without the will flag.
    let error = fresh(ProtocolVersion::V5, &with_flags(MOSQ_V5_QOS0, 0x0A)).unwrap_err();
    assert_eq!(error, Malformation::WillFlags.into());
    // 3.1.1 password without a user name.
    let error = fresh(ProtocolVersion::V3_1_1, &with_flags(MOSQ_V311_QOS0, 0x42)).unwrap_err();
    assert_eq!(error, Malformation::PasswordWithoutUsername.into());
    // A 5.0 CONNECT offered to a 3.1.1 decoder.
    let error = fresh(ProtocolVersion::V3_1_1, &hex(MOSQ_V5_QOS0)).unwrap_err();
    assert_eq!(error, CodecError::UnsupportedProtocolLevel { level: 5 });
}

// ---------------------------------------------------------------------------------------
// Arbitrary input

/// Runs `bytes` through detection and a decoder the way a connection does, reading in
/// `chunk`-byte pieces, and checks the framing invariants at every step.
fn connection(bytes: &[u8], chunk: usize, limit: u32) {
    let mut buf = BytesMut::new();
    let mut input = bytes;
    let mut decoder: Option<Decoder> = None;
    loop {
        let needed = match frame_bytes_needed(&buf, limit) {
            Ok(needed) => needed,
            Err(_) => {
                // A fixed header the length check refuses is refused by decoding too.
                match &mut decoder {
                    Some(decoder) => assert!(decoder.decode(&mut buf).is_err()),
                    None => assert!(detect_protocol(&buf, limit).is_err()),
                }
                return;
            }
        };
        assert!(needed <= limit as usize, "needed {needed} > limit {limit}");
        let whole = buf.len() >= needed;
        let progress = match &mut decoder {
            None => match detect_protocol(&buf, limit) {
                Ok(Some(version)) => {
                    decoder = Some(Decoder::new(version, limit));
                    true
                }
                Ok(None) => {
                    assert!(!whole, "a whole CONNECT always decides the version");
                    false
                }
                Err(_) => return,
            },
            Some(decoder) => {
                let before = Bytes::copy_from_slice(&buf);
                match decoder.decode(&mut buf) {
                    Ok(Some(_)) => {
                        assert!(whole);
                        assert_eq!(&before[needed..], &buf[..], "consumed one whole frame");
                        true
                    }
                    Ok(None) => {
                        assert_eq!(&before[..], &buf[..], "waiting leaves the buffer alone");
                        assert!(!whole, "a whole frame always decodes or fails");
                        false
                    }
                    Err(error) => {
                        assert!(matches!(error.reason_code(), 0x81 | 0x82 | 0x84 | 0x95));
                        return;
                    }
                }
            }
        };
        if !progress {
            if input.is_empty() {
                return;
            }
            // A connection reads no more than the next frame still needs, so its buffer
            // stays within the limit whatever a length field claims.
            let take = chunk.min(input.len()).min(needed - buf.len());
            buf.extend_from_slice(&input[..take]);
            input = &input[take..];
            assert!(buf.len() <= limit as usize);
        }
    }
}

fn valid_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(v4_bytes(&v4_session())),
        Just(v5_bytes(&v5_session())),
        Just(hex(MOSQ_V5_SUB)),
        Just(hex(MOSQ_V5_WILL)),
        Just(hex(MOSQ_V311_SUB)),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_or_outgrow_the_limit(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..64,
        limit in 2u32..512,
    ) {
        connection(&bytes, chunk, limit);
        let _ = detect_protocol(&bytes, limit);
        for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
            let mut decoder = Decoder::new(version, limit);
            let _ = decoder.decode(&mut BytesMut::from(&bytes[..]));
        }
    }

    #[test]
    fn valid_connect_then_arbitrary_bytes_never_panic(
        version in prop_oneof![Just(ProtocolVersion::V3_1_1), Just(ProtocolVersion::V5)],
        tail in proptest::collection::vec(any::<u8>(), 0..400),
        chunk in 1usize..64,
    ) {
        let mut bytes = match version {
            ProtocolVersion::V3_1_1 => v4_bytes(&[v4_connect()]),
            ProtocolVersion::V5 => v5_bytes(&[v5_connect()]),
        };
        bytes.extend_from_slice(&tail);
        connection(&bytes, chunk, LIMIT);
    }

    #[test]
    fn mutated_client_streams_never_panic(
        stream in valid_stream(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        chunk in 1usize..64,
    ) {
        let mut bytes = stream;
        for (index, byte) in edits {
            let at = index.index(bytes.len());
            bytes[at] = byte;
        }
        connection(&bytes, chunk, LIMIT);
    }

    #[test]
    fn publishes_round_trip(
        topic in "[a-z/]{1,40}",
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        qos in 0u8..3,
        pkid in 1u16..,
        retain in any::<bool>(),
    ) {
        let qos4 = [QoS4::AtMostOnce, QoS4::AtLeastOnce, QoS4::ExactlyOnce][qos as usize];
        let mut publish = v4::Publish::new(topic.clone(), qos4, payload.clone());
        publish.retain = retain;
        publish.pkid = if qos == 0 { 0 } else { pkid };
        let packets = vec![v4_connect(), v4::Packet::Publish(publish)];
        prop_assert_eq!(
            as_v4(decode_all(ProtocolVersion::V3_1_1, &v4_bytes(&packets))),
            packets
        );

        let qos5 = [QoS5::AtMostOnce, QoS5::AtLeastOnce, QoS5::ExactlyOnce][qos as usize];
        let mut publish = v5::Publish::new(topic, qos5, payload, None);
        publish.retain = retain;
        publish.pkid = if qos == 0 { 0 } else { pkid };
        let packets = vec![v5_connect(), v5::Packet::Publish(publish)];
        prop_assert_eq!(
            as_v5(decode_all(ProtocolVersion::V5, &v5_bytes(&packets))),
            packets
        );
    }
}
