"""`iotctl broker-config --from-mosquitto` on real Mosquitto configurations, with real tools:
Debian's own /etc/mosquitto/mosquitto.conf (and its include_dir), and a site's configuration
(a plain listener and a TLS one with certificates made here by the openssl CLI, a password
file made by mosquitto_passwd, an ACL, allow_anonymous false) given to a real Mosquitto and,
converted, to a real iot-broker: both accept and refuse the same clients.

Mosquitto 2.0.11 refuses a bad password with CONNACK 5 and we with 4 (MQTT 3.1.1 says 4): the
comparison is "accepted or refused", not the code."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from daemons import config as configmod
from tests.integration.test_broker_listeners import _ca, _leaf
from tests.mqttraw import RawClient, collect_publishes
from tests.support import BIN, Mosquitto, PortInUse, free_port

pytestmark = pytest.mark.slow

IOTCTL = str(BIN / "iotctl")
DEBIAN_CONF = Path("/etc/mosquitto/mosquitto.conf")


def broker_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IOTCTL, "broker-config", *args], capture_output=True, text=True, timeout=60)


def test_debians_own_mosquitto_conf_converts_and_loads(tmp_path):
    assert DEBIAN_CONF.is_file(), "Debian's mosquitto package is not installed: ./install.sh --local --test-deps"
    out = tmp_path / "broker.toml"
    r = broker_config("--from-mosquitto", str(DEBIAN_CONF), "-o", str(out), "--cwd", "/")
    lines = DEBIAN_CONF.read_text().splitlines()
    # Debian ships pid_file and log_dest file: reported, with their lines; the rest converts.
    expect = [f"{DEBIAN_CONF}:{n}: not converted: {text}: " for n, text in enumerate(lines, 1)
              if text.startswith(("pid_file", "log_dest"))]
    reported = [e for e in r.stderr.splitlines() if ": not converted: " in e]
    assert r.returncode == (1 if expect else 0), r.stderr
    assert [e[:len(x)] for e, x in zip(reported, expect)] == expect and len(reported) == len(expect), r.stderr
    text = out.read_text()
    assert text.startswith(f"# iot-broker's [broker] section, converted from the Mosquitto configuration {DEBIAN_CONF}")
    for e in reported:
        assert f"#   {e}\n" in text  # the same lines at the top
    # It follows include_dir /etc/mosquitto/conf.d: every *.conf there is read, in order.
    conf_d = sorted(p.name for p in Path("/etc/mosquitto/conf.d").glob("*.conf") if len(p.name) > 5)
    header = text.split("\n#\n")[0]
    assert all(f"/etc/mosquitto/conf.d/{name}" in header for name in conf_d)

    cfg = configmod.load(out)
    # No listener and no port in Debian's file: Mosquitto runs local only, anonymous clients let in.
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.allow_anonymous) == ("127.0.0.1", 1883, True)
    assert cfg.broker.persistence is True
    assert cfg.broker.persistence_location == Path("/var/lib/mosquitto")
    assert "not mosquitto.db" in text or "not Mosquitto's mosquitto.db" in text
    # The same from stdout, and no file where none was asked for.
    r2 = broker_config("--from-mosquitto", str(DEBIAN_CONF), "--cwd", "/")
    assert (r2.returncode, r2.stdout) == (r.returncode, text)


# --- one site's configuration, both brokers ------------------------------------------------------

SITE = """\
# A site's Mosquitto: plain MQTT for the LAN, TLS for the rest, users and an ACL.
per_listener_settings false
{user}
persistence true
persistence_location {data}/
autosave_interval 900
log_dest stderr
log_type error
log_type warning
log_type information

listener {plain}

listener {tls} 127.0.0.1
certfile {pki}/server.crt
keyfile {pki}/server.key
cafile {pki}/ca1.crt
tls_version tlsv1.2

