"""iot-broker's access control as a user meets it: password files from Debian's
mosquitto_passwd and from `iotctl passwd`, CONNACK codes, repeated failures slowed down, an
ACL (Mosquitto's format) applied to live traffic, SIGHUP reloading both files, and the
broker listening on loopback only until it is given a password file or allow_anonymous.
Real broker processes, real Mosquitto clients, raw sockets (tests/mqttraw.py)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests import mqttraw as raw
from tests.support import BIN, wait_for

pytestmark = pytest.mark.slow
IOTCTL = str(BIN / "iotctl")


def passwd_file(tmp_path: Path) -> Path:
    """alice by Debian's mosquitto_passwd ($7$), bob by `iotctl passwd`, in one file."""
    f = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "alice", "wonderland"], check=True, timeout=30)
    subprocess.run([IOTCTL, "passwd", "-b", str(f), "bob", "builder"], check=True, timeout=30)
    return f


def connack_code(port: int, client_id: str, user: str | None = None, password: bytes | None = None) -> int:
    with raw.RawClient(port) as c:
        c.send(raw.connect(client_id, username=user, password=password))
        pkt = c.recv_packet(timeout=20)
        assert pkt.type == raw.CONNACK, raw.describe(pkt.raw)
        return pkt.body[1]


def test_logins_against_files_from_mosquitto_passwd_and_iotctl_passwd(broker_factory, tmp_path):
    f = passwd_file(tmp_path)
    b = broker_factory(f'password_file = "{f}"\nsys_interval = 0\n')
    assert connack_code(b.port, "a", "alice", b"wonderland") == 0
    assert connack_code(b.port, "b", "bob", b"builder") == 0
    assert connack_code(b.port, "c", "alice", b"builder") == 4  # bad user name or password
    assert connack_code(b.port, "d") == 5  # anonymous: not authorised
    pub = subprocess.run(["mosquitto_pub", "-p", str(b.port), "-u", "alice", "-P", "wonderland", "-t", "t", "-m", "x"],
                         capture_output=True, text=True, timeout=30)
    assert pub.returncode == 0, pub.stderr
    pub = subprocess.run(["mosquitto_pub", "-p", str(b.port), "-u", "alice", "-P", "nope", "-t", "t", "-m", "x"],
                         capture_output=True, text=True, timeout=30)
    assert pub.returncode != 0
    log = b.proc.log()
    lines = [line for line in log.splitlines() if "login refused" in line]
    assert any("client=c user=alice peer=127.0.0.1:" in x and 'reason="bad user name or password" code=4' in x
               for x in lines), lines
    assert any("client=d user=- " in x and "allow_anonymous = false" in x and "code=5" in x for x in lines), lines


def test_repeated_failed_logins_from_one_address_are_slowed_down(broker_factory, tmp_path):
    f = passwd_file(tmp_path)
    b = broker_factory(f'password_file = "{f}"\nsys_interval = 0\n')
    for i in range(5):  # the first three are answered at once, then 0.5 s, 1 s ...
        assert connack_code(b.port, f"guess-{i}", "alice", b"guess") == 4
    started = time.monotonic()
    assert connack_code(b.port, "guess-5", "alice", b"guess") == 4
    assert time.monotonic() - started >= 1.9  # the sixth waits 2 s: a lower bound holds on any machine
    assert connack_code(b.port, "right", "alice", b"wonderland") == 0  # a right password still gets in


ACL = """\
# anonymous clients read public/ only
topic read public/#

user alice
topic readwrite public/#
topic write alerts/#

user bob
topic read alerts/#
pattern readwrite devices/%c/#
"""


def test_acl_on_live_traffic_and_a_reload_by_sighup(broker_factory, tmp_path):
    f = passwd_file(tmp_path)
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    b = broker_factory(f'password_file = "{f}"\nacl_file = "{acl}"\nallow_anonymous = true\nsys_interval = 0\n')
    with raw.RawClient(b.port) as bob, raw.RawClient(b.port) as alice, raw.RawClient(b.port) as anon:
        bob.connect_ok("bob-1", username="bob", password=b"builder")
        bob.send(raw.subscribe(1, [("alerts/#", 1), ("secret/#", 1), ("devices/bob-1/#", 1)]))
        bob.expect(raw.suback(1, [1, 0x80, 1]), what="SUBACK with 0x80 for the filter bob may not read")
        alice.connect_ok("alice-1", username="alice", password=b"wonderland")
        anon.connect_ok("anon-1").subscribe_ok([("#", 0)])
        alice.publish_ok("alerts/fire", b"!", 1)
        alice.publish_ok("devices/bob-1/cmd", b"no", 1)  # acknowledged, dropped: not hers to write
        got = bob.recv_publish()
        assert (got.topic, got.payload) == ("alerts/fire", b"!")
        bob.send(raw.puback(got.mid))
        assert [p for p in bob.until_pingresp() if p.type == raw.PUBLISH] == []
        assert [p for p in anon.until_pingresp() if p.type == raw.PUBLISH] == [], "anonymous may read public/ only"
        wait_for(lambda: "denied PUBLISH from alice-1 to devices/bob-1/cmd" in b.proc.log(), 10,
                 what="the denied PUBLISH in the log")

        acl.write_text(ACL + "user alice\ntopic write devices/#\n")  # alice may now command devices
        b.proc.signal(signal.SIGHUP)
        wait_for(lambda: "access rules reloaded" in b.proc.log(), 10, what="the reload")
        alice.publish_ok("devices/bob-1/cmd", b"yes", 1)  # her next packet has the new right
        got = bob.recv_publish()
        assert (got.topic, got.payload) == ("devices/bob-1/cmd", b"yes")
        bob.send(raw.puback(got.mid))

        acl.write_text(ACL + "topic sometimes alerts/#\n")  # broken: the old rules stay
        b.proc.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in b.proc.log(), 10, what="the refused reload")
        assert f"{acl}:11: unknown access 'sometimes'" in b.proc.log()
        alice.publish_ok("devices/bob-1/cmd", b"still", 1)
        assert bob.recv_publish().payload == b"still"
        assert bob.is_open() and alice.is_open() and anon.is_open()  # nobody was disconnected


def test_without_a_password_file_or_allow_anonymous_the_broker_listens_on_loopback_only(daemon, tmp_path):
    from tests.support import free_port

    port = free_port()
    cfg = tmp_path / "open.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[broker]\nhost = "0.0.0.0"\nport = {port}\n')
    proc, notify = daemon("iot-broker", "--config", str(cfg))
    assert "listening on loopback only" in proc.log() and "allow_anonymous = true" in proc.log()
    assert connack_code(port, "local") == 0
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    assert [line.split()[3] for line in out.splitlines()] == [f"127.0.0.1:{port}"], out  # local address
