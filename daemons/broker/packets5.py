"""Sans-IO codec for the MQTT 5.0 control packets, on the primitives of packets.py.

Theory of operation
===================

MQTT 5.0 keeps 3.1.1's framing (first byte, remaining length) and adds to
most packets a reason code and a property block: a Variable Byte Integer
length, then (identifier, value) pairs whose type the identifier fixes
(section 2.2.2.2).  Its packets are their own classes here, not 3.1.1's
grown by two fields, because every field a dataclass has is paid for
on each decode, and the 3.1.1 path is the hot one.

``packets.Reader(version=5)`` decodes a CONNECT with these tables; when that
CONNECT says level 5 it keeps them for the connection (``connection_decoders``
adds the rules that need the CONNECT: AUTH only with its Authentication
Method, no Session Expiry Interval in DISCONNECT after a zero one).

Properties decode into one ``Properties`` object (every property a field,
None when absent; the two that may repeat are tuples).  A packet without
properties, the common case, shares ``NO_PROPERTIES``.  Checks, in order:
an identifier unknown or not allowed in this packet is a Malformed Packet
(section 2.2.2.2), a value of the wrong type or cut short too; a property
given twice that may not repeat, or a value out of range (Receive Maximum 0,
Topic Alias 0, Maximum QoS 2, ...) is a Protocol Error.

Errors are packets.py's ProtocolError classes: ``rule`` names the 5.0
statement (the shared helpers raise 3.1.1 ids, renamed once on the way out
by ``_v5_rules``) and ``reason`` is the reason code the server sends in its
CONNACK or DISCONNECT before it closes (section 4.13).  Rules without a
numbered statement name their section in the message and have rule None.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Union

from .packets import (
    InvalidTopic,
    MalformedPacket,
    PacketType,
    Pingreq,
    Pingresp,
    ProtocolError,
    ReasonCode,
    MAX_REMAINING_LENGTH,
    _DECODERS,
    _binary,
    _decode_connect,
    _field_at,
    _frame,
    _id,
    _packet_id_at,
    _payload_field,
    _str_at,
    _u16,
    _u16_at,
    _utf8,
    _varint,
    decode as _decode_any,
    encode as encode_v3,
    validate_topic_filter,
    validate_topic_name,
)

R = ReasonCode
_REASON = {code.value: code for code in ReasonCode}  # first name of each value


# --- properties, section 2.2.2.2 ------------------------------------------------------

_BYTE, _U16, _U32, _VBI, _STR, _PAIR, _BIN = range(7)

# identifier: (field of Properties, type, may repeat)
_PROPERTIES = {
    0x01: ("payload_format_indicator", _BYTE, False),
    0x02: ("message_expiry_interval", _U32, False),
    0x03: ("content_type", _STR, False),
    0x08: ("response_topic", _STR, False),
    0x09: ("correlation_data", _BIN, False),
    0x0B: ("subscription_identifiers", _VBI, True),  # once only in SUBSCRIBE
    0x11: ("session_expiry_interval", _U32, False),
    0x12: ("assigned_client_identifier", _STR, False),
    0x13: ("server_keep_alive", _U16, False),
    0x15: ("authentication_method", _STR, False),
    0x16: ("authentication_data", _BIN, False),
    0x17: ("request_problem_information", _BYTE, False),
    0x18: ("will_delay_interval", _U32, False),
    0x19: ("request_response_information", _BYTE, False),
    0x1A: ("response_information", _STR, False),
    0x1C: ("server_reference", _STR, False),
    0x1F: ("reason_string", _STR, False),
    0x21: ("receive_maximum", _U16, False),
    0x22: ("topic_alias_maximum", _U16, False),
    0x23: ("topic_alias", _U16, False),
    0x24: ("maximum_qos", _BYTE, False),
    0x25: ("retain_available", _BYTE, False),
    0x26: ("user_properties", _PAIR, True),
    0x27: ("maximum_packet_size", _U32, False),
    0x28: ("wildcard_subscription_available", _BYTE, False),
    0x29: ("subscription_identifier_available", _BYTE, False),
    0x2A: ("shared_subscription_available", _BYTE, False),
}
_ID_OF = {name: ident for ident, (name, _, _) in _PROPERTIES.items()}

# Values whose range the spec limits: identifier -> (lowest, highest, reason, rule).
_BOOLEAN = (0, 1, R.PROTOCOL_ERROR, None)
_RANGES = {
    0x01: _BOOLEAN, 0x17: _BOOLEAN, 0x19: _BOOLEAN, 0x24: _BOOLEAN, 0x25: _BOOLEAN,
    0x28: _BOOLEAN, 0x29: _BOOLEAN, 0x2A: _BOOLEAN,
    0x0B: (1, 268_435_455, R.PROTOCOL_ERROR, None),  # sections 3.3.2.3.8, 3.8.2.1.2
    0x21: (1, 0xFFFF, R.PROTOCOL_ERROR, None),  # sections 3.1.2.11.3, 3.2.2.3.3
    0x23: (1, 0xFFFF, R.TOPIC_ALIAS_INVALID, "MQTT-3.3.2-8"),
    0x27: (1, 0xFFFF_FFFF, R.PROTOCOL_ERROR, None),  # sections 3.1.2.11.4, 3.2.2.3.6
}

_USER = 0x26
_ACK = frozenset({0x1F, _USER})  # PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK
# Which packet may carry which property, section 2.2.2.2 Table 2.4.
_ALLOWED = {
    "CONNECT": frozenset({0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x27, _USER}),
    "WILL": frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x18, _USER}),
    "CONNACK": frozenset({
        0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x27, 0x28, 0x29, 0x2A, _USER,
    }),
    "PUBLISH": frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, _USER}),
    "PUBACK": _ACK, "PUBREC": _ACK, "PUBREL": _ACK, "PUBCOMP": _ACK, "SUBACK": _ACK, "UNSUBACK": _ACK,
    "SUBSCRIBE": frozenset({0x0B, _USER}),
    "UNSUBSCRIBE": frozenset({_USER}),
    "DISCONNECT": frozenset({0x11, 0x1C, 0x1F, _USER}),
    "AUTH": frozenset({0x15, 0x16, 0x1F, _USER}),
}


@dataclass(frozen=True, slots=True)
class Properties:
    """The properties of one packet (section 2.2.2.2); None means absent."""

    payload_format_indicator: int | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    subscription_identifiers: tuple[int, ...] = ()
    session_expiry_interval: int | None = None
    assigned_client_identifier: str | None = None
    server_keep_alive: int | None = None
    authentication_method: str | None = None
    authentication_data: bytes | None = None
    request_problem_information: int | None = None
    will_delay_interval: int | None = None
    request_response_information: int | None = None
    response_information: str | None = None
    server_reference: str | None = None
    reason_string: str | None = None
    receive_maximum: int | None = None
    topic_alias_maximum: int | None = None
    topic_alias: int | None = None
    maximum_qos: int | None = None
    retain_available: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()
    maximum_packet_size: int | None = None
    wildcard_subscription_available: int | None = None
    subscription_identifier_available: int | None = None
    shared_subscription_available: int | None = None


NO_PROPERTIES = Properties()
assert [f.name for f in fields(Properties)] == [name for name, _, _ in _PROPERTIES.values()]


def _vbi_at(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    """A Variable Byte Integer, section 1.5.5."""
    value = shift = 0
    while True:
        if pos >= end:
            raise MalformedPacket("packet ends inside a variable byte integer")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift == 28:
            raise MalformedPacket("variable byte integer longer than four bytes")


def _properties_at(view: memoryview, pos: int, end: int, what: str) -> tuple[Properties, int]:
    length, pos = _vbi_at(view, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket(f"{what} property length runs past the end of the packet")
    if not length:
        return NO_PROPERTIES, stop
    allowed = _ALLOWED[what]
    values: dict = {}
    while pos < stop:
        ident = view[pos]  # every identifier defined fits in one VBI byte
        pos += 1
        if ident not in allowed:
            known = f"property {ident:#04x}" if ident in _PROPERTIES else f"unknown property {ident:#04x}"
            raise MalformedPacket(f"{known} is not allowed in {what} (section 2.2.2.2)")
        name, kind, repeats = _PROPERTIES[ident]
        if kind == _BYTE:
            if pos >= stop:
                raise MalformedPacket("property ends inside a byte")
            value = view[pos]
            pos += 1
        elif kind == _U16:
            value = _u16_at(view, pos, stop)
            pos += 2
        elif kind == _U32:
            if pos + 4 > stop:
                raise MalformedPacket("property ends inside a four byte integer")
            value = int.from_bytes(view[pos : pos + 4], "big")
            pos += 4
        elif kind == _VBI:
            value, pos = _vbi_at(view, pos, stop)
        elif kind == _STR:
            value, pos = _str_at(view, pos, stop)
        elif kind == _BIN:
            raw, pos = _field_at(view, pos, stop)
            value = bytes(raw)
        else:  # _PAIR, section 1.5.7
            key, pos = _str_at(view, pos, stop)
            text, pos = _str_at(view, pos, stop)
            value = (key, text)
        limits = _RANGES.get(ident)
        if limits is not None and not limits[0] <= value <= limits[1]:
            raise ProtocolError(f"{name} {value} is out of range in {what}", limits[3], limits[2])
        if repeats:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise ProtocolError(f"{name} more than once in {what} (section 2.2.2.2)")
        else:
            values[name] = value
    for name in ("subscription_identifiers", "user_properties"):
        if name in values:
            values[name] = tuple(values[name])
    props = Properties(**values)
    if props.authentication_data is not None and props.authentication_method is None:
        raise ProtocolError(f"Authentication Data without Authentication Method in {what} (section 3.1.2.11.10)")
    return props, stop


def encode_properties(props: Properties, what: str) -> bytes:
    """The property block (length first) of ``props`` in a ``what`` packet ("PUBLISH", "WILL", ...),
    in identifier order.  ValueError for a property that packet cannot carry."""
    if props is NO_PROPERTIES:
        return b"\x00"
    allowed = _ALLOWED[what]
    out = bytearray()
    for ident, (name, kind, repeats) in _PROPERTIES.items():
        value = getattr(props, name)
        if value is None or value == ():
            continue
        if ident not in allowed:
            raise ValueError(f"{name} cannot be sent in {what}")
        limits = _RANGES.get(ident)
        for item in value if repeats else (value,):
            if limits is not None and not limits[0] <= item <= limits[1]:
                raise ValueError(f"{name} {item} is out of range")
            out.append(ident)
            if kind == _BYTE:
                out.append(item)
            elif kind == _U16:
                out += _u16(item)
            elif kind == _U32:
                out += item.to_bytes(4, "big")  # OverflowError is not a ValueError: check
            elif kind == _VBI:
                out += _varint(item)
            elif kind == _STR:
                out += _utf8(item)
            elif kind == _BIN:
                out += _binary(item)
            else:
                out += _utf8(item[0]) + _utf8(item[1])
    return _varint(len(out)) + bytes(out)


# --- packets ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WillV5:
    """The Will of a 5.0 CONNECT, section 3.1.3.2-3.1.3.4."""
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class ConnectV5:
    """Section 3.1; ``clean_start`` is 3.1.1's Clean Session bit."""
    client_id: str
    clean_start: bool = True
    keep_alive: int = 60
    will: WillV5 | None = None
    username: str | None = None
    password: bytes | None = None
    properties: Properties = NO_PROPERTIES
    protocol_name: ClassVar[str] = "MQTT"
    protocol_level: ClassVar[int] = 5


