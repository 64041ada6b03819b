//! rumqttc's MQTT 3.1.1 and 5.0 clients behind one API, so a test is written once and run for
//! both protocol versions.
//!
//! A background task polls rumqttc's event loop and forwards what happens (packets received,
//! publishes sent, the end of the connection) as [`Event`]s. Waiting for an event keeps the
//! others for later, so a retained message that arrives before its SUBACK is not lost. The task
//! stops at the first error: a test that reconnects makes a new [`Client`], which is how a real
//! device would see a broker restart, and keeps rumqttc from reconnecting behind the test's back.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5_packets;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::MQTT_TIMEOUT;

/// The MQTT protocol version a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4), through `rumqttc`.
    V311,
    /// MQTT 5.0, through `rumqttc::v5`.
    V5,
}

impl Version {
    /// Both versions, for tests that run once per version.
    pub const ALL: [Version; 2] = [Version::V311, Version::V5];

    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }
}

/// A will message, with the 5.0 will delay.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// 5.0 Will Delay Interval, in seconds; ignored in 3.1.1.
    pub delay_secs: Option<u32>,
}

/// How a [`Client`] connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub client_id: String,
    /// Clean session (3.1.1) or clean start (5.0).
    pub clean: bool,
    /// 5.0 Session Expiry Interval, in seconds; ignored in 3.1.1, where a session that is not
    /// clean persists until the broker's own limit.
    pub session_expiry_secs: Option<u32>,
    pub keep_alive_secs: u16,
    pub will: Option<Will>,
    /// 5.0 Topic Alias Maximum: how many aliases the broker may use towards this client.
    pub topic_alias_max: Option<u16>,
    /// QoS 1/2 publishes this client keeps in flight (5.0: also capped by the broker's Receive
    /// Maximum).
    pub inflight: u16,
}

impl ClientOptions {
    /// A clean session with a 30 s keep-alive and no will.
    pub fn new(client_id: &str) -> ClientOptions {
        ClientOptions {
            client_id: client_id.to_string(),
            clean: true,
            session_expiry_secs: None,
            keep_alive_secs: 30,
            will: None,
            topic_alias_max: None,
            inflight: 100,
        }
    }

    /// A session that outlives the connection: clean session false in 3.1.1, clean start
    /// false and a five-minute session expiry in 5.0.
    pub fn persistent(client_id: &str) -> ClientOptions {
        ClientOptions {
            clean: false,
            session_expiry_secs: Some(300),
            ..ClientOptions::new(client_id)
        }
    }
}

/// What the CONNACK said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckInfo {
    pub session_present: bool,
    /// 5.0 Topic Alias Maximum of the broker.
    pub topic_alias_max: Option<u16>,
    /// 5.0 Receive Maximum of the broker.
    pub receive_max: Option<u16>,
    /// 5.0 Server Keep Alive.
    pub server_keep_alive: Option<u16>,
    /// 5.0 Shared Subscription Available (absent means available).
    pub shared_subscription_available: Option<u8>,
}

/// A message delivered to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic, with a 5.0 topic alias resolved.
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// 5.0 Subscription Identifiers.
    pub subscription_ids: Vec<usize>,
    /// 5.0 Topic Alias, when the broker used one.
    pub topic_alias: Option<u16>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
}

impl Message {
    /// The payload as text, for assertions.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Something that happened on a client's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The broker accepted the connection; always the first event.
    ConnAck(ConnAckInfo),
    Publish(Message),
    /// A PUBACK for one of our QoS 1 publishes; `reason` is 0 in 3.1.1.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubComp {
        pkid: u16,
        reason: u8,
    },
    /// A SUBACK with the granted QoS or reason code of each filter.
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
    },
    /// A PUBLISH we sent went out with this packet id (0 for QoS 0). They go out in the order
    /// they were published, which is how a test maps acknowledgements back to its messages.
    Sent {
        pkid: u16,
    },
    /// The broker sent a DISCONNECT (5.0) with this reason code.
    Disconnect {
        reason: u8,
    },
    /// The connection ended, for the reason given; nothing follows.
    Closed {
        error: String,
    },
}

