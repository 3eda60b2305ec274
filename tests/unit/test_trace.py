"""The packet trace's wording (daemons.broker.trace) against Mosquitto 2.0.11's, line by line.

Each expected line is one Mosquitto 2.0.11 printed with `mosquitto -v` for the same packet
(timestamps stripped); tests/integration/test_broker_trace.py runs both brokers side by side."""

from __future__ import annotations

import pytest

from daemons.broker import trace
from daemons.broker.packets import (
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    InvalidTopic,
    MalformedPacket,
    PacketTooLarge,
    Pingreq,
    Pingresp,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    UnacceptableProtocol,
    Unsuback,
    Unsubscribe,
    Will,
)


@pytest.mark.parametrize(("pkt", "line"), [
    (Publish("sensor/data", b"1234567", 1, False, False, 1),
     "Received PUBLISH from plc-1 (d0, q1, r0, m1, 'sensor/data', ... (7 bytes))"),
    (Publish("sensor/data", b"12345", 2, True, False, 1),
     "Received PUBLISH from plc-1 (d0, q2, r1, m1, 'sensor/data', ... (5 bytes))"),
    (Publish("t/d", b"dup", 1, False, True, 11), "Received PUBLISH from plc-1 (d1, q1, r0, m11, 't/d', ... (3 bytes))"),
    (Publish("sensor/x", b"", 0), "Received PUBLISH from plc-1 (d0, q0, r0, m0, 'sensor/x', ... (0 bytes))"),
    (Puback(1), "Received PUBACK from plc-1 (Mid: 1, RC:0)"),
    (Pubrec(2), "Received PUBREC from plc-1 (Mid: 2)"),
    (Pubrel(1), "Received PUBREL from plc-1 (Mid: 1)"),
    (Pubcomp(2), "Received PUBCOMP from plc-1 (Mid: 2, RC:0)"),
    (Subscribe(1, (("sensor/#", 2),)), "Received SUBSCRIBE from plc-1"),
    (Unsubscribe(2, ("sensor/#",)), "Received UNSUBSCRIBE from plc-1"),
    (Pingreq(), "Received PINGREQ from plc-1"),
    (Disconnect(), "Received DISCONNECT from plc-1"),
])
def test_received_packets(pkt, line):
    assert trace.received("plc-1", pkt) == line


def test_connect_has_no_received_line_of_its_own():
    assert trace.received("-", Connect("plc-1")) is None  # "New client connected ..." stands for it


@pytest.mark.parametrize(("pkt", "line"), [
    (Connack(False, ConnackCode.ACCEPTED), "Sending CONNACK to dbsub (0, 0)"),
    (Connack(True, ConnackCode.ACCEPTED), "Sending CONNACK to dbsub (1, 0)"),
    (Connack(False, ConnackCode.NOT_AUTHORIZED), "Sending CONNACK to dbsub (0, 5)"),
    (Publish("sensor/data", b"1234567", 1, False, False, 1),
     "Sending PUBLISH to dbsub (d0, q1, r0, m1, 'sensor/data', ... (7 bytes))"),
    (Publish("sensor/r", b"retained", 1, True, False, 1),
     "Sending PUBLISH to dbsub (d0, q1, r1, m1, 'sensor/r', ... (8 bytes))"),
    (Publish("sensor/x", b"x", 0), "Sending PUBLISH to dbsub (d0, q0, r0, m0, 'sensor/x', ... (1 bytes))"),
    (Puback(1), "Sending PUBACK to dbsub (m1, rc0)"),
    (Pubrec(1), "Sending PUBREC to dbsub (m1, rc0)"),
    (Pubrel(2), "Sending PUBREL to dbsub (m2)"),
    (Pubcomp(1), "Sending PUBCOMP to dbsub (m1)"),
    (Suback(1, (2, 0x80)), "Sending SUBACK to dbsub"),
    (Unsuback(2), "Sending UNSUBACK to dbsub"),
    (Pingresp(), "Sending PINGRESP to dbsub"),
])
def test_sent_packets(pkt, line):
    assert trace.sent("dbsub", pkt) == line


