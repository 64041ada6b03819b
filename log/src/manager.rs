//! The data directory: its topics and partitions, the clean-shutdown marker, the relaxed
//! flusher, retention across all partitions, and the shared disk budget.
//!
//! Layout of a data directory:
//!
//! ```text
//! <data>/meta.json                  format marker and id: {"format":"silt-log","version":1,"id":"<16 hex>"}
//! <data>/.lock                      held (flock) while a process has the directory open
//! <data>/.clean_shutdown            present only between a clean close and the next open
//! <data>/<topic>/topic.json         partition count and config overrides; written last
//! <data>/<topic>/<partition>/checkpoint               recovery point and log start offset
//! <data>/<topic>/<partition>/<base_offset:020>.log    segment data: RecordBatch v2 bytes
//! <data>/<topic>/<partition>/<base_offset:020>.index  sparse offset index
//! <data>/<topic>/<partition>/<base_offset:020>.timeindex  sparse time index
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{FlushPolicy, LogConfig, PREALLOCATE_BYTES_MAX, TopicConfig};
use crate::disk::{Disk, DiskStats};
use crate::error::{LogError, Result};
use crate::fsutil;
use crate::partition::{self, DeleteReport, PartitionLog, RecoveryReport};

/// Most partitions one topic may have.
pub const PARTITIONS_MAX: u32 = 10_000;
/// Longest topic name, as in Kafka.
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

const META_FILE: &str = "meta.json";
const LOCK_FILE: &str = ".lock";
const CLEAN_SHUTDOWN_FILE: &str = ".clean_shutdown";
const TOPIC_FILE: &str = "topic.json";
const FORMAT_NAME: &str = "silt-log";
const FORMAT_VERSION: u32 = 1;
/// Marks a topic directory being deleted; `~` cannot appear in topic names.
const DELETED_MARKER: &str = "~deleted-";

/// Unknown fields are ignored (and dropped when the file is written again), so that a build
/// can open a directory a later one added a field to: going back to an older binary must not
/// lock the operator out of the data. `format` and `version` are what tell a foreign file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Meta {
    format: String,
    version: u32,
    /// Random at creation ([`LogManager::id`]); absent in directories made before logs had
    /// ids, which keep none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// The machine that last used the log, as its user recorded it ([`LogManager::host`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
}

/// What `meta.json` says about whose log this is.
#[derive(Debug, Clone, Default)]
struct Identity {
    id: Option<String>,
    host: Option<String>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicFile {
    version: u32,
    partitions: u32,
    #[serde(default)]
    config: BTreeMap<String, String>,
}

/// A topic as listed by the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    /// Effective config: defaults with the overrides applied.
    pub config: TopicConfig,
    /// Only the keys set for this topic.
    pub overrides: BTreeMap<String, String>,
}

#[derive(Debug)]
struct Topic {
    partitions: Vec<Arc<PartitionLog>>,
    overrides: BTreeMap<String, String>,
    config: TopicConfig,
}

