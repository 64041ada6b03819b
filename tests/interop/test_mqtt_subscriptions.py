"""Subscriptions: identifiers, overlapping filters, shared subscriptions, subscription options
(no-local, QoS), invalid filters, re-subscribing and unsubscribing.

ACL-refused subscriptions (0x87 / 0x80) are in test_mqtt_auth.py, which has the ACL broker.
"""

import queue
import time

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS, VERSION_IDS

# ---- subscription identifiers ---------------------------------------------------------------


def test_subscription_identifier_is_sent_with_matching_messages(mqtt, topic):
    client = mqtt.raw(V5)
    client.subscribe([(topic + "a/#", 1)], props=[("subscription_id", 42)])
    client.subscribe([(topic + "b/#", 1)])  # no identifier
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "a/x", b"1", qos=1)
    publisher.publish(topic + "b/x", b"2", qos=1)
    first, second = client.expect_publish(), client.expect_publish()
    assert (first.payload, first.props.get("subscription_id")) == (b"1", [42])
    assert (second.payload, second.props.get("subscription_id")) == (b"2", None)


def test_subscription_identifier_is_replaced_by_a_new_subscribe(mqtt, topic):
    client = mqtt.raw(V5)
    client.subscribe([(topic + "#", 1)], props=[("subscription_id", 1)])
    client.subscribe([(topic + "#", 1)], props=[("subscription_id", 268435455)])
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "x", b"x", qos=1)
    assert client.expect_publish().props.get("subscription_id") == [268435455]
    assert fx.barrier(publisher, client, topic + "barrier") == []


def test_retained_message_carries_the_subscription_identifier(mqtt, topic):
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "kept", b"r", qos=1, retain=True)
    client = mqtt.raw(V5)
    client.subscribe([(topic + "+", 1)], props=[("subscription_id", 7)])
    message = client.expect_publish()
    assert (message.payload, message.retain, message.props.get("subscription_id")) == \
        (b"r", True, [7])
    publisher.publish(topic + "kept", b"", qos=1, retain=True)


def overlapping_copies(mqtt, topic, publish_qos):
    """One client, two overlapping subscriptions (QoS 0 id 1, QoS 2 id 2, separate
    SUBSCRIBEs); one message. Returns the copies received before a barrier."""
    client = mqtt.raw(V5)
    client.subscribe([(topic + "a/+", 0)], props=[("subscription_id", 1)])
    client.subscribe([(topic + "a/#", 2)], props=[("subscription_id", 2)])
    client.subscribe([(topic + "barrier", 0)])
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "a/b", b"overlap", qos=publish_qos)
    copies = fx.barrier(publisher, client, topic + "barrier")
    assert copies and all(m.payload == b"overlap" for m in copies)
    return copies


@pytest.mark.parametrize("publish_qos", [1, 2])
def test_overlapping_subscriptions_deliver_as_the_spec_says(mqtt, topic, publish_qos):
    """5.0 3.3.4: the message is delivered respecting the maximum QoS of the matching
    subscriptions. A single copy carries every matching identifier; several copies carry one
    identifier each, at their own subscription's QoS."""
    copies = overlapping_copies(mqtt, topic, publish_qos)
    if len(copies) == 1:
        (copy,) = copies
        assert copy.qos == publish_qos
        assert sorted(copy.props.get("subscription_id", [])) == [1, 2]
    else:
        assert len(copies) == 2
        by_id = {tuple(m.props.get("subscription_id", [])): m for m in copies}
        assert set(by_id) == {(1,), (2,)}
        assert by_id[(1,)].qos == 0
        assert by_id[(2,)].qos == publish_qos


@pytest.mark.parametrize("publish_qos", [1, 2])
def test_overlapping_subscriptions_get_one_copy_with_every_identifier(mqtt, topic,
                                                                      publish_qos):
    fx.silt_only("one copy per message for overlapping subscriptions is silt's choice; the "
                 "spec also allows a copy per subscription, which Mosquitto sends")
    (copy,) = overlapping_copies(mqtt, topic, publish_qos)
    assert copy.qos == publish_qos
    assert sorted(copy.props.get("subscription_id", [])) == [1, 2]


@fx.mosquitto_violates("a 3.1.1 client with overlapping subscriptions gets one copy at the "
                       "QoS of one of them (0 here), not at the maximum of their QoS")
