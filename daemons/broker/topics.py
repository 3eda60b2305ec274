"""Topic matching and the subscription tree (MQTT 3.1.1 section 4.7).

Theory of operation
===================

A topic is a list of levels separated by "/"; a filter is the same with two
wildcards, "+" for exactly one level (which may be empty) and "#" for the
parent level and everything below it.  Levels are compared exactly, with no
normalisation [MQTT-4.7.3-4], and a leading "/" makes an empty first level.
Topics starting with "$" are not matched by a filter whose first level is a
wildcard [MQTT-4.7.2-1], so "#" does not see "$SYS/..." but "$SYS/#" does.

``matches`` is the plain reference definition.  ``SubscriptionTree`` stores
filters in a trie keyed by level, with "+" and "#" as ordinary keys.  Matching
a topic walks the trie once: at each level it follows the literal child, the
"+" child and takes the "#" child's subscribers outright, so the cost depends
on the topic's depth and on how many filters can match it, never on the total
number of subscriptions.  A subscriber's subscriptions are also indexed by
subscriber, so a disconnecting client can drop them all without the caller
keeping its own list.

There is no match cache: fan-out already costs a dict lookup per level, and
every subscribe or unsubscribe would have to invalidate it.

Topic syntax checks live in ``packets`` (they decide whether a packet is well
formed) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Hashable

from .packets import InvalidTopic, validate_topic_filter, validate_topic_name

__all__ = [
    "InvalidTopic",
    "SubscriptionTree",
    "matches",
    "validate_topic_filter",
    "validate_topic_name",
]


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic_filter`` matches the topic name ``topic``.

    Both are assumed valid; this is the reference the tree is tested against.
    """
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


MATCH_CACHE_SIZE = 10_000


class _Node:
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subscribers: dict[Hashable, int] = {}


def _take_max(result: dict[Hashable, int], subscribers: dict[Hashable, int]) -> None:
    # Overlapping subscriptions deliver once, at the highest QoS [MQTT-3.3.5-1].
    for subscriber, qos in subscribers.items():
        if result.get(subscriber, -1) < qos:
            result[subscriber] = qos


class SubscriptionTree:
    """Subscriptions split by level into a trie.

    Never scans every subscription for a message.  A subscriber is any
    hashable value (a session object, a client id); the tree holds at most one
    subscription per (subscriber, filter) pair.
    """

    __slots__ = ("_root", "_by_subscriber", "_count", "_cache")

    def __init__(self) -> None:
        self._root = _Node()
        self._by_subscriber: dict[Hashable, set[str]] = {}
        self._count = 0
        # topic -> match() result. Sensors publish on a few topics over and over, and a walk
        # through `+` levels costs a dict per level and node: remembered until the tree changes.
        self._cache: dict[str, dict[Hashable, int]] = {}

    def subscribe(self, subscriber: Hashable, topic_filter: str, qos: int) -> bool:
        """Add or update a subscription.

        Returns True if it is new, False if it replaced the subscriber's
        existing subscription to that exact filter [MQTT-3.8.4-3].
        Raises InvalidTopic for a bad filter and ValueError for a bad QoS.
        """
        validate_topic_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {qos!r}")
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        is_new = subscriber not in node.subscribers
        node.subscribers[subscriber] = qos
        self._cache.clear()
        if is_new:
            self._by_subscriber.setdefault(subscriber, set()).add(topic_filter)
            self._count += 1
        return is_new

    def unsubscribe(self, subscriber: Hashable, topic_filter: str) -> bool:
        """Remove one subscription; True if it existed.

        The filter is compared character by character with the stored ones,
        wildcards included [MQTT-3.10.4-1].  Nodes left empty are pruned so
        the tree does not grow with churn.
        """
        path = [self._root]
        for level in topic_filter.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        if path[-1].subscribers.pop(subscriber, None) is None:
            return False
        self._cache.clear()
        self._count -= 1
        filters = self._by_subscriber[subscriber]
        filters.discard(topic_filter)
        if not filters:
            del self._by_subscriber[subscriber]
        levels = topic_filter.split("/")
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]
        return True

    def unsubscribe_all(self, subscriber: Hashable) -> None:
        """Remove every subscription of ``subscriber`` (uses the reverse index)."""
        for topic_filter in list(self._by_subscriber.get(subscriber, ())):
            self.unsubscribe(subscriber, topic_filter)

    def filters(self, subscriber: Hashable) -> frozenset[str]:
        """The filters ``subscriber`` is currently subscribed to."""
        return frozenset(self._by_subscriber.get(subscriber, ()))

    def match(self, topic: str) -> dict[Hashable, int]:
        """Subscribers whose filters match ``topic``, each with its highest QoS. The dict is
        shared by every call for that topic until the next (un)subscribe: do not change it."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        if len(self._cache) >= MATCH_CACHE_SIZE:
            self._cache.clear()  # many distinct topics: start over rather than track age
        result = self._cache[topic] = self._match(topic)
        return result

    def _match(self, topic: str) -> dict[Hashable, int]:
        result: dict[Hashable, int] = {}
        levels = topic.split("/")
        # A "$" topic hides the root's wildcard children [MQTT-4.7.2-1].
        root = self._root
        if topic.startswith("$"):
            node = root.children.get(levels[0])
            nodes = [node] if node is not None else []
            levels = levels[1:]
        else:
            nodes = [root]
        for level in levels:
            if not nodes:
                return result
            next_nodes = []
            for node in nodes:
                children = node.children
                if not children:
                    continue
                child = children.get("#")
                if child is not None:
                    _take_max(result, child.subscribers)
                child = children.get("+")
                if child is not None:
                    next_nodes.append(child)
                child = children.get(level)
                if child is not None:
                    next_nodes.append(child)
            nodes = next_nodes
        for node in nodes:
            _take_max(result, node.subscribers)
            # "sport/#" also matches "sport" itself [MQTT-4.7.1-2].
            child = node.children.get("#")
            if child is not None:
                _take_max(result, child.subscribers)
        return result

    def __len__(self) -> int:
        """The number of (subscriber, filter) subscriptions."""
        return self._count

    def _node_count(self) -> int:
        """Nodes below the root; lets tests check that pruning happens."""
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return count
