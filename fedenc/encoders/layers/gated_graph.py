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

    def forward(
        self, h: Tensor, adj_in: Tensor, adj_out: Tensor, node_mask: Tensor | None = None
    ) -> Tensor:
        """One propagation step. With ``node_mask`` (B, U) the dense projections and the GRU run on
        the real nodes only (a batch padded to its longest session is mostly padding); padding
        nodes then come out as zeros."""
        weight = torch.cat([self.edge_in.weight, self.edge_out.weight], 0)
        bias = torch.cat([self.edge_in.bias, self.edge_out.bias], 0)
        if node_mask is None:
            proj = F.linear(h, weight, bias)
            p_in, p_out = torch.split(proj, self.hidden, dim=-1)
            msg = torch.cat(
                [torch.bmm(adj_in, p_in) + self.b_iah, torch.bmm(adj_out, p_out) + self.b_oah], -1
            )
            return self._gru(msg, h)
        h_real = h[node_mask]  # (n, H)
        proj = h.new_zeros(*node_mask.shape, 2 * self.hidden)
        proj[node_mask] = F.linear(h_real, weight, bias)
        p_in, p_out = torch.split(proj, self.hidden, dim=-1)
        msg = torch.cat([torch.bmm(adj_in, p_in), torch.bmm(adj_out, p_out)], -1)[node_mask]
        msg = msg + torch.cat([self.b_iah, self.b_oah])
        out = h.new_zeros(h.shape)
        out[node_mask] = self._gru(msg, h_real)
        return out

    def _gru(self, msg: Tensor, h: Tensor) -> Tensor:
        return gru_update(self.w_ih(msg), self.w_hh(h), h)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden})"


def gru_update(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """The GRU blend shared by the graph layers: ``gi`` = message projections (…, 3H), ``gh`` =
    state projections (…, 3H), ``h`` = current state (…, H)."""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return new + update * (h - new)
