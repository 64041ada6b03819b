//! Per-partition uplink cursors: the next edge offset the core has not acknowledged.
//!
//! One file per partition, `<state_dir>/<topic>/<partition>`, holding
//! `{"version":1,"next_offset":N}`, replaced atomically (tmp, fsync, rename, fsync dir). A
//! cursor only moves forward, after the core's ack; a crash between the ack and the write
//! re-sends what the core already has, which its dedup skips. The in-memory copy is what
//! retention reads: nothing at or above a partition's cursor is deleted unless the disk
//! budget forces it.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;

const CURSOR_VERSION: u32 = 1;
/// Largest cursor file read; a valid one is about 40 bytes.
const CURSOR_FILE_BYTES_MAX: u64 = 4096;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorFile {
    version: u32,
    next_offset: u64,
}

/// The cursors of every partition, loaded on first use.
#[derive(Debug)]
pub(crate) struct Cursors {
    dir: PathBuf,
    loaded: Mutex<HashMap<(String, u32), u64>>,
}

impl Cursors {
    pub(crate) fn new(dir: PathBuf) -> Cursors {
        Cursors {
            dir,
            loaded: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, topic: &str, partition: u32) -> PathBuf {
        self.dir.join(topic).join(partition.to_string())
    }

    /// The partition's cursor, read from disk the first time (0 when it has none).
    pub(crate) fn get(&self, topic: &str, partition: u32) -> anyhow::Result<u64> {
        let key = (topic.to_string(), partition);
        if let Some(next) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(*next);
        }
        let path = self.path(topic, partition);
        let next = match std::fs::metadata(&path) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => {
                return Err(error).with_context(|| format!("cannot read {}", path.display()));
            }
            Ok(meta) if meta.len() > CURSOR_FILE_BYTES_MAX => {
                anyhow::bail!("{} is not an uplink cursor (too large)", path.display())
            }
            Ok(_) => {
                let text = std::fs::read(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let file: CursorFile = serde_json::from_slice(&text)
                    .with_context(|| format!("{} is not an uplink cursor", path.display()))?;
                anyhow::ensure!(
                    file.version == CURSOR_VERSION,
                    "{} has unknown version {}",
                    path.display(),
                    file.version
                );
                file.next_offset
            }
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        Ok(*loaded.entry(key).or_insert(next))
    }

    /// The cursor if it was loaded: what retention may rely on without touching disk.
    pub(crate) fn cached(&self, topic: &str, partition: u32) -> Option<u64> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// Moves the cursor forward to `next` and persists it (blocking: fsyncs).
    pub(crate) fn advance(&self, topic: &str, partition: u32, next: u64) -> anyhow::Result<()> {
        if self.get(topic, partition)? >= next {
            return Ok(());
        }
        let path = self.path(topic, partition);
        let dir = path.parent().expect("cursor path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let bytes = serde_json::to_vec(&CursorFile {
            version: CURSOR_VERSION,
            next_offset: next,
        })
        .expect("a cursor serializes");
        write_atomic(&path, &bytes)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let entry = loaded.entry((topic.to_string(), partition)).or_insert(0);
        *entry = (*entry).max(next);
        Ok(())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))?;
    let dir = path.parent().expect("cursor path has a parent");
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_survive_a_reload_and_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let cursors = Cursors::new(dir.path().to_path_buf());
        assert_eq!(cursors.get("mqtt", 0).unwrap(), 0);
        cursors.advance("mqtt", 0, 10).unwrap();
        cursors.advance("mqtt", 0, 5).unwrap();
        let reloaded = Cursors::new(dir.path().to_path_buf());
        assert_eq!(reloaded.get("mqtt", 0).unwrap(), 10);
        assert_eq!(reloaded.get("mqtt", 1).unwrap(), 0);
        std::fs::write(
            dir.path().join("mqtt/0"),
            b"{\"version\":9,\"next_offset\":1}",
        )
        .unwrap();
        assert!(
            Cursors::new(dir.path().to_path_buf())
                .get("mqtt", 0)
                .is_err()
        );
    }
}
