"""iot-broker keeps what it acknowledged across a graceful stop, `kill -9` and a power cut
(`[broker] persistence`, on by default): retained messages, persistent sessions with their
subscriptions, queued and in-flight QoS 1/2 messages and QoS 2 receive state. A damaged store
does not stop the broker. Real broker processes, raw sockets (tests/mqttraw.py) and paho."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from tests import mqttraw as raw
from tests.support import wait_for

pytestmark = pytest.mark.slow


def store_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "broker" / "store.db"


class Publisher:
    """Publishes QoS 1 and 2 messages over one raw connection as fast as the broker
    acknowledges them (up to `window` in flight), and records which the broker took
    responsibility for: QoS 1 on PUBACK, QoS 2 on PUBREC."""

    def __init__(self, port: int, window: int = 50):
        self.c = raw.RawClient(port).connect_ok("publisher")
        self.window = window
        self.acked: dict[int, bytes] = {}  # mid -> payload
        self.acked_payloads: list[tuple[int, bytes]] = []
        self.sent: dict[int, tuple[int, bytes]] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self, topics: list[tuple[str, int]], count: int) -> Publisher:
        self.topics, self.count = topics, count
        self.thread.start()
        return self

    def _run(self) -> None:
        c = self.c
        try:
            n, mid = 0, 0
            while not self.stop.is_set() and (n < self.count or self.sent):
                while n < self.count and len(self.sent) < self.window:
                    topic, qos = self.topics[n % len(self.topics)]
                    mid = mid % 65535 + 1
                    payload = b"%s-%d" % (topic.encode(), n)
                    c.send(raw.publish(topic, payload, qos, mid))
                    self.sent[mid] = (qos, payload)
                    n += 1
                pkt = c.recv_packet(timeout=5)
                m = int.from_bytes(pkt.body[:2], "big")
                if pkt.type == raw.PUBACK:
                    self.acked_payloads.append((1, self.sent.pop(m)[1]))
                elif pkt.type == raw.PUBREC:
                    self.acked_payloads.append((2, self.sent[m][1]))
                    c.send(raw.pubrel(m))
                elif pkt.type == raw.PUBCOMP:
                    self.sent.pop(m)
        except (AssertionError, OSError) as e:
            self.error = e  # the broker went away under us: expected when it is killed
        finally:
            self.stop.set()


def drain(port: int, client_id: str, marker_topic: str, timeout: float = 60) -> list[tuple[int, bytes]]:
    """Reconnect a persistent session, publish a marker to it, and take everything that
    arrives before the marker: (qos, payload) in order. QoS 2 is completed as a client that
    keeps its receive state does: a message counts on its first PUBLISH, a DUP of a packet id
    still awaiting PUBREL does not count again."""
    got: list[tuple[int, bytes]] = []
    awaiting_pubrel: set[int] = set()
    with raw.RawClient(port) as c:
        c.send(raw.connect(client_id, clean=False))
        pkt = c.recv_packet()
        assert pkt.type == raw.CONNACK and pkt.body[1] == 0, raw.describe(pkt.raw)
        with raw.RawClient(port) as p:
            p.connect_ok("marker").publish_ok(marker_topic, b"END", 1)
            p.disconnect()
        for _ in range(1_000_000):
            pkt = c.recv_packet(timeout=timeout)
            if pkt.type == raw.PUBREL:
                mid = int.from_bytes(pkt.body[:2], "big")
                awaiting_pubrel.discard(mid)
                c.send(raw.pubcomp(mid))
                continue
            pub = raw.parse_publish(pkt)
            if pub.qos == 1:
                c.send(raw.puback(pub.mid))
            elif pub.qos == 2:
                c.send(raw.pubrec(pub.mid))
                if pub.mid in awaiting_pubrel:
                    continue
                awaiting_pubrel.add(pub.mid)
            if pub.topic == marker_topic:
                break
            got.append((pub.qos, pub.payload))
        c.disconnect()
    return got


def offline_subscriber(port: int, client_id: str, topics: list[tuple[str, int]]) -> None:
    with raw.RawClient(port) as c:
        c.connect_ok(client_id, clean=False).subscribe_ok(topics)
        c.disconnect()


@pytest.mark.parametrize("stop", ["sigterm", "kill -9"])
def test_queued_messages_sessions_and_retained_messages_survive_a_restart(broker_factory, stop):
    b = broker_factory("sys_interval = 0\n")
    offline_subscriber(b.port, "keeper", [("d/#", 2)])
    with raw.RawClient(b.port) as p:
        p.connect_ok("pub")
        for i in range(100):
            p.publish_ok("d/one", b"one-%d" % i, 1, mid=i + 1)
            p.publish_ok("d/two", b"two-%d" % i, 2, mid=i + 1)
        p.publish_ok("r/state", b"running", 1, retain=True)
        p.publish_ok("r/gone", b"x", 1, retain=True)
        p.publish_ok("r/gone", b"", 1, retain=True)  # deleted again: must stay deleted
        p.disconnect()
    if stop == "sigterm":
        assert b.proc.stop() == 0
    else:
        b.proc.kill()
    b = broker_factory("sys_interval = 0\n", port=b.port)
    assert "store opened" in b.proc.log() and "sessions=1" in b.proc.log()
    got = drain(b.port, "keeper", "d/end")
    assert got == [m for i in range(100) for m in ((1, b"one-%d" % i), (2, b"two-%d" % i))]
    with raw.RawClient(b.port) as c:
        c.connect_ok("late").subscribe_ok([("r/#", 1)])
        pub = c.recv_publish()
        assert (pub.topic, pub.payload, pub.retain) == ("r/state", b"running", True)
        c.send(raw.puback(pub.mid))
        assert all(p.type != raw.PUBLISH for p in c.until_pingresp()), "r/gone came back"


@pytest.mark.parametrize("qos", [1, 2])
def test_kill_9_under_load_loses_nothing_the_broker_acknowledged(broker_factory, qos):
    """A publisher at full speed to an offline persistent subscriber; the broker is killed
    with -9 in the middle. After the restart the subscriber gets every message the broker had
    acknowledged (PUBACK, or PUBREC for QoS 2): QoS 1 at least once, QoS 2 exactly once."""
    b = broker_factory("sys_interval = 0\n")
    offline_subscriber(b.port, "keeper", [("load/#", 2)])
    pub = Publisher(b.port).start([("load/a", qos), ("load/b", qos)], 200_000)
    wait_for(lambda: len(pub.acked_payloads) >= 5000 or pub.stop.is_set(), 60, what="5000 acknowledgements")
    b.proc.kill()
    pub.stop.set()
    pub.thread.join(10)
    acked = [p for _, p in pub.acked_payloads]
    assert len(acked) >= 5000, pub.error
    b = broker_factory("sys_interval = 0\n", port=b.port)
    got = [p for _, p in drain(b.port, "keeper", "load/end", timeout=30)]
    missing = set(acked) - set(got)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:3]}"
    if qos == 2:
        assert len(got) == len(set(got)), "a QoS 2 message was delivered twice"
    # in order, per topic (what arrived after the acknowledged ones were not acknowledged yet)
    for topic in (b"load/a", b"load/b"):
        seq = [int(p.rsplit(b"-", 1)[1]) for p in got if p.startswith(topic)]
        assert seq == sorted(seq)


def test_a_power_cut_before_the_commit_loses_only_what_was_not_acknowledged(broker_factory):
    """The store's test hook ends the broker after a batch was written but before its commit
    (what a power cut between write and fsync leaves). Every acknowledged message is there
    after the restart; the batch that was cut was never acknowledged."""
    b = broker_factory("sys_interval = 0\n")
    offline_subscriber(b.port, "keeper", [("cut/#", 1)])
    b.proc.stop()
    os.environ["IOT_BROKER_FAILPOINT"] = "crash-before-commit:40"
    try:
        b = broker_factory("sys_interval = 0\n", port=b.port)
    finally:
        del os.environ["IOT_BROKER_FAILPOINT"]
    pub = Publisher(b.port, window=20).start([("cut/x", 1)], 100_000)
    wait_for(lambda: pub.stop.is_set(), 60, what="the broker to stop at its failpoint")
    wait_for(lambda: not b.proc.running(), 10, what="the broker process to end")
    assert b.proc.proc.returncode == 137
    acked = [p for _, p in pub.acked_payloads]
    assert acked, pub.error
    b = broker_factory("sys_interval = 0\n", port=b.port)
    got = [p for _, p in drain(b.port, "keeper", "cut/end")]
    # Every acknowledged message, in order; after them at most what was committed while its
    # PUBACKs were still on their way when the process ended, never what the cut batch held.
    assert got[:len(acked)] == acked
    assert len(got) - len(acked) <= pub.window


def test_a_truncated_store_is_moved_aside_and_what_is_readable_is_kept(broker_factory, tmp_path):
    b = broker_factory("sys_interval = 0\n")
    with raw.RawClient(b.port) as p:
        p.connect_ok("pub")
        for i in range(300):
            p.publish_ok(f"keep/{i}", b"v" * 2000, 0, retain=True)
        p.disconnect()
    assert b.proc.stop() == 0
    db = store_path(tmp_path)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.truncate(size // 2)
    b = broker_factory("sys_interval = 0\n", port=b.port)
    log = b.proc.log()
    assert "store is damaged; moved it aside and kept what could be read" in log, log
    aside = [p for p in db.parent.iterdir() if p.name.startswith("store.db.corrupt-") and p.suffix != ".db"
             and not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and f"moved_to={aside[0]}" in log
    kept = sqlite3.connect(db).execute("SELECT count(*) FROM retained").fetchone()[0]
    assert 0 < kept < 300
    with raw.RawClient(b.port) as c:
        c.connect_ok("reader").subscribe_ok([("keep/#", 0)])
        assert sum(p.type == raw.PUBLISH for p in c.until_pingresp()) == kept


def test_a_garbled_store_does_not_stop_the_broker(broker_factory, tmp_path):
    b = broker_factory("sys_interval = 0\n")
    offline_subscriber(b.port, "keeper", [("g/#", 1)])
    with raw.RawClient(b.port) as p:
        p.connect_ok("pub")
        for i in range(50):
            p.publish_ok("g/x", b"m%d" % i, 1, mid=i + 1)
        p.disconnect()
    assert b.proc.stop() == 0
    db = store_path(tmp_path)
    data = bytearray(db.read_bytes())
    data[:100] = os.urandom(100)  # the header: SQLite no longer knows the file
    db.write_bytes(bytes(data))
    b = broker_factory("sys_interval = 0\n", port=b.port)
    assert "store is damaged" in b.proc.log()
    with raw.RawClient(b.port) as c:  # serving, with an empty store
        c.connect_ok("keeper", clean=False, session_present=False)
        c.subscribe_ok([("g/#", 1)])
        with raw.RawClient(b.port) as p:
            p.connect_ok("pub2").publish_ok("g/x", b"after", 1)
        assert c.recv_publish().payload == b"after"


def test_retained_messages_follow_the_suback_of_a_persistent_session(broker_factory):
    """The SUBACK of a persistent session waits for the store's commit; the retained messages
    the subscription brings must still come after it, not overtake it."""
    b = broker_factory("sys_interval = 0\n")
    with raw.RawClient(b.port) as p:
        p.connect_ok("pub")
        for i in range(20):
            p.publish_ok(f"r/{i}", b"v%d" % i, 1, mid=i + 1, retain=True)
        p.disconnect()
    for client_id, clean in (("keeper", False), ("passer", True)):
        with raw.RawClient(b.port) as c:
            c.connect_ok(client_id, clean=clean)
            c.send(raw.subscribe(7, [("r/#", 1)]))
            first = c.recv_packet()
            assert (first.type, first.body) == (raw.SUBACK, b"\x00\x07\x01"), raw.describe(first.raw)
            pubs = [c.recv_publish() for _ in range(20)]
            assert sorted(p.payload for p in pubs) == sorted(b"v%d" % i for i in range(20))
            assert all(p.retain for p in pubs)
            c.disconnect()
