"""iot-plc: a PLC's readings to MQTT at QoS 1, each one kept on disk until the broker's PUBACK.

Theory of operation
===================

One process per PLC (`iot-plc --plc NAME`, the unit iot-plc@NAME). Two threads: paho's network
thread only notes each PUBACK (mid, time) and wakes the main thread; the main thread does the
rest, so the queue and the in-flight table have one owner:

1. every `interval` seconds it takes a reading from the source (simulated or Modbus) and stores
   it in the queue on disk with the next `seq` (queue.py), committed before anything is sent;
2. while connected it publishes queued readings in seq order, at most `window` awaiting PUBACK
   (`inflight`: mid -> seq, sent time);
3. on each PUBACK it removes the reading from the queue and logs the packet id and round trip.

While the broker cannot be reached, readings pile up in the queue (bounded: the oldest go,
counted and logged). paho keeps the published-but-unacknowledged ones and sends them again,
DUP set, when it reconnects; after a restart of this process the queue is all there is, and it
is sent from the start. Either way a reading may arrive twice but never goes missing: the
database keeps one row per (device_id, seq).
"""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections import deque

from .. import metrics, service
from ..config import Config, PlcDeviceConfig
from ..metrics import Families
from ..mqttclient import MqttClient
from ..service import Exit, Service
from . import reading
from .queue import Queue, QueueDamaged
from .source import Modbus, open_source

NAME = "iot-plc"
# A pass that publishes or confirms more than this many readings (a backlog going out after an
# outage) logs one summary line instead of one line per packet.
LINES_PER_PASS = 20
DROP_LINE_EVERY = 60.0


def pick(cfg: Config, name: str | None) -> PlcDeviceConfig:
    devices = cfg.plc.device
    names = ", ".join(d.name for d in devices) or "none"
    if name is None:
        if len(devices) == 1:
            return devices[0]
        raise Exit(service.EX_USAGE, f"--plc NAME is needed: the config has {len(devices)} PLCs ({names})")
    for d in devices:
        if d.name == name:
            return d
    raise Exit(service.EX_CONFIG, f"no [[plc.device]] named {name!r} in {cfg.source or 'the built-in defaults'} "
                                  f"(PLCs there: {names})")


