"""timeit of the 3.1.1 decode hot path: this checkout's packets.py against another git ref's.

    .venv/bin/python benchmarks/codec_decode.py [REF]     (REF defaults to main)

Decodes a QoS 1 PUBLISH (64-byte payload) and a PUBACK with decode(), and a QoS 1 PUBLISH
through a Reader; both versions run interleaved, 3 rounds of best-of-7 x 200k, so machine load
falls on both alike. Prints nanoseconds per packet; compare the best figures.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import timeit

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import daemons.broker.packets as new  # noqa: E402


def load_ref(ref: str):
    # The 3.1.1 codec imports nothing of ours at import time, so one file is enough.
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:daemons/broker/packets.py"],
                            check=True, capture_output=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "packets_ref.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("packets_ref", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["packets_ref"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ref = sys.argv[1] if len(sys.argv) > 1 else "main"
    old, n, results = load_ref(ref), 200_000, {}
    for _ in range(3):
        for label, m in ((ref, old), ("this checkout", new)):
            publish = m.encode(m.Publish("sensors/plant1/line2/temp", b"x" * 64, qos=1, packet_id=42))
            reader = m.Reader()
            reader.feed(m.encode(m.Connect("c")))
            reader.next_packet()
            env = dict(decode=m.decode, publish=publish, ack=m.encode(m.Puback(42)), r=reader)
            for what, stmt in (("decode(QoS 1 PUBLISH)", "decode(publish)"), ("decode(PUBACK)", "decode(ack)"),
                               ("Reader feed+next_packet(QoS 1 PUBLISH)", "r.feed(publish); r.next_packet()")):
                best = min(timeit.repeat(stmt, globals=env, number=n, repeat=7)) / n * 1e9
                results.setdefault((what, label), []).append(best)
    for (what, label), runs in results.items():
        print(f"{what:40s} {label:14s} best {min(runs):6.0f} ns  (rounds: {', '.join(f'{r:.0f}' for r in runs)})")


if __name__ == "__main__":
    main()
