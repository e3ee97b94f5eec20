"""Skip GRU: a GRU unit decomposed into nodes with two independent start/end regions
(US20210406641A1).

For step input ``x_t`` (an item vector), optional side features ``p_t`` (e.g. a position embedding)
and states ``h``, ``y``, the unit is the node graph

.. code-block:: text

    ┌ start "cell"   (skip rule ``skip``, default: padding, repeat)
    │ input_proj    g_i = W_ih x_t + b_ih
    │ hidden_proj   g_h = W_hh h + b_hh
    │ reset_gate    r   = σ(g_i^r + g_h^r)
    │ update_gate   z   = σ(g_i^z + g_h^z)
    │ candidate     ñ   = tanh(g_i^n + r ⊙ g_h^n)
    │ blend         h'  = ñ + z ⊙ (h − ñ)
    └ end "cell"     (tagged: h' ← h)
    ┌ start "output" (skip rule ``skip_output``, default: padding)
    │ output_proj   u   = W_o [h' ; p_t] + b_o
    │ output_act    y'  = tanh(u)
    └ end "output"   (tagged: y' ← y)

If a step's input does not satisfy a region's preset condition, that region's start node tags its
nodes, they do no work and the end node passes the region's state through unchanged; otherwise the
start node does nothing and the region is a plain GRU step (resp. output layer). The two regions
check their conditions independently: with the defaults a repeated click keeps ``h`` bit-identical
but still refreshes ``y`` with the new side features, while padding leaves both untouched, so
right-padding never changes the final states.

Two executors share the parameters and give the same result (outputs and gradients):

* ``"literal"`` – :class:`~fedenc.encoders.layers.node_graph.NodeGraphUnit`, one sample and one
  step at a time, node by node; tagged nodes are not called and executed nodes are counted;
* ``"vectorised"`` – for every step, gather the rows whose condition holds, run the fused cell on
  them and scatter back (the fused cell on the whole batch when every row is active). Input and
  side projections are computed in one GEMM over the active (row, step) pairs only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedenc.encoders.layers.node_graph import Node, NodeGraphUnit, SkipRule, SkipSpec

Executor = Literal["vectorised", "literal"]
EXECUTORS: tuple[Executor, ...] = ("vectorised", "literal")


class SkipGRUOutput(NamedTuple):
    outputs: Tensor  # (B, L, O): y after every step
    hiddens: Tensor  # (B, L, H): h after every step
    hidden: Tensor  # (B, H): final h
    output: Tensor  # (B, O): final y
    op_counts: Counter[str] | None  # executed nodes (literal executor only)


class SkipGRU(nn.Module):
    """The skip GRU of the module's docstring: two independent start/end regions per unit,
    run by the literal node-graph executor or the vectorised one (same results)."""

    CELL_NODES = ("input_proj", "hidden_proj", "reset_gate", "update_gate", "candidate", "blend")
    OUTPUT_NODES = ("output_proj", "output_act")

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int | None = None,
        side_features: int = 0,
        skip: SkipSpec = ("padding", "repeat"),
        skip_output: SkipSpec = ("padding",),
        executor: Executor = "vectorised",
    ) -> None:
        super().__init__()
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
        self.in_features = in_features
        self.hidden = hidden
        self.out_features = hidden if out_features is None else out_features
        self.side_features = side_features
        self.cell_rule = SkipRule(skip)
        self.output_rule = SkipRule(skip_output)
        self.executor: Executor = executor
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden, in_features))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden))
        self.out_weight = nn.Parameter(torch.empty(self.out_features, hidden + side_features))
        self.out_bias = nn.Parameter(torch.empty(self.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    # -- the node graph (literal executor) --------------------------------------------------
    def _input_proj(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_ih, self.bias_ih)

    def _hidden_proj(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight_hh, self.bias_hh)

    def _reset_gate(self, gi: Tensor, gh: Tensor) -> Tensor:
        d = self.hidden
        return torch.sigmoid(gi[:, :d] + gh[:, :d])

    def _update_gate(self, gi: Tensor, gh: Tensor) -> Tensor:
        d = self.hidden
        return torch.sigmoid(gi[:, d : 2 * d] + gh[:, d : 2 * d])

    def _candidate(self, gi: Tensor, gh: Tensor, r: Tensor) -> Tensor:
        d = self.hidden
        return torch.tanh(gi[:, 2 * d :] + r * gh[:, 2 * d :])

    @staticmethod
    def _blend(n: Tensor, z: Tensor, h: Tensor) -> Tensor:
        return n + z * (h - n)

    def _output_proj(self, h: Tensor, *side: Tensor) -> Tensor:
        return F.linear(torch.cat([h, *side], -1), self.out_weight, self.out_bias)

    def node_graph(self) -> NodeGraphUnit:
        """The unit as a :class:`NodeGraphUnit` bound to this module's parameters."""
        side = ("p",) if self.side_features else ()
        nodes = [
            Node("cell_start", "start", region="cell", rule=self.cell_rule),
            Node("input_proj", inputs=("x",), output="gi", fn=self._input_proj),
            Node("hidden_proj", inputs=("h",), output="gh", fn=self._hidden_proj),
            Node("reset_gate", inputs=("gi", "gh"), output="r", fn=self._reset_gate),
            Node("update_gate", inputs=("gi", "gh"), output="z", fn=self._update_gate),
            Node("candidate", inputs=("gi", "gh", "r"), output="n", fn=self._candidate),
            Node("blend", inputs=("n", "z", "h"), output="h_new", fn=self._blend),
            Node("cell_end", "end", region="cell", passthrough=(("h_new", "h"),)),
            Node("output_start", "start", region="output", rule=self.output_rule),
            Node("output_proj", inputs=("h_new", *side), output="u", fn=self._output_proj),
            Node("output_act", inputs=("u",), output="y_new", fn=torch.tanh),
            Node("output_end", "end", region="output", passthrough=(("y_new", "y"),)),
        ]
        return NodeGraphUnit(nodes, sources=("x", "h", "y", *side))

    # -- forward ----------------------------------------------------------------------------
    def active(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, L)`` bool masks of the (row, step) pairs whose "cell" / "output" nodes run."""
        return self.cell_rule.keep_matrix(items), self.output_rule.keep_matrix(items)

    def forward(
        self,
        x: Tensor,
        items: Tensor,
        side: Tensor | None = None,
        executor: Executor | None = None,
    ) -> SkipGRUOutput:
        """``x`` (B, L, in_features) step inputs, ``items`` (B, L) the click ids the conditions
        check, ``side`` (B, L, side_features) or ``None``; states start at zero."""
        if (side is None) != (self.side_features == 0):
            raise ValueError(
                f"side features expected: {self.side_features}, got {side is not None}"
            )
        mode = self.executor if executor is None else executor
        if mode == "literal":
            return self._forward_literal(x, items, side)
        if mode == "vectorised":
            return self._forward_vectorised(x, items, side)
        raise ValueError(f"executor must be one of {EXECUTORS}, got {mode!r}")

    def _initial(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bsz = x.shape[0]
        return (
            x.new_zeros(bsz, self.hidden),
            x.new_zeros(bsz, self.out_features),
        )

    def _forward_literal(self, x: Tensor, items: Tensor, side: Tensor | None) -> SkipGRUOutput:
        graph = self.node_graph()
        h0, y0 = self._initial(x)
        inputs = {"x": x} if side is None else {"x": x, "p": side}
        steps, final = graph.run(inputs, {"h": h0, "y": y0}, {"h": "h_new", "y": "y_new"}, items)
        return SkipGRUOutput(steps["y"], steps["h"], final["h"], final["y"], graph.op_counts)

    def _forward_vectorised(self, x: Tensor, items: Tensor, side: Tensor | None) -> SkipGRUOutput:
        bsz, length = items.shape
        d = self.hidden
        keep_cell, keep_out = self.active(items)
        cell_in, cell_rows, cell_counts = _packed(
            keep_cell, x, lambda v: F.linear(v, self.weight_ih, self.bias_ih)
        )
        w_oh, w_op = torch.split(self.out_weight, [d, self.side_features], 1)
        if side is None:
            out_in: list[Tensor] = [self.out_bias] * length
            out_rows, out_counts = _rows(keep_out)
        else:
            out_in, out_rows, out_counts = _packed(
                keep_out, side, lambda v: F.linear(v, w_op, self.out_bias)
            )
        h, y = self._initial(x)
        hiddens: list[Tensor] = []
        outputs: list[Tensor] = []
        for t in range(length):
            n = cell_counts[t]
            if n == bsz:  # whole batch active: the fused cell on every row
                h = _gru_cell(cell_in[t], h, self.weight_hh, self.bias_hh)
            elif n:  # the active rows only; skipped rows keep h untouched
                idx = cell_rows[t]
                h_sub = _gru_cell(cell_in[t], h.index_select(0, idx), self.weight_hh, self.bias_hh)
                h = h.index_copy(0, idx, h_sub)
            n = out_counts[t]
            if n == bsz:
                y = torch.tanh(F.linear(h, w_oh) + out_in[t])
            elif n:
                idx = out_rows[t]
                y = y.index_copy(
                    0, idx, torch.tanh(F.linear(h.index_select(0, idx), w_oh) + out_in[t])
                )
            hiddens.append(h)
            outputs.append(y)
        return SkipGRUOutput(torch.stack(outputs, 1), torch.stack(hiddens, 1), h, y, None)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_features}, {self.hidden}, "
            f"out={self.out_features}, side={self.side_features}, skip={self.cell_rule!r}, "
            f"skip_output={self.output_rule!r}, executor={self.executor!r})"
        )


def _gru_cell(gi: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor) -> Tensor:
    """Fused GRU step from a precomputed input projection ``gi`` (rows, 3H)."""
    d = h.shape[1]
    gh = F.linear(h, weight_hh, bias_hh)
    rz = torch.sigmoid(gi[:, : 2 * d] + gh[:, : 2 * d])
    r, z = rz[:, :d], rz[:, d:]
    n = torch.tanh(gi[:, 2 * d :] + r * gh[:, 2 * d :])
    return n + z * (h - n)


def _rows(keep: Tensor) -> tuple[list[Tensor], list[int]]:
    """Per step, the indices of the active rows (ascending) and their number."""
    _, rows = keep.t().nonzero(as_tuple=True)  # time-major: sorted by step, then row
    counts: list[int] = keep.sum(0).tolist()
    return list(torch.split(rows, counts)), counts


def _packed(
    keep: Tensor, values: Tensor, project: Callable[[Tensor], Tensor]
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """``project(values[b, t])`` for the active (b, t) pairs only, in one call, split by step."""
    if bool(keep.all()):
        bsz, length = keep.shape
        return list(project(values).unbind(1)), [], [bsz] * length
    steps, rows = keep.t().nonzero(as_tuple=True)
    counts: list[int] = keep.sum(0).tolist()
    projected = project(values[rows, steps])
    return list(torch.split(projected, counts)), list(torch.split(rows, counts)), counts
