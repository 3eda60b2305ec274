"""Load and validate the one configuration file, etc/iot/iot.toml.

Theory of operation: every section is a frozen dataclass whose field defaults *are* the
defaults (the shipped iot.toml repeats them as documentation). `load()` reads the TOML once,
walks each section's fields, converts and checks every value, and returns a `Config` of
those dataclasses. Anything unexpected (an unknown section or key, a wrong type, a value out
of range, a file that does not exist) raises `ConfigError`, whose str() is the one line a
daemon prints before exiting with EX_CONFIG (78).

Where the file is: `--config`, else `$IOT_CONFIG`, else `etc/iot/iot.toml` in the checkout
this package runs from, else `/etc/iot/iot.toml`. A path named by the user must exist; when
the search finds nothing, the built-in defaults apply. Relative paths inside the file are
resolved against the file's folder, so a checkout's file can say `state_dir = "../../var"`.

The environment overrides the file, key by key, as container users expect: `IOT_<SECTION>_<KEY>`
in upper case sets `[section] key`. No section name has an underscore, so the first one after
`IOT_` ends the section: IOT_INGEST_BATCH_SIZE is [ingest] batch_size. Precedence is default <
file < environment; a daemon's own flags (iot-broker --port, iot-controller --session, -v) are
applied after this by that daemon. How a variable's string becomes a value:

- a str or Path key takes the string as it is, so IOT_MQTT_HOST=broker.lan needs no quotes and
  a password "12345" or "true" stays that string; "" unsets an optional path, as in the file;
- any other key takes it as a TOML value: 8883, 2.5, true, ["sensors/#", "lab/#"], and for a
  table-valued key an inline table, {"*-ingest" = 5000}. A string that is no TOML value is
  checked as that string, so the error shows what was given ("got 'x'").

Relative paths from the environment resolve against the current directory, not the file's
folder: whoever sets a variable writes it relative to where the command runs (a shell, a
container's WORKDIR), and need not know which file the search found, or whether there is one.

Arrays of tables ([[broker.listener]], [[plc.device]], [[factory.device]], [[factory.rule]]) have
no environment spelling; IOT_PLC_DEVICE is an error, not ignored. Any other IOT_ variable that
names no key is an error too, since a typo must not pass silently, except those in RESERVED,
which the project uses for other things. Errors name the variable the way file errors name the
file: "environment IOT_BROKER_PORT: [broker] port: expected an integer from 1 to 65535, got 'x'".
The loaded Config records where each key came from (`origins`) for `iotctl config show` and for
errors found later by a daemon (`Config.origin`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EX_CONFIG = 78
SYSTEM_CONFIG = Path("/etc/iot/iot.toml")
CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "etc" / "iot" / "iot.toml"
ENV_PREFIX = "IOT_"
# IOT_ variables that are not config keys, and why they exist; never a key's name.
RESERVED = {
    "IOT_CONFIG": "the config file's path (see find())",
    "IOT_BROKER_FAILPOINT": "a crash point for the broker store's tests (broker/server.py)",
    "IOT_PAHO_STOCK": "1 = paho-mqtt without our receive tuning (mqtttune.py)",
    "IOT_WRITE_VECTORS": "1 = the ingest test vectors in docs/PROTOCOL.md are written anew (tests)",
}


class ConfigError(Exception):
    """A config problem, phrased as one line: file, key, what was expected."""

    def __init__(self, path: Path | str | None, key: str, problem: str):
        self.path, self.key, self.problem = path, key, problem
        where = str(path) if path else "built-in defaults"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


_EXPIRATION_UNITS = {"s": 1, "h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


def share_name(text: str) -> None:
    """A shared subscription's group name (MQTT 5 section 4.8.2): non-empty, no '/', '+', '#'."""
    if not text or any(c in text for c in "/+#"):
        raise ValueError(f"expected a non-empty name without '/', '+' or '#', got {text!r}")


def expiration_seconds(text: str) -> float:
    """Mosquitto's persistent_client_expiration format: an integer and a unit, h (hours),
    d (days), w (weeks), m (months of 30 days) or y (years of 365 days), e.g. "30d", and also
    s (seconds), which Mosquitto does not take. "" and "0" mean never (returned as 0).
    Raises ValueError saying what is expected."""
    if text in ("", "0"):
        return 0.0
    number, unit = text[:-1], text[-1:]
    if not number.isascii() or not number.isdigit() or unit not in _EXPIRATION_UNITS or int(number) == 0:
        raise ValueError(f'expected a whole number and a unit s, h, d, w, m or y (e.g. "30d"), '
                         f'or "" or "0" for never, got {text!r}')
    return float(int(number) * _EXPIRATION_UNITS[unit])


def metrics_address(text: str) -> tuple[str, int] | None:
    """A `metrics` key: "HOST:PORT" (an IPv6 host in brackets: "[::1]:9600") -> (host, port);
    "" -> None (off). Raises ValueError saying what is expected."""
    if text == "":
        return None
    expected = ('expected "" (off) or ADDRESS:PORT with an IP address and a port from 1 to 65535, '
                f'e.g. "127.0.0.1:9600", got {text!r}')
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(expected)
    elif ":" in host:
        raise ValueError(expected)  # IPv6 without brackets: its last group would pass for the port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(expected) from None
    if not sep or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(expected)
    return host, int(port)


def _metrics(port: int) -> Any:
    """A section's `metrics` key: loopback by default, on the port of its block (etc/iot/iot.toml)."""
    return field(default=f"127.0.0.1:{port}", metadata={"check": metrics_address})


@dataclass(frozen=True, slots=True)
class PathsConfig:
    # Daemons keep their state below this folder: outbox/, transfer/, dlq/, db/.
    state_dir: Path = Path("/var/lib/iot")


