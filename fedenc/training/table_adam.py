"""Adam that takes the item table's gradient straight from the native loss kernels.

A Diginetica training step's dense item-table gradient (43k x 100) is written by the loss's
backward and then read back by Adam with the table and both moments: 17 MB written and 86 MB
read, on a machine that moves about 30 GB/s. :class:`TableAdam` is ``torch.optim.Adam``, and
inside :meth:`TableAdam.deferring` the native loss leaves the table's gradient unmaterialised
(:mod:`fedenc.encoders.layers.deferred_table_grad`): :meth:`~TableAdam.step` runs the loss's
backward kernel with each item row's Adam update done as soon as the row's gradient is finished,
while the row is still in cache.

The table's update rule is Adam's (L2 ``weight_decay``, bias-corrected moments) in the kernels'
own arithmetic (:func:`fedenc.encoders.layers.native_softmax.adam_rows`), which TableAdam also
applies when the table's gradient comes dense (a step outside :meth:`~TableAdam.deferring`: the
elastic data server applying a computing server's gradient, the PS trainer, planned steps). A
row's gradient has the same bits either way, so a deferred and a dense step give the same table
bit for bit; against ``torch.optim.Adam`` they agree to float rounding (tested). The optimizer
state is torch's own (``step``, ``exp_avg``, ``exp_avg_sq``), so state dicts, checkpoints and
carried moments are unchanged. Other parameters step in torch's Adam; so does the table where
the kernels are not in use (switched off, not built, a float64 or GPU table) or the options are
not covered (amsgrad, ``maximize``, decoupled weight decay, a closure).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from fedenc.encoders.layers import native_softmax
from fedenc.encoders.layers.deferred_table_grad import DeferralSlot, deferring, suspended
from fedenc.encoders.layers.native_softmax import AdamHyper


class TableAdam(torch.optim.Adam):
    """``torch.optim.Adam`` that steps ``table`` (one of ``params``) in the native kernels'
    Adam, from a deferred gradient (:meth:`deferring`) or a dense one; the other arguments are
    Adam's. Without ``table`` it is plain Adam."""

    def __init__(
        self, params: Iterable[Any], *args: Any, table: Tensor | None = None, **kwargs: Any
    ) -> None:
        super().__init__(params, *args, **kwargs)
        self.table = table
        self._slot: DeferralSlot | None = None

    def _native_table(self) -> Tensor | None:
        """``table`` when its step can run in the kernels now, else None."""
        table = self.table
        if table is None or not native_softmax.switched_on() or not native_softmax.enabled():
            return None
        if table.dtype != torch.float32 or table.device.type != "cpu" or table.dim() != 2:
            return None
        if not table.is_contiguous():
            return None
        g = self._group_of(table)
        if g is None:
            return None
        if (
            g["amsgrad"]
            or g["maximize"]
            or g.get("capturable", False)
            or g.get("differentiable", False)
            or g.get("decoupled_weight_decay", False)
            or not self._state_fits(table)
        ):
            return None
        return table if native_softmax.library() is not None else None

    def _group_of(self, table: Tensor) -> dict[str, Any] | None:
        """The one param group holding ``table``; None if none or several do."""
        groups = [g for g in self.param_groups if any(p is table for p in g["params"])]
        return groups[0] if len(groups) == 1 else None

    def _state_fits(self, table: Tensor) -> bool:
        """Whether the table's Adam state (if any) is laid out as the kernels need it."""
        state = self.state.get(table, {})
        return all(
            state[k].dtype == torch.float32
            and state[k].shape == table.shape
            and state[k].is_contiguous()
            for k in ("exp_avg", "exp_avg_sq")
            if k in state
        )

    @contextmanager
    def deferring(self, table: Tensor) -> Iterator[None]:
        """Open around one step's loss, ``backward()`` and :meth:`step`: the native loss then
        leaves ``table``'s gradient for the step to apply. Does nothing where the step could
        not apply it (then the gradient is dense, as always)."""
        if table is not self.table or self._native_table() is None:
            yield
            return
        with deferring(table) as slot:
            self._slot = slot
            try:
                yield
            finally:
                self._slot = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Adam's, and a deferred table gradient not yet stepped is dropped with the rest."""
        if self._slot is not None:
            self._slot.take()
        super().zero_grad(set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        slot = self._slot
        pending = slot.take() if slot is not None else None
        table = self._native_table() if closure is None else None
        if pending is not None and (table is None or pending.table.grad is not None):
            # Another gradient of the table as well (or no kernel step): the sum, dense.
            pending.accumulate()
            pending = None
        dense = None
        if pending is None and table is not None and table.grad is not None:
            if table.grad.is_sparse or table.grad.dtype != torch.float32:
                table = None
            else:
                dense, table.grad = table.grad, None  # torch's Adam skips it
        try:
            loss = self._adam_step(closure)
        except BaseException:
            if pending is not None and slot is not None:
                slot.pending = pending  # not stepped: settled into .grad when the block ends
            raise
        finally:
            if dense is not None and table is not None:
                table.grad = dense
        if pending is not None:
            self._step_table(pending.table, lambda hyper, m, v: pending.adam_step(m, v, hyper))
        elif dense is not None and table is not None:
            self._step_table(
                table,
                lambda hyper, m, v: native_softmax.adam_rows(
                    table.detach(), dense.contiguous(), m, v, hyper
                ),
            )
            torch.autograd.graph.increment_version(table)
        return loss

    def _adam_step(self, closure: Callable[[], float] | None) -> Any:
        """torch's Adam step, without the optimizer hooks a second time (torch wraps each
        optimizer class's ``step`` with them, Adam's too once a plain Adam exists), and with a
        closure's loss taking its table gradient dense (torch's Adam steps it then)."""
        adam_step = torch.optim.Adam.step
        if getattr(adam_step, "hooked", False):
            adam_step = adam_step.__wrapped__  # type: ignore[attr-defined]
        if closure is None:
            return adam_step(self, None)

        def dense_closure() -> float:
            with suspended():
                return closure()

        return adam_step(self, dense_closure)

    @torch.no_grad()
    def _step_table(
        self, table: Tensor, update: Callable[[AdamHyper, Tensor, Tensor], None]
    ) -> None:
        group = self._group_of(table)
        assert group is not None  # _native_table checked it
        state = self.state[table]
        if len(state) == 0:  # as torch's Adam initialises it (fused: step on the device)
            state["step"] = torch.zeros((), dtype=torch.float32, device=table.device)
            state["exp_avg"] = torch.zeros_like(table, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(table, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        hyper = AdamHyper.of(
            float(group["lr"]),
            float(beta1),
            float(beta2),
            float(group["eps"]),
            float(group["weight_decay"]),
            float(state["step"]) + 1,
        )
        update(hyper, state["exp_avg"], state["exp_avg_sq"])
        state["step"] += 1  # after the update: a failed one leaves the count as it was


@contextmanager
def deferring_table(optimizer: torch.optim.Optimizer, table: Tensor) -> Iterator[None]:
    """:meth:`TableAdam.deferring` for a :class:`TableAdam`; nothing for other optimizers."""
    if isinstance(optimizer, TableAdam):
        with optimizer.deferring(table):
            yield
    else:
        yield


__all__ = ["TableAdam", "deferring_table"]
