//! Reading an archive object back as RecordBatch v2 batches, from any offset in it.
//!
//! Offsets in an object are contiguous (the writer refuses anything else), so the row holding
//! an offset is found by arithmetic, and the reader fetches only the row groups and, through the
//! page index, only the pages that hold the rows asked for. Batches are rebuilt from the rows
//! with the producer's fields (id, epoch, sequence), the leader epoch, timestamp type and
//! compression of the batch each record was written in, and a fresh CRC. A read that starts
//! inside an original batch yields a batch starting at the offset asked for: its records and
//! their sequences are the same, which is all a consumer can observe.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    ArrayAccessor, AsArray, BinaryArray, BinaryViewArray, Int16Array, Int32Array, Int64Array,
    ListArray, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{Int16Type, Int32Type, Int64Type, TimestampMicrosecondType};
use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector,
};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use silt_log::batch::{BatchEncoder, BatchHeader, BatchSpec, MAGIC_V2, RecordRef};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::cold::ChunkCache;
use crate::error::{Result, TierError};
use crate::schema;
use crate::store::ArchiveStore;

/// Rows decoded per Arrow batch while rebuilding, at most.
const READ_BATCH_ROWS: usize = 1024;
/// Decoded bytes per Arrow batch while rebuilding, about: a row group of large records is
/// decoded a few rows at a time, so a cursor's queue of ready batches stays a few MiB.
const READ_BATCH_BYTES: usize = 1 << 20;
/// Footer bytes fetched in the first request, so most footers take one round trip.
const FOOTER_PREFETCH_BYTES: usize = 64 << 10;

/// What one read returned: whole batches, and where the next read continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveRead {
    /// Concatenated RecordBatch v2 batches, as a Fetch response carries them.
    pub batches: Bytes,
    /// Offset after the last record returned.
    pub next_offset: i64,
    /// Records returned.
    pub records: u64,
}

/// The footer facts of an archive object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFileInfo {
    pub topic: String,
    pub partition: u32,
    pub base_offset: i64,
    pub last_offset: i64,
    pub records: u64,
    pub min_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
}

/// One archive object opened for reading: its footer is fetched once, at open.
#[derive(Debug, Clone)]
pub struct ArchiveReader {
    source: ObjectSource,
    metadata: ArrowReaderMetadata,
    info: ArchiveFileInfo,
    /// Offset of the first row of each row group, and one past the last.
    row_group_offsets: Vec<i64>,
}

