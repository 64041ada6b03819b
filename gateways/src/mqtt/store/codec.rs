//! The journal's entry codec: `[u32 LE body length][u32 LE CRC-32C of the body][body]`, the
//! body an op kind byte then the op's fields (see the parent module for the encoding).
//!
//! Sizes are computed by the same code that encodes (a [`Sink`] that counts), so the store's
//! live-size accounting cannot drift from what compaction writes. Decoding checks every
//! length against the bytes left before it allocates.

use bytes::Bytes;

use super::{
    Op, StoredMessage, StoredProperties, StoredQos2, StoredSubscription, StoredWill,
    StoredWillFiring,
};

/// Bytes before each entry's body: length then CRC-32C.
pub(super) const ENTRY_HEADER_BYTES: u64 = 8;

const KIND_SESSION_OPEN: u8 = 1;
const KIND_SESSION_CLOSED: u8 = 2;
const KIND_SESSION_REMOVE: u8 = 3;
const KIND_SUBSCRIBE: u8 = 4;
const KIND_UNSUBSCRIBE: u8 = 5;
const KIND_ENQUEUE: u8 = 6;
const KIND_DEQUEUE: u8 = 7;
const KIND_RETAIN: u8 = 8;
const KIND_CLEAR_RETAINED: u8 = 9;
const KIND_QOS2_SET: u8 = 10;
const KIND_QOS2_RELEASE: u8 = 11;
const KIND_WILL_SET: u8 = 12;
const KIND_WILL_FIRING: u8 = 13;
const KIND_WILL_CLEAR: u8 = 14;
/// An enqueue whose copy carries subscription identifiers: kind 6's fields, then a u32 count
/// and the ids. A copy without ids is written as kind 6, as before kind 15 existed.
const KIND_ENQUEUE_IDS: u8 = 15;

/// Tags of [`StoredQos2`] in a `qos2-set` entry.
const QOS2_INTENT: u8 = 0;
const QOS2_RECEIVED: u8 = 1;

/// An op borrowed from an [`Op`] or from the mirror, so that compaction encodes without
/// cloning messages.
#[derive(Clone, Copy)]
pub(super) enum Entry<'a> {
    SessionOpen {
        client_id: &'a str,
        protocol_level: u8,
        expiry_secs: u32,
    },
    SessionClosed {
        client_id: &'a str,
        at_ms: i64,
    },
    SessionRemove {
        client_id: &'a str,
    },
    Subscribe {
        client_id: &'a str,
        subscription: &'a StoredSubscription,
    },
    Unsubscribe {
        client_id: &'a str,
        filter: &'a str,
    },
    Enqueue {
        client_id: &'a str,
        seq: u64,
        message: &'a StoredMessage,
    },
    Dequeue {
        client_id: &'a str,
        seq: u64,
    },
    Retain {
        message: &'a StoredMessage,
    },
    ClearRetained {
        topic: &'a str,
    },
    Qos2Set {
        client_id: &'a str,
        packet_id: u16,
        state: &'a StoredQos2,
    },
    Qos2Release {
        client_id: &'a str,
        packet_id: u16,
    },
    WillSet {
        client_id: &'a str,
        will: &'a StoredWill,
    },
    WillFiring {
        client_id: &'a str,
        token: u64,
        firing: &'a StoredWillFiring,
    },
    WillClear {
        client_id: &'a str,
        token: Option<u64>,
    },
}

/// Where an entry body is encoded: a buffer, or a counter, so that sizes are computed by the
/// same code that encodes and cannot drift from it.
trait Sink {
    fn put(&mut self, bytes: &[u8]);

    fn put_u8(&mut self, value: u8) {
        self.put(&[value]);
    }

    fn put_bool(&mut self, value: bool) {
        self.put_u8(u8::from(value));
    }

    fn put_u16(&mut self, value: u16) {
        self.put(&value.to_le_bytes());
    }

    fn put_u32(&mut self, value: u32) {
        self.put(&value.to_le_bytes());
    }

    fn put_u64(&mut self, value: u64) {
        self.put(&value.to_le_bytes());
    }

    fn put_i64(&mut self, value: i64) {
        self.put(&value.to_le_bytes());
    }

    /// Callers check the whole body against `entry_bytes_max` (at most `u32::MAX`) before
    /// encoding into a buffer, so the length fits.
    fn put_bytes(&mut self, bytes: &[u8]) {
        self.put_u32(bytes.len() as u32);
        self.put(bytes);
    }

