"""Persistence of retained messages and persistent sessions (subscriptions, queued and in-flight
QoS 1/2 messages, QoS 2 receive state), so that what the broker acknowledged survives a
graceful stop, `kill -9` and a power cut.

Theory of operation
===================

The store is SQLite in WAL mode with `synchronous = FULL`, written by one thread of its own.
Chosen over an append-only log with compaction after measuring both
(`benchmarks/store_choice.py`, figures in docs/BENCHMARKS.md; ext4 on this machine's disk,
fsync per batch, insert then delete per message): with group commit both are bound by the
fsync, and at the batch sizes the broker makes they are close (batches of 100: log 130-158k
messages/s, SQLite 100-122k; of 1000: 209-238k against 134-167k; the log only that fast with
a floor under its compaction, which otherwise takes 26-52% of its time). SQLite opens a
crashed 1,000,000-message backlog in 0.2-0.4 s (the log replays it in 1.8-2.5 s, and needs an
index entry in memory per queued message), pages a backlog back in order by index as fast
(1.5-1.9 s per million against 2.2-2.8 s), so a queue can grow past memory onto disk without
a second copy; it reuses deleted pages; and its WAL frames carry checksums, so a torn last
commit is ignored on open. A log would need all of that written by us, and a commit marker
per batch on top. `synchronous = NORMAL` would be 3-20x faster for small batches but loses
the last commits on a power cut: it cannot back a PUBACK.

Group commit: the core calls the methods below from the event loop; each adds an operation to
the current batch. At the end of the loop pass (`flush`, scheduled with call_soon) the batch
goes to the writer thread, which applies it in one transaction and commits (one fsync), while
the loop goes on and collects the next batch. Only when the commit is done are the batch's
*releases* sent: the PUBACK/PUBREC/PUBCOMP/SUBACK/UNSUBACK the core deferred with `ack()`. So a
publisher is acknowledged only once its message is on disk for every persistent session that
is owed it, and acknowledgements to one connection leave in the order they were made
[MQTT-4.6.0-2]: once one is deferred, the ones after it wait behind it. A message that is
acknowledged by its subscriber before its batch left the loop is never written at all (its
insert and delete cancel).

If a commit fails (disk full, I/O error) nothing of its batch is acknowledged; the batch is
retried every second, logged once, while publishers wait (their windows fill, TCP pushes
back). What is not on disk was never acknowledged.

Reads (paging a spilled queue back into memory) go through the same thread after the pending
writes, so they see every message written before they were asked for.

A store that cannot be opened or fails `PRAGMA quick_check` at start is moved aside (with its
-wal and -shm) as `<name>.corrupt-<time>`, and every row that can still be read from it is
copied into a new store; the log says what was kept and where the old file went. A row that
does not make sense (a bad topic, QoS 3) is skipped and counted. The broker starts either way.
"""

from __future__ import annotations

import os
import queue
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..durable import fsync_dir
from .packets import ProtocolError, validate_topic_filter, validate_topic_name

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid INTEGER PRIMARY KEY, client_id TEXT NOT NULL UNIQUE, subscriptions TEXT NOT NULL,
    disconnected_at REAL, username TEXT, expiry INTEGER, options TEXT);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY, sid INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, pid INTEGER, pubrel INTEGER NOT NULL DEFAULT 0,
    props BLOB, expires REAL);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (sid, seq);
