//! Fuzz target: arbitrary bytes into the RecordBatch v2 decoder and the batch iterator.
//!
//! Beyond "never panics", it checks what must hold whenever decoding succeeds: the batch
//! iterator agrees with `decode_batch`, and re-encoding the decoded records (uncompressed)
//! gives a batch that decodes to the same records. Byte equality with the input is not
//! required: Kafka accepts non-minimal varints, any base timestamp and gaps in offset deltas,
//! which the encoder normalises.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, DecodedRecord, Record, batches, compute_crc,
    decode_batch, decode_records, encode_batch, peek_total_len,
};

/// Small limits so the fuzzer reaches them and memory stays bounded.
const LIMITS: DecodeLimits = DecodeLimits {
    max_batch_bytes: 1 << 20,
    max_decompressed_bytes: 4 << 20,
};

/// Where the CRC sits; it covers the bytes from 21 to the end of the batch.
const CRC_AT: usize = 17;

fuzz_target!(|data: &[u8]| {
    check(data);
    // Random bytes almost never carry a valid CRC, which would stop the fuzzer at the
    // checksum; a copy with the CRC recomputed lets it reach the record parser.
    if let Ok(Some(total)) = peek_total_len(data)
        && total <= data.len()
        && total >= CRC_AT + 4
    {
        let mut fixed = data.to_vec();
        let crc = compute_crc(&fixed[..total]);
        fixed[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let decoded = decode_batch(data, &LIMITS);

    let mut iter = batches(data, LIMITS.max_batch_bytes);
    let first = iter.next();
    for _ in iter.by_ref() {}
    assert!(iter.position() <= data.len());

    let Ok(Some((header, records, consumed))) = decoded else {
        return;
    };
    assert!(consumed <= data.len());
    let Some(Ok((iter_header, batch))) = first else {
        panic!("decode_batch accepted a batch the iterator refused");
    };
    assert_eq!(iter_header, header);
    assert_eq!(batch.len(), consumed);
    assert_eq!(
        decode_records(&header, batch, &LIMITS).as_ref(),
        Ok(&records)
    );
    assert_eq!(records.len(), header.record_count as usize);

    // Only batches the encoder can write are re-encoded: it needs at least one record, and
    // assigns contiguous offsets, so compare offsets only when the input had them.
    let Ok(spec) = BatchSpec::from_header(&header) else {
        return;
    };
    if records.is_empty() || header.is_control() {
        return;
    }
    let spec = BatchSpec {
        compression: Compression::None,
        ..spec
    };
    let inputs: Vec<Record> = records.iter().cloned().map(Record::from).collect();
    let mut once = BytesMut::new();
    encode_batch(&spec, &inputs, &mut once).expect("decoded records re-encode");
    let (_, again, _) = decode_batch(&once, &LIMITS)
        .expect("a re-encoded batch decodes")
        .expect("a re-encoded batch is complete");
    assert_eq!(strip_offsets(&again), strip_offsets(&records));
    let contiguous = records
        .iter()
        .enumerate()
        .all(|(index, record)| record.offset == header.base_offset + index as i64);
    if contiguous {
        assert_eq!(again, records);
    }
}

fn strip_offsets(records: &[DecodedRecord]) -> Vec<Record> {
    records.iter().cloned().map(Record::from).collect()
}