impl ArchiveReader {
    /// Opens the object at `key` (prefix included). `size_bytes` comes from the manifest, which
    /// saves a HEAD request; without it the store is asked.
    pub async fn open(
        store: &ArchiveStore,
        key: &str,
        size_bytes: Option<u64>,
    ) -> Result<ArchiveReader> {
        let path = Path::from(key);
        let size = match size_bytes {
            Some(size) => size,
            None => store.store().head(&path).await?.size,
        };
        let mut source = ObjectSource {
            store: Arc::clone(store.store()),
            key: path,
            size,
            chunks: None,
        };
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Optional);
        let parquet_metadata = source.get_metadata(Some(&options)).await?;
        let corrupt = |why: String| TierError::Corrupt {
            key: key.to_string(),
            why,
        };
        let info = footer_info(&parquet_metadata).map_err(corrupt)?;
        let file = ArrowReaderMetadata::try_new(Arc::clone(&parquet_metadata), options.clone())?;
        if file.schema().fields() != schema::archive_schema().fields() {
            return Err(corrupt(format!(
                "schema {:?} is not archive format {}",
                file.schema(),
                schema::FORMAT_VERSION
            )));
        }
        // The file's columns as the reader decodes them (key and value as views).
        let metadata = ArrowReaderMetadata::try_new(
            parquet_metadata,
            options.with_schema(schema::archive_read_schema()),
        )?;
        let mut row_group_offsets = vec![info.base_offset];
        for row_group in metadata.metadata().row_groups() {
            let last = *row_group_offsets.last().expect("starts non-empty");
            row_group_offsets.push(last + row_group.num_rows());
        }
        if row_group_offsets.last() != Some(&(info.last_offset + 1)) {
            return Err(corrupt(format!(
                "row groups hold {} rows, the footer says offsets {}..={}",
                row_group_offsets.last().unwrap_or(&0) - info.base_offset,
                info.base_offset,
                info.last_offset
            )));
        }
        Ok(ArchiveReader {
            source,
            metadata,
            info,
            row_group_offsets,
        })
    }

    /// [`ArchiveReader::open`], with every row group fetched whole (one ranged GET) through
    /// `cache`, so re-reads and [`ArchiveReader::prefetch_row_group`] share the bytes.
    pub async fn open_cached(
        store: &ArchiveStore,
        key: &str,
        size_bytes: Option<u64>,
        cache: Arc<ChunkCache>,
    ) -> Result<ArchiveReader> {
        let mut reader = ArchiveReader::open(store, key, size_bytes).await?;
        let ranges: Vec<Range<u64>> = reader
            .metadata
            .metadata()
            .row_groups()
            .iter()
            .map(|group| {
                let (mut start, mut end) = (u64::MAX, 0u64);
                for column in group.columns() {
                    let (from, len) = column.byte_range();
                    start = start.min(from);
                    end = end.max(from.saturating_add(len));
                }
                start.min(end)..end
            })
            .collect();
        // A row group is fetched into a buffer of its size: a footer naming bytes past the
        // object's end is refused here, before anything that large is allocated.
        if let Some(past) = ranges.iter().find(|range| range.end > reader.source.size) {
            return Err(TierError::Corrupt {
                key: key.to_string(),
                why: format!(
                    "a row group at bytes {past:?}, past the object's {} bytes",
                    reader.source.size
                ),
            });
        }
        reader.source.chunks = Some(Arc::new(RowGroupChunks { cache, ranges }));
        Ok(reader)
    }

    /// The row group holding `offset`, if the object holds it.
    pub fn row_group_of(&self, offset: i64) -> Option<usize> {
        if !(self.info.base_offset..=self.info.last_offset).contains(&offset) {
            return None;
        }
        Some(
            self.row_group_offsets
                .partition_point(|&start| start <= offset)
                - 1,
        )
    }

    /// Offsets `first..end` of row group `group`.
    pub fn row_group_range(&self, group: usize) -> Option<Range<i64>> {
        Some(*self.row_group_offsets.get(group)?..*self.row_group_offsets.get(group + 1)?)
    }

    /// Fetches row group `group` into the chunk cache (a reader opened with
    /// [`ArchiveReader::open_cached`]); returns whether it had to be fetched. Without a cache
    /// or past the last group, does nothing.
    pub async fn prefetch_row_group(&self, group: usize) -> Result<bool> {
        let Some(chunks) = &self.source.chunks else {
            return Ok(false);
        };
        let Some(range) = chunks.ranges.get(group) else {
            return Ok(false);
        };
        let (_, fetched) = chunks
            .cache
            .get(&self.source.store, &self.source.key, range.clone())
            .await?;
        Ok(fetched)
    }

    /// Bytes of row group `group` in the object (what fetching it whole GETs).
    pub fn row_group_bytes(&self, group: usize) -> Option<u64> {
        let row_group = self.metadata.metadata().row_groups().get(group)?;
        u64::try_from(row_group.compressed_size()).ok()
    }

    /// Whether row group `group` is in the chunk cache (always false without one).
    pub fn row_group_cached(&self, group: usize) -> bool {
        self.source.chunks.as_ref().is_some_and(|chunks| {
            chunks
                .ranges
                .get(group)
                .is_some_and(|range| chunks.cache.contains(&self.source.key, range.start))
        })
    }

    /// The first offset whose record timestamp is at or after `timestamp_ms`, with that
    /// timestamp, as Kafka's ListOffsets answers; `None` if every record is older. Row groups
    /// whose timestamp statistics rule them out are skipped; only the offset and timestamp
    /// columns are read.
    pub async fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<(i64, i64)>> {
        if timestamp_ms > self.info.max_timestamp_ms {
            return Ok(None);
        }
        let target = timestamp_ms.saturating_mul(1000);
        let metadata = self.metadata.metadata();
        let parquet_schema = metadata.file_metadata().schema_descr();
        let timestamp_column = (0..parquet_schema.num_columns())
            .find(|&index| parquet_schema.column(index).name() == schema::COL_TIMESTAMP)
            .ok_or_else(|| TierError::Corrupt {
                key: self.source.key.to_string(),
                why: "no timestamp column".into(),
            })?;
        let mut groups = Vec::new();
        for (index, group) in metadata.row_groups().iter().enumerate() {
            let skip = match group.column(timestamp_column).statistics() {
                Some(parquet::file::statistics::Statistics::Int64(stats)) => {
                    stats.max_opt().is_some_and(|&max| max < target)
                }
                _ => false,
            };
            if !skip {
                groups.push(index);
            }
        }
        if groups.is_empty() {
            return Ok(None);
        }
        let mask = parquet::arrow::ProjectionMask::columns(
            parquet_schema,
            [schema::COL_OFFSET, schema::COL_TIMESTAMP],
        );
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(
            self.source.clone(),
            self.metadata.clone(),
        )
        .with_row_groups(groups)
        .with_projection(mask)
        .with_batch_size(8 * READ_BATCH_ROWS)
        .build()?;
        let corrupt = |why: &str| TierError::Corrupt {
            key: self.source.key.to_string(),
            why: why.to_string(),
        };
        while let Some(batch) = stream.try_next().await? {
            let offsets = batch
                .column_by_name(schema::COL_OFFSET)
                .and_then(|column| column.as_primitive_opt::<Int64Type>())
                .ok_or_else(|| corrupt("offset is not int64"))?;
            let timestamps = batch
                .column_by_name(schema::COL_TIMESTAMP)
                .and_then(|column| column.as_primitive_opt::<TimestampMicrosecondType>())
                .ok_or_else(|| corrupt("timestamp is not microseconds"))?;
            for row in 0..batch.num_rows() {
                let micros = timestamps.value(row);
                if micros >= target {
                    return Ok(Some((offsets.value(row), micros / 1000)));
                }
            }
        }
        Ok(None)
    }

    /// The object's footer facts.
    pub fn info(&self) -> &ArchiveFileInfo {
        &self.info
    }

    /// Row groups in the object.
    pub fn row_groups(&self) -> usize {
        self.row_group_offsets.len() - 1
    }

    /// [`ArchiveReader::read`] for a read that is not part of a sequential replay: unless its
    /// row group is cached, only the pages holding the rows asked for are fetched (ranged
    /// GETs through the page index), not the whole row group, most of which such a read
    /// would not use. A reader without a cache reads pages anyway.
    pub async fn read_pages(&self, from_offset: i64, max_bytes: usize) -> Result<ArchiveRead> {
        let cached = self
            .row_group_of(from_offset)
            .is_some_and(|group| self.row_group_cached(group));
        if cached || self.source.chunks.is_none() {
            return self.read(from_offset, max_bytes).await;
        }
        let mut direct = self.clone();
        direct.source.chunks = None;
        direct.read(from_offset, max_bytes).await
    }

    /// Reads whole batches from `from_offset` on, stopping once about `max_bytes` are gathered;
    /// at least one batch is returned, as Kafka's Fetch does, however small `max_bytes` is.
    /// Reads within the row group holding `from_offset`, and decodes only about the rows
    /// `max_bytes` needs; a replay reading on and on uses an [`ArchiveCursor`] instead.
    pub async fn read(&self, from_offset: i64, max_bytes: usize) -> Result<ArchiveRead> {
        let group = self
            .row_group_of(from_offset)
            .ok_or_else(|| self.outside(from_offset))?;
        let row_group = self.metadata.metadata().row_group(group);
        let group_rows = usize::try_from(row_group.num_rows()).unwrap_or(0);
        // Rows to decode: enough for `max_bytes` at the group's average row size, so a small
        // Fetch does not pull a whole row group; at least one row.
        let row_bytes =
            usize::try_from(row_group.total_byte_size()).unwrap_or(0) / group_rows.max(1);
        let wanted = (max_bytes / row_bytes.max(1)).saturating_add(1);
        let mut cursor = self.cursor_rows(from_offset, Some(wanted))?;
        let mut out = BytesMut::new();
        let records = cursor.read_into(max_bytes, &mut out).await?;
        Ok(ArchiveRead {
            batches: out.freeze(),
            next_offset: cursor.next_offset(),
            records,
        })
    }

    /// A cursor reading this object from `from_offset` to its end: each row is decoded once
    /// however many reads it takes to hand them all out, which is what a sequential replay
    /// needs. Row groups are fetched as the cursor reaches them (through the chunk cache when
    /// the reader has one).
    pub fn cursor(&self, from_offset: i64) -> Result<ArchiveCursor> {
        self.cursor_rows(from_offset, None)
    }

    /// A cursor over `from_offset` and the rows after it: at most `rows_max` of them, inside
    /// the row group holding `from_offset`, or (`None`) every row to the object's end.
    fn cursor_rows(&self, from_offset: i64, rows_max: Option<usize>) -> Result<ArchiveCursor> {
        let group = self
            .row_group_of(from_offset)
            .ok_or_else(|| self.outside(from_offset))?;
        let skip = usize::try_from(from_offset - self.row_group_offsets[group])
            .expect("the offset is inside its row group");
        let group_rest =
            usize::try_from(self.row_group_offsets[group + 1] - from_offset).expect("offsets grow");
        let mut cursor = ArchiveCursor {
            plan: VecDeque::new(),
            decoders: VecDeque::new(),
            ahead: None,
            pending: None,
            next_offset: from_offset,
            end_offset: from_offset,
        };
        let select = rows_max.map_or(group_rest, |rows| rows.clamp(1, group_rest));
        cursor.plan_group(self, group, Some((skip, select)));
        if rows_max.is_none() {
            for later in group + 1..self.row_groups() {
                cursor.plan_group(self, later, None);
            }
        }
        Ok(cursor)
    }

    fn outside(&self, offset: i64) -> TierError {
        TierError::InvalidInput(format!(
            "offset {offset} is outside the object's {}..={}",
            self.info.base_offset, self.info.last_offset
        ))
    }
}

