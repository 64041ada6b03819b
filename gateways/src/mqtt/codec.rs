//! MQTT framing for the broker's connections: protocol detection from the first CONNECT, and a
//! server-side frame decoder for 3.1.1 and 5.0 over rumqttc's packet codec, on caller buffers.
//!
//! A connection reads bytes into a `BytesMut` and, until [`detect_protocol`] names a version,
//! decodes nothing; then it builds a [`Decoder`] for that version and calls
//! [`Decoder::decode`] after every read. Both answer `Ok(None)` while the bytes so far cannot
//! decide, and both decide as early as the bytes allow: a fixed header announcing a packet over
//! the limit is refused before its body arrives, so a client cannot make us buffer more than
//! `max_packet_bytes` (a total packet size, fixed header included, as MQTT 5.0's Maximum Packet
//! Size counts it). [`frame_bytes_needed`] says how far a read buffer must grow.
//!
//! rumqttc parses packet bodies; this module checks the fixed header itself and walks the
//! fields rumqttc is lenient or wrong about before handing it a complete frame:
//! - reserved packet types and reserved fixed-header flags, PUBLISH QoS 3 and DUP on QoS 0,
//!   and remaining lengths that a packet type cannot have (PINGREQ with a body);
//! - packets only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP), a first packet other
//!   than CONNECT and a second CONNECT;
//! - CONNECT flags (reserved bit, will QoS/retain without a will, will QoS 3, and in 3.1.1 a
//!   password without a user name) and a protocol name/level that disagrees with the decoder;
//! - PUBLISH without its packet identifier, with packet identifier 0, or with a zero-length
//!   topic (allowed in 5.0 only with a Topic Alias), and 5.0 topics that are not UTF-8;
//! - SUBSCRIBE/UNSUBSCRIBE with packet identifier 0 or no payload, a SUBSCRIBE filter without
//!   its options byte, reserved option bits, QoS 3 and Retain Handling 3;
//! - every field's length against the packet's end, bytes after a packet's last field, and
//!   5.0 property blocks: each property whole and the block ending where its length says
//!   (rumqttc would let a property straddle the end and eat into the payload);
//! - 5.0 Subscription Identifiers: none in a client's PUBLISH, at most one in a SUBSCRIBE
//!   (rumqttc 0.25 counts each one byte too long, and with two or more that can end its
//!   property loop early and misparse what follows);
//! - 5.0 DISCONNECT and AUTH in their short forms (remaining length 0 or 1), which rumqttc
//!   0.25 refuses although the spec allows them (mosquitto_sub sends `e0 01 04`).
//!
//! Left to the session layer: property semantics (duplicates, Topic Alias 0 or above the
//! maximum, Receive Maximum 0, Maximum Packet Size 0), topic name and filter rules
//! (`mqtt::topic`), and AUTH without an authentication method. Known rumqttc
//! 0.25 limits that remain: passwords are read as UTF-8 strings, so a binary password is
//! refused as malformed; AUTH's Authentication Method and Reason String are counted two bytes
//! short, so an AUTH carrying one fails as malformed (the broker offers no enhanced
//! authentication, so any AUTH ends the connection anyway).
//!
//! Every error says what the gateway answers before closing: [`CodecError::reason_code`] is
//! the MQTT 5.0 reason code for a CONNACK (on the first packet) or DISCONNECT, and
//! [`CodecError::connack_refusal`] the CONNACK a client gets whose protocol level we refuse;
//! [`write_v5_disconnect`] writes the DISCONNECT, which rumqttc 0.25.1 encodes wrongly.
//! A 3.1.1 client gets no reason code: the spec has the server just close the connection.

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::Error as V4Error;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::Error as V5Error;
use rumqttc::v5::mqttbytes::v5;

use super::reason;

/// The largest remaining length a four-byte variable byte integer can carry (§1.5.5).
pub const REMAINING_LENGTH_MAX: u32 = 268_435_455;

/// The smallest possible packet: a fixed header with a zero remaining length.
const FRAME_BYTES_MIN: usize = 2;

/// A variable byte integer has at most four bytes.
const VARINT_BYTES_MAX: usize = 4;

/// The fixed header's packet types (§2.1.2).
mod packet_type {
    pub(super) const RESERVED: u8 = 0;
    pub(super) const CONNECT: u8 = 1;
    pub(super) const CONNACK: u8 = 2;
    pub(super) const PUBLISH: u8 = 3;
    pub(super) const PUBACK: u8 = 4;
    pub(super) const PUBREC: u8 = 5;
    pub(super) const PUBREL: u8 = 6;
    pub(super) const PUBCOMP: u8 = 7;
    pub(super) const SUBSCRIBE: u8 = 8;
    pub(super) const SUBACK: u8 = 9;
    pub(super) const UNSUBSCRIBE: u8 = 10;
    pub(super) const UNSUBACK: u8 = 11;
    pub(super) const PINGREQ: u8 = 12;
    pub(super) const PINGRESP: u8 = 13;
    pub(super) const DISCONNECT: u8 = 14;
    pub(super) const AUTH: u8 = 15;
}

/// MQTT 5.0 reason codes (§2.4) for framing errors, beside those in [`reason`].
pub mod reason_code {
    /// 0x81: Malformed Packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// 0x82: Protocol Error.
    pub const PROTOCOL_ERROR: u8 = super::reason::PROTOCOL_ERROR;
    /// 0x84: Unsupported Protocol Version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    /// 0x95: Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
}

/// The MQTT versions the broker speaks, named by CONNECT's protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1.1: protocol name "MQTT", level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name "MQTT", level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte in CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// The CONNACK a client gets before the connection closes when its protocol level is refused,
/// in the form that client can read (3.1.1 §3.1.2.2, 5.0 §3.1.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnackRefusal {
    /// A 3.1.1 CONNACK with return code 0x01 (unacceptable protocol version), for levels
    /// below 5: MQTT 3.1 ("MQIsdp", level 3) clients read this form too.
    V3UnacceptableProtocolVersion,
    /// A 5.0 CONNACK with reason code 0x84 (Unsupported Protocol Version), for levels above 5.
    V5UnsupportedProtocolVersion,
}

