"""MQTT 3.1.1 conformance, section 3.1.2.10 (Keep Alive) and the broker's connect_timeout,
black-box against a real iot-broker. Keep-alives are 1 s, so each test takes 2-3 s."""

from __future__ import annotations

import time

import pytest

from tests.mqttraw import RawClient, Will, client, pingreq, pingresp, publish


@pytest.mark.slow
def test_mqtt_3_1_2_24_keepalive_expiry_closes_and_publishes_will(broker):
    """[MQTT-3.1.2-24] [MQTT-3.1.2-8] A client silent for 1.5 x its Keep Alive (1 s) is
    disconnected as if the network had failed: not before 1.5 s, not much later (the broker
    checks once a second), and its will is published."""
    with client(broker.port, "kasub", subs=[("ka/#", 0)]) as s:
        c = client(broker.port, "ka", keepalive=1, will=Will("ka/gone", b"timeout"))
        start = time.monotonic()
        c.expect_closed(timeout=4.0, what="keep-alive 1 s")
        elapsed = time.monotonic() - start
        assert 1.4 <= elapsed <= 3.5, f"closed after {elapsed:.2f}s for keep-alive 1 s (1.5 s due)"
        s.expect(publish("ka/gone", b"timeout"), what="will after keep-alive expiry")


@pytest.mark.slow
def test_mqtt_3_1_2_24_traffic_or_keepalive_zero_keeps_connection(broker):
    """[MQTT-3.1.2-24] [MQTT-3.12.4-1] A client with Keep Alive 1 s that sends a PINGREQ every
    0.5 s, and a silent client with Keep Alive 0 (no timeout), are both still connected after
    2.7 s, by when a silent Keep Alive 1 s client is gone; every PINGREQ gets a PINGRESP."""
    pinging, zero, silent = (client(broker.port, "kaping", keepalive=1), client(broker.port, "ka0", keepalive=0),
                             client(broker.port, "ka1", keepalive=1))
    try:
        deadline = time.monotonic() + 2.7
        while time.monotonic() < deadline:
            time.sleep(0.5)
            pinging.send(pingreq())
            pinging.expect(pingresp())
        silent.expect_closed(what="control: silent Keep Alive 1 s client")
        assert zero.is_open(), "a client with Keep Alive 0 was disconnected"
        pinging.expect_nothing()
    finally:
        for c in (pinging, zero, silent):
            c.close()


@pytest.mark.slow
def test_mqtt_3_1_2_24_partial_packet_bytes_do_not_reset_keepalive(broker):
    """[MQTT-3.1.2-24] Keep Alive counts Control Packets, not bytes: a client (Keep Alive 1 s)
    that trickles one byte of a never-completed PUBLISH every 0.4 s has sent no Control
    Packet since its CONNECT, so the broker must disconnect it as it does a silent client
    (1.5 s due; allowed up to 3.5 s here), and publish its will."""
    with client(broker.port, "trsub", subs=[("trickle/#", 0)]) as s:
        c = client(broker.port, "trickle", keepalive=1, will=Will("trickle/gone", b"x"))
        c.send(b"\x30\x7f")  # a PUBLISH announcing 127 bytes, of which only a few ever come
        start = time.monotonic()
        closed = False
        while not closed and time.monotonic() - start < 3.5:
            try:
                c.send(b"a")
            except OSError:
                closed = True
                break
            closed = c.closed_within(0.4)
        c.close()
        assert closed, ("still connected 3.5 s after CONNECT with Keep Alive 1 s, although no complete "
                        "Control Packet arrived after the CONNECT: partial bytes reset the keep-alive timer")
        s.expect(publish("trickle/gone", b"x"), what="will after keep-alive expiry")


def test_connect_timeout_closes_silent_connection(broker_factory):
    """Product requirement (connect_timeout): a connection that sends no CONNECT within
    connect_timeout (0.5 s here; the broker sweeps once a second) is closed, whether it sends
    nothing or half a CONNECT; a connection that CONNECTs in time is not affected."""
    b = broker_factory("connect_timeout = 0.5\n")
    silent, partial, ok = RawClient(b.port), RawClient(b.port), RawClient(b.port)
    try:
        partial.send(b"\x10\x10\x00\x04MQ")  # the first bytes of a CONNECT, then nothing
        ok.connect_ok("in-time")
        start = time.monotonic()
        silent.expect_closed(timeout=3.0, what="no CONNECT at all")
        partial.expect_closed(timeout=3.0 - (time.monotonic() - start), what="half a CONNECT")
        assert time.monotonic() - start <= 3.0
        assert ok.is_open(), "a connected client was closed by connect_timeout"
    finally:
        for c in (silent, partial, ok):
            c.close()
