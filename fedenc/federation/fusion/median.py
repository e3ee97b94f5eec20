"""``median``: the coordinate-wise median of the K accepted sets (FedMedian, Yin et al. 2018).

Update rule, per coordinate: sort the K values; target = the middle one (K odd) or the mean of the
two middle ones (K even). Sample counts are ignored.

Why: a minority of arbitrary (Byzantine or broken) children cannot drag a coordinate outside the
range of the honest values, where a single outlier moves a mean without bound. Batch rule: it needs
all K values of a coordinate at once.
"""

from __future__ import annotations

import torch

from fedenc.federation.fusion.base import BatchFusionRule
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.parameters import Parameters, cast_like


def _stack(updates: list[Parameters], name: str) -> torch.Tensor:
    return torch.stack([params[name] for params in updates])


@register_fusion_rule("median")
class Median(BatchFusionRule):
    """Coordinate-wise median (mean of the two middle values for even K)."""

    def child_weights(self) -> dict[str, float] | None:
        return None  # each coordinate comes from other children

    def _fuse(self) -> Parameters:
        updates = [params for _, params, _ in self._sorted_updates()]
        k = len(updates)
        out: Parameters = {}
        for name, ref in self.current.items():
            ordered = _stack(updates, name).sort(dim=0).values
            if k % 2:
                middle = ordered[k // 2]
            else:
                low, high = ordered[k // 2 - 1], ordered[k // 2]
                if not low.is_floating_point():
                    low, high = low.double(), high.double()
                middle = (low + high) / 2
            out[name] = cast_like(middle.clone(), ref)
        return out
