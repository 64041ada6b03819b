//! The uplink client: ships every partition of the local log to the core over QUIC.
//!
//! One connection to the core; one bidirectional stream per (topic, partition), opened for
//! every partition the log has (new ones are noticed within [`DISCOVERY_INTERVAL`]). A
//! stream sends `Hello`, then `Data` frames read from the partition's cursor onwards, at
//! most `inflight_bytes` of batches unacknowledged at a time; each `Ack` moves the cursor
//! and frees its bytes (the cursor's file follows within a second, see `cursor`). When the
//! log has nothing new, the sender sleeps on the partition's high watermark instead of
//! polling.
//!
//! Any failure drops the whole connection; the client reconnects with exponential backoff
//! and jitter, capped at [`BACKOFF_MAX`] so that it is back within 5 s of the link
//! returning, and resumes from the cursors. QUIC's idle timeout (keep-alives every 2 s)
//! notices a dead path within 10 s. A failure is a WARN (`uplink down`).
//!
//! A core that stops in order acks what is durable, ends its streams and closes the
//! connection with [`silt_wire::CLOSE_SHUTTING_DOWN`]: that is no failure. The client logs it
//! at INFO (`core is shutting down; reconnecting`). For the next [`RESTART_QUIET`] it expects
//! the core back soon: attempts follow each other after at most [`BACKOFF_MIN`] and one the
//! core does not answer is cut short (see [`restart_answer_timeout`]), so the restarted core is
//! found within about a tenth of a second of listening, and their failures are INFO, logged
//! at the 1st, 2nd, 4th, 8th... attempt.
//!
//! When the disk budget drops segments nobody shipped, the sender finds its cursor below the
//! log start, counts the records lost (`silt_uplink_lost_records_total`) and goes on from
//! the log start.
//!
//! # Layout
//! - `cursor`: the persisted per-partition cursors, also read by retention.

pub(crate) mod cursor;
pub(crate) mod host;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use rand::Rng as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use silt_log::{LogError, LogManager, PartitionLog};
use silt_wire::Frame;
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, watch};

use crate::config::{Compression, UplinkConfig};
pub(crate) use cursor::Cursors;

/// First reconnect delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay: keeps reconnection within 5 s of the link returning.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Must match the core's: a dead path is given up after this long without a packet.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a connection attempt (resolution and handshake) may take. Short, because an
/// attempt made while the link was down only succeeds if a handshake retransmission
/// happens after the link returns (they back off from about three times the initial RTT:
/// 1, 2, 4 s at QUIC's default 333 ms); a new attempt after at most [`BACKOFF_MAX`] keeps the
/// reconnection within 5 s of the link returning.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bounds of a reconnection's initial RTT, which is the last connection's smoothed RTT (RFC
/// 9002, 6.2.2): its handshake retransmissions then start as soon as that path warrants, so
/// a core that restarts is found within about its own start time, not at the next of the
/// 1, 2, 4 s retransmissions. Never below 10 ms (30 ms between the first retransmissions),
/// never above QUIC's default, so no attempt probes less often than a first connection.
const INITIAL_RTT_MIN: Duration = Duration::from_millis(10);
const INITIAL_RTT_MAX: Duration = Duration::from_millis(333);
/// How often the client looks for new topics and partitions, and refreshes lag gauges.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a sender sleeps on the high watermark before looking again.
const WAIT_FOR_DATA: Duration = Duration::from_secs(1);
/// Bytes of `Ack` frames buffered at most: a handful of 13-byte frames.
const ACK_BUFFER_BYTES: usize = 4096;
/// How long after the core ended a stream the client waits for its connection close, which
/// says why (a core shutting down ends its streams just before it closes).
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// After the core said it is shutting down, failed attempts to reach it are expected (it is
/// restarting) and logged at INFO for this long; past it they are WARN again.
const RESTART_QUIET: Duration = Duration::from_secs(60);
/// A connection attempt to a restarting core waits this many initial RTTs for the core's
/// first answer (its Initial is re-sent at 3, 9 and 21 of them), within
/// [`RESTART_ANSWER_MIN`] and [`CONNECT_TIMEOUT`]; once answered, the handshake has the rest
/// of [`CONNECT_TIMEOUT`].
const RESTART_ANSWER_RTTS: u32 = 20;
/// Shortest wait for a restarting core's answer: 250 ms, four Initials at the 10 ms RTT
/// floor, and room for an RTT up to 25 times the last one measured.
const RESTART_ANSWER_MIN: Duration = Duration::from_millis(250);

/// How one connection attempt ended.
#[derive(Debug)]
enum Ended {
    /// The core closed the connection because it is shutting down, after acking what is
    /// durable.
    CoreShuttingDown,
    /// The connection came up, then failed.
    Lost(anyhow::Error),
    /// No connection came up (refused, timed out, TLS).
    Failed(anyhow::Error),
    /// The core cannot take this edge log's records under its id: it stores more of the log
    /// than the edge holds (the log went back), or another process ships the same log (the
    /// core closed this connection for a newer one of the log). Why, for the log line.
    LogBehind(String),
}

/// The core refused a stream because the edge's log ends below records it already stores
/// from that log (`error_code::LOG_BEHIND`).
#[derive(Debug)]
struct LogBehind(String);

impl std::fmt::Display for LogBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the core refused the stream: {}", self.0)
    }
}

impl std::error::Error for LogBehind {}

/// The core ended a stream (sent its end): it is about to close the connection.
#[derive(Debug)]
struct CoreEndedStream;

impl std::fmt::Display for CoreEndedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the core closed the stream")
    }
}

impl std::error::Error for CoreEndedStream {}

