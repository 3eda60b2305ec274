"""What an MQTT 5.0 connection adds to a 3.1.1 one in the core: its CONNECT's limits, topic
aliases both ways, the properties a message carries on, and reason codes on the wire.

Theory of operation
===================

The core keeps one path for every protocol version; a v5 connection has a `Client` in
`conn.v5` (None for 3.1.1 and 3.1), and its session holds the same object while attached, so
`Session` encodes each PUBLISH to it with `Client.publish` instead of the 3.1.1 encoder.

A `Message` published by a v5 client carries the properties that pass through to v5
subscribers unchanged (Payload Format Indicator, Content Type, Response Topic, Correlation
Data, User Properties; section 3.3.2.3) as their encoded bytes, made once (`carry`), and the
absolute time its Message Expiry Interval ends. Per subscriber only three things differ: the
remaining expiry, a Topic Alias and the Subscription Identifiers of its matching
subscriptions; they are a few bytes put in front of the shared ones. A v3 subscriber gets the
message without properties, a v3 publisher's message reaches v5 subscribers with none.

`Handlers` holds the core's handlers of the 5.0 packets that differ from their 3.1.1 twins
(core.Broker inherits them); each ends in the routing the core shares between versions.

Outgoing topic aliases follow the plainest policy: a topic gets the next free alias while the
client's Topic Alias Maximum allows, and keeps it for the connection; past it, topics go out
in full. A packet larger than the client's Maximum Packet Size is not sent: `publish` returns
None and the session treats that message as delivered to this client [MQTT-3.1.2-25].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .packets import ConnackCode, ReasonCode, _varint
from .packets5 import (
    NO_PROPERTIES, ConnackV5, ConnectV5, DisconnectV5, Properties, PublishV5, PubrecV5, SubackV5, SubscribeV5,
    UnsubackV5, UnsubscribeV5, encode, encode_properties, encode_publish_v5,
)
from .topics import matches

R = ReasonCode
NEVER = 0xFFFF_FFFF  # Session Expiry Interval: the session does not expire (section 3.1.2.11.2)

# The 3.1.1 CONNACK refusals the core decides, in 5.0's words (section 3.2.2.2).
CONNACK_REASON = {
    ConnackCode.IDENTIFIER_REJECTED: R.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackCode.BAD_USERNAME_OR_PASSWORD: R.BAD_USER_NAME_OR_PASSWORD,
    ConnackCode.NOT_AUTHORIZED: R.NOT_AUTHORIZED,
    ConnackCode.SERVER_UNAVAILABLE: R.SERVER_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class SubOptions:
    """A v5 subscription's options beyond its QoS (section 3.8.3.1), kept only when one is set."""

    no_local: bool = False
    retain_as_published: bool = False
    identifier: int | None = None


def _block_body(raw: bytes) -> bytes:
    """A property block without its length prefix."""
    i = 0
    while raw[i] & 0x80:
        i += 1
    return raw[i + 1:]


def carry(msg, props: Properties, now: float) -> None:
    """Give `msg` what its publisher's properties pass on to subscribers."""
    if props is NO_PROPERTIES:
        return
    kept = Properties(payload_format_indicator=props.payload_format_indicator, content_type=props.content_type,
                      response_topic=props.response_topic, correlation_data=props.correlation_data,
                      user_properties=props.user_properties)
    if kept != NO_PROPERTIES:
        msg.props = _block_body(encode_properties(kept, "PUBLISH"))
    if props.message_expiry_interval is not None:
        msg.expires = now + props.message_expiry_interval


