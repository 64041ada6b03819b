//! Cold reads for one node: Fetch and ListOffsets below the local start, served from the
//! archive.
//!
//! A [`ColdReader`] is shared by every connection of a node (`Arc`). It keeps:
//! - per partition, the manifest, cached; an offset the cached copy cannot place reloads it
//!   once (the offload loop commits new objects, whole-log retention advances the log start).
//!   The bucket is never LISTed: the manifest's key is computed and it names every object.
//! - open [`ArchiveReader`]s by key (footer and page index fetched once per object), at most
//!   [`ColdConfig::readers_max`], least recently used evicted.
//! - a [`ChunkCache`] of whole row groups (one ranged GET each), bounded by bytes, in memory:
//!   a cold replay reads each row group once, and consumers re-reading the same history or
//!   several consumers replaying together share the bytes. Memory rather than local disk
//!   because the hot tier's disk budget is what tiering frees, and a row group re-fetched after
//!   a restart costs one GET.
//! - per replaying partition, a replay: a cursor ([`ArchiveCursor`]) that keeps its object's
//!   Parquet stream open between Fetches, so each row is decoded and rebuilt once however many
//!   Fetches hand it out (a fresh stream per Fetch skipped to its row and decoded the page
//!   around it again), and whole batches rebuilt ahead of the consumer by a background task
//!   (twice the last Fetch's bytes, at most 8 MiB), so the rebuild of the next Fetch overlaps
//!   the network and the consumer instead of waiting for its request. At most
//!   [`ColdConfig::replays_max`] replays, least recently used dropped. A sequential read that is
//!   not where the partition's replay stands starts a new one. With a permit
//!   ([`ColdConfig::decode_ahead_max`]), the cursor decodes the next row group on its own task
//!   while the consumer reads this one, and at an object's end the replay extends its cursor
//!   into the next object, so that object's first row group is decoded ahead as well.
//! - prefetch for sequential replay: a read that starts where the partition's previous cold
//!   read ended fetches, in the background, the row group after the one it stopped in (opening
//!   the next object, footer included, at an object's end), so a replaying consumer does not
//!   wait one round trip per row group. At most one prefetch per partition and
//!   [`ColdConfig::prefetch_max`] in all are in flight.
//!
//! Errors: an offset below the manifest's log start is [`ColdError::OutOfRange`]; an object
//! missing when fetched (deleted by retention after the manifest was read) reloads the manifest
//! and retries once, so the answer is the data or out of range, never a partial read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::{OnceCell, Semaphore};

use crate::error::TierError;
use crate::manifest::{Manifest, ManifestObject};
use silt_log::batch::BatchHeader;

use crate::read::{ArchiveCursor, ArchiveReader};
use crate::store::ArchiveStore;

/// How a cold reader is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColdConfig {
    /// Bytes of fetched row groups kept in memory.
    pub cache_bytes: u64,
    /// Archive objects kept open (each holds its footer and page index).
    pub readers_max: usize,
    /// Background prefetches in flight, over all partitions.
    pub prefetch_max: usize,
    /// Sequential replays kept between Fetches (each holds its cursor's current row group and
    /// up to 8 MiB of batches rebuilt ahead, in two arenas of at most 16.25 MiB); 0 serves
    /// every cold Fetch on its own.
    pub replays_max: usize,
    /// Row groups decoded ahead of their replay at once, over all replays, each holding up to
    /// [`crate::read::DECODE_AHEAD_BYTES`] of decoded rows: a replay decodes the next two row
    /// groups on other cores while its consumer reads this one. 0 decodes each row group only
    /// once its replay reaches it.
    pub decode_ahead_max: usize,
}

impl ColdConfig {
    /// The bounds when nothing is configured: 256 MiB of row groups (a replay of a few
    /// partitions at once stays cached between a consumer's Fetches), 64 open objects, 4
    /// prefetches, 16 replays, 4 row groups decoded ahead (two replays at full speed, two row
    /// groups ahead each; 256 MiB of decoded rows at most).
    pub const BUILT_IN: ColdConfig = ColdConfig {
        cache_bytes: 256 << 20,
        readers_max: 64,
        prefetch_max: 4,
        replays_max: 16,
        decode_ahead_max: 4,
    };
}

impl Default for ColdConfig {
    fn default() -> Self {
        ColdConfig::BUILT_IN
    }
}

/// Names of the cold reader's metrics, recorded through the `metrics` facade (the node's
/// recorder renders them on `/metrics`; without one they cost nothing).
pub mod metric {
    /// Cold reads answered (a Fetch partition or a ListOffsets below the local start counts one
    /// each), by `result`: `ok`, `out_of_range`, `not_archived`, `error`.
    pub const READS: &str = "silt_tier_cold_reads_total";
    /// Bytes of RecordBatch v2 batches served from the archive.
    pub const READ_BYTES: &str = "silt_tier_cold_read_bytes_total";
    /// Records served from the archive.
    pub const READ_RECORDS: &str = "silt_tier_cold_read_records_total";
    /// Time of one cold read (`ColdReader::read`), cache hits and GETs included.
    pub const READ_SECONDS: &str = "silt_tier_cold_read_duration_seconds";
    /// Row groups served from the chunk cache.
    pub const CHUNK_HITS: &str = "silt_tier_cold_chunk_hits_total";
    /// Row groups fetched (one ranged GET each), by reads and prefetch.
    pub const CHUNK_FETCHES: &str = "silt_tier_cold_chunk_fetches_total";
    /// Bytes of row groups fetched.
    pub const CHUNK_FETCHED_BYTES: &str = "silt_tier_cold_chunk_fetched_bytes_total";
    /// Bytes of row groups in the chunk cache now.
    pub const CACHED_BYTES: &str = "silt_tier_cold_cached_bytes";
    /// Row groups fetched by prefetch ahead of a sequential replay.
    pub const PREFETCHES: &str = "silt_tier_cold_prefetches_total";
    /// Bytes of cold reads served from batches rebuilt ahead of a sequential replay (the rest
    /// were rebuilt while the Fetch waited).
    pub const AHEAD_BYTES: &str = "silt_tier_cold_ahead_bytes_total";
    /// Manifest GETs.
    pub const MANIFEST_LOADS: &str = "silt_tier_cold_manifest_loads_total";
    /// Archive objects opened (footer and page index fetched).
    pub const OBJECTS_OPENED: &str = "silt_tier_cold_objects_opened_total";
}

