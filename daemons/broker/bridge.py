"""Bridges: the broker as a client of another broker ([[broker.bridge]], Mosquitto's semantics).

Theory of operation
===================

A bridge has two sides. The local side is a persistent Session of the core, client id
"$bridge/<name>" (core.BRIDGE_PREFIX: no client may take it), subscribed to the local filters
of the `out` and `both` topics. Messages for the remote are therefore delivered, queued,
spilled to the store and acknowledged exactly as for any persistent client: the session's
in-flight window, its queue in memory and on disk (bounded by the store's quota, then flow
control), its order, its QoS 1/2 state. While the remote is unreachable they wait in the
store; a restart (kill -9 included) restores them with the session.

The remote side is `Remote`, an asyncio client connection speaking MQTT 3.1.1 through our
codec. Once its CONNACK accepts, it subscribes to the remote filters of the `in` and `both`
topics and becomes the local session's Link (`core.bridge_attach`): the session resends what
is unacknowledged (DUP) and refills its window; every PUBLISH it writes has its topic moved
from the local prefix to the remote one on the way out. What the remote sends is fed to the
core as if this connection were a client of ours: PUBACK/PUBREC/PUBCOMP free the session's
window; a PUBLISH (its topic moved from the remote prefix to the local one) is routed by
`Broker.handle`, which acknowledges it to the remote only once the store has committed what
it wrote (store.ack), and holds it back (we stop reading from the remote) while a local
queue is full. PUBREL is answered by the core too, so QoS 2 from the remote is exactly once.

No loops: the local session has `no_local` set, so a message that came in over the bridge is
not delivered back to it (core._publish drops the origin from the matches); a Mosquitto bridge
that connects to us with level 0x84 gets the same treatment.

Connecting: the addresses are tried in order, the next one when a connect fails; once all
failed, or an established connection is lost, the bridge waits `restart_timeout` and starts
again from the first. With try_private the CONNECT carries level 0x84, as Mosquitto's does;
a remote that refuses it (CONNACK 1, or a close before any CONNACK) is asked again with 4.
Keep-alive: a PINGREQ when nothing was sent for keepalive_interval, and the connection is
given up after 1.5 intervals without a packet from the remote.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque

from ..config import BridgeConfig, BridgeTopic
from .core import Broker
from .packets import (Connack, ConnackCode, Connect, Pingresp, ProtocolError, Puback, Pubcomp, Publish, Pubrec,
                      Pubrel, Reader, Suback, Subscribe, decode, encode, encode_publish)
from .sessions import Message
from .topics import matches

CONNECT_TIMEOUT = 10.0
WRITE_HIGH_WATER = 1024 * 1024
FLUSH_AT = 256 * 1024
# Packets from the remote held for a full local queue past which we stop reading it.
HELD_PACKETS = 1000
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


class Lost(Exception):
    """The remote closed the connection before it answered CONNECT."""


def local_to_remote(topics: tuple[BridgeTopic, ...], topic: str) -> str:
    """The remote topic for a local one, by the first `out`/`both` entry that matches it."""
    for t in topics:
        if t.direction != "in" and matches(t.local, topic):
            return t.remote_prefix + topic[len(t.local_prefix):]
    return topic  # queued under a topic line since removed from the config: sent as it is


def remote_to_local(topics: tuple[BridgeTopic, ...], topic: str) -> str | None:
    for t in topics:
        if t.direction != "out" and matches(t.remote, topic):
            return t.local_prefix + topic[len(t.remote_prefix):]
    return None


class Remote(asyncio.Protocol):
    """The connection to the remote broker; the Link of the bridge's local session, and a
    connection of the core for what the remote sends (see the module docstring)."""

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.broker = bridge.broker
        self.reader = Reader("client")
        self.transport: asyncio.Transport | None = None
        self.session = None  # set by core.bridge_attach
        self.will = None
        self.keepalive = 0
        self.out: list[bytes] = []
        self.out_bytes = 0
        self.flush_scheduled = False
        self.closing = False
        self.paused = False
        self.reading = True
        self.held: deque[Publish] = deque()
        self.retry_scheduled = False
        self.last_rx = self.last_tx = time.monotonic()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future = loop.create_future()
        self.lost: asyncio.Future = loop.create_future()
        self.reason = "closed by the remote"

    # asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if not self.closing:
            self.reader.feed(data)
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if exc is not None:
            self.reason = str(exc) or type(exc).__name__
        if self.session is not None:
            self.broker.bridge_detach(self.session, self)
            self.bridge.link_down()
        if not self.connack.done():
            self.connack.set_exception(Lost(self.reason))
        if not self.lost.done():
            self.lost.set_result(self.reason)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    # what the remote sends -------------------------------------------------------------------

    def _pump(self) -> None:
        self.retry_scheduled = False
        broker, held = self.broker, self.held
        try:
            while held and not self.closing and self.session is not None:
                if not broker.handle(self, held[0]):
                    break
                held.popleft()
            while not held and not self.closing:
                pkt = self.reader.next_packet()
                if pkt is None:
                    break
                self.last_rx = time.monotonic()
                kind = type(pkt)
                if kind is Publish:
                    self._incoming(pkt)
                elif kind in (Puback, Pubrec, Pubrel, Pubcomp) and self.session is not None:
                    broker.handle(self, pkt)
                elif kind is Connack:
                    if pkt.return_code == ConnackCode.ACCEPTED:
                        self.bridge.link_up(self)  # before the packets after it in this read
                    self.connack.set_result(pkt.return_code)
                elif kind is Suback:
                    self.bridge.link_ready()
                    refused = [f for f, code in zip(self.bridge.subscribed, pkt.return_codes) if code == 0x80]
                    if refused:
                        self.bridge.log.warning("bridge: the remote refused subscriptions", bridge=self.bridge.name,
                                                filters=",".join(refused))
                elif kind is not Pingresp:
                    raise ProtocolError(f"unexpected {kind.__name__} from the remote broker")
        except ProtocolError as e:
            self.close(f"protocol error: {e}")
            return
        want = not held
        if want != self.reading and self.transport is not None and not self.closing:
            self.reading = want
            (self.transport.resume_reading if want else self.transport.pause_reading)()

    def _incoming(self, pkt: Publish) -> None:
        bridge = self.bridge
        topic = remote_to_local(bridge.topics, pkt.topic)
        if self.session is None:
            raise ProtocolError("PUBLISH before CONNACK")
        bridge.received += 1
        if topic is None:  # an old subscription the remote kept for a persistent session
            bridge.unmapped += 1
            if pkt.qos:
                self.send((b"\x40\x02" if pkt.qos == 1 else b"\x50\x02") + pkt.packet_id.to_bytes(2, "big"))
            return
        if topic != pkt.topic:
            pkt = Publish(topic, pkt.payload, pkt.qos, pkt.retain, pkt.dup, pkt.packet_id)
        if not self.broker.handle(self, pkt):
            self.held.append(pkt)

    def retry_held(self) -> None:
        """Called by the core when a local queue this connection waits for has room again."""
        if not self.retry_scheduled and not self.closing:
            self.retry_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    # the Link: what the local session and the core write -------------------------------------

    def send(self, data: bytes, payload: bytes | None = None) -> None:
        if self.closing:
            return
        if payload is not None:
            data += payload
        if data[0] >> 4 == 3:  # PUBLISH (one whole packet per send): to the remote's topic
            if not data[0] & 0x08:
                self.bridge.sent += 1
            if self.bridge.remap_out:
                pkt, _ = decode(data, role="client")
                data = encode_publish(local_to_remote(self.bridge.topics, pkt.topic).encode(), pkt.payload,
                                      pkt.qos, pkt.retain, pkt.dup, pkt.packet_id)
        self.out.append(data)
        self.out_bytes += len(data)
        if self.out_bytes >= FLUSH_AT:
            self._write_out()  # the server's reason (server.FLUSH_AT)
        elif not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        self._write_out()

    def _write_out(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
            self.last_tx = time.monotonic()
        self.out.clear()
        self.out_bytes = 0

    def congested(self) -> bool:
        if self.paused or self.out_bytes >= WRITE_HIGH_WATER:
            self.bridge.congested += 1  # a QoS 0 message is dropped for it
            return True
        return False

    def close(self, reason: str = "") -> None:
        if self.closing:
            return
        if reason:
            self.reason = reason
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()


class Bridge:
    """One [[broker.bridge]]: its local session, its connection task, its counters (read by
    $SYS, the STATUS= line and the Prometheus exporter: name, connected, queued, sent,
    received, dropped)."""

    def __init__(self, cfg: BridgeConfig, broker: Broker, log):
        self.cfg, self.broker, self.log = cfg, broker, log
        self.name = cfg.name
        self.clientid = cfg.clientid
        self.topics = cfg.topics
        self.remap_out = any(t.local_prefix != t.remote_prefix for t in self.topics if t.direction != "in")
        self.session = broker.bridge_session(cfg.name, {t.local: t.qos for t in self.topics if t.direction != "in"})
        self.subscribed = [t.remote for t in self.topics if t.direction != "out"]
        self.private = cfg.try_private
        self.remote: Remote | None = None
        self.up = False  # connected and subscribed on the remote
        self.address = ""
        self.sent = self.received = self.unmapped = self.congested = 0
        self.task: asyncio.Task | None = None
        self._ctx = self._tls() if cfg.bridge_cafile is not None else None

    @property
    def connected(self) -> bool:
        return self.up

    @property
    def queued(self) -> int:
        return self.session.pending()

    @property
    def dropped(self) -> int:
        return self.session.dropped + self.congested + self.unmapped

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cfg.bridge_cafile))
        if self.cfg.bridge_certfile is not None:
            ctx.load_cert_chain(self.cfg.bridge_certfile, self.cfg.bridge_keyfile)
        return ctx

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"bridge {self.name}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        r = self.remote
        if r is not None and not r.closing:
            r.send(DISCONNECT)  # graceful: the remote keeps our session and publishes no will
            r.close("stopping")

    # connecting ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            for address in self.cfg.address:
                if await self._attempt(address):
                    break
            self.log.info(f"bridge: connecting again in {self.cfg.restart_timeout:g} s", bridge=self.name)
            await asyncio.sleep(self.cfg.restart_timeout)

    async def _attempt(self, address: str) -> bool:
        """Connect to one address and stay until the connection ends. True if it was up."""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        while True:
            self.log.info("bridge: connecting", bridge=self.name, address=address,
                          level="0x84" if self.private else "4", tls="yes" if self._ctx else "no")
            loop = asyncio.get_running_loop()
            tls = {"ssl": self._ctx, "server_hostname": host} if self._ctx is not None else {}
            try:
                _, remote = await asyncio.wait_for(
                    loop.create_connection(lambda: Remote(self), host, int(port), **tls), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:  # ssl.SSLError is an OSError
                self.log.info("bridge: connect failed", bridge=self.name, address=address,
                              error=str(e) or type(e).__name__)
                return False
            self.remote = remote
            cfg = self.cfg
            remote.send(encode(Connect(self.clientid, cfg.cleansession, cfg.keepalive_interval, None,
                                       cfg.remote_username or None,
                                       cfg.remote_password.encode() if cfg.remote_password else None,
                                       bridge=self.private)))
            try:
                code = await asyncio.wait_for(asyncio.shield(remote.connack), CONNECT_TIMEOUT)
            except (Lost, asyncio.TimeoutError) as e:
                remote.close("no CONNACK")
                if self.private:  # a broker that does not know 0x84 may just close
                    self.private = False
                    self.log.info("bridge: no CONNACK to a bridge CONNECT (0x84); trying protocol level 4",
                                  bridge=self.name, address=address, error=str(e) or "timeout")
                    continue
                self.log.info("bridge: connect failed", bridge=self.name, address=address,
                              error=str(e) or "no CONNACK in time")
                return False
            if code != ConnackCode.ACCEPTED:
                remote.close("refused")
                if code == ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION and self.private:
                    self.private = False
                    self.log.info("bridge: the remote refused a bridge CONNECT (0x84); trying protocol level 4",
                                  bridge=self.name, address=address)
                    continue
                self.log.warning("bridge: the remote refused the connection", bridge=self.name, address=address,
                                 code=int(code), reason=ConnackCode(code).name.lower())
                return False
            self.address = address
            self.log.info(f"bridge: connected to {address}", bridge=self.name, clientid=self.clientid,
                          level="0x84" if self.private else "4")
            await self._keep_alive(remote)
            self.log.info("bridge: connection lost", bridge=self.name, address=address, reason=remote.reason)
            return True

    async def _keep_alive(self, remote: Remote) -> None:
        interval = self.cfg.keepalive_interval
        while not remote.lost.done():
            await asyncio.wait((remote.lost,), timeout=interval / 4)
            now = time.monotonic()
            if now - remote.last_rx > 1.5 * interval:
                remote.close(f"nothing from the remote for {1.5 * interval:g} s (keep-alive)")
            elif now - remote.last_tx >= interval:
                remote.send(PINGREQ)

    def link_up(self, remote: Remote) -> None:
        """CONNACK accepted: subscribe on the remote, then let the local session send."""
        if self.subscribed:
            session = self.session
            pid = next(p for p in range(65535, 0, -1) if p not in session.inflight)
            remote.send(encode(Subscribe(pid, tuple((t.remote, t.qos) for t in self.topics
                                                     if t.direction != "out"))))
        self.broker.bridge_attach(self.session, remote)
        if not self.subscribed:
            self.link_ready()

    def link_ready(self) -> None:
        """Connected and subscribed on the remote: said as Mosquitto does, retained, at once."""
        if not self.up:
            self.up = True
            self._state(True)

    def link_down(self) -> None:
        self.up = False
        self._state(False)

    def _state(self, up: bool) -> None:
        self.broker.publish(Message(f"$SYS/broker/connection/{self.clientid}/state", b"1" if up else b"0", 0, True))

    def sys_topics(self) -> dict[str, str]:
        base = f"$SYS/broker/bridge/{self.name}/"
        return {
            base + "connected": str(int(self.connected)),
            base + "queued": str(self.queued),
            base + "sent": str(self.sent),
            base + "received": str(self.received),
            base + "dropped": str(self.dropped),
            f"$SYS/broker/connection/{self.clientid}/state": str(int(self.connected)),
        }

    def summary(self) -> str:
        return f"{self.name}:{'up' if self.connected else 'down'}/q={self.queued}"


__all__ = ["Bridge", "Remote", "local_to_remote", "remote_to_local"]
