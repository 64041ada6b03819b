//! Silt's own frames for the edge-to-core uplink: a pure codec on the caller's buffers.
//!
//! Frames are encoded into a `BytesMut` and decoded from a `&[u8]`; decoding returns how many
//! bytes it consumed, and "not enough bytes yet" is `Ok(None)`, not an error. Every length is
//! checked against a named limit before anything is buffered, so a peer can never make a
//! reader hold more than [`FRAME_BYTES_MAX`].
//!
//! # Layout
//! - [`Frame`]: the uplink frames (`Hello`, `Data`, `Ack`, `Error`) and their codec.
//! - [`compress_batches`] / [`decompress_batches`]: the zstd envelope of a `Data` payload.
//!
//! # Format (version 2)
//! ```text
//! frame   = length:u32be type:u8 body          length counts type and body
//! Hello   (1) = version:u16 edge_id:str8 topic:str8 partition:u32 edge_log:str8
//!               (edge_log from version 2 on; a version 1 Hello ends at partition)
//! Data    (2) = first_offset:u64 end_offset:u64 edge_end:u64 codec:u8 raw_len:u32 payload
//! Ack     (3) = end_offset:u64
//! Error   (4) = code:u16 message:str16
//! str8 / str16 = length (u8 / u16 big-endian) then UTF-8 bytes
//! ```
//! A `Data` payload is whole Kafka RecordBatch v2 batches exactly as the edge log stores them
//! (their base offsets are the edge offsets), as a whole compressed with zstd when
//! `codec` is 1. `raw_len` is the uncompressed size, bounded by [`DATA_RAW_BYTES_MAX`].
//!
//! `edge_log` is the id of the edge's log (its data directory), random when the log was
//! created: the edge offsets a stream ships count in that log, so an edge whose log was
//! replaced (a new card, a wiped disk) starts new streams instead of offsets the core has
//! seen. Empty for a log made before logs had ids, and in a version 1 `Hello`.

use bytes::{BufMut, Bytes, BytesMut};

/// The ALPN protocol id of the uplink.
pub const ALPN: &[u8] = b"silt-uplink/1";

/// The QUIC application close code of a core shutting down in order: everything durable was
/// acked before the close, so the edge takes it as no failure and reconnects.
pub const CLOSE_SHUTTING_DOWN: u32 = 1;
/// The QUIC application close code of a connection another one of the same edge log (edge id
/// and log id) took over: the edge that gets it is not the one shipping that log now, so two
/// processes ship one log (a copied data directory), and it gives its log a new id.
pub const CLOSE_SUPERSEDED: u32 = 2;
/// The frame format version a `Hello` carries.
pub const VERSION: u16 = 2;
/// The oldest `Hello` version still understood (without `edge_log`).
pub const VERSION_MIN: u16 = 1;
/// Longest edge log id.
pub const EDGE_LOG_BYTES_MAX: usize = 64;
/// Largest uncompressed `Data` payload (batches) either side accepts.
pub const DATA_RAW_BYTES_MAX: usize = 8 << 20;
/// Largest frame (type and body) either side accepts: a `Data` frame whose payload did not
/// compress, plus its fixed fields.
pub const FRAME_BYTES_MAX: usize = DATA_RAW_BYTES_MAX + 64;
/// Longest edge id.
pub const EDGE_ID_BYTES_MAX: usize = 255;
/// Longest topic name (Kafka's limit).
pub const TOPIC_BYTES_MAX: usize = 249;
/// Longest error message.
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Bytes before the body: the length and the type.
pub const FRAME_HEADER_LEN: usize = 5;

const TYPE_HELLO: u8 = 1;
const TYPE_DATA: u8 = 2;
const TYPE_ACK: u8 = 3;
const TYPE_ERROR: u8 = 4;

/// How a `Data` payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None = 0,
    Zstd = 1,
}

/// Error codes an `Error` frame carries; the connection or stream closes after one.
pub mod error_code {
    /// The peer sent something the codec refused.
    pub const MALFORMED: u16 = 1;
    /// The version in `Hello` is not spoken here.
    pub const UNSUPPORTED_VERSION: u16 = 2;
    /// The core could not store the data (disk, budget); the edge retries later.
    pub const STORAGE: u16 = 3;
    /// The request is valid but refused (bad topic name, unauthorised edge id).
    pub const REFUSED: u16 = 4;
    /// The edge's log ends below records the core already stores from that log (same edge
    /// id, log id and partition): the log went back (restored from a backup, a copied card,
    /// a disk that lost writes), so its new records reuse offsets the core has. The edge
    /// gives its log a new id and ships under it; with the same id they would be taken for
    /// duplicates and dropped.
    pub const LOG_BEHIND: u16 = 5;
}

