"""Third-party MQTT clients against the broker: paho-mqtt (MQTTv311 and MQTTv5) and the
mosquitto_pub / mosquitto_sub command-line clients, publishing to and subscribing from each
other at every QoS, with the 5.0 properties a client sets arriving unchanged.
"""

import subprocess

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS, VERSION_IDS
from paho.mqtt.packettypes import PacketTypes


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_to_paho_in_order_at_each_qos(mqtt, topic, version, qos):
    subscriber = mqtt.paho(version)
    assert subscriber.subscribe(topic + "#", qos=2) == [2]
    publisher = mqtt.paho(version)
    payloads = [f"message {i}".encode() for i in range(50)]
    for payload in payloads:
        assert publisher.publish(topic + "data", payload, qos=qos) == 0
    received = subscriber.expect_messages(len(payloads))
    assert [m.payload for m in received] == payloads
    assert {m.topic for m in received} == {topic + "data"}
    assert {m.qos for m in received} == {qos}
    assert not any(m.retain for m in received)


@pytest.mark.parametrize("subscriber_version", VERSIONS, ids=["sub-v311", "sub-v5"])
@pytest.mark.parametrize("publisher_version", VERSIONS, ids=["pub-v311", "pub-v5"])
def test_paho_across_protocol_versions(mqtt, topic, publisher_version, subscriber_version):
    subscriber = mqtt.paho(subscriber_version)
    subscriber.subscribe(topic + "+/reading", qos=1)
    publisher = mqtt.paho(publisher_version)
    publisher.publish(topic + "sensor-7/reading", b"\x00\x01binary\xff", qos=1)
    message = subscriber.expect_message()
    assert (message.topic, message.payload, message.qos) == \
        (topic + "sensor-7/reading", b"\x00\x01binary\xff", 1)


def test_paho_v5_properties_pass_through(mqtt, topic):
    subscriber = mqtt.paho(V5)
    subscriber.subscribe(topic + "#", qos=1)
    publisher = mqtt.paho(V5)
    props = fx.paho_properties(PacketTypes.PUBLISH, [
        ("UserProperty", ("site", "north")),
        ("UserProperty", ("unit", "celsius")),
        # Repeated names are kept, in order.
        ("UserProperty", ("site", "south")),
        ("ContentType", "application/json"),
        ("PayloadFormatIndicator", 1),
        ("ResponseTopic", topic + "replies"),
        ("CorrelationData", b"\x01\x02request-9"),
        ("MessageExpiryInterval", 3600),
    ])
    publisher.publish(topic + "data", b'{"t": 21.5}', qos=1, props=props)
    message = subscriber.expect_message()
    assert message.payload == b'{"t": 21.5}'
    assert fx.user_properties(message) == [("site", "north"), ("unit", "celsius"),
                                           ("site", "south")]
    got = message.properties
    assert got.ContentType == "application/json"
    assert got.PayloadFormatIndicator == 1
    assert got.ResponseTopic == topic + "replies"
    assert got.CorrelationData == b"\x01\x02request-9"
    # The remaining lifetime: never more than the publisher gave [MQTT-3.3.2-6].
    assert 3590 <= got.MessageExpiryInterval <= 3600


def test_paho_v5_properties_are_dropped_for_a_v311_subscriber(mqtt, topic):
    subscriber = mqtt.paho(V311)
    subscriber.subscribe(topic + "#", qos=1)
    publisher = mqtt.paho(V5)
    props = fx.paho_properties(PacketTypes.PUBLISH, [("UserProperty", ("k", "v")),
                                                     ("ContentType", "text/plain")])
    publisher.publish(topic + "data", b"plain", qos=1, props=props)
    message = subscriber.expect_message()
    assert (message.topic, message.payload) == (topic + "data", b"plain")