@dataclass(frozen=True, slots=True)
class ConnackV5:
    """Section 3.2."""
    session_present: bool
    reason_code: ReasonCode = R.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)  # not frozen: HOT, see packets.py's docstring
class PublishV5:
    """Section 3.3.  ``topic`` may be empty when ``properties.topic_alias`` names it."""
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)  # not frozen: HOT, see packets.py's docstring
class PubackV5:
    """Section 3.4."""
    packet_id: int
    reason_code: ReasonCode = R.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)  # not frozen: HOT, see packets.py's docstring
class PubrecV5:
    """Section 3.5."""
    packet_id: int
    reason_code: ReasonCode = R.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)  # not frozen: HOT, see packets.py's docstring
class PubrelV5:
    """Section 3.6."""
    packet_id: int
    reason_code: ReasonCode = R.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(slots=True)  # not frozen: HOT, see packets.py's docstring
class PubcompV5:
    """Section 3.7."""
    packet_id: int
    reason_code: ReasonCode = R.SUCCESS
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic filter and its Subscription Options, section 3.8.3.1."""
    topic_filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(frozen=True, slots=True)
class SubscribeV5:
    """Section 3.8."""
    packet_id: int
    topics: tuple[Subscription, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class SubackV5:
    """Section 3.9: one reason code per requested filter."""
    packet_id: int
    reason_codes: tuple[ReasonCode, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class UnsubscribeV5:
    """Section 3.10."""
    packet_id: int
    topics: tuple[str, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class UnsubackV5:
    """Section 3.11: one reason code per filter."""
    packet_id: int
    reason_codes: tuple[ReasonCode, ...]
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class DisconnectV5:
    """Section 3.14, sent by either side."""
    reason_code: ReasonCode = R.NORMAL_DISCONNECTION
    properties: Properties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Auth:
    """Section 3.15."""
    reason_code: ReasonCode = R.SUCCESS
    properties: Properties = NO_PROPERTIES


PacketV5 = Union[
    ConnectV5, ConnackV5, PublishV5, PubackV5, PubrecV5, PubrelV5, PubcompV5, SubscribeV5, SubackV5,
    UnsubscribeV5, UnsubackV5, Pingreq, Pingresp, DisconnectV5, Auth,
]

# Reason codes each packet may carry (sections 3.2.2.2, 3.4.2.1, 3.6.2.1, 3.9.3, 3.11.3, 3.15.2.1),
# with the statement that requires them.
_CONNACK_CODES = frozenset({
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99,
    0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
})
_PUBACK_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_PUBREL_CODES = frozenset({0x00, 0x92})
_SUBACK_CODES = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_UNSUBACK_CODES = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
# DISCONNECT and AUTH codes by who may send them (Tables 3.10 and 3.15): the receiver's role
# decides which it accepts.
_DISCONNECT_BOTH = {0x00, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99}
_DISCONNECT_CODES = {
    "server": frozenset(_DISCONNECT_BOTH | {0x04}),
    "client": frozenset(_DISCONNECT_BOTH | {
        0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    }),
}
_AUTH_CODES = {"server": frozenset({0x18, 0x19}), "client": frozenset({0x00, 0x18})}


# --- decoding -----------------------------------------------------------------------

# 3.1.1 statement ids the shared helpers raise, and the 5.0 statement for the same rule.
_V5_RULES = {
    "MQTT-1.5.3-1": "MQTT-1.5.4-1",
    "MQTT-1.5.3-2": "MQTT-1.5.4-2",
    "MQTT-2.3.1-1": "MQTT-2.2.1-3",
    "MQTT-4.7.1-1": "MQTT-4.7.0-1",
    "MQTT-4.7.1-2": "MQTT-4.7.1-1",
    "MQTT-4.7.1-3": "MQTT-4.7.1-2",
}


def _v5_rules(decoder):
    """Run ``decoder`` and name what it raises by the 5.0 statement ids."""

    def decode_v5(flags: int, view: memoryview, pos: int, end: int):
        try:
            return decoder(flags, view, pos, end)
        except ProtocolError as exc:
            exc.rule = _V5_RULES.get(exc.rule, exc.rule)
            raise

    return decode_v5


def _reason(code: int, valid: frozenset, what: str, rule: str | None) -> ReasonCode:
    if code not in valid:
        raise ProtocolError(f"reason code {code:#04x} is not one a {what} may carry", rule)
    return _REASON[code]


def _decode_connect_any(flags: int, view: memoryview, pos: int, end: int):
    # Protocol name "MQTT" and level 5 is 5.0; anything else goes to the 3.1.1 decoder,
    # which knows every other name and level we accept or refuse.
    if view[pos : pos + 7] == b"\x00\x04MQTT\x05":
        return _CONNECT_V5(flags, view, pos, end)
    return _decode_connect(flags, view, pos, end)


def _decode_connect_v5(flags: int, view: memoryview, pos: int, end: int) -> ConnectV5:
    pos += 7
    if pos + 3 > end:
        raise MalformedPacket("CONNECT variable header is truncated")
    connect_flags = view[pos]
    if connect_flags & 0x01:
        raise MalformedPacket("reserved CONNECT flag is set", "MQTT-3.1.2-3")
    has_will = connect_flags & 0x04
    will_qos = connect_flags >> 3 & 0x03
    will_retain = bool(connect_flags & 0x20)
    if has_will:
        if will_qos == 3:
            raise MalformedPacket("Will QoS 3", "MQTT-3.1.2-12")
    elif will_qos:
        raise MalformedPacket("Will QoS without a Will", "MQTT-3.1.2-11")
    elif will_retain:
        raise MalformedPacket("Will Retain without a Will", "MQTT-3.1.2-13")
    keep_alive = view[pos + 1] << 8 | view[pos + 2]
    props, pos = _properties_at(view, pos + 3, end, "CONNECT")
    client_id, pos = _str_at(view, pos, end)
    will = None
    if has_will:
        if pos >= end:
            raise MalformedPacket("Will Properties announced by the Will Flag are missing", "MQTT-3.1.2-9")
        will_props, pos = _properties_at(view, pos, end, "WILL")
        if will_props.response_topic is not None:
            _check_response_topic(will_props.response_topic)
        will_topic, pos = _payload_field(_str_at, view, pos, end, "Will Topic", "MQTT-3.1.2-9")
        try:
            validate_topic_name(will_topic)
        except InvalidTopic as exc:
            exc.reason = R.TOPIC_NAME_INVALID
            raise
        will_payload, pos = _payload_field(_field_at, view, pos, end, "Will Payload", "MQTT-3.1.2-9")
        will = WillV5(will_topic, bytes(will_payload), will_qos, will_retain, will_props)
    username = password = None
    if connect_flags & 0x80:
        username, pos = _payload_field(_str_at, view, pos, end, "User Name", "MQTT-3.1.2-17")
    if connect_flags & 0x40:  # 5.0 allows a password without a user name
        raw_password, pos = _payload_field(_field_at, view, pos, end, "Password", "MQTT-3.1.2-19")
        password = bytes(raw_password)
    if pos != end:
        rule = "MQTT-3.1.2-16" if not connect_flags & 0x80 else "MQTT-3.1.2-18" if not connect_flags & 0x40 else "MQTT-3.1.3-1"
        raise MalformedPacket("trailing bytes after the CONNECT payload", rule)
    return ConnectV5(client_id, bool(connect_flags & 0x02), keep_alive, will, username, password, props)


_CONNECT_V5 = _v5_rules(_decode_connect_v5)


def _decode_connack(flags: int, view: memoryview, pos: int, end: int) -> ConnackV5:
    if end - pos < 3:
        raise MalformedPacket("CONNACK without its property length", "MQTT-2.2.2-1")
    ack_flags, code = view[pos], view[pos + 1]
    if ack_flags & 0xFE:
        raise MalformedPacket("reserved CONNACK acknowledge flags are set", "MQTT-3.2.2-1")
    reason = _reason(code, _CONNACK_CODES, "CONNACK", "MQTT-3.2.2-8")
    if ack_flags and code:
        raise ProtocolError("session present with a refusal", "MQTT-3.2.2-6")
    props, pos = _properties_at(view, pos + 2, end, "CONNACK")
    if pos != end:
        raise MalformedPacket("trailing bytes after the CONNACK properties")
    return ConnackV5(bool(ack_flags), reason, props)


def _check_response_topic(topic: str) -> None:
    try:
        validate_topic_name(topic)
    except InvalidTopic:
        raise ProtocolError(f"Response Topic {topic!r} is not a topic name", "MQTT-3.3.2-14") from None


def _publish_decoder(role: str):
    from_client = role == "server"

    def decode_publish(flags: int, view: memoryview, pos: int, end: int) -> PublishV5:
        stop = pos + 2 + _u16_at(view, pos, end)
        if stop > end:
            raise MalformedPacket("PUBLISH topic runs past the end of the packet")
        raw_topic = bytes(view[pos + 2 : stop])
        if b"+" in raw_topic or b"#" in raw_topic:
            raise InvalidTopic("wildcard in PUBLISH topic name", "MQTT-3.3.2-2", R.TOPIC_NAME_INVALID)
        if b"\x00" in raw_topic:
            raise InvalidTopic("U+0000 in PUBLISH topic name", "MQTT-1.5.4-2")
        try:
            topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("ill-formed UTF-8 topic name", "MQTT-1.5.4-1") from None
        qos = flags >> 1 & 0x03
        packet_id = None
        if qos:
            packet_id = _packet_id_at(view, stop, end)
            stop += 2
        props, stop = _properties_at(view, stop, end, "PUBLISH")
        if props is not NO_PROPERTIES:
            if from_client and props.subscription_identifiers:
                raise ProtocolError("Subscription Identifier in a PUBLISH from a client", "MQTT-3.3.4-6")
            if props.response_topic is not None:
                _check_response_topic(props.response_topic)
        if not topic and props.topic_alias is None:
            raise ProtocolError("empty topic name without a Topic Alias", "MQTT-3.3.2-1")
        return PublishV5(
            topic, bytes(view[stop:end]), qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, props
        )

    return decode_publish


def _ack_decoder(cls, valid: frozenset, rule: str):
    what = cls.__name__[:-2].upper()

    def decode_ack(flags: int, view: memoryview, pos: int, end: int):
        size = end - pos
        if size < 2:
            raise MalformedPacket(f"{what} shorter than its packet identifier")
        packet_id = _packet_id_at(view, pos, end)
        if size == 2:  # the short form: Success, no properties
            return cls(packet_id)
        reason = _reason(view[pos + 2], valid, what, rule)
        if size == 3:
            return cls(packet_id, reason)
        props, pos = _properties_at(view, pos + 3, end, what)
        if pos != end:
            raise MalformedPacket(f"trailing bytes after the {what} properties")
        return cls(packet_id, reason, props)

    return decode_ack


def _check_shared(topic_filter: str) -> bool:
    """True for a Shared Subscription's filter, after checking its form (section 4.8.2)."""
    if not topic_filter.startswith("$share/"):
        return False
    share_name, slash, inner = topic_filter[7:].partition("/")
    if not share_name:
        raise InvalidTopic("Shared Subscription without a ShareName", "MQTT-4.8.2-1")
    if "+" in share_name or "#" in share_name or not slash or not inner:
        raise InvalidTopic(f"ShareName {share_name!r} is not followed by / and a filter", "MQTT-4.8.2-2")
    validate_topic_filter(inner)
    return True


