"""Unit tests for the MQTT 3.1.1 packet codec (daemons.broker.packets).

Spec-related tests carry the statement id in their name (test_mqtt_x_y_z_n_...)
and start their docstring with it in brackets, as docs/CONFORMANCE.md asks.
Hand-built byte strings are used for everything that encode() refuses to
produce, so the decoder is tested against the wire format, not against itself.
"""

from __future__ import annotations

import pytest

from daemons.broker import packets
from daemons.broker.packets import (
    MAX_REMAINING_LENGTH,
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    InvalidTopic,
    MalformedPacket,
    PacketTooLarge,
    PacketType,
    Pingreq,
    Pingresp,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Reader,
    Suback,
    Subscribe,
    UnacceptableProtocol,
    Unsuback,
    Unsubscribe,
    Will,
    decode,
    encode,
    encode_publish,
)

# --- helpers ------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect_bytes(
    flags: int = 0x02,
    payload: bytes = s("client"),
    name: bytes = b"MQTT",
    level: int = 4,
    keep_alive: int = 60,
) -> bytes:
    return frame(0x10, s(name) + bytes([level, flags]) + keep_alive.to_bytes(2, "big") + payload)


def publish_bytes(topic: bytes, payload: bytes = b"x", qos: int = 0, pid: bytes = b"") -> bytes:
    return frame(0x30 | qos << 1, s(topic) + pid + payload)


def decode_error(data: bytes, role: str = "server", **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, role=role, **kw)
    return info.value


def assert_error(data: bytes, cls: type, rule: str | None, role: str = "server") -> ProtocolError:
    exc = decode_error(data, role)
    assert type(exc) is cls, exc
    assert exc.rule == rule, exc
    return exc


SERVER_BOUND = [
    Connect("client-1"),
    Connect("", clean_session=True, keep_alive=0),
    Connect("c", clean_session=False, keep_alive=65535),
    Connect("c", will=Will("will/topic", b"gone", qos=2, retain=True)),
    Connect("c", will=Will("w", b"", qos=1)),
    Connect("c", username="user", password=b"\x00\xffsecret"),
    Connect("c", username="", password=b""),
    Connect("c", username="only-user"),
    Connect("old", protocol_name="MQIsdp", protocol_level=3),
    Connect("\ufeffbom-kept", will=Will("ü/漢/🙂", b"\x00" * 3)),
    Publish("a/b", b"payload"),
    Publish("a", b""),
    Publish("/", b"x", qos=1, packet_id=1),
    Publish("a//b", b"x" * 300, qos=2, retain=True, dup=True, packet_id=65535),
    Publish("$SYS/x", b"\x00\x01", retain=True),
    Publish("t", b"y" * 20000, qos=1, dup=True, packet_id=42),
    Puback(1),
    Pubrec(65535),
    Pubrel(258),
    Pubcomp(7),
    Subscribe(1, (("a/b", 0),)),
    Subscribe(2, (("+", 1), ("#", 2), ("a/+/c/#", 0), ("$SYS/#", 1), ("/", 2))),
    Unsubscribe(3, ("a/b",)),
    Unsubscribe(4, ("+/+", "#", "x")),
    Pingreq(),
    Disconnect(),
]
CLIENT_BOUND = [
    Connack(False, ConnackCode.ACCEPTED),
    Connack(True, ConnackCode.ACCEPTED),
    *(Connack(False, code) for code in ConnackCode),
    Publish("a/b", b"p", qos=1, packet_id=9),
    Puback(3),
    Pubrec(4),
    Pubrel(5),
    Pubcomp(6),
    Suback(1, (0,)),
    Suback(2, (0, 1, 2, SUBACK_FAILURE)),
    Unsuback(8),
    Pingresp(),
]
ALL = [("server", p) for p in SERVER_BOUND] + [("client", p) for p in CLIENT_BOUND]
SMALL = [(role, p) for role, p in ALL if len(encode(p)) < 400]


# --- round trips and framing -----------------------------------------------------


@pytest.mark.parametrize(("role", "packet"), ALL, ids=repr)
def test_round_trip(role, packet):
    data = encode(packet)
    assert decode(data, role=role) == (packet, len(data))


def test_every_packet_type_is_covered():
    seen = {type(p) for _, p in ALL}
    assert len(seen) == 14 == len(PacketType)


@pytest.mark.parametrize(("role", "packet"), SMALL, ids=repr)
def test_truncated_packet_needs_more(role, packet):
    data = encode(packet)
    for cut in range(len(data)):
        assert decode(data[:cut], role=role) is None


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_decode_accepts_buffers_and_reports_consumed(wrap):
    first, second = encode(Publish("a", b"1")), encode(Pingreq())
    packet, used = decode(wrap(first + second))
    assert packet == Publish("a", b"1")
    assert used == len(first)


