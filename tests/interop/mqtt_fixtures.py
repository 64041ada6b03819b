"""Shared parts of the MQTT interop suite: the broker under test, a raw MQTT client, paho helpers.

The suite runs against `silt-edge` by default. With SILT_MQTT_TARGET=mosquitto it runs the same
tests against a local Mosquitto (/usr/sbin/mosquitto, started with a generated config on a free
port), which is how the tests themselves are checked against an independent implementation:
- tests of silt-only things (the log read back with `silt-edge dump`, persistence across a
  restart, silt's own config) call `silt_only()`, which skips them there, with the reason;
- where Mosquitto 2.0 breaks the spec, the test carries `mosquitto_violates(reason)`, a strict
  expected failure in mosquitto mode only, so the suite documents each known gap.

The silt binary: SILT_EDGE_BIN, or built now with cargo (as the kafka-python test does for
batchcat). Every wait in this module is on a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WORKSPACE_ROOT = Path(__file__).resolve().parents[2]

TARGET = os.environ.get("SILT_MQTT_TARGET", "silt")
if TARGET not in ("silt", "mosquitto"):
    raise RuntimeError(f"SILT_MQTT_TARGET must be 'silt' or 'mosquitto', not {TARGET!r}")

MOSQUITTO = os.environ.get("SILT_MOSQUITTO_BIN", "/usr/sbin/mosquitto")
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

# How long any single expected event may take. Generous: CI machines are shared and slow, and
# a passing test never waits this long.
TIMEOUT = 10.0
# How long a broker gets to start or stop.
START_TIMEOUT = 30.0

V311 = 4
V5 = 5
VERSIONS = [V311, V5]
VERSION_IDS = ["v311", "v5"]


def silt_only(reason):
    """Skips the calling test in mosquitto mode: it checks something only silt has."""
    if TARGET == "mosquitto":
        pytest.skip(f"silt-only: {reason}")


def mosquitto_violates(reason):
    """Marks a test Mosquitto 2.0 fails because it breaks the spec: a strict xfail there only."""
    return pytest.mark.xfail(condition=TARGET == "mosquitto", strict=True,
                             reason=f"Mosquitto 2.0.11 violates the spec: {reason}")


def deadline_wait(condition, timeout=TIMEOUT, what="condition", interval=0.02):
    """Polls `condition` until it returns a true value, which it returns; fails after timeout."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- the broker under test ------------------------------------------------------------------

@dataclass
class BrokerOptions:
    """What a test needs configured. Each field maps to a silt key and a Mosquitto option.

    silt keys (`--set`): mqtt.allow_anonymous, mqtt.password_file, mqtt.acl_file and
    mqtt.limits.<field of silt_gateways::mqtt::server::Limits>.
    """

    allow_anonymous: bool = True
    password_file: Path | None = None
    # The ACL in each broker's own format (they differ); both must say the same thing.
    acl_silt: str | None = None
    acl_mosquitto: str | None = None
    max_packet_bytes: int | None = None
    max_keep_alive_secs: int | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    # More silt `--set` pairs, for silt-only tests.
    silt_set: dict = field(default_factory=dict)


