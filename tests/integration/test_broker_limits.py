"""iot-broker's limits against hostile or broken clients, each driven past its bound by a real
client over a real socket (etc/iot/iot.toml [broker]: max_topic_levels,
max_subscriptions_per_client, max_retained_messages/bytes, persistent_client_expiration,
max_connect_size, max_connection_rate, write_timeout). Each time: the broker stays up, a
client connected beside the offender keeps its service, the refusal is counted under
$SYS/broker/limits/... and logged, and where memory is the attack the broker's RSS stays
within a generous bound."""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time

from tests.mqttraw import (
    RawClient,
    assert_serves_new_client,
    client,
    connack,
    connect,
    frame,
    parse_publish,
    pingreq,
    puback,
    publish,
    string,
    subscribe,
    suback,
    u16,
    varint,
)
from tests.support import wait_for

MiB = 1024 * 1024
RSS_GROWTH = 100 * MiB  # generous: what the attacks below would take without their limit is far more


def rss(pid: int) -> int:
    """The process's resident set in bytes (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def sys_watch(port: int, name: str, client_id: str = "sys-watch") -> RawClient:
    """A client subscribed to $SYS/broker/limits/<name> (the broker publishes it every
    sys_interval; the config of each test sets 0.2 s, the sweep makes it about 1 s)."""
    return client(port, client_id, subs=[(f"$SYS/broker/limits/{name}", 0)])


def wait_value(watch: RawClient, want: int, timeout: float = 15.0) -> None:
    """Read the watched $SYS topic until it says `want` (each value comes again every
    sys_interval, so a wait ends as soon as the counter got there)."""
    deadline = time.monotonic() + timeout
    values: list[bytes] = []
    while time.monotonic() < deadline and len(values) < 1000:
        values.append(watch.recv_publish(timeout=max(0.1, deadline - time.monotonic())).payload)
        if values[-1] == b"%d" % want:
            return
    raise AssertionError(f"the counter went {values[-10:]}, never {want}")


def round_trip(sub: RawClient, pub: RawClient, topic: str, payload: bytes, mid: int) -> None:
    """`pub` publishes at QoS 1 and `sub` (subscribed to `topic` at QoS 1) receives it."""
    pub.publish_ok(topic, payload, qos=1, mid=mid)
    m = sub.recv_publish()
    assert (m.topic, m.payload) == (topic, payload)
    sub.send(puback(m.mid))


def test_topic_levels_past_max_are_refused_before_they_cost_memory(broker_factory):
    """Ten SUBSCRIBEs of a 65,535-level filter each (Mosquitto refuses those too) get 0x80 for
    that filter and the other filter of the same SUBSCRIBE granted; kept, they would have
    cost ~20 MiB each. A PUBLISH to a 201-level topic closes its connection unrouted. The
    broker's RSS barely moves, a neighbour keeps its service, and all 11 are counted."""
    b = broker_factory("sys_interval = 0.2\n")
    before = rss(b.proc.pid)
    with sys_watch(b.port, "topic_levels/refused") as watch, \
            client(b.port, "tl-sub", subs=[("tl/#", 1)]) as neighbour, client(b.port, "tl-pub") as pub:
        with client(b.port, "tl-deep") as c:
            for i in range(10):
                deep = f"{i}" + "/" * 65534
                assert deep.count("/") + 1 == 65535
                c.send(subscribe(i + 1, [(deep, 1), (f"tl/{i}", 1)]))
                c.expect(suback(i + 1, [0x80, 1]), what=f"SUBSCRIBE {i} of a 65,535-level filter")
            pub.publish_ok("tl/3", b"granted", qos=1, mid=1)
            for receiver in (neighbour, c):  # what was granted in those SUBSCRIBEs works
                m = receiver.recv_publish()
                assert (m.topic, m.payload) == ("tl/3", b"granted")
                receiver.send(puback(m.mid))
        grown = rss(b.proc.pid) - before
        assert grown < RSS_GROWTH, f"RSS grew by {grown / MiB:.0f} MiB for refused filters"
        with client(b.port, "tl-deep-pub") as c:
            c.send(publish("tl/" + "/".join("x" * 200), b"deep", qos=1, mid=1))  # 201 levels
            c.expect_closed(what="PUBLISH to a topic of 201 levels")
        neighbour.expect_nothing(what="the over-deep PUBLISH was routed")
        round_trip(neighbour, pub, "tl/y", b"after", 2)
        wait_value(watch, 11)
    assert_serves_new_client(b.port)
    log = b.proc.log()
    assert "subscription refused: too many topic levels" in log and "client=tl-deep " in log
    assert "topic has too many levels; closing connection" in log and "client=tl-deep-pub " in log
    assert "Traceback" not in log