def test_paho_large_payload(mqtt, topic):
    """Half a MiB: well under the default packet limit, spread over many TCP reads."""
    subscriber = mqtt.paho(V5)
    subscriber.subscribe(topic + "blob", qos=1)
    publisher = mqtt.paho(V311)
    payload = bytes(range(256)) * 2048
    publisher.publish(topic + "blob", payload, qos=1)
    assert subscriber.expect_message().payload == payload


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_unsubscribe_stops_delivery(mqtt, topic, version):
    subscriber = mqtt.paho(version)
    subscriber.subscribe(topic + "a", qos=1)
    subscriber.subscribe(topic + "b", qos=1)
    publisher = mqtt.paho(version)
    publisher.publish(topic + "a", b"1", qos=1)
    assert subscriber.expect_message().payload == b"1"
    subscriber.unsubscribe(topic + "a")
    publisher.publish(topic + "a", b"2", qos=1)
    # Whatever the broker did with the publish on a, it did before it handled b's.
    before = fx.barrier(publisher, subscriber, topic + "b")
    assert before == []


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_wildcards_match_as_the_spec_says(mqtt, topic, version):
    filters = {
        "+/temp": {"a/temp", "b/temp", "/temp"},
        "a/+": {"a/temp", "a/"},
        "a/#": {"a", "a/temp", "a/", "a/b/c", "a//c"},
        "a/+/c": {"a/b/c", "a//c"},
        "+": {"a"},
        "#": {"a", "a/temp", "b/temp", "a/", "a/b/c", "a//c", "/temp"},
    }
    # Topics are relative to the test's prefix, which is two levels deep; filters are too.
    subscribers = {}
    for topic_filter in filters:
        client = mqtt.raw(version)
        assert client.subscribe([(topic + topic_filter, 1), (topic + "barrier", 1)]) == [1, 1]
        subscribers[topic_filter] = client
    publisher = mqtt.raw(version)
    published = ["a", "a/temp", "b/temp", "a/", "a/b/c", "a//c", "/temp"]
    for name in published:
        assert publisher.publish(topic + name, name.encode(), qos=1) < 0x80
    for topic_filter, client in subscribers.items():
        got = {m.topic[len(topic):] for m in fx.barrier(publisher, client, topic + "barrier")
               if not m.payload.startswith(b"barrier-")}
        assert got == filters[topic_filter], topic_filter


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_dollar_topics_do_not_match_leading_wildcards(mqtt, topic, version):
    """4.7.2: `#` and `+/...` never match a topic starting with `$`: neither $SYS nor
    a `$` topic a client publishes to (which a server may also refuse)."""
    first, second, _ = topic.split("/")
    everything = mqtt.raw(version)
    everything.subscribe("#")
    plus = mqtt.raw(version)
    plus.subscribe([(f"+/{second}/x", 0), (topic + "barrier", 0)])
    dollar = mqtt.raw(version)
    try:
        dollar.publish(f"${first}/{second}/x", b"dollar", qos=1)
    except fx.Closed:
        pass  # the broker may refuse client publishes to $ topics, this way too
    publisher = mqtt.raw(version)
    for client in (everything, plus):
        got = fx.barrier(publisher, client, topic + "barrier")
        assert [m.topic for m in got if m.topic.startswith("$")] == []


@pytest.mark.parametrize("ending", ["disconnect", "close"])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_qos0_publish_right_before_the_connection_ends_is_delivered(mqtt, topic, version,
                                                                     ending):
    """What `mosquitto_pub -m` does by default: CONNECT, a QoS 0 PUBLISH, DISCONNECT at once
    (or just closing). The broker has read the PUBLISH before the end of the connection, so
    it forwards it like any other."""
    subscriber = mqtt.raw(V5)
    subscriber.subscribe([(topic + "#", 0)])
    publisher = mqtt.raw(version)
    publisher.publish(topic + "last-words", b"sent at QoS 0", qos=0)
    if ending == "disconnect":
        publisher.disconnect()
    else:
        publisher.close()
    message = subscriber.expect_publish()
    assert (message.topic, message.payload) == (topic + "last-words", b"sent at QoS 0")


# ---- mosquitto_pub and mosquitto_sub --------------------------------------------------------

