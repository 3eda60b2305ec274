from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import BIN, Mosquitto, NotifySocket, Proc, free_port, wait_for


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path).start()
    yield m
    m.stop()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path)
    yield n
    n.close()


@pytest.fixture
def daemon(tmp_path: Path):
    """Start `argv` (a console script name resolved in the venv, then its arguments) under a
    bound NOTIFY_SOCKET, wait for READY=1, and stop every process at the end of the test."""
    started: list[Proc] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None, ready: bool = True,
              timeout: float = 15.0) -> tuple[Proc, NotifySocket]:
        sockdir = tmp_path / f"notify-{len(started)}"
        sockdir.mkdir()
        n = NotifySocket(sockdir)
        exe = str(BIN / name) if (BIN / name).exists() else name
        argv = [exe, *args] if not name.endswith(".py") else [sys.executable, name, *args]
        p = Proc(argv, workdir=tmp_path, env={"NOTIFY_SOCKET": n.path, **(env or {})},
                 name=Path(name).stem + f"-{len(started)}").start()
        started.append(p)
        if ready:
            try:
                n.wait_for("READY=1", timeout)
            except TimeoutError:
                raise AssertionError(f"{name} sent no READY=1 in {timeout}s; log:\n{p.log()}") from None
        return p, n

    yield start
    for p in started:
        p.stop()





class BrokerProc:
    def __init__(self, proc: Proc, notify: NotifySocket, port: int, config: Path):
        self.proc, self.notify, self.port, self.config = proc, notify, port, config


@pytest.fixture
def broker_factory(daemon, tmp_path: Path):
    """Start iot-broker on a free port with extra [broker] config lines; READY=1 awaited."""

    def start(extra: str = "", *args: str, port: int | None = None) -> BrokerProc:
        port = port or free_port()
        cfg = tmp_path / f"broker-{port}.toml"
        cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
                       + extra)
        proc, notify = daemon("iot-broker", "--config", str(cfg), *args)
        return BrokerProc(proc, notify, port, cfg)

    return start


@pytest.fixture
def broker(broker_factory) -> BrokerProc:
    return broker_factory()


@pytest.fixture
def mariadb(tmp_path: Path):
    """A private MariaDB server (Debian's mariadbd) in this test's temp folder, on its own socket
    and free port, with database `iot` and user `iot` (password auth). Stopped at the end."""
    from .mariadb import MariaDB

    (tmp_path / "mariadb").mkdir()
    m = MariaDB(tmp_path / "mariadb").start()
    yield m
    m.stop()
