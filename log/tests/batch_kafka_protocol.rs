//! Cross-checks Silt's RecordBatch v2 codec against the `kafka-protocol` crate, both ways.
//!
//! Known differences of `kafka-protocol` 0.18 that shape these tests (none is a difference in
//! the format, and Kafka's Java client behaves like Silt in each):
//! - its encoder takes the smallest timestamp as the base timestamp, Java and Silt the first
//!   record's; bytes are identical only when the first record has the smallest timestamp;
//! - its encoder never sets the timestamp-type bit, so `LogAppendTime` is checked one way only;
//! - it keeps headers in a map, so repeated header keys collapse; generated keys are unique;
//! - its decoder returns stored timestamps as they are, without applying `LogAppendTime`;
//! - it subtracts timestamps with overflow checks, so timestamps here stay within +-2^61.

mod pinned;

use bytes::{Bytes, BytesMut};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression as KpCompression, Record as KpRecord, RecordBatchDecoder, RecordBatchEncoder,
    RecordEncodeOptions, TimestampType as KpTimestampType,
};
use pinned::{PINNED_BATCH_HEX, pinned_records, to_hex};
use proptest::prelude::*;
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, DecodedRecord, Header, Record, TimestampType,
    decode_batch, encode_batch,
};

/// Timestamps stay within this magnitude so `kafka-protocol` can subtract any two of them.
const TIMESTAMP_ABS_MAX: i64 = 1 << 61;

fn kp_compression(compression: Compression) -> KpCompression {
    match compression {
        Compression::None => KpCompression::None,
        Compression::Zstd => KpCompression::Zstd,
        other => panic!("not used in these tests: {other:?}"),
    }
}

/// The `kafka-protocol` records that describe the same batch as `spec` and `records`.
fn to_kp_records(spec: &BatchSpec, records: &[Record]) -> Vec<KpRecord> {
    records
        .iter()
        .enumerate()
        .map(|(index, record)| KpRecord {
            transactional: spec.is_transactional,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: spec.partition_leader_epoch,
            producer_id: spec.producer_id,
            producer_epoch: spec.producer_epoch,
            timestamp_type: KpTimestampType::Creation,
            offset: spec.base_offset + index as i64,
            sequence: spec.base_sequence.wrapping_add(index as i32),
            timestamp: record.timestamp,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record
                .headers
                .iter()
                .map(|header| {
                    (
                        StrBytes::from_string(header.key.clone()),
                        header.value.clone(),
                    )
                })
                .collect(),
        })
        .collect()
}

fn kp_encode(spec: &BatchSpec, records: &[Record]) -> BytesMut {
    let kp_records = to_kp_records(spec, records);
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &kp_records,
        &RecordEncodeOptions {
            version: 2,
            compression: kp_compression(spec.compression),
        },
    )
    .expect("kafka-protocol encodes the batch");
    buf
}

fn silt_encode(spec: &BatchSpec, records: &[Record]) -> BytesMut {
    let mut buf = BytesMut::new();
    encode_batch(spec, records, &mut buf).expect("silt encodes the batch");
    buf
}

fn headers_of(record: &KpRecord) -> Vec<Header> {
    record
        .headers
        .iter()
        .map(|(key, value)| Header {
            key: key.as_str().to_owned(),
            value: value.clone(),
        })
        .collect()
}

fn arb_bytes() -> impl Strategy<Value = Option<Bytes>> {
    prop::option::of(prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from))
}

/// Records with header keys unique within each record, as `kafka-protocol` needs.
fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    let record = (
        -TIMESTAMP_ABS_MAX..=TIMESTAMP_ABS_MAX,
        arb_bytes(),
        arb_bytes(),
        prop::collection::btree_map("\\PC{0,6}", arb_bytes(), 0..4),
    )
        .prop_map(|(timestamp, key, value, headers)| Record {
            timestamp,
            key,
            value,
            headers: headers
                .into_iter()
                .map(|(key, value)| Header { key, value })
                .collect(),
        });
    prop::collection::vec(record, 1..12)
}

fn arb_spec() -> impl Strategy<Value = BatchSpec> {
    (
        0..(i64::MAX / 2),
        any::<i32>(),
        prop_oneof![Just(Compression::None), Just(Compression::Zstd)],
        prop_oneof![
            Just(TimestampType::CreateTime),
            Just(TimestampType::LogAppendTime)
        ],
        any::<i64>(),
        any::<i16>(),
        any::<i32>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                base_offset,
                partition_leader_epoch,
                compression,
                timestamp_type,
                producer_id,
                producer_epoch,
                base_sequence,
                is_transactional,
            )| BatchSpec {
                base_offset,
                partition_leader_epoch,
                compression,
                timestamp_type,
                producer_id,
                producer_epoch,
                base_sequence,
                is_transactional,
            },
        )
}

fn silt_decode(bytes: &[u8]) -> (silt_log::batch::BatchHeader, Vec<DecodedRecord>) {
    let (header, records, consumed) = decode_batch(bytes, &DecodeLimits::default())
        .expect("silt decodes the batch")
        .expect("the batch is complete");
    assert_eq!(consumed, bytes.len());
    (header, records)
}

