"""EpochOrder: capped epochs walk one shuffled order, so they cover the data exactly once."""

from __future__ import annotations

import numpy as np
import pytest

from fedenc.training.order import EpochOrder


def test_uncapped_epoch_is_a_permutation() -> None:
    order = EpochOrder(np.random.default_rng(0))
    first, second = order.next_epoch(50), order.next_epoch(50)
    assert sorted(first.tolist()) == list(range(50))
    assert sorted(second.tolist()) == list(range(50))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(("n", "cap"), [(100, 10), (100, 30), (7, 3)])
def test_capped_epochs_cover_every_example_once_per_pass(n: int, cap: int) -> None:
    order = EpochOrder(np.random.default_rng(1))
    epochs = [order.next_epoch(n, cap) for _ in range(n)]  # n * cap draws = cap full passes
    assert all(e.size == cap for e in epochs)
    drawn = np.concatenate(epochs)
    for p in range(cap):
        one_pass = drawn[p * n : (p + 1) * n]
        assert sorted(one_pass.tolist()) == list(range(n)), f"pass {p} repeats or misses"


def test_a_cap_at_or_above_the_data_is_a_full_epoch() -> None:
    order = EpochOrder(np.random.default_rng(2))
    assert sorted(order.next_epoch(5, 5).tolist()) == [0, 1, 2, 3, 4]
    assert sorted(order.next_epoch(5, 9).tolist()) == [0, 1, 2, 3, 4]


def test_same_seed_same_order_and_restore_replays() -> None:
    a, b = EpochOrder(np.random.default_rng(3)), EpochOrder(np.random.default_rng(3))
    assert all(np.array_equal(a.next_epoch(40, 15), b.next_epoch(40, 15)) for _ in range(5))
    saved = a.state()
    ahead = [a.next_epoch(40, 15) for _ in range(3)]
    a.restore(saved)
    again = [a.next_epoch(40, 15) for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(ahead, again, strict=True))
