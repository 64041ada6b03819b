//! One function per api: turns a decoded request into port calls and their results into the
//! response, at the request's version. Errors become codes only through [`KafkaError::code`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::StrBytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::fetch_response::{FetchReply, PartitionReply, RecordSet, TopicReply};
use super::metrics as kafka_metrics;
use super::port::*;
use super::server::KafkaLimits;

/// What a handler knows about its connection.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) peer: SocketAddr,
    pub(crate) limits: KafkaLimits,
    /// Turns true when the server stops, ending long polls early.
    pub(crate) stopping: watch::Receiver<bool>,
}

/// `resource_type` of a topic in DescribeConfigs and AlterConfigs.
const RESOURCE_TOPIC: i8 = 2;
/// `config_source` of a topic override and of a broker default.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
/// Kafka's "no error".
const NONE: i16 = 0;

fn text(value: &str) -> StrBytes {
    StrBytes::from_string(value.to_string())
}

fn code(result: &Result<impl Sized, KafkaError>) -> i16 {
    result.as_ref().err().map_or(NONE, KafkaError::code)
}

pub(crate) async fn metadata<B: KafkaBroker>(
    broker: &B,
    version: i16,
    request: MetadataRequest,
) -> MetadataResponse {
    // v0 has no null list: an empty one asks for every topic.
    let topics = request
        .topics
        .filter(|topics| version > 0 || !topics.is_empty());
    let topics = topics.map(|topics| {
        topics
            .into_iter()
            .filter_map(|topic| topic.name.map(|name| name.0.as_str().to_string()))
            .collect::<Vec<_>>()
    });
    // Before v4 there is no flag, and Kafka auto-creates.
    let auto_create = version < 4 || request.allow_auto_topic_creation;
    let cluster = broker.metadata(topics, auto_create).await;
    MetadataResponse::default()
        .with_cluster_id(Some(text(&cluster.cluster_id)))
        .with_controller_id(BrokerId(cluster.controller_id))
        .with_brokers(
            cluster
                .brokers
                .iter()
                .map(|node| {
                    metadata_response::MetadataResponseBroker::default()
                        .with_node_id(BrokerId(node.node_id))
                        .with_host(text(&node.host))
                        .with_port(node.port.into())
                })
                .collect(),
        )
        .with_topics(
            cluster
                .topics
                .into_iter()
                .map(|topic| {
                    let response = metadata_response::MetadataResponseTopic::default()
                        .with_name(Some(TopicName(text(&topic.name))))
                        .with_is_internal(topic.internal);
                    match topic.result {
                        Ok(partitions) => response.with_partitions(
                            partitions
                                .into_iter()
                                .map(|partition| {
                                    let ids = |ids: &[i32]| {
                                        ids.iter().map(|id| BrokerId(*id)).collect::<Vec<_>>()
                                    };
                                    metadata_response::MetadataResponsePartition::default()
                                        .with_partition_index(partition.partition as i32)
                                        .with_leader_id(BrokerId(partition.leader_id))
                                        .with_leader_epoch(partition.leader_epoch)
                                        .with_replica_nodes(ids(&partition.replicas))
                                        .with_isr_nodes(ids(&partition.in_sync_replicas))
                                })
                                .collect(),
                        ),
                        Err(error) => response.with_error_code(error.code()),
                    }
                })
                .collect(),
        )
}

