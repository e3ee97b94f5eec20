"""The Control service's job grid: a cancel before round 1 stops the wait for children at once,
and only then; from round 1 on the round listener cancels after the round (so a cancel during
round 1 keeps round 1)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Message, RecordDict

from fedenc.control.service import JobCancelled, _ControlGrid
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.master import GrpcGrid


@pytest.fixture
def grid(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(GrpcGrid, "get_node_ids", lambda self: [2, 3])
    monkeypatch.setattr(GrpcGrid, "push_messages", lambda self, batch: [str(m) for m in batch])
    g = object.__new__(_ControlGrid)  # the decision logic alone, without a server
    g._job = SimpleNamespace(cancel_requested=False, rounds=[])
    g._service = SimpleNamespace(_note_queried=lambda nodes: None)
    g._cancel_raised, g._training = False, False
    return g


def _message(kind: str) -> Message:
    with fc.task_identity(7):
        return Message(RecordDict(), 2, kind)


def test_a_cancel_before_round_1_stops_the_wait_once(grid: Any) -> None:
    grid._job.cancel_requested = True
    with pytest.raises(JobCancelled, match="before its first round"):
        grid.get_node_ids()
    assert grid.get_node_ids() == [2, 3]  # the end-of-job message can still reach them


def test_a_cancel_during_round_1_waits_for_the_round(grid: Any) -> None:
    grid.push_messages([_message("query")])
    grid.push_messages([_message("train")])  # round 1 is under way
    grid._job.cancel_requested = True
    assert grid.get_node_ids() == [2, 3]  # evaluation of round 1 goes on
