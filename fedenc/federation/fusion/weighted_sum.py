"""``weighted_sum``, the patent's rule and the default (= FedAvg).

Update rule, over the round's accepted replies i::

    w_i = n_i / Σ_j n_j          target = Σ_i w_i θ_i

Why: the claims weight each child by its number of training samples so that children count in
proportion to their data, then fuse the weighted sets by a preset rule. The rule must be the *sum*:
the weights already sum to 1, and taking the *mean* of the weighted sets would shrink the encoder by
1/K every round (K equal sets θ would come back as θ/K).

Streaming: ``Σ n_i θ_i`` is accumulated in place into one reused buffer
(:class:`~fedenc.federation.fusion.accumulator.WeightedAccumulator`) and divided by ``Σ n_i`` once,
at the end, so the weights renormalise over whoever actually replied and no reply is kept.
"""

from __future__ import annotations

import torch

from fedenc.federation.fusion.accumulator import WeightedAccumulator, parse_accumulator_dtype
from fedenc.federation.fusion.base import FusionRule
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.parameters import Parameters


@register_fusion_rule("weighted_sum", aliases=("fedavg",))
class WeightedSum(FusionRule):
    """``target = Σ n_i θ_i / Σ n_j`` (FedAvg), folded in as replies arrive.

    ``accumulator_dtype``: "auto" (float32, float64 when the model has float64 tensors),
    "float32" or "float64".
    """

    streaming = True

    def __init__(self, accumulator_dtype: str = "auto") -> None:
        super().__init__()
        self._accumulator = WeightedAccumulator(parse_accumulator_dtype(accumulator_dtype))

    @property
    def buffer(self) -> torch.Tensor | None:
        """The flat accumulation buffer (reused across rounds)."""
        return self._accumulator.buffer

    def _weight(self, num_samples: int) -> float:
        return float(num_samples)

    def _begin(self, current: Parameters) -> None:
        self._accumulator.reset(current)

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        self._accumulator.add(params, self._weight(num_samples))

    def _fuse(self) -> Parameters:
        return self._accumulator.weighted_mean(self.current)
