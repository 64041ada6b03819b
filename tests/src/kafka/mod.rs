//! A raw Kafka protocol client for tests: hand-built frames, so tests can send exactly the
//! bytes they mean (garbage, truncated requests, unknown apis, replayed idempotent batches)
//! and read the answer, or see the connection closed, with a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The Produce api key.
pub const PRODUCE: i16 = 0;

/// How long a raw exchange waits for an answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(20);

/// A connection to a Kafka listener.
#[derive(Debug)]
pub struct RawKafka {
    stream: TcpStream,
    next_correlation_id: i32,
}

/// What came back for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The response, without its size prefix: correlation id first.
    Response(Vec<u8>),
    /// The server closed the connection.
    Closed,
}

impl RawKafka {
    /// Connects, with read and write deadlines of [`RESPONSE_TIMEOUT`].
    ///
    /// # Panics
    /// If the connection fails.
    pub fn connect(addr: SocketAddr) -> RawKafka {
        let stream = TcpStream::connect_timeout(&addr, RESPONSE_TIMEOUT)
            .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
        stream.set_read_timeout(Some(RESPONSE_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(RESPONSE_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawKafka {
            stream,
            next_correlation_id: 1,
        }
    }

    /// Writes raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends a request with a v1 header (api, version, correlation id, client id "raw") and
    /// `body`; returns its correlation id. For flexible versions pass `flexible`, which adds
    /// the header's empty tagged fields.
    pub fn send(&mut self, api_key: i16, version: i16, flexible: bool, body: &[u8]) -> i32 {
        let correlation_id = self.next_correlation_id;
        self.next_correlation_id += 1;
        let mut request = Vec::new();
        request.extend_from_slice(&api_key.to_be_bytes());
        request.extend_from_slice(&version.to_be_bytes());
        request.extend_from_slice(&correlation_id.to_be_bytes());
        request.extend_from_slice(&3i16.to_be_bytes());
        request.extend_from_slice(b"raw");
        if flexible {
            request.push(0);
        }
        request.extend_from_slice(body);
        let mut frame = (request.len() as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&request);
        self.send_bytes(&frame);
        correlation_id
    }

    /// Reads one response frame, or sees the connection closed.
    ///
    /// # Panics
    /// If nothing comes within [`RESPONSE_TIMEOUT`].
    pub fn read_answer(&mut self) -> Answer {
        let mut size = [0u8; 4];
        match self.stream.read_exact(&mut size) {
            Ok(()) => {}
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Answer::Closed;
            }
            Err(error) => panic!("no answer within {RESPONSE_TIMEOUT:?}: {error}"),
        }
        let size = i32::from_be_bytes(size);
        assert!((4..64 << 20).contains(&size), "response size {size}");
        let mut body = vec![0u8; size as usize];
        self.stream.read_exact(&mut body).unwrap();
        Answer::Response(body)
    }

    /// Reads whatever comes until the server closes the connection; returns how many bytes
    /// came.
    ///
    /// # Panics
    /// If the connection stays open with nothing to read for [`RESPONSE_TIMEOUT`].
    pub fn read_until_closed(&mut self) -> usize {
        let mut received = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return received,
                Ok(n) => received += n,
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                    return received;
                }
                Err(error) => panic!("still open after {received} bytes: {error}"),
            }
        }
    }

    /// Reads one response, which must be there.
    ///
    /// # Panics
    /// If the connection closed instead.
    pub fn read_response(&mut self) -> Vec<u8> {
        match self.read_answer() {
            Answer::Response(body) => body,
            Answer::Closed => panic!("the server closed the connection"),
        }
    }
}

/// Big-endian readers over a response.
#[derive(Debug)]
pub struct Reader<'a> {
    pub bytes: &'a [u8],
}

impl Reader<'_> {
    pub fn i16(&mut self) -> i16 {
        let (head, rest) = self.bytes.split_at(2);
        self.bytes = rest;
        i16::from_be_bytes(head.try_into().unwrap())
    }
    pub fn i32(&mut self) -> i32 {
        let (head, rest) = self.bytes.split_at(4);
        self.bytes = rest;
        i32::from_be_bytes(head.try_into().unwrap())
    }
    pub fn i64(&mut self) -> i64 {
        let (head, rest) = self.bytes.split_at(8);
        self.bytes = rest;
        i64::from_be_bytes(head.try_into().unwrap())
    }
    pub fn string(&mut self) -> String {
        let len = self.i16();
        let (head, rest) = self.bytes.split_at(len.max(0) as usize);
        self.bytes = rest;
        String::from_utf8(head.to_vec()).unwrap()
    }
}

