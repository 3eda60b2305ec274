from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import BIN, Mosquitto, NotifySocket, PortInUse, Proc, retry_on_port_in_use


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path).start()
    yield m
    m.stop()


@pytest.fixture(params=["iot-broker", "mosquitto"])
def any_broker(request, tmp_path: Path) -> Iterator[int]:
    """The port of a running broker: ours, then Mosquitto as the reference, with the same queue
    limit per client as ours (Mosquitto's default of 1000 drops what a fast publisher sends past
    it, which ours would have queued: a test would be comparing two configurations)."""
    if request.param == "iot-broker":
        yield request.getfixturevalue("broker").port
    else:
        from daemons.config import BrokerConfig

        m = Mosquitto(tmp_path, conf=f"max_queued_messages {BrokerConfig().max_queued_messages}\n").start()
        yield m.port
        m.stop()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path)
    yield n
    n.close()


@pytest.fixture
def daemon(tmp_path: Path):
    """Start `argv` (a console script name resolved in the venv, then its arguments) under a
    bound NOTIFY_SOCKET, wait for READY=1, and stop every process at the end of the test.

    A daemon that exits before READY=1 fails the start at once; if it exited with 71 (EX_OSERR)
    saying "Address already in use", the failure is PortInUse, so a caller can retry on
    another port (see retry_on_port_in_use)."""
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
                n.wait_for("READY=1", timeout, alive=p.running)
            except TimeoutError:
                if not p.running() and p.proc.returncode == 71 and "Address already in use" in p.log():
                    raise PortInUse(f"{name}: {p.log().strip()}") from None
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
    """Start iot-broker with extra [broker] config lines; READY=1 awaited. Without `port`, on a
    free port, and on another one if that was taken before the broker could bind it."""

    def start(extra: str = "", *args: str, port: int | None = None) -> BrokerProc:
        def on(port: int) -> BrokerProc:
            cfg = tmp_path / f"broker-{port}.toml"
            cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\n'
                           f'port = {port}\n' + extra)
            proc, notify = daemon("iot-broker", "--config", str(cfg), *args)
            return BrokerProc(proc, notify, port, cfg)

        return on(port) if port else retry_on_port_in_use(on)

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


class BrokerUnderTest:
    """What `brokers` started: `kind` is "ours" or "mosquitto", `port` where it listens, `proc`
    its process (its log, whether it runs)."""

    def __init__(self, kind: str, port: int, proc: Proc):
        self.kind, self.port, self.proc = kind, port, proc


@pytest.fixture(params=["ours", "mosquitto"])
def brokers(request, tmp_path: Path):
    """Start ours, then (second parameter) Mosquitto 2 as the reference, each with its own
    config lines meaning the same thing: `brokers(ours="max_packet_size = 200\\n",
    mosquitto="max_packet_size 200\\n")` returns a BrokerUnderTest. For a point where
    Mosquitto deviates from the specification, the `mosquitto_deviates` fixture marks the Mosquitto
    parameter xfail (strict: it fails once Mosquitto conforms)."""
    kind = request.param

    def start(ours: str = "", mosquitto: str = "") -> BrokerUnderTest:
        if kind == "ours":
            b = request.getfixturevalue("broker_factory")(ours)
            return BrokerUnderTest(kind, b.port, b.proc)
        if os.geteuid() == 0:  # as root Mosquitto drops to "mosquitto", who cannot read pytest's folders
            mosquitto += "user root\n"
        m = Mosquitto(tmp_path, conf=mosquitto).start()
        request.addfinalizer(m.stop)
        return BrokerUnderTest(kind, m.port, m.proc)

    start.kind = kind
    return start


@pytest.fixture
def mosquitto_deviates(request):
    """`mosquitto_deviates(reason)`: expect the Mosquitto parameter of this test to fail, for
    `reason` (Mosquitto's own behaviour on a point of the specification); ours must pass."""

    def deviates(reason: str) -> None:
        if request.node.callspec.params.get("brokers") == "mosquitto":
            request.applymarker(pytest.mark.xfail(reason=f"Mosquitto 2.0.11: {reason}", strict=True))

    return deviates