def test_decoded_packet_holds_no_view_of_the_input():
    data = bytearray(encode(Publish("a/b", b"payload", qos=1, packet_id=3)))
    packet, _ = decode(data)
    data[:] = b"\x00" * len(data)  # would raise BufferError if a view were kept
    assert packet.payload == b"payload" and type(packet.payload) is bytes


def test_reader_byte_at_a_time_equals_one_feed():
    stream = b"".join(encode(p) for p in SERVER_BOUND if not isinstance(p, Connect))
    stream = encode(Connect("me")) + stream
    whole = Reader()
    whole.feed(stream)
    expected = list(whole)
    assert expected[0] == Connect("me") and len(expected) == len(SERVER_BOUND) - 9

    trickle = Reader()
    got = []
    for i in range(len(stream)):
        trickle.feed(stream[i : i + 1])
        got.extend(trickle)
    assert got == expected


def test_reader_many_packets_in_one_feed():
    reader = Reader()
    publishes = [Publish(f"t/{i}", bytes([i % 256]) * i, qos=1, packet_id=i + 1) for i in range(500)]
    reader.feed(encode(Connect("c")) + b"".join(encode(p) for p in publishes))
    assert list(reader) == [Connect("c"), *publishes]
    assert reader.next_packet() is None


def test_reader_keeps_partial_packet_across_feeds():
    reader = Reader()
    data = encode(Connect("c")) + encode(Publish("a", b"xyz"))
    reader.feed(data[:-2])
    assert list(reader) == [Connect("c")]
    reader.feed(data[-2:] + encode(Pingreq())[:1])
    assert list(reader) == [Publish("a", b"xyz")]
    reader.feed(b"\x00")
    assert list(reader) == [Pingreq()]


def test_reader_rejects_bad_role():
    with pytest.raises(ValueError):
        Reader(role="broker")
    with pytest.raises(ValueError):
        decode(b"\xc0\x00", role="peer")


# --- remaining length ----------------------------------------------------------------

VARINT_TABLE = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"),
    (2097152, b"\x80\x80\x80\x01"),
    (268435455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("length", "wire"), VARINT_TABLE)
def test_remaining_length_encoding(length, wire):
    assert packets._varint(length) == wire


@pytest.mark.parametrize(("length", "wire"), VARINT_TABLE)
def test_remaining_length_decoding(length, wire):
    header = b"\x30" + wire  # a PUBLISH header alone, body not yet arrived
    if length:
        assert decode(header, max_packet_size=length) is None
        with pytest.raises(PacketTooLarge):
            decode(header, max_packet_size=length - 1)
    else:
        # The empty body is a complete (and malformed) PUBLISH.
        assert type(decode_error(header)) is MalformedPacket


@pytest.mark.parametrize("length", [0, 127, 128, 16383, 16384, 2097151, 2097152])
def test_remaining_length_boundaries_round_trip(length):
    if length == 0:
        packet, role = Pingreq(), "server"
    else:
        # A SUBACK body is the packet id (2 bytes) and one byte per code.
        packet, role = Suback(1, (0,) * (length - 2)), "client"
    data = encode(packet)
    assert data[1 : 1 + len(varint(length))] == varint(length)
    assert decode(data, role=role) == (packet, len(data))


def test_remaining_length_five_bytes_is_malformed():
    with pytest.raises(MalformedPacket):
        decode(b"\x30\xff\xff\xff\xff\x01")
    # Refused as soon as the fourth byte still says "more follows".
    with pytest.raises(MalformedPacket):
        decode(b"\x30\x80\x80\x80\x80")


def test_encode_refuses_oversized_remaining_length():
    with pytest.raises(ValueError):
        packets._varint(MAX_REMAINING_LENGTH + 1)


def test_packet_too_large_before_body_arrives():
    header = b"\x30" + varint(1001)
    with pytest.raises(PacketTooLarge):
        decode(header, max_packet_size=1000)
    reader = Reader(max_packet_size=1000)
    reader.feed(encode(Connect("c")))
    assert reader.next_packet() == Connect("c")
    reader.feed(header)
    with pytest.raises(PacketTooLarge):
        reader.next_packet()
    assert decode(header, max_packet_size=1001) is None


