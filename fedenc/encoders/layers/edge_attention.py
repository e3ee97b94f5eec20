"""Directed edge attention over a session graph (the "edge attention" of US20210374356A1).

For node states ``h`` (B, U, H) and the 0/1 edge matrix ``E`` (``E[b, j, i] = 1`` iff a click on
``j`` is followed by one on ``i``), each node ``i`` weighs each of its in-edges (``j → i``) and each
of its out-edges (``i → j``) separately. The score of an edge comes from the node's own feature
vector and the edge's relationship data, a correlation ``k_i ⊙ k_j`` of the two node features:

    k   = h W_k
    e_ij^d = LeakyReLU(a_d,selfᵀ k_i + a_d,nbrᵀ k_j + a_d,relᵀ (k_i ⊙ k_j))      d ∈ {in, out}
    α_i^d  = softmax_j over the d-neighbours of i only

Non-neighbours get exactly zero weight; a node with no neighbours in a direction gets an all-zero
weight row, so its aggregate for that direction is zero (no NaN). The node's new feature is the
attention-weighted combination of its in- and out-neighbours, fed into SR-GNN's GRU update with
the node's own state as the hidden state:

    m_i = [Σ_j α_ij^in (W_in h_j + b_in) ; Σ_j α_ij^out (W_out h_j + b_out)]      (B, U, 2H)
    r   = σ(m W_ir + h W_hr),   z = σ(m W_iz + h W_hz)
    ñ   = tanh(m W_in' + r ⊙ (h W_hn)),   h' = ñ + z ⊙ (h − ñ)

Everything is batched: the pairwise correlation term is one ``bmm`` over (B, 2U, H) × (B, H, U)
(``a_relᵀ (k_i ⊙ k_j) = (k_i ⊙ a_rel) · k_j``), so no (B, U, U, H) tensor is ever built.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedenc.encoders.layers.gated_graph import gru_update


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim restricted to ``mask``; masked entries are exactly 0 and a row
    with no allowed entry is all zeros (finite values and gradients everywhere)."""
    has_any = mask.any(dim=-1, keepdim=True)
    logits = logits.masked_fill(~mask, float("-inf"))
    # Empty rows would be all -inf (softmax → NaN): give them zeros, then zero their weights.
    logits = torch.where(has_any, logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=-1) * mask.to(logits.dtype)


class DirectedEdgeAttention(nn.Module):
    """One step of directed edge attention with a gated (GRU) node update."""

    def __init__(self, hidden: int, negative_slope: float = 0.2) -> None:
        super().__init__()
        self.hidden = hidden
        self.negative_slope = negative_slope
        self.key = nn.Linear(hidden, hidden, bias=False)
        # Rows: [in, out] attention vectors for the node itself, the neighbour and the relation.
        self.att_self = nn.Parameter(torch.empty(2, hidden))
        self.att_nbr = nn.Parameter(torch.empty(2, hidden))
        self.att_rel = nn.Parameter(torch.empty(2, hidden))
        self.value_in = nn.Linear(hidden, hidden)
        self.value_out = nn.Linear(hidden, hidden)
        self.w_ih = nn.Linear(2 * hidden, 3 * hidden)
        self.w_hh = nn.Linear(hidden, 3 * hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def attention(self, h: Tensor, edges: Tensor) -> tuple[Tensor, Tensor]:
        """Edge weights ``(alpha_in, alpha_out)``, each (B, U, U): ``alpha_in[b, i, j]`` is the
        weight node ``i`` gives its in-edge ``j → i``, ``alpha_out[b, i, j]`` its out-edge
        ``i → j``. Each non-empty row sums to 1; other entries are exactly 0."""
        bsz, num_nodes, _ = h.shape
        k = self.key(h)  # (B, U, H)
        # Relation term for both directions in one bmm: (B, 2U, H) × (B, H, U).
        query = (k[:, None, :, :] * self.att_rel[None, :, None, :]).reshape(bsz, 2 * num_nodes, -1)
        rel = torch.bmm(query, k.transpose(1, 2)).view(bsz, 2, num_nodes, num_nodes)
        own = k @ self.att_self.t()  # (B, U, 2): node term per direction
        nbr = k @ self.att_nbr.t()  # (B, U, 2): neighbour term per direction
        logits = rel + own.permute(0, 2, 1)[..., :, None] + nbr.permute(0, 2, 1)[..., None, :]
        logits = F.leaky_relu(logits, self.negative_slope)
        present = edges > 0
        mask = torch.stack([present.transpose(1, 2), present], dim=1)  # (B, 2, U, U)
        alpha = masked_softmax(logits, mask)
        return alpha[:, 0], alpha[:, 1]

    def forward(self, h: Tensor, edges: Tensor) -> Tensor:
        """New node states (B, U, H) from states ``h`` (B, U, H) and 0/1 ``edges`` (B, U, U)."""
        alpha_in, alpha_out = self.attention(h, edges)
        msg = torch.cat(
            [torch.bmm(alpha_in, self.value_in(h)), torch.bmm(alpha_out, self.value_out(h))], -1
        )
        return gru_update(self.w_ih(msg), self.w_hh(h), h)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden}, negative_slope={self.negative_slope})"
