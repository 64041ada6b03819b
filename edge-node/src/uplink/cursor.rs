//! Per-partition uplink cursors: the next edge offset the core has not acknowledged.
//!
//! One file per partition, `<state_dir>/<topic>/<partition>`, holding
//! `{"version":1,"next_offset":N,"log":"<id>"}`, replaced atomically (tmp, fsync, rename,
//! fsync dir). `log` is the id of the log the offset counts in ([`silt_log::LogManager::id`]): a cursor
//! left by another log (the data directory wiped and made anew, the state directory kept)
//! is not used, or the new log's records below it would never be shipped. A
//! cursor only moves forward, after the core's ack. The acknowledged position is kept in
//! memory at once (what retention, the lag metrics and a reconnecting stream read); the file
//! follows at most [`PERSIST_INTERVAL`] behind, and at a clean stop ([`Cursors::persist_all`]).
//! A crash before the file caught up re-sends what the core already has, which its dedup
//! skips: the file is where to resume, not what was delivered. Writing it on every ack cost
//! two fsyncs and a rename each time, about 13% of the edge's CPU in a drain, and an SD card's
//! wear at every group commit of a live load. Nothing at or above a partition's
//! acknowledged position is deleted unless the disk budget forces it.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;

const CURSOR_VERSION: u32 = 1;
/// Largest cursor file read; a valid one is about 40 bytes.
const CURSOR_FILE_BYTES_MAX: u64 = 4096;
/// Longest a stream leaves an acknowledged cursor unwritten while acks keep coming: what a
/// crash can make the edge send twice, as a Kafka consumer's `auto.commit.interval.ms`
/// bounds what it reads twice.
pub(crate) const PERSIST_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorFile {
    version: u32,
    next_offset: u64,
    /// Absent for a log without an id, and in files written before cursors named their log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    log: Option<String>,
}

/// One partition's cursor: acknowledged, and as last written to its file.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    acked: u64,
    persisted: u64,
}

/// The cursors of every partition, loaded on first use.
#[derive(Debug)]
pub(crate) struct Cursors {
    dir: PathBuf,
    /// The id of the log the cursors count in; changed by [`Cursors::move_to_log`].
    log: Mutex<Option<String>>,
    loaded: Mutex<HashMap<(String, u32), Cursor>>,
    /// Held while a file is written, so two writers never share its tmp file.
    writing: Mutex<()>,
}

impl Cursors {
    pub(crate) fn new(dir: PathBuf, log: Option<String>) -> Cursors {
        Cursors {
            dir,
            log: Mutex::new(log),
            loaded: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
        }
    }

    fn path(&self, topic: &str, partition: u32) -> PathBuf {
        self.dir.join(topic).join(partition.to_string())
    }