# --- fixed header ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "role", "rule"),
    [
        (b"\x11" + connect_bytes()[1:], "server", "MQTT-2.2.2-1"),
        (b"\x48\x02\x00\x01", "server", "MQTT-2.2.2-1"),
        (b"\x51\x02\x00\x01", "server", "MQTT-2.2.2-1"),
        (b"\x60\x02\x00\x01", "server", "MQTT-3.6.1-1"),
        (b"\x63\x02\x00\x01", "client", "MQTT-3.6.1-1"),
        (b"\x74\x02\x00\x01", "server", "MQTT-2.2.2-1"),
        (b"\x80" + frame(0x82, b"\x00\x01" + s("a") + b"\x00")[1:], "server", "MQTT-3.8.1-1"),
        (b"\xa0\x05\x00\x01" + s("a"), "server", "MQTT-3.10.1-1"),
        (b"\xc1\x00", "server", "MQTT-2.2.2-1"),
        (b"\xe2\x00", "server", "MQTT-3.14.1-1"),
        (b"\x22\x02\x00\x00", "client", "MQTT-2.2.2-1"),
        (b"\x98\x03\x00\x01\x00", "client", "MQTT-2.2.2-1"),
        (b"\xb1\x02\x00\x01", "client", "MQTT-2.2.2-1"),
        (b"\xd4\x00", "client", "MQTT-2.2.2-1"),
    ],
)
def test_mqtt_2_2_2_1_reserved_flags_must_match_table(data, role, rule):
    """[MQTT-2.2.2-1] [MQTT-2.2.2-2] [MQTT-3.6.1-1] [MQTT-3.8.1-1] [MQTT-3.10.1-1] [MQTT-3.14.1-1]
    Wrong reserved fixed-header flags are malformed, judged from the first byte."""
    assert_error(data, MalformedPacket, rule, role)
    assert_error(data[:1], MalformedPacket, rule, role)


@pytest.mark.parametrize("first", [0x00, 0x0F, 0xF0, 0xFF])
@pytest.mark.parametrize("role", ["server", "client"])
def test_reserved_packet_types_are_malformed(first, role):
    assert type(decode_error(bytes([first, 0]), role)) is MalformedPacket


def test_mqtt_3_3_1_4_publish_qos_3_is_malformed():
    """[MQTT-3.3.1-4] A PUBLISH with both QoS bits set is refused, on either side."""
    data = frame(0x36, s("a") + b"\x00\x01")
    assert_error(data, MalformedPacket, "MQTT-3.3.1-4")
    assert_error(data, MalformedPacket, "MQTT-3.3.1-4", role="client")


def test_mqtt_3_3_1_2_publish_qos0_with_dup_is_malformed():
    """[MQTT-3.3.1-2] DUP must be 0 on QoS 0 messages."""
    assert_error(frame(0x38, s("a") + b"x"), MalformedPacket, "MQTT-3.3.1-2")
    with pytest.raises(ValueError):
        encode(Publish("a", b"x", dup=True))


# --- body length exactly consumed -------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x40\x03\x00\x01\x00",  # PUBACK with a trailing byte
        b"\x40\x01\x00",  # PUBACK too short
        b"\x62\x00",  # PUBREL without a packet id
        b"\xc0\x01\x00",  # PINGREQ with a body
        b"\xe0\x01\x00",  # DISCONNECT with a body
        connect_bytes(payload=s("c") + b"\x00"),  # trailing byte after CONNECT payload
        connect_bytes(payload=b"\x00\x05abc"),  # client id runs past the end
        connect_bytes(payload=b""),  # no client id at all
        frame(0x10, s(b"MQTT") + b"\x04\x02"),  # CONNECT header cut short
        frame(0x30, b"\x00\x05ab"),  # PUBLISH topic runs past the end
        frame(0x32, s("a") + b"\x00"),  # QoS 1 PUBLISH cut inside the packet id
        frame(0x82, b"\x00\x01" + s("a/b")),  # SUBSCRIBE filter without QoS byte
        frame(0x82, b"\x00\x01" + s("a") + b"\x00" + b"\x00"),  # half a length
        frame(0xA2, b"\x00\x01" + s("a") + b"\x00"),  # UNSUBSCRIBE trailing byte
        frame(0xA2, b"\x00"),  # UNSUBSCRIBE cut inside the packet id
    ],
)
def test_body_must_be_consumed_exactly(data):
    exc = decode_error(data)
    assert isinstance(exc, MalformedPacket), exc


@pytest.mark.parametrize(
    "data",
    [
        b"\x20\x03\x00\x00\x00",  # CONNACK too long
        b"\x20\x01\x00",  # CONNACK too short
        b"\xb0\x03\x00\x01\x00",  # UNSUBACK too long
        b"\xd0\x01\x00",  # PINGRESP with a body
        frame(0x90, b"\x00\x01"),  # SUBACK without return codes
        frame(0x90, b"\x00"),  # SUBACK cut inside the packet id
    ],
)
def test_client_side_body_must_be_consumed_exactly(data):
    exc = decode_error(data, "client")
    assert isinstance(exc, MalformedPacket), exc


# --- UTF-8 strings -------------------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"\xc0\xaf", b"a\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]


