"""Durable state for the transfer daemons, written so that `kill -9` at any moment loses
nothing that was acknowledged. Both are `durable.AppendLog`s (append, fsync, torn tail cut):

- `Journal`: JSON lines. `append()` writes one record and fsyncs before returning, so the
  caller acts (moves a file, publishes an ack) only on what is already on disk.
- `IndexLog`: the receiver's set of chunks known to be on disk, as 4-byte little-endian
  indexes. The caller fdatasyncs the data file first and appends the indexes after, so an
  index on disk always means its bytes are on disk too.

The other durable write, replacing a whole file, is `durable.atomic_write`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import orjson

from ..durable import AppendLog, atomic_write


class Journal:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log = AppendLog(path)

    def load(self) -> list[dict]:
        records = []
        for line in self._log.read_whole()[0].split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # not ours to judge: skip, keep the rest
            if isinstance(rec, dict):
                records.append(rec)
        return records

    def append(self, record: dict) -> None:
        self._log.append(orjson.dumps(record) + b"\n")

    def rewrite(self, records: Iterable[dict]) -> None:
        """Compact: keep only `records`, atomically."""
        self.close()
        atomic_write(self.path, b"".join(orjson.dumps(r) + b"\n" for r in records))

    def close(self) -> None:
        self._log.close()


_U32 = struct.Struct("<I")


class IndexLog:
    def __init__(self, path: Path):
        self.path = path
        self._log = AppendLog(path, record=_U32.size)

    def load(self) -> list[int]:
        return [v for (v,) in _U32.iter_unpack(self._log.read_whole()[0])]

    def append(self, indexes: Iterable[int]) -> None:
        data = b"".join(_U32.pack(i) for i in indexes)
        if data:
            self._log.append(data)

    def close(self) -> None:
        self._log.close()


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
