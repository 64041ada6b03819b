//! The uplink server: edges connect over QUIC (ALPN `silt-uplink/1`) and ship their log.
//!
//! One connection per edge, one bidirectional stream per edge partition. A stream starts
//! with `Hello` (edge id, topic, partition); then `Data` frames are decoded, appended by
//! [`store::UplinkStore`] (dedup, routing by key, fsync) and acknowledged in order with
//! cumulative `Ack`s. The edge pipelines several `Data` frames (its in-flight byte bound);
//! the server decompresses up to [`DECOMPRESSING_MAX`] of a stream's frames at once on
//! blocking threads and holds at most [`READ_AHEAD_BYTES`] ahead of the appends under way (and
//! all streams together at most [`READ_AHEAD_SERVER_BYTES`]), and appends all frames waiting as
//! one group (one fsync, one `Ack` for the last). Groups are pipelined in three stages: one
//! is composed while the one before it is written and the one before that is fsync'd, and
//! each is acked, in order, once it is durable.
//!
//! Memory is bounded however many edges and streams there are: a connection's streams
//! together have at most [`CONNECTION_RECEIVE_WINDOW_BYTES`] unread (QUIC flow control), the
//! read-ahead is counted per stream and server-wide, and the work that holds records outside
//! it (a frame decompressing, a group composing: each up to the decode limits'
//! `max_decompressed_bytes`) takes one of [`DECODING_SERVER_MAX`] slots shared by the server.
//!
//! Shutdown is orderly: the server stops taking connections, every stream stops reading,
//! appends what it had read, acks it once durable and ends (its end delivered to the edge),
//! and then each connection closes with [`silt_wire::CLOSE_SHUTTING_DOWN`], which the edge
//! logs as no failure. All of it is bounded by [`SHUTDOWN_DRAIN_TIMEOUT`], after which the endpoint
//! closes whatever is left (appends under way still finish; the edge re-sends what it did
//! not get an ack for, and it is deduplicated).
//!
//! With mutual TLS, the edge id a `Hello` claims must be a DNS name of the client
//! certificate, so one edge cannot write as another.
//!
//! A stream whose edge log ends below what the core already stores from that log (the log
//! went back: restored from a backup, copied) is refused with `LOG_BEHIND` at its first group,
//! before anything of it is stored; the edge then ships its log under a new id.
//!
//! The dedup state is checkpointed to `<data_dir>.uplink/dedup/` every
//! [`store::CHECKPOINT_INTERVAL`] or [`store::CHECKPOINT_BYTES`] and at shutdown, so a restart
//! scans only the log tail past the checkpoint.
//!
//! # Layout
//! - `store`: appends with exactly-once dedup, its state rebuilt from a checkpoint and the log.
//! - `checkpoint`: the dedup checkpoint files.
//! - `compose`: the core's batches built from shipped record bytes (routing, dedup, headers).
//! - `tests`: the server over real QUIC on loopback, against the log read back.

pub(crate) mod checkpoint;
pub(crate) mod compose;
pub(crate) mod store;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use quinn::crypto::rustls::QuicServerConfig;
use silt_log::LogManager;
use silt_log::batch::DecodeLimits;
use silt_wire::{Codec, Frame, error_code};
use tokio::io::AsyncReadExt as _;

use crate::tls::{self, ServerTls};
use store::{StoreError, StreamKey, UplinkStore};

/// A connection that has heard nothing (not even a keep-alive) for this long is dead.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Edges send keep-alives at this interval; the server sends them too.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// Most partition streams one edge may have open.
const STREAMS_PER_CONNECTION_MAX: u32 = 1024;
/// Bytes the server lets an edge have in flight per stream (QUIC flow control).
const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Bytes the server lets an edge have in flight over all streams of its connection: four
/// streams' windows, not a thousand.
const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 << 20;
/// Decompressed `Data` bytes a stream holds read ahead of its appends, in its pipeline's
/// groups and waiting for the next: enough for three groups of a few 1 MiB frames (at-rest
/// batches decompress 2 to 3 times) while an edge keeps its default 8 MiB in flight.
const READ_AHEAD_BYTES: usize = 32 << 20;
/// Decompressed `Data` bytes all streams of the server hold read ahead together, so that many
/// edges cannot make the core hold a stream's read-ahead for each of their partitions.
const READ_AHEAD_SERVER_BYTES: usize = 256 << 20;
/// Most frames of one stream decompressing at once, on blocking threads, ahead of the
/// read-ahead (each at most `DecodeLimits::max_decompressed_bytes`).
const DECOMPRESSING_MAX: usize = 3;
/// Frames decompressing and groups composing at once across the server: each may hold up to
/// `DecodeLimits::max_decompressed_bytes` (64 MiB by default) of records the read-ahead does
/// not count yet, so this bounds that memory (512 MiB by default). Eight blocking threads'
/// worth of the uplink's main CPU work.
const DECODING_SERVER_MAX: usize = 8;
/// How often the server looks for topics whose dedup checkpoint is due.
const CHECKPOINT_TICK: Duration = Duration::from_secs(1);
/// How long an orderly shutdown waits for streams to ack what they read and for the edges to
/// receive it, before the remaining connections are closed anyway.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Appended to the log's data directory's name for the uplink server's state (checkpoints).
pub(crate) const STATE_DIR_SUFFIX: &str = ".uplink";

