"""WeightedAccumulator's checked fold: block-wise NaN/Inf detection that leaves the sum intact."""

from __future__ import annotations

import math

import pytest
import torch

from fedenc.federation.fusion.accumulator import BLOCK, WeightedAccumulator
from fedenc.federation.parameters import BadUpdateError


def _layout(n: int) -> dict[str, torch.Tensor]:
    # one tensor spanning several blocks (with a ragged last block) and a small one
    return {"big": torch.zeros(n), "small": torch.zeros(3, 2)}


def _update(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(n, generator=gen), "small": torch.randn(3, 2, generator=gen)}


N = 2 * BLOCK + 17


def test_checked_fold_equals_the_plain_fold_bit_for_bit() -> None:
    checked, plain = WeightedAccumulator(), WeightedAccumulator()
    checked.reset(_layout(N))
    plain.reset(_layout(N))
    for seed, weight in ((0, 3.0), (1, 0.5), (2, 7.25)):
        update = _update(N, seed)
        checked.add_checked(update, weight, f"c{seed}")
        plain.add(update, weight)
    for name in ("big", "small"):
        assert torch.equal(checked.sums()[name], plain.sums()[name])
    assert checked.total_weight == plain.total_weight == 10.75
    assert checked.count == 3


@pytest.mark.parametrize("where", [0, BLOCK - 1, 2 * BLOCK + 16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_bad_value_in_any_block_is_rejected_and_the_sum_is_untouched(
    where: int, bad: float
) -> None:
    acc = WeightedAccumulator()
    acc.reset(_layout(N))
    acc.add_checked(_update(N, 0), 2.0, "good")
    before = {k: v.clone() for k, v in acc.sums().items()}
    evil = _update(N, 1)
    evil["big"][where] = bad
    with pytest.raises(BadUpdateError, match=r"'big' has 1 NaN/Inf value") as caught:
        acc.add_checked(evil, 1.0, "evil")
    assert caught.value.child == "evil"
    assert acc.count == 1 and acc.total_weight == 2.0
    for name, value in before.items():
        assert torch.equal(acc.sums()[name], value)
    acc.add_checked(_update(N, 2), 1.0, "next")  # the round goes on
    assert acc.count == 2


def test_finite_values_whose_weighted_sum_overflows_are_rejected() -> None:
    acc = WeightedAccumulator()
    acc.reset({"w": torch.zeros(4)})
    acc.add_checked({"w": torch.full((4,), 3e38)}, 1.0, "a")
    with pytest.raises(BadUpdateError, match="overflows"):
        acc.add_checked({"w": torch.full((4,), 3e38)}, 1.0, "b")
    assert torch.equal(acc.sums()["w"], torch.full((4,), 3e38))


def test_float64_accumulator_folds_float32_updates() -> None:
    acc = WeightedAccumulator(torch.float64)
    acc.reset({"w": torch.zeros(5)})
    acc.add_checked({"w": torch.full((5,), 0.1)}, 3.0, "a")
    assert acc.sums()["w"].dtype == torch.float64
    assert torch.allclose(acc.sums()["w"], torch.full((5,), 0.3, dtype=torch.float64))
