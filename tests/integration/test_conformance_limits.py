"""iot-broker's resource limits, black-box on the wire: max_packet_size, max_connections,
max_inflight_messages, max_queued_messages (etc/iot/iot.toml [broker]). No spec id: these
are product requirements; the spec only says a broker may close a connection it cannot serve
(MQTT-4.8.0-2, transient errors)."""

from __future__ import annotations

import time

from tests.mqttraw import (
    RawClient,
    assert_serves_new_client,
    client,
    disconnect,
    frame,
    publish,
    puback,
    string,
    u16,
    varint,
)


def test_max_packet_size_closes_larger_packets(broker_factory):
    """A packet within max_packet_size (64) is accepted, a larger one closes the connection,
    and so does the bare fixed header of a 10 MB PUBLISH (the broker must not wait for, or
    buffer, a body it will refuse). The sizes used hold whether the limit counts the whole
    packet (64 bytes total accepted) or the remaining length (65 refused)."""
    b = broker_factory("max_packet_size = 64\n")
    with client(b.port, "mps-sub", subs=[("mps/#", 0)]) as s:
        with client(b.port, "mps-ok") as c:
            ok = frame(0x30, string("mps/ok") + b"p" * 54)
            assert len(ok) == 64
            c.send(ok)
            assert s.recv_publish().payload == b"p" * 54, "a 64-byte packet was refused"
            assert c.is_open()
        with client(b.port, "mps-big") as c:
            big = frame(0x30, string("mps/big") + b"p" * 56)
            assert len(big) == 67  # remaining length 65
            c.send(big)
            c.expect_closed(what="packet with remaining length 65, max_packet_size 64")
        s.expect_nothing(what="the oversized message was delivered")
        with client(b.port, "mps-huge") as c:
            c.send(b"\x30" + varint(10_000_000))
            c.expect_closed(what="header of a 10 MB packet")
    with RawClient(b.port) as c:  # CONNECT itself is bounded too
        c.send(frame(0x10, string("MQTT") + b"\x04\x02" + u16(30) + string("c" * 100)))
        c.expect_closed(what="oversized CONNECT")
    assert_serves_new_client(b.port)


def test_max_connections_refuses_beyond_limit(broker_factory):
    """With max_connections = 2, a third TCP connection is closed by the broker at once
    (before any CONNECT is answered) while the two others keep working; once one of them goes,
    a new connection is accepted again."""
    b = broker_factory("max_connections = 2\n")
    one, two = client(b.port, "mc1"), client(b.port, "mc2")
    try:
        with RawClient(b.port) as third:
            try:
                third.send(b"\x10")  # the refusal may already have reset the connection
            except OSError:
                pass
            assert third.read_until_closed() == b"", "the third connection was served"
        assert one.is_open() and two.is_open()
        two.send(disconnect())
        two.expect_closed(what="DISCONNECT")  # the broker has closed it: the slot is free
        with RawClient(b.port) as again:
            again.connect_ok("mc3")
            assert again.is_open()
    finally:
        one.close()
        two.close()


def test_max_inflight_messages_limits_unacknowledged_publishes(broker_factory):
    """With max_inflight_messages = 2 the broker has at most two QoS 1 messages unacknowledged
    towards a client; each PUBACK releases the next queued one, and all arrive in order."""
    b = broker_factory("max_inflight_messages = 2\n")
    with client(b.port, "mi-sub", subs=[("mi/t", 1)]) as s, client(b.port, "mi-pub") as p:
        for i in range(5):
            p.send(publish("mi/t", b"%d" % i, qos=1, mid=i + 1))
            p.expect(puback(i + 1))
        first = [s.recv_publish(), s.recv_publish()]
        assert [m.payload for m in first] == [b"0", b"1"]
        s.expect_nothing(what="more than max_inflight_messages unacknowledged")
        s.send(puback(first[0].mid))
        third = s.recv_publish()
        assert third.payload == b"2"
        s.expect_nothing(what="a slot freed by one PUBACK released two messages")
        got = [b"0", b"1", b"2"]
        pending = [first[1].mid, third.mid]
        while len(got) < 5:
            s.send(puback(pending.pop(0)))
            m = s.recv_publish()
            got.append(m.payload)
            pending.append(m.mid)
        assert got == [b"0", b"1", b"2", b"3", b"4"]
        for mid in pending:
            s.send(puback(mid))
        s.expect_nothing()


