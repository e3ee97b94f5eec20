"""Carried Adam moments: exported and imported exactly, refused when they do not fit."""

from __future__ import annotations

import math

import pytest
import torch

from fedenc.federation.optimizer_state import (
    OptimizerStateError,
    check_moments,
    export_moments,
    import_moments,
)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 4, generator=gen)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


@pytest.mark.parametrize("fused", [True, False])
def test_a_handed_over_optimizer_continues_exactly_like_the_original(fused: bool) -> None:
    a = _model()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2, weight_decay=1e-5, fused=fused)
    for s in range(3):
        _step(a, opt_a, s)
    names = [n for n, _ in a.named_parameters()]
    moments = export_moments(opt_a, dict(a.named_parameters()), names)
    b = _model(seed=1)  # another child: its own parameters and a fresh optimizer
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-5, fused=fused)
    import_moments(opt_b, dict(b.named_parameters()), names, moments)
    _step(a, opt_a, 7)
    _step(b, opt_b, 7)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_a_parameter_without_steps_exports_what_adam_starts_from() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    moments = export_moments(opt, dict(model.named_parameters()), ["0.weight"])
    assert float(moments["0.weight/step"]) == 0.0
    assert not moments["0.weight/exp_avg"].any() and not moments["0.weight/exp_avg_sq"].any()


def _good() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ref = {"w": torch.zeros(2, 3)}
    moments = {"w/step": torch.tensor(4.0), "w/exp_avg": torch.ones(2, 3)}
    moments["w/exp_avg_sq"] = torch.ones(2, 3)
    return ref, moments


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.pop("w/exp_avg"), "missing"),
        (lambda m: m.update({"v/step": torch.tensor(1.0)}), "unexpected"),
        (lambda m: m.update({"w/exp_avg": torch.ones(3, 2)}), r"expected torch.float32 \(2, 3\)"),
        (lambda m: m.update({"w/exp_avg": torch.ones(2, 3, dtype=torch.float64)}), "float64"),
        (lambda m: m["w/exp_avg"].__setitem__((0, 0), math.nan), "NaN/Inf"),
        (lambda m: m["w/exp_avg_sq"].__setitem__((1, 1), -1.0), "negative"),
        (lambda m: m.update({"w/step": torch.tensor(-1.0)}), "step must be"),
    ],
)
def test_moments_that_do_not_fit_are_refused_with_the_reason(change: object, match: str) -> None:
    ref, moments = _good()
    check_moments(ref, ["w"], moments)
    change(moments)  # type: ignore[operator]
    with pytest.raises(OptimizerStateError, match=match):
        check_moments(ref, ["w"], moments)


def test_refused_moments_leave_the_optimizer_untouched() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _step(model, opt, 0)
    before = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    names = ["0.weight"]
    moments = export_moments(opt, dict(model.named_parameters()), names)
    moments["0.weight/exp_avg"][0, 0] = math.inf
    with pytest.raises(OptimizerStateError):
        import_moments(opt, dict(model.named_parameters()), names, moments)
    for key, value in before.items():
        assert torch.equal(opt.state[model[0].weight][key], value)


def test_only_adam_moments_are_carried() -> None:
    model = _model()
    with pytest.raises(OptimizerStateError, match="only Adam"):
        export_moments(torch.optim.SGD(model.parameters(), lr=0.1), {}, [])
