//! The Kafka listener: accepts connections and answers each one's requests in order.
//!
//! A connection reads size-prefixed frames (at most `max_request_bytes` each) and handles one
//! request at a time, as Kafka does (it mutes a connection until its response is sent), so
//! pipelined requests are answered in the order they came. Requests it cannot parse close the
//! connection, as in Kafka; an api or version it does not implement gets UNSUPPORTED_VERSION.
//!
//! Memory is bounded across connections too. At most `max_connections` are served; one more
//! is closed on accept. A request frame larger than one read chunk takes its size from a
//! listener-wide pool of `queued_max_request_bytes` (Kafka's `queued.max.request.bytes`)
//! before its body is read, and gives it back once it is answered; while the pool is spent,
//! the connection reads nothing more and TCP pushes back on its client. So a crowd of clients
//! each claiming a large request cannot make the node hold more than the pool, plus a read
//! buffer (about one 64 KiB chunk) per connection.

use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use super::fetch_response::Piece;
use super::frame::{self, FrameError};
use super::handlers::{self, Context};
use super::metrics as kafka_metrics;
use super::port::KafkaBroker;
use super::versions;

/// Limits of the Kafka listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaLimits {
    /// Largest request frame accepted; a larger one closes the connection.
    pub max_request_bytes: u32,
    /// Most connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Most bytes of request frames held at once across all connections, as Kafka's
    /// `queued.max.request.bytes`; frames of up to one read chunk (64 KiB) do not count.
    /// At least `max_request_bytes`, so any frame the listener accepts can be admitted.
    pub queued_max_request_bytes: usize,
    /// How long a connection may move nothing before it is closed, as Kafka's
    /// `connections.max.idle.ms`: sending nothing while the listener waits to read from it,
    /// between requests or inside one, or reading none of a response the listener is
    /// writing. A client that starts a large request and stops cannot keep its share of the
    /// request memory, nor one that stops reading keep its responses.
    pub idle_timeout: Duration,
    /// Longest a Fetch may wait for data (caps the client's `max_wait_ms`).
    pub fetch_wait_max: Duration,
    /// Most record bytes in one Fetch response (caps the client's `max_bytes`), as Kafka's
    /// `fetch.max.bytes`, so a client cannot make the broker buffer gigabytes.
    pub fetch_bytes_max: usize,
}

impl Default for KafkaLimits {
    fn default() -> Self {
        KafkaLimits {
            max_request_bytes: 100 << 20,
            max_connections: 4096,
            queued_max_request_bytes: 512 << 20,
            idle_timeout: Duration::from_secs(600),
            fetch_wait_max: Duration::from_secs(30),
            fetch_bytes_max: 55 << 20,
        }
    }
}

/// Fetch's read buffer is freed after a response that used under a quarter of it, when it
/// holds more than this.
const RECORDS_KEPT_BYTES: usize = 1 << 20;
/// Most memory reserved ahead for a frame from its size prefix alone.
const FRAME_RESERVE_MAX_BYTES: usize = 16 << 20;
/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Pause after a failed accept (out of file descriptors), so it is not a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The listener-wide pool request frames larger than one read chunk take their size from.
#[derive(Debug, Clone)]
struct RequestMemory {
    pool: Arc<Semaphore>,
    /// The pool's size: the most one frame takes, so a frame of the largest size (its size
    /// prefix included) is admitted even when the pool is exactly `max_request_bytes`.
    total: usize,
}

/// A frame's share of [`RequestMemory`], given back when dropped.
#[derive(Debug)]
struct Admitted {
    /// `None` for a frame of up to one read chunk, which needs no share.
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(permit) = &self.permit {
            kafka_metrics::request_memory_released(permit.num_permits());
        }
    }
}

