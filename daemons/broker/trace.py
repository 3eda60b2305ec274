"""The packet trace: Mosquitto 2.0.11's verbose log lines, worded from our packet objects.

Theory of operation
===================

Operators follow walkthroughs written for `mosquitto -v` ("watch the QoS 1 handshake in the
journal"), so `iot-broker -v` (or `[broker] log_type` with "debug") logs every packet it
receives and sends in Mosquitto's exact words: "Received PUBLISH from plc-1 (d0, q1, r0, m1,
'sensor/data', ... (7 bytes))", "Sending PUBACK to plc-1 (m1, rc0)". Each function here
returns one line (or the lines of one event) for the server to log; nothing here does I/O,
so the wording is tested against Mosquitto's without a socket (tests/unit/test_trace.py).

Where the words come from: Mosquitto's send_*.c and handle_*.c (packet lines), loop.c
do_disconnect (why a client went), handle_connect.c (the lines around CONNECT), and what
Mosquitto 2.0.11 prints for the same client traffic. A client is named by its client id; a
CONNACK refusing a client that has none yet is addressed to the peer's IP address, and a
client without one leaves as "<unknown>", as in Mosquitto.

`log_type` names, as Mosquitto's: "debug" turns on the packet lines and the connection lines
around them (Mosquitto logs the latter as "notice"; we keep them with the trace so the
default journal stays as it was), "subscribe" and "unsubscribe" the one line per filter
("dbsub 2 sensor/#", "dbsub sensor/#"), "all" all three. The other names select nothing of
ours and are accepted so a Mosquitto configuration carries over (`kinds`).
"""

from __future__ import annotations

from .packets import (
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    PacketTooLarge,
    Pingreq,
    Pingresp,
    ProtocolError,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)

UNKNOWN = "<unknown>"  # a client that has no client id yet, as Mosquitto names it
DEBUG, SUBSCRIBE, UNSUBSCRIBE = "debug", "subscribe", "unsubscribe"
# What each log_type name turns on here; the rest (error, warning, notice, information,
# websockets, none) turns on nothing of the trace.
_KINDS = {DEBUG: {DEBUG}, SUBSCRIBE: {SUBSCRIBE}, UNSUBSCRIBE: {UNSUBSCRIBE}, "all": {DEBUG, SUBSCRIBE, UNSUBSCRIBE}}


def kinds(log_type: tuple[str, ...] | list[str], verbose: bool = False) -> frozenset[str]:
    """The trace kinds (DEBUG, SUBSCRIBE, UNSUBSCRIBE) that `log_type` turns on; -v is "all"."""
    if verbose:
        return frozenset(_KINDS["all"])
    return frozenset(k for name in log_type for k in _KINDS.get(name, ()))


# --- connections ------------------------------------------------------------------------------


def new_connection(peer: str, port: int) -> str:
    """At accept (TCP only: Mosquitto 2.0.11 logs none for a WebSocket). `peer` is "ip:port"."""
    return f"New connection from {peer} on port {port}."


def new_client(peer: str, client_id: str, pkt: Connect, username: str | None) -> str:
    """CONNECT accepted. p1 is MQTT 3.1, p2 MQTT 3.1.1, p5 MQTT 5.0 (Mosquitto's protocol numbers)."""
    user = f", u'{username}'" if username is not None else ""
    level = {3: 1, 4: 2}.get(pkt.protocol_level, pkt.protocol_level)
    clean = pkt.clean_start if level == 5 else pkt.clean_session
    return (f"New client connected from {peer} as {client_id} "
            f"(p{level}, c{int(clean)}, k{pkt.keep_alive}{user}).")


def will(pkt: Connect) -> tuple[str, ...]:
    """The lines after "New client connected": the will, if any, and its topic."""
    w = pkt.will
    if w is None:
        return ("No will message specified.",)
    return (f"Will message specified ({len(w.payload)} bytes) (r{int(w.retain)}, q{w.qos}).", f"\t{w.topic}")


def taken_over(client_id: str) -> str:
    return f"Client {client_id} already connected, closing old connection."


def disconnected(name: str) -> str:
    """After the client's DISCONNECT."""
    return f"Client {name} disconnected."


def closed(name: str) -> str:
    """The client closed (or reset) its connection without DISCONNECT."""
    return f"Client {name} closed its connection."


