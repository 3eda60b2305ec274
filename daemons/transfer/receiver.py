"""iot-transfer-recv: receive files sent over MQTT into the spool (var/transfer).

Theory of operation
===================

Per incoming file, under `<spool>/.partial/`: `<id>.meta` (the manifest as received),
`<id>.data` (allocated to its full size up front, chunks written at their offset with
pwrite, in any order) and `<id>.idx` (the indexes of the chunks known to be on disk).
Chunks are checked against the manifest's sha256 before they are written; a bad one is
not marked received, so the next status asks for it again (C5). A chunk already received
is ignored (C7); position decides where bytes go, never arrival order (C6).

Durability without an fsync per chunk: every `sync_bytes` (and at least every second) the
data file is fdatasynced, *then* the indexes written since are appended to `<id>.idx` and
fsynced. So an index on disk always has its bytes on disk; a crash loses at most the last
batch, which the status after the restart lists as missing again (C1). The status may
mention chunks not yet synced: the sender treats a chunk that later shows up missing again
as lost and sends it again.

The whole-file sha256 is computed as the contiguous prefix grows (chunks arriving in order
are hashed from memory, others are read back once the gap before them fills), so a file
is not read twice in the common case. Once every chunk is there and the hash matches: fsync,
a `complete` record (name chosen) in `done.jsonl`, a hard link into the spool (link never
replaces an existing file: a taken name gets a " (n)" suffix), unlink of the partial, fsync
of both folders, and only then the ack. When the broker confirms the ack (PUBACK) an
`acked` record follows. At start, a complete record without its acked record is finished
(link/unlink if the crash fell in between), its file's hash checked again, and acked (C8).
A meta, chunk or retry for a finished file is answered with its ack again (C9).

The receiver publishes a status per unfinished file: at once when a gap or a bad chunk
shows, every few chunks written (this is what paces the sender, C10), and every
`status_interval` otherwise, less often while nothing arrives (C4). With a format whose
senders resend every chunk listed as missing at once (seed-json), a status lists only the
gaps below the highest chunk received while chunks keep arriving, and the chunks above it
too once nothing has arrived for two status intervals (a lost tail, a sender restarted).

Messages are read and written through `codec` (protocol.py or seedjson.py, from `[transfer]
wire`); the files under .partial are in protocol.py's format whatever the wire.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import time
from pathlib import Path

import orjson

from .. import metrics, service
from ..config import TransferConfig
from ..metrics import Families
from ..mqttclient import MqttClient
from . import codec
from . import protocol as P
from ..durable import atomic_write, fsync_dir
from .journal import IndexLog, Journal, name_candidates
from .spool import Partial, link_into, safe_name

STATUS_EVERY = 8  # chunks written between two progress statuses, at most
SYNC_INTERVAL = 1.0
HASH_BUDGET = 16  # chunks read back per tick to extend a running file hash
VERIFY_BUDGET = 32 * 1024 * 1024  # bytes per tick checked of a file completed before a restart
KEEP_DONE = 1000  # finished transfers remembered, to answer a late meta with the ack again
MAX_BAD = 5  # copies of one chunk failing their hash before the file is refused


class Receiver:
    def __init__(self, cfg: TransferConfig, spool: Path, publish, log, clock=time.monotonic):
        self.cfg, self.spool, self.publish, self.log, self.clock = cfg, spool, publish, log, clock
        self.codec = codec(cfg.wire)
        self.work = spool / ".partial"
        self.work.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.work / "done.jsonl")
        self.partials: dict[str, Partial] = {}
        self.done: dict[str, dict] = {}
        self.acking: dict[str, object] = {}  # file id -> paho MQTTMessageInfo of its ack
        self.to_ack: list[str] = []  # verified at start, ack to publish
        self.verifying: dict[str, list] = {}  # file id -> [fd, sha256 so far, offset], at start
        self.answered: dict[str, float] = {}  # ids lately answered with "unknown"/refused/ack again
        self.files_done = 0
        self.bytes_done = 0
        # Since start, over all files (Prometheus, daemons/metrics.py).
        self.chunks = self.chunk_bytes = self.chunks_duplicate = self.chunks_bad = self.files_refused = 0

    # paths -------------------------------------------------------------------------------------

    def _p(self, file_id: str, ext: str) -> Path:
        return self.work / f"{file_id}.{ext}"

    # start -------------------------------------------------------------------------------------

    def recover(self) -> None:
        for rec in self.journal.load():
            fid = rec.get("id")
            if not isinstance(fid, str) or not self.codec.valid_id(fid):
                continue
            if rec.get("ev") == "complete":
                self.done[fid] = {**rec, "acked": False}
            elif rec.get("ev") == "acked" and fid in self.done:
                self.done[fid]["acked"] = True
            elif rec.get("ev") == "failed":  # named, but the link into the spool failed
                self.done.pop(fid, None)
        keep = list(self.done.values())[-KEEP_DONE:]
        self.done = {r["id"]: r for r in keep}
        self.journal.rewrite([{k: v for k, v in r.items() if k != "acked"} for r in keep]
                             + [{"ev": "acked", "id": r["id"]} for r in keep if r["acked"]])
        for fid, rec in list(self.done.items()):
            if not rec["acked"]:
                self._recover_complete(fid, rec)
        for meta in sorted(self.work.glob("*.meta")):
            self._recover_partial(meta.stem)
        for data in self.work.glob("*.data"):
            if data.stem not in self.partials:
                data.unlink(missing_ok=True)  # allocated, but its meta was never written
        for idx in self.work.glob("*.idx"):
            if idx.stem not in self.partials:
                idx.unlink(missing_ok=True)

    def _recover_complete(self, fid: str, rec: dict) -> None:
        data, final = self._p(fid, "data"), self.spool / rec["name"]
        try:
            if data.exists():
                if final.exists() and os.path.samefile(data, final):
                    data.unlink()
                elif final.exists():
                    self._place(fid, data, rec)  # the name was taken meanwhile: pick another
                    final = self.spool / self.done[fid]["name"]
                else:
                    link_into(data, final)
                fsync_dir(self.spool)
                fsync_dir(self.work)
            for ext in ("meta", "idx"):
                self._p(fid, ext).unlink(missing_ok=True)
            # Its hash is checked again before the ack, a slice per tick: a big file must not
            # hold READY or the watchdog.
            self.verifying[fid] = [os.open(final, os.O_RDONLY), hashlib.sha256(), 0]
        except FileNotFoundError:
            # Verified before it was named, and taken from the spool since: it was delivered.
            self.log.info("completed file not acknowledged before the restart, already taken from the spool; "
                          "acking now", id=fid, name=rec.get("name"))
            self.to_ack.append(fid)
        except OSError as e:
            self.log.error("completed file missing or unreadable; it will be received again", id=fid,
                           name=rec.get("name"), error=str(e))
            del self.done[fid]

    def _verify_some(self, budget: int) -> None:
        for fid, v in list(self.verifying.items()):
            fd, h, offset = v
            while budget > 0:
                block = os.pread(fd, min(budget, 1024 * 1024), offset)
                if not block:
                    break
                h.update(block)
                offset += len(block)
                budget -= len(block)
            v[2] = offset
            if budget > 0:  # read to the end
                os.close(fd)
                del self.verifying[fid]
                rec = self.done[fid]
                if h.hexdigest() == rec["sha256"] and offset == rec["size"]:
                    self.log.info("completed file not acknowledged before the restart; acking now", id=fid,
                                  name=rec["name"])
                    self.to_ack.append(fid)
                else:
                    self.log.error("completed file changed since; it will be received again", id=fid,
                                   name=rec["name"])
                    del self.done[fid]

    def _recover_partial(self, fid: str) -> None:
        if not self.codec.valid_id(fid) or fid in self.done:
            for ext in ("meta", "idx", "data"):
                self._p(fid, ext).unlink(missing_ok=True)
            return
        try:
            m = P.decode_meta(self._p(fid, "meta").read_bytes(), fid)
            assert isinstance(m, P.Manifest)
            fd = os.open(self._p(fid, "data"), os.O_RDWR)
        except (OSError, P.BadMessage, AssertionError) as e:
            self.log.warning("dropping an unreadable partial transfer", id=fid, error=str(e))
            self._remove_files(fid)
            return
        idx = IndexLog(self._p(fid, "idx"))
        p = Partial(m, fd, idx, idx.load(), self.clock())
        try:  # idle since its files last changed, not since this start (partial_ttl)
            changed = max(f.stat().st_mtime for f in (self._p(fid, "meta"), self._p(fid, "idx")) if f.exists())
            p.last_activity -= max(0.0, time.time() - changed)
        except (OSError, ValueError):
            pass
        self.partials[fid] = p
        self.log.info("resuming transfer", id=fid, name=m.name, received=p.count, chunks=m.chunks)

    # messages ----------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, prefix: str) -> None:
        try:
            fid, kind = self.codec.parse_topic(prefix, topic)
            if kind == "meta":
                self._on_meta(fid, self.codec.decode_meta(payload, fid))
            elif kind in ("chunk", "retry"):
                self._on_chunk(fid, payload, kind == "retry")
        except P.BadMessage as e:
            self.log.warning("bad message dropped", topic=topic[:200], error=str(e))
        except Exception as e:  # one message must never take the daemon down
            self.log.error("message dropped: handling it failed", exc_info=e, topic=topic[:200])

    def _answer_once(self, key: str, period: float = 1.0) -> bool:
        """Rate-limit replies to one id so a flood of chunks cannot make a flood of replies."""
        now = self.clock()
        if now - self.answered.get(key, -1e9) < period:
            return False
        if len(self.answered) > 4096:
            self.answered.clear()
        self.answered[key] = now
        return True

    def _on_meta(self, fid: str, m: P.Manifest | P.Cancel) -> None:
        if isinstance(m, P.Cancel):
            p = self.partials.pop(fid, None)
            if p is not None:
                p.close()
                self._remove_files(fid)
                self.log.info("transfer cancelled by the sender", id=fid, name=p.m.name, reason=m.reason)
            return
        p = self.partials.get(fid)
        if p is not None:
            p.status_due = self.clock()  # a re-announcement: answer with what we have
            return
        if fid in self.done:
            if fid not in self.verifying and self._answer_once("ack:" + fid, 0.5):
                self._send_ack(fid)
            return
        why = self._refusal(m)
        if why:
            self._refuse(fid, m.name, why)
            return
        try:
            p = self._create(m)
        except OSError as e:
            self._remove_files(fid)
            self._refuse(fid, m.name, self._os_reason(e, m.size))
            return
        self.partials[fid] = p
        self.log.debug("transfer started", id=fid, name=m.name, size=m.size, chunks=m.chunks)
        if m.chunks == 0:
            self._complete(p)

    def _refusal(self, m: P.Manifest) -> str:
        limit = self.cfg.max_file_size
        if limit and m.size > limit:
            return f"file too large: {m.size} bytes, max_file_size is {limit}"
        st = os.statvfs(self.work)
        free = st.f_bavail * st.f_frsize
        if free - m.size < self.cfg.min_free:
            return f"not enough disk space: {m.size} bytes needed, {free} free, min_free is {self.cfg.min_free}"
        return ""

    @staticmethod
    def _os_reason(e: OSError, size: int) -> str:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: no space for {size} bytes"
        return f"cannot write: {e.strerror or e}"

    def _refuse(self, fid: str, name: str, why: str) -> None:
        if self._answer_once("refused:" + fid, 1.0):
            self.files_refused += 1
            self.log.warning("transfer refused", id=fid, name=name, reason=why)
            self.publish(P.topic(self.cfg.topic_prefix, fid, "status"),
                         self.codec.encode_status(P.Status(fid, P.REFUSED, reason=why)))

    def _create(self, m: P.Manifest) -> Partial:
        fd = os.open(self._p(m.file_id, "data"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if m.size:
                try:
                    os.posix_fallocate(fd, 0, m.size)  # reserve the space now: no ENOSPC mid-way
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    os.ftruncate(fd, m.size)
            atomic_write(self._p(m.file_id, "meta"), P.encode_meta(m))
        except BaseException:
            os.close(fd)
            raise
        return Partial(m, fd, IndexLog(self._p(m.file_id, "idx")), [], self.clock())

    def _on_chunk(self, fid: str, payload: bytes, retry: bool) -> None:
        p = self.partials.get(fid)
        if p is None:
            if fid in self.done:
                if fid not in self.verifying and self._answer_once("ack:" + fid, 0.5):
                    self._send_ack(fid)
            elif self._answer_once("unknown:" + fid, 1.0):
                self.publish(P.topic(self.cfg.topic_prefix, fid, "status"),
                             self.codec.encode_status(P.Status(fid, P.UNKNOWN)))
            return
        c = self.codec.decode_chunk(payload, fid)
        m, i, now = p.m, c.index, self.clock()
        p.last_activity = now
        if not 0 <= i < m.chunks:
            raise P.BadMessage(f"chunk index {i} outside 0..{m.chunks - 1}")
        if p.received[i]:
            p.duplicates += 1
            self.chunks_duplicate += 1
            return
        data = c.data
        if len(data) != m.chunk_len(i) or hashlib.sha256(data).digest() != m.chunk_digest(i):
            p.bad[i] = p.bad.get(i, 0) + 1
            self.chunks_bad += 1
            p.high = max(p.high, i + 1)  # it did arrive: the sender may resend it without waiting
            p.status_due = now
            self.log.warning("chunk failed its hash; asking for it again", id=fid, index=i, copies=p.bad[i])
            if p.bad[i] >= MAX_BAD:
                self._drop(p, f"chunk {i} failed its hash {MAX_BAD} times: the sender's file changed?")
            return
        if i > p.high:
            p.status_due = now  # a gap: say so now
        try:
            p.write(i, data, retry)
        except OSError as e:
            self._drop(p, self._os_reason(e, m.size))
            return
        self.chunks += 1
        self.chunk_bytes += len(data)
        if p.count == m.chunks:
            self._complete(p)
        elif p.since_status >= STATUS_EVERY:
            self._send_status(p)
        elif p.status_due is None:
            p.status_due = now + 0.05  # soon, but let a burst of chunks share one status

    # periodic ----------------------------------------------------------------------------------

    def tick(self, idle: bool, connected: bool) -> float:
        """Statuses, syncs, hash catch-up, ack confirmations. `idle`: the inbox is empty."""
        now = self.clock()
        wait = 1.0
        if self.verifying:
            self._verify_some(VERIFY_BUDGET)
            wait = 0.0
        if connected and self.to_ack:
            for fid in self.to_ack:
                if fid in self.done:
                    self._send_ack(fid)
            self.to_ack.clear()
        for fid, info in list(self.acking.items()):
            if info.is_published():
                del self.acking[fid]
                if fid in self.done and not self.done[fid]["acked"]:
                    self.journal.append({"ev": "acked", "id": fid})
                    self.done[fid]["acked"] = True
        for p in list(self.partials.values()):
            if p.unsynced and (p.unsynced_bytes >= self.cfg.sync_bytes or now - p.last_sync >= SYNC_INTERVAL):
                self._sync(p)
            if p.fd < 0:
                continue
            if p.hash_pos < p.next:
                p.extend_hash(HASH_BUDGET)
            quiet = now - p.last_activity
            interval = min(max(self.cfg.status_interval, quiet / 4), max(self.cfg.status_interval, 30.0))
            due = p.last_status + interval
            if p.status_due is not None:
                due = min(due, p.status_due)
            if now >= due and (idle or p.status_due is not None):
                self._send_status(p)
                due = now + interval
            wait = min(wait, max(0.01, due - now))
            if self.cfg.partial_ttl and quiet > self.cfg.partial_ttl:
                self._drop(p, "idle for longer than partial_ttl", tell=False)
        return wait

    def _send_status(self, p: Partial) -> None:
        p.status_due = None
        p.since_status = 0
        p.last_status = now = self.clock()
        tail = not self.codec.LISTED_IS_RESENT or now - p.last_activity >= 2 * self.cfg.status_interval
        self.publish(P.topic(self.cfg.topic_prefix, p.m.file_id, "status"), self.codec.encode_status(p.status(tail)))

    def _sync(self, p: Partial) -> None:
        try:
            p.sync(self.clock())
        except OSError as e:
            self._drop(p, self._os_reason(e, p.m.size))

    # the end of a transfer ---------------------------------------------------------------------

    def _complete(self, p: Partial) -> None:
        m, fid = p.m, p.m.file_id
        try:
            p.extend_hash(None)
            if p.hasher.hexdigest() != m.sha256:
                self._recheck(p)
                return
            if m.mtime:
                os.utime(p.fd, (m.mtime, m.mtime))
            os.fsync(p.fd)
            p.close()
            rec = {"ev": "complete", "id": fid, "name": "", "size": m.size, "sha256": m.sha256,
                   "t": round(time.time(), 3)}
            self._place(fid, self._p(fid, "data"), rec)
            fsync_dir(self.spool)
            fsync_dir(self.work)
        except OSError as e:
            if self.done.pop(fid, None) is not None:
                try:  # the complete record must not make a restart believe it was delivered
                    self.journal.append({"ev": "failed", "id": fid})
                except OSError:
                    pass
            self._drop(p, self._os_reason(e, m.size))
            return
        del self.partials[fid]
        for ext in ("meta", "idx"):
            self._p(fid, ext).unlink(missing_ok=True)
        self._send_ack(fid)
        took = max(self.clock() - p.started, 1e-6)
        fresh = (p.count - p.start_count) * m.chunk_size
        self.files_done += 1
        self.bytes_done += m.size
        self.log.info("received", name=self.done[fid]["name"], size=m.size, duration=f"{took:.2f}s",
                      mbps=f"{min(fresh, m.size) / took / 1e6:.1f}", retries=p.retries,
                      duplicates=p.duplicates, bad=sum(p.bad.values()), id=fid)

    def _recheck(self, p: Partial) -> None:
        """The whole-file hash failed although every chunk passed: find chunks that do not
        match on disk and ask for them again; if none, the manifest contradicts itself."""
        bad = p.unmark_damaged()
        if not bad:
            self._drop(p, "file sha256 does not match the manifest")
            return
        self.log.warning("chunks damaged on disk; asking for them again", id=p.m.file_id, chunks=bad)
        p.status_due = self.clock()

    def _place(self, fid: str, data: Path, rec: dict) -> None:
        """Journal the chosen name, then link the data there (never replacing a file)."""
        for name in name_candidates(safe_name(self._manifest_name(fid, rec), f"file-{fid[:8]}")):
            final = self.spool / name
            if final.exists() or final.is_symlink():
                continue
            rec = {**rec, "name": name}
            self.journal.append({k: v for k, v in rec.items() if k != "acked"})
            self.done[fid] = {**rec, "acked": False}
            try:
                link_into(data, final)
            except FileExistsError:
                continue
            return
        raise OSError(errno.EEXIST, "no free name")

    def _manifest_name(self, fid: str, rec: dict) -> str:
        p = self.partials.get(fid)
        return p.m.name if p is not None else rec.get("name") or ""

    def _send_ack(self, fid: str) -> None:
        r = self.done[fid]
        ack = P.Ack(fid, r["name"], r["size"], r["sha256"], r.get("t", time.time()))
        self.acking[fid] = self.publish(P.topic(self.cfg.topic_prefix, fid, "ack"), self.codec.encode_ack(ack))

    def _drop(self, p: Partial, why: str, tell: bool = True) -> None:
        fid = p.m.file_id
        p.close()
        self.partials.pop(fid, None)
        self._remove_files(fid)
        if tell:
            self._refuse(fid, p.m.name, why)
        else:
            self.log.info("partial transfer removed", id=fid, name=p.m.name, reason=why)

    def _remove_files(self, fid: str) -> None:
        for ext in ("meta", "idx", "data"):
            self._p(fid, ext).unlink(missing_ok=True)

    # reporting ---------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        now = self.clock()
        return {"updated": time.time(), "receiving": [
            {"id": p.m.file_id, "name": p.m.name, "size": p.m.size, "received": min(p.m.size, p.count * p.m.chunk_size),
             "seconds": round(now - p.started, 1)} for p in self.partials.values()],
            "done": self.files_done}

    def families(self) -> Families:
        """The counters as Prometheus metrics (daemons/metrics.py), read from the scrape's thread."""
        out = Families()
        out.counter("iot_transfer_recv_files", "Files received whole, verified and in the spool.", self.files_done)
        out.counter("iot_transfer_recv_file_bytes", "Bytes of those files.", self.bytes_done)
        out.counter("iot_transfer_recv_files_refused", "Transfers refused or given up (too large, disk full, "
                    "bad chunks...).", self.files_refused)
        out.counter("iot_transfer_recv_chunks", "New chunks written.", self.chunks)
        out.counter("iot_transfer_recv_chunk_bytes", "Bytes of those chunks.", self.chunk_bytes)
        out.counter("iot_transfer_recv_chunks_duplicate", "Chunks received again and ignored.",
                    self.chunks_duplicate)
        out.counter("iot_transfer_recv_chunks_bad", "Chunks that failed their hash (asked for again).",
                    self.chunks_bad)
        out.gauge("iot_transfer_recv_files_in_progress", "Partial files being received.", len(self.partials))
        return out

    def summary(self) -> str:
        if not self.partials:
            return f"idle; {self.files_done} received ({self.bytes_done / 1e6:.1f} MB)"
        now = self.clock()
        size = sum(p.m.size for p in self.partials.values()) or 1
        got = sum(min(p.m.size, p.count * p.m.chunk_size) for p in self.partials.values())
        rate = sum((p.count - p.start_count) * p.m.chunk_size / max(now - p.started, 1e-3)
                   for p in self.partials.values())
        return (f"receiving {len(self.partials)} file(s): {100 * got / size:.0f}% of {size / 1e6:.1f} MB at "
                f"{rate / 1e6:.1f} MB/s; {self.files_done} received")

    def close(self) -> None:
        for fd, _, _ in self.verifying.values():
            os.close(fd)
        for p in self.partials.values():
            if p.unsynced:
                self._sync(p)
            p.close()
        self.journal.close()


