//! Messages in the broker and the state of one session.
//!
//! A session outlives its connections: its queue, its in-flight window and its QoS 2 state
//! stay here while the client is away, and the next connection with the same client id
//! picks them up. The session's subscriptions live in the broker's subscription store.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;

use super::encode::PublishProperties;
use super::{Limits, lock};
use crate::mqtt::ingest::{IngestRecord, PublishMeta, ingest_record};
use crate::mqtt::qos::{Inbound, Outbound};
use crate::mqtt::route::RouteTable;
use crate::mqtt::store::{Op, StoredMessage, StoredProperties, StoredWill};
use crate::mqtt::subscriptions::QoS;
use crate::mqtt::topic::TopicName;

/// One published message, shared by every copy queued for a subscriber.
#[derive(Debug)]
pub(crate) struct Message {
    pub(crate) topic: TopicName,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    /// Wall-clock time it was published, for message expiry (it survives restarts).
    pub(crate) published_at_ms: i64,
    /// 5.0 Message Expiry Interval as published.
    pub(crate) expiry_secs: Option<u32>,
    pub(crate) properties: PublishProperties,
    /// Client id of the publisher, for No Local.
    pub(crate) publisher: Arc<str>,
}

impl Message {
    /// Seconds of life left at `now_ms`: `Some(None)` without expiry, `None` once expired.
    pub(crate) fn remaining_expiry(&self, now_ms: i64) -> Option<Option<u32>> {
        match self.expiry_secs {
            None => Some(None),
            Some(secs) => {
                let elapsed_secs = (now_ms - self.published_at_ms).max(0) / 1000;
                let left = i64::from(secs) - elapsed_secs;
                (left > 0).then_some(Some(left as u32))
            }
        }
    }

    /// The log record that keeps this message, as the routes place it.
    pub(crate) fn ingest_record<'r>(&self, routes: &'r RouteTable) -> IngestRecord<'r> {
        let meta = PublishMeta {
            client_id: &self.publisher,
            topic: &self.topic,
            qos: self.qos,
            retain: self.retain,
            content_type: self.properties.content_type.as_deref(),
            payload_format_utf8: self.properties.payload_format_utf8,
            user_properties: &self.properties.user_properties,
        };
        ingest_record(routes, &meta, self.payload.clone(), self.published_at_ms)
    }

    pub(crate) fn to_stored(&self) -> StoredMessage {
        let p = &self.properties;
        StoredMessage {
            topic: self.topic.as_str().to_string(),
            payload: self.payload.clone(),
            qos: self.qos.as_u8(),
            retain: self.retain,
            published_at_ms: self.published_at_ms,
            expiry_interval_secs: self.expiry_secs,
            properties: StoredProperties {
                payload_format_utf8: p.payload_format_utf8,
                content_type: p.content_type.clone(),
                response_topic: p.response_topic.clone(),
                correlation_data: p.correlation_data.clone(),
                user_properties: p.user_properties.clone(),
            },
            subscription_ids: Vec::new(),
        }
    }

    /// A message from the store; `None` if its topic is no longer valid (a foreign edit).
    pub(crate) fn from_stored(stored: StoredMessage, publisher: Arc<str>) -> Option<Message> {
        let topic = TopicName::new(&stored.topic).ok()?;
        let p = stored.properties;
        Some(Message {
            topic,
            payload: stored.payload,
            qos: QoS::from_u8(stored.qos)?,
            retain: stored.retain,
            published_at_ms: stored.published_at_ms,
            expiry_secs: stored.expiry_interval_secs,
            properties: PublishProperties {
                payload_format_utf8: p.payload_format_utf8,
                content_type: p.content_type,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
            },
            publisher,
        })
    }
}

