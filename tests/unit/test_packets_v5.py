"""Unit tests for the MQTT 5.0 codec (daemons.broker.packets5 and packets.Reader(version=5)).

As in test_packets.py, spec tests carry the statement id in their name (test_v5_mqtt_x_y_z_n_...,
the 5.0 numbering) and start their docstring with it in brackets; a rule the spec states
without a number names its section instead.  Malformed input is built by hand (or with
tests/mqttraw.py, the independent builder), never with the encoder under test.
"""

from __future__ import annotations

import dataclasses

import pytest

from daemons.broker import packets5 as p5
from daemons.broker.packets import (
    Connect,
    InvalidTopic,
    MalformedPacket,
    PacketTooLarge,
    Pingreq,
    Pingresp,
    ProtocolError,
    Reader,
    ReasonCode,
    UnacceptableProtocol,
)
from daemons.broker.packets5 import (
    NO_PROPERTIES,
    Auth,
    ConnackV5,
    ConnectV5,
    DisconnectV5,
    Properties,
    PubackV5,
    PubcompV5,
    PublishV5,
    PubrecV5,
    PubrelV5,
    SubackV5,
    SubscribeV5,
    Subscription,
    UnsubackV5,
    UnsubscribeV5,
    WillV5,
    decode,
    encode,
    encode_properties,
    encode_publish_v5,
)
from tests import mqttraw as raw

R = ReasonCode
P = Properties

# --- helpers --------------------------------------------------------------------------


def frame(first: int, body: bytes) -> bytes:
    return raw.frame(first, body)


def s(text: str | bytes) -> bytes:
    return raw.string(text)


def props(*items, length: int | None = None) -> bytes:
    return raw.properties(*items, length=length)


def connect5(flags: int = 0x02, prop_block: bytes = b"\x00", payload: bytes = s("c"), keep_alive: int = 60) -> bytes:
    return frame(0x10, s("MQTT") + bytes([5, flags]) + keep_alive.to_bytes(2, "big") + prop_block + payload)


def error(data: bytes, role: str = "server") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, role=role)
    return info.value


def assert_error(data: bytes, cls: type, rule: str | None, reason: int, role: str = "server") -> ProtocolError:
    exc = error(data, role)
    assert type(exc) is cls, exc
    assert exc.rule == rule, exc
    assert exc.reason == reason, (exc, exc.reason)
    return exc


FULL_WILL = P(
    payload_format_indicator=1, message_expiry_interval=3600, content_type="text/plain", response_topic="re/ply",
    correlation_data=b"\x00\x01", will_delay_interval=30, user_properties=(("k", "v"), ("k", "v2")),
)
FULL_CONNECT = P(
    session_expiry_interval=0xFFFFFFFF, authentication_method="SCRAM-SHA-1", authentication_data=b"\xff\x00",
    request_problem_information=0, request_response_information=1, receive_maximum=20,
    topic_alias_maximum=10, maximum_packet_size=1 << 20, user_properties=(("a", "b"),),
)
FULL_CONNACK = P(
    session_expiry_interval=60, assigned_client_identifier="auto-1", server_keep_alive=30,
    authentication_method="SCRAM-SHA-1", authentication_data=b"x", response_information="resp/",
    server_reference="other:1883", reason_string="ok", receive_maximum=65535, topic_alias_maximum=5,
    maximum_qos=1, retain_available=0, user_properties=(("x", "y"),), maximum_packet_size=4096,
    wildcard_subscription_available=1, subscription_identifier_available=0, shared_subscription_available=1,
)
FULL_PUBLISH = P(
    payload_format_indicator=0, message_expiry_interval=1, content_type="", response_topic="a/b",
    correlation_data=b"", subscription_identifiers=(1, 268_435_455), topic_alias=65535,
    user_properties=(("", ""), ("ü", "漢")),
)
REASON_PROPS = P(reason_string="because", user_properties=(("k", "v"),))

SERVER_BOUND = [
    ConnectV5("c"),
    ConnectV5("", clean_start=False, keep_alive=0, properties=FULL_CONNECT),
    ConnectV5("c", will=WillV5("w/t", b"bye", 2, True, FULL_WILL), username="u", password=b"p"),
    ConnectV5("c", will=WillV5("w", b"")),
    ConnectV5("c", password=b"no user name"),  # 5.0 allows a password alone
    PublishV5("a/b", b"x"),
    PublishV5("a/b", b"x", 1, packet_id=1, properties=P(topic_alias=3)),
    PublishV5("", b"by alias", 2, True, True, 65535, P(topic_alias=3)),
    PublishV5("t", b"y" * 300, properties=P(user_properties=(("a", "1"),) * 50)),
    PubackV5(1), PubackV5(2, R.NO_MATCHING_SUBSCRIBERS), PubackV5(3, R.QUOTA_EXCEEDED, REASON_PROPS),
    PubrecV5(4), PubrecV5(5, R.PAYLOAD_FORMAT_INVALID), PubrecV5(6, R.SUCCESS, REASON_PROPS),
    PubrelV5(7), PubrelV5(8, R.PACKET_IDENTIFIER_NOT_FOUND), PubrelV5(9, R.SUCCESS, REASON_PROPS),
    PubcompV5(10), PubcompV5(11, R.PACKET_IDENTIFIER_NOT_FOUND, REASON_PROPS),
    SubscribeV5(1, (Subscription("a/#"),)),
    SubscribeV5(2, (Subscription("+", 1, True, True, 2), Subscription("$share/g/a/+", 2, False, False, 1)),
                P(subscription_identifiers=(268_435_455,), user_properties=(("k", "v"),))),
    UnsubscribeV5(3, ("a/b", "#")),
    UnsubscribeV5(4, ("x",), P(user_properties=(("k", "v"),))),
    Pingreq(),
    DisconnectV5(),
    DisconnectV5(R.DISCONNECT_WITH_WILL_MESSAGE),
    DisconnectV5(R.NORMAL_DISCONNECTION, P(session_expiry_interval=0, reason_string="bye", user_properties=(("k", "v"),))),
    Auth(R.CONTINUE_AUTHENTICATION, P(authentication_method="SCRAM-SHA-1", authentication_data=b"\x01")),
    Auth(R.RE_AUTHENTICATE, P(authentication_method="SCRAM-SHA-1", reason_string="again", user_properties=(("k", "v"),))),
]
CLIENT_BOUND = [
    ConnackV5(False),
    ConnackV5(True, R.SUCCESS, FULL_CONNACK),
    *(ConnackV5(False, code) for code in sorted(p5._CONNACK_CODES - {0})),
    PublishV5("a/b", b"p", 1, packet_id=9, properties=FULL_PUBLISH),
    PubackV5(3, R.NOT_AUTHORIZED), PubrecV5(4), PubrelV5(5), PubcompV5(6),
    SubackV5(1, (R.GRANTED_QOS_0,)),
    SubackV5(2, tuple(R(c) for c in sorted(p5._SUBACK_CODES)), REASON_PROPS),
    UnsubackV5(8, (R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED, R.TOPIC_FILTER_INVALID), REASON_PROPS),
    Pingresp(),
    DisconnectV5(R.SESSION_TAKEN_OVER),
    DisconnectV5(R.SERVER_MOVED, P(server_reference="b:1883", reason_string="moved")),
    Auth(R.SUCCESS, P(authentication_method="M")),
]
ALL = [("server", p) for p in SERVER_BOUND] + [("client", p) for p in CLIENT_BOUND]