/// Arrow batches a row group decoded ahead keeps ready at least.
const DECODED_BATCHES_READY: usize = 4;
/// Decoded bytes a row group decoded ahead of its cursor may hold: about a whole row group of
/// ~500-byte records, so that a row group decoded ahead on another core can finish while the
/// cursor's consumer is still on an earlier one.
pub const DECODE_AHEAD_BYTES: usize = 64 << 20;
/// Row groups a cursor decodes ahead of the one it reads, each holding a permit from the
/// cursor's [`ArchiveCursor::with_decode_ahead`] semaphore. Two, so that a decoder is still
/// working ahead whenever the consumer moves on to the next row group (one gave 417 MB/s
/// against 538 from S3 in a 5-pair A/B on 2 cores, BENCHMARKS.md).
const GROUPS_DECODED_AHEAD: usize = 2;

/// A read position in one or more consecutive archive objects that keeps decoding between
/// reads (see [`ArchiveReader::cursor`]): rows decoded and not yet handed out wait for the next
/// read. The row group being read is decoded by the reader as it reads; with permits to decode
/// ahead, the next row group is decoded by its own task (on another core) into a bounded queue
/// of Arrow batches while this one is read.
pub struct ArchiveCursor {
    /// Row groups not yet being decoded, in offset order.
    plan: VecDeque<GroupPlan>,
    /// Row groups being decoded: the one being read first.
    decoders: VecDeque<GroupDecoder>,
    /// Permits to decode a row group ahead, shared by the cursors of a node.
    ahead: Option<Arc<Semaphore>>,
    /// Decoded rows not yet rebuilt: the Arrow batch and the first row still to hand out.
    pending: Option<(RecordBatch, usize)>,
    next_offset: i64,
    /// One past the last offset the cursor can reach.
    end_offset: i64,
}