    fn put_str(&mut self, value: &str) {
        self.put_bytes(value.as_bytes());
    }

    fn put_option<T>(&mut self, value: Option<T>, put: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.put_u8(0),
            Some(value) => {
                self.put_u8(1);
                put(self, value);
            }
        }
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct ByteCount(u64);

impl Sink for ByteCount {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len() as u64;
    }
}

pub(super) fn body_bytes(entry: Entry<'_>) -> u64 {
    let mut count = ByteCount(0);
    put_body(&mut count, entry);
    count.0
}

pub(super) fn entry_bytes(entry: Entry<'_>) -> u64 {
    ENTRY_HEADER_BYTES + body_bytes(entry)
}

/// Appends `[length][crc][body]` to `out`.
pub(super) fn encode_entry(out: &mut Vec<u8>, entry: Entry<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; ENTRY_HEADER_BYTES as usize]);
    put_body(out, entry);
    let body = &out[start + ENTRY_HEADER_BYTES as usize..];
    let body_len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_body<S: Sink>(sink: &mut S, entry: Entry<'_>) {
    match entry {
        Entry::SessionOpen {
            client_id,
            protocol_level,
            expiry_secs,
        } => {
            sink.put_u8(KIND_SESSION_OPEN);
            sink.put_str(client_id);
            sink.put_u8(protocol_level);
            sink.put_u32(expiry_secs);
        }
        Entry::SessionClosed { client_id, at_ms } => {
            sink.put_u8(KIND_SESSION_CLOSED);
            sink.put_str(client_id);
            sink.put_i64(at_ms);
        }
        Entry::SessionRemove { client_id } => {
            sink.put_u8(KIND_SESSION_REMOVE);
            sink.put_str(client_id);
        }
        Entry::Subscribe {
            client_id,
            subscription,
        } => {
            sink.put_u8(KIND_SUBSCRIBE);
            sink.put_str(client_id);
            put_subscription(sink, subscription);
        }
        Entry::Unsubscribe { client_id, filter } => {
            sink.put_u8(KIND_UNSUBSCRIBE);
            sink.put_str(client_id);
            sink.put_str(filter);
        }
        Entry::Enqueue {
            client_id,
            seq,
            message,
        } => {
            let ids = &message.subscription_ids;
            sink.put_u8(if ids.is_empty() {
                KIND_ENQUEUE
            } else {
                KIND_ENQUEUE_IDS
            });
            sink.put_str(client_id);
            sink.put_u64(seq);
            put_message(sink, message);
            if !ids.is_empty() {
                sink.put_u32(ids.len() as u32);
                for &id in ids {
                    sink.put_u32(id);
                }
            }
        }
        Entry::Dequeue { client_id, seq } => {
            sink.put_u8(KIND_DEQUEUE);
            sink.put_str(client_id);
            sink.put_u64(seq);
        }
        Entry::Retain { message } => {
            sink.put_u8(KIND_RETAIN);
            put_message(sink, message);
        }
        Entry::ClearRetained { topic } => {
            sink.put_u8(KIND_CLEAR_RETAINED);
            sink.put_str(topic);
        }
        Entry::Qos2Set {
            client_id,
            packet_id,
            state,
        } => {
            sink.put_u8(KIND_QOS2_SET);
            sink.put_str(client_id);
            sink.put_u16(packet_id);
            match state {
                StoredQos2::Intent {
                    log_topic,
                    partition,
                    from_offset,
                    token,
                } => {
                    sink.put_u8(QOS2_INTENT);
                    sink.put_str(log_topic);
                    sink.put_u32(*partition);
                    sink.put_u64(*from_offset);
                    sink.put_u64(*token);
                }
                StoredQos2::Received => sink.put_u8(QOS2_RECEIVED),
            }
        }
        Entry::Qos2Release {
            client_id,
            packet_id,
        } => {
            sink.put_u8(KIND_QOS2_RELEASE);
            sink.put_str(client_id);
            sink.put_u16(packet_id);
        }
        Entry::WillSet { client_id, will } => {
            sink.put_u8(KIND_WILL_SET);
            sink.put_str(client_id);
            put_message(sink, &will.message);
            sink.put_u32(will.delay_secs);
            sink.put_u64(will.token);
            sink.put_option(will.firing.as_ref(), put_will_firing);
        }
        Entry::WillFiring {
            client_id,
            token,
            firing,
        } => {
            sink.put_u8(KIND_WILL_FIRING);
            sink.put_str(client_id);
            sink.put_u64(token);
            put_will_firing(sink, firing);
        }
        Entry::WillClear { client_id, token } => {
            sink.put_u8(KIND_WILL_CLEAR);
            sink.put_str(client_id);
            sink.put_option(token, S::put_u64);
        }
    }
}

