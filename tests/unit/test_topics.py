"""Unit tests for topic validation, matching and the subscription tree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.broker import topics as topics_module
from daemons.broker.packets import MalformedPacket, ProtocolError
from daemons.broker.topics import (
    InvalidTopic,
    SubscriptionTree,
    matches,
    validate_topic_filter,
    validate_topic_name,
)

# --- validation -----------------------------------------------------------------

VALID_FILTERS = [
    "+", "#", "/", "//", "a", "a/b/c", "a//b", "+/+/#", "/+", "+/", "a/+/#", "sport/tennis/#",
    "sport/+/player1", "$SYS/#", "$SYS/+/x", "a b/ c", "ü/漢/🙂", "\ufeff", "x" * 65535,
]
INVALID_FILTERS = [
    ("", "MQTT-4.7.3-1"),
    ("a/#/b", "MQTT-4.7.1-2"),
    ("a#", "MQTT-4.7.1-2"),
    ("#/", "MQTT-4.7.1-2"),
    ("##", "MQTT-4.7.1-2"),
    ("a/b#", "MQTT-4.7.1-2"),
    ("#/+", "MQTT-4.7.1-2"),
    ("a+", "MQTT-4.7.1-3"),
    ("+a", "MQTT-4.7.1-3"),
    ("++", "MQTT-4.7.1-3"),
    ("a/+b/c", "MQTT-4.7.1-3"),
    ("\x00", "MQTT-4.7.3-2"),
    ("a/\x00/b", "MQTT-4.7.3-2"),
    ("x" * 65536, "MQTT-4.7.3-3"),
    ("é" * 32768, "MQTT-4.7.3-3"),
]
VALID_NAMES = ["a", "/", "//", "a//b", "/a/", "$SYS/broker/uptime", " ", "a b", "ü/漢", "x" * 65535, "$"]
INVALID_NAMES = [
    ("", "MQTT-4.7.3-1"),
    ("+", "MQTT-4.7.1-1"),
    ("#", "MQTT-4.7.1-1"),
    ("a/+", "MQTT-4.7.1-1"),
    ("a/#", "MQTT-4.7.1-1"),
    ("a+b", "MQTT-4.7.1-1"),
    ("a\x00", "MQTT-4.7.3-2"),
    ("x" * 65536, "MQTT-4.7.3-3"),
]


@pytest.mark.parametrize("topic_filter", VALID_FILTERS, ids=lambda f: f[:20])
def test_valid_filters(topic_filter):
    validate_topic_filter(topic_filter)


@pytest.mark.parametrize(("topic_filter", "rule"), INVALID_FILTERS, ids=lambda v: str(v)[:20])
def test_mqtt_4_7_1_2_and_4_7_1_3_invalid_filters(topic_filter, rule):
    """[MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-4.7.3-1] [MQTT-4.7.3-2] [MQTT-4.7.3-3]
    Wildcards must be whole levels ("#" only last); filters are non-empty, NUL-free, at most 65535 bytes."""
    with pytest.raises(InvalidTopic) as info:
        validate_topic_filter(topic_filter)
    assert info.value.rule == rule


@pytest.mark.parametrize("name", VALID_NAMES, ids=lambda n: n[:20])
def test_valid_names(name):
    validate_topic_name(name)


@pytest.mark.parametrize(("name", "rule"), INVALID_NAMES, ids=lambda v: str(v)[:20])
def test_mqtt_4_7_1_1_invalid_names(name, rule):
    """[MQTT-4.7.1-1] [MQTT-4.7.3-1] [MQTT-4.7.3-2] [MQTT-4.7.3-3]
    Topic names have no wildcards, are non-empty, NUL-free and at most 65535 bytes."""
    with pytest.raises(InvalidTopic) as info:
        validate_topic_name(name)
    assert info.value.rule == rule


def test_invalid_topic_is_a_protocol_error():
    assert issubclass(InvalidTopic, MalformedPacket)
    assert issubclass(InvalidTopic, ProtocolError)


# --- matching ----------------------------------------------------------------------

MATCH_TABLE = [
    # section 4.7.1.2 examples
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    ("#", "a", True),
    ("a/#", "a/", True),
    ("a/#", "ab", False),
    ("a/b/#", "a", False),
    # section 4.7.1.3 examples
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "a", True),
    ("+/b", "/b", True),
    ("a/+/c", "a//c", True),
    ("a/+/c", "a/b/c/d", False),
    ("+/+/#", "a/b", True),
    ("+/+/#", "a", False),
    # exact levels, case-sensitive, no normalisation
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a/b", "/a/b", False),
    ("ACCOUNTS", "Accounts", False),
    ("a b", "a b", True),
    ("a b", "a  b", False),
    ("\ufeffa", "a", False),
    # "$" topics, section 4.7.2
    ("#", "$SYS/broker/uptime", False),
    ("+/broker/uptime", "$SYS/broker/uptime", False),
    ("+", "$SYS", False),
    ("$SYS/#", "$SYS/broker/uptime", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/+/uptime", "$SYS/broker/uptime", True),
    ("$SYS/broker/uptime", "$SYS/broker/uptime", True),
    ("a/+", "a/$x", True),
    ("a/#", "a/$x", True),
    ("+/x", "$/x", False),
    ("$", "$", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_TABLE)
def test_mqtt_4_7_1_2_matching_table(topic_filter, topic, expected):
    """[MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-4.7.3-4] The reference matcher and the tree agree with the spec's examples."""
    assert matches(topic_filter, topic) is expected
    tree = SubscriptionTree()
    tree.subscribe("s", topic_filter, 1)
    assert tree.match(topic) == ({"s": 1} if expected else {})


