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

`--backend sqlite` (issue 17): the same run into the embedded SQLite database with the SHIPPED
defaults (iot-broker given only host, port, state_dir and sys_interval; iot-ingest only its
keys, port and state_dir), rows counted in `<state_dir>/db/ingest.db`; brokers `ours`,
`mosquitto:5000` and `mosquitto:20` (Mosquitto with `persistence true` in a temp dir,
`max_queued_messages 0` and that `max_inflight_messages`, its defaults otherwise); plus the
SQLite sink alone committing 1000-row batches, to show the database's share:

    .venv/bin/python benchmarks/ingest_bench.py --backend sqlite --repeat 3 --write docs/BENCHMARKS.md

`--workers 1,2,3`: each run once per count of iot-ingest workers ([ingest] workers = N, one
process each, a shared subscription), the scaling curve:

    .venv/bin/python benchmarks/ingest_bench.py --backend sqlite --brokers ours --workers 1,2,3 --messages 100000
    .venv/bin/python benchmarks/ingest_bench.py --brokers ours --modes plain --workers 1,2,3 --messages 100000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_seconds, load_average, machine, write_section  # noqa: E402
from daemons.ingest.keys import Kind, new_key, write_sender_key  # noqa: E402
from daemons.ingest.sinks import SqliteSink  # noqa: E402
from tests.mariadb import MariaDB  # noqa: E402
from tests.support import free_port, port_open, wait_for  # noqa: E402

BIN = Path(sys.executable).parent
TOPIC = "sensors/live/stress_test"


class SqliteDb:
    """What Run needs from a database, for iot-ingest's embedded SQLite: nothing to create, the
    shipped config (no [ingest] storage keys), queries on the file read-only."""

    proc = None  # SQLite runs inside iot-ingest: its CPU is iot-ingest's

    def create_database(self, name: str) -> None:
        pass

    def ingest_toml(self, name: str) -> str:
        return ""

    def query(self, sql: str, database: str) -> list[tuple]:
        if not Path(database).exists():
            return [(0, 0)]
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return [(0, 0)]
            raise
        finally:
            db.close()




