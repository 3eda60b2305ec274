"""Each daemon's /metrics as real processes: it answers with the daemon's metrics, and a counter
moves after real traffic (mosquitto_pub, a PLC's readings, a file through the outbox)."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemons.ingest.signing import Signer, encode_body
from tests.support import BIN, free_port, port_open, wait_for

from .test_transfer_support import Pair

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of http://127.0.0.1:port/metrics, parsed by prometheus-client."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(port: int, name: str, **labels: str) -> float:
    return scrape(port).get((name, tuple(sorted(labels.items()))), -1.0)


def wait_value(port: int, name: str, at_least: float, timeout: float = 30.0, **labels: str) -> None:
    wait_for(lambda: value(port, name, **labels) >= at_least, timeout, 0.1,
             what=f"{name}{labels or ''} >= {at_least} (now {value(port, name, **labels)})")


def pub(port: int, topic: str, payload: bytes, qos: int) -> None:
    subprocess.run(["mosquitto_pub", "-p", str(port), "-t", topic, "-q", str(qos), "-s"], input=payload,
                   check=True, timeout=10)


def two_free_ports() -> int:
    """A port P with P + 1 free too (the daemons of one section that take port + 1)."""
    while True:
        p = free_port()
        if p < 65535 and not port_open(p + 1):
            return p


def test_broker_metrics_answer_and_count_a_publish_by_qos(broker_factory):
    mport = free_port()
    b = broker_factory(f'metrics = "127.0.0.1:{mport}"\nsys_interval = 0\n')
    assert f"metrics on http://127.0.0.1:{mport}/metrics" in b.proc.log()
    before = scrape(mport)
    assert before[("iot_broker_messages_received_total", (("qos", "1"),))] == 0
    assert ("iot_broker_connections", ()) in before and ("iot_broker_retained_messages", ()) in before
    pub(b.port, "m/a", b"one", 1)
    pub(b.port, "m/a", b"two", 1)
    pub(b.port, "m/r", b"kept", 2)
    after = scrape(mport)
    assert after[("iot_broker_messages_received_total", (("qos", "1"),))] == 2
    assert after[("iot_broker_messages_received_total", (("qos", "2"),))] == 1
    assert after[("iot_broker_connections_total", ())] == 3
    assert after[("iot_broker_bytes_received_total", ())] > before[("iot_broker_bytes_received_total", ())]


def test_broker_with_its_metrics_port_taken_warns_and_serves_mqtt(broker_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        b = broker_factory(f'metrics = "127.0.0.1:{taken}"\n')
        assert "metrics not served: cannot listen on" in b.proc.log()
        pub(b.port, "still/works", b"x", 1)
        assert b.proc.running()


def test_broker_refuses_a_metrics_key_that_is_no_address(tmp_path):
    cfg = tmp_path / "iot.toml"
    cfg.write_text('[broker]\nmetrics = "localhost:9600"\n')
    r = subprocess.run([str(BIN / "iot-broker"), "--config", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 78
    assert f"{cfg}: [broker] metrics: expected" in r.stderr and "IP address" in r.stderr


def test_ingest_metrics_count_stored_rejected_and_the_dlq(broker, daemon, tmp_path):
    key = bytes(range(32))
    keys = tmp_path / "ingest.keys"
    keys.write_text(f"k1 {key.hex()}\n")
    os.chmod(keys, 0o600)
    mport = free_port()
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[mqtt]\nport = {broker.port}\n'
                   f'[ingest]\nkeys_file = "{keys}"\nmetrics = "127.0.0.1:{mport}"\n')
    proc, _ = daemon("iot-ingest", "--config", str(cfg))
    wait_for(lambda: "subscribed" in proc.log(), 10, what="the worker's subscription")
    before = scrape(mport)
    assert before[("iot_ingest_records_stored_total", ())] == 0
    assert before[("iot_ingest_dlq_records", ())] == 0
    assert before[("iot_ingest_broker_connected", ())] == 1
    signer = Signer("k1", key)
    for i in range(5):
        pub(broker.port, "sensors/m", signer.sign(encode_body(f"m-{i}", "s", time.time(), {"t": i})), 1)
    pub(broker.port, "sensors/m", b"not signed", 1)
    wait_value(mport, "iot_ingest_records_stored_total", 5)
    wait_value(mport, "iot_ingest_records_rejected_total", 1)
    got = scrape(mport)
    assert got[("iot_ingest_dlq_records", ())] == 1 and got[("iot_ingest_dlq_files", ())] == 1
    assert got[("iot_ingest_dlq_bytes", ())] > 0
    assert got[("iot_ingest_batches_total", ())] >= 1 and got[("iot_ingest_commit_seconds_total", ())] > 0
    assert got[("iot_ingest_unacked_messages", ())] == 0 and got[("iot_ingest_lag_seconds", ())] == 0


def test_plc_and_dbsub_metrics_follow_the_readings(broker, daemon, tmp_path):
    base, dport = two_free_ports(), free_port()
    cfg = tmp_path / "iot.toml"
    # Two PLCs: the second ([[plc.device]] #2, index 1) serves on the port + 1.
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[mqtt]\nport = {broker.port}\n'
                   f'[dbsub]\nmetrics = "127.0.0.1:{dport}"\n[plc]\nmetrics = "127.0.0.1:{base}"\n'
                   '[[plc.device]]\nname = "a"\ninterval = 0.1\n[[plc.device]]\nname = "b"\ninterval = 0.1\n')
    daemon("iot-dbsub", "--config", str(cfg))
    daemon("iot-plc", "--config", str(cfg), "--plc", "b")
    wait_value(base + 1, "iot_plc_readings_acknowledged_total", 5)
    got = scrape(base + 1)
    assert got[("iot_plc_up", ())] == 1 and got[("iot_plc_broker_connected", ())] == 1
    assert got[("iot_plc_readings_taken_total", ())] >= 5 and got[("iot_plc_readings_dropped_total", ())] == 0
    assert ("iot_plc_queue_readings", ()) in got
    assert not port_open(base), "PLC a is not running: nothing serves its port"
    wait_value(dport, "iot_dbsub_readings_stored_total", 5)
    pub(broker.port, "sensor/data", b"{not json", 1)
    wait_value(dport, "iot_dbsub_readings_rejected_total", 1, reason="not_json")


def test_transfer_metrics_count_a_file_on_both_sides(broker, daemon, tmp_path):
    mport = two_free_ports()
    pair = Pair(daemon, tmp_path, broker.port, metrics=f"127.0.0.1:{mport}", chunk_size=4096).start()
    assert value(mport, "iot_transfer_send_files_total") == 0
    assert value(mport + 1, "iot_transfer_recv_files_total") == 0
    data = os.urandom(40_000)  # 10 chunks
    pair.drop("m.bin", data)
    pair.wait_done("m.bin", data)
    wait_value(mport, "iot_transfer_send_files_total", 1)
    wait_value(mport + 1, "iot_transfer_recv_files_total", 1)
    tx, rx = scrape(mport), scrape(mport + 1)
    assert tx[("iot_transfer_send_file_bytes_total", ())] == len(data)
    assert tx[("iot_transfer_send_chunks_total", ())] >= 10
    assert tx[("iot_transfer_send_chunk_bytes_total", ())] >= len(data)
    assert rx[("iot_transfer_recv_chunks_total", ())] == 10
    assert rx[("iot_transfer_recv_chunk_bytes_total", ())] == len(data)
    assert rx[("iot_transfer_recv_file_bytes_total", ())] == len(data)


def test_a_real_prometheus_scrapes_the_broker_and_ingest_and_sees_the_counter_move(broker_factory, daemon, tmp_path):
    """Debian's prometheus (./install.sh --test-deps installs it): every target up, then the
    broker's received counter, as Prometheus stores it, goes up after messages are published."""
    import json
    import shutil

    from tests.support import Proc

    exe = shutil.which("prometheus")
    assert exe, "Debian's prometheus is not installed: run ./install.sh --local --test-deps"
    bport, iport, pport = free_port(), free_port(), free_port()
    b = broker_factory(f'metrics = "127.0.0.1:{bport}"\nsys_interval = 0\n')
    keys = tmp_path / "ingest.keys"
    keys.write_text(f"k1 {bytes(32).hex()}\n")
    os.chmod(keys, 0o600)
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[mqtt]\nport = {b.port}\n'
                   f'[ingest]\nkeys_file = "{keys}"\nmetrics = "127.0.0.1:{iport}"\n')
    daemon("iot-ingest", "--config", str(cfg))
    prom_cfg = tmp_path / "prometheus.yml"
    prom_cfg.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: iot-broker\n    static_configs:\n      - targets: ['127.0.0.1:{bport}']\n"
        f"  - job_name: iot-ingest\n    static_configs:\n      - targets: ['127.0.0.1:{iport}']\n")
    prom = Proc([exe, f"--config.file={prom_cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{pport}"], workdir=tmp_path, name="prometheus").start()
    api = f"http://127.0.0.1:{pport}/api/v1"

    def get(path: str) -> dict:
        try:
            return json.loads(urllib.request.urlopen(api + path, timeout=5).read())
        except OSError:
            return {}

    def targets_up() -> bool:
        active = get("/targets").get("data", {}).get("activeTargets", [])
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    def received() -> float:
        result = get("/query?query=sum(iot_broker_messages_received_total)").get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else -1.0

    try:
        wait_for(lambda: targets_up() or not prom.running(), 60, 0.2, what="every Prometheus target up")
        assert prom.running(), prom.log()
        wait_for(lambda: received() >= 0, 30, 0.2, what="the broker's counter in Prometheus")
        start = received()
        for i in range(3):
            pub(b.port, "p/x", b"%d" % i, 1)
        wait_for(lambda: received() >= start + 3, 30, 0.2,
                 what=f"iot_broker_messages_received_total to rise by 3 from {start} (now {received()})")
    finally:
        prom.stop()


