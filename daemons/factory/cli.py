"""`iotctl bad-actor`: what the ACL forbids, attempted, and each outcome reported (seed 003,
exercise 6).

It connects as client id "bad-actor" (with [mqtt]'s user, the one every local daemon has) and
tries to: subscribe to every device's telemetry, publish fake telemetry as a device, send a stop
command as the dashboard, and overwrite the device's retained online status. A probe connected
as the observer (who may read all of factory/#) tells whether anything got through: after the
attempts the bad actor publishes a marker on a topic it may write, and the broker delivers one
client's messages in order, so whatever was not delivered before the marker was not delivered at
all. Finally it looks for the broker's "denied" lines (journal, or the log `iotctl up` writes).

Exit code 0 if every attempt was refused, 1 if one got through, 69 if the broker is unreachable.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from .. import config as configmod
from . import as_role
from . import messages as M

EX_FAIL, EX_UNAVAILABLE = 1, 69
ACTOR = "bad-actor"


class _Client:
    def __init__(self, mqtt, client_id: str, timeout: float):
        self.timeout = timeout
        self.connected = threading.Event()
        self.rc = None
        self.suback: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        if mqtt.username:
            c.username_pw_set(mqtt.username, mqtt.read_password())
        if mqtt.cafile is not None:
            c.tls_set(ca_certs=str(mqtt.cafile), certfile=str(mqtt.certfile) if mqtt.certfile else None,
                      keyfile=str(mqtt.keyfile) if mqtt.keyfile else None)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda cl, ud, mid, codes, props: self.suback.put([rc.value for rc in codes])
        c.on_message = lambda cl, ud, msg: self.messages.put(msg)
        self.paho = c
        c.connect_async(mqtt.host, mqtt.port, 30)
        c.loop_start()

    def _on_connect(self, client, userdata, flags, rc, props) -> None:
        self.rc = rc
        self.connected.set()

    def ready(self) -> str | None:
        """None once connected, else why not."""
        if not self.connected.wait(self.timeout):
            return "no answer from the broker"
        return None if not self.rc.is_failure else f"connection refused: {self.rc}"

    def subscribe(self, topic: str) -> int | None:
        self.paho.subscribe(topic, 1)
        try:
            return self.suback.get(timeout=self.timeout)[0]
        except queue.Empty:
            return None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        info = self.paho.publish(topic, payload, 1, retain)
        info.wait_for_publish(self.timeout)
        return info.is_published()

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def _until(probe: _Client, topic: str, timeout: float, each) -> bool:
    """Hand each message the probe gets to `each` until one on `topic`; False if none in time."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = probe.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return False
        if msg.topic == topic:
            return True
        each(msg)


