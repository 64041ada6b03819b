//! Silt's cold tier: the Parquet archive in S3-compatible object storage, its manifest,
//! retention, garbage collection and cold reads.
//!
//! The tiered-storage issue fills this crate; until then it deliberately holds no code.
//!
//! # Layout
//! Empty: no archive code has been built yet.