def test_max_subscriptions_per_client_refuses_new_filters_but_not_a_resubscription(broker_factory):
    """With max_subscriptions_per_client = 3, a SUBSCRIBE of five filters gets three granted
    and two 0x80; subscribing again to a filter the session has replaces it and is granted;
    another client has its own three; only granted filters deliver."""
    b = broker_factory("sys_interval = 0.2\nmax_subscriptions_per_client = 3\n")
    with sys_watch(b.port, "subscriptions/refused") as watch, client(b.port, "ms-pub") as pub:
        with client(b.port, "ms-greedy") as g:
            g.send(subscribe(1, [(f"ms/{i}", 1) for i in range(5)]))
            g.expect(suback(1, [1, 1, 1, 0x80, 0x80]))
            g.send(subscribe(2, [("ms/0", 0), ("ms/9", 0)]))
            g.expect(suback(2, [0, 0x80]))
            with client(b.port, "ms-other", subs=[("ms/3", 1), ("ms/4", 1), ("ms/5", 1)]) as other:
                for i in (3, 4):
                    round_trip(other, pub, f"ms/{i}", b"%d" % i, i)
                pub.publish_ok("ms/1", b"1", qos=1, mid=9)
                assert g.recv_publish().payload == b"1"
                g.send(puback(1))
                g.expect_nothing(what="a refused filter delivered")
        wait_value(watch, 3)
    assert "subscription refused: max_subscriptions_per_client reached" in b.proc.log()


def retained_of(port: int, topic_filter: str, client_id: str) -> dict[str, bytes]:
    """What a new subscriber to `topic_filter` is sent as retained messages."""
    with client(port, client_id, subs=[(topic_filter, 0)]) as c:
        return {p.topic: p.payload for p in map(parse_publish, c.until_pingresp())}


def test_max_retained_messages_and_bytes_deliver_but_do_not_retain_past_the_bound(broker_factory):
    """max_retained_messages = 3, max_retained_bytes = 1000 (topic + payload): retained messages
    on five topics all reach a live subscriber, the first three are kept; a 2000-byte
    replacement is delivered and refused (the previous one stays); deleting one makes room.
    Each refusal is counted and logged, and the broker's own $SYS topics do not count."""
    b = broker_factory("sys_interval = 0.2\nmax_retained_messages = 3\nmax_retained_bytes = 1000\n")
    with sys_watch(b.port, "retained/refused") as watch, \
            client(b.port, "rt-live", subs=[("rt/#", 0)]) as live, client(b.port, "rt-pub") as pub:
        wait_value(watch, 0)  # the $SYS topics exist: had they counted, nothing would be retained
        for i in range(5):
            pub.publish_ok(f"rt/{i}", b"v%d" % i, qos=1, mid=i + 1, retain=True)
        pub.publish_ok("rt/0", b"x" * 2000, qos=1, mid=6, retain=True)
        got = [live.recv_publish() for _ in range(6)]
        assert [(m.topic, len(m.payload)) for m in got] == [
            ("rt/0", 2), ("rt/1", 2), ("rt/2", 2), ("rt/3", 2), ("rt/4", 2), ("rt/0", 2000)]
        assert retained_of(b.port, "rt/#", "rt-new1") == {"rt/0": b"v0", "rt/1": b"v1", "rt/2": b"v2"}
        pub.publish_ok("rt/1", b"", qos=1, mid=7, retain=True)  # a delete: always allowed
        pub.publish_ok("rt/3", b"v3", qos=1, mid=8, retain=True)
        assert retained_of(b.port, "rt/#", "rt-new2") == {"rt/0": b"v0", "rt/2": b"v2", "rt/3": b"v3"}
        wait_value(watch, 3)
    assert "retained message not kept" in b.proc.log()


