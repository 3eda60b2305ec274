"""Durable writes, the two ways state on disk survives `kill -9` and power loss (STYLE 11):
replace a whole file (`atomic_write`: temp, fsync, rename, fsync the folder), or append and
fsync (`AppendLog`: the transfer journals and index logs, the ingest DLQ segments). A rename
or a new file is durable only once its folder is fsynced."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace `path` with `data` all at once. `durable=False` for snapshots that only
    inform (a status file): still never torn, but not fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


class AppendLog:
    """A file that only grows by whole records, each `append()` fsynced before it returns, so
    the caller acts (acknowledges, moves a file) only on what is on disk. Records are lines
    ending in b"\\n" (`record=0`) or exactly `record` bytes each.

    A crash in the middle of an append leaves at most one torn record at the end. It was never
    acted on, so opening the log to append cuts it off (the next record starts clean) and
    `read_whole()` never returns it. The file is opened on the first append; when that creates
    it, its folder is fsynced too. `lock=True` holds an exclusive flock while open, so tools
    can tell a log that a live process appends to."""

    def __init__(self, path: Path, record: int = 0, mode: int = 0o644, lock: bool = False):
        self.path, self.record, self.mode, self.lock = path, record, mode, lock
        self.size = 0
        self._fd: int | None = None

    def _open(self) -> int:
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            if self.lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            whole = _whole_length(fd, size, self.record)
            if whole < size:
                os.ftruncate(fd, whole)
                os.fsync(fd)
            if not existed:
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(fd)
            raise
        self.size = whole
        return fd

    def open(self) -> None:
        """Open (create, repair, lock) now rather than at the first append."""
        if self._fd is None:
            self._fd = self._open()

    def append(self, data: bytes) -> None:
        """Write whole records and fsync. Raises OSError (disk full, read-only): then nothing
        may be acted on, and a partial write is cut off by the next open."""
        if self._fd is None:
            self._fd = self._open()
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)  # a short write (disk nearly full, signal) goes on
            view = view[n:]
        os.fsync(self._fd)
        self.size += len(data)

    def read_whole(self) -> tuple[bytes, int]:
        """The file's whole records, and how many bytes of a torn last record follow them."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return b"", 0
        whole = (len(data) - len(data) % self.record) if self.record else data.rfind(b"\n") + 1
        return data[:whole], len(data) - whole

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def _whole_length(fd: int, size: int, record: int) -> int:
    if record:
        return size - size % record
    pos = size
    while pos > 0:  # back from the end to the last newline, a chunk at a time
        n = min(65536, pos)
        i = os.pread(fd, n, pos - n).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return 0
