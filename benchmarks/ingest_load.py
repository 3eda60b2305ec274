"""A light load generator for the ingest benchmark.

It does what `iotctl stress` does (P processes sign N readings in total and publish them at QoS
1, each keeping a window of unacknowledged messages, with the same message ids, bodies and
signatures, and prints the same JSON summary), but over raw sockets with the broker's own encoder
instead of paho. paho decodes every PUBACK into MQTT 5 reason-code and property objects, which
made `iotctl stress` the largest CPU user of the whole run on two cores; this generator leaves
that CPU to the pipeline being measured. A benchmark tool, not a client of the product: the
product's clients go through paho (DESIGN.md).

    .venv/bin/python benchmarks/ingest_load.py --port 1883 --keys etc/iot/ingest.keys --messages 100000
    .venv/bin/python benchmarks/ingest_load.py --port 1883 --key dev-7.key [--key aes-1.key] ...
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import socket
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemons.broker.packets import Connect, encode, encode_publish  # noqa: E402
from daemons.ingest.keys import Kind, SenderKey, load_sender_key  # noqa: E402
from daemons.ingest.signing import encode_body, load_keys, make_sender  # noqa: E402

BATCH = 500


def child(i: int, count: int, args, keys: list[SenderKey], run: str, barrier, results) -> None:
    sent = acked = 0
    first = last = 0.0
    err = ""
    try:
        sign = make_sender(keys)
        s = socket.create_connection((args.host, args.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(encode(Connect(f"load-{run}-{i}"[:64], keep_alive=600)))
        connack = s.recv(4)
        if len(connack) != 4 or connack[3] != 0:
            raise RuntimeError(f"CONNACK refused: {connack!r}")
        s.settimeout(None)
        barrier.wait(args.timeout)
        topic, window, now = args.topic.encode(), args.window, time.time
        pid = 0
        ack_bytes = 0
        first = now()
        deadline = time.monotonic() + args.timeout
        while acked < count:
            out = []
            while sent < count and sent - acked < window and len(out) < BATCH:
                body = encode_body(f"{run}-{i}-{sent}", f"stress-{i}-{sent % 16}", now(),
                                   {"temp": 20.0 + (sent % 100) / 10, "seq": sent})
                pid = pid % 65535 + 1  # window << 65535: an id is never reused while unacked
                out.append(encode_publish(topic, sign(body), 1, False, False, pid))
                sent += 1
            if out:
                s.sendall(b"".join(out))
            ready, _, _ = select.select([s], [], [], 0 if out else 1.0)
            if ready:
                data = s.recv(1 << 20)
                if not data:
                    raise RuntimeError("connection closed by the broker")
                ack_bytes += len(data)  # only PUBACKs come back: 4 bytes each
                acked = ack_bytes // 4
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all acked in {args.timeout:g}s")
        last = now()
        s.sendall(b"\xe0\x00")  # DISCONNECT
        s.close()
    except Exception as e:  # noqa: BLE001 - reported with the counts so far
        err = str(e) or type(e).__name__
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
    results.put((i, sent, acked, first, last, err))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", help="keys file; signs with its first key (an HMAC key) unless --key-id")
    ap.add_argument("--key-id")
    ap.add_argument("--key", action="append", metavar="FILE",
                    help="instead of --keys: a sender's key file (iotctl keys new), as `iotctl stress --key`")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--topic", default="sensors/live/stress_test")
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--run-id", default=os.urandom(4).hex())
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.window < 65535:
        ap.error("--window must be 1-65534")
    if args.key:
        sender = [load_sender_key(Path(f)) for f in args.key]
    elif args.keys:
        keys = load_keys(Path(args.keys))
        kid = args.key_id or next(iter(keys))
        sender = [SenderKey(kid, Kind.HMAC, keys[kid])]
    else:
        ap.error("give --keys or --key")
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(args.processes), ctx.Queue()
    per, extra = divmod(args.messages, args.processes)
    procs = [ctx.Process(target=child, args=(i, per + (1 if i < extra else 0), args, sender,
                                             args.run_id, barrier, results)) for i in range(args.processes)]
    for p in procs:
        p.start()
    got = [results.get(timeout=args.timeout + 30) for _ in procs]
    for p in procs:
        p.join(5)
    sent, acked = sum(g[1] for g in got), sum(g[2] for g in got)
    errors = [f"process {g[0]}: {g[5]}" for g in got if g[5]]
    first = min((g[3] for g in got if g[3]), default=0.0)
    last = max((g[4] for g in got if g[4]), default=time.time())
    secs = max(last - first, 1e-9)
    summary = {"messages": args.messages, "processes": args.processes, "topic": args.topic, "run": args.run_id,
               "sent": sent, "acked": acked, "seconds": round(secs, 3), "rate": round(acked / secs, 1),
               "first_publish": first, "last_puback": last, "errors": errors}
    print(orjson.dumps(summary).decode() if args.json else
          f"sent {sent:,}  acked {acked:,}  in {secs:.2f}s  {acked / secs:,.0f} msgs/s  errors {errors}")
    return 0 if acked == args.messages and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
