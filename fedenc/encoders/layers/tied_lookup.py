"""Input lookup of a tied item table whose gradient is folded into the scoring loss's gradient.

SR-GNN scores sessions against the same table it reads its input items from. The full-softmax
loss (:mod:`.full_softmax`) writes a dense gradient of the whole table anyway; autograd's own
embedding backward would zero-fill a second table-sized gradient for the few hundred rows a batch
reads, and then add the two (on a 43k x 100 table: two extra passes over 17 MB per step, about a
tenth of a CPU training step). Here the loss hands its table gradient to the lookup through a
:class:`TableGradTie` instead of returning it, and the lookup's backward adds its rows into it in
place and returns the sum as the table's gradient:

    dL/dE = dL/dE|scoring  +  Σ_{(b, k): items[b, k] = j} dL/dx_bk     (row 0, padding, stays 0)

The tie lives for one forward/backward (``SessionEncoder.loss`` opens it with :func:`tied`), so
nothing carries over between steps or threads. Without a tie, or when the loss's gradient has
already been taken (a second lookup in the same graph), the backward returns the ordinary dense
gradient. Should no lookup's backward take the handed-over gradient (a lookup whose output never
reached the loss), a callback at the end of the backward pass accumulates it into ``.grad`` the
way autograd would have: the result is the same either way, only the cost differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:
    from fedenc.encoders.layers.deferred_table_grad import DeferredTableGrad


class TableGradTie:
    """One step's hand-over of the table gradient from the loss's backward to the lookup's."""

    __slots__ = ("_grad", "deferred", "lookups", "table")

    def __init__(self, table: Tensor) -> None:
        self.table = table
        self.lookups = 0  # lookups of ``table`` that joined this tie in the forward
        self._grad: Tensor | None = None
        # Set when the loss left the table's gradient to the optimizer: the lookups add their
        # rows to it and return no gradient (.deferred_table_grad).
        self.deferred: DeferredTableGrad | None = None

    def defer(self, deferred: DeferredTableGrad) -> None:
        """Called by the loss's backward instead of :meth:`offer` when the table's gradient stays
        unmaterialised: every lookup of this tie hands its rows to ``deferred``."""
        self.deferred = deferred

    def offer(self, grad_table: Tensor) -> bool:
        """Called by the loss's backward with its gradient of ``table``. True when the tie takes
        it over (the loss then returns no gradient for the table); False when no lookup joined."""
        if self.lookups == 0:
            return False
        self._grad = grad_table
        # Safety net, run once the whole backward pass is done.
        torch.autograd.Variable._execution_engine.queue_callback(self.settle)
        return True

    def preload(self, grad_table: Tensor) -> None:
        """For a caller that computes the table's scoring gradient itself and then runs the
        backward from the session vectors (the planner's step graph): the lookup adds its rows
        into ``grad_table`` and returns it as the table's gradient. Call :meth:`settle` after a
        ``backward()``, or :meth:`take` after an ``autograd.grad``, for the case where no lookup
        took it."""
        self._grad = grad_table

    def take(self) -> Tensor | None:
        """The offered gradient, once: the tie drops its reference so autograd can keep the
        tensor as ``.grad`` without a copy."""
        grad, self._grad = self._grad, None
        return grad

    def settle(self) -> None:
        """Accumulate a gradient that no lookup took into ``table.grad``, as autograd would."""
        grad = self.take()
        if grad is not None:
            accumulate_grad(self.table, grad)


def accumulate_grad(table: Tensor, grad: Tensor) -> None:
    """Add ``grad`` to ``table.grad`` (or make it that), as autograd accumulates a gradient."""
    with torch.no_grad():
        if table.grad is None:
            table.grad = grad
        else:
            table.grad += grad


_current: ContextVar[TableGradTie | None] = ContextVar("fedenc_table_grad_tie", default=None)


@contextmanager
def tied(table: Tensor) -> Iterator[TableGradTie]:
    """Within the block, :func:`tied_embedding` lookups of ``table`` join the returned tie."""
    tie = TableGradTie(table)
    token = _current.set(tie)
    try:
        yield tie
    finally:
        _current.reset(token)


def current_tie(table: Tensor) -> TableGradTie | None:
    """The open tie of ``table`` in this thread/context, if any."""
    tie = _current.get()
    return tie if tie is not None and tie.table is table else None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, items: Tensor, table: Tensor, tie: TableGradTie | None
    ) -> Tensor:
        ctx.save_for_backward(items)
        ctx.tie = tie
        if tie is not None:
            tie.lookups += 1
        ctx.rows = table.shape[0]
        return F.embedding(items, table, padding_idx=0)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (items,) = ctx.saved_tensors
        tie: TableGradTie | None = ctx.tie
        ctx.tie = None
        index = items.reshape(-1)
        rows = grad_out.reshape(index.shape[0], -1)
        if tie is not None and tie.deferred is not None:
            tie.deferred.add_rows(index, rows)  # row 0 (padding) is dropped there
            return None, None, None
        grad = tie.take() if tie is not None else None
        if grad is None:  # nothing handed over: the ordinary dense gradient
            grad = torch.zeros(ctx.rows, rows.shape[1], dtype=rows.dtype, device=rows.device)
        grad.index_add_(0, index, rows)
        grad[0].zero_()
        return None, grad, None


def tied_embedding(items: Tensor, table: Tensor) -> Tensor:
    """``F.embedding(items, table, padding_idx=0)``, joining the open tie of ``table`` if any."""
    tie = current_tie(table)
    if tie is None or not torch.is_grad_enabled() or not table.requires_grad:
        return F.embedding(items, table, padding_idx=0)
    out: Tensor = _TiedLookup.apply(items, table, tie)  # type: ignore[no-untyped-call]
    return out


__all__ = ["TableGradTie", "accumulate_grad", "current_tie", "tied", "tied_embedding"]
