//! The core node's top-level `run`: what a core node does between start and shutdown.
//!
//! A core node owns its data directory, its admin port and its Kafka listener. It serves
//! `/health` and `/metrics` from the start, opens the data directory (recovering it after an
//! unclean stop), opens the broker (replaying committed offsets), serves the Kafka protocol,
//! and applies retention and the group coordinator's timeouts on timers.
//!
//! Shutdown runs in the opposite order, each step only once the one before is done: health
//! turns 503; the listeners stop, so no request is under way; the log closes cleanly, so the
//! next start skips recovery; and only then does the admin port stop.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use silt_log::LogManager;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use silt_gateways::kafka::{self, KafkaLimits};

use crate::admin::{self, Admin, NodeState};
use crate::broker::{Broker, BrokerConfig, GROUP_TICK};
use crate::config::CoreConfig;
use crate::telemetry;
use crate::tier::Tier;
use crate::tls::{self, ServerTls};
use crate::uplink::{AppendHook, UplinkServer, UplinkServerConfig};

/// How often the metrics recorder drains its histogram samples, so that they stay bounded
/// between scrapes.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The listeners a node serves, bound by the caller so tests can use port 0.
#[derive(Debug)]
pub(crate) struct Listeners {
    pub(crate) admin: TcpListener,
    pub(crate) kafka: TcpListener,
    /// The uplink's UDP socket (QUIC).
    pub(crate) uplink: std::net::UdpSocket,
}

