//! The archive's Parquet format, version 1: the Arrow schema, the footer metadata keys and the
//! object key layout. Changing any of them after files exist is a migration; the tests at the
//! bottom pin them.
//!
//! Columns (DESIGN.md): `offset` (sorted), `timestamp` (microseconds, UTC), `key`, `value` and
//! `headers` are what analysts query. The remaining columns carry what Fetch needs to rebuild
//! RecordBatch v2 batches with the producer's fields intact; they repeat per batch, so Parquet's
//! run-length encoding makes them nearly free. Topic, partition and the offset range are footer
//! metadata and part of the key, never columns: Hive-style keys repeated as columns break
//! DataFusion and Spark.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

/// The format version, in the key (`v1/`) and in the footer.
pub const FORMAT_VERSION: &str = "1";

/// Column names, in schema order.
pub const COL_OFFSET: &str = "offset";
pub const COL_TIMESTAMP: &str = "timestamp";
pub const COL_KEY: &str = "key";
pub const COL_VALUE: &str = "value";
pub const COL_HEADERS: &str = "headers";
pub const COL_PRODUCER_ID: &str = "producer_id";
pub const COL_PRODUCER_EPOCH: &str = "producer_epoch";
pub const COL_SEQUENCE: &str = "sequence";
pub const COL_BATCH_OFFSET: &str = "batch_offset";
pub const COL_LEADER_EPOCH: &str = "leader_epoch";
pub const COL_ATTRIBUTES: &str = "attributes";

/// Footer key-value metadata keys.
pub const META_FORMAT: &str = "silt.format";
pub const META_TOPIC: &str = "silt.topic";
pub const META_PARTITION: &str = "silt.partition";
pub const META_BASE_OFFSET: &str = "silt.base_offset";
pub const META_LAST_OFFSET: &str = "silt.last_offset";
pub const META_RECORDS: &str = "silt.records";
pub const META_MIN_TIMESTAMP_MS: &str = "silt.min_timestamp_ms";
pub const META_MAX_TIMESTAMP_MS: &str = "silt.max_timestamp_ms";

/// Rows per row group: near 128k, as DESIGN.md fixes, so a reader pruning by offset fetches
/// little more than it needs while each group stays large enough to compress well.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Rows per data page: the unit the page index prunes by inside a row group.
pub const PAGE_ROWS: usize = 8 * 1024;

/// The header struct's fields: Kafka header keys are strings, values bytes or null.
fn header_fields() -> Fields {
    Fields::from(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Binary, true),
    ])
}

/// The list element of `headers`.
pub fn header_item_field() -> Arc<Field> {
    Arc::new(Field::new("item", DataType::Struct(header_fields()), false))
}

/// The Arrow schema of every archive file.
pub fn archive_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(COL_OFFSET, DataType::Int64, false),
        Field::new(
            COL_TIMESTAMP,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(COL_KEY, DataType::Binary, true),
        Field::new(COL_VALUE, DataType::Binary, true),
        Field::new(COL_HEADERS, DataType::List(header_item_field()), false),
        Field::new(COL_PRODUCER_ID, DataType::Int64, false),
        Field::new(COL_PRODUCER_EPOCH, DataType::Int16, false),
        Field::new(COL_SEQUENCE, DataType::Int32, false),
        Field::new(COL_BATCH_OFFSET, DataType::Int64, false),
        Field::new(COL_LEADER_EPOCH, DataType::Int32, false),
        Field::new(COL_ATTRIBUTES, DataType::Int16, false),
    ]))
}

/// The schema the archive is read with: [`archive_schema`] with `key` and `value` as
/// `BinaryView`. Parquet decodes a view column as views into the decompressed pages, where a
/// `Binary` column copies every value out of them into one buffer first; a cold Fetch copies
/// each value once more anyway, into the batch it rebuilds, so that first copy was pure cost
/// (about a tenth of a cold replay's CPU). A file's own schema is checked against
/// [`archive_schema`] before it is read with this one.
pub fn archive_read_schema() -> SchemaRef {
    let fields: Vec<Field> = archive_schema()
        .fields()
        .iter()
        .map(|field| match field.name().as_str() {
            COL_KEY | COL_VALUE => field.as_ref().clone().with_data_type(DataType::BinaryView),
            _ => field.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// The key of an archive object, relative to the store's prefix:
/// `v1/topic=<t>/partition=<p>/date=<YYYY-MM-DD>/<base:020>-<last:020>-<id>.parquet`, where the
/// date is the UTC day of the file's first record and `id` makes every upload's key fresh, so a
/// retried or concurrent upload never overwrites an object a manifest may name.
pub fn object_key(
    topic: &str,
    partition: u32,
    first_timestamp_ms: i64,
    base_offset: i64,
    last_offset: i64,
    id: &str,
) -> String {
    format!(
        "v{FORMAT_VERSION}/topic={topic}/partition={partition}/date={}/{base_offset:020}-{last_offset:020}-{id}.parquet",
        utc_date(first_timestamp_ms)
    )
}

/// `YYYY-MM-DD` of a Unix time in milliseconds, in UTC, on the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`). Years outside 0..=9999 are clamped: they only come
/// from nonsense producer timestamps, and the key must stay well formed.
pub fn utc_date(timestamp_ms: i64) -> String {
    let days = timestamp_ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return if year < 0 { "0000-01-01" } else { "9999-12-31" }.to_string();
    }
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_days() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(-1), "1969-12-31");
        assert_eq!(utc_date(951_782_400_000), "2000-02-29");
        assert_eq!(utc_date(1_795_305_600_000), "2026-11-22");
        assert_eq!(utc_date(1_795_391_999_999), "2026-11-22");
        assert_eq!(utc_date(i64::MAX), "9999-12-31");
        assert_eq!(utc_date(i64::MIN), "0000-01-01");
    }

    #[test]
    fn the_object_key_layout_is_pinned() {
        assert_eq!(
            object_key("mqtt", 3, 1_795_305_600_000, 0, 131_071, "0f"),
            "v1/topic=mqtt/partition=3/date=2026-11-22/00000000000000000000-00000000000000131071-0f.parquet"
        );
    }

    #[test]
    fn the_read_schema_differs_only_in_key_and_value_views() {
        let (file, read) = (archive_schema(), archive_read_schema());
        assert_eq!(file.fields().len(), read.fields().len());
        for (file, read) in file.fields().iter().zip(read.fields().iter()) {
            assert_eq!(file.name(), read.name());
            assert_eq!(file.is_nullable(), read.is_nullable());
            let expected = match file.name().as_str() {
                COL_KEY | COL_VALUE => &DataType::BinaryView,
                _ => file.data_type(),
            };
            assert_eq!(read.data_type(), expected, "{}", file.name());
        }
    }

    #[test]
    fn the_schema_is_pinned() {
        let names: Vec<_> = archive_schema()
            .fields()
            .iter()
            .map(|field| format!("{}:{}", field.name(), field.data_type()))
            .collect();
        assert_eq!(
            names,
            [
                "offset:Int64",
                "timestamp:Timestamp(µs, \"UTC\")",
                "key:Binary",
                "value:Binary",
                "headers:List(non-null Struct(\"key\": non-null Utf8, \"value\": Binary))",
                "producer_id:Int64",
                "producer_epoch:Int16",
                "sequence:Int32",
                "batch_offset:Int64",
                "leader_epoch:Int32",
                "attributes:Int16",
            ]
        );
    }
}
