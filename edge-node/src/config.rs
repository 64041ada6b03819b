//! The edge node's configuration: one TOML file, overridden by `SILT_*` env vars and flags,
//! parsed into a raw serde struct and validated into [`EdgeConfig`].
//!
//! Precedence, lowest first: defaults, the file, env vars, flags. Every source is turned into
//! one TOML table before anything is validated, so a key means the same thing and is checked
//! the same way wherever it came from, and every error names the key (and where its value came
//! from, when that was not the file).
//!
//! Defaults live in [`defaults`] (and `mqtt::defaults`) for the keys the edge owns, in
//! `silt_log::config` for the log's and in `silt_gateways::mqtt::server::Limits` for the
//! broker's limits, so each has one home.
//!
//! The `[mqtt]` section lives in [`mqtt`]. No `mqtt.listen` and no `mqtt.tls_listen` means no
//! broker: the node then only keeps its log, as before MQTT existed.

mod mqtt;
mod uplink;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use silt_log::config::{
    BudgetPolicy, DiskBudget, FlushPolicy, LogConfig, PREALLOCATE_BYTES_MAX, SEGMENT_BYTES_MAX,
    TOPIC_CONFIG_KEYS,
};

pub(crate) use self::mqtt::{MqttConfig, MqttTls, TlsClientAuth};
pub(crate) use self::uplink::UplinkConfig;

/// Defaults of the keys the edge itself owns; the log's come from `silt_log::config`.
pub(crate) mod defaults {
    /// The admin (metrics and health) listener: loopback only, so nothing is exposed unless an
    /// operator says so.
    pub(crate) const ADMIN_LISTEN: &str = "127.0.0.1:9644";
    /// How often `relaxed-unsafe` mode fsyncs.
    pub(crate) const FLUSH_INTERVAL_MS: u64 = 1000;
    /// The node id when none is configured and the hostname is unusable.
    pub(crate) const NODE_ID: &str = "edge";
    /// How often retention runs over every partition: often enough that a size limit is
    /// kept within a few seconds' ingest, rarely enough to cost nothing.
    pub(crate) const RETENTION_CHECK_MS: u64 = 30_000;
    /// Zero-filled headroom kept ahead of each active segment (`log.preallocate_bytes`): the
    /// edge is latency-bound (every PUBACK waits for an fdatasync), and an fdatasync that
    /// only overwrites preallocated blocks skips the filesystem's journal commit. 1 MiB is a
    /// few hundred group commits at the benchmark's rate, and at most 2 MiB of disk per
    /// partition.
    pub(crate) const PREALLOCATE_BYTES: u64 = 1 << 20;
}

/// How the edge compresses: its log's batches at rest (`log.compression`), and what the
/// uplink ships (`uplink.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// zstd at `level` (`<section>.compression_level`, default 1). Level 1: about 2x on sensor
    /// JSON for about 2 us of edge CPU per 700-byte record. The fast levels (-1 to -7) trade
    /// ratio for CPU; higher levels the other way round.
    Zstd { level: i32 },
    /// None: no compression CPU, twice the bytes. For the uplink, a LAN or the same host,
    /// where the link is faster than zstd.
    None,
}

impl Compression {
    fn name(self) -> &'static str {
        match self {
            Compression::Zstd { .. } => "zstd",
            Compression::None => "none",
        }
    }

    /// `<section>.compression` and `<section>.compression_level`: zstd at level 1 unless
    /// said otherwise, the level one of `silt_wire::ZSTD_LEVELS` and only with zstd.
    fn parse(
        section: &str,
        compression: Option<&str>,
        level: Option<&Scalar>,
    ) -> Result<Compression, ConfigError> {
        let level_key = format!("{section}.compression_level");
        let level_value = match level {
            None => silt_wire::ZSTD_LEVEL,
            Some(level) => {
                let levels = silt_wire::ZSTD_LEVELS;
                let level = level.signed(
                    &level_key,
                    i64::from(*levels.start()),
                    i64::from(*levels.end()),
                )?;
                i32::try_from(level).expect("within the zstd levels")
            }
        };
        match compression.map(str::trim) {
            None | Some("zstd") => Ok(Compression::Zstd { level: level_value }),
            Some("none") if level.is_some() => Err(ConfigError::key(
                &level_key,
                format!("applies to zstd only, and {section}.compression is \"none\""),
            )),
            Some("none") => Ok(Compression::None),
            Some(other) => Err(ConfigError::key(
                &format!("{section}.compression"),
                format!("expected \"zstd\" or \"none\", got {other:?}"),
            )),
        }
    }
}