@pytest.mark.parametrize("raw", BAD_UTF8)
def test_mqtt_1_5_3_1_ill_formed_utf8_closes(raw):
    """[MQTT-1.5.3-1] Ill-formed UTF-8 (incl. encoded surrogates, overlong forms) anywhere is malformed."""
    assert_error(connect_bytes(payload=s(raw)), MalformedPacket, "MQTT-1.5.3-1")
    assert_error(connect_bytes(0x82, s("c") + s(raw)), MalformedPacket, "MQTT-1.5.3-1")
    assert_error(connect_bytes(0x06, s("c") + s(raw) + s("")), MalformedPacket, "MQTT-1.5.3-1")
    assert_error(publish_bytes(raw), MalformedPacket, "MQTT-1.5.3-1")
    assert_error(frame(0x82, b"\x00\x01" + s(raw) + b"\x00"), MalformedPacket, "MQTT-1.5.3-1")
    assert_error(frame(0xA2, b"\x00\x01" + s(raw)), MalformedPacket, "MQTT-1.5.3-1")


def test_mqtt_1_5_3_2_null_character_closes():
    """[MQTT-1.5.3-2] U+0000 in any UTF-8 string is malformed."""
    assert_error(connect_bytes(payload=s("a\x00b")), MalformedPacket, "MQTT-1.5.3-2")
    assert_error(connect_bytes(0x82, s("c") + s("\x00")), MalformedPacket, "MQTT-1.5.3-2")
    assert_error(publish_bytes(b"a\x00"), InvalidTopic, "MQTT-1.5.3-2")
    assert_error(frame(0x82, b"\x00\x01" + s("a\x00") + b"\x00"), MalformedPacket, "MQTT-1.5.3-2")
    with pytest.raises(ValueError):
        encode(Connect("a\x00"))


def test_mqtt_1_5_3_3_bom_is_not_stripped():
    """[MQTT-1.5.3-3] 0xEF 0xBB 0xBF is U+FEFF and stays in the string."""
    packet, _ = decode(connect_bytes(payload=s(b"\xef\xbb\xbfid")))
    assert packet.client_id == "\ufeffid"
    packet, _ = decode(publish_bytes(b"\xef\xbb\xbf/t"))
    assert packet.topic == "\ufeff/t"


# --- CONNECT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"MQTTX", b"mqtt", b"MQIsdpX", b"", b"\xff\xfe", b"HTTP"])
def test_mqtt_3_1_2_1_unknown_protocol_name(name):
    """[MQTT-3.1.2-1] An unknown protocol name is not processed as MQTT: CONNACK 0x01, then close."""
    exc = assert_error(connect_bytes(name=name), UnacceptableProtocol, "MQTT-3.1.2-1")
    assert exc.connack == ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION == 1


@pytest.mark.parametrize(("name", "level"), [(b"MQTT", 5), (b"MQTT", 3), (b"MQTT", 0), (b"MQIsdp", 4)])
def test_mqtt_3_1_2_2_unsupported_level_gets_connack_1(name, level):
    """[MQTT-3.1.2-2] An unsupported protocol level is answered with CONNACK 0x01."""
    exc = assert_error(connect_bytes(name=name, level=level), UnacceptableProtocol, "MQTT-3.1.2-2")
    assert exc.connack == 1
    # The encoder will produce it (a test client needs to), the decoder refuses it.
    with pytest.raises(UnacceptableProtocol):
        decode(encode(Connect("c", protocol_level=level, protocol_name=name.decode())))


def test_mqisdp_level_3_is_accepted():
    packet, _ = decode(connect_bytes(name=b"MQIsdp", level=3))
    assert packet == Connect("client", protocol_name="MQIsdp", protocol_level=3)


def test_mqtt_3_1_2_3_reserved_connect_flag():
    """[MQTT-3.1.2-3] The reserved Connect Flags bit must be zero."""
    assert_error(connect_bytes(0x03), MalformedPacket, "MQTT-3.1.2-3")


@pytest.mark.parametrize("flags", [0x0A, 0x12, 0x1A])
def test_mqtt_3_1_2_13_will_qos_without_will(flags):
    """[MQTT-3.1.2-11] [MQTT-3.1.2-13] Will Flag 0 requires Will QoS 0."""
    assert_error(connect_bytes(flags), MalformedPacket, "MQTT-3.1.2-13")


def test_mqtt_3_1_2_15_will_retain_without_will():
    """[MQTT-3.1.2-11] [MQTT-3.1.2-15] Will Flag 0 requires Will Retain 0."""
    assert_error(connect_bytes(0x22), MalformedPacket, "MQTT-3.1.2-15")


def test_mqtt_3_1_2_14_will_qos_3():
    """[MQTT-3.1.2-14] Will QoS must not be 3."""
    data = connect_bytes(0x1E, s("c") + s("w") + s("m"))
    assert_error(data, MalformedPacket, "MQTT-3.1.2-14")


def test_mqtt_3_1_2_22_password_without_user_name():
    """[MQTT-3.1.2-22] The Password Flag needs the User Name Flag."""
    assert_error(connect_bytes(0x42, s("c") + s("pw")), MalformedPacket, "MQTT-3.1.2-22")


