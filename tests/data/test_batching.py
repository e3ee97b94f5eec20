"""Session-graph batches: the vectorised builder against the per-session oracle and by hand."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedenc.data.batching import (
    SessionBatch,
    batch_from_sessions,
    build_batch,
    build_batch_reference,
)
from fedenc.data.sessions import Examples, Sessions


def examples_of(
    prefixes: Sequence[Sequence[int]], targets: Sequence[int] | None = None
) -> Examples:
    """Examples whose ``j``-th prefix is ``prefixes[j]`` (target ``targets[j]``, default 1)."""
    tgts = list(targets) if targets is not None else [1] * len(prefixes)
    store = Sessions.from_lists(
        [[*p, t] for p, t in zip(prefixes, tgts, strict=True)],
        num_items=max(max(max(p) for p in prefixes), max(tgts)),
    )
    return Examples(
        sessions=store,
        start=store.offsets[:-1].copy(),
        length=np.array([len(p) for p in prefixes], dtype=np.int64),
        target=np.array(tgts, dtype=np.int64),
    )


def random_examples(seed: int, num_sessions: int = 30, max_len: int = 12) -> Examples:
    """SR-GNN examples of random sessions: small catalogs force repeated items and self-loops."""
    rng = np.random.default_rng(seed)
    num_items = int(rng.integers(2, 15))
    lengths = rng.integers(2, max_len + 1, size=num_sessions)
    sessions = [rng.integers(1, num_items + 1, size=n).tolist() for n in lengths]
    return Examples.from_sessions(Sessions.from_lists(sessions, num_items=num_items))


def assert_batches_equal(got: SessionBatch, want: SessionBatch) -> None:
    for f in fields(SessionBatch):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a.dtype == b.dtype, f.name
        assert a.shape == b.shape, f.name
        assert torch.equal(a, b), f"{f.name}: {a} != {b}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_build_batch_matches_reference_on_random_batches(seed: int) -> None:
    ex = random_examples(seed)
    rng = np.random.default_rng(100 + seed)
    index = rng.choice(len(ex), size=min(len(ex), 40), replace=False).astype(np.int64)
    assert_batches_equal(build_batch(ex, index), build_batch_reference(ex, index))


@pytest.mark.parametrize(
    "prefixes",
    [
        [[7]],  # a batch of one, a single click
        [[3], [4], [5, 5]],  # only length-1 prefixes and a self-loop
        [[1, 1, 1, 1]],  # one node, one self-loop
        [[2, 9, 2, 9, 2, 3], [4]],  # repeated items, a long and a short row
        [list(range(1, 41)) + list(range(40, 0, -1)), [6, 6]],  # a long session (80 clicks)
    ],
)
def test_build_batch_matches_reference_on_edge_cases(prefixes: list[list[int]]) -> None:
    ex = examples_of(prefixes, targets=[2] * len(prefixes))
    index = np.arange(len(prefixes), dtype=np.int64)
    got = build_batch(ex, index)
    assert_batches_equal(got, build_batch_reference(ex, index))
    assert got.items.shape == (len(prefixes), max(len(p) for p in prefixes))
    assert got.targets.tolist() == [2] * len(prefixes)


def test_positions_run_n_to_1_and_zero_on_padding() -> None:
    batch = batch_from_sessions([[5, 3, 5, 8], [2], [9, 9, 1]])
    assert batch.positions.tolist() == [[4, 3, 2, 1], [1, 0, 0, 0], [3, 2, 1, 0]]
    assert batch.lengths.tolist() == [4, 1, 3]
    assert batch.last.tolist() == [3, 0, 2]
    assert batch.mask.tolist() == [
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, False],
    ]
    for b in range(batch.size):
        n = int(batch.lengths[b])
        real = batch.positions[b, :n]
        assert torch.all(real[1:] < real[:-1])  # strictly decreasing along the click order
        assert int(real[-1]) == 1
        assert torch.all(batch.positions[b, n:] == 0)


def test_node_positions_are_the_most_recent_click() -> None:
    # Nodes are the sorted unique items: row 0 -> [3, 5, 8], row 1 -> [1, 9].
    batch = batch_from_sessions([[5, 3, 5, 8], [9, 9, 1]])
    assert batch.nodes.tolist() == [[3, 5, 8], [1, 9, 0]]
    assert batch.node_mask.tolist() == [[True, True, True], [True, True, False]]
    # 5 is clicked at reversed positions 4 and 2: its most recent click is 2.
    assert batch.node_positions.tolist() == [[3, 2, 1], [1, 2, 0]]


def test_alias_maps_each_click_to_its_node() -> None:
    sessions = [[5, 3, 5, 8], [9, 9, 1], [4]]
    batch = batch_from_sessions(sessions)
    for b, s in enumerate(sessions):
        n = len(s)
        nodes_of_clicks = batch.nodes[b, batch.alias[b, :n]]
        assert nodes_of_clicks.tolist() == s
        assert torch.all(batch.alias[b, n:] == 0)
    assert batch.alias.tolist() == [[1, 0, 1, 2], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_edges_and_normalised_adjacency_by_hand() -> None:
    # Transitions 1->2, 2->3, 3->1, 1->3: nodes [1, 2, 3] -> indices 0, 1, 2.
    batch = batch_from_sessions([[1, 2, 3, 1, 3]])
    assert batch.edges[0].tolist() == [[0, 1, 1], [0, 0, 1], [1, 0, 0]]
    assert batch.adj_out[0].tolist() == [[0, 0.5, 0.5], [0, 0, 1], [1, 0, 0]]
    # Row i of adj_in: incoming edges of node i over its in-degree.
    assert batch.adj_in[0].tolist() == [[0, 0, 1], [1, 0, 0], [0.5, 0.5, 0]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_edges_are_exactly_the_consecutive_transitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sessions = [rng.integers(1, 6, size=int(rng.integers(1, 10))).tolist() for _ in range(8)]
    batch = batch_from_sessions(sessions)
    for b, s in enumerate(sessions):
        want = {(s[t], s[t + 1]) for t in range(len(s) - 1)}
        u, v = torch.nonzero(batch.edges[b], as_tuple=True)
        got = set(zip(batch.nodes[b, u].tolist(), batch.nodes[b, v].tolist(), strict=True))
        assert got == want
        assert set(batch.edges[b].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjacency_rows_sum_to_one_or_zero(seed: int) -> None:
    ex = random_examples(seed)
    batch = build_batch(ex, np.arange(len(ex), dtype=np.int64))
    out_deg = batch.edges.sum(2)
    in_deg = batch.edges.sum(1)
    ones, zeros = torch.ones_like(out_deg), torch.zeros_like(out_deg)
    torch.testing.assert_close(batch.adj_out.sum(2), torch.where(out_deg > 0, ones, zeros))
    torch.testing.assert_close(batch.adj_in.sum(2), torch.where(in_deg > 0, ones, zeros))
    # Padding nodes have no edges at all.
    pad = ~batch.node_mask
    assert torch.all(batch.edges.sum(2)[pad] == 0) and torch.all(batch.edges.sum(1)[pad] == 0)
    assert torch.all(batch.nodes[pad] == 0)


def test_batch_from_sessions_matches_reference() -> None:
    sessions = [[4, 2, 4], [1], [3, 3, 5, 2, 1, 2]]
    got = batch_from_sessions(sessions)
    want = build_batch_reference(examples_of(sessions), np.arange(3, dtype=np.int64))
    assert got.targets.tolist() == [-1, -1, -1]
    want.targets = got.targets
    assert_batches_equal(got, want)


@pytest.mark.parametrize("sessions", [[], [[1, 2], []], [[]]])
def test_batch_from_sessions_rejects_empty_sessions(sessions: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="at least one click"):
        batch_from_sessions(sessions)


@pytest.mark.parametrize("sessions", [[[1, 0, 2]], [[3], [-1]]])
def test_batch_from_sessions_rejects_padding_and_negative_ids(sessions: list[list[int]]) -> None:
    # 0 would silently be read as padding (it changed srgnn's session vector by 0.12).
    with pytest.raises(ValueError, match=r"item ids start at 1 \(0 is padding\)"):
        batch_from_sessions(sessions)


def test_ranking_a_batch_without_targets_is_refused() -> None:
    from fedenc.encoders.registry import build_encoder

    model = build_encoder("srgnn", 20, hidden=4)
    with pytest.raises(ValueError, match="needs the batch's targets"):
        model.rank_targets(batch_from_sessions([[1, 2]]))


def test_to_cpu_keeps_everything() -> None:
    batch = batch_from_sessions([[5, 3, 5, 8], [2]])
    moved = batch.to("cpu")
    assert isinstance(moved, SessionBatch)
    assert_batches_equal(moved, batch)
    assert moved.size == 2


session_lists = st.lists(
    st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=15),
    min_size=1,
    max_size=8,
)


@settings(max_examples=50, deadline=None, database=None)
@given(prefixes=session_lists, data=st.data())
def test_property_build_equals_reference(prefixes: list[list[int]], data: st.DataObject) -> None:
    targets = data.draw(st.lists(st.integers(1, 8), min_size=len(prefixes), max_size=len(prefixes)))
    ex = examples_of(prefixes, targets)
    index = np.array(
        data.draw(st.lists(st.integers(0, len(prefixes) - 1), min_size=1, max_size=10)),
        dtype=np.int64,
    )
    assert_batches_equal(build_batch(ex, index), build_batch_reference(ex, index))
