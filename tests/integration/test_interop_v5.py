"""MQTT 5.0 interop: real third-party clients, paho-mqtt with protocol=MQTTv5 and Mosquitto's
mosquitto_pub / mosquitto_sub with -V 5, through our broker and through Mosquitto 2 (the
`brokers` fixture), one test per scenario: session expiry across a reconnect, message expiry,
topic alias, No Local, Retain Handling, request/response with correlation data, will delay."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests.support import readline


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (./install.sh --local --test-deps installs mosquitto-clients)"
    return path


def mosquitto_pub(port: int, *args: str) -> None:
    subprocess.run([_tool("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-V", "5", *args],
                   check=True, timeout=15, capture_output=True)


def mosquitto_sub(port: int, *args: str) -> subprocess.Popen:
    """mosquitto_sub -V 5, its stdout a pipe; call `subscribed()` to wait for its SUBACK.
    Line-buffered (stdbuf): its -d lines are plain printf, held back in a pipe otherwise."""
    return subprocess.Popen(["stdbuf", "-oL", _tool("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-d", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)


def subscribed(proc: subprocess.Popen) -> None:
    """Read mosquitto_sub's -d output up to the SUBACK: from then on it receives."""
    for _ in range(50):
        if b"received SUBACK" in readline(proc.stdout):
            return
    raise AssertionError("mosquitto_sub printed no SUBACK")


def message_line(proc: subprocess.Popen) -> bytes:
    """The next printed message (-d debug lines skipped): -F output ends with '|'."""
    for _ in range(50):
        line = readline(proc.stdout)
        if line.endswith(b"|\n"):
            return line[:-2]
    raise AssertionError("mosquitto_sub printed no message")


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Paho5:
    """A paho-mqtt client speaking MQTT 5.0; received messages land in `inbox`."""

    def __init__(self, port: int, client_id: str, clean_start: bool = True, session_expiry: int | None = None,
                 will: tuple[str, bytes, int] | None = None):
        self.port, self.inbox, self.acks = port, queue.Queue(), queue.Queue()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self.c.on_message = lambda c, u, m: self.inbox.put(m)
        self.c.on_subscribe = lambda c, u, mid, codes, props: self.acks.put(("sub", mid, [x.value for x in codes]))
        self.connected: queue.Queue = queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, props: self.connected.put((rc.value, flags.session_present))
        self.props = Properties(PacketTypes.CONNECT)
        if session_expiry is not None:
            self.props.SessionExpiryInterval = session_expiry
        if will:
            wp = Properties(PacketTypes.WILLMESSAGE)
            wp.WillDelayInterval = will[2]
            self.c.will_set(will[0], will[1], 1, properties=wp)
        self.clean_start = clean_start

    def connect(self) -> bool:
        """Connect; return the CONNACK's Session Present."""
        self.c.connect("127.0.0.1", self.port, 30, clean_start=self.clean_start, properties=self.props)
        self.c.loop_start()
        rc, present = self.connected.get(timeout=10)
        assert rc == 0, f"CONNACK reason {rc:#x}"
        return present

    def subscribe(self, topic: str, qos: int = 1, **options) -> list[int]:
        _, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos, **options))
        kind, got_mid, codes = self.acks.get(timeout=10)
        assert (kind, got_mid) == ("sub", mid)
        return codes

    def publish(self, topic: str, payload: bytes, qos: int = 1, **props) -> None:
        p = Properties(PacketTypes.PUBLISH)
        for k, v in props.items():
            setattr(p, k, v)
        info = self.c.publish(topic, payload, qos, properties=p if props else None)
        info.wait_for_publish(10)
        assert info.is_published()

    def get(self, timeout: float = 10) -> paho.MQTTMessage:
        return self.inbox.get(timeout=timeout)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def paho5():
    started: list[Paho5] = []

    def make(port: int, client_id: str, **kw) -> Paho5:
        started.append(Paho5(port, client_id, **kw))
        return started[-1]

    yield make
    for p in started:
        p.stop()