/// 5.0 properties of a PUBLISH we send.
#[derive(Debug, Clone, Default)]
pub struct PublishProps {
    pub topic_alias: Option<u16>,
    pub user_properties: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub message_expiry_secs: Option<u32>,
}

/// 5.0 options of a subscription (all default in 3.1.1).
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscribeOpts {
    /// 5.0 Subscription Identifier.
    pub id: Option<usize>,
    pub no_local: bool,
    pub retain_as_published: bool,
}

/// Publishes through a [`Client`]'s connection from another task.
#[derive(Debug, Clone)]
pub struct Publisher {
    handle: Handle,
}

impl Publisher {
    /// Queues a PUBLISH (no properties); fails once the connection has ended.
    pub async fn publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> Result<(), String> {
        let payload = payload.into();
        match &self.handle {
            Handle::V311(client) => client
                .publish_bytes(topic, v311_qos(qos), retain, payload)
                .await
                .map_err(|error| error.to_string()),
            Handle::V5(client) => client
                .publish_bytes(topic, v5_qos(qos), retain, payload)
                .await
                .map_err(|error| error.to_string()),
        }
    }
}

#[derive(Debug, Clone)]
enum Handle {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// A connected rumqttc client, either protocol version.
#[derive(Debug)]
pub struct Client {
    pub version: Version,
    pub client_id: String,
    /// The broker's CONNACK.
    pub connack: ConnAckInfo,
    handle: Handle,
    events: mpsc::UnboundedReceiver<Event>,
    pending: VecDeque<Event>,
    pump: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

impl Client {
    /// Connects and waits for a successful CONNACK.
    ///
    /// # Panics
    /// If the broker refuses or does not answer within [`MQTT_TIMEOUT`].
    pub async fn connect(version: Version, addr: SocketAddr, options: ClientOptions) -> Client {
        let client_id = options.client_id.clone();
        match Client::try_connect(version, addr, options).await {
            Ok(client) => client,
            Err(error) => panic!("{version:?} client {client_id:?} cannot connect: {error}"),
        }
    }

    /// Connects with a clean session under `client_id`.
    pub async fn connect_clean(version: Version, addr: SocketAddr, client_id: &str) -> Client {
        Client::connect(version, addr, ClientOptions::new(client_id)).await
    }

    /// Connects and waits for the CONNACK; an error describes a refusal or a failure.
    pub async fn try_connect(
        version: Version,
        addr: SocketAddr,
        options: ClientOptions,
    ) -> Result<Client, String> {
        let (sender, events) = mpsc::unbounded_channel();
        let host = addr.ip().to_string();
        let (handle, pump) = match version {
            Version::V311 => {
                let (client, eventloop) =
                    rumqttc::AsyncClient::new(v311_options(&options, host, addr.port()), 64);
                (
                    Handle::V311(client),
                    tokio::spawn(pump_v311(eventloop, sender)),
                )
            }
            Version::V5 => {
                let (client, eventloop) =
                    rumqttc::v5::AsyncClient::new(v5_options(&options, host, addr.port()), 64);
                (Handle::V5(client), tokio::spawn(pump_v5(eventloop, sender)))
            }
        };
        let mut client = Client {
            version,
            client_id: options.client_id,
            connack: ConnAckInfo::default(),
            handle,
            events,
            pending: VecDeque::new(),
            pump,
        };
        // The pump's first event is the CONNACK, or why there is none.
        let first = tokio::time::timeout(MQTT_TIMEOUT, client.events.recv())
            .await
            .map_err(|_| format!("no CONNACK from {addr} within {MQTT_TIMEOUT:?}"))?;
        match first {
            Some(Event::ConnAck(connack)) => client.connack = connack,
            Some(Event::Closed { error }) => return Err(error),
            Some(other) => panic!("the pump sent {other:?} before the CONNACK"),
            None => return Err("the event loop ended before the CONNACK".into()),
        }
        Ok(client)
    }