def timed_out(name: str) -> str:
    """Keep-alive expired; also no CONNECT in time (Mosquitto's keep-alive check covers both)."""
    return f"Client {name} has exceeded timeout, disconnecting."


def not_authorised(name: str) -> str:
    """After a CONNACK refusing the login (4 or 5)."""
    return f"Client {name} disconnected, not authorised."


# Packets our codec calls malformed that Mosquitto reads and then refuses as a protocol error:
# wrong fixed-header flags of PUBREL, SUBSCRIBE, UNSUBSCRIBE and a wildcard in a topic name.
_PROTOCOL_RULES = frozenset({"MQTT-3.6.1-1", "MQTT-3.8.1-1", "MQTT-3.10.1-1", "MQTT-3.3.2-2"})


def protocol_error(name: str, error: ProtocolError | None = None) -> str:
    """The connection is closed for a broken rule. Mosquitto words it by its own error codes;
    ours map as: too large -> oversize packet, unparsable -> malformed packet, else protocol
    error (also for a refused CONNECT that is not about the login)."""
    if isinstance(error, PacketTooLarge):
        why = "due to oversize packet"
    elif isinstance(error, MalformedPacket) and error.rule not in _PROTOCOL_RULES:
        why = "due to malformed packet"
    else:
        why = "due to protocol error"
    return f"Client {name} disconnected {why}."


# --- packets ----------------------------------------------------------------------------------


def _publish(p: Publish) -> str:
    return (f"(d{int(p.dup)}, q{p.qos}, r{int(p.retain)}, m{p.packet_id or 0}, '{p.topic}', "
            f"... ({len(p.payload)} bytes))")


# Received from a client (handle_*.c). CONNECT has no line of its own: new_client stands for it.
_RECEIVED = {
    Publish: lambda p: " " + _publish(p),
    Puback: lambda p: f" (Mid: {p.packet_id}, RC:0)",
    Pubrec: lambda p: f" (Mid: {p.packet_id})",
    Pubrel: lambda p: f" (Mid: {p.packet_id})",
    Pubcomp: lambda p: f" (Mid: {p.packet_id}, RC:0)",
    Subscribe: lambda p: "",
    Unsubscribe: lambda p: "",
    Pingreq: lambda p: "",
    Disconnect: lambda p: "",
}
# Sent to a client (send_*.c).
_SENT = {
    Connack: lambda p: f" ({int(p.session_present)}, {int(p.return_code)})",
    Publish: lambda p: " " + _publish(p),
    Puback: lambda p: f" (m{p.packet_id}, rc0)",
    Pubrec: lambda p: f" (m{p.packet_id}, rc0)",
    Pubrel: lambda p: f" (m{p.packet_id})",
    Pubcomp: lambda p: f" (m{p.packet_id})",
    Suback: lambda p: "",
    Unsuback: lambda p: "",
    Pingresp: lambda p: "",
}


def received(name: str, pkt) -> str | None:
    """"Received PUBLISH from plc-1 (...)"; None for CONNECT."""
    fmt = _RECEIVED.get(type(pkt))
    if fmt is None:  # an MQTT 5.0 packet: named, without Mosquitto's details
        return None if type(pkt).__name__.startswith("Connect") else f"Received {_name(pkt)} from {name}"
    return f"Received {type(pkt).__name__.upper()} from {name}{fmt(pkt)}"


def _name(pkt) -> str:
    return type(pkt).__name__.upper().removesuffix("V5")


def sent(name: str, pkt) -> str:
    """"Sending PUBACK to plc-1 (m1, rc0)"."""
    fmt = _SENT.get(type(pkt))
    return f"Sending {_name(pkt)} to {name}{'' if fmt is None else fmt(pkt)}"


def subscribe_filter(topic_filter: str, qos: int) -> str:
    """One per filter after "Received SUBSCRIBE" (debug): the QoS asked for."""
    return f"\t{topic_filter} (QoS {qos})"


def subscribed(client_id: str, qos: int, topic_filter: str) -> str:
    """log_type subscribe: a filter granted, at the QoS granted."""
    return f"{client_id} {qos} {topic_filter}"


def unsubscribe_filter(topic_filter: str) -> str:
    """One per filter after "Received UNSUBSCRIBE" (debug)."""
    return f"\t{topic_filter}"


def unsubscribed(client_id: str, topic_filter: str) -> str:
    """log_type unsubscribe: one per filter, whether it was subscribed or not (as Mosquitto)."""
    return f"{client_id} {topic_filter}"