#[derive(Debug)]
struct Flusher {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

/// An open data directory. Close it with [`LogManager::close`] for a clean shutdown; dropping
/// it without closing leaves the directory as after a crash, to be recovered on next open.
#[derive(Debug)]
pub struct LogManager {
    config: LogConfig,
    disk: Arc<Disk>,
    topics: RwLock<BTreeMap<String, Topic>>,
    recovery: RecoveryReport,
    was_clean: bool,
    flusher: Mutex<Option<Flusher>>,
    closed: AtomicBool,
    /// Changed only by [`LogManager::renew_id`] and [`LogManager::set_host`].
    identity: RwLock<Identity>,
    _lock: File,
}

impl LogManager {
    /// Opens the data directory, creating it when missing or empty, and recovers every
    /// partition if the last shutdown was not clean.
    pub fn open(config: LogConfig) -> Result<Arc<LogManager>> {
        let dir = config.data_dir.clone();
        fsutil::create_dir_durable(&dir)?;
        let identity = check_meta(&dir)?;
        let lock = lock_dir(&dir)?;
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        let clean = marker.exists();
        let disk = Arc::new(Disk::new(&dir, config.budget, config.fs_reserve_bytes));
        let options = partition::OpenOptions {
            clean,
            flush: config.flush,
            max_batch_bytes: config.max_batch_bytes,
            index_interval_bytes: config.index_interval_bytes,
            preallocate_bytes: config.preallocate_bytes.min(PREALLOCATE_BYTES_MAX),
            disk: disk.clone(),
        };
        let mut topics = BTreeMap::new();
        let mut recovery = RecoveryReport::default();
        for (name, path) in list_topic_dirs(&dir)? {
            let Some(file) = read_topic_file(&path)? else {
                // Creation never finished, so the topic was never acknowledged.
                tracing::warn!(topic = %name, "removing half-created topic");
                remove_dir_durable(&path)?;
                continue;
            };
            let topic_config = config
                .topic_defaults
                .clone()
                .with_overrides(file.config.iter())?;
            let mut partitions = Vec::with_capacity(file.partitions as usize);
            for index in 0..file.partitions {
                let (log, report) = PartitionLog::open(
                    &name,
                    index,
                    &path.join(index.to_string()),
                    topic_config.clone(),
                    &options,
                )?;
                recovery.add(report);
                let log = Arc::new(log);
                disk.register(Arc::downgrade(&log));
                partitions.push(log);
            }
            topics.insert(
                name,
                Topic {
                    partitions,
                    overrides: file.config,
                    config: topic_config,
                },
            );
        }
        // Writes may only start once the marker is gone, or a crash would look clean.
        fsutil::remove_file_durable(&marker)?;
        if clean {
            tracing::info!(dir = %dir.display(), "opened cleanly shut down data directory");
        } else {
            tracing::info!(
                dir = %dir.display(),
                segments_recovered = recovery.segments_recovered,
                bytes_truncated = recovery.bytes_truncated,
                "recovered data directory"
            );
        }
        let manager = Arc::new(LogManager {
            config,
            disk,
            topics: RwLock::new(topics),
            recovery,
            was_clean: clean,
            flusher: Mutex::new(None),
            closed: AtomicBool::new(false),
            identity: RwLock::new(identity),
            _lock: lock,
        });
        if let FlushPolicy::RelaxedUnsafe { interval } = manager.config.flush {
            manager.start_flusher(interval)?;
        }
        Ok(manager)
    }

