"""silt only: what third-party clients publish ends up in the edge's log, read back with
`silt-edge dump` once the broker has stopped. The default route: log topic `mqtt`, keyed by
the MQTT topic name; headers mqtt.topic, mqtt.qos, mqtt.retain, mqtt.client_id, then (5.0)
mqtt.content_type and mqtt.payload_format when set, then the user properties in order.
"""

import threading
import time

import pytest

import mqtt_fixtures as fx
from mqtt_fixtures import V5, VERSIONS
from paho.mqtt.packettypes import PacketTypes

pytestmark = pytest.mark.usefixtures("silt_target")


@pytest.fixture
def silt_target():
    fx.silt_only("the log is silt's: read back with silt-edge dump")


def records_by_client(records):
    grouped = {}
    for record in records:
        grouped.setdefault(fx.header(record, "mqtt.client_id"), []).append(record)
    return grouped


def in_log_order(records):
    return sorted(records, key=lambda r: (r["partition"], r["offset"]))


def test_every_acknowledged_message_is_in_the_log_in_per_client_order(make_broker, mqtt,
                                                                       topic):
    """Several paho clients (3.1.1 and 5.0) publish QoS 1 at once; each message paho saw
    PUBACKed is in the log once, and each client's messages to a topic are in publish order
    (one key, one partition)."""
    broker = make_broker()
    started_ms = int(time.time() * 1000)
    per_client = 60
    ids = [f"log-{i}-{topic.split('/')[1]}" for i in range(4)]
    clients = {client_id: mqtt.paho(VERSIONS[i % 2], broker=broker, client_id=client_id)
               for i, client_id in enumerate(ids)}
    acked = {client_id: [] for client_id in clients}
    errors = []

    def publish_all(client_id, client):
        try:
            infos = [(f"{client_id} #{n}".encode(),
                      client.publish(f"{topic}{client_id}", f"{client_id} #{n}".encode(), qos=1,
                                     wait=False)) for n in range(per_client)]
            for payload, info in infos:
                info.wait_for_publish(timeout=fx.TIMEOUT)
                if info.is_published():
                    acked[client_id].append(payload)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=publish_all, args=item) for item in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for client_id in clients:
        assert len(acked[client_id]) == per_client, "every publish was acknowledged"
    for client in clients.values():
        client.disconnect()

    records = broker.dump("mqtt")
    grouped = records_by_client(records)
    for client_id, payloads in acked.items():
        mine = in_log_order(grouped.get(client_id, []))
        assert [fx.as_bytes(r["value"]) for r in mine] == payloads
        for record in mine:
            assert record["topic"] == "mqtt"
            assert record["key"] == f"{topic}{client_id}"
            assert fx.header(record, "mqtt.topic") == f"{topic}{client_id}"
            assert fx.header(record, "mqtt.qos") == "1"
            assert fx.header(record, "mqtt.retain") == "false"
            assert started_ms - 5000 <= record["timestamp"] <= int(time.time() * 1000) + 5000
        assert len({r["partition"] for r in mine}) == 1


def test_log_record_headers_for_v5_properties(make_broker, mqtt, topic):
    broker = make_broker()
    client = mqtt.paho(V5, broker=broker, client_id="props-" + topic.split("/")[1])
    props = fx.paho_properties(PacketTypes.PUBLISH, [
        ("ContentType", "application/json"), ("PayloadFormatIndicator", 1),
        ("UserProperty", ("site", "north")), ("UserProperty", ("unit", "C")),
        ("UserProperty", ("site", "south"))])
    client.publish(topic + "reading", b'{"t":1}', qos=1, retain=True, props=props)
    client.disconnect()
    (record,) = [r for r in broker.dump("mqtt") if r["key"] == topic + "reading"]
    assert record["value"] == '{"t":1}'
    assert record["headers"] == [
        ["mqtt.topic", topic + "reading"], ["mqtt.qos", "1"], ["mqtt.retain", "true"],
        ["mqtt.client_id", "props-" + topic.split("/")[1]],
        ["mqtt.content_type", "application/json"], ["mqtt.payload_format", "utf8"],
        ["site", "north"], ["unit", "C"], ["site", "south"]]


@pytest.mark.parametrize("version", VERSIONS, ids=["v311", "v5"])
def test_every_qos_and_binary_payloads_reach_the_log(make_broker, mqtt, topic, version):
    """QoS 0, 1 and 2 from a raw client and from mosquitto_pub; binary payloads come back
    byte for byte. QoS 0 has no acknowledgement: a QoS 1 publish after it, on the same
    connection, shows the broker has read it."""
    broker = make_broker()
    client_id = f"raw{version}-" + topic.split("/")[1]
    raw = mqtt.raw(version, client_id, broker=broker)
    sent = []
    for qos in (0, 1, 2):
        payload = bytes([qos, 0x00, 0xFF, 0x80]) + f" qos {qos}".encode()
        raw.publish(topic + f"q{qos}", payload, qos=qos)
        sent.append((topic + f"q{qos}", payload, str(qos)))
    raw.publish(topic + "last", b"last", qos=1)
    raw.disconnect()
    cli_id = f"cli{version}-" + topic.split("/")[1]
    for qos in (0, 1, 2):
        fx.run_pub(broker, version, "-i", cli_id, "-t", topic + f"cli{qos}",
                   "-m", f"cli qos {qos}", "-q", str(qos))
    records = broker.dump("mqtt")
    grouped = records_by_client(records)
    mine = in_log_order(grouped[client_id])
    got = {(r["key"], fx.as_bytes(r["value"]), fx.header(r, "mqtt.qos")) for r in mine}
    assert set(sent) <= got
    cli = {(r["key"], r["value"], fx.header(r, "mqtt.qos")) for r in grouped[cli_id]}
    assert cli == {(topic + f"cli{qos}", f"cli qos {qos}", str(qos)) for qos in (0, 1, 2)}