class Broker:
    """A running broker: `host`, `port`; `stop()`, `restart()`, and for silt `dump()`."""

    def __init__(self, workdir: Path, options: BrokerOptions):
        self.workdir = workdir
        self.options = options
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = None
        self.host = "127.0.0.1"
        self.port = None
        self.starts = 0
        self.start()

    @property
    def addr(self):
        return (self.host, self.port)

    def start(self):
        assert self.process is None, "broker already running"
        self.starts += 1
        self.log_path = self.workdir / f"broker-{self.starts}.log"
        if TARGET == "silt":
            self._start_silt()
        else:
            self._start_mosquitto()

    def _start_silt(self):
        options = self.options
        sets = {"mqtt.allow_anonymous": "true" if options.allow_anonymous else "false"}
        if options.password_file is not None:
            sets["mqtt.password_file"] = str(options.password_file)
        if options.acl_silt is not None:
            acl = self.workdir / "acl.silt"
            acl.write_text(options.acl_silt)
            sets["mqtt.acl_file"] = str(acl)
        for name in ("max_packet_bytes", "max_keep_alive_secs", "receive_maximum",
                     "topic_alias_maximum"):
            value = getattr(options, name)
            if value is not None:
                sets[f"mqtt.limits.{name}"] = str(value)
        sets.update(options.silt_set)
        args = [silt_edge_binary(), "--data-dir", str(self.data_dir),
                "--mqtt-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        # Only our flags configure it: no SILT_* from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SILT_")}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        started = re.compile(r"\bmqtt=\"?(\d+\.\d+\.\d+\.\d+):(\d+)")

        def listening():
            self._check_alive()
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "silt-edge started" in line:
                    match = started.search(line)
                    if match:
                        return match.groups()
            return None

        self.host, port = deadline_wait(listening, START_TIMEOUT, "the 'silt-edge started' line")
        self.port = int(port)

    def _start_mosquitto(self):
        options = self.options
        self.port = free_port()
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if options.allow_anonymous else 'false'}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # As root it would switch to user mosquitto, who cannot read our temporary files.
            "user root" if os.geteuid() == 0 else "",
        ]
        if options.password_file is not None:
            lines.append(f"password_file {options.password_file}")
        if options.acl_mosquitto is not None:
            acl = self.workdir / "acl.mosquitto"
            acl.write_text(options.acl_mosquitto)
            lines.append(f"acl_file {acl}")
        if options.max_packet_bytes is not None:
            lines.append(f"max_packet_size {options.max_packet_bytes}")
        if options.max_keep_alive_secs is not None:
            lines.append(f"max_keepalive {options.max_keep_alive_secs}")
        if options.receive_maximum is not None:
            # Mosquitto announces max_inflight_messages as its Receive Maximum.
            lines.append(f"max_inflight_messages {options.receive_maximum}")
        if options.topic_alias_maximum is not None:
            lines.append(f"max_topic_alias {options.topic_alias_maximum}")
        config = self.workdir / "mosquitto.conf"
        config.write_text("\n".join(line for line in lines if line) + "\n")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT)

        def accepting():
            self._check_alive()
            try:
                socket.create_connection(self.addr, timeout=1).close()
                return True
            except OSError:
                return False

        deadline_wait(accepting, START_TIMEOUT, "mosquitto to accept connections")

    def _check_alive(self):
        code = self.process.poll()
        if code is not None:
            raise AssertionError(f"broker exited with {code}:\n{self.log_text()}")

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        """SIGTERM, then waits for a clean exit; a broker that needs SIGKILL fails the test."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=START_TIMEOUT)
                raise AssertionError(f"broker ignored SIGTERM:\n{self.log_text()}")
        if TARGET == "silt":
            assert process.returncode == 0, \
                f"silt-edge exited with {process.returncode}:\n{self.log_text()}"

    def restart(self):
        self.stop()
        self.start()

    def dump(self, topic="mqtt"):
        """Stops the broker and returns the log's records of `topic` (`silt-edge dump`)."""
        assert TARGET == "silt"
        self.stop()
        result = subprocess.run(
            [silt_edge_binary(), "dump", "--data-dir", str(self.data_dir), "--topic", topic],
            capture_output=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return [json.loads(line) for line in result.stdout.decode().splitlines() if line]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_silt_edge = None


def silt_edge_binary():
    """Path of silt-edge: SILT_EDGE_BIN, or built now with cargo (once per run)."""
    global _silt_edge
    if _silt_edge is not None:
        return _silt_edge
    prebuilt = os.environ.get("SILT_EDGE_BIN")
    if prebuilt:
        _silt_edge = prebuilt
        return prebuilt
    build = subprocess.run(
        ["cargo", "build", "-p", "silt-edge", "--bin", "silt-edge",
         "--message-format=json-render-diagnostics"],
        cwd=WORKSPACE_ROOT, stdout=subprocess.PIPE, check=True,
    )
    # Ask cargo where it put the binary rather than guessing the target directory.
    for line in build.stdout.decode().splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message.get("executable") \
                and message["target"]["name"] == "silt-edge":
            _silt_edge = message["executable"]
            return _silt_edge
    raise AssertionError("cargo build did not report a silt-edge executable")


def make_password_file(path: Path, users: dict):
    """A mosquitto_passwd-format file (both brokers read it) with these users."""
    first = True
    for user, password in users.items():
        args = [MOSQUITTO_PASSWD, "-b", str(path), user, password]
        if first:
            args.insert(1, "-c")
            first = False
        subprocess.run(args, check=True, capture_output=True, timeout=30)
    return path


# ---- `silt-edge dump` records ---------------------------------------------------------------

def header_values(record, name):
    """Values of header `name` of a dumped record, in order."""
    return [value for key, value in record["headers"] if key == name]


def header(record, name):
    values = header_values(record, name)
    assert len(values) == 1, f"header {name} appears {len(values)} times in {record}"
    return values[0]


def as_bytes(value):
    """A dumped key/value/header: str when UTF-8, {"base64": ...} otherwise, None when null."""
    import base64
    if value is None:
        return None
    if isinstance(value, dict):
        return base64.b64decode(value["base64"])
    return value.encode()


# ---- a raw MQTT client ----------------------------------------------------------------------
# For what a real client library hides or refuses to do: exceeding the server's Receive
# Maximum, choosing topic aliases, sending an invalid filter, going silent past keep-alive,
# dropping the connection without DISCONNECT, not acknowledging.

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
PACKET_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
                7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
                12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}