    /// Publishes without waiting for anything.
    pub async fn publish(&self, topic: &str, qos: u8, retain: bool, payload: impl Into<Bytes>) {
        self.publish_with(topic, qos, retain, payload, PublishProps::default())
            .await;
    }

    /// Publishes with 5.0 properties (which must be empty in 3.1.1).
    pub async fn publish_with(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: impl Into<Bytes>,
        props: PublishProps,
    ) {
        let payload = payload.into();
        let result = match &self.handle {
            Handle::V311(client) => {
                assert!(
                    props.topic_alias.is_none()
                        && props.user_properties.is_empty()
                        && props.content_type.is_none()
                        && props.message_expiry_secs.is_none(),
                    "3.1.1 has no publish properties"
                );
                client
                    .publish_bytes(topic, v311_qos(qos), retain, payload)
                    .await
                    .map_err(|error| error.to_string())
            }
            Handle::V5(client) => {
                let properties = v5_packets::PublishProperties {
                    topic_alias: props.topic_alias,
                    user_properties: props.user_properties,
                    content_type: props.content_type,
                    message_expiry_interval: props.message_expiry_secs,
                    ..Default::default()
                };
                client
                    .publish_bytes_with_properties(topic, v5_qos(qos), retain, payload, properties)
                    .await
                    .map_err(|error| error.to_string())
            }
        };
        if let Err(error) = result {
            panic!("{} cannot publish to {topic:?}: {error}", self.client_id);
        }
    }

    /// A handle that publishes from another task while this one reads events.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            handle: self.handle.clone(),
        }
    }

    /// Publishes and waits for the end of the QoS flow: the PUBACK (QoS 1) or PUBCOMP (QoS 2,
    /// or a PUBREC with an error reason). Returns the reason code (0 in 3.1.1 and for QoS 0).
    /// Use it with one publish in flight at a time.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> u8 {
        self.publish(topic, qos, retain, payload).await;
        self.await_ack(qos, MQTT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no acknowledgement for a QoS {qos} publish to {topic:?}"))
    }

    /// Waits for the end of the QoS flow of the publish just sent (see [`Self::publish_acked`]):
    /// `None` if `timeout` passes first.
    pub async fn await_ack(&mut self, qos: u8, timeout: Duration) -> Option<u8> {
        let pkid = self
            .wait_for(timeout, "the publish to go out", |event| match event {
                Event::Sent { pkid } => Some(*pkid),
                _ => None,
            })
            .await;
        if qos == 0 {
            return Some(0);
        }
        self.try_wait_for(timeout, |event| match *event {
            Event::PubAck {
                pkid: acked,
                reason,
            } if qos == 1 && acked == pkid => Some(reason),
            Event::PubRec {
                pkid: acked,
                reason,
            } if qos == 2 && acked == pkid && reason >= 0x80 => Some(reason),
            Event::PubComp {
                pkid: acked,
                reason,
            } if qos == 2 && acked == pkid => Some(reason),
            _ => None,
        })
        .await
    }

