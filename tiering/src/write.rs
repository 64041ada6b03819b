//! Converting a contiguous run of a partition's record batches into one archive object.
//!
//! The writer streams: batches are decoded (CRC checked) as they arrive, rows collect in Arrow
//! builders, and each finished row group is uploaded as a multipart part by
//! `object_store::buffered::BufWriter`, so memory stays near one row group whatever the file
//! size. The object's key is fresh for every writer (a random id), and nothing names it until
//! the caller commits it to the manifest: a crash or an abort leaves at most an orphan for
//! garbage collection, never a half-written object under a name a reader trusts.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, Int16Builder, Int32Builder, Int64Builder, ListBuilder,
    StringBuilder, StructBuilder, TimestampMicrosecondBuilder,
};
use arrow::record_batch::RecordBatch;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use silt_log::batch::{DecodeLimits, decode_batch};

use crate::error::{Result, TierError};
use crate::manifest::ManifestObject;
use crate::schema::{self, archive_schema, header_item_field};
use crate::store::ArchiveStore;

/// Rows collected before they are handed to the Parquet writer as one Arrow batch.
const ARROW_BATCH_ROWS: usize = 8 * 1024;
/// Upper bound on a row group's encoded size, so a topic of large records gets smaller row
/// groups rather than a writer holding gigabytes.
const ROW_GROUP_BYTES_MAX: usize = 64 << 20;

/// Writes one archive object for `topic`/`partition` from batches pushed in offset order.
pub struct ArchiveWriter {
    store: ArchiveStore,
    topic: String,
    partition: u32,
    limits: DecodeLimits,
    open: Option<(AsyncArrowWriter<BufWriter>, Path)>,
    /// Set once the upload is being completed: from then on it can no longer be aborted
    /// (`BufWriter` refuses), and a failure leaves at most an incomplete multipart upload, which
    /// garbage collection aborts.
    completing: bool,
    rows: RowBuilders,
    base_offset: i64,
    last_offset: i64,
    next_offset: i64,
    min_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

impl std::fmt::Debug for ArchiveWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveWriter")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("base_offset", &self.base_offset)
            .field("next_offset", &self.next_offset)
            .finish_non_exhaustive()
    }
}

impl ArchiveWriter {
    /// A writer for a new object holding exactly the offsets `base_offset..=last_offset` (the
    /// key names both, so they are fixed up front); nothing is uploaded until the first batch.
    pub fn new(
        store: ArchiveStore,
        topic: &str,
        partition: u32,
        base_offset: i64,
        last_offset: i64,
    ) -> Result<ArchiveWriter> {
        if base_offset < 0 || last_offset < base_offset {
            return Err(TierError::InvalidInput(format!(
                "offset range {base_offset}..={last_offset}"
            )));
        }
        Ok(ArchiveWriter {
            store,
            topic: topic.to_string(),
            partition,
            limits: DecodeLimits::default(),
            open: None,
            completing: false,
            rows: RowBuilders::default(),
            base_offset,
            last_offset,
            next_offset: base_offset,
            min_timestamp_ms: i64::MAX,
            max_timestamp_ms: i64::MIN,
        })
    }

    /// Bounds on the batches this writer decodes (defaults: the log's own limits).
    pub fn with_limits(mut self, limits: DecodeLimits) -> ArchiveWriter {
        self.limits = limits;
        self
    }

