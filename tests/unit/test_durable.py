"""durable.AppendLog: what a kill -9 in the middle of an append leaves is cut off, never read,
and never glued to the next record; a short write goes on until every byte is written."""

import os

import orjson

from daemons.durable import AppendLog
from daemons.transfer.journal import IndexLog, Journal


def test_a_torn_line_is_not_read_and_is_cut_before_the_next_append(tmp_path):
    path = tmp_path / "j.jsonl"
    j = Journal(path)
    j.append({"ev": "start", "id": "a"})
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"ev": "done", "id"')  # what a kill -9 inside write() leaves
    assert Journal(path).load() == [{"ev": "start", "id": "a"}]
    j = Journal(path)
    j.append({"ev": "done", "id": "b"})
    j.close()
    assert path.read_bytes().splitlines() == [orjson.dumps({"ev": "start", "id": "a"}),
                                              orjson.dumps({"ev": "done", "id": "b"})]


def test_fixed_size_records_keep_their_alignment_after_a_torn_tail(tmp_path):
    path = tmp_path / "x.idx"
    idx = IndexLog(path)
    idx.append([1, 2])
    idx.close()
    with open(path, "ab") as f:
        f.write(b"\x07\x00")  # half a record
    assert IndexLog(path).load() == [1, 2]
    idx = IndexLog(path)
    idx.append([3])
    idx.close()
    assert IndexLog(path).load() == [1, 2, 3] and path.stat().st_size == 12


def test_a_torn_tail_without_any_newline_leaves_an_empty_log(tmp_path):
    path = tmp_path / "only-torn"
    path.write_bytes(b"no newline at all")
    log = AppendLog(path)
    assert log.read_whole() == (b"", len(b"no newline at all"))
    log.append(b"whole\n")
    log.close()
    assert path.read_bytes() == b"whole\n"


def test_short_writes_are_continued_and_the_data_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "s.log"
    real_write, real_fsync = os.write, os.fsync
    calls: list[str] = []

    def short_write(fd, data):  # the kernel may write less than asked (disk nearly full, a signal)
        calls.append("write")
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(os, "write", short_write)
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    log = AppendLog(path)
    log.append(b"0123456789\n")
    monkeypatch.undo()
    log.close()
    assert path.read_bytes() == b"0123456789\n"
    assert calls.count("write") == 4 and calls[-1] == "fsync"
