"""The factory's topics and JSON messages (seed 003), in one place; pure, no I/O.

    factory/telemetry/<device>/<sensor>  QoS 0          {"ts", "device_id", "sensor", "value", "unit"}
    factory/alarms/<device>/<sensor>     QoS 1          {"ts", "device_id", "sensor", "value", "unit",
                                                         "alarm": "raised"|"cleared", "level": "high"|"low",
                                                         "threshold"}
    factory/state/<device>               QoS 1 retained {"ts", "device_id", "state": "running"|"stopped"|"fault",
                                                         "setpoints": {sensor: value}, "alarms": [sensor...]}
    factory/status/<device>              QoS 1 retained {"ts", "device_id", "status": "online"|"offline"}
                                                        (the will says "offline"; its ts is when it was set)
    factory/commands/<publisher>/<device> QoS 1         {"command": "start"|"stop"|"reset"|"setpoint",
                                                         "sensor", "value" (setpoint), "reason", "ts"}

`<publisher>` is who sends the command ("controller", "dashboard"): the ACL lets a client
publish commands only under its own name, and a device obey only those it may read.
"""

from __future__ import annotations

import math
import time

import orjson

PREFIX = "factory"
COMMANDS = ("start", "stop", "reset", "setpoint")
STATES = ("running", "stopped", "fault")


class BadCommand(Exception):
    pass


def telemetry_topic(device: str, sensor: str) -> str:
    return f"{PREFIX}/telemetry/{device}/{sensor}"


def alarm_topic(device: str, sensor: str) -> str:
    return f"{PREFIX}/alarms/{device}/{sensor}"


def state_topic(device: str) -> str:
    return f"{PREFIX}/state/{device}"


def status_topic(device: str) -> str:
    return f"{PREFIX}/status/{device}"


def command_topic(publisher: str, device: str) -> str:
    return f"{PREFIX}/commands/{publisher}/{device}"


def _now() -> float:
    return round(time.time(), 3)


def telemetry(device: str, sensor: str, value: float, unit: str) -> bytes:
    return orjson.dumps({"ts": _now(), "device_id": device, "sensor": sensor, "value": value, "unit": unit})


def alarm(device: str, sensor: str, value: float, unit: str, what: str, level: str, threshold: float) -> bytes:
    return orjson.dumps({"ts": _now(), "device_id": device, "sensor": sensor, "value": value, "unit": unit,
                         "alarm": what, "level": level, "threshold": threshold})


def state(device: str, state_: str, setpoints: dict[str, float], alarms: list[str]) -> bytes:
    return orjson.dumps({"ts": _now(), "device_id": device, "state": state_, "setpoints": setpoints,
                         "alarms": alarms})


def status(device: str, online: bool) -> bytes:
    return orjson.dumps({"ts": _now(), "device_id": device, "status": "online" if online else "offline"})


def command(name: str, reason: str = "", sensor: str | None = None, value: float | None = None) -> bytes:
    msg: dict = {"command": name, "ts": _now()}
    if reason:
        msg["reason"] = reason
    if sensor is not None:
        msg["sensor"], msg["value"] = sensor, value
    return orjson.dumps(msg)


def parse_command(payload: bytes, sensors: tuple[str, ...]) -> dict:
    """A command for a device with these sensors; BadCommand says what is wrong."""
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadCommand("not JSON") from None
    if not isinstance(msg, dict) or msg.get("command") not in COMMANDS:
        raise BadCommand(f"expected an object with command one of {', '.join(COMMANDS)}")
    if msg["command"] == "setpoint":
        v = msg.get("value")
        if msg.get("sensor") not in sensors:
            raise BadCommand(f"setpoint: sensor must be one of {', '.join(sensors)}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise BadCommand("setpoint: value must be a number")
    reason = msg.get("reason", "")
    if not isinstance(reason, str):
        raise BadCommand("reason must be a string")
    return msg


def summary(topic: str, payload: bytes, limit: int = 120) -> str:
    """A short human line for a payload (the observer's and dashboard's traffic views)."""
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        text = payload[:limit].decode("utf-8", "replace")
        return text if text.isprintable() else repr(payload[:limit // 2])
    if isinstance(msg, dict):
        skip = {"ts", "device_id"}
        text = " ".join(f"{k}={orjson.dumps(v).decode() if isinstance(v, (dict, list)) else v}"
                        for k, v in msg.items() if k not in skip)
    else:
        text = orjson.dumps(msg).decode()
    return text if len(text) <= limit else text[:limit - 3] + "..."