# --- round trips and framing ----------------------------------------------------------------


@pytest.mark.parametrize(("role", "packet"), ALL, ids=repr)
def test_v5_round_trip(role, packet):
    data = encode(packet)
    assert decode(data, role=role) == (packet, len(data))


def test_v5_every_packet_type_and_property_is_covered():
    assert {type(p) for _, p in ALL} == {*p5._ENCODERS, Pingreq, Pingresp}
    seen = {
        f.name for _, p in ALL for holder in (p, getattr(p, "will", None)) if hasattr(holder, "properties")
        for f in dataclasses.fields(Properties) if getattr(holder.properties, f.name) not in (None, ())
    }
    assert seen == {f.name for f in dataclasses.fields(Properties)}


@pytest.mark.parametrize(("role", "packet"), ALL, ids=repr)
def test_v5_truncated_packet_needs_more(role, packet):
    data = encode(packet)
    for cut in range(len(data)):
        assert decode(data[:cut], role=role) is None


@pytest.mark.parametrize("role", ["server", "client"])
def test_v5_reader_split_at_every_byte(role):
    """Incremental decode: a stream fed in two pieces, split at every byte, gives the same packets."""
    if role == "server":
        packets = [ConnectV5("me", properties=P(authentication_method="SCRAM-SHA-1")), *SERVER_BOUND[5:]]
    else:
        packets = CLIENT_BOUND[1:]
    stream = b"".join(encode(p) for p in packets)
    for cut in range(len(stream) + 1):
        reader = Reader(role, version=5)
        got = []
        for piece in (stream[:cut], stream[cut:]):
            reader.feed(piece)
            got.extend(reader)
        assert got == packets, cut
        assert reader.version == 5


def test_short_forms_mean_success_without_properties():
    """Sections 3.4.2.1, 3.14.2.1, 3.15.2.1: remaining length 2 (acks) or 0 (DISCONNECT) means
    reason 0 and no properties; a reason code alone means no properties."""
    assert decode(b"\x40\x02\x00\x07") == (PubackV5(7), 4)
    assert decode(b"\x62\x03\x00\x07\x92") == (PubrelV5(7, R.PACKET_IDENTIFIER_NOT_FOUND), 5)
    assert decode(b"\xe0\x00") == (DisconnectV5(R.NORMAL_DISCONNECTION), 2)
    assert decode(b"\xe0\x01\x04") == (DisconnectV5(R.DISCONNECT_WITH_WILL_MESSAGE), 3)
    assert decode(b"\x40\x04\x00\x07\x00\x00")[0] is not None  # long form, empty properties
    # ... and the encoder writes the shortest form.
    assert encode(PubackV5(7)) == b"\x40\x02\x00\x07"
    assert encode(PubcompV5(7, R.PACKET_IDENTIFIER_NOT_FOUND)) == b"\x70\x03\x00\x07\x92"
    assert encode(DisconnectV5()) == b"\xe0\x00"


def test_packets_without_properties_share_one_object():
    packet, _ = decode(encode(PublishV5("a", b"x")))
    assert packet.properties is NO_PROPERTIES
    assert encode_properties(NO_PROPERTIES, "PUBLISH") == b"\x00"


def test_encode_publish_v5_fast_path_matches_encode():
    packet = PublishV5("a/ü", b"x", 1, True, False, 5, P(subscription_identifiers=(3,), topic_alias=2))
    fast = encode_publish_v5("a/ü".encode(), b"x", 1, True, False, 5, encode_properties(packet.properties, "PUBLISH"))
    assert fast == encode(packet)


def test_reason_codes_have_the_spec_names():
    assert R.SUCCESS == R.NORMAL_DISCONNECTION == R.GRANTED_QOS_0 == 0
    assert (R.MALFORMED_PACKET, R.PROTOCOL_ERROR, R.BAD_AUTHENTICATION_METHOD, R.PACKET_TOO_LARGE) == (0x81, 0x82, 0x8C, 0x95)
    assert R.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED == 0xA2
    assert len({code.value for code in R}) == 43  # Table 2.6


# --- the Reader learns the version from the CONNECT --------------------------------------------


def test_v5_connect_switches_the_reader_to_v5():
    reader = Reader(version=5)
    assert reader.version == 4
    reader.feed(encode(ConnectV5("c")) + encode(PublishV5("", b"x", properties=P(topic_alias=1))))
    assert list(reader) == [ConnectV5("c"), PublishV5("", b"x", properties=P(topic_alias=1))]
    assert reader.version == 5


