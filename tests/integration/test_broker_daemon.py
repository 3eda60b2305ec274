"""iot-broker as a daemon: readiness, status, $SYS, exit codes, stop, and resilience to garbage."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemons.broker import packets
from tests.support import BIN, free_port, wait_for

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
        cfg.write_text(f'[broker]\nhost = "127.0.0.1"\nport = {port}\n')
        r = subprocess.run([BROKER, "--config", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 71
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr


def test_port_option_overrides_the_config_and_is_validated(tmp_path, daemon):
    cfg = tmp_path / "iot.toml"
    cfg.write_text('[broker]\nhost = "127.0.0.1"\nport = 1\n')
    port = free_port()
    proc, notify = daemon("iot-broker", "--config", str(cfg), "-p", str(port))
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


_VALID = [
    packets.encode(packets.Connect("fuzz", keep_alive=5)),
    packets.encode(packets.Publish("a/b", b"x", 1, packet_id=7)),
    packets.encode(packets.Subscribe(3, (("a/#", 2),))),
    packets.encode(packets.Pingreq()),
]


@st.composite
def garbage(draw):
    """Random bytes, or a valid CONNECT followed by mutated valid packets."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=1, max_size=300))
    body = bytearray(b"".join(draw(st.lists(st.sampled_from(_VALID[1:]), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        if body:
            i = draw(st.integers(0, len(body) - 1))
            body[i] = draw(st.integers(0, 255))
    return _VALID[0] + bytes(body)


def test_fuzzed_connections_never_take_the_broker_down(broker_factory):
    b = broker_factory("connect_timeout = 1.0\n")

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(garbage())
    def attack(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", b.port), timeout=2) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(2)
                while s.recv(4096):  # read until the broker closes (or the 2 s timeout)
                    pass
            except (ConnectionResetError, BrokenPipeError, TimeoutError, socket.timeout):
                pass

    attack()
    assert b.proc.running(), b.proc.log()
    assert healthy(b.port)
    assert "Traceback" not in b.proc.log()
