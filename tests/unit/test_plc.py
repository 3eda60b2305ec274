"""The pure parts of iot-plc and iot-dbsub: register decoding, the reading format, the disk
queue, and the [plc] config checks."""

from __future__ import annotations

import struct
import tomllib

import orjson
import pytest

from daemons import config
from daemons.config import RegisterConfig
from daemons.plc import reading
from daemons.plc.queue import Queue, QueueDamaged
from daemons.plc.source import Simulated, decode


def words32(fmt: str, value) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(fmt, value)))


@pytest.mark.parametrize("type_,words,expected", [
    ("uint16", [65535], 65535),
    ("int16", [65535], -1),
    ("int16", [0x8000], -32768),
    ("uint32", words32(">I", 4_000_000_000), 4_000_000_000),
    ("int32", words32(">i", -123456), -123456),
    ("float32", words32(">f", 23.7), 23.7),
    ("float32", words32(">f", -0.001), -0.001),
])
def test_decode_types_high_word_first(type_, words, expected):
    assert decode(RegisterConfig(name="v", address=0, type=type_), words) == expected


def test_decode_little_word_order_swaps_the_registers():
    hi, lo = words32(">f", 1013.25)
    assert decode(RegisterConfig(name="p", address=0, type="float32", word_order="little"), [lo, hi]) == 1013.25
    assert decode(RegisterConfig(name="n", address=0, type="int32", word_order="little"),
                  words32(">i", 70000)[::-1]) == 70000


def test_decode_scales_without_float_noise():
    assert decode(RegisterConfig(name="t", address=0, type="int16", scale=0.1), [237]) == 23.7
    assert decode(RegisterConfig(name="t", address=0, type="int16", scale=0.01), [65535 - 499]) == -5.0
    v = decode(RegisterConfig(name="c", address=0, type="uint16", scale=2), [21])
    assert v == 42 and isinstance(v, float)
    assert isinstance(decode(RegisterConfig(name="c", address=0), [21]), int)  # unscaled integers stay integers


def test_decode_refuses_a_float_that_is_not_a_number():
    with pytest.raises(ValueError, match="not a finite number"):
        decode(RegisterConfig(name="t", address=0, type="float32"), words32(">f", float("nan")))


def test_simulated_readings_are_in_the_seeds_ranges():
    for _ in range(200):
        values, units = Simulated().read()
        assert 20 <= values["temperature"] <= 30 and 1 <= values["pressure"] <= 2
        assert units == {"temperature": "C", "pressure": "bar"}


# -- the reading ----------------------------------------------------------------------------------

def test_encode_then_parse_gives_the_reading_back():
    payload = reading.encode("line1", 17, 1764662400.1234, {"temperature": 23.7, "pressure": 1.42, "count": 3},
                             {"temperature": "C", "pressure": "bar"})
    r = reading.parse(payload, 65536)
    assert (r.device_id, r.seq, r.ts) == ("line1", 17, 1764662400.123)
    assert r.values == {"temperature": 23.7, "pressure": 1.42, "count": 3}
    assert r.units == {"temperature": "C", "pressure": "bar"}


def test_parse_takes_an_iso_time_and_the_seeds_plain_fields():
    r = reading.parse(b'{"ts": "2026-12-02T10:00:00Z", "device_id": "plc-1", "seq": 0, "temperature": 21}', 65536)
    assert r.ts == 1796205600.0 and r.values == {"temperature": 21} and r.units == {}


@pytest.mark.parametrize("payload,reason", [
    (b"not json", "not_json"),
    (b"[1, 2]", "not_json"),
    (b'{"device_id": "a", "seq": 1}', "missing_field"),
    (b'{"ts": 1, "seq": 1, "t": 2}', "missing_field"),
    (b'{"ts": 1, "device_id": "a", "t": 2}', "missing_field"),
    (b'{"ts": 1, "device_id": 5, "seq": 1}', "bad_field"),
    (b'{"ts": 1, "device_id": "", "seq": 1}', "bad_field"),
    (b'{"ts": 1, "device_id": "a\\nb", "seq": 1}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": "1"}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": -1}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": 1.5}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": true}', "bad_field"),
    (b'{"ts": "yesterday", "device_id": "a", "seq": 1}', "bad_field"),
    (b'{"ts": 1764662400000, "device_id": "a", "seq": 1}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": 1, "temperature": "hot"}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": 1, "temperature": null}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": 1, "temperature": [1]}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": 1, "units": "C"}', "bad_field"),
    (b'{"ts": 1, "device_id": "a", "seq": 1, "units": {"t": 1}}', "bad_field"),
])
def test_parse_refuses_what_is_not_a_reading(payload, reason):
    with pytest.raises(reading.Malformed) as e:
        reading.parse(payload, 65536)
    assert e.value.reason == reason and str(e.value)


def test_parse_refuses_an_oversized_payload_before_reading_it():
    big = orjson.dumps({"ts": 1, "device_id": "a", "seq": 1, "x": 1, "pad": 1}) + b" " * (1 << 20)
    with pytest.raises(reading.Malformed) as e:
        reading.parse(big, 65536)
    assert e.value.reason == "oversized"