def test_v5_interop_session_expiry_across_a_reconnect(brokers, paho5):
    """A paho client with Clean Start 0 and Session Expiry Interval 60 comes back to its session
    (Session Present) and gets the message mosquitto_pub -V 5 published while it was away; a
    mosquitto_sub -V 5 -c -x 60 does the same with a message from paho."""
    b = brokers()
    a = paho5(b.port, "v5i-se-paho", clean_start=False, session_expiry=60)
    assert a.connect() is False
    assert a.subscribe("v5i/se/paho") == [1]
    a.stop()
    mosquitto_pub(b.port, "-q", "1", "-t", "v5i/se/paho", "-m", "while away")
    a = paho5(b.port, "v5i-se-paho", clean_start=False, session_expiry=60)
    assert a.connect() is True
    assert a.get().payload == b"while away"

    args = ["-c", "-x", "60", "-i", "v5i-se-sub", "-q", "1", "-t", "v5i/se/sub", "-F", "%p|"]
    s = mosquitto_sub(b.port, *args, "-E")
    assert s.wait(10) == 0
    a.publish("v5i/se/sub", b"from paho")
    s = mosquitto_sub(b.port, *args, "-C", "1", "-W", "10")
    try:
        assert message_line(s) == b"from paho"
        assert s.wait(10) == 0
    finally:
        finish(s)


@pytest.mark.slow
def test_v5_interop_message_expiry(brokers, paho5):
    """A message paho published with Message Expiry Interval 1 is not delivered to a
    mosquitto_sub -V 5 that comes back after 2 s; one with 60 s is, with the remaining interval
    (less than 60) shown by -F %E."""
    b = brokers()
    args = ["-c", "-x", "60", "-i", "v5i-me-sub", "-q", "1", "-t", "v5i/me/#", "-F", "%t %E %p|"]
    s = mosquitto_sub(b.port, *args, "-E")
    assert s.wait(10) == 0
    p = paho5(b.port, "v5i-me-pub")
    p.connect()
    p.publish("v5i/me/short", b"short", MessageExpiryInterval=1)
    p.publish("v5i/me/long", b"long", MessageExpiryInterval=60)
    time.sleep(2.2)  # the point is the time that passes: past the 1 s interval
    s = mosquitto_sub(b.port, *args, "-C", "1", "-W", "10")
    try:
        topic, expiry, payload = message_line(s).split(b" ")
        assert (topic, payload) == (b"v5i/me/long", b"long"), "the expired message came first"
        assert 0 < int(expiry) < 60
    finally:
        finish(s)


def test_v5_interop_topic_alias(brokers, paho5):
    """paho publishes with Topic Alias 1 (first with the topic, then with an empty topic); a
    mosquitto_sub -V 5 prints the full topic for both. (Aliases from the broker to a client are
    tested over raw sockets in test_conformance_v5_flow: neither libmosquitto 2.0.11 nor paho
    2.2 resolves them, though mosquitto_sub sends any topic-alias-maximum it is given with -D.)"""
    b = brokers()
    s = mosquitto_sub(b.port, "-q", "1", "-t", "v5i/alias/#",
                      "-F", "%t %p|", "-C", "2", "-W", "10")
    try:
        subscribed(s)
        p = paho5(b.port, "v5i-alias-pub")
        p.connect()
        p.publish("v5i/alias/a/rather/long/topic", b"one", TopicAlias=1)
        p.publish("", b"two", TopicAlias=1)
        assert [message_line(s), message_line(s)] == [b"v5i/alias/a/rather/long/topic one",
                                                      b"v5i/alias/a/rather/long/topic two"]
        assert s.wait(10) == 0
    finally:
        finish(s)


