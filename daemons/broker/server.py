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
spec asks for one); the close is ungraceful, so the client's will is published.

Flow control (core.py): when the core cannot take a PUBLISH yet, the connection keeps it in
`held`, with every later packet except acknowledgements and pings, which are still handled
(a client subscribed to what it publishes must be able to free its own queue). Past
HELD_PACKETS packets or HELD_BYTES of payload it stops reading from the socket: TCP pushes
back on the publisher. `retry_held()` (an acknowledgement freed room) and the sweep hand the
held packets to the core again, in order, and reading resumes once none is left. A held
connection is not timed out for keep-alive: its silence is ours.

Bounded output: what the core writes to a client that does not read piles up in asyncio's
buffer. Past WRITE_HIGH_WATER (`pause_writing`, or that much gathered in one pass) the
connection is `congested()`: QoS 0 messages to it are dropped (counted), and it is read no
more, so its own input cannot make PUBACKs, SUBACKs or PINGRESPs pile up either. Reading
resumes with `resume_writing` unless flow control holds it paused too (`_set_reading` asks
both); while not read it is not timed out for keep-alive either. A client whose output
stays above the mark for `write_timeout` seconds without draining any of it is aborted by
the sweep (a slow reader on a thin link drains some and stays), as is one we closed
that still has not taken its last bytes by then (a close waits for the buffer to drain).

Limits at the transport: before CONNECT is accepted the reader takes packets of at most
`max_connect_size`; `max_connection_rate` is a token bucket per IP address checked at accept
(buckets full again are forgotten by the sweep, so the table stays small). Counted in the
core's Stats, logged through `Broker.limit_hit`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import sqlite3
import sys
import time

from .. import service
from ..config import BrokerConfig, expiration_seconds
from ..service import Exit, Log, Service
from collections import deque

from .auth import Acl, AuthFileError, PasswordFile
from .core import Access, Broker, Limits
from .packets import (Connack, PacketTooLarge, Pingreq, ProtocolError, Puback, Pubcomp, Publish, Pubrec, Pubrel,
                      Reader, encode)
from .store import Store

# Per-connection output buffered in asyncio beyond which QoS 0 messages to that client are
# dropped (and counted) rather than held in memory without bound, and the client is not read.
WRITE_HIGH_WATER = 1024 * 1024
# Failed logins from one address within LOGIN_WINDOW seconds past LOGIN_FREE get their refusal
# 0.5 s later, doubling per failure up to LOGIN_DELAY_MAX.
LOGIN_WINDOW = 60.0
LOGIN_FREE = 3
LOGIN_DELAY_MAX = 8.0
# max_connection_rate: a new address may open this many times the rate at once.
CONNECTION_BURST = 5
SWEEP_INTERVAL = 1.0
# A held connection stops reading past this many packets or payload bytes held.
HELD_PACKETS = 1000
HELD_BYTES = 1024 * 1024
# Handled even while a PUBLISH is held: they free room, they never need any.
PASS_WHILE_HELD = (Puback, Pubrec, Pubrel, Pubcomp, Pingreq)


