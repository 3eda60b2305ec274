"""daemons/metrics.py without processes: the broker's families from a real core fed packets,
read through prometheus-client's own registry and parser; the `metrics` key's validation;
the endpoint's behaviour when its port is taken."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from daemons import config, metrics
from daemons.broker import packets as p
from daemons.broker.server import Server, families
from daemons.service import Log

from .test_core import connect

LOG = Log("test")


def exposition(fn, loop=None) -> str:
    registry = CollectorRegistry()
    registry.register(metrics.Snapshot(fn, loop))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def broker_server() -> Server:
    return Server(config.BrokerConfig(persistence=False), LOG, asyncio.new_event_loop())


def test_broker_metrics_parse_and_count_publishes_by_qos():
    srv = broker_server()
    b = srv.broker
    sub, _ = connect(b, "sub")
    b.handle(sub, p.Subscribe(1, (("t/#", 1),)))  # granted 1: a QoS 2 message goes out at QoS 1
    pub, _ = connect(b, "pub")
    b.handle(pub, p.Publish("t/a", b"x", 0))
    b.handle(pub, p.Publish("t/a", b"x", 1, packet_id=1))
    b.handle(pub, p.Publish("t/a", b"x", 2, packet_id=2))
    b.handle(pub, p.Publish("t/r", b"kept", 1, retain=True, packet_id=3))
    text = exposition(lambda: families(srv))
    got = samples(text)
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"iot_broker_connections", "iot_broker_messages_received", "iot_broker_messages_sent",
            "iot_broker_messages_dropped", "iot_broker_messages_queued", "iot_broker_retained_messages",
            "iot_broker_subscriptions", "iot_broker_bytes_received", "iot_broker_bytes_sent",
            "iot_broker_limit_hits", "iot_broker_access_denied", "iot_broker_bridge_up"} <= names
    assert got[("iot_broker_connections", ())] == 2
    assert got[("iot_broker_connections_total", ())] == 2
    received = {q: got[("iot_broker_messages_received_total", (("qos", q),))] for q in "012"}
    assert received == {"0": 1, "1": 2, "2": 1}
    sent = {q: got[("iot_broker_messages_sent_total", (("qos", q),))] for q in "012"}
    assert sent == {"0": 1, "1": 3, "2": 0}, "QoS 2 to a QoS 1 subscription is sent at QoS 1"
    assert got[("iot_broker_retained_messages", ())] == 1
    assert got[("iot_broker_subscriptions", ())] == 1
    assert got[("iot_broker_messages_queued", ())] == 3, "three QoS 1 deliveries unacknowledged"


def test_bridge_metrics_come_from_server_bridges_and_are_empty_without_them():
    srv = broker_server()
    got = samples(exposition(lambda: families(srv)))
    assert not [k for k in got if k[0].startswith("iot_broker_bridge_")]
    srv.bridges = [SimpleNamespace(name="cloud", connected=True, queued=4, sent=10, received=3, dropped=1),
                   SimpleNamespace(name="backup", connected=False, queued=0, sent=0, received=0, dropped=0)]
    got = samples(exposition(lambda: families(srv)))
    assert got[("iot_broker_bridge_up", (("bridge", "cloud"),))] == 1
    assert got[("iot_broker_bridge_up", (("bridge", "backup"),))] == 0
    assert got[("iot_broker_bridge_messages_queued", (("bridge", "cloud"),))] == 4
    assert got[("iot_broker_bridge_messages_sent_total", (("bridge", "cloud"),))] == 10
    assert got[("iot_broker_bridge_messages_received_total", (("bridge", "cloud"),))] == 3
    assert got[("iot_broker_bridge_messages_dropped_total", (("bridge", "cloud"),))] == 1


def test_a_loop_owned_collector_runs_on_that_loop():
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    seen = []

    def fams():
        seen.append(threading.current_thread())
        out = metrics.Families()
        out.gauge("x", "x", 1)
        return out

    try:
        assert samples(exposition(fams, loop))[("x", ())] == 1
        assert seen == [t]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        loop.close()


@pytest.mark.parametrize("text, want", [
    ("", None), ("127.0.0.1:9600", ("127.0.0.1", 9600)), ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:65535", ("::1", 65535)),
])
def test_metrics_address_accepts(text, want):
    assert config.metrics_address(text) == want


@pytest.mark.parametrize("text", ["localhost:9600", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
                                  "127.0.0.1:x", "::1:9600", "[127.0.0.1]:9600", ":9600", "127.0.0.1:９"])
def test_metrics_address_refuses(text, tmp_path):
    path = tmp_path / "iot.toml"
    path.write_text(f'[ingest]\nmetrics = "{text}"\n')
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: [ingest] metrics: expected") and "port from 1 to 65535" in msg
    assert "\n" not in msg


def test_a_taken_port_is_a_warning_and_no_endpoint(caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            assert metrics.serve(LOG, f"127.0.0.1:{port}", "[dbsub] metrics", metrics.Families) is None
    assert any("metrics not served" in r.getMessage() and "[dbsub] metrics" in str(r.kv) for r in caplog.records)


def test_the_endpoint_serves_the_instance_port_and_closes():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    fams = metrics.Families()
    fams.counter("iot_test_things", "Things.", 7)
    ep = metrics.serve(LOG, f"127.0.0.1:{base - 1}", "[plc] metrics", lambda: fams, index=1)
    assert ep is not None
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{base}/metrics", timeout=5).read().decode()
        assert samples(text)[("iot_test_things_total", ())] == 7
        assert ("process_resident_memory_bytes", ()) in samples(text)
    finally:
        ep.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{base}/metrics", timeout=5)


def test_the_grafana_dashboard_is_json_and_asks_only_for_metrics_we_export():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "deploy" / "grafana" / "iot-node.json").read_text())
    assert any(v["type"] == "datasource" and v["query"] == "prometheus" for v in dash["templating"]["list"])
    source = "".join(p.read_text() for p in (root / "daemons").rglob("*.py"))
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    names = {n for e in exprs for n in re.findall(r"\biot_[a-z_]+", e)}
    assert len(names) > 15
    for name in names:
        family = name.removesuffix("_total")
        assert f'"{family}"' in source, f"the dashboard asks for {name}, which no daemon exports"


def test_the_prometheus_example_passes_promtool():
    import shutil
    import subprocess
    from pathlib import Path

    promtool = shutil.which("promtool")
    assert promtool, "Debian's prometheus (promtool) is not installed: run ./install.sh --local --test-deps"
    path = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "iot.yml"
    r = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
