"""``srgnn``: SR-GNN with reversed position embeddings (US20220114218A1).

Each node of the session graph starts as the **concatenation** of its item embedding and the
embedding of its reversed position (width 2d): positions run ``n, …, 1`` along the click order, so
the last click is always position 1 whatever the session length, and a node takes the position of
its most recent click. Gated graph propagation (:class:`GatedGraphCell`) then runs over the
normalised in/out adjacency, and a soft-attention + last-click readout returns a d-wide session
vector scored against every item embedding.

Because the transition graph alone forgets the order of clicks, plain SR-GNN gives the same session
vector to ``[a, b, a, c, a]`` and ``[a, c, a, b, a]``; the position features tell them apart. Not
every order: a node keeps only its most recent click's position, so sessions with the same edges,
click counts and most recent positions (``[a, a, b, a, b]``, ``[a, b, a, a, b]``) still collide.
``use_positions=False`` is SR-GNN (Wu et al., AAAI 2019) for comparison; with ``normalize`` on
(the default) its scoring is NISER's, off it is the published model's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedenc.data.batching import SessionBatch
from fedenc.encoders.base import EncoderConfig, SessionEncoder, position_ids
from fedenc.encoders.layers import GatedGraphCell, SoftAttentionReadout
from fedenc.encoders.layers.gated_graph import FusedGatedStep, PackedGraph
from fedenc.encoders.registry import register_encoder


@register_encoder("srgnn")
class SRGNN(SessionEncoder):
    """SR-GNN with reversed position embeddings concatenated to the items (US20220114218A1)."""

    extra_options = frozenset()

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        d = config.hidden
        width = 2 * d if config.use_positions else d
        self.position = (
            nn.Embedding(config.max_position + 1, d, padding_idx=0)
            if config.use_positions
            else None
        )
        self.gnn = GatedGraphCell(width)
        self.readout = SoftAttentionReadout(width, d)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def node_features(self, batch: SessionBatch, mask: Tensor | None = None) -> Tensor:
        """Initial node states: item embedding, or [item ; reversed position]. (B, U, width),
        or (n, width) for the n nodes that ``mask`` (B, U) selects."""
        nodes, positions = batch.nodes, batch.node_positions
        if mask is not None:
            nodes, positions = nodes[mask], positions[mask]
        h = self.item_vectors(nodes)
        if self.position is not None:
            pos = self.position(position_ids(positions, self.config.max_position))
            h = torch.cat([h, pos], dim=-1)
        return h

    def encode(self, batch: SessionBatch) -> Tensor:
        if batch.node_mask is not None and batch.nodes.device.type == "cpu":
            return self._encode_packed(batch)
        # On a GPU the padded batch: packing's boolean indexing forces a host sync per step,
        # which costs more there than the padded work (benchmarks/gpu_step.py).
        h = self.dropout(self.node_features(batch))
        for _ in range(self.config.steps):
            h = self.gnn(h, batch.adj_in, batch.adj_out)
        rows = torch.arange(batch.size, device=h.device)[:, None]
        clicks = h[rows, batch.alias]  # (B, L, width): node state of every click
        session: Tensor = self.dropout(self.readout(clicks, batch.mask, batch.last))
        return session

    def _encode_packed(self, batch: SessionBatch) -> Tensor:
        """:meth:`encode` on the real nodes and clicks only. A batch is padded to its longest
        session (at batch 500 on Diginetica, about 7 padded nodes per real one), so the padded
        node states, adjacencies and click states cost more memory traffic than the GEMMs."""
        mask = batch.node_mask
        counts = mask.sum(1)
        start = counts.cumsum(0) - counts  # packed index of each session's first node
        num_nodes = int(counts.sum())
        graph = PackedGraph.from_batch(batch.edges, start, num_nodes)
        frozen = self._frozen_steps()
        if frozen is None:
            h = self.dropout(self.node_features(batch, mask))
            for _ in range(self.config.steps):
                h = self.gnn.propagate_packed(h, graph)
        else:
            fused, table = frozen
            h = self.node_features(batch, mask)
            projected = self._first_projection(batch, mask, h, fused, table)
            for _ in range(self.config.steps):
                h = fused.step(h, graph, projected)
                projected = None
        node_of_click = start[:, None] + batch.alias
        rows = torch.arange(batch.size, device=h.device)
        real = h[node_of_click[batch.mask]]
        v_last = h[node_of_click[rows, batch.last]]
        click_row = rows[:, None].expand_as(batch.mask)[batch.mask]
        session: Tensor = self.dropout(self.readout.pooled(real, click_row, v_last))
        return session

    def _frozen_steps(self) -> tuple[FusedGatedStep, Tensor | None] | None:
        """Inside :meth:`frozen_scoring`, in eval mode and without autograd: the propagation
        with folded weights (:class:`FusedGatedStep`) and, with positions, its first GEMM's
        share of every position embedding, ``P W_posᵀ + bias`` ((max_position + 1, 9H)). A
        node's first projection is then ``x W_itemᵀ`` plus its position's row: half the
        first step's GEMM. Built once per frozen scope; None elsewhere."""
        if self.training or torch.is_grad_enabled() or "_frozen_scoring" not in self.__dict__:
            return None
        cached: tuple[FusedGatedStep, Tensor | None] | None = self.__dict__.get("_frozen_cell")
        if cached is None:
            fused = self.gnn.fused()
            table = None
            if self.position is not None:
                d = self.config.hidden
                table = torch.addmm(fused.bias, self.position.weight, fused.weight[:, d:].t())
            cached = (fused, table)
            self.__dict__["_frozen_cell"] = cached
        return cached

    def _first_projection(
        self,
        batch: SessionBatch,
        mask: Tensor,
        h: Tensor,
        fused: FusedGatedStep,
        table: Tensor | None,
    ) -> Tensor | None:
        """With positions, the first step's projection of the node states ``h`` = [x ; p]:
        ``x W_itemᵀ`` plus each node's row of the position table. None: project ``h`` whole."""
        if table is None:
            return None
        d = self.config.hidden
        ids = position_ids(batch.node_positions[mask], self.config.max_position)
        return table.index_select(0, ids).addmm_(h[:, :d], fused.weight[:, :d].t())
