"""iot-broker as a daemon: readiness, status, $SYS, exit codes, stop, and resilience to garbage."""

from __future__ import annotations

import itertools
import signal
import socket
import subprocess
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import mqttraw
from tests.mqttraw import client, puback, publish
from tests.support import BIN, retry_on_port_in_use, wait_for

BROKER = str(BIN / "iot-broker")


def healthy(port: int) -> bool:
    """A fresh client can still subscribe and receive its own QoS 1 message."""
    r = subprocess.run(["mosquitto_rr", "-p", str(port), "-t", "health/req", "-e", "health/req", "-m", "ok",
                        "-q", "1", "-W", "5", "-V", "311"], capture_output=True, timeout=10)
    return r.returncode == 0 and r.stdout.strip() == b"ok"


def test_ready_only_after_the_listener_is_bound(broker):
    # READY=1 has been received by the fixture: the port must accept at once, with no retry.
    with socket.create_connection(("127.0.0.1", broker.port), timeout=1):
        pass
    assert any(m.startswith("STATUS=listening on 127.0.0.1:") for m in broker.notify.messages)


def test_status_line_summarises_clients_and_messages(broker):
    assert healthy(broker.port)
    status = broker.notify.wait_for("STATUS=clients=", 15)
    assert "sessions=" in status and "msgs_in=" in status and "retained=" in status


def test_sys_topics_use_mosquittos_names(broker_factory):
    b = broker_factory("sys_interval = 1.0\n")
    r = subprocess.run(["mosquitto_sub", "-p", str(b.port), "-t", "$SYS/broker/#", "-F", "%t", "-W", "4"],
                       capture_output=True, timeout=10)
    topics = set(r.stdout.decode().splitlines())
    for t in ("$SYS/broker/version", "$SYS/broker/uptime", "$SYS/broker/clients/connected",
              "$SYS/broker/clients/total", "$SYS/broker/messages/received", "$SYS/broker/messages/sent",
              "$SYS/broker/bytes/received", "$SYS/broker/bytes/sent", "$SYS/broker/retained messages/count"):
        assert t in topics, f"{t} missing from {sorted(topics)}"
    # '#' alone must not see $SYS topics [MQTT-4.7.2-1]
    r = subprocess.run(["mosquitto_sub", "-p", str(b.port), "-t", "#", "-v", "-W", "2"], capture_output=True,
                       timeout=10)
    assert b"$SYS" not in r.stdout