/// Gives `log` a new id and moves every partition's cursor to it, at its acknowledged
/// position or the partition's end when that is lower; returns the id. Blocking.
///
/// Every position is read before the id changes, so a crash in between leaves cursor files
/// naming the old id, which the next start reads as another log's: its partitions ship from
/// their start, twice rather than never.
fn renew_log_id(log: &LogManager, cursors: &Cursors) -> anyhow::Result<String> {
    let mut starts = Vec::new();
    for topic in log.topics() {
        for partition in 0..topic.partitions {
            let cursor = cursors.get(&topic.name, partition)?;
            let end = log.partition(&topic.name, partition)?.high_watermark();
            starts.push(((topic.name.clone(), partition), cursor.min(end)));
        }
    }
    let id = log
        .renew_id()
        .context("cannot write the log's new id to its meta.json")?;
    cursors.move_to_log(id.clone(), &starts)?;
    Ok(id)
}

/// Opens the uplink's cursors for `log`, before anything is appended to it, and gives the
/// log a new id (see [`renew_log_id`]) when it went back or reached another device. Blocking.
///
/// - A partition whose acknowledged cursor is past its end went back since the core
///   acknowledged it: the data directory was restored from a backup (its uplink state
///   directory, beside it, was not), or the disk lost writes it had confirmed. The records it
///   takes from now on get offsets the core already has from this log, and the cursor would
///   skip them. Such a partition ships from its end, as everything below it reached the
///   core before.
/// - A log last used on another device (`host`, this device's fingerprint, against the one
///   `meta.json` keeps): a card image flashed to many boards after the edge had run on it,
///   or a disk moved to a new board. Copies running at once would ship one log's offsets
///   with different records. A log that has no host yet gets this one.
pub(crate) fn open_cursors(
    state_dir: &std::path::Path,
    log: &LogManager,
    host: Option<&str>,
) -> anyhow::Result<Cursors> {
    let cursors = Cursors::new(state_dir.to_path_buf(), log.id());
    let mut behind = Vec::new();
    for topic in log.topics() {
        for partition in 0..topic.partitions {
            // An unreadable cursor fails its stream later, with the same error.
            let Ok(cursor) = cursors.get(&topic.name, partition) else {
                continue;
            };
            let end = log.partition(&topic.name, partition)?.high_watermark();
            if cursor > end {
                behind.push(format!(
                    "{}/{partition}: cursor {cursor}, end {end}",
                    topic.name
                ));
            }
        }
    }
    let recorded = log.host();
    let moved = host.is_some() && recorded.is_some() && recorded.as_deref() != host;
    if !behind.is_empty() {
        tracing::warn!(
            partitions = %behind.join(", "),
            "the edge log ends below what the core acknowledged: it went back (restored from a \
             backup, or its disk lost writes); giving it a new id so that its new records are \
             shipped rather than taken for ones the core has"
        );
    }
    if moved {
        tracing::warn!(
            data_dir = %log.config().data_dir.display(),
            "the edge log was last used on another device (a copied card or a moved disk): \
             giving it a new id, so that its records from here on are not taken for the \
             other device's"
        );
    }
    if moved || !behind.is_empty() {
        let id = renew_log_id(log, &cursors).context("cannot give the edge log a new id")?;
        tracing::info!(log = %id, "edge log has a new id");
    }
    if let Some(host) = host
        && recorded.as_deref() != Some(host)
    {
        log.set_host(host)
            .context("cannot record this device in the log's meta.json")?;
    }
    Ok(cursors)
}

/// A running uplink client.
#[derive(Debug)]
pub(crate) struct Uplink {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    pub(crate) cursors: Arc<Cursors>,
}

impl Uplink {
    /// Starts shipping `log` to the core as edge `edge_id`, from `cursors` ([`open_cursors`],
    /// before anything was appended). Fails only on configuration that can never work
    /// (unreadable CA or client certificate).
    pub(crate) fn start(
        config: &UplinkConfig,
        edge_id: &str,
        log: Arc<LogManager>,
        cursors: Cursors,
    ) -> anyhow::Result<Uplink> {
        let client = client_config(config)?;
        let cursors = Arc::new(cursors);
        let (stop, stopped) = watch::channel(false);
        let shipper = Shipper {
            config: config.clone(),
            edge_id: edge_id.to_string(),
            log,
            cursors: cursors.clone(),
            client,
            encoders: Arc::new(Encoders::new(config.compression)),
            last_rtt: std::sync::Mutex::new(None),
        };
        let shipper = Arc::new(shipper);
        let lag = tokio::spawn(shipper.clone().report_lag(stopped.clone()));
        let task = tokio::spawn(async move {
            shipper.run(stopped).await;
            let _ = lag.await;
        });
        Ok(Uplink {
            stop,
            task,
            cursors,
        })
    }

    /// Stops shipping: acks in flight are dropped (their data is re-sent and deduplicated
    /// after the next start); the cursors of the acks received are written, so a clean
    /// restart resumes where the core's acks left off.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let cursors = self.cursors.clone();
        match tokio::task::spawn_blocking(move || cursors.persist_all()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot write the uplink cursors at stop; the next start re-sends what the core already has");
            }
            Err(error) => tracing::warn!(%error, "writing the uplink cursors at stop failed"),
        }
    }
}

/// The uplink's TLS provider: ring, with the cipher suites in [`cipher_suites`] order for a
/// CPU with or without `aes_hardware` ([`aes_hardware`] for this one).
fn crypto_provider(aes_hardware: bool) -> rustls::crypto::CryptoProvider {
    rustls::crypto::CryptoProvider {
        cipher_suites: cipher_suites(aes_hardware),
        ..rustls::crypto::ring::default_provider()
    }
}

/// The TLS 1.3 suites the edge offers, the one it prefers first (the core takes the edge's
/// order): AES-GCM where the CPU has AES and carry-less multiply instructions, and
/// ChaCha20-Poly1305 where it has not, as on the Raspberry Pi 3 and 4, whose Cortex-A53 and
/// A72 cores lack the ARMv8 crypto extensions: there AES-GCM runs in constant-time software,
/// much slower than ChaCha20 on NEON, and every shipped byte pays it (Go's TLS stack and
/// BoringSSL choose the same way). All three stay offered, and AES-128-GCM always protects
/// QUIC's Initial packets.
fn cipher_suites(aes_hardware: bool) -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    if aes_hardware {
        vec![
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_AES_128_GCM_SHA256,
        ]
    }
}

