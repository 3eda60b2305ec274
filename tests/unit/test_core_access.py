"""The core's access control fed packets directly (as test_core.py), with real password files
and ACLs parsed by auth.py: CONNACK codes, denied PUBLISH and SUBSCRIBE, what each reader may
receive (live, retained, wills), $SYS, and rules swapped in as SIGHUP does."""

from __future__ import annotations

from daemons.broker import packets as p
from daemons.broker.auth import Acl, PasswordFile, hash_password
from daemons.broker.core import Access, Broker
from daemons.service import Log
from tests.unit.test_core import Link

PASSWORDS = PasswordFile.parse([f"alice:{hash_password(b'wonderland')}", f"bob:{hash_password(b'builder')}"])
ACL = Acl.parse([
    "topic read public/#",
    "user alice",
    "topic readwrite public/#",
    "topic write alerts/#",
    "user bob",
    "topic read public/#",
    "topic read alerts/#",
    "pattern readwrite devices/%c/#",
])


def broker(**kw) -> Broker:
    return Broker(Log("t"), access=Access(**kw))


def login(b: Broker, cid: str, user: str | None = None, password: bytes | None = None,
          will: p.Will | None = None) -> tuple[Link, p.Connack]:
    link = Link()
    b.connect(link, p.Connect(cid, clean_session=True, username=user, password=password, will=will))
    connack, *link.backlog = link.packets()
    return link, connack


def test_connack_codes():
    b = broker(passwords=PASSWORDS, allow_anonymous=False)
    assert login(b, "a", "alice", b"wonderland")[1].return_code == p.ConnackCode.ACCEPTED
    assert login(b, "b", "alice", b"wrong")[1].return_code == p.ConnackCode.BAD_USERNAME_OR_PASSWORD
    assert login(b, "c", "mallory", b"x")[1].return_code == p.ConnackCode.BAD_USERNAME_OR_PASSWORD
    assert login(b, "d", "alice")[1].return_code == p.ConnackCode.BAD_USERNAME_OR_PASSWORD  # no password
    assert login(b, "e")[1].return_code == p.ConnackCode.NOT_AUTHORIZED  # anonymous
    assert b.stats.logins_refused == 4
    anonymous_ok = broker(passwords=PASSWORDS, allow_anonymous=True)
    assert login(anonymous_ok, "e")[1].return_code == p.ConnackCode.ACCEPTED
    assert login(anonymous_ok, "f", "alice", b"wrong")[1].return_code == p.ConnackCode.BAD_USERNAME_OR_PASSWORD


def test_a_denied_publish_is_acknowledged_and_not_delivered():
    b = broker(passwords=PASSWORDS, acl=ACL)
    bob, _ = login(b, "bob-1", "bob", b"builder")
    b.handle(bob, p.Subscribe(1, (("#", 1), ("alerts/#", 1))))
    assert bob.packets() == [p.Suback(1, (1, 1))]
    alice, _ = login(b, "alice-1", "alice", b"wonderland")
    b.handle(alice, p.Publish("alerts/fire", b"!", 1, packet_id=1))
    b.handle(alice, p.Publish("devices/bob-1/cmd", b"x", 1, packet_id=2))  # bob's pattern, not hers
    b.handle(alice, p.Publish("$SYS/broker/uptime", b"0", 1, packet_id=3))
    assert alice.packets() == [p.Puback(1), p.Puback(2), p.Puback(3)]
    got = [m for m in bob.packets() if isinstance(m, p.Publish)]
    assert [(m.topic, m.payload) for m in got] == [("alerts/fire", b"!")]  # once, though two filters match
    assert b.stats.publish_denied == 2


def test_subscriptions_nobody_could_read_anything_of_get_0x80_next_to_granted_ones():
    b = broker(passwords=PASSWORDS, acl=ACL)
    anon, _ = login(b, "anon")
    b.handle(anon, p.Subscribe(1, (("public/#", 0), ("alerts/#", 0), ("#", 0), ("devices/anon/#", 1))))
    assert anon.packets() == [p.Suback(1, (0, 0x80, 0, 1))]
    alice, _ = login(b, "alice-1", "alice", b"wonderland")
    b.handle(alice, p.Publish("alerts/x", b"a", 0))
    b.handle(alice, p.Publish("public/x", b"p", 0))
    assert [m.topic for m in anon.packets() if isinstance(m, p.Publish)] == ["public/x"]  # "#" filtered


def test_retained_messages_and_wills_reach_only_who_may_read_them():
    b = broker(passwords=PASSWORDS, acl=ACL)
    alice, _ = login(b, "alice-1", "alice", b"wonderland", will=p.Will("alerts/alice-gone", b"bye", 1, True))
    b.handle(alice, p.Publish("alerts/state", b"hot", 1, retain=True, packet_id=1))
    b.handle(alice, p.Publish("public/state", b"ok", 1, retain=True, packet_id=2))
    anon, _ = login(b, "anon")
    b.handle(anon, p.Subscribe(1, (("#", 1),)))
    assert [m.topic for m in anon.packets() if isinstance(m, p.Publish)] == ["public/state"]
    bob, _ = login(b, "bob-1", "bob", b"builder")
    b.handle(bob, p.Subscribe(1, (("alerts/#", 1),)))
    assert [m.topic for m in bob.packets() if isinstance(m, p.Publish)] == ["alerts/state"]
    b.closed(alice, graceful=False)  # her will: she may write alerts/#
    assert [m.topic for m in bob.packets() if isinstance(m, p.Publish)] == ["alerts/alice-gone"]
    assert anon.packets() == []
    bob2, _ = login(b, "bob-2", "bob", b"builder", will=p.Will("alerts/bob-gone", b"bye", 0, False))
    b.closed(bob2, graceful=False)  # bob may not write alerts/#: his will is not published
    assert bob.packets() == []


def test_no_will_under_sys():
    b = broker()
    watcher, _ = login(b, "w")
    b.handle(watcher, p.Subscribe(1, (("$SYS/#", 0),)))
    watcher.packets()
    c, _ = login(b, "c", will=p.Will("$SYS/broker/version", b"fake", 0, True))
    b.closed(c, graceful=False)
    assert watcher.packets() == [] and b.stats.publish_denied == 1


def test_new_rules_apply_from_the_next_packet_on():
    access = Access(passwords=PASSWORDS, acl=ACL)
    b = Broker(Log("t"), access=access)
    bob, _ = login(b, "bob-1", "bob", b"builder")
    b.handle(bob, p.Subscribe(1, (("public/#", 0),)))
    bob.packets()
    alice, _ = login(b, "alice-1", "alice", b"wonderland")
    b.handle(alice, p.Publish("public/a", b"1", 0))
    assert len([m for m in bob.packets() if isinstance(m, p.Publish)]) == 1
    access.acl = Acl.parse(["user alice", "topic readwrite public/#"])  # bob loses his read right
    b.handle(alice, p.Publish("public/a", b"2", 0))
    assert bob.packets() == []
    access.passwords = PasswordFile.parse([f"alice:{hash_password(b'new')}"])
    assert login(b, "alice-2", "alice", b"wonderland")[1].return_code == p.ConnackCode.BAD_USERNAME_OR_PASSWORD
    assert not alice.closed  # nobody is disconnected by a reload
