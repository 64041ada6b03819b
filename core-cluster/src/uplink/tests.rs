//! The uplink server over real QUIC on loopback: a `quinn` client speaks the wire protocol to
//! [`UplinkServer`] over a core log in a temporary directory, and the log is read back to
//! check that what was acked is stored exactly once, and nothing else is.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use silt_log::batch::{
    BatchSpec, Compression, DecodeLimits, Header, Record, decode_batch, encode_batch,
};
use silt_log::{LogConfig, LogManager};
use silt_wire::{Codec, Frame, error_code};

use super::store::{StreamKey, record_origin, route};
use super::{AppendHook, DECODING_SERVER_MAX, UplinkServer, UplinkServerConfig};

const TOPIC: &str = "mqtt";
const EDGE: &str = "e1";
const EDGE_LOG: &str = "0f1e2d3c4b5a6978";
const PARTITIONS: u32 = 3;
/// Keys spread over the topic's partitions (checked in [`start_core`]).
const KEYS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const RECORDS_PER_FRAME: u64 = 5;
/// Bytes of padding in each record's value: frames large enough (10 KiB) that the server
/// reads a stream over many groups rather than all at once.
const VALUE_PAD_BYTES: usize = 2048;
/// Bounds every wait; a passing run takes a small fraction of it.
const DEADLINE: Duration = Duration::from_secs(30);

/// A running uplink server over a log in a temporary directory.
struct Core {
    log: Arc<LogManager>,
    client: quinn::ClientConfig,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    /// The server's decoding slots, for a test to take as other streams would.
    decoding: Arc<tokio::sync::Semaphore>,
    _dir: tempfile::TempDir,
}

fn start_core() -> Core {
    start_core_with(crate::config::defaults::UPLINK_MAX_CONNECTIONS as usize)
}

