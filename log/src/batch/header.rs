//! The fixed 61-byte header of a Kafka RecordBatch v2, and the checks that make a byte range a
//! trustworthy batch.
//!
//! Layout (big-endian), offsets from the start of the batch:
//!
//! | at | field | type |
//! |---|---|---|
//! | 0 | base offset | i64 |
//! | 8 | batch length (bytes after this field) | i32 |
//! | 12 | partition leader epoch | i32 |
//! | 16 | magic (2) | i8 |
//! | 17 | CRC-32C of bytes 21.. | u32 |
//! | 21 | attributes | i16 |
//! | 23 | last offset delta | i32 |
//! | 27 | base timestamp | i64 |
//! | 35 | max timestamp | i64 |
//! | 43 | producer id | i64 |
//! | 51 | producer epoch | i16 |
//! | 53 | base sequence | i32 |
//! | 57 | record count | i32 |
//! | 61 | records (compressed as a whole when attributes say so) | |
//!
//! The base offset and the leader epoch sit outside the CRC, so the log rewrites them in place
//! on append without touching the checksum: the bytes a producer sent are the bytes we store and
//! serve.

use super::BatchError;

/// Bytes before the batch length field is counted: base offset (8) and batch length (4).
pub const LOG_OVERHEAD: usize = 12;
/// Size of the fixed header, up to and including the record count.
pub const BATCH_HEADER_LEN: usize = 61;
/// The only message format version Silt reads and writes.
pub const MAGIC_V2: i8 = 2;

const BASE_OFFSET_AT: usize = 0;
const LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;

pub(crate) const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const TRANSACTIONAL_BIT: i16 = 0x10;
const CONTROL_BIT: i16 = 0x20;

/// Compression codec named in the batch attributes. Silt writes `None` and `Zstd`; it stores
/// and serves the others untouched but cannot open them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// The 3-bit code Kafka uses in the attributes.
    pub fn code(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    fn from_code(code: i16) -> Result<Self, BatchError> {
        Ok(match code {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Snappy,
            3 => Compression::Lz4,
            4 => Compression::Zstd,
            other => return Err(BatchError::UnknownCompression(other)),
        })
    }
}

/// Whether record timestamps were set by the producer or by the log at append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimestampType {
    CreateTime,
    LogAppendTime,
}

/// The parsed fixed header of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes after the length field; the whole batch is `batch_length + LOG_OVERHEAD`.
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

impl BatchHeader {
    /// Parses the header at the front of `buf`. Returns `Ok(None)` when fewer than
    /// [`BATCH_HEADER_LEN`] bytes are present: a partial header is normal, not an error.
    ///
    /// Checks the magic and the length bounds, not the CRC; see [`check_batch`].
    pub fn parse(buf: &[u8]) -> Result<Option<BatchHeader>, BatchError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Ok(None);
        }
        let header = BatchHeader {
            base_offset: read_i64(buf, BASE_OFFSET_AT),
            batch_length: read_i32(buf, LENGTH_AT),
            partition_leader_epoch: read_i32(buf, LEADER_EPOCH_AT),
            magic: buf[MAGIC_AT] as i8,
            crc: read_u32(buf, CRC_AT),
            attributes: read_i16(buf, ATTRIBUTES_AT),
            last_offset_delta: read_i32(buf, LAST_OFFSET_DELTA_AT),
            base_timestamp: read_i64(buf, BASE_TIMESTAMP_AT),
            max_timestamp: read_i64(buf, MAX_TIMESTAMP_AT),
            producer_id: read_i64(buf, PRODUCER_ID_AT),
            producer_epoch: read_i16(buf, PRODUCER_EPOCH_AT),
            base_sequence: read_i32(buf, BASE_SEQUENCE_AT),
            record_count: read_i32(buf, RECORD_COUNT_AT),
        };
        if header.magic != MAGIC_V2 {
            return Err(BatchError::UnsupportedMagic(header.magic));
        }
        let min_length = (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32;
        if header.batch_length < min_length {
            return Err(BatchError::BadLength(header.batch_length));
        }
        if header.last_offset_delta < 0 {
            return Err(BatchError::Corrupt("negative last offset delta"));
        }
        if header.record_count < 0 {
            return Err(BatchError::Corrupt("negative record count"));
        }
        Ok(Some(header))
    }

    /// Total bytes of the batch, header included.
    pub fn total_len(&self) -> usize {
        self.batch_length.max(0) as usize + LOG_OVERHEAD
    }

    /// Offset of the last record; the batch covers `base_offset..=last_offset()`.
    /// Saturates rather than overflowing on a hostile base offset near `i64::MAX`.
    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(i64::from(self.last_offset_delta))
    }

    /// Number of offsets the batch occupies, which can exceed the record count after
    /// compaction.
    pub fn offset_count(&self) -> u64 {
        self.last_offset_delta as u64 + 1
    }

    pub fn compression(&self) -> Result<Compression, BatchError> {
        Compression::from_code(self.attributes & COMPRESSION_MASK)
    }

    pub fn timestamp_type(&self) -> TimestampType {
        if self.attributes & TIMESTAMP_TYPE_BIT != 0 {
            TimestampType::LogAppendTime
        } else {
            TimestampType::CreateTime
        }
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_BIT != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_BIT != 0
    }

    /// Writes the header into the first [`BATCH_HEADER_LEN`] bytes of `out`, CRC field
    /// included as stored in `self.crc`.
    pub fn write_to(&self, out: &mut [u8]) {
        assert!(out.len() >= BATCH_HEADER_LEN, "header buffer too small");
        out[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&self.base_offset.to_be_bytes());
        out[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&self.batch_length.to_be_bytes());
        out[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4]
            .copy_from_slice(&self.partition_leader_epoch.to_be_bytes());
        out[MAGIC_AT] = self.magic as u8;
        out[CRC_AT..CRC_AT + 4].copy_from_slice(&self.crc.to_be_bytes());
        out[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&self.attributes.to_be_bytes());
        out[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4]
            .copy_from_slice(&self.last_offset_delta.to_be_bytes());
        out[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8]
            .copy_from_slice(&self.base_timestamp.to_be_bytes());
        out[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8]
            .copy_from_slice(&self.max_timestamp.to_be_bytes());
        out[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&self.producer_id.to_be_bytes());
        out[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2]
            .copy_from_slice(&self.producer_epoch.to_be_bytes());
        out[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4]
            .copy_from_slice(&self.base_sequence.to_be_bytes());
        out[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&self.record_count.to_be_bytes());
    }
}

