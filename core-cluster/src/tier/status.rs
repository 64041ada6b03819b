//! `GET /v1/tier/status/<topic>`: per partition, where the log starts in each tier, how much
//! is archived and how far offload is behind, as JSON for `silt tier status`.

use serde::Serialize;

use super::{Lag, Tier, is_tiered, lock};

/// One partition's tiering, as the status endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PartitionStatus {
    pub(crate) partition: u32,
    /// The first offset readers may ask for, in either tier.
    pub(crate) log_start_offset: u64,
    /// The first offset still on local disk.
    pub(crate) local_start_offset: u64,
    pub(crate) high_watermark: u64,
    /// Where the archive continues; `null` until the manifest has been loaded.
    pub(crate) archived_next_offset: Option<u64>,
    pub(crate) archived_objects: usize,
    pub(crate) archived_bytes: u64,
    pub(crate) upload_lag_records: u64,
    pub(crate) upload_lag_bytes: u64,
    /// The last failure (opening the store, loading the manifest, uploading), cleared by a
    /// success.
    pub(crate) last_error: Option<String>,
}

/// The whole answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TopicStatus {
    pub(crate) topic: String,
    pub(crate) store: String,
    pub(crate) backpressure: bool,
    pub(crate) partitions: Vec<PartitionStatus>,
}

/// Why there is no status to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StatusError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {0:?} is internal and stays on local disk")]
    Internal(String),
}

impl Tier {
    /// `topic`'s tiering status.
    pub(crate) fn status(&self, topic: &str) -> Result<TopicStatus, StatusError> {
        let info = self
            .log
            .topic(topic)
            .ok_or_else(|| StatusError::UnknownTopic(topic.to_string()))?;
        if !is_tiered(topic) {
            return Err(StatusError::Internal(topic.to_string()));
        }
        let known = lock(&self.partitions).clone();
        let mut partitions = Vec::with_capacity(info.partitions as usize);
        for index in 0..info.partitions {
            let Ok(log) = self.log.partition(topic, index) else {
                continue;
            };
            let (committed, last_error) = match known.get(&(topic.to_string(), index)) {
                Some(partition) => {
                    let state = lock(&partition.state);
                    (state.committed, state.last_error.clone())
                }
                None => (None, None),
            };
            let lag = Lag::of(&log, committed);
            let log_start_offset = committed
                .filter(|committed| committed.objects > 0)
                .map_or(log.log_start_offset(), |committed| {
                    committed.log_start_offset.min(log.log_start_offset())
                });
            partitions.push(PartitionStatus {
                partition: index,
                log_start_offset,
                local_start_offset: log.local_start_offset(),
                high_watermark: log.high_watermark(),
                archived_next_offset: committed
                    .map(|committed| committed.next_offset.unwrap_or(lag.archived_next)),
                archived_objects: committed.map_or(0, |committed| committed.objects),
                archived_bytes: committed.map_or(0, |committed| committed.bytes),
                upload_lag_records: lag.records,
                upload_lag_bytes: lag.bytes,
                last_error,
            });
        }
        Ok(TopicStatus {
            topic: topic.to_string(),
            store: self.store.url().to_string(),
            backpressure: self.backpressure.is_on(),
            partitions,
        })
    }
}