CREATE TABLE IF NOT EXISTS qos2_in (sid INTEGER NOT NULL, pid INTEGER NOT NULL, PRIMARY KEY (sid, pid));
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    props BLOB, expires REAL);
"""
TABLES = ("sessions", "messages", "qos2_in", "retained")
# Columns added since the first release of the store: an older store file gets them on open
# (CREATE IF NOT EXISTS keeps old tables as they are). MQTT 5.0: a session's Session Expiry
# Interval (NULL: a 3.1.1 session) and subscription options; a message's properties (the
# encoded ones it carries on) and when its Message Expiry Interval ends.
MIGRATIONS = (("sessions", "username", "TEXT"), ("sessions", "expiry", "INTEGER"), ("sessions", "options", "TEXT"),
              ("messages", "props", "BLOB"), ("messages", "expires", "REAL"),
              ("retained", "props", "BLOB"), ("retained", "expires", "REAL"))

SQL_SESSION = ("INSERT INTO sessions (sid, client_id, subscriptions, disconnected_at, username, expiry, options) "
               "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sid) DO UPDATE SET subscriptions = excluded.subscriptions, "
               "disconnected_at = excluded.disconnected_at, username = excluded.username, "
               "expiry = excluded.expiry, options = excluded.options")
SQL_DROP = ("DELETE FROM messages WHERE sid = ?", "DELETE FROM qos2_in WHERE sid = ?",
            "DELETE FROM sessions WHERE sid = ?")
SQL_MESSAGE = ("INSERT INTO messages (seq, sid, topic, payload, qos, retain, pid, props, expires) "
               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
SQL_SENT = "UPDATE messages SET pid = ? WHERE seq = ?"
SQL_PUBREL = "UPDATE messages SET pubrel = 1 WHERE seq = ?"
SQL_DONE = "DELETE FROM messages WHERE seq = ?"
SQL_DONE_RANGE = "DELETE FROM messages WHERE seq BETWEEN ? AND ?"
SQL_Q2_ADD = "INSERT OR IGNORE INTO qos2_in (sid, pid) VALUES (?, ?)"
SQL_Q2_DEL = "DELETE FROM qos2_in WHERE sid = ? AND pid = ?"
SQL_RETAIN = "INSERT OR REPLACE INTO retained (topic, payload, qos, props, expires) VALUES (?, ?, ?, ?, ?)"
SQL_UNRETAIN = "DELETE FROM retained WHERE topic = ?"
SQL_PAGE = ("SELECT seq, topic, payload, qos, retain, pid, pubrel, props, expires FROM messages "
            "WHERE sid = ? AND seq > ? ORDER BY seq LIMIT ?")

RETRY_AFTER = 1.0
# Writes waiting for the writer thread past which has_room() says no: a disk slower than the
# publishers holds them back (flow control) instead of growing the batch in memory.
MAX_PENDING = 100_000


@dataclass(slots=True)
class StoredSession:
    sid: int
    client_id: str
    subscriptions: dict[str, int]
    disconnected_at: float | None
    username: str | None = None
    expiry: int | None = None  # v5 Session Expiry Interval
    options: dict = field(default_factory=dict)  # filter -> (no_local, retain_as_published, identifier)
    qos2_in: set[int] = field(default_factory=set)
    # The first page: (seq, topic, payload, qos, retain, pid, pubrel, props, expires)
    rows: list[tuple] = field(default_factory=list)
    on_disk: int = 0  # rows after the first page
    stored_bytes: int = 0  # topic and payload bytes of all its rows


@dataclass(slots=True)
class Loaded:
    sessions: list[StoredSession]
    retained: list[tuple[str, bytes, int, bytes | None, float | None]]  # topic, payload, qos, props, expires
    skipped: int = 0  # rows that made no sense


class Store:
    def __init__(self, path: Path, log, loop, quota: int, failpoint: str = ""):
        self.path, self.log, self.loop, self.quota = path, log, loop, quota
        self.ops: list = []  # (sql, params) or None (cancelled)
        self.releases: list = []  # (conn, bytes, then) sent once this batch is committed
        self.reads: list = []  # (sid, after_seq, limit, callback)
        self.pending_msg: dict[int, int] = {}  # seq -> index in ops of its insert
        self.unreleased: dict = {}  # conn -> acknowledgements of it waiting for a commit
        self.busy = False  # a batch is with the writer
        self.scheduled = False
        self.bytes = 0  # topic + payload bytes of the queued messages in the store
        self.commits = self.written = self.failures = 0
        self.next_seq = self.next_sid = 1
        self.on_room = None  # called when has_room() may have turned true again
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        # A test hook: "crash-before-commit:N" ends the process (as a power cut would) after the
        # N-th batch was written to the database but before it was committed.
        self._crash_at = int(failpoint.split(":")[1]) if failpoint.startswith("crash-before-commit:") else 0

    # start and stop --------------------------------------------------------------------------

    def open(self, page: int) -> Loaded:
        """Open (or create, or salvage) the store and read it; `page` queued messages per
        session are read into memory, the rest stay on disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        salvaged = None
        try:
            self._db = self._connect(self.path)
            problem = self._check(self._db)
        except sqlite3.DatabaseError as e:
            problem = str(e)
        if problem:
            salvaged = self._salvage(problem)
        try:
            loaded = self._load(page)
        except sqlite3.DatabaseError as e:  # damage quick_check did not see: salvage, start anyway
            salvaged = (salvaged or 0) + self._salvage(str(e))
            loaded = self._load(page)
        if salvaged is not None:
            loaded.skipped += salvaged
        self._thread = threading.Thread(target=self._run, name="store", daemon=True)
        self._thread.start()
        return loaded

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        return db

    @staticmethod
    def _check(db: sqlite3.Connection) -> str:
        db.executescript(SCHEMA)
        for table, column, kind in MIGRATIONS:
            if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        result = db.execute("PRAGMA quick_check").fetchall()
        return "" if result == [("ok",)] else "; ".join(r[0] for r in result[:3])

    def _salvage(self, problem: str) -> int:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        fsync_dir(self.path.parent)
        self._db = self._connect(self.path)
        self._db.executescript(SCHEMA)
        try:
            kept, lost = _copy_readable(aside, self._db)
        except Exception as e:  # whatever the damage: start, with what was copied so far
            self.log.error("store: salvage stopped", error=repr(e))
            kept, lost = {}, 1
        self.log.error("store is damaged; moved it aside and kept what could be read",
                       store=self.path, problem=problem, moved_to=aside,
                       kept=" ".join(f"{t}={n}" for t, n in kept.items()), unreadable_areas=lost)
        return lost

    def _load(self, page: int) -> Loaded:
        db = self._db
        skipped = 0
        sessions: dict[int, StoredSession] = {}
        for sid, client_id, subs, disconnected_at, username, expiry, options in db.execute(
                "SELECT sid, client_id, subscriptions, disconnected_at, username, expiry, options FROM sessions"):
            try:
                filters = orjson.loads(subs)
                for f, q in filters.items():
                    validate_topic_filter(f)
                    if q not in (0, 1, 2):
                        raise ValueError(q)
                opts = orjson.loads(options) if options else {}
                for f, (no_local, rap, ident) in opts.items():
                    if f not in filters or not (ident is None or 1 <= ident <= 268_435_455):
                        raise ValueError(f)
                if expiry is not None and not 0 <= expiry <= 0xFFFF_FFFF:
                    raise ValueError(expiry)
            except (orjson.JSONDecodeError, ProtocolError, ValueError, AttributeError, TypeError):
                skipped += 1
                filters, opts, expiry = {}, {}, None
            sessions[sid] = StoredSession(sid, client_id, filters, disconnected_at, username, expiry, opts)
        for sid, pid in db.execute("SELECT sid, pid FROM qos2_in"):
            if sid in sessions:
                sessions[sid].qos2_in.add(pid)
        for sid, count, size in db.execute(
                "SELECT sid, count(*), sum(length(CAST(topic AS BLOB)) + length(payload)) FROM messages GROUP BY sid"):
            s = sessions.get(sid)
            if s is None:
                db.execute("DELETE FROM messages WHERE sid = ?", (sid,))  # of a session that is gone
                continue
            self.bytes += size or 0
            rows = db.execute(SQL_PAGE, (sid, 0, page)).fetchall()
            good = [r for r in rows if _valid_row(r)]
            skipped += len(rows) - len(good)
            s.rows = good
            s.on_disk = count - len(rows)
            s.stored_bytes = size or 0
        retained = []
        for topic, payload, qos, props, expires in db.execute("SELECT topic, payload, qos, props, expires FROM retained"):
            try:
                validate_topic_name(topic)
                if qos not in (0, 1, 2) or not payload:
                    raise ValueError(qos)
                retained.append((topic, bytes(payload), qos, props, expires))
            except (ProtocolError, ValueError, TypeError):
                skipped += 1
        self.next_seq = (db.execute("SELECT max(seq) FROM messages").fetchone()[0] or 0) + 1
        self.next_sid = (db.execute("SELECT max(sid) FROM sessions").fetchone()[0] or 0) + 1
        return Loaded(list(sessions.values()), retained, skipped)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is pending, stop the writer, and leave a checkpointed database."""
        if self._thread is None:
            return
        ops = [op for op in self.ops if op is not None]
        if ops:
            self._jobs.put((ops, [], []))  # nothing waits for it: the connections are gone
        self._jobs.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._db.close()
            except sqlite3.Error as e:
                self.log.warning("store: checkpoint at stop failed", error=str(e))
        self._thread = None

    # what the core calls (event loop thread) ---------------------------------------------------

    def _op(self, sql: str, params: tuple) -> None:
        self.ops.append((sql, params))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def new_session(self) -> int:
        """A key for a new persistent session; `save_session` writes it."""
        self.next_sid += 1
        return self.next_sid - 1

    def save_session(self, session) -> None:
        """Write a session's row: who it is (client id, user name), its subscriptions, and
        since when it is away (None while connected)."""
        options = {f: (o.no_local, o.retain_as_published, o.identifier) for f, o in session.options.items()}
        self._op(SQL_SESSION, (session.sid, session.client_id, orjson.dumps(session.subscriptions).decode(),
                               session.disconnected_at, session.username, session.expiry,
                               orjson.dumps(options).decode() if options else None))

    def drop_session(self, sid: int, queued_bytes: int) -> None:
        for sql in SQL_DROP:
            self._op(sql, (sid,))
        self.bytes -= queued_bytes

    def message(self, sid: int, msg, qos: int, retain: bool, size: int) -> int:
        """Queue a message (sessions.Message) for a session; returns its sequence number.
        `size`: its topic and payload bytes, counted against the quota until `done()`."""
        seq = self.next_seq
        self.next_seq += 1
        self.pending_msg[seq] = len(self.ops)
        self._op(SQL_MESSAGE, (seq, sid, msg.topic, msg.payload, qos, int(retain), None, msg.props or None, msg.expires))
        self.bytes += size
        return seq

    def sent(self, seq: int, pid: int) -> None:
        """A QoS 2 message went out with this packet id: after a restart it must keep it."""
        i = self.pending_msg.get(seq)
        if i is not None:
            sql, p = self.ops[i]
            self.ops[i] = (sql, (*p[:6], pid, *p[7:]))
        else:
            self._op(SQL_SENT, (pid, seq))

    def pubrel(self, seq: int) -> None:
        self._op(SQL_PUBREL, (seq,))

    def done(self, seq: int, size: int) -> None:
        self.bytes -= size
        i = self.pending_msg.pop(seq, None)
        if i is not None:
            self.ops[i] = None  # never reached the disk: nothing to delete
        else:
            self._op(SQL_DONE, (seq,))

    def qos2_in(self, sid: int, pid: int, add: bool) -> None:
        self._op(SQL_Q2_ADD if add else SQL_Q2_DEL, (sid, pid))

    def retain(self, topic: str, payload: bytes, qos: int, props: bytes = b"", expires: float | None = None) -> None:
        if payload:
            self._op(SQL_RETAIN, (topic, payload, qos, props or None, expires))
        else:
            self._op(SQL_UNRETAIN, (topic,))

    def mark(self) -> int:
        return len(self.ops)

    def ack(self, conn, data: bytes, durable: bool, then=None) -> None:
        """Send an acknowledgement now, or after the current batch is committed when it
        depends on it (`durable`) or an earlier one to the same connection still waits; `then()`
        right after it is sent (the retained messages that follow a SUBACK)."""
        n = self.unreleased.get(conn, 0)
        if not durable and not n:
            conn.send(data)
            if then is not None:
                then()
            return
        self.unreleased[conn] = n + 1
        self.releases.append((conn, data, then))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def read(self, sid: int, after_seq: int, limit: int, callback) -> None:
        """Page queued messages of a session back in; `callback(rows)` on the loop."""
        self.reads.append((sid, after_seq, limit, callback))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def has_room(self) -> bool:
        return self.bytes < self.quota and len(self.ops) < MAX_PENDING

    def pending(self) -> int:
        return len(self.ops) + len(self.releases) + len(self.reads)

    def flush(self) -> None:
        self.scheduled = False
        if self.busy or not (self.ops or self.releases or self.reads):
            return
        ops = [op for op in self.ops if op is not None]
        releases = self.releases
        self.ops, self.releases = [], []
        self.pending_msg.clear()
        if not ops and not self.reads:
            self._release(releases)  # nothing to write: only order kept them back
            return
        self.busy = True
        self._jobs.put((ops, releases, self.reads))
        self.reads = []

    def _committed(self, releases: list, results: list) -> None:
        self.busy = False
        if self.on_room is not None and len(self.ops) >= MAX_PENDING:
            self.loop.call_soon(self.on_room)  # after this batch is handed over: room again
        self._release(releases)
        for callback, rows in results:
            callback(rows)
        self.flush()

    def _release(self, releases: list) -> None:
        unreleased = self.unreleased
        for conn, data, then in releases:
            n = unreleased[conn] - 1
            if n:
                unreleased[conn] = n
            else:
                del unreleased[conn]
            conn.send(data)
            if then is not None:
                then()

    # the writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        db = self._db
        while True:
            job = self._jobs.get()
            if job is None:
                return
            ops, releases, reads = job
            failed = False
            while True:
                try:
                    self._apply(db, ops)
                    break
                except sqlite3.Error as e:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    self.failures += 1
                    if not failed:
                        self.log.error("store: cannot write; acknowledgements wait until it can",
                                       store=self.path, error=str(e))
                    failed = True
                    time.sleep(RETRY_AFTER)
            if failed:
                self.log.info("store: writing again", store=self.path)
            results = []
            for sid, after, limit, callback in reads:
                rows = [r for r in db.execute(SQL_PAGE, (sid, after, limit)).fetchall()]
                results.append((callback, rows))
            try:
                self.loop.call_soon_threadsafe(self._committed, releases, results)
            except RuntimeError:
                pass  # the loop is closed: the broker is stopping

    def _apply(self, db: sqlite3.Connection, ops: list) -> None:
        if not ops:
            return
        # Deletes of acknowledged messages go last, as ranges of consecutive sequence numbers
        # (one statement for a whole batch of a subscriber that acknowledges in order). Safe to
        # move: in one batch a message is never inserted and deleted (that cancels before), and
        # its updates come before its delete in any order.
        done = [op[1][0] for op in ops if op[0] is SQL_DONE]
        if done:
            ops = [op for op in ops if op[0] is not SQL_DONE]
        db.execute("BEGIN")
        i, n = 0, len(ops)
        while i < n:  # runs of the same statement go in one executemany
            sql = ops[i][0]
            j = i + 1
            while j < n and ops[j][0] is sql:
                j += 1
            if j - i == 1:
                db.execute(sql, ops[i][1])
            else:
                db.executemany(sql, [op[1] for op in ops[i:j]])
            i = j
        if done:
            singles, ranges = _runs(sorted(done))
            db.executemany(SQL_DONE_RANGE, ranges)
            db.executemany(SQL_DONE, singles)
        self.commits += 1
        self.written += n + len(done)
        if self._crash_at and self.commits >= self._crash_at:
            os._exit(137)  # written, not committed: what a power cut before the fsync leaves
        db.execute("COMMIT")


def _runs(seqs: list[int]) -> tuple[list[tuple[int]], list[tuple[int, int]]]:
    """Sorted numbers as (single,) and (first, last) runs of consecutive ones."""
    singles, ranges = [], []
    start = prev = seqs[0]
    for x in seqs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        if prev > start:
            ranges.append((start, prev))
        else:
            singles.append((start,))
        if x is not None:
            start = prev = x
    return singles, ranges


def _valid_row(row: tuple) -> bool:
    seq, topic, payload, qos, retain, pid, pubrel, props, expires = row
    try:
        validate_topic_name(topic)
    except (ProtocolError, TypeError):
        return False
    return qos in (1, 2) and isinstance(payload, bytes) and (pid is None or 1 <= pid <= 65535)


def _copy_readable(old_path: Path, new: sqlite3.Connection) -> tuple[dict[str, int], int]:
    """Copy every row that can be read from a damaged store, table by table in rowid order;
    past an unreadable area, skip ahead (ever further) and go on. Returns rows kept per table
    and the number of unreadable areas met."""
    kept = dict.fromkeys(TABLES, 0)
    lost = 0
    # Read from a copy (the moved-aside file stays as it was found) whose header's page count
    # matches its length: SQLite refuses a file shorter than its header says at all.
    work = old_path.with_name(old_path.name + ".salvage")
    shutil.copyfile(old_path, work)
    try:
        with open(work, "r+b") as f:
            header = f.read(100)
            if header.startswith(b"SQLite format 3\0"):
                page = int.from_bytes(header[16:18], "big")
                page = 65536 if page == 1 else page
                size = os.fstat(f.fileno()).st_size // page
                f.truncate(size * page)
                f.seek(28)
                f.write(size.to_bytes(4, "big"))
        old = sqlite3.connect(f"file:{work}?immutable=1", uri=True)
        old.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        work.unlink()
        return kept, 1  # not a database any more: nothing to keep
    for table in TABLES:
        try:
            cols = [r[1] for r in old.execute(f"PRAGMA table_info({table})")]
        except sqlite3.DatabaseError:
            lost += 1
            continue
        if not cols:
            continue
        insert = f"INSERT OR IGNORE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        select = f"SELECT rowid, {', '.join(cols)} FROM {table} WHERE rowid > ? ORDER BY rowid"
        last, step, attempts = 0, 1, 0
        while attempts < 200 and last < 2**62:
            try:
                for row in old.execute(select, (last,)):
                    last = row[0]
                    try:
                        new.execute(insert, row[1:])
                        kept[table] += 1
                    except sqlite3.Error:
                        pass  # a row that breaks a constraint of ours: not kept
                break
            except sqlite3.DatabaseError:
                lost += 1
                attempts += 1
                last += step
                step *= 2
    old.close()
    work.unlink()
    return kept, lost
