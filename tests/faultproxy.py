"""A TCP proxy between one MQTT client and the broker that injects network faults for tests.

The code under test only sees a broker address; the test owns the proxy and decides, per
PUBLISH packet, what the network does with it. MQTT packets are framed by their remaining
length (no full decoding: the proxy must not depend on the code it tests) and PUBLISH
topics are read to match rules.

Directions: "up" is client -> broker, "down" is broker -> client.

Rules act on the PUBLISH packets whose topic matches a regular expression:

    drop     the packet vanishes. A QoS 1 PUBLISH is acknowledged to its sender with a
             forged PUBACK, as if it was lost after the hop: without that, the sender's MQTT
             layer would keep the message in flight forever and nothing would be "lost".
    hold     the packet vanishes and is not acknowledged: the sender's MQTT layer still waits
             for it (it is resent only on reconnect, as MQTT 3.1.1 says).
    dup      the packet goes through twice (the copy with DUP set, same packet id).
    reorder  the packet is held back until `after` later packets of the same direction passed.
    delay    the packet goes through `delay` seconds later (later packets overtake it).

A rule applies to matches number first, first+every, ... (counted from 1), at most `limit`
times. `cut()` stops the flow both ways (nothing is read, so TCP buffers fill up as in a real
split; new connections are accepted but go nowhere); `restore()` resets every connection
that lived through the cut (both ends see a broken connection, as after a long split) or,
with reset=False, lets them carry on. `throttle()` limits a direction's bytes per second.
"""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

PUBLISH = 3


@dataclass
class Rule:
    action: str
    topic: re.Pattern
    direction: str = "up"
    first: int = 1
    every: int = 1
    limit: int | None = None
    delay: float = 0.0
    after: int = 1
    seen: int = 0
    applied: int = 0

    def wants(self) -> bool:
        """Count one more matching packet; True if this one is to be acted on."""
        self.seen += 1
        m = self.seen
        return not (m < self.first or (m - self.first) % self.every
                    or (self.limit is not None and self.applied >= self.limit))


@dataclass(eq=False)
class _Conn:
    client_w: asyncio.StreamWriter
    broker_w: asyncio.StreamWriter | None = None
    doomed: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[bytes] = field(default_factory=list)
    reorder: dict[str, list[list]] = field(default_factory=lambda: {"up": [], "down": []})


def take_frame(buf: bytearray) -> bytes | None:
    """One whole MQTT packet off the front of `buf`, or None if it is not all there yet."""
    if len(buf) < 2:
        return None
    length, mult, i = 0, 1, 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        length += (b & 0x7F) * mult
        i += 1
        if not b & 0x80:
            break
        mult *= 128
        if i > 4:
            raise ValueError("malformed remaining length")
    if len(buf) < i + length:
        return None
    frame = bytes(buf[:i + length])
    del buf[:i + length]
    return frame


