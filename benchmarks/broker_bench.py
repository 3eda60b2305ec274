"""iot-broker against Mosquitto under an independent load: the harness of issue 21.

    .venv/bin/python benchmarks/broker_bench.py [--runs 3] [--seconds 4] [--only SUBSTRING]
        [--broker iot-broker|mosquitto|both] [--write docs/BENCHMARKS.md] [--py-spy DIR]

Each run starts the broker under test afresh with its defaults (ours: host, port and state_dir
only; Mosquitto 2: a listener, anonymous clients, no persistence, no log, max_queued_messages
raised so that it never drops) and stops it afterwards. Runs are interleaved (ours, Mosquitto,
ours, ...) and the table shows medians.

Publishers and subscribers are separate processes (fork) speaking MQTT over raw sockets with
pre-encoded packets; a batch of PUBLISH packets is a template whose packet ids and payload keys
are filled in by slice assignment, and a subscriber reads whole runs of equal-sized PUBLISH
packets the same way (acks built by slices), so the generator does little per-message Python
work. Every payload starts with an 8-byte key (publisher id << 32 | sequence number), followed
by the CLOCK_MONOTONIC send time in ns (latency). The clock starts when every subscriber has its
SUBACK; publishers send for --seconds as fast as their in-flight window allows, then the harness
drains until every subscriber has every acknowledged message or none arrives for 5 s.

Acknowledged: PUBACK (QoS 1) or PUBCOMP (QoS 2) received by the publisher, sent for QoS 0. A
broker acknowledges in the order it received (MQTT 4.6), so a publisher's acknowledged messages
are its sequence numbers 0 .. acked-1; lost = those a subscriber never received, per subscriber.
Duplicates = deliveries of a key already seen. Generator CPU: CPU seconds of all publisher and
subscriber processes over the measured wall time, and the busiest of them as a share of one core.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds, free_port, load_average, machine, rss_kib, write_section  # noqa: E402
from daemons.broker.packets import Connect, Subscribe, encode, encode_publish  # noqa: E402
from daemons.broker.packets5 import ConnectV5, Subscription, SubscribeV5, encode_publish_v5  # noqa: E402
from daemons.broker.packets5 import encode as encode_v5  # noqa: E402

DRAIN_IDLE = 5.0  # seconds without a new delivery that end the drain
START_TIMEOUT = 15.0  # a broker to accept connections, workers to connect and subscribe
BUSY_CORE = 0.90  # a generator process above this share of a core may be the bottleneck
KEY = 8  # payload bytes of the key (publisher id << 32 | sequence); then 8 of send time
MASK = 0xFFFFFFFF
assert sys.byteorder == "little", "keys and times are read with array('Q') in host order"


# -- scenarios -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: str  # "ratio>=", "ratio<=" (both latency ratios), "KiB<=", "MB<"
    value: float

    def __str__(self) -> str:
        return {"ratio>=": f">= {self.value:g}x", "ratio<=": f"<= {self.value:g}x (p50 and p99)",
                "KiB<=": f"<= {self.value:g} KiB", "MB<": f"< {self.value:g} MB"}[self.kind]


@dataclass(frozen=True)
class Scenario:
    name: str
    target: Target
    kind: str = "flow"  # "flow", "latency", "rss"
    qos: int = 0
    pubs: int = 1
    subs: int = 1
    inflight: int = 0  # per publisher, QoS 1/2
    payload: int = 64
    v5: bool = False
    fan_in: bool = False  # publisher i on bench/in/NN, subscribers on bench/in/+
    pub_procs: int = 1
    sub_procs: int = 1
    rate: int = 0  # fixed publish rate (latency)
    clients: int = 0  # idle connections (rss)
    unit: str = "msg/s"
    ours_conf: str = ""  # [broker] lines beyond the defaults, none a performance knob

    def topic(self, i: int) -> bytes:
        return f"bench/in/{i:02d}".encode() if self.fan_in else b"bench/a"

    @property
    def sub_filter(self) -> str:
        return "bench/in/+" if self.fan_in else "bench/a"


# The default max_connection_rate (200 a second, bursts of 1,000, from one address) would refuse
# most of these connections, which arrive at once from one address; max_connections (4,096)
# would refuse the 10,000.
IDLE_CONF = "max_connection_rate = 0\n"
SCENARIOS = [
    Scenario("QoS 0, 1 -> 1", Target("ratio>=", 0.9)),
    Scenario("QoS 1, 1 -> 1, 100 in flight from the publisher", Target("ratio>=", 0.7), qos=1, inflight=100),
    Scenario("QoS 1 in MQTT 5.0, 1 -> 1, 100 in flight", Target("ratio>=", 0.7), qos=1, inflight=100, v5=True),
    Scenario("QoS 2, 1 -> 1, 20 in flight", Target("ratio>=", 1.0), qos=2, inflight=20),
    Scenario("fan-out 1 -> 50, QoS 0", Target("ratio>=", 3.0), subs=50, sub_procs=5, unit="deliveries/s"),
    Scenario("fan-in 50 -> 1 on `+`, QoS 1, 100 in flight each", Target("ratio>=", 0.7), qos=1, inflight=100,
             pubs=50, pub_procs=5, fan_in=True),
    Scenario("1 MiB payloads, QoS 1, 16 in flight", Target("ratio>=", 1.0), qos=1, inflight=16,
             payload=1 << 20, unit="MB/s"),
    Scenario("latency, QoS 1 at 5,000 msg/s: p50 / p99", Target("ratio<=", 1.0), kind="latency", qos=1,
             inflight=100, rate=5000, unit="ms"),
    Scenario("RSS per idle connection (1,000 clients)", Target("KiB<=", 2), kind="rss", clients=1000,
             unit="KiB", ours_conf=IDLE_CONF),
    Scenario("RSS with 10,000 idle connections", Target("MB<", 60), kind="rss", clients=10_000, unit="MiB",
             ours_conf=IDLE_CONF),
]


# -- the broker under test -------------------------------------------------------------------------


class Broker:
    """One broker process on a free port in its own temp folder, freshly started."""

    def __init__(self, kind: str, extra: str = ""):
        self.kind, self.port = kind, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
        self.log = self.dir / "broker.log"
        if kind == "iot-broker":
            cfg = self.dir / "iot.toml"
            cfg.write_text(f'[paths]\nstate_dir = "{self.dir}"\n[broker]\nhost = "127.0.0.1"\n'
                           f"port = {self.port}\n{extra}")
            argv = [str(Path(sys.executable).parent / "iot-broker"), "--config", str(cfg)]
        else:
            cfg = self.dir / "mosquitto.conf"
            cfg.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                           "log_dest none\nmax_queued_messages 1000000\n")
            argv = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(cfg)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {self.proc.returncode} at start: {self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{kind} did not accept connections within {START_TIMEOUT:g} s") from None
                time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- raw clients -----------------------------------------------------------------------------------


def connect(port: int, cid: str, v5: bool = False, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(encode_v5(ConnectV5(cid, keep_alive=0)) if v5 else encode(Connect(cid, keep_alive=0)))
    body = read_packet(s, timeout)
    if body[1] != 0:
        raise ConnectionError(f"CONNACK refused with code {body[1]}")
    return s


def subscribe(s: socket.socket, topic: str, qos: int, v5: bool = False, timeout: float = 10.0) -> None:
    s.sendall(encode_v5(SubscribeV5(1, (Subscription(topic, qos),))) if v5 else encode(Subscribe(1, ((topic, qos),))))
    body = read_packet(s, timeout)
    if body[-1] != qos:
        raise ConnectionError(f"SUBACK granted {body[-1]:#x}, not QoS {qos}")


def read_packet(s: socket.socket, timeout: float) -> bytes:
    """One whole packet's body (after its fixed header), on a blocking socket."""
    s.settimeout(timeout)
    first = read_exact(s, 2)
    length, shift, b = 0, 0, first[1]
    while b & 0x80:
        length |= (b & 0x7F) << shift
        shift += 7
        b = read_exact(s, 1)[0]
    length |= (b & 0x7F) << shift
    body = read_exact(s, length)
    s.settimeout(None)
    return body


