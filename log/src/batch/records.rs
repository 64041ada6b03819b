//! The records inside a Kafka RecordBatch v2: encoding a batch from records, and opening one
//! back up into records with absolute offsets and timestamps.
//!
//! One record, after the batch header (or after decompressing the records section), is:
//!
//! | field | type |
//! |---|---|
//! | length (bytes after this field) | varint |
//! | attributes (unused, 0) | i8 |
//! | timestamp delta from the batch base timestamp | varlong |
//! | offset delta from the batch base offset | varint |
//! | key length (-1 for null), key | varint, bytes |
//! | value length (-1 for null), value | varint, bytes |
//! | header count | varint |
//! | per header: key length, key (UTF-8), value length (-1 for null), value | |
//!
//! The encoder writes exactly what Kafka's Java `MemoryRecordsBuilder` writes for the same
//! input: the base timestamp is the first record's, the max timestamp the largest, offset deltas
//! count from 0, and timestamp deltas use Java's wrapping `long` arithmetic.
//!
//! The decoder trusts nothing it reads. It checks the CRC first, bounds decompression by
//! [`DecodeLimits`], never sizes an allocation from a count it has not yet backed with bytes,
//! and requires every length, count and offset delta to agree with the bytes around it. It is
//! stricter than Kafka's Java reader in a few places where Java would accept bytes no encoder
//! writes (a null length other than -1, offset deltas out of order); those are corruption here.

use std::io::Read;
use std::iter::FusedIterator;

use bytes::{BufMut, Bytes, BytesMut};

use super::header::COMPRESSION_MASK;
use super::varint::{put_varint, put_varlong, read_varint, read_varlong, varint_len, varlong_len};
use super::{
    BATCH_HEADER_LEN, BatchError, BatchHeader, Compression, LOG_OVERHEAD, MAGIC_V2, TimestampType,
    attributes, check_batch, compute_crc,
};

/// Default [`DecodeLimits::max_batch_bytes`]: Kafka's default `message.max.bytes` (1 MiB) plus
/// the 12-byte log overhead.
pub const DECODE_MAX_BATCH_BYTES_DEFAULT: usize = (1 << 20) + LOG_OVERHEAD;
/// Default [`DecodeLimits::max_decompressed_bytes`]: 64 MiB.
pub const DECODE_MAX_DECOMPRESSED_BYTES_DEFAULT: usize = 64 << 20;
/// The zstd level the encoder uses; Kafka's default `compression.zstd.level`.
pub const ZSTD_LEVEL: i32 = 3;

/// Smallest record on the wire: length, attributes, timestamp delta, offset delta, key length,
/// value length and header count, one byte each.
const RECORD_BYTES_MIN: usize = 7;
/// Smallest record header on the wire: key length and value length, one byte each.
const HEADER_BYTES_MIN: usize = 2;
/// Length written for a null key, value or header value.
const NULL_LENGTH: i32 = -1;
/// The transactional bit of the batch attributes (Kafka's `TRANSACTIONAL_FLAG_MASK`).
const TRANSACTIONAL_ATTRIBUTE: i16 = 0x10;
/// Bounds on the zstd window the decoder accepts, as powers of two. The lower bound is the
/// window of zstd levels up to 19 (8 MiB); the upper bound is zstd's own default limit, which
/// Kafka's brokers and clients also use.
const ZSTD_WINDOW_LOG_MIN: u32 = 23;
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Bytes decompressed per step: zstd's own block size.
const ZSTD_CHUNK_BYTES: usize = 128 << 10;

/// One record header. Kafka header keys are strings; values are bytes or null.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// Header name; Kafka allows repeated names, and their order is kept.
    pub key: String,
    /// Header value; `None` is Kafka's null, distinct from an empty value.
    pub value: Option<Bytes>,
}

/// A record to encode. Each takes the next offset of the batch, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Record {
    /// Milliseconds since the Unix epoch, or any `i64` the producer chose.
    pub timestamp: i64,
    /// `None` is Kafka's null key, distinct from an empty key.
    pub key: Option<Bytes>,
    /// `None` is Kafka's null value (a tombstone), distinct from an empty value.
    pub value: Option<Bytes>,
    /// Headers in the order they are written.
    pub headers: Vec<Header>,
}

/// A record read back from a batch, with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecodedRecord {
    /// Base offset of the batch plus the record's offset delta.
    pub offset: i64,
    /// Base timestamp plus the record's delta, or the batch max timestamp when the batch
    /// carries `LogAppendTime` (Kafka's rule).
    pub timestamp: i64,
    /// `None` is Kafka's null key.
    pub key: Option<Bytes>,
    /// `None` is Kafka's null value.
    pub value: Option<Bytes>,
    /// Headers in the order they were written.
    pub headers: Vec<Header>,
}