def _decode_subscribe(flags: int, view: memoryview, pos: int, end: int) -> SubscribeV5:
    packet_id = _packet_id_at(view, pos, end)
    props, pos = _properties_at(view, pos + 2, end, "SUBSCRIBE")
    if len(props.subscription_identifiers) > 1:
        raise ProtocolError("Subscription Identifier more than once in SUBSCRIBE (section 3.8.2.1.2)")
    topics = []
    while pos < end:
        topic_filter, pos = _str_at(view, pos, end)
        shared = _check_shared(topic_filter)
        if not shared:
            validate_topic_filter(topic_filter)
        if pos >= end:
            raise MalformedPacket("topic filter without Subscription Options")
        options = view[pos]
        pos += 1
        if options & 0xC0:
            raise MalformedPacket(f"reserved Subscription Options bits in {options:#04x}", "MQTT-3.8.3-5")
        qos, retain_handling = options & 0x03, options >> 4 & 0x03
        if qos == 3:
            raise ProtocolError("Maximum QoS 3 in Subscription Options (section 3.8.3.1)")
        if retain_handling == 3:
            raise ProtocolError("Retain Handling 3 in Subscription Options (section 3.8.3.1)")
        no_local = bool(options & 0x04)
        if shared and no_local:
            raise ProtocolError("No Local on a Shared Subscription", "MQTT-3.8.3-4")
        topics.append(Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling))
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters", "MQTT-3.8.3-2")
    return SubscribeV5(packet_id, tuple(topics), props)