/// Why a cold read has no answer.
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    /// The offset is below the log start (expired): Kafka's OFFSET_OUT_OF_RANGE.
    #[error("offset {offset} is below the log start offset {log_start}")]
    OutOfRange { offset: i64, log_start: i64 },
    /// No archived object holds the offset (nothing archived yet for the partition, or past
    /// the archive's end).
    #[error("offset {offset} of {topic}/{partition} is not in the archive")]
    NotArchived {
        topic: String,
        partition: u32,
        offset: i64,
    },
    /// The store or an object failed; a store failure is worth a retry.
    #[error(transparent)]
    Tier(#[from] TierError),
}

/// What one cold read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColdRead {
    /// Whole RecordBatch v2 batches, as a Fetch response carries them.
    pub batches: Bytes,
    /// Offset after the last record returned.
    pub next_offset: i64,
    pub records: u64,
}

/// Counters of a cold reader, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ColdStats {
    /// Manifest GETs.
    pub manifest_loads: u64,
    /// Objects opened (footer fetched).
    pub objects_opened: u64,
    /// Row groups fetched (ranged GETs), foreground and prefetch.
    pub chunk_fetches: u64,
    /// Row groups served from the cache.
    pub chunk_hits: u64,
    /// Row groups fetched by prefetch.
    pub prefetched: u64,
    /// Bytes in the chunk cache now.
    pub cached_bytes: u64,
    /// Replay cursors kept now.
    pub cursors: u64,
    /// Row groups being decoded ahead of their replay now.
    pub decoding_ahead: u64,
}

/// A cache of whole row groups by (object key, start byte), bounded by bytes, least recently
/// used evicted. Concurrent requests for one chunk share one GET.
#[derive(Debug)]
pub struct ChunkCache {
    capacity: u64,
    inner: Mutex<ChunkInner>,
    fetches: AtomicU64,
    hits: AtomicU64,
}

#[derive(Debug, Default)]
struct ChunkInner {
    entries: HashMap<(Path, u64), ChunkEntry>,
    bytes: u64,
    tick: u64,
}

#[derive(Debug)]
struct ChunkEntry {
    cell: Arc<OnceCell<Bytes>>,
    /// Counted in `bytes` once the fetch is done; 0 while it is under way.
    size: u64,
    used: u64,
}

impl ChunkCache {
    /// A cache holding at most `capacity` bytes, or only the chunk fetched last when that one
    /// alone is larger: a read slices many Parquet ranges (columns, pages) out of one row
    /// group, and each must not GET the whole group again.
    pub fn new(capacity: u64) -> ChunkCache {
        ChunkCache {
            capacity,
            inner: Mutex::new(ChunkInner::default()),
            fetches: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// The bytes of `range` of `key`, from the cache or one ranged GET; the flag says whether
    /// this call fetched them.
    pub async fn get(
        &self,
        store: &Arc<dyn ObjectStore>,
        key: &Path,
        range: Range<u64>,
    ) -> object_store::Result<(Bytes, bool)> {
        let id = (key.clone(), range.start);
        let cell = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.tick += 1;
            let tick = inner.tick;
            let entry = inner
                .entries
                .entry(id.clone())
                .or_insert_with(|| ChunkEntry {
                    cell: Arc::new(OnceCell::new()),
                    size: 0,
                    used: tick,
                });
            entry.used = tick;
            entry.cell.clone()
        };
        if let Some(bytes) = cell.get() {
            self.hits.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(metric::CHUNK_HITS).increment(1);
            return Ok((bytes.clone(), false));
        }
        let mut fetched = false;
        let result = cell
            .get_or_try_init(|| async {
                fetched = true;
                self.fetches.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::CHUNK_FETCHES).increment(1);
                let bytes = get_in_parts(store, key, range.clone()).await?;
                metrics::counter!(metric::CHUNK_FETCHED_BYTES).increment(bytes.len() as u64);
                Ok::<_, object_store::Error>(bytes)
            })
            .await
            .cloned();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let same = |entry: &ChunkEntry| Arc::ptr_eq(&entry.cell, &cell);
        match &result {
            Err(_) => {
                if inner
                    .entries
                    .get(&id)
                    .is_some_and(|entry| same(entry) && entry.cell.get().is_none())
                {
                    inner.entries.remove(&id);
                }
            }
            Ok(bytes) if fetched => {
                let size = bytes.len() as u64;
                if let Some(entry) = inner.entries.get_mut(&id).filter(|entry| same(entry)) {
                    entry.size = size;
                    inner.bytes += size;
                }
                inner.evict(self.capacity, &id);
                metrics::gauge!(metric::CACHED_BYTES).set(inner.bytes as f64);
            }
            Ok(_) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::CHUNK_HITS).increment(1);
            }
        }
        result.map(|bytes| (bytes, fetched))
    }

    /// Whether the chunk at `start` of `key` is cached (fetched, not just under way).
    pub fn contains(&self, key: &Path, start: u64) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .entries
            .get(&(key.clone(), start))
            .is_some_and(|entry| entry.cell.initialized())
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    /// Drops every chunk of `key` (its object is gone).
    pub fn forget(&self, key: &Path) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = 0;
        inner.entries.retain(|(entry_key, _), entry| {
            let keep = entry_key != key;
            if !keep {
                freed += entry.size;
            }
            keep
        });
        inner.bytes -= freed;
        metrics::gauge!(metric::CACHED_BYTES).set(inner.bytes as f64);
    }
}

