"""``mean``: the uniform average, ``target = (1/K) Σ_i θ_i`` over the K accepted replies.

Why: the baseline that ignores sample counts; every child counts the same, whatever its data size
(useful when sample counts are untrusted or very skewed). Streaming, like ``weighted_sum``, with
every weight 1.
"""

from __future__ import annotations

from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.fusion.weighted_sum import WeightedSum


@register_fusion_rule("mean")
class Mean(WeightedSum):
    """``target = Σ θ_i / K``, folded in as replies arrive (row weights ignored)."""

    row_weighted = False

    def _weight(self, num_samples: int) -> float:
        return 1.0
