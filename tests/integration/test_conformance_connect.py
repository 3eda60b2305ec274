"""MQTT 3.1.1 conformance, section 3.1/3.2: CONNECT and CONNACK, black-box against a real
iot-broker (raw sockets, packets built by tests/mqttraw.py, not by the broker's codec)."""

from __future__ import annotations

from tests.mqttraw import (
    RawClient,
    Will,
    assert_serves_new_client,
    check_each,
    client,
    connack,
    connect,
    describe,
    disconnect,
    pingreq,
    publish,
    string,
    subscribe,
    u16,
    frame,
)


def test_mqtt_3_1_0_1_first_packet_must_be_connect(broker):
    """[MQTT-3.1.0-1] [MQTT-4.8.0-1] A first packet other than CONNECT is a protocol violation:
    the broker closes the connection without answering."""
    def check(first):
        with RawClient(broker.port) as c:
            c.send(first)
            c.expect_closed()

    check_each([pingreq(), publish("t/x", b"p"), subscribe(1, [("t/#", 0)]), disconnect()], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_0_2_second_connect_closes(broker):
    """[MQTT-3.1.0-2] A second CONNECT on one connection is a protocol violation: disconnect."""
    with RawClient(broker.port) as c:
        c.connect_ok("twice")
        c.send(connect("twice"))
        c.expect_closed()
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_2_1_bad_protocol_name_not_accepted(broker):
    """[MQTT-3.1.2-1] A CONNECT with an unknown protocol name is not processed as MQTT 3.1.1:
    no CONNACK accepting it; the connection is closed (a CONNACK with a non-zero code first is
    tolerated)."""
    def check(name):
        with RawClient(broker.port) as c:
            c.send(connect("badname", proto_name=name))
            c.send(pingreq())  # must not be answered as if a session existed
            got = c.read_until_closed()
            refused = len(got) == 4 and got[:3] == b"\x20\x02\x00" and got[3] != 0
            assert got == b"" or refused, f"got {describe(got)}"

    check_each(["MQTX", "mqtt", "MQTT3", "MQIsdpX", ""], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_2_2_unsupported_protocol_level_connack_1_then_close(broker):
    """[MQTT-3.1.2-2] [MQTT-3.2.2-4] [MQTT-3.2.2-5] An unsupported protocol level gets CONNACK
    0x01 with session present 0, then the connection is closed."""
    def check(level):
        with RawClient(broker.port) as c:
            c.send(connect("badlevel", proto_level=level))
            c.expect(connack(1, False))
            c.expect_closed()

    check_each([3, 6, 0, 255], check)  # 5 is MQTT 5.0, served
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_2_3_reserved_connect_flag_closes(broker):
    """[MQTT-3.1.2-3] [MQTT-3.2.2-6] The reserved Connect Flags bit must be 0; if it is 1 the
    broker closes the connection without a CONNACK."""
    with RawClient(broker.port) as c:
        c.send(connect("resv", flags=0x02 | 0x01))
        c.expect_closed()
    assert_serves_new_client(broker.port)


def _raw_connect(flags: int, payload: bytes, level: int = 4) -> bytes:
    return frame(0x10, string("MQTT") + bytes((level, flags)) + u16(30) + payload)


INVALID_CONNECTS = {
    # will flag rules, section 3.1.2.5-3.1.2.7
    "will qos 3": _raw_connect(0x02 | 0x04 | 0x18, string("w1") + string("will/t") + string(b"m")),
    "will qos without will flag": _raw_connect(0x02 | 0x08, string("w2")),
    "will retain without will flag": _raw_connect(0x02 | 0x20, string("w3")),
    "will flag without will fields": _raw_connect(0x02 | 0x04, string("w4")),
    "will flag without will message": _raw_connect(0x02 | 0x04, string("w5") + string("will/t")),
    "will topic with wildcard": _raw_connect(0x02 | 0x04, string("w6") + string("will/#") + string(b"m")),
    # user name / password rules, section 3.1.2.8-3.1.2.9
    "password without user name flag": _raw_connect(0x02 | 0x40, string("u1") + string(b"pw")),
    "user name flag without user name": _raw_connect(0x02 | 0x80, string("u2")),
    "password flag without password": _raw_connect(0x02 | 0x80 | 0x40, string("u3") + string("user")),
    "user name present without flag": _raw_connect(0x02, string("u4") + string("user")),
    # payload rules, section 3.1.3
    "no client identifier": _raw_connect(0x02, b""),
    "truncated client identifier": _raw_connect(0x02, u16(10) + b"abc"),
    "trailing bytes after payload": _raw_connect(0x02, string("t1") + b"\x00"),
    "variable header truncated": frame(0x10, string("MQTT") + b"\x04\x02"),
}


def test_mqtt_3_1_4_1_invalid_connect_closed_without_connack(broker):
    """[MQTT-3.1.4-1] [MQTT-3.2.2-6] [MQTT-3.1.2-9] [MQTT-3.1.2-11] [MQTT-3.1.2-13]
    [MQTT-3.1.2-14] [MQTT-3.1.2-15] [MQTT-3.1.2-18] [MQTT-3.1.2-19] [MQTT-3.1.2-20]
    [MQTT-3.1.2-21] [MQTT-3.1.2-22] [MQTT-3.1.3-1] [MQTT-3.1.3-3] A CONNECT that does not
    conform to section 3.1 is closed without any CONNACK (no return code applies)."""

    def check(case):
        with RawClient(broker.port) as c:
            c.send(INVALID_CONNECTS[case])
            c.expect_closed()

    check_each(INVALID_CONNECTS, check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_3_5_client_ids_of_1_to_23_alphanumerics_accepted(broker):
    """[MQTT-3.1.3-5] [MQTT-3.1.4-4] [MQTT-3.2.0-1] Client ids of 1-23 bytes of [0-9a-zA-Z]
    are accepted: the first packet back is CONNACK with return code 0."""

    def check(client_id):
        with RawClient(broker.port) as c:
            c.send(connect(client_id))
            c.expect(connack(0, False))
            assert c.is_open()

    check_each(["a", "Z9", "0123456789abcdefghijklm", "ABCDEFGHIJKLMNOPQRSTUVW", "nopqrstuvwxyz"], check)


def test_mqtt_3_1_3_6_zero_length_client_id_gets_unique_id(broker):
    """[MQTT-3.1.3-6] A zero-byte client id with clean session 1 is accepted and each such
    client gets its own identity: two of them at once do not take each other over, and their
    subscriptions are separate."""
    a = client(broker.port, "", subs=[("zl/a", 0)])
    b = client(broker.port, "", subs=[("zl/b", 0)])
    try:
        assert a.is_open(), "first anonymous client was disconnected by the second"
        assert b.is_open()
        b.send(publish("zl/a", b"for-a"))
        assert a.recv_publish().payload == b"for-a"
        b.expect_nothing(what="b is not subscribed to zl/a")
    finally:
        a.close()
        b.close()


def test_mqtt_3_1_3_8_zero_length_client_id_with_persistent_session_rejected(broker):
    """[MQTT-3.1.3-8] [MQTT-3.1.3-9] [MQTT-3.2.2-4] [MQTT-3.2.2-5] A zero-byte client id with
    clean session 0 gets CONNACK 0x02 (identifier rejected, session present 0), then close."""
    with RawClient(broker.port) as c:
        c.send(connect("", clean=False))
        c.expect(connack(2, False))
        c.expect_closed()
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_3_9_rejected_client_id_connack_2_then_close(broker_factory):
    """[MQTT-3.1.3-9] [MQTT-3.2.2-5] With allow_zero_length_clientid = false the broker rejects
    a zero-byte client id even with clean session 1: CONNACK 0x02, then close."""
    b = broker_factory("allow_zero_length_clientid = false\n")
    with RawClient(b.port) as c:
        c.send(connect("", clean=True))
        c.expect(connack(2, False))
        c.expect_closed()
    with RawClient(b.port) as c:
        c.connect_ok("named")


def test_mqtt_3_1_4_2_same_client_id_takes_over(broker):
    """[MQTT-3.1.4-2] A second connection with the id of a connected client disconnects the
    existing one; the new one is accepted and works."""
    old = client(broker.port, "dup-id")
    new = RawClient(broker.port)
    try:
        new.connect_ok("dup-id")
        old.expect_closed(what="the first connection")
        new.subscribe_ok([("take/over", 0)])
        new.send(publish("take/over", b"x"))
        assert new.recv_publish().payload == b"x"
    finally:
        old.close()
        new.close()


def test_mqtt_3_1_4_5_data_after_rejected_connect_not_processed(broker):
    """[MQTT-3.1.4-5] When the CONNECT is rejected, data the client sent after it (here a
    retained PUBLISH in the same TCP segment) is not processed: nothing gets retained."""
    cases = {"bad level": (connect("rej1", proto_level=6), connack(1)),
             "zero-length id with clean 0": (connect("", clean=False), connack(2)),
             "reserved flag": (connect("rej3", flags=0x03), b"")}

    def check(case):
        bad, answer = cases[case]
        with RawClient(broker.port) as c:
            c.send(bad + publish("rej/retained", b"must-not-exist", retain=True))
            c.expect(answer)
            c.expect_closed()
        with client(broker.port, "rej-check") as s:
            s.subscribe_ok([("rej/#", 0)])
            s.expect_nothing(what="a message sent after a rejected CONNECT was retained")

    check_each(cases, check)


def test_mqtt_3_2_2_1_clean_session_connack_session_present_0(broker):
    """[MQTT-3.2.2-1] [MQTT-3.1.4-4] [MQTT-3.2.0-1] With clean session 1 the CONNACK is
    20 02 00 00 even when a stored session existed for the id."""
    c = client(broker.port, "sp-clean", clean=False, subs=[("sp/t", 1)])
    c.disconnect()
    with RawClient(broker.port) as c:
        c.send(connect("sp-clean", clean=True))
        c.expect(connack(0, session_present=False))


def test_mqtt_3_2_2_2_stored_session_connack_session_present_1(broker):
    """[MQTT-3.2.2-2] [MQTT-3.2.2-3] Clean session 0 without stored state gets session present
    0; reconnecting with clean session 0 to the stored session gets session present 1."""
    c = client(broker.port, "sp-keep", clean=False, session_present=False)
    c.disconnect()
    with RawClient(broker.port) as c:
        c.send(connect("sp-keep", clean=False))
        c.expect(connack(0, session_present=True))


def test_mqtt_3_2_2_3_new_persistent_session_present_0(broker):
    """[MQTT-3.2.2-3] Clean session 0 with no stored session for the id: session present 0."""
    with RawClient(broker.port) as c:
        c.send(connect("sp-new", clean=False))
        c.expect(connack(0, session_present=False))


def test_mqtt_3_1_4_4_connect_with_will_user_password_accepted(broker):
    """[MQTT-3.1.4-4] A well-formed CONNECT carrying a will, a user name and a password is
    accepted with return code 0 (the broker has no authentication configured)."""
    with RawClient(broker.port) as c:
        c.connect_ok("full", will=Will("full/will", b"bye", 1, False), username="user", password=b"\x00\xffpw")
        assert c.is_open()
        c.send(disconnect())
        c.expect_closed()
