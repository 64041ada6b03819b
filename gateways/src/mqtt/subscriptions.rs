//! The subscription store: which clients and shared groups a published topic name reaches,
//! kept as a trie over topic levels.
//!
//! A subscription is keyed by (client id, [`SubscriptionFilter`]); subscribing again with the
//! same key replaces its options (3.1.1 §3.8.4, 5.0 §3.8.4). Matching a name walks the trie
//! level by level, following the literal child and the `+` child and collecting `#` entries
//! on the way, so its cost depends on the name and the filters that share its levels, never on
//! the number of unrelated filters.
//!
//! Matching yields, per 5.0 §3.3.4 (and 3.1.1 §3.3.5, which it satisfies):
//! - one [`Delivery`] per client with matching non-shared subscriptions, at the maximum QoS of
//!   those subscriptions and with all their subscription identifiers, skipping subscriptions
//!   with No Local set when the client is the publisher;
//! - one [`Delivery`] per matching shared group (`$share/{group}/{filter}`), to one member
//!   picked round robin, preferring members the caller says are eligible (connected).
//!
//! The trie lives in an arena (`Vec` of nodes with a free list): a filter with thousands of
//! levels neither recurses on drop nor on match, and pruned nodes are reused. Memory is bounded
//! by [`SubscriptionLimits`]: subscriptions per client, in total, and levels per filter.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;

use super::reason;
use super::topic::{
    LEVEL_SEPARATOR, MULTI_LEVEL_WILDCARD, SINGLE_LEVEL_WILDCARD, SubscriptionFilter, TopicFilter,
    TopicName,
};

/// The largest subscription identifier: a four-byte variable byte integer (5.0 §3.8.2.1.2).
pub const SUBSCRIPTION_ID_MAX: u32 = 268_435_455;

/// Default for [`SubscriptionLimits::per_client_max`].
pub const SUBSCRIPTIONS_PER_CLIENT_MAX: usize = 1_024;

/// Default for [`SubscriptionLimits::total_max`].
pub const SUBSCRIPTIONS_MAX: usize = 262_144;

/// Default for [`SubscriptionLimits::filter_levels_max`]. The spec sets no limit, but each
/// level of a filter is a trie node, so an unbounded depth would let one SUBSCRIBE of a
/// 64 KiB `/////...` filter create tens of thousands of nodes.
pub const FILTER_LEVELS_MAX: usize = 128;

/// Quality of service of a subscription or a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS with this wire value, if it is 0, 1 or 2.
    pub fn from_u8(value: u8) -> Option<QoS> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// When retained messages are sent for a new subscription (5.0 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RetainHandling {
    /// 0: at every subscribe (the only behaviour of 3.1.1).
    #[default]
    SendAtSubscribe = 0,
    /// 1: only when the subscription did not exist ([`SubscribeOutcome::Created`]).
    SendAtSubscribeIfNew = 1,
    /// 2: never.
    DoNotSend = 2,
}

impl RetainHandling {
    /// The option with this wire value, if it is 0, 1 or 2.
    pub fn from_u8(value: u8) -> Option<RetainHandling> {
        match value {
            0 => Some(RetainHandling::SendAtSubscribe),
            1 => Some(RetainHandling::SendAtSubscribeIfNew),
            2 => Some(RetainHandling::DoNotSend),
            _ => None,
        }
    }
}

/// A subscription identifier: 1 to [`SUBSCRIPTION_ID_MAX`] (0 is a protocol error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriptionId(NonZeroU32);

impl SubscriptionId {
    /// The identifier with this value, if it is in range.
    pub fn new(value: u32) -> Option<SubscriptionId> {
        if value > SUBSCRIPTION_ID_MAX {
            return None;
        }
        NonZeroU32::new(value).map(SubscriptionId)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }
}

/// The options of one subscription. [`SubscriptionOptions::new`] gives 3.1.1's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    /// The maximum QoS granted.
    pub qos: QoS,
    /// Do not send this client the messages it published itself (5.0 only).
    pub no_local: bool,
    /// Keep the RETAIN flag of forwarded messages (5.0 only; 3.1.1 clears it).
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
    pub subscription_id: Option<SubscriptionId>,
}

