"""``skip_rnn``: a GRU over the clicks whose units skip work on uninformative steps
(US20210406641A1).

Each recurrent unit is a small graph of data-processing nodes (:class:`SkipGRU`) with two
independent start/end regions: the GRU gates and candidate (region ``"cell"``) and the output
projection that folds in the reversed position embedding (region ``"output"``). At every step each
start node checks its region's preset condition on the click; if the click does not satisfy it, the
start node tags the nodes up to its end node, they do no work, and the region's state passes
through unchanged; if it does, the start node does nothing and the region runs:

.. code-block:: text

    h_t = GRU(x_t, h_{t-1})           if the click satisfies the "cell" condition, else h_{t-1}
    y_t = tanh(W_o [h_t ; p_t] + b_o)  if it satisfies the "output" condition,     else y_{t-1}

with ``x_t`` the item vector and ``p_t`` the reversed position embedding (positions ``n, …, 1``
along the click order; without ``use_positions`` the projection sees ``h_t`` only). The session
vector is the soft-attention readout (:class:`SoftAttentionReadout`) over the per-step states
``y_t`` of the real clicks, with the unit's final state ``y_L`` in the role of the last click.
Scoring against the item embeddings and the shared/head split are the base class's.

Options in ``config.extra``:

* ``skip`` – what the "cell" region skips on: a list of ``"padding"`` (item 0), ``"repeat"`` (same
  item as the previous click) and/or callables ``(items_t, prev_items, step) -> bool mask``
  (``True`` = skip); default ``["padding", "repeat"]``;
* ``skip_output`` – the same for the "output" region; default ``["padding"]``;
* ``executor`` – ``"vectorised"`` (default: gather the active rows per step, run the fused cell,
  scatter back) or ``"literal"`` (the node-by-node executor, one sample at a time).

With ``"padding"`` in both lists, right-padding never changes a session's vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedenc.data.batching import SessionBatch
from fedenc.encoders.base import EncoderConfig, SessionEncoder, position_ids
from fedenc.encoders.layers.readout import SoftAttentionReadout
from fedenc.encoders.layers.skip_gru import SkipGRU
from fedenc.encoders.registry import register_encoder

DEFAULT_SKIP = ("padding", "repeat")
DEFAULT_SKIP_OUTPUT = ("padding",)


@register_encoder("skip_rnn")
class SkipRNN(SessionEncoder):
    """Recurrent units whose start node tags and skips nodes up to the end (US20210406641A1)."""

    extra_options = frozenset({"skip", "skip_output", "executor"})

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        d = config.hidden
        extra = config.extra
        unknown = set(extra) - self.extra_options  # built directly, not by build_encoder
        if unknown:
            raise ValueError(f"unknown skip_rnn options: {sorted(unknown)}")
        self.position = (
            nn.Embedding(config.max_position + 1, d, padding_idx=0)
            if config.use_positions
            else None
        )
        self.rnn = SkipGRU(
            d,
            d,
            side_features=d if config.use_positions else 0,
            skip=extra.get("skip", DEFAULT_SKIP),
            skip_output=extra.get("skip_output", DEFAULT_SKIP_OUTPUT),
            executor=extra.get("executor", "vectorised"),
        )
        self.readout = SoftAttentionReadout(d, d)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def encode(self, batch: SessionBatch) -> Tensor:
        x = self.dropout(self.item_vectors(batch.items))
        side = None
        if self.position is not None:
            side = self.position(position_ids(batch.positions, self.config.max_position))
        run = self.rnn(x, batch.items, side)
        # Per-step states of the real clicks, plus the final state as the "last click".
        bsz, length = batch.items.shape
        clicks = torch.cat([run.outputs, run.output[:, None, :]], 1)
        mask = torch.cat([batch.mask, batch.mask.new_zeros(bsz, 1)], 1)
        last = torch.full((bsz,), length, dtype=torch.int64, device=clicks.device)
        session: Tensor = self.dropout(self.readout(clicks, mask, last))
        return session

    def extra_repr(self) -> str:
        r = self.rnn
        return (
            f"{super().extra_repr()}, skip={r.cell_rule!r}, skip_output={r.output_rule!r}, "
            f"executor={r.executor!r}"
        )