impl RequestMemory {
    fn new(bytes: usize) -> RequestMemory {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS);
        RequestMemory {
            pool: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The share of a frame of `frame_len` bytes (size prefix included), waiting while the
    /// pool is spent; `None` if the listener stops first.
    async fn admit(
        &self,
        frame_len: usize,
        stopping: &mut watch::Receiver<bool>,
    ) -> Option<Admitted> {
        if frame_len <= READ_CHUNK_BYTES {
            return Some(Admitted { permit: None });
        }
        let wanted = u32::try_from(frame_len.min(self.total)).unwrap_or(u32::MAX);
        let permit = match self.pool.clone().try_acquire_many_owned(wanted) {
            Ok(permit) => permit,
            Err(_) => {
                kafka_metrics::request_memory_wait();
                tokio::select! {
                    permit = self.pool.clone().acquire_many_owned(wanted) => permit.ok()?,
                    _ = stopping.changed() => return None,
                }
            }
        };
        kafka_metrics::request_memory_taken(permit.num_permits());
        Some(Admitted {
            permit: Some(permit),
        })
    }
}

/// Serves `listener` until `shutdown` completes, then drops every connection.
pub async fn serve<B: KafkaBroker>(
    listener: TcpListener,
    broker: Arc<B>,
    limits: KafkaLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    let (stopping, stopping_receiver) = watch::channel(false);
    let memory = RequestMemory::new(limits.queued_max_request_bytes);
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Ended connections leave the count before the limit is checked.
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= limits.max_connections {
                        refused += 1;
                        kafka_metrics::connection_refused();
                        // The 1st, 2nd, 4th, 8th... refusal: a crowd of clients is seen
                        // without a line per connection.
                        if refused.is_power_of_two() {
                            tracing::warn!(
                                %peer,
                                max_connections = limits.max_connections,
                                refused,
                                "kafka connection closed: kafka.max_connections are open"
                            );
                        }
                        continue;
                    }
                    let broker = broker.clone();
                    let stopping = stopping_receiver.clone();
                    let memory = memory.clone();
                    connections.spawn(async move {
                        let _ = stream.set_nodelay(true);
                        if let Err(error) = serve_connection(stream, peer, broker, limits, &memory, stopping).await {
                            tracing::debug!(%peer, %error, "kafka connection closed");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "kafka listener cannot accept");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    let _ = stopping.send(true);
    connections.shutdown().await;
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("cannot parse {api:?} v{version} request: {reason}")]
    Malformed {
        api: i16,
        version: i16,
        reason: String,
    },
}

/// A response ready to send: encoded bytes in `head`, and for a Fetch, the pieces that
/// interleave them with record ranges of `records`.
#[derive(Debug, Default)]
struct Outgoing {
    head: BytesMut,
    /// Empty unless the response is a Fetch, whose pieces then cover all of `head`.
    pieces: Vec<Piece>,
    /// Fetch's read buffer: kept across requests and never shrunk below what recent
    /// responses used, so reading into it costs no zeroing or page faults.
    records: Vec<u8>,
}

impl Outgoing {
    fn clear(&mut self) {
        self.head.clear();
        self.pieces.clear();
    }

    /// Writes the response. Returns false, with part of it unsent, when the client read
    /// none of it for `idle`: a client that stops reading must not hold its responses (up to
    /// `fetch_bytes_max` each) for as long as it stays connected.
    async fn write_to(&mut self, stream: &mut TcpStream, idle: Duration) -> std::io::Result<bool> {
        let mut slices: Vec<IoSlice<'_>> = if self.pieces.is_empty() {
            vec![IoSlice::new(&self.head)]
        } else {
            self.pieces
                .iter()
                .map(|piece| match piece {
                    Piece::Head(range) => IoSlice::new(&self.head[range.clone()]),
                    Piece::Records(range) => IoSlice::new(&self.records[range.clone()]),
                    Piece::Shared(bytes) => IoSlice::new(bytes),
                })
                .collect()
        };
        slices.retain(|slice| !slice.is_empty());
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let Ok(written) = tokio::time::timeout(idle, stream.write_vectored(slices)).await
            else {
                return Ok(false);
            };
            let written = written?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, written);
        }
        Ok(true)
    }

    /// Frees the read buffer when the last Fetch used under a quarter of it, so an idle or
    /// small consumer does not hold the memory a large fetch once needed.
    fn trim(&mut self) {
        if self.pieces.is_empty() {
            return; // Not a Fetch.
        }
        let used = self
            .pieces
            .iter()
            .filter_map(|piece| match piece {
                Piece::Records(range) => Some(range.end),
                Piece::Head(_) | Piece::Shared(_) => None,
            })
            .max()
            .unwrap_or(0);
        if self.records.len() > RECORDS_KEPT_BYTES && used < self.records.len() / 4 {
            self.records.truncate(used);
            self.records.shrink_to_fit();
        }
    }
}

