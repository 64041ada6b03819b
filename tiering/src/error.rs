//! The crate's error type: what can go wrong opening a store, writing or reading the archive.

use silt_log::batch::BatchError;

/// Result with [`TierError`].
pub type Result<T, E = TierError> = std::result::Result<T, E>;

/// Everything the cold tier can fail with. Callers branch on the kind: a store error is worth a
/// retry with backoff, a corrupt object or bad input is not.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The object store URL cannot name a store.
    #[error("object store {url:?}: {why}")]
    StoreUrl { url: String, why: String },
    /// The object store failed (network, permissions, missing object); usually retriable.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Parquet encoding or decoding failed (store failures under Parquet become `Store`).
    #[error("parquet: {0}")]
    Parquet(parquet::errors::ParquetError),
    /// Arrow array construction failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A log batch handed to the archive could not be decoded.
    #[error("record batch: {0}")]
    Batch(#[from] BatchError),
    /// The input cannot be archived as given (out of order, wrong range, unrepresentable).
    #[error("cannot archive: {0}")]
    InvalidInput(String),
    /// The local log failed while retention moved its start (disk full, I/O error).
    #[error("local log {topic}/{partition}: {source}")]
    Log {
        topic: String,
        partition: u32,
        source: silt_log::LogError,
    },
    /// An archive object does not hold what its name and footer promise.
    #[error("archive object {key}: {why}")]
    Corrupt { key: String, why: String },
    /// A blocking task (a log read, a directory walk) panicked or was cancelled.
    #[error("{what} did not finish: {source}")]
    Task {
        what: &'static str,
        source: tokio::task::JoinError,
    },
}

/// The result of a blocking task, its panic or cancellation as [`TierError::Task`].
pub(crate) fn joined<T>(
    what: &'static str,
    result: std::result::Result<T, tokio::task::JoinError>,
) -> Result<T> {
    result.map_err(|source| TierError::Task { what, source })
}

impl From<parquet::errors::ParquetError> for TierError {
    /// The Parquet reader and writer wrap the store's own errors (as `External`, sometimes inside
    /// an `io::Error`); those are unwrapped so callers can tell a failing store, worth a retry,
    /// from a bad file.
    fn from(error: parquet::errors::ParquetError) -> Self {
        let parquet::errors::ParquetError::External(inner) = error else {
            return TierError::Parquet(error);
        };
        let inner = match inner.downcast::<object_store::Error>() {
            Ok(store) => return TierError::Store(*store),
            Err(inner) => inner,
        };
        match inner.downcast::<std::io::Error>() {
            Ok(io) => match io
                .into_inner()
                .map(|inner| inner.downcast::<object_store::Error>())
            {
                Some(Ok(store)) => TierError::Store(*store),
                Some(Err(other)) => {
                    TierError::Parquet(parquet::errors::ParquetError::External(other))
                }
                None => TierError::Parquet(parquet::errors::ParquetError::External(Box::new(
                    std::io::Error::other("i/o error without detail"),
                ))),
            },
            Err(other) => TierError::Parquet(parquet::errors::ParquetError::External(other)),
        }
    }
}
