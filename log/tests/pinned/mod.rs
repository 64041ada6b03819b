//! The pinned batch shared by the codec tests: one small batch whose bytes `batch_props.rs`
//! and `batch_kafka_protocol.rs` both require, so the format cannot drift unnoticed.
#![allow(dead_code)]

use bytes::Bytes;
use silt_log::batch::{Header, Record};

/// A plain Kafka producer's batch: offsets from 0, no producer id. `kafka-protocol` and our
/// encoder must both produce exactly these bytes for `pinned_records()`.
pub(crate) const PINNED_BATCH_HEX: &str = concat!(
    // Base offset, length 74, leader epoch -1, magic 2, CRC-32C, attributes, last offset delta.
    "0000000000000000",
    "0000004a",
    "ffffffff",
    "02",
    "93bf474b",
    "0000",
    "00000001",
    // Base and max timestamps, producer id and epoch, base sequence, record count.
    "0000018bcfe56800",
    "0000018bcfe56805",
    "ffffffffffffffff",
    "ffff",
    "ffffffff",
    "00000002",
    // Record 0: length 14, attributes, deltas 0 and 0, key "k1", value "v1", header h=x.
    "1c000000046b310476310202680278",
    // Record 1: length 9, attributes, deltas 5 and 1, null key, empty value, header n=null.
    "12000a02010002026e01",
);

pub(crate) fn pinned_records() -> Vec<Record> {
    vec![
        Record {
            timestamp: 1_700_000_000_000,
            key: Some(Bytes::from_static(b"k1")),
            value: Some(Bytes::from_static(b"v1")),
            headers: vec![Header {
                key: "h".to_owned(),
                value: Some(Bytes::from_static(b"x")),
            }],
        },
        Record {
            timestamp: 1_700_000_000_005,
            key: None,
            value: Some(Bytes::new()),
            headers: vec![Header {
                key: "n".to_owned(),
                value: None,
            }],
        },
    ]
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