impl SubscriptionOptions {
    /// Options with the given QoS and every 5.0 option at its 3.1.1-compatible default.
    pub fn new(qos: QoS) -> Self {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::SendAtSubscribe,
            subscription_id: None,
        }
    }
}

/// How much the store may hold; each limit refuses new subscriptions once reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionLimits {
    /// Subscriptions one client may hold (shared ones included).
    pub per_client_max: usize,
    /// Subscriptions the whole store may hold.
    pub total_max: usize,
    /// Levels a subscribed topic filter may have.
    pub filter_levels_max: usize,
}

impl Default for SubscriptionLimits {
    fn default() -> Self {
        SubscriptionLimits {
            per_client_max: SUBSCRIPTIONS_PER_CLIENT_MAX,
            total_max: SUBSCRIPTIONS_MAX,
            filter_levels_max: FILTER_LEVELS_MAX,
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error("the client already holds {limit} subscriptions, the most allowed")]
    ClientQuotaExceeded { limit: usize },
    #[error("the broker already holds {limit} subscriptions, the most allowed")]
    StoreFull { limit: usize },
    #[error("the topic filter has {levels} levels, more than the limit of {limit}")]
    FilterTooDeep { levels: usize, limit: usize },
    #[error("No Local must not be set on a shared subscription")]
    NoLocalOnShared,
}

impl SubscriptionError {
    /// The MQTT 5.0 reason code: 0x97 (quota exceeded) in the SUBACK for the quotas, 0x8F
    /// (topic filter not allowed) for a too-deep filter, and 0x82 (protocol error, a DISCONNECT
    /// per 5.0 §3.8.3.1) for No Local on a shared subscription. A 3.1.1 SUBACK says 0x80 for
    /// all of them.
    pub fn reason_code(&self) -> u8 {
        match self {
            SubscriptionError::ClientQuotaExceeded { .. } | SubscriptionError::StoreFull { .. } => {
                reason::QUOTA_EXCEEDED
            }
            SubscriptionError::FilterTooDeep { .. } => reason::TOPIC_FILTER_INVALID,
            SubscriptionError::NoLocalOnShared => reason::PROTOCOL_ERROR,
        }
    }
}

/// What a successful subscribe did; retain handling 1 sends retained messages only when new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeOutcome {
    Created,
    /// The client already had this filter; its options were replaced.
    Replaced {
        previous: SubscriptionOptions,
    },
}

impl SubscribeOutcome {
    pub fn is_new(&self) -> bool {
        matches!(self, SubscribeOutcome::Created)
    }
}

/// One copy of a published message for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub client_id: Arc<str>,
    /// The highest QoS granted by the matching subscriptions; the message goes out at the
    /// lower of this and its own QoS.
    pub qos: QoS,
    /// Whether any matching subscription asked to keep the message's RETAIN flag.
    pub retain_as_published: bool,
    /// The identifiers of all matching subscriptions that have one, ascending, no repeats.
    pub subscription_ids: Vec<SubscriptionId>,
    /// The share name when this copy is a shared group's; `None` for direct subscriptions.
    pub share_name: Option<Arc<str>>,
}

type NodeId = usize;

/// The root node: the empty prefix. It is never freed.
const ROOT: NodeId = 0;

/// One level of the trie.
#[derive(Debug, Default)]
struct Node {
    /// The parent, for pruning; the root points at itself.
    parent: NodeId,
    /// The key this node has in its parent's `children`; unused for `+` children.
    level: Box<str>,
    children: HashMap<Box<str>, NodeId>,
    /// The `+` child: filters with a single-level wildcard at this depth.
    plus: Option<NodeId>,
    /// Filters that end at this node.
    exact: Subscribers,
    /// Filters that end with `#` right below this node: they match this node's prefix and
    /// anything longer.
    multi: Subscribers,
}

impl Node {
    fn is_unused(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }
}