def _codes_decoder(cls, valid: frozenset, rule: str):
    what = cls.__name__[:-2].upper()

    def decode_codes(flags: int, view: memoryview, pos: int, end: int):
        packet_id = _packet_id_at(view, pos, end)
        props, pos = _properties_at(view, pos + 2, end, what)
        codes = tuple(_reason(code, valid, what, rule) for code in view[pos:end])
        if not codes:
            raise ProtocolError(f"{what} without reason codes")
        return cls(packet_id, codes, props)

    return decode_codes


def _decode_unsubscribe(flags: int, view: memoryview, pos: int, end: int) -> UnsubscribeV5:
    packet_id = _packet_id_at(view, pos, end)
    props, pos = _properties_at(view, pos + 2, end, "UNSUBSCRIBE")
    topics = []
    while pos < end:
        topic_filter, pos = _str_at(view, pos, end)
        validate_topic_filter(topic_filter)
        topics.append(topic_filter)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without topic filters", "MQTT-3.10.3-2")
    return UnsubscribeV5(packet_id, tuple(topics), props)


def _disconnect_decoder(role: str):
    valid = _DISCONNECT_CODES[role]

    def decode_disconnect(flags: int, view: memoryview, pos: int, end: int) -> DisconnectV5:
        if pos == end:  # the short form: Normal disconnection
            return DisconnectV5()
        reason = _reason(view[pos], valid, "DISCONNECT to a " + role, "MQTT-3.14.2-1")
        if end - pos == 1:
            return DisconnectV5(reason)
        props, pos = _properties_at(view, pos + 1, end, "DISCONNECT")
        if pos != end:
            raise MalformedPacket("trailing bytes after the DISCONNECT properties")
        if role == "client" and props.session_expiry_interval is not None:
            raise ProtocolError("Session Expiry Interval in a DISCONNECT from the server", "MQTT-3.14.2-2")
        return DisconnectV5(reason, props)

    return decode_disconnect


