//! The broker behind the Kafka gateway: topics and partitions on the node's log, the
//! partitions' leadership (role and leader epoch), idempotent producers, the group
//! coordinator and committed offsets. It implements `silt_gateways::kafka::KafkaBroker`.
//!
//! One node today, shaped for the cluster: every partition has a role (leader here, as this
//! node is the whole cluster) and a leader epoch that is stamped into every batch appended;
//! acks=1 and acks=all both wait until the in-sync replicas (today: this node) have the batch
//! durably, which on one node is the fsync.
//!
//! # Layout
//! - `groups`: the consumer group coordinator.
//! - `offsets`: committed offsets in an internal log topic.
//! - `producers`: idempotent producer state per partition.
//! - `roles`: each partition's role and leader epoch, shared with the uplink server.

mod groups;
mod offsets;
mod producer_ids;
mod producers;
mod roles;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use silt_gateways::kafka::{
    Acks, BrokerInfo, ClusterMetadata, CommittedOffset, ConfigChange, ConfigEntry,
    FetchedPartition, FetchedRecords, GroupDescription, GroupListing, JoinGroup, JoinResult,
    KafkaBroker, KafkaError, NewTopic, OffsetCommit, OffsetQuery, PartitionInfo, ProduceResult,
    SyncGroup, SyncResult, TopicMetadata,
};
use silt_log::batch::BatchHeader;
use silt_log::config::TOPIC_CONFIG_KEYS;
use silt_log::{AppendOptions, LogError, LogManager, PartitionLog};
use silt_tiering::{ArchiveStore, ColdConfig, ColdError, ColdReader};
use tokio::sync::Notify;

use crate::tier::Backpressure;

pub(crate) use self::offsets::OFFSETS_TOPIC;
use self::offsets::OffsetStore;
pub(crate) use self::producer_ids::PRODUCER_IDS_TOPIC;
use self::producer_ids::ProducerIds;
use self::producers::{Check, PartitionProducers, ProducerBatch};
pub(crate) use self::roles::{Leadership, NotLeader, Role};

/// How often the group coordinator checks sessions and rebalance deadlines.
pub(crate) const GROUP_TICK: Duration = Duration::from_millis(100);
/// Bytes read at a time when rebuilding producer state from a partition.
const PRODUCER_SCAN_READ_BYTES: usize = 4 << 20;

/// One partition's producer state, locked across an idempotent append.
type SharedProducers = Arc<Mutex<PartitionProducers>>;

/// What the broker is configured with.
#[derive(Debug, Clone)]
pub(crate) struct BrokerConfig {
    /// The archive (`object_store`): Fetch and ListOffsets below the local start read it.
    pub(crate) archive: Option<ArchiveStore>,
    /// Bounds of the cold reader over `archive` (`tiering.cold_*`).
    pub(crate) cold: ColdConfig,
    /// Set by tiering while the data directory is nearly full and offload is behind: Produce
    /// then gets KAFKA_STORAGE_ERROR, which clients retry, before the disk is full.
    pub(crate) backpressure: Backpressure,
    pub(crate) node_id: i32,
    /// The address Metadata and FindCoordinator give clients.
    pub(crate) advertised: (String, u16),
    pub(crate) default_partitions: u32,
    pub(crate) auto_create_topics: bool,
    pub(crate) group_initial_rebalance_delay: Duration,
}

/// The broker of one core node.
#[derive(Debug)]
pub(crate) struct Broker {
    config: BrokerConfig,
    log: Arc<LogManager>,
    /// Shared with the uplink server, which appends as the same leader.
    leadership: Arc<Leadership>,
    producers: Mutex<HashMap<(String, u32), SharedProducers>>,
    producer_ids: ProducerIds,
    groups: groups::Coordinator,
    offsets: OffsetStore,
    appended: Notify,
    /// Reads below the local start; `None` without an archive.
    cold: Option<Arc<ColdReader>>,
}

impl Broker {
    /// Opens the broker over `log`, replaying committed offsets. Blocking.
    pub(crate) fn open(config: BrokerConfig, log: Arc<LogManager>) -> Result<Broker, LogError> {
        let offsets = OffsetStore::open(&log)?;
        // Producer ids never repeat: they come from blocks reserved durably in the log, and
        // never from below the clock (in ms, shifted to leave room for 4096 ids per ms), which
        // is where ids came from before the reservations existed.
        let producer_ids = ProducerIds::open(&log, silt_log::now_ms().max(1) << 12)?;
        let cold = config
            .archive
            .clone()
            .map(|store| ColdReader::new(store, config.cold));
        Ok(Broker {
            cold,
            groups: groups::Coordinator::new(config.group_initial_rebalance_delay),
            config,
            log,
            leadership: Arc::new(Leadership::default()),
            producers: Mutex::new(HashMap::new()),
            producer_ids,
            offsets,
            appended: Notify::new(),
        })
    }

