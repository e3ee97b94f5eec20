"""``edge_attn``: directed edge attention over the session graph (US20210374356A1).

Each node of the session graph starts as its item embedding (width d). ``steps`` layers of
:class:`DirectedEdgeAttention` then update it: for every node, each of its in-edges and each of its
out-edges gets an attention weight computed from the node's feature vector and the edge's
relationship data (a learned correlation ``a_relᵀ (k_i ⊙ k_j)`` with the neighbour), normalised
over that node's neighbours in that direction only, and the node's new feature is a gated
combination of the attention-weighted in- and out-neighbour aggregates with its own state.

Position vectors from the click order join the node states **before** the session vector is
formed: every click takes its node's state and the embedding of its reversed position (``n, …, 1``
along the click order, the last click is 1; US20220114218A1), concatenated to width 2d. A
soft-attention + last-click readout turns these into a d-wide session vector, scored against every
item embedding by :class:`SessionEncoder`. Without positions (``use_positions=False``) the session
vector only sees the graph and forgets the click order: ``[a, b, a, c, a]`` and ``[a, c, a, b, a]``
then look the same.

The local head is the item embedding (the base default); the attention layers, the position
embedding and the readout form the shared encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedenc.data.batching import SessionBatch
from fedenc.encoders.base import EncoderConfig, SessionEncoder, position_ids
from fedenc.encoders.layers.edge_attention import DirectedEdgeAttention
from fedenc.encoders.layers.readout import SoftAttentionReadout
from fedenc.encoders.registry import register_encoder


@register_encoder("edge_attn")
class EdgeAttentionEncoder(SessionEncoder):
    """Attention over the directed edges of the session graph (US20210374356A1)."""

    extra_options = frozenset()

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        d = config.hidden
        width = 2 * d if config.use_positions else d
        self.layers = nn.ModuleList(DirectedEdgeAttention(d) for _ in range(config.steps))
        self.position = (
            nn.Embedding(config.max_position + 1, d, padding_idx=0)
            if config.use_positions
            else None
        )
        self.readout = SoftAttentionReadout(width, d)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def node_states(self, batch: SessionBatch, num_layers: int | None = None) -> Tensor:
        """Node states (B, U, d) after the first ``num_layers`` layers (all by default)."""
        h: Tensor = self.dropout(self.item_vectors(batch.nodes))
        for layer in list(self.layers)[:num_layers]:
            h = layer(h, batch.edges)
        return h

    def click_features(self, batch: SessionBatch, h: Tensor) -> Tensor:
        """Per-click features: node state, or [node state ; reversed position] (B, L, 2d)."""
        rows = torch.arange(batch.size, device=h.device)[:, None]
        clicks = h[rows, batch.alias]  # (B, L, d): node state of every click
        if self.position is not None:
            pos = self.position(position_ids(batch.positions, self.config.max_position))
            clicks = torch.cat([clicks, pos], dim=-1)
        return clicks

    def encode(self, batch: SessionBatch) -> Tensor:
        clicks = self.click_features(batch, self.node_states(batch))
        session: Tensor = self.dropout(self.readout(clicks, batch.mask, batch.last))
        return session

    def edge_weights(self, batch: SessionBatch, layer: int = -1) -> tuple[Tensor, Tensor]:
        """Edge attention ``(alpha_in, alpha_out)``, each (B, U, U), of layer ``layer`` (the last
        by default) on the node states it receives in :meth:`encode`: ``alpha_in[b, i, j]`` is the
        weight node ``i`` gives its in-edge ``j → i``, ``alpha_out[b, i, j]`` its out-edge
        ``i → j``."""
        if not self.layers:
            raise ValueError("edge_attn with steps=0 has no attention layer")
        index = range(len(self.layers))[layer]  # IndexError when out of range
        att = self.layers[index]
        assert isinstance(att, DirectedEdgeAttention)
        return att.attention(self.node_states(batch, index), batch.edges)
