"""The broker core fed packets directly, no sockets: each Link records what the core sends it
and the bytes are decoded back with the client-role codec.

A Link is never congested: the server learns congestion only when a write to a real socket
is buffered past its high-water mark, so dropping QoS 0 for a congested subscriber is tested
over a real socket (test_broker_daemon.py::test_qos0_to_a_subscriber_that_stops_reading...)."""

from __future__ import annotations

from daemons.broker import packets as p
from daemons.broker.core import Broker, Limits
from daemons.service import Log


class Link:
    def __init__(self):
        self.sent: list[bytes] = []
        self.closed = False
        self.session = self.will = None
        self.keepalive = 0
        self.backlog: list = []
        self.retries = 0

    def retry_held(self) -> None:  # the transport would hand its held PUBLISH in again
        self.retries += 1

    def send(self, data: bytes, payload: bytes | None = None) -> None:
        self.sent.append(data if payload is None else data + payload)

    def close(self) -> None:
        self.closed = True

    def congested(self) -> bool:
        return False

    def packets(self) -> list:
        out, data = self.backlog, b"".join(self.sent)
        self.backlog, self.sent = [], []
        while data:
            pkt, n = p.decode(data, role="client")
            out.append(pkt)
            data = data[n:]
        return out


def connect(b: Broker, cid: str, clean: bool = True, will: p.Will | None = None) -> tuple[Link, p.Connack]:
    link = Link()
    b.connect(link, p.Connect(cid, clean_session=clean, will=will))
    connack, *link.backlog = link.packets()
    return link, connack


def test_persistent_session_queues_and_resumes_with_dup():
    b = Broker(Log("t"), Limits(max_inflight=2, max_queued=10))
    sub, ack = connect(b, "s", clean=False)
    assert ack == p.Connack(False, p.ConnackCode.ACCEPTED)
    b.handle(sub, p.Subscribe(1, (("t/#", 1),)))
    assert sub.packets() == [p.Suback(1, (1,))]
    pub, _ = connect(b, "pub")
    for i in range(3):
        b.handle(pub, p.Publish("t/x", b"%d" % i, 1, packet_id=i + 1))
    got = sub.packets()
    assert [x.payload for x in got] == [b"0", b"1"], "window of 2: the third waits"
    b.closed(sub, graceful=False)  # away with two unacknowledged and one queued

    sub2, ack = connect(b, "s", clean=False)
    assert ack.session_present
    resent = sub2.packets()
    assert [(x.payload, x.dup) for x in resent] == [(b"0", True), (b"1", True)]
    b.handle(sub2, p.Puback(resent[0].packet_id))
    nxt = sub2.packets()
    assert [(x.payload, x.dup) for x in nxt] == [(b"2", False)]


def test_clean_session_discards_state_and_subscriptions():
    b = Broker(Log("t"))
    sub, _ = connect(b, "s", clean=False)
    b.handle(sub, p.Subscribe(1, (("a", 1),)))
    b.closed(sub, graceful=True)
    sub2, ack = connect(b, "s", clean=True)
    assert not ack.session_present
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("a", b"x", 1, packet_id=1))
    assert sub2.packets() == []


def test_qos2_incoming_duplicate_is_acknowledged_but_routed_once():
    b = Broker(Log("t"))
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(1, (("q", 0),)))
    sub.packets()
    pub, _ = connect(b, "pub")
    for dup in (False, True):
        b.handle(pub, p.Publish("q", b"once", 2, dup=dup, packet_id=9))
    assert pub.packets() == [p.Pubrec(9), p.Pubrec(9)]
    assert [x.payload for x in sub.packets()] == [b"once"]
    b.handle(pub, p.Pubrel(9))
    assert pub.packets() == [p.Pubcomp(9)]
    b.handle(pub, p.Publish("q", b"again", 2, packet_id=9))  # id free again: a new message
    assert [x.payload for x in sub.packets()] == [b"again"]


