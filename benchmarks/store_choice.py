"""How should iot-broker persist its state: an append-only log with compaction, or SQLite in WAL
mode? This measures both on the broker's workload before we decide.

    python3 benchmarks/store_choice.py [--quick] [--dir DIR] [--write docs/BENCHMARKS.md]

Stdlib only. The workload is one persistent subscriber's queue: a message (64-byte payload,
19-byte topic, QoS 1) is stored as (session, seq, topic, qos, payload) when it arrives and
deleted when the subscriber acknowledges it. Writes are group-committed as the broker does: all
the writes of one event-loop pass form a batch made durable by one commit/fsync before the
publishers are acknowledged. The subscriber acknowledges one batch behind, so a batch is "insert
N new messages, delete the N of the previous batch" and the live set stays small.

Stores compared:

* log: records `<II` (body length, crc32 of body) + body, an insert record per message and a
  delete record per acknowledgement; one os.write of the whole batch, then os.fsync. When the
  log reaches 4x its live bytes it is compacted inside the timed loop (live records rewritten to
  a temp file, fsync, rename, fsync of the directory), so the steady-state figure carries the
  cost. Taken literally the 4x rule compacts every third batch when the live set is one batch,
  so a second variant also waits for a floor (`--compact-floor`, 4 MiB) before compacting.
* SQLite in WAL mode, table `queue` with PRIMARY KEY(session, seq), WITHOUT ROWID and with a
  rowid (then the key is a second b-tree); one transaction per batch (executemany DELETE of the
  previous batch, executemany INSERT, COMMIT). synchronous=FULL fsyncs the WAL at every commit;
  synchronous=NORMAL only at checkpoints, so it survives a process crash but NOT a power loss:
  it is reported, marked, and is not a candidate.

Then a backlog (subscriber away): 1,000,000 messages inserted in batches of 1000, none deleted,
written by a child process that exits without closing its store (as a crash would). Measured:
write time, size on disk, recovery at open (log: full replay checking every CRC and building
the in-memory index; SQLite: open + count(*), which runs WAL recovery), and read-back of the
whole backlog in order in pages of 1000 (log: sequential scan; SQLite: WHERE session=? AND
seq>? ORDER BY seq LIMIT 1000). "cold" means the store's files were evicted from the page
cache with posix_fadvise(DONTNEED) first (the host under a VM may still cache them); "warm"
means they were not.

Each steady-state case runs for `--duration` seconds after 3 untimed batches; variants are
interleaved per batch size so a change in machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from daemons.durable import fsync_dir  # noqa: E402

SESSION = 1
QOS = 1
PAYLOAD = bytes(range(64))
TOPICS = [f"sensors/{i:06d}/temp" for i in range(1000)]  # 19 bytes each
BATCH_SIZES = (1, 10, 100, 1000)
PAGE = 1000

# ---------------------------------------------------------------------------------------------
# The append-only log
# ---------------------------------------------------------------------------------------------

HEADER = struct.Struct("<II")  # body length, crc32(body)
INSERT = struct.Struct("<BIQBH")  # kind, session, seq, qos, topic length; then topic, payload
DELETE = struct.Struct("<BIQ")  # kind, session, seq (also the prefix of INSERT)
K_INSERT, K_DELETE = 1, 2
MAX_RECORD = (1 << 24) - 1  # a longer length field is corruption; also the packing width below


def encode_insert(session: int, seq: int, topic: str, qos: int, payload: bytes) -> bytes:
    t = topic.encode()
    body = INSERT.pack(K_INSERT, session, seq, qos, len(t)) + t + payload
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def encode_delete(session: int, seq: int) -> bytes:
    body = DELETE.pack(K_DELETE, session, seq)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def iter_records(fd: int, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Yield (offset, body) of every whole record with a good CRC, in file order, from the
    current position of fd. Stops at the first short or corrupt record: the torn tail of a write
    that never completed its fsync. The caller truncates the file there."""
    base, buf, eof = 0, b"", False
    while True:
        pos, n = 0, len(buf)
        while n - pos >= HEADER.size:
            length, crc = HEADER.unpack_from(buf, pos)
            if length < DELETE.size or length > MAX_RECORD:
                return
            end = pos + HEADER.size + length
            if end > n:
                break
            body = buf[pos + HEADER.size:end]
            if zlib.crc32(body) != crc:
                return
            yield base + pos, body
            pos = end
        if eof:
            return
        data = os.read(fd, chunk)
        eof = not data
        buf, base = buf[pos:] + data, base + pos


