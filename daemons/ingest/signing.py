"""The signed ingest payload: the one module that knows its wire format and the keys file.

Wire format (version 1), as bytes on the MQTT topic:

    s1 <key id> <signature>\\n<body>

* `s1` names the format version; a later format gets a new tag, so old and new senders can
  share a topic while keys and formats roll over.
* `<key id>`: 1-32 characters from [A-Za-z0-9_.-]; it names the key in the keys file, so a
  key can be rotated by adding the new one, moving the senders over, and removing the old.
* `<signature>`: HMAC-SHA256, base64url without padding (43 characters), computed with the
  named key over the *header prefix and the body*: `b"s1 " + key_id + b"\\n" + body`. Binding
  the key id stops a signature from being replayed under another key's name.
* `<body>`: UTF-8 JSON, the reading (schema below). The body is signed as the exact bytes
  sent: the receiver verifies before it parses, so nothing unauthenticated reaches the parser.

Body schema (checked by `validate`, after the signature):

    {"id": "<message id>", "sensor": "<sensor id>", "ts": <publish time, Unix seconds>,
     "values": {"<name>": <number or boolean>, ...}}

* `id`: 1-64 characters from [A-Za-z0-9_.:-]: unique per message; the database's key, so a
  redelivered message lands once.
* `sensor`: 1-64 characters from [A-Za-z0-9_.:/-].
* `ts`: a finite number between 2000-01-01 and 2100-01-01 (Unix seconds, fractions allowed).
* `values`: 1-64 entries; names 1-64 characters, values finite numbers or booleans.
* No other keys.

Keys file (etc/iot/ingest.keys, readable only by the service): one key per line,
`<key id> <secret as hex, at least 32 hex digits>`; blank lines and lines starting with `#`
are ignored. Every key in the file verifies; the sender signs with the one it is told to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

VERSION_TAG = b"s1"
SIG_LEN = 43  # base64url of 32 bytes, no padding
KEY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MSG_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SENSOR_ID_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
TS_MIN, TS_MAX = 946_684_800.0, 4_102_444_800.0  # 2000-01-01 .. 2100-01-01 UTC
MAX_VALUES = 64
MIN_SECRET_BYTES = 16


class Reason(StrEnum):
    """Why a message was rejected; the DLQ records it. Stable strings: scripts match on them."""

    OVERSIZED = "oversized"
    BAD_ENVELOPE = "bad-envelope"  # not "s1 <kid> <sig>\n<body>"
    UNKNOWN_KEY = "unknown-key"
    BAD_SIGNATURE = "bad-signature"
    BAD_JSON = "bad-json"
    BAD_SCHEMA = "bad-schema"
    DB_REFUSED = "db-refused"


class Rejected(Exception):
    """A message that cannot be ingested; `reason` is one of Reason, `detail` says what."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class KeysError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Reading:
    """A verified, validated message: what becomes one row."""

    msg_id: str
    sensor: str
    ts: float
    values: dict[str, float | int | bool]
    key_id: str


# -- keys --------------------------------------------------------------------------------------


def parse_keys(text: str, source: str = "keys") -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise KeysError(f"{source}:{n}: expected '<key id> <hex secret>'")
        kid, secret = parts
        if not KEY_ID_RE.fullmatch(kid):
            raise KeysError(f"{source}:{n}: key id {kid!r} must be 1-32 of A-Z a-z 0-9 _ . -")
        try:
            key = bytes.fromhex(secret)
        except ValueError:
            raise KeysError(f"{source}:{n}: secret of {kid!r} is not hex") from None
        if len(key) < MIN_SECRET_BYTES:
            raise KeysError(f"{source}:{n}: secret of {kid!r} is shorter than {MIN_SECRET_BYTES} bytes")
        if kid in keys:
            raise KeysError(f"{source}:{n}: key id {kid!r} appears twice")
        keys[kid] = key
    return keys


def load_keys(path: Path, *, require_private: bool = True) -> dict[str, bytes]:
    """Read the keys file. It must not be readable or writable by group or others: a secret that
    every local user can read signs nothing."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise KeysError(f"cannot read keys file {path}: {e.strerror}") from None
    if require_private and stat.S_IMODE(st.st_mode) & 0o077:
        raise KeysError(f"keys file {path} is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"chmod 600 it")
    keys = parse_keys(text, str(path))
    if not keys:
        raise KeysError(f"keys file {path} holds no key")
    return keys


def new_secret() -> str:
    return os.urandom(32).hex()


# -- sign and verify ---------------------------------------------------------------------------


def _b64(mac: bytes) -> bytes:
    return base64.urlsafe_b64encode(mac)[:SIG_LEN]


class Signer:
    """Signs bodies with one key. `sign(body)` is the sender's hot path: one HMAC."""

    __slots__ = ("key_id", "_base", "_prefix")

    def __init__(self, key_id: str, key: bytes):
        if not KEY_ID_RE.fullmatch(key_id):
            raise KeysError(f"bad key id {key_id!r}")
        kid = key_id.encode()
        self.key_id = key_id
        self._prefix = VERSION_TAG + b" " + kid + b" "
        self._base = hmac.new(key, VERSION_TAG + b" " + kid + b"\n", hashlib.sha256)

    def sign(self, body: bytes) -> bytes:
        h = self._base.copy()
        h.update(body)
        return self._prefix + _b64(h.digest()) + b"\n" + body