/// Prints `compression` as its section's `compression` and `compression_level` keys.
fn put_compression(table: &mut toml::Table, compression: Compression) {
    table.insert("compression".into(), compression.name().into());
    if let Compression::Zstd { level } = compression {
        table.insert("compression_level".into(), i64::from(level).into());
    }
}

/// Longest node id: it travels in every uplink idempotency key.
pub(crate) const NODE_ID_LEN_MAX: usize = 64;
/// Smallest `log.max_batch_bytes`: the 61-byte header of a RecordBatch v2 with no records.
const MAX_BATCH_BYTES_MIN: u64 = 61;

/// Tables of the config file; `--set SECTION.KEY=VALUE` addresses a key inside one.
const SECTIONS: &[&str] = &["log", "topic_defaults", "mqtt", "uplink"];

/// A validated edge node configuration.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EdgeConfig {
    /// This node's name, unique among the edges of one core cluster.
    pub(crate) node_id: String,
    /// Where the admin server (metrics, health) will listen.
    pub(crate) admin_listen: SocketAddr,
    /// The local log, including the data directory.
    pub(crate) log: LogConfig,
    /// How often retention runs (`log.retention_check_ms`).
    pub(crate) retention_check: Duration,
    /// How ingest compresses the batches it writes (`log.compression`, zstd level 1 by
    /// default; small batches are stored uncompressed).
    pub(crate) log_compression: Compression,
    /// The MQTT broker; off unless a listener is configured.
    pub(crate) mqtt: MqttConfig,
    /// The uplink to the core; off unless `uplink.addr` is set.
    pub(crate) uplink: Option<UplinkConfig>,
}

/// A config value that does not come from the file: an env var or a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Override {
    /// Dotted path of the key, as in `log.budget_bytes`, `mqtt.limits.max_packet_bytes` or
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
    /// The machine's hostname: the default node id.
    pub(crate) hostname: Option<String>,
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

/// The hostname, from the kernel; `None` where there is no `/proc` or it says nothing.
pub(crate) fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

impl EdgeConfig {
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
        // An error may name a key inside the value an override set (`mqtt.routes[2].key`
        // inside `mqtt.routes`): the nearest enclosing key set by an override is the origin.
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
        raw.validate(sources.hostname.as_deref())
            .map_err(|mut error| {
                error.origin = error.key.as_deref().and_then(origin_of);
                error
            })
    }

    /// The resolved config as TOML that [`EdgeConfig::resolve`] reads back unchanged.
    pub(crate) fn to_toml(&self) -> String {
        let mut root = toml::Table::new();
        root.insert("node_id".into(), self.node_id.clone().into());
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
            "preallocate_bytes".into(),
            toml_int(self.log.preallocate_bytes),
        );
        log.insert(
            "retention_check_ms".into(),
            toml_int(self.retention_check.as_millis()),
        );
        put_compression(&mut log, self.log_compression);
        root.insert("log".into(), log.into());
        root.insert("mqtt".into(), self.mqtt.to_toml().into());
        root.insert(
            "uplink".into(),
            uplink::to_toml(self.uplink.as_ref()).into(),
        );

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
/// contain dots. Elsewhere dots nest tables: `mqtt.limits.max_packet_bytes`. `mqtt.routes`,
/// a list of tables, takes its value as a TOML inline array.
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
    let value = if canonical == "mqtt.routes" {
        mqtt::parse_routes_override(value)?
    } else {
        toml::Value::String(value.to_string())
    };
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
    node_id: Option<String>,
    data_dir: Option<String>,
    admin_listen: Option<String>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    topic_defaults: BTreeMap<String, Scalar>,
    #[serde(default)]
    mqtt: mqtt::RawMqtt,
    #[serde(default)]
    uplink: uplink::RawUplink,
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
    preallocate_bytes: Option<Scalar>,
    retention_check_ms: Option<Scalar>,
    compression: Option<String>,
    compression_level: Option<Scalar>,
}

