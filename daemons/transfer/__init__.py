"""File transfer over MQTT (seed 000): iot-transfer-send, iot-transfer-recv, `iotctl send`.

protocol.py owns the wire format (docs/PROTOCOL.md); engine.py is the sending state machine;
sender.py and receiver.py are the daemons; journal.py their durable state; cli.py the iotctl
commands.
"""
