//! Fetch responses written around the stored batch bytes instead of through
//! `kafka-protocol`'s encoder, which would copy every record byte into the encoded message.
//! The fields are encoded here into a small head buffer; the records stay where the log
//! read put them (the connection's read buffer), and the response leaves as one vectored
//! write of head pieces and record ranges. So a batch is copied once in user space, from
//! the page cache into the read buffer.
//!
//! Versions 4-12 (the gateway's range), byte for byte what `kafka-protocol` encodes for the
//! same response: the tests below compare the two for every version.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

/// The first version with flexible fields (compact arrays, strings and bytes, tagged fields)
/// and a version 1 response header.
const FIRST_FLEXIBLE: i16 = 12;

/// A Fetch response with every record set given as a range of the read buffer.
/// Throttle time, top-level error and session id are 0: no throttling and no fetch sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FetchReply {
    pub(crate) topics: Vec<TopicReply>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicReply {
    pub(crate) name: String,
    pub(crate) partitions: Vec<PartitionReply>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionReply {
    pub(crate) partition_index: i32,
    pub(crate) error_code: i16,
    pub(crate) high_watermark: i64,
    pub(crate) last_stable_offset: i64,
    pub(crate) log_start_offset: i64,
    /// The record set: whole batches.
    pub(crate) records: RecordSet,
}

/// Where a partition's record set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordSet {
    /// Bytes of the read buffer.
    Buffer(Range<usize>),
    /// Bytes the broker held already (batches rebuilt from the archive).
    Shared(Bytes),
}

impl RecordSet {
    pub(crate) fn len(&self) -> usize {
        match self {
            RecordSet::Buffer(range) => range.len(),
            RecordSet::Shared(bytes) => bytes.len(),
        }
    }
}

impl Default for RecordSet {
    fn default() -> Self {
        RecordSet::Buffer(0..0)
    }
}

/// One piece of an encoded response, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes of the head buffer.
    Head(Range<usize>),
    /// Bytes of the read buffer.
    Records(Range<usize>),
    /// Record bytes held elsewhere.
    Shared(Bytes),
}

/// Appends the framed response (size, header, body) to `head` and its pieces to `pieces`.
/// `version` must be in 4..=12 (the gateway checks before it decodes the request); record
/// ranges must fit an i32 length (the gateway's fetch limit keeps them far below).
pub(crate) fn encode(
    correlation_id: i32,
    version: i16,
    reply: &FetchReply,
    head: &mut BytesMut,
    pieces: &mut Vec<Piece>,
) {
    assert!(
        (4..=FIRST_FLEXIBLE).contains(&version),
        "fetch v{version} has no encoder"
    );
    let flexible = version >= FIRST_FLEXIBLE;
    let frame_start = head.len();
    let first_piece = pieces.len();
    let mut piece_start = frame_start;
    let mut records_bytes = 0usize;
    head.put_i32(0); // The size, set below.
    head.put_i32(correlation_id);
    if flexible {
        put_uvarint(head, 0); // Response header tagged fields.
    }
    head.put_i32(0); // throttle_time_ms
    if version >= 7 {
        head.put_i16(0); // error_code
        head.put_i32(0); // session_id
    }
    put_array_len(head, flexible, reply.topics.len());
    for topic in &reply.topics {
        put_string(head, flexible, &topic.name);
        put_array_len(head, flexible, topic.partitions.len());
        for partition in &topic.partitions {
            head.put_i32(partition.partition_index);
            head.put_i16(partition.error_code);
            head.put_i64(partition.high_watermark);
            head.put_i64(partition.last_stable_offset);
            if version >= 5 {
                head.put_i64(partition.log_start_offset);
            }
            put_array_len(head, flexible, 0); // aborted_transactions: none
            if version >= 11 {
                head.put_i32(-1); // preferred_read_replica
            }
            let records_len = partition.records.len();
            if flexible {
                put_uvarint(head, len_u32(records_len + 1));
            } else {
                head.put_i32(len_i32(records_len));
            }
            if records_len > 0 {
                pieces.push(Piece::Head(piece_start..head.len()));
                pieces.push(match &partition.records {
                    RecordSet::Buffer(range) => Piece::Records(range.clone()),
                    RecordSet::Shared(bytes) => Piece::Shared(bytes.clone()),
                });
                piece_start = head.len();
                records_bytes += records_len;
            }
            if flexible {
                put_uvarint(head, 0); // Partition tagged fields.
            }
        }
        if flexible {
            put_uvarint(head, 0); // Topic tagged fields.
        }
    }
    if flexible {
        put_uvarint(head, 0); // Response tagged fields.
    }
    pieces.push(Piece::Head(piece_start..head.len()));
    let size = len_i32(head.len() - frame_start - 4 + records_bytes);
    head[frame_start..frame_start + 4].copy_from_slice(&size.to_be_bytes());
    debug_assert!(pieces[first_piece..].iter().all(|piece| match piece {
        Piece::Head(range) => range.end <= head.len(),
        Piece::Records(_) | Piece::Shared(_) => true,
    }));
}