    /// Lets the group coordinator expire sessions and finish rebalances.
    pub(crate) fn tick(&self) {
        self.groups.tick(Instant::now());
    }

    /// Counts of groups by state, for metrics.
    pub(crate) fn group_state_counts(&self) -> BTreeMap<&'static str, usize> {
        self.groups.state_counts()
    }

    /// Wakes fetches waiting for new data: for appends that do not come through Produce (the
    /// uplink's).
    pub(crate) fn notify_appended(&self) {
        self.appended.notify_waiters();
    }

    /// The partitions' roles and leader epochs, for other paths that append as leader.
    pub(crate) fn leadership(&self) -> Arc<Leadership> {
        self.leadership.clone()
    }

    fn partition_info(&self, topic: &str, partition: u32) -> PartitionInfo {
        let (leader_id, leader_epoch) = match self.leadership.role(topic, partition) {
            Role::Leader { epoch } => (self.config.node_id, epoch),
            Role::Follower { leader, epoch } => (leader, epoch),
        };
        PartitionInfo {
            partition,
            leader_id,
            leader_epoch,
            replicas: vec![self.config.node_id],
            in_sync_replicas: vec![self.config.node_id],
        }
    }

    fn topic_metadata(&self, name: &str) -> TopicMetadata {
        match self.log.topic(name) {
            Some(info) => TopicMetadata {
                name: name.to_string(),
                result: Ok((0..info.partitions)
                    .map(|partition| self.partition_info(name, partition))
                    .collect()),
                internal: is_internal_topic(name),
            },
            None => TopicMetadata {
                name: name.to_string(),
                result: Err(KafkaError::UnknownTopicOrPartition),
                internal: false,
            },
        }
    }

    /// The partition, creating its topic first when auto-creation allows.
    async fn partition_for_produce(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<Arc<PartitionLog>, KafkaError> {
        // Only the node writes its own topics, as Kafka refuses appends to its internal ones.
        if is_internal_topic(topic) {
            return Err(KafkaError::InvalidTopic("internal topic".into()));
        }
        if self.log.topic(topic).is_none() && self.config.auto_create_topics {
            self.auto_create(topic).await?;
        }
        self.log
            .partition(topic, partition)
            .map_err(|error| map_log_error(&error))
    }

    async fn auto_create(&self, topic: &str) -> Result<(), KafkaError> {
        if is_internal_topic(topic) {
            return Err(KafkaError::InvalidTopic("internal topic".into()));
        }
        let log = self.log.clone();
        let name = topic.to_string();
        let partitions = self.config.default_partitions;
        blocking(move || log.ensure_topic(&name, partitions).map(|_| ())).await
    }

    /// The producer state of a partition, rebuilt from the log the first time. Blocking.
    fn producer_state(
        &self,
        topic: &str,
        partition: &PartitionLog,
    ) -> Result<Arc<Mutex<PartitionProducers>>, LogError> {
        let state = {
            let mut producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
            producers
                .entry((topic.to_string(), partition.partition()))
                .or_default()
                .clone()
        };
        {
            let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
            if !guard.loaded {
                load_producers(partition, &mut guard)?;
                guard.loaded = true;
            }
        }
        Ok(state)
    }

    fn append(
        &self,
        topic: &str,
        partition: &PartitionLog,
        batches: &mut [u8],
        epoch: i32,
    ) -> Result<ProduceResult, KafkaError> {
        let header = BatchHeader::parse(batches)
            .map_err(|error| KafkaError::CorruptMessage(error.to_string()))?
            .ok_or_else(|| KafkaError::CorruptMessage("shorter than a batch header".into()))?;
        let options = AppendOptions {
            leader_epoch: Some(epoch),
            ..AppendOptions::default()
        };
        let done = |info: silt_log::AppendInfo| ProduceResult {
            base_offset: info.base_offset as i64,
            log_append_time_ms: -1,
            log_start_offset: partition.log_start_offset() as i64,
        };
        if header.producer_id < 0 {
            let info = partition
                .append_with(batches, options)
                .map_err(|error| map_log_error(&error))?;
            return Ok(done(info));
        }
        if header.is_transactional() {
            return Err(KafkaError::TransactionsUnsupported);
        }
        let state = self
            .producer_state(topic, partition)
            .map_err(|error| map_log_error(&error))?;
        // Held across the append: the check and the record must see the same log.
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let last_sequence = header.base_sequence.wrapping_add(header.last_offset_delta);
        match state.check(
            header.producer_id,
            header.producer_epoch,
            header.base_sequence,
            last_sequence,
        )? {
            Check::Duplicate { base_offset } => Ok(ProduceResult {
                base_offset: base_offset as i64,
                log_append_time_ms: -1,
                log_start_offset: partition.log_start_offset() as i64,
            }),
            Check::Append => {
                let info = partition
                    .append_with(batches, options)
                    .map_err(|error| map_log_error(&error))?;
                state.record(ProducerBatch {
                    producer_id: header.producer_id,
                    epoch: header.producer_epoch,
                    first_sequence: header.base_sequence,
                    last_sequence,
                    base_offset: info.base_offset,
                });
                Ok(done(info))
            }
        }
    }
}

