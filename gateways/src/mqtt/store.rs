//! The MQTT broker's durable state: persistent sessions (subscriptions and queued QoS 1/2
//! messages) and retained messages, kept in a write-ahead journal so that they survive a
//! reconnect, a node restart and kill -9.
//!
//! The broker keeps its own live state; this store holds a mirror of the durable part of it
//! and a journal of the [`Op`]s that built the mirror. The broker calls it from one dedicated
//! thread, so the code is blocking `std::fs` and takes `&mut self`.
//!
//! # Format (version 1)
//! One file, `<dir>/mqtt-state.journal`: a 12-byte header (the magic `SILTMQST`, then the
//! format version as a u32 LE), then entries `[u32 LE body length][u32 LE CRC-32C of the
//! body][body]`. A body is `[u8 op kind][fields]`: integers are fixed-width little-endian,
//! strings and byte strings are a u32 LE length then the bytes, an option is a `u8` tag (0 or
//! 1) then the value, a bool is one byte, 0 or 1. One entry holds one op.
//!
//! Op kinds 10 and 11 (inbound QoS 2 state), 12 to 14 (wills) and 15 (a queued copy with
//! subscription identifiers) came after the first release of version 1: a build without them
//! refuses a journal holding them as undecodable, never misreads it, and every older entry
//! still loads. A queued copy without subscription identifiers is still written as kind 6.
//!
//! # Wills (published exactly once, even across a restart)
//! A persistent session's will is journaled with [`Op::WillSet`] when its connection opens
//! (with a random token the will's log record carries in its `mqtt.will_id` header) and
//! cleared with [`Op::WillClear`] when the connection ends with a normal DISCONNECT or a new
//! connection replaces it. While it is in the journal it may still fire: after a restart the
//! broker publishes it once its delay has passed since the session's `disconnected_at_ms` (or
//! since the restart, for a connection that was alive at the crash). Firing journals
//! [`Op::WillFiring`] (the log position before the append) before the append, and
//! [`Op::WillClear`] with the token once the will is routed, so that a will cut short by a
//! crash is settled like a QoS 2 intent: the log holding its token means it was published.
//!
//! # Inbound QoS 2 (exactly once across kill -9)
//! For a QoS 2 PUBLISH of a persistent session the broker commits (fsyncs) a
//! [`StoredQos2::Intent`] before the record goes to the log: the log topic, the partition, the
//! partition's end offset before the append, and a random token the record carries in its
//! `mqtt.qos2_id` header. Once the log has the record, [`StoredQos2::Received`] is written
//! (lazily: the intent and the log already tell it), and PUBREL releases the id with
//! [`Op::Qos2Release`], committed before PUBCOMP goes out (else, after a crash, a new message
//! under the reused id would be taken for a re-send). On open, an intent left by a crash is
//! settled by scanning the partition from its offset for the token: found means received,
//! not found means the id is free again.
//!
//! # Ordering and crash rules
//! - [`Store::apply`] updates the mirror and appends entries to an in-memory buffer, written
//!   to the file when it fills; [`Store::sync`] writes the rest and fdatasyncs. What was
//!   applied before a successful `sync` survives any crash; after a crash the journal keeps a
//!   prefix of the ops applied since, possibly ending inside a batch.
//! - Recovery replays entries in order and stops at the first one that is incomplete, empty
//!   or fails its checksum: that is where the previous process stopped writing (or the disk
//!   garbled a sector), so the file is truncated there, before anything new is appended after
//!   it. An entry whose checksum is intact but which cannot be decoded is never truncated: it
//!   is an error, because it holds data this build does not understand.
//! - Compaction writes the mirror as a fresh journal to `mqtt-state.journal.tmp`, fsyncs it,
//!   renames it over the journal and fsyncs the directory, so a crash leaves either the old
//!   journal or the new one, both complete. A leftover temporary file is removed at open.
//! - After any failed write or fsync the journal on disk no longer matches what was written
//!   (a failed fsync may have dropped dirty pages), so the next call first rewrites the
//!   journal from the mirror, by compaction.
//! - A file at the journal's path that does not start with the magic is someone else's: it is
//!   an error, never overwritten.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use codec::{ENTRY_HEADER_BYTES, Entry, body_bytes, decode_body, encode_entry, entry_bytes};

mod codec;

/// Name of the journal file inside the store's directory.
pub const JOURNAL_FILE_NAME: &str = "mqtt-state.journal";
/// Name of the compaction's temporary file; a leftover one is removed at open.
const TMP_FILE_NAME: &str = "mqtt-state.journal.tmp";
/// First eight bytes of every journal: "silt MQTT state".
pub const JOURNAL_MAGIC: [u8; 8] = *b"SILTMQST";
/// The journal format this build writes and reads.
pub const JOURNAL_VERSION: u32 = 1;
/// Bytes of the file header: magic then version.
pub const JOURNAL_HEADER_BYTES: u64 = 12;
/// Garbage a journal may carry beyond twice its live size before `maybe_compact` rewrites it,
/// so that small stores are not rewritten over and over for a few freed bytes.
pub const COMPACT_SLACK_BYTES: u64 = 1 << 20;
/// Applied entries are written to the file once this many bytes are buffered.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Read buffer for replay and for checking oversized entries.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The PUBLISH properties a queued or retained message must deliver again (MQTT 5.0
/// §3.3.2.3); the rest (topic alias, subscription identifiers) are per delivery.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoredProperties {
    pub payload_format_utf8: Option<bool>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

