"""Broker memory per idle connection: RSS at start, then with N idle clients, ours and Mosquitto.

    .venv/bin/python benchmarks/conn_rss.py [--clients 1000 10000] [--broker ours mosquitto]

Each broker is started freshly with its defaults on a free loopback port. N raw-socket clients
connect (MQTT 3.1.1, clean session, keep-alive 600; from several loopback addresses, see
PER_ADDRESS) and each waits for its CONNACK; then the
broker's VmRSS is read from /proc. Per connection = (RSS after - RSS before) / accepted. A
broker that refuses some (its connection limit) is reported with the number it accepted.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, port_open, rss_kib  # noqa: E402

BATCH = 200  # CONNECTs sent before their CONNACKs are read: the listen backlog is not overrun
# Clients come from 127.0.0.2, .3, ... this many to an address: our max_connection_rate (200/s per
# address, bursts of 1000) is for one address opening too many, not for 10,000 devices.
PER_ADDRESS = 500


def connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 600) + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def connect_idle(port: int, n: int, timeout: float = 30.0) -> tuple[list[socket.socket], int]:
    """Open n clients; returns the open sockets and how many got CONNACK 0."""
    socks, accepted = [], 0
    for start in range(0, n, BATCH):
        batch = []
        for i in range(start, min(n, start + BATCH)):
            s = socket.create_connection(("127.0.0.1", port), timeout,
                                         source_address=(f"127.0.0.{2 + i // PER_ADDRESS}", 0))
            try:
                s.sendall(connect_packet(f"idle-{i}"))
            except OSError:  # reset: refused at accept
                s.close()
                continue
            batch.append(s)
        for s in batch:
            try:
                ok = recv_exact(s, 4) == b"\x20\x02\x00\x00"
            except OSError:  # reset: refused at accept
                ok = False
            if ok:
                accepted += 1
                socks.append(s)
            else:
                s.close()
    return socks, accepted


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
        socks, accepted = connect_idle(port, n)
        after = rss_kib(p.pid)
        return before, after, accepted
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