async fn serve_connection<B: KafkaBroker>(
    mut stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<B>,
    limits: KafkaLimits,
    memory: &RequestMemory,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut out = Outgoing::default();
    // The share of the frame being read, taken before its body was.
    let mut admitted: Option<Admitted> = None;
    loop {
        while let Some(len) = frame::frame_len(&buf, limits.max_request_bytes)? {
            // A frame that came whole in one read takes its share now.
            let share = match admitted.take() {
                Some(share) => share,
                None => match memory.admit(len, &mut stopping).await {
                    Some(share) => share,
                    None => return Ok(()),
                },
            };
            let mut request = buf.split_to(len);
            if len > READ_CHUNK_BYTES {
                // A large frame (a Produce) gets its memory to itself, so the broker can
                // stamp its record set in place (`handlers::owned_records`) instead of
                // copying it: what follows it moves to a buffer of its own.
                let mut rest = BytesMut::with_capacity(READ_CHUNK_BYTES.max(buf.len()));
                rest.extend_from_slice(&buf);
                buf = rest;
            }
            request.advance(frame::SIZE_PREFIX_BYTES);
            out.clear();
            let context = Context {
                peer,
                limits,
                stopping: stopping.clone(),
            };
            let answered = handle_request(&*broker, &context, request, &mut out).await?;
            // The request's memory is gone once it is handled (a Produce's records are in
            // the log); the response's is the connection's own.
            drop(share);
            if answered {
                if !out.write_to(&mut stream, limits.idle_timeout).await? {
                    kafka_metrics::idle_connection_closed();
                    tracing::debug!(
                        %peer,
                        idle = ?limits.idle_timeout,
                        "kafka connection closed: idle, its response unread"
                    );
                    return Ok(());
                }
                out.trim();
            }
        }
        // A large frame's share is taken before its body is read: while the pool is spent the
        // connection reads nothing, so its client is held back by TCP, not by our memory.
        if admitted.is_none()
            && let Some(pending) = frame::pending_frame_len(&buf)
        {
            match memory.admit(pending, &mut stopping).await {
                Some(share) => admitted = Some(share),
                None => return Ok(()),
            }
        }
        // Room for the rest of a frame whose size is known, so a large request is read into
        // one allocation instead of one that grows (and copies) as it arrives. Bounded, so a
        // size prefix alone cannot make the connection reserve `max_request_bytes`.
        let pending = frame::pending_frame_len(&buf)
            .unwrap_or(0)
            .min(FRAME_RESERVE_MAX_BYTES);
        buf.reserve(READ_CHUNK_BYTES.max(pending.saturating_sub(buf.len())));
        tokio::select! {
            read = stream.read_buf(&mut buf) => {
                if read? == 0 {
                    return Ok(());
                }
            }
            _ = stopping.changed() => return Ok(()),
            () = tokio::time::sleep(limits.idle_timeout) => {
                kafka_metrics::idle_connection_closed();
                tracing::debug!(%peer, idle = ?limits.idle_timeout, "kafka connection closed: idle");
                return Ok(());
            }
        }
    }
}

