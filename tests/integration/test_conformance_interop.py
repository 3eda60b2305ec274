"""MQTT 3.1.1 conformance, section 7: a conformant third-party client (Mosquitto's
mosquitto_pub / mosquitto_sub, forced to MQTT v3.1.1) works with iot-broker using nothing
outside the specification."""

from __future__ import annotations

import shutil
import subprocess

from tests.support import readline


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (./install.sh --local --test-deps installs mosquitto-clients)"
    return path


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
        assert readline(proc.stdout) == b"interop/retained kept\n"  # the retained one: subscribed now
        subprocess.run([pub, *common, "-i", "interop-pub2", "-t", "interop/live", "-q", "2", "-m", "hello"],
                       check=True, timeout=10)
        assert readline(proc.stdout) == b"interop/live hello\n"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
