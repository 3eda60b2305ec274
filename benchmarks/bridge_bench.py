"""QoS 1 throughput through a bridge: a publisher on the local broker, a subscriber on the
remote one, the bridge between them (`topic bench/# out 1`). Three pairs in the same run:
iot-broker -> Mosquitto, iot-broker -> iot-broker, and Mosquitto -> Mosquitto as the
reference. The publisher keeps 20 messages unacknowledged (as paho does); both local brokers
have max_inflight_messages 20, so the bridge's own window is 20 too; persistence off on both
sides of the reference, and for ours once off and once on (the bridge's queue in the store).

    .venv/bin/python -m benchmarks.bridge_bench [--n 20000] [--write]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.rawflow import run_flow
from benchmarks.common import free_port, load_average, machine, port_open, write_section

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "bench/bridge"


def start(kind: str, d: Path, bridge_to: int | None = None, persistence: bool = False) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "iot-broker":
        text = (f'[paths]\nstate_dir = "{d}"\n[broker]\nhost = "127.0.0.1"\nport = {port}\nmax_inflight_messages = 20\n'
                f"persistence = {str(persistence).lower()}\nmax_connection_rate = 0\n")
        if bridge_to:
            text += (f'[[broker.bridge]]\nname = "bench"\naddress = ["127.0.0.1:{bridge_to}"]\n'
                     'topic = ["bench/# out 1"]\nrestart_timeout = 0.5\n')
        (d / "iot.toml").write_text(text)
        argv = [str(Path(sys.executable).parent / "iot-broker"), "--config", str(d / "iot.toml")]
    else:
        text = (f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
                "max_inflight_messages 20\nmax_queued_messages 100000\n")
        if bridge_to:
            text += f"connection bench\naddress 127.0.0.1:{bridge_to}\ntopic bench/# out 1\nrestart_timeout 1\n"
        (d / "mosquitto.conf").write_text(text)
        argv = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(d / "mosquitto.conf")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not port_open(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start")
        time.sleep(0.05)
    return proc, port


def wait_bridged(local: int, remote: int, timeout: float = 20) -> None:
    """Until a probe published on `local` arrives on `remote`: the bridge is up and subscribed."""
    got = []
    sub = paho.Client(CallbackAPIVersion.VERSION2)
    sub.on_message = lambda _c, _u, m: got.append(m)
    sub.connect("127.0.0.1", remote)
    sub.subscribe("bench/probe", 1)
    sub.loop_start()
    pub = paho.Client(CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", local)
    pub.loop_start()
    deadline = time.monotonic() + timeout
    try:
        while not got:
            if time.monotonic() > deadline:
                raise RuntimeError("the bridge did not come up")
            pub.publish("bench/probe", b"x", 1).wait_for_publish(5)
            time.sleep(0.2)
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


def one(local_kind: str, remote_kind: str, n: int, persistence: bool = False) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        rd, ld = Path(tmp, "r"), Path(tmp, "l")
        rd.mkdir()
        ld.mkdir()
        remote, rport = start(remote_kind, rd)
        local, lport = start(local_kind, ld, bridge_to=rport, persistence=persistence)
        try:
            wait_bridged(lport, rport)
            return run_flow(lport, qos=1, n=n, pubs=1, subs=1, window=10_000, topic_of=lambda i: TOPIC,
                            sub_filter="bench/#", sub_port=rport)
        finally:
            for p in (local, remote):
                p.terminate()
                p.wait(15)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    runs = [("Mosquitto -> Mosquitto", "mosquitto", "mosquitto", False),
            ("iot-broker -> Mosquitto", "iot-broker", "mosquitto", False),
            ("iot-broker -> iot-broker", "iot-broker", "iot-broker", False),
            ("iot-broker -> iot-broker, persistence on", "iot-broker", "iot-broker", True)]
    rows = []
    for label, lk, rk, pers in runs:
        secs, got = one(lk, rk, args.n, pers)
        rows.append((label, args.n / secs if got >= args.n else got / secs, got))
        print(f"{label}: {rows[-1][1]:,.0f} msg/s, delivered {got} of {args.n}, lost {args.n - got}", flush=True)
    ref = rows[0][1]
    lines = ["## Bridge", "",
             f"`python -m benchmarks.bridge_bench --n {args.n}`: QoS 1 through a bridge (`topic bench/# out 1`), "
             "one publisher on the local broker keeping 20 in flight, one subscriber on the remote broker; "
             f"{machine()}; load average {load_average()} at the end.", "",
             "| bridge | messages/s | delivered | lost | vs Mosquitto -> Mosquitto |", "| --- | --- | --- | --- | --- |"]
    for label, rate, got in rows:
        lines.append(f"| {label} | {rate:,.0f} | {got} | {args.n - got} | {rate / ref:.2f}x |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        write_section(ROOT / "docs" / "BENCHMARKS.md", "Bridge", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
