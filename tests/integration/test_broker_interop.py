"""Interop: real clients (mosquitto_pub/sub, paho-mqtt) through iot-broker, and the same
scenario through Mosquitto in the same test, so our broker is held to the reference message by
message."""

from __future__ import annotations

import queue
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import read_until, wait_for

FMT = "%t|%q|%r|%p"  # topic | qos | retain flag | payload


class Sub:
    """mosquitto_sub -d whose output is drained as it comes, so it never blocks on a full pipe."""

    def __init__(self, port: int, *args: str):
        self.p = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-d", "-p", str(port), "-F", FMT, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.subacked = threading.Event()
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()
        if not self.subacked.wait(10):
            self.p.kill()
            raise AssertionError(f"mosquitto_sub got no SUBACK: {self.lines}")

    def _drain(self) -> None:
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if "received SUBACK" in line:
                self.subacked.set()
            self.lines.append(line)

    def messages(self, timeout: float = 20) -> list[str]:
        self.p.wait(timeout)
        self.t.join(5)
        # -d also prints protocol lines; messages are the lines in our -F format.
        return [x for x in self.lines if x.count("|") >= 3 and not x.startswith("Client ")]


def mosq_sub(port: int, *args: str) -> Sub:
    return Sub(port, *args)


def messages(sub: Sub, timeout: float = 20) -> list[str]:
    return sub.messages(timeout)


def mosq_pub(port: int, *args: str, input: bytes | None = None) -> None:
    r = subprocess.run(["mosquitto_pub", "-p", str(port), *args], capture_output=True, input=input, timeout=20)
    assert r.returncode == 0, r.stderr


def paho_client(port: int, client_id: str = "", clean: bool = True, **kw) -> tuple[paho.Client, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                    protocol=paho.MQTTv311, **kw)
    c.on_message = lambda _c, _u, m: inbox.put(m)
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    return c, inbox


def subscribe_sync(c: paho.Client, topics: list[tuple[str, int]]) -> None:
    done = []
    c.on_subscribe = lambda *a: done.append(1)
    c.subscribe(topics)
    wait_for(lambda: done, 5, what="SUBACK")


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_clients_round_trip_each_qos(any_broker, qos):
    sub = mosq_sub(any_broker, "-t", "i/q", "-q", str(qos), "-C", "3", "-W", "15")
    for i in range(3):
        mosq_pub(any_broker, "-t", "i/q", "-q", str(qos), "-m", f"m{i}")
    assert messages(sub) == [f"i/q|{qos}|0|m{i}" for i in range(3)]


def test_retained_set_delivered_with_flag_then_cleared(any_broker):
    mosq_pub(any_broker, "-t", "i/ret", "-q", "1", "-r", "-m", "kept")
    live = mosq_sub(any_broker, "-t", "i/#", "-q", "1", "-C", "2", "-W", "15")
    mosq_pub(any_broker, "-t", "i/ret", "-q", "1", "-r", "-m", "new")
    # The late subscriber got the stored one with retain=1, then the live one with retain=0.
    assert messages(live) == ["i/ret|1|1|kept", "i/ret|1|0|new"]
    mosq_pub(any_broker, "-t", "i/ret", "-r", "-n")
    # Nothing retained is left: a new subscriber's first message is a live one published after
    # its SUBACK (a retained one would be sent before it, on subscribing).
    late = mosq_sub(any_broker, "-t", "i/#", "-q", "1", "-C", "1", "-W", "15")
    mosq_pub(any_broker, "-t", "i/live", "-q", "1", "-m", "live")
    assert messages(late) == ["i/live|1|0|live"]


def test_wildcards_deliver_the_same_set(any_broker):
    sub = mosq_sub(any_broker, "-t", "w/+/c", "-t", "w/#", "-t", "+/x", "-q", "1", "-C", "4", "-W", "15")
    for t in ("w/b/c", "w/b/d", "q/x", "w/b/c/d"):
        mosq_pub(any_broker, "-t", t, "-q", "1", "-m", t)
    # w/b/c matches two filters but is delivered once; q/x matches +/x only.
    assert sorted(messages(sub)) == sorted(["w/b/c|1|0|w/b/c", "w/b/d|1|0|w/b/d", "q/x|1|0|q/x",
                                            "w/b/c/d|1|0|w/b/c/d"])


