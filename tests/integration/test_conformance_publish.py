"""MQTT 3.1.1 conformance, sections 2.3, 3.3-3.7, 4.3, 4.5, 4.6: PUBLISH and its QoS flows,
retained messages and ordering, black-box against a real iot-broker."""

from __future__ import annotations

from tests.mqttraw import (
    PUBACK,
    PUBREC,
    PUBREL,
    assert_serves_new_client,
    check_each,
    client,
    collect_publishes,
    describe,
    parse_publish,
    publish,
    puback,
    pubcomp,
    pubrec,
    pubrel,
)

# --- QoS flows, client -> broker -> client -------------------------------------------------


def test_mqtt_4_3_1_1_qos0_delivered_with_qos0_dup0_no_packet_id(broker):
    """[MQTT-4.3.1-1] [MQTT-3.3.4-1] [MQTT-2.3.1-5] [MQTT-3.3.1-2] A QoS 0 PUBLISH gets no
    acknowledgement, and is delivered as QoS 0, DUP 0, without a packet identifier (exact
    bytes)."""
    with client(broker.port, "q0sub", subs=[("q0/t", 0)]) as s, client(broker.port, "q0pub") as p:
        p.send(publish("q0/t", b"hello"))
        s.expect(publish("q0/t", b"hello"), what="QoS 0 delivery")
        p.expect_nothing(what="a QoS 0 PUBLISH is not acknowledged")


def test_mqtt_4_3_2_1_qos1_flow_both_directions(broker):
    """[MQTT-4.3.2-1] [MQTT-4.3.2-2] [MQTT-3.3.4-1] [MQTT-2.3.1-6] QoS 1: the publisher gets a
    PUBACK with its own packet id; the subscriber gets QoS 1, DUP 0, a non-zero packet id,
    and after its PUBACK nothing more."""
    with client(broker.port, "q1sub", subs=[("q1/t", 1)]) as s, client(broker.port, "q1pub") as p:
        p.send(publish("q1/t", b"one", qos=1, mid=0x1234))
        p.expect(puback(0x1234))
        m = s.recv_publish()
        assert (m.topic, m.payload, m.qos, m.dup, m.retain) == ("q1/t", b"one", 1, False, False)
        assert m.mid and m.mid != 0
        s.send(puback(m.mid))
        s.expect_nothing(what="after PUBACK")


def test_mqtt_4_3_2_2_after_puback_same_packet_id_is_new_message(broker):
    """[MQTT-4.3.2-2] After the broker sent PUBACK, a PUBLISH reusing the packet id (even with
    DUP 1) is a new publication and is delivered again."""
    with client(broker.port, "q1rsub", subs=[("q1r/t", 0)]) as s, client(broker.port, "q1rpub") as p:
        p.send(publish("q1r/t", b"first", qos=1, mid=5))
        p.expect(puback(5))
        assert s.recv_publish().payload == b"first"
        p.send(publish("q1r/t", b"second", qos=1, mid=5, dup=True))
        p.expect(puback(5))
        assert s.recv_publish().payload == b"second"


def test_mqtt_4_3_3_2_qos2_receiver_flow(broker):
    """[MQTT-4.3.3-2] [MQTT-3.3.4-1] [MQTT-2.3.1-6] QoS 2 from a client: PUBREC with the same
    id; a repeated PUBLISH before PUBREL is answered with PUBREC again and not delivered
    twice; PUBREL is answered with PUBCOMP (same id); after that the id starts a new message.
    (Whether the broker delivers on PUBLISH or on PUBREL is its choice, figure 4.3.)"""
    with client(broker.port, "q2rsub", subs=[("q2r/t", 0)]) as s, client(broker.port, "q2rpub") as p:
        p.send(publish("q2r/t", b"once", qos=2, mid=0x0A0B))
        p.expect(pubrec(0x0A0B))
        p.send(publish("q2r/t", b"once", qos=2, mid=0x0A0B, dup=True))
        p.expect(pubrec(0x0A0B), what="PUBREC for the retransmission")
        p.send(pubrel(0x0A0B))
        p.expect(pubcomp(0x0A0B))
        (got,) = collect_publishes([s])
        assert [m.payload for m in got] == [b"once"], "a retransmitted QoS 2 PUBLISH must be delivered once"
        p.send(publish("q2r/t", b"again", qos=2, mid=0x0A0B))
        p.expect(pubrec(0x0A0B))
        p.send(pubrel(0x0A0B))
        p.expect(pubcomp(0x0A0B))
        assert s.recv_publish().payload == b"again", "after PUBCOMP the id must start a new message"