def test_v5_interop_no_local(brokers, paho5):
    """A paho client subscribed with No Local does not get its own message back, and does get
    mosquitto_pub -V 5's on the same topic."""
    b = brokers()
    a = paho5(b.port, "v5i-nl")
    a.connect()
    assert a.subscribe("v5i/nl", 1, noLocal=True) == [1]
    a.publish("v5i/nl", b"own")
    mosquitto_pub(b.port, "-q", "1", "-t", "v5i/nl", "-m", "other")
    assert a.get().payload == b"other", "own message delivered despite No Local"


def test_v5_interop_retain_handling(brokers, paho5):
    """mosquitto_pub -V 5 -r leaves a retained message; a paho subscription with Retain
    Handling 0 gets it, a re-subscription with 1 does not, a new one with 2 does not (a live
    message published next is the next thing received)."""
    b = brokers()
    mosquitto_pub(b.port, "-q", "1", "-r", "-t", "v5i/rh", "-m", "kept")
    a = paho5(b.port, "v5i-rh")
    a.connect()
    assert a.subscribe("v5i/rh", 1, retainHandling=0) == [1]
    m = a.get()
    assert (m.payload, m.retain) == (b"kept", True)
    assert a.subscribe("v5i/rh", 1, retainHandling=1) == [1]
    c = paho5(b.port, "v5i-rh2")
    c.connect()
    assert c.subscribe("v5i/rh", 1, retainHandling=2) == [1]
    mosquitto_pub(b.port, "-q", "1", "-t", "v5i/rh", "-m", "live")
    assert a.get().payload == b"live", "Retain Handling 1 re-sent the retained message"
    assert c.get().payload == b"live", "Retain Handling 2 sent the retained message"


def test_v5_interop_request_response_with_correlation_data(brokers, paho5):
    """Request/response: mosquitto_pub -V 5 sends a request with a Response Topic and
    Correlation Data; a paho responder answers on that topic with the same Correlation Data;
    mosquitto_sub -V 5 on the response topic prints it (-F %D)."""
    b = brokers()
    responder = paho5(b.port, "v5i-rr-responder")
    responder.connect()
    assert responder.subscribe("v5i/rr/request") == [1]
    s = mosquitto_sub(b.port, "-q", "1", "-t", "v5i/rr/reply/+", "-F", "%t %D %p|", "-C", "1", "-W", "10")
    try:
        subscribed(s)
        mosquitto_pub(b.port, "-q", "1", "-t", "v5i/rr/request", "-m", "what time is it",
                      "-D", "publish", "response-topic", "v5i/rr/reply/me",
                      "-D", "publish", "correlation-data", "req-42")
        req = responder.get()
        assert req.properties.ResponseTopic == "v5i/rr/reply/me"
        assert req.properties.CorrelationData == b"req-42"
        responder.publish(req.properties.ResponseTopic, b"noon", CorrelationData=req.properties.CorrelationData)
        assert message_line(s) == b"v5i/rr/reply/me req-42 noon"
        assert s.wait(10) == 0
    finally:
        finish(s)


@pytest.mark.slow
def test_v5_interop_will_delay(brokers, paho5):
    """mosquitto_sub -V 5 with a Will and will-delay-interval 2, killed with SIGKILL: a paho
    subscriber gets the Will, and not before 2 s after the kill (minus timer slack)."""
    b = brokers()
    watch = paho5(b.port, "v5i-will-watch")
    watch.connect()
    assert watch.subscribe("v5i/will/#") == [1]
    s = mosquitto_sub(b.port, "-i", "v5i-will", "-x", "60", "-t", "v5i/nothing", "--will-topic", "v5i/will/gone",
                      "--will-payload", "bye", "--will-qos", "1", "-D", "will", "will-delay-interval", "2")
    try:
        subscribed(s)
        os.kill(s.pid, signal.SIGKILL)
        killed = time.monotonic()
        s.wait(5)
        m = watch.get(timeout=15)
        waited = time.monotonic() - killed
        assert (m.topic, m.payload) == ("v5i/will/gone", b"bye")
        assert waited >= 1.5, f"the Will came {waited:.2f}s after the kill, before its 2 s delay"
    finally:
        finish(s)
