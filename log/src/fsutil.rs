//! Small filesystem helpers that carry the log's durability rules: every create, rename or
//! delete is followed by an fsync of its directory, and small metadata files are replaced
//! atomically.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{LogError, Result};

/// Suffix of files being written before an atomic rename; leftovers are removed at open.
pub(crate) const TMP_SUFFIX: &str = ".tmp";

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let handle = File::open(dir).map_err(LogError::io(dir))?;
    handle.sync_all().map_err(LogError::io(dir))
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed.
pub(crate) fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(error) => return Err(LogError::io(dir)(error)),
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Replaces `path` with `contents` atomically: write a temporary file, fsync it, rename it
/// over `path`, fsync the directory. A crash leaves either the old or the new contents.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TMP_SUFFIX);
    let tmp = Path::new(&tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(LogError::io(tmp))?;
    file.write_all(contents).map_err(LogError::io(tmp))?;
    file.sync_all().map_err(LogError::io(tmp))?;
    drop(file);
    fs::rename(tmp, path).map_err(LogError::io(path))?;
    fsync_dir(parent_of(path))
}

/// Removes a file and fsyncs its directory; a file that is already gone is not an error.
pub(crate) fn remove_file_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_of(path)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(LogError::io(path)(error)),
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub(crate) fn available_bytes(path: &Path) -> Result<u64> {
    let stats = rustix::fs::statvfs(path).map_err(|errno| LogError::Io {
        path: path.to_path_buf(),
        source: errno.into(),
    })?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}
