"""Adam that takes the item table's gradient straight from the native loss kernels.

A Diginetica training step's dense item-table gradient (43k x 100) is written by the loss's
backward and then read back by Adam with the table and both moments: 17 MB written and 86 MB
read, on a machine that moves about 30 GB/s. :class:`TableAdam` is ``torch.optim.Adam``, and
inside :meth:`TableAdam.deferring` the native loss leaves the table's gradient unmaterialised
(:mod:`fedenc.encoders.layers.deferred_table_grad`): :meth:`~TableAdam.step` runs the loss's
backward kernel with each item row's Adam update done as soon as the row's gradient is finished,
while the row is still in cache. The update rule is Adam's (L2 ``weight_decay``, bias-corrected
moments), so a step agrees with ``torch.optim.Adam`` on the dense gradient to float rounding
(tested); its optimizer state is torch's own (``step``, ``exp_avg``, ``exp_avg_sq``), so state
dicts, checkpoints and carried moments are unchanged.

Everything else is untouched: other parameters step in torch's Adam, and the table's gradient is
materialised (so torch's Adam takes it) whenever the deferral cannot apply — the PyTorch loss
path, amsgrad, ``maximize``, decoupled weight decay, a float64 or GPU table, a closure, or a
second gradient for the table from elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from fedenc.encoders.layers.deferred_table_grad import DeferralSlot, DeferredTableGrad, deferring
from fedenc.encoders.layers.native_softmax import AdamHyper


class TableAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose :meth:`step` can apply a deferred item-table gradient (the
    module's docstring); the constructor is Adam's."""

    _slot: DeferralSlot | None = None

    @contextmanager
    def deferring(self, table: Tensor) -> Iterator[None]:
        """Open around one step's loss, ``backward()`` and :meth:`step`: the native loss then
        leaves ``table``'s gradient for the step to apply. Does nothing where the step could
        not apply it (then the gradient is dense, as always)."""
        if not self._can_defer(table):
            yield
            return
        with deferring(table) as slot:
            self._slot = slot
            try:
                yield
            finally:
                self._slot = None

    def _can_defer(self, table: Tensor) -> bool:
        if table.dtype != torch.float32 or table.device.type != "cpu" or table.dim() != 2:
            return False
        if not table.is_contiguous():
            return False
        groups = [g for g in self.param_groups if any(p is table for p in g["params"])]
        if len(groups) != 1:
            return False
        g = groups[0]
        return not (
            g["amsgrad"]
            or g["maximize"]
            or g.get("capturable", False)
            or g.get("differentiable", False)
            or g.get("decoupled_weight_decay", False)
        )

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        slot = self._slot
        pending = slot.take() if slot is not None else None
        if pending is not None and (
            closure is not None or pending.table.grad is not None or not self._state_fits(pending)
        ):
            # Another gradient of the table (or a closure that recomputes the loss): the dense
            # gradient joins it and torch's Adam takes the sum.
            slot_table = pending.table
            grad = pending.materialize()
            with torch.no_grad():
                if slot_table.grad is None:
                    slot_table.grad = grad
                else:
                    slot_table.grad += grad
            pending = None
        loss = super().step(closure)  # the table, without a .grad, is skipped here
        if pending is not None:
            self._step_table(pending)
        return loss

    def _state_fits(self, pending: DeferredTableGrad) -> bool:
        """Whether the table's Adam state (if any) is laid out as the kernel needs it."""
        state = self.state.get(pending.table, {})
        return all(
            state[k].dtype == torch.float32
            and state[k].shape == pending.table.shape
            and state[k].is_contiguous()
            for k in ("exp_avg", "exp_avg_sq")
            if k in state
        )

    @torch.no_grad()
    def _step_table(self, pending: DeferredTableGrad) -> None:
        table = pending.table
        group = next(g for g in self.param_groups if any(p is table for p in g["params"]))
        state = self.state[table]
        if len(state) == 0:  # as torch's Adam initialises it (fused: step on the device)
            state["step"] = torch.zeros((), dtype=torch.float32, device=table.device)
            state["exp_avg"] = torch.zeros_like(table, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(table, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = AdamHyper.of(
            float(group["lr"]),
            float(beta1),
            float(beta2),
            float(group["eps"]),
            float(group["weight_decay"]),
            float(state["step"]),
        )
        pending.adam_step(state["exp_avg"], state["exp_avg_sq"], hyper)


@contextmanager
def deferring_table(optimizer: torch.optim.Optimizer, table: Tensor) -> Iterator[None]:
    """:meth:`TableAdam.deferring` for a :class:`TableAdam`; nothing for other optimizers."""
    if isinstance(optimizer, TableAdam):
        with optimizer.deferring(table):
            yield
    else:
        yield


__all__ = ["TableAdam", "deferring_table"]