    /// Subscribes and returns the SUBACK's code for the filter.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> u8 {
        self.subscribe_with(filter, qos, SubscribeOpts::default())
            .await
    }

    /// Subscribes with 5.0 options and returns the SUBACK's code for the filter.
    pub async fn subscribe_with(&mut self, filter: &str, qos: u8, opts: SubscribeOpts) -> u8 {
        let result = match &self.handle {
            Handle::V311(client) => {
                assert!(
                    opts.id.is_none() && !opts.no_local && !opts.retain_as_published,
                    "3.1.1 has no subscription options"
                );
                client
                    .subscribe(filter, v311_qos(qos))
                    .await
                    .map_err(|error| error.to_string())
            }
            Handle::V5(client) => {
                let mut v5_filter = v5_packets::Filter::new(filter, v5_qos(qos));
                v5_filter.nolocal = opts.no_local;
                v5_filter.preserve_retain = opts.retain_as_published;
                let properties = v5_packets::SubscribeProperties {
                    id: opts.id,
                    user_properties: Vec::new(),
                };
                client
                    .subscribe_many_with_properties([v5_filter], properties)
                    .await
                    .map_err(|error| error.to_string())
            }
        };
        if let Err(error) = result {
            panic!("{} cannot subscribe to {filter:?}: {error}", self.client_id);
        }
        let codes = self
            .wait_for(MQTT_TIMEOUT, "a SUBACK", |event| match event {
                Event::SubAck { codes, .. } => Some(codes.clone()),
                _ => None,
            })
            .await;
        assert_eq!(codes.len(), 1, "one filter, one code: {codes:?}");
        codes[0]
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        let result = match &self.handle {
            Handle::V311(client) => client.unsubscribe(filter).await.map_err(|e| e.to_string()),
            Handle::V5(client) => client.unsubscribe(filter).await.map_err(|e| e.to_string()),
        };
        if let Err(error) = result {
            panic!("{} cannot unsubscribe {filter:?}: {error}", self.client_id);
        }
        self.wait_for(MQTT_TIMEOUT, "an UNSUBACK", |event| {
            matches!(event, Event::UnsubAck { .. }).then_some(())
        })
        .await;
    }

    /// Sends DISCONNECT (5.0: normal disconnection, so no will) and waits for the connection to
    /// end.
    pub async fn disconnect(mut self) {
        let result = match &self.handle {
            Handle::V311(client) => client.disconnect().await.map_err(|e| e.to_string()),
            Handle::V5(client) => client.disconnect().await.map_err(|e| e.to_string()),
        };
        if let Err(error) = result {
            panic!("{} cannot disconnect: {error}", self.client_id);
        }
        self.wait_closed(MQTT_TIMEOUT).await;
    }

    /// Closes the socket without a DISCONNECT, as a device that loses power would: the broker
    /// sees an abnormal disconnect.
    pub async fn drop_connection(mut self) {
        self.pump.abort();
        // The event loop, and its socket, are dropped once the aborted task is joined.
        let _ = (&mut self.pump).await;
    }

    /// Waits for the connection to end and returns why.
    ///
    /// # Panics
    /// If it is still open after `timeout`.
    pub async fn wait_closed(&mut self, timeout: Duration) -> String {
        self.wait_for(timeout, "the connection to close", |event| match event {
            Event::Closed { error } => Some(error.clone()),
            _ => None,
        })
        .await
    }

    /// The next delivered message.
    ///
    /// # Panics
    /// If none arrives within [`MQTT_TIMEOUT`].
    pub async fn recv(&mut self) -> Message {
        self.wait_for(MQTT_TIMEOUT, "a message", |event| match event {
            Event::Publish(message) => Some(message.clone()),
            _ => None,
        })
        .await
    }

    /// The next `count` delivered messages.
    pub async fn recv_many(&mut self, count: usize) -> Vec<Message> {
        let mut messages = Vec::with_capacity(count);
        for _ in 0..count {
            messages.push(self.recv().await);
        }
        messages
    }

    /// Every message delivered before the first one on `sentinel_topic`, which is consumed.
    /// A test that must show a message was not delivered publishes a sentinel after it: the
    /// broker keeps one publisher's messages in order, so once the sentinel is here, the
    /// other message would have been too.
    pub async fn recv_until(&mut self, sentinel_topic: &str) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            let message = self.recv().await;
            if message.topic == sentinel_topic {
                return messages;
            }
            messages.push(message);
        }
    }

    /// The next event, if one comes within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Events that arrived and were not consumed yet, without waiting.
    pub fn drain_events(&mut self) -> Vec<Event> {
        while let Ok(event) = self.events.try_recv() {
            self.pending.push_back(event);
        }
        self.pending.drain(..).collect()
    }

    /// Waits for the first event `select` picks, keeping the others for later.
    ///
    /// # Panics
    /// If `timeout` passes or the connection ends first, naming `what` was awaited.
    pub async fn wait_for<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        select: impl FnMut(&Event) -> Option<T>,
    ) -> T {
        let client_id = self.client_id.clone();
        match self.try_wait_for(timeout, select).await {
            Some(found) => found,
            None => panic!(
                "{client_id}: no {what} within {timeout:?}; events: {:?}",
                self.pending
            ),
        }
    }

    /// As [`Self::wait_for`], but `None` on timeout or when the connection ends first.
    pub async fn try_wait_for<T>(
        &mut self,
        timeout: Duration,
        mut select: impl FnMut(&Event) -> Option<T>,
    ) -> Option<T> {
        if let Some(index) = self
            .pending
            .iter()
            .position(|event| select(event).is_some())
        {
            let event = self
                .pending
                .remove(index)
                .expect("the index was just found");
            return select(&event);
        }
        let deadline = Instant::now() + timeout;
        if matches!(self.pending.back(), Some(Event::Closed { .. })) {
            return None;
        }
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .ok()??;
            if let Some(found) = select(&event) {
                return Some(found);
            }
            let closed = matches!(event, Event::Closed { .. });
            self.pending.push_back(event);
            if closed {
                return None;
            }
        }
    }
}

