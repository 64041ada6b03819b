//! MQTT topics, subscriptions and routes against the spec: the spec's own examples, and the
//! trie matcher checked against a naive matcher written from the spec text.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use silt_gateways::mqtt::route::{RouteError, RouteSpec, RouteTable};
use silt_gateways::mqtt::subscriptions::{
    QoS, SubscribeOutcome, SubscriptionError, SubscriptionId, SubscriptionLimits,
    SubscriptionOptions, SubscriptionStore,
};
use silt_gateways::mqtt::topic::{
    FilterSupport, SubscriptionFilter, TOPIC_BYTES_MAX, TopicError, TopicFault, TopicFilter,
    TopicName,
};

// ---------------------------------------------------------------------------------------------
// The reference: the spec's words, level by level, with no cleverness.

/// §4.7.3: a topic name is non-empty, at most 65535 bytes, without U+0000 and wildcards.
fn reference_name_valid(raw: &str) -> bool {
    !raw.is_empty()
        && raw.len() <= TOPIC_BYTES_MAX
        && !raw.contains('\0')
        && !raw.contains('+')
        && !raw.contains('#')
}

/// §4.7.1: wildcards only as whole levels; `#` only as the last level.
fn reference_filter_valid(raw: &str) -> bool {
    if raw.is_empty() || raw.len() > TOPIC_BYTES_MAX || raw.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = raw.split('/').collect();
    levels
        .iter()
        .enumerate()
        .all(|(index, level)| match *level {
            "#" => index == levels.len() - 1,
            "+" => true,
            other => !other.contains('+') && !other.contains('#'),
        })
}

