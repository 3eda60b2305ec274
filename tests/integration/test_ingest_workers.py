"""Three iot-ingest workers in one shared-subscription group ([ingest] workers = 3): 300,000
signed readings from `iotctl stress`, one worker killed with -9 halfway, and every reading lands
exactly once, on SQLite (three writers on one file) and on MariaDB. Against our broker the dead
worker stays dead: what it had not acknowledged goes to the others. Against Mosquitto 2 (which
keeps such messages in the dead worker's session) it is started again, as supervisord or
systemd would."""

from __future__ import annotations

import re

import pytest

from tests.integration.test_ingest_worker import (  # noqa: F401 - node_factory is a fixture
    db_toml,
    finish,
    node_factory,
    publish,
    stress_ids,
)
from tests.support import Mosquitto, wait_for

pytestmark = pytest.mark.slow

N = 300_000
WORKERS = 3
# Batches of up to a second: each worker always holds messages it has not acknowledged, so the
# kill leaves some behind whenever it lands (with the default, quick batches it can land just
# after a worker acknowledged everything, and proves nothing).
WORKERS_TOML = "workers = 3\nbatch_size = 5000\nbatch_wait = 1.0\nbatch_idle = 0.5\n"


def start_workers(daemon, node) -> list:
    return [daemon("iot-ingest", "--config", str(node.config), "--worker", str(i))[0]
            for i in range(1, WORKERS + 1)]


def run(daemon, node, port: int, restart_killed: bool) -> list:
    procs = start_workers(daemon, node)
    publish(port, [b"not signed %d" % i for i in range(6)], topic="sensors/bad")  # to the DLQ, spread over workers
    load = node.stress(N, "w3", processes=4)
    wait_for(lambda: node.count() >= N // 2, 180, 0.05, what="half the rows before the kill")
    procs[1].kill()  # worker 2, SIGKILL
    assert node.count() < N, "the kill should land mid-run"
    if restart_killed:
        procs[1] = daemon("iot-ingest", "--config", str(node.config), "--worker", "2")[0]
    finish(load, N)
    node.wait_rows(N, 240)
    assert set(node.rows()) == stress_ids("w3", N, 4)
    wait_for(lambda: len(node.dlq().entries) >= 6, 30, what="the six bad messages in the DLQ")
    assert len(node.dlq().entries) == 6
    listed = node.ctl("dlq", "list")
    assert listed.returncode == 0 and "6 entries" in listed.stderr
    assert all(re.fullmatch(r"\d{13}-w[123]-\d+-\d{4}\.\d+", e.id) for e in node.dlq().entries)
    for i, p in enumerate(procs, 1):
        if p.running():
            assert f"as {node.cfg().mqtt.client_id_prefix}-ingest-{i} (worker {i} of 3)" in p.log()
    return procs


def test_three_workers_one_killed_9_halfway_every_row_exactly_once(broker_factory, daemon, node_factory, db_toml):
    b = broker_factory("max_queued_messages = 1000000\nsys_interval = 0\n")
    node = node_factory(b.port, db_toml, extra=WORKERS_TOML)
    procs = run(daemon, node, b.port, restart_killed=False)
    assert "handed to other members" in b.proc.log()
    for i in (1, 3):  # the survivors did the work, and their status lines say which they are
        assert re.search(rf"status workers=3 worker={i} .*landed=\d+", procs[i - 1].log()), procs[i - 1].log()
    assert "messages dropped" not in b.proc.log()


def test_three_workers_against_mosquitto(tmp_path, daemon, node_factory):
    m = Mosquitto(tmp_path)
    m.conf.write_text(m.conf.read_text() + "max_inflight_messages 2000\nmax_queued_messages 0\n")
    m.start()
    try:
        node = node_factory(m.port, extra=WORKERS_TOML)
        run(daemon, node, m.port, restart_killed=True)
    finally:
        m.stop()
