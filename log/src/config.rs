//! Configuration of a data directory and of its topics, with Kafka's topic config names.
//!
//! Defaults live here and only here. Values are validated when they are set, and every error
//! names the key it is about.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Kafka's default `segment.bytes`: 1 GiB.
pub const SEGMENT_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest segment size accepted, so one maximal batch always fits a fresh segment.
pub const SEGMENT_BYTES_MIN: u64 = 14;
/// Largest segment size: positions in the offset index are 32-bit.
pub const SEGMENT_BYTES_MAX: u64 = i32::MAX as u64;
/// Kafka's default `segment.ms`: 7 days.
pub const SEGMENT_MS_DEFAULT: u64 = 7 * 24 * 3600 * 1000;
/// Kafka's default `retention.ms`: 7 days.
pub const RETENTION_MS_DEFAULT: i64 = 7 * 24 * 3600 * 1000;
/// Kafka's default `message.max.bytes` plus the log overhead.
pub const MAX_BATCH_BYTES_DEFAULT: usize = 1_048_588;
/// Kafka's default `index.interval.bytes`.
pub const INDEX_INTERVAL_BYTES_DEFAULT: u32 = 4096;
/// Free space kept on the filesystem below the data directory: appends are refused before the
/// filesystem itself fills, so the log, its checkpoints and the OS keep room to work.
pub const FS_RESERVE_BYTES_DEFAULT: u64 = 64 << 20;
/// Largest `preallocate_bytes`: a zero tail is headroom for the next few fsyncs, not a
/// segment's worth of disk.
pub const PREALLOCATE_BYTES_MAX: u64 = 64 << 20;

/// The topic config keys Silt understands, with Kafka's names.
pub const TOPIC_CONFIG_KEYS: &[&str] = &[
    "cleanup.policy",
    "segment.bytes",
    "segment.ms",
    "retention.ms",
    "retention.bytes",
    "local.retention.ms",
    "local.retention.bytes",
];

/// A config value that was rejected, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {key}: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: &str, value: &str, reason: impl Into<String>) -> Self {
        ConfigError {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlushPolicy {
    /// An append returns once its bytes are fsync'd; concurrent appenders share one fsync.
    #[default]
    Durable,
    /// An append returns once its bytes are in the page cache; a background flusher fsyncs
    /// every `interval`. A power loss can lose up to `interval` of acknowledged data. Off by
    /// default, and named so nobody mistakes it for the durable mode.
    RelaxedUnsafe { interval: Duration },
}

/// What happens when the data directory reaches its byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BudgetPolicy {
    /// New appends fail with [`crate::LogError::BudgetExceeded`]; nothing stored is lost.
    #[default]
    Reject,
    /// The oldest closed segments, across all partitions, are deleted to make room, and what
    /// was dropped is counted.
    DropOldest,
}

impl BudgetPolicy {
    pub fn parse(key: &str, value: &str) -> Result<Self, ConfigError> {
        match value {
            "reject" => Ok(BudgetPolicy::Reject),
            "drop-oldest" => Ok(BudgetPolicy::DropOldest),
            _ => Err(ConfigError::new(
                key,
                value,
                "expected reject or drop-oldest",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPolicy::Reject => "reject",
            BudgetPolicy::DropOldest => "drop-oldest",
        }
    }
}

/// A byte budget for the whole data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskBudget {
    pub bytes_max: u64,
    pub policy: BudgetPolicy,
}

/// Configuration of one data directory.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub data_dir: PathBuf,
    pub flush: FlushPolicy,
    pub budget: Option<DiskBudget>,
    pub fs_reserve_bytes: u64,
    pub max_batch_bytes: usize,
    pub index_interval_bytes: u32,
    /// Zero-filled headroom the active segment keeps past its logical end, extended this many
    /// bytes at a time (0, the default, turns it off). Appends then overwrite blocks that are
    /// already allocated and written, so their fdatasync changes no file metadata and skips
    /// the filesystem's journal commit: a lower fsync latency for a latency-bound writer (the
    /// edge), at the cost of up to twice this many bytes of disk per partition beyond its
    /// logical size. At most [`PREALLOCATE_BYTES_MAX`].
    pub preallocate_bytes: u64,
    /// Config of topics that set no override.
    pub topic_defaults: TopicConfig,
}

impl LogConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            data_dir: data_dir.into(),
            flush: FlushPolicy::Durable,
            budget: None,
            fs_reserve_bytes: FS_RESERVE_BYTES_DEFAULT,
            max_batch_bytes: MAX_BATCH_BYTES_DEFAULT,
            index_interval_bytes: INDEX_INTERVAL_BYTES_DEFAULT,
            preallocate_bytes: 0,
            topic_defaults: TopicConfig::default(),
        }
    }
}

/// Kafka's `cleanup.policy`. Only `delete` exists today; `compact` is refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CleanupPolicy {
    #[default]
    Delete,
}

/// A limit that may be switched off with Kafka's `-1`.
pub type Limit = Option<u64>;

/// Per-topic configuration, with Kafka's keys and meanings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    pub cleanup_policy: CleanupPolicy,
    /// `segment.bytes`: roll the active segment before it would exceed this size.
    pub segment_bytes: u64,
    /// `segment.ms`: roll the active segment once its first batch is this old.
    pub segment_ms: u64,
    /// `retention.ms`: delete data older than this from every tier; `None` is `-1`, forever.
    pub retention_ms: Limit,
    /// `retention.bytes`: bound on each partition's size across every tier; `None` is `-1`.
    pub retention_bytes: Limit,
    /// `local.retention.ms`: how long data stays on local disk when a cold tier holds it;
    /// `None` is `-2`, the same as `retention.ms`.
    pub local_retention_ms: Option<Limit>,
    /// `local.retention.bytes`: as `local.retention.ms`, in bytes per partition.
    pub local_retention_bytes: Option<Limit>,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            cleanup_policy: CleanupPolicy::Delete,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            segment_ms: SEGMENT_MS_DEFAULT,
            retention_ms: Some(RETENTION_MS_DEFAULT as u64),
            retention_bytes: None,
            local_retention_ms: None,
            local_retention_bytes: None,
        }
    }
}

