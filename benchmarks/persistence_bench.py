"""Persistence benchmarks of issue 17: iot-broker's SQLite store against Mosquitto 2 with
`persistence true`, same load generator, one broker process per run.

    .venv/bin/python benchmarks/persistence_bench.py [--scenarios throughput,backlog] [--repeat 3]
                                                     [--backlog 1000000] [--write docs/BENCHMARKS.md]

throughput: one publisher keeps 100 QoS 1 messages in flight for --seconds (4), one persistent
    subscriber (clean_session=0, subscribed at QoS 1, connected, acknowledging everything)
    receives them; then the publisher stops and the run waits for the subscriber to have every
    acknowledged message (the drain). Throughput = distinct messages delivered / (first publish
    to last delivery). Brokers: iot-broker with its defaults (persistence on), iot-broker with
    `persistence = false`, Mosquitto with persistence and no queue limit, and Mosquitto with its
    default queue limit (1000) to show what it drops.
backlog: a persistent subscriber subscribes and goes away; one publisher publishes --backlog
    (1,000,000) QoS 1 messages, 100 in flight, and every PUBACK is waited for; then the broker's
    RSS and its store on disk are measured (Mosquitto: SIGUSR1 makes it write its database, as
    its autosave would); then the subscriber comes back and receives all of them.

Every payload is 64 bytes and starts with a 4-byte sequence number, so the subscriber counts
distinct messages: lost = acknowledged to the publisher - distinct delivered. The packets are
encoded before the clock starts and the subscriber acknowledges with slice arithmetic (see
broker_bench.py), so the generator stays light.

Brokers, all on loopback, each with a fresh state directory in a temp dir:
- iot-broker: `iot-broker --config` with only host, port, state_dir and `sys_interval = 0`
  (plus `persistence = false` for that variant): shipped defaults otherwise.
- Mosquitto: tests.support.Mosquitto plus `persistence true`, a `persistence_location` in the
  temp dir and `max_queued_messages 0` (no limit: its default 1000 would drop from the queues
  these scenarios build), its defaults otherwise (autosave_interval 1800 s).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rawflow import SubCounter, connect, subscribe  # noqa: E402
from benchmarks.common import cpu_seconds, load_average, machine, rss_kib, write_section  # noqa: E402
from daemons.broker.packets import encode_publish  # noqa: E402
from tests.support import BIN, Mosquitto, Proc, free_port, port_open, wait_for  # noqa: E402

TOPIC = b"bench/persist"
FILL = b"x" * 60  # + 4 bytes of sequence number = 64-byte payloads
SAMPLE = encode_publish(TOPIC, bytes(64), 1, False, False, 1)
PID_OFFSET = len(SAMPLE) - 64 - 2
DISCONNECT = b"\xe0\x00"
STALL = 30.0  # seconds without progress before a phase gives up (and reports what it has)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    kind: str  # "ours" or "mosquitto"
    conf: str = ""  # extra lines for its configuration


OURS = Variant("iot-broker", "ours")
OURS_OFF = Variant("iot-broker, `persistence = false`", "ours", "persistence = false\n")
MOSQ = Variant("Mosquitto, `persistence true`", "mosquitto", "max_queued_messages 0\n")
MOSQ_DEFAULT_QUEUE = Variant("Mosquitto, `persistence true`, max_queued_messages 1000 (default)", "mosquitto")


class Server:
    """One broker under test in its own directory."""

    def __init__(self, variant: Variant, work: Path):
        self.variant, self.dir = variant, work
        if variant.kind == "ours":
            self.port = free_port()
            cfg = work / "iot.toml"
            cfg.write_text(f'[paths]\nstate_dir = "{work / "var"}"\n[broker]\nhost = "127.0.0.1"\n'
                           f"port = {self.port}\nsys_interval = 0\n{variant.conf}")
            self.proc = Proc([str(BIN / "iot-broker"), "--config", str(cfg)], workdir=work, name="iot-broker").start()
            try:
                wait_for(lambda: port_open(self.port) or not self.proc.running(), 15, what="iot-broker to listen")
            finally:
                if not port_open(self.port):
                    self.proc.stop()
            if not self.proc.running():
                raise RuntimeError(f"iot-broker exited: {self.proc.log()[-2000:]}")
        else:
            (work / "mosq").mkdir()
            if os.geteuid() == 0:  # Mosquitto started as root runs as user `mosquitto` (its default `user`)
                os.chmod(work, 0o711)
                shutil.chown(work / "mosq", "mosquitto")
            self.mosq = Mosquitto(work, conf=f"persistence true\npersistence_location {work / 'mosq'}/\n"
                                             + variant.conf).start()
            self.proc, self.port = self.mosq.proc, self.mosq.port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def store_files(self) -> list[Path]:
        if self.variant.kind == "ours":
            return sorted((self.dir / "var" / "broker").glob("store.db*"))
        return [self.dir / "mosq" / "mosquitto.db"]

    def store_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.store_files() if p.exists())

    def save(self) -> float:
        """Mosquitto: write its database now (SIGUSR1, what autosave does) and wait until it is
        renamed into place; seconds it took. Ours is written as it goes: 0."""
        if self.variant.kind == "ours":
            return 0.0
        db = self.dir / "mosq" / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        t = time.monotonic()
        self.proc.signal(signal.SIGUSR1)
        saved = lambda: db.exists() and db.stat().st_mtime_ns != before and not db.with_suffix(".db.new").exists()  # noqa: E731
        wait_for(lambda: saved() or "Error saving" in self.proc.log(), 300, 0.05, what="mosquitto.db to be written")
        if not saved():
            raise RuntimeError(f"mosquitto could not save: {self.proc.log()[-1000:]}")
        return time.monotonic() - t

    def stop(self) -> None:
        self.proc.stop(60)


def packets(n: int) -> memoryview:
    """n QoS 1 PUBLISHes with sequence numbers 0..n-1, back to back (all the same size)."""
    return memoryview(b"".join(encode_publish(TOPIC, seq.to_bytes(4, "little") + FILL, 1, False, False,
                                              seq % 65535 + 1) for seq in range(n)))


def persistent_subscriber(port: int, cid: str, seen: set[int], fresh: bool):
    """A clean_session=0 subscriber; `fresh`: subscribe first (a new session)."""
    s = connect(port, cid, clean_session=False)
    if fresh:
        subscribe(s, TOPIC.decode(), 1)
    s.setblocking(False)
    return SubCounter(s, len(SAMPLE), 1, PID_OFFSET, seen)


@dataclass(slots=True)
class Pub:
    """Publishing progress, for the report."""
    sent: int = 0
    acked: int = 0
    last_ack: float = 0.0
    stalled: bool = False
    times: dict[str, float] = field(default_factory=dict)


def publish(port: int, data: memoryview, *, inflight: int, seconds: float | None, sub: SubCounter | None,
            deadline: float) -> Pub:
    """Publish the packets in order keeping at most `inflight` unacknowledged, until all are
    acknowledged, or (with `seconds`) stop sending new ones after that long and wait for the
    acknowledgements of what was sent. A connected subscriber is served in the same loop.

    Like a real client (paho), it sends a new message as soon as one is acknowledged, not in
    bursts: a client that waits for room for several lets a broker's Nagle-delayed PUBACKs sit
    behind the kernel's delayed ACK (40 ms), which would measure the generator."""
    pub = connect(port, "bench-pub")
    pub.setblocking(False)
    st = Pub()
    size = len(SAMPLE)
    n = len(data) // size
    pending = data[:0]
    rest = 0  # bytes of a partial PUBACK
    start = last_progress = time.perf_counter()
    stop_at = start + seconds if seconds else float("inf")
    socks = [pub] + ([sub.sock] if sub else [])
    while True:
        now = time.perf_counter()
        sending = now < stop_at and st.sent < n
        if not sending and not pending and st.acked >= st.sent:
            break
        if now - last_progress > STALL or time.monotonic() > deadline:
            st.stalled = True
            break
        while True:  # fill the window; stop when it is full or the socket is
            if not pending:
                k = min(n - st.sent, inflight - (st.sent - st.acked)) if sending else 0
                if k <= 0:
                    break
                pending = data[st.sent * size:(st.sent + k) * size]
                st.sent += k
            try:
                pending = pending[pub.send(pending):]
            except BlockingIOError:
                break
            if pending:
                break
        ready, _, _ = select.select(socks, [pub] if pending else [], [], 0.05)
        for s in ready:
            if s is pub:
                got = pub.recv(1 << 20)
                if not got:
                    raise ConnectionError("publisher closed by broker")
                rest += len(got)
                k, rest = divmod(rest, 4)  # every packet to the publisher is a 4-byte PUBACK
                if k:
                    st.acked += k
                    st.last_ack = last_progress = time.perf_counter()
            else:
                sub.on_readable()
    st.times["start"] = start
    pub.sendall(DISCONNECT)
    pub.close()
    return st


