"""The ingest payload: the one module that knows its wire formats (docs/PROTOCOL.md, "Ingest
payload", says the same for device authors, with test vectors).

Wire formats, as bytes on the MQTT topic; the first word (the tag) names the format:

    s1 <key id> <signature>\\n<body>        HMAC-SHA256, shared secret (the original format)
    ed1 <key id> <signature>\\n<body>       Ed25519, the sender's private key
    rsa1 <key id> <signature>\\n<body>      RSA-PSS-SHA256, the sender's private key
    aes1 <key id> <nonce>\\n<ciphertext>    AES-256-GCM around a body or a signed message

* A later format gets a new tag, so old and new senders share a topic while keys and formats
  roll over; the tag fixes the algorithm, so a key id cannot be used with another one than its
  kind (`wrong-key-kind`: an HMAC secret is never tried as an AES key, nor the reverse).
* `<key id>`: 1-32 characters from [A-Za-z0-9_.-] naming a key in the keys file (keys.py).
* Signatures are base64url without padding, over `<tag> <key id>\\n<body>`: the header without
  the signature, so the tag and the key id are signed too and a signature cannot be replayed
  under another key's name or format. s1: HMAC-SHA256 (43 characters); ed1: Ed25519 (86);
  rsa1: RSASSA-PSS with SHA-256 and MGF1-SHA-256 (the key's modulus size; the sender uses a
  32-byte salt, any salt length verifies).
* aes1: `<nonce>` is 12 random bytes, base64url without padding (16 characters), fresh for
  every message; `<ciphertext>` is the raw AES-256-GCM output (plaintext length + 16-byte tag),
  and the associated data is the header line as sent, newline included, so the key id and the
  nonce are authenticated. The plaintext is either the body (it starts with `{`) or a complete
  s1/ed1/rsa1 message (sign, then encrypt); never another aes1.
* `<body>`: UTF-8 JSON, the reading (schema below). It is verified as the exact bytes sent,
  before it is parsed, so nothing unauthenticated reaches the parser.

Replay: a message sent again (a QoS 1 redelivery, or an attacker's copy) carries the same
message id, which is the database's unique key, so it lands once. What a receiver can add for
AES-GCM is to notice a nonce used twice for different ciphertexts (a sender with a constant
nonce or a broken random source, which exposes its key): the Verifier remembers the last
NONCE_WINDOW to 2 x NONCE_WINDOW (key id, nonce, tag) it authenticated and refuses such a
repeat as `nonce-reused`.

Body schema (checked by `validate`, after the signature):

    {"id": "<message id>", "sensor": "<sensor id>", "ts": <publish time, Unix seconds>,
     "values": {"<name>": <number or boolean>, ...}}

* `id`: 1-64 characters from [A-Za-z0-9_.:-]: unique per message; the database's key, so a
  redelivered message lands once.
* `sensor`: 1-64 characters from [A-Za-z0-9_.:/-].
* `ts`: a finite number between 2000-01-01 and 2100-01-01 (Unix seconds, fractions allowed).
* `values`: 1-64 entries; names 1-64 characters, values finite numbers or booleans.
* No other keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

# The keys file lives in keys.py; these names stay importable from here, where they began.
from .keys import (KEY_ID_RE, MIN_SECRET_BYTES, Key, KeyEntry, KeysError, Kind, SenderKey, kind_of,  # noqa: F401
                   load_keys, new_secret, parse_keys)

VERSION_TAG = S1 = b"s1"
ED1, RSA1, AES1 = b"ed1", b"rsa1", b"aes1"
TAG_KIND = {S1: Kind.HMAC, ED1: Kind.ED25519, RSA1: Kind.RSA, AES1: Kind.AES}
SIGNED_TAGS = (S1, ED1, RSA1)
SIG_LEN = 43  # base64url of 32 bytes, no padding
ED_SIG_BYTES = 64
NONCE_BYTES, NONCE_LEN, GCM_TAG_BYTES = 12, 16, 16
NONCE_WINDOW = 16384
MSG_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SENSOR_ID_RE = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
TS_MIN, TS_MAX = 946_684_800.0, 4_102_444_800.0  # 2000-01-01 .. 2100-01-01 UTC
MAX_VALUES = 64
_SHA256 = hashes.SHA256()
PSS_SIGN = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=32)
PSS_VERIFY = padding.PSS(mgf=padding.MGF1(_SHA256), salt_length=padding.PSS.AUTO)


class Reason(StrEnum):
    """Why a message was rejected; the DLQ records it. Stable strings: scripts match on them."""

    OVERSIZED = "oversized"
    BAD_ENVELOPE = "bad-envelope"  # no known "<tag> <kid> <sig or nonce>\n..." header
    UNKNOWN_KEY = "unknown-key"
    WRONG_KEY_KIND = "wrong-key-kind"  # the key id names a key of another kind than the tag's
    BAD_SIGNATURE = "bad-signature"
    BAD_CIPHERTEXT = "bad-ciphertext"  # AES-GCM did not authenticate: wrong key, or changed on the way
    NONCE_REUSED = "nonce-reused"
    BAD_JSON = "bad-json"
    BAD_SCHEMA = "bad-schema"
    DB_REFUSED = "db-refused"


class Rejected(Exception):
    """A message that cannot be ingested; `reason` is one of Reason, `detail` says what."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Reading:
    """A verified, validated message: what becomes one row."""

    msg_id: str
    sensor: str
    ts: float
    values: dict[str, float | int | bool]
    key_id: str  # the signing key's; the AES key's for a reading that is encrypted only