impl From<DecodedRecord> for Record {
    fn from(record: DecodedRecord) -> Self {
        Record {
            timestamp: record.timestamp,
            key: record.key,
            value: record.value,
            headers: record.headers,
        }
    }
}

/// The batch-level fields of a batch to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchSpec {
    /// Offset of the first record. Producers send 0; the log rewrites it on append.
    pub base_offset: i64,
    /// Producers send -1; the log rewrites it on append.
    pub partition_leader_epoch: i32,
    /// `None` or `Zstd`; the encoder refuses the others.
    pub compression: Compression,
    /// Written to the attributes. With `LogAppendTime`, readers see every record at the
    /// batch max timestamp.
    pub timestamp_type: TimestampType,
    /// -1 when the producer is not idempotent.
    pub producer_id: i64,
    /// -1 when the producer is not idempotent.
    pub producer_epoch: i16,
    /// Sequence number of the first record, -1 when the producer is not idempotent.
    pub base_sequence: i32,
    /// Sets the transactional bit of the attributes.
    pub is_transactional: bool,
}

impl Default for BatchSpec {
    /// What a plain (non-idempotent) Kafka producer sends.
    fn default() -> Self {
        BatchSpec {
            base_offset: 0,
            partition_leader_epoch: -1,
            compression: Compression::None,
            timestamp_type: TimestampType::CreateTime,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            is_transactional: false,
        }
    }
}

impl BatchSpec {
    /// The spec that re-encodes a decoded batch with the same batch-level fields.
    pub fn from_header(header: &BatchHeader) -> Result<BatchSpec, BatchError> {
        Ok(BatchSpec {
            base_offset: header.base_offset,
            partition_leader_epoch: header.partition_leader_epoch,
            compression: header.compression()?,
            timestamp_type: header.timestamp_type(),
            producer_id: header.producer_id,
            producer_epoch: header.producer_epoch,
            base_sequence: header.base_sequence,
            is_transactional: header.is_transactional(),
        })
    }
}

/// Bounds on what decoding may read and allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeLimits {
    /// Largest whole batch, header included, that is accepted.
    pub max_batch_bytes: usize,
    /// Largest records section after decompression. Also bounds the zstd window: a frame
    /// that declares a window above this (rounded up to a power of two, and at least 8 MiB) is
    /// refused.
    pub max_decompressed_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_batch_bytes: DECODE_MAX_BATCH_BYTES_DEFAULT,
            max_decompressed_bytes: DECODE_MAX_DECOMPRESSED_BYTES_DEFAULT,
        }
    }
}

/// Appends one complete batch holding `records` to `out` and returns its length in bytes.
///
/// Records take offsets `spec.base_offset` onwards, in order. Fails with
/// [`BatchError::InvalidInput`] for an empty `records`, for lengths or counts that do not fit
/// Kafka's `i32` fields, or when the last offset would overflow; with
/// [`BatchError::UnsupportedCompression`] for anything but `None` and `Zstd`. On error `out` is
/// left as it was.
pub fn encode_batch(
    spec: &BatchSpec,
    records: &[Record],
    out: &mut BytesMut,
) -> Result<usize, BatchError> {
    if records.is_empty() {
        return Err(BatchError::InvalidInput(
            "a batch needs at least one record",
        ));
    }
    let mut encoder = BatchEncoder::begin(spec, out)?;
    for record in records {
        if let Err(error) = encoder.push(out, record.borrowed()) {
            encoder.abandon(out);
            return Err(error);
        }
    }
    encoder.finish(out)
}

/// [`encode_batch`] for a zstd batch whose records section `compress` compresses, with a
/// context (and level) the caller keeps across batches rather than one made per batch.
/// `compress` returns `None` when the records do not shrink: the batch is then written
/// uncompressed, attributes included, as a producer may. `spec.compression` is ignored.
pub fn encode_batch_compressed(
    spec: &BatchSpec,
    records: &[Record],
    out: &mut BytesMut,
    compress: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
) -> Result<usize, BatchError> {
    if records.is_empty() {
        return Err(BatchError::InvalidInput(
            "a batch needs at least one record",
        ));
    }
    let spec = BatchSpec {
        compression: Compression::Zstd,
        ..*spec
    };
    let mut encoder = BatchEncoder::begin(&spec, out)?;
    for record in records {
        if let Err(error) = encoder.push(out, record.borrowed()) {
            encoder.abandon(out);
            return Err(error);
        }
    }
    encoder.finish_with(out, compress)
}