/// Where the uplink server keeps its dedup checkpoints for a log in `data_dir`: beside it,
/// because the log owns its directory whole.
pub(crate) fn checkpoint_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(STATE_DIR_SUFFIX);
    std::path::PathBuf::from(name).join("dedup")
}

/// What the uplink server needs to run.
#[derive(Debug, Clone)]
pub(crate) struct UplinkServerConfig {
    pub(crate) tls: ServerTls,
    /// The broker's partition roles: the uplink appends as the same leader, at its epoch.
    pub(crate) leadership: Arc<crate::broker::Leadership>,
    /// Partitions of a topic the uplink creates.
    pub(crate) default_partitions: u32,
    /// Called after each durable append, so Kafka fetches waiting for data wake at once.
    pub(crate) on_append: AppendHook,
    /// Most edge connections open at once, handshakes included (`uplink.max_connections`):
    /// one more is refused, so the receive windows the server's connections can fill
    /// ([`CONNECTION_RECEIVE_WINDOW_BYTES`] each) are bounded too.
    pub(crate) max_connections: usize,
}

/// A callback run after records are appended.
#[derive(Clone)]
pub(crate) struct AppendHook(pub(crate) Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for AppendHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppendHook")
    }
}

impl Default for AppendHook {
    fn default() -> Self {
        AppendHook(Arc::new(|| {}))
    }
}

/// QUIC transport settings shared by both sides: a dead path is noticed within
/// [`IDLE_TIMEOUT`], so a fresh connection can be made when the link returns.
fn transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout fits a varint"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_RECEIVE_WINDOW_BYTES.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW_BYTES.into());
    transport
}

/// A bound uplink endpoint, ready to serve.
#[derive(Debug)]
pub(crate) struct UplinkServer {
    endpoint: quinn::Endpoint,
    store: Arc<UplinkStore>,
    mutual_tls: bool,
    budgets: ServerBudgets,
    max_connections: usize,
    newest: Newest,
}

/// The newest connection of each edge log (edge id and log id).
///
/// An edge has one connection at a time, so an older connection of its log is one it gave
/// up on (a lost link the core has not noticed yet, for up to the idle timeout), or one of
/// another process shipping the same log: a data directory copied to a second device that
/// the edge's own checks did not catch. Either way it is closed with
/// [`silt_wire::CLOSE_SUPERSEDED`], as an MQTT broker closes a client's old connection when
/// the same client id connects again: a dead one stops counting against
/// `uplink.max_connections` at once, and a live one learns that its log is not its own and
/// gives it a new id. Streams of logs without an id (version 1 edges, logs made before ids)
/// are not tracked: copies of one such edge would close each other for good.
#[derive(Debug, Clone, Default)]
struct Newest(
    Arc<std::sync::Mutex<std::collections::HashMap<(String, String), quinn::Connection>>>,
);

impl Newest {
    /// Records `connection` as the newest of `stream`'s edge log, closing the one before it
    /// when that is another, still open.
    fn take_over(&self, stream: &StreamKey, connection: &quinn::Connection) {
        if stream.edge_log.is_empty() {
            return;
        }
        let mut newest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (stream.edge_id.clone(), stream.edge_log.clone());
        if let Some(previous) = newest.get(&key)
            && previous.stable_id() != connection.stable_id()
            && previous.close_reason().is_none()
        {
            tracing::info!(
                edge = %stream.edge_id,
                edge_log = %stream.edge_log,
                old = %previous.remote_address(),
                new = %connection.remote_address(),
                "a newer connection of the edge log took over; closing the old one"
            );
            metrics::counter!("silt_uplink_superseded_connections_total").increment(1);
            previous.close(
                silt_wire::CLOSE_SUPERSEDED.into(),
                b"a newer connection of this edge log took over",
            );
        }
        newest.insert(key, connection.clone());
    }

    /// Forgets `connection`, which has ended.
    fn forget(&self, connection: &quinn::Connection) {
        let mut newest = self.0.lock().unwrap_or_else(|e| e.into_inner());
        newest.retain(|_, kept| kept.stable_id() != connection.stable_id());
    }
}

/// What every stream of the server takes from, so that its memory is bounded however many
/// edges and streams there are.
#[derive(Debug, Clone)]
struct ServerBudgets {
    /// Bytes of decompressed frames read ahead ([`READ_AHEAD_SERVER_BYTES`]).
    read_ahead: Arc<tokio::sync::Semaphore>,
    /// Frames decompressing and groups composing ([`DECODING_SERVER_MAX`] slots).
    decoding: Arc<tokio::sync::Semaphore>,
}