/// The subscriptions that end at one place in the trie.
#[derive(Debug, Default)]
struct Subscribers {
    clients: HashMap<Arc<str>, SubscriptionOptions>,
    /// By share name; a BTreeMap so deliveries come out in a stable order.
    groups: BTreeMap<Arc<str>, SharedGroup>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.groups.is_empty()
    }
}

/// The members of one shared subscription (one share name and one filter).
#[derive(Debug, Default)]
struct SharedGroup {
    /// In joining order, which is the round-robin order.
    members: Vec<(Arc<str>, SubscriptionOptions)>,
    /// The member to try first next time.
    next: usize,
}

impl SharedGroup {
    fn position(&self, client_id: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|(member, _)| **member == *client_id)
    }

    fn remove(&mut self, index: usize) {
        self.members.remove(index);
        // Keep pointing at the member that was next, so removal does not skip anyone.
        if index < self.next {
            self.next -= 1;
        }
        if self.next >= self.members.len() {
            self.next = 0;
        }
    }

    /// The next member in round-robin order that is eligible, or, when none is, the next
    /// member anyway: its session is kept, so the message waits there (5.0 §4.8.2).
    fn pick(
        &mut self,
        is_eligible: &mut impl FnMut(&str) -> bool,
    ) -> Option<&(Arc<str>, SubscriptionOptions)> {
        let count = self.members.len();
        if count == 0 {
            return None;
        }
        let start = self.next % count;
        let chosen = (0..count)
            .map(|step| (start + step) % count)
            .find(|&index| is_eligible(&self.members[index].0))
            .unwrap_or(start);
        self.next = (chosen + 1) % count;
        self.members.get(chosen)
    }
}

/// The subscriptions of every client, indexed for matching by a trie over topic levels.
#[derive(Debug)]
pub struct SubscriptionStore {
    limits: SubscriptionLimits,
    nodes: Vec<Node>,
    free_nodes: Vec<NodeId>,
    clients: HashMap<Arc<str>, BTreeMap<SubscriptionFilter, SubscriptionOptions>>,
    subscription_count: usize,
}

impl Default for SubscriptionStore {
    fn default() -> Self {
        Self::new(SubscriptionLimits::default())
    }
}

impl SubscriptionStore {
    pub fn new(limits: SubscriptionLimits) -> Self {
        SubscriptionStore {
            limits,
            nodes: vec![Node::default()],
            free_nodes: Vec::new(),
            clients: HashMap::new(),
            subscription_count: 0,
        }
    }

    pub fn limits(&self) -> SubscriptionLimits {
        self.limits
    }

    /// Subscriptions held, shared ones included.
    pub fn len(&self) -> usize {
        self.subscription_count
    }

    pub fn is_empty(&self) -> bool {
        self.subscription_count == 0
    }

    /// Clients holding at least one subscription.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Trie nodes in use (root included), for metrics and for tests that check pruning.
    pub fn trie_node_count(&self) -> usize {
        self.nodes.len() - self.free_nodes.len()
    }

    /// The options of one subscription, if the client has it.
    pub fn subscription(
        &self,
        client_id: &str,
        filter: &SubscriptionFilter,
    ) -> Option<SubscriptionOptions> {
        self.clients.get(client_id)?.get(filter).copied()
    }

    /// One client's subscriptions, ordered by filter (for session persistence and listing).
    pub fn client_subscriptions(
        &self,
        client_id: &str,
    ) -> impl Iterator<Item = (&SubscriptionFilter, &SubscriptionOptions)> {
        self.clients.get(client_id).into_iter().flatten()
    }

