//! One client connection: CONNECT, then the packet loop, then the session's hand-over.
//!
//! The loop does four things at once: read and handle packets, complete publishes as the log
//! makes them durable (in arrival order, acknowledging QoS 1/2 only then), send what the
//! session's queue holds within the client's in-flight window, and write. Reading pauses
//! while too much is waiting to be written or ingested, so a slow client or a slow disk slows
//! the publisher down instead of growing buffers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
use futures_util::future::{self, Either};
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::broker::{Shared, stored_subscription};
use super::encode::{self, Ack, ConnackProperties, OutPublish};
use super::packet::{self, ClientPacket, Connect, Publish};
use super::session::{Message, PendingWill, Queued, Session, SessionCell};
use super::{BoxFuture, IngestError, IngestRequest, lock, stopped};
use crate::mqtt::alias::{InboundAliases, OutboundAliases, OutboundTopic};
use crate::mqtt::auth::Identity;
use crate::mqtt::codec::{self, CodecError, Decoder, ProtocolVersion};
use crate::mqtt::ingest::{HEADER_QOS2_ID, qos2_id_value};
use crate::mqtt::qos::{InboundAck, InboundAction, QosError, Resend};
use crate::mqtt::store::{Op, StoredQos2};
use crate::mqtt::subscriptions::{QoS, SubscriptionError, SubscriptionId, SubscriptionOptions};
use crate::mqtt::topic::{FilterSupport, SubscriptionFilter, TopicName};

/// Bytes waiting to be written above which the connection stops reading and stops taking
/// messages from its queue.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Submissions waiting for the log above which the connection stops reading (the log's
/// queue bounds their bytes; this bounds their number).
const PENDING_MAX: usize = 8;
/// Payload bytes of publishes gathered before they are submitted to the log together.
const BATCH_BYTES_MAX: usize = 64 * 1024;
/// Publishes gathered before they are submitted to the log together.
const BATCH_PUBLISHES_MAX: usize = 512;
/// How long a closing connection waits for its publishes under way to reach the log.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the socket at most per read.
const READ_CHUNK: usize = 64 * 1024;

/// 3.1.1 CONNACK return codes (§3.2.2.3).
mod v4_code {
    pub(super) const IDENTIFIER_REJECTED: u8 = 0x02;
    pub(super) const SERVER_UNAVAILABLE: u8 = 0x03;
    pub(super) const BAD_USERNAME_OR_PASSWORD: u8 = 0x04;
    pub(super) const NOT_AUTHORIZED: u8 = 0x05;
}

/// 5.0 reason codes the connection uses.
mod rc {
    pub(super) const SUCCESS: u8 = 0x00;
    pub(super) const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub(super) const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub(super) const UNSPECIFIED: u8 = 0x80;
    pub(super) const PROTOCOL_ERROR: u8 = 0x82;
    pub(super) const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub(super) const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    pub(super) const NOT_AUTHORIZED: u8 = 0x87;
    pub(super) const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    pub(super) const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub(super) const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub(super) const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub(super) const TOPIC_NAME_INVALID: u8 = 0x90;
    pub(super) const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub(super) const QUOTA_EXCEEDED: u8 = 0x97;
    pub(super) const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
}

/// How a connection ended, which decides the will and the session's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT with reason 0x00 (or any 3.1.1 DISCONNECT): no will.
    Normal,
    /// DISCONNECT 0x04: the will goes out.
    WithWill,
    /// The network went, the keep-alive ran out, or we closed for a protocol error.
    Abnormal,
    /// Another connection took the session.
    TakenOver,
    /// The broker is shutting down: the session is kept, and so is a will with a delay
    /// (in the store, for persistent sessions: it is published after the restart unless the
    /// client reconnects first); a will without one (the session's expiry caps the delay,
    /// so every will of a session that ends now) is published now.
    Shutdown,
}

/// Runs one connection to the end.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    cert_name: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut io = Io {
        reader,
        writer,
        inbuf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
    };
    let deadline = Instant::now() + shared.config.limits.connect_timeout;
    let Some((connect, decoder)) = read_connect(&shared, &mut io, deadline).await else {
        io.close().await;
        return;
    };
    let Some(mut conn) = accept(&shared, &mut io, *connect, decoder, peer, cert_name).await else {
        io.close().await;
        return;
    };
    let end = conn.serve(&mut io).await;
    // Bounded: a client that stopped reading must not keep its session (and a connection
    // taking it over) waiting.
    let _ = tokio::time::timeout(Duration::from_secs(1), io.flush()).await;
    conn.drain().await;
    let done = conn.finish(end).await;
    io.close().await;
    // Only now may a connection that takes the session over go on: the client sees this one
    // closed before the new one is accepted.
    drop(done);
}

struct Io<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    inbuf: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Reads more bytes, at most what the next frame still needs; `false` at end of stream.
    async fn read_more(&mut self, needed: usize) -> std::io::Result<bool> {
        let n = read_into(&mut self.reader, &mut self.inbuf, needed).await?;
        metrics::counter!("silt_mqtt_bytes_in_total").increment(n as u64);
        Ok(n > 0)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let n = self.out.len();
            self.writer.write_all(&self.out).await?;
            self.out.clear();
            metrics::counter!("silt_mqtt_bytes_out_total").increment(n as u64);
        }
        self.writer.flush().await
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.writer.shutdown().await;
        })
        .await;
    }
}

/// Reads the CONNECT, or answers the client's mistake and gives up.
async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    io: &mut Io<S>,
    deadline: Instant,
) -> Option<(Box<Connect>, Decoder)> {
    let max = shared.config.limits.max_packet_bytes;
    let version = loop {
        match codec::detect_protocol(&io.inbuf, max) {
            Ok(Some(version)) => break version,
            Ok(None) => {}
            Err(error @ CodecError::PacketTooLarge { .. }) => {
                // A 5.0 client is told why; the version is in the first bytes of the body.
                let version = peek_version(io, deadline).await;
                refuse_undecodable(io, version, &error);
                return None;
            }
            Err(error) => {
                refuse_undecodable(io, None, &error);
                return None;
            }
        }
        let needed = codec::frame_bytes_needed(&io.inbuf, max).unwrap_or(2);
        match tokio::time::timeout_at(deadline, io.read_more(needed)).await {
            Ok(Ok(true)) => {}
            _ => return None,
        }
    };
    let mut decoder = Decoder::new(version, max);
    loop {
        match decoder.decode(&mut io.inbuf) {
            Ok(Some(frame)) => match packet::from_frame(frame) {
                Ok(ClientPacket::Connect(connect)) => return Some((connect, decoder)),
                Ok(_) => return None,
                Err(error) => {
                    if version == ProtocolVersion::V5 {
                        encode::connack(
                            &mut io.out,
                            true,
                            false,
                            error.reason_code(),
                            &ConnackProperties::default(),
                        );
                    }
                    return None;
                }
            },
            Ok(None) => {}
            Err(error) => {
                refuse_undecodable(io, Some(version), &error);
                return None;
            }
        }
        let needed = decoder.frame_bytes_needed(&io.inbuf).unwrap_or(2);
        match tokio::time::timeout_at(deadline, io.read_more(needed)).await {
            Ok(Ok(true)) => {}
            _ => return None,
        }
    }
}

