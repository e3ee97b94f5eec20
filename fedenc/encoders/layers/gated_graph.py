"""Gated graph propagation over a session graph (SR-GNN, Wu et al., AAAI 2019).

One step, for node states ``h`` (B, U, H) and normalised adjacencies ``A_in``, ``A_out``:

    a   = [A_in (h W_in + b_in) + b_iah ; A_out (h W_out + b_out) + b_oah]     (B, U, 2H)
    r   = σ(a W_ir + h W_hr),   z = σ(a W_iz + h W_hz)
    ñ   = tanh(a W_in' + r ⊙ (h W_hn))
    h'  = ñ + z ⊙ (h − ñ)

(a GRU update whose input is the message aggregated along incoming and outgoing edges).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class GatedGraphCell(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.edge_in = nn.Linear(hidden, hidden)
        self.edge_out = nn.Linear(hidden, hidden)
        self.b_iah = nn.Parameter(torch.empty(hidden))
        self.b_oah = nn.Parameter(torch.empty(hidden))
        self.w_ih = nn.Linear(2 * hidden, 3 * hidden)
        self.w_hh = nn.Linear(hidden, 3 * hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, h: Tensor, adj_in: Tensor, adj_out: Tensor) -> Tensor:
        # Both edge projections in one GEMM, then the two bmm's over the (small) adjacency.
        proj = F.linear(
            h,
            torch.cat([self.edge_in.weight, self.edge_out.weight], 0),
            torch.cat([self.edge_in.bias, self.edge_out.bias], 0),
        )
        p_in, p_out = torch.split(proj, self.hidden, dim=-1)
        msg = torch.cat(
            [torch.bmm(adj_in, p_in) + self.b_iah, torch.bmm(adj_out, p_out) + self.b_oah], -1
        )
        gi = self.w_ih(msg)
        gh = self.w_hh(h)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        reset = torch.sigmoid(i_r + h_r)
        update = torch.sigmoid(i_z + h_z)
        new = torch.tanh(i_n + reset * h_n)
        return new + update * (h - new)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden})"
