//! A consumer-group member on Kafka's classic group protocol: join, the range assignor when
//! this member leads, sync, heartbeats, offset commits and leaving. Also the group reads that
//! `silt group` needs (list, describe, committed offsets).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, DescribeGroupsRequest,
    DescribeGroupsResponse, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest,
    ListGroupsRequest, OffsetCommitRequest, OffsetFetchRequest, SyncGroupRequest, TopicName,
    consumer_protocol_assignment::TopicPartition as AssignedTopic,
    join_group_request::JoinGroupRequestProtocol,
    leave_group_request::MemberIdentity,
    offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic},
    offset_fetch_request::OffsetFetchRequestTopic,
    sync_group_request::SyncGroupRequestAssignment,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::{Cluster, KafkaError};

const JOIN_GROUP_VERSION: i16 = 7;
const SYNC_GROUP_VERSION: i16 = 5;
const HEARTBEAT_VERSION: i16 = 4;
const LEAVE_GROUP_VERSION: i16 = 4;
const OFFSET_COMMIT_VERSION: i16 = 8;
/// OffsetFetch v8 moves to a list of groups.
const OFFSET_FETCH_VERSION: i16 = 7;
const LIST_GROUPS_VERSION: i16 = 4;
const DESCRIBE_GROUPS_VERSION: i16 = 5;
/// The embedded consumer protocol version this client writes.
const CONSUMER_PROTOCOL_VERSION: i16 = 0;

/// Kafka's consumer defaults.
const SESSION_TIMEOUT: Duration = Duration::from_secs(45);
const REBALANCE_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);

fn str_bytes(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

/// A joined member with its assignment for one generation.
#[derive(Debug)]
pub(crate) struct Member {
    group: String,
    topic: String,
    member_id: String,
    generation: i32,
    coordinator: i32,
    /// Partitions of `topic` assigned in this generation.
    pub(crate) assignment: Vec<i32>,
}

/// What a heartbeat said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Heartbeat {
    Ok,
    /// The group is rebalancing (or forgot us): rejoin.
    Rejoin,
}

impl Member {
    /// Joins `group` subscribed to `topic` and waits for this generation's assignment.
    pub(crate) async fn join(
        cluster: &mut Cluster,
        group: &str,
        topic: &str,
    ) -> Result<Member, KafkaError> {
        let mut member = Member {
            group: group.to_string(),
            topic: topic.to_string(),
            member_id: String::new(),
            generation: -1,
            coordinator: cluster.coordinator(group).await?,
            assignment: Vec::new(),
        };
        member.rejoin(cluster).await?;
        Ok(member)
    }

