"""Partitions among children: complete, disjoint, seeded, contiguous in time, skewed on demand."""

from __future__ import annotations

import io
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedenc.data.partition import (
    SCHEMES,
    held_out_indices,
    heterogeneity,
    partition,
    partition_indices,
    partition_stats,
    print_partition_stats,
    random_heterogeneity,
    session_groups,
)
from fedenc.data.sessions import Sessions
from fedenc.data.synthetic import SyntheticConfig, generate


@pytest.fixture(scope="module")
def sessions() -> Sessions:
    cfg = SyntheticConfig(num_items=1000, num_clusters=10, num_sessions=4000)
    return generate(cfg).train


def assert_cover(parts: list[np.ndarray], n: int) -> None:
    flat = np.concatenate(parts)
    assert flat.size == n  # none lost, none duplicated
    assert np.array_equal(np.sort(flat), np.arange(n))
    for p in parts:
        assert np.all(np.diff(p) > 0)  # each child keeps chronological order


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_disjoint_complete_cover(sessions: Sessions, scheme: str, k: int) -> None:
    idx = partition_indices(sessions, k, scheme, seed=0)
    assert len(idx) == k
    assert_cover(idx, len(sessions))
    parts = partition(sessions, k, scheme, seed=0)
    assert sum(p.num_clicks for p in parts) == sessions.num_clicks
    assert all(p.num_items == sessions.num_items for p in parts)
    assert parts[0].to_lists() == sessions.subset(idx[0]).to_lists()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_deterministic_per_seed(sessions: Sessions, scheme: str) -> None:
    a = partition_indices(sessions, 5, scheme, seed=3)
    b = partition_indices(sessions, 5, scheme, seed=3)
    c = partition_indices(sessions, 5, scheme, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_and_time_are_balanced(sessions: Sessions) -> None:
    for scheme in ("iid", "time"):
        sizes = [len(p) for p in partition_indices(sessions, 7, scheme)]
        assert max(sizes) - min(sizes) <= 1


def test_time_blocks_are_contiguous(sessions: Sessions) -> None:
    parts = partition(sessions, 6, "time")
    for a, b in pairwise(parts):
        assert a.timestamps is not None and b.timestamps is not None
        assert a.timestamps.max() <= b.timestamps.min()
    # Shuffled storage order: blocks still follow timestamps, not positions.
    perm = np.random.default_rng(0).permutation(len(sessions))
    shuffled = sessions.subset(perm)
    for a, b in pairwise(partition(shuffled, 6, "time")):
        assert a.timestamps.max() <= b.timestamps.min()  # type: ignore[union-attr]
    # No timestamps: contiguous by stored order.
    plain = Sessions(sessions.items, sessions.offsets, sessions.num_items)
    idx = partition_indices(plain, 4, "time")
    assert all(np.array_equal(p, np.arange(p[0], p[-1] + 1)) for p in idx)
    assert [int(p[0]) for p in idx] == sorted(int(p[0]) for p in idx)


def test_dirichlet_skew_grows_as_alpha_shrinks(sessions: Sessions) -> None:
    def skew(alpha: float) -> float:
        runs = [partition(sessions, 8, "dirichlet", seed=s, alpha=alpha) for s in (0, 1)]
        return float(np.mean([heterogeneity(parts) for parts in runs]))

    small, large = skew(0.05), skew(100.0)
    iid = heterogeneity(partition(sessions, 8, "iid"))
    assert small > large + 0.25
    assert abs(large - iid) < 0.1


def test_dirichlet_respects_min_sessions(sessions: Sessions) -> None:
    for seed in range(3):
        idx = partition_indices(sessions, 20, "dirichlet", seed=seed, alpha=0.01, min_sessions=50)
        assert min(len(p) for p in idx) >= 50
        assert_cover(idx, len(sessions))


def test_session_groups_take_the_majority_bucket() -> None:
    s = Sessions.from_lists([[1, 2, 10], [9, 10, 1], [1, 10]], num_items=10)
    assert session_groups(s, num_groups=2).tolist() == [0, 1, 0]  # tie -> lower bucket


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"k": 0}, "k must be an integer >= 1"),
        ({"k": -2}, "k must be an integer >= 1"),
        ({"k": 2, "scheme": "random"}, "unknown partition scheme 'random'"),
        ({"k": 5}, "cannot give 5 children 1 session"),
        ({"k": 2, "min_sessions": 3}, "cannot give 2 children 3 session"),
        ({"k": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"k": 2, "scheme": "dirichlet", "alpha": float("inf")}, "finite number > 0, got inf"),
    ],
)
def test_errors(kwargs: dict[str, object], pattern: str) -> None:
    tiny = Sessions.from_lists([[1, 2], [2, 3], [3, 1], [1, 3]])
    with pytest.raises(ValueError, match=pattern):
        partition(tiny, **kwargs)  # type: ignore[arg-type]