@pytest.mark.parametrize(
    ("flags", "payload", "rule"),
    [
        (0x06, s("c"), "MQTT-3.1.2-9"),  # Will Flag 1 without Will Topic / Message
        (0x06, s("c") + s("w"), "MQTT-3.1.2-9"),  # Will Message missing
        (0x82, s("c"), "MQTT-3.1.2-19"),  # User Name Flag 1 without a user name
        (0xC2, s("c") + s("u"), "MQTT-3.1.2-21"),  # Password Flag 1 without a password
        (0x02, s("c") + s("u"), "MQTT-3.1.2-18"),  # user name present without the flag
        (0x82, s("c") + s("u") + s("p"), "MQTT-3.1.2-20"),  # password present without the flag
    ],
)
def test_mqtt_3_1_3_1_payload_fields_must_match_flags(flags, payload, rule):
    """[MQTT-3.1.3-1] [MQTT-3.1.2-9] [MQTT-3.1.2-18] [MQTT-3.1.2-19] [MQTT-3.1.2-20] [MQTT-3.1.2-21]
    [MQTT-3.1.4-1] Payload fields are present exactly when their flag says so; the error names
    the statement broken."""
    exc = decode_error(connect_bytes(flags, payload))
    assert isinstance(exc, MalformedPacket), (rule, exc)
    assert exc.connack is None
    assert exc.rule == rule, exc


@pytest.mark.parametrize(("topic", "rule"), [("a/+", "MQTT-4.7.1-1"), ("#", "MQTT-4.7.1-1"), ("", "MQTT-4.7.3-1")])
def test_mqtt_3_1_3_10_will_topic_must_be_a_valid_topic_name(topic, rule):
    """[MQTT-3.1.3-10] [MQTT-4.7.1-1] [MQTT-4.7.3-1] The Will Topic is a topic name: no wildcards, not empty."""
    assert_error(connect_bytes(0x06, s("c") + s(topic) + s("m")), InvalidTopic, rule)


def test_connect_payload_details():
    """An empty client id decodes (accepting it is the broker's call); the password is binary."""
    packet, _ = decode(connect_bytes(0xC4 | 0x20 | 0x08, s("") + s("w/t") + s(b"\xff") + s("u") + s(b"\xff\x00")))
    assert packet == Connect(
        "", clean_session=False, will=Will("w/t", b"\xff", qos=1, retain=True),
        username="u", password=b"\xff\x00",
    )


# --- CONNACK ------------------------------------------------------------------------------------


def test_mqtt_3_2_2_4_refusing_connack_has_no_session():
    """[MQTT-3.2.2-4] A CONNACK with a non-zero return code must have Session Present 0."""
    assert_error(b"\x20\x02\x01\x05", MalformedPacket, "MQTT-3.2.2-4", role="client")
    with pytest.raises(ValueError):
        encode(Connack(True, ConnackCode.NOT_AUTHORIZED))


@pytest.mark.parametrize("data", [b"\x20\x02\x00\x06", b"\x20\x02\x00\xff", b"\x20\x02\x02\x00"])
def test_connack_reserved_values_are_malformed(data):
    assert isinstance(decode_error(data, "client"), MalformedPacket)


def test_connack_code_is_an_enum():
    packet, _ = decode(b"\x20\x02\x00\x04", role="client")
    assert packet.return_code is ConnackCode.BAD_USERNAME_OR_PASSWORD


# --- PUBLISH ---------------------------------------------------------------------------------


def test_mqtt_3_3_2_1_topic_name_must_be_present():
    """[MQTT-3.3.2-1] [MQTT-4.7.3-1] A PUBLISH needs a non-empty topic name."""
    assert_error(publish_bytes(b""), InvalidTopic, "MQTT-4.7.3-1")
    assert_error(frame(0x30, b""), MalformedPacket, None)


@pytest.mark.parametrize("topic", [b"a/+", b"+", b"#", b"a/#", b"a+b", b"x#"])
def test_mqtt_3_3_2_2_topic_name_has_no_wildcards(topic):
    """[MQTT-3.3.2-2] [MQTT-4.7.1-1] Wildcards are not allowed in a PUBLISH topic name."""
    assert_error(publish_bytes(topic), InvalidTopic, "MQTT-3.3.2-2")


@pytest.mark.parametrize("qos", [1, 2])
def test_mqtt_2_3_1_1_publish_packet_id_non_zero(qos):
    """[MQTT-2.3.1-1] A QoS > 0 PUBLISH carries a non-zero packet identifier."""
    assert_error(publish_bytes(b"a", qos=qos, pid=b"\x00\x00"), MalformedPacket, "MQTT-2.3.1-1")
    for bad in (None, 0, 65536):
        with pytest.raises(ValueError):
            encode(Publish("a", b"", qos=qos, packet_id=bad))