def _auth_decoder(role: str):
    valid = _AUTH_CODES[role]

    def decode_auth(flags: int, view: memoryview, pos: int, end: int) -> Auth:
        if pos == end:
            reason, props = R.SUCCESS, NO_PROPERTIES
        else:
            reason = _reason(view[pos], valid, "AUTH to a " + role, "MQTT-3.15.2-1")
            props, pos = _properties_at(view, pos + 1, end, "AUTH")
            if pos != end:
                raise MalformedPacket("trailing bytes after the AUTH properties")
        if reason not in valid:  # the short form means Success, which only a server sends
            raise ProtocolError("AUTH with Success to a server", "MQTT-3.15.2-1")
        if props.authentication_method is None:
            raise ProtocolError("AUTH without an Authentication Method", "MQTT-4.12.0-5")
        return Auth(reason, props)

    return decode_auth


def _decoders(role: str) -> tuple:
    table = (
        None,
        _decode_connect_any,
        _decode_connack,
        _publish_decoder(role),
        _ack_decoder(PubackV5, _PUBACK_CODES, "MQTT-3.4.2-1"),
        _ack_decoder(PubrecV5, _PUBACK_CODES, "MQTT-3.5.2-1"),
        _ack_decoder(PubrelV5, _PUBREL_CODES, "MQTT-3.6.2-1"),
        _ack_decoder(PubcompV5, _PUBREL_CODES, "MQTT-3.7.2-1"),
        _decode_subscribe,
        _codes_decoder(SubackV5, _SUBACK_CODES, "MQTT-3.9.3-2"),
        _decode_unsubscribe,
        _codes_decoder(UnsubackV5, _UNSUBACK_CODES, "MQTT-3.11.3-2"),
        _DECODERS[PacketType.PINGREQ],
        _DECODERS[PacketType.PINGRESP],
        _disconnect_decoder(role),
        _auth_decoder(role),
    )
    # The CONNECT decoder renames only for a 5.0 CONNECT: 3.1.1's keeps its own ids.
    return (None, table[1], *(_v5_rules(decoder) for decoder in table[2:]))


