"""Keep-alive: a silent client is disconnected once 1.5 x its keep-alive has passed (and not
before its keep-alive), PINGREQ keeps a connection open, and a broker configured with a
maximum keep-alive tells 5.0 clients that ask for more (or for 0, none) the value to use, as
Server Keep Alive in CONNACK.

These tests are about time: they wait on the clock, for 1 to 3 seconds.
"""

import threading
import time

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, V311, VERSIONS

MAX_KEEP_ALIVE = 10  # the smallest Mosquitto accepts
# How late past 1.5 x keep-alive a close may come on a loaded machine.
SLACK = 1.25


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    running = fx.Broker(tmp_path_factory.mktemp("capped"),
                        fx.BrokerOptions(max_keep_alive_secs=MAX_KEEP_ALIVE))
    yield running
    running.stop()


@pytest.mark.parametrize(("asked", "granted"), [(0, MAX_KEEP_ALIVE), (3600, MAX_KEEP_ALIVE),
                                                (65535, MAX_KEEP_ALIVE), (5, None),
                                                (MAX_KEEP_ALIVE, None)])
def test_server_keep_alive_caps_what_the_client_asks(mqtt, capped, asked, granted):
    """5.0 3.2.2.3.14: a client asking for 0 (no keep-alive) or more than the broker allows
    gets Server Keep Alive; one within the limit keeps its own (the property, if sent, equals
    what it asked)."""
    client = mqtt.raw(V5, broker=capped, keep_alive=asked)
    if granted is None:
        assert client.connack.props.get("server_keep_alive", asked) == asked
    else:
        assert client.connack.props.get("server_keep_alive") == granted


def test_no_server_keep_alive_without_a_configured_maximum(mqtt):
    client = mqtt.raw(V5, keep_alive=600)
    assert client.connack.props.get("server_keep_alive", 600) == 600


def test_paho_is_told_the_server_keep_alive(mqtt, capped):
    client = mqtt.paho(V5, broker=capped, keep_alive=3600)
    _, _, props = client.connack
    assert props.ServerKeepAlive == MAX_KEEP_ALIVE


@fx.mosquitto_violates("it checks keep-alives only every 6 seconds, so a silent client can "
                       "stay connected up to 6 s past 1.5 x its keep-alive")
def test_silent_clients_are_disconnected_at_one_and_a_half_keep_alives(mqtt):
    """3.1.1 3.1.2.10 / 5.0 3.1.2.10: no packet within 1.5 x keep-alive (1 s here): the
    server closes the connection; it must not before the keep-alive itself. Four clients
    (3.1.1 and 5.0 in turn), connected 1.5 s apart, so a broker that only checks now and then
    cannot pass by luck."""
    keep_alive = 1
    closed_after = {}
    errors = []

    def watch(index, client, connected):
        try:
            client.wait_closed(timeout=1.5 * keep_alive + SLACK)
            closed_after[index] = time.monotonic() - connected
        except AssertionError as error:
            errors.append(f"client {index}: {error}")

    threads = []
    for index in range(4):
        if index:
            time.sleep(1.5)
        client = mqtt.raw(VERSIONS[index % 2], keep_alive=keep_alive)
        thread = threading.Thread(target=watch, args=(index, client, time.monotonic()))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(seconds >= keep_alive - 0.05 for seconds in closed_after.values()), closed_after


def test_pingreq_keeps_the_connection_open(mqtt):
    client = mqtt.raw(V311, keep_alive=1)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        client.ping()
        time.sleep(0.5)  # the test is about time: pings within the keep-alive
    client.ping()


def test_server_keep_alive_is_enforced(make_broker, mqtt):
    fx.silt_only("a Server Keep Alive short enough to test: Mosquitto refuses "
                 "max_keepalive below 10 s")
    broker = make_broker(max_keep_alive_secs=2)
    client = mqtt.raw(V5, broker=broker, keep_alive=0)
    assert client.connack.props.get("server_keep_alive") == 2
    connected = time.monotonic()
    client.wait_closed(timeout=3 + SLACK)
    assert time.monotonic() - connected >= 2 - 0.05
