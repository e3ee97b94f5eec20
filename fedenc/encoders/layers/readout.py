"""Soft-attention session readout (SR-GNN's hybrid session vector).

For click states ``v_1..v_n`` with last click ``v_n``:

    α_t = qᵀ σ(W_1 v_n + W_2 v_t + c),   s_g = Σ_t α_t v_t,   s = W_3 [s_g ; v_n]

Padding clicks get no weight. ``out_features`` may differ from the state width, which lets an
encoder with concatenated position features (width 2d) return a d-wide session vector.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SoftAttentionReadout(nn.Module):
    """SR-GNN's session vector from click states of width ``in_features``: attention over the
    clicks keyed on the last one, joined with it, projected to ``out_features``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.w_last = nn.Linear(in_features, in_features)
        self.w_click = nn.Linear(in_features, in_features)
        self.q = nn.Linear(in_features, 1, bias=False)
        self.combine = nn.Linear(2 * in_features, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, clicks: Tensor, mask: Tensor, last: Tensor) -> Tensor:
        """``clicks`` (B, L, F), ``mask`` (B, L) bool, ``last`` (B,) index of the last click."""
        rows = torch.arange(clicks.shape[0], device=clicks.device)
        # Attention over the real clicks only, packed: a batch is padded to its longest session.
        return self.pooled(clicks[mask], mask.nonzero()[:, 0], clicks[rows, last])

    def pooled(self, real: Tensor, click_row: Tensor, v_last: Tensor) -> Tensor:
        """The same from the real clicks only: ``real`` (m, F), ``click_row`` (m,) the session of
        each, ``v_last`` (B, F) every session's last click."""
        alpha = self.q((self.w_last(v_last)[click_row] + self.w_click(real)).sigmoid())
        s_global = v_last.new_zeros(v_last.shape).index_add(0, click_row, alpha * real)
        out: Tensor = self.combine(torch.cat([s_global, v_last], dim=-1))
        return out

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_features}, {self.out_features})"