def test_persistent_session_queues_while_away(any_broker):
    # Establish the session and its subscription, then leave.
    r = subprocess.run(["mosquitto_sub", "-p", str(any_broker), "-c", "-i", "persist-1", "-q", "1", "-t", "p/#",
                        "-E"], capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    for i in range(5):
        mosq_pub(any_broker, "-t", f"p/{i}", "-q", str(1 + i % 2), "-m", f"queued {i}")
    r = subprocess.run(["mosquitto_sub", "-p", str(any_broker), "-c", "-i", "persist-1", "-q", "1", "-t", "p/#",
                        "-C", "5", "-W", "10", "-F", FMT], capture_output=True, timeout=20)
    assert r.stdout.decode().splitlines() == [f"p/{i}|1|0|queued {i}" for i in range(5)]


def test_will_published_when_client_vanishes(any_broker):
    sub = mosq_sub(any_broker, "-t", "status/#", "-q", "1", "-C", "1", "-W", "15")
    child = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-p", str(any_broker), "-t", "nothing", "-q", "1", "-d",
                              "--will-topic", "status/dev1", "--will-payload", "offline", "--will-qos", "1"],
                             stdout=subprocess.PIPE)
    read_until(child.stdout, b"SUBACK", 10)  # the will client is connected and subscribed
    child.kill()
    child.wait(5)
    assert messages(sub) == ["status/dev1|1|0|offline"]


def test_paho_qos2_exactly_once_in_order(any_broker):
    sub, inbox = paho_client(any_broker, "xo-sub")
    subscribe_sync(sub, [("xo/#", 2)])
    pub, _ = paho_client(any_broker, "xo-pub")
    infos = [pub.publish("xo/t", str(i).encode(), qos=2) for i in range(300)]
    for info in infos:
        info.wait_for_publish(10)
    # A last message marks the end: the broker keeps one publisher's QoS 2 messages in order
    # [MQTT-4.6.0-6], so any duplicate of the 300 would arrive before it.
    pub.publish("xo/t", b"end", qos=2).wait_for_publish(10)
    got = []
    deadline = time.monotonic() + 20
    while not got or got[-1] != b"end":
        assert len(got) <= 301, got
        try:
            got.append(inbox.get(timeout=max(0.0, deadline - time.monotonic())).payload)
        except queue.Empty:
            raise AssertionError(f"the end marker did not arrive; got {len(got)} messages") from None
    pub.disconnect(), sub.disconnect(), pub.loop_stop(), sub.loop_stop()
    assert got == [str(i).encode() for i in range(300)] + [b"end"]


def test_large_payload_round_trip(any_broker):
    payload = bytes(range(256)) * 4096  # 1 MiB
    sub, inbox = paho_client(any_broker)
    subscribe_sync(sub, [("big", 1)])
    pub, _ = paho_client(any_broker)
    pub.publish("big", payload, qos=1).wait_for_publish(10)
    msg = inbox.get(timeout=10)
    pub.disconnect(), sub.disconnect(), pub.loop_stop(), sub.loop_stop()
    assert msg.payload == payload


def test_many_qos1_lines_arrive_in_order(any_broker):
    n = 2000
    sub = mosq_sub(any_broker, "-t", "lines", "-q", "1", "-C", str(n), "-W", "30")
    mosq_pub(any_broker, "-t", "lines", "-q", "1", "-l", input="".join(f"{i}\n" for i in range(n)).encode())
    assert [m.split("|")[3] for m in messages(sub, 40)] == [str(i) for i in range(n)]


def test_python_mqtt31_client_accepted(any_broker):
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="old-client", protocol=paho.MQTTv31)
    rc = []
    c.on_connect = lambda _c, _u, _f, reason, _p: rc.append(reason.value)
    c.connect("127.0.0.1", any_broker)
    c.loop_start()
    wait_for(lambda: rc, 5, what="CONNACK")
    c.disconnect()
    c.loop_stop()
    assert rc == [0]
