//! The MQTT broker's IO half: listeners, connections, sessions, delivery.
//!
//! The broker owns no log: every PUBLISH it accepts goes to an [`IngestPort`] that the node
//! implements over its log, and the broker acknowledges QoS 1/2 only once the port says the
//! record is durable.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use silt_log::batch::Record;

use super::route::RouteTable;

/// Why the log refused a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The data directory's byte budget is full under the `reject` policy, or the filesystem
    /// is nearly full: answered with 0x97 (quota exceeded) in 5.0 and no PUBACK in 3.1.1.
    #[error("the disk budget is full: {0}")]
    QuotaExceeded(String),
    /// The log is closing.
    #[error("the log is shutting down")]
    ShuttingDown,
    /// Anything else the log reported (an IO error, say): answered with 0x80.
    #[error("the log failed: {0}")]
    Failed(String),
}

/// One record for the log, from one PUBLISH.
#[derive(Debug)]
pub struct IngestRequest {
    /// The log topic the route chose.
    pub log_topic: std::sync::Arc<str>,
    /// The key the route rendered; the port picks the partition from it (Kafka's murmur2).
    pub key: Bytes,
    /// The record: key, value, timestamp and the `mqtt.*` headers.
    pub record: Record,
}

/// Resolves once every record of a submission is durable, or with the first refusal.
pub type IngestReceipt = tokio::sync::oneshot::Receiver<Result<(), IngestError>>;

/// Where a record submitted after the port answered lands: a partition of its log topic, at
/// or above `offset` (the partition's end when asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPosition {
    pub partition: u32,
    pub offset: u64,
}

/// A boxed future, as the port returns it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the broker needs from the log. The node implements it.
pub trait IngestPort: Send + Sync + 'static {
    /// Queues records for the log, keeping their order per partition, and returns one receipt
    /// that resolves once all of them are durable (fsync'd under the durable policy), or with
    /// an error if any was refused. A connection submits every publish of one read together,
    /// so a burst costs one queue operation and one wake-up, not one per message.
    ///
    /// The future itself waits while the log's queue is full, which is how a publisher
    /// faster than the disk is slowed down; it fails at once when the records can never be
    /// taken (for example the log is closing, or a record is larger than a batch).
    fn submit(
        &self,
        requests: Vec<IngestRequest>,
    ) -> BoxFuture<'_, Result<IngestReceipt, IngestError>>;

    /// The partition a record with `key` goes to in `log_topic` (creating the topic on first
    /// use, as `submit` would), and its end offset now: a record submitted after this
    /// answers lands there at or above that offset. The broker journals it before a QoS 2
    /// append so that, after a crash, [`IngestPort::find_header`] needs to scan only from
    /// there.
    fn position<'a>(
        &'a self,
        log_topic: &'a str,
        key: &'a [u8],
    ) -> BoxFuture<'a, Result<LogPosition, IngestError>>;

    /// Whether `partition` of `log_topic` holds a durable record at or above `from_offset`
    /// with a header `name` whose value is `value`. Blocking: the broker calls it while it
    /// opens, before it serves. A topic or partition that does not exist holds nothing.
    fn find_header(
        &self,
        log_topic: &str,
        from: &LogPosition,
        name: &str,
        value: &[u8],
    ) -> Result<bool, IngestError>;
}

/// Limits that bound every buffer and queue of the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest packet accepted, fixed header included (5.0 Maximum Packet Size).
    pub max_packet_bytes: u32,
    /// QoS 1/2 publishes a client may have unacknowledged (5.0 Receive Maximum we announce;
    /// also enforced on 3.1.1 clients).
    pub receive_maximum: u16,
    /// QoS 1/2 messages in flight to one client, whatever its own Receive Maximum says.
    pub max_inflight_out: u16,
    /// Messages queued for one session (online or offline) beyond its in-flight window.
    pub max_queued_messages: usize,
    /// Payload bytes queued for one session.
    pub max_queued_bytes: usize,
    /// Connections open at once; further ones are refused at CONNECT (0x97 / 0x03).
    pub max_connections: usize,
    /// New connections accepted per second (a token bucket with this rate and burst).
    pub connect_rate_per_sec: u32,
    /// Time a new connection has to send its CONNECT.
    pub connect_timeout: Duration,
    /// Largest keep-alive granted; a client asking for more (or 0) gets this as 5.0 Server
    /// Keep Alive. 0 means no cap.
    pub max_keep_alive_secs: u16,
    /// Longest session expiry granted (3.1.1 persistent sessions get this).
    pub max_session_expiry_secs: u32,
    /// Topic aliases a 5.0 client may use (Topic Alias Maximum we announce).
    pub topic_alias_maximum: u16,
    /// Subscriptions one client may hold.
    pub max_subscriptions_per_client: usize,
    /// Retained messages the broker keeps.
    pub max_retained_messages: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_bytes: 1024 * 1024,
            receive_maximum: 128,
            max_inflight_out: 64,
            max_queued_messages: 10_000,
            max_queued_bytes: 16 * 1024 * 1024,
            max_connections: 10_000,
            connect_rate_per_sec: 1_000,
            connect_timeout: Duration::from_secs(10),
            max_keep_alive_secs: 0,
            max_session_expiry_secs: 7 * 24 * 3600,
            topic_alias_maximum: 64,
            max_subscriptions_per_client: 1_024,
            max_retained_messages: 100_000,
        }
    }
}

/// Everything the broker is configured with.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub limits: Limits,
    /// Accept CONNECTs without a user name (and without a client certificate).
    pub allow_anonymous: bool,
    /// Users and password hashes (mosquitto_passwd format); `None` means no passwords.
    pub password_file: Option<PathBuf>,
    /// Per-topic access rules; `None` means every authenticated client may do anything.
    pub acl_file: Option<PathBuf>,
    /// Where sessions and retained messages are kept (a directory the broker owns).
    pub state_dir: PathBuf,
    /// Ingest routes from MQTT topics to log topics and keys.
    pub routes: RouteTable,
}

mod broker;
mod connection;
mod encode;
mod packet;
mod persist;
mod session;
pub mod tls;
pub use broker::{Broker, BrokerError};
pub use tls::{ClientAuth, TlsError, peer_common_name, server_config};

/// Locks a mutex, recovering the data from a panicked holder: broker state stays usable
/// (every critical section leaves it consistent between its statements' effects).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Resolves once `shutdown` says true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
