"""iot-ingest end to end, as real processes: our broker or Mosquitto, the worker under a real
NOTIFY_SOCKET, `iotctl stress` as the load, SQLite or a private MariaDB as the database.

What "exactly once" means here: the set of message ids in the table equals the set published,
and rows that landed before a crash or a redelivery are byte-for-byte unchanged after it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest

from daemons import config
from daemons.config import MqttConfig
from daemons.ingest import dlq as dlqmod
from daemons.ingest.signing import Signer, encode_body
from daemons.ingest.sinks import open_sink
from daemons.ingest.worker import dlq_path
from daemons.mqttclient import MqttClient
from daemons.service import Log
from tests.support import BIN, Mosquitto, wait_for

pytestmark = pytest.mark.slow

IOTCTL = str(BIN / "iotctl")
KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))
SIGNER = Signer("k1", KEY)
LOG = Log("test")
# The broker lets a window of 2 batches be in flight to the worker and queues the rest.
BROKER_LIMITS = "max_inflight_messages = 2000\nmax_queued_messages = 1000000\nsys_interval = 0\n"


class Node:
    """One test's ingest setup: config and keys files, and ways to look at what landed."""

    def __init__(self, tmp_path: Path, port: int, db_toml: str = "", extra: str = ""):
        self.dir = tmp_path
        self.port = port
        self.keys = tmp_path / "ingest.keys"
        self.keys.write_text(f"k1 {KEY.hex()}\n")
        os.chmod(self.keys, 0o600)
        self.config = tmp_path / "ingest.toml"
        self.config.write_text(
            f'[paths]\nstate_dir = "{tmp_path / "var"}"\n'
            f'[mqtt]\nport = {port}\nreconnect_min = 0.1\nreconnect_max = 1.0\nclient_id_prefix = "t{uuid.uuid4().hex[:6]}"\n'
            f'[ingest]\nkeys_file = "{self.keys}"\nretry_min = 0.1\nretry_max = 1.0\n{db_toml}{extra}')
        self._sink = None

    def cfg(self) -> config.Config:
        return config.load(self.config)

    def query(self, sql: str) -> list[tuple]:
        if self._sink is None:
            self._sink = open_sink(self.cfg())
        try:
            return self._sink.query(sql)
        except Exception:
            self._sink.close()
            self._sink = None
            raise

    def count(self) -> int:
        try:
            return self.query("SELECT COUNT(*) FROM readings")[0][0]
        except Exception:  # noqa: BLE001 - table not created yet, or the database is down
            return -1

    def rows(self) -> dict[str, tuple]:
        return {r[0]: r for r in self.query("SELECT * FROM readings")}

    def wait_rows(self, n: int, timeout: float = 60.0) -> None:
        wait_for(lambda: self.count() >= n, timeout, 0.1, what=f"{n} rows (have {self.count()})")
        assert self.count() == n

    def dlq(self) -> dlqmod.Scan:
        return dlqmod.read_all(dlq_path(self.cfg()))

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([IOTCTL, *args, "--config", str(self.config)], capture_output=True, text=True,
                              timeout=timeout)

    def stress(self, n: int, run: str, processes: int = 2, topic: str = "sensors/stress",
               keys: Path | None = None) -> subprocess.Popen:
        argv = [IOTCTL, "stress", "--config", str(self.config), "--messages", str(n), "--processes", str(processes),
                "--topic", topic, "--run-id", run, "--json", "--timeout", "120"]
        if keys:
            argv += ["--keys", str(keys)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


def stress_ids(run: str, n: int, processes: int) -> set[str]:
    per, extra = divmod(n, processes)
    return {f"{run}-{i}-{s}" for i in range(processes) for s in range(per + (1 if i < extra else 0))}


def finish(p: subprocess.Popen, n: int) -> dict:
    out, err = p.communicate(timeout=150)
    assert p.returncode == 0, err
    result = json.loads(out)
    assert result["sent"] == result["acked"] == n, result
    return result


def reading(i: int, run: str = "r", signer: Signer = SIGNER, **values) -> bytes:
    return signer.sign(encode_body(f"{run}-{i}", "s/1", time.time(), values or {"temp": 20.0 + i}))


def publish(port: int, payloads: list[bytes], topic: str = "sensors/t") -> None:
    c = MqttClient(MqttConfig(port=port), f"pub-{uuid.uuid4().hex[:8]}", log=LOG, max_inflight=0)
    c.start()
    assert c.wait_connected(10)
    try:
        infos = [c.publish(topic, p, 1) for p in payloads]
        for info in infos:
            info.wait_for_publish(20)
        assert all(i.is_published() for i in infos)
    finally:
        c.stop()


@pytest.fixture(params=["sqlite", "mariadb"])
def db_toml(request) -> str:
    if request.param == "sqlite":
        return ""
    return request.getfixturevalue("mariadb").ingest_toml()


@pytest.fixture
def node_factory(tmp_path):
    made: list[Node] = []

    def make(port: int, db: str = "", extra: str = "") -> Node:
        n = Node(tmp_path, port, db, extra)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def start_ingest(daemon, node: Node, env: dict[str, str] | None = None):
    return daemon("iot-ingest", "--config", str(node.config), env=env)


# -- tests ---------------------------------------------------------------------------------------


def test_redelivered_messages_change_nothing(broker_factory, daemon, node_factory, db_toml):
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port, db_toml)
    proc, notify = start_ingest(daemon, node)
    payloads = [reading(i) for i in range(300)]
    publish(b.port, payloads)
    node.wait_rows(300)
    before = node.rows()
    publish(b.port, payloads)  # what a redelivery after a lost ack looks like to the worker
    publish(b.port, [reading(9999)])  # processed in order: once it lands, the copies were handled
    node.wait_rows(301)
    after = node.rows()
    assert {k: after[k] for k in before} == before
    assert node.dlq().entries == []
    assert proc.running()


