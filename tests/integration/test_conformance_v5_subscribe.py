"""MQTT 5.0 conformance, sections 3.3.1, 3.3.4, 3.8, 3.9, 4.8: subscription options (No Local,
Retain As Published, Retain Handling), Subscription Identifiers, reason codes on
acknowledgements (0x10 no matching subscribers, 0x87 not authorised), Request Problem
Information 0, shared subscriptions. Black-box over raw sockets against our broker and
Mosquitto 2 (the `brokers` fixture)."""

from __future__ import annotations

from pathlib import Path

from tests.mqttraw import (
    DISCONNECT,
    MAXIMUM_PACKET_SIZE,
    PUBACK,
    PUBLISH,
    REASON_STRING,
    REQUEST_PROBLEM_INFO,
    SUBACK,
    SUBSCRIPTION_ID,
    TOPIC_ALIAS,
    USER_PROPERTY,
    RawClient,
    client5,
    describe,
    parse_publish,
    parse_reason,
    properties,
    props_all,
    puback,
    publish,
    pubrec,
    pubrel,
    sub_options,
    subscribe,
    unsubscribe,
)


def _publish(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    with client5(port, "") as p:
        p.send(publish(topic, payload, 1, 1, retain=retain, props=b"\x00"))
        ack = p.recv_packet()
        assert ack.type == PUBACK and parse_reason(ack)[1] < 0x80, describe(ack.raw)


def _subscribe(c: RawClient, mid: int, topics: list[tuple[str, int]], props: bytes = b"\x00") -> list[int]:
    c.send(subscribe(mid, topics, props=props))
    pkt = c.recv_packet()
    got_mid, codes, _ = parse_reason(pkt)
    assert (pkt.type, got_mid) == (SUBACK, mid), describe(pkt.raw)
    return codes


def test_v5_mqtt_3_8_3_3_no_local(brokers):
    """[MQTT-3.8.3-3] With No Local 1 a client's own messages are not forwarded to it; another
    client's message on the same topic is, and a client without No Local gets its own."""
    b = brokers()
    with client5(b.port, "v5-nl", subs=[("v5/nl", sub_options(1, no_local=True))]) as nl, \
            client5(b.port, "v5-nl-plain", subs=[("v5/nl", 1)]) as plain:
        nl.send(publish("v5/nl", b"from nl", 1, 1, props=b"\x00"))
        plain.send(publish("v5/nl", b"from plain", 1, 2, props=b"\x00"))
        # Each PINGRESP follows the handling of that client's own PUBLISH; nl last, so that
        # plain's message has been routed to it too.
        got = {"nl": nl.until_pingresp(), "plain": plain.until_pingresp()}
        got["nl"] += nl.until_pingresp()
        nl_msgs = [parse_publish(p, v5=True).payload for p in got["nl"] if p.type == PUBLISH]
        plain_msgs = sorted(parse_publish(p, v5=True).payload for p in got["plain"] if p.type == PUBLISH)
        assert nl_msgs == [b"from plain"], "No Local: own message forwarded, or the other's missing"
        assert plain_msgs == [b"from nl", b"from plain"]


def test_v5_mqtt_3_3_1_12_and_3_3_1_13_retain_as_published(brokers):
    """[MQTT-3.3.1-12] [MQTT-3.3.1-13] A message published with RETAIN 1 is forwarded to a live
    subscription with RETAIN 0 when Retain As Published is 0, and with RETAIN 1 when it is 1."""
    b = brokers()
    with client5(b.port, "v5-rap0", subs=[("v5/rap", 1)]) as rap0, \
            client5(b.port, "v5-rap1", subs=[("v5/rap", sub_options(1, retain_as_published=True))]) as rap1:
        _publish(b.port, "v5/rap", b"r", retain=True)
        m0, m1 = rap0.recv_publish5(), rap1.recv_publish5()
        assert (m0.payload, m0.retain) == (b"r", False)
        assert (m1.payload, m1.retain) == (b"r", True)
        rap0.send(puback(m0.mid))
        rap1.send(puback(m1.mid))


def test_v5_mqtt_3_3_1_9_to_3_3_1_11_retain_handling(brokers):
    """[MQTT-3.3.1-9] [MQTT-3.3.1-10] [MQTT-3.3.1-11] [MQTT-3.8.4-4] [MQTT-3.8.4-3] [MQTT-3.8.4-1]
    [MQTT-3.8.4-2] [MQTT-2.2.1-6] Retain Handling 0 sends
    the retained message at every subscribe (also when the subscription is replaced), 1 only
    when the subscription is new, 2 never; retained messages sent because of a subscribe come
    with RETAIN 1. Each SUBSCRIBE gets its SUBACK with its Packet Identifier."""
    b = brokers()
    _publish(b.port, "v5/rh", b"kept", retain=True)

    def retained_after(c: RawClient, mid: int, handling: int) -> list[bytes]:
        assert _subscribe(c, mid, [("v5/rh", sub_options(1, retain_handling=handling))]) == [1]
        got = []
        for pkt in c.until_pingresp():
            m = parse_publish(pkt, v5=True)
            assert m.retain, f"a retained message sent at subscribe with RETAIN 0: {describe(pkt.raw)}"
            got.append(m.payload)
            c.send(puback(m.mid))
        return got

    with client5(b.port, "v5-rh0") as c:
        assert retained_after(c, 1, 0) == [b"kept"], "Retain Handling 0, new subscription"
        assert retained_after(c, 2, 0) == [b"kept"], "Retain Handling 0, replaced subscription"
    with client5(b.port, "v5-rh1") as c:
        assert retained_after(c, 1, 1) == [b"kept"], "Retain Handling 1, new subscription"
        assert retained_after(c, 2, 1) == [], "Retain Handling 1, existing subscription"
    with client5(b.port, "v5-rh2") as c:
        assert retained_after(c, 1, 2) == [], "Retain Handling 2"


def test_v5_mqtt_3_3_4_3_subscription_identifiers(brokers):
    """[MQTT-3.3.4-3] [MQTT-3.3.4-4] A message matching subscriptions made with
    Subscription Identifiers 7 and 300 (a two-byte Variable Byte Integer) carries both: in one
    copy, or one in each copy; one matching a subscription without an identifier carries none."""
    b = brokers()
    with client5(b.port, "v5-sid") as c:
        assert _subscribe(c, 1, [("v5/sid/#", 1)], properties((SUBSCRIPTION_ID, 7))) == [1]
        assert _subscribe(c, 2, [("v5/sid/+", 1)], properties((SUBSCRIPTION_ID, 300))) == [1]
        assert _subscribe(c, 3, [("v5/plain", 1)]) == [1]
        _publish(b.port, "v5/sid/a", b"both")
        _publish(b.port, "v5/plain", b"none")
        got = [parse_publish(p, v5=True) for p in c.until_pingresp()]
        for m in got:
            c.send(puback(m.mid))
        ids = [props_all(m.props, SUBSCRIPTION_ID) for m in got if m.payload == b"both"]
        # One copy with both identifiers, or a copy per subscription with its own.
        assert sorted(map(sorted, ids)) in ([[7, 300]], [[7], [300]]), f"Subscription Identifiers per copy: {ids}"
        plain = [m for m in got if m.payload == b"none"]
        assert len(plain) == 1 and props_all(plain[0].props, SUBSCRIPTION_ID) == []


def test_v5_puback_0x10_no_matching_subscribers(brokers):
    """[MQTT-3.4.2-1] The Server may tell a publisher that no one subscribes: PUBACK reason 0x10
    No matching subscribers for a topic without subscribers, 0x00 for one with a subscriber.
    (PUBREC may say 0x10 as well; Mosquitto 2.0.11 says 0x00 there, so it is not asserted.)"""
    b = brokers()
    with client5(b.port, "v5-nms-sub", subs=[("v5/nms/taken", 0)]), client5(b.port, "v5-nms") as p:
        p.send(publish("v5/nms/nobody", b"x", 1, 1, props=b"\x00"))
        p.send(publish("v5/nms/taken", b"x", 1, 2, props=b"\x00"))
        got = [(pkt.type, *parse_reason(pkt)[:2]) for pkt in (p.recv_packet(), p.recv_packet())]
        assert got == [(PUBACK, 1, 0x10), (PUBACK, 2, 0x00)]


ACL = "topic readwrite v5/open/#\ntopic read v5/ro/#\n"


def _acl_brokers(brokers, tmp_path: Path):
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    return brokers(ours=f'allow_anonymous = true\nacl_file = "{acl}"\n',
                   mosquitto=f"allow_anonymous true\nacl_file {acl}\n")


def test_v5_reason_0x87_not_authorised_on_puback(brokers, tmp_path):
    """[MQTT-3.4.2-1] A QoS 1 PUBLISH the ACL does not allow is answered with
    PUBACK 0x87 Not authorized (the connection stays open) and not delivered; an allowed one
    gets 0x00 and is delivered."""
    b = _acl_brokers(brokers, tmp_path)
    with client5(b.port, "v5-acl-sub", subs=[("v5/#", 1)]) as sub, client5(b.port, "v5-acl-pub") as p:
        p.send(publish("v5/ro/x", b"denied", 1, 1, props=b"\x00"))
        p.send(publish("v5/open/x", b"allowed", 1, 2, props=b"\x00"))
        got = [(pkt.type, *parse_reason(pkt)[:2]) for pkt in (p.recv_packet(), p.recv_packet())]
        assert got == [(PUBACK, 1, 0x87), (PUBACK, 2, 0x00)]
        assert [m.payload for m in (parse_publish(x, v5=True) for x in sub.until_pingresp())] == [b"allowed"]


def test_v5_reason_0x87_not_authorised_on_suback(brokers, mosquitto_deviates, tmp_path):
    """[MQTT-3.8.4-5] [MQTT-3.8.4-6] [MQTT-3.8.4-7] [MQTT-3.9.3-1] [MQTT-3.9.3-2] A filter the ACL gives no read access to is
    refused in the SUBACK with 0x87 Not authorized, beside a granted one, one code per filter in
    their order."""
    mosquitto_deviates("grants every SUBSCRIBE and checks read access per message as it delivers")
    b = _acl_brokers(brokers, tmp_path)
    with client5(b.port, "v5-acl-s") as c:
        assert _subscribe(c, 1, [("v5/open/#", 1), ("v5/secret/#", 1)]) == [1, 0x87]


def test_v5_mqtt_3_1_2_29_request_problem_information_0(brokers, tmp_path):
    """[MQTT-3.1.2-29] A Client that set Request Problem Information 0 gets no Reason String and
    no User Property on anything but PUBLISH, CONNACK and DISCONNECT: here on the PUBACKs and
    SUBACK of refused and accepted requests."""
    b = _acl_brokers(brokers, tmp_path)
    with client5(b.port, "v5-rpi", props=properties((REQUEST_PROBLEM_INFO, 0))) as c:
        c.send(subscribe(1, [("v5/open/#", 1), ("v5/secret/#", 1)], props=b"\x00"))
        c.send(publish("v5/ro/x", b"denied", 1, 2, props=b"\x00"))
        c.send(publish("v5/nobody/x", b"nobody", 1, 3, props=b"\x00"))
        for pkt in [c.recv_packet() for _ in range(3)] + c.until_pingresp():
            if pkt.type == PUBLISH:
                continue
            props = parse_reason(pkt)[2]
            assert not [i for i, _ in props if i in (REASON_STRING, USER_PROPERTY)], \
                f"Reason String or User Property despite Request Problem Information 0: {describe(pkt.raw)}"


def test_v5_mqtt_4_8_2_shared_subscription(brokers):
    """[MQTT-4.8.2-1] [MQTT-4.8.2-2] [MQTT-4.8.2-3] [MQTT-3.8.4-8] Two v5 clients in one share group
    ($share/g/v5/shared) each get some of 20 QoS 1 messages and together every one exactly once,
    each at the QoS its own subscription was granted (1 and 0); a plain subscriber gets all 20."""
    b = brokers()
    with client5(b.port, "v5-sh-1", subs=[("$share/g/v5/shared", 1)]) as s1, \
            client5(b.port, "v5-sh-2", subs=[("$share/g/v5/shared", 0)]) as s2, \
            client5(b.port, "v5-sh-all", subs=[("v5/shared", 1)]) as everyone:
        with client5(b.port, "v5-sh-pub") as p:
            for mid in range(1, 21):
                p.send(publish("v5/shared", b"%d" % mid, 1, mid, props=b"\x00"))
            assert sorted(parse_reason(p.recv_packet())[0] for _ in range(20)) == list(range(1, 21))
        shares = []
        for c in (s1, s2, everyone):
            got: list[bytes] = []
            while len(got) < 20:
                batch = [parse_publish(x, v5=True) for x in c.until_pingresp()]
                assert {m.qos for m in batch} <= {0 if c is s2 else 1}, "delivered above the granted QoS"
                for m in batch:
                    if m.qos:
                        c.send(puback(m.mid))
                got += [m.payload for m in batch]
                if not batch or c is not everyone:
                    break
            shares.append(got)
        assert sorted(shares[0] + shares[1], key=int) == [b"%d" % i for i in range(1, 21)]
        assert shares[0] and shares[1], f"one group member got everything: {[len(s) for s in shares[:2]]}"
        assert len(shares[2]) == 20


def test_v5_no_reason_string_or_user_property_beyond_the_maximum_packet_size(brokers, tmp_path):
    """[MQTT-3.1.2-24] [MQTT-3.2.2-19] [MQTT-3.2.2-20] [MQTT-3.4.2-2] [MQTT-3.4.2-3]
    [MQTT-3.5.2-2] [MQTT-3.5.2-3] [MQTT-3.6.2-2] [MQTT-3.6.2-3] [MQTT-3.7.2-2] [MQTT-3.7.2-3]
    [MQTT-3.9.2-1] [MQTT-3.9.2-2] [MQTT-3.11.2-1] [MQTT-3.11.2-2] [MQTT-3.14.2-3] [MQTT-3.14.2-4]
    A Client with Maximum Packet Size 48 still gets every acknowledgement, refusals included
    (SUBACK 0x87, PUBACK and PUBREC 0x87, PUBACK 0x10, UNSUBACK for no subscription, PUBCOMP for
    an unknown packet id, PUBREL of a delivery) and the DISCONNECT for its error, each within 48
    bytes: a Reason String or User Property that does not fit is left out, not the packet."""
    b = _acl_brokers(brokers, tmp_path)
    limit = properties((MAXIMUM_PACKET_SIZE, 48))
    with client5(b.port, "v5-small-pub") as p, RawClient(b.port) as c:
        c.connect5_ok("v5-small", props=limit)
        c.send(subscribe(1, [("v5/open/#", 2), ("v5/secret/#", 1)], props=b"\x00"))
        c.send(publish("v5/ro/x", b"denied", 1, 2, props=b"\x00"))
        c.send(publish("v5/ro/y", b"denied", 2, 3, props=b"\x00"))
        c.send(publish("v5/nobody/x", b"nobody", 1, 4, props=b"\x00"))
        c.send(unsubscribe(5, ["v5/never/subscribed"], props=b"\x00"))
        c.send(pubrel(77))
        expected = {SUBACK: 1, PUBACK: 2, 5: 1, 11: 1, 7: 1}  # SUBACK, PUBACKs, PUBREC, UNSUBACK, PUBCOMP
        got = [c.recv_packet() for _ in range(sum(expected.values()))]
        assert sorted(pkt.type for pkt in got) == sorted(t for t, n in expected.items() for _ in range(n)), \
            [describe(pkt.raw) for pkt in got]
        p.send(publish("v5/open/q2", b"two", 2, 1, props=b"\x00"))
        assert p.recv_packet().type == 5  # PUBREC; a broker may hold the message until the PUBREL
        p.send(pubrel(1))
        m = c.recv_publish5()
        c.send(pubrec(m.mid))
        got.append(c.recv_packet())  # the PUBREL
        c.send(publish("v5/open/x", b"x", 0, props=properties((TOPIC_ALIAS, 0xFFFF))))  # an error: DISCONNECT
        got.append(c.recv_packet())
        assert got[-1].type == DISCONNECT, describe(got[-1].raw)
        too_big = [describe(pkt.raw) for pkt in got if len(pkt.raw) > 48]
        assert not too_big, f"packets over the client's Maximum Packet Size 48: {too_big}"
