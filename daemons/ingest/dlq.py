"""The dead-letter queue on disk: every message iot-ingest rejected, with why.

Theory of operation
===================

The DLQ is a folder of append-only JSONL segments named `<unix ms>[-w<I>]-<pid>-<n>.jsonl` (w<I>: the worker, when there are several), so
names sort by age. One line is one entry:

    {"id": "<segment>.<n>", "time": <unix s>, "reason": "bad-signature", "detail": "...",
     "topic": "sensors/a", "payload": "<text>" | null, "payload_b64": null | "<base64>"
     [, "msg_id": "..."] [, "retained": true]}

The payload is kept as text when it is UTF-8, else base64, so `iotctl dlq show` prints what
the sender sent and `replay` can hand back the exact bytes.

Writer (each worker process its own, on its own segments): `append(entries)` writes all lines of a batch in one
write() and fsyncs before it returns (`durable.AppendLog`); the worker acknowledges the
messages only after that, so an entry the broker forgot is on disk. Each run of the worker
starts a new segment. A segment is closed past `segment_bytes` and a new one begins.

A retained message is sent again on every SUBSCRIBE, so on every reconnect of the worker.
The writer knows which retained (topic, payload) pairs the DLQ holds (read at start, kept
up to date by its own appends), so the worker writes such a message once, not once per
reconnect. One that a tool removed while the worker ran is written again after the worker
restarts, if the broker still holds it.

Readers skip a last line without its newline (a torn append: that message was not
acknowledged, so the broker delivers it again and it is written again whole) and count any
other unreadable line as corrupt instead of stopping.

Removal (`replay`, `purge`) never edits the segment the worker appends to. Removed ids are
appended to `removed.log` (fsynced) and hidden from then on; then every segment no process
is writing (no flock held on it) is rewritten without its removed entries (temp file, fsync,
rename, fsync the folder) or deleted when nothing is left, and `removed.log` is rewritten
with only the ids still pending. Tools hold `dlq.lock` while they remove, so two of them
do not race each other.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..durable import AppendLog, fsync_dir

SUFFIX = ".jsonl"
REMOVED = "removed.log"
LOCK = "dlq.lock"


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    time: float
    reason: str
    detail: str
    topic: str
    payload: bytes
    msg_id: str | None = None
    retained: bool = False

    def to_json(self) -> bytes:
        try:
            text, b64 = self.payload.decode("utf-8"), None
        except UnicodeDecodeError:
            text, b64 = None, base64.b64encode(self.payload).decode()
        doc = {"id": self.id, "time": self.time, "reason": self.reason, "detail": self.detail,
               "topic": self.topic, "payload": text, "payload_b64": b64}
        if self.msg_id is not None:
            doc["msg_id"] = self.msg_id
        if self.retained:
            doc["retained"] = True
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, line: bytes) -> Entry:
        d = orjson.loads(line)
        if d.get("payload_b64") is not None:
            payload = base64.b64decode(d["payload_b64"], validate=True)
        else:
            payload = d["payload"].encode("utf-8")
        return cls(str(d["id"]), float(d["time"]), str(d["reason"]), str(d.get("detail", "")),
                   str(d["topic"]), payload, d.get("msg_id"), d.get("retained") is True)


def fingerprint(topic: str, payload: bytes) -> bytes:
    return hashlib.sha256(topic.encode("utf-8", "surrogateescape") + b"\0" + payload).digest()


class Writer:
    """The worker's appender. Not thread-safe: one thread writes."""

    def __init__(self, folder: Path, segment_bytes: int = 64 * 1024**2, tag: str = ""):
        self.folder = folder
        self.tag = f"-{tag}" if tag else ""  # the worker ("w2"), when several share the folder
        self.segment_bytes = segment_bytes
        self.log: AppendLog | None = None
        self.name = ""
        self.seq = 0
        self.written = 0
        self._retained: set[bytes] | None = None  # fingerprints, read on first use

    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # <unix ms>[-w<I>]-<pid>-<n>: names sort by age, also for two segments in one
        # millisecond, and two workers never pick the same name (the pid differs).
        ms, n = int(time.time() * 1000), 0
        while (self.folder / f"{ms:013d}{self.tag}-{os.getpid()}-{n:04d}{SUFFIX}").exists():
            n += 1
        stem = f"{ms:013d}{self.tag}-{os.getpid()}-{n:04d}"
        # Locked while we write: tools never rewrite a segment that is being appended to.
        self.log = AppendLog(self.folder / f"{stem}{SUFFIX}", mode=0o600, lock=True)
        self.log.open()
        self.name, self.seq = stem, 0

    def holds_retained(self, topic: str, payload: bytes) -> bool:
        """True if this retained message is in the DLQ already."""
        if self._retained is None:
            self._retained = {fingerprint(e.topic, e.payload) for e in read_all(self.folder).entries if e.retained}
        return fingerprint(topic, payload) in self._retained

    def append(self, items: Iterable[tuple[str, str, str, bytes, str | None, bool]]) -> list[Entry]:
        """Write (reason, detail, topic, payload, msg_id, retained) items as entries; fsynced on
        return. Raises OSError (disk full, read-only): the caller must not acknowledge them."""
        if self.log is None or self.log.size >= self.segment_bytes:
            self.close()
            self._open()
        assert self.log is not None
        now = time.time()
        entries = []
        for reason, detail, topic, payload, msg_id, retained in items:
            self.seq += 1
            entries.append(Entry(f"{self.name}.{self.seq}", now, reason, detail, topic, payload, msg_id, retained))
        self.log.append(b"".join(e.to_json() + b"\n" for e in entries))
        self.written += len(entries)
        if self._retained is not None:
            self._retained.update(fingerprint(e.topic, e.payload) for e in entries if e.retained)
        return entries

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


