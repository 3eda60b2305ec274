"""[[broker.bridge]] with real processes: two of our brokers bridged, ours bridged to Mosquitto and
Mosquitto bridged to ours (its `connection` section, a CONNECT with level 0x84), prefixes in
every direction, no loops with `both`, an upstream stopped under QoS 1 load, kill -9 of the
local broker with a queue for the remote, failover to the second address, TLS with
bridge_cafile, and the config errors."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests.integration.test_broker_interop import paho_client, subscribe_sync
from tests.integration.test_broker_listeners import _ca, _leaf, tls
from tests.support import BIN, Mosquitto, free_port, wait_for

BROKER = str(BIN / "iot-broker")


def bridge(name: str, *addresses: int, topics: tuple[str, ...], **more: object) -> str:
    """A [[broker.bridge]] table to these loopback ports."""
    lines = ["[[broker.bridge]]", f'name = "{name}"',
             "address = [" + ", ".join(f'"127.0.0.1:{p}"' for p in addresses) + "]",
             "topic = [" + ", ".join("'" + t + "'" for t in topics) + "]", "restart_timeout = 0.3"]
    for k, v in more.items():
        lines.append(f"{k} = " + (f'"{v}"' if isinstance(v, (str, Path)) else str(v).lower()))
    return "\n".join(lines) + "\n"


def own_store(tmp_path: Path, name: str) -> str:
    """[broker] lines giving a broker a store of its own (broker_factory's share a state_dir)."""
    return f'persistence_location = "{tmp_path / name}"\nsys_interval = 1\n'


def wait_up(port: int, name: str = "", timeout: float = 20) -> None:
    """Until the broker on `port` says its bridge is connected and subscribed (Mosquitto's
    retained $SYS/broker/connection/<clientid>/state)."""
    c, inbox = paho_client(port)
    try:
        subscribe_sync(c, [("$SYS/broker/connection/+/state", 0)])
        deadline = time.monotonic() + timeout
        while True:
            m = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if m.payload == b"1" and name in m.topic:
                return
    except queue.Empty:
        raise AssertionError(f"no bridge {name!r} connected on port {port} within {timeout}s") from None
    finally:
        c.disconnect()
        c.loop_stop()


def collect(inbox: queue.Queue, n: int, timeout: float = 20) -> list[tuple[str, bytes]]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            m = inbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"{len(got)} of {n} messages within {timeout}s: {got[-5:]}") from None
        got.append((m.topic, m.payload))
    return got


def quiet(inbox: queue.Queue, after: float = 1.0) -> list[tuple[str, bytes]]:
    """What else arrives within `after` seconds (a loop would show here)."""
    extra = []
    try:
        while True:
            m = inbox.get(timeout=after)
            extra.append((m.topic, m.payload))
    except queue.Empty:
        return extra


def publish_all(c: paho.Client, topic: str, n: int, qos: int = 1) -> None:
    for i in range(n):
        c.publish(topic, str(i).encode(), qos).wait_for_publish(20)


def in_order_none_lost(payloads: list[bytes], n: int) -> None:
    """At least once, in order: every number 0..n-1 arrived, first arrivals ascending."""
    firsts = list(dict.fromkeys(int(p) for p in payloads))
    assert firsts == list(range(n)), (len(firsts), [x for x in range(n) if x not in set(firsts)][:10])


def stop(*clients: paho.Client) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


# -- our broker to our broker ------------------------------------------------------------------


