"""iot-plc and iot-dbsub end to end, as real processes: our broker and Mosquitto, a real Modbus
TCP PLC (pymodbus's server), the fault proxy for network cuts, kill -9 for crashes.

"Nothing lost, nothing twice" is checked on the database: once a fault has healed, every seq
from 0 up to a reading taken after it is there, each once (rows are unique by (device_id, seq),
so a reading delivered twice cannot make two rows), and none above what the PLC numbered."""

from __future__ import annotations

import sqlite3
import struct
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.faultproxy import FaultProxy
from tests.modbusplc import ModbusPlc
from tests.support import BIN, Mosquitto, wait_for

pytestmark = pytest.mark.slow

INTERVAL = 0.02  # 50 readings a second: a fault of a second strands dozens


class Node:
    """One test's iot-plc + iot-dbsub setup against a broker on `port`."""

    def __init__(self, tmp_path: Path, daemon, port: int, plc: str = "", extra: str = ""):
        self.dir, self.daemon, self.port = tmp_path, daemon, port
        self.config = tmp_path / "iot.toml"
        self.state = tmp_path / "var"
        self.plc_toml = plc or f'[[plc.device]]\nname = "line1"\ninterval = {INTERVAL}\n'
        self.extra = extra
        self.write(port)
        self.plc = self.dbsub = None

    def write(self, port: int) -> None:
        self.config.write_text(
            f'[paths]\nstate_dir = "{self.state}"\n'
            f'[mqtt]\nport = {port}\nreconnect_min = 0.05\nreconnect_max = 0.5\nkeepalive = 5\n'
            f'[plc]\nretry_min = 0.1\nretry_max = 0.5\n{self.extra}\n{self.plc_toml}')

    def start_plc(self, name: str = "line1"):
        self.plc, _ = self.daemon("iot-plc", "--config", str(self.config), "--plc", name)
        return self.plc

    def start_dbsub(self):
        self.dbsub, notify = self.daemon("iot-dbsub", "--config", str(self.config))
        return self.dbsub, notify

    def seqs(self, device: str = "line1") -> list[int]:
        path = self.state / "db" / "sensors.db"
        if not path.exists():
            return []
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
            return [s for (s,) in c.execute("SELECT seq FROM readings WHERE device_id = ? ORDER BY seq", (device,))]

    def rows(self, device: str = "line1") -> list[tuple]:
        with sqlite3.connect(f"file:{self.state / 'db' / 'sensors.db'}?mode=ro", uri=True) as c:
            return c.execute("SELECT seq, ts, temperature, pressure, vals, units FROM readings "
                             "WHERE device_id = ? ORDER BY seq", (device,)).fetchall()

    def queue(self, name: str = "line1") -> tuple[int, int, int]:
        """(next_seq, queued, dropped) of the PLC's disk queue."""
        with sqlite3.connect(f"file:{self.state / 'plc' / (name + '.db')}?mode=ro", uri=True) as c:
            meta = dict(c.execute("SELECT key, value FROM meta"))
            queued = c.execute("SELECT count(*) FROM queue").fetchone()[0]
        return meta.get("next_seq", 0), queued, meta.get("dropped", 0)

    def wait_rows(self, n: int, device: str = "line1", timeout: float = 30) -> None:
        wait_for(lambda: len(self.seqs(device)) >= n, timeout, what=f"{n} readings of {device} in the database")

    def wait_queued(self, n: int, name: str = "line1") -> None:
        wait_for(lambda: self.queue(name)[1] >= n, 30, what=f"{n} readings queued on the PLC's disk")

    def check_complete(self, device: str = "line1", name: str = "line1", first: int = 0) -> int:
        """Once healed: every seq from `first` to a reading taken now lands, none twice, none invented."""
        target = self.queue(name)[0] + 10
        wait_for(lambda: set(range(first, target)) <= set(self.seqs(device)), 60,
                 what=f"every seq from {first} to {target - 1} in the database")
        seqs = self.seqs(device)
        assert len(seqs) == len(set(seqs))
        assert seqs[0] == first and max(seqs) < self.queue(name)[0], "a reading the PLC never numbered"
        return target