/// A record to encode, borrowed from wherever the caller keeps it: what
/// [`BatchEncoder::push`] takes, so records held in another shape (the archive's Arrow
/// columns) are encoded without building a [`Record`] each.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a, H> {
    /// Milliseconds since the Unix epoch, or any `i64` the producer chose.
    pub timestamp: i64,
    /// `None` is Kafka's null key.
    pub key: Option<&'a [u8]>,
    /// `None` is Kafka's null value.
    pub value: Option<&'a [u8]>,
    /// The headers' (key, value) pairs in order; keys are UTF-8. Iterated twice: once to size
    /// the record, once to write it.
    pub headers: H,
}

impl Record {
    /// This record, borrowed, for [`BatchEncoder::push`].
    pub fn borrowed(&self) -> RecordRef<'_, impl Iterator<Item = (&[u8], Option<&[u8]>)> + Clone> {
        RecordRef {
            timestamp: self.timestamp,
            key: self.key.as_deref(),
            value: self.value.as_deref(),
            headers: self
                .headers
                .iter()
                .map(|header| (header.key.as_bytes(), header.value.as_deref())),
        }
    }
}

/// Encodes one batch record by record, straight into the caller's buffer: the header's place
/// is reserved at [`BatchEncoder::begin`], each [`BatchEncoder::push`] appends a record (to a
/// side buffer when the batch is compressed), and [`BatchEncoder::finish`] writes the header and
/// the CRC. What it writes is exactly what [`encode_batch`] writes for the same records.
///
/// The buffer must not be touched between `begin` and `finish` except through the encoder. A
/// failed `push` writes nothing; an encoder given up on is [`BatchEncoder::abandon`]ed, which
/// takes the reserved header back out of the buffer.
#[derive(Debug)]
pub struct BatchEncoder {
    spec: BatchSpec,
    /// Where the batch starts in the buffer.
    start: usize,
    /// The uncompressed records section of a compressed batch.
    section: Option<BytesMut>,
    record_count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
}

impl BatchEncoder {
    /// Starts a batch at the end of `out`. Fails with [`BatchError::UnsupportedCompression`]
    /// for anything but `None` and `Zstd`, leaving `out` as it was.
    pub fn begin(spec: &BatchSpec, out: &mut BytesMut) -> Result<BatchEncoder, BatchError> {
        let section = match spec.compression {
            Compression::None => None,
            Compression::Zstd => Some(BytesMut::new()),
            other => return Err(BatchError::UnsupportedCompression(other)),
        };
        let start = out.len();
        out.put_bytes(0, BATCH_HEADER_LEN);
        Ok(BatchEncoder {
            spec: *spec,
            start,
            section,
            record_count: 0,
            base_timestamp: 0,
            max_timestamp: 0,
        })
    }

    /// Records pushed so far.
    pub fn records(&self) -> usize {
        self.record_count as usize
    }

    /// Bytes of records held back for compression at [`BatchEncoder::finish`] (0 for an
    /// uncompressed batch, whose records are in the buffer already).
    pub fn held_bytes(&self) -> usize {
        self.section.as_ref().map_or(0, BytesMut::len)
    }

