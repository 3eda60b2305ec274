"""MQTT 5.0 conformance, sections 3.1.2.11, 3.3.2.3, 4.9: what the Server must honour of the
Client's CONNECT (Receive Maximum, Maximum Packet Size, Topic Alias Maximum), Topic Aliases from
the Client, and the Message Expiry Interval. Black-box over raw sockets against our broker and
Mosquitto 2 (the `brokers` fixture)."""

from __future__ import annotations

import time

import pytest

from tests.mqttraw import (
    MAXIMUM_PACKET_SIZE,
    MESSAGE_EXPIRY,
    PUBACK,
    RECEIVE_MAXIMUM,
    SESSION_EXPIRY,
    TOPIC_ALIAS,
    TOPIC_ALIAS_MAXIMUM,
    DISCONNECT,
    RawClient,
    client5,
    describe,
    parse_publish,
    parse_reason,
    prop,
    properties,
    puback,
    publish,
)


def _publish_all(port: int, messages: list[tuple[str, bytes]], qos: int = 1, props: bytes = b"\x00") -> None:
    """Publish each (topic, payload) from one 5.0 client; wait for every PUBACK."""
    with client5(port, "") as p:
        for mid, (topic, payload) in enumerate(messages, 1):
            p.send(publish(topic, payload, qos, mid if qos else None, props=props))
        if qos:
            acks = [p.recv_packet() for _ in messages]
            assert [(a.type, parse_reason(a)[0]) for a in acks] == [(PUBACK, m) for m in range(1, len(messages) + 1)]
        else:
            assert p.is_open()


def test_v5_mqtt_3_3_4_9_receive_maximum_bounds_unacknowledged_publishes(brokers):
    """[MQTT-3.3.4-9] [MQTT-3.3.4-10] [MQTT-4.9.0-2] [MQTT-4.9.0-3] [MQTT-3.12.4-1] [MQTT-2.2.1-4]
    A Client with Receive Maximum 2 never has more than 2
    unacknowledged QoS 1 PUBLISHes from the Server: of 6 messages it gets 2; a PINGREQ is
    still answered (other packets are not held back); each PUBACK lets one more through, until
    all 6 came, in order; unacknowledged ones never share a packet id, and none is 0."""
    b = brokers()
    with client5(b.port, "v5-rm", subs=[("v5/rm", 1)], props=properties((RECEIVE_MAXIMUM, 2))) as c:
        _publish_all(b.port, [("v5/rm", b"%d" % i) for i in range(6)])
        first = [parse_publish(p, v5=True) for p in c.until_pingresp()]
        assert [m.payload for m in first] == [b"0", b"1"], "more than Receive Maximum in flight"
        assert 0 not in {m.mid for m in first} and len({m.mid for m in first}) == 2
        got = list(first)
        for m in first:
            c.send(puback(m.mid))
        while len(got) < 6:
            m = c.recv_publish5()
            got.append(m)
            c.send(puback(m.mid))
        assert [m.payload for m in got] == [b"%d" % i for i in range(6)]
        # Never more than two at once: with nothing acknowledged since, nothing more is sent.
        c.expect_nothing()


def test_v5_mqtt_3_1_2_24_maximum_packet_size_is_honoured(brokers):
    """[MQTT-3.1.2-24] [MQTT-3.1.2-25] The Server never sends a packet larger than the
    Client's Maximum Packet Size (100 bytes): a 200-byte message is not sent to it (discarded
    as if sent), the small ones before and after it are, and the connection stays open."""
    b = brokers()
    with client5(b.port, "v5-mps", subs=[("v5/mps", 1)], props=properties((MAXIMUM_PACKET_SIZE, 100))) as c:
        _publish_all(b.port, [("v5/mps", b"small1"), ("v5/mps", b"x" * 200), ("v5/mps", b"small2")])
        got = []
        for pkt in c.until_pingresp():
            assert len(pkt.raw) <= 100, f"a {len(pkt.raw)}-byte packet sent over Maximum Packet Size 100"
            m = parse_publish(pkt, v5=True)
            got.append(m.payload)
            c.send(puback(m.mid))
        assert got == [b"small1", b"small2"]