def test_port_in_use_is_a_clear_error_and_exit_71(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "iot.toml"
        cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n')
        r = subprocess.run([BROKER, "--config", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 71
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr


def test_port_option_overrides_the_config_and_is_validated(tmp_path, daemon):
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path}"\n[broker]\nhost = "127.0.0.1"\nport = 1\n')

    def on(port: int) -> int:
        daemon("iot-broker", "--config", str(cfg), "-p", str(port))
        return port

    port = retry_on_port_in_use(on)
    assert healthy(port)
    r = subprocess.run([BROKER, "-p", "70000"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 64 and "-p/--port" in r.stderr


def test_help_names_the_mosquitto_style_options():
    r = subprocess.run([BROKER, "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0
    for opt in ("-c CONFIG_FILE", "--config", "-p PORT", "--port", "-v", "--verbose"):
        assert opt.split()[0] in r.stdout


def test_sigterm_with_clients_connected_exits_0_within_10s(broker):
    subs = [subprocess.Popen(["mosquitto_sub", "-p", str(broker.port), "-t", f"x/{i}", "-q", "1"],
                             stdout=subprocess.DEVNULL) for i in range(5)]
    try:
        wait_for(lambda: "clients=5" in (broker.notify.drain() and " ".join(broker.notify.messages)), 15,
                 what="5 clients in STATUS")
        broker.proc.signal(signal.SIGTERM)
        start = time.monotonic()
        assert broker.proc.wait(10) == 0
        assert time.monotonic() - start < 10
        assert "STOPPING=1" in broker.notify.drain(0.2)
    finally:
        for s in subs:
            s.kill()


def test_max_connections_refuses_the_excess_and_keeps_serving(broker_factory):
    b = broker_factory("max_connections = 3\n")
    held = [socket.create_connection(("127.0.0.1", b.port), timeout=2) for _ in range(3)]
    try:
        extra = socket.create_connection(("127.0.0.1", b.port), timeout=2)
        extra.settimeout(2)
        assert extra.recv(10) == b""  # closed at accept
        extra.close()
    finally:
        for s in held:
            s.close()
    wait_for(lambda: healthy(b.port), 10, what="broker serving after the excess was refused")
    assert "max_connections reached" in b.proc.log()


def test_qos0_to_a_subscriber_that_stops_reading_is_dropped_and_counted(broker_factory):
    """The server learns that a subscriber is congested only when what it writes to the socket
    piles up past its high-water mark: the subscriber stopped reading and the kernel buffers on
    the way are full. From then on QoS 0 messages for it are dropped, logged and counted in
    $SYS/broker/publish/messages/dropped, and every message not dropped still arrives, in
    order: received + dropped == published, nothing is lost silently."""
    b = broker_factory("sys_interval = 1.0\n")
    pad = b"x" * 16 * 1024
    with client(b.port, "cg-slow", subs=[("cg/data", 0), ("cg/end", 1)]) as slow, client(b.port, "cg-pub") as pub:
        sent = 0
        for _ in range(64):  # 1 MiB a round; the socket buffers and the broker's hold a few MiB
            pub.send(b"".join(publish("cg/data", b"%08d" % (sent + i) + pad) for i in range(64)))
            sent += 64
            assert pub.is_open()  # the broker has routed (or dropped) every one of them
            if "messages dropped" in b.proc.log():
                break
        else:
            raise AssertionError(f"no drop logged after {sent} messages of 16 KiB to a subscriber that reads nothing")
        # A QoS 1 message is never dropped for congestion and is written after every QoS 0 one
        # that was not dropped, on the same connection: when it arrives, all of them have.
        pub.publish_ok("cg/end", b"end", qos=1)
        seqs = []
        for _ in range(sent + 1):
            m = slow.recv_publish()
            if m.topic == "cg/end":
                slow.send(puback(m.mid))
                break
            seqs.append(int(m.payload[:8]))
        else:
            raise AssertionError("the QoS 1 marker did not arrive")
    dropped = sent - len(seqs)
    assert seqs == sorted(set(seqs)), "QoS 0 messages delivered out of order or twice"
    assert 0 < dropped < sent, (sent, len(seqs))
    with client(b.port, "cg-stats", subs=[("$SYS/broker/publish/messages/dropped", 0)]) as st:
        values = [st.recv_publish().payload]  # the retained value, then a new one every second
        deadline = time.monotonic() + 10
        while values[-1] != b"%d" % dropped and time.monotonic() < deadline:
            values.append(st.recv_publish().payload)
        assert values[-1] == b"%d" % dropped, f"dropped counter went {values}; {dropped} were dropped"
    assert "Traceback" not in b.proc.log()


# --- live fuzz ---------------------------------------------------------------------------------
#
# Packets come from tests/mqttraw.py (written from the spec), not from the broker's codec.

FUZZ_MAX_PACKET = 4096  # the fuzzed broker's max_packet_size: the size limits are cheap to reach
HEALTH = "health/beat"  # no fuzz topic can match it
_TOPICS = [b"fz/a", b"fz/b/c", b"fz/+", b"fz/#", b"#", b"+", b"$SYS/x", b"", b"fz/\x00", b"fz/\xc3\x28"]
# Packet types whose fixed-header flags are fixed (section 2.2.2); PUBLISH's depend on its QoS.
_REQUIRED_FLAGS = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0, 13: 0, 14: 0}
# Remaining lengths to claim: around the limit, and the largest a four-byte varint holds.
_LENGTHS = [0, 1, 2, 127, 128, FUZZ_MAX_PACKET - 1, FUZZ_MAX_PACKET, FUZZ_MAX_PACKET + 1, 16_384, 268_435_455]
_VARINT5 = [b"\xff\xff\xff\xff\x01", b"\x80\x80\x80\x80\x00"]  # malformed: a fifth length byte


def _flags_valid(kind: int, flags: int) -> bool:
    if kind == 3:
        qos = flags >> 1 & 3
        return qos != 3 and not (qos == 0 and flags & 8)
    return _REQUIRED_FLAGS.get(kind) == flags  # types 0 and 15 have no valid flags


def _body(frame_bytes: bytes) -> bytes:
    return mqttraw.split_packet(frame_bytes)[0].body


@st.composite
def _body_for(draw, kind: int, flags: int) -> bytes:
    """A well-formed body for packet type `kind` (what a valid packet of that type carries)."""
    pid = mqttraw.u16(draw(st.sampled_from([1, 2, 0xFFFF, 0])))  # 0 is not a valid id
    topic = draw(st.sampled_from(_TOPICS))
    qos = draw(st.integers(0, 3))
    if kind == 1:
        will = mqttraw.Will(topic, b"w", qos & 1) if draw(st.booleans()) else None
        return _body(mqttraw.connect(draw(st.sampled_from(["", "fz-1", "fz-2"])), draw(st.booleans()),
                                     draw(st.integers(0, 5)), will))
    if kind == 3:
        return mqttraw.string(topic) + (pid if flags & 6 else b"") + draw(st.binary(max_size=20))
    if kind == 8:
        return pid + mqttraw.string(topic) + bytes((qos,))
    if kind == 10:
        return pid + mqttraw.string(topic)
    if kind == 2:
        return b"\x00\x00"
    if kind == 9:
        return pid + bytes((qos,))
    if kind in (4, 5, 6, 7, 11):
        return pid
    return b""  # PINGREQ, PINGRESP, DISCONNECT, reserved 0 and 15


@st.composite
def _frame(draw) -> tuple[bytes, int, bool, str]:
    """One packet of any of the 16 types with valid or invalid flags, its body and length
    right, padded to the size limit, lied about, or mangled. Returns (bytes, type, flags
    valid, size tag)."""
    kind = draw(st.integers(0, 15))
    if draw(st.booleans()):
        flags = draw(st.integers(0, 15))
    elif kind == 3:
        flags = draw(st.integers(0, 2)) << 1 | draw(st.sampled_from([0, 1]))
        flags |= 8 if flags & 6 and draw(st.booleans()) else 0
    else:
        flags = _REQUIRED_FLAGS.get(kind, 0)
    body = draw(_body_for(kind, flags))
    head = bytes((kind << 4 | flags,))
    how = draw(st.sampled_from(["exact", "limit", "claim", "varint5", "mutate", "cut"]))
    tag = how
    if how == "limit":  # real bytes up to, at and over max_packet_size (a PUBLISH stays valid)
        size = FUZZ_MAX_PACKET + draw(st.integers(-1, 1))
        body = (body + b"p" * size)[:size]
        tag = f"length {size}"
    if how == "claim":
        length = draw(st.sampled_from(_LENGTHS))
        tag = f"claims {length}"
        return head + mqttraw.varint(length) + body, kind, _flags_valid(kind, flags), tag
    if how == "varint5":
        return head + draw(st.sampled_from(_VARINT5)) + body, kind, _flags_valid(kind, flags), tag
    data = bytearray(head + mqttraw.varint(len(body)) + body)
    if how == "mutate":
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(1, len(data) - 1))] = draw(st.integers(0, 255))
    if how == "cut":
        del data[draw(st.integers(1, len(data) - 1)):]
    return bytes(data), kind, _flags_valid(kind, flags), tag


@st.composite
def _attack(draw) -> tuple[bytes, tuple[int, bool, str] | None]:
    """What one fuzz connection sends: random bytes, or packets with or without a valid CONNECT
    first. Also returns what the broker is sure to parse: the first packet after the CONNECT."""
    start = draw(st.sampled_from(["connect", "connect", "connect", "none", "garbage"]))
    if start == "garbage":
        return draw(st.binary(min_size=1, max_size=300)), None
    frames = draw(st.lists(_frame(), min_size=1, max_size=3))
    data = b"".join(f[0] for f in frames)
    if start == "none":
        return data, None
    client_id = draw(st.sampled_from(["fz-1", "fz-2", ""]))
    return mqttraw.connect(client_id, clean=draw(st.booleans())) + data, frames[0][1:]


@pytest.mark.slow
def test_live_fuzz_never_takes_the_broker_or_other_clients_down(broker_factory):
    """Connections sending every packet type with valid and invalid flags, bodies right or
    mangled, lengths at and over max_packet_size, up to the four-byte maximum and with a
    malformed fifth byte, or plain garbage, each close only themselves: a subscriber connected
    before the fuzz gets a QoS 1 message from a well-behaved publisher after every one of
    them, and the broker ends up serving new clients with no traceback in its log."""
    b = broker_factory(f"max_packet_size = {FUZZ_MAX_PACKET}\nmax_connection_rate = 0\n")  # 2500 connections
    reached: set[object] = set()
    beats = itertools.count(1)
    with client(b.port, "health-sub", subs=[(HEALTH, 1)]) as watch, client(b.port, "health-pub") as pub:

        # derandomize: the same inputs every run, so a failure can be reproduced.
        @settings(max_examples=2500, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(_attack())
        def attack(case) -> None:
            data, parsed = case
            with mqttraw.RawClient(b.port) as c:
                try:
                    c.send(data)
                    c.sock.shutdown(socket.SHUT_WR)  # after our end of file the broker must close
                except OSError:
                    pass  # it closed first: fine
                c.read_until_closed()
            if parsed is not None:
                kind, flags_ok, tag = parsed
                reached.update({(kind, flags_ok), tag})
            beat = next(beats)
            pub.publish_ok(HEALTH, b"%d" % beat, qos=1, mid=beat % 65535 + 1)
            m = watch.recv_publish()
            assert (m.topic, m.payload, m.qos) == (HEALTH, b"%d" % beat, 1)
            watch.send(puback(m.mid))

        attack()
        watch.expect_nothing()
    missing = ({(k, ok) for k in range(1, 15) for ok in (True, False)} | {(0, False), (15, False)}
               | {f"length {FUZZ_MAX_PACKET + d}" for d in (-1, 0, 1)} | {"claims 268435455", "varint5"}) - reached
    assert not missing, f"the fuzz never reached {sorted(map(str, missing))}"
    assert b.proc.running(), b.proc.log()
    assert healthy(b.port)
    assert "Traceback" not in b.proc.log()


# --- live fuzz, MQTT 5.0 -----------------------------------------------------------------------
#
# The same attack with 5.0 packets: property blocks of any identifiers (also ones the packet may
# not carry, repeated, unknown), values right or wrong for their type, lengths that lie.

# Values per property type (mqttraw.PROPERTY_TYPES), in range and out of it for the property.
_PROP_VALUES = {"b": [0, 1, 2, 255], "h": [0, 1, 3, 0xFFFF], "i": [0, 1, 60, 0xFFFFFFFF], "v": [0, 1, 268_435_455],
                "s": ["", "fz/a", "a/#", b"\xc3\x28", b"x\x00"], "d": [b"", b"\x00\xff"],
                "p": [("k", "v"), ("", ""), (b"\xed\xa0\x80", "v")]}
# A CONNECT the broker accepts carries some of these.
_GOOD_CONNECT_PROPS = [(mqttraw.SESSION_EXPIRY, 60), (mqttraw.RECEIVE_MAXIMUM, 2), (mqttraw.MAXIMUM_PACKET_SIZE, 256),
                       (mqttraw.TOPIC_ALIAS_MAXIMUM, 3), (mqttraw.REQUEST_PROBLEM_INFO, 0),
                       (mqttraw.USER_PROPERTY, ("k", "v"))]
_V5_REASONS = [0x00, 0x04, 0x10, 0x18, 0x19, 0x80, 0x81, 0x92, 0xFF]


@st.composite
def _props5(draw) -> bytes:
    ids = draw(st.lists(st.sampled_from(sorted(mqttraw.PROPERTY_TYPES)), max_size=4))
    block = mqttraw.properties(*[(i, draw(st.sampled_from(_PROP_VALUES[mqttraw.PROPERTY_TYPES[i]]))) for i in ids])
    length, pos = mqttraw._read_varint(block, 0)
    body = block[pos:]
    how = draw(st.sampled_from(["ok", "ok", "ok", "unknown identifier", "length lies"]))
    if how == "unknown identifier":
        body += bytes((draw(st.sampled_from([0, 4, 5, 0x2B, 0x7F])), 0))
        length = len(body)
    elif how == "length lies":
        length = max(0, length + draw(st.sampled_from([-1, 1, 100])))
    return mqttraw.varint(length) + body


@st.composite
def _body5(draw, kind: int, flags: int) -> bytes:
    """A 5.0 body for packet type `kind`, its properties from _props5."""
    pid = mqttraw.u16(draw(st.sampled_from([1, 2, 0xFFFF, 0])))
    topic = draw(st.sampled_from(_TOPICS))
    props = draw(_props5())
    if kind == 1:
        will = mqttraw.Will(topic, b"w", draw(st.integers(0, 1))) if draw(st.booleans()) else None
        return _body(mqttraw.connect(draw(st.sampled_from(["", "fz-1"])), draw(st.booleans()), 5, will,
                                     proto_level=5, props=props, will_props=draw(_props5()) if will else None))
    if kind == 3:
        return mqttraw.string(topic) + (pid if flags & 6 else b"") + props + draw(st.binary(max_size=20))
    if kind in (8, 10):
        return pid + props + mqttraw.string(topic) + (bytes((draw(st.integers(0, 255)),)) if kind == 8 else b"")
    if kind in (4, 5, 6, 7):
        return pid + draw(st.sampled_from([b"", bytes((draw(st.sampled_from(_V5_REASONS)),)) + props]))
    if kind in (14, 15):
        return draw(st.sampled_from([b"", bytes((draw(st.sampled_from(_V5_REASONS)),)) + props]))
    return draw(_body_for(kind, flags))  # CONNACK, SUBACK, UNSUBACK, PINGs, reserved 0: as in 3.1.1


@st.composite
def _frame5(draw) -> tuple[bytes, int]:
    kind = draw(st.integers(0, 15))
    if draw(st.integers(0, 3)) == 0:
        flags = draw(st.integers(0, 15))
    elif kind == 3:
        flags = draw(st.integers(0, 2)) << 1 | draw(st.sampled_from([0, 1]))
    else:
        flags = _REQUIRED_FLAGS.get(kind, 0)
    data = bytearray(mqttraw.frame(kind << 4 | flags, draw(_body5(kind, flags))))
    how = draw(st.sampled_from(["exact", "exact", "mutate", "cut"]))
    if how == "mutate":
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(1, len(data) - 1))] = draw(st.integers(0, 255))
    if how == "cut":
        del data[draw(st.integers(1, len(data) - 1)):]
    return bytes(data), kind


@st.composite
def _attack5(draw) -> tuple[bytes, int | None]:
    """A 5.0 CONNECT the broker accepts (or one with any properties), then 1-3 fuzzed 5.0
    packets; also returns the type of the first one when the CONNECT was a good one."""
    frames = draw(st.lists(_frame5(), min_size=1, max_size=3))
    data = b"".join(f for f, _ in frames)
    if draw(st.integers(0, 3)) == 0:
        return mqttraw.connect("fz-5", proto_level=5, props=draw(_props5())) + data, None
    good = draw(st.lists(st.sampled_from(_GOOD_CONNECT_PROPS), unique_by=lambda p: p[0], max_size=3))
    client_id = draw(st.sampled_from(["fz-1", "fz-2", ""]))
    return mqttraw.connect(client_id, proto_level=5, props=mqttraw.properties(*good)) + data, frames[0][1]


@pytest.mark.slow
def test_live_fuzz_v5_never_takes_the_broker_or_other_clients_down(brokers):
    """Connections sending MQTT 5.0 packets of every type, with property blocks of any
    identifiers and values (wrong for the packet, repeated, unknown, out of range, lengths that
    lie), bodies right or mangled, each close or go on by themselves: a 3.1.1 and a 5.0
    subscriber connected before the fuzz each get a QoS 1 message after every attack, and the
    broker ends up serving new clients. Against Mosquitto too: that the attack is one a
    conforming broker survives with these checks."""
    b = brokers(ours=f"max_packet_size = {FUZZ_MAX_PACKET}\nmax_connection_rate = 0\n",
                mosquitto=f"max_packet_size {FUZZ_MAX_PACKET}\n")
    reached: set[int] = set()
    beats = itertools.count(1)
    with client(b.port, "health-sub", subs=[(HEALTH, 1)]) as watch, client(b.port, "health-pub") as pub, \
            mqttraw.client5(b.port, "health-sub5", subs=[(HEALTH, 1)]) as watch5:

        @settings(max_examples=1500, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(_attack5())
        def attack(case) -> None:
            data, first = case
            with mqttraw.RawClient(b.port) as c:
                try:
                    c.send(data)
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                c.read_until_closed()
            if first is not None:
                reached.add(first)
            beat = next(beats)
            pub.publish_ok(HEALTH, b"%d" % beat, qos=1, mid=beat % 65535 + 1)
            for w, m in ((watch, watch.recv_publish()), (watch5, watch5.recv_publish5())):
                assert (m.topic, m.payload, m.qos) == (HEALTH, b"%d" % beat, 1)
                w.send(puback(m.mid))

        attack()
        watch.expect_nothing()
        watch5.expect_nothing()
    assert reached >= set(range(16)), f"the fuzz never sent types {sorted(set(range(16)) - reached)} after a CONNACK"
    assert b.proc.running(), b.proc.log()
    assert healthy(b.port)
    assert "Traceback" not in b.proc.log()


def test_event_loop_uvloop_by_default_asyncio_on_request_and_both_serve(broker_factory):
    """uvloop is installed with the broker, so "auto" takes it; "asyncio" keeps Python's loop.
    The start line says which, and both carry QoS 1 end to end."""
    for extra, name in (("", "uvloop"), ('event_loop = "asyncio"\n', "asyncio")):
        b = broker_factory(extra)
        wait_for(lambda: "listening on" in b.proc.log(), 10, what="the start line")
        line = next(x for x in b.proc.log().splitlines() if "listening on" in x)
        assert f"event_loop={name}" in line
        assert healthy(b.port)


def test_event_loop_uvloop_without_uvloop_is_a_config_error(monkeypatch):
    """Asked for by name and not importable: a one-line config error (exit 78), not a fallback."""
    import sys

    from daemons import config, service
    from daemons.broker import server

    cfg = config.parse({"broker": {"event_loop": "uvloop"}}, None, {})
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with pytest.raises(service.Exit) as e:
        server.event_loop(cfg)
    assert e.value.code == 78 and "uvloop is not installed" in str(e.value)
    auto = config.parse({"broker": {"event_loop": "auto"}}, None, {})
    assert server.event_loop(auto) == "asyncio"
