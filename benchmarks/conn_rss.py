"""Broker memory per idle connection: RSS at start, then with N idle clients, ours and Mosquitto.

    .venv/bin/python benchmarks/conn_rss.py [--clients 1000 10000] [--broker ours mosquitto]

Each broker is started freshly with its defaults on a free loopback port. N raw-socket clients
connect (MQTT 3.1.1, clean session, keep-alive 600; from several loopback addresses: see
tests/mqttraw.connect_idle) and each waits for its CONNACK; then the broker's VmRSS is read
from /proc. Per connection = (RSS after - RSS before) / accepted. A
broker that refuses some (its connection limit) is reported with the number it accepted.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, port_open, rss_kib  # noqa: E402
from tests.mqttraw import connect_idle  # noqa: E402


def start(kind: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "ours":
        cfg = tmp / "iot.toml"
        cfg.write_text(f'[paths]\nstate_dir = "{tmp / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\n')
        argv = [str(Path(sys.executable).parent / "iot-broker"), "--config", str(cfg)]
    else:
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        argv = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not port_open(port):
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{kind} did not start listening on {port}")
        time.sleep(0.05)
    return p, port


def measure(kind: str, n: int) -> tuple[int, int, int]:
    """(RSS before KiB, RSS after KiB, clients accepted)"""
    tmp = Path(tempfile.mkdtemp(prefix="iot-connrss-"))
    p, port = start(kind, tmp)
    socks: list[socket.socket] = []
    try:
        time.sleep(0.5)  # the probe connection of port_open is gone, start-up work done
        before = rss_kib(p.pid)
        socks = connect_idle(port, n)
        after = rss_kib(p.pid)
        return before, after, len(socks)
    finally:
        for s in socks:
            s.close()
        p.terminate()
        p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--broker", nargs="+", choices=("ours", "mosquitto"), default=["ours", "mosquitto"])
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Our sockets and, inherited, the broker's: both hold one descriptor per client.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if max(args.clients) + 100 > hard:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} is below {max(args.clients)} clients")
    print(f"{'broker':<10} {'clients':>8} {'accepted':>8} {'RSS start MiB':>14} {'RSS after MiB':>14} "
          f"{'KiB/conn':>9}")
    for n in args.clients:
        for kind in args.broker:
            before, after, accepted = measure(kind, n)
            per = (after - before) / accepted if accepted else float("nan")
            print(f"{kind:<10} {n:>8} {accepted:>8} {before / 1024:>14.1f} {after / 1024:>14.1f} {per:>9.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