    fn start_flusher(self: &Arc<Self>, interval: Duration) -> Result<()> {
        let (stop, stopped) = mpsc::channel::<()>();
        let weak = Arc::downgrade(self);
        let thread = std::thread::Builder::new()
            .name("silt-log-flusher".into())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                    }
                    // Hold the manager only to list partitions, so dropping its last handle
                    // elsewhere releases the directory lock without waiting for this pass.
                    let Some(partitions) = weak.upgrade().map(|m| m.all_partitions()) else {
                        return;
                    };
                    for partition in partitions {
                        if let Err(error) = partition.flush() {
                            tracing::error!(topic = partition.topic(), partition = partition.partition(), %error, "background flush failed");
                        }
                    }
                }
            })
            .map_err(LogError::io(&self.config.data_dir))?;
        *self.flusher.lock().unwrap_or_else(|e| e.into_inner()) = Some(Flusher { stop, thread });
        Ok(())
    }

    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Whether the previous process closed the directory cleanly.
    pub fn opened_clean(&self) -> bool {
        self.was_clean
    }

    /// The log's id: 64 random bits in hex, chosen when its data directory was created and
    /// kept in `meta.json`, so a log that replaced another in the same place (a wiped disk)
    /// is told apart from it. 16 digits are enough to tell the logs of one edge apart and
    /// short, as every record the uplink ships from the log names it. `None` for a directory
    /// created before logs had ids.
    pub fn id(&self) -> Option<String> {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .id
            .clone()
    }

    /// The machine that last used the log, as its user recorded it with
    /// [`LogManager::set_host`] (the edge: a fingerprint of the device, so that a data
    /// directory copied to another device is told from the original); `None` until then.
    pub fn host(&self) -> Option<String> {
        self.identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .host
            .clone()
    }

    /// Records `host` in `meta.json` (atomically and durably), 1 to 64 hex digits.
    pub fn set_host(&self, host: &str) -> Result<()> {
        if !is_hex_id(host, HOST_DIGITS_MAX) {
            return Err(LogError::InvalidHost(host.to_string()));
        }
        let mut identity = self.identity.write().unwrap_or_else(|e| e.into_inner());
        let updated = Identity {
            host: Some(host.to_string()),
            ..identity.clone()
        };
        write_meta(&self.config.data_dir, &updated)?;
        *identity = updated;
        Ok(())
    }

    /// Gives the log a new id, written to `meta.json` (atomically and durably) before it is
    /// returned, and returns it. For a log found to have gone back: restored from a backup or
    /// copied to another device, it holds the id of the log it was copied from, and its new
    /// records reuse offsets that log already gave to others. A log without an id gets one.
    pub fn renew_id(&self) -> Result<String> {
        let mut identity = self.identity.write().unwrap_or_else(|e| e.into_inner());
        let renewed = new_log_id()?;
        let updated = Identity {
            id: Some(renewed.clone()),
            ..identity.clone()
        };
        write_meta(&self.config.data_dir, &updated)?;
        *identity = updated;
        Ok(renewed)
    }

    /// What recovery did at open.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.recovery
    }

    /// Creates a topic with `partitions` partitions and the given config overrides.
    pub fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        overrides: &BTreeMap<String, String>,
    ) -> Result<TopicInfo> {
        self.check_open()?;
        validate_topic_name(name)?;
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(LogError::InvalidPartitionCount(partitions));
        }
        let topic_config = self
            .config
            .topic_defaults
            .clone()
            .with_overrides(overrides.iter())?;
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if topics.contains_key(name) {
            return Err(LogError::TopicExists(name.to_string()));
        }
        let path = self.config.data_dir.join(name);
        if path.exists() {
            return Err(LogError::ForeignFile { path });
        }
        fsutil::create_dir_durable(&path)?;
        let options = self.open_options(false);
        let mut logs = Vec::with_capacity(partitions as usize);
        for index in 0..partitions {
            let (log, _) = PartitionLog::open(
                name,
                index,
                &path.join(index.to_string()),
                topic_config.clone(),
                &options,
            )?;
            let log = Arc::new(log);
            self.disk.register(Arc::downgrade(&log));
            logs.push(log);
        }
        write_topic_file(&path, partitions, overrides)?;
        tracing::info!(topic = name, partitions, "created topic");
        topics.insert(
            name.to_string(),
            Topic {
                partitions: logs,
                overrides: overrides.clone(),
                config: topic_config.clone(),
            },
        );
        Ok(TopicInfo {
            name: name.to_string(),
            partitions,
            config: topic_config,
            overrides: overrides.clone(),
        })
    }

    /// Creates the topic with default config unless it exists; returns its description.
    pub fn ensure_topic(&self, name: &str, partitions: u32) -> Result<TopicInfo> {
        if let Some(info) = self.topic(name) {
            return Ok(info);
        }
        match self.create_topic(name, partitions, &BTreeMap::new()) {
            Err(LogError::TopicExists(_)) => self
                .topic(name)
                .ok_or_else(|| LogError::UnknownTopic(name.to_string())),
            other => other,
        }
    }

    /// Replaces a topic's config overrides, validating every key first.
    pub fn alter_topic_config(
        &self,
        name: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<TopicInfo> {
        self.check_open()?;
        let topic_config = self
            .config
            .topic_defaults
            .clone()
            .with_overrides(overrides.iter())?;
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let topic = topics
            .get_mut(name)
            .ok_or_else(|| LogError::UnknownTopic(name.to_string()))?;
        let partitions = topic.partitions.len() as u32;
        write_topic_file(&self.config.data_dir.join(name), partitions, overrides)?;
        for partition in &topic.partitions {
            partition.set_config(topic_config.clone());
        }
        topic.overrides = overrides.clone();
        topic.config = topic_config.clone();
        Ok(TopicInfo {
            name: name.to_string(),
            partitions,
            config: topic_config,
            overrides: overrides.clone(),
        })
    }

    /// Deletes a topic and all its data. The directory is renamed away first, so a crash
    /// mid-delete never leaves a half-deleted topic that looks alive.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let topic = topics
            .remove(name)
            .ok_or_else(|| LogError::UnknownTopic(name.to_string()))?;
        for partition in &topic.partitions {
            self.disk.sub_used(partition.size_bytes());
        }
        drop(topic);
        let path = self.config.data_dir.join(name);
        let doomed = self
            .config
            .data_dir
            .join(format!("{name}{DELETED_MARKER}{}", crate::time::now_ms()));
        fs::rename(&path, &doomed).map_err(LogError::io(&path))?;
        fsutil::fsync_dir(&self.config.data_dir)?;
        remove_dir_durable(&doomed)?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    pub fn topic(&self, name: &str) -> Option<TopicInfo> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.get(name).map(|topic| topic_info(name, topic))
    }

    pub fn topics(&self) -> Vec<TopicInfo> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics
            .iter()
            .map(|(name, topic)| topic_info(name, topic))
            .collect()
    }

    /// The log of one partition.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<PartitionLog>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        let entry = topics
            .get(topic)
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))?;
        entry
            .partitions
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| LogError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })
    }

    fn all_partitions(&self) -> Vec<Arc<PartitionLog>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics
            .values()
            .flat_map(|topic| topic.partitions.iter().cloned())
            .collect()
    }

    /// Applies time and size retention to every partition (local-only data directories: the
    /// whole-log limits `retention.ms` and `retention.bytes`).
    pub fn enforce_retention(&self, now_ms: i64) -> Result<DeleteReport> {
        self.check_open()?;
        let mut total = DeleteReport::default();
        for partition in self.all_partitions() {
            total.add(partition.enforce_retention(now_ms, None)?);
        }
        Ok(total)
    }

    /// Bytes used against the budget and what the budget policy dropped or refused.
    pub fn disk_stats(&self) -> DiskStats {
        self.disk.stats()
    }

    /// Flushes and closes every partition, then writes the clean-shutdown marker, so the next
    /// open trusts the indexes and skips recovery.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.stop_flusher();
        for partition in self.all_partitions() {
            partition.close()?;
        }
        let marker = self.config.data_dir.join(CLEAN_SHUTDOWN_FILE);
        fsutil::write_atomic(&marker, b"")?;
        tracing::info!(dir = %self.config.data_dir.display(), "closed data directory cleanly");
        Ok(())
    }

    fn stop_flusher(&self) {
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(flusher) = flusher {
            let _ = flusher.stop.send(());
            if flusher.thread.thread().id() != std::thread::current().id() {
                let _ = flusher.thread.join();
            }
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        Ok(())
    }

    fn open_options(&self, clean: bool) -> partition::OpenOptions {
        partition::OpenOptions {
            clean,
            flush: self.config.flush,
            max_batch_bytes: self.config.max_batch_bytes,
            index_interval_bytes: self.config.index_interval_bytes,
            preallocate_bytes: self.config.preallocate_bytes.min(PREALLOCATE_BYTES_MAX),
            disk: self.disk.clone(),
        }
    }
}

