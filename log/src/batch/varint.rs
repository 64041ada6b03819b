//! Zigzag varints and varlongs as Kafka writes them inside records (`ByteUtils.writeVarint`).
//!
//! A value is zigzag-mapped (0, -1, 1, -2, ... become 0, 1, 2, 3, ...) and written seven bits
//! at a time, least significant group first, with the high bit of each byte saying another byte
//! follows. An `i32` takes at most [`VARINT_BYTES_MAX`] bytes and an `i64` at most
//! [`VARLONG_BYTES_MAX`].
//!
//! Decoding accepts what Kafka's Java reader accepts, with one deliberate exception: in the
//! last possible byte, bits that do not fit the type are an error here, where Java silently
//! drops them. Such bytes were never written by an encoder, so they mean corruption. Non-minimal
//! encodings (`0x80 0x00` for zero) are accepted, like Java does.

use bytes::BufMut;

use super::BatchError;

/// Most bytes a zigzag-encoded `i32` can take.
pub const VARINT_BYTES_MAX: usize = 5;
/// Most bytes a zigzag-encoded `i64` can take.
pub const VARLONG_BYTES_MAX: usize = 10;

const CONTINUATION_BIT: u8 = 0x80;
const PAYLOAD_BITS: u8 = 0x7f;

/// Appends `value` as a zigzag varint; writes 1 to 5 bytes.
pub fn put_varint<B: BufMut + ?Sized>(out: &mut B, value: i32) {
    put_unsigned(out, u64::from(zigzag_i32(value)));
}

/// Appends `value` as a zigzag varlong; writes 1 to 10 bytes.
pub fn put_varlong<B: BufMut + ?Sized>(out: &mut B, value: i64) {
    put_unsigned(out, zigzag_i64(value));
}

/// Bytes [`put_varint`] writes for `value`.
pub fn varint_len(value: i32) -> usize {
    unsigned_len(u64::from(zigzag_i32(value)))
}

/// Bytes [`put_varlong`] writes for `value`.
pub fn varlong_len(value: i64) -> usize {
    unsigned_len(zigzag_i64(value))
}

/// Reads a zigzag varint from the front of `buf`, returning the value and the bytes it took.
///
/// Fails with [`BatchError::Corrupt`] when `buf` ends inside the varint, when it runs past
/// [`VARINT_BYTES_MAX`] bytes, or when its last byte carries bits beyond 32.
pub fn read_varint(buf: &[u8]) -> Result<(i32, usize), BatchError> {
    // Most varints in a batch (lengths, deltas, counts) take one byte.
    if let Some(&byte) = buf.first()
        && byte & CONTINUATION_BIT == 0
    {
        return Ok((unzigzag_u32(u32::from(byte)), 1));
    }
    let corrupt = |malformed| {
        BatchError::Corrupt(match malformed {
            Malformed::Truncated => "truncated varint",
            Malformed::TooLong => "varint longer than 5 bytes",
            Malformed::Overflow => "varint overflows 32 bits",
        })
    };
    let (raw, consumed) = read_unsigned(buf, VARINT_BYTES_MAX).map_err(corrupt)?;
    let raw = u32::try_from(raw).map_err(|_| corrupt(Malformed::Overflow))?;
    Ok((unzigzag_u32(raw), consumed))
}

/// Reads a zigzag varlong from the front of `buf`, returning the value and the bytes it took.
///
/// Fails with [`BatchError::Corrupt`] when `buf` ends inside the varlong, when it runs past
/// [`VARLONG_BYTES_MAX`] bytes, or when its last byte carries bits beyond 64.
pub fn read_varlong(buf: &[u8]) -> Result<(i64, usize), BatchError> {
    let (raw, consumed) = read_unsigned(buf, VARLONG_BYTES_MAX).map_err(|malformed| {
        BatchError::Corrupt(match malformed {
            Malformed::Truncated => "truncated varlong",
            Malformed::TooLong => "varlong longer than 10 bytes",
            Malformed::Overflow => "varlong overflows 64 bits",
        })
    })?;
    Ok((unzigzag_u64(raw), consumed))
}

fn zigzag_i32(value: i32) -> u32 {
    ((value << 1) ^ (value >> 31)) as u32
}