/// The protocol version of a CONNECT too large to accept, from the few bytes that name it.
async fn peek_version<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    deadline: Instant,
) -> Option<ProtocolVersion> {
    // Fixed header (at most 5 bytes), protocol name (6) and level (1).
    const NEEDED: usize = 12;
    loop {
        match codec::detect_protocol(&io.inbuf, codec::REMAINING_LENGTH_MAX) {
            Ok(Some(version)) => return Some(version),
            Ok(None) if io.inbuf.len() < NEEDED => {}
            _ => return None,
        }
        match tokio::time::timeout_at(deadline, io.read_more(NEEDED)).await {
            Ok(Ok(true)) => {}
            _ => return None,
        }
    }
}

/// The CONNACK (if any) for a first packet that could not be decoded.
fn refuse_undecodable<S>(io: &mut Io<S>, version: Option<ProtocolVersion>, error: &CodecError) {
    metrics::counter!("silt_mqtt_connects_refused_total", "reason" => "malformed").increment(1);
    if let Some(refusal) = error.connack_refusal() {
        io.out.extend_from_slice(refusal.bytes());
    } else if version == Some(ProtocolVersion::V5) {
        encode::connack(
            &mut io.out,
            true,
            false,
            error.reason_code(),
            &ConnackProperties::default(),
        );
    }
}

fn refuse<S>(io: &mut Io<S>, v5: bool, v5_code: u8, v4: u8, reason: &'static str) {
    metrics::counter!("silt_mqtt_connects_refused_total", "reason" => reason).increment(1);
    let code = if v5 { v5_code } else { v4 };
    encode::connack(&mut io.out, v5, false, code, &ConnackProperties::default());
}

/// CONNACK for a user name and password that do not check out.
fn refuse_credentials<S>(io: &mut Io<S>, v5: bool) {
    refuse(
        io,
        v5,
        rc::BAD_USERNAME_OR_PASSWORD,
        v4_code::BAD_USERNAME_OR_PASSWORD,
        "bad_password",
    );
}

/// Checks a CONNECT, attaches the session and sends CONNACK.
async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    io: &mut Io<S>,
    connect: Connect,
    decoder: Decoder,
    peer: SocketAddr,
    cert_name: Option<String>,
) -> Option<Conn> {
    let v5 = connect.v5;
    let limits = &shared.config.limits;
    if shared.is_shutting_down() {
        refuse(io, v5, 0x89, v4_code::SERVER_UNAVAILABLE, "shutting_down");
        return None;
    }
    if shared
        .connections
        .load(std::sync::atomic::Ordering::Acquire)
        > limits.max_connections
    {
        refuse(
            io,
            v5,
            rc::QUOTA_EXCEEDED,
            v4_code::SERVER_UNAVAILABLE,
            "max_connections",
        );
        return None;
    }
    if !shared.take_connect_token() {
        refuse(
            io,
            v5,
            rc::CONNECTION_RATE_EXCEEDED,
            v4_code::SERVER_UNAVAILABLE,
            "rate",
        );
        return None;
    }
    if connect.authentication_method.is_some() {
        refuse(
            io,
            v5,
            rc::BAD_AUTHENTICATION_METHOD,
            v4_code::NOT_AUTHORIZED,
            "auth_method",
        );
        return None;
    }
    // Who is it?
    let username = match (&connect.username, &shared.passwords) {
        (Some(user), Some(_)) => {
            // A password hash costs milliseconds of CPU (more on a Pi): off the IO threads.
            let password = connect.password.clone().unwrap_or_default();
            let checker = shared.clone();
            let name = user.clone();
            let verified = tokio::task::spawn_blocking(move || {
                checker
                    .passwords
                    .as_ref()
                    .is_some_and(|passwords| passwords.verify(&name, password.as_bytes()))
            })
            .await
            .unwrap_or(false);
            if !verified {
                refuse_credentials(io, v5);
                return None;
            }
            Some(user.clone())
        }
        (Some(_), None) if !shared.config.allow_anonymous => {
            refuse_credentials(io, v5);
            return None;
        }
        // Anonymous access allowed and no password file: the name is taken as given.
        (Some(user), None) => Some(user.clone()),
        (None, _) => match cert_name {
            Some(name) => Some(name),
            None if shared.config.allow_anonymous => None,
            None => {
                refuse(
                    io,
                    v5,
                    rc::NOT_AUTHORIZED,
                    v4_code::NOT_AUTHORIZED,
                    "anonymous",
                );
                return None;
            }
        },
    };
    // The client id, or one we assign.
    let mut assigned = None;
    let client_id: Arc<str> = if connect.client_id.is_empty() {
        if !v5 && !connect.clean_start {
            refuse(
                io,
                v5,
                rc::CLIENT_ID_NOT_VALID,
                v4_code::IDENTIFIER_REJECTED,
                "client_id",
            );
            return None;
        }
        let id = format!("silt-{:016x}", random_u64());
        assigned = Some(id.clone());
        Arc::from(id)
    } else {
        Arc::from(connect.client_id.as_str())
    };
    let will_topic = match &connect.will {
        None => None,
        Some(will) => match TopicName::new(&will.topic) {
            Ok(topic) => {
                if let Some(acl) = &shared.acl {
                    let who = Identity {
                        client_id: &client_id,
                        username: username.as_deref(),
                    };
                    if !acl.allows_publish(&who, &topic) {
                        refuse(
                            io,
                            v5,
                            rc::NOT_AUTHORIZED,
                            v4_code::NOT_AUTHORIZED,
                            "will_acl",
                        );
                        return None;
                    }
                }
                Some(topic)
            }
            Err(_) => {
                refuse(
                    io,
                    v5,
                    rc::TOPIC_NAME_INVALID,
                    v4_code::IDENTIFIER_REJECTED,
                    "will_topic",
                );
                return None;
            }
        },
    };

    // The session.
    let requested_expiry = match connect.session_expiry {
        Some(secs) => secs,
        None if connect.clean_start => 0,
        None => u32::MAX,
    };
    let expiry_secs = requested_expiry.min(limits.max_session_expiry_secs);
    let generation = shared.next_generation();
    let (done, done_signal) = tokio::sync::watch::channel(());
    let mut ops = Vec::new();
    // A connection still attached to this client id is closed first, and finishes with the
    // session (routes and acknowledges what it read, hands the session back) before this one
    // takes it, so nothing it received is lost or overtaken by this connection.
    let takeover_deadline = Instant::now() + TAKEOVER_WAIT;
    let (cell, session_present) = loop {
        let forced = Instant::now() >= takeover_deadline;
        let attach = {
            let mut registry = lock(&shared.registry);
            attach(
                shared,
                &mut registry,
                &client_id,
                AttachRequest {
                    generation,
                    clean_start: connect.clean_start,
                    v5,
                    expiry_secs,
                    receive_maximum: connect.receive_maximum,
                    username: &username,
                    done: &done_signal,
                    forced,
                },
                &mut ops,
            )
        };
        match attach {
            Attach::Attached {
                cell,
                session_present,
            } => break (cell, session_present),
            Attach::Wait { old, mut closed } => {
                old.notify.notify_waiters();
                old.notify.notify_one();
                let _ = tokio::time::timeout_at(takeover_deadline, async {
                    while closed.changed().await.is_ok() {}
                })
                .await;
            }
        }
    };
    // The will, journaled for a persistent session so that it outlives a crash or a restart;
    // it replaces the will a previous connection left.
    let stored = cell.lock().stored;
    let will = match (&connect.will, will_topic) {
        (Some(will), Some(topic)) => Some(PendingWill {
            topic,
            payload: will.payload.clone(),
            qos: will.qos,
            retain: will.retain,
            expiry_secs: will.message_expiry,
            properties: will.properties.clone(),
            delay_secs: will.delay_secs,
            token: stored.then(random_u64),
        }),
        _ => None,
    };
    if stored {
        ops.push(match &will {
            Some(will) => Op::WillSet {
                client_id: client_id.to_string(),
                will: will.to_stored(will.token.unwrap_or_default()),
            },
            None => Op::WillClear {
                client_id: client_id.to_string(),
                token: None,
            },
        });
    }
    if !ops.is_empty() {
        match shared.persist.commit(ops).await {
            Ok(Ok(())) => {}
            _ => {
                tracing::error!(client_id = %client_id, "cannot store the session; refusing the connection");
                refuse(
                    io,
                    v5,
                    rc::UNSPECIFIED,
                    v4_code::SERVER_UNAVAILABLE,
                    "store",
                );
                detach_failed(&cell, generation);
                return None;
            }
        }
    }

    // Keep-alive, possibly capped by the server.
    let mut keep_alive = connect.keep_alive;
    let mut server_keep_alive = None;
    if limits.max_keep_alive_secs > 0
        && (keep_alive == 0 || keep_alive > limits.max_keep_alive_secs)
    {
        keep_alive = limits.max_keep_alive_secs;
        if v5 {
            server_keep_alive = Some(keep_alive);
        }
    }
    let properties = ConnackProperties {
        session_expiry_interval: (connect.session_expiry.is_some()
            && expiry_secs != requested_expiry)
            .then_some(expiry_secs),
        receive_maximum: Some(limits.receive_maximum),
        maximum_packet_size: Some(limits.max_packet_bytes),
        assigned_client_identifier: assigned,
        topic_alias_maximum: Some(limits.topic_alias_maximum),
        server_keep_alive,
        reason_string: None,
    };
    encode::connack(&mut io.out, v5, session_present, rc::SUCCESS, &properties);
    metrics::counter!("silt_mqtt_connects_total", "protocol" => if v5 { "5" } else { "3.1.1" })
        .increment(1);
    tracing::debug!(%peer, client_id = %client_id, v5, session_present, "MQTT client connected");

    let mut conn = Conn {
        shared: shared.clone(),
        cell,
        client_id,
        generation,
        v5,
        username,
        decoder,
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        max_out_packet: connect.maximum_packet_size.unwrap_or(u32::MAX),
        in_aliases: InboundAliases::new(if v5 { limits.topic_alias_maximum } else { 0 }),
        out_aliases: OutboundAliases::new(connect.topic_alias_maximum),
        will,
        pending: FuturesOrdered::new(),
        acks: FuturesOrdered::new(),
        done,
        last_log_topic: None,
        counters: Counters::new(),
        batch: Vec::new(),
        batch_entries: Vec::new(),
        batch_bytes: 0,
        ops: Vec::new(),
        releases: Vec::new(),
        stalled: false,
    };
    conn.resend(&mut io.out);
    Some(conn)
}

