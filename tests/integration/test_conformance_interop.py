"""MQTT 3.1.1 conformance, section 7: a conformant third-party client (Mosquitto's
mosquitto_pub / mosquitto_sub, forced to MQTT v3.1.1) works with iot-broker using nothing
outside the specification."""

from __future__ import annotations

import select
import shutil
import subprocess
import time


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (./install.sh --local --test-deps installs mosquitto-clients)"
    return path


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise AssertionError(f"mosquitto_sub printed {line!r} within {timeout}s")
        ch = proc.stdout.read(1)
        if not ch:
            raise AssertionError(f"mosquitto_sub exited ({proc.poll()}) after printing {line!r}")
        line += ch
    return line.decode().rstrip("\n")


def test_mqtt_7_0_0_2_standard_clients_interoperate(broker):
    """[MQTT-7.0.0-2] [MQTT-7.1.1-1] mosquitto_pub and mosquitto_sub (MQTT v3.1.1, over TCP)
    exchange a retained QoS 1 message and a live QoS 2 message through iot-broker without any
    extension."""
    pub, sub = _tool("mosquitto_pub"), _tool("mosquitto_sub")
    common = ["-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv311"]
    subprocess.run([pub, *common, "-i", "interop-pub", "-t", "interop/retained", "-q", "1", "-r", "-m", "kept"],
                   check=True, timeout=10)
    proc = subprocess.Popen([sub, *common, "-i", "interop-sub", "-t", "interop/#", "-q", "2", "-v", "-C", "2",
                             "-W", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    try:
        assert _readline(proc, 5.0) == "interop/retained kept"  # the retained one: subscribed now
        subprocess.run([pub, *common, "-i", "interop-pub2", "-t", "interop/live", "-q", "2", "-m", "hello"],
                       check=True, timeout=10)
        assert _readline(proc, 5.0) == "interop/live hello"
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
