//! Kafka's framing as a pure codec on the caller's buffer: a 4-byte big-endian size, then a
//! request of that many bytes, whose header starts with api key, api version and correlation
//! id. "Incomplete" is a normal result; a size over the limit is an error that closes the
//! connection, as Kafka's `socket.request.max.bytes` does.

/// Bytes of the size prefix.
pub const SIZE_PREFIX_BYTES: usize = 4;
/// Bytes of api key, api version and correlation id, the start of every request header.
pub const HEADER_PREFIX_BYTES: usize = 8;

/// Why a frame cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("request size {size} is over the limit of {max} bytes")]
    TooLarge { size: i64, max: u32 },
    #[error("request size {0} is negative or too small for a request header")]
    BadSize(i32),
}

/// The length of the complete frame at the start of `buf` (prefix included), `None` while
/// it is incomplete.
pub fn frame_len(buf: &[u8], max_request_bytes: u32) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..SIZE_PREFIX_BYTES) else {
        return Ok(None);
    };
    let size = i32::from_be_bytes(prefix.try_into().expect("four bytes"));
    if size < HEADER_PREFIX_BYTES as i32 {
        return Err(FrameError::BadSize(size));
    }
    if size as u32 > max_request_bytes {
        return Err(FrameError::TooLarge {
            size: size.into(),
            max: max_request_bytes,
        });
    }
    let total = SIZE_PREFIX_BYTES + size as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// The length of the frame starting `buf` (prefix included) once its size prefix is there,
/// complete or not; the size is not checked (see [`frame_len`]).
pub fn pending_frame_len(buf: &[u8]) -> Option<usize> {
    let prefix = buf.get(..SIZE_PREFIX_BYTES)?;
    let size = i32::from_be_bytes(prefix.try_into().expect("four bytes"));
    Some(SIZE_PREFIX_BYTES + usize::try_from(size).ok()?)
}

/// The first fields of a request header, readable whatever the api and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPrefix {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

/// Reads the header prefix of a request (the frame without its size prefix).
pub fn header_prefix(request: &[u8]) -> Option<HeaderPrefix> {
    let bytes = request.get(..HEADER_PREFIX_BYTES)?;
    Some(HeaderPrefix {
        api_key: i16::from_be_bytes([bytes[0], bytes[1]]),
        api_version: i16::from_be_bytes([bytes[2], bytes[3]]),
        correlation_id: i32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_incomplete_complete_or_refused() {
        assert_eq!(frame_len(&[0, 0], 100), Ok(None));
        let mut frame = 10i32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 9]);
        assert_eq!(frame_len(&frame, 100), Ok(None));
        frame.push(0);
        assert_eq!(frame_len(&frame, 100), Ok(Some(14)));
        frame.push(7);
        assert_eq!(
            frame_len(&frame, 100),
            Ok(Some(14)),
            "trailing bytes are the next frame"
        );
        assert_eq!(
            frame_len(&101i32.to_be_bytes(), 100),
            Err(FrameError::TooLarge {
                size: 101,
                max: 100
            })
        );
        assert_eq!(
            frame_len(&(-1i32).to_be_bytes(), 100),
            Err(FrameError::BadSize(-1))
        );
        assert_eq!(
            frame_len(&3i32.to_be_bytes(), 100),
            Err(FrameError::BadSize(3))
        );
    }

    #[test]
    fn pending_frame_len_reads_the_prefix_of_an_incomplete_frame() {
        assert_eq!(pending_frame_len(&[0, 0, 1]), None);
        assert_eq!(pending_frame_len(&[0, 0, 1, 0, 9]), Some(260));
        assert_eq!(pending_frame_len(&(-5i32).to_be_bytes()), None);
    }

    #[test]
    fn header_prefix_reads_key_version_and_correlation_id() {
        let bytes = [0, 18, 0, 3, 0, 0, 1, 2, 9];
        assert_eq!(
            header_prefix(&bytes),
            Some(HeaderPrefix {
                api_key: 18,
                api_version: 3,
                correlation_id: 258
            })
        );
        assert_eq!(header_prefix(&bytes[..7]), None);
    }
}
