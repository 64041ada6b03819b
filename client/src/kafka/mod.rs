//! A small Kafka-protocol client for the `silt` CLI, on `kafka-protocol`'s message codecs: it
//! finds partition leaders and group coordinators from Metadata and FindCoordinator, as any Kafka
//! client does, so it works against `silt-core` and against Kafka itself.
//!
//! # Layout
//! - `conn`: one broker connection: framing, correlation ids, version negotiation.
//! - `group`: a consumer-group member (join, sync, heartbeat, commit, leave) with the range
//!   assignor.
//! - `records`: Produce and Fetch payloads to and from silt-log's RecordBatch v2 codec.

mod conn;
pub(crate) mod group;
pub(crate) mod records;

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    FindCoordinatorRequest, ListOffsetsRequest, MetadataRequest, MetadataResponse, TopicName,
    list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic},
    metadata_request::MetadataRequestTopic,
};
use kafka_protocol::protocol::StrBytes;

pub(crate) use conn::Connection;

/// Newest Metadata version whose fields this client fills in (v13 only adds a top-level error).
const METADATA_VERSION: i16 = 12;
/// FindCoordinator v4 batches keys; v3 is the last with one key per request.
const FIND_COORDINATOR_VERSION: i16 = 3;
/// ListOffsets v8+ only adds timestamp kinds this client does not use.
const LIST_OFFSETS_VERSION: i16 = 7;

/// Kafka's UNKNOWN_TOPIC_OR_PARTITION.
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
/// How long a topic Metadata does not know is waited for before it counts as missing.
const UNKNOWN_TOPIC_GRACE: Duration = Duration::from_secs(2);

/// ListOffsets' timestamp for the log start offset.
pub(crate) const EARLIEST: i64 = -2;
/// ListOffsets' timestamp for the log end offset (the high watermark for consumers).
pub(crate) const LATEST: i64 = -1;

/// What went wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KafkaError {
    #[error("{0}")]
    Io(String),
    #[error("timed out {0}")]
    Timeout(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
    /// Our stdout was closed (`silt consume | head`): a normal way to stop.
    #[error("output closed")]
    OutputClosed,
    /// An error code in a response, with what was being done.
    #[error("{context}: {error} (error code {code})", code = error.code())]
    Broker {
        error: ResponseError,
        context: String,
    },
}

impl KafkaError {
    pub(crate) fn from_code(code: i16, context: String) -> KafkaError {
        KafkaError::Broker {
            error: ResponseError::try_from_code(code).unwrap_or(ResponseError::Unknown(code)),
            context,
        }
    }

    /// Turns a response's error code into a result.
    pub(crate) fn check(code: i16, context: impl FnOnce() -> String) -> Result<(), KafkaError> {
        if code == 0 {
            Ok(())
        } else {
            Err(KafkaError::from_code(code, context()))
        }
    }

    /// Whether retrying the same request may succeed (a leader moving, a coordinator loading,
    /// a connection lost).
    pub(crate) fn is_retriable(&self) -> bool {
        match self {
            KafkaError::Io(_) | KafkaError::Timeout(_) => true,
            KafkaError::Broker { error, .. } => error.is_retriable(),
            KafkaError::Protocol(_) | KafkaError::Unsupported(_) | KafkaError::OutputClosed => {
                false
            }
        }
    }

    pub(crate) fn code(&self) -> Option<i16> {
        match self {
            KafkaError::Broker { error, .. } => Some(error.code()),
            _ => None,
        }
    }
}

/// One partition as Metadata describes it.
#[derive(Debug, Clone)]
pub(crate) struct PartitionMeta {
    pub(crate) partition: i32,
    pub(crate) leader: i32,
    pub(crate) leader_epoch: i32,
    pub(crate) replicas: Vec<i32>,
    pub(crate) isr: Vec<i32>,
}

/// One topic as Metadata describes it.
#[derive(Debug, Clone)]
pub(crate) struct TopicMeta {
    pub(crate) name: String,
    pub(crate) error_code: i16,
    pub(crate) is_internal: bool,
    pub(crate) partitions: Vec<PartitionMeta>,
}

