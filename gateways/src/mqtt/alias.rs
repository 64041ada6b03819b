//! MQTT 5.0 topic aliases (§3.3.2.3.4) in both directions, as plain state.
//!
//! Inbound, the client may set an alias with a topic and later send only the alias; the broker
//! announced how many it accepts (Topic Alias Maximum in CONNACK). Outbound, the broker may use
//! up to the client's Topic Alias Maximum; it assigns aliases to the first topics it sends and
//! keeps them for the connection (no eviction), which is simple and always correct.
//! Aliases live for one network connection only and are never part of a session.

use std::collections::HashMap;

use super::reason;
use super::topic::{TopicError, TopicName};

/// 0x94: Topic Alias invalid.
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;

/// A topic alias the client got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    #[error("topic alias {alias} is outside 1..={max}")]
    OutOfRange { alias: u16, max: u16 },
    #[error("topic alias {0} was never set on this connection")]
    Unknown(u16),
    #[error("a PUBLISH needs a topic name or a topic alias")]
    Missing,
    #[error(transparent)]
    Topic(#[from] TopicError),
}

impl AliasError {
    /// The MQTT 5.0 reason code to disconnect with.
    pub fn reason_code(&self) -> u8 {
        match self {
            AliasError::OutOfRange { .. } => TOPIC_ALIAS_INVALID,
            AliasError::Unknown(_) | AliasError::Missing => reason::PROTOCOL_ERROR,
            AliasError::Topic(error) => error.reason_code(),
        }
    }
}

/// Aliases the client set, up to the maximum the broker announced.
#[derive(Debug, Clone, Default)]
pub struct InboundAliases {
    max: u16,
    topics: HashMap<u16, TopicName>,
}

impl InboundAliases {
    /// `max` is the Topic Alias Maximum the broker sent in CONNACK; 0 refuses every alias.
    pub fn new(max: u16) -> Self {
        InboundAliases {
            max,
            topics: HashMap::new(),
        }
    }

    /// The topic of a PUBLISH with topic name `topic` (possibly empty) and an optional alias,
    /// recording a new or changed alias.
    pub fn resolve(&mut self, topic: &str, alias: Option<u16>) -> Result<TopicName, AliasError> {
        let Some(alias) = alias else {
            if topic.is_empty() {
                return Err(AliasError::Missing);
            }
            return Ok(TopicName::new(topic)?);
        };
        if alias == 0 || alias > self.max {
            return Err(AliasError::OutOfRange {
                alias,
                max: self.max,
            });
        }
        if topic.is_empty() {
            return self
                .topics
                .get(&alias)
                .cloned()
                .ok_or(AliasError::Unknown(alias));
        }
        let name = TopicName::new(topic)?;
        self.topics.insert(alias, name.clone());
        Ok(name)
    }
}

/// How to name the topic of one outbound PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundTopic {
    /// Send the topic name, no alias.
    Name,
    /// Send the topic name with this new alias.
    NameAndAlias(u16),
    /// Send an empty topic name with this alias.
    Alias(u16),
}

/// Aliases the broker uses towards the client, up to the client's maximum.
#[derive(Debug, Clone, Default)]
pub struct OutboundAliases {
    max: u16,
    aliases: HashMap<TopicName, u16>,
}

impl OutboundAliases {
    /// `max` is the Topic Alias Maximum the client sent in CONNECT; 0 means none.
    pub fn new(max: u16) -> Self {
        OutboundAliases {
            max,
            aliases: HashMap::new(),
        }
    }

    pub fn topic_for(&mut self, topic: &TopicName) -> OutboundTopic {
        if let Some(&alias) = self.aliases.get(topic) {
            return OutboundTopic::Alias(alias);
        }
        if self.aliases.len() >= usize::from(self.max) {
            return OutboundTopic::Name;
        }
        let alias = self.aliases.len() as u16 + 1;
        self.aliases.insert(topic.clone(), alias);
        OutboundTopic::NameAndAlias(alias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_aliases_set_use_and_change() {
        let mut aliases = InboundAliases::new(2);
        assert_eq!(aliases.resolve("a/b", Some(1)).unwrap().as_str(), "a/b");
        assert_eq!(aliases.resolve("", Some(1)).unwrap().as_str(), "a/b");
        assert_eq!(aliases.resolve("c", Some(1)).unwrap().as_str(), "c");
        assert_eq!(aliases.resolve("", Some(1)).unwrap().as_str(), "c");
        assert_eq!(aliases.resolve("plain", None).unwrap().as_str(), "plain");
    }

    #[test]
    fn inbound_alias_errors_carry_reason_codes() {
        let mut aliases = InboundAliases::new(2);
        let error = aliases.resolve("a", Some(3)).unwrap_err();
        assert_eq!(error.reason_code(), TOPIC_ALIAS_INVALID);
        assert_eq!(
            aliases.resolve("a", Some(0)).unwrap_err().reason_code(),
            0x94
        );
        assert_eq!(aliases.resolve("", Some(2)), Err(AliasError::Unknown(2)));
        assert_eq!(aliases.resolve("", None).unwrap_err().reason_code(), 0x82);
        let wildcard = aliases.resolve("a/+", Some(1)).unwrap_err();
        assert_eq!(wildcard.reason_code(), 0x90);
        // With no aliases announced, every alias is out of range.
        let mut none = InboundAliases::new(0);
        assert_eq!(none.resolve("a", Some(1)).unwrap_err().reason_code(), 0x94);
    }

    #[test]
    fn outbound_aliases_fill_up_then_fall_back_to_names() {
        let mut aliases = OutboundAliases::new(2);
        let topic = |name: &str| TopicName::new(name).unwrap();
        assert_eq!(
            aliases.topic_for(&topic("a")),
            OutboundTopic::NameAndAlias(1)
        );
        assert_eq!(
            aliases.topic_for(&topic("b")),
            OutboundTopic::NameAndAlias(2)
        );
        assert_eq!(aliases.topic_for(&topic("a")), OutboundTopic::Alias(1));
        assert_eq!(aliases.topic_for(&topic("c")), OutboundTopic::Name);
        assert_eq!(
            OutboundAliases::new(0).topic_for(&topic("a")),
            OutboundTopic::Name
        );
    }
}
