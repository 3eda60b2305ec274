"""An MQTT 3.1.1 and 5.0 packet builder and a raw-socket client for black-box broker tests.

Written from the specifications (OASIS MQTT 3.1.1 and MQTT 5.0, chapters 2 and 3) with `struct`
and plain code. MQTT 5.0: build a property block with `properties((id, value), ...)` (the ids
are the spec's numbers, in the order given) and pass it as `props=` to a builder: a builder
given `props` (or `connect(proto_level=5)`) writes the 5.0 layout; `parse_properties`,
`parse_reason`, `parse_connack` and `parse_publish(pkt, v5=True)` read what comes back. It deliberately does NOT import `daemons.broker.packets`, the broker's own codec: a test
that encoded its packets with the code under test could not see that code's bugs.

Builders return the exact bytes a conforming peer puts on the wire; every argument that a
test may want to get wrong on purpose can be overridden (`flags=`, `proto_name=`, raw `bytes`
for strings, `length=` for the remaining length). `RawClient` reads with a deadline on every
call, so no test can hang on a silent broker.

No test waits for a quiet interval to conclude that nothing (more) is coming. A broker handles
the packets of one connection in order and writes to one connection in order, so a PINGREQ
sent now is answered after everything it had already queued for us: `expect_nothing()` and
`collect_publishes()` send one and read up to its PINGRESP. What another connection sent must
have been handled by then: wait for its acknowledgement, its close, or its own PINGRESP
(`is_open()`) first. Deadlines are for what must arrive, and generous (a loaded machine
passes); a passing test never waits for one to run out.

Typical use::

    c = RawClient(broker.port)
    c.connect_ok("sub1")
    c.send(subscribe(1, [("a/b", 1)]))
    c.expect(suback(1, [1]))
    p = c.recv_publish()
    assert (p.topic, p.payload, p.qos) == ("a/b", b"x", 1)
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from dataclasses import dataclass

# packet types, section 2.2.1
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
AUTH = 15  # MQTT 5.0 only
TYPE_NAMES = {
    0: "RESERVED0", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ",
    13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}

DEFAULT_TIMEOUT = 10.0  # for data that must arrive; the wait ends when it does


# --- encoding primitives ------------------------------------------------------------------


def varint(n: int) -> bytes:
    """The Remaining Length encoding of section 2.2.3 (1 to 4 bytes for 0..268435455)."""
    if n < 0:
        raise ValueError(n)
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def string(s: str | bytes) -> bytes:
    """A UTF-8 encoded string (section 1.5.3): two-byte length then the bytes. Pass `bytes`
    to send arbitrary (e.g. ill-formed) content."""
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return u16(len(raw)) + raw


def frame(first_byte: int, body: bytes, length: int | None = None) -> bytes:
    """Fixed header + body. `length` overrides the Remaining Length (to build lies)."""
    return bytes((first_byte,)) + varint(len(body) if length is None else length) + body


# --- packet builders ------------------------------------------------------------------------


@dataclass(frozen=True)
class Will:
    topic: str | bytes
    message: bytes = b""
    qos: int = 0
    retain: bool = False


def connect(client_id: str | bytes = "", clean: bool = True, keepalive: int = 60, will: Will | None = None,
            username: str | bytes | None = None, password: bytes | None = None, proto_name: str | bytes = "MQTT",
            proto_level: int = 4, flags: int | None = None, first_byte: int = 0x10, props: bytes | None = None,
            will_props: bytes | None = None) -> bytes:
    """CONNECT (section 3.1). `flags` replaces the computed Connect Flags byte entirely; the
    payload still carries exactly the fields given. With `proto_level=5` (or `props`) the 5.0
    layout: properties after Keep Alive, Will Properties before the Will Topic (empty blocks
    unless given)."""
    v5 = proto_level == 5 or props is not None
    computed = 0x02 if clean else 0
    payload = string(client_id)
    if will is not None:
        computed |= 0x04 | (will.qos & 3) << 3 | (0x20 if will.retain else 0)
        if v5:
            payload += b"\x00" if will_props is None else will_props
        payload += string(will.topic) + u16(len(will.message)) + will.message
    if username is not None:
        computed |= 0x80
        payload += string(username)
    if password is not None:
        computed |= 0x40
        payload += u16(len(password)) + password
    header = string(proto_name) + bytes((proto_level, computed if flags is None else flags)) + u16(keepalive)
    if v5:
        header += b"\x00" if props is None else props
    return frame(first_byte, header + payload)


def connack(rc: int = 0, session_present: bool = False, props: bytes | None = None) -> bytes:
    """CONNACK; with `props` the 5.0 form (`rc` is then a reason code)."""
    if props is None:
        return bytes((0x20, 2, 1 if session_present else 0, rc))
    return frame(0x20, bytes((1 if session_present else 0, rc)) + props)


def publish(topic: str | bytes, payload: bytes = b"", qos: int = 0, mid: int | None = None,
            retain: bool = False, dup: bool = False, props: bytes | None = None) -> bytes:
    """PUBLISH (section 3.3). A packet id is written when qos > 0 or when `mid` is given; with
    `props` the 5.0 form (properties after the packet id)."""
    first = 0x30 | (0x08 if dup else 0) | (qos & 3) << 1 | (1 if retain else 0)
    body = string(topic)
    if qos > 0 or mid is not None:
        body += u16(mid if mid is not None else 1)
    if props is not None:
        body += props
    return frame(first, body + payload)


def _ack(first: int, mid: int, reason: int | None, props: bytes | None) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP: 3.1.1's form, or 5.0's with a reason code (and properties)."""
    body = u16(mid)
    if reason is not None or props is not None:
        body += bytes((reason or 0,))
    if props is not None:
        body += props
    return frame(first, body)