    /// Appends `record` at the batch's next offset. Fails with [`BatchError::InvalidInput`],
    /// writing nothing, for lengths or counts that do not fit Kafka's `i32` fields or an offset
    /// past `i64::MAX`.
    pub fn push<'a, H>(
        &mut self,
        out: &mut BytesMut,
        record: RecordRef<'a, H>,
    ) -> Result<(), BatchError>
    where
        H: Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    {
        let offset_delta = self.record_count;
        if offset_delta == i32::MAX {
            return Err(BatchError::InvalidInput(
                "more records than a batch can count",
            ));
        }
        if self
            .spec
            .base_offset
            .checked_add(i64::from(offset_delta))
            .is_none()
        {
            return Err(BatchError::InvalidInput(
                "last offset of the batch overflows i64",
            ));
        }
        let base_timestamp = if offset_delta == 0 {
            record.timestamp
        } else {
            self.base_timestamp
        };
        // Java computes the delta in wrapping `long` arithmetic and readers add it back the
        // same way, so every pair of timestamps round-trips.
        let timestamp_delta = record.timestamp.wrapping_sub(base_timestamp);
        let target = self.section.as_mut().unwrap_or(out);
        put_record(target, &record, timestamp_delta, offset_delta)?;
        if offset_delta == 0 {
            self.base_timestamp = record.timestamp;
            self.max_timestamp = record.timestamp;
        } else {
            self.max_timestamp = self.max_timestamp.max(record.timestamp);
        }
        self.record_count += 1;
        Ok(())
    }

    /// Completes the batch: compresses its records when the spec says so, writes the header
    /// and the CRC, and returns the batch's length in bytes. Fails with
    /// [`BatchError::InvalidInput`] for a batch without records or longer than `i32::MAX`
    /// bytes, taking the batch back out of `out`.
    pub fn finish(self, out: &mut BytesMut) -> Result<usize, BatchError> {
        self.finish_with(out, |section| {
            // Compressing an in-memory buffer at a valid level fails only when allocation
            // fails, which aborts before this could see it.
            Some(
                zstd::bulk::compress(section, ZSTD_LEVEL)
                    .expect("zstd compression of an in-memory buffer cannot fail"),
            )
        })
    }

    /// [`BatchEncoder::finish`] with the records of a compressed batch compressed by
    /// `compress` (not called for an uncompressed batch). When it returns `None` the records
    /// are written uncompressed and the attributes say so.
    pub fn finish_with(
        self,
        out: &mut BytesMut,
        compress: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Result<usize, BatchError> {
        if self.record_count == 0 {
            self.abandon(out);
            return Err(BatchError::InvalidInput(
                "a batch needs at least one record",
            ));
        }
        let mut compression = self.spec.compression;
        if let Some(section) = &self.section {
            match compress(section) {
                Some(compressed) => out.extend_from_slice(&compressed),
                None => {
                    out.extend_from_slice(section);
                    compression = Compression::None;
                }
            }
        }
        let total_len = out.len() - self.start;
        let Ok(batch_length) = i32::try_from(total_len - LOG_OVERHEAD) else {
            self.abandon(out);
            return Err(BatchError::InvalidInput("batch longer than i32::MAX bytes"));
        };
        let mut attribute_bits = attributes(compression, self.spec.timestamp_type);
        if self.spec.is_transactional {
            attribute_bits |= TRANSACTIONAL_ATTRIBUTE;
        }
        let mut header = BatchHeader {
            base_offset: self.spec.base_offset,
            batch_length,
            partition_leader_epoch: self.spec.partition_leader_epoch,
            magic: MAGIC_V2,
            crc: 0,
            attributes: attribute_bits,
            last_offset_delta: self.record_count - 1,
            base_timestamp: self.base_timestamp,
            max_timestamp: self.max_timestamp,
            producer_id: self.spec.producer_id,
            producer_epoch: self.spec.producer_epoch,
            base_sequence: self.spec.base_sequence,
            record_count: self.record_count,
        };
        let batch = &mut out[self.start..];
        header.write_to(batch);
        // The CRC covers the attributes onwards, which are now final.
        header.crc = compute_crc(batch);
        header.write_to(batch);
        Ok(total_len)
    }

    /// Gives the batch up: `out` is left as it was before [`BatchEncoder::begin`].
    pub fn abandon(self, out: &mut BytesMut) {
        out.truncate(self.start);
    }
}

/// Validates and decodes the batch at the front of `buf`.
///
/// Returns `Ok(None)` when the batch is not all there yet (a partial frame is normal), else
/// the header, the records, and the bytes the batch takes in `buf`. Checks the header, the
/// length against `limits`, and the CRC (see [`check_batch`]) before opening the records.
///
/// Control batches decode like any other: their records are Kafka's control records (see
/// [`BatchHeader::is_control`]). Gzip, Snappy and Lz4 batches are valid to store but fail here
/// with [`BatchError::UnsupportedCompression`].
pub fn decode_batch(
    buf: &[u8],
    limits: &DecodeLimits,
) -> Result<Option<(BatchHeader, Vec<DecodedRecord>, usize)>, BatchError> {
    let Some((header, total_len)) = check_batch(buf, limits.max_batch_bytes)? else {
        return Ok(None);
    };
    let records = decode_records(&header, &buf[..total_len], limits)?;
    Ok(Some((header, records, total_len)))
}

/// Decodes the records of `batch`, the complete bytes of the batch `header` was parsed from.
///
/// Does not check the CRC: call [`check_batch`] first, or use [`decode_batch`], which does.
pub fn decode_records(
    header: &BatchHeader,
    batch: &[u8],
    limits: &DecodeLimits,
) -> Result<Vec<DecodedRecord>, BatchError> {
    let section = records_section(header, batch)?;
    match header.compression()? {
        Compression::None => parse_records(header, section),
        Compression::Zstd => {
            let mut decompressed = Vec::new();
            zstd_decompress(section, limits.max_decompressed_bytes, &mut decompressed)?;
            parse_records(header, &decompressed)
        }
        other => Err(BatchError::UnsupportedCompression(other)),
    }
}

