"""Prometheus /metrics for every daemon, through the official client (prometheus-client).

Theory of operation: a daemon keeps its own counters (the ones its STATUS= line and $SYS
topics show) and hands `serve()` a function that turns them into metric families. Nothing
is counted twice: the families are built at scrape time by `Snapshot.collect()`, which
prometheus-client's HTTP server (a thread of its own) calls. Where the counters belong to an
asyncio loop (the broker, the dashboard), the function runs on that loop, so a scrape never reads a dict
while the loop changes it; a loop that does not answer in SCRAPE_TIMEOUT fails the scrape
(HTTP 500, which Prometheus shows as the target down) instead of hanging it.

Each daemon's section has a `metrics = "HOST:PORT"` key ("" = off). A daemon that runs as
several processes from one section serves each on the port plus its index (iot-plc: the
[[plc.device]]'s position; iot-transfer-recv: +1 beside iot-transfer-send; the factory's
daemons: factory.METRICS_OFFSET). Ports are the 9600-9699 block listed in etc/iot/iot.toml. A port that is
taken, or past 65535 after the index, is a warning, never a stop: metrics are a view, the
daemon's work matters more.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from .config import metrics_address

SCRAPE_TIMEOUT = 5.0


class Families(list):
    """The metric families of one scrape, built with one call per metric."""

    def counter(self, name: str, doc: str, value: float | None = None, *, label: str = "",
                values: Mapping[str, float] | None = None) -> None:
        """`name` without `_total` (the client adds it); `values`: label value -> count."""
        self._add(CounterMetricFamily, name, doc, value, label, values)

    def gauge(self, name: str, doc: str, value: float | None = None, *, label: str = "",
              values: Mapping[str, float] | None = None) -> None:
        self._add(GaugeMetricFamily, name, doc, value, label, values)

    def _add(self, cls, name, doc, value, label, values) -> None:
        if values is None:
            self.append(cls(name, doc, value=value))
            return
        m = cls(name, doc, labels=[label])
        for k, v in values.items():
            m.add_metric([k], v)
        self.append(m)


class Snapshot:
    """A custom collector: the daemon's `families()` at each scrape, run on `loop` if given."""

    def __init__(self, families: Callable[[], Iterable[Metric]], loop: Any = None):
        self.families, self.loop = families, loop
        self.lock = threading.Lock()  # two scrapes at once must not interleave (dlq.Size is stateful)

    def collect(self) -> Iterable[Metric]:
        with self.lock:
            if self.loop is None:
                return list(self.families())
            import asyncio  # noqa: PLC0415 - only an async daemon pays for it (service.py does the same)

            async def on_loop() -> list[Metric]:
                return list(self.families())

            return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(SCRAPE_TIMEOUT)


class Endpoint:
    """A running /metrics server; `close()` stops it."""

    def __init__(self, server, thread, address: str):
        self.server, self.thread, self.address = server, thread, address

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(log, setting: str, key: str, families: Callable[[], Iterable[Metric]], *, index: int = 0,
          loop: Any = None) -> Endpoint | None:
    """Serve `families` on the address `setting` names (the config key `key`), port + `index`.
    Returns None, after a warning, when it cannot: metrics are never a reason to stop."""
    addr = metrics_address(setting)  # validated with the config; "" = off
    if addr is None:
        return None
    host, port = addr[0], addr[1] + index
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if port > 65535:
        log.warning("metrics not served: the port plus this instance's index is past 65535", key=key,
                    setting=setting, index=index)
        return None
    # No auto_describe: it would collect once at registration, on this thread, and the broker
    # calls serve() from its loop, which the collection then waits for.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot(families, loop))
    ProcessCollector(registry=registry)  # CPU, memory, open files: the usual process_* series
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as e:
        log.warning(f"metrics not served: cannot listen on {shown}: {e.strerror or e}; the daemon runs on without "
                    f"them (set another port in {key}, or \"\" to turn them off)", key=key)
        return None
    log.info(f"metrics on http://{shown}/metrics", key=key)
    return Endpoint(server, thread, shown)
