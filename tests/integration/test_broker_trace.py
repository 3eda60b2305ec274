"""The packet trace (`iot-broker -v`, `[broker] log_type`) against Mosquitto 2.0.11's verbose
log: one client scenario (paho-mqtt, mosquitto_pub/sub and a raw-socket client) run through
our broker with -v and through Mosquitto with `log_type all` (what its -v sets), in the same
test; the lines about the packets must be the same set once timestamps, our log prefix and
port numbers are taken out. Then: no trace without -v, log_type applied on SIGHUP and
whatever [log] level says, WebSocket connections traced, a bad name refused at start."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.mqttraw import RawClient, Will, connect, publish, pubrel
from tests.support import BIN, Mosquitto, free_port, wait_for

OURS = " iot-broker.packets: "


def our_lines(log: str) -> list[str]:
    return [line.split(OURS, 1)[1] for line in log.splitlines() if OURS in line]


def mosquitto_lines(log: str) -> list[str]:
    """After Mosquitto's "running" line, without its timestamps and its own start/stop lines."""
    body = log.split(" running\n", 1)[1] if " running\n" in log else ""
    lines = [re.sub(r"^\d+: ", "", line) for line in body.splitlines()]
    return [line for line in lines if not line.startswith("mosquitto version")]


def normalised(lines: list[str]) -> set[str]:
    """Client ports and listener ports differ by nature between the two runs."""
    out = set()
    for line in lines:
        line = re.sub(r"(127\.0\.0\.1|::ffff:127\.0\.0\.1):\d+", "127.0.0.1:PORT", line)
        out.add(re.sub(r" on port \d+\.$", " on port LISTENER.", line))
    return out


def wait_lines(read: Callable[[], set[str]], *expected: str) -> None:
    wait_for(lambda: set(expected) <= read(), 15, what=f"{set(expected) - read()} in the broker's log")


def paho_client(port: int, client_id: str, transport: str = "tcp") -> tuple[paho.Client, queue.Queue]:
    inbox: queue.Queue = queue.Queue()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, transport=transport)
    c.on_message = lambda _c, _u, m: inbox.put((m.topic, m.payload, m.qos, m.retain))
    c.connect("127.0.0.1", port, 60)
    c.loop_start()
    return c, inbox


