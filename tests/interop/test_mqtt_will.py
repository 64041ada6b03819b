"""Will messages: published when a connection ends without DISCONNECT (closed, killed, or
silent past keep-alive), not after a normal DISCONNECT; and the 5.0 Will Delay Interval:
published only once the delay has passed, not at all if the client comes back within it, and
at once when the session ends first.

Some of these are about time and so wait on the clock: delays are 1 to 3 seconds.
"""

import signal
import textwrap
import time

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS, VERSION_IDS

# How long, beyond what the spec allows, a will may take to appear on a loaded machine.
SLACK = 1.5


def will(topic, payload=b"gone", qos=1, retain=False, props=()):
    return {"topic": topic, "payload": payload, "qos": qos, "retain": retain,
            "props": list(props)}


def watcher(mqtt, topic, version=V5):
    client = mqtt.raw(version)
    client.subscribe([(topic + "will/#", 1)])
    return client


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_will_on_a_dropped_connection(mqtt, topic, version):
    observer = watcher(mqtt, topic)
    client = mqtt.raw(version, client_id="dies-" + topic.split("/")[1],
                      will=will(topic + "will/a", b"\x00lost\xff", qos=1))
    client.ping()
    client.close()  # no DISCONNECT
    message = observer.expect_publish()
    assert (message.topic, message.payload, message.qos, message.retain) == \
        (topic + "will/a", b"\x00lost\xff", 1, False)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_no_will_after_a_normal_disconnect(mqtt, topic, version):
    observer = watcher(mqtt, topic)
    client = mqtt.raw(version, will=will(topic + "will/a"))
    client.disconnect()
    # Nothing to wait on for an event that must not happen: a short window.
    observer.no_publish_within(1.0)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_will_on_keep_alive_timeout(mqtt, topic, version):
    """A client silent for 1.5 x its keep-alive is disconnected, and its will published."""
    observer = watcher(mqtt, topic)
    client = mqtt.raw(version, keep_alive=1, will=will(topic + "will/silent"))
    started = time.monotonic()
    message = observer.expect_publish()
    assert message.topic == topic + "will/silent"
    # Not before the keep-alive itself (measured from the CONNACK, a little after the
    # broker's own clock started).
    assert time.monotonic() - started >= 0.95
    client.wait_closed()


def test_retained_will(mqtt, topic):
    observer = watcher(mqtt, topic)
    client = mqtt.raw(V311, will=will(topic + "will/status", b"offline", retain=True))
    client.close()
    # Once it is out, a subscriber that arrives afterwards gets it as a retained message.
    assert observer.expect_publish().payload == b"offline"
    late = mqtt.raw(V5)
    late.subscribe([(topic + "will/status", 1)])
    message = late.expect_publish()
    assert (message.payload, message.retain) == (b"offline", True)


def test_v5_disconnect_with_will_message(mqtt, topic):
    """Reason code 0x04 (Disconnect with Will Message): the will is published."""
    observer = watcher(mqtt, topic)
    client = mqtt.raw(V5, will=will(topic + "will/asked"))
    client.disconnect(reason=0x04)
    assert observer.expect_publish().topic == topic + "will/asked"


def test_v5_will_properties_pass_through(mqtt, topic):
    observer = watcher(mqtt, topic)
    props = [("user_property", ("cause", "crash")), ("content_type", "text/plain"),
             ("payload_format", 1), ("message_expiry", 300),
             ("response_topic", topic + "reply"), ("correlation_data", b"\x07")]
    client = mqtt.raw(V5, will=will(topic + "will/p", props=props))
    client.close()
    got = observer.expect_publish().props
    assert got["user_property"] == [("cause", "crash")]
    assert got["content_type"] == "text/plain"
    assert got["payload_format"] == 1
    assert 290 <= got["message_expiry"] <= 300
    assert got["response_topic"] == topic + "reply"
    assert got["correlation_data"] == b"\x07"


# ---- the 5.0 Will Delay Interval ------------------------------------------------------------

def test_will_is_published_only_after_its_delay(mqtt, topic):
    """5.0 3.1.3.2.2: the will waits for the delay (the session, 10 s, outlives it)."""
    observer = watcher(mqtt, topic)
    client = mqtt.raw(V5, client_id="delay-" + topic.split("/")[1],
                      props=[("session_expiry", 10)],
                      will=will(topic + "will/late", props=[("will_delay", 2)]))
    client.close()
    dropped = time.monotonic()
    observer.no_publish_within(1.5)
    message = observer.expect_publish(timeout=0.5 + 2 * SLACK)
    assert message.topic == topic + "will/late"
    assert time.monotonic() - dropped >= 1.9


def test_will_is_not_published_if_the_client_returns_within_the_delay(mqtt, topic):
    """5.0 3.1.3.2.2: a new connection to the session before the delay has passed cancels
    the will."""
    observer = watcher(mqtt, topic)
    client_id = "back-" + topic.split("/")[1]
    delayed = will(topic + "will/cancelled", props=[("will_delay", 2)])
    client = mqtt.raw(V5, client_id=client_id, props=[("session_expiry", 60)], will=delayed)
    client.close()
    back = mqtt.raw(V5, client_id=client_id, clean=False, props=[("session_expiry", 60)])
    assert back.connack.session_present
    # Past the delay, with slack: still nothing.
    observer.no_publish_within(2 + SLACK)
    back.disconnect()


def test_session_expiry_shorter_than_will_delay_publishes_at_session_end(mqtt, topic):
    """Session expiry 1 s, will delay 30 s: the will goes out when the session ends, after
    about 1 s, not 30 (5.0 3.1.3.2.2)."""
    observer = watcher(mqtt, topic)
    client = mqtt.raw(V5, client_id="short-" + topic.split("/")[1],
                      props=[("session_expiry", 1)],
                      will=will(topic + "will/session-end", props=[("will_delay", 30)]))
    client.close()
    dropped = time.monotonic()
    message = observer.expect_publish(timeout=1 + 2 * SLACK)
    assert message.topic == topic + "will/session-end"
    assert time.monotonic() - dropped >= 0.9


# ---- real clients dying ---------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_paho_client_killed_publishes_its_will(broker, mqtt, topic, version):
    observer = watcher(mqtt, topic)
    protocol = "MQTTv5" if version == V5 else "MQTTv311"
    child = fx.python_child(textwrap.dedent(f"""
        import sys, threading, time
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        connected = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.{protocol})
        client.on_connect = lambda *args: connected.set()
        client.will_set({topic + "will/paho"!r}, b"paho died", qos=1)
        client.connect({broker.host!r}, {broker.port})
        client.loop_start()
        connected.wait(10)
        print("connected", flush=True)
        time.sleep(60)
    """))
    try:
        assert child.stdout.readline().strip() == b"connected"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=fx.TIMEOUT)
        message = observer.expect_publish()
        assert (message.topic, message.payload) == (topic + "will/paho", b"paho died")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mosquitto_sub_killed_publishes_its_will(mqtt, topic, version):
    observer = watcher(mqtt, topic)
    sub = mqtt.sub(version, topic, "-t", topic + "nothing", "--will-topic",
                   topic + "will/cli", "--will-payload", "cli died", "--will-qos", "1")
    sub.ready()
    sub.process.send_signal(signal.SIGKILL)
    message = observer.expect_publish()
    assert (message.topic, message.payload) == (topic + "will/cli", b"cli died")
