"""iot-transfer-send: send every complete file that lands in the outbox, over MQTT.

Theory of operation
===================

A file becomes a candidate when it is closed after writing or renamed into the outbox
(inotify, through watchdog); names ending in .part/.tmp/~ and dot-files are not. A candidate
is sent once it has stayed unchanged (size, mtime) for `settle_time`, so a writer that
closes and reopens to append is waited for. Files already there at start are candidates.

Up to `max_parallel` files are sent at once. For each, a background thread hashes the file
chunk by chunk (the manifest: whole-file and per-chunk sha256); then, in this order, the
manifest is written to `<state>/transfer-send/<id>.meta` (temp, fsync, rename), a `start`
record is appended to the journal (fsync), and the engine (engine.py) announces and streams.
When the receiver's ack comes: a `done` record naming where the file goes (fsync), then the
move to `sent/` (or the delete), then one log line. A `kill -9` at any point is recovered at
start: unfinished `start` records resume under the same file id (C2, C9); a `done` record
whose file is still in the outbox finishes its move without a second completion. So the
journal holds exactly one `done` per file, whatever happened.

A file that changes while it is sent is cancelled (the receiver drops its partial) and sent
again once it settles. A refusal by the receiver (too large, no space) ends the transfer:
the file moves to `failed/` and the reason is logged.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import orjson

from .. import metrics, service
from ..config import TransferConfig
from ..metrics import Families
from ..mqttclient import MqttClient
from . import codec
from . import protocol as P
from .engine import Engine, Outgoing
from ..durable import atomic_write
from .journal import Journal, unique_path

IGNORED_SUFFIXES = (".part", ".tmp", ".partial", "~", ".swp")
KEEP_FINISHED = 500
RESCAN_INTERVAL = 60.0


def eligible(name: str) -> bool:
    return bool(name) and not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def file_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def content_type(name: str) -> str:
    import mimetypes  # noqa: PLC0415

    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def open_and_hash(path: Path, file_id: str, chunk_size: int, name: str | None = None) -> Outgoing:
    """Open `path` and build its manifest, reading one chunk at a time (flat memory)."""
    import hashlib  # noqa: PLC0415

    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if P.chunk_count(st.st_size, chunk_size) > P.MAX_CHUNKS:
            raise OSError(f"{path} has more than {P.MAX_CHUNKS} chunks: use a larger chunk_size")
        whole, digests, offset = hashlib.sha256(), bytearray(), 0
        while offset < st.st_size:
            want = min(chunk_size, st.st_size - offset)
            data = os.pread(fd, want, offset)
            if len(data) != want:
                raise OSError(f"{path} shrank while being hashed")
            whole.update(data)
            digests += hashlib.sha256(data).digest()
            offset += want
        if (os.fstat(fd).st_size, os.fstat(fd).st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise OSError(f"{path} changed while being hashed")
        name = name or path.name
        m = P.Manifest(file_id, name, st.st_size, chunk_size, whole.hexdigest(), bytes(digests), content_type(name),
                       st.st_mtime_ns / 1e9)
    except BaseException:
        os.close(fd)
        raise
    return Outgoing(m, path, fd, (st.st_size, st.st_mtime_ns), time.monotonic())


class Sender:
    def __init__(self, cfg: TransferConfig, state_dir: Path, log, publish, wake=lambda: None):
        self.cfg, self.log, self.wake = cfg, log, wake
        self.outbox = cfg.outbox or state_dir / "outbox"
        self.sent_dir, self.failed_dir = self.outbox / "sent", self.outbox / "failed"
        self.home = state_dir / "transfer-send"
        for d in (self.outbox, self.sent_dir, self.failed_dir, self.home):
            d.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.home / "journal.jsonl")
        self.engine = Engine(cfg.topic_prefix, publish, window=cfg.window, rate_limit=cfg.rate_limit,
                             resend_after=cfg.resend_after, stall_timeout=cfg.stall_timeout, log=log,
                             codec=codec(cfg.wire))
        self.candidates: dict[Path, tuple[float, tuple]] = {}  # path -> (check at, key seen)
        self.waiting: dict[Path, tuple] = {}  # settled, in arrival order -> key
        self.hashing: dict[Path, tuple[Future, str, tuple]] = {}
        self.active: dict[Path, tuple[Outgoing, tuple]] = {}  # path -> (transfer, file key)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="hash")
        self.files_done = self.bytes_done = self.files_failed = 0
        self.next_scan = time.monotonic() + RESCAN_INTERVAL

    # start -------------------------------------------------------------------------------------

    def recover(self) -> None:
        starts: dict[str, dict] = {}
        ends: dict[str, dict] = {}
        for r in self.journal.load():
            fid = r.get("id")
            if r.get("ev") == "start":
                starts[fid] = r
            elif r.get("ev") in ("done", "failed", "cancelled") and fid in starts:
                ends[fid] = r
        finished = [fid for fid in starts if fid in ends][-KEEP_FINISHED:]
        unfinished = [fid for fid in starts if fid not in ends]
        self.journal.rewrite([x for fid in finished for x in (starts[fid], ends[fid])]
                             + [starts[fid] for fid in unfinished])
        for fid in finished:
            s, e = starts[fid], ends[fid]
            if "to" in e:  # crashed between the journal and the move: finish it, quietly
                self._dispose(Path(s["path"]), tuple(s["key"]), e["to"])
        for fid in unfinished:
            self._resume(starts[fid])

    def _resume(self, s: dict) -> None:
        path, fid = Path(s["path"]), s["id"]
        try:
            key = file_key(os.stat(path))
            if list(key) != s["key"]:
                raise FileNotFoundError("changed since")
            m = P.decode_meta((self.home / f"{fid}.meta").read_bytes(), fid)
            assert isinstance(m, P.Manifest)
            fd = os.open(path, os.O_RDONLY)
        except (OSError, P.BadMessage, AssertionError) as e:
            self.log.warning("cannot resume a transfer; cancelled", id=fid, name=s.get("name"), error=str(e))
            self.engine.send_cancel(fid, "gone")
            self.journal.append({"ev": "cancelled", "id": fid, "t": time.time(), "reason": str(e)})
            (self.home / f"{fid}.meta").unlink(missing_ok=True)
            return
        t = Outgoing(m, path, fd, (key[2], key[3]), time.monotonic(), resumed=True)
        self.active[path] = (t, key)
        self.engine.add(t)
        self.log.info("resuming transfer", id=fid, name=m.name, size=m.size)

    def scan(self, min_age: float = 0.0) -> None:
        """Files in the outbox become candidates: all of them at start; later, in case an event
        was missed, those unchanged for `min_age` (a writer is not that slow)."""
        try:
            entries = list(os.scandir(self.outbox))
        except OSError as e:
            self.log.error("cannot read the outbox", path=str(self.outbox), error=e.strerror)
            return
        now = time.time()
        for e in entries:
            try:
                old = now - e.stat().st_mtime >= min_age
            except OSError:
                continue
            if old and e.is_file() and eligible(e.name):
                self.touch(Path(e.path))

    # outbox events -----------------------------------------------------------------------------

    def touch(self, path: Path, modified: bool = False) -> None:
        """`path` was closed after writing or renamed in: it is complete once it stays as it is
        for settle_time. A mere modification only restarts the wait of a known candidate: a
        file still open for writing is never sent."""
        if path.parent != self.outbox or not eligible(path.name):
            return
        if modified and path not in self.candidates:
            return
        try:
            key = file_key(os.stat(path))
        except OSError:
            self.candidates.pop(path, None)
            return
        if self._tracked_key(path) == key:
            return
        self.candidates[path] = (time.monotonic() + self.cfg.settle_time, key)

    def _tracked_key(self, path: Path) -> tuple | None:
        """The key of the version of `path` already being sent, hashed or queued."""
        if path in self.active:
            return self.active[path][1]
        if path in self.hashing:
            return self.hashing[path][2]
        return self.waiting.get(path)

    def _settle(self, now: float) -> float:
        wait = 1.0
        for path, (due, key) in list(self.candidates.items()):
            if now < due:
                wait = min(wait, due - now)
                continue
            try:
                st = os.stat(path)
            except OSError:
                del self.candidates[path]
                continue
            if file_key(st) != key:
                self.candidates[path] = (now + self.cfg.settle_time, file_key(st))
                wait = min(wait, self.cfg.settle_time)
                continue
            del self.candidates[path]
            if self._tracked_key(path) == key:
                continue
            if path in self.active:  # a new version of a file being sent: start over
                self.engine.cancel(self.active[path][0], "changed: replaced in the outbox")
            self.waiting.pop(path, None)
            self.waiting[path] = key
        return wait

    # the loop's work ---------------------------------------------------------------------------

    def step(self) -> float:
        now = time.monotonic()
        wait = self._settle(now)
        if now >= self.next_scan:
            self.next_scan = now + RESCAN_INTERVAL
            self.scan(min_age=RESCAN_INTERVAL)
        self._collect_hashed()
        while len(self.active) + len(self.hashing) < self.cfg.max_parallel:
            path = next((p for p in self.waiting if p not in self.hashing and p not in self.active), None)
            if path is None:
                break
            key = self.waiting.pop(path)
            fid = secrets.token_hex(16)
            fut = self.pool.submit(open_and_hash, path, fid, self.cfg.chunk_size)
            fut.add_done_callback(lambda _f: self.wake())
            self.hashing[path] = (fut, fid, key)
        wait = min(wait, self.engine.pump())
        self._collect_ended()
        return wait

    def _collect_hashed(self) -> None:
        for path, (fut, fid, key) in list(self.hashing.items()):
            if not fut.done():
                continue
            del self.hashing[path]
            try:
                t = fut.result()
            except OSError as e:
                self.log.warning("cannot read a file in the outbox; will try again when it changes",
                                 path=str(path), error=str(e))
                continue
            key = file_key(os.fstat(t.fd))
            if path in self.waiting:
                t.close()  # it changed while being hashed: the newer version is queued
                continue
            m = t.manifest
            atomic_write(self.home / f"{fid}.meta", P.encode_meta(m))  # protocol.py's JSON whatever the wire
            self.journal.append({"ev": "start", "id": fid, "path": str(path), "name": m.name, "size": m.size,
                                 "key": list(key), "chunk_size": m.chunk_size, "t": round(time.time(), 3)})
            self.active[path] = (t, key)
            self.engine.add(t)
            self.log.debug("sending", id=fid, name=m.name, size=m.size, chunks=m.chunks)

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            fid, kind = self.engine.codec.parse_topic(self.cfg.topic_prefix, topic)
            self.engine.on_message(fid, kind, payload)
        except P.BadMessage as e:
            self.log.warning("bad message dropped", topic=topic[:200], error=str(e))
        except Exception as e:  # one message must never take the daemon down
            self.log.error("message dropped: handling it failed", exc_info=e, topic=topic[:200])
        self._collect_ended()

    def _collect_ended(self) -> None:
        while self.engine.ended:
            t = self.engine.ended.pop(0)
            entry = self.active.pop(t.path, None)
            key = entry[1] if entry else None
            fid, m = t.file_id, t.manifest
            now = time.time()
            if t.state == "done":
                to = "" if self.cfg.after_send == "delete" else str(unique_path(self.sent_dir, t.path.name))
                took = max(time.monotonic() - t.started, 1e-6)
                rec = {"ev": "done", "id": fid, "t": round(now, 3), "to": to, "seconds": round(took, 3),
                       "retries": t.retries, "stored_as": t.ack.name if t.ack else ""}
                self.journal.append(rec)  # the one completion record of this file
                self._dispose(t.path, key, to)
                self.files_done += 1
                self.bytes_done += m.size
                self.log.info("sent", name=m.name, size=m.size, duration=f"{took:.2f}s",
                              mbps=f"{m.size / took / 1e6:.1f}", retries=t.retries, id=fid,
                              stored_as=rec["stored_as"])
            elif t.reason.startswith("changed"):
                self.journal.append({"ev": "cancelled", "id": fid, "t": round(now, 3), "reason": t.reason})
                if t.path.exists():
                    self.touch(t.path)
            else:
                to = str(unique_path(self.failed_dir, t.path.name))
                self.journal.append({"ev": "failed", "id": fid, "t": round(now, 3), "to": to, "reason": t.reason})
                self._dispose(t.path, key, to)
                self.files_failed += 1
                self.log.error("transfer failed; file moved to failed/", name=m.name, size=m.size, id=fid,
                               reason=t.reason)
            (self.home / f"{fid}.meta").unlink(missing_ok=True)

    def _dispose(self, src: Path, key: tuple | None, to: str) -> None:
        """Move (or delete, when `to` is empty) the file the transfer read, unless what is at
        that path now is another file."""
        try:
            st = os.stat(src)
            if key is not None and file_key(st) != tuple(key):
                return  # not the file that was sent (replaced, or a reused inode)
            if not to:
                src.unlink()
            else:
                dest = Path(to)
                if dest.exists():
                    dest = unique_path(dest.parent, dest.name)
                os.rename(src, dest)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log.error("cannot move a sent file out of the outbox", path=str(src), error=e.strerror)

    # reporting ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        now = time.monotonic()
        return {
            "updated": time.time(),
            "sending": [{"id": t.file_id, "name": t.manifest.name, "size": t.manifest.size,
                         "confirmed": t.progress(), "sent": t.bytes_sent, "retries": t.retries,
                         "seconds": round(now - t.started, 1)} for t, _ in self.active.values()],
            "hashing": [p.name for p in self.hashing],
            "waiting": [p.name for p in self.waiting],
            "done": self.files_done,
        }

    def families(self) -> Families:
        """The counters as Prometheus metrics (daemons/metrics.py), read from the scrape's thread."""
        e, out = self.engine, Families()
        out.counter("iot_transfer_send_files", "Files sent and acknowledged by the receiver.", self.files_done)
        out.counter("iot_transfer_send_file_bytes", "Bytes of the files sent and acknowledged.", self.bytes_done)
        out.counter("iot_transfer_send_files_failed", "Files refused by the receiver, moved to failed/.",
                    self.files_failed)
        out.counter("iot_transfer_send_chunks", "Chunk messages published, first sends and resends.", e.chunks_sent)
        out.counter("iot_transfer_send_chunk_bytes", "File bytes in those chunks.", e.chunk_bytes_sent)
        out.counter("iot_transfer_send_chunks_resent", "Chunks sent again (lost, or asked for again).",
                    e.chunks_resent)
        out.gauge("iot_transfer_send_files_in_progress", "Files being sent now.", len(self.active))
        out.gauge("iot_transfer_send_files_waiting", "Files in the outbox waiting their turn or being hashed.",
                  len(self.waiting) + len(self.hashing))
        return out

    def summary(self) -> str:
        busy = [t for t, _ in self.active.values()]
        queued = len(self.waiting) + len(self.hashing)
        if not busy:
            return f"idle; {queued} waiting; {self.files_done} sent ({self.bytes_done / 1e6:.1f} MB)"
        size = sum(t.manifest.size for t in busy) or 1
        done = sum(t.progress() for t in busy)
        rate = sum(t.progress() / max(time.monotonic() - t.started, 1e-3) for t in busy)
        return (f"sending {len(busy)} file(s): {100 * done / size:.0f}% of {size / 1e6:.1f} MB at "
                f"{rate / 1e6:.1f} MB/s; {queued} waiting; {self.files_done} sent")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for t, _ in self.active.values():
            t.close()
        self.journal.close()