# -- send ----------------------------------------------------------------------------------------


def _b64(mac: bytes) -> bytes:
    return base64.urlsafe_b64encode(mac)[:SIG_LEN]


def b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _unb64url(text: bytes, size: int) -> bytes | None:
    """The `size` bytes that `text` encodes as unpadded base64url, else None. Only the one
    canonical spelling passes: the decoder alone would skip stray characters."""
    try:
        raw = base64.urlsafe_b64decode(text + b"==")
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size and b64url(raw) == text else None


class Signer:
    """Signs bodies with one HMAC key (s1). `sign(body)` is the sender's hot path: one HMAC."""

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


class KeyPairSigner:
    """Signs bodies with an Ed25519 (ed1) or RSA (rsa1) private key."""

    __slots__ = ("key_id", "_prefix", "_signed", "_sign")

    def __init__(self, key_id: str, key: Key):
        if not KEY_ID_RE.fullmatch(key_id):
            raise KeysError(f"bad key id {key_id!r}")
        tag = ED1 if key.kind is Kind.ED25519 else RSA1
        kid = key_id.encode()
        self.key_id = key_id
        self._prefix = tag + b" " + kid + b" "
        self._signed = tag + b" " + kid + b"\n"
        private = key.obj
        self._sign = private.sign if key.kind is Kind.ED25519 else (lambda m: private.sign(m, PSS_SIGN, _SHA256))

    def sign(self, body: bytes) -> bytes:
        return self._prefix + b64url(self._sign(self._signed + body)) + b"\n" + body


class Encryptor:
    """Wraps a body or a signed message in aes1, with a fresh random nonce each time.

    The nonce comes from os.urandom for every message, never a counter or a seeded generator:
    nothing to keep across restarts, and processes forked from one parent cannot repeat it."""

    __slots__ = ("key_id", "_prefix", "_aes")

    def __init__(self, key_id: str, key: Key):
        if not KEY_ID_RE.fullmatch(key_id) or key.kind is not Kind.AES:
            raise KeysError(f"bad AES key {key_id!r}")
        self.key_id = key_id
        self._prefix = AES1 + b" " + key_id.encode() + b" "
        self._aes = key.obj

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        header = self._prefix + b64url(nonce) + b"\n"
        return header + self._aes.encrypt(nonce, plaintext, header)


