"""Gated graph propagation over a session graph (SR-GNN, Wu et al., AAAI 2019).

One step, for node states ``h`` (B, U, H) and normalised adjacencies ``A_in``, ``A_out``:

    a   = [A_in (h W_in + b_in) + b_iah ; A_out (h W_out + b_out) + b_oah]     (B, U, 2H)
    r   = σ(a W_ir + h W_hr),   z = σ(a W_iz + h W_hz)
    ñ   = tanh(a W_in' + r ⊙ (h W_hn))
    h'  = ñ + z ⊙ (h − ñ)

(a GRU update whose input is the message aggregated along incoming and outgoing edges).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class GatedGraphCell(nn.Module):
    """One step of gated graph propagation at node width ``hidden`` (the module's docstring has
    the update rule); padded (B, U, H) and packed (nodes, H) batches."""

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
        """One propagation step over a padded batch, ``h`` (B, U, H), adjacencies (B, U, U)."""
        p_in, p_out = self._edge_projections(h)
        msg = torch.cat(
            [torch.bmm(adj_in, p_in) + self.b_iah, torch.bmm(adj_out, p_out) + self.b_oah], -1
        )
        return self._gru(msg, h)

    def propagate_packed(self, h: Tensor, graph: PackedGraph) -> Tensor:
        """One propagation step over the real nodes of a batch only, ``h`` (n, H): messages run
        along ``graph``'s edge list (a gather and a scatter-add per direction), so no (B, U, U)
        adjacency or (B, U, ·) padding is touched. The same step as :meth:`forward`."""
        p_in, p_out = self._edge_projections(h)
        src, dst = graph.src, graph.dst
        zeros = h.new_zeros(h.shape[0], self.hidden)
        msg_in = zeros.index_add(0, dst, p_in[src] * graph.in_weight[:, None])
        msg_out = zeros.index_add(0, src, p_out[dst] * graph.out_weight[:, None])
        msg = torch.cat([msg_in, msg_out], -1) + torch.cat([self.b_iah, self.b_oah])
        return self._gru(msg, h)

    def fused(self) -> FusedGatedStep:
        """This cell's step with the edge projections folded into the GRU's input weights, for
        inference with weights that stay fixed (:class:`FusedGatedStep`). Not differentiable."""
        hid = self.hidden
        with torch.no_grad():
            w_ih_in, w_ih_out = self.w_ih.weight[:, :hid], self.w_ih.weight[:, hid:]
            weight = torch.cat(
                [w_ih_in @ self.edge_in.weight, w_ih_out @ self.edge_out.weight, self.w_hh.weight]
            )
            bias = torch.cat(
                [w_ih_in @ self.edge_in.bias, w_ih_out @ self.edge_out.bias, self.w_hh.bias]
            )
            const = w_ih_in @ self.b_iah + w_ih_out @ self.b_oah + self.w_ih.bias
        return FusedGatedStep(hid, weight.contiguous(), bias, const)

    def _edge_projections(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``h W_in + b_in`` and ``h W_out + b_out``, as one GEMM."""
        weight = torch.cat([self.edge_in.weight, self.edge_out.weight], 0)
        bias = torch.cat([self.edge_in.bias, self.edge_out.bias], 0)
        p_in, p_out = torch.split(F.linear(h, weight, bias), self.hidden, dim=-1)
        return p_in, p_out

    def _gru(self, msg: Tensor, h: Tensor) -> Tensor:
        return gru_update(self.w_ih(msg), self.w_hh(h), h)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.hidden})"


