"""The dashboard's pure parts: the bounded board, commands from a page, the login and origin
checks, the refusal to listen beyond loopback without a password, the Node view's ingest figures."""

from __future__ import annotations

import os
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons import config
from daemons.config import ConfigError
from daemons.factory import messages as M
from daemons.factory.dashboard import auth, board
from daemons.factory.dashboard.board import Board
from daemons.factory.dashboard.node import Node
from daemons.ingest import worker


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def fed(b: Board, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> list[dict]:
    return b.feed(topic, payload, qos, retain)


# --- the board -----------------------------------------------------------------------------------


def test_configured_devices_are_there_before_any_message_with_their_sensors():
    snap = Board(config.FactoryConfig().device).snapshot()
    assert list(snap["devices"]) == ["press", "conveyor", "robot_arm", "env_station"]
    press = snap["devices"]["press"]
    assert press["status"] is None and press["state"] is None
    assert press["sensors"]["temperature"] == {"u": "C", "low": 40.0, "high": 70.0, "v": None, "pts": [[], []]}


def test_telemetry_becomes_a_value_and_a_point_and_every_message_a_traffic_line():
    clock = Clock()
    b = Board(config.FactoryConfig().device, clock=clock)
    ev = fed(b, "factory/telemetry/press/temperature", M.telemetry("press", "temperature", 55.5, "C"))
    assert [e["t"] for e in ev] == ["traffic", "value"]
    assert ev[1] == {"t": "value", "d": "press", "s": "temperature", "v": 55.5, "ts": 1000.0, "u": "C"}
    assert ev[0]["topic"] == "factory/telemetry/press/temperature" and "value=55.5" in ev[0]["s"]
    clock.t += 1
    fed(b, "factory/telemetry/press/temperature", M.telemetry("press", "temperature", 56.0, "C"))
    s = b.snapshot()["devices"]["press"]["sensors"]["temperature"]
    assert s["v"] == 56.0 and s["pts"] == [[1000.0, 1001.0], [55.5, 56.0]]
    assert len(b.snapshot()["traffic"]) == 2


def test_retained_status_and_state_and_their_deletion():
    b = Board(config.FactoryConfig().device)
    ev = fed(b, "factory/status/press", M.status("press", True), 1, True)
    assert ev[-1]["t"] == "status" and ev[-1]["status"] == "online"
    ev = fed(b, "factory/state/press", M.state("press", "stopped", {"temperature": 50.0}, ["pressure"]), 1, True)
    assert ev[-1] == {"t": "state", "d": "press",
                      "state": {"state": "stopped", "setpoints": {"temperature": 50.0}, "alarms": ["pressure"]}}
    assert b.online() == 1
    fed(b, "factory/status/press", M.status("press", False), 1, True)
    assert b.online() == 0
    ev = fed(b, "factory/state/press", b"", 1, True)
    assert ev[-1]["state"] is None and b.snapshot()["devices"]["press"]["state"] is None


def test_alarms_are_kept_newest_last_and_bounded():
    b = Board(config.FactoryConfig().device)
    for i in range(board.ALARMS + 5):
        fed(b, "factory/alarms/press/temperature",
            M.alarm("press", "temperature", 80.0 + i, "C", "raised", "high", 80.0), 1)
    alarms = b.snapshot()["alarms"]
    assert len(alarms) == board.ALARMS and alarms[-1]["v"] == 80.0 + board.ALARMS + 4
    assert alarms[-1]["alarm"] == "raised" and alarms[-1]["threshold"] == 80.0


def test_every_store_is_bounded_whatever_comes():
    b = Board(config.FactoryConfig().device)
    for i in range(board.HISTORY * 2):
        fed(b, "factory/telemetry/press/temperature", M.telemetry("press", "temperature", float(i), "C"))
    t, v = b.snapshot()["devices"]["press"]["sensors"]["temperature"]["pts"]
    assert len(t) == len(v) == board.HISTORY and v[0] == board.HISTORY and v[-1] == board.HISTORY * 2 - 1
    for i in range(board.EXTRA_DEVICES + 10):  # devices nobody configured: some are shown, no more
        fed(b, f"factory/telemetry/stranger{i}/x", b'{"value": 1}')
    assert len(b.devices) == 4 + board.EXTRA_DEVICES
    for i in range(board.SENSORS + 10):
        fed(b, f"factory/telemetry/stranger0/s{i}", b'{"value": 1}')
    assert len(b.devices["stranger0"].sensors) == board.SENSORS
    for i in range(board.SYS_TOPICS + 10):
        fed(b, f"$SYS/broker/x{i}", b"1")
    assert len(b.sys) == board.SYS_TOPICS
    assert len(b.traffic) == board.TRAFFIC
    fed(b, "factory/commands/dashboard/press", b"x" * 100_000)
    assert len(b.traffic[-1]["s"]) <= board.TEXT_LEN


def test_sys_values_are_pushed_only_when_they_change_and_are_not_traffic():
    b = Board()
    assert fed(b, "$SYS/broker/uptime", b"5 seconds") == [{"t": "sys", "k": "$SYS/broker/uptime", "v": "5 seconds"}]
    assert fed(b, "$SYS/broker/uptime", b"5 seconds") == []
    assert not b.traffic
    assert fed(b, "other/topic", b"x") == []


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["telemetry/press/t", "alarms/press/t", "state/press", "status/press", "x", "a/b/c/d/e"]),
       payload=st.one_of(st.binary(max_size=200),
                         st.recursive(st.none() | st.booleans() | st.floats() | st.integers(-2**63, 2**63 - 1)
                                      | st.text(max_size=20),
                                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4),
                                      max_leaves=10).map(orjson.dumps)))