class Client:
    """One v5 connection: what its CONNECT asked for, and its topic alias maps."""

    __slots__ = ("receive_maximum", "max_packet", "alias_max", "aliases_out", "aliases_in", "problem_info",
                 "our_alias_max", "clock", "too_large")

    def __init__(self, props: Properties, our_alias_max: int, clock):
        self.receive_maximum = props.receive_maximum or 65535
        self.max_packet = props.maximum_packet_size or 1 << 62
        self.alias_max = props.topic_alias_maximum or 0  # the client's: for what we send
        self.our_alias_max = our_alias_max  # ours: for what it sends
        self.aliases_out: dict[bytes, int] = {}
        self.aliases_in: dict[int, str] = {}
        self.problem_info = props.request_problem_information != 0
        self.clock = clock
        self.too_large = 0  # messages not sent to it for its Maximum Packet Size

    def topic_for(self, alias: int | None, topic: str) -> str | None:
        """The topic of an incoming PUBLISH, through its Topic Alias; None when the alias is
        out of range or names no topic yet [MQTT-3.3.2-8, -9, -10]."""
        if alias is None:
            return topic
        if alias > self.our_alias_max:
            return None
        if topic:
            self.aliases_in[alias] = topic
            return topic
        return self.aliases_in.get(alias)

    def publish(self, msg, qos: int, retain: bool, dup: bool, pid: int | None, options: dict) -> bytes | None:
        """The PUBLISH of `msg` for this client, or None when it is larger than the client
        takes. `options`: the session's SubOptions by filter, for Subscription Identifiers."""
        head = b""
        if msg.expires is not None:
            head = b"\x02" + max(0, int(msg.expires - self.clock() + 0.999)).to_bytes(4, "big")
        topic = msg.topic_bytes
        new_alias = False
        if self.alias_max:
            alias = self.aliases_out.get(topic)
            if alias is not None:
                head += b"\x23" + alias.to_bytes(2, "big")
                topic = b""
            elif len(self.aliases_out) < self.alias_max:
                alias = self.aliases_out[topic] = len(self.aliases_out) + 1
                head += b"\x23" + alias.to_bytes(2, "big")
                new_alias = True
        if options:
            for f, o in options.items():
                if o.identifier is not None and matches(f.split("/", 2)[2] if f.startswith("$share/") else f,
                                                         msg.topic):
                    head += b"\x0b" + _varint(o.identifier)
        body = head + msg.props if head else msg.props
        if not body and qos == 0 and not retain and topic is msg.topic_bytes:
            data = msg.qos0_v5_bytes()
        else:
            data = encode_publish_v5(topic, msg.payload, qos, retain, dup, pid, _varint(len(body)) + body)
        if len(data) > self.max_packet:
            if new_alias:  # the client never learnt it
                del self.aliases_out[topic]
            self.too_large += 1
            return None
        return data


def route(session, topic: str, own: bool) -> bool | None:
    """For a session with subscription options, a message on `topic` (`own`: it published it):
    None when No Local keeps it from the session (every matching subscription has it)
    [MQTT-3.8.3-3]; else whether a matching subscription has Retain As Published
    [MQTT-3.3.1-12]. Scans the session's own filters: only sessions with options pay it."""
    as_published, wanted = False, not own
    options = session.options
    for f in session.subscriptions:
        if not matches(f.split("/", 2)[2] if f.startswith("$share/") else f, topic):
            continue
        o = options.get(f)
        if o is None:
            wanted = True
            continue
        wanted = wanted or not o.no_local
        as_published = as_published or o.retain_as_published
    return as_published if wanted else None


def connack(present: bool, code: ReasonCode = R.SUCCESS, text: str | None = None, **props) -> bytes:
    if text is not None:
        props["reason_string"] = text
    return encode(ConnackV5(present, code, Properties(**props) if props else NO_PROPERTIES))


def disconnect_bytes(code: ReasonCode, text: str | None) -> bytes:
    """A server's DISCONNECT; a Reason String is allowed even without Request Problem
    Information (section 3.1.2.11.7)."""
    return encode(DisconnectV5(code, Properties(reason_string=text) if text else NO_PROPERTIES))


def disconnect(conn, code: ReasonCode, text: str | None = None) -> None:
    """Tell a v5 client why it is closed (section 4.13), then close; a v3 client is closed."""
    client = getattr(conn, "v5", None)
    if client is not None and conn.session is not None and not getattr(conn, "closing", False):
        conn.send(disconnect_bytes(code, text))
    conn.close()


