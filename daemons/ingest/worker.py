"""iot-ingest: signed and/or encrypted QoS 1 readings from MQTT into SQLite or MySQL/MariaDB,
acknowledged only once they are committed.

Theory of operation
===================

Two threads. paho's network thread puts each message into the client's inbox
(`mqttclient.Inbox`, the project's one manual-ack path): no other work there. The main
thread is the daemon's loop (`while svc.wait(0)`), one batch per pass:

1. collect up to `batch_size` messages: at once if that many wait, else until the first has
   waited `batch_wait` or nothing new came for `batch_idle` (the broker's in-flight window is
   full, or traffic paused);
2. verify and validate each (signing.py: one HMAC, Ed25519 or RSA check and/or one AES-GCM
   decryption with key objects made at start, one orjson parse, a few type checks) into a
   row, or into a DLQ item with its reason and the payload as received;
3. DLQ items: appended and fsynced (dlq.py);
4. rows: one upsert + commit (sinks.py); rows the database refuses become DLQ items, fsynced;
5. only now acknowledge the batch, in arrival order (`MqttClient.ack`: QoS 0 messages are
   never acknowledged, and messages of an older connection are left for the broker to send
   again).

A crash anywhere before 5 loses nothing: the broker still holds the messages for our
persistent session and sends them again; the upsert keyed by message id makes the second
landing a no-op, and a second DLQ entry for a redelivered bad message is harmless.

Retained messages come again on every SUBSCRIBE, so on every reconnect and restart. A bad
retained message is written to the DLQ once: the DLQ knows the retained entries it holds
(`Writer.holds_retained`), and one already there is not written again.

Several workers (`[ingest] workers`, `iot-ingest --worker I`): each is this same process with
its own client id, "<client_id_prefix>-ingest-<I>", a persistent session and a shared
subscription `$share/<share_group>/<topic>`, so the broker gives each message to one worker
and, when one dies, gives what it had not acknowledged to another. Rows stay exactly-once by
the upsert alone. Each worker has its own DLQ segments (names carry "w<I>" and the pid) in the
one DLQ folder, and its own status file. SQLite has one write lock: workers take turns
(WAL, `sqlite_busy_timeout`), and a batch that still finds it busy (the sink raises Busy) is
written again after a short backoff, unacknowledged until committed.

A database outage (the sink raises Unavailable) is not a DLQ case: the loop keeps the same
batch, retries with exponential backoff and says so in STATUS=. Nothing is acknowledged, so
the broker stops sending once its in-flight window is full; `max_unacked` is our own bound
behind it (past it the inbox blocks paho's thread until the batch lands).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import orjson

from .. import metrics, service
from ..config import Config, ConfigError
from ..durable import atomic_write
from ..metrics import Families
from ..mqttclient import Delivery, MqttClient, backoff, paho_version
from ..service import Exit, Service
from . import dlq as dlqmod
from .signing import KeysError, Reason, Rejected, Verifier, kind_of, load_keys
from .sinks import MAX_TOPIC, Busy, Row, SchemaTooNew, Sink, Unavailable, open_sink

NAME = "iot-ingest"
SUBSCRIBE_WAIT = 5.0
GC_THRESHOLD = 50_000
SNAPSHOT_IDLE = 30.0


def keys_path(cfg: Config) -> Path:
    if cfg.ingest.keys_file is not None:
        return cfg.ingest.keys_file
    if cfg.source is not None:
        return cfg.source.resolve().parent / "ingest.keys"
    return Path("/etc/iot/ingest.keys")


def dlq_path(cfg: Config) -> Path:
    return cfg.ingest.dlq_dir or cfg.paths.state_dir / "dlq"


def status_path(cfg: Config, worker: int = 1) -> Path:
    """The worker's counters as JSON, refreshed while it runs (for the dashboard's Node view):
    status.json for a single worker, status-<I>.json for each of several."""
    name = "status.json" if cfg.ingest.workers == 1 else f"status-{worker}.json"
    return cfg.paths.state_dir / "ingest" / name


def status_paths(cfg: Config) -> list[Path]:
    return [status_path(cfg, i) for i in range(1, cfg.ingest.workers + 1)]


def client_id(cfg: Config, worker: int) -> str:
    prefix = cfg.mqtt.client_id_prefix
    return f"{prefix}-ingest" if cfg.ingest.workers == 1 else f"{prefix}-ingest-{worker}"


def subscriptions(cfg: Config) -> list[str]:
    ic = cfg.ingest
    return list(ic.topics) if ic.workers == 1 else [f"$share/{ic.share_group}/{t}" for t in ic.topics]


def worker_number(svc: Service) -> int:
    """This process's worker number, 1..[ingest] workers (`--worker`, default 1). The number a
    per-worker resource (client id, status file, DLQ segment names, a port) is keyed by."""
    n, workers = svc.args.worker, svc.config.ingest.workers
    if not 1 <= n <= workers:
        raise Exit(service.EX_USAGE, f"--worker {n}: expected 1 to {workers} ([ingest] workers = {workers})")
    return n


def to_row(verifier: Verifier, topic: str, payload: bytes) -> Row:
    """The one place a message becomes a row (the worker and `iotctl dlq replay`). Raises Rejected."""
    r = verifier.check(payload)
    if len(topic) > MAX_TOPIC:
        raise Rejected(Reason.BAD_SCHEMA, f"topic longer than {MAX_TOPIC} characters")
    return (r.msg_id, r.sensor, r.ts, topic, orjson.dumps(r.values).decode(), r.key_id)


class Stats:
    __slots__ = ("landed", "dlq", "retained_again", "batches", "lat_sum", "lat_n", "last_landed", "last_t",
                 "rate", "outage", "started", "busy", "commit_sum", "holding_since", "holding")

    def __init__(self):
        self.landed = self.dlq = self.retained_again = self.batches = self.busy = 0
        self.commit_sum = 0.0  # seconds spent in the database's upsert + commit, over `batches`
        # The batch being landed (unacknowledged, out of the inbox): its size and first arrival.
        self.holding = 0
        self.holding_since: float | None = None
        self.lat_sum = 0.0
        self.lat_n = 0
        self.last_landed = 0
        self.last_t = self.started = time.monotonic()
        self.rate = 0.0
        self.outage: str | None = None


class Ingest:
    def __init__(self, svc: Service, sink: Sink, verifier: Verifier, dlq: dlqmod.Writer, worker: int = 1):
        self.svc, self.log = svc, svc.log
        self.cfg = svc.config.ingest
        self.sink, self.verifier, self.dlq = sink, verifier, dlq
        self.worker = worker
        self.stats = Stats()
        cfg = svc.config
        self.client = c = MqttClient(
            cfg.mqtt, client_id(cfg, worker), log=self.log, clean_session=False,
            manual_ack=True, subscriptions=[(t, 1) for t in subscriptions(cfg)], on_connect=self._on_connect,
            tune_receiver=True, inbox_limit=self.cfg.max_unacked - self.cfg.batch_size,
        )
        assert c.inbox is not None
        self.inbox = c.inbox
        self.dlq_size = dlqmod.Size(dlq.folder)
        self.snap_path = status_path(cfg, worker)
        self._snap: dict = {}
        self._snap_at = -SNAPSHOT_IDLE
        self._snap_failed = False

    # paho's thread -----------------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        if not session_present:
            self.log.info("broker has no stored session for us (first start, or it lost its state): "
                          "messages published while we were away may be gone")

    # main thread --------------------------------------------------------------------------------

    def start_mqtt(self) -> None:
        c = self.client
        if c.tuned:
            self.log.info("paho receive path tuned (buffered reads, batched acks)", paho=paho_version)
        else:
            self.log.warning("paho receive path stock: paho internals differ from the tested version, or "
                             "IOT_PAHO_STOCK is set; correct, slower", paho=paho_version)
        c.start()

    def collect(self) -> list[Delivery]:
        inbox = self.inbox
        if not inbox.wait(0.5):
            return []
        size, idle = self.cfg.batch_size, self.cfg.batch_idle
        deadline = time.monotonic() + self.cfg.batch_wait
        seen = len(inbox)
        while seen < size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(idle, left))
            n = len(inbox)
            if n == seen:
                break  # nothing new: the window is full or the sender paused; waiting gains nothing
            seen = n
        return inbox.take(size)

    def process(self, batch: list[Delivery]) -> bool:
        """Land one batch and acknowledge it. False if a stop came first (nothing acked)."""
        st = self.stats
        st.holding_since, st.holding = batch[0][1].timestamp, len(batch)
        try:
            return self._process(batch)
        finally:
            st.holding_since, st.holding = None, 0

    def _process(self, batch: list[Delivery]) -> bool:
        rows: list[Row] = []
        where: list[int] = []  # batch index of each row
        bad: list[tuple[str, str, str, bytes, str | None]] = []
        ts_sum = 0.0
        to_row_ = to_row
        verifier = self.verifier
        for i, (_, m) in enumerate(batch):
            try:
                topic = m.topic
            except UnicodeDecodeError:
                bad.append((Reason.BAD_ENVELOPE.value, "topic is not UTF-8",
                            m._topic.decode("utf-8", "replace"), m.payload, None, m.retain))
                continue
            try:
                row = to_row_(verifier, topic, m.payload)
            except Rejected as e:
                if m.retain and self.dlq.holds_retained(topic, m.payload):
                    self.stats.retained_again += 1  # sent again on a new SUBSCRIBE; in the DLQ already
                    continue
                bad.append((e.reason.value, e.detail, topic, m.payload, None, m.retain))
                continue
            rows.append(row)
            where.append(i)
            ts_sum += row[2]
        if bad and not self._retry(lambda: self.dlq.append(bad), "DLQ not writable", len(batch)):
            return False
        refused: list[tuple[int, str]] = []

        def write() -> None:
            nonlocal refused
            t0 = time.monotonic()
            refused = self.sink.write(rows)
            self.stats.commit_sum += time.monotonic() - t0

        if rows and not self._retry(write, "database unavailable", len(batch)):
            return False
        committed = time.time()
        if refused:
            items = []
            for j, err in refused:
                _, m = batch[where[j]]
                ts_sum -= rows[j][2]
                items.append((Reason.DB_REFUSED.value, err, rows[j][3], m.payload, rows[j][0], m.retain))
            if not self._retry(lambda: self.dlq.append(items), "DLQ not writable", len(batch)):
                return False
            bad.extend(items)
        self.client.ack(batch)
        landed = len(rows) - len(refused)
        st = self.stats
        st.landed += landed
        st.dlq += len(bad)
        st.batches += 1
        st.lat_sum += committed * landed - ts_sum
        st.lat_n += landed
        if bad:
            self._log_rejects(bad)
        return True

    def _retry(self, fn, what: str, holding: int) -> bool:
        """Run fn until it succeeds; back off while it raises Unavailable/OSError. False on stop."""
        attempt = 0
        while True:
            try:
                fn()
                if attempt:
                    self.log.info(f"{what.split()[0]} back; writing again", after_attempts=attempt)
                    self.stats.outage = None
                    self.svc.set_status(self.summary())
                return True
            except Busy as e:
                # Another worker's turn at the database: usual with several on one SQLite file,
                # so quick retries, and a warning only if it goes on.
                self.stats.busy += 1
                delay = backoff(attempt, 0.005, self.cfg.retry_min)
                attempt += 1
                if attempt % 20 == 0:
                    self.log.warning("database busy (another writer); retrying", error=str(e), attempt=attempt,
                                     unacked=holding + len(self.inbox))
                if not self.svc.wait(delay):
                    return False
            except (Unavailable, OSError) as e:
                delay = backoff(attempt, self.cfg.retry_min, self.cfg.retry_max)
                attempt += 1
                self.stats.outage = (f"{what}: {e}; retry {attempt} in {delay:.1f}s; "
                                     f"holding {holding + len(self.inbox)} unacked")
                self.log.warning(what, error=str(e), retry_in=f"{delay:.1f}s", attempt=attempt,
                                 unacked=holding + len(self.inbox))
                self.svc.set_status(self.stats.outage)
                self.maybe_snapshot()
                if not self.svc.wait(delay):
                    return False

    def _log_rejects(self, bad: list) -> None:
        # One line per reason per batch: a flood of bad messages cannot flood the journal.
        counts: dict[str, int] = {}
        for item in bad:
            counts[item[0]] = counts.get(item[0], 0) + 1
        for reason, n in counts.items():
            first = next(item for item in bad if item[0] == reason)
            self.log.warning("rejected to DLQ", reason=reason, count=n, topic=first[2], detail=first[1][:200])

    # status ---------------------------------------------------------------------------------------

    def summary(self) -> str:
        st = self.stats
        lat = (st.lat_sum / st.lat_n * 1000) if st.lat_n else 0.0
        line = (f"workers={self.cfg.workers} worker={self.worker} queue={len(self.inbox)} landed={st.landed} "
                f"dlq={st.dlq} "
                f"latency_avg={lat:.0f}ms rate={st.rate:.0f}/s batch={self.cfg.batch_size}/"
                f"{self.cfg.batch_wait * 1000:.0f}ms busy={st.busy}")
        if st.outage:
            line = st.outage + "; " + line
        elif not self.client.connected:
            line = "broker not connected; " + line
        return line

    def families(self) -> Families:
        """The counters as Prometheus metrics (daemons/metrics.py), read from the scrape's thread."""
        st, out = self.stats, Families()
        out.counter("iot_ingest_records_stored", "Readings committed to the database.", st.landed)
        out.counter("iot_ingest_records_rejected", "Messages written to the DLQ (bad signature, schema, "
                    "refused by the database...).", st.dlq)
        out.counter("iot_ingest_retained_again", "Retained bad messages delivered again and already in the DLQ.",
                    st.retained_again)
        out.counter("iot_ingest_batches", "Batches landed and acknowledged.", st.batches)
        out.counter("iot_ingest_commit_seconds", "Seconds spent in the database's upsert and commit, over all "
                    "batches (divide its rate by that of iot_ingest_batches_total for the mean).", st.commit_sum)
        waiting = len(self.inbox)
        out.gauge("iot_ingest_unacked_messages", "Messages received and not yet acknowledged (waiting or being "
                  "landed).", waiting + st.holding)
        oldest = st.holding_since if st.holding_since is not None else self.inbox.oldest()
        out.gauge("iot_ingest_lag_seconds", "Age of the oldest unacknowledged message; 0 when none waits.",
                  time.monotonic() - oldest if oldest is not None else 0.0)
        out.gauge("iot_ingest_broker_connected", "1 while connected to the broker.", self.client.connected)
        out.gauge("iot_ingest_database_up", "0 while the database (or the DLQ) cannot be written.",
                  st.outage is None)
        entries, size = self.dlq_size.count()
        out.gauge("iot_ingest_dlq_records", "Entries in the DLQ folder (shared by every worker).", entries)
        out.gauge("iot_ingest_dlq_bytes", "Bytes of the DLQ's segments.", size)
        out.gauge("iot_ingest_dlq_files", "Segment files in the DLQ folder.", len(dlqmod.segments(self.dlq.folder)))
        return out

    def snapshot(self) -> dict:
        st = self.stats
        return {"landed": st.landed, "dlq": st.dlq, "queue": len(self.inbox), "connected": self.client.connected,
                "outage": st.outage, "pid": os.getpid(), "worker": self.worker}

    def maybe_snapshot(self) -> None:
        """Write the counters for readers on this node, at most once a second and only when they
        changed (else every SNAPSHOT_IDLE s, so a reader can tell a live worker from a dead one).
        Not fsynced: it only informs, and never torn (durable.atomic_write)."""
        now = time.monotonic()
        if now - self._snap_at < 1.0:
            return
        snap = self.snapshot()
        if snap == self._snap and now - self._snap_at < SNAPSHOT_IDLE:
            return
        self._snap, self._snap_at = snap, now
        path = self.snap_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, orjson.dumps({**snap, "updated": time.time()}), durable=False)
        except OSError as e:
            if not self._snap_failed:  # once: the status file is a convenience, ingesting goes on
                self.log.warning("cannot write the status file", path=str(path), error=str(e))
            self._snap_failed = True

    def maybe_status(self) -> None:
        st = self.stats
        every = self.cfg.status_every
        done = st.landed + st.dlq
        if done // every == st.last_landed // every:
            return
        now = time.monotonic()
        st.rate = (done - st.last_landed) / max(now - st.last_t, 1e-6)
        line = self.summary()
        self.log.info("status " + line)
        self.svc.set_status(line)
        st.last_landed, st.last_t = done, now
        st.lat_sum, st.lat_n = 0.0, 0


