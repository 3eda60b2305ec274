"""Seed 000's fault table, C1-C12, each injected for real: processes killed with SIGKILL or
stopped, packets dropped, duplicated, reordered, held or delayed by a proxy the daemons do not
control, connections cut. Every test ends with the file byte-identical in var/transfer and
exactly one completion on the sender's side (journal and log)."""

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

from .test_transfer_support import Pair, proxies  # noqa: F401 - fixtures

MiB = 1024 * 1024
SLOW = 400_000  # bytes/s: a 1 MiB file takes about 2.5 s, time enough to hit it mid-way


def test_c1_receiver_killed_mid_transfer_resumes_from_its_received_set(broker, daemon, tmp_path):
    pair = Pair(daemon, tmp_path, broker.port, rate_limit=SLOW).start()
    data = os.urandom(MiB)
    pair.drop("c1.bin", data)
    wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks on the receiver's disk")
    pair.receivers[0].kill()
    kept = pair.rx.partial_chunks()
    time.sleep(0.5)
    second = pair.start_receiver()
    pair.wait_done("c1.bin", data)
    m = re.search(r"resuming transfer .*received=(\d+)", second.log())
    assert m and int(m.group(1)) == kept >= 16, second.log()


def test_c2_sender_killed_mid_transfer_resumes_under_the_same_id(mosquitto, daemon, tmp_path):
    pair = Pair(daemon, tmp_path, mosquitto.port, rate_limit=SLOW).start()
    data = os.urandom(MiB)
    pair.drop("c2.bin", data)
    wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks on the receiver's disk")
    pair.senders[0].kill()
    time.sleep(0.5)
    second = pair.start_sender()
    pair.wait_done("c2.bin", data)
    (start,) = pair.tx.records("start")  # no second transfer of the same file
    assert f"resuming transfer id={start['id']}" in second.log()
    assert len(re.findall(r"iot-transfer-recv: received ", pair.logs(pair.receivers))) == 1
    assert (pair.tx.outbox / "sent" / "c2.bin").read_bytes() == data


@pytest.mark.parametrize("which, session", [("broker", False), ("mosquitto", True)],
                         ids=["ours-never-connected", "mosquitto-session-kept"])
def test_c3_receiver_offline_when_the_transfer_starts(request, daemon, tmp_path, which, session):
    port = request.getfixturevalue(which).port
    pair = Pair(daemon, tmp_path, port)
    if session:  # it was online once: the broker queues for it while it is away
        rx = pair.start_receiver()
        wait_for(lambda: "subscribed" in rx.log(), 10, what="receiver subscribed")
        assert rx.stop() == 0
    pair.start_sender()
    data = os.urandom(300 * 1024)
    pair.drop("c3.bin", data)
    wait_for(lambda: pair.tx.records("start"), 10, what="the transfer to start")
    time.sleep(1.0)
    assert not (pair.rx.spool / "c3.bin").exists()
    pair.start_receiver()
    pair.wait_done("c3.bin", data)


def test_c4_sender_offline_while_the_receiver_waits(broker, daemon, tmp_path):
    pair = Pair(daemon, tmp_path, broker.port, rate_limit=SLOW).start()
    statuses: queue.Queue = queue.Queue()
    spy = MqttClient(MqttConfig(port=broker.port), "spy-c4", log=Log("spy"),
                     subscriptions=[("iot/file/+/status", 1)], on_message=statuses.put)
    spy.start()
    try:
        assert spy.wait_connected(10) and spy.subscribed.wait(5)
        data = os.urandom(MiB)
        pair.drop("c4.bin", data)
        wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks received")
        assert pair.senders[0].stop() == 0  # the sender goes away (gracefully) mid-transfer
        while not statuses.empty():
            statuses.get_nowait()
        time.sleep(2.0)
        assert statuses.qsize() >= 3, "the receiver did not keep asking while the sender was away"
        assert not (pair.rx.spool / "c4.bin").exists()
        pair.start_sender()
        pair.wait_done("c4.bin", data)
    finally:
        spy.stop()