/// The records section of `batch`, the complete bytes of the batch `header` was parsed from.
fn records_section<'a>(header: &BatchHeader, batch: &'a [u8]) -> Result<&'a [u8], BatchError> {
    // Not `header.total_len()`: a header built by hand may carry a negative length.
    let declared_len = usize::try_from(header.batch_length)
        .ok()
        .and_then(|len| len.checked_add(LOG_OVERHEAD));
    if batch.len() < BATCH_HEADER_LEN || Some(batch.len()) != declared_len {
        return Err(BatchError::Corrupt(
            "batch bytes do not match the header length",
        ));
    }
    Ok(&batch[BATCH_HEADER_LEN..])
}

/// What [`decompress_batch`] writes in the CRC field of the batch it makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchCrc {
    /// The CRC of the new bytes: a batch like any other.
    Compute,
    /// Zero, saving a pass over the records, for a caller that walks the batch itself right
    /// away with [`check_batch_framing`](super::check_batch_framing) (the compressed batch's
    /// CRC covered the same records). [`check_batch`] refuses such a batch.
    Skip,
}

/// Appends to `out` the zstd batch `batch` (complete, its CRC checked by the caller) with its
/// records decompressed: the batch a producer that did not compress would have sent, every
/// field kept but the compression bits, the length and the CRC (`crc`). The records are
/// decompressed straight into `out`, with no copy on the way. Bounded as [`decode_records`];
/// fails as [`decompress_records`] does, and with [`BatchError::InvalidInput`] when the result
/// would be longer than `i32::MAX` bytes, leaving `out` as it was. Returns the appended
/// batch's length.
pub fn decompress_batch(
    header: &BatchHeader,
    batch: &[u8],
    limits: &DecodeLimits,
    out: &mut Vec<u8>,
    crc: BatchCrc,
) -> Result<usize, BatchError> {
    let section = records_section(header, batch)?;
    match header.compression()? {
        Compression::Zstd => {}
        other => return Err(BatchError::UnsupportedCompression(other)),
    }
    let start = out.len();
    out.resize(start + BATCH_HEADER_LEN, 0);
    let decompressed = zstd_decompress(section, limits.max_decompressed_bytes, out);
    let total_len = out.len() - start;
    let batch_length = decompressed.and_then(|()| {
        i32::try_from(total_len - LOG_OVERHEAD)
            .map_err(|_| BatchError::InvalidInput("batch longer than i32::MAX bytes"))
    });
    let batch_length = match batch_length {
        Ok(length) => length,
        Err(error) => {
            out.truncate(start);
            return Err(error);
        }
    };
    let mut plain = *header;
    plain.batch_length = batch_length;
    plain.attributes = header.attributes & !COMPRESSION_MASK;
    plain.crc = 0;
    let written = &mut out[start..];
    plain.write_to(written);
    if crc == BatchCrc::Compute {
        plain.crc = compute_crc(written);
        plain.write_to(written);
    }
    Ok(total_len)
}

/// Bytes the records of the batch at the front of `buf` take uncompressed, as far as its
/// header and compression say: a zstd frame's stated content size (at most
/// `stored_ratio_max` times the stored section, so a false claim cannot size a buffer far
/// beyond what the records could hold), else the stored section. Also the batch's total
/// length, to step to the next. `None` for a header that does not parse or a batch cut short.
/// A hint for sizing buffers: nothing is checked, not even the CRC.
pub fn records_len_hint(buf: &[u8], stored_ratio_max: usize) -> Option<(usize, usize)> {
    let header = BatchHeader::parse(buf).ok()??;
    let total_len = header.total_len();
    let section = buf.get(BATCH_HEADER_LEN..total_len)?;
    let records = match header.compression() {
        Ok(Compression::Zstd) => match zstd::zstd_safe::get_frame_content_size(section) {
            Ok(Some(content)) => usize::try_from(content)
                .unwrap_or(usize::MAX)
                .min(section.len().saturating_mul(stored_ratio_max)),
            _ => section.len(),
        },
        _ => section.len(),
    };
    Some((records, total_len))
}

/// The records section of the zstd batch `batch` (the complete bytes of the batch `header`
/// was parsed from), decompressed into `out` (cleared first, its allocation reused) with
/// [`decode_records`]' bounds, for callers that walk the records themselves. Fails with
/// [`BatchError::UnsupportedCompression`] for any other compression. Does not check the CRC.
pub fn decompress_records(
    header: &BatchHeader,
    batch: &[u8],
    limits: &DecodeLimits,
    out: &mut Vec<u8>,
) -> Result<(), BatchError> {
    out.clear();
    let section = records_section(header, batch)?;
    match header.compression()? {
        Compression::Zstd => zstd_decompress(section, limits.max_decompressed_bytes, out),
        other => Err(BatchError::UnsupportedCompression(other)),
    }
}