    /// Runs join and sync until a generation is complete.
    pub(crate) async fn rejoin(&mut self, cluster: &mut Cluster) -> Result<(), KafkaError> {
        let subscription = encode_subscription(&self.topic)?;
        let deadline = tokio::time::Instant::now() + REBALANCE_TIMEOUT * 2;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(KafkaError::Timeout(format!(
                    "joining group {:?}",
                    self.group
                )));
            }
            let request = JoinGroupRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group)))
                .with_session_timeout_ms(SESSION_TIMEOUT.as_millis() as i32)
                .with_rebalance_timeout_ms(REBALANCE_TIMEOUT.as_millis() as i32)
                .with_member_id(str_bytes(&self.member_id))
                .with_protocol_type(StrBytes::from_static_str("consumer"))
                .with_protocols(vec![
                    JoinGroupRequestProtocol::default()
                        .with_name(StrBytes::from_static_str("range"))
                        .with_metadata(subscription.clone()),
                ]);
            let connection = cluster.broker(self.coordinator).await?;
            let (join, _) = connection
                .call(&request, JOIN_GROUP_VERSION, REBALANCE_TIMEOUT)
                .await?;
            match ResponseError::try_from_code(join.error_code) {
                None => {}
                Some(ResponseError::MemberIdRequired) => {
                    self.member_id = join.member_id.as_str().to_string();
                    continue;
                }
                Some(ResponseError::UnknownMemberId) => {
                    self.member_id.clear();
                    continue;
                }
                Some(ResponseError::NotCoordinator | ResponseError::CoordinatorNotAvailable) => {
                    self.coordinator = cluster.coordinator(&self.group).await?;
                    continue;
                }
                Some(error) if error.is_retriable() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Some(_) => {
                    return Err(KafkaError::from_code(
                        join.error_code,
                        format!("joining group {:?}", self.group),
                    ));
                }
            }
            self.member_id = join.member_id.as_str().to_string();
            self.generation = join.generation_id;
            let assignments = if join.leader.as_str() == self.member_id {
                let partitions = cluster.topic(&self.topic, false).await?.partitions.len() as i32;
                let members: Vec<String> = join
                    .members
                    .iter()
                    .map(|member| member.member_id.as_str().to_string())
                    .collect();
                range_assign(&members, partitions)
                    .into_iter()
                    .map(|(member, partitions)| {
                        Ok(SyncGroupRequestAssignment::default()
                            .with_member_id(str_bytes(&member))
                            .with_assignment(encode_assignment(&self.topic, &partitions)?))
                    })
                    .collect::<Result<Vec<_>, KafkaError>>()?
            } else {
                Vec::new()
            };
            let request = SyncGroupRequest::default()
                .with_group_id(GroupId(str_bytes(&self.group)))
                .with_generation_id(self.generation)
                .with_member_id(str_bytes(&self.member_id))
                .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                .with_protocol_name(join.protocol_name.clone())
                .with_assignments(assignments);
            let connection = cluster.broker(self.coordinator).await?;
            let (sync, _) = connection
                .call(&request, SYNC_GROUP_VERSION, REBALANCE_TIMEOUT)
                .await?;
            match ResponseError::try_from_code(sync.error_code) {
                None => {
                    self.assignment = decode_assignment(&sync.assignment, &self.topic)?;
                    return Ok(());
                }
                Some(ResponseError::UnknownMemberId) => self.member_id.clear(),
                Some(error)
                    if error.is_retriable()
                        || matches!(
                            error,
                            ResponseError::RebalanceInProgress | ResponseError::IllegalGeneration
                        ) => {}
                Some(_) => {
                    return Err(KafkaError::from_code(
                        sync.error_code,
                        format!("syncing group {:?}", self.group),
                    ));
                }
            }
        }
    }

    /// Tells the coordinator this member is alive.
    pub(crate) async fn heartbeat(
        &mut self,
        cluster: &mut Cluster,
    ) -> Result<Heartbeat, KafkaError> {
        let request = HeartbeatRequest::default()
            .with_group_id(GroupId(str_bytes(&self.group)))
            .with_generation_id(self.generation)
            .with_member_id(str_bytes(&self.member_id));
        let (response, _) = cluster
            .broker(self.coordinator)
            .await?
            .call(&request, HEARTBEAT_VERSION, Duration::ZERO)
            .await?;
        match ResponseError::try_from_code(response.error_code) {
            None => Ok(Heartbeat::Ok),
            Some(ResponseError::RebalanceInProgress | ResponseError::IllegalGeneration) => {
                Ok(Heartbeat::Rejoin)
            }
            Some(ResponseError::UnknownMemberId) => {
                self.member_id.clear();
                Ok(Heartbeat::Rejoin)
            }
            Some(_) => Err(KafkaError::from_code(
                response.error_code,
                format!("heartbeat to group {:?}", self.group),
            )),
        }
    }

    /// Commits `offsets` (partition -> next offset to read) for this generation.
    pub(crate) async fn commit(
        &self,
        cluster: &mut Cluster,
        offsets: &BTreeMap<i32, i64>,
    ) -> Result<(), KafkaError> {
        commit_offsets(
            cluster,
            self.coordinator,
            &self.group,
            &self.topic,
            self.generation,
            &self.member_id,
            offsets,
        )
        .await
    }

    /// Leaves the group so the others rebalance at once instead of after the session timeout.
    pub(crate) async fn leave(self, cluster: &mut Cluster) -> Result<(), KafkaError> {
        let connection = cluster.broker(self.coordinator).await?;
        let version = connection.version::<LeaveGroupRequest>(LEAVE_GROUP_VERSION)?;
        let mut request =
            LeaveGroupRequest::default().with_group_id(GroupId(str_bytes(&self.group)));
        // Version 3 moved the member id into a list of members.
        if version >= 3 {
            request.members =
                vec![MemberIdentity::default().with_member_id(str_bytes(&self.member_id))];
        } else {
            request.member_id = str_bytes(&self.member_id);
        }
        let (response, _) = connection.call(&request, version, Duration::ZERO).await?;
        for member in &response.members {
            KafkaError::check(member.error_code, || {
                format!("leaving group {:?}", self.group)
            })?;
        }
        KafkaError::check(response.error_code, || {
            format!("leaving group {:?}", self.group)
        })
    }
}

