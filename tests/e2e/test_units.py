"""Both systemd-analyze checks on every unit, against a staging root made by `install.sh --root`.

The staging root is an overlay on the cached Debian root of test_systemd.py, so the base units
and programs the checks resolve (sysinit.target, /bin/kill) are there and the cache stays clean.
`systemd-analyze verify` exits 0 even on unknown keys, so its output is what is checked.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_systemd import ROOTFS, build_rootfs
from tests.support import ROOT

SERVICES = sorted(p.name for p in (ROOT / "deploy/systemd").glob("*.service") if "@" not in p.name)
TEMPLATES = sorted(p.name for p in (ROOT / "deploy/systemd").glob("*@.service"))
# What systemd-analyze checks of a template: the instance the default config enables.
INSTANCES = ["iot-plc@line1.service", "iot-device@all.service"]
# Templates the default config enables no instance of ([ingest] workers = 1), checked as one.
UNENABLED = ["iot-ingest@2.service"]
pytestmark = [pytest.mark.systemd]


@pytest.fixture(scope="module")
def staging(tmp_path_factory):
    build_rootfs()
    d = tmp_path_factory.mktemp("staging")
    merged = d / "root"
    for sub in ("upper", "work", "root"):
        (d / sub).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ROOTFS},upperdir={d / 'upper'},workdir={d / 'work'}", str(merged)], check=True)
    try:
        r = subprocess.run([str(ROOT / "install.sh"), "--root", str(merged), "--factory"], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        yield merged
    finally:
        subprocess.run(["umount", str(merged)], check=False)


def test_every_daemon_has_a_unit_and_the_target_wants_it(staging: Path):
    from daemons import config, supervise
    assert {t.split("@")[0] for t in TEMPLATES} == {i.split("@")[0] for i in INSTANCES + UNENABLED}
    units = {(p.unit or p.name) + ".service" for p in supervise.programs(config.Config())}
    assert units == set(SERVICES) | set(INSTANCES)
    wants = {p.name for p in (staging / "etc/systemd/system/iot.target.wants").iterdir()}
    # One iot-plc@NAME per [[plc.device]] (line1 by default); --factory: its units, the devices in one process.
    assert wants == set(SERVICES) | set(INSTANCES)
    assert (staging / "etc/systemd/system/multi-user.target.wants/iot.target").is_symlink()


@pytest.mark.parametrize("unit", [*SERVICES, *INSTANCES, *UNENABLED, "iot.target"])
def test_systemd_analyze_verify_prints_nothing(staging: Path, unit: str):
    r = subprocess.run(["systemd-analyze", "verify", f"--root={staging}", unit], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout + r.stderr == ""


@pytest.mark.parametrize("unit", [*SERVICES, *INSTANCES, *UNENABLED])
def test_systemd_analyze_security_scores_ok(staging: Path, unit: str):
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={staging}", unit],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 1.5 and m.group(2) == "OK", r.stdout[-2000:]


def test_supervisor_set_matches_the_daemons():
    """deploy/supervisor/iot.conf runs the same set, broker first, stopped with TERM and a grace."""
    from daemons import supervise
    text = (ROOT / "deploy/supervisor/iot.conf").read_text()
    programs = dict(re.findall(r"\[program:([\w-]+)\][^\[]*?priority=(\d+)", text))
    assert programs == {p.name: str(p.priority) for p in supervise.PROGRAMS}
    assert "[include]\nfiles = /etc/iot/supervisor.d/*.conf" in text  # install.sh writes one iot-plc-NAME per PLC
    assert programs["iot-broker"] < min(v for k, v in programs.items() if k != "iot-broker")
    for block in text.split("[program:")[1:]:
        assert "stopsignal=TERM" in block and "stopwaitsecs=15" in block and "stopasgroup=true" in block
        assert "autorestart=true" in block