/// Whether this CPU does AES-GCM in hardware (AES rounds and the carry-less multiply GHASH
/// needs). Unknown architectures, 32-bit ARM among them, count as no.
fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn client_config(config: &UplinkConfig) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(crypto_provider(aes_hardware()));
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = read_pem(&config.ca)?;
    let mut found = false;
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.with_context(|| format!("{} is not valid PEM", config.ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("a CA certificate in {} is unusable", config.ca.display()))?;
        found = true;
    }
    if !found {
        bail!("{} holds no CA certificate", config.ca.display());
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("cannot build the uplink TLS configuration")?
        .with_root_certificates(roots);
    let mut tls = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let cert_pem = read_pem(cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{} is not valid PEM", cert_path.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read_pem(key_path)?)
                .with_context(|| format!("{} holds no usable private key", key_path.display()))?;
            builder.with_client_auth_cert(chain, key).with_context(|| {
                format!(
                    "the certificate {} does not fit the key {}",
                    cert_path.display(),
                    key_path.display()
                )
            })?
        }
    };
    tls.alpn_protocols = vec![silt_wire::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    // The transport is set per attempt ([`Shipper::connect`]).
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The client's QUIC transport: a dead path is noticed within [`IDLE_TIMEOUT`]; a connection
/// to a core already reached starts from the RTT last measured (see [`INITIAL_RTT_MIN`]).
fn transport(last_rtt: Option<Duration>) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout fits a varint"),
        ))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    if let Some(rtt) = last_rtt {
        transport.initial_rtt(initial_rtt(rtt));
    }
    transport
}

fn initial_rtt(last_rtt: Duration) -> Duration {
    last_rtt.clamp(INITIAL_RTT_MIN, INITIAL_RTT_MAX)
}

/// How long an attempt on a core that said it is restarting waits for the core's first
/// answer (its first handshake flight): [`RESTART_ANSWER_RTTS`] initial RTTs. A core not
/// listening yet never answers, and a handshake retransmission's delay doubles each time, so
/// a long attempt leaves longer and longer gaps with nothing sent; short attempts back to
/// back keep probing about every 100 ms on a LAN. A core that answered has the rest of
/// [`CONNECT_TIMEOUT`] for the handshake, however busy its start keeps it. 250 ms up to a
/// 12.5 ms RTT, the full [`CONNECT_TIMEOUT`] from 150 ms up.
fn restart_answer_timeout(last_rtt: Option<Duration>) -> Duration {
    last_rtt.map_or(CONNECT_TIMEOUT, |rtt| {
        (initial_rtt(rtt) * RESTART_ANSWER_RTTS).clamp(RESTART_ANSWER_MIN, CONNECT_TIMEOUT)
    })
}

