//! From an accepted MQTT PUBLISH to the log record that keeps it: the route picks the log topic
//! and the key, Kafka's partitioner picks the partition from the key, and record headers carry
//! what MQTT knows about the message, so a Kafka consumer sees all of it.
//!
//! Headers, in this order (names and values are stable: consumers depend on them):
//! - `mqtt.topic`: the MQTT topic name (the key may be something else, per route);
//! - `mqtt.qos`: `0`, `1` or `2`;
//! - `mqtt.retain`: `true` or `false`;
//! - `mqtt.client_id`: the publisher's client identifier;
//! - `mqtt.content_type` (5.0, when set) and `mqtt.payload_format` (5.0, when set: `utf8` or
//!   `bytes`);
//! - then the 5.0 user properties, each as a header named by the property, in order,
//!   duplicates kept;
//! - last, `mqtt.qos2_id` on QoS 2 publishes of persistent sessions only: 16 hex digits, random
//!   per message. The broker journals it before the append, so that after a crash it can
//!   tell from the log whether the message was stored (exactly once across kill -9);
//! - last, `mqtt.will_id` on the will messages of persistent sessions only: 16 hex digits,
//!   random per connection, journaled with the will so that after a crash the broker can
//!   tell from the log whether the will was already published.

use bytes::Bytes;
use silt_log::batch::{Header, Record};

use super::route::RouteTable;
use super::subscriptions::QoS;
use super::topic::TopicName;

pub const HEADER_TOPIC: &str = "mqtt.topic";
pub const HEADER_QOS: &str = "mqtt.qos";
pub const HEADER_RETAIN: &str = "mqtt.retain";
pub const HEADER_CLIENT_ID: &str = "mqtt.client_id";
pub const HEADER_CONTENT_TYPE: &str = "mqtt.content_type";
pub const HEADER_PAYLOAD_FORMAT: &str = "mqtt.payload_format";
pub const HEADER_QOS2_ID: &str = "mqtt.qos2_id";

pub const HEADER_WILL_ID: &str = "mqtt.will_id";

/// The `mqtt.qos2_id` (or `mqtt.will_id`) header's value for `token`.
pub fn qos2_id_value(token: u64) -> Bytes {
    Bytes::from(format!("{token:016x}"))
}

/// What the broker knows about one PUBLISH besides its payload.
#[derive(Debug, Clone, Copy)]
pub struct PublishMeta<'a> {
    pub client_id: &'a str,
    pub topic: &'a TopicName,
    pub qos: QoS,
    pub retain: bool,
    /// 5.0 Content Type property.
    pub content_type: Option<&'a str>,
    /// 5.0 Payload Format Indicator: `Some(true)` for UTF-8.
    pub payload_format_utf8: Option<bool>,
    /// 5.0 User Properties, in order.
    pub user_properties: &'a [(String, String)],
}

/// A record ready for the log, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestRecord<'r> {
    pub log_topic: &'r str,
    /// The key the route rendered; also in `record.key`.
    pub key: Bytes,
    pub record: Record,
}

impl IngestRecord<'_> {
    /// The partition among `partitions` that Kafka's default partitioner gives the key.
    pub fn partition(&self, partitions: u32) -> u32 {
        silt_log::partitioner::partition_for_key(&self.key, partitions)
    }
}

