"""MQTT 5.0 in the broker core, fed packets as tests/unit/test_core.py does: v5 clients beside
3.1.1 ones, each answered in its own protocol (the bytes decoded back with the client-role
codec of its version)."""

from __future__ import annotations

from daemons.broker import packets as p
from daemons.broker import packets5 as p5
from daemons.broker.core import Broker, Limits
from daemons.broker.packets import ReasonCode as R
from daemons.broker.packets5 import Properties, Subscription
from daemons.service import Log
from tests.unit.test_core import Link, connect as connect3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Link5(Link):
    def packets(self) -> list:
        out, data = self.backlog, b"".join(self.sent)
        self.backlog, self.sent = [], []
        while data:
            pkt, n = p5.decode(data, role="client")
            out.append(pkt)
            data = data[n:]
        return out


def connect5(b: Broker, cid: str, clean: bool = True, will=None, **props) -> tuple[Link5, p5.ConnackV5]:
    link = Link5()
    b.connect(link, p5.ConnectV5(cid, clean_start=clean, will=will,
                                 properties=Properties(**props) if props else p5.NO_PROPERTIES))
    connack, *link.backlog = link.packets()
    return link, connack


def sub5(b: Broker, link: Link5, *subs: Subscription, pid: int = 1, ident: int | None = None) -> p5.SubackV5:
    props = Properties(subscription_identifiers=(ident,)) if ident else p5.NO_PROPERTIES
    b.handle(link, p5.SubscribeV5(pid, subs, props))
    suback, *link.backlog = link.packets()
    return suback


def test_connack_v5_says_what_the_server_does():
    b = Broker(Log("t"), Limits(max_inflight=7, max_packet_size=1000, max_topic_alias=10, max_keepalive=30))
    link, ack = connect5(b, "")
    assert ack.reason_code == R.SUCCESS and not ack.session_present
    props = ack.properties
    assert props.assigned_client_identifier and props.assigned_client_identifier in b.sessions
    assert (props.receive_maximum, props.maximum_packet_size, props.topic_alias_maximum) == (7, 1000, 10)
    assert props.retain_available == props.wildcard_subscription_available == 1
    assert props.subscription_identifier_available == props.shared_subscription_available == 1
    assert props.server_keep_alive == 30 and link.keepalive == 30  # asked 60, the limit is 30


def test_refusals_are_connack_reason_codes():
    b = Broker(Log("t"), Limits(allow_zero_length_clientid=False))
    _, ack = connect5(b, "")
    assert ack.reason_code == R.CLIENT_IDENTIFIER_NOT_VALID and ack.properties.reason_string
    _, ack = connect5(b, "x", authentication_method="SCRAM-SHA-1")
    assert ack.reason_code == R.BAD_AUTHENTICATION_METHOD
    assert "x" not in b.sessions


def test_v3_and_v5_clients_exchange_messages_properties_only_to_v5():
    b = Broker(Log("t"))
    s5, _ = connect5(b, "s5")
    s3, _ = connect3(b, "s3")
    assert sub5(b, s5, Subscription("t", 1)).reason_codes == (R.GRANTED_QOS_1,)
    b.handle(s3, p.Subscribe(1, (("t", 1),)))
    s3.packets()
    pub, _ = connect5(b, "pub")
    props = Properties(payload_format_indicator=1, content_type="text/plain", response_topic="r/1",
                       correlation_data=b"\x00\x01", user_properties=(("a", "1"), ("a", "2")))
    b.handle(pub, p5.PublishV5("t", b"hello", 1, packet_id=5, properties=props))
    assert pub.packets() == [p5.PubackV5(5)]
    [got5] = s5.packets()
    assert got5.payload == b"hello" and got5.properties == props  # passed on unchanged
    [got3] = s3.packets()
    assert (got3.topic, got3.payload, got3.qos) == ("t", b"hello", 1)
    pub3, _ = connect3(b, "pub3")
    b.handle(pub3, p.Publish("t", b"from v3", 0))
    [got5] = s5.packets()
    assert got5.payload == b"from v3" and got5.properties == p5.NO_PROPERTIES


def test_puback_reason_codes_no_subscribers_and_not_authorized():
    b = Broker(Log("t"))
    pub, _ = connect5(b, "pub")
    b.handle(pub, p5.PublishV5("nobody", b"x", 1, packet_id=1))
    b.handle(pub, p5.PublishV5("$SYS/x", b"x", 2, packet_id=2))
    ack, rec = pub.packets()
    assert ack == p5.PubackV5(1, R.NO_MATCHING_SUBSCRIBERS)
    assert rec.reason_code == R.NOT_AUTHORIZED and rec.properties.reason_string
    assert not b.sessions["pub"].incoming_qos2, "a refused PUBREC ends the QoS 2 exchange"
    b.handle(pub, p5.PubrelV5(2))
    assert pub.packets() == [p5.PubcompV5(2, R.PACKET_IDENTIFIER_NOT_FOUND)]


