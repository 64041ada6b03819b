//! The port the Kafka gateway calls: what it needs from a broker, in domain terms (topics,
//! partitions, batches, group members), with no protocol structs. The core node implements it
//! over its log and group coordinator; the gateway never depends on the core.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

/// Why a broker refused (part of) a request; each kind maps to one Kafka error code in
/// [`KafkaError::code`], the one place the gateway turns errors into codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaError {
    #[error("unknown topic or partition")]
    UnknownTopicOrPartition,
    #[error("offset out of range")]
    OffsetOutOfRange,
    #[error("corrupt message: {0}")]
    CorruptMessage(String),
    #[error("topic already exists")]
    TopicAlreadyExists,
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    #[error("invalid partitions: {0}")]
    InvalidPartitions(String),
    #[error("invalid replication factor: {0}")]
    InvalidReplicationFactor(String),
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("message too large")]
    MessageTooLarge,
    #[error("not enough disk space or over the disk budget")]
    StorageFull,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("not the leader of this partition")]
    NotLeader,
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("out of order sequence number")]
    OutOfOrderSequence,
    #[error("producer fenced by a newer epoch")]
    InvalidProducerEpoch,
    #[error("unknown producer id")]
    UnknownProducerId,
    #[error("transactions are not supported")]
    TransactionsUnsupported,
    #[error("unknown member id")]
    UnknownMemberId,
    #[error("member id required")]
    MemberIdRequired,
    #[error("illegal generation")]
    IllegalGeneration,
    #[error("rebalance in progress")]
    RebalanceInProgress,
    #[error("inconsistent group protocol")]
    InconsistentGroupProtocol,
    #[error("invalid session timeout")]
    InvalidSessionTimeout,
    #[error("invalid group id")]
    InvalidGroupId,
    #[error("group id not found")]
    GroupIdNotFound,
    #[error("non-empty group")]
    NonEmptyGroup,
    #[error("the group is at its member limit")]
    GroupMaxSizeReached,
    #[error("coordinator not available")]
    CoordinatorNotAvailable,
    #[error("unsupported version")]
    UnsupportedVersion,
    #[error("request timed out")]
    RequestTimedOut,
}

impl KafkaError {
    /// The Kafka protocol error code.
    pub fn code(&self) -> i16 {
        match self {
            KafkaError::OffsetOutOfRange => 1,
            KafkaError::CorruptMessage(_) => 2,
            KafkaError::UnknownTopicOrPartition => 3,
            KafkaError::NotLeader => 6,
            KafkaError::RequestTimedOut => 7,
            KafkaError::MessageTooLarge => 10,
            KafkaError::CoordinatorNotAvailable => 15,
            KafkaError::InvalidTopic(_) => 17,
            KafkaError::IllegalGeneration => 22,
            KafkaError::InconsistentGroupProtocol => 23,
            KafkaError::InvalidGroupId => 24,
            KafkaError::UnknownMemberId => 25,
            KafkaError::InvalidSessionTimeout => 26,
            KafkaError::RebalanceInProgress => 27,
            KafkaError::ShuttingDown => 6,
            KafkaError::TopicAlreadyExists => 36,
            KafkaError::InvalidPartitions(_) => 37,
            KafkaError::InvalidReplicationFactor(_) => 38,
            KafkaError::UnsupportedVersion => 35,
            KafkaError::InvalidRequest(_) => 42,
            KafkaError::InvalidConfig(_) => 40,
            KafkaError::OutOfOrderSequence => 45,
            KafkaError::InvalidProducerEpoch => 47,
            KafkaError::TransactionsUnsupported => 48,
            KafkaError::UnknownProducerId => 59,
            KafkaError::NonEmptyGroup => 68,
            KafkaError::GroupIdNotFound => 69,
            KafkaError::MemberIdRequired => 79,
            KafkaError::GroupMaxSizeReached => 81,
            // KAFKA_STORAGE_ERROR: retriable, so a producer retries after space frees up.
            KafkaError::StorageFull | KafkaError::Storage(_) => 56,
        }
    }
}

/// A broker the cluster knows, as Metadata and FindCoordinator report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerInfo {
    pub node_id: i32,
    pub host: String,
    pub port: u16,
}

