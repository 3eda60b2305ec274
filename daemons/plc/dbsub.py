"""iot-dbsub: PLC readings from MQTT into SQLite, each acknowledged only once its row is committed.

Theory of operation
===================

The ingest worker's shape, smaller: paho's thread puts each message into the client's inbox
(`mqttclient.Inbox`, the project's one manual-ack path); the main thread takes what waits (up to
`batch_size`), parses each message as a reading (reading.py), inserts the good ones in one
transaction (db.py), and only after the commit acknowledges them all, in order. A persistent
session (clean session 0, client id "<client_id_prefix>-dbsub") keeps the broker queueing while
we are down; a crash before the ack only means the broker sends those messages again, and the
table keeps one row per (device_id, seq).

A malformed message (not JSON, a field missing or of the wrong type, oversized) is logged with
its reason, counted, not stored, and acknowledged: sending it again would not mend it. A
database that cannot be written (disk full, I/O error, locked too long) is retried with backoff;
nothing is acknowledged meanwhile, so the broker's in-flight window fills and it stops sending.
"""

from __future__ import annotations

import sqlite3
import sys
import time

from .. import metrics, service
from ..metrics import Families
from ..mqttclient import Delivery, MqttClient, backoff
from ..service import Exit, Service
from . import db as dbmod
from .reading import Malformed, parse

NAME = "iot-dbsub"
SUBSCRIBE_WAIT = 5.0
LINES_PER_BATCH = 20  # above this, one summary line per batch instead of one per reading


class DbSub:
    def __init__(self, svc: Service, db: dbmod.Db):
        self.svc, self.log, self.db = svc, svc.log, db
        cfg = svc.config
        self.cfg = cfg.dbsub
        self.client_id = f"{cfg.mqtt.client_id_prefix}-dbsub"
        self.client = MqttClient(cfg.mqtt, self.client_id, log=self.log, clean_session=False, manual_ack=True,
                                 subscriptions=[(t, 1) for t in self.cfg.topics],
                                 inbox_limit=4 * self.cfg.batch_size)
        assert self.client.inbox is not None
        self.inbox = self.client.inbox
        self.stored = self.duplicates = 0
        self.rejected: dict[str, int] = {}
        self.outage: str | None = None

    def process(self, batch: list[Delivery]) -> bool:
        """Store one batch and acknowledge it; False if a stop came first (nothing acknowledged)."""
        good, msgs, bad = [], [], []
        for _, m in batch:
            try:
                topic = m.topic
            except UnicodeDecodeError:
                bad.append(("bad_topic", "topic is not UTF-8", m))
                continue
            try:
                good.append((parse(m.payload, self.cfg.max_payload), topic))
                msgs.append(m)
            except Malformed as e:
                bad.append((e.reason, str(e), m))
        new: list[bool] = []
        if good and not self._write(good, new):
            return False
        self.client.ack(batch)
        self.stored += sum(new)
        self.duplicates += len(new) - sum(new)
        self._log(good, msgs, new, bad)
        return True

    def _write(self, good, new: list[bool]) -> bool:
        attempt = 0
        while True:
            try:
                new[:] = self.db.insert(good, time.time())
            except sqlite3.Error as e:
                delay = backoff(attempt, self.cfg.retry_min, self.cfg.retry_max)
                attempt += 1
                self.outage = f"database not writable: {e}; retry {attempt} in {delay:.1f}s"
                self.log.warning("database not writable; holding the readings unacknowledged", error=str(e),
                                 retry_in=f"{delay:.1f}s", attempt=attempt, holding=len(good) + len(self.inbox))
                self.svc.set_status(self.outage)
                if not self.svc.wait(delay):
                    return False
                continue
            if attempt:
                self.log.info("database writable again", after_attempts=attempt)
                self.outage = None
            return True

    def _log(self, good, msgs, new: list[bool], bad) -> None:
        if len(good) <= LINES_PER_BATCH:
            for (r, topic), m, is_new in zip(good, msgs, new):
                self.log.info("reading stored; PUBACK sent after commit" if is_new else
                              "reading already stored (delivered again); PUBACK sent",
                              device=r.device_id, seq=r.seq, mid=m.mid, qos=m.qos, topic=topic)
        else:
            self.log.info("readings stored; PUBACKs sent after commit", count=sum(new), again=len(new) - sum(new),
                          stored_total=self.stored)
        # One line per reason per batch: a flood of bad messages cannot flood the journal.
        counts: dict[str, list] = {}
        for reason, detail, m in bad:
            counts.setdefault(reason, [0, detail, m])[0] += 1
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        for reason, (n, detail, m) in counts.items():
            self.log.warning("malformed reading not stored", reason=reason, count=n,
                             rejected_total=sum(self.rejected.values()), topic=m._topic.decode("utf-8", "replace"),
                             bytes=len(m.payload), detail=detail[:200])

    def families(self) -> Families:
        """The counters as Prometheus metrics (daemons/metrics.py), read from the scrape's thread."""
        out = Families()
        out.counter("iot_dbsub_readings_stored", "Readings committed as new rows.", self.stored)
        out.counter("iot_dbsub_readings_duplicate", "Readings delivered again and already stored.", self.duplicates)
        out.counter("iot_dbsub_readings_rejected", "Malformed readings not stored, by reason.", label="reason",
                    values=dict(self.rejected))
        out.gauge("iot_dbsub_unacked_messages", "Messages received and waiting to be stored.", len(self.inbox))
        out.gauge("iot_dbsub_broker_connected", "1 while connected to the broker.", self.client.connected)
        out.gauge("iot_dbsub_database_up", "0 while the database cannot be written.", self.outage is None)
        return out

    def summary(self) -> str:
        rejected = ",".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "0"
        line = (f"stored={self.stored} again={self.duplicates} rejected={rejected} queue={len(self.inbox)} "
                f"db={self.db.path}")
        if self.outage:
            return self.outage + "; " + line
        return line if self.client.connected else "broker not connected; " + line


def serve(svc: Service) -> None:
    path = dbmod.path_of(svc.config)
    try:
        db = dbmod.Db(path)
    except dbmod.SchemaTooNew as e:
        raise Exit(service.EX_DATAERR, str(e)) from None
    except (OSError, sqlite3.Error) as e:
        raise Exit(service.EX_CANTCREAT, f"cannot open the database {path}: {e}") from None
    sub = DbSub(svc, db)
    svc.status_fn = sub.summary
    sub.client.start()
    endpoint = metrics.serve(svc.log, sub.cfg.metrics, "[dbsub] metrics", sub.families)
    topics = ",".join(sub.cfg.topics)
    subscribed = sub.client.subscribed.wait(SUBSCRIBE_WAIT)
    svc.ready((f"subscribed to {topics}" if subscribed else "broker not reachable yet; retrying")
              + f" as {sub.client_id}; database {path}")
    try:
        while svc.wait(0):
            if not sub.inbox.wait(0.5):
                continue
            if not sub.process(sub.inbox.take(sub.cfg.batch_size)):
                break
    finally:
        svc.log.info("final " + sub.summary(), unacked_left=len(sub.inbox))
        if endpoint is not None:
            endpoint.close()
        sub.client.stop()
        db.close()


def main(argv=None) -> int:
    return service.run(
        NAME,
        "PLC readings from MQTT (QoS 1, persistent session) into SQLite, each acknowledged only after its "
        "row is committed; one row per (device_id, seq), so a reading delivered twice is stored once. "
        "Reads the [dbsub] and [mqtt] sections.",
        serve,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