def test_overlapping_subscriptions_v311_respect_the_maximum_qos(mqtt, topic):
    """3.1.1 3.3.5: at least one copy at the maximum QoS of the matching subscriptions."""
    client = mqtt.raw(V311)
    client.subscribe([(topic + "a/+", 0), (topic + "a/#", 2), (topic + "barrier", 0)])
    publisher = mqtt.raw(V311)
    publisher.publish(topic + "a/b", b"overlap", qos=2)
    copies = fx.barrier(publisher, client, topic + "barrier")
    assert 1 <= len(copies) <= 2
    assert max(m.qos for m in copies) == 2


def test_paho_receives_subscription_identifiers(mqtt, topic):
    from paho.mqtt.packettypes import PacketTypes
    client = mqtt.paho(V5)
    props = fx.paho_properties(PacketTypes.SUBSCRIBE, [("SubscriptionIdentifier", 99)])
    client.subscribe(topic + "#", qos=1, props=props)
    publisher = mqtt.paho(V5)
    publisher.publish(topic + "x", b"x", qos=1)
    assert client.expect_message().properties.SubscriptionIdentifier == [99]


# ---- subscription options and QoS -----------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_delivery_qos_is_the_minimum_of_publish_and_subscription(mqtt, topic, version):
    client = mqtt.raw(version)
    assert client.subscribe([(topic + "q0", 0), (topic + "q1", 1), (topic + "q2", 2)]) == \
        [0, 1, 2]
    publisher = mqtt.raw(version)
    got = {}
    for sub_qos in (0, 1, 2):
        for pub_qos in (0, 1, 2):
            publisher.publish(topic + f"q{sub_qos}", f"{sub_qos}{pub_qos}".encode(), qos=pub_qos)
            message = client.expect_publish()
            got[message.payload.decode()] = message.qos
    assert got == {f"{s}{p}": min(s, p) for s in (0, 1, 2) for p in (0, 1, 2)}


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_subscribing_again_replaces_the_subscription(mqtt, topic, version):
    """3.1.1 3.8.4 / 5.0 3.8.4: the same filter again replaces the subscription (new QoS);
    messages are not duplicated."""
    client = mqtt.raw(version)
    assert client.subscribe([(topic + "x", 0)]) == [0]
    assert client.subscribe([(topic + "x", 1), (topic + "barrier", 0)]) == [1, 0]
    publisher = mqtt.raw(version)
    publisher.publish(topic + "x", b"once", qos=1)
    copies = fx.barrier(publisher, client, topic + "barrier")
    assert [(m.payload, m.qos) for m in copies] == [(b"once", 1)]


def test_no_local_subscription_does_not_echo_own_messages(mqtt, topic):
    client = mqtt.raw(V5)
    client.subscribe([(topic + "chat", fx.subscribe_options(qos=1, no_local=True)),
                      (topic + "barrier", 0)])
    other = mqtt.raw(V5)
    other.subscribe([(topic + "chat", 1)])
    client.publish(topic + "chat", b"mine", qos=1)
    assert other.expect_publish().payload == b"mine"
    assert fx.barrier(other, client, topic + "barrier") == []


def test_unsubscribe_reason_codes(mqtt, topic):
    client = mqtt.raw(V5)
    client.subscribe([(topic + "x", 1)])
    # 0x00 removed, 0x11 no subscription existed (5.0 3.11.3).
    assert client.unsubscribe([topic + "x", topic + "never"]) == [0x00, 0x11]


# ---- invalid filters ------------------------------------------------------------------------

# Relative to the test's topic prefix, except $share filters, which must come first.
INVALID_FILTERS = ["a/#/b", "a/b#", "a+/b", "#a", "$share/group", "$share/gr+oup/x",
                   "$share//x"]
SHARE_NAME_VIOLATION = fx.mosquitto_violates(
    "it accepts a shared subscription with an empty share name, or with no topic filter after "
    "the share name, which 4.8.2 forbids")
INVALID_CASES = [
    pytest.param(version, bad, id=f"{'v5' if version == V5 else 'v311'}-{bad}",
                 marks=[SHARE_NAME_VIOLATION] if bad in ("$share/group", "$share//x") else [])
    for version in VERSIONS for bad in INVALID_FILTERS
    # In 3.1.1, $share/... is an ordinary (valid) filter.
    if version == V5 or not bad.startswith("$share")
]


