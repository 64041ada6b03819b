//! The packets a server sends, for 3.1.1 and 5.0, written by hand.
//!
//! rumqttc's writers are client-oriented and wrong in places (a DISCONNECT with a reason and
//! no properties, Subscription Identifier lengths), and the server needs a packet's size before
//! it decides to send it (the client's Maximum Packet Size), so every packet is built here:
//! body first, then the fixed header in front of it.

use bytes::{BufMut, Bytes, BytesMut};

/// Packet type nibbles, shifted into the first byte.
const CONNACK: u8 = 0x20;
const PUBLISH: u8 = 0x30;
const PUBACK: u8 = 0x40;
const PUBREC: u8 = 0x50;
const PUBREL: u8 = 0x62;
const PUBCOMP: u8 = 0x70;
const SUBACK: u8 = 0x90;
const UNSUBACK: u8 = 0xB0;
const PINGRESP: u8 = 0xD0;

/// 5.0 property identifiers (§2.2.2.2) the server writes.
mod property {
    pub(super) const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub(super) const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub(super) const CONTENT_TYPE: u8 = 0x03;
    pub(super) const RESPONSE_TOPIC: u8 = 0x08;
    pub(super) const CORRELATION_DATA: u8 = 0x09;
    pub(super) const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub(super) const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub(super) const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub(super) const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub(super) const REASON_STRING: u8 = 0x1F;
    pub(super) const RECEIVE_MAXIMUM: u8 = 0x21;
    pub(super) const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub(super) const TOPIC_ALIAS: u8 = 0x23;
    pub(super) const USER_PROPERTY: u8 = 0x26;
    pub(super) const MAXIMUM_PACKET_SIZE: u8 = 0x27;
}

/// Appends a variable byte integer (§1.5.5). Values are below 2^28 by construction.
fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a two-byte-length string or binary field. Callers pass fields that came from
/// packets (so at most 65,535 bytes) or short constants.
fn put_field(out: &mut BytesMut, bytes: &[u8]) {
    let len = bytes.len().min(usize::from(u16::MAX));
    out.put_u16(len as u16);
    out.put_slice(&bytes[..len]);
}

/// Puts `first_byte`, the remaining length and `body` at the end of `out`.
fn frame(out: &mut BytesMut, first_byte: u8, body: &[u8]) {
    out.reserve(1 + varint_len(body.len()) + body.len());
    out.put_u8(first_byte);
    put_varint(out, body.len());
    out.put_slice(body);
}

/// The whole size of a packet with a body of `body_len` bytes.
pub(crate) fn packet_len(body_len: usize) -> usize {
    1 + varint_len(body_len) + body_len
}

/// Appends a property block: its length, then the properties in `props`.
fn put_properties(out: &mut BytesMut, props: &[u8]) {
    put_varint(out, props.len());
    out.put_slice(props);
}

/// What a 5.0 CONNACK tells the client about the server's limits.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnackProperties {
    pub(crate) session_expiry_interval: Option<u32>,
    pub(crate) receive_maximum: Option<u16>,
    pub(crate) maximum_packet_size: Option<u32>,
    pub(crate) assigned_client_identifier: Option<String>,
    pub(crate) topic_alias_maximum: Option<u16>,
    pub(crate) server_keep_alive: Option<u16>,
    pub(crate) reason_string: Option<String>,
}

