//! Garbage collection, per partition: what a crash leaves in the store and no manifest names.
//!
//! - **Expired keys**: objects retention took out of the manifest (`Manifest::expired`) whose
//!   deletion was interrupted. Deleted whatever their age, then forgotten (commit).
//! - **Replaced objects**: objects a compaction merged into one (`Manifest::replaced`) whose
//!   deletion right after the compaction was interrupted (a crash, a failing store). Deleted
//!   whatever their age, as compaction itself deletes them: an analytics engine globbing the
//!   archive would otherwise count their rows twice. Then forgotten (commit).
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
//! - **Stale S3 multipart uploads** (`s3://`): uploads under the partition's prefix initiated
//!   before the grace period are aborted. object_store has no ListMultipartUploads, so GC sends
//!   one itself: a GET presigned by the store's own signer (`Signer::signed_url_opts`, so the
//!   same credentials and endpoint), answered in XML; the aborts go through `MultipartStore`.
//!   A server that does not implement the call (s3s-fs answers 501) is logged and skipped: set
//!   the bucket's `AbortIncompleteMultipartUpload` lifecycle rule there.
//!
//! In-memory stores lose their uploads with the process.

use std::collections::HashSet;
use std::path::{Path as FsPath, PathBuf};

use futures_util::TryStreamExt;
use object_store::ObjectStore;
use object_store::aws::AmazonS3;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::signer::{SignedUrlOptions, Signer};

use crate::error::{Result, joined};
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
    /// Objects a compaction replaced, deleted (or found already gone) once past the grace.
    pub replaced_deleted: u64,
    /// Unnamed objects deleted.
    pub orphans_deleted: u64,
    /// Interrupted uploads cleared: staging files of a `file://` store, multipart uploads of
    /// an `s3://` one.
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
    report.replaced_deleted = delete_replaced(store, manifest).await?;
    // Replaced objects still within the grace are not orphans: readers may hold them.
    let named: HashSet<&str> = manifest
        .objects
        .iter()
        .map(|object| object.key.as_str())
        .chain(manifest.replaced.iter().map(|old| old.key.as_str()))
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
        let (removed, bytes) = joined(
            "the staging file walk",
            tokio::task::spawn_blocking(move || {
                remove_staging_files(&dir, &manifest_file, &policy, now_ms)
            })
            .await,
        )??;
        report.uploads_aborted = removed;
        report.bytes_freed += bytes;
    }
    if let Some(s3) = store.s3() {
        report.uploads_aborted += abort_stale_s3_uploads(s3, &prefix, policy, now_ms).await?;
    }
    Ok(report)
}

/// Deletes the objects compaction replaced, then commits the manifest without them.
/// Idempotent: a crash between the deletions and the commit leaves keys whose deletion the
/// next pass repeats (a missing object counts as deleted).
pub(crate) async fn delete_replaced(store: &ArchiveStore, manifest: &mut Manifest) -> Result<u64> {
    let due: Vec<String> = manifest
        .replaced
        .iter()
        .map(|old| old.key.clone())
        .collect();
    if due.is_empty() {
        return Ok(0);
    }
    let mut deleted = Vec::with_capacity(due.len());
    let mut failure = None;
    for key in due {
        if let Err(error) = delete_object(store, &key).await {
            failure = Some(error);
            break;
        }
        deleted.push(key);
        if deleted.len() == 1 {
            failpoint::hit(failpoint::GC_MID_DELETE);
        }
    }
    if !deleted.is_empty() {
        manifest.forget_replaced(&deleted);
        manifest.commit(store).await?;
        tracing::info!(
            topic = %manifest.topic,
            partition = manifest.partition,
            objects = deleted.len(),
            "deleted objects compaction replaced"
        );
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(deleted.len() as u64),
    }
}

/// Pages of ListMultipartUploads read per pass, so a bucket full of uploads cannot keep one
/// pass busy without bound (the next pass continues).
const S3_UPLOAD_PAGES_MAX: usize = 100;
/// Largest ListMultipartUploads answer accepted (S3 pages hold at most 1,000 uploads).
const S3_UPLOAD_PAGE_BYTES_MAX: usize = 4 << 20;

/// One incomplete multipart upload, as ListMultipartUploads reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct S3Upload {
    key: String,
    upload_id: String,
    initiated_ms: Option<i64>,
}

