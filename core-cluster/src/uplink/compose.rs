//! Builds the core's batches from shipped edge batches in one pass over the record bytes:
//! each record is routed to its core partition, deduplicated, and copied into that
//! partition's next batch with the three `silt.edge*` headers spliced in after its own.
//!
//! The output is byte for byte what decoding every record into a `Record`, adding the headers
//! and encoding with `encode_batch` (`BatchSpec::default()`, batches cut at the same estimated
//! size) produces, but without a per-record allocation: keys, values and headers are copied
//! straight from the edge's bytes. That equivalence is the module's contract and is checked
//! against the decode/re-encode path by a seeded randomised test below.
//!
//! Only uncompressed, non-control batches with a non-negative base offset take the splice;
//! anything else (zstd batches, control batches) is opened with `decode_records` and written
//! by the same writer, so both paths share one encoder. Validation is the decoder's: the same
//! CRC, length, varint, UTF-8 and offset-order checks, so a batch is refused by the splice
//! exactly when decoding it would fail.

use bytes::{BufMut, Bytes, BytesMut};
use silt_log::batch::{
    BATCH_HEADER_LEN, BatchCrc, BatchHeader, Compression, DecodeLimits, Header, LOG_OVERHEAD,
    MAGIC_V2, TimestampType, check_batch, check_batch_framing, compute_crc, decode_records,
    decompress_batch, put_nullable, put_varint, put_varlong, read_varint, read_varlong,
    records_len_hint, varint_len, varlong_len,
};

use super::store::{
    HEADER_EDGE, HEADER_EDGE_LOG, HEADER_EDGE_OFFSET, HEADER_EDGE_PARTITION, StoreError, StreamKey,
    route,
};

/// Bytes a header-and-framing estimate adds per record when cutting batches.
pub(crate) const RECORD_OVERHEAD_BYTES: usize = 96;
/// Bytes the size estimate adds per header on top of its key and value.
const HEADER_OVERHEAD_BYTES: usize = 10;
/// Length written for a null key, value or header value.
const NULL_LENGTH: i32 = -1;
/// Most decimal digits of a `u64`.
const U64_DIGITS_MAX: usize = 20;

/// The new records for each core partition of a group of shipped frames.
#[derive(Debug, Default)]
pub(crate) struct Composed {
    pub(crate) partitions: Vec<PartitionBatches>,
    pub(crate) duplicate_records: u64,
}

/// One core partition's new records, as whole batches ready to append.
#[derive(Debug, Default)]
pub(crate) struct PartitionBatches {
    pub(crate) bytes: BytesMut,
    pub(crate) records: u64,
    /// Edge offset of the last record routed here.
    pub(crate) last_offset: Option<u64>,
    open: Option<OpenBatch>,
}

/// The batch being filled at the end of [`PartitionBatches::bytes`].
#[derive(Debug)]
struct OpenBatch {
    start: usize,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    estimate_bytes: usize,
}

/// A record to write, borrowed from the shipped bytes or from a decoded record.
struct RecordView<'a> {
    offset: u64,
    timestamp: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: HeadersView<'a>,
}

/// A record's own headers.
enum HeadersView<'a> {
    /// The header bytes as stored, already validated. `canonical` is false when a length is
    /// written with more varint bytes than needed: then they are re-encoded, as the encoder
    /// would, rather than copied.
    Raw {
        count: i32,
        bytes: &'a [u8],
        /// Bytes they take when written canonically.
        written_len: usize,
        estimate_bytes: usize,
        canonical: bool,
    },
    Decoded(&'a [Header]),
}

/// The three origin headers, all but the offset's value prepared once per stream.
struct OriginHeaders {
    /// `silt.edge`, `silt.edge.log` (for an edge log with an id) and `silt.edge.partition`
    /// whole, then the key of `silt.edge.offset`.
    prefix: Vec<u8>,
    /// How many headers they are: 3, or 4 with `silt.edge.log`.
    count: i32,
    /// Estimated bytes of the headers without the offset's digits.
    estimate_bytes: usize,
}

impl OriginHeaders {
    fn new(stream: &StreamKey) -> OriginHeaders {
        let partition = stream.edge_partition.to_string();
        let with_log = !stream.edge_log.is_empty();
        let log_estimate_bytes = if with_log {
            HEADER_EDGE_LOG.len() + stream.edge_log.len() + HEADER_OVERHEAD_BYTES
        } else {
            0
        };
        let mut prefix = BytesMut::new();
        put_string(&mut prefix, HEADER_EDGE.as_bytes());
        put_string(&mut prefix, stream.edge_id.as_bytes());
        if with_log {
            put_string(&mut prefix, HEADER_EDGE_LOG.as_bytes());
            put_string(&mut prefix, stream.edge_log.as_bytes());
        }
        put_string(&mut prefix, HEADER_EDGE_PARTITION.as_bytes());
        put_string(&mut prefix, partition.as_bytes());
        put_string(&mut prefix, HEADER_EDGE_OFFSET.as_bytes());
        OriginHeaders {
            prefix: prefix.to_vec(),
            count: if with_log { 4 } else { 3 },
            estimate_bytes: HEADER_EDGE.len()
                + stream.edge_id.len()
                + HEADER_EDGE_PARTITION.len()
                + partition.len()
                + HEADER_EDGE_OFFSET.len()
                + 3 * HEADER_OVERHEAD_BYTES
                + log_estimate_bytes,
        }
    }
}

/// One `Data` frame's batches, as [`compose`] takes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part<'a> {
    /// The frame's first edge offset: records below it are skipped.
    pub(crate) first_offset: u64,
    pub(crate) batches: &'a [u8],
    /// Every batch's CRC is checked already ([`Shipped::crc_checked`]): only their headers
    /// and lengths are checked again.
    pub(crate) crc_checked: bool,
}