impl Drop for LogManager {
    fn drop(&mut self) {
        self.stop_flusher();
    }
}

fn topic_info(name: &str, topic: &Topic) -> TopicInfo {
    TopicInfo {
        name: name.to_string(),
        partitions: topic.partitions.len() as u32,
        config: topic.config.clone(),
        overrides: topic.overrides.clone(),
    }
}

/// Directories of a data directory that belong to the node, not to the log: `tls` holds a
/// core's development CA and certificates (`<data-dir>/tls/ca.pem`). The log skips them when
/// it opens, and no topic may take their names.
pub const RESERVED_DIR_NAMES: &[&str] = &[TLS_DIR_NAME];

/// The reserved directory for a node's TLS files.
pub const TLS_DIR_NAME: &str = "tls";

/// Kafka's topic name rules: 1 to 249 of `[a-zA-Z0-9._-]`, and not `.` or `..`; nor one of
/// [`RESERVED_DIR_NAMES`].
pub fn validate_topic_name(name: &str) -> Result<()> {
    let invalid = |reason| {
        Err(LogError::InvalidTopicName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > TOPIC_NAME_BYTES_MAX {
        return invalid("longer than 249 characters");
    }
    if name == "." || name == ".." {
        return invalid("'.' and '..' are reserved");
    }
    if RESERVED_DIR_NAMES.contains(&name) {
        return invalid("the name is reserved for the node's own files in the data directory");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Creates `meta.json` in a new or empty directory, or checks the one that is there;
/// returns the log's id.
fn check_meta(dir: &Path) -> Result<Identity> {
    let path = dir.join(META_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let meta: Meta =
                serde_json::from_slice(&bytes).map_err(|error| LogError::ForeignDirectory {
                    path: dir.to_path_buf(),
                    reason: format!("unreadable {META_FILE}: {error}"),
                })?;
            if meta.format != FORMAT_NAME || meta.version != FORMAT_VERSION {
                return Err(LogError::ForeignDirectory {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "format {} version {}, this build reads {FORMAT_NAME} version {FORMAT_VERSION}",
                        meta.format, meta.version
                    ),
                });
            }
            for (field, value, digits_max) in [
                ("id", &meta.id, LOG_ID_DIGITS_MAX),
                ("host", &meta.host, HOST_DIGITS_MAX),
            ] {
                if let Some(value) = value
                    && !is_hex_id(value, digits_max)
                {
                    return Err(LogError::ForeignDirectory {
                        path: dir.to_path_buf(),
                        reason: format!(
                            "{META_FILE} has {field} {value:?}, not 1 to {digits_max} hex digits"
                        ),
                    });
                }
            }
            Ok(Identity {
                id: meta.id,
                host: meta.host,
            })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut entries = fs::read_dir(dir).map_err(LogError::io(dir))?;
            if entries.next().is_some() {
                return Err(LogError::ForeignDirectory {
                    path: dir.to_path_buf(),
                    reason: format!("it is not empty and has no {META_FILE}"),
                });
            }
            let identity = Identity {
                id: Some(new_log_id()?),
                host: None,
            };
            write_meta(dir, &identity)?;
            Ok(identity)
        }
        Err(error) => Err(LogError::io(path)(error)),
    }
}

/// Writes `meta.json` with `identity`, atomically and durably.
fn write_meta(dir: &Path, identity: &Identity) -> Result<()> {
    let meta = Meta {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        id: identity.id.clone(),
        host: identity.host.clone(),
    };
    let bytes = serde_json::to_vec(&meta).expect("meta always serializes");
    fsutil::write_atomic(&dir.join(META_FILE), &bytes)
}

/// Most hex digits an id read from `meta.json` may have (the uplink carries it in a field of
/// at most 64 bytes); a new log's has 16.
const LOG_ID_DIGITS_MAX: usize = 32;

/// Most hex digits of a host in `meta.json` (a 256-bit digest).
const HOST_DIGITS_MAX: usize = 64;

/// Whether `id` is 1 to `digits_max` hex digits, as an id or host in `meta.json` must be.
fn is_hex_id(id: &str, digits_max: usize) -> bool {
    (1..=digits_max).contains(&id.len()) && id.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// 64 random bits in hex, from the kernel's random source.
fn new_log_id() -> Result<String> {
    const SOURCE: &str = "/dev/urandom";
    let mut bits = [0u8; 8];
    File::open(SOURCE)
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut bits))
        .map_err(LogError::io(Path::new(SOURCE)))?;
    Ok(bits.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(LogError::io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(LogError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(error)) => Err(LogError::io(path)(error)),
    }
}

/// Topic directories of the data directory, after finishing interrupted topic deletions.
fn list_topic_dirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut topics = Vec::new();
    for entry in fs::read_dir(dir).map_err(LogError::io(dir))? {
        let entry = entry.map_err(LogError::io(dir))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(LogError::ForeignFile { path });
        };
        if name == META_FILE
            || name == LOCK_FILE
            || name == CLEAN_SHUTDOWN_FILE
            || name == "lost+found"
            || (RESERVED_DIR_NAMES.contains(&name.as_str()) && path.is_dir())
        {
            continue;
        }
        if name.ends_with(fsutil::TMP_SUFFIX) {
            fsutil::remove_file_durable(&path)?;
            continue;
        }
        if name.contains(DELETED_MARKER) {
            remove_dir_durable(&path)?;
            continue;
        }
        if !path.is_dir() || validate_topic_name(&name).is_err() {
            return Err(LogError::ForeignFile { path });
        }
        topics.push((name, path));
    }
    topics.sort();
    Ok(topics)
}