/// Attribute bits for a batch Silt writes.
pub fn attributes(compression: Compression, timestamp_type: TimestampType) -> i16 {
    let mut bits = compression.code();
    if timestamp_type == TimestampType::LogAppendTime {
        bits |= TIMESTAMP_TYPE_BIT;
    }
    bits
}

/// Peeks the total length of the batch at the front of `buf` without parsing the rest.
/// `Ok(None)` means fewer than [`LOG_OVERHEAD`] bytes are present.
pub fn peek_total_len(buf: &[u8]) -> Result<Option<usize>, BatchError> {
    if buf.len() < LOG_OVERHEAD {
        return Ok(None);
    }
    let length = read_i32(buf, LENGTH_AT);
    if length < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
        return Err(BatchError::BadLength(length));
    }
    Ok(Some(length as usize + LOG_OVERHEAD))
}

/// CRC-32C over `batch[21..]`, the span Kafka checksums.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[ATTRIBUTES_AT..])
}

/// Validates the whole batch at the front of `buf`: header, length within `max_batch_bytes`,
/// and CRC. Returns the header and the batch length, or `Ok(None)` when the batch is not all
/// there yet. Does not open the records.
pub fn check_batch(
    buf: &[u8],
    max_batch_bytes: usize,
) -> Result<Option<(BatchHeader, usize)>, BatchError> {
    let Some((header, total)) = check_batch_framing(buf, max_batch_bytes)? else {
        return Ok(None);
    };
    let actual = compute_crc(&buf[..total]);
    if actual != header.crc {
        return Err(BatchError::CrcMismatch {
            stored: header.crc,
            computed: actual,
        });
    }
    Ok(Some((header, total)))
}

/// [`check_batch`] without the CRC: the header and the length within `max_batch_bytes`. Only
/// for bytes whose CRC their holder already checked or computed itself, such as batches it
/// has just built; anything read from a file or a socket goes through [`check_batch`].
pub fn check_batch_framing(
    buf: &[u8],
    max_batch_bytes: usize,
) -> Result<Option<(BatchHeader, usize)>, BatchError> {
    let Some(total) = peek_total_len(buf)? else {
        return Ok(None);
    };
    if total > max_batch_bytes {
        return Err(BatchError::TooLarge {
            size: total,
            max: max_batch_bytes,
        });
    }
    let Some(header) = BatchHeader::parse(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((header, total)))
}

/// Rewrites the base offset of the batch at the front of `batch`. Outside the CRC.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Rewrites the partition leader epoch of the batch at the front of `batch`. Outside the CRC.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&epoch.to_be_bytes());
}

fn read_i16(buf: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([buf[at], buf[at + 1]])
}

fn read_i32(buf: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn read_i64(buf: &[u8], at: usize) -> i64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    i64::from_be_bytes(bytes)
}
