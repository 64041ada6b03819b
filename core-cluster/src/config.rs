//! The core node's configuration: one TOML file, overridden by `SILT_*` env vars and flags,
//! parsed into a raw serde struct and validated into [`CoreConfig`].
//!
//! Precedence, lowest first: defaults, the file, env vars, flags. Every source is turned into
//! one TOML table before anything is validated, so a key means the same thing and is checked
//! the same way wherever it came from, and every error names the key (and where its value came
//! from, when that was not the file).
//!
//! Defaults live in [`defaults`] for the keys the core owns and in `silt_log::config` for the
//! log's, so each has one home. It mirrors the edge's config (`silt-edge`'s `config.rs`):
//! same precedence, same error messages, same `[log]` and `[topic_defaults]` sections.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use silt_log::config::{
    BudgetPolicy, DiskBudget, FlushPolicy, LogConfig, SEGMENT_BYTES_MAX, TOPIC_CONFIG_KEYS,
};

/// Defaults of the keys the core itself owns; the log's come from `silt_log::config`.
/// The data directory's entry that holds the uplink's TLS files, which the log leaves alone.
const TLS_DIR_NAME: &str = silt_log::TLS_DIR_NAME;

pub(crate) mod defaults {
    /// The admin (metrics and health) listener: loopback only, so nothing is exposed unless an
    /// operator says so. One port above the edge's, so both run on one machine (`silt dev`).
    pub(crate) const ADMIN_LISTEN: &str = "127.0.0.1:9645";
    /// How often `relaxed-unsafe` mode fsyncs.
    pub(crate) const FLUSH_INTERVAL_MS: u64 = 1000;
    /// The node id when none is configured: Kafka's broker ids are integers, and the first
    /// node of a cluster is 1.
    pub(crate) const NODE_ID: i32 = 1;
    /// The Kafka listener: Kafka's own port, on loopback.
    pub(crate) const KAFKA_LISTEN: &str = "127.0.0.1:9092";
    /// Partitions of an auto-created topic, as Kafka's `num.partitions`.
    pub(crate) const KAFKA_DEFAULT_PARTITIONS: u32 = 1;
    /// Whether Produce and Metadata create missing topics, as Kafka's
    /// `auto.create.topics.enable`.
    pub(crate) const KAFKA_AUTO_CREATE_TOPICS: bool = true;
    /// Largest Kafka request accepted, as Kafka's `socket.request.max.bytes` (100 MiB).
    pub(crate) const KAFKA_MAX_REQUEST_BYTES: u64 = 100 << 20;
    /// Most Kafka connections at once; more are closed on accept.
    pub(crate) const KAFKA_MAX_CONNECTIONS: u64 = 4096;
    /// Most bytes of large request frames held at once, as Kafka's
    /// `queued.max.request.bytes` (which is unbounded by default): five requests of the
    /// largest size, or thousands of the usual Produce sizes.
    pub(crate) const KAFKA_QUEUED_MAX_REQUEST_BYTES: u64 = 512 << 20;
    /// How long a Kafka connection may send nothing before it is closed, as Kafka's
    /// `connections.max.idle.ms` (10 minutes).
    pub(crate) const KAFKA_CONNECTIONS_MAX_IDLE_MS: u64 = 600_000;
    /// How long a rebalance of an empty consumer group waits for more members, as Kafka's
    /// `group.initial.rebalance.delay.ms`.
    pub(crate) const KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS: u64 = 3000;
    /// The uplink's QUIC (UDP) listener.
    pub(crate) const UPLINK_LISTEN: &str = "0.0.0.0:9093";
    /// Most uplink connections at once. An edge keeps one, so this serves a thousand edges;
    /// each connection may leave up to 64 MiB unread, so it also bounds that memory.
    pub(crate) const UPLINK_MAX_CONNECTIONS: u64 = 1024;
    /// How often retention runs over every partition: often enough that a size limit is
    /// kept within a few seconds' ingest, rarely enough to cost nothing.
    pub(crate) const RETENTION_CHECK_MS: u64 = 30_000;
    /// Objects near 128 MiB of log bytes: Parquet files of tens of MiB after zstd, the size
    /// analytics engines read best (DESIGN.md: tens to hundreds of MiB).
    pub(crate) const TIERING_OBJECT_BYTES_TARGET: u64 = 128 << 20;
    /// A quiet partition's data reaches the archive within ten minutes.
    pub(crate) const TIERING_MAX_WAIT_MS: u64 = 10 * 60 * 1000;
    /// Checking a partition costs a lock and a walk of its segment list: every few seconds is
    /// cheap, and a closed segment waits at most this long.
    pub(crate) const TIERING_CHECK_INTERVAL_MS: u64 = 5_000;
    /// Two uploads at once: enough to hide one upload's latency, little enough that offload
    /// leaves CPU to ingest on a small machine.
    pub(crate) const TIERING_UPLOAD_CONCURRENCY: usize = 2;
    /// Refuse produce at 90% of the budget while offload is behind, leaving a tenth of the
    /// budget for batches already accepted.
    pub(crate) const TIERING_BACKPRESSURE_PERCENT: u8 = 90;
    /// Retry a failed upload after a second, doubling to at most a minute.
    pub(crate) const TIERING_RETRY_INITIAL_MS: u64 = 1_000;
    pub(crate) const TIERING_RETRY_MAX_MS: u64 = 60_000;
    /// Garbage collection LISTs a partition's directory: every ten minutes keeps the LIST
    /// requests cheap and orphans short-lived.
    pub(crate) const TIERING_GC_INTERVAL_MS: u64 = 600_000;
    /// An unnamed object younger than an hour may be an upload about to commit.
    pub(crate) const TIERING_GC_GRACE_MS: u64 = silt_tiering::gc::GC_GRACE_MS_DEFAULT as u64;
    /// Small archive objects (a trickle's) are merged unless turned off.
    pub(crate) const TIERING_COMPACT: bool = true;
    /// An object under a quarter of the target counts as small (`tiering.compact_small_bytes`
    /// defaults to `tiering.object_bytes_target / 4`).
    pub(crate) const TIERING_COMPACT_SMALL_DIVISOR: u64 = 4;
    /// Objects are merged once their newest record is an hour old, so a trickle's objects are
    /// merged about hourly rather than at every check.
    pub(crate) const TIERING_COMPACT_MIN_AGE_MS: u64 =
        silt_tiering::compact::COMPACT_MIN_AGE_MS_DEFAULT;
}

/// Smallest `log.max_batch_bytes`: the 61-byte header of a RecordBatch v2 with no records.
const MAX_BATCH_BYTES_MIN: u64 = 61;

/// Tables of the config file; `--set SECTION.KEY=VALUE` addresses a key inside one.
const SECTIONS: &[&str] = &["log", "topic_defaults", "kafka", "uplink", "tiering"];

/// A validated core node configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CoreConfig {
    /// This node's broker id, unique in its cluster (Kafka's `node.id`).
    pub(crate) node_id: i32,
    /// Where the admin server (metrics, health) will listen.
    pub(crate) admin_listen: SocketAddr,
    /// The local log, including the data directory.
    pub(crate) log: LogConfig,
    /// How often retention runs (`log.retention_check_ms`).
    pub(crate) retention_check: Duration,
    /// The Kafka protocol listener and broker defaults.
    pub(crate) kafka: KafkaConfig,
    /// The uplink server's listener.
    pub(crate) uplink: UplinkConfig,
    /// The object store cold segments are tiered to (`object_store`); `None` turns tiering
    /// off.
    pub(crate) object_store: Option<ObjectStoreUrl>,
    /// How tiering runs (`[tiering]`); used only with an object store.
    pub(crate) tiering: TieringConfig,
}

