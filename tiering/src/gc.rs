//! Garbage collection, per partition: what a crash leaves in the store and no manifest names.
//!
//! - **Expired keys**: objects retention took out of the manifest (`Manifest::expired`) whose
//!   deletion was interrupted. Deleted whatever their age, then forgotten (commit).
//! - **Orphans**: objects under `v1/topic=<t>/partition=<p>/` the manifest does not name, left by
//!   a crash between upload and commit. Deleted once older than the grace period (by the store's
//!   `last_modified`): a younger one may be an upload about to commit. This is the one place
//!   that LISTs; the read path never does.
//! - **Interrupted uploads of a `file://` store**: `LocalFileSystem` writes every upload (single
//!   PUT and multipart alike) to a staging file `<key>#<n>` and renames it on completion; a kill
//!   leaves the staging file, which the store's LIST hides. GC walks the partition's directory
//!   (and the manifest's staging files) and removes those older than the grace period.
//!
//! An object the manifest names is never deleted, whatever its age. The caller passes the
//! partition's committed manifest and runs GC from the same task that offloads the partition,
//! so no commit races the LIST.
//!
//! Not covered: incomplete S3 multipart uploads (object_store exposes no
//! ListMultipartUploads); configure the bucket's `AbortIncompleteMultipartUpload` lifecycle
//! rule for them. In-memory stores lose theirs with the process.

use std::collections::HashSet;
use std::path::{Path as FsPath, PathBuf};

use futures_util::TryStreamExt;
use object_store::ObjectStore;

use crate::error::Result;
use crate::failpoint;
use crate::manifest::Manifest;
use crate::retention::{delete_expired, delete_object};
use crate::store::ArchiveStore;

/// Default grace period before an unnamed object counts as an orphan: far longer than any
/// upload-then-commit takes.
pub const GC_GRACE_MS_DEFAULT: i64 = 3_600_000;

/// How garbage collection decides what is garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// Unnamed objects and staging files younger than this are left alone.
    pub grace_ms: i64,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            grace_ms: GC_GRACE_MS_DEFAULT,
        }
    }
}

/// What one garbage collection pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Keys from the manifest's expired list deleted (or found already gone) and forgotten.
    pub expired_deleted: u64,
    /// Unnamed objects deleted.
    pub orphans_deleted: u64,
    /// Staging files of interrupted `file://` uploads removed.
    pub uploads_aborted: u64,
    /// Bytes freed by orphans and staging files (expired objects' sizes are not listed).
    pub bytes_freed: u64,
}

/// One garbage collection pass over `manifest`'s partition at time `now_ms`.
pub async fn collect(
    store: &ArchiveStore,
    manifest: &mut Manifest,
    policy: &GcPolicy,
    now_ms: i64,
) -> Result<GcReport> {
    let mut report = GcReport {
        expired_deleted: delete_expired(store, manifest, Some(failpoint::GC_MID_DELETE)).await?,
        ..GcReport::default()
    };
    let named: HashSet<&str> = manifest
        .objects
        .iter()
        .map(|object| object.key.as_str())
        .collect();
    let prefix = store.key(&partition_dir(&manifest.topic, manifest.partition));
    let listed: Vec<object_store::ObjectMeta> =
        store.store().list(Some(&prefix)).try_collect().await?;
    for meta in listed {
        let key = meta.location.as_ref();
        if named.contains(key)
            || !older_than_grace(meta.last_modified.timestamp_millis(), policy, now_ms)
        {
            continue;
        }
        delete_object(store, key).await?;
        tracing::info!(
            key,
            bytes = meta.size,
            "garbage collection deleted an orphan object"
        );
        report.orphans_deleted += 1;
        report.bytes_freed += meta.size;
        if report.orphans_deleted == 1 {
            failpoint::hit(failpoint::GC_MID_DELETE);
        }
    }
    if let Some(root) = store.local_root() {
        let manifest_file = store.key(&Manifest::key(&manifest.topic, manifest.partition));
        let dir = root.join(prefix.as_ref());
        let manifest_file = root.join(manifest_file.as_ref());
        let policy = *policy;
        let (removed, bytes) = tokio::task::spawn_blocking(move || {
            remove_staging_files(&dir, &manifest_file, &policy, now_ms)
        })
        .await
        .expect("directory walks do not panic")?;
        report.uploads_aborted = removed;
        report.bytes_freed += bytes;
    }
    Ok(report)
}

/// The directory of `topic`/`partition`'s objects, relative to the store's prefix.
pub fn partition_dir(topic: &str, partition: u32) -> String {
    format!(
        "v{}/topic={topic}/partition={partition}",
        crate::schema::FORMAT_VERSION
    )
}

fn older_than_grace(modified_ms: i64, policy: &GcPolicy, now_ms: i64) -> bool {
    now_ms.saturating_sub(modified_ms) >= policy.grace_ms
}

/// `name` is a `LocalFileSystem` staging file: `<anything>#<digits>`.
fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#').is_some_and(|(_, suffix)| {
        !suffix.is_empty() && suffix.bytes().all(|byte| byte.is_ascii_digit())
    })
}

/// Removes staging files under `dir` (recursively) and beside `manifest_file` older than the
/// grace period. Returns how many and their bytes.
fn remove_staging_files(
    dir: &FsPath,
    manifest_file: &FsPath,
    policy: &GcPolicy,
    now_ms: i64,
) -> Result<(u64, u64)> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries = match std::fs::read_dir(&next) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(io_error(&next, error)),
        };
        for entry in entries {
            let entry = entry.map_err(|error| io_error(&next, error))?;
            let kind = entry
                .file_type()
                .map_err(|error| io_error(&entry.path(), error))?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() && entry.file_name().to_str().is_some_and(is_staging_name) {
                candidates.push(entry.path());
            }
        }
    }
    if let (Some(parent), Some(name)) = (manifest_file.parent(), manifest_file.file_name())
        && let Ok(entries) = std::fs::read_dir(parent)
    {
        let stem = format!("{}#", name.to_string_lossy());
        for entry in entries.flatten() {
            let entry_name = entry.file_name();
            let entry_name = entry_name.to_string_lossy();
            if entry_name.starts_with(&stem) && is_staging_name(&entry_name) {
                candidates.push(entry.path());
            }
        }
    }
    let (mut removed, mut bytes) = (0, 0);
    for path in candidates {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let modified_ms = meta
            .modified()
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |age| i64::try_from(age.as_millis()).unwrap_or(i64::MAX));
        if !older_than_grace(modified_ms, policy, now_ms) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), bytes = meta.len(), "garbage collection removed an interrupted upload");
                removed += 1;
                bytes += meta.len();
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(&path, error)),
        }
    }
    Ok((removed, bytes))
}

fn io_error(path: &FsPath, error: std::io::Error) -> crate::error::TierError {
    crate::error::TierError::Store(object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(std::io::Error::new(
            error.kind(),
            format!("{}: {error}", path.display()),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_recognised() {
        assert!(is_staging_name("a.parquet#1"));
        assert!(is_staging_name("partition=0.json#12"));
        assert!(!is_staging_name("a.parquet"));
        assert!(!is_staging_name("a.parquet#"));
        assert!(!is_staging_name("a#b"));
    }
}