def test_any_payload_on_any_factory_topic_is_taken_without_an_exception(kind, payload):
    b = Board(config.FactoryConfig().device)
    for e in b.feed(f"factory/{kind}", payload, 1, True):
        orjson.dumps(e)
    orjson.dumps(b.snapshot())


# --- commands from a page ----------------------------------------------------------------------


def test_a_command_is_checked_as_the_device_will_and_says_who_sent_it():
    b = Board(config.FactoryConfig().device)
    device, name, payload = b.command({"device": "press", "command": "stop", "reason": " too\nhot "}, "by s-1 from 10.0.0.5")
    msg = M.parse_command(payload, ("temperature", "pressure"))
    assert (device, name, msg["command"]) == ("press", "stop", "stop")
    assert msg["reason"] == "too hot (by s-1 from 10.0.0.5)"
    _, _, payload = b.command({"device": "press", "command": "setpoint", "sensor": "pressure", "value": 120}, "me")
    assert orjson.loads(payload)["value"] == 120 and orjson.loads(payload)["reason"] == "me"


@pytest.mark.parametrize("msg, error", [
    ({"device": "nobody", "command": "stop"}, "unknown device"),
    ({"device": "press", "command": "explode"}, "command must be one of"),
    ({"device": "press", "command": "setpoint", "sensor": "nope", "value": 1}, "sensor must be one of"),
    ({"device": "press", "command": "setpoint", "sensor": "pressure", "value": "1"}, "value must be a number"),
    ({"device": "press", "command": "setpoint", "sensor": "pressure", "value": True}, "value must be a number"),
    ({"device": "press", "command": "stop", "reason": 5}, "reason must be a string"),
    (["press", "stop"], "expected an object"),
])
def test_bad_commands_are_refused_with_the_reason(msg, error):
    with pytest.raises(M.BadCommand, match=error):
        Board(config.FactoryConfig().device).command(msg, "me")