def read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by the broker")
        buf += chunk
    return buf


def next_packet(buf: bytearray, i: int) -> tuple[int, int, int] | None:
    """(first byte, body start, body end) of the packet at buf[i:], or None if incomplete."""
    end = len(buf)
    j, length, shift = i + 1, 0, 0
    while True:
        if j >= end:
            return None
        b = buf[j]
        length |= (b & 0x7F) << shift
        j += 1
        if not b & 0x80:
            break
        shift += 7
    return (buf[i], j, j + length) if j + length <= end else None


def publish_template(sc: Scenario, pub_id: int) -> tuple[bytes, int, int]:
    """A PUBLISH of this scenario with packet id 1: (bytes, packet id offset, payload offset)."""
    enc = encode_publish_v5 if sc.v5 else encode_publish
    payload = bytes(sc.payload)
    pkt = enc(sc.topic(pub_id), payload, sc.qos, False, False, 1 if sc.qos else None)
    payload_at = len(pkt) - len(payload)
    return pkt, payload_at - 2 - (1 if sc.v5 else 0), payload_at


# -- publishers ------------------------------------------------------------------------------------


class Conn:
    """What a publisher and a subscriber share: output that waits for a writable socket (never a
    blocking send: the broker may be blocked writing to us), and the selector's interest in it.
    The output is a queue of the batches as they were made, sent from views: one bytearray that
    batches are appended to and partial sends cut from is copied whole whenever CPython grows it
    or shrinks it past half, and how often depends on how the broker reads (the 1 MiB publisher
    spent half of its CPU copying, more with our broker than with Mosquitto)."""

    sock: socket.socket
    out: deque
    unsent = 0  # bytes in `out`
    writing = False

    def queue(self, data: bytearray) -> None:
        self.out.append(memoryview(data))
        self.unsent += len(data)

    def flush(self) -> None:
        out = self.out
        while out:
            try:
                n = self.sock.send(out[0])
            except BlockingIOError:
                return
            self.unsent -= n
            if n < len(out[0]):
                out[0] = out[0][n:]
                return
            out.popleft()

    def interest(self, sel: selectors.BaseSelector) -> None:
        if bool(self.out) != self.writing:
            self.writing = bool(self.out)
            sel.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.writing else 0), self)


