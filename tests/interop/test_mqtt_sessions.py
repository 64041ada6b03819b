"""Sessions and QoS: persistent sessions (3.1.1 clean session 0, 5.0 clean start 0 with a
session expiry), messages queued while offline, session expiry, message expiry of queued
messages, redelivery of unacknowledged messages, session takeover, the full QoS 2 flows; and,
for silt, sessions and retained messages surviving a broker restart.
"""

import struct
import time

import mqtt_raw

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS, VERSION_IDS


def session_args(version, expiry=300):
    """Connect arguments of a raw client resuming a persistent session."""
    return {"clean": False, "props": [("session_expiry", expiry)] if version == V5 else []}


def client_id_for(topic, name):
    return f"{name}-{topic.split('/')[1]}"


# ---- persistent sessions --------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_persistent_session_gets_what_was_published_while_offline(mqtt, topic, version):
    client_id = client_id_for(topic, f"paho{version}")
    first = mqtt.paho(version, client_id=client_id, clean=False,
                      session_expiry=300 if version == V5 else None)
    first.subscribe(topic + "#", qos=2)
    first.disconnect()
    publisher = mqtt.paho(version)
    sent = [(f"{topic}q{qos}", f"offline {i} qos {qos}".encode(), qos)
            for i in range(3) for qos in (1, 2)]
    for name, payload, qos in sent:
        publisher.publish(name, payload, qos=qos)
    second = mqtt.paho(version, client_id=client_id, clean=False,
                       session_expiry=300 if version == V5 else None, connect=False)
    session_present, _, _ = second.connect()
    assert session_present
    got = [(m.topic, m.payload, m.qos) for m in second.expect_messages(len(sent))]
    # Order is kept per topic (4.6), not across topics.
    for name in (topic + "q1", topic + "q2"):
        assert [m for m in got if m[0] == name] == [m for m in sent if m[0] == name]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_clean_start_discards_the_session(mqtt, topic, version):
    client_id = client_id_for(topic, "clean")
    first = mqtt.raw(version, client_id, **session_args(version))
    first.subscribe([(topic + "#", 1)])
    first.disconnect()
    publisher = mqtt.raw(version)
    publisher.publish(topic + "x", b"lost", qos=1)
    fresh = mqtt.raw(version, client_id, clean=True)
    assert not fresh.connack.session_present
    publisher.publish(topic + "x", b"not subscribed", qos=1)
    # A barrier needs a subscription; this one is new, so anything before it is a leftover.
    fresh.subscribe([(topic + "barrier", 0)])
    assert fx.barrier(publisher, fresh, topic + "barrier") == []


def test_session_expiry_zero_ends_the_session_at_disconnect(mqtt, topic):
    client_id = client_id_for(topic, "zero")
    first = mqtt.raw(V5, client_id, clean=True)  # no Session Expiry Interval: 0
    first.subscribe([(topic + "#", 1)])
    first.disconnect()
    again = mqtt.raw(V5, client_id, clean=False)
    assert not again.connack.session_present


def test_session_expires_after_its_interval(mqtt, topic):
    client_id = client_id_for(topic, "expiring")
    first = mqtt.raw(V5, client_id, **session_args(V5, expiry=1))
    first.subscribe([(topic + "#", 1)])
    first.disconnect()
    time.sleep(2.5)  # the test is about time: past the 1 s expiry, with slack
    again = mqtt.raw(V5, client_id, **session_args(V5, expiry=1))
    assert not again.connack.session_present


def test_disconnect_can_shorten_the_session_expiry(mqtt, topic):
    """5.0 3.14.2.2.2: a DISCONNECT may set the Session Expiry Interval (here to 0: the
    session ends now)."""
    client_id = client_id_for(topic, "shorten")
    first = mqtt.raw(V5, client_id, **session_args(V5, expiry=300))
    first.subscribe([(topic + "#", 1)])
    # MQTT orders nothing across connections: wait until the broker has handled the
    # DISCONNECT (it closes the connection) before connecting again.
    body = bytes([0]) + mqtt_raw.encode_properties([("session_expiry", 0)])
    first.send(mqtt_raw.frame(mqtt_raw.DISCONNECT << 4, body))
    first.wait_closed()
    again = mqtt.raw(V5, client_id, **session_args(V5))
    assert not again.connack.session_present


def test_queued_message_expiry(mqtt, topic):
    """5.0 3.3.2.3.3: a queued message whose expiry passed while the client was away is not
    delivered; the others carry their remaining lifetime."""
    client_id = client_id_for(topic, "expiry")
    first = mqtt.raw(V5, client_id, **session_args(V5))
    first.subscribe([(topic + "#", 1)])
    first.disconnect()
    publisher = mqtt.raw(V5)
    publisher.publish(topic + "short", b"expires", qos=1, props=[("message_expiry", 1)])
    publisher.publish(topic + "long", b"survives", qos=1, props=[("message_expiry", 60)])
    publisher.publish(topic + "none", b"forever", qos=1)
    time.sleep(2.2)  # the test is about time: past the 1 s expiry
    again = mqtt.raw(V5, client_id, **session_args(V5))
    assert again.connack.session_present
    long, forever = again.expect_publish(), again.expect_publish()
    assert long.payload == b"survives"
    assert 50 <= long.props["message_expiry"] <= 58
    assert (forever.payload, forever.props.get("message_expiry")) == (b"forever", None)
    again.subscribe([(topic + "barrier", 0)])
    assert fx.barrier(publisher, again, topic + "barrier") == []