# -- reading and removing (iotctl) -----------------------------------------------------------------


@dataclass(slots=True)
class Scan:
    entries: list[Entry]
    corrupt: int = 0
    torn: int = 0


def segments(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))


def _removed_ids(folder: Path) -> set[str]:
    try:
        data = (folder / REMOVED).read_bytes()
    except FileNotFoundError:
        return set()
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # torn last line: that removal was never confirmed
    return {line.decode("ascii", "replace") for line in lines if line}


def _read_segment(path: Path, scan: Scan, hidden: set[str]) -> Iterator[Entry]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # removed by a concurrent compaction
        return
    lines = data.split(b"\n")
    if lines and lines[-1] != b"":
        scan.torn += 1
    for line in lines[:-1]:
        if not line:
            continue
        try:
            e = Entry.from_json(line)
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
            scan.corrupt += 1
            continue
        if e.id not in hidden:
            yield e


def read_all(folder: Path) -> Scan:
    """Every pending entry, oldest first."""
    scan = Scan([])
    hidden = _removed_ids(folder)
    for seg in segments(folder):
        scan.entries.extend(_read_segment(seg, scan, hidden))
    return scan


class Size:
    """(entries, bytes) in the DLQ for a status view asked every few seconds (the dashboard),
    without reading it all each time: segments only grow by appends, so each is read on from
    where the last count stopped; a segment compaction rewrote (another inode, or shorter) is
    counted afresh. Whole lines count (a torn last one is not an entry yet), corrupt ones too,
    less the removed entries still waiting for compaction."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._seen: dict[str, tuple[int, int, int]] = {}  # segment name -> (inode, bytes counted, lines)

    def count(self) -> tuple[int, int]:
        seen: dict[str, tuple[int, int, int]] = {}
        entries = total = 0
        for seg in segments(self.folder):
            try:
                with open(seg, "rb") as f:
                    st = os.fstat(f.fileno())
                    ino, done, lines = self._seen.get(seg.name, (st.st_ino, 0, 0))
                    if ino != st.st_ino or st.st_size < done:
                        ino, done, lines = st.st_ino, 0, 0
                    f.seek(done)
                    pos = done
                    while chunk := f.read(1 << 20):
                        if n := chunk.count(b"\n"):
                            lines += n
                            done = pos + chunk.rfind(b"\n") + 1  # a torn tail is read again next time
                        pos += len(chunk)
            except FileNotFoundError:  # compacted away meanwhile
                continue
            seen[seg.name] = (ino, done, lines)
            entries += lines
            total += st.st_size
        self._seen = seen
        return max(0, entries - len(_removed_ids(self.folder))), total


class Remover:
    """Context manager for tools: holds dlq.lock, marks entries removed, compacts on exit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.lock_fd: int | None = None

    def __enter__(self) -> Remover:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock_fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.compact()
        finally:
            assert self.lock_fd is not None
            os.close(self.lock_fd)
            self.lock_fd = None

    def remove(self, ids: Iterable[str]) -> int:
        """Hide these entries for good (fsynced before return)."""
        data = b"".join(i.encode("ascii") + b"\n" for i in ids)
        if not data:
            return 0
        fd = os.open(self.folder / REMOVED, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return data.count(b"\n")

    def compact(self) -> None:
        """Drop removed entries from segments nobody is appending to."""
        hidden = _removed_ids(self.folder)
        if not hidden:
            return
        by_segment: dict[str, set[str]] = {}
        for i in hidden:
            by_segment.setdefault(i.rpartition(".")[0], set()).add(i)
        still_hidden: set[str] = set()
        for seg in segments(self.folder):
            mine = by_segment.get(seg.stem)
            if not mine:
                continue  # untouched, so a segment just created by the worker is never looked at
            fd = os.open(seg, os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # the worker's active segment: its ids stay hidden
                    still_hidden |= mine
                    continue
                data = seg.read_bytes()
                lines = data.split(b"\n")
                lines.pop()  # "" after the last newline, or a torn line that was never acknowledged
                keep = []
                for ln in lines:
                    if not ln:
                        continue
                    try:
                        eid = orjson.loads(ln).get("id")
                    except (orjson.JSONDecodeError, AttributeError):
                        keep.append(ln)  # corrupt lines are evidence; not ours to delete
                        continue
                    if eid not in mine:
                        keep.append(ln)
                if not keep:
                    seg.unlink()
                else:
                    tmp = seg.with_name("." + seg.name + ".tmp")
                    with open(tmp, "wb") as f:
                        f.write(b"\n".join(keep) + b"\n")
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, seg)
                fsync_dir(self.folder)
            finally:
                os.close(fd)
        self._rewrite_removed(still_hidden)

    def _rewrite_removed(self, ids: set[str]) -> None:
        path = self.folder / REMOVED
        if not ids:
            path.unlink(missing_ok=True)
            fsync_dir(self.folder)
            return
        tmp = self.folder / (".removed.tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(i.encode("ascii") + b"\n" for i in sorted(ids)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)