/// A message as queued for an offline session or retained on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// When the broker accepted it, so that the message expiry interval keeps counting across
    /// restarts.
    pub published_at_ms: i64,
    pub expiry_interval_secs: Option<u32>,
    pub properties: StoredProperties,
    /// For a queued copy, the Subscription Identifiers of the subscriptions it matched (5.0
    /// §3.3.4), which it is delivered with; always empty for a retained message (its copies
    /// take the ids of the subscription they go to).
    pub subscription_ids: Vec<u32>,
}

/// A persistent session's will message while it may still be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    /// The will as a message; `published_at_ms` is not used (a will is stamped when it
    /// fires) and `subscription_ids` is empty.
    pub message: StoredMessage,
    /// 5.0 Will Delay Interval, seconds (0 in 3.1.1).
    pub delay_secs: u32,
    /// Random per connection; the will's log record carries it in `mqtt.will_id`.
    pub token: u64,
    /// Set once the will started firing: where its record lands in the log.
    pub firing: Option<StoredWillFiring>,
}

/// Where a firing will's record lands: `partition` of `log_topic`, at or above
/// `from_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWillFiring {
    pub log_topic: String,
    pub partition: u32,
    pub from_offset: u64,
}

/// One subscription of a persistent session, with its options as subscribed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    /// The filter as the client sent it, `$share/<group>/<filter>` included.
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub subscription_id: Option<u32>,
}

/// A persistent session: what a client gets back when it reconnects without a clean start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub client_id: String,
    pub protocol_level: u8,
    pub expiry_secs: u32,
    /// When the client last disconnected; `None` while it is connected.
    pub disconnected_at_ms: Option<i64>,
    /// In subscribe order; subscribing to the same filter again replaces the entry in place.
    pub subscriptions: Vec<StoredSubscription>,
    /// Messages waiting for delivery or acknowledgement, by the broker's per-session sequence
    /// number.
    pub queue: BTreeMap<u64, StoredMessage>,
    /// Inbound QoS 2 packet ids not yet released by PUBREL, by packet id.
    pub qos2: BTreeMap<u16, StoredQos2>,
    /// The will of the last connection, while it may still be published.
    pub will: Option<StoredWill>,
}

/// Where an inbound QoS 2 message of a persistent session stands, for exactly-once delivery
/// across restarts (MQTT 5.0 §4.3.3: the id stays taken from PUBREC until PUBREL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredQos2 {
    /// Journaled before the record went to the log: after a crash the log tells whether the
    /// append happened. The record carries `token` in its `mqtt.qos2_id` header and lands in
    /// `partition` of `log_topic` at or above `from_offset`.
    Intent {
        log_topic: String,
        partition: u32,
        from_offset: u64,
        token: u64,
    },
    /// The record is durable in the log and PUBREC may have gone out: a re-sent PUBLISH with
    /// this id is answered with PUBREC and not stored again.
    Received,
}

/// Everything the store keeps: what the broker reloads at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreState {
    pub sessions: BTreeMap<String, StoredSession>,
    /// Retained messages by topic name.
    pub retained: BTreeMap<String, StoredMessage>,
}

/// One change to the durable state; each is one journal entry.
///
/// Ops that name a session that does not exist (or a queued message, subscription or
/// retained topic that does not exist) change nothing and are not journaled: a session must
/// be opened before it is subscribed or queued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates the session, or updates the level and expiry of an existing one, keeping its
    /// subscriptions and queue, and marks it connected.
    SessionOpen {
        client_id: String,
        protocol_level: u8,
        expiry_secs: u32,
    },
    /// Marks the session disconnected at `at_ms`, when its expiry starts counting.
    SessionClosed {
        client_id: String,
        at_ms: i64,
    },
    /// Drops the session with its subscriptions and queue (expiry, clean start, takeover).
    SessionRemove {
        client_id: String,
    },
    /// Adds a subscription, or replaces the one with the same filter in place.
    Subscribe {
        client_id: String,
        subscription: StoredSubscription,
    },
    Unsubscribe {
        client_id: String,
        filter: String,
    },
    /// Queues a message under `seq`, replacing any message queued under the same number.
    Enqueue {
        client_id: String,
        seq: u64,
        message: StoredMessage,
    },
    /// Removes a delivered (or expired, or dropped) message from the queue.
    Dequeue {
        client_id: String,
        seq: u64,
    },
    /// Retains `message` on its topic, replacing the previous retained message.
    Retain {
        message: StoredMessage,
    },
    ClearRetained {
        topic: String,
    },
    /// Records (or replaces) the state of an inbound QoS 2 packet id.
    Qos2Set {
        client_id: String,
        packet_id: u16,
        state: StoredQos2,
    },
    /// Frees an inbound QoS 2 packet id: PUBREL arrived, or the message was never stored.
    Qos2Release {
        client_id: String,
        packet_id: u16,
    },
    /// Sets (or replaces) the session's will.
    WillSet {
        client_id: String,
        will: StoredWill,
    },
    /// Marks the will with `token` as firing; changes nothing if the session's will has
    /// another token (a new connection replaced it).
    WillFiring {
        client_id: String,
        token: u64,
        firing: StoredWillFiring,
    },
    /// Drops the session's will: any will when `token` is `None`, else only the one with
    /// that token.
    WillClear {
        client_id: String,
        token: Option<u64>,
    },
}

