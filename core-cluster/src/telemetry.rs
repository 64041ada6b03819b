//! The node's Prometheus metrics: the recorder behind the `metrics` facade, the names and
//! help texts of the metrics the node itself reports, and their refresh from the log.
//!
//! Names start with `silt_`, then the part of the node (`log`, `core`, `kafka`), then
//! what is measured, with the unit last (`_bytes`, `_offset`, `_seconds`) and `_total` after it
//! for counters, as Prometheus names counters. The log keeps its own numbers (disk use, drops, offsets); they are copied
//! into the recorder when `/metrics` is scraped, so a scrape always sees current values and the
//! log's hot path records nothing twice. Counters the log keeps are set with
//! `Counter::absolute`: they only rise while a process lives, so `rate()` works on them.
//!
//! The recorder is global (the facade's macros need one, and the Kafka gateway records its
//! `silt_kafka_*` metrics through them), so one process holds one node's metrics. This file
//! mirrors `silt-edge`'s `telemetry.rs` for the log's numbers, so both nodes name them alike.

use anyhow::anyhow;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use silt_log::LogManager;

/// Content type of the Prometheus text exposition format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) const BUILD_INFO: &str = "silt_core_build_info";
pub(crate) const DISK_USED_BYTES: &str = "silt_log_disk_used_bytes";
pub(crate) const DISK_BUDGET_BYTES: &str = "silt_log_disk_budget_bytes";
pub(crate) const DROPPED_SEGMENTS: &str = "silt_log_dropped_segments_total";
pub(crate) const DROPPED_BYTES: &str = "silt_log_dropped_bytes_total";
pub(crate) const DROPPED_OFFSETS: &str = "silt_log_dropped_offsets_total";
pub(crate) const REJECTED_APPENDS: &str = "silt_log_rejected_appends_total";
pub(crate) const TOPICS: &str = "silt_log_topics";
pub(crate) const PARTITION_START_OFFSET: &str = "silt_log_partition_start_offset";
pub(crate) const PARTITION_END_OFFSET: &str = "silt_log_partition_end_offset";
pub(crate) const PARTITION_SIZE_BYTES: &str = "silt_log_partition_size_bytes";
pub(crate) const PARTITION_FSYNCS: &str = "silt_log_partition_fsyncs_total";
pub(crate) const KAFKA_GROUPS: &str = "silt_kafka_groups";
pub(crate) const TIER_UPLOAD_LAG_BYTES: &str = "silt_tier_upload_lag_bytes";
pub(crate) const TIER_UPLOAD_LAG_RECORDS: &str = "silt_tier_upload_lag_records";
pub(crate) const TIER_ARCHIVED_BYTES: &str = "silt_tier_archived_bytes";
pub(crate) const TIER_ARCHIVED_OBJECTS: &str = "silt_tier_archived_objects";
pub(crate) const TIER_UPLOADS: &str = "silt_tier_uploads_total";
pub(crate) const TIER_UPLOAD_FAILURES: &str = "silt_tier_upload_failures_total";
pub(crate) const TIER_UPLOADED_BYTES: &str = "silt_tier_uploaded_bytes_total";
pub(crate) const TIER_UPLOAD_SECONDS: &str = "silt_tier_upload_duration_seconds";
pub(crate) const TIER_BACKPRESSURE: &str = "silt_tier_backpressure";
pub(crate) const TIER_COMPACTIONS: &str = "silt_tier_compactions_total";
pub(crate) const TIER_COMPACTED_OBJECTS: &str = "silt_tier_compacted_objects_total";
pub(crate) const TIER_COMPACTED_BYTES: &str = "silt_tier_compacted_bytes_total";
pub(crate) const TIER_COMPACTION_FAILURES: &str = "silt_tier_compaction_failures_total";

