"""`iotctl dlq list|show|replay|purge`, `iotctl stress` (seed 004's stress tester) and
`iotctl keys new` (a key for a sender, and its line for the keys file).

Exit codes: 0 done; 1 not everything landed (replay), not every message acknowledged
(stress), or the key file exists or cannot be written (keys new); 64 bad usage; 69 database
or broker unavailable; 78 bad config, keys file or sender's key file.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import select
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

from .. import config as configmod
from ..config import MqttConfig
from ..mqttclient import MqttClient
from ..service import Log
from . import dlq as dlqmod
from .. import mqtttune
from .keys import RSA_BITS, Kind, SenderKey, load_sender_key, new_key, write_sender_key
from .signing import KeysError, Rejected, Verifier, encode_body, load_keys, make_sender
from .sinks import SchemaTooNew, Unavailable, open_sink
from .worker import GC_THRESHOLD, dlq_path, keys_path, to_row

EX_FAIL = 1
EX_UNAVAILABLE = 69
EX_CONFIG = configmod.EX_CONFIG
REPLAY_BATCH = 1000


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def _select(entries: list[dlqmod.Entry], args: argparse.Namespace) -> list[dlqmod.Entry]:
    ids = set(getattr(args, "ids", None) or ())
    out = [e for e in entries if (not ids or e.id in ids) and (not args.reason or e.reason == args.reason)]
    missing = ids - {e.id for e in out}
    for i in sorted(missing):
        print(f"iotctl dlq: no pending entry {i}", file=sys.stderr)
    return out


def _scan(cfg: configmod.Config) -> dlqmod.Scan:
    scan = dlqmod.read_all(dlq_path(cfg))
    if scan.corrupt:
        print(f"iotctl dlq: {scan.corrupt} unreadable line(s) skipped", file=sys.stderr)
    return scan


def cmd_list(args: argparse.Namespace, log: Log) -> int:
    cfg = configmod.load(args.config)
    entries = _select(_scan(cfg).entries, args)
    if args.json:
        for e in entries:
            sys.stdout.buffer.write(e.to_json() + b"\n")
        return 0
    for e in entries:
        detail = e.detail if len(e.detail) <= 60 else e.detail[:57] + "..."
        print(f"{e.id}  {_iso(e.time)}  {e.reason:<13} {e.topic}  {len(e.payload)}B  {detail}")
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in {dlq_path(cfg)}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace, log: Log) -> int:
    cfg = configmod.load(args.config)
    entries = _select(_scan(cfg).entries, args)
    for e in entries:
        doc = orjson.loads(e.to_json())
        doc["time_iso"] = _iso(e.time)
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return 0 if len(entries) == len(set(args.ids)) else EX_FAIL


def cmd_replay(args: argparse.Namespace, log: Log) -> int:
    cfg = configmod.load(args.config)
    try:
        # No nonce tripwire: an entry refused as nonce-reused is replayed because the operator
        # chose to land it, and its twin may be in the same run.
        verifier = Verifier(load_keys(keys_path(cfg)), cfg.ingest.max_payload, track_nonces=False)
    except KeysError as e:
        print(f"iotctl dlq replay: {e}", file=sys.stderr)
        return EX_CONFIG
    folder = dlq_path(cfg)
    sink = open_sink(cfg)
    landed = still = 0
    reasons: dict[str, int] = {}
    with dlqmod.Remover(folder) as rm:
        # Read under the lock: a concurrent replay cannot land and remove the same entries twice
        # (it would be harmless, but the counts would lie).
        entries = _select(_scan(cfg).entries, args)
        for start in range(0, len(entries), REPLAY_BATCH):
            chunk = entries[start:start + REPLAY_BATCH]
            rows, ids = [], []
            for e in chunk:
                try:
                    rows.append(to_row(verifier, e.topic, e.payload))
                    ids.append(e.id)
                except Rejected as r:
                    still += 1
                    reasons[r.reason.value] = reasons.get(r.reason.value, 0) + 1
            try:
                refused = sink.write(rows)
            except Unavailable as u:
                print(f"iotctl dlq replay: database unavailable: {u}", file=sys.stderr)
                sink.close()
                return EX_UNAVAILABLE
            except SchemaTooNew as u:
                print(f"iotctl dlq replay: {u}", file=sys.stderr)
                return EX_CONFIG
            bad = {j for j, _ in refused}
            for j, err in refused:
                still += 1
                reasons["db-refused"] = reasons.get("db-refused", 0) + 1
            # Committed above; only now are they removed: a crash in between replays them again
            # next time, which the upsert makes harmless.
            landed += rm.remove(i for j, i in enumerate(ids) if j not in bad)
    sink.close()
    extra = "".join(f", {n} {r}" for r, n in sorted(reasons.items()))
    print(f"replayed {len(entries)}: {landed} landed and removed, {still} still rejected{extra}")
    return 0 if still == 0 else EX_FAIL


def cmd_purge(args: argparse.Namespace, log: Log) -> int:
    if not (args.ids or args.reason or args.all):
        print("iotctl dlq purge: name entries, or give --reason or --all", file=sys.stderr)
        return 64
    cfg = configmod.load(args.config)
    with dlqmod.Remover(dlq_path(cfg)) as rm:
        entries = _select(_scan(cfg).entries, args)
        n = rm.remove(e.id for e in entries)
    print(f"purged {n}")
    return 0


# -- stress ----------------------------------------------------------------------------------------


def _stress_child(i: int, count: int, args: argparse.Namespace, mqtt: MqttConfig, sender_keys: list[SenderKey],
                  run: str, barrier, results) -> None:
    """One publishing process: its own connection, its own window of unacknowledged messages.

    paho is driven from this one thread (no loop_start): no thread hand-off per message, each
    burst of publishes goes out in one send(), PUBACKs are read in bulk (mqtttune)."""
    sent = acked = 0
    first = last = 0.0
    err = ""
    gc.set_threshold(GC_THRESHOLD, 50, 100)  # a window of in-flight messages, no cycles (see worker.py)
    try:
        sign = make_sender(sender_keys)
        c = MqttClient(mqtt, f"{mqtt.client_id_prefix}-stress-{run}-{i}"[:64], log=Log("stress"), retry=False,
                       host=args.host, port=args.port, max_inflight=0)
        tuned = mqtttune.tune_publisher(c.paho)
        p = c.paho
        counter = [0]

        def on_publish(client, userdata, mid, rc, props):
            counter[0] += 1

        def write() -> None:
            if p.loop_write() != 0:
                raise RuntimeError("connection lost")
            sock = p.socket()
            if tuned and sock is not None:
                sock.flush()

        def read(timeout: float) -> None:
            sock = p.socket()
            if sock is None:
                raise RuntimeError("connection lost")
            if tuned and sock.pending():
                timeout = 0.0  # bytes already buffered: select() would not see them
            r, _, _ = select.select([sock], [], [], timeout)
            if (r or timeout == 0.0) and p.loop_read() != 0:
                raise RuntimeError("connection lost")

        p.on_publish = on_publish
        p.connect(c.host, c.port, mqtt.keepalive)
        deadline = time.monotonic() + args.timeout
        while not c.connected:  # no p.loop(): it would add the thread wake-up pipe to every publish
            write()
            read(0.1)
            if time.monotonic() > deadline:
                raise RuntimeError(c.last_error or f"no connection to {c.host}:{c.port}")
        barrier.wait(args.timeout)
        topic, window, publish = args.topic, args.window, p.publish
        now = time.time
        first = now()
        deadline = time.monotonic() + args.timeout

        def reconnect() -> None:
            """The broker went away (a restart): connect again, as any paho publisher would;
            paho then sends every unacknowledged message again, with DUP."""
            delay = 0.1
            while time.monotonic() < deadline:
                try:
                    p.reconnect()
                    until = min(deadline, time.monotonic() + 5)
                    while not c.connected and time.monotonic() < until:
                        write()
                        read(0.1)
                    if c.connected:
                        return
                except (OSError, RuntimeError):
                    pass
                time.sleep(delay)
                delay = min(2 * delay, 2.0)
            raise RuntimeError(f"connection lost and not regained in {args.timeout:g}s")

        while counter[0] < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all acked in {args.timeout:g}s")
            try:
                acked = counter[0]
                while sent < count and sent - acked < window:
                    body = encode_body(f"{run}-{i}-{sent}", f"stress-{i}-{sent % 16}", now(),
                                       {"temp": 20.0 + (sent % 100) / 10, "seq": sent})
                    publish(topic, sign(body), 1)
                    sent += 1
                write()  # the burst, in one send()
                read(1.0)
                p.loop_misc()
                if not c.connected:
                    raise RuntimeError("connection lost")
            except (OSError, RuntimeError):
                reconnect()
        last = now()
        acked = counter[0]
        p.disconnect()
        write()
    except Exception as e:  # noqa: BLE001 - reported by the parent with the counts so far
        err = str(e) or type(e).__name__
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
    results.put((i, sent, acked, first, last, err))


def _stress_keys(args: argparse.Namespace, cfg: configmod.Config) -> list[SenderKey] | int:
    """The keys to sign and/or encrypt with: --key files, else an HMAC key of the keys file."""
    if args.key and (args.keys or args.key_id):
        print("iotctl stress: --key names the sender's keys; --keys and --key-id pick an HMAC key of the keys "
              "file instead: give one or the other", file=sys.stderr)
        return 64
    try:
        if args.key:
            keys = [load_sender_key(Path(f)) for f in args.key]
            make_sender(keys)  # at most one signing and one AES key: say so before forking
            return keys
        keys_file = load_keys(Path(args.keys) if args.keys else keys_path(cfg))
    except KeysError as e:
        print(f"iotctl stress: {e}", file=sys.stderr)
        return EX_CONFIG
    kid = args.key_id or next((k for k, e in keys_file.items() if isinstance(e, bytes)), None)
    if kid is None or kid not in keys_file:
        what = f"key id {kid!r} is not" if kid else "no hmac key is"
        print(f"iotctl stress: {what} in the keys file", file=sys.stderr)
        return EX_CONFIG
    entry = keys_file[kid]
    if not isinstance(entry, bytes):
        print(f"iotctl stress: key {kid!r} is an {entry.kind} key; for it give the sender's key file: "
              f"--key FILE (from `iotctl keys new`)", file=sys.stderr)
        return EX_CONFIG
    return [SenderKey(kid, Kind.HMAC, entry)]


def cmd_stress(args: argparse.Namespace, log: Log) -> int:
    cfg = configmod.load(args.config)
    if args.messages < 1 or args.processes < 1 or args.window < 1:
        print("iotctl stress: --messages, --processes and --window must be positive", file=sys.stderr)
        return 64
    sender_keys = _stress_keys(args, cfg)
    if isinstance(sender_keys, int):
        return sender_keys
    run = args.run_id or os.urandom(4).hex()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(args.processes)
    results = ctx.Queue()
    per, extra = divmod(args.messages, args.processes)
    procs = []
    for i in range(args.processes):
        n = per + (1 if i < extra else 0)
        pr = ctx.Process(target=_stress_child, args=(i, n, args, cfg.mqtt, sender_keys, run, barrier, results))
        pr.start()
        procs.append(pr)
    got = []
    deadline = time.monotonic() + args.timeout + 30
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            got.append(results.get(timeout=1.0))
        except Exception:  # noqa: BLE001 - queue.Empty: check that children still live
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for pr in procs:
        pr.join(5)
        if pr.is_alive():
            pr.kill()
    sent = sum(g[1] for g in got)
    acked = sum(g[2] for g in got)
    errors = [f"process {g[0]}: {g[5]}" for g in got if g[5]]
    if len(got) < len(procs):
        errors.append(f"{len(procs) - len(got)} process(es) reported nothing")
    firsts = [g[3] for g in got if g[3]]
    lasts = [g[4] for g in got if g[4]]
    first = min(firsts) if firsts else 0.0
    last = max(lasts) if lasts and not errors else time.time()
    secs = max(last - first, 1e-9) if first else 0.0
    rate = acked / secs if secs else 0.0
    if args.json:
        print(orjson.dumps({"messages": args.messages, "processes": args.processes, "topic": args.topic,
                            "run": run, "sent": sent, "acked": acked, "seconds": round(secs, 3),
                            "rate": round(rate, 1), "first_publish": first, "last_puback": last,
                            "errors": errors}).decode())
    else:
        print(f"stress: {args.messages:,} messages from {args.processes} processes to {args.topic} (run {run})")
        print(f"sent {sent:,}  acked {acked:,}  in {secs:.2f}s  {rate:,.0f} msgs/s")
        for e in errors:
            print(f"iotctl stress: {e}", file=sys.stderr)
    if errors and acked == 0 and all("connect" in e.lower() or "barrier" in e.lower() for e in errors):
        return EX_UNAVAILABLE
    return 0 if acked == args.messages and not errors else EX_FAIL


# -- keys ------------------------------------------------------------------------------------------


def cmd_keys_new(args: argparse.Namespace, log: Log) -> int:
    kind = Kind(args.kind)
    out = Path(args.out or f"{args.key_id}.key")
    try:
        sender_line, node_line = new_key(kind, args.key_id, args.bits)
        write_sender_key(out, sender_line, kind)
    except KeysError as e:
        print(f"iotctl keys new: {e}", file=sys.stderr)
        return 64
    except FileExistsError:
        print(f"iotctl keys new: {out} exists; a key file is never replaced", file=sys.stderr)
        return EX_FAIL
    except OSError as e:
        print(f"iotctl keys new: cannot write {out}: {e.strerror}", file=sys.stderr)
        return EX_FAIL
    print(node_line)
    held = "the secret" if kind in (Kind.HMAC, Kind.AES) else "the private key"
    print(f"iotctl keys new: {held} for the sender is in {out} (mode 0600); add the line above to the keys file "
          f"iot-ingest reads ([ingest] keys_file, /etc/iot/ingest.keys when installed) and restart iot-ingest",
          file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser("dlq", help="inspect, replay or purge the ingest dead-letter queue",
                       description="The ingest worker's dead-letter queue (<state_dir>/dlq or [ingest] dlq_dir).")
    dsub = d.add_subparsers(dest="dlq_command", metavar="ACTION", required=True, parser_class=type(d))

    def common(p: argparse.ArgumentParser, ids: bool, reason: bool = True) -> None:
        p.add_argument("--config", metavar="FILE")
        if ids:
            p.add_argument("ids", nargs="*", metavar="ID", help="entry ids (from list)")
        if reason:
            p.add_argument("--reason", help="only entries with this reason (bad-signature, unknown-key, ...)")

    p = dsub.add_parser("list", help="one line per pending entry")
    common(p, ids=False)
    p.add_argument("--json", action="store_true", help="the entries as JSON lines")
    p.set_defaults(func=cmd_list, ids=None)
    p = dsub.add_parser("show", help="entries in full, payload included")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("ids", nargs="+", metavar="ID", help="entry ids (from list)")
    p.set_defaults(func=cmd_show, reason=None)
    p = dsub.add_parser("replay", help="feed entries back through validation into the database",
                        description="Validate the selected entries (all by default) again and upsert those that "
                                    "pass; only entries that landed are removed. Idempotent.")
    common(p, ids=True)
    p.set_defaults(func=cmd_replay)
    p = dsub.add_parser("purge", help="delete entries for good")
    common(p, ids=True)
    p.add_argument("--all", action="store_true", help="every pending entry")
    p.set_defaults(func=cmd_purge)

    s = sub.add_parser("stress", add_help=False, help="publish signed QoS 1 readings as fast as acknowledged",
                       description="Seed 004's stress tester: P processes sign and publish N messages in total at "
                                   "QoS 1, each keeping --window unacknowledged, and wait for every PUBACK.")
    s.add_argument("--help", action="help", help="show this help and exit")
    s.add_argument("--messages", type=int, default=100_000, help="total messages (default 100000)")
    s.add_argument("--processes", type=int, default=4, help="publishing processes (default 4)")
    s.add_argument("--topic", default="sensors/live/stress_test", help="topic (default sensors/live/stress_test)")
    s.add_argument("--window", type=int, default=1000, help="unacknowledged messages per process (default 1000)")
    s.add_argument("--key", action="append", metavar="FILE",
                   help="a sender's key file (iotctl keys new): sign with it (hmac, ed25519, rsa) or encrypt with "
                        "it (aes); give it twice, a signing key and an aes key, to sign then encrypt")
    s.add_argument("--key-id", help="without --key: the HMAC key of the keys file to sign with (default: the first)")
    s.add_argument("--keys", help="without --key: the keys file (default: the one iot-ingest reads)")
    s.add_argument("--run-id", help="message id prefix (default: random)")
    s.add_argument("--json", action="store_true", help="print the result as one JSON object")
    s.add_argument("-h", "--host", help="broker host (default from [mqtt])")
    s.add_argument("-p", "--port", type=int, help="broker port (default from [mqtt])")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up (default 600)")
    s.add_argument("--config", metavar="FILE")
    s.set_defaults(func=cmd_stress)

    k = sub.add_parser("keys", help="make ingest keys",
                       description="Keys for senders of signed or encrypted readings (docs/PROTOCOL.md).")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True, parser_class=type(k))
    p = ksub.add_parser("new", help="a new key: the sender's file, and the line for the keys file",
                        description="Write a new key for one sender to KEY_ID.key (mode 0600; never replaces a "
                                    "file) and print its line for iot-ingest's keys file. hmac and aes: a "
                                    "shared secret, the same on both sides. ed25519 and rsa: the file holds the "
                                    "private key, the line only the public key, so the node can verify but "
                                    "not sign.")
    p.add_argument("key_id", metavar="KEY_ID", help="1-32 of A-Z a-z 0-9 _ . - (travels in every message)")
    p.add_argument("--kind", required=True, choices=[k.value for k in Kind],
                   help="hmac (s1), ed25519 (ed1, advised), rsa (rsa1: RSA-PSS-SHA256), aes (aes1: AES-256-GCM)")
    p.add_argument("--bits", type=int, default=2048, choices=RSA_BITS, help="rsa: modulus size (default 2048)")
    p.add_argument("--out", metavar="FILE", help="the sender's key file (default KEY_ID.key here)")
    p.set_defaults(func=cmd_keys_new)
