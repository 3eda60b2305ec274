"""iot-observer: one compact log line per factory message, a traffic view in the journal.

`journalctl -u iot-observer -f` shows topic, QoS, retain flag, size and a summary of the
payload of everything on factory/# (subscribed at QoS 1, so each message comes at the QoS it
was published with: telemetry 0, alarms and commands 1). A clean session: while it is down
nothing is kept for it, which is what seed 003's exercise 2 shows (QoS 0 telemetry missed).
"""

from __future__ import annotations

import sys

from .. import metrics, service
from ..metrics import Families
from ..mqttclient import MqttClient
from ..service import Service
from . import METRICS_OFFSET, as_role
from . import messages as M


def line(msg) -> str:
    try:
        topic = msg.topic
    except UnicodeDecodeError:
        topic = repr(msg._topic)
    return f"{topic} q{msg.qos} r{int(msg.retain)} {len(msg.payload)}B {M.summary(topic, msg.payload)}"


def serve(svc: Service) -> None:
    cfg = svc.config
    log = svc.log
    count = [0]

    def on_message(msg) -> None:  # paho's thread: a log line is all there is to do
        count[0] += 1
        log.info(line(msg))

    client = MqttClient(as_role(cfg.mqtt, cfg.factory.observer_username), "observer", log=log,
                        subscriptions=[(f"{M.PREFIX}/#", 1)], on_message=on_message)
    svc.status_fn = lambda: f"messages={count[0]}" + ("" if client.connected else " (broker not connected)")

    def families() -> Families:
        out = Families()
        out.counter("iot_observer_messages", "Factory messages seen.", count[0])
        out.gauge("iot_observer_broker_connected", "1 while connected to the broker.", client.connected)
        return out

    endpoint = metrics.serve(log, cfg.factory.metrics, "[factory] metrics", families,
                             index=METRICS_OFFSET["observer"])
    client.start()
    client.subscribed.wait(5)
    svc.ready(f"watching {M.PREFIX}/#")
    try:
        while svc.wait(1.0):
            pass
    finally:
        if endpoint is not None:
            endpoint.close()
        client.stop()


def main(argv=None) -> int:
    return service.run("iot-observer", "Logs one line per message on factory/# (topic, QoS, retain, size, payload "
                       "summary): `journalctl -u iot-observer -f` is a traffic view.", serve, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