impl<'a> Part<'a> {
    /// Batches as they were shipped, their CRCs still to check.
    #[cfg(test)]
    pub(crate) fn shipped(first_offset: u64, batches: &'a [u8]) -> Part<'a> {
        Part {
            first_offset,
            batches,
            crc_checked: false,
        }
    }
}

/// A `Data` frame's batches after [`decompress_shipped`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shipped {
    pub(crate) batches: Bytes,
    /// True when `decompress_shipped` checked every batch's CRC on the way, in which case
    /// the batches it decompressed carry no CRC of their own (the compressed batch's CRC
    /// covered the same records): [`compose`] must not check them again. False for bytes
    /// passed on as they came, which `compose` checks whole.
    pub(crate) crc_checked: bool,
}

/// Routes and deduplicates the records of `parts` (`Data` frames in edge order) into new
/// batches per core partition. `expected(p)` is the next edge offset core partition `p`
/// expects from `stream`; records below it, or below their frame's first offset, are
/// skipped. `budget` bounds a new batch's estimated bytes.
pub(crate) fn compose(
    parts: &[Part<'_>],
    stream: &StreamKey,
    partitions: u32,
    expected: impl Fn(usize) -> u64,
    limits: &DecodeLimits,
    budget: usize,
) -> Result<Composed, StoreError> {
    let origin = OriginHeaders::new(stream);
    let mut composed = Composed {
        partitions: (0..partitions)
            .map(|_| PartitionBatches::default())
            .collect(),
        duplicate_records: 0,
    };
    // A partition's output is sized once, for its share of the shipped bytes and of the
    // origin headers its records gain, plus an eighth for keys that hash unevenly, rather
    // than grown by doubling and copying. Bounded by what the caller already holds.
    let shipped_bytes: usize = parts.iter().map(|part| part.batches.len()).sum();
    // Compressed batches may hold far more than they take: the group's output is bounded as
    // one batch's decompression is, or by twice what was shipped when that is more.
    let output_bytes_max = limits
        .max_decompressed_bytes
        .max(shipped_bytes.saturating_mul(2));
    let reserve_bytes = reserve_bytes(parts, &origin, shipped_bytes, output_bytes_max, partitions);
    let mut output_bytes = 0usize;
    let mut place = |record: RecordView<'_>, first_offset: u64| -> Result<(), StoreError> {
        if record.offset < first_offset {
            return Ok(());
        }
        let partition = route(record.key, &stream.edge_id, partitions) as usize;
        let out = &mut composed.partitions[partition];
        let next = out
            .last_offset
            .map_or_else(|| expected(partition), |last| last + 1);
        if record.offset < next {
            composed.duplicate_records += 1;
            return Ok(());
        }
        if out.bytes.capacity() == 0 {
            out.bytes.reserve(reserve_bytes);
        }
        let before = out.bytes.len();
        out.push(&record, &origin, budget)?;
        output_bytes += out.bytes.len() - before;
        if output_bytes > output_bytes_max {
            return Err(StoreError::BadBatch(format!(
                "the group's records come to more than {output_bytes_max} bytes"
            )));
        }
        Ok(())
    };
    for part in parts {
        let first_offset = part.first_offset;
        let check = if part.crc_checked {
            check_batch_framing
        } else {
            check_batch
        };
        let mut rest = part.batches;
        while !rest.is_empty() {
            let (header, used) = check(rest, limits.max_batch_bytes)
                .map_err(bad_batch)?
                .ok_or_else(|| StoreError::BadBatch("a batch is cut short".into()))?;
            let batch = &rest[..used];
            rest = &rest[used..];
            let plain = matches!(header.compression(), Ok(Compression::None))
                && !header.is_control()
                && header.base_offset >= 0;
            if plain {
                for_each_plain_record(&header, batch, |record| place(record, first_offset))?;
                continue;
            }
            let records = decode_records(&header, batch, limits).map_err(bad_batch)?;
            if header.is_control() {
                continue;
            }
            for record in &records {
                let offset = u64::try_from(record.offset)
                    .map_err(|_| StoreError::BadBatch("negative record offset".into()))?;
                let view = RecordView {
                    offset,
                    timestamp: record.timestamp,
                    key: record.key.as_deref(),
                    value: record.value.as_deref(),
                    headers: HeadersView::Decoded(&record.headers),
                };
                place(view, first_offset)?;
            }
        }
    }
    for partition in &mut composed.partitions {
        partition.finish_batch()?;
    }
    Ok(composed)
}