@pytest.fixture
def start_broker(request, tmp_path: Path, broker_factory):
    """start_broker(kind) -> (port, stop, start): our broker, or a Mosquitto with persistence (as
    a user runs it: without it a restart forgets iot-dbsub's session and what was queued for it).
    Stopped at the end of the test either way."""

    def start(kind: str):
        out = _start_broker(kind, tmp_path, broker_factory)
        request.addfinalizer(out[1])
        return out

    return start


def _start_broker(kind: str, tmp_path: Path, broker_factory):
    if kind == "iot-broker":
        b = broker_factory("sys_interval = 0\n")
        state = {"proc": b.proc}

        def stop():
            state["proc"].stop()

        def start():
            state["proc"] = broker_factory("sys_interval = 0\n", port=b.port).proc

        return b.port, stop, start
    (tmp_path / "mosq").mkdir()
    # user root: started as root, Mosquitto would become the user mosquitto, who cannot write here.
    m = Mosquitto(tmp_path / "mosq", conf=f"persistence true\npersistence_location {tmp_path / 'mosq'}/\n"
                                          "user root\n").start()
    return m.port, m.stop, m.start


BROKERS = ["iot-broker", "mosquitto"]


@pytest.mark.parametrize("kind", BROKERS)
def test_readings_land_once_each_with_the_handshake_in_every_log(kind, tmp_path, daemon, start_broker):
    port, stop, start = start_broker(kind)
    node = Node(tmp_path, daemon, port)
    node.start_dbsub()
    node.start_plc()
    node.wait_rows(30)
    node.check_complete()
    seq, ts, temperature, pressure, vals, units = node.rows()[0]
    assert 20 <= temperature <= 30 and 1 <= pressure <= 2
    assert units == '{"temperature":"C","pressure":"bar"}'
    plc_log, sub_log = node.plc.log(), node.dbsub.log()
    assert "PUBLISH sent, awaiting PUBACK mid=1 seq=0 qos=1 topic=sensor/data" in plc_log
    assert "PUBACK received: the broker has the reading mid=1 seq=0 rtt_ms=" in plc_log
    assert "reading stored; PUBACK sent after commit device=line1 seq=0 mid=" in sub_log
    if kind == "mosquitto":
        stop()  # a clean stop: Mosquitto's own log must not mention a problem with our clients


@pytest.mark.parametrize("kind", BROKERS)
def test_broker_stopped_mid_stream_and_restarted_loses_nothing(kind, tmp_path, daemon, start_broker):
    port, stop, start = start_broker(kind)
    node = Node(tmp_path, daemon, port)
    node.start_dbsub()
    node.start_plc()
    node.wait_rows(20)
    stop()
    node.wait_queued(30)  # readings taken while the broker is away wait on the PLC's disk
    assert "broker not connected" in node.plc.log() or "disconnected from broker" in node.plc.log()
    start()
    node.check_complete()


@pytest.mark.parametrize("kind", BROKERS)
def test_plc_killed_9_and_restarted_goes_on_with_the_next_seq(kind, tmp_path, daemon, start_broker):
    port, _, _ = start_broker(kind)
    node = Node(tmp_path, daemon, port)
    node.start_dbsub()
    plc = node.start_plc()
    node.wait_rows(20)
    plc.kill()
    before = node.queue()[0]
    node.start_plc()
    wait_for(lambda: f"next_seq={before} " in node.plc.log(), 10, what="the restart to continue the seq on disk")
    node.check_complete()


@pytest.mark.parametrize("kind", BROKERS)
def test_dbsub_killed_9_and_restarted_stores_what_was_sent_meanwhile(kind, tmp_path, daemon, start_broker):
    port, _, _ = start_broker(kind)
    node = Node(tmp_path, daemon, port)
    sub, _ = node.start_dbsub()
    node.start_plc()
    node.wait_rows(20)
    sub.kill()
    stored = len(node.seqs())
    wait_for(lambda: node.queue()[0] > stored + 50, 30, what="50 readings published while iot-dbsub is down")
    node.start_dbsub()
    node.check_complete()