impl Op {
    /// A short name of the op's kind, for errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Op::SessionOpen { .. } => "session-open",
            Op::SessionClosed { .. } => "session-closed",
            Op::SessionRemove { .. } => "session-remove",
            Op::Subscribe { .. } => "subscribe",
            Op::Unsubscribe { .. } => "unsubscribe",
            Op::Enqueue { .. } => "enqueue",
            Op::Dequeue { .. } => "dequeue",
            Op::Retain { .. } => "retain",
            Op::ClearRetained { .. } => "clear-retained",
            Op::Qos2Set { .. } => "qos2-set",
            Op::Qos2Release { .. } => "qos2-release",
            Op::WillSet { .. } => "will-set",
            Op::WillFiring { .. } => "will-firing",
            Op::WillClear { .. } => "will-clear",
        }
    }

    /// True for ops that only ever shrink the live state. They are accepted even when the
    /// journal is at its cap, so that a full store can always be drained.
    fn releases(&self) -> bool {
        matches!(
            self,
            Op::SessionRemove { .. }
                | Op::Unsubscribe { .. }
                | Op::Dequeue { .. }
                | Op::ClearRetained { .. }
                | Op::Qos2Release { .. }
                | Op::WillClear { .. }
        )
    }

    fn entry(&self) -> Entry<'_> {
        match self {
            Op::SessionOpen {
                client_id,
                protocol_level,
                expiry_secs,
            } => Entry::SessionOpen {
                client_id,
                protocol_level: *protocol_level,
                expiry_secs: *expiry_secs,
            },
            Op::SessionClosed { client_id, at_ms } => Entry::SessionClosed {
                client_id,
                at_ms: *at_ms,
            },
            Op::SessionRemove { client_id } => Entry::SessionRemove { client_id },
            Op::Subscribe {
                client_id,
                subscription,
            } => Entry::Subscribe {
                client_id,
                subscription,
            },
            Op::Unsubscribe { client_id, filter } => Entry::Unsubscribe { client_id, filter },
            Op::Enqueue {
                client_id,
                seq,
                message,
            } => Entry::Enqueue {
                client_id,
                seq: *seq,
                message,
            },
            Op::Dequeue { client_id, seq } => Entry::Dequeue {
                client_id,
                seq: *seq,
            },
            Op::Retain { message } => Entry::Retain { message },
            Op::ClearRetained { topic } => Entry::ClearRetained { topic },
            Op::Qos2Set {
                client_id,
                packet_id,
                state,
            } => Entry::Qos2Set {
                client_id,
                packet_id: *packet_id,
                state,
            },
            Op::Qos2Release {
                client_id,
                packet_id,
            } => Entry::Qos2Release {
                client_id,
                packet_id: *packet_id,
            },
            Op::WillSet { client_id, will } => Entry::WillSet { client_id, will },
            Op::WillFiring {
                client_id,
                token,
                firing,
            } => Entry::WillFiring {
                client_id,
                token: *token,
                firing,
            },
            Op::WillClear { client_id, token } => Entry::WillClear {
                client_id,
                token: *token,
            },
        }
    }
}

/// Bounds on the store's memory and disk use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Largest entry body, in bytes; an op that encodes larger is refused. Replay allocates
    /// at most this much per entry. Lowering it below an entry already on disk makes open
    /// fail rather than drop that entry. Default 2 MiB.
    pub entry_bytes_max: usize,
    /// Hard cap on the journal file. `apply` compacts when a batch would pass it and refuses
    /// the batch when even the compacted journal would; batches that only remove state are
    /// always accepted, so that a full store can be drained. Meant as a backstop under the
    /// broker's own queue limits: near the cap, compactions become frequent. Default 1 GiB.
    pub journal_bytes_max: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            entry_bytes_max: 2 << 20,
            journal_bytes_max: 1 << 30,
        }
    }
}

impl StoreLimits {
    fn validate(&self) -> Result<(), StoreError> {
        if self.entry_bytes_max == 0 || self.entry_bytes_max > u32::MAX as usize {
            return Err(StoreError::InvalidLimits(format!(
                "entry_bytes_max = {} must be between 1 and {}",
                self.entry_bytes_max,
                u32::MAX
            )));
        }
        if self.journal_bytes_max < JOURNAL_HEADER_BYTES {
            return Err(StoreError::InvalidLimits(format!(
                "journal_bytes_max = {} is below the journal header of {JOURNAL_HEADER_BYTES} \
                 bytes",
                self.journal_bytes_max
            )));
        }
        Ok(())
    }
}