/// A will that may still be published: the connection that left it ended without a normal
/// DISCONNECT and its delay is running (or it waits in the store for one to start).
#[derive(Debug, Clone)]
pub(crate) struct PendingWill {
    pub(crate) topic: TopicName,
    pub(crate) payload: Bytes,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    /// 5.0 Message Expiry Interval of the will message.
    pub(crate) expiry_secs: Option<u32>,
    pub(crate) properties: PublishProperties,
    /// 5.0 Will Delay Interval, seconds.
    pub(crate) delay_secs: u32,
    /// The token the store knows it by (persistent sessions only); its log record carries
    /// it in `mqtt.will_id`.
    pub(crate) token: Option<u64>,
}

impl PendingWill {
    /// The will as the message it publishes at `now_ms`.
    pub(crate) fn message(&self, publisher: Arc<str>, now_ms: i64) -> Message {
        Message {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            published_at_ms: now_ms,
            expiry_secs: self.expiry_secs,
            properties: self.properties.clone(),
            publisher,
        }
    }

    /// The store's form; `token` is the one it is journaled under.
    pub(crate) fn to_stored(&self, token: u64) -> StoredWill {
        let message = self.message(Arc::from(""), 0).to_stored();
        StoredWill {
            message,
            delay_secs: self.delay_secs,
            token,
            firing: None,
        }
    }

    /// A will from the store; `None` if its topic is no longer valid (a foreign edit).
    pub(crate) fn from_stored(stored: StoredWill) -> Option<PendingWill> {
        let message = Message::from_stored(stored.message, Arc::from(""))?;
        Some(PendingWill {
            topic: message.topic,
            payload: message.payload,
            qos: message.qos,
            retain: message.retain,
            expiry_secs: message.expiry_secs,
            properties: message.properties,
            delay_secs: stored.delay_secs,
            token: Some(stored.token),
        })
    }
}

/// One copy of a message for one session.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub(crate) message: Arc<Message>,
    /// The QoS it goes out at: the lower of the message's and the subscription's.
    pub(crate) qos: QoS,
    /// The RETAIN flag it goes out with.
    pub(crate) retain: bool,
    pub(crate) subscription_ids: Vec<u32>,
    /// Its sequence number in the store when the session is persistent and the QoS is 1 or 2.
    pub(crate) seq: Option<u64>,
}

/// What a session holds while its client is connected or away.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client_id: Arc<str>,
    /// Session Expiry Interval in seconds; 0 ends the session with the connection.
    pub(crate) expiry_secs: u32,
    /// Whether the store knows this session (it was opened with a non-zero expiry).
    pub(crate) stored: bool,
    /// The generation of the connection attached now, if any.
    pub(crate) attached: Option<u64>,
    /// Set to the attached generation when a new connection takes the session over: that
    /// connection stops and hands the session back as if its client had gone.
    pub(crate) evicted: Option<u64>,
    /// Closes (its sender drops) once the attached connection has finished with the session:
    /// everything it read is routed or acknowledged and the session handed back.
    pub(crate) attached_done: Option<tokio::sync::watch::Receiver<()>>,
    /// Bumped at every attach and detach: timers armed for an older generation do nothing.
    pub(crate) epoch: u64,
    /// User name of the last connection, for access checks on delivery.
    pub(crate) username: Option<String>,
    pub(crate) queue: VecDeque<Queued>,
    pub(crate) queued_bytes: usize,
    pub(crate) outbound: Outbound<Queued>,
    pub(crate) inbound: Inbound,
    pub(crate) next_seq: u64,
    /// The will waiting for its delay while the client is away; a connection attaching
    /// cancels it.
    pub(crate) will: Option<PendingWill>,
}

/// Why a copy was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// QoS 0 for a session whose client is away: not kept (as Mosquitto's default).
    OfflineQos0,
    QueueFull,
}

impl Refusal {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::OfflineQos0 => "offline_qos0",
            Refusal::QueueFull => "queue_full",
        }
    }
}

