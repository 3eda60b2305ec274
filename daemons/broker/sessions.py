"""Per-client session state: subscriptions, the outgoing QoS 1/2 window and queue, packet ids,
and the incoming QoS 2 ids awaiting PUBREL (MQTT 3.1.1 sections 4.1, 4.3, 4.4, 4.6).

Theory of operation
===================

A Session outlives its network connection when clean_session=0. While attached to a
connection (`conn` is not None) messages go out at once up to `max_inflight` unacknowledged
QoS 1/2 messages; the rest wait in `queue`, bounded by `max_queued`. While detached, QoS 1/2
messages for its subscriptions queue the same way and QoS 0 messages are not kept (as
Mosquitto's default).

A full queue is the core's to prevent: with `queue_full = "block"` it asks `can_take()`
before it accepts a QoS 1/2 PUBLISH, and holds the PUBLISH back (the publishing connection
is registered in `waiters` and retried when an acknowledgement frees room) instead of
acknowledging a message it cannot keep. `deliver()` past the bound drops and counts: that is
`queue_full = "drop"` (Mosquitto's behaviour), and what happens to the broker's own messages
(wills, retained messages sent on SUBSCRIBE), which no publisher waits for.

Outgoing states per packet id, kept in `inflight` in send order (a dict keeps it):

    QoS 1:  PUBLISH sent --PUBACK--> done
    QoS 2:  PUBLISH sent --PUBREC--> PUBREL sent --PUBCOMP--> done

On reconnect `resume()` sends every PUBLISH still unacknowledged again with DUP=1 and every
PUBREL again, in their original order [MQTT-4.4.0-1], then refills the window from the queue.
Each completed acknowledgement frees a slot that is refilled at once, so the window never
stalls while messages wait.

Incoming QoS 2 (the client publishes to us) uses "method B" of figure 4.3: the message is
routed when it first arrives and its packet id remembered until PUBREL, so a retransmitted
PUBLISH with the same id is acknowledged again but not routed twice [MQTT-4.3.3-2].

The session writes through `conn.send(bytes)`; it does no I/O of its own. To an MQTT 5.0
client (`v5`, a v5.Client, set while attached to one) each PUBLISH is encoded by that client's
`publish`, which adds its properties, topic alias and subscription identifiers; a message too
large for it is not sent and counts as delivered [MQTT-3.1.2-25]. A queued message whose
Message Expiry Interval has passed is dropped when its turn comes, not sent [MQTT-3.3.2-5].
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import time

from .packets import LARGE_PACKET, Will, _varint, encode_publish, encode_publish_head
from .packets5 import encode_publish_v5

PUBREL_PREFIX = b"\x62\x02"


class Link(Protocol):
    """What a session needs of a network connection."""

    def send(self, data: bytes, payload: bytes | None = None) -> None:
        """Write `data`, then `payload` if given: the rest of the same packet, kept apart so that
        a large payload is not copied (send_publish)."""
    def close(self) -> None: ...
    def congested(self) -> bool: ...


class Message:
    """An application message as routed: one object shared by every subscriber it goes to.

    Not frozen: it caches its QoS 0 encodings, made once and sent to every QoS 0 subscriber.
    `props`: the encoded properties it carries on to v5 subscribers (v5.carry); `expires`: when
    its Message Expiry Interval ends, on the broker's clock (None: never).
    """

    __slots__ = ("topic", "topic_bytes", "payload", "qos", "retain", "_qos0", "props", "expires", "_qos0v5")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool, topic_bytes: bytes | None = None):
        self.topic = topic
        self.topic_bytes = topic_bytes if topic_bytes is not None else topic.encode()
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self._qos0: bytes | None = None
        self.props = b""
        self.expires: float | None = None
        self._qos0v5: bytes | None = None

    def qos0_bytes(self) -> bytes:
        if self._qos0 is None:
            self._qos0 = encode_publish(self.topic_bytes, self.payload, 0, False, False, None)
        return self._qos0

    def qos0_v5_bytes(self) -> bytes:
        """The QoS 0 PUBLISH to a v5 client that needs no property of its own."""
        if self._qos0v5 is None:
            self._qos0v5 = encode_publish_v5(self.topic_bytes, self.payload, 0, False, False, None,
                                             _varint(len(self.props)) + self.props)
        return self._qos0v5


def send_publish(conn: Link, msg: Message, qos: int, retain: bool, dup: bool, pid: int | None) -> None:
    """An MQTT 3.1.1 PUBLISH of `msg` to `conn`; a large payload goes out as it is, after the
    packet's head, not copied into one packet (15% of the broker's CPU with 1 MiB payloads)."""
    payload = msg.payload
    if len(payload) < LARGE_PACKET:
        conn.send(encode_publish(msg.topic_bytes, payload, qos, retain, dup, pid))
    else:
        conn.send(encode_publish_head(msg.topic_bytes, len(payload), qos, retain, dup, pid), payload)


class Outgoing:
    __slots__ = ("msg", "qos", "pubrel_sent", "retain", "seq", "group")

    def __init__(self, msg: Message, qos: int, retain: bool, seq: int | None = None, group=None):
        self.msg, self.qos, self.retain, self.seq = msg, qos, retain, seq
        self.pubrel_sent = False
        self.group = group  # the shared subscription (shared.Group) it came through, if any


# What an idle session holds in place of an empty set: an empty set costs 216 bytes, an empty
# deque 760 (its first block), and most sessions (thousands of idle devices) never need theirs.
# The queue starts as () and the sets as NOTHING; each is made where something is first put in.
NOTHING: frozenset = frozenset()


class _Empty(dict):
    """The one empty dict every new session's subscriptions, options and in-flight window are
    (64 bytes each otherwise): reads, pops and clear() work on it, a store raises; the session
    takes its own dict first (set_subscription(), set_options(), _send_new())."""

    __slots__ = ()

    def __setitem__(self, key, value):
        raise TypeError("the sessions' shared empty dict: the session needs its own dict first")


NO_ENTRIES = _Empty()


# Held publishers are woken when this many messages fit in a full queue again (at most a tenth of
# max_queued), not at each acknowledgement: each wake hands the core every held PUBLISH of every
# waiting publisher, and with one freed slot all but one are held again (fan-in 50 -> 1 spent
# ~15% of the broker's CPU so; issue 21).
WAKE_SLACK = 1000


def _size(msg: Message) -> int:
    return len(msg.topic_bytes) + len(msg.payload)


class Session:
    __slots__ = (
        "client_id", "clean", "conn", "will", "subscriptions", "inflight", "queue", "queued_bytes",
        "incoming_qos2", "max_inflight", "max_queued", "max_queued_bytes", "dropped", "waiters",
        "_next_pid", "store", "sid", "on_disk", "last_seq", "loading", "disconnected_at", "stored_bytes",
        "username", "no_local", "v5", "options", "expiry", "clock", "stats",
    )

    def __init__(self, client_id: str, clean: bool, max_inflight: int, max_queued: int,
                 max_queued_bytes: int = 0):
        self.client_id = client_id
        self.clean = clean
        self.conn: Link | None = None
        self.will: Will | None = None
        self.subscriptions: dict[str, int] = NO_ENTRIES  # set_subscription() makes its own
        self.inflight: dict[int, Outgoing] = NO_ENTRIES  # its own from the first message out
        # (message, QoS, retain, store seq, shared.Group or None)
        self.queue: deque[tuple[Message, int, bool, int | None, object]] | tuple = ()  # see NOTHING
        self.queued_bytes = 0
        self.incoming_qos2: set[int] | frozenset = NOTHING
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes or 1 << 62
        self.dropped = 0
        self.waiters: set | frozenset = NOTHING  # connections holding a PUBLISH until this session has room
        self._next_pid = 0
        # Persistence (store.py): set for a persistent session when the broker has a store.
        self.store = None
        self.sid: int | None = None
        self.on_disk = 0  # queued messages only in the store, after those in `queue`
        self.last_seq = 0  # the newest message in memory (window or queue)
        self.loading = False  # a page of on-disk messages is being read
        self.stored_bytes = 0  # of this session's messages in the store
        self.username: str | None = None  # as its client logged in: what the ACL checks
        # A bridge (ours, or one that connected with try_private): what it publishes is not
        # sent back to it, and it gets the retain flag as published.
        self.no_local = False
        # When the client went away (the broker's clock: wall-clock time in the server, so it
        # stays meaningful in the store across restarts), for persistent_client_expiration.
        self.disconnected_at: float | None = None
        self.v5 = None  # the v5.Client attached, None for a 3.1.1/3.1 one or none
        self.options: dict = NO_ENTRIES  # filter -> v5.SubOptions, for subscriptions that have any
        self.expiry: int | None = None  # v5 Session Expiry Interval; None: persistent_client_expiration
        self.clock = time.time  # the broker's, for Message Expiry
        self.stats = None  # the broker's Stats: expired and too-large messages are counted there

    def set_subscription(self, topic_filter: str, qos: int) -> None:
        if self.subscriptions is NO_ENTRIES:
            self.subscriptions = {}
        self.subscriptions[topic_filter] = qos

    def set_options(self, topic_filter: str, options) -> None:
        if self.options is NO_ENTRIES:
            self.options = {}
        self.options[topic_filter] = options

    def _new_queue(self) -> deque:
        self.queue = deque()
        return self.queue

    def __repr__(self) -> str:
        return f"<Session {self.client_id!r} clean={self.clean} online={self.conn is not None}>"

    # delivery --------------------------------------------------------------------------------

    def _memory_room(self) -> bool:
        return len(self.queue) < self.max_queued and self.queued_bytes < self.max_queued_bytes

    def can_take(self) -> bool:
        """Room for one more QoS 1/2 message: in the window now, in the queue in memory, or
        (a persistent session, persistence on) in the store until its quota."""
        if not self.on_disk and ((len(self.queue) < self.max_queued and self.queued_bytes < self.max_queued_bytes) or (
                self.conn is not None and len(self.inflight) < self.max_inflight and not self.queue)):
            return True  # (the first test is _memory_room(), inline: it runs per QoS 1/2 PUBLISH)
        return self.store is not None and self.store.has_room()

    def room_to_wake(self) -> bool:
        """Room for a run of messages, not one (see WAKE_SLACK): the test for waking the
        publishers held for this session."""
        if self.on_disk or not self.queue:
            return self.can_take()
        slack = min(WAKE_SLACK, self.max_queued // 10)
        return len(self.queue) + slack < self.max_queued and self.can_take()

    def window_free(self) -> bool:
        """Connected, and a QoS 1/2 message would go out now rather than wait in the queue."""
        return (self.conn is not None and len(self.inflight) < self.max_inflight and not self.queue
                and not self.on_disk)

    def deliver(self, msg: Message, qos: int, retain: bool = False, group=None, force: bool = False) -> bool:
        """Send or queue `msg` at `qos`. False when it had to be dropped (queue full, QoS 0 to
        a congested or absent client), so the caller can count it. `group`: the shared
        subscription it came through (see `take_back`). `force` queues it in memory past the
        bounds: a message taken back from a member that left, which no publisher can be held for."""
        conn = self.conn
        if qos == 0:
            if conn is None:
                return True  # not kept for an offline session: not a loss the broker promised
            if conn.congested():
                return False
            if self.v5 is None:
                if not retain:
                    conn.send(msg.qos0_bytes())
                else:
                    send_publish(conn, msg, 0, True, False, None)
            else:
                data = self.v5.publish(msg, 0, retain, False, None, self.options)
                if data is not None:
                    conn.send(data)
                elif self.stats is not None:
                    self.stats.too_large_dropped += 1
            return True
        store = self.store
        if not self.on_disk:
            if conn is not None and len(self.inflight) < self.max_inflight and not self.queue:
                seq = self._store(msg, qos, retain) if store else None
                self._send_new(conn, msg, qos, retain, seq, group)
                return True
            if self._memory_room() or force:
                seq = self._store(msg, qos, retain) if store else None
                (self.queue or self._new_queue()).append((msg, qos, retain, seq, group))
                self.queued_bytes += _size(msg)
                if seq is not None:
                    self.last_seq = seq
                return True
        if store is not None and (store.has_room() or force):
            # Past memory: on disk only, paged back in order as the queue drains (`_fill`).
            self._store(msg, qos, retain)
            self.on_disk += 1
            return True
        self.dropped += 1
        return False

    def _store(self, msg: Message, qos: int, retain: bool) -> int:
        size = _size(msg)
        self.stored_bytes += size
        return self.store.message(self.sid, msg, qos, retain, size)

    def _send_new(self, conn: Link, msg: Message, qos: int, retain: bool, seq: int | None, group=None) -> None:
        pid = self._allocate_pid()
        if self.v5 is None:
            data = None  # encoded as it is sent (send_publish)
        else:
            data = self.v5.publish(msg, qos, retain, False, pid, self.options)
            if data is None:  # larger than the client takes: as if delivered [MQTT-3.1.2-25]
                if seq is not None:
                    self.last_seq = max(self.last_seq, seq)
                self._forget(msg, seq)
                if self.stats is not None:
                    self.stats.too_large_dropped += 1
                return
        if self.inflight is NO_ENTRIES:
            self.inflight = {}
        self.inflight[pid] = Outgoing(msg, qos, retain, seq, group)
        if seq is not None:
            self.last_seq = max(self.last_seq, seq)
            if qos == 2:
                self.store.sent(seq, pid)
        if data is None:
            send_publish(conn, msg, qos, retain, False, pid)
        else:
            conn.send(data)

    def _allocate_pid(self) -> int:
        # At most max_inflight (<= 65535) ids are in use, so a free one is always found.
        pid = self._next_pid
        while True:
            pid = pid % 65535 + 1
            if pid not in self.inflight:
                self._next_pid = pid
                return pid

    def _fill(self) -> None:
        conn = self.conn
        queue = self.queue
        while conn is not None and queue and len(self.inflight) < self.max_inflight:
            msg, qos, retain, seq, group = queue.popleft()
            self.queued_bytes -= _size(msg)
            if msg.expires is not None and msg.expires <= self.clock():
                self._forget(msg, seq)  # its Message Expiry Interval passed while it waited
                if self.stats is not None:
                    self.stats.messages_expired += 1
                continue
            self._send_new(conn, msg, qos, retain, seq, group)
        if self.on_disk and not self.loading and len(queue) <= self.max_queued // 2:
            self.loading = True
            self.store.read(self.sid, self.last_seq, max(1, min(1000, self.max_queued - len(queue))), self._paged_in)

    def _paged_in(self, rows: list[tuple]) -> None:
        self.loading = False
        if self.store is None:
            return  # the session ended while its page was read
        for seq, topic, payload, qos, retain, _pid, _pubrel, props, expires in rows:
            msg = _stored(topic, payload, qos, retain, props, expires)
            (self.queue or self._new_queue()).append((msg, qos, bool(retain), seq, None))
            self.queued_bytes += _size(msg)
            self.last_seq = seq
        self.on_disk -= len(rows)
        if not rows:
            self.on_disk = 0  # nothing more there (counts can only be off after a salvage)
        self._fill()

    def _done(self, out: Outgoing) -> None:
        if out.seq is not None and self.store is not None:
            size = _size(out.msg)
            self.stored_bytes -= size
            self.store.done(out.seq, size)
        self._fill()

    # acknowledgements from the client --------------------------------------------------------

    def puback(self, pid: int) -> None:
        out = self.inflight.get(pid)
        if out is not None and out.qos == 1:
            del self.inflight[pid]
            self._done(out)

    def pubrec(self, pid: int) -> None:
        out = self.inflight.get(pid)
        if out is not None and out.qos == 2:
            if not out.pubrel_sent and out.seq is not None and self.store is not None:
                self.store.pubrel(out.seq)
            out.pubrel_sent = True
            # A PUBREC for an id we already released is answered again [MQTT-4.3.3-?]: harmless.
            if self.conn is not None:
                self.conn.send(PUBREL_PREFIX + pid.to_bytes(2, "big"))

    def pubrec_refused(self, pid: int) -> None:
        """A v5 PUBREC with an error reason code: the client will not take it; done."""
        out = self.inflight.get(pid)
        if out is not None and out.qos == 2 and not out.pubrel_sent:
            del self.inflight[pid]
            self._done(out)

    def pubcomp(self, pid: int) -> None:
        out = self.inflight.get(pid)
        if out is not None and out.qos == 2 and out.pubrel_sent:
            del self.inflight[pid]
            self._done(out)

    # connection changes ----------------------------------------------------------------------

    def attach(self, conn: Link) -> None:
        self.conn = conn
        self.v5 = getattr(conn, "v5", None)
        self.disconnected_at = None

    def detach(self, now: float | None = None) -> None:
        self.conn = None
        self.v5 = None
        self.disconnected_at = now

    def resume(self) -> None:
        """After a reconnect: retransmit what is unacknowledged, in order, then refill."""
        conn = self.conn
        if conn is None:
            return
        for pid, out in self.inflight.items():
            if out.pubrel_sent:
                conn.send(PUBREL_PREFIX + pid.to_bytes(2, "big"))
            elif self.v5 is None:
                send_publish(conn, out.msg, out.qos, out.retain, True, pid)
            else:
                data = self.v5.publish(out.msg, out.qos, out.retain, True, pid, self.options)
                if data is not None:  # too large for this connection: sent on a later one, maybe
                    conn.send(data)
        self._fill()

    def restore(self, store, sid: int, rows: list[tuple], on_disk: int, stored_bytes: int) -> None:
        """A persistent session read back from the store at start: QoS 2 messages that went out
        keep their packet ids (the client may hold them), the rest queue in order."""
        self.store, self.sid, self.on_disk, self.stored_bytes = store, sid, on_disk, stored_bytes
        self.inflight = {}
        for seq, topic, payload, qos, retain, pid, pubrel, props, expires in rows:
            msg = _stored(topic, payload, qos, retain, props, expires)
            if qos == 2 and pid is not None and pid not in self.inflight:
                out = self.inflight[pid] = Outgoing(msg, qos, bool(retain), seq)
                out.pubrel_sent = bool(pubrel)
                self._next_pid = max(self._next_pid, pid)
            else:
                (self.queue or self._new_queue()).append((msg, qos, bool(retain), seq, None))
                self.queued_bytes += _size(msg)
            self.last_seq = seq

    def take_back(self, group=None) -> list[tuple[Message, int, object]]:
        """Remove and return, in order, the unacknowledged messages that came through shared
        subscriptions (`group`, or any), as (message, QoS, group): the member is leaving and
        another member gets them. A QoS 2 message past PUBREC stays (the client has it). Their
        rows leave the store; the caller delivers them again, to a member that stores them anew."""
        out = []
        for pid, o in list(self.inflight.items()):
            if o.group is not None and (group is None or o.group is group) and not o.pubrel_sent:
                del self.inflight[pid]
                self._forget(o.msg, o.seq)
                out.append((o.msg, o.qos, o.group))
        if any(item[4] is not None for item in self.queue):
            kept: deque = deque()
            for item in self.queue:
                msg, qos, _retain, seq, g = item
                if g is not None and (group is None or g is group):
                    self.queued_bytes -= _size(msg)
                    self._forget(msg, seq)
                    out.append((msg, qos, g))
                else:
                    kept.append(item)
            self.queue = kept
        return out

    def _forget(self, msg: Message, seq: int | None) -> None:
        if seq is not None and self.store is not None:
            size = _size(msg)
            self.stored_bytes -= size
            self.store.done(seq, size)

    def pending(self) -> int:
        return len(self.inflight) + len(self.queue) + self.on_disk


def _stored(topic: str, payload: bytes, qos: int, retain, props, expires) -> Message:
    """A message read back from the store (store.py's row)."""
    msg = Message(topic, payload, qos, bool(retain))
    if props:
        msg.props = bytes(props)
    msg.expires = expires
    return msg