/// Bytes to reserve for one core partition's output of `parts`: its share, over `partitions`,
/// of the shipped bytes and of what the origin headers add to each record (counted from the
/// batch headers, whose record counts are not checked yet: the whole is capped at
/// `output_bytes_max`, which the output may not exceed), plus an eighth. The origin headers are 15% or more of a record of a few
/// hundred bytes, so a fixed margin below that had every partition's buffer grow, and copy
/// its records, once per group.
fn reserve_bytes(
    parts: &[Part<'_>],
    origin: &OriginHeaders,
    shipped_bytes: usize,
    output_bytes_max: usize,
    partitions: u32,
) -> usize {
    let mut records = 0usize;
    for part in parts {
        let mut rest = part.batches;
        while let Ok(Some(header)) = BatchHeader::parse(rest) {
            records = records.saturating_add(header.record_count.max(0) as usize);
            let Some(after) = rest.get(header.total_len()..) else {
                break;
            };
            rest = after;
        }
    }
    let last_offset = parts
        .last()
        .map_or(0, |part| part.first_offset)
        .saturating_add(records as u64);
    let mut digits = [0u8; U64_DIGITS_MAX];
    // The prefix, the offset's digits and their length, and a byte more for each of the
    // record's length and header count.
    let origin_bytes = origin.prefix.len() + decimal(last_offset, &mut digits).len() + 3;
    let group_bytes = shipped_bytes
        .saturating_add(records.saturating_mul(origin_bytes))
        .min(output_bytes_max);
    let share_bytes = group_bytes / partitions.max(1) as usize;
    share_bytes + share_bytes / 8
}

/// Most times the records of a zstd batch are counted larger than its stored bytes when
/// sizing a buffer for them: sensor JSON compresses 2 to 5 times.
const RECORDS_RATIO_MAX: usize = 8;

/// When some batch of `batches` is zstd (compressed at rest), about how many bytes they take
/// with their records decompressed, from the batch headers alone; `None` when there is
/// nothing for [`decompress_shipped`] to do.
pub(crate) fn compressed_at_rest(batches: &[u8]) -> Option<usize> {
    let mut compressed = false;
    let mut records_bytes = 0usize;
    let mut rest = batches;
    while let Some((records, len)) = records_len_hint(rest, RECORDS_RATIO_MAX) {
        compressed |= matches!(
            BatchHeader::parse(rest),
            Ok(Some(header)) if header.compression() == Ok(Compression::Zstd)
        );
        records_bytes = records_bytes.saturating_add(BATCH_HEADER_LEN + records);
        rest = &rest[len..];
    }
    compressed.then_some(records_bytes)
}

/// The shipped `batches` with every zstd batch decompressed (an edge's batches compressed at
/// rest), so that `compose` splices them like uncompressed ones and the decompression happens
/// as a frame is read, beside the appends of the frames before it. Every batch's CRC is
/// checked on the way, and the decompressed batches get none ([`Shipped::crc_checked`]): one
/// pass less over the records here and none in `compose`. The bytes come back as they are
/// (and unchecked) when no batch is compressed, and also when a batch fails its checks, would
/// decompress past `limits` or to a batch over `limits.max_batch_bytes`, or the frame's
/// batches to more than `limits.max_decompressed_bytes` together: then `compose` refuses (or
/// takes) them exactly as it would have.
pub(crate) fn decompress_shipped(batches: Bytes, limits: &DecodeLimits) -> Shipped {
    let as_shipped = |batches| Shipped {
        batches,
        crc_checked: false,
    };
    let Some(records_bytes) = compressed_at_rest(&batches) else {
        return as_shipped(batches);
    };
    let mut out = Vec::with_capacity(records_bytes.min(limits.max_decompressed_bytes));
    let mut rest = &batches[..];
    while !rest.is_empty() {
        let Ok(Some((header, used))) = check_batch(rest, limits.max_batch_bytes) else {
            return as_shipped(batches);
        };
        let batch = &rest[..used];
        rest = &rest[used..];
        if header.compression() != Ok(Compression::Zstd) {
            out.extend_from_slice(batch);
            continue;
        }
        match decompress_batch(&header, batch, limits, &mut out, BatchCrc::Skip) {
            Ok(len)
                if len <= limits.max_batch_bytes && out.len() <= limits.max_decompressed_bytes => {}
            _ => return as_shipped(batches),
        }
    }
    Shipped {
        batches: Bytes::from(out),
        crc_checked: true,
    }
}

fn bad_batch(error: impl std::fmt::Display) -> StoreError {
    StoreError::BadBatch(error.to_string())
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::BadBatch(format!("corrupt record batch: {reason}"))
}

/// Walks the records of an uncompressed batch (CRC already checked) with the decoder's
/// checks, handing each to `each` borrowed from `batch`.
fn for_each_plain_record<'a>(
    header: &BatchHeader,
    batch: &'a [u8],
    mut each: impl FnMut(RecordView<'a>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if batch.len() < BATCH_HEADER_LEN || batch.len() != header.total_len() {
        return Err(corrupt("batch bytes do not match the header length"));
    }
    let record_count =
        usize::try_from(header.record_count).map_err(|_| corrupt("negative record count"))?;
    let mut rest = &batch[BATCH_HEADER_LEN..];
    let mut previous_offset_delta = None;
    for _ in 0..record_count {
        if rest.is_empty() {
            return Err(corrupt("fewer records than the record count"));
        }
        let (body_len, len_bytes) = read_varint(rest).map_err(bad_batch)?;
        let body_len = usize::try_from(body_len).map_err(|_| corrupt("negative record length"))?;
        let body = len_bytes
            .checked_add(body_len)
            .and_then(|end| rest.get(len_bytes..end))
            .ok_or_else(|| corrupt("record length runs past the end of the batch"))?;
        rest = &rest[len_bytes + body_len..];
        let mut fields = Fields { rest: body };
        // Record attributes are unused in v2 and written back as 0, as the decoder does.
        fields.take(1)?;
        let timestamp_delta = fields.varlong()?;
        let offset_delta = fields.varint()?;
        let key = fields.nullable()?;
        let value = fields.nullable()?;
        let header_count = fields.varint()?;
        if header_count < 0 {
            return Err(corrupt("negative record header count"));
        }
        let headers_at = fields.rest;
        let mut written_len = 0usize;
        let mut estimate_bytes = 0usize;
        let mut canonical = true;
        for _ in 0..header_count {
            let (key_len, key_len_bytes) = fields.varint_sized()?;
            let key_len = usize::try_from(key_len)
                .map_err(|_| corrupt("negative record header key length"))?;
            let header_key = fields.take(key_len)?;
            // Header keys are nearly always ASCII, which is UTF-8 and much quicker to check.
            if !header_key.is_ascii() {
                std::str::from_utf8(header_key)
                    .map_err(|_| corrupt("record header key is not UTF-8"))?;
            }
            let (value_len, value_len_bytes) = fields.varint_sized()?;
            let header_value_len = match value_len {
                NULL_LENGTH => 0,
                len => {
                    let len = usize::try_from(len)
                        .map_err(|_| corrupt("negative length other than -1"))?;
                    fields.take(len)?;
                    len
                }
            };
            canonical &= key_len_bytes == varint_len(key_len as i32)
                && value_len_bytes == varint_len(value_len);
            written_len +=
                varint_len(key_len as i32) + key_len + varint_len(value_len) + header_value_len;
            estimate_bytes += key_len + header_value_len + HEADER_OVERHEAD_BYTES;
        }
        if !fields.rest.is_empty() {
            return Err(corrupt("record length does not match its fields"));
        }
        // The record's headers end where its body does.
        let headers = headers_at;
        let in_order = previous_offset_delta.is_none_or(|previous| offset_delta > previous);
        if offset_delta < 0 || offset_delta > header.last_offset_delta || !in_order {
            return Err(corrupt("record offset delta out of order or range"));
        }
        previous_offset_delta = Some(offset_delta);
        let offset = header
            .base_offset
            .checked_add(i64::from(offset_delta))
            .ok_or_else(|| corrupt("record offset overflows i64"))?;
        let timestamp = match header.timestamp_type() {
            TimestampType::LogAppendTime => header.max_timestamp,
            TimestampType::CreateTime => header.base_timestamp.wrapping_add(timestamp_delta),
        };
        each(RecordView {
            // Non-negative: the base offset is, and so is the delta.
            offset: offset as u64,
            timestamp,
            key,
            value,
            headers: HeadersView::Raw {
                count: header_count,
                bytes: headers,
                written_len,
                estimate_bytes,
                canonical,
            },
        })?;
    }
    if !rest.is_empty() {
        return Err(corrupt("bytes left after the last record"));
    }
    Ok(())
}