def kill_9_mid_stream(daemon, node: Node, env: dict[str, str] | None = None) -> list[str]:
    """30,000 readings; iot-ingest killed with -9 mid-stream and started again: every message
    lands exactly once, and what landed before the kill is unchanged. Returns both logs."""
    n = 30_000
    proc, _ = start_ingest(daemon, node, env)
    load = node.stress(n, "k9")
    wait_for(lambda: node.count() >= 5000, 60, 0.02, what="5000 rows before the kill")
    proc.kill()  # SIGKILL: no graceful anything
    landed_before = node.rows()
    assert 5000 <= len(landed_before) < n, "the kill should land mid-stream"
    proc2, _ = start_ingest(daemon, node, env)
    finish(load, n)
    node.wait_rows(n, 90)
    after = node.rows()
    assert set(after) == stress_ids("k9", n, 2)
    assert {k: after[k] for k in landed_before} == landed_before
    assert node.dlq().entries == []
    return [proc.log(), proc2.log()]


def test_kill_9_mid_stream_then_restart_lands_every_message_exactly_once(broker_factory, daemon, node_factory,
                                                                        db_toml):
    b = broker_factory(BROKER_LIMITS)
    logs = kill_9_mid_stream(daemon, node_factory(b.port, db_toml))
    assert all("paho receive path tuned" in log for log in logs)  # the path that ships is the one tested


def test_the_stock_paho_receive_path_keeps_the_same_promises(broker_factory, daemon, node_factory):
    """The fallback taken when a paho release no longer matches daemons/mqtttune.py."""
    b = broker_factory(BROKER_LIMITS)
    logs = kill_9_mid_stream(daemon, node_factory(b.port), env={"IOT_PAHO_STOCK": "1"})
    assert all("paho receive path stock" in log for log in logs)


def test_against_mosquitto_kill_9_and_restart(tmp_path, daemon, node_factory):
    m = Mosquitto(tmp_path)
    m.conf.write_text(m.conf.read_text() + "max_inflight_messages 2000\nmax_queued_messages 0\n")
    m.start()
    try:
        node = node_factory(m.port)
        proc, _ = start_ingest(daemon, node)
        load = node.stress(20_000, "mq")
        wait_for(lambda: node.count() >= 3000, 60, 0.02, what="3000 rows before the kill")
        proc.kill()
        start_ingest(daemon, node)
        finish(load, 20_000)
        node.wait_rows(20_000, 90)
        assert set(node.rows()) == stress_ids("mq", 20_000, 2)
    finally:
        m.stop()


