//! silt-log: Silt's storage engine, the durable partitioned log that edge and core nodes keep
//! events in. No network and no async runtime: callers on an async runtime run appends on a
//! blocking thread.
//!
//! # Layout
//! - `batch`: Kafka RecordBatch v2, the one record format stored, shipped and served.
//! - `config`: data-directory and per-topic configuration, with Kafka's config names.
//! - `manager`: the data directory: topics, partitions, clean shutdown, retention, budget.
//! - `partition`: one partition's log: offsets, group commit, reads, truncation, retention.
//! - `segment` and `index`: one segment file and its sparse offset and time indexes.
//! - `partitioner`: Kafka's default key partitioner (murmur2), shared by every ingest path.
//! - `retention`: which segments retention deletes, as a pure function.
//! - `disk`: the byte budget and the filesystem free-space reserve.
//! - `fsutil`: fsync-after-create/rename/delete helpers and atomic file replacement.

pub mod batch;
pub mod config;
mod disk;
mod error;
mod fsutil;
mod index;
mod manager;
mod partition;
pub mod partitioner;
pub mod retention;
mod segment;
mod time;

pub use config::{BudgetPolicy, DiskBudget, FlushPolicy, LogConfig, TopicConfig};
pub use disk::DiskStats;
pub use error::{LogError, Result};
pub use manager::{
    LogManager, PARTITIONS_MAX, RESERVED_DIR_NAMES, TLS_DIR_NAME, TOPIC_NAME_BYTES_MAX, TopicInfo,
    validate_topic_name,
};
pub use partition::{
    AppendInfo, AppendOptions, DeleteReport, FIND_READ_BYTES, OffsetAssignment, PartitionLog,
    READ_BYTES_MAX, ReadInto, ReadSlice, RecoveryReport,
};
pub use time::now_ms;
