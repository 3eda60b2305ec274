"""The system install under a real systemd, as the README's install and operations sections say.

A Debian bookworm root (debootstrap, cached in /var/cache/iot-test) is booted with
`systemd-nspawn -b --volatile=overlay --private-network`, so every run starts from the same
clean system and nothing reaches the host's ports. pip inside cannot reach the registry, so the
wheels are prepared on the host (`install.sh --make-wheelhouse`) and installed with
`install.sh --wheelhouse`. The first run builds the root (a few minutes); later runs take
seconds. Needs root, debootstrap and systemd-container (`install.sh --local --test-deps`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT, wait_for

CACHE = Path("/var/cache/iot-test")
ROOTFS = CACHE / "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,procps"
UNITS = ("iot-broker", "iot-transfer-recv", "iot-transfer-send", "iot-ingest")

pytestmark = [pytest.mark.systemd, pytest.mark.slow, pytest.mark.timeout(900)]


def build_rootfs() -> None:
    if (ROOTFS / "usr/bin/python3").exists():
        return
    tmp = CACHE / "bookworm.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(tmp)],
                   check=True, stdout=subprocess.DEVNULL, timeout=900)
    tmp.rename(ROOTFS)  # only a complete root is ever cached


def clean_checkout(dest: Path) -> None:
    """The files a clone would have (tracked plus new, not ignored): no .venv, no var/ state."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = ROOT / f.decode()
        if src.is_file():
            (dest / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f.decode())


class Container:
    def __init__(self, src: Path, wheels: Path, log: Path):
        self.log = open(log, "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(ROOTFS), "-b", "--register=no", "--keep-unit", "--volatile=overlay",
             "--private-network", "--console=passive", f"--bind-ro={src}:/src", f"--bind-ro={wheels}:/wheels"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = wait_for(self._init_pid, 30, what="container init")
        wait_for(lambda: self.sh("systemctl is-system-running", check=False).stdout.strip()
                 in ("running", "degraded"), 90, interval=0.5, what="container boot")

    def _init_pid(self) -> int | None:
        if self.nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode}")
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(stat[1]) == self.nspawn.pid:
                    return int(d.name)
        return None

    def sh(self, command: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "sh", "-c", command], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"`{command}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def stop(self) -> None:
        self.sh("systemctl poweroff", check=False, timeout=30)
        try:
            self.nspawn.wait(30)
        except subprocess.TimeoutExpired:
            self.nspawn.kill()
            self.nspawn.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def container(tmp_path_factory) -> Iterator[Container]:
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
        pytest.fail("needs root, systemd-nspawn and debootstrap: run ./install.sh --local --test-deps as root")
    build_rootfs()
    work = tmp_path_factory.mktemp("systemd")
    src, wheels = work / "src", work / "wheels"
    clean_checkout(src)
    subprocess.run([str(src / "install.sh"), "--make-wheelhouse", str(wheels)], check=True, capture_output=True,
                   timeout=600)
    c = Container(src, wheels, work / "console.log")
    c.sh("cp -r /src /root/iot-daemons")
    yield c
    c.stop()


def active(c: Container, unit: str) -> bool:
    return c.sh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active"