# --- watching the outbox ------------------------------------------------------------------------


def watch(outbox: Path, post: Callable[[tuple[str, str]], None]):
    """Start a watchdog observer that posts ("fs", path) when a file in the outbox
    is closed after writing or renamed in, ("mod", path) when it is written. Returns it."""
    from watchdog.events import FileSystemEventHandler  # noqa: PLC0415

    class Handler(FileSystemEventHandler):
        def on_closed(self, event):
            post(("fs", event.src_path))

        def on_moved(self, event):
            if event.dest_path:
                post(("fs", event.dest_path))

        def on_modified(self, event):
            if not event.is_directory:
                post(("mod", event.src_path))

    try:
        from watchdog.observers.inotify import InotifyObserver  # noqa: PLC0415

        # Full events: a file renamed in from outside the folder is a move, not a creation.
        observer = InotifyObserver(generate_full_events=True)
    except (ImportError, OSError):
        from watchdog.observers import Observer  # noqa: PLC0415

        observer = Observer()

        class Handler(Handler):  # noqa: F811 - no close events here: a new file settles instead
            def on_created(self, event):
                if not event.is_directory:
                    post(("fs", event.src_path))

    observer.schedule(Handler(), str(outbox), recursive=False)
    observer.daemon = True
    observer.start()
    return observer


