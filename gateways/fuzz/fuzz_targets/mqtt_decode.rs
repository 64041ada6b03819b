//! Fuzz target: arbitrary bytes through MQTT protocol detection and the server-side frame
//! decoder, for MQTT 3.1.1 and 5.0, read in small chunks the way a connection reads them.
//!
//! Beyond "never panics", it checks the framing invariants a connection relies on: the bytes
//! a frame needs never exceed the limit, waiting leaves the buffer untouched, a whole frame
//! always decodes or fails, a decoded frame consumed exactly its own bytes, every error maps
//! to one of the four reason codes, and a decoded PUBLISH re-encoded by rumqttc decodes to
//! the same packet.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use silt_gateways::mqtt::{Decoder, Frame, ProtocolVersion, detect_protocol, frame_bytes_needed};

/// mosquitto_pub's CONNECT in 3.1.1 and 5.0: prefixed to the input so the fuzzer reaches
/// every packet type without first having to find a valid CONNECT.
const CONNECT_V3_1_1: &[u8] = &[
    0x10, 0x14, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x08, b's', b'i',
    b'l', b't', b'-', b'c', b'a', b'p',
];
const CONNECT_V5: &[u8] = &[
    0x10, 0x18, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c, 0x03, 0x21, 0x00, 0x14,
    0x00, 0x08, b's', b'i', b'l', b't', b'-', b'c', b'a', b'p',
];

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    // Small limits (64 B to 8 KiB) so the fuzzer reaches them; reads of 1 to 32 bytes.
    let limit = 64u32 << (control & 0x07);
    let chunk = usize::from(control >> 3) + 1;

    connection(stream, chunk, limit);
    for connect in [CONNECT_V3_1_1, CONNECT_V5] {
        let mut prefixed = connect.to_vec();
        prefixed.extend_from_slice(stream);
        connection(&prefixed, chunk, limit);
    }
});

/// Runs `input` through detection and a decoder as a connection does.
fn connection(mut input: &[u8], chunk: usize, limit: u32) {
    let mut buf = BytesMut::new();
    let mut decoder: Option<Decoder> = None;
    loop {
        let needed = match frame_bytes_needed(&buf, limit) {
            Ok(needed) => needed,
            Err(_) => {
                match &mut decoder {
                    Some(decoder) => assert!(decoder.decode(&mut buf).is_err()),
                    None => assert!(detect_protocol(&buf, limit).is_err()),
                }
                return;
            }
        };
        assert!(needed <= limit as usize, "needed {needed} > limit {limit}");
        let whole = buf.len() >= needed;
        let progress = match &mut decoder {
            None => match detect_protocol(&buf, limit) {
                Ok(Some(version)) => {
                    decoder = Some(Decoder::new(version, limit));
                    true
                }
                Ok(None) => {
                    assert!(!whole, "a whole CONNECT always decides the version");
                    false
                }
                Err(error) => {
                    assert_reason(error.reason_code());
                    return;
                }
            },
            Some(decoder) => {
                let before = Bytes::copy_from_slice(&buf);
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        assert!(whole);
                        assert_eq!(&before[needed..], &buf[..], "consumed one whole frame");
                        check_publish_round_trip(&frame, limit);
                        true
                    }
                    Ok(None) => {
                        assert_eq!(&before[..], &buf[..], "waiting leaves the buffer alone");
                        assert!(!whole, "a whole frame always decodes or fails");
                        false
                    }
                    Err(error) => {
                        assert_reason(error.reason_code());
                        return;
                    }
                }
            }
        };
        if !progress {
            if input.is_empty() {
                return;
            }
            let take = chunk.min(input.len()).min(needed - buf.len());
            buf.extend_from_slice(&input[..take]);
            input = &input[take..];
            assert!(buf.len() <= limit as usize);
        }
    }
}

fn assert_reason(reason_code: u8) {
    assert!(
        matches!(reason_code, 0x81 | 0x82 | 0x84 | 0x95),
        "unexpected reason code {reason_code:#04x}"
    );
}

/// A decoded PUBLISH, written again by rumqttc, decodes to the same packet.
fn check_publish_round_trip(frame: &Frame, limit: u32) {
    let (version, connect, mut bytes) = match frame {
        Frame::V4(packet @ v4::Packet::Publish(_)) => {
            let mut bytes = BytesMut::new();
            packet
                .write(&mut bytes, usize::MAX)
                .expect("a decoded PUBLISH encodes");
            (ProtocolVersion::V3_1_1, CONNECT_V3_1_1, bytes)
        }
        Frame::V5(packet @ v5::Packet::Publish(_)) => {
            let mut bytes = BytesMut::new();
            packet
                .write(&mut bytes, None)
                .expect("a decoded PUBLISH encodes");
            (ProtocolVersion::V5, CONNECT_V5, bytes)
        }
        _ => return,
    };
    let mut decoder = Decoder::new(version, limit.max(u32::try_from(bytes.len()).unwrap()));
    let connected = decoder.decode(&mut BytesMut::from(connect));
    assert!(matches!(connected, Ok(Some(_))));
    let again = decoder
        .decode(&mut bytes)
        .expect("a re-encoded PUBLISH decodes")
        .expect("a re-encoded PUBLISH is whole");
    assert_eq!(&again, frame);
    assert!(bytes.is_empty());
}
