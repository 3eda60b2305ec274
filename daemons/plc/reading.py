"""The PLC reading: the one JSON message iot-plc publishes and iot-dbsub stores (seed 002).

    {"ts": 1764662400.123, "device_id": "line1", "seq": 17,
     "temperature": 23.7, "pressure": 1.42, "units": {"temperature": "C", "pressure": "bar"}}

`ts` is the time the reading was taken (Unix seconds; an ISO 8601 string is accepted from
other publishers, as the seed's examples write it), `seq` counts the device's readings from 0
and never repeats (iot-plc keeps it on disk), so `(device_id, seq)` names one reading however
often it is delivered. Every other field is a measured value, a number; `units` (optional)
maps value names to their units. Plain JSON, unsigned: authenticity is iot-ingest's business.

`parse()` is pure and strict: a message that is not such a reading raises `Malformed` naming
why, and nothing partial is stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import orjson

from ..config import READING_FIELDS

MAX_DEVICE_ID = 64
MAX_SEQ = 2**63 - 1
MAX_VALUES = 256


class Malformed(Exception):
    """Not a reading; `reason` is a short stable word for counting, str() says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reading:
    device_id: str
    seq: int
    ts: float
    values: dict[str, float | int]
    units: dict[str, str]


def encode(device_id: str, seq: int, ts: float, values: dict[str, float | int], units: dict[str, str]) -> bytes:
    msg: dict = {"ts": round(ts, 3), "device_id": device_id, "seq": seq}
    msg.update(values)
    if units:
        msg["units"] = units
    return orjson.dumps(msg)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v))


def _ts(v) -> float:
    if _number(v):
        if not 0 <= v < 1e11:  # seconds, not milliseconds: up to the year 5138
            raise Malformed("bad_field", f"ts {v!r} is not Unix time in seconds")
        return float(v)
    if isinstance(v, str):
        try:
            t = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            raise Malformed("bad_field", f"ts {v[:40]!r} is neither a number nor an ISO 8601 time") from None
        return t.timestamp()  # a time without a zone is taken as the local time
    raise Malformed("bad_field", f"ts is {type(v).__name__}, expected a number or an ISO 8601 string")


def parse(payload: bytes, max_payload: int) -> Reading:
    if len(payload) > max_payload:
        raise Malformed("oversized", f"{len(payload)} bytes, more than max_payload {max_payload}")
    try:
        msg = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise Malformed("not_json", f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise Malformed("not_json", f"a JSON {type(msg).__name__}, expected an object")
    for key in ("ts", "device_id", "seq"):
        if key not in msg:
            raise Malformed("missing_field", f"no {key}")
    device_id = msg["device_id"]
    if not isinstance(device_id, str) or not 0 < len(device_id) <= MAX_DEVICE_ID or not device_id.isprintable():
        raise Malformed("bad_field", f"device_id {str(device_id)[:80]!r} is not a string of 1-{MAX_DEVICE_ID} "
                                     "printable characters")
    seq = msg["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise Malformed("bad_field", f"seq {str(seq)[:40]!r} is not an integer from 0 to {MAX_SEQ}")
    ts = _ts(msg["ts"])
    units = msg.get("units", {})
    if not isinstance(units, dict) or not all(isinstance(u, str) and len(u) <= 32 for u in units.values()):
        raise Malformed("bad_field", "units is not an object of strings (at most 32 characters each)")
    values = {}
    for key, v in msg.items():
        if key in READING_FIELDS:
            continue
        if not _number(v):
            raise Malformed("bad_field", f"{key[:64]!r} is {type(v).__name__}, expected a number")
        values[key] = v
    if len(values) > MAX_VALUES:
        raise Malformed("bad_field", f"{len(values)} values, at most {MAX_VALUES}")
    return Reading(device_id, seq, ts, values, {k: u for k, u in units.items() if k in values})