def test_v3_connect_on_a_v5_reader_stays_v3():
    from daemons.broker.packets import Publish, encode as encode_v3

    reader = Reader(version=5)
    # A 3.1.1 PUBLISH whose payload happens to start like a property block stays payload.
    reader.feed(encode_v3(Connect("c")) + encode_v3(Publish("a", b"\x00x")))
    assert list(reader) == [Connect("c"), Publish("a", b"\x00x")]
    assert reader.version == 4
    reader.feed(b"\xf0\x00")  # AUTH does not exist in 3.1.1
    with pytest.raises(MalformedPacket):
        reader.next_packet()


def test_v3_reader_still_refuses_v5_connect_with_connack_1():
    """Until the core speaks 5.0 the server keeps Reader() and answers a 5.0 CONNECT with the
    3.1.1 CONNACK 1 [MQTT-3.1.2-2]; the error also carries 5.0's 0x84 for later."""
    reader = Reader()
    reader.feed(encode(ConnectV5("c")))
    with pytest.raises(UnacceptableProtocol) as info:
        reader.next_packet()
    assert info.value.connack == 1 and info.value.reason == R.UNSUPPORTED_PROTOCOL_VERSION


def test_v5_client_reader_takes_auth_before_connack():
    """[MQTT-3.2.0-1] A 5.0 server may send AUTH before the CONNACK, nothing else."""
    reader = Reader("client", version=5)
    first = Auth(R.CONTINUE_AUTHENTICATION, P(authentication_method="M"))
    reader.feed(encode(first) + encode(ConnackV5(False)) + encode(Pingresp()))
    assert list(reader) == [first, ConnackV5(False), Pingresp()]
    reader = Reader("client", version=5)
    reader.feed(encode(Pingresp()))
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert info.value.rule == "MQTT-3.2.0-1"


def test_v5_mqtt_3_1_0_2_second_connect():
    """[MQTT-3.1.0-2] A second CONNECT is a Protocol Error."""
    reader = Reader(version=5)
    reader.feed(encode(ConnectV5("c")) * 2)
    assert reader.next_packet() == ConnectV5("c")
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert (info.value.rule, info.value.reason) == ("MQTT-3.1.0-2", R.PROTOCOL_ERROR)


def test_v5_mqtt_4_12_0_7_auth_needs_a_connect_with_a_method():
    """[MQTT-4.12.0-7] A client that sent no Authentication Method must not send AUTH."""
    reader = Reader(version=5)
    reader.feed(encode(ConnectV5("c")) + encode(Auth(R.CONTINUE_AUTHENTICATION, P(authentication_method="M"))))
    assert reader.next_packet() == ConnectV5("c")
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert (info.value.rule, info.value.reason) == ("MQTT-4.12.0-7", R.PROTOCOL_ERROR)


def test_v5_mqtt_4_12_0_5_auth_with_another_method_is_bad_authentication_method():
    """[MQTT-4.12.0-5] Every AUTH carries the CONNECT's Authentication Method; another one
    gets 0x8C Bad authentication method."""
    connect = ConnectV5("c", properties=P(authentication_method="SCRAM-SHA-1"))
    good = Auth(R.CONTINUE_AUTHENTICATION, P(authentication_method="SCRAM-SHA-1"))
    reader = Reader(version=5)
    reader.feed(encode(connect) + encode(good) + encode(Auth(R.CONTINUE_AUTHENTICATION, P(authentication_method="PLAIN"))))
    assert [reader.next_packet(), reader.next_packet()] == [connect, good]
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert (info.value.rule, info.value.reason) == ("MQTT-4.12.0-5", R.BAD_AUTHENTICATION_METHOD)
    # Omitting the method altogether is a Protocol Error, stateless too.
    assert_error(raw.auth(0x18, props((0x1F, "x"))), ProtocolError, "MQTT-4.12.0-5", R.PROTOCOL_ERROR)


def test_v5_disconnect_session_expiry_after_zero_in_connect():
    """Section 3.14.2.2.2: a non-zero Session Expiry Interval in DISCONNECT after 0 (or none) in
    CONNECT is a Protocol Error; after a non-zero one it is fine."""
    bye = encode(DisconnectV5(R.SUCCESS, P(session_expiry_interval=10)))
    reader = Reader(version=5)
    reader.feed(encode(ConnectV5("c")) + bye)
    reader.next_packet()
    with pytest.raises(ProtocolError) as info:
        reader.next_packet()
    assert info.value.reason == R.PROTOCOL_ERROR
    reader = Reader(version=5)
    reader.feed(encode(ConnectV5("c", properties=P(session_expiry_interval=5))) + bye)
    assert list(reader)[1] == DisconnectV5(R.SUCCESS, P(session_expiry_interval=10))


def test_v5_packet_too_large_carries_0x95():
    reader = Reader(version=5, max_packet_size=100)
    reader.feed(encode(ConnectV5("c")) + b"\x30" + raw.varint(101))
    reader.next_packet()
    with pytest.raises(PacketTooLarge) as info:
        reader.next_packet()
    assert info.value.reason == R.PACKET_TOO_LARGE


def test_reader_rejects_unknown_version():
    with pytest.raises(ValueError):
        Reader(version=3)


# --- properties --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet_props", "what"),
    [
        (props((0x23, 1)), "CONNECT"),  # Topic Alias
        (props((0x24, 1)), "CONNECT"),  # Maximum QoS
        (props((0x18, 1)), "CONNECT"),  # Will Delay Interval outside the Will
        (props((0x00, 1)), "CONNECT"),  # no such identifier
        (props((0x7F, 1)), "CONNECT"),
    ],
)
def test_v5_property_not_allowed_in_packet_is_malformed(packet_props, what):
    """Section 2.2.2.2: an identifier not valid for its packet type is a Malformed Packet."""
    assert_error(connect5(prop_block=packet_props), MalformedPacket, None, R.MALFORMED_PACKET)