fn v311_qos(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => panic!("QoS {qos} does not exist"),
    }
}

fn v5_qos(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => panic!("QoS {qos} does not exist"),
    }
}

fn v311_options(options: &ClientOptions, host: String, port: u16) -> rumqttc::MqttOptions {
    let mut mqtt = rumqttc::MqttOptions::new(&options.client_id, host, port);
    mqtt.set_keep_alive(Duration::from_secs(options.keep_alive_secs.into()))
        .set_clean_session(options.clean)
        .set_inflight(options.inflight)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    if let Some(will) = &options.will {
        mqtt.set_last_will(rumqttc::LastWill::new(
            &will.topic,
            will.payload.clone(),
            v311_qos(will.qos),
            will.retain,
        ));
    }
    mqtt
}

fn v5_options(options: &ClientOptions, host: String, port: u16) -> rumqttc::v5::MqttOptions {
    let mut mqtt = rumqttc::v5::MqttOptions::new(&options.client_id, host, port);
    mqtt.set_keep_alive(Duration::from_secs(options.keep_alive_secs.into()))
        .set_clean_start(options.clean)
        .set_outgoing_inflight_upper_limit(options.inflight)
        .set_session_expiry_interval(options.session_expiry_secs)
        .set_topic_alias_max(options.topic_alias_max)
        .set_max_packet_size(Some(256 * 1024));
    if let Some(will) = &options.will {
        let properties = will.delay_secs.map(|delay| v5_packets::LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        });
        mqtt.set_last_will(v5_packets::LastWill::new(
            &will.topic,
            will.payload.clone(),
            v5_qos(will.qos),
            will.retain,
            properties,
        ));
    }
    mqtt
}