class Run:
    def __init__(self, args, work: Path, db: MariaDB, broker: str, mode: str, sender: str = "hmac", workers: int = 1):
        """`sender`: the keys the load signs/encrypts with, "hmac" (the keys file's secret, s1),
        or kinds joined by "+" ("ed25519", "ed25519+aes", ...), each made by `iotctl keys new`'s code."""
        self.args, self.work, self.db, self.broker, self.mode = args, work, db, broker, mode
        self.sender = sender
        self.workers = workers
        self.key_args: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix=f"{broker.replace(':', '-')}-{mode}-w{workers}-", dir=work))
        self.sqlite = args.backend == "sqlite"
        self.database = (str(self.dir / "var" / "db" / "ingest.db") if self.sqlite
                         else f"bench_{broker.replace(':', '_')}_{mode}_w{workers}")
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.cpu: dict[str, float] = {}

    # processes ---------------------------------------------------------------------------------

    def start_broker(self) -> subprocess.Popen:
        w = self.args.inflight
        if self.sqlite:
            return self.start_shipped_broker()
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
        self.procs.append(p)
        wait_for(lambda: port_open(self.port), 15, what="broker to listen")
        self.broker_proc = p
        return p

    def start_shipped_broker(self) -> subprocess.Popen:
        """SQLite runs: our broker with its shipped defaults; Mosquitto ("mosquitto:N") with
        persistence, no queue limit and max_inflight_messages N."""
        if self.broker == "ours":
            conf = self.dir / "broker.toml"
            conf.write_text(f'[paths]\nstate_dir = "{self.dir / "var"}"\n[broker]\nhost = "127.0.0.1"\n'
                            f"port = {self.port}\nsys_interval = 0\n")
            argv = [str(BIN / "iot-broker"), "--config", str(conf)]
        else:
            kind, _, window = self.broker.partition(":")
            assert kind == "mosquitto" and window.isdigit(), f"broker {self.broker!r}: ours or mosquitto:N"
            store = self.dir / "mosq"
            store.mkdir()
            if os.geteuid() == 0:  # Mosquitto started as root runs as user `mosquitto`
                os.chmod(self.dir, 0o711)
                shutil.chown(store, "mosquitto")
            conf = self.dir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                            f"persistence_location {store}/\nmax_queued_messages 0\nmax_inflight_messages {window}\n"
                            "log_dest stderr\nlog_type error\nlog_type warning\n")
            argv = [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)]
        p = subprocess.Popen(argv, stderr=open(self.dir / "broker.log", "ab"), start_new_session=True)
        self.procs.append(p)
        wait_for(lambda: port_open(self.port) or p.poll() is not None, 15, what="broker to listen")
        if p.poll() is not None:
            raise RuntimeError(f"broker exited: {(self.dir / 'broker.log').read_text()[-2000:]}")
        self.broker_proc = p
        return p

    def write_config(self) -> Path:
        keys = self.dir / "ingest.keys"
        lines = [f"bench {os.urandom(32).hex()}"]
        if self.sender != "hmac":
            for kind in self.sender.split("+"):
                sender_line, node_line = new_key(Kind(kind), f"bench-{kind}")
                write_sender_key(self.dir / f"{kind}.key", sender_line, Kind(kind))
                lines.append(node_line)
                self.key_args += ["--key", str(self.dir / f"{kind}.key")]
        keys.write_text("\n".join(lines) + "\n")
        os.chmod(keys, 0o600)
        cfg = self.dir / "iot.toml"
        cfg.write_text(
            f'[paths]\nstate_dir = "{self.dir / "var"}"\n[mqtt]\nport = {self.port}\nclient_id_prefix = "bench"\n'
            f'[ingest]\nkeys_file = "{keys}"\nworkers = {self.workers}\n'
            + ("" if self.sqlite else f"batch_size = {self.args.batch}\n")  # sqlite: shipped defaults
            + self.db.ingest_toml(self.database))
        self.config = cfg
        return cfg

    def start_worker(self, n: int, worker: int = 1) -> subprocess.Popen:
        log = self.dir / f"ingest-{n}.log"
        p = subprocess.Popen([str(BIN / "iot-ingest"), "--config", str(self.config), "--worker", str(worker)],
                             stderr=open(log, "ab"), start_new_session=True)
        self.procs.append(p)
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
        try:
            return self._go()
        finally:  # whatever happened, nothing this run started outlives it
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)

    def _go(self) -> dict:
        a = self.args
        self.db.create_database(self.database)
        self.write_config()
        broker = self.start_broker()
        worker = self.start_worker(1)
        workers = [worker] + [self.start_worker(i, i) for i in range(2, self.workers + 1)]
        run_id = f"{self.broker[:2]}{self.mode[:1]}{os.getpid() % 1000}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        db_cpu0 = cpu_seconds(self.db.proc.pid) if self.db.proc else 0.0
        self.load = load_average()
        if a.generator == "stress":
            gen = [str(BIN / "iotctl"), "stress", "--config", str(self.config)] + self.key_args
        else:  # same messages, raw sockets: see benchmarks/ingest_load.py
            gen = [sys.executable, str(ROOT / "benchmarks/ingest_load.py"), "--port", str(self.port)] + (
                self.key_args or ["--keys", str(self.dir / "ingest.keys")])
        load = subprocess.Popen(
            ([ "nice", "-n", str(a.nice_load)] if a.nice_load else [])
            + gen + ["--messages", str(a.messages), "--processes", str(a.processes), "--topic", TOPIC,
                     "--run-id", run_id, "--json", "--window", str(a.window), "--timeout", str(a.timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(load)
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
            workers.append(self.start_worker(self.workers + 1))
            restarted_at = time.time()
        out, err = load.communicate(timeout=a.timeout + 100)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if load.returncode != 0:
            raise RuntimeError(f"stress failed: {err}\n{out}")
        stress = json.loads(out)
        # Done when each publisher's last message is in the table (each stream lands in order),
        # then confirmed with one COUNT(*).
        per, extra = divmod(a.messages, a.processes)
        lasts = [f"{run_id}-{i}-{per + (1 if i < extra else 0) - 1}" for i in range(a.processes)]
        marks = ",".join(f"'{x}'" for x in lasts)
        try:
            wait_for(lambda: self.db.query(f"SELECT COUNT(*) FROM readings WHERE msg_id IN ({marks})",
                                           database=self.database)[0][0] == len(lasts), a.timeout, 0.25,
                     what="last messages")
            wait_for(lambda: self.db.query("SELECT COUNT(*) FROM readings", database=self.database)[0][0]
                     >= a.messages, min(600, a.timeout), 2.0, what="all rows")
        except TimeoutError as e:  # report what landed: the missing rows are the losses
            print(f"  {e}", flush=True)
        time.sleep(0.5)
        self.cpu = {
            # RUSAGE_CHILDREN also holds the killed worker (waited for above): not the load's.
            "stress": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                            - cpu_worker, 1),
            "broker": round(cpu_seconds(broker.pid), 1),
            "ingest": round(cpu_worker + sum(cpu_seconds(w.pid) for w in workers if w.poll() is None), 1),
            "mariadb": round(cpu_seconds(self.db.proc.pid) - db_cpu0, 1) if self.db.proc else 0.0,
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
        batches = q("SELECT COUNT(DISTINCT landed_at) FROM readings")[0][0]  # one landed_at per batch
        lat = sorted(x for x, in q("SELECT landed_at - ts FROM readings"))

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

        secs = last - first
        return {
            "broker": self.broker, "mode": self.mode, "workers": self.workers, "messages": self.args.messages,
            "processes": self.args.processes, "rows": rows, "rows_of_this_run": int(distinct_ok),
            "e2e_seconds": round(secs, 2), "e2e_msgs_per_s": round(rows / secs),
            "rows_per_batch": round(rows / max(1, batches)),
            "publish_msgs_per_s": round(stress["rate"]), "sent": stress["sent"], "acked": stress["acked"],
            "p50_ms": round(pct(0.50)), "p99_ms": round(pct(0.99)), "max_ms": round(lat[-1] * 1000),
            "killed_after_s": round(killed_at - first, 1) if killed_at else None,
            "restart_s": round(restarted_at - killed_at, 2) if killed_at else None,
            "cpu_s": self.cpu, "load": f"{self.load}/{load_average()}",
        }


def sink_rate(work: Path, batches: int, size: int = 1000) -> dict:
    """SqliteSink alone (the settings iot-ingest uses: WAL, synchronous=FULL, one upsert
    transaction per batch) writing `batches` batches of `size` stress-like rows into a fresh
    database in the same file system as the runs."""
    sink = SqliteSink(Path(tempfile.mkdtemp(prefix="sink-", dir=work)) / "ingest.db")
    sink.connect()
    now = time.time()
    data = [[(f"sink-{i % 4}-{b * size + i}", f"stress-{i % 4}-{i % 16}", now + i * 1e-4, TOPIC,
              orjson.dumps({"temp": 20.0 + i % 100 / 10, "seq": b * size + i}).decode(), "bench")
             for i in range(size)] for b in range(batches)]  # as worker.to_row makes them
    times = []
    try:
        for rows in data:
            t = time.perf_counter()
            assert sink.write(rows) == []
            times.append(time.perf_counter() - t)
    finally:
        sink.close()
    times.sort()
    return {"rows_per_s": batches * size / sum(times), "ms_per_commit": statistics.median(times) * 1000,
            "p90_ms": times[int(0.9 * len(times))] * 1000, "load": load_average()}


def render_sqlite(args, results: list[dict], sinks: list[dict]) -> str:
    def cell(vals: list[float], fmt: str) -> str:
        m = format(statistics.median(vals), fmt)
        return m if len(vals) == 1 else f"{m} ({format(min(vals), fmt)}-{format(max(vals), fmt)})"

    names = {"ours": "iot-broker (shipped defaults)"}
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["broker"], []).append(r)
    ours = statistics.median(r["e2e_msgs_per_s"] for r in by.get("ours", results))
    sink_rate_med = statistics.median(s["rows_per_s"] for s in sinks)
    lines = [
        "## Ingest on SQLite",
        "",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/ingest_bench.py --backend sqlite "
        f"--repeat {args.repeat} --write docs/BENCHMARKS.md`.",
        f"`iotctl stress --messages {args.messages} --processes {args.processes}` (1,000 unacknowledged per process)",
        "-> broker -> iot-ingest -> its embedded SQLite database (`<state_dir>/db/ingest.db`, WAL,",
        "`synchronous = FULL`), everything with its shipped defaults: iot-broker is given only host, port,",
        "state_dir and `sys_interval = 0` (so persistence on, and `max_inflight_per_client = {\"*-ingest\" = 5000}`),",
        "iot-ingest only its keys file, port and state_dir (batches of 1,000 rows or 200 ms). Mosquitto gets",
        "`persistence true` in a temp dir, `max_queued_messages 0` (no limit) and the `max_inflight_messages`",
        "shown, its defaults otherwise. Rows/s = rows in `readings` / (first publish to last row's `landed_at`);",
        "median of the runs (range in brackets); ratio = iot-broker's median / the row's.",
        "",
        "| broker | rows/s end to end | ratio | publish msgs/s | rows, lost per run | rows per commit | "
        "p50 / p99 latency | CPU s: load / broker / ingest | load (1 min) |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | --- | --- |",
    ]
    for b, runs in by.items():
        name = names.get(b, f"Mosquitto, max_inflight_messages {b.partition(':')[2]}")
        e2e = [r["e2e_msgs_per_s"] for r in runs]
        rows = " / ".join(f"{r['rows']:,}, {r['messages'] - r['rows_of_this_run']:,}" for r in runs)
        cpu = " ; ".join(f"{r['cpu_s']['stress']}/{r['cpu_s']['broker']}/{r['cpu_s']['ingest']}" for r in runs)
        lines.append(f"| {name} | {cell(e2e, ',.0f')} | {ours / statistics.median(e2e):.2f} | "
                     f"{cell([r['publish_msgs_per_s'] for r in runs], ',.0f')} | "
                     f"{rows} | {cell([r['rows_per_batch'] for r in runs], ',.0f')} | "
                     f"{cell([r['p50_ms'] / 1000 for r in runs], '.1f')} / {cell([r['p99_ms'] / 1000 for r in runs], '.1f')} s | "
                     f"{cpu} | {', '.join(r['load'] for r in runs)} |")
    lines += [
        "",
        "SQLite alone, for the database's share: `SqliteSink.write` (the sink iot-ingest uses, same settings)",
        f"committing {args.sink_batches} batches of 1,000 stress-like rows into a fresh database on the same file",
        "system, nothing else running in the process:",
        "",
        "| rows/s | ms per 1000-row commit (median) | p90 | load (1 min) |",
        "| ---: | ---: | ---: | --- |",
        f"| {cell([s['rows_per_s'] for s in sinks], ',.0f')} | {cell([s['ms_per_commit'] for s in sinks], '.1f')} | "
        f"{cell([s['p90_ms'] for s in sinks], '.1f')} | {', '.join(s['load'] for s in sinks)} |",
        "",
        f"At iot-broker's median of {ours:,.0f} rows/s end to end, SQLite's commits take about "
        f"{ours / sink_rate_med:.0%} of the wall time; the rest is the CPU of the load generator, the broker and",
        "iot-ingest on the two shared cores (the CPU column).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("mariadb", "sqlite"), default="mariadb")
    ap.add_argument("--messages", type=int, help="default 1,000,000 (mariadb), 50,000 (sqlite)")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--brokers", help="default ours,mosquitto (mariadb), ours,mosquitto:5000,mosquitto:20 (sqlite)")
    ap.add_argument("--modes", help="default plain,kill (mariadb), plain (sqlite)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each broker and mode, interleaved (default 1)")
    ap.add_argument("--inflight", type=int, default=5000,
                    help="mariadb: broker max_inflight_messages (default 5000)")
    ap.add_argument("--window", type=int, default=1000, help="unacked messages per publisher (default 1000)")
    ap.add_argument("--batch", type=int, default=1000, help="mariadb: iot-ingest batch_size (default 1000)")
    ap.add_argument("--flush-log", type=int, default=1, choices=(0, 1, 2),
                    help="innodb_flush_log_at_trx_commit (default 1: durable)")
    ap.add_argument("--nice-load", type=int, default=0, help="run the load generator at this nice level")
    ap.add_argument("--generator", choices=("stress", "raw"), default="stress",
                    help="load: `iotctl stress` (the seed's tool, paho) or benchmarks/ingest_load.py "
                         "(the same messages over raw sockets, lighter on the shared cores)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a run may take (default 1800)")
    ap.add_argument("--sink-batches", type=int, default=50, help="sqlite: batches for the sink alone (default 50)")
    ap.add_argument("--workers", default="1", help="iot-ingest worker counts to run, e.g. 1,2,3 (default 1)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--write", metavar="FILE", help="sqlite: replace the '## Ingest on SQLite' section of this file")
    args = ap.parse_args()
    sqlite = args.backend == "sqlite"
    args.messages = args.messages or (50_000 if sqlite else 1_000_000)
    args.brokers = args.brokers or ("ours,mosquitto:5000,mosquitto:20" if sqlite else "ours,mosquitto")
    args.modes = args.modes or ("plain" if sqlite else "plain,kill")

    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    db = SqliteDb() if sqlite else None
    if not sqlite:
        (work / "mariadb").mkdir()
        db = MariaDB(work / "mariadb", options=(f"--innodb-flush-log-at-trx-commit={args.flush_log}",
                                                "--innodb-buffer-pool-size=768M", "--innodb-log-file-size=512M"))
    results, sinks = [], []
    try:
        if not sqlite:
            db.start()
        for i in range(args.repeat):
            for broker in args.brokers.split(","):
                for mode, nw in [(m, int(w)) for m in args.modes.split(",") for w in args.workers.split(",")]:
                    t = time.monotonic()
                    print(f"== {broker} {mode} workers={nw}: {args.messages:,} messages from {args.processes} "
                          "processes", flush=True)
                    r = Run(args, work, db, broker, mode, workers=nw).go()
                    r["flush_log"] = args.flush_log
                    r["broker_inflight"] = args.inflight
                    results.append(r)
                    print(json.dumps(r), f"({time.monotonic() - t:.0f}s)", flush=True)
            if sqlite:
                sinks.append(sink_rate(work, args.sink_batches))
                print("sqlite sink alone:", json.dumps(sinks[-1]), flush=True)
    finally:
        if not sqlite:
            db.stop()
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("| broker | run | workers | msgs/s end to end | publish msgs/s | rows | p50 | p99 | CPU s (load/broker/ingest/db) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        c = r["cpu_s"]
        run = "plain" if r["mode"] == "plain" else f"kill -9 at {r['killed_after_s']}s"
        print(f"| {r['broker']} | {run} | {r['workers']} | {r['e2e_msgs_per_s']:,} | {r['publish_msgs_per_s']:,} | {r['rows']:,} | "
              f"{r['p50_ms']:,} ms | {r['p99_ms']:,} ms | {c['stress']}/{c['broker']}/{c['ingest']}/{c['mariadb']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results + sinks, indent=2) + "\n")
    if sqlite and args.workers == "1":
        section = render_sqlite(args, results, sinks)
        print(section)
        if args.write:
            write_section(Path(args.write), "Ingest on SQLite", section)
    ok = all(r["rows"] == args.messages == r["rows_of_this_run"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