/// Answers a Produce. The record sets are views of the request frame; each one the request
/// holds the last reference to is handed to the broker as is (see [`owned_records`]).
pub(crate) async fn produce<B: KafkaBroker>(
    broker: &B,
    mut request: ProduceRequest,
) -> ProduceResponse {
    let acks = match request.acks {
        0 => Some(Acks::None),
        1 => Some(Acks::Leader),
        -1 => Some(Acks::AllInSync),
        _ => None,
    };
    let request_acks = request.acks;
    let transactional = request.transactional_id.is_some();
    let topic_data = std::mem::take(&mut request.topic_data);
    // Everything else of the request (strings are views of the frame too) goes now.
    drop(request);
    let mut responses = Vec::with_capacity(topic_data.len());
    for mut topic in topic_data {
        let name = topic.name.0.as_str().to_string();
        let partition_data = std::mem::take(&mut topic.partition_data);
        drop(topic);
        let mut partitions = Vec::with_capacity(partition_data.len());
        for mut data in partition_data {
            let index = data.index;
            let records = data.records.take();
            drop(data);
            let result = match (acks, u32::try_from(index), records) {
                (None, _, _) => Err(KafkaError::InvalidRequest(format!(
                    "acks must be 0, 1 or -1, got {request_acks}"
                ))),
                _ if transactional => Err(KafkaError::TransactionsUnsupported),
                (_, Err(_), _) => Err(KafkaError::UnknownTopicOrPartition),
                (_, _, None) => Err(KafkaError::CorruptMessage("no records".into())),
                (Some(acks), Ok(partition), Some(records)) => {
                    let bytes = records.len();
                    let count = kafka_metrics::record_count(&records);
                    let records = owned_records(records);
                    let result = broker.produce(&name, partition, records, acks).await;
                    if result.is_ok() {
                        kafka_metrics::produced(bytes, count);
                    }
                    result
                }
            };
            let mut response = produce_response::PartitionProduceResponse::default()
                .with_index(index)
                .with_error_code(code(&result));
            match result {
                Ok(done) => {
                    response = response
                        .with_base_offset(done.base_offset)
                        .with_log_append_time_ms(done.log_append_time_ms)
                        .with_log_start_offset(done.log_start_offset);
                }
                Err(error) => {
                    kafka_metrics::partition_error("produce", error.code());
                    response = response
                        .with_base_offset(-1)
                        .with_log_append_time_ms(-1)
                        .with_log_start_offset(-1)
                        .with_error_message(Some(text(&error.to_string())));
                }
            }
            partitions.push(response);
        }
        responses.push(
            produce_response::TopicProduceResponse::default()
                .with_name(TopicName(text(&name)))
                .with_partition_responses(partitions),
        );
    }
    ProduceResponse::default().with_responses(responses)
}