fn put_will_firing<S: Sink>(sink: &mut S, firing: &StoredWillFiring) {
    sink.put_str(&firing.log_topic);
    sink.put_u32(firing.partition);
    sink.put_u64(firing.from_offset);
}

fn put_subscription<S: Sink>(sink: &mut S, subscription: &StoredSubscription) {
    sink.put_str(&subscription.filter);
    sink.put_u8(subscription.qos);
    sink.put_bool(subscription.no_local);
    sink.put_bool(subscription.retain_as_published);
    sink.put_u8(subscription.retain_handling);
    sink.put_option(subscription.subscription_id, S::put_u32);
}

fn put_message<S: Sink>(sink: &mut S, message: &StoredMessage) {
    sink.put_str(&message.topic);
    sink.put_bytes(&message.payload);
    sink.put_u8(message.qos);
    sink.put_bool(message.retain);
    sink.put_i64(message.published_at_ms);
    sink.put_option(message.expiry_interval_secs, S::put_u32);
    let properties = &message.properties;
    sink.put_option(properties.payload_format_utf8, S::put_bool);
    sink.put_option(properties.content_type.as_deref(), S::put_str);
    sink.put_option(properties.response_topic.as_deref(), S::put_str);
    sink.put_option(properties.correlation_data.as_deref(), S::put_bytes);
    sink.put_u32(properties.user_properties.len() as u32);
    for (name, value) in &properties.user_properties {
        sink.put_str(name);
        sink.put_str(value);
    }
}

/// Reads fields off an entry body; every length is checked against the bytes left before
/// anything is allocated.
struct Fields<'a> {
    bytes: &'a [u8],
}

pub(super) type DecodeResult<T> = Result<T, &'static str>;

impl<'a> Fields<'a> {
    fn take(&mut self, len: usize) -> DecodeResult<&'a [u8]> {
        if len > self.bytes.len() {
            return Err("a field runs past the end of the entry");
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> DecodeResult<[u8; N]> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn bool(&mut self) -> DecodeResult<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err("a boolean is neither 0 nor 1"),
        }
    }

    fn u16(&mut self) -> DecodeResult<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> DecodeResult<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> DecodeResult<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> DecodeResult<i64> {
        self.array().map(i64::from_le_bytes)
    }

    fn bytes(&mut self) -> DecodeResult<&'a [u8]> {
        let len = self.u32()?;
        self.take(len as usize)
    }

    fn string(&mut self) -> DecodeResult<String> {
        let bytes = self.bytes()?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(_) => Err("a string is not valid UTF-8"),
        }
    }

    fn option<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> DecodeResult<T>,
    ) -> DecodeResult<Option<T>> {
        match self.u8()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            _ => Err("an option tag is neither 0 nor 1"),
        }
    }

    fn subscription(&mut self) -> DecodeResult<StoredSubscription> {
        Ok(StoredSubscription {
            filter: self.string()?,
            qos: self.u8()?,
            no_local: self.bool()?,
            retain_as_published: self.bool()?,
            retain_handling: self.u8()?,
            subscription_id: self.option(Self::u32)?,
        })
    }

    fn message(&mut self) -> DecodeResult<StoredMessage> {
        let topic = self.string()?;
        let payload = Bytes::copy_from_slice(self.bytes()?);
        let qos = self.u8()?;
        let retain = self.bool()?;
        let published_at_ms = self.i64()?;
        let expiry_interval_secs = self.option(Self::u32)?;
        let payload_format_utf8 = self.option(Self::bool)?;
        let content_type = self.option(Self::string)?;
        let response_topic = self.option(Self::string)?;
        let correlation_data = self.option(|fields| fields.bytes().map(Bytes::copy_from_slice))?;
        let count = self.u32()?;
        // Each pair takes at least its two length prefixes, which bounds the loop by the
        // entry's size whatever the count says.
        if u64::from(count) * 8 > self.bytes.len() as u64 {
            return Err("the user property count exceeds the entry");
        }
        let mut user_properties = Vec::with_capacity(count as usize);
        for _ in 0..count {
            user_properties.push((self.string()?, self.string()?));
        }
        Ok(StoredMessage {
            topic,
            payload,
            qos,
            retain,
            published_at_ms,
            expiry_interval_secs,
            properties: StoredProperties {
                payload_format_utf8,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            },
            subscription_ids: Vec::new(),
        })
    }

    /// The subscription identifiers after a kind 15 enqueue's message.
    fn subscription_ids(&mut self) -> DecodeResult<Vec<u32>> {
        let count = self.u32()?;
        if count == 0 {
            return Err("an enqueue with subscription ids has none");
        }
        if u64::from(count) * 4 > self.bytes.len() as u64 {
            return Err("the subscription id count exceeds the entry");
        }
        (0..count).map(|_| self.u32()).collect()
    }

    fn will_firing(&mut self) -> DecodeResult<StoredWillFiring> {
        Ok(StoredWillFiring {
            log_topic: self.string()?,
            partition: self.u32()?,
            from_offset: self.u64()?,
        })
    }
}