/// §4.7.1 and §4.7.2, level by level.
fn reference_matches(filter: &str, name: &str) -> bool {
    // "The Server MUST NOT match Topic Filters starting with a wildcard character (# or +)
    // with Topic Names beginning with a $ character."
    if name.starts_with('$') && (filter.starts_with('#') || filter.starts_with('+')) {
        return false;
    }
    let filter_levels: Vec<&str> = filter.split('/').collect();
    let name_levels: Vec<&str> = name.split('/').collect();
    let mut index = 0;
    loop {
        match (filter_levels.get(index), name_levels.get(index)) {
            // "#" matches the parent level and any number of child levels.
            (Some(&"#"), _) => return true,
            // "+" matches exactly one level, which may be empty.
            (Some(&"+"), Some(_)) => {}
            (Some(filter_level), Some(name_level)) => {
                if filter_level != name_level {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        index += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn name(raw: &str) -> TopicName {
    TopicName::new(raw).unwrap()
}

fn filter(raw: &str) -> TopicFilter {
    TopicFilter::new(raw).unwrap()
}

fn sub(raw: &str) -> SubscriptionFilter {
    SubscriptionFilter::parse(raw, FilterSupport::ALL).unwrap()
}

fn options(qos: QoS, id: Option<u32>) -> SubscriptionOptions {
    SubscriptionOptions {
        subscription_id: id.and_then(SubscriptionId::new),
        ..SubscriptionOptions::new(qos)
    }
}

fn ids(values: &[u32]) -> Vec<SubscriptionId> {
    values
        .iter()
        .map(|&value| SubscriptionId::new(value).unwrap())
        .collect()
}

fn clients_of(deliveries: &[silt_gateways::mqtt::Delivery]) -> Vec<&str> {
    deliveries.iter().map(|d| &*d.client_id).collect()
}

// ---------------------------------------------------------------------------------------------
// The spec's examples.

#[test]
fn spec_examples_of_multi_level_wildcard() {
    // §4.7.1.2
    let tennis = filter("sport/tennis/player1/#");
    for raw in [
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport/tennis/player1/score/wimbledon",
    ] {
        assert!(tennis.matches(&name(raw)), "{raw}");
    }
    assert!(!tennis.matches(&name("sport/tennis/player2")));
    assert!(filter("sport/#").matches(&name("sport")));
    for valid in ["#", "sport/tennis/#"] {
        assert!(TopicFilter::new(valid).is_ok(), "{valid}");
    }
    assert_eq!(
        TopicFilter::new("sport/tennis#"),
        Err(TopicError::InvalidFilter(TopicFault::WildcardNotWholeLevel))
    );
    assert_eq!(
        TopicFilter::new("sport/tennis/#/ranking"),
        Err(TopicError::InvalidFilter(
            TopicFault::MultiLevelWildcardNotLast
        ))
    );
}

#[test]
fn spec_examples_of_single_level_wildcard() {
    // §4.7.1.3
    let players = filter("sport/tennis/+");
    assert!(players.matches(&name("sport/tennis/player1")));
    assert!(players.matches(&name("sport/tennis/player2")));
    assert!(!players.matches(&name("sport/tennis/player1/ranking")));
    assert!(!filter("sport/+").matches(&name("sport")));
    assert!(filter("sport/+").matches(&name("sport/")));
    for valid in ["+", "+/tennis/#", "sport/+/player1", "+/+", "/+"] {
        assert!(TopicFilter::new(valid).is_ok(), "{valid}");
    }
    assert_eq!(
        TopicFilter::new("sport+"),
        Err(TopicError::InvalidFilter(TopicFault::WildcardNotWholeLevel))
    );
    let finance = name("/finance");
    assert!(filter("+/+").matches(&finance));
    assert!(filter("/+").matches(&finance));
    assert!(!filter("+").matches(&finance));
}

#[test]
fn spec_examples_of_dollar_topics() {
    // §4.7.2
    assert!(!filter("#").matches(&name("$SYS/monitor/Clients")));
    assert!(!filter("+/monitor/Clients").matches(&name("$SYS/monitor/Clients")));
    assert!(filter("$SYS/#").matches(&name("$SYS/monitor/Clients")));
    assert!(filter("$SYS/monitor/+").matches(&name("$SYS/monitor/Clients")));
    // The rule is about the first character only.
    assert!(filter("#").matches(&name("a/$SYS")));
    assert!(filter("+/+").matches(&name("a/$b")));
}

#[test]
fn spec_examples_of_topic_semantics() {
    // §4.7.3
    assert!(!filter("ACCOUNTS").matches(&name("Accounts")));
    assert!(filter("Accounts payable").matches(&name("Accounts payable")));
    assert!(!filter("finance").matches(&name("/finance")));
    assert!(!filter("/finance").matches(&name("finance")));
    assert_eq!(
        TopicName::new(""),
        Err(TopicError::InvalidName(TopicFault::Empty))
    );
    assert_eq!(
        TopicFilter::new(""),
        Err(TopicError::InvalidFilter(TopicFault::Empty))
    );
    assert_eq!(
        TopicName::new("a\u{0}"),
        Err(TopicError::InvalidName(TopicFault::NullCharacter))
    );
    assert_eq!(TopicName::new("a/+").unwrap_err().reason_code(), 0x90);
    assert_eq!(TopicFilter::new("a/#/b").unwrap_err().reason_code(), 0x8F);
}

#[test]
fn spec_examples_of_shared_subscriptions() {
    // §4.8.2
    let first = sub("$share/consumer1/sport/tennis/+");
    let second = sub("$share/consumer2/sport/tennis/+");
    assert_eq!(first.share_name(), Some("consumer1"));
    assert_eq!(second.share_name(), Some("consumer2"));
    assert_eq!(first.topic_filter(), second.topic_filter());
    assert_ne!(first, second);
    let finance = sub("$share/consumer1//finance");
    assert_eq!(finance.topic_filter().as_str(), "/finance");
    assert!(finance.matches(&name("/finance")));
    for (raw, fault) in [
        ("$share//x", TopicFault::ShareNameEmpty),
        ("$share/a+b/x", TopicFault::ShareNameWildcard),
        ("$share/a#/x", TopicFault::ShareNameWildcard),
        ("$share/group", TopicFault::SharedFilterMissing),
    ] {
        let err = SubscriptionFilter::parse(raw, FilterSupport::ALL).unwrap_err();
        assert_eq!(err, TopicError::InvalidFilter(fault), "{raw}");
        assert_eq!(err.reason_code(), 0x8F);
    }
    let disabled = FilterSupport {
        shared_subscriptions: false,
        wildcard_subscriptions: true,
    };
    let err = SubscriptionFilter::parse("$share/g/x", disabled).unwrap_err();
    assert_eq!(err.reason_code(), 0x9E);
}

// ---------------------------------------------------------------------------------------------
// Delivery semantics.

#[test]
fn overlapping_subscriptions_deliver_once_with_max_qos_and_all_identifiers() {
    let mut store = SubscriptionStore::default();
    store
        .subscribe("c", &sub("a/+"), options(QoS::AtLeastOnce, Some(1)))
        .unwrap();
    store
        .subscribe("c", &sub("a/#"), options(QoS::ExactlyOnce, Some(2)))
        .unwrap();
    store
        .subscribe("c", &sub("a/b"), options(QoS::AtMostOnce, None))
        .unwrap();
    store
        .subscribe("c", &sub("x/#"), options(QoS::ExactlyOnce, Some(3)))
        .unwrap();
    store
        .subscribe("d", &sub("#"), options(QoS::AtMostOnce, Some(9)))
        .unwrap();

    let deliveries = store.matches(&name("a/b"), "publisher");
    assert_eq!(clients_of(&deliveries), ["c", "d"]);
    assert_eq!(deliveries[0].qos, QoS::ExactlyOnce);
    assert_eq!(deliveries[0].subscription_ids, ids(&[1, 2]));
    assert_eq!(deliveries[0].share_name, None);
    assert_eq!(deliveries[1].qos, QoS::AtMostOnce);
    assert_eq!(deliveries[1].subscription_ids, ids(&[9]));

    // Only the subscriptions that match count: `a` matches `a/#` alone.
    let deliveries = store.matches(&name("a"), "publisher");
    assert_eq!(deliveries[0].qos, QoS::ExactlyOnce);
    assert_eq!(deliveries[0].subscription_ids, ids(&[2]));
}

#[test]
fn no_local_skips_the_publishers_own_subscriptions_only() {
    let mut store = SubscriptionStore::default();
    let no_local = SubscriptionOptions {
        no_local: true,
        ..options(QoS::ExactlyOnce, Some(1))
    };
    store.subscribe("me", &sub("chat/+"), no_local).unwrap();
    store.subscribe("you", &sub("chat/+"), no_local).unwrap();

    let deliveries = store.matches(&name("chat/room"), "me");
    assert_eq!(clients_of(&deliveries), ["you"]);
    let deliveries = store.matches(&name("chat/room"), "them");
    assert_eq!(clients_of(&deliveries), ["me", "you"]);

    // Another subscription of the publisher without No Local still delivers, with its own
    // QoS and identifier only.
    store
        .subscribe("me", &sub("chat/#"), options(QoS::AtLeastOnce, Some(2)))
        .unwrap();
    let deliveries = store.matches(&name("chat/room"), "me");
    assert_eq!(clients_of(&deliveries), ["me", "you"]);
    assert_eq!(deliveries[0].qos, QoS::AtLeastOnce);
    assert_eq!(deliveries[0].subscription_ids, ids(&[2]));
}

#[test]
fn subscribing_again_replaces_the_options() {
    let mut store = SubscriptionStore::default();
    let first = options(QoS::AtMostOnce, Some(1));
    let second = options(QoS::ExactlyOnce, Some(7));
    assert_eq!(
        store.subscribe("c", &sub("a/+"), first),
        Ok(SubscribeOutcome::Created)
    );
    assert_eq!(
        store.subscribe("c", &sub("a/+"), second),
        Ok(SubscribeOutcome::Replaced { previous: first })
    );
    assert_eq!(store.len(), 1);
    assert_eq!(store.subscription("c", &sub("a/+")), Some(second));
    let deliveries = store.matches(&name("a/b"), "p");
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].qos, QoS::ExactlyOnce);
    assert_eq!(deliveries[0].subscription_ids, ids(&[7]));

    // A shared subscription and a plain one with the same filter are different subscriptions,
    // and each delivers its own copy.
    store.subscribe("c", &sub("$share/g/a/+"), first).unwrap();
    assert_eq!(store.len(), 2);
    let listed: Vec<String> = store
        .client_subscriptions("c")
        .map(|(filter, _)| filter.to_string())
        .collect();
    assert_eq!(listed, ["a/+", "$share/g/a/+"]);
    let deliveries = store.matches(&name("a/b"), "p");
    assert_eq!(clients_of(&deliveries), ["c", "c"]);
    assert_eq!(deliveries[1].share_name.as_deref(), Some("g"));
    assert_eq!(deliveries[1].qos, QoS::AtMostOnce);
}

#[test]
fn shared_groups_deliver_round_robin_one_copy_per_group() {
    let mut store = SubscriptionStore::default();
    for member in ["m1", "m2", "m3"] {
        store
            .subscribe(
                member,
                &sub("$share/workers/jobs/#"),
                options(QoS::AtLeastOnce, None),
            )
            .unwrap();
    }
    store
        .subscribe(
            "audit",
            &sub("$share/audit/jobs/+"),
            options(QoS::AtMostOnce, Some(5)),
        )
        .unwrap();

    let mut picked: BTreeMap<String, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for _ in 0..300 {
        let deliveries = store.matches(&name("jobs/1"), "producer");
        assert_eq!(deliveries.len(), 2, "one copy per group");
        let workers: Vec<_> = deliveries
            .iter()
            .filter(|d| d.share_name.as_deref() == Some("workers"))
            .collect();
        assert_eq!(workers.len(), 1);
        *picked.entry(workers[0].client_id.to_string()).or_default() += 1;
        order.push(workers[0].client_id.to_string());
    }
    assert_eq!(
        picked.values().copied().collect::<Vec<_>>(),
        [100, 100, 100]
    );
    assert_eq!(order[..6], ["m1", "m2", "m3", "m1", "m2", "m3"]);

    // A member that left is skipped, the others keep their turns.
    store
        .unsubscribe("m2", &sub("$share/workers/jobs/#"))
        .unwrap();
    let turns: Vec<String> = (0..4)
        .map(|_| {
            let deliveries = store.matches(&name("jobs/1"), "producer");
            deliveries
                .iter()
                .find(|d| d.share_name.as_deref() == Some("workers"))
                .map(|d| d.client_id.to_string())
                .unwrap()
        })
        .collect();
    assert_eq!(turns, ["m1", "m3", "m1", "m3"]);
}

#[test]
fn shared_groups_prefer_eligible_members() {
    let mut store = SubscriptionStore::default();
    for member in ["a", "b", "c"] {
        store
            .subscribe(member, &sub("$share/g/t"), options(QoS::AtLeastOnce, None))
            .unwrap();
    }
    let pick = |store: &mut SubscriptionStore, connected: &[&str]| {
        let deliveries = store.matches_with(&name("t"), "p", |id| connected.contains(&id));
        assert_eq!(deliveries.len(), 1);
        deliveries[0].client_id.to_string()
    };
    let turns: Vec<String> = (0..4).map(|_| pick(&mut store, &["a", "c"])).collect();
    assert_eq!(turns, ["a", "c", "a", "c"]);
    // Nobody connected: the message still goes to one member (its session keeps it).
    let offline: BTreeSet<String> = (0..3).map(|_| pick(&mut store, &[])).collect();
    assert_eq!(
        offline.len(),
        3,
        "round robin continues over offline members"
    );
}

#[test]
fn removing_a_client_drops_all_its_subscriptions() {
    let mut store = SubscriptionStore::default();
    for raw in ["a", "a/+", "#", "$share/g/a"] {
        store
            .subscribe("gone", &sub(raw), options(QoS::AtLeastOnce, None))
            .unwrap();
    }
    store
        .subscribe("stays", &sub("a"), options(QoS::AtLeastOnce, None))
        .unwrap();
    assert_eq!(store.remove_client("gone"), 4);
    assert_eq!(store.remove_client("gone"), 0);
    assert_eq!(clients_of(&store.matches(&name("a"), "p")), ["stays"]);
    assert_eq!(store.len(), 1);
    assert_eq!(store.client_subscriptions("gone").count(), 0);
}

#[test]
fn limits_refuse_with_quota_reason_codes() {
    let mut store = SubscriptionStore::new(SubscriptionLimits {
        per_client_max: 1,
        total_max: 2,
        filter_levels_max: 4,
    });
    let qos1 = options(QoS::AtLeastOnce, None);
    store.subscribe("a", &sub("x"), qos1).unwrap();
    let err = store.subscribe("a", &sub("y"), qos1).unwrap_err();
    assert_eq!(err, SubscriptionError::ClientQuotaExceeded { limit: 1 });
    assert_eq!(err.reason_code(), 0x97);
    store.subscribe("b", &sub("x"), qos1).unwrap();
    let err = store.subscribe("c", &sub("x"), qos1).unwrap_err();
    assert_eq!(err, SubscriptionError::StoreFull { limit: 2 });
    assert_eq!(err.reason_code(), 0x97);
    // Freed room can be used again.
    store.unsubscribe("b", &sub("x")).unwrap();
    store.subscribe("c", &sub("x"), qos1).unwrap();
    assert_eq!(clients_of(&store.matches(&name("x"), "p")), ["a", "c"]);
}

#[test]
fn deep_names_and_filters_neither_recurse_nor_leak() {
    let deep_name = "/".repeat(TOPIC_BYTES_MAX);
    let deep_name = TopicName::new(&deep_name).unwrap();
    let deep_filter = format!("{}#", "+/".repeat(TOPIC_BYTES_MAX / 2 - 1));
    let mut store = SubscriptionStore::new(SubscriptionLimits {
        filter_levels_max: TOPIC_BYTES_MAX,
        ..SubscriptionLimits::default()
    });
    store
        .subscribe("deep", &sub(&deep_filter), options(QoS::AtMostOnce, None))
        .unwrap();
    store
        .subscribe("all", &sub("#"), options(QoS::AtMostOnce, None))
        .unwrap();
    assert_eq!(clients_of(&store.matches(&deep_name, "p")), ["all", "deep"]);
    assert!(store.trie_node_count() > TOPIC_BYTES_MAX / 4);
    store.remove_client("deep");
    assert_eq!(store.trie_node_count(), 1);
    // With the default limit the same filter is refused up front.
    let err = SubscriptionStore::default()
        .subscribe("deep", &sub(&deep_filter), options(QoS::AtMostOnce, None))
        .unwrap_err();
    assert_eq!(err.reason_code(), 0x8F);
}

// ---------------------------------------------------------------------------------------------
// Routes.

fn route(filter: &str, log_topic: &str, key: &str) -> RouteSpec {
    RouteSpec {
        filter: filter.into(),
        log_topic: log_topic.into(),
        key: key.into(),
    }
}

#[test]
fn routes_take_the_first_match_then_the_default() {
    let table = RouteTable::new(&[
        route("sensors/+/alarm", "alarms", "{level:1}"),
        route("sensors/#", "sensor-readings", "{client_id}/{level:1}"),
        route("sensors/+/alarm", "never", "{topic}"),
        route("$SYS/#", "sys", "{topic}"),
    ])
    .unwrap();
    let resolve = |topic: &str, client: &str| {
        let topic = name(topic);
        let route = table.resolve(&topic);
        (
            route.log_topic().to_string(),
            route.render_key(&topic, client),
        )
    };
    assert_eq!(
        resolve("sensors/pump/alarm", "c1"),
        ("alarms".into(), "pump".into())
    );
    assert_eq!(
        resolve("sensors/pump/temp", "c1"),
        ("sensor-readings".into(), "c1/pump".into())
    );
    assert_eq!(
        resolve("sensors", "c1"),
        ("sensor-readings".into(), "c1/".into())
    );
    assert_eq!(resolve("other/x", "c1"), ("mqtt".into(), "other/x".into()));
    assert_eq!(resolve("$SYS/x", "c1"), ("sys".into(), "$SYS/x".into()));
    assert_eq!(table.routes().len(), 4);
}

#[test]
fn wildcard_routes_leave_dollar_topics_to_the_default() {
    let table = RouteTable::new(&[route("#", "everything", "{topic}")]).unwrap();
    assert_eq!(table.resolve(&name("a/b")).log_topic(), "everything");
    assert_eq!(table.resolve(&name("$internal/x")).log_topic(), "mqtt");
}

#[test]
fn route_log_topics_follow_kafka_rules() {
    for bad in [
        "",
        ".",
        "..",
        "has space",
        "slash/name",
        "ünï",
        &"x".repeat(250),
    ] {
        let err = RouteTable::new(&[route("a", bad, "{topic}")]).unwrap_err();
        assert!(
            matches!(err, RouteError::LogTopic { index: 0, .. }),
            "{bad}: {err}"
        );
    }
    for good in ["mqtt", "a.b_c-D9", &"x".repeat(249)] {
        assert!(
            RouteTable::new(&[route("a", good, "{topic}")]).is_ok(),
            "{good}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// A name level from a small alphabet, with `$` and the empty level.
fn name_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "a", "b", "$", "$SYS", "a$"])
}

fn topic_name() -> impl Strategy<Value = String> {
    prop::collection::vec(name_level(), 1..5)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("a topic name is not empty", |topic| !topic.is_empty())
}

/// A valid filter: levels from the name alphabet plus `+`, maybe ending in `#`.
fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![3 => name_level(), 1 => Just("+")];
    (prop::collection::vec(level, 0..4), any::<bool>())
        .prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            levels.join("/")
        })
        .prop_filter("a topic filter is not empty", |filter| !filter.is_empty())
}