class LogStore:
    """The candidate log. Index: session -> {seq: offset << 24 | record length} of live inserts
    (one int per message, in append order)."""

    def __init__(self, path: Path, compact_floor: int = 0) -> None:
        self.path, self.compact_floor = path, compact_floor
        self.index: dict[int, dict[int, int]] = {}
        self.live_bytes = self.size = 0
        self.truncated = 0
        self.compactions: list[float] = []
        if path.exists():
            self._replay()
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            fsync_dir(path.parent)
        self._open_fds()

    def _open_fds(self) -> None:
        self.wfd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.rfd = os.open(self.path, os.O_RDONLY)

    def _replay(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        good_end = 0
        try:
            for off, body in iter_records(fd):
                kind, session, seq = DELETE.unpack_from(body)
                if kind == K_INSERT:
                    self.index.setdefault(session, {})[seq] = off << 24 | (HEADER.size + len(body))
                    self.live_bytes += HEADER.size + len(body)
                else:
                    packed = self.index.get(session, {}).pop(seq, None)
                    if packed is not None:
                        self.live_bytes -= packed & MAX_RECORD
                good_end = off + HEADER.size + len(body)
            file_size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if good_end < file_size:  # torn tail: cut it so the next append follows a whole record
            self.truncated = file_size - good_end
            os.truncate(self.path, good_end)
            fd = os.open(self.path, os.O_WRONLY)
            os.fsync(fd)
            os.close(fd)
        self.size = good_end

    def write(self, inserts: list[tuple], deletes: list[tuple[int, int]]) -> None:
        chunks, offsets, off = [], [], self.size
        for session, seq in deletes:
            if seq in self.index.get(session, ()):
                rec = encode_delete(session, seq)
                chunks.append(rec)
                off += len(rec)
        for m in inserts:
            rec = encode_insert(*m)
            chunks.append(rec)
            offsets.append(off << 24 | len(rec))
            off += len(rec)
        data = b"".join(chunks)
        if os.write(self.wfd, data) != len(data):
            raise OSError("short write to the log")
        os.fsync(self.wfd)
        self.size = off
        # Only now, durable, does the index change (a broker acknowledges at this point too).
        for session, seq in deletes:
            packed = self.index.get(session, {}).pop(seq, None)
            if packed is not None:
                self.live_bytes -= packed & MAX_RECORD
        for m, packed in zip(inserts, offsets):
            self.index.setdefault(m[0], {})[m[1]] = packed
            self.live_bytes += packed & MAX_RECORD
        if self.size >= 4 * self.live_bytes and self.size >= self.compact_floor:
            self.compact()

    def compact(self) -> None:
        t0 = time.perf_counter()
        tmp = self.path.with_name(self.path.name + ".compact")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        live = sorted((packed, session, seq) for session, seqs in self.index.items()
                      for seq, packed in seqs.items())
        new_index: dict[int, dict[int, int]] = {}
        out, pos, pending = [], 0, 0
        for packed, session, seq in live:
            length = packed & MAX_RECORD
            out.append(os.pread(self.rfd, length, packed >> 24))
            new_index.setdefault(session, {})[seq] = pos << 24 | length
            pos += length
            pending += length
            if pending >= 1 << 20:
                os.write(fd, b"".join(out))
                out, pending = [], 0
        os.write(fd, b"".join(out))
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, self.path)
        fsync_dir(self.path.parent)
        os.close(self.wfd)
        os.close(self.rfd)
        self._open_fds()
        self.index, self.size = new_index, pos
        self.compactions.append(time.perf_counter() - t0)

    def pages(self, session: int, page: int = PAGE) -> Iterator[list[tuple]]:
        """The live messages of a session in order, `page` at a time: one sequential scan."""
        live = self.index.get(session, {})
        fd = os.open(self.path, os.O_RDONLY)
        try:
            out: list[tuple] = []
            for _, body in iter_records(fd):
                if body[0] != K_INSERT:
                    continue
                _, s, seq, qos, tlen = INSERT.unpack_from(body)
                if s != session or seq not in live:
                    continue
                end = INSERT.size + tlen
                out.append((seq, body[INSERT.size:end].decode(), qos, body[end:]))
                if len(out) == page:
                    yield out
                    out = []
            if out:
                yield out
        finally:
            os.close(fd)

    def count(self) -> int:
        return sum(len(s) for s in self.index.values())

    def files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        os.close(self.wfd)
        os.close(self.rfd)


