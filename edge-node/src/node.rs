//! The edge node's top-level `run`: what an edge node does between start and shutdown.
//!
//! An edge node owns its local data directory, its admin port and, when a listener is
//! configured, the MQTT broker. It serves `/health` and `/metrics` from the start, opens the
//! data directory (recovering it after an unclean stop), then starts the broker over a
//! [`LogIngest`] on that log, and applies retention on a timer.
//!
//! Shutdown runs in the opposite order, each step only once the one before is done: health
//! turns 503; the broker disconnects its clients and saves its sessions, so no publish is
//! under way; the ingest writers append what is queued; the log closes cleanly, so the next
//! start skips recovery; and only then does the admin port stop. The uplink client (when
//! `uplink.addr` is set) starts once the log is open and stops right after the broker; with
//! it, retention keeps everything the core has not acknowledged (only the disk budget can
//! drop unshipped data, which the uplink counts as lost).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use silt_gateways::mqtt::server::{Broker, BrokerConfig, IngestPort};
use silt_log::LogManager;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, Admin, NodeState};
use crate::config::{Compression, EdgeConfig, MqttConfig, MqttTls, TlsClientAuth};
use crate::ingest::{BATCH_RECORDS_MAX_DEFAULT, IngestConfig, LogIngest};
use crate::uplink::{Cursors, Uplink};

/// How long the broker's accept loops get to end once [`Broker::shutdown`] has returned,
/// before they are aborted.
const MQTT_SERVE_STOP_GRACE: Duration = Duration::from_secs(2);
/// How often the metrics recorder drains its histogram samples, so that they stay bounded
/// between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Runs an edge node with `config` until `shutdown` completes.
///
/// It takes its whole world as arguments (the admin listener already bound, the metrics
/// handle, the shutdown future), so tests can bind port 0 and run nodes in-process.
pub(crate) async fn run(
    config: EdgeConfig,
    admin_listener: TcpListener,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let admin_addr = admin_listener
        .local_addr()
        .context("cannot read the admin listener's address")?;
    let (state, state_receiver) = watch::channel(NodeState::Starting);
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let mut admin_server = AbortOnDrop(tokio::spawn(admin::serve(
        admin_listener,
        Admin::new(state_receiver, metrics.clone()),
        async move {
            let _ = admin_stopped.await;
        },
    )));

    let data_dir = config.log.data_dir.clone();
    let log_config = config.log.clone();
    // Opening may scan segments after a crash: blocking work, off the runtime's thread.
    let log = tokio::task::spawn_blocking(move || LogManager::open(log_config))
        .await
        .context("opening the data directory panicked")?
        .with_context(|| format!("cannot open data directory {}", data_dir.display()))?;
    // The uplink's cursors are checked against the log before MQTT can append to it: a log
    // that went back is told from one that did not by its end as opened.
    let cursors = match &config.uplink {
        None => None,
        Some(uplink_config) => {
            let (uplink_config, opened) = (uplink_config.clone(), log.clone());
            let cursors = tokio::task::spawn_blocking(move || {
                let host = crate::uplink::host::fingerprint();
                crate::uplink::open_cursors(&uplink_config.state_dir, &opened, host.as_deref())
            })
            .await
            .context("opening the uplink cursors panicked")
            .and_then(|opened| opened);
            match cursors {
                Ok(cursors) => Some(cursors),
                Err(error) => {
                    close_log(&log).await?;
                    return Err(error.context("cannot start the uplink"));
                }
            }
        }
    };
    let mqtt = if config.mqtt.enabled() {
        match start_mqtt(&config.mqtt, config.log_compression, &log).await {
            Ok(mqtt) => Some(mqtt),
            Err(error) => {
                // Close what was opened, so a typo in the MQTT config does not cost a
                // recovery scan at the next start.
                close_log(&log).await?;
                return Err(error);
            }
        }
    } else {
        None
    };
    let uplink = match (&config.uplink, cursors) {
        (Some(uplink_config), Some(cursors)) => {
            match Uplink::start(uplink_config, &config.node_id, log.clone(), cursors) {
                Ok(uplink) => Some(uplink),
                Err(error) => {
                    if let Some(mqtt) = mqtt {
                        mqtt.stop().await;
                    }
                    close_log(&log).await?;
                    return Err(error.context("cannot start the uplink"));
                }
            }
        }
        _ => None,
    };
    let cursors = uplink.as_ref().map(|uplink| uplink.cursors.clone());
    state.send_replace(NodeState::Serving(log.clone()));
    let recovery = log.recovery_report();
    let mqtt_addr = mqtt.as_ref().and_then(|mqtt| mqtt.addr);
    let mqtt_tls_addr = mqtt.as_ref().and_then(|mqtt| mqtt.tls_addr);
    // Tests bind port 0 and read the real ports from the `admin=`, `mqtt=` and `mqtt_tls=`
    // fields of this line; a listener that is off has no field.
    tracing::info!(
        node_id = %config.node_id,
        data_dir = %data_dir.display(),
        admin = %admin_addr,
        mqtt = mqtt_addr.map(tracing::field::display),
        mqtt_tls = mqtt_tls_addr.map(tracing::field::display),
        uplink = config.uplink.as_ref().map(|uplink| tracing::field::display(&uplink.addr)),
        clean = log.opened_clean(),
        topics = log.topics().len(),
        segments_recovered = recovery.segments_recovered,
        bytes_truncated = recovery.bytes_truncated,
        "silt-edge started"
    );

    tokio::pin!(shutdown);
    let mut retention = tokio::time::interval(config.retention_check);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upkeep = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = retention.tick() => enforce_retention(&log, cursors.clone()).await,
            _ = upkeep.tick() => metrics.run_upkeep(),
        }
    }

    // Health turns 503 first, so probes stop sending traffic while the node winds down.
    state.send_replace(NodeState::Stopping(log.clone()));
    if let Some(mqtt) = mqtt {
        mqtt.stop().await;
    }
    if let Some(uplink) = uplink {
        uplink.stop().await;
    }
    close_log(&log).await?;
    let _ = stop_admin.send(());
    let _ = (&mut admin_server.0).await;
    tracing::info!(node_id = %config.node_id, "silt-edge stopped");
    Ok(())
}