/// Reads the fields of one record body; running off its end is corruption.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], StoreError> {
        if len > self.rest.len() {
            return Err(corrupt("record field runs past the record length"));
        }
        let (field, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }

    fn varint_sized(&mut self) -> Result<(i32, usize), StoreError> {
        let (value, consumed) = read_varint(self.rest).map_err(bad_batch)?;
        self.rest = &self.rest[consumed..];
        Ok((value, consumed))
    }

    fn varint(&mut self) -> Result<i32, StoreError> {
        self.varint_sized().map(|(value, _)| value)
    }

    fn varlong(&mut self) -> Result<i64, StoreError> {
        let (value, consumed) = read_varlong(self.rest).map_err(bad_batch)?;
        self.rest = &self.rest[consumed..];
        Ok(value)
    }

    /// A length-prefixed byte string where -1 means null.
    fn nullable(&mut self) -> Result<Option<&'a [u8]>, StoreError> {
        match self.varint()? {
            NULL_LENGTH => Ok(None),
            len => {
                let len =
                    usize::try_from(len).map_err(|_| corrupt("negative length other than -1"))?;
                self.take(len).map(Some)
            }
        }
    }
}

impl PartitionBatches {
    /// Appends `record` with its origin headers, first closing the open batch when the
    /// record would take its estimated size past `budget`.
    fn push(
        &mut self,
        record: &RecordView<'_>,
        origin: &OriginHeaders,
        budget: usize,
    ) -> Result<(), StoreError> {
        let mut digits = [0u8; U64_DIGITS_MAX];
        let offset_digits = decimal(record.offset, &mut digits);
        let (header_count, own_headers_len, own_estimate) = match &record.headers {
            HeadersView::Raw {
                count,
                written_len,
                estimate_bytes,
                ..
            } => (*count, *written_len, *estimate_bytes),
            HeadersView::Decoded(headers) => {
                let count = i32::try_from(headers.len())
                    .map_err(|_| corrupt("more headers than a record can count"))?;
                let written: usize = headers
                    .iter()
                    .map(|header| {
                        nullable_len(Some(header.key.as_bytes()))
                            + nullable_len(header.value.as_deref())
                    })
                    .sum();
                let estimate: usize = headers
                    .iter()
                    .map(|header| {
                        header.key.len()
                            + header.value.as_ref().map_or(0, |value| value.len())
                            + HEADER_OVERHEAD_BYTES
                    })
                    .sum();
                (count, written, estimate)
            }
        };
        let estimate = record.key.map_or(0, <[u8]>::len)
            + record.value.map_or(0, <[u8]>::len)
            + own_estimate
            + origin.estimate_bytes
            + offset_digits.len()
            + RECORD_OVERHEAD_BYTES;
        if self
            .open
            .as_ref()
            .is_some_and(|open| open.count > 0 && open.estimate_bytes + estimate > budget)
        {
            self.finish_batch()?;
        }
        let bytes = &mut self.bytes;
        let open = self.open.get_or_insert_with(|| {
            let start = bytes.len();
            bytes.put_bytes(0, BATCH_HEADER_LEN);
            OpenBatch {
                start,
                count: 0,
                base_timestamp: record.timestamp,
                max_timestamp: record.timestamp,
                estimate_bytes: 0,
            }
        });
        let header_count = header_count
            .checked_add(origin.count)
            .ok_or_else(|| corrupt("more headers than a record can count"))?;
        let offset_delta = open.count;
        let timestamp_delta = record.timestamp.wrapping_sub(open.base_timestamp);
        let body_len = 1
            + varlong_len(timestamp_delta)
            + varint_len(offset_delta)
            + nullable_len(record.key)
            + nullable_len(record.value)
            + varint_len(header_count)
            + own_headers_len
            + origin.prefix.len()
            + varint_len(offset_digits.len() as i32)
            + offset_digits.len();
        let body_len =
            i32::try_from(body_len).map_err(|_| corrupt("record longer than i32::MAX bytes"))?;
        bytes.reserve(body_len as usize + varint_len(body_len));
        put_varint(bytes, body_len);
        bytes.put_u8(0);
        put_varlong(bytes, timestamp_delta);
        put_varint(bytes, offset_delta);
        put_nullable(bytes, record.key);
        put_nullable(bytes, record.value);
        put_varint(bytes, header_count);
        match &record.headers {
            HeadersView::Raw {
                bytes: raw,
                canonical: true,
                ..
            } => bytes.put_slice(raw),
            HeadersView::Raw {
                count, bytes: raw, ..
            } => put_canonical_headers(bytes, *count, raw)?,
            HeadersView::Decoded(headers) => {
                for header in *headers {
                    put_string(bytes, header.key.as_bytes());
                    put_nullable(bytes, header.value.as_deref());
                }
            }
        }
        bytes.put_slice(&origin.prefix);
        put_string(bytes, offset_digits);
        open.count = open
            .count
            .checked_add(1)
            .ok_or_else(|| corrupt("more records than a batch can count"))?;
        open.max_timestamp = open.max_timestamp.max(record.timestamp);
        open.estimate_bytes += estimate;
        self.records += 1;
        self.last_offset = Some(record.offset);
        Ok(())
    }