def puback(mid: int, reason: int | None = None, props: bytes | None = None) -> bytes:
    return _ack(0x40, mid, reason, props)


def pubrec(mid: int, reason: int | None = None, props: bytes | None = None) -> bytes:
    return _ack(0x50, mid, reason, props)


def pubrel(mid: int, flags: int = 0x02, reason: int | None = None, props: bytes | None = None) -> bytes:
    return _ack(0x60 | flags, mid, reason, props)


def pubcomp(mid: int, reason: int | None = None, props: bytes | None = None) -> bytes:
    return _ack(0x70, mid, reason, props)


def subscribe(mid: int, topics: list[tuple[str | bytes, int]], flags: int = 0x02, props: bytes | None = None) -> bytes:
    """SUBSCRIBE: (filter, requested QoS byte) pairs; in 5.0 (`props`) the byte is the
    Subscription Options (`sub_options`)."""
    body = u16(mid) + (props or b"") + b"".join(string(f) + bytes((q,)) for f, q in topics)
    return frame(0x80 | flags, body)


def sub_options(qos: int = 0, no_local: bool = False, retain_as_published: bool = False,
                retain_handling: int = 0) -> int:
    """The 5.0 Subscription Options byte (section 3.8.3.1)."""
    return qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0) | retain_handling << 4


def suback(mid: int, codes: list[int], props: bytes | None = None) -> bytes:
    return frame(0x90, u16(mid) + (props or b"") + bytes(codes))


def unsubscribe(mid: int, filters: list[str | bytes], flags: int = 0x02, props: bytes | None = None) -> bytes:
    return frame(0xA0 | flags, u16(mid) + (props or b"") + b"".join(string(f) for f in filters))


def unsuback(mid: int, codes: list[int] | None = None, props: bytes | None = None) -> bytes:
    """UNSUBACK; 5.0's carries properties and one reason code per filter."""
    if codes is None and props is None:
        return b"\xb0\x02" + u16(mid)
    return frame(0xB0, u16(mid) + (b"\x00" if props is None else props) + bytes(codes or ()))


def pingreq() -> bytes:
    return b"\xc0\x00"


def pingresp() -> bytes:
    return b"\xd0\x00"


def _reason_packet(first: int, reason: int | None, props: bytes | None) -> bytes:
    if reason is None and props is None:
        return bytes((first, 0))
    return frame(first, bytes((reason or 0,)) + (props or b""))


def disconnect(reason: int | None = None, props: bytes | None = None) -> bytes:
    """DISCONNECT; 5.0's with a reason code (and properties)."""
    return _reason_packet(0xE0, reason, props)


def auth(reason: int = 0x18, props: bytes | None = None) -> bytes:
    """AUTH (5.0 only, section 3.15)."""
    return _reason_packet(0xF0, reason, props)


