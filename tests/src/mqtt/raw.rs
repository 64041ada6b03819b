//! MQTT packets built byte by byte, and a raw TCP connection that reads packets and notices
//! when the broker closes it, for tests that send what no client library would.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Version;

/// The largest packet [`RawConn`] reads; the broker under test never sends more to it.
const READ_PACKET_BYTES_MAX: usize = 1 << 20;

/// Appends MQTT's variable byte integer (remaining length, property length).
pub fn put_varint(mut value: usize, out: &mut Vec<u8>) {
    assert!(
        value < 1 << 28,
        "{value} does not fit a variable byte integer"
    );
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

/// Appends a two-byte-length-prefixed string.
pub fn put_str(text: &str, out: &mut Vec<u8>) {
    put_bytes(text.as_bytes(), out);
}

/// Appends two-byte-length-prefixed binary data.
pub fn put_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    let len = u16::try_from(bytes.len()).expect("at most 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A whole packet: the first byte, the remaining length, the body.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    put_varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A raw CONNECT's contents.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The protocol level byte (4 for 3.1.1, 5 for 5.0; anything else to test refusals).
    pub level: u8,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive_secs: u16,
    /// Will topic, payload and QoS.
    pub will: Option<(String, Vec<u8>, u8)>,
    /// 5.0 Session Expiry Interval.
    pub session_expiry_secs: Option<u32>,
}

impl Connect {
    /// A clean CONNECT for `version` with a 30 s keep-alive.
    pub fn new(version: Version, client_id: &str) -> Connect {
        Connect {
            level: version.level(),
            client_id: client_id.to_string(),
            clean: true,
            keep_alive_secs: 30,
            will: None,
            session_expiry_secs: None,
        }
    }

    /// The packet's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.level == 5;
        let mut body = Vec::new();
        put_str("MQTT", &mut body);
        body.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some((_, _, qos)) = &self.will {
            flags |= 0x04 | (qos << 3);
        }
        body.push(flags);
        body.extend_from_slice(&self.keep_alive_secs.to_be_bytes());
        if v5 {
            let mut properties = Vec::new();
            if let Some(expiry) = self.session_expiry_secs {
                properties.push(0x11);
                properties.extend_from_slice(&expiry.to_be_bytes());
            }
            put_varint(properties.len(), &mut body);
            body.extend_from_slice(&properties);
        }
        put_str(&self.client_id, &mut body);
        if let Some((topic, payload, _)) = &self.will {
            if v5 {
                body.push(0); // no will properties
            }
            put_str(topic, &mut body);
            put_bytes(payload, &mut body);
        }
        packet(0x10, &body)
    }
}

/// A PUBLISH; `pkid` must be given for QoS 1 and 2 (tests that omit it build the bytes
/// themselves).
pub fn publish(
    version: Version,
    topic: &str,
    qos: u8,
    pkid: Option<u16>,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(topic, &mut body);
    if let Some(pkid) = pkid {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == Version::V5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// A SUBSCRIBE for one filter.
pub fn subscribe(version: Version, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0); // no properties
    }
    put_str(filter, &mut body);
    body.push(qos);
    packet(0x82, &body)
}

/// PINGREQ.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// DISCONNECT: normal disconnection in both versions.
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A packet read from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub first_byte: u8,
    pub body: Vec<u8>,
}

impl Packet {
    /// The packet type, the high nibble of the first byte (2 = CONNACK, 14 = DISCONNECT).
    pub fn kind(&self) -> u8 {
        self.first_byte >> 4
    }

    /// The CONNACK return code (3.1.1) or reason code (5.0).
    pub fn connack_code(&self) -> Option<u8> {
        (self.kind() == 2)
            .then(|| self.body.get(1).copied())
            .flatten()
    }

    /// The DISCONNECT reason code (5.0; a DISCONNECT with no body means 0).
    pub fn disconnect_reason(&self) -> Option<u8> {
        (self.kind() == 14).then(|| self.body.first().copied().unwrap_or(0))
    }
}

/// How a raw connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Packets the broker sent before closing.
    pub packets: Vec<Packet>,
    /// When the close was seen.
    pub at: Instant,
}

impl Closed {
    /// The reason code of the DISCONNECT the broker sent before closing, if it sent one.
    pub fn disconnect_reason(&self) -> Option<u8> {
        self.packets.iter().find_map(Packet::disconnect_reason)
    }
}

/// A TCP connection to the broker that sends whatever bytes a test gives it.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buffer: Vec<u8>,
    eof: bool,
}

impl RawConn {
    /// Opens a TCP connection, nothing sent yet.
    pub async fn open(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|error| panic!("cannot connect to {addr}: {error}"));
        stream.set_nodelay(true).unwrap();
        RawConn {
            stream,
            buffer: Vec::new(),
            eof: false,
        }
    }

    /// Opens a connection, sends `connect` and requires a successful CONNACK.
    pub async fn connected(addr: SocketAddr, connect: &Connect) -> RawConn {
        let mut conn = RawConn::open(addr).await;
        conn.send(&connect.encode()).await;
        let connack = conn
            .read_packet(super::MQTT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no CONNACK for {connect:?}"));
        assert_eq!(connack.connack_code(), Some(0), "{connack:?}");
        conn
    }

    /// Sends `bytes`. A broker that already closed the connection may make this fail, which
    /// tests of bad input expect, so the error is ignored; the close is seen when reading.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Sends `bytes` and reports whether the broker took them all.
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// The next packet, or `None` if the connection closed or `timeout` passed first.
    pub async fn read_packet(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(packet) = self.take_packet() {
                return Some(packet);
            }
            if self.eof || !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// Reads until the broker closes the connection (EOF or reset), and returns the packets it
    /// sent first.
    ///
    /// # Panics
    /// If the connection is still open after `timeout`.
    pub async fn expect_closed(&mut self, timeout: Duration) -> Closed {
        let deadline = Instant::now() + timeout;
        let mut packets = Vec::new();
        loop {
            while let Some(packet) = self.take_packet() {
                packets.push(packet);
            }
            if self.eof {
                return Closed {
                    packets,
                    at: Instant::now(),
                };
            }
            if !self.fill(deadline).await {
                panic!("the broker kept the connection open for {timeout:?}; it sent {packets:?}");
            }
        }
    }

    /// Reads more bytes; false if the deadline passed. EOF and errors (a reset) set `eof`.
    async fn fill(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                true
            }
            Ok(Ok(read)) => {
                self.buffer.extend_from_slice(&chunk[..read]);
                assert!(
                    self.buffer.len() <= READ_PACKET_BYTES_MAX + 5,
                    "the broker sent more than {READ_PACKET_BYTES_MAX} bytes unasked"
                );
                true
            }
        }
    }

    fn take_packet(&mut self) -> Option<Packet> {
        let mut remaining = 0usize;
        let mut multiplier = 1usize;
        let mut index = 1;
        loop {
            let byte = *self.buffer.get(index)?;
            remaining += usize::from(byte & 0x7F) * multiplier;
            multiplier *= 128;
            index += 1;
            if byte & 0x80 == 0 {
                break;
            }
            assert!(index <= 4, "the broker sent a malformed remaining length");
        }
        assert!(
            remaining <= READ_PACKET_BYTES_MAX,
            "the broker sent a huge packet"
        );
        if self.buffer.len() < index + remaining {
            return None;
        }
        let packet = Packet {
            first_byte: self.buffer[0],
            body: self.buffer[index..index + remaining].to_vec(),
        };
        self.buffer.drain(..index + remaining);
        Some(packet)
    }
}