def test_session_expiry_interval_keeps_and_then_expires_a_session():
    clock = Clock()
    b = Broker(Log("t"), clock=clock)
    s, _ = connect5(b, "s", session_expiry_interval=60)
    sub5(b, s, Subscription("t", 1))
    b.closed(s, graceful=False)
    pub, _ = connect3(b, "pub")
    b.handle(pub, p.Publish("t", b"queued", 1, packet_id=1))
    clock.now += 30
    assert b.expire_sessions(clock.now) == 0
    s, ack = connect5(b, "s", clean=False, session_expiry_interval=60)
    assert ack.session_present and [m.payload for m in s.packets()] == [b"queued"]
    b.handle(s, p5.DisconnectV5(properties=Properties(session_expiry_interval=5)))  # shortened on the way out
    clock.now += 6
    assert b.expire_sessions(clock.now) == 1 and "s" not in b.sessions
    assert b.sys_topics()["$SYS/broker/limits/sessions/expired"] == "1"


def test_session_expiry_zero_ends_with_the_connection_and_clean_start_discards():
    b = Broker(Log("t"))
    s, _ = connect5(b, "s")  # no Session Expiry Interval: 0
    sub5(b, s, Subscription("t", 1))
    b.closed(s, graceful=True)
    assert "s" not in b.sessions
    s, _ = connect5(b, "s", session_expiry_interval=100)
    sub5(b, s, Subscription("t", 1))
    b.closed(s, graceful=True)
    _, ack = connect5(b, "s", clean=True, session_expiry_interval=100)
    assert not ack.session_present and not b.sessions["s"].subscriptions


def test_message_expiry_drops_queued_and_sends_the_remaining_interval():
    clock = Clock()
    b = Broker(Log("t"), clock=clock)
    s, _ = connect5(b, "s", session_expiry_interval=600)
    sub5(b, s, Subscription("t", 1))
    b.closed(s, graceful=False)
    pub, _ = connect5(b, "pub")
    b.handle(pub, p5.PublishV5("t", b"short", 1, packet_id=1, properties=Properties(message_expiry_interval=10)))
    b.handle(pub, p5.PublishV5("t", b"long", 1, packet_id=2, properties=Properties(message_expiry_interval=100)))
    clock.now += 20
    s, _ = connect5(b, "s", clean=False, session_expiry_interval=600)
    [got] = s.packets()
    assert got.payload == b"long" and got.properties.message_expiry_interval == 80
    assert b.sys_topics()["$SYS/broker/publish/messages/expired"] == "1"


def test_retained_message_expires():
    clock = Clock()
    b = Broker(Log("t"), clock=clock)
    pub, _ = connect5(b, "pub")
    b.handle(pub, p5.PublishV5("r", b"v", 0, retain=True, properties=Properties(message_expiry_interval=5)))
    s, _ = connect5(b, "s")
    sub5(b, s, Subscription("r", 0))
    [got] = s.packets()
    assert got.retain and got.properties.message_expiry_interval == 5
    clock.now += 6
    s2, _ = connect5(b, "s2")
    sub5(b, s2, Subscription("r", 0))
    assert s2.packets() == [] and len(b.retained) == 0


def test_topic_alias_incoming_unknown_alias_0x82_above_the_maximum_0x94():
    b = Broker(Log("t"), Limits(max_topic_alias=2))
    s, _ = connect5(b, "s")
    sub5(b, s, Subscription("long/topic", 0))
    pub, _ = connect5(b, "pub")
    b.handle(pub, p5.PublishV5("long/topic", b"1", 0, properties=Properties(topic_alias=1)))
    b.handle(pub, p5.PublishV5("", b"2", 0, properties=Properties(topic_alias=1)))
    assert [(m.topic, m.payload) for m in s.packets()] == [("long/topic", b"1"), ("long/topic", b"2")]
    b.handle(pub, p5.PublishV5("", b"3", 0, properties=Properties(topic_alias=2)))  # never set: a protocol error
    [d] = pub.packets()
    assert d.reason_code == R.PROTOCOL_ERROR and pub.closed
    pub2, _ = connect5(b, "pub2")
    b.handle(pub2, p5.PublishV5("x", b"", 0, properties=Properties(topic_alias=3)))  # above our maximum
    assert pub2.packets()[0].reason_code == R.TOPIC_ALIAS_INVALID