# --- MQTT 5.0 properties (section 2.2.2.2) -------------------------------------------------------

# property identifiers (section 2.2.2.2 Table 2.4), for tests to name what they send and read
PAYLOAD_FORMAT, MESSAGE_EXPIRY, CONTENT_TYPE, RESPONSE_TOPIC, CORRELATION_DATA = 1, 2, 3, 8, 9
SUBSCRIPTION_ID, SESSION_EXPIRY, ASSIGNED_CLIENT_ID, AUTH_METHOD, AUTH_DATA = 11, 17, 18, 21, 22
REQUEST_PROBLEM_INFO, WILL_DELAY, RESPONSE_INFORMATION, REASON_STRING = 23, 24, 26, 31
RECEIVE_MAXIMUM, TOPIC_ALIAS_MAXIMUM = 33, 34
TOPIC_ALIAS, USER_PROPERTY, MAXIMUM_PACKET_SIZE = 35, 38, 39

# identifier -> type: b Byte, h Two Byte Integer, i Four Byte Integer, v Variable Byte Integer,
# s UTF-8 string, d Binary Data, p UTF-8 string pair (section 2.2.2.2 Table 2.4)
PROPERTY_TYPES = {
    1: "b", 2: "i", 3: "s", 8: "s", 9: "d", 11: "v", 17: "i", 18: "s", 19: "h", 21: "s", 22: "d", 23: "b",
    24: "i", 25: "b", 26: "s", 28: "s", 31: "s", 33: "h", 34: "h", 35: "h", 36: "b", 37: "b", 38: "p",
    39: "i", 40: "b", 41: "b", 42: "b",
}


def properties(*items: tuple[int, object], length: int | None = None) -> bytes:
    """A property block: the length, then each (identifier, value) in the order given.
    `length` overrides the Property Length (to build lies). A value of type `bytes` for a
    string is written as is (to send ill-formed UTF-8); pairs are (key, value)."""
    body = b""
    for ident, value in items:
        kind = PROPERTY_TYPES.get(ident, "b")
        body += varint(ident)
        if kind == "b":
            body += bytes((value,))
        elif kind == "h":
            body += u16(value)
        elif kind == "i":
            body += struct.pack("!I", value)
        elif kind == "v":
            body += varint(value)
        elif kind in "sd":
            body += string(value)
        else:
            body += string(value[0]) + string(value[1])
    return varint(len(body) if length is None else length) + body


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, mult = 0, 1
    while True:
        b = data[pos]
        pos += 1
        value += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            return value, pos


def parse_properties(data: bytes, pos: int = 0) -> tuple[list[tuple[int, object]], int]:
    """The (identifier, value) list of the property block at `pos`, and the position after it.
    Strings come back as str, binary data as bytes, pairs as (key, value)."""
    length, pos = _read_varint(data, pos)
    end, items = pos + length, []
    while pos < end:
        ident, pos = _read_varint(data, pos)
        kind = PROPERTY_TYPES[ident]
        if kind == "b":
            value, pos = data[pos], pos + 1
        elif kind == "h":
            (value,), pos = struct.unpack("!H", data[pos:pos + 2]), pos + 2
        elif kind == "i":
            (value,), pos = struct.unpack("!I", data[pos:pos + 4]), pos + 4
        elif kind == "v":
            value, pos = _read_varint(data, pos)
        else:
            fields = []
            for _ in range(2 if kind == "p" else 1):
                (n,) = struct.unpack("!H", data[pos:pos + 2])
                raw, pos = data[pos + 2:pos + 2 + n], pos + 2 + n
                fields.append(raw if kind == "d" else raw.decode("utf-8"))
            value = tuple(fields) if kind == "p" else fields[0]
        items.append((ident, value))
    assert pos == end, f"property block overruns its length: {data.hex(' ')}"
    return items, end


# --- decoding (for reading what the broker sends, and for messages) --------------------------


@dataclass(frozen=True)
class Packet:
    raw: bytes
    type: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return TYPE_NAMES[self.type]


@dataclass(frozen=True)
class Pub:
    """A PUBLISH as received."""
    topic: str
    payload: bytes
    qos: int
    mid: int | None
    retain: bool
    dup: bool
    raw: bytes
    topic_bytes: bytes
    props: tuple = ()  # 5.0: the (identifier, value) pairs


