"""iotctl pub/sub with -V 5|311|31 and MQTT 5.0 properties given as mosquitto's
`-D command identifier value`, against our broker and Mosquitto 2 (the `brokers` fixture); what
the broker forwards is read by an independent raw 5.0 client (tests/mqttraw.py)."""

from __future__ import annotations

import signal

import pytest

from tests.integration.test_iotctl import ctl, start_sub
from tests.mqttraw import (
    CONTENT_TYPE,
    CORRELATION_DATA,
    MESSAGE_EXPIRY,
    PAYLOAD_FORMAT,
    RESPONSE_TOPIC,
    USER_PROPERTY,
    client5,
    prop,
    puback,
)


def test_pub_v5_sends_the_d_properties(brokers):
    """`iotctl pub -V 5 -D publish ...` publishes with each property as given: user properties
    (two, in order), content type, response topic, correlation data, payload format indicator,
    message expiry interval; a raw 5.0 subscriber receives them."""
    b = brokers()
    with client5(b.port, "ctl5-watch", subs=[("ctl5/props", 1)]) as watch:
        r = ctl("pub", "-p", str(b.port), "-V", "5", "-q", "1", "-t", "ctl5/props", "-m", "hello",
                "-D", "publish", "user-property", "site", "north",
                "-D", "publish", "user-property", "line", "2",
                "-D", "publish", "content-type", "text/plain",
                "-D", "publish", "response-topic", "ctl5/reply",
                "-D", "publish", "correlation-data", "x-17",
                "-D", "publish", "payload-format-indicator", "1",
                "-D", "publish", "message-expiry-interval", "10")
        assert r.returncode == 0, r.stderr
        m = watch.recv_publish5()
        watch.send(puback(m.mid))
        assert (m.topic, m.payload) == ("ctl5/props", b"hello")
        assert [v for i, v in m.props if i == USER_PROPERTY] == [("site", "north"), ("line", "2")]
        assert prop(m.props, CONTENT_TYPE) == "text/plain"
        assert prop(m.props, RESPONSE_TOPIC) == "ctl5/reply"
        assert prop(m.props, CORRELATION_DATA) == b"x-17"
        assert prop(m.props, PAYLOAD_FORMAT) == 1
        assert 0 < prop(m.props, MESSAGE_EXPIRY, 0) <= 10


@pytest.mark.parametrize("version", ["5", "311", "31", "mqttv5"])
def test_pub_and_sub_round_trip_in_each_version(brokers, version):
    """`iotctl sub -V X` and `iotctl pub -V X` exchange a QoS 1 message in MQTT 5.0, 3.1.1 and
    3.1 (mosquitto's spellings, short and long)."""
    b = brokers()
    port = str(b.port)
    sub = start_sub(b.port, "-V", version, "-t", "ctl5/ver", "-q", "1", "-C", "1", "-W", "20")
    try:
        r = ctl("pub", "-p", port, "-V", version, "-q", "1", "-t", "ctl5/ver", "-m", f"in {version}")
        assert r.returncode == 0, r.stderr
        out, err = sub.communicate(timeout=25)
        assert (sub.returncode, out) == (0, f"in {version}\n".encode()), err
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)


def test_sub_v5_connect_properties_reach_the_broker(brokers):
    """`iotctl sub -V 5 -D connect maximum-packet-size 100`: the broker honours the CONNECT
    property, so a 300-byte message is not delivered to it and a small one after it is."""
    b = brokers()
    sub = start_sub(b.port, "-V", "5", "-D", "connect", "maximum-packet-size", "100", "-t", "ctl5/mps",
                    "-q", "1", "-C", "1", "-W", "20")
    try:
        for payload in ("x" * 300, "small"):
            assert ctl("pub", "-p", str(b.port), "-V", "5", "-q", "1", "-t", "ctl5/mps", "-m", payload).returncode == 0
        out, err = sub.communicate(timeout=25)
        assert (sub.returncode, out) == (0, b"small\n"), err
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(5)


def test_sub_v5_persistent_session_outlives_the_connection(brokers):
    """`iotctl sub -V 5 -c -i ID` asks for a session that outlives the connection (Clean Start
    0, Session Expiry as -c does in mosquitto_sub): a QoS 1 message published while it is
    stopped is printed when it comes back."""
    b = brokers()
    args = ("-V", "5", "-c", "-i", "ctl5-persist", "-t", "ctl5/persist", "-q", "1")
    sub = start_sub(b.port, *args)
    sub.send_signal(signal.SIGTERM)
    assert sub.wait(10) == 0
    assert ctl("pub", "-p", str(b.port), "-V", "5", "-q", "1", "-t", "ctl5/persist", "-m", "kept").returncode == 0
    r = ctl("sub", "-p", str(b.port), *args, "-C", "1", "-W", "10")
    assert (r.returncode, r.stdout) == (0, b"kept\n"), r.stderr


BAD = [
    (["-V", "5", "-D", "publish", "no-such-thing", "1"], "not a property of publish"),
    (["-V", "5", "-D", "frobnicate", "content-type", "x"], "unknown command"),
    (["-V", "5", "-D", "subscribe", "user-property", "k", "v"], "unknown command"),
    (["-V", "5", "-D", "publish", "message-expiry-interval", "soon"], "'soon' is not an integer 0-4294967295"),
    (["-V", "5", "-D", "publish", "message-expiry-interval", "4294967296"], "is not an integer"),
    (["-V", "5", "-D", "connect", "receive-maximum", "0"], "'0' is not an integer 1-65535"),
    (["-V", "5", "-D", "publish", "user-property", "only-key"], "expected KEY VALUE"),
    (["-V", "5", "-D", "publish", "content-type"], "expected COMMAND IDENTIFIER VALUE"),
    (["-V", "5", "-D", "publish", "response-topic", "a/#"], "not a topic name"),
    (["-V", "5", "-D", "publish", "content-type", "a", "-D", "publish", "content-type", "b"], "given twice"),
    (["-D", "publish", "content-type", "text/plain"], "-D needs MQTT 5.0 (-V 5)"),
    (["-V", "311", "-D", "connect", "session-expiry-interval", "60"], "-D needs MQTT 5.0"),
    (["-V", "4"], "invalid choice"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_pub_bad_protocol_options_are_usage_errors(args, message):
    """A -D or -V that cannot be sent ends iotctl pub with exit 64 (bad usage, as every usage
    error of iotctl) and a message naming what is wrong, before it connects (port 9 has no
    broker: it would be exit 1)."""
    r = ctl("pub", "-p", "9", "-t", "t", "-m", "x", *args)
    assert r.returncode == 64, (r.returncode, r.stderr)
    assert message.encode() in r.stderr, r.stderr


def test_sub_bad_d_is_a_usage_error():
    """iotctl sub checks -D the same way; `publish` is not one of its commands."""
    r = ctl("sub", "-p", "9", "-t", "t", "-V", "5", "-D", "publish", "content-type", "x")
    assert r.returncode == 64 and b"unknown command (one of: connect, subscribe, disconnect)" in r.stderr, r.stderr


def test_help_names_v_and_d():
    r = ctl("pub", "--help")
    assert b"-V 5|311|31" in r.stdout and b"-D" in r.stdout and b"COMMAND IDENTIFIER VALUE" in r.stdout