/// Iterates over the validated batches in `buf`, a run of concatenated batches such as a
/// segment file or a Fetch response.
///
/// Each item is a checked header (CRC included) and the batch's bytes. Iteration ends at the
/// end of `buf` or at a trailing partial batch, which callers treat as the end; it yields an
/// error once, for the first batch that fails its checks, and then ends.
/// [`Batches::position`] tells where the valid prefix ends.
pub fn batches(buf: &[u8], max_batch_bytes: usize) -> Batches<'_> {
    Batches {
        buf,
        position: 0,
        max_batch_bytes,
        done: false,
    }
}

/// Iterator returned by [`batches`].
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    buf: &'a [u8],
    position: usize,
    max_batch_bytes: usize,
    done: bool,
}

impl<'a> Batches<'a> {
    /// Bytes taken by the batches yielded so far: where the next batch starts, and after an
    /// error or a partial batch, where the valid prefix of the buffer ends.
    pub fn position(&self) -> usize {
        self.position
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = &self.buf[self.position..];
        match check_batch(rest, self.max_batch_bytes) {
            Ok(Some((header, total_len))) => {
                self.position += total_len;
                Some(Ok((header, &rest[..total_len])))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(error) => {
                self.done = true;
                Some(Err(error))
            }
        }
    }
}

impl FusedIterator for Batches<'_> {}

/// Appends one record, its length first; writes nothing when a length or count does not fit.
fn put_record<'a, H>(
    out: &mut BytesMut,
    record: &RecordRef<'a, H>,
    timestamp_delta: i64,
    offset_delta: i32,
) -> Result<(), BatchError>
where
    H: Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
{
    let (body_len, header_count) = record_body_len(record, timestamp_delta, offset_delta)?;
    // Lengths and counts were checked against i32 by `record_body_len`.
    out.reserve(varint_len(body_len) + body_len as usize);
    put_varint(out, body_len);
    out.put_u8(0);
    put_varlong(out, timestamp_delta);
    put_varint(out, offset_delta);
    put_nullable(out, record.key);
    put_nullable(out, record.value);
    put_varint(out, header_count);
    for (key, value) in record.headers.clone() {
        put_varint(out, key.len() as i32);
        out.put_slice(key);
        put_nullable(out, value);
    }
    Ok(())
}

/// Bytes of the record after its length field, and its header count, checking every length
/// and count fits `i32`.
fn record_body_len<'a, H>(
    record: &RecordRef<'a, H>,
    timestamp_delta: i64,
    offset_delta: i32,
) -> Result<(i32, i32), BatchError>
where
    H: Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
{
    // Saturating sums: on a 32-bit target two large fields could overflow `usize`.
    let mut len = 1 + varlong_len(timestamp_delta) + varint_len(offset_delta);
    len = len.saturating_add(nullable_len(
        record.key,
        "record key longer than i32::MAX bytes",
    )?);
    len = len.saturating_add(nullable_len(
        record.value,
        "record value longer than i32::MAX bytes",
    )?);
    let mut header_count = 0usize;
    for (key, value) in record.headers.clone() {
        header_count += 1;
        len = len.saturating_add(nullable_len(
            Some(key),
            "header key longer than i32::MAX bytes",
        )?);
        len = len.saturating_add(nullable_len(
            value,
            "header value longer than i32::MAX bytes",
        )?);
    }
    let header_count = i32::try_from(header_count)
        .map_err(|_| BatchError::InvalidInput("more headers than a record can count"))?;
    len = len.saturating_add(varint_len(header_count));
    let len = i32::try_from(len)
        .map_err(|_| BatchError::InvalidInput("record longer than i32::MAX bytes"))?;
    Ok((len, header_count))
}

fn nullable_len(bytes: Option<&[u8]>, too_long: &'static str) -> Result<usize, BatchError> {
    match bytes {
        None => Ok(varint_len(NULL_LENGTH)),
        Some(bytes) => {
            let len = i32::try_from(bytes.len()).map_err(|_| BatchError::InvalidInput(too_long))?;
            Ok(varint_len(len) + bytes.len())
        }
    }
}

