"""Where readings land: one small interface, two backends (SQLite, MySQL/MariaDB via PyMySQL).

Theory of operation
===================

`Sink.write(rows)` is the only hot call: it upserts a batch keyed by message id in one
transaction and commits, and returns only once the commit is durable. Its outcome is one of:

* returns `[]`: every row is committed;
* returns `[(index, error), ...]`: the database refused those rows (bad data, a CHECK or a
  trigger said no); every *other* row is committed. The caller puts the refused ones in the
  DLQ. A refusal is found by writing the batch row by row once the batch as a whole failed
  with a data error: a failed statement rolls back alone, the transaction goes on.
* raises `Unavailable`: nothing can be said about this batch (connection lost, server down,
  disk full, lock timeout, commit outcome unknown). The caller keeps the messages
  unacknowledged and writes the same batch again later; the upsert makes that harmless.
* raises `Busy` (an Unavailable): another writer held the database past the busy timeout
  (SQLite's one write lock, shared by several iot-ingest workers) or the server chose this
  transaction as a deadlock victim. Nothing was committed, the connection stays; the caller
  tries again soon, again without acknowledging anything.

The upsert is idempotent and first-write-wins: a message id already present changes nothing
(`ON DUPLICATE KEY UPDATE msg_id = msg_id` on MySQL, `ON CONFLICT DO NOTHING` on SQLite),
so a redelivered message, or a batch written twice after a lost commit, lands once.

Schema changes are versioned migrations applied at connect, in order, each recorded in
`ingest_schema`; a database already at a later version than this code knows is refused.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, IngestConfig

# One row: msg_id, sensor_id, ts, topic, vals (JSON text), key_id. `landed_at` (the wall time
# the batch went to the database) is added by the sink.
Row = tuple[str, str, float, str, str, str]
COLUMNS = ("msg_id", "sensor_id", "ts", "topic", "vals", "key_id", "landed_at")
MAX_TOPIC = 255


class Unavailable(Exception):
    """The database cannot take this batch now; try again later."""


class Busy(Unavailable):
    """Another writer holds the lock: nothing committed; try again shortly."""


class SchemaTooNew(Exception):
    """The database was migrated by a newer version of this code."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    what: str
    sqlite: tuple[str, ...]
    mysql: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1, "readings table keyed by message id",
        sqlite=(
            "CREATE TABLE readings (msg_id TEXT NOT NULL PRIMARY KEY, sensor_id TEXT NOT NULL, "
            "ts REAL NOT NULL, topic TEXT NOT NULL, vals TEXT NOT NULL, key_id TEXT NOT NULL, "
            "landed_at REAL NOT NULL) WITHOUT ROWID",
        ),
        mysql=(
            "CREATE TABLE readings ("
            " msg_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL PRIMARY KEY,"
            " sensor_id VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
            " ts DOUBLE NOT NULL,"
            f" topic VARCHAR({MAX_TOPIC}) NOT NULL,"
            " vals TEXT NOT NULL,"
            " key_id VARCHAR(32) CHARACTER SET ascii NOT NULL,"
            " landed_at DOUBLE NOT NULL"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        ),
    ),
    Migration(
        2, "index for per-sensor time queries",
        sqlite=("CREATE INDEX readings_sensor_ts ON readings (sensor_id, ts)",),
        mysql=("CREATE INDEX readings_sensor_ts ON readings (sensor_id, ts)",),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class Sink(ABC):
    """The storage interface the worker and `iotctl dlq replay` use."""

    @abstractmethod
    def describe(self) -> str:
        """Where it writes, for logs; no secrets."""

    @abstractmethod
    def connect(self) -> None:
        """Open the connection and migrate the schema. Raises Unavailable."""

    @abstractmethod
    def write(self, rows: Sequence[Row]) -> list[tuple[int, str]]:
        """Upsert and commit; return the refused rows as (index, error). Raises Unavailable."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """For tools and tests: run one read-only statement."""

    def _landed(self, rows: Sequence[Row]) -> list[tuple]:
        now = time.time()
        return [r + (now,) for r in rows]


# -- SQLite --------------------------------------------------------------------------------------


class SqliteSink(Sink):
    """WAL with synchronous=FULL: every commit fsyncs the WAL, so a commit survives a power
    loss before the broker hears the PUBACK. (NORMAL would only survive a process crash.)"""

    UPSERT = (f"INSERT INTO readings ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT (msg_id) DO NOTHING")

    def __init__(self, path: Path, busy_timeout: float = 5.0):
        self.path = path
        self.busy_timeout = busy_timeout
        self.db: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def connect(self) -> None:
        if self.db is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._migrate(db)
        except (sqlite3.Error, OSError) as e:
            raise Unavailable(f"sqlite {self.path}: {e}") from e
        self.db = db

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")  # one migrator at a time
        try:
            db.execute("CREATE TABLE IF NOT EXISTS ingest_schema (version INTEGER PRIMARY KEY, "
                       "what TEXT NOT NULL, applied_at REAL NOT NULL)")
            current = db.execute("SELECT COALESCE(MAX(version), 0) FROM ingest_schema").fetchone()[0]
            _check_version(current)
            for m in MIGRATIONS:
                if m.version > current:
                    for stmt in m.sqlite:
                        db.execute(stmt)
                    db.execute("INSERT INTO ingest_schema VALUES (?, ?, ?)", (m.version, m.what, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def write(self, rows: Sequence[Row]) -> list[tuple[int, str]]:
        if not rows:
            return []
        self.connect()
        db = self.db
        assert db is not None
        data = self._landed(rows)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(self.UPSERT, data)
                refused: list[tuple[int, str]] = []
            except (sqlite3.IntegrityError, sqlite3.DataError):
                # Some row is refused: the failed statement is undone, the transaction is not;
                # find the refused rows one by one and keep the rest.
                refused = []
                for i, row in enumerate(data):
                    try:
                        db.execute(self.UPSERT, row)
                    except (sqlite3.IntegrityError, sqlite3.DataError) as e:
                        refused.append((i, f"sqlite: {e}"))
            db.execute("COMMIT")
            return refused
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise Busy(f"sqlite {self.path}: {e} (another writer for {self.busy_timeout:g}s)") from e
            self._reset()
            raise Unavailable(f"sqlite {self.path}: {e}") from e

    def _reset(self) -> None:
        if self.db is not None:
            try:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                self.db.close()
            except sqlite3.Error:
                pass
        self.db = None

    def close(self) -> None:
        self._reset()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        self.connect()
        assert self.db is not None
        return self.db.execute(sql, tuple(args)).fetchall()


# -- MySQL / MariaDB -----------------------------------------------------------------------------

# Server errors that refuse a row's data: the row goes to the DLQ, the others are kept.
# Anything else (connection, lock, disk, permissions, a missing table) is an outage: the
# batch is retried and no good message is ever dead-lettered for it.
MYSQL_REFUSED = frozenset({
    1048,  # column cannot be null
    1062,  # duplicate entry (a unique key other than the id)
    1264,  # out of range
    1265,  # data truncated
    1292,  # incorrect value
    1366,  # incorrect string value (charset)
    1406,  # data too long
    1451, 1452,  # foreign key
    1644,  # SIGNAL from a trigger: the operator's own refusal rule
    3140,  # invalid JSON
    3819,  # CHECK constraint (MySQL)
    4025,  # CHECK constraint (MariaDB)
})

# Another worker's transaction is in the way: rolled back, tried again soon.
MYSQL_BUSY = frozenset({1205, 1213})  # lock wait timeout, deadlock


class MysqlSink(Sink):
    UPSERT = (f"INSERT INTO readings ({', '.join(COLUMNS)}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
              "ON DUPLICATE KEY UPDATE msg_id = msg_id")
    UPSERT_PREFIX = f"INSERT INTO readings ({', '.join(COLUMNS)}) VALUES "
    UPSERT_SUFFIX = " ON DUPLICATE KEY UPDATE msg_id = msg_id"

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self.conn: Any = None

    def describe(self) -> str:
        c = self.cfg
        where = f"unix:{c.mysql_socket}" if c.mysql_socket else f"{c.mysql_host}:{c.mysql_port}"
        return f"mysql:{c.mysql_user}@{where}/{c.mysql_database}{' tls' if c.mysql_cafile else ''}"

    def _password(self) -> str:
        c = self.cfg
        if c.mysql_password_file is not None:
            try:
                text = c.mysql_password_file.read_text()
            except OSError as e:
                raise ConfigError(None, "[ingest] mysql_password_file",
                                  f"cannot read {c.mysql_password_file}: {e.strerror}") from None
            return text.splitlines()[0] if text else ""
        return c.mysql_password

    def connect(self) -> None:
        if self.conn is not None:
            return
        import pymysql  # noqa: PLC0415 - SQLite-only installs never load it

        c = self.cfg
        ssl = None
        if c.mysql_cafile is not None:
            ssl = {"ca": str(c.mysql_cafile)}
            if c.mysql_certfile is not None:
                ssl["cert"] = str(c.mysql_certfile)
            if c.mysql_keyfile is not None:
                ssl["key"] = str(c.mysql_keyfile)
        try:
            conn = pymysql.connect(
                host=c.mysql_host, port=c.mysql_port,
                unix_socket=str(c.mysql_socket) if c.mysql_socket else None,
                user=c.mysql_user, password=self._password(), database=c.mysql_database,
                charset="utf8mb4", autocommit=False, ssl=ssl,
                connect_timeout=c.mysql_timeout, read_timeout=c.mysql_timeout, write_timeout=c.mysql_timeout,
                # Strict: a value that does not fit is an error, never silently truncated.
                init_command="SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
            )
            self._migrate(conn)
        except (pymysql.MySQLError, OSError) as e:
            raise Unavailable(f"{self.describe()}: {_mysql_error(e)}") from e
        self.conn = conn

    def _migrate(self, conn: Any) -> None:
        with conn.cursor() as cur:
            # DDL commits implicitly in MySQL; the named lock keeps two workers from
            # migrating at once.
            cur.execute("SELECT GET_LOCK('iot_ingest_migrate', 30)")
            if cur.fetchone()[0] != 1:
                raise Unavailable("could not take the migration lock in 30 s")
            try:
                cur.execute("CREATE TABLE IF NOT EXISTS ingest_schema (version INT NOT NULL PRIMARY KEY, "
                            "what VARCHAR(200) NOT NULL, applied_at DOUBLE NOT NULL) ENGINE=InnoDB")
                cur.execute("SELECT COALESCE(MAX(version), 0) FROM ingest_schema")
                current = cur.fetchone()[0]
                _check_version(current)
                for m in MIGRATIONS:
                    if m.version > current:
                        for stmt in m.mysql:
                            cur.execute(stmt)
                        cur.execute("INSERT INTO ingest_schema VALUES (%s, %s, %s)", (m.version, m.what, time.time()))
                        conn.commit()
                conn.commit()
            finally:
                cur.execute("DO RELEASE_LOCK('iot_ingest_migrate')")

    def write(self, rows: Sequence[Row]) -> list[tuple[int, str]]:
        if not rows:
            return []
        import pymysql  # noqa: PLC0415

        self.connect()
        conn = self.conn
        data = self._landed(rows)
        try:
            with conn.cursor() as cur:
                try:
                    for stmt in _multi_insert(self.UPSERT_PREFIX, self.UPSERT_SUFFIX, data):
                        cur.execute(stmt)
                    refused: list[tuple[int, str]] = []
                except (pymysql.MySQLError, ValueError) as e:
                    if not isinstance(e, ValueError) and _errno(e) not in MYSQL_REFUSED:
                        raise
                    # A failed statement is undone alone (and a failed chunk of several left
                    # earlier chunks in place, which the upsert makes harmless); the
                    # transaction goes on. Now row by row, to find the refused ones.
                    refused = []
                    for i, row in enumerate(data):
                        try:
                            cur.execute(self.UPSERT, row)
                        except (pymysql.MySQLError, ValueError) as e1:
                            if not isinstance(e1, ValueError) and _errno(e1) not in MYSQL_REFUSED:
                                raise
                            refused.append((i, f"mysql: {_mysql_error(e1)}"))
            conn.commit()
            return refused
        except (pymysql.MySQLError, OSError) as e:
            if _errno(e) in MYSQL_BUSY:
                try:
                    conn.rollback()
                except pymysql.MySQLError:
                    self._reset()
                raise Busy(f"{self.describe()}: {_mysql_error(e)}") from e
            self._reset()
            raise Unavailable(f"{self.describe()}: {_mysql_error(e)}") from e

    def _reset(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped
                pass

    def close(self) -> None:
        self._reset()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        self.connect()
        with self.conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), tuple(args))
            rows = list(cur.fetchall())
        self.conn.commit()
        return rows


# Backslash escaping as PyMySQL's escape_string does; valid because the session's sql_mode is
# set without NO_BACKSLASH_ESCAPES, and the connection is utf8mb4 (no multi-byte quote tricks).
_ESCAPE = [chr(c) for c in range(128)]
for _c, _e in (("\0", "\\0"), ("\\", "\\\\"), ("\n", "\\n"), ("\r", "\\r"), ("\x1a", "\\Z"), ('"', '\\"'),
               ("'", "\\'")):
    _ESCAPE[ord(_c)] = _e
# Characters that need escaping inside a single-quoted literal ('"' does not; translating
# only when one is present keeps the common case, plain ids and JSON, to one regex search).
_SPECIAL = re.compile(r"[\x00\n\r\x1a'\\]")
MAX_STATEMENT = 1_000_000  # characters (at most 4 MB in utf8mb4): under the default max_allowed_packet, 16 MiB


def _q(s: str, special=_SPECIAL.search, table=_ESCAPE) -> str:
    return s.translate(table) if special(s) else s


def _literal_row(row: tuple) -> str:
    """One row as a SQL tuple. PyMySQL's executemany does the same through a generic per-value
    dispatch that cost about a sixth of the worker's CPU; rows here have a fixed shape."""
    msg_id, sensor, ts, topic, vals, key_id, landed = row
    if type(ts) is not float or type(landed) is not float or not math.isfinite(ts):
        raise ValueError(f"row {msg_id!r}: ts must be a finite float")
    return "('%s','%s',%r,'%s','%s','%s',%r)" % (_q(msg_id), _q(sensor), ts, _q(topic), _q(vals), _q(key_id), landed)


def _multi_insert(prefix: str, suffix: str, rows: Sequence[tuple]) -> list[str]:
    """Multi-row INSERT statements of at most MAX_STATEMENT bytes each, rows in order."""
    out, part, size = [], [], len(prefix) + len(suffix)
    for r in rows:
        lit = _literal_row(r)
        if part and size + len(lit) + 1 > MAX_STATEMENT:
            out.append(prefix + ",".join(part) + suffix)
            part, size = [], len(prefix) + len(suffix)
        part.append(lit)
        size += len(lit) + 1
    if part:
        out.append(prefix + ",".join(part) + suffix)
    return out


def _errno(e: Exception) -> int:
    return e.args[0] if e.args and isinstance(e.args[0], int) else 0


def _mysql_error(e: Exception) -> str:
    if len(e.args) >= 2:
        return f"({e.args[0]}) {e.args[1]}"
    return str(e) or type(e).__name__


def _check_version(current: int) -> None:
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(f"database schema is version {current}, this iot-ingest knows up to {SCHEMA_VERSION}")


def open_sink(cfg: Config) -> Sink:
    """The sink the config names (not yet connected)."""
    ic = cfg.ingest
    if ic.backend == "mysql":
        return MysqlSink(ic)
    return SqliteSink(ic.sqlite_path or cfg.paths.state_dir / "db" / "ingest.db", ic.sqlite_busy_timeout)
