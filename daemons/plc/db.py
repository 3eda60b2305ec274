"""The readings database of iot-dbsub (SQLite, `<state_dir>/db/sensors.db`) and `iotctl readings`.

One row per reading, unique by (device_id, seq): a reading delivered again (at least once means
sometimes twice) is ignored, first write wins. `temperature` and `pressure` have columns of
their own (the seed's table); every value, those two included, is in `vals` (JSON), with
`units`. WAL with synchronous=FULL: `insert()` returns once the rows are on disk, and only then
does iot-dbsub acknowledge the messages. Readers (`iotctl readings`) open the file read-only and
never block the writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import orjson

from ..config import Config
from .reading import Reading

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE readings (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    topic TEXT NOT NULL,
    temperature REAL,
    pressure REAL,
    vals TEXT NOT NULL,
    units TEXT NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE INDEX readings_ts ON readings (device_id, ts);
"""
INSERT = ("INSERT OR IGNORE INTO readings (device_id, seq, ts, topic, temperature, pressure, vals, units, "
          "received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


class SchemaTooNew(Exception):
    pass


def path_of(cfg: Config) -> Path:
    return cfg.dbsub.sqlite_path or cfg.paths.state_dir / "db" / "sensors.db"


def _number(v) -> float | None:
    return float(v) if v is not None else None


class Db:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{path} has schema version {version}; this iot-dbsub knows up to {SCHEMA_VERSION}")
        if version == 0:
            db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    def insert(self, items: Sequence[tuple[Reading, str]], now: float) -> list[bool]:
        """Store the readings (with the topic each came on) in one transaction; True for each
        that is new, False for one the table holds already. Raises sqlite3.Error."""
        db = self.db
        new = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for r, topic in items:
                cur = db.execute(INSERT, (r.device_id, r.seq, r.ts, topic, _number(r.values.get("temperature")),
                                          _number(r.values.get("pressure")), orjson.dumps(r.values).decode(),
                                          orjson.dumps(r.units).decode(), now))
                new.append(cur.rowcount == 1)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return new

    def close(self) -> None:
        self.db.close()


def open_readonly(path: Path) -> sqlite3.Connection:
    """For readers; raises sqlite3.OperationalError if the file is not there."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)


def select(conn: sqlite3.Connection, device: str | None, last: int | None, after_id: int = 0) -> list[tuple]:
    """Rows (id, device_id, seq, ts, topic, vals, units, received_at), oldest first: the `last`
    newest ones (all if None) with an id above `after_id`, of one device or all."""
    where, args = ["id > ?"], [after_id]
    if device is not None:
        where.append("device_id = ?")
        args.append(device)
    sql = (f"SELECT id, device_id, seq, ts, topic, vals, units, received_at FROM readings "
           f"WHERE {' AND '.join(where)} ORDER BY id DESC")
    if last is not None:
        sql += " LIMIT ?"
        args.append(last)
    return conn.execute(sql, args).fetchall()[::-1]
