"""The file transfer wire format: topics, the binary chunk frame, the JSON control messages.

This module is the only one that knows how bytes on the wire look (docs/PROTOCOL.md is its
prose twin). It is pure: no sockets, no files, no clocks, so both ends and the tests share it.

Theory of operation
===================

One transfer has one `file_id` (32 lowercase hex digits, random, chosen by the sender and kept
in its journal) and five topics under `{prefix}/file/{file_id}/`:

    meta    sender -> receiver  JSON manifest (or a cancel notice)          QoS 1
    chunk   sender -> receiver  binary frame: 40-byte header + raw bytes   QoS 1
    retry   sender -> receiver  the same frame, for a chunk asked again    QoS 1
    status  receiver -> sender  JSON: what is received and what is missing  QoS 1
    ack     receiver -> sender  JSON: the file is verified, fsynced, named  QoS 1

Chunks are raw bytes behind a fixed header, so a 256 KiB chunk costs about 100 bytes of
framing (MQTT included): the wire stays within 1% of the file size. Everything that comes
from the network is checked here, field by field; a decoder either returns a typed value or
raises `BadMessage` saying what was wrong, never anything else.

seedjson.py is the other codec (`[transfer] wire = "seed-json"`): the same functions over
the same typed values, so that the engine, the sender and the receiver never know which of
the two is on the wire; `daemons.transfer.codec()` is the one place that picks.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import orjson

VERSION = 1
KINDS = ("meta", "chunk", "status", "retry", "ack")
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_FILE_SIZE = 2**50
MAX_CHUNKS = 2**32 - 1  # the frame's index field is 32 bits
MAX_NAME = 1024  # characters; the receiver shortens further for its file system
MAX_MISSING = 256  # indexes listed in one status
MAX_REASON = 200

_ID_RE = re.compile(r"[0-9a-f]{32}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

# Chunk frame header: magic, version, flags, chunk index, sha256 of the data. Big-endian.
_CHUNK = struct.Struct(">2sBBI32s")
CHUNK_HEADER = _CHUNK.size  # 40
_MAGIC = b"FC"
FLAG_RETRY = 0x01  # informational: this copy answers a status

# Status states.
RECEIVING = "receiving"  # meta known; `missing` says what is still needed
REFUSED = "refused"  # will not be accepted; `reason` says why (too large, no space, ...)
UNKNOWN = "unknown"  # chunks arrived for an id without a manifest: announce it again
STATES = (RECEIVING, REFUSED, UNKNOWN)

# Our sender resends a chunk a status lists only once it is overdue (engine.py), so a status
# may list every chunk not received yet. A format whose senders resend at once every chunk
# listed sets this, and the receiver then lists only gaps until nothing arrives (receiver.py).
LISTED_IS_RESENT = False


class BadMessage(ValueError):
    """A message from the network that does not follow this protocol."""


# --- topics -------------------------------------------------------------------------------------


def topic(prefix: str, file_id: str, kind: str) -> str:
    return f"{prefix}/file/{file_id}/{kind}"


def subscription(prefix: str, kind: str) -> str:
    return f"{prefix}/file/+/{kind}"


def parse_topic(prefix: str, name: str, id_re: re.Pattern = _ID_RE) -> tuple[str, str]:
    """(file_id, kind) of a transfer topic under `prefix`."""
    head = prefix + "/file/"
    if not name.startswith(head):
        raise BadMessage(f"not a transfer topic: {name!r}")
    file_id, _, kind = name[len(head):].partition("/")
    if kind not in KINDS or not id_re.fullmatch(file_id):
        raise BadMessage(f"bad transfer topic: {name!r}")
    return file_id, kind


def valid_id(file_id: str) -> bool:
    return bool(_ID_RE.fullmatch(file_id))


# --- chunks -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    sha256: bytes  # 32 raw bytes, as the sender claims
    data: memoryview
    retry: bool = False


def encode_chunk(file_id: str, index: int, digest: bytes, data: bytes, retry: bool = False) -> bytes:
    # file_id is in the topic already: the frame does not repeat it.
    return _CHUNK.pack(_MAGIC, VERSION, FLAG_RETRY if retry else 0, index, digest) + data


def decode_chunk(payload: bytes, file_id: str) -> Chunk:
    if len(payload) < CHUNK_HEADER:
        raise BadMessage(f"chunk frame of {len(payload)} bytes is shorter than its header")
    magic, version, flags, index, digest = _CHUNK.unpack_from(payload)
    if magic != _MAGIC or version != VERSION:
        raise BadMessage(f"not a version {VERSION} chunk frame")
    return Chunk(index, digest, memoryview(payload)[CHUNK_HEADER:], bool(flags & FLAG_RETRY))


# --- manifest -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Manifest:
    file_id: str
    name: str
    size: int
    chunk_size: int
    sha256: str  # hex, whole file
    chunk_sha256: bytes  # 32 raw bytes per chunk, concatenated: compact for big files
    content_type: str = "application/octet-stream"
    mtime: float = 0.0

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    def chunk_digest(self, index: int) -> bytes:
        return self.chunk_sha256[32 * index:32 * index + 32]

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)


def chunk_count(size: int, chunk_size: int) -> int:
    return math.ceil(size / chunk_size)  # 0 for an empty file: the manifest says it all


@dataclass(frozen=True, slots=True)
class Cancel:
    file_id: str
    reason: str


def encode_meta(m: Manifest) -> bytes:
    return orjson.dumps({
        "v": VERSION, "id": m.file_id, "name": m.name, "size": m.size, "chunk_size": m.chunk_size,
        "chunks": m.chunks, "sha256": m.sha256,
        "chunk_sha256": [m.chunk_sha256[i:i + 32].hex() for i in range(0, len(m.chunk_sha256), 32)],
        "content_type": m.content_type, "mtime": m.mtime,
    })


def encode_cancel(file_id: str, reason: str) -> bytes | None:
    return orjson.dumps({"v": VERSION, "id": file_id, "cancel": reason[:MAX_REASON]})


def decode_meta(payload: bytes, file_id: str) -> Manifest | Cancel:
    d = _object(payload, file_id)
    if "cancel" in d:
        return Cancel(file_id, _str(d, "cancel", MAX_REASON))
    size = _int(d, "size", 0, MAX_FILE_SIZE)
    chunk_size = _int(d, "chunk_size", 1, MAX_CHUNK_SIZE)
    chunks = _int(d, "chunks", 0, MAX_CHUNKS)
    if chunks != chunk_count(size, chunk_size):
        raise BadMessage(f"chunks={chunks} does not match size={size} and chunk_size={chunk_size}")
    hashes = d.get("chunk_sha256")
    if not isinstance(hashes, list) or len(hashes) != chunks:
        raise BadMessage("chunk_sha256 must list one hash per chunk")
    for h in hashes:
        if not isinstance(h, str) or not _HEX64_RE.fullmatch(h):
            raise BadMessage("chunk_sha256 holds something that is not a sha256 in hex")
    file_hash = _str(d, "sha256", 64)
    if not _HEX64_RE.fullmatch(file_hash):
        raise BadMessage("sha256 is not a sha256 in hex")
    name = _str(d, "name", MAX_NAME)
    if not name:
        raise BadMessage("name is empty")
    content_type = _str(d, "content_type", 255) if "content_type" in d else "application/octet-stream"
    mtime = d.get("mtime", 0.0)
    if isinstance(mtime, bool) or not isinstance(mtime, int | float) or not 0 <= mtime < 1e11:
        raise BadMessage("mtime must be seconds since the epoch")
    return Manifest(file_id, name, size, chunk_size, file_hash, bytes.fromhex("".join(hashes)),
                    content_type, float(mtime))


# --- status -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """What the receiver has, with the invariants the sender relies on:

    - every chunk below `next` is on the receiver's disk (or about to be: see receiver.py);
    - `missing` lists, ascending, every chunk in [next, upto) the receiver does not have:
      the others in that range it has. `upto` is `chunks` unless the list was cut at
      MAX_MISSING entries, then it is one past the last one listed (or, in a format whose
      senders resend every chunk listed, `high` while chunks still arrive: LISTED_IS_RESENT);
    - `high` is one past the highest chunk received, so the sender can tell a chunk that
      is overtaken (lost or reordered) from one that simply has not arrived yet.
    """

    file_id: str
    state: str
    chunks: int = 0
    received: int = 0
    next: int = 0
    upto: int = 0
    high: int = 0
    missing: tuple[int, ...] = ()
    reason: str = ""


def encode_status(s: Status) -> bytes:
    d = {"v": VERSION, "id": s.file_id, "state": s.state, "chunks": s.chunks, "received": s.received,
         "next": s.next, "upto": s.upto, "high": s.high, "missing": list(s.missing)}
    if s.reason:
        d["reason"] = s.reason[:MAX_REASON]
    return orjson.dumps(d)


def decode_status(payload: bytes, file_id: str) -> Status:
    d = _object(payload, file_id)
    state = d.get("state")
    if state not in STATES:
        raise BadMessage(f"unknown status state {state!r}")
    if state != RECEIVING:
        reason = _str(d, "reason", MAX_REASON) if "reason" in d else ""
        return Status(file_id, state, reason=reason)
    chunks = _int(d, "chunks", 0, MAX_FILE_SIZE)
    received = _int(d, "received", 0, chunks)
    nxt = _int(d, "next", 0, chunks)
    upto = _int(d, "upto", nxt, chunks)
    high = _int(d, "high", 0, chunks)
    missing = d.get("missing")
    if not isinstance(missing, list) or len(missing) > MAX_MISSING:
        raise BadMessage("missing must be a list of at most %d indexes" % MAX_MISSING)
    last = nxt - 1
    for i in missing:
        if isinstance(i, bool) or not isinstance(i, int) or not last < i < upto:
            raise BadMessage(f"missing index {i!r} out of order or outside [next, upto)")
        last = i
    return Status(file_id, state, chunks, received, nxt, upto, high, tuple(missing))


# --- ack ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    file_id: str
    name: str  # the name the receiver stored it under (sanitised, maybe suffixed); "" if not said
    size: int | None  # None: not said (a seed-json ack from a seed receiver)
    sha256: str | None
    timestamp: float


def encode_ack(a: Ack) -> bytes:
    return orjson.dumps({"v": VERSION, "id": a.file_id, "status": "ok", "name": a.name, "size": a.size,
                         "sha256": a.sha256, "timestamp": a.timestamp})


def decode_ack(payload: bytes, file_id: str) -> Ack:
    d = _object(payload, file_id)
    if d.get("status") != "ok":
        raise BadMessage("ack status is not 'ok'")
    ts = d.get("timestamp", 0.0)
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise BadMessage("timestamp must be a number")
    return Ack(file_id, _str(d, "name", MAX_NAME * 4), _int(d, "size", 0, MAX_FILE_SIZE),
               _str(d, "sha256", 64), float(ts))


# --- field checks -------------------------------------------------------------------------------


def _object(payload: bytes, file_id: str) -> dict:
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise BadMessage("not a JSON object")
    if d.get("v") != VERSION:
        raise BadMessage(f"unsupported protocol version {d.get('v')!r}")
    if d.get("id") != file_id:
        raise BadMessage("id does not match the topic")
    return d


def _int(d: dict, key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadMessage(f"{key} must be an integer from {lo} to {hi}, got {v!r}")
    return v


def _str(d: dict, key: str, max_len: int) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        raise BadMessage(f"{key} must be a string of at most {max_len} characters")
    return v
