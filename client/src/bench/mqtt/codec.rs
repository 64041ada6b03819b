//! The few MQTT packets a load client sends and receives, in 3.1.1 or 5.0, encoded and decoded
//! with rumqttc's packet codec: one place that knows the two versions apart, so the load loop
//! speaks in terms of packet ids and outcomes.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as v4bytes, v4};
use rumqttc::v5::mqttbytes::{self as v5bytes, v5};

/// The largest packet accepted from the broker. The load client only ever receives
/// acknowledgements, CONNACK, PINGRESP and DISCONNECT, all far smaller.
pub(crate) const INCOMING_PACKET_BYTES_MAX: usize = 64 << 10;

/// MQTT protocol version spoken by the load clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    V311,
    V5,
}

impl Protocol {
    /// The name users type and read: `3.1.1` or `5`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

/// What a client's CONNECT carries.
#[derive(Debug, Clone)]
pub(crate) struct ConnectSpec {
    pub(crate) client_id: String,
    pub(crate) keep_alive_s: u16,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// Sent as the v5 Receive Maximum, so the broker may pipeline as many acks back; unused in
    /// 3.1.1.
    pub(crate) receive_maximum: u16,
}

/// A packet from the broker, reduced to what the load loop acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// CONNACK: `refused` names the reason when the broker refused the connection;
    /// `receive_maximum` is the v5 limit on this client's unacknowledged QoS 1/2 publishes.
    ConnAck {
        refused: Option<String>,
        receive_maximum: Option<u16>,
    },
    /// PUBACK (QoS 1). `failure` names a v5 reason code of 0x80 or above.
    PubAck {
        pkid: u16,
        failure: Option<String>,
    },
    /// PUBREC (QoS 2, first half). A failure ends the exchange: no PUBREL follows.
    PubRec {
        pkid: u16,
        failure: Option<String>,
    },
    /// PUBCOMP (QoS 2, second half).
    PubComp {
        pkid: u16,
        failure: Option<String>,
    },
    PingResp,
    /// DISCONNECT from the broker (v5), with its reason.
    Disconnect {
        reason: String,
    },
    /// Anything else, by name; a load client neither subscribes nor expects it.
    Unexpected(&'static str),
}

/// A packet the broker sent that rumqttc's codec could not decode, or one over
/// [`INCOMING_PACKET_BYTES_MAX`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("malformed MQTT 3.1.1 packet from the broker: {0}")]
    V311(v4bytes::Error),
    #[error("malformed MQTT 5 packet from the broker: {0}")]
    V5(v5bytes::Error),
}

/// One client's codec: the publish template is built once and only its packet id changes, so
/// encoding a publish allocates nothing.
#[derive(Debug)]
pub(crate) enum Codec {
    V311 { publish: v4::Publish },
    V5 { publish: v5::Publish },
}

impl Codec {
    /// A codec for `protocol` whose publishes go to `topic` at `qos` with `payload`.
    pub(crate) fn new(protocol: Protocol, topic: &str, qos: u8, payload: Bytes) -> Codec {
        match protocol {
            Protocol::V311 => Codec::V311 {
                publish: v4::Publish::from_bytes(topic, v4_qos(qos), payload),
            },
            Protocol::V5 => Codec::V5 {
                publish: v5::Publish::new(topic, v5_qos(qos), payload, None),
            },
        }
    }

    /// Appends a CONNECT with a clean session.
    pub(crate) fn connect(&self, spec: &ConnectSpec, out: &mut BytesMut) {
        let login = spec
            .username
            .as_ref()
            .map(|username| (username.clone(), spec.password.clone().unwrap_or_default()));
        match self {
            Codec::V311 { .. } => {
                let mut connect = v4::Connect::new(spec.client_id.clone());
                connect.keep_alive = spec.keep_alive_s;
                connect.clean_session = true;
                if let Some((username, password)) = login {
                    connect.set_login(username, password);
                }
                expect_encoded(connect.write(out));
            }
            Codec::V5 { .. } => {
                let mut properties = v5::ConnectProperties::new();
                properties.receive_maximum = Some(spec.receive_maximum);
                let connect = v5::Connect {
                    keep_alive: spec.keep_alive_s,
                    client_id: spec.client_id.clone(),
                    clean_start: true,
                    properties: Some(properties),
                };
                let login = login.map(|(username, password)| v5::Login::new(username, password));
                expect_encoded(connect.write(&None, &login, out));
            }
        }
    }