allow_anonymous false
password_file {etc}/passwd
acl_file {etc}/acl
max_queued_messages 1000
"""

ACL = """\
user alice
topic readwrite sensors/#
user bob
topic write sensors/bob/#
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The files the site's configuration names: certificates (openssl), a password file
    (mosquitto_passwd -c -b), an ACL."""
    d = tmp_path_factory.mktemp("site")
    pki = d / "pki"
    pki.mkdir()
    _ca(pki, "ca1")
    _leaf(pki, "ca1", "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1")
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(d / "passwd"), "alice", "alice-pw"], check=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(d / "passwd"), "bob", "bob-pw"], check=True, timeout=30)
    (d / "acl").write_text(ACL)
    return d


def site_conf(folder: Path, site: Path, plain: int, tls: int) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    # Run as root, Mosquitto drops to the user "mosquitto" before it reads the password file and
    # the ACL, and could not read them in pytest's 0700 folders.
    user = "user root" if os.geteuid() == 0 else ""
    f = folder / "site.conf"
    f.write_text(SITE.format(user=user, data=folder / "data", plain=plain, tls=tls, pki=site / "pki", etc=site))
    return f


def start_mosquitto(tmp_path: Path, site: Path) -> tuple[Mosquitto, int, int]:
    for attempt in range(5):
        plain, tls = free_port(), free_port()
        (tmp_path / "mosquitto-run").mkdir(exist_ok=True)
        m = Mosquitto(tmp_path / "mosquitto-run", port=plain)
        m.conf.write_text(site_conf(tmp_path / "mosquitto", site, plain, tls).read_text())
        try:
            return m.start(), plain, tls
        except PortInUse:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def start_ours(tmp_path: Path, site: Path, daemon) -> tuple[int, int, subprocess.CompletedProcess]:
    for attempt in range(5):
        plain, tls = free_port(), free_port()
        conf = site_conf(tmp_path / "ours", site, plain, tls)
        toml = tmp_path / "ours" / "iot.toml"
        r = broker_config("--from-mosquitto", str(conf), "-o", str(toml), "--force")
        assert r.returncode in (0, 1), r.stderr
        toml.write_text(toml.read_text() + f'\n[paths]\nstate_dir = "{tmp_path / "ours" / "var"}"\n')
        try:
            daemon("iot-broker", "--config", str(toml))
            return plain, tls, r
        except PortInUse:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def accepted(port: int, *args: str) -> bool:
    """mosquitto_pub's verdict: 0 when the broker accepted the login (CONNACK 0)."""
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-i", "conv-check", "-q", "1",
                        "-t", "sensors/alice/login", "-m", "x", *args], capture_output=True, timeout=60)
    return r.returncode == 0


def acl_deliveries(port: int) -> list[tuple[str, bytes]]:
    """alice subscribes to sensors/#; bob publishes where the ACL lets him and where it does not
    (acknowledged either way). What alice gets."""
    with RawClient(port) as alice, RawClient(port) as bob:
        alice.connect_ok("alice-sub", username="alice", password=b"alice-pw")
        alice.subscribe_ok([("sensors/#", 1)])
        bob.connect_ok("bob-pub", username="bob", password=b"bob-pw")
        bob.publish_ok("sensors/alice/temp", b"denied", qos=1, mid=1)
        bob.publish_ok("sensors/bob/temp", b"allowed", qos=1, mid=2)
        got = collect_publishes([alice])[0]
        return [(p.topic, p.payload) for p in got]


def outcomes(plain: int, tls: int, cafile: Path) -> dict[str, object]:
    tls_args = ("--cafile", str(cafile))
    return {
        "plain: right password": accepted(plain, "-u", "alice", "-P", "alice-pw"),
        "plain: wrong password": accepted(plain, "-u", "alice", "-P", "wrong"),
        "plain: unknown user": accepted(plain, "-u", "mallory", "-P", "alice-pw"),
        "plain: anonymous": accepted(plain),
        "tls: right password": accepted(tls, "-u", "bob", "-P", "bob-pw", *tls_args),
        "tls: wrong password": accepted(tls, "-u", "bob", "-P", "alice-pw", *tls_args),
        "tls: anonymous": accepted(tls, *tls_args),
        "acl: what alice gets": acl_deliveries(plain),
    }


def test_converted_site_accepts_and_refuses_the_clients_mosquitto_does(tmp_path, site, daemon):
    m, m_plain, m_tls = start_mosquitto(tmp_path, site)
    try:
        theirs = outcomes(m_plain, m_tls, site / "pki" / "ca1.crt")
    finally:
        m.stop()
    plain, tls, r = start_ours(tmp_path, site, daemon)

    # What was not converted: log_dest and `user`, nothing about listeners or access.
    conf = tmp_path / "ours" / "site.conf"
    reported = [e.split(": not converted: ")[1] for e in r.stderr.splitlines() if ": not converted: " in e]
    assert reported == (["user root: iot-broker does not switch users: its systemd unit runs it as the user iot"]
                        if os.geteuid() == 0 else []) + [
        "log_dest stderr: iot-broker logs to stderr / the journal ([log] level sets how much)"], r.stderr
    assert f"{conf}:6: note: autosave_interval 900: not needed" in r.stderr
    broker = tomllib.loads((tmp_path / "ours" / "iot.toml").read_text())["broker"]
    assert (broker["port"], broker["allow_anonymous"], broker["max_queued_messages"]) == (plain, False, 1000)
    assert broker["log_type"] == ["error", "warning", "information"]  # the three lines, added up
    assert broker["listener"] == [{"port": tls, "bind_address": "127.0.0.1",
                                   "certfile": str(site / "pki" / "server.crt"),
                                   "keyfile": str(site / "pki" / "server.key"), "cafile": str(site / "pki" / "ca1.crt"),
                                   "tls_version": "tlsv1.2"}]

    ours = outcomes(plain, tls, site / "pki" / "ca1.crt")
    assert ours == theirs
    assert theirs == {
        "plain: right password": True, "plain: wrong password": False, "plain: unknown user": False,
        "plain: anonymous": False, "tls: right password": True, "tls: wrong password": False,
        "tls: anonymous": False, "acl: what alice gets": [("sensors/bob/temp", b"allowed")]}