    /// Writes the open batch's header and CRC, as `encode_batch` does for
    /// `BatchSpec::default()`. The leader epoch (outside the CRC) is left unset: the append
    /// stamps the partition leader's.
    fn finish_batch(&mut self) -> Result<(), StoreError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let batch = &mut self.bytes[open.start..];
        let batch_length = i32::try_from(batch.len() - LOG_OVERHEAD)
            .map_err(|_| corrupt("batch longer than i32::MAX bytes"))?;
        let mut header = BatchHeader {
            base_offset: 0,
            batch_length,
            partition_leader_epoch: -1,
            magic: MAGIC_V2,
            crc: 0,
            attributes: 0,
            last_offset_delta: open.count - 1,
            base_timestamp: open.base_timestamp,
            max_timestamp: open.max_timestamp,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            record_count: open.count,
        };
        header.write_to(batch);
        header.crc = compute_crc(batch);
        header.write_to(batch);
        Ok(())
    }
}

/// Re-encodes validated header bytes with minimal varints.
fn put_canonical_headers(out: &mut BytesMut, count: i32, raw: &[u8]) -> Result<(), StoreError> {
    let mut fields = Fields { rest: raw };
    for _ in 0..count {
        let key_len = fields.varint()?;
        let key = fields.take(key_len as usize)?;
        put_string(out, key);
        let value = fields.nullable()?;
        put_nullable(out, value);
    }
    Ok(())
}

fn nullable_len(bytes: Option<&[u8]>) -> usize {
    bytes.map_or(varint_len(NULL_LENGTH), |bytes| {
        varint_len(bytes.len() as i32) + bytes.len()
    })
}

fn put_string(out: &mut BytesMut, bytes: &[u8]) {
    put_varint(out, bytes.len() as i32);
    out.put_slice(bytes);
}