# --- who may use it ----------------------------------------------------------------------------


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LocalHost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.com", False),
    ("localhost.example.com", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert auth.is_loopback(host) is loopback


def test_origin_must_name_the_host_the_request_went_to():
    assert auth.same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert auth.same_origin("https://Pi.local:8443", "pi.local:8443")
    assert not auth.same_origin("http://evil.example:8080", "127.0.0.1:8080")
    assert not auth.same_origin("http://127.0.0.1:8081", "127.0.0.1:8080")
    assert not auth.same_origin(None, "127.0.0.1:8080")
    assert not auth.same_origin("null", "127.0.0.1:8080")
    assert auth.host_name("[::1]:8080") == "::1" and auth.host_name("localhost:1") == "localhost"
    assert auth.host_name(None) == ""


def test_password_file_first_line_mode_and_errors(tmp_path):
    p = tmp_path / "dashboard.password"
    p.write_text("s3cret words\nsecond line ignored\n")
    for mode in (0o600, 0o640):
        os.chmod(p, mode)
        assert auth.read_password(p, None) == "s3cret words"
    os.chmod(p, 0o644)
    with pytest.raises(ConfigError, match=r"dashboard_password_file: .* open to others \(mode 0644\)"):
        auth.read_password(p, None)
    os.chmod(p, 0o600)
    p.write_text("\nx\n")
    with pytest.raises(ConfigError, match="empty"):
        auth.read_password(p, None)
    with pytest.raises(ConfigError, match="cannot read"):
        auth.read_password(tmp_path / "missing", None)
    assert auth.password_ok("s3cret", "s3cret") and not auth.password_ok("s3cre", "s3cret")


def test_sessions_expire_when_idle_and_are_bounded_least_recently_used_first():
    clock = Clock(0.0)
    s = auth.Sessions(idle=100, limit=3, clock=clock)
    a = s.create("1.1.1.1")
    assert s.check(a) and not s.check("forged") and not s.check(None) and not s.check("")
    clock.t = 99
    assert s.check(a)  # used: its idle time starts again
    clock.t = 198
    assert s.check(a)
    clock.t = 299
    assert not s.check(a)  # idle too long, and gone for good
    clock.t = 300
    assert not s.check(a)
    b, c, d = s.create("b"), s.create("c"), s.create("d")
    assert s.check(b)  # c is now the least recently used
    s.create("e")
    assert len(s) == 3 and not s.check(c) and s.check(b) and s.check(d)
    s.drop(b)
    assert not s.check(b)
    assert auth.Sessions.label(d).startswith("s-") and d not in auth.Sessions.label(d)


def test_beyond_loopback_without_a_password_file_is_a_config_error(tmp_path):
    from daemons.factory.dashboard.server import check_access  # noqa: PLC0415 - imports aiohttp

    def cfg(text: str) -> config.Config:
        path = tmp_path / "iot.toml"
        path.write_text(f"[factory]\n{text}")
        return config.load(path)

    assert check_access(cfg("")) is None
    assert check_access(cfg('dashboard_host = "::1"')) is None
    with pytest.raises(ConfigError, match=r"dashboard_host: '0.0.0.0' is beyond loopback and "
                                          r"dashboard_password_file is not set"):
        check_access(cfg('dashboard_host = "0.0.0.0"'))
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    os.chmod(pw, 0o600)
    assert check_access(cfg(f'dashboard_host = "0.0.0.0"\ndashboard_password_file = "{pw}"')) == "pw"


# --- the Node view's ingest figures ---------------------------------------------------------------


def test_ingest_figures_come_from_the_status_file_and_the_rate_from_two_readings(tmp_path):
    cfg = config.parse({"paths": {"state_dir": str(tmp_path)}}, None)
    node = Node(cfg)
    out = node.ingest()
    assert out == {"dlq_entries": 0, "dlq_bytes": 0, "running": False}
    path = worker.status_path(cfg)
    path.parent.mkdir(parents=True)

    def write(updated: float, landed: int, dlq: int = 0) -> None:
        path.write_bytes(orjson.dumps({"updated": updated, "landed": landed, "dlq": dlq, "queue": 0,
                                       "connected": True, "outage": None, "pid": 1}))

    now = time.time()
    write(now - 2, 100)
    out = node.ingest()
    assert out["running"] and out["landed"] == 100 and out["rate"] is None  # one reading: no rate yet
    write(now, 150, 10)
    assert node.ingest()["rate"] == pytest.approx(30.0)  # 60 messages in 2 s
    assert node.ingest()["rate"] == pytest.approx(30.0)  # the same file, just written: the same rate
    write(now + 1, 5)  # restarted: counters from 0 again
    assert node.ingest()["rate"] is None
    write(now - 100, 5)
    assert node.ingest()["running"] is False  # not rewritten for longer than it would be while running


# --- the server's intake --------------------------------------------------------------------------


def test_messages_past_the_inbox_bound_are_counted_and_left_out_never_queued():
    """paho's thread never waits for the loop (a slow dashboard must not hold the factory's
    publishers back through the broker's flow control), and what waits for the loop is bounded."""
    import argparse  # noqa: PLC0415
    import asyncio  # noqa: PLC0415

    import paho.mqtt.client as paho  # noqa: PLC0415

    from daemons.factory.dashboard import server  # noqa: PLC0415 - imports aiohttp
    from daemons.service import Log, Service  # noqa: PLC0415

    def message(i: int) -> paho.MQTTMessage:
        m = paho.MQTTMessage(topic=b"factory/telemetry/press/temperature")
        m.payload = M.telemetry("press", "temperature", float(i), "C")
        return m

    async def run() -> None:
        svc = Service("iot-dashboard", config.Config(), argparse.Namespace(config=None, verbose=False), Log("t"))
        dash = server.Dashboard(svc, None)
        n = server.INBOX + 2000
        for i in range(n):  # the loop is busy (here: with us) while paho's thread goes on
            dash._paho_message(message(i))
        assert len(dash._inbox) == server.INBOX and dash.dropped == 2000
        while dash._inbox:
            await asyncio.sleep(0)
        assert dash.board.devices["press"].sensors["temperature"].value == server.INBOX - 1
        assert "left_out=2000" in dash.summary()

    asyncio.run(run())