@pytest.mark.parametrize(
    "data",
    [
        raw.publish("a", props=props((0x11, 5))),  # Session Expiry Interval in PUBLISH
        raw.puback(1, 0, props((0x23, 5))),  # Topic Alias in PUBACK
        raw.subscribe(1, [("a", 0)], props=props((0x23, 5))),
        raw.unsubscribe(1, ["a"], props=props((0x0B, 5))),  # Subscription Identifier in UNSUBSCRIBE
        raw.disconnect(0, props((0x15, "M"))),  # Authentication Method in DISCONNECT
        raw.auth(0x18, props((0x15, "M"), (0x11, 1))),  # Session Expiry in AUTH
        connect5(0x06, payload=s("c") + props((0x11, 5)) + s("w") + s("m")),  # not a Will property
    ],
)
def test_v5_property_in_the_wrong_packet_is_malformed(data):
    """Section 2.2.2.2, Table 2.4."""
    assert_error(data, MalformedPacket, None, R.MALFORMED_PACKET)


@pytest.mark.parametrize(
    "block",
    [
        props(length=5),  # length past the end
        b"\x01",  # length 1, nothing follows
        b"\x04\x02\x00\x00\x01",  # four byte integer cut short
        b"\x80\x80\x80\x80\x01",  # property length longer than four bytes
        b"\x03\x26\x00\x01",  # user property cut inside its key
        b"\x02\x0b\x80",  # subscription identifier VBI cut short
        b"\x03\x03\x00\x05",  # content type longer than the block
    ],
)
def test_v5_property_block_cut_short_is_malformed(block):
    assert_error(raw.publish("a", props=block), MalformedPacket, None, R.MALFORMED_PACKET)


@pytest.mark.parametrize(
    "items",
    [
        [(0x01, 0), (0x01, 1)],
        [(0x02, 1), (0x02, 2)],
        [(0x23, 1), (0x23, 2)],
        [(0x08, "a"), (0x08, "b")],
        [(0x09, b""), (0x09, b"")],
    ],
)
def test_v5_property_more_than_once_is_a_protocol_error(items):
    """Section 2.2.2.2: it is a Protocol Error to include a property more than once, except
    User Property and (in PUBLISH) Subscription Identifier."""
    assert_error(raw.publish("a", props=props(*items)), ProtocolError, None, R.PROTOCOL_ERROR)
    ok = props((0x26, ("k", "1")), (0x26, ("k", "1")), (0x0B, 1), (0x0B, 2))
    packet, _ = decode(raw.publish("a", props=ok), role="client")
    assert packet.properties == P(user_properties=(("k", "1"), ("k", "1")), subscription_identifiers=(1, 2))


@pytest.mark.parametrize(
    ("data", "rule", "reason"),
    [
        (connect5(prop_block=props((0x21, 0))), None, R.PROTOCOL_ERROR),  # Receive Maximum 0
        (connect5(prop_block=props((0x27, 0))), None, R.PROTOCOL_ERROR),  # Maximum Packet Size 0
        (connect5(prop_block=props((0x17, 2))), None, R.PROTOCOL_ERROR),  # Request Problem Information 2
        (connect5(prop_block=props((0x19, 2))), None, R.PROTOCOL_ERROR),  # Request Response Information 2
        (connect5(prop_block=props((0x16, b"x"))), None, R.PROTOCOL_ERROR),  # Authentication Data alone
        (raw.publish("a", props=props((0x23, 0))), "MQTT-3.3.2-8", R.TOPIC_ALIAS_INVALID),  # Topic Alias 0
        (raw.publish("a", props=props((0x01, 2))), None, R.PROTOCOL_ERROR),  # Payload Format Indicator 2
        (raw.subscribe(1, [("a", 0)], props=props((0x0B, 0))), None, R.PROTOCOL_ERROR),  # Subscription Id 0
    ],
)
def test_v5_property_value_out_of_range(data, rule, reason):
    """[MQTT-3.3.2-8] and sections 3.1.2.11.3/.4/.6/.7/.10, 3.3.2.3.2, 3.8.2.1.2: values the
    spec forbids are Protocol Errors (Topic Alias 0 is 0x94 Topic Alias invalid)."""
    assert_error(data, ProtocolError, rule, reason)


@pytest.mark.parametrize(("ident", "value"), [(0x24, 2), (0x25, 2), (0x28, 2), (0x29, 5), (0x2A, 255), (0x21, 0)])
def test_v5_connack_property_out_of_range(ident, value):
    """Sections 3.2.2.3.x: Maximum QoS and the *Available bytes are 0 or 1, Receive Maximum is not 0."""
    assert_error(raw.connack(0, props=props((ident, value))), ProtocolError, None, R.PROTOCOL_ERROR, "client")


def test_v5_mqtt_1_5_4_1_ill_formed_utf8_in_a_property():
    """[MQTT-1.5.4-1] [MQTT-1.5.7-1] Ill-formed UTF-8 in a string or either half of a pair is malformed."""
    for block in (props((0x03, b"\xff")), props((0x26, (b"k", b"\xc0\xaf"))), props((0x26, (b"\xed\xa0\x80", b"v")))):
        assert_error(raw.publish("a", props=block), MalformedPacket, "MQTT-1.5.4-1", R.MALFORMED_PACKET)


def test_v5_mqtt_1_5_4_2_null_character():
    """[MQTT-1.5.4-2] U+0000 in a string is malformed: topic, property, client id."""
    assert_error(raw.publish("a\x00"), InvalidTopic, "MQTT-1.5.4-2", R.MALFORMED_PACKET)
    assert_error(raw.publish("a", props=props((0x03, "a\x00"))), MalformedPacket, "MQTT-1.5.4-2", R.MALFORMED_PACKET)
    assert_error(connect5(payload=s("a\x00")), MalformedPacket, "MQTT-1.5.4-2", R.MALFORMED_PACKET)


def test_v5_mqtt_1_5_4_3_bom_is_kept():
    """[MQTT-1.5.4-3] U+FEFF is not stripped, in properties either."""
    packet, _ = decode(raw.publish("a", props=props((0x03, b"\xef\xbb\xbftype"))))
    assert packet.properties.content_type == "\ufefftype"


