"""Seed 004's stress test on this machine: N signed QoS 1 messages from P processes
(`iotctl stress`) -> broker -> iot-ingest -> MariaDB, with our broker and with Mosquitto,
each once plain and once with a `kill -9` of iot-ingest halfway (restarted at once).

    .venv/bin/python benchmarks/ingest_bench.py                      # 1,000,000 x 4, both brokers, both modes
    .venv/bin/python benchmarks/ingest_bench.py --messages 200000 --brokers ours --modes plain

Reported per run: msgs/s end to end (first publish to last commit: min(ts) to max(landed_at)
in the table, where landed_at is stamped as the batch goes to the database, its commit
follows within the batch's commit time), the publishers' own rate (publish to PUBACK, the
seed's figure), rows in the table, p50/p99 latency (landed_at - ts per row), and CPU seconds
per component. Everything runs on this machine: load generator, broker, worker and MariaDB
share its cores. MariaDB runs with innodb_flush_log_at_trx_commit=1 (durable: a commit is on
disk before the worker acknowledges) unless --flush-log says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds  # noqa: E402
from tests.mariadb import MariaDB  # noqa: E402
from tests.support import free_port, port_open, wait_for  # noqa: E402

BIN = Path(sys.executable).parent
TOPIC = "sensors/live/stress_test"




class Run:
    def __init__(self, args, work: Path, db: MariaDB, broker: str, mode: str):
        self.args, self.work, self.db, self.broker, self.mode = args, work, db, broker, mode
        self.dir = work / f"{broker}-{mode}"
        self.dir.mkdir()
        self.database = f"bench_{broker}_{mode}"
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.cpu: dict[str, float] = {}

    # processes ---------------------------------------------------------------------------------

    def start_broker(self) -> subprocess.Popen:
        w = self.args.inflight
        if self.broker == "ours":
            conf = self.dir / "broker.toml"
            conf.write_text(f'[paths]\nstate_dir = "{self.dir / "var"}"\n[broker]\nhost = "127.0.0.1"\nport = {self.port}\n'
                            f"max_inflight_messages = {w}\nmax_queued_messages = 10000000\nsys_interval = 0\n")
            argv = [str(BIN / "iot-broker"), "--config", str(conf)]
        else:
            conf = self.dir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                            f"max_inflight_messages {w}\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\n"
                            "log_type warning\n")
            argv = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        p = subprocess.Popen(argv, stderr=open(self.dir / "broker.log", "ab"), start_new_session=True)
        wait_for(lambda: port_open(self.port), 15, what="broker to listen")
        self.broker_proc = p
        return p

    def write_config(self) -> Path:
        keys = self.dir / "ingest.keys"
        keys.write_text(f"bench {os.urandom(32).hex()}\n")
        os.chmod(keys, 0o600)
        cfg = self.dir / "iot.toml"
        cfg.write_text(
            f'[paths]\nstate_dir = "{self.dir / "var"}"\n[mqtt]\nport = {self.port}\nclient_id_prefix = "bench"\n'
            f'[ingest]\nkeys_file = "{keys}"\nbatch_size = {self.args.batch}\n'
            + self.db.ingest_toml(self.database))
        self.config = cfg
        return cfg

    def start_worker(self, n: int) -> subprocess.Popen:
        log = self.dir / f"ingest-{n}.log"
        p = subprocess.Popen([str(BIN / "iot-ingest"), "--config", str(self.config)], stderr=open(log, "ab"),
                             start_new_session=True)
        wait_for(lambda: "ready" in log.read_text() or p.poll() is not None, 30, what="iot-ingest ready")
        if p.poll() is not None:
            raise RuntimeError(f"iot-ingest exited: {log.read_text()[-2000:]}")
        return p

    @staticmethod
    def landed_in_log(log: Path) -> int:
        found = re.findall(r"landed=(\d+)", log.read_text(errors="replace"))
        return int(found[-1]) if found else 0

    # the run -------------------------------------------------------------------------------------

    def go(self) -> dict:
        a = self.args
        self.db.create_database(self.database)
        self.write_config()
        broker = self.start_broker()
        worker = self.start_worker(1)
        workers = [worker]
        run_id = f"{self.broker[:2]}{self.mode[:1]}{os.getpid() % 1000}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        db_cpu0 = cpu_seconds(self.db.proc.pid)
        if a.generator == "stress":
            gen = [str(BIN / "iotctl"), "stress", "--config", str(self.config)]
        else:  # same messages, raw sockets: see benchmarks/ingest_load.py
            gen = [sys.executable, str(ROOT / "benchmarks/ingest_load.py"), "--port", str(self.port),
                   "--keys", str(self.dir / "ingest.keys")]
        load = subprocess.Popen(
            ([ "nice", "-n", str(a.nice_load)] if a.nice_load else [])
            + gen + ["--messages", str(a.messages), "--processes", str(a.processes), "--topic", TOPIC,
                     "--run-id", run_id, "--json", "--window", str(a.window), "--timeout", "1800"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed_at = restarted_at = None
        cpu_worker = 0.0
        if self.mode == "kill":
            log1 = self.dir / "ingest-1.log"
            wait_for(lambda: self.landed_in_log(log1) >= a.messages // 2 or load.poll() is not None, 1800, 0.05,
                     what="half the messages landed")
            cpu_worker += cpu_seconds(worker.pid)
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            killed_at = time.time()
            workers.append(self.start_worker(2))
            restarted_at = time.time()
        out, err = load.communicate(timeout=1900)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if load.returncode != 0:
            raise RuntimeError(f"stress failed: {err}\n{out}")
        stress = json.loads(out)
        # Done when each publisher's last message is in the table (each stream lands in order),
        # then confirmed with one COUNT(*).
        per, extra = divmod(a.messages, a.processes)
        lasts = [f"{run_id}-{i}-{per + (1 if i < extra else 0) - 1}" for i in range(a.processes)]
        marks = ",".join(f"'{x}'" for x in lasts)
        wait_for(lambda: self.db.query(f"SELECT COUNT(*) FROM readings WHERE msg_id IN ({marks})",
                                       database=self.database)[0][0] == len(lasts), 1800, 0.25, what="last messages")
        wait_for(lambda: self.db.query("SELECT COUNT(*) FROM readings", database=self.database)[0][0] >= a.messages,
                 600, 2.0, what="all rows")
        time.sleep(0.5)
        self.cpu = {
            # RUSAGE_CHILDREN also holds the killed worker (waited for above): not the load's.
            "stress": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                            - cpu_worker, 1),
            "broker": round(cpu_seconds(broker.pid), 1),
            "ingest": round(cpu_worker + sum(cpu_seconds(w.pid) for w in workers if w.poll() is None), 1),
            "mariadb": round(cpu_seconds(self.db.proc.pid) - db_cpu0, 1),
        }
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
                w.wait(20)
        broker.send_signal(signal.SIGTERM)
        broker.wait(20)
        return self.measure(run_id, stress, killed_at, restarted_at)

    def measure(self, run_id: str, stress: dict, killed_at, restarted_at) -> dict:
        q = lambda sql: self.db.query(sql, database=self.database)  # noqa: E731
        rows, distinct_ok = q(f"SELECT COUNT(*), SUM(msg_id LIKE '{run_id}-%') FROM readings")[0]
        first, last = q("SELECT MIN(ts), MAX(landed_at) FROM readings")[0]
        lat = sorted(x for x, in q("SELECT landed_at - ts FROM readings"))

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

        secs = last - first
        return {
            "broker": self.broker, "mode": self.mode, "messages": self.args.messages,
            "processes": self.args.processes, "rows": rows, "rows_of_this_run": int(distinct_ok),
            "e2e_seconds": round(secs, 2), "e2e_msgs_per_s": round(rows / secs),
            "publish_msgs_per_s": round(stress["rate"]), "sent": stress["sent"], "acked": stress["acked"],
            "p50_ms": round(pct(0.50)), "p99_ms": round(pct(0.99)), "max_ms": round(lat[-1] * 1000),
            "killed_after_s": round(killed_at - first, 1) if killed_at else None,
            "restart_s": round(restarted_at - killed_at, 2) if killed_at else None,
            "cpu_s": self.cpu,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--brokers", default="ours,mosquitto")
    ap.add_argument("--modes", default="plain,kill")
    ap.add_argument("--inflight", type=int, default=5000, help="broker max_inflight_messages (default 5000)")
    ap.add_argument("--window", type=int, default=1000, help="unacked messages per publisher (default 1000)")
    ap.add_argument("--batch", type=int, default=1000, help="iot-ingest batch_size (default 1000)")
    ap.add_argument("--flush-log", type=int, default=1, choices=(0, 1, 2),
                    help="innodb_flush_log_at_trx_commit (default 1: durable)")
    ap.add_argument("--nice-load", type=int, default=0, help="run the load generator at this nice level")
    ap.add_argument("--generator", choices=("stress", "raw"), default="stress",
                    help="load: `iotctl stress` (the seed's tool, paho) or benchmarks/ingest_load.py "
                         "(the same messages over raw sockets, lighter on the shared cores)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    (work / "mariadb").mkdir()
    db = MariaDB(work / "mariadb", options=(f"--innodb-flush-log-at-trx-commit={args.flush_log}",
                                            "--innodb-buffer-pool-size=768M", "--innodb-log-file-size=512M"))
    results = []
    try:
        db.start()
        for broker in args.brokers.split(","):
            for mode in args.modes.split(","):
                t = time.monotonic()
                print(f"== {broker} {mode}: {args.messages:,} messages from {args.processes} processes", flush=True)
                r = Run(args, work, db, broker, mode).go()
                r["flush_log"] = args.flush_log
                r["broker_inflight"] = args.inflight
                results.append(r)
                print(json.dumps(r), f"({time.monotonic() - t:.0f}s)", flush=True)
    finally:
        db.stop()
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| broker | run | msgs/s end to end | publish msgs/s | rows | p50 | p99 | CPU s (load/broker/ingest/db) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        c = r["cpu_s"]
        run = "plain" if r["mode"] == "plain" else f"kill -9 at {r['killed_after_s']}s"
        print(f"| {r['broker']} | {run} | {r['e2e_msgs_per_s']:,} | {r['publish_msgs_per_s']:,} | {r['rows']:,} | "
              f"{r['p50_ms']:,} ms | {r['p99_ms']:,} ms | {c['stress']}/{c['broker']}/{c['ingest']}/{c['mariadb']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["rows"] == args.messages == r["rows_of_this_run"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