impl ServerBudgets {
    fn new() -> ServerBudgets {
        ServerBudgets {
            read_ahead: Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_SERVER_BYTES)),
            decoding: Arc::new(tokio::sync::Semaphore::new(DECODING_SERVER_MAX)),
        }
    }
}

/// Waits for one of the server's decoding slots ([`DECODING_SERVER_MAX`]).
async fn decoding_slot(
    decoding: &Arc<tokio::sync::Semaphore>,
) -> tokio::sync::OwnedSemaphorePermit {
    decoding
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed")
}

impl UplinkServer {
    /// Binds the endpoint on `socket` (already bound, so tests can use port 0).
    pub(crate) fn bind(
        socket: std::net::UdpSocket,
        log: Arc<LogManager>,
        config: &UplinkServerConfig,
    ) -> anyhow::Result<UplinkServer> {
        let crypto = tls::server_config(&config.tls)?;
        let crypto = QuicServerConfig::try_from(crypto).context("TLS config unusable for QUIC")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport()));
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .context("cannot start the uplink endpoint")?;
        let checkpoints = checkpoint::CheckpointDir::new(checkpoint_dir(&log.config().data_dir));
        Ok(UplinkServer {
            endpoint,
            store: Arc::new(
                UplinkStore::new(
                    log,
                    config.leadership.clone(),
                    config.default_partitions,
                    Some(checkpoints),
                )
                .with_on_append(config.on_append.clone()),
            ),
            mutual_tls: config.tls.client_ca.is_some(),
            budgets: ServerBudgets::new(),
            max_connections: config.max_connections,
            newest: Newest::default(),
        })
    }

    pub(crate) fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .context("cannot read the uplink address")
    }

    /// Accepts edges until `shutdown` completes, then drains and closes every connection
    /// (see the module doc). Appends under way finish first (they run on blocking threads),
    /// so nothing acked is lost.
    pub(crate) async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (draining_tx, draining) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        let mut checkpoint_tick = tokio::time::interval(CHECKPOINT_TICK);
        checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refused = 0u64;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = checkpoint_tick.tick() => {
                    checkpoint(&self.store, false).await;
                }
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= self.max_connections {
                        refused += 1;
                        metrics::counter!("silt_uplink_refused_connections_total").increment(1);
                        // Logged at the 1st, 2nd, 4th... refusal: a crowd of edges (or a
                        // flood) retrying cannot flood the log.
                        if refused.is_power_of_two() {
                            tracing::warn!(
                                remote = %incoming.remote_address(),
                                max_connections = self.max_connections,
                                refused,
                                "uplink connection refused: uplink.max_connections are open"
                            );
                        }
                        incoming.refuse();
                        continue;
                    }
                    let store = self.store.clone();
                    let mutual_tls = self.mutual_tls;
                    let draining = draining.clone();
                    let budgets = self.budgets.clone();
                    let newest = self.newest.clone();
                    connections.spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(connection) => {
                                serve_connection(
                                    connection, store, mutual_tls, draining, budgets, newest,
                                )
                                .await;
                            }
                            Err(error) => {
                                tracing::info!(%remote, %error, "uplink handshake failed");
                            }
                        }
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        // No new edges; the connected ones ack what they have and are closed, in time.
        self.endpoint.set_server_config(None);
        let _ = draining_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                timeout_ms = SHUTDOWN_DRAIN_TIMEOUT.as_millis() as u64,
                "uplink connections still draining at shutdown; closing them"
            );
        }
        self.endpoint
            .close(silt_wire::CLOSE_SHUTTING_DOWN.into(), b"shutting down");
        while connections.join_next().await.is_some() {}
        // Every append has finished: the checkpoint covers the whole log, and the next start
        // scans nothing.
        checkpoint(&self.store, true).await;
        self.endpoint.wait_idle().await;
    }
}

/// Saves the dedup checkpoints that are due (`all`: every topic with unsaved appends). A
/// failure is logged and retried at the next tick; exactly-once never depends on it.
async fn checkpoint(store: &Arc<UplinkStore>, all: bool) {
    let store = store.clone();
    let now = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || store.checkpoint_due(now, all)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "uplink dedup checkpoint failed"),
        Err(error) => tracing::error!(%error, "uplink dedup checkpoint panicked"),
    }
}