def test_mqtt_4_3_3_1_qos2_sender_flow(broker):
    """[MQTT-4.3.3-1] [MQTT-2.3.1-6] QoS 2 to a subscriber: PUBLISH QoS 2, DUP 0; on PUBREC the
    broker sends PUBREL (flags 0010) with the same id; after PUBCOMP nothing; the PUBLISH is
    never sent again once PUBREL was sent."""
    with client(broker.port, "q2ssub", subs=[("q2s/t", 2)]) as s, client(broker.port, "q2spub") as p:
        p.send(publish("q2s/t", b"two", qos=2, mid=9))
        p.expect(pubrec(9))
        p.send(pubrel(9))
        p.expect(pubcomp(9))
        m = s.recv_publish()
        assert (m.payload, m.qos, m.dup) == (b"two", 2, False)
        assert m.mid
        s.send(pubrec(m.mid))
        s.expect(pubrel(m.mid))
        s.expect_nothing(what="the PUBLISH was re-sent after PUBREL")
        s.send(pubcomp(m.mid))
        s.expect_nothing(what="after PUBCOMP")


def test_mqtt_3_3_1_2_qos0_publish_with_dup_closes(broker):
    """[MQTT-3.3.1-2] [MQTT-4.8.0-1] DUP must be 0 on QoS 0 messages: the broker treats a QoS 0
    PUBLISH with DUP 1 as a protocol violation and closes the connection."""
    with client(broker.port, "dup0") as c:
        c.send(publish("dup/t", b"x", qos=0, dup=True))
        c.expect_closed()
    assert_serves_new_client(broker.port)


def test_mqtt_3_3_1_3_dup_not_propagated_to_subscribers(broker):
    """[MQTT-3.3.1-3] An incoming PUBLISH with DUP 1 is delivered with DUP 0: the outgoing DUP
    only says whether the outgoing PUBLISH is a retransmission."""
    with client(broker.port, "dupsub", subs=[("dupp/t", 1)]) as s, client(broker.port, "duppub") as p:
        p.send(publish("dupp/t", b"d", qos=1, mid=3, dup=True))
        p.expect(puback(3))
        m = s.recv_publish()
        assert (m.payload, m.qos, m.dup) == (b"d", 1, False)
        s.send(puback(m.mid))


def test_mqtt_3_3_1_4_qos3_publish_closes(broker):
    """[MQTT-3.3.1-4] A PUBLISH with both QoS bits set closes the connection and is not
    delivered."""
    with client(broker.port, "q3sub", subs=[("q3/#", 0)]) as s:
        with client(broker.port, "q3pub") as p:
            p.send(publish("q3/t", b"x", qos=3, mid=1))
            p.expect_closed()
        s.expect_nothing(what="a QoS 3 PUBLISH was delivered")
    assert_serves_new_client(broker.port)


def test_mqtt_2_3_1_1_publish_packet_id_zero_closes(broker):
    """[MQTT-2.3.1-1] A QoS > 0 PUBLISH must carry a non-zero packet id; id 0 closes the
    connection."""

    def check(qos):
        with client(broker.port, "pid0") as c:
            c.send(publish("pid/t", b"x", qos=qos, mid=0))
            c.expect_closed()

    check_each([1, 2], check)
    assert_serves_new_client(broker.port)