pub(super) fn decode_body(body: &[u8]) -> DecodeResult<Op> {
    let mut fields = Fields { bytes: body };
    let op = match fields.u8()? {
        KIND_SESSION_OPEN => Op::SessionOpen {
            client_id: fields.string()?,
            protocol_level: fields.u8()?,
            expiry_secs: fields.u32()?,
        },
        KIND_SESSION_CLOSED => Op::SessionClosed {
            client_id: fields.string()?,
            at_ms: fields.i64()?,
        },
        KIND_SESSION_REMOVE => Op::SessionRemove {
            client_id: fields.string()?,
        },
        KIND_SUBSCRIBE => Op::Subscribe {
            client_id: fields.string()?,
            subscription: fields.subscription()?,
        },
        KIND_UNSUBSCRIBE => Op::Unsubscribe {
            client_id: fields.string()?,
            filter: fields.string()?,
        },
        KIND_ENQUEUE => Op::Enqueue {
            client_id: fields.string()?,
            seq: fields.u64()?,
            message: fields.message()?,
        },
        KIND_ENQUEUE_IDS => {
            let client_id = fields.string()?;
            let seq = fields.u64()?;
            let mut message = fields.message()?;
            message.subscription_ids = fields.subscription_ids()?;
            Op::Enqueue {
                client_id,
                seq,
                message,
            }
        }
        KIND_DEQUEUE => Op::Dequeue {
            client_id: fields.string()?,
            seq: fields.u64()?,
        },
        KIND_RETAIN => Op::Retain {
            message: fields.message()?,
        },
        KIND_CLEAR_RETAINED => Op::ClearRetained {
            topic: fields.string()?,
        },
        KIND_QOS2_SET => Op::Qos2Set {
            client_id: fields.string()?,
            packet_id: fields.u16()?,
            state: match fields.u8()? {
                QOS2_INTENT => StoredQos2::Intent {
                    log_topic: fields.string()?,
                    partition: fields.u32()?,
                    from_offset: fields.u64()?,
                    token: fields.u64()?,
                },
                QOS2_RECEIVED => StoredQos2::Received,
                _ => return Err("unknown QoS 2 state"),
            },
        },
        KIND_QOS2_RELEASE => Op::Qos2Release {
            client_id: fields.string()?,
            packet_id: fields.u16()?,
        },
        KIND_WILL_SET => Op::WillSet {
            client_id: fields.string()?,
            will: StoredWill {
                message: fields.message()?,
                delay_secs: fields.u32()?,
                token: fields.u64()?,
                firing: fields.option(Fields::will_firing)?,
            },
        },
        KIND_WILL_FIRING => Op::WillFiring {
            client_id: fields.string()?,
            token: fields.u64()?,
            firing: fields.will_firing()?,
        },
        KIND_WILL_CLEAR => Op::WillClear {
            client_id: fields.string()?,
            token: fields.option(Fields::u64)?,
        },
        _ => return Err("unknown op kind"),
    };
    if !fields.bytes.is_empty() {
        return Err("bytes left after the op's fields");
    }
    Ok(op)
}