    /// Appends the template PUBLISH with packet id `pkid` (ignored at QoS 0).
    pub(crate) fn publish(&mut self, pkid: u16, out: &mut BytesMut) {
        match self {
            Codec::V311 { publish } => {
                if publish.qos != v4bytes::QoS::AtMostOnce {
                    publish.pkid = pkid;
                }
                expect_encoded(publish.write(out));
            }
            Codec::V5 { publish } => {
                if publish.qos != v5bytes::QoS::AtMostOnce {
                    publish.pkid = pkid;
                }
                expect_encoded(publish.write(out));
            }
        }
    }

    /// Appends the PUBREL answering a successful PUBREC.
    pub(crate) fn pubrel(&self, pkid: u16, out: &mut BytesMut) {
        match self {
            Codec::V311 { .. } => expect_encoded(v4::PubRel::new(pkid).write(out)),
            Codec::V5 { .. } => expect_encoded(v5::PubRel::new(pkid, None).write(out)),
        }
    }

    /// Appends a PINGREQ.
    pub(crate) fn pingreq(&self, out: &mut BytesMut) {
        match self {
            Codec::V311 { .. } => expect_encoded(v4::PingReq.write(out)),
            Codec::V5 { .. } => expect_encoded(v5::PingReq::write(out)),
        }
    }

    /// Appends a normal DISCONNECT.
    pub(crate) fn disconnect(&self, out: &mut BytesMut) {
        match self {
            Codec::V311 { .. } => expect_encoded(v4::Disconnect.write(out)),
            Codec::V5 { .. } => expect_encoded(
                v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection).write(out),
            ),
        }
    }

    /// Takes the next whole packet off the front of `input`; `Ok(None)` when more bytes are
    /// needed.
    pub(crate) fn decode(&self, input: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
        match self {
            Codec::V311 { .. } => decode_v311(input),
            Codec::V5 { .. } => decode_v5(input),
        }
    }
}