def test_mqtt_4_7_2_1_dollar_topics_hidden_from_leading_wildcards():
    """[MQTT-4.7.2-1] Filters starting with a wildcard do not match topics starting with "$"."""
    tree = SubscriptionTree()
    tree.subscribe("all", "#", 0)
    tree.subscribe("plus", "+/broker/uptime", 0)
    tree.subscribe("sys", "$SYS/#", 1)
    assert tree.match("$SYS/broker/uptime") == {"sys": 1}
    assert tree.match("x/broker/uptime") == {"all": 0, "plus": 0}


def test_mqtt_3_3_5_1_overlapping_subscriptions_deliver_once_at_max_qos():
    """[MQTT-3.3.5-1] Several matching filters of one client give one entry at the highest QoS."""
    tree = SubscriptionTree()
    tree.subscribe("c1", "a/+", 0)
    tree.subscribe("c1", "a/#", 2)
    tree.subscribe("c1", "a/b", 1)
    tree.subscribe("c1", "#", 0)
    tree.subscribe("c2", "+/b", 1)
    tree.subscribe("c2", "a/b", 0)
    assert tree.match("a/b") == {"c1": 2, "c2": 1}
    assert tree.match("a") == {"c1": 2}  # "a/#" matches its parent; "a/+" does not
    assert tree.match("x/b") == {"c1": 0, "c2": 1}
    assert tree.match("a/c") == {"c1": 2}
    assert len(tree) == 6


def test_mqtt_3_8_4_3_resubscribe_replaces_qos():
    """[MQTT-3.8.4-3] Subscribing again to the same filter replaces the subscription."""
    tree = SubscriptionTree()
    assert tree.subscribe("c", "a/+", 2) is True
    assert tree.subscribe("c", "a/+", 0) is False
    assert tree.match("a/x") == {"c": 0}
    assert len(tree) == 1
    assert tree.subscribe("d", "a/+", 1) is True  # another subscriber is a new subscription
    assert tree.match("a/x") == {"c": 0, "d": 1}


def test_mqtt_3_10_4_1_unsubscribe_compares_filters_literally():
    """[MQTT-3.10.4-1] Only a filter equal character by character is removed."""
    tree = SubscriptionTree()
    tree.subscribe("c", "a/b", 1)
    tree.subscribe("c", "a/+", 1)
    assert tree.unsubscribe("c", "a/#") is False
    assert tree.unsubscribe("c", "A/b") is False
    assert tree.unsubscribe("other", "a/b") is False
    assert tree.unsubscribe("c", "a/+") is True
    assert tree.unsubscribe("c", "a/+") is False
    assert tree.match("a/b") == {"c": 1}
    assert tree.match("a/x") == {}
    assert len(tree) == 1


def test_unsubscribe_prunes_empty_nodes():
    tree = SubscriptionTree()
    tree.subscribe("c", "a/b/c/d", 0)
    tree.subscribe("c", "a/b", 0)
    tree.subscribe("d", "a/b/c/d", 0)
    assert tree._node_count() == 4
    tree.unsubscribe("c", "a/b/c/d")
    assert tree._node_count() == 4  # "d" still holds that filter
    tree.unsubscribe("d", "a/b/c/d")
    assert tree._node_count() == 2  # "a/b" is still in use
    tree.unsubscribe("c", "a/b")
    assert tree._node_count() == 0
    assert len(tree) == 0 and tree.match("a/b") == {}