def test_small_broker_window_still_flows(broker_factory, daemon, node_factory):
    """With the broker's default in-flight limit (20) a batch never fills: the idle rule writes
    what came instead of waiting batch_wait for rows that cannot come. With batch_wait at 60 s,
    1000 messages would take 50 minutes without it."""
    b = broker_factory()
    node = node_factory(b.port, extra="batch_wait = 60.0\n")
    start_ingest(daemon, node)
    publish(b.port, [reading(i) for i in range(1000)])  # within the broker's default queue (1000)
    node.wait_rows(1000, 60)


def test_bad_messages_go_to_the_dlq_with_their_reason_and_replay_after_a_fix(broker_factory, daemon, node_factory):
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port, extra="max_payload = 4096\n")
    proc, _ = start_ingest(daemon, node)
    k2 = Signer("k2", OTHER_KEY)
    bad = {
        "bad-signature": Signer("k1", OTHER_KEY).sign(encode_body("bs-1", "s", time.time(), {"a": 1})),
        "unknown-key": k2.sign(encode_body("uk-1", "s", time.time(), {"a": 1})),
        "bad-json": SIGNER.sign(b'{"id": "bj-1", "sensor": '),
        "bad-schema": SIGNER.sign(b'{"id": "wt-1", "sensor": "s", "ts": "yesterday", "values": {"a": 1}}'),
        "oversized": SIGNER.sign(encode_body("big-1", "s", time.time(), {f"v{i:03d}": 1.0 for i in range(64)})
                                 + b" " * 5000),
        "bad-envelope": b"\xff\xfe plain binary, no signature \x00",
    }
    publish(b.port, [reading(i) for i in range(5)] + list(bad.values()) + [reading(i) for i in range(5, 10)])
    node.wait_rows(10)
    wait_for(lambda: len(node.dlq().entries) == len(bad), 10, what="DLQ entries")
    entries = {e.reason: e for e in node.dlq().entries}
    assert set(entries) == set(bad)
    for reason, payload in bad.items():
        assert entries[reason].payload == payload and entries[reason].topic == "sensors/t"
        assert entries[reason].detail
    # The worker keeps going.
    assert proc.running()
    publish(b.port, [reading(10)])
    node.wait_rows(11)

    r = node.ctl("dlq", "list")
    assert r.returncode == 0 and r.stdout.count("\n") == len(bad)
    r = node.ctl("dlq", "show", entries["bad-envelope"].id)
    assert r.returncode == 0 and json.loads(r.stdout)["payload_b64"]

    # The fix: the new key is added. Replay lands what now validates and removes only that.
    node.keys.write_text(node.keys.read_text() + f"k2 {OTHER_KEY.hex()}\n")
    r = node.ctl("dlq", "replay")
    assert r.returncode == 1 and "1 landed" in r.stdout, r.stdout + r.stderr
    assert "uk-1" in {k for k in node.rows()}
    left = {e.reason for e in node.dlq().entries}
    assert left == set(bad) - {"unknown-key"}
    r = node.ctl("dlq", "replay")  # idempotent: nothing more lands, nothing is lost
    assert "0 landed" in r.stdout and {e.reason for e in node.dlq().entries} == left
    assert node.ctl("dlq", "purge", "--reason", "oversized").returncode == 0
    assert {e.reason for e in node.dlq().entries} == left - {"oversized"}
    assert node.count() == 12


def test_rows_the_database_refuses_go_to_the_dlq_and_land_after_the_fix(broker_factory, daemon, node_factory):
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port)
    start_ingest(daemon, node)
    publish(b.port, [reading(0)])
    node.wait_rows(1)
    node.query("SELECT 1")
    node._sink.db.execute("CREATE TRIGGER retire BEFORE INSERT ON readings WHEN NEW.sensor_id = 'retired' "
                          "BEGIN SELECT RAISE(ABORT, 'sensor retired'); END")
    refused = SIGNER.sign(encode_body("ref-1", "retired", time.time(), {"a": 1}))
    publish(b.port, [reading(1), refused, reading(2)])
    node.wait_rows(3)
    wait_for(lambda: len(node.dlq().entries) == 1, 10, what="the refused row in the DLQ")
    e = node.dlq().entries[0]
    assert (e.reason, e.msg_id, e.payload) == ("db-refused", "ref-1", refused) and "sensor retired" in e.detail
    node._sink.db.execute("DROP TRIGGER retire")
    r = node.ctl("dlq", "replay")
    assert r.returncode == 0 and "1 landed" in r.stdout, r.stdout + r.stderr
    assert node.dlq().entries == [] and "ref-1" in node.rows()