impl TopicConfig {
    /// Sets one key from its Kafka string form, validating it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        match key {
            "cleanup.policy" => {
                self.cleanup_policy = match value {
                    "delete" => CleanupPolicy::Delete,
                    "compact" | "compact,delete" | "delete,compact" => {
                        return Err(ConfigError::new(key, value, "compaction is not supported"));
                    }
                    _ => return Err(ConfigError::new(key, value, "expected delete")),
                }
            }
            "segment.bytes" => {
                let bytes = parse_u64(key, value)?;
                if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&bytes) {
                    return Err(ConfigError::new(
                        key,
                        value,
                        format!("must be between {SEGMENT_BYTES_MIN} and {SEGMENT_BYTES_MAX}"),
                    ));
                }
                self.segment_bytes = bytes;
            }
            "segment.ms" => {
                let ms = parse_u64(key, value)?;
                if ms == 0 {
                    return Err(ConfigError::new(key, value, "must be at least 1"));
                }
                self.segment_ms = ms;
            }
            "retention.ms" => self.retention_ms = parse_limit(key, value)?,
            "retention.bytes" => self.retention_bytes = parse_limit(key, value)?,
            "local.retention.ms" => self.local_retention_ms = parse_local_limit(key, value)?,
            "local.retention.bytes" => self.local_retention_bytes = parse_local_limit(key, value)?,
            _ => {
                return Err(ConfigError::new(
                    key,
                    value,
                    format!(
                        "unknown topic config; known: {}",
                        TOPIC_CONFIG_KEYS.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Applies every override in `overrides`, stopping at the first invalid one.
    pub fn with_overrides<'a>(
        mut self,
        overrides: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, ConfigError> {
        for (key, value) in overrides {
            self.set(key, value)?;
        }
        Ok(self)
    }

    /// The value of one key in Kafka's string form.
    pub fn get(&self, key: &str) -> Option<String> {
        Some(match key {
            "cleanup.policy" => "delete".to_string(),
            "segment.bytes" => self.segment_bytes.to_string(),
            "segment.ms" => self.segment_ms.to_string(),
            "retention.ms" => limit_str(self.retention_ms),
            "retention.bytes" => limit_str(self.retention_bytes),
            "local.retention.ms" => self.local_retention_ms.map_or("-2".into(), limit_str),
            "local.retention.bytes" => self.local_retention_bytes.map_or("-2".into(), limit_str),
            _ => return None,
        })
    }

    /// Every key with its value, in Kafka's string form.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        TOPIC_CONFIG_KEYS
            .iter()
            .filter_map(|key| Some((key.to_string(), self.get(key)?)))
            .collect()
    }

    /// `local.retention.ms` with `-2` resolved to `retention.ms`.
    pub fn effective_local_retention_ms(&self) -> Limit {
        self.local_retention_ms.unwrap_or(self.retention_ms)
    }

    /// `local.retention.bytes` with `-2` resolved to `retention.bytes`.
    pub fn effective_local_retention_bytes(&self) -> Limit {
        self.local_retention_bytes.unwrap_or(self.retention_bytes)
    }
}

fn parse_u64(key: &str, value: &str) -> Result<u64, ConfigError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| ConfigError::new(key, value, "expected a non-negative integer"))
}

fn parse_limit(key: &str, value: &str) -> Result<Limit, ConfigError> {
    match value.trim() {
        "-1" => Ok(None),
        other => parse_u64(key, other)
            .map(Some)
            .map_err(|_| ConfigError::new(key, value, "expected -1 or a non-negative integer")),
    }
}

fn parse_local_limit(key: &str, value: &str) -> Result<Option<Limit>, ConfigError> {
    match value.trim() {
        "-2" => Ok(None),
        other => parse_limit(key, other)
            .map(Some)
            .map_err(|_| ConfigError::new(key, value, "expected -2, -1 or a non-negative integer")),
    }
}

fn limit_str(limit: Limit) -> String {
    limit.map_or("-1".to_string(), |value| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_names_round_trip() {
        let mut config = TopicConfig::default();
        config.set("segment.bytes", "1048576").unwrap();
        config.set("retention.ms", "-1").unwrap();
        config.set("local.retention.bytes", "4096").unwrap();
        assert_eq!(config.segment_bytes, 1 << 20);
        assert_eq!(config.retention_ms, None);
        assert_eq!(config.get("retention.ms").as_deref(), Some("-1"));
        assert_eq!(config.get("local.retention.ms").as_deref(), Some("-2"));
        assert_eq!(config.effective_local_retention_bytes(), Some(4096));
        let reparsed = TopicConfig::default()
            .with_overrides(config.to_map().iter())
            .unwrap();
        assert_eq!(reparsed, config);
    }

    #[test]
    fn errors_name_the_key() {
        let mut config = TopicConfig::default();
        let error = config.set("segment.bytes", "lots").unwrap_err();
        assert_eq!(error.key, "segment.bytes");
        assert!(error.to_string().contains("segment.bytes"));
        let error = config.set("segment.byte", "1").unwrap_err();
        assert!(error.to_string().contains("unknown topic config"));
        assert!(config.set("cleanup.policy", "compact").is_err());
        assert!(config.set("segment.bytes", "0").is_err());
    }
}
