"""MQTT 3.1.1 conformance, sections 3.1.2.5-3.1.2.7 and 3.14: the Will Message and
DISCONNECT, black-box against a real iot-broker."""

from __future__ import annotations

from tests.mqttraw import (
    RawClient,
    Will,
    assert_serves_new_client,
    check_each,
    client,
    disconnect,
    publish,
    puback,
)


def test_mqtt_3_1_2_8_will_published_when_connection_drops(broker):
    """[MQTT-3.1.2-8] [MQTT-3.1.2-16] [MQTT-3.1.2-10] The will is published when the network
    connection closes without DISCONNECT, to existing subscribers, at its QoS, as a
    non-retained message (RETAIN 0), exactly once; a will with Will Retain 0 is not retained."""
    with client(broker.port, "w8sub", subs=[("will8/#", 1)]) as s:
        c = client(broker.port, "w8", will=Will("will8/gone", b"w8 died", qos=1, retain=False))
        c.close()  # network failure as seen by the broker
        m = s.recv_publish()
        assert (m.topic, m.payload, m.qos, m.retain) == ("will8/gone", b"w8 died", 1, False)
        s.send(puback(m.mid))
        s.expect_nothing(what="the will was published twice")
    with client(broker.port, "w8late", subs=[("will8/#", 1)]) as late:
        late.expect_nothing(what="a will with Will Retain 0 was retained")


def test_mqtt_3_1_2_17_will_retain_published_as_retained(broker):
    """[MQTT-3.1.2-17] [MQTT-3.3.1-9] A will with Will Retain 1 is published as a retained
    message: existing subscribers get it (RETAIN 0 on an established subscription), and a
    later subscriber gets it with RETAIN 1."""
    with client(broker.port, "w17sub", subs=[("will17/#", 0)]) as s:
        c = client(broker.port, "w17", will=Will("will17/status", b"offline", qos=0, retain=True))
        c.close()
        s.expect(publish("will17/status", b"offline", qos=0, retain=False))
    with client(broker.port, "w17late", subs=[("will17/#", 0)]) as late:
        late.expect(publish("will17/status", b"offline", qos=0, retain=True))


def test_mqtt_3_14_4_3_disconnect_discards_will(broker):
    """[MQTT-3.14.4-3] [MQTT-3.1.2-10] [MQTT-3.1.2-8] After DISCONNECT the broker closes the
    connection and does not publish the will (neither then nor as retained later)."""
    with client(broker.port, "w14sub", subs=[("will14/#", 0)]) as s:
        c = client(broker.port, "w14", will=Will("will14/gone", b"x", qos=0, retain=True))
        c.send(disconnect())
        c.expect_closed(what="the broker closes after DISCONNECT")
        c.close()
        s.expect_nothing(what="the will was published after DISCONNECT")
    with client(broker.port, "w14late", subs=[("will14/#", 0)]) as late:
        late.expect_nothing(what="the discarded will was retained")


def test_mqtt_3_1_2_12_no_will_flag_nothing_published(broker):
    """[MQTT-3.1.2-12] A client connected without the Will Flag publishes nothing when its
    connection drops."""
    with client(broker.port, "w12sub", subs=[("#", 0)]) as s:
        c = client(broker.port, "w12")
        c.close()
        # The broker notices a close on its own time, so a marker: a client with a will, dropped
        # once it has its CONNACK. c's FIN reached the broker before the marker's CONNECT, so
        # c's close is handled before the marker's: anything published for c would reach s
        # before the marker's will.
        marker = client(broker.port, "w12-marker", will=Will("w12/marker", b"m"))
        marker.close()
        s.expect(publish("w12/marker", b"m"), what="a message appeared for a client without a will")


def test_mqtt_3_1_2_8_will_published_on_protocol_error(broker):
    """[MQTT-3.1.2-8] [MQTT-4.8.0-1] A connection closed by the broker for a protocol violation
    (here a malformed packet) is not a DISCONNECT: its will is published."""
    with client(broker.port, "wpsub", subs=[("willp/#", 0)]) as s:
        c = client(broker.port, "wp", will=Will("willp/gone", b"violated"))
        c.send(b"\x40\x03\x00\x01\x00")  # PUBACK with a wrong remaining length
        c.expect_closed()
        s.expect(publish("willp/gone", b"violated"))


def test_mqtt_3_14_1_1_disconnect_reserved_bits_close(broker):
    """[MQTT-3.14.1-1] [MQTT-2.2.2-2] [MQTT-3.1.2-8] A DISCONNECT with non-zero reserved bits
    (or a body) is invalid: the connection is closed, and since no valid DISCONNECT arrived,
    the will is published."""
    with client(broker.port, "wdsub", subs=[("willd/#", 0)]) as s:

        def check(bad):
            c = client(broker.port, f"wd{bad.hex()}", will=Will(f"willd/{bad.hex()}", b"w"))
            c.send(bad)
            c.expect_closed()
            c.close()
            s.expect(publish(f"willd/{bad.hex()}", b"w"), what="will not published")

        check_each([b"\xe1\x00", b"\xe2\x00", b"\xe8\x00", b"\xef\x00", b"\xe0\x01\x00"], check)
    assert_serves_new_client(broker.port)


def test_mqtt_3_1_2_8_will_published_on_takeover(broker):
    """[MQTT-3.1.2-8] [MQTT-3.1.2-10] [MQTT-3.1.4-2] When a new connection with the same client
    id takes over, the old network connection is closed without DISCONNECT and its will is
    published once; the new connection's DISCONNECT then publishes nothing."""
    with client(broker.port, "wtsub", subs=[("willt/#", 0)]) as s:
        old = client(broker.port, "wt", will=Will("willt/old", b"old"))
        with RawClient(broker.port) as new:
            new.connect_ok("wt")
            old.expect_closed()
            s.expect(publish("willt/old", b"old"))
            new.send(disconnect())
            new.expect_closed()
        old.close()
        s.expect_nothing(what="a will was published again")
