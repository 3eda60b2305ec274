"""MQTT 3.1.1 conformance, sections 3.1.2.4, 4.1, 4.4: sessions (clean_session 0 and 1),
message delivery retry on reconnect, black-box against a real iot-broker."""

from __future__ import annotations

from tests.mqttraw import (
    PUBLISH,
    RawClient,
    client,
    collect_publishes,
    connack,
    connect,
    describe,
    parse_publish,
    publish,
    puback,
    pubcomp,
    pubrec,
    pubrel,
)


def test_mqtt_3_1_2_5_persistent_session_keeps_subscriptions_and_messages(broker):
    """[MQTT-3.1.2-4] [MQTT-3.1.2-5] [MQTT-4.1.0-1] [MQTT-3.2.2-2] [MQTT-3.2.0-1]
    [MQTT-3.1.4-3] With clean session 0 the session outlives the connection: QoS 1 and 2
    messages published while the client is away are stored and delivered on reconnect (after
    the CONNACK with session present 1, first thing on the wire), and the subscription is
    still in effect without subscribing again."""
    c = client(broker.port, "pers1", clean=False, subs=[("pers/#", 2)])
    c.disconnect()
    with client(broker.port, "pers1pub") as p:
        p.publish_ok("pers/q1", b"one", 1, 1)
        p.publish_ok("pers/q2", b"two", 2, 2)
    with RawClient(broker.port) as c:
        c.send(connect("pers1", clean=False))
        c.expect(connack(0, session_present=True), what="CONNACK must be the first packet")
        stored = sorted((c.recv_publish(), c.recv_publish()), key=lambda m: m.topic)  # two topics: any order
        assert [(m.topic, m.payload, m.qos) for m in stored] == [("pers/q1", b"one", 1), ("pers/q2", b"two", 2)]
        c.send(puback(stored[0].mid))
        c.send(pubrec(stored[1].mid))
        c.expect(pubrel(stored[1].mid))
        c.send(pubcomp(stored[1].mid))
        with client(broker.port, "pers1pub2") as p:
            p.publish_ok("pers/live", b"live", 1, 3)
        m3 = c.recv_publish()
        assert (m3.topic, m3.payload) == ("pers/live", b"live"), "subscription not kept in the session"
        c.send(puback(m3.mid))


def test_mqtt_3_1_2_6_clean_session_discards_previous_session(broker):
    """[MQTT-3.1.2-6] [MQTT-3.2.2-1] [MQTT-3.1.4-3] Connecting with clean session 1 discards
    the stored session (its subscriptions and queued messages), and that state is not reused
    by a later clean session 0 connection either."""
    c = client(broker.port, "clean1", clean=False, subs=[("cln/t", 1)])
    c.disconnect()
    with client(broker.port, "clean1pub") as p:
        p.publish_ok("cln/t", b"queued", 1, 1)
    with RawClient(broker.port) as c:
        c.send(connect("clean1", clean=True))
        c.expect(connack(0, session_present=False))
        with client(broker.port, "clean1pub") as p:
            p.publish_ok("cln/t", b"new", 1, 2)
        c.expect_nothing(what="queued message or subscription survived clean session 1")
        c.disconnect()
    with RawClient(broker.port) as c:
        c.send(connect("clean1", clean=False))
        c.expect(connack(0, session_present=False), what="state of a clean session reused")
        c.expect_nothing()


def test_mqtt_4_1_0_2_clean_session_lasts_as_long_as_the_connection(broker):
    """[MQTT-4.1.0-2] [MQTT-3.1.2-6] A clean session keeps its state (subscription, the QoS 2
    packet id awaiting PUBREL) while the connection is open, and ends with it: a later connection
    with the same id (clean 0) finds no session and gets nothing."""
    with client(broker.port, "cls", subs=[("cls/t", 1)]) as c, client(broker.port, "clspub") as p:
        for i in range(3):
            p.publish_ok("cls/t", b"%d" % i, 1, i + 1)
            m = c.recv_publish()
            assert m.payload == b"%d" % i
            c.send(puback(m.mid))
            assert c.is_open()
        c.send(publish("cls/q2", b"q2", qos=2, mid=50))
        c.expect(pubrec(50))
        assert c.is_open()
        c.send(publish("cls/q2", b"q2", qos=2, mid=50, dup=True))
        c.expect(pubrec(50), what="QoS 2 state lost during the session")
        c.send(pubrel(50))
        c.expect(pubcomp(50))
        c.disconnect()
        p.publish_ok("cls/t", b"after", 1, 9)
    with RawClient(broker.port) as c:
        c.send(connect("cls", clean=False))
        c.expect(connack(0, session_present=False))
        c.expect_nothing(what="a clean session's state outlived its connection")


