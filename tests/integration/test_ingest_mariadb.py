"""iot-ingest with a real MariaDB (a private mariadbd per test): outage mid-stream, refusals,
migrations, and the TLS + password-file connection path with a real user."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from daemons.config import IngestConfig
from daemons.ingest import sinks
from tests.integration.test_ingest_worker import (  # noqa: F401 - node_factory is a fixture
    finish,
    node_factory,
    start_ingest,
    stress_ids,
)
from tests.mariadb import MariaDB
from tests.support import wait_for

pytestmark = pytest.mark.slow


def sink_for(m: MariaDB, **over) -> sinks.MysqlSink:
    cfg = IngestConfig(backend="mysql", mysql_host="127.0.0.1", mysql_port=m.port, mysql_user=m.user,
                       mysql_password=m.password, mysql_database=m.database, mysql_timeout=5.0)
    return sinks.MysqlSink(dataclasses.replace(cfg, **over))


def row(i: int, sensor: str = "s1") -> tuple:
    return (f"m-{i}", sensor, 1_700_000_000.0 + i, "sensors/ä'\\b", '{"t":1.5,"n":"x\\"y"}', "k1")


def test_database_stopped_and_restarted_mid_stream_loses_nothing(broker_factory, daemon, node_factory, mariadb):
    n = 20_000
    b = broker_factory("max_inflight_messages = 10000\nmax_queued_messages = 1000000\nsys_interval = 0\n")
    node = node_factory(b.port, mariadb.ingest_toml(), extra="max_unacked = 3000\n")
    proc, notify = start_ingest(daemon, node)
    load = node.stress(n, "out")
    wait_for(lambda: node.count() >= 3000, 60, 0.02, what="3000 rows before the outage")
    mariadb.stop()

    def statuses(since: int = 0) -> list[str]:
        return [m for m in notify.drain(0.1)[since:] if m.startswith("STATUS=")]

    def held(since: int) -> list[int]:
        return [int(x) for s in statuses(since) for x in re.findall(r"holding (\d+) unacked", s)]

    wait_for(lambda: any("database unavailable" in s for s in statuses()), 30, what="STATUS= saying the database is down")
    # The stream goes on; nothing is acknowledged, the broker keeps it. The worker takes what
    # comes until it holds max_unacked (3000, minus at most the batch in hand) and no more.
    wait_for(lambda: max(held(0), default=0) >= 2000, 60, what="the worker to hold its bound of unacked messages")
    mark = len(notify.messages)
    wait_for(lambda: len(held(mark)) >= 3, 30, what="three more retries while the database is down")
    assert max(held(0)) <= 3000, held(0)  # bounded by max_unacked, not by the stream
    assert proc.running()
    mariadb.start()
    mark = len(notify.messages)
    finish(load, n)
    node.wait_rows(n, 90)
    assert set(node.rows()) == stress_ids("out", n, 2)
    assert node.dlq().entries == []
    wait_for(lambda: any("database unavailable" not in s for s in statuses(mark)), 15,
             what="STATUS= back to normal after the restart")
    assert "database back" in proc.log()


def test_mysql_upsert_idempotent_refusals_and_versioned_migrations(mariadb):
    s = sink_for(mariadb)
    assert s.write([row(1), row(2)]) == []
    before = s.query("SELECT * FROM readings ORDER BY msg_id")
    assert before[0][3] == "sensors/ä'\\b" and before[0][4] == '{"t":1.5,"n":"x\\"y"}'  # escaping round-trips
    assert s.write([row(1), row(3)]) == []
    assert s.query("SELECT * FROM readings ORDER BY msg_id")[:2] == before
    assert [v for v, in s.query("SELECT version FROM ingest_schema ORDER BY version")] == [1, 2]

    mariadb.query("ALTER TABLE readings ADD CONSTRAINT not_retired CHECK (sensor_id <> 'retired')")
    refused = s.write([row(4), row(5, "retired"), row(6)])
    assert [i for i, _ in refused] == [1] and "4025" in refused[0][1]
    assert {r[0] for r in s.query("SELECT msg_id FROM readings")} == {"m-1", "m-2", "m-3", "m-4", "m-6"}
    s.close()

    mariadb.query(f"INSERT INTO ingest_schema VALUES ({sinks.SCHEMA_VERSION + 1}, 'future', 0)")
    with pytest.raises(sinks.SchemaTooNew):
        sink_for(mariadb).connect()


def test_mysql_outage_is_unavailable_never_refused(mariadb):
    s = sink_for(mariadb)
    assert s.write([row(1)]) == []
    mariadb.kill()  # a crash, not a clean stop
    with pytest.raises(sinks.Unavailable):
        s.write([row(2)])
    mariadb.start()
    assert s.write([row(2)]) == []
    assert s.query("SELECT COUNT(*) FROM readings") == [(2,)]


def _certs(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=iot-test-ca")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days",
        "2", "-subj", "/CN=someone-else")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "san.ext")


def test_mysql_over_tls_with_a_password_file_and_a_user_that_requires_tls(tmp_path):
    _certs(tmp_path)
    (tmp_path / "db").mkdir()
    m = MariaDB(tmp_path / "db", options=(f"--ssl-ca={tmp_path / 'ca.pem'}", f"--ssl-cert={tmp_path / 'server.pem'}",
                                          f"--ssl-key={tmp_path / 'server.key'}")).start()
    try:
        m.query("CREATE USER 'tlsonly'@'127.0.0.1' IDENTIFIED BY 'pw-from-file' REQUIRE SSL")
        m.query(f"GRANT ALL ON `{m.database}`.* TO 'tlsonly'@'127.0.0.1'")
        pwfile = tmp_path / "mysql.pw"
        pwfile.write_text("pw-from-file\n")
        s = sink_for(m, mysql_user="tlsonly", mysql_password="", mysql_password_file=pwfile,
                     mysql_cafile=tmp_path / "ca.pem")
        assert s.write([row(1)]) == []
        cipher = s.query("SHOW SESSION STATUS LIKE 'Ssl_cipher'")[0][1]
        assert cipher, "not encrypted"
        assert "tls" in s.describe() and "pw-from-file" not in s.describe()
        s.close()
        # A server whose certificate the configured CA did not sign is refused: an outage to
        # retry (and say so), not a reason to drop data.
        with pytest.raises(sinks.Unavailable, match="certificate verify failed"):
            sink_for(m, mysql_user="tlsonly", mysql_password_file=pwfile,
                     mysql_cafile=tmp_path / "other-ca.pem").connect()
    finally:
        m.stop()
