"""`iotctl readings`: what iot-dbsub's database holds, newest last; `--follow` keeps printing."""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time

import orjson

from .. import config as configmod
from . import db as dbmod

EX_FAIL = 1
FOLLOW_POLL = 0.5


def _line(row: tuple) -> str:
    _, device, seq, ts, _topic, vals, units, _ = row
    values, units = orjson.loads(vals), orjson.loads(units)
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    parts = [f"{k}={v}" + (f" {units[k]}" if units.get(k) else "") for k, v in values.items()]
    return f"{t}  {device}  seq={seq}  " + "  ".join(parts)


def _json(row: tuple) -> str:
    _, device, seq, ts, topic, vals, units, received = row
    return orjson.dumps({"device_id": device, "seq": seq, "ts": ts, "topic": topic, **orjson.loads(vals),
                         "units": orjson.loads(units), "received_at": received}).decode()


def cmd_readings(args, log) -> int:
    cfg = configmod.load(args.config)
    path = dbmod.path_of(cfg)
    if not path.exists():
        print(f"iotctl readings: no database at {path} (iot-dbsub has stored nothing yet)", file=sys.stderr)
        return EX_FAIL
    fmt = _json if args.json else _line
    try:
        conn = dbmod.open_readonly(path)
        rows = dbmod.select(conn, args.device, args.last)
        for row in rows:
            print(fmt(row), flush=True)
        last = rows[-1][0] if rows else 0  # rows are the newest of the selection: all after them is new
        while args.follow:
            time.sleep(FOLLOW_POLL)
            for row in dbmod.select(conn, args.device, None, last):
                print(fmt(row), flush=True)
                last = row[0]
    except sqlite3.Error as e:
        print(f"iotctl readings: cannot read {path}: {e}", file=sys.stderr)
        return EX_FAIL
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def add_commands(sub) -> None:
    p = sub.add_parser("readings", help="print the PLC readings iot-dbsub stored",
                       description="Print the readings in iot-dbsub's database ([dbsub] sqlite_path), oldest "
                                   "first: time taken, device, seq and each value with its unit.")
    p.add_argument("--config", metavar="FILE", help="config file (default: the usual search)")
    p.add_argument("--device", metavar="D", help="only this device id")
    p.add_argument("--last", metavar="N", type=_count, default=20, help="the N newest readings (default 20)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new readings as they are stored")
    p.add_argument("--json", action="store_true", help="one JSON object per reading")
    p.set_defaults(func=cmd_readings)
