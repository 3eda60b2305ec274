"""The sending side of a transfer, without MQTT or the outbox: shared by iot-transfer-send
and `iotctl send`. The caller feeds it status and ack messages and calls `pump()`; the
engine publishes through the `publish(topic, payload)` function it was given.

Theory of operation
===================

Per file, chunks are in one of three places: not sent yet (index >= `next_new`), in flight
(`inflight`: index -> time sent), or confirmed by the receiver's status. A new or retried
chunk is sent only while fewer than `window` chunks are in flight, so the sender can never
run more than `window` chunks ahead of what the receiver has written: a slow receiver
paces the sender through its status messages (C10), the broker's queue for an absent
receiver stays small (C3), and memory stays flat whatever the file size.

Retransmission is driven by the receiver's status alone (C5, C6, C7):

- a missing chunk that is no longer in flight (the receiver had confirmed it, then lost it
  in a crash: C1) is sent again at once;
- a missing chunk in flight for more than `resend_after` is sent again if a later chunk has
  arrived (index below the receiver's `high`: it was lost, not merely queued), or if the
  receiver made no progress since its previous status (a lost tail), or if this status
  answers a re-announcement. Younger ones may only be late (reordered, queued: C6, C10);
- a resumed transfer (the sender restarted, C2) sends nothing until the receiver's first
  status, then skips ahead to `upto` and queues only what is listed missing.

If the receiver says nothing for `stall_timeout`, the manifest is published again (with a
growing interval): a receiver that was offline, lost the manifest or restarted answers it
with a status, and one that already finished answers with its ack again (C3, C4, C8, C9,
C12). A resumed transfer sends no chunk until the receiver's status says what it needs.

The messages are built and read by `codec` (protocol.py or seedjson.py): the rules above do
not depend on the format.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from . import protocol as P

MAX_REANNOUNCE = 60.0
BURST = 64  # chunks sent per pump() call at most, so incoming messages are not starved


class FileChanged(Exception):
    pass


@dataclass(eq=False)
class Outgoing:
    manifest: P.Manifest
    path: Path
    fd: int
    key: tuple[int, int]  # (size, mtime_ns) when hashed: any change cancels the transfer
    started: float
    resumed: bool = False
    next_new: int = 0
    inflight: dict[int, float] = field(default_factory=dict)
    retry: dict[int, None] = field(default_factory=dict)  # an ordered set
    received: int = 0  # chunks the receiver confirmed, from its latest status
    last_received: int = -1
    last_heard: float = 0.0
    last_meta: float = 0.0
    quiet_limit: float = 0.0  # re-announce after this long without a status; grows if unanswered
    reannounced: bool = False
    retries: int = 0  # chunks sent more than once
    bytes_sent: int = 0
    state: str = "sending"  # sending -> done | failed
    reason: str = ""
    ack: P.Ack | None = None

    @property
    def file_id(self) -> str:
        return self.manifest.file_id

    def progress(self) -> int:
        """Bytes the receiver has confirmed."""
        m = self.manifest
        if self.state == "done":
            return m.size
        return min(m.size, self.received * m.chunk_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RateLimit:
    """A token bucket over all files; tokens may go negative by one chunk so that any chunk
    size works with any rate, and the average still holds."""

    def __init__(self, rate: int, clock: Callable[[], float]):
        self.rate, self.clock = rate, clock
        self.tokens = 0.0
        self.stamp = clock()

    def delay(self) -> float:
        if not self.rate:
            return 0.0
        now = self.clock()
        self.tokens = min(self.tokens + (now - self.stamp) * self.rate, self.rate * 0.1)
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def spend(self, n: int) -> None:
        if self.rate:
            self.tokens -= n


class Engine:
    def __init__(self, prefix: str, publish: Callable[[str, bytes], None], *, window: int, rate_limit: int,
                 resend_after: float, stall_timeout: float, log, clock: Callable[[], float] = time.monotonic,
                 codec: ModuleType = P):
        self.prefix, self.publish, self.log, self.clock, self.codec = prefix, publish, log, clock, codec
        self.window, self.resend_after, self.stall_timeout = window, resend_after, stall_timeout
        self.rate = RateLimit(rate_limit, clock)
        self.transfers: dict[str, Outgoing] = {}
        self.ended: list[Outgoing] = []  # done or failed since the caller last looked
        self._turn = 0
        # Since start, over all files (Prometheus, daemons/metrics.py).
        self.chunks_sent = self.chunk_bytes_sent = self.chunks_resent = 0

    # adding and removing -----------------------------------------------------------------------

    def add(self, t: Outgoing) -> None:
        now = self.clock()
        t.last_heard = now
        t.quiet_limit = self.stall_timeout
        self.transfers[t.file_id] = t
        self._announce(t, now)
        t.reannounced = False  # the first announcement is not a re-announcement

    def cancel(self, t: Outgoing, reason: str) -> None:
        self.send_cancel(t.file_id, reason)
        self._finish(t, "failed", reason)

    def send_cancel(self, file_id: str, reason: str) -> None:
        """Tell the receiver to drop its partial file, if the format can say it."""
        payload = self.codec.encode_cancel(file_id, reason)
        if payload is not None:
            self.publish(P.topic(self.prefix, file_id, "meta"), payload)

    def _finish(self, t: Outgoing, state: str, reason: str = "") -> None:
        t.state, t.reason = state, reason
        t.inflight.clear()
        t.retry.clear()
        t.close()
        if self.transfers.pop(t.file_id, None) is not None:
            self.ended.append(t)

    def _announce(self, t: Outgoing, now: float) -> None:
        self.publish(P.topic(self.prefix, t.file_id, "meta"), self.codec.encode_meta(t.manifest))
        t.last_meta = now
        t.reannounced = True

    # messages from the receiver ----------------------------------------------------------------

    def on_message(self, file_id: str, kind: str, payload: bytes) -> None:
        """Handle a status or an ack (raises protocol.BadMessage). Transfers that end are
        appended to `ended`."""
        t = self.transfers.get(file_id)
        if t is None:
            return  # another sender's file, or a duplicate ack of one already done
        if kind == "ack":
            ack = self.codec.decode_ack(payload, file_id)
            m = t.manifest
            # A seed receiver's ack names neither (seedjson.py): its file id, ours and random, is enough.
            if (ack.sha256 is not None and ack.sha256 != m.sha256) or (ack.size is not None and ack.size != m.size):
                self.log.warning("ack does not match the file sent; ignored", id=file_id, name=m.name)
                return
            t.ack = ack
            t.received = m.chunks
            self._finish(t, "done")
        elif kind == "status":
            self._on_status(t, self.codec.decode_status(payload, file_id))

    def _on_status(self, t: Outgoing, st: P.Status) -> None:
        now = self.clock()
        m = t.manifest
        t.last_heard = now
        t.quiet_limit = self.stall_timeout
        if st.state == P.REFUSED:
            self._finish(t, "failed", f"refused by the receiver: {st.reason or 'no reason given'}")
            return
        if st.state == P.UNKNOWN:
            # The receiver has no manifest (it was lost, or the receiver lost its state).
            if now - t.last_meta >= min(self.resend_after, 1.0):
                self._announce(t, now)
            return
        if st.chunks != m.chunks:
            self.log.warning("status does not match the manifest; ignored", id=t.file_id, chunks=st.chunks)
            return
        missing = set(st.missing)
        if t.resumed:
            t.resumed = False
            t.next_new = max(t.next_new, st.upto)
        for i in [i for i in t.inflight if i < st.next or (i < st.upto and i not in missing)]:
            del t.inflight[i]
        for i in [i for i in t.retry if i < st.next or (i < st.upto and i not in missing)]:
            del t.retry[i]
        stuck = st.received <= t.last_received or t.reannounced
        for i in st.missing:
            if i >= t.next_new or i in t.retry:
                continue  # not sent yet, or already queued again
            sent = t.inflight.get(i)
            if sent is not None and (now - sent < self.resend_after or (i >= st.high and not stuck)):
                continue  # may only be late
            t.inflight.pop(i, None)
            t.retry[i] = None
        t.reannounced = False
        t.last_received = st.received
        t.received = st.received

    # sending -------------------------------------------------------------------------------------

    def pump(self) -> float:
        """Send what the windows and the rate allow. Returns seconds until a call is useful
        again (0 when there is more to send now)."""
        now = self.clock()
        wait = 1.0
        for t in list(self.transfers.values()):
            quiet = now - max(t.last_heard, t.last_meta)
            if quiet >= t.quiet_limit:
                # Nobody answered for a while: announce again, then wait longer each time.
                self._announce(t, now)
                t.quiet_limit = min(t.quiet_limit * 2, max(MAX_REANNOUNCE, self.stall_timeout))
                quiet = 0.0
            wait = min(wait, max(0.01, t.quiet_limit - quiet))
        sent = 0
        while sent < BURST:
            ready = [t for t in self.transfers.values() if self._can_send(t)]
            if not ready:
                return wait
            delay = self.rate.delay()
            if delay > 0:
                return min(wait, delay)
            self._turn = (self._turn + 1) % len(ready)
            t = ready[self._turn]
            try:
                self._send_one(t, now)
            except (OSError, FileChanged) as e:
                self.log.warning("file changed or unreadable while being sent; cancelled", name=t.manifest.name,
                                 id=t.file_id, error=str(e))
                self.cancel(t, f"changed: {e}")
            sent += 1
        return 0.0

    def _can_send(self, t: Outgoing) -> bool:
        if t.resumed or len(t.inflight) >= self.window:
            return False
        return bool(t.retry) or t.next_new < t.manifest.chunks

    def _send_one(self, t: Outgoing, now: float) -> None:
        m = t.manifest
        if t.retry:
            index = next(iter(t.retry))
            del t.retry[index]
            kind, again = "retry", True
            t.retries += 1
            self.chunks_resent += 1
        else:
            index = t.next_new
            t.next_new += 1
            kind, again = "chunk", False
        st = os.fstat(t.fd)
        if (st.st_size, st.st_mtime_ns) != t.key:
            raise FileChanged(f"size or mtime changed (now {st.st_size} bytes)")
        want = m.chunk_len(index)
        data = os.pread(t.fd, want, index * m.chunk_size)
        if len(data) != want:
            raise FileChanged(f"short read of chunk {index}")
        self.publish(P.topic(self.prefix, t.file_id, kind),
                     self.codec.encode_chunk(t.file_id, index, m.chunk_digest(index), data, again))
        self.rate.spend(want)
        t.inflight[index] = now
        t.bytes_sent += want
        self.chunks_sent += 1
        self.chunk_bytes_sent += want
