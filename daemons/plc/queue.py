"""The PLC's store and forward queue: readings not yet acknowledged by the broker, on disk.

SQLite in WAL mode with synchronous=FULL (the broker's store made the same choice, measured):
a reading is taken, given the next `seq` and inserted in one transaction, so after `kill -9`
or a power cut the queue holds every reading not yet acknowledged and `seq` goes on where it
stopped, never reusing a number (a reused one would be taken for a duplicate by the database
and the new reading lost). A reading leaves only on its PUBACK (`remove`). The queue is
bounded: past `limit` readings the oldest go in the same transaction, counted on disk.

One file per PLC, `<state_dir>/plc/<name>.db`, used by one process (iot-plc --plc NAME).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path


class QueueDamaged(Exception):
    pass


class Queue:
    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = db = sqlite3.connect(path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.execute("CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            meta = dict(db.execute("SELECT key, value FROM meta"))
            self.count = db.execute("SELECT count(*) FROM queue").fetchone()[0]
        except sqlite3.DatabaseError as e:
            # Starting afresh would start seq at 0 again, and the database would take every new
            # reading for one it already has: the operator decides.
            raise QueueDamaged(f"the queue {path} is damaged ({e}); its readings and the next seq number are "
                               "lost with it. Move it aside to start again from seq 0 (readings the database "
                               "already holds for this device id would then be taken for duplicates: give "
                               "the device a new device_id)") from None
        self.next_seq = meta.get("next_seq", 0)
        self.dropped = meta.get("dropped", 0)

    def __len__(self) -> int:
        return self.count

    def add(self, payload_for: Callable[[int], bytes]) -> tuple[int, int]:
        """Store the next reading, `payload_for(seq)`. Returns its seq and how many of the oldest
        readings went to make room (0 unless the queue was full)."""
        seq = self.next_seq
        payload = payload_for(seq)
        over = max(0, self.count + 1 - self.limit)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO queue (seq, payload) VALUES (?, ?)", (seq, payload))
            if over:
                db.execute("DELETE FROM queue WHERE seq IN (SELECT seq FROM queue ORDER BY seq LIMIT ?)", (over,))
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           (("next_seq", seq + 1), ("dropped", self.dropped + over)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.next_seq = seq + 1
        self.dropped += over
        self.count += 1 - over
        return seq, over

    def after(self, seq: int, n: int) -> list[tuple[int, bytes]]:
        """Up to `n` queued readings with a seq above `seq`, oldest first."""
        return self.db.execute("SELECT seq, payload FROM queue WHERE seq > ? ORDER BY seq LIMIT ?", (seq, n)).fetchall()

    def remove(self, seqs: Iterable[int]) -> None:
        """Acknowledged: gone. (A removal lost in a crash only sends the reading again, which the
        database keeps once.)"""
        seqs = list(seqs)
        if not seqs:
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.executemany("DELETE FROM queue WHERE seq = ?", ((s,) for s in seqs))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.count -= cur.rowcount

    def close(self) -> None:
        self.db.close()