impl Broker {
    /// A Fetch below the local start: whole batches rebuilt from the archive, handed to the
    /// gateway as they are (no copy into its buffer), with the high watermark and log start of
    /// the local log. Async IO, awaited: no worker thread is blocked across the store's round
    /// trips.
    async fn fetch_cold(
        &self,
        topic: &str,
        log_partition: &PartitionLog,
        offset: u64,
        max_bytes: usize,
    ) -> Result<FetchedPartition, KafkaError> {
        let cold = self.cold.as_ref().ok_or(KafkaError::OffsetOutOfRange)?;
        let offset = i64::try_from(offset).map_err(|_| KafkaError::OffsetOutOfRange)?;
        let read = cold
            .read(topic, log_partition.partition(), offset, max_bytes)
            .await
            .map_err(map_cold_error)?;
        Ok(FetchedPartition {
            high_watermark: log_partition.high_watermark() as i64,
            log_start_offset: log_partition.log_start_offset() as i64,
            records: FetchedRecords::Shared(read.batches),
        })
    }
}

/// The node's own topics (committed offsets, producer id reservations): listed as internal,
/// never created, altered or deleted by clients.
pub(crate) fn is_internal_topic(name: &str) -> bool {
    name == OFFSETS_TOPIC || name == PRODUCER_IDS_TOPIC
}

/// Cold read errors as Kafka errors: expired is OFFSET_OUT_OF_RANGE; a failing store or a
/// missing object is KAFKA_STORAGE_ERROR, which clients retry.
fn map_cold_error(error: ColdError) -> KafkaError {
    match error {
        ColdError::OutOfRange { .. } => KafkaError::OffsetOutOfRange,
        other => {
            tracing::warn!(error = %other, "cold read answered as KAFKA_STORAGE_ERROR");
            KafkaError::Storage(other.to_string())
        }
    }
}

/// Replays a partition's batch headers into its producer state.
fn load_producers(
    partition: &PartitionLog,
    state: &mut PartitionProducers,
) -> Result<(), LogError> {
    let mut offset = partition.log_start_offset();
    loop {
        let slice = match partition.read(offset, PRODUCER_SCAN_READ_BYTES) {
            Ok(slice) => slice,
            // Below the local start (archived): what is local is what can be rebuilt.
            Err(LogError::NotLocal { local_start, .. }) => {
                offset = local_start;
                continue;
            }
            Err(error) => return Err(error),
        };
        if slice.bytes.is_empty() {
            return Ok(());
        }
        for batch in silt_log::batch::batches(&slice.bytes, usize::MAX) {
            let (header, _) = batch?;
            if header.producer_id >= 0 {
                state.record(ProducerBatch {
                    producer_id: header.producer_id,
                    epoch: header.producer_epoch,
                    first_sequence: header.base_sequence,
                    last_sequence: header.base_sequence.wrapping_add(header.last_offset_delta),
                    base_offset: header.base_offset as u64,
                });
            }
            offset = header.last_offset() as u64 + 1;
        }
    }
}

/// Runs blocking log work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, KafkaError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(|error| map_log_error(&error)),
        Err(error) => Err(KafkaError::Storage(format!("log task failed: {error}"))),
    }
}