fn decode_v311(input: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
    let packet = match v4::Packet::read(input, INCOMING_PACKET_BYTES_MAX) {
        Ok(packet) => packet,
        Err(v4bytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(error) => return Err(DecodeError::V311(error)),
    };
    Ok(Some(match packet {
        v4::Packet::ConnAck(connack) => Incoming::ConnAck {
            refused: (connack.code != v4::ConnectReturnCode::Success)
                .then(|| format!("{:?}", connack.code)),
            receive_maximum: None,
        },
        v4::Packet::PubAck(ack) => Incoming::PubAck {
            pkid: ack.pkid,
            failure: None,
        },
        v4::Packet::PubRec(ack) => Incoming::PubRec {
            pkid: ack.pkid,
            failure: None,
        },
        v4::Packet::PubComp(ack) => Incoming::PubComp {
            pkid: ack.pkid,
            failure: None,
        },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect {
            reason: "DISCONNECT".into(),
        },
        other => Incoming::Unexpected(v4_name(&other)),
    }))
}

fn decode_v5(input: &mut BytesMut) -> Result<Option<Incoming>, DecodeError> {
    // rumqttc's v5 reader rejects a DISCONNECT with no reason code (remaining length 0), which
    // the spec allows and means a normal disconnection.
    if input.len() >= 2 && input[0] == 0xe0 && input[1] == 0 {
        let _ = input.split_to(2);
        return Ok(Some(Incoming::Disconnect {
            reason: "NormalDisconnection".into(),
        }));
    }
    let packet = match v5::Packet::read(input, Some(INCOMING_PACKET_BYTES_MAX as u32)) {
        Ok(packet) => packet,
        Err(v5bytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(error) => return Err(DecodeError::V5(error)),
    };
    Ok(Some(match packet {
        v5::Packet::ConnAck(connack) => Incoming::ConnAck {
            refused: (connack.code != v5::ConnectReturnCode::Success)
                .then(|| format!("{:?}", connack.code)),
            receive_maximum: connack.properties.and_then(|p| p.receive_max),
        },
        v5::Packet::PubAck(ack) => Incoming::PubAck {
            pkid: ack.pkid,
            failure: (!matches!(
                ack.reason,
                v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers
            ))
            .then(|| format!("PUBACK {:?}", ack.reason)),
        },
        v5::Packet::PubRec(ack) => Incoming::PubRec {
            pkid: ack.pkid,
            failure: (!matches!(
                ack.reason,
                v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
            ))
            .then(|| format!("PUBREC {:?}", ack.reason)),
        },
        v5::Packet::PubComp(ack) => Incoming::PubComp {
            pkid: ack.pkid,
            failure: (ack.reason != v5::PubCompReason::Success)
                .then(|| format!("PUBCOMP {:?}", ack.reason)),
        },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(disconnect) => Incoming::Disconnect {
            reason: format!("{:?}", disconnect.reason_code),
        },
        other => Incoming::Unexpected(v5_name(&other)),
    }))
}

/// Encoding our own packets fails only on a packet id of 0 or a length over the MQTT maximum,
/// both ruled out when the options are checked: a failure here is a bug.
fn expect_encoded<E: std::fmt::Debug>(result: Result<impl Sized, E>) {
    if let Err(error) = result {
        panic!("encoding a packet the options allow failed: {error:?}");
    }
}

fn v4_qos(qos: u8) -> v4bytes::QoS {
    match qos {
        0 => v4bytes::QoS::AtMostOnce,
        1 => v4bytes::QoS::AtLeastOnce,
        _ => v4bytes::QoS::ExactlyOnce,
    }
}

fn v5_qos(qos: u8) -> v5bytes::QoS {
    match qos {
        0 => v5bytes::QoS::AtMostOnce,
        1 => v5bytes::QoS::AtLeastOnce,
        _ => v5bytes::QoS::ExactlyOnce,
    }
}

fn v4_name(packet: &v4::Packet) -> &'static str {
    match packet {
        v4::Packet::Connect(_) => "CONNECT",
        v4::Packet::ConnAck(_) => "CONNACK",
        v4::Packet::Publish(_) => "PUBLISH",
        v4::Packet::PubAck(_) => "PUBACK",
        v4::Packet::PubRec(_) => "PUBREC",
        v4::Packet::PubRel(_) => "PUBREL",
        v4::Packet::PubComp(_) => "PUBCOMP",
        v4::Packet::Subscribe(_) => "SUBSCRIBE",
        v4::Packet::SubAck(_) => "SUBACK",
        v4::Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        v4::Packet::UnsubAck(_) => "UNSUBACK",
        v4::Packet::PingReq => "PINGREQ",
        v4::Packet::PingResp => "PINGRESP",
        v4::Packet::Disconnect => "DISCONNECT",
    }
}

fn v5_name(packet: &v5::Packet) -> &'static str {
    match packet {
        v5::Packet::Auth(_) => "AUTH",
        v5::Packet::Connect(..) => "CONNECT",
        v5::Packet::ConnAck(_) => "CONNACK",
        v5::Packet::Publish(_) => "PUBLISH",
        v5::Packet::PubAck(_) => "PUBACK",
        v5::Packet::PingReq(_) => "PINGREQ",
        v5::Packet::PingResp(_) => "PINGRESP",
        v5::Packet::Subscribe(_) => "SUBSCRIBE",
        v5::Packet::SubAck(_) => "SUBACK",
        v5::Packet::PubRec(_) => "PUBREC",
        v5::Packet::PubRel(_) => "PUBREL",
        v5::Packet::PubComp(_) => "PUBCOMP",
        v5::Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        v5::Packet::UnsubAck(_) => "UNSUBACK",
        v5::Packet::Disconnect(_) => "DISCONNECT",
    }
}