/// Bucket bounds of every `*_seconds` histogram: from a fast SSD fsync to a disk having a bad
/// second.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Bucket bounds of the upload-duration histogram: converting and uploading an object of up
/// to a few hundred MiB takes from a fraction of a second to minutes.
const UPLOAD_BUCKETS_SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Installs the process's Prometheus recorder and returns the handle that renders it.
///
/// Install it before anything records (the Kafka gateway included), or those first values go
/// to the facade's no-op recorder. Histograms named `*_seconds` get buckets; any other
/// histogram is rendered as a summary.
pub(crate) fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(TIER_UPLOAD_SECONDS.into()),
            UPLOAD_BUCKETS_SECONDS,
        )
        .map_err(|error| anyhow!("invalid histogram buckets: {error}"))?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
        .map_err(|error| anyhow!("invalid histogram buckets: {error}"))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow!("a metrics recorder is already installed"))?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which silt-core build runs"
    );
    describe_gauge!(
        DISK_USED_BYTES,
        "Bytes of log segments in the data directory, as counted against the budget"
    );
    describe_gauge!(
        DISK_BUDGET_BYTES,
        "The data directory's byte budget (log.budget_bytes); absent when there is none"
    );
    describe_counter!(
        DROPPED_SEGMENTS,
        "Segments the drop-oldest budget policy deleted"
    );
    describe_counter!(DROPPED_BYTES, "Bytes the drop-oldest budget policy deleted");
    describe_counter!(
        DROPPED_OFFSETS,
        "Offsets (records) the drop-oldest budget policy deleted"
    );
    describe_counter!(
        REJECTED_APPENDS,
        "Appends refused because of the budget or the filesystem free-space reserve"
    );
    describe_gauge!(TOPICS, "Topics in the local log");
    describe_gauge!(
        PARTITION_START_OFFSET,
        "First offset readers may ask for, per partition"
    );
    describe_gauge!(
        PARTITION_END_OFFSET,
        "One past the last appended offset, per partition"
    );
    describe_gauge!(PARTITION_SIZE_BYTES, "Bytes of the partition's segments");
    describe_gauge!(KAFKA_GROUPS, "Consumer groups with members, by state");
    describe_counter!(
        silt_gateways::kafka::metrics::REQUESTS,
        "Kafka requests received, by api"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::REQUEST_ERRORS,
        "Kafka requests refused whole (unknown api or version), by api"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::PARTITION_ERRORS,
        "Per-partition errors in Kafka responses, by api and error code"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::REFUSED_CONNECTIONS,
        "Kafka connections closed on accept because kafka.max_connections were open"
    );
    describe_gauge!(
        silt_gateways::kafka::metrics::QUEUED_REQUEST_BYTES,
        "Bytes of large Kafka request frames held now, against kafka.queued_max_request_bytes"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::IDLE_CLOSED_CONNECTIONS,
        "Kafka connections closed after sending nothing, or reading none of a response, for kafka.connections_max_idle_ms"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::REQUEST_MEMORY_WAITS,
        "Times a Kafka connection waited for request memory (kafka.queued_max_request_bytes spent)"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::PRODUCE_BYTES,
        "Record batch bytes appended by Produce"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::PRODUCE_RECORDS,
        "Records appended by Produce"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::FETCH_BYTES,
        "Record batch bytes served by Fetch"
    );
    describe_counter!(
        silt_gateways::kafka::metrics::FETCH_RECORDS,
        "Records served by Fetch (whole batches, so from the batch start)"
    );
    describe_counter!(
        PARTITION_FSYNCS,
        "fsyncs of segment data since the partition was opened"
    );
    describe_gauge!(
        TIER_UPLOAD_LAG_BYTES,
        "Log bytes committed locally but not yet archived, per partition (active segment included)"
    );
    describe_gauge!(
        TIER_UPLOAD_LAG_RECORDS,
        "Offsets committed locally but not yet archived, per partition"
    );
    describe_gauge!(
        TIER_ARCHIVED_BYTES,
        "Bytes of the objects the partition's committed manifest names"
    );
    describe_gauge!(
        TIER_ARCHIVED_OBJECTS,
        "Objects the partition's committed manifest names"
    );
    describe_counter!(
        TIER_UPLOADS,
        "Objects uploaded and committed, per partition"
    );
    describe_counter!(
        TIER_UPLOAD_FAILURES,
        "Failed offload attempts (manifest load, upload or commit), per partition"
    );
    describe_counter!(
        TIER_UPLOADED_BYTES,
        "Bytes of archive objects uploaded and committed, per partition"
    );
    describe_histogram!(
        TIER_UPLOAD_SECONDS,
        "Time to convert, upload and commit one archive object"
    );
    describe_gauge!(
        TIER_BACKPRESSURE,
        "1 while Produce is refused because the disk is nearly full and offload is behind"
    );
    describe_counter!(
        TIER_COMPACTIONS,
        "Compactions committed (runs of small archive objects merged into one), per partition"
    );
    describe_counter!(
        TIER_COMPACTED_OBJECTS,
        "Archive objects compaction replaced by merged ones, per partition"
    );
    describe_counter!(
        TIER_COMPACTED_BYTES,
        "Bytes of the merged objects compaction wrote, per partition"
    );
    describe_counter!(
        TIER_COMPACTION_FAILURES,
        "Compactions that failed (read, upload or commit), per partition"
    );
    describe_cold();
}

