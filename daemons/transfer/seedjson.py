"""The seed-json wire format (`[transfer] wire = "seed-json"`): seed 000's JSON messages, so
that our daemons talk to senders and receivers built from the seed's text.

The same functions over the same typed values as protocol.py (the binary format, the
default), so the engine, the sender and the receiver do not know which one is on the wire.
Pure, like protocol.py. docs/PROTOCOL.md, "The seed-json format", is its prose twin.

Theory of operation
===================

The topics are the same five. Each message carries the fields seed 000 names, spelled as it
spells them; what our ends need beyond them travels in extra fields, which a seed peer
(reading fields by name) ignores, and which are optional on the way in, so a peer that
never sends them is still understood:

    meta    {file_id, size, chunk_size, total_chunks, file_sha256, chunk_sha256[], content_type}
            + name, mtime. Without a name the receiver stores the file under its file_id.
    chunk   {file_id, chunk_index, sha256, data}, sha256 and data in hex. `retry` carries the
            same message: the seed's diagram has the publisher "publish retry chunks", "same
            JSON as chunk for requested indices".
    status  {file_id, received, total, missing[], complete} + next, upto, high (protocol.Status),
            or + state and reason when refused or unknown. `received` is a count (`missing`
            is the list). Without the extras, see decode_status.
    ack     {file_id, status: "ok", timestamp} + name, size, file_sha256.
    cancel  none: the seed has no such message, and a seed receiver would read anything else
            on `meta` as a broken manifest. encode_cancel() returns None and nothing is sent.

A seed sender resends every chunk a status lists as missing, at once (C5: "publisher
re-sends requested chunks"). So LISTED_IS_RESENT: our receiver lists only the gaps below
the highest chunk received while chunks still arrive, and the rest only once they stop.
"""

from __future__ import annotations

import re

import orjson

from . import protocol as P
from .protocol import (MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_FILE_SIZE, MAX_NAME, MAX_REASON, RECEIVING, STATES,
                       Ack, BadMessage, Chunk, Manifest, Status, _int, _str, chunk_count, topic)

__all__ = ["topic", "subscription", "parse_topic", "valid_id", "encode_meta", "decode_meta", "encode_cancel",
           "encode_chunk", "decode_chunk", "encode_status", "decode_status", "encode_ack", "decode_ack"]

subscription = P.subscription
LISTED_IS_RESENT = True

# The seed leaves the file id open (a uuid, a hash, a file name...). Accepted: what is safe as
# one topic level and as a file name in the receiver's .partial folder (no "/", no leading
# dot, no control characters or spaces), up to 128 characters. Ours are 32 hex digits.
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.~=:@-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
OCTET_STREAM = "application/octet-stream"


def parse_topic(prefix: str, name: str) -> tuple[str, str]:
    return P.parse_topic(prefix, name, _ID_RE)


def valid_id(file_id: str) -> bool:
    return bool(_ID_RE.fullmatch(file_id))


# --- manifest -----------------------------------------------------------------------------------


def encode_meta(m: Manifest) -> bytes:
    return orjson.dumps({
        "file_id": m.file_id, "size": m.size, "chunk_size": m.chunk_size, "total_chunks": m.chunks,
        "file_sha256": m.sha256,
        "chunk_sha256": [m.chunk_sha256[i:i + 32].hex() for i in range(0, len(m.chunk_sha256), 32)],
        "content_type": m.content_type, "name": m.name, "mtime": m.mtime,
    })


def encode_cancel(file_id: str, reason: str) -> None:
    return None


def decode_meta(payload: bytes, file_id: str) -> Manifest:
    d = _object(payload, file_id)
    size = _int(d, "size", 0, MAX_FILE_SIZE)
    chunk_size = _int(d, "chunk_size", 1, MAX_CHUNK_SIZE)
    chunks = _int(d, "total_chunks", 0, MAX_CHUNKS)
    if chunks != chunk_count(size, chunk_size):
        raise BadMessage(f"total_chunks={chunks} does not match size={size} and chunk_size={chunk_size}")
    hashes = d.get("chunk_sha256")
    if not isinstance(hashes, list) or len(hashes) != chunks:
        raise BadMessage("chunk_sha256 must list one hash per chunk")
    for h in hashes:
        if not isinstance(h, str) or not _HEX64_RE.fullmatch(h):
            raise BadMessage("chunk_sha256 holds something that is not a sha256 in hex")
    file_hash = _hex64(d, "file_sha256")
    content_type = d.get("content_type")  # a seed sender may send null (mimetypes found nothing)
    if content_type is None:
        content_type = OCTET_STREAM
    elif not isinstance(content_type, str) or len(content_type) > 255:
        raise BadMessage("content_type must be a string of at most 255 characters")
    name = _str(d, "name", MAX_NAME) if d.get("name") is not None else ""
    mtime = d.get("mtime") or 0.0
    if isinstance(mtime, bool) or not isinstance(mtime, int | float) or not 0 <= mtime < 1e11:
        raise BadMessage("mtime must be seconds since the epoch")
    return Manifest(file_id, name or file_id, size, chunk_size, file_hash, bytes.fromhex("".join(hashes)),
                    content_type or OCTET_STREAM, float(mtime))


