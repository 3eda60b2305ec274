"""The factory of seed 003 as real processes against our broker with the shipped ACL
(etc/iot/acl): wills, retained state, QoS 0 against QoS 1 for clients that were away, the
controller's rules, every ACL rule and `iotctl bad-actor`."""

from __future__ import annotations

import queue
import signal
import subprocess
import time
from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support import BIN, ROOT, wait_for

pytestmark = pytest.mark.slow

ACL = ROOT / "etc" / "iot" / "acl"
FAST = ('[[factory.device]]\nname = "press"\ninterval = 0.05\n'
        '[[factory.device.sensor]]\nname = "temperature"\nunit = "C"\nlow = 40.0\nhigh = 70.0\nalarm_high = 80.0\n'
        'hysteresis = 3.0\n'
        '[[factory.device]]\nname = "conveyor"\ninterval = 0.05\n'
        '[[factory.device.sensor]]\nname = "speed"\nunit = "m/s"\nlow = 0.8\nhigh = 1.2\n')


class Client:
    """A paho client for the test, as `username` (a role of the ACL) with client id `cid`."""

    def __init__(self, port: int, cid: str, username: str | None = None, clean: bool = True,
                 will: tuple[str, bytes] | None = None):
        self.messages: queue.Queue = queue.Queue()
        self.subacks: queue.Queue = queue.Queue()
        self.connected = queue.Queue()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=clean)
        if username:
            c.username_pw_set(username)
        c.on_message = lambda cl, ud, m: self.messages.put(m)
        c.on_subscribe = lambda cl, ud, mid, codes, p: self.subacks.put([x.value for x in codes])
        c.on_connect = lambda cl, ud, flags, rc, p: self.connected.put((flags.session_present, rc.value))
        self.c = c
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        self.session_present, rc = self.connected.get(timeout=10)
        assert rc == 0

    def subscribe(self, topic: str, qos: int = 1) -> int:
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=10)[0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos, retain).wait_for_publish(10)

    def until(self, pred, timeout: float = 20, what: str = "a message"):
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {what} in {timeout}s") from None
            if pred(m):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {timeout}s")

    def until_all(self, topics: set[str], pred=lambda m: True, timeout: float = 20) -> dict:
        """Until a message on every one of `topics` satisfied `pred` (in any order): topic -> message."""
        got: dict = {}
        while set(got) != topics:
            m = self.until(lambda m: m.topic in topics and pred(m), timeout, f"a message on each of {sorted(topics)}")
            got[m.topic] = m
        return got

    def drain(self) -> list:
        out = []
        while not self.messages.empty():
            out.append(self.messages.get_nowait())
        return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def payload_of(m) -> dict:
    return orjson.loads(m.payload)


@pytest.fixture
def factory(tmp_path: Path, daemon, broker_factory):
    """A broker with the shipped ACL and a config for the factory daemons; returns (port, config)."""
    b = broker_factory(f'acl_file = "{ACL}"\nsys_interval = 0\n')
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[mqtt]\nport = {b.port}\nreconnect_min = 0.05\n'
                   f'reconnect_max = 0.5\n[factory]\n{FAST}')
    clients: list[Client] = []

    def client(*a, **kw) -> Client:
        c = Client(b.port, *a, **kw)
        clients.append(c)
        return c

    yield b, cfg, client
    for c in clients:
        c.close()


def test_a_device_killed_9_or_crashing_on_purpose_goes_offline_by_its_will(factory, daemon):
    b, cfg, client = factory
    probe = client("probe-lwt", "observer")
    assert probe.subscribe("factory/status/#") == 1
    dev, _ = daemon("iot-device", "--config", str(cfg))  # press and conveyor in one process
    probe.until_all({"factory/status/press", "factory/status/conveyor"}, lambda m: payload_of(m)["status"] == "online")
    dev.kill()
    offline = set()
    while offline != {"press", "conveyor"}:  # each device has its own connection, so its own will
        m = probe.until(lambda m: payload_of(m)["status"] == "offline", what="the wills")
        offline.add(payload_of(m)["device_id"])

    crash, _ = daemon("iot-device", "--config", str(cfg), "--device", "press", "--crash-after", "1")
    probe.until(lambda m: m.topic == "factory/status/press" and payload_of(m)["status"] == "online", what="online")
    assert crash.wait(15) != 0
    assert "crashing on purpose" in crash.log()
    probe.until(lambda m: m.topic == "factory/status/press" and payload_of(m)["status"] == "offline",
                what="offline after --crash-after")
    late = client("probe-late", "observer")  # retained: a late subscriber sees it at once
    late.subscribe("factory/status/press")
    m = late.until(lambda m: True, what="the retained status")
    assert m.retain and payload_of(m)["status"] == "offline"


