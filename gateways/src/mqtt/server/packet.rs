//! Client packets of either protocol version, as one set of types the connection handles.
//!
//! 3.1.1 packets become their 5.0 equivalents with every 5.0-only field at its default, so
//! the session logic is written once. Property rules the codec leaves to the session layer
//! (Receive Maximum 0, Maximum Packet Size 0) are checked here.

use bytes::Bytes;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::encode::PublishProperties;
use crate::mqtt::codec::Frame;
use crate::mqtt::reason;
use crate::mqtt::subscriptions::{QoS, RetainHandling};

/// A protocol error in a packet the codec accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PacketError {
    #[error("Receive Maximum is 0")]
    ReceiveMaximumZero,
    #[error("Maximum Packet Size is 0")]
    MaximumPacketSizeZero,
    #[error("the will topic is not UTF-8")]
    WillTopicNotUtf8,
}

impl PacketError {
    pub(crate) fn reason_code(self) -> u8 {
        match self {
            PacketError::ReceiveMaximumZero | PacketError::MaximumPacketSizeZero => {
                reason::PROTOCOL_ERROR
            }
            PacketError::WillTopicNotUtf8 => reason::TOPIC_NAME_INVALID,
        }
    }
}

/// A will message from CONNECT.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    /// 5.0 Will Delay Interval, seconds.
    pub(crate) delay_secs: u32,
    pub(crate) message_expiry: Option<u32>,
    pub(crate) properties: PublishProperties,
}

#[derive(Debug, Clone)]
pub(crate) struct Connect {
    pub(crate) v5: bool,
    pub(crate) client_id: String,
    pub(crate) clean_start: bool,
    pub(crate) keep_alive: u16,
    /// 5.0 Session Expiry Interval; `None` in 3.1.1.
    pub(crate) session_expiry: Option<u32>,
    pub(crate) receive_maximum: Option<u16>,
    pub(crate) maximum_packet_size: Option<u32>,
    pub(crate) topic_alias_maximum: u16,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) will: Option<Will>,
    pub(crate) authentication_method: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Publish {
    /// Empty when a 5.0 client sends only a Topic Alias.
    pub(crate) topic: String,
    pub(crate) topic_alias: Option<u16>,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) packet_id: u16,
    pub(crate) payload: Bytes,
    pub(crate) message_expiry: Option<u32>,
    pub(crate) properties: PublishProperties,
}

#[derive(Debug, Clone)]
pub(crate) struct SubscribeFilter {
    pub(crate) filter: String,
    pub(crate) qos: QoS,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    pub(crate) retain_handling: RetainHandling,
}

#[derive(Debug, Clone)]
pub(crate) enum ClientPacket {
    Connect(Box<Connect>),
    Publish(Box<Publish>),
    Puback {
        id: u16,
    },
    Pubrec {
        id: u16,
        reason: u8,
    },
    Pubrel {
        id: u16,
    },
    Pubcomp {
        id: u16,
    },
    Subscribe {
        id: u16,
        subscription_id: Option<u32>,
        filters: Vec<SubscribeFilter>,
    },
    Unsubscribe {
        id: u16,
        filters: Vec<String>,
    },
    Pingreq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
    Auth,
    /// Packets only a server sends; the codec refuses them, so this is never produced.
    ServerOnly,
}