@dataclass(frozen=True, slots=True)
class LogConfig:
    # Lines below this level are not logged. Applied at start and on SIGHUP (`systemctl reload`);
    # a daemon's -v flag means "debug" whatever this says.
    level: str = field(default="info", metadata=_choices("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """How client daemons (and iotctl) reach the broker."""

    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=_range(1, 65535))
    client_id_prefix: str = "iot"
    username: str = ""
    password: str = field(default="", metadata={"secret": True})
    # A file holding the password (first line), so the password need not sit in iot.toml.
    password_file: Path | None = None
    # TLS is on when cafile is set; certfile/keyfile add a client certificate.
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    keepalive: int = field(default=60, metadata=_range(5, 65535))
    # Reconnect backoff: doubles from the first delay up to the cap, with random jitter.
    reconnect_min: float = field(default=0.5, metadata=_range(0.05, 60))
    reconnect_max: float = field(default=30.0, metadata=_range(0.1, 3600))
    # The MQTT version the daemons (and iotctl's default -V) speak: "3.1.1", or "5" for MQTT 5.0.
    protocol: str = field(default="3.1.1", metadata=_choices("3.1.1", "5"))

    def read_password(self) -> str | None:
        if self.password_file is not None:
            try:
                return self.password_file.read_text().splitlines()[0] if self.password_file.stat().st_size else ""
            except OSError as e:
                raise ConfigError(None, "[mqtt] password_file", f"cannot read {self.password_file}: {e.strerror}") from e
        return self.password or None


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One `[[broker.listener]]` table: a listener beside the default one ([broker] host/port).
    Keys named and meant as Mosquitto's `listener` options."""

    port: int = field(metadata={**_range(1, 65535), "required": "each listener needs a port, 1-65535"})
    # "" = [broker] host.
    bind_address: str = ""
    protocol: str = field(default="mqtt", metadata=_choices("mqtt", "websockets"))
    # TLS is on when certfile and keyfile are set; the rest below need it.
    certfile: Path | None = None
    keyfile: Path | None = None
    # The CA that signs client certificates.
    cafile: Path | None = None
    require_certificate: bool = False
    # The client certificate's subject CN is the client's user name (needs require_certificate).
    use_identity_as_username: bool = False
    # The lowest TLS version accepted: "" = Python's default (TLS 1.2 today).
    tls_version: str = field(default="", metadata=_choices("", "tlsv1.2", "tlsv1.3"))
    # Overrides [broker] allow_anonymous on this listener; absent = the broker's.
    allow_anonymous: bool | None = None

    @property
    def tls(self) -> bool:
        return self.certfile is not None


@dataclass(frozen=True, slots=True)
class BridgeTopic:
    """One `topic` line of a bridge, as Mosquitto parses it (see parse_bridge_topic)."""

    pattern: str
    direction: str  # "out", "in" or "both"
    qos: int
    local_prefix: str
    remote_prefix: str

    @property
    def local(self) -> str:
        """The filter on the local side (the topic itself when the pattern is "")."""
        return self.local_prefix + self.pattern

    @property
    def remote(self) -> str:
        return self.remote_prefix + self.pattern


BRIDGE_DIRECTIONS = ("out", "in", "both")


def parse_bridge_topic(line: str) -> BridgeTopic:
    """`PATTERN [[[out|in|both] QOS] LOCAL_PREFIX REMOTE_PREFIX]`, Mosquitto's `topic`; `""`
    stands for an empty pattern or prefix. An empty pattern needs both prefixes: they are the
    two full topics (one topic remapped). Raises ValueError saying what is expected."""
    from .broker.packets import ProtocolError, validate_topic_filter  # noqa: PLC0415 - pure, and only needed here

    words = ["" if w == '""' else w for w in line.split()]
    if not words or len(words) > 5 or len(words) == 4:
        raise ValueError(f'expected "PATTERN [out|in|both [QOS [LOCAL_PREFIX REMOTE_PREFIX]]]", got {line!r}')
    pattern, direction, qos, local, remote = words + ["out", "0", "", ""][len(words) - 1:]
    if direction not in BRIDGE_DIRECTIONS:
        raise ValueError(f"expected a direction out, in or both, got {direction!r} in {line!r}")
    if qos not in ("0", "1", "2"):
        raise ValueError(f"expected a QoS 0, 1 or 2, got {qos!r} in {line!r}")
    for prefix in (local, remote):
        if "+" in prefix or "#" in prefix:
            raise ValueError(f"a prefix may not hold wildcards, got {prefix!r} in {line!r}")
    if not pattern and not (local and remote):
        raise ValueError(f'an empty pattern ("") needs a local and a remote prefix, got {line!r}')
    t = BridgeTopic(pattern, direction, int(qos), local, remote)
    try:
        validate_topic_filter(t.local)
        validate_topic_filter(t.remote)
    except ProtocolError as e:
        raise ValueError(f"not a topic filter: {e} in {line!r}") from None
    if not pattern and ("+" in t.local or "#" in t.local):
        raise ValueError(f"remapping one topic needs topics without wildcards, got {line!r}")
    return t


def _address(text: str) -> None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f'expected "host:port" with a port from 1 to 65535, got {text!r}')


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """One `[[broker.bridge]]` table: a connection to another broker, Mosquitto's bridge
    options by their names (broker/bridge.py)."""

    # Mosquitto's `connection`: names the bridge in logs, $SYS and the store.
    name: str = field(metadata={"required": "each bridge needs a name (Mosquitto's connection)"})
    # "host:port" addresses, tried in order: the next one when a connect fails.
    address: tuple[str, ...] = field(metadata={"required": 'each bridge needs address = ["host:port", ...]'})
    topic: tuple[str, ...] = ()
    # "" = "<hostname>.<name>", as Mosquitto.
    remote_clientid: str = ""
    remote_username: str = ""
    remote_password: str = ""
    # TLS to the remote: on with bridge_cafile (the remote's certificate is verified against it).
    bridge_cafile: Path | None = None
    bridge_certfile: Path | None = None
    bridge_keyfile: Path | None = None
    cleansession: bool = False
    keepalive_interval: int = field(default=60, metadata=_range(5, 65535))
    # CONNECT with protocol level 0x84 (a bridge, as Mosquitto), then 4 if the remote refuses it.
    try_private: bool = True
    # Seconds before connecting again after the connection was lost or every address failed.
    restart_timeout: float = field(default=5.0, metadata=_range(0.1, 3600))

    @property
    def topics(self) -> tuple[BridgeTopic, ...]:
        return tuple(parse_bridge_topic(line) for line in self.topic)

    @property
    def clientid(self) -> str:
        return self.remote_clientid or f"{socket.gethostname()}.{self.name}"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str = "0.0.0.0"
    port: int = field(default=1883, metadata=_range(1, 65535))
    # More listeners, [[broker.listener]] tables: TLS, WebSocket, other addresses. host/port
    # above stay the default listener.
    listener: tuple[ListenerConfig, ...] = ()
    # Bridges to other brokers, [[broker.bridge]] tables (Mosquitto's bridge options).
    bridge: tuple[BridgeConfig, ...] = ()
    # Also bounded by the file descriptor limit (server.py raises it to the hard limit at start).
    max_connections: int = field(default=100_000, metadata=_range(1, 1_000_000))
    # Largest packet body (remaining length, without the fixed header) accepted from a client.
    max_packet_size: int = field(default=16 * 1024 * 1024, metadata=_range(64, 268_435_455))
    # Seconds a new connection may take to send CONNECT.
    connect_timeout: float = field(default=10.0, metadata=_range(0.1, 3600))
    # Mosquitto's default is 20; ours writes what one loop pass produced in one write, so an
    # acknowledgement comes back a whole pass later and 20 bound a 1 -> 1 QoS 1 flow to about
    # 0.7 of what the CPU allows (docs/BENCHMARKS.md, issue 21). 100 took the window out of it.
    max_inflight_messages: int = field(default=100, metadata=_range(1, 65535))
    # A larger window for the clients named here (fnmatch patterns of client ids): a consumer
    # that commits in batches, such as iot-ingest ("<client_id_prefix>-ingest"), needs
    # thousands of messages in flight to batch at all; 20 makes it commit 20 rows at a time.
    max_inflight_per_client: dict[str, int] = field(default_factory=lambda: {"*-ingest": 5000, "*-ingest-*": 5000},
                                                    metadata=_range(1, 65535))
    # Deliberately above Mosquitto's 1000: a persistent consumer (iot-ingest) that is down for a
    # while must not lose what the broker already acknowledged to its publishers.
    max_queued_messages: int = field(default=100_000, metadata=_range(0, 10_000_000))
    # When a subscriber's queue is full: "block" holds the publisher's QoS 1/2 PUBLISH back,
    # unacknowledged, until there is room (TCP pushes back; nothing acknowledged is lost);
    # "drop" acknowledges it and drops it for that subscriber, counted (Mosquitto's way).
    queue_full: str = field(default="block", metadata=_choices("block", "drop"))
    # "auto": uvloop (libuv, C) when it is installed, else asyncio's own loop; uvloop takes
    # ~20% off the broker's CPU per message, most of it in socket writes and reads.
    event_loop: str = field(default="auto", metadata=_choices("auto", "uvloop", "asyncio"))
    # Seconds between $SYS/broker/... updates; 0 turns them off.
    sys_interval: float = field(default=10.0, metadata=_range(0, 86400))
    # Mosquitto's log_type names; "debug" (or "all", or -v) logs every packet in Mosquitto's words
    # (broker/trace.py says what each name turns on). The default logs no packet lines.
    log_type: tuple[str, ...] = field(default=("error", "warning", "notice", "information"), metadata=_choices(
        "debug", "subscribe", "unsubscribe", "error", "warning", "notice", "information", "websockets", "none", "all"))
    allow_zero_length_clientid: bool = True
    # Access (Mosquitto's files and names): a password file made by `iotctl passwd` or
    # `mosquitto_passwd`, and an ACL file. With neither a password_file nor allow_anonymous = true
    # the broker listens on 127.0.0.1 only ("local only", as Mosquitto 2 without listeners).
    password_file: Path | None = None
    acl_file: Path | None = None
    allow_anonymous: bool = False
    # Limits against hostile or broken clients; each refusal is counted in $SYS/broker/limits/.
    # Topic levels in a filter (SUBACK 0x80 past it) or a topic name (the connection is closed).
    max_topic_levels: int = field(default=200, metadata=_range(1, 65535))
    # Filters one session may hold; a new filter past it gets SUBACK 0x80.
    max_subscriptions_per_client: int = field(default=1000, metadata=_range(1, 10_000_000))
    # Bounds of the retained store (bytes = topic + payload); past either one a retained message
    # on a new topic (or a bigger one on a known topic) is delivered but not retained.
    max_retained_messages: int = field(default=100_000, metadata=_range(0, 100_000_000))
    max_retained_bytes: int = field(default=64 * 1024 * 1024, metadata=_range(0, 2**40))
    # A persistent session whose client has been away this long is removed: "<n>h|d|w|m|y"
    # (m = 30 days), "" or "0" = never (Mosquitto's key and format), and "<n>s" (ours).
    persistent_client_expiration: str = field(default="30d", metadata={"check": expiration_seconds})
    # MQTT 5.0: topic aliases a client may use in what it publishes (our Topic Alias Maximum;
    # Mosquitto's max_topic_alias), 0 = none.
    max_topic_alias: int = field(default=10, metadata=_range(0, 65535))
    # MQTT 5.0: a client asking for a longer keep alive, or none, is given this one in the
    # CONNACK (Server Keep Alive; Mosquitto's max_keepalive); 0 = the client's own applies.
    max_keepalive: int = field(default=0, metadata=_range(0, 65535))
    # Largest remaining length accepted before CONNECT has been accepted (then max_packet_size).
    max_connect_size: int = field(default=128 * 1024, metadata=_range(64, 268_435_455))
    # New connections per second from one IP address, with bursts of 5x; 0 = no limit.
    max_connection_rate: int = field(default=200, metadata=_range(0, 1_000_000))
    # Seconds a client's output may stay above the high-water mark (it reads nothing) before
    # the connection is aborted.
    write_timeout: float = field(default=30.0, metadata=_range(0.1, 86400))
    # A queue's bound in memory by bytes (topic + payload) as well as by count; 0 = count only.
    max_queued_bytes: int = field(default=64 * 1024**2, metadata=_range(0, 2**40))
    # Retained messages and persistent sessions (subscriptions, queued and in-flight messages)
    # kept on disk, in <state_dir>/broker unless persistence_location says otherwise.
    persistence: bool = True
    persistence_location: Path | None = None
    # Bytes of queued messages the store may hold; past it flow control begins (queue_full).
    max_store_bytes: int = field(default=1024**3, metadata=_range(1024**2, 2**50))
    # Prometheus /metrics ("" = off); see daemons/metrics.py.
    metrics: str = _metrics(9600)


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """File transfer over MQTT: iot-transfer-send, iot-transfer-recv, `iotctl send/transfers`."""

    # Topics are {topic_prefix}/file/{file_id}/meta|chunk|status|retry|ack; both ends must agree.
    topic_prefix: str = "iot"
    # Message format on those topics: "binary" (ours, docs/PROTOCOL.md) or "seed-json" (seed 000's
    # JSON, hex data: twice the bytes) to talk to a seed-format peer. Per node; peers must agree.
    wire: str = field(default="binary", metadata=_choices("binary", "seed-json"))
    # Sender. Folders left unset ("") are <state_dir>/outbox and <state_dir>/transfer.
    outbox: Path | None = None
    after_send: str = field(default="move", metadata=_choices("move", "delete"))
    chunk_size: int = field(default=256 * 1024, metadata=_range(1024, 8 * 1024 * 1024))
    # Chunks sent but not yet confirmed by the receiver's status, per file: the pacing bound.
    window: int = field(default=32, metadata=_range(1, 4096))
    max_parallel: int = field(default=2, metadata=_range(1, 64))
    # Bytes per second over all files; 0 = unlimited.
    rate_limit: int = field(default=0, metadata=_range(0, 10**12))
    # Seconds a closed or renamed-in file must stay unchanged before it is sent.
    settle_time: float = field(default=0.5, metadata=_range(0, 3600))
    # Seconds an unconfirmed chunk is given before the receiver's status may ask for it again.
    resend_after: float = field(default=2.0, metadata=_range(0.05, 3600))
    # Seconds without any status from the receiver before the sender announces the file again.
    stall_timeout: float = field(default=5.0, metadata=_range(0.1, 3600))
    # Receiver.
    spool: Path | None = None
    # Largest file accepted, in bytes; 0 = no limit.
    max_file_size: int = field(default=4 * 1024**3, metadata=_range(0, 2**50))
    # Bytes that must stay free on the spool's disk after a file is accepted.
    min_free: int = field(default=100 * 1024**2, metadata=_range(0, 2**50))
    # Seconds between status messages of an unfinished transfer (longer while nothing arrives).
    status_interval: float = field(default=1.0, metadata=_range(0.05, 3600))
    # The partial file is fsynced and its received set persisted every this many bytes (and 1 s).
    sync_bytes: int = field(default=16 * 1024**2, metadata=_range(0, 2**40))
    # Seconds an unfinished transfer may stay idle before its partial file is removed; 0 = never.
    partial_ttl: float = field(default=7 * 86400.0, metadata=_range(0, 10**9))
    # Prometheus /metrics ("" = off): iot-transfer-send on this port, iot-transfer-recv on the port + 1.
    metrics: str = _metrics(9602)


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """iot-ingest: signed QoS 1 readings into SQLite or MySQL/MariaDB; `iotctl dlq`, `iotctl stress`."""

    # Topic filters subscribed at QoS 1 with the fixed client id "<client_id_prefix>-ingest".
    topics: tuple[str, ...] = ("sensors/#",)
    # Worker processes (`iot-ingest --worker I`, I = 1..workers). More than one: each subscribes
    # to $share/<share_group>/<topic> as "<client_id_prefix>-ingest-<I>", and the broker gives
    # each message to one of them.
    workers: int = field(default=1, metadata=_range(1, 64))
    share_group: str = field(default="iot-ingest", metadata={"check": share_name})
    # Keys file (one key per line: HMAC, Ed25519, RSA or AES; mode 0600); "" = ingest.keys beside this file.
    keys_file: Path | None = None
    # Largest payload accepted, in bytes; larger ones go to the DLQ as "oversized".
    max_payload: int = field(default=65536, metadata=_range(256, 268_435_455))
    # A batch is written at batch_size rows, when its first message has waited batch_wait
    # seconds, or when nothing arrived for batch_idle seconds (the broker's window is full).
    batch_size: int = field(default=1000, metadata=_range(1, 100_000))
    batch_wait: float = field(default=0.2, metadata=_range(0.001, 60))
    batch_idle: float = field(default=0.005, metadata=_range(0.0005, 60))
    # Messages held unacknowledged (received, not yet committed); past it the worker stops
    # reading from the broker. Must be at least batch_size.
    max_unacked: int = field(default=20_000, metadata=_range(1, 10_000_000))
    # Database outage: retry with exponential backoff between these bounds, in seconds.
    retry_min: float = field(default=0.5, metadata=_range(0.01, 600))
    retry_max: float = field(default=30.0, metadata=_range(0.01, 3600))
    # One status line (and sd_notify STATUS=) every this many records.
    status_every: int = field(default=10_000, metadata=_range(1, 10**9))
    # Dead-letter queue folder ("" = <state_dir>/dlq) and the size at which a segment is closed.
    dlq_dir: Path | None = None
    dlq_segment_bytes: int = field(default=64 * 1024**2, metadata=_range(4096, 2**40))
    # Storage: "sqlite" (embedded; "" path = <state_dir>/db/ingest.db) or "mysql" (MySQL/MariaDB).
    backend: str = field(default="sqlite", metadata=_choices("sqlite", "mysql"))
    sqlite_path: Path | None = None
    # Seconds a writer waits for another worker's transaction before SQLITE_BUSY; a batch that
    # still finds the file busy is retried (backoff, nothing acknowledged meanwhile).
    sqlite_busy_timeout: float = field(default=5.0, metadata=_range(0.01, 600))
    mysql_host: str = "127.0.0.1"
    mysql_port: int = field(default=3306, metadata=_range(1, 65535))
    # A unix socket instead of host/port ("" = TCP).
    mysql_socket: Path | None = None
    mysql_user: str = "iot"
    mysql_password: str = field(default="", metadata={"secret": True})
    # A file whose first line is the password (keeps it out of this file); "" = unset.
    mysql_password_file: Path | None = None
    mysql_database: str = "iot"
    # TLS: mysql_cafile set = required and verified; unset = only if the server offers it, unverified.
    mysql_cafile: Path | None = None
    mysql_certfile: Path | None = None
    mysql_keyfile: Path | None = None
    # Seconds for connect, and for any one read or write, before the database counts as down.
    mysql_timeout: float = field(default=10.0, metadata=_range(1, 3600))
    # Prometheus /metrics ("" = off); worker I of several serves on the port + I.
    metrics: str = _metrics(9620)


@dataclass(frozen=True, slots=True)
class RegisterConfig:
    """One `[[plc.device.register]]` table: where a value sits in a Modbus PLC and how to read it."""

    name: str = field(metadata={"required": "each register needs the name of its field in the reading"})
    address: int = field(metadata={**_range(0, 65535), "required": "each register needs its address, 0-65535"})
    kind: str = field(default="holding", metadata=_choices("holding", "input"))
    type: str = field(default="uint16", metadata=_choices("int16", "uint16", "int32", "uint32", "float32"))
    # 32-bit values span two registers: "big" = high word first (the Modbus convention).
    word_order: str = field(default="big", metadata=_choices("big", "little"))
    # value = raw * scale (a PLC often keeps 23.7 C as 237 with scale 0.1).
    scale: float = 1.0
    unit: str = ""

    @property
    def words(self) -> int:
        return 1 if self.type.endswith("16") else 2


@dataclass(frozen=True, slots=True)
class PlcDeviceConfig:
    """One `[[plc.device]]` table: a PLC whose readings `iot-plc --plc NAME` publishes."""

    # Names the unit iot-plc@NAME, the client id "<prefix>-plc-NAME" and the queue file.
    name: str = field(metadata={"required": "each PLC needs a name (iot-plc --plc NAME)"})
    device_id: str = ""  # "" = name
    source: str = field(default="simulated", metadata=_choices("simulated", "modbus"))
    topic: str = "sensor/data"
    interval: float = field(default=3.0, metadata=_range(0.01, 86400))
    # Modbus TCP (source = "modbus").
    host: str = ""
    port: int = field(default=502, metadata=_range(1, 65535))
    unit_id: int = field(default=1, metadata=_range(0, 255))
    timeout: float = field(default=1.0, metadata=_range(0.05, 60))
    register: tuple[RegisterConfig, ...] = ()

    @property
    def id(self) -> str:
        return self.device_id or self.name


@dataclass(frozen=True, slots=True)
class PlcConfig:
    """iot-plc: readings from PLCs at QoS 1, kept on disk until the broker acknowledges them."""

    device: tuple[PlcDeviceConfig, ...] = (PlcDeviceConfig(name="line1"),)
    # Readings kept on disk per PLC while unacknowledged; past it the oldest go (counted, logged).
    queue_size: int = field(default=100_000, metadata=_range(1, 100_000_000))
    # Readings published and awaiting PUBACK at once.
    window: int = field(default=100, metadata=_range(1, 65535))
    # A PLC that does not answer is tried again after a delay doubling between these (seconds).
    retry_min: float = field(default=1.0, metadata=_range(0.01, 3600))
    retry_max: float = field(default=60.0, metadata=_range(0.01, 86400))
    # Prometheus /metrics ("" = off); the PLC of the Nth [[plc.device]] (from 0) serves on the port + N.
    metrics: str = _metrics(9650)


@dataclass(frozen=True, slots=True)
class DbsubConfig:
    """iot-dbsub: readings into SQLite, acknowledged after commit; `iotctl readings`."""

    topics: tuple[str, ...] = ("sensor/data",)
    # "" = <state_dir>/db/sensors.db
    sqlite_path: Path | None = None
    max_payload: int = field(default=65536, metadata=_range(256, 268_435_455))
    # Readings committed in one transaction at most.
    batch_size: int = field(default=500, metadata=_range(1, 100_000))
    retry_min: float = field(default=0.5, metadata=_range(0.01, 600))
    retry_max: float = field(default=30.0, metadata=_range(0.01, 3600))
    # Prometheus /metrics ("" = off).
    metrics: str = _metrics(9601)


@dataclass(frozen=True, slots=True)
class SensorConfig:
    """One `[[factory.device.sensor]]`: a simulated sensor, its normal range and its alarms."""

    name: str = field(metadata={"required": "each sensor needs a name"})
    unit: str = ""
    # The normal range: while running the value wanders around the setpoint (default: the
    # middle) inside it; while stopped it settles to `low`.
    low: float = field(default=0.0)
    high: float = field(default=100.0)
    # An alarm is raised when the value goes above alarm_high (below alarm_low) and cleared when
    # it is back by `hysteresis` inside the threshold, so a value hovering there does not chatter.
    alarm_high: float | None = None
    alarm_low: float | None = None
    hysteresis: float = field(default=0.0, metadata=_range(0, None))


def _sensors(*rows: tuple) -> tuple[SensorConfig, ...]:
    return tuple(SensorConfig(name=n, unit=u, low=lo, high=hi, alarm_high=ah, alarm_low=al, hysteresis=h)
                 for n, u, lo, hi, ah, al, h in rows)


@dataclass(frozen=True, slots=True)
class FactoryDeviceConfig:
    """One `[[factory.device]]`: a simulated machine or station (`iot-device --device NAME`)."""

    # The device's MQTT client id and its topics' segment: factory/telemetry/<name>/<sensor>.
    name: str = field(metadata={"required": "each device needs a name"})
    # Seconds between telemetry messages (each sensor once).
    interval: float = field(default=1.0, metadata=_range(0.01, 3600))
    sensor: tuple[SensorConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """One `[[factory.rule]]` of iot-controller: on an alarm, a command to its device."""

    # "raised" or "cleared".
    on: str = field(default="raised", metadata=_choices("raised", "cleared"))
    # fnmatch patterns of the alarm's device and sensor.
    device: str = "*"
    sensor: str = "*"
    command: str = field(default="stop", metadata=_choices("start", "stop", "reset"))


DEFAULT_DEVICES = (
    FactoryDeviceConfig(name="press", sensor=_sensors(
        ("temperature", "C", 40.0, 70.0, 80.0, None, 3.0), ("pressure", "bar", 100.0, 150.0, 170.0, None, 5.0))),
    FactoryDeviceConfig(name="conveyor", sensor=_sensors(
        ("speed", "m/s", 0.8, 1.2, 1.5, 0.5, 0.05), ("motor_temperature", "C", 30.0, 60.0, 75.0, None, 3.0))),
    FactoryDeviceConfig(name="robot_arm", sensor=_sensors(
        ("temperature", "C", 35.0, 65.0, 80.0, None, 3.0), ("torque", "Nm", 10.0, 40.0, 55.0, None, 2.0),
        ("position", "deg", 0.0, 180.0, None, None, 0.0))),
    FactoryDeviceConfig(name="env_station", interval=2.0, sensor=_sensors(
        ("temperature", "C", 18.0, 26.0, 30.0, 15.0, 1.0), ("humidity", "%", 30.0, 60.0, 70.0, None, 3.0),
        ("co2", "ppm", 400.0, 900.0, 1200.0, None, 50.0))),
)


@dataclass(frozen=True, slots=True)
class FactoryConfig:
    """The simulated factory (seed 003): iot-device, iot-controller, iot-observer, iot-dashboard."""

    device: tuple[FactoryDeviceConfig, ...] = DEFAULT_DEVICES
    # How the installed set runs the devices: "one" process for all of them (less memory) or
    # "per-device" (a crash takes one down); either way each device has its own connection.
    processes: str = field(default="one", metadata=_choices("one", "per-device"))
    rule: tuple[RuleConfig, ...] = (RuleConfig(on="raised", sensor="*temperature", command="stop"),
                                    RuleConfig(on="cleared", sensor="*temperature", command="start"))
    # iot-controller's session: "persistent" gets the alarms raised while it was down.
    controller_session: str = field(default="persistent", metadata=_choices("persistent", "clean"))
    # The MQTT user names of the roles the ACL (etc/iot/acl) gives their rights to; devices are
    # known by their client id (= device name) instead.
    controller_username: str = "controller"
    dashboard_username: str = "dashboard"
    observer_username: str = "observer"
    # iot-dashboard. It can stop machines: loopback unless a password file is set.
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = field(default=8080, metadata=_range(1, 65535))
    dashboard_password_file: Path | None = None
    # Prometheus /metrics ("" = off): iot-controller on the port, iot-observer + 1, iot-dashboard + 2,
    # iot-device with several devices + 3, iot-device@NAME + 4 + the device's position.
    metrics: str = _metrics(9604)


SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "log": LogConfig,
    "mqtt": MqttConfig,
    "broker": BrokerConfig,
    "transfer": TransferConfig,
    "ingest": IngestConfig,
    "plc": PlcConfig,
    "dbsub": DbsubConfig,
    "factory": FactoryConfig,
}


@dataclass(frozen=True, slots=True)
class Config:
    source: Path | None = None
    paths: PathsConfig = PathsConfig()
    log: LogConfig = LogConfig()
    mqtt: MqttConfig = MqttConfig()
    broker: BrokerConfig = BrokerConfig()
    transfer: TransferConfig = TransferConfig()
    ingest: IngestConfig = IngestConfig()
    plc: PlcConfig = PlcConfig()
    dbsub: DbsubConfig = DbsubConfig()
    factory: FactoryConfig = FactoryConfig()
    # "[section] key" -> "file" or "environment IOT_SECTION_KEY"; a key not here has its default.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    def origin(self, key: str) -> Path | str | None:
        """What an error about `key` ("[section] key") found after loading should name: the
        variable that set it, else the file (ConfigError's first argument)."""
        where = self.origins.get(key, "")
        return where if where.startswith("environment") else self.source


def find(explicit: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Path | None:
    """The file to read; one the user named is returned even if missing, so load() says so."""
    environ = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if environ.get("IOT_CONFIG"):
        return Path(environ["IOT_CONFIG"])
    for candidate in (CHECKOUT_CONFIG, SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def load(explicit: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The file (see find()) with the IOT_ variables of `environ` (default: this process's) over it."""
    environ = os.environ if environ is None else environ
    path = find(explicit, environ)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(path, "", "no such file") from None
        except OSError as e:
            raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(path, "", f"invalid TOML: {e}") from None
    return parse(raw, path, environ)


def parse(raw: dict[str, Any], path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """`raw` (a TOML document read from `path`) with the IOT_ variables of `environ` over it.
    Without `environ`, none: callers other than load() pass the whole configuration."""
    base = path.resolve().parent if path else Path.cwd()
    for name, table in raw.items():
        if name not in SECTIONS:
            raise ConfigError(path, f"[{name}]", f"unknown section (expected one of {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(path, name, "expected a [section] table")
    overrides = environment_overrides(environ or {})
    sections: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        table, env = raw.get(name, {}), overrides.get(name, {})
        if not table and not env:
            continue
        values = _values(cls, f"[{name}]", table, path, base)
        origins.update((f"[{name}] {key}", "file") for key in table)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, (var, text) in env.items():
            f, value = fields[key], _from_environment(fields[key], text)
            try:
                values[key] = _convert(f, value, f"[{name}] {key}", f"environment {var}", Path.cwd())
            except ConfigError as e:
                # IOT_INGEST_TOPICS=sensors/# is the likely slip: say how a list is written.
                hint = _TOML_EXAMPLES.get(str(f.type))
                if hint is None or not isinstance(value, str):
                    raise
                raise ConfigError(e.path, e.key, f"{e.problem} (write it in TOML: {hint})") from None
            origins[f"[{name}] {key}"] = f"environment {var}"
        sections[name] = cls(**values)
    return Config(source=path, origins=origins, **sections)


def is_tables(f: dataclasses.Field) -> bool:
    """An array of tables, `[[section.key]]`: its type is a tuple of a *Config class."""
    kind = str(f.type)
    return kind.startswith("tuple[") and kind.endswith("Config, ...]")


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def environment_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
    """{section: {key: (variable, text)}} for every IOT_ variable of `environ` but RESERVED;
    one that names no key, or an array of tables, raises ConfigError."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX) or var in RESERVED:
            continue
        where = f"environment {var}"
        section, _, key = var[len(ENV_PREFIX):].lower().partition("_")
        cls = SECTIONS.get(section)
        if cls is None:
            raise ConfigError(where, "", f"names no setting: expected {ENV_PREFIX}<SECTION>_<KEY> with a section "
                                         f"of {', '.join(s.upper() for s in SECTIONS)}, or one of the reserved "
                                         f"{', '.join(RESERVED)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        f = fields.get(key)
        if f is None:
            raise ConfigError(where, f"[{section}] {key}", f"unknown key (expected one of {', '.join(fields)})")
        if var != env_name(section, key):
            raise ConfigError(where, f"[{section}] {key}", f"variable names are upper case: {env_name(section, key)}")
        if is_tables(f):
            raise ConfigError(where, f"[{section}] {key}", f"[[{section}.{key}]] tables cannot be set from the "
                                                          "environment; set them in the file")
        out.setdefault(section, {})[key] = (var, text)
    return out


_TOML_EXAMPLES = {"tuple[str, ...]": '["a", "b"]', "dict[str, int]": '{"name" = 1}'}


def _from_environment(f: dataclasses.Field, text: str) -> Any:
    """A variable's string as the value a TOML file would hold for `f` (see the top)."""
    if str(f.type).removesuffix(" | None") in ("str", "Path"):
        return text
    try:
        doc = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # "1\nother = 2" is TOML too, but not one value.
    return doc["value"] if len(doc) == 1 else text


def _table(cls: type, label: str, table: dict[str, Any], path: Path | None, base: Path) -> Any:
    return cls(**_values(cls, label, table, path, base))


def _values(cls: type, label: str, table: dict[str, Any], path: Path | None, base: Path) -> dict[str, Any]:
    """One table's values for `cls`: every key converted and checked, required keys present."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(path, f"{label} {key}", f"unknown key (expected one of {', '.join(fields)})")
        values[key] = _convert(f, value, f"{label} {key}", path, base)
    for f in fields.values():
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(path, f"{label} {f.name}", f"missing: {f.metadata.get('required', 'required')}")
    return values


def _tables(cls: type, label: str, value: Any, path: Path | None, base: Path) -> list[Any]:
    """An array of tables (`[[label]]`), each labelled "#1", "#2"... in errors."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(path, label, f"expected {label} tables, got {value!r}")
    return [_table(cls, f"{label} #{i}", t, path, base) for i, t in enumerate(value, 1)]


def _convert(f: dataclasses.Field, value: Any, key: str, path: Path | str | None, base: Path) -> Any:
    kind = str(f.type)  # annotations are strings here (from __future__ import annotations)
    optional = kind.endswith("| None")
    kind = kind.removesuffix(" | None")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(path, key, f"expected true or false, got {value!r}")
        return value
    if kind in ("int", "float"):
        # TOML booleans are ints to Python; a port of `true` is a mistake, not 1.
        ok = isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            ok = ok or isinstance(value, float)
        lo, hi = f.metadata.get("range", (None, None))
        what = "an integer" if kind == "int" else "a number"
        bounds = f" from {lo} to {hi}" if lo is not None and hi is not None else ""
        # nan passes every comparison: a timeout of nan would be a timeout of never.
        if not ok or value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(path, key, f"expected {what}{bounds}, got {value!r}")
        return float(value) if kind == "float" else value
    if kind in ("str", "Path"):
        if not isinstance(value, str):
            raise ConfigError(path, key, f"expected a string, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(path, key, f"expected one of {', '.join(choices)}, got {value!r}")
        check = f.metadata.get("check")
        if check is not None:
            try:
                check(value)
            except ValueError as e:
                raise ConfigError(path, key, str(e)) from None
        if kind == "Path":
            if value == "":
                if optional:
                    return None
                raise ConfigError(path, key, "expected a path, got an empty string")
            p = Path(value).expanduser()
            # normpath, not resolve(): tidy "etc/iot/../../var" without following symlinks.
            return p if p.is_absolute() else Path(os.path.normpath(base / p))
        return value
    if kind == "dict[str, int]":
        lo, hi = f.metadata.get("range", (None, None))
        if not isinstance(value, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi for v in value.values()):
            raise ConfigError(path, key, f"expected a table of names to integers from {lo} to {hi}, got {value!r}")
        return dict(value)
    if kind == "tuple[ListenerConfig, ...]":
        return _listeners(value, path, base)
    if kind == "tuple[BridgeConfig, ...]":
        return _bridges(value, path, base)
    if kind == "tuple[PlcDeviceConfig, ...]":
        return _plc_devices(value, path, base)
    if kind == "tuple[RegisterConfig, ...]":
        return _registers(value, key, path, base)
    if kind == "tuple[FactoryDeviceConfig, ...]":
        return _factory_devices(value, path, base)
    if kind == "tuple[SensorConfig, ...]":
        return _factory_sensors(value, key, path, base)
    if kind == "tuple[RuleConfig, ...]":
        return tuple(_tables(RuleConfig, "[[factory.rule]]", value, path, base))
    if kind == "tuple[str, ...]":
        choices = f.metadata.get("choices")
        if not isinstance(value, list) or not all(isinstance(v, str) and (not choices or v in choices) for v in value):
            expected = f"a list of strings from {', '.join(choices)}" if choices else "a list of strings"
            raise ConfigError(path, key, f"expected {expected}, got {value!r}")
        return tuple(value)
    raise AssertionError(f"config field {key} has unsupported type {kind}")  # our bug, not the user's


_TLS_ONLY = ("cafile", "require_certificate", "use_identity_as_username", "tls_version")


def _listeners(value: Any, path: Path | None, base: Path) -> tuple[ListenerConfig, ...]:
    """`[[broker.listener]]` tables. Each key is converted like a section's, then the keys are
    checked together and the files named are checked to exist, so that a mistake ends the
    start with a line naming the table ("[[broker.listener]] #2 certfile"), not the first
    TLS handshake."""
    out = []
    for i, lc in enumerate(_tables(ListenerConfig, "[[broker.listener]]", value, path, base), 1):
        label = f"[[broker.listener]] #{i}"
        if (lc.certfile is None) != (lc.keyfile is None):
            have, need = ("certfile", "keyfile") if lc.keyfile is None else ("keyfile", "certfile")
            raise ConfigError(path, f"{label} {need}", f"missing: {have} is set, TLS needs both certfile and keyfile")
        for key in _TLS_ONLY:
            if not lc.tls and getattr(lc, key) not in (None, False, ""):
                raise ConfigError(path, f"{label} {key}", "is a TLS setting: set certfile and keyfile too")
        if lc.require_certificate and lc.cafile is None:
            raise ConfigError(path, f"{label} require_certificate",
                              "needs cafile (the CA that signs the client certificates)")
        if lc.use_identity_as_username and not lc.require_certificate:
            raise ConfigError(path, f"{label} use_identity_as_username",
                              "needs require_certificate = true (no certificate, no identity)")
        for key in ("certfile", "keyfile", "cafile"):
            p = getattr(lc, key)
            if p is not None and not p.is_file():
                raise ConfigError(path, f"{label} {key}", f"no such file: {p}")
        out.append(lc)
    return tuple(out)


def _bridges(value: Any, path: Path | None, base: Path) -> tuple[BridgeConfig, ...]:
    """`[[broker.bridge]]` tables: names unique and usable in a topic, addresses "host:port",
    every topic line parsed, TLS files present, so a mistake ends the start naming the key."""
    out = []
    names = set()
    for i, bc in enumerate(_tables(BridgeConfig, "[[broker.bridge]]", value, path, base), 1):
        label = f"[[broker.bridge]] #{i}"
        if not _NAME.fullmatch(bc.name) or bc.name in names:
            raise ConfigError(path, f"{label} name", "expected a unique name of letters, digits, '_', '.', '-' "
                                                     f"(at most 64), got {bc.name!r}")
        names.add(bc.name)
        if not bc.address:
            raise ConfigError(path, f"{label} address", 'missing: expected at least one "host:port"')
        for key, check in (("address", _address), ("topic", parse_bridge_topic)):
            for text in getattr(bc, key):
                try:
                    check(text)
                except ValueError as e:
                    raise ConfigError(path, f"{label} {key}", str(e)) from None
        if not bc.topic:
            raise ConfigError(path, f"{label} topic", 'missing: expected at least one "PATTERN out|in|both QOS"')
        if bc.remote_password and not bc.remote_username:
            raise ConfigError(path, f"{label} remote_password", "needs remote_username")
        if (bc.bridge_certfile is None) != (bc.bridge_keyfile is None):
            raise ConfigError(path, f"{label} bridge_keyfile", "bridge_certfile and bridge_keyfile go together")
        if bc.bridge_certfile is not None and bc.bridge_cafile is None:
            raise ConfigError(path, f"{label} bridge_cafile", "needed for TLS (bridge_certfile is set)")
        for key in ("bridge_cafile", "bridge_certfile", "bridge_keyfile"):
            p = getattr(bc, key)
            if p is not None and not p.is_file():
                raise ConfigError(path, f"{label} {key}", f"no such file: {p}")
        out.append(bc)
    return tuple(out)


# What every reading carries besides its values (plc/reading.py): no register may take these names.
READING_FIELDS = ("ts", "device_id", "seq", "units")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _plc_devices(value: Any, path: Path | None, base: Path) -> tuple[PlcDeviceConfig, ...]:
    """`[[plc.device]]` tables, checked together: names and device ids unique (a device id
    names a (device_id, seq) series in the database), a Modbus PLC has a host and registers."""
    from .broker.topics import InvalidTopic, validate_topic_name  # noqa: PLC0415 - pure, and only needed here

    devices = _tables(PlcDeviceConfig, "[[plc.device]]", value, path, base)
    names: set[str] = set()
    ids: set[str] = set()
    for i, d in enumerate(devices, 1):
        label = f"[[plc.device]] #{i}"
        for key, v in (("name", d.name), ("device_id", d.id)):
            if not _NAME.fullmatch(v):
                raise ConfigError(path, f"{label} {key}", "expected 1-64 letters, digits, '_', '-' or '.', "
                                                          f"starting with a letter or digit, got {v!r}")
        if d.name in names:
            raise ConfigError(path, f"{label} name", f"{d.name!r} is the name of an earlier [[plc.device]]")
        if d.id in ids:
            raise ConfigError(path, f"{label} device_id", f"{d.id!r} is the device id of an earlier [[plc.device]]: "
                                                          "readings are unique by (device_id, seq)")
        names.add(d.name)
        ids.add(d.id)
        try:
            validate_topic_name(d.topic)
        except InvalidTopic as e:
            raise ConfigError(path, f"{label} topic", str(e)) from None
        if d.source == "modbus":
            if not d.host:
                raise ConfigError(path, f"{label} host", "missing: a Modbus PLC needs the host it listens on")
            if not d.register:
                raise ConfigError(path, f"{label} register", "missing: a Modbus PLC needs [[plc.device.register]] "
                                                             "tables saying what to read")
        elif d.register or d.host:
            key = "register" if d.register else "host"
            raise ConfigError(path, f"{label} {key}", 'is a Modbus setting: set source = "modbus" too')
    return tuple(devices)


def _registers(value: Any, key: str, path: Path | None, base: Path) -> tuple[RegisterConfig, ...]:
    regs = _tables(RegisterConfig, key, value, path, base)
    seen: set[str] = set()
    for i, r in enumerate(regs, 1):
        label = f"{key} #{i}"
        if not _NAME.fullmatch(r.name) or r.name in READING_FIELDS:
            raise ConfigError(path, f"{label} name", f"expected a field name of 1-64 letters, digits, '_', '-' "
                                                     f"or '.', not one of {', '.join(READING_FIELDS)}, got {r.name!r}")
        if r.name in seen:
            raise ConfigError(path, f"{label} name", f"{r.name!r} is the name of an earlier register")
        seen.add(r.name)
        if r.address + r.words > 65536:
            raise ConfigError(path, f"{label} address", f"a {r.type} at {r.address} runs past register 65535")
        if r.scale == 0 or r.scale != r.scale or abs(r.scale) == float("inf"):
            raise ConfigError(path, f"{label} scale", f"expected a finite number other than 0, got {r.scale!r}")
    return tuple(regs)


def _factory_devices(value: Any, path: Path | None, base: Path) -> tuple[FactoryDeviceConfig, ...]:
    devices = _tables(FactoryDeviceConfig, "[[factory.device]]", value, path, base)
    names: set[str] = set()
    for i, d in enumerate(devices, 1):
        label = f"[[factory.device]] #{i}"
        # A topic segment and a client id: no '/', '+', '#'; and not "all" (iot-device --device all).
        if not _NAME.fullmatch(d.name) or d.name == "all":
            raise ConfigError(path, f"{label} name", "expected 1-64 letters, digits, '_', '-' or '.', starting with "
                                                     f"a letter or digit, not 'all', got {d.name!r}")
        if d.name in names:
            raise ConfigError(path, f"{label} name", f"{d.name!r} is the name of an earlier [[factory.device]]")
        names.add(d.name)
        if not d.sensor:
            raise ConfigError(path, f"{label} sensor", "missing: a device needs [[factory.device.sensor]] tables")
    return tuple(devices)


def _factory_sensors(value: Any, key: str, path: Path | None, base: Path) -> tuple[SensorConfig, ...]:
    sensors = _tables(SensorConfig, key, value, path, base)
    seen: set[str] = set()
    for i, s in enumerate(sensors, 1):
        label = f"{key} #{i}"
        if not _NAME.fullmatch(s.name) or s.name in seen:
            raise ConfigError(path, f"{label} name", f"expected a new name of 1-64 letters, digits, '_', '-' or '.', "
                                                     f"got {s.name!r}")
        seen.add(s.name)
        if not s.low < s.high:
            raise ConfigError(path, f"{label} high", f"must be above low ({s.low:g}), got {s.high:g}")
        if s.alarm_high is not None and s.alarm_high - s.hysteresis <= s.low:
            raise ConfigError(path, f"{label} alarm_high", "must be above low + hysteresis, or the alarm never clears")
        if s.alarm_low is not None and s.alarm_low + s.hysteresis >= s.high:
            raise ConfigError(path, f"{label} alarm_low", "must be below high - hysteresis, or the alarm never clears")
    return tuple(sensors)


def changed_keys(old: Config, new: Config) -> list[str]:
    """`[section] key` for every value that differs between two loaded configs."""
    out = []
    for name in SECTIONS:
        a, b = getattr(old, name), getattr(new, name)
        out += [f"[{name}] {f.name}" for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return out