def mosquitto_client(tool: str, port: int, *args: str) -> str:
    r = subprocess.run([tool, "-p", str(port), *args], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout


# What the scenario must make each broker log, in Mosquitto's words (ports normalised).
QOS1 = ["Received PUBLISH from plc-1 (d0, q1, r0, m1, 'sensor/q1', ... (7 bytes))",
        "Sending PUBLISH to dbsub (d0, q1, r0, m1, 'sensor/q1', ... (7 bytes))",
        "Sending PUBACK to plc-1 (m1, rc0)",
        "Received PUBACK from dbsub (Mid: 1, RC:0)"]
QOS2_IN = ["Received PUBLISH from plc-2 (d0, q2, r1, m1, 'sensor/q2', ... (5 bytes))",
           "Sending PUBREC to plc-2 (m1, rc0)",
           "Received PUBREL from plc-2 (Mid: 1)",
           "Sending PUBCOMP to plc-2 (m1)"]
QOS2_OUT = ["Sending PUBLISH to dbsub (d0, q2, r0, m2, 'sensor/q2', ... (5 bytes))",
            "Received PUBREC from dbsub (Mid: 2)",
            "Sending PUBREL to dbsub (m2)",
            "Received PUBCOMP from dbsub (Mid: 2, RC:0)"]
SUBSCRIBE = ["New client connected from 127.0.0.1:PORT as dbsub (p2, c1, k60).",
             "Sending CONNACK to dbsub (0, 0)",
             "Received SUBSCRIBE from dbsub", "\tsensor/q1 (QoS 1)", "dbsub 1 sensor/q1",
             "\tsensor/q2 (QoS 2)", "dbsub 2 sensor/q2", "Sending SUBACK to dbsub"]
RETAINED = ["late 1 sensor/q2", "Sending PUBLISH to late (d0, q1, r1, m1, 'sensor/q2', ... (5 bytes))",
            "Received PUBACK from late (Mid: 1, RC:0)", "Client late disconnected."]
WILL = ["New client connected from 127.0.0.1:PORT as plc-3 (p2, c1, k60, u'bob').",
        "Will message specified (3 bytes) (r0, q1).", "\tsensor/q1",
        "Received PUBLISH from plc-3 (d0, q0, r0, m0, 'sensor/q1', ... (1 bytes))",
        "Sending PUBLISH to dbsub (d0, q0, r0, m0, 'sensor/q1', ... (1 bytes))",
        "Received PINGREQ from plc-3", "Sending PINGRESP to plc-3",
        "Client plc-3 closed its connection.",
        "Sending PUBLISH to dbsub (d0, q1, r0, m3, 'sensor/q1', ... (3 bytes))",
        "Received PUBACK from dbsub (Mid: 3, RC:0)"]
UNSUBSCRIBE = ["Received UNSUBSCRIBE from dbsub", "\tsensor/q2", "dbsub sensor/q2", "\tnot/subscribed",
               "dbsub not/subscribed", "Sending UNSUBACK to dbsub"]
END = ["Received DISCONNECT from dbsub", "Client dbsub disconnected."]


def scenario(port: int, read: Callable[[], set[str]] | None) -> None:
    """The client traffic. With `read` (the broker's trace, normalised) each step also waits
    until its lines are logged, so the next one starts from a known state."""

    def step(*lines: str) -> None:
        if read is not None:
            wait_lines(read, *lines)

    sub, inbox = paho_client(port, "dbsub")
    subscribed = queue.Queue()
    sub.on_subscribe = lambda *a: subscribed.put(1)
    sub.subscribe([("sensor/q1", 1), ("sensor/q2", 2)])
    subscribed.get(timeout=10)
    step(*SUBSCRIBE)
    # QoS 1 to a QoS 1 subscription; QoS 2 (retained) to a QoS 2 one.
    mosquitto_client("mosquitto_pub", port, "-i", "plc-1", "-q", "1", "-t", "sensor/q1", "-m", "1234567")
    assert inbox.get(timeout=10) == ("sensor/q1", b"1234567", 1, False)
    step(*QOS1, "Client plc-1 disconnected.")
    mosquitto_client("mosquitto_pub", port, "-i", "plc-2", "-q", "2", "-r", "-t", "sensor/q2", "-m", "12345")
    assert inbox.get(timeout=10) == ("sensor/q2", b"12345", 2, False)
    step(*QOS2_IN, *QOS2_OUT, "Client plc-2 disconnected.")
    # The retained message, to a subscriber that comes later.
    got = mosquitto_client("mosquitto_sub", port, "-i", "late", "-q", "1", "-t", "sensor/q2", "-C", "1", "-W", "10")
    assert got == "12345\n"
    step(*RETAINED)
    # A will and a user name; a QoS 0 message and a ping, then the client vanishes.
    c = RawClient(port)
    c.connect_ok("plc-3", will=Will("sensor/q1", b"bye", 1), username="bob")
    c.send(publish("sensor/q1", b"x"))
    assert c.is_open()  # PINGREQ answered: the PUBLISH before it was handled
    c.close()
    assert inbox.get(timeout=10) == ("sensor/q1", b"x", 0, False)
    assert inbox.get(timeout=10) == ("sensor/q1", b"bye", 1, False)
    step(*WILL)
    unsubscribed = queue.Queue()
    sub.on_unsubscribe = lambda *a: unsubscribed.put(1)
    sub.unsubscribe(["sensor/q2", "not/subscribed"])
    unsubscribed.get(timeout=10)
    step(*UNSUBSCRIBE)
    sub.disconnect()
    sub.loop_stop()
    step(*END)


def test_the_trace_is_mosquittos_verbose_log_line_for_line(broker_factory, tmp_path):
    ours = broker_factory("", "-v")
    m = Mosquitto(tmp_path, conf="log_type all\n").start()  # -v sets log_type all
    try:
        scenario(m.port, lambda: normalised(mosquitto_lines(m.proc.log())))
        theirs = normalised(mosquitto_lines(m.proc.log()))
    finally:
        m.stop()
    scenario(ours.port, lambda: normalised(our_lines(ours.proc.log())))
    mine = normalised(our_lines(ours.proc.log()))
    assert mine == theirs, f"only ours: {sorted(mine - theirs)}\nonly Mosquitto's: {sorted(theirs - mine)}"
    for line in (*QOS1, *QOS2_IN, *QOS2_OUT, "New connection from 127.0.0.1:PORT on port LISTENER."):
        assert line in mine
    # Mosquitto's order for what one packet causes: QoS 1 routed before the PUBACK goes back.
    lines = our_lines(ours.proc.log())
    assert lines.index(QOS1[0]) < lines.index(QOS1[1]) < lines.index(QOS1[2])


def test_no_trace_without_v_and_with_the_default_log_type(broker_factory, tmp_path):
    """[log] level = "debug" shows the broker's own debug lines, not the trace: log_type decides."""
    b = broker_factory('[log]\nlevel = "debug"\n')
    scenario(b.port, None)
    b.proc.stop()
    log = b.proc.log()
    assert "client connected" in log  # the broker's own debug line: the scenario ran, debug is on
    assert OURS not in log
    for line in (*QOS1, *QOS2_IN, *SUBSCRIBE[1:], *END, "New connection from"):
        assert line not in log


def test_log_type_shows_its_lines_whatever_log_level_says_and_sighup_applies_it(broker_factory):
    b = broker_factory('log_type = ["subscribe"]\n[log]\nlevel = "warning"\n')
    c = RawClient(b.port)
    c.connect_ok("watcher").subscribe_ok([("a/b", 1)])
    wait_for(lambda: "watcher 1 a/b" in our_lines(b.proc.log()), 10, what="the subscribe line")
    assert "Received SUBSCRIBE from watcher" not in our_lines(b.proc.log())  # "debug" is not on
    b.config.write_text(b.config.read_text().replace('log_type = ["subscribe"]', 'log_type = ["debug"]'))
    b.proc.signal(signal.SIGHUP)

    def pinged() -> bool:  # the connection opened before the reload is traced from then on
        assert c.is_open()
        return "Received PINGREQ from watcher" in our_lines(b.proc.log())

    wait_for(pinged, 10, what="the trace after SIGHUP")
    assert "Sending PINGRESP to watcher" in our_lines(b.proc.log())
    c.disconnect()
    wait_for(lambda: "Client watcher disconnected." in our_lines(b.proc.log()), 10, what="the DISCONNECT line")


def test_websocket_connections_are_traced_as_mosquitto_traces_them(broker_factory, tmp_path):
    ws = free_port()
    b = broker_factory(f'[[broker.listener]]\nport = {ws}\nprotocol = "websockets"\n', "-v")
    m_ws = free_port()
    m = Mosquitto(tmp_path, conf=f"log_type all\nlistener {m_ws} 127.0.0.1\nprotocol websockets\n").start()
    expected = ["New client connected from 127.0.0.1:PORT as ws-1 (p2, c1, k60).",
                "Received PUBLISH from ws-1 (d0, q1, r0, m1, 'w/s', ... (2 bytes))", "Sending PUBACK to ws-1 (m1, rc0)",
                "Received DISCONNECT from ws-1", "Client ws-1 disconnected."]
    runs = []
    try:
        for port, read in ((m_ws, lambda: normalised(mosquitto_lines(m.proc.log()))),
                           (ws, lambda: normalised(our_lines(b.proc.log())))):
            c, _ = paho_client(port, "ws-1", transport="websockets")
            c.publish("w/s", b"hi", 1).wait_for_publish(10)
            c.disconnect()
            c.loop_stop()
            wait_lines(read, *expected)
            runs.append(read())
    finally:
        m.stop()
    assert runs[1] == runs[0]
    assert not any(line.startswith("New connection from") for line in runs[1])  # none for a WebSocket


def test_an_unknown_log_type_ends_the_start_with_one_line_and_78(tmp_path):
    cfg = tmp_path / "iot.toml"
    cfg.write_text('[broker]\nlog_type = ["debug", "packets"]\n')
    r = subprocess.run([str(BIN / "iot-broker"), "--config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 78
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{cfg}: [broker] log_type: expected a list of strings from debug" in lines[0], r.stderr


def refusals_and_closes(port: int, read: Callable[[], set[str]]) -> None:
    """Connections refused, closed by the client, taken over, closed for a protocol error."""
    r = RawClient(port)
    r.send(connect("anon"))  # no user name: refused
    assert r.read_until_closed() == b"\x20\x02\x00\x05"
    r = RawClient(port)
    r.send(connect("v3", proto_level=3))  # "MQTT" is level 4
    assert r.read_until_closed() == b"\x20\x02\x00\x01"
    wait_lines(read, "Sending CONNACK to 127.0.0.1 (0, 5)", "Client <unknown> disconnected, not authorised.",
               "Sending CONNACK to 127.0.0.1 (0, 1)", "Client <unknown> disconnected due to protocol error.")
    RawClient(port).close()  # gone before CONNECT
    wait_lines(read, "Client <unknown> closed its connection.")
    first = RawClient(port).connect_ok("twin", username="bob", password=b"pw")
    RawClient(port).connect_ok("twin", username="bob", password=b"pw")
    first.expect_closed()
    wait_lines(read, "Client twin already connected, closing old connection.")
    bad = RawClient(port).connect_ok("bad", username="bob", password=b"pw")
    bad.send(pubrel(1, flags=0))  # PUBREL's flags must be 0010
    bad.expect_closed()
    wait_lines(read, "Client bad disconnected due to protocol error.")


def test_refusals_and_closes_in_mosquittos_words(broker_factory, tmp_path):
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "bob", "pw"], check=True, capture_output=True, timeout=30)
    ours = broker_factory(f'password_file = "{pw}"\nallow_anonymous = false\n', "-v")
    # As root, Mosquitto would drop to the user "mosquitto", who cannot read pytest's 0700 folders.
    root = "user root\n" if os.geteuid() == 0 else ""
    m = Mosquitto(tmp_path, conf=f"log_type all\npassword_file {pw}\nallow_anonymous false\n{root}").start()
    try:
        refusals_and_closes(m.port, lambda: normalised(mosquitto_lines(m.proc.log())))
        theirs = normalised(mosquitto_lines(m.proc.log()))
    finally:
        m.stop()
    refusals_and_closes(ours.port, lambda: normalised(our_lines(ours.proc.log())))
    mine = normalised(our_lines(ours.proc.log()))
    # Mosquitto says why it refuses a protocol level on a line of its own, which we do not log.
    theirs -= {"Invalid protocol version 3 in CONNECT from 127.0.0.1."}
    assert mine == theirs, f"only ours: {sorted(mine - theirs)}\nonly Mosquitto's: {sorted(theirs - mine)}"


def test_keep_alive_timeout_in_mosquittos_words(broker_factory):
    b = broker_factory("", "-v")
    c = RawClient(b.port).connect_ok("sleepy", keepalive=1)  # then silent
    wait_for(lambda: "Client sleepy has exceeded timeout, disconnecting." in our_lines(b.proc.log()), 10,
             what="the keep-alive line")
    c.expect_closed()
