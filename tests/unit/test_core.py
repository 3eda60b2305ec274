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

    def send(self, data: bytes) -> None:
        self.sent.append(data)

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
