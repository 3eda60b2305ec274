"""MQTT 3.1.1 conformance, section 4.7: topic names, topic filters and how they match, for live
messages and for retained ones, black-box against a real iot-broker.

Each test subscribes one client per filter, publishes every topic of a table once, and
compares what each subscriber received with what the specification says must match."""

from __future__ import annotations

from tests.mqttraw import RawClient, check_each, client, collect_publishes, publish


def _check_matching(port: int, table: dict[str, list[str]], topics: list[str], retained: bool = False) -> None:
    """`table` maps a filter to the topics it must match, among `topics` (all published)."""
    p = client(port, "m-pub")
    subs: list[RawClient] = []
    try:
        if retained:
            for t in topics:
                p.send(publish(t, t.encode(), retain=True))
            assert p.is_open()
        for i, f in enumerate(table):
            subs.append(client(port, f"m-sub{i}", subs=[(f, 0)]))
        if not retained:
            for t in topics:
                p.send(publish(t, t.encode()))
            assert p.is_open()
        received = dict(zip(table, collect_publishes(subs)))

        def check(f):
            got = [m.topic for m in received[f]]
            assert all(m.payload == m.topic.encode() for m in received[f]), "topic changed on the way"
            assert sorted(got) == sorted(table[f]), f"filter {f!r} received {got}, want {table[f]}"

        check_each(table, check)
    finally:
        p.close()
        for s in subs:
            s.close()


TOPICS = ["sport", "sport/", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
          "sport/tennisX", "/finance", "finance", "a/b/c", "a//c", "$S/x", "$x/y", "$"]

MATCHING = {
    # '#' matches the parent level and any number of child levels [MQTT-4.7.1-2]
    "sport/tennis/#": ["sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking"],
    "sport/#": ["sport", "sport/", "sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking",
                "sport/tennisX"],
    # '#' alone matches everything not starting with '$' [MQTT-4.7.2-1]
    "#": [t for t in TOPICS if not t.startswith("$")],
    # '+' matches exactly one level, which may be empty [MQTT-4.7.1-3]
    "sport/+": ["sport/", "sport/tennis", "sport/tennisX"],
    "sport/+/player1": ["sport/tennis/player1"],
    "+": ["sport", "finance"],
    "+/+": ["sport/", "sport/tennis", "sport/tennisX", "/finance"],
    "/+": ["/finance"],
    "+/#": [t for t in TOPICS if not t.startswith("$")],
    "+/tennis/#": ["sport/tennis", "sport/tennis/player1", "sport/tennis/player1/ranking"],
    "a/+/c": ["a/b/c", "a//c"],
    # '$' topics are matched only by filters that start with the same literal level
    "+/x": [],
    "+/y": [],
    "$x/#": ["$x/y"],
    "$S/#": ["$S/x"],
    "$x/+": ["$x/y"],
    "$": ["$"],
    # no normalisation, exact comparison [MQTT-4.7.3-4]
    "sport/tennis/": [],
    "Sport": [],
    "a/b//c": [],
}


def test_mqtt_4_7_1_2_wildcard_matching_of_live_messages(broker):
    """[MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-4.7.2-1] [MQTT-3.3.2-3] '#' matches its parent level
    and every level below, '+' exactly one (possibly empty) level, at any position; topics
    starting with '$' are not matched by filters starting with a wildcard; each subscriber
    gets exactly the published topics its filter matches."""
    _check_matching(broker.port, MATCHING, TOPICS)


def test_mqtt_4_7_2_1_wildcard_matching_of_retained_messages(broker):
    """[MQTT-4.7.2-1] [MQTT-4.7.1-2] [MQTT-4.7.1-3] [MQTT-3.3.1-6] The same matching rules
    select the retained messages a new subscription receives, including not sending '$' topics
    to '#' or '+' filters."""
    _check_matching(broker.port, MATCHING, TOPICS, retained=True)


NORMALISATION_TOPICS = ["caf\u00e9", "cafe\u0301", "Case", "case", "a/b", "a//b", "a/b/", "/a/b", " a/b",
                        "a/b ", "\u00c5ngstr\u00f6m", "A\u030angstro\u0308m", "x\ufffdy", "x\u2028y"]


def test_mqtt_4_7_3_4_no_normalisation_when_matching(broker):
    """[MQTT-4.7.3-4] Topic names and filters are compared byte for byte: no case folding, no
    Unicode normalisation (NFC vs NFD), no collapsing or trimming of '/' or spaces, and no
    substitution of unusual characters; the delivered topic is the published one, unchanged."""
    _check_matching(broker.port, {t: [t] for t in NORMALISATION_TOPICS}, NORMALISATION_TOPICS)


def test_mqtt_4_7_2_1_sys_topics_not_matched_by_leading_wildcards(broker_factory):
    """[MQTT-4.7.2-1] The broker's own $SYS/broker/... statistics (sys_interval 0.5 s) reach a
    '$SYS/#' subscriber but never a '#' or '+/broker/#' subscriber, neither as retained
    messages when subscribing nor live."""
    b = broker_factory("sys_interval = 0.5\n")
    with client(b.port, "sys-hash", subs=[("#", 0), ("+/broker/#", 0)]) as h, \
            client(b.port, "sys-dollar", subs=[("$SYS/#", 0)]) as d:
        # The first live (not retained) one was published after both subscriptions existed.
        for _ in range(1000):
            m = d.recv_publish()
            assert m.topic.startswith("$SYS/broker/"), m.topic
            if not m.retain:
                break
        assert not m.retain, "no live $SYS message among the first 1000"
        h.expect_nothing(what="a leading wildcard matched a $SYS topic")


def test_mqtt_4_7_1_1_wildcards_allowed_in_filters_only(broker):
    """[MQTT-4.7.1-1] [MQTT-4.7.3-1] Wildcards are accepted in filters (SUBACK grants them)
    while the same strings as topic names close the connection (see
    test_conformance_publish::test_mqtt_3_3_2_2_wildcard_in_topic_name_closes); a one-character
    topic and filter are valid."""
    with client(broker.port, "short", subs=[("x", 0), ("+", 0), ("#", 0)]) as c, \
            client(broker.port, "shortpub") as p:
        p.publish_ok("x", b"1", qos=1, mid=4)
        assert c.recv_publish().topic == "x"

    def check(topic):
        with client(broker.port, "wcname") as c:
            c.send(publish(topic, b"x"))
            c.expect_closed()

    check_each(["+", "#"], check)
