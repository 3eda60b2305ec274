"""daemons.mqttclient against a real Mosquitto: reconnect, resubscribe, manual ack, will."""

import queue
import subprocess
import sys
import time

from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient, Will, backoff
from daemons.service import Log
from tests.support import wait_for

LOG = Log("test")


def cfg(port: int) -> MqttConfig:
    return MqttConfig(port=port, reconnect_min=0.1, reconnect_max=0.5, keepalive=5)


def publisher(port: int) -> MqttClient:
    c = MqttClient(cfg(port), "pub-helper", log=LOG)
    c.start()
    assert c.wait_connected(10)
    return c


def test_backoff_grows_to_the_cap_with_jitter():
    delays = [backoff(a, 0.5, 30) for a in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(15 <= d <= 30 for d in delays[8:])
    assert len({round(backoff(3, 0.5, 30), 6) for _ in range(20)}) > 1, "no jitter"


def test_reconnects_and_resubscribes_after_broker_restart(mosquitto):
    inbox: queue.Queue = queue.Queue()
    c = MqttClient(cfg(mosquitto.port), "resub", log=LOG, subscriptions=[("r/#", 1)], on_message=inbox.put)
    c.start()
    try:
        assert c.wait_connected(10) and c.subscribed.wait(5)
        p = publisher(mosquitto.port)
        p.publish("r/a", b"before", 1).wait_for_publish(5)
        assert inbox.get(timeout=5).payload == b"before"
        p.stop()

        mosquitto.restart(down_for=0.5)  # persistence off: the broker forgets our subscription
        wait_for(lambda: not c.connected, 10, what="disconnect noticed")
        assert c.wait_connected(15), "did not reconnect"
        assert c.subscribed.wait(5), "did not resubscribe"
        p = publisher(mosquitto.port)
        p.publish("r/b", b"after", 1).wait_for_publish(5)
        msg = inbox.get(timeout=5)
        assert (msg.topic, msg.payload) == ("r/b", b"after")
        assert inbox.empty()
        p.stop()
    finally:
        c.stop()


def test_manual_ack_holds_the_puback_until_the_daemon_acks(mosquitto):
    """A message received but not acked is redelivered to the persistent session."""
    inbox: queue.Queue = queue.Queue()
    c = MqttClient(cfg(mosquitto.port), "manual", log=LOG, clean_session=False, manual_ack=True,
                   subscriptions=[("m/t", 1)], on_message=inbox.put)
    c.start()
    assert c.wait_connected(10) and c.subscribed.wait(5)
    p = publisher(mosquitto.port)
    info = p.publish("m/t", b"durable?", 1)
    info.wait_for_publish(5)
    assert info.is_published()
    first = inbox.get(timeout=5)
    assert first.payload == b"durable?"
    c.stop()  # no ack sent

    inbox2: queue.Queue = queue.Queue()
    c2 = MqttClient(cfg(mosquitto.port), "manual", log=LOG, clean_session=False, manual_ack=True,
                    subscriptions=[("m/t", 1)], on_message=inbox2.put)
    c2.start()
    try:
        again = inbox2.get(timeout=10)
        assert again.payload == b"durable?" and again.dup
        c2.ack(again.mid, again.qos)
    finally:
        c2.stop()
        p.stop()

    inbox3: queue.Queue = queue.Queue()
    c3 = MqttClient(cfg(mosquitto.port), "manual", log=LOG, clean_session=False, manual_ack=True,
                    subscriptions=[("m/t", 1)], on_message=inbox3.put)
    c3.start()
    try:
        assert c3.wait_connected(10)
        time.sleep(1.0)  # give a (wrong) redelivery time to arrive
        assert inbox3.empty(), "acked message was delivered again"
    finally:
        c3.stop()


WILL_CHILD = """
import os, sys, time
from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient, Will
from daemons.service import Log
c = MqttClient(MqttConfig(port=int(sys.argv[1]), keepalive=5), "will-child", log=Log("child"),
               will=Will("status/child", b"offline", 1, True))
c.start()
assert c.wait_connected(10)
print("up", flush=True)
time.sleep(60)
"""


def test_will_is_published_when_the_client_dies(mosquitto):
    inbox: queue.Queue = queue.Queue()
    w = MqttClient(cfg(mosquitto.port), "watcher", log=LOG, subscriptions=[("status/#", 1)], on_message=inbox.put)
    w.start()
    assert w.wait_connected(10)
    child = subprocess.Popen([sys.executable, "-c", WILL_CHILD, str(mosquitto.port)], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"up\n"
        child.kill()  # ungraceful: no DISCONNECT, so the broker publishes the will
        child.wait(5)
        msg = inbox.get(timeout=10)
        assert (msg.topic, msg.payload) == ("status/child", b"offline")
    finally:
        child.kill()
        w.stop()