def test_encode_refuses_impossible_properties():
    for what, bad in [
        ("CONNECT", P(topic_alias=1)),
        ("PUBLISH", P(topic_alias=0)),
        ("PUBLISH", P(subscription_identifiers=(0,))),
        ("CONNECT", P(receive_maximum=0)),
        ("CONNACK", P(maximum_qos=2)),
        ("PUBLISH", P(message_expiry_interval=1 << 32)),
        ("PUBLISH", P(content_type="a\x00")),
    ]:
        with pytest.raises(ValueError):
            encode(PublishV5("a", b"", properties=bad) if what == "PUBLISH" else ConnectV5("c", properties=bad)
                   if what == "CONNECT" else ConnackV5(False, properties=bad))


# --- fixed header -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "role", "rule"),
    [
        (b"\x41\x02\x00\x01", "server", "MQTT-2.1.3-1"),
        (b"\x60\x02\x00\x01", "server", "MQTT-3.6.1-1"),
        (b"\x80" + raw.subscribe(1, [("a", 0)], props=b"\x00")[1:], "server", "MQTT-3.8.1-1"),
        (b"\xa0" + raw.unsubscribe(1, ["a"], props=b"\x00")[1:], "server", "MQTT-3.10.1-1"),
        (b"\xe1\x00", "server", "MQTT-3.14.1-1"),
        (b"\xe2\x00", "client", "MQTT-3.14.1-1"),
        (b"\xf1\x00", "server", "MQTT-3.15.1-1"),
        (b"\xf8\x00", "client", "MQTT-3.15.1-1"),
        (b"\x36\x03\x00\x01a", "server", "MQTT-3.3.1-4"),
        (b"\x38\x04\x00\x01a\x00", "server", "MQTT-3.3.1-2"),
    ],
)
def test_v5_mqtt_2_1_3_1_reserved_flags_are_malformed(data, role, rule):
    """[MQTT-2.1.3-1] [MQTT-3.6.1-1] [MQTT-3.8.1-1] [MQTT-3.10.1-1] [MQTT-3.14.1-1] [MQTT-3.15.1-1]
    [MQTT-3.3.1-2] [MQTT-3.3.1-4] Wrong fixed-header flags are malformed, judged from the first byte."""
    assert_error(data, MalformedPacket, rule, R.MALFORMED_PACKET, role)
    assert_error(data[:1], MalformedPacket, rule, R.MALFORMED_PACKET, role)


@pytest.mark.parametrize(("first", "role"), [(0x20, "server"), (0x90, "server"), (0xD0, "server"), (0x10, "client"), (0x82, "client")])
def test_v5_packet_in_the_wrong_direction_is_a_protocol_error(first, role):
    assert_error(bytes([first, 0]), ProtocolError, None, R.PROTOCOL_ERROR, role)


def test_v5_disconnect_and_auth_go_both_ways():
    assert decode(b"\xe0\x01\x8e", role="client")[0] == DisconnectV5(R.SESSION_TAKEN_OVER)
    assert decode(b"\xe0\x01\x04", role="server")[0] == DisconnectV5(R.DISCONNECT_WITH_WILL_MESSAGE)


# --- CONNECT -------------------------------------------------------------------------------


def test_v5_mqtt_3_1_2_3_reserved_connect_flag():
    """[MQTT-3.1.2-3] The reserved Connect Flags bit must be 0."""
    assert_error(connect5(0x03), MalformedPacket, "MQTT-3.1.2-3", R.MALFORMED_PACKET)


@pytest.mark.parametrize(
    ("flags", "payload", "rule"),
    [
        (0x0A, s("c"), "MQTT-3.1.2-11"),  # Will QoS without the Will Flag
        (0x1E, s("c") + b"\x00" + s("w") + s("m"), "MQTT-3.1.2-12"),  # Will QoS 3
        (0x22, s("c"), "MQTT-3.1.2-13"),  # Will Retain without the Will Flag
        (0x06, s("c"), "MQTT-3.1.2-9"),  # Will Flag, no Will Properties
        (0x06, s("c") + b"\x00", "MQTT-3.1.2-9"),  # no Will Topic
        (0x06, s("c") + b"\x00" + s("w"), "MQTT-3.1.2-9"),  # no Will Payload
        (0x02, s("c") + s("u"), "MQTT-3.1.2-16"),  # user name without its flag
        (0x82, s("c"), "MQTT-3.1.2-17"),  # flag without a user name
        (0x82, s("c") + s("u") + s("p"), "MQTT-3.1.2-18"),  # password without its flag
        (0x42, s("c"), "MQTT-3.1.2-19"),  # flag without a password
        (0xC2, s("c") + s("u") + s("p") + b"x", "MQTT-3.1.3-1"),  # trailing bytes
    ],
)
def test_v5_mqtt_3_1_2_connect_flags_and_payload(flags, payload, rule):
    """[MQTT-3.1.2-9] [MQTT-3.1.2-11] [MQTT-3.1.2-12] [MQTT-3.1.2-13] [MQTT-3.1.2-16]
    [MQTT-3.1.2-17] [MQTT-3.1.2-18] [MQTT-3.1.2-19] [MQTT-3.1.3-1] [MQTT-3.1.4-1] The payload
    matches the flags, in order; a CONNECT that does not is malformed (CONNACK 0x81)."""
    assert_error(connect5(flags, payload=payload), MalformedPacket, rule, R.MALFORMED_PACKET)


@pytest.mark.parametrize(("topic", "rule"), [("a/+", "MQTT-4.7.0-1"), ("", "MQTT-4.7.3-1")])
def test_v5_will_topic_must_be_a_topic_name(topic, rule):
    """[MQTT-3.1.3-11] [MQTT-4.7.0-1] [MQTT-4.7.3-1] The Will Topic is a topic name: CONNACK 0x90."""
    assert_error(connect5(0x06, payload=s("c") + b"\x00" + s(topic) + s("m")), InvalidTopic, rule, R.TOPIC_NAME_INVALID)


def test_v5_connect_with_unknown_level_still_gets_connack_1():
    """[MQTT-3.1.2-2] Levels other than 3, 4 and 5 are refused (CONNACK 1, or 0x84 in 5.0)."""
    exc = error(frame(0x10, s("MQTT") + b"\x06\x02\x00\x3c\x00" + s("c")))
    assert type(exc) is UnacceptableProtocol and exc.connack == 1 and exc.reason == R.UNSUPPORTED_PROTOCOL_VERSION