/// Serves one edge's streams until the connection is lost, or until `draining` turns true:
/// then every stream acks what it read and ends, and the connection is closed with
/// [`silt_wire::CLOSE_SHUTTING_DOWN`].
async fn serve_connection(
    connection: quinn::Connection,
    store: Arc<UplinkStore>,
    mutual_tls: bool,
    draining: tokio::sync::watch::Receiver<bool>,
    budgets: ServerBudgets,
    newest: Newest,
) {
    let remote = connection.remote_address();
    let allowed_ids = if mutual_tls {
        peer_dns_names(&connection)
    } else {
        None
    };
    metrics::counter!("silt_uplink_connections_total").increment(1);
    metrics::gauge!("silt_uplink_connections").increment(1.0);
    tracing::info!(%remote, "edge connected");
    let mut streams = tokio::task::JoinSet::new();
    let mut drain_started = draining.clone();
    // The receive halves of streams drained for a shutdown are kept until the close:
    // dropping one would tell the edge to stop sending on it, which it would take for a
    // failure.
    let mut ended = Vec::new();
    let lost = loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(
                        send,
                        recv,
                        store.clone(),
                        allowed_ids.clone(),
                        draining.clone(),
                        budgets.clone(),
                        (connection.clone(), newest.clone()),
                    ));
                }
                Err(error) => break Some(error),
            },
            Some(joined) = streams.join_next(), if !streams.is_empty() => {
                if *draining.borrow() {
                    ended.extend(joined.ok());
                }
            }
            _ = drain_started.wait_for(|&draining| draining) => break None,
        }
    };
    // Appends under way complete. When draining, their acks reach the edge; when the
    // connection is lost they may not, and the edge re-sends and is deduplicated.
    while let Some(joined) = streams.join_next().await {
        ended.extend(joined.ok());
    }
    let reason = match lost {
        Some(error) => error.to_string(),
        None => {
            connection.close(silt_wire::CLOSE_SHUTTING_DOWN.into(), b"core shutting down");
            "core shutting down".to_string()
        }
    };
    drop(ended);
    newest.forget(&connection);
    metrics::gauge!("silt_uplink_connections").decrement(1.0);
    tracing::info!(%remote, %reason, "edge disconnected");
}

fn peer_dns_names(connection: &quinn::Connection) -> Option<Vec<String>> {
    let identity = connection.peer_identity()?;
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    Some(
        chain
            .first()
            .map(tls::certificate_dns_names)
            .unwrap_or_default(),
    )
}

/// Why a stream ended early, sent to the edge as an `Error` frame.
struct StreamFault {
    code: u16,
    message: String,
}

/// Serves one stream; returns its receive half, for the connection to keep until it closes.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    store: Arc<UplinkStore>,
    allowed_ids: Option<Vec<String>>,
    draining: tokio::sync::watch::Receiver<bool>,
    budgets: ServerBudgets,
    (connection, newest): (quinn::Connection, Newest),
) -> quinn::RecvStream {
    let result = stream_loop(
        &mut send,
        &mut recv,
        &store,
        allowed_ids.as_deref(),
        draining,
        budgets,
        (&connection, &newest),
    )
    .await;
    if result.is_ok() {
        // Drained for a shutdown: every frame read is acked. End the stream and wait until
        // the edge has it all (bounded by the server's drain timeout).
        let _ = send.finish();
        let _ = send.stopped().await;
    }
    if let Err(Some(fault)) = result {
        // A log that went back was logged where it was found, with its stream and offsets.
        if fault.code != error_code::LOG_BEHIND {
            tracing::warn!(code = fault.code, error = %fault.message, "uplink stream refused");
        }
        let mut out = BytesMut::new();
        Frame::Error {
            code: fault.code,
            message: &fault.message,
        }
        .encode(&mut out);
        let _ = send.write_all(&out).await;
        let _ = send.finish();
    }
    recv
}

/// Reads one whole frame into `buf` (which may already hold bytes) and returns its length;
/// `Ok(None)` when the edge ended the stream after a whole frame. `Err(None)` is a lost
/// connection (or a reset stream), not worth an `Error` frame.
async fn fill_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Option<usize>, Option<StreamFault>> {
    loop {
        match Frame::decode(buf) {
            Ok(Some((_, used))) => return Ok(Some(used)),
            Ok(None) => {}
            Err(error) => {
                return Err(Some(StreamFault {
                    code: error_code::MALFORMED,
                    message: error.to_string(),
                }));
            }
        }
        buf.reserve(64 << 10);
        match recv.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(Some(StreamFault {
                    code: error_code::MALFORMED,
                    message: "the stream ended inside a frame".into(),
                }));
            }
            Ok(_) => {}
            Err(_) => return Err(None),
        }
    }
}

