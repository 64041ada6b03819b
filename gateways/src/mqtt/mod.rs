//! The MQTT 3.1.1 / 5.0 broker: topics, subscriptions and ingest routes, as pure code that
//! sockets and the log plug into.
//!
//! Everything here is sans-IO: no sockets, no clock, no log. Errors carry the MQTT 5.0 reason
//! code a gateway answers with (`reason_code()`), whose values are named in [`reason`].

pub mod alias;
pub mod auth;
pub mod codec;
pub mod ingest;
pub mod qos;
pub mod route;
pub mod server;
pub mod store;
pub mod subscriptions;
pub mod topic;

pub use alias::{AliasError, InboundAliases, OutboundAliases, OutboundTopic};
pub use auth::{AclRules, AuthError, Identity, PasswordFile, hash_password_line};
pub use codec::{
    CodecError, ConnackRefusal, Decoder, Frame, Malformation, ProtocolVersion, ProtocolViolation,
    detect_protocol, frame_bytes_needed, write_v5_disconnect,
};
pub use ingest::{IngestRecord, PublishMeta, ingest_record};
pub use qos::{Inbound, InboundAck, InboundAction, Outbound, QosError, Resend};
pub use route::{KeyTemplate, Route, RouteError, RouteSpec, RouteTable, TemplateError};
pub use subscriptions::{
    Delivery, QoS, RetainHandling, SubscribeOutcome, SubscriptionError, SubscriptionId,
    SubscriptionLimits, SubscriptionOptions, SubscriptionStore,
};
pub use topic::{
    FilterSupport, SharedFilter, SubscriptionFilter, TopicError, TopicFault, TopicFilter, TopicName,
};

/// MQTT 5.0 reason codes (§2.4) that the errors of this module map to.
pub mod reason {
    /// 0x82: Protocol Error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// 0x8F: Topic Filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// 0x90: Topic Name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// 0x97: Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// 0x9E: Shared Subscriptions not supported.
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    /// 0xA2: Wildcard Subscriptions not supported.
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}
