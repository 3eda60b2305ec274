"""The SQLite sink (idempotent upsert, refusals, versioned migrations, durability pragmas), the
MySQL statement builder, batched PUBACK bytes, and the worker's ack-epoch rule."""

import sqlite3

import pymysql.converters
import pytest

from daemons import mqtttune
from daemons.ingest import sinks


def row(i: int, sensor: str = "s1") -> tuple:
    return (f"m-{i}", sensor, 1_700_000_000.0 + i, "sensors/a", '{"t":1.5}', "k1")


def test_sqlite_upsert_is_idempotent_and_first_write_wins(tmp_path):
    s = sinks.SqliteSink(tmp_path / "db" / "ingest.db")
    assert s.write([row(1), row(2)]) == []
    before = s.query("SELECT * FROM readings ORDER BY msg_id")
    changed = (row(1)[0], "other", 1.0, "t", "{}", "k9")
    assert s.write([row(1), changed, row(3)]) == []
    after = s.query("SELECT * FROM readings ORDER BY msg_id")
    assert after[:2] == before and len(after) == 3
    s.close()


def test_sqlite_is_wal_with_full_sync(tmp_path):
    s = sinks.SqliteSink(tmp_path / "i.db")
    s.connect()
    assert s.query("PRAGMA journal_mode") == [("wal",)]
    assert s.query("PRAGMA synchronous") == [(2,)]  # FULL: the WAL is fsynced at every commit
    s.close()


def test_sqlite_refused_rows_are_reported_and_the_rest_committed(tmp_path):
    s = sinks.SqliteSink(tmp_path / "i.db")
    s.connect()
    s.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON readings WHEN NEW.sensor_id = 'bad' "
                 "BEGIN SELECT RAISE(ABORT, 'sensor retired'); END")
    refused = s.write([row(1), row(2, "bad"), row(3), row(4, "bad")])
    assert [i for i, _ in refused] == [1, 3] and "sensor retired" in refused[0][1]
    assert [r[0] for r in s.query("SELECT msg_id FROM readings ORDER BY msg_id")] == ["m-1", "m-3"]


def test_sqlite_outage_raises_unavailable_and_recovers(tmp_path):
    s = sinks.SqliteSink(tmp_path / "i.db", busy_timeout=0.1)
    s.connect()
    blocker = sqlite3.connect(tmp_path / "i.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    with pytest.raises(sinks.Unavailable, match="locked"):
        s.write([row(1)])
    blocker.execute("ROLLBACK")
    assert s.write([row(1)]) == []
    assert s.query("SELECT COUNT(*) FROM readings") == [(1,)]


def test_migrations_are_versioned_and_applied_once(tmp_path):
    path = tmp_path / "i.db"
    # A database left at version 1 by an older release.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE ingest_schema (version INTEGER PRIMARY KEY, what TEXT NOT NULL, applied_at REAL NOT NULL)")
    for stmt in sinks.MIGRATIONS[0].sqlite:
        db.execute(stmt)
    db.execute("INSERT INTO ingest_schema VALUES (1, 'x', 0)")
    db.execute("INSERT INTO readings VALUES ('old', 's', 1.0, 't', '{}', 'k', 2.0)")
    db.close()
    s = sinks.SqliteSink(path)
    s.connect()
    assert [v for v, in s.query("SELECT version FROM ingest_schema ORDER BY version")] == [1, 2]
    assert s.query("SELECT name FROM sqlite_master WHERE name = 'readings_sensor_ts'") == [("readings_sensor_ts",)]
    assert s.query("SELECT msg_id FROM readings") == [("old",)]
    s.close()
    s.connect()  # again: nothing to do
    assert s.query("SELECT COUNT(*) FROM ingest_schema") == [(2,)]
    s.db.execute(f"INSERT INTO ingest_schema VALUES ({sinks.SCHEMA_VERSION + 1}, 'future', 0)")
    s.close()
    with pytest.raises(sinks.SchemaTooNew):
        s.connect()


@pytest.mark.parametrize("text", ["plain", "it's", "back\\slash", 'q"uote', "nl\nnl", "nul\x00", "ünï😀", "\x1a\r"])
def test_mysql_literals_escape_like_pymysql(text):
    ours = sinks._q(text)
    theirs = pymysql.converters.escape_string(text)
    # '"' needs no escape inside '...'; ours leaves it alone when nothing else needs escaping.
    assert ours == theirs or ours.replace('"', '\\"') == theirs


def test_mysql_statements_are_split_and_rows_keep_their_order(monkeypatch):
    monkeypatch.setattr(sinks, "MAX_STATEMENT", 20_000)
    rows = [(f"m-{i}", "s", 1.5, "t", "{}", "k", 2.5) for i in range(5000)]
    stmts = sinks._multi_insert("INSERT INTO r VALUES ", " ON DUPLICATE KEY UPDATE msg_id = msg_id", rows)
    assert len(stmts) > 1 and all(len(s) <= sinks.MAX_STATEMENT for s in stmts)
    joined = "".join(stmts)
    assert joined.index("'m-0'") < joined.index("'m-2500'") < joined.index("'m-4999'")
    with pytest.raises(ValueError):
        sinks._literal_row(("m", "s", float("nan"), "t", "{}", "k", 1.0))


def test_puback_bytes_are_mqtt_3_1_1_pubacks_in_order():
    assert mqtttune.puback_bytes([1, 258, 65535]) == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02" + b"\x40\x02\xff\xff"