/// Reads one whole frame as [`fill_frame`] does, unless the server starts draining first:
/// then `Ok(None)`, and nothing more is read.
async fn fill_frame_or_drain(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    draining: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<usize>, Option<StreamFault>> {
    tokio::select! {
        biased;
        _ = draining.wait_for(|&draining| draining) => Ok(None),
        used = fill_frame(recv, buf) => used,
    }
}

/// Serves a stream until it fails (`Err`) or the server drains (`Ok`, once every frame read
/// is appended and acked).
async fn stream_loop(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    store: &Arc<UplinkStore>,
    allowed_ids: Option<&[String]>,
    mut draining: tokio::sync::watch::Receiver<bool>,
    budgets: ServerBudgets,
    (connection, newest): (&quinn::Connection, &Newest),
) -> Result<(), Option<StreamFault>> {
    let mut buf = BytesMut::with_capacity(64 << 10);
    let Some(used) = fill_frame_or_drain(recv, &mut buf, &mut draining).await? else {
        return Ok(());
    };
    let (topic, stream) = match Frame::decode(&buf[..used]) {
        Ok(Some((
            Frame::Hello {
                version,
                edge_id,
                topic,
                partition,
                edge_log,
            },
            _,
        ))) => {
            if !(silt_wire::VERSION_MIN..=silt_wire::VERSION).contains(&version) {
                return Err(Some(StreamFault {
                    code: error_code::UNSUPPORTED_VERSION,
                    message: format!("uplink version {version} is not supported"),
                }));
            }
            if let Err(error) = silt_log::validate_topic_name(topic) {
                return Err(Some(StreamFault {
                    code: error_code::REFUSED,
                    message: error.to_string(),
                }));
            }
            if crate::broker::is_internal_topic(topic) {
                return Err(Some(StreamFault {
                    code: error_code::REFUSED,
                    message: format!("{topic:?} is an internal topic of the core"),
                }));
            }
            if let Some(allowed) = allowed_ids
                && !allowed.iter().any(|name| name == edge_id)
            {
                return Err(Some(StreamFault {
                    code: error_code::REFUSED,
                    message: format!("the client certificate is not for edge {edge_id:?}"),
                }));
            }
            (
                topic.to_string(),
                StreamKey {
                    edge_id: edge_id.to_string(),
                    edge_log: edge_log.to_string(),
                    edge_partition: partition,
                },
            )
        }
        _ => {
            return Err(Some(StreamFault {
                code: error_code::MALFORMED,
                message: "a stream must start with Hello".into(),
            }));
        }
    };
    let _ = buf.split_to(used);
    tracing::debug!(edge = %stream.edge_id, edge_log = %stream.edge_log, %topic, partition = stream.edge_partition, "stream opened");
    newest.take_over(&stream, connection);
    // The reader decodes frames ahead while the appender stores the ones before them, and
    // the appender takes every frame already read in one durable append: one fsync and one
    // ack for several frames when the disk is the slower side.
    let read_ahead = ReadAhead {
        stream: Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_BYTES)),
        server: budgets.read_ahead,
    };
    let (frames_tx, frames_rx) = tokio::sync::mpsc::unbounded_channel();
    let limits = store.decode_limits();
    let decoding = budgets.decoding;
    let reader = read_frames(
        recv, buf, frames_tx, read_ahead, &decoding, draining, &limits,
    );
    let appender = append_frames(send, frames_rx, store, &decoding, &topic, &stream);
    // The appender ends once the reader has stopped (for a drain, the edge's end of the
    // stream or a fault in a frame) and everything read is acked; then the reader's fault,
    // if any, is the stream's. A failed append ends the stream at once, reader and all.
    tokio::pin!(reader, appender);
    let mut read: Option<Result<(), Option<StreamFault>>> = None;
    loop {
        tokio::select! {
            done = &mut reader, if read.is_none() => read = Some(done),
            appended = &mut appender => {
                appended?;
                return match read {
                    Some(read) => read,
                    None => reader.await,
                };
            }
        }
    }
}

/// What a `Data` frame says about itself, as read.
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    first_offset: u64,
    end_offset: u64,
    edge_end: u64,
    wire_bytes: usize,
}

/// One `Data` frame, decompressed, with the read-ahead bytes it holds until it is dropped.
struct DataFrame {
    head: FrameHead,
    shipped: compose::Shipped,
    _read_ahead: [tokio::sync::OwnedSemaphorePermit; 2],
}

/// The read-ahead budgets a stream's frames take from: its own and the server's.
struct ReadAhead {
    stream: Arc<tokio::sync::Semaphore>,
    server: Arc<tokio::sync::Semaphore>,
}

impl ReadAhead {
    /// Waits until `bytes` fit in both budgets. A frame larger than a stream's whole
    /// read-ahead still goes through, alone.
    async fn acquire(&self, bytes: usize) -> [tokio::sync::OwnedSemaphorePermit; 2] {
        let permits = bytes.clamp(1, READ_AHEAD_BYTES) as u32;
        let stream = self.stream.clone().acquire_many_owned(permits);
        let stream = stream.await.expect("the semaphore is never closed");
        let server = self.server.clone().acquire_many_owned(permits);
        [stream, server.await.expect("the semaphore is never closed")]
    }
}

/// A `Data` frame read, and its batches.
struct Decompressing {
    head: FrameHead,
    batches: Batches,
}

enum Batches {
    /// Nothing to decompress: the batches as shipped, passed on without a thread or a slot.
    Ready(compose::Shipped),
    /// Decompressing on a blocking thread, which holds a decoding slot.
    Running(tokio::task::JoinHandle<Result<compose::Shipped, silt_wire::WireError>>),
}

