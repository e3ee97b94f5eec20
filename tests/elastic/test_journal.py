"""The task-information server's journal, and what it says about a data server that lost work:
a torn last line is dropped (its batch was never acknowledged); anything else that cannot be
read is an error naming the line, not a silent loss of every later acknowledged batch; a data
server behind the journal (restarted, its applied batches lost) stops the server loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedenc.elastic.common import ElasticError
from fedenc.elastic.journal import Journal
from fedenc.elastic.task_server import TaskInfoServer
from fedenc.elastic.worker import channel_security
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb


def journal_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(lines))
    return path


HEADER = json.dumps({"task": "task", "total": 10}) + "\n"


def test_a_torn_last_line_is_dropped_and_the_rest_kept(tmp_path: Path) -> None:
    path = journal_file(tmp_path, HEADER, '{"batch": 0, "worker": "w"}\n', '{"batch": 1, "wo')
    journal = Journal(path, "task", 10)
    assert journal.done == {0: "w"} and journal.resumed == 1
    journal.record(1, "w")
    journal.close()
    assert Journal(path, "task", 10).done == {0: "w", 1: "w"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("not json at all\n", "line 2 is not a journal record"),
        ('{"oops": 1}\n', "line 2: {'oops': 1} names no batch of 0..9"),
        ('{"batch": 99}\n', "line 2: {'batch': 99} names no batch of 0..9"),
    ],
)
def test_an_unreadable_line_before_the_end_is_an_error_and_nothing_is_cut(
    tmp_path: Path, bad: str, message: str
) -> None:
    path = journal_file(tmp_path, HEADER, bad, '{"batch": 3, "worker": "w"}\n')
    before = path.read_bytes()
    with pytest.raises(ElasticError, match=message):
        Journal(path, "task", 10)
    assert path.read_bytes() == before  # the acknowledged batch 3 is still there


def test_a_data_server_behind_the_journal_stops_the_task_server(tmp_path: Path) -> None:
    tis = TaskInfoServer("127.0.0.1:1", tmp_path, channel=channel_security(None, "t", True))
    desc = epb.DescribeResponse(task_id="task", batches_per_epoch=10, epochs=1, version=0)
    try:
        tis._check_task(desc, 0)  # opens the task
        assert tis.task is not None
        for b in range(3):
            tis.task.journal.record(b, "w")
        tis._check_task(epb.DescribeResponse(task_id="task", version=3), 3)  # in step: fine
        with pytest.raises(ElasticError, match=r"at step 0, but the journal .* has 3 batches"):
            tis._check_task(epb.DescribeResponse(task_id="task", version=0), 3)  # restarted
    finally:
        tis.stop()