    /// The partition's acknowledged cursor, read from disk the first time (0 when it has
    /// none, or when its file was written for another log).
    pub(crate) fn get(&self, topic: &str, partition: u32) -> anyhow::Result<u64> {
        let key = (topic.to_string(), partition);
        if let Some(cursor) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(cursor.acked);
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
                let log = self.log();
                if file.log == log {
                    file.next_offset
                } else {
                    tracing::warn!(
                        cursor = %path.display(),
                        cursor_log = file.log.as_deref().unwrap_or("none"),
                        log = log.as_deref().unwrap_or("none"),
                        "uplink cursor belongs to another log (the data directory was made anew): shipping this partition from its start"
                    );
                    0
                }
            }
        };
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let cursor = loaded.entry(key).or_insert(Cursor {
            acked: next,
            persisted: next,
        });
        Ok(cursor.acked)
    }

    /// The cursor if it was loaded: what retention may rely on without touching disk.
    pub(crate) fn cached(&self, topic: &str, partition: u32) -> Option<u64> {
        self.loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(topic.to_string(), partition))
            .map(|cursor| cursor.acked)
    }

    /// Moves the partition's acknowledged cursor forward to `next`, in memory only; the
    /// partition must have been read with [`Cursors::get`].
    pub(crate) fn ack(&self, topic: &str, partition: u32, next: u64) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cursor) = loaded.get_mut(&(topic.to_string(), partition)) {
            cursor.acked = cursor.acked.max(next);
        }
    }

    /// Writes the partition's file if it is behind the acknowledged cursor (blocking:
    /// fsyncs).
    pub(crate) fn persist(&self, topic: &str, partition: u32) -> anyhow::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let key = (topic.to_string(), partition);
        let Some(cursor) = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied()
        else {
            return Ok(());
        };
        if cursor.persisted >= cursor.acked {
            return Ok(());
        }
        self.write_file(topic, partition, cursor.acked, self.log())?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = loaded.get_mut(&key) {
            entry.persisted = entry.persisted.max(cursor.acked);
        }
        Ok(())
    }

    /// Writes every file that is behind its acknowledged cursor (blocking), at a clean stop,
    /// so a restart re-sends nothing; the first failure is returned after trying them all.
    pub(crate) fn persist_all(&self) -> anyhow::Result<()> {
        let behind: Vec<(String, u32)> = self
            .loaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, cursor)| cursor.persisted < cursor.acked)
            .map(|(key, _)| key.clone())
            .collect();
        let mut first_error = None;
        for (topic, partition) in behind {
            if let Err(error) = self.persist(&topic, partition) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The id of the log the cursors count in.
    pub(crate) fn log(&self) -> Option<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the cursors count in log `log` (the edge log's new id, see
    /// [`silt_log::LogManager::renew_id`]) and sets each partition of `starts` to its offset
    /// there, written at once (blocking: fsyncs), back or forward. A partition not in
    /// `starts` is read as belonging to another log, from its start.
    pub(crate) fn move_to_log(
        &self,
        log: String,
        starts: &[((String, u32), u64)],
    ) -> anyhow::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = Some(log.clone());
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        loaded.clear();
        for ((topic, partition), start) in starts {
            // In memory first: a file that fails to be written is re-sent from there after
            // a restart, as a new log's.
            loaded.insert(
                (topic.clone(), *partition),
                Cursor {
                    acked: *start,
                    persisted: *start,
                },
            );
        }
        drop(loaded);
        let mut first_error = None;
        for ((topic, partition), start) in starts {
            if let Err(error) = self.write_file(topic, *partition, *start, Some(log.clone())) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Replaces the partition's file (blocking: fsyncs); the caller holds `writing`.
    fn write_file(
        &self,
        topic: &str,
        partition: u32,
        next_offset: u64,
        log: Option<String>,
    ) -> anyhow::Result<()> {
        let path = self.path(topic, partition);
        let dir = path.parent().expect("cursor path has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let bytes = serde_json::to_vec(&CursorFile {
            version: CURSOR_VERSION,
            next_offset,
            log,
        })
        .expect("a cursor serializes");
        write_atomic(&path, &bytes)
    }

    /// Moves the cursor forward to `next` and writes it at once (blocking: fsyncs).
    #[cfg(test)]
    pub(crate) fn advance(&self, topic: &str, partition: u32, next: u64) -> anyhow::Result<()> {
        self.get(topic, partition)?;
        self.ack(topic, partition, next);
        self.persist(topic, partition)
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

    fn log() -> Option<String> {
        Some("5e1f".to_string())
    }

    #[test]
    fn cursors_survive_a_reload_and_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let cursors = Cursors::new(dir.path().to_path_buf(), log());
        assert_eq!(cursors.get("mqtt", 0).unwrap(), 0);
        cursors.advance("mqtt", 0, 10).unwrap();
        cursors.advance("mqtt", 0, 5).unwrap();
        let reloaded = Cursors::new(dir.path().to_path_buf(), log());
        assert_eq!(reloaded.get("mqtt", 0).unwrap(), 10);
        assert_eq!(reloaded.get("mqtt", 1).unwrap(), 0);

        // An ack moves the cursor in memory; the file follows on persist.
        reloaded.ack("mqtt", 0, 25);
        reloaded.ack("mqtt", 1, 7);
        reloaded.ack("mqtt", 0, 20);
        assert_eq!(reloaded.get("mqtt", 0).unwrap(), 25);
        assert_eq!(reloaded.cached("mqtt", 1), Some(7));
        assert_eq!(
            Cursors::new(dir.path().to_path_buf(), log())
                .get("mqtt", 0)
                .unwrap(),
            10,
            "not written yet"
        );
        reloaded.persist_all().unwrap();
        let after = Cursors::new(dir.path().to_path_buf(), log());
        assert_eq!(after.get("mqtt", 0).unwrap(), 25);
        assert_eq!(after.get("mqtt", 1).unwrap(), 7);
        // A partition never read is not written from an ack alone.
        after.ack("mqtt", 2, 3);
        after.persist_all().unwrap();
        assert_eq!(
            Cursors::new(dir.path().to_path_buf(), log())
                .get("mqtt", 2)
                .unwrap(),
            0
        );
        std::fs::write(
            dir.path().join("mqtt/0"),
            b"{\"version\":9,\"next_offset\":1}",
        )
        .unwrap();
        assert!(
            Cursors::new(dir.path().to_path_buf(), log())
                .get("mqtt", 0)
                .is_err()
        );
    }

    #[test]
    fn a_cursor_written_for_another_log_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cursors = Cursors::new(dir.path().to_path_buf(), log());
        cursors.advance("mqtt", 0, 40).unwrap();
        // The data directory made anew: its log has another id, and starts at offset 0.
        let anew = Cursors::new(dir.path().to_path_buf(), Some("77aa".to_string()));
        assert_eq!(anew.get("mqtt", 0).unwrap(), 0);
        anew.advance("mqtt", 0, 3).unwrap();
        assert_eq!(
            Cursors::new(dir.path().to_path_buf(), Some("77aa".to_string()))
                .get("mqtt", 0)
                .unwrap(),
            3
        );
        // A cursor from before cursors named their log is used by a log without an id
        // (made by the same build), and by no other.
        std::fs::write(
            dir.path().join("mqtt/0"),
            b"{\"version\":1,\"next_offset\":9}",
        )
        .unwrap();
        assert_eq!(
            Cursors::new(dir.path().to_path_buf(), None)
                .get("mqtt", 0)
                .unwrap(),
            9
        );
        assert_eq!(
            Cursors::new(dir.path().to_path_buf(), log())
                .get("mqtt", 0)
                .unwrap(),
            0
        );
    }

    #[test]
    fn cursors_moved_to_a_new_log_keep_the_given_offsets_there() {
        let dir = tempfile::tempdir().unwrap();
        let cursors = Cursors::new(dir.path().to_path_buf(), log());
        cursors.advance("mqtt", 0, 40).unwrap();
        cursors.advance("mqtt", 1, 7).unwrap();
        cursors.advance("other", 0, 2).unwrap();
        // Partition 0 goes back to 25 (its log's end), partition 1 keeps 7; "other" is not
        // moved and counts as another log's.
        let starts = [(("mqtt".to_string(), 0), 25), (("mqtt".to_string(), 1), 7)];
        cursors.move_to_log("9b0c".to_string(), &starts).unwrap();
        assert_eq!(cursors.log().as_deref(), Some("9b0c"));
        assert_eq!(cursors.get("mqtt", 0).unwrap(), 25);
        assert_eq!(cursors.get("mqtt", 1).unwrap(), 7);
        assert_eq!(cursors.get("other", 0).unwrap(), 0);
        cursors.ack("mqtt", 0, 30);
        cursors.persist_all().unwrap();
        let reopened = Cursors::new(dir.path().to_path_buf(), Some("9b0c".to_string()));
        assert_eq!(reopened.get("mqtt", 0).unwrap(), 30);
        assert_eq!(reopened.get("mqtt", 1).unwrap(), 7);
        // Under the old id, the files are another log's.
        let old = Cursors::new(dir.path().to_path_buf(), log());
        assert_eq!(old.get("mqtt", 0).unwrap(), 0);
    }
}
