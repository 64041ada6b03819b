//! Dedup checkpoints: a topic's exactly-once state saved so a restart scans only the log tail.
//!
//! One file per topic, `<state_dir>/<topic>.json`:
//! `{"version":1,"partitions":[{"covered_offset":C,"streams":[{"edge_id":E,"edge_log":L,
//! "edge_partition":P,"next_offset":N}]}]}` (`edge_log` only when the stream's edge log has an
//! id). For each core partition, `streams` is every stream's next expected
//! edge offset over the records below `covered_offset`; records at or above it are scanned at
//! load. It is replaced atomically (tmp, fsync, rename, fsync dir), so a reader sees a whole
//! old or a whole new file.
//!
//! The log stays the source of truth: a checkpoint only says "the records below C have been
//! folded into this map". Any file that is missing, unreadable, of another version, for
//! another partition count or ahead of the log is ignored (a full scan, slower but exact);
//! it never fails a start.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::store::StreamKey;

const CHECKPOINT_VERSION: u32 = 1;
/// Largest checkpoint read: about 200,000 streams. A larger file is ignored (full scan).
pub(crate) const CHECKPOINT_FILE_BYTES_MAX: u64 = 16 << 20;

/// One core partition's saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PartitionCheckpoint {
    /// Records below this offset are folded into `next_offsets`.
    pub(crate) covered_offset: u64,
    pub(crate) next_offsets: HashMap<StreamKey, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    partitions: Vec<FilePartition>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePartition {
    covered_offset: u64,
    streams: Vec<FileStream>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStream {
    edge_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    edge_log: String,
    edge_partition: u32,
    next_offset: u64,
}

/// The directory holding every topic's checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct CheckpointDir {
    dir: PathBuf,
}

impl CheckpointDir {
    pub(crate) fn new(dir: PathBuf) -> CheckpointDir {
        CheckpointDir { dir }
    }

    fn path(&self, topic: &str) -> PathBuf {
        // Topic names are `[a-zA-Z0-9._-]` and never `.` or `..`, so they are file names.
        self.dir.join(format!("{topic}.json"))
    }

    /// The topic's checkpoint, or why there is none to use (missing, damaged, stale).
    pub(crate) fn load(
        &self,
        topic: &str,
        partitions: u32,
    ) -> Result<Vec<PartitionCheckpoint>, String> {
        let path = self.path(topic);
        let meta = std::fs::metadata(&path).map_err(|error| error.to_string())?;
        if meta.len() > CHECKPOINT_FILE_BYTES_MAX {
            return Err(format!("larger than {CHECKPOINT_FILE_BYTES_MAX} bytes"));
        }
        let text = std::fs::read(&path).map_err(|error| error.to_string())?;
        let file: File = serde_json::from_slice(&text).map_err(|error| error.to_string())?;
        if file.version != CHECKPOINT_VERSION {
            return Err(format!("unknown version {}", file.version));
        }
        if file.partitions.len() != partitions as usize {
            return Err(format!(
                "{} partitions saved, the topic has {partitions}",
                file.partitions.len()
            ));
        }
        Ok(file
            .partitions
            .into_iter()
            .map(|partition| PartitionCheckpoint {
                covered_offset: partition.covered_offset,
                next_offsets: partition
                    .streams
                    .into_iter()
                    .map(|stream| {
                        (
                            StreamKey {
                                edge_id: stream.edge_id,
                                edge_log: stream.edge_log,
                                edge_partition: stream.edge_partition,
                            },
                            stream.next_offset,
                        )
                    })
                    .collect(),
            })
            .collect())
    }

    /// Replaces the topic's checkpoint atomically and durably.
    pub(crate) fn save(
        &self,
        topic: &str,
        partitions: &[PartitionCheckpoint],
    ) -> std::io::Result<()> {
        let file = File {
            version: CHECKPOINT_VERSION,
            partitions: partitions
                .iter()
                .map(|partition| {
                    let mut streams: Vec<FileStream> = partition
                        .next_offsets
                        .iter()
                        .map(|(stream, next)| FileStream {
                            edge_id: stream.edge_id.clone(),
                            edge_log: stream.edge_log.clone(),
                            edge_partition: stream.edge_partition,
                            next_offset: *next,
                        })
                        .collect();
                    streams.sort_by(|a, b| {
                        (&a.edge_id, &a.edge_log, a.edge_partition).cmp(&(
                            &b.edge_id,
                            &b.edge_log,
                            b.edge_partition,
                        ))
                    });
                    FilePartition {
                        covered_offset: partition.covered_offset,
                        streams,
                    }
                })
                .collect(),
        };
        let text = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir)?;
            if let Some(parent) = self.dir.parent() {
                fsync_dir(parent)?;
            }
        }
        write_atomic(&self.path(topic), &text)
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("a checkpoint path has a directory");
    let tmp = path.with_extension("json.tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(edge: &str, partition: u32) -> StreamKey {
        StreamKey {
            edge_id: edge.into(),
            edge_log: String::new(),
            edge_partition: partition,
        }
    }

    #[test]
    fn saves_and_loads_and_pins_its_format() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = CheckpointDir::new(dir.path().join("state"));
        let saved = vec![
            PartitionCheckpoint {
                covered_offset: 12,
                next_offsets: [
                    (stream("e2", 0), 5),
                    (stream("e1", 1), 7),
                    (
                        StreamKey {
                            edge_log: "5e1f".into(),
                            ..stream("e1", 1)
                        },
                        3,
                    ),
                ]
                .into(),
            },
            PartitionCheckpoint::default(),
        ];
        checkpoints.save("mqtt", &saved).unwrap();
        assert_eq!(checkpoints.load("mqtt", 2).unwrap(), saved);
        let text = std::fs::read_to_string(dir.path().join("state/mqtt.json")).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"partitions":[{"covered_offset":12,"streams":[{"edge_id":"e1","edge_partition":1,"next_offset":7},{"edge_id":"e1","edge_log":"5e1f","edge_partition":1,"next_offset":3},{"edge_id":"e2","edge_partition":0,"next_offset":5}]},{"covered_offset":0,"streams":[]}]}"#
        );
        assert!(
            checkpoints
                .load("mqtt", 3)
                .unwrap_err()
                .contains("partitions")
        );
        assert!(checkpoints.load("other", 2).is_err());
    }

    #[test]
    fn damaged_files_are_reasons_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = CheckpointDir::new(dir.path().to_path_buf());
        for garbage in [
            &b""[..],
            b"{",
            b"[]",
            br#"{"version":2,"partitions":[]}"#,
            br#"{"version":1,"partitions":[],"x":1}"#,
        ] {
            std::fs::write(dir.path().join("t.json"), garbage).unwrap();
            assert!(checkpoints.load("t", 0).is_err(), "{garbage:?}");
        }
        let big = std::fs::File::create(dir.path().join("t.json")).unwrap();
        big.set_len(CHECKPOINT_FILE_BYTES_MAX + 1).unwrap();
        assert!(checkpoints.load("t", 0).unwrap_err().contains("larger"));
    }
}
