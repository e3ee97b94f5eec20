"""A deferred table gradient is the loss's dense gradient (lookup and one-hot rows included),
its Adam step is torch's Adam on that gradient, and one no step took still reaches .grad."""

from __future__ import annotations

import pytest
import torch

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders.layers import native_softmax
from fedenc.encoders.layers.deferred_table_grad import deferring
from fedenc.encoders.layers.full_softmax import full_softmax_cross_entropy
from fedenc.encoders.layers.native_softmax import AdamHyper
from fedenc.encoders.registry import build_encoder

pytestmark = pytest.mark.usefixtures("native")

SESSIONS = [[1, 2, 3, 2], [4, 4, 5, 6], [7], [60, 1, 60], [9, 10, 11, 12, 13, 9]]
TARGETS = [4, 7, 60, 2, 60]  # a repeated target: its one-hot rows add up


def _model_and_batch(encoder: str = "srgnn", items: int = 60, hidden: int = 12):
    torch.manual_seed(7)
    model = build_encoder(encoder, items, hidden=hidden)
    batch = batch_from_sessions(SESSIONS)
    batch.targets = torch.tensor(TARGETS)
    return model, batch


def _dense_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.loss(batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("encoder", ["srgnn", "edge_attn", "skip_rnn"])
def test_materialized_equals_the_dense_gradient(encoder: str) -> None:
    model, batch = _model_and_batch(encoder)
    expected = _dense_grads(model, batch)
    model.zero_grad(set_to_none=True)
    table = model.embedding.weight
    calls = native_softmax.calls
    with deferring(table) as slot:
        model.loss(batch).backward()
        assert native_softmax.calls == calls + 1
        assert table.grad is None  # left to the optimizer
        pending = slot.take()
        assert pending is not None
        got = pending.materialize()
    torch.testing.assert_close(got, expected["embedding.weight"], rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(got[0]) == 0  # padding row
    for name, grad in expected.items():  # every other gradient as without the deferral
        if name != "embedding.weight":
            torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)


def test_a_deferred_gradient_no_step_took_reaches_grad() -> None:
    model, batch = _model_and_batch()
    expected = _dense_grads(model, batch)["embedding.weight"]
    model.zero_grad(set_to_none=True)
    with deferring(model.embedding.weight):
        model.loss(batch).backward()
        assert model.embedding.weight.grad is None
    torch.testing.assert_close(model.embedding.weight.grad, expected, rtol=1e-5, atol=1e-7)


def test_sparse_rows_are_grouped_in_order_and_skip_padding() -> None:
    model, batch = _model_and_batch()
    table = model.embedding.weight
    with deferring(table) as slot:
        model.loss(batch).backward()
        pending = slot.take()
    assert pending is not None
    pending._index.clear()
    pending._rows.clear()
    pending.add_rows(torch.tensor([5, 0, 3, 5]), torch.arange(4.0)[:, None].expand(4, 12))
    pending.add_rows(torch.tensor([[3]]), torch.full((1, 1, 12), 9.0))
    items, offsets, rows = pending.sparse()
    assert items.tolist() == [2, 4]  # 0-based items of table rows 3 and 5
    assert offsets.tolist() == [0, 2, 4]
    assert rows[:, 0].tolist() == [2.0, 9.0, 0.0, 3.0]  # each item's rows in the order added


def _deferred_with_moments(seed: int):
    """A deferred gradient over 300 items of width 20 (a masked tail vector), its dense form,
    and random Adam moments for the table."""
    model, batch = _model_and_batch(items=300, hidden=20)
    table = model.embedding.weight
    with deferring(table) as slot:
        model.loss(batch).backward()
        pending = slot.take()
    assert pending is not None
    gen = torch.Generator().manual_seed(seed)
    exp_avg = torch.randn(table.shape, generator=gen) * 1e-2
    exp_avg_sq = torch.rand(table.shape, generator=gen) * 1e-4
    return table, pending, pending.materialize(), exp_avg, exp_avg_sq


def test_the_deferred_step_is_the_dense_step_bit_for_bit() -> None:
    """Adam from the deferred gradient equals adam_rows on the materialised one, bit for bit:
    what lets the elastic data server (dense gradients) match the trainer exactly."""
    table, pending, grad, m0, v0 = _deferred_with_moments(seed=2)
    hyper = AdamHyper.of(3e-3, 0.9, 0.999, 1e-8, 1e-4, 3)
    dense, m1, v1 = table.detach().clone(), m0.clone(), v0.clone()
    native_softmax.adam_rows(dense, grad, m1, v1, hyper)
    m2, v2 = m0.clone(), v0.clone()
    pending.adam_step(m2, v2, hyper)
    assert torch.equal(table.detach(), dense)
    assert torch.equal(m2, m1) and torch.equal(v2, v1)


@pytest.mark.parametrize(("weight_decay", "step"), [(0.0, 1), (1e-5, 1), (1e-2, 7)])
def test_adam_step_is_torch_adam_on_the_dense_gradient(weight_decay: float, step: int) -> None:
    table, pending, grad, exp_avg, exp_avg_sq = _deferred_with_moments(seed=1)
    lr, betas, eps = 3e-3, (0.9, 0.999), 1e-8
    ref_param = table.detach().clone()
    ref_m, ref_v = exp_avg.clone(), exp_avg_sq.clone()
    ref_step = torch.tensor(float(step - 1))
    ref = torch.optim.Adam([torch.nn.Parameter(ref_param)], lr=lr, betas=betas, eps=eps)
    torch._fused_adam_(
        [ref_param], [grad], [ref_m], [ref_v], [], [ref_step.add_(1)], lr=lr,
        beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
        maximize=False,
    )  # fmt: skip
    del ref
    before = table.detach().clone()
    pending.adam_step(exp_avg, exp_avg_sq, AdamHyper.of(lr, *betas, eps, weight_decay, step))
    moved = (ref_param - before).abs().max()
    assert moved > 1e-4
    torch.testing.assert_close(table.detach(), ref_param, rtol=0, atol=float(moved) * 1e-4)
    torch.testing.assert_close(exp_avg, ref_m, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(exp_avg_sq, ref_v, rtol=1e-5, atol=1e-12)
    assert table._version > 0  # autograd sees the in-place update


def test_the_kernel_wrappers_refuse_bad_input() -> None:
    table, pending, grad, exp_avg, exp_avg_sq = _deferred_with_moments(seed=3)
    items = table.detach()[1:]
    hyper = AdamHyper.of(1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    good = (torch.tensor([1, 4]), torch.tensor([0, 1, 3]), torch.zeros(3, 20))

    def call(index, offsets, rows, session_f=None, inv_norm=pending.inv_norm):
        native_softmax.backward_adam(
            pending.blocks, pending.session_f if session_f is None else session_f, items,
            inv_norm, exp_avg[1:], exp_avg_sq[1:], index, offsets, rows, hyper,
        )  # fmt: skip

    with pytest.raises(ValueError, match="sorted, distinct"):
        call(torch.tensor([4, 1]), good[1], good[2])
    with pytest.raises(ValueError, match="sorted, distinct"):
        call(torch.tensor([1, 300]), good[1], good[2])
    with pytest.raises(ValueError, match="start at 0"):
        call(good[0], torch.tensor([1, 2, 3]), torch.zeros(3, 20))
    with pytest.raises(ValueError, match="session_f must be a float32"):
        call(*good, session_f=pending.session_f.double())
    with pytest.raises(ValueError, match="inv_norm must have"):
        call(*good, inv_norm=pending.inv_norm[:-1])
    with pytest.raises(ValueError, match="rows, 20 or more apart"):
        native_softmax.adam_rows(
            items.as_strided((4, 20), (1, 1)), grad[1:5], exp_avg[1:5], exp_avg_sq[1:5], hyper
        )
    with pytest.raises(ValueError, match="starts at 1"):
        AdamHyper.of(1e-3, 0.9, 0.999, 1e-8, 0.0, 0)


def test_the_adam_kernels_across_units_of_work() -> None:
    """Three units of work (2 threads), extra rows on the units' edges and repeated: adam_rows
    is torch's Adam to float rounding, and backward_adam is adam_rows bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        n, d = 24 * 2 * native_softmax.CHUNK + 5, 13  # a masked tail vector too
        gen = torch.Generator().manual_seed(3)
        items = torch.randn(n, d, generator=gen)
        session = torch.nn.functional.normalize(torch.randn(6, d, generator=gen), dim=1) * 4
        blocks, _, _, r = native_softmax.forward(session * 1.4426950408889634, items, True, False)
        session_f = torch.randn(6, d, generator=gen) * 0.01
        unit = 24 * native_softmax.CHUNK
        index = torch.tensor([0, unit - 1, unit, unit, 2 * unit - 1, 2 * unit, 2 * unit, n - 1])
        rows = torch.randn(len(index), d, generator=gen)
        hyper = AdamHyper.of(1e-2, 0.9, 0.999, 1e-8, 1e-2, 2)
        m0, v0 = torch.randn(n, d, generator=gen) * 1e-2, torch.rand(n, d, generator=gen) * 1e-4
        grad = torch.empty(n, d)
        native_softmax.backward(blocks, session_f, items, r, grad)
        grad.index_add_(0, index, rows)
        ref_p, ref_m, ref_v = items.clone(), m0.clone(), v0.clone()
        torch._fused_adam_(
            [ref_p], [grad], [ref_m], [ref_v], [], [torch.tensor(2.0)], lr=1e-2, beta1=0.9,
            beta2=0.999, weight_decay=1e-2, eps=1e-8, amsgrad=False, maximize=False,
        )  # fmt: skip
        p1, m1, v1 = items.clone(), m0.clone(), v0.clone()
        native_softmax.adam_rows(p1, grad, m1, v1, hyper)
        moved = float((ref_p - items).abs().max())
        torch.testing.assert_close(p1, ref_p, rtol=0, atol=moved * 1e-4)
        torch.testing.assert_close(v1, ref_v, rtol=1e-5, atol=1e-12)
        uniq, counts = torch.unique_consecutive(index, return_counts=True)
        offsets = torch.zeros(len(uniq) + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        p2, m2, v2 = items.clone(), m0.clone(), v0.clone()
        native_softmax.backward_adam(blocks, session_f, p2, r, m2, v2, uniq, offsets, rows, hyper)
        assert torch.equal(p2, p1) and torch.equal(m2, m1) and torch.equal(v2, v1)
    finally:
        torch.set_num_threads(before)


def test_rows_of_huge_norm_keep_their_gradient(monkeypatch) -> None:
    # r^3 alone underflows for norms past ~1e13; the kernels form r (h.e) r^2 as the PyTorch
    # path does.
    gen = torch.Generator().manual_seed(4)
    table = torch.randn(51, 16, generator=gen)
    table[5] *= 3e15
    session = torch.nn.functional.normalize(torch.randn(4, 16, generator=gen), dim=1) * 5
    targets = torch.tensor([5, 9, 17, 50])
    t64 = table.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(
        session.double() @ torch.nn.functional.normalize(t64[1:], dim=1).t(), targets - 1
    )
    (want,) = torch.autograd.grad(ref, t64)
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "1")
    t = table.clone().requires_grad_()
    (got,) = torch.autograd.grad(full_softmax_cross_entropy(session, t, targets, True), t)
    assert float((got[5].double() - want[5]).norm() / want[5].norm()) < 1e-5