/// One partition's placement and leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: u32,
    pub leader_id: i32,
    pub leader_epoch: i32,
    pub replicas: Vec<i32>,
    pub in_sync_replicas: Vec<i32>,
}

/// One topic as Metadata reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    pub name: String,
    pub result: Result<Vec<PartitionInfo>, KafkaError>,
    /// Internal topics (committed offsets) are flagged, as Kafka flags `__consumer_offsets`.
    pub internal: bool,
}

/// The cluster as Metadata reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMetadata {
    pub cluster_id: String,
    pub controller_id: i32,
    pub brokers: Vec<BrokerInfo>,
    pub topics: Vec<TopicMetadata>,
}

/// `acks` of a Produce request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// acks=0: the client wants no response; the append still happens.
    None,
    /// acks=1: the leader has the batch durably.
    Leader,
    /// acks=all (-1): every in-sync replica has the batch durably.
    AllInSync,
}

/// Where a produced batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceResult {
    pub base_offset: i64,
    /// Kafka reports -1 unless the topic uses log-append time.
    pub log_append_time_ms: i64,
    pub log_start_offset: i64,
}

/// What Fetch read from one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedPartition {
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub records: FetchedRecords,
}

/// Where a Fetch's records (whole batches) are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchedRecords {
    /// This many bytes of the caller's buffer, at the position it gave: stored batches,
    /// unchanged, read there from the log.
    InBuffer(usize),
    /// Batches the broker holds in memory already (rebuilt from the archive): the gateway
    /// writes them to the socket from there, instead of copying them into its buffer.
    Shared(Bytes),
}

impl FetchedRecords {
    /// Bytes of records.
    pub fn len(&self) -> usize {
        match self {
            FetchedRecords::InBuffer(len) => *len,
            FetchedRecords::Shared(bytes) => bytes.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which offset ListOffsets asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetQuery {
    Earliest,
    Latest,
    /// The first offset whose timestamp is at or after this one (ms).
    Timestamp(i64),
}

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    pub name: String,
    /// `None`: the broker's default.
    pub partitions: Option<u32>,
    /// `None`: the broker's default.
    pub replication_factor: Option<u16>,
    pub configs: BTreeMap<String, String>,
}

/// One topic config entry as DescribeConfigs reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    pub name: String,
    pub value: String,
    /// Set on the topic, rather than a broker default.
    pub is_topic_override: bool,
}

/// An IncrementalAlterConfigs operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    Set(String, String),
    Delete(String),
}

/// A JoinGroup request in domain terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGroup {
    pub group_id: String,
    /// Empty for a member joining the first time.
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    pub protocol_type: String,
    /// (name, metadata) in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    /// Whether the client understands MEMBER_ID_REQUIRED (JoinGroup v4+).
    pub require_known_member_id: bool,
}

/// A member as the group leader sees it in a JoinGroup response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub metadata: Bytes,
}

/// The JoinGroup answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResult {
    pub error: Option<KafkaError>,
    pub generation_id: i32,
    pub protocol_type: String,
    pub protocol_name: String,
    pub leader_id: String,
    pub member_id: String,
    /// Only the leader gets the members.
    pub members: Vec<JoinedMember>,
}

/// A SyncGroup request in domain terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncGroup {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    /// Only from the leader: (member id, assignment).
    pub assignments: Vec<(String, Bytes)>,
}

/// The SyncGroup answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncResult {
    pub protocol_type: String,
    pub protocol_name: String,
    pub assignment: Bytes,
}

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
}

/// An OffsetCommit request in domain terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommit {
    pub group_id: String,
    /// -1 with an empty member id: a commit from outside the group (simple consumer).
    pub generation_id: i32,
    pub member_id: String,
    pub offsets: Vec<(String, u32, CommittedOffset)>,
}

/// A group as ListGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    pub protocol_type: String,
    pub state: String,
}

/// A member as DescribeGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// A group as DescribeGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: String,
    pub protocol_type: String,
    pub protocol_name: String,
    pub members: Vec<GroupMemberDescription>,
}