# --- the daemon ---------------------------------------------------------------------------------


def serve(svc: service.Service) -> None:
    cfg = svc.config.transfer
    mq = svc.config.mqtt
    client = MqttClient(mq, f"{mq.client_id_prefix}-transfer-send", log=svc.log, clean_session=False,
                        manual_ack=True,
                        subscriptions=[(P.subscription(cfg.topic_prefix, k), 1) for k in ("status", "ack")],
                        max_inflight=max(20, cfg.window * cfg.max_parallel + 8))
    inbox = client.inbox
    assert inbox is not None
    # The outbox watcher's events and the hashing threads' wake-ups; the MQTT messages are in
    # the client's inbox, whose wait() both end.
    events: queue.SimpleQueue = queue.SimpleQueue()

    def post(item) -> None:
        events.put(item)
        inbox.wake()

    try:
        tx = Sender(cfg, svc.config.paths.state_dir, svc.log,
                    lambda topic, payload: client.publish(topic, payload, 1), wake=lambda: post(("wake", None)))
    except OSError as e:
        raise service.Exit(service.EX_CANTCREAT, f"cannot create the outbox or state folders: {e}") from None
    tx.recover()
    try:
        observer = watch(tx.outbox, post)
    except OSError as e:
        raise service.Exit(service.EX_OSERR, f"cannot watch {tx.outbox}: {e}") from None
    tx.scan()
    client.start()
    svc.status_fn = tx.summary
    endpoint = metrics.serve(svc.log, cfg.metrics, "[transfer] metrics", tx.families)
    svc.ready(f"watching {tx.outbox}; broker {client.host}:{client.port}")
    snap_at, last_status, last_snap = 0.0, "", {}
    try:
        while svc.wait(0):
            inbox.wait(min(max(tx.step(), 0.0), 0.2))
            for _ in range(256):
                try:
                    kind, value = events.get_nowait()
                except queue.Empty:
                    break
                if kind in ("fs", "mod"):
                    tx.touch(Path(os.fsdecode(value)), modified=kind == "mod")
            batch = inbox.take(256)
            for _, m in batch:
                tx.on_message(m.topic, m.payload)
            client.ack(batch)  # after the journal has what they imply
            if time.monotonic() - snap_at >= 1.0:
                snap_at = time.monotonic()
                snap = tx.snapshot()
                if snap["sending"] or snap["waiting"] or snap["hashing"] or snap["done"] != last_snap.get("done"):
                    atomic_write(tx.home / "status.json", orjson.dumps(snap), durable=False)  # for iotctl
                last_snap = snap
                status = tx.summary()
                if status != last_status:  # progress as it happens, not only every STATUS_INTERVAL
                    svc.set_status(status)
                    last_status = status
    finally:
        # watchdog 7 logs an error when its reader thread wakes during stop(): harmless, hide it.
        logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
        observer.stop()
        if endpoint is not None:
            endpoint.close()
        tx.close()
        client.stop()


def main(argv=None) -> int:
    return service.run("iot-transfer-send", "Send every complete file of the outbox over MQTT ([transfer] section).",
                       serve, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