/// Reads `Data` frames and passes them on, holding at most [`READ_AHEAD_BYTES`] of them;
/// stops (`Ok`) when the server drains, which ends the appender once it acked the rest.
///
/// A frame with something to decompress (its envelope or a batch compressed at rest) is
/// decompressed on a blocking thread, holding a decoding slot, while the next ones are read,
/// up to [`DECOMPRESSING_MAX`] at once; frames are passed on in order; a frame found malformed, here or
/// in its decompression, ends the stream only after every frame before it is passed on.
async fn read_frames(
    recv: &mut quinn::RecvStream,
    mut buf: BytesMut,
    frames: tokio::sync::mpsc::UnboundedSender<DataFrame>,
    read_ahead: ReadAhead,
    decoding: &Arc<tokio::sync::Semaphore>,
    mut draining: tokio::sync::watch::Receiver<bool>,
    limits: &DecodeLimits,
) -> Result<(), Option<StreamFault>> {
    // One frame waits in the channel and one in `forward`'s hands; the reader may have
    // started one more before it waits for room.
    let (decompressing_tx, mut decompressing_rx) =
        tokio::sync::mpsc::channel::<Decompressing>(DECOMPRESSING_MAX - 2);
    let read = async move {
        loop {
            let Some(used) = fill_frame_or_drain(recv, &mut buf, &mut draining).await? else {
                return Ok(());
            };
            let frame = buf.split_to(used).freeze();
            let Ok(Some((
                Frame::Data {
                    first_offset,
                    end_offset,
                    edge_end,
                    codec,
                    raw_len,
                    payload,
                },
                _,
            ))) = Frame::decode(&frame)
            else {
                return Err(Some(StreamFault {
                    code: error_code::MALFORMED,
                    message: "expected a Data frame".into(),
                }));
            };
            // Shipped as stored, the batches are the frame's own bytes, not a copy. Batches the
            // edge compressed at rest are decompressed too, while the appender composes and
            // writes the frames before this one.
            let payload = frame.slice_ref(payload);
            let batches = if codec == Codec::None && compose::compressed_at_rest(&payload).is_none()
            {
                Batches::Ready(compose::Shipped {
                    batches: payload,
                    crc_checked: false,
                })
            } else {
                let limits = *limits;
                let slot = decoding_slot(decoding).await;
                Batches::Running(tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    let batches = silt_wire::decompress_batches(codec, raw_len, payload)?;
                    Ok(compose::decompress_shipped(batches, &limits))
                }))
            };
            let head = FrameHead {
                first_offset,
                end_offset,
                edge_end,
                wire_bytes: frame.len(),
            };
            let pending = Decompressing { head, batches };
            if decompressing_tx.send(pending).await.is_err() {
                // `forward` stopped: its result is the stream's.
                return Err(None);
            }
        }
    };
    let forward = async move {
        while let Some(pending) = decompressing_rx.recv().await {
            let decompressed = match pending.batches {
                Batches::Ready(shipped) => Ok(Ok(shipped)),
                Batches::Running(task) => task.await,
            };
            let shipped = match decompressed {
                Ok(Ok(shipped)) => shipped,
                Ok(Err(error)) => {
                    return Err(Some(StreamFault {
                        code: error_code::MALFORMED,
                        message: error.to_string(),
                    }));
                }
                Err(_) => {
                    return Err(Some(StreamFault {
                        code: error_code::STORAGE,
                        message: "decompressing a frame panicked".into(),
                    }));
                }
            };
            let held = read_ahead.acquire(shipped.batches.len()).await;
            let frame = DataFrame {
                head: pending.head,
                shipped,
                _read_ahead: held,
            };
            if frames.send(frame).is_err() {
                return Err(None);
            }
        }
        Ok(())
    };
    // The reader's end (a drain, a fault) closes the channel, so `forward` passes on what it
    // holds and ends, and then the reader's fault is the stream's. A failure of `forward`'s
    // (a frame that will not decompress) is the stream's at once: the reader may be waiting
    // for an edge that has nothing more to send, and is dropped.
    tokio::pin!(read, forward);
    tokio::select! {
        forwarded = &mut forward => {
            forwarded?;
            // `forward` ends well only once the reader has ended and closed the channel.
            read.await
        }
        read_result = &mut read => {
            forward.await?;
            read_result
        }
    }
}

/// A group of frames being composed on a blocking thread.
struct Composing {
    group: Vec<DataFrame>,
    task: tokio::task::JoinHandle<Result<(store::ComposedGroup, store::StagedNext), StoreError>>,
}

/// A group of frames being written (then synced) on a blocking thread; `written` fires once
/// its batches are in the log, before the fsync.
struct Writing {
    group: Vec<DataFrame>,
    written: tokio::sync::oneshot::Receiver<()>,
    task: tokio::task::JoinHandle<Result<store::AppendOutcome, StoreError>>,
}

/// A group of frames written and being synced on a blocking thread.
struct InFlight {
    group: Vec<DataFrame>,
    task: tokio::task::JoinHandle<Result<store::AppendOutcome, StoreError>>,
}