impl ConnackRefusal {
    /// The encoded CONNACK: session present 0, the refusal code, and in 5.0 no properties.
    pub fn bytes(self) -> &'static [u8] {
        match self {
            ConnackRefusal::V3UnacceptableProtocolVersion => &[0x20, 0x02, 0x00, 0x01],
            ConnackRefusal::V5UnsupportedProtocolVersion => &[
                0x20,
                0x03,
                0x00,
                reason_code::UNSUPPORTED_PROTOCOL_VERSION,
                0x00,
            ],
        }
    }
}

/// Writes a 5.0 DISCONNECT carrying `reason_code` and no properties: `e0 00` for 0x00
/// (Normal disconnection), `e0 01 <reason_code>` otherwise (§3.14.2.1).
///
/// rumqttc 0.25.1 cannot: `Disconnect::write` with a non-zero reason and no properties emits
/// `e0 01 <reason> 00`, one byte more than its remaining length, and with empty properties
/// emits `e0 00`, dropping the reason. Either would reach the client as a corrupt stream or
/// the wrong reason, so the gateway writes its DISCONNECTs here.
pub fn write_v5_disconnect(reason_code: u8, buf: &mut BytesMut) {
    if reason_code == 0 {
        buf.put_slice(&[0xE0, 0x00]);
    } else {
        buf.put_slice(&[0xE0, 0x01, reason_code]);
    }
}

/// Why a packet cannot be parsed: the spec calls it a Malformed Packet (5.0 §4.13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformation {
    #[error("a variable byte integer is longer than 4 bytes or not minimally encoded")]
    VariableByteInteger,
    #[error("packet type {packet_type} is reserved")]
    ReservedPacketType { packet_type: u8 },
    #[error("packet type {packet_type} has reserved fixed-header flags {flags:#06b}")]
    ReservedFlags { packet_type: u8, flags: u8 },
    #[error("a PUBLISH has both QoS bits set (QoS 3)")]
    PublishQos3,
    #[error("a QoS 0 PUBLISH has the DUP flag set")]
    DupOnQos0,
    #[error("packet type {packet_type} cannot have a remaining length of {remaining_len}")]
    RemainingLength { packet_type: u8, remaining_len: u32 },
    #[error("a field runs past the end of the packet")]
    Truncated,
    #[error("a property runs past the end of its property block")]
    PropertyOverrun,
    #[error("packet type {packet_type} has bytes after its last field")]
    TrailingBytes { packet_type: u8 },
    #[error("a QoS 1 or 2 PUBLISH has no packet identifier")]
    PacketIdMissing,
    #[error("the reserved CONNECT flag is set")]
    ConnectReservedFlag,
    #[error("the will QoS or retain flag is set without the will flag, or the will QoS is 3")]
    WillFlags,
    #[error("the password flag is set without the user name flag")]
    PasswordWithoutUsername,
    #[error("a string is not valid UTF-8")]
    NotUtf8,
    #[error("a SUBSCRIBE topic filter is not followed by its subscription options byte")]
    SubscribeOptionsMissing,
    #[error("subscription options {options:#010b} set reserved bits")]
    SubscribeOptionsReserved { options: u8 },
    #[error("property identifier {id} is not valid in this packet")]
    Property { id: u8 },
    #[error("reason code {code:#04x} is not valid in this packet")]
    ReasonCode { code: u8 },
    #[error("the packet cannot be parsed: {detail}")]
    Unparseable { detail: &'static str },
}

/// A packet that parses but breaks a rule of the protocol (5.0 §4.13: Protocol Error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    #[error("a client sent packet type {packet_type}, which only a server sends")]
    ServerPacket { packet_type: u8 },
    #[error("a second CONNECT arrived on the connection")]
    SecondConnect,
    #[error("packet identifier 0")]
    PacketIdZero,
    #[error("a SUBSCRIBE has no topic filters")]
    SubscribeEmpty,
    #[error("an UNSUBSCRIBE has no topic filters")]
    UnsubscribeEmpty,
    #[error("a PUBLISH has a zero-length topic name and no topic alias")]
    TopicEmpty,
    #[error("a subscription asks for QoS 3")]
    SubscriptionQos3,
    #[error("a subscription asks for Retain Handling 3")]
    RetainHandling3,
    #[error("subscription identifier 0")]
    SubscriptionIdZero,
    #[error("a SUBSCRIBE carries more than one subscription identifier")]
    SubscriptionIdRepeated,
    #[error("a client's PUBLISH carries a subscription identifier")]
    SubscriptionIdInPublish,
}

/// Why the bytes from a client cannot be framed; the connection answers and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The first packet is not CONNECT (§3.1): close without answering.
    #[error("the first packet has type {packet_type}, not CONNECT")]
    FirstPacketNotConnect { packet_type: u8 },
    /// A fixed header announces a packet over the limit (at least `len_bytes` long).
    #[error("a packet of at least {len_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    PacketTooLarge { len_bytes: u64, limit_bytes: u32 },
    /// CONNECT's protocol name is neither "MQTT" nor "MQIsdp".
    #[error("the CONNECT protocol name is not \"MQTT\"")]
    InvalidProtocolName,
    /// CONNECT names a protocol level the broker does not speak, or not the decoder's level.
    #[error("protocol level {level} is not supported")]
    UnsupportedProtocolLevel { level: u8 },
    /// The packet cannot be parsed.
    #[error("malformed packet: {0}")]
    Malformed(Malformation),
    /// The packet parses but is not allowed here.
    #[error("protocol error: {0}")]
    Protocol(ProtocolViolation),
}

impl CodecError {
    /// The MQTT 5.0 reason code for the CONNACK (if the first packet failed) or DISCONNECT
    /// the server sends before closing: 0x81, 0x82, 0x84 or 0x95.
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::FirstPacketNotConnect { .. } | CodecError::Protocol(_) => {
                reason_code::PROTOCOL_ERROR
            }
            CodecError::PacketTooLarge { .. } => reason_code::PACKET_TOO_LARGE,
            CodecError::InvalidProtocolName | CodecError::UnsupportedProtocolLevel { .. } => {
                reason_code::UNSUPPORTED_PROTOCOL_VERSION
            }
            CodecError::Malformed(_) => reason_code::MALFORMED_PACKET,
        }
    }

    /// The CONNACK to send before closing when CONNECT names a protocol level we refuse;
    /// `None` for every other error, including a wrong protocol name, where both specs let
    /// the server close without a word (the peer may not speak MQTT at all).
    pub fn connack_refusal(&self) -> Option<ConnackRefusal> {
        match self {
            CodecError::UnsupportedProtocolLevel { level } if *level < 5 => {
                Some(ConnackRefusal::V3UnacceptableProtocolVersion)
            }
            CodecError::UnsupportedProtocolLevel { .. } => {
                Some(ConnackRefusal::V5UnsupportedProtocolVersion)
            }
            _ => None,
        }
    }
}