def test_retained_state_and_status_are_there_for_a_late_subscriber(factory, daemon):
    b, cfg, client = factory
    daemon("iot-device", "--config", str(cfg))
    first = client("probe-1", "observer")
    first.subscribe("factory/+/press")
    first.until_all({"factory/state/press", "factory/status/press"})  # published: retained from now on
    late = client("probe-2", "observer")
    assert late.subscribe("factory/+/press") == 1
    got = {t: payload_of(m) for t, m in late.until_all({"factory/state/press", "factory/status/press"},
                                                       lambda m: m.retain).items()}
    assert got["factory/state/press"]["state"] == "running" and got["factory/status/press"]["status"] == "online"
    assert got["factory/state/press"]["setpoints"] == {"temperature": 55.0}


def test_qos0_telemetry_is_missed_while_away_and_qos1_alarms_reach_the_persistent_controller(factory, daemon):
    b, cfg, client = factory
    daemon("iot-device", "--config", str(cfg))
    ctl, _ = daemon("iot-controller", "--config", str(cfg), "--session", "persistent")
    away = client("watcher", "observer", clean=False)  # a persistent session, both at QoS 1
    away.subscribe("factory/telemetry/press/#")
    away.subscribe("factory/alarms/press/#")
    away.until(lambda m: m.topic == "factory/telemetry/press/temperature", what="telemetry")
    away.close()
    ctl.stop()
    # Overheat the press (a setpoint past its alarm threshold) while both are away.
    dash = client("dashboard", "dashboard")
    dash.publish("factory/commands/dashboard/press", b'{"command": "setpoint", "sensor": "temperature", "value": 95}')
    probe = client("probe-alarm", "observer")
    probe.subscribe("factory/alarms/press/#")
    probe.until(lambda m: payload_of(m)["alarm"] == "raised", what="the alarm raised")
    time.sleep(0.2)  # telemetry keeps flowing at QoS 0 meanwhile (every 0.05 s)

    back = Client(b.port, "watcher", "observer", clean=False)
    try:
        assert back.session_present
        m = back.until(lambda m: True, what="what was kept for the session")
        assert m.topic == "factory/alarms/press/temperature" and payload_of(m)["alarm"] == "raised"
        assert m.qos == 1, "the alarm, kept while away, comes first"
    finally:
        back.close()
    # The persistent controller gets the alarm it missed and stops the press.
    state = client("probe-state", "observer")
    state.subscribe("factory/state/press")
    daemon("iot-controller", "--config", str(cfg), "--session", "persistent")
    state.until(lambda m: payload_of(m)["state"] == "stopped", what="the press stopped by the controller")


def test_controller_rules_stop_an_overheating_machine_and_start_it_once_cool(factory, daemon):
    b, cfg, client = factory
    daemon("iot-device", "--config", str(cfg))
    ctl, _ = daemon("iot-controller", "--config", str(cfg))
    state = client("probe-rules", "observer")
    state.subscribe("factory/state/press")
    state.until(lambda m: payload_of(m)["state"] == "running", what="running")
    dash = client("dashboard", "dashboard")
    dash.publish("factory/commands/dashboard/press", b'{"command": "setpoint", "sensor": "temperature", "value": 95}')
    state.until(lambda m: payload_of(m)["state"] == "stopped", what="stopped on the alarm")
    # Stopped, it cools down to low (40 C): the alarm clears and the controller starts it again.
    state.until(lambda m: payload_of(m)["state"] == "running", what="started on the all-clear")
    log = ctl.log()
    assert "command sent device=press command=stop" in log and "command sent device=press command=start" in log


