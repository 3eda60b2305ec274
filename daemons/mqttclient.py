"""paho-mqtt 2.x, built the way every client daemon of ours needs it.

Theory of operation: paho's own network thread (`loop_start`) does the I/O and the
reconnects; we only decide *when* it reconnects. paho's backoff doubles without jitter, so a
broker restart would see every client of a host come back in lock-step; in `on_disconnect`
and `on_connect_fail` (both run before paho sleeps) we compute our own exponential delay
with jitter and hand it to paho with `reconnect_delay_set(d, d)`.

Subscriptions are remembered and sent again on every successful CONNACK, so a broker that
lost our session (restart without persistence, or a clean session) still delivers to us.

Callbacks run in paho's thread. Daemons that need their own thread (most of them) hand the
message on through a queue; with `manual_ack=True` paho does not acknowledge a QoS 1/2
message until the daemon calls `ack()`, which is how "ack only after it is durable" is kept.
"""

from __future__ import annotations

import random
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

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
        retry: bool = True,
        host: str | None = None,
        port: int | None = None,
        max_inflight: int = 20,
        tune_receiver: bool = False,
    ):
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

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
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
        self.paho = c
        # Buffered reads and batched PUBACKs for a high-rate receiver (see mqtttune); False when
        # this paho release differs from the tested one, and the client stays stock.
        self.tuned = mqtttune.tune_receiver(c) if tune_receiver else False
        self._stopping = False
        self._set_delay()

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; returns at once."""
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
        self.paho.disconnect()
        self.paho.loop_stop()
        self._connected.clear()

    # traffic ---------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> paho.MQTTMessageInfo:
        return self.paho.publish(topic, payload, qos, retain)

    def subscribe(self, topic: str, qos: int) -> None:
        self._subs[topic] = qos
        if self.connected:
            self.paho.subscribe(topic, qos)

    def ack(self, mid: int, qos: int) -> None:
        self.paho.ack(mid, qos)

    def ack_many(self, mids: Sequence[int]) -> None:
        """Acknowledge QoS 1 messages, in this order; one write when tuned."""
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
            client.subscribe(list(self._subs.items()))
        self._connected.set()
        self._settled.set()
        if self._on_connect_cb:
            self._on_connect_cb(flags.session_present)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._on_disconnect_cb is not None:
            # Runs before paho reconnects: packet ids of this connection are void from here on.
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
        if self._on_message is not None:
            self._on_message(message)


def check(rc: MQTTErrorCode | int, what: str) -> None:
    """Turn a paho return code into our exception."""
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise MqttError(f"{what}: {paho.error_string(rc)}")
