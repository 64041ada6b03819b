//! The consumer group coordinator (Kafka's classic protocol): members join, the coordinator
//! picks a protocol and a leader and bumps the generation, the leader's assignment is handed
//! out by SyncGroup, and heartbeats keep members in. A member that leaves, or whose session
//! times out, or a new member that joins, starts a rebalance.
//!
//! Group state is in memory, under one lock; waiting JoinGroup and SyncGroup calls are
//! oneshot channels answered when the rebalance moves on. Time comes in as `now` arguments
//! (the node's ticker calls [`Coordinator::tick`]), so the transitions can be driven by tests
//! without sleeping. Committed offsets are not here: see `offsets.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use silt_gateways::kafka::{
    GroupDescription, GroupListing, GroupMemberDescription, JoinGroup, JoinResult, JoinedMember,
    KafkaError, SyncGroup, SyncResult,
};
use tokio::sync::oneshot;

/// Session timeouts accepted, as Kafka's `group.min/max.session.timeout.ms`.
const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(6);
const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(1800);
/// Most members in one group, as Kafka's `group.max.size` (a bound on memory per group).
const GROUP_MEMBERS_MAX: usize = 1000;
/// Longest group id accepted.
const GROUP_ID_BYTES_MAX: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

#[derive(Debug)]
struct Member {
    group_instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heard: Instant,
    join_waiter: Option<oneshot::Sender<JoinResult>>,
    sync_waiter: Option<oneshot::Sender<Result<SyncResult, KafkaError>>>,
}

#[derive(Debug)]
struct Group {
    state: State,
    generation: i32,
    protocol_type: String,
    protocol_name: String,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// Member ids handed out with MEMBER_ID_REQUIRED and not joined yet, with when they
    /// expire (a session timeout later, as in Kafka).
    pending: HashMap<String, Instant>,
    /// When a rebalance in progress completes whatever members have not rejoined.
    rebalance_deadline: Instant,
    /// A rebalance of a group that was empty waits this long for more members, as Kafka's
    /// `group.initial.rebalance.delay.ms`, so consumers starting together share one.
    initial_delay_until: Option<Instant>,
}

impl Group {
    fn new(now: Instant) -> Group {
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol_name: String::new(),
            leader: None,
            members: BTreeMap::new(),
            pending: HashMap::new(),
            rebalance_deadline: now,
            initial_delay_until: None,
        }
    }
}

/// The group coordinator of this node.
#[derive(Debug)]
pub(crate) struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
    initial_rebalance_delay: Duration,
    next_member: AtomicU64,
}

fn join_error(error: KafkaError, member_id: &str) -> JoinResult {
    JoinResult {
        error: Some(error),
        generation_id: -1,
        protocol_type: String::new(),
        protocol_name: String::new(),
        leader_id: String::new(),
        member_id: member_id.to_string(),
        members: Vec::new(),
    }
}