/// Commits `offsets` for `group`; a generation of -1 with an empty member id is an admin
/// commit, which the coordinator accepts only while the group has no members.
pub(crate) async fn commit_offsets(
    cluster: &mut Cluster,
    coordinator: i32,
    group: &str,
    topic: &str,
    generation: i32,
    member_id: &str,
    offsets: &BTreeMap<i32, i64>,
) -> Result<(), KafkaError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let request = OffsetCommitRequest::default()
        .with_group_id(GroupId(str_bytes(group)))
        .with_generation_id_or_member_epoch(generation)
        .with_member_id(str_bytes(member_id))
        .with_retention_time_ms(-1)
        .with_topics(vec![
            OffsetCommitRequestTopic::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_partitions(
                    offsets
                        .iter()
                        .map(|(&partition, &offset)| {
                            OffsetCommitRequestPartition::default()
                                .with_partition_index(partition)
                                .with_committed_offset(offset)
                                .with_committed_leader_epoch(-1)
                        })
                        .collect(),
                ),
        ]);
    let (response, _) = cluster
        .broker(coordinator)
        .await?
        .call(&request, OFFSET_COMMIT_VERSION, Duration::ZERO)
        .await?;
    for topic_response in &response.topics {
        for partition in &topic_response.partitions {
            KafkaError::check(partition.error_code, || {
                format!(
                    "committing offsets of group {group:?} for {topic}[{}]",
                    partition.partition_index
                )
            })?;
        }
    }
    Ok(())
}

