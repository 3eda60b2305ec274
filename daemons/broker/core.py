"""The broker core: fed decoded packets by the transport, it keeps sessions, routes messages,
and writes replies through each connection's `send()`. No sockets, no asyncio here, so the
whole protocol is tested by feeding packets (tests/unit/test_core.py).

Theory of operation
===================

A connection is anything with `send(bytes)`, `close()` and `congested()`, plus the fields
the core sets on it (`session`, `will`, `keepalive`). Its life: the transport decodes bytes
with a `packets.Reader`, calls `connect()` for the CONNECT (the reader guarantees it is first
and only once), then `handle()` for each later packet, and `closed()` exactly once when the
socket is gone, saying whether the client sent DISCONNECT first.

Sessions are keyed by client id. CONNECT with clean_session=1 throws away any stored session
[MQTT-3.1.2-6]; with clean_session=0 it resumes one if present (CONNACK session present=1)
[MQTT-3.1.2-4]. A second connection with the same id takes the session over and the first
connection is closed [MQTT-3.1.4-2]; as with any close not preceded by DISCONNECT, its will
is published. A clean session ends with its connection [MQTT-3.1.2-6].

Routing: the subscription tree maps a topic to {session: highest granted QoS}; each session
gets the message once at min(published QoS, granted QoS) [MQTT-3.3.5-1]. Messages a client
publishes are routed before the PUBACK/PUBREC goes back, so an acknowledged message is
already in every subscriber's window or queue.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from ..service import Log
from .packets import (
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
)
from .retained import RetainedStore
from .sessions import Message, Session
from .topics import SubscriptionTree

VERSION = "iot-broker 0.1.0"
PINGRESP = b"\xd0\x00"


@dataclass(slots=True)
class Stats:
    """Counters behind $SYS/broker/... (Mosquitto's names) and the STATUS= line."""

    messages_received: int = 0  # packets of any type, as Mosquitto counts
    messages_sent: int = 0
    publish_received: int = 0
    publish_sent: int = 0
    publish_dropped: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    connections_total: int = 0
    clients_maximum: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    max_inflight: int = 20
    max_queued: int = 100_000
    allow_zero_length_clientid: bool = True


class Broker:
    def __init__(self, log: Log, limits: Limits = Limits(), clock=time.monotonic):
        self.log = log
        self.limits = limits
        self.sessions: dict[str, Session] = {}
        self.tree = SubscriptionTree()
        self.retained = RetainedStore()
        self.stats = Stats()
        self.connected = 0
        self.started = clock()
        self.clock = clock
        self._auto_id = itertools.count(1)
        self._handlers = {
            Publish: self._publish,
            Puback: lambda conn, p: conn.session.puback(p.packet_id),
            Pubrec: lambda conn, p: conn.session.pubrec(p.packet_id),
            Pubrel: self._pubrel,
            Pubcomp: lambda conn, p: conn.session.pubcomp(p.packet_id),
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            Pingreq: lambda conn, p: conn.send(PINGRESP),
            Disconnect: self._disconnect,
        }

    # connect / close -------------------------------------------------------------------------

    def connect(self, conn, pkt: Connect) -> bool:
        """Answer CONNECT. Returns False when refused (the CONNACK says why; caller closes)."""
        client_id = pkt.client_id
        if not client_id:
            # A server-assigned id only makes sense for a session that ends with the connection.
            if not pkt.clean_session or not self.limits.allow_zero_length_clientid:
                conn.send(encode(Connack(False, ConnackCode.IDENTIFIER_REJECTED)))  # [MQTT-3.1.3-8]
                return False
            client_id = f"auto-{next(self._auto_id)}-{id(conn):x}"  # [MQTT-3.1.3-6]

        session = self.sessions.get(client_id)
        if session is not None and session.conn is not None:
            old = session.conn
            self.log.info("session taken over", client=client_id)
            self._end_connection(old, graceful=False)  # publishes the old connection's will
            old.close()
            session = self.sessions.get(client_id)  # a clean session ended with its connection
        if session is not None and pkt.clean_session:
            self._drop_session(session)
            session = None
        present = session is not None
        if session is None:
            session = Session(client_id, pkt.clean_session, self.limits.max_inflight, self.limits.max_queued)
            self.sessions[client_id] = session
        session.clean = pkt.clean_session
        session.attach(conn)
        conn.session = session
        conn.will = pkt.will
        conn.keepalive = pkt.keep_alive
        self.connected += 1
        self.stats.connections_total += 1
        self.stats.clients_maximum = max(self.stats.clients_maximum, self.connected)
        # MQTT 3.1 has no session present flag: that byte is reserved there and must stay 0.
        conn.send(encode(Connack(present and pkt.protocol_level >= 4, ConnackCode.ACCEPTED)))
        if present:
            session.resume()
        return True

    def closed(self, conn, graceful: bool) -> None:
        """The connection is gone. Publishes the will unless the client said DISCONNECT."""
        if getattr(conn, "session", None) is not None:
            self._end_connection(conn, graceful)

    def _end_connection(self, conn, graceful: bool) -> None:
        session: Session = conn.session
        conn.session = None
        self.connected -= 1
        session.detach()
        will, conn.will = conn.will, None
        if session.clean:
            self._drop_session(session)
        if will is not None and not graceful:
            self.publish(Message(will.topic, will.payload, will.qos, will.retain))

    def _drop_session(self, session: Session) -> None:
        for f in session.subscriptions:
            self.tree.unsubscribe(session, f)
        session.subscriptions.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def _disconnect(self, conn, pkt: Disconnect) -> None:
        conn.will = None  # [MQTT-3.1.2-10]: a DISCONNECT discards the will
        self._end_connection(conn, graceful=True)
        conn.close()

    # packets ---------------------------------------------------------------------------------

    def handle(self, conn, pkt) -> None:
        self.stats.messages_received += 1
        self._handlers[type(pkt)](conn, pkt)

    def _publish(self, conn, pkt: Publish) -> None:
        qos = pkt.qos
        self.stats.publish_received += 1
        if qos == 2:
            session: Session = conn.session
            if pkt.packet_id in session.incoming_qos2:
                conn.send(b"\x50\x02" + pkt.packet_id.to_bytes(2, "big"))  # PUBREC again, not routed again
                return
            session.incoming_qos2.add(pkt.packet_id)
        if not pkt.topic.startswith("$SYS/"):  # only the broker publishes statistics
            self.publish(Message(pkt.topic, pkt.payload, qos, pkt.retain))
        if qos == 1:
            conn.send(b"\x40\x02" + pkt.packet_id.to_bytes(2, "big"))
        elif qos == 2:
            conn.send(b"\x50\x02" + pkt.packet_id.to_bytes(2, "big"))

    def _pubrel(self, conn, pkt: Pubrel) -> None:
        conn.session.incoming_qos2.discard(pkt.packet_id)
        conn.send(b"\x70\x02" + pkt.packet_id.to_bytes(2, "big"))  # PUBCOMP even for an unknown id

    def publish(self, msg: Message) -> None:
        """Store if retained, then deliver to every matching session once."""
        if msg.retain:
            self.retained.set(msg.topic, msg.payload, msg.qos)
        qos = msg.qos
        sent = dropped = 0
        for session, granted in self.tree.match(msg.topic).items():
            if session.deliver(msg, granted if granted < qos else qos):
                sent += 1
            else:
                dropped += 1
        self.stats.publish_sent += sent
        if dropped:
            self._dropped(msg, dropped)

    def _dropped(self, msg: Message, n: int) -> None:
        before = self.stats.publish_dropped
        self.stats.publish_dropped += n
        # Log the first drop and then one line per 1000, so a flood cannot flood the journal.
        if before // 1000 != self.stats.publish_dropped // 1000 or before == 0:
            self.log.warning("messages dropped: subscriber queue full or connection congested",
                             topic=msg.topic, dropped_total=self.stats.publish_dropped)

    def _subscribe(self, conn, pkt: Subscribe) -> None:
        session: Session = conn.session
        codes = []
        for topic_filter, qos in pkt.topics:
            self.tree.subscribe(session, topic_filter, qos)
            session.subscriptions[topic_filter] = qos
            codes.append(qos)
        conn.send(encode(Suback(pkt.packet_id, tuple(codes))))
        # Retained messages follow the SUBACK, with the retain flag set [MQTT-3.3.1-6, -8].
        for (topic_filter, granted) in pkt.topics:
            for r in self.retained.match(topic_filter):
                session.deliver(Message(r.topic, r.payload, r.qos, True), min(r.qos, granted), retain=True)

    def _unsubscribe(self, conn, pkt: Unsubscribe) -> None:
        session: Session = conn.session
        for topic_filter in pkt.topics:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self.tree.unsubscribe(session, topic_filter)
        conn.send(encode(Unsuback(pkt.packet_id)))  # even if nothing matched [MQTT-3.10.4-5]

    # statistics ------------------------------------------------------------------------------

    def sys_topics(self) -> dict[str, str]:
        """$SYS/broker/... values with Mosquitto's topic names."""
        s = self.stats
        total = len(self.sessions)
        return {
            "$SYS/broker/version": VERSION,
            "$SYS/broker/uptime": f"{int(self.clock() - self.started)} seconds",
            "$SYS/broker/clients/connected": str(self.connected),
            "$SYS/broker/clients/active": str(self.connected),
            "$SYS/broker/clients/disconnected": str(total - self.connected),
            "$SYS/broker/clients/total": str(total),
            "$SYS/broker/clients/maximum": str(s.clients_maximum),
            "$SYS/broker/messages/received": str(s.messages_received),
            "$SYS/broker/messages/sent": str(s.messages_sent),
            "$SYS/broker/publish/messages/received": str(s.publish_received),
            "$SYS/broker/publish/messages/sent": str(s.publish_sent),
            "$SYS/broker/publish/messages/dropped": str(s.publish_dropped),
            "$SYS/broker/bytes/received": str(s.bytes_received),
            "$SYS/broker/bytes/sent": str(s.bytes_sent),
            "$SYS/broker/retained messages/count": str(len(self.retained)),
            "$SYS/broker/subscriptions/count": str(len(self.tree)),
            "$SYS/broker/store/messages/count": str(sum(x.pending() for x in self.sessions.values())),
        }

    def publish_sys(self) -> None:
        for topic, value in self.sys_topics().items():
            self.publish(Message(topic, value.encode(), 0, True))

    def summary(self) -> str:
        s = self.stats
        return (f"clients={self.connected} sessions={len(self.sessions)} msgs_in={s.publish_received} "
                f"msgs_out={s.publish_sent} dropped={s.publish_dropped} retained={len(self.retained)}")


__all__ = ["Broker", "Limits", "Message", "Stats", "Will"]
