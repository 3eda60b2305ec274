"""Shared subscriptions in the broker core, fed packets directly (no sockets)."""

from __future__ import annotations

from daemons.broker import packets as p
from daemons.broker.core import Broker, Limits
from daemons.service import Log

from .test_core import Link, connect


def publishes(link: Link) -> list[bytes]:
    return [x.payload for x in link.packets() if isinstance(x, p.Publish)]


def group_of(b: Broker, n: int, clean: bool = True, qos: int = 1, window: int = 20):
    links = []
    for i in range(n):
        link, _ = connect(b, f"m{i}", clean=clean)
        b.handle(link, p.Subscribe(1, ((f"$share/g/t/#", qos),)))
        assert link.packets() == [p.Suback(1, (qos,))]
        links.append(link)
    return links


def test_round_robin_one_member_per_message():
    b = Broker(Log("t"))
    members = group_of(b, 3)
    pub, _ = connect(b, "pub")
    for i in range(9):
        b.handle(pub, p.Publish("t/x", str(i).encode(), qos=0))
    got = [publishes(m) for m in members]
    assert got == [[b"0", b"3", b"6"], [b"1", b"4", b"7"], [b"2", b"5", b"8"]]


def test_a_member_without_room_is_passed_over_and_a_leaving_member_hands_over_unacked():
    b = Broker(Log("t"), Limits(max_inflight=1))
    m0, m1 = group_of(b, 2)
    pub, _ = connect(b, "pub")
    for i in range(4):
        b.handle(pub, p.Publish("t/x", str(i).encode(), qos=1, packet_id=i + 1))
    # each has one in flight and one queued (no window room anywhere after the first two)
    assert [x.payload for x in m0.packets() if isinstance(x, p.Publish)] == [b"0"]
    m1_first = m1.packets()
    assert [x.payload for x in m1_first if isinstance(x, p.Publish)] == [b"1"]
    b.closed(m0, graceful=False)  # a clean session ends: "0" (in flight) and "2" (queued) go to m1
    b.handle(m1, p.Puback(m1_first[0].packet_id))
    seen = []
    for _ in range(4):
        pkts = [x for x in m1.packets() if isinstance(x, p.Publish)]
        seen += [x.payload for x in pkts]
        for x in pkts:
            b.handle(m1, p.Puback(x.packet_id))
    assert sorted(seen) == [b"0", b"2", b"3"]


def test_unsubscribe_stops_delivery_and_hands_over():
    b = Broker(Log("t"))
    m0, m1 = group_of(b, 2)
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("t/x", b"a", qos=1, packet_id=1))  # to m0, not acknowledged
    assert publishes(m0) == [b"a"]
    b.handle(m0, p.Unsubscribe(2, ("$share/g/t/#",)))
    assert publishes(m1) == [b"a"]
    for i in range(3):
        b.handle(pub, p.Publish("t/x", b"b", qos=1, packet_id=10 + i))
    assert publishes(m0) == []
    assert publishes(m1) == [b"b"] * 3


def test_away_persistent_member_gets_nothing_while_another_is_connected():
    b = Broker(Log("t"))
    m0, m1 = group_of(b, 2, clean=False)
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("t/x", b"a", qos=1, packet_id=1))  # to m0
    b.closed(m0, graceful=True)  # away, session kept: its unacked "a" goes to m1
    for i in range(4):
        b.handle(pub, p.Publish("t/x", b"b", qos=1, packet_id=2 + i))
    assert publishes(m1) == [b"a"] + [b"b"] * 4
    assert b.sessions["m0"].pending() == 0


def test_invalid_share_names_refused_and_retained_not_sent():
    b = Broker(Log("t"))
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("t/r", b"kept", qos=0, retain=True))
    s, _ = connect(b, "s")
    b.handle(s, p.Subscribe(1, (("$share//t", 0), ("$share/+/t", 0), ("$share/g", 0), ("$share/g/", 0),
                                ("$share/g/t/#", 1))))
    assert s.packets() == [p.Suback(1, (0x80, 0x80, 0x80, 0x80, 1))]
    assert b.stats.share_refused == 4
    sys = b.sys_topics()
    assert sys["$SYS/broker/subscriptions/shared/count"] == "1"
    assert sys["$SYS/broker/subscriptions/count"] == "1"


def test_share_topics_are_not_publishable():
    b = Broker(Log("t"))
    (m,) = group_of(b, 1)
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("$share/g/t/x", b"x", qos=0))
    assert publishes(m) == []
    assert b.stats.publish_denied == 1
