//! One load client: a TCP connection that sends CONNECT, then publishes as fast as the broker
//! lets it, and times each QoS 1/2 publish from the write that carried it to its
//! acknowledgement (PUBACK, or PUBCOMP after PUBREC/PUBREL).
//!
//! At QoS 1/2 the client keeps up to `window` packet ids unacknowledged: every read of acks
//! frees ids, and the freed ids go out again in one write. At QoS 0 nothing comes back, so it
//! writes publishes in large batches as fast as TCP takes them, then sends PINGREQ: a broker
//! handles a connection's packets in order, so the PINGRESP proves every publish before it
//! was read, and the client's time ends there.
//!
//! Every wait for the broker has a deadline, so a broker that stops answering (or withholds
//! PUBACKs, as a full disk may make it do in 3.1.1) ends the client with an error, never a
//! hang.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::{Codec, ConnectSpec, DecodeError, INCOMING_PACKET_BYTES_MAX, Incoming};
use super::histogram::Histogram;

/// Bytes asked of the socket per read; acks are 4 to a few dozen bytes, so one read takes
/// thousands.
const READ_CHUNK_BYTES: usize = 16 << 10;
/// At QoS 0, publishes are gathered until a write holds this many bytes.
const QOS0_WRITE_BYTES: usize = 64 << 10;

/// Why a client stopped before its plan was done.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    // Not a `source`: the message already says it, and reports print only the top level.
    #[error("connection error: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the broker closed the connection while {0}")]
    Closed(&'static str),
    #[error("no reply from the broker within {timeout:?} while {waiting_for}")]
    Timeout {
        timeout: Duration,
        waiting_for: &'static str,
    },
    #[error("the broker refused the connection: {0}")]
    Refused(String),
    #[error("the broker sent DISCONNECT ({0})")]
    Disconnected(String),
    #[error("protocol violation by the broker: {0}")]
    Protocol(String),
}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> Self {
        ClientError::Io(error)
    }
}

/// When a client stops publishing.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stop {
    /// After this many publishes.
    After(u64),
    /// At this instant; publishes in flight are still awaited.
    At(Instant),
}

impl Stop {
    fn may_send(self, sent: u64, now: Instant) -> bool {
        match self {
            Stop::After(limit) => sent < limit,
            Stop::At(deadline) => now < deadline,
        }
    }
}

/// What one client did in a run.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Publishes acknowledged with success (QoS 1/2), or sent and confirmed by PINGRESP
    /// (QoS 0).
    pub(crate) completed: u64,
    /// Publishes the broker acknowledged with a failure reason code (v5).
    pub(crate) failed: u64,
    /// The reason code of the first of those.
    pub(crate) first_failure: Option<String>,
    /// Write-to-acknowledgement latency of each completed QoS 1/2 publish.
    pub(crate) latencies: Histogram,
    /// When the client's last publish was confirmed (or it gave up).
    pub(crate) finished: Instant,
    /// Why the client stopped early, if it did.
    pub(crate) error: Option<ClientError>,
}

/// A connected client, ready to publish.
#[derive(Debug)]
pub(crate) struct Client {
    stream: TcpStream,
    codec: Codec,
    input: BytesMut,
    output: BytesMut,
    /// Unacknowledged publishes allowed: `--inflight`, lowered to the broker's v5 Receive
    /// Maximum.
    window: u16,
    timeout: Duration,
}