def test_outgoing_qos2_flow_and_pubrel_resent_on_resume():
    b = Broker(Log("t"))
    sub, _ = connect(b, "s", clean=False)
    b.handle(sub, p.Subscribe(1, (("q", 2),)))
    sub.packets()
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("q", b"m", 2, packet_id=1))
    (msg,) = sub.packets()
    b.handle(sub, p.Pubrec(msg.packet_id))
    assert sub.packets() == [p.Pubrel(msg.packet_id)]
    b.closed(sub, graceful=False)
    sub2, _ = connect(b, "s", clean=False)
    assert sub2.packets() == [p.Pubrel(msg.packet_id)], "PUBREL, not the PUBLISH, is re-sent [MQTT-4.4.0-1]"
    b.handle(sub2, p.Pubcomp(msg.packet_id))
    assert b.sessions["s"].inflight == {}


def test_takeover_closes_the_old_connection_and_publishes_its_will():
    b = Broker(Log("t"))
    watcher, _ = connect(b, "w")
    b.handle(watcher, p.Subscribe(1, (("will/#", 0),)))
    watcher.packets()
    old, _ = connect(b, "dev", will=p.Will("will/dev", b"gone", 0, False))
    new, ack = connect(b, "dev")
    assert old.closed and ack.return_code == p.ConnackCode.ACCEPTED
    assert [x.payload for x in watcher.packets()] == [b"gone"]
    b.closed(old, graceful=False)  # the transport's late notice changes nothing
    assert b.sessions["dev"].conn is new


def test_disconnect_discards_the_will():
    b = Broker(Log("t"))
    watcher, _ = connect(b, "w")
    b.handle(watcher, p.Subscribe(1, (("will/#", 0),)))
    watcher.packets()
    dev, _ = connect(b, "dev", will=p.Will("will/dev", b"gone", 0, False))
    b.handle(dev, p.Disconnect())
    b.closed(dev, graceful=False)
    assert dev.closed and watcher.packets() == []


def test_zero_length_client_id_rules():
    b = Broker(Log("t"))
    link = Link()
    assert not b.connect(link, p.Connect("", clean_session=False))
    assert link.packets() == [p.Connack(False, p.ConnackCode.IDENTIFIER_REJECTED)]
    link = Link()
    assert b.connect(link, p.Connect("", clean_session=True))
    assert link.packets() == [p.Connack(False, p.ConnackCode.ACCEPTED)]
    strict = Broker(Log("t"), Limits(allow_zero_length_clientid=False))
    link = Link()
    assert not strict.connect(link, p.Connect("", clean_session=True))


def test_queue_full_drop_policy_counts_what_it_drops():
    b = Broker(Log("t"), Limits(max_inflight=1, max_queued=2, queue_full="drop"))
    sub, _ = connect(b, "s", clean=False)
    b.handle(sub, p.Subscribe(1, (("o", 1),)))
    b.closed(sub, graceful=False)
    pub, _ = connect(b, "pub")
    for i in range(5):
        b.handle(pub, p.Publish("o", b"%d" % i, 1, packet_id=i + 1))
    assert b.stats.publish_dropped == 3
    assert b.sessions["s"].dropped == 3
    sub2, _ = connect(b, "s", clean=False)
    got = sub2.packets()
    assert [x.payload for x in got] == [b"0"]


def test_retained_delivered_after_suback_with_retain_flag_at_granted_qos():
    b = Broker(Log("t"))
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("r/a", b"v", 2, retain=True, packet_id=1))
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(5, (("r/#", 1),)))
    suback, msg = sub.packets()
    assert suback == p.Suback(5, (1,))
    assert (msg.topic, msg.payload, msg.retain, msg.qos) == ("r/a", b"v", True, 1)
    b.handle(pub, p.Publish("r/a", b"", 0, retain=True))
    assert len(b.retained) == 0


def test_queue_full_block_policy_acknowledges_only_what_it_can_keep():
    """queue_full = "block": a QoS 1 PUBLISH for a full queue is not acknowledged; the
    publisher is told to retry when the subscriber's acknowledgements free room, and then the
    same PUBLISH is taken and acknowledged. Nothing acknowledged is dropped."""
    b = Broker(Log("t"), Limits(max_inflight=1, max_queued=2))
    sub, _ = connect(b, "s", clean=False)
    b.handle(sub, p.Subscribe(1, (("o", 1),)))
    sub.packets()
    pub, _ = connect(b, "pub")
    taken = [b.handle(pub, p.Publish("o", b"%d" % i, 1, packet_id=i + 1)) for i in range(5)]
    assert taken == [True, True, True, False, False]  # one in flight, two queued, then full
    assert pub.packets() == [p.Puback(1), p.Puback(2), p.Puback(3)]
    assert b.stats.publish_dropped == 0 and b.stats.publish_held == 2
    got = sub.packets()
    assert [x.payload for x in got] == [b"0"]
    b.handle(sub, p.Puback(got[0].packet_id))  # room again: the held publisher is told
    assert pub.retries == 1
    assert b.handle(pub, p.Publish("o", b"3", 1, packet_id=4)) is True
    assert pub.packets() == [p.Puback(4)]
    received = [x.payload for x in sub.packets()]
    assert received == [b"1"]


