"""Retained messages (MQTT 3.1.1 section 3.3.1.3).

Theory of operation
===================

The store keeps at most one message per topic: a new retained PUBLISH
replaces the old one [MQTT-3.3.1-5] and one with an empty payload deletes it
and is not itself stored [MQTT-3.3.1-10], [MQTT-3.3.1-11].

Messages hang off a trie keyed by topic level, the mirror image of the
subscription tree: there the stored keys hold the wildcards and the lookup is
a plain topic, here the stored keys are plain topics and the lookup is a
filter.  A new subscription walks the trie by its filter, so a filter without
wildcards costs one lookup per level, "+" fans out over one level's children
and "#" collects a whole subtree; topics outside the filter are never visited.
As with subscriptions, a filter starting with a wildcard does not see topics
starting with "$" [MQTT-4.7.2-1].

Empty nodes are pruned on delete, so the trie's size follows the number of
retained topics rather than the history of topics ever retained.

The store keeps running totals of its messages and their bytes (UTF-8 topic plus
payload), also apart for the broker's own "$SYS/" topics, so that the core can
check the configured bounds (max_retained_messages, max_retained_bytes) in O(1)
before it adds a message; `usage()` leaves "$SYS/" out of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator

from .packets import validate_topic_filter, validate_topic_name

__all__ = ["RetainedMessage", "RetainedStore"]


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    """A retained Application Message and the QoS it was published with; an MQTT 5.0 one also
    with the properties it carries on (encoded, sessions.Message.props) and when its Message
    Expiry Interval ends (the broker's clock; None: never)."""

    topic: str
    payload: bytes
    qos: int
    props: bytes = b""
    expires: float | None = None


class _Node:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.message: RetainedMessage | None = None


def _collect_subtree(node: _Node, out: list[RetainedMessage], skip_dollar: bool) -> None:
    stack = [node]
    while stack:
        node = stack.pop()
        if node.message is not None:
            out.append(node.message)
        if skip_dollar:
            stack.extend(child for key, child in node.children.items() if not key.startswith("$"))
            skip_dollar = False
        else:
            stack.extend(node.children.values())


class RetainedStore:
    """Retained messages by topic, queried by topic filter."""

    __slots__ = ("_root", "_count", "_bytes", "_sys_count", "_sys_bytes")

    def __init__(self) -> None:
        self._root = _Node()
        self._count = 0
        self._bytes = 0
        self._sys_count = 0  # of these, "$SYS/" topics: the broker's statistics
        self._sys_bytes = 0

    def _account(self, topic: str, count: int, nbytes: int) -> None:
        self._count += count
        self._bytes += nbytes
        if topic.startswith("$SYS/"):
            self._sys_count += count
            self._sys_bytes += nbytes

    def set(self, topic: str, payload: bytes, qos: int, props: bytes = b"", expires: float | None = None) -> None:
        """Retain ``payload`` on ``topic``; an empty payload deletes instead."""
        validate_topic_name(topic)
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
        if not payload:
            self._delete(topic)
            return
        node = self._root
        for level in topic.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        old = node.message
        if old is None:
            self._account(topic, 1, len(topic.encode()) + len(payload))
        else:
            self._account(topic, 0, len(payload) - len(old.payload))
        node.message = RetainedMessage(topic, bytes(payload), qos, props, expires)

    def _delete(self, topic: str) -> None:
        levels = topic.split("/")
        path = [self._root]
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        old = path[-1].message
        if old is None:
            return
        path[-1].message = None
        self._account(topic, -1, -(len(topic.encode()) + len(old.payload)))
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.message is not None or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def get(self, topic: str) -> RetainedMessage | None:
        """The message retained on exactly ``topic``, if any (no validation: a lookup)."""
        node: _Node | None = self._root
        for level in topic.split("/"):
            node = node.children.get(level)
            if node is None:
                return None
        return node.message

    def usage(self) -> tuple[int, int]:
        """(messages, bytes of topics and payloads) retained, not counting "$SYS/" topics."""
        return self._count - self._sys_count, self._bytes - self._sys_bytes

    @property
    def nbytes(self) -> int:
        """Bytes of every retained topic (UTF-8) and payload."""
        return self._bytes

    def match(self, topic_filter: str) -> list[RetainedMessage]:
        """Every retained message whose topic matches ``topic_filter``."""
        validate_topic_filter(topic_filter)
        levels = topic_filter.split("/")
        last = len(levels)
        out: list[RetainedMessage] = []
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == last:
                if node.message is not None:
                    out.append(node.message)
                continue
            level = levels[depth]
            if level == "#":
                # "#" takes the parent level too ("a/#" matches "a"); at the
                # root there is no parent, only the "$" rule.
                _collect_subtree(node, out, skip_dollar=depth == 0)
            elif level == "+":
                for key, child in node.children.items():
                    if depth or not key.startswith("$"):
                        stack.append((child, depth + 1))
            else:
                child = node.children.get(level)
                if child is not None:
                    stack.append((child, depth + 1))
        return out

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[RetainedMessage]:
        """Every retained message, in no particular order."""
        out: list[RetainedMessage] = []
        _collect_subtree(self._root, out, skip_dollar=False)
        return iter(out)

    def _node_count(self) -> int:
        """Nodes below the root; lets tests check that pruning happens."""
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count