/// One row group a cursor will read: where it is and which of its rows.
struct GroupPlan {
    source: ObjectSource,
    metadata: ArrowReaderMetadata,
    group: usize,
    /// Rows to skip, then to read; `None` reads them all.
    rows: Option<(usize, usize)>,
    /// Rows per Arrow batch: [`READ_BATCH_BYTES`] of them at the row group's average row size,
    /// 1 to [`READ_BATCH_ROWS`].
    batch_rows: usize,
    /// Decoded bytes of one Arrow batch, estimated from the row group's uncompressed size.
    batch_bytes: usize,
}

/// A row group being decoded.
struct GroupDecoder {
    key: Path,
    decoding: Decoding,
}

enum Decoding {
    /// By the cursor's reader, as it reads.
    Inline(ParquetRecordBatchStream<ObjectSource>),
    /// Ahead of the reader, by its own task.
    Ahead {
        batches: mpsc::Receiver<parquet::errors::Result<RecordBatch>>,
        task: tokio::task::AbortHandle,
        /// Given back when the row group is read (or the cursor dropped).
        _permit: OwnedSemaphorePermit,
    },
}

impl Drop for GroupDecoder {
    fn drop(&mut self) {
        if let Decoding::Ahead { task, .. } = &self.decoding {
            task.abort();
        }
    }
}

impl GroupDecoder {
    /// The row group's next Arrow batch, `None` once it is read.
    async fn next(&mut self) -> Option<parquet::errors::Result<RecordBatch>> {
        match &mut self.decoding {
            Decoding::Inline(stream) => stream.next().await,
            Decoding::Ahead { batches, .. } => batches.recv().await,
        }
    }
}