def drain(sub: SubCounter, want: int, deadline: float) -> tuple[float, bool]:
    """Serve the subscriber until it has `want` distinct messages; (time of the last delivery, stalled)."""
    last = time.perf_counter()
    have = len(sub.seen)
    while have < want:
        if time.perf_counter() - last > STALL or time.monotonic() > deadline:
            return last, True
        if select.select([sub.sock], [], [], 0.1)[0]:
            sub.on_readable()
            if len(sub.seen) != have:
                have, last = len(sub.seen), time.perf_counter()
    return last, False


# -- scenarios ---------------------------------------------------------------------------------


def throughput(variant: Variant, seconds: float, data: list[bytes]) -> dict:
    with tempfile.TemporaryDirectory(prefix="persist-bench-") as d:
        srv = Server(variant, Path(d))
        try:
            seen: set[int] = set()
            sub = persistent_subscriber(srv.port, "bench-sub", seen, fresh=True)
            cpu0 = cpu_seconds(srv.pid)
            deadline = time.monotonic() + seconds + 300
            st = publish(srv.port, data, inflight=100, seconds=seconds, sub=sub, deadline=deadline)
            pub_end = time.perf_counter()
            last, stalled = drain(sub, st.acked, deadline)
            last = max(last, st.last_ack)
            elapsed = last - st.times["start"]
            r = {
                "acked": st.acked, "delivered": len(seen), "received": sub.count, "lost": st.acked - len(seen),
                "rate": len(seen) / elapsed, "publish_rate": st.acked / (st.last_ack - st.times["start"]),
                "drain_s": max(0.0, last - pub_end), "broker_cpu_s": cpu_seconds(srv.pid) - cpu0,
                "rss_mib": rss_kib(srv.pid) / 1024, "stalled": st.stalled or stalled, "load": load_average(),
            }
            sub.sock.close()
        finally:
            srv.stop()
    return r