# ---------------------------------------------------------------------------------------------
# SQLite in WAL mode
# ---------------------------------------------------------------------------------------------


class SqliteStore:
    def __init__(self, path: Path, synchronous: str = "FULL", without_rowid: bool = True) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"journal_mode is {mode}, not wal")
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self.db.execute("CREATE TABLE IF NOT EXISTS queue(session INTEGER, seq INTEGER, topic TEXT,"
                        " qos INTEGER, payload BLOB, PRIMARY KEY(session, seq))"
                        + (" WITHOUT ROWID" if without_rowid else ""))

    def write(self, inserts: list[tuple], deletes: list[tuple[int, int]]) -> None:
        db = self.db
        db.execute("BEGIN")
        if deletes:
            db.executemany("DELETE FROM queue WHERE session=? AND seq=?", deletes)
        db.executemany("INSERT INTO queue(session, seq, topic, qos, payload) VALUES (?,?,?,?,?)",
                       inserts)
        db.execute("COMMIT")

    def pages(self, session: int, page: int = PAGE) -> Iterator[list[tuple]]:
        last = -1
        while True:
            rows = self.db.execute("SELECT seq, topic, qos, payload FROM queue WHERE session=?"
                                   " AND seq>? ORDER BY seq LIMIT ?", (session, last, page)).fetchall()
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM queue").fetchone()[0]

    def files(self) -> list[Path]:
        return [self.path.with_name(self.path.name + s) for s in ("", "-wal", "-shm")]

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------------------------------------
# Variants, helpers
# ---------------------------------------------------------------------------------------------

Factory = Callable[[Path], "LogStore | SqliteStore"]


def variants(floor: int) -> list[tuple[str, Factory]]:
    return [
        ("log, compact at 4x live", lambda d: LogStore(d / "queue.log", 0)),
        (f"log, compact at 4x live and >= {floor >> 20} MiB", lambda d: LogStore(d / "queue.log", floor)),
        ("SQLite WAL FULL, WITHOUT ROWID", lambda d: SqliteStore(d / "queue.db", "FULL", True)),
        ("SQLite WAL FULL, rowid", lambda d: SqliteStore(d / "queue.db", "FULL", False)),
        ("SQLite WAL NORMAL, WITHOUT ROWID (*)", lambda d: SqliteStore(d / "queue.db", "NORMAL", True)),
        ("SQLite WAL NORMAL, rowid (*)", lambda d: SqliteStore(d / "queue.db", "NORMAL", False)),
    ]


def messages(start: int, n: int) -> list[tuple]:
    return [(SESSION, seq, TOPICS[seq % 1000], QOS, PAYLOAD) for seq in range(start, start + n)]


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (clean pages only: write them back first)."""
    for p in paths:
        if p.exists():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def in_child(fn: Callable[[], dict]) -> dict:
    """Run fn in a forked child that leaves with os._exit, never closing its store: the state on
    disk is what a crashed broker leaves (SQLite keeps its -wal and -shm)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = json.dumps(fn()).encode()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported by the parent
            out, code = json.dumps({"error": repr(e)}).encode(), 1
        os.write(w, out)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    if "error" in result:
        raise RuntimeError(f"child failed: {result['error']}")
    return result


def filesystem(path: Path) -> tuple[str, str, str, str]:
    """Device, mount point, type and options of the filesystem holding path (longest match)."""
    real, best = os.path.realpath(path), ("?", "/", "?", "?")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        dev, mnt, fstype, opts = line.split()[:4]
        mnt = mnt.replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype, opts)
    return best


