"""Durable writes, the two ways state on disk survives `kill -9` and power loss (STYLE 11):
replace a whole file (temp, fsync, rename, fsync the folder), or append and fsync (the callers'
journals and segments). A rename or a new file is durable only once its folder is fsynced."""

from __future__ import annotations

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
