"""Our sender (`[transfer] wire = "seed-json"`) against a receiver built from seed 000's text
alone (tests/seedpeer.py): plain transfers through our broker and Mosquitto, `iotctl send`,
then the fault cases C1-C12 that concern this direction, injected as in
test_transfer_faults.py. Every test ends with the file byte-identical in the seed receiver's
storage and exactly one completion on our side. Last, seed-json between two of ours and the
bytes it costs."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import time

import pytest

from daemons.config import MqttConfig
from daemons.mqttclient import MqttClient
from daemons.service import Log
from tests.support import BIN, wait_for

from .test_transfer_support import Pair, SeedReceiver, proxies, wait_sent_to_seed  # noqa: F401 - fixtures

MiB = 1024 * 1024
SLOW = 400_000  # bytes/s of file data; the hex doubles it on the wire


def seed_pair(daemon, root, port: int, *, recv_port: int | None = None, send_port: int | None = None,
              **transfer) -> tuple[Pair, SeedReceiver]:
    """Our sender on `port` (or `send_port`), the seed receiver on `port` (or `recv_port`)."""
    pair = Pair(daemon, root, port, send_port=send_port, wire="seed-json", **transfer)
    return pair, SeedReceiver(daemon, root, recv_port or port)


def start(pair: Pair, seed: SeedReceiver) -> None:
    seed.start()
    pair.wait_subscribed(pair.start_sender())


def test_files_of_every_size_reach_the_seed_receiver(any_broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, any_broker, max_parallel=3)
    start(pair, seed)
    files = {"empty.bin": b"", "exact.bin": os.urandom(4 * 16384), "one over.dat": os.urandom(16385),
             "big.bin": os.urandom(MiB + 7)}
    for name, data in files.items():
        pair.drop(name, data)
    for name, data in files.items():
        wait_sent_to_seed(pair, seed, name, data)
    assert "Traceback" not in seed.log()


def test_iotctl_send_follows_the_wire_setting(mosquitto, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, mosquitto.port)
    seed.start()
    f = tmp_path / "one.bin"
    f.write_bytes(os.urandom(200_000))
    r = subprocess.run([str(BIN / "iotctl"), "send", "--config", str(pair.tx.config), str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + seed.log()
    assert "sent one.bin" in r.stderr
    (fid,) = re.findall(r"seed-receiver: complete (\S+)", seed.log())
    assert (seed.storage / fid).read_bytes() == f.read_bytes()
    # --wire overrides the file: the binary format is nothing the seed receiver can read.
    r = subprocess.run([str(BIN / "iotctl"), "send", "--config", str(pair.tx.config), "--wire", "binary",
                        "--timeout", "2", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no answer from a receiver" in r.stderr, r.stderr


# --- the fault cases ----------------------------------------------------------------------------


def test_c1_seed_receiver_killed_mid_transfer(broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, broker.port, rate_limit=SLOW)
    start(pair, seed)
    data = os.urandom(MiB)
    pair.drop("c1.bin", data)
    wait_for(lambda: seed.chunks() >= 16, 15, what="a quarter of the chunks at the seed receiver")
    seed.procs[0].kill()
    kept = seed.chunks()
    second = seed.start()
    wait_sent_to_seed(pair, seed, "c1.bin", data)
    assert re.search(rf"seed-receiver: loaded \S+ received={kept} complete=False", second.log()), second.log()


def test_c2_our_sender_killed_mid_transfer(mosquitto, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, mosquitto.port, rate_limit=SLOW)
    start(pair, seed)
    data = os.urandom(MiB)
    pair.drop("c2.bin", data)
    wait_for(lambda: seed.chunks() >= 16, 15, what="a quarter of the chunks at the seed receiver")
    pair.senders[0].kill()
    second = pair.start_sender()
    fid = wait_sent_to_seed(pair, seed, "c2.bin", data)
    assert len(pair.tx.records("start")) == 1 and f"resuming transfer id={fid}" in second.log()
    assert seed.log().count("seed-receiver: complete") == 1


@pytest.mark.parametrize("which, session", [("broker", False), ("mosquitto", True)],
                         ids=["ours-never-connected", "mosquitto-session-kept"])
def test_c3_seed_receiver_offline_when_the_transfer_starts(request, daemon, tmp_path, which, session):
    pair, seed = seed_pair(daemon, tmp_path, request.getfixturevalue(which).port)
    if session:  # it was online once (clean session 0): the broker queues for it while it is away
        seed.start()
        seed.procs[0].stop()
    pair.wait_subscribed(pair.start_sender())
    data = os.urandom(300 * 1024)
    pair.drop("c3.bin", data)
    wait_for(lambda: pair.tx.records("start"), 10, what="the transfer to start")
    seed.start()
    wait_sent_to_seed(pair, seed, "c3.bin", data)


def test_c4_our_sender_offline_while_the_seed_receiver_waits(broker, daemon, tmp_path):
    pair, seed = seed_pair(daemon, tmp_path, broker.port, rate_limit=SLOW)
    start(pair, seed)
    statuses: queue.Queue = queue.Queue()
    spy = MqttClient(MqttConfig(port=broker.port), "spy-c4", log=Log("spy"),
                     subscriptions=[("iot/file/+/status", 1)], on_message=statuses.put)
    spy.start()
    try:
        assert spy.wait_connected(10) and spy.subscribed.wait(5)
        data = os.urandom(MiB)
        pair.drop("c4.bin", data)
        wait_for(lambda: seed.chunks() >= 16, 15, what="a quarter of the chunks at the seed receiver")
        assert pair.senders[0].stop() == 0
        while not statuses.empty():
            statuses.get_nowait()
        wait_for(lambda: statuses.qsize() >= 3, 5, what="the seed receiver asking while the sender is away")
        pair.start_sender()
        wait_sent_to_seed(pair, seed, "c4.bin", data)
    finally:
        spy.stop()


def test_c5_lost_messages_both_ways(any_broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(any_broker)
    pair, seed = seed_pair(daemon, tmp_path, any_broker, send_port=proxy.port)
    start(pair, seed)
    proxy.add("drop", r"/meta$", limit=1)
    proxy.add("drop", r"/chunk$", first=3, every=10)
    proxy.add("drop", r"/chunk$", first=64)  # the last one: a lost tail shows no gap
    proxy.add("drop", r"/retry$", limit=1)
    proxy.add("drop", r"/status$", direction="down", limit=2)
    proxy.add("drop", r"/ack$", direction="down", limit=1)  # the seed receiver acks again on a meta
    data = os.urandom(MiB)
    pair.drop("c5.bin", data)
    wait_sent_to_seed(pair, seed, "c5.bin", data)
    assert proxy.actions["drop"] >= 12


def test_c6_out_of_order_chunks(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, send_port=proxy.port)
    start(pair, seed)
    proxy.add("reorder", r"/chunk$", first=1, every=4, after=3)
    proxy.add("delay", r"/chunk$", first=30, limit=1, delay=0.3)
    data = os.urandom(MiB + 1234)
    pair.drop("c6.bin", data)
    wait_sent_to_seed(pair, seed, "c6.bin", data)
    assert proxy.actions["reorder"] >= 16 and proxy.actions["delay"] == 1
    assert "bad chunk" not in seed.log()


def test_c7_duplicates_both_ways(mosquitto, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(mosquitto.port)
    pair, seed = seed_pair(daemon, tmp_path, mosquitto.port, send_port=proxy.port)
    start(pair, seed)
    proxy.add("dup", r"/chunk$")
    proxy.add("dup", r"/(status|ack)$", direction="down")
    data = os.urandom(MiB)
    pair.drop("c7.bin", data)
    fid = wait_sent_to_seed(pair, seed, "c7.bin", data)
    time.sleep(0.5)  # a late duplicate ack must not complete it twice
    assert len([r for r in pair.tx.records("done") if r["id"] == fid]) == 1


def test_c8_seed_receiver_killed_before_its_ack_left(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, recv_port=proxy.port)
    start(pair, seed)
    proxy.add("hold", r"/ack$")
    data = os.urandom(200 * 1024)
    pair.drop("c8.bin", data)
    wait_for(lambda: "seed-receiver: complete" in seed.log() and proxy.actions["hold"] >= 1, 15,
             what="file complete at the seed receiver, its ack held")
    assert not pair.tx.records("done")
    seed.procs[0].kill()
    proxy.clear()
    second = seed.start()
    wait_sent_to_seed(pair, seed, "c8.bin", data)
    assert "seed-receiver: ack" in second.log()


def test_c9_our_sender_killed_before_it_sees_the_ack(broker, daemon, tmp_path, proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair, seed = seed_pair(daemon, tmp_path, broker.port, send_port=proxy.port)
    start(pair, seed)
    proxy.add("hold", r"/ack$", direction="down")
    data = os.urandom(200 * 1024)
    pair.drop("c9.bin", data)
    wait_for(lambda: "seed-receiver: complete" in seed.log() and proxy.actions["hold"] >= 1, 15,
             what="file complete at the seed receiver, its ack held")
    assert not pair.tx.records("done")
    pair.senders[0].kill()
    proxy.clear()
    pair.start_sender()
    wait_sent_to_seed(pair, seed, "c9.bin", data)
    assert (pair.tx.outbox / "sent" / "c9.bin").read_bytes() == data


def test_c10_slow_seed_receiver_under_a_burst_paces_our_sender(broker_factory, daemon, tmp_path,
                                                               proxies):  # noqa: F811
    # As in test_transfer_faults.py: a small per-client queue that an unpaced sender would overflow.
    b = broker_factory("max_inflight_messages = 4\nmax_queued_messages = 16\n")
    proxy = proxies(b.port)
    proxy.throttle("down", 800_000)  # 400 kB/s of file data once in hex
    pair, seed = seed_pair(daemon, tmp_path, b.port, recv_port=proxy.port, window=4, max_parallel=3)
    start(pair, seed)
    files = {f"burst-{i}.bin": os.urandom(320 * 1024) for i in range(3)}
    for name, data in files.items():
        pair.drop(name, data)
    for name, data in files.items():
        wait_sent_to_seed(pair, seed, name, data, timeout=40)
    assert "messages dropped" not in b.proc.log(), b.proc.log()


def test_c12_network_split_heals(any_broker, daemon, tmp_path, proxies):  # noqa: F811
    ps, pr = proxies(any_broker), proxies(any_broker)
    pair, seed = seed_pair(daemon, tmp_path, any_broker, send_port=ps.port, recv_port=pr.port, rate_limit=SLOW)
    start(pair, seed)
    data = os.urandom(MiB)
    pair.drop("c12.bin", data)
    wait_for(lambda: seed.chunks() >= 16, 15, what="a quarter of the chunks at the seed receiver")
    ps.cut()
    pr.cut()
    time.sleep(3.0)  # the split lasts: keep-alives run out on both sides
    progress = seed.chunks()
    time.sleep(0.5)
    assert seed.chunks() == progress, "data flowed through a cut network"
    ps.restore()
    pr.restore()
    wait_sent_to_seed(pair, seed, "c12.bin", data)
    assert "disconnected from broker" in pair.logs(pair.senders)
    assert seed.log().count("seed-receiver: connected") >= 2


# --- seed-json between two of ours --------------------------------------------------------------


def test_seed_json_between_our_daemons_keeps_names_and_costs_twice_the_bytes(broker, daemon, tmp_path,
                                                                             proxies):  # noqa: F811
    proxy = proxies(broker.port)
    pair = Pair(daemon, tmp_path, broker.port, send_port=proxy.port, wire="seed-json", chunk_size=262144,
                window=32).start()
    data = os.urandom(4 * MiB)
    pair.drop("wire report.bin", data)
    pair.wait_done("wire report.bin", data)  # the name travels in the manifest's extra field
    assert 2.0 * len(data) <= proxy.bytes["up"] + proxy.bytes["down"] <= 2.01 * len(data), proxy.bytes
