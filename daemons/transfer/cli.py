"""`iotctl send FILE...` and `iotctl transfers`.

`send` is a one-shot sender: the same engine as iot-transfer-send, without outbox or journal.
It exits 0 only once the receiver has acknowledged every file (verified, fsynced, renamed),
and otherwise non-zero with the reason on stderr: 1 refused, no answer or no broker,
66 a file cannot be read, 130 interrupted (the receiver is told to drop its partial files,
where the wire format can say so: seed-json cannot).

`transfers` reads what the daemons of this node keep under the state folder: the sender's
and receiver's status snapshots (refreshed every second while they run), their journals for
what finished, and the receiver's partial files when it is not running.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import secrets
import socket
import sys
import time
from pathlib import Path

import orjson

from .. import config as configmod
from ..mqttclient import MqttClient
from . import WIRES, codec
from . import protocol as P
from .engine import Engine, Outgoing
from .journal import Journal
from .sender import open_and_hash

EX_FAIL = 1
EX_NOINPUT = 66


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One line on a terminal, redrawn in place; a line every few seconds otherwise."""

    def __init__(self, stream, quiet: bool):
        self.stream, self.quiet = stream, quiet
        self.tty = stream.isatty()
        self.last = 0.0
        self.width = 0

    def show(self, transfers: list[Outgoing], note: str = "") -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        if not transfers:
            line = note
        else:
            size = sum(t.manifest.size for t in transfers)
            done = sum(t.progress() for t in transfers)
            took = max(now - min(t.started for t in transfers), 1e-3)
            rate = done / took
            pct = 100 * done / size if size else 100.0
            eta = _duration((size - done) / rate) if rate > 0 else "--:--"
            what = transfers[0].manifest.name if len(transfers) == 1 else f"{len(transfers)} files"
            bar = "#" * int(pct / 5)
            line = (f"{what[:30]} [{bar:<20}] {pct:5.1f}% {_size(done)}/{_size(size)} "
                    f"{_size(rate)}/s ETA {eta}{'  ' + note if note else ''}")
        self._write(line)

    def _write(self, line: str) -> None:
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, line: str) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(line + "\n")
        self.stream.flush()


def cmd_send(args: argparse.Namespace, log) -> int:
    cfg = configmod.load(args.config)
    tc = cfg.transfer
    changes = {k: v for k, v in (("chunk_size", args.chunk_size), ("window", args.window),
                                 ("rate_limit", args.rate_limit), ("wire", args.wire)) if v is not None}
    if changes:
        tc = dataclasses.replace(tc, **changes)
    paths = [Path(f) for f in args.files]
    for p in paths:
        if not p.is_file() or not os.access(p, os.R_OK):
            print(f"iotctl send: {p}: not a readable file", file=sys.stderr)
            return EX_NOINPUT
    mq = cfg.mqtt
    inbox: queue.Queue = queue.Queue()
    cid = f"{mq.client_id_prefix}-send-{os.getpid()}-{socket.gethostname()}"[:64]
    client = MqttClient(mq, cid, log=log, host=args.host, port=args.port, on_message=inbox.put,
                        subscriptions=[(P.subscription(tc.topic_prefix, k), 1) for k in ("status", "ack")],
                        max_inflight=max(20, tc.window * tc.max_parallel + 8))
    client.start()
    deadline = time.monotonic() + args.timeout
    while not client.connected and not client.last_error and time.monotonic() < deadline:
        client.wait_connected(0.1)  # a refused first connection fails at once; later ones are retried
    if not (client.connected and client.subscribed.wait(max(0.1, deadline - time.monotonic()))):
        print(f"iotctl send: {client.last_error or f'no connection to {client.host}:{client.port}'}"
              + ("" if client.last_error else f" within {args.timeout:g}s"), file=sys.stderr)
        client.stop()
        return EX_FAIL
    engine = Engine(tc.topic_prefix, lambda topic, payload: client.publish(topic, payload, 1), window=tc.window,
                    rate_limit=tc.rate_limit, resend_after=tc.resend_after, stall_timeout=tc.stall_timeout, log=log,
                    codec=codec(tc.wire))
    bar = Progress(sys.stderr, args.quiet)
    try:
        failures = _send_all(engine, paths, tc, inbox, bar, args.timeout)
    except KeyboardInterrupt:
        for t in list(engine.transfers.values()):
            engine.cancel(t, "interrupted at the sender")
        time.sleep(0.2)  # let the cancel notices leave
        client.stop()
        bar.say("iotctl send: interrupted")
        return 130
    client.stop()
    return EX_FAIL if failures else 0


def _send_all(engine: Engine, paths: list[Path], tc, inbox: queue.Queue, bar: Progress, timeout: float) -> int:
    pending = list(paths)
    failures = 0
    while pending or engine.transfers:
        while pending and len(engine.transfers) < tc.max_parallel:
            path = pending.pop(0)
            bar.show(list(engine.transfers.values()), f"hashing {path.name}")
            try:
                engine.add(open_and_hash(path, secrets.token_hex(16), tc.chunk_size))
            except OSError as e:
                bar.say(f"iotctl send: {path}: cannot read: {e}")
                failures += 1
        wait = engine.pump()
        try:
            msg = inbox.get(timeout=min(max(wait, 0.0), 0.2))
            while True:
                try:
                    fid, kind = engine.codec.parse_topic(engine.prefix, msg.topic)
                    engine.on_message(fid, kind, msg.payload)
                except P.BadMessage:
                    pass  # not ours to judge: other senders share these topics
                msg = inbox.get_nowait()
        except queue.Empty:
            pass
        now = engine.clock()
        for t in list(engine.transfers.values()):
            if now - t.last_heard > timeout:
                engine.cancel(t, f"no answer from a receiver within {timeout:g}s")
        while engine.ended:
            t = engine.ended.pop(0)
            m = t.manifest
            took = max(now - t.started, 1e-6)
            if t.state == "done":
                stored = t.ack.name if t.ack else m.name
                bar.say(f"sent {m.name} ({_size(m.size)}) in {took:.1f}s, {_size(m.size / took)}/s, "
                        f"{t.retries} chunks sent again; stored as {stored!r}")
            else:
                failures += 1
                bar.say(f"iotctl send: {m.name}: {t.reason}")
        bar.show(list(engine.transfers.values()))
    return failures