impl From<Malformation> for CodecError {
    fn from(malformation: Malformation) -> Self {
        CodecError::Malformed(malformation)
    }
}

impl From<ProtocolViolation> for CodecError {
    fn from(violation: ProtocolViolation) -> Self {
        CodecError::Protocol(violation)
    }
}

/// One decoded packet, in the codec of the connection's protocol version.
///
/// Not boxed: a connection only ever yields one variant, and a frame lives only until the
/// session handles it, so the size difference costs nothing worth an allocation per packet.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An MQTT 3.1.1 packet.
    V4(v4::Packet),
    /// An MQTT 5.0 packet.
    V5(v5::Packet),
}

/// What the first bytes of a buffer say about the next packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FixedHeader {
    /// The fixed header is not complete; the packet is at least `len_min_bytes` long.
    Partial { len_min_bytes: u64 },
    /// The fixed header is complete.
    Complete {
        header_bytes: usize,
        remaining_len: u32,
    },
}

impl FixedHeader {
    /// The whole packet's length, or the least it can be.
    fn len_min_bytes(self) -> u64 {
        match self {
            FixedHeader::Partial { len_min_bytes } => len_min_bytes,
            FixedHeader::Complete {
                header_bytes,
                remaining_len,
                ..
            } => header_bytes as u64 + u64::from(remaining_len),
        }
    }
}

/// Reads the fixed header at the start of `buf`, refusing a packet over the limit as soon as
/// the bytes so far prove it: every continuation bit raises the least possible length.
fn fixed_header(buf: &[u8], max_packet_bytes: u32) -> Result<FixedHeader, CodecError> {
    let mut remaining_len: u32 = 0;
    let mut complete = None;
    for (index, &byte) in buf.iter().skip(1).take(VARINT_BYTES_MAX).enumerate() {
        remaining_len |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            // A multi-byte encoding ending in zero has a shorter form: not minimal (§1.5.5).
            if index > 0 && byte == 0 {
                return Err(Malformation::VariableByteInteger.into());
            }
            complete = Some(index + 1);
            break;
        }
        if index + 1 == VARINT_BYTES_MAX {
            return Err(Malformation::VariableByteInteger.into());
        }
    }
    let header = match complete {
        Some(varint_bytes) => FixedHeader::Complete {
            header_bytes: 1 + varint_bytes,
            remaining_len,
        },
        None => {
            // Every length byte seen so far had its continuation bit set. The next one is
            // the last and non-zero (minimal encoding) or continues, so it adds at least
            // 128^seen to the value.
            let varint_seen = buf.len().saturating_sub(1);
            let len_min_bytes = if varint_seen == 0 {
                FRAME_BYTES_MIN as u64
            } else {
                let header_min_bytes = 1 + varint_seen as u64 + 1;
                header_min_bytes + u64::from(remaining_len) + (1u64 << (7 * varint_seen))
            };
            FixedHeader::Partial { len_min_bytes }
        }
    };
    let len_bytes = header.len_min_bytes();
    if len_bytes > u64::from(max_packet_bytes) {
        return Err(CodecError::PacketTooLarge {
            len_bytes,
            limit_bytes: max_packet_bytes,
        });
    }
    Ok(header)
}

/// How many bytes `buf` must hold before the packet at its start can be decoded: the packet's
/// length once its fixed header is complete (it may already be there), otherwise the least it
/// can be, which is more than `buf.len()`. Never more than `max_packet_bytes`: a packet that
/// would need more is an error, so a read buffer sized by this stays within the limit.
pub fn frame_bytes_needed(buf: &[u8], max_packet_bytes: u32) -> Result<usize, CodecError> {
    let len_bytes = fixed_header(buf, max_packet_bytes)?.len_min_bytes();
    // The limit is a u32, so this fits any usize of 32 bits or more.
    Ok(usize::try_from(len_bytes).expect("a length within a u32 limit fits usize"))
}

/// A cursor over a packet's body (the bytes after its fixed header) that may still be
/// arriving: `Ok(None)` means "wait for more", an error means the field cannot fit the
/// remaining length.
struct BodyCursor<'a> {
    available: &'a [u8],
    remaining_len: usize,
    position: usize,
}

impl<'a> BodyCursor<'a> {
    fn new(available: &'a [u8], remaining_len: usize) -> Self {
        let available = &available[..available.len().min(remaining_len)];
        BodyCursor {
            available,
            remaining_len,
            position: 0,
        }
    }

    fn is_at_end(&self) -> bool {
        self.position == self.remaining_len
    }

    fn left(&self) -> usize {
        self.remaining_len - self.position
    }

    fn u8(&mut self) -> Result<Option<u8>, CodecError> {
        if self.position >= self.remaining_len {
            return Err(Malformation::Truncated.into());
        }
        let Some(&byte) = self.available.get(self.position) else {
            return Ok(None);
        };
        self.position += 1;
        Ok(Some(byte))
    }

    /// A cursor over the next `len` bytes of a complete body, which this one skips.
    fn take(&mut self, len: usize) -> Result<BodyCursor<'a>, CodecError> {
        let start = self.position;
        self.skip(len)?;
        let bytes = self.available.get(start..self.position).unwrap_or(&[]);
        Ok(BodyCursor::new(bytes, len))
    }

    /// Errors unless every byte of the body has been walked.
    fn expect_end(&self, packet_type: u8) -> Result<(), CodecError> {
        if self.is_at_end() {
            Ok(())
        } else {
            Err(Malformation::TrailingBytes { packet_type }.into())
        }
    }

    fn skip(&mut self, len: usize) -> Result<(), CodecError> {
        if len > self.left() {
            return Err(Malformation::Truncated.into());
        }
        self.position += len;
        Ok(())
    }
}

/// Reads one byte, returning `Ok(None)` from the enclosing function while it has not arrived.
macro_rules! next_byte {
    ($cursor:expr) => {
        match $cursor.u8()? {
            Some(byte) => byte,
            None => return Ok(None),
        }
    };
}

/// The cursor over a complete frame never waits, so a missing byte is a truncated field.
fn complete_byte(cursor: &mut BodyCursor<'_>) -> Result<u8, CodecError> {
    cursor.u8()?.ok_or(Malformation::Truncated.into())
}

