"""iotctl pub/sub against a real Mosquitto: options and exit codes scripts rely on."""

import subprocess

import pytest

from tests.support import BIN, free_port, read_until

IOTCTL = str(BIN / "iotctl")


def ctl(*args: str, timeout: float = 30, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([IOTCTL, *args], capture_output=True, timeout=timeout, input=input)


def start_sub(port: int, *args: str) -> subprocess.Popen:
    """Start `iotctl sub -d` and return once its SUBACK is logged: from then on nothing is missed."""
    sub = subprocess.Popen([IOTCTL, "sub", "-d", "-p", str(port), *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        read_until(sub.stderr, b"subscribed", timeout=10)
    except AssertionError:
        sub.kill()
        raise
    return sub


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_pub_sub_round_trip_at_each_qos(mosquitto, qos):
    port = str(mosquitto.port)
    sub = start_sub(mosquitto.port, "-t", "t/qos", "-q", str(qos), "-v", "-C", "3", "-W", "20")
    sent = []
    for i in range(3):
        r = ctl("pub", "-p", port, "-t", "t/qos", "-q", str(qos), "-m", f"hello {i}")
        assert r.returncode == 0, r.stderr
        sent.append(f"t/qos hello {i}")
    out, err = sub.communicate(timeout=25)
    assert sub.returncode == 0, err
    assert out.decode().splitlines() == sent


def test_retained_message_reaches_a_late_subscriber_and_is_cleared(mosquitto):
    port = str(mosquitto.port)
    assert ctl("pub", "-p", port, "-t", "state/pump", "-r", "-q", "1", "-m", "on").returncode == 0
    r = ctl("sub", "-p", port, "-t", "state/#", "-v", "-C", "1", "-W", "10")
    assert r.returncode == 0 and r.stdout == b"state/pump on\n"
    assert ctl("pub", "-p", port, "-t", "state/pump", "-r", "-n").returncode == 0
    r = ctl("sub", "-p", port, "-t", "state/#", "-C", "1", "-W", "1")
    assert r.returncode == 27 and r.stdout == b""


def test_binary_payload_from_file_and_stdin_round_trip(mosquitto, tmp_path):
    port = str(mosquitto.port)
    blob = bytes(range(256)) * 4
    (tmp_path / "blob").write_bytes(blob)
    sub = start_sub(mosquitto.port, "-t", "bin", "-C", "2", "-N", "-q", "1", "-W", "20")
    assert ctl("pub", "-p", port, "-t", "bin", "-q", "1", "-f", str(tmp_path / "blob")).returncode == 0
    assert ctl("pub", "-p", port, "-t", "bin", "-q", "1", "-s", input=b"\x00tail").returncode == 0
    out, _ = sub.communicate(timeout=25)
    assert out == blob + b"\x00tail"


def test_unreachable_broker_exits_1_with_a_reason():
    port = str(free_port())
    r = ctl("pub", "-p", port, "-t", "x", "-m", "y", "--timeout", "3")
    assert r.returncode == 1 and f"127.0.0.1:{port}" in r.stderr.decode()
    r = ctl("sub", "-p", port, "-t", "x", "--timeout", "3")
    assert r.returncode == 1


def test_usage_errors_exit_64():
    assert ctl("pub", "-t", "x").returncode == 64  # no payload option
    assert ctl("pub", "-t", "x", "-m", "a", "-n").returncode == 64  # two payload options
    assert ctl("sub", "-t", "x", "-q", "3").returncode == 64
    assert ctl("frobnicate").returncode == 64


def test_bad_topics_are_refused_before_connecting(mosquitto):
    port = str(mosquitto.port)
    r = ctl("pub", "-p", port, "-t", "a/+/b", "-m", "x")
    assert r.returncode == 64 and b"invalid topic 'a/+/b'" in r.stderr
    r = ctl("sub", "-p", port, "-t", "a/#/b", "-W", "1")
    assert r.returncode == 64 and b"invalid topic 'a/#/b'" in r.stderr


def test_help_documents_the_mosquitto_options():
    out = ctl("pub", "--help").stdout.decode()
    for opt in ("-h", "-p", "-t", "-m", "-f", "-q", "-r", "-i", "-u", "-P", "-k", "--cafile"):
        assert f" {opt}" in out
    out = ctl("sub", "--help").stdout.decode()
    for opt in ("-v", "-C", "-W"):
        assert f" {opt}" in out


def test_bad_config_exits_78(tmp_path):
    cfg = tmp_path / "iot.toml"
    cfg.write_text("[mqtt]\nport = \"x\"\n")
    r = ctl("pub", "--config", str(cfg), "-t", "x", "-m", "y")
    assert r.returncode == 78 and b"[mqtt] port" in r.stderr