def test_install_start_and_operate_as_the_readme_says(container):
    c = container
    out = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --start").stdout
    assert "==> installed" in out and "started" in out
    for u in UNITS:
        assert active(c, u), c.sh(f"systemctl status {u} --no-pager", check=False).stdout
        # Type=notify: active means READY=1 arrived; the daemon's STATUS= is shown too.
        assert c.sh(f"systemctl show -p StatusText --value {u}").stdout.strip()
    assert c.sh("systemctl show -p User --value iot-broker").stdout.strip() == "iot"
    assert c.sh("stat -c '%a %U' /etc/iot/ingest.keys").stdout.split() == ["600", "iot"]

    status = c.sh("/opt/iot/bin/iotctl status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert all(f"{u}" in status.stdout for u in UNITS) and status.stdout.count("active/running") == len(UNITS)

    # journalctl -u iot-ingest shows the worker's lines
    assert "ready" in c.sh("journalctl -u iot-ingest --no-pager -o cat").stdout

    # a file dropped into the outbox arrives in the spool, byte for byte
    c.sh("head -c 3000000 /dev/urandom > /root/f.bin && cp /root/f.bin /var/lib/iot/outbox/.f.tmp "
         "&& mv /var/lib/iot/outbox/.f.tmp '/var/lib/iot/outbox/field data.bin'")
    wait_for(lambda: c.sh("cmp /root/f.bin '/var/lib/iot/transfer/field data.bin'", check=False).returncode == 0,
             60, interval=0.5, what="file in /var/lib/iot/transfer")

    # a second run changes nothing
    again = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --start").stdout
    assert "nothing changed" in again


def test_kill_9_of_a_main_pid_brings_the_daemon_back(container):
    c = container
    pid = c.sh("systemctl show -p MainPID --value iot-broker").stdout.strip()
    c.sh(f"kill -9 {pid}")
    wait_for(lambda: active(c, "iot-broker") and
             c.sh("systemctl show -p MainPID --value iot-broker").stdout.strip() not in ("0", pid),
             30, interval=0.5, what="iot-broker restarted")
    assert int(c.sh("systemctl show -p NRestarts --value iot-broker").stdout) >= 1


def test_a_daemon_whose_loop_stops_feeding_the_watchdog_is_restarted(container):
    c = container
    # A short watchdog for the test only (the shipped unit says 30 s).
    c.sh("mkdir -p /run/systemd/system/iot-transfer-send.service.d && printf '[Service]\\nWatchdogSec=2\\n' "
         "> /run/systemd/system/iot-transfer-send.service.d/wd.conf && systemctl daemon-reload "
         "&& systemctl restart iot-transfer-send")
    pid = c.sh("systemctl show -p MainPID --value iot-transfer-send").stdout.strip()
    c.sh(f"kill -STOP {pid}")  # the loop freezes: no more WATCHDOG=1
    wait_for(lambda: "watchdog timeout" in c.sh("journalctl -u iot-transfer-send --no-pager -o cat").stdout.lower(),
             30, interval=0.5, what="watchdog timeout in the journal")
    wait_for(lambda: active(c, "iot-transfer-send") and
             c.sh("systemctl show -p MainPID --value iot-transfer-send").stdout.strip() not in ("0", pid),
             30, interval=0.5, what="iot-transfer-send restarted")
    c.sh("rm -r /run/systemd/system/iot-transfer-send.service.d && systemctl daemon-reload")


def test_reload_sends_sighup_to_the_broker(container):
    c = container
    c.sh("systemctl reload iot-broker")
    assert active(c, "iot-broker")
    assert "reload" in c.sh("journalctl -u iot-broker --no-pager -o cat -n 5").stdout


def test_uninstall_removes_the_units_and_keeps_config_and_data(container):
    c = container
    c.sh("cd /root/iot-daemons && ./install.sh --uninstall")
    for u in UNITS:
        assert c.sh(f"test -e /etc/systemd/system/{u}.service", check=False).returncode != 0
        assert not active(c, u)
    assert c.sh("test -d /opt/iot", check=False).returncode != 0
    c.sh("test -f /etc/iot/iot.toml && test -f '/var/lib/iot/transfer/field data.bin'")


def test_supervisor_install_runs_the_same_set(container):
    """Hosts without systemd: supervisord runs the set; iotctl status reads it; files still flow."""
    c = container
    out = c.sh("cd /root/iot-daemons && ./install.sh --wheelhouse /wheels --supervisor --start").stdout
    assert "started" in out
    wait_for(lambda: c.sh("/opt/iot/bin/iotctl status", check=False).returncode == 0, 60, interval=0.5,
             what="every program RUNNING under supervisord")
    status = c.sh("/opt/iot/bin/iotctl status").stdout
    assert status.count("RUNNING") == len(UNITS)
    c.sh("head -c 100000 /dev/urandom > /root/g.bin && cp /root/g.bin /var/lib/iot/outbox/.g && "
         "mv /var/lib/iot/outbox/.g /var/lib/iot/outbox/g.bin")
    wait_for(lambda: c.sh("cmp /root/g.bin /var/lib/iot/transfer/g.bin", check=False).returncode == 0, 60,
             interval=0.5, what="file through the supervisord set")
    c.sh("/opt/iot/bin/supervisorctl -c /etc/iot/supervisord.conf shutdown")