fn qos_v4(qos: rumqttc::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match qos {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn pubrec_reason(reason: v5::PubRecReason) -> u8 {
    match reason {
        v5::PubRecReason::Success => 0x00,
        v5::PubRecReason::NoMatchingSubscribers => 0x10,
        v5::PubRecReason::UnspecifiedError => 0x80,
        v5::PubRecReason::ImplementationSpecificError => 0x83,
        v5::PubRecReason::NotAuthorized => 0x87,
        v5::PubRecReason::TopicNameInvalid => 0x90,
        v5::PubRecReason::PacketIdentifierInUse => 0x91,
        v5::PubRecReason::QuotaExceeded => 0x97,
        v5::PubRecReason::PayloadFormatInvalid => 0x99,
    }
}

/// Turns a decoded frame into a [`ClientPacket`].
pub(crate) fn from_frame(frame: Frame) -> Result<ClientPacket, PacketError> {
    match frame {
        Frame::V4(packet) => Ok(from_v4(packet)),
        Frame::V5(packet) => from_v5(packet),
    }
}

fn from_v4(packet: v4::Packet) -> ClientPacket {
    match packet {
        v4::Packet::Connect(connect) => {
            let will = connect.last_will.map(|will| Will {
                topic: will.topic,
                payload: will.message,
                qos: qos_v4(will.qos),
                retain: will.retain,
                delay_secs: 0,
                message_expiry: None,
                properties: PublishProperties::default(),
            });
            let (username, password) = match connect.login {
                Some(login) => (Some(login.username), Some(login.password)),
                None => (None, None),
            };
            ClientPacket::Connect(Box::new(Connect {
                v5: false,
                client_id: connect.client_id,
                clean_start: connect.clean_session,
                keep_alive: connect.keep_alive,
                session_expiry: None,
                receive_maximum: None,
                maximum_packet_size: None,
                topic_alias_maximum: 0,
                username,
                // 3.1.1 allows a user name without a password; rumqttc reads it as empty.
                password: password.filter(|p| !p.is_empty()),
                will,
                authentication_method: None,
            }))
        }
        v4::Packet::Publish(publish) => ClientPacket::Publish(Box::new(Publish {
            topic: publish.topic,
            topic_alias: None,
            qos: qos_v4(publish.qos),
            retain: publish.retain,
            packet_id: publish.pkid,
            payload: publish.payload,
            message_expiry: None,
            properties: PublishProperties::default(),
        })),
        v4::Packet::PubAck(ack) => ClientPacket::Puback { id: ack.pkid },
        v4::Packet::PubRec(ack) => ClientPacket::Pubrec {
            id: ack.pkid,
            reason: 0,
        },
        v4::Packet::PubRel(ack) => ClientPacket::Pubrel { id: ack.pkid },
        v4::Packet::PubComp(ack) => ClientPacket::Pubcomp { id: ack.pkid },
        v4::Packet::Subscribe(subscribe) => ClientPacket::Subscribe {
            id: subscribe.pkid,
            subscription_id: None,
            filters: subscribe
                .filters
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: f.path,
                    qos: qos_v4(f.qos),
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::SendAtSubscribe,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(unsubscribe) => ClientPacket::Unsubscribe {
            id: unsubscribe.pkid,
            filters: unsubscribe.topics,
        },
        v4::Packet::PingReq => ClientPacket::Pingreq,
        v4::Packet::Disconnect => ClientPacket::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_)
        | v4::Packet::SubAck(_)
        | v4::Packet::UnsubAck(_)
        | v4::Packet::PingResp => ClientPacket::ServerOnly,
    }
}

fn from_v5(packet: v5::Packet) -> Result<ClientPacket, PacketError> {
    Ok(match packet {
        v5::Packet::Connect(connect, will, login) => {
            let props = connect
                .properties
                .unwrap_or_else(v5::ConnectProperties::new);
            if props.receive_maximum == Some(0) {
                return Err(PacketError::ReceiveMaximumZero);
            }
            if props.max_packet_size == Some(0) {
                return Err(PacketError::MaximumPacketSizeZero);
            }
            let will = match will {
                None => None,
                Some(will) => {
                    let topic = String::from_utf8(will.topic.to_vec())
                        .map_err(|_| PacketError::WillTopicNotUtf8)?;
                    let wp = will.properties;
                    Some(Will {
                        topic,
                        payload: will.message,
                        qos: qos_v5(will.qos),
                        retain: will.retain,
                        delay_secs: wp.as_ref().and_then(|p| p.delay_interval).unwrap_or(0),
                        message_expiry: wp.as_ref().and_then(|p| p.message_expiry_interval),
                        properties: match wp {
                            None => PublishProperties::default(),
                            Some(p) => PublishProperties {
                                payload_format_utf8: p.payload_format_indicator.map(|v| v == 1),
                                content_type: p.content_type,
                                response_topic: p.response_topic,
                                correlation_data: p.correlation_data,
                                user_properties: p.user_properties,
                            },
                        },
                    })
                }
            };
            let (username, password) = match login {
                Some(login) => (
                    Some(login.username).filter(|u| !u.is_empty() || !login.password.is_empty()),
                    Some(login.password).filter(|p| !p.is_empty()),
                ),
                None => (None, None),
            };
            ClientPacket::Connect(Box::new(Connect {
                v5: true,
                client_id: connect.client_id,
                clean_start: connect.clean_start,
                keep_alive: connect.keep_alive,
                session_expiry: Some(props.session_expiry_interval.unwrap_or(0)),
                receive_maximum: props.receive_maximum,
                maximum_packet_size: props.max_packet_size,
                topic_alias_maximum: props.topic_alias_max.unwrap_or(0),
                username,
                password,
                will,
                authentication_method: props.authentication_method,
            }))
        }
        v5::Packet::Publish(publish) => {
            // The codec checked that a 5.0 topic is UTF-8.
            let topic = String::from_utf8_lossy(&publish.topic).into_owned();
            let (alias, expiry, properties) = match publish.properties {
                None => (None, None, PublishProperties::default()),
                Some(p) => (
                    p.topic_alias,
                    p.message_expiry_interval,
                    PublishProperties {
                        payload_format_utf8: p.payload_format_indicator.map(|v| v == 1),
                        content_type: p.content_type,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        user_properties: p.user_properties,
                    },
                ),
            };
            ClientPacket::Publish(Box::new(Publish {
                topic,
                topic_alias: alias,
                qos: qos_v5(publish.qos),
                retain: publish.retain,
                packet_id: publish.pkid,
                payload: publish.payload,
                message_expiry: expiry,
                properties,
            }))
        }
        v5::Packet::PubAck(ack) => ClientPacket::Puback { id: ack.pkid },
        v5::Packet::PubRec(ack) => ClientPacket::Pubrec {
            id: ack.pkid,
            reason: pubrec_reason(ack.reason),
        },
        v5::Packet::PubRel(ack) => ClientPacket::Pubrel { id: ack.pkid },
        v5::Packet::PubComp(ack) => ClientPacket::Pubcomp { id: ack.pkid },
        v5::Packet::Subscribe(subscribe) => ClientPacket::Subscribe {
            id: subscribe.pkid,
            subscription_id: subscribe
                .properties
                .as_ref()
                .and_then(|p| p.id)
                .and_then(|id| u32::try_from(id).ok()),
            filters: subscribe
                .filters
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: f.path,
                    qos: qos_v5(f.qos),
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => RetainHandling::SendAtSubscribe,
                        v5::RetainForwardRule::OnNewSubscribe => {
                            RetainHandling::SendAtSubscribeIfNew
                        }
                        v5::RetainForwardRule::Never => RetainHandling::DoNotSend,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(unsubscribe) => ClientPacket::Unsubscribe {
            id: unsubscribe.pkid,
            filters: unsubscribe.filters,
        },
        v5::Packet::PingReq(_) => ClientPacket::Pingreq,
        v5::Packet::Disconnect(disconnect) => ClientPacket::Disconnect {
            reason: disconnect.reason_code as u8,
            session_expiry: disconnect
                .properties
                .and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => ClientPacket::Auth,
        v5::Packet::ConnAck(_)
        | v5::Packet::SubAck(_)
        | v5::Packet::UnsubAck(_)
        | v5::Packet::PingResp(_) => ClientPacket::ServerOnly,
    })
}