/// CONNACK. A 3.1.1 `code` is a return code (0-5), a 5.0 one a reason code.
pub(crate) fn connack(
    out: &mut BytesMut,
    v5: bool,
    session_present: bool,
    code: u8,
    properties: &ConnackProperties,
) {
    let mut body = BytesMut::with_capacity(64);
    body.put_u8(u8::from(session_present));
    body.put_u8(code);
    if v5 {
        let mut props = BytesMut::new();
        if let Some(value) = properties.session_expiry_interval {
            props.put_u8(property::SESSION_EXPIRY_INTERVAL);
            props.put_u32(value);
        }
        if let Some(value) = properties.receive_maximum {
            props.put_u8(property::RECEIVE_MAXIMUM);
            props.put_u16(value);
        }
        if let Some(value) = properties.maximum_packet_size {
            props.put_u8(property::MAXIMUM_PACKET_SIZE);
            props.put_u32(value);
        }
        if let Some(value) = &properties.assigned_client_identifier {
            props.put_u8(property::ASSIGNED_CLIENT_IDENTIFIER);
            put_field(&mut props, value.as_bytes());
        }
        if let Some(value) = properties.topic_alias_maximum {
            props.put_u8(property::TOPIC_ALIAS_MAXIMUM);
            props.put_u16(value);
        }
        if let Some(value) = properties.server_keep_alive {
            props.put_u8(property::SERVER_KEEP_ALIVE);
            props.put_u16(value);
        }
        if let Some(value) = &properties.reason_string {
            props.put_u8(property::REASON_STRING);
            put_field(&mut props, value.as_bytes());
        }
        put_properties(&mut body, &props);
    }
    frame(out, CONNACK, &body);
}

/// The 5.0 properties a forwarded PUBLISH carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PublishProperties {
    pub(crate) payload_format_utf8: Option<bool>,
    pub(crate) content_type: Option<String>,
    pub(crate) response_topic: Option<String>,
    pub(crate) correlation_data: Option<Bytes>,
    pub(crate) user_properties: Vec<(String, String)>,
}

/// One outbound PUBLISH.
#[derive(Debug)]
pub(crate) struct OutPublish<'a> {
    pub(crate) topic: &'a str,
    pub(crate) topic_alias: Option<u16>,
    pub(crate) qos: u8,
    pub(crate) packet_id: Option<u16>,
    pub(crate) dup: bool,
    pub(crate) retain: bool,
    pub(crate) payload: &'a [u8],
    pub(crate) message_expiry: Option<u32>,
    pub(crate) subscription_ids: &'a [u32],
    pub(crate) properties: &'a PublishProperties,
}

/// Builds a PUBLISH into a fresh buffer, so the caller can check its size against the client's
/// Maximum Packet Size before sending it.
pub(crate) fn publish(v5: bool, publish: &OutPublish<'_>) -> BytesMut {
    let mut props = BytesMut::new();
    if v5 {
        let p = publish.properties;
        if let Some(utf8) = p.payload_format_utf8 {
            props.put_u8(property::PAYLOAD_FORMAT_INDICATOR);
            props.put_u8(u8::from(utf8));
        }
        if let Some(expiry) = publish.message_expiry {
            props.put_u8(property::MESSAGE_EXPIRY_INTERVAL);
            props.put_u32(expiry);
        }
        if let Some(alias) = publish.topic_alias {
            props.put_u8(property::TOPIC_ALIAS);
            props.put_u16(alias);
        }
        if let Some(topic) = &p.response_topic {
            props.put_u8(property::RESPONSE_TOPIC);
            put_field(&mut props, topic.as_bytes());
        }
        if let Some(data) = &p.correlation_data {
            props.put_u8(property::CORRELATION_DATA);
            put_field(&mut props, data);
        }
        for (key, value) in &p.user_properties {
            props.put_u8(property::USER_PROPERTY);
            put_field(&mut props, key.as_bytes());
            put_field(&mut props, value.as_bytes());
        }
        for &id in publish.subscription_ids {
            props.put_u8(property::SUBSCRIPTION_IDENTIFIER);
            put_varint(&mut props, id as usize);
        }
        if let Some(content_type) = &p.content_type {
            props.put_u8(property::CONTENT_TYPE);
            put_field(&mut props, content_type.as_bytes());
        }
    }
    let mut body_len = 2 + publish.topic.len() + publish.payload.len();
    if publish.packet_id.is_some() {
        body_len += 2;
    }
    if v5 {
        body_len += varint_len(props.len()) + props.len();
    }
    let mut out = BytesMut::with_capacity(packet_len(body_len));
    let mut first = PUBLISH | (publish.qos << 1);
    if publish.dup {
        first |= 0x08;
    }
    if publish.retain {
        first |= 0x01;
    }
    out.put_u8(first);
    put_varint(&mut out, body_len);
    put_field(&mut out, publish.topic.as_bytes());
    if let Some(id) = publish.packet_id {
        out.put_u16(id);
    }
    if v5 {
        put_properties(&mut out, &props);
    }
    out.put_slice(publish.payload);
    out
}

