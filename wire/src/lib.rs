//! Silt's own frames for native QUIC produce and the edge-to-core uplink.
//!
//! The codec will work on caller buffers (encode into `BytesMut`, decode from `&[u8]`, with
//! "incomplete" as a normal result) and carry Kafka RecordBatch v2 bytes unchanged. The frames
//! are defined by the uplink issue; until then this crate deliberately holds no code.
//!
//! # Layout
//! Empty: no frame has been specified yet.