/// Everything the Kafka gateway asks of the broker behind it.
///
/// Methods return `Send` futures so the gateway can run each connection on its own task.
pub trait KafkaBroker: Send + Sync + 'static {
    /// This broker's id and the address clients should dial.
    fn local_broker(&self) -> BrokerInfo;

    /// The cluster and the topics asked for (`None`: every topic), creating missing ones when
    /// `auto_create` is set and the broker allows it.
    fn metadata(
        &self,
        topics: Option<Vec<String>>,
        auto_create: bool,
    ) -> impl Future<Output = ClusterMetadata> + Send;

    /// Appends `batches` (one or more whole RecordBatch v2) to a partition; returns once the
    /// `acks` level is met (for `Leader` and `AllInSync`, after the fsync). The batches are
    /// the request's own bytes, mutable so the broker stamps offsets and leader epoch in place
    /// rather than copying them.
    fn produce(
        &self,
        topic: &str,
        partition: u32,
        batches: BytesMut,
        acks: Acks,
    ) -> impl Future<Output = Result<ProduceResult, KafkaError>> + Send;

    /// Reads whole batches from `offset`, at most about `max_bytes` (at least one batch),
    /// into `buf[at..]`, growing `buf` when it is too short. The gateway keeps `buf` across
    /// requests, so the batch bytes are copied once, from storage into `buf`, and written to
    /// the socket from there. Batches the broker already holds in memory it returns as
    /// [`FetchedRecords::Shared`] instead, leaving `buf` alone.
    fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
        max_bytes: usize,
        buf: &mut Vec<u8>,
        at: usize,
    ) -> impl Future<Output = Result<FetchedPartition, KafkaError>> + Send;

    /// Completes when new data may be readable (any append since the call), for long polls.
    fn appended(&self) -> impl Future<Output = ()> + Send;

    /// (offset, timestamp) for a ListOffsets query; timestamp -1 when not by time.
    fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        query: OffsetQuery,
    ) -> impl Future<Output = Result<(i64, i64), KafkaError>> + Send;

    fn create_topic(
        &self,
        topic: NewTopic,
        validate_only: bool,
    ) -> impl Future<Output = Result<(u32, u16), KafkaError>> + Send;

    fn delete_topic(&self, topic: &str) -> impl Future<Output = Result<(), KafkaError>> + Send;

    /// Every config of a topic, with its effective value.
    fn describe_topic_config(&self, topic: &str) -> Result<Vec<ConfigEntry>, KafkaError>;

    /// Replaces (`incremental` false: AlterConfigs) or edits (IncrementalAlterConfigs) a
    /// topic's config overrides.
    fn alter_topic_config(
        &self,
        topic: &str,
        changes: Vec<ConfigChange>,
        incremental: bool,
        validate_only: bool,
    ) -> impl Future<Output = Result<(), KafkaError>> + Send;

    /// A new idempotent producer id and epoch; `transactional` ids are refused.
    fn init_producer_id(
        &self,
        transactional_id: Option<String>,
    ) -> impl Future<Output = Result<(i64, i16), KafkaError>> + Send;

    fn join_group(&self, request: JoinGroup) -> impl Future<Output = JoinResult> + Send;

    fn sync_group(
        &self,
        request: SyncGroup,
    ) -> impl Future<Output = Result<SyncResult, KafkaError>> + Send;

    fn heartbeat(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
    ) -> Result<(), KafkaError>;

    /// Removes members; one result per member, in order.
    fn leave_group(&self, group_id: &str, members: Vec<String>) -> Vec<Result<(), KafkaError>>;

    /// Commits durably; one result per offset, in order.
    fn commit_offsets(
        &self,
        request: OffsetCommit,
    ) -> impl Future<Output = Vec<Result<(), KafkaError>>> + Send;

    /// Committed offsets of a group: for the partitions asked, or all when `None`.
    fn fetch_offsets(
        &self,
        group_id: &str,
        partitions: Option<Vec<(String, u32)>>,
    ) -> Vec<(String, u32, Option<CommittedOffset>)>;

    fn list_groups(&self) -> Vec<GroupListing>;

    fn describe_group(&self, group_id: &str) -> GroupDescription;
}
