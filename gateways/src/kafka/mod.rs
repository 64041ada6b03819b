//! The Kafka protocol gateway: a TCP listener that speaks Kafka's wire protocol to unmodified
//! clients (kcat/librdkafka, kafka-python, confluent-kafka, aiokafka) and calls a
//! [`KafkaBroker`] port for everything it does. Message codecs come from the `kafka-protocol`
//! crate; record batches pass through as bytes, never re-encoded.
//!
//! # Layout
//! - `frame`: size-prefixed framing and the request header prefix, as a pure codec.
//! - `versions`: the apis and versions implemented, and the ApiVersions response.
//! - `server`: the listener and the per-connection loop (in-order answers, limits).
//! - `handlers`: one function per api, from request to port calls to response.
//! - `fetch_response`: Fetch responses encoded around the stored batch bytes, which leave
//!   in one vectored write without being copied into the message.
//! - `port`: the [`KafkaBroker`] trait and its domain types and errors.
//! - `metrics`: the `silt_kafka_*` metrics.

mod fetch_response;
pub mod frame;
mod handlers;
pub mod metrics;
pub mod port;
mod server;
pub mod versions;

pub use port::*;
pub use server::{KafkaLimits, serve};