class Connection(asyncio.Protocol):
    __slots__ = (
        "srv", "broker", "stats", "reader", "transport", "session", "will", "keepalive",
        "last_rx", "opened", "out", "flush_scheduled", "closing", "paused", "peer", "loop",
        "held", "held_bytes", "reading", "retry_scheduled",
        "held_full", "paused_at", "paused_size", "out_bytes", "closed_at", "login_refused",
    )

    def __init__(self, srv: Server):
        self.srv = srv
        self.broker = srv.broker
        self.stats = srv.broker.stats
        # Raised to max_packet_size once CONNECT is accepted.
        self.reader = Reader("server", min(srv.cfg.max_connect_size, srv.cfg.max_packet_size))
        self.transport: asyncio.Transport | None = None
        self.session = None
        self.will = None
        self.keepalive = 0
        self.last_rx = self.opened = time.monotonic()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.closing = False
        self.paused = False
        self.peer = "?"
        self.loop = srv.loop
        self.held: deque = deque()
        self.held_bytes = 0
        self.reading = True
        self.retry_scheduled = False
        self.held_full = False  # flow control wants reading paused
        self.paused_at = 0.0  # when output last went over the high-water mark, or last drained some
        self.paused_size = 0  # asyncio's buffer then
        self.out_bytes = 0  # in `out`, not yet written
        self.closed_at = 0.0
        self.login_refused = False  # set by the core: CONNACK 4 or 5 for a login

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if peer and not self.srv.admit(peer[0]):
            self.broker.limit_hit("connection_rate_refused", "connection refused: max_connection_rate exceeded",
                                  peer=self.peer, max_connection_rate=self.srv.cfg.max_connection_rate)
            self.closing = True
            transport.abort()
            return
        if len(self.srv.conns) >= self.srv.cfg.max_connections:
            self.srv.refused += 1
            if self.srv.refused % 100 == 1:
                self.srv.log.warning("connection refused: max_connections reached",
                                     max_connections=self.srv.cfg.max_connections, refused_total=self.srv.refused)
            self.closing = True
            transport.abort()
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.srv.conns.add(self)

    def data_received(self, data: bytes) -> None:
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
                if type(pkt) is Publish:
                    self.held_bytes -= len(pkt.payload)
            while not self.closing and (not held or (len(held) < HELD_PACKETS and self.held_bytes < HELD_BYTES)):
                pkt = reader.next_packet()
                if pkt is None:
                    break
                # Only a complete packet counts as activity [MQTT-3.1.2-24]: a byte trickle
                # must not hold a connection open forever.
                self.last_rx = time.monotonic()
                if self.session is None:
                    if not broker.connect(self, pkt):
                        self._refused()
                        return
                    reader.set_max_packet_size(self.srv.cfg.max_packet_size)
                    if self.srv.log.is_debug():
                        self.srv.log.debug("client connected", client=self.session.client_id, peer=self.peer,
                                           clean=int(pkt.clean_session), keepalive=pkt.keep_alive)
                elif (held and type(pkt) not in PASS_WHILE_HELD) or not broker.handle(self, pkt):
                    held.append(pkt)
                    if type(pkt) is Publish:
                        self.held_bytes += len(pkt.payload)
        except ProtocolError as e:
            if e.connack is not None and self.session is None:
                self.send(encode(Connack(False, e.connack)))
            if self.session is None and isinstance(e, PacketTooLarge):
                self.broker.limit_hit("connect_size_refused", "packet before CONNECT over max_connect_size; "
                                      "closing connection", peer=self.peer, error=str(e))
            else:
                self.srv.log.info("protocol error; closing connection", peer=self.peer, client=self.client_id,
                                  error=str(e), rule=e.rule or "-")
            self.close()
            return
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
        connack, self.out, self.out_bytes = self.out, [], 0
        self.reading = False
        self.transport.pause_reading()

        def answer() -> None:
            for data in connack:
                self.send(data)
            self.close()

        self.loop.call_later(delay, answer)

    def retry_held(self) -> None:
        """Called by the core when a session this connection waits for has room again."""
        if not self.retry_scheduled and not self.closing:
            self.retry_scheduled = True
            self.loop.call_soon(self._pump)

    def connection_lost(self, exc: Exception | None) -> None:
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

    def send(self, data: bytes) -> None:
        if self.closing:
            return
        self.out.append(data)
        self.out_bytes += len(data)
        self.stats.messages_sent += 1
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        if out and self.transport is not None and not self.transport.is_closing():
            data = out[0] if len(out) == 1 else b"".join(out)
            self.stats.bytes_sent += len(data)
            self.transport.write(data)
        out.clear()
        self.out_bytes = 0

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
    def client_id(self) -> str:
        return self.session.client_id if self.session is not None else "-"


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
                                         session_expiry=expiration_seconds(cfg.persistent_client_expiration)),
                             clock=time.time, store=store)
        self.conns: set[Connection] = set()
        self.refused = 0
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)
        self.login_failures: dict[str, tuple[int, float]] = {}  # address -> (failures, since)

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
                if now - c.opened > timeout:
                    self.log.info("no CONNECT in time; closing", peer=c.peer, timeout=timeout)
                    c.close()
            elif c.held:
                c.retry_held()  # a session it waits for may have gone (unsubscribed, ended)
            elif c.keepalive and c.reading and now - c.last_rx > 1.5 * c.keepalive:
                self.log.info("keep-alive expired; closing", client=c.client_id, keepalive=c.keepalive)
                c.close()
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

    def close_all(self) -> None:
        for c in list(self.conns):
            c.close()


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want + 64))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            pass  # a sandbox (systemd SystemCallFilter=~@resources) sets LimitNOFILE for us instead


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
    _raise_fd_limit(cfg.max_connections)
    store = None
    if cfg.persistence:
        where = cfg.persistence_location or svc.config.paths.state_dir / "broker"
        store = Store(where / "store.db", svc.log, loop, cfg.max_store_bytes, os.environ.get("IOT_BROKER_FAILPOINT", ""))
    srv = Server(cfg, svc.log, loop, store)
    srv.broker.access = access

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

    svc.on_reload = reload
    if store is not None:
        try:
            loaded = store.open(page=max(cfg.max_queued_messages, cfg.max_inflight_messages))
        except (OSError, sqlite3.Error) as e:
            raise Exit(service.EX_OSERR, f"cannot open the store {store.path}: {e}") from None
        srv.broker.restore(loaded)
        svc.log.info("store opened", store=store.path, sessions=len(loaded.sessions), retained=len(loaded.retained),
                     queued=sum(len(s.rows) + s.on_disk for s in loaded.sessions),
                     queued_bytes=store.bytes, skipped=loaded.skipped)
    try:
        listener = await loop.create_server(lambda: Connection(srv), host, port, backlog=1024)
    except OSError as e:
        hint = " (is another broker, e.g. mosquitto, running?)" if e.errno == errno.EADDRINUSE else ""
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise Exit(service.EX_OSERR, f"cannot listen on {host}:{port}: {reason}{hint}") from None
    svc.status_fn = srv.broker.summary
    bound = listener.sockets[0].getsockname()
    svc.ready(f"listening on {bound[0]}:{bound[1]}")
    timers = asyncio.create_task(srv.run_timers(svc))
    try:
        await svc.stopped()
    finally:
        timers.cancel()
        listener.close()
        srv.close_all()
        await asyncio.sleep(0)  # let the closes flush
        if store is not None:
            store.close()


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(text)
    return int(text)


def add_arguments(p) -> None:
    p.add_argument("-p", "--port", type=_port, help="listen on this port, 1-65535 (overrides [broker] port)")


def main(argv=None) -> int:
    return service.run(
        "iot-broker",
        "MQTT 3.1.1 broker. Reads the [broker] section of the config; with no config file it runs "
        "with built-in defaults (0.0.0.0:1883).",
        serve,
        add_arguments=add_arguments,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
