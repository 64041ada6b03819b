//! Properties of the RecordBatch v2 codec: round trips, partial input, corruption, hostile
//! input and limits, plus the pinned bytes of one batch so the format cannot drift.

mod pinned;

use bytes::{Bytes, BytesMut};
use pinned::{PINNED_BATCH_HEX, pinned_records, to_hex};
use proptest::prelude::*;
use silt_log::batch::{
    BATCH_HEADER_LEN, BatchCrc, BatchEncoder, BatchError, BatchHeader, BatchSpec, Compression,
    DecodeLimits, DecodedRecord, Header, LOG_OVERHEAD, Record, TimestampType, VARINT_BYTES_MAX,
    VARLONG_BYTES_MAX, batches, check_batch, check_batch_framing, compute_crc, decode_batch,
    decode_records, decompress_batch, decompress_records, encode_batch, encode_batch_compressed,
    put_varint, put_varlong, read_varint, read_varlong, records_len_hint, varint_len, varlong_len,
};

/// Where the CRC sits in a batch, and where the bytes it covers start.
const CRC_AT: usize = 17;
const CRC_COVERS_FROM: usize = 21;
const RECORD_COUNT_AT: usize = 57;

/// Small limits so tests reach them.
const TEST_LIMITS: DecodeLimits = DecodeLimits {
    max_batch_bytes: 64 << 10,
    max_decompressed_bytes: 256 << 10,
};

fn encode(spec: &BatchSpec, records: &[Record]) -> BytesMut {
    let mut buf = BytesMut::new();
    let len = encode_batch(spec, records, &mut buf).expect("valid records encode");
    assert_eq!(len, buf.len());
    buf
}

/// Rewrites the CRC so a deliberately damaged batch gets past the checksum to the parser.
fn fix_crc(batch: &mut [u8]) {
    let crc = compute_crc(batch);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Wraps `section` in a CRC-valid header claiming `record_count` records.
fn batch_around(section: &[u8], record_count: i32, compression: Compression) -> Vec<u8> {
    let mut batch = vec![0u8; BATCH_HEADER_LEN];
    batch.extend_from_slice(section);
    let header = BatchHeader {
        base_offset: 0,
        batch_length: (batch.len() - LOG_OVERHEAD) as i32,
        partition_leader_epoch: -1,
        magic: 2,
        crc: 0,
        attributes: compression.code(),
        last_offset_delta: record_count.max(1) - 1,
        base_timestamp: 0,
        max_timestamp: 0,
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
        record_count,
    };
    header.write_to(&mut batch);
    fix_crc(&mut batch);
    batch
}

fn expected_records(spec: &BatchSpec, records: &[Record]) -> Vec<DecodedRecord> {
    let max_timestamp = records.iter().map(|record| record.timestamp).max();
    records
        .iter()
        .enumerate()
        .map(|(index, record)| DecodedRecord {
            offset: spec.base_offset + index as i64,
            timestamp: match spec.timestamp_type {
                TimestampType::CreateTime => record.timestamp,
                TimestampType::LogAppendTime => max_timestamp.unwrap_or(record.timestamp),
            },
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
        })
        .collect()
}

fn arb_bytes() -> impl Strategy<Value = Option<Bytes>> {
    prop::option::of(prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
        // Now and then a value long enough to need multi-byte lengths and to compress.
        prop::collection::vec(0u8..4, 100..400),
    ])
    .prop_map(|bytes| bytes.map(Bytes::from))
}

fn arb_timestamp() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(-1i64),
        Just(0i64),
        1_600_000_000_000i64..1_800_000_000_000,
    ]
}

fn arb_record() -> impl Strategy<Value = Record> {
    let header = ("\\PC{0,8}", arb_bytes()).prop_map(|(key, value)| Header { key, value });
    (
        arb_timestamp(),
        arb_bytes(),
        arb_bytes(),
        // Repeated header keys are legal in Kafka and must survive.
        prop::collection::vec(header, 0..4),
    )
        .prop_map(|(timestamp, key, value, headers)| Record {
            timestamp,
            key,
            value,
            headers,
        })
}