/// The body of a Produce v3 request: no transactional id, `acks`, one topic, one partition.
pub fn produce_v3_body(topic: &str, partition: i32, acks: i16, records: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i16).to_be_bytes());
    body.extend_from_slice(&acks.to_be_bytes());
    body.extend_from_slice(&30_000i32.to_be_bytes());
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&partition.to_be_bytes());
    body.extend_from_slice(&(records.len() as i32).to_be_bytes());
    body.extend_from_slice(records);
    body
}

/// (error code, base offset) of a Produce v3 response for one topic and partition.
pub fn produce_v3_result(response: &[u8]) -> (i16, i64) {
    let mut reader = Reader { bytes: response };
    let _correlation_id = reader.i32();
    assert_eq!(reader.i32(), 1, "one topic");
    let _topic = reader.string();
    assert_eq!(reader.i32(), 1, "one partition");
    let _partition = reader.i32();
    let error = reader.i16();
    let base_offset = reader.i64();
    (error, base_offset)
}

/// The body of a Fetch v4 request for one partition.
pub fn fetch_v4_body(
    topic: &str,
    partition: i32,
    offset: i64,
    max_wait_ms: i32,
    min_bytes: i32,
    partition_max_bytes: i32,
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(-1i32).to_be_bytes());
    body.extend_from_slice(&max_wait_ms.to_be_bytes());
    body.extend_from_slice(&min_bytes.to_be_bytes());
    body.extend_from_slice(&(50i32 << 20).to_be_bytes());
    body.push(0);
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&(topic.len() as i16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&1i32.to_be_bytes());
    body.extend_from_slice(&partition.to_be_bytes());
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&partition_max_bytes.to_be_bytes());
    body
}

/// One partition of a Fetch v4 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPartition {
    pub error_code: i16,
    pub high_watermark: i64,
    pub records: Vec<u8>,
}

/// The one partition of a Fetch v4 response for one topic and partition.
pub fn fetch_v4_result(response: &[u8]) -> FetchedPartition {
    let mut reader = Reader { bytes: response };
    let _correlation_id = reader.i32();
    let _throttle = reader.i32();
    assert_eq!(reader.i32(), 1, "one topic");
    let _topic = reader.string();
    assert_eq!(reader.i32(), 1, "one partition");
    let _partition = reader.i32();
    let error_code = reader.i16();
    let high_watermark = reader.i64();
    let _last_stable = reader.i64();
    let aborted = reader.i32();
    assert!(aborted <= 0, "no aborted transactions");
    let len = reader.i32();
    let records = reader.bytes[..len.max(0) as usize].to_vec();
    FetchedPartition {
        error_code,
        high_watermark,
        records,
    }
}

impl RawKafka {
    /// Produces `records` (RecordBatch v2 bytes) to partition 0 of `topic` with acks=all over
    /// Produce v3; returns the partition's error code and base offset.
    pub fn produce(&mut self, topic: &str, records: &[u8]) -> (i16, i64) {
        self.send(PRODUCE, 3, false, &produce_v3_body(topic, 0, -1, records));
        produce_v3_result(&self.read_response())
    }
}

/// One RecordBatch v2 holding `values`, each with `key`, timestamp 1,700,000,000,000 and no
/// headers, as a plain (not idempotent) producer sends it.
pub fn value_batch(key: Option<&str>, values: &[&str]) -> Vec<u8> {
    use silt_log::batch::{BatchSpec, Record, encode_batch};
    let records: Vec<Record> = values
        .iter()
        .map(|value| Record {
            timestamp: 1_700_000_000_000,
            key: key.map(|key| key.as_bytes().to_vec().into()),
            value: Some(value.as_bytes().to_vec().into()),
            headers: Vec::new(),
        })
        .collect();
    let mut out = bytes::BytesMut::new();
    encode_batch(&BatchSpec::default(), &records, &mut out).unwrap();
    out.to_vec()
}