def test_mqtt_2_3_1_5_qos0_publish_has_no_packet_id():
    """[MQTT-2.3.1-5] A QoS 0 PUBLISH has no packet identifier: the bytes after the topic are payload."""
    packet, _ = decode(publish_bytes(b"a", payload=b"\x00\x01rest"))
    assert packet == Publish("a", b"\x00\x01rest")
    with pytest.raises(ValueError):
        encode(Publish("a", b"", qos=0, packet_id=1))


def test_publish_empty_payload_and_flags():
    packet, _ = decode(frame(0x3D, s("a/b") + b"\x12\x34"))
    assert packet == Publish("a/b", b"", qos=2, retain=True, dup=True, packet_id=0x1234)


def test_encode_publish_fast_path_matches_encode():
    for p in [Publish("a/ü", b"x", 0), Publish("t", b"y" * 200, 2, True, True, 9)]:
        fast = encode_publish(p.topic.encode(), p.payload, p.qos, p.retain, p.dup, p.packet_id)
        assert fast == encode(p)
    with pytest.raises(ValueError):
        encode_publish(b"t", b"", 3, False, False, 1)
    with pytest.raises(ValueError):
        encode_publish(b"t" * 65536, b"", 0, False, False, None)


# --- acknowledgements ------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "role"), [(0x40, "server"), (0x50, "server"), (0x62, "server"), (0x70, "server"), (0xB0, "client")])
def test_mqtt_2_3_1_1_ack_packet_id_non_zero(first, role):
    """[MQTT-2.3.1-1] Acknowledgements echo a non-zero packet identifier."""
    assert_error(bytes([first, 2, 0, 0]), MalformedPacket, "MQTT-2.3.1-1", role)


# --- SUBSCRIBE / SUBACK / UNSUBSCRIBE ------------------------------------------------------


def test_mqtt_2_3_1_1_subscribe_and_unsubscribe_packet_id_non_zero():
    """[MQTT-2.3.1-1] SUBSCRIBE and UNSUBSCRIBE carry a non-zero packet identifier."""
    assert_error(frame(0x82, b"\x00\x00" + s("a") + b"\x00"), MalformedPacket, "MQTT-2.3.1-1")
    assert_error(frame(0xA2, b"\x00\x00" + s("a")), MalformedPacket, "MQTT-2.3.1-1")
    assert_error(frame(0x90, b"\x00\x00\x00"), MalformedPacket, "MQTT-2.3.1-1", "client")


def test_mqtt_3_8_3_3_subscribe_needs_a_filter():
    """[MQTT-3.8.3-3] A SUBSCRIBE without topic filters is a protocol violation."""
    assert_error(frame(0x82, b"\x00\x01"), MalformedPacket, "MQTT-3.8.3-3")
    with pytest.raises(ValueError):
        encode(Subscribe(1, ()))


@pytest.mark.parametrize("qos_byte", [3, 4, 0x80, 0xFC, 0x41, 0xFF])
def test_mqtt_3_8_3_4_requested_qos_byte(qos_byte):
    """[MQTT-3.8.3-4] Requested QoS reserved bits must be 0 and QoS at most 2."""
    data = frame(0x82, b"\x00\x01" + s("a") + b"\x01" + s("b") + bytes([qos_byte]))
    assert_error(data, MalformedPacket, "MQTT-3.8.3-4")


@pytest.mark.parametrize(
    ("topic_filter", "rule"),
    [("a/#/b", "MQTT-4.7.1-2"), ("a#", "MQTT-4.7.1-2"), ("a+", "MQTT-4.7.1-3"), ("+a", "MQTT-4.7.1-3"), ("", "MQTT-4.7.3-1")],
)
def test_mqtt_4_7_1_3_subscribe_filters_are_validated(topic_filter, rule):
    """[MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-4.7.3-1] Filters in SUBSCRIBE and UNSUBSCRIBE follow section 4.7."""
    assert_error(frame(0x82, b"\x00\x01" + s(topic_filter) + b"\x00"), InvalidTopic, rule)
    assert_error(frame(0xA2, b"\x00\x01" + s("ok") + s(topic_filter)), InvalidTopic, rule)


def test_mqtt_3_10_3_2_unsubscribe_needs_a_filter():
    """[MQTT-3.10.3-2] An UNSUBSCRIBE without topic filters is a protocol violation."""
    assert_error(frame(0xA2, b"\x00\x01"), MalformedPacket, "MQTT-3.10.3-2")
    with pytest.raises(ValueError):
        encode(Unsubscribe(1, ()))


