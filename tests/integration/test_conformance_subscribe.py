"""MQTT 3.1.1 conformance, sections 3.8-3.13: SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK and
PINGREQ/PINGRESP, black-box against a real iot-broker."""

from __future__ import annotations

from tests.mqttraw import (
    assert_serves_new_client,
    check_each,
    client,
    pingreq,
    pingresp,
    publish,
    puback,
    pubcomp,
    pubrec,
    pubrel,
    string,
    frame,
    u16,
    suback,
    subscribe,
    unsuback,
    unsubscribe,
)

# --- SUBSCRIBE ----------------------------------------------------------------------------------


def test_mqtt_3_8_4_1_suback_with_same_packet_id(broker):
    """[MQTT-3.8.4-1] [MQTT-3.8.4-2] [MQTT-2.3.1-7] Every SUBSCRIBE is answered by a SUBACK
    carrying the SUBSCRIBE's packet id."""
    with client(broker.port, "subid") as c:
        for mid in (1, 0x0102, 0xBEEF, 0xFFFF):
            c.send(subscribe(mid, [(f"sid/{mid}", 1)]))
            c.expect(suback(mid, [1]))


def test_mqtt_3_8_4_4_several_filters_one_suback_codes_in_order(broker):
    """[MQTT-3.8.4-4] [MQTT-3.8.4-5] [MQTT-3.9.3-1] [MQTT-3.9.3-2] A SUBSCRIBE with several
    filters gets one SUBACK with one return code per filter, in the filters' order, each the
    granted QoS (0x00-0x02); and each subscription is in effect."""
    with client(broker.port, "multi") as c, client(broker.port, "multipub") as p:
        c.send(subscribe(42, [("mf/two", 2), ("mf/zero", 0), ("mf/one", 1), ("mf/+/w", 0)]))
        c.expect(suback(42, [2, 0, 1, 0]))
        for topic, qos in (("mf/two", 2), ("mf/zero", 0), ("mf/one", 1), ("mf/x/w", 0)):
            p.send(publish(topic, topic.encode(), qos=qos, mid=1 if qos else None))
            if qos == 1:
                p.expect(puback(1))
            elif qos == 2:
                p.expect(pubrec(1))
                p.send(pubrel(1))
                p.expect(pubcomp(1))
            m = c.recv_publish()
            assert (m.topic, m.qos) == (topic, qos)
            if qos == 1:
                c.send(puback(m.mid))
            elif qos == 2:
                c.send(pubrec(m.mid))
                c.expect(pubrel(m.mid))
                c.send(pubcomp(m.mid))
        # 200 filters: the SUBACK's remaining length (202) needs a two-byte encoding
        many = [(f"mf/many/{i}", i % 3) for i in range(200)]
        c.send(subscribe(43, many))
        c.expect(suback(43, [q for _, q in many]), what="SUBACK for 200 filters")


def test_mqtt_3_8_3_2_wildcard_filters_supported(broker):
    """[MQTT-3.8.3-2] iot-broker supports wildcard filters: a SUBSCRIBE with '+' and '#' is
    granted (not 0x80) and delivers matching messages."""
    with client(broker.port, "wcs") as c, client(broker.port, "wcspub") as p:
        c.send(subscribe(1, [("wc/+/x", 1), ("wd/#", 0)]))
        c.expect(suback(1, [1, 0]))
        p.send(publish("wc/a/x", b"1"))
        p.send(publish("wd/a/b/c", b"2"))
        assert sorted(c.recv_publish().payload for _ in range(2)) == [b"1", b"2"]