fn read_pem(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    const PEM_FILE_BYTES_MAX: u64 = 4 << 20;
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    anyhow::ensure!(
        size <= PEM_FILE_BYTES_MAX,
        "{} is larger than {PEM_FILE_BYTES_MAX} bytes",
        path.display()
    );
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

struct Shipper {
    config: UplinkConfig,
    edge_id: String,
    log: Arc<LogManager>,
    cursors: Arc<Cursors>,
    /// TLS only: [`Shipper::connect`] gives each attempt its transport.
    client: quinn::ClientConfig,
    encoders: Arc<Encoders>,
    /// The smoothed RTT of the last connection to the core, when it ended.
    last_rtt: std::sync::Mutex<Option<Duration>>,
}

impl Shipper {
    /// Refreshes the lag gauges every [`DISCOVERY_INTERVAL`], connected or not, so an
    /// outage's growing backlog shows.
    async fn report_lag(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(DISCOVERY_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let shipper = self.clone();
                    let _ = tokio::task::spawn_blocking(move || shipper.refresh_lag()).await;
                }
                _ = stopped.changed() => return,
            }
        }
    }

    async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let shipper = self;
        let mut backoff = BACKOFF_MIN;
        let mut attempts = 0u64;
        // Until when failed attempts are the core restarting, not a failure.
        let mut quiet_until: Option<tokio::time::Instant> = None;
        let mut restart_failures = 0u64;
        let restarting = |quiet_until: Option<tokio::time::Instant>| {
            quiet_until.is_some_and(|until| tokio::time::Instant::now() < until)
        };
        loop {
            if *stopped.borrow() {
                return;
            }
            let answer_timeout = if restarting(quiet_until) {
                restart_answer_timeout(*shipper.last_rtt.lock().expect("never poisoned"))
            } else {
                CONNECT_TIMEOUT
            };
            let outcome = tokio::select! {
                outcome = shipper.clone().connect_and_ship(answer_timeout) => outcome,
                _ = stopped.changed() => return,
            };
            // A connection that worked starts the backoff over; one refused for a log that
            // went back does once the log has its new id, or an edge that cannot write it
            // would be refused ten times a second.
            if !matches!(outcome, Ended::Failed(_) | Ended::LogBehind(_)) {
                backoff = BACKOFF_MIN;
            }
            attempts += 1;
            metrics::gauge!("silt_uplink_connected").set(0.0);
            metrics::counter!("silt_uplink_reconnects_total").increment(1);
            match outcome {
                Ended::CoreShuttingDown => {
                    tracing::info!(core = %shipper.config.addr, "core is shutting down; reconnecting");
                    quiet_until = Some(tokio::time::Instant::now() + RESTART_QUIET);
                    restart_failures = 0;
                }
                Ended::Failed(error) if restarting(quiet_until) => {
                    restart_failures += 1;
                    if restart_failures.is_power_of_two() {
                        tracing::info!(
                            attempt = attempts,
                            error = format!("{error:#}"),
                            "core not back yet; reconnecting"
                        );
                    }
                }
                Ended::LogBehind(message) => {
                    quiet_until = None;
                    tracing::warn!(
                        reason = %message,
                        "the core cannot take this edge log's new records under its id: giving \
                         the log a new id and shipping it under that id from the acknowledged \
                         cursors (records between them and the log's end may reach the core \
                         twice; none is lost)"
                    );
                    let (log, cursors) = (shipper.log.clone(), shipper.cursors.clone());
                    match tokio::task::spawn_blocking(move || renew_log_id(&log, &cursors)).await {
                        Ok(Ok(id)) => {
                            tracing::info!(log = %id, "edge log has a new id");
                            backoff = BACKOFF_MIN;
                        }
                        Ok(Err(error)) => tracing::error!(
                            error = format!("{error:#}"),
                            "cannot give the edge log a new id; retrying"
                        ),
                        Err(error) => {
                            tracing::error!(%error, "giving the edge log a new id failed")
                        }
                    }
                }
                Ended::Lost(error) | Ended::Failed(error) => {
                    quiet_until = None;
                    tracing::warn!(
                        attempt = attempts,
                        error = format!("{error:#}"),
                        "uplink down"
                    );
                }
            }
            // Full jitter over the upper half, so edges that lost the same core do not come
            // back in step.
            let delay = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stopped.changed() => return,
            }
            // A restarting core is expected back: its attempts do not back off.
            backoff = if restarting(quiet_until) {
                BACKOFF_MIN
            } else {
                (backoff * 2).min(BACKOFF_MAX)
            };
        }
    }

    /// One connection's life, and how it ended. Connecting may take [`CONNECT_TIMEOUT`], and
    /// the core must answer within `answer_timeout` of it.
    async fn connect_and_ship(self: Arc<Self>, answer_timeout: Duration) -> Ended {
        let connecting = self.connect(answer_timeout);
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Ended::Failed(error),
            Err(_) => return Ended::Failed(anyhow::anyhow!("connecting to the core timed out")),
        };
        metrics::gauge!("silt_uplink_connected").set(1.0);
        tracing::info!(core = %self.config.addr, "uplink connected");
        let mut streams = Streams::default();
        let mut discovery = tokio::time::interval(DISCOVERY_INTERVAL);
        loop {
            tokio::select! {
                reason = connection.closed() => {
                    self.remember_rtt(&connection);
                    let ended = ended_by(reason);
                    if matches!(ended, Ended::CoreShuttingDown) {
                        // The streams read the last acks the core sent before it closed.
                        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
                        for (_, task) in streams.drain() {
                            let abort = task.abort_handle();
                            if tokio::time::timeout_at(deadline, task).await.is_err() {
                                abort.abort();
                            }
                        }
                    }
                    finish(streams).await;
                    return ended;
                }
                _ = discovery.tick() => {
                    for topic in self.log.topics() {
                        for partition in 0..topic.partitions {
                            let key = (topic.name.clone(), partition);
                            if let Some(task) = streams.get(&key)
                                && task.is_finished()
                            {
                                // A stream ended: the whole connection starts over.
                                let task = streams.remove(&key).expect("just seen");
                                let error = match task.await {
                                    Ok(Err(error)) => error,
                                    Ok(Ok(())) => anyhow::anyhow!("stream ended"),
                                    Err(error) => anyhow::Error::new(error),
                                };
                                let ended = stream_ended(&connection, error).await;
                                self.remember_rtt(&connection);
                                connection.close(0u32.into(), b"stream failed");
                                finish(streams).await;
                                return ended;
                            }
                            if streams.contains_key(&key) {
                                continue;
                            }
                            let Ok(log) = self.log.partition(&topic.name, partition) else {
                                continue;
                            };
                            let task = tokio::spawn(self.clone().ship_partition(
                                connection.clone(),
                                log,
                            ));
                            streams.insert(key, task);
                        }
                    }
                }
            }
        }
    }

    /// Connects to the core, which must send its first handshake flight within
    /// `answer_timeout`.
    async fn connect(&self, answer_timeout: Duration) -> anyhow::Result<quinn::Connection> {
        let addr = tokio::net::lookup_host(&self.config.addr)
            .await
            .with_context(|| format!("cannot resolve {}", self.config.addr))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.config.addr))?;
        let bind: std::net::SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        // A fresh endpoint (and UDP socket) per attempt: after a path change, the old
        // socket's binding may be what is broken.
        let endpoint = quinn::Endpoint::client(bind).context("cannot open a UDP socket")?;
        let mut client = self.client.clone();
        let last_rtt = *self.last_rtt.lock().expect("never poisoned");
        client.transport_config(Arc::new(transport(last_rtt)));
        let mut connecting = endpoint
            .connect_with(client, addr, &self.config.server_name)
            .context("cannot start connecting")?;
        // Resolves with the core's first flight: the core is there.
        match tokio::time::timeout(answer_timeout, connecting.handshake_data()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(error).with_context(|| format!("cannot connect to the core at {addr}"));
            }
            Err(_) => bail!(
                "the core at {addr} did not answer within {} ms",
                answer_timeout.as_millis()
            ),
        }
        let connection = connecting
            .await
            .with_context(|| format!("cannot connect to the core at {addr}"))?;
        Ok(connection)
    }

    fn remember_rtt(&self, connection: &quinn::Connection) {
        *self.last_rtt.lock().expect("never poisoned") = Some(connection.rtt());
    }

    /// Lag gauges per partition: records and (estimated) bytes not yet acknowledged.
    /// Blocking (may read cursor files).
    fn refresh_lag(&self) {
        for topic in self.log.topics() {
            for partition in 0..topic.partitions {
                let Ok(log) = self.log.partition(&topic.name, partition) else {
                    continue;
                };
                // Loads the cursor from disk the first time (a few bytes, once).
                let Ok(cursor) = self.cursors.get(&topic.name, partition) else {
                    continue;
                };
                let end = log.high_watermark();
                let start = log.local_start_offset().max(cursor);
                let lag_records = end.saturating_sub(start);
                let span = end.saturating_sub(log.local_start_offset()).max(1);
                let lag_bytes = log.size_bytes() as u128 * lag_records as u128 / span as u128;
                let labels = [
                    ("topic", topic.name.clone()),
                    ("partition", partition.to_string()),
                ];
                metrics::gauge!("silt_uplink_lag_records", &labels).set(lag_records as f64);
                metrics::gauge!("silt_uplink_lag_bytes", &labels).set(lag_bytes as f64);
            }
        }
    }

    /// Ships one partition on its own stream until an error.
    async fn ship_partition(
        self: Arc<Self>,
        connection: quinn::Connection,
        log: Arc<PartitionLog>,
    ) -> anyhow::Result<()> {
        let topic = log.topic().to_string();
        let partition = log.partition();
        let cursors = self.cursors.clone();
        let start = {
            let (cursors, topic) = (cursors.clone(), topic.clone());
            tokio::task::spawn_blocking(move || cursors.get(&topic, partition)).await??
        };
        let (mut send, mut recv) = connection.open_bi().await.context("cannot open a stream")?;
        let mut out = BytesMut::new();
        Frame::Hello {
            version: silt_wire::VERSION,
            edge_id: &self.edge_id,
            topic: &topic,
            partition,
            edge_log: &self.log.id().unwrap_or_default(),
        }
        .encode(&mut out);
        send.write_all(&out).await.context("cannot send Hello")?;

        let inflight_max = self.config.inflight_bytes as usize;
        let window = Arc::new(Semaphore::new(inflight_max));
        // Sent frames awaiting their ack, oldest first: (end offset, bytes held).
        let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u32)>();
        let labels = [
            ("topic", topic.clone()),
            ("partition", partition.to_string()),
        ];

        let acks = {
            let (window, cursors, topic, labels) = (
                window.clone(),
                cursors.clone(),
                topic.clone(),
                labels.clone(),
            );
            async move {
                let mut buf = BytesMut::with_capacity(ACK_BUFFER_BYTES);
                let mut pending: VecDeque<(u64, u32)> = VecDeque::new();
                // When the cursor file was last written, and when it is written next: set
                // by an ack, at most `cursor::PERSIST_INTERVAL` after the last write.
                let mut written_at: Option<tokio::time::Instant> = None;
                let mut write_due: Option<tokio::time::Instant> = None;
                loop {
                    let (end_offset, used) = loop {
                        match Frame::decode(&buf)? {
                            Some((Frame::Ack { end_offset }, used)) => break (end_offset, used),
                            Some((Frame::Error { code, message }, _)) => {
                                if code == silt_wire::error_code::LOG_BEHIND {
                                    return Err(LogBehind(message.to_string()).into());
                                }
                                bail!("the core refused the stream (code {code}): {message}")
                            }
                            Some((other, _)) => bail!("unexpected frame from the core: {other:?}"),
                            None => {}
                        }
                        buf.reserve(ACK_BUFFER_BYTES);
                        tokio::select! {
                            read = recv.read_buf(&mut buf) => {
                                if read.context("stream read failed")? == 0 {
                                    return Err(CoreEndedStream.into());
                                }
                            }
                            () = sleep_until(write_due) => {
                                persist_cursor(&cursors, &topic, partition).await?;
                                written_at = Some(tokio::time::Instant::now());
                                write_due = None;
                            }
                        }
                    };
                    let _ = buf.split_to(used);
                    // Every ack already read is folded into one cursor move: acks are
                    // cumulative.
                    let mut end_offset = end_offset;
                    while let Some((Frame::Ack { end_offset: later }, used)) = Frame::decode(&buf)?
                    {
                        end_offset = end_offset.max(later);
                        let _ = buf.split_to(used);
                    }
                    while let Ok(item) = sent_rx.try_recv() {
                        pending.push_back(item);
                    }
                    let mut acked_bytes = 0u64;
                    while let Some(&(end, bytes)) = pending.front() {
                        if end > end_offset {
                            break;
                        }
                        pending.pop_front();
                        acked_bytes += u64::from(bytes);
                        window.add_permits(bytes as usize);
                    }
                    // In memory at once; on disk at most `PERSIST_INTERVAL` later, so a
                    // stream of acks costs one file write a second, not one per ack.
                    cursors.ack(&topic, partition, end_offset);
                    write_due.get_or_insert_with(|| {
                        written_at.map_or_else(tokio::time::Instant::now, |at| {
                            at + cursor::PERSIST_INTERVAL
                        })
                    });
                    metrics::counter!("silt_uplink_acked_bytes_total", &labels)
                        .increment(acked_bytes);
                    metrics::gauge!("silt_uplink_inflight_bytes", &labels)
                        .set((inflight_max - window.available_permits()) as f64);
                }
            }
        };

        // The log is read on a blocking thread at most [`FRAMES_AHEAD`] frames ahead, and
        // its frames are compressed on up to one blocking thread per CPU, in order, so
        // reading, compressing and sending overlap and a backlog's drain is not held to one
        // core's zstd speed.
        let (read_tx, read_rx) = tokio::sync::mpsc::channel(FRAMES_AHEAD);
        let (frame_tx, mut frame_rx) = tokio::sync::mpsc::channel(self.encoders.workers);
        {
            let (log, labels) = (log.clone(), labels.clone());
            let frame_bytes = self.config.frame_bytes as usize;
            let sender_gone = frame_tx.clone();
            tokio::task::spawn_blocking(move || {
                read_loop(&log, start, frame_bytes, &labels, &read_tx, || {
                    sender_gone.is_closed()
                });
            });
        }
        tokio::spawn(self.encoders.clone().encode_loop(read_rx, frame_tx));
        let sender = async {
            loop {
                let encoding = frame_rx.recv().await.context("the log reader stopped")??;
                let frame: ShipFrame = encoding.await.context("compressing a frame failed")??;
                let permits = frame.raw_len.min(inflight_max) as u32;
                window
                    .acquire_many(permits)
                    .await
                    .expect("the window is never closed")
                    .forget();
                sent_tx
                    .send((frame.end, permits))
                    .expect("the ack reader outlives the sender");
                let wire_bytes = frame.head.len() + frame.payload.len();
                send.write_all_chunks(&mut [frame.head, frame.payload])
                    .await
                    .context("stream write failed")?;
                metrics::counter!("silt_uplink_shipped_records_total", &labels)
                    .increment(frame.end - frame.first);
                metrics::counter!("silt_uplink_shipped_bytes_total", &labels)
                    .increment(frame.raw_len as u64);
                metrics::counter!("silt_uplink_wire_bytes_total", &labels)
                    .increment(wire_bytes as u64);
            }
            #[allow(unreachable_code)]
            Ok::<(), anyhow::Error>(())
        };
        // Acks first: when the connection closes with acks still buffered (a core shutting
        // down), they are read and their cursor written before the sender's failure ends
        // the stream.
        tokio::select! {
            biased;
            result = acks => result,
            result = sender => result,
        }
    }
}

