"""paho-mqtt for high message rates: read buffering and batched PUBACKs. Used through
`mqttclient.MqttClient(tune_receiver=True)` and its `ack()`, and by `iotctl stress`.

Why: profiled at 20,000 msg/s (docs/BENCHMARKS.md, "Ingest"), stock paho 2.x spends about
40 us of CPU per received QoS 1 message, most of it in system calls: it reads every packet
with three recv() calls (type byte, length, body), goes back to select() after each packet
when it has nothing of its own in flight (`loop_read` reads at most len(out)+len(in)
packets), and `ack()` queues each 4-byte PUBACK on its own, waking the network thread
through its socket pair and sending it with its own send(). With the three changes below
the same traffic costs about 17 us per message. The MQTT behaviour is unchanged: the same
bytes go out in the same order, and nothing is acknowledged earlier than before.

* `BufferedSocket` serves paho's small recv() calls from one 256 KiB recv(); its `pending()`
  tells paho's loop (which already asks TLS sockets the same) that bytes wait in the buffer.
* `loop_read` is given a per-call packet budget of 1000 instead of 1.
* `ack_many` queues the PUBACKs of a whole batch as one write, in the order given.

These touch paho internals (`_create_socket`, `_packet_read`, `_loop_rc_handle`,
`_packet_queue`); `tune_receiver` checks they exist and returns False, leaving the client
stock, when a paho release has changed them (deploy/constraints.txt pins the tested one, for
the system install, the checkout's venv and CI alike). `IOT_PAHO_STOCK=1` in the environment
leaves every client stock too: to tell a paho problem from ours, and for the test that proves
the stock path keeps every promise.
"""

from __future__ import annotations

import os

from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK = 256 * 1024
PACKETS_PER_READ = 1000
PUBACK = 0x40
_NEEDED = ("_create_socket", "_packet_read", "_loop_rc_handle", "_packet_queue", "_sock")


class BufferedSocket:
    """A socket whose recv() is served from a buffer filled by one large recv(), and whose
    send() may be held back (`hold_writes`) until `flush()` writes everything at once."""

    __slots__ = ("_s", "_buf", "_pos", "_wbuf", "_hold")

    def __init__(self, sock):
        self._s = sock
        self._buf = b""
        self._pos = 0
        self._wbuf = bytearray()
        self._hold = False

    def send(self, data) -> int:
        if not self._hold:
            return self._s.send(data)
        self._wbuf += data
        return len(data)

    def flush(self, timeout: float = 30.0) -> None:
        """Write what send() held back; waits for the socket (bounded) if its buffer is full."""
        import select  # noqa: PLC0415

        deadline = None
        while self._wbuf:
            try:
                n = self._s.send(self._wbuf)
            except BlockingIOError:
                import time  # noqa: PLC0415

                now = time.monotonic()
                deadline = deadline or now + timeout
                if now > deadline:
                    raise TimeoutError("socket not writable") from None
                select.select([], [self._s], [], 0.5)
                continue
            del self._wbuf[:n]

    def recv(self, n: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self._s.recv(READ_CHUNK)  # BlockingIOError when nothing waits, as paho expects
            if not buf:
                return buf
            self._buf, pos = buf, 0
        self._pos = pos + n
        return buf[pos:pos + n]

    def pending(self) -> int:
        inner = getattr(self._s, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str):
        return getattr(self._s, name)


def supported(client) -> bool:
    if os.environ.get("IOT_PAHO_STOCK", "") not in ("", "0"):
        return False
    return all(hasattr(client, n) for n in _NEEDED) and getattr(client, "_transport", "tcp") != "websockets"


def tune_receiver(client) -> bool:
    """Buffer reads and read many packets per wake-up. Call before connecting."""
    if not supported(client):
        return False
    create = client._create_socket
    client._create_socket = lambda: BufferedSocket(create())

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        for _ in range(PACKETS_PER_READ):
            if client._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = client._packet_read()
            if rc > 0:
                return client._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client.loop_read = loop_read
    return True


def tune_publisher(client) -> bool:
    """For a client driven from one thread (no loop_start) that publishes in bursts: reads
    are buffered as for a receiver, and packets queued by publish() are not written with one
    send() each but held until the caller's `loop_write()` and `client.socket().flush()`
    after the burst: one system call, and one read for the broker, per burst."""
    if not tune_receiver(client):
        return False
    create = client._create_socket

    def make():
        s = create()
        s._hold = True
        return s

    client._create_socket = make
    # With a write callback registered, publish() queues instead of writing at once.
    client.on_socket_register_write = lambda *a: None
    return True


def puback_bytes(mids) -> bytes:
    """PUBACK packets (MQTT 3.1.1 section 3.4) for these packet ids, in order."""
    return b"".join([b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids])


def ack_many(client, mids) -> None:
    """Queue the PUBACKs of many QoS 1 messages as one write (same bytes as ack() per mid)."""
    client._packet_queue(PUBACK, puback_bytes(mids), 0, 0)
