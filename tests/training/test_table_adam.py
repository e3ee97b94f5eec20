"""TableAdam steps as torch's Adam does, takes the native loss's table gradient without its being
written out, and falls back to the dense gradient wherever it cannot."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders.registry import build_encoder
from fedenc.training.table_adam import TableAdam, deferring_table
from fedenc.training.trainer import training_step

pytestmark = pytest.mark.usefixtures("native")


def _batches(n: int, items: int = 80, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        sessions = [list(rng.integers(1, items + 1, rng.integers(1, 7))) for _ in range(12)]
        batch = batch_from_sessions(sessions)
        batch.targets = torch.as_tensor(rng.integers(1, items + 1, 12))
        out.append(batch)
    return out


def _pair(**adam):
    torch.manual_seed(11)
    model = build_encoder("srgnn", 80, hidden=12)
    twin = copy.deepcopy(model)
    options = {"lr": 1e-2, "weight_decay": 1e-4, "fused": True, **adam}
    return (
        model,
        TableAdam(model.parameters(), table=model.embedding.weight, **options),
        twin,
        torch.optim.Adam(twin.parameters(), **options),
    )


def _assert_same(model, twin, rtol: float = 0.0, atol: float = 0.0) -> None:
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def test_steps_agree_with_torch_adam_and_leave_no_dense_gradient() -> None:
    model, opt, twin, ref = _pair()
    for batch in _batches(6):
        a = training_step(model, opt, batch)
        b = training_step(twin, ref, batch)
        assert a == pytest.approx(b, rel=1e-5)
        assert model.embedding.weight.grad is None  # deferred: never materialised
        assert twin.embedding.weight.grad is not None
    _assert_same(model, twin, rtol=1e-4, atol=1e-6)
    mine, theirs = opt.state[model.embedding.weight], ref.state[twin.embedding.weight]
    assert float(mine["step"]) == float(theirs["step"]) == 6
    torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"], rtol=1e-4, atol=1e-8)
    # The state is torch's own: it loads into a plain Adam.
    plain = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    plain.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("option", [{"amsgrad": True}, {"maximize": True}])
def test_options_it_does_not_cover_keep_the_dense_gradient(option) -> None:
    model, opt, twin, ref = _pair(**option)
    for batch in _batches(3):
        training_step(model, opt, batch)
        training_step(twin, ref, batch)
        assert model.embedding.weight.grad is not None
    _assert_same(model, twin)


def test_a_second_table_gradient_joins_the_deferred_one() -> None:
    model, opt, twin, ref = _pair()
    for batch in _batches(3):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=True)
            with deferring_table(o, m.embedding.weight):
                loss = m.loss(batch) + 1e-3 * m.embedding.weight.square().sum()
                loss.backward()
                o.step()
    _assert_same(model, twin, rtol=1e-4, atol=1e-6)


def test_a_deferred_gradient_without_a_step_is_accumulated() -> None:
    model, opt, twin, _ = _pair()
    batch = _batches(1)[0]
    with opt.deferring(model.embedding.weight):
        model.loss(batch).backward()
    twin.loss(batch).backward()
    torch.testing.assert_close(
        model.embedding.weight.grad, twin.embedding.weight.grad, rtol=1e-5, atol=1e-7
    )


def test_carried_moments_in_torch_format_are_used() -> None:
    model, opt, twin, ref = _pair()
    batches = _batches(4)
    for batch in batches[:2]:
        training_step(twin, ref, batch)
    # A TableAdam picking up a plain Adam's state (a child resuming with carried moments).
    model.load_state_dict(twin.state_dict())
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    for batch in batches[2:]:
        training_step(model, opt, batch)
        training_step(twin, ref, batch)
        assert model.embedding.weight.grad is None
    _assert_same(model, twin, rtol=1e-4, atol=1e-6)


def test_dense_and_deferred_steps_give_the_same_table_bit_for_bit() -> None:
    """A TableAdam fed dense gradients (the elastic data server, the PS trainer) steps the
    table exactly as the deferred trainer step does."""
    model, opt, twin, _ = _pair()
    twin_opt = TableAdam(twin.parameters(), table=twin.embedding.weight, lr=1e-2,
                         weight_decay=1e-4, fused=True)  # fmt: skip
    for batch in _batches(4):
        training_step(model, opt, batch)
        twin_opt.zero_grad(set_to_none=True)
        twin.loss(batch).backward()  # no deferral: a dense gradient
        assert twin.embedding.weight.grad is not None
        twin_opt.step()
    _assert_same(model, twin)
    torch.testing.assert_close(
        opt.state[model.embedding.weight]["exp_avg_sq"],
        twin_opt.state[twin.embedding.weight]["exp_avg_sq"],
        rtol=0,
        atol=0,
    )


def test_a_frozen_table_is_not_stepped() -> None:
    model, opt, _, _ = _pair()
    model.embedding.weight.requires_grad_(False)
    before = model.embedding.weight.detach().clone()
    training_step(model, opt, _batches(1)[0])
    assert torch.equal(model.embedding.weight, before)
    assert model.embedding.weight not in opt.state


def test_a_closure_steps_the_table_as_torch_adam_does() -> None:
    model, opt, twin, ref = _pair()
    batch = _batches(1)[0]
    for m, o in ((model, opt), (twin, ref)):

        def closure(m=m, o=o) -> float:
            o.zero_grad(set_to_none=True)
            loss = m.loss(batch)
            loss.backward()
            return float(loss.detach())

        with deferring_table(o, m.embedding.weight):
            o.step(closure)
    _assert_same(model, twin, rtol=1e-5, atol=1e-7)
    assert not torch.equal(model.embedding.weight, _pair()[0].embedding.weight)


def test_zero_grad_drops_a_deferred_gradient() -> None:
    model, opt, _, _ = _pair()
    before = model.embedding.weight.detach().clone()
    with opt.deferring(model.embedding.weight):
        model.loss(_batches(1)[0]).backward()
        opt.zero_grad(set_to_none=True)
        opt.step()
    assert torch.equal(model.embedding.weight, before)
    assert model.embedding.weight.grad is None


def test_a_backward_after_the_block_gives_the_dense_gradient() -> None:
    model, opt, twin, _ = _pair()
    batch = _batches(1)[0]
    with opt.deferring(model.embedding.weight):
        loss = model.loss(batch)
    loss.backward()
    twin.loss(batch).backward()
    torch.testing.assert_close(
        model.embedding.weight.grad, twin.embedding.weight.grad, rtol=1e-5, atol=1e-7
    )


def test_step_hooks_run_once_even_after_a_plain_adam_exists() -> None:
    model, opt, _, _ = _pair()  # _pair builds a plain torch Adam too
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))
    training_step(model, opt, _batches(1)[0])
    assert calls == [1]
