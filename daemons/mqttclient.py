"""paho-mqtt 2.x, built the way every client daemon of ours needs it.

Theory of operation: paho's own network thread (`loop_start`) does the I/O and the
reconnects; we only decide *when* it reconnects. paho's backoff doubles without jitter, so a
broker restart would see every client of a host come back in lock-step; in `on_disconnect`
and `on_connect_fail` (both run before paho sleeps) we compute our own exponential delay
with jitter and hand it to paho with `reconnect_delay_set(d, d)`.

Subscriptions are remembered and sent again on every successful CONNACK, so a broker that
lost our session (restart without persistence, or a clean session) still delivers to us.

MQTT 5.0 (`[mqtt] protocol = "5"`, or `protocol=` here): a clean session becomes Clean Start 1
at every connect, a persistent one Clean Start 0 with a Session Expiry Interval that never ends
(as mosquitto_sub -c does) unless the connect properties set one.

Callbacks run in paho's thread. A daemon that acknowledges only once a message is durable
(`manual_ack=True`) takes its messages from `client.inbox` and acknowledges them with
`client.ack(deliveries)`: that is the one manual-ack path of the project (see `Inbox`).
"""

from __future__ import annotations

import random
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version  # noqa: F401 - daemons log the paho they run
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import mqtttune
from .config import MqttConfig
from .service import Log


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes | str
    qos: int = 1
    retain: bool = True


class MqttError(Exception):
    pass


# [mqtt] protocol (and iotctl -V) -> paho's protocol constant
PROTOCOLS = {"3.1": paho.MQTTv31, "3.1.1": paho.MQTTv311, "5": paho.MQTTv5}
NEVER_EXPIRES = 0xFFFFFFFF  # Session Expiry Interval: the session outlives every disconnect

# (epoch, message): a message as the inbox hands it out, with the connection it came on.
Delivery = tuple[int, paho.MQTTMessage]


class Inbox:
    """The one manual-ack path: paho's thread -> Inbox -> the daemon's thread, which makes each
    message durable and then acknowledges it with `MqttClient.ack()`.

    Invariants kept here, so that no daemon has to:

    * A QoS 0 message is never acknowledged: it has no packet id, and a PUBACK for id 0 makes
      the broker close the connection (MQTT-2.3.1-1), after which a retained message would
      come back on the next SUBSCRIBE, forever.
    * Packet ids name a message only on the connection that carried it. `epoch` moves on at
      every disconnect and connect (under `lock`, in paho's thread, before paho reconnects and
      discards its unsent packets), and `ack()` skips deliveries of an older epoch: the broker
      sends those again, and they are acknowledged then. Without this a late ack could free a
      reused packet id of a message that is not yet durable.
    * Bounded: past `limit` waiting messages `put()` blocks paho's thread, so it stops reading
      from the broker and TCP pushes back; nothing is dropped. `close()` ends such a wait.
    """

    def __init__(self, limit: int = 10_000):
        self.limit = max(1, limit)
        self.epoch = 0
        self.lock = threading.Lock()
        self._items: deque[Delivery] = deque()
        self._wake = threading.Event()
        self._sleeping = False  # the taker waits on _wake; put() sets it only then (cheaper)
        self._woken = False
        self._space = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    # paho's thread

    def put(self, msg: paho.MQTTMessage) -> None:
        items = self._items
        if len(items) >= self.limit:
            with self._space:
                while len(items) >= self.limit and not self._closed:
                    self._space.wait(0.5)
        items.append((self.epoch, msg))
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    def next_epoch(self) -> None:
        with self.lock:
            self.epoch += 1

    # any thread

    def wake(self) -> None:
        """End the taker's current or next `wait()` (a daemon's other event sources call this)."""
        self._woken = True
        self._wake.set()

    def close(self) -> None:
        """Unblock a `put()` waiting for room: the client is stopping."""
        self._closed = True
        with self._space:
            self._space.notify_all()

    # the daemon's thread

    def wait(self, timeout: float) -> bool:
        """Until a message waits, `wake()` is called, or `timeout` s pass; True if one waits."""
        if not self._items and not self._woken:
            self._wake.clear()
            self._sleeping = True
            if not self._items and not self._woken:
                self._wake.wait(timeout)
            self._sleeping = False
        self._woken = False
        return bool(self._items)

    def oldest(self) -> float | None:
        """When (time.monotonic) the oldest waiting message arrived; None if none waits. Any thread."""
        try:
            return self._items[0][1].timestamp
        except IndexError:
            return None

    def take(self, n: int) -> list[Delivery]:
        """Up to `n` waiting deliveries, oldest first."""
        items = self._items
        pop = items.popleft
        got = [pop() for _ in range(min(n, len(items)))]
        if got and len(items) < self.limit:
            with self._space:
                self._space.notify_all()
        return got


