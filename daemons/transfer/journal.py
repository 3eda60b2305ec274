"""Durable state for the transfer daemons, written so that `kill -9` at any moment loses
nothing that was acknowledged.

Two shapes, both append-only between compactions:

- `Journal`: JSON lines. `append()` writes one record and fsyncs before returning, so the
  caller acts (moves a file, publishes an ack) only on what is already on disk. A crash in
  the middle of an append leaves at most one torn last line; `load()` skips it.
- `IndexLog`: the receiver's set of chunks known to be on disk, as 4-byte little-endian
  indexes. The caller fdatasyncs the data file first and appends the indexes after, so an
  index on disk always means its bytes are on disk too; a torn tail (not a multiple of 4)
  is ignored.

The other durable write, replacing a whole file, is `durable.atomic_write`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import orjson

from ..durable import atomic_write, fsync_dir


class Journal:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None

    def load(self) -> list[dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # the torn last line of a crash mid-append
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def append(self, record: dict) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            # A previous crash may have left a torn line without its newline: start a new one.
            if os.fstat(self._fd).st_size and not self.path.read_bytes().endswith(b"\n"):
                os.write(self._fd, b"\n")
        os.write(self._fd, orjson.dumps(record) + b"\n")
        os.fsync(self._fd)

    def rewrite(self, records: Iterable[dict]) -> None:
        """Compact: keep only `records`, atomically."""
        self.close()
        atomic_write(self.path, b"".join(orjson.dumps(r) + b"\n" for r in records))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_U32 = struct.Struct("<I")


class IndexLog:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def load(self) -> list[int]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        whole = len(raw) - len(raw) % 4
        return [v for (v,) in _U32.iter_unpack(raw[:whole])]

    def append(self, indexes: Iterable[int]) -> None:
        data = b"".join(_U32.pack(i) for i in indexes)
        if not data:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            size = os.fstat(self._fd).st_size
            if size % 4:  # a torn tail from a crash: cut it so the records stay aligned
                os.ftruncate(self._fd, size - size % 4)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def unique_path(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/stem (n).ext` for the first n that is free. Free at the
    time of the call only: callers that must never replace a file link rather than rename."""
    for candidate in name_candidates(name):
        path = folder / candidate
        if not path.exists() and not path.is_symlink():
            return path
    raise FileExistsError(f"no free name for {name} in {folder}")


def name_candidates(name: str):
    yield name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    for n in range(1, 100000):
        yield f"{stem} ({n}){'.' + ext if ext else ''}"
