//! Silt's protocol servers: MQTT (TCP, TLS, over QUIC), native QUIC produce and the Kafka
//! protocol.
//!
//! Each gateway calls a port trait it defines and never depends on `silt-edge` or `silt-core`.
//! The gateways arrive with the edge-broker and core-node issues; until then this crate
//! deliberately holds no code.
//!
//! # Layout
//! Empty: no gateway has been built yet.
