"""Real processes for tests: our daemons under a real sd_notify socket, a private Mosquitto.

Every wait here is bounded by a deadline; every process started is stopped by its fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class NotifySocket:
    """A unix datagram socket bound where a daemon's NOTIFY_SOCKET points, as systemd does."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []

    def drain(self, timeout: float = 0.0) -> list[str]:
        self.sock.settimeout(timeout if timeout > 0 else 0.0001)
        try:
            while True:
                data = self.sock.recv(65536).decode()
                self.messages.extend(data.split("\n"))
                self.sock.settimeout(0.0001)
        except (TimeoutError, BlockingIOError, socket.timeout):
            pass
        return self.messages

    def wait_for(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.drain(0.1):
                if m.startswith(prefix):
                    return m
        raise TimeoutError(f"no {prefix!r} on the notify socket within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


class Proc:
    """A daemon as a real subprocess, its stderr captured to a file the test can read."""

    def __init__(self, argv: Sequence[str], *, workdir: Path, env: dict[str, str] | None = None, name: str = "proc"):
        self.argv = list(argv)
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Proc:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.workdir, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None:
            self._log.close()


def write_config(directory: Path, text: str) -> Path:
    path = directory / "iot.toml"
    path.write_text(f'[paths]\nstate_dir = "{directory / "var"}"\n' + text)
    return path


class Mosquitto:
    """A private Mosquitto on a free loopback port: the interop peer."""

    def __init__(self, directory: Path, port: int | None = None):
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.exe):
            raise RuntimeError("mosquitto is not installed: run ./install.sh --local --test-deps")
        self.dir = directory
        self.port = port or free_port()
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nmax_keepalive 65535\n"
        )
        self.proc: Proc | None = None

    def start(self) -> Mosquitto:
        self.proc = Proc([self.exe, "-c", str(self.conf)], workdir=self.dir, name=f"mosquitto-{self.port}").start()
        wait_for(lambda: port_open(self.port) or not self.proc.running(), 10, what="mosquitto to listen")
        if not self.proc.running():
            raise RuntimeError(f"mosquitto exited: {self.proc.log()}")
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


def tmpdir(prefix: str = "iot-test-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