def test_v5_mqtt_3_1_2_26_and_3_3_2_11_topic_alias_maximum_is_honoured(brokers):
    """[MQTT-3.1.2-26] [MQTT-3.1.2-27] [MQTT-3.3.2-11] The Server sends no Topic Alias to a
    Client that gave no Topic Alias Maximum, and none above 2 to one that gave 2; what it sends
    resolves: each PUBLISH's topic (given, or mapped by an alias set earlier on this
    connection) is the one published."""
    b = brokers()
    topics = [f"v5/ta/{i}" for i in range(5)] * 2
    with client5(b.port, "v5-ta0", subs=[("v5/ta/#", 1)]) as none, \
            client5(b.port, "v5-ta2", subs=[("v5/ta/#", 1)], props=properties((TOPIC_ALIAS_MAXIMUM, 2))) as two:
        _publish_all(b.port, [(t, t.encode()) for t in topics])
        for c, maximum in ((none, 0), (two, 2)):
            aliases: dict[int, str] = {}
            for pkt in c.until_pingresp():
                m = parse_publish(pkt, v5=True)
                c.send(puback(m.mid))
                alias = prop(m.props, TOPIC_ALIAS)
                topic = m.topic
                if alias is not None:
                    assert 1 <= alias <= maximum, f"Topic Alias {alias} sent, Topic Alias Maximum {maximum}"
                    if topic:
                        aliases[alias] = topic
                    else:
                        assert alias in aliases, f"alias {alias} used before it was set"
                        topic = aliases[alias]
                assert topic.encode() == m.payload, f"PUBLISH resolves to {topic!r}, was published to {m.payload!r}"


def test_v5_mqtt_3_3_2_12_topic_alias_from_the_client(brokers):
    """[MQTT-3.3.2-12] [MQTT-3.3.2-7] The Server accepts Topic Aliases from 1 up to its own
    Topic Alias Maximum: a PUBLISH with topic and alias sets the mapping, one with an empty
    topic and that alias goes to the mapped topic. A new connection starts without mappings."""
    b = brokers()
    with client5(b.port, "v5-tac-sub", subs=[("v5/tac/#", 1)]) as sub, RawClient(b.port) as p:
        maximum = prop(p.connect5_ok("v5-tac-pub"), TOPIC_ALIAS_MAXIMUM, 0)
        if maximum == 0:
            pytest.fail("the broker accepts no Topic Alias (Topic Alias Maximum 0): nothing to test")
        alias = properties((TOPIC_ALIAS, maximum))
        p.send(publish("v5/tac/long/topic/name", b"first", 1, 1, props=alias))
        p.send(publish("", b"second", 1, 2, props=alias))
        assert [(a.type, parse_reason(a)[0]) for a in (p.recv_packet(), p.recv_packet())] == [(PUBACK, 1), (PUBACK, 2)]
        got = [sub.recv_publish5() for _ in range(2)]
        assert [(m.topic, m.payload) for m in got] == [("v5/tac/long/topic/name", b"first"),
                                                       ("v5/tac/long/topic/name", b"second")]
        for m in got:
            sub.send(puback(m.mid))
    with RawClient(b.port) as p:  # the mapping belonged to the closed connection
        p.connect5_ok("v5-tac-pub")
        p.send(publish("", b"third", 1, 3, props=properties((TOPIC_ALIAS, 1))))
        pkt = p.recv_packet()  # an alias with no mapping on this connection: a Protocol Error
        assert (pkt.type, parse_reason(pkt)[1]) == (DISCONNECT, 0x82), describe(pkt.raw)
        assert p.closed_within(10)


@pytest.mark.parametrize("bad", ["over the maximum", "zero"])
def test_v5_mqtt_3_3_2_9_invalid_topic_alias_is_disconnect_0x94(brokers, mosquitto_deviates, bad):
    """[MQTT-3.3.2-12] [MQTT-3.3.2-8] [MQTT-3.3.2-9] [MQTT-4.13.1-1] A Topic Alias above the Server's Topic
    Alias Maximum, or 0, is "Topic Alias invalid": DISCONNECT 0x94, then the connection is
    closed, and the message is not delivered."""
    if bad == "zero":
        mosquitto_deviates("Topic Alias 0 is answered with DISCONNECT 0x81 Malformed Packet, not 0x94")
    b = brokers()
    with client5(b.port, "v5-tabad-sub", subs=[("v5/tabad", 1)]) as sub, RawClient(b.port) as p:
        maximum = prop(p.connect5_ok("v5-tabad-pub"), TOPIC_ALIAS_MAXIMUM, 0)
        alias = maximum + 1 if bad == "over the maximum" else 0
        p.send(publish("v5/tabad", b"bad", 1, 1, props=properties((TOPIC_ALIAS, alias))))
        pkt = p.recv_packet()
        assert (pkt.type, parse_reason(pkt)[1]) == (DISCONNECT, 0x94), \
            f"alias {alias} (maximum {maximum}): {describe(pkt.raw)}"
        assert p.closed_within(10)
        sub.expect_nothing("a message with an invalid Topic Alias was delivered")