def test_mqtt_3_8_1_1_subscribe_reserved_flags_close(broker):
    """[MQTT-3.8.1-1] [MQTT-2.2.2-1] [MQTT-2.2.2-2] SUBSCRIBE fixed-header flags other than
    0010 are malformed: the connection is closed without a SUBACK."""

    def check(flags):
        with client(broker.port, "subflags") as c:
            c.send(subscribe(1, [("sf/t", 0)], flags=flags))
            c.expect_closed()

    check_each([0x0, 0x1, 0x3, 0x6, 0xA, 0xF], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_8_3_4_requested_qos_reserved_bits_close(broker):
    """[MQTT-3.8.3-4] A requested QoS byte of 3, or with any reserved bit set, is malformed:
    the connection is closed without a SUBACK."""

    def check(qos_byte):
        with client(broker.port, "subqos") as c:
            c.send(subscribe(1, [("sq/ok", 1), ("sq/t", qos_byte)]))
            c.expect_closed()

    check_each([0x03, 0x04, 0x80, 0x81, 0xFC, 0xFF], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_8_3_3_subscribe_without_filters_closes(broker):
    """[MQTT-3.8.3-3] [MQTT-4.8.0-1] A SUBSCRIBE with no Topic Filter/QoS pair is a protocol
    violation: the connection is closed."""
    with client(broker.port, "subempty") as c:
        c.send(frame(0x82, u16(1)))
        c.expect_closed()
    assert_serves_new_client(broker.port)


def test_mqtt_4_7_1_2_invalid_topic_filters_close(broker):
    """[MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-4.7.3-1] [MQTT-4.7.3-2] A filter where '#' is not a
    whole last level, '+' is not a whole level, or which is empty or holds U+0000, closes the
    connection (no SUBACK)."""

    def check(bad):
        with client(broker.port, "badfilter") as c:
            c.send(subscribe(1, [(bad, 0)]))
            c.expect_closed()

    check_each(["a/#/b", "a#", "#/a", "a/b#", "a+", "+a/b", "a/+b", "a/b+/c", "", "a/\x00b"], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_8_4_3_resubscribe_replaces_and_resends_retained(broker):
    """[MQTT-3.8.4-3] Subscribing again to an identical filter replaces the subscription: the
    new maximum QoS applies, there is still one subscription (one copy per message), the
    retained message is sent again, and publications keep flowing."""
    with client(broker.port, "resub-pub") as p, client(broker.port, "resub") as c:
        p.send(publish("rs/t", b"retained", qos=1, mid=1, retain=True))
        p.expect(puback(1))
        c.send(subscribe(1, [("rs/t", 1)]))
        c.expect(suback(1, [1]))
        m = c.recv_publish()
        assert (m.payload, m.retain, m.qos) == (b"retained", True, 1)
        c.send(puback(m.mid))
        p.send(publish("rs/t", b"before", qos=1, mid=2))
        p.expect(puback(2))
        m = c.recv_publish()
        assert (m.payload, m.qos, m.retain) == (b"before", 1, False)
        c.send(puback(m.mid))

        c.send(subscribe(2, [("rs/t", 0)]))
        c.expect(suback(2, [0]))
        c.expect(publish("rs/t", b"retained", qos=0, retain=True), what="retained message re-sent at the new QoS")
        p.send(publish("rs/t", b"after", qos=1, mid=3))
        p.expect(puback(3))
        c.expect(publish("rs/t", b"after", qos=0), what="delivered once, at the replaced QoS 0")
        c.expect_nothing(what="the old subscription still exists")


def test_mqtt_3_8_4_6_delivery_qos_is_min_of_published_and_granted(broker):
    """[MQTT-3.8.4-6] A message goes out at min(published QoS, granted QoS), for every pair."""
    with client(broker.port, "dq-pub") as p:
        for granted in (0, 1, 2):
            with client(broker.port, f"dq-sub{granted}", subs=[(f"dq/{granted}", granted)]) as s:
                for published in (0, 1, 2):
                    mid = 10 * granted + published + 1
                    p.send(publish(f"dq/{granted}", b"%d" % published, qos=published,
                                   mid=mid if published else None))
                    if published == 1:
                        p.expect(puback(mid))
                    elif published == 2:
                        p.expect(pubrec(mid))
                        p.send(pubrel(mid))
                        p.expect(pubcomp(mid))
                    m = s.recv_publish()
                    want = min(granted, published)
                    assert (m.payload, m.qos) == (b"%d" % published, want), \
                        f"granted {granted}, published {published}: delivered at QoS {m.qos}, want {want}"
                    if m.qos == 0:
                        assert m.mid is None
                    elif m.qos == 1:
                        s.send(puback(m.mid))
                    else:
                        s.send(pubrec(m.mid))
                        s.expect(pubrel(m.mid))
                        s.send(pubcomp(m.mid))


# --- UNSUBSCRIBE --------------------------------------------------------------------------------


def test_mqtt_3_10_4_4_unsuback_with_same_packet_id(broker):
    """[MQTT-3.10.4-4] [MQTT-2.3.1-7] An UNSUBSCRIBE is answered by an UNSUBACK with its packet
    id."""
    with client(broker.port, "unsid", subs=[("us/a", 0)]) as c:
        for mid in (7, 0x1234, 0xFFFF):
            c.send(unsubscribe(mid, ["us/a"]))
            c.expect(unsuback(mid))


def test_mqtt_3_10_4_5_unsuback_when_nothing_matched(broker):
    """[MQTT-3.10.4-5] Even when no subscription is deleted, the broker answers UNSUBACK."""
    with client(broker.port, "unsnone") as c:
        c.send(unsubscribe(3, ["never/subscribed", "x/#"]))
        c.expect(unsuback(3))
        assert c.is_open()


def test_mqtt_3_10_4_2_messages_stop_after_unsubscribe(broker):
    """[MQTT-3.10.4-2] After UNSUBACK the broker adds no new messages for the deleted
    subscription."""
    with client(broker.port, "unsstop", subs=[("stop/t", 1)]) as c, client(broker.port, "unsstoppub") as p:
        p.send(publish("stop/t", b"before"))
        assert c.recv_publish().payload == b"before"
        c.send(unsubscribe(5, ["stop/t"]))
        c.expect(unsuback(5))
        p.send(publish("stop/t", b"after", qos=1, mid=1))
        p.expect(puback(1))
        c.expect_nothing(what="message delivered after UNSUBSCRIBE")


def test_mqtt_3_10_4_1_unsubscribe_compares_filters_exactly(broker):
    """[MQTT-3.10.4-1] UNSUBSCRIBE filters are compared character by character with the
    client's filters: 'uf/a' does not remove 'uf/+', 'uf/#' does not remove 'uf/+', and
    'uf/+' does."""
    with client(broker.port, "unsexact", subs=[("uf/+", 0)]) as c, client(broker.port, "unsexactpub") as p:
        c.send(unsubscribe(1, ["uf/a", "uf/#", "UF/+", "uf/+/"]))
        c.expect(unsuback(1))
        p.send(publish("uf/a", b"still"))
        assert c.recv_publish().payload == b"still", "a non-identical filter removed the subscription"
        c.send(unsubscribe(2, ["uf/+"]))
        c.expect(unsuback(2))
        p.send(publish("uf/a", b"gone"))
        assert p.is_open()  # the broker has handled the QoS 0 PUBLISH
        c.expect_nothing(what="identical filter did not remove the subscription")


def test_mqtt_3_10_4_6_several_filters_one_unsuback(broker):
    """[MQTT-3.10.4-6] An UNSUBSCRIBE with several filters is handled as a sequence and
    answered by exactly one UNSUBACK; all the named subscriptions are gone, others stay."""
    with client(broker.port, "unsmulti", subs=[("um/a", 0), ("um/b", 0), ("um/c", 0)]) as c, \
            client(broker.port, "unsmultipub") as p:
        c.send(unsubscribe(9, ["um/a", "um/none", "um/b"]))
        c.expect(unsuback(9))
        for t in ("um/a", "um/b", "um/c"):
            p.send(publish(t, t.encode()))
        m = c.recv_publish()
        assert m.topic == "um/c"
        c.expect_nothing(what="a second UNSUBACK or a message for a removed filter")


def test_mqtt_3_10_4_3_inflight_delivery_completed_after_unsubscribe(broker):
    """[MQTT-3.10.4-3] QoS 1/2 deliveries started before UNSUBSCRIBE are completed: PUBREC
    for the in-flight QoS 2 message still gets its PUBREL."""
    with client(broker.port, "unsinfl", subs=[("ui/t", 2)]) as c, client(broker.port, "unsinflpub") as p:
        p.publish_ok("ui/t", b"q2", qos=2, mid=1)
        m = c.recv_publish()
        assert m.qos == 2
        c.send(unsubscribe(4, ["ui/t"]))
        c.expect(unsuback(4))
        c.send(pubrec(m.mid))
        c.expect(pubrel(m.mid), what="QoS 2 flow abandoned after UNSUBSCRIBE")
        c.send(pubcomp(m.mid))
        assert c.is_open()


def test_mqtt_3_10_1_1_unsubscribe_reserved_flags_close(broker):
    """[MQTT-3.10.1-1] [MQTT-2.2.2-2] UNSUBSCRIBE fixed-header flags other than 0010 are
    malformed: the connection is closed without an UNSUBACK."""

    def check(flags):
        with client(broker.port, "unsflags", subs=[("uflags/t", 0)]) as c:
            c.send(unsubscribe(1, ["uflags/t"], flags=flags))
            c.expect_closed()

    check_each([0x0, 0x1, 0x3, 0x8, 0xF], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_10_3_2_unsubscribe_without_filters_closes(broker):
    """[MQTT-3.10.3-2] [MQTT-4.8.0-1] An UNSUBSCRIBE with no Topic Filter is a protocol
    violation: the connection is closed."""
    with client(broker.port, "unsempty") as c:
        c.send(frame(0xA2, u16(1)))
        c.expect_closed()
    assert_serves_new_client(broker.port)


def test_mqtt_2_3_1_1_subscribe_unsubscribe_packet_id_zero_closes(broker):
    """[MQTT-2.3.1-1] SUBSCRIBE and UNSUBSCRIBE must carry a non-zero packet id; id 0 closes."""

    def check(pkt):
        with client(broker.port, "sid0") as c:
            c.send(pkt)
            c.expect_closed()

    check_each([subscribe(0, [("z/t", 0)]), unsubscribe(0, ["z/t"]),
                frame(0x82, u16(0) + string("z/t") + b"\x01")], check)
    assert_serves_new_client(broker.port)


# --- PINGREQ ------------------------------------------------------------------------------------


def test_mqtt_3_12_4_1_pingreq_answered_with_pingresp(broker):
    """[MQTT-3.12.4-1] Each PINGREQ gets a PINGRESP (d0 00), also several in one segment."""
    with client(broker.port, "pinger") as c:
        c.send(pingreq())
        c.expect(pingresp())
        c.send(pingreq() * 3)
        c.expect(pingresp() * 3)
