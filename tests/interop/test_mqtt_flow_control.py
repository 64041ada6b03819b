"""MQTT 5.0 flow control and size limits, both ways: Receive Maximum (DISCONNECT 0x93 when a
client exceeds the server's), Maximum Packet Size (exactly the limit passes, one byte over gets
DISCONNECT 0x95), and Topic Aliases (client to server, and server to client within the
client's Topic Alias Maximum).

A raw socket client does what a well-behaved library would refuse to: exceed the quota, pick
aliases, send a packet one byte too large.
"""

import queue
import struct

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, VERSIONS, VERSION_IDS
from paho.mqtt.packettypes import PacketTypes

RECEIVE_MAXIMUM = 4
MAX_PACKET = 2048
# A broker answers a bad packet at once; this bounds how long an expected-failure run waits.
DISCONNECT_WAIT = 5.0


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A broker with a small Receive Maximum and Maximum Packet Size."""
    running = fx.Broker(tmp_path_factory.mktemp("limited"), fx.BrokerOptions(
        receive_maximum=RECEIVE_MAXIMUM, max_packet_bytes=MAX_PACKET))
    yield running
    running.stop()


# ---- Receive Maximum ------------------------------------------------------------------------

def test_connack_announces_the_configured_limits(mqtt, limited):
    client = mqtt.raw(V5, broker=limited)
    assert client.connack.props.get("receive_maximum") == RECEIVE_MAXIMUM
    assert client.connack.props.get("maximum_packet_size") == MAX_PACKET


def test_a_full_receive_window_is_accepted_and_freed(mqtt, limited, topic):
    """Up to Receive Maximum unacknowledged QoS 2 publishes are fine, and completing them
    (PUBREL/PUBCOMP) frees the quota for as many again (5.0 4.9 Flow Control)."""
    client = mqtt.raw(V5, broker=limited)
    for _round in range(3):
        ids = [client.packet_id() for _ in range(RECEIVE_MAXIMUM)]
        for packet_id in ids:
            client.send(client.publish_packet(topic + "w", b"x", 2, packet_id=packet_id))
        for packet_id in ids:
            got, code, _ = client.decode_ack(client.expect(fx.PUBREC))
            assert (got, code < 0x80) == (packet_id, True)
        for packet_id in ids:
            client.send(fx.frame((fx.PUBREL << 4) | 2, struct.pack(">H", packet_id)))
        for packet_id in ids:
            assert client.decode_ack(client.expect(fx.PUBCOMP))[0] == packet_id
    client.ping()


@fx.mosquitto_violates("it never enforces its Receive Maximum on incoming publishes: it "
                       "answers every extra QoS 2 PUBLISH with PUBREC instead of DISCONNECT 0x93")
def test_exceeding_receive_maximum_gets_disconnect_0x93(mqtt, limited, topic):
    """QoS 2 publishes stay in the server's count until PUBCOMP, so withholding PUBREL makes
    the count exact whatever the timing. One more than Receive Maximum: DISCONNECT 0x93
    (Receive Maximum exceeded), 5.0 3.3.4."""
    client = mqtt.raw(V5, broker=limited)
    for packet_id in range(1, RECEIVE_MAXIMUM + 1):
        client.send(client.publish_packet(topic + "q", b"x", 2, packet_id=packet_id))
    for _ in range(RECEIVE_MAXIMUM):
        assert client.decode_ack(client.expect(fx.PUBREC))[1] < 0x80
    client.send(client.publish_packet(topic + "q", b"x", 2, packet_id=RECEIVE_MAXIMUM + 1))
    assert client.expect_disconnect(DISCONNECT_WAIT) == 0x93


@fx.mosquitto_violates("after one PUBACK frees one slot of the client's Receive Maximum it "
                       "sends two more QoS 1 messages, exceeding the client's quota")
def test_server_respects_the_client_receive_maximum(mqtt, topic):
    """5.0 3.3.4 / 4.9: never more unacknowledged QoS 1/2 PUBLISHes to the client than the
    Receive Maximum it announced; each PUBACK lets exactly one more through."""
    subscriber = mqtt.raw(V5, props=[("receive_maximum", 2)])
    subscriber.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(V5)
    for i in range(6):
        publisher.publish(topic + "m", str(i).encode(), qos=1)
    window = [subscriber.expect_publish(ack=False) for _ in range(2)]
    assert [m.payload for m in window] == [b"0", b"1"]
    subscriber.no_publish_within(0.5)
    received = list(window)
    for expected in range(2, 6):
        subscriber.ack(window.pop(0))
        window.append(subscriber.expect_publish(ack=False))
        assert window[-1].payload == str(expected).encode()
        received.append(window[-1])
        subscriber.no_publish_within(0.3)
    assert not any(m.dup for m in received)


# ---- Maximum Packet Size --------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_a_packet_of_exactly_the_maximum_size_is_accepted(mqtt, limited, topic, version):
    subscriber = mqtt.raw(V5, broker=limited)
    subscriber.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(version, broker=limited)
    packet = fx.sized_publish(publisher, topic + "big", MAX_PACKET, qos=1, packet_id=7)
    assert len(packet) == MAX_PACKET
    publisher.send(packet)
    got, code, _ = publisher.decode_ack(publisher.expect(fx.PUBACK))
    assert (got, code) == (7, 0)
    message = subscriber.expect_publish()
    assert message.topic == topic + "big"
    assert len(publisher.publish_packet(message.topic, message.payload, 1, packet_id=1)) \
        == MAX_PACKET


@fx.mosquitto_violates("it accepts (and PUBACKs) packets up to 2 bytes larger than the "
                       "Maximum Packet Size it announces")
@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_one_byte_over_the_maximum_size_closes_the_connection(mqtt, limited, topic, version):
    """5.0: DISCONNECT 0x95 (Packet too large) then close (3.2.2.3.6, 4.13); 3.1.1 has no
    DISCONNECT from the server: just the close. The message goes nowhere."""
    subscriber = mqtt.raw(V5, broker=limited)
    subscriber.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(version, broker=limited)
    publisher.send(fx.sized_publish(publisher, topic + "big", MAX_PACKET + 1, qos=1))
    reason = publisher.expect_disconnect(DISCONNECT_WAIT)
    assert reason == (0x95 if version == V5 else None)
    other = mqtt.raw(V5, broker=limited)
    assert fx.barrier(other, subscriber, topic + "after") == []


@fx.mosquitto_violates("it accepts (and PUBACKs) packets up to 2 bytes larger than the "
                       "Maximum Packet Size it announces")
def test_paho_at_the_packet_limit_and_one_byte_over(mqtt, limited, topic):
    """paho 5.0 publishes the largest payload that fits; one byte more and paho is told why
    it was disconnected: 0x95 (Packet too large)."""
    client = mqtt.paho(V5, broker=limited)
    name = topic + "paho"
    # Fixed header 3 (remaining length > 127), topic, packet id 2, property length 1.
    fits = MAX_PACKET - 3 - (2 + len(name)) - 2 - 1
    assert client.publish(name, b"p" * fits, qos=1) == 0
    # paho may already report the connection gone when this call returns: the broker can
    # answer before paho's own bookkeeping of the write is done. Its return code says nothing.
    client.client.publish(name, b"p" * (fits + 1), qos=1)
    try:
        code = client.disconnects.get(timeout=DISCONNECT_WAIT)
    except queue.Empty:
        raise AssertionError("paho was not disconnected") from None
    assert code.value == 0x95


def test_server_drops_what_exceeds_the_client_maximum_packet_size(mqtt, topic):
    """5.0 3.1.2.11.4: the server never sends a packet over the client's Maximum Packet
    Size; it discards the message for that client, and carries on."""
    small = mqtt.raw(V5, props=[("maximum_packet_size", 128)])
    small.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "big", b"x" * 500, qos=1)
    publisher.publish(topic + "small", b"fits", qos=1)
    message = small.expect_publish()
    assert (message.topic, message.payload) == (topic + "small", b"fits")
    small.ping()


# ---- Topic aliases --------------------------------------------------------------------------

def test_client_topic_aliases_resolve(mqtt, topic):
    """Client to server: alias set with a topic, then used alone; remapped by a later PUBLISH
    with the same alias and another topic (5.0 3.3.2.3.4). The subscriber, which announced
    no Topic Alias Maximum, gets full topic names and never an alias."""
    subscriber = mqtt.raw(V5)
    subscriber.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(V5)
    maximum = publisher.connack.props.get("topic_alias_maximum", 0)
    assert maximum >= 2, "the broker accepts topic aliases"
    sends = [
        (topic + "one", 1), ("", 1), ("", 1),
        (topic + "two", 2), ("", 2),
        (topic + "three", 1), ("", 1), ("", 2),
        (topic + "max", maximum), ("", maximum),
    ]
    for index, (name, alias) in enumerate(sends):
        code = publisher.publish(name, str(index).encode(), qos=1,
                                 props=[("topic_alias", alias)])
        assert code < 0x80
    expected = ["one", "one", "one", "two", "two", "three", "three", "two", "max", "max"]
    for index, suffix in enumerate(expected):
        message = subscriber.expect_publish()
        assert (message.topic, message.payload) == (topic + suffix, str(index).encode())
        assert "topic_alias" not in message.props


def test_paho_publishes_with_topic_aliases(mqtt, topic):
    subscriber = mqtt.paho(V5)
    subscriber.subscribe(topic + "#", qos=1)
    publisher = mqtt.paho(V5)
    alias = fx.paho_properties(PacketTypes.PUBLISH, [("TopicAlias", 1)])
    publisher.publish(topic + "aliased", b"first", qos=1, props=alias)
    publisher.publish("", b"second", qos=1, props=alias)
    got = subscriber.expect_messages(2)
    assert [(m.topic, m.payload) for m in got] == \
        [(topic + "aliased", b"first"), (topic + "aliased", b"second")]


def test_a_topic_alias_over_the_maximum_gets_disconnect_0x94(mqtt, topic):
    """5.0 3.3.2.3.4: an alias above the server's Topic Alias Maximum is 0x94 (Topic Alias
    invalid)."""
    client = mqtt.raw(V5)
    maximum = client.connack.props.get("topic_alias_maximum", 0)
    client.publish(topic + "x", b"x", qos=1, props=[("topic_alias", maximum + 1)], wait=False)
    assert client.expect_disconnect(DISCONNECT_WAIT) == 0x94


@fx.mosquitto_violates("it answers Topic Alias 0 with 0x81 (Malformed Packet), but the packet "
                       "parses: a value the protocol does not allow is a Protocol Error")
def test_topic_alias_zero_is_a_protocol_error(mqtt, topic):
    """5.0 3.3.2.3.4: alias 0 is not permitted; data that parses but is not allowed is a
    Protocol Error (1.2 Terminology), so 0x82, or 0x94 (Topic Alias invalid)."""
    client = mqtt.raw(V5)
    client.publish(topic + "x", b"x", qos=1, props=[("topic_alias", 0)], wait=False)
    assert client.expect_disconnect(DISCONNECT_WAIT) in (0x82, 0x94)


def test_an_unmapped_topic_alias_is_a_protocol_error(mqtt, topic):
    """An empty topic with an alias this connection never mapped: a Protocol Error (0x82);
    0x94 (Topic Alias invalid) is accepted too. Aliases do not outlive the connection, so a
    mapping made on an earlier connection does not count (5.0 3.3.2.3.4)."""
    first = mqtt.raw(V5, client_id="alias-" + topic.split("/")[1])
    first.publish(topic + "mapped", b"x", qos=1, props=[("topic_alias", 1)])
    first.disconnect()
    second = mqtt.raw(V5, client_id="alias-" + topic.split("/")[1])
    second.publish("", b"x", qos=1, props=[("topic_alias", 1)], wait=False)
    assert second.expect_disconnect(DISCONNECT_WAIT) in (0x82, 0x94)


def receive_resolving_aliases(client, count, maximum):
    """Reads `count` PUBLISHes, resolving server-to-client aliases as a client must; checks
    every alias is within the client's maximum and every empty topic has a mapping."""
    mapping = {}
    received = []
    used_alias = False
    for _ in range(count):
        message = client.expect_publish()
        alias = message.props.get("topic_alias")
        if alias is not None:
            assert 1 <= alias <= maximum, f"alias {alias} outside 1..{maximum}"
            used_alias = True
            if message.topic:
                mapping[alias] = message.topic
            else:
                assert alias in mapping, f"alias {alias} used before it was mapped"
                message.topic = mapping[alias]
        else:
            assert message.topic, "an empty topic name without a topic alias"
        received.append((message.topic, message.payload))
    return received, used_alias


def publish_alias_workload(mqtt, topic, client_maximum):
    subscriber = mqtt.raw(V5, props=[("topic_alias_maximum", client_maximum)])
    subscriber.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(V5)
    sent = []
    # More topics than aliases, repeated: an alias must be reused or remapped correctly.
    for round_ in range(3):
        for name in ("a", "b", "c", "d"):
            sent.append((topic + name, f"{name}{round_}".encode()))
            publisher.publish(topic + name, sent[-1][1], qos=1)
    received, used_alias = receive_resolving_aliases(subscriber, len(sent), client_maximum)
    assert received == sent
    return used_alias


def test_server_to_client_aliases_stay_within_the_client_maximum(mqtt, topic):
    """The server MAY use topic aliases toward a client that announced a Topic Alias Maximum;
    if it does, every alias is in 1..maximum and resolves to the right topic."""
    publish_alias_workload(mqtt, topic, client_maximum=2)


def test_server_uses_topic_aliases_toward_a_client_that_allows_them(mqtt, topic):
    fx.silt_only("sending topic aliases to clients is a MAY of the spec that silt implements "
              "and Mosquitto does not")
    assert publish_alias_workload(mqtt, topic, client_maximum=2)
