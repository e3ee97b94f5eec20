"""count_ranks (fedenc.encoders.layers.ranking): block-wise ranks, capped, from any block source."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from fedenc.encoders.layers.ranking import count_ranks
from fedenc.training.metrics import target_ranks


def _blocks(
    items: torch.Tensor, sizes: list[int], pulled: list[int]
) -> Iterator[tuple[int, torch.Tensor]]:
    lo = 0
    for size in sizes:
        pulled.append(lo)
        yield lo, items[lo : lo + size]
        lo += size


@pytest.mark.parametrize("limit", [None, 1, 3, 50])
def test_ranks_from_uneven_blocks_equal_the_full_ranks(limit: int | None) -> None:
    torch.manual_seed(limit or 0)
    items, session = torch.randn(23, 4), torch.randn(6, 4)
    cols = torch.tensor([0, 22, 5, 11, 7, 3])
    items[9] = items[5]  # ties with session 2's target: counted against the target
    scores = session @ items.t()
    target_score = scores.gather(1, cols[:, None])[:, 0]
    target_score[4] = float("nan")  # a diverged session ranks last
    pulled: list[int] = []
    got = count_ranks(session, target_score, cols, _blocks(items, [5, 1, 9, 8], pulled), 23, limit)
    logits = scores.clone()
    logits[4] = float("nan")
    expected = target_ranks(logits, cols + 1)
    if limit is not None:
        expected = expected.clamp(max=limit)
        expected[4] = limit
    assert got.tolist() == expected.tolist()
    assert got.dtype == torch.int64


def test_no_block_is_pulled_once_every_session_has_left() -> None:
    items = torch.zeros(12, 2)
    items[:, 0] = torch.arange(12, 0, -1, dtype=torch.float32)  # item 0 scores highest
    session = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    cols = torch.tensor([10, 11])  # both targets are beaten by every item of the first block
    target_score = (session * items[cols]).sum(1)
    pulled: list[int] = []
    ranks = count_ranks(session, target_score, cols, _blocks(items, [4, 4, 4], pulled), 12, 2)
    assert ranks.tolist() == [2, 2]
    assert pulled == [0]  # the remaining blocks are never asked for (a PS is not pulled)


def test_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        count_ranks(torch.ones(1, 2), torch.ones(1), torch.zeros(1, dtype=torch.long), [], 3, 0)


def test_a_model_that_scores_every_item_alike_ranks_every_target_last() -> None:
    # Exact ties (integer-valued vectors, so the GEMM and the target's dot product agree to the
    # bit): a collapsed model must get no hit from them.
    items = torch.ones(30, 4)
    session = torch.tensor([[1.0, 2.0, 0.0, -1.0], [3.0, 0.0, 1.0, 1.0]])
    cols = torch.tensor([0, 17])
    target_score = (session * items[cols]).sum(1)
    ranks = count_ranks(session, target_score, cols, _blocks(items, [7, 23], []), 30, None)
    assert ranks.tolist() == [29, 29]
    capped = count_ranks(session, target_score, cols, _blocks(items, [7, 23], []), 30, 20)
    assert capped.tolist() == [20, 20]
