//! Kafka RecordBatch v2: the one record format Silt stores, ships and serves.
//!
//! `header` parses and checks the fixed header and CRC without opening the records; the log
//! uses only that on its hot path. `records` encodes and decodes the records inside, with
//! compression, for producers, tools and the cold tier.

mod header;
mod records;
mod varint;

pub use header::{
    BATCH_HEADER_LEN, BatchHeader, Compression, LOG_OVERHEAD, MAGIC_V2, TimestampType, attributes,
    check_batch, check_batch_framing, compute_crc, peek_total_len, set_base_offset,
    set_partition_leader_epoch,
};
pub use records::{
    BatchCrc, BatchEncoder, BatchSpec, Batches, DECODE_MAX_BATCH_BYTES_DEFAULT,
    DECODE_MAX_DECOMPRESSED_BYTES_DEFAULT, DecodeLimits, DecodedRecord, Header, Record, RecordRef,
    ZSTD_LEVEL, batches, decode_batch, decode_records, decompress_batch, decompress_records,
    encode_batch, encode_batch_compressed, put_nullable, records_len_hint,
};
pub use varint::{
    VARINT_BYTES_MAX, VARLONG_BYTES_MAX, put_varint, put_varlong, read_varint, read_varlong,
    varint_len, varlong_len,
};

/// Why a byte range is not a batch Silt can accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("unsupported record batch magic {0}, expected 2")]
    UnsupportedMagic(i8),
    #[error("invalid record batch length {0}")]
    BadLength(i32),
    #[error("record batch of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("record batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("unknown compression code {0}")]
    UnknownCompression(i16),
    #[error("compression {0:?} is not supported for reading records")]
    UnsupportedCompression(Compression),
    #[error("decompressed records exceed the limit of {max} bytes")]
    DecompressedTooLarge { max: usize },
    #[error("corrupt record batch: {0}")]
    Corrupt(&'static str),
    #[error("invalid batch to encode: {0}")]
    InvalidInput(&'static str),
}