/// How long a new connection waits for the connection it takes a session over from to
/// finish (that one's drain is bounded by [`DRAIN_TIMEOUT`]); after it, the old connection is
/// detached by force.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// What a CONNECT asks of its session.
struct AttachRequest<'a> {
    generation: u64,
    clean_start: bool,
    v5: bool,
    expiry_secs: u32,
    receive_maximum: Option<u16>,
    username: &'a Option<String>,
    done: &'a tokio::sync::watch::Receiver<()>,
    /// The old connection had its time: detach it without waiting.
    forced: bool,
}

enum Attach {
    Attached {
        cell: Arc<SessionCell>,
        session_present: bool,
    },
    /// Another connection is attached: it was told to stop; wait until `closed` closes.
    Wait {
        old: Arc<SessionCell>,
        closed: tokio::sync::watch::Receiver<()>,
    },
}

/// Attaches the connection `request.generation` to the session of `client_id` (a new one, or
/// the existing one unless a clean start or its expiry ends it), or, while another connection
/// is attached, tells that one to stop.
fn attach(
    shared: &Shared,
    registry: &mut super::broker::Registry,
    client_id: &Arc<str>,
    request: AttachRequest<'_>,
    ops: &mut Vec<Op>,
) -> Attach {
    let limits = &shared.config.limits;
    let existing = registry.sessions.get(client_id).cloned();
    let mut ended = false;
    if let Some(cell) = &existing {
        let mut session = cell.lock();
        if let Some(old) = session.attached {
            if !request.forced {
                session.evicted = Some(old);
                let closed = session
                    .attached_done
                    .clone()
                    .unwrap_or_else(|| tokio::sync::watch::channel(()).1);
                return Attach::Wait {
                    old: cell.clone(),
                    closed,
                };
            }
            tracing::warn!(client_id = %client_id, "the connection taken over did not finish in time; detaching it");
            session.attached = None;
            session.evicted = None;
            session.epoch += 1;
            cell.set_online(false);
            cell.notify.notify_waiters();
            // A session with expiry 0 ends with its connection.
            ended = session.expiry_secs == 0;
        }
    }
    let reuse = existing.filter(|_| !request.clean_start && !ended);
    let session_present = reuse.is_some();
    let cell = match reuse {
        Some(cell) => cell,
        None => {
            ops.extend(shared.remove_session(registry, client_id));
            let cell = SessionCell::new(Session::new(client_id.clone(), limits));
            registry.sessions.insert(client_id.clone(), cell.clone());
            metrics::gauge!("silt_mqtt_sessions").set(registry.sessions.len() as f64);
            cell
        }
    };
    {
        let mut session = cell.lock();
        session.attached = Some(request.generation);
        session.evicted = None;
        session.attached_done = Some(request.done.clone());
        session.epoch += 1;
        // The client is back: a will waiting for its delay is not published (§3.1.3.2).
        session.will = None;
        // Publishes the previous connection had under way are sent again by the client.
        session.inbound.on_disconnect();
        session.username = request.username.clone();
        let was_stored = session.stored;
        session.expiry_secs = request.expiry_secs;
        if request.expiry_secs > 0 {
            session.stored = true;
            ops.push(Op::SessionOpen {
                client_id: client_id.to_string(),
                protocol_level: if request.v5 { 5 } else { 4 },
                expiry_secs: request.expiry_secs,
            });
        } else if was_stored {
            // A persistent session resumed with expiry 0: the store no longer keeps it.
            session.stored = false;
            ops.push(Op::SessionRemove {
                client_id: client_id.to_string(),
            });
        }
        let client_receive_max = request.receive_maximum.unwrap_or(u16::MAX);
        session
            .outbound
            .set_receive_maximum(client_receive_max.min(limits.max_inflight_out));
        cell.set_online(true);
    }
    Attach::Attached {
        cell,
        session_present,
    }
}