fn complete_u16(cursor: &mut BodyCursor<'_>) -> Result<u16, CodecError> {
    let high = complete_byte(cursor)?;
    let low = complete_byte(cursor)?;
    Ok(u16::from_be_bytes([high, low]))
}

fn complete_varint(cursor: &mut BodyCursor<'_>) -> Result<usize, CodecError> {
    let mut value = 0usize;
    for index in 0..VARINT_BYTES_MAX {
        let byte = complete_byte(cursor)?;
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            if index > 0 && byte == 0 {
                return Err(Malformation::VariableByteInteger.into());
            }
            return Ok(value);
        }
    }
    Err(Malformation::VariableByteInteger.into())
}

/// How a 5.0 property's value is encoded (§2.2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropertyValue {
    Byte,
    TwoByteInteger,
    FourByteInteger,
    VariableByteInteger,
    Utf8String,
    BinaryData,
    StringPair,
}

/// The value encoding of each property identifier defined by MQTT 5.0 (§2.2.2.2).
fn property_value(id: u8) -> Option<PropertyValue> {
    use PropertyValue::*;
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => Byte,
        0x13 | 0x21 | 0x22 | 0x23 => TwoByteInteger,
        0x02 | 0x11 | 0x18 | 0x27 => FourByteInteger,
        0x0B => VariableByteInteger,
        0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => Utf8String,
        0x09 | 0x16 => BinaryData,
        0x26 => StringPair,
        _ => return None,
    })
}

/// The Subscription Identifier property.
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;

/// What walking a 5.0 property block found that the caller checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PropertyBlock {
    subscription_ids: usize,
}

/// Walks a 5.0 property block: its length, then whole properties that end exactly where the
/// length says. rumqttc reads properties until its count reaches the length, so a value
/// straddling the end would silently eat the payload; here it is malformed. Which
/// properties a packet may carry is rumqttc's check (an unexpected one is malformed too).
fn walk_properties(cursor: &mut BodyCursor<'_>) -> Result<PropertyBlock, CodecError> {
    let len = complete_varint(cursor)?;
    let mut block = cursor.take(len)?;
    let mut walked = PropertyBlock::default();
    let overrun = |error: CodecError| match error {
        CodecError::Malformed(Malformation::Truncated) => {
            CodecError::Malformed(Malformation::PropertyOverrun)
        }
        other => other,
    };
    while !block.is_at_end() {
        let id = complete_byte(&mut block)?;
        let value = property_value(id).ok_or(Malformation::Property { id })?;
        match value {
            PropertyValue::Byte => block.skip(1),
            PropertyValue::TwoByteInteger => block.skip(2),
            PropertyValue::FourByteInteger => block.skip(4),
            PropertyValue::VariableByteInteger => match complete_varint(&mut block) {
                Ok(0) if id == SUBSCRIPTION_IDENTIFIER => {
                    Err(ProtocolViolation::SubscriptionIdZero.into())
                }
                Ok(_) => Ok(()),
                Err(error) => Err(error),
            },
            PropertyValue::Utf8String | PropertyValue::BinaryData => {
                skip_string(&mut block).map(drop)
            }
            PropertyValue::StringPair => skip_string(&mut block)
                .and_then(|_| skip_string(&mut block))
                .map(drop),
        }
        .map_err(overrun)?;
        if id == SUBSCRIPTION_IDENTIFIER {
            walked.subscription_ids += 1;
        }
    }
    Ok(walked)
}

/// Skips a two-byte-length string and returns its length.
fn skip_string(cursor: &mut BodyCursor<'_>) -> Result<usize, CodecError> {
    let len = usize::from(complete_u16(cursor)?);
    cursor.skip(len)?;
    Ok(len)
}

/// The protocol names CONNECT may carry: 3.1.1 and 5.0 use "MQTT", 3.1 used "MQIsdp".
const PROTOCOL_NAME: &[u8] = b"MQTT";
const PROTOCOL_NAME_3_1: &[u8] = b"MQIsdp";

/// Reads CONNECT's protocol name and level from a body that may still be arriving.
fn connect_protocol(cursor: &mut BodyCursor<'_>) -> Result<Option<ProtocolVersion>, CodecError> {
    let name_len_high = next_byte!(cursor);
    if name_len_high != 0 {
        return Err(CodecError::InvalidProtocolName);
    }
    let name = match next_byte!(cursor) {
        4 => PROTOCOL_NAME,
        6 => PROTOCOL_NAME_3_1,
        _ => return Err(CodecError::InvalidProtocolName),
    };
    for &expected in name {
        if next_byte!(cursor) != expected {
            return Err(CodecError::InvalidProtocolName);
        }
    }
    let level = next_byte!(cursor);
    match (name, level) {
        (PROTOCOL_NAME, 4) => Ok(Some(ProtocolVersion::V3_1_1)),
        (PROTOCOL_NAME, 5) => Ok(Some(ProtocolVersion::V5)),
        _ => Err(CodecError::UnsupportedProtocolLevel { level }),
    }
}

/// Decides the protocol version from the first bytes a client sent, which must begin with
/// CONNECT. `Ok(None)` means the bytes so far cannot decide (at most 14 bytes of a CONNECT
/// within the limit are needed); the buffer is only read. Errors close the connection,
/// after [`CodecError::connack_refusal`] if it names a CONNACK.
pub fn detect_protocol(
    buf: &[u8],
    max_packet_bytes: u32,
) -> Result<Option<ProtocolVersion>, CodecError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(byte1, None, false)?;
    let FixedHeader::Complete {
        header_bytes,
        remaining_len,
        ..
    } = fixed_header(buf, max_packet_bytes)?
    else {
        return Ok(None);
    };
    let mut cursor = BodyCursor::new(&buf[header_bytes..], remaining_len as usize);
    connect_protocol(&mut cursor)
}