def test_topic_alias_outgoing_up_to_the_clients_maximum():
    b = Broker(Log("t"))
    s, _ = connect5(b, "s", topic_alias_maximum=1)
    sub5(b, s, Subscription("#", 0))
    pub, _ = connect3(b, "pub")
    for topic in ("a", "a", "b", "a"):
        b.handle(pub, p.Publish(topic, b"x", 0))
    got = [(m.topic, m.properties.topic_alias) for m in s.packets()]
    assert got == [("a", 1), ("", 1), ("b", None), ("", 1)]


def test_receive_maximum_is_the_outgoing_window():
    b = Broker(Log("t"), Limits(max_inflight=20))
    s, _ = connect5(b, "s", receive_maximum=2)
    sub5(b, s, Subscription("t", 1))
    pub, _ = connect3(b, "pub")
    for i in range(3):
        b.handle(pub, p.Publish("t", b"%d" % i, 1, packet_id=i + 1))
    got = s.packets()
    assert [m.payload for m in got] == [b"0", b"1"]
    b.handle(s, p5.PubackV5(got[0].packet_id))
    assert [m.payload for m in s.packets()] == [b"2"]


def test_message_larger_than_clients_maximum_packet_size_is_not_sent():
    b = Broker(Log("t"))
    s, _ = connect5(b, "s", maximum_packet_size=100)
    sub5(b, s, Subscription("t", 1))
    pub, _ = connect3(b, "pub")
    b.handle(pub, p.Publish("t", b"x" * 200, 1, packet_id=1))
    b.handle(pub, p.Publish("t", b"small", 1, packet_id=2))
    assert [m.payload for m in s.packets()] == [b"small"]
    assert b.sys_topics()["$SYS/broker/publish/messages/too_large"] == "1"
    assert len(b.sessions["s"].inflight) == 1


def test_no_local_retain_as_published_and_retain_handling():
    b = Broker(Log("t"))
    c, _ = connect5(b, "c")
    sub5(b, c, Subscription("t", 0, no_local=True), Subscription("rap", 0, retain_as_published=True))
    b.handle(c, p5.PublishV5("t", b"own", 0))
    assert c.packets() == [], "No Local: not sent back to its publisher"
    other, _ = connect5(b, "o")
    b.handle(other, p5.PublishV5("t", b"other", 0))
    b.handle(other, p5.PublishV5("rap", b"kept", 0, retain=True))
    assert [(m.payload, m.retain) for m in c.packets()] == [(b"other", False), (b"kept", True)]
    s, _ = connect5(b, "s")
    sub5(b, s, Subscription("rap", 0, retain_handling=1))
    assert [m.payload for m in s.packets()] == [b"kept"]
    sub5(b, s, Subscription("rap", 0, retain_handling=1), pid=2)
    assert s.packets() == [], "retain handling 1: only for a new subscription"
    sub5(b, s, Subscription("rap", 0, retain_handling=2), pid=3)
    assert s.packets() == []
    b.handle(other, p5.PublishV5("rap", b"live", 0, retain=True))
    assert [(m.payload, m.retain) for m in s.packets()] == [(b"live", False)], "without RAP the flag is cleared"


def test_subscription_identifiers_one_per_matching_subscription():
    b = Broker(Log("t"))
    s, _ = connect5(b, "s")
    sub5(b, s, Subscription("a/+", 1), ident=7)
    sub5(b, s, Subscription("a/#", 0), pid=2, ident=9)
    sub5(b, s, Subscription("other", 0), pid=3)
    pub, _ = connect3(b, "pub")
    b.handle(pub, p.Publish("a/b", b"x", 1, packet_id=1))
    [got] = s.packets()
    assert sorted(got.properties.subscription_identifiers) == [7, 9]
    b.handle(s, p5.UnsubscribeV5(4, ("a/#", "never")))
    assert s.packets() == [p5.UnsubackV5(4, (R.SUCCESS, R.NO_SUBSCRIPTION_EXISTED))]


