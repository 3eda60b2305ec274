"""The README's run command: `iotctl up` runs the whole set under real supervisord with the
checkout's etc/ and var/ layout, says where the broker is only once supervisord reports every
program RUNNING, keeps the flows going through a kill -9, and stops everything on Ctrl-C."""

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from daemons import config, supervise
from tests.support import BIN, ROOT, free_port, wait_for

IOTCTL = str(BIN / "iotctl")


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([IOTCTL, *args], capture_output=True, text=True, timeout=timeout)


def drop(outbox: Path, name: str, data: bytes) -> None:
    tmp = outbox / f".{name}.tmp"  # dot-files are ignored until renamed in
    tmp.write_bytes(data)
    tmp.rename(outbox / name)


def rows(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        try:
            return c.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_iotctl_up_runs_the_set_keeps_flows_through_kill_9_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    var = tmp_path / "var"
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{var}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
                   f'[mqtt]\nport = {port}\n[factory]\ndashboard_port = {free_port()}\n')
    shutil.copy(ROOT / "etc/iot/ingest.keys", tmp_path / "ingest.keys")
    os.chmod(tmp_path / "ingest.keys", 0o600)
    out = tmp_path / "up.out"
    with open(out, "wb") as f:
        up = subprocess.Popen([IOTCTL, "up", "--config", str(cfg)], stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(lambda: b"stop: Ctrl-C" in out.read_bytes() or up.poll() is not None, 60, what="iotctl up ready")
        assert up.poll() is None, out.read_text()
        assert f"broker: mqtt://127.0.0.1:{port}" in out.read_text()
        st = ctl("status", "--config", str(cfg))
        assert st.returncode == 0, st.stdout + st.stderr
        # the node's daemons, one PLC, and the factory: its devices in one process, controller, observer, dashboard
        assert st.stdout.count("RUNNING") == len(supervise.programs(config.load(cfg))) == len(supervise.PROGRAMS) + 5
        assert "factory dashboard: http://127.0.0.1:" in out.read_text()
        # each daemon's STATUS= line, as systemctl would show it: supervisord has none of its own
        def broker_row() -> str:
            return next(line for line in ctl("status", "--config", str(cfg)).stdout.splitlines()
                        if line.startswith("iot-broker "))
        wait_for(lambda: " clients=" in broker_row(), 30, what="the broker's status line in iotctl status")
        assert "RUNNING" in broker_row() and " msgs_in=" in broker_row()

        # the simulated PLC's readings reach iot-dbsub's database, seq after seq
        wait_for(lambda: rows(var / "db/sensors.db") >= 2, 30, interval=0.2, what="2 PLC readings stored")
        r = ctl("readings", "--config", str(cfg), "--last", "2")
        assert r.returncode == 0 and r.stdout.count("  line1  seq=") == 2, r.stdout + r.stderr

        # a file dropped in the outbox arrives in var/transfer
        blob = os.urandom(700_000)
        drop(var / "outbox", "first.bin", blob)
        wait_for(lambda: (var / "transfer/first.bin").exists(), 60, interval=0.2, what="first.bin delivered")
        assert (var / "transfer/first.bin").read_bytes() == blob

        # a signed reading reaches the database
        r = ctl("stress", "--config", str(cfg), "--messages", "50", "--processes", "1", "--topic", "sensors/up")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: rows(var / "db/ingest.db") == 50, 30, interval=0.2, what="50 rows")

        # kill -9 of a daemon: supervisord restarts it and the flow recovers
        sup = supervise.rpc(config.load(cfg)).supervisor
        for name in ("iot-transfer-recv", "iot-ingest"):
            os.kill(sup.getProcessInfo(name)["pid"], signal.SIGKILL)
        drop(var / "outbox", "second.bin", blob[::-1])
        r = ctl("stress", "--config", str(cfg), "--messages", "50", "--processes", "1", "--topic", "sensors/up")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: (var / "transfer/second.bin").exists(), 90, interval=0.2, what="second.bin after kill -9")
        assert (var / "transfer/second.bin").read_bytes() == blob[::-1]
        wait_for(lambda: rows(var / "db/ingest.db") == 100, 60, interval=0.2, what="100 rows after kill -9")
        wait_for(lambda: ctl("status", "--config", str(cfg)).returncode == 0, 30, what="all RUNNING again")

        # Ctrl-C reaches the whole foreground process group; supervisord stops every program.
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
        time.sleep(0.5)
        assert ctl("status", "--config", str(cfg)).returncode == 3
        assert "stopped" in (var / "log/iot-broker.log").read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
