"""Property and fuzz tests for the packet codec.

Whatever bytes arrive, in whatever fragments, the only exceptions allowed out
of the decoder are ProtocolError subclasses, and every packet it does return
must be one we could encode and decode back to itself.  Example counts are
kept moderate: the machine running the suite is small and shared.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