def describe_fs(path: Path) -> str:
    dev, mnt, fstype, opts = filesystem(path)
    return f"{dev} mounted on {mnt}, {fstype} ({opts})"




def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def steady(factory: Factory, workdir: Path, batch: int, duration: float) -> dict:
    d = Path(tempfile.mkdtemp(dir=workdir))
    store = factory(d)
    seq, prev, lat = 0, [], []
    for _ in range(3):  # untimed: file creation, first pages, statement cache
        cur = messages(seq, batch)
        store.write(cur, [(SESSION, m[1]) for m in prev])
        seq, prev = seq + batch, cur
    compactions_before = len(getattr(store, "compactions", []))
    sent, t_start = 0, time.perf_counter()
    while True:
        cur = messages(seq, batch)
        t0 = time.perf_counter()
        store.write(cur, [(SESSION, m[1]) for m in prev])
        lat.append(time.perf_counter() - t0)
        seq, prev, sent = seq + batch, cur, sent + batch
        elapsed = time.perf_counter() - t_start
        if elapsed >= duration and len(lat) >= 10:
            break
    comp = getattr(store, "compactions", [])[compactions_before:]
    store.close()
    shutil.rmtree(d)
    return {"rate": sent / elapsed, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "batches": len(lat),
            "compactions": len(comp), "compact_s": sum(comp), "elapsed": elapsed}


