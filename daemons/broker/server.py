"""iot-broker: asyncio listener around the pure core.

Theory of operation
===================

One `Connection` (an asyncio.Protocol, not streams: no task or coroutine per packet) per
socket. `data_received` feeds the bytes to the connection's `packets.Reader` and hands each
complete packet to the core, in order. Everything the core writes during one pass of the
event loop is collected per connection and written with one `transport.write` at the end of
that pass (`call_soon(flush)`), so a read holding 100 PUBLISH packets costs one write of 100
PUBACKs, not 100 system calls.

Timers are not per connection: one sweep a second closes connections that sent no CONNECT
within `connect_timeout` and those silent for 1.5x their keep-alive [MQTT-3.1.2-24], and
removes persistent sessions away longer than `persistent_client_expiration`
(`Broker.expire_sessions`). Another task publishes $SYS/broker/... every `sys_interval` seconds.

A protocol error closes only that connection (after a CONNACK with a return code where the
spec asks for one, or for an MQTT 5.0 client a DISCONNECT with the error's reason code,
section 4.13); the close is ungraceful, so the client's will is published. The reader speaks
5.0 as well as 3.1.1 and 3.1 (`Reader(version=5)`): the CONNECT decides for the connection.

Flow control (core.py): when the core cannot take a PUBLISH yet, the connection keeps it in
`held`, with every later packet except acknowledgements and pings, which are still handled
(a client subscribed to what it publishes must be able to free its own queue). Past
HELD_PACKETS packets or HELD_BYTES of payload it stops reading from the socket: TCP pushes
back on the publisher. `retry_held()` (an acknowledgement freed room) and the sweep hand the
held packets to the core again, in order, and reading resumes once none is left. A held
connection is not timed out for keep-alive: its silence is ours.

Bounded output: what the core writes to a client that does not read piles up in asyncio's
buffer. Past WRITE_HIGH_WATER (`pause_writing`; a pass writes what it gathered for a
connection at once past FLUSH_AT, so a long pass is not mistaken for a slow reader) the
connection is `congested()`: QoS 0 messages to it are dropped (counted), and it is read no
more, so its own input cannot make PUBACKs, SUBACKs or PINGRESPs pile up either. Reading
resumes with `resume_writing` unless flow control holds it paused too (`_set_reading` asks
both); while not read it is not timed out for keep-alive either. A client whose output
stays above the mark for `write_timeout` seconds without draining any of it is aborted by
the sweep (a slow reader on a thin link drains some and stays), as is one we closed
that still has not taken its last bytes by then (a close waits for the buffer to drain).

Listeners: the default one ([broker] host/port, plain MQTT) and one per [[broker.listener]]
table, each its own asyncio server feeding the same Server and core. TLS is asyncio's
(`create_server(ssl=)`); the context a server was created with stays its context, so
`Server.reload_tls()` (SIGHUP) builds new ones and each listener's server-name callback,
which OpenSSL calls at every ClientHello (with or without SNI), moves a new handshake onto the
newest: new connections get renewed certificates, open ones keep theirs. MQTT over WebSocket
is `ws.WsConnection` (imported only for a WebSocket listener), a Connection whose bytes pass through the sans-IO `websockets`
ServerProtocol (handshake, framing, ping/pong, close); the MQTT stream inside the binary
frames is fed to the same reader, in whatever split it comes, and what the core writes leaves
as binary frames. A listener may override allow_anonymous and may name the client by its
certificate's CN: `listener_allow_anonymous` and `cert_username` on the Connection, for the
core.

Packet trace (`[broker] log_type` "debug", "subscribe", "unsubscribe", or -v): a Connection
has a `PacketTrace` only while the trace is on, so with it off each packet costs one
`trace is None` test, in `_pump` for what is received and in `send` for what is sent. What is
sent is decoded back from the bytes the core wrote (one whole packet per `send`), so every
writer, the core, the sessions and the store's delayed acknowledgements, is traced in one
place. The lines are trace.py's (Mosquitto's wording) on the logger "iot-broker.packets",
at debug priority, whose level lets them through whatever `[log] level` says.

Limits at the transport: before CONNECT is accepted the reader takes packets of at most
`max_connect_size`; `max_connection_rate` is a token bucket per IP address checked at accept
(buckets full again are forgotten by the sweep, so the table stays small). Counted in the
core's Stats, logged through `Broker.limit_hit`.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import resource
import sqlite3
import ssl
import sys
import time
from collections import deque
from pathlib import Path

from .. import metrics, service
from ..config import BrokerConfig, Config, ConfigError, ListenerConfig, expiration_seconds
from ..metrics import Families
from ..service import Exit, Log, Service

from . import trace
from .auth import Acl, AuthFileError, PasswordFile
from .bridge import Bridge
from . import v5
from .core import Access, Broker, Limits
from .packets import _varint
from .packets import (Connack, Connect, Disconnect, PacketTooLarge, Pingreq, ProtocolError, Puback, Pubcomp, Publish,
                      Pubrec, Pubrel, Reader, ReasonCode, Suback, Subscribe, Unsubscribe, decode, encode)
from .packets5 import ConnectV5, PubackV5, PubcompV5, PublishV5, PubrecV5, PubrelV5
from .store import Store

# Per-connection output buffered in asyncio beyond which QoS 0 messages to that client are
# dropped (and counted) rather than held in memory without bound, and the client is not read.
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = WRITE_HIGH_WATER // 4  # asyncio's default, given so no connection makes its own int
# What one pass gathers for a connection is written at once past this: uvloop reads a socket
# up to 32 times before it runs a callback, so a pass can gather megabytes for one subscriber,
# which is no sign that the subscriber is slow (only the transport's buffer says that).
FLUSH_AT = 256 * 1024
# Every connection reads into this (asyncio.BufferedProtocol), then its reader copies what
# it needs, so reads cost one copy, not two (a bytes object, then the reader's buffer); the
# rest of a large packet is read straight into that packet's own buffer. One for all: the
# loop reads one socket at a time and hands its bytes over before the next read.
READ_BUFFER = memoryview(bytearray(256 * 1024))
# glibc mallopt() parameters (malloc.h) and the values tune_malloc sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
# Failed logins from one address within LOGIN_WINDOW seconds past LOGIN_FREE get their refusal
# 0.5 s later, doubling per failure up to LOGIN_DELAY_MAX.
LOGIN_WINDOW = 60.0
LOGIN_FREE = 3
LOGIN_DELAY_MAX = 8.0
# max_connection_rate: a new address may open this many times the rate at once.
CONNECTION_BURST = 5
SWEEP_INTERVAL = 1.0
# Descriptors kept back from connections: listeners, the store (database, WAL, its thread's
# journal), the metrics endpoint, bridges, the notify socket, epoll, stdio.
FD_RESERVE = 64
# A held connection stops reading past this many packets or payload bytes held.
HELD_PACKETS = 1000
HELD_BYTES = 1024 * 1024
# Handled even while a PUBLISH is held: they free room, they never need any.
PASS_WHILE_HELD = (Puback, Pubrec, Pubrel, Pubcomp, Pingreq, PubackV5, PubrecV5, PubrelV5, PubcompV5)
PUBLISHES = (Publish, PublishV5)
TLS_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}
# The packet trace's own logger, a child of the broker's, so its level can let debug lines
# through while the broker's other lines follow [log] level.
PACKETS = logging.getLogger("iot-broker.packets")


class PacketTrace:
    """One connection's packet trace (see the module docstring): trace.py words the lines,
    this decides which to log and when. Holds what a line needs from later on: the filters of
    a SUBSCRIBE until its SUBACK says which were granted, and the accepted CONNACK, which
    Mosquitto logs after "New client connected" although the core sends it first."""

    __slots__ = ("connack", "debug", "subs", "subscribe", "takeover", "unsubscribe")

    def __init__(self, kinds: frozenset[str]):
        self.debug = trace.DEBUG in kinds
        self.subscribe = trace.SUBSCRIBE in kinds
        self.unsubscribe = trace.UNSUBSCRIBE in kinds
        self.subs: dict[int, tuple[tuple[str, int], ...]] = {}
        self.connack: Connack | None = None
        self.takeover = False

    def line(self, text: str) -> None:
        if self.debug:
            PACKETS.debug(text)

    @staticmethod
    def name(conn: Connection) -> str:
        return conn.session.client_id if conn.session is not None else trace.UNKNOWN

    def received(self, conn: Connection, pkt) -> None:
        kind = type(pkt)
        if kind is Connect or kind is ConnectV5:
            s = conn.broker.sessions.get(pkt.client_id)
            self.takeover = s is not None and s.conn is not None
            return
        name = self.name(conn)
        text = trace.received(name, pkt)
        if text is not None:
            self.line(text)
        if kind is Subscribe:
            for topic_filter, qos in pkt.topics:
                self.line(trace.subscribe_filter(topic_filter, qos))
            if self.subscribe:
                self.subs[pkt.packet_id] = pkt.topics
        elif kind is Unsubscribe:
            for topic_filter in pkt.topics:
                self.line(trace.unsubscribe_filter(topic_filter))
                if self.unsubscribe:
                    PACKETS.debug(trace.unsubscribed(name, topic_filter))
        elif kind is Disconnect:
            self.line(trace.disconnected(name))

    def connected(self, conn: Connection, pkt: Connect) -> None:
        """CONNECT accepted: the lines Mosquitto logs for it, then the CONNACK held back."""
        client_id = conn.session.client_id
        if self.takeover:
            self.line(trace.taken_over(client_id))
        self.line(trace.new_client(conn.peer, client_id, pkt, conn.session.username))
        for text in trace.will(pkt):
            self.line(text)
        if self.connack is not None:
            self.line(trace.sent(client_id, self.connack))
            self.connack = None

    def sent(self, conn: Connection, data: bytes) -> None:
        # The core writes whole packets; a send holding several is read to its end.
        view, pos = memoryview(data), 0
        while pos < len(view):
            try:
                got = decode(view[pos:], role="client", version=5 if conn.v5 is not None else 4)
            except ProtocolError as e:  # our bug: say so, never break the connection for a log line
                PACKETS.warning(f"Sending {len(data) - pos} bytes to {self.name(conn)} the trace cannot decode: {e}")
                return
            if got is None:
                return
            pkt, used = got
            pos += used
            if type(pkt) is not Connack and type(pkt).__name__ == "ConnackV5":
                if pkt.reason_code == 0:
                    self.connack = pkt
                    continue
                self.line(trace.sent(conn.peer.rpartition(":")[0], pkt))
                continue
            if type(pkt) is Connack:
                if pkt.return_code == 0:
                    self.connack = pkt  # logged by connected()
                    continue
                # Refused: Mosquitto has no client id yet and names the peer's address.
                self.line(trace.sent(conn.peer.rpartition(":")[0], pkt))
                continue
            name = self.name(conn)
            if type(pkt) is Suback and self.subscribe:
                for (topic_filter, _), code in zip(self.subs.pop(pkt.packet_id, ()), pkt.return_codes):
                    if code != 0x80:
                        PACKETS.debug(trace.subscribed(name, code, topic_filter))
            self.line(trace.sent(name, pkt))


class Connection(asyncio.BufferedProtocol):
    __slots__ = (
        "srv", "broker", "stats", "reader", "transport", "session", "will", "keepalive",
        "last_rx", "out", "flush_scheduled", "closing", "paused", "loop",
        "held", "held_bytes", "reading", "retry_scheduled",
        "held_full", "paused_at", "paused_size", "out_bytes", "closed_at", "login_refused",
        "listener", "cert_username", "listener_allow_anonymous", "trace", "v5",
    )
    # Mosquitto 2.0.11 logs "New connection from" for TCP connections only.
    trace_accept = True

    def __init__(self, srv: Server, listener: ListenerConfig):
        self.srv = srv
        self.broker = srv.broker
        self.stats = srv.broker.stats
        # Raised to max_packet_size once CONNECT is accepted.
        self.reader = Reader("server", min(srv.cfg.max_connect_size, srv.cfg.max_packet_size), version=5)
        self.v5: v5.Client | None = None  # set by the core for an MQTT 5.0 connection
        self.transport: asyncio.Transport | None = None
        self.session = None
        self.will = None
        self.keepalive = 0
        # Also when it opened, until CONNECT (the connect timeout counts from it): no packet
        # came before, and reading is never paused before a CONNECT.
        self.last_rx = time.monotonic()
        # What the core wrote this pass: a list from the first send() to the flush, () after
        # it, so an idle connection keeps no list.
        self.out: list[bytes] | tuple = ()
        self.flush_scheduled = False
        self.closing = False
        self.paused = False
        self.loop = srv.loop
        self.held: deque | tuple = ()  # made on the first packet held: an empty deque costs 760 bytes
        self.held_bytes = 0
        self.reading = True
        self.retry_scheduled = False
        self.held_full = False  # flow control wants reading paused
        self.paused_at = 0.0  # when output last went over the high-water mark, or last drained some
        self.paused_size = 0  # asyncio's buffer then
        self.out_bytes = 0  # in `out`, not yet written
        self.closed_at = 0.0
        self.login_refused = False  # set by the core: CONNACK 4 or 5 for a login
        self.listener = listener
        # For the core: the client's user name from its certificate (use_identity_as_username),
        # and the listener's allow_anonymous (None: the broker's applies).
        self.cert_username: str | None = None
        self.listener_allow_anonymous = listener.allow_anonymous
        self.trace: PacketTrace | None = PacketTrace(srv.trace_kinds) if srv.trace_kinds else None

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer and not self.srv.admit(peer[0]):
            self.broker.limit_hit("connection_rate_refused", "connection refused: max_connection_rate exceeded",
                                  peer=self.peer, max_connection_rate=self.srv.cfg.max_connection_rate)
            self.closing = True
            transport.abort()
            return
        if len(self.srv.conns) >= self.srv.max_connections:
            self.srv.refused += 1
            if self.srv.refused % 100 == 1:
                self.srv.log.warning("connection refused: max_connections reached",
                                     max_connections=self.srv.max_connections, refused_total=self.srv.refused)
            self.closing = True
            transport.abort()
            return
        if self.listener.use_identity_as_username:
            # connection_made comes after the TLS handshake: the certificate is verified.
            self.cert_username = _common_name(transport.get_extra_info("peercert"))
            if self.cert_username is None:
                self.srv.log.info("client certificate has no subject CN (use_identity_as_username); closing",
                                  peer=self.peer, port=self.listener.port)
                self.closing = True
                transport.abort()
                return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.srv.conns.add(self)
        if self.trace is not None and self.trace_accept:
            self.trace.line(trace.new_connection(self.peer, self.listener.port))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(READ_BUFFER)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closing:
            return
        self.stats.bytes_received += nbytes
        large = self.reader.buffer_updated(nbytes, READ_BUFFER)
        self._pump()
        if large and self.out and self.reading:
            # A large packet was handled (its acknowledgement is out): let the loop write it
            # before this socket is read again. uvloop reads a socket up to 32 times in a row and
            # writes small output after that, so the publisher waited for a burst of packets to
            # be handled before it could send more (the broker then sat idle a third of the time).
            self._write_out()
            self.reading = False
            self.transport.pause_reading()
            self.loop.call_soon(self._set_reading)

    def data_received(self, data: bytes) -> None:
        """What a subclass read some other way (WsConnection: from WebSocket frames)."""
        if self.closing:
            return
        self.stats.bytes_received += len(data)
        self.reader.feed(data)
        self._pump()

    def _pump(self) -> None:
        """Hand the core what was read, in order: first what is held, then the reader's packets."""
        self.retry_scheduled = False
        held, reader, broker = self.held, self.reader, self.broker
        try:
            while held and not self.closing:
                pkt = held[0]
                if not broker.handle(self, pkt):
                    break
                held.popleft()
                if type(pkt) in PUBLISHES:
                    self.held_bytes -= len(pkt.payload)
            got = False
            while not self.closing and (not held or (len(held) < HELD_PACKETS and self.held_bytes < HELD_BYTES)):
                pkt = reader.next_packet()
                if pkt is None:
                    break
                got = True
                if self.trace is not None:
                    self.trace.received(self, pkt)
                if self.session is None:
                    if not broker.connect(self, pkt):
                        if self.trace is not None:
                            self.trace.line(trace.not_authorised(trace.UNKNOWN) if self.login_refused
                                            else trace.protocol_error(trace.UNKNOWN))
                        self._refused()
                        return
                    reader.set_max_packet_size(self.srv.cfg.max_packet_size)
                    if self.trace is not None:
                        self.trace.connected(self, pkt)
                    if self.srv.log.is_debug():
                        self.srv.log.debug("client connected", client=self.session.client_id, peer=self.peer,
                                           clean=int(getattr(pkt, "clean_session", None) or
                                                     getattr(pkt, "clean_start", False)),
                                           keepalive=pkt.keep_alive, protocol=pkt.protocol_level,
                                           username=self.cert_username or pkt.username or "-",
                                           port=self.listener.port)
                elif (held and type(pkt) not in PASS_WHILE_HELD) or not broker.handle(self, pkt):
                    if not held:
                        held = self.held = deque()
                    held.append(pkt)
                    if type(pkt) in PUBLISHES:
                        self.held_bytes += len(pkt.payload)
        except ProtocolError as e:
            if e.connack is not None and self.session is None:
                self.send(encode(Connack(False, e.connack)))
            elif self.v5 is not None and self.session is not None:
                self.send(v5.disconnect_bytes(e.reason, str(e)))
            if self.session is None and isinstance(e, PacketTooLarge):
                self.broker.limit_hit("connect_size_refused", "packet before CONNECT over max_connect_size; "
                                      "closing connection", peer=self.peer, error=str(e))
            else:
                self.srv.log.info("protocol error; closing connection", peer=self.peer, client=self.client_id,
                                  error=str(e), rule=e.rule or "-")
            if self.trace is not None:
                self.trace.line(trace.protocol_error(PacketTrace.name(self), e))
            self.close()
            return
        if got:
            # Only a complete packet counts as activity [MQTT-3.1.2-24]: a byte trickle
            # must not hold a connection open forever.
            self.last_rx = time.monotonic()
        self.held_full = bool(held) and (len(held) >= HELD_PACKETS or self.held_bytes >= HELD_BYTES)
        self._set_reading()

    def _set_reading(self) -> None:
        """Read from the socket unless flow control holds too much or our output to the client
        is over the high-water mark: either one pauses reading, and it resumes only when
        neither wants it paused."""
        want = not (self.held_full or self.paused)
        if want != self.reading and self.transport is not None and not self.closing:
            self.reading = want
            if want:
                self.last_rx = time.monotonic()  # the silence while we did not read was ours
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _refused(self) -> None:
        """CONNACK with a refusal is out (or waiting in `out`): close. Repeated failed logins from
        one address get their CONNACK later and later (up to LOGIN_DELAY_MAX): guessing slows down."""
        delay = self.srv.login_delay(self.peer.rpartition(":")[0]) if self.login_refused else 0.0
        if not delay:
            self.close()
            return
        connack, self.out, self.out_bytes = self.out, (), 0
        self.reading = False
        self.transport.pause_reading()

        def answer() -> None:
            if not self.closing:  # not send(): it was counted and traced when the core sent it
                self.out = [*self.out, *connack]
            self.close()

        self.loop.call_later(delay, answer)

    def retry_held(self) -> None:
        """Called by the core when a session this connection waits for has room again."""
        if not self.retry_scheduled and not self.closing:
            self.retry_scheduled = True
            self.loop.call_soon(self._pump)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.trace is not None and not self.closing:  # not closed by us: by the client (EOF or reset)
            self.trace.line(trace.closed(PacketTrace.name(self)))
        self.closing = True
        self.srv.conns.discard(self)
        if self.session is not None and self.srv.log.is_debug():
            self.srv.log.debug("connection lost", client=self.session.client_id, error=str(exc or "closed"))
        self.broker.closed(self, graceful=False)

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_at = time.monotonic()
        self.paused_size = self.transport.get_write_buffer_size()
        self._set_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._set_reading()

    # what the core calls ----------------------------------------------------------------------

    def send(self, data: bytes, payload: bytes | None = None) -> None:
        if self.closing:
            return
        if self.trace is not None:
            self.trace.sent(self, data if payload is None else data + payload)
        self.stats.messages_sent += 1
        if payload is not None:
            # A large payload is written as it is, after what is pending and its packet's head
            # (one writev), not joined into the pass's output.
            self._write_out()
            self.stats.bytes_sent += len(data) + len(payload)
            self._write_parts(data, payload)
            return
        if self.out:
            self.out.append(data)
        else:
            self.out = [data]
        self.out_bytes += len(data)
        if self.out_bytes >= FLUSH_AT:
            self._write_out()
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        out = self.out
        if out and self.transport is not None and not self.transport.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            self.stats.bytes_sent += len(data)
            self._write(data)
        self.out = ()
        self.out_bytes = 0

    def _write(self, data: bytes) -> None:
        self.transport.write(data)

    def _write_parts(self, data: bytes, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines((data, payload))

    def close(self) -> None:
        """Flush what is pending (a CONNACK with an error code, say), then close."""
        if self.closing:
            return
        self.flush()
        self.closing = True
        self.closed_at = time.monotonic()
        if self.transport is not None:
            self.transport.close()

    def congested(self) -> bool:
        return self.paused or self.out_bytes >= WRITE_HIGH_WATER

    @property
    def peer(self) -> str:
        """The client's address for log lines, made when one needs it, not kept (issue 21: a
        string per idle connection)."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    @property
    def client_id(self) -> str:
        return self.session.client_id if self.session is not None else "-"


def _common_name(cert: dict | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def tls_context(lc: ListenerConfig, label: str, source: Path | None) -> ssl.SSLContext:
    """A listener's TLS context from its files; a file that does not load raises ConfigError
    naming the key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if lc.tls_version:
        ctx.minimum_version = TLS_VERSIONS[lc.tls_version]
    try:
        ctx.load_cert_chain(lc.certfile, lc.keyfile)
    except OSError as e:  # ssl.SSLError is one
        raise ConfigError(source, f"{label} certfile",
                          f"cannot load {lc.certfile} with keyfile {lc.keyfile}: {e}") from None
    if lc.cafile is not None:
        try:
            ctx.load_verify_locations(lc.cafile)
        except OSError as e:
            raise ConfigError(source, f"{label} cafile", f"cannot load {lc.cafile}: {e}") from None
    if lc.require_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Listener:
    """A listener's settings at run time and its TLS context. asyncio's server keeps the
    context it was created with (`front`); `ctx` is the newest (reload_tls), and `_switch`,
    the front context's server-name callback, moves each new handshake onto it before the
    certificate is chosen."""

    __slots__ = ("cfg", "label", "host", "source", "ctx", "front")

    def __init__(self, cfg: ListenerConfig, label: str, host: str, source: Path | None):
        self.cfg, self.label, self.host, self.source = cfg, label, host, source
        self.ctx = self.front = tls_context(cfg, label, source) if cfg.tls else None
        if self.front is not None:
            self.front.sni_callback = self._switch

    def _switch(self, ssl_obj: ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        if self.ctx is not front:
            ssl_obj.context = self.ctx

    def reload(self) -> ssl.SSLContext | None:
        return tls_context(self.cfg, self.label, self.source) if self.cfg.tls else None


class Server:
    def __init__(self, cfg: BrokerConfig, log: Log, loop: asyncio.AbstractEventLoop, store: Store | None = None):
        self.cfg, self.log, self.loop = cfg, log, loop
        self.broker = Broker(log, Limits(cfg.max_inflight_messages, cfg.max_queued_messages,
                                         cfg.allow_zero_length_clientid, cfg.queue_full,
                                         max_queued_bytes=cfg.max_queued_bytes,
                                         inflight_per_client=tuple(cfg.max_inflight_per_client.items()),
                                         max_topic_levels=cfg.max_topic_levels,
                                         max_subscriptions=cfg.max_subscriptions_per_client,
                                         max_retained_messages=cfg.max_retained_messages,
                                         max_retained_bytes=cfg.max_retained_bytes,
                                         session_expiry=expiration_seconds(cfg.persistent_client_expiration),
                                         max_topic_alias=cfg.max_topic_alias, max_keepalive=cfg.max_keepalive,
                                         # Maximum Packet Size counts the whole packet, fixed header too.
                                         max_packet_size=1 + len(_varint(cfg.max_packet_size)) + cfg.max_packet_size),
                             clock=time.time, store=store)
        self.conns: set[Connection] = set()
        # [broker] max_connections, lowered by serve() to what the file descriptor limit allows.
        self.max_connections = cfg.max_connections
        self.listeners: list[Listener] = []
        self.refused = 0
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)
        self.login_failures: dict[str, tuple[int, float]] = {}  # address -> (failures, since)
        self.trace_kinds: frozenset[str] = frozenset()
        # [[broker.bridge]]: each with name, connected, queued, sent, received, dropped.
        self.bridges: list[Bridge] = []

    def set_log_type(self, log_type: tuple[str, ...], verbose: bool) -> None:
        """Turn the packet trace on or off (at start and on SIGHUP), for open connections too."""
        kinds = trace.kinds(log_type, verbose)
        PACKETS.setLevel(logging.DEBUG if kinds else logging.NOTSET)
        if kinds != self.trace_kinds:
            self.trace_kinds = kinds
            for c in self.conns:
                c.trace = PacketTrace(kinds) if kinds else None

    def login_delay(self, address: str) -> float:
        now = time.monotonic()
        count, since = self.login_failures.get(address, (0, now))
        if now - since > LOGIN_WINDOW:
            count, since = 0, now
        count += 1
        self.login_failures[address] = (count, since)
        return 0.0 if count <= LOGIN_FREE else min(LOGIN_DELAY_MAX, 0.5 * 2 ** (count - LOGIN_FREE - 1))

    def admit(self, address: str) -> bool:
        """max_connection_rate: a token bucket per address, refilled at the rate, holding at
        most CONNECTION_BURST seconds' worth; a connection takes one token or is refused."""
        rate = self.cfg.max_connection_rate
        if not rate:
            return True
        now, burst = time.monotonic(), CONNECTION_BURST * rate
        tokens, then = self.buckets.get(address, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        ok = tokens >= 1.0
        self.buckets[address] = (tokens - 1.0 if ok else tokens, now)
        return ok

    def _forget_full_buckets(self, now: float) -> None:
        rate = self.cfg.max_connection_rate
        burst = CONNECTION_BURST * rate
        full = [a for a, (tokens, then) in self.buckets.items() if tokens + (now - then) * rate >= burst]
        for a in full:
            del self.buckets[a]

    def _not_reading(self, c: Connection) -> None:
        self.broker.limit_hit("write_timeout_closed", "client not reading its socket; closing",
                              client=c.client_id, peer=c.peer, write_timeout=self.cfg.write_timeout)
        c.closing = True
        c.transport.abort()

    def sweep(self) -> None:
        now = time.monotonic()
        timeout = self.cfg.connect_timeout
        write_timeout = self.cfg.write_timeout
        for c in list(self.conns):
            if c.closing:
                # Closed by us, it goes once its output is written: a client that reads nothing
                # would keep it, and its buffer, for ever.
                if c.closed_at and now - c.closed_at > write_timeout and c.transport is not None:
                    self._not_reading(c)
                continue
            if c.paused and c.transport.get_write_buffer_size() < c.paused_size:
                # It reads, slowly (a thin link): not stuck, the timeout counts from here.
                c.paused_at, c.paused_size = now, c.transport.get_write_buffer_size()
            if c.paused and now - c.paused_at > write_timeout:
                self._not_reading(c)
            elif c.session is None:
                if now - c.last_rx > timeout:
                    self.log.info("no CONNECT in time; closing", peer=c.peer, timeout=timeout)
                    if c.trace is not None:
                        c.trace.line(trace.timed_out(trace.UNKNOWN))
                    c.close()
            elif c.held:
                c.retry_held()  # a session it waits for may have gone (unsubscribed, ended)
            elif c.keepalive and c.reading and now - c.last_rx > 1.5 * c.keepalive:
                self.log.info("keep-alive expired; closing", client=c.client_id, keepalive=c.keepalive)
                if c.trace is not None:
                    c.trace.line(trace.timed_out(c.client_id))
                v5.disconnect(c, ReasonCode.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
        self.broker.expire_sessions(self.broker.clock())
        if self.buckets:
            self._forget_full_buckets(now)
        if self.login_failures:
            for address in [a for a, (_, since) in self.login_failures.items() if now - since > LOGIN_WINDOW]:
                del self.login_failures[address]

    async def run_timers(self, svc: Service) -> None:
        next_sys = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()
            if self.cfg.sys_interval and time.monotonic() >= next_sys:
                next_sys = time.monotonic() + self.cfg.sys_interval
                self.broker.publish_sys()

    async def listen(self, lst: Listener) -> asyncio.Server:
        """Bind one listener; a failure ends the start (EX_OSERR) naming the address."""
        conn = Connection
        if lst.cfg.protocol == "websockets":
            from .ws import WsConnection  # websockets costs a start without such a listener 0.5-2.6 MB
            conn = WsConnection
        tls = {} if lst.front is None else {"ssl": lst.front, "ssl_handshake_timeout": self.cfg.connect_timeout}
        try:
            server = await self.loop.create_server(lambda: conn(self, lst.cfg), lst.host, lst.cfg.port,
                                                   backlog=1024, **tls)
        except OSError as e:
            hint = " (is another broker, e.g. mosquitto, running?)" if e.errno == errno.EADDRINUSE else ""
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise Exit(service.EX_OSERR, f"cannot listen on {lst.host}:{lst.cfg.port}: {reason}{hint}") from None
        self.listeners.append(lst)
        return server

    def reload_tls(self) -> None:
        """SIGHUP: read every TLS listener's certfile, keyfile and cafile again, for new
        connections; open ones keep theirs. All are loaded before any is swapped in, so a file
        that does not load (ConfigError) leaves every listener as it was."""
        fresh = [(lst, lst.reload()) for lst in self.listeners if lst.cfg.tls]
        for lst, ctx in fresh:
            lst.ctx = ctx
        if fresh:
            self.log.info("TLS certificates reloaded", ports=",".join(str(lst.cfg.port) for lst in self.listeners
                                                                      if lst.cfg.tls))

    def close_all(self) -> None:
        for c in list(self.conns):
            v5.disconnect(c, ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down")


def families(srv: Server) -> Families:
    """The broker's counters as Prometheus metrics (daemons/metrics.py); run on the loop."""
    b, s, out = srv.broker, srv.broker.stats, Families()
    out.gauge("iot_broker_connections", "Clients connected now.", b.connected)
    out.counter("iot_broker_connections", "Connections accepted (CONNACK 0) since start.", s.connections_total)
    out.gauge("iot_broker_sessions", "Sessions held, connected or persistent and away.", len(b.sessions))
    out.counter("iot_broker_packets_received", "MQTT packets of any type received.", s.messages_received)
    out.counter("iot_broker_packets_sent", "MQTT packets of any type sent.", s.messages_sent)
    qos = ("0", "1", "2")
    out.counter("iot_broker_messages_received", "PUBLISH messages received from clients, by QoS.",
                label="qos", values=dict(zip(qos, s.publish_received_qos)))
    out.counter("iot_broker_messages_sent", "Messages delivered to subscribers (sent or queued), by the QoS "
                "they go out with.", label="qos", values=dict(zip(qos, s.publish_sent_qos)))
    out.counter("iot_broker_messages_dropped", "Deliveries dropped: queue full (queue_full = drop) or QoS 0 "
                "to a congested client.", s.publish_dropped)
    out.counter("iot_broker_messages_held", "QoS 1/2 PUBLISHes held back unacknowledged for a full queue "
                "(queue_full = block).", s.publish_held)
    out.gauge("iot_broker_messages_queued", "Messages queued or in flight to sessions, in memory and on disk.",
              sum(x.pending() for x in b.sessions.values()))
    out.gauge("iot_broker_store_queued_bytes", "Bytes of queued messages in the persistent store.", b.store.bytes)
    retained, retained_bytes = b.retained.usage()
    out.gauge("iot_broker_retained_messages", "Retained messages held, not counting $SYS topics.", retained)
    out.gauge("iot_broker_retained_bytes", "Bytes (topics and payloads) of those retained messages.", retained_bytes)
    out.gauge("iot_broker_subscriptions", "Subscriptions held.", len(b.tree))
    out.counter("iot_broker_bytes_received", "Bytes received from clients.", s.bytes_received)
    out.counter("iot_broker_bytes_sent", "Bytes sent to clients.", s.bytes_sent)
    out.counter("iot_broker_limit_hits", "Refusals and closes by the limits against hostile or broken clients "
                "($SYS/broker/limits/...).", label="limit", values={
                    "topic_levels": s.topic_levels_refused, "subscriptions": s.subscriptions_refused,
                    "retained": s.retained_refused, "sessions_expired": s.sessions_expired,
                    "connect_size": s.connect_size_refused, "connection_rate": s.connection_rate_refused,
                    "write_timeout": s.write_timeout_closed})
    out.counter("iot_broker_access_denied", "Logins refused and PUBLISH/SUBSCRIBE denied by the ACL "
                "($SYS/broker/access/...).", label="action", values={
                    "login": s.logins_refused, "publish": s.publish_denied, "subscribe": s.subscribe_denied})
    # Bridges (another module adds srv.bridges); absent, the families are there and empty.
    bridges = list(getattr(srv, "bridges", ()))
    for name, doc, attr, kind in (
            ("iot_broker_bridge_up", "1 while the bridge is connected to its remote broker.", "connected", "gauge"),
            ("iot_broker_bridge_messages_queued", "Messages waiting to cross the bridge.", "queued", "gauge"),
            ("iot_broker_bridge_messages_sent", "Messages sent to the remote broker.", "sent", "counter"),
            ("iot_broker_bridge_messages_received", "Messages received from the remote broker.", "received",
             "counter"),
            ("iot_broker_bridge_messages_dropped", "Messages the bridge dropped.", "dropped", "counter")):
        getattr(out, kind)(name, doc, label="bridge",
                           values={br.name: float(getattr(br, attr)) for br in bridges})
    return out


def raise_fd_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one, as far as the kernel lets us: the soft
    limit is often 1024 (it keeps select() users safe; we use epoll), and each connection takes
    a descriptor. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass  # hard = unlimited, or a sandbox (SystemCallFilter=~@resources): LimitNOFILE decides
    return soft


def tune_malloc() -> bool:
    """Fixed glibc malloc thresholds in place of its moving ones. By default a block past the
    mmap threshold gets fresh pages, and free memory at the top of the heap past the trim
    threshold goes back to the kernel, so with 1 MiB payloads every message's buffers faulted
    in new pages again: the broker spent twice the CPU per message and moved a third of the
    bytes. Kept: at most TRIM_THRESHOLD of free heap after a burst of large messages. False
    where the C library has no mallopt (not glibc) or refuses the values."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_threshold = MMAP_THRESHOLD if sys.maxsize > 2**32 else MMAP_THRESHOLD // 2  # glibc's maximum
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def connection_limit(max_connections: int, nofile: int) -> int:
    """max_connections, or fewer if the descriptors would run out first: past the limit accept()
    fails (EMFILE) where the broker can neither answer, count nor log the refusal."""
    if nofile == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, nofile - FD_RESERVE))


def access_from(cfg: BrokerConfig) -> Access:
    """The password file and ACL the config names, read now (AuthFileError names file and line).
    With neither a password file nor `allow_anonymous = true` the broker runs local only (see
    `bind_host`): anonymous clients are let in, as Mosquitto 2 does without listeners."""
    return Access(PasswordFile.load(cfg.password_file) if cfg.password_file else None,
                  Acl.load(cfg.acl_file) if cfg.acl_file else None,
                  cfg.allow_anonymous or cfg.password_file is None)


def local_only(cfg: BrokerConfig) -> bool:
    return cfg.password_file is None and not cfg.allow_anonymous


async def serve(svc: Service) -> None:
    cfg: BrokerConfig = svc.config.broker
    port = svc.args.port if svc.args.port is not None else cfg.port
    try:
        access = access_from(cfg)
    except AuthFileError as e:
        raise Exit(service.EX_CONFIG, str(e)) from None
    host = "127.0.0.1" if local_only(cfg) else cfg.host
    if host != cfg.host:
        svc.log.warning("no password_file and allow_anonymous is not true: listening on loopback only; "
                        "set a password_file (iotctl passwd) or allow_anonymous = true in [broker] to open "
                        "the broker to the network", host=cfg.host, listening_on=host)
    loop = asyncio.get_running_loop()
    nofile = raise_fd_limit()
    if not tune_malloc():
        svc.log.info("malloc thresholds not set (not glibc?): large payloads cost more CPU")
    store = None
    if cfg.persistence:
        where = cfg.persistence_location or svc.config.paths.state_dir / "broker"
        store = Store(where / "store.db", svc.log, loop, cfg.max_store_bytes, os.environ.get("IOT_BROKER_FAILPOINT", ""))
    srv = Server(cfg, svc.log, loop, store)
    srv.max_connections = connection_limit(cfg.max_connections, nofile)
    svc.log.info("connection limit", max_connections=srv.max_connections,
                 nofile=nofile if nofile != resource.RLIM_INFINITY else "unlimited")
    srv.broker.access = access
    srv.set_log_type(cfg.log_type, svc.args.verbose)

    def reload(new) -> list[str]:
        """SIGHUP: the password file and ACL again (new rules apply from each client's next
        packet on; nobody is disconnected). A broken file keeps the old rules."""
        fresh = access_from(new.broker)  # AuthFileError: the service logs it, the old rules stay
        old = srv.broker.access
        old.passwords, old.acl, old.allow_anonymous = fresh.passwords, fresh.acl, fresh.allow_anonymous
        svc.log.info("access rules reloaded", password_file=new.broker.password_file or "-",
                     users=len(fresh.passwords) if fresh.passwords is not None else 0,
                     acl_file=new.broker.acl_file or "-")
        return ["[broker] password_file", "[broker] acl_file", "[broker] allow_anonymous"]

    if store is not None:
        try:
            loaded = store.open(page=max(cfg.max_queued_messages, cfg.max_inflight_messages))
        except (OSError, sqlite3.Error) as e:
            raise Exit(service.EX_OSERR, f"cannot open the store {store.path}: {e}") from None
        srv.broker.restore(loaded)
        svc.log.info("store opened", store=store.path, sessions=len(loaded.sessions), retained=len(loaded.retained),
                     queued=sum(len(s.rows) + s.on_disk for s in loaded.sessions),
                     queued_bytes=store.bytes, skipped=loaded.skipped)
    # Bridge sessions after the store's (their queues are restored), before any client can
    # publish (what it sends upstream is queued from the first message).
    try:
        srv.bridges = [Bridge(bc, srv.broker, svc.log) for bc in cfg.bridge]
    except (OSError, ValueError) as e:  # a bridge_cafile/certfile that does not load (ssl.SSLError is an OSError)
        raise Exit(service.EX_CONFIG, f"{svc.config.source}: [[broker.bridge]]: cannot load TLS files: {e}") from None
    srv.broker.bridges = srv.bridges
    # The default listener, always there as Mosquitto's is, then the [[broker.listener]] tables.
    # Every TLS context is built (and every file read) before the first bind.
    listeners = [Listener(ListenerConfig(port=port, bind_address=host), "[broker] port", host, None)]
    listeners += [Listener(lc, f"[[broker.listener]] #{i}", lc.bind_address or host, svc.config.source)
                  for i, lc in enumerate(cfg.listener, 1)]
    if any(lst.cfg.protocol == "websockets" for lst in listeners):
        logging.getLogger("websockets").setLevel(logging.WARNING)  # our own lines say what matters
    servers: list[asyncio.Server] = []
    timers = endpoint = None
    try:
        bound = []
        for lst in listeners:
            servers.append(await srv.listen(lst))
            addr = servers[-1].sockets[0].getsockname()
            bound.append(f"{addr[0]}:{addr[1]}")
            svc.log.info(f"listening on {bound[-1]}", protocol=lst.cfg.protocol, tls="yes" if lst.cfg.tls else "no",
                         event_loop=type(loop).__module__.split(".")[0])

        def on_reload(new: Config) -> list[str]:
            applied = reload(new)  # password file and ACL; a broken one raises: nothing changes
            srv.reload_tls()
            srv.set_log_type(new.broker.log_type, svc.args.verbose)
            return applied + ["[broker] log_type"]

        svc.on_reload = on_reload
        svc.status_fn = srv.broker.summary
        endpoint = metrics.serve(svc.log, cfg.metrics, "[broker] metrics", lambda: families(srv), loop=loop)
        svc.ready("listening on " + ", ".join(bound))
        timers = asyncio.create_task(srv.run_timers(svc))
        for b in srv.bridges:
            b.start()
        await svc.stopped()
    finally:
        if timers is not None:
            timers.cancel()
        for b in srv.bridges:
            await b.stop()
        if endpoint is not None:
            endpoint.close()
        for server in servers:
            server.close()
        srv.close_all()
        await asyncio.sleep(0)  # let the closes flush
        if store is not None:
            store.close()


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(text)
    return int(text)


def add_arguments(p) -> None:
    p.add_argument("-p", "--port", type=_port,
                   help="default listener's port, 1-65535 (overrides [broker] port; not [[broker.listener]])")


def main(argv=None) -> int:
    return service.run(
        "iot-broker",
        "MQTT broker: MQTT 5.0, 3.1.1 and 3.1. Reads the [broker] section of the config; with no config file it runs "
        "with built-in defaults (0.0.0.0:1883).",
        serve,
        add_arguments=add_arguments,
        argv=argv,
        event_loop=event_loop,
    )


def event_loop(cfg) -> str:
    """The loop `[broker] event_loop` asks for: "uvloop" or "asyncio" (auto: uvloop if installed)."""
    want = cfg.broker.event_loop
    if want == "asyncio":
        return want
    try:
        import uvloop  # noqa: F401, PLC0415 - probing whether it is installed
    except ImportError:
        if want == "uvloop":
            raise Exit(service.EX_CONFIG, "[broker] event_loop = \"uvloop\" but uvloop is not installed "
                       "(pip install uvloop, or Debian's python3-uvloop)") from None
        return "asyncio"
    return "uvloop"


if __name__ == "__main__":
    sys.exit(main())