# -- the queue --------------------------------------------------------------------------------

def test_queue_numbers_readings_and_keeps_them_across_a_reopen(tmp_path):
    q = Queue(tmp_path / "q.db", 100)
    assert [q.add(lambda s: b"r%d" % s) for _ in range(3)] == [(0, 0), (1, 0), (2, 0)]
    q.remove([0])
    q.close()
    q = Queue(tmp_path / "q.db", 100)
    assert len(q) == 2 and q.next_seq == 3
    assert q.after(-1, 10) == [(1, b"r1"), (2, b"r2")]
    q.remove([1, 2])
    q.close()
    q = Queue(tmp_path / "q.db", 100)
    assert len(q) == 0 and q.add(lambda s: b"x") == (3, 0), "seq goes on after the queue emptied"


def test_queue_full_drops_the_oldest_and_counts_them(tmp_path):
    q = Queue(tmp_path / "q.db", 3)
    for _ in range(3):
        q.add(lambda s: b"r")
    assert q.add(lambda s: b"r") == (3, 1)
    assert q.add(lambda s: b"r") == (4, 1)
    assert [s for s, _ in q.after(-1, 10)] == [2, 3, 4] and len(q) == 3 and q.dropped == 2
    q.close()
    assert Queue(tmp_path / "q.db", 3).dropped == 2


def test_queue_after_pages_in_seq_order(tmp_path):
    q = Queue(tmp_path / "q.db", 100)
    for _ in range(10):
        q.add(lambda s: b"r")
    assert [s for s, _ in q.after(3, 4)] == [4, 5, 6, 7]


def test_a_damaged_queue_stops_the_start_with_what_to_do(tmp_path):
    (tmp_path / "q.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueDamaged, match="Move it aside"):
        Queue(tmp_path / "q.db", 10)


# -- config ----------------------------------------------------------------------------------------

def parse(text: str) -> config.Config:
    return config.parse(tomllib.loads(text), None)


def test_default_is_one_simulated_plc():
    (dev,) = config.Config().plc.device
    assert (dev.name, dev.id, dev.source, dev.topic, dev.interval) == ("line1", "line1", "simulated", "sensor/data", 3.0)


MODBUS = '[[plc.device]]\nname = "p"\nsource = "modbus"\nhost = "h"\n'


@pytest.mark.parametrize("text,key,expected", [
    ('[[plc.device]]\nname = "a/b"', "[[plc.device]] #1 name", "letters, digits"),
    ('[[plc.device]]\nname = "a"\n[[plc.device]]\nname = "a"', "[[plc.device]] #2 name", "earlier"),
    ('[[plc.device]]\nname = "a"\n[[plc.device]]\nname = "b"\ndevice_id = "a"', "[[plc.device]] #2 device_id",
     "unique by (device_id, seq)"),
    ('[[plc.device]]\ninterval = 3', "[[plc.device]] #1 name", "missing"),
    ('[[plc.device]]\nname = "a"\ntopic = "sensor/+"', "[[plc.device]] #1 topic", "wildcard"),
    ('[[plc.device]]\nname = "a"\nsource = "modbus"', "[[plc.device]] #1 host", "missing"),
    (MODBUS, "[[plc.device]] #1 register", "missing"),
    ('[[plc.device]]\nname = "a"\nhost = "h"', "[[plc.device]] #1 host", 'source = "modbus"'),
    (MODBUS + '[[plc.device.register]]\nname = "t"', "register #1 address", "missing"),
    (MODBUS + '[[plc.device.register]]\nname = "seq"\naddress = 0', "register #1 name", "not one of"),
    (MODBUS + '[[plc.device.register]]\nname = "t"\naddress = 0\n[[plc.device.register]]\nname = "t"\naddress = 1',
     "register #2 name", "earlier"),
    (MODBUS + '[[plc.device.register]]\nname = "t"\naddress = 65535\ntype = "float32"', "register #1 address",
     "past register 65535"),
    (MODBUS + '[[plc.device.register]]\nname = "t"\naddress = 0\ntype = "float64"', "register #1 type", "float32"),
    (MODBUS + '[[plc.device.register]]\nname = "t"\naddress = 0\nscale = 0', "register #1 scale", "other than 0"),
    (MODBUS + '[[plc.device.register]]\nname = "t"\naddress = 0\nspeed = 1', "register #1 speed", "unknown key"),
])
def test_bad_plc_tables_name_the_table_and_key(text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        parse(text)
    assert key in str(e.value) and expected in str(e.value)


def test_a_modbus_plc_with_registers_loads():
    cfg = parse(MODBUS + '[[plc.device.register]]\nname = "t"\naddress = 4\ntype = "int16"\nscale = 0.1\nunit = "C"\n')
    (dev,) = cfg.plc.device
    assert dev.register == (RegisterConfig(name="t", address=4, type="int16", scale=0.1, unit="C"),)
