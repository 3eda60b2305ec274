"""MQTT 5.0 conformance, sections 3.1, 3.2, 4.1, 4.12: CONNECT and CONNACK properties,
Clean Start and Session Expiry, the Will Delay Interval, enhanced authentication with an unknown
method. Black-box over raw sockets (tests/mqttraw.py), each scenario against our broker and
against Mosquitto 2 (the `brokers` fixture); statement ids are MQTT 5.0's own numbering."""

from __future__ import annotations

import time

import pytest

from tests.mqttraw import (
    ASSIGNED_CLIENT_ID,
    AUTH_METHOD,
    CONNACK,
    DISCONNECT,
    PUBACK,
    RESPONSE_INFORMATION,
    SESSION_EXPIRY,
    WILL_DELAY,
    RawClient,
    Will,
    client5,
    describe,
    parse_reason,
    prop,
    properties,
    puback,
    publish,
    sub_options,
)


def _pub_qos1(port: int, topic: str, payload: bytes, props: bytes = b"\x00", mid: int = 1) -> None:
    """Publish one QoS 1 message from a short-lived 5.0 client and wait for its PUBACK."""
    with client5(port, "") as p:
        p.send(publish(topic, payload, 1, mid, props=props))
        got = p.recv_packet()
        mid_back, reason, _ = parse_reason(got)
        assert (got.type, mid_back) == (PUBACK, mid) and reason < 0x80, describe(got.raw)


def test_v5_mqtt_3_1_3_6_and_3_1_3_7_assigned_client_identifier(brokers):
    """[MQTT-3.1.3-6] [MQTT-3.1.3-7] [MQTT-3.2.2-16] [MQTT-3.1.2-28] A zero-length ClientID
    gets a unique ClientID, returned in the CONNACK as the Assigned Client Identifier; two such
    clients get different ones. Neither asked for Response Information: none is returned."""
    b = brokers()
    with RawClient(b.port) as c1, RawClient(b.port) as c2:
        ids = []
        for c in (c1, c2):
            props = c.connect5_ok("")
            assigned = prop(props, ASSIGNED_CLIENT_ID)
            assert assigned, f"no Assigned Client Identifier in the CONNACK: {props}"
            assert prop(props, RESPONSE_INFORMATION) is None, f"Response Information not asked for: {props}"
            ids.append(assigned)
        assert ids[0] != ids[1]


def test_v5_mqtt_3_1_2_4_and_3_2_2_2_clean_start_discards_the_session(brokers):
    """[MQTT-3.1.2-4] [MQTT-3.2.2-2] [MQTT-3.1.2-5] [MQTT-3.2.2-3] Clean Start 0 resumes a
    stored Session (Session Present 1, its subscription still delivers); Clean Start 1 discards
    it (Session Present 0, the subscription is gone)."""
    b = brokers()
    expiry = properties((SESSION_EXPIRY, 60))
    c = client5(b.port, "v5-cs", clean=True, subs=[("v5/cs", 1)], props=expiry)
    c.disconnect()
    with RawClient(b.port) as c:
        c.connect5_ok("v5-cs", clean=False, session_present=True, props=expiry)
        _pub_qos1(b.port, "v5/cs", b"kept")
        m = c.recv_publish5()
        assert (m.topic, m.payload) == ("v5/cs", b"kept")
        c.send(puback(m.mid))
        c.disconnect()
    with RawClient(b.port) as c:
        c.connect5_ok("v5-cs", clean=True, session_present=False, props=expiry)
        _pub_qos1(b.port, "v5/cs", b"gone")
        c.expect_nothing("the subscription of the discarded session still delivers")


def test_v5_mqtt_3_1_2_23_session_kept_across_a_reconnect(brokers):
    """[MQTT-3.1.2-23] [MQTT-3.1.2-5] [MQTT-4.1.0-1] With a Session Expiry Interval the Session
    outlives the connection: a QoS 1 message published while the client is away is delivered
    when it comes back with Clean Start 0, after a CONNACK with Session Present 1."""
    b = brokers()
    c = client5(b.port, "v5-se", subs=[("v5/se", 1)], props=properties((SESSION_EXPIRY, 60)))
    c.disconnect()
    _pub_qos1(b.port, "v5/se", b"while away")
    with RawClient(b.port) as c:
        c.connect5_ok("v5-se", clean=False, session_present=True, props=properties((SESSION_EXPIRY, 60)))
        m = c.recv_publish5()
        assert (m.topic, m.payload, m.qos) == ("v5/se", b"while away", 1)
        c.send(puback(m.mid))