    /// Adds a subscription, or replaces the options of the client's subscription with the same
    /// filter (the spec's replace rule; a shared member keeps its round-robin place).
    pub fn subscribe(
        &mut self,
        client_id: &str,
        filter: &SubscriptionFilter,
        options: SubscriptionOptions,
    ) -> Result<SubscribeOutcome, SubscriptionError> {
        if filter.is_shared() && options.no_local {
            return Err(SubscriptionError::NoLocalOnShared);
        }
        let levels = filter.topic_filter().level_count();
        if levels > self.limits.filter_levels_max {
            return Err(SubscriptionError::FilterTooDeep {
                levels,
                limit: self.limits.filter_levels_max,
            });
        }
        let previous = self.subscription(client_id, filter);
        if previous.is_none() {
            self.check_quota(client_id)?;
        }

        let client = self.intern_client(client_id);
        let place = self.place_or_insert(filter.topic_filter());
        let subscribers = self.subscribers_mut(place);
        match filter.share_name() {
            None => {
                subscribers.clients.insert(client.clone(), options);
            }
            Some(share_name) => {
                let group = subscribers.groups.entry(share_name.into()).or_default();
                match group.position(&client) {
                    Some(index) => group.members[index].1 = options,
                    None => group.members.push((client.clone(), options)),
                }
            }
        }
        self.clients
            .entry(client)
            .or_default()
            .insert(filter.clone(), options);

        Ok(match previous {
            Some(previous) => SubscribeOutcome::Replaced { previous },
            None => {
                self.subscription_count += 1;
                SubscribeOutcome::Created
            }
        })
    }

    /// Removes one subscription; returns its options, or `None` if the client did not have
    /// it (5.0 UNSUBACK 0x11, "no subscription existed").
    pub fn unsubscribe(
        &mut self,
        client_id: &str,
        filter: &SubscriptionFilter,
    ) -> Option<SubscriptionOptions> {
        let filters = self.clients.get_mut(client_id)?;
        let previous = filters.remove(filter)?;
        if filters.is_empty() {
            self.clients.remove(client_id);
        }
        self.subscription_count -= 1;
        self.detach(client_id, filter);
        Some(previous)
    }

    /// Removes every subscription of a client (its session ended); returns how many.
    pub fn remove_client(&mut self, client_id: &str) -> usize {
        let Some(filters) = self.clients.remove(client_id) else {
            return 0;
        };
        for filter in filters.keys() {
            self.detach(client_id, filter);
        }
        self.subscription_count -= filters.len();
        filters.len()
    }

    /// The deliveries for a message published to `name` by `publisher_client_id`, with every
    /// shared-group member eligible. See [`SubscriptionStore::matches_with`].
    pub fn matches(&mut self, name: &TopicName, publisher_client_id: &str) -> Vec<Delivery> {
        self.matches_with(name, publisher_client_id, |_| true)
    }

    /// The deliveries for a message published to `name` by `publisher_client_id`: first one
    /// per client with matching non-shared subscriptions (ordered by client id), then one per
    /// matching shared group. Each group's member is the next in round-robin order for which
    /// `is_eligible(client_id)` holds (e.g. "is connected"), or the next one at all if none is.
    pub fn matches_with(
        &mut self,
        name: &TopicName,
        publisher_client_id: &str,
        mut is_eligible: impl FnMut(&str) -> bool,
    ) -> Vec<Delivery> {
        let places = self.matching_places(name);
        let mut deliveries = self.direct_deliveries(&places, publisher_client_id);
        for &place in &places {
            for (share_name, group) in &mut self.subscribers_mut(place).groups {
                if let Some((client_id, options)) = group.pick(&mut is_eligible) {
                    deliveries.push(Delivery {
                        client_id: client_id.clone(),
                        qos: options.qos,
                        retain_as_published: options.retain_as_published,
                        subscription_ids: options.subscription_id.into_iter().collect(),
                        share_name: Some(share_name.clone()),
                    });
                }
            }
        }
        deliveries
    }

    /// Every subscriber set whose filter matches `name`, found by walking the trie with an
    /// explicit stack (names may have tens of thousands of levels).
    fn matching_places(&self, name: &TopicName) -> Vec<Place> {
        // Filters starting with a wildcard must not match `$` names (§4.7.2): at the root,
        // skip the `#` subscribers and the `+` child.
        let dollar = name.is_dollar();
        let mut places = Vec::new();
        let mut stack: Vec<(NodeId, Option<&str>)> = vec![(ROOT, Some(name.as_str()))];
        while let Some((id, rest)) = stack.pop() {
            let node = &self.nodes[id];
            let wildcards_allowed = !(dollar && id == ROOT);
            // `#` matches the level it hangs under too (`sport/#` matches `sport`), so its
            // subscribers match whether or not the name goes on.
            if wildcards_allowed && !node.multi.is_empty() {
                places.push(Place::multi(id));
            }
            let Some(rest) = rest else {
                if !node.exact.is_empty() {
                    places.push(Place::exact(id));
                }
                continue;
            };
            let (level, after) = match rest.split_once(LEVEL_SEPARATOR) {
                Some((level, after)) => (level, Some(after)),
                None => (rest, None),
            };
            if let Some(&child) = node.children.get(level) {
                stack.push((child, after));
            }
            if let (true, Some(plus)) = (wildcards_allowed, node.plus) {
                stack.push((plus, after));
            }
        }
        places
    }