/// Runs a core node with `config` until `shutdown` completes.
///
/// It takes its whole world as arguments (the listeners already bound, the metrics handle,
/// the shutdown future), so tests can bind port 0 and run nodes in-process.
pub(crate) async fn run(
    config: CoreConfig,
    listeners: Listeners,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let admin_addr = listeners
        .admin
        .local_addr()
        .context("cannot read the admin listener's address")?;
    let kafka_addr = listeners
        .kafka
        .local_addr()
        .context("cannot read the kafka listener's address")?;
    let (state, state_receiver) = watch::channel(NodeState::Starting);
    let (stop_admin, admin_stopped) = oneshot::channel::<()>();
    let tier_slot = config
        .object_store
        .as_ref()
        .map(|_| Arc::new(OnceLock::new()));
    let mut admin_server = AbortOnDrop(tokio::spawn(admin::serve(
        listeners.admin,
        Admin::new(state_receiver, metrics.clone(), tier_slot.clone()),
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

    // Created before the broker, which will read its backpressure flag on Produce; it starts
    // nothing until `run`.
    // Opened once: offload and the cold reader share one store (and its connection pool).
    let archive = match &config.object_store {
        Some(url) => Some(
            silt_tiering::ArchiveStore::open(&url.url)
                .and_then(|store| store.with_zstd_level(config.tiering.zstd_level))
                .with_context(|| format!("cannot open object store {}", url.url))?,
        ),
        None => None,
    };
    let tier = archive.as_ref().map(|store| {
        let tier = Tier::new(store.clone(), config.tiering, log.clone());
        if let Some(slot) = &tier_slot {
            let _ = slot.set(tier.clone());
        }
        tier
    });
    let advertised = config
        .kafka
        .advertised_listener
        .clone()
        .unwrap_or_else(|| (kafka_addr.ip().to_string(), kafka_addr.port()));
    let broker_config = BrokerConfig {
        archive,
        cold: config.tiering.cold,
        backpressure: tier
            .as_ref()
            .map(|tier| tier.backpressure())
            .unwrap_or_default(),
        node_id: config.node_id,
        advertised,
        default_partitions: config.kafka.default_partitions,
        auto_create_topics: config.kafka.auto_create_topics,
        group_initial_rebalance_delay: config.kafka.group_initial_rebalance_delay,
    };
    let opening = log.clone();
    let broker = match tokio::task::spawn_blocking(move || Broker::open(broker_config, opening))
        .await
        .context("opening the broker panicked")?
    {
        Ok(broker) => Arc::new(broker),
        Err(error) => {
            close_log(&log).await?;
            return Err(error).context("cannot open the broker (committed offsets)");
        }
    };
    telemetry::refresh_groups(&broker);
    let (stop_kafka, kafka_stopped) = oneshot::channel::<()>();
    let limits = KafkaLimits {
        max_request_bytes: config.kafka.max_request_bytes,
        max_connections: config.kafka.max_connections,
        queued_max_request_bytes: config.kafka.queued_max_request_bytes,
        idle_timeout: config.kafka.connections_max_idle,
        ..KafkaLimits::default()
    };
    let mut kafka_server = AbortOnDrop(tokio::spawn(kafka::serve(
        listeners.kafka,
        broker.clone(),
        limits,
        async move {
            let _ = kafka_stopped.await;
        },
    )));
    let uplink = match start_uplink(&config, listeners.uplink, &log, &broker) {
        Ok(uplink) => uplink,
        Err(error) => {
            let _ = stop_kafka.send(());
            let _ = (&mut kafka_server.0).await;
            close_log(&log).await?;
            return Err(error);
        }
    };

    // Tiering starts after the broker and listeners, so a slow or unreachable store never
    // delays serving hot data.
    let (stop_tier, tier_stopped) = oneshot::channel::<()>();
    let mut tier_task = AbortOnDrop(tokio::spawn({
        let tier = tier.clone();
        async move {
            if let Some(tier) = tier {
                tier.run(async move {
                    let _ = tier_stopped.await;
                })
                .await;
            }
        }
    }));

    state.send_replace(NodeState::Serving(log.clone()));
    let recovery = log.recovery_report();
    // Tests bind port 0 and read the real ports from the `admin=` and `kafka=` fields of this
    // line.
    tracing::info!(
        node_id = config.node_id,
        data_dir = %data_dir.display(),
        admin = %admin_addr,
        kafka = %kafka_addr,
        uplink = %uplink.addr,
        object_store = config.object_store.as_ref().map_or("none", |store| store.url.as_str()),
        clean = log.opened_clean(),
        topics = log.topics().len(),
        segments_recovered = recovery.segments_recovered,
        bytes_truncated = recovery.bytes_truncated,
        "silt-core started"
    );

    tokio::pin!(shutdown);
    let mut retention = tokio::time::interval(config.retention_check);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut upkeep = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut group_tick = tokio::time::interval(GROUP_TICK);
    group_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = retention.tick() => enforce_retention(&log, tier.as_ref()).await,
            _ = upkeep.tick() => {
                telemetry::refresh_groups(&broker);
                metrics.run_upkeep();
            }
            _ = group_tick.tick() => broker.tick(),
        }
    }

    // Health turns 503 first, so probes stop sending traffic while the node winds down.
    state.send_replace(NodeState::Stopping(log.clone()));
    let _ = stop_kafka.send(());
    let _ = (&mut kafka_server.0).await;
    // Appends under way finish before the log closes: nothing acked is lost.
    let _ = uplink.stop.send(());
    let _ = uplink.server.await;
    let _ = stop_tier.send(());
    let _ = (&mut tier_task.0).await;
    close_log(&log).await?;
    let _ = stop_admin.send(());
    let _ = (&mut admin_server.0).await;
    tracing::info!(node_id = config.node_id, "silt-core stopped");
    Ok(())
}

/// The running uplink server.
struct RunningUplink {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

fn start_uplink(
    config: &CoreConfig,
    socket: std::net::UdpSocket,
    log: &Arc<LogManager>,
    broker: &Arc<Broker>,
) -> anyhow::Result<RunningUplink> {
    let tls = match &config.uplink.cert {
        Some((cert, key)) => ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        },
        None => tls::ensure_dev_tls(&config.uplink.tls_dir, &[])?,
    };
    let tls = ServerTls {
        client_ca: config.uplink.client_ca.clone(),
        ..tls
    };
    let server = UplinkServer::bind(
        socket,
        log.clone(),
        &UplinkServerConfig {
            tls,
            leadership: broker.leadership(),
            default_partitions: config.kafka.default_partitions,
            on_append: {
                let broker = broker.clone();
                AppendHook(Arc::new(move || broker.notify_appended()))
            },
            max_connections: config.uplink.max_connections,
        },
    )?;
    let addr = server.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Ok(RunningUplink { addr, stop, server })
}

/// Closes the data directory cleanly, off the runtime's thread.
async fn close_log(log: &Arc<LogManager>) -> anyhow::Result<()> {
    let closing = log.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("closing the data directory panicked")?
        .context("cannot close the data directory cleanly")
}

/// Aborts a task when dropped, so a node that fails half-way leaves no task behind.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One retention pass; a failure is logged and retried at the next tick. With tiering, each
/// tiered partition deletes locally only what its committed manifest holds.
async fn enforce_retention(log: &Arc<LogManager>, tier: Option<&Arc<Tier>>) {
    let log = log.clone();
    let tier = tier.cloned();
    let result = tokio::task::spawn_blocking(move || match tier {
        Some(tier) => tier.enforce_local_retention(silt_log::now_ms()),
        None => log.enforce_retention(silt_log::now_ms()),
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
