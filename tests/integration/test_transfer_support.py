"""Shared pieces of the file transfer tests (no tests here): two nodes with their own config
and state folder, a sender and a receiver started as real daemons, and the checks every
fault test ends with: the file byte-identical in the spool and exactly one completion in the
sender's journal and logs. For the seed-json tests, the seed-format peer of tests/seedpeer.py
as processes: SeedReceiver and SeedSender."""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson
import pytest

from tests.faultproxy import FaultProxy
from tests.support import ROOT, wait_for

SEEDPEER = ROOT / "tests" / "seedpeer.py"

# Fast timers so that every fault heals within a second or two.
FAST = {"settle_time": 0.2, "resend_after": 0.5, "stall_timeout": 1.5, "status_interval": 0.3,
        "chunk_size": 16384, "window": 8, "sync_bytes": 65536}


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return orjson.dumps(str(v)).decode()
    return repr(v)


class Node:
    """One side of a transfer: a config file and a state folder of its own."""

    def __init__(self, root: Path, name: str, port: int, **transfer):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.var = self.dir / "var"
        self.config = self.dir / "iot.toml"
        settings = {**FAST, **transfer}
        self.config.write_text(
            f'[paths]\nstate_dir = "{self.var}"\n'
            f"[mqtt]\nport = {port}\nkeepalive = 5\nreconnect_min = 0.05\nreconnect_max = 0.5\n"
            "[transfer]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
        self.outbox = self.var / "outbox"
        self.spool = self.var / "transfer"
        self.journal = self.var / "transfer-send" / "journal.jsonl"

    def records(self, ev: str) -> list[dict]:
        try:
            lines = self.journal.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                r = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if r.get("ev") == ev:
                out.append(r)
        return out

    def partial_chunks(self) -> int:
        """Chunks the receiver has persisted as received, over its partial files."""
        return sum(p.stat().st_size // 4 for p in (self.spool / ".partial").glob("*.idx"))


class Pair:
    """A sender node and a receiver node on one broker (each possibly behind a proxy)."""

    def __init__(self, daemon, root: Path, broker_port: int, *, send_port: int | None = None,
                 recv_port: int | None = None, **transfer):
        self.daemon = daemon
        self.tx = Node(root, "sender", send_port or broker_port, **transfer)
        self.rx = Node(root, "receiver", recv_port or broker_port, **transfer)
        self.senders: list = []
        self.receivers: list = []

    def start_sender(self):
        proc, _ = self.daemon("iot-transfer-send", "--config", str(self.tx.config))
        self.senders.append(proc)
        return proc

    def start_receiver(self):
        proc, _ = self.daemon("iot-transfer-recv", "--config", str(self.rx.config))
        self.receivers.append(proc)
        return proc

    def wait_subscribed(self, proc) -> None:
        """READY comes once the client runs; tests that publish by hand wait for the SUBACK."""
        wait_for(lambda: "subscribed" in proc.log(), 10, what="the daemon's subscription")

    def start(self):
        """Receiver then sender, each subscribed: a file dropped now meets a listening receiver."""
        self.wait_subscribed(self.start_receiver())
        self.wait_subscribed(self.start_sender())
        return self

    def drop(self, name: str, data: bytes) -> None:
        """Put a file into the outbox the way well-behaved writers do: write, then rename in."""
        self.tx.outbox.mkdir(parents=True, exist_ok=True)
        tmp = self.tx.outbox / (name + ".part")
        tmp.write_bytes(data)
        os.rename(tmp, self.tx.outbox / name)

    def logs(self, procs) -> str:
        return "".join(p.log() for p in procs)

    def wait_done(self, name: str, data: bytes, timeout: float = 30.0) -> None:
        """The file is byte-identical in the spool, and the sender completed it exactly once."""
        target = self.rx.spool / name
        try:
            wait_for(lambda: target.exists() and target.stat().st_size == len(data), timeout,
                     what=f"{name} in the spool")
            wait_for(lambda: any(r.get("stored_as") == name for r in self.tx.records("done")), timeout,
                     what=f"the sender's completion of {name}")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n--- sender\n{self.logs(self.senders)}\n--- receiver\n"
                                 f"{self.logs(self.receivers)}") from None
        assert target.read_bytes() == data, f"{name} differs from what was sent"
        self.assert_once(name)

    def assert_once(self, name: str) -> None:
        done = [r for r in self.tx.records("done") if r.get("stored_as") == name]
        assert len(done) == 1, f"{len(done)} completion records for {name}: {done}"
        def lines() -> list[str]:
            return [ln for ln in self.logs(self.senders).splitlines()
                    if re.search(r"iot-transfer-send: sent .*stored_as=" + re.escape(_logged(name)) + r"$", ln)]

        # The line follows the journal's record (written first, so it is never lost): wait for it.
        wait_for(lines, 10, what=f"the 'sent' log line for {name}")
        assert len(lines()) == 1, f"{len(lines())} 'sent' log lines for {name}:\n" + "\n".join(lines())

    def retries(self, name: str) -> int:
        return sum(r["retries"] for r in self.tx.records("done") if r.get("stored_as") == name)


class SeedReceiver:
    """tests/seedpeer.py's receiver as a process, with its own storage folder: files land there
    under their file id."""

    def __init__(self, daemon, root: Path, port: int, status_interval: float = 0.3):
        self.daemon, self.port, self.status_interval = daemon, port, status_interval
        self.storage = root / "seed-receiver"
        self.procs: list = []

    def start(self, subscribed: bool = True):
        proc, _ = self.daemon(str(SEEDPEER), "receive", "--storage-dir", str(self.storage), "--port", str(self.port),
                              "--status-interval", str(self.status_interval), ready=False)
        self.procs.append(proc)
        if subscribed:
            wait_for(lambda: "subscribed" in proc.log() or not proc.running(), 10, what="the seed receiver's SUBACK")
            assert proc.running(), proc.log()
        return proc

    def log(self) -> str:
        return "".join(p.log() for p in self.procs)

    def chunks(self) -> int:
        """Chunks received, over its unfinished files (as its state files say)."""
        n = 0
        for p in (self.storage / ".state").glob("*.json"):
            try:
                st = orjson.loads(p.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            n += 0 if st["complete"] else len(st["received"])
        return n


class SeedSender:
    """tests/seedpeer.py's sender, one process per file; exits 0 once acknowledged."""

    def __init__(self, daemon, root: Path, port: int):
        self.daemon, self.port, self.root = daemon, port, root
        self.procs: list = []

    def start(self, path: Path, *args: str, port: int | None = None):
        proc, _ = self.daemon(str(SEEDPEER), "send", str(path), "--port", str(port or self.port),
                              "--reannounce", "0.5", *args, ready=False)
        self.procs.append(proc)
        return proc

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / "seed-sender" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    def log(self) -> str:
        return "".join(p.log() for p in self.procs)

    def file_id(self, proc) -> str:
        m = wait_for(lambda: re.search(r"seed-sender: id=(\S+)", proc.log()), 10, what="the seed sender's file id")
        return m.group(1)

    def wait_acked(self, proc, timeout: float = 30.0) -> None:
        try:
            wait_for(lambda: not proc.running(), timeout, what="the seed sender to get its ack and exit")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{proc.log()}") from None
        assert proc.wait(1) == 0 and "seed-sender: acked" in proc.log(), proc.log()


def wait_sent_to_seed(pair: Pair, seed: SeedReceiver, name: str, data: bytes, timeout: float = 30.0) -> str:
    """Our sender's file `name` is byte-identical in the seed receiver's storage (under its
    file id), and the sender completed it exactly once (journal and log). Returns the id."""
    try:
        start = wait_for(lambda: [r for r in pair.tx.records("start") if r["name"] == name], timeout,
                         what=f"the transfer of {name} to start")[-1]
        target = seed.storage / start["id"]
        wait_for(lambda: target.exists() and target.stat().st_size == len(data), timeout, what=f"{name} stored")
        wait_for(lambda: any(r["id"] == start["id"] for r in pair.tx.records("done")), timeout,
                 what=f"the sender's completion of {name}")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n--- sender\n{pair.logs(pair.senders)}\n--- seed receiver\n{seed.log()}") from None
    assert target.read_bytes() == data, f"{name} differs from what was sent"
    assert len([r for r in pair.tx.records("done") if r["id"] == start["id"]]) == 1

    def lines() -> list[str]:
        return re.findall(r"iot-transfer-send: sent name=" + re.escape(_logged(name)) + " ", pair.logs(pair.senders))

    wait_for(lines, 10, what=f"the 'sent' log line for {name}")
    assert len(lines()) == 1, pair.logs(pair.senders)
    return start["id"]


def wait_received_from_seed(pair: Pair, sender: SeedSender, proc, data: bytes, timeout: float = 30.0) -> str:
    """The seed sender got its ack, and our receiver holds the file, byte-identical, once,
    under the file id (the seed's manifest has no name). Returns the id."""
    fid = sender.file_id(proc)
    try:
        sender.wait_acked(proc, timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- receiver\n{pair.logs(pair.receivers)}") from None
    assert (pair.rx.spool / fid).read_bytes() == data
    assert not list(pair.rx.spool.glob(f"{fid} (*")), "stored twice"

    def lines() -> list[str]:  # logged just after the ack is published: the sender may be faster
        return re.findall(r"iot-transfer-recv: received name=" + re.escape(_logged(fid)) + " ",
                          pair.logs(pair.receivers))

    wait_for(lines, 10, what="the receiver's 'received' log line")
    assert len(lines()) == 1, pair.logs(pair.receivers)
    return fid


def _logged(value: str) -> str:
    """How service.py's formatter writes a field value."""
    if value == "" or any(c in value for c in ' ="\n\t'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return value


@pytest.fixture
def proxies():
    started: list[FaultProxy] = []

    def make(port: int) -> FaultProxy:
        p = FaultProxy(port).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


