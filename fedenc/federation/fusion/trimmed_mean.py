"""``trimmed_mean``: the coordinate-wise β-trimmed mean (FedTrimmedAvg, Yin et al. 2018).

Update rule, per coordinate: sort the K values, drop the ``⌊βK⌋`` smallest and the ``⌊βK⌋`` largest,
and take the plain mean of the rest. ``β = 0`` is the uniform mean; β must stay below 0.5 so that
something is left. Sample counts are ignored.

Why: it tolerates up to ``⌊βK⌋`` outliers on each side like the median, while averaging the honest
middle, which is less noisy than a single middle value. Batch rule.
"""

from __future__ import annotations

import math

import torch

from fedenc.federation.fusion.base import BatchFusionRule
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.parameters import Parameters, cast_like


@register_fusion_rule("trimmed_mean")
class TrimmedMean(BatchFusionRule):
    """Coordinate-wise mean after trimming ``⌊beta·K⌋`` values from each side."""

    def child_weights(self) -> dict[str, float] | None:
        return None  # which values are trimmed differs coordinate by coordinate

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if not (isinstance(beta, int | float) and 0.0 <= beta < 0.5):
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def _fuse(self) -> Parameters:
        updates = [params for _, params, _ in self._sorted_updates()]
        k = len(updates)
        cut = math.floor(self.beta * k)
        out: Parameters = {}
        for name, ref in self.current.items():
            stacked = torch.stack([params[name] for params in updates])
            if not stacked.is_floating_point():
                stacked = stacked.double()
            kept = stacked.sort(dim=0).values[cut : k - cut] if cut else stacked
            out[name] = cast_like(kept.mean(dim=0), ref)
        return out