def _broker_lines(cfg: configmod.Config, since: float) -> str | None:
    """The broker's log since `since`: from the journal, else from the file `iotctl up` writes."""
    if shutil.which("journalctl") and os.path.isdir("/run/systemd/system"):
        r = subprocess.run(["journalctl", "-u", "iot-broker", "--since", f"@{int(since)}", "-o", "cat", "--no-pager"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode == 0 and r.stdout:
            return r.stdout
    path = cfg.paths.state_dir / "log" / "iot-broker.log"
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def cmd_bad_actor(args, log) -> int:
    cfg = configmod.load(args.config)
    mqtt = cfg.mqtt
    if args.host or args.port:
        import dataclasses  # noqa: PLC0415

        mqtt = dataclasses.replace(mqtt, host=args.host or mqtt.host, port=args.port or mqtt.port)
    devices = {d.name: d for d in cfg.factory.device}
    device = devices.get(args.device or next(iter(devices), ""))
    if device is None:
        print(f"iotctl bad-actor: no [[factory.device]] named {args.device!r}", flush=True)
        return EX_FAIL
    sensor = device.sensor[0].name
    started = time.time()
    probe = _Client(as_role(mqtt, cfg.factory.observer_username), f"{ACTOR}-probe-{os.getpid()}", args.timeout)
    actor = _Client(mqtt, ACTOR, args.timeout)
    try:
        for who, c in (("probe (as the observer)", probe), (ACTOR, actor)):
            why = c.ready()
            if why:
                print(f"iotctl bad-actor: {who}: {why} at {mqtt.host}:{mqtt.port}")
                return EX_UNAVAILABLE
        if probe.subscribe(f"{M.PREFIX}/#") != 1:
            print("iotctl bad-actor: the probe may not read factory/# (is [factory] observer_username in the ACL?)")
            return EX_FAIL
        # Skip the retained messages the probe's subscription brings: up to a first marker of ours.
        begin = M.telemetry_topic(ACTOR, "marker")
        actor.publish(begin, orjson.dumps({"begin": started}))
        if not _until(probe, begin, args.timeout, lambda m: None):
            print("iotctl bad-actor: the first marker did not arrive (may the bad actor write its own telemetry?)")
            return EX_FAIL
        print(f"bad actor: client id {ACTOR!r}, attacking device {device.name!r}")
        through = 0
        code = actor.subscribe(f"{M.PREFIX}/telemetry/#")
        refused = code == 0x80
        through += not refused
        print(f"  subscribe {M.PREFIX}/telemetry/# (every device's telemetry): "
              + ("REFUSED, SUBACK 0x80" if refused else f"GRANTED (SUBACK {code}): the ACL does not stop it"))
        marker = orjson.dumps({"bad_actor": True, "at": started})
        attempts = [
            ("publish fake telemetry as the device", M.telemetry_topic(device.name, sensor), marker, False),
            ("send a stop command as the dashboard", M.command_topic("dashboard", device.name),
             M.command("stop", "bad actor"), False),
            ("overwrite the device's retained status", M.status_topic(device.name), M.status(device.name, False), True),
        ]
        for _, topic, payload, retain in attempts:
            actor.publish(topic, payload, retain)
        end = begin
        actor.publish(end, orjson.dumps({"end": started}))
        seen: set[str] = set()

        def note(msg) -> None:
            if any(msg.topic == t and msg.payload == p for _, t, p, _ in attempts):
                seen.add(msg.topic)

        if not _until(probe, end, args.timeout, note):
            print("iotctl bad-actor: the last marker did not arrive; cannot tell what was delivered")
            return EX_FAIL
        for what, topic, _, _ in attempts:
            got = topic in seen
            through += got
            print(f"  {what} ({topic}): " + ("DELIVERED: the ACL does not stop it" if got else
                                             "acknowledged (MQTT 3.1.1 has no refusal) but NOT DELIVERED"))
        lines = _broker_lines(cfg, started)
        denied = [x for x in (lines or "").splitlines() if "denied" in x and ACTOR in x and x]
        if lines is None:
            print("  broker log: not readable here; look for 'denied' in `journalctl -u iot-broker`")
        elif denied:
            print(f"  broker log: {len(denied)} 'denied' line(s) for {ACTOR}, e.g.:")
            for x in denied[-3:]:
                print(f"    {x.strip()[:200]}")
        else:
            print(f"  broker log: no 'denied' line for {ACTOR} yet (the broker logs the first denial of each kind, "
                  "then one in 1000)")
        print("every attempt was refused" if not through else f"{through} attempt(s) got through")
        return 0 if not through else EX_FAIL
    finally:
        probe.close()
        actor.close()


def add_commands(sub) -> None:
    p = sub.add_parser("bad-actor", help="attempt what the factory's ACL forbids and report each outcome",
                       description="Connect as client id 'bad-actor' and attempt what etc/iot/acl forbids "
                                   "(read all telemetry, publish as a device, command as the dashboard, overwrite "
                                   "a device's status); report each outcome and the broker's 'denied' lines. "
                                   "Exit 0 if all were refused, 1 if one got through.")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--device", help="the device to attack (default: the first [[factory.device]])")
    p.add_argument("--host", help="broker host (default from [mqtt])")
    p.add_argument("--port", type=int, help="broker port (default from [mqtt])")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    p.set_defaults(func=cmd_bad_actor)
