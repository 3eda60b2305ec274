"""The pure parts of the factory: the simulated sensor and its alarm hysteresis, commands,
controller rules, the [factory] config checks."""

from __future__ import annotations

import random
import tomllib

import orjson
import pytest

from daemons import config
from daemons.config import RuleConfig, SensorConfig
from daemons.factory import messages as M
from daemons.factory.controller import decide
from daemons.factory.device import Sensor


def sensor(**kw) -> Sensor:
    return Sensor(SensorConfig(**{"name": "t", "low": 40.0, "high": 70.0, "alarm_high": 80.0, "hysteresis": 3.0,
                                  **kw}), random.Random(1))


def test_alarm_is_raised_past_the_threshold_and_cleared_only_past_the_hysteresis():
    s = sensor()
    outcomes = []
    for v in (79.0, 80.5, 79.0, 77.5, 76.9, 81.0):
        s.value = v
        outcomes.append(s.check())
    assert outcomes == [None, ("raised", "high", 80.0), None, None, ("cleared", "high", 80.0),
                        ("raised", "high", 80.0)]


def test_low_alarm_mirrors_the_high_one():
    s = sensor(alarm_high=None, alarm_low=45.0, hysteresis=1.0)
    outcomes = []
    for v in (44.0, 45.5, 46.5):
        s.value = v
        outcomes.append(s.check())
    assert outcomes == [("raised", "low", 45.0), None, ("cleared", "low", 45.0)]


def test_running_value_wanders_near_its_setpoint_and_settles_to_low_when_stopped():
    s = sensor()
    values = [s.step(True) for _ in range(300)]
    assert 45 < sum(values[100:]) / 200 < 65
    s.setpoint = 90.0
    assert sum(s.step(True) for _ in range(100)) / 100 > 80
    assert abs(sum(s.step(False) for _ in range(100)) / 100 - 40.0) < 3


def test_a_spike_goes_past_the_alarm_threshold():
    s = sensor()
    s.spike = 2
    assert s.step(True) > 80 and s.step(True) > 80 and s.spike == 0


@pytest.mark.parametrize("payload,error", [
    (b"stop", "not JSON"),
    (b'{"command": "explode"}', "command one of"),
    (b'{"command": "setpoint", "sensor": "x", "value": 1}', "sensor must be one of t"),
    (b'{"command": "setpoint", "sensor": "t", "value": "hot"}', "value must be a number"),
    (b'{"command": "stop", "reason": 5}', "reason must be a string"),
])
def test_bad_commands_are_refused_with_a_reason(payload, error):
    with pytest.raises(M.BadCommand, match=error):
        M.parse_command(payload, ("t",))


def test_command_round_trip():
    assert M.parse_command(M.command("setpoint", "why", "t", 61.5), ("t",))["value"] == 61.5
    assert orjson.loads(M.command("stop"))["command"] == "stop"


def test_rules_first_match_wins():
    rules = (RuleConfig(on="raised", device="press", sensor="*", command="reset"),
             RuleConfig(on="raised", sensor="*temperature", command="stop"),
             RuleConfig(on="cleared", sensor="*temperature", command="start"))
    assert decide(rules, {"alarm": "raised", "device_id": "press", "sensor": "pressure"}).command == "reset"
    assert decide(rules, {"alarm": "raised", "device_id": "arm", "sensor": "joint_temperature"}).command == "stop"
    assert decide(rules, {"alarm": "cleared", "device_id": "arm", "sensor": "temperature"}).command == "start"
    assert decide(rules, {"alarm": "raised", "device_id": "arm", "sensor": "torque"}) is None


def test_summary_is_short_and_skips_ts_and_device():
    line = M.summary("t", M.telemetry("press", "temperature", 61.2, "C"))
    assert line == "sensor=temperature value=61.2 unit=C"
    assert M.summary("t", b"\xff\x00binary").startswith("b'")
    assert len(M.summary("t", b'{"x": "' + b"y" * 500 + b'"}')) == 120


def test_default_factory_has_the_four_seed_devices():
    names = [d.name for d in config.Config().factory.device]
    assert names == ["press", "conveyor", "robot_arm", "env_station"]


@pytest.mark.parametrize("text,key,expected", [
    ('[[factory.device]]\nname = "all"\n[[factory.device.sensor]]\nname = "t"', "[[factory.device]] #1 name", "not 'all'"),
    ('[[factory.device]]\nname = "a/b"\n[[factory.device.sensor]]\nname = "t"', "[[factory.device]] #1 name", "letters"),
    ('[[factory.device]]\nname = "m"', "[[factory.device]] #1 sensor", "missing"),
    ('[[factory.device]]\nname = "m"\n[[factory.device.sensor]]\nname = "t"\nlow = 5.0\nhigh = 5.0',
     "sensor #1 high", "must be above low"),
    ('[[factory.device]]\nname = "m"\n[[factory.device.sensor]]\nname = "t"\nlow = 0.0\nhigh = 10.0\n'
     'alarm_high = 2.0\nhysteresis = 3.0', "sensor #1 alarm_high", "never clears"),
    ('[[factory.rule]]\ncommand = "explode"', "[[factory.rule]] #1 command", "start, stop, reset"),
    ('[factory]\nprocesses = "some"', "[factory] processes", "one, per-device"),
])
def test_bad_factory_tables_name_the_table_and_key(text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        config.parse(tomllib.loads(text), None)
    assert key in str(e.value) and expected in str(e.value)