impl Client {
    /// Opens a connection to `addr` and completes CONNECT/CONNACK, waiting at most `timeout`
    /// for each step.
    pub(crate) async fn connect(
        addr: SocketAddr,
        codec: Codec,
        spec: &ConnectSpec,
        window: u16,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                timeout,
                waiting_for: "opening the TCP connection",
            })?
            .map_err(|error| ClientError::Connect { addr, error })?;
        // Acks and publishes are small: Nagle's algorithm would hold them back and measure
        // our own socket, not the broker.
        stream.set_nodelay(true)?;
        let mut client = Client {
            stream,
            codec,
            input: BytesMut::with_capacity(READ_CHUNK_BYTES),
            output: BytesMut::with_capacity(QOS0_WRITE_BYTES * 2),
            window,
            timeout,
        };
        client.codec.connect(spec, &mut client.output);
        client.flush().await?;
        match client.next_packet("waiting for CONNACK").await? {
            Incoming::ConnAck {
                refused: Some(reason),
                ..
            } => Err(ClientError::Refused(reason)),
            Incoming::ConnAck {
                receive_maximum, ..
            } => {
                if let Some(maximum) = receive_maximum {
                    client.window = client.window.min(maximum.max(1));
                }
                Ok(client)
            }
            Incoming::Disconnect { reason } => Err(ClientError::Disconnected(reason)),
            other => Err(ClientError::Protocol(format!("{other:?} before CONNACK"))),
        }
    }

    /// The unacknowledged publishes this client will keep: `--inflight`, or less if the
    /// broker's Receive Maximum says so.
    pub(crate) fn window(&self) -> u16 {
        self.window
    }

    /// Publishes at `qos` until `stop`, then waits for the last confirmation.
    pub(crate) async fn run(mut self, qos: u8, stop: Stop) -> Outcome {
        let mut outcome = Outcome {
            completed: 0,
            failed: 0,
            first_failure: None,
            latencies: Histogram::new(),
            finished: Instant::now(),
            error: None,
        };
        let result = if qos == 0 {
            self.publish_unacked(stop, &mut outcome).await
        } else {
            self.publish_acked(qos, stop, &mut outcome).await
        };
        outcome.finished = Instant::now();
        match result {
            Ok(()) => {
                // The figures are complete; a broker that drops the connection first does not
                // spoil them.
                self.codec.disconnect(&mut self.output);
                let _ = self.flush().await;
                let _ = self.stream.shutdown().await;
            }
            Err(error) => outcome.error = Some(error),
        }
        outcome
    }

    async fn publish_acked(
        &mut self,
        qos: u8,
        stop: Stop,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let window = usize::from(self.window);
        // Indexed by packet id (1..=window); id 0 is never used.
        let mut slots = vec![Slot::Free; window + 1];
        let mut free_ids: Vec<u16> = (1..=self.window).rev().collect();
        // Ids encoded into `output` since the last write, stamped when it goes out.
        let mut unstamped: Vec<u16> = Vec::with_capacity(window);
        let mut sent = 0_u64;
        loop {
            let now = Instant::now();
            while stop.may_send(sent, now) {
                let Some(pkid) = free_ids.pop() else { break };
                self.codec.publish(pkid, &mut self.output);
                unstamped.push(pkid);
                sent += 1;
            }
            if !self.output.is_empty() {
                let written = Instant::now();
                for pkid in unstamped.drain(..) {
                    slots[usize::from(pkid)] = Slot::AwaitingAck(written);
                }
                self.flush().await?;
            }
            let in_flight = window - free_ids.len();
            if in_flight == 0 {
                if stop.may_send(sent, Instant::now()) {
                    continue;
                }
                return Ok(());
            }
            self.read_more("waiting for acknowledgements").await?;
            let arrived = Instant::now();
            while let Some(packet) = self.codec.decode(&mut self.input)? {
                let (ack, pkid, failure) = match packet {
                    Incoming::PubAck { pkid, failure } => (Ack::Puback, pkid, failure),
                    Incoming::PubRec { pkid, failure } => (Ack::Pubrec, pkid, failure),
                    Incoming::PubComp { pkid, failure } => (Ack::Pubcomp, pkid, failure),
                    Incoming::PingResp => continue,
                    Incoming::Disconnect { reason } => {
                        return Err(ClientError::Disconnected(reason));
                    }
                    other => {
                        return Err(ClientError::Protocol(format!(
                            "{other:?} while publishing at QoS {qos}"
                        )));
                    }
                };
                let slot = slots.get_mut(usize::from(pkid)).ok_or_else(|| {
                    ClientError::Protocol(format!("{ack:?} for packet id {pkid}, never sent"))
                })?;
                let written = match (qos, ack, *slot) {
                    (1, Ack::Puback, Slot::AwaitingAck(written))
                    | (2, Ack::Pubrec, Slot::AwaitingAck(written))
                    | (2, Ack::Pubcomp, Slot::AwaitingComp(written)) => written,
                    (_, ack, state) => {
                        return Err(ClientError::Protocol(format!(
                            "{ack:?} at QoS {qos} for packet id {pkid} in state {state:?}"
                        )));
                    }
                };
                match (failure, ack) {
                    (Some(reason), _) => {
                        // A refused publish (v5 reason code >= 0x80) ends its exchange; the
                        // id is free again.
                        outcome.failed += 1;
                        outcome.first_failure.get_or_insert(reason);
                        *slot = Slot::Free;
                        free_ids.push(pkid);
                    }
                    (None, Ack::Pubrec) => {
                        self.codec.pubrel(pkid, &mut self.output);
                        *slot = Slot::AwaitingComp(written);
                    }
                    (None, _) => {
                        outcome.completed += 1;
                        outcome
                            .latencies
                            .record(arrived.saturating_duration_since(written));
                        *slot = Slot::Free;
                        free_ids.push(pkid);
                    }
                }
            }
        }
    }

    async fn publish_unacked(
        &mut self,
        stop: Stop,
        outcome: &mut Outcome,
    ) -> Result<(), ClientError> {
        let mut sent = 0_u64;
        while stop.may_send(sent, Instant::now()) {
            while self.output.len() < QOS0_WRITE_BYTES && stop.may_send(sent, Instant::now()) {
                self.codec.publish(0, &mut self.output);
                sent += 1;
            }
            self.flush().await?;
        }
        self.codec.pingreq(&mut self.output);
        self.flush().await?;
        // Nothing but the PINGRESP is owed at QoS 0: anything else is an error.
        match self
            .next_packet("waiting for PINGRESP after the last publish")
            .await?
        {
            Incoming::PingResp => {
                outcome.completed = sent;
                Ok(())
            }
            Incoming::Disconnect { reason } => Err(ClientError::Disconnected(reason)),
            other => Err(ClientError::Protocol(format!(
                "{other:?} while publishing at QoS 0"
            ))),
        }
    }

    /// Writes everything in `output`.
    async fn flush(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.output).await?;
        self.output.clear();
        Ok(())
    }

    /// Reads at least one more byte into `input`, within the timeout.
    async fn read_more(&mut self, waiting_for: &'static str) -> Result<(), ClientError> {
        // `input` never holds more than one partial packet when this is called (every whole
        // packet was decoded first), and the codec rejects packets over its maximum, so this
        // bounds the buffer.
        debug_assert!(self.input.len() <= INCOMING_PACKET_BYTES_MAX + READ_CHUNK_BYTES);
        self.input.reserve(READ_CHUNK_BYTES);
        let read = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.input))
            .await
            .map_err(|_| ClientError::Timeout {
                timeout: self.timeout,
                waiting_for,
            })??;
        if read == 0 {
            return Err(ClientError::Closed(waiting_for));
        }
        Ok(())
    }

    /// The next whole packet, reading as needed.
    async fn next_packet(&mut self, waiting_for: &'static str) -> Result<Incoming, ClientError> {
        loop {
            if let Some(packet) = self.codec.decode(&mut self.input)? {
                return Ok(packet);
            }
            self.read_more(waiting_for).await?;
        }
    }
}

/// An acknowledgement of a QoS 1/2 publish: PUBACK, PUBREC or PUBCOMP.
#[derive(Debug, Clone, Copy)]
enum Ack {
    Puback,
    Pubrec,
    Pubcomp,
}

/// The state of one packet id at QoS 1/2, with the time its PUBLISH was written.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Free,
    AwaitingAck(Instant),
    /// QoS 2: PUBREC received, PUBREL sent.
    AwaitingComp(Instant),
}