@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_pub_to_mosquitto_sub(broker, mqtt, topic, version, qos):
    subscriber = mqtt.sub(version, topic, "-t", topic + "#", "-q", "2")
    subscriber.ready()
    # -l: one message per stdin line, all over one connection.
    lines = [f"line {i}" for i in range(20)]
    result = subprocess.run(
        [fx.MOSQUITTO_PUB, *fx.mosquitto_args(broker, version), "-t", topic + "lines",
         "-q", str(qos), "-l"],
        input=("\n".join(lines) + "\n").encode(), capture_output=True, timeout=fx.TIMEOUT)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    received = [subscriber.expect() for _ in lines]
    assert [line["payload"] for line in received] == lines
    assert {line["topic"] for line in received} == {topic + "lines"}
    assert {line["qos"] for line in received} == {qos}


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_pub_default_qos_reaches_paho(broker, mqtt, topic, version):
    subscriber = mqtt.paho(version)
    subscriber.subscribe(topic + "#", qos=1)
    fx.run_pub(broker, version, "-t", topic + "plain", "-m", "no -q given")
    message = subscriber.expect_message()
    assert (message.topic, message.payload, message.qos) == (topic + "plain", b"no -q given", 0)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_pub_to_paho(broker, mqtt, topic, version):
    subscriber = mqtt.paho(version)
    subscriber.subscribe(topic + "#", qos=2)
    fx.run_pub(broker, version, "-t", topic + "cli", "-m", "from the command line", "-q", "2")
    message = subscriber.expect_message()
    assert (message.topic, message.payload, message.qos) == \
        (topic + "cli", b"from the command line", 2)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_to_mosquitto_sub(mqtt, topic, version):
    subscriber = mqtt.sub(version, topic, "-t", topic + "#", "-q", "1")
    subscriber.ready()
    publisher = mqtt.paho(version)
    publisher.publish(topic + "to-cli", b"from paho", qos=1)
    line = subscriber.expect()
    assert (line["topic"], line["payload"], line["qos"]) == (topic + "to-cli", "from paho", 1)


def test_mosquitto_v5_properties_both_ways(broker, mqtt, topic):
    paho_sub = mqtt.paho(V5)
    paho_sub.subscribe(topic + "from-cli", qos=1)
    fx.run_pub(broker, V5, "-t", topic + "from-cli", "-m", "x", "-q", "1",
               "-D", "publish", "user-property", "site", "north",
               "-D", "publish", "content-type", "text/plain")
    message = paho_sub.expect_message()
    assert fx.user_properties(message) == [("site", "north")]
    assert message.properties.ContentType == "text/plain"

    cli_sub = mqtt.sub(V5, topic, "-t", topic + "from-paho", "-q", "1")
    cli_sub.ready()
    publisher = mqtt.paho(V5)
    props = fx.paho_properties(PacketTypes.PUBLISH, [("UserProperty", ("unit", "kPa")),
                                                     ("ContentType", "application/cbor")])
    publisher.publish(topic + "from-paho", b"y", qos=1, props=props)
    line = cli_sub.expect()
    assert line["payload"] == "y"
    assert line["properties"]["user-properties"] == {"unit": "kPa"}
    assert line["properties"]["content-type"] == "application/cbor"


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_sub_persistent_session(broker, mqtt, topic, version):
    """mosquitto_sub -c keeps its session: what is published while it is away (QoS 1) is
    delivered when it comes back with the same client id."""
    client_id = "cli-" + topic.split("/")[1] + str(version)
    session = ["-c", "-i", client_id, "-q", "1"] + (["-x", "300"] if version == V5 else [])
    first = mqtt.sub(version, topic, "-t", topic + "queued", *session)
    first.ready()
    first.stop()
    for i in range(3):
        fx.run_pub(broker, version, "-t", topic + "queued", "-m", f"offline {i}", "-q", "1")
    second = mqtt.sub(version, topic, "-t", topic + "queued", *session)
    assert [second.expect()["payload"] for _ in range(3)] == \
        ["offline 0", "offline 1", "offline 2"]
