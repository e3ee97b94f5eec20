"""Parameter sets: a child's reply is checked name by name and rejected with a reason naming it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedenc.federation.parameters import (
    BadUpdateError,
    Parameters,
    cast_like,
    check_compatible,
    check_num_samples,
    check_values,
    count_non_finite,
    relative_change,
)


def reference() -> Parameters:
    return {
        "emb": torch.zeros(3, 2),
        "bias": torch.zeros(2),
        "steps": torch.zeros((), dtype=torch.long),
    }


def good() -> Parameters:
    return {"emb": torch.ones(3, 2), "bias": torch.ones(2), "steps": torch.tensor(4)}


def test_a_matching_update_passes_in_any_name_order() -> None:
    update = good()
    check_compatible(reference(), dict(reversed(update.items())), "c1")


def _replace(name: str, value: object) -> dict[str, object]:
    update: dict[str, object] = dict(good())
    update[name] = value
    return update


@pytest.mark.parametrize(
    ("update", "fragment"),
    [
        ({"emb": torch.ones(3, 2), "steps": torch.tensor(4)}, "missing tensor(s) 'bias'"),
        ({**good(), "head.w": torch.ones(1)}, "unexpected tensor(s) 'head.w'"),
        (_replace("emb", torch.ones(2, 3)), "'emb' has shape (2, 3), expected (3, 2)"),
        (_replace("bias", torch.ones(2, dtype=torch.float64)), "dtype torch.float64"),
        (_replace("bias", torch.tensor([0.0, math.nan])), "'bias' has 1 NaN/Inf"),
        (_replace("emb", torch.full((3, 2), math.inf)), "'emb' has 6 NaN/Inf"),
        (_replace("bias", torch.tensor([-math.inf, 1.0])), "'bias' has 1 NaN/Inf"),
        (_replace("bias", [1.0, 2.0]), "'bias' is a list, not a torch.Tensor"),
        ([1, 2], "expected a mapping"),
    ],
    ids=["missing", "extra", "shape", "dtype", "nan", "inf", "-inf", "not-tensor", "not-mapping"],
)
def test_bad_updates_are_rejected_naming_child_and_problem(update: object, fragment: str) -> None:
    with pytest.raises(BadUpdateError) as caught:
        check_compatible(reference(), update, "child-7")
    err = caught.value
    assert isinstance(err, ValueError)
    assert err.child == "child-7"
    assert "'child-7'" in str(err)
    assert fragment in err.reason


def test_all_structural_problems_are_reported_together() -> None:
    update = {"emb": torch.ones(2, 2), "extra": torch.ones(1), "steps": torch.tensor(1.0)}
    with pytest.raises(BadUpdateError) as caught:
        check_compatible(reference(), update, "c")
    reason = caught.value.reason
    for fragment in ("missing tensor(s) 'bias'", "unexpected tensor(s) 'extra'", "shape", "dtype"):
        assert fragment in reason


def test_count_non_finite() -> None:
    assert count_non_finite(torch.tensor([1.0, math.nan, math.inf, -math.inf])) == 3
    assert count_non_finite(torch.tensor([1, 2, 3])) == 0
    assert count_non_finite(torch.tensor([60000.0] * 4, dtype=torch.float16)) == 0
    # values no training produces, whose weighted sums overflow float32: refused too
    assert count_non_finite(torch.tensor([1e37, 1.0, -1e31])) == 2
    assert count_non_finite(torch.tensor([1e308, 1e308], dtype=torch.float64)) == 2
    assert count_non_finite(torch.tensor([1e29, -1e29])) == 0
    assert count_non_finite(torch.empty(0)) == 0


def test_values_can_be_left_to_the_caller_and_checked_apart() -> None:
    ref = {"w": torch.zeros(2), "b": torch.zeros(1)}
    nan = {"w": torch.tensor([1.0, math.nan]), "b": torch.tensor([math.inf])}
    check_compatible(ref, nan, "c", values=False)  # structure only
    with pytest.raises(BadUpdateError, match=r"'w' has 1 NaN/Inf value.*'b' has 1 NaN/Inf"):
        check_values(nan, "c")
    check_values(ref, "c")


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10", None])
def test_num_samples_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(BadUpdateError, match="num-examples"):
        check_num_samples(bad, "c")


def test_num_samples_accepts_numpy_integers() -> None:
    assert check_num_samples(np.int64(12), "c") == 12


def test_cast_like_rounds_into_integer_tensors() -> None:
    out = cast_like(torch.tensor([1.4, 2.6]), torch.zeros(2, dtype=torch.long))
    assert out.dtype == torch.long
    assert out.tolist() == [1, 3]


def test_relative_change_literal() -> None:
    old = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # ‖old‖ = 5
    new = {"a": torch.tensor([3.0, 1.5]), "b": torch.tensor([6.0])}  # ‖new − old‖ = 2.5
    assert relative_change(old, new) == pytest.approx(0.5)
    assert relative_change(old, old) == 0.0
    zero = {"a": torch.zeros(2), "b": torch.zeros(1)}
    assert relative_change(zero, zero) == 0.0
    assert relative_change(zero, new) == math.inf


def test_relative_change_rejects_different_sets() -> None:
    with pytest.raises(ValueError, match="only in old"):
        relative_change({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        relative_change({"a": torch.zeros(1)}, {"a": torch.zeros(2)})