impl RawConfig {
    fn validate(self, hostname: Option<&str>) -> Result<EdgeConfig, ConfigError> {
        let node_id = match self.node_id {
            Some(node_id) => {
                check_node_id(&node_id).map_err(|message| ConfigError::key("node_id", message))?;
                node_id
            }
            None => hostname
                .filter(|name| check_node_id(name).is_ok())
                .unwrap_or(defaults::NODE_ID)
                .to_string(),
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
        let admin_listen = admin_listen_text.parse::<SocketAddr>().map_err(|_| {
            ConfigError::key(
                "admin_listen",
                format!("expected an IP address and port such as 127.0.0.1:9644, got {admin_listen_text:?}"),
            )
        })?;

        let retention_check_ms = match &self.log.retention_check_ms {
            Some(value) => value.integer("log.retention_check_ms", 1, u32::MAX.into())?,
            None => defaults::RETENTION_CHECK_MS,
        };
        let log_compression = Compression::parse(
            "log",
            self.log.compression.as_deref(),
            self.log.compression_level.as_ref(),
        )?;
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
        let mqtt = self.mqtt.validate(&mqtt::Context {
            data_dir: &log.data_dir,
            admin_listen,
            max_batch_bytes: log.max_batch_bytes,
        })?;
        let uplink = self.uplink.validate(&log.data_dir)?;
        Ok(EdgeConfig {
            node_id,
            admin_listen,
            log,
            retention_check: Duration::from_millis(retention_check_ms),
            log_compression,
            mqtt,
            uplink,
        })
    }
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
        log.preallocate_bytes = match &self.preallocate_bytes {
            Some(value) => value.bytes("log.preallocate_bytes", 0, PREALLOCATE_BYTES_MAX)?,
            None => defaults::PREALLOCATE_BYTES,
        };
        Ok(())
    }
}