/// Writes a record's nullable field (key, value, header value): its length as a varint, -1
/// for null, then its bytes. The caller has checked the length fits an `i32`.
pub fn put_nullable(out: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varint(out, NULL_LENGTH),
        Some(bytes) => {
            // Checked against i32 by the caller (`record_body_len` here).
            put_varint(out, bytes.len() as i32);
            out.put_slice(bytes);
        }
    }
}

/// Decompresses a zstd records section onto the end of `decompressed`, refusing more than
/// `max_bytes` of output, so a small hostile batch cannot make the decoder allocate much: the
/// buffer never grows by more than `max_bytes`. On failure `decompressed` is as it was.
///
/// The zstd window is bounded too: by `max_bytes` rounded up to a power of two, but never
/// below 8 MiB, the window Kafka producers use up to level 19, so a decoder with small limits
/// still reads their batches.
fn zstd_decompress(
    compressed: &[u8],
    max_bytes: usize,
    decompressed: &mut Vec<u8>,
) -> Result<(), BatchError> {
    let start = decompressed.len();
    let result = zstd_decompress_append(compressed, max_bytes, decompressed);
    if result.is_err() {
        decompressed.truncate(start);
    }
    result
}

/// [`zstd_decompress`]'s work: appends to `decompressed`, which may hold part of the output on
/// failure.
fn zstd_decompress_append(
    compressed: &[u8],
    max_bytes: usize,
    decompressed: &mut Vec<u8>,
) -> Result<(), BatchError> {
    const INVALID: BatchError =
        BatchError::Corrupt("zstd records are invalid or need a window above the limit");
    let too_large = || BatchError::DecompressedTooLarge { max: max_bytes };
    if compressed.is_empty() {
        return Ok(());
    }
    let start = decompressed.len();
    let window_log = max_bytes
        .checked_next_power_of_two()
        .map_or(usize::BITS, usize::trailing_zeros)
        .clamp(ZSTD_WINDOW_LOG_MIN, ZSTD_WINDOW_LOG_MAX);
    // A frame that states its size up front is refused before any work, or gets room for
    // exactly that size, filled in one call with a context the thread keeps. Whatever that
    // call cannot do (frames that follow, a size that lies) is left to the streaming decoder
    // below, which decides.
    if let Ok(Some(content_bytes)) = zstd::zstd_safe::get_frame_content_size(compressed) {
        let content_bytes = usize::try_from(content_bytes).map_err(|_| too_large())?;
        if content_bytes > max_bytes {
            return Err(too_large());
        }
        decompressed.reserve_exact(content_bytes);
        if decompress_at_once(compressed, window_log, decompressed) == Some(content_bytes) {
            return Ok(());
        }
        decompressed.truncate(start);
    }
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(|_| INVALID)?;
    decoder.window_log_max(window_log).map_err(|_| INVALID)?;
    let mut chunk = vec![0u8; ZSTD_CHUNK_BYTES];
    loop {
        let read = match decoder.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(INVALID),
        };
        let len = decompressed.len() - start;
        if read > max_bytes - len {
            return Err(too_large());
        }
        if decompressed.capacity() - decompressed.len() < read {
            // Double as usual, but never past the limit; `len + read <= max_bytes` here.
            let target = (decompressed.capacity() - start)
                .saturating_mul(2)
                .clamp(len + read, max_bytes);
            decompressed.reserve_exact(target - len);
        }
        decompressed.extend_from_slice(&chunk[..read]);
    }
}

thread_local! {
    /// One zstd decompression context per thread, kept across batches: making a context and
    /// a streaming buffer for each batch cost more than decompressing a batch of tens of KiB.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `compressed` into the spare capacity of `out` (after what it holds) in one
/// call, with the same window bound as the streaming decoder; the bytes written, or `None`
/// on any failure.
fn decompress_at_once(compressed: &[u8], window_log: u32, out: &mut Vec<u8>) -> Option<usize> {
    DECOMPRESSOR.with(|cell| {
        let mut context = cell.try_borrow_mut().ok()?;
        if context.is_none() {
            *context = zstd::bulk::Decompressor::new().ok();
        }
        let context = context.as_mut()?;
        context
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(window_log))
            .ok()?;
        let start = out.len() as u64;
        let mut spare = std::io::Cursor::new(out);
        spare.set_position(start);
        context.decompress_to_buffer(compressed, &mut spare).ok()
    })
}

