"""The synthetic default data set: deterministic, fast, and learnable beyond popularity."""

from __future__ import annotations

import numpy as np
import pytest

from fedenc.data.sessions import Examples
from fedenc.data.splits import DataSplits
from fedenc.data.synthetic import SyntheticConfig, SyntheticWorld, generate


@pytest.fixture(scope="module")
def default() -> tuple[SyntheticWorld, DataSplits]:
    cfg = SyntheticConfig()
    return SyntheticWorld.build(cfg), generate(cfg)


def test_shape_and_invariants(default: tuple[SyntheticWorld, DataSplits]) -> None:
    _, d = default
    cfg = SyntheticConfig()
    assert d.name == "synthetic"
    parts = (d.train, d.valid, d.test)
    assert sum(len(p) for p in parts) == cfg.num_sessions
    assert len(parts[2]) == cfg.num_sessions // 10
    for p in parts:
        assert p.num_items == cfg.num_items
        assert p.lengths.min() >= 2 and p.lengths.max() <= cfg.max_length
        assert p.items.min() >= 1 and p.items.max() <= cfg.num_items
    times = np.concatenate([p.timestamps for p in parts])
    assert np.all(np.diff(times) > 0)  # train < valid < test in time
    mean = np.mean(np.concatenate([p.lengths for p in parts]))
    assert abs(mean - cfg.mean_length) < 0.2


def test_same_seed_same_data_other_seed_other_data() -> None:
    small = SyntheticConfig(num_items=300, num_clusters=5, num_sessions=500)
    a, b = generate(small), generate(small)
    assert np.array_equal(a.train.items, b.train.items)
    assert np.array_equal(a.test.offsets, b.test.offsets)
    assert np.array_equal(a.train.timestamps, b.train.timestamps)  # type: ignore[arg-type]
    c = generate(SyntheticConfig(num_items=300, num_clusters=5, num_sessions=500, seed=1))
    assert not np.array_equal(a.train.items[:200], c.train.items[:200])


def test_world_structure(default: tuple[SyntheticWorld, DataSplits]) -> None:
    world, _ = default
    cfg = world.config
    ids = np.arange(1, cfg.num_items + 1)
    assert np.all(np.diff(world.cluster_of[1:]) >= 0)  # clusters are contiguous id blocks
    assert world.cluster_start[0] == 1 and world.cluster_start[-1] == cfg.num_items + 1
    sums = np.bincount(world.cluster_of[1:], weights=world.popularity[1:])
    assert np.allclose(sums, 1.0)
    succ = world.successor[1:]
    assert np.all(succ != ids[:, None])  # no self-successors
    assert succ.min() >= 1 and succ.max() <= cfg.num_items
    same = world.cluster_of[succ] == world.cluster_of[ids][:, None]
    assert 0.8 < same.mean() < 0.97  # mostly in-cluster, occasional jumps (jump_prob 0.1)
    probs = world.transition_probs(np.array([1, 7, 1999]))
    assert np.allclose(probs.sum(1), 1.0)


def test_oracle_beats_popularity_by_a_wide_margin(
    default: tuple[SyntheticWorld, DataSplits],
) -> None:
    world, d = default
    test = Examples.from_sessions(d.test)
    last = test.sessions.items[test.start + test.length - 1]
    oracle = world.top_next(20)
    oracle_recall = (oracle[last] == test.target[:, None]).any(axis=1).mean()
    counts = np.bincount(d.train.items, minlength=world.config.num_items + 1)
    popular = np.argsort(-counts[1:], kind="stable")[:20] + 1
    pop_recall = np.isin(test.target, popular).mean()
    assert oracle_recall > 0.7
    assert oracle_recall > pop_recall + 0.4
    assert oracle_recall > 3 * pop_recall


@pytest.mark.parametrize(
    "bad",
    [
        {"num_items": 10, "num_clusters": 20},
        {"num_sessions": 2},
        {"mean_length": 1.5},
        {"successors": 0},
        {"follow_prob": 0.9, "repeat_prob": 0.2},
        {"test_fraction": 0.0},
    ],
)
def test_config_validation(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)  # type: ignore[arg-type]