def test_mqtt_2_3_1_4_broker_packet_ids_unique_while_in_flight(broker):
    """[MQTT-2.3.1-4] [MQTT-4.3.2-1] [MQTT-4.3.3-1] Packet ids the broker uses for QoS 1 and 2
    messages in flight to one client are non-zero and all different."""
    with client(broker.port, "pidsub", subs=[("pids/1", 1), ("pids/2", 2)]) as s, \
            client(broker.port, "pidpub") as p:
        for i in range(6):
            p.publish_ok(f"pids/{1 + i % 2}", b"%d" % i, qos=1 + i % 2, mid=i + 1)
        ms = [s.recv_publish() for _ in range(6)]
        ids = [m.mid for m in ms]
        assert all(ids), ids
        assert len(set(ids)) == 6, f"packet ids reused while unacknowledged: {ids}"
        assert all(not m.dup for m in ms)


def test_mqtt_3_3_2_1_publish_without_topic_closes(broker):
    """[MQTT-3.3.2-1] [MQTT-4.7.3-1] The Topic Name must be present and non-empty: a PUBLISH
    with no topic field, or a zero-length one, closes the connection."""
    for bad in (b"\x30\x00", b"\x30\x01\x00", publish("", b"payload")):
        with client(broker.port, "notopic") as c:
            c.send(bad)
            c.expect_closed(what=bad.hex(" "))
    assert_serves_new_client(broker.port)


def test_mqtt_3_3_2_2_wildcard_in_topic_name_closes(broker):
    """[MQTT-3.3.2-2] [MQTT-4.7.1-1] A Topic Name with a wildcard character closes the
    connection and is not delivered to anybody."""
    with client(broker.port, "wcsub", subs=[("#", 0)]) as s:

        def check(topic):
            with client(broker.port, "wcpub") as p:
                p.send(publish(topic, b"x", qos=1, mid=1))
                p.expect_closed()

        check_each(["a/+", "a/#", "+", "#", "a+b", "x/#/y", "a/b#"], check)
        s.expect_nothing(what="a PUBLISH to a wildcard topic was delivered")
    assert_serves_new_client(broker.port)


def test_mqtt_3_3_2_3_delivered_topic_is_the_published_name(broker):
    """[MQTT-3.3.2-3] The Topic Name sent to a subscriber is the published name, which matches
    the subscription's filter (not the filter itself)."""
    with client(broker.port, "tnsub", subs=[("tn/+/c/#", 0)]) as s, client(broker.port, "tnpub") as p:
        p.send(publish("tn/b/c/d/e", b"x"))
        m = s.recv_publish()
        assert m.topic == "tn/b/c/d/e"


def test_mqtt_3_3_5_1_overlapping_subscriptions_max_qos(broker):
    """[MQTT-3.3.5-1] A message matching several subscriptions of one client is delivered
    respecting the highest granted QoS of them: one copy arrives at QoS 2 (further copies,
    one per other matching subscription, are allowed)."""
    with client(broker.port, "ovsub", subs=[("ov/#", 0), ("ov/+", 1), ("ov/x", 2)]) as s, \
            client(broker.port, "ovpub") as p:
        p.publish_ok("ov/x", b"m", qos=2, mid=1)  # routed: every copy is queued for s
        got = []
        for _ in range(10):  # rounds until the broker has nothing more for s (a PUBREC brings a PUBREL)
            pkts = s.until_pingresp()
            if not pkts:
                break
            for pkt in pkts:
                if pkt.type == PUBREL:
                    s.send(pubcomp(int.from_bytes(pkt.body, "big")))
                    continue
                m = parse_publish(pkt)
                got.append(m.qos)
                if m.qos == 1:
                    s.send(puback(m.mid))
                elif m.qos == 2:
                    s.send(pubrec(m.mid))
        else:
            raise AssertionError(f"still receiving after 10 rounds: copies at QoS {got}")
        assert 2 in got, f"copies delivered at QoS {got}: none at the highest matching QoS 2"
        assert len(got) <= 3 and got.count(2) == 1, f"copies delivered at QoS {got}"