def test_a_persistent_session_away_past_persistent_client_expiration_is_removed(broker_factory):
    """persistent_client_expiration = "2s": a persistent session whose client left, with a
    QoS 1 message queued for it, is removed (counted, logged) after 2 s: the client returns
    to no session and no message. A persistent client that stays connected keeps its own."""
    b = broker_factory('sys_interval = 0.2\npersistent_client_expiration = "2s"\n')
    with sys_watch(b.port, "sessions/expired") as watch, \
            client(b.port, "px-stay", clean=False, subs=[("px/t", 1)]) as stay, client(b.port, "px-pub") as pub:
        client(b.port, "px-gone", clean=False, subs=[("px/t", 1)]).disconnect()
        pub.publish_ok("px/t", b"queued", qos=1, mid=1)
        m = stay.recv_publish()
        stay.send(puback(m.mid))
        wait_value(watch, 1)
        with client(b.port, "px-gone", clean=False, session_present=False) as back:
            back.expect_nothing(what="a message of the expired session")
        round_trip(stay, pub, "px/t", b"stay", 2)
    log = b.proc.log()
    assert "persistent session expired" in log and "client=px-gone " in log and "dropped_messages=1" in log


def test_max_connect_size_bounds_packets_until_connect_is_accepted(broker_factory):
    """max_connect_size = 200: a 300-byte CONNECT, and the bare header of a 100 MB packet
    before any CONNECT, close their connections at once (counted, logged with the peer
    address); after an accepted CONNECT a 10 kB PUBLISH passes (max_packet_size applies)."""
    b = broker_factory("sys_interval = 0.2\nmax_connect_size = 200\n")
    with sys_watch(b.port, "connect_size/refused") as watch, client(b.port, "cs-sub", subs=[("cs/t", 0)]) as sub:
        with RawClient(b.port) as c:
            c.send(frame(0x10, string("MQTT") + b"\x04\x02" + u16(30) + string("c" * 290)))
            c.expect_closed(what="CONNECT of 300 bytes, max_connect_size 200")
        with RawClient(b.port) as c:
            c.send(b"\x10" + varint(100_000_000))
            c.expect_closed(what="header of a 100 MB packet before CONNECT")
        with client(b.port, "cs-pub") as pub:
            pub.send(publish("cs/t", b"p" * 10_000))
            assert sub.recv_publish().payload == b"p" * 10_000
        wait_value(watch, 2)
    assert "packet before CONNECT over max_connect_size" in b.proc.log()
    assert "peer=127.0.0.1:" in b.proc.log()


def try_connect(port: int, client_id: str) -> bool:
    """True if the broker accepts a CONNECT, False if it closes the connection first."""
    with RawClient(port) as c:
        try:
            c.send(connect(client_id))
        except OSError:
            return False  # reset already
        got = c.recv_exact(4)
        if got == connack(0):
            return True
        assert c.eof and not got, f"neither a CONNACK nor a close: {got!r}"
        return False


def test_max_connection_rate_aborts_connections_over_the_rate_from_one_address(broker_factory):
    """max_connection_rate = 2 (a burst of 10): of 40 connections opened as fast as possible
    from 127.0.0.1, those over the burst and the refill are closed at once, counted and
    logged; clients connected before keep their service, and once the bucket refills a new
    connection is accepted again."""
    b = broker_factory("sys_interval = 0.2\nmax_connection_rate = 2\n")
    with sys_watch(b.port, "connection_rate/refused") as watch, \
            client(b.port, "cr-sub", subs=[("cr/t", 1)]) as sub, client(b.port, "cr-pub") as pub:
        start = time.monotonic()
        results = [try_connect(b.port, f"cr-{i}") for i in range(40)]
        elapsed = time.monotonic() - start
        accepted, refused = results.count(True), results.count(False)
        assert refused, f"all {accepted} connections accepted in {elapsed:.2f}s"
        assert accepted <= 10 - 3 + 2 * elapsed + 1, (accepted, refused, elapsed)  # 3 tokens taken before
        round_trip(sub, pub, "cr/t", b"unaffected", 1)
        wait_value(watch, refused)
        wait_for(lambda: try_connect(b.port, "cr-again"), 10, interval=0.3,
                 what="a new connection once the bucket refilled")
    assert "connection refused: max_connection_rate exceeded" in b.proc.log()


