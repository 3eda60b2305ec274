"""Unit tests for the retained-message store."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemons.broker.retained import RetainedMessage, RetainedStore
from daemons.broker.topics import InvalidTopic, matches


def topics_of(messages) -> set[str]:
    return {m.topic for m in messages}


def test_mqtt_3_3_1_5_retained_message_is_stored_with_its_qos():
    """[MQTT-3.3.1-5] The server stores the retained message and its QoS."""
    store = RetainedStore()
    store.set("a/b", b"hello", 1)
    assert store.match("a/b") == [RetainedMessage("a/b", b"hello", 1)]
    assert len(store) == 1


def test_mqtt_3_3_1_5_new_retained_message_replaces_the_old():
    """[MQTT-3.3.1-5] [MQTT-3.3.1-7] A new retained message on a topic replaces the previous one."""
    store = RetainedStore()
    store.set("a/b", b"one", 2)
    store.set("a/b", b"two", 0)
    assert store.match("a/b") == [RetainedMessage("a/b", b"two", 0)]
    assert len(store) == 1


def test_mqtt_3_3_1_10_empty_payload_clears():
    """[MQTT-3.3.1-10] A retained PUBLISH with an empty payload removes the retained message."""
    store = RetainedStore()
    store.set("a/b", b"x", 1)
    store.set("a/c", b"y", 1)
    store.set("a/b", b"", 0)
    assert store.match("a/#") == [RetainedMessage("a/c", b"y", 1)]
    assert len(store) == 1


def test_mqtt_3_3_1_11_empty_payload_is_not_stored():
    """[MQTT-3.3.1-11] A zero-byte retained message is never stored."""
    store = RetainedStore()
    store.set("a/b", b"", 1)
    store.set("never/seen", b"", 0)
    assert len(store) == 0
    assert store.match("#") == []
    assert store._node_count() == 0


def test_delete_prunes_empty_nodes():
    store = RetainedStore()
    store.set("a/b/c", b"1", 0)
    store.set("a", b"2", 0)
    assert store._node_count() == 3
    store.set("a/b/c", b"", 0)
    assert store._node_count() == 1  # "a" still holds a message
    store.set("a", b"", 0)
    assert store._node_count() == 0


@pytest.fixture
def store() -> RetainedStore:
    store = RetainedStore()
    for topic in [
        "sport", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
        "sport/golf", "/finance", "finance", "a//c", "$SYS/broker/uptime", "$SYS", "x/$y",
    ]:
        store.set(topic, topic.encode(), 1)
    return store


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("sport", {"sport"}),
        ("sport/tennis/player1", {"sport/tennis/player1"}),
        ("nothing/here", set()),
        ("sport/#", {"sport", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking", "sport/golf"}),
        ("sport/tennis/player1/#", {"sport/tennis/player1", "sport/tennis/player1/ranking"}),
        ("sport/+", {"sport/tennis", "sport/golf"}),
        ("sport/tennis/+", {"sport/tennis/player1"}),
        ("+", {"sport", "finance"}),
        ("+/+", {"sport/tennis", "sport/golf", "/finance", "x/$y"}),
        ("/+", {"/finance"}),
        ("a/+/c", {"a//c"}),
        ("+/$y", {"x/$y"}),
        ("x/#", {"x/$y"}),
    ],
)
def test_mqtt_3_3_1_6_match_by_filter(store, topic_filter, expected):
    """[MQTT-3.3.1-6] A new subscription is sent every retained message whose topic matches."""
    assert topics_of(store.match(topic_filter)) == expected


def test_mqtt_4_7_2_1_dollar_topics_hidden_from_leading_wildcards(store):
    """[MQTT-4.7.2-1] "#" and "+" as first level do not match retained "$" topics."""
    assert not any(t.startswith("$") for t in topics_of(store.match("#")))
    assert topics_of(store.match("+/broker/uptime")) == set()
    assert topics_of(store.match("+")) == {"sport", "finance"}
    assert topics_of(store.match("$SYS/#")) == {"$SYS", "$SYS/broker/uptime"}
    assert topics_of(store.match("$SYS/+/uptime")) == {"$SYS/broker/uptime"}


def test_iteration_and_len(store):
    assert len(store) == 11
    assert len(list(store)) == 11
    assert all(isinstance(m, RetainedMessage) and m.payload == m.topic.encode() for m in store)


def test_set_and_match_check_their_input():
    store = RetainedStore()
    with pytest.raises(InvalidTopic):
        store.set("a/+", b"x", 0)
    with pytest.raises(InvalidTopic):
        store.match("a/#/b")
    with pytest.raises(ValueError):
        store.set("a", b"x", 3)
    assert len(store) == 0


def test_payload_is_copied_to_bytes():
    store = RetainedStore()
    payload = bytearray(b"abc")
    store.set("t", payload, 0)
    payload[0] = 0
    assert store.match("t")[0].payload == b"abc"


LEVELS = ["a", "b", "", "$x"]
topic_names = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
filter_levels = st.sampled_from([*LEVELS, "+"])
filters = st.one_of(
    st.lists(filter_levels, min_size=1, max_size=4).map("/".join),
    st.lists(filter_levels, max_size=3).map(lambda levels: "/".join([*levels, "#"])),
).filter(bool)


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(st.tuples(topic_names, st.binary(max_size=2), st.integers(0, 2)), max_size=25),
    probe=st.lists(filters, min_size=1, max_size=8),
)
def test_store_agrees_with_reference_matcher(writes, probe):
    store = RetainedStore()
    model: dict[str, RetainedMessage] = {}
    for topic, payload, qos in writes:
        store.set(topic, payload, qos)
        if payload:
            model[topic] = RetainedMessage(topic, payload, qos)
        else:
            model.pop(topic, None)
    assert len(store) == len(model)
    assert store.nbytes == sum(len(t.encode()) + len(m.payload) for t, m in model.items())
    assert sorted(store, key=lambda m: m.topic) == sorted(model.values(), key=lambda m: m.topic)
    for topic_filter in probe:
        got = store.match(topic_filter)
        assert len(got) == len(topics_of(got))  # each topic at most once
        assert sorted(got, key=lambda m: m.topic) == sorted(
            (m for t, m in model.items() if matches(topic_filter, t)), key=lambda m: m.topic
        )
    prefixes = {tuple(t.split("/")[:i]) for t in model for i in range(1, len(t.split("/")) + 1)}
    assert store._node_count() == len(prefixes)


def test_running_totals_follow_set_replace_and_delete_and_leave_sys_out_of_usage():
    """The byte total (UTF-8 topic + payload) is kept as messages come and go, so the core
    checks max_retained_bytes in O(1); usage() leaves the broker's own $SYS/ topics out."""
    store = RetainedStore()
    store.set("a/é", b"12345", 0)  # topic of 4 bytes
    assert (len(store), store.nbytes, store.usage()) == (1, 9, (1, 9))
    store.set("a/é", b"12", 1)  # replaced: the payload shrinks, the count stays
    assert (len(store), store.nbytes) == (1, 6)
    store.set("$SYS/broker/uptime", b"7 seconds", 0)
    assert (len(store), store.nbytes, store.usage()) == (2, 6 + 18 + 9, (1, 6))
    assert store.get("a/é") == RetainedMessage("a/é", b"12", 1)
    assert store.get("a") is None and store.get("a/é/x") is None
    store.set("a/é", b"", 0)
    store.set("a/none", b"", 0)  # deleting what is not there changes nothing
    assert (len(store), store.nbytes, store.usage()) == (1, 27, (0, 0))