# --- iotctl transfers ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        d = orjson.loads(path.read_bytes())
        return d if isinstance(d, dict) else None
    except (OSError, orjson.JSONDecodeError):
        return None


def gather(cfg: configmod.Config, last: int = 10) -> dict:
    """What is in flight and done on this node, from the daemons' files."""
    state, tc = cfg.paths.state_dir, cfg.transfer
    home = state / "transfer-send"
    work = (tc.spool or state / "transfer") / ".partial"
    fresh = time.time() - 5
    out: dict = {"sending": [], "waiting": [], "receiving": [], "done": []}

    snap = _read_json(home / "status.json")
    starts, ends = {}, {}
    for r in Journal(home / "journal.jsonl").load():
        (starts if r.get("ev") == "start" else ends)[r.get("id")] = r
    if snap and snap.get("updated", 0) >= fresh:
        out["sending"] = snap.get("sending", [])
        out["waiting"] = snap.get("hashing", []) + snap.get("waiting", [])
    else:
        out["sending"] = [{"id": fid, "name": s.get("name"), "size": s.get("size"), "confirmed": None}
                          for fid, s in starts.items() if fid not in ends]
    for fid, e in ends.items():
        if fid in starts and e.get("ev") in ("done", "failed"):
            s = starts[fid]
            out["done"].append({"dir": "sent" if e["ev"] == "done" else "failed", "name": s.get("name"),
                                "size": s.get("size"), "t": e.get("t"), "seconds": e.get("seconds"),
                                "reason": e.get("reason", "")})

    snap = _read_json(work / "status.json")
    if snap and snap.get("updated", 0) >= fresh:
        out["receiving"] = snap.get("receiving", [])
    else:
        for meta in work.glob("*.meta"):
            try:
                m = P.decode_meta(meta.read_bytes(), meta.stem)
                have = (work / f"{meta.stem}.idx").stat().st_size // 4 if (work / f"{meta.stem}.idx").exists() else 0
            except (OSError, P.BadMessage):
                continue
            if isinstance(m, P.Manifest):
                out["receiving"].append({"id": m.file_id, "name": m.name, "size": m.size,
                                         "received": min(m.size, have * m.chunk_size)})
    for r in Journal(work / "done.jsonl").load():
        if r.get("ev") == "complete":
            out["done"].append({"dir": "received", "name": r.get("name"), "size": r.get("size"), "t": r.get("t")})
    out["done"] = sorted(out["done"], key=lambda d: d.get("t") or 0)[-last:]
    return out


def cmd_transfers(args: argparse.Namespace, log) -> int:
    info = gather(configmod.load(args.config), args.last)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(info, option=orjson.OPT_INDENT_2) + b"\n")
        return 0

    def pct(done, size) -> str:
        if done is None:
            return "   ?"
        return f"{100 * done / size:3.0f}%" if size else "100%"

    rows = []
    for s in info["sending"]:
        rate = f"{_size(s['confirmed'] / s['seconds'])}/s" if s.get("seconds") and s.get("confirmed") else ""
        rows.append(("sending", s["name"], _size(s["size"] or 0), pct(s.get("confirmed"), s["size"]), rate))
    for name in info["waiting"]:
        rows.append(("waiting", name, "", "", ""))
    for r in info["receiving"]:
        rate = f"{_size(r['received'] / r['seconds'])}/s" if r.get("seconds") and r.get("received") else ""
        rows.append(("receiving", r["name"], _size(r["size"]), pct(r["received"], r["size"]), rate))
    for d in info["done"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["t"])) if d.get("t") else ""
        rows.append((d["dir"], d["name"], _size(d["size"] or 0), when, d.get("reason", "")))
    if not rows:
        print("no transfers on this node")
        return 0
    widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("send", help="send files to the receiver and wait for its ack",
                       description="Send FILEs over MQTT ([transfer] settings) and exit 0 once the receiver has "
                                   "acknowledged each one; non-zero with the reason otherwise.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--config", metavar="FILE", help="config file for defaults")
    p.add_argument("--host", help="broker host (default from [mqtt])")
    p.add_argument("--port", type=int, help="broker port (default from [mqtt])")
    p.add_argument("--chunk-size", type=int, help="bytes per chunk (default from [transfer])")
    p.add_argument("--window", type=int, help="chunks in flight per file (default from [transfer])")
    p.add_argument("--rate-limit", type=int, help="bytes per second, 0 = unlimited (default from [transfer])")
    p.add_argument("--wire", choices=WIRES, help="wire format the receiver speaks (default from [transfer])")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="give up when the broker or the receiver says nothing for this long (default 60 s)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("transfers", help="show file transfers in flight and done on this node",
                       description="Show what iot-transfer-send and iot-transfer-recv have in flight and finished.")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--last", type=int, default=10, help="finished transfers to show (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_transfers)
