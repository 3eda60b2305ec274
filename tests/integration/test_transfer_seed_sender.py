"""A sender built from seed 000's text alone (tests/seedpeer.py) against our receiver
(`[transfer] wire = "seed-json"`): plain transfers through our broker and Mosquitto, file ids
of other shapes than ours, then the fault cases C1-C12 that concern this direction, injected as
in test_transfer_faults.py. Every test ends with the seed sender acknowledged (it exits 0) and
the file byte-identical, once, in our spool."""

from __future__ import annotations

import os
import queue
import re
import time

import pytest

from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient
from daemons.service import Log
from tests.support import wait_for

from .test_transfer_support import Pair, SeedSender, proxies, wait_received_from_seed  # noqa: F401 - fixtures

MiB = 1024 * 1024
PACED = ("--interval", "0.04")  # 64 chunks in about 2.5 s: time enough to hit a transfer mid-way


def seed_pair(daemon, root, port: int, *, recv_port: int | None = None, send_port: int | None = None,
              **transfer) -> tuple[Pair, SeedSender]:
    """Our receiver on `port` (or `recv_port`), seed senders on `port` (or `send_port`)."""
    pair = Pair(daemon, root, port, recv_port=recv_port, wire="seed-json", **transfer)
    return pair, SeedSender(daemon, root, send_port or port)


def test_files_and_ids_of_every_shape_reach_our_receiver(any_broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, any_broker)
    pair.wait_subscribed(pair.start_receiver())
    files = [("empty.bin", b"", ()), ("big.dat", os.urandom(MiB + 7), ()),
             ("exact.bin", os.urandom(4 * 16384), ("--file-id", "3f2b8c1e-9a4d-4e2f-8b7a-1c2d3e4f5a6b")),
             ("named.csv", os.urandom(1000), ("--file-id", "report-2026-12-02T10:00:00.csv"))]
    procs = [(seed.start(seed.file(name, data), *args), data) for name, data, args in files]
    ids = [wait_received_from_seed(pair, seed, proc, data) for proc, data in procs]
    assert ids[2:] == ["3f2b8c1e-9a4d-4e2f-8b7a-1c2d3e4f5a6b", "report-2026-12-02T10:00:00.csv"]
    assert "bad message" not in pair.logs(pair.receivers)


def test_an_id_our_receiver_cannot_take_is_logged_and_dropped(broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, broker.port)
    rx = pair.start_receiver()
    pair.wait_subscribed(rx)
    proc = seed.start(seed.file("x.bin", b"abc"), "--file-id", ".hidden", "--timeout", "1")
    assert proc.wait(15) == 1  # never acknowledged
    assert "bad message dropped" in rx.log() and not list(pair.rx.spool.glob("*hidden*")) and rx.running()


# --- the fault cases ----------------------------------------------------------------------------


def test_c1_our_receiver_killed_mid_transfer(broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, broker.port)
    pair.wait_subscribed(pair.start_receiver())
    data = os.urandom(MiB)
    proc = seed.start(seed.file("c1.bin", data), *PACED)
    wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks on our receiver's disk")
    pair.receivers[0].kill()
    kept = pair.rx.partial_chunks()
    second = pair.start_receiver()
    wait_received_from_seed(pair, seed, proc, data)
    assert f"received={kept} " in second.log()


def test_c2_seed_sender_killed_mid_transfer_and_started_again(mosquitto, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, mosquitto.port)
    pair.wait_subscribed(pair.start_receiver())
    data = os.urandom(MiB)
    path = seed.file("c2.bin", data)
    first = seed.start(path, *PACED)
    wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks on our receiver's disk")
    first.kill()
    second = seed.start(path)  # the same file, so the same id: everything again, at full speed
    assert seed.file_id(second) == seed.file_id(first)
    fid = wait_received_from_seed(pair, seed, second, data)
    m = re.search(rf"received name={fid} .*duplicates=(\d+)", pair.logs(pair.receivers))
    assert m and int(m.group(1)) >= 16, pair.logs(pair.receivers)  # what it had was not taken twice


@pytest.mark.parametrize("which, session", [("broker", False), ("mosquitto", True)],
                         ids=["ours-never-connected", "mosquitto-session-kept"])
def test_c3_our_receiver_offline_when_the_transfer_starts(request, daemon, tmp_path, which, session):
    pair, seed = seed_pair(daemon, tmp_path, request.getfixturevalue(which).port)
    if session:
        rx = pair.start_receiver()
        pair.wait_subscribed(rx)
        assert rx.stop() == 0
    data = os.urandom(300 * 1024)
    proc = seed.start(seed.file("c3.bin", data))
    wait_for(lambda: "all chunks published" in proc.log(), 10, what="the seed sender to publish everything")
    pair.start_receiver()
    wait_received_from_seed(pair, seed, proc, data)


def test_c4_seed_sender_offline_while_our_receiver_waits(broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, broker.port)
    pair.wait_subscribed(pair.start_receiver())
    statuses: queue.Queue = queue.Queue()
    spy = MqttClient(MqttConfig(port=broker.port), "spy-c4", log=Log("spy"),
                     subscriptions=[("iot/file/+/status", 1)], on_message=statuses.put)
    spy.start()
    try:
        assert spy.wait_connected(10) and spy.subscribed.wait(5)
        data = os.urandom(MiB)
        path = seed.file("c4.bin", data)
        first = seed.start(path, *PACED)
        wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks received")
        first.stop()  # SIGTERM: a seed sender has no graceful stop, it is simply gone
        while not statuses.empty():
            statuses.get_nowait()
        wait_for(lambda: statuses.qsize() >= 3, 5, what="our receiver asking while the sender is away")
        assert not (pair.rx.spool / seed.file_id(first)).exists()
        wait_received_from_seed(pair, seed, seed.start(path), data)
    finally:
        spy.stop()


