"""The single-process flow generator bridge_bench.py and persistence_bench.py drive: raw sockets,
pre-encoded packets, acks built by slices, a bounded window. (broker_bench.py, the side-by-side
harness of issue 21, runs publishers and subscribers in separate processes instead.)"""

from __future__ import annotations

import selectors
import socket
import sys
import time
from array import array

from daemons.broker.packets import Connect, Subscribe, encode, encode_publish
from daemons.broker.packets5 import ConnectV5, Subscription, SubscribeV5, encode_publish_v5
from daemons.broker.packets5 import encode as encode_v5

PAYLOAD = b"x" * 64


# -- raw clients -------------------------------------------------------------------------------


def connect(port: int, cid: str, keepalive: int = 600, clean_session: bool = True, v5: bool = False) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if v5:  # CONNACK: flags, reason code, properties (their length varies by broker)
        s.sendall(encode_v5(ConnectV5(cid, clean_start=clean_session, keep_alive=keepalive)))
        assert _read_packet(s)[1] == 0, "CONNACK refused"
        return s
    s.sendall(encode(Connect(cid, clean_session=clean_session, keep_alive=keepalive)))
    assert _read_exact(s, 4)[3] == 0, "CONNACK refused"
    return s


def subscribe(s: socket.socket, topic: str, qos: int, v5: bool = False) -> None:
    if v5:
        s.sendall(encode_v5(SubscribeV5(1, (Subscription(topic, qos),))))
        assert _read_packet(s)[-1] == qos, "SUBACK refused"
        return
    s.sendall(encode(Subscribe(1, ((topic, qos),))))
    assert len(_read_exact(s, 5)) == 5  # SUBACK with one code


def _read_packet(s: socket.socket) -> bytes:
    """One whole packet's body (after its fixed header)."""
    first = _read_exact(s, 2)
    length, shift, b = 0, 0, first[1]
    while True:
        length |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        b = _read_exact(s, 1)[0]
    return _read_exact(s, length)


def _read_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    s.settimeout(10)
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    s.settimeout(None)
    return buf


