"""What both fedenc grids refuse to push, and the ids they give instructions."""

from __future__ import annotations

import itertools

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedenc.runtime import flower_compat as fc
from fedenc.runtime.instructions import stamp_instruction


def _instruction(run_id: int) -> Message:
    with fc.task_identity(run_id):
        return Message(RecordDict({"config": ConfigRecord({"x": 1})}), 7, "query")


def test_instructions_get_increasing_ids() -> None:
    ids = itertools.count(1)
    first, second = _instruction(3), _instruction(3)
    assert stamp_instruction(first, 3, ids) == "ins-00000001"
    assert stamp_instruction(second, 3, ids) == "ins-00000002"
    assert second.metadata.message_id == "ins-00000002"


def test_a_message_of_another_run_is_refused() -> None:
    with pytest.raises(ValueError, match="message for run 4 pushed to the grid of run 3"):
        stamp_instruction(_instruction(4), 3, itertools.count(1))


def test_a_reply_is_not_an_instruction() -> None:
    instruction = _instruction(3)
    stamp_instruction(instruction, 3, itertools.count(1))
    reply = Message(RecordDict(), reply_to=instruction)
    with pytest.raises(ValueError, match="cannot push a reply"):
        stamp_instruction(reply, 3, itertools.count(1))
