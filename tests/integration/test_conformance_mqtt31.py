"""MQTT 3.1 ("MQIsdp", protocol level 3), which Mosquitto accepts and so do we: where it differs
from 3.1.1 on the wire. Black-box over raw sockets, against iot-broker and Mosquitto alike."""

from __future__ import annotations


from tests.mqttraw import RawClient, connack, connect


def test_mqtt31_connack_never_sets_session_present(any_broker):
    """3.1's CONNACK has no session present flag (its first byte is reserved, 0): a resumed
    session is acknowledged like a new one, while a 3.1.1 client is told it resumed."""
    for _ in range(2):
        with RawClient(any_broker) as c:
            c.send(connect("old31", clean=False, proto_name="MQIsdp", proto_level=3))
            c.expect(connack(0, session_present=False), what="3.1 CONNACK with the reserved byte 0")
            c.send(bytes((0xE0, 0)))  # DISCONNECT
    with RawClient(any_broker) as c:  # the same session, resumed by a 3.1.1 client
        c.send(connect("old31", clean=False))
        c.expect(connack(0, session_present=True), what="3.1.1 CONNACK with session present 1")