def test_mqtt_3_3_5_2_unauthorized_publish_acknowledged_or_closed(broker):
    """[MQTT-3.3.5-2] The broker does not let clients publish to $SYS/ (only it publishes
    statistics there); such a PUBLISH must either be acknowledged by the normal QoS rules or
    make the broker close the connection, never be left unanswered or refused otherwise."""

    def check(qos):
        with client(broker.port, "syspub") as c:
            c.send(publish("$SYS/broker/fake", b"x", qos=qos, mid=11))
            pkt = c.recv_exact(4)
            if not pkt and c.eof:
                return  # closing is the other allowed answer
            assert pkt == (puback(11) if qos == 1 else pubrec(11)), f"got {describe(pkt)}"
            if qos == 2:
                c.send(pubrel(11))
                c.expect(pubcomp(11))
            assert c.is_open()

    check_each([1, 2], check)


def test_mqtt_4_5_0_1_message_goes_to_every_matching_subscriber(broker):
    """[MQTT-4.5.0-1] A message the broker took ownership of goes to every client with a
    matching subscription: an online one and a persistent session that is offline."""
    off = client(broker.port, "own-off", clean=False, subs=[("own/#", 1)])
    off.disconnect()
    with client(broker.port, "own-a", subs=[("own/t", 1)]) as a, \
            client(broker.port, "own-b", subs=[("own/+", 0)]) as b, client(broker.port, "ownpub") as p:
        p.send(publish("own/t", b"all", qos=1, mid=1))
        p.expect(puback(1))
        assert a.recv_publish().payload == b"all"
        assert b.recv_publish().payload == b"all"
    with client(broker.port, "own-off", clean=False, session_present=True) as off:
        m = off.recv_publish()
        assert (m.topic, m.payload, m.qos) == ("own/t", b"all", 1)


# --- ordering -------------------------------------------------------------------------------


def test_mqtt_4_6_0_6_messages_delivered_in_publish_order(broker):
    """[MQTT-4.6.0-6] [MQTT-4.6.0-5] Every topic is ordered by default: messages of one QoS
    from one publisher reach a subscriber in the order they were published (30 messages per
    QoS sent back to back, the subscriber acknowledging as they come)."""
    n = 30

    def check(qos):
        topic = f"ord/{qos}"
        with client(broker.port, "ordsub", subs=[(topic, qos)]) as s, client(broker.port, "ordpub") as p:
            p.send(b"".join(publish(topic, b"%d" % i, qos=qos, mid=i + 1 if qos else None) for i in range(n)))
            if qos == 1:
                p.expect(b"".join(puback(i + 1) for i in range(n)))
            elif qos == 2:  # the broker may deliver only on PUBREL (figure 4.3, method A)
                p.expect(b"".join(pubrec(i + 1) for i in range(n)))
                p.send(b"".join(pubrel(i + 1) for i in range(n)))
                p.expect(b"".join(pubcomp(i + 1) for i in range(n)))
            got = []
            while len(got) < n:
                pkt = s.recv_packet()
                if pkt.type == PUBREL:
                    s.send(pubcomp(int.from_bytes(pkt.body, "big")))
                    continue
                m = parse_publish(pkt)
                got.append(int(m.payload))
                if qos == 1:
                    s.send(puback(m.mid))
                elif qos == 2:
                    s.send(pubrec(m.mid))
            assert got == list(range(n)), f"out of order: {got}"

    check_each([0, 1, 2], check)


