//! The Kafka gateway's metrics, recorded through the `metrics` facade into whatever recorder
//! the node installed.

use metrics::{counter, gauge};

pub const REQUESTS: &str = "silt_kafka_requests_total";
pub const REQUEST_ERRORS: &str = "silt_kafka_request_errors_total";
pub const PRODUCE_BYTES: &str = "silt_kafka_produce_bytes_total";
pub const PRODUCE_RECORDS: &str = "silt_kafka_produce_records_total";
pub const FETCH_BYTES: &str = "silt_kafka_fetch_bytes_total";
pub const FETCH_RECORDS: &str = "silt_kafka_fetch_records_total";
pub const PARTITION_ERRORS: &str = "silt_kafka_partition_errors_total";
pub const REFUSED_CONNECTIONS: &str = "silt_kafka_refused_connections_total";
pub const QUEUED_REQUEST_BYTES: &str = "silt_kafka_queued_request_bytes";
pub const REQUEST_MEMORY_WAITS: &str = "silt_kafka_request_memory_waits_total";
pub const IDLE_CLOSED_CONNECTIONS: &str = "silt_kafka_idle_closed_connections_total";

/// A connection closed because it sent nothing for the idle timeout.
pub fn idle_connection_closed() {
    counter!(IDLE_CLOSED_CONNECTIONS).increment(1);
}

/// A connection closed on accept because `max_connections` were open.
pub fn connection_refused() {
    counter!(REFUSED_CONNECTIONS).increment(1);
}

/// A connection had to wait for the request memory pool.
pub fn request_memory_wait() {
    counter!(REQUEST_MEMORY_WAITS).increment(1);
}

/// A request frame took `bytes` of the request memory pool.
pub fn request_memory_taken(bytes: usize) {
    gauge!(QUEUED_REQUEST_BYTES).increment(bytes as f64);
}

/// A request frame gave `bytes` back to the request memory pool.
pub fn request_memory_released(bytes: usize) {
    gauge!(QUEUED_REQUEST_BYTES).decrement(bytes as f64);
}

/// One request of `api`; `refused` when it was not served (unknown api or version).
pub fn request(api: &'static str, refused: bool) {
    counter!(REQUESTS, "api" => api).increment(1);
    if refused {
        counter!(REQUEST_ERRORS, "api" => api).increment(1);
    }
}

/// A per-partition error of `api`, by error code.
pub fn partition_error(api: &'static str, code: i16) {
    counter!(PARTITION_ERRORS, "api" => api, "code" => code.to_string()).increment(1);
}

pub fn produced(bytes: usize, records: u64) {
    counter!(PRODUCE_BYTES).increment(bytes as u64);
    counter!(PRODUCE_RECORDS).increment(records);
}

pub fn fetched(bytes: usize, records: u64) {
    counter!(FETCH_BYTES).increment(bytes as u64);
    counter!(FETCH_RECORDS).increment(records);
}

/// Records in whole RecordBatch v2 bytes, from each batch header's last offset delta.
pub fn record_count(batches: &[u8]) -> u64 {
    let mut count = 0u64;
    let mut rest = batches;
    // base offset (8), length (4), leader epoch (4), magic (1), crc (4), attributes (2),
    // last offset delta (4).
    while rest.len() >= 27 {
        let length = i32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let Ok(length) = usize::try_from(length) else {
            break;
        };
        let delta = i32::from_be_bytes([rest[23], rest[24], rest[25], rest[26]]);
        count += u64::try_from(delta).map_or(0, |delta| delta + 1);
        let Some(next) = rest.get(12 + length..) else {
            break;
        };
        rest = next;
    }
    count
}