/// Undoes an attach whose session could not be stored.
fn detach_failed(cell: &Arc<SessionCell>, generation: u64) {
    let mut session = cell.lock();
    if session.attached == Some(generation) {
        session.attached = None;
        cell.set_online(false);
    }
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No system randomness: the time still makes a collision unlikely.
        return silt_log::now_ms() as u64 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

/// One publish of a submission.
struct Entry {
    packet_id: u16,
    qos: QoS,
    /// `None` for a publish the ACL refused.
    message: Option<Arc<Message>>,
    /// The `mqtt.qos2_id` of a QoS 2 publish of a persistent session, whose intent is
    /// journaled before the append.
    qos2_token: Option<u64>,
}

/// Publishes submitted together, back from the log.
struct Pending {
    entries: Vec<Entry>,
    outcome: Outcome,
}

enum Outcome {
    Durable,
    Refused(IngestError),
    /// The ACL refused it; it never went to the log.
    Denied,
}

/// Acknowledgements ready now, or once the session store has what they depend on.
type AcksDue = Either<future::Ready<Vec<AckDue>>, BoxFuture<'static, Vec<AckDue>>>;

/// Resolves with a submission's outcome once the log has it (or at once).
struct PendingFuture {
    receipt: Option<super::IngestReceipt>,
    entries: Vec<Entry>,
    done: Option<Pending>,
}

impl PendingFuture {
    fn ready(pending: Pending) -> PendingFuture {
        PendingFuture {
            receipt: None,
            entries: Vec::new(),
            done: Some(pending),
        }
    }
}

impl std::future::Future for PendingFuture {
    type Output = Pending;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Pending> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(done) = this.done.take() {
            return Poll::Ready(done);
        }
        let Some(receipt) = this.receipt.as_mut() else {
            // Polled after completion; FuturesOrdered never does that.
            return Poll::Pending;
        };
        let outcome = match std::pin::Pin::new(receipt).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Ok(()))) => Outcome::Durable,
            Poll::Ready(Ok(Err(error))) => Outcome::Refused(error),
            Poll::Ready(Err(_)) => Outcome::Refused(IngestError::ShuttingDown),
        };
        this.receipt = None;
        Poll::Ready(Pending {
            entries: std::mem::take(&mut this.entries),
            outcome,
        })
    }
}

fn ack_for(entry: &Entry, reason: u8) -> AckDue {
    AckDue {
        packet_id: entry.packet_id,
        qos: entry.qos,
        reason: Some(reason),
    }
}

fn acks_for(entries: &[Entry], reason: u8) -> Vec<AckDue> {
    entries
        .iter()
        .filter(|entry| entry.qos != QoS::AtMostOnce)
        .map(|entry| ack_for(entry, reason))
        .collect()
}

/// Metric handles of one connection, looked up once instead of per packet.
struct Counters {
    messages_in: [metrics::Counter; 3],
    messages_out: [metrics::Counter; 3],
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
}

impl Counters {
    fn new() -> Counters {
        let by_qos =
            |name: &'static str| ["0", "1", "2"].map(|qos| metrics::counter!(name, "qos" => qos));
        Counters {
            messages_in: by_qos("silt_mqtt_messages_in_total"),
            messages_out: by_qos("silt_mqtt_messages_out_total"),
            bytes_in: metrics::counter!("silt_mqtt_bytes_in_total"),
            bytes_out: metrics::counter!("silt_mqtt_bytes_out_total"),
        }
    }
}

/// An acknowledgement waiting for its store commit (or ready).
struct AckDue {
    packet_id: u16,
    qos: QoS,
    /// 0 for success, else the 5.0 failure reason; `None` sends nothing (3.1.1 failure).
    reason: Option<u8>,
}

struct Conn {
    shared: Arc<Shared>,
    cell: Arc<SessionCell>,
    client_id: Arc<str>,
    generation: u64,
    v5: bool,
    username: Option<String>,
    decoder: Decoder,
    /// 1.5 times the keep-alive: the longest silence allowed.
    keep_alive: Option<Duration>,
    max_out_packet: u32,
    in_aliases: InboundAliases,
    out_aliases: OutboundAliases,
    /// The will of this connection (journaled with its token for a persistent session).
    will: Option<PendingWill>,
    pending: FuturesOrdered<PendingFuture>,
    acks: FuturesOrdered<AcksDue>,
    /// Dropped once the connection has finished with its session and closed: a connection
    /// taking the session over waits for that.
    done: tokio::sync::watch::Sender<()>,
    /// Publishes read but not yet submitted, and what the connection keeps of each.
    batch: Vec<IngestRequest>,
    batch_entries: Vec<Entry>,
    batch_bytes: usize,
    /// The log topic of the last publish, shared by the requests that go to it.
    last_log_topic: Option<Arc<str>>,
    counters: Counters,
    /// Store changes not yet handed to the store thread.
    ops: Vec<Op>,
    /// QoS 2 ids of a persistent session released by PUBREL, whose PUBCOMP waits for the
    /// store (`flush_releases`).
    releases: Vec<u16>,
    /// A 3.1.1 client's QoS 1 or 2 PUBLISH waits at the front of the input while the receive
    /// maximum's worth of publishes is being ingested: 3.1.1 cannot announce a limit, so the
    /// connection stops reading until ingests finish, rather than close on a client that
    /// pipelines more (5.0 clients are told the limit, and exceeding it is an error).
    stalled: bool,
}

/// Whether `input` starts with a QoS 1 or 2 PUBLISH (its fixed header's first byte).
fn starts_with_acknowledged_publish(input: &[u8]) -> bool {
    input
        .first()
        .is_some_and(|&first| first >> 4 == 3 && (first >> 1) & 0b11 != 0)
}

/// The connection must close; `Some(reason)` sends a 5.0 DISCONNECT first.
struct Close {
    end: End,
    reason: Option<u8>,
}

impl Close {
    fn protocol(reason: u8) -> Close {
        Close {
            end: End::Abnormal,
            reason: Some(reason),
        }
    }
}

impl Conn {
    fn identity(&self) -> Identity<'_> {
        Identity {
            client_id: &self.client_id,
            username: self.username.as_deref(),
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut Io<S>) -> End {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut last_read = Instant::now();
        // Packets that came in the same read as CONNECT.
        let first = match self.handle_input(io).await {
            Ok(Some(end)) => Some(Close { end, reason: None }),
            Ok(None) => None,
            Err(close) => Some(close),
        };
        let close = if let Some(close) = first {
            close
        } else {
            loop {
                if self.stalled && !self.cell.lock().inbound.ingest_full() {
                    self.stalled = false;
                    match self.handle_input(io).await {
                        Ok(Some(end)) => break Close { end, reason: None },
                        Ok(None) => {}
                        Err(close) => break close,
                    }
                }
                if let Err(close) = self.pump(&mut io.out) {
                    break close;
                }
                if !self.ops.is_empty() {
                    self.shared.persist.write(std::mem::take(&mut self.ops));
                }
                let can_read = !self.stalled
                    && io.out.len() < OUT_HIGH_WATER
                    && self.pending.len() < PENDING_MAX;
                let keep_alive_deadline = self.keep_alive.map(|k| last_read + k);
                let needed = self.decoder.frame_bytes_needed(&io.inbuf).unwrap_or(2);
                tokio::select! {
                    biased;
                    () = stopped(&mut shutdown) => {
                        break Close { end: End::Shutdown, reason: Some(rc::SERVER_SHUTTING_DOWN) };
                    }
                    // Everything ready is handled before anything is written, so that a group
                    // commit's acknowledgements leave in one write.
                    Some(done) = self.acks.next() => {
                        for due in done {
                            self.send_ack(&mut io.out, due);
                        }
                        while let Some(Some(done)) = self.acks.next().now_or_never() {
                            for due in done {
                                self.send_ack(&mut io.out, due);
                            }
                        }
                    }
                    Some(pending) = self.pending.next() => {
                        self.complete(&mut io.out, pending);
                        while let Some(Some(pending)) = self.pending.next().now_or_never() {
                            self.complete(&mut io.out, pending);
                        }
                    }
                    () = self.cell.notify.notified() => {
                        if !self.cell.lock().is_served_by(self.generation) {
                            break Close { end: End::TakenOver, reason: Some(rc::SESSION_TAKEN_OVER) };
                        }
                    }
                    written = io.writer.write(&io.out), if !io.out.is_empty() => {
                        match written {
                            Ok(0) | Err(_) => break Close { end: End::Abnormal, reason: None },
                            Ok(n) => {
                                io.out.advance(n);
                                self.counters.bytes_out.increment(n as u64);
                            }
                        }
                    }
                    read = read_into(&mut io.reader, &mut io.inbuf, needed), if can_read => {
                        match read {
                            Ok(0) | Err(_) => break Close { end: End::Abnormal, reason: None },
                            Ok(n) => {
                                self.counters.bytes_in.increment(n as u64);
                                last_read = Instant::now();
                                match self.handle_input(io).await {
                                    Ok(Some(end)) => break Close { end, reason: None },
                                    Ok(None) => {}
                                    Err(close) => break close,
                                }
                            }
                        }
                    }
                    () = sleep_until_opt(keep_alive_deadline) => {
                        break Close { end: End::Abnormal, reason: Some(rc::KEEP_ALIVE_TIMEOUT) };
                    }
                }
            }
        };
        if let (true, Some(reason)) = (self.v5, close.reason) {
            codec::write_v5_disconnect(reason, &mut io.out);
        }
        close.end
    }

