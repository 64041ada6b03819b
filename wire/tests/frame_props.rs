//! Property and pinned-byte tests of the uplink frame codec.

use bytes::BytesMut;
use proptest::prelude::*;
use silt_wire::{BatchCompressor, Codec, Frame, WireError, compress_batches, decompress_batches};

#[derive(Debug, Clone)]
enum Owned {
    Hello(u16, String, String, u32, String),
    Data(u64, u64, u64, Vec<u8>),
    Ack(u64),
    Error(u16, String),
}

impl Owned {
    fn frame(&self) -> Frame<'_> {
        match self {
            Owned::Hello(version, edge, topic, partition, log) => Frame::Hello {
                version: *version,
                edge_id: edge,
                topic,
                partition: *partition,
                edge_log: log,
            },
            Owned::Data(first, len, ahead, payload) => Frame::Data {
                first_offset: *first,
                end_offset: first.saturating_add(*len),
                edge_end: first.saturating_add(*len).saturating_add(*ahead),
                codec: Codec::None,
                raw_len: payload.len() as u32,
                payload,
            },
            Owned::Ack(end) => Frame::Ack { end_offset: *end },
            Owned::Error(code, message) => Frame::Error {
                code: *code,
                message,
            },
        }
    }
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (
            any::<u16>(),
            "[a-z0-9-]{1,40}",
            "[a-z.]{1,40}",
            any::<u32>(),
            "[0-9a-f]{0,32}"
        )
            // A version 1 Hello carries no log id.
            .prop_map(|(v, e, t, p, l)| Owned::Hello(
                v,
                e,
                t,
                p,
                if v >= 2 { l } else { String::new() }
            )),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(f, l, a, p)| Owned::Data(f, l, a, p)),
        any::<u64>().prop_map(Owned::Ack),
        (any::<u16>(), ".{0,100}").prop_map(|(c, m)| Owned::Error(c, m)),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode(frames in proptest::collection::vec(owned(), 1..8)) {
        let mut buf = BytesMut::new();
        for frame in &frames {
            frame.frame().encode(&mut buf);
        }
        let mut at = 0;
        for frame in &frames {
            // Every strict prefix of a frame is "incomplete", never an error.
            let (decoded, used) = Frame::decode(&buf[at..]).unwrap().unwrap();
            prop_assert_eq!(decoded, frame.frame());
            for cut in [0, 1, 4, used / 2, used - 1] {
                prop_assert_eq!(Frame::decode(&buf[at..at + cut]).unwrap(), None);
            }
            at += used;
        }
        prop_assert_eq!(at, buf.len());
    }

    /// The head and then a `Data` frame's payload are the frame's bytes.
    #[test]
    fn the_head_then_the_payload_is_the_frame(frame in owned()) {
        let frame = frame.frame();
        let (mut whole, mut split) = (BytesMut::new(), BytesMut::new());
        frame.encode(&mut whole);
        frame.encode_head(&mut split);
        if let Frame::Data { payload, .. } = frame {
            split.extend_from_slice(payload);
        }
        prop_assert_eq!(&split[..], &whole[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn compression_round_trips(raw in proptest::collection::vec(0u8..4, 0..5000)) {
        let (codec, payload) = compress_batches(&raw);
        let back = decompress_batches(codec, raw.len() as u32, payload.into()).unwrap();
        prop_assert_eq!(&back[..], &raw[..]);
    }

    /// One reused compressor gives, frame after frame, what a fresh context gives.
    #[test]
    fn a_reused_compressor_round_trips_every_frame(
        frames in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..5000), 1..6),
    ) {
        let mut compressor = BatchCompressor::new().unwrap();
        for raw in &frames {
            let (codec, payload) = compressor.compress(raw);
            prop_assert_eq!((codec, &payload), (compress_batches(raw).0, &compress_batches(raw).1));
            let back = decompress_batches(codec, raw.len() as u32, payload.into()).unwrap();
            prop_assert_eq!(&back[..], &raw[..]);
        }
    }
}

