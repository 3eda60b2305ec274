"""The DLQ on disk: append + fsync, torn tails, binary payloads, removal around the active segment."""

import fcntl
import os

from daemons.ingest import dlq


def items(n: int, reason: str = "bad-signature", payload: bytes = b"x"):
    return [(reason, f"detail {i}", f"sensors/{i}", payload + str(i).encode(), None, False) for i in range(n)]


def test_entries_round_trip_with_text_and_binary_payloads(tmp_path):
    w = dlq.Writer(tmp_path)
    w.append([("bad-json", "d", "t/a", b'{"not": json', "m-1", False),
              ("bad-envelope", "d", "t/b", b"\xff\x00\xfe", None, False)])
    w.close()
    scan = dlq.read_all(tmp_path)
    a, b = scan.entries
    assert (a.reason, a.topic, a.payload, a.msg_id) == ("bad-json", "t/a", b'{"not": json', "m-1")
    assert (b.payload, b.msg_id) == (b"\xff\x00\xfe", None)
    line = next(tmp_path.glob("*.jsonl")).read_bytes().splitlines()[1]
    assert b'"payload_b64":"/wD+"' in line and b'"payload":null' in line
    assert a.id != b.id


def test_a_torn_last_line_is_skipped_and_earlier_entries_survive(tmp_path):
    w = dlq.Writer(tmp_path)
    w.append(items(3))
    seg = next(tmp_path.glob("*.jsonl"))
    with open(seg, "ab") as f:
        f.write(b'{"id": "cut-in-the-mid')  # what a kill -9 inside write() leaves
    w.close()
    scan = dlq.read_all(tmp_path)
    assert [e.payload for e in scan.entries] == [b"x0", b"x1", b"x2"]
    assert scan.torn == 1 and scan.corrupt == 0


def test_each_writer_starts_a_new_segment_and_rotates_by_size(tmp_path):
    w = dlq.Writer(tmp_path, segment_bytes=4096)
    for _ in range(20):
        w.append(items(5, payload=b"y" * 100))
    w.close()
    w2 = dlq.Writer(tmp_path)
    w2.append(items(1))
    w2.close()
    segs = dlq.segments(tmp_path)
    assert len(segs) >= 3
    assert len(dlq.read_all(tmp_path).entries) == 101
    assert [s.name for s in segs] == sorted(s.name for s in segs)


def test_removal_hides_at_once_and_compacts_closed_segments_only(tmp_path):
    old = dlq.Writer(tmp_path)
    old_entries = old.append(items(3))
    old.close()
    active = dlq.Writer(tmp_path)  # the running worker: holds a flock on its segment
    act_entries = active.append(items(2, reason="unknown-key"))
    with dlq.Remover(tmp_path) as rm:
        rm.remove([old_entries[0].id, old_entries[1].id, act_entries[0].id])
    left = dlq.read_all(tmp_path).entries
    assert [e.id for e in left] == [old_entries[2].id, act_entries[1].id]
    # The closed segment was rewritten; the active one untouched, its removed id still listed.
    assert (tmp_path / dlq.REMOVED).read_text().split() == [act_entries[0].id]
    active.append(items(1))  # the worker goes on appending to the same file
    active.close()
    with dlq.Remover(tmp_path) as rm:
        pass  # compaction now reaches the closed segment
    assert not (tmp_path / dlq.REMOVED).exists()
    assert len(dlq.read_all(tmp_path).entries) == 3


def test_removing_everything_deletes_the_segment(tmp_path):
    w = dlq.Writer(tmp_path)
    e = w.append(items(2))
    w.close()
    with dlq.Remover(tmp_path) as rm:
        rm.remove(x.id for x in e)
    assert dlq.segments(tmp_path) == [] and dlq.read_all(tmp_path).entries == []


def test_corrupt_lines_are_counted_not_fatal_and_kept_by_compaction(tmp_path):
    w = dlq.Writer(tmp_path)
    e = w.append(items(2))
    w.close()
    seg = next(tmp_path.glob("*.jsonl"))
    seg.write_bytes(seg.read_bytes() + b"garbage\n")
    scan = dlq.read_all(tmp_path)
    assert len(scan.entries) == 2 and scan.corrupt == 1
    with dlq.Remover(tmp_path) as rm:
        rm.remove([e[0].id])
    assert b"garbage" in seg.read_bytes()


def test_segment_is_flocked_while_written_and_fsync_is_called(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    w = dlq.Writer(tmp_path)
    w.append(items(1))
    assert w.log is not None and w.log._fd in synced
    fd = os.open(next(tmp_path.glob("*.jsonl")), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
    finally:
        os.close(fd)
    w.close()
    assert locked


def test_the_retained_messages_it_holds_are_known_to_the_next_writer_too(tmp_path):
    w = dlq.Writer(tmp_path)
    assert not w.holds_retained("sensors/r", b"hello")
    w.append([("bad-envelope", "d", "sensors/r", b"hello", None, True), ("bad-envelope", "d", "sensors/n", b"x", None, False)])
    assert w.holds_retained("sensors/r", b"hello")
    assert not w.holds_retained("sensors/r", b"hello!")  # same topic, another payload: a new message
    assert not w.holds_retained("sensors/n", b"x")  # not retained: a redelivery is a new entry
    w.close()
    again = dlq.Writer(tmp_path)  # the worker after a restart
    assert again.holds_retained("sensors/r", b"hello")
    assert [e.retained for e in dlq.read_all(tmp_path).entries] == [True, False]
    with dlq.Remover(tmp_path) as rm:
        rm.remove([e.id for e in dlq.read_all(tmp_path).entries])
    assert not dlq.Writer(tmp_path).holds_retained("sensors/r", b"hello")  # purged: it may come back


def test_size_counts_what_read_all_finds_and_reads_only_what_is_new(tmp_path):
    size = dlq.Size(tmp_path)
    assert size.count() == (0, 0)
    w = dlq.Writer(tmp_path, segment_bytes=4096)
    w.append(items(3))
    assert size.count()[0] == 3
    seg = next(tmp_path.glob("*.jsonl"))
    with open(seg, "ab") as f:
        f.write(b'{"id": "torn')  # a torn tail is not an entry
    assert size.count() == (3, seg.stat().st_size)
    with open(seg, "ab") as f:  # ... until its newline is there (reads on from where it stopped)
        f.write(b'", "rest": 1}\n')
    assert size.count()[0] == 4
    w.close()
    w = dlq.Writer(tmp_path, segment_bytes=4096)
    for _ in range(6):  # more than one segment
        w.append(items(10))
    entries, total = size.count()
    assert entries == 64 and total == sum(p.stat().st_size for p in dlq.segments(tmp_path))
    assert len(dlq.segments(tmp_path)) > 2
    w.close()
    scan = dlq.read_all(tmp_path)
    with dlq.Remover(tmp_path) as r:  # compaction rewrites segments: they are counted afresh
        r.remove(e.id for e in scan.entries[:10])
        assert size.count()[0] == 54  # removed, not yet compacted
    assert size.count()[0] == len(dlq.read_all(tmp_path).entries) + dlq.read_all(tmp_path).corrupt == 54
