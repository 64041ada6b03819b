//! Opening the archive's object store from a URL: `s3://bucket/prefix`, `file:///abs/path` or
//! `memory://`. Everything else in this crate sees one `ObjectStore` plus a key prefix, so the
//! same code (and the same conformance tests) run against every backend.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use parquet::basic::ZstdLevel;

use crate::error::{Result, TierError};

/// The URL schemes [`ArchiveStore::open`] accepts.
pub const STORE_SCHEMES: &[&str] = &["s3", "file", "memory"];

/// The zstd levels archive pages can be written at.
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=22;
/// The zstd level new archive objects are written at unless set otherwise
/// ([`ArchiveStore::with_zstd_level`]). Level 1, not zstd's default 3: on JSON telemetry it
/// compresses as small or smaller, compresses about 1.5x as fast and decompresses up to 1.4x as
/// fast (BENCHMARKS.md, "Tiering"), and every cold read pays decompression. Arrow's writers
/// default to 1 as well.
pub const ZSTD_LEVEL_DEFAULT: i32 = 1;

/// An object store and the key prefix under which the archive lives.
#[derive(Debug, Clone)]
pub struct ArchiveStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    /// For `file://` stores, the directory: garbage collection looks there for the staging
    /// files (`<key>#<n>`) an interrupted upload leaves, which the store's LIST hides.
    local_root: Option<PathBuf>,
    /// For `s3://` stores, the S3 client itself: garbage collection lists and aborts stale
    /// multipart uploads through it, which the `ObjectStore` trait cannot.
    s3: Option<Arc<AmazonS3>>,
    /// The zstd level new objects' pages are written at, checked against [`ZSTD_LEVELS`].
    zstd_level: ZstdLevel,
}

impl ArchiveStore {
    /// Opens the store `url` names.
    ///
    /// - `s3://bucket[/prefix]`: credentials, region and endpoint come from the standard `AWS_*`
    ///   environment variables, including `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) and
    ///   `AWS_ALLOW_HTTP=true` for S3-compatible servers, which are then addressed path-style.
    /// - `file:///absolute/path`: a local directory, created if missing.
    /// - `memory://`: an in-process store that lives as long as this value (tests, trials).
    pub fn open(url: &str) -> Result<ArchiveStore> {
        ArchiveStore::open_with_env(url, std::env::vars())
    }

    /// [`ArchiveStore::open`], with the environment passed in: only the `AWS_*` variables are
    /// read, and an unknown `AWS_*` name is ignored, as the AWS tools do.
    pub fn open_with_env(
        url: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<ArchiveStore> {
        let bad = |why: String| TierError::StoreUrl {
            url: url.to_string(),
            why,
        };
        if url.chars().any(char::is_whitespace) {
            return Err(bad("whitespace in the URL".into()));
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("no scheme".into()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket".into()));
                }
                let mut builder = AmazonS3Builder::new();
                for (name, value) in env {
                    if !name.starts_with("AWS_") {
                        continue;
                    }
                    if let Ok(key) = name.to_ascii_lowercase().parse() {
                        builder = builder.with_config(key, value);
                    }
                }
                let store = Arc::new(
                    builder
                        .with_bucket_name(bucket)
                        .build()
                        .map_err(|error| bad(error.to_string()))?,
                );
                let mut archive = ArchiveStore::new(store.clone(), prefix, url);
                archive.s3 = Some(store);
                Ok(archive)
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("a file URL needs an absolute path: file:///path".into()));
                }
                std::fs::create_dir_all(rest)
                    .map_err(|error| bad(format!("cannot create {rest}: {error}")))?;
                let store = LocalFileSystem::new_with_prefix(rest)
                    .map_err(|error| bad(error.to_string()))?
                    .with_automatic_cleanup(true);
                let mut archive = ArchiveStore::new(Arc::new(store), "", url);
                archive.local_root = Some(PathBuf::from(rest));
                Ok(archive)
            }
            "memory" => {
                if !rest.trim_matches('/').is_empty() {
                    return Err(bad("memory:// takes no path".into()));
                }
                Ok(ArchiveStore::new(Arc::new(InMemory::new()), "", url))
            }
            other => Err(bad(format!(
                "unknown scheme {other:?} (known: {})",
                STORE_SCHEMES.join(", ")
            ))),
        }
    }

    /// Wraps an already built store; `prefix` is prepended to every key the archive writes.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, url: &str) -> ArchiveStore {
        ArchiveStore {
            store,
            prefix: Path::from(prefix.trim_matches('/')),
            url: url.to_string(),
            local_root: None,
            s3: None,
            zstd_level: ZstdLevel::try_new(ZSTD_LEVEL_DEFAULT).expect("1 is a zstd level"),
        }
    }

    /// Writes new objects' pages at zstd `level` (one of [`ZSTD_LEVELS`]). Objects already
    /// written keep theirs: a reader learns each page's codec from the page itself.
    pub fn with_zstd_level(mut self, level: i32) -> Result<ArchiveStore> {
        // Parquet's own check admits zstd's negative levels too.
        match ZstdLevel::try_new(level) {
            Ok(checked) if ZSTD_LEVELS.contains(&level) => {
                self.zstd_level = checked;
                Ok(self)
            }
            _ => Err(TierError::InvalidInput(format!(
                "zstd level {level}: must be from {} to {}",
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            ))),
        }
    }

    /// The zstd level new objects' pages are written at.
    pub fn zstd_level(&self) -> i32 {
        self.zstd_level.compression_level()
    }

    /// The same level, as the Parquet writer takes it.
    pub(crate) fn parquet_zstd_level(&self) -> ZstdLevel {
        self.zstd_level
    }

    /// The S3 client of an `s3://` store, `None` for every other kind.
    pub fn s3(&self) -> Option<&Arc<AmazonS3>> {
        self.s3.as_ref()
    }

    /// The directory of a `file://` store, `None` for every other kind.
    pub fn local_root(&self) -> Option<&FsPath> {
        self.local_root.as_deref()
    }

    /// The store itself.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The key prefix every archive key starts with (possibly empty).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The URL the store was opened from, for logs and errors.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `relative` under the archive's prefix.
    pub fn key(&self, relative: &str) -> Path {
        let mut key = self.prefix.clone();
        for part in relative.split('/').filter(|part| !part.is_empty()) {
            key = key.join(part);
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_that_cannot_name_a_store_are_refused_with_the_reason() {
        for (url, why) in [
            ("", "no scheme"),
            ("archive", "no scheme"),
            ("gs://bucket", "unknown scheme"),
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("file://relative/path", "absolute path"),
            ("memory://something", "takes no path"),
            ("s3://bucket/with space", "whitespace"),
        ] {
            let error = ArchiveStore::open(url).unwrap_err().to_string();
            assert!(error.contains(why), "{url:?}: {error}");
            assert!(error.contains(url), "{url:?}: {error}");
        }
    }

    #[test]
    fn prefixes_are_joined_into_keys() {
        let store = ArchiveStore::open("memory://").unwrap();
        assert_eq!(store.key("v1/topic=a").as_ref(), "v1/topic=a");
        let store = ArchiveStore::new(store.store().clone(), "/silt/archive/", "memory://");
        assert_eq!(
            store.key("v1/topic=a/x.parquet").as_ref(),
            "silt/archive/v1/topic=a/x.parquet"
        );
    }

    #[test]
    fn s3_urls_take_bucket_and_prefix() {
        let store = ArchiveStore::open("s3://bucket/some/prefix").unwrap();
        assert_eq!(store.prefix().as_ref(), "some/prefix");
        assert_eq!(store.url(), "s3://bucket/some/prefix");
    }
}