def test_c5_lost_messages_are_asked_for_and_sent_again(any_broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(any_broker)
    pair = Pair(daemon, tmp_path, any_broker, send_port=proxy.port).start()
    proxy.add("drop", r"/meta$", limit=1)  # the first announcement
    proxy.add("drop", r"/chunk$", first=3, every=10)  # chunks 2, 12, ... 62 of 64
    proxy.add("drop", r"/chunk$", first=64)  # the last one: a lost tail shows no gap
    proxy.add("drop", r"/retry$", limit=1)  # and the first copy sent again
    proxy.add("drop", r"/status$", direction="down", limit=2)
    proxy.add("drop", r"/ack$", direction="down", limit=1)  # the sender must still get one
    data = os.urandom(MiB)
    pair.drop("c5.bin", data)
    pair.wait_done("c5.bin", data)
    assert proxy.actions["drop"] >= 12
    assert pair.retries("c5.bin") >= 8


def test_c6_out_of_order_chunks_land_at_their_offset(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair = Pair(daemon, tmp_path, broker.port, send_port=proxy.port).start()
    proxy.add("reorder", r"/chunk$", first=1, every=4, after=3)  # 0 after 3, 4 after 7, ...
    proxy.add("delay", r"/chunk$", first=30, limit=1, delay=0.3)
    data = os.urandom(MiB + 1234)
    pair.drop("c6.bin", data)
    pair.wait_done("c6.bin", data)
    assert proxy.actions["reorder"] >= 16 and proxy.actions["delay"] == 1
    assert re.search(r"received name=c6.bin .* bad=0", pair.logs(pair.receivers))


def test_c7_duplicated_chunks_statuses_and_acks_are_harmless(mosquitto, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(mosquitto.port)
    pair = Pair(daemon, tmp_path, mosquitto.port, send_port=proxy.port).start()
    proxy.add("dup", r"/chunk$")  # every chunk twice
    proxy.add("dup", r"/(status|ack)$", direction="down")  # and every status and ack
    data = os.urandom(MiB)
    pair.drop("c7.bin", data)
    pair.wait_done("c7.bin", data)
    m = re.search(r"received name=c7.bin .*duplicates=(\d+)", pair.logs(pair.receivers))
    assert m and int(m.group(1)) >= 60, pair.logs(pair.receivers)
    time.sleep(0.5)  # a late duplicate ack must not complete it twice
    pair.assert_once("c7.bin")


def test_c8_receiver_killed_after_the_file_is_complete_but_before_the_ack(broker, daemon, tmp_path,
                                                                          proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair = Pair(daemon, tmp_path, broker.port, recv_port=proxy.port).start()
    proxy.add("hold", r"/ack$")  # the ack never reaches the broker, and is never PUBACKed
    data = os.urandom(200 * 1024)
    pair.drop("c8.bin", data)
    wait_for(lambda: (pair.rx.spool / "c8.bin").exists() and proxy.actions["hold"] >= 1, 15,
             what="file complete on disk, ack held")
    assert not pair.tx.records("done")
    pair.receivers[0].kill()
    proxy.clear()
    second = pair.start_receiver()
    pair.wait_done("c8.bin", data)
    assert "completed file not acknowledged before the restart; acking now" in second.log()
    assert sorted(p.name for p in pair.rx.spool.iterdir()) == [".partial", "c8.bin"]


def test_c9_sender_killed_before_it_sees_the_ack(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair = Pair(daemon, tmp_path, broker.port, send_port=proxy.port).start()
    proxy.add("hold", r"/ack$", direction="down")  # delivered by the broker, never seen by the sender
    data = os.urandom(200 * 1024)
    pair.drop("c9.bin", data)
    wait_for(lambda: (pair.rx.spool / "c9.bin").exists() and proxy.actions["hold"] >= 1, 15,
             what="file complete, ack held")
    assert not pair.tx.records("done")
    pair.senders[0].kill()
    proxy.clear()
    pair.start_sender()
    pair.wait_done("c9.bin", data)
    assert (pair.tx.outbox / "sent" / "c9.bin").read_bytes() == data
    assert not (pair.tx.outbox / "c9.bin").exists()


def test_c10_slow_receiver_under_a_burst_paces_the_sender(broker_factory, daemon, tmp_path, proxies):  # noqa: F811
    # A broker with a small per-client queue: a sender that did not pace itself on the
    # receiver's status would overflow it and the broker would drop (and log) messages.
    # 3 files x 20 chunks at once: unpaced, 60 chunks would meet room for 20.
    b = broker_factory("max_inflight_messages = 4\nmax_queued_messages = 16\n")
    proxy = proxies(b.port)
    proxy.throttle("down", 400_000)  # the receiver drinks slowly
    pair = Pair(daemon, tmp_path, b.port, recv_port=proxy.port, window=4, max_parallel=3).start()
    files = {f"burst-{i}.bin": os.urandom(320 * 1024) for i in range(3)}
    for name, data in files.items():
        pair.drop(name, data)
    for name, data in files.items():
        pair.wait_done(name, data, timeout=40)
    assert "messages dropped" not in b.proc.log(), b.proc.log()


def test_c12_network_split_heals(any_broker, daemon, tmp_path, proxies):  # noqa: F811
    ps, pr = proxies(any_broker), proxies(any_broker)
    pair = Pair(daemon, tmp_path, any_broker, send_port=ps.port, recv_port=pr.port, rate_limit=SLOW).start()
    data = os.urandom(MiB)
    pair.drop("c12.bin", data)
    wait_for(lambda: pair.rx.partial_chunks() >= 16, 15, what="a quarter of the chunks received")
    ps.cut()
    pr.cut()
    time.sleep(3.0)
    progress = pair.rx.partial_chunks()
    time.sleep(0.5)
    assert pair.rx.partial_chunks() == progress, "data flowed through a cut network"
    ps.restore()
    pr.restore()
    pair.wait_done("c12.bin", data)
    for procs in (pair.senders, pair.receivers):
        assert "disconnected from broker" in pair.logs(procs)