def test_subscribe_and_unsubscribe_filter_lines():
    assert trace.subscribe_filter("sensor/#", 2) == "\tsensor/# (QoS 2)"
    assert trace.subscribed("dbsub", 2, "sensor/#") == "dbsub 2 sensor/#"
    assert trace.unsubscribe_filter("other/+") == "\tother/+"
    assert trace.unsubscribed("dbsub", "other/+") == "dbsub other/+"


def test_connection_lines():
    assert trace.new_connection("127.0.0.1:35020", 18830) == "New connection from 127.0.0.1:35020 on port 18830."
    assert (trace.new_client("127.0.0.1:35020", "dbsub", Connect("dbsub", clean_session=False), None)
            == "New client connected from 127.0.0.1:35020 as dbsub (p2, c0, k60).")
    assert (trace.new_client("127.0.0.1:35056", "plc-3", Connect("plc-3", keep_alive=0), "bob")
            == "New client connected from 127.0.0.1:35056 as plc-3 (p2, c1, k0, u'bob').")
    mqtt31 = Connect("old31", protocol_name="MQIsdp", protocol_level=3)
    assert (trace.new_client("::1:40000", "old31", mqtt31, None)
            == "New client connected from ::1:40000 as old31 (p1, c1, k60).")
    assert trace.will(Connect("a")) == ("No will message specified.",)
    assert trace.will(Connect("a", will=Will("w/t", b"bye", 1, True))) == (
        "Will message specified (3 bytes) (r1, q1).", "\tw/t")
    assert trace.taken_over("late") == "Client late already connected, closing old connection."
    assert trace.disconnected("plc-1") == "Client plc-1 disconnected."
    assert trace.closed("pub") == "Client pub closed its connection."
    assert trace.closed(trace.UNKNOWN) == "Client <unknown> closed its connection."
    assert trace.timed_out("sleepy") == "Client sleepy has exceeded timeout, disconnecting."
    assert trace.not_authorised(trace.UNKNOWN) == "Client <unknown> disconnected, not authorised."


@pytest.mark.parametrize(("error", "why"), [
    (None, "protocol error"),  # a CONNECT refused for another reason than the login
    (ProtocolError("second CONNECT on one connection", "MQTT-3.1.0-2"), "protocol error"),
    (UnacceptableProtocol("unsupported protocol level 3 for MQTT", "MQTT-3.1.2-2"), "protocol error"),
    (MalformedPacket("ill-formed UTF-8 topic name", "MQTT-1.5.3-1"), "malformed packet"),
    (MalformedPacket("PUBLISH with QoS 3", "MQTT-3.3.1-4"), "malformed packet"),
    (InvalidTopic("'#' must be the whole last level in 'a/#/b'", "MQTT-4.7.1-2"), "malformed packet"),
    # Mosquitto reads these and refuses them as protocol errors:
    (MalformedPacket("PUBREL with fixed-header flags 0b0000", "MQTT-3.6.1-1"), "protocol error"),
    (InvalidTopic("wildcard in PUBLISH topic name", "MQTT-3.3.2-2"), "protocol error"),
    (PacketTooLarge("remaining length 300 exceeds 200"), "oversize packet"),
])
def test_protocol_errors_in_mosquittos_words(error, why):
    assert trace.protocol_error("bad", error) == f"Client bad disconnected due to {why}."


@pytest.mark.parametrize(("log_type", "verbose", "kinds"), [
    (("error", "warning", "notice", "information"), False, set()),  # the default: no trace
    ((), False, set()),
    (("none",), False, set()),
    (("websockets",), False, set()),
    (("debug",), False, {"debug"}),
    (("subscribe", "unsubscribe"), False, {"subscribe", "unsubscribe"}),
    (("all",), False, {"debug", "subscribe", "unsubscribe"}),
    (("none",), True, {"debug", "subscribe", "unsubscribe"}),  # -v is "all" whatever the file says
])
def test_log_type_names_turn_on_trace_kinds(log_type, verbose, kinds):
    assert trace.kinds(log_type, verbose) == kinds
