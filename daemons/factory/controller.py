"""iot-controller: reacts to the factory's alarms with commands, by the rules in [factory].

Subscribes to factory/alarms/# at QoS 1 as client id "controller" (user
[factory] controller_username). With `--session persistent` (the default from
[factory] controller_session) the broker keeps its subscription while it is down and
delivers the alarms raised meanwhile when it returns (seed 003, exercise 5); with `clean`
those are gone. Each alarm is matched against the `[[factory.rule]]` tables in order (the
first match wins) and the rule's command goes to factory/commands/controller/<device> at QoS 1.
"""

from __future__ import annotations

import fnmatch
import queue
import sys

import orjson

from .. import metrics, service
from ..config import RuleConfig
from ..metrics import Families
from ..mqttclient import MqttClient
from ..service import Service
from . import METRICS_OFFSET, as_role
from . import messages as M


def decide(rules: tuple[RuleConfig, ...], alarm: dict) -> RuleConfig | None:
    for r in rules:
        if (alarm.get("alarm") == r.on and fnmatch.fnmatchcase(str(alarm.get("device_id")), r.device)
                and fnmatch.fnmatchcase(str(alarm.get("sensor")), r.sensor)):
            return r
    return None


def serve(svc: Service) -> None:
    cfg = svc.config
    fc = cfg.factory
    session = svc.args.session or fc.controller_session
    inbox: queue.Queue = queue.Queue()
    client = MqttClient(as_role(cfg.mqtt, fc.controller_username), "controller", log=svc.log,
                        clean_session=session == "clean", subscriptions=[(f"{M.PREFIX}/alarms/#", 1)],
                        on_message=inbox.put)
    handled = sent = 0
    svc.status_fn = lambda: f"session={session} alarms={handled} commands={sent}" + (
        "" if client.connected else " (broker not connected)")

    def families() -> Families:
        out = Families()
        out.counter("iot_controller_alarms", "Alarm messages received.", handled)
        out.counter("iot_controller_commands", "Commands sent to devices.", sent)
        out.gauge("iot_controller_broker_connected", "1 while connected to the broker.", client.connected)
        return out

    endpoint = metrics.serve(svc.log, fc.metrics, "[factory] metrics", families, index=METRICS_OFFSET["controller"])
    client.start()
    client.subscribed.wait(5)
    svc.ready(f"{session} session, {len(fc.rule)} rules")
    try:
        while svc.wait(0):
            try:
                msg = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            handled += 1
            device = msg.topic.split("/")[2]
            try:
                alarm = orjson.loads(msg.payload)
                if not isinstance(alarm, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                svc.log.warning("alarm not understood", topic=msg.topic, error=str(e))
                continue
            alarm.setdefault("device_id", device)
            rule = decide(fc.rule, alarm)
            if rule is None:
                svc.log.info("alarm, no rule", topic=msg.topic, alarm=alarm.get("alarm"), value=alarm.get("value"))
                continue
            reason = (f"alarm {alarm.get('alarm')}: {alarm.get('sensor')} {alarm.get('value')} "
                      f"({alarm.get('level')} threshold {alarm.get('threshold')})")
            client.publish(M.command_topic("controller", device), M.command(rule.command, reason), 1)
            sent += 1
            svc.log.info("command sent", device=device, command=rule.command, reason=reason,
                         redelivered=int(msg.dup))
    finally:
        if endpoint is not None:
            endpoint.close()
        client.stop()


def add_arguments(p) -> None:
    p.add_argument("--session", choices=("persistent", "clean"),
                   help="persistent: alarms raised while the controller is down are delivered when it returns "
                        "(default from [factory] controller_session)")


def main(argv=None) -> int:
    return service.run("iot-controller", "Reacts to the factory's alarms (factory/alarms/#) with commands to the "
                       "devices, by the [[factory.rule]] tables.", serve, add_arguments=add_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