/// The committed offset of each of `partitions` of `topic` for `group`; `None` when the group
/// has committed none.
pub(crate) async fn committed(
    cluster: &mut Cluster,
    coordinator: i32,
    group: &str,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, Option<i64>>, KafkaError> {
    let request = OffsetFetchRequest::default()
        .with_group_id(GroupId(str_bytes(group)))
        .with_topics(Some(vec![
            OffsetFetchRequestTopic::default()
                .with_name(TopicName(str_bytes(topic)))
                .with_partition_indexes(partitions.to_vec()),
        ]));
    let (response, _) = cluster
        .broker(coordinator)
        .await?
        .call(&request, OFFSET_FETCH_VERSION, Duration::ZERO)
        .await?;
    KafkaError::check(response.error_code, || {
        format!("fetching offsets of group {group:?}")
    })?;
    let mut offsets = HashMap::new();
    for topic_response in &response.topics {
        for p in &topic_response.partitions {
            KafkaError::check(p.error_code, || {
                format!(
                    "fetching the offset of group {group:?} for {topic}[{}]",
                    p.partition_index
                )
            })?;
            offsets.insert(
                p.partition_index,
                (p.committed_offset >= 0).then_some(p.committed_offset),
            );
        }
    }
    Ok(offsets)
}

/// Every offset `group` has committed, as (topic, partition, offset).
pub(crate) async fn committed_all(
    cluster: &mut Cluster,
    coordinator: i32,
    group: &str,
) -> Result<Vec<(String, i32, i64)>, KafkaError> {
    let request = OffsetFetchRequest::default()
        .with_group_id(GroupId(str_bytes(group)))
        .with_topics(None);
    let (response, _) = cluster
        .broker(coordinator)
        .await?
        .call(&request, OFFSET_FETCH_VERSION, Duration::ZERO)
        .await?;
    KafkaError::check(response.error_code, || {
        format!("fetching offsets of group {group:?}")
    })?;
    let mut offsets = Vec::new();
    for topic in &response.topics {
        for p in &topic.partitions {
            if p.error_code == 0 && p.committed_offset >= 0 {
                offsets.push((
                    topic.name.0.as_str().to_string(),
                    p.partition_index,
                    p.committed_offset,
                ));
            }
        }
    }
    offsets.sort();
    Ok(offsets)
}

/// One group as ListGroups shows it.
#[derive(Debug)]
pub(crate) struct GroupListing {
    pub(crate) group: String,
    pub(crate) state: String,
}

/// Every group each broker coordinates.
pub(crate) async fn list(cluster: &mut Cluster) -> Result<Vec<GroupListing>, KafkaError> {
    cluster.metadata(Some(&[]), false).await?;
    let mut nodes: Vec<i32> = cluster.broker_ids();
    nodes.sort_unstable();
    let mut groups = Vec::new();
    for node in nodes {
        let (response, _) = cluster
            .broker(node)
            .await?
            .call(
                &ListGroupsRequest::default(),
                LIST_GROUPS_VERSION,
                Duration::ZERO,
            )
            .await?;
        KafkaError::check(response.error_code, || {
            format!("ListGroups on broker {node}")
        })?;
        groups.extend(response.groups.iter().map(|group| GroupListing {
            group: group.group_id.0.as_str().to_string(),
            state: group.group_state.as_str().to_string(),
        }));
    }
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    Ok(groups)
}

/// DescribeGroups for one group, from its coordinator.
pub(crate) async fn describe(
    cluster: &mut Cluster,
    coordinator: i32,
    group: &str,
) -> Result<DescribeGroupsResponse, KafkaError> {
    let request = DescribeGroupsRequest::default().with_groups(vec![GroupId(str_bytes(group))]);
    let (response, _) = cluster
        .broker(coordinator)
        .await?
        .call(&request, DESCRIBE_GROUPS_VERSION, Duration::ZERO)
        .await?;
    Ok(response)
}

/// Kafka's range assignor for one topic: members sorted by id, each takes a contiguous run, the
/// first `partitions % members` one extra.
pub(crate) fn range_assign(members: &[String], partitions: i32) -> BTreeMap<String, Vec<i32>> {
    let mut sorted: Vec<&String> = members.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut assignment = BTreeMap::new();
    let count = sorted.len() as i32;
    if count == 0 {
        return assignment;
    }
    let (per_member, extra) = (partitions / count, partitions % count);
    let mut next = 0;
    for (index, member) in sorted.into_iter().enumerate() {
        let take = per_member + i32::from((index as i32) < extra);
        assignment.insert(member.clone(), (next..next + take).collect());
        next += take;
    }
    assignment
}

/// The consumer protocol's embedded messages are a version, then the body at that version.
fn encode_versioned(message: &impl Encodable) -> Result<Bytes, KafkaError> {
    let mut out = BytesMut::new();
    out.put_i16(CONSUMER_PROTOCOL_VERSION);
    message
        .encode(&mut out, CONSUMER_PROTOCOL_VERSION)
        .map_err(|error| {
            KafkaError::Protocol(format!("cannot encode the consumer protocol: {error}"))
        })?;
    Ok(out.freeze())
}

fn encode_subscription(topic: &str) -> Result<Bytes, KafkaError> {
    encode_versioned(&ConsumerProtocolSubscription::default().with_topics(vec![str_bytes(topic)]))
}

fn encode_assignment(topic: &str, partitions: &[i32]) -> Result<Bytes, KafkaError> {
    encode_versioned(
        &ConsumerProtocolAssignment::default().with_assigned_partitions(vec![
            AssignedTopic::default()
                .with_topic(TopicName(str_bytes(topic)))
                .with_partitions(partitions.to_vec()),
        ]),
    )
}

/// Decodes an assignment (any consumer protocol version up to 3) and keeps `topic`'s
/// partitions. An empty assignment means none.
pub(crate) fn decode_assignment(bytes: &Bytes, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let Some(assignment) = decode_versioned::<ConsumerProtocolAssignment>(bytes)? else {
        return Ok(Vec::new());
    };
    let mut partitions: Vec<i32> = assignment
        .assigned_partitions
        .iter()
        .filter(|assigned| assigned.topic.0.as_str() == topic)
        .flat_map(|assigned| assigned.partitions.iter().copied())
        .collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Decodes an embedded consumer-protocol message; `None` for empty bytes.
pub(crate) fn decode_versioned<M: Decodable>(bytes: &Bytes) -> Result<Option<M>, KafkaError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let mut buf = bytes.clone();
    if buf.remaining() < 2 {
        return Err(KafkaError::Protocol(
            "consumer protocol data is too short".to_string(),
        ));
    }
    // Newer versions only add fields at the end, so decode them at the newest we know.
    let version = buf.get_i16().clamp(0, 3);
    M::decode(&mut buf, version)
        .map(Some)
        .map_err(|error| KafkaError::Protocol(format!("bad consumer protocol data: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_assignment_matches_kafkas() {
        let members = vec!["b".to_string(), "a".to_string()];
        let assignment = range_assign(&members, 5);
        assert_eq!(assignment["a"], [0, 1, 2]);
        assert_eq!(assignment["b"], [3, 4]);
        let assignment = range_assign(&members, 1);
        assert_eq!(assignment["a"], [0]);
        assert!(assignment["b"].is_empty());
    }

    #[test]
    fn assignments_round_trip_and_bad_bytes_are_errors() {
        let bytes = encode_assignment("t", &[2, 0]).unwrap();
        assert_eq!(decode_assignment(&bytes, "t").unwrap(), [0, 2]);
        assert!(decode_assignment(&bytes, "other").unwrap().is_empty());
        assert!(decode_assignment(&Bytes::new(), "t").unwrap().is_empty());
        assert!(decode_assignment(&Bytes::from_static(&[0, 0, 0, 0, 0, 9]), "t").is_err());
    }
}
