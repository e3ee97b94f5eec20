"""ClientApps for the process tests, loaded by ``fedenc child --app grpc_apps:<name>`` (the tests
put this directory on the child's PYTHONPATH). Behaviour is set through environment variables."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedenc.runtime.grpc.frames import array_to_tensor
from nodes.child import app as fedenc_child


def flaky(msg: Message, ctx: Context) -> Message:
    """fedenc's ClientApp, except that the ``train`` message of round ``FEDENC_TEST_ROUND``
    touches ``FEDENC_TEST_MARKER`` and then sleeps ``FEDENC_TEST_SLEEP`` seconds (a child that is
    slow, or that the test kills mid-round)."""
    if msg.metadata.message_type == "train":
        round_ = msg.content["config"]["server-round"]
        if str(round_) == os.environ.get("FEDENC_TEST_ROUND"):
            Path(os.environ["FEDENC_TEST_MARKER"]).touch()
            time.sleep(float(os.environ.get("FEDENC_TEST_SLEEP", "60")))
    return fedenc_child(msg, ctx)


def checksum(msg: Message, ctx: Context) -> Message:
    """Replies with the size and the float64 sum of every array it received (big transfers)."""
    nbytes, total, count = 0, 0.0, 0
    for record in msg.content.array_records.values():
        for array in record.values():
            values = array_to_tensor(array)  # a view on the received bytes: no 1 GiB copy
            nbytes += values.numel() * values.element_size()
            total += float(values.sum(dtype=torch.float64))
            count += 1
    metrics = MetricRecord({"nbytes": nbytes, "sum": total, "arrays": count})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def hold_after_train(msg: Message, ctx: Context) -> Message:
    """fedenc's ClientApp, except that after training round ``FEDENC_TEST_ROUND`` the first
    time, it touches ``FEDENC_TEST_MARKER`` and holds its reply ``FEDENC_TEST_SLEEP`` seconds
    (the round is trained but not yet fused: the test kills the master then)."""
    reply = fedenc_child(msg, ctx)
    if msg.metadata.message_type == "train":
        round_ = msg.content["config"]["server-round"]
        marker = Path(os.environ["FEDENC_TEST_MARKER"])
        if str(round_) == os.environ.get("FEDENC_TEST_ROUND") and not marker.exists():
            marker.touch()
            time.sleep(float(os.environ.get("FEDENC_TEST_SLEEP", "3")))
    return reply