impl Coordinator {
    pub(crate) fn new(initial_rebalance_delay: Duration) -> Coordinator {
        Coordinator {
            groups: Mutex::new(HashMap::new()),
            initial_rebalance_delay,
            next_member: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_member_id(&self, client_id: &str) -> String {
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{client_id}-{nanos:x}-{n}")
    }

    /// Handles JoinGroup; the answer comes when the rebalance completes.
    pub(crate) async fn join(&self, request: JoinGroup, now: Instant) -> JoinResult {
        let receiver = match self.join_start(request, now) {
            Ok(receiver) => receiver,
            Err(result) => return *result,
        };
        // A dropped sender means the member was removed before the rebalance completed.
        receiver
            .await
            .unwrap_or_else(|_| join_error(KafkaError::UnknownMemberId, ""))
    }

    fn join_start(
        &self,
        request: JoinGroup,
        now: Instant,
    ) -> Result<oneshot::Receiver<JoinResult>, Box<JoinResult>> {
        if request.group_id.is_empty() || request.group_id.len() > GROUP_ID_BYTES_MAX {
            return Err(Box::new(join_error(
                KafkaError::InvalidGroupId,
                &request.member_id,
            )));
        }
        if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&request.session_timeout) {
            return Err(Box::new(join_error(
                KafkaError::InvalidSessionTimeout,
                &request.member_id,
            )));
        }
        if request.protocols.is_empty() || request.protocol_type.is_empty() {
            return Err(Box::new(join_error(
                KafkaError::InconsistentGroupProtocol,
                &request.member_id,
            )));
        }
        let mut groups = self.lock();
        let group = groups
            .entry(request.group_id.clone())
            .or_insert_with(|| Group::new(now));
        let other_type = group
            .members
            .values()
            .any(|member| member.protocol_type != request.protocol_type);
        if other_type
            || !group.members.is_empty()
                && !group.members.values().all(|member| {
                    member
                        .protocols
                        .iter()
                        .any(|(name, _)| request.protocols.iter().any(|(n, _)| n == name))
                })
        {
            return Err(Box::new(join_error(
                KafkaError::InconsistentGroupProtocol,
                &request.member_id,
            )));
        }
        let member_id = if request.member_id.is_empty() {
            let member_id = self.new_member_id(&request.client_id);
            if request.require_known_member_id {
                if group.pending.len() + group.members.len() >= GROUP_MEMBERS_MAX {
                    return Err(Box::new(join_error(KafkaError::GroupMaxSizeReached, "")));
                }
                group
                    .pending
                    .insert(member_id.clone(), now + request.session_timeout);
                return Err(Box::new(join_error(
                    KafkaError::MemberIdRequired,
                    &member_id,
                )));
            }
            member_id
        } else {
            let known = group.members.contains_key(&request.member_id)
                || group.pending.remove(&request.member_id).is_some();
            if !known {
                return Err(Box::new(join_error(
                    KafkaError::UnknownMemberId,
                    &request.member_id,
                )));
            }
            request.member_id.clone()
        };
        if !group.members.contains_key(&member_id) && group.members.len() >= GROUP_MEMBERS_MAX {
            return Err(Box::new(join_error(
                KafkaError::GroupMaxSizeReached,
                &member_id,
            )));
        }
        let (sender, receiver) = oneshot::channel();
        let member = group
            .members
            .entry(member_id.clone())
            .or_insert_with(|| Member {
                group_instance_id: request.group_instance_id.clone(),
                client_id: request.client_id.clone(),
                client_host: request.client_host.clone(),
                session_timeout: request.session_timeout,
                rebalance_timeout: request.rebalance_timeout,
                protocol_type: request.protocol_type.clone(),
                protocols: Vec::new(),
                assignment: Bytes::new(),
                last_heard: now,
                join_waiter: None,
                sync_waiter: None,
            });
        member.protocols = request.protocols;
        member.protocol_type = request.protocol_type;
        member.session_timeout = request.session_timeout;
        member.rebalance_timeout = request.rebalance_timeout;
        member.last_heard = now;
        member.join_waiter = Some(sender);
        if group.state != State::PreparingRebalance {
            self.prepare_rebalance(group, now);
        }
        Self::maybe_complete_join(group, now);
        Ok(receiver)
    }

    fn prepare_rebalance(&self, group: &mut Group, now: Instant) {
        let was_empty = group.state == State::Empty;
        // Members waiting for an assignment of the generation that is being replaced must
        // rejoin.
        for member in group.members.values_mut() {
            if let Some(waiter) = member.sync_waiter.take() {
                let _ = waiter.send(Err(KafkaError::RebalanceInProgress));
            }
        }
        group.state = State::PreparingRebalance;
        let timeout = group
            .members
            .values()
            .map(|member| member.rebalance_timeout)
            .max()
            .unwrap_or_default();
        group.rebalance_deadline = now + timeout;
        group.initial_delay_until = was_empty.then(|| now + self.initial_rebalance_delay);
    }

    /// Completes the join phase once every member has rejoined (and any initial delay is
    /// over), or at the deadline without the members that did not.
    fn maybe_complete_join(group: &mut Group, now: Instant) {
        if group.state != State::PreparingRebalance {
            return;
        }
        let all_joined = group
            .members
            .values()
            .all(|member| member.join_waiter.is_some());
        let delay_over = group.initial_delay_until.is_none_or(|until| now >= until);
        if !(all_joined && delay_over || now >= group.rebalance_deadline) {
            return;
        }
        group
            .members
            .retain(|_, member| member.join_waiter.is_some());
        group.generation += 1;
        group.initial_delay_until = None;
        if group.members.is_empty() {
            group.state = State::Empty;
            group.leader = None;
            group.protocol_name.clear();
            return;
        }
        group.protocol_type = group
            .members
            .values()
            .next()
            .map(|member| member.protocol_type.clone())
            .unwrap_or_default();
        group.protocol_name = choose_protocol(&group.members);
        if group
            .leader
            .as_ref()
            .is_none_or(|leader| !group.members.contains_key(leader))
        {
            group.leader = group.members.keys().next().cloned();
        }
        let leader = group.leader.clone().unwrap_or_default();
        let everyone: Vec<JoinedMember> = group
            .members
            .iter()
            .map(|(id, member)| JoinedMember {
                member_id: id.clone(),
                group_instance_id: member.group_instance_id.clone(),
                metadata: member
                    .protocols
                    .iter()
                    .find(|(name, _)| *name == group.protocol_name)
                    .map(|(_, metadata)| metadata.clone())
                    .unwrap_or_default(),
            })
            .collect();
        group.state = State::CompletingRebalance;
        for (id, member) in group.members.iter_mut() {
            member.last_heard = now;
            member.assignment = Bytes::new();
            if let Some(waiter) = member.join_waiter.take() {
                let _ = waiter.send(JoinResult {
                    error: None,
                    generation_id: group.generation,
                    protocol_type: group.protocol_type.clone(),
                    protocol_name: group.protocol_name.clone(),
                    leader_id: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        everyone.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        }
    }

    /// Handles SyncGroup; followers wait for the leader's assignment.
    pub(crate) async fn sync(
        &self,
        request: SyncGroup,
        now: Instant,
    ) -> Result<SyncResult, KafkaError> {
        let receiver = {
            let mut groups = self.lock();
            let group = groups
                .get_mut(&request.group_id)
                .ok_or(KafkaError::UnknownMemberId)?;
            let Some(member) = group.members.get_mut(&request.member_id) else {
                return Err(KafkaError::UnknownMemberId);
            };
            if request.generation_id != group.generation {
                return Err(KafkaError::IllegalGeneration);
            }
            member.last_heard = now;
            match group.state {
                State::Empty | State::PreparingRebalance => {
                    return Err(KafkaError::RebalanceInProgress);
                }
                State::Stable => {
                    return Ok(SyncResult {
                        protocol_type: group.protocol_type.clone(),
                        protocol_name: group.protocol_name.clone(),
                        assignment: member.assignment.clone(),
                    });
                }
                State::CompletingRebalance => {}
            }
            let (sender, receiver) = oneshot::channel();
            member.sync_waiter = Some(sender);
            if group.leader.as_deref() == Some(request.member_id.as_str()) {
                let assignments: HashMap<String, Bytes> = request.assignments.into_iter().collect();
                group.state = State::Stable;
                for (id, member) in group.members.iter_mut() {
                    member.assignment = assignments.get(id).cloned().unwrap_or_default();
                    if let Some(waiter) = member.sync_waiter.take() {
                        let _ = waiter.send(Ok(SyncResult {
                            protocol_type: group.protocol_type.clone(),
                            protocol_name: group.protocol_name.clone(),
                            assignment: member.assignment.clone(),
                        }));
                    }
                }
            }
            receiver
        };
        receiver
            .await
            .unwrap_or(Err(KafkaError::RebalanceInProgress))
    }

    pub(crate) fn heartbeat(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
        now: Instant,
    ) -> Result<(), KafkaError> {
        let mut groups = self.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or(KafkaError::UnknownMemberId)?;
        let member = group
            .members
            .get_mut(member_id)
            .ok_or(KafkaError::UnknownMemberId)?;
        member.last_heard = now;
        if group.state == State::PreparingRebalance {
            return Err(KafkaError::RebalanceInProgress);
        }
        if generation_id != group.generation {
            return Err(KafkaError::IllegalGeneration);
        }
        Ok(())
    }

    pub(crate) fn leave(
        &self,
        group_id: &str,
        members: &[String],
        now: Instant,
    ) -> Vec<Result<(), KafkaError>> {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return members
                .iter()
                .map(|_| Err(KafkaError::UnknownMemberId))
                .collect();
        };
        let results = members
            .iter()
            .map(|id| match group.members.remove(id) {
                Some(member) => {
                    drop(member);
                    Ok(())
                }
                None => Err(KafkaError::UnknownMemberId),
            })
            .collect();
        self.after_removal(group, now);
        results
    }

    /// A member is gone: the others rebalance, or the group turns empty.
    fn after_removal(&self, group: &mut Group, now: Instant) {
        match group.state {
            State::Stable | State::CompletingRebalance => {
                self.prepare_rebalance(group, now);
                // Nobody has rejoined yet: the others learn of the rebalance from their
                // heartbeats, and it completes when they rejoin or at the deadline.
                if group.members.is_empty() {
                    Self::maybe_complete_join(group, now);
                }
            }
            State::PreparingRebalance => Self::maybe_complete_join(group, now),
            State::Empty => {}
        }
    }

    /// Expires silent members and completes rebalances whose time has come.
    pub(crate) fn tick(&self, now: Instant) {
        let mut groups = self.lock();
        for group in groups.values_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, member)| {
                    // A member waiting in JoinGroup is alive; the rebalance deadline bounds it.
                    member.join_waiter.is_none()
                        && now.duration_since(member.last_heard) > member.session_timeout
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                tracing::info!(member = %id, "consumer group member session expired");
                group.members.remove(id);
            }
            group.pending.retain(|_, expires| now < *expires);
            if !expired.is_empty() {
                self.after_removal(group, now);
            }
            Self::maybe_complete_join(group, now);
        }
        groups.retain(|_, group| {
            group.state != State::Empty || !group.members.is_empty() || !group.pending.is_empty()
        });
    }

    /// Whether a commit from `member_id` at `generation_id` is allowed now.
    pub(crate) fn check_commit(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
    ) -> Result<(), KafkaError> {
        // A commit from outside the group protocol (generation -1, no member) is always
        // allowed, as in Kafka.
        if generation_id < 0 && member_id.is_empty() {
            return Ok(());
        }
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return Err(KafkaError::UnknownMemberId);
        };
        if !group.members.contains_key(member_id) {
            return Err(KafkaError::UnknownMemberId);
        }
        // As Kafka: a member of the current generation may still commit while the group
        // prepares a rebalance (it commits what it consumed before giving its partitions
        // up), but not while the new generation's assignment is being handed out.
        if group.state == State::CompletingRebalance {
            return Err(KafkaError::RebalanceInProgress);
        }
        if generation_id != group.generation {
            return Err(KafkaError::IllegalGeneration);
        }
        Ok(())
    }