# --- the daemon ---------------------------------------------------------------------------------


def serve(svc: service.Service) -> None:
    cfg = svc.config.transfer
    spool = cfg.spool or svc.config.paths.state_dir / "transfer"
    try:
        rx = Receiver(cfg, spool, None, svc.log)
    except OSError as e:
        raise service.Exit(service.EX_CANTCREAT, f"cannot use the spool {spool}: {e.strerror}") from None
    prefix = cfg.topic_prefix
    client = MqttClient(svc.config.mqtt, f"{svc.config.mqtt.client_id_prefix}-transfer-recv", log=svc.log,
                        clean_session=False, manual_ack=True,
                        subscriptions=[(P.subscription(prefix, k), 1) for k in ("meta", "chunk", "retry")])
    inbox = client.inbox
    assert inbox is not None
    rx.publish = lambda topic, payload: client.publish(topic, payload, 1)
    rx.recover()
    client.start()
    svc.status_fn = rx.summary
    # Beside iot-transfer-send, from the same [transfer] section: the port + 1.
    endpoint = metrics.serve(svc.log, cfg.metrics, "[transfer] metrics", rx.families, index=1)
    svc.ready(f"spool {spool}; broker {client.host}:{client.port}")
    snap_at, last_status, last_snap = 0.0, "", {}
    try:
        while svc.wait(0):
            inbox.wait(min(rx.tick(len(inbox) == 0, client.connected), 0.2))
            batch = inbox.take(64)
            for _, m in batch:
                rx.handle(m.topic, m.payload, prefix)
            client.ack(batch)  # after it is written: the broker's window paces us
            if time.monotonic() - snap_at >= 1.0:
                snap_at = time.monotonic()
                snap = rx.snapshot()
                if snap["receiving"] or snap["done"] != last_snap.get("done"):
                    atomic_write(rx.work / "status.json", orjson.dumps(snap), durable=False)  # for iotctl
                last_snap = snap
                status = rx.summary()
                if status != last_status:  # progress as it happens, not only every STATUS_INTERVAL
                    svc.set_status(status)
                    last_status = status
    finally:
        if endpoint is not None:
            endpoint.close()
        rx.close()
        client.stop()


def main(argv=None) -> int:
    return service.run("iot-transfer-recv", "Receive files sent over MQTT into the spool ([transfer] section).",
                       serve, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
