"""A raw MQTT 3.1.1 / 5.0 client over a plain socket, driven packet by packet.

For what a real client library hides or refuses to do: exceeding the server's Receive
Maximum, choosing topic aliases, sending an invalid filter or a packet one byte too large,
going silent past keep-alive, dropping the connection without DISCONNECT, not acknowledging.
Every read has a deadline.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

# How long any single expected packet may take. Generous: CI machines are shared and slow,
# and a passing test never waits this long.
TIMEOUT = 10.0

V311 = 4
V5 = 5

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