def test_c5_lost_messages_both_ways(any_broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(any_broker)
    pair, seed = seed_pair(daemon, tmp_path, any_broker, send_port=proxy.port)
    pair.wait_subscribed(pair.start_receiver())
    # Not the first manifest: all the chunks behind it would be lost with it (C3 covers that).
    proxy.add("drop", r"/chunk$", first=3, every=10)
    proxy.add("drop", r"/chunk$", first=64)  # the last one: a lost tail shows no gap
    proxy.add("drop", r"/retry$", limit=1)
    proxy.add("drop", r"/status$", direction="down", limit=2)
    proxy.add("drop", r"/ack$", direction="down", limit=1)  # our receiver acks again on a meta
    data = os.urandom(MiB)
    fid = wait_received_from_seed(pair, seed, seed.start(seed.file("c5.bin", data)), data)
    assert proxy.actions["drop"] >= 11
    assert re.search(rf"received name={fid} .*retries=([89]|\d\d)", pair.logs(pair.receivers))


def test_c6_out_of_order_chunks(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, send_port=proxy.port)
    pair.wait_subscribed(pair.start_receiver())
    proxy.add("reorder", r"/chunk$", first=1, every=4, after=3)
    proxy.add("delay", r"/chunk$", first=30, limit=1, delay=0.3)
    data = os.urandom(MiB + 1234)
    wait_received_from_seed(pair, seed, seed.start(seed.file("c6.bin", data)), data)
    assert proxy.actions["reorder"] >= 16 and proxy.actions["delay"] == 1
    assert "chunk failed its hash" not in pair.logs(pair.receivers)


def test_c7_duplicates_both_ways(mosquitto, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(mosquitto.port)
    pair, seed = seed_pair(daemon, tmp_path, mosquitto.port, send_port=proxy.port)
    pair.wait_subscribed(pair.start_receiver())
    proxy.add("dup", r"/chunk$")
    proxy.add("dup", r"/(status|ack)$", direction="down")
    data = os.urandom(MiB)
    wait_received_from_seed(pair, seed, seed.start(seed.file("c7.bin", data)), data)


def test_c8_our_receiver_killed_before_its_ack_left(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, recv_port=proxy.port)
    pair.wait_subscribed(pair.start_receiver())
    proxy.add("hold", r"/ack$")
    data = os.urandom(200 * 1024)
    proc = seed.start(seed.file("c8.bin", data))
    fid = seed.file_id(proc)
    wait_for(lambda: (pair.rx.spool / fid).exists() and proxy.actions["hold"] >= 1, 15,
             what="file complete on disk, ack held")
    pair.receivers[0].kill()
    proxy.clear()
    assert proc.running()
    second = pair.start_receiver()
    wait_received_from_seed(pair, seed, proc, data)
    assert "completed file not acknowledged before the restart; acking now" in second.log()


def test_c9_seed_sender_killed_before_it_sees_the_ack(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, send_port=proxy.port)
    pair.wait_subscribed(pair.start_receiver())
    proxy.add("hold", r"/ack$", direction="down")
    data = os.urandom(200 * 1024)
    path = seed.file("c9.bin", data)
    first = seed.start(path)
    fid = seed.file_id(first)
    wait_for(lambda: (pair.rx.spool / fid).exists() and proxy.actions["hold"] >= 1, 15,
             what="file complete, ack held")
    first.kill()
    proxy.clear()
    wait_received_from_seed(pair, seed, seed.start(path), data)


def test_c10_slow_receiver_under_a_burst_of_unpaced_seed_senders(broker, daemon, tmp_path, proxies):  # noqa: F811
    # A seed sender does not pace itself: the broker's flow control and our receiver's manual
    # acks have to hold three of them at once, with our receiver reading slowly.
    proxy = proxies(broker.port)
    proxy.throttle("down", 800_000)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, recv_port=proxy.port)
    pair.wait_subscribed(pair.start_receiver())
    files = [os.urandom(320 * 1024) for _ in range(3)]
    procs = [seed.start(seed.file(f"burst-{i}.bin", data)) for i, data in enumerate(files)]
    for proc, data in zip(procs, files):
        wait_received_from_seed(pair, seed, proc, data, timeout=40)


def test_c12_network_split_heals(any_broker, daemon, tmp_path, proxies):  # noqa: F811
    ps, pr = proxies(any_broker), proxies(any_broker)
    pair, seed = seed_pair(daemon, tmp_path, any_broker, send_port=ps.port, recv_port=pr.port)
    pair.wait_subscribed(pair.start_receiver())
    data = os.urandom(MiB)
    proc = seed.start(seed.file("c12.bin", data), *PACED)
    wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks received")
    ps.cut()
    pr.cut()
    time.sleep(3.0)  # the split lasts: keep-alives run out on both sides
    progress = pair.rx.partial_chunks()
    time.sleep(0.5)
    assert pair.rx.partial_chunks() == progress, "data flowed through a cut network"
    ps.restore()
    pr.restore()
    wait_received_from_seed(pair, seed, proc, data)
    assert "disconnected from broker" in pair.logs(pair.receivers)
    assert proc.log().count("seed-sender: connected") >= 2
