"""``clipped_mean``: the weighted mean of norm-clipped deltas.

Update rule, with x the current target and C the clip norm::

    δ_i = θ_i − x            s_i = min(1, C / ‖δ_i‖)      (‖·‖ over all tensors)
    target = x + Σ_i n_i s_i δ_i / Σ_i n_i                (uniform n_i = 1 with weighted=False)

Why: bounding each child's influence on the step to C/K·(its weight) stops one child with an
exploding or malicious update from throwing the encoder far away, while honest updates (norm below
C) pass unchanged, so the rule reduces to ``weighted_sum`` when nothing is clipped. It is also the
clipping step of DP-FedAvg (without the noise).

Streaming: ``Σ n_i s_i δ_i = Σ n_i s_i θ_i − (Σ n_i s_i) x``, so only ``Σ n_i s_i θ_i`` goes into
the one reused buffer; the norm needs one temporary the size of one tensor, not of a model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedenc.federation.fusion.accumulator import WeightedAccumulator, parse_accumulator_dtype
from fedenc.federation.fusion.base import FusionRule
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.parameters import Parameters, cast_like, squared_distance


def delta_norm(params: Parameters, current: Parameters) -> float:
    """``‖θ − x‖`` over all tensors."""
    return math.sqrt(squared_distance(params, current))


@register_fusion_rule("clipped_mean")
class ClippedMean(FusionRule):
    """Weighted mean of the children's deltas, each clipped to L2 norm ``clip_norm``."""

    streaming = True

    def __init__(
        self, clip_norm: float = 1.0, weighted: bool = True, accumulator_dtype: str = "auto"
    ) -> None:
        super().__init__()
        if (
            isinstance(clip_norm, bool)
            or not isinstance(clip_norm, int | float)
            or not (clip_norm > 0 and math.isfinite(clip_norm))
        ):
            raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        self.clip_norm = float(clip_norm)
        self.weighted = bool(weighted)
        self._accumulator = WeightedAccumulator(parse_accumulator_dtype(accumulator_dtype))
        self._denominator = 0.0
        self.scales: dict[str, float] = {}
        """Each accepted child's clip factor s_i this round (1.0 = not clipped)."""

    @property
    def buffer(self) -> torch.Tensor | None:
        """The flat accumulation buffer (reused across rounds)."""
        return self._accumulator.buffer

    def _begin(self, current: Parameters) -> None:
        self._accumulator.reset(current)
        self._denominator = 0.0
        self.scales = {}

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        norm = delta_norm(params, self.current)
        scale = 1.0 if norm <= self.clip_norm else self.clip_norm / norm
        weight = float(num_samples) if self.weighted else 1.0
        self._accumulator.add(params, weight * scale)
        self._denominator += weight
        self.scales[child] = scale

    def child_weights(self) -> dict[str, float] | None:
        """w_i s_i / Σ w: each child's weight on its (clipped) set; the rest, 1 − Σ, stays on
        the current target."""
        samples = self.num_samples
        raw = {c: (float(n) if self.weighted else 1.0) for c, n in samples.items()}
        total = sum(raw.values())
        return {c: w * self.scales.get(c, 1.0) / total for c, w in raw.items()} if total else {}

    def details(self) -> dict[str, Any]:
        return {"clip_scales": dict(self.scales)}

    def _fuse(self) -> Parameters:
        # x + (A − W x) / N  =  A / N + (1 − W / N) x,  A = Σ w s θ, W = Σ w s, N = Σ w
        keep = 1.0 - self._accumulator.total_weight / self._denominator
        out: Parameters = {}
        for name, total in self._accumulator.sums().items():
            ref = self.current[name]
            value = total / self._denominator
            if keep != 0.0:
                value = value.add_(ref, alpha=keep)
            out[name] = cast_like(value, ref)
        return out
