//! The error type of silt-log: kinds callers branch on, each naming what it is about.

use std::io;
use std::path::PathBuf;

use crate::batch::BatchError;
use crate::config::ConfigError;

/// Everything that can go wrong in the log, as an operating condition rather than a bug.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("offset {offset} is out of range: the log holds [{log_start}, {log_end})")]
    OffsetOutOfRange {
        offset: u64,
        log_start: u64,
        log_end: u64,
    },
    #[error("offset {offset} is no longer on local disk (local start offset {local_start})")]
    NotLocal { offset: u64, local_start: u64 },
    #[error("data directory budget is full: {used_bytes} of {budget_bytes} bytes used")]
    BudgetExceeded { used_bytes: u64, budget_bytes: u64 },
    #[error(
        "filesystem under {path} has {available_bytes} bytes free, below the reserve of \
         {reserve_bytes} bytes"
    )]
    FilesystemFull {
        path: PathBuf,
        available_bytes: u64,
        reserve_bytes: u64,
    },
    #[error("corrupt {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is not a silt data directory: {reason}")]
    ForeignDirectory { path: PathBuf, reason: String },
    #[error("unexpected file {path} in the data directory; move it away and restart")]
    ForeignFile { path: PathBuf },
    #[error("data directory {path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("unknown partition {partition} of topic {topic:?}")]
    UnknownPartition { topic: String, partition: u32 },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName { name: String, reason: &'static str },
    #[error("invalid partition count {0}: must be between 1 and {max}", max = crate::PARTITIONS_MAX)]
    InvalidPartitionCount(u32),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("batch offsets {base_offset}.. do not follow the log end offset {log_end}")]
    OffsetOrder { base_offset: u64, log_end: u64 },
    #[error("an earlier fsync of {path} failed; the partition refuses writes until reopened")]
    FsyncFailed { path: PathBuf },
    #[error(
        "appended offsets below {end} were removed by a truncation to {log_end} before they \
         became durable"
    )]
    Truncated { end: u64, log_end: u64 },
    #[error("the log is closed")]
    Closed,
    #[error("invalid host {0:?} for meta.json: it must be 1 to 64 hex digits")]
    InvalidHost(String),
}

impl LogError {
    /// True when retrying the same call later can succeed without operator action.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            LogError::BudgetExceeded { .. } | LogError::FilesystemFull { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> LogError {
        let path = path.into();
        move |source| LogError::Io { path, source }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> LogError {
        LogError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;