/// Why replay stopped before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailFault {
    /// The file ends inside an entry: the previous process died while writing it.
    Incomplete,
    /// An entry with a zero length, as left by a file extended with zeros that were never
    /// written.
    EmptyEntry,
    /// An entry whose body does not match its CRC-32C.
    ChecksumMismatch,
}

/// What [`Store::open`] found and did, for the caller to log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// True when there was no journal (or an empty file) and a new one was created.
    pub created: bool,
    /// Entries replayed into the mirror.
    pub entries_replayed: u64,
    /// Bytes of the journal kept, header included.
    pub kept_bytes: u64,
    /// Bytes cut off the end of the journal, from the first bad entry on.
    pub truncated_bytes: u64,
    /// Why the tail was cut, when it was.
    pub tail_fault: Option<TailFault>,
    /// True when the journal was compacted after replay.
    pub compacted: bool,
}

/// Everything that can go wrong in the store; each names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a silt MQTT state journal (it does not start with the journal magic); \
         refusing to read or overwrite it"
    )]
    Foreign { path: PathBuf },
    #[error("{path} has journal format version {version}; this build reads version {supported}")]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        supported: u32,
    },
    #[error("{op} op {index} of the batch encodes to {bytes} bytes, over entry_bytes_max = {max}")]
    EntryTooLarge {
        op: &'static str,
        index: usize,
        bytes: u64,
        max: usize,
    },
    #[error(
        "{path} holds an intact entry of {bytes} bytes at offset {offset}, over \
         entry_bytes_max = {max}; raise the limit to open it"
    )]
    StoredEntryTooLarge {
        path: PathBuf,
        offset: u64,
        bytes: u64,
        max: usize,
    },
    #[error(
        "{path}: the entry at offset {offset} has a valid checksum but cannot be decoded: \
         {reason}"
    )]
    Undecodable {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    #[error(
        "{path} is full: the live state of {live_bytes} bytes plus a batch of {batch_bytes} \
         bytes exceeds journal_bytes_max = {max}"
    )]
    JournalFull {
        path: PathBuf,
        live_bytes: u64,
        batch_bytes: u64,
        max: u64,
    },
    #[error("invalid store limits: {0}")]
    InvalidLimits(String),
}

impl StoreError {
    fn io(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            path,
            action,
            source,
        }
    }
}

/// The durable session and retained-message store: a journal on disk and its mirror in
/// memory.
///
/// Dropping it writes buffered entries to the file without an fsync; call [`Store::sync`]
/// for durability.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    path: PathBuf,
    limits: StoreLimits,
    /// The journal, positioned at its end.
    file: File,
    /// Entries applied but not yet written to `file`.
    pending: Vec<u8>,
    /// Length of the journal once `pending` is written.
    journal_bytes: u64,
    mirror: Mirror,
    /// Set after a failed write, fsync or directory fsync: the file may not hold what was
    /// written, so it is rewritten from the mirror before anything else.
    needs_rewrite: bool,
    recovery: Recovery,
}