@dataclass(frozen=True)
class FusedGatedStep:
    """:meth:`GatedGraphCell.propagate_packed` with the edge projections folded into the GRU's
    input weights. Aggregation along edges is linear and row-wise, so

        a W_ihᵀ = Agg_in(h (W_ih,in W_in)ᵀ + W_ih,in b_in) + Agg_out(…) + W_ih,in b_iah + …

    and one GEMM, ``h`` (n, H) by (9H, H), gives both directions' messages already projected
    and ``h W_hhᵀ``: 9H² multiply-adds a node instead of 2H² + 6H² + 3H² (11H²). The messages
    then aggregate 3H wide instead of H, as sparse products with the normalised adjacencies
    (:attr:`PackedGraph.adjacency`). Same step up to float rounding (tested); for inference
    only: the folded weights have no gradient, and must be rebuilt whenever the cell's weights
    change."""

    hidden: int
    weight: Tensor  # (9H, H): [W_ih,in W_in ; W_ih,out W_out ; W_hh]
    bias: Tensor  # (9H,)
    const: Tensor  # (3H,): what the message biases add after aggregation, and b_ih

    def project(self, h: Tensor) -> Tensor:
        """The step's one GEMM, (n, 9H); :meth:`step` accepts it precomputed (an encoder whose
        node states are [item ; position] can assemble it from a per-position table)."""
        return F.linear(h, self.weight, self.bias)

    def step(self, h: Tensor, graph: PackedGraph, projected: Tensor | None = None) -> Tensor:
        """One propagation step over the real nodes ``h`` (n, H) along ``graph``."""
        q = self.project(h) if projected is None else projected
        g = 3 * self.hidden
        q_in, q_out, gh = q[:, :g], q[:, g : 2 * g], q[:, 2 * g :]
        # 3H-wide messages: a sparse product reads each source row once, where gathering them
        # per edge and scattering back wrote two (E, 3H) temporaries (0.7 against 3 ms a
        # direction for 2,000 nodes).
        a_in, a_out = (a.to(q.dtype) for a in graph.adjacency)
        gi = torch.addmm(self.const, a_in, q_in).add_(a_out @ q_out)
        return gru_update(gi, gh, h)


@dataclass(frozen=True)
class PackedGraph:
    """The directed edges of a batch's session graphs over its real nodes, numbered row by row
    (node ``c`` of session ``b`` is ``start[b] + c``), with SR-GNN's normalisation: an edge
    ``u -> v`` carries ``1 / in-degree(v)`` into ``v`` and ``1 / out-degree(u)`` into ``u``."""

    src: Tensor  # (E,) int64
    dst: Tensor  # (E,) int64
    in_weight: Tensor  # (E,) float
    out_weight: Tensor  # (E,) float
    num_nodes: int

    @functools.cached_property
    def adjacency(self) -> tuple[Tensor, Tensor]:
        """The normalised in- and out-adjacency as sparse CSR matrices (n, n): row ``v`` of the
        first holds ``1 / in-degree(v)`` at every ``u`` with an edge ``u -> v``, row ``u`` of
        the second ``1 / out-degree(u)`` at every such ``v``. For inference (no autograd)."""
        n = self.num_nodes
        return _csr(self.dst, self.src, self.in_weight, n), _csr(
            self.src, self.dst, self.out_weight, n
        )

    @classmethod
    def from_batch(cls, edges: Tensor, start: Tensor, num_nodes: int) -> PackedGraph:
        """From the dense 0/1 ``edges`` (B, U, U) of a batch and each session's first packed
        node ``start`` (B,)."""
        b, u, v = edges.nonzero(as_tuple=True)
        src, dst = start[b] + u, start[b] + v
        in_deg = torch.bincount(dst, minlength=num_nodes).clamp_min_(1)
        out_deg = torch.bincount(src, minlength=num_nodes).clamp_min_(1)
        dtype = edges.dtype
        return cls(
            src,
            dst,
            in_deg[dst].to(dtype).reciprocal_(),
            out_deg[src].to(dtype).reciprocal_(),
            num_nodes,
        )


def _csr(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> Tensor:
    """An (n, n) CSR matrix from coordinates without duplicates."""
    order = torch.argsort(rows)
    crow = rows.new_zeros(n + 1)
    torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
    with warnings.catch_warnings():  # torch flags CSR support as beta once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, cols[order], values[order], (n, n), check_invariants=False
        )


def gru_update(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """The GRU blend shared by the graph layers: ``gi`` = message projections (…, 3H), ``gh`` =
    state projections (…, 3H), ``h`` = current state (…, H)."""
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return new + update * (h - new)
