"""The tests run against the versions that ship: deploy/constraints.txt pins them for the system
install, and the checkout's venv (./install.sh --local) is built with the same pins. paho's
receive path is tuned against internals of one release (daemons/mqtttune.py): the tuned path
must be the one under test here, and IOT_PAHO_STOCK=1 must really turn it off."""

from importlib import metadata

import pytest

from daemons import mqtttune
from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient
from daemons.service import Log
from tests.support import ROOT


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / "deploy" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pkg, _, version = line.partition("==")
            out[pkg.lower()] = version
    return out


@pytest.mark.parametrize("name", ["constraints.txt", "constraints-test.txt"])
def test_the_venv_holds_exactly_the_pinned_versions(name):
    pinned = pins(name)
    assert "paho-mqtt" in pins("constraints.txt")
    wrong = {}
    for pkg, version in pinned.items():
        try:
            have = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have != version:
            wrong[pkg] = (version, have)
    assert not wrong, f"pinned vs installed (run ./install.sh --local): {wrong}"


def test_the_tuned_receive_path_is_active_in_the_pinned_paho(monkeypatch):
    monkeypatch.delenv("IOT_PAHO_STOCK", raising=False)
    c = MqttClient(MqttConfig(), "t", log=Log("t"), manual_ack=True, tune_receiver=True)
    assert c.tuned, "paho's internals no longer match daemons/mqtttune.py: re-tune or drop the tuning"
    assert c.paho.loop_read.__qualname__.startswith("tune_receiver")


def test_iot_paho_stock_leaves_the_client_stock(monkeypatch):
    monkeypatch.setenv("IOT_PAHO_STOCK", "1")
    c = MqttClient(MqttConfig(), "t", log=Log("t"), manual_ack=True, tune_receiver=True)
    assert not c.tuned and not mqtttune.supported(c.paho)
    assert c.paho.loop_read.__func__ is type(c.paho).loop_read