def test_unsubscribe_all_uses_the_reverse_index():
    tree = SubscriptionTree()
    for f in ("a", "a/+", "#", "$SYS/#"):
        tree.subscribe("gone", f, 1)
    tree.subscribe("stays", "a", 0)
    assert tree.filters("gone") == {"a", "a/+", "#", "$SYS/#"}
    tree.unsubscribe_all("gone")
    tree.unsubscribe_all("never-subscribed")
    assert tree.filters("gone") == frozenset()
    assert len(tree) == 1
    assert tree.match("a") == {"stays": 0}
    assert tree._node_count() == 1


def test_subscribe_checks_its_input():
    tree = SubscriptionTree()
    with pytest.raises(InvalidTopic):
        tree.subscribe("c", "a/#/b", 0)
    with pytest.raises(ValueError):
        tree.subscribe("c", "a", 3)
    assert len(tree) == 0 and tree._node_count() == 0


def test_subscribers_are_any_hashable():
    tree = SubscriptionTree()
    key = ("client", 7)
    tree.subscribe(key, "x", 1)
    tree.subscribe(7, "x", 2)
    assert tree.match("x") == {key: 1, 7: 2}


# --- property: the tree agrees with the reference matcher --------------------------

LEVELS = ["a", "b", "", "$x", "A"]
filter_levels = st.sampled_from([*LEVELS, "+"])
filters = st.one_of(
    st.lists(filter_levels, min_size=1, max_size=4).map("/".join),
    st.lists(filter_levels, max_size=3).map(lambda levels: "/".join([*levels, "#"])),
).filter(bool)
topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 3), filters, st.integers(0, 2)), min_size=1, max_size=30
)


@settings(max_examples=200, deadline=None)
@given(ops=operations, probe=st.lists(topics, min_size=1, max_size=10))
def test_tree_agrees_with_reference_matcher(ops, probe):
    tree = SubscriptionTree()
    model: dict[tuple[int, str], int] = {}
    for is_subscribe, subscriber, topic_filter, qos in ops:
        if is_subscribe:
            assert tree.subscribe(subscriber, topic_filter, qos) is ((subscriber, topic_filter) not in model)
            model[(subscriber, topic_filter)] = qos
        else:
            assert tree.unsubscribe(subscriber, topic_filter) is ((subscriber, topic_filter) in model)
            model.pop((subscriber, topic_filter), None)
    assert len(tree) == len(model)
    for topic in probe:
        expected: dict[int, int] = {}
        for (subscriber, topic_filter), qos in model.items():
            if matches(topic_filter, topic):
                expected[subscriber] = max(qos, expected.get(subscriber, -1))
        assert tree.match(topic) == expected
    # Pruning keeps exactly the nodes on the path of some live filter.
    prefixes = {tuple(f.split("/")[:i]) for _, f in model for i in range(1, len(f.split("/")) + 1)}
    assert tree._node_count() == len(prefixes)


def test_match_results_follow_every_subscribe_and_unsubscribe():
    """match() remembers its result per topic; any change to the tree must show at once."""
    tree = SubscriptionTree()
    assert tree.match("a/b") == {}
    tree.subscribe("s1", "a/+", 1)
    assert tree.match("a/b") == {"s1": 1}
    tree.subscribe("s2", "#", 0)
    tree.subscribe("s1", "a/b", 2)  # a second filter of s1: the highest QoS wins
    assert tree.match("a/b") == {"s1": 2, "s2": 0}
    tree.unsubscribe("s1", "a/b")
    assert tree.match("a/b") == {"s1": 1, "s2": 0}
    tree.unsubscribe_all("s1")
    assert tree.match("a/b") == {"s2": 0}
    tree.unsubscribe("s2", "#")
    assert tree.match("a/b") == {}


def test_match_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(topics_module, "MATCH_CACHE_SIZE", 10)
    tree = SubscriptionTree()
    tree.subscribe("s", "t/+", 1)
    for i in range(25):
        assert tree.match(f"t/{i}") == {"s": 1}
    assert len(tree._cache) <= 10