def test_v5_session_expiry_0_ends_the_session_with_the_connection(brokers):
    """[MQTT-3.1.2-23] [MQTT-3.1.2-6] [MQTT-3.2.2-3] Clean Start 0 without a Session creates
    one (Session Present 0). Session Expiry Interval absent (0): the Session ends when the connection
    closes, so Clean Start 0 afterwards finds none (Session Present 0)."""
    b = brokers()
    c = client5(b.port, "v5-se0", clean=False, subs=[("v5/se0", 1)])
    c.disconnect()
    with RawClient(b.port) as c:
        c.connect5_ok("v5-se0", clean=False, session_present=False)


@pytest.mark.slow
def test_v5_mqtt_3_1_2_23_session_expires_after_its_interval(brokers):
    """[MQTT-3.1.2-23] [MQTT-4.1.0-2] A Session whose client stays away longer than its Session
    Expiry Interval (1 s) is deleted: Clean Start 0 then gets Session Present 0 and none of the
    messages queued for the old Session."""
    b = brokers()
    c = client5(b.port, "v5-sexp", subs=[("v5/sexp", 1)], props=properties((SESSION_EXPIRY, 1)))
    c.disconnect()
    _pub_qos1(b.port, "v5/sexp", b"queued")
    # Time itself is what ends a Session: wait out the interval, then a second for the
    # broker's expiry timer (Mosquitto checks once a second).
    time.sleep(2.5)
    with RawClient(b.port) as c:
        c.connect5_ok("v5-sexp", clean=False, session_present=False)
        c.expect_nothing("a message of the expired session was delivered")


@pytest.mark.slow
def test_v5_mqtt_3_1_2_8_will_delay_interval(brokers):
    """[MQTT-3.1.2-8] [MQTT-3.1.3-9] [MQTT-3.1.2-10] The Will of a connection that breaks is
    published only after its Will Delay Interval (2 s), not at the break; a client that comes
    back within the interval cancels it (nothing is published even after the interval)."""
    b = brokers()
    with client5(b.port, "v5-will-watch", subs=[("v5/will/#", 0)]) as watch:
        for cid, comes_back in (("v5-will-a", False), ("v5-will-b", True)):
            c = RawClient(b.port)
            c.connect5_ok(cid, props=properties((SESSION_EXPIRY, 60)),
                          will=Will(f"v5/will/{cid}", b"gone"), will_props=properties((WILL_DELAY, 2)))
            assert c.is_open()  # the CONNECT has been handled
            c.close()  # no DISCONNECT: the Will is due
            broke = time.monotonic()
            watch.expect_nothing(f"{cid}: the Will came before its delay")
            if comes_back:
                with RawClient(b.port) as back:
                    back.connect5_ok(cid, clean=False, session_present=True, props=properties((SESSION_EXPIRY, 60)))
                    # Stay connected past the interval: the cancelled Will must not come.
                    time.sleep(max(0.0, broke + 3 - time.monotonic()))
                    watch.expect_nothing(f"{cid}: the Will came although the client reconnected")
                    back.disconnect()
            else:
                m = watch.recv_publish5(timeout=10)
                waited = time.monotonic() - broke
                assert (m.topic, m.payload) == (f"v5/will/{cid}", b"gone")
                assert waited >= 1.5, f"the Will came {waited:.2f}s after the break, before its 2 s delay"