/// Writes the partition's cursor file if it is behind its acks (on a blocking thread).
async fn persist_cursor(cursors: &Arc<Cursors>, topic: &str, partition: u32) -> anyhow::Result<()> {
    let (cursors, topic) = (cursors.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || cursors.persist(&topic, partition)).await?
}

/// Completes at `deadline`, or never without one: a `select!` branch for a timer that may be
/// off.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One connection's partition streams, aborted when dropped: also when the node stops and
/// drops the connection's future mid-way.
#[derive(Default)]
struct Streams(HashMap<(String, u32), tokio::task::JoinHandle<anyhow::Result<()>>>);

impl std::ops::Deref for Streams {
    type Target = HashMap<(String, u32), tokio::task::JoinHandle<anyhow::Result<()>>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Streams {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        for task in self.0.values() {
            task.abort();
        }
    }
}

/// Aborts what is left of a connection's streams and waits for them.
async fn finish(mut streams: Streams) {
    for (_, task) in streams.0.drain() {
        task.abort();
        let _ = task.await;
    }
}

/// How a connection ended, from why it was closed.
fn ended_by(reason: quinn::ConnectionError) -> Ended {
    match &reason {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(silt_wire::CLOSE_SHUTTING_DOWN) =>
        {
            Ended::CoreShuttingDown
        }
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(silt_wire::CLOSE_SUPERSEDED) =>
        {
            Ended::LogBehind(
                "a newer connection of this edge log took over: another process ships the same \
                 log (a copied data directory)"
                    .into(),
            )
        }
        _ => Ended::Lost(anyhow::Error::new(reason)),
    }
}