impl GroupPlan {
    /// Starts decoding: as the reader reads, or (with a permit) ahead of it on a task of its
    /// own, keeping up to [`DECODE_AHEAD_BYTES`] of Arrow batches ready.
    fn start(self, permit: Option<OwnedSemaphorePermit>) -> parquet::errors::Result<GroupDecoder> {
        let key = self.source.key.clone();
        let ready = (DECODE_AHEAD_BYTES / self.batch_bytes).max(DECODED_BATCHES_READY);
        let mut builder =
            ParquetRecordBatchStreamBuilder::new_with_metadata(self.source, self.metadata)
                .with_row_groups(vec![self.group])
                .with_batch_size(self.batch_rows);
        if let Some((skip, select)) = self.rows {
            builder = builder.with_row_selection(RowSelection::from(vec![
                RowSelector::skip(skip),
                RowSelector::select(select),
            ]));
        }
        let mut stream = builder.build()?;
        let Some(permit) = permit else {
            return Ok(GroupDecoder {
                key,
                decoding: Decoding::Inline(stream),
            });
        };
        let (sender, batches) = mpsc::channel(ready);
        let task = tokio::spawn(async move {
            while let Some(batch) = stream.next().await {
                let failed = batch.is_err();
                if sender.send(batch).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(GroupDecoder {
            key,
            decoding: Decoding::Ahead {
                batches,
                task: task.abort_handle(),
                _permit: permit,
            },
        })
    }
}

impl std::fmt::Debug for ArchiveCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveCursor")
            .field("next_offset", &self.next_offset)
            .field("end_offset", &self.end_offset)
            .field("groups_planned", &self.plan.len())
            .field("groups_decoding", &self.decoders.len())
            .finish_non_exhaustive()
    }
}

impl ArchiveCursor {
    /// The offset the next read starts at.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// One past the last offset the cursor reaches (where [`ArchiveCursor::extend`] continues).
    pub fn end_offset(&self) -> i64 {
        self.end_offset
    }

    /// Whether every row the cursor can reach has been handed out.
    pub fn is_done(&self) -> bool {
        self.next_offset >= self.end_offset
    }

    /// Whether every row group the cursor reaches is being decoded already, so that a replay
    /// wanting to decode further ahead should [`ArchiveCursor::extend`] it.
    pub fn wants_more(&self) -> bool {
        self.plan.is_empty() && self.decoders.len() <= GROUPS_DECODED_AHEAD
    }

    /// Lets the cursor decode the row group after the one it reads while it reads, holding one
    /// of `permits` for it (none free: it decodes each row group when it reaches it).
    pub fn with_decode_ahead(mut self, permits: Arc<Semaphore>) -> ArchiveCursor {
        self.ahead = Some(permits);
        self
    }

    /// Continues the cursor into `next`, the object whose first offset is this cursor's end,
    /// and starts decoding it as far as the cursor decodes ahead.
    pub fn extend(&mut self, next: &ArchiveReader) -> Result<()> {
        if next.info.base_offset != self.end_offset {
            return Err(TierError::InvalidInput(format!(
                "{} starts at offset {}, not at the cursor's end {}",
                next.source.key, next.info.base_offset, self.end_offset
            )));
        }
        for group in 0..next.row_groups() {
            self.plan_group(next, group, None);
        }
        self.start_decoders()
    }

    /// Adds row group `group` of `reader` (or `rows` of it) to the end of the cursor.
    fn plan_group(&mut self, reader: &ArchiveReader, group: usize, rows: Option<(usize, usize)>) {
        let row_group = reader.metadata.metadata().row_group(group);
        let group_rows = usize::try_from(row_group.num_rows()).unwrap_or(0);
        let row_bytes =
            usize::try_from(row_group.total_byte_size()).unwrap_or(0) / group_rows.max(1);
        let batch_rows = (READ_BATCH_BYTES / row_bytes.max(1)).clamp(1, READ_BATCH_ROWS);
        let count = rows.map_or(group_rows, |(_, select)| select);
        self.end_offset += i64::try_from(count).expect("rows fit i64");
        self.plan.push_back(GroupPlan {
            source: reader.source.clone(),
            metadata: reader.metadata.clone(),
            group,
            rows,
            batch_rows,
            batch_bytes: row_bytes.saturating_mul(batch_rows).max(1),
        });
    }

    /// Starts the decoders the cursor should have running: the row group it reads, and (with
    /// a free permit) the [`GROUPS_DECODED_AHEAD`] after it.
    fn start_decoders(&mut self) -> Result<()> {
        if self.decoders.is_empty()
            && let Some(plan) = self.plan.pop_front()
        {
            self.decoders.push_back(plan.start(None)?);
        }
        while self.decoders.len() <= GROUPS_DECODED_AHEAD && !self.plan.is_empty() {
            let Some(permit) = self
                .ahead
                .as_ref()
                .and_then(|permits| permits.clone().try_acquire_owned().ok())
            else {
                break;
            };
            let plan = self.plan.pop_front().expect("checked non-empty");
            self.decoders.push_back(plan.start(Some(permit))?);
        }
        Ok(())
    }