def split_packet(data: bytes) -> tuple[Packet, int] | None:
    """The first complete packet in `data` and its size, or None if incomplete."""
    if len(data) < 2:
        return None
    length, mult, pos = 0, 1, 1
    while True:
        if pos >= len(data):
            return None
        b = data[pos]
        length += (b & 0x7F) * mult
        mult *= 128
        pos += 1
        if not b & 0x80:
            break
        if pos > 4:
            raise AssertionError(f"broker sent a remaining length longer than 4 bytes: {data[:8].hex(' ')}")
    end = pos + length
    if len(data) < end:
        return None
    raw = bytes(data[:end])
    return Packet(raw, raw[0] >> 4, raw[0] & 0x0F, raw[pos:end]), end


def parse_publish(pkt: Packet, v5: bool = False) -> Pub:
    assert pkt.type == PUBLISH, f"expected a PUBLISH, got {describe(pkt.raw)}"
    qos = pkt.flags >> 1 & 3
    (tlen,) = struct.unpack("!H", pkt.body[:2])
    topic_bytes = pkt.body[2:2 + tlen]
    pos = 2 + tlen
    mid = None
    if qos:
        (mid,) = struct.unpack("!H", pkt.body[pos:pos + 2])
        pos += 2
    props: list = []
    if v5:
        props, pos = parse_properties(pkt.body, pos)
    return Pub(topic_bytes.decode("utf-8"), pkt.body[pos:], qos, mid, bool(pkt.flags & 1), bool(pkt.flags & 8),
               pkt.raw, topic_bytes, tuple(props))


def parse_connack(pkt: Packet) -> tuple[bool, int, list[tuple[int, object]]]:
    """A 5.0 CONNACK: (session present, reason code, properties)."""
    assert pkt.type == CONNACK, f"expected a CONNACK, got {describe(pkt.raw)}"
    if len(pkt.body) == 2:  # the 3.1.1 form (a broker refusing 5.0 with return code 1)
        return bool(pkt.body[0] & 1), pkt.body[1], []
    props, _ = parse_properties(pkt.body, 2)
    return bool(pkt.body[0] & 1), pkt.body[1], props


def parse_reason(pkt: Packet) -> tuple[int | None, int | list[int], list[tuple[int, object]]]:
    """A 5.0 acknowledgement, DISCONNECT or AUTH: (packet id or None, reason code, properties);
    for SUBACK and UNSUBACK the reason code is the list of them. Short forms read as 0 and no
    properties (sections 3.4.2.1, 3.14.2.1, 3.15.2.1)."""
    body, pos, mid = pkt.body, 0, None
    if pkt.type in (PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK):
        (mid,) = struct.unpack("!H", body[:2])
        pos = 2
    if pkt.type in (SUBACK, UNSUBACK):
        props, pos = parse_properties(body, pos)
        return mid, list(body[pos:]), props
    if pos >= len(body):
        return mid, 0, []
    reason = body[pos]
    if pos + 1 >= len(body):
        return mid, reason, []
    props, _ = parse_properties(body, pos + 1)
    return mid, reason, props


def describe(data: bytes) -> str:
    """A readable rendering of a byte string holding zero or more packets (for diffs)."""
    if not data:
        return "<nothing>"
    parts = []
    rest = bytes(data)
    while rest:
        if len(parts) == 8:
            parts.append(f"<{len(rest)} more bytes>")
            break
        try:
            got = split_packet(rest)
        except AssertionError:
            got = None
        if got is None:
            parts.append(f"<partial {rest.hex(' ')}>")
            break
        pkt, used = got
        rest = rest[used:]
        if pkt.type == PUBLISH and len(pkt.body) >= 2:
            try:
                p = parse_publish(pkt)
                parts.append(f"PUBLISH(topic={p.topic!r}, payload={p.payload[:40]!r}, qos={p.qos}, mid={p.mid}, "
                             f"retain={int(p.retain)}, dup={int(p.dup)})")
                continue
            except Exception:  # noqa: BLE001 - fall back to hex for anything odd
                pass
        parts.append(f"{pkt.name}(flags={pkt.flags:#x}, body={pkt.body.hex(' ')})")
    return " + ".join(parts) + f"   [hex: {bytes(data)[:64].hex(' ')}{' ...' if len(data) > 64 else ''}]"