/// The one place log errors become Kafka errors.
fn map_log_error(error: &LogError) -> KafkaError {
    match error {
        LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => {
            KafkaError::UnknownTopicOrPartition
        }
        LogError::OffsetOutOfRange { .. } | LogError::NotLocal { .. } => {
            KafkaError::OffsetOutOfRange
        }
        LogError::InvalidBatch(error) => KafkaError::CorruptMessage(error.to_string()),
        LogError::TopicExists(_) => KafkaError::TopicAlreadyExists,
        LogError::InvalidTopicName { name, reason } => {
            KafkaError::InvalidTopic(format!("{name:?}: {reason}"))
        }
        LogError::InvalidPartitionCount(count) => {
            KafkaError::InvalidPartitions(format!("{count} partitions"))
        }
        LogError::Config(error) => KafkaError::InvalidConfig(error.to_string()),
        LogError::BudgetExceeded { .. } | LogError::FilesystemFull { .. } => {
            KafkaError::StorageFull
        }
        LogError::Closed => KafkaError::ShuttingDown,
        other => {
            tracing::warn!(error = %other, "log error answered as KAFKA_STORAGE_ERROR");
            KafkaError::Storage(other.to_string())
        }
    }
}

impl KafkaBroker for Broker {
    fn local_broker(&self) -> BrokerInfo {
        BrokerInfo {
            node_id: self.config.node_id,
            host: self.config.advertised.0.clone(),
            port: self.config.advertised.1,
        }
    }

    async fn metadata(&self, topics: Option<Vec<String>>, auto_create: bool) -> ClusterMetadata {
        let names: Vec<String> = match topics {
            Some(names) => names,
            // Every topic, internal ones hidden unless asked for by name.
            None => self
                .log
                .topics()
                .into_iter()
                .map(|topic| topic.name)
                .filter(|name| !is_internal_topic(name))
                .collect(),
        };
        let mut result = Vec::with_capacity(names.len());
        for name in names {
            if self.log.topic(&name).is_none()
                && auto_create
                && self.config.auto_create_topics
                && let Err(error) = self.auto_create(&name).await
            {
                result.push(TopicMetadata {
                    name,
                    result: Err(error),
                    internal: false,
                });
                continue;
            }
            result.push(self.topic_metadata(&name));
        }
        ClusterMetadata {
            cluster_id: "silt".into(),
            controller_id: self.config.node_id,
            brokers: vec![self.local_broker()],
            topics: result,
        }
    }

    async fn produce(
        &self,
        topic: &str,
        partition: u32,
        mut batches: BytesMut,
        acks: Acks,
    ) -> Result<ProduceResult, KafkaError> {
        let _ = acks; // Every level waits for the fsync; see the module doc.
        let log_partition = self.partition_for_produce(topic, partition).await?;
        let epoch = self
            .leadership
            .leader_epoch(topic, partition)
            .map_err(|NotLeader { .. }| KafkaError::NotLeader)?;
        self.config
            .backpressure
            .admit_produce()
            .map_err(|_| KafkaError::StorageFull)?;
        // The append blocks on the fsync: the worker thread hands its other tasks over
        // while it waits (`block_in_place`), so the broker needs no 'static clone of itself.
        let result =
            tokio::task::block_in_place(|| self.append(topic, &log_partition, &mut batches, epoch));
        if result.is_ok() {
            self.appended.notify_waiters();
        }
        result
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
        buf: &mut Vec<u8>,
        at: usize,
    ) -> Result<FetchedPartition, KafkaError> {
        let log_partition = self
            .log
            .partition(topic, partition)
            .map_err(|error| map_log_error(&error))?;
        let offset = u64::try_from(offset).map_err(|_| KafkaError::OffsetOutOfRange)?;
        // The Fetch's budget is spent, so the gateway sends this partition's offsets and no
        // records: the offset is checked, and nothing is read. (A read would copy a batch
        // only to drop it; from the archive it would also rebuild one and move the
        // partition's replay past what its consumer has.)
        if max_bytes == 0 {
            match log_partition.check_readable(offset) {
                Ok(()) => {}
                Err(LogError::NotLocal { .. }) if self.cold.is_some() => {}
                Err(error) => return Err(map_log_error(&error)),
            }
            return Ok(FetchedPartition {
                high_watermark: log_partition.high_watermark() as i64,
                log_start_offset: log_partition.log_start_offset() as i64,
                records: FetchedRecords::InBuffer(0),
            });
        }
        // A page-cache read into the connection's own buffer: the worker thread hands its
        // other tasks over while it reads (`block_in_place`), so the buffer need not move.
        let read = match tokio::task::block_in_place(|| {
            log_partition.read_into(offset, max_bytes, buf, at)
        }) {
            Ok(read) => read,
            Err(LogError::NotLocal { offset, .. }) if self.cold.is_some() => {
                return self
                    .fetch_cold(topic, &log_partition, offset, max_bytes)
                    .await;
            }
            Err(error) => return Err(map_log_error(&error)),
        };
        Ok(FetchedPartition {
            high_watermark: read.high_watermark as i64,
            log_start_offset: read.log_start_offset as i64,
            records: FetchedRecords::InBuffer(read.len),
        })
    }