    /// The next decoded Arrow batch, `None` once every row group is read.
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            self.start_decoders()?;
            let Some(decoder) = self.decoders.front_mut() else {
                return Ok(None);
            };
            match decoder.next().await {
                Some(batch) => return Ok(Some(batch?)),
                None => {
                    self.decoders.pop_front();
                }
            }
        }
    }

    /// Appends whole batches to `out`, from [`ArchiveCursor::next_offset`] on, until about
    /// `max_bytes` are appended or the cursor is done; at least one record's batch however
    /// small `max_bytes` is. Returns the records appended. On error `out` holds what it held
    /// before, and the cursor must not be used again.
    pub async fn read_into(&mut self, max_bytes: usize, out: &mut BytesMut) -> Result<u64> {
        let start = out.len();
        let mut rebuilder = Rebuilder::new(self.next_offset);
        let result = self.rebuild(&mut rebuilder, start, max_bytes, out).await;
        let result = result.and_then(|()| rebuilder.flush(out).map_err(|why| self.corrupt(why)));
        match result {
            Ok(()) => {
                self.next_offset = rebuilder.next_offset;
                if self.is_done() {
                    // Its last row group's decoder may still hold a permit to decode ahead.
                    self.decoders.clear();
                }
                Ok(rebuilder.records)
            }
            Err(error) => {
                rebuilder.abandon(out);
                out.truncate(start);
                Err(error)
            }
        }
    }

    async fn rebuild(
        &mut self,
        rebuilder: &mut Rebuilder,
        start: usize,
        max_bytes: usize,
        out: &mut BytesMut,
    ) -> Result<()> {
        while rebuilder.next_offset < self.end_offset {
            let (batch, first_row) = match self.pending.take() {
                Some(pending) => pending,
                None => match self.next_batch().await? {
                    Some(batch) => (batch, 0),
                    None => {
                        return Err(self.corrupt(format!(
                            "the rows end at offset {}, before {}",
                            rebuilder.next_offset, self.end_offset
                        )));
                    }
                },
            };
            let columns = Columns::of(&batch).map_err(|why| self.corrupt(why))?;
            let mut row = first_row;
            while row < batch.num_rows() {
                if rebuilder.records > 0 && out.len() - start + rebuilder.held_bytes() >= max_bytes
                {
                    break;
                }
                rebuilder
                    .add(&columns, row, out)
                    .map_err(|why| self.corrupt(why))?;
                row += 1;
            }
            if row < batch.num_rows() {
                self.pending = Some((batch, row));
                return Ok(());
            }
        }
        Ok(())
    }

    /// The object the cursor reads now (or will read next).
    fn key(&self) -> String {
        self.decoders
            .front()
            .map(|decoder| decoder.key.to_string())
            .or_else(|| self.plan.front().map(|plan| plan.source.key.to_string()))
            .unwrap_or_default()
    }

    fn corrupt(&self, why: String) -> TierError {
        TierError::Corrupt {
            key: self.key(),
            why,
        }
    }
}

/// Parses and checks the footer's key-value metadata.
fn footer_info(metadata: &ParquetMetaData) -> std::result::Result<ArchiveFileInfo, String> {
    let pairs = metadata
        .file_metadata()
        .key_value_metadata()
        .ok_or("no footer metadata")?;
    let get = |name: &str| -> std::result::Result<&str, String> {
        pairs
            .iter()
            .find(|pair| pair.key == name)
            .and_then(|pair| pair.value.as_deref())
            .ok_or_else(|| format!("footer metadata {name} is missing"))
    };
    fn number<T: std::str::FromStr>(name: &str, text: &str) -> std::result::Result<T, String> {
        text.parse()
            .map_err(|_| format!("footer metadata {name}={text:?} is not a number"))
    }
    let format = get(schema::META_FORMAT)?;
    if format != schema::FORMAT_VERSION {
        return Err(format!(
            "archive format {format:?} is not {}",
            schema::FORMAT_VERSION
        ));
    }
    let info = ArchiveFileInfo {
        topic: get(schema::META_TOPIC)?.to_string(),
        partition: number(schema::META_PARTITION, get(schema::META_PARTITION)?)?,
        base_offset: number(schema::META_BASE_OFFSET, get(schema::META_BASE_OFFSET)?)?,
        last_offset: number(schema::META_LAST_OFFSET, get(schema::META_LAST_OFFSET)?)?,
        records: number(schema::META_RECORDS, get(schema::META_RECORDS)?)?,
        min_timestamp_ms: number(
            schema::META_MIN_TIMESTAMP_MS,
            get(schema::META_MIN_TIMESTAMP_MS)?,
        )?,
        max_timestamp_ms: number(
            schema::META_MAX_TIMESTAMP_MS,
            get(schema::META_MAX_TIMESTAMP_MS)?,
        )?,
    };
    let rows = u64::try_from(metadata.file_metadata().num_rows()).unwrap_or(u64::MAX);
    if info.base_offset < 0
        || info.last_offset < info.base_offset
        || u64::try_from(info.last_offset - info.base_offset + 1) != Ok(info.records)
        || rows != info.records
    {
        return Err(format!(
            "footer offsets {}..={} and {} records disagree with {rows} rows",
            info.base_offset, info.last_offset, info.records
        ));
    }
    Ok(info)
}