@pytest.mark.parametrize("kind", BROKERS)
def test_network_cut_between_plc_and_broker_loses_nothing(kind, tmp_path, daemon, start_broker):
    port, _, _ = start_broker(kind)
    proxy = FaultProxy(port).start()
    try:
        node = Node(tmp_path, daemon, port)
        node.start_dbsub()  # directly to the broker
        node.write(proxy.port)  # the PLC through the proxy
        node.start_plc()
        node.wait_rows(20)
        proxy.cut()
        cut_at = node.queue()[0]
        # More than the window (100): some wait in paho's memory, the rest on disk.
        wait_for(lambda: node.queue()[0] > cut_at + 150, 30, what="150 readings taken during the cut")
        proxy.restore()
        node.check_complete()
    finally:
        proxy.stop()


def test_queue_full_drops_the_oldest_counted_and_logged(tmp_path, daemon, broker_factory):
    node = Node(tmp_path, daemon, 1, extra="queue_size = 10\n")  # nothing listens on port 1
    plc = node.start_plc()
    wait_for(lambda: node.queue()[2] >= 25, 30, what="25 readings dropped from the full queue")
    log = plc.log()
    assert "queue full: oldest readings dropped dropped=1 dropped_total=1 queue_size=10" in log
    assert log.count("queue full") == 1, "one line per minute at most"
    plc.stop()
    b = broker_factory("sys_interval = 0\n")
    node.write(b.port)
    node.start_dbsub()
    next_seq, queued, dropped = node.queue()
    assert queued == 10 and dropped == next_seq - 10
    node.start_plc()
    node.wait_rows(20)
    # The 10 kept (less the one the restart's first reading pushed out), then every new one.
    assert node.queue()[2] == dropped + 1
    node.check_complete(first=dropped + 1)