def unacknowledged(s: socket.socket) -> int:
    """Bytes in our send queue the peer's kernel has not acknowledged yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def flood_pings(port: int, client_id: str, stall: float = 3.0, limit: int = 512 * MiB,
                timeout: float = 60.0) -> tuple[socket.socket, int, str]:
    """Connect as `client_id` and send PINGREQs as fast as the socket takes them, reading
    nothing. Stops once the broker has taken nothing for `stall` seconds: neither could we
    queue more nor did the broker's kernel acknowledge more of what we queued (TCP pushes
    back: the broker stopped reading us; a broker merely slow to read still takes some),
    when the broker resets the connection, after `limit` bytes or after `timeout`. Returns
    the socket, the bytes sent and why it stopped: "pushed back", "reset" or "not stopped".
    Our receive buffer is small, so what the broker writes to us piles up
    on its side, not in our kernel."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(connect(client_id))
    assert s.recv(4) == connack(0)
    s.setblocking(False)
    chunk = memoryview(pingreq() * 32768)  # 64 KiB
    pos = sent = 0
    deadline = time.monotonic() + timeout
    taken, since = -1, time.monotonic()  # what the broker's kernel acknowledged, and when it last moved
    while sent < limit and time.monotonic() < deadline:
        try:
            n = s.send(chunk[pos:])
        except (ConnectionResetError, BrokenPipeError):
            return s, sent, "reset"
        except BlockingIOError:
            if not select.select([], [s], [], 0.1)[1]:
                now, acked = time.monotonic(), sent - unacknowledged(s)
                if acked != taken:
                    taken, since = acked, now
                elif now - since > stall:
                    return s, sent, "pushed back"
            continue
        sent += n
        pos = (pos + n) % len(chunk)
        taken, since = -1, time.monotonic()
    return s, sent, "not stopped"


def test_a_client_that_never_reads_is_read_no_more_and_memory_stays_bounded(broker_factory):
    """A client sends PINGREQs in a tight loop and never reads the PINGRESPs. Past the output
    high-water mark the broker stops reading it, so TCP pushes back on the client long
    before the broker could pile up its answers; RSS stays bounded and a neighbour is served
    throughout."""
    b = broker_factory("sys_interval = 0.2\n")
    before = rss(b.proc.pid)
    with client(b.port, "nr-sub", subs=[("nr/t", 1)]) as sub, client(b.port, "nr-pub") as pub:
        s, sent, outcome = flood_pings(b.port, "nr-flood")
        try:
            assert outcome == "pushed back", \
                f"{outcome}: the broker read all {sent / MiB:.0f} MiB of PINGREQs from a client that reads nothing"
            grown = rss(b.proc.pid) - before
            assert grown < RSS_GROWTH, f"RSS grew by {grown / MiB:.0f} MiB after {sent / MiB:.0f} MiB of PINGREQs"
            round_trip(sub, pub, "nr/t", b"served", 1)
        finally:
            s.close()
        round_trip(sub, pub, "nr/t", b"after", 2)
    assert "Traceback" not in b.proc.log()


def test_write_timeout_disconnects_a_client_that_does_not_read(broker_factory):
    """write_timeout = 1.0: the PINGREQ flooder of the test above, once its output has stayed
    over the high-water mark for a second, is aborted (logged, counted); a client beside it
    keeps its service."""
    b = broker_factory("sys_interval = 0.2\nwrite_timeout = 1.0\n")
    with sys_watch(b.port, "write_timeout/closed") as watch, \
            client(b.port, "wt-sub", subs=[("wt/t", 1)]) as sub, client(b.port, "wt-pub") as pub:
        s, sent, outcome = flood_pings(b.port, "wt-flood")
        try:
            # Pushed back first, the broker's abort may come while we still wait to be sure.
            assert outcome in ("pushed back", "reset"), \
                f"{outcome}: the broker read all {sent / MiB:.0f} MiB from a client that reads nothing"
            wait_for(lambda: "client not reading its socket; closing" in b.proc.log(), 15,
                     what="the broker to close the client that does not read")
            s.setblocking(True)
            s.settimeout(10)
            closed = False
            for _ in range(10_000):  # what the broker wrote before the abort, then the reset
                try:
                    if not s.recv(65536):
                        closed = True
                        break
                except ConnectionResetError:
                    closed = True
                    break
            assert closed, "the connection is still open"
        finally:
            s.close()
        wait_value(watch, 1)
        round_trip(sub, pub, "wt/t", b"unaffected", 1)
    log = b.proc.log()
    assert "client=wt-flood " in log and "Traceback" not in log
