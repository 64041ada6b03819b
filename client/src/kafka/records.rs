//! Produce and Fetch payloads: RecordBatch v2 bytes through silt-log's codec, and the JSON line
//! a consumed record prints as.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use silt_log::batch::{self, BatchSpec, DecodeLimits, DecodedRecord, Record};

use super::KafkaError;

/// The largest batch a fetch may hold: Kafka's default `message.max.bytes` is 1 MiB, and a
/// broker may have been configured higher, so allow well above it while bounding memory.
const MAX_FETCHED_BATCH_BYTES: usize = 64 << 20;

/// Encodes `records` as one batch for a Produce request.
pub(crate) fn encode(
    records: &[Record],
    producer: Option<(i64, i16, i32)>,
) -> Result<Bytes, KafkaError> {
    let mut spec = BatchSpec::default();
    if let Some((producer_id, producer_epoch, base_sequence)) = producer {
        spec.producer_id = producer_id;
        spec.producer_epoch = producer_epoch;
        spec.base_sequence = base_sequence;
    }
    let mut out = BytesMut::new();
    batch::encode_batch(&spec, records, &mut out)
        .map_err(|error| KafkaError::Protocol(format!("cannot encode a batch: {error}")))?;
    Ok(out.freeze())
}

/// What a Fetch returned for one partition, decoded.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// Data records at or after the fetch offset, in offset order.
    pub(crate) records: Vec<DecodedRecord>,
    /// The offset to fetch next: past the last complete batch, control batches included.
    pub(crate) next_offset: i64,
}

/// Decodes the batches of one partition's Fetch data, read from `fetch_offset`. A trailing
/// partial batch is normal (the broker cuts at the partition's byte limit) and is left for the
/// next fetch.
pub(crate) fn decode_fetched(bytes: &[u8], fetch_offset: i64) -> Result<Fetched, KafkaError> {
    let limits = DecodeLimits {
        max_batch_bytes: MAX_FETCHED_BATCH_BYTES,
        ..DecodeLimits::default()
    };
    let mut records = Vec::new();
    let mut next_offset = fetch_offset;
    let mut position = 0;
    while position < bytes.len() {
        let decoded = batch::decode_batch(&bytes[position..], &limits).map_err(|error| {
            KafkaError::Protocol(format!("bad batch at offset {next_offset}: {error}"))
        })?;
        let Some((header, batch_records, len)) = decoded else {
            break;
        };
        position += len;
        if !header.is_control() {
            // A compressed batch comes whole, so it may start before the offset asked for.
            records.extend(
                batch_records
                    .into_iter()
                    .filter(|r| r.offset >= fetch_offset),
            );
        }
        next_offset = next_offset.max(header.last_offset() + 1);
    }
    Ok(Fetched {
        records,
        next_offset,
    })
}

/// Bytes as JSON: a string when valid UTF-8, else `{"base64": "..."}` (the same form as
/// `silt-edge dump`, so both outputs parse alike).
#[derive(Debug)]
pub(crate) struct JsonBytes<'a>(pub(crate) &'a [u8]);

impl Serialize for JsonBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                use serde::ser::SerializeMap as _;
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry("base64", &BASE64.encode(self.0))?;
                map.end()
            }
        }
    }
}

/// One output line of `silt consume`; field order is the output's field order, as in
/// `silt-edge dump`.
#[derive(Debug, Serialize)]
pub(crate) struct RecordLine<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: i64,
    pub(crate) key: Option<JsonBytes<'a>>,
    pub(crate) value: Option<JsonBytes<'a>>,
    pub(crate) headers: Vec<(&'a str, Option<JsonBytes<'a>>)>,
}

impl<'a> RecordLine<'a> {
    pub(crate) fn new(topic: &'a str, partition: i32, record: &'a DecodedRecord) -> Self {
        RecordLine {
            topic,
            partition,
            offset: record.offset,
            timestamp: record.timestamp,
            key: record.key.as_deref().map(JsonBytes),
            value: record.value.as_deref().map(JsonBytes),
            headers: record
                .headers
                .iter()
                .map(|header| (header.key.as_str(), header.value.as_deref().map(JsonBytes)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetched_batches_decode_from_the_fetch_offset_and_skip_a_partial_tail() {
        let records: Vec<Record> = (0..3)
            .map(|i| Record {
                timestamp: 1_000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![0xff, i as u8])),
                headers: vec![],
            })
            .collect();
        let mut spec = BatchSpec {
            base_offset: 10,
            ..BatchSpec::default()
        };
        let mut bytes = BytesMut::new();
        batch::encode_batch(&spec, &records, &mut bytes).unwrap();
        spec.base_offset = 13;
        let mut second = BytesMut::new();
        batch::encode_batch(&spec, &records, &mut second).unwrap();
        bytes.extend_from_slice(&second[..second.len() - 5]);

        let fetched = decode_fetched(&bytes, 11).unwrap();
        assert_eq!(
            fetched.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [11, 12]
        );
        assert_eq!(fetched.next_offset, 13);

        let line = serde_json::to_string(&RecordLine::new("t", 0, &fetched.records[0])).unwrap();
        assert_eq!(
            line,
            r#"{"topic":"t","partition":0,"offset":11,"timestamp":1001,"key":"k1","value":{"base64":"/wE="},"headers":[]}"#
        );
    }

    #[test]
    fn a_corrupt_batch_is_an_error_not_a_panic() {
        let mut bytes = BytesMut::new();
        let record = Record {
            timestamp: 1,
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: vec![],
        };
        batch::encode_batch(&BatchSpec::default(), &[record], &mut bytes).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert!(decode_fetched(&bytes, 0).is_err());
    }
}