@pytest.mark.parametrize(("version", "bad"), INVALID_CASES)
def test_an_invalid_filter_is_refused(mqtt, topic, version, bad):
    """A misplaced wildcard, or a malformed shared subscription, is refused: in its SUBACK
    (0x8F Topic Filter invalid in 5.0, 0x80 in 3.1.1) or by closing the connection (5.0:
    DISCONNECT 0x81, 0x82 or 0x8F first; 3.1.1: no DISCONNECT). The broker carries on."""
    topic_filter = bad if bad.startswith("$share") else topic + bad
    client = mqtt.raw(version)
    client.send(client.subscribe_packet([(topic_filter, 1)], packet_id=1))
    try:
        packet = client.expect(fx.SUBACK)
    except fx.Closed:
        packet = None
    if packet is not None:
        _, codes, _ = client.decode_suback(packet)
        assert codes == [0x8F if version == V5 else 0x80]
    else:
        reason = client.expect_disconnect()
        assert reason in ((0x81, 0x82, 0x8F) if version == V5 else (None,))
    healthy = mqtt.raw(version)
    healthy.ping()


# ---- shared subscriptions -------------------------------------------------------------------

def shared_members(mqtt, topic, group, count):
    """`count` 5.0 clients in `$share/<group>/<topic>jobs/#`, each also subscribed (not
    shared) to the test's barrier topic."""
    members = []
    for _ in range(count):
        client = mqtt.raw(V5)
        assert client.subscribe([(f"$share/{group}/{topic}jobs/#", 1),
                                 (topic + "barrier", 0)]) == [1, 0]
        members.append(client)
    return members


def collect_from_members(members, total):
    """Reads from every member until `total` messages arrived between them."""
    got = [[] for _ in members]
    end = time.monotonic() + fx.TIMEOUT
    while sum(len(payloads) for payloads in got) < total:
        assert time.monotonic() < end, f"members got {got}"
        for index, member in enumerate(members):
            packet = member.read(0.02)
            if packet is not None:
                got[index].append(member.decode_publish(packet).payload)
                member.ack(member.decode_publish(packet))
    return got


def test_shared_subscription_gives_each_message_to_one_member(mqtt, topic):
    """5.0 4.8.2: each message goes to one member of the group, and the members share the
    load; another group, and a plain subscriber, each get every message."""
    group = "g" + topic.split("/")[1]
    members = shared_members(mqtt, topic, group, 2)
    (other_group,) = shared_members(mqtt, topic, group + "b", 1)
    plain = mqtt.raw(V5)
    plain.subscribe([(topic + "jobs/#", 1)])
    publisher = mqtt.raw(V5)
    sent = [f"job {i}".encode() for i in range(20)]
    for payload in sent:
        publisher.publish(topic + "jobs/a", payload, qos=1)
    assert [plain.expect_publish().payload for _ in sent] == sent
    assert [other_group.expect_publish().payload for _ in sent] == sent
    got = collect_from_members(members, len(sent))
    assert sorted(got[0] + got[1]) == sorted(sent)
    # Each member's share is in publish order.
    for payloads in got:
        assert payloads == [p for p in sent if p in payloads]
    # Round robin, or near it: both members do a fair part of the work.
    assert min(len(payloads) for payloads in got) >= len(sent) // 4, f"split {got}"
    # No member gets a second copy later.
    for member in members:
        assert fx.barrier(publisher, member, topic + "barrier") == []


def test_shared_subscription_survivor_takes_all_after_a_member_leaves(mqtt, topic):
    group = "s" + topic.split("/")[1]
    leaving, staying = shared_members(mqtt, topic, group, 2)
    leaving.disconnect()
    publisher = mqtt.raw(V5)
    sent = [f"after {i}".encode() for i in range(6)]
    for payload in sent:
        publisher.publish(topic + "jobs/b", payload, qos=1)
    assert [staying.expect_publish().payload for _ in sent] == sent


def test_paho_shared_subscription(mqtt, topic):
    group = "p" + topic.split("/")[1]
    members = [mqtt.paho(V5) for _ in range(2)]
    for member in members:
        assert member.subscribe(f"$share/{group}/{topic}work", qos=1) == [1]
    publisher = mqtt.paho(V5)
    sent = [f"w{i}".encode() for i in range(10)]
    for payload in sent:
        publisher.publish(topic + "work", payload, qos=1)
    got = []
    end = time.monotonic() + fx.TIMEOUT
    while len(got) < len(sent):
        assert time.monotonic() < end, f"got {got}"
        for member in members:
            try:
                got.append(member.messages.get(timeout=0.02).payload)
            except queue.Empty:
                pass
    assert sorted(got) == sorted(sent)