def test_every_acl_rule_with_our_broker(factory, daemon):
    b, cfg, client = factory
    daemon("iot-device", "--config", str(cfg), "--device", "press")
    watch = client("probe-acl", "observer")
    assert watch.subscribe("factory/#") == 1
    watch.until(lambda m: m.topic == "factory/status/press", what="press online")
    marker = 0

    def delivered(who: Client, topic: str, payload: bytes = b"x", retain: bool = False) -> bool:
        """Does `who` get `topic` through? Ordered by a marker `who` may publish (its own telemetry)."""
        nonlocal marker
        marker += 1
        watch.drain()
        who.publish(topic, payload + b"#%d" % marker, retain=retain)
        cid = who.c._client_id.decode()
        end = f"factory/telemetry/{cid}/marker"
        who.publish(end, b"%d" % marker)
        got = False
        while True:
            m = watch.until(lambda m: m.topic in (topic, end), what=f"the marker after {topic}")
            if m.topic == end and m.payload == b"%d" % marker:
                return got
            got = got or m.payload == payload + b"#%d" % marker

    fake_press = client("mixer")  # a device (by client id) that is not the press
    assert not delivered(fake_press, "factory/telemetry/press/temperature"), "a device wrote another's telemetry"
    assert not delivered(fake_press, "factory/alarms/press/temperature")
    assert not delivered(fake_press, "factory/state/press", retain=True)
    assert not delivered(fake_press, "factory/status/press", retain=True)
    assert delivered(fake_press, "factory/telemetry/mixer/temperature"), "a device may write its own telemetry"
    assert fake_press.subscribe("factory/commands/+/press") == 0x80, "a device read another's commands"
    assert fake_press.subscribe("factory/commands/controller/mixer") == 1
    assert fake_press.subscribe("factory/telemetry/#") == 0x80, "a device read the others' telemetry"

    ctl = client("controller", "controller")
    assert delivered(ctl, "factory/commands/controller/mixer")
    assert not delivered(ctl, "factory/commands/dashboard/mixer"), "the controller commanded as the dashboard"
    assert ctl.subscribe("factory/alarms/#") == 1 and ctl.subscribe("factory/telemetry/#") == 0x80
    dash = client("dashboard", "dashboard")
    assert delivered(dash, "factory/commands/dashboard/mixer")
    assert not delivered(dash, "factory/telemetry/press/temperature"), "the dashboard wrote telemetry"
    assert dash.subscribe("factory/#") == 1 and dash.subscribe("$SYS/#") == 1
    obs = client("observer", "observer")
    assert not delivered(obs, "factory/commands/dashboard/mixer"), "the observer published a command"
    anon = client("nobody")
    assert anon.subscribe("factory/alarms/#") == 0x80, "an anonymous client read the factory"
    assert anon.subscribe("sensors/#") == 1, "the node's daemons (anonymous in a checkout) lost their topics"


def test_bad_actor_reports_every_refusal_and_what_gets_through_without_an_acl(factory, daemon, tmp_path,
                                                                             broker_factory):
    b, cfg, client = factory
    daemon("iot-device", "--config", str(cfg), "--device", "press")
    r = subprocess.run([str(BIN / "iotctl"), "bad-actor", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "REFUSED, SUBACK 0x80" in r.stdout and r.stdout.count("NOT DELIVERED") == 3
    assert "every attempt was refused" in r.stdout
    wait_for(lambda: "denied PUBLISH from bad-actor to factory/telemetry/press/temperature" in b.proc.log(), 10,
             what="the broker's denied line")

    open_broker = broker_factory("sys_interval = 0\n")  # no ACL
    cfg2 = tmp_path / "open.toml"
    cfg2.write_text(cfg.read_text().replace(f"port = {b.port}", f"port = {open_broker.port}"))
    r = subprocess.run([str(BIN / "iotctl"), "bad-actor", "--config", str(cfg2)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stdout.count("DELIVERED: the ACL does not stop it") == 3, r.stdout
    assert "GRANTED" in r.stdout


def test_observer_logs_one_compact_line_per_message(factory, daemon):
    b, cfg, client = factory
    obs, _ = daemon("iot-observer", "--config", str(cfg))
    daemon("iot-device", "--config", str(cfg), "--device", "press")
    wait_for(lambda: "factory/telemetry/press/temperature q0 r0 " in obs.log(), 20, what="a telemetry line")
    wait_for(lambda: "factory/status/press q1 r" in obs.log(), 20, what="a status line")
    line = next(x for x in obs.log().splitlines() if "factory/telemetry/press/temperature q0" in x)
    assert "sensor=temperature value=" in line and "unit=C" in line and "B " in line
    obs.signal(signal.SIGTERM)
    assert obs.wait(15) == 0