/// `value` in decimal, written at the end of `buf`.
fn decimal(mut value: u64, buf: &mut [u8; U64_DIGITS_MAX]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buf[at..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use silt_log::batch::{BatchSpec, Record, decode_batch, encode_batch};

    /// Where a batch's CRC is: after base offset, length, leader epoch and magic.
    const CRC_AT: usize = 17;

    /// Per core partition: its batch bytes, record count and last edge offset; then one more
    /// entry whose count is the duplicates skipped.
    type Flat = Vec<(Vec<u8>, u64, Option<u64>)>;

    /// The path `compose` replaces: decode every record, add the origin headers, and encode
    /// batches cut by the same size estimate. The reference for the equivalence test.
    fn compose_by_decoding(
        parts: &[(u64, &[u8])],
        stream: &StreamKey,
        partitions: u32,
        expected: impl Fn(usize) -> u64,
        limits: &DecodeLimits,
        budget: usize,
    ) -> Result<Flat, StoreError> {
        let mut routed: Vec<Vec<(u64, Record)>> = vec![Vec::new(); partitions as usize];
        let mut duplicates = 0u64;
        for &(first_offset, batches) in parts {
            let mut rest = batches;
            while !rest.is_empty() {
                let (header, records, used) = decode_batch(rest, limits)
                    .map_err(bad_batch)?
                    .ok_or_else(|| StoreError::BadBatch("cut short".into()))?;
                rest = &rest[used..];
                if header.is_control() {
                    continue;
                }
                for record in records {
                    let offset = u64::try_from(record.offset)
                        .map_err(|_| StoreError::BadBatch("negative".into()))?;
                    if offset < first_offset {
                        continue;
                    }
                    let partition =
                        route(record.key.as_deref(), &stream.edge_id, partitions) as usize;
                    let next = routed[partition]
                        .last()
                        .map_or_else(|| expected(partition), |(last, _)| last + 1);
                    if offset < next {
                        duplicates += 1;
                        continue;
                    }
                    let mut record = Record::from(record);
                    let header = |key: &str, value: String| Header {
                        key: key.to_string(),
                        value: Some(Bytes::from(value)),
                    };
                    record
                        .headers
                        .push(header(HEADER_EDGE, stream.edge_id.clone()));
                    if !stream.edge_log.is_empty() {
                        record
                            .headers
                            .push(header(HEADER_EDGE_LOG, stream.edge_log.clone()));
                    }
                    record.headers.extend([
                        header(HEADER_EDGE_PARTITION, stream.edge_partition.to_string()),
                        header(HEADER_EDGE_OFFSET, offset.to_string()),
                    ]);
                    routed[partition].push((offset, record));
                }
            }
        }
        let size = |record: &Record| {
            record.key.as_ref().map_or(0, Bytes::len)
                + record.value.as_ref().map_or(0, Bytes::len)
                + record
                    .headers
                    .iter()
                    .map(|header| {
                        header.key.len() + header.value.as_ref().map_or(0, Bytes::len) + 10
                    })
                    .sum::<usize>()
                + RECORD_OVERHEAD_BYTES
        };
        let mut out = Vec::new();
        for records in routed {
            let last = records.last().map(|(offset, _)| *offset);
            let count = records.len() as u64;
            let mut bytes = BytesMut::new();
            let mut chunk: Vec<Record> = Vec::new();
            let mut chunk_bytes = 0;
            for (_, record) in records {
                let record_bytes = size(&record);
                if !chunk.is_empty() && chunk_bytes + record_bytes > budget {
                    encode_batch(&BatchSpec::default(), &chunk, &mut bytes).unwrap();
                    chunk.clear();
                    chunk_bytes = 0;
                }
                chunk_bytes += record_bytes;
                chunk.push(record);
            }
            if !chunk.is_empty() {
                encode_batch(&BatchSpec::default(), &chunk, &mut bytes).unwrap();
            }
            out.push((bytes.to_vec(), count, last));
        }
        // The duplicate count is compared through the last element.
        out.push((Vec::new(), duplicates, None));
        Ok(out)
    }

    fn flatten(composed: Composed) -> Flat {
        let mut out: Vec<_> = composed
            .partitions
            .into_iter()
            .map(|partition| {
                (
                    partition.bytes.to_vec(),
                    partition.records,
                    partition.last_offset,
                )
            })
            .collect();
        out.push((Vec::new(), composed.duplicate_records, None));
        out
    }

    /// A small deterministic generator (xorshift64*), so a failure names its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }
        fn bytes(&mut self, max_len: u64) -> Bytes {
            let len = self.below(max_len + 1);
            (0..len)
                .map(|_| self.next() as u8)
                .collect::<Vec<u8>>()
                .into()
        }
        fn nullable(&mut self, max_len: u64) -> Option<Bytes> {
            (self.below(5) != 0).then(|| self.bytes(max_len))
        }
    }

    fn random_record(rng: &mut Rng) -> Record {
        let keys: [&[u8]; 4] = [b"a", b"sensor/1", b"", b"k\xff"];
        let key = match rng.below(4) {
            0 => None,
            1 => Some(rng.bytes(12)),
            _ => Some(Bytes::from_static(keys[rng.below(4) as usize])),
        };
        let timestamp = match rng.below(3) {
            0 => 1_700_000_000_000 + rng.below(10_000) as i64,
            1 => rng.next() as i64,
            _ => -(rng.below(1000) as i64),
        };
        let headers = (0..rng.below(4))
            .map(|index| Header {
                key: ["mqtt.topic", "", "h\u{e9}"][index as usize % 3].to_string(),
                value: rng.nullable(20),
            })
            .collect();
        Record {
            timestamp,
            key,
            value: match rng.below(6) {
                0 => None,
                1 => Some(rng.bytes(300)),
                _ => Some(rng.bytes(40)),
            },
            headers,
        }
    }

    /// Shipped parts: batches at increasing edge offsets (sometimes with gaps, zstd or
    /// `LogAppendTime`), cut into frames whose first offsets sometimes fall inside a batch.
    fn random_parts(rng: &mut Rng) -> Vec<(u64, Vec<u8>)> {
        let mut parts = Vec::new();
        let mut offset = rng.below(50);
        for _ in 0..1 + rng.below(3) {
            let first_offset = offset + rng.below(3);
            let mut bytes = BytesMut::new();
            for _ in 0..1 + rng.below(4) {
                let records: Vec<Record> =
                    (0..1 + rng.below(20)).map(|_| random_record(rng)).collect();
                let spec = BatchSpec {
                    base_offset: offset as i64,
                    compression: if rng.below(4) == 0 {
                        Compression::Zstd
                    } else {
                        Compression::None
                    },
                    timestamp_type: if rng.below(5) == 0 {
                        TimestampType::LogAppendTime
                    } else {
                        TimestampType::CreateTime
                    },
                    ..BatchSpec::default()
                };
                encode_batch(&spec, &records, &mut bytes).unwrap();
                offset += records.len() as u64 + rng.below(2);
            }
            parts.push((first_offset, bytes.to_vec()));
        }
        parts
    }

    /// Changes one byte of a batch's records (before compression, for a zstd batch) and
    /// fixes its length and CRC, so only the record-level checks can tell.
    fn corrupt_records(rng: &mut Rng, parts: &mut [(u64, Vec<u8>)]) {
        let (_, bytes) = &mut parts[rng.below(parts.len() as u64) as usize];
        let Ok(Some((mut header, len))) = check_batch(bytes, usize::MAX) else {
            return;
        };
        if len <= BATCH_HEADER_LEN {
            return;
        }
        match header.compression() {
            Ok(Compression::None) => {
                let at = BATCH_HEADER_LEN + rng.below((len - BATCH_HEADER_LEN) as u64) as usize;
                bytes[at] = rng.next() as u8;
            }
            Ok(Compression::Zstd) => {
                let mut section =
                    zstd::bulk::decompress(&bytes[BATCH_HEADER_LEN..len], 1 << 24).unwrap();
                let at = rng.below(section.len() as u64) as usize;
                section[at] = rng.next() as u8;
                let compressed = zstd::bulk::compress(&section, 1).unwrap();
                header.batch_length = (BATCH_HEADER_LEN - LOG_OVERHEAD + compressed.len()) as i32;
                bytes.splice(BATCH_HEADER_LEN..len, compressed);
            }
            _ => return,
        }
        let len = header.total_len();
        header.write_to(bytes);
        header.crc = compute_crc(&bytes[..len]);
        header.write_to(bytes);
    }

    #[test]
    fn splicing_matches_decoding_and_re_encoding() {
        let limits = DecodeLimits::default();
        for seed in 1..=3_000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut parts = random_parts(&mut rng);
            let corrupted = rng.below(4) == 0;
            if corrupted {
                corrupt_records(&mut rng, &mut parts);
            }
            let parts: Vec<(u64, &[u8])> = parts
                .iter()
                .map(|(first, bytes)| (*first, &bytes[..]))
                .collect();
            let stream = StreamKey {
                edge_id: ["e1", "edge-\u{e9}", ""][rng.below(3) as usize].to_string(),
                edge_log: ["", "0123456789abcdef"][rng.below(2) as usize].to_string(),
                edge_partition: [0, 7, u32::MAX][rng.below(3) as usize],
            };
            let partitions = 1 + rng.below(4) as u32;
            let expected_at: Vec<u64> = (0..partitions).map(|_| rng.below(60)).collect();
            let budget = [1, 300, 2_000, 1 << 20][rng.below(4) as usize];
            let run = |parts: &[Part<'_>]| {
                compose(
                    parts,
                    &stream,
                    partitions,
                    |p| expected_at[p],
                    &limits,
                    budget,
                )
                .map(flatten)
            };
            let as_shipped: Vec<Part<'_>> = parts
                .iter()
                .map(|&(first, bytes)| Part::shipped(first, bytes))
                .collect();
            let spliced = run(&as_shipped);
            let decoded = compose_by_decoding(
                &parts,
                &stream,
                partitions,
                |p| expected_at[p],
                &limits,
                budget,
            );
            // Decompressed as the stream reader does first, the same output or refusal.
            let shipped: Vec<Shipped> = parts
                .iter()
                .map(|(_, bytes)| decompress_shipped(Bytes::copy_from_slice(bytes), &limits))
                .collect();
            let shipped_parts: Vec<Part<'_>> = parts
                .iter()
                .zip(&shipped)
                .map(|((first, _), shipped)| Part {
                    first_offset: *first,
                    batches: &shipped.batches,
                    crc_checked: shipped.crc_checked,
                })
                .collect();
            let after_reader = run(&shipped_parts);
            assert_eq!(
                after_reader.as_ref().ok(),
                spliced.as_ref().ok(),
                "seed {seed}: decompressing first changed the output"
            );
            assert_eq!(after_reader.is_err(), spliced.is_err(), "seed {seed}");
            match (spliced, decoded) {
                (Ok(spliced), Ok(decoded)) => {
                    assert_eq!(spliced, decoded, "seed {seed}: different output");
                }
                (Err(_), Err(_)) => assert!(corrupted, "seed {seed}: valid input refused"),
                (spliced, decoded) => panic!(
                    "seed {seed}: splice {:?} but decode {:?}",
                    spliced.map(|_| "ok"),
                    decoded.map(|_| "ok")
                ),
            }
        }
    }

    #[test]
    fn shipped_zstd_batches_are_decompressed_and_others_kept_as_they_are() {
        let limits = DecodeLimits::default();
        let records: Vec<Record> = (0..50u8)
            .map(|n| Record {
                key: Some(Bytes::from(vec![b'k', n % 3])),
                value: Some(Bytes::from(format!(
                    "{{\"reading\":{n},\"pad\":\"{}\"}}",
                    "x".repeat(40)
                ))),
                ..Record::default()
            })
            .collect();
        let mut plain = BytesMut::new();
        let spec = |base_offset: i64, compression| BatchSpec {
            base_offset,
            compression,
            ..BatchSpec::default()
        };
        encode_batch(&spec(0, Compression::None), &records, &mut plain).unwrap();
        encode_batch(&spec(50, Compression::None), &records, &mut plain).unwrap();
        // Nothing compressed: the same bytes, not a copy, and left for compose to check.
        let shipped = Bytes::from(plain.to_vec());
        let kept = decompress_shipped(shipped.clone(), &limits);
        assert_eq!(kept.batches.as_ptr(), shipped.as_ptr());
        assert!(!kept.crc_checked);
        // One of two batches compressed: both come back uncompressed, byte for byte what
        // encoding them uncompressed gives but for the decompressed batch's CRC, left 0.
        let mut mixed = BytesMut::new();
        encode_batch(&spec(0, Compression::None), &records, &mut mixed).unwrap();
        encode_batch(&spec(50, Compression::Zstd), &records, &mut mixed).unwrap();
        assert!(mixed.len() < plain.len());
        let decompressed = decompress_shipped(mixed.freeze(), &limits);
        assert!(decompressed.crc_checked);
        let first_len = check_batch(&plain, limits.max_batch_bytes)
            .unwrap()
            .unwrap()
            .1;
        let (plain_first, plain_second) = plain.split_at(first_len);
        let (first, second) = decompressed.batches.split_at(first_len);
        assert_eq!(first, plain_first);
        assert_eq!(second[..CRC_AT], plain_second[..CRC_AT]);
        assert_eq!(second[CRC_AT..CRC_AT + 4], [0; 4]);
        assert_eq!(second[CRC_AT + 4..], plain_second[CRC_AT + 4..]);
        // A damaged batch is left for compose to refuse.
        let mut damaged = BytesMut::new();
        encode_batch(&spec(0, Compression::Zstd), &records, &mut damaged).unwrap();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        let damaged = damaged.freeze();
        let kept = decompress_shipped(damaged.clone(), &limits);
        assert_eq!((kept.batches, kept.crc_checked), (damaged.clone(), false));
        let stream = StreamKey {
            edge_id: "e1".into(),
            edge_log: "5e1f".into(),
            edge_partition: 0,
        };
        let result = compose(
            &[Part::shipped(0, &damaged)],
            &stream,
            1,
            |_| 0,
            &limits,
            1 << 20,
        );
        assert!(matches!(result, Err(StoreError::BadBatch(_))));
    }

    #[test]
    fn a_frame_of_small_zstd_batches_cannot_decompress_without_bound() {
        // 64 batches of one record of 512 KiB of zeros: each compresses to a few dozen
        // bytes and is within the batch limit uncompressed, together 32 MiB.
        let limits = DecodeLimits {
            max_batch_bytes: 1 << 20,
            max_decompressed_bytes: 4 << 20,
        };
        let mut shipped = BytesMut::new();
        for n in 0..64i64 {
            let record = Record {
                key: Some(Bytes::from_static(b"k")),
                value: Some(Bytes::from(vec![0u8; 512 << 10])),
                ..Record::default()
            };
            let spec = BatchSpec {
                base_offset: n,
                compression: Compression::Zstd,
                ..BatchSpec::default()
            };
            encode_batch(&spec, &[record], &mut shipped).unwrap();
        }
        assert!(shipped.len() < 64 << 10, "{} bytes shipped", shipped.len());
        let shipped = shipped.freeze();
        // The reader leaves it as it came...
        let kept = decompress_shipped(shipped.clone(), &limits);
        assert_eq!((kept.batches, kept.crc_checked), (shipped.clone(), false));
        // ...and compose refuses it once its output passes the bound.
        let stream = StreamKey {
            edge_id: "e1".into(),
            edge_log: "5e1f".into(),
            edge_partition: 0,
        };
        let result = compose(
            &[Part::shipped(0, &shipped)],
            &stream,
            1,
            |_| 0,
            &limits,
            1 << 20,
        );
        match result {
            Err(StoreError::BadBatch(message)) => {
                assert!(message.contains("more than 4194304 bytes"), "{message}");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| "output")),
        }
    }

    #[test]
    fn an_overlong_header_length_is_written_canonically() {
        // One record, key "k", value "v", one header ("h", "x") whose key length is written
        // in two varint bytes (0x82 0x00) instead of one (0x02), as no encoder writes but
        // the decoder accepts.
        let body: &[u8] = &[0, 0, 0, 2, b'k', 2, b'v', 2, 0x82, 0x00, b'h', 2, b'x'];
        let mut batch = vec![0u8; BATCH_HEADER_LEN];
        batch.push(body.len() as u8 * 2);
        batch.extend_from_slice(body);
        let mut header = BatchHeader {
            base_offset: 5,
            batch_length: (batch.len() - LOG_OVERHEAD) as i32,
            partition_leader_epoch: -1,
            magic: MAGIC_V2,
            crc: 0,
            attributes: 0,
            last_offset_delta: 0,
            base_timestamp: 42,
            max_timestamp: 42,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            record_count: 1,
        };
        header.write_to(&mut batch);
        header.crc = compute_crc(&batch);
        header.write_to(&mut batch);
        let stream = StreamKey {
            edge_id: "e1".into(),
            edge_log: "5e1f".into(),
            edge_partition: 0,
        };
        let parts = [(5, &batch[..])];
        let limits = DecodeLimits::default();
        let spliced = compose(
            &[Part::shipped(5, &batch)],
            &stream,
            1,
            |_| 0,
            &limits,
            1 << 20,
        );
        let spliced = flatten(spliced.unwrap());
        let decoded = compose_by_decoding(&parts, &stream, 1, |_| 0, &limits, 1 << 20).unwrap();
        assert_eq!(spliced, decoded);
        let (_, records, _) = decode_batch(&spliced[0].0, &limits).unwrap().unwrap();
        assert_eq!(records[0].headers[0].key, "h");
        assert_eq!(
            records[0].headers.len(),
            5,
            "its own and four origin headers"
        );
    }

    #[test]
    fn a_partition_output_is_reserved_once_for_its_records_and_origin_headers() {
        // Sensor-like records, all routed to one partition: the origin headers add more than
        // an eighth to the small ones, and the output must still fit what was reserved.
        let limits = DecodeLimits::default();
        let stream = StreamKey {
            edge_id: "greenhouse-pi-17".into(),
            edge_log: "0123456789abcdef".into(),
            edge_partition: 2,
        };
        for value_len in [0usize, 10, 100, 550, 4000] {
            let mut batches = BytesMut::new();
            for batch in 0..20i64 {
                let records: Vec<Record> = (0..50)
                    .map(|i| Record {
                        timestamp: 1_700_000_000_000 + i,
                        key: Some(Bytes::from(format!("sensors/bay-{}/temp", i % 7))),
                        value: Some(Bytes::from(vec![b'x'; value_len])),
                        headers: Vec::new(),
                    })
                    .collect();
                let spec = BatchSpec {
                    base_offset: 1_000_000 + batch * 50,
                    ..BatchSpec::default()
                };
                encode_batch(&spec, &records, &mut batches).unwrap();
            }
            let parts = [Part::shipped(1_000_000, &batches)];
            let origin = OriginHeaders::new(&stream);
            let reserved = reserve_bytes(&parts, &origin, batches.len(), usize::MAX, 1);
            let composed = compose(&parts, &stream, 1, |_| 0, &limits, 1 << 20).unwrap();
            let out = &composed.partitions[0];
            assert_eq!(out.records, 1_000);
            assert!(
                out.bytes.len() <= reserved && reserved <= out.bytes.len() * 5 / 4,
                "values of {value_len} bytes: {} bytes out, {reserved} reserved",
                out.bytes.len()
            );
        }
        // A record count no batch could hold is bounded by what the output may take.
        let mut batch = BytesMut::new();
        let record = Record {
            timestamp: 0,
            key: None,
            value: None,
            headers: Vec::new(),
        };
        encode_batch(&BatchSpec::default(), &[record], &mut batch).unwrap();
        batch[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        let parts = [Part::shipped(0, &batch)];
        let origin = OriginHeaders::new(&stream);
        assert!(reserve_bytes(&parts, &origin, batch.len(), 1 << 20, 1) <= (1 << 20) * 9 / 8);
    }
}
