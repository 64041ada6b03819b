"""Shared parts of the MQTT interop suite: the broker under test, paho and mosquitto_sub helpers,
and (re-exported from mqtt_raw) a raw MQTT client.

The suite runs against `silt-edge` by default. With SILT_MQTT_TARGET=mosquitto it runs the same
tests against a local Mosquitto (/usr/sbin/mosquitto, started with a generated config on a free
port), which is how the tests themselves are checked against an independent implementation:
- tests of silt-only things (the log read back with `silt-edge dump`, persistence across a
  restart, silt's own config) call `silt_only()`, which skips them there, with the reason;
- where Mosquitto 2.0 breaks the spec, the test carries `mosquitto_violates(reason)`, a strict
  expected failure in mosquitto mode only, so the suite documents each known gap.

The silt binary: SILT_EDGE_BIN, or built now with cargo (as the kafka-python test does for
batchcat). Every wait in this module is on a condition with a deadline.

Running, from the repository root with the venv scripts/test makes:
    .venv/bin/python -m pytest -q tests/interop -k mqtt          # silt-edge, built by cargo
    SILT_EDGE_BIN=path/to/silt-edge .venv/bin/python -m pytest -q tests/interop -k mqtt
    SILT_MQTT_TARGET=mosquitto .venv/bin/python -m pytest -q tests/interop -k mqtt
Debian packages: mosquitto-clients (mosquitto_pub, mosquitto_sub) and mosquitto
(mosquitto_passwd, which makes the password file in both modes, and the broker itself).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_raw import (  # noqa: F401 - re-exported: tests use them as fx.<name>
    CONNACK, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK,
    SUBSCRIBE, TIMEOUT, UNSUBACK, UNSUBSCRIBE, V5, V311, Closed, Message, Packet, RawClient,
    frame,
)

WORKSPACE_ROOT = Path(__file__).resolve().parents[2]

TARGET = os.environ.get("SILT_MQTT_TARGET", "silt")
if TARGET not in ("silt", "mosquitto"):
    raise RuntimeError(f"SILT_MQTT_TARGET must be 'silt' or 'mosquitto', not {TARGET!r}")

MOSQUITTO = os.environ.get("SILT_MOSQUITTO_BIN", "/usr/sbin/mosquitto")
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

# How long a broker gets to start or stop.
START_TIMEOUT = 30.0

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
        require_program(MOSQUITTO, "mosquitto")
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


def require_program(path, package):
    assert Path(path).exists(), f"{path} not found: install the Debian package {package}"


def make_password_file(path: Path, users: dict):
    """A password file made by mosquitto_passwd itself (both brokers read its format)."""
    require_program(MOSQUITTO_PASSWD, "mosquitto")
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
        self.gone = threading.Event()
        client.on_disconnect = self._on_disconnect
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

    def _on_disconnect(self, client, userdata, flags, code, props):
        self.gone.set()
        self.disconnects.put(code)

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
        self.gone.clear()
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
        """A normal DISCONNECT, waiting for paho to finish it; or, when the broker already
        closed the connection, just stopping paho's thread."""
        if self.started:
            if not self.gone.is_set():
                self.client.disconnect()
                self.gone.wait(timeout=TIMEOUT)
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