# MQTT 5.0 properties: identifier -> (name, kind).
PROPERTY_KINDS = {
    0x01: ("payload_format", "byte"), 0x02: ("message_expiry", "u32"),
    0x03: ("content_type", "str"), 0x08: ("response_topic", "str"),
    0x09: ("correlation_data", "bin"), 0x0B: ("subscription_id", "varint"),
    0x11: ("session_expiry", "u32"), 0x12: ("assigned_client_id", "str"),
    0x13: ("server_keep_alive", "u16"), 0x15: ("auth_method", "str"),
    0x16: ("auth_data", "bin"), 0x17: ("request_problem_info", "byte"),
    0x18: ("will_delay", "u32"), 0x19: ("request_response_info", "byte"),
    0x1A: ("response_info", "str"), 0x1C: ("server_reference", "str"),
    0x1F: ("reason_string", "str"), 0x21: ("receive_maximum", "u16"),
    0x22: ("topic_alias_maximum", "u16"), 0x23: ("topic_alias", "u16"),
    0x24: ("maximum_qos", "byte"), 0x25: ("retain_available", "byte"),
    0x26: ("user_property", "pair"), 0x27: ("maximum_packet_size", "u32"),
    0x28: ("wildcard_available", "byte"), 0x29: ("subscription_ids_available", "byte"),
    0x2A: ("shared_available", "byte"),
}
PROPERTY_IDS = {name: ident for ident, (name, _) in PROPERTY_KINDS.items()}


def varint(value):
    out = bytearray()
    while True:
        byte = value % 128
        value //= 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def utf8(text):
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


def encode_properties(props):
    """`props`: a list of (name, value) pairs, repeated names allowed (user_property)."""
    body = bytearray()
    for name, value in props:
        ident = PROPERTY_IDS[name]
        kind = PROPERTY_KINDS[ident][1]
        body += varint(ident)
        if kind == "byte":
            body.append(value)
        elif kind == "u16":
            body += struct.pack(">H", value)
        elif kind == "u32":
            body += struct.pack(">I", value)
        elif kind == "varint":
            body += varint(value)
        elif kind in ("str", "bin"):
            body += utf8(value)
        elif kind == "pair":
            body += utf8(value[0]) + utf8(value[1])
    return varint(len(body)) + bytes(body)


class Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def remaining(self):
        return len(self.data) - self.pos

    def take(self, count):
        if count > self.remaining():
            raise AssertionError(f"malformed packet from the broker: {self.data.hex()}")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def byte(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def varint(self):
        value, shift = 0, 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def string(self):
        return self.take(self.u16()).decode()

    def binary(self):
        return self.take(self.u16())

    def properties(self):
        """A dict of name -> value; user_property and subscription_id -> lists."""
        end = self.varint() + self.pos
        props = {}
        while self.pos < end:
            ident = self.varint()
            name, kind = PROPERTY_KINDS[ident]
            if kind == "byte":
                value = self.byte()
            elif kind == "u16":
                value = self.u16()
            elif kind == "u32":
                value = self.u32()
            elif kind == "varint":
                value = self.varint()
            elif kind == "str":
                value = self.string()
            elif kind == "bin":
                value = self.binary()
            else:
                value = (self.string(), self.string())
            if name in ("user_property", "subscription_id"):
                props.setdefault(name, []).append(value)
            else:
                props[name] = value
        return props


def frame(first_byte, body):
    return bytes([first_byte]) + varint(len(body)) + bytes(body)


@dataclass
class Packet:
    kind: int
    flags: int
    body: bytes

    @property
    def name(self):
        return PACKET_NAMES.get(self.kind, str(self.kind))


@dataclass
class Connack:
    session_present: bool
    code: int
    props: dict


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    props: dict


class Closed(Exception):
    """The broker closed the connection; `packets` are what it sent before closing."""


class RawClient:
    """One MQTT connection over a plain socket, driven packet by packet."""

    def __init__(self, addr, version=V5, timeout=TIMEOUT):
        self.version = version
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buffer = bytearray()
        self.backlog = []
        self.eof = False
        self.next_id = 0

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def packet_id(self):
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def send(self, data):
        self.sock.sendall(data)

    # -- reading

    def _read_frame(self, timeout):
        """The next packet from the socket; None on timeout; raises Closed on EOF."""
        end = time.monotonic() + timeout
        while True:
            parsed = self._parse_frame()
            if parsed is not None:
                return parsed
            if self.eof:
                raise Closed("connection closed by the broker")
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buffer += chunk

    def _parse_frame(self):
        if len(self.buffer) < 2:
            return None
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(self.buffer):
                return None
            byte = self.buffer[pos]
            length |= (byte & 0x7F) << shift
            shift += 7
            pos += 1
            if not byte & 0x80:
                break
        if len(self.buffer) < pos + length:
            return None
        first = self.buffer[0]
        body = bytes(self.buffer[pos:pos + length])
        del self.buffer[:pos + length]
        return Packet(first >> 4, first & 0x0F, body)

    def read(self, timeout=TIMEOUT):
        """The next packet (backlog first), or None after `timeout`."""
        if self.backlog:
            return self.backlog.pop(0)
        return self._read_frame(timeout)

    def expect(self, kind, timeout=TIMEOUT):
        """The next packet of `kind`, setting others aside for later reads."""
        for index, packet in enumerate(self.backlog):
            if packet.kind == kind:
                return self.backlog.pop(index)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            packet = self._read_frame(max(left, 0)) if left > 0 else None
            if packet is None:
                raise AssertionError(f"no {PACKET_NAMES[kind]} within {timeout}s")
            if packet.kind == kind:
                return packet
            self.backlog.append(packet)

    def expect_publish(self, timeout=TIMEOUT, ack=True):
        """The next PUBLISH, decoded; QoS 1 is PUBACKed and QoS 2 completed unless ack=False."""
        message = self.decode_publish(self.expect(PUBLISH, timeout))
        if ack:
            self.ack(message)
        return message

    def no_publish_within(self, seconds):
        """Asserts that no PUBLISH arrives for `seconds` (only for tests about time)."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            packet = self.read(left)
            if packet is None:
                return
            assert packet.kind != PUBLISH, f"unexpected {self.decode_publish(packet)}"
            self.backlog.append(packet)

    def wait_closed(self, timeout=TIMEOUT):
        """Waits for the broker to close the connection; returns the packets it sent first."""
        packets = list(self.backlog)
        self.backlog.clear()
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"broker did not close the connection within {timeout}s;"
                                     f" it sent {[p.name for p in packets]}")
            try:
                packet = self._read_frame(left)
            except Closed:
                return packets
            except OSError:
                return packets
            if packet is not None:
                packets.append(packet)

    def expect_disconnect(self, timeout=TIMEOUT):
        """Waits for the close; returns the v5 DISCONNECT reason code the broker sent first
        (None if it closed without one, as 3.1.1 requires)."""
        packets = self.wait_closed(timeout)
        disconnects = [p for p in packets if p.kind == DISCONNECT]
        if not disconnects:
            return None
        body = disconnects[-1].body
        return body[0] if body else 0x00

    # -- decoding

    def decode_connack(self, packet):
        reader = Reader(packet.body)
        flags = reader.byte()
        code = reader.byte()
        props = reader.properties() if self.version == V5 and reader.remaining() else {}
        return Connack(bool(flags & 1), code, props)

    def decode_publish(self, packet):
        assert packet.kind == PUBLISH, f"expected PUBLISH, got {packet.name}"
        reader = Reader(packet.body)
        qos = (packet.flags >> 1) & 3
        topic = reader.string()
        packet_id = reader.u16() if qos else None
        props = reader.properties() if self.version == V5 else {}
        payload = reader.take(reader.remaining())
        return Message(topic, payload, qos, bool(packet.flags & 1), bool(packet.flags & 8),
                       packet_id, props)

    def decode_ack(self, packet):
        """(packet id, reason code, properties) of a PUBACK/PUBREC/PUBREL/PUBCOMP."""
        reader = Reader(packet.body)
        packet_id = reader.u16()
        code = reader.byte() if reader.remaining() else 0
        props = reader.properties() if reader.remaining() else {}
        return packet_id, code, props

    def decode_suback(self, packet):
        """(packet id, reason codes, properties) of a SUBACK/UNSUBACK."""
        reader = Reader(packet.body)
        packet_id = reader.u16()
        props = reader.properties() if self.version == V5 else {}
        return packet_id, list(reader.take(reader.remaining())), props

    # -- sending

    def connect(self, client_id="", clean=True, keep_alive=60, props=(), will=None,
                username=None, password=None, expect_code=0):
        """Sends CONNECT and returns the CONNACK. `will`: dict(topic, payload, qos, retain,
        props). Fails unless the CONNACK's code is `expect_code` (None: any)."""
        flags = 0x02 if clean else 0
        payload = utf8(client_id)
        if will is not None:
            flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
            if self.version == V5:
                payload += encode_properties(will.get("props", ()))
            payload += utf8(will["topic"]) + utf8(will.get("payload", b""))
        if username is not None:
            flags |= 0x80
            payload += utf8(username)
        if password is not None:
            flags |= 0x40
            payload += utf8(password)
        variable = utf8("MQTT") + bytes([self.version, flags]) + struct.pack(">H", keep_alive)
        if self.version == V5:
            variable += encode_properties(props)
        self.send(frame(CONNECT << 4, variable + payload))
        connack = self.decode_connack(self.expect(CONNACK))
        if expect_code is not None:
            assert connack.code == expect_code, f"CONNACK {connack}"
        return connack

    def publish_packet(self, topic, payload=b"", qos=0, retain=False, packet_id=None, props=(),
                       dup=False):
        body = utf8(topic)
        if qos:
            body += struct.pack(">H", packet_id)
        if self.version == V5:
            body += encode_properties(props)
        body += payload
        first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
        return frame(first, body)

    def publish(self, topic, payload=b"", qos=0, retain=False, props=(), wait=True):
        """Publishes; for QoS 1/2 with wait, completes the flow and returns the reason code
        of the PUBACK (QoS 1) or PUBREC (QoS 2)."""
        packet_id = self.packet_id() if qos else None
        self.send(self.publish_packet(topic, payload, qos, retain, packet_id, props))
        if not qos or not wait:
            return packet_id
        if qos == 1:
            got, code, _ = self.decode_ack(self.expect(PUBACK))
            assert got == packet_id
            return code
        got, code, _ = self.decode_ack(self.expect(PUBREC))
        assert got == packet_id
        if code >= 0x80:
            return code
        self.send(frame((PUBREL << 4) | 2, struct.pack(">H", packet_id)))
        got, _, _ = self.decode_ack(self.expect(PUBCOMP))
        assert got == packet_id
        return code

    def ack(self, message):
        """Acknowledges a received PUBLISH as the spec says for its QoS."""
        if message.qos == 1:
            self.send(frame(PUBACK << 4, struct.pack(">H", message.packet_id)))
        elif message.qos == 2:
            self.send(frame(PUBREC << 4, struct.pack(">H", message.packet_id)))
            got, _, _ = self.decode_ack(self.expect(PUBREL))
            assert got == message.packet_id
            self.send(frame(PUBCOMP << 4, struct.pack(">H", message.packet_id)))

    def subscribe_packet(self, filters, props=(), packet_id=None):
        """`filters`: list of (filter, options byte: QoS | no-local 4 | RAP 8 | RH << 4)."""
        body = struct.pack(">H", packet_id)
        if self.version == V5:
            body += encode_properties(props)
        for topic_filter, options in filters:
            body += utf8(topic_filter) + bytes([options])
        return frame((SUBSCRIBE << 4) | 2, body)

    def subscribe(self, filters, props=()):
        """Subscribes and returns the SUBACK's reason codes. `filters`: a filter string (QoS 0),
        or a list of (filter, options byte)."""
        if isinstance(filters, str):
            filters = [(filters, 0)]
        packet_id = self.packet_id()
        self.send(self.subscribe_packet(filters, props, packet_id))
        got, codes, _ = self.decode_suback(self.expect(SUBACK))
        assert got == packet_id
        return codes

    def unsubscribe(self, filters):
        packet_id = self.packet_id()
        body = struct.pack(">H", packet_id)
        if self.version == V5:
            body += encode_properties(())
        for topic_filter in filters:
            body += utf8(topic_filter)
        self.send(frame((UNSUBSCRIBE << 4) | 2, body))
        got, codes, _ = self.decode_suback(self.expect(UNSUBACK))
        assert got == packet_id
        return codes

    def ping(self):
        self.send(frame(PINGREQ << 4, b""))
        self.expect(PINGRESP)

    def disconnect(self, reason=0, props=()):
        """A normal DISCONNECT (v5: with `reason`, 0x04 = send the will), then close."""
        if self.version == V5:
            body = bytes([reason]) + encode_properties(props)
        else:
            body = b""
        try:
            self.send(frame(DISCONNECT << 4, body))
        finally:
            self.close()


def raw_connect(broker, version=V5, client_id="", **kwargs):
    """A RawClient connected (CONNACK 0) to `broker`."""
    client = RawClient(broker.addr, version)
    client.connack = client.connect(client_id, **kwargs)
    return client


def subscribe_options(qos=0, no_local=False, retain_as_published=False, retain_handling=0):
    return qos | (4 if no_local else 0) | (8 if retain_as_published else 0) | (retain_handling << 4)


def sized_publish(client, topic, total_bytes, qos=1, packet_id=1):
    """A PUBLISH packet of exactly `total_bytes` bytes, fixed header included."""
    payload_len = max(total_bytes - 2 - 2 - len(topic) - (2 if qos else 0)
                      - (1 if client.version == V5 else 0), 0)
    while True:
        packet = client.publish_packet(topic, b"x" * payload_len, qos, packet_id=packet_id)
        if len(packet) == total_bytes:
            return packet
        assert payload_len > 0
        payload_len -= 1 if len(packet) > total_bytes else -1


# ---- paho-mqtt ------------------------------------------------------------------------------

class Paho:
    """A paho-mqtt client on its network thread, its callbacks feeding queues."""

    def __init__(self, broker, version=V5, client_id="", clean=True, session_expiry=None,
                 keep_alive=60, will=None, username=None, password=None, receive_maximum=None,
                 connect=True, expect_code=0):
        self.version = version
        protocol = paho.MQTTv5 if version == V5 else paho.MQTTv311
        kwargs = {} if version == V5 else {"clean_session": clean}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=protocol, reconnect_on_failure=False, **kwargs)
        self.broker = broker
        self.clean = clean
        self.session_expiry = session_expiry
        self.keep_alive = keep_alive
        self.receive_maximum = receive_maximum
        self.messages = queue.Queue()
        self.connacks = queue.Queue()
        self.subacks = queue.Queue()
        self.unsubacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.acks = {}
        self.acks_lock = threading.Lock()
        client = self.client
        client.on_connect = lambda c, u, flags, code, props: self.connacks.put((flags, code, props))
        client.on_message = lambda c, u, message: self.messages.put(message)
        client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put((mid, codes))
        client.on_unsubscribe = lambda c, u, mid, codes, props: self.unsubacks.put((mid, codes))
        client.on_disconnect = lambda c, u, flags, code, props: self.disconnects.put(code)
        client.on_publish = self._on_publish
        if will is not None:
            props = None
            if version == V5 and will.get("props"):
                props = paho_properties(PacketTypes.WILLMESSAGE, will["props"])
            client.will_set(will["topic"], will.get("payload", b""), will.get("qos", 0),
                            will.get("retain", False), props)
        if username is not None:
            client.username_pw_set(username, password)
        self.started = False
        if connect:
            self.connack = self.connect(expect_code)

    def _on_publish(self, client, userdata, mid, code, props):
        with self.acks_lock:
            self.acks[mid] = code

    def connect(self, expect_code=0):
        """Connects and returns (session_present, reason code value, CONNACK properties)."""
        props = None
        if self.version == V5:
            pairs = []
            if self.session_expiry is not None:
                pairs.append(("SessionExpiryInterval", self.session_expiry))
            if self.receive_maximum is not None:
                pairs.append(("ReceiveMaximum", self.receive_maximum))
            props = paho_properties(PacketTypes.CONNECT, pairs) if pairs else None
        kwargs = {"clean_start": self.clean, "properties": props} if self.version == V5 else {}
        self.client.connect(self.broker.host, self.broker.port, self.keep_alive, **kwargs)
        if not self.started:
            self.client.loop_start()
            self.started = True
        flags, code, props = self.connacks.get(timeout=TIMEOUT)
        result = (bool(flags.session_present), code.value, props)
        if expect_code is not None:
            assert code.value == expect_code, f"CONNACK {code} ({code.value:#x})"
        return result

    def subscribe(self, topic_filter, qos=0, options=None, props=None):
        """Subscribes and returns the SUBACK's reason code values."""
        if self.version == V5:
            options = options or SubscribeOptions(qos=qos)
            result, mid = self.client.subscribe(topic_filter, options=options, properties=props)
        else:
            result, mid = self.client.subscribe(topic_filter, qos)
        assert result == paho.MQTT_ERR_SUCCESS, result
        got, codes = self.subacks.get(timeout=TIMEOUT)
        assert got == mid
        return [code.value for code in codes]

    def unsubscribe(self, topic_filter):
        result, mid = self.client.unsubscribe(topic_filter)
        assert result == paho.MQTT_ERR_SUCCESS, result
        got, _ = self.unsubacks.get(timeout=TIMEOUT)
        assert got == mid

    def publish(self, topic, payload=b"", qos=0, retain=False, props=None, wait=True):
        """Publishes; with wait, returns once paho saw the PUBACK/PUBCOMP, with its reason
        code value (0 for QoS 0, which has none)."""
        info = self.client.publish(topic, payload, qos, retain, properties=props)
        assert info.rc == paho.MQTT_ERR_SUCCESS, info.rc
        if not wait:
            return info
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), f"no acknowledgement for {topic} within {TIMEOUT}s"
        if qos == 0:
            return 0
        with self.acks_lock:
            code = self.acks.get(info.mid)
        return code.value if code is not None else 0

    def expect_message(self, timeout=TIMEOUT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def expect_messages(self, count, timeout=TIMEOUT):
        end = time.monotonic() + timeout
        return [self.expect_message(max(end - time.monotonic(), 0.01)) for _ in range(count)]

    def no_message_within(self, seconds):
        try:
            message = self.messages.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {message.topic}: {message.payload!r}")

    def disconnect(self):
        if self.started:
            self.client.disconnect()
            try:
                self.disconnects.get(timeout=TIMEOUT)
            except queue.Empty:
                pass
            self.client.loop_stop()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disconnect()


def paho_properties(packet_type, pairs):
    """paho Properties from (paho property name, value) pairs. paho appends when a property
    that may repeat (UserProperty) is set again."""
    props = Properties(packet_type)
    for name, value in pairs:
        setattr(props, name, value)
    return props


def user_properties(message):
    """The user properties of a paho message, as a list of pairs."""
    props = getattr(message, "properties", None)
    return list(getattr(props, "UserProperty", []) or [])


# ---- barriers -------------------------------------------------------------------------------

def barrier(publisher, subscriber, topic):
    """Publishes a marker on `topic` (which `subscriber` receives) and collects everything the
    subscriber gets up to it, leaving out earlier markers. Brokers deliver to one session in
    order, so whatever an earlier publish caused has arrived by then: a deadline-bounded way
    to say 'nothing else came'."""
    marker = f"barrier-{time.monotonic_ns()}".encode()
    publisher.publish(topic, marker, qos=1)
    before = []
    end = time.monotonic() + TIMEOUT
    while True:
        if isinstance(subscriber, RawClient):
            message = subscriber.expect_publish(max(end - time.monotonic(), 0.01))
        else:
            message = subscriber.expect_message(max(end - time.monotonic(), 0.01))
        if message.payload == marker:
            return before
        if not message.payload.startswith(b"barrier-"):
            before.append(message)


# ---- the command-line clients ---------------------------------------------------------------

def mosquitto_args(broker, version):
    return ["-h", broker.host, "-p", str(broker.port), "-V", "mqttv5" if version == V5
            else "mqttv311"]


def run_pub(broker, version, *args, check=True):
    result = subprocess.run([MOSQUITTO_PUB, *mosquitto_args(broker, version), *args],
                            capture_output=True, timeout=TIMEOUT)
    if check:
        assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


class Sub:
    """A mosquitto_sub process printing JSON lines (-F %j), read by a thread into a queue.

    It also subscribes to a private ready topic: `ready()` publishes there until a marker comes
    back, which shows the broker has its subscriptions (mosquitto_sub prints nothing on SUBACK);
    later markers are skipped by `expect`."""

    def __init__(self, broker, version, topic_prefix, *args):
        self.broker = broker
        self.version = version
        self.ready_topic = f"{topic_prefix}ready"
        command = [MOSQUITTO_SUB, *mosquitto_args(broker, version), "-F", "%j",
                   "-t", self.ready_topic, *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def _next(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        assert line is not None, \
            f"mosquitto_sub exited: {self.process.stderr.read().decode(errors='replace')}"
        return line

    def ready(self):
        """Waits until the broker delivers to this subscriber (its SUBSCRIBE is done)."""
        end = time.monotonic() + TIMEOUT
        while True:
            run_pub(self.broker, self.version, "-t", self.ready_topic, "-m", "ready", "-q", "1")
            line = self._next(0.2)
            if line is not None:
                assert line["topic"] == self.ready_topic, f"unexpected {line}"
                return
            assert time.monotonic() < end, "mosquitto_sub never received a message"

    def expect(self, timeout=TIMEOUT):
        """The next line that is not a ready marker."""
        end = time.monotonic() + timeout
        while True:
            line = self._next(max(end - time.monotonic(), 0))
            if line is None:
                raise AssertionError(f"mosquitto_sub printed nothing within {timeout}s")
            if line["topic"] != self.ready_topic:
                return line

    def wait(self, timeout=TIMEOUT):
        """Waits for the process to exit by itself (as with -C); returns its exit code."""
        return self.process.wait(timeout=timeout)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=TIMEOUT)
        self.reader.join(timeout=TIMEOUT)
        self.process.stdout.close()
        self.process.stderr.close()


def python_child(code):
    """Runs `code` in a child Python (with this suite's imports), stdout piped."""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).parent)
