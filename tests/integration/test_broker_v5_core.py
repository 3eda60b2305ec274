"""MQTT 5.0 in a real iot-broker, for what the core builds: Mosquitto's own v5 clients
(mosquitto_pub/sub -V 5) exchanging properties with v3 ones, a v5 session and its queued
message surviving a broker restart and then expiring on time, and the DISCONNECT reason codes
the broker sends before it closes (raw sockets, tests/mqttraw.py, an independent packet
builder). The black-box conformance suite for 5.0 lives in the test_conformance_* files."""

from __future__ import annotations

import signal
import subprocess

import pytest

from tests import mqttraw as raw
from tests.support import Proc, wait_for

SESSION_EXPIRY, SUB_ID, MESSAGE_EXPIRY, TOPIC_ALIAS, TOPIC_ALIAS_MAX = 0x11, 0x0B, 0x02, 0x23, 0x22
MAX_PACKET, RECEIVE_MAX, ASSIGNED_ID = 0x27, 0x21, 0x12


def connect5(port: int, cid: str, clean: bool = True, keepalive: int = 60, **props) -> raw.RawClient:
    c = raw.RawClient(port)
    items = [(ident, value) for ident, value in props.values()]
    c.send(raw.connect(cid, clean=clean, keepalive=keepalive, proto_level=5, props=raw.properties(*items)))
    pkt = c.recv_packet()
    assert pkt.name == "CONNACK", pkt
    c.connack = raw.parse_connack(pkt)
    assert c.connack[1] == 0, c.connack
    return c


def disconnect_reason(c: raw.RawClient) -> int:
    """The reason code of the DISCONNECT the broker sends, then the close."""
    pkt = c.recv_packet()
    assert pkt.name == "DISCONNECT", pkt
    _, reason, _ = raw.parse_reason(pkt)
    c.expect_closed(what="closed after its DISCONNECT")
    return reason


def mosquitto_sub(tmp_path, port: int, *args: str) -> Proc:
    p = Proc(["stdbuf", "-oL", "mosquitto_sub", "-p", str(port), "-h", "127.0.0.1", "-V", "5", "-d", *args], workdir=tmp_path,
             name="mosquitto_sub").start()
    wait_for(lambda: "SUBACK" in p.log() or not p.running(), 10, what="mosquitto_sub subscribed")
    return p


def test_mosquitto_v5_clients_get_properties_v3_clients_the_message(broker, tmp_path):
    fmt = "%t|%p|C=%C|R=%R|D=%D|P=%P|F=%F|S=%S"
    sub5 = mosquitto_sub(tmp_path, broker.port, "-t", "req/#", "-q", "1", "-F", fmt, "-D", "subscribe",
                         "subscription-identifier", "17")
    sub3 = Proc(["stdbuf", "-oL", "mosquitto_sub", "-p", str(broker.port), "-V", "311", "-d", "-t", "req/#", "-F", "%t|%p"],
                workdir=tmp_path, name="sub3").start()
    try:
        wait_for(lambda: "SUBACK" in sub3.log(), 10, what="v3 subscriber subscribed")
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", "5", "-q", "1", "-t", "req/a", "-m", "ping",
                        "-D", "publish", "content-type", "text/plain", "-D", "publish", "response-topic", "resp/a",
                        "-D", "publish", "correlation-data", "c-42", "-D", "publish", "user-property", "k", "v",
                        "-D", "publish", "payload-format-indicator", "1"], check=True, timeout=10)
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", "311", "-q", "1", "-t", "req/b",
                        "-m", "from v3"], check=True, timeout=10)
        wait_for(lambda: "req/b|from v3" in sub5.log() and "req/b|from v3" in sub3.log(), 10,
                 what="both messages at both subscribers")
        assert "req/a|ping|C=text/plain|R=resp/a|D=c-42|P=k:v|F=1|S=17" in sub5.log()
        assert "req/a|ping\n" in sub3.log()
        assert "req/b|from v3|C=|R=|D=|P=|F=|S=17" in sub5.log()
    finally:
        sub5.stop()
        sub3.stop()


@pytest.mark.slow
def test_session_expiry_and_queued_message_survive_a_restart_then_the_session_expires(broker_factory):
    b = broker_factory("sys_interval = 1\n")
    c = connect5(b.port, "keeper", expiry=(SESSION_EXPIRY, 3600))
    c.send(raw.subscribe(1, [("jobs/#", raw.sub_options(qos=1))], props=raw.properties((SUB_ID, 5))))
    assert raw.parse_reason(c.recv_packet())[1] == [1]
    c.send(raw.disconnect())
    c.close()
    p = connect5(b.port, "pub")
    p.send(raw.publish("jobs/1", b"queued", qos=1, mid=1, props=raw.properties((MESSAGE_EXPIRY, 3600))))
    assert p.recv_packet().name == "PUBACK"
    p.close()
    assert b.proc.stop() == 0
    b2 = broker_factory("sys_interval = 1\n", port=b.port)
    c = connect5(b2.port, "keeper", clean=False, expiry=(SESSION_EXPIRY, 3600))
    assert c.connack[0], "session present after the restart"
    msg = raw.parse_publish(c.recv_packet(), v5=True)
    props = dict(msg.props)
    assert msg.payload == b"queued" and props[SUB_ID] == 5 and 0 < props[MESSAGE_EXPIRY] <= 3600
    c.send(raw.puback(msg.mid))
    # Leaving, the client shortens its session to 1 s: the broker removes it on time.
    c.send(raw.disconnect(0, raw.properties((SESSION_EXPIRY, 1))))
    c.close()
    watch = connect5(b2.port, "watch")
    watch.send(raw.subscribe(1, [("$SYS/broker/limits/sessions/expired", 0)], props=raw.properties()))
    watch.recv_packet()
    wait_for(lambda: raw.parse_publish(watch.recv_packet(timeout=5), v5=True).payload == b"1", 15,
             what="the session expired")
    again = connect5(b2.port, "keeper", clean=False, expiry=(SESSION_EXPIRY, 60))
    assert not again.connack[0]


def test_disconnect_reason_codes_before_the_close(broker_factory):
    b = broker_factory("max_packet_size = 1024\nmax_topic_alias = 2\n")
    c = connect5(b.port, "big")
    connack_props = dict(c.connack[2])
    assert connack_props[MAX_PACKET] == 1024 + 3 and connack_props[TOPIC_ALIAS_MAX] == 2
    c.send(raw.publish("t", b"x" * 2000))
    assert disconnect_reason(c) == 0x95
    c = connect5(b.port, "alias")
    c.send(raw.publish("", b"x", props=raw.properties((TOPIC_ALIAS, 3))))  # above our maximum of 2
    assert disconnect_reason(c) == 0x94
    c = connect5(b.port, "alias-unknown")
    c.send(raw.publish("", b"x", props=raw.properties((TOPIC_ALIAS, 1))))  # within it, but never set
    assert disconnect_reason(c) == 0x82
    c = connect5(b.port, "malformed")
    c.send(raw.frame(0x30, raw.string("t") + b"\x02\x7f\x00"))  # property 0x7F does not exist
    assert disconnect_reason(c) == 0x81
    c = connect5(b.port, "idle", keepalive=1)
    pkt = c.recv_packet(timeout=10)
    assert pkt.name == "DISCONNECT" and raw.parse_reason(pkt)[1] == 0x8D
    c = connect5(b.port, "", receive=(RECEIVE_MAX, 5))
    assert dict(c.connack[2])[ASSIGNED_ID]
    b.proc.signal(signal.SIGTERM)
    assert disconnect_reason(c) == 0x8B
    assert b.proc.wait(15) == 0