def test_dlq_survives_kill_9_while_being_written(broker_factory, daemon, node_factory, tmp_path):
    n = 6000
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port)
    wrong = tmp_path / "wrong.keys"
    wrong.write_text(f"k1 {OTHER_KEY.hex()}\n")
    os.chmod(wrong, 0o600)
    proc, _ = start_ingest(daemon, node)
    load = node.stress(n, "dq", keys=wrong)  # every message has a bad signature
    wait_for(lambda: len(node.dlq().entries) >= 1000, 60, 0.02, what="DLQ being written")
    proc.kill()
    start_ingest(daemon, node)
    finish(load, n)

    def ids() -> set[str]:
        return {json.loads(e.payload.split(b"\n", 1)[1])["id"] for e in node.dlq().entries}

    wait_for(lambda: len(ids()) == n, 90, 0.2, what="every bad message in the DLQ")
    scan = node.dlq()
    assert ids() == stress_ids("dq", n, 2)
    assert scan.corrupt == 0 and all(e.reason == "bad-signature" for e in scan.entries)
    # A message in the DLQ but not yet acknowledged when killed is delivered again and kept again.
    assert n <= len(scan.entries) <= n + 4000
    assert node.count() == 0
    r = node.ctl("dlq", "list")
    assert r.returncode == 0 and r.stdout.count("\n") == len(scan.entries)


def test_status_line_every_10000_records_and_in_sd_notify(broker_factory, daemon, node_factory):
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port)
    proc, notify = start_ingest(daemon, node)
    finish(node.stress(20_000, "st"), 20_000)
    node.wait_rows(20_000)
    def lines() -> list[str]:
        return [ln for ln in proc.log().splitlines() if "status workers=1" in ln]

    wait_for(lambda: any("landed=20000 " in ln for ln in lines()), 10, what="the line at 20,000")
    landed = [int(re.search(r"landed=(\d+)", ln).group(1)) for ln in lines()]
    assert len(landed) == 2 and 10_000 <= landed[0] < 20_000 and landed[1] == 20_000, landed  # one per 10,000
    lines = lines()
    assert re.search(r"queue=\d+ landed=\d+ dlq=0 latency_avg=\d+ms rate=\d+/s", lines[-1])
    wait_for(lambda: any(m.startswith("STATUS=workers=1") and "landed=20000" in m for m in notify.drain(0.2)),
             15, what="STATUS= with the summary")


def test_status_file_has_the_counters_for_the_dashboards_node_view(broker_factory, daemon, node_factory):
    from daemons.factory.dashboard.node import Node as NodeView  # noqa: PLC0415
    from daemons.ingest.worker import status_path  # noqa: PLC0415

    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port)
    proc, _ = start_ingest(daemon, node)
    path = status_path(node.cfg())
    wait_for(path.exists, 10, what="the status file")
    view = NodeView(node.cfg())
    first = view.ingest()
    assert first["running"] and first["connected"] and first["landed"] == 0 and first["dlq_entries"] == 0
    publish(b.port, [reading(i) for i in range(10)] + [b"not signed"] * 2)
    node.wait_rows(10)

    def counted() -> bool:
        s = orjson.loads(path.read_bytes())
        return (s["landed"], s["dlq"]) == (10, 2)

    wait_for(counted, 10, what="landed=10 dlq=2 in the status file")
    now = view.ingest()
    assert (now["landed"], now["rejected"], now["dlq_entries"]) == (10, 2, 2) and now["rate"] > 0
    assert now["dlq_bytes"] == sum(p.stat().st_size for p in dlqmod.segments(dlq_path(node.cfg())))
    proc.stop()
    assert orjson.loads(path.read_bytes())["landed"] == 10  # left behind: readers judge it by its age