def test_malformed_payloads_are_refused_counted_and_the_subscriber_goes_on(tmp_path, daemon, broker_factory):
    b = broker_factory("sys_interval = 0\n")
    node = Node(tmp_path, daemon, b.port)
    sub, notify = node.start_dbsub()
    bad = {
        "not_json": b"temperature=21",
        "missing_field": b'{"ts": 1764662400, "device_id": "x", "temperature": 21}',
        "bad_field": b'{"ts": 1764662400, "device_id": "x", "seq": "7", "temperature": 21}',
        "oversized": b'{"ts": 1764662400, "device_id": "x", "seq": 1, "pad": "' + b"x" * (1 << 20) + b'"}',
    }
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bad-actor")
    c.connect("127.0.0.1", b.port)
    c.loop_start()
    try:
        for payload in [*bad.values(), b'{"ts": 1764662400, "device_id": "x", "seq": 0, "temperature": 21.5}']:
            c.publish("sensor/data", payload, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
    wait_for(lambda: node.seqs("x") == [0], 20, what="the good reading after the bad ones")
    log = sub.log()
    for reason in bad:
        assert f"malformed reading not stored reason={reason} count=1" in log
    assert "rejected_total=4" in log
    assert sub.running()
    wait_for(lambda: any("rejected=bad_field=1,missing_field=1,not_json=1,oversized=1" in s for s in notify.drain(0.5)),
             15, what="the rejected counts in STATUS=")


def test_modbus_plc_values_land_scaled_and_an_outage_invents_nothing(tmp_path, daemon, broker_factory):
    plc = ModbusPlc().start()
    try:
        plc.set("holding", 0, [237])  # 23.7 C as tenths
        plc.set("input", 10, list(struct.unpack(">HH", struct.pack(">f", 1.25))))
        plc.set("holding", 20, list(struct.unpack(">HH", struct.pack(">I", 70000)))[::-1])  # low word first
        plc.set("holding", 30, [65535 - 49])  # -50 as int16
        regs = (
            '[[plc.device.register]]\nname = "temperature"\naddress = 0\ntype = "int16"\nscale = 0.1\nunit = "C"\n'
            '[[plc.device.register]]\nname = "pressure"\nkind = "input"\naddress = 10\ntype = "float32"\nunit = "bar"\n'
            '[[plc.device.register]]\nname = "count"\naddress = 20\ntype = "uint32"\nword_order = "little"\n'
            '[[plc.device.register]]\nname = "offset"\naddress = 30\ntype = "int16"\n'
            '[[plc.device.register]]\nname = "missing"\naddress = 500\n'
        )
        b = broker_factory("sys_interval = 0\n")
        node = Node(tmp_path, daemon, b.port, plc=f'[[plc.device]]\nname = "press1"\ndevice_id = "press-1"\n'
                    f'source = "modbus"\nhost = "127.0.0.1"\nport = {plc.port}\ninterval = 0.05\n' + regs)
        node.start_dbsub()
        proc = node.start_plc("press1")
        node.wait_rows(5, "press-1")
        seq, ts, temperature, pressure, vals, units = node.rows("press-1")[0]
        assert (temperature, pressure) == (23.7, 1.25)
        assert vals == '{"temperature":23.7,"pressure":1.25,"count":70000,"offset":-50}'
        assert units == '{"temperature":"C","pressure":"bar"}'
        log = proc.log()
        assert log.count("register read failed; left out of the readings plc=press1 register=missing") == 1

        plc.stop()
        wait_for(lambda: "PLC not answering" in proc.log(), 20, what="the outage in the log")
        during = len(node.seqs("press-1"))
        taken = node.queue("press1")[0]
        time.sleep(1.0)  # an outage of 20 intervals: no reading may be made up for it
        assert node.queue("press1")[0] == taken, "readings taken while the PLC did not answer"
        plc.set("holding", 0, [250])
        plc.start()
        wait_for(lambda: "PLC answering again" in proc.log(), 20, what="the PLC back in the log")
        node.wait_rows(during + 5, "press-1")
        assert proc.log().count("PLC not answering") == 1, "an outage is logged once"
        temps = [r[2] for r in node.rows("press-1")]
        assert set(temps) == {23.7, 25.0}, "every reading is what the PLC said"
        assert temps == sorted(temps, key=lambda t: t == 25.0), "readings after the outage carry the new value"
        node.check_complete("press-1", "press1")
    finally:
        plc.close()


def test_iotctl_readings_prints_and_follows(tmp_path, daemon, broker_factory):
    b = broker_factory("sys_interval = 0\n")
    node = Node(tmp_path, daemon, b.port, plc='[[plc.device]]\nname = "line1"\ninterval = 0.2\n'
                                             '[[plc.device]]\nname = "line2"\ninterval = 0.2\n')
    node.start_dbsub()
    node.start_plc("line1")
    node.start_plc("line2")
    node.wait_rows(3, "line1")
    node.wait_rows(3, "line2")
    out = subprocess.run([str(BIN / "iotctl"), "readings", "--config", str(node.config), "--device", "line2",
                          "--last", "2"], capture_output=True, text=True, timeout=30)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2 and all("  line2  seq=" in x and " C  pressure=" in x for x in lines)
    follow = subprocess.Popen([str(BIN / "iotctl"), "readings", "--config", str(node.config), "--last", "1",
                               "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        seen = [follow.stdout.readline() for _ in range(6)]  # the newest, then new ones as they land
        assert all('"device_id":"line' in s for s in seen) and {'"line1"', '"line2"'} <= {
            s.split("device_id\":")[1].split(",")[0] for s in seen}
    finally:
        # SIGTERM, not SIGINT: a shell that started the suite in the background makes its children ignore SIGINT.
        follow.terminate()
        follow.wait(10)


def test_iot_plc_command_line(tmp_path):
    cfg = tmp_path / "iot.toml"
    cfg.write_text('[[plc.device]]\nname = "a"\n[[plc.device]]\nname = "b"\n')
    run = lambda *a: subprocess.run([str(BIN / "iot-plc"), "--config", str(cfg), *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=30)
    assert run("--list").stdout == "a\nb\n"
    r = run()
    assert r.returncode == 64 and "--plc NAME is needed: the config has 2 PLCs (a, b)" in r.stderr
    r = run("--plc", "c")
    assert r.returncode == 78 and "no [[plc.device]] named 'c'" in r.stderr