def test_v5_decoder_keeps_3_1_1_rules_for_a_3_1_1_connect():
    """A 3.1.1 CONNECT read by the v5-capable decoder keeps 3.1.1's statement ids."""
    data = frame(0x10, s("MQTT") + b"\x04\x02\x00\x3c" + s(b"\xff"))
    assert error(data).rule == "MQTT-1.5.3-1"


# --- CONNACK -------------------------------------------------------------------------------------


def test_v5_connack_rules():
    """[MQTT-3.2.2-1] [MQTT-3.2.2-6] [MQTT-3.2.2-8] [MQTT-2.2.2-1] Reserved flags are malformed;
    a refusal with Session Present, or a code not in Table 3.1, is a Protocol Error; the
    property length must be there."""
    assert_error(raw.connack(0, props=b"\x00")[:2] + b"\x02\x00\x00", MalformedPacket, "MQTT-3.2.2-1", R.MALFORMED_PACKET, "client")
    assert_error(raw.connack(0x87, True, b"\x00"), ProtocolError, "MQTT-3.2.2-6", R.PROTOCOL_ERROR, "client")
    assert_error(raw.connack(0x04, props=b"\x00"), ProtocolError, "MQTT-3.2.2-8", R.PROTOCOL_ERROR, "client")
    assert_error(raw.connack(0), MalformedPacket, "MQTT-2.2.2-1", R.MALFORMED_PACKET, "client")


# --- PUBLISH ----------------------------------------------------------------------------------


def test_v5_mqtt_3_3_2_1_empty_topic_needs_a_topic_alias():
    """[MQTT-3.3.2-1] A zero length topic is allowed only with a Topic Alias."""
    assert_error(raw.publish("", props=b"\x00"), ProtocolError, "MQTT-3.3.2-1", R.PROTOCOL_ERROR)
    assert decode(raw.publish("", props=props((0x23, 7))))[0] == PublishV5("", b"", properties=P(topic_alias=7))


def test_v5_mqtt_3_3_2_2_wildcard_topic_is_topic_name_invalid():
    """[MQTT-3.3.2-2] [MQTT-4.7.0-1] Wildcards in a PUBLISH topic: DISCONNECT 0x90."""
    assert_error(raw.publish("a/#", props=b"\x00"), InvalidTopic, "MQTT-3.3.2-2", R.TOPIC_NAME_INVALID)


def test_v5_mqtt_3_3_2_14_response_topic_has_no_wildcards():
    """[MQTT-3.3.2-13] [MQTT-3.3.2-14] The Response Topic is a topic name, in a PUBLISH and in a Will."""
    assert_error(raw.publish("a", props=props((0x08, "r/+"))), ProtocolError, "MQTT-3.3.2-14", R.PROTOCOL_ERROR)
    will = connect5(0x06, payload=s("c") + props((0x08, "#")) + s("w") + s("m"))
    assert_error(will, ProtocolError, "MQTT-3.3.2-14", R.PROTOCOL_ERROR)


def test_v5_mqtt_3_3_4_6_client_publish_has_no_subscription_identifier():
    """[MQTT-3.3.4-6] A PUBLISH from a client must not carry a Subscription Identifier; one from
    the server may carry several [MQTT-3.3.4-4]."""
    data = raw.publish("a", props=props((0x0B, 1)))
    assert_error(data, ProtocolError, "MQTT-3.3.4-6", R.PROTOCOL_ERROR)
    assert decode(data, role="client")[0].properties.subscription_identifiers == (1,)


def test_v5_mqtt_2_2_1_3_packet_id_non_zero():
    """[MQTT-2.2.1-3] PUBLISH (QoS > 0), SUBSCRIBE, UNSUBSCRIBE and the acks carry a non-zero id."""
    for data in (raw.publish("a", qos=1, mid=0, props=b"\x00"), raw.subscribe(0, [("a", 0)], props=b"\x00"),
                 raw.unsubscribe(0, ["a"], props=b"\x00"), raw.puback(0), raw.pubrel(0, reason=0)):
        assert_error(data, MalformedPacket, "MQTT-2.2.1-3", R.MALFORMED_PACKET)


# --- acknowledgements ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "code", "rule"),
    [
        (raw.puback, 0x01, "MQTT-3.4.2-1"),
        (raw.puback, 0x92, "MQTT-3.4.2-1"),
        (raw.pubrec, 0x11, "MQTT-3.5.2-1"),
        (lambda mid, reason, props=None: raw.pubrel(mid, reason=reason, props=props), 0x10, "MQTT-3.6.2-1"),
        (raw.pubcomp, 0x80, "MQTT-3.7.2-1"),
    ],
)
def test_v5_ack_reason_code_must_be_one_of_its_table(build, code, rule):
    """[MQTT-3.4.2-1] [MQTT-3.5.2-1] [MQTT-3.6.2-1] [MQTT-3.7.2-1] Each ack uses its own reason codes."""
    assert_error(build(1, code), ProtocolError, rule, R.PROTOCOL_ERROR)
    assert_error(build(1, code, b"\x00"), ProtocolError, rule, R.PROTOCOL_ERROR)


def test_v5_ack_trailing_bytes_are_malformed():
    assert_error(frame(0x40, b"\x00\x01\x00\x00\xff"), MalformedPacket, None, R.MALFORMED_PACKET)
    assert_error(frame(0x40, b"\x00"), MalformedPacket, None, R.MALFORMED_PACKET)


# --- SUBSCRIBE / SUBACK / UNSUBSCRIBE / UNSUBACK -----------------------------------------------


@pytest.mark.parametrize("options", [0x40, 0x80, 0xC1])
def test_v5_mqtt_3_8_3_5_reserved_subscription_option_bits(options):
    """[MQTT-3.8.3-5] Non-zero reserved bits in the Subscription Options are malformed."""
    assert_error(raw.subscribe(1, [("a", options)], props=b"\x00"), MalformedPacket, "MQTT-3.8.3-5", R.MALFORMED_PACKET)