# --- the client ---------------------------------------------------------------------------------


class RawClient:
    """One TCP connection to the broker. Every read has a deadline."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT):
        self.port, self.host = port, host
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False  # the broker closed the connection (FIN or RST seen)

    # context manager: tests that open many clients close them all
    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read whatever arrives before `deadline` into the buffer. False on timeout or EOF."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([self.sock], [], [], remaining)
        if not ready:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                data = b""
            else:
                raise
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def recv_exact(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n and self._fill(deadline):
            pass
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def expect(self, expected: bytes, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> None:
        """Read exactly len(expected) bytes and assert they are `expected`."""
        got = self.recv_exact(len(expected), timeout)
        if got != expected:
            why = "connection closed" if self.eof else f"after {timeout}s" if len(got) < len(expected) else "mismatch"
            raise AssertionError(
                f"{what + ': ' if what else ''}unexpected data from the broker ({why})\n"
                f"  expected: {describe(expected)}\n"
                f"  received: {describe(got)}")

    def recv_packet(self, timeout: float = DEFAULT_TIMEOUT) -> Packet:
        """One whole packet, framed by its remaining length."""
        deadline = time.monotonic() + timeout
        while True:
            got = split_packet(self.buf)
            if got is not None:
                pkt, used = got
                self.buf = self.buf[used:]
                return pkt
            if not self._fill(deadline):
                state = "the broker closed the connection" if self.eof else f"nothing complete within {timeout}s"
                raise AssertionError(f"expected a packet, but {state}; buffered: {describe(self.buf)}")

    def recv_publish(self, timeout: float = DEFAULT_TIMEOUT) -> Pub:
        pkt = self.recv_packet(timeout)
        if pkt.type != PUBLISH:
            raise AssertionError(f"expected a PUBLISH, got {describe(pkt.raw)}")
        return parse_publish(pkt)

    def until_pingresp(self, timeout: float = DEFAULT_TIMEOUT, limit: int = 10_000) -> list[Packet]:
        """Send PINGREQ; return every packet received before its PINGRESP: all the broker had
        queued for this connection so far (see the module docstring)."""
        self.send(pingreq())
        deadline = time.monotonic() + timeout
        got: list[Packet] = []
        while len(got) <= limit:
            try:
                pkt = self.recv_packet(max(0.0, deadline - time.monotonic()))
            except AssertionError as e:
                before = " + ".join(describe(p.raw) for p in got) or "<nothing>"
                raise AssertionError(f"no PINGRESP for our PINGREQ: {e}; received before: {before}") from None
            if pkt.raw == pingresp():
                return got
            got.append(pkt)
        raise AssertionError(f"more than {limit} packets before the PINGRESP")

    def expect_nothing(self, what: str = "") -> None:
        """Assert the broker has nothing (more) to send us and keeps the connection open: the
        PINGRESP to a PINGREQ sent now is the next packet (see the module docstring)."""
        prefix = what + ": " if what else ""
        if self.buf:
            raise AssertionError(f"{prefix}expected nothing, received {describe(self.buf)}")
        try:
            got = self.until_pingresp()
        except AssertionError as e:
            raise AssertionError(f"{prefix}expected nothing and the connection open: {e}") from None
        if got:
            raise AssertionError(f"{prefix}expected nothing, received {' + '.join(describe(p.raw) for p in got)}")

    def expect_closed(self, timeout: float = DEFAULT_TIMEOUT, what: str = "") -> None:
        """Assert the broker closes the connection (EOF or reset) within `timeout`, sending no
        (further) data before it."""
        deadline = time.monotonic() + timeout
        while not self.eof and self._fill(deadline):
            pass
        prefix = what + ": " if what else ""
        if self.buf:
            raise AssertionError(f"{prefix}expected the connection to close without data, received {describe(self.buf)}"
                                 + ("" if self.eof else f" and it is still open after {timeout}s"))
        if not self.eof:
            raise AssertionError(f"{prefix}the broker did not close the connection within {timeout}s")

    def closed_within(self, timeout: float) -> bool:
        """True if the broker closes the connection within `timeout` (anything received on
        the way stays buffered)."""
        deadline = time.monotonic() + timeout
        while not self.eof and self._fill(deadline):
            pass
        return self.eof

    def read_until_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Everything received until the broker closes the connection; asserts it closes
        within `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.eof and self._fill(deadline):
            pass
        data, self.buf = self.buf, b""
        if not self.eof:
            raise AssertionError(f"the broker did not close the connection within {timeout}s; "
                                 f"received {describe(data)}")
        return data

    def is_open(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Round-trip a PINGREQ: True if a PINGRESP comes back (buffered data is kept)."""
        try:
            self.send(pingreq())
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while True:
            idx = self.buf.find(b"\xd0\x00")
            if idx >= 0 and self._pingresp_at(idx):
                self.buf = self.buf[:idx] + self.buf[idx + 2:]
                return True
            if not self._fill(deadline):
                return False

    def _pingresp_at(self, idx: int) -> bool:
        # Only a PINGRESP on a packet boundary counts.
        pos, data = 0, self.buf
        while pos < idx:
            got = split_packet(data[pos:])
            if got is None:
                return False
            pos += got[1]
        return pos == idx

    # helpers -------------------------------------------------------------------------------

    def connect_ok(self, client_id: str = "", clean: bool = True, keepalive: int = 60,
                   session_present: bool = False, **kw) -> RawClient:
        """Send CONNECT and expect CONNACK(accepted, session_present)."""
        self.send(connect(client_id, clean, keepalive, **kw))
        self.expect(connack(0, session_present), what=f"CONNACK for {client_id!r}")
        return self

    def subscribe_ok(self, topics: list[tuple[str, int]], mid: int = 1) -> RawClient:
        """SUBSCRIBE and expect a SUBACK granting each requested QoS."""
        self.send(subscribe(mid, topics))
        self.expect(suback(mid, [q for _, q in topics]), what=f"SUBACK for {topics}")
        return self

    def publish_ok(self, topic: str | bytes, payload: bytes = b"", qos: int = 0, mid: int = 1,
                   retain: bool = False) -> RawClient:
        """PUBLISH and complete its QoS flow as a conforming client does (PUBACK; PUBREC,
        PUBREL, PUBCOMP). Only for a client not subscribed to `topic`: it expects nothing
        else on the way."""
        self.send(publish(topic, payload, qos, mid if qos else None, retain))
        if qos == 1:
            self.expect(puback(mid), what=f"PUBACK for {topic!r}")
        elif qos == 2:
            self.expect(pubrec(mid), what=f"PUBREC for {topic!r}")
            self.send(pubrel(mid))
            self.expect(pubcomp(mid), what=f"PUBCOMP for {topic!r}")
        return self

    def connect_v5(self, client_id: str = "", clean: bool = True, keepalive: int = 60,
                   props: bytes = b"\x00", **kw) -> tuple[bool, int, list[tuple[int, object]]]:
        """Send a 5.0 CONNECT; return its CONNACK as (session present, reason code, properties)."""
        self.send(connect(client_id, clean, keepalive, proto_level=5, props=props, **kw))
        return parse_connack(self.recv_packet())

    def connect5_ok(self, client_id: str = "", clean: bool = True, keepalive: int = 60,
                    session_present: bool = False, **kw) -> list[tuple[int, object]]:
        """A 5.0 CONNECT that must be accepted (reason 0x00) with this Session Present; the
        CONNACK's properties."""
        present, rc, props = self.connect_v5(client_id, clean, keepalive, **kw)
        assert (rc, present) == (0, session_present), \
            f"CONNACK for {client_id!r}: reason {rc:#04x}, session present {int(present)}; properties {props}"
        return props

    def recv_publish5(self, timeout: float = DEFAULT_TIMEOUT) -> Pub:
        """The next packet, which must be a PUBLISH, read with its 5.0 properties."""
        pkt = self.recv_packet(timeout)
        if pkt.type != PUBLISH:
            raise AssertionError(f"expected a PUBLISH, got {describe(pkt.raw)}")
        return parse_publish(pkt, v5=True)

    def disconnect(self) -> None:
        """Send DISCONNECT and close our side."""
        try:
            self.send(disconnect())
        except OSError:
            pass
        self.close()


