"""File transfer over MQTT (seed 000): iot-transfer-send, iot-transfer-recv, `iotctl send`.

protocol.py owns the wire format (docs/PROTOCOL.md) and seedjson.py the seed's own JSON
format beside it; engine.py is the sending state machine; sender.py and receiver.py are the
daemons; journal.py their durable state; cli.py the iotctl commands.
"""

from types import ModuleType

from . import protocol, seedjson

CODECS = {"binary": protocol, "seed-json": seedjson}
WIRES = tuple(CODECS)


def codec(wire: str) -> ModuleType:
    """The codec for `[transfer] wire`, the one place that reads the setting: two modules
    with the same functions over the same protocol.py values."""
    return CODECS[wire]
