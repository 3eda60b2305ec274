"""What the dashboard knows, all of it bounded; pure (no I/O, no asyncio), fed one message at a time.

`Board.feed(topic, payload, qos, retain)` updates the state and returns the events to push to
the pages (small dicts, "t" naming the kind); `snapshot()` is the whole state, which a page gets
when it connects, so a reload shows everything at once: the retained state and status of each
device come from the broker on our SUBSCRIBE, the rest from what came since we started.

Bounds, so that no publisher can grow us: the devices of [factory] plus at most EXTRA_DEVICES
seen only in traffic, SENSORS per device, HISTORY points per sensor (two arrays of doubles),
the last ALARMS alarms and TRAFFIC messages, SYS_TOPICS $SYS values; every string kept is cut
to a length. A message past a bound still shows in the traffic view.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import deque
from collections.abc import Callable

import orjson

from ...config import FactoryDeviceConfig
from .. import messages as M

HISTORY = 120  # points per sensor chart: two minutes at the default 1 s interval
ALARMS = 50
TRAFFIC = 200
EXTRA_DEVICES = 16
SENSORS = 16
SYS_TOPICS = 300
NAME_LEN = 64
TEXT_LEN = 120
REASON_LEN = 200


class Ring:
    """The last `size` (t, v) points: 16 bytes a point, whatever comes."""

    __slots__ = ("t", "v", "n", "i")

    def __init__(self, size: int = HISTORY):
        self.t = array("d", bytes(8 * size))
        self.v = array("d", bytes(8 * size))
        self.n = self.i = 0

    def add(self, t: float, v: float) -> None:
        self.t[self.i], self.v[self.i] = t, v
        self.i = (self.i + 1) % len(self.t)
        self.n = min(self.n + 1, len(self.t))

    def lists(self) -> tuple[list[float], list[float]]:
        """Oldest first."""
        if self.n < len(self.t):
            return self.t[:self.n].tolist(), self.v[:self.n].tolist()
        i = self.i
        return (self.t[i:] + self.t[:i]).tolist(), (self.v[i:] + self.v[:i]).tolist()


class Sensor:
    __slots__ = ("unit", "low", "high", "value", "points")

    def __init__(self, unit: str = "", low: float | None = None, high: float | None = None):
        self.unit, self.low, self.high = unit, low, high
        self.value: float | None = None
        self.points = Ring()


class Device:
    __slots__ = ("name", "configured", "sensors", "status", "status_ts", "state")

    def __init__(self, name: str, configured: bool):
        self.name, self.configured = name, configured
        self.sensors: dict[str, Sensor] = {}
        self.status: str | None = None  # "online" | "offline" | None (nothing retained yet)
        self.status_ts: float | None = None
        self.state: dict | None = None  # {"state", "setpoints", "alarms"} as the device last said


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _text(v: object, limit: int = TEXT_LEN) -> str:
    return v[:limit] if isinstance(v, str) else ""


def _object(payload: bytes) -> dict | None:
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return msg if isinstance(msg, dict) else None


class Board:
    def __init__(self, devices: tuple[FactoryDeviceConfig, ...] = (), clock: Callable[[], float] = time.time):
        self.clock = clock
        self.devices: dict[str, Device] = {}
        for d in devices:
            dev = self.devices[d.name] = Device(d.name, configured=True)
            for s in d.sensor:
                dev.sensors[s.name] = Sensor(s.unit, s.low, s.high)
        self._extra = 0
        self.alarms: deque[dict] = deque(maxlen=ALARMS)
        self.traffic: deque[dict] = deque(maxlen=TRAFFIC)
        self.sys: dict[str, str] = {}
        self.broker = False  # connected to the broker; set by the server

    # --- feeding ------------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> list[dict]:
        now = self.clock()
        if topic.startswith("$SYS/"):
            return self._sys(topic, payload)
        if not topic.startswith(M.PREFIX + "/"):
            return []
        entry = {"t": "traffic", "ts": now, "topic": topic[:TEXT_LEN * 2], "q": qos, "r": int(retain),
                 "n": len(payload), "s": M.summary(topic, payload, TEXT_LEN)}
        self.traffic.append(entry)
        events = [entry]
        parts = topic.split("/")
        kind = parts[1] if len(parts) > 1 else ""
        if kind in ("telemetry", "alarms") and len(parts) == 4:
            handler = self._telemetry if kind == "telemetry" else self._alarm
            events += handler(parts[2], parts[3], payload, now)
        elif kind in ("state", "status") and len(parts) == 3:
            events += (self._state if kind == "state" else self._status)(parts[2], payload)
        return events

    def _device(self, name: str) -> Device | None:
        dev = self.devices.get(name)
        if dev is None and self._extra < EXTRA_DEVICES and 0 < len(name) <= NAME_LEN:
            self._extra += 1
            dev = self.devices[name] = Device(name, configured=False)
        return dev

    def _sensor(self, dev: Device, name: str) -> Sensor | None:
        s = dev.sensors.get(name)
        if s is None and len(dev.sensors) < SENSORS and 0 < len(name) <= NAME_LEN:
            s = dev.sensors[name] = Sensor()
        return s

    def _telemetry(self, device: str, sensor: str, payload: bytes, now: float) -> list[dict]:
        msg = _object(payload)
        value = _number(msg.get("value")) if msg else None
        dev = self._device(device) if value is not None else None
        s = self._sensor(dev, sensor) if dev else None
        if s is None:
            return []
        if isinstance(msg.get("unit"), str):
            s.unit = msg["unit"][:16]
        s.value = value
        s.points.add(now, value)
        return [{"t": "value", "d": device, "s": sensor, "v": value, "ts": now, "u": s.unit}]

    def _alarm(self, device: str, sensor: str, payload: bytes, now: float) -> list[dict]:
        msg = _object(payload)
        if msg is None or msg.get("alarm") not in ("raised", "cleared") or device not in self.devices:
            return []
        a = {"t": "alarm", "ts": now, "d": device, "s": sensor[:NAME_LEN], "alarm": msg["alarm"],
             "level": _text(msg.get("level"), 8), "v": _number(msg.get("value")),
             "threshold": _number(msg.get("threshold")), "u": _text(msg.get("unit"), 16)}
        self.alarms.append(a)
        return [a]

    def _state(self, device: str, payload: bytes) -> list[dict]:
        dev = self._device(device)
        if dev is None:
            return []
        msg = _object(payload)  # an empty payload (retained state deleted) says nothing is known
        if msg is None:
            dev.state = None
        else:
            sp = msg.get("setpoints")
            al = msg.get("alarms")
            state = msg.get("state")
            dev.state = {
                "state": state if state in M.STATES else "unknown",
                "setpoints": {k[:NAME_LEN]: n for k, v in list(sp.items())[:SENSORS]
                              if (n := _number(v)) is not None} if isinstance(sp, dict) else {},
                "alarms": [a[:NAME_LEN] for a in al[:SENSORS] if isinstance(a, str)] if isinstance(al, list) else [],
            }
        return [{"t": "state", "d": device, "state": dev.state}]

    def _status(self, device: str, payload: bytes) -> list[dict]:
        dev = self._device(device)
        if dev is None:
            return []
        msg = _object(payload)
        status = msg.get("status") if msg else None
        dev.status = status if status in ("online", "offline") else None
        dev.status_ts = _number(msg.get("ts")) if msg else None
        return [{"t": "status", "d": device, "status": dev.status, "ts": dev.status_ts}]

    def _sys(self, topic: str, payload: bytes) -> list[dict]:
        key = topic[:TEXT_LEN]
        if key not in self.sys and len(self.sys) >= SYS_TOPICS:
            return []
        value = payload[:TEXT_LEN].decode("utf-8", "replace")
        if self.sys.get(key) == value:
            return []
        self.sys[key] = value
        return [{"t": "sys", "k": key, "v": value}]

    # --- reading ------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        devices = {}
        for dev in self.devices.values():
            sensors = {}
            for name, s in dev.sensors.items():
                t, v = s.points.lists()
                sensors[name] = {"u": s.unit, "low": s.low, "high": s.high, "v": s.value, "pts": [t, v]}
            devices[dev.name] = {"configured": dev.configured, "status": dev.status, "status_ts": dev.status_ts,
                                 "state": dev.state, "sensors": sensors}
        return {"t": "snapshot", "broker": self.broker, "devices": devices, "alarms": list(self.alarms),
                "traffic": list(self.traffic), "sys": dict(self.sys)}

    def online(self) -> int:
        return sum(d.status == "online" for d in self.devices.values())

    # --- commands from a page -----------------------------------------------------------------

    def command(self, msg: object, by: str) -> tuple[str, str, bytes]:
        """(device, command, payload) for a page's command message; BadCommand says what is
        wrong. Only devices the board knows are commanded; `by` (who, from where) goes into
        the reason, so the device's log says who stopped it too."""
        if not isinstance(msg, dict):
            raise M.BadCommand("expected an object")
        device, name = msg.get("device"), msg.get("command")
        dev = self.devices.get(device) if isinstance(device, str) else None
        if dev is None:
            raise M.BadCommand(f"unknown device {str(device)[:NAME_LEN]!r}")
        if name not in M.COMMANDS:
            raise M.BadCommand(f"command must be one of {', '.join(M.COMMANDS)}")
        reason = msg.get("reason") or ""
        if not isinstance(reason, str):
            raise M.BadCommand("reason must be a string")
        reason = " ".join(reason.split())[:REASON_LEN]
        reason = f"{reason} ({by})" if reason else by
        if name == "setpoint":
            payload = M.command(name, reason, msg.get("sensor"), msg.get("value"))
        else:
            payload = M.command(name, reason)
        M.parse_command(payload, tuple(dev.sensors))  # the device's own check, before it goes out
        return device, name, payload