/// The `[tiering]` section: how closed segments move to the object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TieringConfig {
    /// Segments are merged until an object holds this many log bytes
    /// (`tiering.object_bytes_target`).
    pub(crate) object_bytes_target: u64,
    /// A smaller object is written once its newest data is this old (`tiering.max_wait_ms`).
    pub(crate) max_wait_ms: u64,
    /// How often every partition is checked for closed segments to offload
    /// (`tiering.check_interval_ms`).
    pub(crate) check_interval: Duration,
    /// Uploads under way at once, across partitions (`tiering.upload_concurrency`).
    pub(crate) upload_concurrency: usize,
    /// Produce is refused (retriably) once the data directory uses this percentage of
    /// `log.budget_bytes` while offload is behind (`tiering.backpressure_percent`).
    pub(crate) backpressure_percent: u8,
    /// First retry delay after a failed upload; it doubles per failure
    /// (`tiering.retry_initial_ms`).
    pub(crate) retry_initial: Duration,
    /// Longest retry delay (`tiering.retry_max_ms`).
    pub(crate) retry_max: Duration,
    /// How often each partition's archive is garbage collected (`tiering.gc_interval_ms`).
    pub(crate) gc_interval: Duration,
    /// Unnamed objects and interrupted uploads younger than this are left alone
    /// (`tiering.gc_grace_ms`).
    pub(crate) gc_grace_ms: u64,
    /// Whether runs of small archive objects are merged (`tiering.compact`).
    pub(crate) compact: bool,
    /// Objects smaller than this are merged (`tiering.compact_small_bytes`).
    pub(crate) compact_small_bytes: u64,
    /// Only objects whose newest record is this old are merged (`tiering.compact_min_age_ms`).
    pub(crate) compact_min_age_ms: u64,
    /// The zstd level new archive objects are written at (`tiering.zstd_level`).
    pub(crate) zstd_level: i32,
    /// How the cold reader (Fetch and ListOffsets below the local start) is bounded:
    /// `tiering.cold_cache_bytes`, `tiering.cold_open_objects`, `tiering.cold_prefetch_max`,
    /// `tiering.cold_replays_max`, `tiering.cold_decode_ahead_max`.
    pub(crate) cold: silt_tiering::ColdConfig,
}

impl Default for TieringConfig {
    fn default() -> Self {
        TieringConfig {
            object_bytes_target: defaults::TIERING_OBJECT_BYTES_TARGET,
            max_wait_ms: defaults::TIERING_MAX_WAIT_MS,
            check_interval: Duration::from_millis(defaults::TIERING_CHECK_INTERVAL_MS),
            upload_concurrency: defaults::TIERING_UPLOAD_CONCURRENCY,
            backpressure_percent: defaults::TIERING_BACKPRESSURE_PERCENT,
            retry_initial: Duration::from_millis(defaults::TIERING_RETRY_INITIAL_MS),
            retry_max: Duration::from_millis(defaults::TIERING_RETRY_MAX_MS),
            gc_interval: Duration::from_millis(defaults::TIERING_GC_INTERVAL_MS),
            gc_grace_ms: defaults::TIERING_GC_GRACE_MS,
            compact: defaults::TIERING_COMPACT,
            compact_small_bytes: defaults::TIERING_OBJECT_BYTES_TARGET
                / defaults::TIERING_COMPACT_SMALL_DIVISOR,
            compact_min_age_ms: defaults::TIERING_COMPACT_MIN_AGE_MS,
            zstd_level: silt_tiering::store::ZSTD_LEVEL_DEFAULT,
            cold: silt_tiering::ColdConfig::BUILT_IN,
        }
    }
}

/// The `[kafka]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KafkaConfig {
    /// Where the Kafka listener binds (`kafka.listen`).
    pub(crate) listen: SocketAddr,
    /// The `host:port` Metadata tells clients to connect to (`kafka.advertised_listener`);
    /// `None` means the listener's bound address.
    pub(crate) advertised_listener: Option<(String, u16)>,
    /// Partitions of an auto-created topic (`kafka.default_partitions`).
    pub(crate) default_partitions: u32,
    /// Whether Produce and Metadata create missing topics (`kafka.auto_create_topics`).
    pub(crate) auto_create_topics: bool,
    /// Largest request frame accepted (`kafka.max_request_bytes`).
    pub(crate) max_request_bytes: u32,
    /// Most connections at once (`kafka.max_connections`); more are closed on accept.
    pub(crate) max_connections: usize,
    /// Most bytes of large request frames held at once across connections
    /// (`kafka.queued_max_request_bytes`, at least `max_request_bytes`).
    pub(crate) queued_max_request_bytes: usize,
    /// How long a connection may send nothing, or read none of a response, before it is
    /// closed (`kafka.connections_max_idle_ms`).
    pub(crate) connections_max_idle: Duration,
    /// `kafka.group_initial_rebalance_delay_ms`.
    pub(crate) group_initial_rebalance_delay: Duration,
}

/// The `[uplink]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UplinkConfig {
    /// Where the uplink's QUIC server binds (`uplink.listen`).
    pub(crate) listen: SocketAddr,
    /// Where the development CA and server certificate are created when `uplink.cert` is
    /// not set (`uplink.tls_dir`, default `<data_dir>/tls`, a directory the log leaves to the node).
    pub(crate) tls_dir: PathBuf,
    /// Server certificate and key (`uplink.cert`, `uplink.key`); default: the development
    /// ones in `tls_dir`.
    pub(crate) cert: Option<(PathBuf, PathBuf)>,
    /// CA of edge client certificates (`uplink.client_ca`): set, it turns on mutual TLS.
    pub(crate) client_ca: Option<PathBuf>,
    /// Most edge connections at once (`uplink.max_connections`); more are refused.
    pub(crate) max_connections: usize,
}

/// An object store URL: `file:///path`, `s3://bucket/prefix`, `memory://`. Validated for
/// shape here; the tiering work opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ObjectStoreUrl {
    pub(crate) url: String,
    /// The part before `://`, lowercased.
    pub(crate) scheme: String,
}

/// Object store URL schemes the node accepts.
const OBJECT_STORE_SCHEMES: &[&str] = &["file", "s3", "memory"];

/// A config value that does not come from the file: an env var or a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Override {
    /// Dotted path of the key, as in `log.budget_bytes`, `kafka.listen` or
    /// `topic_defaults.segment.bytes`.
    pub(crate) key: String,
    pub(crate) value: String,
    /// Where it was set, for error messages: `--set`, `SILT_NODE_ID`, ...
    pub(crate) origin: String,
}

/// Everything a config is resolved from.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    /// The config file, if any: its path and its text.
    pub(crate) file: Option<(PathBuf, String)>,
    /// Overrides, lowest precedence first.
    pub(crate) overrides: Vec<Override>,
}

/// A config that cannot be used, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    /// Dotted path of the key, or `None` for an error about the whole file.
    pub(crate) key: Option<String>,
    pub(crate) message: String,
    /// Where the bad value came from, when known.
    pub(crate) origin: Option<String>,
}

impl ConfigError {
    fn key(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            key: Some(key.to_string()),
            message: message.into(),
            origin: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "config key {key}: {}", self.message)?,
            None => write!(f, "config: {}", self.message)?,
        }
        if let Some(origin) = &self.origin {
            write!(f, " (from {origin})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Reads a config file, for [`Sources::file`].
pub(crate) fn read_file(path: &Path) -> Result<(PathBuf, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
        key: None,
        message: format!("cannot read config file {}: {error}", path.display()),
        origin: None,
    })?;
    Ok((path.to_path_buf(), text))
}