def pump(sel: selectors.BaseSelector, conns, timeout: float) -> None:
    """One wait for the sockets: read what came, write what is pending."""
    for c in conns:
        c.interest(sel)
    for key, ev in sel.select(timeout):
        if key.data is None:
            continue
        if ev & selectors.EVENT_READ:
            key.data.on_readable()
        if ev & selectors.EVENT_WRITE:
            key.data.flush()


class Pub(Conn):
    """One publisher connection: sends batches whose packet ids and keys are set by slices."""

    def __init__(self, sc: Scenario, port: int, pub_id: int):
        self.sc, self.pub_id = sc, pub_id
        self.sock = connect(port, f"bench-pub-{pub_id}", sc.v5)
        self.sock.setblocking(False)
        self.tpl, self.pid_at, self.key_at = publish_template(sc, pub_id)
        self.size = len(self.tpl)
        self.sent = self.acked = 0
        self.out = deque()
        self.rx = bytearray()
        self.ack_tail = 0  # PUBACK for QoS 1, PUBCOMP for QoS 2

    def batch(self, n: int, stamp: int = 0) -> None:
        P, buf = self.size, bytearray(self.tpl)
        buf *= n  # in place: n copies of the template, not 2n
        keys = array("Q", range((self.pub_id << 32) + self.sent, (self.pub_id << 32) + self.sent + n)).tobytes()
        for k in range(KEY):
            buf[self.key_at + k::P] = keys[k::KEY]
        if stamp:
            ts = array("Q", [stamp]).tobytes()
            for k in range(8):
                buf[self.key_at + KEY + k::P] = ts[k:k + 1] * n
        if self.sc.qos:
            pids = array("H", ((s % 65535) + 1 for s in range(self.sent, self.sent + n)))
            pids.byteswap()  # network order
            raw = pids.tobytes()
            buf[self.pid_at::P] = raw[0::2]
            buf[self.pid_at + 1::P] = raw[1::2]
        self.queue(buf)
        self.sent += n

    def on_readable(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError(f"publisher {self.pub_id} closed by the broker")
        self.rx += data
        n = len(self.rx) // 4
        if self.sc.qos == 1 and n and self.rx[0:4 * n:4].count(0x40) == n and self.rx[1:4 * n:4].count(2) == n:
            self.acked += n  # the common case: only 4-byte PUBACKs
            del self.rx[:4 * n]
            return
        i, rel = 0, bytearray()
        while (p := next_packet(self.rx, i)) is not None:
            first, body, i = p
            if first >> 4 == 4 or first >> 4 == 7:  # PUBACK, PUBCOMP
                self.acked += 1
            elif first >> 4 == 5:  # PUBREC -> PUBREL
                rel += b"\x62\x02" + self.rx[body:body + 2]
        del self.rx[:i]
        if rel:
            self.queue(rel)


def pub_worker(sc: Scenario, port: int, ids: list[int], seconds: float, pipe) -> None:
    try:
        pubs = [Pub(sc, port, i) for i in ids]
    except Exception as e:  # noqa: BLE001 - reported to the main process, which decides
        pipe.send(("error", f"publisher connect: {e}"))
        return
    pipe.send(("ready", None))
    if not pipe.poll(START_TIMEOUT * 4) or pipe.recv() != "go":
        return
    c0, t0 = cpu_self(), time.monotonic()
    sel = selectors.DefaultSelector()
    for p in pubs:
        sel.register(p.sock, selectors.EVENT_READ, p)
    chunk = max(1, (1 << 16) // pubs[0].size)  # QoS 0: about 64 KiB per write
    err = None
    try:
        stop_at = t0 + seconds
        while (now := time.monotonic()) < stop_at:
            for p in pubs:
                if sc.rate:  # fixed rate: the messages due by now, as far as the window lets
                    due = min(int((now - t0) * sc.rate), int(seconds * sc.rate)) - p.sent
                    n = min(due, sc.inflight - (p.sent - p.acked))
                    if n > 0:
                        p.batch(n, time.monotonic_ns())
                elif sc.qos:
                    n = sc.inflight - (p.sent - p.acked)
                    if n > 0:
                        p.batch(n)
                elif not p.unsent:
                    p.batch(chunk)
                p.flush()
            # Wait only when no publisher may send more now (window full, output pending, or the
            # next fixed-rate message not yet due): a fixed wait would bound the rate itself.
            if sc.rate:
                wait = min(0.05, 1 / sc.rate)
            elif sc.qos:
                wait = 0.05 if all(p.unsent or p.sent - p.acked >= sc.inflight for p in pubs) else 0
            else:
                wait = 0.05 if all(p.unsent for p in pubs) else 0
            pump(sel, pubs, wait)
        # No new messages now; the ones sent wait for their acknowledgement, or for silence.
        state, changed = None, time.monotonic()
        while any(p.unsent or (sc.qos and p.acked < p.sent) for p in pubs):
            pump(sel, pubs, 0.05)
            now_state = [(p.acked, p.unsent) for p in pubs]
            if now_state != state:
                state, changed = now_state, time.monotonic()
            elif time.monotonic() - changed > DRAIN_IDLE:
                break
    except (ConnectionError, OSError) as e:
        err = str(e)
    end = time.monotonic()
    # QoS 0: what left this process counts as sent (a batch stuck in `out` was never sent).
    sent = {p.pub_id: p.sent - -(-p.unsent // p.size) for p in pubs}  # a packet part-sent is not sent
    acked = {p.pub_id: (p.acked if sc.qos else sent[p.pub_id]) for p in pubs}
    pipe.send(("done", dict(sent=sent, acked=acked, cpu=cpu_self() - c0, start=t0, end=end, error=err,
                                unsent=sum(p.unsent for p in pubs))))
    pipe.poll(DRAIN_IDLE + 120)  # hold the connections until the subscribers are drained
    for p in pubs:
        p.sock.close()


# -- subscribers -----------------------------------------------------------------------------------


class Sub(Conn):
    """One subscriber connection: counts unique keys and duplicates, acknowledges by slices."""

    def __init__(self, sc: Scenario, port: int, sub_id: int):
        self.sc = sc
        self.sock = connect(port, f"bench-sub-{sub_id}", sc.v5)
        subscribe(self.sock, sc.sub_filter, sc.qos, sc.v5)
        self.sock.setblocking(False)
        tpl, self.pid_at, self.key_at = publish_template(sc, 0)
        self.size, self.head = len(tpl), tpl[:2]  # every PUBLISH of the scenario has these
        self.rx, self.out = bytearray(), deque()
        self.seen: set[int] = set()
        self.received = 0
        self.latencies: list[int] = []
        self.last = 0.0

    def on_readable(self) -> None:
        data = self.sock.recv(1 << 22 if self.size > 1 << 16 else 1 << 20)
        if not data:
            raise ConnectionError("subscriber closed by the broker")
        self.rx += data
        S, rx = self.size, self.rx
        n = len(rx) // S
        out = bytearray()
        if n and self.sc.qos < 2 and rx[0:n * S:S].count(self.head[0]) == n and rx[1:n * S:S].count(self.head[1]) == n:
            keys = bytearray(KEY * n)
            for k in range(KEY):
                keys[k::KEY] = rx[self.key_at + k:n * S:S]
            stamps = bytearray(8 * n)
            if self.sc.kind == "latency":
                for k in range(8):
                    stamps[k::8] = rx[self.key_at + KEY + k:n * S:S]
            self.add(array("Q", keys), array("Q", stamps))
            if self.sc.qos == 1:
                out = bytearray(4 * n)
                out[0::4] = b"\x40" * n
                out[1::4] = b"\x02" * n
                out[2::4] = rx[self.pid_at:n * S:S]
                out[3::4] = rx[self.pid_at + 1:n * S:S]
            del rx[:n * S]
        else:  # anything else (QoS 2, a DUP flag, another size): packet by packet
            i, keys, stamps = 0, array("Q"), array("Q")
            while (p := next_packet(rx, i)) is not None:
                first, body, i = p
                if first >> 4 == 3:
                    qos = (first >> 1) & 3
                    at = body + 2 + (rx[body] << 8 | rx[body + 1])
                    pid = rx[at:at + 2] if qos else b""
                    at += 2 if qos else 0
                    if self.sc.v5:
                        at = skip_varint_block(rx, at)
                    keys.frombytes(rx[at:at + KEY])
                    stamps.frombytes(rx[at + KEY:at + KEY + 8])
                    if qos == 1:
                        out += b"\x40\x02" + pid
                    elif qos == 2:
                        out += b"\x50\x02" + pid
                elif first >> 4 == 6:  # PUBREL -> PUBCOMP
                    out += b"\x70\x02" + rx[body:body + 2]
            self.add(keys, stamps)
            del rx[:i]
        if out:
            self.queue(out)
            self.flush()

    def add(self, keys: array, stamps: array) -> None:
        if not keys:
            return
        if self.sc.kind == "latency":
            ns = time.monotonic_ns()
            self.latencies.extend(ns - t for t in stamps)
        self.received += len(keys)
        self.seen.update(keys)
        self.last = time.monotonic()

    def lost(self, acked: dict[int, int]) -> dict[int, tuple[int, int]]:
        """Per publisher, how many of its acknowledged messages never arrived here, and the
        sequence number of the first of them."""
        got = {p: set() for p in acked}
        for key in self.seen:
            if (pub := key >> 32) in got:
                got[pub].add(key & MASK)
        out = {}
        for p, n in acked.items():
            if len(got[p]) < n or max(got[p], default=-1) >= n:
                missing = n - sum(1 for q in got[p] if q < n)
                if missing:
                    out[p] = (missing, next(q for q in range(n) if q not in got[p]))
        return out


def skip_varint_block(buf: bytearray, at: int) -> int:
    """The offset after an MQTT 5 property block (its length is a variable byte integer)."""
    length, shift = 0, 0
    while True:
        b = buf[at]
        at += 1
        length |= (b & 0x7F) << shift
        if not b & 0x80:
            return at + length
        shift += 7


def sub_worker(sc: Scenario, port: int, ids: list[int], progress, last, pipe) -> None:
    try:
        subs = [Sub(sc, port, i) for i in ids]
    except Exception as e:  # noqa: BLE001 - reported to the main process, which decides
        pipe.send(("error", f"subscriber connect/subscribe: {e}"))
        return
    pipe.send(("ready", None))
    sel = selectors.DefaultSelector()
    for s in subs:
        sel.register(s.sock, selectors.EVENT_READ, s)
    sel.register(pipe, selectors.EVENT_READ, None)
    c0, err = cpu_self(), None
    try:
        while not pipe.poll():
            pump(sel, subs, 0.5)
            for s, i in zip(subs, ids):
                progress[i], last[i] = len(s.seen), s.last
    except (ConnectionError, OSError) as e:
        err = str(e)
    cpu = cpu_self() - c0
    if not pipe.poll(DRAIN_IDLE + 120):
        return
    acked = pipe.recv()[1]
    lats = sorted(x for s in subs for x in s.latencies)
    pipe.send(dict(cpu=cpu, error=err, unique=[len(s.seen) for s in subs], received=[s.received for s in subs],
                   lost=[s.lost(acked) for s in subs], last=max(s.last for s in subs),
                   p50=percentile(lats, 0.50), p99=percentile(lats, 0.99)))
    for s in subs:
        s.sock.close()


def cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1e6 if sorted_ns else float("nan")


def split(ids: list[int], parts: int) -> list[list[int]]:
    return [ids[k::parts] for k in range(parts) if ids[k::parts]]


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    broker: str
    scenario: str
    run: int
    value: float = float("nan")  # msg/s, deliveries/s, MB/s, KiB, MiB; p50 ms for latency
    p99: float = float("nan")
    delivered: int = 0
    acked: int = 0
    lost: int = 0
    dup: int = 0
    broker_cpu: float = 0.0  # share of one core over the measured time
    gen_cpu: float = 0.0  # all generator processes, in cores
    gen_busiest: float = 0.0  # the busiest generator process, share of one core
    us_per_msg: float = float("nan")
    error: str = ""
    notes: list[str] = field(default_factory=list)


def run_flow(sc: Scenario, b: Broker, run: Run, seconds: float, spy: Path | None) -> None:
    ctx = mp.get_context("fork")
    progress, last = ctx.RawArray("q", sc.subs), ctx.RawArray("d", sc.subs)
    workers = []  # (process, pipe, role)
    profiler = None
    try:
        for ids in split(list(range(sc.subs)), sc.sub_procs):
            here, there = ctx.Pipe()
            p = ctx.Process(target=sub_worker, args=(sc, b.port, ids, progress, last, there), daemon=True)
            p.start()
            workers.append((p, here, "sub"))
        for ids in split(list(range(sc.pubs)), sc.pub_procs):
            here, there = ctx.Pipe()
            p = ctx.Process(target=pub_worker, args=(sc, b.port, ids, seconds, there), daemon=True)
            p.start()
            workers.append((p, here, "pub"))
        # The barrier: every subscriber has its SUBACK and every publisher its CONNACK.
        for p, pipe, role in workers:
            if not pipe.poll(START_TIMEOUT * 2):
                raise RuntimeError(f"a {role} process was not ready within {START_TIMEOUT * 2:g} s")
            kind, msg = pipe.recv()
            if kind == "error":
                raise RuntimeError(msg)
        profiler = start_py_spy(b, spy)
        c0, t0 = cpu_seconds(b.proc.pid), time.monotonic()
        for p, pipe, role in workers:
            if role == "pub":
                pipe.send("go")
        acked: dict[int, int] = {}
        pub_cpu, pub_end, errors = [], t0, []
        for p, pipe, role in workers:
            if role != "pub":
                continue
            if not wait_pipe(pipe, seconds + DRAIN_IDLE + 30, b):
                raise RuntimeError("a publisher process did not finish" + ("" if b.alive() else "; broker died"))
            _, r = pipe.recv()
            acked.update(r["acked"])
            pub_cpu.append(r["cpu"])
            pub_end = max(pub_end, r["end"])
            if r["error"]:
                errors.append(r["error"])
            if r["unsent"]:
                run.notes.append(f"a publisher's socket took nothing more for {DRAIN_IDLE:g} s with "
                                 f"{r['unsent']:,} bytes still to write (not counted as sent)")
        want = sum(acked.values())
        # Drain: until every subscriber has every acknowledged message, or none comes for DRAIN_IDLE.
        seen, changed = sum(progress), time.monotonic()
        while min(progress) < want and b.alive():
            time.sleep(0.02)
            if sum(progress) != seen:
                seen, changed = sum(progress), time.monotonic()
            elif time.monotonic() - changed > DRAIN_IDLE:
                break
        broker_cpu = cpu_seconds(b.proc.pid) - c0
        stop_py_spy(profiler)
        if not b.alive():
            errors.append(f"broker exited with {b.proc.returncode}: {b.tail()}")
        results = []
        for p, pipe, role in workers:
            if role == "sub":
                pipe.send(("stop", acked))
                if not pipe.poll(60):
                    raise RuntimeError("a subscriber process did not report")
                results.append(pipe.recv())
        for p, pipe, role in workers:
            if role == "pub":
                pipe.send("close")
        end = max([r["last"] for r in results] + [pub_end])
        wall = max(end - t0, 1e-6)
        run.acked = want
        run.delivered = sum(sum(r["unique"]) for r in results)
        run.dup = sum(sum(r["received"]) - sum(r["unique"]) for r in results)
        lost = [d for r in results for d in r["lost"]]
        run.lost = sum(m for d in lost for m, _ in d.values())
        if run.lost:
            worst = max(lost, key=lambda d: sum(m for m, _ in d.values()))
            run.notes.append(f"{sum(1 for d in lost if d)} of {len(lost)} subscriber(s) missed messages; the worst, "
                             "by publisher id: " + ", ".join(f"{k}: {m:,} missing of {acked[k]:,} (first: seq {q})"
                                                             for k, (m, q) in sorted(worst.items())[:10]))
        errors += [r["error"] for r in results if r["error"]]
        run.error = "; ".join(errors)
        run.broker_cpu = broker_cpu / wall
        gen = pub_cpu + [r["cpu"] for r in results]
        run.gen_cpu, run.gen_busiest = sum(gen) / wall, max(gen) / wall
        run.us_per_msg = broker_cpu * 1e6 / run.delivered if run.delivered else float("nan")
        if sc.kind == "latency":
            run.value, run.p99 = results[0]["p50"], results[0]["p99"]
        elif sc.unit == "MB/s":
            run.value = run.delivered * sc.payload / wall / 1e6
        else:
            run.value = run.delivered / wall
    finally:
        stop_py_spy(profiler)
        for p, pipe, role in workers:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)


def wait_pipe(pipe, timeout: float, b: Broker) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pipe.poll(0.2):
            return True
    return False


def run_rss(sc: Scenario, b: Broker, run: Run) -> None:
    before = rss_kib(b.proc.pid)
    socks: list[socket.socket] = []
    try:
        # In groups: CONNECTs sent together, then their CONNACKs read, so 10,000 take seconds.
        for start in range(0, sc.clients, 500):
            group = []
            for i in range(start, min(sc.clients, start + 500)):
                s = socket.create_connection(("127.0.0.1", b.port), 10)
                s.sendall(encode(Connect(f"idle-{i}", keep_alive=0)))
                group.append(s)
            for s in group:
                body = read_packet(s, 10)
                if body[1] != 0:
                    raise ConnectionError(f"CONNACK refused with code {body[1]} after {len(socks)} connections")
                socks.append(s)
        after = rss_kib(b.proc.pid)
        run.delivered = len(socks)
        run.value = (after - before) / sc.clients if sc.unit == "KiB" else after / 1024
        run.notes.append(f"RSS {before:,} KiB before, {after:,} KiB with {len(socks):,} connections")
    except (ConnectionError, OSError) as e:
        run.error = f"after {len(socks):,} connections: {e}" + ("" if b.alive() else f"; broker died: {b.tail()}")
    finally:
        for s in socks:
            s.close()


def start_py_spy(b: Broker, spy: Path | None):
    if spy is None or b.kind != "iot-broker":
        return None
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        raise SystemExit("--py-spy: py-spy is not installed: .venv/bin/pip install py-spy")
    out = spy / "current.txt"  # renamed to the scenario's file once the run is over
    return subprocess.Popen([exe, "record", "--rate", "200", "--format", "raw", "--nonblocking",
                             "--pid", str(b.proc.pid), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(p) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_once(sc: Scenario, kind: str, n: int, seconds: float, spy: Path | None) -> Run:
    run = Run(kind, sc.name, n)
    try:
        b = Broker(kind, sc.ours_conf if kind == "iot-broker" else "")
    except RuntimeError as e:
        run.error = str(e)
        return run
    try:
        if sc.kind == "rss":
            run_rss(sc, b, run)
        else:
            run_flow(sc, b, run, seconds, spy)
            if spy and kind == "iot-broker" and (spy / "current.txt").exists():
                (spy / "current.txt").rename(spy / f"{slug(sc.name)}.txt")
    except RuntimeError as e:
        run.error = str(e) + ("" if b.alive() else f"; broker exited with {b.proc.returncode}: {b.tail()}")
    finally:
        b.stop()
    return run


# -- the report ------------------------------------------------------------------------------------


def fmt(sc: Scenario, v: float, p99: float = float("nan")) -> str:
    if v != v:
        return "failed"
    if sc.kind == "latency":
        return f"{v:.2f} / {p99:.2f} ms"
    if sc.unit in ("KiB", "MiB"):
        return f"{v:.2f} {sc.unit}"
    if sc.unit == "MB/s":
        return f"{v:,.0f} MB/s"
    return f"{v / 1000:,.1f}k {sc.unit}"


def median(runs: list[Run], attr: str = "value") -> float:
    vals = [getattr(r, attr) for r in runs if not r.error and getattr(r, attr) == getattr(r, attr)]
    return statistics.median(vals) if vals else float("nan")


def summary_row(sc: Scenario, ours: list[Run], theirs: list[Run]) -> str:
    o, t = median(ours), median(theirs)
    o99, t99 = median(ours, "p99"), median(theirs, "p99")
    clean = bool(ours) and all(not r.error and r.lost == 0 for r in ours)
    if sc.kind == "latency":
        r50, r99 = (o / t if t else float("nan")), (o99 / t99 if t99 else float("nan"))
        ratio = f"{r50:.2f} / {r99:.2f}"
        ok = r50 <= sc.target.value and r99 <= sc.target.value
    elif sc.kind == "rss":
        r = o / t if t else float("nan")
        ratio = f"{r:.2f}"
        ok = o <= sc.target.value if sc.target.kind == "KiB<=" else o * 2**20 < sc.target.value * 1e6
    else:
        r = o / t if t else float("nan")
        ratio = f"{r:.2f}"
        ok = r >= sc.target.value
    if not ours or not theirs and sc.kind != "rss":
        met = "n/a" if not ours or sc.kind != "rss" else ("yes" if ok else "no")
    else:
        met = "yes" if ok and clean else ("no (loss or error)" if ok else "no")
    if not theirs:
        ratio = "n/a"

    def losses(rs: list[Run]) -> str:
        return " ".join("err" if r.error else f"{r.lost:,}" for r in rs) or "-"

    lost = "-" if sc.kind == "rss" else f"{losses(ours)} / {losses(theirs)}"
    return (f"| {sc.name} | {fmt(sc, t, t99) if theirs else '-'} | {fmt(sc, o, o99) if ours else '-'} | {ratio} | "
            f"{sc.target} | {met} | {lost} |")


def run_row(sc: Scenario, r: Run) -> str:
    if sc.kind == "rss":
        return (f"| {r.broker} | {r.scenario} | {r.run} | {fmt(sc, r.value)} | {r.delivered:,} connected | - | - "
                f"| - | - | - |")
    return (f"| {r.broker} | {r.scenario} | {r.run} | {fmt(sc, r.value, r.p99)} | {r.delivered:,} | {r.lost:,} | "
            f"{r.dup:,} | {r.broker_cpu:.0%} | {r.gen_cpu:.0%} / {r.gen_busiest:.0%} | {r.us_per_msg:.1f} |")


def render(scenarios: list[Scenario], runs: list[Run], args) -> str:
    by = {(r.broker, r.scenario): [] for r in runs}
    for r in runs:
        by[(r.broker, r.scenario)].append(r)
    cmd = " ".join(["benchmarks/broker_bench.py", *sys.argv[1:]])
    lines = [
        "## Broker", "",
        f"Machine: {machine()}; load average at the end {load_average()}. Command: "
        f"`.venv/bin/python {cmd}`. Medians of {args.runs} interleaved run(s); each run starts the broker "
        f"afresh with its defaults (ours: host, port and state_dir, plus `max_connection_rate = 0` in the RSS rows: "
        f"the default rate limit refuses 10,000 connections at once from one address; Mosquitto: "
        f"`persistence false`, `log_dest none`, `max_queued_messages 1000000`). Publishers send for "
        f"{args.seconds:g} s, 64-byte payloads unless named, then a drain of up to {DRAIN_IDLE:g} s without "
        f"progress. Publishers and subscribers are separate processes over raw sockets. Rate = delivered / (last "
        f"delivery - start of publishing). Ratio = iot-broker / Mosquitto. Lost = acknowledged to the publisher (QoS 0: sent) but never delivered, each run.", "",
        "| scenario | Mosquitto | iot-broker | ratio | target | met | lost (ours / Mosquitto, all runs) |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for sc in scenarios:
        lines.append(summary_row(sc, by.get(("iot-broker", sc.name), []), by.get(("mosquitto", sc.name), [])))
    lines += ["", "Every run: broker CPU as a share of one core; generator CPU = all publisher and subscriber "
              "processes over the same wall time / the busiest one as a share of one core; broker CPU µs per "
              "delivered message.", "",
              "| broker | scenario | run | rate | delivered | lost | dup | broker CPU | generator CPU | broker µs/msg |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [run_row(next(s for s in scenarios if s.name == r.scenario), r) for r in runs]
    notes = [f"{r.broker}, {r.scenario}, run {r.run}: {r.error}" for r in runs if r.error]
    busy = [f"{r.broker}, {r.scenario}, run {r.run} ({r.gen_busiest:.0%})" for r in runs if r.gen_busiest > BUSY_CORE]
    if busy:
        notes.append(f"a generator process was above {BUSY_CORE:.0%} of a core (the generator may have bounded the "
                     f"rate) in: " + "; ".join(busy))
    notes += [f"{r.broker}, {r.scenario}, run {r.run}: {n}" for r in runs for n in r.notes
              if r.lost or "missing" not in n]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def steady_malloc() -> None:
    """Fixed glibc malloc thresholds for the generator processes (forked from this one): with
    its moving ones every megabyte-sized batch faulted in fresh pages, and the 1 MiB publisher
    spent its core on that, not on sending (the generator must never be the bottleneck)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario and broker, interleaved (default 3)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds the publishers send in each run (default 4)")
    ap.add_argument("--only", metavar="SUBSTRING", help="run only the scenarios whose name contains this")
    ap.add_argument("--broker", choices=("iot-broker", "mosquitto", "both"), default="both",
                    help="which broker(s) to measure (default both)")
    ap.add_argument("--write", metavar="FILE", help="replace the '## Broker' section of this markdown file "
                    "(docs/BENCHMARKS.md) with the tables")
    ap.add_argument("--py-spy", metavar="DIR", type=Path, help="profile iot-broker with py-spy (raw format, "
                    "200 Hz, --nonblocking) during the first run of each scenario: DIR/<scenario>.txt")
    args = ap.parse_args()
    steady_malloc()
    if args.runs < 1 or args.seconds <= 0:
        ap.error("--runs must be >= 1 and --seconds > 0")
    scenarios = [s for s in SCENARIOS if not args.only or args.only in s.name]
    if not scenarios:
        ap.error(f"no scenario name contains {args.only!r}: " + "; ".join(s.name for s in SCENARIOS))
    kinds = ["iot-broker", "mosquitto"] if args.broker == "both" else [args.broker]
    if args.py_spy:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    # 10,000 connections: the harness's sockets, and the broker's (it inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runs: list[Run] = []
    for sc in scenarios:
        for n in range(1, args.runs + 1):
            for kind in kinds:
                spy = args.py_spy if n == 1 else None
                r = run_once(sc, kind, n, args.seconds, spy)
                runs.append(r)
                extra = f"  ERROR: {r.error}" if r.error else ""
                if r.gen_busiest > BUSY_CORE:
                    extra += f"  WARNING: a generator process used {r.gen_busiest:.0%} of a core"
                print(f"{kind:10} run {n} {sc.name:50} {fmt(sc, r.value, r.p99):>22}  delivered={r.delivered:,} "
                      f"lost={r.lost:,} dup={r.dup:,} broker_cpu={r.broker_cpu:.0%} "
                      f"generator_cpu={r.gen_cpu:.0%}/{r.gen_busiest:.0%}{extra}", flush=True)
    table = render(scenarios, runs, args)
    print()
    print(table)
    if args.write:
        write_section(Path(args.write), "Broker", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