def test_a_qos0_publish_or_an_unsubscribed_topic_is_never_held():
    b = Broker(Log("t"), Limits(max_inflight=1, max_queued=0))
    sub, _ = connect(b, "s", clean=False)
    b.handle(sub, p.Subscribe(1, (("full", 1), ("q0", 0))))
    pub, _ = connect(b, "pub")
    assert b.handle(pub, p.Publish("full", b"a", 1, packet_id=1))  # into the window
    assert b.handle(pub, p.Publish("full", b"b", 0))  # QoS 0: dropped for a full window, not held
    assert b.handle(pub, p.Publish("q0", b"c", 1, packet_id=2))  # delivered at the granted QoS 0
    assert b.handle(pub, p.Publish("other", b"d", 1, packet_id=3))  # nobody subscribed
    assert not b.handle(pub, p.Publish("full", b"e", 1, packet_id=4))


# limits against hostile or broken clients ----------------------------------------------------


def test_a_filter_deeper_than_max_topic_levels_gets_0x80_and_never_reaches_the_tree():
    """The others of the same SUBSCRIBE are granted; a filter of 65,535 levels (Mosquitto
    refuses it too) is refused before the tree grows a node for it."""
    b = Broker(Log("t"), Limits(max_topic_levels=3))
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(1, (("a/b/c", 1), ("a/b/c/d", 1), ("/" * 65534, 0), ("+/+/#", 2))))
    assert sub.packets() == [p.Suback(1, (1, p.SUBACK_FAILURE, p.SUBACK_FAILURE, 2))]
    assert set(b.sessions["s"].subscriptions) == {"a/b/c", "+/+/#"}
    assert len(b.tree) == 2 and b.tree._node_count() == 6
    assert b.stats.topic_levels_refused == 2
    assert b.sys_topics()["$SYS/broker/limits/topic_levels/refused"] == "2"


def test_a_publish_to_a_topic_deeper_than_max_topic_levels_closes_the_connection_unrouted():
    b = Broker(Log("t"), Limits(max_topic_levels=3))
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(1, (("#", 1),)))
    sub.packets()
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("a/b/c/d", b"x", 1, retain=True, packet_id=1))
    assert pub.closed and pub.packets() == []  # no PUBACK
    assert sub.packets() == [] and len(b.retained) == 0
    b.handle(pub, p.Publish("a/b/c", b"x", 0))  # at the limit: fine
    assert [x.topic for x in sub.packets()] == ["a/b/c"]
    assert b.stats.topic_levels_refused == 1


def test_a_will_on_a_topic_deeper_than_max_topic_levels_refuses_the_connect():
    b = Broker(Log("t"), Limits(max_topic_levels=3))
    link = Link()
    assert not b.connect(link, p.Connect("dev", will=p.Will("a/b/c/d", b"gone")))
    assert link.packets() == [] and "dev" not in b.sessions and b.connected == 0
    assert b.stats.topic_levels_refused == 1


def test_max_subscriptions_refuses_a_new_filter_but_a_known_one_may_be_replaced():
    b = Broker(Log("t"), Limits(max_subscriptions=2))
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("c", b"retained", 0, retain=True))
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(1, (("a", 1), ("b", 1), ("c", 1))))
    assert sub.packets() == [p.Suback(1, (1, 1, p.SUBACK_FAILURE))], "no retained message for a refused filter"
    b.handle(sub, p.Subscribe(2, (("a", 2), ("c", 0))))
    assert sub.packets() == [p.Suback(2, (2, p.SUBACK_FAILURE))]
    assert b.sessions["s"].subscriptions == {"a": 2, "b": 1}
    b.handle(sub, p.Unsubscribe(3, ("b",)))
    b.handle(sub, p.Subscribe(4, (("c", 0),)))
    assert sub.packets()[1:] == [p.Suback(4, (0,)), p.Publish("c", b"retained", 0, retain=True)]
    assert b.stats.subscriptions_refused == 2
    assert b.sys_topics()["$SYS/broker/limits/subscriptions/refused"] == "2"