@pytest.mark.parametrize("options", [0x03, 0x30, 0x33])
def test_v5_subscription_options_qos_3_or_retain_handling_3(options):
    """Section 3.8.3.1: Maximum QoS 3 or Retain Handling 3 is a Protocol Error."""
    assert_error(raw.subscribe(1, [("a", options)], props=b"\x00"), ProtocolError, None, R.PROTOCOL_ERROR)


def test_v5_subscription_options_decode():
    data = raw.subscribe(1, [("a", raw.sub_options(2, True, True, 2)), ("b", raw.sub_options(1, retain_handling=1))], props=b"\x00")
    assert decode(data)[0] == SubscribeV5(1, (Subscription("a", 2, True, True, 2), Subscription("b", 1, retain_handling=1)))


def test_v5_mqtt_3_8_3_4_no_local_on_a_shared_subscription():
    """[MQTT-3.8.3-4] No Local on a Shared Subscription is a Protocol Error."""
    data = raw.subscribe(1, [("$share/g/a", raw.sub_options(no_local=True))], props=b"\x00")
    assert_error(data, ProtocolError, "MQTT-3.8.3-4", R.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("topic_filter", "rule"),
    [("$share//a", "MQTT-4.8.2-1"), ("$share/g", "MQTT-4.8.2-2"), ("$share/g/", "MQTT-4.8.2-2"),
     ("$share/g+/a", "MQTT-4.8.2-2"), ("$share/#", "MQTT-4.8.2-2"), ("$share/g/a/#/b", "MQTT-4.7.1-1")],
)
def test_v5_mqtt_4_8_2_shared_subscription_form(topic_filter, rule):
    """[MQTT-4.8.2-1] [MQTT-4.8.2-2] A Shared Subscription is $share/{ShareName}/{filter}."""
    assert_error(raw.subscribe(1, [(topic_filter, 0)], props=b"\x00"), InvalidTopic, rule, R.MALFORMED_PACKET)


def test_v5_subscribe_and_unsubscribe_need_a_filter():
    """[MQTT-3.8.3-2] [MQTT-3.10.3-2] No topic filter is a Protocol Error."""
    assert_error(raw.subscribe(1, [], props=b"\x00"), ProtocolError, "MQTT-3.8.3-2", R.PROTOCOL_ERROR)
    assert_error(raw.unsubscribe(1, [], props=b"\x00"), ProtocolError, "MQTT-3.10.3-2", R.PROTOCOL_ERROR)


def test_v5_subscribe_filter_rules():
    """[MQTT-4.7.1-1] [MQTT-4.7.1-2] [MQTT-3.8.3-1] Filters follow section 4.7, by 5.0's numbers."""
    assert_error(raw.subscribe(1, [("a/#/b", 0)], props=b"\x00"), InvalidTopic, "MQTT-4.7.1-1", R.MALFORMED_PACKET)
    assert_error(raw.unsubscribe(1, ["a+"], props=b"\x00"), InvalidTopic, "MQTT-4.7.1-2", R.MALFORMED_PACKET)
    assert_error(raw.subscribe(1, [("a", 0)], props=props((0x0B, 1), (0x0B, 2))), ProtocolError, None, R.PROTOCOL_ERROR)


def test_v5_suback_and_unsuback_reason_codes():
    """[MQTT-3.9.3-2] [MQTT-3.11.3-2] Each code comes from its packet's table; one at least."""
    assert_error(raw.suback(1, [0x11], props=b"\x00"), ProtocolError, "MQTT-3.9.3-2", R.PROTOCOL_ERROR, "client")
    assert_error(raw.unsuback(1, [0x02]), ProtocolError, "MQTT-3.11.3-2", R.PROTOCOL_ERROR, "client")
    assert_error(raw.suback(1, [], props=b"\x00"), ProtocolError, None, R.PROTOCOL_ERROR, "client")


# --- DISCONNECT / AUTH -------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "role"), [(0x8E, "server"), (0x8B, "server"), (0x04, "client"), (0x01, "server"), (0x18, "client")])
def test_v5_mqtt_3_14_2_1_disconnect_reason_code_by_sender(code, role):
    """[MQTT-3.14.2-1] DISCONNECT reason codes come from Table 3.10, each only from its sender."""
    assert_error(raw.disconnect(code), ProtocolError, "MQTT-3.14.2-1", R.PROTOCOL_ERROR, role)


def test_v5_mqtt_3_14_2_2_server_disconnect_has_no_session_expiry():
    """[MQTT-3.14.2-2] The server must not send a Session Expiry Interval in DISCONNECT."""
    assert_error(raw.disconnect(0x8B, props((0x11, 1))), ProtocolError, "MQTT-3.14.2-2", R.PROTOCOL_ERROR, "client")


@pytest.mark.parametrize(("data", "role"), [(b"\xf0\x00", "server"), (raw.auth(0x19, props((0x15, "M"))), "client"),
                                            (raw.auth(0x00, props((0x15, "M"))), "server"), (raw.auth(0x87, props((0x15, "M"))), "server")])
def test_v5_mqtt_3_15_2_1_auth_reason_codes(data, role):
    """[MQTT-3.15.2-1] AUTH carries 0x00 (from the server), 0x18, or 0x19 (from the client)."""
    assert_error(data, ProtocolError, "MQTT-3.15.2-1", R.PROTOCOL_ERROR, role)


# --- the independent builder agrees ------------------------------------------------------------