/// Bytes a chunk fetch asks for in one ranged GET: a larger chunk is fetched as parts of this
/// size, [`PARTS_IN_FLIGHT`] at a time, since one GET stream from S3 moves far less than the
/// link does (the usual advice for S3 is parallel ranged GETs of a few MiB each).
const PART_BYTES: u64 = 4 << 20;
/// Row groups prefetch keeps fetched after the one a sequential replay is in: one would do if
/// a row group took as long to fetch as to serve, but an object's last, small row group is
/// served much faster than the next object's first one is fetched.
const GROUPS_AHEAD: usize = 2;
/// Most bytes of batches a partition's replay keeps rebuilt ahead of its consumer.
const AHEAD_BYTES_MAX: usize = 8 << 20;
/// Bytes the rebuild-ahead task rebuilds per step, between which a Fetch may take the replay.
const FILL_CHUNK_BYTES: usize = 256 << 10;
/// Room made in a replay's arena beyond a rebuild's `max_bytes`, since its last record may
/// overrun it: a batch header and a record of a few KiB fit without a reallocation.
const REBUILD_SLACK_BYTES: usize = 64 << 10;
/// Ranged GETs one chunk fetch keeps in flight.
const PARTS_IN_FLIGHT: usize = 4;

/// The bytes of `range` of `key`: one ranged GET, or for a range over [`PART_BYTES`] several
/// in parallel. Each part is written straight into its place in one buffer, which the parts
/// split and then join again without a copy: a row group is copied once, from the store's
/// answer into the cache, and is never in memory twice.
async fn get_in_parts(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    range: Range<u64>,
) -> object_store::Result<Bytes> {
    if range.end - range.start <= PART_BYTES {
        return store.get_range(key, range).await;
    }
    let len = usize::try_from(range.end - range.start).map_err(|_| short_read(key, &range, 0))?;
    let mut whole = BytesMut::zeroed(len);
    let mut parts = Vec::new();
    let mut start = range.start;
    while !whole.is_empty() {
        let part = whole.split_to(whole.len().min(PART_BYTES as usize));
        let end = start + part.len() as u64;
        parts.push((start..end, part));
        start = end;
    }
    let filled: Vec<BytesMut> = futures_util::stream::iter(parts)
        .map(|(part_range, part)| get_into(store, key, part_range, part))
        .buffered(PARTS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut filled = filled.into_iter();
    let mut joined = filled.next().unwrap_or_default();
    for part in filled {
        // The parts are adjacent pieces of one allocation, so this joins them in place.
        joined.unsplit(part);
    }
    Ok(joined.freeze())
}

/// Fills `buf` (exactly `range.end - range.start` bytes) with that range of `key`: a file is
/// read into it directly, a stream's pieces are copied into it as they come. A store answering
/// with fewer or more bytes than asked for (a range past the object's end gets what there is)
/// is an error.
async fn get_into(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    range: Range<u64>,
    mut buf: BytesMut,
) -> object_store::Result<BytesMut> {
    let options = object_store::GetOptions {
        range: Some(range.clone().into()),
        ..Default::default()
    };
    let result = store.get_opts(key, options).await?;
    if result.range != range {
        return Err(short_read(
            key,
            &range,
            result.range.end - result.range.start,
        ));
    }
    match result.payload {
        object_store::GetResultPayload::File(file, path) => {
            let (key, at) = (key.clone(), range.start);
            tokio::task::spawn_blocking(move || {
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at)
                    .map(|()| buf)
                    .map_err(|error| object_store::Error::Generic {
                        store: "archive",
                        source: format!("{key}: reading {}: {error}", path.display()).into(),
                    })
            })
            .await
            .map_err(|error| object_store::Error::JoinError { source: error })?
        }
        object_store::GetResultPayload::Stream(mut stream) => {
            let mut at = 0;
            while let Some(piece) = stream.try_next().await? {
                let Some(into) = buf.get_mut(at..at + piece.len()) else {
                    return Err(short_read(key, &range, (at + piece.len()) as u64));
                };
                into.copy_from_slice(&piece);
                at += piece.len();
            }
            if at != buf.len() {
                return Err(short_read(key, &range, at as u64));
            }
            Ok(buf)
        }
    }
}

fn short_read(key: &Path, range: &Range<u64>, got: u64) -> object_store::Error {
    object_store::Error::Generic {
        store: "archive",
        source: format!("{key}: asked for bytes {range:?}, got {got} bytes").into(),
    }
}

impl ChunkInner {
    /// Evicts least recently used chunks, never `keep` (the one just fetched), until the
    /// cache is within `capacity` or holds only `keep`.
    fn evict(&mut self, capacity: u64, keep: &(Path, u64)) {
        while self.bytes > capacity {
            let oldest = self
                .entries
                .iter()
                .filter(|(id, entry)| entry.size > 0 && *id != keep)
                .min_by_key(|(_, entry)| entry.used)
                .map(|(id, _)| id.clone());
            let Some(id) = oldest else { return };
            if let Some(entry) = self.entries.remove(&id) {
                self.bytes -= entry.size;
            }
        }
    }
}

type PartitionKey = (String, u32);

/// A map that keeps at most a given number of entries, the least recently used dropped: the
/// open objects by key, and the replays by partition.
#[derive(Debug)]
struct Lru<K, V> {
    entries: HashMap<K, (V, u64)>,
    tick: u64,
}

impl<K, V> Default for Lru<K, V> {
    fn default() -> Self {
        Lru {
            entries: HashMap::new(),
            tick: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// The entry of `key`, marked used.
    fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(value, used)| {
            *used = tick;
            value.clone()
        })
    }

