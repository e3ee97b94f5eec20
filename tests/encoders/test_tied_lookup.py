"""The tied input lookup gives autograd's gradients, through the loss's gradient or without it."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn import functional as F

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders.layers import tied_lookup
from fedenc.encoders.layers.full_softmax import full_softmax_cross_entropy
from fedenc.encoders.layers.tied_lookup import TableGradTie, current_tie, tied, tied_embedding
from fedenc.encoders.registry import build_encoder


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("encoder", ["srgnn", "edge_attn", "skip_rnn"])
@pytest.mark.parametrize("normalize", [False, True])
def test_encoder_loss_gradients_equal_autograd_of_the_scores(encoder: str, normalize: bool) -> None:
    torch.manual_seed(3)
    model = build_encoder(encoder, 60, hidden=8, normalize=normalize)
    batch = batch_from_sessions([[1, 2, 3, 2], [4, 4, 5, 6], [7], [60, 1, 60]])
    batch.targets = torch.tensor([4, 7, 60, 2])
    F.cross_entropy(model(batch), batch.targets - 1).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    model.loss(batch).backward()
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.count_nonzero(got["embedding.weight"][0]) == 0  # padding row


def _lookup_and_loss(table: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, extra: bool):
    with tied(table) as tie:
        x = tied_embedding(items, table)
        if extra:  # a second lookup whose output reaches the loss: the dense fallback path
            x = x + 0.5 * tied_embedding(items.flip(1), table)
        session = torch.tanh(x.sum(1))
    return full_softmax_cross_entropy(session, table, targets, True, chunk=7, tie=tie), tie


@pytest.mark.parametrize("extra", [False, True])
def test_function_level_gradients(extra: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(40, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    items = torch.tensor([[1, 2, 0], [3, 3, 39], [0, 0, 7]])
    targets = torch.tensor([2, 39, 11])

    x = F.embedding(items, table, padding_idx=0)
    if extra:
        x = x + 0.5 * F.embedding(items.flip(1), table, padding_idx=0)
    weights = F.normalize(table[1:], dim=-1)
    ref = F.cross_entropy(torch.tanh(x.sum(1)) @ weights.t(), targets - 1)
    (expected,) = torch.autograd.grad(ref, (table,))

    loss, tie = _lookup_and_loss(table, items, targets, extra)
    assert tie.lookups == (2 if extra else 1)
    loss.backward()
    assert table.grad is not None
    torch.testing.assert_close(table.grad, expected, rtol=1e-10, atol=1e-12)
    assert tie.take() is None  # handed over, nothing kept


def test_a_lookup_that_never_reaches_the_loss_still_gives_the_loss_gradient() -> None:
    gen = torch.Generator().manual_seed(6)
    table = torch.randn(30, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    session = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([1, 29, 15])
    (expected,) = torch.autograd.grad(
        full_softmax_cross_entropy(session, table, targets, True), (table,)
    )
    with tied(table) as tie:
        tied_embedding(torch.tensor([[1, 2]]), table)  # joins the tie, output discarded
    full_softmax_cross_entropy(session, table, targets, True, tie=tie).backward()
    # The end-of-pass callback delivered the handed-over gradient.
    assert table.grad is not None
    torch.testing.assert_close(table.grad, expected)


def test_existing_grad_is_accumulated_by_the_fallback() -> None:
    table = torch.randn(30, 4, dtype=torch.float64, requires_grad=True)
    session = torch.randn(3, 4, dtype=torch.float64)
    targets = torch.tensor([1, 29, 15])
    (once,) = torch.autograd.grad(full_softmax_cross_entropy(session, table, targets, False), table)
    table.grad = torch.ones_like(table)
    with tied(table) as tie:
        tied_embedding(torch.tensor([[3]]), table)
    full_softmax_cross_entropy(session, table, targets, False, tie=tie).backward()
    torch.testing.assert_close(table.grad, once + 1)


def test_no_tie_outside_the_block_or_for_another_table_or_without_grad() -> None:
    table = torch.randn(10, 3, requires_grad=True)
    other = torch.randn(10, 3, requires_grad=True)
    items = torch.tensor([[1, 0, 4]])
    assert current_tie(table) is None
    with tied(table) as tie:
        assert current_tie(table) is tie
        assert current_tie(other) is None
        with torch.no_grad():
            out = tied_embedding(items, table)
        assert out.grad_fn is None and tie.lookups == 0
        torch.testing.assert_close(tied_embedding(items, table), F.embedding(items, table))
        assert tie.lookups == 1
    assert current_tie(table) is None


def test_ties_are_per_thread() -> None:
    table = torch.randn(10, 3, requires_grad=True)
    seen: list[TableGradTie | None] = []
    with tied(table):
        worker = threading.Thread(target=lambda: seen.append(current_tie(table)))
        worker.start()
        worker.join()
    assert seen == [None]


def test_training_with_the_tie_equals_training_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten Adam steps of the real encoder give the same weights with and without the tie."""
    batch = batch_from_sessions([[1, 2, 3, 2], [4, 4, 5, 6], [7, 8], [30, 1, 30]])
    batch.targets = torch.tensor([4, 7, 29, 2])

    def train() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_encoder("srgnn", 30, hidden=8)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(10):
            opt.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    with_tie = train()
    monkeypatch.setattr(tied_lookup, "current_tie", lambda table: None)
    without = train()
    for a, b in zip(with_tie, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
