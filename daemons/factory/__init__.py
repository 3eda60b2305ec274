"""The simulated factory of seed 003: devices, controller, observer, dashboard."""

from __future__ import annotations

import dataclasses

from ..config import MqttConfig


# [factory] metrics: each factory daemon's port is the key's port + its offset here.
METRICS_OFFSET = {"controller": 0, "observer": 1, "dashboard": 2, "devices": 3, "device": 4}


def as_role(mqtt: MqttConfig, username: str) -> MqttConfig:
    """[mqtt] for a factory role (controller, dashboard, observer): its own user name, which the
    ACL gives its rights to, with [mqtt]'s password (the installed broker has each role's user
    with the local daemons' password; a checkout's broker checks no password)."""
    return dataclasses.replace(mqtt, username=username) if username else mqtt