/// Connections to a cluster, found from a bootstrap list.
pub(crate) struct Cluster {
    bootstrap: Vec<String>,
    client_id: String,
    timeout: Duration,
    /// Advertised address of each broker, from the last Metadata.
    brokers: HashMap<i32, String>,
    /// The controller the last Metadata named, if any.
    controller: Option<i32>,
    /// Open connections by broker id; the bootstrap connection is kept under its own key.
    connections: HashMap<i32, Connection>,
    bootstrap_connection: Option<Connection>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("bootstrap", &self.bootstrap)
            .field("brokers", &self.brokers)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to the first reachable broker of `bootstrap` (`host:port[,host:port...]`).
    pub(crate) async fn connect(bootstrap: &str, timeout: Duration) -> Result<Cluster, KafkaError> {
        let bootstrap: Vec<String> = bootstrap
            .split(',')
            .map(str::trim)
            .filter(|addr| !addr.is_empty())
            .map(str::to_string)
            .collect();
        if bootstrap.is_empty() {
            return Err(KafkaError::Unsupported(
                "--bootstrap needs at least one host:port".to_string(),
            ));
        }
        let mut cluster = Cluster {
            bootstrap,
            client_id: "silt-cli".to_string(),
            timeout,
            brokers: HashMap::new(),
            controller: None,
            connections: HashMap::new(),
            bootstrap_connection: None,
        };
        cluster.any().await?;
        Ok(cluster)
    }

    /// A connection to any broker: the bootstrap connection, reopened if it was lost.
    pub(crate) async fn any(&mut self) -> Result<&mut Connection, KafkaError> {
        if self.bootstrap_connection.is_none() {
            let mut last_error = None;
            for addr in &self.bootstrap {
                match Connection::connect(addr, &self.client_id, self.timeout).await {
                    Ok(connection) => {
                        self.bootstrap_connection = Some(connection);
                        break;
                    }
                    Err(error) => last_error = Some(error),
                }
            }
            if let Some(error) = last_error.filter(|_| self.bootstrap_connection.is_none()) {
                return Err(error);
            }
        }
        Ok(self.bootstrap_connection.as_mut().expect("connected above"))
    }

    /// Forgets a connection after an IO error so the next use reconnects.
    pub(crate) fn drop_connection(&mut self, node: Option<i32>) {
        match node {
            Some(node) => {
                self.connections.remove(&node);
            }
            None => self.bootstrap_connection = None,
        }
    }

    /// The cluster's controller, which admin requests go to, from a fresh Metadata.
    pub(crate) async fn controller(&mut self) -> Result<Option<i32>, KafkaError> {
        self.metadata(Some(&[]), false).await?;
        Ok(self.controller)
    }

    /// Ids of the brokers the last Metadata listed.
    pub(crate) fn broker_ids(&self) -> Vec<i32> {
        self.brokers.keys().copied().collect()
    }

    /// The connection to broker `node`, opened on first use at its advertised address.
    pub(crate) async fn broker(&mut self, node: i32) -> Result<&mut Connection, KafkaError> {
        if !self.connections.contains_key(&node) {
            let addr = self.brokers.get(&node).cloned().ok_or_else(|| {
                KafkaError::Protocol(format!("no address known for broker {node}"))
            })?;
            let connection = Connection::connect(&addr, &self.client_id, self.timeout).await?;
            self.connections.insert(node, connection);
        }
        Ok(self.connections.get_mut(&node).expect("inserted above"))
    }