impl Store {
    /// Opens the store in `dir`, creating the directory and the journal if missing, replays
    /// the journal into the mirror, truncates a torn or corrupt tail (see [`Store::recovery`])
    /// and compacts if the journal is mostly garbage.
    ///
    /// The caller must make sure only one `Store` has `dir` open at a time.
    pub fn open(dir: &Path, limits: StoreLimits) -> Result<Store, StoreError> {
        limits.validate()?;
        create_dir_durable(dir)?;
        remove_file_durable(&dir.join(TMP_FILE_NAME))?;
        let path = dir.join(JOURNAL_FILE_NAME);
        let existing = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => Some(file),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(StoreError::io(&path, "open")(error)),
        };
        let file_bytes = match &existing {
            Some(file) => file
                .metadata()
                .map_err(StoreError::io(&path, "stat"))?
                .len(),
            None => 0,
        };
        let mut mirror = Mirror::new();
        let (file, recovery) = match existing {
            // An empty file holds nothing to lose: the journal is always created whole, by
            // rename, so this is not a torn journal but a placeholder.
            Some(file) if file_bytes > 0 => {
                let mut file = file;
                let recovery = replay(&path, &mut file, file_bytes, &limits, &mut mirror)?;
                (file, recovery)
            }
            _ => {
                let (file, written) = install_snapshot(dir, &path, &mirror.state)?;
                fsync_dir(dir)?;
                let recovery = Recovery {
                    created: true,
                    kept_bytes: written,
                    ..Recovery::default()
                };
                (file, recovery)
            }
        };
        let mut store = Store {
            dir: dir.to_path_buf(),
            journal_bytes: recovery.kept_bytes,
            path,
            limits,
            file,
            pending: Vec::new(),
            mirror,
            needs_rewrite: false,
            recovery,
        };
        store.recovery.compacted = store.maybe_compact()?;
        Ok(store)
    }

    /// The durable state as of the last `apply`.
    pub fn state(&self) -> &StoreState {
        &self.mirror.state
    }

    /// What open found and did.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Applies `ops` in order to the mirror and journals those that change it, without an
    /// fsync.
    ///
    /// A batch with an op over `entry_bytes_max`, or one that does not fit under
    /// `journal_bytes_max` even after compaction, is refused whole and changes nothing. After
    /// an I/O error the mirror holds the batch but nothing since the last successful sync is
    /// known to be durable; the next call rewrites the journal from the mirror first.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        self.heal()?;
        let mut batch_bytes = 0;
        for (index, op) in ops.iter().enumerate() {
            let bytes = body_bytes(op.entry());
            if bytes > self.limits.entry_bytes_max as u64 {
                return Err(StoreError::EntryTooLarge {
                    op: op.kind_name(),
                    index,
                    bytes,
                    max: self.limits.entry_bytes_max,
                });
            }
            batch_bytes += ENTRY_HEADER_BYTES + bytes;
        }
        self.make_room(ops, batch_bytes)?;
        for op in ops {
            if self.mirror.apply(op.clone()) {
                let start = self.pending.len();
                encode_entry(&mut self.pending, op.entry());
                self.journal_bytes += (self.pending.len() - start) as u64;
            }
        }
        if self.pending.len() >= WRITE_BUFFER_BYTES {
            self.write_pending()?;
        }
        Ok(())
    }

    /// Writes every applied entry and fdatasyncs the journal: everything applied before is
    /// durable when this returns `Ok`.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        // A rewrite fsyncs the whole mirror, which is all a sync promises.
        if self.needs_rewrite {
            return self.compact();
        }
        self.write_pending()?;
        if let Err(source) = self.file.sync_data() {
            self.needs_rewrite = true;
            return Err(StoreError::io(&self.path, "fsync")(source));
        }
        Ok(())
    }

    /// Compacts when the journal is larger than twice the live state plus
    /// [`COMPACT_SLACK_BYTES`] (or must be rewritten after an I/O error). Returns whether it
    /// did. Compaction makes everything applied durable, like [`Store::sync`].
    pub fn maybe_compact(&mut self) -> Result<bool, StoreError> {
        let threshold = self
            .mirror
            .live_bytes
            .saturating_mul(2)
            .saturating_add(COMPACT_SLACK_BYTES);
        if self.needs_rewrite || self.journal_bytes > threshold {
            self.compact()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Rewrites the journal as the mirror's live state, durably: a temporary file is written
    /// and fsynced, renamed over the journal, and the directory fsynced. On error the old
    /// journal stays in use (or, once the rename happened, the new one).
    pub fn compact(&mut self) -> Result<(), StoreError> {
        let (file, written) = install_snapshot(&self.dir, &self.path, &self.mirror.state)?;
        debug_assert_eq!(
            written, self.mirror.live_bytes,
            "live size accounting is off"
        );
        // The journal's path names the new file now; entries still buffered for the old one
        // are in the snapshot.
        self.file = file;
        self.pending.clear();
        self.journal_bytes = written;
        self.needs_rewrite = true;
        fsync_dir(&self.dir)?;
        self.needs_rewrite = false;
        Ok(())
    }

    /// Length of the journal in bytes, counting entries applied but not yet written.
    pub fn journal_bytes(&self) -> u64 {
        self.journal_bytes
    }

    /// Length the journal would have right after a compaction.
    pub fn live_bytes(&self) -> u64 {
        self.mirror.live_bytes
    }

    /// Path of the journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn heal(&mut self) -> Result<(), StoreError> {
        if self.needs_rewrite {
            self.compact()?;
        }
        Ok(())
    }

    /// Makes room under the journal cap for a batch of `batch_bytes`, compacting if that is
    /// enough, or refuses the batch.
    fn make_room(&mut self, ops: &[Op], batch_bytes: u64) -> Result<(), StoreError> {
        let max = self.limits.journal_bytes_max;
        if self.journal_bytes.saturating_add(batch_bytes) <= max || ops.iter().all(Op::releases) {
            return Ok(());
        }
        if self.mirror.live_bytes.saturating_add(batch_bytes) <= max {
            return self.compact();
        }
        Err(StoreError::JournalFull {
            path: self.path.clone(),
            live_bytes: self.mirror.live_bytes,
            batch_bytes,
            max,
        })
    }

    fn write_pending(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        self.pending.clear();
        if let Err(source) = result {
            self.needs_rewrite = true;
            return Err(StoreError::io(&self.path, "append to")(source));
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Best effort, no fsync: buffered entries then survive the process exiting. After a
        // failed write they would land behind a torn entry, so they are dropped instead.
        if !self.needs_rewrite {
            let _ = self.file.write_all(&self.pending);
        }
    }
}

/// The state plus the size its compacted journal would have.
#[derive(Debug)]
struct Mirror {
    state: StoreState,
    live_bytes: u64,
}

impl Mirror {
    fn new() -> Mirror {
        Mirror {
            state: StoreState::default(),
            live_bytes: JOURNAL_HEADER_BYTES,
        }
    }

    /// Applies one op; returns false when it changed nothing, so that it need not be
    /// journaled. Keeps `live_bytes` equal to what `write_snapshot` would write.
    fn apply(&mut self, op: Op) -> bool {
        match op {
            Op::SessionOpen {
                client_id,
                protocol_level,
                expiry_secs,
            } => match self.state.sessions.get_mut(&client_id) {
                Some(session) => {
                    if session.disconnected_at_ms.take().is_some() {
                        self.live_bytes -= closed_entry_bytes(&client_id);
                    }
                    session.protocol_level = protocol_level;
                    session.expiry_secs = expiry_secs;
                    true
                }
                None => {
                    self.live_bytes += entry_bytes(Entry::SessionOpen {
                        client_id: &client_id,
                        protocol_level,
                        expiry_secs,
                    });
                    let session = StoredSession {
                        client_id: client_id.clone(),
                        protocol_level,
                        expiry_secs,
                        disconnected_at_ms: None,
                        subscriptions: Vec::new(),
                        queue: BTreeMap::new(),
                        qos2: BTreeMap::new(),
                        will: None,
                    };
                    self.state.sessions.insert(client_id, session);
                    true
                }
            },
            Op::SessionClosed { client_id, at_ms } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                if session.disconnected_at_ms.replace(at_ms).is_none() {
                    self.live_bytes += closed_entry_bytes(&client_id);
                }
                true
            }
            Op::SessionRemove { client_id } => {
                let Some(session) = self.state.sessions.remove(&client_id) else {
                    return false;
                };
                self.live_bytes -= session_bytes(&session);
                true
            }
            Op::Subscribe {
                client_id,
                subscription,
            } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                self.live_bytes += entry_bytes(Entry::Subscribe {
                    client_id: &client_id,
                    subscription: &subscription,
                });
                let existing = session
                    .subscriptions
                    .iter_mut()
                    .find(|existing| existing.filter == subscription.filter);
                match existing {
                    Some(existing) => {
                        self.live_bytes -= entry_bytes(Entry::Subscribe {
                            client_id: &client_id,
                            subscription: existing,
                        });
                        *existing = subscription;
                    }
                    None => session.subscriptions.push(subscription),
                }
                true
            }
            Op::Unsubscribe { client_id, filter } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                let Some(position) = session
                    .subscriptions
                    .iter()
                    .position(|existing| existing.filter == filter)
                else {
                    return false;
                };
                let removed = session.subscriptions.remove(position);
                self.live_bytes -= entry_bytes(Entry::Subscribe {
                    client_id: &client_id,
                    subscription: &removed,
                });
                true
            }
            Op::Enqueue {
                client_id,
                seq,
                message,
            } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                self.live_bytes += entry_bytes(Entry::Enqueue {
                    client_id: &client_id,
                    seq,
                    message: &message,
                });
                if let Some(replaced) = session.queue.insert(seq, message) {
                    self.live_bytes -= entry_bytes(Entry::Enqueue {
                        client_id: &client_id,
                        seq,
                        message: &replaced,
                    });
                }
                true
            }
            Op::Dequeue { client_id, seq } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                let Some(removed) = session.queue.remove(&seq) else {
                    return false;
                };
                self.live_bytes -= entry_bytes(Entry::Enqueue {
                    client_id: &client_id,
                    seq,
                    message: &removed,
                });
                true
            }
            Op::Retain { mut message } => {
                // A retained message has no subscription ids; its entry does not keep them.
                message.subscription_ids.clear();
                self.live_bytes += entry_bytes(Entry::Retain { message: &message });
                if let Some(replaced) = self.state.retained.insert(message.topic.clone(), message) {
                    self.live_bytes -= entry_bytes(Entry::Retain { message: &replaced });
                }
                true
            }
            Op::ClearRetained { topic } => {
                let Some(removed) = self.state.retained.remove(&topic) else {
                    return false;
                };
                self.live_bytes -= entry_bytes(Entry::Retain { message: &removed });
                true
            }
            Op::Qos2Set {
                client_id,
                packet_id,
                state,
            } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                self.live_bytes += entry_bytes(Entry::Qos2Set {
                    client_id: &client_id,
                    packet_id,
                    state: &state,
                });
                if let Some(replaced) = session.qos2.insert(packet_id, state) {
                    self.live_bytes -= entry_bytes(Entry::Qos2Set {
                        client_id: &client_id,
                        packet_id,
                        state: &replaced,
                    });
                }
                true
            }
            Op::Qos2Release {
                client_id,
                packet_id,
            } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                let Some(removed) = session.qos2.remove(&packet_id) else {
                    return false;
                };
                self.live_bytes -= entry_bytes(Entry::Qos2Set {
                    client_id: &client_id,
                    packet_id,
                    state: &removed,
                });
                true
            }
            Op::WillSet { client_id, will } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                self.live_bytes += entry_bytes(Entry::WillSet {
                    client_id: &client_id,
                    will: &will,
                });
                if let Some(replaced) = session.will.replace(will) {
                    self.live_bytes -= entry_bytes(Entry::WillSet {
                        client_id: &client_id,
                        will: &replaced,
                    });
                }
                true
            }
            Op::WillFiring {
                client_id,
                token,
                firing,
            } => {
                let Some(will) = self
                    .state
                    .sessions
                    .get_mut(&client_id)
                    .and_then(|session| session.will.as_mut())
                    .filter(|will| will.token == token)
                else {
                    return false;
                };
                self.live_bytes -= entry_bytes(Entry::WillSet {
                    client_id: &client_id,
                    will,
                });
                will.firing = Some(firing);
                self.live_bytes += entry_bytes(Entry::WillSet {
                    client_id: &client_id,
                    will,
                });
                true
            }
            Op::WillClear { client_id, token } => {
                let Some(session) = self.state.sessions.get_mut(&client_id) else {
                    return false;
                };
                let matches = session
                    .will
                    .as_ref()
                    .is_some_and(|will| token.is_none_or(|token| will.token == token));
                if !matches {
                    return false;
                }
                if let Some(removed) = session.will.take() {
                    self.live_bytes -= entry_bytes(Entry::WillSet {
                        client_id: &client_id,
                        will: &removed,
                    });
                }
                true
            }
        }
    }
}

