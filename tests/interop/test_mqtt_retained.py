"""Retained messages: set, replace, clear with an empty payload; the retain flag on delivery;
the 5.0 subscription options Retain Handling (0/1/2) and Retain As Published; retained
message expiry; and the command-line clients' -r.
"""

import subprocess
import time

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS, VERSION_IDS


def retained_now(mqtt, topic_filter, version=V5, options=1):
    """What a new subscriber to `topic_filter` gets at once: the retained messages, read
    until a barrier on the same connection's own topic."""
    client = mqtt.raw(version)
    barrier_topic = topic_filter.rstrip("#+/") + "/__barrier"
    client.subscribe([(topic_filter, options)])
    client.subscribe([(barrier_topic, 0)])
    publisher = mqtt.raw(version)
    got = fx.barrier(publisher, client, barrier_topic)
    client.close()
    publisher.close()
    return [m for m in got if m.topic != barrier_topic]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_retained_message_set_replaced_and_cleared(mqtt, topic, version):
    publisher = mqtt.raw(version)
    publisher.publish(topic + "state", b"v1", qos=1, retain=True)
    (message,) = retained_now(mqtt, topic + "state", version)
    assert (message.payload, message.retain, message.qos) == (b"v1", True, 1)

    publisher.publish(topic + "state", b"v2", qos=1, retain=True)
    assert [m.payload for m in retained_now(mqtt, topic + "state", version)] == [b"v2"]

    # An empty retained payload clears it (3.1.1 3.3.1.3, 5.0 3.3.1.3).
    publisher.publish(topic + "state", b"", qos=1, retain=True)
    assert retained_now(mqtt, topic + "state", version) == []


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_live_messages_are_forwarded_without_the_retain_flag(mqtt, topic, version):
    """3.1.1 3.3.1.3: the retain flag is 0 on messages sent to established subscriptions;
    in 5.0 that is Retain As Published = 0, the default."""
    subscriber = mqtt.raw(version)
    subscriber.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(version)
    publisher.publish(topic + "live", b"x", qos=1, retain=True)
    message = subscriber.expect_publish()
    assert (message.payload, message.retain) == (b"x", False)
    publisher.publish(topic + "live", b"", qos=1, retain=True)


def test_wildcard_subscription_gets_every_retained_message(mqtt, topic):
    publisher = mqtt.raw(V311)
    expected = {}
    for name in ("a", "b/c", "b/d", "e/f/g"):
        expected[topic + "tree/" + name] = name.encode()
        publisher.publish(topic + "tree/" + name, name.encode(), qos=1, retain=True)
    publisher.publish(topic + "elsewhere", b"no", qos=1, retain=True)
    got = retained_now(mqtt, topic + "tree/#")
    assert {m.topic: m.payload for m in got} == expected
    assert all(m.retain for m in got)
    assert {m.topic for m in retained_now(mqtt, topic + "tree/b/+")} == \
        {topic + "tree/b/c", topic + "tree/b/d"}


def test_retained_message_qos_is_the_minimum_of_publish_and_subscription(mqtt, topic):
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "q2", b"two", qos=2, retain=True)
    publisher.publish(topic + "q0", b"zero", qos=0, retain=True)
    # A QoS 0 publish has no acknowledgement: a barrier on the same connection orders it.
    publisher.publish(topic + "q1", b"one", qos=1, retain=True)
    got = {m.payload: m.qos for m in retained_now(mqtt, topic + "+", options=1)}
    assert got == {b"two": 1, b"zero": 0, b"one": 1}
    got = {m.payload: m.qos for m in retained_now(mqtt, topic + "+", options=2)}
    assert got == {b"two": 2, b"zero": 0, b"one": 1}


@pytest.mark.parametrize("handling", [0, 1, 2])
def test_retain_handling(mqtt, topic, handling):
    """5.0 3.8.3.1: 0 sends retained messages at every subscribe, 1 only when the
    subscription is new, 2 never."""
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "rh", b"kept", qos=1, retain=True)
    client = mqtt.raw(V5)
    client.subscribe([(topic + "barrier", 0)])
    options = fx.subscribe_options(qos=1, retain_handling=handling)
    client.subscribe([(topic + "rh", options)])
    first = [m.payload for m in fx.barrier(publisher, client, topic + "barrier")]
    client.subscribe([(topic + "rh", options)])  # the same subscription again
    again = [m.payload for m in fx.barrier(publisher, client, topic + "barrier")]
    assert (first, again) == {0: ([b"kept"], [b"kept"]),
                              1: ([b"kept"], []),
                              2: ([], [])}[handling]
    publisher.publish(topic + "rh", b"", qos=1, retain=True)


@pytest.mark.parametrize("as_published", [False, True])
def test_retain_as_published(mqtt, topic, as_published):
    """5.0 3.8.3.1: with Retain As Published the forwarded message keeps the publisher's
    retain flag; without it, the flag is 0."""
    client = mqtt.raw(V5)
    client.subscribe([(topic + "#", fx.subscribe_options(qos=1,
                                                          retain_as_published=as_published))])
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "rap", b"r", qos=1, retain=True)
    publisher.publish(topic + "rap-not", b"n", qos=1, retain=False)
    first, second = client.expect_publish(), client.expect_publish()
    assert (first.payload, first.retain) == (b"r", as_published)
    assert (second.payload, second.retain) == (b"n", False)
    publisher.publish(topic + "rap", b"", qos=1, retain=True)


def test_retained_message_expires(mqtt, topic):
    """5.0 3.3.2.3.3: a retained message with a Message Expiry Interval is not sent once it
    has expired; one that has not carries its remaining lifetime."""
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "short", b"gone", qos=1, retain=True,
                      props=[("message_expiry", 1)])
    publisher.publish(topic + "long", b"kept", qos=1, retain=True,
                      props=[("message_expiry", 100)])
    time.sleep(2.2)  # the test is about time: past the short expiry
    got = retained_now(mqtt, topic + "+")
    assert [m.payload for m in got] == [b"kept"]
    assert 90 <= got[0].props["message_expiry"] <= 98


def test_paho_retained(mqtt, topic):
    publisher = mqtt.paho(V5)
    publisher.publish(topic + "paho", b"retained by paho", qos=1, retain=True)
    subscriber = mqtt.paho(V311)
    subscriber.subscribe(topic + "paho", qos=1)
    message = subscriber.expect_message()
    assert (message.payload, message.retain) == (b"retained by paho", True)
    publisher.publish(topic + "paho", b"", qos=1, retain=True)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_clients_retained(broker, topic, version):
    fx.run_pub(broker, version, "-t", topic + "cli", "-m", "kept", "-r", "-q", "1")
    args = [fx.MOSQUITTO_SUB, *fx.mosquitto_args(broker, version), "-t", topic + "cli",
            "-C", "1", "-W", "5", "-F", "%r %p"]
    result = subprocess.run(args, capture_output=True, timeout=fx.TIMEOUT)
    assert (result.returncode, result.stdout) == (0, b"1 kept\n")
    # -n -r: an empty retained message clears it; mosquitto_sub then times out with nothing.
    fx.run_pub(broker, version, "-t", topic + "cli", "-n", "-r", "-q", "1")
    args[args.index("-W") + 1] = "1"
    result = subprocess.run(args, capture_output=True, timeout=fx.TIMEOUT)
    assert result.stdout == b""
