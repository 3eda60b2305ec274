"""Real processes for tests: our daemons under a real sd_notify socket, a private Mosquitto.

Every wait here is bounded by a deadline; every process started is stopped by its fixture.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Every port free_port() returned in this process: two fixtures asking at the same moment can
# be given the same just-closed port by the kernel, so a port is never handed out twice.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now and that this session has not handed out before.

    Another process can still bind it before our server does (the kernel also gives ports from
    this range to outgoing connections), so the starters retry with a new port on PortInUse
    (see `retry_on_port_in_use`)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("the kernel offered no port this session has not used in 100 tries")


class PortInUse(Exception):
    """A server could not listen: its port was taken between free_port() and its bind."""


def retry_on_port_in_use(start: Callable[[int], T], attempts: int = 5) -> T:
    """`start(port)` with a fresh free_port(), again with a new port while it raises PortInUse."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except PortInUse:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def readline(pipe: IO[bytes], timeout: float = 10.0) -> bytes:
    """One line (with its newline) from a subprocess pipe, waiting at most `timeout` seconds.

    Reads the file descriptor byte by byte with os.read: nothing past the line is consumed, and
    no data can hide in a Python buffer where select() cannot see it. Raises AssertionError
    with what was read so far on timeout or end of file."""
    deadline = time.monotonic() + timeout
    fd = pipe.fileno()
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no complete line within {timeout}s; read so far: {line!r}")
        ch = os.read(fd, 1)
        if not ch:
            raise AssertionError(f"end of output before a complete line; read so far: {line!r}")
        line += ch
    return line


def read_until(pipe: IO[bytes], needle: bytes, timeout: float = 10.0, limit: int = 1 << 20) -> list[bytes]:
    """Lines from a subprocess pipe up to and including the first one containing `needle`,
    waiting at most `timeout` seconds in all and reading at most `limit` bytes."""
    deadline = time.monotonic() + timeout
    lines: list[bytes] = []
    seen = 0
    while not lines or needle not in lines[-1]:
        if seen > limit:
            raise AssertionError(f"{needle!r} not in the first {limit} bytes: {b''.join(lines)[-2000:]!r}")
        try:
            lines.append(readline(pipe, deadline - time.monotonic()))
        except AssertionError as e:
            raise AssertionError(f"waiting for a line with {needle!r}, after lines {lines!r}: {e}") from None
        seen += len(lines[-1])
    return lines


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
    """A unix datagram socket bound where a daemon's NOTIFY_SOCKET points, as systemd does.

    Like systemd it reads all the time (a thread), not only when a test looks: a daemon's
    sd_notify send blocks once the socket's queue is full (net.unix.max_dgram_qlen, often 10
    datagrams), which froze a broker's event loop after a minute of STATUS= lines."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self._seen = 0  # how many messages drain() has returned: the rest count as queued
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"notify {self.path}")
        self._reader.start()

    def _read_queued(self) -> None:
        """Append every datagram waiting in the socket. Called with self._cond held."""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:  # BlockingIOError: nothing queued; EBADF: closed
                return
            self.messages.extend(data.decode().split("\n"))
            self._cond.notify_all()

    def _read(self) -> None:
        while not self._closed:
            try:
                ready = select.select([self.sock], [], [], 0.2)[0]  # 0.2: to notice close()
            except (OSError, ValueError):
                return
            if ready:
                with self._cond:
                    self._read_queued()

    def drain(self, timeout: float = 0.0) -> list[str]:
        """Every message so far, after waiting up to `timeout` for one newer than what the
        previous drain() returned (none is waited for if one has come since)."""
        with self._cond:
            self._read_queued()
            self._cond.wait_for(lambda: len(self.messages) > self._seen, timeout)
            self._seen = len(self.messages)
            return self.messages

    def wait_for(self, prefix: str, timeout: float = 10.0, alive: Callable[[], bool] | None = None) -> str:
        """The first message starting with `prefix`. With `alive`, stop waiting as soon as it
        returns False (the process exited: no message will come)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                running = alive is None or alive()
                self._read_queued()  # after the alive check: what an exited process sent is read
                for m in self.messages:
                    if m.startswith(prefix):
                        return m
                if not running:
                    raise TimeoutError(f"the process exited without {prefix!r}; got {self.messages}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {prefix!r} on the notify socket within {timeout}s; got {self.messages}")
                self._cond.wait(min(left, 0.1))  # a new message wakes it; 0.1 s: to ask alive() again

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
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
    """A private Mosquitto on a free loopback port: the interop peer. `conf` adds lines to its
    configuration (e.g. limits a test needs beyond Mosquitto's defaults)."""

    def __init__(self, directory: Path, port: int | None = None, conf: str = ""):
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(self.exe):
            raise RuntimeError("mosquitto is not installed: run ./install.sh --local --test-deps")
        self.dir = directory
        self.port = port or free_port()
        self._may_move = port is None  # a port we picked may be changed if someone else took it
        self.conf = directory / "mosquitto.conf"
        # log_type information: the "running" line that says the listener is open.
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\nlog_type information\nmax_keepalive 65535\n"
            + conf
        )
        self.proc: Proc | None = None

    def start(self) -> Mosquitto:
        for attempt in range(5):
            try:
                return self._start()
            except PortInUse:
                if not self._may_move or attempt == 4:
                    raise
                # Taken between free_port() and Mosquitto's bind: move to another port (only
                # before the first successful start; a restart keeps the port clients know).
                old, self.port = self.port, free_port()
                self.conf.write_text(self.conf.read_text().replace(f"listener {old} ", f"listener {self.port} "))
        raise AssertionError("unreachable")

    def _start(self) -> Mosquitto:
        proc = Proc([self.exe, "-c", str(self.conf)], workdir=self.dir, name=f"mosquitto-{self.port}")
        offset = proc.log_path.stat().st_size if proc.log_path.exists() else 0  # a restart appends
        self.proc = proc.start()

        def said(text: str) -> bool:
            return text in proc.log_path.read_bytes()[offset:].decode(errors="replace")

        # Wait for its own word, not for the port to accept: another process may hold the port.
        wait_for(lambda: said(" running\n") or not proc.running(), 10, what="mosquitto to say it is running")
        if not proc.running():
            proc.stop()
            if said("Address already in use"):
                raise PortInUse(f"mosquitto: port {self.port} is taken")
            raise RuntimeError(f"mosquitto exited: {proc.log()}")
        self._may_move = False
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