def prop(props, ident: int, default: object = None) -> object:
    """The value of the first property `ident` in a parsed property list, or `default`."""
    return next((v for i, v in props if i == ident), default)


def props_all(props, ident: int) -> list[object]:
    """Every value of property `ident`, in order (User Property, Subscription Identifier)."""
    return [v for i, v in props if i == ident]


def client5(port: int, client_id: str = "", clean: bool = True, subs: list[tuple[str, int]] | None = None,
            sub_props: bytes = b"\x00", session_present: bool = False, **kw) -> RawClient:
    """A RawClient connected with MQTT 5.0 (CONNACK 0x00), optionally subscribed (`subs` are
    (filter, subscription options byte) pairs; each granted QoS must be the requested one)."""
    c = RawClient(port)
    c.connect5_ok(client_id, clean, session_present=session_present, **kw)
    if subs:
        c.send(subscribe(1, subs, props=sub_props))
        mid, codes, _ = parse_reason(c.recv_packet())
        assert (mid, codes) == (1, [o & 3 for _, o in subs]), f"SUBACK for {subs}: {codes}"
    return c


def collect_publishes(clients: list[RawClient]) -> list[list[Pub]]:
    """Each client's PUBLISH packets the broker has sent or queued so far, in arrival order,
    read up to the PINGRESP of a PINGREQ (see the module docstring: the publishers' packets
    must have been handled first). Any other packet fails the test."""
    return [[parse_publish(p) for p in c.until_pingresp()] for c in clients]