/// How a connection ended, from one of its streams' `error`: the connection's close says
/// why when there is one. A core shutting down ends its streams after their last acks and
/// then closes the connection, so a stream the core ended waits (at most [`CLOSE_WAIT`]) for
/// that close.
async fn stream_ended(connection: &quinn::Connection, error: anyhow::Error) -> Ended {
    // Before the connection's close: the core closes it after refusing the stream.
    if let Some(LogBehind(message)) = error.downcast_ref::<LogBehind>() {
        return Ended::LogBehind(message.clone());
    }
    if let Some(reason) = connection.close_reason() {
        return ended_by(reason);
    }
    if error.downcast_ref::<CoreEndedStream>().is_some()
        && let Ok(reason) = tokio::time::timeout(CLOSE_WAIT, connection.closed()).await
    {
        return ended_by(reason);
    }
    Ended::Lost(error)
}

/// Frames a partition's log reader works ahead of its compression.
const FRAMES_AHEAD: usize = 2;
/// Most frames compressed at once, per edge: one per CPU, up to this many.
const ENCODERS_MAX: usize = 4;

/// Whole batches read from the log, covering offsets `first..end`.
struct ReadFrame {
    first: u64,
    end: u64,
    edge_end: u64,
    batches: Vec<u8>,
    /// Bytes of `batches` stored uncompressed.
    plain_bytes: usize,
}

/// An encoded `Data` frame ready to send: its head, then its payload, two buffers so the
/// payload (the batches as read, or zstd's output) is never copied into a frame buffer.
struct ShipFrame {
    first: u64,
    end: u64,
    raw_len: usize,
    head: bytes::Bytes,
    payload: bytes::Bytes,
}

