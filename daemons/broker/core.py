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

Flow control, not loss (`queue_full = "block"`, the default): a QoS 1/2 PUBLISH is accepted
only if every session owed it at QoS 1/2 can take it (`Session.can_take`). Otherwise
`handle()` returns False and acknowledges nothing: the transport holds that PUBLISH, and what
the client sends after it, and stops reading from it once it holds too much, so TCP pushes
back on the publisher. The connection waits in each full session's `waiters`; an
acknowledgement that frees room there calls its `retry_held()`, and the transport hands the
held packets in again, in order. A publisher is only held by the subscribers of what it
publishes: others, on other topics, go on. With `queue_full = "drop"` the message is
acknowledged and dropped for a full session, counted (Mosquitto's behaviour).

Limits against hostile or broken clients (`Limits`, from [broker] in the config) are checked
before any state grows: a filter deeper than `max_topic_levels`, or a new filter past
`max_subscriptions_per_client`, gets SUBACK 0x80 and never reaches the tree; a PUBLISH (or a
will) on a deeper topic closes its connection before routing; a retained message that would
take the store past `max_retained_messages`/`max_retained_bytes` is delivered but not
retained; `expire_sessions()` (the server calls it once a second) removes persistent sessions
whose client has been away longer than `persistent_client_expiration`. Each refusal is
counted in `Stats` ($SYS/broker/limits/...) and logged by `limit_hit()`, the first and then
one line per 1000 of each kind, so a hostile client cannot flood the journal either.
Persistence (store.py, `[broker] persistence`): a persistent session's subscriptions, its
queued and in-flight QoS 1/2 messages and its QoS 2 receive state are written to the store,
and so are retained messages. An acknowledgement that depends on a write (the PUBACK of a
message queued for a persistent session, a SUBACK) goes out through `store.ack()`, which sends
it once that write is committed. With a store, a persistent session's queue continues on disk
past `max_queued_messages`/`max_queued_bytes` (the memory bound) until the store's quota, and
only then does flow control begin.

Shared subscriptions (`$share/GROUP/FILTER`, shared.py): a group is one subscriber in the
tree; routing resolves it to one member per message (`_routes`), and a member that leaves
hands what it has not acknowledged through that group to another (`_hand_over`).

MQTT 5.0 (v5.py): a v5 connection has its `v5.Client` in `conn.v5` (None for 3.1.1/3.1) and
sends the 5.0 packet classes, each with a handler here beside its 3.1.1 twin; both end in the
same routing. A v5 session's Session Expiry Interval stands for clean session: 0 ends it with
its connection (`Session.clean`), otherwise it outlives the connection that long
(`Session.expiry`, checked by `expire_sessions`; never = persistent_client_expiration, as for
3.1.1). A will with a Will Delay Interval waits in `wills` until it is due, the session ends,
or the client comes back [MQTT-3.1.3-9]. Subscription options other than the QoS live in
`Session.options`, only for the subscriptions that set one, so a session without any costs
routing nothing.
"""

from __future__ import annotations

import fnmatch
import itertools
import time
from dataclasses import dataclass, field

from ..service import Log
from . import v5
from .packets import (
    Connack,
    ConnackCode,
    Connect,
    Disconnect,
    Pingreq,
    Puback,
    Pubcomp,
    SUBACK_FAILURE,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    ReasonCode,
    Will,
    encode,
)
from .packets5 import (
    Auth, ConnectV5, DisconnectV5, PubackV5, PubcompV5, PublishV5, PubrecV5, PubrelV5, SubscribeV5, UnsubscribeV5,
    WillV5,
)
from .retained import RetainedStore
from . import shared
from .sessions import NOTHING, Message, Session
from .shared import Group, InvalidShare
from .topics import SubscriptionTree

VERSION = "iot-broker 0.1.0"
# Client ids of the local sessions of our bridges (bridge.py); no client may take one.
BRIDGE_PREFIX = "$bridge/"
PINGRESP = b"\xd0\x00"


@dataclass(slots=True)
class Stats:
    """Counters behind $SYS/broker/... (Mosquitto's names) and the STATUS= line."""

    messages_received: int = 0  # packets of any type, as Mosquitto counts
    messages_sent: int = 0
    publish_received: int = 0
    publish_sent: int = 0
    # The same two by QoS, indexed 0-2 (Prometheus' iot_broker_messages_*_total{qos}); sent counts
    # each delivery at the QoS it went out with (the lower of the message's and the grant).
    publish_received_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    publish_sent_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    publish_dropped: int = 0
    publish_held: int = 0  # QoS 1/2 PUBLISHes held back (not acknowledged yet) for a full queue
    bytes_received: int = 0
    bytes_sent: int = 0
    connections_total: int = 0
    clients_maximum: int = 0
    # Limits ($SYS/broker/limits/...); the last three are the transport's (server.py).
    topic_levels_refused: int = 0
    subscriptions_refused: int = 0
    retained_refused: int = 0
    sessions_expired: int = 0
    connect_size_refused: int = 0
    connection_rate_refused: int = 0
    write_timeout_closed: int = 0
    # Access control ($SYS/broker/access/...).
    logins_refused: int = 0
    publish_denied: int = 0
    subscribe_denied: int = 0
    share_refused: int = 0  # $share/... filters that are not $share/GROUP/FILTER
    # MQTT 5.0: queued messages whose Message Expiry Interval passed before they could go out,
    # and messages not sent to a client because they exceed its Maximum Packet Size.
    messages_expired: int = 0
    too_large_dropped: int = 0


@dataclass(slots=True)
class Access:
    """Who may connect and what each client may read and write: the password file and ACL
    (auth.py, Mosquitto's formats; None = no such file). Mutable: SIGHUP swaps the files in,
    and every check reads them here, so a right lost on reload is lost from the next packet on."""

    passwords: object | None = None  # auth.PasswordFile
    acl: object | None = None  # auth.Acl
    allow_anonymous: bool = True


@dataclass(frozen=True, slots=True)
class Limits:
    max_inflight: int = 20
    max_queued: int = 100_000
    allow_zero_length_clientid: bool = True
    queue_full: str = "block"  # or "drop"
    max_topic_levels: int = 200
    max_subscriptions: int = 1000  # per session
    max_retained_messages: int = 100_000  # not counting the broker's own $SYS topics
    max_retained_bytes: int = 64 * 1024 * 1024  # topics + payloads
    session_expiry: float = 30 * 86400.0  # seconds a persistent session outlives its client; 0 = for ever
    max_queued_bytes: int = 0  # 0: no bound by bytes
    inflight_per_client: tuple[tuple[str, int], ...] = ()  # (fnmatch pattern, window)
    max_topic_alias: int = 10  # Topic Alias Maximum we give v5 clients
    max_packet_size: int = 0  # the largest packet we take (v5 CONNACK Maximum Packet Size); 0: not said
    max_keepalive: int = 0  # v5 clients asking for more (or none) get this Server Keep Alive; 0: no limit

    def inflight_for(self, client_id: str) -> int:
        for pattern, window in self.inflight_per_client:
            if fnmatch.fnmatchcase(client_id, pattern):
                return window
        return self.max_inflight


class NoStore:
    """Persistence off: acknowledgements go out at once, nothing is written."""

    bytes = 0

    def ack(self, conn, data: bytes, durable: bool, then=None) -> None:
        conn.send(data)
        if then is not None:
            then()

    def mark(self) -> int:
        return 0

    def retain(self, topic: str, payload: bytes, qos: int, props: bytes = b"", expires: float | None = None) -> None:
        pass


class Broker(v5.Handlers):
    def __init__(self, log: Log, limits: Limits = Limits(), clock=time.monotonic, store=None,
                 access: Access | None = None):
        self.log = log
        self.limits = limits
        self.access = access if access is not None else Access()
        self.store = store if store is not None else NoStore()
        self.persist = store is not None
        if store is not None:
            store.on_room = self.wake_all
        self.sessions: dict[str, Session] = {}
        self.tree = SubscriptionTree()
        self.groups: dict[tuple[str, str], Group] = {}  # (GROUP, FILTER) -> its members
        self.shared_count = 0  # memberships, over all groups
        self.retained = RetainedStore()
        self.stats = Stats()
        self.connected = 0
        self.started = clock()
        self.clock = clock
        self._auto_id = itertools.count(1)
        self._limit_lines: dict[str, int] = {}  # limit_hit() calls per log message
        self.bridges: list = []  # bridge.Bridge, set by the server: in $SYS and the summary
        # Wills waiting for their Will Delay Interval: client id -> (due, session, will).
        self.wills: dict[str, tuple[float, Session, WillV5]] = {}
        self._handlers = {
            Publish: self._publish,
            Puback: self._puback,
            Pubrec: lambda conn, p: conn.session.pubrec(p.packet_id),
            Pubrel: self._pubrel,
            Pubcomp: self._pubcomp,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
            Pingreq: lambda conn, p: conn.send(PINGRESP),
            Disconnect: self._disconnect,
            PublishV5: self._publish_v5,
            PubackV5: self._puback,
            PubrecV5: self._pubrec_v5,
            PubrelV5: self._pubrel,
            PubcompV5: self._pubcomp,
            SubscribeV5: self._subscribe_v5,
            UnsubscribeV5: self._unsubscribe_v5,
            DisconnectV5: self._disconnect_v5,
            # Only reaches us after a CONNECT with an Authentication Method, which is refused.
            Auth: lambda conn, p: self._protocol_error(conn, ReasonCode.PROTOCOL_ERROR, "AUTH is not supported"),
        }

    # connect / close -------------------------------------------------------------------------

    def connect(self, conn, pkt: Connect | ConnectV5) -> bool:
        """Answer CONNECT. Returns False when refused (the CONNACK says why; caller closes)."""
        client = conn.v5 = None
        if type(pkt) is ConnectV5:
            client = conn.v5 = v5.Client(pkt.properties, self.limits.max_topic_alias, self.clock)
            if pkt.properties.authentication_method is not None:  # we support no method (section 4.12)
                return self._refuse(conn, ReasonCode.BAD_AUTHENTICATION_METHOD,
                                    f"authentication method {pkt.properties.authentication_method!r} is not supported")
            clean_start, expiry = pkt.clean_start, pkt.properties.session_expiry_interval or 0
            ends = expiry == 0  # Session Expiry Interval 0: the session ends with the connection
        else:
            clean_start, expiry, ends = pkt.clean_session, None, pkt.clean_session
        if pkt.will is not None and self._too_deep(pkt.will.topic):
            self.limit_hit("topic_levels_refused", "will topic has too many levels; closing connection",
                           client=pkt.client_id, levels=pkt.will.topic.count("/") + 1,
                           max_topic_levels=self.limits.max_topic_levels)
            if client is not None:
                return self._refuse(conn, ReasonCode.TOPIC_NAME_INVALID, "will topic has too many levels")
            return False  # a protocol matter, not one a 3.1.1 CONNACK code names: closed without one
        client_id = pkt.client_id
        if client_id.startswith(BRIDGE_PREFIX):  # our bridges' own sessions
            return self._refuse(conn, ConnackCode.IDENTIFIER_REJECTED, "client id prefix $bridge/ is reserved")
        assigned = False
        if not client_id:
            # A 3.1.1 server-assigned id only makes sense for a session that ends with the
            # connection; a v5 client learns its id from the CONNACK [MQTT-3.2.2-16].
            if (not ends and client is None) or not self.limits.allow_zero_length_clientid:
                return self._refuse(conn, ConnackCode.IDENTIFIER_REJECTED, "empty client id")  # [MQTT-3.1.3-8]
            client_id = f"auto-{next(self._auto_id)}-{id(conn):x}"  # [MQTT-3.1.3-6]
            assigned = True
        code, username = self._login(conn, pkt, client_id)
        if code is not None:
            return self._refuse(conn, code, "not authorized" if code == ConnackCode.NOT_AUTHORIZED
                                else "bad user name or password")

        session = self.sessions.get(client_id)
        if session is not None and session.conn is not None:
            old = session.conn
            self.log.info("session taken over", client=client_id)
            if old.v5 is not None:
                old.send(v5.disconnect_bytes(ReasonCode.SESSION_TAKEN_OVER, "another connection took the session over"))
            self._end_connection(old, graceful=False)  # publishes the old connection's will
            old.close()
            session = self.sessions.get(client_id)  # a clean session ended with its connection
        delayed = self.wills.pop(client_id, None)  # back before its will was due [MQTT-3.1.3-9]
        if session is not None and clean_start:
            self._drop_session(session)
            session = None
            if delayed is not None:  # its session ends here: the will goes now
                self._will(delayed[1], delayed[2])
        present = session is not None
        if session is None:
            session = self._new_session(client_id, ends)
            if self.persist and not ends:
                session.store = self.store
                session.sid = self.store.new_session()
        session.clean = ends
        session.expiry = expiry
        session.username = username
        session.no_local = getattr(pkt, "bridge", False)
        window = self.limits.inflight_for(client_id)
        # The client's Receive Maximum bounds our window to it [MQTT-3.3.4-9].
        session.max_inflight = window if client is None else min(window, client.receive_maximum)
        session.attach(conn)
        if session.sid is not None:
            self.store.save_session(session)
        conn.session = session
        conn.will = pkt.will
        conn.keepalive = pkt.keep_alive
        self.connected += 1
        self.stats.connections_total += 1
        self.stats.clients_maximum = max(self.stats.clients_maximum, self.connected)
        if client is None:
            # MQTT 3.1 has no session present flag: that byte is reserved there and must stay 0.
            conn.send(encode(Connack(present and pkt.protocol_level >= 4, ConnackCode.ACCEPTED)))
        else:
            conn.send(self._connack_v5(conn, pkt, present, client_id if assigned else None, window))
        if present:
            session.resume()
        if self.groups:
            self._gather(session)
        return True

    def _refuse(self, conn, code, text: str) -> bool:
        """A refusing CONNACK in the client's protocol: `code` a 3.1.1 one or a 5.0 reason code."""
        if conn.v5 is None:
            conn.send(encode(Connack(False, code)))
        else:
            conn.send(v5.connack(False, v5.CONNACK_REASON.get(code, code), text))
        return False

    def closed(self, conn, graceful: bool) -> None:
        """The connection is gone. Publishes the will unless the client said DISCONNECT."""
        if getattr(conn, "session", None) is not None:
            self._end_connection(conn, graceful)

    def _end_connection(self, conn, graceful: bool) -> None:
        session: Session = conn.session
        conn.session = None
        self.connected -= 1
        session.detach(self.clock())
        if not session.clean:
            for g in self._groups_of(session):  # a clean session hands over as it is dropped below
                self._hand_over(session, g, online_only=True)
        if session.sid is not None and not session.clean:
            self.store.save_session(session)
        will, conn.will = conn.will, None
        if session.clean:
            self._drop_session(session)
        if will is not None and not graceful:
            delay = will.properties.will_delay_interval if type(will) is WillV5 else None
            if delay and not session.clean:
                self.wills[session.client_id] = (self.clock() + delay, session, will)
            else:
                self._will(session, will)

    def _will(self, session: Session, will: Will | WillV5) -> None:
        if self._may_publish(session, will.topic, "will"):
            msg = Message(will.topic, will.payload, will.qos, will.retain)
            if type(will) is WillV5:
                v5.carry(msg, will.properties, self.clock())
            self.publish(msg)

    def _drop_session(self, session: Session) -> None:
        for f in session.subscriptions:
            self._remove_subscription(session, f)
        session.subscriptions.clear()
        session.options.clear()
        if session.sid is not None:
            self.store.drop_session(session.sid, session.stored_bytes)
            session.store = session.sid = None
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def _disconnect(self, conn, pkt: Disconnect) -> None:
        conn.will = None  # [MQTT-3.1.2-10]: a DISCONNECT discards the will
        self._end_connection(conn, graceful=True)
        conn.close()

    # packets ---------------------------------------------------------------------------------

    def handle(self, conn, pkt) -> bool:
        """Handle one packet. False: a PUBLISH that cannot be taken yet (see flow control); the
        caller holds it, hands it in again after `conn.retry_held()`, and it is counted then."""
        if self._handlers[type(pkt)](conn, pkt) is False:
            return False
        self.stats.messages_received += 1
        return True

    def _publish(self, conn, pkt: Publish | PublishV5, client: v5.Client | None = None) -> bool:
        if self._too_deep(pkt.topic):
            self.limit_hit("topic_levels_refused", "topic has too many levels; closing connection",
                           client=conn.session.client_id, levels=pkt.topic.count("/") + 1,
                           max_topic_levels=self.limits.max_topic_levels)
            v5.disconnect(conn, ReasonCode.TOPIC_NAME_INVALID, "topic has too many levels")
            return True
        qos = pkt.qos
        session: Session = conn.session
        if qos == 2 and pkt.packet_id in session.incoming_qos2:
            conn.send(b"\x50\x02" + pkt.packet_id.to_bytes(2, "big"))  # PUBREC again, not routed again
            return True
        routed = self._may_publish(session, pkt.topic, "PUBLISH")  # denied: acknowledged, dropped
        if routed:
            # A bridge's message never goes back over it (no_local): no loops.
            routes = self._routes(pkt.topic, qos, session if session.no_local else None)
            if qos and self.limits.queue_full == "block" and not self._room(conn, routes):
                return False
        self.stats.publish_received += 1
        self.stats.publish_received_qos[qos] += 1
        store = self.store
        mark = store.mark()
        if qos == 2 and (routed or client is None):  # a v5 refusal (0x87) ends the exchange
            if session.incoming_qos2 is NOTHING:
                session.incoming_qos2 = set()
            session.incoming_qos2.add(pkt.packet_id)
            if session.sid is not None:
                store.qos2_in(session.sid, pkt.packet_id, True)
        if routed:
            msg = Message(pkt.topic, pkt.payload, qos, pkt.retain)
            if client is not None:
                v5.carry(msg, pkt.properties, self.clock())
            self.publish(msg, routes, session)
        if qos:
            if client is None:
                data = (b"\x40\x02" if qos == 1 else b"\x50\x02") + pkt.packet_id.to_bytes(2, "big")
            else:
                code = (0 if routes else ReasonCode.NO_MATCHING_SUBSCRIBERS) if routed else ReasonCode.NOT_AUTHORIZED
                data = v5.ack(0x40 if qos == 1 else 0x50, pkt.packet_id, code, client,
                              None if routed else "not authorized to publish to this topic")
            # Acknowledged once what it wrote to the store is on disk [store.py].
            store.ack(conn, data, store.mark() != mark)
        return True

    def _room(self, conn, routes: list) -> bool:
        """Can every session owed this message at QoS 1/2 take it? If not, `conn` waits on
        each full one (for a group where no member can, on every member)."""
        full = []
        for s, granted, group in routes:
            if s is None:
                full.extend(group.members)
            elif granted and not s.can_take():
                full.append(s)
        if not full:
            return True
        for s in full:
            if s.waiters is NOTHING:
                s.waiters = set()
            s.waiters.add(conn)
        before = self.stats.publish_held
        self.stats.publish_held += 1
        if before % 1000 == 0:  # the first and one line per 1000: a stuck consumer cannot flood the log
            self.log.warning("publisher held back: a subscriber's queue is full (queue_full = block)",
                             client=conn.session.client_id, waiting_for=full[0].client_id,
                             queued=len(full[0].queue), held_total=self.stats.publish_held)
        return False

    def _puback(self, conn, pkt: Puback) -> None:
        session: Session = conn.session
        session.puback(pkt.packet_id)
        if session.waiters:
            self._wake(session)

    def _pubcomp(self, conn, pkt: Pubcomp) -> None:
        session: Session = conn.session
        session.pubcomp(pkt.packet_id)
        if session.waiters:
            self._wake(session)

    def wake_all(self) -> None:
        for session in self.sessions.values():
            if session.waiters:
                self._wake(session)

    def _wake(self, session: Session) -> None:
        if session.room_to_wake():
            waiters, session.waiters = session.waiters, NOTHING
            for conn in waiters:
                conn.retry_held()

    def _pubrel(self, conn, pkt: Pubrel) -> None:
        session: Session = conn.session
        known = pkt.packet_id in session.incoming_qos2
        durable = known and session.sid is not None
        if known:
            session.incoming_qos2.remove(pkt.packet_id)
        if durable:
            # Not forgotten on disk before PUBCOMP: a restart could take a new PUBLISH reusing
            # the id for a retransmission and not route it.
            self.store.qos2_in(session.sid, pkt.packet_id, False)
        if known or type(pkt) is Pubrel:
            data = b"\x70\x02" + pkt.packet_id.to_bytes(2, "big")  # 3.1.1: even for an unknown id
        else:
            data = v5.ack(0x70, pkt.packet_id, ReasonCode.PACKET_IDENTIFIER_NOT_FOUND, conn.v5)
        self.store.ack(conn, data, durable)

    def publish(self, msg: Message, routes: list | None = None, origin: Session | None = None) -> None:
        """Store if retained, then deliver to every matching session once (and to one member
        of each matching group). `origin`: the publisher's session, for No Local."""
        if msg.retain:
            self._retain(msg)
        sent = dropped = 0
        by_qos = self.stats.publish_sent_qos
        if routes is None:
            routes = self._routes(msg.topic, msg.qos)
        for session, q, group in routes:
            # A bridge gets the retain flag as published (Mosquitto's bridges keep it).
            retain = msg.retain and session is not None and session.no_local
            if session is not None and session.options:
                as_published = v5.route(session, msg.topic, session is origin)
                if as_published is None:
                    continue  # No Local: its own message, matching no other subscription of it
                retain = retain or (as_published and msg.retain)
            if session is not None and session.deliver(msg, q, retain, group=group):
                sent += 1
                by_qos[q] += 1
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

    def _check_filter(self, session: Session, topic_filter: str) -> tuple[ReasonCode | None, tuple | None]:
        """(None, its share or None) when `session` may subscribe to `topic_filter`, else (the
        5.0 reason code refusing it, None); checked before the tree is touched."""
        refused = self._may_subscribe(session, topic_filter)
        if refused is not None:
            return refused, None
        try:
            share = shared.parse(topic_filter)
        except InvalidShare as e:
            self.limit_hit("share_refused", "subscription refused: invalid shared subscription",
                           client=session.client_id, filter=topic_filter, reason=str(e))
            return ReasonCode.TOPIC_FILTER_INVALID, None
        acl = self.access.acl
        checked = topic_filter if share is None else share[1]  # a group is no right of its own
        if acl is not None and not acl.can_subscribe(session.client_id, session.username, checked):
            self.limit_hit("subscribe_denied", "denied SUBSCRIBE", client=session.client_id,
                           user=session.username or "-", filter=topic_filter)
            return ReasonCode.NOT_AUTHORIZED, None
        return None, share

    def _subscribe(self, conn, pkt: Subscribe) -> None:
        session: Session = conn.session
        codes = []
        accepted = []
        for topic_filter, qos in pkt.topics:
            refused, share = self._check_filter(session, topic_filter)
            if refused is not None:
                codes.append(SUBACK_FAILURE)  # the others of this SUBSCRIBE are still granted
                continue
            self._add_subscription(session, topic_filter, qos, share)
            session.options.pop(topic_filter, None)  # a 3.1.1 subscription has none
            codes.append(qos)
            if share is None:  # no retained messages on a shared subscription [MQTT-4.8.2]
                accepted.append((topic_filter, qos))
        self._save_subscriptions(session)
        # Retained messages follow the SUBACK, also when it waits for the store's commit.
        self.store.ack(conn, encode(Suback(pkt.packet_id, tuple(codes))), session.sid is not None,
                       (lambda: self._send_retained(session, accepted)) if accepted else None)

    def _send_retained(self, session: Session, accepted: list[tuple[str, int]]) -> None:
        """Retained messages follow the SUBACK, with the retain flag set [MQTT-3.3.1-6, -8]."""
        acl = self.access.acl
        now = self.clock()
        for (topic_filter, granted) in accepted:
            for r in self.retained.match(topic_filter):
                if acl is not None and not acl.can_read(session.client_id, session.username, r.topic):
                    continue
                if r.expires is not None and r.expires <= now:  # expired: gone [MQTT-3.3.2-5]
                    self.retained.set(r.topic, b"", 0)
                    self.store.retain(r.topic, b"", 0)
                    self.stats.messages_expired += 1
                    continue
                msg = Message(r.topic, r.payload, r.qos, True)
                msg.props, msg.expires = r.props, r.expires
                session.deliver(msg, min(r.qos, granted), retain=True)

    def _unsubscribe(self, conn, pkt: Unsubscribe) -> None:
        session: Session = conn.session
        for topic_filter in pkt.topics:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self._remove_subscription(session, topic_filter)
                session.options.pop(topic_filter, None)
        self._save_subscriptions(session)
        self.store.ack(conn, encode(Unsuback(pkt.packet_id)), session.sid is not None)  # even if nothing matched [MQTT-3.10.4-5]

    def _save_subscriptions(self, session: Session) -> None:
        if session.sid is not None:
            self.store.save_session(session)

    def _add_subscription(self, session: Session, topic_filter: str, qos: int,
                          share: tuple[str, str] | None) -> None:
        if share is None:
            self.tree.subscribe(session, topic_filter, qos)
        else:
            group = self.groups.get(share)
            if group is None:
                group = self.groups[share] = Group(*share)
                self.tree.subscribe(group, share[1], 2)  # each member's own QoS applies
            if session not in group.members:
                self.shared_count += 1
            group.members[session] = qos
        session.set_subscription(topic_filter, qos)

    def _remove_subscription(self, session: Session, topic_filter: str) -> None:
        """Out of the tree or its group; a member leaving a group hands over what it has not
        acknowledged through it. (The caller removes it from session.subscriptions.)"""
        share = shared.parse(topic_filter)  # a stored filter was checked when it was added
        if share is None:
            self.tree.unsubscribe(session, topic_filter)
            return
        group = self.groups.get(share)
        if group is None or group.members.pop(session, None) is None:
            return
        self.shared_count -= 1
        self._hand_over(session, group, online_only=False)
        if not group.members:
            self.tree.unsubscribe(group, share[1])
            del self.groups[share]

    def _groups_of(self, session: Session) -> list[Group]:
        return [self.groups[share] for f in session.subscriptions
                if (share := shared.parse(f)) is not None and share in self.groups]

    def _hand_over(self, session: Session, group: Group, online_only: bool) -> None:
        """Give `session`'s unacknowledged messages from `group` to other members. A member
        that is only away (`online_only`) keeps them unless another member is connected; one
        that left the group gives them to any member, past its queue bound if it must (they
        were acknowledged to their publishers already)."""
        others = [s for s in group.members if s is not session and (s.conn is not None or not online_only)]
        if not others:
            return
        taken = session.take_back(group)
        acl = self.access.acl
        for msg, qos, g in taken:
            allowed = None if acl is None else (lambda s, t=msg.topic: acl.can_read(s.client_id, s.username, t))
            member, granted = g.pick(qos, allowed, exclude=session)
            if member is None or (online_only and member.conn is None):
                member = others[0]
                granted = min(qos, group.members[member])
            member.deliver(msg, granted, group=g, force=True)
        if taken:
            self.log.info("shared subscription: unacknowledged messages handed to other members",
                          client=session.client_id, group=group.name, filter=group.topic_filter,
                          messages=len(taken))

    def _gather(self, session: Session) -> None:
        """`session` is connected: messages its groups queued at members that are away (no
        member was connected then) come to the connected ones."""
        for g in self._groups_of(session):
            for other in list(g.members):
                if other.conn is None and other.pending():
                    self._hand_over(other, g, online_only=True)

    def _routes(self, topic: str, qos: int, origin: Session | None = None) -> list[tuple[Session | None, int, Group | None]]:
        """(session, QoS it gets, group or None) for each subscriber owed a message on `topic`
        at `qos` whose client may read it: every matching session but `origin`, and one member
        of each matching group; (None, qos, group) when no member of a group can take it now.
        Our bridges' sessions read what the operator's topic lines say, not what the ACL does."""
        acl = self.access.acl
        routes = []
        for sub, granted in self.tree.match(topic).items():
            if sub is origin:
                continue
            if type(sub) is Group:
                allowed = None if acl is None else (lambda s: acl.can_read(s.client_id, s.username, topic))
                member, granted = sub.pick(qos, allowed)
                if member is not None:
                    routes.append((member, granted, sub))
                elif qos and any(s.conn is not None or not s.clean for s in sub.members):
                    routes.append((None, qos, sub))
            elif acl is None or sub.client_id.startswith(BRIDGE_PREFIX) or acl.can_read(sub.client_id, sub.username,
                                                                                           topic):
                routes.append((sub, granted if granted < qos else qos, None))
        return routes

    # sessions ------------------------------------------------------------------------------

    def _new_session(self, client_id: str, clean: bool) -> Session:
        lim = self.limits
        session = Session(client_id, clean, lim.inflight_for(client_id), lim.max_queued, lim.max_queued_bytes)
        session.clock, session.stats = self.clock, self.stats
        self.sessions[client_id] = session
        return session

    def restore(self, loaded) -> None:
        """Take what the store read at start (store.Loaded): persistent sessions with their
        subscriptions and queues, and retained messages."""
        for s in loaded.sessions:
            session = self._new_session(s.client_id, False)
            session.restore(self.store, s.sid, s.rows, s.on_disk, s.stored_bytes)
            session.incoming_qos2 = s.qos2_in
            session.username = s.username
            session.disconnected_at = s.disconnected_at or self.clock()
            session.expiry = s.expiry
            for topic_filter, qos in s.subscriptions.items():
                self._add_subscription(session, topic_filter, qos, shared.parse(topic_filter))
            for topic_filter, (no_local, as_published, ident) in s.options.items():
                session.set_options(topic_filter, v5.SubOptions(bool(no_local), bool(as_published), ident))
        for topic, payload, qos, props, expires in loaded.retained:
            self.retained.set(topic, payload, qos, bytes(props) if props else b"", expires)

    # bridges (bridge.py) ------------------------------------------------------------------------

    def bridge_session(self, name: str, filters: dict[str, int]) -> Session:
        """The local session of bridge `name`, persistent (its queue for the remote is in the
        store), subscribed to exactly `filters`. A filter it already had keeps its place and
        gets no retained messages again, so a restart does not resend them upstream."""
        client_id = BRIDGE_PREFIX + name
        session = self.sessions.get(client_id) or self._new_session(client_id, False)
        session.no_local = True
        if self.persist and session.sid is None:
            session.store = self.store
            session.sid = self.store.new_session()
        for f in [f for f in session.subscriptions if f not in filters]:
            del session.subscriptions[f]
            self.tree.unsubscribe(session, f)
        new = [f for f in filters if f not in session.subscriptions]
        for f, qos in filters.items():
            self.tree.subscribe(session, f, qos)
            session.set_subscription(f, qos)
        session.disconnected_at = session.disconnected_at or self.clock()
        self._save_subscriptions(session)
        for f in new:
            for r in self.retained.match(f):
                session.deliver(Message(r.topic, r.payload, r.qos, True), min(r.qos, filters[f]), retain=True)
        return session

    def bridge_attach(self, session: Session, link) -> None:
        """The remote is connected: what waits for it goes out, unacknowledged ones first."""
        link.session = session
        session.attach(link)
        self._save_subscriptions(session)
        session.resume()

    def bridge_detach(self, session: Session, link) -> None:
        if session.conn is link:
            session.detach(self.clock())
            self._save_subscriptions(session)
        link.session = None
        if session.waiters:
            self._wake(session)

    # access ----------------------------------------------------------------------------------

    def _login(self, conn, pkt: Connect, client_id: str) -> tuple[ConnackCode | None, str | None]:
        """(refusal code or None, the username the client acts as). A client certificate's name
        (a listener with use_identity_as_username) stands for username and password."""
        access = self.access
        cert_name = getattr(conn, "cert_username", None)
        username = cert_name or pkt.username
        anonymous = getattr(conn, "listener_allow_anonymous", None)
        anonymous = access.allow_anonymous if anonymous is None else anonymous
        reason = None
        if username is None:
            if not anonymous:
                reason, code = "anonymous clients are not allowed (allow_anonymous = false)", ConnackCode.NOT_AUTHORIZED
        elif cert_name is None and access.passwords is not None:
            if not access.passwords.check(username, pkt.password or b""):
                reason, code = "bad user name or password", ConnackCode.BAD_USERNAME_OR_PASSWORD
        elif cert_name is None and not anonymous:
            reason, code = "no password_file to check the password against", ConnackCode.NOT_AUTHORIZED
        if reason is None:
            return None, username
        conn.login_refused = True  # the transport slows repeated failures from one address down
        self.stats.logins_refused += 1
        self.log.warning("login refused", client=client_id, user=username or "-", peer=getattr(conn, "peer", "?"),
                         reason=reason, code=int(code))
        return code, None

    def _may_publish(self, session: Session, topic: str, what: str) -> bool:
        """May this client (or its will) publish to `topic`? No client may under $SYS/, and
        `$share/...` names subscriptions, never a topic."""
        acl = self.access.acl
        # Our own bridges' topics are the operator's config, not a client's: no ACL applies.
        if session.no_local and topic.startswith("$SYS/broker/connection/"):
            return True  # a Mosquitto bridge's notification of its own state
        if topic.startswith(("$SYS/", shared.PREFIX)) or (
                acl is not None and not session.client_id.startswith(BRIDGE_PREFIX)
                and not acl.can_write(session.client_id, session.username, topic)):
            self.limit_hit("publish_denied", f"denied {what} from {session.client_id} to {topic}",
                           key=f"denied {what}", client=session.client_id, user=session.username or "-", topic=topic)
            return False
        return True

    # limits ----------------------------------------------------------------------------------

    def limit_hit(self, counter: str, message: str, key: str = "", **fields) -> None:
        """Count one refusal in `Stats.<counter>` and log it: the first and then one line per
        1000 with the same message, so a client that hits a limit in a loop cannot flood the
        log, and one kind of refusal does not hide another counted alike (a filter refused
        for its depth, a connection closed for a topic's)."""
        n = getattr(self.stats, counter) + 1
        setattr(self.stats, counter, n)
        key = key or message  # a message naming a client and topic is rate-limited by its kind
        seen = self._limit_lines[key] = self._limit_lines.get(key, 0) + 1
        if seen % 1000 == 1:
            self.log.warning(message, **fields, **{counter: n})

    def _too_deep(self, topic: str) -> bool:
        limit = self.limits.max_topic_levels
        # A topic has at most len(topic) + 1 levels: the count is skipped for every usual one.
        return len(topic) >= limit and topic.count("/") >= limit

    def _may_subscribe(self, session: Session, topic_filter: str) -> ReasonCode | None:
        """None, or the reason a limit refuses the filter (its 5.0 reason code)."""
        if self._too_deep(topic_filter):
            self.limit_hit("topic_levels_refused", "subscription refused: too many topic levels",
                           client=session.client_id, levels=topic_filter.count("/") + 1,
                           max_topic_levels=self.limits.max_topic_levels)
            return ReasonCode.QUOTA_EXCEEDED
        if topic_filter not in session.subscriptions and len(session.subscriptions) >= self.limits.max_subscriptions:
            self.limit_hit("subscriptions_refused", "subscription refused: max_subscriptions_per_client reached",
                           client=session.client_id, max_subscriptions_per_client=self.limits.max_subscriptions)
            return ReasonCode.QUOTA_EXCEEDED
        return None

    def _retain(self, msg: Message) -> None:
        """Retain `msg` unless it would take the store past a bound: a new topic past either
        bound, or a bigger payload past the byte bound. Deleting (an empty payload) and the
        broker's own $SYS topics always pass. A refused message is still delivered; the
        topic keeps its previous retained message, if it had one."""
        if msg.payload and not msg.topic.startswith("$SYS/"):
            lim, store = self.limits, self.retained
            count, nbytes = store.usage()
            old = store.get(msg.topic)
            if old is None:
                over = (count >= lim.max_retained_messages
                        or nbytes + len(msg.topic_bytes) + len(msg.payload) > lim.max_retained_bytes)
            else:
                grow = len(msg.payload) - len(old.payload)
                over = grow > 0 and nbytes + grow > lim.max_retained_bytes
            if over:
                self.limit_hit("retained_refused", "retained message not kept: max_retained_messages or "
                               "max_retained_bytes reached (delivered, not retained)", topic=msg.topic,
                               retained=count, retained_bytes=nbytes)
                return
        self.retained.set(msg.topic, msg.payload, msg.qos, msg.props, msg.expires)
        if not msg.topic.startswith("$SYS/"):
            self.store.retain(msg.topic, msg.payload, msg.qos, msg.props, msg.expires)

    def expire_sessions(self, now: float) -> int:
        """Remove every persistent session whose client has been away longer than its Session
        Expiry Interval (v5) or `Limits.session_expiry` (persistent_client_expiration: 3.1.1,
        and v5 sessions that never expire), with its subscriptions and queue, and publish the
        wills that are due. The server calls it once a second with the broker's clock. Returns
        how many sessions expired."""
        default = self.limits.session_expiry
        expired = []
        for s in self.sessions.values():
            if s.conn is None and not s.clean and not s.client_id.startswith(BRIDGE_PREFIX):
                expiry = default if s.expiry is None or s.expiry == v5.NEVER else s.expiry
                if s.disconnected_at is None:
                    s.disconnected_at = now  # never attached since it was made (restored): away from now
                elif expiry and now - s.disconnected_at > expiry:
                    expired.append(s)
        for cid, (due, s, will) in list(self.wills.items()):
            if due <= now or s in expired:  # the session's end publishes it at once [MQTT-3.1.3-9]
                del self.wills[cid]
                self._will(s, will)
        for s in expired:
            queued = s.pending()
            self._drop_session(s)
            s.queue = ()
            s.inflight.clear()
            waiters, s.waiters = s.waiters, NOTHING
            for conn in waiters:  # publishers held for its queue: it is gone, they may go on
                conn.retry_held()
            self.limit_hit("sessions_expired", "persistent session expired: client away longer than "
                           + ("persistent_client_expiration" if s.expiry is None or s.expiry == v5.NEVER
                              else "its Session Expiry Interval"), client=s.client_id,
                           away_s=int(now - s.disconnected_at), dropped_messages=queued)
        return len(expired)

    # statistics ------------------------------------------------------------------------------

    def sys_topics(self) -> dict[str, str]:
        """$SYS/broker/... values with Mosquitto's topic names."""
        s = self.stats
        total = len(self.sessions)
        bridges: dict[str, str] = {}
        for b in self.bridges:
            bridges.update(b.sys_topics())
        return {
            **bridges,
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
            "$SYS/broker/publish/messages/held": str(s.publish_held),
            "$SYS/broker/publish/messages/expired": str(s.messages_expired),
            "$SYS/broker/publish/messages/too_large": str(s.too_large_dropped),
            "$SYS/broker/bytes/received": str(s.bytes_received),
            "$SYS/broker/bytes/sent": str(s.bytes_sent),
            "$SYS/broker/retained messages/count": str(len(self.retained)),
            "$SYS/broker/subscriptions/count": str(len(self.tree) - len(self.groups) + self.shared_count),
            "$SYS/broker/subscriptions/shared/count": str(self.shared_count),
            "$SYS/broker/subscriptions/shared/groups": str(len(self.groups)),
            "$SYS/broker/subscriptions/shared/refused": str(s.share_refused),
            "$SYS/broker/store/messages/count": str(sum(x.pending() for x in self.sessions.values())),
            "$SYS/broker/limits/topic_levels/refused": str(s.topic_levels_refused),
            "$SYS/broker/limits/subscriptions/refused": str(s.subscriptions_refused),
            "$SYS/broker/limits/retained/refused": str(s.retained_refused),
            "$SYS/broker/limits/sessions/expired": str(s.sessions_expired),
            "$SYS/broker/limits/connect_size/refused": str(s.connect_size_refused),
            "$SYS/broker/limits/connection_rate/refused": str(s.connection_rate_refused),
            "$SYS/broker/limits/write_timeout/closed": str(s.write_timeout_closed),
            "$SYS/broker/store/messages/bytes": str(self.store.bytes),
            "$SYS/broker/access/logins/refused": str(s.logins_refused),
            "$SYS/broker/access/publish/denied": str(s.publish_denied),
            "$SYS/broker/access/subscribe/denied": str(s.subscribe_denied),
        }

    def publish_sys(self) -> None:
        for topic, value in self.sys_topics().items():
            self.publish(Message(topic, value.encode(), 0, True))

    def summary(self) -> str:
        s = self.stats
        return (f"clients={self.connected} sessions={len(self.sessions)} msgs_in={s.publish_received} "
                f"msgs_out={s.publish_sent} dropped={s.publish_dropped} held={s.publish_held} "
                f"retained={len(self.retained)} stored_bytes={self.store.bytes}"
                + (" bridges=" + ",".join(b.summary() for b in self.bridges) if self.bridges else ""))


__all__ = ["Broker", "Limits", "Message", "Stats", "Will"]