DECODERS = {role: _decoders(role) for role in ("server", "client")}

_ACCEPTED_BY = {
    "server": frozenset({1, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15}),
    "client": frozenset({2, 3, 4, 5, 6, 7, 9, 11, 13, 14, 15}),
}
# Fixed-header flags other than PUBLISH's, section 2.1.3 Table 2.2.
_REQUIRED_FLAGS = {
    6: (0b0010, "MQTT-3.6.1-1"), 8: (0b0010, "MQTT-3.8.1-1"), 10: (0b0010, "MQTT-3.10.1-1"),
    14: (0, "MQTT-3.14.1-1"), 15: (0, "MQTT-3.15.1-1"),
}
_NAMES = {**{t.value: t.name for t in PacketType}, 15: "AUTH"}


def _check_first_byte(byte: int, role: str):
    kind, flags = byte >> 4, byte & 0x0F
    if kind == 0:
        return MalformedPacket, "reserved packet type 0", None
    if kind not in _ACCEPTED_BY[role]:
        return ProtocolError, f"a {role} must not receive {_NAMES[kind]}", None
    if kind == PacketType.PUBLISH:
        qos = flags >> 1 & 0x03
        if qos == 3:
            return MalformedPacket, "PUBLISH with QoS 3", "MQTT-3.3.1-4"
        if qos == 0 and flags & 0x08:
            return MalformedPacket, "PUBLISH with QoS 0 and DUP set", "MQTT-3.3.1-2"
        return None
    required, rule = _REQUIRED_FLAGS.get(kind, (0, "MQTT-2.1.3-1"))
    if flags != required:
        return MalformedPacket, f"{_NAMES[kind]} with fixed-header flags {flags:#06b}", rule
    return None