/// Checks the first byte of a packet from a client: its type, its flags, and whether it may
/// come now. `version` is `None` while detecting (no AUTH can come first anyway).
fn check_first_byte(
    byte1: u8,
    version: Option<ProtocolVersion>,
    connected: bool,
) -> Result<(), CodecError> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0F;
    if !connected && packet_type != packet_type::CONNECT {
        return Err(CodecError::FirstPacketNotConnect { packet_type });
    }
    let expected_flags = match packet_type {
        packet_type::RESERVED => {
            return Err(Malformation::ReservedPacketType { packet_type }.into());
        }
        packet_type::AUTH if version != Some(ProtocolVersion::V5) => {
            return Err(Malformation::ReservedPacketType { packet_type }.into());
        }
        packet_type::CONNACK
        | packet_type::SUBACK
        | packet_type::UNSUBACK
        | packet_type::PINGRESP => {
            return Err(ProtocolViolation::ServerPacket { packet_type }.into());
        }
        packet_type::CONNECT if connected => {
            return Err(ProtocolViolation::SecondConnect.into());
        }
        packet_type::PUBLISH => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(Malformation::PublishQos3.into());
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(Malformation::DupOnQos0.into());
            }
            flags
        }
        packet_type::PUBREL | packet_type::SUBSCRIBE | packet_type::UNSUBSCRIBE => 0b0010,
        _ => 0,
    };
    if flags != expected_flags {
        return Err(Malformation::ReservedFlags { packet_type, flags }.into());
    }
    Ok(())
}

/// Checks a remaining length against what the packet type allows, before the body arrives.
fn check_remaining_len(
    packet_type: u8,
    remaining_len: u32,
    version: ProtocolVersion,
) -> Result<(), CodecError> {
    let allowed = match (packet_type, version) {
        (packet_type::PINGREQ, _) => remaining_len == 0,
        (packet_type::DISCONNECT, ProtocolVersion::V3_1_1) => remaining_len == 0,
        (
            packet_type::PUBACK | packet_type::PUBREC | packet_type::PUBREL | packet_type::PUBCOMP,
            ProtocolVersion::V3_1_1,
        ) => remaining_len == 2,
        (
            packet_type::PUBACK | packet_type::PUBREC | packet_type::PUBREL | packet_type::PUBCOMP,
            ProtocolVersion::V5,
        ) => remaining_len >= 2,
        // A packet identifier, and in 5.0 a property length, come before the payload.
        (packet_type::SUBSCRIBE | packet_type::UNSUBSCRIBE, _) => remaining_len >= 2,
        // CONNECT's variable header alone is 10 bytes (§3.1.2).
        (packet_type::CONNECT, _) => remaining_len >= 10,
        // A topic name's length comes first.
        (packet_type::PUBLISH, _) => remaining_len >= 2,
        _ => true,
    };
    if allowed {
        Ok(())
    } else {
        Err(Malformation::RemainingLength {
            packet_type,
            remaining_len,
        }
        .into())
    }
}

/// The server side of one connection's decoding, for the protocol version CONNECT named.
///
/// After an error the connection must be closed: the decoder does not resynchronise, and the
/// buffer may or may not still hold the offending packet.
#[derive(Debug)]
pub struct Decoder {
    version: ProtocolVersion,
    max_packet_bytes: u32,
    connected: bool,
}

impl Decoder {
    /// A decoder for a new connection: the first packet it accepts is CONNECT.
    /// `max_packet_bytes` bounds a whole packet, fixed header included.
    pub fn new(version: ProtocolVersion, max_packet_bytes: u32) -> Self {
        Decoder {
            version,
            max_packet_bytes,
            connected: false,
        }
    }

    /// The protocol version this decoder speaks.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The largest packet this decoder accepts, in bytes.
    pub fn max_packet_bytes(&self) -> u32 {
        self.max_packet_bytes
    }

    /// How many bytes `buf` must hold before [`Decoder::decode`] can return its next frame;
    /// see [`frame_bytes_needed`].
    pub fn frame_bytes_needed(&self, buf: &[u8]) -> Result<usize, CodecError> {
        frame_bytes_needed(buf, self.max_packet_bytes)
    }

    /// Takes the next whole packet off the front of `buf`. `Ok(None)` leaves `buf` untouched
    /// until more bytes arrive; a packet over the limit is refused from its fixed header.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(&byte1) = buf.first() else {
            return Ok(None);
        };
        check_first_byte(byte1, Some(self.version), self.connected)?;
        let FixedHeader::Complete {
            header_bytes,
            remaining_len,
            ..
        } = fixed_header(buf, self.max_packet_bytes)?
        else {
            return Ok(None);
        };
        let packet_type = byte1 >> 4;
        check_remaining_len(packet_type, remaining_len, self.version)?;
        let remaining_len = remaining_len as usize;
        let frame_bytes = header_bytes + remaining_len;
        if buf.len() < frame_bytes {
            return Ok(None);
        }

        let mut body = BodyCursor::new(&buf[header_bytes..frame_bytes], remaining_len);
        match packet_type {
            packet_type::CONNECT => self.check_connect(&mut body)?,
            packet_type::PUBLISH => check_publish(byte1, &mut body, self.version)?,
            packet_type::SUBSCRIBE => check_subscribe(&mut body, self.version)?,
            packet_type::UNSUBSCRIBE => check_unsubscribe(&mut body, self.version)?,
            packet_type::PUBACK
            | packet_type::PUBREC
            | packet_type::PUBREL
            | packet_type::PUBCOMP
            | packet_type::DISCONNECT
            | packet_type::AUTH
                if self.version == ProtocolVersion::V5 =>
            {
                check_v5_reply(packet_type, &mut body)?
            }
            _ => {}
        }

        let frame = buf.split_to(frame_bytes);
        let frame = match self.version {
            ProtocolVersion::V3_1_1 => Frame::V4(read_v4(frame)?),
            ProtocolVersion::V5 => Frame::V5(read_v5(frame, byte1, remaining_len)?),
        };
        if packet_type == packet_type::CONNECT {
            self.connected = true;
        }
        Ok(Some(frame))
    }

    /// CONNECT's protocol name, level and flags, which rumqttc reads without checking.
    fn check_connect(&self, body: &mut BodyCursor<'_>) -> Result<(), CodecError> {
        let version = connect_protocol(body)?.ok_or(Malformation::Truncated)?;
        if version != self.version {
            return Err(CodecError::UnsupportedProtocolLevel {
                level: version.level(),
            });
        }
        let flags = complete_byte(body)?;
        if flags & 0b0000_0001 != 0 {
            return Err(Malformation::ConnectReservedFlag.into());
        }
        let will = flags & 0b0000_0100 != 0;
        let will_qos = (flags >> 3) & 0b11;
        let will_retain = flags & 0b0010_0000 != 0;
        if will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
            return Err(Malformation::WillFlags.into());
        }
        let username = flags & 0b1000_0000 != 0;
        let password = flags & 0b0100_0000 != 0;
        // 5.0 allows a password without a user name (§3.1.2.9); 3.1.1 does not.
        let v5 = self.version == ProtocolVersion::V5;
        if !v5 && password && !username {
            return Err(Malformation::PasswordWithoutUsername.into());
        }
        let _keep_alive = complete_u16(body)?;
        if v5 {
            walk_properties(body)?;
        }
        let _client_id = skip_string(body)?;
        if will {
            if v5 {
                walk_properties(body)?;
            }
            let _will_topic = skip_string(body)?;
            let _will_payload = skip_string(body)?;
        }
        if username {
            skip_string(body)?;
        }
        if password {
            skip_string(body)?;
        }
        body.expect_end(packet_type::CONNECT)
    }
}