/// Bytes a session takes in a compacted journal.
fn session_bytes(session: &StoredSession) -> u64 {
    let client_id = session.client_id.as_str();
    let mut bytes = entry_bytes(Entry::SessionOpen {
        client_id,
        protocol_level: session.protocol_level,
        expiry_secs: session.expiry_secs,
    });
    if session.disconnected_at_ms.is_some() {
        bytes += closed_entry_bytes(client_id);
    }
    for subscription in &session.subscriptions {
        bytes += entry_bytes(Entry::Subscribe {
            client_id,
            subscription,
        });
    }
    for (&seq, message) in &session.queue {
        bytes += entry_bytes(Entry::Enqueue {
            client_id,
            seq,
            message,
        });
    }
    for (&packet_id, state) in &session.qos2 {
        bytes += entry_bytes(Entry::Qos2Set {
            client_id,
            packet_id,
            state,
        });
    }
    if let Some(will) = &session.will {
        bytes += entry_bytes(Entry::WillSet { client_id, will });
    }
    bytes
}

fn closed_entry_bytes(client_id: &str) -> u64 {
    entry_bytes(Entry::SessionClosed {
        client_id,
        at_ms: 0,
    })
}

/// Calls `visit` with the entries of a compacted journal of `state`, in the order replay
/// needs them: each session opened before its subscriptions and queue.
fn for_each_snapshot_entry(
    state: &StoreState,
    mut visit: impl FnMut(Entry<'_>) -> io::Result<()>,
) -> io::Result<()> {
    for session in state.sessions.values() {
        let client_id = session.client_id.as_str();
        visit(Entry::SessionOpen {
            client_id,
            protocol_level: session.protocol_level,
            expiry_secs: session.expiry_secs,
        })?;
        if let Some(at_ms) = session.disconnected_at_ms {
            visit(Entry::SessionClosed { client_id, at_ms })?;
        }
        for subscription in &session.subscriptions {
            visit(Entry::Subscribe {
                client_id,
                subscription,
            })?;
        }
        for (&seq, message) in &session.queue {
            visit(Entry::Enqueue {
                client_id,
                seq,
                message,
            })?;
        }
        for (&packet_id, state) in &session.qos2 {
            visit(Entry::Qos2Set {
                client_id,
                packet_id,
                state,
            })?;
        }
        if let Some(will) = &session.will {
            visit(Entry::WillSet { client_id, will })?;
        }
    }
    for message in state.retained.values() {
        visit(Entry::Retain { message })?;
    }
    Ok(())
}

/// Writes a journal of `state` to the temporary file, fsyncs it and renames it over `path`.
/// Returns the new journal, positioned at its end, and its length. The caller fsyncs `dir`.
fn install_snapshot(
    dir: &Path,
    path: &Path,
    state: &StoreState,
) -> Result<(File, u64), StoreError> {
    let tmp = dir.join(TMP_FILE_NAME);
    let written = write_snapshot(&tmp, state);
    let renamed = written.and_then(|(file, bytes)| {
        fs::rename(&tmp, path).map_err(StoreError::io(path, "rename a compacted journal over"))?;
        Ok((file, bytes))
    });
    if renamed.is_err() {
        // Best effort: a leftover is removed at the next open anyway.
        let _ = fs::remove_file(&tmp);
    }
    renamed
}

fn write_snapshot(tmp: &Path, state: &StoreState) -> Result<(File, u64), StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(StoreError::io(tmp, "create"))?;
    let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, file);
    let mut written = JOURNAL_HEADER_BYTES;
    let mut scratch = Vec::new();
    let result = writer
        .write_all(&header_bytes())
        .and_then(|()| {
            for_each_snapshot_entry(state, |entry| {
                scratch.clear();
                encode_entry(&mut scratch, entry);
                written += scratch.len() as u64;
                writer.write_all(&scratch)
            })
        })
        .and_then(|()| writer.flush());
    result.map_err(StoreError::io(tmp, "write"))?;
    let file = writer
        .into_inner()
        .map_err(|error| StoreError::io(tmp, "write")(error.into_error()))?;
    file.sync_all().map_err(StoreError::io(tmp, "fsync"))?;
    Ok((file, written))
}