def test_iotctl_stress_and_dlq_exit_codes(tmp_path):
    from tests.support import free_port

    node = Node(tmp_path, free_port())  # nothing listens there
    r = node.ctl("stress", "--messages", "10", "--processes", "2", timeout=60)
    assert r.returncode == 69, r.stdout + r.stderr  # broker unavailable
    assert node.ctl("dlq", "purge").returncode == 64  # purge must be told what
    r = node.ctl("dlq", "list")
    assert r.returncode == 0 and r.stdout == ""
    os.chmod(node.keys, 0o644)
    r = node.ctl("stress", "--messages", "10", timeout=60)
    assert r.returncode == 78 and "chmod 600" in r.stderr


def test_worker_refuses_a_keys_file_others_can_read(daemon, tmp_path):
    from tests.support import free_port

    node = Node(tmp_path, free_port())
    os.chmod(node.keys, 0o644)
    proc, _ = daemon("iot-ingest", "--config", str(node.config), ready=False)
    assert proc.wait(15) == 78 and "chmod 600" in proc.log()


def test_ingest_down_with_its_queue_full_holds_the_publishers_and_loses_nothing(broker_factory, daemon,
                                                                                node_factory):
    """The broker's queue for iot-ingest's persistent session fills while the worker is dead:
    the broker holds the publishers back instead of acknowledging and dropping (it dropped
    96,400 of 200,000 acknowledged messages once). Every message lands exactly once."""
    n = 30_000
    b = broker_factory("max_queued_messages = 5000\nsys_interval = 0\npersistence = false\n")
    node = node_factory(b.port)
    proc, _ = start_ingest(daemon, node)
    load = node.stress(n, "full", processes=4)
    wait_for(lambda: node.count() >= 2000, 60, 0.02, what="2000 rows before the kill")
    proc.kill()
    wait_for(lambda: "publisher held back" in b.proc.log(), 60, what="the broker to hold the publishers back")
    assert load.poll() is None  # the publishers wait: what is not acknowledged is not theirs to forget
    start_ingest(daemon, node)
    finish(load, n)
    node.wait_rows(n, 120)
    assert set(node.rows()) == stress_ids("full", n, 4)
    assert "messages dropped" not in b.proc.log()


# -- the 200,000-message scenario of issue 17, on the shipped defaults (SQLite, our broker with
# its persistence and its window for iot-ingest) ------------------------------------------------


def test_200000_messages_ingest_killed_9_mid_run_every_row_exactly_once(broker_factory, daemon, node_factory):
    n = 200_000
    b = broker_factory("sys_interval = 0\n")
    node = node_factory(b.port)
    proc, _ = start_ingest(daemon, node)
    load = node.stress(n, "big", processes=4)
    wait_for(lambda: node.count() >= 20_000, 120, 0.05, what="20,000 rows before the kill")
    proc.kill()
    landed_before = node.rows()
    assert len(landed_before) < n, "the kill should land mid-run"
    start_ingest(daemon, node)
    finish(load, n)
    node.wait_rows(n, 240)
    after = node.rows()
    assert set(after) == stress_ids("big", n, 4)
    assert {k: after[k] for k in landed_before} == landed_before
    assert "messages dropped" not in b.proc.log()


def test_200000_messages_broker_killed_9_mid_run_every_row_exactly_once(broker_factory, daemon, node_factory):
    """The broker dies with -9 and comes back on the same port: the publishers (paho) send
    again what it had not acknowledged, iot-ingest reconnects to its persistent session, and
    what the broker had acknowledged comes from its store."""
    n = 200_000
    b = broker_factory("sys_interval = 0\n")
    node = node_factory(b.port)
    start_ingest(daemon, node)
    load = node.stress(n, "bk", processes=4)
    wait_for(lambda: node.count() >= 20_000, 120, 0.05, what="20,000 rows before the kill")
    b.proc.kill()
    assert node.count() < n, "the kill should land mid-run"
    b2 = broker_factory("sys_interval = 0\n", port=b.port)
    result = finish(load, n)
    node.wait_rows(n, 240)
    assert set(node.rows()) == stress_ids("bk", n, 4)
    assert "store opened" in b2.proc.log()
    assert result["errors"] == []
