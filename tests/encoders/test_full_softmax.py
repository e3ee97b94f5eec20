"""The chunked full-softmax cross-entropy equals autograd's expression, values and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn import functional as F

from fedenc.data.batching import SessionBatch, batch_from_sessions
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.layers.full_softmax import (
    backward_blocks,
    combine_parts,
    forward_blocks,
    full_softmax_cross_entropy,
    inverse_norms,
)
from fedenc.encoders.registry import build_encoder


def _reference(session: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, norm: bool):
    weights = table[1:]
    if norm:
        weights = F.normalize(weights, dim=-1)
    return F.cross_entropy(session @ weights.t(), targets - 1)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("magnitude", [1.0, 60.0])  # 60: past the exp-keeping bound on logits
def test_matches_autograd(normalize: bool, chunk: int, magnitude: float) -> None:
    gen = torch.Generator().manual_seed(chunk)
    table = torch.randn(201, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    session = torch.randn(9, 6, dtype=torch.float64, generator=gen) * magnitude
    session.requires_grad_(True)
    targets = torch.randint(1, 201, (9,), generator=gen)
    targets[0] = 200  # the last item, in the last (possibly partial) chunk
    ref = _reference(session, table, targets, normalize)
    g_table, g_session = torch.autograd.grad(ref, (table, session))
    out = full_softmax_cross_entropy(session, table, targets, normalize, chunk=chunk)
    h_table, h_session = torch.autograd.grad(out, (table, session))
    assert float(out.detach()) == pytest.approx(float(ref.detach()), rel=1e-12)
    torch.testing.assert_close(h_table, g_table, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_session, g_session, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(h_table[0]) == 0  # the padding row gets no gradient


def test_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(30, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    session = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.tensor([1, 29, 15])
    assert torch.autograd.gradcheck(
        lambda s, t: full_softmax_cross_entropy(s, t, targets, True, chunk=8), (session, table)
    )


def test_rejects_bad_chunk() -> None:
    with pytest.raises(ValueError, match="chunk"):
        full_softmax_cross_entropy(
            torch.zeros(1, 2), torch.zeros(3, 2), torch.tensor([1]), False, 0
        )


@pytest.mark.parametrize("normalize", [False, True])
def test_encoder_loss_equals_cross_entropy_of_scores(normalize: bool) -> None:
    torch.manual_seed(0)
    model = build_encoder("srgnn", 50, hidden=8, normalize=normalize)
    batch = batch_from_sessions([[1, 2, 3], [4, 4, 5, 6], [7]])
    batch.targets = torch.tensor([4, 7, 50])
    expected = F.cross_entropy(model(batch), batch.targets - 1)
    assert float(model.loss(batch)) == pytest.approx(float(expected), rel=1e-5)


def test_frozen_scoring_gives_the_same_scores_and_is_released() -> None:
    torch.manual_seed(0)
    model = build_encoder("srgnn", 40, hidden=8).eval()
    batch = batch_from_sessions([[1, 2, 3], [3, 9]])
    with torch.no_grad():
        plain = model(batch)
        with model.frozen_scoring():
            frozen = model(batch)
        torch.testing.assert_close(frozen, plain)
        model.embedding.weight.mul_(2.0).add_(0.5)  # weights change after the block
        assert not torch.allclose(model(batch), plain)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_rank_targets_matches_ranks_of_full_logits(chunk: int) -> None:
    from fedenc.training.metrics import target_ranks

    torch.manual_seed(chunk)
    model = build_encoder("srgnn", 37, hidden=8).eval()
    batch = batch_from_sessions([[1, 2, 3], [3, 9], [5, 5, 6], [37, 1]])
    batch.targets = torch.tensor([1, 37, 12, 20])
    with torch.no_grad():
        expected = target_ranks(model(batch), batch.targets)
        assert model.rank_targets(batch, chunk=chunk).tolist() == expected.tolist()


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
@pytest.mark.parametrize("limit", [1, 2, 5, 20, 100])
@pytest.mark.parametrize("frozen", [False, True])  # frozen: items visited largest norm first
def test_rank_targets_with_a_limit_caps_the_exact_ranks(
    chunk: int, limit: int, frozen: bool
) -> None:
    # Sessions leave the scoring once `limit` items beat their target; the ranks below the limit
    # must stay exact, whichever block they leave in and in whichever order the items come, and
    # the NaN target must still rank last.
    from fedenc.training.metrics import target_ranks

    def ranks(model: SessionEncoder, batch: SessionBatch) -> list[int]:
        with model.frozen_scoring() if frozen else contextlib.nullcontext():
            return model.rank_targets(batch, chunk=chunk, limit=limit).tolist()

    torch.manual_seed(limit)
    model = build_encoder("srgnn", 37, hidden=8).eval()
    sessions = [[1, 2, 3], [3, 9], [5, 5, 6], [37, 1], [8], [2, 4, 8, 16], [30, 31], [11, 12]]
    batch = batch_from_sessions(sessions)
    with torch.no_grad():
        scores = model(batch)
        # Targets across the spread of ranks: best, worst and in between, and the last item.
        order = scores.argsort(1, descending=True)
        picks = [0, 36, 1, 4, 19, 2, 10, 3]
        batch.targets = torch.stack([order[i, p] for i, p in enumerate(picks)]) + 1
        batch.targets[3] = 37
        expected = target_ranks(scores, batch.targets).clamp(max=limit)
        assert ranks(model, batch) == expected.tolist()
        assert model.rank_targets(batch, chunk=chunk, limit=limit).dtype == torch.int64
        model.embedding.weight.data[36] = float("nan")  # a diverged row no session clicked
        batch.targets[1] = 36
        expected = target_ranks(model(batch), batch.targets).clamp(max=limit)
        assert expected[1] == min(37, limit)
        expected[1] = limit  # the NaN target ranks last: a miss at every K up to the limit
        assert ranks(model, batch) == expected.tolist()


def test_frozen_ranking_visits_the_largest_item_embeddings_first() -> None:
    torch.manual_seed(0)
    model = build_encoder("srgnn", 30, hidden=8).eval()
    with torch.no_grad():
        unit = F.normalize(torch.randn(30, 8), dim=1)
        model.embedding.weight[1:] = unit * torch.linspace(0.5, 3.0, 30)[:, None]
        model.embedding.weight[1 + 7].mul_(10.0)  # item 8 (column 7) becomes the largest
        assert model._ranking_table()[1] is None  # not frozen: item order
        with model.frozen_scoring():
            table, place = model._ranking_table()
            assert place is not None
            assert place[7] == 0 and place[29] == 1 and place[0] == 29
            torch.testing.assert_close(table[place], model.scoring_weights())
        assert "_frozen_ranking" not in model.__dict__  # released with the frozen scope


def test_rank_targets_rejects_a_limit_below_one() -> None:
    model = build_encoder("srgnn", 10, hidden=4).eval()
    batch = batch_from_sessions([[1, 2]])
    batch.targets = torch.tensor([3])
    with torch.no_grad(), pytest.raises(ValueError, match="limit"):
        model.rank_targets(batch, limit=0)


def test_exp_kept_blocks_need_the_forward_accumulator() -> None:
    """The kept-exp backward finishes a sum the forward started; without it, say so."""
    gen = torch.Generator().manual_seed(3)
    items = torch.randn(20, 4, generator=gen)
    session = torch.randn(2, 4, generator=gen)
    inv = inverse_norms(items)
    blocks, parts = forward_blocks(session, items, inv, True, 0, 20, 8)
    lse = combine_parts(parts, True)
    with pytest.raises(ValueError, match="grad_acc"):
        backward_blocks(
            blocks,
            0,
            8,
            session,
            items,
            inv,
            torch.tensor([0, 19]),
            lse,
            torch.tensor(0.5),
            True,
            torch.zeros(2, 4),
            torch.empty(21, 4),
        )
