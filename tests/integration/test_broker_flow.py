"""iot-broker never acknowledges what it cannot keep (queue_full = "block", the default): a
publisher whose subscriber's queue is full is held back, unacknowledged, until there is room;
TCP pushes back; nothing acknowledged is lost. Real processes, paho clients."""

from __future__ import annotations

import subprocess

import pytest

from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient
from daemons.service import Log
from tests.support import wait_for

pytestmark = pytest.mark.slow
LOG = Log("test")
# Persistence off: the queue's bound is then its memory bound (with persistence it would
# continue on disk; see test_broker_persistence.py for flow control at the store's quota).
SMALL = "max_inflight_messages = 10\nmax_queued_messages = 50\npersistence = false\n"


def client(port: int, cid: str, **kw) -> MqttClient:
    c = MqttClient(MqttConfig(port=port, reconnect_min=0.1, reconnect_max=0.5), cid, log=LOG, **kw)
    c.start()
    assert c.wait_connected(10)
    if kw.get("subscriptions"):
        assert c.subscribed.wait(10)
    return c


def receive_all(c: MqttClient, n: int, timeout: float = 60) -> list[bytes]:
    """Take and acknowledge messages from a manual-ack client until `n` have come."""
    got: list[bytes] = []

    def step() -> bool:
        batch = c.inbox.take(500)
        got.extend(m.payload for _, m in batch)
        c.ack(batch)
        return len(got) >= n

    wait_for(step, timeout, 0.01, what=f"{n} messages at {c.client_id}")
    return got


def sys_value(port: int, name: str) -> int:
    r = subprocess.run(["mosquitto_sub", "-p", str(port), "-t", f"$SYS/broker/{name}", "-C", "1", "-W", "10"],
                       capture_output=True, timeout=15, check=True)
    return int(r.stdout)


def test_an_offline_subscriber_with_a_full_queue_holds_the_publisher_and_nothing_is_lost(broker_factory):
    b = broker_factory(SMALL + "sys_interval = 0.5\n")
    sub = client(b.port, "slow", clean_session=False, manual_ack=True, subscriptions=[("f/#", 1)])
    sub.stop()  # away: its queue fills at 50
    pub = client(b.port, "pub", max_inflight=100)
    infos = [pub.publish("f/x", b"%d" % i, 1) for i in range(500)]
    wait_for(lambda: "publisher held back" in b.proc.log(), 20, what="the publisher to be held back")
    # Acknowledged: what the queue holds (the PUBACKs may still be on their way); the rest waits.
    wait_for(lambda: sum(i.is_published() for i in infos) >= 50, 20, what="50 PUBACKs")
    assert sum(i.is_published() for i in infos) == 50
    sub = client(b.port, "slow", clean_session=False, manual_ack=True, subscriptions=[("f/#", 1)])
    try:
        got = receive_all(sub, 500)
        wait_for(lambda: all(i.is_published() for i in infos), 20, what="every PUBACK at the publisher")
        assert got == [b"%d" % i for i in range(500)]  # each once, in order
        assert sys_value(b.port, "publish/messages/dropped") == 0
        assert sys_value(b.port, "publish/messages/held") >= 1
    finally:
        sub.stop()
        pub.stop()


def test_a_stuck_consumer_does_not_hold_publishers_of_other_topics(broker_factory):
    """The trade-off of blocking: a publisher is held only by the subscribers of what it
    publishes. One consumer stuck on stuck/#: its publisher waits; another publisher to
    other topics, with a live subscriber, carries on."""
    b = broker_factory(SMALL)
    stuck = client(b.port, "stuck", clean_session=False, subscriptions=[("stuck/#", 1)])
    stuck.stop()
    p1 = client(b.port, "p1", max_inflight=100)
    held = [p1.publish("stuck/x", b"s", 1) for _ in range(200)]
    wait_for(lambda: "publisher held back" in b.proc.log(), 20, what="p1 held back")
    live = client(b.port, "live", manual_ack=True, subscriptions=[("live/#", 1)])
    p2 = client(b.port, "p2", max_inflight=100)
    try:
        infos = [p2.publish("live/x", b"%d" % i, 1) for i in range(2000)]
        got = receive_all(live, 2000)  # delivered while p1 is held
        wait_for(lambda: all(i.is_published() for i in infos), 20, what="p2's PUBACKs")
        assert got == [b"%d" % i for i in range(2000)]
        assert not all(i.is_published() for i in held)  # p1 still waits for the stuck consumer
    finally:
        for c in (p1, p2, live):
            c.stop()


def test_a_client_subscribed_to_what_it_publishes_is_not_deadlocked(broker_factory):
    """Held, it must still be able to acknowledge what it receives, or its own queue would
    never drain: acknowledgements pass a held PUBLISH."""
    b = broker_factory("max_inflight_messages = 5\nmax_queued_messages = 10\nsys_interval = 0\npersistence = false\n")
    got: list[bytes] = []
    c = client(b.port, "self", subscriptions=[("loop", 1)], on_message=lambda m: got.append(m.payload),
               max_inflight=100)
    try:
        infos = [c.publish("loop", b"%d" % i, 1) for i in range(300)]
        wait_for(lambda: len(got) >= 300 and all(i.is_published() for i in infos), 60,
                 what="all 300 messages back and acknowledged")
        assert got == [b"%d" % i for i in range(300)]
    finally:
        c.stop()