/// PUBLISH: a topic, for QoS 1 or 2 a non-zero packet identifier, in 5.0 properties; the
/// payload is the rest.
fn check_publish(
    byte1: u8,
    body: &mut BodyCursor<'_>,
    version: ProtocolVersion,
) -> Result<(), CodecError> {
    skip_string(body)?;
    let qos = (byte1 >> 1) & 0b11;
    if qos > 0 {
        if body.left() < 2 {
            return Err(Malformation::PacketIdMissing.into());
        }
        if complete_u16(body)? == 0 {
            return Err(ProtocolViolation::PacketIdZero.into());
        }
    }
    // A client's PUBLISH never carries a Subscription Identifier (§3.3.4); rumqttc also
    // miscounts its length (one byte too many), so one followed by another property would
    // turn that property into payload.
    if version == ProtocolVersion::V5 && walk_properties(body)?.subscription_ids > 0 {
        return Err(ProtocolViolation::SubscriptionIdInPublish.into());
    }
    Ok(())
}

/// SUBSCRIBE: a non-zero packet identifier, then at least one filter, each with an options
/// byte whose reserved bits are clear (3.1.1 §3.8.3.1, 5.0 §3.8.3.1).
fn check_subscribe(body: &mut BodyCursor<'_>, version: ProtocolVersion) -> Result<(), CodecError> {
    if complete_u16(body)? == 0 {
        return Err(ProtocolViolation::PacketIdZero.into());
    }
    // At most one Subscription Identifier (§3.8.2.1.2). rumqttc 0.25 counts that property
    // one byte longer than it is; with one, that cannot end its property loop early (every
    // property after it is at least two bytes), but with two it can.
    if version == ProtocolVersion::V5 && walk_properties(body)?.subscription_ids > 1 {
        return Err(ProtocolViolation::SubscriptionIdRepeated.into());
    }
    if body.is_at_end() {
        return Err(ProtocolViolation::SubscribeEmpty.into());
    }
    let reserved_bits = match version {
        ProtocolVersion::V3_1_1 => 0b1111_1100,
        ProtocolVersion::V5 => 0b1100_0000,
    };
    while !body.is_at_end() {
        skip_string(body)?;
        if body.is_at_end() {
            return Err(Malformation::SubscribeOptionsMissing.into());
        }
        let options = complete_byte(body)?;
        if options & reserved_bits != 0 {
            return Err(Malformation::SubscribeOptionsReserved { options }.into());
        }
        if options & 0b11 == 3 {
            return Err(ProtocolViolation::SubscriptionQos3.into());
        }
        if (options >> 4) & 0b11 == 3 {
            return Err(ProtocolViolation::RetainHandling3.into());
        }
    }
    Ok(())
}

/// UNSUBSCRIBE: a non-zero packet identifier, then at least one whole filter.
fn check_unsubscribe(
    body: &mut BodyCursor<'_>,
    version: ProtocolVersion,
) -> Result<(), CodecError> {
    if complete_u16(body)? == 0 {
        return Err(ProtocolViolation::PacketIdZero.into());
    }
    if version == ProtocolVersion::V5 {
        walk_properties(body)?;
    }
    if body.is_at_end() {
        return Err(ProtocolViolation::UnsubscribeEmpty.into());
    }
    while !body.is_at_end() {
        skip_string(body)?;
    }
    Ok(())
}

/// 5.0 PUBACK, PUBREC, PUBREL, PUBCOMP (a packet identifier first), DISCONNECT and AUTH: then
/// an optional reason code and, if the packet goes on, properties, and nothing after them.
fn check_v5_reply(packet_type: u8, body: &mut BodyCursor<'_>) -> Result<(), CodecError> {
    if !matches!(packet_type, packet_type::DISCONNECT | packet_type::AUTH) {
        complete_u16(body)?;
    }
    if !body.is_at_end() {
        let _reason_code = complete_byte(body)?;
    }
    if !body.is_at_end() {
        walk_properties(body)?;
    }
    body.expect_end(packet_type)
}

/// Parses one complete, pre-checked 3.1.1 frame.
fn read_v4(mut frame: BytesMut) -> Result<v4::Packet, CodecError> {
    // The frame is whole and within our limit, so rumqttc's own limit must not interfere.
    let packet = v4::Packet::read(&mut frame, usize::MAX).map_err(from_v4_error)?;
    if let v4::Packet::Publish(publish) = &packet
        && publish.topic.is_empty()
    {
        return Err(ProtocolViolation::TopicEmpty.into());
    }
    Ok(packet)
}

/// Parses one complete, pre-checked 5.0 frame.
fn read_v5(mut frame: BytesMut, byte1: u8, remaining_len: usize) -> Result<v5::Packet, CodecError> {
    let packet_type = byte1 >> 4;
    // DISCONNECT and AUTH may omit their reason code (meaning 0x00) and property length
    // (meaning none) (§3.14.2.1, §3.15.2.1); rumqttc 0.25 requires both, so spell them out.
    if matches!(packet_type, packet_type::DISCONNECT | packet_type::AUTH) && remaining_len < 2 {
        let reason = frame.last().copied().filter(|_| remaining_len == 1);
        frame.clear();
        frame.put_u8(byte1);
        frame.put_u8(2);
        frame.put_u8(reason.unwrap_or(0));
        frame.put_u8(0);
    }
    let packet = if packet_type == packet_type::AUTH {
        // rumqttc's `Packet::read` has no AUTH arm; its `Auth::read` parses the body.
        let header = v5::check(frame.iter(), None).map_err(from_v5_error)?;
        v5::Packet::Auth(v5::Auth::read(header, frame.freeze()).map_err(from_v5_error)?)
    } else {
        v5::Packet::read(&mut frame, None).map_err(from_v5_error)?
    };
    match &packet {
        v5::Packet::Publish(publish) => {
            let has_alias = publish
                .properties
                .as_ref()
                .is_some_and(|properties| properties.topic_alias.is_some());
            if publish.topic.is_empty() && !has_alias {
                return Err(ProtocolViolation::TopicEmpty.into());
            }
            // rumqttc keeps a 5.0 topic as bytes; ill-formed UTF-8 is malformed (§1.5.4).
            if std::str::from_utf8(&publish.topic).is_err() {
                return Err(Malformation::NotUtf8.into());
            }
        }
        v5::Packet::Connect(_, Some(will), _) if std::str::from_utf8(&will.topic).is_err() => {
            return Err(Malformation::NotUtf8.into());
        }
        _ => {}
    }
    Ok(packet)
}

