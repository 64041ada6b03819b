//! Partition leadership on this node: each partition's role (leader or follower) and its
//! leader epoch. The one place roles and epochs are decided; every path that appends as a
//! leader (Produce, the uplink) asks it for the epoch to stamp into its batches, and
//! Metadata reports the same epoch.
//!
//! One node today: a partition first seen here is led by this node at epoch 0, as the only
//! node of its cluster. The cluster's metadata will set roles and epochs here instead.

use std::collections::HashMap;
use std::sync::Mutex;

/// A partition's role on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Takes appends; `epoch` is stamped into the batches it appends.
    Leader { epoch: i32 },
    /// Copies from `leader`; refuses appends (NOT_LEADER_OR_FOLLOWER on Produce). No
    /// partition is a follower until replication arrives.
    #[allow(dead_code)]
    Follower { leader: i32, epoch: i32 },
}

/// An append refused because this node does not lead the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this node does not lead the partition (leader {leader}, epoch {epoch})")]
pub(crate) struct NotLeader {
    pub(crate) leader: i32,
    pub(crate) epoch: i32,
}

/// The roles of the partitions this node has seen.
#[derive(Debug, Default)]
pub(crate) struct Leadership {
    roles: Mutex<HashMap<(String, u32), Role>>,
}

impl Leadership {
    /// This partition's role; a partition first seen here is led by this node at epoch 0.
    pub(crate) fn role(&self, topic: &str, partition: u32) -> Role {
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        *roles
            .entry((topic.to_string(), partition))
            .or_insert(Role::Leader { epoch: 0 })
    }

    /// The leader epoch an append to this partition stamps into its batches, or why this
    /// node may not append to it.
    pub(crate) fn leader_epoch(&self, topic: &str, partition: u32) -> Result<i32, NotLeader> {
        match self.role(topic, partition) {
            Role::Leader { epoch } => Ok(epoch),
            Role::Follower { leader, epoch } => Err(NotLeader { leader, epoch }),
        }
    }

    /// Sets a partition's role (what the cluster's metadata will do).
    #[cfg(test)]
    pub(crate) fn set_role(&self, topic: &str, partition: u32, role: Role) {
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        roles.insert((topic.to_string(), partition), role);
    }

    /// Forgets a deleted topic's partitions: a topic made again under the name starts over.
    pub(crate) fn forget_topic(&self, topic: &str) {
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        roles.retain(|(name, _), _| name != topic);
    }
}
