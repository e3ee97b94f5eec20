"""The Control service's job grid: a cancel before round 1 stops the wait for children at once,
and only then; from round 1 on the round listener cancels after the round (so a cancel during
round 1 keeps round 1)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Message, RecordDict

from fedenc.control import service
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
    g._cancel_raised, g._training, g._cancel_seen = False, False, None
    g._lock, g._replies, g._pending = threading.Condition(), {}, {}
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


def _cancel_soon(grid: Any) -> None:
    threading.Timer(0.3, lambda: setattr(grid._job, "cancel_requested", True)).start()


def test_a_cancel_ends_the_wait_for_a_silent_childs_confirmation(grid: Any) -> None:
    # No query timeout and a child that never answers: the cancel must not wait for it.
    _cancel_soon(grid)
    t0 = time.monotonic()
    with pytest.raises(JobCancelled, match="waited for its children's confirmations"):
        list(grid.receive(["never"], None))
    assert time.monotonic() - t0 < 5


def test_a_cancel_ends_a_round_wait_after_its_grace(
    grid: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CANCEL_GRACE_S", 1.0)
    grid._training = True
    _cancel_soon(grid)
    t0 = time.monotonic()
    with pytest.raises(JobCancelled, match="replies were still missing after 1 s"):
        list(grid.receive(["never"], None))
    assert 1.0 <= time.monotonic() - t0 < 6