def test_max_retained_messages_delivers_but_does_not_retain_a_new_topic_past_it():
    """Replacing and deleting a retained topic always pass; the broker's own $SYS topics
    neither count nor are refused."""
    b = Broker(Log("t"), Limits(max_retained_messages=2))
    b.publish_sys()
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(1, (("r/#", 0),)))
    sub.packets()
    pub, _ = connect(b, "pub")
    for t in ("r/1", "r/2", "r/3"):
        b.handle(pub, p.Publish(t, t.encode(), 1, retain=True, packet_id=1))
    assert [x.topic for x in sub.packets()] == ["r/1", "r/2", "r/3"], "a refused one is still delivered"
    assert b.retained.get("r/3") is None and b.stats.retained_refused == 1
    b.handle(pub, p.Publish("r/1", b"bigger now", 0, retain=True))  # replacing: allowed
    assert b.retained.get("r/1").payload == b"bigger now"
    b.handle(pub, p.Publish("r/2", b"", 0, retain=True))  # deleting: allowed, and frees a place
    b.handle(pub, p.Publish("r/3", b"r/3", 0, retain=True))
    assert b.retained.get("r/3").payload == b"r/3"
    b.publish_sys()
    assert b.retained.usage()[0] == 2 and len(b.retained) > 2
    assert b.sys_topics()["$SYS/broker/limits/retained/refused"] == "1"


def test_max_retained_bytes_counts_topic_and_payload_and_refuses_growth_past_it():
    b = Broker(Log("t"), Limits(max_retained_bytes=10))
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("t", b"123456789", 0, retain=True))  # 1 + 9 bytes: at the bound
    assert b.retained.usage() == (1, 10)
    b.handle(pub, p.Publish("u", b"1", 0, retain=True))  # a new topic past it
    b.handle(pub, p.Publish("t", b"1234567890", 0, retain=True))  # a bigger payload past it
    assert b.retained.get("u") is None and b.retained.get("t").payload == b"123456789"
    assert b.stats.retained_refused == 2
    b.handle(pub, p.Publish("t", b"1234", 0, retain=True))  # smaller: always
    b.handle(pub, p.Publish("u", b"1234", 0, retain=True))  # 5 + 5 bytes: fits again
    assert b.retained.usage() == (2, 10) and b.stats.retained_refused == 2


def test_a_persistent_session_expires_after_persistent_client_expiration_on_the_brokers_clock():
    """Counted from the disconnect; subscriptions and queue go with it; a publisher held for
    its full queue is told to retry; a connected or returned client's session stays."""
    now = [1000.0]
    b = Broker(Log("t"), Limits(max_inflight=1, max_queued=1, session_expiry=100.0), clock=lambda: now[0])
    gone, _ = connect(b, "gone", clean=False)
    b.handle(gone, p.Subscribe(1, (("q", 1),)))
    b.closed(gone, graceful=True)
    back, _ = connect(b, "back", clean=False)
    b.handle(back, p.Subscribe(1, (("other", 1),)))
    b.closed(back, graceful=True)
    here, _ = connect(b, "here", clean=False)
    pub, _ = connect(b, "pub")
    assert b.handle(pub, p.Publish("q", b"1", 1, packet_id=1))
    assert not b.handle(pub, p.Publish("q", b"2", 1, packet_id=2)), "held: the queue of 1 is full"
    now[0] = 1060.0
    back, _ = connect(b, "back", clean=False)  # returns, and leaves again: counted from now
    b.closed(back, graceful=False)
    now[0] = 1100.0
    assert b.expire_sessions(now[0]) == 0, "away exactly 100 s: not longer"
    now[0] = 1100.5
    assert b.expire_sessions(now[0]) == 1
    assert set(b.sessions) == {"back", "here", "pub"}
    assert b.tree.match("q") == {} and pub.retries == 1
    assert b.handle(pub, p.Publish("q", b"2", 1, packet_id=2))
    assert b.stats.sessions_expired == 1
    assert b.sys_topics()["$SYS/broker/limits/sessions/expired"] == "1"
    now[0] = 1160.5
    assert b.expire_sessions(now[0]) == 1 and set(b.sessions) == {"here", "pub"}
    now[0] = 10**9
    assert b.expire_sessions(now[0]) == 0 and "here" in b.sessions, "a connected client's session stays"