@pytest.mark.slow
def test_two_of_our_brokers_bridge_in_out_and_both_with_prefixes_and_no_loops(broker_factory, tmp_path):
    remote = broker_factory(own_store(tmp_path, "r"))
    local = broker_factory(own_store(tmp_path, "l") + bridge(
        "up", remote.port, topics=("x/# out 1 a/ b/", "y/# in 1 a/ b/", "z/# both 1", '"" out 1 one/topic far/one')))
    wait_up(local.port, "up")
    lc, linbox = paho_client(local.port)
    rc, rinbox = paho_client(remote.port)
    subscribe_sync(lc, [("a/y/#", 1), ("z/#", 1)])
    subscribe_sync(rc, [("b/x/#", 1), ("z/#", 1), ("far/#", 1), ("x/#", 1), ("y/#", 1)])
    try:
        lc.publish("a/x/1", b"out", 1).wait_for_publish(10)
        assert collect(rinbox, 1) == [("b/x/1", b"out")]  # local prefix a/ became b/
        rc.publish("b/y/2", b"in", 1).wait_for_publish(10)
        assert collect(linbox, 1) == [("a/y/2", b"in")]
        lc.publish("one/topic", b"single", 1).wait_for_publish(10)
        assert collect(rinbox, 1) == [("far/one", b"single")]
        # both: each side's message reaches the other once and never comes back.
        lc.publish("z/from-local", b"L", 1).wait_for_publish(10)
        rc.publish("z/from-remote", b"R", 1).wait_for_publish(10)
        got_r = collect(rinbox, 2)
        got_l = collect(linbox, 2)
        assert sorted(got_r) == [("z/from-local", b"L"), ("z/from-remote", b"R")]
        assert sorted(got_l) == [("z/from-local", b"L"), ("z/from-remote", b"R")]
        assert quiet(rinbox) == [] and quiet(linbox, 0.2) == []
        # Topics outside the bridge's patterns stay where they were published.
        lc.publish("a/y/not-out", b"no", 1).wait_for_publish(10)
        rc.publish("b/x/not-in", b"no", 1).wait_for_publish(10)
        assert collect(linbox, 1) == [("a/y/not-out", b"no")]
        assert collect(rinbox, 1) == [("b/x/not-in", b"no")]
        assert quiet(rinbox, 0.5) == [] and quiet(linbox, 0.2) == []
        lc.publish("x/unprefixed", b"no", 1).wait_for_publish(10)
        assert quiet(rinbox, 0.5) == []
        status = local.notify.wait_for("STATUS=clients=", 15)
        assert "bridges=up:up/q=0" in status
    finally:
        stop(lc, rc)


@pytest.mark.slow
def test_upstream_stopped_under_qos1_load_gets_every_message_in_order(broker_factory, tmp_path):
    n = 3000
    remote = broker_factory(own_store(tmp_path, "r"))
    local = broker_factory(own_store(tmp_path, "l") + bridge("up", remote.port, topics=("load/# out 1",)))
    wait_up(local.port, "up")
    far, inbox = paho_client(remote.port, "far", clean=False)
    subscribe_sync(far, [("load/#", 1)])
    pub, _ = paho_client(local.port, "pub")
    published = []
    t = threading.Thread(target=lambda: [published.append(i) or pub.publish("load/seq", str(i).encode(), 1)
                                         .wait_for_publish(30) for i in range(n)], daemon=True)
    t.start()
    try:
        got = collect(inbox, 300, 30)
        remote.proc.stop()  # the upstream goes away mid-stream
        wait_for(lambda: len(published) > 1500, 30, what="publishes accepted while the upstream is down")
        remote.proc.start()
        remote.notify.wait_for("READY=1", 15)
        t.join(60)
        assert len(published) == n
        got += collect(inbox, n - len(got), 60)  # at least n (QoS 1: a resend may repeat)
        in_order_none_lost([p for _, p in got] + [p for _, p in quiet(inbox, 1.0)], n)
    finally:
        stop(far, pub)


@pytest.mark.slow
def test_kill_9_of_the_local_broker_keeps_the_queue_for_the_upstream(broker_factory, daemon, tmp_path):
    n = 500
    remote_port = free_port()
    local = broker_factory(own_store(tmp_path, "l") + bridge("up", remote_port, topics=("k/# out 2",)))
    pub, _ = paho_client(local.port, "pub")
    publish_all(pub, "k/seq", n)  # each PUBACKed: on disk in the bridge's queue
    stop(pub)
    local.proc.signal(signal.SIGKILL)
    local.proc.wait(10)
    remote = broker_factory(own_store(tmp_path, "r"), port=remote_port)
    far, inbox = paho_client(remote.port, "far", clean=False)
    subscribe_sync(far, [("k/#", 2)])
    try:
        local.proc.start()
        local.notify.wait_for("READY=1", 15)
        got = collect(inbox, n, 30)
        assert [int(p) for _, p in got] == list(range(n))  # QoS 2 both ways: exactly once, in order
        assert quiet(inbox, 0.5) == []
    finally:
        stop(far)


