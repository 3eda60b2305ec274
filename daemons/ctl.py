"""iotctl: the operator's command line. Each subcommand lives with what it drives; this
module holds the dispatcher and the MQTT tools `pub` and `sub`, whose options follow
mosquitto_pub/mosquitto_sub so that scripts and fingers carry over.

Exit codes (stable, for scripts): 0 done; 1 broker unreachable, connection refused or a
publish not confirmed; 27 `sub -W` timed out (as mosquitto_sub); 64 bad usage; 78 bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import config as configmod
from .broker.topics import InvalidTopic, validate_topic_filter, validate_topic_name
from .mqttclient import MqttClient
from .service import EX_USAGE, Log, setup_logging

EX_FAIL = 1
EX_TIMEOUT = 27


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2; ours say 64 like the daemons
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


# -V as mosquitto_pub/sub take it -> [mqtt] protocol's names
_VERSIONS = {"5": "5", "mqttv5": "5", "311": "3.1.1", "mqttv311": "3.1.1", "31": "3.1", "mqttv31": "3.1"}

# -D identifiers (mosquitto_pub/sub's names) -> paho's property name and the value's kind: an
# integer range, "str" (UTF-8 string), "bin" (binary data: the argument's UTF-8 bytes, as
# mosquitto takes it) or "pair" (user-property KEY VALUE).
_PROPERTIES: dict[str, tuple[str, tuple[int, int] | str]] = {
    "content-type": ("ContentType", "str"),
    "correlation-data": ("CorrelationData", "bin"),
    "maximum-packet-size": ("MaximumPacketSize", (1, 2**32 - 1)),
    "message-expiry-interval": ("MessageExpiryInterval", (0, 2**32 - 1)),
    "payload-format-indicator": ("PayloadFormatIndicator", (0, 1)),
    "receive-maximum": ("ReceiveMaximum", (1, 0xFFFF)),
    "request-problem-information": ("RequestProblemInformation", (0, 1)),
    "request-response-information": ("RequestResponseInformation", (0, 1)),
    "response-topic": ("ResponseTopic", "str"),
    "session-expiry-interval": ("SessionExpiryInterval", (0, 2**32 - 1)),
    "topic-alias": ("TopicAlias", (1, 0xFFFF)),
    "topic-alias-maximum": ("TopicAliasMaximum", (0, 0xFFFF)),
    "user-property": ("UserProperty", "pair"),
}
# What each packet may carry (MQTT 5.0 section 3, as mosquitto_pub/sub list them).
_COMMANDS = {
    "connect": ("maximum-packet-size", "receive-maximum", "request-problem-information",
                "request-response-information", "session-expiry-interval", "topic-alias-maximum", "user-property"),
    "publish": ("content-type", "correlation-data", "message-expiry-interval", "payload-format-indicator",
                "response-topic", "topic-alias", "user-property"),
    "subscribe": ("user-property",),
    "disconnect": ("session-expiry-interval", "user-property"),
}
_PACKETS = {"connect": PacketTypes.CONNECT, "publish": PacketTypes.PUBLISH, "subscribe": PacketTypes.SUBSCRIBE,
            "disconnect": PacketTypes.DISCONNECT}


def v5_properties(defs: Sequence[Sequence[str]], commands: Sequence[str]) -> dict[str, Properties]:
    """The -D arguments (each [COMMAND, IDENTIFIER, VALUE...]) as paho Properties per packet.
    Raises ValueError saying what is wrong, for the user."""
    out: dict[str, Properties] = {}
    for d in defs:
        if len(d) < 3:
            raise ValueError(f"-D {' '.join(d)}: expected COMMAND IDENTIFIER VALUE")
        command, ident, *values = d
        if command not in commands:
            raise ValueError(f"-D {command}: unknown command (one of: {', '.join(commands)})")
        if ident not in _COMMANDS[command]:
            raise ValueError(f"-D {command} {ident}: not a property of {command} "
                             f"(one of: {', '.join(_COMMANDS[command])})")
        name, kind = _PROPERTIES[ident]
        want = 2 if kind == "pair" else 1
        if len(values) != want:
            raise ValueError(f"-D {command} {ident}: expected {'KEY VALUE' if want == 2 else 'one VALUE'}, "
                             f"got {len(values)} argument{'s' if len(values) != 1 else ''}")
        if isinstance(kind, tuple):
            lo, hi = kind
            try:
                value: object = int(values[0])
            except ValueError:
                value = None
            if value is None or not lo <= value <= hi:
                raise ValueError(f"-D {command} {ident}: {values[0]!r} is not an integer {lo}-{hi}")
        elif kind == "bin":
            value = values[0].encode()
        elif kind == "pair":
            value = (values[0], values[1])
        else:
            value = values[0]
        if ident == "response-topic":
            try:
                validate_topic_name(values[0])
            except InvalidTopic as e:
                raise ValueError(f"-D {command} {ident}: {values[0]!r} is not a topic name: {e}") from None
        props = out.setdefault(command, Properties(_PACKETS[command]))
        if kind != "pair" and hasattr(props, name):
            raise ValueError(f"-D {command} {ident}: given twice")
        setattr(props, name, value)  # user-property: paho appends each pair
    return out


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (defaults from the [mqtt] section of the config)")
    g.add_argument("--help", action="help", help="show this help and exit")
    g.add_argument("-h", "--host", help="broker host")
    g.add_argument("-p", "--port", type=int, help="broker port")
    g.add_argument("-i", "--id", help="client id (default: <prefix>-ctl-<pid>)")
    g.add_argument("-u", "--username")
    g.add_argument("-P", "--pw", dest="password")
    g.add_argument("-k", "--keepalive", type=int, help="keep-alive seconds")
    g.add_argument("--cafile", help="CA certificate: turns TLS on")
    g.add_argument("--cert", help="client certificate (TLS)")
    g.add_argument("--key", help="client key (TLS)")
    g.add_argument("-q", "--qos", type=int, choices=(0, 1, 2), default=0, help="quality of service (default 0)")
    g.add_argument("-c", "--disable-clean-session", action="store_true",
                   help="persistent session: the broker keeps subscriptions and queued messages")
    g.add_argument("--config", metavar="FILE", help="config file for defaults")
    g.add_argument("-d", "--debug", action="store_true", help="log connection events (and SUBACK) on stderr")
    g.add_argument("-V", "--protocol-version", choices=list(_VERSIONS), metavar="5|311|31",
                   help="MQTT version: 5, 311 or 31 (default: [mqtt] protocol, 3.1.1)")
    g.add_argument("-D", "--property", nargs="+", action="append", default=[], metavar="ARG",
                   help="an MQTT 5.0 property: COMMAND IDENTIFIER VALUE, as mosquitto's -D "
                        "(e.g. -D publish user-property KEY VALUE, -D connect session-expiry-interval 60)")


def _protocol_args(args: argparse.Namespace, commands: Sequence[str]) -> None:
    """Settle -V (default: [mqtt] protocol) and check -D against it: a usage error (exit 64)
    before anything is read or sent."""
    args.protocol = _VERSIONS[args.protocol_version] if args.protocol_version else \
        configmod.load(args.config).mqtt.protocol
    if args.property and args.protocol != "5":
        args.parser.error(f"-D needs MQTT 5.0 (-V 5); this connection is MQTT {args.protocol}")
    try:
        args.v5_properties = v5_properties(args.property, commands)
    except ValueError as e:
        args.parser.error(str(e))


def _client(args: argparse.Namespace, log: Log, **kw) -> MqttClient:
    cfg = configmod.load(args.config).mqtt
    overrides = {
        "username": args.username, "password": args.password, "keepalive": args.keepalive,
        "cafile": args.cafile, "certfile": args.cert, "keyfile": args.key,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    for k in ("cafile", "certfile", "keyfile"):
        if k in changes:
            changes[k] = Path(changes[k])
    if "password" in changes:
        changes["password_file"] = None
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    cid = args.id or f"{cfg.client_id_prefix}-ctl-{os.getpid()}-{socket.gethostname()}"[:64]
    return MqttClient(cfg, cid, log=log, host=args.host, port=args.port, retry=False,
                      clean_session=not args.disable_clean_session, protocol=args.protocol,
                      properties={k: v for k, v in args.v5_properties.items() if k != "publish"}, **kw)


def _connect(client: MqttClient, timeout: float) -> bool:
    client.start()
    if client.wait_connected(timeout):
        return True
    print(f"iotctl: {client.last_error or f'no connection to {client.host}:{client.port} within {timeout:g}s'}",
          file=sys.stderr)
    client.stop()
    return False


def _valid(check, topic: str) -> bool:
    try:
        check(topic)
        return True
    except InvalidTopic as e:
        print(f"iotctl: invalid topic {topic!r}: {e}", file=sys.stderr)
        return False


def cmd_pub(args: argparse.Namespace, log: Log) -> int:
    _protocol_args(args, ("connect", "publish", "disconnect"))
    if not _valid(validate_topic_name, args.topic):
        return EX_USAGE
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                payload = f.read()
        except OSError as e:
            print(f"iotctl pub: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return EX_FAIL
    elif args.stdin_file:
        payload = sys.stdin.buffer.read()
    elif args.null_message:
        payload = b""
    else:
        payload = args.message.encode()
    client = _client(args, log)
    if not _connect(client, args.timeout):
        return EX_FAIL
    try:
        info = client.publish(args.topic, payload, args.qos, args.retain, args.v5_properties.get("publish"))
        info.wait_for_publish(args.timeout)
        if not info.is_published():
            what = {0: "sent", 1: "acknowledged (PUBACK)", 2: "completed (PUBCOMP)"}[args.qos]
            print(f"iotctl pub: message not {what} within {args.timeout:g}s", file=sys.stderr)
            return EX_FAIL
    finally:
        client.stop()
    return 0


def cmd_sub(args: argparse.Namespace, log: Log) -> int:
    _protocol_args(args, ("connect", "subscribe", "disconnect"))
    if not all(_valid(validate_topic_filter, t) for t in args.topic):
        return EX_USAGE
    inbox: queue.Queue = queue.Queue()
    client = _client(args, log, subscriptions=[(t, args.qos) for t in args.topic], on_message=inbox.put)
    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.append(1))
    if not _connect(client, args.timeout):
        return EX_FAIL
    deadline = time.monotonic() + args.wait if args.wait else None
    count = 0
    out = sys.stdout.buffer
    try:
        while not stop and (args.count is None or count < args.count):
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return EX_TIMEOUT
            try:
                msg = inbox.get(timeout=left)
            except queue.Empty:
                continue
            if args.no_retained and msg.retain:
                continue
            line = (msg.topic.encode() + b" " + msg.payload) if args.verbose else msg.payload
            out.write(line + (b"" if args.no_newline else b"\n"))
            out.flush()
            count += 1
    except BrokenPipeError:
        pass
    finally:
        client.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iotctl", description="Operate an iot-daemons node.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("pub", add_help=False, help="publish one message (like mosquitto_pub)",
                       description="Publish one message and wait until the broker has it (QoS 1/2: acknowledged).")
    _connection_args(p)
    p.add_argument("-t", "--topic", required=True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-m", "--message", help="payload given on the command line")
    what.add_argument("-f", "--file", help="payload is the content of this file")
    what.add_argument("-s", "--stdin-file", action="store_true", help="payload is all of standard input")
    what.add_argument("-n", "--null-message", action="store_true", help="empty payload (clears a retained message)")
    p.add_argument("-r", "--retain", action="store_true", help="ask the broker to retain it")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for connection and ack (default 10)")
    p.set_defaults(func=cmd_pub, parser=p)

    p = sub.add_parser("sub", add_help=False, help="print messages (like mosquitto_sub)",
                       description="Subscribe and print each message's payload, one per line.")
    _connection_args(p)
    p.add_argument("-t", "--topic", action="append", required=True, help="topic filter; may repeat")
    p.add_argument("-v", "--verbose", action="store_true", help="print 'topic payload'")
    p.add_argument("-C", "--count", type=int, help="exit after this many messages")
    p.add_argument("-W", "--wait", type=float, help="exit with code 27 after this many seconds")
    p.add_argument("-R", "--no-retained", action="store_true", help="skip retained (stale) messages")
    p.add_argument("-N", "--no-newline", action="store_true", help="do not add a newline after each payload")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the connection (default 10)")
    p.set_defaults(func=cmd_sub, parser=p)

    from . import supervise  # noqa: PLC0415 - only `up`/`status` need it

    supervise.add_commands(sub)
    from .ingest.cli import add_commands as ingest_commands  # noqa: PLC0415 - `dlq`, `stress`
    ingest_commands(sub)
    from .transfer.cli import add_commands as transfer_commands  # noqa: PLC0415 - `send`, `transfers`
    transfer_commands(sub)
    from .broker.passwd import add_commands as passwd_commands  # noqa: PLC0415 - `passwd`
    passwd_commands(sub)
    from .broker.convert import add_commands as convert_commands  # noqa: PLC0415 - `broker-config`
    convert_commands(sub)
    from .plc.cli import add_commands as plc_commands  # noqa: PLC0415 - `readings`
    plc_commands(sub)
    from .factory.cli import add_commands as factory_commands  # noqa: PLC0415 - `bad-actor`
    factory_commands(sub)
    from .configcli import add_commands as config_commands  # noqa: PLC0415 - `config show`
    config_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = setup_logging("iotctl", verbose=getattr(args, "debug", False))
    if not getattr(args, "debug", False):
        import logging  # noqa: PLC0415

        logging.getLogger().setLevel(logging.ERROR)  # one-shot tools speak through their exit code
    try:
        return args.func(args, log)
    except configmod.ConfigError as e:
        print(f"iotctl: config error: {e}", file=sys.stderr)
        return configmod.EX_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