def test_will_delay_interval_cancelled_by_reconnect_and_published_when_due():
    clock = Clock()
    b = Broker(Log("t"), clock=clock)
    w, _ = connect5(b, "w")
    sub5(b, w, Subscription("will/#", 0))
    will = p5.WillV5("will/x", b"gone", 0, properties=Properties(will_delay_interval=10, content_type="text"))
    c, _ = connect5(b, "c", will=will, session_expiry_interval=100)
    b.closed(c, graceful=False)
    clock.now += 5
    b.expire_sessions(clock.now)
    assert w.packets() == []
    c, _ = connect5(b, "c", clean=False, will=will, session_expiry_interval=100)  # back in time
    clock.now += 20
    b.expire_sessions(clock.now)
    assert w.packets() == []
    b.closed(c, graceful=False)
    clock.now += 11
    b.expire_sessions(clock.now)
    [got] = w.packets()
    assert got.payload == b"gone" and got.properties.content_type == "text"


def test_will_published_at_once_when_the_session_ends_before_the_delay():
    clock = Clock()
    b = Broker(Log("t"), clock=clock)
    w, _ = connect5(b, "w")
    sub5(b, w, Subscription("will", 0))
    will = p5.WillV5("will", b"gone", 0, properties=Properties(will_delay_interval=100))
    c, _ = connect5(b, "c", will=will)  # Session Expiry 0: the session ends with the connection
    b.closed(c, graceful=False)
    assert [m.payload for m in w.packets()] == [b"gone"]


def test_disconnect_with_will_message_publishes_it():
    b = Broker(Log("t"))
    w, _ = connect5(b, "w")
    sub5(b, w, Subscription("will", 0))
    c, _ = connect5(b, "c", will=p5.WillV5("will", b"bye", 0))
    b.handle(c, p5.DisconnectV5(R.DISCONNECT_WITH_WILL_MESSAGE))
    assert [m.payload for m in w.packets()] == [b"bye"]
    c, _ = connect5(b, "c", will=p5.WillV5("will", b"bye", 0))
    b.handle(c, p5.DisconnectV5())
    assert w.packets() == []


def test_request_problem_information_0_keeps_reason_strings_off_acknowledgements():
    b = Broker(Log("t"))
    pub, _ = connect5(b, "pub", request_problem_information=0)
    b.handle(pub, p5.PublishV5("$SYS/x", b"x", 1, packet_id=1))
    assert pub.packets() == [p5.PubackV5(1, R.NOT_AUTHORIZED)]


def test_session_taken_over_gets_disconnect_0x8e():
    b = Broker(Log("t"))
    old, _ = connect5(b, "c")
    connect5(b, "c")
    assert old.packets() == [p5.DisconnectV5(R.SESSION_TAKEN_OVER, Properties(
        reason_string="another connection took the session over"))]
    assert old.closed


def test_suback_reason_codes_for_acl_and_quota():
    b = Broker(Log("t"), Limits(max_subscriptions=1))
    s, _ = connect5(b, "s")
    ack = sub5(b, s, Subscription("a", 2), Subscription("b", 0))
    assert ack.reason_codes == (R.GRANTED_QOS_2, R.QUOTA_EXCEEDED)


def test_receive_maximum_exceeded_disconnects_0x93():
    b = Broker(Log("t"), Limits(max_inflight=2))
    pub, _ = connect5(b, "pub")
    for pid in (1, 2, 3):
        b.handle(pub, p5.PublishV5("t", b"x", 2, packet_id=pid))
    got = pub.packets()
    assert got[:2] == [p5.PubrecV5(1, R.NO_MATCHING_SUBSCRIBERS), p5.PubrecV5(2, R.NO_MATCHING_SUBSCRIBERS)]
    assert got[2].reason_code == R.RECEIVE_MAXIMUM_EXCEEDED and pub.closed


def test_store_keeps_v5_session_expiry_options_and_message_properties_across_a_restart(tmp_path):
    import asyncio

    from daemons.broker.store import Store
    from tests.unit.test_store import settle

    loop = asyncio.new_event_loop()
    try:
        def open_broker():
            store = Store(tmp_path / "store.db", Log("t"), loop, quota=1 << 30)
            b = Broker(Log("t"), store=store)
            b.restore(store.open(page=1000))
            return b, store

        b, store = open_broker()
        s, _ = connect5(b, "s", session_expiry_interval=3600)
        b.handle(s, p5.SubscribeV5(1, (Subscription("t", 1, retain_as_published=True),),
                                   Properties(subscription_identifiers=(42,))))
        settle(loop, store)
        assert s.packets() == [p5.SubackV5(1, (R.GRANTED_QOS_1,))]
        b.closed(s, graceful=False)
        pub, _ = connect5(b, "pub")
        props = Properties(message_expiry_interval=3600, content_type="a/b", user_properties=(("k", "v"),))
        b.handle(pub, p5.PublishV5("t", b"kept", 1, packet_id=1, properties=props))
        b.handle(pub, p5.PublishV5("r", b"ret", 0, retain=True, properties=props))
        settle(loop, store)
        store.close()

        b, store = open_broker()
        restored = b.sessions["s"]
        assert restored.expiry == 3600 and restored.disconnected_at is not None
        s, ack = connect5(b, "s", clean=False, session_expiry_interval=3600)
        assert ack.session_present
        [got] = s.packets()
        assert got.payload == b"kept" and got.properties.subscription_identifiers == (42,)
        assert got.properties.content_type == "a/b" and got.properties.user_properties == (("k", "v"),)
        assert 0 < got.properties.message_expiry_interval <= 3600
        b.handle(s, p5.SubscribeV5(2, (Subscription("r", 0),)))
        settle(loop, store)
        [ret] = [x for x in s.packets() if type(x) is p5.PublishV5]
        assert ret.payload == b"ret" and ret.properties.content_type == "a/b"
        store.close()
    finally:
        loop.close()