# ---- redelivery and takeover ----------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_unacknowledged_qos1_is_redelivered_with_dup(mqtt, topic, version):
    """3.1.1 4.4 / 5.0 4.4: on reconnect with the session, unacknowledged PUBLISHes are sent
    again, DUP set, same packet id."""
    client_id = client_id_for(topic, "redeliver")
    first = mqtt.raw(version, client_id, **session_args(version))
    first.subscribe([(topic + "#", 1)])
    publisher = mqtt.raw(version)
    publisher.publish(topic + "x", b"ack me", qos=1)
    original = first.expect_publish(ack=False)
    assert not original.dup
    first.close()  # without PUBACK
    again = mqtt.raw(version, client_id, **session_args(version))
    assert again.connack.session_present
    resent = again.expect_publish()
    assert (resent.payload, resent.dup, resent.packet_id) == (b"ack me", True,
                                                             original.packet_id)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_qos2_pubrel_is_resent_after_reconnect(mqtt, topic, version):
    """After PUBREC, the server owes a PUBREL; on reconnect it sends PUBREL again (not the
    PUBLISH), and the message is delivered exactly once."""
    client_id = client_id_for(topic, "pubrel")
    first = mqtt.raw(version, client_id, **session_args(version))
    first.subscribe([(topic + "#", 2)])
    publisher = mqtt.raw(version)
    publisher.publish(topic + "x", b"exactly once", qos=2)
    message = first.expect_publish(ack=False)
    first.send(fx.frame(fx.PUBREC << 4, struct.pack(">H", message.packet_id)))
    first.expect(fx.PUBREL)
    first.close()  # without PUBCOMP
    again = mqtt.raw(version, client_id, **session_args(version))
    assert again.connack.session_present
    packet_id, _, _ = again.decode_ack(again.expect(fx.PUBREL))
    assert packet_id == message.packet_id
    again.send(fx.frame(fx.PUBCOMP << 4, struct.pack(">H", packet_id)))
    again.subscribe([(topic + "barrier", 0)])
    assert fx.barrier(publisher, again, topic + "barrier") == []


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_qos2_inbound_duplicate_is_delivered_once(mqtt, topic, version):
    """The full inbound flow PUBLISH, PUBREC, PUBREL, PUBCOMP; a PUBLISH resent with DUP
    before PUBREL is the same message, delivered once (4.3.3)."""
    subscriber = mqtt.raw(version)
    subscriber.subscribe([(topic + "#", 2)])
    publisher = mqtt.raw(version)
    packet_id = 321
    publish = publisher.publish_packet(topic + "x", b"once", 2, packet_id=packet_id)
    publisher.send(publish)
    assert publisher.decode_ack(publisher.expect(fx.PUBREC))[:2] == (packet_id, 0)
    publisher.send(publisher.publish_packet(topic + "x", b"once", 2, packet_id=packet_id,
                                            dup=True))
    assert publisher.decode_ack(publisher.expect(fx.PUBREC))[0] == packet_id
    publisher.send(fx.frame((fx.PUBREL << 4) | 2, struct.pack(">H", packet_id)))
    assert publisher.decode_ack(publisher.expect(fx.PUBCOMP))[:2] == (packet_id, 0)
    message = subscriber.expect_publish()  # completes the outbound flow, checking PUBREL
    assert (message.payload, message.qos) == (b"once", 2)
    assert fx.barrier(publisher, subscriber, topic + "barrier") == []


@pytest.mark.parametrize("version", [
    pytest.param(V311, id="v311"),
    pytest.param(V5, id="v5", marks=fx.mosquitto_violates(
        "it closes the taken-over connection without DISCONNECT 0x8E (Session taken over)")),
])
def test_session_takeover(mqtt, topic, version):
    """A second connection with the same client id closes the first (5.0: DISCONNECT 0x8E,
    Session taken over) and keeps its session."""
    client_id = client_id_for(topic, "takeover")
    first = mqtt.raw(version, client_id, **session_args(version))
    first.subscribe([(topic + "#", 1)])
    second = mqtt.raw(version, client_id, **session_args(version))
    assert second.connack.session_present
    assert first.expect_disconnect() == (0x8E if version == V5 else None)
    publisher = mqtt.raw(version)
    publisher.publish(topic + "x", b"to the new one", qos=1)
    assert second.expect_publish().payload == b"to the new one"


# ---- silt: across a restart -----------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_sessions_and_retained_messages_survive_a_restart(make_broker, mqtt, topic, version):
    fx.silt_only("persistence across a broker restart (the Mosquitto used to check this "
                 "suite runs in memory)")
    broker = make_broker()
    client_id = client_id_for(topic, "restart")
    first = mqtt.raw(version, client_id, broker=broker, **session_args(version))
    first.subscribe([(topic + "#", 1)])
    first.disconnect()
    publisher = mqtt.raw(version, broker=broker)
    publisher.publish(topic + "kept", b"retained", qos=1, retain=True)
    for i in range(5):
        publisher.publish(topic + "queued", f"offline {i}".encode(), qos=1)
    publisher.close()
    broker.restart()
    again = mqtt.raw(version, client_id, broker=broker, **session_args(version))
    assert again.connack.session_present
    got = [again.expect_publish() for _ in range(6)]
    assert sorted((m.topic, m.payload) for m in got) == sorted(
        [(topic + "kept", b"retained")] + [(topic + "queued", f"offline {i}".encode())
                                           for i in range(5)])
    queued = [m.payload for m in got if m.topic == topic + "queued"]
    assert queued == [f"offline {i}".encode() for i in range(5)]
    late = mqtt.raw(version, broker=broker)
    late.subscribe([(topic + "kept", 1)])
    message = late.expect_publish()
    assert (message.payload, message.retain) == (b"retained", True)
