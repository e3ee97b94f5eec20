"""The master's inbound slot: a reply that holds it must keep arriving (a child trickling a byte
every few seconds had kept every other child's replies out for whole rounds)."""

from __future__ import annotations

import time

import pytest

from fedenc.runtime.grpc import connection
from fedenc.runtime.grpc.connection import ChildConnection
from fedenc.runtime.grpc.frames import FrameError


def _holder(held_for: float, sent: int) -> ChildConnection:
    conn = object.__new__(ChildConnection)  # the rate rule alone, without a stream
    conn._holding = True
    conn._held_since = time.monotonic() - held_for
    conn._held_bytes = sent
    return conn


def test_a_trickling_reply_loses_the_slot_after_the_grace() -> None:
    with pytest.raises(FrameError, match=r"held the master's inbound slot for 31 s"):
        _holder(31.0, 100)._check_slot_rate(1)


@pytest.mark.parametrize(("held_for", "sent"), [(5.0, 0), (31.0, 40 * 1024 * 1024)])
def test_a_reply_in_its_grace_or_at_a_fair_rate_keeps_it(held_for: float, sent: int) -> None:
    _holder(held_for, sent)._check_slot_rate(1)
    assert connection.MIN_SLOT_RATE * 31.0 < 40 * 1024 * 1024