CROSS = [
    (raw.connect("c", proto_level=5), ConnectV5("c")),
    (raw.connect("c", False, 30, raw.Will("w", b"m", 1, True), "u", b"p", proto_level=5,
                 props=props((0x11, 10), (0x15, "M"), (0x16, b"d"), (0x21, 5), (0x26, ("a", "b"))),
                 will_props=props((0x01, 1), (0x02, 9), (0x03, "t"), (0x08, "r"), (0x09, b"c"), (0x18, 4))),
     ConnectV5("c", False, 30, WillV5("w", b"m", 1, True, P(payload_format_indicator=1, message_expiry_interval=9,
                                                            content_type="t", response_topic="r", correlation_data=b"c",
                                                            will_delay_interval=4)),
               "u", b"p", P(session_expiry_interval=10, authentication_method="M", authentication_data=b"d",
                             receive_maximum=5, user_properties=(("a", "b"),)))),
    (raw.connack(0x00, True, props((0x12, "id"), (0x13, 5), (0x24, 0), (0x2A, 0))),
     ConnackV5(True, R.SUCCESS, P(assigned_client_identifier="id", server_keep_alive=5, maximum_qos=0, shared_subscription_available=0))),
    (raw.publish("t", b"pl", 2, 7, True, props=props((0x0B, 3), (0x23, 2), (0x26, ("k", "v")))),
     PublishV5("t", b"pl", 2, True, False, 7, P(subscription_identifiers=(3,), topic_alias=2, user_properties=(("k", "v"),)))),
    (raw.puback(5), PubackV5(5)),
    (raw.pubrec(5, 0x10), PubrecV5(5, R.NO_MATCHING_SUBSCRIBERS)),
    (raw.pubrel(5, reason=0, props=props((0x1F, "r"))), PubrelV5(5, R.SUCCESS, P(reason_string="r"))),
    (raw.pubcomp(5, 0x92), PubcompV5(5, R.PACKET_IDENTIFIER_NOT_FOUND)),
    (raw.subscribe(3, [("a/+", raw.sub_options(1, True, False, 2))], props=props((0x0B, 9))),
     SubscribeV5(3, (Subscription("a/+", 1, True, False, 2),), P(subscription_identifiers=(9,)))),
    (raw.suback(3, [0x01, 0x8F], props=b"\x00"), SubackV5(3, (R.GRANTED_QOS_1, R.TOPIC_FILTER_INVALID))),
    (raw.unsubscribe(4, ["a", "b"], props=b"\x00"), UnsubscribeV5(4, ("a", "b"))),
    (raw.unsuback(4, [0x00, 0x11]), UnsubackV5(4, (R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED))),
    (raw.disconnect(), DisconnectV5()),
    (raw.disconnect(0x9C, props((0x1C, "there"))), DisconnectV5(R.USE_ANOTHER_SERVER, P(server_reference="there"))),
    (raw.auth(0x18, props((0x15, "M"), (0x16, b"\x00"))), Auth(R.CONTINUE_AUTHENTICATION, P(authentication_method="M", authentication_data=b"\x00"))),
]


@pytest.mark.parametrize(("wire", "packet"), CROSS, ids=lambda x: type(x).__name__ if not isinstance(x, bytes) else "")
def test_mqttraw_and_codec_agree_on_v5_bytes(wire, packet):
    """tests/mqttraw.py (written from the spec, no shared code) and packets5 produce and read the
    same bytes, so the black-box tests built with mqttraw test the broker, not the builder."""
    role = "client" if isinstance(packet, (ConnackV5, SubackV5, UnsubackV5, PublishV5)) or wire[0] == 0xE0 and len(wire) > 3 else "server"
    assert decode(wire, role=role) == (packet, len(wire))
    assert encode(packet) == wire
    parsed = raw.split_packet(wire)[0]
    if isinstance(packet, PublishV5):
        pub = raw.parse_publish(parsed, v5=True)
        assert (pub.topic, pub.payload, pub.mid, pub.props) == ("t", b"pl", 7, ((11, 3), (35, 2), (38, ("k", "v"))))
    elif isinstance(packet, ConnackV5):
        assert raw.parse_connack(parsed) == (True, 0, [(18, "id"), (19, 5), (36, 0), (42, 0)])
    elif hasattr(packet, "reason_code") and not isinstance(packet, ConnectV5):
        mid, reason, _ = raw.parse_reason(parsed)
        assert (mid, reason) == (getattr(packet, "packet_id", None), packet.reason_code)


# --- what the server sends: the encoder refuses what the spec forbids -----------------------------


def test_v5_mqtt_2_2_1_2_qos0_publish_has_no_packet_id():
    """[MQTT-2.2.1-2] A QoS 0 PUBLISH has no packet identifier: the encoder refuses one, and
    the decoder reads the bytes after the properties as payload."""
    with pytest.raises(ValueError):
        encode(PublishV5("a", b"", 0, packet_id=1))
    assert decode(raw.publish("a", b"\x00\x01", props=b"\x00"))[0] == PublishV5("a", b"\x00\x01")


def test_v5_mqtt_3_1_0_1_first_packet_must_be_connect():
    """[MQTT-3.1.0-1] The first packet on a 5.0-capable server connection must be CONNECT."""
    for first in (raw.auth(0x18, props((0x15, "M"))), raw.publish("a", props=b"\x00"), raw.disconnect()):
        reader = Reader(version=5)
        reader.feed(first)
        with pytest.raises(ProtocolError) as info:
            reader.next_packet()
        assert (info.value.rule, info.value.reason) == ("MQTT-3.1.0-1", R.PROTOCOL_ERROR)


def test_v5_mqtt_3_2_2_6_and_3_2_2_8_encoder_refuses_bad_connack():
    """[MQTT-3.2.2-6] [MQTT-3.2.2-8] A refusing CONNACK has Session Present 0 and every CONNACK
    uses a code of Table 3.1; the same holds for the other packets' reason code tables."""
    for bad in (ConnackV5(True, R.NOT_AUTHORIZED), ConnackV5(False, R.GRANTED_QOS_1), PubackV5(1, R.PACKET_IDENTIFIER_NOT_FOUND),
                PubrelV5(1, R.NO_MATCHING_SUBSCRIBERS), SubackV5(1, (R.NO_SUBSCRIPTION_EXISTED,)), UnsubackV5(1, ()),
                DisconnectV5(R.CONTINUE_AUTHENTICATION), Auth(R.NOT_AUTHORIZED)):
        with pytest.raises(ValueError):
            encode(bad)
    with pytest.raises(TypeError):
        encode(Connect("c"))