impl CoreConfig {
    /// Merges `sources` by precedence and validates the result.
    pub(crate) fn resolve(sources: &Sources) -> Result<Self, ConfigError> {
        let mut table = match &sources.file {
            Some((path, text)) => {
                toml::from_str::<toml::Table>(text).map_err(|error| ConfigError {
                    key: None,
                    message: format!("cannot parse {}: {error}", path.display()),
                    origin: None,
                })?
            }
            None => toml::Table::new(),
        };
        // Later overrides win; remember who set each key so errors can say so.
        let mut origins = BTreeMap::new();
        for item in &sources.overrides {
            let path = set_key(&mut table, &item.key, &item.value).map_err(|mut error| {
                error.origin = Some(item.origin.clone());
                error
            })?;
            origins.insert(path, item.origin.clone());
        }
        let file_origin = sources
            .file
            .as_ref()
            .map(|(path, _)| path.display().to_string());
        // An error may name a key inside the value an override set (a key
        // inside a table it set): the nearest enclosing key set by an override is the origin.
        let origin_of = |key: &str| {
            let mut key = key;
            loop {
                if let Some(origin) = origins.get(key) {
                    return Some(origin.clone());
                }
                match key.rfind(['.', '[']) {
                    Some(cut) => key = &key[..cut],
                    None => return file_origin.clone(),
                }
            }
        };

        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|error| {
                let key = error.path().to_string();
                ConfigError {
                    origin: origin_of(&key),
                    // The bare message: the path says where, better than toml's context.
                    message: error.into_inner().message().to_string(),
                    key: Some(key),
                }
            })?;
        raw.validate().map_err(|mut error| {
            error.origin = error.key.as_deref().and_then(origin_of);
            error
        })
    }

    /// The resolved config as TOML that [`CoreConfig::resolve`] reads back unchanged.
    pub(crate) fn to_toml(&self) -> String {
        let mut root = toml::Table::new();
        root.insert("node_id".into(), i64::from(self.node_id).into());
        root.insert(
            "data_dir".into(),
            self.log.data_dir.to_string_lossy().into_owned().into(),
        );
        root.insert("admin_listen".into(), self.admin_listen.to_string().into());

        let mut log = toml::Table::new();
        match self.log.flush {
            FlushPolicy::Durable => {
                log.insert("flush".into(), "durable".into());
            }
            FlushPolicy::RelaxedUnsafe { interval } => {
                log.insert("flush".into(), "relaxed-unsafe".into());
                log.insert("flush_interval_ms".into(), toml_int(interval.as_millis()));
            }
        }
        let (budget_bytes, budget_policy) = match self.log.budget {
            Some(budget) => (budget.bytes_max, budget.policy),
            None => (0, BudgetPolicy::default()),
        };
        log.insert("budget_bytes".into(), toml_int(budget_bytes));
        log.insert("budget_policy".into(), budget_policy.as_str().into());
        log.insert(
            "fs_reserve_bytes".into(),
            toml_int(self.log.fs_reserve_bytes),
        );
        log.insert("max_batch_bytes".into(), toml_int(self.log.max_batch_bytes));
        log.insert(
            "index_interval_bytes".into(),
            toml_int(self.log.index_interval_bytes),
        );
        log.insert(
            "retention_check_ms".into(),
            toml_int(self.retention_check.as_millis()),
        );
        root.insert("log".into(), log.into());
        let mut kafka = toml::Table::new();
        kafka.insert("listen".into(), self.kafka.listen.to_string().into());
        if let Some((host, port)) = &self.kafka.advertised_listener {
            kafka.insert(
                "advertised_listener".into(),
                format!("{host}:{port}").into(),
            );
        }
        kafka.insert(
            "default_partitions".into(),
            toml_int(self.kafka.default_partitions),
        );
        kafka.insert(
            "auto_create_topics".into(),
            self.kafka.auto_create_topics.into(),
        );
        kafka.insert(
            "max_request_bytes".into(),
            toml_int(self.kafka.max_request_bytes),
        );
        kafka.insert(
            "max_connections".into(),
            toml_int(self.kafka.max_connections),
        );
        kafka.insert(
            "queued_max_request_bytes".into(),
            toml_int(self.kafka.queued_max_request_bytes),
        );
        kafka.insert(
            "connections_max_idle_ms".into(),
            toml_int(self.kafka.connections_max_idle.as_millis()),
        );
        kafka.insert(
            "group_initial_rebalance_delay_ms".into(),
            toml_int(self.kafka.group_initial_rebalance_delay.as_millis()),
        );
        root.insert("kafka".into(), kafka.into());
        let mut uplink = toml::Table::new();
        uplink.insert("listen".into(), self.uplink.listen.to_string().into());
        uplink.insert(
            "tls_dir".into(),
            self.uplink.tls_dir.to_string_lossy().into_owned().into(),
        );
        if let Some((cert, key)) = &self.uplink.cert {
            uplink.insert("cert".into(), cert.to_string_lossy().into_owned().into());
            uplink.insert("key".into(), key.to_string_lossy().into_owned().into());
        }
        if let Some(ca) = &self.uplink.client_ca {
            uplink.insert("client_ca".into(), ca.to_string_lossy().into_owned().into());
        }
        uplink.insert(
            "max_connections".into(),
            toml_int(self.uplink.max_connections),
        );
        root.insert("uplink".into(), uplink.into());
        if let Some(store) = &self.object_store {
            root.insert("object_store".into(), store.url.clone().into());
        }
        let mut tiering = toml::Table::new();
        let settings = &self.tiering;
        tiering.insert(
            "object_bytes_target".into(),
            toml_int(settings.object_bytes_target),
        );
        tiering.insert("max_wait_ms".into(), toml_int(settings.max_wait_ms));
        tiering.insert(
            "check_interval_ms".into(),
            toml_int(settings.check_interval.as_millis()),
        );
        tiering.insert(
            "upload_concurrency".into(),
            toml_int(settings.upload_concurrency),
        );
        tiering.insert(
            "backpressure_percent".into(),
            toml_int(settings.backpressure_percent),
        );
        tiering.insert(
            "retry_initial_ms".into(),
            toml_int(settings.retry_initial.as_millis()),
        );
        tiering.insert(
            "retry_max_ms".into(),
            toml_int(settings.retry_max.as_millis()),
        );
        tiering.insert(
            "gc_interval_ms".into(),
            toml_int(settings.gc_interval.as_millis()),
        );
        tiering.insert("gc_grace_ms".into(), toml_int(settings.gc_grace_ms));
        tiering.insert("compact".into(), settings.compact.into());
        tiering.insert(
            "compact_small_bytes".into(),
            toml_int(settings.compact_small_bytes),
        );
        tiering.insert(
            "compact_min_age_ms".into(),
            toml_int(settings.compact_min_age_ms),
        );
        tiering.insert("zstd_level".into(), toml_int(settings.zstd_level));
        tiering.insert(
            "cold_cache_bytes".into(),
            toml_int(settings.cold.cache_bytes),
        );
        tiering.insert(
            "cold_open_objects".into(),
            toml_int(settings.cold.readers_max),
        );
        tiering.insert(
            "cold_prefetch_max".into(),
            toml_int(settings.cold.prefetch_max),
        );
        tiering.insert(
            "cold_replays_max".into(),
            toml_int(settings.cold.replays_max),
        );
        tiering.insert(
            "cold_decode_ahead_max".into(),
            toml_int(settings.cold.decode_ahead_max),
        );
        root.insert("tiering".into(), tiering.into());

        let topic_defaults: toml::Table = self
            .log
            .topic_defaults
            .to_map()
            .into_iter()
            .map(|(key, value)| {
                let value = match value.parse::<i64>() {
                    Ok(number) => toml::Value::Integer(number),
                    Err(_) => toml::Value::String(value),
                };
                (key, value)
            })
            .collect();
        root.insert("topic_defaults".into(), topic_defaults.into());
        toml::to_string(&root).expect("a table of strings and integers always serializes")
    }
}