def test_v5_will_without_delay_is_published_at_once_and_not_after_disconnect_0(brokers):
    """[MQTT-3.1.2-7] [MQTT-3.1.2-8] [MQTT-3.1.2-14] [MQTT-3.1.2-15] [MQTT-3.14.4-3]
    [MQTT-3.1.2-10] Without a Will Delay Interval the Will is published when the connection
    breaks, retained only if Will Retain says so (a later subscriber gets that one as retained);
    after a DISCONNECT with reason 0x00 it is discarded."""
    b = brokers()
    with client5(b.port, "v5-w0-watch", subs=[("v5/w0/#", sub_options(0, retain_as_published=True))]) as watch:
        for cid, retain in (("a", False), ("r", True)):
            c = RawClient(b.port)
            c.connect5_ok(f"v5-w0-{cid}", will=Will(f"v5/w0/{cid}", b"broke", retain=retain))
            c.close()
            m = watch.recv_publish5()
            assert (m.topic, m.payload, m.retain) == (f"v5/w0/{cid}", b"broke", retain)
        with client5(b.port, "v5-w0-late", subs=[("v5/w0/#", 0)]) as late:
            m = late.recv_publish5()
            assert (m.topic, m.retain) == ("v5/w0/r", True)
            late.expect_nothing("a Will with Will Retain 0 was retained")
        c = RawClient(b.port)
        c.connect5_ok("v5-w0-b", will=Will("v5/w0/b", b"never"))
        c.send(b"\xe0\x01\x00")  # DISCONNECT, reason 0x00 Normal disconnection
        assert c.closed_within(10)
        watch.expect_nothing("the Will was published after DISCONNECT 0x00")


def test_v5_mqtt_4_12_0_1_unknown_authentication_method_is_refused_with_0x8c(brokers):
    """[MQTT-4.12.0-1] [MQTT-3.1.4-2] [MQTT-3.2.2-7] [MQTT-3.14.0-1] A CONNECT naming an Authentication Method
    the Server does not support is refused: CONNACK with reason 0x8C Bad authentication method
    (Session Present 0), then the connection is closed, with no DISCONNECT after the CONNACK."""
    b = brokers()
    with RawClient(b.port) as c:
        present, rc, _ = c.connect_v5("v5-auth", props=properties((AUTH_METHOD, "NO-SUCH-METHOD-42")))
        assert (present, rc) == (False, 0x8C)
        c.expect_closed()


def test_v5_mqtt_3_2_0_2_one_connack_per_connection(brokers):
    """[MQTT-3.2.0-1] [MQTT-3.2.0-2] [MQTT-3.2.2-1] [MQTT-3.1.4-5] A valid 5.0 CONNECT gets
    CONNACK 0x00 (reserved flag bits 0) as the first packet, and no other CONNACK follows."""
    b = brokers()
    with RawClient(b.port) as c:
        c.connect5_ok("v5-once")
        c.send(publish("v5/once", b"", 0, props=b"\x00"))
        assert c.is_open()
        assert not [p for p in c.until_pingresp() if p.type == CONNACK]


def test_v5_subscription_options_survive_in_the_session(brokers):
    """[MQTT-3.1.2-5] [MQTT-3.8.3-3] A resumed Session keeps each subscription with its
    options: No Local still holds after the reconnect."""
    b = brokers()
    expiry = properties((SESSION_EXPIRY, 60))
    c = client5(b.port, "v5-opts", subs=[("v5/opts", sub_options(1, no_local=True))], props=expiry)
    c.disconnect()
    with RawClient(b.port) as c:
        c.connect5_ok("v5-opts", clean=False, session_present=True, props=expiry)
        c.send(publish("v5/opts", b"own", 1, 5, props=b"\x00"))
        got = c.until_pingresp()
        assert [parse_reason(p)[0] for p in got] == [5], "own message delivered despite No Local, or no PUBACK"


def test_v5_mqtt_3_1_4_3_session_takeover_is_disconnect_0x8e(brokers, mosquitto_deviates):
    """[MQTT-3.1.4-3] [MQTT-3.1.3-5] [MQTT-3.14.4-1] [MQTT-3.14.4-2] A second connection with a
    ClientID already connected (1-23 alphanumerics) takes over: the first gets DISCONNECT 0x8E
    Session taken over, then is closed with nothing after it; the new one is served."""
    mosquitto_deviates("closes the old connection without the DISCONNECT 0x8E that 3.1.4 says it sends")
    b = brokers()
    with RawClient(b.port) as old, RawClient(b.port) as new:
        old.connect5_ok("v5TakeOver01")
        new.connect5_ok("v5TakeOver01")
        pkt = old.recv_packet()
        assert (pkt.type, parse_reason(pkt)[1]) == (DISCONNECT, 0x8E), describe(pkt.raw)
        old.expect_closed()
        assert new.is_open()