def publish_fields(frame: bytes) -> tuple[str, int, int | None]:
    """(topic, qos, packet id) of a PUBLISH frame."""
    i = 1
    while frame[i] & 0x80:
        i += 1
    i += 1
    tlen = struct.unpack_from(">H", frame, i)[0]
    topic = frame[i + 2:i + 2 + tlen].decode("utf-8", "replace")
    qos = (frame[0] >> 1) & 3
    pid = struct.unpack_from(">H", frame, i + 2 + tlen)[0] if qos else None
    return topic, qos, pid


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = 0
        self.rules: list[Rule] = []
        self.bytes: Counter = Counter()  # direction -> bytes passed on
        self.topics: Counter = Counter()  # (direction, topic) -> PUBLISH packets seen
        self.actions: Counter = Counter()  # action -> times applied
        self.connections = 0
        self._rate: dict[str, float | None] = {"up": None, "down": None}
        self._conns: set[_Conn] = set()
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)

    # control (from the test's thread) ----------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._reset_all)
        self._call(self._stop_server)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def add(self, action: str, topic: str = ".*", direction: str = "up", **kw) -> Rule:
        assert action in ("drop", "hold", "dup", "reorder", "delay") and direction in ("up", "down")
        rule = Rule(action, re.compile(topic), direction, **kw)
        self._call_sync(lambda: self.rules.append(rule))
        return rule

    def clear(self) -> None:
        self._call_sync(self.rules.clear)

    def cut(self) -> None:
        def do():
            self._open.clear()
            for c in self._conns:
                c.doomed = True
        self._call_sync(do)

    def restore(self, reset: bool = True) -> None:
        def do():
            if reset:
                for c in list(self._conns):
                    if c.doomed:
                        self._reset(c)
            self._open.set()
        self._call_sync(do)

    def throttle(self, direction: str, bytes_per_second: float | None) -> None:
        self._rate[direction] = bytes_per_second

    def seen(self, direction: str, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(n for (d, t), n in list(self.topics.items()) if d == direction and rx.search(t))

    # loop side -----------------------------------------------------------------------------------

    def _call(self, coro_fn):
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(10)

    def _call_sync(self, fn):
        async def wrap():
            return fn()
        return self._call(wrap)

    async def _start(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_server(self) -> None:
        self._server.close()

    async def _reset_all(self) -> None:
        for c in list(self._conns):
            self._reset(c)

    def _reset(self, c: _Conn) -> None:
        """Close both sockets with RST, as a connection that died in the network."""
        for w in (c.client_w, c.broker_w):
            if w is None:
                continue
            sock = w.get_extra_info("socket")
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            w.transport.abort()
        self._conns.discard(c)
        c.closed.set()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = _Conn(cwriter)
        self._conns.add(conn)
        self.connections += 1
        if not self._open.is_set():
            conn.doomed = True  # accepted during a split: it goes nowhere until restore resets it
            await conn.closed.wait()
            return
        try:
            breader, bwriter = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset(conn)
            return
        conn.broker_w = bwriter
        up = asyncio.ensure_future(self._pump(conn, creader, bwriter, cwriter, "up"))
        down = asyncio.ensure_future(self._pump(conn, breader, cwriter, bwriter, "down"))
        await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        up.cancel()
        down.cancel()
        if not conn.closed.is_set():
            for w in (cwriter, bwriter):
                w.close()
            self._conns.discard(conn)
            conn.closed.set()

    async def _pump(self, conn: _Conn, reader, dst, back, direction: str) -> None:
        buf = bytearray()
        try:
            while not conn.closed.is_set():
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
                while (frame := take_frame(buf)) is not None:
                    await self._open.wait()
                    if conn.closed.is_set():
                        return
                    self._forward(conn, frame, dst, back, direction)
                    rate = self._rate[direction]
                    if rate:
                        await dst.drain()
                        await asyncio.sleep(len(frame) / rate)
                await dst.drain()
        except (ConnectionError, OSError, ValueError):
            return

    def _forward(self, conn: _Conn, frame: bytes, dst, back, direction: str) -> None:
        if frame[0] >> 4 == PUBLISH:
            topic, qos, pid = publish_fields(frame)
            self.topics[(direction, topic)] += 1
            chosen = None
            for rule in self.rules:  # every rule counts every packet it matches; the first that wants it acts
                if rule.direction == direction and rule.topic.search(topic) and rule.wants() and chosen is None:
                    chosen = rule
            if chosen is not None:
                chosen.applied += 1
                self.actions[chosen.action] += 1
                if self._apply(chosen, conn, frame, qos, pid, dst, back, direction):
                    return
        self._write(conn, dst, frame, direction)

    def _apply(self, rule: Rule, conn: _Conn, frame: bytes, qos: int, pid, dst, back, direction: str) -> bool:
        """Do what the rule says; True when the frame must not be forwarded now."""
        if rule.action == "drop":
            if qos == 1:
                back.write(b"\x40\x02" + pid.to_bytes(2, "big"))  # forged PUBACK: lost after the hop
            return True
        if rule.action == "hold":
            conn.held.append(frame)
            return True
        if rule.action == "dup":
            self._write(conn, dst, frame, direction)
            self._write(conn, dst, bytes([frame[0] | 0x08]) + frame[1:], direction)
            return True
        if rule.action == "reorder":
            conn.reorder[direction].append([rule.after, frame])
            return True
        if rule.action == "delay":
            def later():
                if not conn.closed.is_set() and not dst.is_closing():
                    self._write(conn, dst, frame, direction, release=False)
            self._loop.call_later(rule.delay, later)
            return True
        return False

    def _write(self, conn: _Conn, dst, frame: bytes, direction: str, release: bool = True) -> None:
        dst.write(frame)
        self.bytes[direction] += len(frame)
        if not release:
            return
        waiting = conn.reorder[direction]
        if waiting:
            for item in waiting:
                item[0] -= 1
            due = [item for item in waiting if item[0] <= 0]
            conn.reorder[direction] = [item for item in waiting if item[0] > 0]
            for _, held in due:
                self._write(conn, dst, held, direction, release=False)