/// Closes the data directory cleanly, off the runtime's thread.
async fn close_log(log: &Arc<LogManager>) -> anyhow::Result<()> {
    let closing = log.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("closing the data directory panicked")?
        .context("cannot close the data directory cleanly")
}

/// The running MQTT broker and the ingest path behind it.
#[derive(Debug)]
struct Mqtt {
    broker: Broker,
    ingest: Arc<LogIngest>,
    /// The accept loops, one per listener.
    servers: Vec<AbortOnDrop>,
    addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
}

impl Mqtt {
    /// Stops the broker (clients disconnected, sessions saved), then drains the ingest
    /// queues. The log stays open for the caller to close.
    async fn stop(mut self) {
        self.broker.shutdown().await;
        let deadline = tokio::time::Instant::now() + MQTT_SERVE_STOP_GRACE;
        for server in &mut self.servers {
            if tokio::time::timeout_at(deadline, &mut server.0)
                .await
                .is_err()
            {
                tracing::warn!("an mqtt listener was still running after shutdown; aborting it");
            }
        }
        drop(self.servers);
        self.ingest.shutdown().await;
    }
}

/// Starts the MQTT broker over `log`: ingest path, broker state, listeners.
async fn start_mqtt(
    config: &MqttConfig,
    compression: Compression,
    log: &Arc<LogManager>,
) -> anyhow::Result<Mqtt> {
    // Certificates first: a bad one fails the start before any port opens.
    let tls = match &config.tls {
        Some(tls) => Some((tls, tls_server_config(tls)?)),
        None => None,
    };
    warn_if_nobody_can_connect(config);
    let ingest = Arc::new(LogIngest::new(
        log.clone(),
        IngestConfig {
            default_partitions: config.default_partitions,
            queue_bytes_max: config.ingest_queue_bytes,
            batch_bytes_max: log.config().max_batch_bytes,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            zstd_level: match compression {
                Compression::Zstd { level } => Some(level),
                Compression::None => None,
            },
        },
    ));
    let broker = match open_broker(config, ingest.clone()).await {
        Ok(broker) => broker,
        Err(error) => {
            ingest.shutdown().await;
            return Err(error);
        }
    };
    let mut mqtt = Mqtt {
        broker,
        ingest,
        servers: Vec::new(),
        addr: None,
        tls_addr: None,
    };
    if let Err(error) = mqtt.listen(config, tls).await {
        mqtt.stop().await;
        return Err(error);
    }
    Ok(mqtt)
}

impl Mqtt {
    /// Binds the configured listeners and starts serving them.
    async fn listen(
        &mut self,
        config: &MqttConfig,
        tls: Option<(&MqttTls, Arc<rustls::ServerConfig>)>,
    ) -> anyhow::Result<()> {
        if let Some(addr) = config.listen {
            let listener = bind(addr, "mqtt.listen (--mqtt-listen)").await?;
            self.addr = Some(local_addr(&listener)?);
            self.servers
                .push(AbortOnDrop(self.broker.serve(listener, None)));
        }
        if let Some((tls, server_config)) = tls {
            let listener = bind(tls.listen, "mqtt.tls_listen").await?;
            self.tls_addr = Some(local_addr(&listener)?);
            self.servers.push(AbortOnDrop(
                self.broker.serve(listener, Some(server_config)),
            ));
        }
        Ok(())
    }
}