    /// Offset the next batch must start at.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Appends the records of `batch`, one complete RecordBatch v2 as stored in the log. Batches
    /// must be contiguous: each starts where the previous one ended.
    pub async fn push_batch(&mut self, batch: &[u8]) -> Result<()> {
        let Some((header, records, used)) = decode_batch(batch, &self.limits)? else {
            return Err(TierError::InvalidInput("a partial record batch".into()));
        };
        if used != batch.len() {
            return Err(TierError::InvalidInput(
                "bytes after the record batch".into(),
            ));
        }
        if header.is_control() {
            // Control batches exist only with transactions, which Silt refuses; archiving one
            // would silently drop its meaning.
            return Err(TierError::InvalidInput(format!(
                "control batch at offset {}",
                header.base_offset
            )));
        }
        // The first batch may start before the object's base (a log start inside a batch);
        // it contributes its records from the base on. Every later batch must follow on.
        let straddles_base = self.open.is_none()
            && header.base_offset < self.next_offset
            && header.last_offset() >= self.next_offset;
        if header.base_offset != self.next_offset && !straddles_base {
            return Err(TierError::InvalidInput(format!(
                "batch at offset {} where offset {} was expected",
                header.base_offset, self.next_offset
            )));
        }
        let skip = usize::try_from(self.next_offset - header.base_offset).unwrap_or(0);
        if header.last_offset() > self.last_offset {
            return Err(TierError::InvalidInput(format!(
                "batch ending at offset {} is past the object's last offset {}",
                header.last_offset(),
                self.last_offset
            )));
        }
        if header.last_offset_delta + 1 != header.record_count {
            return Err(TierError::InvalidInput(format!(
                "batch at offset {} has offset gaps",
                header.base_offset
            )));
        }
        for record in &records {
            if record.timestamp.checked_mul(1000).is_none() {
                return Err(TierError::InvalidInput(format!(
                    "record {} has timestamp {} ms, beyond what TIMESTAMP(MICROS) holds",
                    record.offset, record.timestamp
                )));
            }
        }
        if self.open.is_none() {
            let first = records
                .get(skip)
                .ok_or_else(|| TierError::InvalidInput("a batch with no records".into()))?;
            self.open = Some(self.create(first.timestamp)?);
        }
        for (index, record) in records.iter().enumerate().skip(skip) {
            let sequence = if header.base_sequence < 0 {
                -1
            } else {
                // Kafka's sequences wrap at i32::MAX.
                let delta = i32::try_from(index).unwrap_or(i32::MAX);
                header.base_sequence.wrapping_add(delta) & i32::MAX
            };
            self.min_timestamp_ms = self.min_timestamp_ms.min(record.timestamp);
            self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp);
            self.rows.push(
                record,
                &RowBatchFields {
                    producer_id: header.producer_id,
                    producer_epoch: header.producer_epoch,
                    sequence,
                    batch_offset: header.base_offset,
                    leader_epoch: header.partition_leader_epoch,
                    attributes: header.attributes,
                },
            );
            if self.rows.len() >= ARROW_BATCH_ROWS {
                self.write_rows().await?;
            }
        }
        self.next_offset = header.last_offset() + 1;
        Ok(())
    }

    /// Finishes the object: the footer with its metadata is written and the upload completed.
    /// Fails unless the batches pushed covered the whole offset range. On error the upload is
    /// aborted.
    pub async fn finish(mut self) -> Result<ManifestObject> {
        match self.finish_inner().await {
            Ok(object) => Ok(object),
            Err(error) => {
                self.abort().await;
                Err(error)
            }
        }
    }

    async fn finish_inner(&mut self) -> Result<ManifestObject> {
        if self.open.is_none() || self.next_offset != self.last_offset + 1 {
            return Err(TierError::InvalidInput(format!(
                "batches ended before offset {}, short of the object's last offset {}",
                self.next_offset, self.last_offset
            )));
        }
        self.write_rows().await?;
        let last_offset = self.last_offset;
        let records = u64::try_from(self.next_offset - self.base_offset)
            .map_err(|_| TierError::InvalidInput("negative offset range".into()))?;
        let (writer, key) = self.open.as_mut().expect("checked above");
        for (name, value) in [
            (schema::META_FORMAT, schema::FORMAT_VERSION.to_string()),
            (schema::META_TOPIC, self.topic.clone()),
            (schema::META_PARTITION, self.partition.to_string()),
            (schema::META_BASE_OFFSET, self.base_offset.to_string()),
            (schema::META_LAST_OFFSET, last_offset.to_string()),
            (schema::META_RECORDS, records.to_string()),
            (
                schema::META_MIN_TIMESTAMP_MS,
                self.min_timestamp_ms.to_string(),
            ),
            (
                schema::META_MAX_TIMESTAMP_MS,
                self.max_timestamp_ms.to_string(),
            ),
        ] {
            writer.append_key_value_metadata(KeyValue::new(name.to_string(), value));
        }
        self.completing = true;
        writer.finish().await?;
        let size_bytes = writer.bytes_written() as u64;
        let key = key.to_string();
        self.open = None;
        Ok(ManifestObject {
            key,
            base_offset: self.base_offset,
            last_offset,
            records,
            min_timestamp_ms: self.min_timestamp_ms,
            max_timestamp_ms: self.max_timestamp_ms,
            size_bytes,
        })
    }

    /// Abandons the object: a multipart upload in progress is aborted. Parts a crash leaves
    /// behind are for garbage collection.
    pub async fn abort(mut self) {
        if let Some((writer, key)) = self.open.take()
            && !self.completing
            && let Err(error) = writer.into_inner().abort().await
        {
            tracing::warn!(key = %key, %error, "aborting an archive upload failed");
        }
    }

    fn create(&self, first_timestamp_ms: i64) -> Result<(AsyncArrowWriter<BufWriter>, Path)> {
        let id = format!("{:032x}", rand::random::<u128>());
        let key = self.store.key(&schema::object_key(
            &self.topic,
            self.partition,
            first_timestamp_ms,
            self.base_offset,
            self.last_offset,
            &id,
        ));
        let upload = BufWriter::new(Arc::clone(self.store.store()), key.clone());
        let writer = AsyncArrowWriter::try_new(
            upload,
            archive_schema(),
            Some(writer_properties(self.store.parquet_zstd_level())),
        )?;
        Ok((writer, key))
    }

    async fn write_rows(&mut self) -> Result<()> {
        if self.rows.len() == 0 {
            return Ok(());
        }
        let batch = self.rows.finish()?;
        let (writer, _) = self
            .open
            .as_mut()
            .expect("rows are only collected once the object is open");
        writer.write(&batch).await?;
        Ok(())
    }
}