@pytest.mark.slow
def test_failover_to_the_second_address(broker_factory, tmp_path):
    remote = broker_factory(own_store(tmp_path, "r"))
    dead = free_port()
    local = broker_factory(own_store(tmp_path, "l") + bridge("fo", dead, remote.port, topics=("f/# out 1",)))
    wait_up(local.port, "fo")
    log = local.proc.log()
    assert "connect failed" in log and f"address=127.0.0.1:{dead}" in log
    assert f"bridge: connected to 127.0.0.1:{remote.port}" in log
    rc, inbox = paho_client(remote.port)
    subscribe_sync(rc, [("f/#", 1)])
    lc, _ = paho_client(local.port)
    try:
        lc.publish("f/1", b"via second", 1).wait_for_publish(10)
        assert collect(inbox, 1) == [("f/1", b"via second")]
    finally:
        stop(rc, lc)


@pytest.mark.slow
def test_tls_to_the_remote_verified_with_bridge_cafile(broker_factory, tmp_path):
    d = tmp_path / "pki"
    d.mkdir()
    ca = _ca(d, "ca")
    server = _leaf(d, "ca", "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    other_ca = _ca(d, "other")
    tls_port = free_port()
    remote = broker_factory(own_store(tmp_path, "r") + f"[[broker.listener]]\nport = {tls_port}\n" + tls(server))
    good = broker_factory(own_store(tmp_path, "g") + bridge("tls", tls_port, topics=("t/# out 1",), bridge_cafile=ca))
    wait_up(good.port, "tls")
    bad = broker_factory(own_store(tmp_path, "b") + bridge("rogue", tls_port, topics=("t/# out 1",),
                                                           bridge_cafile=other_ca))
    rc, inbox = paho_client(remote.port)
    subscribe_sync(rc, [("t/#", 1)])
    lc, _ = paho_client(good.port)
    try:
        lc.publish("t/1", b"over tls", 1).wait_for_publish(10)
        assert collect(inbox, 1) == [("t/1", b"over tls")]
        wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in bad.proc.log(), 15, what="the unknown CA refused")
        assert "bridge: connected" not in bad.proc.log()
    finally:
        stop(rc, lc)


# -- with Mosquitto ----------------------------------------------------------------------------


@pytest.mark.slow
def test_our_broker_bridged_to_mosquitto_in_out_both(broker_factory, mosquitto, tmp_path):
    local = broker_factory(own_store(tmp_path, "l") + bridge(
        "mq", mosquitto.port, topics=("o/# out 1 loc/ rem/", "i/# in 1 loc/ rem/", "b/# both 2")))
    wait_up(local.port, "mq")
    lc, linbox = paho_client(local.port)
    mc, minbox = paho_client(mosquitto.port)
    subscribe_sync(lc, [("loc/i/#", 1), ("b/#", 2)])
    subscribe_sync(mc, [("rem/o/#", 1), ("b/#", 2)])
    try:
        lc.publish("loc/o/1", b"out", 1).wait_for_publish(10)
        assert collect(minbox, 1) == [("rem/o/1", b"out")]
        mc.publish("rem/i/1", b"in", 1).wait_for_publish(10)
        assert collect(linbox, 1) == [("loc/i/1", b"in")]
        lc.publish("b/l", b"L", 2).wait_for_publish(10)
        mc.publish("b/m", b"M", 2).wait_for_publish(10)
        assert sorted(collect(minbox, 2)) == [("b/l", b"L"), ("b/m", b"M")]
        assert sorted(collect(linbox, 2)) == [("b/l", b"L"), ("b/m", b"M")]
        assert quiet(minbox) == [] and quiet(linbox, 0.2) == []
        assert "level=0x84" in local.proc.log()  # Mosquitto took the bridge CONNECT
    finally:
        stop(lc, mc)