def make_sender(keys: Sequence[SenderKey]) -> Callable[[bytes], bytes]:
    """body -> payload for a sender holding these keys: at most one signing key (hmac, ed25519
    or rsa) and at most one AES key; with both, the body is signed, then encrypted."""
    signing = [k for k in keys if k.kind != Kind.AES]  # == not is: a plain "aes" string counts too
    aes = [k for k in keys if k.kind == Kind.AES]
    if not keys or len(signing) > 1 or len(aes) > 1:
        raise KeysError("give one signing key (hmac, ed25519 or rsa), one aes key, or one of each")
    sign = None
    if signing:
        k = signing[0]
        sign = Signer(k.key_id, k.entry).sign if k.kind == Kind.HMAC else KeyPairSigner(k.key_id, k.entry).sign
    if not aes:
        return sign
    seal = Encryptor(aes[0].key_id, aes[0].entry).seal
    return seal if sign is None else (lambda body: seal(sign(body)))


def encode_body(msg_id: str, sensor: str, ts: float, values: dict[str, Any]) -> bytes:
    return orjson.dumps({"id": msg_id, "sensor": sensor, "ts": ts, "values": values})


# -- receive -------------------------------------------------------------------------------------


class Verifier:
    """Checks the envelope, decrypts and checks signatures, then parses and validates the body.

    `check(payload)` returns a Reading or raises Rejected. Everything from outside is treated
    as hostile: the size is checked first, the signature or GCM tag before the JSON parser sees
    a byte. Key objects are made once, here; a message costs a dict lookup and the algorithm.
    `track_nonces=False` for a second look at old messages (`iotctl dlq replay`), where a
    nonce already refused once must not be refused again by the same rule.
    """

    __slots__ = ("_hmac", "_ed", "_rsa", "_aes", "_kinds", "max_payload", "_track", "_seen", "_seen_old")

    def __init__(self, keys: Mapping[str, KeyEntry], max_payload: int, *, track_nonces: bool = True):
        self._hmac: dict[bytes, Any] = {}
        self._ed: dict[bytes, Any] = {}
        self._rsa: dict[bytes, tuple[Any, int]] = {}
        self._aes: dict[bytes, Any] = {}
        self._kinds: dict[bytes, Kind] = {}
        for key_id, entry in keys.items():
            kid, kind = key_id.encode(), kind_of(entry)
            self._kinds[kid] = kind
            if kind is Kind.HMAC:
                self._hmac[kid] = hmac.new(entry, S1 + b" " + kid + b"\n", hashlib.sha256)
            elif kind is Kind.ED25519:
                self._ed[kid] = entry.obj
            elif kind is Kind.RSA:
                self._rsa[kid] = (entry.obj, (entry.obj.key_size + 7) // 8)
            else:
                self._aes[kid] = entry.obj
        self.max_payload = max_payload
        self._track = track_nonces
        self._seen: dict[bytes, bytes] = {}
        self._seen_old: dict[bytes, bytes] = {}

    def verify(self, payload: bytes) -> tuple[str, bytes]:
        """(key id, body) of a correctly signed and/or encrypted payload."""
        if len(payload) > self.max_payload:
            raise Rejected(Reason.OVERSIZED, f"{len(payload)} bytes > {self.max_payload}")
        header, nl, rest = payload.partition(b"\n")
        parts = header.split(b" ")
        if nl and len(parts) == 3:
            tag, kid, word = parts
            if tag == S1:  # the common case first
                return self._s1(kid, word, rest)
            if tag == AES1:
                return self._open(kid, word, payload[:len(header) + 1], rest)
            if tag == ED1 or tag == RSA1:
                return self._signed(tag, kid, word, rest)
        raise Rejected(Reason.BAD_ENVELOPE, "expected '<s1|ed1|rsa1|aes1> <key id> <signature or nonce>' "
                                            "then a newline and the rest")

    def check(self, payload: bytes) -> Reading:
        kid, body = self.verify(payload)
        return validate(body, kid)

    def _no_key(self, tag: bytes, kid: bytes) -> Rejected:
        name = kid.decode(errors="replace")[:40]
        kind = self._kinds.get(kid)
        if kind is None:
            return Rejected(Reason.UNKNOWN_KEY, f"key id {name!r} is not in the keys file")
        return Rejected(Reason.WRONG_KEY_KIND, f"{tag.decode()} needs an {TAG_KIND[tag]} key; {name!r} is {kind}")

    def _s1(self, kid: bytes, sig: bytes, body: bytes) -> tuple[str, bytes]:
        base = self._hmac.get(kid)
        if base is None:
            raise self._no_key(S1, kid)
        h = base.copy()
        h.update(body)
        if not hmac.compare_digest(_b64(h.digest()), sig):
            raise Rejected(Reason.BAD_SIGNATURE, f"HMAC-SHA256 with key {kid.decode()!r} does not match")
        return kid.decode(), body

    def _signed(self, tag: bytes, kid: bytes, sig: bytes, body: bytes) -> tuple[str, bytes]:
        """ed1 and rsa1, and s1 for a signed message inside aes1."""
        if tag == S1:
            return self._s1(kid, sig, body)
        if tag == ED1:
            pub, size, what, args = self._ed.get(kid), ED_SIG_BYTES, "Ed25519", ()
        else:
            (pub, size), what, args = self._rsa.get(kid, (None, 0)), "RSA-PSS-SHA256", (PSS_VERIFY, _SHA256)
        if pub is None:
            raise self._no_key(tag, kid)
        raw = _unb64url(sig, size)
        if raw is None:
            raise Rejected(Reason.BAD_SIGNATURE, f"{what} signature of key {kid.decode()!r} is not {size} bytes "
                                                 f"as unpadded base64url")
        try:
            pub.verify(raw, tag + b" " + kid + b"\n" + body, *args)
        except InvalidSignature:
            raise Rejected(Reason.BAD_SIGNATURE, f"{what} with key {kid.decode()!r} does not verify") from None
        return kid.decode(), body

    def _open(self, kid: bytes, nonce_b64: bytes, aad: bytes, ciphertext: bytes) -> tuple[str, bytes]:
        aes = self._aes.get(kid)
        if aes is None:
            raise self._no_key(AES1, kid)
        nonce = _unb64url(nonce_b64, NONCE_BYTES)
        if nonce is None:
            raise Rejected(Reason.BAD_ENVELOPE, f"aes1 nonce must be {NONCE_BYTES} bytes as {NONCE_LEN} "
                                                f"base64url characters")
        name = kid.decode()
        try:
            plain = aes.decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise Rejected(Reason.BAD_CIPHERTEXT, f"AES-256-GCM with key {name!r} does not authenticate "
                                                  f"(wrong key, or header or ciphertext changed)") from None
        if self._track:
            self._remember(kid + nonce, ciphertext[-GCM_TAG_BYTES:], name)
        if plain[:1] == b"{":
            return name, plain
        header, nl, body = plain.partition(b"\n")
        parts = header.split(b" ")
        if not nl or len(parts) != 3 or parts[0] not in SIGNED_TAGS:
            raise Rejected(Reason.BAD_ENVELOPE, f"inside aes1 (key {name!r}): neither a body ('{{...') nor a "
                                                f"signed message (s1, ed1, rsa1)")
        try:
            return self._signed(parts[0], parts[1], parts[2], body)
        except Rejected as e:
            raise Rejected(e.reason, f"inside aes1 (key {name!r}): {e.detail}") from None

    def _remember(self, mark: bytes, gcm_tag: bytes, name: str) -> None:
        """Refuse a (key, nonce) that came before with another ciphertext; the same message again
        (a redelivery) passes. Two generations of NONCE_WINDOW bound the memory."""
        prev = self._seen.get(mark)
        if prev is None:
            prev = self._seen_old.get(mark)
        if prev is None:
            if len(self._seen) >= NONCE_WINDOW:
                self._seen_old, self._seen = self._seen, {}
            self._seen[mark] = gcm_tag
        elif prev != gcm_tag:
            raise Rejected(Reason.NONCE_REUSED, f"key {name!r} with a nonce already used for another message: "
                                                f"the sender repeats nonces, which exposes the key; fix the "
                                                f"sender and replace its key")


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