fn arb_spec() -> impl Strategy<Value = BatchSpec> {
    (
        prop_oneof![Just(0i64), 0..i64::MAX - 100, Just(i64::MAX - 100)],
        any::<i32>(),
        prop_oneof![Just(Compression::None), Just(Compression::Zstd)],
        prop_oneof![
            Just(TimestampType::CreateTime),
            Just(TimestampType::LogAppendTime)
        ],
        any::<(i64, i16, i32, bool)>(),
    )
        .prop_map(
            |(
                base_offset,
                partition_leader_epoch,
                compression,
                timestamp_type,
                (producer_id, producer_epoch, base_sequence, is_transactional),
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

fn arb_batch() -> impl Strategy<Value = (BatchSpec, Vec<Record>)> {
    (arb_spec(), prop::collection::vec(arb_record(), 1..24))
}

proptest! {
    #[test]
    fn decode_inverts_encode((spec, records) in arb_batch()) {
        let bytes = encode(&spec, &records);
        let (header, decoded, consumed) = decode_batch(&bytes, &DecodeLimits::default())
            .expect("an encoded batch decodes")
            .expect("an encoded batch is complete");
        prop_assert_eq!(consumed, bytes.len());
        prop_assert_eq!(header.total_len(), bytes.len());
        prop_assert_eq!(BatchSpec::from_header(&header), Ok(spec));
        prop_assert_eq!(header.record_count as usize, records.len());
        prop_assert_eq!(header.last_offset_delta as usize, records.len() - 1);
        prop_assert_eq!(header.base_timestamp, records[0].timestamp);
        prop_assert_eq!(
            Some(header.max_timestamp),
            records.iter().map(|record| record.timestamp).max()
        );
        prop_assert!(!header.is_control());
        prop_assert_eq!(decoded, expected_records(&spec, &records));
    }

    #[test]
    fn encode_appends_after_existing_bytes((spec, records) in arb_batch(), prefix in any::<Vec<u8>>()) {
        let mut buf = BytesMut::from(&prefix[..]);
        let len = encode_batch(&spec, &records, &mut buf).expect("valid records encode");
        prop_assert_eq!(&buf[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&buf[prefix.len()..], &encode(&spec, &records)[..]);
        prop_assert_eq!(buf.len(), prefix.len() + len);
    }

    #[test]
    fn an_abandoned_or_empty_encoder_leaves_the_buffer_as_it_was(
        (spec, records) in arb_batch(),
        prefix in any::<Vec<u8>>(),
        pushed in any::<prop::sample::Index>(),
    ) {
        let mut buf = BytesMut::from(&prefix[..]);
        let mut encoder = BatchEncoder::begin(&spec, &mut buf).expect("None or Zstd");
        for record in &records[..pushed.index(records.len() + 1)] {
            encoder.push(&mut buf, record.borrowed()).expect("valid records encode");
        }
        encoder.abandon(&mut buf);
        prop_assert_eq!(&buf[..], &prefix[..]);
        // A batch without records is refused, and leaves nothing behind either.
        let encoder = BatchEncoder::begin(&spec, &mut buf).expect("None or Zstd");
        prop_assert!(matches!(encoder.finish(&mut buf), Err(BatchError::InvalidInput(_))));
        prop_assert_eq!(&buf[..], &prefix[..]);
        // Two batches encoded one after the other into one buffer are what each encodes alone.
        let mut encoder = BatchEncoder::begin(&spec, &mut buf).expect("None or Zstd");
        for record in &records {
            encoder.push(&mut buf, record.borrowed()).expect("valid records encode");
        }
        let first = encoder.finish(&mut buf).expect("valid records encode");
        encode_batch(&spec, &records, &mut buf).expect("valid records encode");
        let alone = encode(&spec, &records);
        prop_assert_eq!(first, alone.len());
        prop_assert_eq!(&buf[prefix.len()..prefix.len() + first], &alone[..]);
        prop_assert_eq!(&buf[prefix.len() + first..], &alone[..]);
    }

    #[test]
    fn every_prefix_is_incomplete((spec, records) in arb_batch()) {
        let bytes = encode(&spec, &records);
        for cut in 0..bytes.len() {
            prop_assert_eq!(decode_batch(&bytes[..cut], &DecodeLimits::default()), Ok(None));
        }
    }

    #[test]
    fn a_flipped_bit_under_the_crc_is_an_error(
        (spec, records) in arb_batch(),
        position in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut bytes = encode(&spec, &records);
        let at = CRC_COVERS_FROM + position.index(bytes.len() - CRC_COVERS_FROM);
        bytes[at] ^= 1 << bit;
        let result = decode_batch(&bytes, &DecodeLimits::default());
        if at >= BATCH_HEADER_LEN {
            let is_crc_mismatch = matches!(result, Err(BatchError::CrcMismatch { .. }));
            prop_assert!(is_crc_mismatch, "{:?}", result);
        } else {
            // Header fields are checked for sanity before the CRC.
            prop_assert!(result.is_err(), "{:?}", result);
        }
    }

    #[test]
    fn any_damage_anywhere_never_panics(
        (spec, records) in arb_batch(),
        damage in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        recompute_crc in any::<bool>(),
    ) {
        let mut bytes = encode(&spec, &records).to_vec();
        for (position, byte) in damage {
            let at = position.index(bytes.len());
            bytes[at] = byte;
        }
        if recompute_crc {
            fix_crc(&mut bytes);
        }
        // Whatever the damage, the answer is a value, never a panic or a runaway allocation.
        let _ = decode_batch(&bytes, &TEST_LIMITS);
        let _ = batches(&bytes, TEST_LIMITS.max_batch_bytes).count();
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes, &TEST_LIMITS);
        let _ = batches(&bytes, TEST_LIMITS.max_batch_bytes).count();
    }

    #[test]
    fn arbitrary_records_behind_a_valid_header_never_panic(
        section in prop::collection::vec(any::<u8>(), 0..512),
        record_count in prop_oneof![0i32..8, Just(i32::MAX)],
        zstd in any::<bool>(),
    ) {
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let batch = batch_around(&section, record_count, compression);
        let _ = decode_batch(&batch, &TEST_LIMITS);
    }

    #[test]
    fn batches_yields_each_batch_and_stops_at_a_partial_one(
        batch_list in prop::collection::vec(arb_batch(), 1..5),
        partial in any::<prop::sample::Index>(),
    ) {
        let mut stream = BytesMut::new();
        let mut lengths = Vec::new();
        for (spec, records) in &batch_list {
            lengths.push(encode_batch(spec, records, &mut stream).expect("valid records encode"));
        }
        let whole_len = stream.len();
        let tail = encode(&batch_list[0].0, &batch_list[0].1);
        stream.extend_from_slice(&tail[..partial.index(tail.len())]);

        let mut iter = batches(&stream, DecodeLimits::default().max_batch_bytes);
        let mut start = 0;
        for (index, len) in lengths.iter().enumerate() {
            let (header, batch) = iter.next().expect("a whole batch").expect("a valid batch");
            prop_assert_eq!(batch, &stream[start..start + len]);
            let decoded = decode_records(&header, batch, &DecodeLimits::default())
                .expect("records decode");
            let (spec, records) = &batch_list[index];
            prop_assert_eq!(decoded, expected_records(spec, records));
            start += len;
            prop_assert_eq!(iter.position(), start);
        }
        prop_assert!(iter.next().is_none());
        prop_assert!(iter.next().is_none());
        prop_assert_eq!(iter.position(), whole_len);
    }

    #[test]
    fn varints_round_trip(
        value in prop_oneof![any::<i32>(), Just(i32::MIN), Just(i32::MAX), Just(0), Just(-1)],
        trailing in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut buf = Vec::new();
        put_varint(&mut buf, value);
        prop_assert_eq!(buf.len(), varint_len(value));
        prop_assert!(buf.len() <= VARINT_BYTES_MAX);
        let len = buf.len();
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(read_varint(&buf), Ok((value, len)));
        for cut in 0..len {
            prop_assert!(read_varint(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn varlongs_round_trip(
        value in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(0), Just(-1)],
        trailing in prop::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut buf = BytesMut::new();
        put_varlong(&mut buf, value);
        prop_assert_eq!(buf.len(), varlong_len(value));
        prop_assert!(buf.len() <= VARLONG_BYTES_MAX);
        let len = buf.len();
        buf.extend_from_slice(&trailing);
        prop_assert_eq!(read_varlong(&buf), Ok((value, len)));
        for cut in 0..len {
            prop_assert!(read_varlong(&buf[..cut]).is_err());
        }
    }

    #[test]
    fn varint_decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..12)) {
        if let Ok((_, consumed)) = read_varint(&bytes) {
            prop_assert!((1..=VARINT_BYTES_MAX).contains(&consumed));
        }
        if let Ok((_, consumed)) = read_varlong(&bytes) {
            prop_assert!((1..=VARLONG_BYTES_MAX).contains(&consumed));
        }
    }
}

#[test]
fn pinned_batch_bytes() {
    let bytes = encode(&BatchSpec::default(), &pinned_records());
    assert_eq!(to_hex(&bytes), PINNED_BATCH_HEX);
}

#[test]
fn log_append_time_gives_every_record_the_max_timestamp() {
    let spec = BatchSpec {
        timestamp_type: TimestampType::LogAppendTime,
        ..BatchSpec::default()
    };
    let records = vec![
        Record {
            timestamp: 30,
            ..Record::default()
        },
        Record {
            timestamp: 50,
            ..Record::default()
        },
        Record {
            timestamp: 10,
            ..Record::default()
        },
    ];
    let (header, decoded, _) = decode_batch(&encode(&spec, &records), &DecodeLimits::default())
        .expect("decodes")
        .expect("complete");
    assert_eq!(header.timestamp_type(), TimestampType::LogAppendTime);
    assert_eq!(header.base_timestamp, 30);
    assert_eq!(header.max_timestamp, 50);
    let timestamps: Vec<i64> = decoded.iter().map(|record| record.timestamp).collect();
    assert_eq!(timestamps, [50, 50, 50]);
}

#[test]
fn an_empty_batch_is_invalid_input() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    let result = encode_batch(&BatchSpec::default(), &[], &mut buf);
    assert!(
        matches!(result, Err(BatchError::InvalidInput(_))),
        "{result:?}"
    );
    assert_eq!(&buf[..], b"keep");
}

#[test]
fn compressions_without_a_codec_are_refused_on_encode() {
    for compression in [Compression::Gzip, Compression::Snappy, Compression::Lz4] {
        let spec = BatchSpec {
            compression,
            ..BatchSpec::default()
        };
        let mut buf = BytesMut::new();
        assert_eq!(
            encode_batch(&spec, &pinned_records(), &mut buf),
            Err(BatchError::UnsupportedCompression(compression))
        );
        assert!(buf.is_empty());
    }
}

#[test]
fn compressions_without_a_codec_are_refused_on_decode() {
    let mut bytes = encode(&BatchSpec::default(), &pinned_records());
    // Claim gzip in the attributes; the header and CRC stay valid.
    bytes[CRC_COVERS_FROM + 1] |= Compression::Gzip.code() as u8;
    fix_crc(&mut bytes);
    assert_eq!(
        decode_batch(&bytes, &DecodeLimits::default()),
        Err(BatchError::UnsupportedCompression(Compression::Gzip))
    );
    // The batch itself is still a valid batch to store and serve.
    assert_eq!(batches(&bytes, 1 << 20).filter_map(Result::ok).count(), 1);
}

#[test]
fn the_last_offset_may_not_overflow() {
    let spec = BatchSpec {
        base_offset: i64::MAX,
        ..BatchSpec::default()
    };
    let mut buf = BytesMut::new();
    let result = encode_batch(&spec, &pinned_records(), &mut buf);
    assert!(
        matches!(result, Err(BatchError::InvalidInput(_))),
        "{result:?}"
    );
    assert!(buf.is_empty());
    // A single record at i64::MAX is fine.
    encode(&spec, &pinned_records()[..1]);
}

#[test]
fn a_zstd_bomb_stops_at_the_decompression_limit() {
    let limits = DecodeLimits {
        max_batch_bytes: 1 << 20,
        max_decompressed_bytes: 1 << 20,
    };
    let spec = BatchSpec {
        compression: Compression::Zstd,
        ..BatchSpec::default()
    };
    let records = vec![Record {
        value: Some(Bytes::from(vec![0u8; 8 << 20])),
        ..Record::default()
    }];
    let bytes = encode(&spec, &records);
    assert!(
        bytes.len() < 4096,
        "zeros compress well: {} bytes",
        bytes.len()
    );
    assert_eq!(
        decode_batch(&bytes, &limits),
        Err(BatchError::DecompressedTooLarge { max: 1 << 20 })
    );
    // Decompressing the records alone stops there too, with a buffer no larger.
    let header = BatchHeader::parse(&bytes).unwrap().expect("a header");
    let mut out = Vec::new();
    assert_eq!(
        decompress_records(&header, &bytes, &limits, &mut out),
        Err(BatchError::DecompressedTooLarge { max: 1 << 20 })
    );
    assert!(out.capacity() <= 1 << 20, "{}", out.capacity());
    // With room for it, the same batch decodes.
    let roomy = DecodeLimits {
        max_decompressed_bytes: 16 << 20,
        ..limits
    };
    let (_, decoded, _) = decode_batch(&bytes, &roomy)
        .expect("decodes")
        .expect("complete");
    assert_eq!(decoded[0].value.as_ref().map(Bytes::len), Some(8 << 20));
}

#[test]
fn a_batch_over_the_size_limit_is_refused() {
    let bytes = encode(&BatchSpec::default(), &pinned_records());
    let limits = DecodeLimits {
        max_batch_bytes: bytes.len() - 1,
        ..DecodeLimits::default()
    };
    assert_eq!(
        decode_batch(&bytes, &limits),
        Err(BatchError::TooLarge {
            size: bytes.len(),
            max: bytes.len() - 1
        })
    );
}

#[test]
fn the_record_count_must_match_the_records() {
    let original = encode(&BatchSpec::default(), &pinned_records());
    for claimed in [0i32, 1, 3, i32::MAX] {
        let mut bytes = original.clone();
        bytes[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&claimed.to_be_bytes());
        fix_crc(&mut bytes);
        let result = decode_batch(&bytes, &DecodeLimits::default());
        assert!(
            matches!(result, Err(BatchError::Corrupt(_))),
            "{claimed}: {result:?}"
        );
    }
}

#[test]
fn a_record_length_must_match_its_fields() {
    let original = encode(&BatchSpec::default(), &pinned_records());
    // The first record's length varint is the first byte after the header: 14, zigzag 0x1c.
    assert_eq!(original[BATCH_HEADER_LEN], 0x1c);
    for (length, zigzag) in [(13, 0x1a), (15, 0x1e)] {
        let mut bytes = original.clone();
        bytes[BATCH_HEADER_LEN] = zigzag;
        fix_crc(&mut bytes);
        let result = decode_batch(&bytes, &DecodeLimits::default());
        assert!(
            matches!(result, Err(BatchError::Corrupt(_))),
            "{length}: {result:?}"
        );
    }
}

#[test]
fn a_header_key_must_be_utf8() {
    let mut bytes = encode(&BatchSpec::default(), &pinned_records());
    // The first record's header key "h" sits 13 bytes before the end of the batch.
    let at = bytes.len() - 13;
    assert_eq!(bytes[at], b'h');
    bytes[at] = 0xff;
    fix_crc(&mut bytes);
    assert_eq!(
        decode_batch(&bytes, &DecodeLimits::default()),
        Err(BatchError::Corrupt("record header key is not UTF-8"))
    );
}

#[test]
fn zero_record_batches_decode_to_no_records() {
    for compression in [Compression::None, Compression::Zstd] {
        let batch = batch_around(&[], 0, compression);
        let (header, records, consumed) = decode_batch(&batch, &DecodeLimits::default())
            .expect("decodes")
            .expect("complete");
        assert_eq!(header.record_count, 0);
        assert!(records.is_empty());
        assert_eq!(consumed, batch.len());
    }
}

#[test]
fn a_corrupt_batch_ends_iteration_after_one_error() {
    let mut stream = BytesMut::new();
    let first_len = encode_batch(&BatchSpec::default(), &pinned_records(), &mut stream)
        .expect("valid records encode");
    encode_batch(&BatchSpec::default(), &pinned_records(), &mut stream)
        .expect("valid records encode");
    encode_batch(&BatchSpec::default(), &pinned_records(), &mut stream)
        .expect("valid records encode");
    let last = stream.len() - 1;
    stream[first_len + BATCH_HEADER_LEN] ^= 0x01;
    stream[last] ^= 0x01;

    let mut iter = batches(&stream, 1 << 20);
    assert!(matches!(iter.next(), Some(Ok(_))));
    assert!(matches!(
        iter.next(),
        Some(Err(BatchError::CrcMismatch { .. }))
    ));
    assert!(iter.next().is_none());
    assert_eq!(iter.position(), first_len);
}

/// Compresses `section` as a stream, so the frame does not state its decompressed size and the
/// decoder only learns it by decompressing.
fn zstd_stream(section: &[u8], window_log: Option<u32>) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd encoder");
    if let Some(window_log) = window_log {
        encoder
            .set_parameter(zstd::zstd_safe::CParameter::WindowLog(window_log))
            .expect("window log");
    }
    encoder.write_all(section).expect("in-memory write");
    encoder.finish().expect("in-memory finish")
}

#[test]
fn a_streamed_zstd_bomb_stops_at_the_decompression_limit() {
    let records = vec![Record {
        value: Some(Bytes::from(vec![0u8; 8 << 20])),
        ..Record::default()
    }];
    let plain = encode(&BatchSpec::default(), &records);
    let compressed = zstd_stream(&plain[BATCH_HEADER_LEN..], None);
    assert!(
        matches!(
            zstd::zstd_safe::get_frame_content_size(&compressed),
            Ok(None)
        ),
        "the frame must not state its size for this test"
    );
    let batch = batch_around(&compressed, 1, Compression::Zstd);
    let limits = DecodeLimits {
        max_batch_bytes: 1 << 20,
        max_decompressed_bytes: 1 << 20,
    };
    assert_eq!(
        decode_batch(&batch, &limits),
        Err(BatchError::DecompressedTooLarge { max: 1 << 20 })
    );
}

#[test]
fn a_zstd_window_above_the_limit_is_refused() {
    let plain = encode(&BatchSpec::default(), &pinned_records());
    // A 128 MiB window around a few bytes: harmless content, but the decoder would have to
    // allocate the whole window.
    let compressed = zstd_stream(&plain[BATCH_HEADER_LEN..], Some(27));
    let batch = batch_around(&compressed, 2, Compression::Zstd);
    let result = decode_batch(&batch, &DecodeLimits::default());
    assert!(matches!(result, Err(BatchError::Corrupt(_))), "{result:?}");
    let roomy = DecodeLimits {
        max_decompressed_bytes: 128 << 20,
        ..DecodeLimits::default()
    };
    let (_, decoded, _) = decode_batch(&batch, &roomy)
        .expect("decodes")
        .expect("complete");
    assert_eq!(decoded.len(), 2);
}

#[test]
fn decode_records_refuses_bytes_that_do_not_match_the_header() {
    let bytes = encode(&BatchSpec::default(), &pinned_records());
    let (header, _) = silt_log::batch::check_batch(&bytes, 1 << 20)
        .expect("valid")
        .expect("complete");
    let limits = DecodeLimits::default();
    let short = decode_records(&header, &bytes[..bytes.len() - 1], &limits);
    assert!(matches!(short, Err(BatchError::Corrupt(_))), "{short:?}");
    let negative = BatchHeader {
        batch_length: -1,
        ..header
    };
    let result = decode_records(&negative, &bytes, &limits);
    assert!(matches!(result, Err(BatchError::Corrupt(_))), "{result:?}");
}

#[test]
fn a_caller_compressed_batch_decodes_to_its_records_and_its_plain_section() {
    let records = pinned_records();
    let spec = BatchSpec {
        base_offset: 40,
        producer_id: 7,
        producer_epoch: 1,
        base_sequence: 3,
        ..BatchSpec::default()
    };
    let plain = encode(&spec, &records);
    let mut compressor = zstd::bulk::Compressor::new(1).expect("a zstd context");
    let mut seen = None;
    let mut compressed = BytesMut::new();
    let len = encode_batch_compressed(&spec, &records, &mut compressed, |section| {
        seen = Some(section.to_vec());
        Some(compressor.compress(section).expect("compresses"))
    })
    .expect("valid records encode");
    assert_eq!(len, compressed.len());
    // The section handed to `compress` is the plain batch's records section.
    assert_eq!(seen.as_deref(), Some(&plain[BATCH_HEADER_LEN..]));
    let (header, decoded, used) = decode_batch(&compressed, &TEST_LIMITS)
        .expect("a valid batch")
        .expect("a whole batch");
    assert_eq!(used, compressed.len());
    assert_eq!(header.compression(), Ok(Compression::Zstd));
    assert_eq!(header.base_offset, 40);
    assert_eq!(header.producer_id, 7);
    let (_, plain_decoded, _) = decode_batch(&plain, &TEST_LIMITS).unwrap().unwrap();
    assert_eq!(decoded, plain_decoded);
    let mut section = vec![1, 2, 3];
    decompress_records(&header, &compressed, &TEST_LIMITS, &mut section).expect("decompresses");
    assert_eq!(section, &plain[BATCH_HEADER_LEN..]);
    // An uncompressed batch is not something to decompress.
    let plain_header = BatchHeader::parse(&plain).unwrap().expect("a header");
    assert_eq!(
        decompress_records(&plain_header, &plain, &TEST_LIMITS, &mut section),
        Err(BatchError::UnsupportedCompression(Compression::None))
    );
}

#[test]
fn a_zstd_batch_decompresses_onto_the_end_of_a_buffer_with_or_without_its_crc() {
    let records = pinned_records();
    let spec = |compression| BatchSpec {
        base_offset: 40,
        producer_id: 7,
        compression,
        ..BatchSpec::default()
    };
    let plain = encode(&spec(Compression::None), &records);
    let compressed = encode(&spec(Compression::Zstd), &records);
    let header = BatchHeader::parse(&compressed).unwrap().expect("a header");
    let before = b"bytes already there".to_vec();

    // With its CRC: after what the buffer held, byte for byte the batch encoded plain.
    let mut out = before.clone();
    let len = decompress_batch(
        &header,
        &compressed,
        &TEST_LIMITS,
        &mut out,
        BatchCrc::Compute,
    )
    .expect("decompresses");
    assert_eq!(len, plain.len());
    assert_eq!(&out[..before.len()], &before[..]);
    assert_eq!(&out[before.len()..], &plain[..]);

    // Without: the same bytes but a zero CRC, which only the framing check takes.
    let mut out = before.clone();
    decompress_batch(&header, &compressed, &TEST_LIMITS, &mut out, BatchCrc::Skip).unwrap();
    let unsealed = &out[before.len()..];
    assert_eq!(unsealed[..CRC_AT], plain[..CRC_AT]);
    assert_eq!(unsealed[CRC_AT..CRC_AT + 4], [0; 4]);
    assert_eq!(unsealed[CRC_AT + 4..], plain[CRC_AT + 4..]);
    assert!(matches!(
        check_batch(unsealed, TEST_LIMITS.max_batch_bytes),
        Err(BatchError::CrcMismatch { .. })
    ));
    let (framed, framed_len) = check_batch_framing(unsealed, TEST_LIMITS.max_batch_bytes)
        .unwrap()
        .expect("a whole batch");
    assert_eq!(framed_len, plain.len());
    assert_eq!(framed.compression(), Ok(Compression::None));
    assert_eq!(
        decode_records(&framed, unsealed, &TEST_LIMITS).unwrap(),
        decode_batch(&plain, &TEST_LIMITS).unwrap().unwrap().1
    );
    // The framing check still refuses what is not a batch: a bad length, one over the limit.
    let mut bad_length = unsealed.to_vec();
    bad_length[8..12].copy_from_slice(&1i32.to_be_bytes());
    assert!(check_batch_framing(&bad_length, TEST_LIMITS.max_batch_bytes).is_err());
    assert!(check_batch_framing(unsealed, unsealed.len() - 1).is_err());
    assert_eq!(
        check_batch_framing(&unsealed[..unsealed.len() - 1], TEST_LIMITS.max_batch_bytes),
        Ok(None)
    );

    // A failure leaves the buffer as it was: damaged records, a limit, no compression.
    let mut damaged = compressed.to_vec();
    damaged[BATCH_HEADER_LEN] ^= 0xff; // the zstd magic number
    let tight = DecodeLimits {
        max_decompressed_bytes: plain.len() - BATCH_HEADER_LEN - 1,
        ..TEST_LIMITS
    };
    let plain_header = BatchHeader::parse(&plain).unwrap().expect("a header");
    for (header, batch, limits) in [
        (header, &damaged[..], TEST_LIMITS),
        (header, &compressed[..], tight),
        (plain_header, &plain[..], TEST_LIMITS),
    ] {
        let mut out = before.clone();
        assert!(decompress_batch(&header, batch, &limits, &mut out, BatchCrc::Compute).is_err());
        assert_eq!(out, before);
    }
}

#[test]
fn records_that_do_not_shrink_are_written_uncompressed() {
    let records = pinned_records();
    let mut written = BytesMut::new();
    encode_batch_compressed(&BatchSpec::default(), &records, &mut written, |_| None)
        .expect("valid records encode");
    // Byte for byte the uncompressed batch, attributes and CRC included.
    assert_eq!(written, encode(&BatchSpec::default(), &records));
    let mut out = BytesMut::new();
    assert!(matches!(
        encode_batch_compressed(&BatchSpec::default(), &[], &mut out, |_| None),
        Err(BatchError::InvalidInput(_))
    ));
    assert!(out.is_empty());
}

#[test]
fn records_in_several_zstd_frames_decode_whole() {
    // Some producers write a compressed records section as more than one zstd frame; the
    // first frame's stated size is then not the section's.
    let records = pinned_records();
    let plain = encode(&BatchSpec::default(), &records);
    let section = &plain[BATCH_HEADER_LEN..];
    let (head, tail) = section.split_at(section.len() / 2);
    let mut frames = zstd::bulk::compress(head, 1).unwrap();
    frames.extend(zstd::bulk::compress(tail, 1).unwrap());
    let mut batch = batch_around(&frames, records.len() as i32, Compression::Zstd);
    let header = BatchHeader::parse(&batch).unwrap().unwrap();
    let unframed = batch_around(section, records.len() as i32, Compression::None);
    let (_, expected, _) = decode_batch(&unframed, &TEST_LIMITS).unwrap().unwrap();
    let (_, decoded, _) = decode_batch(&batch, &TEST_LIMITS).unwrap().unwrap();
    assert_eq!(decoded, expected);
    // Into a fresh buffer, and into one with room for more than the first frame says.
    for mut out in [Vec::new(), Vec::with_capacity(1 << 16)] {
        decompress_records(&header, &batch, &TEST_LIMITS, &mut out).unwrap();
        assert_eq!(out, section);
    }
    // A frame that states more than it holds is refused, not trusted.
    let mut lying = zstd::bulk::compress(section, 1).unwrap();
    let frame_header_at = 4; // after the magic number
    assert_eq!(
        lying[frame_header_at] & 0xc0,
        0,
        "a one-byte content size field"
    );
    let content_at = frame_header_at + 1 + usize::from(lying[frame_header_at] & 0x20 == 0);
    lying[content_at] = lying[content_at].wrapping_add(1);
    batch = batch_around(&lying, records.len() as i32, Compression::Zstd);
    let header = BatchHeader::parse(&batch).unwrap().unwrap();
    let mut out = Vec::new();
    assert!(decompress_records(&header, &batch, &TEST_LIMITS, &mut out).is_err());
    assert!(decode_batch(&batch, &TEST_LIMITS).is_err());
}

#[test]
fn the_records_length_hint_reads_a_zstd_frame_size_and_caps_it() {
    let records = pinned_records();
    let plain = encode(&BatchSpec::default(), &records);
    let section_len = plain.len() - BATCH_HEADER_LEN;
    assert_eq!(
        records_len_hint(&plain, 8),
        Some((section_len, plain.len()))
    );
    let zstd_spec = BatchSpec {
        compression: Compression::Zstd,
        ..BatchSpec::default()
    };
    let compressed = encode(&zstd_spec, &records);
    let stored = compressed.len() - BATCH_HEADER_LEN;
    assert_eq!(
        records_len_hint(&compressed, 100),
        Some((section_len, compressed.len()))
    );
    // The claim is capped at a multiple of the stored bytes.
    assert_eq!(
        records_len_hint(&compressed, 0),
        Some((0, compressed.len()))
    );
    assert!(stored > 0);
    // Cut short or not a batch: no hint.
    assert_eq!(
        records_len_hint(&compressed[..compressed.len() - 1], 8),
        None
    );
    assert_eq!(records_len_hint(&[0u8; 10], 8), None);
}