async fn pump_v311(mut eventloop: rumqttc::EventLoop, sender: mpsc::UnboundedSender<Event>) {
    use rumqttc::{Event as RawEvent, Outgoing, Packet};
    loop {
        let event = match eventloop.poll().await {
            Ok(RawEvent::Incoming(Packet::ConnAck(connack))) => Event::ConnAck(ConnAckInfo {
                session_present: connack.session_present,
                ..ConnAckInfo::default()
            }),
            Ok(RawEvent::Incoming(Packet::Publish(publish))) => Event::Publish(Message {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos as u8,
                retain: publish.retain,
                dup: publish.dup,
                subscription_ids: Vec::new(),
                topic_alias: None,
                user_properties: Vec::new(),
                content_type: None,
            }),
            Ok(RawEvent::Incoming(Packet::PubAck(ack))) => Event::PubAck {
                pkid: ack.pkid,
                reason: 0,
            },
            Ok(RawEvent::Incoming(Packet::PubRec(rec))) => Event::PubRec {
                pkid: rec.pkid,
                reason: 0,
            },
            Ok(RawEvent::Incoming(Packet::PubComp(comp))) => Event::PubComp {
                pkid: comp.pkid,
                reason: 0,
            },
            Ok(RawEvent::Incoming(Packet::SubAck(suback))) => Event::SubAck {
                pkid: suback.pkid,
                codes: suback
                    .return_codes
                    .iter()
                    .map(|code| match code {
                        rumqttc::SubscribeReasonCode::Success(qos) => *qos as u8,
                        rumqttc::SubscribeReasonCode::Failure => 0x80,
                    })
                    .collect(),
            },
            Ok(RawEvent::Incoming(Packet::UnsubAck(unsuback))) => Event::UnsubAck {
                pkid: unsuback.pkid,
            },
            Ok(RawEvent::Outgoing(Outgoing::Publish(pkid))) => Event::Sent { pkid },
            Ok(RawEvent::Outgoing(Outgoing::Disconnect)) => Event::Closed {
                error: "we disconnected".into(),
            },
            Ok(_) => continue,
            Err(error) => Event::Closed {
                error: error.to_string(),
            },
        };
        let last = matches!(event, Event::Closed { .. });
        if sender.send(event).is_err() || last {
            return;
        }
    }
}

async fn pump_v5(mut eventloop: rumqttc::v5::EventLoop, sender: mpsc::UnboundedSender<Event>) {
    use rumqttc::Outgoing;
    use rumqttc::v5::{ConnectionError, Event as RawEvent, StateError};
    use v5_packets::Packet;
    // rumqttc leaves inbound topic aliases to the application: resolve them here.
    let mut aliases: std::collections::HashMap<u16, String> = std::collections::HashMap::new();
    loop {
        let event = match eventloop.poll().await {
            Ok(RawEvent::Incoming(Packet::ConnAck(connack))) => {
                let properties = connack.properties.as_ref();
                Event::ConnAck(ConnAckInfo {
                    session_present: connack.session_present,
                    topic_alias_max: properties.and_then(|p| p.topic_alias_max),
                    receive_max: properties.and_then(|p| p.receive_max),
                    server_keep_alive: properties.and_then(|p| p.server_keep_alive),
                    shared_subscription_available: properties
                        .and_then(|p| p.shared_subscription_available),
                })
            }
            Ok(RawEvent::Incoming(Packet::Publish(publish))) => {
                let properties = publish.properties.unwrap_or_default();
                let mut topic = String::from_utf8_lossy(&publish.topic).into_owned();
                if let Some(alias) = properties.topic_alias {
                    if topic.is_empty() {
                        topic = aliases.get(&alias).cloned().unwrap_or_default();
                    } else {
                        aliases.insert(alias, topic.clone());
                    }
                }
                Event::Publish(Message {
                    topic,
                    payload: publish.payload,
                    qos: publish.qos as u8,
                    retain: publish.retain,
                    dup: publish.dup,
                    subscription_ids: properties.subscription_identifiers,
                    topic_alias: properties.topic_alias,
                    user_properties: properties.user_properties,
                    content_type: properties.content_type,
                })
            }
            Ok(RawEvent::Incoming(Packet::PubAck(ack))) => Event::PubAck {
                pkid: ack.pkid,
                reason: puback_reason(ack.reason),
            },
            Ok(RawEvent::Incoming(Packet::PubRec(rec))) => Event::PubRec {
                pkid: rec.pkid,
                reason: pubrec_reason(rec.reason),
            },
            Ok(RawEvent::Incoming(Packet::PubComp(comp))) => Event::PubComp {
                pkid: comp.pkid,
                reason: match comp.reason {
                    v5_packets::PubCompReason::Success => 0,
                    v5_packets::PubCompReason::PacketIdentifierNotFound => 0x92,
                },
            },
            Ok(RawEvent::Incoming(Packet::SubAck(suback))) => Event::SubAck {
                pkid: suback.pkid,
                codes: suback.return_codes.iter().map(suback_code).collect(),
            },
            Ok(RawEvent::Incoming(Packet::UnsubAck(unsuback))) => Event::UnsubAck {
                pkid: unsuback.pkid,
            },
            Ok(RawEvent::Outgoing(Outgoing::Publish(pkid))) => Event::Sent { pkid },
            Ok(RawEvent::Outgoing(Outgoing::Disconnect)) => Event::Closed {
                error: "we disconnected".into(),
            },
            Ok(_) => continue,
            Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                reason_string,
            })) => {
                let _ = sender.send(Event::Disconnect {
                    reason: reason_code as u8,
                });
                Event::Closed {
                    error: format!(
                        "the broker disconnected us with reason {:#04x} ({reason_string:?})",
                        reason_code as u8
                    ),
                }
            }
            Err(error) => Event::Closed {
                error: error.to_string(),
            },
        };
        let last = matches!(event, Event::Closed { .. });
        if sender.send(event).is_err() || last {
            return;
        }
    }
}