/// Converts an in-memory count to a TOML integer; every count here was read from an `i64`.
fn toml_int(value: impl TryInto<i64>) -> toml::Value {
    toml::Value::Integer(
        value
            .try_into()
            .unwrap_or_else(|_| panic!("config values are parsed from i64 and fit one")),
    )
}

/// Sets the dotted `key` in `table` to the string `value`, returning the key's canonical path.
///
/// `SECTION.REST` addresses `REST` inside a section. In `[topic_defaults]`, `REST` is one key,
/// whole: `topic_defaults.segment.bytes` is the key `segment.bytes`, as Kafka's config names
/// contain dots. Elsewhere dots nest tables: `kafka.listen`.
fn set_key(table: &mut toml::Table, key: &str, value: &str) -> Result<String, ConfigError> {
    let path: Vec<&str> = match key.split_once('.') {
        Some(("topic_defaults", rest)) => vec!["topic_defaults", rest.trim_matches('"')],
        Some((section, rest)) if SECTIONS.contains(&section) => {
            std::iter::once(section).chain(rest.split('.')).collect()
        }
        _ => vec![key],
    };
    if path.iter().any(|name| name.is_empty()) {
        return Err(ConfigError::key(key, "empty key name"));
    }
    let canonical = path.join(".");
    let value = toml::Value::String(value.to_string());
    let Some((leaf, parents)) = path.split_last() else {
        return Err(ConfigError::key(key, "empty key name"));
    };
    let mut current = table;
    for (depth, name) in parents.iter().enumerate() {
        let entry = current
            .entry(*name)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(inner) = entry else {
            return Err(ConfigError::key(
                &path[..=depth].join("."),
                "expected a table",
            ));
        };
        current = inner;
    }
    current.insert(leaf.to_string(), value);
    Ok(canonical)
}

/// The config as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: Option<Scalar>,
    data_dir: Option<String>,
    admin_listen: Option<String>,
    object_store: Option<String>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    topic_defaults: BTreeMap<String, Scalar>,
    #[serde(default)]
    kafka: RawKafka,
    #[serde(default)]
    uplink: RawUplink,
    #[serde(default)]
    tiering: RawTiering,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTiering {
    object_bytes_target: Option<Scalar>,
    max_wait_ms: Option<Scalar>,
    check_interval_ms: Option<Scalar>,
    upload_concurrency: Option<Scalar>,
    backpressure_percent: Option<Scalar>,
    retry_initial_ms: Option<Scalar>,
    retry_max_ms: Option<Scalar>,
    gc_interval_ms: Option<Scalar>,
    gc_grace_ms: Option<Scalar>,
    compact: Option<Flag>,
    compact_small_bytes: Option<Scalar>,
    compact_min_age_ms: Option<Scalar>,
    zstd_level: Option<Scalar>,
    cold_cache_bytes: Option<Scalar>,
    cold_open_objects: Option<Scalar>,
    cold_prefetch_max: Option<Scalar>,
    cold_replays_max: Option<Scalar>,
    cold_decode_ahead_max: Option<Scalar>,
}

