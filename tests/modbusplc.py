"""A real Modbus TCP PLC for tests: pymodbus's own server, in a thread of the test process, on a
free loopback port, with registers the test sets. Stop and start it again on the same port to
make an outage; the registers keep their values across (as a real PLC's do).

Registers 0-199 exist, holding and input alike; reading past them gets Modbus exception 2
(illegal data address), as from a real PLC asked for a register it does not have.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from .support import free_port, port_open, wait_for

REGISTERS = 200
UNIT = 1
_FC = {"holding": 16, "input": 4}


class ModbusPlc:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.values: dict[str, list[int]] = {"holding": [0] * REGISTERS, "input": [0] * REGISTERS}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modbus-plc", daemon=True)
        self._thread.start()
        self._server: ModbusTcpServer | None = None
        self._task = None
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> ModbusPlc:
        def block(kind: str) -> list[SimData]:
            return [SimData(0, values=list(self.values[kind]), datatype=DataType.REGISTERS)]

        device = SimDevice(UNIT, simdata=([SimData(0, count=16, datatype=DataType.BITS)],
                                          [SimData(0, count=16, datatype=DataType.BITS)],
                                          block("holding"), block("input")))

        async def begin():
            self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
            self._task = asyncio.create_task(self._server.serve_forever())

        self._call(begin())
        wait_for(lambda: port_open(self.port), 10, what="the Modbus server to listen")
        return self

    def stop(self) -> None:
        if self._server is None:
            return

        async def end():
            await self._server.shutdown()

        self._call(end())
        self._server = None
        wait_for(lambda: not port_open(self.port), 10, what="the Modbus server to close")

    def set(self, kind: str, address: int, words: list[int]) -> None:
        """Registers from `address` on take these 16-bit words (now, and after a restart)."""
        self.values[kind][address:address + len(words)] = words
        if self._server is not None:
            self._call(self._server.async_setValues(UNIT, _FC[kind], address, words))

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
