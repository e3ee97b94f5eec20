"""Ranking metrics over the full catalog: Recall@K (= P@20 of the SR-GNN papers) and MRR@K.

Instead of a top-K sort, each example's rank is the number of other items scored at least as
high as its target (one comparison pass over the logits): exact, cheap, and ties count against the
target (a degenerate model that scores many items alike gets no hits from the tie).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def target_ranks(logits: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target (column ``targets - 1``) among all items, shape (B,).

    A NaN target score (a diverged model) ranks last, past every item, so it is never a hit.
    """
    target_score = logits.gather(1, (targets - 1)[:, None])
    ranks = (logits >= target_score).sum(1) - 1  # the target itself is not counted
    return torch.where(target_score[:, 0].isnan(), logits.shape[1], ranks)


@dataclass
class RankingAccumulator:
    """Streams per-batch ranks into Recall@K / MRR@K (percent, like the papers)."""

    ks: Sequence[int] = (20, 10)
    count: int = 0
    hits: dict[int, float] = field(default_factory=dict)
    reciprocal: dict[int, float] = field(default_factory=dict)

    def update(self, ranks: Tensor) -> None:
        ranks = ranks.detach().to("cpu", torch.float64)
        self.count += int(ranks.numel())
        for k in self.ks:
            inside = ranks < k
            self.hits[k] = self.hits.get(k, 0.0) + float(inside.sum())
            self.reciprocal[k] = self.reciprocal.get(k, 0.0) + float(
                torch.where(inside, 1.0 / (ranks + 1.0), 0.0).sum()
            )

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"recall@{k}"] = 100.0 * self.hits.get(k, 0.0) / n
            out[f"mrr@{k}"] = 100.0 * self.reciprocal.get(k, 0.0) / n
        out["examples"] = float(self.count)
        return out


def ranking_metrics(
    batches: Iterable[tuple[Tensor, Tensor]], ks: Sequence[int] = (20, 10)
) -> dict[str, float]:
    """Recall@K / MRR@K over ``(logits, targets)`` batches."""
    acc = RankingAccumulator(ks=ks)
    for logits, targets in batches:
        acc.update(target_ranks(logits, targets))
    return acc.result()
