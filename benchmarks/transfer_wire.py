"""Bytes on the wire for one file in each `[transfer] wire` format, counted, not estimated.

    .venv/bin/python benchmarks/transfer_wire.py [--size 10000000] [--write docs/BENCHMARKS.md]

For each format: iot-broker, iot-transfer-recv and iot-transfer-send as real processes with the
default [transfer] settings (256 KiB chunks, window 32) but `wire`, each daemon reaching the
broker through its own tests/faultproxy.py (no fault set: it only counts the MQTT bytes that
pass, both ways, headers included). A file of random bytes is renamed into the outbox; the
run ends when the sender's journal records the receiver's ack. Times include the proxies, two
extra Python hops: they compare the formats, they are not the daemons' speed (transfer_bench.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds, free_port, machine, port_open, write_section  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402

BIN = Path(sys.executable).parent
WIRES = ("binary", "seed-json")


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := pred():
            return v
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def run(base: Path, wire: str, master: Path) -> dict:
    base.mkdir(parents=True)
    port = free_port()
    procs: list[subprocess.Popen] = []
    proxies: dict[str, FaultProxy] = {}

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(argv, stdout=open(base / f"{name}.log", "wb"), stderr=subprocess.STDOUT, cwd=base)
        procs.append(p)
        return p

    try:
        (base / "broker.toml").write_text(f'[paths]\nstate_dir = "{base / "bvar"}"\n[broker]\nhost = "127.0.0.1"\n'
                                          f"port = {port}\nsys_interval = 0\n")
        start("broker", [str(BIN / "iot-broker"), "--config", str(base / "broker.toml")])
        wait(lambda: port_open(port), 10, "the broker to listen")
        daemons = {}
        for side, exe in (("recv", "iot-transfer-recv"), ("send", "iot-transfer-send")):
            proxies[side] = FaultProxy(port).start()
            conf = base / f"{side}.toml"
            conf.write_text(f'[paths]\nstate_dir = "{base / side}"\n[mqtt]\nport = {proxies[side].port}\n'
                            f'[transfer]\nwire = "{wire}"\n')
            daemons[side] = start(side, [str(BIN / exe), "--config", str(conf)])
            wait(lambda s=side: "subscribed" in (base / f"{s}.log").read_text(), 15, f"{exe} to subscribe")
        base_bytes = {side: dict(p.bytes) for side, p in proxies.items()}  # connecting and subscribing
        base_cpu = {side: cpu_seconds(p.pid) for side, p in daemons.items()}  # start-up
        outbox = base / "send" / "outbox"
        journal = base / "send" / "transfer-send" / "journal.jsonl"
        os.link(master, outbox / (master.name + ".part"))
        t0 = time.monotonic()
        os.rename(outbox / (master.name + ".part"), outbox / master.name)
        wait(lambda: journal.exists() and b'"ev":"done"' in journal.read_bytes(), 600, "the ack")
        took = time.monotonic() - t0
        received = base / "recv" / "transfer" / master.name
        assert received.read_bytes() == master.read_bytes(), "the received file differs"
        counted = {side: {d: p.bytes[d] - base_bytes[side].get(d, 0) for d in ("up", "down")}
                   for side, p in proxies.items()}
        return dict(wire=wire, size=master.stat().st_size, seconds=took, send=counted["send"], recv=counted["recv"],
                    send_cpu=cpu_seconds(daemons["send"].pid) - base_cpu["send"],
                    recv_cpu=cpu_seconds(daemons["recv"].pid) - base_cpu["recv"])
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in proxies.values():
            p.stop()


def render(rows: list[dict], size: int) -> str:
    lines = [
        "## File transfer: bytes on the wire per format",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/transfer_wire.py --size {size} "
        "--write docs/BENCHMARKS.md`.",
        f"One file of {size:,} random bytes, iot-transfer-send -> iot-broker -> iot-transfer-recv, default settings",
        "(256 KiB chunks, window 32, QoS 1) but `[transfer] wire`. Each daemon reaches the broker through its own",
        "counting proxy: bytes are whole MQTT packets (headers, topics, PUBACKs, statuses, the ack), connection",
        "set-up excluded. Time runs from the rename into the outbox to the ack, `settle_time` (0.5 s) included; it",
        "and the CPU of the transfer include the proxies' extra hops: compare the rows, not with the table above.",
        "",
        "| wire | sender -> broker | broker -> sender | broker -> receiver | receiver -> broker | on the sender's link "
        "| x file size | time | CPU sender / receiver |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        link = r["send"]["up"] + r["send"]["down"]
        lines.append(f"| {r['wire']} | {r['send']['up']:,} | {r['send']['down']:,} | {r['recv']['down']:,} "
                     f"| {r['recv']['up']:,} | {link:,} | {link / r['size']:.3f} | {r['seconds']:.2f} s "
                     f"| {r['send_cpu']:.2f} / {r['recv_cpu']:.2f} s |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=10_000_000, help="file size in bytes (default 10,000,000)")
    ap.add_argument("--write", metavar="FILE", help="replace this benchmark's section of that markdown file")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transfer-wire-"))
    rows = []
    try:
        master = work / "wire.bin"
        master.write_bytes(os.urandom(args.size))
        for wire in WIRES:
            rows.append(run(work / wire, wire, master))
            r = rows[-1]
            print(f"{wire:10} sender link {r['send']['up'] + r['send']['down']:>12,} bytes  "
                  f"receiver link {r['recv']['up'] + r['recv']['down']:>12,} bytes  {r['seconds']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = render(rows, args.size)
    print()
    print(section)
    if args.write:
        write_section(Path(args.write), "File transfer: bytes on the wire per format", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