/// Waits for `future` if there is one, and forever if not: a `select!` branch for a stage
/// that may be empty.
async fn stage_done<F: std::future::Future + Unpin>(future: Option<&mut F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Appends the frames read, as many as are waiting at once, and acks each group once it is
/// durable. Pipelined in three stages, each on a blocking thread of its own: a group is
/// composed while the group before it is written and the one before that is fsync'd; acks
/// go out in order. Every group in the pipeline holds read-ahead permits until it is acked.
async fn append_frames(
    send: &mut quinn::SendStream,
    mut frames: tokio::sync::mpsc::UnboundedReceiver<DataFrame>,
    store: &Arc<UplinkStore>,
    decoding: &Arc<tokio::sync::Semaphore>,
    topic: &str,
    stream: &StreamKey,
) -> Result<(), Option<StreamFault>> {
    let labels = Labels::new(topic, stream);
    let mut composing: Option<Composing> = None;
    // Composed and waiting for the group before it to be written.
    let mut composed: Option<(Vec<DataFrame>, store::ComposedGroup)> = None;
    let mut writing: Option<Writing> = None;
    // Written, in order; acked from the front as their fsyncs finish.
    let mut syncing: std::collections::VecDeque<InFlight> = std::collections::VecDeque::new();
    // Held while groups are in the pipeline; dropped when it is empty, so a reconnected
    // edge's stream for the same partition can take over.
    let mut turn: Option<store::StreamTurn> = None;
    let mut staged = store::StagedNext::new();
    // Whether the stream's first group was handed to `compose_group`: only that one is checked
    // against what the core stores from the edge log. An honest edge's log never ends below
    // what the core stored from it, but a stale connection of the same edge (one the edge
    // already gave up on) may still have frames in the core's read-ahead, composed after the
    // new connection moved the mark past their `edge_end`. That stream's first group was
    // checked long before, so checking only first groups does not refuse them, and a log that
    // went back is caught when it reconnects, at its first frame. (Should a stale stream's
    // first group be composed after the new one's, its refusal goes to a connection the edge
    // has closed, as it closes a connection whenever one of its streams ends.)
    let mut first_group_taken = false;
    let mut reading = true;
    loop {
        let idle =
            composing.is_none() && composed.is_none() && writing.is_none() && syncing.is_empty();
        if idle {
            if !reading {
                // The reader stopped (a drain, the edge's end of the stream or a fault in a
                // frame) and everything it read is acked: the stream is done.
                return Ok(());
            }
            turn = None;
            staged.clear();
        }
        // A composed group is written once the group before it is.
        if writing.is_none()
            && let Some((group, ready)) = composed.take()
        {
            let (written_tx, written) = tokio::sync::oneshot::channel();
            let (store_ref, topic_name, key) = (store.clone(), topic.to_string(), stream.clone());
            let task = tokio::task::spawn_blocking(move || {
                store_ref.write_group(&topic_name, &key, ready, || {
                    let _ = written_tx.send(());
                })
            });
            writing = Some(Writing {
                group,
                written,
                task,
            });
        }
        let take_frames = reading && composing.is_none() && composed.is_none();
        tokio::select! {
            biased;
            done = stage_done(syncing.front_mut().map(|pending| &mut pending.task)) => {
                let pending = syncing.pop_front().expect("just polled");
                complete(send, pending.group, done, &labels).await?;
            }
            written = stage_done(writing.as_mut().map(|pending| &mut pending.written)) => {
                let pending = writing.take().expect("just polled");
                let pending = InFlight { group: pending.group, task: pending.task };
                if written.is_err() {
                    // Failed before it was written whole: its outcome says why, once the
                    // groups before it are acked (acks stay in order). The groups composed
                    // after it are never written.
                    for before in syncing.drain(..) {
                        let done = before.task.await;
                        complete(send, before.group, done, &labels).await?;
                    }
                    let done = pending.task.await;
                    complete(send, pending.group, done, &labels).await?;
                    continue;
                }
                syncing.push_back(pending);
            }
            done = stage_done(composing.as_mut().map(|pending| &mut pending.task)) => {
                let pending = composing.take().expect("just polled");
                match done {
                    Ok(Ok((ready, next))) => {
                        staged = next;
                        composed = Some((pending.group, ready));
                    }
                    failed => {
                        // The groups before it are acked first (in order, once durable),
                        // then its error ends the stream.
                        for before in syncing.drain(..) {
                            let done = before.task.await;
                            complete(send, before.group, done, &labels).await?;
                        }
                        if let Some(before) = writing.take() {
                            let done = before.task.await;
                            complete(send, before.group, done, &labels).await?;
                        }
                        let done = failed
                            .map(|composed| composed.map(|_| store::AppendOutcome::default()));
                        complete(send, pending.group, done, &labels).await?;
                    }
                }
            }
            received = frames.recv(), if take_frames => {
                let Some(first) = received else {
                    reading = false;
                    continue;
                };
                let mut group = vec![first];
                while let Ok(next) = frames.try_recv() {
                    group.push(next);
                }
                let group_turn = match &turn {
                    Some(turn) => turn.clone(),
                    None => turn.insert(store.lock_stream(topic, stream).await).clone(),
                };
                let parts: Vec<(u64, compose::Shipped)> = group
                    .iter()
                    .map(|frame| (frame.head.first_offset, frame.shipped.clone()))
                    .collect();
                // The lowest, which is the first frame's (the edge's high watermark only
                // grows): the log's end as soon after the reconnect as there is one, before
                // records it takes meanwhile can lift it past the mark. An honest edge read
                // even this frame after every record the core has from its log.
                let edge_end = if first_group_taken {
                    None
                } else {
                    first_group_taken = true;
                    group.iter().map(|frame| frame.head.edge_end).min()
                };
                let (store_ref, topic_name, key, staged_in) =
                    (store.clone(), topic.to_string(), stream.clone(), staged.clone());
                let slot = decoding_slot(decoding).await;
                let task = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    let parts: Vec<compose::Part<'_>> = parts
                        .iter()
                        .map(|(first_offset, shipped)| compose::Part {
                            first_offset: *first_offset,
                            batches: &shipped.batches,
                            crc_checked: shipped.crc_checked,
                        })
                        .collect();
                    store_ref.compose_group(
                        group_turn,
                        &topic_name,
                        &key,
                        &parts,
                        &staged_in,
                        edge_end,
                    )
                });
                composing = Some(Composing { group, task });
            }
        }
    }
}

