"""Row optimizers: pushed deltas as g = -delta, only the pushed rows move, per-row Adam steps."""

from __future__ import annotations

import re

import pytest
import torch

from fedenc.ps.optimizers import RowOptimizer, RowOptimizerConfig


def _reference(name: str, w0: torch.Tensor, grads: list[torch.Tensor], lr: float) -> torch.Tensor:
    p = torch.nn.Parameter(w0.clone())
    opt: torch.optim.Optimizer
    if name == "adam":
        opt = torch.optim.Adam([p], lr=lr, eps=1e-8)
    elif name == "adagrad":
        opt = torch.optim.Adagrad([p], lr=lr, eps=1e-8)
    else:
        opt = torch.optim.SGD([p], lr=lr)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_matches_torch_on_pushed_rows_and_leaves_others(name: str) -> None:
    torch.manual_seed(0)
    values = torch.randn(6, 4)
    start = values.clone()
    opt = RowOptimizer(RowOptimizerConfig(name, lr=0.05), 6, 4)
    deltas = [torch.randn(2, 4) for _ in range(3)]
    index = torch.tensor([1, 4])
    for d in deltas:
        opt.apply(values, index, d)
    want = _reference(name, start[index], [-d for d in deltas], 0.05)
    torch.testing.assert_close(values[index], want, rtol=1e-5, atol=1e-6)
    others = torch.tensor([0, 2, 3, 5])
    assert torch.equal(values[others], start[others])


def test_sgd_with_default_lr_adds_deltas() -> None:
    values = torch.zeros(3, 2)
    RowOptimizer(RowOptimizerConfig("sgd"), 3, 2).apply(values, torch.tensor([2]), torch.ones(1, 2))
    assert values.tolist() == [[0, 0], [0, 0], [1, 1]]


def test_adam_counts_steps_per_row() -> None:
    # Row 1 pushed three times, row 2 once: row 2's first step has the bias correction of
    # step 1 (a full lr-sized move), not of the table's step 3.
    values = torch.zeros(3, 1)
    opt = RowOptimizer(RowOptimizerConfig("adam", lr=0.1), 3, 1)
    for _ in range(3):
        opt.apply(values, torch.tensor([1]), torch.ones(1, 1))
    opt.apply(values, torch.tensor([2]), torch.ones(1, 1))
    assert opt.state["step"].tolist() == [0, 3, 1]
    torch.testing.assert_close(values[2], torch.tensor([0.1]))
    opt.reset(torch.tensor([1]))
    assert opt.state["step"].tolist() == [0, 0, 1]


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="row optimizer must be one of"):
        RowOptimizerConfig("rmsprop")
    # Each bad value is named, not the whole config.
    cases = {
        "lr must be a finite number >= 0": {"lr": -1.0},
        "beta2 must lie in [0, 1), got 1.0": {"beta2": 1.0},
        "eps must be a finite number > 0, got 0.0": {"eps": 0.0},
        "lr must be a finite number >= 0 (0 = the default), got inf": {"lr": float("inf")},
    }
    for message, values in cases.items():
        with pytest.raises(ValueError, match=re.escape(f"row optimizer adam: {message}")):
            RowOptimizerConfig("adam", **values)