impl RawTiering {
    fn validate(self) -> Result<TieringConfig, ConfigError> {
        let mut tiering = TieringConfig::default();
        if let Some(value) = &self.object_bytes_target {
            tiering.object_bytes_target =
                value.bytes("tiering.object_bytes_target", 1, 16 << 30)?;
        }
        if let Some(value) = &self.max_wait_ms {
            tiering.max_wait_ms = value.integer("tiering.max_wait_ms", 0, u32::MAX.into())?;
        }
        if let Some(value) = &self.check_interval_ms {
            tiering.check_interval = Duration::from_millis(value.integer(
                "tiering.check_interval_ms",
                10,
                u32::MAX.into(),
            )?);
        }
        if let Some(value) = &self.upload_concurrency {
            let count = value.integer("tiering.upload_concurrency", 1, 64)?;
            tiering.upload_concurrency = usize::try_from(count).expect("at most 64");
        }
        if let Some(value) = &self.backpressure_percent {
            let percent = value.integer("tiering.backpressure_percent", 1, 100)?;
            tiering.backpressure_percent = u8::try_from(percent).expect("at most 100");
        }
        if let Some(value) = &self.retry_initial_ms {
            tiering.retry_initial = Duration::from_millis(value.integer(
                "tiering.retry_initial_ms",
                1,
                u32::MAX.into(),
            )?);
        }
        if let Some(value) = &self.retry_max_ms {
            tiering.retry_max =
                Duration::from_millis(value.integer("tiering.retry_max_ms", 1, u32::MAX.into())?);
        }
        if let Some(value) = &self.gc_interval_ms {
            tiering.gc_interval = Duration::from_millis(value.integer(
                "tiering.gc_interval_ms",
                10,
                u32::MAX.into(),
            )?);
        }
        if let Some(value) = &self.gc_grace_ms {
            tiering.gc_grace_ms = value.integer("tiering.gc_grace_ms", 0, u32::MAX.into())?;
        }
        if let Some(flag) = &self.compact {
            tiering.compact = flag.boolean("tiering.compact")?;
        }
        tiering.compact_small_bytes = match &self.compact_small_bytes {
            Some(value) => value.bytes(
                "tiering.compact_small_bytes",
                1,
                tiering.object_bytes_target,
            )?,
            None => tiering.object_bytes_target / defaults::TIERING_COMPACT_SMALL_DIVISOR,
        };
        if let Some(value) = &self.compact_min_age_ms {
            tiering.compact_min_age_ms =
                value.integer("tiering.compact_min_age_ms", 0, u32::MAX.into())?;
        }
        if let Some(value) = &self.zstd_level {
            let levels = silt_tiering::store::ZSTD_LEVELS;
            // Both ends are positive.
            let level = value.integer(
                "tiering.zstd_level",
                levels.start().unsigned_abs().into(),
                levels.end().unsigned_abs().into(),
            )?;
            tiering.zstd_level = i32::try_from(level).expect("at most 22");
        }
        // The cold reader. A cache of 0 bytes keeps only the row group read last (a read
        // elsewhere fetches its own); 0 prefetches turns prefetch off.
        if let Some(value) = &self.cold_cache_bytes {
            tiering.cold.cache_bytes = value.bytes("tiering.cold_cache_bytes", 0, 64 << 30)?;
        }
        if let Some(value) = &self.cold_open_objects {
            let count = value.integer("tiering.cold_open_objects", 1, 65_536)?;
            tiering.cold.readers_max = usize::try_from(count).expect("at most 65536");
        }
        if let Some(value) = &self.cold_prefetch_max {
            let count = value.integer("tiering.cold_prefetch_max", 0, 256)?;
            tiering.cold.prefetch_max = usize::try_from(count).expect("at most 256");
        }
        // Sequential replays kept between Fetches; 0 serves every cold Fetch on its own.
        if let Some(value) = &self.cold_replays_max {
            let count = value.integer("tiering.cold_replays_max", 0, 4096)?;
            tiering.cold.replays_max = usize::try_from(count).expect("at most 4096");
        }
        // Row groups decoded ahead of their replays, over all of them; 0 decodes on demand.
        if let Some(value) = &self.cold_decode_ahead_max {
            let count = value.integer("tiering.cold_decode_ahead_max", 0, 256)?;
            tiering.cold.decode_ahead_max = usize::try_from(count).expect("at most 256");
        }
        if tiering.retry_max < tiering.retry_initial {
            return Err(ConfigError::key(
                "tiering.retry_max_ms",
                format!(
                    "must be at least tiering.retry_initial_ms ({} ms)",
                    tiering.retry_initial.as_millis()
                ),
            ));
        }
        Ok(tiering)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    listen: Option<String>,
    advertised_listener: Option<String>,
    default_partitions: Option<Scalar>,
    auto_create_topics: Option<Flag>,
    max_request_bytes: Option<Scalar>,
    max_connections: Option<Scalar>,
    queued_max_request_bytes: Option<Scalar>,
    connections_max_idle_ms: Option<Scalar>,
    group_initial_rebalance_delay_ms: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    listen: Option<String>,
    tls_dir: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
    max_connections: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    flush: Option<String>,
    flush_interval_ms: Option<Scalar>,
    budget_bytes: Option<Scalar>,
    budget_policy: Option<String>,
    fs_reserve_bytes: Option<Scalar>,
    max_batch_bytes: Option<Scalar>,
    index_interval_bytes: Option<Scalar>,
    retention_check_ms: Option<Scalar>,
}

impl RawConfig {
    fn validate(self) -> Result<CoreConfig, ConfigError> {
        let node_id = match &self.node_id {
            Some(value) => {
                let id = value.integer("node_id", 0, i32::MAX as u64)?;
                i32::try_from(id).expect("checked against i32::MAX")
            }
            None => defaults::NODE_ID,
        };
        let data_dir = match self.data_dir {
            Some(dir) if dir.trim().is_empty() => {
                return Err(ConfigError::key("data_dir", "must not be empty"));
            }
            Some(dir) => PathBuf::from(dir),
            None => {
                return Err(ConfigError::key(
                    "data_dir",
                    "required: set it in the config file, with --data-dir or SILT_DATA_DIR",
                ));
            }
        };
        let admin_listen_text = self
            .admin_listen
            .as_deref()
            .unwrap_or(defaults::ADMIN_LISTEN);
        let admin_listen = socket_addr("admin_listen", admin_listen_text, "127.0.0.1:9645")?;
        let object_store = self
            .object_store
            .as_deref()
            .map(object_store_url)
            .transpose()?;

        let retention_check_ms = match &self.log.retention_check_ms {
            Some(value) => value.integer("log.retention_check_ms", 1, u32::MAX.into())?,
            None => defaults::RETENTION_CHECK_MS,
        };
        let mut log = LogConfig::new(data_dir);
        self.log.apply(&mut log)?;
        for (key, value) in &self.topic_defaults {
            let path = format!("topic_defaults.{key}");
            if !TOPIC_CONFIG_KEYS.contains(&key.as_str()) {
                return Err(ConfigError::key(
                    &path,
                    format!(
                        "unknown topic config; known: {}",
                        TOPIC_CONFIG_KEYS.join(", ")
                    ),
                ));
            }
            let text = value.to_string();
            log.topic_defaults.set(key, &text).map_err(|error| {
                ConfigError::key(&path, format!("{}, got {text:?}", error.reason))
            })?;
        }
        // With an archive, local data goes only once it is archived; drop-oldest would delete
        // segments the archive does not hold yet, while tiering's backpressure makes producers
        // wait instead.
        if object_store.is_some()
            && log
                .budget
                .is_some_and(|budget| budget.policy == BudgetPolicy::DropOldest)
        {
            return Err(ConfigError::key(
                "log.budget_policy",
                "drop-oldest would delete data not yet archived; with object_store set use \
                 reject (producers then get a retriable error while offload catches up)",
            ));
        }
        let kafka = self.kafka.validate()?;
        let tiering = self.tiering.validate()?;
        let uplink = UplinkConfig {
            listen: socket_addr(
                "uplink.listen",
                self.uplink
                    .listen
                    .as_deref()
                    .unwrap_or(defaults::UPLINK_LISTEN),
                "0.0.0.0:9093",
            )?,
            tls_dir: self
                .uplink
                .tls_dir
                .map_or_else(|| log.data_dir.join(TLS_DIR_NAME), PathBuf::from),
            cert: match (self.uplink.cert, self.uplink.key) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some((cert.into(), key.into())),
                (Some(_), None) => {
                    return Err(ConfigError::key("uplink.key", "required with uplink.cert"));
                }
                (None, Some(_)) => {
                    return Err(ConfigError::key("uplink.cert", "required with uplink.key"));
                }
            },
            client_ca: self.uplink.client_ca.map(PathBuf::from),
            max_connections: match &self.uplink.max_connections {
                Some(value) => value.integer("uplink.max_connections", 1, 1 << 20)?,
                None => defaults::UPLINK_MAX_CONNECTIONS,
            } as usize,
        };
        if uplink.tls_dir.starts_with(&log.data_dir)
            && uplink.tls_dir != log.data_dir.join(TLS_DIR_NAME)
        {
            return Err(ConfigError::key(
                "uplink.tls_dir",
                "must be <data_dir>/tls or outside data_dir: the log owns every other entry of its data directory",
            ));
        }
        Ok(CoreConfig {
            node_id,
            admin_listen,
            log,
            retention_check: Duration::from_millis(retention_check_ms),
            kafka,
            uplink,
            object_store,
            tiering,
        })
    }
}

impl RawKafka {
    fn validate(self) -> Result<KafkaConfig, ConfigError> {
        let listen = socket_addr(
            "kafka.listen",
            self.listen.as_deref().unwrap_or(defaults::KAFKA_LISTEN),
            "0.0.0.0:9092",
        )?;
        let advertised_listener = self
            .advertised_listener
            .as_deref()
            .map(host_port)
            .transpose()?;
        let default_partitions = match &self.default_partitions {
            Some(value) => value.integer(
                "kafka.default_partitions",
                1,
                u64::from(silt_log::PARTITIONS_MAX),
            )?,
            None => defaults::KAFKA_DEFAULT_PARTITIONS.into(),
        };
        let max_request_bytes = match &self.max_request_bytes {
            Some(value) => value.bytes("kafka.max_request_bytes", 1024, i32::MAX as u64)?,
            None => defaults::KAFKA_MAX_REQUEST_BYTES,
        };
        let max_connections = match &self.max_connections {
            Some(value) => value.integer("kafka.max_connections", 1, 1 << 20)?,
            None => defaults::KAFKA_MAX_CONNECTIONS,
        };
        let queued_max_request_bytes = match &self.queued_max_request_bytes {
            Some(value) => value.bytes("kafka.queued_max_request_bytes", 1024, 1 << 40)?,
            // Room for at least one request of the largest size the listener accepts.
            None => defaults::KAFKA_QUEUED_MAX_REQUEST_BYTES.max(max_request_bytes),
        };
        if queued_max_request_bytes < max_request_bytes {
            return Err(ConfigError::key(
                "kafka.queued_max_request_bytes",
                format!(
                    "{queued_max_request_bytes} is below kafka.max_request_bytes \
                     ({max_request_bytes}): a request of the largest size could never be read"
                ),
            ));
        }
        let idle_ms = match &self.connections_max_idle_ms {
            Some(value) => value.integer("kafka.connections_max_idle_ms", 100, u32::MAX.into())?,
            None => defaults::KAFKA_CONNECTIONS_MAX_IDLE_MS,
        };
        let auto_create_topics = match &self.auto_create_topics {
            Some(flag) => flag.boolean("kafka.auto_create_topics")?,
            None => defaults::KAFKA_AUTO_CREATE_TOPICS,
        };
        let delay_ms = match &self.group_initial_rebalance_delay_ms {
            Some(value) => {
                value.integer("kafka.group_initial_rebalance_delay_ms", 0, u32::MAX.into())?
            }
            None => defaults::KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS,
        };
        Ok(KafkaConfig {
            group_initial_rebalance_delay: Duration::from_millis(delay_ms),
            listen,
            advertised_listener,
            default_partitions: u32::try_from(default_partitions).expect("at most PARTITIONS_MAX"),
            auto_create_topics,
            max_request_bytes: u32::try_from(max_request_bytes).expect("at most i32::MAX"),
            max_connections: usize::try_from(max_connections).expect("at most 2^20"),
            queued_max_request_bytes: usize::try_from(queued_max_request_bytes)
                .unwrap_or(usize::MAX),
            connections_max_idle: Duration::from_millis(idle_ms),
        })
    }
}

