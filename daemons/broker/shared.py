"""Shared subscriptions, `$share/GROUP/FILTER` (MQTT 5 section 4.8.2, accepted from MQTT 3.1.1
clients as EMQX, HiveMQ and Mosquitto do).

Theory of operation
===================

A group (one per GROUP and FILTER) is a single subscriber in the subscription tree, under
FILTER: the tree stays as it is and matching costs the same. When the tree names a group for a
message, the core asks `pick()` for one member, round robin, preferring a member that is
connected and has room in its window, then one that is connected and can queue it, then (only
when no member is connected) a persistent member that is away and can queue it. Each member
gets the message at min(published QoS, the QoS it was granted).

A message sent or queued through a group is tagged with it in the member's session
(`Outgoing.group`, the last field of a queue entry), so when the member leaves the group (UNSUBSCRIBE,
its connection ends, its clean session ends, it is taken over) the core can take back what it
has not acknowledged and hand it to another member: nothing acknowledged to its publisher is
lost. A QoS 2 message whose PUBREC came back stays: the member has it, only PUBREL/PUBCOMP
remain, and sending it to another member would deliver it twice.

Retained messages are never sent on a shared subscription [MQTT-4.8.2]. The ACL is checked on
FILTER, at SUBSCRIBE and for each message a member is picked for.
"""

from __future__ import annotations

PREFIX = "$share/"


class InvalidShare(ValueError):
    """`$share/...` that is not `$share/GROUP/FILTER` with a valid GROUP and a non-empty FILTER."""


def parse(topic_filter: str) -> tuple[str, str] | None:
    """(GROUP, FILTER) for a shared subscription, None for an ordinary filter. The whole string has
    passed the codec's filter check, so FILTER's wildcards are whole levels already; GROUP may
    still be a wildcard or empty."""
    if not topic_filter.startswith(PREFIX):
        return None
    parts = topic_filter.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise InvalidShare("no topic filter after the share name")
    group = parts[1]
    if not group or "+" in group or "#" in group:
        raise InvalidShare("the share name must be non-empty, without '+' or '#'")
    return group, parts[2]


class Group:
    """The members of one `$share/GROUP/FILTER`, in the order they joined, with their QoS."""

    __slots__ = ("name", "topic_filter", "members", "_next")

    def __init__(self, name: str, topic_filter: str):
        self.name, self.topic_filter = name, topic_filter
        self.members: dict = {}  # Session -> granted QoS
        self._next = 0

    def __repr__(self) -> str:
        return f"<Group $share/{self.name}/{self.topic_filter} members={len(self.members)}>"

    def pick(self, qos: int, allowed=None, exclude=None):
        """(member, granted QoS) for the next message at `qos`, or (None, 0) when no member can
        take it now. `allowed(session)` filters by ACL; `exclude` is a member that is leaving."""
        members = [s for s in self.members if s is not exclude and (allowed is None or allowed(s))]
        if not members:
            return None, 0
        n = len(members)
        start = self._next % n
        order = members[start:] + members[:start]
        online = [s for s in order if s.conn is not None]
        if qos == 0:
            # Not kept for an away member, and not queued behind a window: any connected one.
            ranked = [s for s in online if not s.conn.congested()] or online
        else:
            ranked = ([s for s in online if s.window_free()] or [s for s in online if s.can_take()]
                      or ([] if online else [s for s in order if not s.clean and s.can_take()]))
        if not ranked:
            return None, 0
        chosen = ranked[0]
        self._next = members.index(chosen) + 1
        granted = self.members[chosen]
        return chosen, granted if granted < qos else qos