@pytest.mark.slow
def test_mosquitto_bridged_to_our_broker_with_its_0x84_connect(broker_factory, tmp_path):
    ours = broker_factory(own_store(tmp_path, "o") + "log_type = [\"all\"]\n")
    (tmp_path / "mq").mkdir()
    m = Mosquitto(tmp_path / "mq", conf=(
        f"connection ours\naddress 127.0.0.1:{ours.port}\nremote_clientid mosq-bridge\ntry_private true\n"
        "cleansession false\nrestart_timeout 1\n"
        "topic o/# out 1 mloc/ ours/\ntopic i/# in 1 mloc/ ours/\ntopic b/# both 1\n")).start()
    try:
        wait_for(lambda: "New client connected" in ours.proc.log() and "mosq-bridge" in ours.proc.log(), 20,
                 what="Mosquitto's bridge to connect")
        oc, oinbox = paho_client(ours.port)
        mc, minbox = paho_client(m.port)
        subscribe_sync(oc, [("ours/o/#", 1), ("b/#", 1)])
        subscribe_sync(mc, [("mloc/i/#", 1), ("b/#", 1)])
        # Mosquitto subscribes on us after its CONNACK: wait until our side holds its filters.
        wait_for(lambda: "mosq-bridge 1 ours/i/#" in ours.proc.log() or "ours/i/#" in ours.proc.log(), 20,
                 what="Mosquitto's bridge subscriptions")
        wait_for(lambda: "b/#" in ours.proc.log().split("mosq-bridge", 1)[-1], 20, what="the both subscription")
        mc.publish("mloc/o/1", b"out", 1).wait_for_publish(10)
        assert collect(oinbox, 1) == [("ours/o/1", b"out")]
        oc.publish("ours/i/1", b"in", 1).wait_for_publish(10)
        assert collect(minbox, 1) == [("mloc/i/1", b"in")]
        oc.publish("b/o", b"O", 1).wait_for_publish(10)
        mc.publish("b/m", b"M", 1).wait_for_publish(10)
        assert sorted(collect(oinbox, 2)) == [("b/m", b"M"), ("b/o", b"O")]
        assert sorted(collect(minbox, 2)) == [("b/m", b"M"), ("b/o", b"O")]
        assert quiet(oinbox) == [] and quiet(minbox, 0.2) == []  # no echo back over the bridge
        stop(oc, mc)
    finally:
        m.stop()


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("table, expected", [
    ('name = "b"\naddress = ["127.0.0.1:1"]\ntopic = ["a/# sideways 1"]\n',
     "[[broker.bridge]] #1 topic: expected a direction out, in or both, got 'sideways'"),
    ('name = "b"\naddress = ["127.0.0.1:1"]\ntopic = ["a/# out 3"]\n',
     "[[broker.bridge]] #1 topic: expected a QoS 0, 1 or 2, got '3'"),
    ('name = "b"\naddress = ["127.0.0.1:1"]\ntopic = ["a/# out 1 onlyone"]\n',
     "[[broker.bridge]] #1 topic: expected \"PATTERN [out|in|both [QOS [LOCAL_PREFIX REMOTE_PREFIX]]]\""),
    ('name = "b"\naddress = ["127.0.0.1:1"]\ntopic = ["a/#/b out 1"]\n',
     "[[broker.bridge]] #1 topic: not a topic filter"),
    ('name = "b"\naddress = ["127.0.0.1:1"]\ntopic = [\'"" out 1 a ""\']\n',
     "[[broker.bridge]] #1 topic: an empty pattern (\"\") needs a local and a remote prefix"),
    ('name = "b"\ntopic = ["a/# out 1"]\n', "[[broker.bridge]] #1 address: missing"),
    ('name = "b"\naddress = ["nowhere"]\ntopic = ["a/# out 1"]\n',
     "[[broker.bridge]] #1 address: expected \"host:port\""),
    ('name = "b"\naddress = ["127.0.0.1:1"]\ntopic = ["a/# out 1"]\ncolour = 1\n',
     "[[broker.bridge]] #1 colour: unknown key"),
])
def test_a_bad_bridge_table_is_a_one_line_config_error(tmp_path, table, expected):
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f"[broker]\nport = {free_port()}\n[[broker.bridge]]\n{table}")
    r = subprocess.run([BROKER, "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(cfg) in lines[0], lines


def test_a_client_cannot_take_a_bridge_session(broker_factory, tmp_path):
    from tests import mqttraw

    local = broker_factory(own_store(tmp_path, "l") + bridge("up", free_port(), topics=("a/# out 1",)))
    with mqttraw.RawClient(local.port) as c:
        c.send(mqttraw.connect("$bridge/up"))
        c.expect(mqttraw.connack(2), what="identifier rejected")


