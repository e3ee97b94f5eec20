"""Contract test of the Flower internals fedenc's runtimes rely on (fedenc.runtime.flower_compat):
when a Flower upgrade moves one of them, this fails first, naming it."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedenc.runtime import flower_compat as fc


def test_message_needs_a_task_identity_and_task_identity_restores() -> None:
    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity._run_id = None
    try:
        with pytest.raises(RuntimeError, match="run_id"):
            Message(RecordDict(), 5, "query")
        with fc.task_identity(42):
            msg = Message(RecordDict(), 5, "query")
            assert msg.metadata.run_id == 42
            assert msg.metadata.src_node_id == fc.SUPERLINK_NODE_ID
        assert TaskIdentity._run_id is None
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def test_message_id_serde_round_trip_and_error_reply() -> None:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
            "metrics": MetricRecord({"a": 1.5, "n": 3}),
            "config": ConfigRecord({"b": b"\x00\x01", "s": "x", "t": True}),
        }
    )
    with fc.task_identity(7):
        msg = Message(content, 9, "train", group_id="1")
    fc.set_message_id(msg, "ins-1")
    assert msg.metadata.message_id == "ins-1"
    copy = fc.message_from_bytes(fc.message_to_bytes(msg))
    assert copy.metadata == msg.metadata
    np.testing.assert_array_equal(copy.content["arrays"]["w"].numpy(), np.arange(6).reshape(2, 3))
    assert copy.content["config"]["b"] == b"\x00\x01"
    assert copy.content is not content
    reply = fc.error_reply(copy, fc.CLIENT_APP_RAISED_EXCEPTION, "boom")
    back = fc.message_from_bytes(fc.message_to_bytes(reply))
    assert back.has_error() and back.error.code == 2 and back.error.reason == "boom"
    assert back.metadata.reply_to_message_id == "ins-1"
    assert (back.metadata.src_node_id, back.metadata.dst_node_id) == (9, fc.SUPERLINK_NODE_ID)
    assert fc.NODE_UNAVAILABLE == 5


def test_empty_run() -> None:
    run = fc.empty_run(11)
    assert isinstance(run, fc.Run) and run.run_id == 11


def test_a_message_with_no_records_reads_back_with_empty_content() -> None:
    # proto3 leaves an empty RecordDict out of the bytes; a reply that carries no records
    # (a "query.finish" acknowledgement from a child in another stack) must still decode.
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage()
    proto.metadata.message_type = "query.finish"
    proto.metadata.run_id = 7
    message = fc.message_from_bytes(proto.SerializeToString())
    assert message.has_content() and len(message.content) == 0
    assert message.metadata.message_type == "query.finish"
