"""daemons.service under a real NOTIFY_SOCKET, the way systemd runs a Type=notify unit."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import ROOT, wait_for

SAMPLE = str(ROOT / "tests/integration/sample_daemon.py")


@pytest.mark.parametrize("flavour", [[], ["--async"]], ids=["sync-loop", "asyncio-loop"])
def test_notify_protocol_ready_status_watchdog_stopping(daemon, tmp_path, flavour):
    # WATCHDOG_USEC=200ms: the daemon must ping at least every 100 ms from its own loop.
    proc, notify = daemon(SAMPLE, *flavour, env={"WATCHDOG_USEC": "200000"})
    notify.wait_for("STATUS=", 10)  # a periodic status follows READY
    notify.wait_for("WATCHDOG=1", 10)
    pings_before = notify.messages.count("WATCHDOG=1")
    # Fed from the loop, again and again (every 100 ms; a loaded machine may be slower).
    wait_for(lambda: notify.drain(0.1).count("WATCHDOG=1") - pings_before >= 3, 10, what="three more pings")

    proc.signal(signal.SIGTERM)
    start = time.monotonic()
    assert proc.wait(10) == 0
    assert time.monotonic() - start < 10
    notify.drain(0.2)
    assert "STOPPING=1" in notify.messages
    assert notify.messages.index("READY=1") < notify.messages.index("STOPPING=1")


def test_watchdog_not_sent_for_another_pid(daemon):
    proc, notify = daemon(SAMPLE, env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    # A reload is handled in a pass of the loop after those that would have pinged (the first
    # tick pings at once), so by the time RELOADING=1 arrives a ping would be there before it.
    proc.signal(signal.SIGHUP)
    notify.wait_for("RELOADING=1", 10)
    assert "WATCHDOG=1" not in notify.messages


def test_sighup_runs_the_reload_callback_from_the_loop(daemon):
    proc, notify = daemon(SAMPLE)
    proc.signal(signal.SIGHUP)
    wait_for(lambda: "reload callback ran" in proc.log(), 5, what="reload log line")
    notify.wait_for("RELOADING=1", 2)
    assert proc.running()
    proc.signal(signal.SIGINT)
    assert proc.wait(10) == 0


def test_a_stop_that_hangs_is_cut_off_after_10s(daemon):
    proc, notify = daemon(SAMPLE, "--hang-on-stop")
    proc.signal(signal.SIGTERM)
    start = time.monotonic()
    rc = proc.wait(20)
    assert rc == 70 and 9 < time.monotonic() - start < 15
    assert "graceful stop took longer" in proc.log()


def test_journald_priority_prefix_only_when_stderr_is_the_journal_stream(tmp_path):
    log = tmp_path / "err.log"
    with open(log, "wb") as f:
        st = os.fstat(f.fileno())
        p = subprocess.Popen([sys.executable, SAMPLE], stderr=f,
                             env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        wait_for(lambda: "ready" in log.read_text(), 10, what="ready line")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("<") for line in lines), lines
    assert any(line.startswith("<6>ready status=serving") for line in lines), lines

    # A JOURNAL_STREAM inherited by a process whose stderr went elsewhere is ignored.
    r = subprocess.run([sys.executable, SAMPLE, "--config", str(tmp_path / "absent.toml")],
                       capture_output=True, text=True, env={**os.environ, "JOURNAL_STREAM": "1:2"}, timeout=30)
    assert r.returncode == 78 and not r.stderr.startswith("<")
    assert "ERROR" in r.stderr and "config error" in r.stderr


def test_bad_command_line_exits_64(tmp_path):
    r = subprocess.run([sys.executable, SAMPLE, "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 64 and "unrecognized arguments" in r.stderr


def test_sighup_applies_the_log_level_and_names_what_needs_a_restart(daemon, tmp_path):
    """`systemctl reload`: the config file is read again; [log] level takes effect at once (the
    broker's per-connection debug lines appear), other changed keys are named as waiting for a
    restart, and a file that no longer loads keeps the daemon running as it was."""
    from tests.mqttraw import RawClient
    from tests.support import free_port

    port = free_port()
    cfg = tmp_path / "iot.toml"
    base = f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
    cfg.write_text(base)
    proc, notify = daemon("iot-broker", "--config", str(cfg))

    def connect_once(name: str) -> None:
        with RawClient(port) as c:
            c.connect_ok(name)
            c.disconnect()

    def reload(expect: str) -> None:
        before = proc.log().count(expect)
        proc.signal(signal.SIGHUP)
        wait_for(lambda: proc.log().count(expect) > before, 10, what=f"{expect!r} in the log")
        assert proc.running()

    connect_once("quiet")
    cfg.write_text(base + '[log]\nlevel = "debug"\n')
    reload("reloaded")
    assert "log_level=debug" in proc.log().splitlines()[-1] and "restart_needed" not in proc.log()
    connect_once("loud")
    wait_for(lambda: "client connected client=loud" in proc.log(), 10, what="the debug line of a new client")
    assert "client=quiet" not in proc.log()  # info level hid it before the reload

    cfg.write_text(base + '[log]\nlevel = "loud"\n')
    reload("reload failed")
    connect_once("still-debug")
    wait_for(lambda: "client connected client=still-debug" in proc.log(), 10, what="debug still on")

    cfg.write_text(base.replace(f"port = {port}", f"port = {port + 1}") + '[log]\nlevel = "info"\n')
    reload("log_level=info")
    assert 'restart_needed="[broker] port"' in proc.log().splitlines()[-1]
    connect_once("quiet-again")  # still on the old port, and quiet again
    assert "client=quiet-again" not in proc.log()
    assert notify.messages.count("READY=1") >= 1 and any(m.startswith("RELOADING=1") for m in notify.drain(0.5))


def test_a_supervisor_that_stops_reading_notify_messages_does_not_freeze_the_daemon(tmp_path):
    """A datagram send blocks while the receiver's queue is full. The queue is filled before
    the broker starts and never read: the broker must still serve clients and stop on SIGTERM."""
    import socket as so

    from tests.mqttraw import RawClient
    from tests.support import BIN, Proc, free_port

    path = str(tmp_path / "stuck.sock")
    stuck = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    stuck.bind(path)
    filler = so.socket(so.AF_UNIX, so.SOCK_DGRAM)
    filler.connect(path)
    filler.setblocking(False)
    for sent in range(100_000):
        try:
            filler.send(b"X=1")
        except BlockingIOError:
            break
    assert 0 < sent < 100_000, "the receiver's queue never filled"
    port = free_port()
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n')
    proc = Proc([str(BIN / "iot-broker"), "--config", str(cfg)], workdir=tmp_path, name="broker",
                env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}).start()
    try:
        wait_for(lambda: "ready" in proc.log() or not proc.running(), 30, what="the broker's ready line")
        for i in range(3):  # each connect is a pass of the loop that also pings the watchdog
            with RawClient(port) as c:
                c.connect_ok(f"alive-{i}")
                c.disconnect()
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.log()
    finally:
        proc.stop()
        stuck.close()
        filler.close()