/// Any string over the characters that matter to validation.
fn raw_topic() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!['a', 'b', '$', '/', '+', '#', '\0', 'é']),
        0..8,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

#[derive(Debug, Clone)]
enum Op {
    Subscribe {
        client: u8,
        share: Option<&'static str>,
        filter: String,
        qos: u8,
        id: Option<u32>,
        no_local: bool,
        retain_as_published: bool,
    },
    Unsubscribe {
        client: u8,
        share: Option<&'static str>,
        filter: String,
    },
    RemoveClient {
        client: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let share = prop::option::weighted(0.25, prop::sample::select(vec!["g", "h"]));
    let subscribe = (
        0..4u8,
        share.clone(),
        topic_filter(),
        0..3u8,
        prop::option::of(1..4u32),
        prop::bool::weighted(0.2),
        any::<bool>(),
    )
        .prop_map(
            |(client, share, filter, qos, id, no_local, retain_as_published)| Op::Subscribe {
                client,
                share,
                filter,
                qos,
                id,
                no_local,
                retain_as_published,
            },
        );
    let unsubscribe =
        (0..4u8, share, topic_filter()).prop_map(|(client, share, filter)| Op::Unsubscribe {
            client,
            share,
            filter,
        });
    prop_oneof![
        6 => subscribe,
        2 => unsubscribe,
        1 => (0..4u8).prop_map(|client| Op::RemoveClient { client }),
    ]
}

fn client_id(client: u8) -> String {
    format!("c{client}")
}

fn subscription_filter(share: Option<&str>, filter: &str) -> SubscriptionFilter {
    match share {
        Some(share) => sub(&format!("$share/{share}/{filter}")),
        None => sub(filter),
    }
}

type ModelKey = (String, Option<&'static str>, String);

/// What the spec says one publish delivers, from the model's subscriptions.
fn expected_direct(
    model: &BTreeMap<ModelKey, SubscriptionOptions>,
    topic: &str,
    publisher: &str,
) -> BTreeMap<String, (QoS, bool, Vec<SubscriptionId>)> {
    let mut expected: BTreeMap<String, (QoS, bool, Vec<SubscriptionId>)> = BTreeMap::new();
    for ((client, share, filter), options) in model {
        if share.is_some() || !reference_matches(filter, topic) {
            continue;
        }
        if options.no_local && client == publisher {
            continue;
        }
        let entry = expected
            .entry(client.clone())
            .or_insert((QoS::AtMostOnce, false, Vec::new()));
        entry.0 = entry.0.max(options.qos);
        entry.1 |= options.retain_as_published;
        entry.2.extend(options.subscription_id);
    }
    for entry in expected.values_mut() {
        entry.2.sort();
        entry.2.dedup();
    }
    expected
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn validation_agrees_with_the_spec_text(raw in raw_topic()) {
        prop_assert_eq!(TopicName::new(&raw).is_ok(), reference_name_valid(&raw));
        prop_assert_eq!(TopicFilter::new(&raw).is_ok(), reference_filter_valid(&raw));
        // Parsing as a subscription never panics, and a non-shared result is the filter.
        if let Ok(parsed) = SubscriptionFilter::parse(&raw, FilterSupport::ALL) {
            if !parsed.is_shared() {
                prop_assert_eq!(parsed.topic_filter().as_str(), raw.as_str());
            }
            prop_assert_eq!(parsed.to_string(), raw);
        }
    }

    #[test]
    fn filter_matching_agrees_with_the_reference(filter in topic_filter(), topic in topic_name()) {
        let parsed = TopicFilter::new(&filter).unwrap();
        prop_assert_eq!(parsed.matches(&name(&topic)), reference_matches(&filter, &topic));
    }

    #[test]
    fn store_agrees_with_a_model_of_the_spec(
        ops in prop::collection::vec(op(), 1..40),
        topics in prop::collection::vec(topic_name(), 1..8),
        publisher in 0..5u8,
    ) {
        let mut store = SubscriptionStore::default();
        let mut model: BTreeMap<ModelKey, SubscriptionOptions> = BTreeMap::new();
        for op in &ops {
            match op {
                Op::Subscribe { client, share, filter, qos, id, no_local, retain_as_published } => {
                    let options = SubscriptionOptions {
                        no_local: *no_local,
                        retain_as_published: *retain_as_published,
                        ..options(QoS::from_u8(*qos).unwrap(), *id)
                    };
                    let key = (client_id(*client), *share, filter.clone());
                    let result = store.subscribe(
                        &client_id(*client),
                        &subscription_filter(*share, filter),
                        options,
                    );
                    if share.is_some() && *no_local {
                        prop_assert_eq!(result, Err(SubscriptionError::NoLocalOnShared));
                        continue;
                    }
                    let previous = model.insert(key, options);
                    match previous {
                        Some(previous) => prop_assert_eq!(
                            result,
                            Ok(SubscribeOutcome::Replaced { previous })
                        ),
                        None => prop_assert_eq!(result, Ok(SubscribeOutcome::Created)),
                    }
                }
                Op::Unsubscribe { client, share, filter } => {
                    let key = (client_id(*client), *share, filter.clone());
                    let removed = store.unsubscribe(
                        &client_id(*client),
                        &subscription_filter(*share, filter),
                    );
                    prop_assert_eq!(removed, model.remove(&key));
                }
                Op::RemoveClient { client } => {
                    let id = client_id(*client);
                    let before = model.len();
                    model.retain(|(client, _, _), _| *client != id);
                    prop_assert_eq!(store.remove_client(&id), before - model.len());
                }
            }
            prop_assert_eq!(store.len(), model.len());
        }

        let publisher = client_id(publisher);
        for topic in &topics {
            let deliveries = store.matches(&name(topic), &publisher);
            let direct: BTreeMap<String, (QoS, bool, Vec<SubscriptionId>)> = deliveries
                .iter()
                .filter(|d| d.share_name.is_none())
                .map(|d| {
                    (
                        d.client_id.to_string(),
                        (d.qos, d.retain_as_published, d.subscription_ids.clone()),
                    )
                })
                .collect();
            let direct_count = deliveries.iter().filter(|d| d.share_name.is_none()).count();
            prop_assert_eq!(direct_count, direct.len(), "one delivery per client");
            prop_assert_eq!(&direct, &expected_direct(&model, topic, &publisher));

            // One delivery per matching shared subscription (share name + filter), to a member.
            let mut groups: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
            for (client, share, filter) in model.keys() {
                if let Some(share) = share
                    && reference_matches(filter, topic)
                {
                    groups.entry((share, filter)).or_default().insert(client);
                }
            }
            for share in ["g", "h"] {
                let got: Vec<&str> = deliveries
                    .iter()
                    .filter(|d| d.share_name.as_deref() == Some(share))
                    .map(|d| &*d.client_id)
                    .collect();
                let want = groups.keys().filter(|(name, _)| *name == share).count();
                prop_assert_eq!(got.len(), want, "one copy per group {}", share);
                for client in got {
                    prop_assert!(groups
                        .iter()
                        .any(|((name, _), members)| *name == share && members.contains(client)));
                }
            }
        }

        for client in 0..4 {
            store.remove_client(&client_id(client));
        }
        prop_assert!(store.is_empty());
        prop_assert_eq!(store.trie_node_count(), 1, "the trie is pruned back to its root");
    }

    #[test]
    fn templates_never_panic_and_render_their_exact_length(
        template in prop::collection::vec(
            prop::sample::select(vec![
                "{", "}", "{{", "}}", "{topic}", "{client_id}", "{level:0}", "{level:3}",
                "{level:", "x", "/",
            ]),
            0..8,
        ),
        topic in topic_name(),
    ) {
        let template: String = template.concat();
        if let Ok(compiled) = silt_gateways::mqtt::KeyTemplate::parse(&template) {
            let topic = name(&topic);
            let key = compiled.render(&topic, "client");
            prop_assert_eq!(key.len(), compiled.rendered_len(&topic, "client"));
            prop_assert_eq!(key.capacity(), key.len());
        }
    }
}