    /// Decodes and handles every whole packet in the input buffer.
    async fn handle_input<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut Io<S>,
    ) -> Result<Option<End>, Close> {
        let result = self.handle_frames(io).await;
        // Publishes read so far go to the log together, whatever happens next.
        self.flush_batch().await;
        if !self.flush_releases(&mut io.out).await && matches!(result, Ok(None)) {
            return Err(Close::protocol(rc::UNSPECIFIED));
        }
        result
    }

    async fn handle_frames<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut Io<S>,
    ) -> Result<Option<End>, Close> {
        loop {
            if !self.v5
                && starts_with_acknowledged_publish(&io.inbuf)
                && self.cell.lock().inbound.ingest_full()
            {
                self.stalled = true;
                return Ok(None);
            }
            let frame = match self.decoder.decode(&mut io.inbuf) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(None),
                Err(error) => {
                    tracing::debug!(client_id = %self.client_id, %error, "bad packet");
                    metrics::counter!("silt_mqtt_protocol_errors_total").increment(1);
                    return Err(Close::protocol(error.reason_code()));
                }
            };
            let packet = packet::from_frame(frame).map_err(|e| Close::protocol(e.reason_code()))?;
            if !matches!(packet, ClientPacket::Publish(_)) {
                // Anything else is handled after the publishes before it.
                self.flush_batch().await;
            }
            if let Some(end) = self.handle(packet, io).await? {
                return Ok(Some(end));
            }
        }
    }

    /// Submits the publishes gathered so far as one request to the log.
    async fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let requests = std::mem::take(&mut self.batch);
        let entries = std::mem::take(&mut self.batch_entries);
        self.batch_bytes = 0;
        if entries.iter().any(|entry| entry.qos2_token.is_some())
            && let Err(error) = self.journal_intents(&requests, &entries).await
        {
            self.pending.push_back(PendingFuture::ready(Pending {
                entries,
                outcome: Outcome::Refused(error),
            }));
            return;
        }
        let future = match self.shared.ingest.submit(requests).await {
            Ok(receipt) => PendingFuture {
                receipt: Some(receipt),
                entries,
                done: None,
            },
            Err(error) => PendingFuture::ready(Pending {
                entries,
                outcome: Outcome::Refused(error),
            }),
        };
        self.pending.push_back(future);
    }

    /// Journals, durably, where each QoS 2 publish of a persistent session is about to go,
    /// before it goes: after a crash, the broker finds out from the log whether the append
    /// happened, and so never stores a re-sent PUBLISH twice (see `Broker::open`).
    async fn journal_intents(
        &mut self,
        requests: &[IngestRequest],
        entries: &[Entry],
    ) -> Result<(), IngestError> {
        let mut ops = Vec::new();
        for (request, entry) in requests.iter().zip(entries) {
            let Some(token) = entry.qos2_token else {
                continue;
            };
            let position = self
                .shared
                .ingest
                .position(&request.log_topic, &request.key)
                .await?;
            ops.push(Op::Qos2Set {
                client_id: self.client_id.to_string(),
                packet_id: entry.packet_id,
                state: StoredQos2::Intent {
                    log_topic: request.log_topic.to_string(),
                    partition: position.partition,
                    from_offset: position.offset,
                    token,
                },
            });
        }
        match self.shared.persist.commit(ops).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(IngestError::Failed(error)),
            Err(_) => Err(IngestError::ShuttingDown),
        }
    }

    /// Makes the PUBRELs handled so far durable in the store, then answers them with
    /// PUBCOMP. `false` if the store failed: no PUBCOMP goes out (the client sends PUBREL
    /// again after reconnecting), since after a restart the id would still look taken and
    /// a new message under it would be taken for a re-send.
    async fn flush_releases(&mut self, out: &mut BytesMut) -> bool {
        if self.releases.is_empty() {
            return true;
        }
        let ids = std::mem::take(&mut self.releases);
        let mut ops = std::mem::take(&mut self.ops);
        ops.extend(ids.iter().map(|&packet_id| Op::Qos2Release {
            client_id: self.client_id.to_string(),
            packet_id,
        }));
        if !matches!(self.shared.persist.commit(ops).await, Ok(Ok(()))) {
            tracing::warn!(client_id = %self.client_id, "cannot store PUBRELs; closing the connection");
            return false;
        }
        for id in ids {
            encode::ack(out, self.v5, Ack::Pubcomp, id, rc::SUCCESS);
        }
        true
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        packet: ClientPacket,
        io: &mut Io<S>,
    ) -> Result<Option<End>, Close> {
        match packet {
            ClientPacket::Publish(publish) => self.on_publish(*publish, &mut io.out).await?,
            ClientPacket::Puback { id } => {
                let mut session = self.cell.lock();
                if let Ok(copy) = session.outbound.on_puback(id) {
                    session.forget(&copy, &mut self.ops);
                }
            }
            ClientPacket::Pubrec { id, reason } => {
                let mut session = self.cell.lock();
                if reason >= 0x80 {
                    if let Ok(copy) = session.outbound.on_pubrec_failure(id) {
                        session.forget(&copy, &mut self.ops);
                    }
                } else {
                    match session.outbound.on_pubrec(id) {
                        Ok(copy) => {
                            session.forget(&copy, &mut self.ops);
                            encode::ack(&mut io.out, self.v5, Ack::Pubrel, id, rc::SUCCESS);
                        }
                        Err(_) => {
                            encode::ack(
                                &mut io.out,
                                self.v5,
                                Ack::Pubrel,
                                id,
                                rc::PACKET_ID_NOT_FOUND,
                            );
                        }
                    }
                }
            }
            ClientPacket::Pubcomp { id } => {
                let _ = self.cell.lock().outbound.on_pubcomp(id);
            }
            ClientPacket::Pubrel { id } => {
                let (found, stored) = {
                    let mut session = self.cell.lock();
                    (session.inbound.on_pubrel(id).is_ok(), session.stored)
                };
                if found && stored {
                    // Answered once the release is durable (`flush_releases`).
                    self.releases.push(id);
                } else {
                    let reason = if found {
                        rc::SUCCESS
                    } else {
                        rc::PACKET_ID_NOT_FOUND
                    };
                    encode::ack(&mut io.out, self.v5, Ack::Pubcomp, id, reason);
                }
            }
            ClientPacket::Subscribe {
                id,
                subscription_id,
                filters,
            } => {
                self.on_subscribe(id, subscription_id, filters, &mut io.out)
                    .await?
            }
            ClientPacket::Unsubscribe { id, filters } => {
                self.on_unsubscribe(id, filters, &mut io.out).await;
            }
            ClientPacket::Pingreq => encode::pingresp(&mut io.out),
            ClientPacket::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(expiry) = session_expiry {
                    let mut session = self.cell.lock();
                    if session.expiry_secs == 0 && expiry != 0 && !session.stored {
                        // §3.14.2.2.2: a session that was to end cannot be revived here.
                        drop(session);
                        return Err(Close::protocol(rc::PROTOCOL_ERROR));
                    }
                    session.expiry_secs =
                        expiry.min(self.shared.config.limits.max_session_expiry_secs);
                }
                let end = if reason == rc::DISCONNECT_WITH_WILL {
                    End::WithWill
                } else {
                    End::Normal
                };
                return Ok(Some(end));
            }
            ClientPacket::Auth => return Err(Close::protocol(rc::PROTOCOL_ERROR)),
            ClientPacket::Connect(_) | ClientPacket::ServerOnly => {
                return Err(Close::protocol(rc::PROTOCOL_ERROR));
            }
        }
        Ok(None)
    }

    async fn on_publish(&mut self, publish: Publish, out: &mut BytesMut) -> Result<(), Close> {
        self.counters.messages_in[usize::from(publish.qos.as_u8())].increment(1);
        let topic = if self.v5 {
            self.in_aliases
                .resolve(&publish.topic, publish.topic_alias)
                .map_err(|e| Close::protocol(e.reason_code()))?
        } else {
            TopicName::new(&publish.topic).map_err(|e| Close::protocol(e.reason_code()))?
        };
        let id = publish.packet_id;
        if publish.qos != QoS::AtMostOnce {
            let action = if self.v5 {
                self.cell.lock().inbound.on_publish(id, publish.qos)
            } else {
                self.cell.lock().inbound.on_publish_v311(id, publish.qos)
            };
            match action {
                Ok(InboundAction::Ingest) => {}
                Ok(InboundAction::ResendPubrec) => {
                    encode::ack(out, self.v5, Ack::Pubrec, id, rc::SUCCESS);
                    return Ok(());
                }
                Ok(InboundAction::AlreadyIngesting) => return Ok(()),
                Err(error @ QosError::ReceiveMaximumExceeded { .. }) => {
                    metrics::counter!("silt_mqtt_protocol_errors_total").increment(1);
                    return Err(Close::protocol(error.reason_code()));
                }
                Err(error) => return Err(Close::protocol(error.reason_code())),
            }
        }
        if let Some(acl) = &self.shared.acl
            && !acl.allows_publish(&self.identity(), &topic)
        {
            metrics::counter!("silt_mqtt_dropped_total", "reason" => "not_authorized").increment(1);
            if publish.qos != QoS::AtMostOnce {
                // Acknowledged in order with the publishes before it: 0x87 in 5.0; 3.1.1 has
                // no way to say no, so it is acknowledged and dropped (see `complete`).
                self.flush_batch().await;
                self.pending.push_back(PendingFuture::ready(Pending {
                    entries: vec![Entry {
                        packet_id: id,
                        qos: publish.qos,
                        message: None,
                        qos2_token: None,
                    }],
                    outcome: Outcome::Denied,
                }));
            }
            return Ok(());
        }
        let now_ms = silt_log::now_ms();
        let message = Arc::new(Message {
            topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            published_at_ms: now_ms,
            expiry_secs: publish.message_expiry,
            properties: publish.properties,
            publisher: self.client_id.clone(),
        });
        let persistent = publish.qos == QoS::ExactlyOnce && self.cell.lock().stored;
        let qos2_token = persistent.then(random_u64);
        let record = {
            let mut record = message.ingest_record(&self.shared.config.routes);
            if let Some(token) = qos2_token {
                record.record.headers.push(silt_log::batch::Header {
                    key: HEADER_QOS2_ID.to_string(),
                    value: Some(qos2_id_value(token)),
                });
            }
            let log_topic = match &self.last_log_topic {
                Some(topic) if &**topic == record.log_topic => topic.clone(),
                _ => {
                    let topic: Arc<str> = Arc::from(record.log_topic);
                    self.last_log_topic = Some(topic.clone());
                    topic
                }
            };
            IngestRequest {
                log_topic,
                key: record.key,
                record: record.record,
            }
        };
        self.batch_bytes += message.payload.len();
        self.batch.push(record);
        self.batch_entries.push(Entry {
            packet_id: id,
            qos: message.qos,
            message: Some(message),
            qos2_token,
        });
        if self.batch_bytes >= BATCH_BYTES_MAX || self.batch.len() >= BATCH_PUBLISHES_MAX {
            self.flush_batch().await;
        }
        Ok(())
    }

    /// A publish came back from the log: deliver it, then acknowledge it (after the store has
    /// what the delivery changed, when that matters).
    fn complete(&mut self, out: &mut BytesMut, pending: Pending) {
        let reason = match &pending.outcome {
            Outcome::Denied => {
                if self.v5 {
                    rc::NOT_AUTHORIZED
                } else {
                    rc::SUCCESS
                }
            }
            Outcome::Durable => {
                self.journal_qos2(&pending, true);
                let messages: Vec<Arc<Message>> = pending
                    .entries
                    .iter()
                    .filter_map(|entry| entry.message.clone())
                    .collect();
                let routed = self.shared.route_all(&messages);
                let acknowledged = pending.entries.iter().any(|e| e.qos != QoS::AtMostOnce);
                if acknowledged && routed.needs_commit {
                    let receipt = self.shared.persist.commit(routed.ops);
                    let entries = pending.entries;
                    self.acks.push_back(Either::Right(Box::pin(async move {
                        let reason = match receipt.await {
                            Ok(Ok(())) => rc::SUCCESS,
                            _ => rc::UNSPECIFIED,
                        };
                        acks_for(&entries, reason)
                    })));
                    return;
                }
                self.ops.extend(routed.ops);
                rc::SUCCESS
            }
            Outcome::Refused(error) => {
                self.journal_qos2(&pending, false);
                let label = match error {
                    IngestError::QuotaExceeded(_) => "quota_exceeded",
                    IngestError::ShuttingDown => "shutting_down",
                    IngestError::Failed(_) => "log_failed",
                };
                metrics::counter!("silt_mqtt_dropped_total", "reason" => label)
                    .increment(pending.entries.len() as u64);
                tracing::debug!(client_id = %self.client_id, %error, "publishes not stored");
                match error {
                    IngestError::QuotaExceeded(_) => rc::QUOTA_EXCEEDED,
                    _ => rc::UNSPECIFIED,
                }
            }
        };
        // Acknowledgements leave in publish order: straight out unless an earlier one still
        // waits for the store.
        if self.acks.is_empty() {
            for entry in &pending.entries {
                if entry.qos != QoS::AtMostOnce {
                    self.send_ack(out, ack_for(entry, reason));
                }
            }
        } else {
            self.acks.push_back(Either::Left(future::ready(acks_for(
                &pending.entries,
                reason,
            ))));
        }
    }

    /// Records in the store how the QoS 2 publishes of a persistent session ended: stored
    /// (awaiting PUBREL) or not stored (the id is free again). Written lazily: until it is
    /// durable, the journaled intent and the log tell the same after a crash.
    fn journal_qos2(&mut self, pending: &Pending, stored: bool) {
        for entry in &pending.entries {
            if entry.qos2_token.is_none() {
                continue;
            }
            let client_id = self.client_id.to_string();
            let packet_id = entry.packet_id;
            self.ops.push(if stored {
                Op::Qos2Set {
                    client_id,
                    packet_id,
                    state: StoredQos2::Received,
                }
            } else {
                Op::Qos2Release {
                    client_id,
                    packet_id,
                }
            });
        }
    }

    /// Routes what the log has of the publishes still under way when the connection ends,
    /// so that subscribers get every stored message (nobody is left to acknowledge).
    async fn drain(&mut self) {
        self.flush_batch().await;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        // Publishes whose acknowledgement waited for the store are stored and routed already.
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.acks.next()).await {
            let mut session = self.cell.lock();
            for due in done {
                if due.qos == QoS::ExactlyOnce && due.reason == Some(rc::SUCCESS) {
                    session.inbound.mark_received(due.packet_id);
                }
            }
        }
        while let Ok(Some(pending)) = tokio::time::timeout_at(deadline, self.pending.next()).await {
            match pending.outcome {
                Outcome::Durable => {
                    self.journal_qos2(&pending, true);
                    {
                        // Stored but never acknowledged: the client sends these QoS 2
                        // publishes again, and must get PUBREC, not a second copy.
                        let mut session = self.cell.lock();
                        for entry in &pending.entries {
                            if entry.qos == QoS::ExactlyOnce {
                                session.inbound.mark_received(entry.packet_id);
                            }
                        }
                    }
                    let messages: Vec<Arc<Message>> = pending
                        .entries
                        .iter()
                        .filter_map(|entry| entry.message.clone())
                        .collect();
                    let routed = self.shared.route_all(&messages);
                    self.ops.extend(routed.ops);
                }
                Outcome::Refused(_) => self.journal_qos2(&pending, false),
                Outcome::Denied => {}
            }
        }
    }

    fn send_ack(&mut self, out: &mut BytesMut, due: AckDue) {
        let kind = if due.qos == QoS::ExactlyOnce {
            Ack::Pubrec
        } else {
            Ack::Puback
        };
        let mut session = self.cell.lock();
        match due.reason {
            Some(rc::SUCCESS) => match session.inbound.on_ingested(due.packet_id) {
                Ok(InboundAck::Puback(id)) => {
                    encode::ack(out, self.v5, Ack::Puback, id, rc::SUCCESS)
                }
                Ok(InboundAck::Pubrec(id)) => {
                    encode::ack(out, self.v5, Ack::Pubrec, id, rc::SUCCESS)
                }
                Err(_) => {}
            },
            Some(reason) => {
                let _ = session.inbound.on_ingest_failed(due.packet_id);
                // 3.1.1 cannot refuse a publish: no acknowledgement, the client sends it
                // again after reconnecting.
                if self.v5 {
                    encode::ack(out, true, kind, due.packet_id, reason);
                }
            }
            None => {
                let _ = session.inbound.on_ingest_failed(due.packet_id);
            }
        }
    }

    async fn on_subscribe(
        &mut self,
        packet_id: u16,
        subscription_id: Option<u32>,
        filters: Vec<packet::SubscribeFilter>,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        let subscription_id = match subscription_id {
            None => None,
            Some(raw) => Some(SubscriptionId::new(raw).ok_or(Close::protocol(rc::PROTOCOL_ERROR))?),
        };
        let now_ms = silt_log::now_ms();
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        let mut ops = Vec::new();
        let stored = self.cell.lock().stored;
        {
            let mut registry = lock(&self.shared.registry);
            for requested in filters {
                let filter = match SubscriptionFilter::parse(&requested.filter, FilterSupport::ALL)
                {
                    Ok(filter) => filter,
                    Err(error) => {
                        codes.push(if self.v5 { error.reason_code() } else { 0x80 });
                        continue;
                    }
                };
                if let Some(acl) = &self.shared.acl
                    && !acl.allows_subscribe(&self.identity(), filter.topic_filter())
                {
                    codes.push(if self.v5 { rc::NOT_AUTHORIZED } else { 0x80 });
                    continue;
                }
                let options = SubscriptionOptions {
                    qos: requested.qos,
                    no_local: requested.no_local,
                    retain_as_published: requested.retain_as_published,
                    retain_handling: requested.retain_handling,
                    subscription_id,
                };
                match registry
                    .subscriptions
                    .subscribe(&self.client_id, &filter, options)
                {
                    Ok(outcome) => {
                        codes.push(requested.qos.as_u8());
                        if stored {
                            ops.push(Op::Subscribe {
                                client_id: self.client_id.to_string(),
                                subscription: stored_subscription(&filter, &options),
                            });
                        }
                        let send_retained = !filter.is_shared() && match options.retain_handling {
                            crate::mqtt::subscriptions::RetainHandling::SendAtSubscribe => true,
                            crate::mqtt::subscriptions::RetainHandling::SendAtSubscribeIfNew => {
                                outcome.is_new()
                            }
                            crate::mqtt::subscriptions::RetainHandling::DoNotSend => false,
                        };
                        if send_retained {
                            retained.extend(
                                self.shared
                                    .retained_for(&registry, &filter, &options, now_ms),
                            );
                        }
                    }
                    Err(SubscriptionError::NoLocalOnShared) => {
                        return Err(Close::protocol(rc::PROTOCOL_ERROR));
                    }
                    Err(error) => codes.push(if self.v5 { error.reason_code() } else { 0x80 }),
                }
            }
        }
        if !ops.is_empty() {
            let _ = self.shared.persist.commit(ops).await;
        }
        encode::suback(out, self.v5, packet_id, &codes);
        if !retained.is_empty() {
            let limits = &self.shared.config.limits;
            let mut session = self.cell.lock();
            for copy in retained {
                if let Some(acl) = &self.shared.acl
                    && !acl.allows_receive(&self.identity(), &copy.message.topic)
                {
                    continue;
                }
                if let Err(refusal) = session.enqueue(copy, limits, &mut self.ops) {
                    metrics::counter!("silt_mqtt_dropped_total", "reason" => refusal.label())
                        .increment(1);
                }
            }
        }
        Ok(())
    }

    async fn on_unsubscribe(&mut self, packet_id: u16, filters: Vec<String>, out: &mut BytesMut) {
        let stored = self.cell.lock().stored;
        let mut codes = Vec::with_capacity(filters.len());
        let mut ops = Vec::new();
        {
            let mut registry = lock(&self.shared.registry);
            for raw in filters {
                let Ok(filter) = SubscriptionFilter::parse(&raw, FilterSupport::ALL) else {
                    codes.push(0x8F);
                    continue;
                };
                if registry
                    .subscriptions
                    .unsubscribe(&self.client_id, &filter)
                    .is_some()
                {
                    codes.push(rc::SUCCESS);
                    if stored {
                        ops.push(Op::Unsubscribe {
                            client_id: self.client_id.to_string(),
                            filter: filter.to_string(),
                        });
                    }
                } else {
                    codes.push(rc::NO_SUBSCRIPTION_EXISTED);
                }
            }
        }
        if !ops.is_empty() {
            let _ = self.shared.persist.commit(ops).await;
        }
        encode::unsuback(out, self.v5, packet_id, &codes);
    }

    /// Moves messages from the session's queue into the output, within the in-flight window
    /// and the output's high-water mark.
    fn pump(&mut self, out: &mut BytesMut) -> Result<(), Close> {
        let now_ms = silt_log::now_ms();
        let cell = self.cell.clone();
        let mut session = cell.lock();
        if !session.is_served_by(self.generation) {
            return Err(Close {
                end: End::TakenOver,
                reason: Some(rc::SESSION_TAKEN_OVER),
            });
        }
        while out.len() < OUT_HIGH_WATER {
            let Some((copy, packet_id)) = session.next_to_send(now_ms, &mut self.ops) else {
                break;
            };
            if !self.write_publish(out, &copy, packet_id, false, now_ms) {
                // Too big for the client: dropped as the spec says, as if delivered.
                if let Some(id) = packet_id {
                    let _ = session.outbound.on_puback(id);
                }
                session.forget(&copy, &mut self.ops);
            }
        }
        Ok(())
    }

    /// Writes one PUBLISH; `false` if it exceeds the client's Maximum Packet Size.
    fn write_publish(
        &mut self,
        out: &mut BytesMut,
        copy: &Queued,
        packet_id: Option<u16>,
        dup: bool,
        now_ms: i64,
    ) -> bool {
        let message = &copy.message;
        let expiry = message.remaining_expiry(now_ms).flatten();
        let mut publish = OutPublish {
            topic: message.topic.as_str(),
            topic_alias: None,
            qos: copy.qos.as_u8(),
            packet_id,
            dup,
            retain: copy.retain,
            payload: &message.payload,
            message_expiry: expiry,
            subscription_ids: &copy.subscription_ids,
            properties: &message.properties,
        };
        let packet = encode::publish(self.v5, &publish);
        if packet.len() > self.max_out_packet as usize {
            metrics::counter!("silt_mqtt_dropped_total", "reason" => "client_max_packet")
                .increment(1);
            return false;
        }
        if self.v5 && !dup {
            match self.out_aliases.topic_for(&message.topic) {
                OutboundTopic::Name => out.extend_from_slice(&packet),
                OutboundTopic::NameAndAlias(alias) => {
                    publish.topic_alias = Some(alias);
                    out.extend_from_slice(&encode::publish(true, &publish));
                }
                OutboundTopic::Alias(alias) => {
                    publish.topic_alias = Some(alias);
                    publish.topic = "";
                    out.extend_from_slice(&encode::publish(true, &publish));
                }
            }
        } else {
            out.extend_from_slice(&packet);
        }
        self.counters.messages_out[usize::from(copy.qos.as_u8())].increment(1);
        true
    }

    /// Sends again what was in flight when the session's last connection went.
    fn resend(&mut self, out: &mut BytesMut) {
        let now_ms = silt_log::now_ms();
        let resends: Vec<(u16, Option<Queued>)> = {
            let session = self.cell.lock();
            session
                .outbound
                .resend()
                .into_iter()
                .map(|resend| match resend {
                    Resend::Publish { id, message, .. } => (id, Some(message.clone())),
                    Resend::Pubrel { id } => (id, None),
                })
                .collect()
        };
        for (id, copy) in resends {
            match copy {
                Some(copy) => {
                    self.write_publish(out, &copy, Some(id), true, now_ms);
                }
                None => encode::ack(out, self.v5, Ack::Pubrel, id, rc::SUCCESS),
            }
        }
    }

    /// Hands the session back: ends it or keeps it for the next connection, and sends the
    /// will when the connection ended without a DISCONNECT. Returns the sender whose drop lets
    /// a connection waiting to take the session over go on.
    async fn finish(mut self, end: End) -> tokio::sync::watch::Sender<()> {
        let shared = self.shared.clone();
        let now_ms = silt_log::now_ms();
        let mut ops = std::mem::take(&mut self.ops);
        let mut session_ended = false;
        let mut expiry = None;
        {
            let mut registry = lock(&shared.registry);
            let mut session = self.cell.lock();
            if session.attached == Some(self.generation) {
                session.attached = None;
                session.evicted = None;
                session.attached_done = None;
                session.epoch += 1;
                self.cell.set_online(false);
                session.inbound.on_disconnect();
                if session.expiry_secs == 0 {
                    drop(session);
                    ops.extend(shared.remove_session_if(
                        &mut registry,
                        &self.client_id,
                        &self.cell,
                    ));
                    session_ended = true;
                } else {
                    if session.stored {
                        ops.push(Op::SessionClosed {
                            client_id: self.client_id.to_string(),
                            at_ms: now_ms,
                        });
                    }
                    if session.expiry_secs != u32::MAX {
                        expiry = Some((session.epoch, session.expiry_secs));
                    }
                }
            }
        }
        shared.persist.write(ops);
        if let Some((epoch, secs)) = expiry {
            shared.arm_session_expiry(
                self.client_id.clone(),
                epoch,
                Duration::from_secs(u64::from(secs)),
            );
        }
        if let Some(will) = self.will.take() {
            let session_expiry = if session_ended {
                0
            } else {
                self.cell.lock().expiry_secs
            };
            let delay = will.delay_secs.min(session_expiry);
            match end {
                End::Normal => {
                    // Cleared before the client can count on it: a crash must not publish it.
                    if let Some(token) = will.token {
                        let op = Op::WillClear {
                            client_id: self.client_id.to_string(),
                            token: Some(token),
                        };
                        let _ = shared.persist.commit(vec![op]).await;
                    }
                }
                // Taken over: the will goes now unless it has a delay (the new connection is
                // the reconnect the delay waits for, and replaces the stored will).
                End::TakenOver => {
                    if will.delay_secs == 0 {
                        shared.fire_will(self.client_id.clone(), will).await;
                    }
                }
                End::Abnormal | End::WithWill | End::Shutdown if delay == 0 => {
                    shared.fire_will(self.client_id.clone(), will).await;
                }
                // Shutting down with a delay to wait: the store keeps the will of a
                // persistent session (the only kind with a delay left) for after the restart.
                End::Shutdown => {}
                End::Abnormal | End::WithWill => {
                    let epoch = {
                        let mut session = self.cell.lock();
                        if session.attached.is_some() {
                            // Another connection attached meanwhile: it is the reconnect.
                            None
                        } else {
                            session.will = Some(will);
                            Some(session.epoch)
                        }
                    };
                    if let Some(epoch) = epoch {
                        shared.arm_will(
                            self.client_id.clone(),
                            epoch,
                            Duration::from_secs(u64::from(delay)),
                        );
                    }
                }
            }
        }
        tracing::debug!(client_id = %self.client_id, ?end, "MQTT client disconnected");
        self.done
    }
}

async fn read_into<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    needed: usize,
) -> std::io::Result<usize> {
    let want = needed.saturating_sub(buf.len()).clamp(1, READ_CHUNK);
    buf.reserve(want);
    reader.read_buf(buf).await
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
