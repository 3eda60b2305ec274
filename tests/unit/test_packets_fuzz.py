"""Property and fuzz tests for the packet codec, MQTT 3.1.1 and 5.0.

Whatever bytes arrive, in whatever fragments, the only exceptions allowed out
of the decoder are ProtocolError subclasses, and every packet it does return
must be one we could encode and decode back to itself.  Example counts are
kept moderate: the machine running the suite is small and shared.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.broker import packets5 as p5
from daemons.broker.packets import (
    SUBACK_FAILURE,
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    ReasonCode,
    Reader,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    decode,
    encode,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HARD_FUZZ = settings(FUZZ, max_examples=400)

# --- strategies for valid packets ----------------------------------------------------

# Any code point except surrogates (not encodable) and U+0000 (forbidden).
text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
level = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00+#/"), max_size=4)
topic_name = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)
filter_level = st.one_of(level, st.just("+"))
topic_filter = st.one_of(
    st.lists(filter_level, min_size=1, max_size=5).map("/".join),
    st.lists(filter_level, max_size=4).map(lambda levels: "/".join([*levels, "#"])),
).filter(bool)
packet_id = st.integers(1, 0xFFFF)
qos = st.integers(0, 2)
payload = st.binary(max_size=64)


@st.composite
def publishes(draw):
    q = draw(qos)
    return Publish(
        draw(topic_name), draw(payload), q, draw(st.booleans()),
        draw(st.booleans()) if q else False, draw(packet_id) if q else None,
    )


@st.composite
def connects(draw):
    username = draw(st.none() | text)
    will = draw(st.none() | st.builds(Will, topic_name, payload, qos, st.booleans()))
    name, level_ = draw(st.sampled_from([("MQTT", 4), ("MQIsdp", 3)]))
    return Connect(
        draw(text), draw(st.booleans()), draw(st.integers(0, 0xFFFF)), will, username,
        draw(payload) if username is not None and draw(st.booleans()) else None, name, level_,
    )


acks = st.one_of(*(st.builds(cls, packet_id) for cls in (Puback, Pubrec, Pubrel, Pubcomp)))
server_bound = st.one_of(
    publishes(),
    acks,
    st.builds(Subscribe, packet_id, st.lists(st.tuples(topic_filter, qos), min_size=1, max_size=4).map(tuple)),
    st.builds(Unsubscribe, packet_id, st.lists(topic_filter, min_size=1, max_size=4).map(tuple)),
    st.just(Pingreq()),
    st.just(Disconnect()),
)
client_bound = st.one_of(
    publishes(),
    acks,
    st.builds(Connack, st.just(False), st.sampled_from(list(ConnackCode))),
    st.just(Connack(True, ConnackCode.ACCEPTED)),
    st.builds(Suback, packet_id, st.lists(st.sampled_from([0, 1, 2, SUBACK_FAILURE]), min_size=1, max_size=5).map(tuple)),
    st.builds(Unsuback, packet_id),
    st.just(Pingresp()),
)


@st.composite
def sessions(draw):
    """A valid byte stream in one direction: its role and its packets."""
    if draw(st.booleans()):
        role, first, rest = "server", draw(connects()), server_bound
    else:
        role, first, rest = "client", Connack(draw(st.booleans()), ConnackCode.ACCEPTED), client_bound
    return role, [first, *draw(st.lists(rest, max_size=6))]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def drain(reader: Reader, chunks: list[bytes]) -> list:
    """Feed ``chunks``; return the packets, stopping at the first ProtocolError."""
    out = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            out.extend(reader)
    except ProtocolError:
        pass
    return out


def assert_reencodes(packets: list, role: str) -> None:
    for packet in packets:
        data = encode(packet)
        assert decode(data, role=role) == (packet, len(data))


# --- properties ------------------------------------------------------------------------


@FUZZ
@given(packet=st.one_of(connects(), server_bound))
def test_server_bound_packets_round_trip(packet):
    data = encode(packet)
    assert decode(data, role="server") == (packet, len(data))
    assert decode(data[:-1], role="server") is None


@FUZZ
@given(packet=client_bound)
def test_client_bound_packets_round_trip(packet):
    data = encode(packet)
    assert decode(data, role="client") == (packet, len(data))


@FUZZ
@given(session=sessions(), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_fragmentation_yields_the_same_packets(session, cuts):
    role, packets = session
    data = b"".join(encode(p) for p in packets)
    reader = Reader(role=role)
    got = []
    for chunk in split(data, cuts):
        reader.feed(chunk)
        got.extend(reader)
    assert got == packets


@HARD_FUZZ
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8), role=st.sampled_from(["server", "client"]))
def test_random_bytes_only_raise_protocol_errors(data, cuts, role):
    try:
        decode(data, role=role, max_packet_size=1000)
    except ProtocolError:
        pass
    packets = drain(Reader(role=role, max_packet_size=1000), split(data, cuts))
    assert_reencodes(packets, role)


@FUZZ
@given(
    data=st.binary(min_size=1, max_size=120),
    first=st.sampled_from([0x10, 0x20, 0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0x90, 0xA2, 0xB0, 0xC0, 0xD0, 0xE0]),
    role=st.sampled_from(["server", "client"]),
)
def test_random_bodies_behind_valid_headers(data, first, role):
    """Random bodies with a correct length reach the per-type decoders."""
    framed = bytes([first, len(data)]) + data
    try:
        result = decode(framed, role=role)
    except ProtocolError:
        return
    assert result is not None and result[1] == len(framed)
    assert_reencodes([result[0]], role)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 4)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.none()),
)


def mutate(data: bytes, mutations: list) -> bytes:
    buf = bytearray(data)
    for kind, where, arg in mutations:
        if not buf:
            break
        at = where % len(buf)
        if kind == "flip":
            buf[at] ^= 1 << arg
        elif kind == "insert":
            buf[at:at] = arg
        elif kind == "delete":
            del buf[at : at + arg]
        else:
            del buf[at:]
    return bytes(buf)


@HARD_FUZZ
@given(
    session=sessions(),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_mutated_streams_only_raise_protocol_errors(session, mutations, cuts):
    role, packets = session
    data = mutate(b"".join(encode(p) for p in packets), mutations)
    packets = drain(Reader(role=role), split(data, cuts))
    assert_reencodes(packets, role)


# --- MQTT 5.0 -----------------------------------------------------------------------------------

_KIND_VALUES = {
    p5._BYTE: st.integers(0, 1),
    p5._U16: st.integers(0, 0xFFFF),
    p5._U32: st.integers(0, 0xFFFF_FFFF),
    p5._VBI: st.integers(1, 268_435_455),
    p5._STR: text,
    p5._BIN: payload,
    p5._PAIR: st.tuples(text, text),
}


@st.composite
def v5_properties(draw, what: str, leave_out: frozenset = frozenset()):
    """Any valid property block for a `what` packet (p5._ALLOWED names the packets)."""
    values = {}
    for ident in sorted(p5._ALLOWED[what] - leave_out):
        if not draw(st.booleans()):
            continue
        name, kind, repeats = p5._PROPERTIES[ident]
        low, high = p5._RANGES.get(ident, (None, None, None, None))[:2]
        strategy = text.map(lambda _: "r/t") if ident == 0x08 else _KIND_VALUES[kind]
        if low is not None:
            strategy = strategy.filter(lambda v, low=low, high=high: low <= v <= high)
        if repeats:
            values[name] = tuple(draw(st.lists(strategy, min_size=1, max_size=1 if what == "SUBSCRIBE" else 3)))
        else:
            values[name] = draw(strategy)
    if "authentication_data" in values and "authentication_method" not in values:
        del values["authentication_data"]
    return p5.Properties(**values) if values else p5.NO_PROPERTIES


def _codes(table) -> st.SearchStrategy:
    return st.sampled_from(sorted(ReasonCode(c) for c in table))


@st.composite
def v5_publishes(draw, role: str):
    q = draw(qos)
    props = draw(v5_properties("PUBLISH", frozenset({0x0B}) if role == "server" else frozenset()))
    topic = draw(topic_name | st.just("")) if props.topic_alias else draw(topic_name)
    return p5.PublishV5(topic, draw(payload), q, draw(st.booleans()), draw(st.booleans()) if q else False,
                        draw(packet_id) if q else None, props)


@st.composite
def v5_connects(draw):
    will = draw(st.none() | st.builds(p5.WillV5, topic_name, payload, qos, st.booleans(), v5_properties("WILL")))
    return p5.ConnectV5(draw(text), draw(st.booleans()), draw(st.integers(0, 0xFFFF)), will, draw(st.none() | text),
                        draw(st.none() | payload), draw(v5_properties("CONNECT")))


def _v5_acks(role: str):
    return st.one_of(*(
        st.builds(cls, packet_id, _codes(codes), v5_properties(cls.__name__[:-2].upper()))
        for cls, codes in ((p5.PubackV5, p5._PUBACK_CODES), (p5.PubrecV5, p5._PUBACK_CODES),
                           (p5.PubrelV5, p5._PUBREL_CODES), (p5.PubcompV5, p5._PUBREL_CODES))
    ))


subscriptions = st.builds(p5.Subscription, topic_filter, qos, st.booleans(), st.booleans(), st.integers(0, 2))


def v5_bound(role: str, method: str | None = None):
    """Packets after the CONNECT (server) or CONNACK (client); AUTH only with the CONNECT's method."""
    common = [v5_publishes(role), _v5_acks(role)]
    if role == "server":
        auth = [st.builds(p5.Auth, _codes(p5._AUTH_CODES["server"]),
                          v5_properties("AUTH").map(lambda p: dataclasses.replace(p, authentication_method=method)))] if method else []
        return st.one_of(*common, *auth,
            st.builds(p5.SubscribeV5, packet_id, st.lists(subscriptions, min_size=1, max_size=3).map(tuple), v5_properties("SUBSCRIBE")),
            st.builds(p5.UnsubscribeV5, packet_id, st.lists(topic_filter, min_size=1, max_size=3).map(tuple), v5_properties("UNSUBSCRIBE")),
            st.just(Pingreq()),
            st.builds(p5.DisconnectV5, _codes(p5._DISCONNECT_CODES["server"]), v5_properties("DISCONNECT", frozenset({0x11}))),
        )
    return st.one_of(*common,
        st.builds(p5.SubackV5, packet_id, st.lists(_codes(p5._SUBACK_CODES), min_size=1, max_size=4).map(tuple), v5_properties("SUBACK")),
        st.builds(p5.UnsubackV5, packet_id, st.lists(_codes(p5._UNSUBACK_CODES), min_size=1, max_size=4).map(tuple), v5_properties("UNSUBACK")),
        st.just(Pingresp()),
        st.builds(p5.DisconnectV5, _codes(p5._DISCONNECT_CODES["client"]), v5_properties("DISCONNECT", frozenset({0x11}))),
        st.builds(p5.Auth, _codes(p5._AUTH_CODES["client"]), v5_properties("AUTH").map(lambda p: dataclasses.replace(p, authentication_method="M"))),
    )


