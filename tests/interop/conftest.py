"""Fixtures of the MQTT interop suite (test_mqtt_*.py); see mqtt_fixtures for the target broker.

- `broker`: one broker per test module, default config (anonymous access on).
- `make_broker(**BrokerOptions fields)`: a broker of its own for a test that needs a config.
- `mqtt`: makes clients (raw, paho, mosquitto_sub) and closes them after the test.
- `topic`: a topic prefix unique to the test, so tests sharing a broker never see each other's
  messages or retained messages.

Kafka suites (test_kafka_*.py), see kafka_fixtures:
- `core`: one silt-core per test module; `kafka_topic`: a Kafka topic name unique to the test.
- `make_core(*flags)`: a silt-core of the test's own (restartable with `.restart()`).
"""

import hashlib

import pytest

import kafka_fixtures
import mqtt_fixtures as fx


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    running = fx.Broker(tmp_path_factory.mktemp("broker"), fx.BrokerOptions())
    yield running
    running.stop()


@pytest.fixture
def make_broker(tmp_path):
    started = []

    def make(**options):
        running = fx.Broker(tmp_path / f"broker{len(started)}", fx.BrokerOptions(**options))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


class Clients:
    """Client factory bound to one test; everything it made is closed at teardown."""

    def __init__(self, default_broker_getter):
        self._default = default_broker_getter
        self._made = []

    def raw(self, version=fx.V5, client_id="", broker=None, **connect):
        client = fx.raw_connect(broker or self._default(), version, client_id, **connect)
        self._made.append(client)
        return client

    def raw_unconnected(self, version=fx.V5, broker=None):
        client = fx.RawClient((broker or self._default()).addr, version)
        self._made.append(client)
        return client

    def paho(self, version=fx.V5, broker=None, **kwargs):
        client = fx.Paho(broker or self._default(), version, **kwargs)
        self._made.append(client)
        return client

    def sub(self, version, topic_prefix, *args, broker=None):
        client = fx.Sub(broker or self._default(), version, topic_prefix, *args)
        self._made.append(client)
        return client

    def close_all(self):
        for client in reversed(self._made):
            try:
                if isinstance(client, fx.Paho):
                    client.disconnect()
                elif isinstance(client, fx.Sub):
                    client.stop()
                else:
                    client.close()
            except Exception:  # noqa: BLE001 - teardown of a client the test already broke
                pass


@pytest.fixture
def mqtt(request):
    # The module's `broker` is only started when a test asks for a client without naming one.
    clients = Clients(lambda: request.getfixturevalue("broker"))
    yield clients
    clients.close_all()


@pytest.fixture
def topic(request):
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    return f"it/{digest}/"


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    running = kafka_fixtures.Core(tmp_path_factory.mktemp("core") / "data")
    yield running
    running.stop()


@pytest.fixture
def make_core(tmp_path):
    started = []

    def make(*flags):
        running = kafka_fixtures.Core(tmp_path / f"core{len(started)}", *flags)
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture
def kafka_topic(request):
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    return f"it-{digest}"