def check_each(cases, check) -> None:
    """Run `check(case)` for every case and fail once at the end listing every case that
    failed, so one failing case does not hide the others (one broker serves them all)."""
    cases, failures = list(cases), []
    for case in cases:
        try:
            check(case)
        except (AssertionError, OSError) as e:
            failures.append(f"- {case!r}: {e}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def client(port: int, client_id: str = "", clean: bool = True, keepalive: int = 60,
           subs: list[tuple[str, int]] | None = None, session_present: bool = False, **kw) -> RawClient:
    """A connected RawClient, optionally subscribed."""
    c = RawClient(port)
    c.connect_ok(client_id, clean, keepalive, session_present=session_present, **kw)
    if subs:
        c.subscribe_ok(subs)
    return c


def assert_serves_new_client(port: int) -> None:
    """After a connection was closed for a protocol error, the broker still serves others:
    a new client connects, subscribes and gets its own message back."""
    with RawClient(port) as c:
        c.connect_ok("alive-check")
        c.subscribe_ok([("alive/check", 1)])
        c.send(publish("alive/check", b"ok", 1, 7))
        got = [c.recv_packet(), c.recv_packet()]
        kinds = sorted(p.type for p in got)
        assert kinds == [PUBLISH, PUBACK], f"broker no longer serves clients: {[describe(p.raw) for p in got]}"
        pub = parse_publish(next(p for p in got if p.type == PUBLISH))
        assert (pub.topic, pub.payload) == ("alive/check", b"ok")
        c.send(puback(pub.mid))
        c.disconnect()



def connect_idle(port: int, n: int, keepalive: int = 600, per_address: int = 500, batch: int = 200,
                 timeout: float = 30.0) -> list[socket.socket]:
    """`n` clients that connect (3.1.1, clean session, ids idle-0...) and then say nothing: the
    sockets of those that got CONNACK 0, still open; the refused ones are closed. For thousands
    of clients: no select() (it takes no descriptor past 1024), CONNECTs sent `batch` at a time
    before their CONNACKs are read, and the clients spread over 127.0.0.2, .3, ..., `per_address`
    each, since the broker's max_connection_rate (a burst of 1000 per address) is for one
    address opening too many, not for thousands of devices."""
    socks: list[socket.socket] = []
    for start in range(0, n, batch):
        sent = []
        for i in range(start, min(n, start + batch)):
            s = socket.create_connection(("127.0.0.1", port), timeout,
                                         source_address=(f"127.0.0.{2 + i // per_address}", 0))
            try:
                s.sendall(connect(f"idle-{i}", keepalive=keepalive))
                sent.append(s)
            except OSError:  # reset: refused at accept
                s.close()
        for s in sent:
            got = b""
            try:
                while len(got) < 4 and (chunk := s.recv(4 - len(got))):
                    got += chunk
            except OSError:  # reset: refused at accept
                pass
            if got == connack(0):
                socks.append(s)
            else:
                s.close()
    return socks