    fn appended(&self) -> impl Future<Output = ()> + Send {
        self.appended.notified()
    }

    async fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        query: OffsetQuery,
    ) -> Result<(i64, i64), KafkaError> {
        let log_partition = self
            .log
            .partition(topic, partition)
            .map_err(|error| map_log_error(&error))?;
        match query {
            OffsetQuery::Earliest => Ok((log_partition.log_start_offset() as i64, -1)),
            OffsetQuery::Latest => Ok((log_partition.high_watermark() as i64, -1)),
            OffsetQuery::Timestamp(time) => {
                if let Some(cold) = &self.cold
                    && log_partition.local_start_offset() > log_partition.log_start_offset()
                {
                    match cold.offset_for_timestamp(topic, partition, time).await {
                        Ok(Some(found)) => return Ok(found),
                        Ok(None) => {}
                        Err(error) => return Err(map_cold_error(error)),
                    }
                }
                let found = blocking(move || log_partition.offset_for_timestamp(time)).await?;
                Ok(found.map_or((-1, -1), |(offset, timestamp)| (offset as i64, timestamp)))
            }
        }
    }

    async fn create_topic(
        &self,
        topic: NewTopic,
        validate_only: bool,
    ) -> Result<(u32, u16), KafkaError> {
        let partitions = topic.partitions.unwrap_or(self.config.default_partitions);
        let replication = topic.replication_factor.unwrap_or(1);
        if replication != 1 {
            return Err(KafkaError::InvalidReplicationFactor(format!(
                "replication factor {replication} is larger than the 1 available broker"
            )));
        }
        for key in topic.configs.keys() {
            if !TOPIC_CONFIG_KEYS.contains(&key.as_str()) {
                return Err(KafkaError::InvalidConfig(format!(
                    "unknown topic config {key}; known: {}",
                    TOPIC_CONFIG_KEYS.join(", ")
                )));
            }
        }
        silt_log::validate_topic_name(&topic.name).map_err(|error| map_log_error(&error))?;
        if is_internal_topic(&topic.name) {
            return Err(KafkaError::InvalidTopic("internal topic".into()));
        }
        if validate_only {
            self.log
                .config()
                .topic_defaults
                .clone()
                .with_overrides(topic.configs.iter())
                .map_err(|error| KafkaError::InvalidConfig(error.to_string()))?;
            if self.log.topic(&topic.name).is_some() {
                return Err(KafkaError::TopicAlreadyExists);
            }
            return Ok((partitions, replication));
        }
        let log = self.log.clone();
        blocking(move || log.create_topic(&topic.name, partitions, &topic.configs)).await?;
        Ok((partitions, replication))
    }

    async fn delete_topic(&self, topic: &str) -> Result<(), KafkaError> {
        if is_internal_topic(topic) {
            return Err(KafkaError::InvalidTopic("internal topic".into()));
        }
        let log = self.log.clone();
        let name = topic.to_string();
        blocking(move || log.delete_topic(&name)).await?;
        self.leadership.forget_topic(topic);
        let mut producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
        producers.retain(|(name, _), _| name != topic);
        Ok(())
    }

    fn describe_topic_config(&self, topic: &str) -> Result<Vec<ConfigEntry>, KafkaError> {
        let info = self
            .log
            .topic(topic)
            .ok_or(KafkaError::UnknownTopicOrPartition)?;
        Ok(info
            .config
            .to_map()
            .into_iter()
            .map(|(name, value)| ConfigEntry {
                is_topic_override: info.overrides.contains_key(&name),
                name,
                value,
            })
            .collect())
    }

    async fn alter_topic_config(
        &self,
        topic: &str,
        changes: Vec<ConfigChange>,
        incremental: bool,
        validate_only: bool,
    ) -> Result<(), KafkaError> {
        let info = self
            .log
            .topic(topic)
            .ok_or(KafkaError::UnknownTopicOrPartition)?;
        let mut overrides = if incremental {
            info.overrides.clone()
        } else {
            BTreeMap::new()
        };
        for change in changes {
            match change {
                ConfigChange::Set(key, value) => {
                    if !TOPIC_CONFIG_KEYS.contains(&key.as_str()) {
                        return Err(KafkaError::InvalidConfig(format!(
                            "unknown topic config {key}; known: {}",
                            TOPIC_CONFIG_KEYS.join(", ")
                        )));
                    }
                    overrides.insert(key, value);
                }
                ConfigChange::Delete(key) => {
                    overrides.remove(&key);
                }
            }
        }
        if validate_only {
            self.log
                .config()
                .topic_defaults
                .clone()
                .with_overrides(overrides.iter())
                .map_err(|error| KafkaError::InvalidConfig(error.to_string()))?;
            return Ok(());
        }
        let log = self.log.clone();
        let name = topic.to_string();
        blocking(move || log.alter_topic_config(&name, &overrides).map(|_| ())).await
    }

    async fn init_producer_id(
        &self,
        transactional_id: Option<String>,
    ) -> Result<(i64, i16), KafkaError> {
        if transactional_id.is_some() {
            return Err(KafkaError::TransactionsUnsupported);
        }
        // Blocking only once per block of ids (an fsync'd reservation).
        let id = tokio::task::block_in_place(|| self.producer_ids.allocate())
            .map_err(|error| map_log_error(&error))?;
        Ok((id, 0))
    }

    async fn join_group(&self, request: JoinGroup) -> JoinResult {
        self.groups.join(request, Instant::now()).await
    }

    async fn sync_group(&self, request: SyncGroup) -> Result<SyncResult, KafkaError> {
        self.groups.sync(request, Instant::now()).await
    }

    fn heartbeat(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
    ) -> Result<(), KafkaError> {
        self.groups
            .heartbeat(group_id, generation_id, member_id, Instant::now())
    }

    fn leave_group(&self, group_id: &str, members: Vec<String>) -> Vec<Result<(), KafkaError>> {
        self.groups.leave(group_id, &members, Instant::now())
    }

    async fn commit_offsets(&self, request: OffsetCommit) -> Vec<Result<(), KafkaError>> {
        let count = request.offsets.len();
        if let Err(error) =
            self.groups
                .check_commit(&request.group_id, request.generation_id, &request.member_id)
        {
            return vec![Err(error); count];
        }
        let mut results = Vec::with_capacity(count);
        let mut valid = Vec::with_capacity(count);
        for (topic, partition, committed) in request.offsets {
            let known = self
                .log
                .topic(&topic)
                .is_some_and(|info| partition < info.partitions);
            if known {
                valid.push((topic, partition, committed));
                results.push(Ok(()));
            } else {
                results.push(Err(KafkaError::UnknownTopicOrPartition));
            }
        }
        let written =
            tokio::task::block_in_place(|| self.offsets.commit(&request.group_id, &valid));
        if let Err(error) = written {
            let error = map_log_error(&error);
            return vec![Err(error); count];
        }
        results
    }

    fn fetch_offsets(
        &self,
        group_id: &str,
        partitions: Option<Vec<(String, u32)>>,
    ) -> Vec<(String, u32, Option<CommittedOffset>)> {
        match partitions {
            Some(partitions) => partitions
                .into_iter()
                .map(|(topic, partition)| {
                    let committed = self.offsets.get(group_id, &topic, partition);
                    (topic, partition, committed)
                })
                .collect(),
            None => self
                .offsets
                .group(group_id)
                .into_iter()
                .map(|(topic, partition, committed)| (topic, partition, Some(committed)))
                .collect(),
        }
    }

    fn list_groups(&self) -> Vec<GroupListing> {
        self.groups.list(self.offsets.groups())
    }

    fn describe_group(&self, group_id: &str) -> GroupDescription {
        let mut description = self.groups.describe(group_id);
        if description.state == "Dead" && !self.offsets.group(group_id).is_empty() {
            description.state = "Empty".into();
            description.protocol_type = "consumer".into();
        }
        description
    }
}