def backlog(variant: Variant, data: list[bytes], n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="persist-bench-") as d:
        srv = Server(variant, Path(d))
        try:
            seen: set[int] = set()
            sub = persistent_subscriber(srv.port, "bench-sub", seen, fresh=True)
            sub.sock.setblocking(True)
            sub.sock.sendall(DISCONNECT)
            sub.sock.close()
            rss0 = rss_kib(srv.pid)
            cpu0 = cpu_seconds(srv.pid)
            st = publish(srv.port, data, inflight=100, seconds=None, sub=None, deadline=time.monotonic() + 900)
            publish_s = st.last_ack - st.times["start"]
            cpu_pub = cpu_seconds(srv.pid) - cpu0
            time.sleep(0.5)
            rss_full = rss_kib(srv.pid)
            save_s = srv.save()
            disk = srv.store_bytes()
            load_mid = load_average()
            sub = persistent_subscriber(srv.port, "bench-sub", seen, fresh=False)
            t0 = time.perf_counter()
            last, stalled = drain(sub, n, time.monotonic() + 900)
            rss_end = rss_kib(srv.pid)
            r = {
                "acked": st.acked, "publish_s": publish_s, "publish_rate": st.acked / publish_s,
                "rss_start_mib": rss0 / 1024, "rss_full_mib": rss_full / 1024, "disk_mib": disk / 2**20,
                "save_s": save_s, "drain_s": last - t0, "drain_rate": len(seen) / max(1e-9, last - t0),
                "delivered": len(seen), "received": sub.count, "lost": n - len(seen),
                "rss_end_mib": rss_end / 1024, "rss_peak_mib": rss_kib(srv.pid, "VmHWM") / 1024,
                "cpu_publish_s": cpu_pub, "cpu_drain_s": cpu_seconds(srv.pid) - cpu0 - cpu_pub,
                "stalled": st.stalled or stalled, "load": f"{load_mid}/{load_average()}",
            }
            sub.sock.close()
        finally:
            srv.stop()
    return r


