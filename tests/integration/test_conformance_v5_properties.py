"""MQTT 5.0 conformance, section 3.3.2.3: the application properties of a PUBLISH (Payload
Format Indicator, Content Type, Response Topic, Correlation Data, User Properties) reach a 5.0
subscriber unchanged; and clients of 3.1, 3.1.1 and 5.0 share one broker, each receiving in its
own protocol (a 3.x subscriber gets a 5.0 publisher's message without properties). Black-box
over raw sockets against our broker and Mosquitto 2."""

from __future__ import annotations

import pytest

from tests.mqttraw import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MESSAGE_EXPIRY,
    PAYLOAD_FORMAT,
    RESPONSE_TOPIC,
    SUBSCRIPTION_ID,
    TOPIC_ALIAS,
    USER_PROPERTY,
    PUBACK,
    PUBCOMP,
    PUBREC,
    RawClient,
    client,
    client5,
    connack,
    connect,
    describe,
    parse_reason,
    properties,
    puback,
    publish,
    pubrel,
    suback,
    subscribe,
)

# Duplicated keys and order matter: user properties are a list, not a map [MQTT-3.3.2-18].
APP_PROPS = [
    (PAYLOAD_FORMAT, 1),
    (CONTENT_TYPE, "application/json; charset=utf-8"),
    (RESPONSE_TOPIC, "v5/reply/\u00e9t\u00e9"),
    (CORRELATION_DATA, b"\x00\xffcorr\x01"),
    (USER_PROPERTY, ("b", "2")),
    (USER_PROPERTY, ("a", "1")),
    (USER_PROPERTY, ("b", "0")),
    (USER_PROPERTY, ("", "empty key")),
]
# What a Server adds or rewrites on the way, by itself.
_SERVER_SIDE = {MESSAGE_EXPIRY, SUBSCRIPTION_ID, TOPIC_ALIAS}


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_v5_mqtt_3_3_2_application_properties_pass_unchanged(brokers, qos):
    """[MQTT-3.3.2-4] [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-17] [MQTT-3.3.2-18]
    [MQTT-3.3.2-20] [MQTT-3.3.2-3] [MQTT-3.3.4-1] [MQTT-2.2.1-5] [MQTT-3.3.1-5] Payload Format Indicator, Content Type, Response Topic, Correlation Data and
    User Properties (with a repeated key, in their order) arrive at a 5.0 subscriber exactly as
    published, at every QoS, live and as the retained message of a later subscription; the
    publisher's QoS 1/2 flow is answered with its Packet Identifier."""
    b = brokers()
    topic = f"v5/props/{qos}"
    with client5(b.port, "v5-props-sub", subs=[(topic, 2)]) as sub, client5(b.port, "v5-props-pub") as p:
        p.send(publish(topic, b'{"v": 1}', qos, 1 if qos else None, retain=True, props=properties(*APP_PROPS)))
        if qos:
            ack = p.recv_packet()
            assert (ack.type, *parse_reason(ack)[:2]) == (PUBACK if qos == 1 else PUBREC, 1, 0), describe(ack.raw)
        if qos == 2:
            p.send(pubrel(1))
            assert p.recv_packet().type == PUBCOMP
        m = sub.recv_publish5()
        assert m.payload == b'{"v": 1}'
        assert [x for x in m.props if x[0] not in _SERVER_SIDE] == APP_PROPS
        with client5(b.port, "v5-props-late", subs=[(topic, 1)]) as late:
            r = late.recv_publish5()
            assert r.retain and [x for x in r.props if x[0] not in _SERVER_SIDE] == APP_PROPS


@pytest.mark.parametrize("level", [4, 3], ids=["3.1.1", "3.1"])
def test_v5_publisher_reaches_a_v3_subscriber_without_properties(brokers, level):
    """[MQTT-3.3.2-17] (as seen from 3.x) A 3.1.1 or 3.1 subscriber receives a 5.0 publisher's
    message in its own protocol: the exact 3.x PUBLISH (topic, packet id, payload) with none of
    the properties the publisher sent; its PUBACK completes the flow."""
    b = brokers()
    name = "MQTT" if level == 4 else "MQIsdp"
    with RawClient(b.port) as sub:
        sub.send(connect("v3-sub", proto_name=name, proto_level=level))
        sub.expect(connack(0))
        sub.send(subscribe(1, [("v5/mixed", 1)]))
        sub.expect(suback(1, [1]))
        with client5(b.port, "v5-mixed-pub") as p:
            p.send(publish("v5/mixed", b"to v3", 1, 9, props=properties(*APP_PROPS, (MESSAGE_EXPIRY, 60))))
            assert parse_reason(p.recv_packet())[:2] == (9, 0)
        m = sub.recv_publish()  # read as 3.x: property bytes would show up in the payload
        assert (m.topic, m.payload, m.qos) == ("v5/mixed", b"to v3", 1)
        assert m.raw == publish("v5/mixed", b"to v3", 1, m.mid)
        sub.send(puback(m.mid))
        sub.expect_nothing()


def test_v3_publisher_reaches_a_v5_subscriber(brokers):
    """A 5.0 subscriber receives a 3.1.1 publisher's (and a 3.1 publisher's) message as a 5.0
    PUBLISH: a property block (with no application properties, as none were sent) then the
    payload."""
    b = brokers()
    with client5(b.port, "v5-from3-sub", subs=[("v5/from3/#", 1)]) as sub:
        with client(b.port, "v311-pub") as p:
            p.publish_ok("v5/from3/311", b"from 3.1.1", 1, 1)
        with client(b.port, "v31-pub", proto_name="MQIsdp", proto_level=3) as p:
            p.publish_ok("v5/from3/31", b"from 3.1", 1, 2)
        got = [sub.recv_publish5(), sub.recv_publish5()]
        for m in got:
            sub.send(puback(m.mid))
            assert [x for x in m.props if x[0] not in _SERVER_SIDE] == []
        assert sorted((m.topic, m.payload, m.qos) for m in got) == [("v5/from3/31", b"from 3.1", 1),
                                                                     ("v5/from3/311", b"from 3.1.1", 1)]