fn header_bytes() -> [u8; JOURNAL_HEADER_BYTES as usize] {
    let mut header = [0; JOURNAL_HEADER_BYTES as usize];
    header[..8].copy_from_slice(&JOURNAL_MAGIC);
    header[8..].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    header
}

/// Replays the journal in `file` (of `file_bytes` bytes, more than zero) into `mirror`,
/// truncates a bad tail, and leaves `file` positioned at its new end.
fn replay(
    path: &Path,
    file: &mut File,
    file_bytes: u64,
    limits: &StoreLimits,
    mirror: &mut Mirror,
) -> Result<Recovery, StoreError> {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, &*file);
    let mut header = [0; JOURNAL_HEADER_BYTES as usize];
    if file_bytes < JOURNAL_HEADER_BYTES {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
        });
    }
    reader
        .read_exact(&mut header)
        .map_err(StoreError::io(path, "read"))?;
    if header[..8] != JOURNAL_MAGIC {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
        });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != JOURNAL_VERSION {
        return Err(StoreError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
            supported: JOURNAL_VERSION,
        });
    }
    let mut offset = JOURNAL_HEADER_BYTES;
    let mut entries_replayed = 0;
    let mut body = Vec::new();
    let tail_fault = loop {
        let remaining = file_bytes - offset;
        if remaining == 0 {
            break None;
        }
        if remaining < ENTRY_HEADER_BYTES {
            break Some(TailFault::Incomplete);
        }
        let mut entry_header = [0; ENTRY_HEADER_BYTES as usize];
        reader
            .read_exact(&mut entry_header)
            .map_err(StoreError::io(path, "read"))?;
        let [l0, l1, l2, l3, c0, c1, c2, c3] = entry_header;
        let body_len = u32::from_le_bytes([l0, l1, l2, l3]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if body_len == 0 {
            break Some(TailFault::EmptyEntry);
        }
        if u64::from(body_len) > remaining - ENTRY_HEADER_BYTES {
            break Some(TailFault::Incomplete);
        }
        if body_len as usize > limits.entry_bytes_max {
            // Either garbage or an entry written under a larger limit: only the checksum
            // tells, and it is computed without holding the body.
            if streamed_crc(&mut reader, body_len).map_err(StoreError::io(path, "read"))? == crc {
                return Err(StoreError::StoredEntryTooLarge {
                    path: path.to_path_buf(),
                    offset,
                    bytes: u64::from(body_len),
                    max: limits.entry_bytes_max,
                });
            }
            break Some(TailFault::ChecksumMismatch);
        }
        body.resize(body_len as usize, 0);
        reader
            .read_exact(&mut body)
            .map_err(StoreError::io(path, "read"))?;
        if crc32c::crc32c(&body) != crc {
            break Some(TailFault::ChecksumMismatch);
        }
        let op = decode_body(&body).map_err(|reason| StoreError::Undecodable {
            path: path.to_path_buf(),
            offset,
            reason,
        })?;
        mirror.apply(op);
        entries_replayed += 1;
        offset += ENTRY_HEADER_BYTES + u64::from(body_len);
    };
    drop(reader);
    if tail_fault.is_some() {
        file.set_len(offset)
            .map_err(StoreError::io(path, "truncate the torn tail of"))?;
        file.sync_all().map_err(StoreError::io(path, "fsync"))?;
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(StoreError::io(path, "seek"))?;
    Ok(Recovery {
        created: false,
        entries_replayed,
        kept_bytes: offset,
        truncated_bytes: file_bytes - offset,
        tail_fault,
        compacted: false,
    })
}

/// CRC-32C of the next `len` bytes of `reader`, read in bounded chunks.
fn streamed_crc(reader: &mut impl Read, len: u32) -> io::Result<u32> {
    let mut chunk = vec![0; READ_BUFFER_BYTES];
    let mut left = len as usize;
    let mut crc = 0;
    while left > 0 {
        let take = left.min(chunk.len());
        reader.read_exact(&mut chunk[..take])?;
        crc = crc32c::crc32c_append(crc, &chunk[..take]);
        left -= take;
    }
    Ok(crc)
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    let handle = File::open(dir).map_err(StoreError::io(dir, "open directory"))?;
    handle
        .sync_all()
        .map_err(StoreError::io(dir, "fsync directory"))
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed.
fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|parent| !parent.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(error) => return Err(StoreError::io(dir, "create directory")(error)),
    }
    match parent {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

/// Removes a file and fsyncs its directory; a file that is already gone is not an error.
fn remove_file_durable(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => fsync_dir(parent),
            _ => fsync_dir(Path::new(".")),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(StoreError::io(path, "remove")(error)),
    }
}