fn socket_addr(key: &str, text: &str, example: &str) -> Result<SocketAddr, ConfigError> {
    text.parse::<SocketAddr>().map_err(|_| {
        ConfigError::key(
            key,
            format!("expected an IP address and port such as {example}, got {text:?}"),
        )
    })
}

/// `kafka.advertised_listener`: `host:port`, where host is a name or an IP address (IPv6 in
/// brackets), as clients will dial it.
fn host_port(text: &str) -> Result<(String, u16), ConfigError> {
    const KEY: &str = "kafka.advertised_listener";
    let bad = || {
        ConfigError::key(
            KEY,
            format!("expected HOST:PORT such as kafka.example.net:9092, got {text:?}"),
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']'));
    if !host_ok || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// `object_store`: `scheme://rest`, with a scheme the tiering work can open.
fn object_store_url(text: &str) -> Result<ObjectStoreUrl, ConfigError> {
    let bad = |why: &str| {
        ConfigError::key(
            "object_store",
            format!(
                "{why}: expected a URL such as file:///var/lib/silt-archive or s3://bucket/prefix, got {text:?}"
            ),
        )
    };
    let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let scheme = scheme.to_ascii_lowercase();
    if !OBJECT_STORE_SCHEMES.contains(&scheme.as_str()) {
        return Err(bad(&format!(
            "unknown scheme {scheme:?} (known: {})",
            OBJECT_STORE_SCHEMES.join(", ")
        )));
    }
    let needs_location = scheme != "memory";
    if needs_location && rest.trim_matches('/').is_empty() {
        return Err(bad("no bucket or path"));
    }
    if text.chars().any(char::is_whitespace) {
        return Err(bad("whitespace in the URL"));
    }
    Ok(ObjectStoreUrl {
        url: text.to_string(),
        scheme,
    })
}

impl RawLog {
    fn apply(self, log: &mut LogConfig) -> Result<(), ConfigError> {
        let relaxed = match self.flush.as_deref() {
            None | Some("durable") => false,
            Some("relaxed-unsafe") => true,
            Some(other) => {
                return Err(ConfigError::key(
                    "log.flush",
                    format!("expected durable or relaxed-unsafe, got {other:?}"),
                ));
            }
        };
        log.flush = match (relaxed, &self.flush_interval_ms) {
            (false, None) => FlushPolicy::Durable,
            (false, Some(_)) => {
                return Err(ConfigError::key(
                    "log.flush_interval_ms",
                    "only valid with log.flush = \"relaxed-unsafe\"",
                ));
            }
            (true, interval) => {
                let interval_ms = match interval {
                    Some(value) => value.integer("log.flush_interval_ms", 1, u32::MAX.into())?,
                    None => defaults::FLUSH_INTERVAL_MS,
                };
                FlushPolicy::RelaxedUnsafe {
                    interval: Duration::from_millis(interval_ms),
                }
            }
        };

        let policy = match self.budget_policy.as_deref() {
            Some(text) => BudgetPolicy::parse("log.budget_policy", text).map_err(|error| {
                ConfigError::key(
                    "log.budget_policy",
                    format!("{}, got {text:?}", error.reason),
                )
            })?,
            None => BudgetPolicy::default(),
        };
        let budget_bytes = match &self.budget_bytes {
            Some(value) => value.bytes("log.budget_bytes", 0, i64::MAX as u64)?,
            None => 0,
        };
        log.budget = (budget_bytes > 0).then_some(DiskBudget {
            bytes_max: budget_bytes,
            policy,
        });
        if let Some(value) = &self.fs_reserve_bytes {
            log.fs_reserve_bytes = value.bytes("log.fs_reserve_bytes", 0, i64::MAX as u64)?;
        }
        if let Some(value) = &self.max_batch_bytes {
            let bytes = value.bytes(
                "log.max_batch_bytes",
                MAX_BATCH_BYTES_MIN,
                SEGMENT_BYTES_MAX,
            )?;
            log.max_batch_bytes =
                usize::try_from(bytes).expect("at most i32::MAX, which fits usize on 32-bit ARM");
        }
        if let Some(value) = &self.index_interval_bytes {
            let bytes = value.bytes("log.index_interval_bytes", 1, SEGMENT_BYTES_MAX)?;
            log.index_interval_bytes = u32::try_from(bytes).expect("at most i32::MAX");
        }
        Ok(())
    }
}

/// A boolean written as TOML `true`/`false` or, from env vars and flags, as a string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flag {
    Bool(bool),
    Text(String),
}

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl Visitor<'_> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a boolean or a string")
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Flag, E> {
                Ok(Flag::Bool(value))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Flag, E> {
                Ok(Flag::Text(value.to_string()))
            }
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

impl Flag {
    fn boolean(&self, key: &str) -> Result<bool, ConfigError> {
        match self {
            Flag::Bool(value) => Ok(*value),
            Flag::Text(text) => match text.trim() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(ConfigError::key(
                    key,
                    format!("expected true or false, got {other:?}"),
                )),
            },
        }
    }
}