fn puback_reason(reason: v5_packets::PubAckReason) -> u8 {
    use v5_packets::PubAckReason::*;
    match reason {
        Success => 0x00,
        NoMatchingSubscribers => 0x10,
        UnspecifiedError => 0x80,
        ImplementationSpecificError => 0x83,
        NotAuthorized => 0x87,
        TopicNameInvalid => 0x90,
        PacketIdentifierInUse => 0x91,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_reason(reason: v5_packets::PubRecReason) -> u8 {
    use v5_packets::PubRecReason::*;
    match reason {
        Success => 0x00,
        NoMatchingSubscribers => 0x10,
        UnspecifiedError => 0x80,
        ImplementationSpecificError => 0x83,
        NotAuthorized => 0x87,
        TopicNameInvalid => 0x90,
        PacketIdentifierInUse => 0x91,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
    }
}

fn suback_code(code: &v5_packets::SubscribeReasonCode) -> u8 {
    use v5_packets::SubscribeReasonCode::*;
    match code {
        Success(qos) => *qos as u8,
        Failure | Unspecified => 0x80,
        ImplementationSpecific => 0x83,
        NotAuthorized => 0x87,
        TopicFilterInvalid => 0x8F,
        PkidInUse => 0x91,
        QuotaExceeded => 0x97,
        SharedSubscriptionsNotSupported => 0x9E,
        SubscriptionIdNotSupported => 0xA1,
        WildcardSubscriptionsNotSupported => 0xA2,
    }
}

/// Packet ids of QoS 1 publishes in flight, mapped back to the caller's own message numbers:
/// feed it every [`Event::Sent`] and [`Event::PubAck`] of a client that publishes numbered
/// messages in order, and it yields the number of each acknowledged message.
#[derive(Debug, Default)]
pub struct AckTracker {
    next_sent: u64,
    in_flight: HashMap<u16, u64>,
}

impl AckTracker {
    /// Notes `event`; returns the message number a successful PUBACK acknowledges, and the
    /// reason code for a refused one as `Err((number, reason))`.
    ///
    /// # Panics
    /// On a PUBACK for a packet id that is not in flight.
    pub fn note(&mut self, event: &Event) -> Option<Result<u64, (u64, u8)>> {
        match *event {
            Event::Sent { pkid } if pkid != 0 => {
                let previous = self.in_flight.insert(pkid, self.next_sent);
                assert!(
                    previous.is_none(),
                    "packet id {pkid} reused while in flight"
                );
                self.next_sent += 1;
                None
            }
            Event::PubAck { pkid, reason } => {
                let number = self
                    .in_flight
                    .remove(&pkid)
                    .unwrap_or_else(|| panic!("PUBACK for packet id {pkid}, not in flight"));
                Some(if reason < 0x80 {
                    Ok(number)
                } else {
                    Err((number, reason))
                })
            }
            _ => None,
        }
    }

    /// How many publishes went out.
    pub fn sent(&self) -> u64 {
        self.next_sent
    }
}