def test_stats_and_table() -> None:
    s = Sessions.from_lists([[1, 1, 2], [3, 4], [1, 2, 2, 2]], timestamps=[1.0, 2.0, 3.0])
    parts = [s.subset([0, 1]), s.subset([2])]
    stats = partition_stats(parts)
    assert stats[0] | {"mean_length": 0} == {
        "child": 0,
        "sessions": 2,
        "clicks": 5,
        "examples": 3,
        "items": 4,
        "mean_length": 0,
        "top_item_share": 0.4,
        "time_first": 1.0,
        "time_last": 2.0,
    }
    assert stats[1]["top_item_share"] == 0.75 and stats[1]["examples"] == 3
    assert heterogeneity([s]) == 0.0
    assert heterogeneity([s, s]) == 0.0
    out = io.StringIO()
    print_partition_stats(parts, console=Console(file=out, width=120))
    text = " ".join(out.getvalue().split())
    assert "sessions" in text and "40.0%" in text and "75.0%" in text
    assert "a random split of the same sizes" in text and "1970-01-01 .. 1970-01-01" in text


def test_a_splits_heterogeneity_reads_against_a_random_split(sessions: Sessions) -> None:
    # An IID split is at the level of sampling noise; a skewed one well above it.
    iid = partition(sessions, 8, "iid")
    assert heterogeneity(iid) == pytest.approx(random_heterogeneity(iid), rel=0.15)
    skewed = partition(sessions, 8, "dirichlet", alpha=0.1)
    assert heterogeneity(skewed) > 1.5 * random_heterogeneity(skewed)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(1, 8),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**16),
    alpha=st.floats(0.01, 10.0),
)
def test_cover_property(n: int, k: int, scheme: str, seed: int, alpha: float) -> None:
    rng = np.random.default_rng(seed)
    s = Sessions.from_lists(
        [rng.integers(1, 30, size=rng.integers(1, 6)).tolist() for _ in range(n)],
        num_items=30,
        timestamps=rng.random(n).tolist(),
    )
    if n < k:
        with pytest.raises(ValueError):
            partition_indices(s, k, scheme, seed=seed, alpha=alpha)
        return
    idx = partition_indices(s, k, scheme, seed=seed, alpha=alpha)
    assert_cover(idx, n)
    assert min(len(p) for p in idx) >= 1


def _group_tv(a: Sessions, b: Sessions, g: int = 20) -> float:
    """Total-variation distance between two parts' item-group distributions."""
    pa = np.bincount(session_groups(a, g), minlength=g) / max(len(a), 1)
    pb = np.bincount(session_groups(b, g), minlength=g) / max(len(b), 1)
    return float(np.abs(pa - pb).sum() / 2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_held_out_parts_cover_the_split_and_dirichlet_ones_follow_the_training_data(
    scheme: str,
) -> None:
    # A child's test data must look like its training data: dealt apart, with Dirichlet
    # proportions of their own, a child trained on some groups was scored on others.
    splits = generate(SyntheticConfig(num_items=1000, num_clusters=10, num_sessions=8000))
    k, alpha = 4, 0.05
    train = partition_indices(splits.train, k, scheme, seed=3, alpha=alpha)
    test = held_out_indices(splits.train, train, splits.test, scheme, seed=3, alpha=alpha)
    assert_cover(test, len(splits.test))
    again = held_out_indices(splits.train, train, splits.test, scheme, 3, alpha)
    assert all(np.array_equal(a, b) for a, b in zip(test, again, strict=True))
    if scheme != "dirichlet":
        return

    def tv(parts: list[np.ndarray]) -> list[float]:
        return [
            _group_tv(splits.train.subset(a), splits.test.subset(b))
            for a, b in zip(train, parts, strict=True)
        ]

    own = tv(test)
    old = tv(partition_indices(splits.test, k, scheme, seed=3, alpha=alpha))  # dealt apart
    assert max(own) < 0.25 < max(old), (own, old)
    # the held-out share follows the training share
    train_share = np.array([len(p) for p in train]) / len(splits.train)
    test_share = np.array([len(p) for p in test]) / len(splits.test)
    assert np.abs(train_share - test_share).max() < 0.1, (train_share, test_share)


def test_a_tiny_held_out_split_goes_to_the_first_children() -> None:
    s = Sessions.from_lists([[1, 2], [2, 3]], num_items=5)
    train = [np.array([0]), np.array([1]), np.zeros(0, dtype=np.int64)]
    parts = held_out_indices(s, train, s, "iid")
    assert [p.tolist() for p in parts] == [[0], [1], []]


def test_fewer_sessions_than_children_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    from fedenc.data.partition import deal_indices

    s = Sessions.from_lists([[1, 2], [2, 3], [3, 4]], num_items=5)
    with caplog.at_level("WARNING", logger="fedenc.data.partition"):
        for _ in range(5):  # as each of 5 children deals the same split
            parts = deal_indices(s, 5, "time", seed=0)
    assert [len(p) for p in parts] == [1, 1, 1, 0, 0]
    assert caplog.text.count("3 sessions for 5 children: one each to the first 3") == 1
    assert "the time scheme cannot apply" in caplog.text