    /// Groups with members, plus `with_offsets` (groups that only have committed offsets).
    pub(crate) fn list(&self, with_offsets: Vec<String>) -> Vec<GroupListing> {
        let groups = self.lock();
        let mut listings: BTreeMap<String, GroupListing> = with_offsets
            .into_iter()
            .map(|id| {
                (
                    id.clone(),
                    GroupListing {
                        group_id: id,
                        protocol_type: "consumer".into(),
                        state: State::Empty.name().into(),
                    },
                )
            })
            .collect();
        for (id, group) in groups.iter() {
            listings.insert(
                id.clone(),
                GroupListing {
                    group_id: id.clone(),
                    protocol_type: if group.protocol_type.is_empty() {
                        "consumer".into()
                    } else {
                        group.protocol_type.clone()
                    },
                    state: group.state.name().into(),
                },
            );
        }
        listings.into_values().collect()
    }

    pub(crate) fn describe(&self, group_id: &str) -> GroupDescription {
        let groups = self.lock();
        let Some(group) = groups.get(group_id) else {
            return GroupDescription {
                group_id: group_id.to_string(),
                state: "Dead".into(),
                protocol_type: String::new(),
                protocol_name: String::new(),
                members: Vec::new(),
            };
        };
        GroupDescription {
            group_id: group_id.to_string(),
            state: group.state.name().into(),
            protocol_type: group.protocol_type.clone(),
            protocol_name: group.protocol_name.clone(),
            members: group
                .members
                .iter()
                .map(|(id, member)| GroupMemberDescription {
                    member_id: id.clone(),
                    group_instance_id: member.group_instance_id.clone(),
                    client_id: member.client_id.clone(),
                    client_host: member.client_host.clone(),
                    metadata: member
                        .protocols
                        .iter()
                        .find(|(name, _)| *name == group.protocol_name)
                        .map(|(_, metadata)| metadata.clone())
                        .unwrap_or_default(),
                    assignment: member.assignment.clone(),
                })
                .collect(),
        }
    }

