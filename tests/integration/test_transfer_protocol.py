"""The transfer protocol without MQTT: the codec, then the sender's engine and the receiver
back to back (as h11's tests do) over an in-process network that loses, duplicates and
reorders messages at random, with a fake clock, and with crashes of either end, in both wire
formats. Fast enough to try many seeds; the daemons' own tests (test_transfer_faults.py) do
the same for real."""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from dataclasses import replace
from pathlib import Path

import pytest

from daemons.config import TransferConfig
from daemons.service import Log
from daemons.transfer import WIRES, codec
from daemons.transfer import protocol as P
from daemons.transfer.engine import Engine, Outgoing
from daemons.transfer.receiver import Receiver
from daemons.transfer.spool import safe_name

LOG = Log("test")
CHUNK = 1024


def manifest(data: bytes, name: str = "f.bin", chunk: int = CHUNK) -> P.Manifest:
    digests = b"".join(hashlib.sha256(data[i:i + chunk]).digest() for i in range(0, len(data), chunk))
    return P.Manifest(secrets.token_hex(16), name, len(data), chunk, hashlib.sha256(data).hexdigest(), digests)


# --- codec --------------------------------------------------------------------------------------


def test_codec_round_trips():
    m = manifest(os.urandom(2500), "ü b.txt")
    assert P.decode_meta(P.encode_meta(m), m.file_id) == m
    c = P.decode_chunk(P.encode_chunk(m.file_id, 2, m.chunk_digest(2), b"abc", retry=True), m.file_id)
    assert (c.index, c.sha256, bytes(c.data), c.retry) == (2, m.chunk_digest(2), b"abc", True)
    s = P.Status(m.file_id, P.RECEIVING, 3, 1, 0, 3, 2, (0, 2))
    assert P.decode_status(P.encode_status(s), m.file_id) == s
    a = P.Ack(m.file_id, "x (1).bin", 2500, m.sha256, 1.5)
    assert P.decode_ack(P.encode_ack(a), m.file_id) == a
    assert P.decode_meta(P.encode_cancel(m.file_id, "gone"), m.file_id) == P.Cancel(m.file_id, "gone")
    assert P.parse_topic("a/b", f"a/b/file/{m.file_id}/retry") == (m.file_id, "retry")


def test_chunk_frame_overhead_is_forty_bytes():
    assert len(P.encode_chunk("a" * 32, 0, bytes(32), b"x" * 1000)) == 1040


@pytest.mark.parametrize("payload", [b"", b"FC", b"XX\x01\x00" + bytes(36), b"FC\x02\x00" + bytes(36)])
def test_bad_chunk_frames_are_refused(payload):
    with pytest.raises(P.BadMessage):
        P.decode_chunk(payload, "a" * 32)


def test_every_truncation_of_a_manifest_is_refused_cleanly():
    m = manifest(os.urandom(3000))
    raw = P.encode_meta(m)
    for n in range(len(raw)):
        with pytest.raises(P.BadMessage):
            P.decode_meta(raw[:n], m.file_id)


@pytest.mark.parametrize("change", [
    {"size": -1}, {"chunks": 7}, {"chunk_size": 0}, {"sha256": "zz"}, {"chunk_sha256": ["00"] * 3},
    {"name": ""}, {"name": 5}, {"id": "0" * 32}, {"v": 2}, {"mtime": "now"}, {"size": True},
])
def test_bad_manifest_fields_are_refused(change):
    import orjson

    m = manifest(os.urandom(3000))
    d = {**orjson.loads(P.encode_meta(m)), **change}
    with pytest.raises(P.BadMessage):
        P.decode_meta(orjson.dumps(d), m.file_id)


@pytest.mark.parametrize("fields", [
    {"received": 9}, {"next": 4}, {"upto": 0, "next": 1}, {"missing": [2, 1]}, {"missing": [3]},
    {"missing": list(range(300))}, {"state": "done"}, {"missing": [True]},
])
def test_bad_status_fields_are_refused(fields):
    import orjson

    d = {"v": 1, "id": "a" * 32, "state": "receiving", "chunks": 3, "received": 1, "next": 1, "upto": 3,
         "high": 2, "missing": [1], **fields}
    with pytest.raises(P.BadMessage):
        P.decode_status(orjson.dumps(d), "a" * 32)


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "passwd"), ("a\\b\\c.txt", "c.txt"), ("..", "file-x"), (".bashrc", "_bashrc"),
    ("tab\there\x00.txt", "tabhere.txt"), ("  ", "file-x"), ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),
])
def test_safe_name(name, expected):
    assert safe_name(name, "file-x") == expected


def test_safe_name_keeps_the_extension_when_shortening():
    long = safe_name("\u00e9" * 300 + ".tar.gz", "f")
    assert long.endswith(".gz") and len(long.encode()) <= 200