/// One uplink frame. Borrowed from the buffer it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// First frame of every stream, edge to core: which edge partition the stream ships.
    Hello {
        version: u16,
        edge_id: &'a str,
        topic: &'a str,
        partition: u32,
        /// The edge log's id (see the format); empty for a log without one, and always in
        /// a version 1 `Hello`, which does not carry it.
        edge_log: &'a str,
    },
    /// Edge to core: the batches holding edge offsets `first_offset..end_offset` (records
    /// below `first_offset` in the first batch were shipped before and are skipped).
    Data {
        first_offset: u64,
        end_offset: u64,
        /// The edge partition's high watermark when the frame was read (at least
        /// `end_offset`): lets the core report the edge's lag.
        edge_end: u64,
        codec: Codec,
        raw_len: u32,
        payload: &'a [u8],
    },
    /// Core to edge: every edge offset below `end_offset` is durable on the core.
    Ack { end_offset: u64 },
    /// Either way: why the sender is closing the stream.
    Error { code: u16, message: &'a str },
}

/// Why bytes are not a valid frame. The stream carrying them cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame type {frame_type} is truncated or has trailing bytes")]
    BadLength { frame_type: u8 },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("{field} of {len} bytes is invalid (at most {max})")]
    BadField {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("unknown payload codec {0}")]
    UnknownCodec(u8),
    #[error(
        "data frame offsets {first_offset}..{end_offset} (edge end {edge_end}) are out of order"
    )]
    BadRange {
        first_offset: u64,
        end_offset: u64,
        edge_end: u64,
    },
    #[error("payload decompresses to more than {max} bytes")]
    Decompress { max: usize },
}