/// A number written as a TOML integer or as a string: env vars and flags are always strings,
/// and Kafka's topic configs are strings in Kafka's own tools.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scalar {
    Integer(i64),
    Text(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Integer(number) => write!(f, "{number}"),
            Scalar::Text(text) => f.write_str(text),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Scalar, E> {
                Ok(Scalar::Integer(value))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Scalar, E> {
                i64::try_from(value)
                    .map(Scalar::Integer)
                    .map_err(|_| E::custom(format!("{value} is too large")))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(value.to_string()))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

impl Scalar {
    /// A plain integer in `min..=max`.
    fn integer(&self, key: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let number = match self {
            Scalar::Integer(number) => u64::try_from(*number).ok(),
            Scalar::Text(text) => text.trim().parse::<u64>().ok(),
        };
        let number = number.ok_or_else(|| {
            ConfigError::key(
                key,
                format!(
                    "expected a non-negative integer, got {:?}",
                    self.to_string()
                ),
            )
        })?;
        in_range(key, number, min, max)
    }

    /// A byte count: an integer, or a string with a unit such as `"512MiB"` or `"2GB"`.
    fn bytes(&self, key: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let number = match self {
            Scalar::Integer(number) => u64::try_from(*number).ok(),
            Scalar::Text(text) => parse_byte_size(text),
        };
        let number = number.ok_or_else(|| {
            ConfigError::key(
                key,
                format!(
                    "expected a byte count such as 1048576, \"512MiB\" or \"2GiB\", got {:?}",
                    self.to_string()
                ),
            )
        })?;
        in_range(key, number, min, max)
    }
}

fn in_range(key: &str, number: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if !(min..=max).contains(&number) {
        return Err(ConfigError::key(
            key,
            format!("must be between {min} and {max}, got {number}"),
        ));
    }
    Ok(number)
}

/// Parses `"1048576"`, `"512MiB"`, `"2 GiB"`, `"10MB"`: binary units are powers of 1024,
/// decimal ones powers of 1000.
fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use silt_log::config::TopicConfig;

    fn file(text: &str) -> Sources {
        Sources {
            file: Some((PathBuf::from("/etc/silt/core.toml"), text.to_string())),
            overrides: Vec::new(),
        }
    }

    fn set(key: &str, value: &str, origin: &str) -> Override {
        Override {
            key: key.into(),
            value: value.into(),
            origin: origin.into(),
        }
    }

    fn error(sources: &Sources) -> String {
        CoreConfig::resolve(sources).unwrap_err().to_string()
    }

    #[test]
    fn defaults_need_only_a_data_dir() {
        let config = CoreConfig::resolve(&file("data_dir = \"/var/lib/silt\"")).unwrap();
        assert_eq!(config.node_id, 1);
        assert_eq!(config.admin_listen, "127.0.0.1:9645".parse().unwrap());
        assert_eq!(config.log, LogConfig::new("/var/lib/silt"));
        assert_eq!(config.log.topic_defaults, TopicConfig::default());
        assert_eq!(config.kafka.listen, "127.0.0.1:9092".parse().unwrap());
        assert_eq!(config.kafka.advertised_listener, None);
        assert_eq!(config.kafka.default_partitions, 1);
        assert!(config.kafka.auto_create_topics);
        assert_eq!(config.kafka.max_request_bytes, 100 << 20);
        assert_eq!(config.kafka.max_connections, 4096);
        assert_eq!(config.kafka.queued_max_request_bytes, 512 << 20);
        assert_eq!(config.kafka.connections_max_idle, Duration::from_secs(600));
        assert_eq!(config.uplink.listen, "0.0.0.0:9093".parse().unwrap());
        assert_eq!(config.object_store, None);
    }

    #[test]
    fn data_dir_is_required() {
        let message = error(&file(""));
        assert!(
            message.starts_with("config key data_dir: required"),
            "{message}"
        );
    }

    #[test]
    fn parses_every_key() {
        let config = CoreConfig::resolve(&file(
            r#"
            node_id = 3
            data_dir = "/var/lib/silt"
            admin_listen = "0.0.0.0:9000"
            object_store = "s3://archive/silt"
            [log]
            flush = "relaxed-unsafe"
            budget_bytes = "2GiB"
            [topic_defaults]
            "segment.bytes" = 1048576
            [kafka]
            listen = "0.0.0.0:19092"
            advertised_listener = "core-1.example.net:19092"
            default_partitions = 6
            auto_create_topics = false
            max_request_bytes = "1MiB"
            max_connections = 100
            queued_max_request_bytes = "4MiB"
            connections_max_idle_ms = 30000
            [uplink]
            listen = "[::]:9093"
            max_connections = 64
            "#,
        ))
        .unwrap();
        assert_eq!(config.node_id, 3);
        assert_eq!(config.admin_listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.object_store.unwrap().scheme, "s3");
        assert_eq!(config.log.budget.unwrap().bytes_max, 2 << 30);
        assert_eq!(config.log.topic_defaults.segment_bytes, 1 << 20);
        assert_eq!(config.kafka.listen, "0.0.0.0:19092".parse().unwrap());
        assert_eq!(
            config.kafka.advertised_listener,
            Some(("core-1.example.net".to_string(), 19092))
        );
        assert_eq!(config.kafka.default_partitions, 6);
        assert!(!config.kafka.auto_create_topics);
        assert_eq!(config.kafka.max_request_bytes, 1 << 20);
        assert_eq!(config.kafka.max_connections, 100);
        assert_eq!(config.kafka.queued_max_request_bytes, 4 << 20);
        assert_eq!(config.kafka.connections_max_idle, Duration::from_secs(30));
        assert_eq!(config.uplink.listen, "[::]:9093".parse().unwrap());
        assert_eq!(config.uplink.max_connections, 64);
    }

    #[test]
    fn the_request_memory_pool_holds_at_least_one_largest_request() {
        let config = CoreConfig::resolve(&file(
            "data_dir = \"/var/lib/silt\"\n[kafka]\nmax_request_bytes = \"1GiB\"",
        ))
        .unwrap();
        assert_eq!(config.kafka.queued_max_request_bytes, 1 << 30);
    }

    #[test]
    fn tiering_keys_are_parsed_validated_and_round_trip() {
        let config = CoreConfig::resolve(&file(
            r#"
            data_dir = "/var/lib/silt"
            [tiering]
            object_bytes_target = "64MiB"
            max_wait_ms = 60000
            check_interval_ms = 500
            upload_concurrency = 4
            backpressure_percent = 80
            retry_initial_ms = 100
            retry_max_ms = 5000
            "#,
        ))
        .unwrap();
        assert_eq!(config.tiering.object_bytes_target, 64 << 20);
        assert_eq!(config.tiering.max_wait_ms, 60_000);
        assert_eq!(config.tiering.check_interval, Duration::from_millis(500));
        assert_eq!(config.tiering.upload_concurrency, 4);
        assert_eq!(config.tiering.backpressure_percent, 80);
        assert_eq!(config.tiering.retry_max, Duration::from_secs(5));
        let again = CoreConfig::resolve(&file(&config.to_toml())).unwrap();
        assert_eq!(again, config);
        let defaults = CoreConfig::resolve(&file("data_dir = \"/d\"")).unwrap();
        assert_eq!(defaults.tiering, TieringConfig::default());

        let mut sources = file("data_dir = \"/d\"");
        sources.overrides.push(set(
            "tiering.upload_concurrency",
            "0",
            "--set tiering.upload_concurrency",
        ));
        let message = error(&sources);
        assert!(
            message.starts_with("config key tiering.upload_concurrency: must be between 1 and 64"),
            "{message}"
        );
        let message = error(&file(
            "data_dir = \"/d\"\n[tiering]\nbackpressure_ratio = 1",
        ));
        assert!(
            message.starts_with("config key tiering.backpressure_ratio: unknown field"),
            "{message}"
        );
        let message = error(&file(
            "data_dir = \"/d\"\n[tiering]\nretry_initial_ms = 10\nretry_max_ms = 5",
        ));
        assert!(
            message.starts_with("config key tiering.retry_max_ms: must be at least"),
            "{message}"
        );
    }

    #[test]
    fn compaction_keys_default_from_the_target_and_are_checked() {
        let config = CoreConfig::resolve(&file(
            "data_dir = \"/d\"\n[tiering]\nobject_bytes_target = \"64MiB\"",
        ))
        .unwrap();
        assert!(config.tiering.compact);
        assert_eq!(config.tiering.compact_small_bytes, 16 << 20, "a quarter");
        assert_eq!(config.tiering.compact_min_age_ms, 3_600_000);
        let config = CoreConfig::resolve(&file(
            "data_dir = \"/d\"\n[tiering]\ncompact = false\ncompact_small_bytes = \"1MiB\"\ncompact_min_age_ms = 0",
        ))
        .unwrap();
        assert!(!config.tiering.compact);
        assert_eq!(config.tiering.compact_small_bytes, 1 << 20);
        assert_eq!(config.tiering.compact_min_age_ms, 0);
        assert_eq!(
            CoreConfig::resolve(&file(&config.to_toml())).unwrap(),
            config
        );
        let message = error(&file(
            "data_dir = \"/d\"\n[tiering]\nobject_bytes_target = 1000\ncompact_small_bytes = 1001",
        ));
        assert!(
            message
                .starts_with("config key tiering.compact_small_bytes: must be between 1 and 1000"),
            "{message}"
        );
    }

    #[test]
    fn the_archive_zstd_level_defaults_to_1_and_is_checked() {
        let config = CoreConfig::resolve(&file("data_dir = \"/d\"")).unwrap();
        assert_eq!(config.tiering.zstd_level, 1);
        let config =
            CoreConfig::resolve(&file("data_dir = \"/d\"\n[tiering]\nzstd_level = 9")).unwrap();
        assert_eq!(config.tiering.zstd_level, 9);
        assert_eq!(
            CoreConfig::resolve(&file(&config.to_toml())).unwrap(),
            config
        );
        for bad in ["0", "23", "-1", "\"fast\""] {
            let message = error(&file(&format!(
                "data_dir = \"/d\"\n[tiering]\nzstd_level = {bad}"
            )));
            assert!(
                message.starts_with("config key tiering.zstd_level:"),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn cold_reader_keys_are_parsed_validated_and_round_trip() {
        let config = CoreConfig::resolve(&file(
            r#"
            data_dir = "/var/lib/silt"
            [tiering]
            cold_cache_bytes = "1GiB"
            cold_open_objects = 16
            cold_prefetch_max = 0
            cold_replays_max = 3
            cold_decode_ahead_max = 0
            "#,
        ))
        .unwrap();
        assert_eq!(
            config.tiering.cold,
            silt_tiering::ColdConfig {
                cache_bytes: 1 << 30,
                readers_max: 16,
                prefetch_max: 0,
                replays_max: 3,
                decode_ahead_max: 0,
            }
        );
        let again = CoreConfig::resolve(&file(&config.to_toml())).unwrap();
        assert_eq!(again, config);
        let defaults = CoreConfig::resolve(&file("data_dir = \"/d\"")).unwrap();
        assert_eq!(defaults.tiering.cold, silt_tiering::ColdConfig::BUILT_IN);

        let mut sources = file("data_dir = \"/d\"");
        sources.overrides.push(set(
            "tiering.cold_open_objects",
            "0",
            "--set tiering.cold_open_objects",
        ));
        let message = error(&sources);
        assert!(
            message.starts_with("config key tiering.cold_open_objects: must be between 1 and"),
            "{message}"
        );
        let message = error(&file(
            "data_dir = \"/d\"\n[tiering]\ncold_cache_bytes = \"lots\"",
        ));
        assert!(
            message.starts_with("config key tiering.cold_cache_bytes:"),
            "{message}"
        );
        let message = error(&file(
            "data_dir = \"/d\"\n[tiering]\ncold_prefetch_max = 1000",
        ));
        assert!(
            message.starts_with("config key tiering.cold_prefetch_max: must be between 0 and 256"),
            "{message}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let message = error(&file("data_dir = \"/d\"\ndata_dri = \"/e\""));
        assert!(
            message.starts_with("config key data_dri: unknown field `data_dri`"),
            "{message}"
        );
        assert!(message.ends_with("(from /etc/silt/core.toml)"), "{message}");
        let message = error(&file("data_dir = \"/d\"\n[kafka]\nport = 1"));
        assert!(
            message.starts_with("config key kafka.port: unknown field `port`"),
            "{message}"
        );
        let message = error(&file("data_dir = \"/d\"\n[mqtt]\nlisten = \"x\""));
        assert!(
            message.starts_with("config key mqtt: unknown field `mqtt`"),
            "{message}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "node_id = -1",
                "config key node_id: expected a non-negative integer",
            ),
            (
                "node_id = \"one\"",
                "config key node_id: expected a non-negative integer",
            ),
            (
                "admin_listen = \"localhost\"",
                "config key admin_listen: expected an IP address and port",
            ),
            (
                "object_store = \"/var/archive\"",
                "config key object_store: no scheme",
            ),
            (
                "object_store = \"ftp://host/x\"",
                "config key object_store: unknown scheme \"ftp\"",
            ),
            (
                "object_store = \"s3://\"",
                "config key object_store: no bucket",
            ),
            (
                "[kafka]\nlisten = \"9092\"",
                "config key kafka.listen: expected an IP address and port",
            ),
            (
                "[kafka]\nadvertised_listener = \"host\"",
                "config key kafka.advertised_listener: expected HOST:PORT",
            ),
            (
                "[kafka]\ndefault_partitions = 0",
                "config key kafka.default_partitions: must be between 1 and",
            ),
            (
                "[kafka]\nauto_create_topics = \"yes\"",
                "config key kafka.auto_create_topics: expected true or false, got \"yes\"",
            ),
            (
                "[uplink]\nlisten = \"quic\"",
                "config key uplink.listen: expected an IP address and port",
            ),
            (
                "[kafka]\nmax_request_bytes = \"1GiB\"\nqueued_max_request_bytes = \"512MiB\"",
                "config key kafka.queued_max_request_bytes: 536870912 is below kafka.max_request_bytes (1073741824)",
            ),
            (
                "[kafka]\nconnections_max_idle_ms = 10",
                "config key kafka.connections_max_idle_ms: must be between 100 and",
            ),
            (
                "[kafka]\nmax_connections = 0",
                "config key kafka.max_connections: must be between 1 and",
            ),
            (
                "[kafka]\nqueued_max_request_bytes = \"64MiB\"",
                "config key kafka.queued_max_request_bytes: 67108864 is below kafka.max_request_bytes (104857600)",
            ),
            (
                "[uplink]\nmax_connections = 0",
                "config key uplink.max_connections: must be between 1 and",
            ),
            (
                "[topic_defaults]\n\"cleanup.policy\" = \"compact\"",
                "config key topic_defaults.cleanup.policy: compaction is not supported",
            ),
            (
                "object_store = \"memory://\"\n[log]\nbudget_bytes = 1000000\nbudget_policy = \"drop-oldest\"",
                "config key log.budget_policy: drop-oldest would delete data not yet archived",
            ),
        ];
        for (text, expected) in cases {
            let message = error(&file(&format!("data_dir = \"/d\"\n{text}")));
            assert!(message.starts_with(expected), "{text}: {message}");
        }
    }

    #[test]
    fn overrides_win_over_the_file_in_order() {
        let mut sources = file(
            "data_dir = \"/from-file\"\nnode_id = 2\n[kafka]\ndefault_partitions = 3\nlisten = \"127.0.0.1:1\"",
        );
        sources.overrides = vec![
            set("node_id", "5", "SILT_NODE_ID"),
            set(
                "kafka.default_partitions",
                "4",
                "SILT_KAFKA__DEFAULT_PARTITIONS",
            ),
            set("node_id", "7", "--node-id"),
            set("kafka.auto_create_topics", "false", "--set"),
            set("topic_defaults.\"retention.ms\"", "-1", "--set"),
        ];
        let config = CoreConfig::resolve(&sources).unwrap();
        assert_eq!(config.node_id, 7);
        assert_eq!(config.log.data_dir, PathBuf::from("/from-file"));
        assert_eq!(config.kafka.default_partitions, 4);
        assert_eq!(config.kafka.listen, "127.0.0.1:1".parse().unwrap());
        assert!(!config.kafka.auto_create_topics);
        assert_eq!(config.log.topic_defaults.retention_ms, None);

        sources.overrides = vec![set("kafka.listen", "nowhere", "--kafka-listen")];
        assert_eq!(
            error(&sources),
            "config key kafka.listen: expected an IP address and port such as 0.0.0.0:9092, \
             got \"nowhere\" (from --kafka-listen)"
        );
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let config = CoreConfig::resolve(&file(
            "data_dir = \"/d\"\nobject_store = \"file:///archive\"\n[log]\nflush = \"relaxed-unsafe\"\n[kafka]\nadvertised_listener = \"h:1\"\n[topic_defaults]\n\"retention.bytes\" = 77",
        ))
        .unwrap();
        let printed = config.to_toml();
        let reread = CoreConfig::resolve(&file(&printed)).unwrap();
        assert_eq!(reread, config, "{printed}");
        let plain = CoreConfig::resolve(&file("data_dir = \"/d\"")).unwrap();
        assert_eq!(CoreConfig::resolve(&file(&plain.to_toml())).unwrap(), plain);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_byte_size("10MB"), Some(10_000_000));
        assert_eq!(parse_byte_size("1.5GiB"), None);
    }
}