# --- both ends back to back ---------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Published:
    def is_published(self) -> bool:
        return True


class Net:
    """Messages in flight each way; each one lost, doubled or delayed at random."""

    def __init__(self, rng: random.Random, loss: float, dup: float, shuffle: bool):
        self.rng, self.loss, self.dup, self.shuffle = rng, loss, dup, shuffle
        self.to_rx: list[tuple[str, bytes]] = []
        self.to_tx: list[tuple[str, bytes]] = []
        self.up = True

    def send(self, box: list, topic: str, payload: bytes) -> Published:
        if self.up and self.rng.random() >= self.loss:
            box.append((topic, payload))
            if self.rng.random() < self.dup:
                box.append((topic, payload))
        return Published()

    def take(self, box: list) -> list[tuple[str, bytes]]:
        out = box[:]
        box.clear()
        if self.shuffle:
            self.rng.shuffle(out)
        return out


def cfg(wire: str = "binary") -> TransferConfig:
    return TransferConfig(status_interval=0.3, resend_after=0.5, stall_timeout=1.5, sync_bytes=4096, min_free=0,
                          window=8, wire=wire)


def run(tmp: Path, data: bytes, *, seed: int, loss=0.0, dup=0.0, shuffle=False, crash_rx_at=None,
        crash_tx_at=None, damage=False, limit=600.0, wire: str = "binary") -> tuple[Receiver, Outgoing, dict]:
    rng = random.Random(seed)
    clock, net = Clock(), Net(rng, loss, dup, shuffle)
    spool = tmp / "spool"
    src = tmp / "src.bin"
    src.write_bytes(data)

    def new_rx() -> Receiver:
        r = Receiver(cfg(wire), spool, lambda t, p: net.send(net.to_tx, t, p), LOG, clock)
        r.recover()
        return r

    def new_engine() -> Engine:
        return Engine("iot", lambda t, p: net.send(net.to_rx, t, p), window=8, rate_limit=0, resend_after=0.5,
                      stall_timeout=1.5, log=LOG, clock=clock, codec=codec(wire))

    def outgoing(m: P.Manifest, resumed: bool) -> Outgoing:
        fd = os.open(src, os.O_RDONLY)
        st = os.fstat(fd)
        return Outgoing(m, src, fd, (st.st_size, st.st_mtime_ns), clock(), resumed=resumed)

    rx, engine = new_rx(), new_engine()
    m = manifest(data)
    engine.add(outgoing(m, False))
    steps = 0
    seen: dict = {}
    while not engine.ended and clock.t < 1000 + limit:
        steps += 1
        engine.pump()
        for topic, payload in net.take(net.to_rx):
            rx.handle(topic, payload, "iot")
        rx.tick(True, True)
        for topic, payload in net.take(net.to_tx):
            fid, kind = codec(wire).parse_topic("iot", topic)
            engine.on_message(fid, kind, payload)
        if steps == crash_rx_at:  # kill -9: no close, no final sync; page cache survives
            seen["rx_had"] = [(p.count, len(p.idx.load()), p.m.chunks) for p in rx.partials.values()]
            for p in rx.partials.values():
                os.close(p.fd)
                p.idx.close()
            rx.journal.close()
            net.to_rx.clear()
            if damage:  # the disk lost a chunk that was recorded as received
                with open(spool / ".partial" / f"{m.file_id}.data", "r+b") as f:
                    f.write(b"\xff" * 10)
            rx = new_rx()
        if steps == crash_tx_at:  # a restarted sender resumes from its journal, same id
            seen["tx_had"] = [t.next_new for t in engine.transfers.values()]
            for t in list(engine.transfers.values()):
                t.close()
            net.to_tx.clear()
            engine = new_engine()
            engine.add(outgoing(replace(m), True))
        clock.t += 0.05
    assert engine.ended, f"not done after {limit} simulated seconds"
    (t,) = engine.ended
    return rx, t, seen


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("size", [0, 1, CHUNK, 8 * CHUNK, 50 * CHUNK + 7])
def test_clean_network(tmp_path, size, wire):
    data = os.urandom(size)
    rx, t, seen = run(tmp_path, data, seed=size, wire=wire)
    assert t.state == "done" and t.retries == 0 and not seen
    assert (tmp_path / "spool" / "f.bin").read_bytes() == data


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("seed", range(8))
def test_lossy_duplicating_reordering_network(tmp_path, seed, wire):
    data = os.urandom(40 * CHUNK + seed)
    rx, t, seen = run(tmp_path, data, seed=seed, loss=0.15, dup=0.15, shuffle=True, wire=wire)
    assert t.state == "done", t.reason
    assert (tmp_path / "spool" / "f.bin").read_bytes() == data
    assert t.ack is not None and t.ack.name == "f.bin"
    assert t.retries > 0


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("seed", range(4))
def test_receiver_crash_on_a_lossy_network(tmp_path, seed, wire):
    data = os.urandom(60 * CHUNK)
    rx, t, seen = run(tmp_path, data, seed=seed, loss=0.1, dup=0.1, shuffle=True, crash_rx_at=5 + seed, wire=wire)
    ((had, kept, chunks),) = seen["rx_had"]  # crashed mid-way; what was not synced yet is lost
    assert kept <= had and 0 < had < chunks
    assert t.state == "done"
    assert (tmp_path / "spool" / "f.bin").read_bytes() == data


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("seed", range(4))
def test_sender_crash_on_a_lossy_network(tmp_path, seed, wire):
    data = os.urandom(60 * CHUNK)
    rx, t, seen = run(tmp_path, data, seed=seed, loss=0.1, dup=0.1, shuffle=True, crash_tx_at=3 + seed, wire=wire)
    ((sent,),) = [seen["tx_had"]]
    assert 0 < sent < 60
    assert t.state == "done"
    assert (tmp_path / "spool" / "f.bin").read_bytes() == data
    assert len(list((tmp_path / "spool").iterdir())) == 2  # f.bin and .partial: one copy only