# --- chunks -------------------------------------------------------------------------------------


def encode_chunk(file_id: str, index: int, digest: bytes, data: bytes, retry: bool = False) -> bytes:
    # `retry` is said by the topic alone: the seed's retry message is "the same JSON as chunk".
    return orjson.dumps({"file_id": file_id, "chunk_index": index, "sha256": digest.hex(), "data": data.hex()})


def decode_chunk(payload: bytes, file_id: str) -> Chunk:
    d = _object(payload, file_id)
    index = _int(d, "chunk_index", 0, MAX_CHUNKS - 1)
    digest = bytes.fromhex(_hex64(d, "sha256"))
    data = d.get("data")
    if not isinstance(data, str):
        raise BadMessage("data must be a string of hex digits")
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        raise BadMessage("data is not hex") from None
    return Chunk(index, digest, memoryview(raw))


# --- status -------------------------------------------------------------------------------------


def encode_status(s: Status) -> bytes:
    if s.state != RECEIVING:
        d = {"file_id": s.file_id, "received": 0, "total": 0, "missing": [], "complete": False, "state": s.state}
        if s.reason:
            d["reason"] = s.reason[:MAX_REASON]
        return orjson.dumps(d)
    return orjson.dumps({"file_id": s.file_id, "received": s.received, "total": s.chunks, "missing": list(s.missing),
                         "complete": s.received == s.chunks, "next": s.next, "upto": s.upto, "high": s.high})


def decode_status(payload: bytes, file_id: str) -> Status:
    """A status with our extra fields is read as exactly as protocol.decode_status reads one.
    A seed receiver's has only received, total and missing. The seed's text reads as
    `missing` = every chunk not received, ascending; we also accept it unsorted, with
    repeats, cut short after its first entries, or listing only gaps, by taking it as
    complete up to `upto` = received + len(missing): below that, a chunk not listed is
    received. If that is wrong for some peer, the harm is bounded: a chunk it lacks but did
    not list is sent again once it is listed (engine.py: "no longer in flight")."""
    d = _object(payload, file_id)
    state = d.get("state", RECEIVING)
    if state not in STATES:
        raise BadMessage(f"unknown status state {state!r}")
    if state != RECEIVING:
        reason = _str(d, "reason", MAX_REASON) if "reason" in d else ""
        return Status(file_id, state, reason=reason)
    total = _int(d, "total", 0, MAX_CHUNKS)
    received = _int(d, "received", 0, total)
    missing = d.get("missing")
    if not isinstance(missing, list):
        raise BadMessage("missing must be a list of chunk indexes")
    for i in missing:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < total:
            raise BadMessage(f"missing index {i!r} outside 0..{total - 1}")
    missing = sorted(set(missing))
    if "next" in d or "upto" in d or "high" in d:  # one of ours
        nxt = _int(d, "next", 0, total)
        upto = _int(d, "upto", nxt, total)
        high = _int(d, "high", 0, total)
        if missing and not nxt <= missing[0] <= missing[-1] < upto:
            raise BadMessage("missing index outside [next, upto)")
        return Status(file_id, RECEIVING, total, received, nxt, upto, high, tuple(missing))
    received = min(received, total - len(missing))  # "missing all" after a bad file hash, count not reset
    upto = received + len(missing)
    nxt = missing[0] if missing else upto
    high = upto  # one past the last chunk below upto that is not listed, i.e. received
    k = len(missing)
    while k and missing[k - 1] == high - 1:
        high -= 1
        k -= 1
    return Status(file_id, RECEIVING, total, received, nxt, upto, high, tuple(missing))


# --- ack ----------------------------------------------------------------------------------------


def encode_ack(a: Ack) -> bytes:
    return orjson.dumps({"file_id": a.file_id, "status": "ok", "timestamp": a.timestamp, "name": a.name,
                         "size": a.size, "file_sha256": a.sha256})


def decode_ack(payload: bytes, file_id: str) -> Ack:
    d = _object(payload, file_id)
    if d.get("status") != "ok":
        raise BadMessage("ack status is not 'ok'")
    ts = d.get("timestamp")  # unused; the seed does not say seconds or ISO 8601: either is taken
    ts = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else 0.0
    name = _str(d, "name", MAX_NAME * 4) if d.get("name") is not None else ""
    size = _int(d, "size", 0, MAX_FILE_SIZE) if d.get("size") is not None else None
    sha256 = _hex64(d, "file_sha256") if d.get("file_sha256") is not None else None
    return Ack(file_id, name, size, sha256, ts)


# --- field checks -------------------------------------------------------------------------------


def _object(payload: bytes, file_id: str) -> dict:
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise BadMessage(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise BadMessage("not a JSON object")
    if d.get("file_id") != file_id:
        raise BadMessage("file_id does not match the topic")
    return d


def _hex64(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not _HEX64_RE.fullmatch(v):
        raise BadMessage(f"{key} is not a sha256 in hex")
    return v.lower()
