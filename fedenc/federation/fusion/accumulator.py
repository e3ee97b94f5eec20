"""Streaming weighted sums: ``Σ w_i θ_i`` and ``Σ w_i`` in one flat buffer the size of one model.

Each update is folded in with one in-place ``acc.add_(θ_i, alpha=w_i)`` per tensor and can then be
dropped, so fusing K replies costs the memory of one model, never K, and each reply is folded in as
it arrives. The buffer is allocated once and reused round after round while the model's layout
stays the same: no allocator churn, and the pages stay warm. It is not zeroed between rounds: the
first update of a round is written as ``w_1 θ_1`` over the stale sums (one pass that reads only the
update), which saves a zeroing pass and a read of the buffer per round.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedenc.federation.parameters import (
    Parameters,
    cast_like,
    check_values,
    count_non_finite,
)

_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def parse_accumulator_dtype(option: str) -> torch.dtype | None:
    """Parse the ``accumulator_dtype`` option of the streaming rules (None means auto)."""
    if option not in _DTYPES:
        raise ValueError(f"accumulator_dtype must be one of {sorted(_DTYPES)}, got {option!r}")
    return _DTYPES[option]


class WeightedAccumulator:
    """``Σ w_i θ_i`` per tensor name in views of one flat buffer, plus ``Σ w_i``.

    ``dtype`` None ("auto") accumulates in float32 unless the model has float64 tensors: float32
    keeps the fold memory-bound at one read of the update plus one read-modify-write of the
    buffer; float64 trades twice the buffer traffic for sums that are exact for equal sets.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self._dtype_option = dtype
        self._buffer: torch.Tensor | None = None
        self._layout: tuple[tuple[str, torch.Size], ...] = ()
        self._views: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0
        self._stale = False  # the buffer still holds an earlier round's sums

    @property
    def buffer(self) -> torch.Tensor | None:
        """The flat buffer (None before the first ``reset``)."""
        return self._buffer

    def reset(self, reference: Mapping[str, torch.Tensor]) -> None:
        """Start a new sum shaped like ``reference``; reuses the buffer when the layout is known."""
        dtype = self._dtype_option or (
            torch.float64
            if any(t.dtype == torch.float64 for t in reference.values())
            else torch.float32
        )
        device = next(iter(reference.values())).device if reference else torch.device("cpu")
        layout = tuple((name, t.shape) for name, t in reference.items())
        buffer = self._buffer
        if (
            buffer is None
            or layout != self._layout
            or buffer.dtype != dtype
            or buffer.device != device
        ):
            total = sum(t.numel() for t in reference.values())
            buffer = torch.empty(total, dtype=dtype, device=device)
            views: dict[str, torch.Tensor] = {}
            offset = 0
            for name, tensor in reference.items():
                views[name] = buffer[offset : offset + tensor.numel()].view(tensor.shape)
                offset += tensor.numel()
            self._buffer, self._layout, self._views = buffer, layout, views
        self._stale = True
        self.total_weight = 0.0
        self.count = 0

    def add(
        self, params: Mapping[str, torch.Tensor], weight: float, child: str | None = None
    ) -> None:
        """``acc += weight · params`` in place (``params`` already checked against the layout).

        With ``child`` the values are checked for NaN/Inf here, each tensor just before it is
        folded in: a tensor that fits in the cache (4 MiB, say) is then still there, so it is
        read from memory once instead of twice (a separate scan of the whole reply first costs
        about a quarter of the fold). A bad value raises :class:`BadUpdateError` after the
        tensors already folded are taken back out; the sums then equal those without the reply
        up to float rounding (at most an ulp each).

        Why whole tensors and not cache-sized blocks of large ones: every op is an OpenMP
        parallel region, and in the master each region can stall while its gRPC threads hold a
        core. 4 MiB blocks made an 8-child round of a 256 MiB encoder 1.6x as long and held 2.5
        more replies in memory (``benchmarks/master_memory.py --gib 0.25``), 16 MiB blocks did
        the same to a 1 GiB encoder.
        """
        if self._buffer is None:
            raise RuntimeError("WeightedAccumulator.add before reset")
        first = self._stale
        folded: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, view in self._views.items():
            update = params[name]
            if child is not None and count_non_finite(update):
                self._take_back(folded, weight, first)
                check_values(params, child)  # names every bad tensor with its count
            self._fold(view, update, weight, first)
            folded.append((view, update))
        self._stale = False
        self.total_weight += weight
        self.count += 1

    @staticmethod
    def _fold(target: torch.Tensor, update: torch.Tensor, weight: float, first: bool) -> None:
        if not first:
            target.add_(update, alpha=weight)
        elif update.dtype == target.dtype:
            torch.mul(update, weight, out=target)  # over a stale round's sums: no zeroing pass
        else:  # widen first, so the product is taken in the accumulator's precision
            target.copy_(update).mul_(weight)

    def _take_back(
        self, folded: list[tuple[torch.Tensor, torch.Tensor]], weight: float, first: bool
    ) -> None:
        """Undo the tensors of a rejected update folded so far (a first update overwrote stale
        sums, which stay stale)."""
        if not first:
            for target, update in folded:
                target.sub_(update, alpha=weight)
        folded.clear()

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw per-name sums (views of the buffer: read them before the next ``reset``), zero
        before the first ``add``; callers may fold into them in place."""
        if self._stale and self._buffer is not None:
            self._buffer.zero_()
            self._stale = False
        return self._views

    def weighted_mean(
        self, like: Mapping[str, torch.Tensor], denominator: float | None = None
    ) -> Parameters:
        """``Σ w_i θ_i / denominator`` (default ``Σ w_i``) as fresh tensors in ``like``'s dtypes."""
        total = self.total_weight if denominator is None else denominator
        if total <= 0.0:
            raise ValueError(f"cannot divide a weighted sum by {total}")
        return {name: cast_like(view / total, like[name]) for name, view in self.sums().items()}