def _count_kinds(keys: dict) -> str:
    counts: dict[str, int] = {}
    for entry in keys.values():
        counts[kind_of(entry)] = counts.get(kind_of(entry), 0) + 1
    return f"{len(keys)} (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")"


def serve(svc: Service) -> None:
    cfg = svc.config
    ic = cfg.ingest
    if ic.max_unacked < ic.batch_size:
        raise ConfigError(cfg.origin("[ingest] max_unacked"), "[ingest] max_unacked", f"must be at least batch_size ({ic.batch_size}), "
                                                               f"got {ic.max_unacked}")
    kp = keys_path(cfg)
    try:
        keys = load_keys(kp)
    except KeysError as e:
        raise Exit(service.EX_CONFIG, str(e)) from None
    worker = worker_number(svc)
    verifier = Verifier(keys, ic.max_payload)
    sink = open_sink(cfg)
    dlq = dlqmod.Writer(dlq_path(cfg), ic.dlq_segment_bytes, tag=f"w{worker}" if ic.workers > 1 else "")
    ing = Ingest(svc, sink, verifier, dlq, worker)
    try:
        sink.connect()
        svc.log.info("database ready", sink=sink.describe())
    except Unavailable as e:
        # Not fatal: the loop retries before the first write, and STATUS= says so.
        svc.log.warning("database unavailable at start; will retry", error=str(e))
    except SchemaTooNew as e:
        raise Exit(service.EX_DATAERR, str(e)) from None
    # Thousands of received messages are alive at once and none form reference cycles; with
    # the default threshold (700) the cyclic collector walks them over and over (measured: 10%
    # of the worker's CPU with a 5,000-message window). Collect young objects less often.
    gc.set_threshold(GC_THRESHOLD, 50, 100)
    gc.freeze()  # what start-up allocated is never garbage: keep it out of every collection
    ing.start_mqtt()
    svc.status_fn = ing.summary
    # Worker I serves on the port + I - 1 (worker 1 on the port itself).
    endpoint = metrics.serve(svc.log, ic.metrics, "[ingest] metrics", ing.families, index=worker - 1)
    # READY once the broker has granted the subscription (from then on nothing published is
    # missed, even on a first start), or after SUBSCRIBE_WAIT while it keeps retrying.
    subscribed = ing.client.subscribed.wait(SUBSCRIBE_WAIT)
    svc.ready((f"subscribed to {','.join(subscriptions(cfg))}" if subscribed else "broker not reachable yet; retrying")
              + f" as {client_id(cfg, worker)} (worker {worker} of {ic.workers}); sink {sink.describe()}; "
              f"keys {_count_kinds(keys)}")
    try:
        while svc.wait(0):
            ing.maybe_snapshot()
            batch = ing.collect()
            if not batch:
                continue
            if not ing.process(batch):
                break
            ing.maybe_status()
    except SchemaTooNew as e:
        raise Exit(service.EX_DATAERR, str(e)) from None
    finally:
        svc.log.info("final " + ing.summary(), unacked_left=len(ing.inbox))
        if endpoint is not None:
            endpoint.close()
        ing.client.stop()
        sink.close()
        dlq.close()


def add_arguments(p) -> None:
    p.add_argument("--worker", metavar="I", type=int, default=1,
                   help="this process's worker number, 1 to [ingest] workers (default 1)")
    p.add_argument("--list", action="store_true", help="print the worker numbers the config asks for and exit")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list" in argv:  # the instances iot-ingest@I can take
        return service.list_instances(NAME, argv, lambda cfg: [str(i) for i in range(1, cfg.ingest.workers + 1)])
    return service.run(
        NAME,
        "Signed QoS 1 readings from MQTT into SQLite or MySQL/MariaDB, acknowledged only after "
        "commit; rejected messages kept in the DLQ. Reads the [ingest] and [mqtt] sections.",
        serve,
        add_arguments=add_arguments,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
