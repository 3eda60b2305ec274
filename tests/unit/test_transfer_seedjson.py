"""The seed-json codec (daemons/transfer/seedjson.py): round trips through our own values,
messages shaped as seed 000 describes them (no extra fields, the readings a naive peer
produces), and everything else refused as BadMessage."""

from __future__ import annotations

import hashlib
import os

import orjson
import pytest

from daemons.transfer import codec
from daemons.transfer import protocol as P
from daemons.transfer import seedjson as S

FID = "5f0c" * 8
CHUNK = 1024


def manifest(data: bytes, name: str = "f.bin") -> P.Manifest:
    digests = b"".join(hashlib.sha256(data[i:i + CHUNK]).digest() for i in range(0, len(data), CHUNK))
    return P.Manifest(FID, name, len(data), CHUNK, hashlib.sha256(data).hexdigest(), digests, "text/csv", 1.5)


def seed_meta(data: bytes, **change) -> bytes:
    """A manifest as a seed sender writes it: the seed's seven fields, nothing else."""
    hashes = [hashlib.sha256(data[i:i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)]
    return orjson.dumps({"file_id": FID, "size": len(data), "chunk_size": CHUNK, "total_chunks": len(hashes),
                         "file_sha256": hashlib.sha256(data).hexdigest(), "chunk_sha256": hashes,
                         "content_type": "application/octet-stream", **change})


def status(**fields) -> bytes:
    return orjson.dumps({"file_id": FID, "received": 0, "total": 10, "missing": [], "complete": False, **fields})


def test_the_setting_picks_the_codec():
    assert codec("binary") is P and codec("seed-json") is S


def test_round_trips_through_our_values():
    m = manifest(os.urandom(2500), "ü b.txt")
    assert S.decode_meta(S.encode_meta(m), FID) == m
    c = S.decode_chunk(S.encode_chunk(FID, 2, m.chunk_digest(2), b"abc", retry=True), FID)
    assert (c.index, c.sha256, bytes(c.data)) == (2, m.chunk_digest(2), b"abc")
    for s in (P.Status(FID, P.RECEIVING, 3, 1, 0, 3, 2, (0, 2)), P.Status(FID, P.RECEIVING, 9, 4, 2, 5, 5, (2, 4)),
              P.Status(FID, P.REFUSED, reason="disk full"), P.Status(FID, P.UNKNOWN)):
        assert S.decode_status(S.encode_status(s), FID) == s
    a = P.Ack(FID, "x (1).bin", 2500, m.sha256, 1.5)
    assert S.decode_ack(S.encode_ack(a), FID) == a
    assert S.parse_topic("a/b", f"a/b/file/{FID}/retry") == (FID, "retry")


def test_messages_carry_the_seeds_fields_under_the_seeds_names():
    m = manifest(os.urandom(2500))
    assert set(orjson.loads(S.encode_meta(m))) >= {"file_id", "size", "chunk_size", "total_chunks", "file_sha256",
                                                    "chunk_sha256", "content_type"}
    chunk = orjson.loads(S.encode_chunk(FID, 1, m.chunk_digest(1), b"\x00\xff"))
    assert chunk == {"file_id": FID, "chunk_index": 1, "sha256": m.chunk_digest(1).hex(), "data": "00ff"}
    st = orjson.loads(S.encode_status(P.Status(FID, P.RECEIVING, 3, 1, 0, 3, 2, (0, 2))))
    assert {k: st[k] for k in ("file_id", "received", "total", "missing", "complete")} == {
        "file_id": FID, "received": 1, "total": 3, "missing": [0, 2], "complete": False}
    ack = orjson.loads(S.encode_ack(P.Ack(FID, "x", 1, "0" * 64, 2.0)))
    assert (ack["file_id"], ack["status"], ack["timestamp"]) == (FID, "ok", 2.0)
    # A refusal keeps the seed's fields, with nothing listed: a seed sender then sends nothing.
    refused = orjson.loads(S.encode_status(P.Status(FID, P.REFUSED, reason="too large")))
    assert refused["missing"] == [] and refused["state"] == "refused"


def test_the_seed_has_no_cancel_so_none_is_sent():
    assert S.encode_cancel(FID, "changed") is None


def test_a_seed_senders_manifest_is_stored_under_its_file_id():
    data = os.urandom(3000)
    m = S.decode_meta(seed_meta(data), FID)
    assert (m.name, m.size, m.chunks, m.mtime) == (FID, 3000, 3, 0.0)
    assert m.chunk_digest(2) == hashlib.sha256(data[2048:]).digest()
    # mimetypes found nothing (null), hashes in capitals: taken, as any seed sender may do it.
    upper = {"content_type": None, "file_sha256": hashlib.sha256(data).hexdigest().upper()}
    m = S.decode_meta(seed_meta(data, **upper), FID)
    assert m.content_type == "application/octet-stream" and m.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("payload, expected", [
    # (received, missing as sent) -> (next, upto, high, missing)
    ({"received": 0, "missing": list(range(10))}, (0, 10, 0, tuple(range(10)))),  # nothing yet
    ({"received": 7, "missing": [3, 8, 9]}, (3, 10, 8, (3, 8, 9))),  # every chunk it lacks
    ({"received": 7, "missing": [9, 3, 8, 3]}, (3, 10, 8, (3, 8, 9))),  # from a set, repeated
    ({"received": 4, "missing": [4, 5]}, (4, 6, 4, (4, 5))),  # cut after its first entries
    ({"received": 6, "missing": [2]}, (2, 7, 7, (2,))),  # only the gaps
    ({"received": 6, "missing": []}, (6, 6, 6, ())),  # nothing to say
    ({"received": 10, "missing": [], "complete": True}, (10, 10, 10, ())),
    ({"received": 10, "missing": list(range(10))}, (0, 10, 0, tuple(range(10)))),  # bad file hash: "missing all"
])
def test_a_seed_receivers_status_is_read_as_the_seed_says(payload, expected):
    s = S.decode_status(status(**payload), FID)
    assert (s.state, s.chunks) == (P.RECEIVING, 10)
    assert (s.next, s.upto, s.high, s.missing) == expected


def test_a_seed_receivers_ack_names_neither_size_nor_hash():
    a = S.decode_ack(orjson.dumps({"file_id": FID, "status": "ok", "timestamp": "2026-12-02T10:00:00Z"}), FID)
    assert (a.name, a.size, a.sha256, a.timestamp) == ("", None, None, 0.0)


@pytest.mark.parametrize("file_id", ["5f0c" * 8, "3f2b8c1e-9a4d-4e2f-8b7a-1c2d3e4f5a6b", "a1b2c3d4e5f60718",
                                     "report.csv", "report-2026-12-02T10:00:00Z", "x" * 128])
def test_file_ids_of_other_shapes_are_taken(file_id):
    assert S.valid_id(file_id) and S.parse_topic("iot", f"iot/file/{file_id}/meta") == (file_id, "meta")


@pytest.mark.parametrize("file_id", ["", ".", "..", ".hidden", "a b", "a+b", "é", "x" * 129, "a\x00b"])
def test_file_ids_unsafe_as_a_file_name_are_refused(file_id):
    assert not S.valid_id(file_id)
    with pytest.raises(P.BadMessage):
        S.parse_topic("iot", f"iot/file/{file_id}/meta")


def test_every_truncation_is_refused_cleanly():
    data = os.urandom(3000)
    m = manifest(data)
    for raw, decode in ((S.encode_meta(m), S.decode_meta), (seed_meta(data), S.decode_meta),
                        (S.encode_chunk(FID, 0, m.chunk_digest(0), data[:CHUNK]), S.decode_chunk),
                        (status(received=1, missing=[0, 2]), S.decode_status),
                        (S.encode_ack(P.Ack(FID, "f", 1, "0" * 64, 1.0)), S.decode_ack)):
        for n in range(len(raw)):
            with pytest.raises(P.BadMessage):
                decode(raw[:n], FID)


@pytest.mark.parametrize("change", [
    {"size": -1}, {"total_chunks": 7}, {"chunk_size": 0}, {"file_sha256": "zz"}, {"chunk_sha256": ["00"] * 3},
    {"file_id": "0" * 32}, {"name": 5}, {"mtime": "now"}, {"size": True}, {"content_type": 7},
])
def test_bad_manifest_fields_are_refused(change):
    with pytest.raises(P.BadMessage):
        S.decode_meta(seed_meta(os.urandom(3000), **change), FID)


@pytest.mark.parametrize("chunk", [
    {"chunk_index": -1}, {"chunk_index": "1"}, {"sha256": "00"}, {"data": "0g"}, {"data": "abc"}, {"data": None},
    {"file_id": "other"},
])
def test_bad_chunk_fields_are_refused(chunk):
    good = {"file_id": FID, "chunk_index": 0, "sha256": "0" * 64, "data": "00"}
    with pytest.raises(P.BadMessage):
        S.decode_chunk(orjson.dumps({**good, **chunk}), FID)


@pytest.mark.parametrize("fields", [
    {"received": 11}, {"total": -1}, {"missing": [10]}, {"missing": [True]}, {"missing": "1,2"}, {"state": "done"},
    {"next": 4, "upto": 3}, {"next": 0, "upto": 3, "high": 2, "missing": [5]},
])
def test_bad_status_fields_are_refused(fields):
    with pytest.raises(P.BadMessage):
        S.decode_status(status(**fields), FID)


@pytest.mark.parametrize("ack", [{"status": "error"}, {"size": -1}, {"file_sha256": "x"}, {"file_id": "other"}])
def test_bad_acks_are_refused(ack):
    with pytest.raises(P.BadMessage):
        S.decode_ack(orjson.dumps({"file_id": FID, "status": "ok", "timestamp": 1.0, **ack}), FID)


def test_hex_doubles_the_chunk_on_the_wire():
    data = os.urandom(256 * 1024)
    frame = S.encode_chunk(FID, 12345, hashlib.sha256(data).digest(), data)
    assert len(frame) == 2 * len(data) + 152  # the JSON around the hex, with our 32-digit ids
    assert len(P.encode_chunk(FID, 12345, hashlib.sha256(data).digest(), data)) == len(data) + 40
