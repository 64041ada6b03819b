//! Fuzzes the uplink frame decoder: any bytes give a frame, "incomplete" or an error, never a
//! panic; a decoded frame re-encodes to the bytes it came from; a data payload decompresses
//! within its bound.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use silt_wire::{Frame, decompress_batches};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = Frame::decode(rest) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        assert_eq!(&out[..], &rest[..used]);
        if let Frame::Data { codec, raw_len, payload, .. } = frame {
            let _ = decompress_batches(codec, raw_len, bytes::Bytes::copy_from_slice(payload));
        }
        rest = &rest[used..];
    }
});
