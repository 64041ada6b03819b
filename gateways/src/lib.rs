//! Silt's protocol servers: MQTT (TCP, TLS, over QUIC), native QUIC produce and the Kafka
//! protocol.
//!
//! Each gateway calls a port trait it defines and never depends on `silt-edge` or `silt-core`;
//! it uses `silt-log` and `silt-wire` for types only.
//!
//! # Layout
//! - `kafka` (feature `kafka`): the Kafka protocol gateway: framing, ApiVersions negotiation,
//!   one handler per api, over the `kafka::KafkaBroker` port the core node implements.
//! - `mqtt`: the MQTT 3.1.1 / 5.0 broker's pure (sans-IO) parts so far:
//!   - `mqtt::topic`: topic names, topic filters, shared-subscription filters, matching.
//!   - `mqtt::subscriptions`: the subscription store, a trie over topic levels that turns a
//!     published topic name into one delivery per subscribed client or shared group.
//!   - `mqtt::route`: ingest routes from MQTT topic filters to log topics and key templates.
//!   - `mqtt::codec`: framing: protocol detection from CONNECT, bounded decoding of 3.1.1 and
//!     5.0 packets over rumqttc's codec, errors with their reason codes.
//!   - `mqtt::qos`: QoS 1/2 flows of one session: packet ids, receive maximum, resends.
//!   - `mqtt::alias`: MQTT 5 topic aliases in both directions.
//!   - `mqtt::ingest`: a PUBLISH turned into the log record that keeps it.

/// The admin port's minimal HTTP/1.1 head codec, shared by `silt-edge` and `silt-core`.
pub mod admin_http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod mqtt;