def test_mqtt_3_1_3_2_client_id_identifies_the_session(broker):
    """[MQTT-3.1.3-2] The client id selects the session: another id finds no session; the
    same id finds its own."""
    c = client(broker.port, "idA", clean=False, subs=[("ida/t", 1)])
    c.disconnect()
    with client(broker.port, "idApub") as p:
        p.publish_ok("ida/t", b"for-A", 1, 1)
    with RawClient(broker.port) as b:
        b.send(connect("idB", clean=False))
        b.expect(connack(0, session_present=False))
        b.expect_nothing(what="idB received idA's message")
    with RawClient(broker.port) as a:
        a.send(connect("idA", clean=False))
        a.expect(connack(0, session_present=True))
        assert a.recv_publish().payload == b"for-A"


def test_mqtt_4_4_0_1_unacked_publish_resent_with_dup_and_same_id(broker):
    """[MQTT-4.4.0-1] [MQTT-3.3.1-1] [MQTT-2.3.1-4] On reconnect with clean session 0 the
    broker re-sends each unacknowledged QoS 1 and QoS 2 PUBLISH with DUP 1 and its original
    packet id (in their original order), and the PUBREL (not the PUBLISH) for a QoS 2 message
    already PUBREC'd."""
    c = client(broker.port, "retry", clean=False, subs=[("retry/#", 2)])
    with client(broker.port, "retrypub") as p:
        p.publish_ok("retry/a", b"q1", 1, 1)
        p.publish_ok("retry/b", b"q2-unacked", 2, 2)
        p.publish_ok("retry/c", b"q2-recd", 2, 3)
    a, b, d = c.recv_publish(), c.recv_publish(), c.recv_publish()
    assert [(m.payload, m.qos, m.dup) for m in (a, b, d)] == \
        [(b"q1", 1, False), (b"q2-unacked", 2, False), (b"q2-recd", 2, False)]
    c.send(pubrec(d.mid))
    c.expect(pubrel(d.mid))
    c.close()  # network failure: no PUBACK for a, no PUBREC for b, no PUBCOMP for d

    with RawClient(broker.port) as c:
        c.send(connect("retry", clean=False))
        c.expect(connack(0, session_present=True))
        got = [c.recv_packet() for _ in range(3)]
        seen = [describe(x.raw) for x in got]
        pubs = [parse_publish(x) for x in got if x.type == PUBLISH]
        assert [x.raw for x in got if x.type != PUBLISH] == [pubrel(d.mid)], seen
        assert len(pubs) == 2, seen
        ra, rb = pubs  # the re-sent PUBLISH packets keep their original order
        assert (ra.topic, ra.payload, ra.qos, ra.mid, ra.dup) == ("retry/a", b"q1", 1, a.mid, True), seen
        assert (rb.topic, rb.payload, rb.qos, rb.mid, rb.dup) == ("retry/b", b"q2-unacked", 2, b.mid, True), seen
        c.send(puback(ra.mid))
        c.send(pubrec(rb.mid))
        c.expect(pubrel(rb.mid))
        c.send(pubcomp(rb.mid))
        c.send(pubcomp(d.mid))
        c.expect_nothing(what="something re-sent after every flow completed")