/// Reads the partition from `next` on, frame by frame, into `frames`, until the log fails
/// (the error is passed on) or the stream is gone: `frames`' receiver, or `sent`'s (the
/// async sender's, checked too because the compressor waiting on `frames` does not notice
/// it while the log has nothing new). Blocking; returns within [`WAIT_FOR_DATA`].
fn read_loop(
    log: &PartitionLog,
    mut next: u64,
    frame_bytes: usize,
    labels: &[(&'static str, String); 2],
    frames: &tokio::sync::mpsc::Sender<anyhow::Result<ReadFrame>>,
    sender_gone: impl Fn() -> bool,
) {
    while !frames.is_closed() && !sender_gone() {
        let frame = match read_next(log, next, frame_bytes) {
            Ok(Read::Data {
                first,
                end,
                edge_end,
                batches,
                plain_bytes,
            }) => ReadFrame {
                first,
                end,
                edge_end,
                batches,
                plain_bytes,
            },
            Ok(Read::Lost { log_start }) => {
                let lost = log_start - next;
                tracing::warn!(
                    topic = log.topic(),
                    partition = log.partition(),
                    lost,
                    "records dropped by the disk budget before they were shipped"
                );
                metrics::counter!("silt_uplink_lost_records_total", labels).increment(lost);
                next = log_start;
                continue;
            }
            Ok(Read::Nothing) => {
                log.wait_for_high_watermark(next, WAIT_FOR_DATA);
                continue;
            }
            Err(error) => {
                let _ = frames.blocking_send(Err(error));
                return;
            }
        };
        next = frame.end;
        if frames.blocking_send(Ok(frame)).is_err() {
            return;
        }
    }
}

/// A frame being compressed on a blocking thread.
type Encoding = tokio::task::JoinHandle<anyhow::Result<ShipFrame>>;

/// Compresses and encodes the frames of every partition's stream: at most `workers` at once
/// across the edge, each with a zstd context taken from a pool, so contexts (and their
/// tables) are made once rather than per frame.
struct Encoders {
    compression: Compression,
    workers: usize,
    permits: Arc<Semaphore>,
    contexts: std::sync::Mutex<Vec<silt_wire::BatchCompressor>>,
}

impl Encoders {
    fn new(compression: Compression) -> Encoders {
        let workers = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, ENCODERS_MAX);
        Encoders {
            compression,
            workers,
            permits: Arc::new(Semaphore::new(workers)),
            contexts: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Starts compressing each frame read as soon as a worker is free, and passes the
    /// frames on in the order read, until either side of the stream is gone.
    async fn encode_loop(
        self: Arc<Self>,
        mut read: tokio::sync::mpsc::Receiver<anyhow::Result<ReadFrame>>,
        frames: tokio::sync::mpsc::Sender<anyhow::Result<Encoding>>,
    ) {
        while let Some(frame) = read.recv().await {
            let encoding = match frame {
                Ok(frame) => {
                    let Ok(permit) = self.permits.clone().acquire_owned().await else {
                        return;
                    };
                    let encoders = self.clone();
                    Ok(tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        encoders.encode(frame)
                    }))
                }
                Err(error) => Err(error),
            };
            if frames.send(encoding).await.is_err() {
                return;
            }
        }
    }

    /// The frame's `Data` frame, its payload compressed as configured. Blocking.
    fn encode(&self, frame: ReadFrame) -> anyhow::Result<ShipFrame> {
        let raw_len = frame.batches.len();
        let compressed = match self.compression {
            Compression::None => None,
            // Batches compressed at rest are shipped as stored: zstd over them again would
            // spend the edge's CPU for nothing.
            Compression::Zstd { .. } if !worth_compressing(frame.plain_bytes, raw_len) => None,
            Compression::Zstd { level } => {
                let pooled = self
                    .contexts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop();
                let mut context = match pooled {
                    Some(context) => context,
                    None => silt_wire::BatchCompressor::with_level(level)
                        .context("cannot make a zstd context")?,
                };
                let compressed = context.compress(&frame.batches);
                let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
                if contexts.len() < self.workers {
                    contexts.push(context);
                }
                Some(compressed)
            }
        };
        let (codec, payload) = match compressed {
            Some((codec, payload)) => (codec, bytes::Bytes::from(payload)),
            None => (silt_wire::Codec::None, bytes::Bytes::from(frame.batches)),
        };
        let mut head = BytesMut::with_capacity(64);
        Frame::Data {
            first_offset: frame.first,
            end_offset: frame.end,
            edge_end: frame.edge_end,
            codec,
            raw_len: raw_len as u32,
            payload: &payload,
        }
        .encode_head(&mut head);
        Ok(ShipFrame {
            first: frame.first,
            end: frame.end,
            raw_len,
            head: head.freeze(),
            payload,
        })
    }
}

/// Whether a frame of `raw_len` bytes, `plain_bytes` of them in batches stored
/// uncompressed, is compressed for the uplink: when at least half of it is. A light load
/// stores small batches uncompressed (`ingest::COMPRESS_MIN_BYTES`), which compress well
/// together; a heavy one stores compressed batches, which do not compress again.
fn worth_compressing(plain_bytes: usize, raw_len: usize) -> bool {
    plain_bytes.saturating_mul(2) >= raw_len
}

/// What the log holds at a sender's position.
enum Read {
    /// Whole batches covering offsets `first..end`.
    Data {
        first: u64,
        end: u64,
        /// The partition's high watermark at the read.
        edge_end: u64,
        batches: Vec<u8>,
        /// Bytes of `batches` stored uncompressed.
        plain_bytes: usize,
    },
    /// Nothing visible beyond the position yet.
    Nothing,
    /// The position is below the log start: the disk budget dropped unshipped records.
    Lost { log_start: u64 },
}

fn read_next(log: &PartitionLog, next: u64, frame_bytes: usize) -> anyhow::Result<Read> {
    let slice = match log.read(next, frame_bytes) {
        Ok(slice) => slice,
        Err(LogError::OffsetOutOfRange { log_start, .. }) if next < log_start => {
            return Ok(Read::Lost { log_start });
        }
        Err(LogError::NotLocal { local_start, .. }) => {
            return Ok(Read::Lost {
                log_start: local_start,
            });
        }
        Err(error) => return Err(error.into()),
    };
    let mut end = next;
    let mut taken = 0;
    let mut plain_bytes = 0;
    for batch in silt_log::batch::batches(&slice.bytes, usize::MAX) {
        let (header, bytes) = batch.context("a batch read from the local log is invalid")?;
        // Keep a frame within the wire's limit even when the first batch alone is large.
        if taken > 0 && taken + bytes.len() > frame_bytes.min(silt_wire::DATA_RAW_BYTES_MAX) {
            break;
        }
        taken += bytes.len();
        if matches!(header.compression(), Ok(silt_log::batch::Compression::None)) {
            plain_bytes += bytes.len();
        }
        end = header.last_offset() as u64 + 1;
    }
    if taken == 0 {
        return Ok(Read::Nothing);
    }
    let mut batches = slice.bytes;
    batches.truncate(taken);
    Ok(Read::Data {
        first: next,
        end,
        edge_end: slice.high_watermark.max(end),
        batches,
        plain_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log in `dir` whose one partition holds `records` records.
    fn log_with(dir: &std::path::Path, records: usize) -> Arc<LogManager> {
        use silt_log::batch::{BatchSpec, Record, encode_batch};
        let log = LogManager::open(silt_log::LogConfig::new(dir)).unwrap();
        log.create_topic("mqtt", 1, &Default::default()).unwrap();
        let records: Vec<Record> = (0..records)
            .map(|i| Record {
                timestamp: i as i64,
                key: None,
                value: Some(bytes::Bytes::from(format!("r{i}"))),
                headers: Vec::new(),
            })
            .collect();
        let mut batch = BytesMut::new();
        encode_batch(&BatchSpec::default(), &records, &mut batch).unwrap();
        log.partition("mqtt", 0)
            .unwrap()
            .append(&mut batch)
            .unwrap();
        log
    }

    #[test]
    fn a_log_copied_to_another_device_or_behind_its_cursors_gets_a_new_id_and_keeps_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let log = log_with(&dir.path().join("data"), 10);
        let first_id = log.id().unwrap();
        open_cursors(&state, &log, Some("aa"))
            .unwrap()
            .advance("mqtt", 0, 10)
            .unwrap();
        assert_eq!(
            log.host().as_deref(),
            Some("aa"),
            "a log with no host gets this one"
        );
        assert_eq!(log.id(), Some(first_id.clone()));

        // The same device again: nothing changes.
        let cursors = open_cursors(&state, &log, Some("aa")).unwrap();
        assert_eq!(log.id(), Some(first_id.clone()));
        assert_eq!(cursors.get("mqtt", 0).unwrap(), 10);

        // Another device: a new id, the cursor kept under it, the host recorded.
        let cursors = open_cursors(&state, &log, Some("bb")).unwrap();
        let second_id = log.id().unwrap();
        assert_ne!(second_id, first_id);
        assert_eq!(log.host().as_deref(), Some("bb"));
        assert_eq!(cursors.get("mqtt", 0).unwrap(), 10);
        assert_eq!(
            Cursors::new(state.clone(), log.id())
                .get("mqtt", 0)
                .unwrap(),
            10
        );

        // The log behind its cursor (restored without its state): a new id, and the cursor at
        // the log's end, so the records it takes next are shipped.
        cursors.advance("mqtt", 0, 25).unwrap();
        let cursors = open_cursors(&state, &log, Some("bb")).unwrap();
        assert_ne!(log.id(), Some(second_id.clone()));
        assert_eq!(cursors.get("mqtt", 0).unwrap(), 10);

        // No fingerprint (nothing identifies the device): the host is not checked.
        let third_id = log.id();
        open_cursors(&state, &log, None).unwrap();
        assert_eq!(log.id(), third_id);
        assert_eq!(log.host().as_deref(), Some("bb"));
    }

    fn closed_by_core(code: u32) -> quinn::ConnectionError {
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(code),
            reason: bytes::Bytes::from_static(b"core"),
        })
    }

    #[test]
    fn only_the_shutting_down_close_code_is_an_orderly_end() {
        assert!(matches!(
            ended_by(closed_by_core(silt_wire::CLOSE_SHUTTING_DOWN)),
            Ended::CoreShuttingDown
        ));
        assert!(matches!(ended_by(closed_by_core(0)), Ended::Lost(_)));
        assert!(matches!(
            ended_by(quinn::ConnectionError::TimedOut),
            Ended::Lost(_)
        ));
        // Another process ships this log: the edge gives its log a new id.
        assert!(matches!(
            ended_by(closed_by_core(silt_wire::CLOSE_SUPERSEDED)),
            Ended::LogBehind(_)
        ));
    }

    #[test]
    fn a_restarting_core_must_answer_soon_on_a_fast_path_and_never_past_the_timeout() {
        let ms = Duration::from_millis;
        // Never connected: a first connection's full timeout.
        assert_eq!(restart_answer_timeout(None), CONNECT_TIMEOUT);
        // Loopback and LAN RTTs: 250 ms, four Initials at the 10 ms floor.
        assert_eq!(
            restart_answer_timeout(Some(Duration::ZERO)),
            RESTART_ANSWER_MIN
        );
        assert_eq!(restart_answer_timeout(Some(ms(10))), RESTART_ANSWER_MIN);
        assert_eq!(restart_answer_timeout(Some(ms(40))), ms(800));
        // Slow paths keep the full timeout.
        assert_eq!(restart_answer_timeout(Some(ms(150))), CONNECT_TIMEOUT);
        assert_eq!(
            restart_answer_timeout(Some(Duration::from_secs(5))),
            CONNECT_TIMEOUT
        );
    }

    /// The suite a TLS 1.3 handshake in memory settles on, between the edge's provider for a
    /// CPU with or without `aes_hardware` and a server configured as the core's (ring's
    /// defaults).
    fn negotiated(aes_hardware: bool) -> rustls::CipherSuite {
        let certified = rcgen::generate_simple_self_signed(vec!["core".to_string()]).unwrap();
        let cert = CertificateDer::from(certified.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client =
            rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider(aes_hardware)))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let mut client =
            rustls::ClientConnection::new(Arc::new(client), "core".try_into().unwrap()).unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut &wire[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut &wire[..]).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking(), "the handshake did not finish");
        client.negotiated_cipher_suite().unwrap().suite()
    }

    #[test]
    fn the_core_takes_the_suite_the_edge_prefers_for_its_cpu() {
        assert_eq!(
            negotiated(false),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert_eq!(
            negotiated(true),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        // Either order can protect QUIC's Initial packets (AES-128-GCM is offered).
        for aes in [false, true] {
            let tls = rustls::ClientConfig::builder_with_provider(Arc::new(crypto_provider(aes)))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            assert!(QuicClientConfig::try_from(tls).is_ok());
        }
        // This machine's answer is the one its CPU flags give.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            aes_hardware(),
            std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| info
                .lines()
                .find(|line| line.starts_with("flags"))
                .is_some_and(|flags| flags.split_whitespace().any(|f| f == "aes")
                    && flags.split_whitespace().any(|f| f == "pclmulqdq")))
        );
    }

    #[test]
    fn frames_mostly_compressed_at_rest_are_shipped_as_stored() {
        assert!(worth_compressing(1 << 20, 1 << 20));
        assert!(worth_compressing(512 << 10, 1 << 20));
        assert!(!worth_compressing((512 << 10) - 1, 1 << 20));
        assert!(!worth_compressing(0, 1 << 20));
    }
}