@pytest.mark.slow
def test_v5_mqtt_3_3_2_5_expired_message_is_not_delivered(brokers):
    """[MQTT-3.3.2-5] [MQTT-3.3.2-6] A message whose Message Expiry Interval (1 s) passed while
    the subscriber was away is not delivered; one with 60 s is, with the interval that remains
    (less than 60, more than 0)."""
    b = brokers()
    expiry = properties((SESSION_EXPIRY, 60))
    c = client5(b.port, "v5-mexp", subs=[("v5/mexp/#", 1)], props=expiry)
    c.disconnect()
    _publish_all(b.port, [("v5/mexp/short", b"short")], props=properties((MESSAGE_EXPIRY, 1)))
    _publish_all(b.port, [("v5/mexp/long", b"long")], props=properties((MESSAGE_EXPIRY, 60)))
    time.sleep(2.2)  # the time to let pass is the point: past the 1 s interval, by whole seconds
    with RawClient(b.port) as c:
        c.connect5_ok("v5-mexp", clean=False, session_present=True, props=expiry)
        got = [parse_publish(p, v5=True) for p in c.until_pingresp()]
        assert [m.payload for m in got] == [b"long"], "the expired message was delivered (or the other was not)"
        remaining = prop(got[0].props, MESSAGE_EXPIRY)
        assert remaining is not None and 0 < remaining < 60, f"Message Expiry Interval sent on: {remaining}"
        c.send(puback(got[0].mid))


def test_v5_mqtt_3_3_2_6_live_message_keeps_its_expiry_interval(brokers):
    """[MQTT-3.3.2-6] A message delivered at once carries its Message Expiry Interval on (at
    most what was published); one published without it gets none."""
    b = brokers()
    with client5(b.port, "v5-mlive", subs=[("v5/mlive/#", 0)]) as c:
        _publish_all(b.port, [("v5/mlive/a", b"a")], qos=0, props=properties((MESSAGE_EXPIRY, 30)))
        _publish_all(b.port, [("v5/mlive/b", b"b")], qos=0)
        a, n = c.recv_publish5(), c.recv_publish5()
        assert 0 < prop(a.props, MESSAGE_EXPIRY, 0) <= 30
        assert prop(n.props, MESSAGE_EXPIRY) is None


def test_v5_mqtt_3_3_4_7_client_over_the_receive_maximum_is_disconnect_0x93(brokers, mosquitto_deviates):
    """[MQTT-3.3.4-7] A Client that sends more unacknowledged QoS 2 PUBLISHes than the Server's
    Receive Maximum (from its CONNACK, 65535 when absent) breaks the flow control: DISCONNECT
    0x93 Receive Maximum exceeded, then the connection is closed."""
    mosquitto_deviates("answers the excess PUBLISH with PUBREC 0x97 Quota exceeded and keeps the connection")
    b = brokers()
    with RawClient(b.port) as c:
        window = prop(c.connect5_ok("v5-rmx"), RECEIVE_MAXIMUM, 65535)
        if window > 1000:
            pytest.fail(f"Receive Maximum {window}: too large to exceed in a test")
        for mid in range(1, window + 2):  # no PUBREL: every one stays unacknowledged
            c.send(publish("v5/rmx", b"x", 2, mid, props=b"\x00"))
        got = [c.recv_packet() for _ in range(window)]
        assert [p.type for p in got] == [5] * window, [describe(p.raw) for p in got]  # PUBREC each
        pkt = c.recv_packet()
        assert (pkt.type, parse_reason(pkt)[1]) == (DISCONNECT, 0x93), describe(pkt.raw)
        assert c.closed_within(10)