/// Handles one request (the frame without its size prefix), putting the framed response in
/// `outgoing`. Returns false when there is nothing to send (Produce with acks=0).
async fn handle_request<B: KafkaBroker>(
    broker: &B,
    context: &Context,
    mut request: BytesMut,
    outgoing: &mut Outgoing,
) -> Result<bool, ConnectionError> {
    let out = &mut outgoing.head;
    let prefix = frame::header_prefix(&request).expect("frame_len guarantees a header prefix");
    let malformed = |reason: String| ConnectionError::Malformed {
        api: prefix.api_key,
        version: prefix.api_version,
        reason,
    };
    let Ok(api) = ApiKey::try_from(prefix.api_key) else {
        kafka_metrics::request("unknown", true);
        tracing::debug!(api_key = prefix.api_key, "unknown kafka api key");
        write_error_response(prefix.correlation_id, out);
        return Ok(true);
    };
    let Some(range) = versions::supported(api) else {
        kafka_metrics::request(api_name(api), true);
        write_error_response(prefix.correlation_id, out);
        return Ok(true);
    };
    if prefix.api_version < range.min || prefix.api_version > range.max {
        kafka_metrics::request(api_name(api), true);
        if api == ApiKey::ApiVersions {
            // The client cannot know our header format yet: answer at v0, with our versions,
            // so it can pick one (KIP-511).
            let response = versions::api_versions_response(35);
            write_response(prefix.correlation_id, 0, 0, &response, out)
                .map_err(|error| malformed(error.to_string()))?;
        } else {
            write_error_response(prefix.correlation_id, out);
        }
        return Ok(true);
    }
    let header_version = api.request_header_version(prefix.api_version);
    let header = RequestHeader::decode(&mut request, header_version)
        .map_err(|error| malformed(error.to_string()))?;
    let version = prefix.api_version;
    let response_header_version = api.response_header_version(version);
    let correlation_id = header.correlation_id;
    let client_id = header
        .client_id
        .as_ref()
        .map(|id| id.as_str().to_string())
        .unwrap_or_default();
    // Its strings are views of the frame; see `handlers::owned_records`.
    drop(header);
    kafka_metrics::request(api_name(api), false);

    macro_rules! answer {
        ($request:ty, $handler:expr) => {{
            let decoded = <$request>::decode(&mut request, version)
                .map_err(|error| malformed(error.to_string()))?;
            let response = $handler(decoded).await;
            write_response(
                correlation_id,
                response_header_version,
                version,
                &response,
                out,
            )
            .map_err(malformed)?;
            Ok(true)
        }};
    }
    use kafka_protocol::messages::*;
    match api {
        ApiKey::ApiVersions => answer!(ApiVersionsRequest, |_request| async {
            versions::api_versions_response(0)
        }),
        ApiKey::Metadata => answer!(MetadataRequest, |request| handlers::metadata(
            broker, version, request
        )),
        ApiKey::Produce => {
            let decoded = ProduceRequest::decode(&mut request, version)
                .map_err(|error| malformed(error.to_string()))?;
            drop(request);
            let acks = decoded.acks;
            let response = handlers::produce(broker, decoded).await;
            if acks == 0 {
                return Ok(false);
            }
            write_response(
                correlation_id,
                response_header_version,
                version,
                &response,
                out,
            )
            .map_err(|error| malformed(error.to_string()))?;
            Ok(true)
        }
        ApiKey::Fetch => {
            let decoded = FetchRequest::decode(&mut request, version)
                .map_err(|error| malformed(error.to_string()))?;
            let reply = handlers::fetch(broker, context, decoded, &mut outgoing.records).await;
            super::fetch_response::encode(
                correlation_id,
                version,
                &reply,
                &mut outgoing.head,
                &mut outgoing.pieces,
            );
            Ok(true)
        }
        ApiKey::ListOffsets => answer!(ListOffsetsRequest, |request| handlers::list_offsets(
            broker, request
        )),
        ApiKey::CreateTopics => answer!(CreateTopicsRequest, |request| handlers::create_topics(
            broker, request
        )),
        ApiKey::DeleteTopics => answer!(DeleteTopicsRequest, |request| handlers::delete_topics(
            broker, request
        )),
        ApiKey::DescribeConfigs => answer!(DescribeConfigsRequest, |request| async {
            handlers::describe_configs(broker, request)
        }),
        ApiKey::AlterConfigs => answer!(AlterConfigsRequest, |request| handlers::alter_configs(
            broker, request
        )),
        ApiKey::IncrementalAlterConfigs => {
            answer!(IncrementalAlterConfigsRequest, |request| {
                handlers::incremental_alter_configs(broker, request)
            })
        }
        ApiKey::InitProducerId => answer!(InitProducerIdRequest, |request| {
            handlers::init_producer_id(broker, request)
        }),
        ApiKey::FindCoordinator => answer!(FindCoordinatorRequest, |request| async {
            handlers::find_coordinator(broker, version, request)
        }),
        ApiKey::JoinGroup => answer!(JoinGroupRequest, |request| handlers::join_group(
            broker, context, &client_id, version, request
        )),
        ApiKey::SyncGroup => answer!(SyncGroupRequest, |request| handlers::sync_group(
            broker, request
        )),
        ApiKey::Heartbeat => answer!(HeartbeatRequest, |request| async {
            handlers::heartbeat(broker, request)
        }),
        ApiKey::LeaveGroup => answer!(LeaveGroupRequest, |request| async {
            handlers::leave_group(broker, version, request)
        }),
        ApiKey::OffsetCommit => answer!(OffsetCommitRequest, |request| handlers::offset_commit(
            broker, request
        )),
        ApiKey::OffsetFetch => answer!(OffsetFetchRequest, |request| async {
            handlers::offset_fetch(broker, request)
        }),
        ApiKey::ListGroups => answer!(ListGroupsRequest, |request| async {
            handlers::list_groups(broker, request)
        }),
        ApiKey::DescribeGroups => answer!(DescribeGroupsRequest, |request| async {
            handlers::describe_groups(broker, request)
        }),
        _ => {
            write_error_response(correlation_id, out);
            Ok(true)
        }
    }
}