fn len_i32(len: usize) -> i32 {
    i32::try_from(len).expect("fetch responses are bounded far below 2 GiB")
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("fetch responses are bounded far below 4 GiB")
}

fn put_uvarint(out: &mut BytesMut, mut value: u32) {
    while value >= 0x80 {
        out.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

fn put_array_len(out: &mut BytesMut, flexible: bool, len: usize) {
    if flexible {
        put_uvarint(out, len_u32(len + 1));
    } else {
        out.put_i32(len_i32(len));
    }
}

fn put_string(out: &mut BytesMut, flexible: bool, value: &str) {
    if flexible {
        put_uvarint(out, len_u32(value.len() + 1));
    } else {
        out.put_i16(
            i16::try_from(value.len())
                .expect("a non-flexible request carried this name as an INT16-length string"),
        );
    }
    out.put_slice(value.as_bytes());
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kafka_protocol::messages::{
        BrokerId, FetchResponse, ResponseHeader, TopicName, fetch_response,
    };
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    use super::*;

    /// The reply as `kafka-protocol` would build it, records taken from `buffer`.
    fn reference(reply: &FetchReply, buffer: &[u8]) -> FetchResponse {
        FetchResponse::default().with_responses(
            reply
                .topics
                .iter()
                .map(|topic| {
                    fetch_response::FetchableTopicResponse::default()
                        .with_topic(TopicName(StrBytes::from_string(topic.name.clone())))
                        .with_partitions(
                            topic
                                .partitions
                                .iter()
                                .map(|partition| {
                                    fetch_response::PartitionData::default()
                                        .with_partition_index(partition.partition_index)
                                        .with_error_code(partition.error_code)
                                        .with_high_watermark(partition.high_watermark)
                                        .with_last_stable_offset(partition.last_stable_offset)
                                        .with_log_start_offset(partition.log_start_offset)
                                        .with_preferred_read_replica(BrokerId(-1))
                                        .with_records(Some(match &partition.records {
                                            RecordSet::Buffer(range) => {
                                                Bytes::copy_from_slice(&buffer[range.clone()])
                                            }
                                            RecordSet::Shared(bytes) => bytes.clone(),
                                        }))
                                })
                                .collect(),
                        )
                })
                .collect(),
        )
    }

    fn reference_frame(correlation_id: i32, version: i16, response: &FetchResponse) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_i32(0);
        let header_version = if version >= FIRST_FLEXIBLE { 1 } else { 0 };
        ResponseHeader::default()
            .with_correlation_id(correlation_id)
            .encode(&mut out, header_version)
            .unwrap();
        response.encode(&mut out, version).unwrap();
        let size = (out.len() - 4) as i32;
        out[..4].copy_from_slice(&size.to_be_bytes());
        out.to_vec()
    }

    fn joined(head: &[u8], buffer: &[u8], pieces: &[Piece]) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Head(range) => out.extend_from_slice(&head[range.clone()]),
                Piece::Records(range) => out.extend_from_slice(&buffer[range.clone()]),
                Piece::Shared(bytes) => out.extend_from_slice(bytes),
            }
        }
        out
    }

    fn partition(index: i32, error_code: i16, records: Range<usize>) -> PartitionReply {
        shared(index, error_code, RecordSet::Buffer(records))
    }

    fn shared(index: i32, error_code: i16, records: RecordSet) -> PartitionReply {
        PartitionReply {
            partition_index: index,
            error_code,
            high_watermark: 1_000 + i64::from(index),
            last_stable_offset: 1_000 + i64::from(index),
            log_start_offset: 7,
            records,
        }
    }

    /// Record bytes the broker held (as cold reads return them), unlike the buffer's.
    fn held() -> Bytes {
        (0..1_000u32).map(|i| (i % 13) as u8 + 100).collect()
    }

    /// A buffer whose length needs a multi-byte varint, and a reply mixing record sets (of the
    /// buffer and held elsewhere), empty ones, errors, and several topics.
    fn sample() -> (Vec<u8>, FetchReply) {
        let buffer: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let reply = FetchReply {
            topics: vec![
                TopicReply {
                    name: "events".into(),
                    partitions: vec![
                        partition(0, 0, 0..300),
                        partition(1, 0, 300..300),
                        partition(2, 0, 300..70_000),
                        partition(3, 1, 0..0),
                        shared(4, 0, RecordSet::Shared(held())),
                        shared(5, 0, RecordSet::Shared(Bytes::new())),
                    ],
                },
                TopicReply {
                    name: "t".repeat(200),
                    partitions: vec![partition(0, 3, 0..0)],
                },
                TopicReply {
                    name: "empty".into(),
                    partitions: vec![],
                },
            ],
        };
        (buffer, reply)
    }

    #[test]
    fn every_version_matches_kafka_protocol_byte_for_byte() {
        let (buffer, reply) = sample();
        for version in 4..=FIRST_FLEXIBLE {
            let mut head = BytesMut::new();
            let mut pieces = Vec::new();
            encode(-5, version, &reply, &mut head, &mut pieces);
            let ours = joined(&head, &buffer, &pieces);
            let theirs = reference_frame(-5, version, &reference(&reply, &buffer));
            assert_eq!(ours, theirs, "fetch v{version}");
        }
    }

    #[test]
    fn an_empty_reply_matches_and_decodes() {
        for version in 4..=FIRST_FLEXIBLE {
            let mut head = BytesMut::new();
            let mut pieces = Vec::new();
            encode(9, version, &FetchReply::default(), &mut head, &mut pieces);
            let ours = joined(&head, &[], &pieces);
            let theirs = reference_frame(9, version, &FetchResponse::default());
            assert_eq!(ours, theirs, "fetch v{version}");
            let mut body = Bytes::from(ours).slice(4..);
            let header_version = if version >= FIRST_FLEXIBLE { 1 } else { 0 };
            let header = ResponseHeader::decode(&mut body, header_version).unwrap();
            assert_eq!(header.correlation_id, 9);
            let decoded = FetchResponse::decode(&mut body, version).unwrap();
            assert!(decoded.responses.is_empty());
        }
    }

    #[test]
    fn record_ranges_are_pieces_of_their_own_and_frames_append() {
        let (buffer, reply) = sample();
        let mut head = BytesMut::from(&b"earlier"[..]);
        let mut pieces = Vec::new();
        encode(1, 12, &reply, &mut head, &mut pieces);
        let records: Vec<_> = pieces
            .iter()
            .filter_map(|piece| match piece {
                Piece::Records(range) => Some(range.clone()),
                Piece::Head(_) | Piece::Shared(_) => None,
            })
            .collect();
        assert_eq!(
            records,
            vec![0..300, 300..70_000],
            "empty record sets add no piece"
        );
        let held_pieces: Vec<_> = pieces
            .iter()
            .filter_map(|piece| match piece {
                Piece::Shared(bytes) => Some(bytes.clone()),
                Piece::Head(_) | Piece::Records(_) => None,
            })
            .collect();
        assert_eq!(held_pieces, vec![held()], "held bytes go out as they are");
        let Piece::Head(first) = &pieces[0] else {
            panic!("a frame starts with its head");
        };
        assert_eq!(
            first.start, 7,
            "the frame starts after what the buffer held"
        );
        let frame = joined(&head, &buffer, &pieces);
        let size = i32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(size + 4, frame.len());
        let mut body = Bytes::from(frame).slice(4..);
        ResponseHeader::decode(&mut body, 1).unwrap();
        let decoded = FetchResponse::decode(&mut body, 12).unwrap();
        assert_eq!(
            decoded.responses[0].partitions[2].records.as_deref(),
            Some(&buffer[300..70_000])
        );
        assert_eq!(
            decoded.responses[0].partitions[4].records.as_deref(),
            Some(&held()[..])
        );
    }
}
