"""benchmarks/broker_bench.py, the side-by-side harness of issue 21, on one short scenario against
both real brokers: it must count what it delivered and what it lost, and write its section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

SCENARIO = "QoS 1, 1 -> 1"


def run_rows(out: str) -> dict[str, list[str]]:
    """The per-run table's cells, by broker (run 1 only)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0] in ("iot-broker", "mosquitto") and cells[2] == "1":
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_qos1_one_to_one_reports_delivered_and_zero_lost_for_both_brokers(tmp_path: Path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Broker\n\nold figures\n\n## File transfer\n\nkept\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/broker_bench.py"), "--seconds", "0.5",
                           "--runs", "1", "--only", SCENARIO, "--write", str(doc)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ERROR" not in out, out
    rows = run_rows(out)
    assert set(rows) == {"iot-broker", "mosquitto"}, out
    for broker, cells in rows.items():
        _, scenario, _, rate, delivered, lost, dup, *_ = cells
        assert scenario.startswith(SCENARIO), cells
        assert int(lost.replace(",", "")) == 0, f"{broker} lost messages: {out}"
        assert int(dup.replace(",", "")) == 0, f"{broker} delivered duplicates: {out}"
        assert rate.endswith("msg/s"), cells
    assert int(rows["mosquitto"][4].replace(",", "")) > 0, out
    assert int(rows["iot-broker"][4].replace(",", "")) > 0, out
    # The summary row: both figures, the target, and every run's loss (0 / 0).
    summary = next(line for line in out.splitlines() if line.startswith(f"| {SCENARIO}, 100 in flight"))
    assert ">= 0.7x" in summary and summary.rstrip(" |").endswith("0 / 0"), summary
    text = doc.read_text()
    assert "old figures" not in text and "## File transfer\n\nkept" in text
    assert summary in text


def test_help_names_every_option():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/broker_bench.py"), "--help"],
                         capture_output=True, text=True, timeout=30).stdout
    for option in ("--runs", "--seconds", "--only", "--broker", "--write", "--py-spy"):
        assert option in out


def test_an_only_that_matches_nothing_is_refused_with_the_names():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/broker_bench.py"), "--only", "no such"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "fan-in 50 -> 1" in proc.stderr
