"""``krum`` and ``multi_krum`` (Blanchard et al. 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent").

Update rule, for K accepted sets and an assumed number ``f`` of Byzantine children::

    d_ij    = ‖θ_i − θ_j‖²                      (over all tensors)
    score_i = sum of the K − f − 2 smallest d_ij, j ≠ i
    krum:       target = θ_i* with the lowest score
    multi_krum: target = mean of the m lowest-scoring sets (weighted by n_i, as Flower does,
                or uniform with weighted=False); m defaults to K − f

Why: an honest update sits in a dense cluster of other honest updates, so its distance to its
K − f − 2 nearest neighbours is small, while a Byzantine update far away scores high whatever it
is; Krum picks a set that is provably close to the honest ones when 2f + 2 < K. Multi-Krum averages
several such sets to get back most of the variance reduction of averaging. Batch rule (pairwise
distances). Ties go to the child whose name sorts first, so arrival order does not matter.
"""

from __future__ import annotations

from typing import Any

import torch

from fedenc.federation.fusion.base import BatchFusionRule
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.parameters import Parameters, cast_like, squared_distance


def _check_int(option: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return value


def krum_scores(updates: list[Parameters], num_malicious: int) -> list[float]:
    """Each set's Krum score: the sum of its K − f − 2 smallest squared distances to the others."""
    k = len(updates)
    closest = k - num_malicious - 2
    if closest < 1:
        raise ValueError(
            f"num_malicious={num_malicious} leaves no neighbour to score {k} update(s) with: "
            f"Krum needs at least num_malicious + 3 updates"
        )
    distances = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            distances[i][j] = distances[j][i] = squared_distance(updates[i], updates[j])
    return [sum(sorted(distances[i][j] for j in range(k) if j != i)[:closest]) for i in range(k)]


@register_fusion_rule("multi_krum")
class MultiKrum(BatchFusionRule):
    """Average of the ``num_selected`` sets with the lowest Krum scores."""

    def __init__(
        self, num_malicious: int = 0, num_selected: int | None = None, weighted: bool = True
    ) -> None:
        super().__init__()
        self.num_malicious = _check_int("num_malicious", num_malicious, 0)
        self.num_selected = (
            None if num_selected is None else _check_int("num_selected", num_selected, 1)
        )
        self.weighted = bool(weighted)
        self.selected: list[str] = []
        """The children whose sets made up the last result."""
        self._chosen_weights: dict[str, float] = {}

    def child_weights(self) -> dict[str, float] | None:
        """The selected children's weights; the others weigh 0 (after :meth:`result`)."""
        return {child: self._chosen_weights.get(child, 0.0) for child in self.num_samples}

    def details(self) -> dict[str, Any]:
        return {"selected": list(self.selected)}

    @property
    def min_updates(self) -> int:
        return max(self.num_malicious + 3, self.num_selected or 1)

    def _fuse(self) -> Parameters:
        updates = self._sorted_updates()
        k = len(updates)
        m = k - self.num_malicious if self.num_selected is None else self.num_selected
        if m > k:
            raise ValueError(f"num_selected={m} is more than the {k} update(s) of this round")
        scores = krum_scores([params for _, params, _ in updates], self.num_malicious)
        best = sorted(range(k), key=lambda i: (scores[i], i))[:m]
        chosen = [updates[i] for i in best]
        self.selected = [child for child, _, _ in chosen]
        weights = [float(n) if self.weighted else 1.0 for _, _, n in chosen]
        total = sum(weights)
        self._chosen_weights = {
            child: w / total for (child, _, _), w in zip(chosen, weights, strict=True)
        }
        out: Parameters = {}
        for name, ref in self.current.items():
            if len(chosen) == 1:
                out[name] = chosen[0][1][name].clone()
                continue
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for (_, params, _), weight in zip(chosen, weights, strict=True):
                acc.add_(params[name], alpha=weight)
            out[name] = cast_like(acc / total, ref)
        return out


@register_fusion_rule("krum")
class Krum(MultiKrum):
    """The single set with the lowest Krum score, unchanged."""

    def __init__(self, num_malicious: int = 0) -> None:
        super().__init__(num_malicious=num_malicious, num_selected=1)
