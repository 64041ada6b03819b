//! Silt's cold tier: the Parquet archive in S3-compatible object storage, its manifest,
//! retention, garbage collection and cold reads.
//!
//! # Layout
//! - `store`: opening the object store from a URL (`s3://`, `file://`, `memory://`).
//! - `schema`: the archive's Parquet format: columns, footer metadata, object keys.
//! - `manifest`: per partition, the archived objects: the cold tier's source of truth.
//! - `offload`: planning and running the conversion of closed segments into objects.
//! - `compact`: merging runs of small archive objects into one.
//! - `write`: converting a contiguous run of record batches into one archive object.
//! - `read`: reading an archive object back as RecordBatch v2 batches from any offset.
//! - `retention`: whole-log retention (`retention.ms`/`retention.bytes`) across both tiers.
//! - `gc`: garbage collection of orphan objects, expired keys and interrupted uploads.
//! - `failpoint`: named kill -9 points for crash tests (`SILT_TIER_FAILPOINT`).
//! - `cold`: a node's cold reader: cached manifests, open objects and row groups, prefetch.
//! - `error`: the crate's error type.

pub mod cold;
pub mod compact;
mod error;
pub mod failpoint;
pub mod gc;
pub mod manifest;
pub mod offload;
pub mod read;
pub mod retention;
pub mod schema;
pub mod store;
pub mod write;

pub use cold::{ChunkCache, ColdConfig, ColdError, ColdRead, ColdReader, ColdStats};
pub use compact::{CompactPlan, CompactPolicy, Compacted, compact_next, plan_compaction};
pub use error::{Result, TierError};
pub use gc::{GcPolicy, GcReport};
pub use manifest::{Manifest, ManifestObject, ReplacedObject};
pub use offload::{OffloadPolicy, OffloadRange, offload_next, plan_offload};
pub use read::ArchiveReader;
pub use retention::RetentionReport;
pub use store::ArchiveStore;
pub use write::ArchiveWriter;