    /// Metadata for `topics` (every topic when `None`). With `auto_create`, the broker may create
    /// missing topics, as a producer's Metadata request allows.
    pub(crate) async fn metadata(
        &mut self,
        topics: Option<&[String]>,
        auto_create: bool,
    ) -> Result<Vec<TopicMeta>, KafkaError> {
        let request = MetadataRequest::default()
            .with_topics(topics.map(|topics| {
                topics
                    .iter()
                    .map(|name| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(name.clone()))))
                    })
                    .collect()
            }))
            .with_allow_auto_topic_creation(auto_create);
        let result = self
            .any()
            .await?
            .call(&request, METADATA_VERSION, Duration::ZERO)
            .await;
        let response: MetadataResponse = match result {
            Ok((response, _)) => response,
            Err(error) => {
                self.drop_connection(None);
                return Err(error);
            }
        };
        self.controller = Some(response.controller_id.0).filter(|&id| id >= 0);
        self.brokers = response
            .brokers
            .iter()
            .map(|broker| {
                (
                    broker.node_id.0,
                    format!("{}:{}", broker.host.as_str(), broker.port),
                )
            })
            .collect();
        Ok(response
            .topics
            .iter()
            .map(|topic| TopicMeta {
                name: topic
                    .name
                    .as_ref()
                    .map(|name| name.0.as_str().to_string())
                    .unwrap_or_default(),
                error_code: topic.error_code,
                is_internal: topic.is_internal,
                partitions: {
                    let mut partitions: Vec<PartitionMeta> = topic
                        .partitions
                        .iter()
                        .map(|p| PartitionMeta {
                            partition: p.partition_index,
                            leader: p.leader_id.0,
                            leader_epoch: p.leader_epoch,
                            replicas: p.replica_nodes.iter().map(|id| id.0).collect(),
                            isr: p.isr_nodes.iter().map(|id| id.0).collect(),
                        })
                        .collect();
                    partitions.sort_by_key(|p| p.partition);
                    partitions
                },
            })
            .collect())
    }

    /// Metadata for one topic that must exist; an error names the topic.
    pub(crate) async fn topic(
        &mut self,
        name: &str,
        auto_create: bool,
    ) -> Result<TopicMeta, KafkaError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let unknown_deadline = tokio::time::Instant::now() + UNKNOWN_TOPIC_GRACE;
        loop {
            let topics = self
                .metadata(Some(&[name.to_string()]), auto_create)
                .await?;
            let topic = topics
                .into_iter()
                .find(|topic| topic.name == name)
                .ok_or_else(|| {
                    KafkaError::Protocol(format!("Metadata did not list topic {name:?}"))
                })?;
            match KafkaError::check(topic.error_code, || format!("topic {name:?}")) {
                Ok(()) if !topic.partitions.is_empty() => return Ok(topic),
                Ok(()) => {}
                // A topic that does not exist: give metadata a moment to catch up with a topic
                // just created, then say so.
                Err(error) if error.code() == Some(UNKNOWN_TOPIC_OR_PARTITION) => {
                    if tokio::time::Instant::now() >= unknown_deadline {
                        return Err(KafkaError::Unsupported(format!(
                            "topic {name:?} does not exist"
                        )));
                    }
                }
                // A topic being created (LEADER_NOT_AVAILABLE) settles quickly; others are final.
                Err(error) if error.is_retriable() => {}
                Err(error) => return Err(error),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(KafkaError::Timeout(format!(
                    "waiting for topic {name:?} to have leaders"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The group coordinator for `group`: its broker id, with a connection open to it.
    pub(crate) async fn coordinator(&mut self, group: &str) -> Result<i32, KafkaError> {
        let request = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(group.to_string()))
            .with_key_type(0);
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let (response, _) = self
                .any()
                .await?
                .call(&request, FIND_COORDINATOR_VERSION, Duration::ZERO)
                .await?;
            match KafkaError::check(response.error_code, || {
                format!("finding the coordinator of group {group:?}")
            }) {
                Ok(()) => {
                    let node = response.node_id.0;
                    self.brokers.insert(
                        node,
                        format!("{}:{}", response.host.as_str(), response.port),
                    );
                    self.broker(node).await?;
                    return Ok(node);
                }
                Err(error) if error.is_retriable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// ListOffsets for `partitions` of `topic` at `timestamp` ([`EARLIEST`], [`LATEST`] or
    /// milliseconds): each partition's offset, or `None` when no record is that recent.
    pub(crate) async fn list_offsets(
        &mut self,
        topic: &TopicMeta,
        partitions: &[i32],
        timestamp: i64,
    ) -> Result<HashMap<i32, Option<i64>>, KafkaError> {
        // One request per leader.
        let mut by_leader: HashMap<i32, Vec<i32>> = HashMap::new();
        for &partition in partitions {
            let meta = topic
                .partitions
                .iter()
                .find(|p| p.partition == partition)
                .ok_or_else(|| {
                    KafkaError::Unsupported(format!(
                        "topic {:?} has no partition {partition}",
                        topic.name
                    ))
                })?;
            by_leader.entry(meta.leader).or_default().push(partition);
        }
        let mut offsets = HashMap::new();
        for (leader, partitions) in by_leader {
            let request = ListOffsetsRequest::default()
                .with_replica_id(kafka_protocol::messages::BrokerId(-1))
                .with_topics(vec![
                    ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.name.clone())))
                        .with_partitions(
                            partitions
                                .iter()
                                .map(|&partition| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(partition)
                                        .with_current_leader_epoch(-1)
                                        .with_timestamp(timestamp)
                                })
                                .collect(),
                        ),
                ]);
            let (response, _) = self
                .broker(leader)
                .await?
                .call(&request, LIST_OFFSETS_VERSION, Duration::ZERO)
                .await?;
            for topic_response in &response.topics {
                for p in &topic_response.partitions {
                    KafkaError::check(p.error_code, || {
                        format!("ListOffsets for {}[{}]", topic.name, p.partition_index)
                    })?;
                    offsets.insert(p.partition_index, (p.offset >= 0).then_some(p.offset));
                }
            }
        }
        Ok(offsets)
    }
}