def test_mqtt_4_6_0_6_acknowledgements_in_order(broker):
    """[MQTT-4.6.0-6] [MQTT-4.3.2-2] The broker acknowledges a client's QoS 1 and QoS 2
    PUBLISH packets in the order it received them."""
    with client(broker.port, "ackord") as p:
        p.send(b"".join(publish("acko/t", b"x", qos=1 + i % 2, mid=100 + i) for i in range(10)))
        acks = [p.recv_packet() for _ in range(10)]
        got = [(a.type, int.from_bytes(a.body, "big")) for a in acks]
        assert got == [(PUBACK if i % 2 == 0 else PUBREC, 100 + i) for i in range(10)], \
            [describe(a.raw) for a in acks]


# --- retained messages ------------------------------------------------------------------------


def test_mqtt_3_3_1_5_retained_message_stored_and_sent_to_new_subscriber(broker):
    """[MQTT-3.3.1-5] [MQTT-3.3.1-6] [MQTT-3.3.1-8] A retained PUBLISH is stored with its QoS;
    a later subscriber gets it at once after its SUBACK, with RETAIN 1, at min(stored QoS,
    granted QoS)."""
    with client(broker.port, "retpub") as p:
        p.send(publish("ret/a", b"kept", qos=1, mid=1, retain=True))
        p.expect(puback(1))
    with client(broker.port, "retsub2", subs=[("ret/#", 2)]) as s:
        m = s.recv_publish()
        assert (m.topic, m.payload, m.retain, m.qos) == ("ret/a", b"kept", True, 1)
        s.send(puback(m.mid))
    with client(broker.port, "retsub0", subs=[("ret/a", 0)]) as s:
        s.expect(publish("ret/a", b"kept", qos=0, retain=True), what="retained at granted QoS 0")
    with client(broker.port, "retpub2") as p:
        p.publish_ok("ret/b", b"kept2", qos=2, mid=2, retain=True)
    with client(broker.port, "retsub22", subs=[("ret/b", 2)]) as s:
        m = s.recv_publish()
        assert (m.topic, m.payload, m.retain, m.qos) == ("ret/b", b"kept2", True, 2), "QoS 2 not stored"
        s.send(pubrec(m.mid))
        s.expect(pubrel(m.mid))
        s.send(pubcomp(m.mid))


def test_mqtt_3_3_1_7_qos0_retained_replaces_previous(broker):
    """[MQTT-3.3.1-7] [MQTT-3.3.1-5] A new retained QoS 0 message replaces the one retained
    before on that topic: a new subscriber gets only the new one."""
    with client(broker.port, "rep-pub") as p:
        p.send(publish("rep/t", b"old", qos=1, mid=1, retain=True))
        p.expect(puback(1))
        p.send(publish("rep/t", b"new", qos=0, retain=True))
        assert p.is_open()
    with client(broker.port, "rep-sub", subs=[("rep/t", 1)]) as s:
        s.expect(publish("rep/t", b"new", qos=0, retain=True))
        s.expect_nothing(what="the old retained message is still there")


def test_mqtt_3_3_1_9_retain_flag_cleared_for_established_subscriptions(broker):
    """[MQTT-3.3.1-9] A retained PUBLISH is forwarded to an existing subscription with RETAIN 0
    (while a new subscriber gets it with RETAIN 1)."""
    with client(broker.port, "r9sub", subs=[("r9/t", 1)]) as s, client(broker.port, "r9pub") as p:
        p.send(publish("r9/t", b"live", qos=0, retain=True))
        s.expect(publish("r9/t", b"live", qos=0, retain=False))
        p.send(publish("r9/t", b"live1", qos=1, mid=2, retain=True))
        p.expect(puback(2))
        m = s.recv_publish()
        assert (m.payload, m.retain) == (b"live1", False)
        s.send(puback(m.mid))
    with client(broker.port, "r9late", subs=[("r9/t", 0)]) as s:
        s.expect(publish("r9/t", b"live1", qos=0, retain=True))