/// Loads the broker's state and auth files, off the runtime's thread.
async fn open_broker(config: &MqttConfig, ingest: Arc<LogIngest>) -> anyhow::Result<Broker> {
    let broker_config = BrokerConfig {
        limits: config.limits.clone(),
        allow_anonymous: config.allow_anonymous,
        password_file: config.password_file.clone(),
        acl_file: config.acl_file.clone(),
        state_dir: config.state_dir.clone(),
        routes: config.route_table.clone(),
    };
    let port: Arc<dyn IngestPort> = ingest;
    tokio::task::spawn_blocking(move || {
        let state_dir = broker_config.state_dir.clone();
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot create mqtt.state_dir {}", state_dir.display()))?;
        Broker::open(broker_config, port).with_context(|| {
            format!(
                "cannot start the MQTT broker (mqtt.state_dir {}, mqtt.password_file, \
                 mqtt.acl_file)",
                state_dir.display()
            )
        })
    })
    .await
    .context("starting the MQTT broker panicked")?
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} {addr}"))
}

fn local_addr(listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    listener
        .local_addr()
        .context("cannot read an mqtt listener's address")
}

/// A broker with no password file and anonymous access off refuses every CONNECT that does
/// not come with a client certificate: legal (an operator may add users before opening the
/// firewall), but worth saying loudly.
fn warn_if_nobody_can_connect(config: &MqttConfig) {
    if config.password_file.is_some() || config.allow_anonymous {
        return;
    }
    let client_certs = config
        .tls
        .as_ref()
        .is_some_and(|tls| tls.client_auth != TlsClientAuth::None);
    if !client_certs {
        tracing::warn!(
            "mqtt has no mqtt.password_file and mqtt.allow_anonymous is false: every CONNECT \
             will be refused"
        );
    } else if config.listen.is_some() {
        tracing::warn!(
            "mqtt has no mqtt.password_file and mqtt.allow_anonymous is false: every CONNECT \
             on mqtt.listen will be refused; only TLS clients with a certificate can connect"
        );
    }
}

/// The rustls server config of the TLS listener.
fn tls_server_config(tls: &MqttTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use silt_gateways::mqtt::server::{ClientAuth, server_config};
    let client_auth = match &tls.client_auth {
        TlsClientAuth::None => ClientAuth::None,
        TlsClientAuth::Optional { ca } => ClientAuth::Optional { ca: ca.clone() },
        TlsClientAuth::Required { ca } => ClientAuth::Required { ca: ca.clone() },
    };
    server_config(&tls.cert, &tls.key, client_auth).with_context(|| {
        format!(
            "cannot load mqtt.tls_cert {} / mqtt.tls_key {}",
            tls.cert.display(),
            tls.key.display()
        )
    })
}

/// Retention that treats a partition's uplink cursor as its archive bound: time and size
/// limits apply only to what the core has acknowledged, and the log start then follows the
/// local start (on an edge there is no cold tier to read the gap from). A partition whose
/// cursor was never loaded keeps everything.
fn retain_unshipped(
    log: &LogManager,
    cursors: &Cursors,
    now: i64,
) -> silt_log::Result<silt_log::DeleteReport> {
    let mut total = silt_log::DeleteReport::default();
    for topic in log.topics() {
        for partition in 0..topic.partitions {
            let partition_log = log.partition(&topic.name, partition)?;
            let shipped = cursors.cached(&topic.name, partition).unwrap_or(0);
            total.add(partition_log.enforce_retention(now, Some(shipped))?);
            let local_start = partition_log.local_start_offset();
            if local_start > partition_log.log_start_offset() {
                total.add(partition_log.delete_before(local_start)?);
            }
        }
    }
    Ok(total)
}

/// Aborts a task when dropped, so a node that fails half-way leaves no task behind.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One retention pass; a failure is logged and retried at the next tick. With an uplink,
/// nothing at or above a partition's cursor is deleted.
async fn enforce_retention(log: &Arc<LogManager>, cursors: Option<Arc<Cursors>>) {
    let log = log.clone();
    let result = tokio::task::spawn_blocking(move || match cursors {
        None => log.enforce_retention(silt_log::now_ms()),
        Some(cursors) => retain_unshipped(&log, &cursors, silt_log::now_ms()),
    })
    .await;
    match result {
        Ok(Ok(report)) if report.segments > 0 => tracing::info!(
            segments = report.segments,
            bytes = report.bytes,
            "retention deleted segments"
        ),
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "retention pass failed"),
        Err(error) => tracing::error!(%error, "retention pass panicked"),
    }
}