class SubCounter:
    """Counts identical PUBLISH packets; answers QoS 1 with PUBACK and QoS 2 with PUBREC/PUBCOMP.

    With `seen` (QoS 1 only), also collects the 4-byte little-endian sequence number each
    payload starts with, so that redeliveries and losses can be told apart."""

    def __init__(self, sock: socket.socket, size: int, qos: int, pid_offset: int, seen: set[int] | None = None):
        self.sock, self.size, self.qos, self.pid_offset = sock, size, qos, pid_offset
        self.seen = seen
        self.count = 0
        self.rest = b""
        self.out = bytearray()

    def on_readable(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("subscriber closed by broker")
        if self.qos == 0:
            total = len(self.rest) + len(data)
            self.count += total // self.size
            self.rest = b"\0" * (total % self.size)
            return
        data = self.rest + data
        if self.qos == 1:
            n = len(data) // self.size
            acks = bytearray(4 * n)
            acks[0::4] = b"\x40" * n
            acks[1::4] = b"\x02" * n
            acks[2::4] = data[self.pid_offset:n * self.size:self.size]
            acks[3::4] = data[self.pid_offset + 1:n * self.size:self.size]
            if self.seen is not None:
                seqs = bytearray(4 * n)
                for k in range(4):  # the payload starts right after the packet id
                    seqs[k::4] = data[self.pid_offset + 2 + k:n * self.size:self.size]
                self.seen.update(array("I", seqs) if sys.byteorder == "little" else
                                 (int.from_bytes(seqs[j:j + 4], "little") for j in range(0, 4 * n, 4)))
            self.count += n
            self.rest = data[n * self.size:]
            self.out += acks
        else:  # QoS 2: PUBLISH (size) and PUBREL (4 bytes) interleave; parse packet by packet
            i, end = 0, len(data)
            while i < end:
                first = data[i]
                plen = self.size if first >> 4 == 3 else 4
                if i + plen > end:
                    break
                if first >> 4 == 3:
                    p = i + self.pid_offset
                    self.out += b"\x50\x02" + data[p:p + 2]
                    self.count += 1
                else:  # PUBREL
                    self.out += b"\x70\x02" + data[i + 2:i + 4]
                i += plen
            self.rest = data[i:]
        if self.out:
            self.sock.sendall(self.out)
            self.out.clear()


class PubAcks:
    """Counts PUBACK (QoS 1) or PUBCOMP (QoS 2) on a publisher socket; answers PUBREC with PUBREL."""

    def __init__(self, sock: socket.socket, qos: int):
        self.sock, self.qos, self.done, self.rest = sock, qos, 0, b""

    def on_readable(self) -> None:
        data = self.rest + self.sock.recv(1 << 20)
        n = len(data) // 4
        self.rest = data[n * 4:]
        if self.qos == 1:
            self.done += n
            return
        body = data[:n * 4]
        recs = body[0::4].count(0x50)
        self.done += n - recs
        if recs:
            rel = bytearray(body)
            rel[0::4] = b"\x62" * n
            # keep only the groups that were PUBRECs
            out = b"".join(rel[j:j + 4] for j in range(0, n * 4, 4) if body[j] == 0x50)
            self.sock.sendall(out)


def run_flow(port: int, *, qos: int, n: int, pubs: int, subs: int, window: int, topic_of, sub_filter: str,
             pub_inflight: int = 20, sub_port: int | None = None, v5: bool = False) -> tuple[float, int]:
    """Publish n messages in total from `pubs` publishers; every subscriber gets every message
    (subscribed on `sub_port`, default `port`: another broker, across a bridge). `v5`: every
    client speaks MQTT 5.0 (PUBLISH with an empty property block; acks in the short form).
    Returns (seconds, messages delivered to the slowest subscriber)."""
    sel = selectors.DefaultSelector()
    subscribers = []
    publish = encode_publish_v5 if v5 else encode_publish
    props = 1 if v5 else 0  # the property length byte between packet id and payload
    for i in range(subs):
        s = connect(sub_port or port, f"bench-sub-{i}", v5=v5)
        subscribe(s, sub_filter, qos, v5)
        s.setblocking(False)
        sample = publish(topic_of(0).encode(), PAYLOAD, qos, False, False, 1 if qos else None)
        c = SubCounter(s, len(sample), qos, len(sample) - len(PAYLOAD) - 2 - props)
        sel.register(s, selectors.EVENT_READ, c)
        subscribers.append(c)
    publishers = []
    for i in range(pubs):
        s = connect(port, f"bench-pub-{i}", v5=v5)
        s.setblocking(False)
        acks = PubAcks(s, qos) if qos else None
        if acks:
            sel.register(s, selectors.EVENT_READ, acks)
        publishers.append((s, topic_of(i).encode(), acks))
    per_pub = n // pubs
    n = per_pub * pubs
    batch = max(1, min(500, window // (4 * pubs), pub_inflight if qos else 500))
    # One pre-encoded batch per publisher (QoS>0: a ring of batches so packet ids cycle 1..65535).
    blocks = []
    for (_, topic, _) in publishers:
        if qos == 0:
            blocks.append([publish(topic, PAYLOAD, 0, False, False, None) * batch])
        else:
            blocks.append([b"".join(publish(topic, PAYLOAD, qos, False, False, (k * batch + j) % 65535 + 1)
                                    for j in range(batch)) for k in range(65535 // batch)])
    sent = [0] * pubs
    pending = [b""] * pubs
    start = last_progress = time.perf_counter()
    last_received = 0
    while True:
        received = min(c.count for c in subscribers)
        if received >= n and all(a is None or a.done >= per_pub for _, _, a in publishers):
            break
        now = time.perf_counter()
        if received != last_received:
            last_received, last_progress = received, now
        elif now - last_progress > 3.0:
            break  # the broker dropped some: report what arrived
        inflight = sum(sent) - received
        for i, (s, _, acks) in enumerate(publishers):
            # QoS 1/2: at most pub_inflight unacknowledged per publisher, as real clients keep.
            while (pending[i] or sent[i] < per_pub) and inflight < window and (
                    acks is None or pending[i] or sent[i] - acks.done < pub_inflight):
                if not pending[i]:
                    k = min(batch, per_pub - sent[i])
                    blk = blocks[i][(sent[i] // batch) % len(blocks[i])]
                    pending[i] = blk if k == batch else blk[: k * (len(blk) // batch)]
                    sent[i] += k
                    inflight += k
                try:
                    w = s.send(pending[i])
                except BlockingIOError:
                    break
                pending[i] = pending[i][w:]
                if pending[i]:
                    break
        for key, _ in sel.select(timeout=0.05):
            key.data.on_readable()
    elapsed = (last_progress if received < n else time.perf_counter()) - start
    for s, _, _ in publishers:
        s.close()
    for c in subscribers:
        c.sock.close()
    sel.close()
    return elapsed, received
