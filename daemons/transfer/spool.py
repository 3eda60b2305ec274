"""The receiver's files for one incoming transfer, and how finished files get their name.

A `Partial` is the in-memory side of `<spool>/.partial/<id>.*`: which chunks are in, the
lowest missing one (`next`), one past the highest received (`high`), and the status that
describes them (the invariants are in protocol.Status). Names from the network go through
`safe_name` (one path component, printable, no leading dot, bounded length) and are placed
with `link_into`, which never replaces an existing file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import unicodedata
from pathlib import Path

from . import protocol as P
from ..durable import atomic_write
from .journal import IndexLog

MAX_NAME_BYTES = 200


def safe_name(name: str, fallback: str) -> str:
    """A file name that stays in the spool: the last path component only, no control
    characters, no leading dot (no hidden files, no clash with .partial), at most
    MAX_NAME_BYTES of UTF-8 (keeping the extension)."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1])
    name = "".join(c for c in name if c.isprintable()).strip()
    if name.strip("."):
        name = "_" + name[1:] if name.startswith(".") else name
    else:
        name = fallback
    stem, dot, ext = name.rpartition(".")
    if not dot or len(ext.encode()) > 20:
        stem, ext = name, ""
    while len((stem + (dot + ext if ext else "")).encode()) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem + ("." + ext if ext else "")


class Partial:
    """One unfinished incoming file."""

    def __init__(self, m: P.Manifest, fd: int, idx: IndexLog, have: list[int], now: float):
        self.m, self.fd, self.idx = m, fd, idx
        self.received = bytearray(m.chunks)
        for i in have:
            if 0 <= i < m.chunks:
                self.received[i] = 1
        self.count = sum(self.received)
        self.next = self._advance(0)
        self.high = max((i + 1 for i in have if 0 <= i < m.chunks), default=0)
        self.unsynced: list[int] = []
        self.unsynced_bytes = 0
        self.last_sync = now
        self.hasher = hashlib.sha256()
        self.hash_pos = 0
        self.started = self.last_activity = now
        self.last_status = 0.0
        self.status_due: float | None = now  # announce ourselves (restart: C1)
        self.since_status = 0
        self.duplicates = self.retries = 0
        self.bad: dict[int, int] = {}
        self.start_count = self.count

    def _advance(self, i: int) -> int:
        pos = self.received.find(0, i)
        return len(self.received) if pos < 0 else pos

    def mark(self, i: int) -> None:
        self.received[i] = 1
        self.count += 1
        self.high = max(self.high, i + 1)
        if i == self.next:
            self.next = self._advance(i)

    def write(self, i: int, data, retry: bool) -> None:
        """Put a verified chunk at its offset (raises OSError); it is marked received now
        and recorded on disk by the next sync()."""
        os.pwrite(self.fd, data, i * self.m.chunk_size)
        self.mark(i)
        self.retries += retry
        self.unsynced.append(i)
        self.unsynced_bytes += len(data)
        self.since_status += 1
        if i == self.hash_pos:  # in order: hash it from memory now, not from disk later
            self.hasher.update(data)
            self.hash_pos += 1

    def sync(self, now: float) -> None:
        """fdatasync the data, *then* record the chunks it holds (raises OSError)."""
        os.fdatasync(self.fd)
        self.idx.append(self.unsynced)
        self.unsynced.clear()
        self.unsynced_bytes = 0
        self.last_sync = now

    def extend_hash(self, budget: int | None) -> None:
        """Hash the received prefix further, reading back at most `budget` chunks."""
        m = self.m
        while self.hash_pos < m.chunks and self.received[self.hash_pos] and (budget is None or budget > 0):
            i = self.hash_pos
            self.hasher.update(os.pread(self.fd, m.chunk_len(i), i * m.chunk_size))
            self.hash_pos += 1
            if budget is not None:
                budget -= 1

    def unmark_damaged(self) -> int:
        """Re-check every chunk on disk against the manifest; forget the ones that fail (and
        rewrite the received set without them). Returns how many failed."""
        m = self.m
        bad = [i for i in range(m.chunks)
               if hashlib.sha256(os.pread(self.fd, m.chunk_len(i), i * m.chunk_size)).digest() != m.chunk_digest(i)]
        if bad:
            for i in bad:
                self.received[i] = 0
            self.count -= len(bad)
            self.next = self._advance(0)
            self.hasher, self.hash_pos = hashlib.sha256(), 0
            self.idx.close()
            atomic_write(self.idx.path, b"".join(i.to_bytes(4, "little") for i in range(m.chunks) if self.received[i]))
            self.unsynced.clear()
        return len(bad)

    def status(self, tail: bool = True) -> P.Status:
        """What is received and missing; without `tail`, saying nothing of the chunks from
        `high` on (those may simply not have arrived yet)."""
        missing = []
        pos, end = self.next, self.m.chunks if tail else max(self.high, self.next)
        while len(missing) < P.MAX_MISSING:
            pos = self.received.find(0, pos, end)
            if pos < 0:
                break
            missing.append(pos)
            pos += 1
        upto = end if len(missing) < P.MAX_MISSING else missing[-1] + 1
        return P.Status(self.m.file_id, P.RECEIVING, self.m.chunks, self.count, self.next, upto, self.high,
                        tuple(missing))

    def close(self) -> None:
        self.idx.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def link_into(data: Path, final: Path) -> None:
    """Give `data` the name `final` without ever replacing a file there (FileExistsError)."""
    try:
        os.link(data, final)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if final.exists():  # no hard links here (vfat...): a rename after a check
            raise FileExistsError(errno.EEXIST, "exists", str(final)) from None
        os.rename(data, final)
        return
    os.unlink(data)