impl Frame<'_> {
    /// Appends the frame to `out`.
    ///
    /// Panics when a field breaks a limit: encoding is only ever given values this side
    /// built, so that is a bug, not an operating condition.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(FRAME_HEADER_LEN + self.body_len());
        self.encode_head(out);
        if let Frame::Data { payload, .. } = self {
            out.put_slice(payload);
        }
    }

    /// Appends the frame as [`Frame::encode`] does, except a `Data` frame's payload: the
    /// caller sends the payload right after these bytes, from its own buffer, uncopied.
    /// Panics as [`Frame::encode`] does.
    pub fn encode_head(&self, out: &mut BytesMut) {
        let body_len = self.body_len();
        assert!(
            body_len < FRAME_BYTES_MAX,
            "frame of {body_len} bytes exceeds the limit"
        );
        out.put_u32((body_len + 1) as u32);
        match *self {
            Frame::Hello {
                version,
                edge_id,
                topic,
                partition,
                edge_log,
            } => {
                assert!(!edge_id.is_empty() && edge_id.len() <= EDGE_ID_BYTES_MAX);
                assert!(!topic.is_empty() && topic.len() <= TOPIC_BYTES_MAX);
                assert!(edge_log.len() <= EDGE_LOG_BYTES_MAX);
                assert!(
                    version >= 2 || edge_log.is_empty(),
                    "a version 1 Hello has no log id"
                );
                out.put_u8(TYPE_HELLO);
                out.put_u16(version);
                out.put_u8(edge_id.len() as u8);
                out.put_slice(edge_id.as_bytes());
                out.put_u8(topic.len() as u8);
                out.put_slice(topic.as_bytes());
                out.put_u32(partition);
                if version >= 2 {
                    out.put_u8(edge_log.len() as u8);
                    out.put_slice(edge_log.as_bytes());
                }
            }
            Frame::Data {
                first_offset,
                end_offset,
                edge_end,
                codec,
                raw_len,
                ..
            } => {
                assert!(first_offset <= end_offset && end_offset <= edge_end);
                assert!(raw_len as usize <= DATA_RAW_BYTES_MAX);
                out.put_u8(TYPE_DATA);
                out.put_u64(first_offset);
                out.put_u64(end_offset);
                out.put_u64(edge_end);
                out.put_u8(codec as u8);
                out.put_u32(raw_len);
            }
            Frame::Ack { end_offset } => {
                out.put_u8(TYPE_ACK);
                out.put_u64(end_offset);
            }
            Frame::Error { code, message } => {
                let message = truncate_utf8(message, MESSAGE_BYTES_MAX);
                out.put_u8(TYPE_ERROR);
                out.put_u16(code);
                out.put_u16(message.len() as u16);
                out.put_slice(message.as_bytes());
            }
        }
    }

    fn body_len(&self) -> usize {
        match *self {
            Frame::Hello {
                version,
                edge_id,
                topic,
                edge_log,
                ..
            } => {
                let log_len = if version >= 2 { 1 + edge_log.len() } else { 0 };
                2 + 1 + edge_id.len() + 1 + topic.len() + 4 + log_len
            }
            Frame::Data { payload, .. } => 8 + 8 + 8 + 1 + 4 + payload.len(),
            Frame::Ack { .. } => 8,
            Frame::Error { message, .. } => 2 + 2 + truncate_utf8(message, MESSAGE_BYTES_MAX).len(),
        }
    }

    /// Decodes one frame from the start of `buf`: `Ok(None)` when more bytes are needed,
    /// else the frame and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 {
            return Err(WireError::Empty);
        }
        if len > FRAME_BYTES_MAX {
            return Err(WireError::FrameTooLarge {
                size: len,
                max: FRAME_BYTES_MAX,
            });
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let frame_type = buf[4];
        let body = &buf[FRAME_HEADER_LEN..4 + len];
        let mut reader = Reader { buf: body };
        let bad = WireError::BadLength { frame_type };
        let frame = match frame_type {
            TYPE_HELLO => {
                let version = reader.u16().ok_or(bad.clone())?;
                let edge_id = reader.str8("edge id").ok_or(bad.clone())??;
                let topic = reader.str8("topic").ok_or(bad.clone())??;
                let partition = reader.u32().ok_or(bad.clone())?;
                check_name("edge id", edge_id, EDGE_ID_BYTES_MAX)?;
                check_name("topic", topic, TOPIC_BYTES_MAX)?;
                let edge_log = if version >= 2 {
                    let edge_log = reader.str8("edge log id").ok_or(bad.clone())??;
                    if edge_log.len() > EDGE_LOG_BYTES_MAX {
                        return Err(WireError::BadField {
                            field: "edge log id",
                            len: edge_log.len(),
                            max: EDGE_LOG_BYTES_MAX,
                        });
                    }
                    edge_log
                } else {
                    ""
                };
                Frame::Hello {
                    version,
                    edge_id,
                    topic,
                    partition,
                    edge_log,
                }
            }
            TYPE_DATA => {
                let first_offset = reader.u64().ok_or(bad.clone())?;
                let end_offset = reader.u64().ok_or(bad.clone())?;
                let edge_end = reader.u64().ok_or(bad.clone())?;
                let codec = match reader.u8().ok_or(bad.clone())? {
                    0 => Codec::None,
                    1 => Codec::Zstd,
                    other => return Err(WireError::UnknownCodec(other)),
                };
                let raw_len = reader.u32().ok_or(bad.clone())?;
                if first_offset > end_offset || end_offset > edge_end {
                    return Err(WireError::BadRange {
                        first_offset,
                        end_offset,
                        edge_end,
                    });
                }
                if raw_len as usize > DATA_RAW_BYTES_MAX {
                    return Err(WireError::BadField {
                        field: "raw length",
                        len: raw_len as usize,
                        max: DATA_RAW_BYTES_MAX,
                    });
                }
                let payload = std::mem::take(&mut reader.buf);
                if codec == Codec::None && payload.len() != raw_len as usize {
                    return Err(bad);
                }
                Frame::Data {
                    first_offset,
                    end_offset,
                    edge_end,
                    codec,
                    raw_len,
                    payload,
                }
            }
            TYPE_ACK => Frame::Ack {
                end_offset: reader.u64().ok_or(bad.clone())?,
            },
            TYPE_ERROR => {
                let code = reader.u16().ok_or(bad.clone())?;
                let len = reader.u16().ok_or(bad.clone())? as usize;
                if len > MESSAGE_BYTES_MAX {
                    return Err(WireError::BadField {
                        field: "message",
                        len,
                        max: MESSAGE_BYTES_MAX,
                    });
                }
                let bytes = reader.take(len).ok_or(bad.clone())?;
                let message = std::str::from_utf8(bytes)
                    .map_err(|_| WireError::BadUtf8 { field: "message" })?;
                Frame::Error { code, message }
            }
            other => return Err(WireError::UnknownType(other)),
        };
        if !reader.buf.is_empty() {
            return Err(bad);
        }
        Ok(Some((frame, 4 + len)))
    }
}

fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), WireError> {
    if value.is_empty() || value.len() > max {
        return Err(WireError::BadField {
            field,
            len: value.len(),
            max,
        });
    }
    Ok(())
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if self.buf.len() < len {
            return None;
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn str8(&mut self, field: &'static str) -> Option<Result<&'a str, WireError>> {
        let len = self.u8()? as usize;
        let bytes = self.take(len)?;
        Some(std::str::from_utf8(bytes).map_err(|_| WireError::BadUtf8 { field }))
    }
}

/// zstd level for uplink payloads: fast, as an edge board's CPU is the scarce part.
pub const ZSTD_LEVEL: i32 = 1;
/// The levels an edge may choose ([`BatchCompressor::with_level`]): zstd's "fast" levels
/// down to -7 (faster, less compression), up to 19, its highest level that needs no
/// large-window ("ultra") memory on the core's decompressing side.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -7..=19;

/// Compresses batch bytes for a `Data` frame, keeping them raw when zstd does not shrink
/// them (already compressed batches). Returns the codec and the payload.
pub fn compress_batches(raw: &[u8]) -> (Codec, Vec<u8>) {
    assert!(raw.len() <= DATA_RAW_BYTES_MAX, "payload over the limit");
    match zstd::bulk::compress(raw, ZSTD_LEVEL) {
        Ok(compressed) if compressed.len() < raw.len() => (Codec::Zstd, compressed),
        _ => (Codec::None, raw.to_vec()),
    }
}

/// [`compress_batches`] with one zstd context kept across frames, instead of a context made
/// (and its tables allocated) for every frame.
pub struct BatchCompressor {
    zstd: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for BatchCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BatchCompressor")
    }
}

impl BatchCompressor {
    /// A compressor at [`ZSTD_LEVEL`]; fails only when zstd cannot allocate its context.
    pub fn new() -> std::io::Result<BatchCompressor> {
        BatchCompressor::with_level(ZSTD_LEVEL)
    }

    /// A compressor at `level`, one of [`ZSTD_LEVELS`]; fails when zstd cannot allocate its
    /// context or rejects the level.
    pub fn with_level(level: i32) -> std::io::Result<BatchCompressor> {
        if !ZSTD_LEVELS.contains(&level) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("zstd level {level} is outside {ZSTD_LEVELS:?}"),
            ));
        }
        Ok(BatchCompressor {
            zstd: zstd::bulk::Compressor::new(level)?,
        })
    }

    /// Like [`compress_batches`]: the codec and the payload, raw when zstd does not shrink it.
    pub fn compress(&mut self, raw: &[u8]) -> (Codec, Vec<u8>) {
        assert!(raw.len() <= DATA_RAW_BYTES_MAX, "payload over the limit");
        match self.zstd.compress(raw) {
            Ok(compressed) if compressed.len() < raw.len() => (Codec::Zstd, compressed),
            _ => (Codec::None, raw.to_vec()),
        }
    }
}

/// The batch bytes of a `Data` payload, never more than `raw_len` (itself bounded by
/// [`DATA_RAW_BYTES_MAX`] at decode): an uncompressed payload is itself, not a copy.
pub fn decompress_batches(codec: Codec, raw_len: u32, payload: Bytes) -> Result<Bytes, WireError> {
    match codec {
        Codec::None => Ok(payload),
        Codec::Zstd => {
            let max = (raw_len as usize).min(DATA_RAW_BYTES_MAX);
            let raw =
                zstd::bulk::decompress(&payload, max).map_err(|_| WireError::Decompress { max })?;
            if raw.len() != raw_len as usize {
                return Err(WireError::Decompress { max });
            }
            Ok(raw.into())
        }
    }
}
