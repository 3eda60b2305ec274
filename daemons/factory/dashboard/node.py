"""The Node view's figures, read where the node's own tools read them: every daemon's state as
`iotctl status` has it (supervisord, else systemd), transfers as `iotctl transfers` (the
transfer daemons' status snapshots and journals), the ingest worker's counters from its status
file and the DLQ's size from its folder. ($SYS figures come over MQTT, in board.py.)

Blocking (an RPC, `systemctl`, file reads): the server runs `gather()` in a thread, every few
seconds and only while a page is open. One source failing leaves the others shown.
"""

from __future__ import annotations

import time

import orjson

from ...config import Config

STALE = 65.0  # seconds: the ingest worker rewrites its status file at least every 30 s while it runs


class Node:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._dlq = None
        self._last: tuple[float, int] | None = None  # (updated, landed + dlq) of the previous ingest reading
        self._rate: float | None = None

    def gather(self) -> dict:
        out = {}
        for key, fn in (("daemons", self.daemons), ("transfers", self.transfers), ("ingest", self.ingest)):
            try:
                out[key] = fn()
            except Exception as e:  # noqa: BLE001 - shown in its box; the view goes on with the rest
                out[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
        out["at"] = time.time()
        return out

    def daemons(self) -> dict:
        # Imported here, as are the transfer and ingest readers: a few MB that a dashboard
        # nobody has opened need not carry.
        from ... import supervise  # noqa: PLC0415

        rows = supervise.status_rows(self.cfg)
        if rows is None:
            return {"error": "neither supervisord nor systemd is running"}
        return {"rows": [{"name": n, "state": s, "detail": d, "ok": s in supervise.RUNNING} for n, s, d in rows]}

    def transfers(self) -> dict:
        from ...transfer.cli import gather  # noqa: PLC0415

        return gather(self.cfg, last=10)

    def ingest(self) -> dict:
        from ...ingest import dlq, worker  # noqa: PLC0415

        if self._dlq is None:
            self._dlq = dlq.Size(worker.dlq_path(self.cfg))
        entries, size = self._dlq.count()
        out: dict = {"dlq_entries": entries, "dlq_bytes": size}
        snaps = []
        for path in worker.status_paths(self.cfg):  # one per worker: shown as their sum
            try:
                snaps.append(orjson.loads(path.read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                pass
        snaps = [x for x in snaps if isinstance(x, dict) and isinstance(x.get("updated"), (int, float))]
        snap = None
        if snaps:
            snap = {"updated": max(x["updated"] for x in snaps),
                    "landed": sum(int(x.get("landed") or 0) for x in snaps),
                    "dlq": sum(int(x.get("dlq") or 0) for x in snaps),
                    "queue": sum(int(x.get("queue") or 0) for x in snaps),
                    "connected": all(x.get("connected") for x in snaps),
                    "outage": next((x["outage"] for x in snaps if x.get("outage")), None)}
        if snap is None:
            out["running"] = False
            return out
        updated = snap["updated"]
        count = int(snap.get("landed", 0)) + int(snap.get("dlq", 0))
        out.update(running=time.time() - updated < STALE, updated=updated, landed=snap.get("landed"),
                   rejected=snap.get("dlq"), queue=snap.get("queue"), connected=snap.get("connected"),
                   outage=snap.get("outage"))
        # The rate between two readings of its counters. The worker rewrites the file every
        # second while they move, so one unchanged for longer means nothing is coming in; a
        # restart (counters back to 0) starts over.
        last, rate = self._last, None
        if last and updated > last[0] and count >= last[1]:
            rate = (count - last[1]) / (updated - last[0])
        elif last and updated == last[0]:
            rate = self._rate if time.time() - updated < 2.5 else 0.0
        out["rate"] = self._rate = rate
        self._last = (updated, count)
        return out
