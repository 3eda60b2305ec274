"""Many idle connections (issue 21): the broker with its defaults holds thousands of clients,
costs little memory for each, and still serves; the file descriptor limit bounds the
connections it takes, and a refusal there is the same logged refusal as max_connections'."""

from __future__ import annotations

import re
import resource
import socket
from pathlib import Path

import pytest

from tests.mqttraw import RawClient, connack, connect, connect_idle, puback, publish
from tests.support import BIN, retry_on_port_in_use, wait_for

IDLE = 5000
# Per idle connection: 3.7 KiB before issue 21, about 2.4 KiB after it (asyncio's transport,
# socket and selector key are some 1.5 of those). Read from /proc like benchmarks/conn_rss.py.
KIB_PER_CONNECTION = 3.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


def publish_qos1(port: int, topic: str, payload: bytes) -> None:
    """A new client publishes at QoS 1 and gets its PUBACK, without select() (its descriptor
    may be past 1024 here, where select() takes none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(connect("late-publisher"))
        assert s.recv(4) == connack(0), "a client connecting after the idle ones got no CONNACK 0"
        s.sendall(publish(topic, payload, 1, 1))
        assert s.recv(4) == puback(1), "no PUBACK for the late client's QoS 1 PUBLISH"


def let_in(port: int) -> bool:
    """Does a new client get CONNACK 0 now? (It leaves at once.)"""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(connect("newcomer"))
            return s.recv(4) == connack(0)
        except OSError:  # reset: refused at accept
            return False


@pytest.fixture
def many_fds():
    """This process holds a socket per idle client: its soft descriptor limit at the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= IDLE + 200, \
        f"RLIMIT_NOFILE hard limit {hard}: the test needs {IDLE + 200} descriptors"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_defaults_hold_5000_idle_connections_and_serve_publish_subscribe(broker, many_fds):
    # The subscriber first: RawClient reads with select(), which needs a descriptor below 1024.
    sub = RawClient(broker.port)
    sub.connect_ok("watcher")
    sub.subscribe_ok([("after/idle", 1)])
    before = rss_kib(broker.proc.pid)
    idle = connect_idle(broker.port, IDLE)
    try:
        assert len(idle) == IDLE, f"the defaults took {len(idle)} of {IDLE} idle clients:\n{broker.proc.log()[-2000:]}"
        per_connection = (rss_kib(broker.proc.pid) - before) / IDLE
        assert per_connection < KIB_PER_CONNECTION, f"{per_connection:.2f} KiB per idle connection"
        publish_qos1(broker.port, "after/idle", b"still serving")
        pub = sub.recv_publish()
        assert (pub.topic, pub.payload, pub.qos) == ("after/idle", b"still serving", 1)
        sub.send(puback(pub.mid))
    finally:
        for s in idle:
            s.close()
        sub.close()
    assert "max_connections reached" not in broker.proc.log()


def test_descriptor_limit_raised_to_hard_bounds_connections_and_refusals_are_logged(daemon, tmp_path):
    """Started with a soft limit of 100 and a hard one of 160 (prlimit execs the broker in its
    own process), the broker raises the soft limit to 160, takes 160 - 64 = 96 connections, says
    so at start, and refuses the rest as it does past max_connections: logged, and it serves on."""

    def start(port: int):
        cfg = tmp_path / f"broker-{port}.toml"
        cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n')
        proc, _ = daemon("prlimit", "--nofile=100:160", str(BIN / "iot-broker"), "--config", str(cfg))
        return proc, port

    proc, port = retry_on_port_in_use(start)
    assert open_files_limits(proc.pid) == (160, 160)
    assert re.search(r"connection limit .*max_connections=96 nofile=160", proc.log()), proc.log()
    idle = connect_idle(port, 110)
    try:
        assert len(idle) == 96
        assert "connection refused: max_connections reached" in proc.log()
        assert "max_connections=96" in proc.log().split("max_connections reached", 1)[1].splitlines()[0]
        for s in idle[:5]:
            s.close()
        # The broker sees those closes in its own time: a new client is let in once it has.
        wait_for(lambda: let_in(port), 10, what="a new client let in after 5 left")
    finally:
        for s in idle:
            s.close()
    assert proc.running()