class Plc:
    def __init__(self, svc: Service, dev: PlcDeviceConfig, queue: Queue, source):
        self.svc, self.log, self.dev, self.queue, self.source = svc, svc.log, dev, queue, source
        cfg = svc.config
        self.window = cfg.plc.window
        self.acks: deque[tuple[int, float]] = deque()  # (mid, when), appended by paho's thread
        self.wake = threading.Event()
        self.reconnected = False
        self.inflight: dict[int, tuple[int, float]] = {}  # mid -> (seq, sent at)
        self.sent_upto = -1  # the highest seq handed to paho
        self.acked = self.published = 0
        self.dropped_unlogged = 0
        self.unstored = 0
        self.drop_line_due = 0.0
        self.client = MqttClient(cfg.mqtt, f"{cfg.mqtt.client_id_prefix}-plc-{dev.name}", log=self.log,
                                 max_inflight=self.window, on_publish=self._on_publish,
                                 on_connect=self._on_connect)

    # paho's thread ----------------------------------------------------------------------------

    def _on_publish(self, mid: int) -> None:
        self.acks.append((mid, time.monotonic()))
        self.wake.set()

    def _on_connect(self, session_present: bool) -> None:
        self.reconnected = True
        self.wake.set()

    # main thread -------------------------------------------------------------------------------

    def take_reading(self) -> None:
        got = self.source.read()
        if got is None:
            return
        values, units = got
        ts = time.time()
        dev_id = self.dev.id
        try:
            seq, dropped = self.queue.add(lambda s: reading.encode(dev_id, s, ts, values, units))
        except sqlite3.Error as e:  # a full or failing disk: this reading cannot be kept, so it is not taken
            self.unstored += 1
            if self.unstored == 1 or self.unstored % 100 == 0:
                self.log.error("cannot store the reading on disk; it is lost", error=str(e), lost_total=self.unstored,
                               queue=str(self.queue.path))
            return
        self.log.debug("reading taken", seq=seq, **values)
        if dropped:
            self.dropped_unlogged += dropped
            now = time.monotonic()
            if now >= self.drop_line_due:  # one line a minute at most: an outage of days stays readable
                self.drop_line_due = now + DROP_LINE_EVERY
                self.log.warning("queue full: oldest readings dropped", dropped=self.dropped_unlogged,
                                 dropped_total=self.queue.dropped, queue_size=self.queue.limit)
                self.dropped_unlogged = 0

    def confirm(self) -> None:
        """PUBACKs in: the readings leave the queue."""
        acks = self.acks
        if not acks:
            return
        done: list[int] = []
        lines = len(acks) <= LINES_PER_PASS
        rtt_max = 0.0
        while acks:
            mid, when = acks.popleft()
            entry = self.inflight.pop(mid, None)
            if entry is None:
                continue  # a QoS 1 ack for nothing of ours: cannot happen with paho, harmless
            seq, sent = entry
            rtt = (when - sent) * 1000
            rtt_max = max(rtt_max, rtt)
            done.append(seq)
            if lines:
                self.log.info("PUBACK received: the broker has the reading", mid=mid, seq=seq, rtt_ms=f"{rtt:.1f}")
        self.queue.remove(done)
        self.acked += len(done)
        if not lines:
            self.log.info("PUBACKs received", count=len(done), seqs=f"{done[0]}-{done[-1]}",
                          rtt_max_ms=f"{rtt_max:.1f}", queued=len(self.queue))

    def send(self) -> None:
        if self.reconnected:
            self.reconnected = False
            now = time.monotonic()  # paho sends the in-flight ones again now: time them from here
            self.inflight = {mid: (seq, now) for mid, (seq, _) in self.inflight.items()}
        room = self.window - len(self.inflight)
        if room <= 0 or not self.client.connected:
            return
        rows = self.queue.after(self.sent_upto, room)
        lines = len(rows) <= LINES_PER_PASS
        topic = self.dev.topic
        for seq, payload in rows:
            info = self.client.publish(topic, payload, 1)
            self.inflight[info.mid] = (seq, time.monotonic())
            self.sent_upto = seq
            if lines:
                self.log.info("PUBLISH sent, awaiting PUBACK", mid=info.mid, seq=seq, qos=1, topic=topic,
                              bytes=len(payload))
        self.published += len(rows)
        if rows and not lines:
            self.log.info("PUBLISH sent (queued readings)", count=len(rows), seqs=f"{rows[0][0]}-{rows[-1][0]}",
                          queued=len(self.queue))

    def families(self) -> Families:
        """The counters as Prometheus metrics (daemons/metrics.py), read from the scrape's thread."""
        q, out = self.queue, Families()
        out.counter("iot_plc_readings_taken", "Readings taken and stored in the disk queue (the next seq "
                    "number: counts since the queue was created, across restarts).", q.next_seq)
        out.counter("iot_plc_readings_published", "PUBLISHes handed to the broker connection since start.",
                    self.published)
        out.counter("iot_plc_readings_acknowledged", "Readings the broker acknowledged (PUBACK) since start.",
                    self.acked)
        out.counter("iot_plc_readings_dropped", "Oldest readings dropped from a full disk queue (across restarts).",
                    q.dropped)
        out.counter("iot_plc_readings_unstored", "Readings lost because the disk queue could not be written.",
                    self.unstored)
        out.gauge("iot_plc_queue_readings", "Readings in the disk queue, not yet acknowledged.", len(q))
        out.gauge("iot_plc_queue_limit_readings", "The disk queue's bound ([plc] queue_size).", q.limit)
        out.gauge("iot_plc_inflight_readings", "Readings published and awaiting PUBACK.", len(self.inflight))
        out.gauge("iot_plc_broker_connected", "1 while connected to the broker.", self.client.connected)
        modbus = isinstance(self.source, Modbus)
        out.gauge("iot_plc_up", "1 while the PLC answers (a simulated one always does).",
                  not modbus or self.source.down_since is None)
        out.counter("iot_plc_readings_missed", "Readings due while the PLC did not answer.",
                    self.source.missed_total if modbus else 0)
        return out

    def summary(self) -> str:
        q = self.queue
        line = (f"{'connected' if self.client.connected else 'broker not connected'}; next_seq={q.next_seq} "
                f"queued={len(q)} in_flight={len(self.inflight)} acked={self.acked} dropped={q.dropped}")
        if isinstance(self.source, Modbus):
            line += f" plc={'down' if self.source.down_since is not None else 'up'} missed={self.source.missed_total}"
        return line

    def run(self) -> None:
        interval = self.dev.interval
        due = time.monotonic()
        while self.svc.wait(0):
            now = time.monotonic()
            if now >= due:
                self.take_reading()
                due += interval
                if due <= now:  # a slow source or a stopped clock: do not take a burst to catch up
                    due = now + interval
            self.confirm()
            self.send()
            self.wake.wait(min(max(0.0, due - time.monotonic()), 0.5))
            self.wake.clear()


def serve(svc: Service) -> None:
    cfg = svc.config
    dev = pick(cfg, svc.args.plc)
    path = cfg.paths.state_dir / "plc" / f"{dev.name}.db"
    try:
        queue = Queue(path, cfg.plc.queue_size)
    except QueueDamaged as e:
        raise Exit(service.EX_DATAERR, str(e)) from None
    except OSError as e:
        raise Exit(service.EX_CANTCREAT, f"cannot open the queue {path}: {e}") from None
    source = open_source(dev, svc.log, cfg.plc.retry_min, cfg.plc.retry_max)
    plc = Plc(svc, dev, queue, source)
    svc.status_fn = plc.summary
    plc.client.start()
    # One process per PLC: the Nth [[plc.device]] serves on the port + N.
    endpoint = metrics.serve(svc.log, cfg.plc.metrics, "[plc] metrics", plc.families,
                             index=cfg.plc.device.index(dev))
    svc.ready(f"PLC {dev.name} ({source.describe()}) as device {dev.id} every {dev.interval:g}s to {dev.topic}; "
              f"next_seq={queue.next_seq} queued={len(queue)}")
    try:
        plc.run()
    finally:
        svc.log.info("final " + plc.summary())
        if endpoint is not None:
            endpoint.close()
        plc.client.stop()
        source.close()
        queue.close()


def add_arguments(p) -> None:
    p.add_argument("--plc", metavar="NAME", help="the [[plc.device]] to run (needed when the config has several)")
    p.add_argument("--list", action="store_true", help="print the names of the configured PLCs and exit")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list" in argv:  # the names iot-plc@NAME can take
        return service.list_instances(NAME, argv, lambda cfg: [d.name for d in cfg.plc.device])
    return service.run(
        NAME,
        "A PLC's readings to MQTT at QoS 1 (seed 002): every interval it reads the PLC (simulated, or Modbus "
        "TCP), keeps the reading on disk with the next seq number and publishes it; a reading leaves the "
        "disk queue only on its PUBACK, so none is lost while the broker or the network is down. Reads the "
        "[plc] and [mqtt] sections.",
        serve,
        add_arguments=add_arguments,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
