"""The one manual-ack path (`MqttClient(manual_ack=True)`: `client.inbox` and `client.ack()`)
against real brokers: an acknowledgement goes out only when the daemon says so, never for a
QoS 0 message, and never for a message of an older connection."""

from __future__ import annotations

import pytest

from daemons.config import MqttConfig
from daemons.mqttclient import Delivery, MqttClient
from daemons.service import Log
from tests.support import Mosquitto, wait_for

LOG = Log("test")


def cfg(port: int) -> MqttConfig:
    return MqttConfig(port=port, reconnect_min=0.1, reconnect_max=0.5, keepalive=5)


def receiver(port: int, topic: str = "m/#", client_id: str = "manual") -> MqttClient:
    c = MqttClient(cfg(port), client_id, log=LOG, clean_session=False, manual_ack=True, subscriptions=[(topic, 1)])
    c.start()
    assert c.wait_connected(10) and c.subscribed.wait(10)
    return c


def publisher(port: int) -> MqttClient:
    c = MqttClient(cfg(port), "pub-helper", log=LOG)
    c.start()
    assert c.wait_connected(10)
    return c


def publish(p: MqttClient, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
    info = p.publish(topic, payload, qos, retain)
    info.wait_for_publish(10)
    assert info.is_published()


def take(c: MqttClient, n: int = 1, timeout: float = 10.0) -> list[Delivery]:
    assert c.inbox is not None
    got: list[Delivery] = []
    wait_for(lambda: got.extend(c.inbox.take(n - len(got))) or len(got) >= n, timeout, what=f"{n} message(s)")
    return got


def test_the_puback_waits_for_ack_and_an_acked_message_is_not_sent_again(any_broker):
    p = publisher(any_broker)
    c = receiver(any_broker)
    publish(p, "m/t", b"durable?")
    (first,) = take(c)
    assert first[1].payload == b"durable?"
    c.stop()  # no ack: the broker keeps it for the persistent session

    c2 = receiver(any_broker)
    (again,) = take(c2)
    assert again[1].payload == b"durable?" and again[1].dup
    assert c2.ack([again]) == 1
    c2.stop()

    c3 = receiver(any_broker)
    try:
        # A marker published now arrives after anything the session still owed us (one
        # connection delivers in order), so the first message tells whether the acked one came back.
        publish(p, "m/marker", b"marker")
        (nxt,) = take(c3)
        assert nxt[1].payload == b"marker", "the acknowledged message was delivered again"
        c3.ack([nxt])
    finally:
        c3.stop()
        p.stop()


@pytest.mark.parametrize("retain", [False, True], ids=["live", "retained"])
def test_qos0_messages_are_never_acknowledged_and_the_client_stays_connected(any_broker, retain):
    """A PUBACK for a QoS 0 message names packet id 0, and the broker closes the connection
    (MQTT-2.3.1-1); a retained one would come back on every reconnect, without end."""
    p = publisher(any_broker)
    if retain:
        publish(p, "m/q0", b"hello", qos=0, retain=True)
    c = receiver(any_broker)
    try:
        assert c.inbox is not None
        epoch = c.inbox.epoch
        if not retain:
            publish(p, "m/q0", b"hello", qos=0)
        (d,) = take(c)
        assert (d[1].payload, d[1].qos, d[1].retain) == (b"hello", 0, retain)
        assert c.ack([d]) == 0
        # The connection is still the same one: a QoS 1 message after it is delivered on it
        # and acknowledged, and nothing came again in between.
        publish(p, "m/q1", b"after")
        (d1,) = take(c)
        assert d1[1].payload == b"after" and c.ack([d1]) == 1
        publish(p, "m/q1", b"after2")
        (d2,) = take(c)
        assert d2[1].payload == b"after2"
        assert c.connected and c.inbox.epoch == epoch, "the broker closed the connection"
    finally:
        c.stop()
        if retain:
            publish(p, "m/q0", b"", qos=0, retain=True)
        p.stop()


def test_an_ack_for_a_message_of_an_older_connection_is_not_sent(tmp_path):
    """After a reconnect a packet id may name another message. Mosquitto without persistence
    loses our session on a restart and numbers from 1 again: the late ack of the old message
    would acknowledge the new one, not yet durable. It must not be sent."""
    m = Mosquitto(tmp_path).start()
    try:
        p = publisher(m.port)
        c = receiver(m.port)
        publish(p, "m/t", b"old")
        (old,) = take(c)
        assert old[1].qos == 1
        epoch = c.inbox.epoch
        m.restart()
        wait_for(lambda: c.inbox.epoch >= epoch + 2 and c.subscribed.is_set(), 15, what="reconnect and resubscribe")
        wait_for(lambda: p.connected, 15, what="publisher back")
        publish(p, "m/t", b"new")
        (new,) = take(c)
        assert new[1].payload == b"new" and new[1].mid == old[1].mid  # the same packet id, another message
        assert c.ack([old]) == 0  # the old one is void: nothing goes out
        c.stop()  # `new` was never acknowledged...
        c2 = receiver(m.port)
        try:
            (again,) = take(c2)  # ...so the broker sends it again
            assert again[1].payload == b"new"
            c2.ack([again])
        finally:
            c2.stop()
            p.stop()
    finally:
        m.stop()


def test_a_full_inbox_stops_reading_from_the_broker_and_loses_nothing(any_broker):
    """Past its limit the inbox blocks paho's thread: TCP pushes back, nothing is dropped."""
    c = MqttClient(cfg(any_broker), "slow", log=LOG, clean_session=False, manual_ack=True,
                   subscriptions=[("m/#", 1)], inbox_limit=5, max_inflight=50)
    c.start()
    assert c.wait_connected(10) and c.subscribed.wait(10)
    p = publisher(any_broker)
    try:
        for i in range(40):
            p.publish("m/f", b"%d" % i, 1)
        assert c.inbox is not None
        wait_for(lambda: len(c.inbox) == 5, 10, what="the inbox to fill")
        got: list[Delivery] = []
        while len(got) < 40:
            batch = take(c, 1)
            got.extend(batch)
            assert len(c.inbox) <= 5
            c.ack(batch)
        assert [d[1].payload for d in got] == [b"%d" % i for i in range(40)]
    finally:
        c.stop()
        p.stop()
