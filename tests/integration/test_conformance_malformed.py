"""MQTT 3.1.1 conformance, sections 1.5.3, 2.2, 4.7.3, 4.8: malformed packets and protocol
violations close the connection (and only that one), black-box against a real iot-broker.

Every case opens its own connection, sends the bad bytes, expects the broker to close it
without answering, and then checks the broker still serves a new client."""

from __future__ import annotations

from tests.mqttraw import (
    RawClient,
    Will,
    assert_serves_new_client,
    check_each,
    client,
    connect,
    frame,
    publish,
    pubrec,
    string,
    subscribe,
    u16,
    unsubscribe,
    varint,
)

def test_mqttraw_remaining_length_encoding_matches_spec_table():
    """The tests' own encoder agrees with Table 2.4 of the specification (the malformed-length
    tests depend on it); no broker involved."""
    for value, encoded in ((0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
                           (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"),
                           (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f")):
        assert varint(value) == encoded, value
    assert connect("c", keepalive=10) == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x0a\x00\x01c"
    assert publish("a/b", b"x", qos=1, mid=10, retain=True) == b"\x33\x08\x00\x03a/b\x00\x0ax"
    assert subscribe(1, [("a", 2)]) == b"\x82\x06\x00\x01\x00\x01a\x02"


ILL_FORMED_UTF8 = {
    "bad continuation": b"a\xc3\x28",
    "lone continuation": b"a\x80b",
    "surrogate U+D800": b"a\xed\xa0\x80",
    "surrogate U+DFFF": b"\xed\xbf\xbf",
    "overlong '/'": b"a\xc0\xaf",
    "overlong NUL": b"a\xc0\x80",
    "beyond U+10FFFF": b"a\xf4\x90\x80\x80",
    "truncated sequence": b"a\xe2\x82",
    "byte 0xFF": b"a\xff",
}


def _in_every_string(raw: bytes) -> dict[str, tuple[bool, bytes]]:
    """Packets carrying `raw` in each kind of string field: (is_connect, bytes)."""
    return {
        "client id": (True, connect(raw)),
        "will topic": (True, connect("w", will=Will(raw, b"m"))),
        "user name": (True, connect("u", username=raw, password=b"p")),
        "publish topic": (False, publish(raw, b"x", qos=1, mid=1)),
        "subscribe filter": (False, subscribe(1, [(raw, 0)])),
        "unsubscribe filter": (False, unsubscribe(1, [raw])),
    }


def _closes(port: int, pkt: bytes, after_connect: bool) -> None:
    with RawClient(port) as c:
        if after_connect:
            c.connect_ok("malformed")
        c.send(pkt)
        c.expect_closed()
    assert_serves_new_client(port)


def test_mqtt_1_5_3_1_ill_formed_utf8_closes(broker):
    """[MQTT-1.5.3-1] [MQTT-3.1.3-4] [MQTT-3.1.3-10] [MQTT-3.1.3-11] [MQTT-3.8.3-1]
    [MQTT-3.10.3-1] [MQTT-3.3.2-1] Ill-formed UTF-8 (bad sequences, UTF-16 surrogates,
    overlong forms, > U+10FFFF) in any string field of CONNECT, PUBLISH, SUBSCRIBE or
    UNSUBSCRIBE closes the connection without a reply (no CONNACK), and a PUBLISH so broken is
    delivered to nobody."""
    cases = [(name, field) for name in ILL_FORMED_UTF8 for field in _in_every_string(b"")]
    with client(broker.port, "utf8sub", subs=[("u/#", 0), ("+", 0)]) as watcher:

        def check(case):
            name, field = case
            is_connect, pkt = _in_every_string(b"u/" + ILL_FORMED_UTF8[name])[field]
            _closes(broker.port, pkt, after_connect=not is_connect)

        check_each(cases, check)
        watcher.expect_nothing(what="a message with an ill-formed topic was delivered")


def test_mqtt_1_5_3_2_null_character_closes(broker):
    """[MQTT-1.5.3-2] [MQTT-4.7.3-2] U+0000 in any string field (client id, will topic, user
    name, topic name, topic filters) closes the connection without a reply."""
    packets = _in_every_string(b"a\x00b")

    def check(field):
        is_connect, pkt = packets[field]
        _closes(broker.port, pkt, after_connect=not is_connect)

    check_each(packets, check)


def test_mqtt_1_5_3_3_bom_is_not_stripped(broker):
    """[MQTT-1.5.3-3] 0xEF 0xBB 0xBF is the character U+FEFF wherever it is, never skipped or
    stripped: a topic starting with it is a different topic from the one without, and is
    delivered with the three bytes intact."""
    bom = "\ufeff"
    with client(broker.port, "bomsub", subs=[(bom + "bom/t", 1), ("bom/t", 0)]) as s, \
            client(broker.port, bom + "bompub", username=bom + "user") as p:
        p.send(publish(bom + "bom/t", b"with"))
        m = s.recv_publish()
        assert m.topic_bytes == b"\xef\xbb\xbfbom/t", m.topic_bytes
        p.send(publish("bom/t", b"without"))
        m = s.recv_publish()
        assert (m.topic_bytes, m.payload) == (b"bom/t", b"without")
        s.expect_nothing(what="one of the two topics matched both filters")


def test_mqtt_2_2_2_2_reserved_fixed_header_flags_close(broker):
    """[MQTT-2.2.2-1] [MQTT-2.2.2-2] Fixed-header flags marked Reserved must have the values of
    Table 2.2 (0000 for CONNECT, PUBACK, PUBREC, PUBCOMP, PINGREQ): any other value closes the
    connection without a reply."""
    cases = {}
    for flags in (0x1, 0x2, 0x4, 0x8):
        cases[f"CONNECT flags {flags:04b}"] = (False, connect("rf", first_byte=0x10 | flags))
        cases[f"PUBACK flags {flags:04b}"] = (True, bytes((0x40 | flags, 2, 0, 1)))
        cases[f"PUBREC flags {flags:04b}"] = (True, bytes((0x50 | flags, 2, 0, 1)))
        cases[f"PUBCOMP flags {flags:04b}"] = (True, bytes((0x70 | flags, 2, 0, 1)))
        cases[f"PINGREQ flags {flags:04b}"] = (True, bytes((0xC0 | flags, 0)))

    def check(case):
        after_connect, pkt = cases[case]
        _closes(broker.port, pkt, after_connect)

    check_each(cases, check)


def test_mqtt_3_6_1_1_pubrel_reserved_flags_close(broker):
    """[MQTT-3.6.1-1] [MQTT-2.2.2-2] A PUBREL whose fixed-header bits 3..0 are not 0010 is
    malformed: the connection is closed without a PUBCOMP."""

    def check(flags):
        with client(broker.port, "pubrelflags") as c:
            c.send(publish("prf/t", b"x", qos=2, mid=3))
            c.expect(pubrec(3))
            c.send(bytes((0x60 | flags, 2, 0, 3)))
            c.expect_closed()
        assert_serves_new_client(broker.port)

    check_each([0x0, 0x1, 0x3, 0x6, 0xA, 0xF], check)


def test_mqtt_4_8_0_1_reserved_and_server_to_client_packet_types_close(broker):
    """[MQTT-4.8.0-1] [MQTT-2.2.2-2] Packet types 0 and 15 (reserved) and the types only a
    server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) are protocol violations from a client:
    the connection is closed."""
    cases = {"type 0": b"\x00\x00", "type 15": b"\xf0\x00", "CONNACK": b"\x20\x02\x00\x00",
             "SUBACK": b"\x90\x03\x00\x01\x00", "UNSUBACK": b"\xb0\x02\x00\x01", "PINGRESP": b"\xd0\x00"}

    def check(case):
        _closes(broker.port, cases[case], after_connect=True)

    check_each(cases, check)


def test_mqtt_4_8_0_1_remaining_length_longer_than_four_bytes_closes(broker):
    """[MQTT-4.8.0-1] The Remaining Length is at most four bytes (section 2.2.3): a fifth
    continuation byte closes the connection, as the first packet or later."""
    cases = {"PUBLISH": (True, b"\x30\xff\xff\xff\xff\x01"), "PINGREQ": (True, b"\xc0\x80\x80\x80\x80\x00"),
             "CONNECT": (False, b"\x10\xff\xff\xff\xff\x7f")}

    def check(case):
        after_connect, pkt = cases[case]
        _closes(broker.port, pkt, after_connect)

    check_each(cases, check)


TRUNCATED = {
    "PUBLISH QoS 1 without packet id": frame(0x32, string("t/a")),
    "PUBLISH topic length past the end": frame(0x30, u16(10) + b"abc"),
    "PUBLISH with one body byte": b"\x30\x01\x00",
    "SUBSCRIBE filter without QoS byte": frame(0x82, u16(1) + string("a/b")),
    "SUBSCRIBE filter length past the end": frame(0x82, u16(1) + u16(20) + b"a/b\x00"),
    "SUBSCRIBE without packet id": b"\x82\x01\x00",
    "UNSUBSCRIBE filter length past the end": frame(0xA2, u16(1) + u16(9) + b"a"),
    "PUBACK with one byte": b"\x40\x01\x00",
    "PUBREC with no body": b"\x50\x00",
    "PUBREL with one byte": b"\x62\x01\x00",
    "PUBCOMP with one byte": b"\x70\x01\x00",
}


def test_mqtt_4_8_0_1_truncated_body_closes(broker):
    """[MQTT-4.8.0-1] A packet whose fields run past its declared Remaining Length (the bytes
    that follow belong to the next packet) is malformed: the connection is closed."""

    def check(case):
        # A PINGREQ follows: it must not be taken as the rest of the broken packet and answered.
        _closes(broker.port, TRUNCATED[case] + b"\xc0\x00", after_connect=True)

    check_each(TRUNCATED, check)


TRAILING = {
    "PUBACK": b"\x40\x03\x00\x01\x00",
    "PUBREC": b"\x50\x03\x00\x01\x00",
    "PUBREL": b"\x62\x03\x00\x01\x00",
    "PUBCOMP": b"\x70\x03\x00\x01\x00",
    "PINGREQ": b"\xc0\x01\x00",
    "DISCONNECT": b"\xe0\x01\x00",
    "SUBSCRIBE": frame(0x82, u16(1) + string("a/b") + b"\x00" + b"\x00"),
    "UNSUBSCRIBE": frame(0xA2, u16(1) + string("a/b") + b"\x00"),
}


def test_mqtt_4_8_0_1_trailing_bytes_inside_remaining_length_close(broker):
    """[MQTT-4.8.0-1] Bytes left over inside the declared Remaining Length after the last field
    make the packet malformed: the connection is closed without a reply (also for CONNECT, see
    test_conformance_connect)."""

    def check(case):
        _closes(broker.port, TRAILING[case], after_connect=True)

    check_each(TRAILING, check)


def test_mqtt_4_7_3_3_topic_of_65535_bytes_accepted(broker):
    """[MQTT-4.7.3-3] A topic name or filter can be up to 65535 bytes (a longer one cannot even
    be expressed: the length prefix is 16 bits): a 65535-byte filter and topic are accepted and
    the message is delivered with the whole topic."""
    topic = "L/" + "x" * 65533
    assert len(topic.encode()) == 65535
    with client(broker.port, "longsub", subs=[(topic, 1), ("L/+", 0)]) as s, client(broker.port, "longpub") as p:
        p.send(publish(topic, b"long", qos=0))
        m = s.recv_publish()
        assert (len(m.topic_bytes), m.topic, m.qos) == (65535, topic, 0)