/// Parses the uncompressed records section of the batch `header` describes.
fn parse_records(header: &BatchHeader, section: &[u8]) -> Result<Vec<DecodedRecord>, BatchError> {
    let record_count = usize::try_from(header.record_count)
        .map_err(|_| BatchError::Corrupt("negative record count"))?;
    // The count is only a claim until the bytes back it: allocate for what they can hold.
    let mut records = Vec::with_capacity(record_count.min(section.len() / RECORD_BYTES_MIN));
    let mut rest = section;
    let mut previous_offset_delta = None;
    for _ in 0..record_count {
        let (raw, consumed) = parse_record(rest)?;
        rest = &rest[consumed..];
        let in_order = previous_offset_delta.is_none_or(|previous| raw.offset_delta > previous);
        if raw.offset_delta < 0 || raw.offset_delta > header.last_offset_delta || !in_order {
            return Err(BatchError::Corrupt(
                "record offset delta out of order or range",
            ));
        }
        previous_offset_delta = Some(raw.offset_delta);
        let offset = header
            .base_offset
            .checked_add(i64::from(raw.offset_delta))
            .ok_or(BatchError::Corrupt("record offset overflows i64"))?;
        let timestamp = match header.timestamp_type() {
            TimestampType::LogAppendTime => header.max_timestamp,
            TimestampType::CreateTime => header.base_timestamp.wrapping_add(raw.timestamp_delta),
        };
        records.push(DecodedRecord {
            offset,
            timestamp,
            key: raw.key,
            value: raw.value,
            headers: raw.headers,
        });
    }
    if !rest.is_empty() {
        return Err(BatchError::Corrupt("bytes left after the last record"));
    }
    Ok(records)
}

/// A record as stored, before the batch's base offset and timestamp are applied.
struct RawRecord {
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Vec<Header>,
}

/// Parses the record at the front of `buf`, returning it and the bytes it took.
fn parse_record(buf: &[u8]) -> Result<(RawRecord, usize), BatchError> {
    if buf.is_empty() {
        return Err(BatchError::Corrupt("fewer records than the record count"));
    }
    let (body_len, len_bytes) = read_varint(buf)?;
    let body_len =
        usize::try_from(body_len).map_err(|_| BatchError::Corrupt("negative record length"))?;
    let body = len_bytes
        .checked_add(body_len)
        .and_then(|end| buf.get(len_bytes..end))
        .ok_or(BatchError::Corrupt(
            "record length runs past the end of the batch",
        ))?;

    let mut reader = FieldReader { rest: body };
    // Record attributes are unused in v2; Kafka ignores them on read, and so do we.
    reader.take(1)?;
    let timestamp_delta = reader.varlong()?;
    let offset_delta = reader.varint()?;
    let key = reader.nullable_bytes()?;
    let value = reader.nullable_bytes()?;
    let header_count = usize::try_from(reader.varint()?)
        .map_err(|_| BatchError::Corrupt("negative record header count"))?;
    let mut headers = Vec::with_capacity(header_count.min(reader.rest.len() / HEADER_BYTES_MIN));
    for _ in 0..header_count {
        let key_len = usize::try_from(reader.varint()?)
            .map_err(|_| BatchError::Corrupt("negative record header key length"))?;
        let key = std::str::from_utf8(reader.take(key_len)?)
            .map_err(|_| BatchError::Corrupt("record header key is not UTF-8"))?
            .to_owned();
        let value = reader.nullable_bytes()?;
        headers.push(Header { key, value });
    }
    if !reader.rest.is_empty() {
        return Err(BatchError::Corrupt(
            "record length does not match its fields",
        ));
    }
    let record = RawRecord {
        timestamp_delta,
        offset_delta,
        key,
        value,
        headers,
    };
    Ok((record, len_bytes + body_len))
}

/// Reads the fields of one record body; running off its end is corruption.
struct FieldReader<'a> {
    rest: &'a [u8],
}

impl<'a> FieldReader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], BatchError> {
        if len > self.rest.len() {
            return Err(BatchError::Corrupt(
                "record field runs past the record length",
            ));
        }
        let (field, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }

    fn varint(&mut self) -> Result<i32, BatchError> {
        let (value, consumed) = read_varint(self.rest)?;
        self.rest = &self.rest[consumed..];
        Ok(value)
    }

    fn varlong(&mut self) -> Result<i64, BatchError> {
        let (value, consumed) = read_varlong(self.rest)?;
        self.rest = &self.rest[consumed..];
        Ok(value)
    }

    /// A length-prefixed byte string where -1 means null.
    fn nullable_bytes(&mut self) -> Result<Option<Bytes>, BatchError> {
        match self.varint()? {
            NULL_LENGTH => Ok(None),
            len => {
                let len = usize::try_from(len)
                    .map_err(|_| BatchError::Corrupt("negative length other than -1"))?;
                Ok(Some(Bytes::copy_from_slice(self.take(len)?)))
            }
        }
    }
}
