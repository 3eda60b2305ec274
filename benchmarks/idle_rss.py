"""The whole daemon set's idle memory: every daemon, the factory and its dashboard, as `iotctl up`
runs them, and a Mosquitto beside them for scale.

    .venv/bin/python benchmarks/idle_rss.py [--settle 20] [--processes one|per-device] [--write docs/BENCHMARKS.md]

"Idle" is the node with no outside load: the factory's simulated devices publish their
telemetry (that is what the set does when nobody uses it), nothing else comes in. After
`--settle` seconds the RSS and PSS (RSS with each shared page divided among the processes
sharing it: the fair sum) of every process supervisord runs, and of supervisord itself, are read
from /proc.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, machine, rss_kib, write_section  # noqa: E402
from daemons import config, supervise  # noqa: E402

TARGET_MIB = 300


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def mosquitto_rss(tmp: Path, settle: float) -> int:
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    p = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(min(settle, 3))
        return rss_kib(p.pid)
    finally:
        p.terminate()
        p.wait(10)


def measure(settle: float, processes: str) -> tuple[list[tuple[str, int, int]], int]:
    tmp = Path(tempfile.mkdtemp(prefix="iot-rss-"))
    port = free_port()
    cfg_path = tmp / "iot.toml"
    cfg_path.write_text(f'[paths]\nstate_dir = "{tmp / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n'
                        f'[mqtt]\nport = {port}\n[factory]\nprocesses = "{processes}"\n'
                        f'dashboard_port = {free_port()}\n')
    shutil.copy(ROOT / "etc/iot/ingest.keys", tmp / "ingest.keys")
    os.chmod(tmp / "ingest.keys", 0o600)
    out = tmp / "up.out"
    iotctl = str(Path(sys.executable).parent / "iotctl")
    with open(out, "wb") as f:
        up = subprocess.Popen([iotctl, "up", "--config", str(cfg_path)], stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"stop: Ctrl-C" not in out.read_bytes():
            if up.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"iotctl up did not come up:\n{out.read_text()}")
            time.sleep(0.2)
        time.sleep(settle)
        cfg = config.load(cfg_path)
        rows = []
        sup_pid = int((cfg.paths.state_dir / "run" / "supervisord.pid").read_text())
        rows.append(("supervisord", rss_kib(sup_pid), pss_kib(sup_pid)))
        for info in supervise.rpc(cfg).supervisor.getAllProcessInfo():
            rows.append((info["name"], rss_kib(info["pid"]), pss_kib(info["pid"])))
        return rows, mosquitto_rss(tmp, settle)
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=20.0, help="seconds idle before reading (default 20)")
    ap.add_argument("--processes", choices=("one", "per-device"), default="one",
                    help="[factory] processes: the devices in one process or one each (default one)")
    ap.add_argument("--write", metavar="FILE", help="replace the section in this markdown file")
    args = ap.parse_args()
    results = {}
    for processes in ([args.processes] if not args.write else ["one", "per-device"]):
        results[processes] = measure(args.settle, processes)
    lines = ["## Idle memory of the whole set", "",
             f"Measured by `benchmarks/idle_rss.py` ({machine()}): `iotctl up` (every daemon, one simulated PLC, "
             f"the factory and its dashboard under supervisord), read after {args.settle:g} s with no outside load "
             f"(the factory's devices publish their telemetry). PSS divides each shared page among its sharers: "
             f"the sum is what the set costs, where a sum of RSS counts the shared pages (Python, libssl) once per "
             f"process. Target: under {TARGET_MIB} MB (= {TARGET_MIB * 1e6 / 2**20:.0f} MiB).", ""]
    for processes, (rows, mosq) in results.items():
        total_rss = sum(r for _, r, _ in rows)
        total_pss = sum(p for _, _, p in rows)
        lines += [f"`[factory] processes = \"{processes}\"`:", "", "| process | RSS MiB | PSS MiB |", "| --- | --- | --- |"]
        lines += [f"| {name} | {r / 1024:.1f} | {p / 1024:.1f} |" for name, r, p in rows]
        sup_rss, sup_pss = rows[0][1], rows[0][2]
        lines += [f"| **the daemons ({len(rows) - 1} processes: what systemd runs)** | "
                  f"**{(total_rss - sup_rss) / 1024:.1f}** | **{(total_pss - sup_pss) / 1024:.1f}** |",
                  f"| **with supervisord ({len(rows)} processes: what `iotctl up` runs)** | **{total_rss / 1024:.1f}** | "
                  f"**{total_pss / 1024:.1f}** |",
                  f"| Mosquitto alone, idle, for scale | {mosq / 1024:.1f} | |", ""]
        print(f"processes={processes}: {len(rows)} processes, RSS {total_rss / 1024:.1f} MiB, "
              f"PSS {total_pss / 1024:.1f} MiB (Mosquitto idle {mosq / 1024:.1f} MiB)")
        for name, r, p in rows:
            print(f"  {name:<22} RSS {r / 1024:6.1f} MiB  PSS {p / 1024:6.1f} MiB")
    if args.write:
        write_section(Path(args.write), "Idle memory of the whole set", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
