"""Ranking metrics: ranks with ties, Recall@K / MRR@K by hand, streaming equals one shot."""

from __future__ import annotations

import math

import pytest
import torch

from fedenc.training.metrics import RankingAccumulator, ranking_metrics, target_ranks


def test_target_ranks_count_ties_against_the_target() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]] * 4 + [[2.0, 2.0, 2.0, 2.0]])
    targets = torch.tensor([2, 3, 1, 4, 4])  # columns 1, 2, 0, 3; then a row of all ties
    # Items 2 and 3 tie at the top: each ranks 1, behind the other. A model scoring every item
    # alike ranks its target last, not first.
    assert target_ranks(logits, targets).tolist() == [1, 1, 2, 3, 3]


def test_target_ranks_use_column_target_minus_one() -> None:
    logits = torch.arange(10.0)[None, :].repeat(3, 1)  # item j + 1 scores j
    targets = torch.tensor([10, 1, 5])
    assert target_ranks(logits, targets).tolist() == [0, 9, 5]


def test_recall_and_mrr_by_hand() -> None:
    acc = RankingAccumulator(ks=(20, 3))
    acc.update(torch.tensor([0, 2, 5, 25]))
    got = acc.result()
    assert got["examples"] == 4
    assert got["recall@20"] == pytest.approx(75.0)
    assert got["mrr@20"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 6) / 4)
    assert got["recall@3"] == pytest.approx(50.0)
    assert got["mrr@3"] == pytest.approx(100 * (1 + 1 / 3) / 4)
    assert set(got) == {"recall@20", "mrr@20", "recall@3", "mrr@3", "examples"}


def test_ranking_metrics_on_logits_by_hand() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.0, 1.0]])
    targets = torch.tensor([1, 3, 1])  # ranks 0, 2, 2 (the last target ties with item 2)
    got = ranking_metrics([(logits, targets)], ks=(1, 2, 3))
    assert got["recall@1"] == pytest.approx(100 / 3)
    assert got["mrr@1"] == pytest.approx(100 / 3)
    assert got["recall@2"] == pytest.approx(100 / 3)
    assert got["mrr@2"] == pytest.approx(100 / 3)
    assert got["recall@3"] == pytest.approx(100)
    assert got["mrr@3"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 3) / 3)


def test_streaming_equals_one_shot() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(103, 40, generator=gen).round(decimals=1)  # plenty of ties
    targets = torch.randint(1, 41, (103,), generator=gen)
    whole = ranking_metrics([(logits, targets)], ks=(20, 10, 1))
    chunks = [(logits[i : i + 17], targets[i : i + 17]) for i in range(0, 103, 17)]
    streamed = ranking_metrics(chunks, ks=(20, 10, 1))
    assert whole.keys() == streamed.keys()
    for k in whole:
        assert streamed[k] == pytest.approx(whole[k], rel=1e-12), k
    assert whole["examples"] == 103
    # The same numbers from a per-example loop.
    ranks = [int((logits[i] >= logits[i, targets[i] - 1]).sum()) - 1 for i in range(103)]
    assert whole["recall@10"] == pytest.approx(100 * sum(r < 10 for r in ranks) / 103)
    assert whole["mrr@10"] == pytest.approx(100 * sum(1 / (r + 1) for r in ranks if r < 10) / 103)


def test_empty_accumulator_reports_zero() -> None:
    got = RankingAccumulator(ks=(20,)).result()
    assert got == {"recall@20": 0.0, "mrr@20": 0.0, "examples": 0.0}


def test_nan_scores_are_never_a_hit() -> None:
    """A diverged model (NaN logits) must not score a perfect Recall@K."""
    logits = torch.full((3, 30), math.nan)
    logits[2] = 0.0
    logits[2, 1] = math.nan
    targets = torch.tensor([1, 4, 2])
    # A NaN target ranks past every item; row 2's finite items do not tie with it.
    assert target_ranks(logits, targets).tolist() == [30, 30, 30]
    got = ranking_metrics([(logits, targets)], ks=(20, 1))
    assert got["recall@20"] == 0.0 and got["mrr@20"] == 0.0 and got["recall@1"] == 0.0