    /// One delivery per client over the non-shared subscribers at `places`.
    fn direct_deliveries(&self, places: &[Place], publisher_client_id: &str) -> Vec<Delivery> {
        let mut matched: Vec<(&Arc<str>, &SubscriptionOptions)> = places
            .iter()
            .flat_map(|&place| &self.subscribers(place).clients)
            .filter(|(client_id, options)| {
                !(options.no_local && ***client_id == *publisher_client_id)
            })
            .collect();
        matched.sort_unstable_by(|left, right| left.0.cmp(right.0));

        let mut deliveries: Vec<Delivery> = Vec::new();
        for (client_id, options) in matched {
            match deliveries.last_mut() {
                Some(last) if *last.client_id == **client_id => {
                    last.qos = last.qos.max(options.qos);
                    last.retain_as_published |= options.retain_as_published;
                    last.subscription_ids.extend(options.subscription_id);
                }
                _ => deliveries.push(Delivery {
                    client_id: client_id.clone(),
                    qos: options.qos,
                    retain_as_published: options.retain_as_published,
                    subscription_ids: options.subscription_id.into_iter().collect(),
                    share_name: None,
                }),
            }
        }
        for delivery in &mut deliveries {
            delivery.subscription_ids.sort_unstable();
            delivery.subscription_ids.dedup();
        }
        deliveries
    }

    /// Refuses a new subscription when a quota is full.
    fn check_quota(&self, client_id: &str) -> Result<(), SubscriptionError> {
        let held = self.clients.get(client_id).map_or(0, BTreeMap::len);
        if held >= self.limits.per_client_max {
            return Err(SubscriptionError::ClientQuotaExceeded {
                limit: self.limits.per_client_max,
            });
        }
        if self.subscription_count >= self.limits.total_max {
            return Err(SubscriptionError::StoreFull {
                limit: self.limits.total_max,
            });
        }
        Ok(())
    }

    /// The shared `Arc` for a client id, so every trie entry of a client shares one string.
    fn intern_client(&self, client_id: &str) -> Arc<str> {
        match self.clients.get_key_value(client_id) {
            Some((interned, _)) => interned.clone(),
            None => Arc::from(client_id),
        }
    }

    /// Removes the trie entry of one subscription already dropped from the client index.
    fn detach(&mut self, client_id: &str, filter: &SubscriptionFilter) {
        let Some(place) = self.place(filter.topic_filter()) else {
            debug_assert!(
                false,
                "subscription {filter} of {client_id} is not in the trie"
            );
            return;
        };
        let subscribers = self.subscribers_mut(place);
        match filter.share_name() {
            None => {
                subscribers.clients.remove(client_id);
            }
            Some(share_name) => {
                if let Some(group) = subscribers.groups.get_mut(share_name) {
                    if let Some(index) = group.position(client_id) {
                        group.remove(index);
                    }
                    if group.members.is_empty() {
                        subscribers.groups.remove(share_name);
                    }
                }
            }
        }
        self.prune(place.node);
    }

    /// Frees unused nodes from `id` up towards the root.
    fn prune(&mut self, mut id: NodeId) {
        while id != ROOT && self.nodes[id].is_unused() {
            let node = std::mem::take(&mut self.nodes[id]);
            let parent = &mut self.nodes[node.parent];
            if parent.plus == Some(id) {
                parent.plus = None;
            } else {
                parent.children.remove(&node.level);
            }
            self.free_nodes.push(id);
            id = node.parent;
        }
    }