/// Turns rows back into batches: consecutive rows of one original batch become one batch,
/// encoded straight from the Arrow columns into the output.
struct Rebuilder {
    next_offset: i64,
    records: u64,
    /// The batch being encoded, and the original batch its rows came from.
    open: Option<(BatchEncoder, i64)>,
}

impl Rebuilder {
    fn new(from_offset: i64) -> Rebuilder {
        Rebuilder {
            next_offset: from_offset,
            records: 0,
            open: None,
        }
    }

    /// Appends row `row` of `columns`, the next offset, to the open batch, or to a new one
    /// when it comes from another original batch.
    fn add(
        &mut self,
        columns: &Columns<'_>,
        row: usize,
        out: &mut BytesMut,
    ) -> std::result::Result<(), String> {
        let offset = columns.offset.value(row);
        if offset != self.next_offset {
            return Err(format!(
                "row holds offset {offset}, expected {}",
                self.next_offset
            ));
        }
        let batch_offset = columns.batch_offset.value(row);
        if self
            .open
            .as_ref()
            .is_some_and(|(_, open_batch)| *open_batch != batch_offset)
        {
            self.flush(out)?;
        }
        let (encoder, _) = match &mut self.open {
            Some(open) => open,
            None => {
                // The batch header's accessors interpret the attribute bits.
                let header = BatchHeader {
                    base_offset: offset,
                    batch_length: 0,
                    partition_leader_epoch: columns.leader_epoch.value(row),
                    magic: MAGIC_V2,
                    crc: 0,
                    attributes: columns.attributes.value(row),
                    last_offset_delta: 0,
                    base_timestamp: 0,
                    max_timestamp: 0,
                    producer_id: columns.producer_id.value(row),
                    producer_epoch: columns.producer_epoch.value(row),
                    base_sequence: columns.sequence.value(row),
                    record_count: 0,
                };
                let spec = BatchSpec::from_header(&header).map_err(|error| error.to_string())?;
                let encoder = BatchEncoder::begin(&spec, out).map_err(|error| error.to_string())?;
                self.open.insert((encoder, batch_offset))
            }
        };
        let header_rows = columns.headers.value_offsets();
        let (first, end) = (header_rows[row], header_rows[row + 1]);
        let (header_keys, header_values) = (columns.header_keys, columns.header_values);
        let headers = (first..end).map(|index| {
            // Offsets of a valid list array lie inside its values.
            let index = index as usize;
            (
                header_keys.value(index).as_bytes(),
                optional_bytes(header_values, index),
            )
        });
        encoder
            .push(
                out,
                RecordRef {
                    timestamp: columns.timestamp.value(row) / 1000,
                    key: optional_bytes(columns.key, row),
                    value: optional_bytes(columns.value, row),
                    headers,
                },
            )
            .map_err(|error| error.to_string())?;
        self.next_offset += 1;
        self.records += 1;
        Ok(())
    }

    /// Bytes of the open batch not in the output yet (a compressed batch's records).
    fn held_bytes(&self) -> usize {
        self.open
            .as_ref()
            .map_or(0, |(encoder, _)| encoder.held_bytes())
    }

    /// Completes the open batch.
    fn flush(&mut self, out: &mut BytesMut) -> std::result::Result<(), String> {
        if let Some((encoder, _)) = self.open.take() {
            encoder.finish(out).map_err(|error| error.to_string())?;
        }
        Ok(())
    }

    /// Drops the open batch, if any, out of `out`.
    fn abandon(&mut self, out: &mut BytesMut) {
        if let Some((encoder, _)) = self.open.take() {
            encoder.abandon(out);
        }
    }
}

/// A nullable binary cell (`BinaryArray` or `BinaryViewArray`): `None` for null.
fn optional_bytes<'a>(array: impl ArrayAccessor<Item = &'a [u8]>, row: usize) -> Option<&'a [u8]> {
    array.is_valid(row).then(|| array.value(row))
}

/// The archive's columns of one Arrow batch, typed.
struct Columns<'a> {
    offset: &'a Int64Array,
    timestamp: &'a TimestampMicrosecondArray,
    key: &'a BinaryViewArray,
    value: &'a BinaryViewArray,
    headers: &'a ListArray,
    header_keys: &'a StringArray,
    header_values: &'a BinaryArray,
    producer_id: &'a Int64Array,
    producer_epoch: &'a Int16Array,
    sequence: &'a Int32Array,
    batch_offset: &'a Int64Array,
    leader_epoch: &'a Int32Array,
    attributes: &'a Int16Array,
}

