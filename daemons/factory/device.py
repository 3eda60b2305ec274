"""iot-device: simulated factory devices (seed 003), one MQTT connection each.

Theory of operation
===================

`iot-device --device press --device conveyor` (or `--device all`, the default) runs those
devices in one process: each has its own paho client, client id (the device name: the ACL knows
a device by it) and will, so to the broker they are separate machines; one process costs one
interpreter's memory instead of one per device. The main thread ticks every device at its own
interval; paho's threads only queue what arrives (commands, connects) for it.

A device publishes, per seed 003 (messages.py): telemetry of each sensor at QoS 0 every
interval; an alarm at QoS 1 when a value leaves its range (above alarm_high, below alarm_low)
and again when it is back by `hysteresis`; its state (running, stopped, fault, setpoints,
alarms up) retained at QoS 1 whenever it changes; "online" retained on factory/status/<name>
at every connect, with a will saying "offline", so a crash or a cut connection shows at once.
It obeys start, stop, reset and setpoint from factory/commands/+/<name> and logs who sent each.

The simulation: while running a value drifts toward its setpoint (the middle of its range
unless set) with noise; stopped or in fault it settles toward `low`. `--anomaly` now and then
makes a sensor spike past its alarm threshold for a few ticks, or the device jam (fault: it
stops, and only reset gets it out). `--crash-after N` ends the process after N seconds with
os._exit: no DISCONNECT, so the broker publishes every device's will.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import deque

from .. import config as configmod
from .. import metrics, service
from ..config import FactoryDeviceConfig, MqttConfig, SensorConfig
from ..metrics import Families
from ..mqttclient import MqttClient, Will
from ..service import Exit, Log, Service
from . import METRICS_OFFSET
from . import messages as M

SPIKE_CHANCE = 0.02  # per device and tick, with --anomaly
SPIKE_TICKS = 4
JAM_CHANCE = 0.003


class Sensor:
    """One sensor's simulated value and alarm state. Pure: the random source is given."""

    def __init__(self, cfg: SensorConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.setpoint = (cfg.low + cfg.high) / 2
        self.value = self.setpoint
        self.alarm: str | None = None  # "high" or "low" while raised
        self.spike = 0  # ticks left of an injected spike

    def step(self, running: bool) -> float:
        c = self.cfg
        span = c.high - c.low
        if self.spike:
            self.spike -= 1
            top = c.alarm_high if c.alarm_high is not None else c.high
            self.value = top + span * self.rng.uniform(0.05, 0.15)
        else:
            target = self.setpoint if running else c.low
            self.value += (target - self.value) * 0.2 + self.rng.gauss(0, span * 0.02)
        self.value = round(self.value, 2)
        return self.value

    def check(self) -> tuple[str, str, float] | None:
        """("raised" | "cleared", level, threshold) when the alarm changes, else None."""
        c, v = self.cfg, self.value
        if self.alarm is None:
            if c.alarm_high is not None and v > c.alarm_high:
                self.alarm = "high"
                return "raised", "high", c.alarm_high
            if c.alarm_low is not None and v < c.alarm_low:
                self.alarm = "low"
                return "raised", "low", c.alarm_low
        elif self.alarm == "high" and v < c.alarm_high - c.hysteresis:
            self.alarm = None
            return "cleared", "high", c.alarm_high
        elif self.alarm == "low" and v > c.alarm_low + c.hysteresis:
            self.alarm = None
            return "cleared", "low", c.alarm_low
        return None


class Device:
    def __init__(self, cfg: FactoryDeviceConfig, mqtt: MqttConfig, log: Log, anomaly: bool, rng: random.Random):
        self.cfg, self.name, self.log, self.anomaly, self.rng = cfg, cfg.name, log, anomaly, rng
        self.sensors = {s.name: Sensor(s, rng) for s in cfg.sensor}
        self.state = "running"
        self.inbox: deque = deque()  # ("connected", None) | ("command", (publisher, payload)), from paho
        self.wake: threading.Event | None = None
        self.due = 0.0
        self.client = MqttClient(
            mqtt, cfg.name, log=log, clean_session=True,
            will=Will(M.status_topic(cfg.name), M.status(cfg.name, False), qos=1, retain=True),
            subscriptions=[(M.command_topic("+", cfg.name), 1)],
            on_message=self._on_message, on_connect=self._on_connect)

    # paho's thread

    def _on_connect(self, session_present: bool) -> None:
        self.inbox.append(("connected", None))
        if self.wake:
            self.wake.set()

    def _on_message(self, msg) -> None:
        publisher = msg.topic.split("/")[2]
        self.inbox.append(("command", (publisher, msg.payload)))
        if self.wake:
            self.wake.set()

    # main thread

    def publish_state(self) -> None:
        setpoints = {n: round(s.setpoint, 2) for n, s in self.sensors.items()}
        alarms = [n for n, s in self.sensors.items() if s.alarm]
        self.client.publish(M.state_topic(self.name), M.state(self.name, self.state, setpoints, alarms), 1, True)

    def handle_inbox(self) -> None:
        while self.inbox:
            kind, data = self.inbox.popleft()
            if kind == "connected":
                self.client.publish(M.status_topic(self.name), M.status(self.name, True), 1, True)
                self.publish_state()
            else:
                self.command(*data)

    def command(self, publisher: str, payload: bytes) -> None:
        try:
            cmd = M.parse_command(payload, tuple(self.sensors))
        except M.BadCommand as e:
            self.log.warning("command refused", device=self.name, sender=publisher, error=str(e))
            return
        name, before = cmd["command"], self.state
        if name == "start":
            if self.state == "fault":
                self.log.warning("start refused: device in fault, reset it first", device=self.name, sender=publisher)
                return
            self.state = "running"
        elif name == "stop":
            self.state = "stopped"
        elif name == "reset":
            if self.state == "fault":
                self.state = "stopped"
        else:
            sensor = self.sensors[cmd["sensor"]]
            span = sensor.cfg.high - sensor.cfg.low
            sensor.setpoint = min(max(float(cmd["value"]), sensor.cfg.low - span), sensor.cfg.high + span)
        self.log.info("command", device=self.name, command=name, sender=publisher, reason=cmd.get("reason", "-"),
                      state=f"{before}->{self.state}",
                      **({"sensor": cmd["sensor"], "setpoint": cmd["value"]} if name == "setpoint" else {}))
        self.publish_state()

    def tick(self) -> None:
        running = self.state == "running"
        if self.anomaly:
            if running and self.rng.random() < JAM_CHANCE:
                self.state = "fault"
                self.log.warning("anomaly: device jammed (fault); reset needed", device=self.name)
                self.publish_state()
                running = False
            elif self.rng.random() < SPIKE_CHANCE:
                s = self.rng.choice(list(self.sensors.values()))
                s.spike = SPIKE_TICKS
                self.log.info("anomaly: injecting out-of-range values", device=self.name, sensor=s.cfg.name)
        changed = False
        for name, s in self.sensors.items():
            value = s.step(running)
            self.client.publish(M.telemetry_topic(self.name, name), M.telemetry(self.name, name, value, s.cfg.unit), 0)
            alarm = s.check()
            if alarm is not None:
                what, level, threshold = alarm
                self.client.publish(M.alarm_topic(self.name, name),
                                    M.alarm(self.name, name, value, s.cfg.unit, what, level, threshold), 1)
                (self.log.warning if what == "raised" else self.log.info)(
                    f"alarm {what}", device=self.name, sensor=name, value=value, level=level, threshold=threshold)
                changed = True
        if changed:
            self.publish_state()


def pick(devices: tuple[FactoryDeviceConfig, ...], names: list[str] | None) -> list[FactoryDeviceConfig]:
    if not names or names == ["all"]:
        return list(devices)
    known = {d.name: d for d in devices}
    missing = [n for n in names if n not in known]
    if missing:
        raise Exit(service.EX_CONFIG, f"no [[factory.device]] named {', '.join(missing)} "
                                      f"(devices: {', '.join(known) or 'none'})")
    return [known[n] for n in dict.fromkeys(names)]


def serve(svc: Service) -> None:
    cfg, args = svc.config, svc.args
    chosen = pick(cfg.factory.device, args.device)
    rng = random.Random(args.seed)
    wake = threading.Event()
    devices = [Device(d, cfg.mqtt, svc.log, args.anomaly, rng) for d in chosen]
    for d in devices:
        d.wake = wake
        d.client.start()
    crash_at = time.monotonic() + args.crash_after if args.crash_after is not None else None
    svc.status_fn = lambda: " ".join(f"{d.name}={d.state}{'' if d.client.connected else '(offline)'}" for d in devices)

    def families() -> Families:
        out = Families()
        out.gauge("iot_device_connected", "1 while the device is connected to the broker.", label="device",
                  values={d.name: d.client.connected for d in devices})
        out.gauge("iot_device_running", "1 while the device runs (0: stopped or in fault).", label="device",
                  values={d.name: d.state == "running" for d in devices})
        out.gauge("iot_device_alarms", "Alarms raised and not cleared.", label="device",
                  values={d.name: sum(1 for s in d.sensors.values() if s.alarm) for d in devices})
        return out

    # iot-device@NAME (one device) on its own port, so that each of the per-device units has one.
    one = len(chosen) == 1 and args.device not in (None, ["all"])
    index = METRICS_OFFSET["device"] + cfg.factory.device.index(chosen[0]) if one else METRICS_OFFSET["devices"]
    endpoint = metrics.serve(svc.log, cfg.factory.metrics, "[factory] metrics", families, index=index)
    svc.ready(f"devices {', '.join(d.name for d in devices)}" + (" with anomalies" if args.anomaly else ""))
    now = time.monotonic()
    for d in devices:
        d.due = now
    try:
        while svc.wait(0):
            now = time.monotonic()
            if crash_at is not None and now >= crash_at:
                svc.log.warning("crashing on purpose (--crash-after): no DISCONNECT, the broker sends the wills",
                                devices=",".join(d.name for d in devices))
                os._exit(service.EX_SOFTWARE)
            for d in devices:
                d.handle_inbox()
                if now >= d.due:
                    d.tick()
                    d.due = max(d.due + d.cfg.interval, now)
            nxt = min(d.due for d in devices)
            if crash_at is not None:
                nxt = min(nxt, crash_at)
            wake.wait(max(0.0, min(nxt - time.monotonic(), 0.5)))
            wake.clear()
    finally:
        # A clean stop says "offline" itself (a graceful DISCONNECT sends no will): every device's
        # at once, then one wait for them all, so a broker that is gone costs 2 s, not 2 s each.
        sent = [d.client.publish(M.status_topic(d.name), M.status(d.name, False), 1, True)
                for d in devices if d.client.connected]
        deadline = time.monotonic() + 2
        for info in sent:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        for d in devices:
            d.client.stop()
        if endpoint is not None:
            endpoint.close()


def _seconds(text: str) -> float:
    v = float(text)
    if not 0 < v < 1e9:
        raise ValueError(text)
    return v


def add_arguments(p) -> None:
    p.add_argument("--device", action="append", metavar="NAME",
                   help="a [[factory.device]] to run; may repeat; 'all' (the default) runs every one")
    p.add_argument("--anomaly", action="store_true", help="now and then inject out-of-range values and jams")
    p.add_argument("--crash-after", type=_seconds, metavar="SECONDS",
                   help="exit abruptly after this many seconds, without DISCONNECT (the broker sends the wills)")
    p.add_argument("--seed", type=int, help="random seed, for a repeatable simulation")
    p.add_argument("--list", action="store_true",
                   help="print the iot-device@NAME instances [factory] processes asks for ('all', or each device)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list" in argv:  # for install.sh and people: the instances iot-device@NAME [factory] processes asks for
        p = argparse.ArgumentParser(prog="iot-device", add_help=False)
        p.add_argument("-c", "--config")
        known, _ = p.parse_known_args(argv)
        try:
            fc = configmod.load(known.config).factory
        except configmod.ConfigError as e:
            print(f"iot-device: config error: {e}", file=sys.stderr)
            return service.EX_CONFIG
        print("all" if fc.processes == "one" else "\n".join(d.name for d in fc.device))
        return service.EX_OK
    return service.run(
        "iot-device",
        "Simulated factory devices (seed 003): telemetry at QoS 0, alarms at QoS 1, retained state and online "
        "status with a will of offline; obeys start/stop/reset/setpoint commands. Reads [factory] and [mqtt].",
        serve, add_arguments=add_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