/// Aborts the multipart uploads under `prefix` initiated more than the grace period ago.
async fn abort_stale_s3_uploads(
    s3: &AmazonS3,
    prefix: &Path,
    policy: &GcPolicy,
    now_ms: i64,
) -> Result<u64> {
    // A client per pass, not a process-wide one: a pooled connection must not outlive the
    // runtime that opened it (tests run many), and GC passes are minutes apart.
    let client = reqwest::Client::new();
    let list_prefix = format!("{prefix}/");
    let mut markers: Option<(String, String)> = None;
    let mut aborted = 0;
    for _ in 0..S3_UPLOAD_PAGES_MAX {
        let mut query = vec![
            ("uploads".to_string(), String::new()),
            ("prefix".to_string(), list_prefix.clone()),
        ];
        if let Some((key_marker, upload_marker)) = &markers {
            query.push(("key-marker".into(), key_marker.clone()));
            query.push(("upload-id-marker".into(), upload_marker.clone()));
        }
        let url = s3
            .signed_url_opts(
                reqwest::Method::GET,
                &Path::from(""),
                std::time::Duration::from_secs(300),
                &SignedUrlOptions::new().with_query(query),
            )
            .await?;
        let response = client.get(url).send().await.map_err(s3_error)?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_IMPLEMENTED {
            tracing::warn!(
                prefix = %prefix,
                "the S3 server does not list multipart uploads; stale ones are left to the bucket's lifecycle rule"
            );
            return Ok(aborted);
        }
        let body = response.bytes().await.map_err(s3_error)?;
        if !status.is_success() {
            return Err(s3_error(format!(
                "ListMultipartUploads answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            )));
        }
        if body.len() > S3_UPLOAD_PAGE_BYTES_MAX {
            return Err(s3_error(format!(
                "ListMultipartUploads answered {} bytes",
                body.len()
            )));
        }
        let page = String::from_utf8_lossy(&body);
        for upload in parse_uploads(&page) {
            let stale = upload
                .initiated_ms
                .is_some_and(|initiated| older_than_grace(initiated, policy, now_ms));
            if !stale || !upload.key.starts_with(&list_prefix) {
                continue;
            }
            s3.abort_multipart(&Path::from(upload.key.as_str()), &upload.upload_id)
                .await?;
            tracing::info!(key = %upload.key, upload_id = %upload.upload_id, "garbage collection aborted a stale multipart upload");
            aborted += 1;
        }
        if xml_values(&page, "IsTruncated").first().map(String::as_str) != Some("true") {
            return Ok(aborted);
        }
        let next_key = xml_values(&page, "NextKeyMarker").into_iter().next();
        let next_upload = xml_values(&page, "NextUploadIdMarker").into_iter().next();
        match (next_key, next_upload) {
            (Some(key), Some(upload))
                if markers.as_ref() != Some(&(key.clone(), upload.clone())) =>
            {
                markers = Some((key, upload));
            }
            _ => return Ok(aborted),
        }
    }
    Ok(aborted)
}

fn s3_error(error: impl std::fmt::Display) -> crate::error::TierError {
    crate::error::TierError::Store(object_store::Error::Generic {
        store: "S3",
        source: error.to_string().into(),
    })
}

/// The `<Upload>` entries of a ListMultipartUploads answer.
fn parse_uploads(xml: &str) -> Vec<S3Upload> {
    xml_blocks(xml, "Upload")
        .into_iter()
        .filter_map(|block| {
            let key = xml_values(block, "Key").into_iter().next()?;
            let upload_id = xml_values(block, "UploadId").into_iter().next()?;
            let initiated_ms = xml_values(block, "Initiated")
                .first()
                .and_then(|time| chrono::DateTime::parse_from_rfc3339(time).ok())
                .map(|time| time.timestamp_millis());
            Some(S3Upload {
                key,
                upload_id,
                initiated_ms,
            })
        })
        .collect()
}

/// The inner text of every `<tag>...</tag>` in `xml` (no attributes, no nesting of the same
/// tag: the shape of S3's answers).
fn xml_blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else {
            break;
        };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// [`xml_blocks`], with XML's predefined entities decoded.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    xml_blocks(xml, tag)
        .into_iter()
        .map(|text| {
            text.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&")
        })
        .collect()
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

    #[test]
    fn list_multipart_uploads_answers_are_parsed() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><IsTruncated>false</IsTruncated>
  <Upload><Key>v1/topic=t/partition=0/a&amp;b.parquet</Key><UploadId>id-1</UploadId>
    <Initiator><ID>x</ID></Initiator><Initiated>2026-11-22T13:00:00.000Z</Initiated></Upload>
  <Upload><Key>v1/topic=t/partition=0/c.parquet</Key><UploadId>id-2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        assert_eq!(
            parse_uploads(xml),
            [
                S3Upload {
                    key: "v1/topic=t/partition=0/a&b.parquet".into(),
                    upload_id: "id-1".into(),
                    initiated_ms: Some(1_795_352_400_000),
                },
                S3Upload {
                    key: "v1/topic=t/partition=0/c.parquet".into(),
                    upload_id: "id-2".into(),
                    initiated_ms: None,
                },
            ]
        );
        assert_eq!(xml_values(xml, "IsTruncated"), ["false"]);
    }
}
