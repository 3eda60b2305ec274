"""daemons.mqttclient against a real Mosquitto: reconnect, resubscribe, manual ack, will."""

import queue
import subprocess
import sys

from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient, backoff
from daemons.service import Log
from tests.support import wait_for

LOG = Log("test")


def cfg(port: int) -> MqttConfig:
    return MqttConfig(port=port, reconnect_min=0.1, reconnect_max=0.5, keepalive=5)


def publisher(port: int) -> MqttClient:
    c = MqttClient(cfg(port), "pub-helper", log=LOG)
    c.start()
    assert c.wait_connected(10)
    return c


def test_backoff_grows_to_the_cap_with_jitter():
    delays = [backoff(a, 0.5, 30) for a in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(15 <= d <= 30 for d in delays[8:])
    assert len({round(backoff(3, 0.5, 30), 6) for _ in range(20)}) > 1, "no jitter"


def test_reconnects_and_resubscribes_after_broker_restart(mosquitto):
    inbox: queue.Queue = queue.Queue()
    connacks: list[bool] = []
    c = MqttClient(cfg(mosquitto.port), "resub", log=LOG, subscriptions=[("r/#", 1)], on_message=inbox.put,
                   on_connect=connacks.append)
    c.start()
    try:
        assert c.wait_connected(10) and c.subscribed.wait(5)
        p = publisher(mosquitto.port)
        p.publish("r/a", b"before", 1).wait_for_publish(5)
        assert inbox.get(timeout=5).payload == b"before"
        p.stop()

        mosquitto.restart(down_for=0.5)  # persistence off: the broker forgets our subscription
        # The client may be back before restart() returns: wait for its second CONNACK.
        wait_for(lambda: len(connacks) >= 2, 20, what="a reconnect")
        assert c.subscribed.wait(10), "did not resubscribe"
        p = publisher(mosquitto.port)
        p.publish("r/b", b"after", 1).wait_for_publish(5)
        msg = inbox.get(timeout=5)
        assert (msg.topic, msg.payload) == ("r/b", b"after")
        assert inbox.empty()
        p.stop()
    finally:
        c.stop()


WILL_CHILD = """
import os, sys, time
from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient, Will
from daemons.service import Log
c = MqttClient(MqttConfig(port=int(sys.argv[1]), keepalive=5), "will-child", log=Log("child"),
               will=Will("status/child", b"offline", 1, True))
c.start()
assert c.wait_connected(10)
print("up", flush=True)
time.sleep(60)
"""


def test_will_is_published_when_the_client_dies(mosquitto):
    inbox: queue.Queue = queue.Queue()
    w = MqttClient(cfg(mosquitto.port), "watcher", log=LOG, subscriptions=[("status/#", 1)], on_message=inbox.put)
    w.start()
    assert w.wait_connected(10)
    child = subprocess.Popen([sys.executable, "-c", WILL_CHILD, str(mosquitto.port)], stdout=subprocess.PIPE)
    try:
        from tests.support import readline  # bounded: a child that hangs fails the test, not the run
        assert readline(child.stdout, 20) == b"up\n"
        child.kill()  # ungraceful: no DISCONNECT, so the broker publishes the will
        child.wait(5)
        msg = inbox.get(timeout=10)
        assert (msg.topic, msg.payload) == ("status/child", b"offline")
    finally:
        child.kill()
        w.stop()


def _make_ca(d):
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)
    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.cnf", "-out", "server.crt")


def test_tls_and_password_from_config(tmp_path):
    """cafile turns TLS on and verifies the broker; username/password_file authenticate."""
    from tests.support import Proc, free_port, port_open

    _make_ca(tmp_path)
    (tmp_path / "passwd").write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "passwd"), "dev", "s3cret"], check=True, timeout=30)
    port = free_port()
    conf = tmp_path / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\ncafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
                    f"keyfile {tmp_path / 'server.key'}\nallow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
                    "persistence false\nuser root\n")  # root: the files are in pytest's private tmp
    m = Proc(["mosquitto", "-c", str(conf)], workdir=tmp_path, name="mosq-tls").start()
    try:
        wait_for(lambda: port_open(port), 10, what="TLS listener")
        (tmp_path / "pw").write_text("s3cret\n")
        good = MqttConfig(port=port, cafile=tmp_path / "ca.crt", username="dev", password_file=tmp_path / "pw")
        inbox: queue.Queue = queue.Queue()
        c = MqttClient(good, "tls-ok", log=LOG, subscriptions=[("t", 1)], on_message=inbox.put)
        c.start()
        assert c.wait_connected(10), c.last_error
        assert c.subscribed.wait(5)
        c.publish("t", b"over tls", 1).wait_for_publish(5)
        assert inbox.get(timeout=5).payload == b"over tls"
        c.stop()

        bad = MqttConfig(port=port, cafile=tmp_path / "ca.crt", username="dev", password="wrong")
        c = MqttClient(bad, "tls-badpw", log=LOG, retry=False)
        c.start()
        assert not c.wait_connected(5)
        assert "refused" in (c.last_error or "") and "authorized" in c.last_error.lower()
        c.stop()
    finally:
        m.stop()


def test_protocol_5_from_config_keeps_a_persistent_session_and_acks_by_hand(mosquitto):
    """[mqtt] protocol = "5": a daemon's client speaks MQTT 5.0. Its persistent session
    (clean_session=False: Clean Start 0 and a Session Expiry that never ends) outlives a stop:
    the message published meanwhile comes through the manual-ack inbox on return, with Session
    Present 1, and once acknowledged it is not sent again."""
    import dataclasses  # noqa: PLC0415

    v5 = dataclasses.replace(cfg(mosquitto.port), protocol="5")
    connacks: list[bool] = []

    def consumer() -> MqttClient:
        c = MqttClient(v5, "v5-consumer", log=LOG, clean_session=False, manual_ack=True,
                       subscriptions=[("v5c/#", 1)], on_connect=connacks.append)
        c.start()
        assert c.wait_connected(10) and c.subscribed.wait(5)
        return c

    c = consumer()
    assert c.paho.protocol == 5
    c.stop()
    p = publisher(mosquitto.port)
    p.publish("v5c/a", b"while away", 1).wait_for_publish(5)
    p.stop()
    c = consumer()
    try:
        assert connacks == [False, True]
        assert c.inbox.wait(10)
        got = c.inbox.take(10)
        assert [m.payload for _, m in got] == [b"while away"]
        assert c.ack(got) == 1
    finally:
        c.stop()
    c = consumer()
    try:
        p = publisher(mosquitto.port)
        p.publish("v5c/b", b"marker", 1).wait_for_publish(5)
        p.stop()
        assert c.inbox.wait(10)
        # A redelivery would have been sent at the CONNACK, before the marker.
        assert [m.payload for _, m in c.inbox.take(10)][:1] == [b"marker"], "an acknowledged message came again"
    finally:
        c.stop()