# -- report ------------------------------------------------------------------------------------


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def cell(runs: list[dict], key: str, fmt: str) -> str:
    """Median, and the range when there is more than one run."""
    vals = [r[key] for r in runs]
    m = format(statistics.median(vals), fmt)
    return m if len(vals) == 1 else f"{m} ({format(min(vals), fmt)}-{format(max(vals), fmt)})"


def losses(runs: list[dict]) -> str:
    return " / ".join(f"{r['delivered']:,}, {r['lost']:,}" for r in runs)


def render_throughput(res: dict[str, list[dict]], args) -> str:
    base = med(res[MOSQ.name], "rate")
    lines = [
        "## Persistence: QoS 1 to a persistent subscriber",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/persistence_bench.py --scenarios throughput "
        f"--repeat {args.repeat} --write docs/BENCHMARKS.md`.",
        f"One publisher keeps 100 QoS 1 messages in flight for {args.seconds:g} s, 64-byte payloads; one persistent",
        "subscriber (clean_session=0, subscribed at QoS 1) is connected and acknowledges everything; then the",
        "publisher stops and the run waits until the subscriber has every acknowledged message. Throughput =",
        "distinct messages delivered / (first publish to last delivery), median of the runs (range in brackets).",
        "Ratio = the row's median / Mosquitto's (`persistence true`, no queue limit). Delivered and lost are per run",
        "(lost = acknowledged to the publisher - distinct delivered). iot-broker runs its shipped defaults; Mosquitto",
        "gets `persistence true`, a `persistence_location` and `max_queued_messages 0` (no limit), its defaults",
        "otherwise; the last row keeps its default queue limit of 1000.",
        "",
        "| broker | delivered msg/s | ratio | acknowledged msg/s (publish) | drain after the publisher stopped | "
        "broker CPU s | delivered, lost per run | load (1 min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, runs in res.items():
        lines.append(f"| {name} | {cell(runs, 'rate', ',.0f')} | {med(runs, 'rate') / base:.2f} | "
                     f"{cell(runs, 'publish_rate', ',.0f')} | {cell(runs, 'drain_s', '.1f')} s | "
                     f"{cell(runs, 'broker_cpu_s', '.1f')} | {losses(runs)} | "
                     f"{', '.join(r['load'] for r in runs)} |")
    lines += [
        "",
        "What is promised differs: iot-broker with persistence acknowledges a message queued for a persistent",
        "session only once it is committed to its SQLite store (WAL, `synchronous = FULL`: fsynced, group-committed),",
        "so a `kill -9` or a power cut right after the PUBACK loses nothing. Mosquitto's persistence is a periodic",
        "snapshot of its whole state (`autosave_interval` 1800 s by default, and at a clean shutdown): a PUBACK",
        "from Mosquitto says the message is in its memory; a crash loses what arrived since the last snapshot.",
    ]
    return "\n".join(lines) + "\n"


def render_backlog(res: dict[str, list[dict]], args) -> str:
    n = args.backlog
    mo = res[MOSQ.name]
    lines = [
        f"## Persistence: a {n:,}-message backlog",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/persistence_bench.py --scenarios backlog "
        f"--repeat {args.repeat} --write docs/BENCHMARKS.md`.",
        "A persistent subscriber (clean_session=0, QoS 1) subscribes and disconnects; one publisher then publishes",
        f"{n:,} QoS 1 messages of 64 bytes, 100 in flight, and waits for every PUBACK; then the subscriber comes back",
        "and the run counts distinct messages until it has all of them. Median of the runs (range in brackets);",
        "ratio = iot-broker / Mosquitto (below 1 is better for times, memory, disk and CPU, worse for rates).",
        "Same brokers as above: iot-broker with its shipped defaults (persistence",
        "on, queues past 100,000 messages / 64 MiB continue on disk); Mosquitto with `persistence true`,",
        "`max_queued_messages 0` (no limit, else it would drop all but 1,000) and its defaults otherwise. Disk: for",
        "iot-broker `store.db`, `-wal` and `-shm` once every PUBACK is in; for Mosquitto the `mosquitto.db` it",
        "writes on SIGUSR1 at that point (what its autosave or a shutdown would write).",
        "",
        "| | iot-broker | Mosquitto | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    ours = res[OURS.name]
    rows = [
        ("publish, all PUBACKs in (s)", "publish_s", ".1f"),
        ("publish rate (msg/s)", "publish_rate", ",.0f"),
        ("RSS before (MiB)", "rss_start_mib", ".1f"),
        ("RSS with the backlog queued (MiB)", "rss_full_mib", ".1f"),
        ("store on disk (MiB)", "disk_mib", ".1f"),
        ("Mosquitto: writing its snapshot (s)", "save_s", ".1f"),
        ("drain: subscriber back to last message (s)", "drain_s", ".1f"),
        ("drain rate (msg/s)", "drain_rate", ",.0f"),
        ("RSS after the drain (MiB)", "rss_end_mib", ".1f"),
        ("peak RSS, VmHWM (MiB)", "rss_peak_mib", ".1f"),
        ("broker CPU while publishing (s)", "cpu_publish_s", ".1f"),
        ("broker CPU while draining (s)", "cpu_drain_s", ".1f"),
    ]
    for label, key, fmt in rows:
        if key == "save_s":
            lines.append(f"| {label} | - | {cell(mo, key, fmt)} | |")
            continue
        m = med(mo, key)
        lines.append(f"| {label} | {cell(ours, key, fmt)} | {cell(mo, key, fmt)} | "
                     f"{med(ours, key) / m if m else float('nan'):.2f} |")
    lines += [
        f"| delivered, lost per run | {losses(ours)} | {losses(mo)} | |",
        f"| load (1 min) while publishing/draining | {', '.join(r['load'] for r in ours)} | "
        f"{', '.join(r['load'] for r in mo)} | |",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="throughput,backlog")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each scenario and broker (default 3)")
    ap.add_argument("--seconds", type=float, default=4.0, help="throughput: seconds of publishing (default 4)")
    ap.add_argument("--backlog", type=int, default=1_000_000, help="backlog: messages (default 1,000,000)")
    ap.add_argument("--write", metavar="FILE", help="replace the scenarios' sections of this markdown file")
    args = ap.parse_args()
    scenarios = args.scenarios.split(",")
    for sc in scenarios:
        if sc not in ("throughput", "backlog"):
            ap.error(f"unknown scenario {sc!r}")
    if "throughput" in scenarios:
        data = packets(1_000_000)  # more than 4 s can take at 100 in flight: the run stops by time
        res: dict[str, list[dict]] = {v.name: [] for v in (OURS, OURS_OFF, MOSQ, MOSQ_DEFAULT_QUEUE)}
        for i in range(args.repeat):
            for v in (OURS, OURS_OFF, MOSQ) + ((MOSQ_DEFAULT_QUEUE,) if i == 0 else ()):
                r = throughput(v, args.seconds, data)
                res[v.name].append(r)
                print(f"throughput #{i + 1} {v.name}: {r}", flush=True)
        res = {k: v for k, v in res.items() if v}
        section = render_throughput(res, args)
        print(section)
        if args.write:
            write_section(Path(args.write), section.splitlines()[0][3:], section)
    if "backlog" in scenarios:
        data = packets(args.backlog)
        res = {OURS.name: [], MOSQ.name: []}
        for i in range(args.repeat):
            for v in (OURS, MOSQ):
                r = backlog(v, data, args.backlog)
                res[v.name].append(r)
                print(f"backlog #{i + 1} {v.name}: {r}", flush=True)
        section = render_backlog(res, args)
        print(section)
        if args.write:
            write_section(Path(args.write), section.splitlines()[0][3:], section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
