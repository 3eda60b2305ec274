"""The broker core with a real store (SQLite in a temp folder, its writer thread, an asyncio
loop), fed packets directly as in test_core.py: what is acknowledged when, what is on disk,
and what a second broker reads back."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from daemons.broker import packets as p
from daemons.broker.core import Broker, Limits
from daemons.broker.store import Store
from daemons.service import Log
from tests.unit.test_core import connect

LOG = Log("t")


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def settle(loop, store: Store, rounds: int = 200) -> None:
    """Run the loop until every batch is written and its acknowledgements are released."""
    for _ in range(rounds):
        loop.run_until_complete(asyncio.sleep(0.005))
        if not store.busy and not store.pending():
            return
    raise AssertionError("the store did not settle")


def broker(tmp_path, loop, **limits) -> tuple[Broker, Store]:
    store = Store(tmp_path / "store.db", LOG, loop, quota=limits.pop("quota", 1 << 30))
    b = Broker(LOG, Limits(**limits), store=store)
    b.restore(store.open(page=limits.get("max_queued", 100_000)))
    return b, store


def rows(tmp_path, sql: str) -> list:
    return sqlite3.connect(tmp_path / "store.db").execute(sql).fetchall()


def test_puback_waits_for_the_commit_and_keeps_its_order(tmp_path, loop):
    b, store = broker(tmp_path, loop)
    sub, _ = connect(b, "keeper", clean=False)
    b.handle(sub, p.Subscribe(1, (("k/#", 1),)))
    assert sub.packets() == []  # the SUBACK waits for the subscription to be on disk
    settle(loop, store)
    assert sub.packets() == [p.Suback(1, (1,))]
    b.closed(sub, graceful=True)
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("k/1", b"a", 1, packet_id=1))  # queued for keeper: on disk first
    b.handle(pub, p.Publish("other", b"b", 1, packet_id=2))  # nothing to write, but after pid 1
    assert pub.packets() == []
    settle(loop, store)
    assert pub.packets() == [p.Puback(1), p.Puback(2)]
    assert rows(tmp_path, "SELECT topic, payload, qos FROM messages") == [("k/1", b"a", 1)]
    b.handle(pub, p.Publish("other", b"c", 1, packet_id=3))  # nothing waits: at once
    assert pub.packets() == [p.Puback(3)]


def test_a_message_acknowledged_before_its_batch_left_is_never_written(tmp_path, loop):
    b, store = broker(tmp_path, loop)
    sub, _ = connect(b, "keeper", clean=False)
    b.handle(sub, p.Subscribe(1, (("k/#", 1),)))
    settle(loop, store)
    sub.packets()
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("k/1", b"a", 1, packet_id=1))
    (msg,) = sub.packets()
    before = store.written
    b.handle(sub, p.Puback(msg.packet_id))
    settle(loop, store)
    assert pub.packets() == [p.Puback(1)]
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]
    assert store.written - before <= 1  # at most the session row, not the message


def test_a_second_broker_reads_back_sessions_queues_qos2_state_and_retained(tmp_path, loop):
    b, store = broker(tmp_path, loop, max_inflight=2)
    sub, _ = connect(b, "keeper", clean=False)
    b.handle(sub, p.Subscribe(1, (("k/#", 2),)))
    pub, _ = connect(b, "pub2", clean=False)
    b.handle(pub, p.Publish("k/x", b"0", 2, packet_id=7))  # PUBREC given, no PUBREL yet
    for i in range(1, 5):
        b.handle(pub, p.Publish("k/x", b"%d" % i, 2, packet_id=10 + i))
        b.handle(pub, p.Pubrel(10 + i))
    b.handle(pub, p.Publish("r/x", b"kept", 1, retain=True, packet_id=20))
    settle(loop, store)
    got = [x for x in sub.packets() if isinstance(x, p.Publish)]
    assert [m.payload for m in got] == [b"0", b"1"]  # a window of 2
    b.handle(sub, p.Pubrec(got[0].packet_id))  # the first is released, the second not yet
    settle(loop, store)
    store.close()

    b2, store2 = broker(tmp_path, asyncio.new_event_loop(), max_inflight=2)
    assert set(b2.sessions) == {"keeper", "pub2"}
    assert [m.topic for m in b2.retained.match("r/#")] == ["r/x"]
    pub2, ack = connect(b2, "pub2", clean=False)
    assert ack.session_present
    b2.handle(pub2, p.Publish("k/x", b"0", 2, packet_id=7, dup=True))
    assert pub2.packets() == [p.Pubrec(7)]  # known id: acknowledged, not routed again
    sub2, _ = connect(b2, "keeper", clean=False)
    out = sub2.packets()
    # The released one is PUBREL'd again with its id, the next resent with DUP and its id,
    # and with the window refilled the rest follow in order.
    assert out[0] == p.Pubrel(got[0].packet_id)
    assert isinstance(out[1], p.Publish) and out[1].payload == b"1" and out[1].dup
    assert out[1].packet_id == got[1].packet_id
    store2.close()


def test_past_memory_a_queue_continues_on_disk_and_comes_back_in_order(tmp_path, loop):
    b, store = broker(tmp_path, loop, max_inflight=5, max_queued=10)
    sub, _ = connect(b, "keeper", clean=False)
    b.handle(sub, p.Subscribe(1, (("k/#", 1),)))
    b.closed(sub, graceful=True)
    pub, _ = connect(b, "pub")
    for i in range(100):
        assert b.handle(pub, p.Publish("k/x", b"%d" % i, 1, packet_id=i + 1))
    settle(loop, store)
    assert len(pub.packets()) == 100  # all acknowledged: they are on disk
    session = b.sessions["keeper"]
    assert len(session.queue) == 10 and session.on_disk == 90
    sub, _ = connect(b, "keeper", clean=False)
    got = []
    for _ in range(200):
        pkts = [x for x in sub.packets() if isinstance(x, p.Publish)]
        for m in pkts:
            got.append(int(m.payload))
            b.handle(sub, p.Puback(m.packet_id))
        settle(loop, store)
        if len(got) == 100:
            break
    assert got == list(range(100))
    assert rows(tmp_path, "SELECT count(*) FROM messages") == [(0,)]
    assert store.bytes == 0


def test_past_the_quota_flow_control_begins(tmp_path, loop):
    b, store = broker(tmp_path, loop, max_inflight=1, max_queued=2, quota=1000)
    sub, _ = connect(b, "keeper", clean=False)
    b.handle(sub, p.Subscribe(1, (("k/#", 1),)))
    b.closed(sub, graceful=True)
    pub, _ = connect(b, "pub")
    taken = 0
    for i in range(100):
        if not b.handle(pub, p.Publish("k/x", b"x" * 100, 1, packet_id=i + 1)):
            break
        taken += 1
    assert 2 < taken < 100 and store.bytes >= 1000
    assert b.stats.publish_held == 1 and b.stats.publish_dropped == 0


def test_a_clean_session_writes_nothing(tmp_path, loop):
    b, store = broker(tmp_path, loop)
    sub, _ = connect(b, "c", clean=True)
    b.handle(sub, p.Subscribe(1, (("k/#", 1),)))
    assert sub.packets() == [p.Suback(1, (1,))]  # at once: nothing to keep
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("k/1", b"a", 1, packet_id=1))
    assert p.Puback(1) in pub.packets()
    assert store.pending() == 0


@pytest.mark.parametrize("names", [("fast",), ("fast", "away")])
def test_acknowledged_messages_are_deleted_and_only_those(tmp_path, loop, names):
    """One persistent subscriber acknowledges all but a run in the middle (its deletes are
    ranges of sequence numbers); with a second one that is away, the numbers alternate
    between them (single deletes) and every row of the one away stays."""
    b, store = broker(tmp_path, loop, max_inflight=100)
    subs = {}
    for name in names:
        subs[name], _ = connect(b, name, clean=False)
        b.handle(subs[name], p.Subscribe(1, (("k/#", 1),)))
    if "away" in subs:
        b.closed(subs.pop("away"), graceful=True)
    settle(loop, store)
    subs["fast"].packets()
    pub, _ = connect(b, "pub")
    for i in range(60):
        b.handle(pub, p.Publish("k/x", b"%d" % i, 1, packet_id=i + 1))
    settle(loop, store)  # all on disk before any acknowledgement: nothing cancels
    got = [x for x in subs["fast"].packets() if isinstance(x, p.Publish)]
    for m in got[:20] + got[30:]:  # a gap: two runs
        b.handle(subs["fast"], p.Puback(m.packet_id))
    settle(loop, store)
    left = rows(tmp_path, "SELECT s.client_id, m.payload FROM messages m JOIN sessions s USING (sid) ORDER BY seq")
    assert [r[1] for r in left if r[0] == "fast"] == [b"%d" % i for i in range(20, 30)]
    assert [r[1] for r in left if r[0] == "away"] == ([b"%d" % i for i in range(60)] if "away" in names else [])


def test_a_store_from_before_user_names_were_kept_is_upgraded_in_place(tmp_path, loop):
    db = sqlite3.connect(tmp_path / "store.db")
    db.executescript("""
        CREATE TABLE sessions (sid INTEGER PRIMARY KEY, client_id TEXT NOT NULL UNIQUE,
                               subscriptions TEXT NOT NULL, disconnected_at REAL);
        INSERT INTO sessions VALUES (1, 'old', '{"k/#": 1}', 0);""")
    db.commit()
    db.close()
    b, store = broker(tmp_path, loop)
    assert b.sessions["old"].subscriptions == {"k/#": 1} and b.sessions["old"].username is None
    assert not list(tmp_path.glob("store.db.corrupt-*"))