/// Checks a node id: short, and safe in paths, metric labels and log lines.
fn check_node_id(node_id: &str) -> Result<(), String> {
    let valid_chars = node_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if node_id.is_empty() || node_id.len() > NODE_ID_LEN_MAX || !valid_chars {
        return Err(format!(
            "expected 1 to {NODE_ID_LEN_MAX} characters from A-Z, a-z, 0-9, '-', '_' and '.', got {node_id:?}"
        ));
    }
    Ok(())
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

    /// An integer in `min..=max` that may be negative.
    fn signed(&self, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let number = match self {
            Scalar::Integer(number) => Some(*number),
            Scalar::Text(text) => text.trim().parse::<i64>().ok(),
        };
        let number = number.ok_or_else(|| {
            ConfigError::key(
                key,
                format!("expected an integer, got {:?}", self.to_string()),
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

fn in_range<T: PartialOrd + Copy + fmt::Display>(
    key: &str,
    number: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
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
    use silt_log::config::{
        FS_RESERVE_BYTES_DEFAULT, INDEX_INTERVAL_BYTES_DEFAULT, MAX_BATCH_BYTES_DEFAULT,
        TopicConfig,
    };

    fn file(text: &str) -> Sources {
        Sources {
            file: Some((PathBuf::from("/etc/silt/edge.toml"), text.to_string())),
            overrides: Vec::new(),
            hostname: Some("pi-7".into()),
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
        EdgeConfig::resolve(sources).unwrap_err().to_string()
    }

    #[test]
    fn defaults_need_only_a_data_dir() {
        let config = EdgeConfig::resolve(&file("data_dir = \"/var/lib/silt\"")).unwrap();
        assert_eq!(
            config.node_id, "pi-7",
            "the hostname is the default node id"
        );
        assert_eq!(config.admin_listen, "127.0.0.1:9644".parse().unwrap());
        let mut log = LogConfig::new("/var/lib/silt");
        log.preallocate_bytes = defaults::PREALLOCATE_BYTES;
        assert_eq!(config.log, log, "the log's defaults, with preallocation on");
        assert_eq!(config.log.preallocate_bytes, 1 << 20);
        assert_eq!(config.log.flush, FlushPolicy::Durable);
        assert_eq!(config.log.budget, None);
        assert_eq!(config.log.fs_reserve_bytes, FS_RESERVE_BYTES_DEFAULT);
        assert_eq!(config.log.max_batch_bytes, MAX_BATCH_BYTES_DEFAULT);
        assert_eq!(
            config.log.index_interval_bytes,
            INDEX_INTERVAL_BYTES_DEFAULT
        );
        assert_eq!(config.log.topic_defaults, TopicConfig::default());

        let mut sources = file("data_dir = \"/d\"");
        sources.hostname = None;
        assert_eq!(EdgeConfig::resolve(&sources).unwrap().node_id, "edge");
        sources.hostname = Some("weird host!".into());
        assert_eq!(EdgeConfig::resolve(&sources).unwrap().node_id, "edge");
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
        let config = EdgeConfig::resolve(&file(
            r#"
            node_id = "edge-1"
            data_dir = "/var/lib/silt"
            admin_listen = "0.0.0.0:9000"
            [log]
            flush = "relaxed-unsafe"
            flush_interval_ms = 250
            budget_bytes = "2GiB"
            budget_policy = "drop-oldest"
            fs_reserve_bytes = "512MiB"
            max_batch_bytes = 65536
            index_interval_bytes = "1KiB"
            preallocate_bytes = "4MiB"
            [topic_defaults]
            "segment.bytes" = 1048576
            "retention.ms" = "-1"
            "local.retention.bytes" = 4096
            "#,
        ))
        .unwrap();
        assert_eq!(config.node_id, "edge-1");
        assert_eq!(config.admin_listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.log.data_dir, PathBuf::from("/var/lib/silt"));
        assert_eq!(
            config.log.flush,
            FlushPolicy::RelaxedUnsafe {
                interval: Duration::from_millis(250)
            }
        );
        assert_eq!(
            config.log.budget,
            Some(DiskBudget {
                bytes_max: 2 << 30,
                policy: BudgetPolicy::DropOldest
            })
        );
        assert_eq!(config.log.fs_reserve_bytes, 512 << 20);
        assert_eq!(config.log.max_batch_bytes, 65536);
        assert_eq!(config.log.index_interval_bytes, 1024);
        assert_eq!(config.log.preallocate_bytes, 4 << 20);
        assert_eq!(config.log.topic_defaults.segment_bytes, 1 << 20);
        assert_eq!(config.log.topic_defaults.retention_ms, None);
        assert_eq!(
            config.log.topic_defaults.local_retention_bytes,
            Some(Some(4096))
        );
    }

    #[test]
    fn relaxed_flush_has_a_default_interval_and_durable_refuses_one() {
        let config = EdgeConfig::resolve(&file(
            "data_dir = \"/d\"\n[log]\nflush = \"relaxed-unsafe\"",
        ))
        .unwrap();
        assert_eq!(
            config.log.flush,
            FlushPolicy::RelaxedUnsafe {
                interval: Duration::from_millis(defaults::FLUSH_INTERVAL_MS)
            }
        );
        let message = error(&file("data_dir = \"/d\"\n[log]\nflush_interval_ms = 5"));
        assert!(
            message.starts_with("config key log.flush_interval_ms: only valid with"),
            "{message}"
        );
    }

    #[test]
    fn log_compression_is_zstd_by_default_and_can_be_changed_or_turned_off() {
        let config = EdgeConfig::resolve(&file("data_dir = \"/d\"")).unwrap();
        assert_eq!(
            config.log_compression,
            Compression::Zstd {
                level: silt_wire::ZSTD_LEVEL
            }
        );
        for (section, expected) in [
            ("compression = \"none\"", Compression::None),
            ("compression_level = -3", Compression::Zstd { level: -3 }),
        ] {
            let config =
                EdgeConfig::resolve(&file(&format!("data_dir = \"/d\"\n[log]\n{section}")))
                    .unwrap();
            assert_eq!(config.log_compression, expected, "{section}");
            // The printed config reads back the same.
            let printed = EdgeConfig::resolve(&file(&config.to_toml())).unwrap();
            assert_eq!(printed, config, "{section}");
        }
        for (section, expected) in [
            (
                "compression = \"lz4\"",
                "config key log.compression: expected \"zstd\" or \"none\", got \"lz4\"",
            ),
            (
                "compression = \"none\"\ncompression_level = 3",
                "config key log.compression_level: applies to zstd only",
            ),
            (
                "compression_level = 20",
                "config key log.compression_level: must be between",
            ),
        ] {
            let message = error(&file(&format!("data_dir = \"/d\"\n[log]\n{section}")));
            assert!(message.starts_with(expected), "{section}: {message}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let message = error(&file("data_dir = \"/d\"\ndata_dri = \"/e\""));
        assert!(
            message.starts_with("config key data_dri: unknown field `data_dri`"),
            "{message}"
        );
        assert!(message.ends_with("(from /etc/silt/edge.toml)"), "{message}");

        let message = error(&file("data_dir = \"/d\"\n[log]\nbudget_byte = 1"));
        assert!(
            message.starts_with("config key log.budget_byte: unknown field"),
            "{message}"
        );

        let message = error(&file(
            "data_dir = \"/d\"\n[topic_defaults]\n\"segment.byte\" = 1",
        ));
        assert!(
            message.starts_with("config key topic_defaults.segment.byte: unknown topic config"),
            "{message}"
        );

        let message = error(&file("data_dir = \"/d\"\n[mqtt]\nport = 1"));
        assert!(
            message.starts_with("config key mqtt.port: unknown field `port`"),
            "{message}"
        );
        let message = error(&file("data_dir = \"/d\"\n[mqtt.limits]\nmax_packets = 1"));
        assert!(
            message.starts_with("config key mqtt.limits.max_packets: unknown field"),
            "{message}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "[log]\nbudget_policy = \"foo\"",
                "config key log.budget_policy: expected reject or drop-oldest, got \"foo\"",
            ),
            (
                "[log]\nflush = \"sometimes\"",
                "config key log.flush: expected durable or relaxed-unsafe, got \"sometimes\"",
            ),
            (
                "[log]\nbudget_bytes = \"2 parsecs\"",
                "config key log.budget_bytes: expected a byte count",
            ),
            (
                "[log]\nbudget_bytes = -5",
                "config key log.budget_bytes: expected a byte count",
            ),
            (
                "[log]\nmax_batch_bytes = 10",
                "config key log.max_batch_bytes: must be between 61 and 2147483647, got 10",
            ),
            (
                "[log]\npreallocate_bytes = \"1GiB\"",
                "config key log.preallocate_bytes: must be between 0 and 67108864, got 1073741824",
            ),
            (
                "[log]\nfs_reserve_bytes = true",
                "config key log.fs_reserve_bytes: invalid type: boolean `true`, expected an integer or a string",
            ),
            (
                "admin_listen = \"localhost\"",
                "config key admin_listen: expected an IP address and port",
            ),
            (
                "node_id = \"a b\"",
                "config key node_id: expected 1 to 64 characters",
            ),
            (
                "node_id = 7",
                "config key node_id: invalid type: integer `7`",
            ),
            (
                "[topic_defaults]\n\"segment.bytes\" = 0",
                "config key topic_defaults.segment.bytes: must be between 14 and 2147483647, got \"0\"",
            ),
            (
                "[topic_defaults]\n\"cleanup.policy\" = \"compact\"",
                "config key topic_defaults.cleanup.policy: compaction is not supported",
            ),
        ];
        for (text, expected) in cases {
            let message = error(&file(&format!("data_dir = \"/d\"\n{text}")));
            assert!(message.starts_with(expected), "{text}: {message}");
        }
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let message = error(&file("data_dir = "));
        assert!(
            message.starts_with("config: cannot parse /etc/silt/edge.toml"),
            "{message}"
        );
    }

    #[test]
    fn overrides_win_over_the_file_in_order() {
        let mut sources = file(
            "data_dir = \"/from-file\"\nnode_id = \"file\"\n[log]\nbudget_bytes = 100\n[topic_defaults]\n\"retention.ms\" = 5",
        );
        sources.overrides = vec![
            set("node_id", "env", "SILT_NODE_ID"),
            set("log.budget_bytes", "1000000", "SILT_LOG__BUDGET_BYTES"),
            set("node_id", "flag", "--node-id"),
            set("topic_defaults.segment.bytes", "4096", "--set"),
            set("topic_defaults.\"retention.ms\"", "-1", "--set"),
        ];
        let config = EdgeConfig::resolve(&sources).unwrap();
        assert_eq!(config.node_id, "flag");
        assert_eq!(config.log.data_dir, PathBuf::from("/from-file"));
        assert_eq!(config.log.budget.unwrap().bytes_max, 1_000_000);
        assert_eq!(config.log.topic_defaults.segment_bytes, 4096);
        assert_eq!(config.log.topic_defaults.retention_ms, None);
    }

    #[test]
    fn errors_in_overrides_name_where_they_came_from() {
        let mut sources = file("data_dir = \"/d\"");
        sources.overrides = vec![set("log.budget_policy", "foo", "--set")];
        assert_eq!(
            error(&sources),
            "config key log.budget_policy: expected reject or drop-oldest, got \"foo\" (from --set)"
        );
        sources.overrides = vec![set("log.nope", "1", "SILT_LOG__NOPE")];
        let message = error(&sources);
        assert!(
            message.starts_with("config key log.nope: unknown field"),
            "{message}"
        );
        assert!(message.ends_with("(from SILT_LOG__NOPE)"), "{message}");
    }

    #[test]
    fn works_without_a_file() {
        let sources = Sources {
            file: None,
            overrides: vec![set("data_dir", "/tmp/x", "--data-dir")],
            hostname: None,
        };
        let config = EdgeConfig::resolve(&sources).unwrap();
        assert_eq!(config.log.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let config = EdgeConfig::resolve(&file(
            "data_dir = \"/d\"\n[log]\nflush = \"relaxed-unsafe\"\nbudget_bytes = \"1GiB\"\n[topic_defaults]\n\"retention.bytes\" = 77",
        ))
        .unwrap();
        let printed = config.to_toml();
        let reread = EdgeConfig::resolve(&file(&printed)).unwrap();
        assert_eq!(reread, config, "{printed}");
        assert!(printed.contains("\"retention.bytes\" = 77"), "{printed}");

        let durable = EdgeConfig::resolve(&file("data_dir = \"/d\"")).unwrap();
        assert_eq!(
            EdgeConfig::resolve(&file(&durable.to_toml())).unwrap(),
            durable
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("0"), Some(0));
        assert_eq!(parse_byte_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_byte_size(" 2 GiB "), Some(2 << 30));
        assert_eq!(parse_byte_size("10MB"), Some(10_000_000));
        assert_eq!(parse_byte_size("7B"), Some(7));
        assert_eq!(parse_byte_size("GiB"), None);
        assert_eq!(parse_byte_size("1.5GiB"), None);
        assert_eq!(
            parse_byte_size("99999999999TiB"),
            None,
            "overflow is an error"
        );
    }
}