@pytest.mark.parametrize("code", [3, 4, 0x7F, 0x81, 0xFF])
def test_mqtt_3_9_3_2_suback_return_codes(code):
    """[MQTT-3.9.3-2] SUBACK return codes other than 0, 1, 2 and 0x80 are reserved."""
    assert_error(frame(0x90, b"\x00\x01\x00" + bytes([code])), MalformedPacket, "MQTT-3.9.3-2", "client")
    with pytest.raises(ValueError):
        encode(Suback(1, (code,)))


# --- connection order and direction ----------------------------------------------------------


@pytest.mark.parametrize("first", [encode(Publish("a", b"")), encode(Pingreq()), encode(Disconnect()), b"\x82"])
def test_mqtt_3_1_0_1_first_packet_must_be_connect(first):
    """[MQTT-3.1.0-1] [MQTT-4.8.0-1] The first packet from a client must be CONNECT."""
    reader = Reader()
    reader.feed(first)
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert info.value.rule == "MQTT-3.1.0-1"


def test_mqtt_3_1_0_2_second_connect_is_a_violation():
    """[MQTT-3.1.0-2] A second CONNECT on a connection is a protocol violation."""
    reader = Reader()
    reader.feed(encode(Connect("a")) + encode(Pingreq()) + encode(Connect("a")))
    assert reader.next_packet() == Connect("a")
    assert reader.next_packet() == Pingreq()
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert info.value.rule == "MQTT-3.1.0-2"
    # decode() keeps no memory, so a CONNECT alone is always fine there.
    assert decode(encode(Connect("a")))[0] == Connect("a")


def test_mqtt_3_2_0_1_client_reader_expects_connack_first():
    """[MQTT-3.2.0-1] The first packet from the server must be CONNACK."""
    reader = Reader(role="client")
    reader.feed(encode(Publish("a", b"")))
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert info.value.rule == "MQTT-3.2.0-1"
    reader = Reader(role="client")
    reader.feed(encode(Connack(False, ConnackCode.ACCEPTED)) + encode(Pingresp()))
    assert list(reader) == [Connack(False, ConnackCode.ACCEPTED), Pingresp()]


@pytest.mark.parametrize("packet", [Connack(False, ConnackCode.ACCEPTED), Suback(1, (0,)), Unsuback(1), Pingresp()], ids=repr)
def test_server_refuses_server_to_client_packets(packet):
    data = encode(packet)
    assert type(decode_error(data, "server")) is ProtocolError
    assert type(decode_error(data[:1], "server")) is ProtocolError
    reader = Reader()
    reader.feed(encode(Connect("c")) + data)
    assert reader.next_packet() == Connect("c")
    with pytest.raises(ProtocolError):
        reader.next_packet()


@pytest.mark.parametrize(
    "packet", [Connect("c"), Subscribe(1, (("a", 0),)), Unsubscribe(1, ("a",)), Pingreq(), Disconnect()], ids=repr
)
def test_client_refuses_client_to_server_packets(packet):
    assert type(decode_error(encode(packet), "client")) is ProtocolError


def test_reader_stays_failed_after_an_error():
    reader = Reader()
    reader.feed(b"\x30\x02\x00\x00")
    with pytest.raises(ProtocolError) as first:
        reader.next_packet()
    reader.feed(encode(Connect("c")))  # ignored, and no BufferError from a held view
    with pytest.raises(ProtocolError) as again:
        reader.next_packet()
    assert again.value is first.value


# --- errors and encode() input checks -----------------------------------------------------------


def test_error_hierarchy_and_attributes():
    assert issubclass(MalformedPacket, ProtocolError)
    assert issubclass(PacketTooLarge, ProtocolError)
    assert issubclass(UnacceptableProtocol, ProtocolError)
    assert issubclass(InvalidTopic, MalformedPacket)
    exc = MalformedPacket("bad", "MQTT-1.5.3-1")
    assert exc.rule == "MQTT-1.5.3-1" and exc.connack is None and "MQTT-1.5.3-1" in str(exc)
    assert UnacceptableProtocol("x").connack is ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION


@pytest.mark.parametrize(
    "packet",
    [
        Connect("c", keep_alive=65536),
        Connect("c", keep_alive=-1),
        Connect("x" * 65536),
        Connect("c", will=Will("w", b"", qos=3)),
        Connect("c", password=b"p"),
        Connect("c", protocol_level=256),
        Connect("\ud800"),
        Publish("a", b"", qos=1),
        Publish("a", b"", qos=3, packet_id=1),
        Puback(0),
        Pubrel(65536),
        Unsuback(None),
        Subscribe(0, (("a", 0),)),
        Subscribe(1, (("a", 3),)),
        Suback(1, ()),
        Connack(False, 6),
    ],
    ids=repr,
)
def test_encode_refuses_impossible_input(packet):
    with pytest.raises(ValueError):
        encode(packet)


def test_encode_refuses_non_packets():
    with pytest.raises(TypeError):
        encode("CONNECT")