/// The Parquet settings DESIGN.md fixes: zstd (at the store's level), statistics and a page
/// index on every column (offset and timestamp are what readers prune by), row groups near 128k
/// rows, and `offset` declared as the sort order.
fn writer_properties(zstd_level: ZstdLevel) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(zstd_level))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_column_statistics_enabled(
            ColumnPath::from(schema::COL_OFFSET),
            EnabledStatistics::Page,
        )
        .set_column_statistics_enabled(
            ColumnPath::from(schema::COL_TIMESTAMP),
            EnabledStatistics::Page,
        )
        // Keys and values are opaque bytes: their min/max would bloat the footer for nothing.
        .set_column_statistics_enabled(ColumnPath::from(schema::COL_KEY), EnabledStatistics::None)
        .set_column_statistics_enabled(ColumnPath::from(schema::COL_VALUE), EnabledStatistics::None)
        .set_column_dictionary_enabled(ColumnPath::from(schema::COL_OFFSET), false)
        .set_column_dictionary_enabled(ColumnPath::from(schema::COL_VALUE), false)
        .set_max_row_group_row_count(Some(schema::ROW_GROUP_ROWS))
        .set_max_row_group_bytes(Some(ROW_GROUP_BYTES_MAX))
        .set_data_page_row_count_limit(schema::PAGE_ROWS)
        .set_sorting_columns(Some(vec![SortingColumn {
            column_idx: 0,
            descending: false,
            nulls_first: false,
        }]))
        .build()
}

/// The batch-level fields every row of one batch repeats.
struct RowBatchFields {
    producer_id: i64,
    producer_epoch: i16,
    sequence: i32,
    batch_offset: i64,
    leader_epoch: i32,
    attributes: i16,
}

/// Arrow builders for the archive's columns.
struct RowBuilders {
    offset: Int64Builder,
    timestamp: TimestampMicrosecondBuilder,
    key: BinaryBuilder,
    value: BinaryBuilder,
    headers: ListBuilder<StructBuilder>,
    producer_id: Int64Builder,
    producer_epoch: Int16Builder,
    sequence: Int32Builder,
    batch_offset: Int64Builder,
    leader_epoch: Int32Builder,
    attributes: Int16Builder,
}

impl Default for RowBuilders {
    fn default() -> Self {
        let header = StructBuilder::new(
            match header_item_field().data_type() {
                arrow::datatypes::DataType::Struct(fields) => fields.clone(),
                other => unreachable!("headers hold structs, not {other}"),
            },
            vec![
                Box::new(StringBuilder::new()),
                Box::new(BinaryBuilder::new()),
            ],
        );
        RowBuilders {
            offset: Int64Builder::new(),
            timestamp: TimestampMicrosecondBuilder::new().with_timezone("UTC"),
            key: BinaryBuilder::new(),
            value: BinaryBuilder::new(),
            headers: ListBuilder::new(header).with_field(header_item_field()),
            producer_id: Int64Builder::new(),
            producer_epoch: Int16Builder::new(),
            sequence: Int32Builder::new(),
            batch_offset: Int64Builder::new(),
            leader_epoch: Int32Builder::new(),
            attributes: Int16Builder::new(),
        }
    }
}

impl RowBuilders {
    fn len(&self) -> usize {
        self.offset.len()
    }

    fn push(&mut self, record: &silt_log::batch::DecodedRecord, batch: &RowBatchFields) {
        self.offset.append_value(record.offset);
        // The caller checked that the multiplication does not overflow.
        self.timestamp.append_value(record.timestamp * 1000);
        self.key.append_option(record.key.as_deref());
        self.value.append_option(record.value.as_deref());
        let headers = self.headers.values();
        for header in &record.headers {
            headers
                .field_builder::<StringBuilder>(0)
                .expect("the header key is a string")
                .append_value(&header.key);
            headers
                .field_builder::<BinaryBuilder>(1)
                .expect("the header value is binary")
                .append_option(header.value.as_deref());
            headers.append(true);
        }
        self.headers.append(true);
        self.producer_id.append_value(batch.producer_id);
        self.producer_epoch.append_value(batch.producer_epoch);
        self.sequence.append_value(batch.sequence);
        self.batch_offset.append_value(batch.batch_offset);
        self.leader_epoch.append_value(batch.leader_epoch);
        self.attributes.append_value(batch.attributes);
    }

    fn finish(&mut self) -> Result<RecordBatch> {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.offset.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.key.finish()),
            Arc::new(self.value.finish()),
            Arc::new(self.headers.finish()),
            Arc::new(self.producer_id.finish()),
            Arc::new(self.producer_epoch.finish()),
            Arc::new(self.sequence.finish()),
            Arc::new(self.batch_offset.finish()),
            Arc::new(self.leader_epoch.finish()),
            Arc::new(self.attributes.finish()),
        ];
        Ok(RecordBatch::try_new(archive_schema(), columns)?)
    }
}