@st.composite
def v5_sessions(draw):
    """A valid 5.0 byte stream in one direction: its role and its packets."""
    if draw(st.booleans()):
        connect = draw(v5_connects())
        return "server", [connect, *draw(st.lists(v5_bound("server", connect.properties.authentication_method), max_size=6))]
    connack = p5.ConnackV5(draw(st.booleans()), ReasonCode.SUCCESS, draw(v5_properties("CONNACK")))
    return "client", [connack, *draw(st.lists(v5_bound("client"), max_size=6))]


def encode_any(packet) -> bytes:
    return p5.encode(packet) if type(packet) in p5._ENCODERS else encode(packet)


def assert_reencodes_any(packets: list, role: str) -> None:
    """Every packet decoded, 3.1.1 or 5.0, encodes back to bytes that decode to itself."""
    for packet in packets:
        data = encode_any(packet)
        version = 5 if type(packet) in p5._ENCODERS else 4
        assert decode(data, role=role, version=version) == (packet, len(data))


@FUZZ
@given(session=v5_sessions(), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_v5_packets_round_trip_in_any_fragmentation(session, cuts):
    role, packets = session
    for packet in packets:
        data = p5.encode(packet)
        assert p5.decode(data, role=role) == (packet, len(data))
    reader = Reader(role=role, version=5)
    got = []
    for chunk in split(b"".join(p5.encode(p) for p in packets), cuts):
        reader.feed(chunk)
        got.extend(reader)
    assert got == packets


@HARD_FUZZ
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8), role=st.sampled_from(["server", "client"]))
def test_v5_random_bytes_only_raise_protocol_errors(data, cuts, role):
    try:
        decode(data, role=role, max_packet_size=1000, version=5)
    except ProtocolError:
        pass
    packets = drain(Reader(role=role, max_packet_size=1000, version=5), split(data, cuts))
    assert_reencodes_any(packets, role)