    /// Adds (or replaces) the entry of `key`, then drops the least recently used entries
    /// beyond `max` (at least one is kept).
    fn insert(&mut self, key: K, value: V, max: usize) {
        self.tick += 1;
        self.entries.insert(key, (value, self.tick));
        while self.entries.len() > max.max(1) {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone())
            else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }
}

/// A partition's sequential replay: its cursor in one object, and whole batches rebuilt ahead
/// of the consumer by a background task, so the next Fetch finds them ready.
#[derive(Debug)]
struct Replay {
    /// The objects the cursor reads from `position` on, each with its end offset (one past its
    /// last): the one it is in, and those it was extended into.
    objects: VecDeque<(String, i64)>,
    cursor: ArchiveCursor,
    /// Whole batches rebuilt ahead, from `position` to the cursor's next offset, in the
    /// replay's current arena ([`make_room`]). Fetches take them by splitting them
    /// off, so an answer is never copied.
    ready: BytesMut,
    /// The replay's other arena, emptied: reused once the answers split from it are dropped.
    spare: BytesMut,
    /// Offset of the first record in `ready`: where the partition's next Fetch starts.
    position: i64,
    /// The last Fetch's `max_bytes`, which sizes the rebuild ahead ([`Replay::ahead_bytes`],
    /// [`Replay::step_bytes`]).
    fetch_bytes: usize,
    /// Whether a task is rebuilding ahead.
    filling: bool,
}

impl Replay {
    /// Whether a read of object `key` at `offset` continues this replay.
    fn continues_at(&self, key: &str, offset: i64) -> bool {
        self.position == offset && self.reads(key)
    }

    /// Whether the replay reads object `key`.
    fn reads(&self, key: &str) -> bool {
        self.objects.iter().any(|(object, _)| object == key)
    }

    /// Bytes to keep rebuilt ahead: twice the last Fetch's, at most [`AHEAD_BYTES_MAX`].
    fn ahead_bytes(&self) -> usize {
        self.fetch_bytes.saturating_mul(2).min(AHEAD_BYTES_MAX)
    }

    /// Bytes rebuilt per step ahead: the last Fetch's, at most [`FILL_CHUNK_BYTES`], so no
    /// rebuilt batch is larger than a Fetch of that size asks for.
    fn step_bytes(&self) -> usize {
        self.fetch_bytes.clamp(1, FILL_CHUNK_BYTES)
    }

    /// Bytes of an arena: what the replay keeps ahead, twice, and a step, so that an arena
    /// outlasts the answers split from it well before it fills.
    fn arena_bytes(&self) -> usize {
        2 * self.ahead_bytes() + self.step_bytes()
    }

    /// Rebuilds about `max_bytes` more batches into `ready` (see
    /// [`ArchiveCursor::read_into`]), in room made for them first ([`make_room`]).
    async fn rebuild(&mut self, max_bytes: usize) -> Result<u64, TierError> {
        let arena_bytes = self.arena_bytes();
        let room = max_bytes.saturating_add(REBUILD_SLACK_BYTES);
        make_room(&mut self.ready, &mut self.spare, room, arena_bytes);
        self.cursor.read_into(max_bytes, &mut self.ready).await
    }

    /// Moves whole batches from `ready` to `out`: as many as fit in `max_bytes`, and (with
    /// `at_least_one`) the first even if it does not. Returns the records moved.
    fn take_ready(&mut self, max_bytes: usize, at_least_one: bool, out: &mut BytesMut) -> u64 {
        let (mut taken, mut records, mut next) = (0usize, 0u64, self.position);
        while taken < self.ready.len() {
            // `ready` holds only batches this node rebuilt: whole, with valid headers.
            let Ok(Some(header)) = BatchHeader::parse(&self.ready[taken..]) else {
                break;
            };
            let len = header.total_len();
            if (taken > 0 || !at_least_one) && taken + len > max_bytes {
                break;
            }
            taken += len;
            records += u64::try_from(header.record_count).unwrap_or(0);
            next = header.last_offset() + 1;
        }
        // Into an empty `out` (a Fetch's first bytes) the batches move without a copy.
        out.unsplit(self.ready.split_to(taken));
        self.moved_to(next);
        records
    }

    /// Records that the next Fetch starts at `position`, forgetting objects read to the end.
    fn moved_to(&mut self, position: i64) {
        self.position = position;
        while self
            .objects
            .front()
            .is_some_and(|&(_, end)| end <= position && self.objects.len() > 1)
        {
            self.objects.pop_front();
        }
    }
}

/// Makes room in `ready` for `bytes` more without reallocating as they are appended.
/// Bytes go into two arenas of `arena_bytes` in turn, `ready`'s and `spare`'s: once `ready`'s
/// is full, what `ready` holds moves to the other one, which is reused whole if every buffer
/// split from it has been dropped, and replaced by a new one otherwise. A replay's rebuilt
/// batches, split off as Fetch answers and dropped once sent, thus go into memory written
/// before, instead of into a buffer grown by doubling (a copy each time) into fresh pages,
/// each faulted in and zeroed by the kernel.
fn make_room(ready: &mut BytesMut, spare: &mut BytesMut, bytes: usize, arena_bytes: usize) {
    if ready.capacity() - ready.len() >= bytes || ready.try_reclaim(bytes) {
        return;
    }
    let arena_bytes = arena_bytes.max(ready.len().saturating_add(bytes));
    let mut next = std::mem::take(spare);
    if !next.try_reclaim(arena_bytes) {
        next = BytesMut::with_capacity(arena_bytes);
    }
    next.extend_from_slice(ready);
    ready.clear();
    *spare = std::mem::replace(ready, next);
}

/// One partition's replay, shared by its Fetches and its rebuild-ahead task.
type ReplaySlot = Arc<tokio::sync::Mutex<Option<Replay>>>;