/// The cold reader's metrics (`silt_tiering::cold::metric`), recorded by the tiering crate.
fn describe_cold() {
    use silt_tiering::cold::metric;
    describe_counter!(
        metric::READS,
        "Reads below the local start served from the archive, by result (ok, out_of_range, not_archived, error)"
    );
    describe_counter!(
        metric::READ_BYTES,
        "RecordBatch v2 bytes rebuilt from the archive and served"
    );
    describe_counter!(metric::READ_RECORDS, "Records served from the archive");
    describe_histogram!(
        metric::READ_SECONDS,
        "Time of one cold read, cache hits and object store GETs included"
    );
    describe_counter!(
        metric::CHUNK_HITS,
        "Row groups served from the cold reader's chunk cache"
    );
    describe_counter!(
        metric::CHUNK_FETCHES,
        "Row groups fetched from the object store (one ranged GET each), reads and prefetch"
    );
    describe_counter!(
        metric::CHUNK_FETCHED_BYTES,
        "Bytes of row groups fetched from the object store"
    );
    describe_gauge!(
        metric::CACHED_BYTES,
        "Bytes of row groups in the cold reader's cache (tiering.cold_cache_bytes bounds it)"
    );
    describe_counter!(
        metric::PREFETCHES,
        "Row groups fetched ahead of a sequential cold replay"
    );
    describe_counter!(
        metric::AHEAD_BYTES,
        "Bytes of cold Fetches served from batches rebuilt ahead of a sequential replay"
    );
    describe_counter!(metric::MANIFEST_LOADS, "Manifest GETs by the cold reader");
    describe_counter!(
        metric::OBJECTS_OPENED,
        "Archive objects opened by the cold reader (footer and page index fetched)"
    );
}

/// Copies the log's numbers into the recorder. It takes partition locks, which a segment roll
/// or a retention pass may hold across file operations: call it on a blocking thread.
pub(crate) fn refresh_log(log: &LogManager) {
    let disk = log.disk_stats();
    gauge!(DISK_USED_BYTES).set(disk.used_bytes as f64);
    if let Some(budget_bytes) = disk.budget_bytes {
        gauge!(DISK_BUDGET_BYTES, "policy" => disk.budget_policy.as_str()).set(budget_bytes as f64);
    }
    counter!(DROPPED_SEGMENTS).absolute(disk.dropped_segments);
    counter!(DROPPED_BYTES).absolute(disk.dropped_bytes);
    counter!(DROPPED_OFFSETS).absolute(disk.dropped_offsets);
    counter!(REJECTED_APPENDS).absolute(disk.rejected_appends);

    let topics = log.topics();
    gauge!(TOPICS).set(topics.len() as f64);
    for topic in topics {
        for number in 0..topic.partitions {
            // A topic deleted since `topics()` is simply skipped.
            let Ok(partition) = log.partition(&topic.name, number) else {
                continue;
            };
            let labels = [
                ("topic", topic.name.clone()),
                ("partition", number.to_string()),
            ];
            gauge!(PARTITION_START_OFFSET, &labels).set(partition.log_start_offset() as f64);
            gauge!(PARTITION_END_OFFSET, &labels).set(partition.log_end_offset() as f64);
            gauge!(PARTITION_SIZE_BYTES, &labels).set(partition.size_bytes() as f64);
            counter!(PARTITION_FSYNCS, &labels).absolute(partition.fsync_count());
        }
    }
}

/// Sets the consumer group gauges from the coordinator.
pub(crate) fn refresh_groups(broker: &crate::broker::Broker) {
    let counts = broker.group_state_counts();
    for state in [
        "Empty",
        "PreparingRebalance",
        "CompletingRebalance",
        "Stable",
    ] {
        let count = counts.get(state).copied().unwrap_or(0);
        gauge!(KAFKA_GROUPS, "state" => state).set(count as f64);
    }
}
