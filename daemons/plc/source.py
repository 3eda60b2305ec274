"""Where a PLC's readings come from: a simulation (seed 002) or a real PLC over Modbus TCP.

A source's `read()` returns `(values, units)` or None: no reading this time. A source never
invents a value: a Modbus PLC that does not answer gives no reading (counted as missed), and a
register it refuses is left out of the reading, named in the log.

Modbus through pymodbus (its client speaks the protocol; we only turn register words into
numbers, `decode`, which is pure). Outages are logged once when they begin and once when they
end; while one lasts the PLC is tried again after a delay that doubles up to `retry_max`, and
the readings due in between are missed, not queued: a reading is what the PLC said at a time.
"""

from __future__ import annotations

import logging
import math
import random
import struct
import time
from collections.abc import Callable

from ..config import PlcDeviceConfig, RegisterConfig
from ..mqttclient import backoff
from ..service import Log

Values = dict[str, float | int]
_FORMAT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}


class Simulated:
    """Temperature 20-30 C and pressure 1-2 bar, as the seed's PLC."""

    UNITS = {"temperature": "C", "pressure": "bar"}

    def read(self) -> tuple[Values, dict[str, str]] | None:
        return {"temperature": round(random.uniform(20, 30), 2), "pressure": round(random.uniform(1, 2), 3)}, self.UNITS

    def describe(self) -> str:
        return "simulated"

    def close(self) -> None:
        pass


def _shortest_float32(x: float) -> float:
    """The shortest decimal that is the same float32: 23.7, not 23.700000762939453."""
    for digits in range(6, 10):
        y = float(f"{x:.{digits}g}")
        if struct.unpack(">f", struct.pack(">f", y))[0] == x:
            return y
    return x


def decode(reg: RegisterConfig, words: list[int]) -> float | int:
    """Register words (16-bit each, as the PLC sent them) into the register's value, scaled.
    Raises ValueError for a float32 that is not a finite number."""
    if reg.words == 2:
        hi, lo = (words[0], words[1]) if reg.word_order == "big" else (words[1], words[0])
        raw = struct.unpack(_FORMAT[reg.type], struct.pack(">HH", hi, lo))[0]
    else:
        raw = struct.unpack(_FORMAT[reg.type], struct.pack(">H", words[0]))[0]
    if reg.type == "float32":
        if not math.isfinite(raw):
            raise ValueError(f"holds {raw}, not a finite number")
        raw = _shortest_float32(raw)
    if reg.scale == 1:
        return raw
    return float(f"{raw * reg.scale:.12g}")  # 237 * 0.1 is 23.7, not 23.700000000000003


class Modbus:
    def __init__(self, dev: PlcDeviceConfig, log: Log, retry_min: float, retry_max: float,
                 clock: Callable[[], float] = time.monotonic):
        from pymodbus.client import ModbusTcpClient  # noqa: PLC0415 - only a Modbus PLC needs it

        # pymodbus logs every failed attempt at ERROR; we say it once per outage ourselves.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        self.dev, self.log, self.clock = dev, log, clock
        self.retry_min, self.retry_max = retry_min, retry_max
        # retries=0: a PLC that does not answer costs one timeout, not four, per attempt.
        self.client = ModbusTcpClient(dev.host, port=dev.port, timeout=dev.timeout, retries=0)
        self.units = {r.name: r.unit for r in dev.register if r.unit}
        self.down_since: float | None = None
        self.attempts = 0
        self.next_try = 0.0
        self.missed = 0  # readings due while the PLC did not answer, this outage
        self.missed_total = 0
        self.failing: dict[str, str] = {}  # register name -> the error, while it fails

    def describe(self) -> str:
        return f"modbus {self.dev.host}:{self.dev.port} unit {self.dev.unit_id}"

    def read(self) -> tuple[Values, dict[str, str]] | None:
        from pymodbus.exceptions import ModbusException  # noqa: PLC0415

        if self.down_since is not None and self.clock() < self.next_try:
            self._missed()
            return None
        values: Values = {}
        try:
            if not self.client.connected and not self.client.connect():
                raise ConnectionError("connection refused or timed out")
            for reg in self.dev.register:
                self._read_register(reg, values)
        except (ModbusException, OSError) as e:
            self.client.close()
            self._down(str(e))
            return None
        self._up()
        return (values, {k: u for k, u in self.units.items() if k in values}) if values else None

    def _read_register(self, reg: RegisterConfig, values: Values) -> None:
        c, unit = self.client, self.dev.unit_id
        fn = c.read_holding_registers if reg.kind == "holding" else c.read_input_registers
        rr = fn(reg.address, count=reg.words, device_id=unit)
        try:
            if rr.isError():
                raise ValueError(f"the PLC answered {rr}")
            if len(rr.registers) < reg.words:
                raise ValueError(f"the PLC sent {len(rr.registers)} of {reg.words} registers")
            values[reg.name] = decode(reg, rr.registers)
        except ValueError as e:
            if self.failing.get(reg.name) != str(e):
                self.log.warning("register read failed; left out of the readings", plc=self.dev.name,
                                 register=reg.name, kind=reg.kind, address=reg.address, type=reg.type, error=str(e))
            self.failing[reg.name] = str(e)
            return
        if self.failing.pop(reg.name, None) is not None:
            self.log.info("register read again", plc=self.dev.name, register=reg.name)

    def _missed(self) -> None:
        self.missed += 1
        self.missed_total += 1

    def _down(self, error: str) -> None:
        self._missed()
        now = self.clock()
        if self.down_since is None:
            self.down_since = now
            self.log.warning("PLC not answering; its readings are missing until it does", plc=self.dev.name,
                             address=f"{self.dev.host}:{self.dev.port}", unit=self.dev.unit_id, error=error)
        delay = backoff(self.attempts, self.retry_min, self.retry_max)
        self.attempts += 1
        self.next_try = now + delay

    def _up(self) -> None:
        if self.down_since is not None:
            self.log.info("PLC answering again", plc=self.dev.name, address=f"{self.dev.host}:{self.dev.port}",
                          down_for=f"{self.clock() - self.down_since:.1f}s", readings_missed=self.missed)
        self.down_since = None
        self.attempts = 0
        self.missed = 0

    def close(self) -> None:
        self.client.close()


def open_source(dev: PlcDeviceConfig, log: Log, retry_min: float, retry_max: float) -> Simulated | Modbus:
    return Modbus(dev, log, retry_min, retry_max) if dev.source == "modbus" else Simulated()