def test_store_file_of_an_older_release_gets_the_v5_columns(tmp_path):
    import asyncio
    import sqlite3

    from daemons.broker.store import Store

    old = sqlite3.connect(tmp_path / "store.db")
    old.executescript("""
        CREATE TABLE sessions (sid INTEGER PRIMARY KEY, client_id TEXT NOT NULL UNIQUE, subscriptions TEXT NOT NULL,
            disconnected_at REAL);
        CREATE TABLE messages (seq INTEGER PRIMARY KEY, sid INTEGER NOT NULL, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, pid INTEGER,
            pubrel INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
        INSERT INTO sessions VALUES (1, 'old', '{"t": 1}', 5.0);
        INSERT INTO messages VALUES (1, 1, 't', X'6869', 1, 0, NULL, 0);
        INSERT INTO retained VALUES ('r', X'6869', 0);
    """)
    old.commit()
    old.close()
    loop = asyncio.new_event_loop()
    try:
        store = Store(tmp_path / "store.db", Log("t"), loop, quota=1 << 30)
        loaded = store.open(page=100)
        [s] = loaded.sessions
        assert (s.client_id, s.subscriptions, s.expiry, len(s.rows)) == ("old", {"t": 1}, None, 1)
        assert loaded.retained == [("r", b"hi", 0, None, None)] and loaded.skipped == 0
        store.close()
    finally:
        loop.close()


def login5(b: Broker, cid: str, user: str | None = None, password: bytes | None = None) -> tuple[Link5, p5.ConnackV5]:
    link = Link5()
    b.connect(link, p5.ConnectV5(cid, username=user, password=password))
    connack, *link.backlog = link.packets()
    return link, connack


def test_acl_and_passwords_answer_v5_clients_with_reason_codes():
    from daemons.broker.core import Access
    from tests.unit.test_core_access import ACL, PASSWORDS

    b = Broker(Log("t"), access=Access(passwords=PASSWORDS, acl=ACL, allow_anonymous=False))
    assert login5(b, "x", "alice", b"wrong")[1].reason_code == R.BAD_USER_NAME_OR_PASSWORD
    assert login5(b, "y")[1].reason_code == R.NOT_AUTHORIZED
    bob, ack = login5(b, "bob-1", "bob", b"builder")
    assert ack.reason_code == R.SUCCESS
    assert sub5(b, bob, Subscription("public/a", 1), Subscription("secret", 1)).reason_codes == (
        R.GRANTED_QOS_1, R.NOT_AUTHORIZED)
    b.handle(bob, p5.PublishV5("public/a", b"x", 1, packet_id=3))  # bob may read there, not write
    [ack] = bob.packets()
    assert ack.reason_code == R.NOT_AUTHORIZED
    assert b.sys_topics()["$SYS/broker/access/publish/denied"] == "1"


def test_shared_subscription_in_its_v5_form_shares_with_a_v3_member():
    b = Broker(Log("t"))
    m1, _ = connect5(b, "m1")
    m2, _ = connect3(b, "m2")
    assert sub5(b, m1, Subscription("$share/g/jobs/#", 1)).reason_codes == (R.GRANTED_QOS_1,)
    b.handle(m2, p.Subscribe(1, (("$share/g/jobs/#", 1),)))
    m2.packets()
    pub, _ = connect5(b, "pub")
    for i in range(4):
        b.handle(pub, p5.PublishV5("jobs/x", b"%d" % i, 1, packet_id=i + 1))
    got1, got2 = [m.payload for m in m1.packets()], [m.payload for m in m2.packets()]
    assert sorted(got1 + got2) == [b"0", b"1", b"2", b"3"] and got1 and got2, "each message to one member"