/// The cold reader of one node; see the module doc.
#[derive(Debug)]
pub struct ColdReader {
    store: ArchiveStore,
    config: ColdConfig,
    chunks: Arc<ChunkCache>,
    manifests: Mutex<HashMap<PartitionKey, Arc<Manifest>>>,
    /// Open readers by object key; a reader being opened is in its cell already, so callers
    /// racing to open one object (a Fetch, prefetch, a replay extending) read its footer once.
    readers: Mutex<Lru<String, Arc<OnceCell<Arc<ArchiveReader>>>>>,
    /// Each replaying partition's cursor and batches rebuilt ahead.
    replays: Mutex<Lru<PartitionKey, ReplaySlot>>,
    /// Where each partition's last cold read ended: a read starting there is sequential.
    positions: Mutex<HashMap<PartitionKey, i64>>,
    prefetching: Mutex<HashSet<PartitionKey>>,
    prefetch_slots: Arc<Semaphore>,
    /// Permits to decode a row group ahead of its replay ([`ColdConfig::decode_ahead_max`]).
    decode_ahead: Arc<Semaphore>,
    manifest_loads: AtomicU64,
    objects_opened: AtomicU64,
    prefetched: AtomicU64,
}

impl ColdReader {
    /// A cold reader over `store`.
    pub fn new(store: ArchiveStore, config: ColdConfig) -> Arc<ColdReader> {
        Arc::new(ColdReader {
            store,
            chunks: Arc::new(ChunkCache::new(config.cache_bytes)),
            prefetch_slots: Arc::new(Semaphore::new(config.prefetch_max)),
            decode_ahead: Arc::new(Semaphore::new(config.decode_ahead_max)),
            config,
            manifests: Mutex::new(HashMap::new()),
            readers: Mutex::default(),
            replays: Mutex::default(),
            positions: Mutex::new(HashMap::new()),
            prefetching: Mutex::new(HashSet::new()),
            manifest_loads: AtomicU64::new(0),
            objects_opened: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
        })
    }

    /// The store read from.
    pub fn store(&self) -> &ArchiveStore {
        &self.store
    }

    /// Counters so far.
    pub fn stats(&self) -> ColdStats {
        ColdStats {
            manifest_loads: self.manifest_loads.load(Ordering::Relaxed),
            objects_opened: self.objects_opened.load(Ordering::Relaxed),
            chunk_fetches: self.chunks.fetches.load(Ordering::Relaxed),
            chunk_hits: self.chunks.hits.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            cached_bytes: self.chunks.bytes(),
            cursors: self
                .replays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .len() as u64,
            decoding_ahead: (self.config.decode_ahead_max - self.decode_ahead.available_permits())
                as u64,
        }
    }

