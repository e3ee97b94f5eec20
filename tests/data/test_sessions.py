"""Sessions (CSR store) and Examples (prefix -> next-item views)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedenc.data.sessions import Examples, Sessions

SESSIONS = [[1, 2, 3], [4, 4], [2, 5, 1, 3], [5]]


def test_from_lists_round_trip() -> None:
    s = Sessions.from_lists(SESSIONS)
    assert len(s) == 4
    assert s.num_items == 5
    assert s.lengths.tolist() == [3, 2, 4, 1]
    assert s.to_lists() == SESSIONS
    assert s.num_clicks == 10
    assert s.num_examples == 2 + 1 + 3 + 0


def test_validation_rejects_bad_ids_and_offsets() -> None:
    with pytest.raises(ValueError, match=r"item ids must lie in 1\.\.3"):
        Sessions.from_lists([[1, 4]], num_items=3)
    with pytest.raises(ValueError, match="item ids"):
        Sessions.from_lists([[0, 1]])
    with pytest.raises(ValueError, match="offsets"):
        Sessions(items=np.array([1, 2]), offsets=np.array([0, 3]), num_items=2)
    with pytest.raises(ValueError, match="timestamps"):
        Sessions.from_lists([[1, 2]], timestamps=[1.0, 2.0])


def test_subset_keeps_order_catalog_and_timestamps() -> None:
    s = Sessions.from_lists(SESSIONS, num_items=9, timestamps=[1.0, 2.0, 3.0, 4.0])
    sub = s.subset([2, 0])
    assert sub.to_lists() == [SESSIONS[2], SESSIONS[0]]
    assert sub.num_items == 9
    assert sub.timestamps is not None and sub.timestamps.tolist() == [3.0, 1.0]
    assert len(s.subset(np.zeros(0, dtype=np.int64))) == 0


def test_examples_are_every_prefix_with_its_next_click() -> None:
    s = Sessions.from_lists(SESSIONS)
    ex = Examples.from_sessions(s)
    assert len(ex) == s.num_examples == sum(len(x) - 1 for x in SESSIONS)
    got = {(tuple(ex.prefix(j).tolist()), int(ex.target[j])) for j in range(len(ex))}
    want = {(tuple(x[:k]), x[k]) for x in SESSIONS for k in range(1, len(x))}
    assert got == want
    # SR-GNN order: longest prefix of each session first.
    assert ex.length.tolist() == [2, 1, 1, 3, 2, 1]
    fwd = Examples.from_sessions(s, order="forward")
    assert fwd.length.tolist() == [1, 2, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown example order"):
        Examples.from_sessions(s, order="backward")


def test_examples_subset() -> None:
    ex = Examples.from_sessions(Sessions.from_lists(SESSIONS))
    sub = ex.subset(np.array([3, 0]))
    assert len(sub) == 2
    assert sub.prefix(0).tolist() == [2, 5, 1]
    assert int(sub.target[0]) == 3
    assert sub.prefix(1).tolist() == [1, 2]
    assert sub.num_items == 5


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(1, 20), min_size=1, max_size=8), min_size=1, max_size=20))
def test_examples_property(sessions: list[list[int]]) -> None:
    s = Sessions.from_lists(sessions, num_items=20)
    ex = Examples.from_sessions(s, order="forward")
    assert len(ex) == sum(len(x) - 1 for x in sessions)
    flat = [(x[:k], x[k]) for x in sessions for k in range(1, len(x))]
    for j, (prefix, target) in enumerate(flat):
        assert ex.prefix(j).tolist() == prefix
        assert int(ex.target[j]) == target