    /// Counts of groups per state, for metrics.
    pub(crate) fn state_counts(&self) -> BTreeMap<&'static str, usize> {
        let groups = self.lock();
        let mut counts = BTreeMap::new();
        for group in groups.values() {
            *counts.entry(group.state.name()).or_default() += 1;
        }
        counts
    }
}

/// The protocol every member supports that gets the most votes (each member votes for its
/// first supported choice), ties broken by the first member's preference.
fn choose_protocol(members: &BTreeMap<String, Member>) -> String {
    let Some(first) = members.values().next() else {
        return String::new();
    };
    let candidates: Vec<&String> = first
        .protocols
        .iter()
        .map(|(name, _)| name)
        .filter(|name| {
            members
                .values()
                .all(|member| member.protocols.iter().any(|(n, _)| n == *name))
        })
        .collect();
    let mut votes: HashMap<&String, usize> = HashMap::new();
    for member in members.values() {
        if let Some((name, _)) = member
            .protocols
            .iter()
            .find(|(name, _)| candidates.contains(&name))
        {
            *votes.entry(name).or_default() += 1;
        }
    }
    candidates
        .iter()
        .max_by_key(|name| {
            (
                votes.get(*name).copied().unwrap_or(0),
                std::cmp::Reverse(candidates.iter().position(|c| c == *name)),
            )
        })
        .map(|name| (*name).clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(member_id: &str) -> JoinGroup {
        JoinGroup {
            group_id: "g".into(),
            member_id: member_id.into(),
            group_instance_id: None,
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(30),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"meta"))],
            require_known_member_id: true,
        }
    }

    /// Joins with a fresh member id (after MEMBER_ID_REQUIRED); the join waits.
    fn start_join(
        coordinator: &Coordinator,
        now: Instant,
    ) -> (String, oneshot::Receiver<JoinResult>) {
        let refused = *coordinator.join_start(join(""), now).unwrap_err();
        assert_eq!(refused.error, Some(KafkaError::MemberIdRequired));
        let member_id = refused.member_id;
        let receiver = coordinator.join_start(join(&member_id), now).unwrap();
        (member_id, receiver)
    }

    #[test]
    fn members_join_after_the_initial_delay_then_a_leave_rebalances() {
        let coordinator = Coordinator::new(Duration::from_secs(3));
        let t0 = Instant::now();
        let (a, mut a_join) = start_join(&coordinator, t0);
        let (b, mut b_join) = start_join(&coordinator, t0 + Duration::from_secs(1));
        coordinator.tick(t0 + Duration::from_secs(2));
        assert!(a_join.try_recv().is_err(), "still in the initial delay");
        coordinator.tick(t0 + Duration::from_secs(4));
        let a_result = a_join.try_recv().unwrap();
        let b_result = b_join.try_recv().unwrap();
        assert_eq!(a_result.generation_id, 1);
        assert_eq!(a_result.protocol_name, "range");
        let (leader, follower) = if a_result.leader_id == a {
            (a_result, b_result)
        } else {
            (b_result, a_result)
        };
        assert_eq!(leader.members.len(), 2);
        assert!(follower.members.is_empty());
        assert_eq!(
            coordinator.heartbeat("g", 1, &b, t0 + Duration::from_secs(5)),
            Ok(())
        );
        assert_eq!(
            coordinator.heartbeat("g", 0, &b, t0 + Duration::from_secs(5)),
            Err(KafkaError::IllegalGeneration)
        );

        // One leaves: the other hears of the rebalance by heartbeat and rejoins alone.
        let now = t0 + Duration::from_secs(6);
        assert_eq!(
            coordinator.leave("g", std::slice::from_ref(&a), now),
            vec![Ok(())]
        );
        assert_eq!(
            coordinator.heartbeat("g", 1, &b, now),
            Err(KafkaError::RebalanceInProgress)
        );
        let mut rejoin = coordinator.join_start(join(&b), now).unwrap();
        let result = rejoin.try_recv().unwrap();
        assert_eq!(result.generation_id, 2);
        assert_eq!(result.leader_id, b);
        assert_eq!(coordinator.describe("g").members.len(), 1);
    }

    #[test]
    fn a_silent_member_expires_and_an_empty_group_is_forgotten() {
        let coordinator = Coordinator::new(Duration::ZERO);
        let t0 = Instant::now();
        let (a, mut a_join) = start_join(&coordinator, t0);
        coordinator.tick(t0);
        assert_eq!(a_join.try_recv().unwrap().generation_id, 1);
        assert_eq!(coordinator.describe("g").state, "CompletingRebalance");
        coordinator.tick(t0 + Duration::from_secs(11));
        assert_eq!(
            coordinator.heartbeat("g", 1, &a, t0 + Duration::from_secs(11)),
            Err(KafkaError::UnknownMemberId)
        );
        assert_eq!(coordinator.describe("g").state, "Dead");
    }

    #[test]
    fn member_ids_handed_out_expire_unused() {
        let coordinator = Coordinator::new(Duration::ZERO);
        let t0 = Instant::now();
        let refused = *coordinator.join_start(join(""), t0).unwrap_err();
        assert_eq!(refused.error, Some(KafkaError::MemberIdRequired));
        coordinator.tick(t0 + Duration::from_secs(11));
        let late = *coordinator
            .join_start(join(&refused.member_id), t0 + Duration::from_secs(11))
            .unwrap_err();
        assert_eq!(late.error, Some(KafkaError::UnknownMemberId));
    }
}