#[test]
fn kafka_protocol_encodes_the_pinned_batch_to_the_pinned_bytes() {
    let spec = BatchSpec::default();
    let records = pinned_records();
    assert_eq!(to_hex(&kp_encode(&spec, &records)), PINNED_BATCH_HEX);
    assert_eq!(to_hex(&silt_encode(&spec, &records)), PINNED_BATCH_HEX);
}

proptest! {
    #[test]
    fn kafka_protocol_decodes_what_silt_encodes(spec in arb_spec(), records in arb_records()) {
        let bytes = silt_encode(&spec, &records).freeze();
        let mut input = bytes.clone();
        let set = RecordBatchDecoder::decode(&mut input).expect("kafka-protocol decodes the batch");
        prop_assert!(input.is_empty(), "kafka-protocol left bytes unread");
        prop_assert_eq!(set.version, 2);
        prop_assert_eq!(set.compression, kp_compression(spec.compression));
        prop_assert_eq!(set.records.len(), records.len());
        let expected_type = match spec.timestamp_type {
            TimestampType::CreateTime => KpTimestampType::Creation,
            TimestampType::LogAppendTime => KpTimestampType::LogAppend,
        };
        for (index, (theirs, ours)) in set.records.iter().zip(&records).enumerate() {
            prop_assert_eq!(theirs.offset, spec.base_offset + index as i64);
            // kafka-protocol returns the stored timestamp even for LogAppendTime.
            prop_assert_eq!(theirs.timestamp, ours.timestamp);
            prop_assert_eq!(theirs.timestamp_type, expected_type);
            prop_assert_eq!(&theirs.key, &ours.key);
            prop_assert_eq!(&theirs.value, &ours.value);
            prop_assert_eq!(headers_of(theirs), ours.headers.clone());
            prop_assert_eq!(theirs.producer_id, spec.producer_id);
            prop_assert_eq!(theirs.producer_epoch, spec.producer_epoch);
            prop_assert_eq!(theirs.partition_leader_epoch, spec.partition_leader_epoch);
            prop_assert_eq!(theirs.transactional, spec.is_transactional);
            prop_assert!(!theirs.control);
            prop_assert_eq!(theirs.sequence, spec.base_sequence.wrapping_add(index as i32));
        }
    }

    #[test]
    fn silt_decodes_what_kafka_protocol_encodes(
        spec in arb_spec().prop_map(|spec| BatchSpec {
            timestamp_type: TimestampType::CreateTime,
            ..spec
        }),
        records in arb_records(),
    ) {
        let bytes = kp_encode(&spec, &records);
        let (header, decoded) = silt_decode(&bytes);
        let min_timestamp = records.iter().map(|record| record.timestamp).min();
        let max_timestamp = records.iter().map(|record| record.timestamp).max();
        prop_assert_eq!(Some(header.base_timestamp), min_timestamp);
        prop_assert_eq!(Some(header.max_timestamp), max_timestamp);
        prop_assert_eq!(header.base_offset, spec.base_offset);
        prop_assert_eq!(header.partition_leader_epoch, spec.partition_leader_epoch);
        prop_assert_eq!(header.compression(), Ok(spec.compression));
        prop_assert_eq!(header.timestamp_type(), TimestampType::CreateTime);
        prop_assert_eq!(header.producer_id, spec.producer_id);
        prop_assert_eq!(header.producer_epoch, spec.producer_epoch);
        prop_assert_eq!(header.base_sequence, spec.base_sequence);
        prop_assert_eq!(header.is_transactional(), spec.is_transactional);
        prop_assert_eq!(header.record_count as usize, records.len());
        prop_assert_eq!(header.last_offset_delta as usize, records.len() - 1);
        let expected: Vec<DecodedRecord> = records
            .iter()
            .enumerate()
            .map(|(index, record)| DecodedRecord {
                offset: spec.base_offset + index as i64,
                timestamp: record.timestamp,
                key: record.key.clone(),
                value: record.value.clone(),
                headers: record.headers.clone(),
            })
            .collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn uncompressed_batches_are_byte_identical(
        spec in arb_spec().prop_map(|spec| BatchSpec {
            compression: Compression::None,
            timestamp_type: TimestampType::CreateTime,
            ..spec
        }),
        mut records in arb_records(),
    ) {
        // kafka-protocol bases timestamps on the smallest one, Kafka's Java client on the
        // first: put the smallest first so both rules agree.
        let first_min = records
            .iter()
            .enumerate()
            .min_by_key(|(_, record)| record.timestamp)
            .map(|(index, _)| index)
            .unwrap_or(0);
        records.swap(0, first_min);
        let ours = silt_encode(&spec, &records);
        let theirs = kp_encode(&spec, &records);
        prop_assert_eq!(to_hex(&ours), to_hex(&theirs));
    }

    #[test]
    fn zstd_batches_decode_to_the_same_records(
        spec in arb_spec().prop_map(|spec| BatchSpec {
            compression: Compression::Zstd,
            timestamp_type: TimestampType::CreateTime,
            ..spec
        }),
        records in arb_records(),
    ) {
        let (_, from_ours) = silt_decode(&silt_encode(&spec, &records));
        let (_, from_theirs) = silt_decode(&kp_encode(&spec, &records));
        prop_assert_eq!(from_ours, from_theirs);
    }
}