    /// Where a filter's subscribers live, if its nodes exist.
    fn place(&self, filter: &TopicFilter) -> Option<Place> {
        let mut id = ROOT;
        for level in filter.levels() {
            id = match level {
                // Valid filters have `#` only as the last level.
                MULTI_LEVEL_WILDCARD => return Some(Place::multi(id)),
                SINGLE_LEVEL_WILDCARD => self.nodes[id].plus?,
                literal => *self.nodes[id].children.get(literal)?,
            };
        }
        Some(Place::exact(id))
    }

    /// Where a filter's subscribers live, creating the nodes on the way.
    fn place_or_insert(&mut self, filter: &TopicFilter) -> Place {
        let mut id = ROOT;
        for level in filter.levels() {
            id = match level {
                MULTI_LEVEL_WILDCARD => return Place::multi(id),
                SINGLE_LEVEL_WILDCARD => match self.nodes[id].plus {
                    Some(plus) => plus,
                    None => {
                        let plus = self.new_node(id, "");
                        self.nodes[id].plus = Some(plus);
                        plus
                    }
                },
                literal => match self.nodes[id].children.get(literal) {
                    Some(&child) => child,
                    None => {
                        let child = self.new_node(id, literal);
                        self.nodes[id].children.insert(literal.into(), child);
                        child
                    }
                },
            };
        }
        Place::exact(id)
    }

    fn new_node(&mut self, parent: NodeId, level: &str) -> NodeId {
        let node = Node {
            parent,
            level: level.into(),
            ..Node::default()
        };
        match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id] = node;
                id
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    fn subscribers(&self, place: Place) -> &Subscribers {
        let node = &self.nodes[place.node];
        if place.multi {
            &node.multi
        } else {
            &node.exact
        }
    }

    fn subscribers_mut(&mut self, place: Place) -> &mut Subscribers {
        let node = &mut self.nodes[place.node];
        if place.multi {
            &mut node.multi
        } else {
            &mut node.exact
        }
    }
}

/// A subscriber set in the trie: a node's `exact` or `multi` (`#`) subscribers.
#[derive(Debug, Clone, Copy)]
struct Place {
    node: NodeId,
    multi: bool,
}

impl Place {
    fn exact(node: NodeId) -> Place {
        Place { node, multi: false }
    }