/// Maps rumqttc's 3.1.1 errors on a complete frame. The fixed header and the fields walked
/// above are already checked, so "insufficient bytes" here means a field inside the frame
/// ran past its end.
fn from_v4_error(error: V4Error) -> CodecError {
    match error {
        V4Error::InsufficientBytes(_)
        | V4Error::MalformedPacket
        | V4Error::BoundaryCrossed(_)
        | V4Error::PayloadRequired
        | V4Error::PayloadSizeIncorrect => Malformation::Truncated.into(),
        V4Error::MalformedRemainingLength => Malformation::VariableByteInteger.into(),
        V4Error::TopicNotUtf8 => Malformation::NotUtf8.into(),
        V4Error::IncorrectPacketFormat => Malformation::WillFlags.into(),
        V4Error::InvalidQoS(_) => ProtocolViolation::SubscriptionQos3.into(),
        V4Error::PacketIdZero => ProtocolViolation::PacketIdZero.into(),
        V4Error::EmptySubscription => ProtocolViolation::SubscribeEmpty.into(),
        V4Error::InvalidProtocol => CodecError::InvalidProtocolName,
        V4Error::InvalidProtocolLevel(level) => CodecError::UnsupportedProtocolLevel { level },
        V4Error::InvalidPacketType(packet_type) => {
            Malformation::ReservedPacketType { packet_type }.into()
        }
        V4Error::InvalidConnectReturnCode(code) | V4Error::InvalidSubscribeReasonCode(code) => {
            Malformation::ReasonCode { code }.into()
        }
        V4Error::InvalidPropertyType(id) => Malformation::Property { id }.into(),
        V4Error::NotConnect(_) | V4Error::UnexpectedConnect => Malformation::Unparseable {
            detail: "unexpected packet type",
        }
        .into(),
        V4Error::PayloadTooLong
        | V4Error::PayloadSizeLimitExceeded(_)
        | V4Error::OutgoingPacketTooLarge { .. } => Malformation::Unparseable {
            detail: "length out of range",
        }
        .into(),
        V4Error::Io(_) => Malformation::Unparseable {
            detail: "i/o error from the parser",
        }
        .into(),
    }
}