def backlog(factory: Factory, workdir: Path, n: int) -> dict:
    d = Path(tempfile.mkdtemp(dir=workdir))

    def write() -> dict:
        store = factory(d)
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            store.write(messages(start, min(1000, n - start)), [])
        return {"write": time.perf_counter() - t0, "files": [str(p) for p in store.files()]}

    res = in_child(write)
    files = [Path(p) for p in res["files"]]
    res["disk"] = sum(p.stat().st_blocks * 512 for p in files if p.exists())
    res["size"] = sum(p.stat().st_size for p in files if p.exists())

    def recover() -> dict:
        t0 = time.perf_counter()
        store = factory(d)
        count = store.count()
        return {"t": time.perf_counter() - t0, "count": count, "truncated": getattr(store, "truncated", 0)}

    warm = in_child(recover)
    evict(files)
    cold = in_child(recover)
    if warm["count"] != n or cold["count"] != n:
        raise RuntimeError(f"recovered {warm['count']}/{cold['count']} of {n} messages")

    def read_back() -> dict:
        store = factory(d)
        out = {}
        for label in ("cold", "warm"):
            if label == "cold":
                evict(files)
            t0, got, last = time.perf_counter(), 0, -1
            for page in store.pages(SESSION):
                if page[0][0] != last + 1 or len(page[-1][3]) != len(PAYLOAD):
                    raise RuntimeError(f"read-back out of order at seq {page[0][0]}")
                got, last = got + len(page), page[-1][0]
            out[label] = time.perf_counter() - t0
            if got != n:
                raise RuntimeError(f"read back {got} of {n} messages")
        return out

    rb = in_child(read_back)
    shutil.rmtree(d)
    return {"write": res["write"], "disk": res["disk"], "size": res["size"],
            "recover_warm": warm["t"], "recover_cold": cold["t"],
            "read_cold": rb["cold"], "read_warm": rb["warm"]}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, where: str, st: dict, bl: dict, load: tuple) -> str:
    names = list(st)
    lines = ["## Store choice: append-only log vs SQLite WAL", "",
             f"Machine: {machine()}; SQLite {sqlite3.sqlite_version}. Load average {load[0]:.2f} at start, {load[1]:.2f} at end.",
             where,
             (f"Run: {'--quick, ' if args.quick else ''}{args.duration:g} s per steady-state case, "
             f"backlog of {args.backlog:,} messages."), "",
             ("### Steady state: messages/s (each message inserted, then deleted one batch later), "
             "durable at every batch"), "",
             "| store | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |",
             "|---|" + "---:|" * len(BATCH_SIZES)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{st[name][b]['rate']:,.0f}" for b in BATCH_SIZES) + " |")
    lines += ["", ("(*) synchronous=NORMAL in WAL mode does not fsync at commit: survives a process "
              "crash, loses the last commits on power loss. Not durable; shown for scale."), "",
              "### Commit latency per batch (what a publisher waits for its PUBACK): p50 / p99 ms", "",
              "| store | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |",
              "|---|" + "---:|" * len(BATCH_SIZES)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{st[name][b]['p50'] * 1e3:.2f} / {st[name][b]['p99'] * 1e3:.2f}" for b in BATCH_SIZES) + " |")
    lines += ["", "### Log compactions inside the timed steady state: count, share of the time", "",
              "| store | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |",
              "|---|" + "---:|" * len(BATCH_SIZES)]
    for name in names:
        if name.startswith("log"):
            lines.append(f"| {name} | " + " | ".join(
                f"{st[name][b]['compactions']} ({100 * st[name][b]['compact_s'] / st[name][b]['elapsed']:.0f}%)"
                for b in BATCH_SIZES) + " |")
    lines += ["", (f"### Backlog: {args.backlog:,} messages in batches of 1000, none deleted "
              "(writer exits without closing, as in a crash)"), "",
              ("| store | write s | msgs/s | on disk MB | recovery cold s | recovery warm s "
              "| read-back cold s | read-back warm s |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in bl.items():
        lines.append(f"| {name} | {r['write']:.2f} | {args.backlog / r['write']:,.0f} | {r['disk'] / 1e6:.1f} | "
                     f"{r['recover_cold']:.2f} | {r['recover_warm']:.2f} | {r['read_cold']:.2f} | "
                     f"{r['read_warm']:.2f} |")
    lines += ["", ("Recovery: log = replay checking every CRC, building the index; SQLite = open + "
              "count(*) (WAL recovery included). Read-back in pages of 1000 in seq order. Cold = "
              "files evicted with posix_fadvise(DONTNEED) first."), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: 0.3 s per case, backlog of 100,000")
    ap.add_argument("--dir", type=Path, default=ROOT.parent / "tmp-storebench",
                    help="scratch directory, on the disk the broker will use (not a tmpfs /tmp); "
                         "default: tmp-storebench beside the checkout; removed afterwards")
    ap.add_argument("--duration", type=float, help="seconds per steady-state case (default 2, quick 0.3)")
    ap.add_argument("--backlog", type=int, help="backlog messages (default 1,000,000, quick 100,000)")
    ap.add_argument("--compact-floor", type=int, default=4 << 20,
                    help="log size below which the second log variant never compacts (default 4 MiB)")
    ap.add_argument("--write", type=Path, help="also replace this section of a markdown file")
    args = ap.parse_args()
    args.duration = args.duration or (0.3 if args.quick else 2.0)
    args.backlog = args.backlog or (100_000 if args.quick else 1_000_000)

    created = not args.dir.exists()
    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=args.dir))
    if filesystem(workdir)[2] in ("tmpfs", "ramfs"):
        print(f"warning: {workdir} is on {filesystem(workdir)[2]}: fsync costs nothing there", file=sys.stderr)
    where = f"Measured in {args.dir}: {describe_fs(workdir)}. /tmp is on {describe_fs(Path('/tmp'))}."
    load0 = os.getloadavg()[0]
    t_all = time.perf_counter()
    try:
        vs = variants(args.compact_floor)
        st: dict[str, dict[int, dict]] = {name: {} for name, _ in vs}
        for b in BATCH_SIZES:  # interleaved: a change in load hits every variant alike
            for name, factory in vs:
                st[name][b] = steady(factory, workdir, b, args.duration)
                print(f"  steady {name}, batch {b}: {st[name][b]['rate']:,.0f} msg/s", file=sys.stderr)
        bl = {}
        for name, factory in [vs[1], vs[2], vs[3]]:
            label = "log" if name.startswith("log") else name
            bl[label] = backlog(factory, workdir, args.backlog)
            print(f"  backlog {label}: write {bl[label]['write']:.2f} s", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if created:
            shutil.rmtree(args.dir, ignore_errors=True)
    text = report(args, where, st, bl, (load0, os.getloadavg()[0]))
    print(text)
    print(f"(total {time.perf_counter() - t_all:.0f} s)", file=sys.stderr)
    if args.write:
        sys.path.insert(0, str(ROOT))
        from benchmarks.common import write_section
        write_section(args.write, "Store choice: append-only log vs SQLite WAL", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