@HARD_FUZZ
@given(
    data=st.binary(min_size=1, max_size=120),
    first=st.sampled_from([0x10, 0x20, 0x30, 0x32, 0x34, 0x3B, 0x40, 0x50, 0x62, 0x70, 0x82, 0x90, 0xA2, 0xB0, 0xE0, 0xF0]),
    role=st.sampled_from(["server", "client"]),
    block=st.one_of(st.just(b""), st.builds(lambda p: p5.encode_properties(p, "CONNACK"), v5_properties("CONNACK"))),
)
def test_v5_random_bodies_behind_valid_headers(data, first, role, block):
    """Random bodies (some led by a valid property block) with a correct length reach the v5 decoders."""
    body = (block + data)[:127]
    framed = bytes([first, len(body)]) + body
    try:
        result = decode(framed, role=role, version=5)
    except ProtocolError:
        return
    assert result is not None and result[1] == len(framed)
    assert_reencodes_any([result[0]], role)


@HARD_FUZZ
@given(
    session=v5_sessions(),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_v5_mutated_streams_only_raise_protocol_errors(session, mutations, cuts):
    role, packets = session
    data = mutate(b"".join(p5.encode(p) for p in packets), mutations)
    packets = drain(Reader(role=role, version=5), split(data, cuts))
    assert_reencodes_any(packets, role)