def encode_body(msg_id: str, sensor: str, ts: float, values: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": msg_id, "sensor": sensor, "ts": ts, "values": values})


class Verifier:
    """Checks the envelope and signature, then parses and validates the body.

    `check(payload)` returns a Reading or raises Rejected. Everything from outside is treated
    as hostile: the size is checked first, the signature before the JSON parser sees a byte.
    """

    __slots__ = ("_bases", "max_payload")

    def __init__(self, keys: dict[str, bytes], max_payload: int):
        self._bases = {kid.encode(): hmac.new(k, VERSION_TAG + b" " + kid.encode() + b"\n", hashlib.sha256)
                       for kid, k in keys.items()}
        self.max_payload = max_payload

    def verify(self, payload: bytes) -> tuple[str, bytes]:
        """(key id, body) of a correctly signed payload."""
        if len(payload) > self.max_payload:
            raise Rejected(Reason.OVERSIZED, f"{len(payload)} bytes > {self.max_payload}")
        header, nl, body = payload.partition(b"\n")
        parts = header.split(b" ")
        if not nl or len(parts) != 3 or parts[0] != VERSION_TAG:
            raise Rejected(Reason.BAD_ENVELOPE, "expected 's1 <key id> <signature>' then a newline and the body")
        _, kid, sig = parts
        base = self._bases.get(kid)
        if base is None:
            raise Rejected(Reason.UNKNOWN_KEY, f"key id {kid.decode(errors='replace')[:40]!r} is not in the keys file")
        h = base.copy()
        h.update(body)
        if not hmac.compare_digest(_b64(h.digest()), sig):
            raise Rejected(Reason.BAD_SIGNATURE, f"HMAC-SHA256 with key {kid.decode()!r} does not match")
        return kid.decode(), body

    def check(self, payload: bytes) -> Reading:
        kid, body = self.verify(payload)
        return validate(body, kid)


_FIELDS = frozenset(("id", "sensor", "ts", "values"))
_I64 = 2**63


def _schema_error(doc: dict) -> Rejected:
    missing, extra = _FIELDS - doc.keys(), doc.keys() - _FIELDS
    return Rejected(Reason.BAD_SCHEMA, "; ".join(
        ([f"missing {', '.join(sorted(missing))}"] if missing else [])
        + ([f"unknown {', '.join(sorted(extra))[:100]}"] if extra else [])))


def validate(body: bytes, key_id: str) -> Reading:
    """Parse and check the body (schema in the module docstring). Raises Rejected.

    Written for the hot path (about 2 us): type() identity checks, no per-call sets."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Rejected(Reason.BAD_JSON, str(e)[:200]) from None
    if type(doc) is not dict:
        raise Rejected(Reason.BAD_SCHEMA, f"body is a JSON {type(doc).__name__}, expected an object")
    try:
        msg_id, sensor, ts, values = doc["id"], doc["sensor"], doc["ts"], doc["values"]
    except KeyError:
        raise _schema_error(doc) from None
    if len(doc) != 4:
        raise _schema_error(doc)
    if type(msg_id) is not str or not MSG_ID_RE.fullmatch(msg_id):
        raise Rejected(Reason.BAD_SCHEMA, "id must be 1-64 of A-Z a-z 0-9 _ . : -")
    if type(sensor) is not str or not SENSOR_ID_RE.fullmatch(sensor):
        raise Rejected(Reason.BAD_SCHEMA, "sensor must be 1-64 of A-Z a-z 0-9 _ . : / -")
    if type(ts) is int:
        ts = float(ts)
    if type(ts) is not float or not TS_MIN <= ts <= TS_MAX:
        raise Rejected(Reason.BAD_SCHEMA, "ts must be Unix seconds between 2000 and 2100")
    if type(values) is not dict or not 1 <= len(values) <= MAX_VALUES:
        raise Rejected(Reason.BAD_SCHEMA, f"values must be an object of 1-{MAX_VALUES} entries")
    for name, v in values.items():
        t = type(v)
        if t is float:
            ok = v - v == 0.0  # False for inf and nan (orjson refuses both anyway)
        elif t is int:
            ok = -_I64 <= v < _I64
        else:
            ok = t is bool
        if not ok or not 1 <= len(name) <= 64:
            raise Rejected(Reason.BAD_SCHEMA, f"values.{name[:64]} must be a finite number or a boolean "
                                              f"(name 1-64 characters)")
    return Reading(msg_id, sensor, ts, values, key_id)