/// Encodes a framed response: size, header, body.
fn write_response<M: Encodable>(
    correlation_id: i32,
    header_version: i16,
    version: i16,
    body: &M,
    out: &mut BytesMut,
) -> Result<(), String> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(out, header_version)
        .map_err(|error| error.to_string())?;
    body.encode(out, version)
        .map_err(|error| error.to_string())?;
    let size = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&size.to_be_bytes());
    Ok(())
}

/// A response to a request this gateway does not implement: the correlation id and
/// UNSUPPORTED_VERSION, which starts every v0 error body clients look for.
fn write_error_response(correlation_id: i32, out: &mut BytesMut) {
    out.extend_from_slice(&6i32.to_be_bytes());
    out.extend_from_slice(&correlation_id.to_be_bytes());
    out.extend_from_slice(&35i16.to_be_bytes());
}

/// The api's name for metric labels.
pub(crate) fn api_name(api: ApiKey) -> &'static str {
    versions::name(api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_memory_admits_the_largest_frame_and_makes_the_next_one_wait() {
        let memory = RequestMemory::new(100_000);
        let (_stop, mut stopping) = watch::channel(false);
        // A frame of the pool's size plus its size prefix still gets in: it takes the pool.
        let largest = memory.admit(100_004, &mut stopping).await.unwrap();
        // Small frames need no share.
        let small = memory.admit(READ_CHUNK_BYTES, &mut stopping).await.unwrap();
        assert!(small.permit.is_none());
        // A large one waits until the pool is given back.
        let mut waiting = Box::pin(async {
            let mut stopping = stopping.clone();
            memory.admit(70_000, &mut stopping).await
        });
        assert!(futures_poll_once(&mut waiting).await.is_none());
        drop(largest);
        let admitted = waiting.await.unwrap();
        assert_eq!(
            admitted.permit.as_ref().map(|p| p.num_permits()),
            Some(70_000)
        );
    }

    #[tokio::test]
    async fn a_wait_for_request_memory_ends_when_the_listener_stops() {
        let memory = RequestMemory::new(100_000);
        let (stop, mut stopping) = watch::channel(false);
        let _all = memory.admit(100_000, &mut stopping).await.unwrap();
        let waiting = tokio::spawn({
            let memory = memory.clone();
            let mut stopping = stopping.clone();
            async move { memory.admit(70_000, &mut stopping).await.is_none() }
        });
        stop.send(true).unwrap();
        assert!(waiting.await.unwrap(), "no share once stopping");
    }

    /// Polls `future` once: its output if it is ready, `None` if it is pending.
    async fn futures_poll_once<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *future).poll(cx) {
                std::task::Poll::Ready(output) => Some(output),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