/// Builds the log record for a PUBLISH received at `timestamp_ms`.
pub fn ingest_record<'r>(
    routes: &'r RouteTable,
    meta: &PublishMeta<'_>,
    payload: Bytes,
    timestamp_ms: i64,
) -> IngestRecord<'r> {
    let route = routes.resolve(meta.topic);
    let key = Bytes::from(route.render_key(meta.topic, meta.client_id));
    let text = |value: &str| Some(Bytes::copy_from_slice(value.as_bytes()));
    let mut headers = Vec::with_capacity(6 + meta.user_properties.len());
    headers.push(Header {
        key: HEADER_TOPIC.to_string(),
        value: text(meta.topic.as_str()),
    });
    headers.push(Header {
        key: HEADER_QOS.to_string(),
        value: text(match meta.qos {
            QoS::AtMostOnce => "0",
            QoS::AtLeastOnce => "1",
            QoS::ExactlyOnce => "2",
        }),
    });
    headers.push(Header {
        key: HEADER_RETAIN.to_string(),
        value: text(if meta.retain { "true" } else { "false" }),
    });
    headers.push(Header {
        key: HEADER_CLIENT_ID.to_string(),
        value: text(meta.client_id),
    });
    if let Some(content_type) = meta.content_type {
        headers.push(Header {
            key: HEADER_CONTENT_TYPE.to_string(),
            value: text(content_type),
        });
    }
    if let Some(utf8) = meta.payload_format_utf8 {
        headers.push(Header {
            key: HEADER_PAYLOAD_FORMAT.to_string(),
            value: text(if utf8 { "utf8" } else { "bytes" }),
        });
    }
    headers.extend(meta.user_properties.iter().map(|(name, value)| Header {
        key: name.clone(),
        value: text(value),
    }));
    IngestRecord {
        log_topic: route.log_topic(),
        key: key.clone(),
        record: Record {
            timestamp: timestamp_ms,
            key: Some(key),
            value: Some(payload),
            headers,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::route::RouteSpec;

    fn header_pairs(record: &Record) -> Vec<(String, String)> {
        record
            .headers
            .iter()
            .map(|h| {
                let value = h
                    .value
                    .as_deref()
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                (h.key.clone(), value.unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn default_route_keys_by_topic_and_headers_carry_mqtt_facts() {
        let routes = RouteTable::default();
        let topic = TopicName::new("site/a/temp").unwrap();
        let properties = vec![
            ("unit".to_string(), "C".to_string()),
            ("unit".to_string(), "K".to_string()),
        ];
        let meta = PublishMeta {
            client_id: "sensor-1",
            topic: &topic,
            qos: QoS::AtLeastOnce,
            retain: true,
            content_type: Some("application/json"),
            payload_format_utf8: Some(true),
            user_properties: &properties,
        };
        let ingest = ingest_record(&routes, &meta, Bytes::from_static(b"21.5"), 1_700);
        assert_eq!(ingest.log_topic, "mqtt");
        assert_eq!(ingest.key.as_ref(), b"site/a/temp");
        assert_eq!(ingest.record.timestamp, 1_700);
        assert_eq!(ingest.record.value.as_deref(), Some(&b"21.5"[..]));
        let expected: Vec<(String, String)> = [
            ("mqtt.topic", "site/a/temp"),
            ("mqtt.qos", "1"),
            ("mqtt.retain", "true"),
            ("mqtt.client_id", "sensor-1"),
            ("mqtt.content_type", "application/json"),
            ("mqtt.payload_format", "utf8"),
            ("unit", "C"),
            ("unit", "K"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(header_pairs(&ingest.record), expected);
        assert_eq!(
            ingest.partition(12),
            silt_log::partitioner::partition_for_key(b"site/a/temp", 12)
        );
    }

    #[test]
    fn routes_pick_topic_and_key_and_v3_publishes_have_no_v5_headers() {
        let routes = RouteTable::new(&[RouteSpec {
            filter: "site/+/temp".into(),
            log_topic: "temperatures".into(),
            key: "{level:1}".into(),
        }])
        .unwrap();
        let topic = TopicName::new("site/b/temp").unwrap();
        let meta = PublishMeta {
            client_id: "c",
            topic: &topic,
            qos: QoS::AtMostOnce,
            retain: false,
            content_type: None,
            payload_format_utf8: None,
            user_properties: &[],
        };
        let ingest = ingest_record(&routes, &meta, Bytes::new(), 5);
        assert_eq!(ingest.log_topic, "temperatures");
        assert_eq!(ingest.key.as_ref(), b"b");
        let names: Vec<_> = ingest
            .record
            .headers
            .iter()
            .map(|h| h.key.as_str())
            .collect();
        assert_eq!(
            names,
            ["mqtt.topic", "mqtt.qos", "mqtt.retain", "mqtt.client_id"]
        );
        // An empty payload is still a record (it clears a retained message in MQTT).
        assert_eq!(ingest.record.value.as_deref(), Some(&b""[..]));
    }
}