/// A compressor's level is the one asked for: on the same sensor-like JSON the fast level
/// gives a larger payload than level 1, and level 19 a smaller one; each decompresses to the
/// input. Levels outside the range are refused.
#[test]
fn compressor_levels_are_applied_and_bounded() {
    let mut raw = Vec::new();
    for i in 0..4000u32 {
        let line = format!(
            "{{\"device\":\"sensor-{:04}\",\"temp\":{}.{},\"status\":\"{}\"}}\n",
            i.wrapping_mul(2_654_435_761) % 10_000,
            i % 47,
            i.wrapping_mul(7) % 100,
            ["ok", "warn", "fault"][i as usize % 3],
        );
        raw.extend_from_slice(line.as_bytes());
    }
    let mut sizes = Vec::new();
    for level in [-7, 1, 19] {
        let (codec, payload) = BatchCompressor::with_level(level).unwrap().compress(&raw);
        assert_eq!(codec, Codec::Zstd, "level {level}");
        sizes.push(payload.len());
        let back = decompress_batches(codec, raw.len() as u32, payload.into()).unwrap();
        assert_eq!(&back[..], &raw[..], "level {level}");
    }
    assert!(
        sizes[0] > sizes[1] && sizes[1] > sizes[2],
        "sizes at -7, 1, 19: {sizes:?}"
    );
    for level in [-8, 20, 22] {
        assert!(BatchCompressor::with_level(level).is_err(), "level {level}");
    }
}

#[test]
fn pinned_bytes() {
    let mut buf = BytesMut::new();
    Frame::Hello {
        version: 1,
        edge_id: "e1",
        topic: "mqtt",
        partition: 2,
        edge_log: "",
    }
    .encode(&mut buf);
    Frame::Hello {
        version: 2,
        edge_id: "e1",
        topic: "mqtt",
        partition: 2,
        edge_log: "a9",
    }
    .encode(&mut buf);
    Frame::Ack { end_offset: 7 }.encode(&mut buf);
    Frame::Data {
        first_offset: 3,
        end_offset: 5,
        edge_end: 9,
        codec: Codec::None,
        raw_len: 2,
        payload: b"ab",
    }
    .encode(&mut buf);
    assert_eq!(
        &buf[..],
        &[
            0, 0, 0, 15, 1, 0, 1, 2, b'e', b'1', 4, b'm', b'q', b't', b't', 0, 0, 0, 2, //
            0, 0, 0, 18, 1, 0, 2, 2, b'e', b'1', 4, b'm', b'q', b't', b't', 0, 0, 0, 2, 2, b'a',
            b'9', //
            0, 0, 0, 9, 3, 0, 0, 0, 0, 0, 0, 0, 7, //
            0, 0, 0, 32, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9,
            0, 0, 0, 0, 2, b'a', b'b',
        ]
    );
}

#[test]
fn limits_are_errors() {
    let huge = (silt_wire::FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
    assert!(matches!(
        Frame::decode(&[huge[0], huge[1], huge[2], huge[3], 2]),
        Err(WireError::FrameTooLarge { .. })
    ));
    assert_eq!(Frame::decode(&[0, 0, 0, 0]), Err(WireError::Empty));
    // A version 2 Hello whose edge log id is longer than any log's.
    let mut hello = vec![1, 0, 2, 2, b'e', b'1', 1, b't', 0, 0, 0, 0, 65];
    hello.extend_from_slice(&[b'a'; 65]);
    let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&hello);
    assert!(matches!(
        Frame::decode(&frame),
        Err(WireError::BadField {
            field: "edge log id",
            ..
        })
    ));
    // A version 1 Hello has no log id: a byte after its partition is one too many.
    assert!(Frame::decode(&[0, 0, 0, 13, 1, 0, 1, 2, b'e', b'1', 1, b't', 0, 0, 0, 0, 0]).is_err());
    assert_eq!(
        Frame::decode(&[0, 0, 0, 1, 9]),
        Err(WireError::UnknownType(9))
    );
    // An ack with a trailing byte.
    assert!(matches!(
        Frame::decode(&[0, 0, 0, 10, 3, 0, 0, 0, 0, 0, 0, 0, 7, 1]),
        Err(WireError::BadLength { frame_type: 3 })
    ));
    // A zstd bomb claiming a small raw size is refused at that size.
    let raw = vec![0u8; 100_000];
    let (codec, payload) = compress_batches(&raw);
    assert_eq!(codec, Codec::Zstd);
    assert!(decompress_batches(codec, 1000, payload.into()).is_err());
}