HEADER_ERRORS = {role: tuple(_check_first_byte(byte, role) for byte in range(256)) for role in _ACCEPTED_BY}


def connection_decoders(connect: ConnectV5) -> tuple:
    """The server's decoders for the connection ``connect`` opened: they add the rules that
    depend on that CONNECT."""
    table = list(DECODERS["server"])
    method = connect.properties.authentication_method
    decode_auth, decode_disconnect = table[15], table[14]

    def auth(flags: int, view: memoryview, pos: int, end: int) -> Auth:
        if method is None:
            raise ProtocolError("AUTH after a CONNECT without Authentication Method", "MQTT-4.12.0-7")
        packet = decode_auth(flags, view, pos, end)
        if packet.properties.authentication_method != method:
            raise ProtocolError(
                "AUTH names another Authentication Method than the CONNECT", "MQTT-4.12.0-5",
                R.BAD_AUTHENTICATION_METHOD,
            )
        return packet

    def disconnect(flags: int, view: memoryview, pos: int, end: int) -> DisconnectV5:
        packet = decode_disconnect(flags, view, pos, end)
        expiry = packet.properties.session_expiry_interval
        if expiry and not connect.properties.session_expiry_interval:
            raise ProtocolError("Session Expiry Interval set in DISCONNECT after 0 in CONNECT (section 3.14.2.2.2)")
        return packet

    table[14], table[15] = disconnect, auth
    return tuple(table)


def decode(data, *, role: str = "server", max_packet_size: int = MAX_REMAINING_LENGTH):
    """packets.decode with version=5."""
    return _decode_any(data, role=role, max_packet_size=max_packet_size, version=5)


# --- encoding -----------------------------------------------------------------------


def encode_publish_v5(
    topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool, packet_id: int | None,
    properties: bytes = b"\x00",
) -> bytes:
    """A PUBLISH whose topic and property block (``encode_properties``) are already encoded:
    the fan-out path, where only the properties differ per subscriber."""
    if qos:
        if qos != 1 and qos != 2:
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
        packet_id_bytes = _id(packet_id)
    else:
        if packet_id is not None:
            raise ValueError("a QoS 0 PUBLISH has no packet identifier [MQTT-2.2.1-2]")
        if dup:
            raise ValueError("a QoS 0 PUBLISH cannot have DUP set [MQTT-3.3.1-2]")
        packet_id_bytes = b""
    first = 0x30 | (8 if dup else 0) | qos << 1 | (1 if retain else 0)
    return _frame(first, b"".join((_u16(len(topic)), topic, packet_id_bytes, properties, payload)))


def _encode_connect(packet: ConnectV5) -> bytes:
    connect_flags = 0x02 if packet.clean_start else 0
    payload = [_utf8(packet.client_id)]
    will = packet.will
    if will is not None:
        if will.qos not in (0, 1, 2):
            raise ValueError(f"Will QoS must be 0, 1 or 2, not {will.qos!r}")
        connect_flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += (encode_properties(will.properties, "WILL"), _utf8(will.topic), _binary(will.payload))
    if packet.username is not None:
        connect_flags |= 0x80
        payload.append(_utf8(packet.username))
    if packet.password is not None:
        connect_flags |= 0x40
        payload.append(_binary(packet.password))
    header = b"\x00\x04MQTT\x05" + bytes((connect_flags,)) + _u16(packet.keep_alive)
    return _frame(0x10, header + encode_properties(packet.properties, "CONNECT") + b"".join(payload))


def _encode_connack(packet: ConnackV5) -> bytes:
    if packet.reason_code not in _CONNACK_CODES:
        raise ValueError(f"{packet.reason_code!r} is not a CONNACK reason code [MQTT-3.2.2-8]")
    if packet.session_present and packet.reason_code:
        raise ValueError("a refusing CONNACK has Session Present 0 [MQTT-3.2.2-6]")
    body = bytes((1 if packet.session_present else 0, packet.reason_code))
    return _frame(0x20, body + encode_properties(packet.properties, "CONNACK"))