def test_factory_daemons_serve_on_their_offsets(broker, daemon, tmp_path):
    while True:  # the key's port and the 4 after it, free
        base = free_port()
        if base < 65530 and not any(port_open(base + i) for i in range(1, 5)):
            break
    cfg = tmp_path / "iot.toml"
    cfg.write_text(f'[paths]\nstate_dir = "{tmp_path / "var"}"\n[mqtt]\nport = {broker.port}\n'
                   f'[factory]\nmetrics = "127.0.0.1:{base}"\ndashboard_port = {free_port()}\n'
                   '[[factory.device]]\nname = "press"\ninterval = 0.1\n'
                   '[[factory.device.sensor]]\nname = "temperature"\n')
    daemon("iot-controller", "--config", str(cfg))
    daemon("iot-observer", "--config", str(cfg))
    daemon("iot-dashboard", "--config", str(cfg))
    daemon("iot-device", "--config", str(cfg), "--device", "press")  # iot-device@press: + 4 + its position 0
    wait_value(base + 4, "iot_device_connected", 1, device="press")
    assert value(base + 4, "iot_device_running", device="press") == 1
    wait_value(base + 1, "iot_observer_messages_total", 10)
    wait_value(base + 2, "iot_dashboard_devices_online", 1)
    assert value(base, "iot_controller_broker_connected") == 1
    assert value(base, "iot_controller_alarms_total") == 0
