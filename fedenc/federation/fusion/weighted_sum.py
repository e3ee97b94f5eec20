"""``weighted_sum``, the patent's rule and the default (= FedAvg).

Update rule, over the round's accepted replies i::

    w_i = n_i / Σ_j n_j          target = Σ_i w_i θ_i

Why: the claims weight each child by its number of training samples so that children count in
proportion to their data, then fuse the weighted sets by a preset rule. The rule must be the *sum*:
the weights already sum to 1, and taking the *mean* of the weighted sets would shrink the encoder by
1/K every round (K equal sets θ would come back as θ/K).

Row weighting (the item table): an embedding row that a child's users never touched still moves
during its local training (every item is a negative of the full softmax, and Adam takes steps of
about the learning rate whatever the gradient's size), so a plain average mixes each tail item's
learned row with the noise of the children that never saw it. The round's row-weighted tensors are
therefore fused row by row, each child weighted by its row weight (the samples of its own data
that touch the row): ``row_r = Σ_i c_ir θ_ir / Σ_i c_ir``; a row no child touched keeps the
target's value. A child that sends no row weights counts ``n_i`` for every row.

Streaming: ``Σ n_i θ_i`` is accumulated in place into one reused buffer
(:class:`~fedenc.federation.fusion.accumulator.WeightedAccumulator`) and divided by ``Σ n_i`` once,
at the end, so the weights renormalise over whoever actually replied and no reply is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    checks_values = True  # tensor by tensor as it folds (WeightedAccumulator.add)
    row_weighted = True

    def __init__(self, accumulator_dtype: str = "auto") -> None:
        super().__init__()
        self._accumulator = WeightedAccumulator(parse_accumulator_dtype(accumulator_dtype))

    @property
    def buffer(self) -> torch.Tensor | None:
        """The flat accumulation buffer (reused across rounds)."""
        return self._accumulator.buffer

    def child_weights(self) -> dict[str, float] | None:
        weights = {child: self._weight(n) for child, n in self.num_samples.items()}
        total = sum(weights.values())
        return {child: w / total for child, w in weights.items()} if total else {}

    def _weight(self, num_samples: int) -> float:
        return float(num_samples)

    def _begin(self, current: Parameters) -> None:
        self._accumulator.reset(current)
        self._row_sums = {
            name: torch.zeros(
                current[name].shape[0], dtype=torch.float64, device=current[name].device
            )
            for name in self.row_names
        }

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        self._accumulator.add(params, self._weight(num_samples), child)

    def _add_rows(
        self, child: str, params: Parameters, num_samples: int, rows: Mapping[str, torch.Tensor]
    ) -> None:
        weight = self._weight(num_samples)
        acc = self._accumulator
        for name, view in acc.sums().items():
            row = rows.get(name)
            if row is None:
                view.add_(params[name], alpha=weight)
                if name in self._row_sums:
                    self._row_sums[name] += weight
            else:
                shape = (-1,) + (1,) * (view.dim() - 1)
                view.addcmul_(params[name], row.to(view.dtype).view(shape))
                self._row_sums[name] += row
        acc.total_weight += weight
        acc.count += 1

    def _fuse(self) -> Parameters:
        out = self._accumulator.weighted_mean(self.current)
        sums = self._accumulator.sums()
        for name, total in self._row_sums.items():
            touched = total > 0
            fused = self.current[name].clone()  # rows nobody touched keep the target's value
            if bool(touched.any()):
                mean = sums[name][touched] / total[touched].to(sums[name].dtype).unsqueeze(-1)
                fused[touched] = mean.to(fused.dtype)
            out[name] = fused
        return out