/// A record set as a mutable buffer for the broker to stamp in place: the request frame's
/// own memory when nothing else refers to it (the connection reads each large request into
/// a buffer of its own, and the handler drops the rest of the request first), otherwise a
/// copy (a request with several record sets, whose later sets still share the frame).
fn owned_records(records: Bytes) -> BytesMut {
    records
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// Answers a Fetch with the record bytes read into `records` (the connection's read buffer,
/// reused across requests); the reply names ranges of it.
pub(crate) async fn fetch<B: KafkaBroker>(
    broker: &B,
    context: &Context,
    request: FetchRequest,
    records: &mut Vec<u8>,
) -> FetchReply {
    let wait =
        Duration::from_millis(request.max_wait_ms.max(0) as u64).min(context.limits.fetch_wait_max);
    let deadline = Instant::now() + wait;
    let min_bytes = request.min_bytes.max(0) as usize;
    let max_bytes = (request.max_bytes.max(0) as usize).min(context.limits.fetch_bytes_max);
    let mut stopping = context.stopping.clone();
    loop {
        // Registered before reading, so an append between the read and the wait is seen.
        let appended = broker.appended();
        let (reply, bytes) = fetch_once(broker, &request, max_bytes, records).await;
        let now = Instant::now();
        if bytes >= min_bytes.max(1) || now >= deadline || *stopping.borrow() {
            if bytes > 0 {
                for topic in &reply.topics {
                    for partition in &topic.partitions {
                        let batches = match &partition.records {
                            RecordSet::Buffer(range) => &records[range.clone()],
                            RecordSet::Shared(bytes) => &bytes[..],
                        };
                        if !batches.is_empty() {
                            kafka_metrics::fetched(
                                batches.len(),
                                kafka_metrics::record_count(batches),
                            );
                        }
                    }
                }
            }
            return reply;
        }
        tokio::select! {
            () = appended => {}
            () = tokio::time::sleep_until(deadline) => {}
            _ = stopping.changed() => {}
        }
    }
}

/// One pass over the requested partitions, reading into `records` from its start; returns
/// the reply and its record bytes.
async fn fetch_once<B: KafkaBroker>(
    broker: &B,
    request: &FetchRequest,
    max_bytes: usize,
    records: &mut Vec<u8>,
) -> (FetchReply, usize) {
    // Record bytes in the reply, and bytes of `records` used (shared batches are not in it).
    let (mut total, mut buffered) = (0usize, 0usize);
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in &request.topics {
        let name = topic.topic.0.as_str();
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for partition in &topic.partitions {
            let budget = (partition.partition_max_bytes.max(0) as usize)
                .min(max_bytes.saturating_sub(total));
            let mut data = PartitionReply {
                partition_index: partition.partition,
                error_code: 0,
                high_watermark: -1,
                last_stable_offset: -1,
                log_start_offset: -1,
                records: RecordSet::default(),
            };
            // Kafka returns at least one batch only for the first partition with data, so a
            // large batch never blocks a consumer; after the budget is spent, the others get
            // their offsets and no records.
            let read_bytes = if total == 0 { budget.max(1) } else { budget };
            let result = match u32::try_from(partition.partition) {
                Err(_) => Err(KafkaError::UnknownTopicOrPartition),
                Ok(index) => {
                    broker
                        .fetch(
                            name,
                            index,
                            partition.fetch_offset,
                            read_bytes,
                            records,
                            buffered,
                        )
                        .await
                }
            };
            match result {
                Ok(fetched) => {
                    // With no budget left the read still checks the offset and reports the
                    // partition's offsets, but its bytes are not sent.
                    if read_bytes > 0 {
                        data.records = match fetched.records {
                            FetchedRecords::InBuffer(len) => {
                                buffered += len;
                                RecordSet::Buffer(buffered - len..buffered)
                            }
                            FetchedRecords::Shared(bytes) => RecordSet::Shared(bytes),
                        };
                        total += data.records.len();
                    }
                    data.high_watermark = fetched.high_watermark;
                    data.last_stable_offset = fetched.high_watermark;
                    data.log_start_offset = fetched.log_start_offset;
                }
                Err(error) => {
                    kafka_metrics::partition_error("fetch", error.code());
                    data.error_code = error.code();
                }
            }
            partitions.push(data);
        }
        topics.push(TopicReply {
            name: name.to_string(),
            partitions,
        });
    }
    // Session id 0: no fetch session, so every request is a full one (KIP-227 allows it).
    (FetchReply { topics }, total)
}

pub(crate) async fn list_offsets<B: KafkaBroker>(
    broker: &B,
    request: ListOffsetsRequest,
) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.as_str().to_string();
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for partition in topic.partitions {
            let query = match partition.timestamp {
                -2 => Ok(OffsetQuery::Earliest),
                -1 => Ok(OffsetQuery::Latest),
                time if time >= 0 => Ok(OffsetQuery::Timestamp(time)),
                other => Err(KafkaError::InvalidRequest(format!(
                    "unsupported ListOffsets timestamp {other}"
                ))),
            };
            let result = match (query, u32::try_from(partition.partition_index)) {
                (Err(error), _) => Err(error),
                (_, Err(_)) => Err(KafkaError::UnknownTopicOrPartition),
                (Ok(query), Ok(index)) => broker.list_offset(&name, index, query).await,
            };
            let response = list_offsets_response::ListOffsetsPartitionResponse::default()
                .with_partition_index(partition.partition_index)
                .with_error_code(code(&result));
            let (offset, timestamp) = result.unwrap_or((-1, -1));
            partitions.push(
                response
                    .with_offset(offset)
                    .with_timestamp(timestamp)
                    .with_leader_epoch(-1),
            );
        }
        topics.push(
            list_offsets_response::ListOffsetsTopicResponse::default()
                .with_name(TopicName(text(&name)))
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

pub(crate) async fn create_topics<B: KafkaBroker>(
    broker: &B,
    request: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let name = topic.name.0.as_str().to_string();
        let configs: BTreeMap<String, String> = topic
            .configs
            .iter()
            .filter_map(|config| {
                Some((
                    config.name.as_str().to_string(),
                    config.value.as_ref()?.as_str().to_string(),
                ))
            })
            .collect();
        let spec = if !topic.assignments.is_empty() {
            Err(KafkaError::InvalidRequest(
                "manual replica assignments are not supported".into(),
            ))
        } else {
            Ok(NewTopic {
                name: name.clone(),
                partitions: u32::try_from(topic.num_partitions).ok(),
                replication_factor: u16::try_from(topic.replication_factor).ok(),
                configs,
            })
        };
        let result = match spec {
            Ok(spec) if topic.num_partitions == 0 || topic.num_partitions < -1 => {
                let _ = spec;
                Err(KafkaError::InvalidPartitions(format!(
                    "{} partitions",
                    topic.num_partitions
                )))
            }
            Ok(spec) => broker.create_topic(spec, request.validate_only).await,
            Err(error) => Err(error),
        };
        let mut response = create_topics_response::CreatableTopicResult::default()
            .with_name(TopicName(text(&name)))
            .with_error_code(code(&result));
        match result {
            Ok((partitions, replication)) => {
                response = response
                    .with_num_partitions(partitions as i32)
                    .with_replication_factor(replication as i16);
            }
            Err(error) => {
                response = response
                    .with_num_partitions(-1)
                    .with_replication_factor(-1)
                    .with_error_message(Some(text(&error.to_string())));
            }
        }
        results.push(response);
    }
    CreateTopicsResponse::default().with_topics(results)
}

pub(crate) async fn delete_topics<B: KafkaBroker>(
    broker: &B,
    request: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let mut names: Vec<String> = request
        .topic_names
        .iter()
        .map(|name| name.0.as_str().to_string())
        .collect();
    names.extend(
        request
            .topics
            .iter()
            .filter_map(|topic| topic.name.as_ref().map(|name| name.0.as_str().to_string())),
    );
    let mut responses = Vec::with_capacity(names.len());
    for name in names {
        let result = broker.delete_topic(&name).await;
        responses.push(
            delete_topics_response::DeletableTopicResult::default()
                .with_name(Some(TopicName(text(&name))))
                .with_error_code(code(&result))
                .with_error_message(result.err().map(|error| text(&error.to_string()))),
        );
    }
    DeleteTopicsResponse::default().with_responses(responses)
}

pub(crate) fn describe_configs<B: KafkaBroker>(
    broker: &B,
    request: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let results = request
        .resources
        .into_iter()
        .map(|resource| {
            let result = describe_configs_response::DescribeConfigsResult::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            if resource.resource_type != RESOURCE_TOPIC {
                // Broker configs: none are exposed; an empty list is a valid answer.
                return result;
            }
            // Null: every config; a list, even empty, names the ones wanted.
            let wanted: Option<Vec<String>> = resource
                .configuration_keys
                .map(|keys| keys.iter().map(|key| key.as_str().to_string()).collect());
            match broker.describe_topic_config(resource.resource_name.as_str()) {
                Ok(entries) => result.with_configs(
                    entries
                        .into_iter()
                        .filter(|entry| {
                            wanted
                                .as_ref()
                                .is_none_or(|keys| keys.contains(&entry.name))
                        })
                        .map(|entry| {
                            describe_configs_response::DescribeConfigsResourceResult::default()
                                .with_name(text(&entry.name))
                                .with_value(Some(text(&entry.value)))
                                .with_config_source(if entry.is_topic_override {
                                    SOURCE_TOPIC
                                } else {
                                    SOURCE_DEFAULT
                                })
                        })
                        .collect(),
                ),
                Err(error) => result
                    .with_error_code(error.code())
                    .with_error_message(Some(text(&error.to_string()))),
            }
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

pub(crate) async fn alter_configs<B: KafkaBroker>(
    broker: &B,
    request: AlterConfigsRequest,
) -> AlterConfigsResponse {
    let mut responses = Vec::with_capacity(request.resources.len());
    for resource in request.resources {
        let changes = resource
            .configs
            .iter()
            .map(|config| match &config.value {
                Some(value) => {
                    ConfigChange::Set(config.name.as_str().to_string(), value.as_str().to_string())
                }
                None => ConfigChange::Delete(config.name.as_str().to_string()),
            })
            .collect();
        let result = alter(
            broker,
            resource.resource_type,
            resource.resource_name.as_str(),
            changes,
            false,
            request.validate_only,
        )
        .await;
        responses.push(
            alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name)
                .with_error_code(code(&result))
                .with_error_message(result.err().map(|error| text(&error.to_string()))),
        );
    }
    AlterConfigsResponse::default().with_responses(responses)
}

pub(crate) async fn incremental_alter_configs<B: KafkaBroker>(
    broker: &B,
    request: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut responses = Vec::with_capacity(request.resources.len());
    for resource in request.resources {
        let changes: Result<Vec<ConfigChange>, KafkaError> = resource
            .configs
            .iter()
            .map(|config| {
                let name = config.name.as_str().to_string();
                match (config.config_operation, &config.value) {
                    (0, Some(value)) => Ok(ConfigChange::Set(name, value.as_str().to_string())),
                    (1, _) => Ok(ConfigChange::Delete(name)),
                    (0, None) => Err(KafkaError::InvalidConfig(format!(
                        "{name}: no value to set"
                    ))),
                    _ => Err(KafkaError::InvalidConfig(format!(
                        "{name}: only SET and DELETE apply to Silt's topic configs"
                    ))),
                }
            })
            .collect();
        let result = match changes {
            Ok(changes) => {
                alter(
                    broker,
                    resource.resource_type,
                    resource.resource_name.as_str(),
                    changes,
                    true,
                    request.validate_only,
                )
                .await
            }
            Err(error) => Err(error),
        };
        responses.push(
            incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name)
                .with_error_code(code(&result))
                .with_error_message(result.err().map(|error| text(&error.to_string()))),
        );
    }
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

async fn alter<B: KafkaBroker>(
    broker: &B,
    resource_type: i8,
    name: &str,
    changes: Vec<ConfigChange>,
    incremental: bool,
    validate_only: bool,
) -> Result<(), KafkaError> {
    if resource_type != RESOURCE_TOPIC {
        return Err(KafkaError::InvalidRequest(
            "only topic configs can be altered".into(),
        ));
    }
    broker
        .alter_topic_config(name, changes, incremental, validate_only)
        .await
}

pub(crate) async fn init_producer_id<B: KafkaBroker>(
    broker: &B,
    request: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let transactional_id = request.transactional_id.map(|id| id.0.as_str().to_string());
    match broker.init_producer_id(transactional_id).await {
        Ok((producer_id, epoch)) => InitProducerIdResponse::default()
            .with_producer_id(ProducerId(producer_id))
            .with_producer_epoch(epoch),
        Err(error) => InitProducerIdResponse::default()
            .with_error_code(error.code())
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1),
    }
}

pub(crate) fn find_coordinator<B: KafkaBroker>(
    broker: &B,
    version: i16,
    request: FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    let node = broker.local_broker();
    // Key type 1 is a transaction coordinator: transactions are not supported.
    let error = (request.key_type != 0).then_some(KafkaError::CoordinatorNotAvailable);
    let error_code = error.as_ref().map_or(NONE, KafkaError::code);
    if version >= 4 {
        let coordinators = request
            .coordinator_keys
            .into_iter()
            .map(|key| {
                find_coordinator_response::Coordinator::default()
                    .with_key(key)
                    .with_node_id(BrokerId(node.node_id))
                    .with_host(text(&node.host))
                    .with_port(node.port.into())
                    .with_error_code(error_code)
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    FindCoordinatorResponse::default()
        .with_error_code(error_code)
        .with_node_id(BrokerId(node.node_id))
        .with_host(text(&node.host))
        .with_port(node.port.into())
}

pub(crate) async fn join_group<B: KafkaBroker>(
    broker: &B,
    context: &Context,
    client_id: &str,
    version: i16,
    request: JoinGroupRequest,
) -> JoinGroupResponse {
    let session_timeout = Duration::from_millis(request.session_timeout_ms.max(0) as u64);
    // Before v1 there is no rebalance timeout: the session timeout stands in for it.
    let rebalance_timeout = if request.rebalance_timeout_ms > 0 {
        Duration::from_millis(request.rebalance_timeout_ms as u64)
    } else {
        session_timeout
    };
    let result = broker
        .join_group(JoinGroup {
            group_id: request.group_id.0.as_str().to_string(),
            member_id: request.member_id.as_str().to_string(),
            group_instance_id: request.group_instance_id.map(|id| id.as_str().to_string()),
            client_id: client_id.to_string(),
            client_host: format!("/{}", context.peer.ip()),
            session_timeout,
            rebalance_timeout,
            protocol_type: request.protocol_type.as_str().to_string(),
            protocols: request
                .protocols
                .into_iter()
                .map(|protocol| (protocol.name.as_str().to_string(), protocol.metadata))
                .collect(),
            require_known_member_id: version >= 4,
        })
        .await;
    JoinGroupResponse::default()
        .with_error_code(result.error.as_ref().map_or(NONE, KafkaError::code))
        .with_generation_id(result.generation_id)
        .with_protocol_type(Some(text(&result.protocol_type)))
        .with_protocol_name(Some(text(&result.protocol_name)))
        .with_leader(text(&result.leader_id))
        .with_member_id(text(&result.member_id))
        .with_members(
            result
                .members
                .into_iter()
                .map(|member| {
                    join_group_response::JoinGroupResponseMember::default()
                        .with_member_id(text(&member.member_id))
                        .with_group_instance_id(member.group_instance_id.map(|id| text(&id)))
                        .with_metadata(member.metadata)
                })
                .collect(),
        )
}

pub(crate) async fn sync_group<B: KafkaBroker>(
    broker: &B,
    request: SyncGroupRequest,
) -> SyncGroupResponse {
    let result = broker
        .sync_group(SyncGroup {
            group_id: request.group_id.0.as_str().to_string(),
            generation_id: request.generation_id,
            member_id: request.member_id.as_str().to_string(),
            assignments: request
                .assignments
                .into_iter()
                .map(|assignment| {
                    (
                        assignment.member_id.as_str().to_string(),
                        assignment.assignment,
                    )
                })
                .collect(),
        })
        .await;
    match result {
        Ok(sync) => SyncGroupResponse::default()
            .with_protocol_type(Some(text(&sync.protocol_type)))
            .with_protocol_name(Some(text(&sync.protocol_name)))
            .with_assignment(sync.assignment),
        Err(error) => SyncGroupResponse::default().with_error_code(error.code()),
    }
}

pub(crate) fn heartbeat<B: KafkaBroker>(
    broker: &B,
    request: HeartbeatRequest,
) -> HeartbeatResponse {
    let result = broker.heartbeat(
        request.group_id.0.as_str(),
        request.generation_id,
        request.member_id.as_str(),
    );
    HeartbeatResponse::default().with_error_code(code(&result))
}

pub(crate) fn leave_group<B: KafkaBroker>(
    broker: &B,
    version: i16,
    request: LeaveGroupRequest,
) -> LeaveGroupResponse {
    let group_id = request.group_id.0.as_str();
    if version < 3 {
        let results = broker.leave_group(group_id, vec![request.member_id.as_str().to_string()]);
        let error = results.first().map_or(NONE, code);
        return LeaveGroupResponse::default().with_error_code(error);
    }
    let members: Vec<String> = request
        .members
        .iter()
        .map(|member| member.member_id.as_str().to_string())
        .collect();
    let results = broker.leave_group(group_id, members);
    LeaveGroupResponse::default().with_members(
        request
            .members
            .into_iter()
            .zip(results)
            .map(|(member, result)| {
                leave_group_response::MemberResponse::default()
                    .with_member_id(member.member_id)
                    .with_group_instance_id(member.group_instance_id)
                    .with_error_code(code(&result))
            })
            .collect(),
    )
}

pub(crate) async fn offset_commit<B: KafkaBroker>(
    broker: &B,
    request: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let mut offsets = Vec::new();
    let mut shape: Vec<(TopicName, Vec<i32>)> = Vec::new();
    for topic in &request.topics {
        let name = topic.name.0.as_str().to_string();
        let mut indexes = Vec::new();
        for partition in &topic.partitions {
            indexes.push(partition.partition_index);
            offsets.push((
                name.clone(),
                // A negative index names no partition: u32::MAX is none either.
                u32::try_from(partition.partition_index).unwrap_or(u32::MAX),
                CommittedOffset {
                    offset: partition.committed_offset,
                    leader_epoch: partition.committed_leader_epoch,
                    metadata: partition
                        .committed_metadata
                        .as_ref()
                        .map(|metadata| metadata.as_str().to_string()),
                },
            ));
        }
        shape.push((topic.name.clone(), indexes));
    }
    let mut results = broker
        .commit_offsets(OffsetCommit {
            group_id: request.group_id.0.as_str().to_string(),
            generation_id: request.generation_id_or_member_epoch,
            member_id: request.member_id.as_str().to_string(),
            offsets,
        })
        .await
        .into_iter();
    OffsetCommitResponse::default().with_topics(
        shape
            .into_iter()
            .map(|(name, indexes)| {
                offset_commit_response::OffsetCommitResponseTopic::default()
                    .with_name(name)
                    .with_partitions(
                        indexes
                            .into_iter()
                            .map(|index| {
                                let result = results
                                    .next()
                                    .unwrap_or(Err(KafkaError::UnknownTopicOrPartition));
                                offset_commit_response::OffsetCommitResponsePartition::default()
                                    .with_partition_index(index)
                                    .with_error_code(code(&result))
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

pub(crate) fn offset_fetch<B: KafkaBroker>(
    broker: &B,
    request: OffsetFetchRequest,
) -> OffsetFetchResponse {
    let partitions = request.topics.map(|topics| {
        topics
            .iter()
            .flat_map(|topic| {
                topic.partition_indexes.iter().map(|index| {
                    let index = u32::try_from(*index).unwrap_or(u32::MAX);
                    (topic.name.0.as_str().to_string(), index)
                })
            })
            .collect::<Vec<_>>()
    });
    let offsets = broker.fetch_offsets(request.group_id.0.as_str(), partitions);
    let mut topics: BTreeMap<String, Vec<offset_fetch_response::OffsetFetchResponsePartition>> =
        BTreeMap::new();
    for (topic, partition, committed) in offsets {
        let entry = offset_fetch_response::OffsetFetchResponsePartition::default()
            .with_partition_index(partition as i32);
        let entry = match committed {
            Some(committed) => entry
                .with_committed_offset(committed.offset)
                .with_committed_leader_epoch(committed.leader_epoch)
                .with_metadata(Some(text(committed.metadata.as_deref().unwrap_or("")))),
            None => entry
                .with_committed_offset(-1)
                .with_committed_leader_epoch(-1)
                .with_metadata(Some(text(""))),
        };
        topics.entry(topic).or_default().push(entry);
    }
    OffsetFetchResponse::default().with_topics(
        topics
            .into_iter()
            .map(|(name, partitions)| {
                offset_fetch_response::OffsetFetchResponseTopic::default()
                    .with_name(TopicName(text(&name)))
                    .with_partitions(partitions)
            })
            .collect(),
    )
}

pub(crate) fn list_groups<B: KafkaBroker>(
    broker: &B,
    request: ListGroupsRequest,
) -> ListGroupsResponse {
    let states: Vec<String> = request
        .states_filter
        .iter()
        .map(|state| state.as_str().to_ascii_lowercase())
        .collect();
    ListGroupsResponse::default().with_groups(
        broker
            .list_groups()
            .into_iter()
            .filter(|group| states.is_empty() || states.contains(&group.state.to_ascii_lowercase()))
            .map(|group| {
                list_groups_response::ListedGroup::default()
                    .with_group_id(GroupId(text(&group.group_id)))
                    .with_protocol_type(text(&group.protocol_type))
                    .with_group_state(text(&group.state))
                    .with_group_type(text("classic"))
            })
            .collect(),
    )
}

pub(crate) fn describe_groups<B: KafkaBroker>(
    broker: &B,
    request: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    DescribeGroupsResponse::default().with_groups(
        request
            .groups
            .iter()
            .map(|group_id| {
                let group = broker.describe_group(group_id.0.as_str());
                describe_groups_response::DescribedGroup::default()
                    .with_group_id(group_id.clone())
                    .with_group_state(text(&group.state))
                    .with_protocol_type(text(&group.protocol_type))
                    .with_protocol_data(text(&group.protocol_name))
                    .with_members(
                        group
                            .members
                            .into_iter()
                            .map(|member| {
                                describe_groups_response::DescribedGroupMember::default()
                                    .with_member_id(text(&member.member_id))
                                    .with_group_instance_id(
                                        member.group_instance_id.map(|id| text(&id)),
                                    )
                                    .with_client_id(text(&member.client_id))
                                    .with_client_host(text(&member.client_host))
                                    .with_member_metadata(member.metadata)
                                    .with_member_assignment(member.assignment)
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use kafka_protocol::protocol::{Decodable, Encodable};

    use super::*;

    /// A record set decoded from a frame nothing else holds is handed over in place: the
    /// mutable buffer the broker stamps is the frame's own memory, not a copy.
    #[test]
    fn a_record_set_alone_in_its_frame_is_not_copied() {
        let request = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![
                produce_request::TopicProduceData::default()
                    .with_name(TopicName(text("t")))
                    .with_partition_data(vec![
                        produce_request::PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(Bytes::from(vec![7u8; 100_000]))),
                    ]),
            ]);
        let mut frame = BytesMut::new();
        request.encode(&mut frame, 9).unwrap();
        let memory = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        let mut decoded = ProduceRequest::decode(&mut frame, 9).unwrap();
        drop(frame);
        let mut topic = decoded.topic_data.pop().unwrap();
        drop(decoded);
        let mut data = topic.partition_data.pop().unwrap();
        drop(topic);
        let records = data.records.take().unwrap();
        drop(data);
        let owned = owned_records(records);
        assert_eq!(owned.len(), 100_000);
        assert!(
            memory.contains(&(owned.as_ptr() as usize)),
            "the records were copied"
        );

        // While another view of the frame lives, the broker gets a copy.
        let mut frame = BytesMut::new();
        frame.put_slice(&[1, 2, 3, 4]);
        let frame = frame.freeze();
        let view = frame.slice(1..3);
        let copied = owned_records(view);
        assert_eq!(&copied[..], &[2, 3]);
        assert_ne!(copied.as_ptr(), frame[1..].as_ptr());
    }
}
