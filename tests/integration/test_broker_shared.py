"""Shared subscriptions `$share/GROUP/FILTER` on a real iot-broker: each message to one member
of each group, round robin; a member killed with -9 loses nothing (its unacknowledged messages
go to another member); refused share names; persistence; ACL on FILTER. Raw sockets
(tests/mqttraw.py) where a client library would hide what the broker sends, consumer
processes (tests/shareconsumer.py) where one must die."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests import mqttraw as raw
from tests.integration.test_broker_persistence import Publisher
from tests.integration.test_broker_security import passwd_file
from tests.support import ROOT, Proc, wait_for


def consumers(tmp_path: Path, port: int, names: list[str], topic_filter: str) -> list[Proc]:
    procs = []
    for name in names:
        p = Proc([sys.executable, "-m", "tests.shareconsumer", str(port), name, topic_filter], workdir=tmp_path,
                 env={"PYTHONPATH": str(ROOT)}, name=f"consumer-{name}").start()
        procs.append(p)
    for p in procs:
        wait_for(lambda: "ready\n" in p.log() or not p.running(), 15, what=f"{p.argv[-2]} subscribed")
        assert p.running(), p.log()
    return procs


def got(p: Proc) -> list[str]:
    return [ln for ln in p.log().splitlines() if ln != "ready"]


def publish_all(port: int, topic: str, n: int) -> set[bytes]:
    pub = Publisher(port, window=100).start([(topic, 1)], n)
    pub.thread.join(120)
    assert pub.error is None and not pub.sent, pub.error
    return {payload for _, payload in pub.acked_payloads}


def test_three_consumers_share_the_load_without_duplicates(broker_factory, tmp_path):
    b = broker_factory("sys_interval = 1\n")
    procs = consumers(tmp_path, b.port, ["c1", "c2", "c3"], "$share/workers/jobs/#")
    try:
        sent = {x.decode() for x in publish_all(b.port, "jobs/a", 3000)}
        wait_for(lambda: sum(len(got(p)) for p in procs) >= 3000, 30, what="every message consumed")
        lines = [got(p) for p in procs]
        assert all(len(x) >= 500 for x in lines), [len(x) for x in lines]  # each takes a share
        every = [m for x in lines for m in x]
        assert len(every) == len(set(every)) == 3000, "a duplicate with nobody dying"
        assert set(every) == sent
        with raw.RawClient(b.port) as c:
            c.connect_ok("sys").subscribe_ok([("$SYS/broker/subscriptions/shared/count", 0)])
            assert c.recv_publish(timeout=5).payload == b"3"
    finally:
        for p in procs:
            p.stop()


def test_round_robin_and_two_groups_beside_a_plain_subscriber(broker):
    with raw.RawClient(broker.port) as a1, raw.RawClient(broker.port) as a2, raw.RawClient(broker.port) as a3, \
            raw.RawClient(broker.port) as b1, raw.RawClient(broker.port) as b2, \
            raw.RawClient(broker.port) as plain, raw.RawClient(broker.port) as pub:
        for i, c in enumerate((a1, a2, a3)):
            c.connect_ok(f"a{i}").subscribe_ok([("$share/A/r/+", 0)])
        for i, c in enumerate((b1, b2)):
            c.connect_ok(f"b{i}").subscribe_ok([("$share/B/r/#", 0)])
        plain.connect_ok("plain").subscribe_ok([("r/#", 0)])
        pub.connect_ok("pub")
        for i in range(12):
            pub.send(raw.publish("r/x", b"%d" % i, 0))
        pub.until_pingresp()  # the broker routed all 12 before it answered

        def payloads(c: raw.RawClient) -> list[bytes]:
            return [raw.parse_publish(p).payload for p in c.until_pingresp() if p.type == raw.PUBLISH]

        assert [payloads(c) for c in (a1, a2, a3)] == [[b"%d" % i for i in range(k, 12, 3)] for k in range(3)]
        assert [payloads(c) for c in (b1, b2)] == [[b"%d" % i for i in range(k, 12, 2)] for k in range(2)]
        assert payloads(plain) == [b"%d" % i for i in range(12)]


@pytest.mark.slow
def test_a_consumer_killed_with_9_mid_stream_loses_nothing(broker_factory, tmp_path):
    b = broker_factory("sys_interval = 0\n")
    procs = consumers(tmp_path, b.port, ["k1", "k2", "k3"], "$share/g/load/#")
    try:
        pub = Publisher(b.port, window=100).start([("load/x", 1)], 20_000)
        wait_for(lambda: len(got(procs[0])) >= 1000, 60, what="the first consumer under way")
        # Stopped, it reads nothing more, so what the group gives it from now on stays
        # unacknowledged and the kill has messages to hand over (a consumer that keeps up may
        # have none in flight at the moment it dies).
        procs[0].signal(signal.SIGSTOP)
        others = len(got(procs[1])) + len(got(procs[2]))
        wait_for(lambda: len(got(procs[1])) + len(got(procs[2])) >= others + 300, 60,
                 what="the other consumers going on while the first is stopped")
        procs[0].signal(signal.SIGKILL)
        procs[0].wait(10)
        pub.thread.join(120)
        assert pub.error is None and not pub.sent, pub.error
        sent = {x.decode() for _, x in pub.acked_payloads}
        assert len(sent) == 20_000

        def union() -> set[str]:
            return {m for p in procs for m in got(p)}

        wait_for(lambda: union() >= sent, 60, what="every acknowledged message consumed by someone")
        assert union() == sent
        assert len(got(procs[0])) < 20_000 and got(procs[1]) and got(procs[2])
        assert "handed to other members" in b.proc.log()
    finally:
        for p in procs:
            p.stop()


def test_unsubscribe_stops_delivery(broker):
    with raw.RawClient(broker.port) as m1, raw.RawClient(broker.port) as m2, raw.RawClient(broker.port) as pub:
        m1.connect_ok("m1").subscribe_ok([("$share/g/u", 1)])
        m2.connect_ok("m2").subscribe_ok([("$share/g/u", 1)])
        m1.send(raw.unsubscribe(2, ["$share/g/u"]))
        m1.expect(raw.unsuback(2))
        pub.connect_ok("pub")
        for i in range(5):
            pub.publish_ok("u", b"%d" % i, 1, mid=i + 1)
        for i in range(5):
            p = m2.recv_publish()
            assert p.payload == b"%d" % i
            m2.send(raw.puback(p.mid))
        m1.expect_nothing("an unsubscribed member")


def test_invalid_share_names_are_refused_in_suback_and_logged(broker):
    with raw.RawClient(broker.port) as c:
        c.connect_ok("bad")
        c.send(raw.subscribe(1, [("$share//t", 1), ("$share/+/t", 1), ("$share/#", 1), ("$share/g", 1),
                                 ("$share/g/", 1), ("$share/ok/t", 1)]))
        c.expect(raw.suback(1, [0x80, 0x80, 0x80, 0x80, 0x80, 1]))
        c.publish_ok("$share/ok/t", b"not a topic", 1)  # acknowledged, never delivered
        c.expect_nothing("a PUBLISH to a $share name")
    wait_for(lambda: "subscription refused: invalid shared subscription" in broker.proc.log(), 10,
             what="the refusal in the log")
    assert "denied PUBLISH from bad to $share/ok/t" in broker.proc.log()


@pytest.mark.slow
def test_shared_subscriptions_survive_a_broker_restart(broker_factory):
    b = broker_factory("sys_interval = 0\n")
    with raw.RawClient(b.port) as c:
        c.connect_ok("keeper", clean=False).subscribe_ok([("$share/g/p/#", 1)])
        c.disconnect()
    assert b.proc.stop() == 0
    b = broker_factory("sys_interval = 0\n", port=b.port)
    with raw.RawClient(b.port) as pub:
        pub.connect_ok("pub")
        for i in range(10):
            pub.publish_ok("p/x", b"%d" % i, 1, mid=i + 1)
    with raw.RawClient(b.port) as c:
        c.connect_ok("keeper", clean=False, session_present=True)
        for i in range(10):
            p = c.recv_publish()
            assert p.payload == b"%d" % i
            c.send(raw.puback(p.mid))


def test_acl_is_checked_on_the_filter(broker_factory, tmp_path):
    f = passwd_file(tmp_path)
    acl = tmp_path / "acl"
    acl.write_text("user bob\ntopic read jobs/#\n")
    b = broker_factory(f'password_file = "{f}"\nacl_file = "{acl}"\nsys_interval = 0\n')
    with raw.RawClient(b.port) as bob:
        bob.connect_ok("bob-1", username="bob", password=b"builder")
        bob.send(raw.subscribe(1, [("$share/g/jobs/#", 1), ("$share/g/secret/#", 1), ("$share/jobs/x", 1)]))
        bob.expect(raw.suback(1, [1, 0x80, 0x80]), what="the group is no right: x under jobs/ is not jobs/#")