def test_mqtt_4_4_0_1_incoming_qos2_state_survives_reconnect(broker):
    """[MQTT-4.4.0-1] [MQTT-4.3.3-2] A client that lost the connection between PUBREC and
    PUBREL re-sends the PUBLISH (DUP 1, same id) on a clean session 0 reconnect: the broker
    answers PUBREC without delivering it a second time, and PUBREL gets PUBCOMP."""
    with client(broker.port, "in2sub", subs=[("in2/t", 1)]) as s:
        p = client(broker.port, "in2pub", clean=False)
        p.send(publish("in2/t", b"exactly-once", qos=2, mid=77))
        p.expect(pubrec(77))
        p.close()
        with RawClient(broker.port) as p:
            p.send(connect("in2pub", clean=False))
            p.expect(connack(0, session_present=True))
            p.send(publish("in2/t", b"exactly-once", qos=2, mid=77, dup=True))
            p.expect(pubrec(77))
            p.send(pubrel(77))
            p.expect(pubcomp(77))
        # The broker may deliver on PUBLISH or on PUBREL (figure 4.3): either way, once.
        (got,) = collect_publishes([s])
        assert [m.payload for m in got] == [b"exactly-once"], [describe(m.raw) for m in got]
        s.send(puback(got[0].mid))


def test_mqtt_4_6_0_6_queued_messages_delivered_in_order_on_reconnect(broker):
    """[MQTT-4.6.0-6] Messages stored for an offline persistent session are delivered in the
    order they were published."""
    c = client(broker.port, "oq", clean=False, subs=[("oq/t", 1)])
    c.disconnect()
    with client(broker.port, "oqpub") as p:
        p.send(b"".join(publish("oq/t", b"%d" % i, qos=1, mid=i + 1) for i in range(25)))
        for i in range(25):
            p.expect(puback(i + 1))
    with client(broker.port, "oq", clean=False, session_present=True) as c:
        got = []
        for _ in range(25):
            m = c.recv_publish()
            got.append(int(m.payload))
            c.send(puback(m.mid))
        assert got == list(range(25))


def test_mqtt_3_1_4_2_takeover_keeps_persistent_session(broker):
    """[MQTT-3.1.4-2] [MQTT-3.2.2-2] When a connection takes over a connected persistent
    session, the old connection is closed and the new one gets session present 1 with its
    subscription, including the message the old connection had not acknowledged."""
    old = client(broker.port, "tk", clean=False, subs=[("tk/t", 1)])
    with client(broker.port, "tkpub") as p:
        p.publish_ok("tk/t", b"unacked", 1, 1)
    first = old.recv_publish()
    with RawClient(broker.port) as new:
        new.send(connect("tk", clean=False))
        new.expect(connack(0, session_present=True))
        old.expect_closed(what="the old connection")
        m = new.recv_publish()
        assert (m.payload, m.mid, m.dup) == (b"unacked", first.mid, True)
        new.send(puback(m.mid))
        with client(broker.port, "tkpub") as p:
            p.publish_ok("tk/t", b"next", 1, 2)
        m = new.recv_publish()
        assert m.payload == b"next"
    old.close()


def test_mqtt_3_1_2_7_retained_messages_outlive_sessions(broker):
    """[MQTT-3.1.2-7] Retained messages are not session state: they survive the end of the
    publisher's session (clean session 1 connection closed, and later its id reconnecting
    with clean session 1)."""
    p = client(broker.port, "rpub")
    p.publish_ok("rs7/t", b"stays", 1, 1, retain=True)
    p.disconnect()
    p = client(broker.port, "rpub")  # a new clean session with the same id
    p.disconnect()
    with client(broker.port, "rsub", subs=[("rs7/t", 0)]) as s:
        s.expect(publish("rs7/t", b"stays", qos=0, retain=True))


def test_mqtt_3_1_2_5_qos0_not_required_but_qos1_kept_while_away(broker):
    """[MQTT-3.1.2-5] Only QoS 1 and 2 messages must be stored for an absent client; each
    stored message is delivered exactly once (a QoS 0 one, if stored, at most once)."""
    c = client(broker.port, "mix", clean=False, subs=[("mix/t", 2)])
    c.disconnect()
    with client(broker.port, "mixpub") as p:
        p.publish_ok("mix/t", b"zero", 0, 0)
        p.publish_ok("mix/t", b"one", 1, 1)
    with client(broker.port, "mix", clean=False, session_present=True) as c:
        got = []
        while True:
            m = c.recv_publish()
            got.append(m.payload)
            if m.qos:
                c.send(puback(m.mid))
            if m.payload == b"one":
                break
        assert got in ([b"one"], [b"zero", b"one"]), got
        c.expect_nothing()