impl Session {
    pub(crate) fn new(client_id: Arc<str>, limits: &Limits) -> Session {
        Session {
            client_id,
            expiry_secs: 0,
            stored: false,
            attached: None,
            evicted: None,
            attached_done: None,
            epoch: 0,
            username: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            outbound: Outbound::new(limits.max_inflight_out),
            inbound: Inbound::new(limits.receive_maximum),
            next_seq: 1,
            will: None,
        }
    }

    /// Whether the connection of `generation` still serves this session (it is attached and
    /// not being taken over).
    pub(crate) fn is_served_by(&self, generation: u64) -> bool {
        self.attached == Some(generation) && self.evicted != Some(generation)
    }

    /// Queues a copy, recording it in the store when the session is persistent.
    pub(crate) fn enqueue(
        &mut self,
        mut copy: Queued,
        limits: &Limits,
        ops: &mut Vec<Op>,
    ) -> Result<(), Refusal> {
        if self.attached.is_none() && copy.qos == QoS::AtMostOnce {
            return Err(Refusal::OfflineQos0);
        }
        let bytes = copy.message.payload.len();
        if self.queue.len() >= limits.max_queued_messages
            || self.queued_bytes + bytes > limits.max_queued_bytes
        {
            return Err(Refusal::QueueFull);
        }
        if self.stored && copy.qos != QoS::AtMostOnce {
            let seq = self.next_seq;
            self.next_seq += 1;
            copy.seq = Some(seq);
            // The copy as it goes out (its QoS, RETAIN flag and subscription ids), so that a
            // restart delivers it as it would have been delivered without one.
            let mut message = copy.message.to_stored();
            message.qos = copy.qos.as_u8();
            message.retain = copy.retain;
            message.subscription_ids = copy.subscription_ids.clone();
            ops.push(Op::Enqueue {
                client_id: self.client_id.to_string(),
                seq,
                message,
            });
        }
        self.queued_bytes += bytes;
        self.queue.push_back(copy);
        Ok(())
    }

    /// The next copy to send, with its packet id for QoS 1 and 2, while the in-flight window
    /// has room. Expired copies are dropped on the way.
    pub(crate) fn next_to_send(
        &mut self,
        now_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Option<(Queued, Option<u16>)> {
        loop {
            let front = self.queue.front()?;
            if front.qos != QoS::AtMostOnce && !self.outbound.has_capacity() {
                return None;
            }
            let copy = self.queue.pop_front()?;
            self.queued_bytes -= copy.message.payload.len();
            if copy.message.remaining_expiry(now_ms).is_none() {
                self.forget(&copy, ops);
                continue;
            }
            if copy.qos == QoS::AtMostOnce {
                return Some((copy, None));
            }
            match self.outbound.send(copy.qos, copy.clone()) {
                Some(id) => return Some((copy, Some(id))),
                // No free packet id (all 65,535 in use): wait for an acknowledgement.
                None => {
                    self.queued_bytes += copy.message.payload.len();
                    self.queue.push_front(copy);
                    return None;
                }
            }
        }
    }

    /// The copy is done with (delivered, expired or dropped): the store forgets it.
    pub(crate) fn forget(&self, copy: &Queued, ops: &mut Vec<Op>) {
        if let Some(seq) = copy.seq {
            ops.push(Op::Dequeue {
                client_id: self.client_id.to_string(),
                seq,
            });
        }
    }
}

/// A session and the signal that wakes its connection when there is something to send.
#[derive(Debug)]
pub(crate) struct SessionCell {
    pub(crate) state: std::sync::Mutex<Session>,
    pub(crate) notify: Notify,
    /// Mirrors `Session::attached.is_some()`, read without the lock when choosing a shared
    /// subscription's member.
    pub(crate) online: AtomicBool,
}

impl SessionCell {
    pub(crate) fn new(session: Session) -> Arc<SessionCell> {
        Arc::new(SessionCell {
            online: AtomicBool::new(session.attached.is_some()),
            state: std::sync::Mutex::new(session),
            notify: Notify::new(),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        lock(&self.state)
    }

    pub(crate) fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub(crate) fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
    }
}
