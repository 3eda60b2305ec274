"""auth.py pinned to Mosquitto 2.0 itself: a password file `iotctl passwd` wrote is one
Mosquitto accepts, and one ACL file, given to a real Mosquitto, to iot-broker and to `Acl`,
yields the same decisions for the same client actions (a table, each row a client id, a user and an action).

What the table found in Mosquitto 2.0.11 (and auth.py's docstring explains): it answers every
SUBSCRIBE with success and checks read access per message as it delivers, so for a subscribe
row the comparison is between the messages Mosquitto delivers and `Acl.can_read`; the SUBACK
it sends is checked to be a grant, and `can_subscribe`'s stricter answer (the broker's SUBACK
0x80) is checked against the table.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from daemons.broker.auth import Acl, PasswordFile
from daemons.broker.topics import matches
from tests.mqttraw import RawClient, connack, connect, parse_publish, publish, puback, suback, subscribe
from tests.support import BIN, Mosquitto

pytestmark = pytest.mark.slow

IOTCTL = str(BIN / "iotctl")
MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"


def iotctl_passwd(*args: str) -> None:
    subprocess.run([IOTCTL, "passwd", *args], check=True, capture_output=True, timeout=60)


def mosquitto_with(directory: Path, conf: str) -> Mosquitto:
    # Run as root, Mosquitto drops to the user "mosquitto" before it reads the password and ACL
    # files, and could then read neither a 0600 file of ours nor pytest's 0700 folders.
    if os.geteuid() == 0:
        conf += "user root\n"
    return Mosquitto(directory, conf=conf).start()


# --- logins -------------------------------------------------------------------------------


def test_mosquitto_accepts_the_passwords_iotctl_passwd_wrote(tmp_path):
    f = tmp_path / "passwd"
    iotctl_passwd("-c", "-b", str(f), "alice", "s3cret")
    iotctl_passwd("-b", str(f), "bob smith", "pässwörd")
    iotctl_passwd("-H", "sha512", "-b", str(f), "old", "six")  # $6$
    plain = tmp_path / "plain"
    plain.write_text("carol:cpass\n")
    iotctl_passwd("-U", str(plain))
    f.write_text(f.read_text() + plain.read_text())
    assert len(PasswordFile.load(f)) == 4
    m = mosquitto_with(tmp_path, f"allow_anonymous false\npassword_file {f}\n")
    try:
        def pub(*auth: str) -> int:
            return subprocess.run([MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(m.port), "-q", "1", "-t", "t",
                                   "-m", "x", *auth], capture_output=True, timeout=30).returncode

        for user, password in [("alice", "s3cret"), ("bob smith", "pässwörd"), ("old", "six"), ("carol", "cpass")]:
            assert pub("-u", user, "-P", password) == 0, user
            assert pub("-u", user, "-P", password + "x") == 5, user  # CONNACK 5, not authorised
        assert pub("-u", "nobody", "-P", "s3cret") == 5
        assert pub() == 5  # anonymous, with allow_anonymous false
    finally:
        m.stop()


# --- one ACL, both judges -----------------------------------------------------------------

ACL = """\
# anonymous clients
topic read sensors/+/temp
topic write anon/out
topic readwrite shared/#
topic deny shared/secret
pattern read p/%c/#
pattern readwrite home/%u/#
pattern deny home/%u/locked
pattern write dev-%c/cmd
pattern readwrite everyone/#
user alice
topic readwrite a/#
topic deny a/secret
user bob
topic read b/+/r
topic write b/w/#
topic readwrite home/bob/locked
user dollar
topic readwrite #
topic write $app/in
user admin
topic readwrite #
topic readwrite $app/#
"""
PASSWORDS = {"alice": "pa", "bob": "pb", "dollar": "pd", "admin": "pz", "carol": "pc", "u/v": "puv", "ev#l": "pe"}

# (client id, user, topic, may write) - may write as both judges say it
PUBLISH_ROWS = [
    ("w1", None, "anon/out", True),
    ("w2", None, "sensors/x/temp", False),
    ("w3", None, "shared/x", True),
    ("w4", None, "shared/secret", False),
    ("w5", None, "dev-w5/cmd", True),
    ("w6", None, "dev-other/cmd", False),
    ("w7", None, "everyone/x", True),
    ("w+8", None, "everyone/x", False),  # "+" in the client id: no pattern applies
    ("w+8", None, "anon/out", True),  # ... but the anonymous rules still do
    ("w9", "ev#l", "everyone/x", False),
    ("s/l", None, "dev-s/l/cmd", True),  # "/" in the client id only adds levels
    ("w10", "alice", "a/b/c", True),
    ("w11", "alice", "a/secret", False),
    ("w12", "alice", "anon/out", False),  # a user gets no anonymous rules
    ("w13", "alice", "home/alice/x", True),
    ("w14", "alice", "home/alice/locked", False),  # deny pattern over grant pattern
    ("w15", "bob", "home/bob/locked", True),  # the user's own grant decides before patterns
    ("w16", "bob", "b/w/1/2", True),
    ("w17", "bob", "b/x/r", False),
    ("w18", "carol", "home/carol/x", True),  # no block of her own: patterns only
    ("w19", "carol", "a/b", False),
    ("w20", "u/v", "home/u/v/x", True),
    ("w21", "u/v", "home/u/x", False),
    ("w22", "dollar", "x/y", True),
    ("w23", "dollar", "$app/x", False),  # "#" does not match a $ topic
    ("w24", "dollar", "$app/in", True),
]

PROBES = ["sensors/x/temp", "sensors/x/hum", "shared/x", "shared/secret", "p/r1/x", "p/r2/x", "p/s/l/x",
          "home/alice/x", "home/alice/locked", "home/bob/locked", "home/u/v/x", "home/carol/x", "a/b",
          "a/secret", "b/x/r", "everyone/x", "x/y", "$app/x", "$app/in"]

# (client id, user, filter, can_subscribe): Mosquitto grants each; what it delivers of
# PROBES must be what matches the filter and Acl.can_read allows; we refuse (0x80) only
# filters of which no read rule could match anything.
SUBSCRIBE_ROWS = [
    ("r1", None, "sensors/+/temp", True),
    ("r2", None, "sensors/#", True),  # Mosquitto: granted, delivers sensors/x/temp only
    ("r3", None, "#", True),
    ("r4", None, "shared/#", True),  # shared/secret withheld at delivery
    ("r5", None, "p/r5/#", True),
    ("r6", None, "p/+/x", True),
    ("r+7", None, "#", True),  # "+" in the client id: anonymous topic rules only
    ("s/l", None, "p/s/l/#", True),
    ("r8", "alice", "a/#", True),
    ("r9", "alice", "#", True),
    ("r10", "alice", "home/+/locked", True),
    ("r11", "bob", "home/bob/locked", True),
    ("r12", "u/v", "home/u/v/#", True),
    ("r13", "u/v", "home/#", True),
    ("r14", "ev#l", "#", False),
    ("r15", "carol", "#", True),
    ("r16", "dollar", "#", True),
    ("r17", "dollar", "$app/#", False),
    ("r18", None, "nobody/#", False),  # no read rule could match any of it
    ("r19", "alice", "b/#", False),
]


class Judge:
    def __init__(self, kind: str, port: int, acl: Acl):
        self.kind, self.port, self.acl = kind, port, acl


@pytest.fixture(params=["mosquitto", "iot-broker"])
def judges(request, tmp_path):
    """The same ACL and password file given to Mosquitto and to iot-broker: each test runs
    its table against both, and against `Acl`."""
    directory = tmp_path / "acl-cross-check"
    directory.mkdir()
    (directory / "acl").write_text(ACL)
    pwfile = directory / "passwd"
    for n, (user, password) in enumerate(PASSWORDS.items()):
        iotctl_passwd(*(["-c"] if n == 0 else []), "-b", str(pwfile), user, password)
    acl = Acl.load(directory / "acl")
    if request.param == "mosquitto":
        m = mosquitto_with(directory, f"password_file {pwfile}\nacl_file {directory / 'acl'}\n")
        try:
            yield Judge("mosquitto", m.port, acl)
        finally:
            m.stop()
    else:
        b = request.getfixturevalue("broker_factory")(
            f'password_file = "{pwfile}"\nacl_file = "{directory / "acl"}"\nallow_anonymous = true\nsys_interval = 0\n')
        yield Judge("iot-broker", b.port, acl)


def client(port: int, client_id: str, user: str | None) -> RawClient:
    c = RawClient(port)
    password = None if user is None else PASSWORDS[user].encode()
    c.send(connect(client_id, username=user, password=password))
    c.expect(connack(0), what=f"CONNACK for {client_id!r} user {user!r}")
    return c


def test_publish_decisions_are_mosquittos(judges):
    m, acl = judges, judges.acl
    watcher = client(m.port, "watcher", "admin")
    watcher.send(subscribe(1, [("#", 0), ("$app/#", 0)]))
    watcher.expect(suback(1, [0, 0]))
    table = []
    try:
        for n, (cid, user, topic, expected) in enumerate(PUBLISH_ROWS):
            payload = f"row {n}".encode()
            with client(m.port, cid, user) as c:
                # Mosquitto acknowledges a denied QoS 1 PUBLISH too, and drops it: the PUBACK
                # says it has decided, so the watcher's PINGRESP comes after any delivery.
                c.send(publish(topic, payload, 1, n + 1))
                c.expect(puback(n + 1), what=f"PUBACK for row {n}")
                c.disconnect()
            delivered = any((p.topic, p.payload) == (topic, payload)
                            for p in map(parse_publish, watcher.until_pingresp()))
            table.append((cid, user, topic, delivered, acl.can_write(cid, user, topic), expected))
    finally:
        watcher.disconnect()
    wrong = [row for row in table if not row[3] == row[4] == row[5]]
    assert not wrong, "(client id, user, topic, Mosquitto delivered, Acl.can_write, table) that differ:\n" + \
        "\n".join(map(repr, wrong))


def test_subscribe_and_read_decisions_are_mosquittos(judges):
    m, acl = judges, judges.acl
    readers = []
    try:
        for n, (cid, user, topic_filter, may_subscribe) in enumerate(SUBSCRIBE_ROWS):
            c = client(m.port, cid, user)
            readers.append(c)
            c.send(subscribe(n + 1, [(topic_filter, 0)]))
            # Mosquitto 2.0 with an acl_file grants every subscription ("FIXME - implement
            # ACL subscription strings"); if this changes, so must auth.py's docstring.
            # iot-broker answers 0x80 where nothing of the filter could ever be read.
            code = 0 if judges.kind == "mosquitto" or may_subscribe else 0x80
            c.expect(suback(n + 1, [code]), what=f"SUBACK {code:#x} for {topic_filter!r} from {judges.kind}")
        with client(m.port, "feeder", "admin") as feeder:
            for n, topic in enumerate(PROBES):
                feeder.send(publish(topic, b"probe", 1, n + 1))
                feeder.expect(puback(n + 1), what=f"PUBACK for {topic}")
            feeder.disconnect()
        wrong = []
        for c, (cid, user, topic_filter, may_subscribe) in zip(readers, SUBSCRIBE_ROWS):
            got = sorted(parse_publish(p).topic for p in c.until_pingresp())
            ours = sorted(t for t in PROBES if matches(topic_filter, t) and acl.can_read(cid, user, t))
            # SUBACK 0x80 from us must never hide what Mosquitto delivers.
            if got != ours or acl.can_subscribe(cid, user, topic_filter) is not may_subscribe or (
                    got and not may_subscribe):
                wrong.append(f"{cid!r} {user!r} {topic_filter!r}: Mosquitto delivered {got}, can_read allows "
                             f"{ours}; can_subscribe {acl.can_subscribe(cid, user, topic_filter)}, "
                             f"table {may_subscribe}")
        assert not wrong, "\n".join(wrong)
        # The table must exercise both answers, and some reader must be refused something.
        assert {row[3] for row in SUBSCRIBE_ROWS} == {True, False}
    finally:
        for c in readers:
            c.close()