impl<'a> Columns<'a> {
    fn of(batch: &'a RecordBatch) -> std::result::Result<Columns<'a>, String> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| format!("no column {name}"))
        };
        let headers = column(schema::COL_HEADERS)?
            .as_list_opt::<i32>()
            .ok_or("headers is not a list")?;
        let header_fields: &StructArray = headers
            .values()
            .as_struct_opt()
            .ok_or("headers are not structs")?;
        if header_fields.num_columns() != 2 {
            return Err("headers are not (key, value) structs".into());
        }
        let header_keys = header_fields
            .column(0)
            .as_string_opt::<i32>()
            .ok_or("header keys are not strings")?;
        let header_values = header_fields
            .column(1)
            .as_binary_opt::<i32>()
            .ok_or("header values are not binary")?;
        Ok(Columns {
            offset: column(schema::COL_OFFSET)?
                .as_primitive_opt::<Int64Type>()
                .ok_or("offset is not int64")?,
            timestamp: column(schema::COL_TIMESTAMP)?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or("timestamp is not microseconds")?,
            key: column(schema::COL_KEY)?
                .as_binary_view_opt()
                .ok_or("key is not binary")?,
            value: column(schema::COL_VALUE)?
                .as_binary_view_opt()
                .ok_or("value is not binary")?,
            headers,
            header_keys,
            header_values,
            producer_id: column(schema::COL_PRODUCER_ID)?
                .as_primitive_opt::<Int64Type>()
                .ok_or("producer_id is not int64")?,
            producer_epoch: column(schema::COL_PRODUCER_EPOCH)?
                .as_primitive_opt::<Int16Type>()
                .ok_or("producer_epoch is not int16")?,
            sequence: column(schema::COL_SEQUENCE)?
                .as_primitive_opt::<Int32Type>()
                .ok_or("sequence is not int32")?,
            batch_offset: column(schema::COL_BATCH_OFFSET)?
                .as_primitive_opt::<Int64Type>()
                .ok_or("batch_offset is not int64")?,
            leader_epoch: column(schema::COL_LEADER_EPOCH)?
                .as_primitive_opt::<Int32Type>()
                .ok_or("leader_epoch is not int32")?,
            attributes: column(schema::COL_ATTRIBUTES)?
                .as_primitive_opt::<Int16Type>()
                .ok_or("attributes is not int16")?,
        })
    }
}

/// Parquet's view of one object: ranged GETs through `object_store`.
#[derive(Debug, Clone)]
struct ObjectSource {
    store: Arc<dyn ObjectStore>,
    key: Path,
    size: u64,
    /// Set once the footer is read, for a cached reader: byte ranges inside a row group are
    /// served from the whole row group, fetched once into the cache.
    chunks: Option<Arc<RowGroupChunks>>,
}

/// The row groups' byte ranges of one object, and the cache their bytes go through.
#[derive(Debug)]
struct RowGroupChunks {
    cache: Arc<ChunkCache>,
    ranges: Vec<Range<u64>>,
}

impl ObjectSource {
    /// The bytes of `range`: sliced from its cached row group when it lies in one.
    async fn fetch(&self, range: Range<u64>) -> object_store::Result<Bytes> {
        if let Some(chunks) = &self.chunks
            && let Some(group) = chunks
                .ranges
                .iter()
                .find(|group| group.start <= range.start && range.end <= group.end)
        {
            let (bytes, _) = chunks
                .cache
                .get(&self.store, &self.key, group.clone())
                .await?;
            let from = usize::try_from(range.start - group.start).unwrap_or(usize::MAX);
            let to = usize::try_from(range.end - group.start).unwrap_or(usize::MAX);
            return Ok(bytes.slice(from..to));
        }
        self.store.get_range(&self.key, range).await
    }
}

fn external(error: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(error))
}

impl AsyncFileReader for ObjectSource {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move { self.fetch(range).await.map_err(external) }.boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move {
            if self.chunks.is_none() {
                return self
                    .store
                    .get_ranges(&self.key, &ranges)
                    .await
                    .map_err(external);
            }
            let mut out = Vec::with_capacity(ranges.len());
            for range in ranges {
                out.push(self.fetch(range).await.map_err(external)?);
            }
            Ok(out)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move {
            let mut reader =
                ParquetMetaDataReader::new().with_prefetch_hint(Some(FOOTER_PREFETCH_BYTES));
            if let Some(options) = options {
                reader = reader
                    .with_column_index_policy(options.column_index_policy())
                    .with_offset_index_policy(options.offset_index_policy());
            }
            let size = self.size;
            Ok(Arc::new(reader.load_and_finish(self, size).await?))
        }
        .boxed()
    }
}