fn start_core_with(max_connections: usize) -> Core {
    let used: std::collections::HashSet<u32> = KEYS
        .iter()
        .map(|key| route(Some(key.as_bytes()), EDGE, PARTITIONS))
        .collect();
    assert_eq!(
        used.len(),
        PARTITIONS as usize,
        "the keys must span partitions"
    );
    let dir = tempfile::tempdir().unwrap();
    let log = LogManager::open(LogConfig::new(dir.path().join("core"))).unwrap();
    let tls = crate::tls::ensure_dev_tls(&dir.path().join("tls"), &[]).unwrap();
    let config = UplinkServerConfig {
        tls,
        leadership: Arc::default(),
        default_partitions: PARTITIONS,
        on_append: AppendHook::default(),
        max_connections,
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = UplinkServer::bind(socket, log.clone(), &config).unwrap();
    let addr = server.local_addr().unwrap();
    let decoding = server.budgets.decoding.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let ca = std::fs::read(dir.path().join("tls").join(crate::tls::CA_FILE)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![silt_wire::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let client = quinn::ClientConfig::new(Arc::new(quic));
    Core {
        log,
        client,
        addr,
        stop,
        server,
        decoding,
        _dir: dir,
    }
}

/// An edge's stream for partition 0: `Hello` sent, then `frames` written by a task of their
/// own, without waiting for acks (the edge's pipelining); then, with `finish`, the end of
/// the stream. A write the server refuses ends it.
async fn ship(core: &Core, frames: Vec<Bytes>, finish: bool) -> (quinn::Connection, Replies) {
    let connection = connect(core).await.unwrap();
    ship_on(connection, frames, finish).await
}

/// A new connection to the server, from an endpoint of its own.
async fn connect(core: &Core) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(core.client.clone());
    let connection = endpoint.connect(core.addr, "localhost").unwrap();
    tokio::time::timeout(DEADLINE, connection).await.unwrap()
}

/// A new connection, retried until the server has room for it (it noticed one close).
async fn connect_once_admitted(core: &Core) -> quinn::Connection {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match connect(core).await {
            Ok(connection) => return connection,
            Err(error) => assert!(
                tokio::time::Instant::now() < deadline,
                "still refused after a connection closed: {error}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`ship`] on a connection already made.
async fn ship_on(
    connection: quinn::Connection,
    frames: Vec<Bytes>,
    finish: bool,
) -> (quinn::Connection, Replies) {
    ship_after(connection, hello(), frames, finish).await
}

/// [`ship_on`] with the stream opened by `hello`.
async fn ship_after(
    connection: quinn::Connection,
    hello: Bytes,
    frames: Vec<Bytes>,
    finish: bool,
) -> (quinn::Connection, Replies) {
    let (mut send, recv) = connection.open_bi().await.unwrap();
    tokio::spawn(async move {
        if send.write_all(&hello).await.is_err() {
            return;
        }
        for frame in frames {
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        if finish {
            let _ = send.finish();
        }
        // Kept until the connection goes: dropping it would reset an unfinished stream.
        std::future::pending::<()>().await;
    });
    let replies = Replies {
        recv,
        buf: BytesMut::new(),
    };
    (connection, replies)
}

/// The `Hello` that opens the edge's stream for partition 0 of [`TOPIC`].
fn hello() -> Bytes {
    hello_of(silt_wire::VERSION, EDGE_LOG)
}

fn hello_of(version: u16, edge_log: &str) -> Bytes {
    let mut out = BytesMut::new();
    Frame::Hello {
        version,
        edge_id: EDGE,
        topic: TOPIC,
        partition: 0,
        edge_log,
    }
    .encode(&mut out);
    out.freeze()
}

/// The `Data` frame of the edge records at `first_offset..first_offset + count`; `corrupt`
/// flips a byte the batch's CRC covers, leaving the frame itself well formed.
fn data_frame(first_offset: u64, count: u64, corrupt: bool) -> Bytes {
    frame_of(first_offset, count, corrupt, Compression::None)
}

/// [`data_frame`] read when the edge's log ended at `edge_end` (its records shipped so far
/// end where the frame's do).
fn data_frame_ending(first_offset: u64, count: u64, edge_end: u64) -> Bytes {
    frame_ending(first_offset, count, edge_end, false, Compression::None)
}

/// [`data_frame`] with its one batch compressed with `compression`.
fn frame_of(first_offset: u64, count: u64, corrupt: bool, compression: Compression) -> Bytes {
    frame_ending(
        first_offset,
        count,
        first_offset + count,
        corrupt,
        compression,
    )
}

/// [`frame_of`] read when the edge's log ended at `edge_end`.
fn frame_ending(
    first_offset: u64,
    count: u64,
    edge_end: u64,
    corrupt: bool,
    compression: Compression,
) -> Bytes {
    let records: Vec<Record> = (first_offset..first_offset + count)
        .map(|offset| Record {
            timestamp: 1_000 + offset as i64,
            key: Some(Bytes::from_static(
                KEYS[offset as usize % KEYS.len()].as_bytes(),
            )),
            value: Some(Bytes::from(value(offset))),
            headers: vec![Header {
                key: "mqtt.topic".into(),
                value: Some(Bytes::from_static(b"t")),
            }],
        })
        .collect();
    let spec = BatchSpec {
        base_offset: first_offset as i64,
        compression,
        ..BatchSpec::default()
    };
    let mut batch = BytesMut::new();
    encode_batch(&spec, &records, &mut batch).unwrap();
    if corrupt {
        let last = batch.len() - 1;
        batch[last] ^= 0xff;
    }
    let mut out = BytesMut::new();
    Frame::Data {
        first_offset,
        end_offset: first_offset + count,
        edge_end,
        codec: Codec::None,
        raw_len: batch.len() as u32,
        payload: &batch,
    }
    .encode(&mut out);
    out.freeze()
}

/// [`data_frame`]'s records in one batch compressed at rest (zstd), as an edge stores a
/// batch under load and ships it as stored.
fn zstd_frame(first_offset: u64, count: u64) -> Bytes {
    frame_of(first_offset, count, false, Compression::Zstd)
}

/// The value of the edge record at `offset`.
fn value(offset: u64) -> String {
    format!("v{offset}:{}", "x".repeat(VALUE_PAD_BYTES))
}

/// `frames` good frames of [`RECORDS_PER_FRAME`] records each, from edge offset 0, read from
/// an edge log holding them all: each says the log ends past the last, as a real edge's
/// frames do when it re-sends them (a log that ends below what the core has is refused).
fn good_frames(frames: u64) -> Vec<Bytes> {
    let edge_end = frames * RECORDS_PER_FRAME;
    (0..frames)
        .map(|index| data_frame_ending(index * RECORDS_PER_FRAME, RECORDS_PER_FRAME, edge_end))
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ack(u64),
    Error(u16, String),
    /// The server ended its half of the stream.
    End,
}

/// The server's half of a stream, decoded frame by frame.
struct Replies {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl Replies {
    async fn next(&mut self) -> Reply {
        tokio::time::timeout(DEADLINE, self.next_unbounded())
            .await
            .expect("no reply within the deadline")
    }

    async fn next_unbounded(&mut self) -> Reply {
        loop {
            let decoded = Frame::decode(&self.buf).unwrap().map(|(frame, used)| {
                let reply = match frame {
                    Frame::Ack { end_offset } => Reply::Ack(end_offset),
                    Frame::Error { code, message } => Reply::Error(code, message.to_string()),
                    other => panic!("the server sent {other:?}"),
                };
                (reply, used)
            });
            if let Some((reply, used)) = decoded {
                let _ = self.buf.split_to(used);
                return reply;
            }
            let mut chunk = [0u8; 4096];
            match self.recv.read(&mut chunk).await.unwrap() {
                Some(len) => self.buf.extend_from_slice(&chunk[..len]),
                None => {
                    assert!(self.buf.is_empty(), "the stream ended inside a frame");
                    return Reply::End;
                }
            }
        }
    }

    /// Reads acks until one reaches `end_offset`, checking they only move forward, on frame
    /// boundaries.
    async fn acks_through(&mut self, end_offset: u64) {
        let mut acked = 0;
        while acked < end_offset {
            match self.next().await {
                Reply::Ack(ack) => acked = advance(acked, ack, end_offset),
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    }
}

/// The cumulative ack after `ack` follows `acked`: it never goes back, never passes `limit`
/// and ends on a frame boundary.
fn advance(acked: u64, ack: u64, limit: u64) -> u64 {
    assert!(
        ack >= acked && ack <= limit,
        "ack {ack} after {acked} (limit {limit})"
    );
    assert_eq!(ack % RECORDS_PER_FRAME, 0, "ack {ack} inside a frame");
    ack
}

/// Each core partition's records in log order, as (stream, edge offset), each record
/// checked to be the edge's (origin, value) and routed to the partition its key hashes to.
fn stored_origins(log: &LogManager) -> Vec<Vec<(StreamKey, u64)>> {
    let partitions = log.topic(TOPIC).unwrap().partitions;
    (0..partitions)
        .map(|partition| {
            let part = log.partition(TOPIC, partition).unwrap();
            let mut origins = Vec::new();
            let mut next = 0;
            while next < part.high_watermark() {
                let bytes = part.read(next, 1 << 20).unwrap().bytes;
                let mut rest = &bytes[..];
                while let Some((_, records, used)) =
                    decode_batch(rest, &DecodeLimits::default()).unwrap()
                {
                    rest = &rest[used..];
                    for record in records {
                        // A read may start inside a batch already taken.
                        if (record.offset as u64) < next {
                            continue;
                        }
                        next = record.offset as u64 + 1;
                        let (stream, edge_offset) = record_origin(&record.headers).unwrap();
                        assert_eq!((stream.edge_id.as_str(), stream.edge_partition), (EDGE, 0));
                        assert_eq!(record.value.unwrap(), value(edge_offset));
                        let key = record.key.unwrap();
                        assert_eq!(route(Some(&key[..]), EDGE, partitions), partition);
                        origins.push((stream, edge_offset));
                    }
                }
            }
            origins
        })
        .collect()
}

/// The edge offsets stored in each core partition, in log order (see [`stored_origins`]).
fn stored(log: &LogManager) -> Vec<Vec<u64>> {
    stored_origins(log)
        .into_iter()
        .map(|origins| origins.into_iter().map(|(_, offset)| offset).collect())
        .collect()
}

/// Asserts the log holds edge offsets `0..end_offset` exactly once each, every partition's in
/// increasing order.
fn assert_stored_exactly(log: &LogManager, end_offset: u64) {
    let stored = stored(log);
    for (partition, offsets) in stored.iter().enumerate() {
        assert!(
            offsets.windows(2).all(|pair| pair[0] < pair[1]),
            "partition {partition} is out of edge order: {offsets:?}"
        );
    }
    let mut all: Vec<u64> = stored.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (0..end_offset).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipelined_stream_is_acked_in_order_and_stored_once() {
    let core = start_core();
    let frames = good_frames(300);
    let end_offset = 300 * RECORDS_PER_FRAME;
    let (connection, mut replies) = ship(&core, frames.clone(), false).await;
    replies.acks_through(end_offset).await;
    assert_stored_exactly(&core.log, end_offset);
    let before = stored(&core.log);
    assert!(before.iter().all(|offsets| !offsets.is_empty()));

    // A reconnected edge that lost every ack re-sends it all: acked, stored nothing twice.
    connection.close(0u32.into(), b"reconnecting");
    let (_connection, mut replies) = ship(&core, frames, false).await;
    replies.acks_through(end_offset).await;
    assert_eq!(stored(&core.log), before);
}

/// The edge log each stored record names.
fn stored_edge_logs(log: &LogManager) -> Vec<String> {
    stored_origins(log)
        .into_iter()
        .flatten()
        .map(|(stream, _)| stream.edge_log)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_edge_is_served_and_a_new_edge_log_starts_a_new_stream() {
    let core = start_core();
    let frames = good_frames(3);
    let end_offset = 3 * RECORDS_PER_FRAME;
    // An edge of before logs had ids: a version 1 Hello, records without `silt.edge.log`.
    let connection = connect(&core).await.unwrap();
    let (_old, mut replies) = ship_after(connection, hello_of(1, ""), frames.clone(), false).await;
    replies.acks_through(end_offset).await;
    assert_stored_exactly(&core.log, end_offset);

    // The same edge id and partition from a log with an id (the data directory made anew):
    // offsets from 0 again, none of them a duplicate.
    let (_new, mut replies) = ship(&core, frames.clone(), false).await;
    replies.acks_through(end_offset).await;
    let logs = stored_edge_logs(&core.log);
    assert_eq!(logs.len() as u64, 2 * end_offset);
    assert_eq!(
        logs.iter().filter(|log| log.is_empty()).count() as u64,
        end_offset
    );
    assert_eq!(
        logs.iter().filter(|log| *log == EDGE_LOG).count() as u64,
        end_offset
    );

    // Each is deduplicated against its own log's offsets: re-sent, nothing is stored again.
    let connection = connect(&core).await.unwrap();
    let (_old_again, mut replies) =
        ship_after(connection, hello_of(1, ""), frames.clone(), false).await;
    replies.acks_through(end_offset).await;
    let (_new_again, mut replies) = ship(&core, frames, false).await;
    replies.acks_through(end_offset).await;
    assert_eq!(stored_edge_logs(&core.log).len() as u64, 2 * end_offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_log_that_went_back_is_refused_before_anything_of_it_is_stored() {
    let core = start_core();
    let edge_log = "00aa";
    let open = || hello_of(silt_wire::VERSION, edge_log);
    let stored_end = 20 * RECORDS_PER_FRAME;
    let connection = connect(&core).await.unwrap();
    let (_shipped, mut replies) = ship_after(connection, open(), good_frames(20), false).await;
    replies.acks_through(stored_end).await;
    assert_stored_exactly(&core.log, stored_end);
    let before = stored(&core.log);

    // The edge's data directory restored from a backup taken at offset 50: the same log id,
    // and the records it takes from now on get offsets 50 and up, which the core has. It
    // reconnects and re-sends from its restored cursor, its log growing meanwhile (past the
    // core's end, too); taken as duplicates, all of it would be acked and lost.
    let restored_end = 50;
    let frames = vec![
        data_frame_ending(0, restored_end, restored_end),
        data_frame_ending(restored_end, stored_end - restored_end, stored_end),
        data_frame_ending(stored_end, 2 * RECORDS_PER_FRAME, stored_end + 10),
    ];
    let connection = connect(&core).await.unwrap();
    let (_restored, mut replies) = ship_after(connection, open(), frames, false).await;
    match replies.next().await {
        Reply::Error(code, message) => {
            assert_eq!(code, error_code::LOG_BEHIND, "{message}");
            assert!(
                message.contains(&format!("offset {restored_end}"))
                    && message.contains(&format!("offset {stored_end}")),
                "the message names both ends: {message}"
            );
        }
        other => panic!("expected the stream's error, got {other:?}"),
    }
    assert_eq!(replies.next().await, Reply::End);
    // Nothing of the refused stream was stored, not even its records past the core's end.
    assert_eq!(stored(&core.log), before);

    // The same edge log, not behind (a reconnect that lost its last acks): the records the
    // core has are skipped, the new ones stored, and all of it acked.
    let new_end = stored_end + 2 * RECORDS_PER_FRAME;
    let resend = vec![data_frame_ending(
        stored_end - 2 * RECORDS_PER_FRAME,
        4 * RECORDS_PER_FRAME,
        new_end,
    )];
    let connection = connect(&core).await.unwrap();
    let (_resumed, mut replies) = ship_after(connection, open(), resend, false).await;
    replies.acks_through(new_end).await;
    assert_stored_exactly(&core.log, new_end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_mid_stream_acks_everything_before_it_then_fails_the_stream() {
    let core = start_core();
    let good = 100;
    let bad_offset = good * RECORDS_PER_FRAME;
    let mut frames = good_frames(good);
    frames.push(data_frame(bad_offset, RECORDS_PER_FRAME, true));
    let after = bad_offset + RECORDS_PER_FRAME;
    frames.extend(
        (0..20)
            .map(|index| data_frame(after + index * RECORDS_PER_FRAME, RECORDS_PER_FRAME, false)),
    );
    let (_connection, mut replies) = ship(&core, frames, false).await;
    // Acks up to the bad frame at most (its group may hold good frames before it, which fail
    // with it), then its error, then the end of the stream.
    let mut acked = 0;
    let code = loop {
        match replies.next().await {
            Reply::Ack(ack) => acked = advance(acked, ack, bad_offset),
            Reply::Error(code, _) => break code,
            Reply::End => panic!("the stream ended without an error"),
        }
    };
    assert_eq!(code, error_code::MALFORMED);
    assert_eq!(replies.next().await, Reply::End);
    // Every group written before the fault was acked before it, and nothing of the failed
    // group or after it was written.
    assert_stored_exactly(&core.log, acked);

    // The edge re-sends from its last ack what came before the bad frame: all of it stored.
    let (_connection, mut replies) = ship(&core, good_frames(good), false).await;
    replies.acks_through(bad_offset).await;
    assert_stored_exactly(&core.log, bad_offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_mid_stream_acks_what_was_read_and_ends_the_stream_cleanly() {
    let core = start_core();
    // Enough (10 MiB) that the shutdown usually comes before the server has read it all.
    let frames = good_frames(1000);
    let end_offset = 1000 * RECORDS_PER_FRAME;
    let (connection, mut replies) = ship(&core, frames, false).await;
    let Reply::Ack(mut acked) = replies.next().await else {
        panic!("expected an ack");
    };
    core.stop.send(()).unwrap();
    loop {
        match replies.next().await {
            Reply::Ack(ack) => acked = advance(acked, ack, end_offset),
            Reply::End => break,
            Reply::Error(code, message) => panic!("shutdown failed the stream: {code} {message}"),
        }
    }
    let closed = tokio::time::timeout(DEADLINE, connection.closed()).await;
    match closed.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, silt_wire::CLOSE_SHUTTING_DOWN.into());
        }
        other => panic!("expected an orderly close, got {other}"),
    }
    tokio::time::timeout(DEADLINE, core.server)
        .await
        .unwrap()
        .unwrap();
    // Whatever the server read before it stopped is acked and stored; nothing else is.
    assert_stored_exactly(&core.log, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_out_of_place_fails_the_stream_after_every_frame_before_it_is_acked() {
    let core = start_core();
    let good = 100;
    let end_offset = good * RECORDS_PER_FRAME;
    let mut frames = good_frames(good);
    // A second `Hello` is refused as it is read, not in an append: every frame before it
    // was read, so every one is appended and acked before the error.
    frames.push(hello());
    frames.extend((0..20).map(|index| {
        data_frame(
            end_offset + index * RECORDS_PER_FRAME,
            RECORDS_PER_FRAME,
            false,
        )
    }));
    let (_connection, mut replies) = ship(&core, frames, false).await;
    replies.acks_through(end_offset).await;
    match replies.next().await {
        Reply::Error(code, _) => assert_eq!(code, error_code::MALFORMED),
        other => panic!("expected the stream's error, got {other:?}"),
    }
    assert_eq!(replies.next().await, Reply::End);
    assert_stored_exactly(&core.log, end_offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_decompress_in_parallel_but_are_acked_in_order_up_to_one_that_will_not() {
    let good = 100;
    let end_offset = good * RECORDS_PER_FRAME;
    // Frames after the bad one, and none: an edge that sends nothing more still gets the
    // stream's error at once, not when (if ever) its next frame comes.
    for trailing in [19, 0] {
        let core = start_core();
        // Every frame's batch compressed at rest, so each takes its turn on a blocking thread.
        let mut frames: Vec<Bytes> = (0..good)
            .map(|index| zstd_frame(index * RECORDS_PER_FRAME, RECORDS_PER_FRAME))
            .collect();
        // A frame whose zstd envelope is not zstd: found in its decompression, after the
        // frames read behind it started theirs, and still the stream's end after every frame
        // before it.
        let mut bad = BytesMut::new();
        Frame::Data {
            first_offset: end_offset,
            end_offset: end_offset + RECORDS_PER_FRAME,
            edge_end: end_offset + RECORDS_PER_FRAME,
            codec: Codec::Zstd,
            raw_len: 1 << 10,
            payload: b"not a zstd frame",
        }
        .encode(&mut bad);
        frames.push(bad.freeze());
        frames
            .extend((1..=trailing).map(|index| {
                zstd_frame(end_offset + index * RECORDS_PER_FRAME, RECORDS_PER_FRAME)
            }));
        let (_connection, mut replies) = ship(&core, frames, false).await;
        replies.acks_through(end_offset).await;
        match replies.next().await {
            Reply::Error(code, _) => assert_eq!(code, error_code::MALFORMED, "{trailing}"),
            other => panic!("expected the stream's error, got {other:?} ({trailing})"),
        }
        assert_eq!(replies.next().await, Reply::End, "{trailing}");
        assert_stored_exactly(&core.log, end_offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_edge_ends_is_acked_whole_and_ended() {
    let core = start_core();
    let end_offset = 100 * RECORDS_PER_FRAME;
    let (_connection, mut replies) = ship(&core, good_frames(100), true).await;
    replies.acks_through(end_offset).await;
    assert_eq!(replies.next().await, Reply::End);
    assert_stored_exactly(&core.log, end_offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_wait_for_a_server_decoding_slot_and_one_slot_is_enough_for_a_whole_stream() {
    // How long the test watches for an ack that must not come: a frame that did not wait
    // is acked within milliseconds.
    const HELD: Duration = Duration::from_millis(300);
    let core = start_core();
    // Every slot taken, as other streams' frames and groups would.
    let last = core.decoding.clone().acquire_owned().await.unwrap();
    let _others = core
        .decoding
        .clone()
        .acquire_many_owned(DECODING_SERVER_MAX as u32 - 1)
        .await
        .unwrap();
    let frames = 40;
    let end_offset = frames * RECORDS_PER_FRAME;
    let at_rest = (0..frames)
        .map(|index| zstd_frame(index * RECORDS_PER_FRAME, RECORDS_PER_FRAME))
        .collect();
    let (_connection, mut replies) = ship(&core, at_rest, false).await;
    assert!(
        tokio::time::timeout(HELD, replies.next_unbounded())
            .await
            .is_err(),
        "a frame was acked while every decoding slot was taken"
    );
    assert!(
        core.log
            .topic(TOPIC)
            .is_none_or(|_| stored(&core.log).iter().all(Vec::is_empty))
    );
    // One free slot, taken in turn by the stream's decompressions and compositions: every
    // frame goes through, in order.
    drop(last);
    replies.acks_through(end_offset).await;
    assert_stored_exactly(&core.log, end_offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_until_one_of_them_closes() {
    let core = start_core_with(2);
    let first = connect(&core).await.unwrap();
    let (_second, mut replies) = ship(&core, good_frames(2), true).await;
    match connect(&core).await {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::TransportErrorCode::CONNECTION_REFUSED
            );
        }
        other => panic!("a third connection must be refused, got {other:?}"),
    }
    // The connections inside the limit are served as ever.
    replies.acks_through(2 * RECORDS_PER_FRAME).await;
    // Once one closes and the server has noticed, a new one is let in and served.
    first.close(0u32.into(), b"done");
    let third = connect_once_admitted(&core).await;
    let (_third, mut replies) = ship_on(third, good_frames(4), true).await;
    replies.acks_through(4 * RECORDS_PER_FRAME).await;
    assert_eq!(replies.next().await, Reply::End);
    assert_stored_exactly(&core.log, 4 * RECORDS_PER_FRAME);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_of_an_edge_log_closes_the_older_one() {
    let core = start_core_with(2);
    let (old, mut replies) = ship(&core, good_frames(2), false).await;
    replies.acks_through(2 * RECORDS_PER_FRAME).await;

    // The edge lost its link and reconnected before the core noticed: its new connection
    // re-sends what it has not seen acked, and the old one is closed at once.
    let (new, mut replies) = ship(&core, good_frames(4), false).await;
    replies.acks_through(4 * RECORDS_PER_FRAME).await;
    match tokio::time::timeout(DEADLINE, old.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(silt_wire::CLOSE_SUPERSEDED)
            );
        }
        other => panic!("the old connection must be closed as superseded, got {other:?}"),
    }
    assert_stored_exactly(&core.log, 4 * RECORDS_PER_FRAME);

    // It no longer counts against uplink.max_connections (2 here), long before the idle
    // timeout would have ended it.
    let other = connect_once_admitted(&core).await;

    // Streams of a log without an id (a version 1 edge) take nothing over: copies of such an
    // edge would close each other without end.
    let (other, mut replies) = ship_after(other, hello_of(1, ""), good_frames(1), false).await;
    replies.acks_through(RECORDS_PER_FRAME).await;
    new.close(0u32.into(), b"done");
    let second = connect_once_admitted(&core).await;
    let (_second, mut replies) = ship_after(second, hello_of(1, ""), good_frames(2), false).await;
    replies.acks_through(2 * RECORDS_PER_FRAME).await;
    assert!(
        other.close_reason().is_none(),
        "a version 1 edge's older connection stays open"
    );
}
