"""iot-ingest and QoS 0: devices that send QoS 0 telemetry under sensors/ are common. A QoS 0
message is never acknowledged (a PUBACK for packet id 0 made the broker close the connection,
and a retained message brought it back on every reconnect: a loop without end, one DLQ entry
per turn). Now: the worker stays connected, a bad message makes exactly one DLQ entry, and a
retained one already in the DLQ is not added again when it comes back after a restart."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.test_ingest_worker import Node, publish, reading, start_ingest
from tests.support import wait_for

pytestmark = pytest.mark.slow


def mosquitto_pub(port: int, topic: str, payload: bytes, retain: bool) -> None:
    """The message as a device sends it: `mosquitto_pub -t sensors/x -m hello -r -q 0`."""
    argv = ["mosquitto_pub", "-p", str(port), "-t", topic, "-s" if payload else "-n", "-q", "0"] + (["-r"] if retain else [])
    subprocess.run(argv, input=payload, check=True, timeout=20)


def connects(proc) -> int:
    return proc.log().count("connected to broker")


@pytest.mark.parametrize("retain", [False, True], ids=["live", "retained"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_qos0_message_is_handled_once_and_the_worker_stays_connected(any_broker, daemon, tmp_path, retain, signed):
    node = Node(tmp_path, any_broker)
    try:
        payload = reading(0, run="q0") if signed else b"hello"
        if retain:  # there before the worker: it comes with the SUBSCRIBE
            mosquitto_pub(any_broker, "sensors/x", payload, retain=True)
        proc, _ = start_ingest(daemon, node)
        if not retain:
            mosquitto_pub(any_broker, "sensors/x", payload, retain=False)
        # A QoS 1 reading after it: the worker handles messages in order, so once this one
        # has landed the QoS 0 message was handled (and any reconnect it caused has begun).
        publish(any_broker, [reading(1, run="marker")])
        wait_for(lambda: "marker-1" in node.rows(), 30, 0.1, what="the marker row")
        publish(any_broker, [reading(2, run="marker")])
        wait_for(lambda: "marker-2" in node.rows(), 30, 0.1, what="the second marker row")

        def check() -> None:
            scan = node.dlq()
            if signed:
                assert "q0-0" in node.rows() and scan.entries == []
            else:
                assert [(e.topic, e.payload, e.retained) for e in scan.entries] == [("sensors/x", b"hello", retain)]

        check()
        assert connects(proc) == 1 and "disconnected from broker" not in proc.log(), proc.log()

        if retain:
            # A restart subscribes again and the broker sends the retained message again: it is
            # in the DLQ (or the database) already, and stays there once.
            proc.kill()
            proc2, _ = start_ingest(daemon, node)
            publish(any_broker, [reading(3, run="marker")])
            wait_for(lambda: "marker-3" in node.rows(), 30, 0.1, what="the marker row after the restart")
            check()
            assert connects(proc2) == 1 and "disconnected from broker" not in proc2.log(), proc2.log()
            mosquitto_pub(any_broker, "sensors/x", b"", retain=True)  # clear it
    finally:
        node.close()