/// Maps rumqttc's 5.0 errors on a complete frame; see [`from_v4_error`].
fn from_v5_error(error: V5Error) -> CodecError {
    match error {
        V5Error::InsufficientBytes(_)
        | V5Error::MalformedPacket
        | V5Error::BoundaryCrossed(_)
        | V5Error::PayloadRequired
        | V5Error::PayloadSizeIncorrect
        | V5Error::InvalidRemainingLength(_) => Malformation::Truncated.into(),
        V5Error::MalformedRemainingLength => Malformation::VariableByteInteger.into(),
        V5Error::TopicNotUtf8 | V5Error::PayloadNotUtf8(_) => Malformation::NotUtf8.into(),
        V5Error::IncorrectPacketFormat => Malformation::WillFlags.into(),
        V5Error::InvalidPropertyType(id) => Malformation::Property { id }.into(),
        V5Error::InvalidConnectReturnCode(code)
        | V5Error::InvalidReason(code)
        | V5Error::InvalidSubscribeReasonCode(code) => Malformation::ReasonCode { code }.into(),
        V5Error::InvalidQoS(_) => ProtocolViolation::SubscriptionQos3.into(),
        V5Error::InvalidRetainForwardRule(_) => ProtocolViolation::RetainHandling3.into(),
        V5Error::PacketIdZero => ProtocolViolation::PacketIdZero.into(),
        V5Error::EmptySubscription => ProtocolViolation::SubscribeEmpty.into(),
        V5Error::SubscriptionIdZero => ProtocolViolation::SubscriptionIdZero.into(),
        V5Error::InvalidProtocol => CodecError::InvalidProtocolName,
        V5Error::InvalidProtocolLevel(level) => CodecError::UnsupportedProtocolLevel { level },
        V5Error::InvalidPacketType(packet_type) => {
            Malformation::ReservedPacketType { packet_type }.into()
        }
        V5Error::PayloadTooLong
        | V5Error::PayloadSizeLimitExceeded { .. }
        | V5Error::OutgoingPacketTooLarge { .. } => Malformation::Unparseable {
            detail: "length out of range",
        }
        .into(),
        V5Error::Io(_) => Malformation::Unparseable {
            detail: "i/o error from the parser",
        }
        .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u32 = 1 << 20;

    #[test]
    fn fixed_header_reads_each_varint_width_and_its_boundaries() {
        let cases: [(&[u8], u32, usize); 6] = [
            (&[0x30, 0x00], 0, 2),
            (&[0x30, 0x7F], 127, 2),
            (&[0x30, 0x80, 0x01], 128, 3),
            (&[0x30, 0xFF, 0x7F], 16_383, 3),
            (&[0x30, 0x80, 0x80, 0x01], 16_384, 4),
            (&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], REMAINING_LENGTH_MAX, 5),
        ];
        for (bytes, remaining_len, header_bytes) in cases {
            assert_eq!(
                fixed_header(bytes, u32::MAX),
                Ok(FixedHeader::Complete {
                    header_bytes,
                    remaining_len
                }),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn fixed_header_refuses_five_byte_and_non_minimal_lengths() {
        let malformed = Err(CodecError::Malformed(Malformation::VariableByteInteger));
        assert_eq!(
            fixed_header(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], u32::MAX),
            malformed
        );
        // Decided at the fourth length byte, without waiting for a fifth.
        assert_eq!(
            fixed_header(&[0x30, 0x80, 0x80, 0x80, 0x80], u32::MAX),
            malformed
        );
        assert_eq!(fixed_header(&[0x30, 0x80, 0x00], u32::MAX), malformed);
        assert_eq!(fixed_header(&[0x30, 0xFF, 0x80, 0x00], u32::MAX), malformed);
    }

    #[test]
    fn a_partial_length_is_refused_once_it_must_exceed_the_limit() {
        // One continuation byte: at least 1 + 2 + 0 + 128 bytes.
        assert_eq!(
            fixed_header(&[0x30, 0x80], 131),
            Ok(FixedHeader::Partial { len_min_bytes: 131 })
        );
        assert_eq!(
            fixed_header(&[0x30, 0x80], 130),
            Err(CodecError::PacketTooLarge {
                len_bytes: 131,
                limit_bytes: 130
            })
        );
        // A 256 MB announcement is refused from its first three length bytes under 1 MiB.
        assert!(matches!(
            fixed_header(&[0x30, 0xFF, 0xFF, 0xFF], LIMIT),
            Err(CodecError::PacketTooLarge { .. })
        ));
        assert_eq!(frame_bytes_needed(&[], LIMIT), Ok(2));
        assert_eq!(frame_bytes_needed(&[0x30], LIMIT), Ok(2));
        assert_eq!(frame_bytes_needed(&[0x30, 0x05], LIMIT), Ok(7));
        assert_eq!(
            frame_bytes_needed(&[0x30, 0x85], LIMIT),
            Ok(1 + 2 + 5 + 128)
        );
    }

    #[test]
    fn refusal_connacks_match_rumqttc_encodings() {
        let mut v3 = BytesMut::new();
        v4::ConnAck::new(v4::ConnectReturnCode::RefusedProtocolVersion, false)
            .write(&mut v3)
            .unwrap();
        assert_eq!(
            ConnackRefusal::V3UnacceptableProtocolVersion.bytes(),
            &v3[..]
        );

        let mut v5_bytes = BytesMut::new();
        v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::UnsupportedProtocolVersion,
            properties: None,
        }
        .write(&mut v5_bytes)
        .unwrap();
        assert_eq!(
            ConnackRefusal::V5UnsupportedProtocolVersion.bytes(),
            &v5_bytes[..]
        );
    }

    #[test]
    fn disconnects_carry_their_reason_and_read_back() {
        for code in [0x00, 0x04, 0x81, 0x82, 0x93, 0x95] {
            let mut buf = BytesMut::new();
            write_v5_disconnect(code, &mut buf);
            assert_eq!(frame_bytes_needed(&buf, LIMIT), Ok(buf.len()));
            let mut decoder = Decoder::new(ProtocolVersion::V5, LIMIT);
            decoder.connected = true;
            let frame = decoder.decode(&mut buf).unwrap().unwrap();
            let Frame::V5(v5::Packet::Disconnect(disconnect)) = frame else {
                panic!("unexpected {frame:?}");
            };
            assert_eq!(disconnect.reason_code as u8, code);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn reason_codes_follow_the_mqtt5_table() {
        assert_eq!(
            CodecError::Malformed(Malformation::Truncated).reason_code(),
            0x81
        );
        assert_eq!(
            CodecError::Protocol(ProtocolViolation::PacketIdZero).reason_code(),
            0x82
        );
        assert_eq!(
            CodecError::FirstPacketNotConnect { packet_type: 3 }.reason_code(),
            0x82
        );
        assert_eq!(
            CodecError::UnsupportedProtocolLevel { level: 6 }.reason_code(),
            0x84
        );
        assert_eq!(CodecError::InvalidProtocolName.reason_code(), 0x84);
        assert_eq!(
            CodecError::PacketTooLarge {
                len_bytes: 10,
                limit_bytes: 5
            }
            .reason_code(),
            0x95
        );
    }

    #[test]
    fn refused_levels_get_the_connack_their_clients_read() {
        for level in [0, 3, 4] {
            assert_eq!(
                CodecError::UnsupportedProtocolLevel { level }.connack_refusal(),
                Some(ConnackRefusal::V3UnacceptableProtocolVersion)
            );
        }
        assert_eq!(
            CodecError::UnsupportedProtocolLevel { level: 6 }.connack_refusal(),
            Some(ConnackRefusal::V5UnsupportedProtocolVersion)
        );
        assert_eq!(CodecError::InvalidProtocolName.connack_refusal(), None);
    }

    #[test]
    fn first_byte_rules() {
        let v5 = Some(ProtocolVersion::V5);
        let v4 = Some(ProtocolVersion::V3_1_1);
        assert_eq!(check_first_byte(0x10, v5, false), Ok(()));
        assert_eq!(
            check_first_byte(0x30, v5, false),
            Err(CodecError::FirstPacketNotConnect { packet_type: 3 })
        );
        assert_eq!(
            check_first_byte(0x10, v5, true),
            Err(ProtocolViolation::SecondConnect.into())
        );
        assert_eq!(
            check_first_byte(0x11, v5, false),
            Err(Malformation::ReservedFlags {
                packet_type: 1,
                flags: 1
            }
            .into())
        );
        assert_eq!(check_first_byte(0x3D, v5, true), Ok(()));
        assert_eq!(
            check_first_byte(0x36, v5, true),
            Err(Malformation::PublishQos3.into())
        );
        assert_eq!(
            check_first_byte(0x38, v5, true),
            Err(Malformation::DupOnQos0.into())
        );
        assert_eq!(check_first_byte(0x62, v5, true), Ok(()));
        assert_eq!(
            check_first_byte(0x60, v5, true),
            Err(Malformation::ReservedFlags {
                packet_type: 6,
                flags: 0
            }
            .into())
        );
        assert_eq!(
            check_first_byte(0x90, v5, true),
            Err(ProtocolViolation::ServerPacket { packet_type: 9 }.into())
        );
        assert_eq!(check_first_byte(0xF0, v5, true), Ok(()));
        assert_eq!(
            check_first_byte(0xF0, v4, true),
            Err(Malformation::ReservedPacketType { packet_type: 15 }.into())
        );
        assert_eq!(
            check_first_byte(0x00, v4, true),
            Err(Malformation::ReservedPacketType { packet_type: 0 }.into())
        );
    }
}