def _encode_publish(packet: PublishV5) -> bytes:
    return encode_publish_v5(
        packet.topic.encode("utf-8"), packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id,
        encode_properties(packet.properties, "PUBLISH"),
    )


def _ack_encoder(first: int, valid: frozenset, what: str):
    def encode_ack(packet) -> bytes:
        if packet.reason_code not in valid:
            raise ValueError(f"{packet.reason_code!r} is not a {what} reason code")
        if packet.properties is NO_PROPERTIES:
            if not packet.reason_code:  # the short form, section 3.4.2.1
                return bytes((first, 2)) + _id(packet.packet_id)
            return bytes((first, 3)) + _id(packet.packet_id) + bytes((packet.reason_code,))
        body = _id(packet.packet_id) + bytes((packet.reason_code,)) + encode_properties(packet.properties, what)
        return _frame(first, body)

    return encode_ack


def _encode_subscribe(packet: SubscribeV5) -> bytes:
    if not packet.topics:
        raise ValueError("SUBSCRIBE needs at least one topic filter [MQTT-3.8.3-2]")
    body = [_id(packet.packet_id), encode_properties(packet.properties, "SUBSCRIBE")]
    for sub in packet.topics:
        if sub.qos not in (0, 1, 2) or sub.retain_handling not in (0, 1, 2):
            raise ValueError(f"bad Subscription Options in {sub!r}")
        options = sub.qos | (4 if sub.no_local else 0) | (8 if sub.retain_as_published else 0) | sub.retain_handling << 4
        body += (_utf8(sub.topic_filter), bytes((options,)))
    return _frame(0x82, b"".join(body))


def _codes_encoder(first: int, valid: frozenset, what: str):
    def encode_codes(packet) -> bytes:
        codes = bytes(packet.reason_codes)
        if not codes or not valid.issuperset(codes):
            raise ValueError(f"bad {what} reason codes {packet.reason_codes!r}")
        return _frame(first, _id(packet.packet_id) + encode_properties(packet.properties, what) + codes)

    return encode_codes


def _encode_unsubscribe(packet: UnsubscribeV5) -> bytes:
    if not packet.topics:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter [MQTT-3.10.3-2]")
    body = [_id(packet.packet_id), encode_properties(packet.properties, "UNSUBSCRIBE")]
    body += (_utf8(topic_filter) for topic_filter in packet.topics)
    return _frame(0xA2, b"".join(body))


def _reason_encoder(first: int, valid: frozenset, what: str):
    def encode_reason(packet) -> bytes:
        if packet.reason_code not in valid:
            raise ValueError(f"{packet.reason_code!r} is not a {what} reason code")
        if packet.properties is NO_PROPERTIES and not packet.reason_code:
            return bytes((first, 0))
        return _frame(first, bytes((packet.reason_code,)) + encode_properties(packet.properties, what))

    return encode_reason


_ENCODERS = {
    ConnectV5: _encode_connect,
    ConnackV5: _encode_connack,
    PublishV5: _encode_publish,
    PubackV5: _ack_encoder(0x40, _PUBACK_CODES, "PUBACK"),
    PubrecV5: _ack_encoder(0x50, _PUBACK_CODES, "PUBREC"),
    PubrelV5: _ack_encoder(0x62, _PUBREL_CODES, "PUBREL"),
    PubcompV5: _ack_encoder(0x70, _PUBREL_CODES, "PUBCOMP"),
    SubscribeV5: _encode_subscribe,
    SubackV5: _codes_encoder(0x90, _SUBACK_CODES, "SUBACK"),
    UnsubscribeV5: _encode_unsubscribe,
    UnsubackV5: _codes_encoder(0xB0, _UNSUBACK_CODES, "UNSUBACK"),
    DisconnectV5: _reason_encoder(0xE0, _DISCONNECT_CODES["client"] | _DISCONNECT_CODES["server"], "DISCONNECT"),
    Auth: _reason_encoder(0xF0, _AUTH_CODES["client"] | _AUTH_CODES["server"], "AUTH"),
}


def encode(packet: PacketV5) -> bytes:
    """The wire form of a 5.0 packet (PINGREQ and PINGRESP are 3.1.1's).

    ValueError for what cannot be sent or would not decode back (a number out
    of range, a reason code the packet cannot carry, a property it cannot
    carry); topic syntax is not checked, as in packets.encode.
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        if type(packet) is Pingreq or type(packet) is Pingresp:
            return encode_v3(packet)
        raise TypeError(f"not an MQTT 5.0 packet: {packet!r}")
    try:
        return encoder(packet)
    except OverflowError as exc:  # int.to_bytes of a four byte integer out of range
        raise ValueError(str(exc)) from None
