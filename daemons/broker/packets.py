"""Sans-IO codec for the fourteen MQTT 3.1.1 control packets (MQTT 5.0: packets5.py).

Theory of operation
===================

Bytes in, frozen packet objects out, and back again.  Nothing here touches a
socket or a clock, so the server, the unit tests and the fuzzer all drive the
same code.  Decoding refuses bad input as early as it can:

1. The first byte (type and flags) is looked up in a 256-entry table built
   once per role: reserved types, wrong reserved flags, a QoS 3 or QoS 0 + DUP
   PUBLISH and packets travelling in the wrong direction fail after one byte.
2. As soon as the remaining-length varint is complete, an over-long packet is
   refused, so a peer cannot make us buffer a body we would refuse anyway.
3. Once the body is buffered, a per-type decoder walks a memoryview bounded
   by the declared length and must consume every byte of it.

Every defect ends in a ProtocolError subclass carrying the id of the statement
it breaks (and ``connack`` when a 3.1.1 CONNACK must precede the close, and
``reason``, the MQTT 5.0 reason code for the CONNACK or DISCONNECT a v5 peer
gets); no IndexError or UnicodeDecodeError can reach the server.  ``decode``
is stateless; ``Reader`` adds buffering and the rules that need memory
(CONNECT first and only once, the protocol version the CONNECT chose), and
stays dead after an error since framing is lost.

MQTT 5.0 lives in packets5.py, on the primitives here: its packets are other
classes (properties and reason codes would slow every 3.1.1 packet down if
the 3.1.1 classes grew those fields), and ``Reader(version=5)`` switches to
its tables when the CONNECT says level 5.

Packets are slotted dataclasses, frozen except the ones every message makes (PUBLISH and its
acknowledgements, here and in packets5.py; marked HOT): a frozen dataclass's ``__init__`` sets
each field through ``object.__setattr__``, ~2 us more per decoded PUBLISH on this machine's CPU
(issue 21's profile). Nothing changes a packet once decoded; tests compare them by value.

Topic syntax (section 4.7) lives here because it decides whether a packet is
well formed; ``topics`` builds on this module and re-exports the validators.
Encoding only does cheap checks, since it encodes our own data;
``encode_publish`` takes the topic pre-encoded for the per-subscriber path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Union


class PacketType(IntEnum):
    """Control packet types, MQTT 3.1.1 section 2.2.1 (0 and 15 are reserved)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class ConnackCode(IntEnum):
    """CONNACK return codes, MQTT 3.1.1 section 3.2.2.3 (6-255 are reserved)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class ReasonCode(IntEnum):
    """MQTT 5.0 reason codes, section 2.4 Table 2.6.  One value has several names,
    by the packet it is in (0x00 is Success, Normal disconnection, Granted QoS 0)."""

    SUCCESS = 0x00
    NORMAL_DISCONNECTION = 0x00
    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL_MESSAGE = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    NO_SUBSCRIPTION_EXISTED = 0x11
    CONTINUE_AUTHENTICATION = 0x18
    RE_AUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    SERVER_SHUTTING_DOWN = 0x8B
    BAD_AUTHENTICATION_METHOD = 0x8C
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0
    SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
    WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2


SUBACK_FAILURE = 0x80
MAX_REMAINING_LENGTH = 268_435_455  # four varint bytes, section 2.2.3
# A packet of this size or more is gathered in a buffer of its own, which the transport reads
# into (Reader.get_buffer); the buffer grows to at most LARGE_AHEAD past what has arrived.
LARGE_PACKET = 64 * 1024
LARGE_AHEAD = 1024 * 1024

_SUBACK_CODES = b"\x00\x01\x02\x80"  # section 3.9.3


# --- errors -----------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the protocol: the connection must be closed.

    ``rule`` is the id of the normative statement broken, when one exists.
    When ``connack`` is not None a 3.1.1 server must first answer with a
    CONNACK carrying that code (section 3.2.2.3); otherwise it closes silently.
    ``reason`` is the MQTT 5.0 reason code of the CONNACK (before one was
    sent) or DISCONNECT a v5 server sends before it closes (section 4.13).
    """

    connack: ConnackCode | None = None
    reason: ReasonCode = ReasonCode.PROTOCOL_ERROR

    def __init__(self, message: str, rule: str | None = None, reason: ReasonCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        # Built when shown: the v5 decoder renames rules to the 5.0 statement ids.
        return f"{self.message} [{self.rule}]" if self.rule else self.message


class MalformedPacket(ProtocolError):
    """The bytes do not form a valid packet."""

    reason = ReasonCode.MALFORMED_PACKET


class PacketTooLarge(ProtocolError):
    """The remaining length exceeds the configured limit."""

    reason = ReasonCode.PACKET_TOO_LARGE


class UnacceptableProtocol(ProtocolError):
    """A CONNECT for a protocol name or level we do not speak."""

    connack = ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION
    reason = ReasonCode.UNSUPPORTED_PROTOCOL_VERSION


class InvalidTopic(MalformedPacket):
    """A topic name or filter breaks the rules of section 4.7.

    It is a MalformedPacket because topics only ever reach us inside a packet.
    """


# --- packets ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    """The Will Message of a CONNECT, section 3.1.2.5."""
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    """Section 3.1.  MQTT 3.1 ("MQIsdp", level 3) decodes into this as well."""
    client_id: str
    clean_session: bool = True
    keep_alive: int = 60
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4
    # A bridge's CONNECT (Mosquitto's try_private): the level with 0x80 set on the wire.
    bridge: bool = False


@dataclass(frozen=True, slots=True)
class Connack:
    """Section 3.2."""
    session_present: bool
    return_code: ConnackCode


@dataclass(slots=True)  # not frozen: HOT, see the module docstring
class Publish:
    """Section 3.3.  ``packet_id`` is None exactly when ``qos`` is 0."""
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None


@dataclass(slots=True)  # not frozen: HOT, see the module docstring
class Puback:
    """Section 3.4."""
    packet_id: int


@dataclass(slots=True)  # not frozen: HOT, see the module docstring
class Pubrec:
    """Section 3.5."""
    packet_id: int


@dataclass(slots=True)  # not frozen: HOT, see the module docstring
class Pubrel:
    """Section 3.6."""
    packet_id: int


@dataclass(slots=True)  # not frozen: HOT, see the module docstring
class Pubcomp:
    """Section 3.7."""
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Section 3.8: (topic filter, requested QoS) pairs."""
    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Suback:
    """Section 3.9: one granted QoS or SUBACK_FAILURE per requested filter."""
    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Section 3.10."""
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unsuback:
    """Section 3.11."""
    packet_id: int


@dataclass(frozen=True, slots=True)
class Pingreq:
    """Section 3.12."""


@dataclass(frozen=True, slots=True)
class Pingresp:
    """Section 3.13."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Section 3.14."""


Packet = Union[
    Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe,
    Suback, Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect,
]

# Bodiless packets carry no data, so one instance of each serves every decode.
_PINGREQ, _PINGRESP, _DISCONNECT = Pingreq(), Pingresp(), Disconnect()


# --- topic syntax, section 4.7 ------------------------------------------------


def _check_topic_length(topic: str) -> None:
    # A str of at most 16383 code points cannot exceed 65535 UTF-8 bytes, so
    # only unusually long topics pay for an encode.
    if len(topic) > 16383 and len(topic.encode("utf-8", "surrogatepass")) > 0xFFFF:
        raise InvalidTopic("topic longer than 65535 bytes", "MQTT-4.7.3-3")


def validate_topic_name(name: str) -> None:
    """Refuse a topic name that is empty, has a wildcard or has U+0000."""
    if not name:
        raise InvalidTopic("empty topic name", "MQTT-4.7.3-1")
    if "+" in name or "#" in name:
        raise InvalidTopic(f"wildcard in topic name {name!r}", "MQTT-4.7.1-1")
    if "\x00" in name:
        raise InvalidTopic("U+0000 in topic name", "MQTT-4.7.3-2")
    _check_topic_length(name)


def validate_topic_filter(topic_filter: str) -> None:
    """Refuse an empty filter or one whose wildcards are not whole levels."""
    if not topic_filter:
        raise InvalidTopic("empty topic filter", "MQTT-4.7.3-1")
    if "\x00" in topic_filter:
        raise InvalidTopic("U+0000 in topic filter", "MQTT-4.7.3-2")
    _check_topic_length(topic_filter)
    if "+" not in topic_filter and "#" not in topic_filter:
        return
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            raise InvalidTopic(
                f"'#' must be the whole last level in {topic_filter!r}", "MQTT-4.7.1-2"
            )
        if "+" in level and level != "+":
            raise InvalidTopic(
                f"'+' must be a whole level in {topic_filter!r}", "MQTT-4.7.1-3"
            )


# --- decoding -----------------------------------------------------------------
#
# Body decoders take (flags, view, pos, end) and read only view[pos:end]; the
# helpers raise MalformedPacket instead of reading past ``end``.


def _u16_at(view: memoryview, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise MalformedPacket("packet ends inside a two-byte integer")
    return view[pos] << 8 | view[pos + 1]


def _packet_id_at(view: memoryview, pos: int, end: int) -> int:
    packet_id = _u16_at(view, pos, end)
    if not packet_id:
        raise MalformedPacket("packet identifier 0", "MQTT-2.3.1-1")
    return packet_id


def _field_at(view: memoryview, pos: int, end: int) -> tuple[memoryview, int]:
    stop = pos + 2 + _u16_at(view, pos, end)
    if stop > end:
        raise MalformedPacket("length-prefixed field runs past the end of the packet")
    return view[pos + 2 : stop], stop


def _str_at(view: memoryview, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _field_at(view, pos, end)
    try:
        # Python's strict decoder also refuses surrogates and overlong forms.
        text = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("ill-formed UTF-8 string", "MQTT-1.5.3-1") from None
    if "\x00" in text:
        raise MalformedPacket("U+0000 in UTF-8 string", "MQTT-1.5.3-2")
    return text, pos


def _payload_field(read, view: memoryview, pos: int, end: int, what: str, rule: str):
    """A CONNECT payload field its flag announces: missing or cut short breaks `rule`."""
    try:
        return read(view, pos, end)
    except MalformedPacket as e:
        if e.rule is not None:  # present but ill-formed (UTF-8): that rule stands
            raise
        raise MalformedPacket(f"{what} announced by its flag is missing or cut short", rule) from None


def _decode_connect(flags: int, view: memoryview, pos: int, end: int) -> Connect:
    raw_name, pos = _field_at(view, pos, end)
    name = bytes(raw_name)
    # Mosquitto also accepts MQTT 3.1 ("MQIsdp", level 3); its wire format is
    # the same for everything this codec reads.
    if name == b"MQTT":
        expected_level = 4
    elif name == b"MQIsdp":
        expected_level = 3
    else:
        raise UnacceptableProtocol(f"unknown protocol name {name!r}", "MQTT-3.1.2-1")
    if pos + 4 > end:
        raise MalformedPacket("CONNECT variable header is truncated")
    level, connect_flags = view[pos], view[pos + 1]
    bridge = bool(level & 0x80)
    level &= 0x7F
    if level != expected_level:
        raise UnacceptableProtocol(
            f"unsupported protocol level {level} for {name.decode()}", "MQTT-3.1.2-2"
        )
    if connect_flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag is set", "MQTT-3.1.2-3")
    has_will = connect_flags & 0x04
    will_qos = connect_flags >> 3 & 0x03
    will_retain = bool(connect_flags & 0x20)
    if has_will:
        if will_qos == 3:
            raise MalformedPacket("Will QoS 3", "MQTT-3.1.2-14")
    elif will_qos:
        raise MalformedPacket("Will QoS without a Will", "MQTT-3.1.2-13")
    elif will_retain:
        raise MalformedPacket("Will Retain without a Will", "MQTT-3.1.2-15")
    if connect_flags & 0x40 and not connect_flags & 0x80:
        raise MalformedPacket("password without a user name", "MQTT-3.1.2-22")
    keep_alive = view[pos + 2] << 8 | view[pos + 3]

    client_id, pos = _str_at(view, pos + 4, end)
    will = None
    if has_will:
        will_topic, pos = _payload_field(_str_at, view, pos, end, "Will Topic", "MQTT-3.1.2-9")
        validate_topic_name(will_topic)
        will_payload, pos = _payload_field(_field_at, view, pos, end, "Will Message", "MQTT-3.1.2-9")
        will = Will(will_topic, bytes(will_payload), will_qos, will_retain)
    username = password = None
    if connect_flags & 0x80:
        username, pos = _payload_field(_str_at, view, pos, end, "User Name", "MQTT-3.1.2-19")
    if connect_flags & 0x40:
        raw_password, pos = _payload_field(_field_at, view, pos, end, "Password", "MQTT-3.1.2-21")
        password = bytes(raw_password)
    if pos != end:
        # A field the flags do not announce: a user name [MQTT-3.1.2-18], else a password [-20].
        rule = "MQTT-3.1.2-18" if not connect_flags & 0x80 else "MQTT-3.1.2-20" if not connect_flags & 0x40 else None
        raise MalformedPacket("trailing bytes after the CONNECT payload", rule or "MQTT-3.1.3-1")
    return Connect(
        client_id, bool(connect_flags & 0x02), keep_alive, will, username, password,
        name.decode(), level, bridge,
    )


def _decode_connack(flags: int, view: memoryview, pos: int, end: int) -> Connack:
    if end - pos != 2:
        raise MalformedPacket("CONNACK remaining length must be 2")
    ack_flags, code = view[pos], view[pos + 1]
    if ack_flags & 0xFE:
        raise MalformedPacket("reserved CONNACK acknowledge flags are set")
    if code > ConnackCode.NOT_AUTHORIZED:
        raise MalformedPacket(f"reserved CONNACK return code {code}")
    if ack_flags and code:
        raise MalformedPacket("session present with a refusal", "MQTT-3.2.2-4")
    return Connack(bool(ack_flags), ConnackCode(code))


def _decode_publish(flags: int, view: memoryview, pos: int, end: int) -> Publish:
    if pos + 2 > end:
        raise MalformedPacket("packet ends inside a two-byte integer")
    stop = pos + 2 + (view[pos] << 8 | view[pos + 1])
    if stop > end:
        raise MalformedPacket("PUBLISH topic runs past the end of the packet")
    # Checking the raw bytes first keeps the common, valid case to a few
    # C-level scans; the str is built once.
    raw_topic = bytes(view[pos + 2 : stop])
    if not raw_topic:
        raise InvalidTopic("empty topic name", "MQTT-4.7.3-1")
    if b"+" in raw_topic or b"#" in raw_topic:
        raise InvalidTopic("wildcard in PUBLISH topic name", "MQTT-3.3.2-2")
    if b"\x00" in raw_topic:
        raise InvalidTopic("U+0000 in PUBLISH topic name", "MQTT-1.5.3-2")
    try:
        topic = raw_topic.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("ill-formed UTF-8 topic name", "MQTT-1.5.3-1") from None
    qos = flags >> 1 & 0x03
    packet_id = None
    if qos:
        if stop + 2 > end:
            raise MalformedPacket("packet ends inside a two-byte integer")
        packet_id = view[stop] << 8 | view[stop + 1]
        if not packet_id:
            raise MalformedPacket("packet identifier 0", "MQTT-2.3.1-1")
        stop += 2
    return Publish(
        topic, bytes(view[stop:end]), qos, bool(flags & 0x01), bool(flags & 0x08), packet_id
    )


def _id_only_decoder(cls):
    name = cls.__name__.upper()

    def decode_id_only(flags: int, view: memoryview, pos: int, end: int):
        if end - pos != 2:
            raise MalformedPacket(f"{name} remaining length must be 2")
        return cls(_packet_id_at(view, pos, end))

    return decode_id_only


def _decode_subscribe(flags: int, view: memoryview, pos: int, end: int) -> Subscribe:
    packet_id = _packet_id_at(view, pos, end)
    pos += 2
    topics = []
    while pos < end:
        topic_filter, pos = _str_at(view, pos, end)
        validate_topic_filter(topic_filter)
        if pos >= end:
            raise MalformedPacket("topic filter without a requested QoS")
        # Anything above 2 is either QoS 3 or a reserved bit set.
        qos = view[pos]
        if qos > 2:
            raise MalformedPacket(f"requested QoS byte {qos:#04x}", "MQTT-3.8.3-4")
        topics.append((topic_filter, qos))
        pos += 1
    if not topics:
        raise MalformedPacket("SUBSCRIBE without topic filters", "MQTT-3.8.3-3")
    return Subscribe(packet_id, tuple(topics))


def _decode_suback(flags: int, view: memoryview, pos: int, end: int) -> Suback:
    packet_id = _packet_id_at(view, pos, end)
    codes = bytes(view[pos + 2 : end])
    if not codes:
        raise MalformedPacket("SUBACK without return codes")
    if codes.translate(None, _SUBACK_CODES):
        raise MalformedPacket("reserved SUBACK return code", "MQTT-3.9.3-2")
    return Suback(packet_id, tuple(codes))


def _decode_unsubscribe(flags: int, view: memoryview, pos: int, end: int) -> Unsubscribe:
    packet_id = _packet_id_at(view, pos, end)
    pos += 2
    topics = []
    while pos < end:
        topic_filter, pos = _str_at(view, pos, end)
        validate_topic_filter(topic_filter)
        topics.append(topic_filter)
    if not topics:
        raise MalformedPacket("UNSUBSCRIBE without topic filters", "MQTT-3.10.3-2")
    return Unsubscribe(packet_id, tuple(topics))


def _bodiless_decoder(instance):
    name = type(instance).__name__.upper()

    def decode_bodiless(flags: int, view: memoryview, pos: int, end: int):
        if end != pos:
            raise MalformedPacket(f"{name} remaining length must be 0")
        return instance

    return decode_bodiless


_DECODERS = (
    None,
    _decode_connect,
    _decode_connack,
    _decode_publish,
    _id_only_decoder(Puback),
    _id_only_decoder(Pubrec),
    _id_only_decoder(Pubrel),
    _id_only_decoder(Pubcomp),
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _id_only_decoder(Unsuback),
    _bodiless_decoder(_PINGREQ),
    _bodiless_decoder(_PINGRESP),
    _bodiless_decoder(_DISCONNECT),
    None,
)

_T = PacketType
# Direction of each type, section 2.2.1 Table 2.1.
_ACCEPTED_BY = {
    "server": frozenset({
        _T.CONNECT, _T.PUBLISH, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP,
        _T.SUBSCRIBE, _T.UNSUBSCRIBE, _T.PINGREQ, _T.DISCONNECT,
    }),
    "client": frozenset({
        _T.CONNACK, _T.PUBLISH, _T.PUBACK, _T.PUBREC, _T.PUBREL, _T.PUBCOMP,
        _T.SUBACK, _T.UNSUBACK, _T.PINGRESP,
    }),
}
# Fixed-header flags other than PUBLISH's, section 2.2.2 Table 2.2, with the
# statement that names the type when there is one more specific than 2.2.2-1.
_REQUIRED_FLAGS = {
    _T.PUBREL: (0b0010, "MQTT-3.6.1-1"),
    _T.SUBSCRIBE: (0b0010, "MQTT-3.8.1-1"),
    _T.UNSUBSCRIBE: (0b0010, "MQTT-3.10.1-1"),
    _T.DISCONNECT: (0b0000, "MQTT-3.14.1-1"),
}

_HeaderError = tuple[type[ProtocolError], str, Union[str, None]]


def _check_first_byte(byte: int, role: str) -> _HeaderError | None:
    kind, flags = byte >> 4, byte & 0x0F
    if kind == 0 or kind == 15:
        return MalformedPacket, f"reserved packet type {kind}", None
    packet_type = PacketType(kind)
    if packet_type not in _ACCEPTED_BY[role]:
        return ProtocolError, f"a {role} must not receive {packet_type.name}", None
    if packet_type is PacketType.PUBLISH:
        qos = flags >> 1 & 0x03
        if qos == 3:
            return MalformedPacket, "PUBLISH with QoS 3", "MQTT-3.3.1-4"
        if qos == 0 and flags & 0x08:
            return MalformedPacket, "PUBLISH with QoS 0 and DUP set", "MQTT-3.3.1-2"
        return None
    required, rule = _REQUIRED_FLAGS.get(packet_type, (0, "MQTT-2.2.2-1"))
    if flags != required:
        return MalformedPacket, f"{packet_type.name} with fixed-header flags {flags:#06b}", rule
    return None


_HEADER_ERRORS = {
    role: tuple(_check_first_byte(byte, role) for byte in range(256)) for role in _ACCEPTED_BY
}


def _header_errors(role: str) -> tuple[_HeaderError | None, ...]:
    try:
        return _HEADER_ERRORS[role]
    except KeyError:
        raise ValueError(f"role must be 'server' or 'client', not {role!r}") from None


def _packet_size(data, pos: int) -> int | None:
    """The size of the packet starting at `pos`, its fixed header included; None while its
    remaining length is incomplete (or longer than four bytes: _decode_at says so)."""
    length = shift = 0
    i, n = pos + 1, len(data)
    while i < n and shift < 28:
        byte = data[i]
        i += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return i - pos + length
        shift += 7
    return None


def _decode_at(
    view: memoryview,
    start: int,
    header_errors: tuple[_HeaderError | None, ...],
    decoders: tuple,
    max_packet_size: int,
) -> tuple[Packet, int] | None:
    size = len(view)
    if start >= size:
        return None
    first = view[start]
    error = header_errors[first]
    if error is not None:
        raise error[0](error[1], error[2])
    pos = start + 1
    if pos < size and view[pos] < 0x80:  # the usual small packet: a one-byte length
        length = view[pos]
        if length > max_packet_size:
            raise PacketTooLarge(f"remaining length {length} exceeds {max_packet_size}")
        end = pos + 1 + length
        if end > size:
            return None
        return decoders[first >> 4](first & 0x0F, view, pos + 1, end), end
    length = shift = 0
    while True:
        if pos >= size:
            return None
        byte = view[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift == 28:
            raise MalformedPacket("remaining length longer than four bytes")
    if length > max_packet_size:
        raise PacketTooLarge(f"remaining length {length} exceeds {max_packet_size}")
    end = pos + length
    if end > size:
        return None
    return decoders[first >> 4](first & 0x0F, view, pos, end), end


def decode(
    data: bytes | bytearray | memoryview,
    *,
    role: str = "server",
    max_packet_size: int = MAX_REMAINING_LENGTH,
    version: int = 4,
):
    """Decode the packet at the start of ``data``.

    Returns None when more bytes are needed, else the packet and the number of
    bytes it used.  ``role`` is who is receiving: "server" refuses packets
    only a server sends, and the other way round.  ``max_packet_size`` bounds
    the remaining length (the body, without the 2-5 byte fixed header).
    ``version`` 5 decodes MQTT 5.0 packets (a CONNECT of any level we speak).
    """
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if version == 4:
        return _decode_at(view, 0, _header_errors(role), _DECODERS, max_packet_size)
    header_errors, decoders = _tables(role, version)
    return _decode_at(view, 0, header_errors, decoders, max_packet_size)


def _tables(role: str, version: int) -> tuple[tuple, tuple]:
    """The first-byte checks and body decoders for ``role`` speaking ``version``."""
    header_errors = _header_errors(role)
    if version == 4:
        return header_errors, _DECODERS
    if version == 5:
        from . import packets5  # imports this module: loaded on first use, not at import

        return packets5.HEADER_ERRORS[role], packets5.DECODERS[role]
    raise ValueError(f"version must be 4 (3.1.1 and 3.1) or 5, not {version!r}")


# The packet types a Reader takes first, by (what it expects, version): shared, not one tuple per
# connection. A 5.0 server may send AUTH (type 15) before its CONNACK [MQTT-3.2.0-1].
_FIRST_KINDS = {(first, version): (first, 15) if version == 5 else (first,)
                for first in (PacketType.CONNECT, PacketType.CONNACK) for version in (4, 5)}


class _LargePacket:
    """A packet of LARGE_PACKET bytes or more, gathered in a buffer of its own: `size` bytes
    (its fixed header included), `have` of them arrived; `lent`: the rest of `buf` was lent
    to the transport to read into (Reader.get_buffer)."""

    __slots__ = ("buf", "size", "have", "lent")

    def __init__(self, size: int, data) -> None:
        self.size, self.have, self.lent = size, len(data), False
        # Room for what arrived and at most LARGE_AHEAD more: a header alone cannot make the
        # broker allocate max_packet_size.
        self.buf = bytearray(min(size, self.have + LARGE_AHEAD))
        self.buf[: self.have] = data

    def fit(self, need: int) -> None:
        """Grow `buf` to hold `need` bytes: doubling, so it stays within twice what arrived
        (and no larger than the packet)."""
        buf = self.buf
        if len(buf) < need:
            buf += bytes(min(self.size, max(need, 2 * len(buf))) - len(buf))

    def add(self, data) -> int:
        """Take the part of `data` that belongs to this packet; how many bytes that was."""
        take = min(len(data), self.size - self.have)
        if take:
            self.fit(self.have + take)
            self.buf[self.have : self.have + take] = data[:take]
            self.have += take
        return take


class Reader:
    """Incremental decoder for one connection.

    role="server" (we are the broker, the peer is a client) or "client".
    The first packet must be CONNECT [MQTT-3.1.0-1] for a server and CONNACK
    [MQTT-3.2.0-1] for a client; a server refuses a second CONNECT
    [MQTT-3.1.0-2].  After the first ProtocolError the reader is dead:
    ``next_packet`` raises that error again and ``feed`` discards its input.

    ``version``: 4 speaks MQTT 3.1.1 and 3.1 only, so a level 5 CONNECT is
    refused with CONNACK 1.  5 also speaks MQTT 5.0: a server's reader then
    decodes the rest of the connection with the version its CONNECT named
    (``self.version`` says which), a client's reader decodes 5.0 throughout.
    """

    __slots__ = (
        "_buffer", "_pos", "_header_errors", "_decoders", "_max", "_first_type", "_first_kinds", "_first_rule",
        "_started", "_error", "_role", "version", "_view", "_large",
    )

    def __init__(self, role: str = "server", max_packet_size: int = MAX_REMAINING_LENGTH, version: int = 4) -> None:
        self._header_errors, self._decoders = _tables(role, version)
        self._role = role
        self._max = max_packet_size
        # A server does not know the version before the CONNECT; 3.1 decodes as 3.1.1.
        self.version = 5 if version == 5 and role == "client" else 4
        if role == "server":
            self._first_type, self._first_rule = PacketType.CONNECT, "MQTT-3.1.0-1"
        else:
            self._first_type, self._first_rule = PacketType.CONNACK, "MQTT-3.2.0-1"
        self._first_kinds = _FIRST_KINDS[self._first_type, self.version]
        self._buffer = bytearray()
        # Consumed bytes stay in the buffer until the next feed, which drops
        # them in one go instead of shifting the buffer once per packet.
        self._pos = 0
        # One memoryview of the buffer for all the packets of one feed (one per packet cost
        # ~0.3 us); released before the buffer changes, which it would otherwise forbid.
        self._view: memoryview | None = None
        self._started = False
        self._error: ProtocolError | None = None
        self._large: _LargePacket | None = None

    def set_max_packet_size(self, max_packet_size: int) -> None:
        """Change the largest remaining length accepted from the next packet on (a server
        keeps a small one until CONNECT is accepted, then raises it)."""
        self._max = max_packet_size

    def _drop_view(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def feed(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            return
        large = self._large
        if large is not None:
            take = large.add(data)
            if take == len(data):
                return
            data = memoryview(data)[take:]
        elif self._started and self._pos >= len(self._buffer):
            # Nothing pending and a large packet starts here: straight to its own buffer.
            size = _packet_size(data, 0)
            if size is not None and size > len(data) and self._start_large(size, data):
                return
        self._drop_view()
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def get_buffer(self, scratch: memoryview) -> memoryview:
        """Where a transport should read the next bytes to (asyncio.BufferedProtocol): the
        rest of a large packet, so its megabytes are not copied from chunk to buffer, else
        `scratch` (then buffer_updated feeds what was read)."""
        large = self._large
        if large is not None:
            # Not when complete (not taken yet): what follows goes behind it.
            large.lent = large.have < large.size and self._error is None
            if large.lent:
                large.fit(large.have + 1)
                return memoryview(large.buf)[large.have :]
        return scratch

    def buffer_updated(self, nbytes: int, scratch: memoryview) -> bool:
        """`nbytes` were read into the buffer get_buffer gave. True if that was a large packet's."""
        large = self._large
        if large is not None and large.lent:
            large.lent = False
            large.have += nbytes
            return True
        self.feed(scratch[:nbytes])
        return False

    def _start_large(self, size: int, data) -> bool:
        """Start gathering a packet of `size` bytes (its fixed header included) whose first
        bytes are `data`, if it is large and of a kind and size the header checks let pass
        (else _decode_at raises when the rest arrives)."""
        if size < LARGE_PACKET or self._header_errors[data[0]] is not None or size > self._max + 5:
            return False
        self._large = _LargePacket(size, data)
        return True

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        if self._large is not None:
            return self._next_large()
        buffer, pos = self._buffer, self._pos
        if pos >= len(buffer):
            self._drop_view()  # read to the end: an idle connection keeps no view
            return None
        kind = buffer[pos] >> 4
        view = self._view
        if view is None:
            view = self._view = memoryview(buffer)
        try:
            if not self._started:
                if kind not in self._first_kinds:
                    raise ProtocolError(f"first packet must be {self._first_type.name}", self._first_rule)
            elif kind == 1 and self._first_type is PacketType.CONNECT:  # 1: CONNECT
                raise ProtocolError("second CONNECT on one connection", "MQTT-3.1.0-2")
            result = _decode_at(view, pos, self._header_errors, self._decoders, self._max)
        except ProtocolError as exc:
            # A traceback can keep a memoryview of the old buffer alive, which
            # would make resizing it fail; a dead reader needs no buffer.
            self._error = exc
            self._view = None
            self._buffer = bytearray()
            raise
        if result is None:
            self._drop_view()
            if self._started:
                size = _packet_size(buffer, pos)
                if size is not None and self._start_large(size, memoryview(buffer)[pos:]):
                    buffer.clear()
                    self._pos = 0
            return None
        packet, self._pos = result
        if not self._started:
            self._start(packet, kind)
        return packet

    def _next_large(self) -> Packet | None:
        large = self._large
        if large.have < large.size:
            return None
        self._large = None
        with memoryview(large.buf) as view:
            try:
                return _decode_at(view, 0, self._header_errors, self._decoders, self._max)[0]
            except ProtocolError as exc:
                self._error = exc
                self._buffer = bytearray()
                raise

    def _start(self, packet: Packet, kind: int) -> None:
        if kind == 15:  # AUTH before the CONNACK
            return
        self._started = True
        if self._role != "server" or self._decoders is _DECODERS:
            return
        if packet.protocol_level == 5:
            from . import packets5

            self.version = 5
            self._decoders = packets5.connection_decoders(packet)
        else:
            self._header_errors, self._decoders = _tables("server", 4)

    def __iter__(self) -> Iterator[Packet]:
        """Yield every complete packet currently buffered."""
        while (packet := self.next_packet()) is not None:
            yield packet


# --- encoding -----------------------------------------------------------------

_SMALL_VARINTS = tuple(bytes((n,)) for n in range(128))
_PUBLISH_FIRST = tuple(bytes((0x30 | flags,)) for flags in range(16))


def _varint(value: int) -> bytes:
    if value < 128:
        return _SMALL_VARINTS[value]
    if value > MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {value} exceeds {MAX_REMAINING_LENGTH}")
    out = bytearray()
    while value:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
    return bytes(out)


def _u16(value: int) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value} does not fit in two bytes")
    return value.to_bytes(2, "big")


def _id(packet_id: int | None) -> bytes:
    if packet_id is None or not 0 < packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier must be 1-65535, not {packet_id!r}")
    return packet_id.to_bytes(2, "big")


def _binary(value: bytes) -> bytes:
    return _u16(len(value)) + value


def _utf8(value: str) -> bytes:
    if "\x00" in value:
        raise ValueError("U+0000 cannot be sent in a string [MQTT-1.5.3-2]")
    return _binary(value.encode("utf-8"))  # UnicodeEncodeError is a ValueError


def _frame(first: int, body: bytes) -> bytes:
    return b"".join((bytes((first,)), _varint(len(body)), body))


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int | None,
) -> bytes:
    """Encode a PUBLISH whose topic is already UTF-8 encoded (fan-out path)."""
    return b"".join((*_publish_head(topic, len(payload), qos, retain, dup, packet_id), payload))


def encode_publish_head(
    topic: bytes, payload_length: int, qos: int, retain: bool, dup: bool, packet_id: int | None,
) -> bytes:
    """A PUBLISH up to its payload, which is written after it as it is: a large payload is
    not copied into the packet."""
    return b"".join(_publish_head(topic, payload_length, qos, retain, dup, packet_id))


def _publish_head(
    topic: bytes, payload_length: int, qos: int, retain: bool, dup: bool, packet_id: int | None,
) -> tuple[bytes, ...]:
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
        packet_id_bytes = _id(packet_id)
    else:
        if packet_id is not None:
            raise ValueError("a QoS 0 PUBLISH has no packet identifier [MQTT-2.3.1-5]")
        if dup:
            raise ValueError("a QoS 0 PUBLISH cannot have DUP set [MQTT-3.3.1-2]")
        packet_id_bytes = b""
    topic_length = len(topic)
    if topic_length > 0xFFFF:
        raise ValueError("topic longer than 65535 bytes [MQTT-4.7.3-3]")
    remaining = 2 + topic_length + len(packet_id_bytes) + payload_length
    return (
        _PUBLISH_FIRST[(8 if dup else 0) | qos << 1 | (1 if retain else 0)],
        _varint(remaining),
        topic_length.to_bytes(2, "big"),
        topic,
        packet_id_bytes,
    )


def _encode_connect(packet: Connect) -> bytes:
    connect_flags = 0x02 if packet.clean_session else 0
    payload = [_utf8(packet.client_id)]
    will = packet.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"Will QoS must be 0, 1 or 2, not {will.qos!r}")
        connect_flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += (_utf8(will.topic), _binary(will.payload))
    if packet.username is not None:
        connect_flags |= 0x80
        payload.append(_utf8(packet.username))
    if packet.password is not None:
        if packet.username is None:
            raise ValueError("a password needs a user name [MQTT-3.1.2-22]")
        connect_flags |= 0x40
        payload.append(_binary(packet.password))
    header = b"".join((
        _utf8(packet.protocol_name),
        bytes((packet.protocol_level | (0x80 if packet.bridge else 0), connect_flags)),
        _u16(packet.keep_alive),
    ))
    return _frame(0x10, header + b"".join(payload))


def _encode_connack(packet: Connack) -> bytes:
    code = ConnackCode(packet.return_code)
    if packet.session_present and code:
        raise ValueError("a refusing CONNACK has Session Present 0 [MQTT-3.2.2-4]")
    return bytes((0x20, 2, 1 if packet.session_present else 0, code))


def _encode_publish(packet: Publish) -> bytes:
    return encode_publish(
        packet.topic.encode("utf-8"), packet.payload, packet.qos, packet.retain,
        packet.dup, packet.packet_id,
    )


def _id_only_encoder(first: int):
    prefix = bytes((first, 2))

    def encode_id_only(packet) -> bytes:
        return prefix + _id(packet.packet_id)

    return encode_id_only


def _encode_subscribe(packet: Subscribe) -> bytes:
    if not packet.topics:
        raise ValueError("SUBSCRIBE needs at least one topic filter [MQTT-3.8.3-3]")
    body = [_id(packet.packet_id)]
    for topic_filter, qos in packet.topics:
        if qos not in (0, 1, 2):
            raise ValueError(f"requested QoS must be 0, 1 or 2, not {qos!r}")
        body += (_utf8(topic_filter), bytes((qos,)))
    return _frame(0x82, b"".join(body))


def _encode_suback(packet: Suback) -> bytes:
    codes = bytes(packet.return_codes)
    if not codes or codes.translate(None, _SUBACK_CODES):
        raise ValueError(f"bad SUBACK return codes {packet.return_codes!r} [MQTT-3.9.3-2]")
    return _frame(0x90, _id(packet.packet_id) + codes)


def _encode_unsubscribe(packet: Unsubscribe) -> bytes:
    if not packet.topics:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter [MQTT-3.10.3-2]")
    body = [_id(packet.packet_id)]
    body += (_utf8(topic_filter) for topic_filter in packet.topics)
    return _frame(0xA2, b"".join(body))


def _constant_encoder(data: bytes):
    return lambda packet: data


_ENCODERS = {
    Connect: _encode_connect,
    Connack: _encode_connack,
    Publish: _encode_publish,
    Puback: _id_only_encoder(0x40),
    Pubrec: _id_only_encoder(0x50),
    Pubrel: _id_only_encoder(0x62),
    Pubcomp: _id_only_encoder(0x70),
    Subscribe: _encode_subscribe,
    Suback: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    Unsuback: _id_only_encoder(0xB0),
    Pingreq: _constant_encoder(b"\xc0\x00"),
    Pingresp: _constant_encoder(b"\xd0\x00"),
    Disconnect: _constant_encoder(b"\xe0\x00"),
}


def encode(packet: Packet) -> bytes:
    """The wire form of ``packet``.

    Raises ValueError for input that cannot be sent or would not decode back
    (an out-of-range number, a missing packet identifier, an over-long
    string).  Topic syntax is not checked: encoded packets are our own data.
    """
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {packet!r}") from None
    return encoder(packet)