/// Metric labels of one stream, and what its log lines name.
struct Labels {
    topic: String,
    key: StreamKey,
    topic_edge: [(&'static str, String); 2],
    stream: [(&'static str, String); 3],
}

impl Labels {
    fn new(topic: &str, stream: &StreamKey) -> Labels {
        Labels {
            topic: topic.to_string(),
            key: stream.clone(),
            topic_edge: [
                ("topic", topic.to_string()),
                ("edge", stream.edge_id.clone()),
            ],
            stream: [
                ("topic", topic.to_string()),
                ("edge", stream.edge_id.clone()),
                ("edge_partition", stream.edge_partition.to_string()),
            ],
        }
    }
}

/// Acks a group once its append is done (or ends the stream with its error), frees its
/// read-ahead and counts it.
async fn complete(
    send: &mut quinn::SendStream,
    group: Vec<DataFrame>,
    done: Result<Result<store::AppendOutcome, StoreError>, tokio::task::JoinError>,
    labels: &Labels,
) -> Result<(), Option<StreamFault>> {
    let outcome = done.map_err(|_| {
        Some(StreamFault {
            code: error_code::STORAGE,
            message: "the append panicked".into(),
        })
    })?;
    let outcome = outcome.map_err(|error| {
        let code = match error {
            StoreError::BadBatch(_) => error_code::MALFORMED,
            StoreError::Log(_) | StoreError::Checkpoint(_) => error_code::STORAGE,
            // The leader moved: the edge reconnects and retries.
            StoreError::NotLeader { .. } => error_code::REFUSED,
            StoreError::EdgeLogBehind {
                edge_end,
                stored_end,
            } => {
                // Logged here rather than with the other refusals, which do not know the
                // stream: an operator needs to know which edge's log went back, and how far.
                tracing::warn!(
                    topic = %labels.topic,
                    edge = %labels.key.edge_id,
                    edge_log = %labels.key.edge_log,
                    edge_partition = labels.key.edge_partition,
                    edge_end,
                    stored_end,
                    "uplink stream refused: the edge log went back below what the core stores from it"
                );
                metrics::counter!("silt_uplink_log_behind_total", &labels.topic_edge).increment(1);
                error_code::LOG_BEHIND
            }
        };
        Some(StreamFault {
            code,
            message: error.to_string(),
        })
    })?;
    let last = group.last().expect("a group has a frame");
    let (end_offset, edge_end) = (last.head.end_offset, last.head.edge_end);
    let wire_bytes: usize = group.iter().map(|frame| frame.head.wire_bytes).sum();
    let labels_te = &labels.topic_edge;
    metrics::counter!("silt_uplink_received_records_total", labels_te)
        .increment(outcome.appended_records);
    metrics::counter!("silt_uplink_duplicate_records_total", labels_te)
        .increment(outcome.duplicate_records);
    metrics::counter!("silt_uplink_received_bytes_total", labels_te)
        .increment(outcome.appended_bytes);
    metrics::counter!("silt_uplink_received_wire_bytes_total", labels_te)
        .increment(wire_bytes as u64);
    metrics::counter!("silt_uplink_appends_total", labels_te).increment(1);
    // What the edge had not shipped when it sent the last frame: its lag as the core
    // sees it, in records and (estimated from this group's bytes per record) bytes.
    let lag_records = edge_end.saturating_sub(end_offset);
    metrics::gauge!("silt_uplink_edge_lag_records", &labels.stream).set(lag_records as f64);
    let group_records = end_offset.saturating_sub(group[0].head.first_offset).max(1);
    let group_raw: usize = group.iter().map(|frame| frame.shipped.batches.len()).sum();
    metrics::gauge!("silt_uplink_edge_lag_bytes", &labels.stream)
        .set(lag_records as f64 * group_raw as f64 / group_records as f64);
    // Acks are cumulative: one for the group's last frame acknowledges them all.
    let mut out = BytesMut::with_capacity(16);
    Frame::Ack { end_offset }.encode(&mut out);
    if send.write_all(&out).await.is_err() {
        return Err(None);
    }
    Ok(())
}
