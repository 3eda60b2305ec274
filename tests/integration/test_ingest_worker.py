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
from daemons.ingest.keys import Kind, SenderKey, new_key, parse_line
from daemons.ingest.signing import Signer, b64url, encode_body, make_sender
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
               keys: Path | None = None, key_files: tuple[Path, ...] = ()) -> subprocess.Popen:
        argv = [IOTCTL, "stress", "--config", str(self.config), "--messages", str(n), "--processes", str(processes),
                "--topic", topic, "--run-id", run, "--json", "--timeout", "120"]
        if keys:
            argv += ["--keys", str(keys)]
        for f in key_files:
            argv += ["--key", str(f)]
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
        return [ln for ln in proc.log().splitlines() if "status workers=1 worker=1 " in ln]

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


# -- ed1, rsa1, aes1 (issue 23) ---------------------------------------------------------------------


def keys_new(tmp_path: Path, kind: str, kid: str) -> tuple[Path, str]:
    """`iotctl keys new`: (the sender's key file, the keys-file line it printed)."""
    out = tmp_path / f"{kid}.key"
    r = subprocess.run([IOTCTL, "keys", "new", "--kind", kind, kid, "--out", str(out)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return out, r.stdout.strip()


@pytest.mark.parametrize("kind", ["hmac", "ed25519", "rsa", "aes"])
def test_iotctl_keys_new_writes_a_private_sender_file_and_a_line_that_loads(tmp_path, kind):
    from daemons.ingest.keys import load_sender_key, parse_keys  # noqa: PLC0415

    path, line = keys_new(tmp_path, kind, f"dev-{kind}")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert line.count("\n") == 0 and line.split()[:2] == [f"dev-{kind}", kind]
    entry = parse_keys(line, "printed")[f"dev-{kind}"]
    sender = load_sender_key(path)
    assert (sender.key_id, sender.kind) == (f"dev-{kind}", kind)
    if kind in ("ed25519", "rsa"):
        assert line not in path.read_text()  # the node's line holds the public key only
    else:
        assert entry == sender.entry and line in path.read_text()  # a shared secret: the same on both sides
    before = path.read_bytes()
    r = subprocess.run([IOTCTL, "keys", "new", "--kind", kind, f"dev-{kind}", "--out", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "never replaced" in r.stderr and path.read_bytes() == before
    r = subprocess.run([IOTCTL, "keys", "new", "--kind", kind, "bad/id", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 64 and "key id" in r.stderr


# What each stress run sends with, and the key id its rows carry.
STRESS_MODES = {
    "ed25519": (("ed25519",), "ed25519"),
    "rsa": (("rsa",), "rsa"),
    "aes": (("aes",), "aes"),
    "hmac+aes": (("hmac", "aes"), "hmac"),
    "ed25519+aes": (("ed25519", "aes"), "ed25519"),
    "rsa+aes": (("rsa", "aes"), "rsa"),
}


def test_iotctl_stress_with_every_kind_lands_exactly_once(broker_factory, daemon, node_factory, tmp_path):
    """One worker, senders of every kind on one topic at once: every message of each lands once,
    attributed to its key; a second copy of what landed (a replay) changes nothing."""
    n = 2000
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port)
    files = {}
    for kind in ("hmac", "ed25519", "rsa", "aes"):
        files[kind], line = keys_new(tmp_path, kind, f"st-{kind}")
        node.keys.write_text(node.keys.read_text() + line + "\n")
    start_ingest(daemon, node)
    loads = {mode: node.stress(n, mode.replace("+", "_"), key_files=tuple(files[k] for k in kinds))
             for mode, (kinds, _) in STRESS_MODES.items()}
    for mode, load in loads.items():
        finish(load, n)
    node.wait_rows(n * len(STRESS_MODES), 120)
    rows = node.rows()
    for mode, (_, signer) in STRESS_MODES.items():
        run = mode.replace("+", "_")
        mine = {k: r for k, r in rows.items() if k.startswith(run + "-")}
        assert set(mine) == stress_ids(run, n, 2), mode
        assert {r[5] for r in mine.values()} == {f"st-{signer}"}, mode
    assert node.dlq().entries == []


def _senders(tmp_path: Path) -> tuple[dict, str]:
    """In-process senders of every kind (as `iotctl keys new` makes them) and their keys-file text."""
    senders, lines = {}, []
    for kind in ("hmac", "ed25519", "rsa", "aes"):
        sender_line, node_line = new_key(Kind(kind), f"d-{kind}")
        kid, entry = parse_line(sender_line, "test", private=True)
        senders[kind] = SenderKey(kid, Kind(kind), entry)
        lines.append(node_line)
    return senders, "\n".join(lines) + "\n"


def test_every_kind_refused_lands_in_the_dlq_with_its_reason_and_the_envelope_as_received(
        broker_factory, daemon, node_factory, tmp_path):
    b = broker_factory(BROKER_LIMITS)
    node = node_factory(b.port)
    good, text = _senders(tmp_path)
    node.keys.write_text(text)
    other, _ = _senders(tmp_path)  # same key ids, other keys

    def body(i: str) -> bytes:
        return encode_body(i, "s/1", time.time(), {"a": 1})

    def send(kinds: tuple[str, ...], i: str, keys: dict = good) -> bytes:
        return make_sender([keys[k] for k in kinds])(body(i))

    def flip(p: bytes, at: int) -> bytes:
        return p[:at] + bytes([p[at] ^ 1]) + p[at + 1:]

    def sig_changed(p: bytes) -> bytes:
        at = p.index(b"\n") - 2
        return p[:at] + (b"A" if p[at:at + 1] != b"A" else b"B") + p[at + 1:]

    def key(kind: str, kid: str) -> SenderKey:
        _, entry = parse_line(new_key(Kind(kind), kid)[0], "t", private=True)
        return SenderKey(kid, Kind(kind), entry)

    bad: dict[bytes, str] = {}
    for kinds in (("ed25519",), ("rsa",), ("aes",), ("ed25519", "aes"), ("rsa", "aes"), ("hmac", "aes")):
        name = "-".join(kinds)
        outer = "bad-ciphertext" if "aes" in kinds else "bad-signature"
        p = send(kinds, f"{name}-tampered")
        bad[flip(p, len(p) - 20)] = outer
        bad[sig_changed(send(kinds, f"{name}-tag"))] = outer  # signature, or aes1's nonce
        p = send(kinds, f"{name}-trunc")
        bad[p[:-7]] = outer
        bad[p[:p.index(b"\n")]] = "bad-envelope"
        for k in kinds:  # one key at a time: wrong, unknown, of another kind
            inner = "bad-ciphertext" if k == "aes" else "bad-signature"
            p = send(kinds, f"{name}-wrong-{k}", {**good, k: other[k]})
            bad[p] = inner
            if kinds == ("ed25519", "aes") and k == "ed25519":
                wrong_inside = p
            bad[send(kinds, f"{name}-unknown-{k}", {**good, k: key(k, "nobody")})] = "unknown-key"
            # A key of another kind under a listed id: an AES key claiming the HMAC key's id, or
            # a signing key of another algorithm claiming this one's.
            impostor = key("aes", "d-hmac") if k == "aes" else key("hmac" if k != "hmac" else "rsa", f"d-{k}")
            bad[send(kinds, f"{name}-kind-{k}", {**good, k: impostor})] = "wrong-key-kind"
    # A nonce used again for another message: the first lands, the second is refused.
    nonce = os.urandom(12)
    aes = good["aes"].entry.obj

    def seal(i: str) -> bytes:
        header = b"aes1 d-aes " + b64url(nonce) + b"\n"
        return header + aes.encrypt(nonce, body(i), header)

    first, second = seal("nonce-1"), seal("nonce-2")
    bad[second] = "nonce-reused"
    oks = [send(kinds, f"ok-{'-'.join(kinds)}") for kinds in (("ed25519",), ("rsa",), ("aes",), ("rsa", "aes"))]
    start_ingest(daemon, node)
    publish(b.port, [first, *oks, *bad])
    node.wait_rows(1 + len(oks))
    wait_for(lambda: len(node.dlq().entries) >= len(bad), 20, what=f"{len(bad)} DLQ entries")
    got = {e.payload: e.reason for e in node.dlq().entries}
    assert got == bad  # byte for byte as received, each with its reason
    assert all(e.topic == "sensors/t" and e.detail for e in node.dlq().entries)
    detail = next(e.detail for e in node.dlq().entries if e.payload == wrong_inside)
    assert detail.startswith("inside aes1 (key 'd-aes'): Ed25519 with key 'd-ed25519' does not verify"), detail
    # The nonce rule is a tripwire, not a verdict on the reading: the operator may land it.
    r = node.ctl("dlq", "replay", "--reason", "nonce-reused")
    assert r.returncode == 0 and "1 landed" in r.stdout, r.stdout + r.stderr
    assert "nonce-2" in node.rows()


def test_iotctl_stress_says_which_key_it_cannot_use(tmp_path):
    from tests.support import free_port  # noqa: PLC0415

    node = Node(tmp_path, free_port())
    ed, ed_line = keys_new(tmp_path, "ed25519", "e1")
    rsa, _ = keys_new(tmp_path, "rsa", "r1")
    node.keys.write_text(ed_line + "\n")  # public keys only: nothing to sign with
    r = node.ctl("stress", "--messages", "10", timeout=60)
    assert r.returncode == 78 and "no hmac key" in r.stderr, r.stderr
    r = node.ctl("stress", "--messages", "10", "--key-id", "e1", timeout=60)
    assert r.returncode == 78 and "--key FILE" in r.stderr, r.stderr
    r = node.ctl("stress", "--messages", "10", "--key", str(ed), "--key", str(rsa), timeout=60)
    assert r.returncode == 78 and "one signing key" in r.stderr, r.stderr
    r = node.ctl("stress", "--messages", "10", "--key", str(ed), "--key-id", "e1", timeout=60)
    assert r.returncode == 64, r.stderr
    os.chmod(ed, 0o644)
    r = node.ctl("stress", "--messages", "10", "--key", str(ed), timeout=60)
    assert r.returncode == 78 and "chmod 600" in r.stderr, r.stderr