/// Which acknowledgement of the QoS flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    Puback,
    Pubrec,
    Pubrel,
    Pubcomp,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP. 5.0 uses the short form for success (§3.4.2.1).
pub(crate) fn ack(out: &mut BytesMut, v5: bool, kind: Ack, packet_id: u16, reason: u8) {
    let first = match kind {
        Ack::Puback => PUBACK,
        Ack::Pubrec => PUBREC,
        Ack::Pubrel => PUBREL,
        Ack::Pubcomp => PUBCOMP,
    };
    let mut body = [0u8; 3];
    body[..2].copy_from_slice(&packet_id.to_be_bytes());
    if v5 && reason != 0 {
        body[2] = reason;
        frame(out, first, &body);
    } else {
        frame(out, first, &body[..2]);
    }
}

/// SUBACK with one code per filter: granted QoS or a failure (0x80 in 3.1.1).
pub(crate) fn suback(out: &mut BytesMut, v5: bool, packet_id: u16, codes: &[u8]) {
    let mut body = BytesMut::with_capacity(3 + codes.len());
    body.put_u16(packet_id);
    if v5 {
        put_properties(&mut body, &[]);
    }
    body.put_slice(codes);
    frame(out, SUBACK, &body);
}

/// UNSUBACK: 3.1.1 has no payload; 5.0 has one reason code per filter.
pub(crate) fn unsuback(out: &mut BytesMut, v5: bool, packet_id: u16, codes: &[u8]) {
    let mut body = BytesMut::with_capacity(3 + codes.len());
    body.put_u16(packet_id);
    if v5 {
        put_properties(&mut body, &[]);
        body.put_slice(codes);
    }
    frame(out, UNSUBACK, &body);
}

pub(crate) fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[PINGRESP, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_the_boundaries() {
        for (value, bytes) in [
            (0usize, vec![0x00]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (268_435_455, vec![0xFF, 0xFF, 0xFF, 0x7F]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(&out[..], &bytes[..], "{value}");
            assert_eq!(varint_len(value), bytes.len());
        }
    }

    #[test]
    fn acks_use_the_short_form_for_success() {
        let mut out = BytesMut::new();
        ack(&mut out, true, Ack::Puback, 7, 0);
        assert_eq!(&out[..], &[0x40, 2, 0, 7]);
        out.clear();
        ack(&mut out, true, Ack::Puback, 7, 0x97);
        assert_eq!(&out[..], &[0x40, 3, 0, 7, 0x97]);
        out.clear();
        ack(&mut out, false, Ack::Pubrel, 1, 0x97);
        assert_eq!(&out[..], &[0x62, 2, 0, 1]);
    }

    #[test]
    fn publish_length_matches_what_is_written() {
        let props = PublishProperties {
            user_properties: vec![("a".into(), "b".into())],
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let packet = publish(
            true,
            &OutPublish {
                topic: "a/b",
                topic_alias: Some(3),
                qos: 1,
                packet_id: Some(9),
                dup: true,
                retain: false,
                payload: b"hello",
                message_expiry: Some(10),
                subscription_ids: &[1, 200],
                properties: &props,
            },
        );
        assert_eq!(packet[0], 0x3A);
        let mut buf = packet.clone();
        let decoded = rumqttc::v5::mqttbytes::v5::Packet::read(&mut buf, None).unwrap();
        let rumqttc::v5::mqttbytes::v5::Packet::Publish(p) = decoded else {
            panic!("not a publish")
        };
        assert_eq!(&p.payload[..], b"hello");
        assert_eq!(p.pkid, 9);
    }
}
