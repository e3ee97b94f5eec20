"""The item table's gradient left unmaterialised for the optimizer (native loss kernels).

The native loss kernels (:mod:`.native_softmax`) finish every item row's gradient panel by
panel. Written out, that gradient is a dense (N, d) tensor (17 MB on Diginetica) which Adam then
reads back together with the table and both moments. When the optimizer can take it
(:class:`fedenc.training.table_adam.TableAdam`), the loss's backward hands over a
:class:`DeferredTableGrad` instead: the kept exp'd logits and per-session factors, plus sparse
rows (the targets' one-hot part, the tied input lookup's rows). The optimizer's step then runs
the backward kernel with Adam applied to each row as soon as it is finished, so the gradient is
never written, nor read again, and the table row is still in L1 for the update.

Opt-in only: a caller opens :func:`deferring` around a step's forward, backward and optimizer
step; anywhere else the loss returns the dense gradient as before. A deferred gradient that no
step took is turned dense and added to ``table.grad`` when the block ends, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedenc.encoders.layers import native_softmax
from fedenc.encoders.layers.native_softmax import AdamHyper, NativeBlocks
from fedenc.encoders.layers.tied_lookup import accumulate_grad


@dataclass
class DeferredTableGrad:
    """One step's gradient of ``table`` (N + 1, d) whose rows 1..N are the scored items:
    ``Σ_b Z_bj f_b s_b`` through the normalisation (from ``blocks`` and ``session_f``), plus
    the sparse rows added with :meth:`add_rows`. Row 0 (padding) gets no gradient."""

    table: Tensor
    blocks: NativeBlocks
    session_f: Tensor  # (B, d): the rows f_b s_b
    inv_norm: Tensor | None
    _index: list[Tensor] = field(default_factory=list)  # table row ids of the sparse rows
    _rows: list[Tensor] = field(default_factory=list)

    def add_rows(self, index: Tensor, rows: Tensor) -> None:
        """Add ``rows`` (k, d) to table rows ``index`` (k,); repeats add up, row 0 is dropped."""
        flat = index.reshape(-1)
        self._index.append(flat)
        self._rows.append(rows.reshape(flat.numel(), -1))

    def _added(self) -> tuple[Tensor, Tensor]:
        """Every added row but row 0's, in the order added: table rows (k,) and rows (k, d)."""
        d = self.table.shape[1]
        if not self._index:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, d, dtype=torch.float32)
        index = torch.cat(self._index)
        rows = torch.cat(self._rows).to(torch.float32)
        keep = index > 0
        return index[keep], rows[keep]

    def sparse(self) -> tuple[Tensor, Tensor, Tensor]:
        """The added rows grouped by item, each group in the order added (the order a dense
        gradient adds them in): sorted distinct 0-based item ids (m,) (table row - 1), offsets
        (m + 1,) into the rows (k, d) float32."""
        index, rows = self._added()
        order = torch.sort(index, stable=True).indices
        items, counts = torch.unique_consecutive(index[order], return_counts=True)
        offsets = torch.zeros(items.numel() + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=offsets[1:])
        return items - 1, offsets, rows[order]

    def materialize(self) -> Tensor:
        """The dense gradient, bit for bit as the loss's backward and the tied lookup's would
        have made it."""
        grad = torch.empty_like(self.table, dtype=torch.float32)
        grad[0].zero_()
        table = self.table.detach()
        native_softmax.backward(self.blocks, self.session_f, table[1:], self.inv_norm, grad[1:])
        index, rows = self._added()
        grad.index_add_(0, index, rows)
        return grad.to(self.table.dtype)

    def accumulate(self) -> None:
        """Add the dense gradient to ``table.grad``, as autograd would have."""
        accumulate_grad(self.table, self.materialize())

    def adam_step(self, exp_avg: Tensor, exp_avg_sq: Tensor, hyper: AdamHyper) -> None:
        """One Adam step of the whole table (L2 weight decay, no amsgrad) with this gradient:
        the items' rows in the backward kernel, row 0 (gradient 0) here. ``exp_avg`` and
        ``exp_avg_sq`` are the table's moments (N + 1, d), updated in place."""
        table = self.table.detach()
        items, offsets, rows = self.sparse()
        native_softmax.backward_adam(
            self.blocks, self.session_f, table[1:], self.inv_norm, exp_avg[1:], exp_avg_sq[1:],
            items, offsets, rows, hyper,
        )  # fmt: skip
        # Row 0 (padding) has a zero gradient: only weight decay moves it.
        native_softmax.adam_rows(
            table[:1], torch.zeros_like(table[:1]), exp_avg[:1], exp_avg_sq[:1], hyper
        )
        # The kernel wrote through a pointer: tell autograd the table changed, as an in-place
        # update by the optimizer would.
        torch.autograd.graph.increment_version(self.table)


class DeferralSlot:
    """Where a step's loss leaves the deferred gradient of ``table`` for the optimizer. Once
    its block has ended (``open`` false) a backward run later gives a dense gradient."""

    __slots__ = ("open", "pending", "table")

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.pending: DeferredTableGrad | None = None
        self.open = True

    def take(self) -> DeferredTableGrad | None:
        pending, self.pending = self.pending, None
        return pending

    def settle(self) -> None:
        """Add a deferred gradient no step took to ``table.grad``, as autograd would have."""
        pending = self.take()
        if pending is not None:
            pending.accumulate()


_slot: ContextVar[DeferralSlot | None] = ContextVar("fedenc_deferral_slot", default=None)


@contextmanager
def deferring(table: Tensor) -> Iterator[DeferralSlot]:
    """Within the block, a native loss over ``table`` leaves the table's gradient in the
    returned slot instead of ``table.grad`` (see the module's docstring). So inside the block
    ``table.grad`` does not see it (gradient clipping, ``autograd.grad`` of the table): callers
    that need it open no block."""
    slot = DeferralSlot(table)
    token = _slot.set(slot)
    try:
        yield slot
    finally:
        _slot.reset(token)
        slot.open = False
        slot.settle()


@contextmanager
def suspended() -> Iterator[None]:
    """Within the block no loss defers its table's gradient (an optimizer's closure that
    recomputes the loss for torch's own step)."""
    token = _slot.set(None)
    try:
        yield
    finally:
        _slot.reset(token)


def current_slot(table: Tensor) -> DeferralSlot | None:
    """The open slot of ``table`` in this thread/context, if any."""
    slot = _slot.get()
    return slot if slot is not None and slot.table is table else None


__all__ = ["DeferralSlot", "DeferredTableGrad", "current_slot", "deferring", "suspended"]