    fn multi(node: NodeId) -> Place {
        Place { node, multi: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic::FilterSupport;

    fn sub(raw: &str) -> SubscriptionFilter {
        SubscriptionFilter::parse(raw, FilterSupport::ALL).unwrap()
    }

    fn name(raw: &str) -> TopicName {
        TopicName::new(raw).unwrap()
    }

    fn qos(level: u8) -> SubscriptionOptions {
        SubscriptionOptions::new(QoS::from_u8(level).unwrap())
    }

    fn clients(deliveries: &[Delivery]) -> Vec<&str> {
        deliveries.iter().map(|d| &*d.client_id).collect()
    }

    #[test]
    fn literal_plus_and_hash_filters_match() {
        let mut store = SubscriptionStore::default();
        store.subscribe("a", &sub("sport/tennis"), qos(0)).unwrap();
        store.subscribe("b", &sub("sport/+"), qos(0)).unwrap();
        store.subscribe("c", &sub("sport/#"), qos(0)).unwrap();
        store.subscribe("d", &sub("#"), qos(0)).unwrap();
        store.subscribe("e", &sub("other"), qos(0)).unwrap();
        assert_eq!(
            clients(&store.matches(&name("sport/tennis"), "p")),
            ["a", "b", "c", "d"]
        );
        assert_eq!(clients(&store.matches(&name("sport"), "p")), ["c", "d"]);
        assert_eq!(
            clients(&store.matches(&name("sport/"), "p")),
            ["b", "c", "d"]
        );
        assert_eq!(
            clients(&store.matches(&name("$SYS/x"), "p")),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn dollar_names_skip_wildcard_first_filters_only() {
        let mut store = SubscriptionStore::default();
        store.subscribe("hash", &sub("#"), qos(0)).unwrap();
        store.subscribe("plus", &sub("+/x"), qos(0)).unwrap();
        store.subscribe("sys", &sub("$SYS/#"), qos(0)).unwrap();
        store.subscribe("sysplus", &sub("$SYS/+"), qos(0)).unwrap();
        assert_eq!(
            clients(&store.matches(&name("$SYS/x"), "p")),
            ["sys", "sysplus"]
        );
        assert_eq!(clients(&store.matches(&name("a/x"), "p")), ["hash", "plus"]);
    }

    #[test]
    fn unsubscribe_prunes_the_trie() {
        let mut store = SubscriptionStore::default();
        store.subscribe("a", &sub("x/+/y/#"), qos(1)).unwrap();
        store
            .subscribe("a", &sub("$share/g/x/+/z"), qos(1))
            .unwrap();
        assert!(store.trie_node_count() > 1);
        assert_eq!(store.unsubscribe("a", &sub("x/+/y/#")), Some(qos(1)));
        assert_eq!(store.unsubscribe("a", &sub("x/+/y/#")), None);
        assert_eq!(store.remove_client("a"), 1);
        assert_eq!(store.trie_node_count(), 1);
        assert!(store.is_empty());
        assert_eq!(store.client_count(), 0);
    }

    #[test]
    fn group_removal_keeps_round_robin_order() {
        let mut group = SharedGroup::default();
        for member in ["a", "b", "c", "d"] {
            group.members.push((Arc::from(member), qos(0)));
        }
        group.next = 2;
        group.remove(0); // a left: c is still next
        let picked = group.pick(&mut |_| true).map(|(id, _)| id.to_string());
        assert_eq!(picked.as_deref(), Some("c"));
        group.remove(2); // d left, and it was next: wrap to b
        let picked = group.pick(&mut |_| true).map(|(id, _)| id.to_string());
        assert_eq!(picked.as_deref(), Some("b"));
    }

    #[test]
    fn limits_refuse_new_subscriptions_but_allow_replacing() {
        let limits = SubscriptionLimits {
            per_client_max: 2,
            total_max: 3,
            filter_levels_max: 3,
        };
        let mut store = SubscriptionStore::new(limits);
        store.subscribe("a", &sub("1"), qos(0)).unwrap();
        store.subscribe("a", &sub("2"), qos(0)).unwrap();
        let err = store.subscribe("a", &sub("3"), qos(0)).unwrap_err();
        assert_eq!(err, SubscriptionError::ClientQuotaExceeded { limit: 2 });
        assert_eq!(err.reason_code(), 0x97);
        assert!(!store.subscribe("a", &sub("2"), qos(2)).unwrap().is_new());
        store.subscribe("b", &sub("1"), qos(0)).unwrap();
        let err = store.subscribe("c", &sub("1"), qos(0)).unwrap_err();
        assert_eq!(err, SubscriptionError::StoreFull { limit: 3 });
        let err = store.subscribe("b", &sub("a/b/c/d"), qos(0)).unwrap_err();
        assert_eq!(
            err,
            SubscriptionError::FilterTooDeep {
                levels: 4,
                limit: 3
            }
        );
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn no_local_on_shared_is_a_protocol_error() {
        let mut store = SubscriptionStore::default();
        let options = SubscriptionOptions {
            no_local: true,
            ..qos(1)
        };
        let err = store
            .subscribe("a", &sub("$share/g/x"), options)
            .unwrap_err();
        assert_eq!(err.reason_code(), 0x82);
        assert!(store.is_empty());
    }

    #[test]
    fn subscription_ids_are_range_checked() {
        assert_eq!(SubscriptionId::new(0), None);
        assert_eq!(SubscriptionId::new(1).map(SubscriptionId::get), Some(1));
        assert!(SubscriptionId::new(SUBSCRIPTION_ID_MAX).is_some());
        assert_eq!(SubscriptionId::new(SUBSCRIPTION_ID_MAX + 1), None);
        assert_eq!(QoS::from_u8(3), None);
        assert_eq!(RetainHandling::from_u8(3), None);
    }
}