def test_mqtt_3_3_1_10_empty_retained_payload_delivered_and_clears(broker):
    """[MQTT-3.3.1-10] A retained PUBLISH with a zero-byte payload is delivered as normal to
    existing subscribers, and removes the retained message: a new subscriber gets nothing."""
    with client(broker.port, "clr-pub") as p, client(broker.port, "clr-sub", subs=[("clr/t", 0)]) as s:
        p.send(publish("clr/t", b"kept", qos=1, mid=1, retain=True))
        p.expect(puback(1))
        s.expect(publish("clr/t", b"kept"))
        p.send(publish("clr/t", b"", qos=1, mid=2, retain=True))
        p.expect(puback(2))
        s.expect(publish("clr/t", b""), what="the zero-byte message is delivered as normal")
    with client(broker.port, "clr-late", subs=[("clr/#", 0)]) as s:
        s.expect_nothing(what="the retained message was not cleared")


def test_mqtt_3_3_1_11_empty_retained_payload_not_stored(broker):
    """[MQTT-3.3.1-11] A zero-byte retained message is never itself stored as retained."""
    with client(broker.port, "e11-pub") as p:
        p.send(publish("e11/t", b"", qos=0, retain=True))
        p.send(publish("e11/u", b"", qos=1, mid=1, retain=True))
        p.expect(puback(1))
    with client(broker.port, "e11-sub", subs=[("e11/#", 1)]) as s:
        s.expect_nothing(what="a zero-byte retained message was stored")


def test_mqtt_3_3_1_12_non_retained_publish_neither_stored_nor_replacing(broker):
    """[MQTT-3.3.1-12] A PUBLISH with RETAIN 0 is not stored and does not remove or replace the
    message retained on its topic."""
    with client(broker.port, "r12-pub") as p:
        p.send(publish("r12/t", b"retained", qos=1, mid=1, retain=True))
        p.expect(puback(1))
        p.send(publish("r12/t", b"not-retained", qos=1, mid=2, retain=False))
        p.expect(puback(2))
        p.send(publish("r12/t", b"", qos=1, mid=3, retain=False))
        p.expect(puback(3))
        p.send(publish("r12/other", b"not-retained", qos=1, mid=4, retain=False))
        p.expect(puback(4))
    with client(broker.port, "r12-sub", subs=[("r12/#", 0)]) as s:
        s.expect(publish("r12/t", b"retained", retain=True))
        s.expect_nothing(what="a non-retained message was stored")


# --- packet identifiers on acknowledgements -------------------------------------------------


def test_mqtt_2_3_1_6_acks_carry_the_publish_packet_id(broker):
    """[MQTT-2.3.1-6] PUBACK, PUBREC and PUBCOMP carry the packet id of the client's PUBLISH,
    for ids across the whole 16-bit range."""
    with client(broker.port, "ackids") as p:
        for mid in (1, 0x00FF, 0x0100, 0x7FFF, 0x8000, 0xFFFF):
            p.send(publish("ackid/t", b"x", qos=1, mid=mid))
            p.expect(puback(mid))
            p.send(publish("ackid/t", b"x", qos=2, mid=mid))
            p.expect(pubrec(mid))
            p.send(pubrel(mid))
            p.expect(pubcomp(mid))


def test_mqtt_3_3_4_1_large_payload_round_trip(broker):
    """[MQTT-3.3.4-1] [MQTT-4.3.2-1] A QoS 1 message with a 2.1 MB payload (four-byte
    remaining length) is acknowledged and delivered byte for byte."""
    payload = bytes(range(256)) * 8300
    assert len(payload) > 2_097_152
    with client(broker.port, "bigsub", subs=[("big/t", 1)]) as s, client(broker.port, "bigpub") as p:
        p.send(publish("big/t", payload, qos=1, mid=77))
        p.expect(puback(77))
        m = s.recv_publish()
        assert [b >= 0x80 for b in m.raw[1:5]] == [True, True, True, False], "not a four-byte length"
        assert m.payload == payload and m.qos == 1
        s.send(puback(m.mid))