def backoff(attempt: int, lo: float, hi: float) -> float:
    """Exponential delay capped at `hi`, with jitter in its upper half so clients spread out."""
    d = min(hi, lo * (2 ** min(attempt, 30)))
    return d / 2 + random.uniform(0, d / 2)


class MqttClient:
    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        *,
        log: Log,
        clean_session: bool = True,
        will: Will | None = None,
        manual_ack: bool = False,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: Callable[[paho.MQTTMessage], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_publish: Callable[[int], None] | None = None,
        retry: bool = True,
        host: str | None = None,
        port: int | None = None,
        max_inflight: int = 20,
        tune_receiver: bool = False,
        inbox_limit: int = 10_000,
        protocol: str | None = None,
        properties: dict[str, Properties] | None = None,
    ):
        """`protocol`: "3.1", "3.1.1" or "5" (default: `cfg.protocol`). `properties`: MQTT 5.0
        properties for the "connect", "subscribe" and "disconnect" packets."""
        self.cfg, self.log, self.retry = cfg, log, retry
        self.host = host or cfg.host
        self.port = port or cfg.port
        self.client_id = client_id
        self._subs: dict[str, int] = dict(subscriptions)
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._attempt = 0
        self._connected = threading.Event()
        self._settled = threading.Event()  # set on the first connect outcome (success or give-up)
        # Set when the broker has granted the subscriptions sent at the latest connect.
        self.subscribed = threading.Event()
        self.last_error: str | None = None
        # manual_ack: messages go to the inbox (not to on_message) and are acknowledged by ack().
        self.inbox: Inbox | None = Inbox(inbox_limit) if manual_ack else None
        self.protocol = protocol or cfg.protocol
        self.v5 = self.protocol == "5"
        self._props = dict(properties or {})
        self._clean_start = clean_session
        if self.v5:
            connect_props = self._props.setdefault("connect", Properties(PacketTypes.CONNECT))
            if not clean_session and not hasattr(connect_props, "SessionExpiryInterval"):
                connect_props.SessionExpiryInterval = NEVER_EXPIRES

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self.v5 else clean_session,  # 5.0: Clean Start, at connect
            protocol=PROTOCOLS[self.protocol],
            manual_ack=manual_ack,
            reconnect_on_failure=retry,
        )
        c.max_inflight_messages_set(max_inflight)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.read_password())
        if cfg.cafile is not None:
            c.tls_set(
                ca_certs=str(cfg.cafile),
                certfile=str(cfg.certfile) if cfg.certfile else None,
                keyfile=str(cfg.keyfile) if cfg.keyfile else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_connect_fail = self._handle_connect_fail
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe
        if on_publish is not None:
            # paho's thread, at PUBACK (QoS 1) or PUBCOMP (QoS 2) of the message with this mid.
            c.on_publish = lambda client, userdata, mid, reason_code, properties: on_publish(mid)
        self.paho = c
        # Buffered reads and batched PUBACKs for a high-rate receiver (see mqtttune); False when
        # this paho release differs from the tested one, and the client stays stock.
        self.tuned = mqtttune.tune_receiver(c) if tune_receiver else False
        self._stopping = False
        self._set_delay()

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        if self.v5:
            self.paho.connect_async(self.host, self.port, self.cfg.keepalive, clean_start=self._clean_start,
                                    properties=self._props["connect"])
        else:
            self.paho.connect_async(self.host, self.port, self.cfg.keepalive)
        self.paho.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected; False on timeout, or at once when retry=False and it failed."""
        if not self.retry:
            self._settled.wait(timeout)
            return self._connected.is_set()
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish our will) and end the thread."""
        self._stopping = True
        if self.inbox is not None:
            self.inbox.close()  # paho's thread may wait for room in it; loop_stop() joins that thread
        self.paho.disconnect(properties=self._props.get("disconnect"))
        self.paho.loop_stop()
        self._connected.clear()

    # traffic ---------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                properties: Properties | None = None) -> paho.MQTTMessageInfo:
        return self.paho.publish(topic, payload, qos, retain, properties)

    def subscribe(self, topic: str, qos: int) -> None:
        self._subs[topic] = qos
        if self.connected:
            self.paho.subscribe(topic, qos)

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Acknowledge these deliveries from `inbox`, in order, once what they carry is durable.
        QoS 0 and deliveries of an older connection are skipped (see `Inbox`). Returns how many
        acknowledgements were queued; the QoS 1 ones of one call go out as one write when tuned."""
        inbox = self.inbox
        assert inbox is not None, "ack() needs manual_ack=True"
        sent = 0
        with inbox.lock:
            epoch = inbox.epoch
            run: list[int] = []  # consecutive QoS 1 packet ids, sent together
            for e, m in deliveries:
                if e != epoch or m.qos == 0:
                    continue
                if m.qos == 1:
                    run.append(m.mid)
                    continue
                self._puback(run)
                run = []
                self.paho.ack(m.mid, 2)  # PUBCOMP: paho delivered it on PUBREL
                sent += 1
            self._puback(run)
            return sent + len(run)

    def _puback(self, mids: list[int]) -> None:
        if not mids:
            return
        if self.tuned:
            mqtttune.ack_many(self.paho, mids)
        else:
            for mid in mids:
                self.paho.ack(mid, 1)

    # paho callbacks (its network thread) -------------------------------------------------------

    def _set_delay(self) -> None:
        self.delay = backoff(self._attempt, self.cfg.reconnect_min, self.cfg.reconnect_max)
        self.paho.reconnect_delay_set(self.delay, self.delay)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.inbox is not None:
            self.inbox.next_epoch()
        if reason_code.is_failure:
            self.last_error = f"connection refused by {self.host}:{self.port}: {reason_code}"
            self._give_up_or_back_off(self.last_error)
            return
        self._attempt = 0
        self._set_delay()
        self.log.info("connected to broker", host=self.host, port=self.port, client_id=self.client_id,
                      session_present=int(flags.session_present))
        # SUBSCRIBE is queued before anyone is told we are connected, so nothing a waiting
        # thread publishes next can overtake it on the wire.
        if self._subs:
            client.subscribe(list(self._subs.items()), properties=self._props.get("subscribe"))
        self._connected.set()
        self._settled.set()
        if self._on_connect_cb:
            self._on_connect_cb(flags.session_present)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.inbox is not None:
            # Runs before paho reconnects: packet ids of this connection are void from here on.
            self.inbox.next_epoch()
        if self._on_disconnect_cb is not None:
            self._on_disconnect_cb()
        was = self._connected.is_set()
        self._connected.clear()
        self.subscribed.clear()
        if was and not self._stopping:
            self.log.warning("disconnected from broker", host=self.host, port=self.port, reason=str(reason_code))
        self._give_up_or_back_off(None)

    def _handle_connect_fail(self, client, userdata) -> None:
        self.last_error = f"cannot connect to {self.host}:{self.port}"
        self._give_up_or_back_off(self.last_error)

    def _give_up_or_back_off(self, error: str | None) -> None:
        if not self.retry:
            self._settled.set()
            return
        self._attempt += 1
        self._set_delay()
        if error:
            self.log.warning(error, retry_in=f"{self.delay:.1f}s")

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        granted = [rc.value for rc in reason_codes]
        if any(g >= 0x80 for g in granted):
            self.log.warning("subscription refused by broker", granted=granted)
        else:
            self.log.info("subscribed", granted=",".join(map(str, granted)))
            self.subscribed.set()

    def _handle_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        if self.inbox is not None:
            self.inbox.put(message)
        elif self._on_message is not None:
            self._on_message(message)


def check(rc: MQTTErrorCode | int, what: str) -> None:
    """Turn a paho return code into our exception."""
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise MqttError(f"{what}: {paho.error_string(rc)}")