def test_packets_are_slotted_and_the_rare_ones_frozen():
    """PUBLISH and its acknowledgements are not frozen (each decode would pay for it, see the
    module docstring); every packet is slotted, so a misspelt field is an error."""
    p = Publish("a", b"")
    with pytest.raises(AttributeError):
        p.topik = "b"
    assert not hasattr(p, "__dict__")
    c = Connect("c")
    with pytest.raises(AttributeError):
        c.client_id = "d"


def test_reader_max_packet_size_can_be_raised_after_connect():
    """A server reads CONNECT under max_connect_size and the rest under max_packet_size: the
    new limit applies from the next packet, also to one already buffered."""
    big = encode(Publish("t", b"p" * 500))
    small = Reader(max_packet_size=100)
    small.feed(encode(Connect("c")) + big)
    assert small.next_packet() == Connect("c")
    small.set_max_packet_size(1000)
    assert small.next_packet() == Publish("t", b"p" * 500)
    refused = Reader(max_packet_size=20)
    refused.feed(encode(Connect("c" * 30)))
    with pytest.raises(PacketTooLarge):
        refused.next_packet()


# -- large packets: gathered in a buffer of their own, read into directly (issue 21) ----------

LARGE = packets.LARGE_PACKET


def _large_stream():
    """CONNECT, then large and small PUBLISHes mixed (one large past LARGE_AHEAD), a PINGREQ."""
    pubs = [Publish("big/1", bytes(range(256)) * (LARGE // 256 + 7), qos=1, packet_id=1),
            Publish("s", b"small"),
            Publish("big/2", b"\xab" * (3 * packets.LARGE_AHEAD + 11), qos=2, packet_id=2),
            Publish("big/3", b"\x01" * LARGE, retain=True),
            Pingreq()]
    return encode(Connect("c")) + b"".join(encode(p) for p in pubs), [Connect("c"), *pubs]


@pytest.mark.parametrize("chunk", [1000, 4096, 65536, 256 * 1024, 10**8])
def test_large_packets_fed_in_chunks_decode_whole(chunk):
    stream, expected = _large_stream()
    reader, got = Reader(), []
    for i in range(0, len(stream), chunk):
        reader.feed(stream[i : i + chunk])
        got.extend(reader)
    assert got == expected and type(got[1].payload) is bytes


@pytest.mark.parametrize("chunk", [1000, 65536, 256 * 1024])
def test_large_packets_read_through_get_buffer_decode_whole(chunk):
    """As a BufferedProtocol transport does: get_buffer, write at most its length, buffer_updated."""
    stream, expected = _large_stream()
    scratch = memoryview(bytearray(chunk))
    reader, got, at, direct = Reader(), [], 0, 0
    while at < len(stream):
        buf = reader.get_buffer(scratch)
        n = min(len(buf), chunk, len(stream) - at)
        buf[:n] = stream[at : at + n]
        direct += n if buf.obj is not scratch.obj else 0
        del buf  # a transport releases the buffer after buffer_updated
        reader.buffer_updated(n, scratch)
        at += n
        got.extend(reader)
    assert got == expected
    # Most of the large payloads went straight into their packets' buffers.
    assert direct > 0.7 * sum(len(p.payload) for p in expected if isinstance(p, Publish))


def test_a_large_header_alone_allocates_little():
    """A client announcing 16 MiB and sending 1 KiB makes the reader hold ~1 MiB, not 16."""
    reader = Reader(max_packet_size=16 * 1024 * 1024)
    reader.feed(encode(Connect("c")))
    assert list(reader) == [Connect("c")]
    head = encode(Publish("t", b"x" * (16 * 1024 * 1024 - 10)))[:1024]
    reader.feed(head)
    assert reader.next_packet() is None
    buf = reader.get_buffer(memoryview(bytearray(10)))
    assert 0 < len(buf) <= packets.LARGE_AHEAD


def test_large_packet_errors_are_found_when_it_is_complete():
    reader = Reader()
    reader.feed(encode(Connect("c")))
    list(reader)
    bad = bytearray(encode(Publish("a/b", b"x" * 2 * LARGE)))
    bad[4:7] = b"a/+"  # a wildcard in a PUBLISH topic [MQTT-3.3.2-2]
    reader.feed(bytes(bad[: LARGE // 2]))
    assert reader.next_packet() is None
    reader.feed(bytes(bad[LARGE // 2 :]))
    with pytest.raises(InvalidTopic):
        reader.next_packet()
    with pytest.raises(InvalidTopic):  # the reader stays dead
        reader.next_packet()


def test_large_packet_over_the_maximum_is_refused_on_its_header():
    reader = Reader(max_packet_size=2 * LARGE)
    reader.feed(encode(Connect("c")))
    list(reader)
    reader.feed(encode(Publish("t", b"x" * 3 * LARGE))[:100])
    with pytest.raises(PacketTooLarge):
        reader.next_packet()