fn read_topic_file(dir: &Path) -> Result<Option<TopicFile>> {
    let path = dir.join(TOPIC_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(LogError::io(path)(error)),
    };
    let file: TopicFile = serde_json::from_slice(&bytes)
        .map_err(|error| LogError::corrupt(&path, error.to_string()))?;
    if file.version != FORMAT_VERSION {
        return Err(LogError::corrupt(
            &path,
            format!("unsupported version {}", file.version),
        ));
    }
    if file.partitions == 0 || file.partitions > PARTITIONS_MAX {
        return Err(LogError::corrupt(
            &path,
            format!("invalid partition count {}", file.partitions),
        ));
    }
    // Partition directories beyond the count are not ours to guess about.
    for entry in fs::read_dir(dir).map_err(LogError::io(dir))? {
        let entry = entry.map_err(LogError::io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == TOPIC_FILE || name.ends_with(fsutil::TMP_SUFFIX) {
            continue;
        }
        match name.parse::<u32>() {
            Ok(index) if index < file.partitions && name == index.to_string() => {}
            _ => return Err(LogError::ForeignFile { path: entry.path() }),
        }
    }
    Ok(Some(file))
}

fn write_topic_file(dir: &Path, partitions: u32, config: &BTreeMap<String, String>) -> Result<()> {
    let file = TopicFile {
        version: FORMAT_VERSION,
        partitions,
        config: config.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("topic file always serializes");
    fsutil::write_atomic(&dir.join(TOPIC_FILE), &bytes)
}

fn remove_dir_durable(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(LogError::io(path)(error)),
    }
    fsutil::fsync_dir(fsutil::parent_of(path))
}