fn zigzag_i64(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag_u32(raw: u32) -> i32 {
    ((raw >> 1) as i32) ^ -((raw & 1) as i32)
}

fn unzigzag_u64(raw: u64) -> i64 {
    ((raw >> 1) as i64) ^ -((raw & 1) as i64)
}

fn put_unsigned<B: BufMut + ?Sized>(out: &mut B, mut raw: u64) {
    while raw >= u64::from(CONTINUATION_BIT) {
        out.put_u8((raw as u8 & PAYLOAD_BITS) | CONTINUATION_BIT);
        raw >>= 7;
    }
    out.put_u8(raw as u8);
}

fn unsigned_len(raw: u64) -> usize {
    // Seven payload bits per byte, and zero still takes one byte.
    let significant_bits = (u64::BITS - raw.leading_zeros()).max(1) as usize;
    significant_bits.div_ceil(7)
}

/// How a LEB128 value at the front of a buffer is malformed.
enum Malformed {
    Truncated,
    TooLong,
    Overflow,
}

/// Reads up to `bytes_max` bytes of an unsigned LEB128 value. The caller narrows the result
/// to 32 bits for varints; here only bits beyond 64 can overflow.
fn read_unsigned(buf: &[u8], bytes_max: usize) -> Result<(u64, usize), Malformed> {
    let mut raw: u64 = 0;
    for (index, &byte) in buf.iter().take(bytes_max).enumerate() {
        let shift = 7 * index as u32;
        let payload = u64::from(byte & PAYLOAD_BITS);
        // The tenth byte of a varlong has room for one bit only.
        if shift == 63 && payload > 1 {
            return Err(Malformed::Overflow);
        }
        raw |= payload << shift;
        if byte & CONTINUATION_BIT == 0 {
            return Ok((raw, index + 1));
        }
    }
    if buf.len() < bytes_max {
        Err(Malformed::Truncated)
    } else {
        Err(Malformed::TooLong)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_varint(value: i32) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, value);
        out
    }

    fn encoded_varlong(value: i64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varlong(&mut out, value);
        out
    }

    #[test]
    fn known_encodings_match_kafka() {
        // Values from Kafka's ByteUtilsTest.
        assert_eq!(encoded_varint(0), [0x00]);
        assert_eq!(encoded_varint(-1), [0x01]);
        assert_eq!(encoded_varint(1), [0x02]);
        assert_eq!(encoded_varint(63), [0x7e]);
        assert_eq!(encoded_varint(-64), [0x7f]);
        assert_eq!(encoded_varint(64), [0x80, 0x01]);
        assert_eq!(encoded_varint(i32::MAX), [0xfe, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(encoded_varint(i32::MIN), [0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(encoded_varlong(i64::MIN).len(), VARLONG_BYTES_MAX);
        assert_eq!(
            encoded_varlong(i64::MAX),
            [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn lengths_match_encodings() {
        for value in [0, 1, -1, 63, -64, 64, -65, 8191, 8192, i32::MAX, i32::MIN] {
            assert_eq!(varint_len(value), encoded_varint(value).len(), "{value}");
            let long = i64::from(value);
            assert_eq!(varlong_len(long), encoded_varlong(long).len(), "{value}");
        }
        assert_eq!(varlong_len(i64::MAX), VARLONG_BYTES_MAX);
    }

    #[test]
    fn non_minimal_encoding_is_accepted() {
        assert_eq!(read_varint(&[0x80, 0x00]), Ok((0, 2)));
        assert_eq!(read_varlong(&[0x81, 0x80, 0x00, 0xaa]), Ok((-1, 3)));
    }

    #[test]
    fn malformed_encodings_are_errors() {
        assert!(read_varint(&[]).is_err());
        assert!(read_varint(&[0x80]).is_err());
        assert!(read_varint(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x00]).is_err());
        // Fifth byte with bits above 32.
        assert!(read_varint(&[0xff, 0xff, 0xff, 0xff, 0x1f]).is_err());
        assert!(read_varlong(&[0xff; 10]).is_err());
        let mut eleven = vec![0x80; 10];
        eleven.push(0x00);
        assert!(read_varlong(&eleven).is_err());
        let mut tenth_too_big = vec![0xff; 9];
        tenth_too_big.push(0x02);
        assert!(read_varlong(&tenth_too_big).is_err());
    }
}