def test_window_bounds_chunks_in_flight(tmp_path):
    """With the receiver silent, the sender stops after one window, whatever the size."""
    clock, sent = Clock(), []
    engine = Engine("iot", lambda t, p: sent.append(t), window=8, rate_limit=0, resend_after=0.5,
                    stall_timeout=1.5, log=LOG, clock=clock)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(100 * CHUNK))
    m = manifest(src.read_bytes())
    fd = os.open(src, os.O_RDONLY)
    st = os.fstat(fd)
    engine.add(Outgoing(m, src, fd, (st.st_size, st.st_mtime_ns), clock()))
    for _ in range(200):
        engine.pump()
        clock.t += 0.05
    chunks = [t for t in sent if t.endswith("/chunk") or t.endswith("/retry")]
    assert len(chunks) == 8
    assert sum(t.endswith("/meta") for t in sent) >= 3  # announced again while nobody answers


def test_rate_limit_holds_the_average(tmp_path):
    clock, sent = Clock(), []
    engine = Engine("iot", lambda t, p: sent.append(len(p)), window=1000, rate_limit=100 * CHUNK,
                    resend_after=5, stall_timeout=100, log=LOG, clock=clock)
    src = tmp_path / "r.bin"
    src.write_bytes(os.urandom(500 * CHUNK))
    m = manifest(src.read_bytes())
    fd = os.open(src, os.O_RDONLY)
    st = os.fstat(fd)
    engine.add(Outgoing(m, src, fd, (st.st_size, st.st_mtime_ns), clock()))
    for _ in range(40):  # 2 simulated seconds
        engine.pump()
        clock.t += 0.05
    chunk_bytes = sum(n - P.CHUNK_HEADER for n in sent[1:])
    assert 180 * CHUNK <= chunk_bytes <= 220 * CHUNK


def test_a_chunk_damaged_on_disk_is_found_by_the_file_hash_and_received_again(tmp_path, caplog):
    data = os.urandom(30 * CHUNK)
    rx, t, seen = run(tmp_path, data, seed=1, crash_rx_at=2, damage=True)
    assert seen["rx_had"][0][1] > 0  # chunk 0 was on record when it was damaged
    assert "chunks damaged on disk; asking for them again" in caplog.text
    assert t.state == "done" and (tmp_path / "spool" / "f.bin").read_bytes() == data


def test_a_manifest_whose_file_hash_contradicts_its_chunks_is_refused(tmp_path):
    out: list[tuple[str, bytes]] = []
    rx = Receiver(cfg(), tmp_path / "spool", lambda t, p: out.append((t, p)) or Published(), LOG, Clock())
    data = os.urandom(3 * CHUNK)
    m = replace(manifest(data), sha256="0" * 64)
    rx.handle(P.topic("iot", m.file_id, "meta"), P.encode_meta(m), "iot")
    for i in range(3):
        rx.handle(P.topic("iot", m.file_id, "chunk"),
                  P.encode_chunk(m.file_id, i, m.chunk_digest(i), data[i * CHUNK:(i + 1) * CHUNK]), "iot")
    (status,) = [P.decode_status(p, m.file_id) for t, p in out if t.endswith("/status")]
    assert status.state == P.REFUSED and "does not match" in status.reason
    assert not any(t.endswith("/ack") for t, _ in out)
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [".partial"]
    assert list((tmp_path / "spool" / ".partial").iterdir()) == []