def test_persistent_client_expiration_of_zero_keeps_sessions_for_ever():
    now = [0.0]
    b = Broker(Log("t"), Limits(session_expiry=0), clock=lambda: now[0])
    s, _ = connect(b, "s", clean=False)
    b.closed(s, graceful=False)
    now[0] = 10**12
    assert b.expire_sessions(now[0]) == 0 and "s" in b.sessions


def test_limits_are_counted_under_sys_broker_limits():
    names = {t for t in Broker(Log("t")).sys_topics() if t.startswith("$SYS/broker/limits/")}
    assert names == {f"$SYS/broker/limits/{n}" for n in (
        "topic_levels/refused", "subscriptions/refused", "retained/refused", "sessions/expired",
        "connect_size/refused", "connection_rate/refused", "write_timeout/closed")}
def test_a_client_named_in_inflight_per_client_gets_its_own_window():
    b = Broker(Log("t"), Limits(max_inflight=2, inflight_per_client=(("*-ingest", 50),)))
    ingest, _ = connect(b, "iot-ingest")
    other, _ = connect(b, "iot-ingest-not")
    b.handle(ingest, p.Subscribe(1, (("t", 1),)))
    b.handle(other, p.Subscribe(1, (("t", 1),)))
    pub, _ = connect(b, "pub")
    for i in range(60):
        b.handle(pub, p.Publish("t", b"x", 1, packet_id=i + 1))
    assert sum(isinstance(x, p.Publish) for x in ingest.packets()) == 50
    assert sum(isinstance(x, p.Publish) for x in other.packets()) == 2


def test_a_queue_is_bounded_by_bytes_as_well_as_by_count():
    b = Broker(Log("t"), Limits(max_inflight=1, max_queued=1000, max_queued_bytes=1000))
    sub, _ = connect(b, "s", clean=False)
    b.handle(sub, p.Subscribe(1, (("t", 1),)))
    b.closed(sub, graceful=True)
    pub, _ = connect(b, "pub")
    taken = 0
    for i in range(50):
        if not b.handle(pub, p.Publish("t", b"x" * 100, 1, packet_id=i + 1)):
            break
        taken += 1
    assert taken == 10  # 10 x (100 + len("t")) bytes reach the bound; the 11th is held back
    assert b.stats.publish_held == 1


def test_held_publishers_are_woken_when_a_run_fits_not_at_every_acknowledgement():
    """A full queue of 100: publishers held for it are told to retry once a tenth of it (10)
    has drained, not after each PUBACK (each retry hands the core every held PUBLISH of every
    waiting publisher, and one freed slot takes only one); nothing is lost either way."""
    b = Broker(Log("t"), Limits(max_inflight=1, max_queued=100))
    sub, _ = connect(b, "s")
    b.handle(sub, p.Subscribe(1, (("o", 1),)))
    sub.packets()
    pubs = [connect(b, f"pub{i}")[0] for i in range(3)]
    for i in range(101):  # one in flight, 100 queued
        assert b.handle(pubs[0], p.Publish("o", b"x", 1, packet_id=i % 65535 + 1)) is True
    for pub in pubs:
        assert b.handle(pub, p.Publish("o", b"held", 1, packet_id=500)) is False
    acked = 0
    while all(pub.retries == 0 for pub in pubs):
        (pkt,) = sub.packets()
        b.handle(sub, p.Puback(pkt.packet_id))
        acked += 1
        assert acked <= 11, "held publishers not woken after a tenth of the queue drained"
    assert acked == 11 and all(pub.retries == 1 for pub in pubs)
    for pub in pubs:
        assert b.handle(pub, p.Publish("o", b"held", 1, packet_id=500)) is True