    /// The partition's manifest: the cached copy, or (with `reload`, or none cached) the
    /// store's. `None` when nothing was ever archived.
    async fn manifest(
        &self,
        topic: &str,
        partition: u32,
        reload: bool,
    ) -> Result<Option<Arc<Manifest>>, TierError> {
        let id = (topic.to_string(), partition);
        if !reload
            && let Some(manifest) = self
                .manifests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
        {
            return Ok(Some(manifest.clone()));
        }
        self.manifest_loads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric::MANIFEST_LOADS).increment(1);
        let loaded = Manifest::load(&self.store, topic, partition).await?;
        let mut manifests = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
        match loaded {
            Some(manifest) => {
                let manifest = Arc::new(manifest);
                // Two loads racing: keep the newer generation.
                let keep = match manifests.get(&id) {
                    Some(cached) if cached.generation > manifest.generation => cached.clone(),
                    _ => manifest,
                };
                manifests.insert(id, keep.clone());
                Ok(Some(keep))
            }
            None => {
                manifests.remove(&id);
                Ok(None)
            }
        }
    }

    /// The object holding `offset`, reloading the manifest once if the cached one cannot
    /// place it.
    async fn locate(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        force_reload: bool,
    ) -> Result<ManifestObject, ColdError> {
        if !force_reload
            && let Some(manifest) = self.manifest(topic, partition, false).await?
            && let Some(object) = manifest.find(offset)
        {
            return Ok(object.clone());
        }
        let manifest = self.manifest(topic, partition, true).await?;
        let not_archived = || ColdError::NotArchived {
            topic: topic.to_string(),
            partition,
            offset,
        };
        let manifest = manifest.ok_or_else(not_archived)?;
        if offset < manifest.log_start_offset {
            return Err(ColdError::OutOfRange {
                offset,
                log_start: manifest.log_start_offset,
            });
        }
        manifest.find(offset).cloned().ok_or_else(not_archived)
    }

    /// The object holding `offset` per the cached manifest only (no GET).
    fn locate_cached(&self, topic: &str, partition: u32, offset: i64) -> Option<ManifestObject> {
        self.manifests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(topic.to_string(), partition))
            .and_then(|manifest| manifest.find(offset).cloned())
    }

    /// The open reader of `object`, opening it (one footer fetch) when needed.
    async fn reader(&self, object: &ManifestObject) -> Result<Arc<ArchiveReader>, TierError> {
        let cell = {
            let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            match readers.get(&object.key) {
                Some(cell) => cell,
                None => {
                    let cell = Arc::new(OnceCell::new());
                    readers.insert(object.key.clone(), cell.clone(), self.config.readers_max);
                    cell
                }
            }
        };
        // A failed open leaves the cell empty: the next caller tries again.
        let reader = cell
            .get_or_try_init(|| async {
                self.objects_opened.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::OBJECTS_OPENED).increment(1);
                let reader = ArchiveReader::open_cached(
                    &self.store,
                    &object.key,
                    Some(object.size_bytes),
                    self.chunks.clone(),
                )
                .await?;
                Ok::<_, TierError>(Arc::new(reader))
            })
            .await?;
        Ok(reader.clone())
    }

    /// Forgets an object found missing: its reader, replay cursors and chunks.
    fn forget(&self, key: &str) {
        for (slot, _) in self
            .replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .values()
        {
            // A slot in use finds the object gone by itself.
            if let Ok(mut replay) = slot.try_lock()
                && replay.as_ref().is_some_and(|replay| replay.reads(key))
            {
                *replay = None;
            }
        }
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .remove(key);
        self.chunks.forget(&Path::from(key));
    }

    /// Appends one object's batches from `offset` to `out`, retrying once through a reloaded
    /// manifest when the object has gone; returns the object, its reader, the offset after the
    /// last record appended and the records. A `sequential` read continues the partition's
    /// cursor (rows decoded once however many Fetches hand them out; whole row groups fetched
    /// and cached); any other fetches only the pages it needs unless its row group is cached.
    /// `first` says the Fetch has nothing yet, so a first batch larger than `max_bytes` still
    /// comes back. On error `out` is as it was.
    async fn read_object(
        self: &Arc<Self>,
        id: &PartitionKey,
        offset: i64,
        max_bytes: usize,
        sequential: bool,
        first: bool,
        out: &mut BytesMut,
    ) -> Result<(ManifestObject, Arc<ArchiveReader>, i64, u64), ColdError> {
        let mut reload = false;
        loop {
            let object = self.locate(&id.0, id.1, offset, reload).await?;
            let attempt = async {
                let reader = self.reader(&object).await?;
                if !sequential || self.config.replays_max == 0 {
                    let read = if sequential {
                        reader.read(offset, max_bytes).await?
                    } else {
                        reader.read_pages(offset, max_bytes).await?
                    };
                    out.extend_from_slice(&read.batches);
                    return Ok::<_, TierError>((reader, read.next_offset, read.records));
                }
                let (next, records) = self
                    .replay(id, &object.key, &reader, offset, max_bytes, first, out)
                    .await?;
                Ok((reader, next, records))
            }
            .await;
            match attempt {
                Ok((reader, next, records)) => return Ok((object, reader, next, records)),
                Err(TierError::Store(object_store::Error::NotFound { .. })) if !reload => {
                    tracing::debug!(key = %object.key, "archive object gone; reloading the manifest");
                    self.forget(&object.key);
                    reload = true;
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// A sequential read of object `key` from `offset`: batches rebuilt ahead first, then the
    /// partition's cursor (a new one unless it stands at `offset` in `key`); afterwards a task
    /// rebuilds ahead for the next read. With `at_least_one`, a first batch larger than
    /// `max_bytes` is returned anyway (Kafka's rule for a Fetch's first batch). Returns the
    /// offset after the last record appended to `out` and the records; on error `out` is as it
    /// was and the replay is dropped.
    #[allow(clippy::too_many_arguments)]
    async fn replay(
        self: &Arc<Self>,
        id: &PartitionKey,
        key: &str,
        reader: &ArchiveReader,
        offset: i64,
        max_bytes: usize,
        at_least_one: bool,
        out: &mut BytesMut,
    ) -> Result<(i64, u64), TierError> {
        let slot = self.replay_slot(id);
        let mut guard = slot.lock().await;
        let continues = guard
            .as_ref()
            .is_some_and(|replay| replay.continues_at(key, offset));
        if !continues {
            let mut cursor = reader.cursor(offset)?;
            if self.config.decode_ahead_max > 0 {
                cursor = cursor.with_decode_ahead(self.decode_ahead.clone());
            }
            *guard = Some(Replay {
                objects: VecDeque::from([(key.to_string(), cursor.end_offset())]),
                cursor,
                ready: BytesMut::new(),
                spare: BytesMut::new(),
                position: offset,
                fetch_bytes: max_bytes,
                filling: false,
            });
        }
        let replay = guard.as_mut().expect("set above");
        replay.fetch_bytes = max_bytes;
        let start = out.len();
        let mut records = replay.take_ready(max_bytes, at_least_one, out);
        let ahead = out.len() - start;
        metrics::counter!(metric::AHEAD_BYTES).increment(ahead as u64);
        // Rebuilt here only what nothing rebuilt ahead: a batch ready that does not fit ends
        // the read. The batches go into the arena like those rebuilt ahead, right after the
        // ones just taken, so they join them in `out` without a copy. A Fetch asking for more
        // than an arena holds has them rebuilt straight into its answer instead, so that the
        // arenas a replay keeps stay the size of what it keeps ahead.
        if replay.ready.is_empty() && ahead < max_bytes && !replay.cursor.is_done() {
            let remaining = max_bytes - ahead;
            let rebuilt = if remaining <= replay.arena_bytes() {
                let rebuilt = replay.rebuild(remaining).await;
                rebuilt.map(|_| replay.take_ready(remaining, at_least_one && ahead == 0, out))
            } else {
                let read = replay.cursor.read_into(remaining, out).await;
                let next = replay.cursor.next_offset();
                replay.moved_to(next);
                read
            };
            match rebuilt {
                Ok(read) => records += read,
                Err(error) => {
                    out.truncate(start);
                    *guard = None;
                    return Err(error);
                }
            }
        }
        let next = replay.position;
        // A replay at its object's end stays when it may go on into the next object.
        if replay.ready.is_empty() && replay.cursor.is_done() && self.config.decode_ahead_max == 0 {
            *guard = None;
        } else if !replay.filling {
            replay.filling = true;
            self.rebuild_ahead(id.clone(), slot.clone());
        }
        Ok((next, records))
    }

    /// Continues the replay's cursor into the next object (per the cached manifest) once it
    /// decodes every row group it has, so that the next object's first row group is decoded
    /// ahead like any other. Nothing happens when the next object is not archived yet or cannot
    /// be opened: the replay then ends with its object, and the read after it opens the next
    /// one itself.
    async fn extend_replay(&self, id: &PartitionKey, replay: &mut Replay) {
        if self.config.decode_ahead_max == 0 || !replay.cursor.wants_more() {
            return;
        }
        let end = replay.cursor.end_offset();
        let Some(object) = self.locate_cached(&id.0, id.1, end) else {
            return;
        };
        let extended = match self.reader(&object).await {
            Ok(reader) => replay.cursor.extend(&reader),
            Err(error) => Err(error),
        };
        match extended {
            Ok(()) => replay
                .objects
                .push_back((object.key, replay.cursor.end_offset())),
            Err(error) => {
                tracing::debug!(topic = %id.0, partition = id.1, %error, "cold replay not extended");
            }
        }
    }

    /// The partition's replay slot, made when it has none; at most
    /// [`ColdConfig::replays_max`] are kept, least recently used dropped.
    fn replay_slot(&self, id: &PartitionKey) -> ReplaySlot {
        let mut replays = self.replays.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = replays.get(id) {
            return slot;
        }
        let slot = ReplaySlot::default();
        replays.insert(id.clone(), slot.clone(), self.config.replays_max);
        slot
    }

    /// Rebuilds, in the background, batches ahead of the partition's replay until
    /// [`Replay::ahead_bytes`] are ready or its object ends, a [`FILL_CHUNK_BYTES`] step at a time so a
    /// Fetch arriving meanwhile waits one step at most. A failure drops the replay: the next
    /// Fetch starts over and meets the failure itself.
    fn rebuild_ahead(self: &Arc<Self>, id: PartitionKey, slot: ReplaySlot) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let cold = self.clone();
        tokio::spawn(async move {
            loop {
                let mut guard = slot.lock().await;
                let Some(replay) = guard.as_mut() else {
                    return;
                };
                cold.extend_replay(&id, replay).await;
                let wanted = replay.ahead_bytes().saturating_sub(replay.ready.len());
                if wanted == 0 || replay.cursor.is_done() {
                    replay.filling = false;
                    return;
                }
                let step = wanted.min(replay.step_bytes());
                if let Err(error) = replay.rebuild(step).await {
                    tracing::debug!(topic = %id.0, partition = id.1, %error, "cold rebuild ahead failed");
                    *guard = None;
                    return;
                }
                drop(guard);
                tokio::task::yield_now().await;
            }
        });
    }

    /// Whole batches from `offset` on, about `max_bytes` of them (at least one batch), across
    /// row groups and objects; stops at the archive's end.
    pub async fn read(
        self: &Arc<Self>,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ColdRead, ColdError> {
        let started = std::time::Instant::now();
        let result = self.read_batches(topic, partition, offset, max_bytes).await;
        metrics::histogram!(metric::READ_SECONDS).record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(read) => {
                metrics::counter!(metric::READ_BYTES).increment(read.batches.len() as u64);
                metrics::counter!(metric::READ_RECORDS).increment(read.records);
                "ok"
            }
            Err(ColdError::OutOfRange { .. }) => "out_of_range",
            Err(ColdError::NotArchived { .. }) => "not_archived",
            Err(ColdError::Tier(_)) => "error",
        };
        metrics::counter!(metric::READS, "result" => outcome).increment(1);
        result
    }

    async fn read_batches(
        self: &Arc<Self>,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
    ) -> Result<ColdRead, ColdError> {
        let id = (topic.to_string(), partition);
        let sequential = self
            .positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            == Some(&offset);
        let mut out = BytesMut::new();
        let mut next = offset;
        let mut records = 0;
        let mut last: Option<(ManifestObject, Arc<ArchiveReader>)> = None;
        loop {
            // Past the first object, only what the cached manifest names: reaching the
            // archive's end must not reload the manifest on every read.
            if records > 0 && self.locate_cached(topic, partition, next).is_none() {
                break;
            }
            let remaining = max_bytes.saturating_sub(out.len()).max(1);
            let (object, reader, read_next, read_records) = match self
                .read_object(&id, next, remaining, sequential, records == 0, &mut out)
                .await
            {
                Ok(found) => found,
                // Past the first batch, the archive's end (or an expiry racing) ends the read.
                Err(ColdError::NotArchived { .. } | ColdError::OutOfRange { .. })
                    if records > 0 =>
                {
                    break;
                }
                Err(error) => return Err(error),
            };
            next = read_next;
            records += read_records;
            last = Some((object, reader));
            if read_records == 0 || out.len() >= max_bytes {
                break;
            }
        }
        self.positions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), next);
        if sequential && let Some((object, reader)) = last {
            self.prefetch(id, object, reader, next);
        }
        Ok(ColdRead {
            batches: out.freeze(),
            next_offset: next,
            records,
        })
    }

    /// Fetches, in the background, the row groups a replay reading on from `next` needs next
    /// (see [`ColdReader::prefetch_next`]); at an object's end, the next object (footer and
    /// first row group).
    fn prefetch(
        self: &Arc<Self>,
        id: PartitionKey,
        object: ManifestObject,
        reader: Arc<ArchiveReader>,
        next: i64,
    ) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Ok(permit) = self.prefetch_slots.clone().try_acquire_owned() else {
            return;
        };
        if !self
            .prefetching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone())
        {
            return;
        }
        let cold = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = cold.prefetch_next(&id, &object, &reader, next).await;
            if let Err(error) = result {
                tracing::debug!(topic = %id.0, partition = id.1, %error, "cold prefetch failed");
            }
            cold.prefetching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// Fetches what is not cached of the row group holding `next` and the
    /// [`GROUPS_AHEAD`] after it (crossing into the next objects); past the next one, only as
    /// far as the cache holds them all.
    async fn prefetch_next(
        &self,
        id: &PartitionKey,
        object: &ManifestObject,
        reader: &Arc<ArchiveReader>,
        next: i64,
    ) -> Result<(), ColdError> {
        let (mut reader, mut group) = match reader.row_group_of(next) {
            Some(group) => (reader.clone(), group),
            None if next > object.last_offset => {
                let Some(object) = self.locate_cached(&id.0, id.1, next) else {
                    return Ok(());
                };
                let opened = self.reader(&object).await?;
                let group = opened.row_group_of(next).unwrap_or(0);
                (opened, group)
            }
            None => return Ok(()),
        };
        let mut window_bytes = 0u64;
        for depth in 0..=GROUPS_AHEAD {
            window_bytes += reader.row_group_bytes(group).unwrap_or(0);
            if depth > 1 && window_bytes > self.config.cache_bytes {
                // Fetching further would evict what the replay is about to read.
                return Ok(());
            }
            if !reader.row_group_cached(group) && reader.prefetch_row_group(group).await? {
                self.prefetched.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric::PREFETCHES).increment(1);
            }
            if group + 1 < reader.row_groups() {
                group += 1;
            } else {
                let after = reader.info().last_offset + 1;
                let Some(object) = self.locate_cached(&id.0, id.1, after) else {
                    return Ok(());
                };
                reader = self.reader(&object).await?;
                group = 0;
            }
        }
        Ok(())
    }

    /// The first archived offset whose timestamp is at or after `timestamp_ms`, with its
    /// timestamp: `None` when every archived record
    /// is older (the caller then asks the local log). The manifest's time ranges pick the
    /// object: the first one whose newest record is not older than `timestamp_ms`.
    pub async fn offset_for_timestamp(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<(i64, i64)>, ColdError> {
        let Some(manifest) = self.manifest(topic, partition, true).await? else {
            return Ok(None);
        };
        for object in &manifest.objects {
            if object.max_timestamp_ms < timestamp_ms {
                continue;
            }
            let reader = match self.reader(object).await {
                Ok(reader) => reader,
                Err(TierError::Store(object_store::Error::NotFound { .. })) => {
                    self.forget(&object.key);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            if let Some((offset, timestamp)) = reader.offset_for_timestamp(timestamp_ms).await?
                && offset >= manifest.log_start_offset
            {
                return Ok(Some((offset, timestamp)));
            }
        }
        Ok(None)
    }

    /// The range the archive holds for a partition, per the cached manifest (reloaded when
    /// none is cached): `log_start..next`.
    pub async fn archived_range(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Option<Range<i64>>, ColdError> {
        let manifest = self.manifest(topic, partition, false).await?;
        Ok(manifest.and_then(|manifest| {
            manifest.next_offset().map(|next| {
                manifest
                    .log_start_offset
                    .max(manifest.objects[0].base_offset)..next
            })
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay's two arenas, as Fetches use them: each answer is split off and held until
    /// the next is taken (one Fetch in flight). Every byte comes out as written, and the same
    /// two arenas serve the whole replay; an arena whose answers are all still held is not
    /// reused, and their bytes stay as they were.
    #[test]
    fn rebuilt_bytes_go_into_two_arenas_in_turn() {
        const ARENA: usize = 64 << 10;
        const ANSWER: usize = 5000;
        let (mut ready, mut spare) = (BytesMut::new(), BytesMut::new());
        let (mut written, mut read) = (0usize, 0usize);
        let mut bases = HashSet::new();
        let mut append =
            |ready: &mut BytesMut, spare: &mut BytesMut, bases: &mut HashSet<usize>| {
                let before = ready.as_ptr() as usize;
                make_room(ready, spare, ANSWER, ARENA);
                if ready.as_ptr() as usize != before {
                    bases.insert(ready.as_ptr() as usize);
                }
                let capacity = ready.capacity();
                ready.extend((written..written + ANSWER).map(|i| (i % 251) as u8));
                assert_eq!(ready.capacity(), capacity, "appending reallocated");
                written += ANSWER;
            };
        let check = |answer: &[u8], from: usize| {
            assert!(
                answer
                    .iter()
                    .zip(from..)
                    .all(|(&b, i)| b == (i % 251) as u8)
            );
        };
        let mut in_flight = Bytes::new();
        for _ in 0..200 {
            append(&mut ready, &mut spare, &mut bases);
            let answer = ready.split_to(ANSWER).freeze();
            check(&answer, read);
            read += ANSWER;
            in_flight = answer; // the answer before is sent and dropped
        }
        assert_eq!(bases.len(), 2, "arenas: {bases:?}");
        drop(in_flight);

        // Every answer held: each switch needs a new arena, and nothing held changes.
        let mut held = Vec::new();
        for _ in 0..40 {
            append(&mut ready, &mut spare, &mut bases);
            held.push((read, ready.split_to(ANSWER).freeze()));
            read += ANSWER;
        }
        assert!(bases.len() > 3, "arenas: {}", bases.len());
        for (from, answer) in &held {
            check(answer, *from);
        }
    }

    /// Both kinds of answer: a stream (memory, S3) and a file read in place (a directory).
    #[tokio::test]
    async fn a_large_chunk_fetched_in_parts_is_the_bytes_of_one_get() {
        let dir = tempfile::tempdir().unwrap();
        let stores: [Arc<dyn ObjectStore>; 2] = [
            Arc::new(object_store::memory::InMemory::new()),
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        ];
        let key = Path::from("object");
        let bytes: Vec<u8> = (0..(PART_BYTES * 5 / 2 + 7))
            .map(|at| (at * 31 % 251) as u8)
            .collect();
        for store in stores {
            store.put(&key, bytes.clone().into()).await.unwrap();
            for range in [
                0..bytes.len() as u64,
                3..PART_BYTES + 3,
                5..PART_BYTES * 2 + 1,
                PART_BYTES - 1..PART_BYTES + 1,
            ] {
                let got = get_in_parts(&store, &key, range.clone()).await.unwrap();
                let (start, end) = (range.start as usize, range.end as usize);
                assert_eq!(&got[..], &bytes[start..end], "{store} {range:?}");
            }
            for past_the_end in [
                0..bytes.len() as u64 + 1,
                7..bytes.len() as u64 + PART_BYTES,
            ] {
                let error = get_in_parts(&store, &key, past_the_end.clone()).await;
                assert!(error.is_err(), "{store} {past_the_end:?}");
            }
        }
    }
}