def test_max_queued_messages_drops_and_counts_overflow_with_queue_full_drop(broker_factory):
    """queue_full = "drop" (Mosquitto's behaviour): with max_queued_messages = 3 an offline
    persistent session keeps the first 3 QoS 1 messages and drops the other 4, which are
    counted ($SYS/broker/publish/messages/dropped) and logged; on reconnect exactly the 3 kept
    messages arrive, in order."""
    b = broker_factory("max_queued_messages = 3\nmax_inflight_messages = 1\nsys_interval = 0.5\n"
                       'queue_full = "drop"\npersistence = false\n')
    c = client(b.port, "mq", clean=False, subs=[("mq/t", 1)])
    c.disconnect()
    with client(b.port, "mq-pub") as p:
        for i in range(7):
            p.send(publish("mq/t", b"%d" % i, qos=1, mid=i + 1))
            p.expect(puback(i + 1))
    with client(b.port, "mq", clean=False, session_present=True) as c:
        got = []
        for _ in range(3):
            m = c.recv_publish()
            got.append(m.payload)
            c.send(puback(m.mid))
        assert got == [b"0", b"1", b"2"]
        c.expect_nothing(what="more than max_queued_messages were kept")
    with client(b.port, "mq-stats", subs=[("$SYS/broker/publish/messages/dropped", 0)]) as st:
        deadline = time.monotonic() + 10.0
        value = None
        while time.monotonic() < deadline and value != b"4":
            value = st.recv_publish(timeout=max(0.1, deadline - time.monotonic())).payload
        assert value == b"4", f"dropped counter is {value!r}, 4 messages were dropped"
    assert "messages dropped" in b.proc.log(), "the overflow was not logged"


def test_max_queued_messages_online_client_behind_inflight_window(broker_factory):
    """For a connected client the queue sits behind the in-flight window: with
    max_inflight_messages = 1 and max_queued_messages = 2, of 5 messages published while the
    client does not acknowledge, 1 is sent, 2 are queued and 2 dropped (queue_full = "drop")."""
    b = broker_factory('max_queued_messages = 2\nmax_inflight_messages = 1\nqueue_full = "drop"\npersistence = false\n')
    with client(b.port, "mqo", subs=[("mqo/t", 1)]) as s, client(b.port, "mqo-pub") as p:
        for i in range(5):
            p.send(publish("mqo/t", b"%d" % i, qos=1, mid=i + 1))
            p.expect(puback(i + 1))
        got = []
        for _ in range(3):  # each PUBACK frees the window for the next queued one
            m = s.recv_publish()
            got.append(m.payload)
            s.send(puback(m.mid))
        assert got == [b"0", b"1", b"2"], got
        s.expect_nothing(what="more than 1 in flight + 2 queued were kept")


def test_a_full_queue_holds_the_publisher_back_unacknowledged_by_default(broker_factory):
    """queue_full = "block" (the default), persistence off: with max_queued_messages = 3 an offline persistent
    session takes 3 QoS 1 messages; the 4th PUBLISH is not acknowledged (a ping round shows
    nothing came before the PINGRESP) until the subscriber returns and acknowledges, and then
    every one of the 7 is delivered, in order, and acknowledged to the publisher."""
    b = broker_factory("max_queued_messages = 3\nmax_inflight_messages = 1\npersistence = false\n")
    c = client(b.port, "mqb", clean=False, subs=[("mqb/t", 1)])
    c.disconnect()
    with client(b.port, "mqb-pub") as p:
        for i in range(7):
            p.send(publish("mqb/t", b"%d" % i, qos=1, mid=i + 1))
        for i in range(3):
            p.expect(puback(i + 1))
        assert p.until_pingresp() == [], "a PUBACK for a message the broker could not keep"
        with client(b.port, "mqb", clean=False, session_present=True) as c:
            got = []
            for _ in range(7):
                m = c.recv_publish()
                got.append(m.payload)
                c.send(puback(m.mid))
            assert got == [b"%d" % i for i in range(7)]
            for i in range(3, 7):
                p.expect(puback(i + 1))
            c.expect_nothing(what="a message twice")
    assert "publisher held back" in b.proc.log() and "messages dropped" not in b.proc.log()