def ack(first: int, pid: int, code: int, client: Client, text: str | None = None) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP with a reason code, in the short form when it is Success."""
    if not code:
        return bytes((first, 2)) + pid.to_bytes(2, "big")
    if text and client.problem_info:
        raw = encode_properties(Properties(reason_string=text), "PUBACK")
        body = pid.to_bytes(2, "big") + bytes((code,)) + raw
        return bytes((first,)) + _varint(len(body)) + body
    return bytes((first, 3)) + pid.to_bytes(2, "big") + bytes((code,))


class Handlers:
    """The 5.0 side of core.Broker (see there): it uses the broker's limits, store, stats and
    shared helpers (`_publish`, `_end_connection`, `_check_filter`, ...)."""

    def _connack_v5(self, conn, pkt: ConnectV5, present: bool, assigned: str | None, window: int) -> bytes:
        """The accepting CONNACK: what this server does not do as a client assumes (section 3.2.2.3)."""
        lim = self.limits
        props = dict(receive_maximum=window, topic_alias_maximum=lim.max_topic_alias or None,
                     assigned_client_identifier=assigned, retain_available=1, wildcard_subscription_available=1,
                     subscription_identifier_available=1, shared_subscription_available=1)
        if lim.max_packet_size:
            props["maximum_packet_size"] = lim.max_packet_size
        if lim.max_keepalive and not 0 < pkt.keep_alive <= lim.max_keepalive:
            conn.keepalive = props["server_keep_alive"] = lim.max_keepalive  # [MQTT-3.1.2-21]
        return connack(present, **props)

    def _protocol_error(self, conn, code: ReasonCode, text: str) -> None:
        """A v5 client broke a rule the core checks: DISCONNECT with the reason, then close."""
        self.log.info("protocol error; closing connection", client=conn.session.client_id, error=text,
                      reason=f"{int(code):#04x}")
        disconnect(conn, code, text)

    def _disconnect_v5(self, conn, pkt: DisconnectV5) -> None:
        session = conn.session
        expiry = pkt.properties.session_expiry_interval
        if expiry is not None:  # from 0 to more was refused by the reader (section 3.14.2.2.2)
            session.expiry, session.clean = expiry, expiry == 0
        if pkt.reason_code == R.NORMAL_DISCONNECTION:
            conn.will = None  # any other reason, 0x04 among them, publishes it [MQTT-3.1.2-10]
        self._end_connection(conn, graceful=conn.will is None)
        conn.close()

    def _publish_v5(self, conn, pkt: PublishV5) -> bool:
        client: Client = conn.v5
        alias = pkt.properties.topic_alias
        topic = client.topic_for(alias, pkt.topic)
        if topic is None:
            if alias > client.our_alias_max:  # 0 is refused by the codec, with 0x94 too
                self._protocol_error(conn, R.TOPIC_ALIAS_INVALID, f"Topic Alias {alias} is above {client.our_alias_max}")
            else:  # an alias with no topic mapped on this connection (section 3.3.2.3.4)
                self._protocol_error(conn, R.PROTOCOL_ERROR, f"Topic Alias {alias} has no topic on this connection")
            return True
        if topic is not pkt.topic:
            pkt = replace(pkt, topic=topic)
        session = conn.session
        if (pkt.qos == 2 and pkt.packet_id not in session.incoming_qos2
                and len(session.incoming_qos2) >= self.limits.inflight_for(session.client_id)):
            self._protocol_error(conn, R.RECEIVE_MAXIMUM_EXCEEDED, "more QoS 2 PUBLISH unacknowledged "
                                 "than the Receive Maximum we gave")  # [MQTT-3.3.4-8]
            return True
        return self._publish(conn, pkt, client)

    def _pubrec_v5(self, conn, pkt: PubrecV5) -> None:
        session = conn.session
        if pkt.reason_code >= 0x80:  # the client refused it: the exchange ends (section 4.3.3)
            session.pubrec_refused(pkt.packet_id)
            if session.waiters:
                self._wake(session)
        else:
            session.pubrec(pkt.packet_id)

    def _subscribe_v5(self, conn, pkt: SubscribeV5) -> None:
        session = conn.session
        ids = pkt.properties.subscription_identifiers
        ident = ids[0] if ids else None
        codes = []
        accepted = []
        for sub in pkt.topics:
            f = sub.topic_filter
            refused, share = self._check_filter(session, f)
            if refused is not None:
                codes.append(refused)
                continue
            new = f not in session.subscriptions
            self._add_subscription(session, f, sub.qos, share)
            # A SUBSCRIBE to a filter it has replaces that subscription, options and all [MQTT-3.8.4-3].
            if sub.no_local or sub.retain_as_published or ident is not None:
                session.set_options(f, SubOptions(sub.no_local, sub.retain_as_published, ident))
            else:
                session.options.pop(f, None)
            codes.append(ReasonCode(sub.qos))
            # Retain Handling: 0 send retained messages, 1 only for a new subscription, 2 none.
            if share is None and (sub.retain_handling == 0 or (sub.retain_handling == 1 and new)):
                accepted.append((f, sub.qos))
        self._save_subscriptions(session)
        self.store.ack(conn, encode(SubackV5(pkt.packet_id, tuple(codes))), session.sid is not None,
                       (lambda: self._send_retained(session, accepted)) if accepted else None)

    def _unsubscribe_v5(self, conn, pkt: UnsubscribeV5) -> None:
        session = conn.session
        codes = []
        for topic_filter in pkt.topics:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self._remove_subscription(session, topic_filter)
                session.options.pop(topic_filter, None)
                codes.append(R.SUCCESS)
            else:
                codes.append(R.NO_SUBSCRIPTION_EXISTED)
        self._save_subscriptions(session)
        self.store.ack(conn, encode(UnsubackV5(pkt.packet_id, tuple(codes))), session.sid is not None)
